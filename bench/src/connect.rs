//! Connections to the endpoints under test: plain or TLS (https endpoints, with
//! etcdctl's `--cacert`, `--cert`, `--key` and `--insecure-skip-tls-verify`), and
//! with etcd's authentication (`--user`, `--password`) a token on every request;
//! `--dial-timeout` bounds each connection, and `--target-leader` sends the load to
//! the leader (as etcd's benchmark does).

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use kvstore::pb::etcdserverpb::auth_client::AuthClient;
use kvstore::pb::etcdserverpb::cluster_client::ClusterClient;
use kvstore::pb::etcdserverpb::maintenance_client::MaintenanceClient;
use kvstore::pb::etcdserverpb::{AuthenticateRequest, MemberListRequest, StatusRequest};
use kvstore::tls::{TlsFiles, TlsOptions};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Status};

/// How long a connection with requests in flight may be silent before it is pinged.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// How long a ping may go unanswered before the connection is closed.
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// A request with no answer in this time fails, whatever happened to its connection
/// (a kvbench run refused for want of a client certificate once waited for ever).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// `call`, failed with DEADLINE_EXCEEDED if it has no answer within [`REQUEST_TIMEOUT`].
async fn bounded<T>(
    call: impl std::future::Future<Output = Result<T, Status>>,
) -> Result<T, Status> {
    tokio::time::timeout(REQUEST_TIMEOUT, call)
        .await
        .unwrap_or_else(|_| {
            Err(Status::deadline_exceeded(format!(
                "no answer within {REQUEST_TIMEOUT:?}"
            )))
        })
}

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

/// The auth token (if any) that goes with every request, as metadata `token`. When
/// the server refuses it as expired or stale, [`Token::renew`] authenticates again,
/// as etcd's client does, so runs outlive a token's TTL and auth changes.
#[derive(Clone, Default)]
pub struct Token(Arc<TokenState>);

#[derive(Default)]
struct TokenState {
    current: std::sync::RwLock<Option<MetadataValue<Ascii>>>,
    /// Counts renewals, so the clients refused the same token renew it once.
    generation: AtomicU64,
    renewing: tokio::sync::Mutex<()>,
    login: Option<Login>,
}

/// Who authenticates, and where.
struct Login {
    name: String,
    password: String,
    channel: Channel,
}

impl Interceptor for Token {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(token) = &*self.0.current.read().expect("token lock") {
            request.metadata_mut().insert("token", token.clone());
        }
        Ok(request)
    }
}

impl Token {
    /// Whether `status` refuses a token that authenticating again would replace:
    /// expired or unknown, issued before an auth change, or missing (the errors etcd's
    /// client renews on).
    fn refused(&self, status: &Status) -> bool {
        self.0.login.is_some()
            && matches!(
                status.message(),
                "etcdserver: invalid auth token"
                    | "etcdserver: revision of auth store is old"
                    | "etcdserver: user name is empty"
            )
    }

    /// The renewals so far, for [`Token::renew`] after a refusal.
    fn generation(&self) -> u64 {
        self.0.generation.load(Ordering::Acquire)
    }

    /// Makes a request with `call`, and once more with a renewed token if the token
    /// was refused.
    pub async fn retried<T, F, Fut>(&self, mut call: F) -> Result<T, Status>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, Status>>,
    {
        let generation = self.generation();
        match bounded(call()).await {
            Err(status) if self.refused(&status) => {
                self.renew(generation).await?;
                bounded(call()).await
            }
            result => result,
        }
    }

    /// Authenticates again, unless another client did since it saw `seen`.
    async fn renew(&self, seen: u64) -> Result<(), Status> {
        let Some(login) = &self.0.login else {
            return Ok(());
        };
        let _renewing = self.0.renewing.lock().await;
        if self.generation() != seen {
            return Ok(());
        }
        let token = authenticate(&login.channel, &login.name, &login.password).await?;
        *self.0.current.write().expect("token lock") = Some(token);
        self.0.generation.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }
}

/// A token for `name`.
async fn authenticate(
    channel: &Channel,
    name: &str,
    password: &str,
) -> Result<MetadataValue<Ascii>, Status> {
    let token = AuthClient::new(channel.clone())
        .authenticate(AuthenticateRequest {
            name: name.to_string(),
            password: password.to_string(),
        })
        .await?
        .into_inner()
        .token;
    token
        .parse()
        .map_err(|_| Status::internal(format!("the token for {name} is not valid metadata")))
}

/// One connection to an endpoint, with the token.
pub type Conn = InterceptedService<Channel, Token>;

/// Where the load goes and how long a connection may take; the flags are etcdctl's
/// and etcd's benchmark's.
#[derive(Args)]
pub struct Dial {
    /// How long each connection may take to open, as a duration (2s, 500ms); 0 waits
    /// as long as the system does.
    #[arg(long, global = true, default_value = "2s", value_parser = kvstore::config::parse_duration)]
    dial_timeout: Duration,
    /// Send all load to the leader: ask the endpoints which member leads and connect
    /// to that member's client URLs instead.
    #[arg(long, global = true)]
    target_leader: bool,
}

/// Opens `conns` connections round robin over `endpoints` (host:port, or http and
/// https URLs), or over the leader's client URLs with `--target-leader`, and
/// authenticates once if `--user` is given.
pub async fn connect(
    endpoints: &[String],
    conns: usize,
    dial: &Dial,
    security: &Security,
) -> Result<(Vec<Conn>, Token)> {
    let tls = TlsOnce::default();
    let token = match &security.user {
        Some(user) => {
            let channel = dial.open(&endpoints[0], &tls, security).await?;
            security.login(user, channel).await?
        }
        None => Token::default(),
    };
    let targets = if dial.target_leader {
        dial.leader_urls(endpoints, &tls, security, &token).await?
    } else {
        endpoints.to_vec()
    };
    let mut connections = Vec::with_capacity(conns);
    for index in 0..conns {
        let channel = dial
            .open(&targets[index % targets.len()], &tls, security)
            .await?;
        connections.push(InterceptedService::new(channel, token.clone()));
    }
    Ok((connections, token))
}

/// The TLS configuration, made from the flags when the first https endpoint is met.
#[derive(Default)]
struct TlsOnce(std::sync::OnceLock<Arc<rustls::ClientConfig>>);

impl TlsOnce {
    fn get(&self, security: &Security) -> Result<Arc<rustls::ClientConfig>> {
        if let Some(config) = self.0.get() {
            return Ok(config.clone());
        }
        let config = Arc::new(security.tls_config()?);
        Ok(self.0.get_or_init(|| config).clone())
    }
}

impl Dial {
    /// Opens one connection to `endpoint` and waits for the server's first answer
    /// (to a Status request; any answer, even an error, shows it is there), giving up
    /// after `--dial-timeout`.
    async fn open(&self, endpoint: &str, tls: &TlsOnce, security: &Security) -> Result<Channel> {
        let opening = async {
            let channel = open(endpoint, tls, security).await?;
            let _ = MaintenanceClient::new(channel.clone())
                .status(StatusRequest {})
                .await;
            anyhow::Ok(channel)
        };
        if self.dial_timeout.is_zero() {
            return opening.await;
        }
        match tokio::time::timeout(self.dial_timeout, opening).await {
            Ok(opened) => opened,
            Err(_) => bail!(
                "cannot connect to {endpoint}: no answer within --dial-timeout {:?}",
                self.dial_timeout
            ),
        }
    }

    /// The leader's client URLs: the first endpoint that answers Status names the
    /// leader, and the member list gives its URLs.
    async fn leader_urls(
        &self,
        endpoints: &[String],
        tls: &TlsOnce,
        security: &Security,
        token: &Token,
    ) -> Result<Vec<String>> {
        let mut failures = Vec::new();
        for endpoint in endpoints {
            let asked = async {
                let channel = self.open(endpoint, tls, security).await?;
                let channel = InterceptedService::new(channel, token.clone());
                let status = MaintenanceClient::new(channel.clone())
                    .status(StatusRequest {})
                    .await
                    .map_err(|status| anyhow::anyhow!("{}", status.message()))?
                    .into_inner();
                let members = ClusterClient::new(channel)
                    .member_list(MemberListRequest::default())
                    .await
                    .map_err(|status| anyhow::anyhow!("{}", status.message()))?
                    .into_inner()
                    .members;
                anyhow::Ok((status.leader, members))
            };
            match asked.await {
                Ok((0, _)) => failures.push(format!("{endpoint}: no leader")),
                Ok((leader, members)) => {
                    let Some(member) = members.into_iter().find(|m| m.id == leader) else {
                        failures.push(format!("{endpoint}: leader {leader:x} is not a member"));
                        continue;
                    };
                    if member.client_ur_ls.is_empty() {
                        bail!("the leader {} ({leader:x}) has no client URLs", member.name);
                    }
                    eprintln!(
                        "kvbench: --target-leader: the leader is {} ({leader:x}) at {}",
                        member.name,
                        member.client_ur_ls.join(",")
                    );
                    return Ok(member.client_ur_ls);
                }
                Err(error) => failures.push(format!("{endpoint}: {error:#}")),
            }
        }
        bail!(
            "--target-leader: cannot find the leader ({})",
            failures.join("; ")
        )
    }
}

/// Opens a connection to `endpoint` (unbounded: [`Dial::open`] bounds it). A server
/// that stops answering HTTP/2 pings fails the requests in flight on it, so a hung
/// server ends a run with errors rather than stalling it.
async fn open(endpoint: &str, tls: &TlsOnce, security: &Security) -> Result<Channel> {
    if let Some(rest) = endpoint.strip_prefix("https://") {
        let tls = tls.get(security)?;
        // The channel is told http: the connector does the TLS (and sets TCP_NODELAY).
        let channel = Channel::from_shared(format!("http://{rest}"))
            .with_context(|| format!("bad endpoint {endpoint}"))?;
        return keep_alive(channel)
            .connect_with_connector(kvstore::tls::connector(tls, Duration::MAX))
            .await
            .with_context(|| format!("cannot connect to {endpoint}"));
    }
    let url = if endpoint.contains("://") {
        endpoint.to_string()
    } else {
        format!("http://{endpoint}")
    };
    let channel =
        Channel::from_shared(url.clone()).with_context(|| format!("bad endpoint {endpoint}"))?;
    keep_alive(channel)
        .tcp_nodelay(true)
        .connect()
        .await
        .with_context(|| format!("cannot connect to {url}"))
}

/// Pings a connection that has requests in flight and has been silent for
/// [`KEEPALIVE_INTERVAL`]; no answer within [`KEEPALIVE_TIMEOUT`] closes it. Slower than
/// etcd's default minimum ping interval (5 s), so etcd does not refuse the pings.
fn keep_alive(endpoint: Endpoint) -> Endpoint {
    endpoint
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
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

    /// Authenticates as `user` (NAME:PASSWORD, or NAME with --password) over
    /// `channel`, which renewals use again.
    async fn login(&self, user: &str, channel: Channel) -> Result<Token> {
        let (name, password) = match (user.split_once(':'), &self.password) {
            (_, Some(password)) => (user, password.as_str()),
            (Some((name, password)), None) => (name, password),
            (None, None) => {
                bail!("--user {user} needs a password: --user NAME:PASSWORD or --password")
            }
        };
        let token = authenticate(&channel, name, password)
            .await
            .map_err(|status| anyhow::anyhow!("{}", status.message()))
            .with_context(|| format!("cannot authenticate as {name}"))?;
        Ok(Token(Arc::new(TokenState {
            current: std::sync::RwLock::new(Some(token)),
            login: Some(Login {
                name: name.to_string(),
                password: password.to_string(),
                channel,
            }),
            ..Default::default()
        })))
    }
}
