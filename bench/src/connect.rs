//! Connections to the endpoints under test: plain or TLS (https endpoints, with
//! etcdctl's `--cacert`, `--cert`, `--key` and `--insecure-skip-tls-verify`), and
//! with etcd's authentication (`--user`, `--password`) a token on every request.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use kvstore::pb::etcdserverpb::auth_client::AuthClient;
use kvstore::pb::etcdserverpb::AuthenticateRequest;
use kvstore::tls::{TlsFiles, TlsOptions};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::Channel;
use tonic::{Request, Status};

/// How long a TLS connection may take to set up.
const TLS_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How to reach a secured cluster; the flags are etcdctl's.
#[derive(Args)]
pub struct Security {
    /// CA bundle that the certificates of https endpoints must chain to.
    #[arg(long, global = true, value_name = "FILE")]
    cacert: Option<PathBuf>,
    /// Client certificate for https endpoints (with --key).
    #[arg(long, global = true, value_name = "FILE", requires = "key")]
    cert: Option<PathBuf>,
    /// Private key of --cert.
    #[arg(long, global = true, value_name = "FILE", requires = "cert")]
    key: Option<PathBuf>,
    /// Accept any certificate from https endpoints.
    #[arg(long, global = true)]
    insecure_skip_tls_verify: bool,
    /// Authenticate as NAME:PASSWORD (or NAME with --password) and send the token with
    /// every request.
    #[arg(long, global = true, value_name = "NAME[:PASSWORD]")]
    user: Option<String>,
    /// The password of --user (instead of NAME:PASSWORD).
    #[arg(long, global = true, requires = "user")]
    password: Option<String>,
}

/// The auth token (if any) that goes with every request, as metadata `token`.
#[derive(Clone)]
pub struct Token(Option<MetadataValue<Ascii>>);

impl Interceptor for Token {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(token) = &self.0 {
            request.metadata_mut().insert("token", token.clone());
        }
        Ok(request)
    }
}

/// One connection to an endpoint, with the token.
pub type Conn = InterceptedService<Channel, Token>;

/// Opens `conns` connections round robin over `endpoints` (host:port, or http and
/// https URLs), then authenticates once if `--user` is given.
pub async fn connect(endpoints: &[String], conns: usize, security: &Security) -> Result<Vec<Conn>> {
    let tls = if endpoints.iter().any(|e| e.starts_with("https://")) {
        Some(Arc::new(security.tls_config()?))
    } else {
        None
    };
    let mut channels = Vec::with_capacity(conns);
    for index in 0..conns {
        let endpoint = &endpoints[index % endpoints.len()];
        channels.push(open(endpoint, tls.clone()).await?);
    }
    let token = match &security.user {
        Some(user) => Token(Some(security.authenticate(user, &channels[0]).await?)),
        None => Token(None),
    };
    Ok(channels
        .into_iter()
        .map(|channel| InterceptedService::new(channel, token.clone()))
        .collect())
}

async fn open(endpoint: &str, tls: Option<Arc<rustls::ClientConfig>>) -> Result<Channel> {
    if let Some(rest) = endpoint.strip_prefix("https://") {
        let tls = tls.expect("a TLS configuration is made when an endpoint is https");
        // The channel is told http: the connector does the TLS (and sets TCP_NODELAY).
        return Channel::from_shared(format!("http://{rest}"))
            .with_context(|| format!("bad endpoint {endpoint}"))?
            .connect_with_connector(kvstore::tls::connector(tls, TLS_CONNECT_TIMEOUT))
            .await
            .with_context(|| format!("cannot connect to {endpoint}"));
    }
    let url = if endpoint.contains("://") {
        endpoint.to_string()
    } else {
        format!("http://{endpoint}")
    };
    Channel::from_shared(url.clone())
        .with_context(|| format!("bad endpoint {endpoint}"))?
        .tcp_nodelay(true)
        .connect()
        .await
        .with_context(|| format!("cannot connect to {url}"))
}

impl Security {
    fn tls_config(&self) -> Result<rustls::ClientConfig> {
        if self.cacert.is_none() && !self.insecure_skip_tls_verify {
            bail!("https endpoints need --cacert (or --insecure-skip-tls-verify)");
        }
        let files = TlsFiles {
            cert_file: self.cert.clone().unwrap_or_default(),
            key_file: self.key.clone().unwrap_or_default(),
            trusted_ca_file: self.cacert.clone(),
            self_signed: self.insecure_skip_tls_verify,
            ..Default::default()
        };
        kvstore::tls::client_config(&files, &TlsOptions::default()).map_err(anyhow::Error::msg)
    }

    async fn authenticate(&self, user: &str, channel: &Channel) -> Result<MetadataValue<Ascii>> {
        let (name, password) = match (user.split_once(':'), &self.password) {
            (_, Some(password)) => (user, password.as_str()),
            (Some((name, password)), None) => (name, password),
            (None, None) => {
                bail!("--user {user} needs a password: --user NAME:PASSWORD or --password")
            }
        };
        let token = AuthClient::new(channel.clone())
            .authenticate(AuthenticateRequest {
                name: name.to_string(),
                password: password.to_string(),
            })
            .await
            .map_err(|status| anyhow::anyhow!("{}", status.message()))
            .with_context(|| format!("cannot authenticate as {name}"))?
            .into_inner()
            .token;
        token
            .parse()
            .with_context(|| format!("the token for {name} is not valid metadata"))
    }
}
