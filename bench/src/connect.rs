//! Connections to the endpoints under test: plain or TLS (https endpoints, with
//! etcdctl's `--cacert`, `--cert`, `--key` and `--insecure-skip-tls-verify`), and
//! with etcd's authentication (`--user`, `--password`) a token on every request;
//! `--dial-timeout` bounds each connection, and `--target-leader` sends the load to
//! the leader (as etcd's benchmark does). The dialing itself is `etcd_api::client`'s.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
pub use etcd_api::client::{Conn, Token};
use etcd_api::client::{DialError, Dialer};
use etcd_api::tls::{ClientFiles, TlsOptions};

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

/// Where the load goes and how long a connection may take; the flags are etcdctl's
/// and etcd's benchmark's.
#[derive(Args)]
pub struct Dial {
    /// How long each connection may take to open, as a duration (2s, 500ms); 0 waits
    /// as long as the system does.
    #[arg(long, global = true, default_value = "2s", value_parser = etcd_api::duration::parse_duration)]
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
    if endpoints.iter().any(|e| e.starts_with("https://"))
        && security.cacert.is_none()
        && !security.insecure_skip_tls_verify
    {
        bail!("https endpoints need --cacert (or --insecure-skip-tls-verify)");
    }
    let dialer = security.dialer(dial.dial_timeout);
    let token = match &security.user {
        Some(user) => {
            let channel = open(&dialer, &endpoints[0]).await?;
            security.login(user, channel).await?
        }
        None => Token::default(),
    };
    let targets = if dial.target_leader {
        let leader = dialer
            .leader(endpoints, &token)
            .await
            .map_err(|error| anyhow::anyhow!("--target-leader: {error}"))?;
        if leader.client_ur_ls.is_empty() {
            bail!(
                "the leader {} ({:x}) has no client URLs",
                leader.name,
                leader.id
            );
        }
        eprintln!(
            "kvbench: --target-leader: the leader is {} ({:x}) at {}",
            leader.name,
            leader.id,
            leader.client_ur_ls.join(",")
        );
        leader.client_ur_ls
    } else {
        endpoints.to_vec()
    };
    let mut connections = Vec::with_capacity(conns);
    for index in 0..conns {
        let channel = open(&dialer, &targets[index % targets.len()]).await?;
        connections.push(token.attach(channel));
    }
    Ok((connections, token))
}

/// One connection; a timeout names the flag that set it.
async fn open(dialer: &Dialer, endpoint: &str) -> Result<tonic::transport::Channel> {
    dialer.open(endpoint).await.map_err(|error| match error {
        DialError::Timeout { endpoint, timeout } => anyhow::anyhow!(
            "cannot connect to {endpoint}: no answer within --dial-timeout {timeout:?}"
        ),
        error => error.into(),
    })
}

impl Security {
    /// A dialer with these TLS flags (without --cacert or --insecure-skip-tls-verify,
    /// one for plain endpoints only).
    fn dialer(&self, dial_timeout: Duration) -> Dialer {
        let dialer = Dialer::new(dial_timeout);
        if self.cacert.is_none() && !self.insecure_skip_tls_verify {
            return dialer;
        }
        dialer.with_tls(
            ClientFiles {
                cert_file: self.cert.clone().unwrap_or_default(),
                key_file: self.key.clone().unwrap_or_default(),
                trusted_ca_file: self.cacert.clone(),
                skip_verify: self.insecure_skip_tls_verify,
            },
            TlsOptions::default(),
        )
    }

    /// Authenticates as `user` (NAME:PASSWORD, or NAME with --password) over
    /// `channel`, which renewals use again.
    async fn login(&self, user: &str, channel: tonic::transport::Channel) -> Result<Token> {
        let (name, password) = match (user.split_once(':'), &self.password) {
            (_, Some(password)) => (user, password.as_str()),
            (Some((name, password)), None) => (name, password),
            (None, None) => {
                bail!("--user {user} needs a password: --user NAME:PASSWORD or --password")
            }
        };
        Token::login(channel, name, password)
            .await
            .map_err(|status| anyhow::anyhow!("{}", status.message()))
            .with_context(|| format!("cannot authenticate as {name}"))
    }
}
