//! Command-line flags with etcd's names and defaults; every flag can also come from
//! an `ETCD_*` environment variable, as with etcd.

use std::path::PathBuf;

use clap::{Parser, ValueEnum};

/// A URL a member listens on or advertises: http or https, host and port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberUrl {
    /// "http" or "https".
    pub scheme: String,
    /// Host name or IP address.
    pub host: String,
    /// TCP port.
    pub port: u16,
}

impl std::fmt::Display for MemberUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}://{}:{}", self.scheme, self.host, self.port)
    }
}

impl std::str::FromStr for MemberUrl {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (scheme, rest) = text
            .split_once("://")
            .ok_or_else(|| format!("URL {text:?} must start with http:// or https://"))?;
        if scheme != "http" && scheme != "https" {
            return Err(format!(
                "URL scheme {scheme:?} is not supported in {text:?} (use http or https)"
            ));
        }
        let rest = rest.trim_end_matches('/');
        if rest.contains('/') {
            return Err(format!("URL {text:?} must not contain a path"));
        }
        let (host, port) = rest
            .rsplit_once(':')
            .ok_or_else(|| format!("URL {text:?} must give a port (host:port)"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err(format!("URL {text:?} has no host"));
        }
        let port = port
            .parse::<u16>()
            .map_err(|_| format!("URL {text:?} has an invalid port {port:?}"))?;
        Ok(MemberUrl {
            scheme: scheme.to_string(),
            host: host.to_string(),
            port,
        })
    }
}

/// A comma-separated list of URLs, as etcd's URL flags take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UrlList(pub Vec<MemberUrl>);

impl std::str::FromStr for UrlList {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let urls = text
            .split(',')
            .map(str::trim)
            .filter(|part| !part.is_empty())
            .map(str::parse)
            .collect::<Result<Vec<MemberUrl>, String>>()?;
        if urls.is_empty() {
            return Err("at least one URL is required".into());
        }
        Ok(UrlList(urls))
    }
}

impl UrlList {
    /// The URLs as strings.
    pub fn strings(&self) -> Vec<String> {
        self.0.iter().map(ToString::to_string).collect()
    }
}

/// `--initial-cluster-state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ClusterState {
    /// Bootstrap a new cluster.
    New,
    /// Join an existing cluster.
    Existing,
}

/// `--log-level`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogLevel {
    /// Everything.
    Debug,
    /// Normal operation.
    Info,
    /// Problems only.
    Warn,
    /// Errors only.
    Error,
    /// Errors only (etcd's name).
    Panic,
    /// Errors only (etcd's name).
    Fatal,
}

/// `--log-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// One human-readable line per event.
    #[value(alias = "console")]
    Text,
    /// One JSON object per line, fields included.
    Json,
}

/// The kvstore server: an etcd-compatible key-value store.
#[derive(Debug, Clone, Parser)]
#[command(name = "kvstore", version = concat!(env!("CARGO_PKG_VERSION"), " (etcd API 3.5)"), about)]
pub struct Config {
    /// Human-readable name for this member.
    #[arg(long, env = "ETCD_NAME", default_value = "default")]
    pub name: String,

    /// Path to the data directory [default: ${name}.kvstore].
    #[arg(long, env = "ETCD_DATA_DIR")]
    pub data_dir: Option<PathBuf>,

    /// List of URLs to listen on for client traffic.
    #[arg(
        long,
        env = "ETCD_LISTEN_CLIENT_URLS",
        default_value = "http://localhost:2379"
    )]
    pub listen_client_urls: UrlList,

    /// List of this member's client URLs to advertise to the rest of the cluster.
    #[arg(
        long,
        env = "ETCD_ADVERTISE_CLIENT_URLS",
        default_value = "http://localhost:2379"
    )]
    pub advertise_client_urls: UrlList,

    /// List of URLs to listen on for peer traffic.
    #[arg(
        long,
        env = "ETCD_LISTEN_PEER_URLS",
        default_value = "http://localhost:2380"
    )]
    pub listen_peer_urls: UrlList,

    /// Additional URLs to serve /metrics and /health on (comma separated).
    #[arg(long, env = "ETCD_LISTEN_METRICS_URLS")]
    pub listen_metrics_urls: Option<UrlList>,

    /// List of this member's peer URLs to advertise to the rest of the cluster.
    #[arg(
        long,
        env = "ETCD_INITIAL_ADVERTISE_PEER_URLS",
        default_value = "http://localhost:2380"
    )]
    pub initial_advertise_peer_urls: UrlList,

    /// Initial cluster configuration for bootstrapping (name=peerURL,...).
    #[arg(long, env = "ETCD_INITIAL_CLUSTER")]
    pub initial_cluster: Option<String>,

    /// Discovery URL used to bootstrap the cluster (etcd's v2 discovery protocol).
    #[arg(long, env = "ETCD_DISCOVERY")]
    pub discovery: Option<String>,

    /// DNS domain whose SRV records (_etcd-server-ssl._tcp, _etcd-server._tcp)
    /// bootstrap the cluster.
    #[arg(long, env = "ETCD_DISCOVERY_SRV")]
    pub discovery_srv: Option<String>,

    /// Suffix to the SRV service names queried for --discovery-srv
    /// (_etcd-server-<name>._tcp).
    #[arg(long, env = "ETCD_DISCOVERY_SRV_NAME")]
    pub discovery_srv_name: Option<String>,

    /// Initial cluster token, so that clusters with different tokens never merge.
    #[arg(
        long,
        env = "ETCD_INITIAL_CLUSTER_TOKEN",
        default_value = "etcd-cluster"
    )]
    pub initial_cluster_token: String,

    /// Initial cluster state ('new' or 'existing').
    #[arg(
        long,
        env = "ETCD_INITIAL_CLUSTER_STATE",
        value_enum,
        default_value = "new"
    )]
    pub initial_cluster_state: ClusterState,

    /// Maximum client request size in bytes the server will accept.
    #[arg(long, env = "ETCD_MAX_REQUEST_BYTES", default_value_t = 1_572_864)]
    pub max_request_bytes: u32,

    /// Maximum number of operations permitted in a transaction.
    #[arg(long, env = "ETCD_MAX_TXN_OPS", default_value_t = 128, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_txn_ops: u32,

    /// Raise alarms when the backend size exceeds the given quota (0 defaults to 2 GiB).
    #[arg(long, env = "ETCD_QUOTA_BACKEND_BYTES", default_value_t = 0)]
    pub quota_backend_bytes: i64,

    /// Time (in milliseconds) of a heartbeat interval.
    #[arg(long, env = "ETCD_HEARTBEAT_INTERVAL", default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..))]
    pub heartbeat_interval: u64,

    /// Time (in milliseconds) for an election to timeout.
    #[arg(long, env = "ETCD_ELECTION_TIMEOUT", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
    pub election_timeout: u64,

    /// Number of committed transactions to trigger a snapshot to disk.
    #[arg(long, env = "ETCD_SNAPSHOT_COUNT", default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub snapshot_count: u64,

    /// Duration of periodic watch progress notifications (a Go duration, e.g. 10m, 500ms).
    #[arg(long, env = "ETCD_EXPERIMENTAL_WATCH_PROGRESS_NOTIFY_INTERVAL", default_value = "10m", value_parser = parse_duration)]
    pub experimental_watch_progress_notify_interval: std::time::Duration,

    /// Path to the client server TLS certificate file.
    #[arg(long, env = "ETCD_CERT_FILE")]
    pub cert_file: Option<PathBuf>,

    /// Path to the client server TLS key file.
    #[arg(long, env = "ETCD_KEY_FILE")]
    pub key_file: Option<PathBuf>,

    /// Path to the client server TLS trusted CA certificate file.
    #[arg(long, env = "ETCD_TRUSTED_CA_FILE")]
    pub trusted_ca_file: Option<PathBuf>,

    /// Enable client certificate authentication.
    #[arg(long, env = "ETCD_CLIENT_CERT_AUTH", num_args = 0..=1, default_missing_value = "true", default_value_t = false, action = clap::ArgAction::Set)]
    pub client_cert_auth: bool,

    /// Path to the client certificate revocation list file (PEM or DER).
    #[arg(long, env = "ETCD_CLIENT_CRL_FILE")]
    pub client_crl_file: Option<PathBuf>,

    /// Allowed TLS hostname for client certificate authentication: a client
    /// certificate must name it among its DNS or IP subject alternative names.
    #[arg(long, env = "ETCD_CLIENT_CERT_ALLOWED_HOSTNAME")]
    pub client_cert_allowed_hostname: Option<String>,

    /// Client TLS using generated certificates.
    #[arg(long, env = "ETCD_AUTO_TLS", num_args = 0..=1, default_missing_value = "true", default_value_t = false, action = clap::ArgAction::Set)]
    pub auto_tls: bool,

    /// Path to the peer server TLS certificate file.
    #[arg(long, env = "ETCD_PEER_CERT_FILE")]
    pub peer_cert_file: Option<PathBuf>,

    /// Path to the peer server TLS key file.
    #[arg(long, env = "ETCD_PEER_KEY_FILE")]
    pub peer_key_file: Option<PathBuf>,

    /// Path to the peer server TLS trusted CA file.
    #[arg(long, env = "ETCD_PEER_TRUSTED_CA_FILE")]
    pub peer_trusted_ca_file: Option<PathBuf>,

    /// Enable peer client certificate authentication.
    #[arg(long, env = "ETCD_PEER_CLIENT_CERT_AUTH", num_args = 0..=1, default_missing_value = "true", default_value_t = false, action = clap::ArgAction::Set)]
    pub peer_client_cert_auth: bool,

    /// Peer TLS using generated certificates.
    #[arg(long, env = "ETCD_PEER_AUTO_TLS", num_args = 0..=1, default_missing_value = "true", default_value_t = false, action = clap::ArgAction::Set)]
    pub peer_auto_tls: bool,

    /// Allowed CommonName for inter-peer authentication.
    #[arg(long, env = "ETCD_PEER_CERT_ALLOWED_CN")]
    pub peer_cert_allowed_cn: Option<String>,

    /// Allowed TLS hostname for inter-peer authentication: a peer certificate must
    /// name it among its DNS or IP subject alternative names.
    #[arg(long, env = "ETCD_PEER_CERT_ALLOWED_HOSTNAME")]
    pub peer_cert_allowed_hostname: Option<String>,

    /// Skip verification of SAN field in client certificate for peer connections.
    #[arg(long, env = "ETCD_EXPERIMENTAL_PEER_SKIP_CLIENT_SAN_VERIFICATION", num_args = 0..=1, default_missing_value = "true", default_value_t = false, action = clap::ArgAction::Set)]
    pub experimental_peer_skip_client_san_verification: bool,

    /// Path to the peer certificate revocation list file (PEM or DER).
    #[arg(long, env = "ETCD_PEER_CRL_FILE")]
    pub peer_crl_file: Option<PathBuf>,

    /// The validity period of the self-signed certificates, in years.
    #[arg(long, env = "ETCD_SELF_SIGNED_CERT_VALIDITY", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub self_signed_cert_validity: u32,

    /// Comma-separated list of supported TLS 1.2 cipher suites between client/server
    /// and peers (Go's names; empty means rustls' defaults).
    #[arg(long, env = "ETCD_CIPHER_SUITES", value_delimiter = ',')]
    pub cipher_suites: Vec<String>,

    /// Minimum TLS version: TLS1.2 or TLS1.3.
    #[arg(long, env = "ETCD_TLS_MIN_VERSION", default_value = "TLS1.2")]
    pub tls_min_version: String,

    /// Maximum TLS version: TLS1.2 or TLS1.3 (empty: the newest).
    #[arg(long, env = "ETCD_TLS_MAX_VERSION", default_value = "")]
    pub tls_max_version: String,

    /// A TLS handshake not finished within this time is dropped (a Go duration).
    #[arg(long, env = "ETCD_TLS_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub tls_handshake_timeout: std::time::Duration,

    /// Maximum open connections on each client and peer listener; more wait in the
    /// listen queue.
    #[arg(long, env = "ETCD_MAX_CONNECTIONS", default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,

    /// Maximum concurrent streams that each client connection may open.
    #[arg(long, env = "ETCD_MAX_CONCURRENT_STREAMS", default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_concurrent_streams: u32,

    /// Frequency duration of server-to-client pings to check if a connection is alive
    /// (0 to disable).
    #[arg(long, env = "ETCD_GRPC_KEEPALIVE_INTERVAL", default_value = "2h", value_parser = parse_duration)]
    pub grpc_keepalive_interval: std::time::Duration,

    /// Additional duration of wait before closing a non-responsive connection.
    #[arg(long, env = "ETCD_GRPC_KEEPALIVE_TIMEOUT", default_value = "20s", value_parser = parse_duration)]
    pub grpc_keepalive_timeout: std::time::Duration,

    /// Auth token type: 'simple' or 'jwt,pub-key=...,priv-key=...,sign-method=...'.
    #[arg(long, env = "ETCD_AUTH_TOKEN", default_value = "simple")]
    pub auth_token: String,

    /// The lifetime in seconds of a simple auth token.
    #[arg(long, env = "ETCD_AUTH_TOKEN_TTL", default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..))]
    pub auth_token_ttl: u64,

    /// Cost of the bcrypt hash of user passwords (4 to 31).
    #[arg(long, env = "ETCD_BCRYPT_COST", default_value_t = 10, value_parser = clap::value_parser!(u32).range(4..=31))]
    pub bcrypt_cost: u32,

    /// Log level: debug, info, warn, error, panic or fatal.
    #[arg(long, env = "ETCD_LOG_LEVEL", value_enum, default_value = "info")]
    pub log_level: LogLevel,

    /// Log format: text (also "console") or json.
    #[arg(long, env = "ETCD_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
}

pub use etcd_api::duration::parse_duration;

/// The default quota etcd applies when `--quota-backend-bytes` is 0.
pub const DEFAULT_QUOTA_BACKEND_BYTES: i64 = 2 * 1024 * 1024 * 1024;

impl Config {
    /// The data directory, defaulting to `${name}.kvstore` as etcd defaults to `${name}.etcd`.
    pub fn data_dir(&self) -> PathBuf {
        self.data_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(format!("{}.kvstore", self.name)))
    }

    /// The backend quota in effect.
    pub fn quota_backend_bytes(&self) -> i64 {
        if self.quota_backend_bytes <= 0 {
            DEFAULT_QUOTA_BACKEND_BYTES
        } else {
            self.quota_backend_bytes
        }
    }

    /// Checks combinations clap cannot: the member must appear in `--initial-cluster`
    /// with exactly its advertised peer URLs.
    pub fn validate(&self) -> Result<(), String> {
        if self.election_timeout < 5 * self.heartbeat_interval {
            return Err(format!(
                "--election-timeout[{}ms] should be at least as 5 times as --heartbeat-interval[{}ms]",
                self.election_timeout, self.heartbeat_interval
            ));
        }
        let bootstraps = [
            self.discovery.is_some(),
            self.initial_cluster.is_some(),
            self.discovery_srv.is_some(),
        ];
        if bootstraps.iter().filter(|set| **set).count() > 1 {
            return Err(
                "multiple discovery or bootstrap flags are set. Choose one of \"initial-cluster\", \"discovery\" or \"discovery-srv\""
                    .into(),
            );
        }
        if self.discovery_srv.as_deref() == Some("") {
            return Err("--discovery-srv must name a DNS domain".into());
        }
        if let Some(url) = &self.discovery {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(format!("--discovery {url:?} must be an http(s) URL"));
            }
        }
        let client_tls = self.cert_file.is_some() || self.key_file.is_some() || self.auto_tls;
        if let Some(url) = self
            .listen_client_urls
            .0
            .iter()
            .find(|url| url.scheme == "https" && !client_tls)
        {
            return Err(format!("TLS key/cert (--cert-file, --key-file) must be provided for client url {url} with HTTPS scheme"));
        }
        let peer_tls =
            self.peer_cert_file.is_some() || self.peer_key_file.is_some() || self.peer_auto_tls;
        if let Some(url) = self
            .listen_peer_urls
            .0
            .iter()
            .find(|url| url.scheme == "https" && !peer_tls)
        {
            return Err(format!("TLS key/cert (--peer-cert-file, --peer-key-file) must be provided for peer url {url} with HTTPS scheme"));
        }
        if self.client_cert_auth && self.trusted_ca_file.is_none() && !self.auto_tls {
            return Err("--client-cert-auth needs --trusted-ca-file".into());
        }
        if self.peer_client_cert_auth && self.peer_trusted_ca_file.is_none() && !self.peer_auto_tls
        {
            return Err("--peer-client-cert-auth needs --peer-trusted-ca-file".into());
        }
        self.tls_options().check()?;
        crate::token::TokenProvider::from_flag(&self.auth_token)?;
        let cluster = self.initial_cluster_members()?;
        let own: Vec<String> = cluster
            .iter()
            .filter(|(name, _)| name == &self.name)
            .map(|(_, url)| url.to_string())
            .collect();
        if own.is_empty() {
            return Err(format!(
                "--initial-cluster has no member named {:?} (set --name or --initial-cluster)",
                self.name
            ));
        }
        let mut advertised = self.initial_advertise_peer_urls.strings();
        let mut own = own;
        advertised.sort();
        own.sort();
        if advertised != own {
            return Err(format!(
                "--initial-cluster has {}={} but --initial-advertise-peer-urls is {}",
                self.name,
                own.join(","),
                advertised.join(",")
            ));
        }
        let mut urls = std::collections::BTreeSet::new();
        for (_, url) in &cluster {
            if !urls.insert(url.to_string()) {
                return Err(format!(
                    "--initial-cluster has peer URL {url} more than once"
                ));
            }
        }
        Ok(())
    }

    /// The TLS versions and cipher suites of every listener and peer call.
    pub fn tls_options(&self) -> crate::tls::TlsOptions {
        crate::tls::TlsOptions {
            cipher_suites: self.cipher_suites.clone(),
            min_version: self.tls_min_version.clone(),
            max_version: self.tls_max_version.clone(),
        }
    }

    /// The client listeners' certificates: the given files, or with `--auto-tls` a
    /// self-signed pair under `<data-dir>/fixtures/client`; `None` without TLS.
    pub fn client_tls_files(&self) -> Result<Option<crate::tls::TlsFiles>, String> {
        let allowed = allowed_client(
            ("client-cert-allowed-cn", &None),
            (
                "client-cert-allowed-hostname",
                &self.client_cert_allowed_hostname,
            ),
        )?;
        self.tls_files(
            [
                &self.cert_file,
                &self.key_file,
                &self.trusted_ca_file,
                &self.client_crl_file,
            ],
            self.client_cert_auth,
            self.auto_tls,
            allowed,
            (
                "client",
                [&self.listen_client_urls, &self.advertise_client_urls],
            ),
            ["cert-file", "key-file"],
        )
    }

    /// The peer listeners' and peer calls' certificates, as [`Config::client_tls_files`].
    pub fn peer_tls_files(&self) -> Result<Option<crate::tls::TlsFiles>, String> {
        let allowed = allowed_client(
            ("peer-cert-allowed-cn", &self.peer_cert_allowed_cn),
            (
                "peer-cert-allowed-hostname",
                &self.peer_cert_allowed_hostname,
            ),
        )?;
        self.tls_files(
            [
                &self.peer_cert_file,
                &self.peer_key_file,
                &self.peer_trusted_ca_file,
                &self.peer_crl_file,
            ],
            self.peer_client_cert_auth,
            self.peer_auto_tls,
            allowed,
            (
                "peer",
                [&self.listen_peer_urls, &self.initial_advertise_peer_urls],
            ),
            ["peer-cert-file", "peer-key-file"],
        )
    }

    fn tls_files(
        &self,
        [cert, key, ca, crl]: [&Option<PathBuf>; 4],
        client_cert_auth: bool,
        auto: bool,
        allowed: Option<crate::tls::AllowedClient>,
        (fixture, urls): (&str, [&UrlList; 2]),
        [cert_flag, key_flag]: [&str; 2],
    ) -> Result<Option<crate::tls::TlsFiles>, String> {
        match (cert, key) {
            (Some(cert), Some(key)) => {
                if auto {
                    tracing::warn!("ignoring automatic TLS for {fixture} traffic: --{cert_flag} and --{key_flag} are given");
                }
                Ok(Some(crate::tls::TlsFiles {
                    cert_file: cert.clone(),
                    key_file: key.clone(),
                    trusted_ca_file: ca.clone(),
                    crl_file: crl.clone(),
                    client_cert_auth,
                    allowed,
                    self_signed: false,
                }))
            }
            (Some(_), None) | (None, Some(_)) => Err(format!(
                "--{cert_flag} and --{key_flag} must be given together"
            )),
            (None, None) if auto => {
                let dir = self.data_dir().join("fixtures").join(fixture);
                // The certificate names every host this side listens on or advertises.
                let hosts: Vec<String> = urls
                    .iter()
                    .flat_map(|list| &list.0)
                    .map(|url| url.host.clone())
                    .collect::<std::collections::BTreeSet<_>>()
                    .into_iter()
                    .collect();
                let (cert_file, key_file) =
                    crate::tls::self_signed(&dir, &hosts, self.self_signed_cert_validity)?;
                Ok(Some(crate::tls::TlsFiles {
                    cert_file,
                    key_file,
                    trusted_ca_file: None,
                    // Nobody's certificate chains to a self-signed one.
                    crl_file: None,
                    client_cert_auth: false,
                    allowed: None,
                    self_signed: true,
                }))
            }
            (None, None) => Ok(None),
        }
    }

    /// `--initial-cluster` as (name, peer URL) pairs; by default this member alone.
    pub fn initial_cluster_members(&self) -> Result<Vec<(String, MemberUrl)>, String> {
        let Some(text) = &self.initial_cluster else {
            return Ok(self
                .initial_advertise_peer_urls
                .0
                .iter()
                .map(|url| (self.name.clone(), url.clone()))
                .collect());
        };
        text.split(',')
            .map(str::trim)
            .filter(|part| !part.is_empty())
            .map(|part| {
                let (name, url) = part.split_once('=').ok_or_else(|| {
                    format!("--initial-cluster entry {part:?} must be name=peerURL")
                })?;
                let url = url
                    .parse::<MemberUrl>()
                    .map_err(|e| format!("--initial-cluster: {e}"))?;
                Ok((name.to_string(), url))
            })
            .collect()
    }
}

/// What a client certificate must carry besides a valid chain, from a pair of
/// `--*-cert-allowed-cn` and `--*-cert-allowed-hostname` flags (exclusive, as in etcd).
fn allowed_client(
    (cn_flag, cn): (&str, &Option<String>),
    (hostname_flag, hostname): (&str, &Option<String>),
) -> Result<Option<crate::tls::AllowedClient>, String> {
    match (cn, hostname) {
        (Some(cn), Some(hostname)) => Err(format!(
            "--{cn_flag} ({cn:?}) and --{hostname_flag} ({hostname:?}) are mutually exclusive"
        )),
        (Some(cn), None) => Ok(Some(crate::tls::AllowedClient::CommonName(cn.clone()))),
        (None, Some(hostname)) => crate::tls::AllowedClient::hostname(hostname)
            .map(Some)
            .map_err(|e| format!("--{hostname_flag}: {e}")),
        (None, None) => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_etcd() {
        let config = Config::try_parse_from(["kvstore"]).unwrap();
        assert_eq!(config.name, "default");
        assert_eq!(config.data_dir(), PathBuf::from("default.kvstore"));
        assert_eq!(
            config.listen_client_urls.strings(),
            vec!["http://localhost:2379"]
        );
        assert_eq!(
            config.initial_advertise_peer_urls.strings(),
            vec!["http://localhost:2380"]
        );
        assert_eq!(config.max_request_bytes, 1_572_864);
        assert_eq!(config.max_txn_ops, 128);
        assert!(config.validate().is_ok());
    }

    #[test]
    fn bad_urls_name_the_problem() {
        let error = Config::try_parse_from(["kvstore", "--listen-client-urls", "localhost:2379"])
            .unwrap_err();
        assert!(
            error.to_string().contains("--listen-client-urls"),
            "{error}"
        );
        let error =
            Config::try_parse_from(["kvstore", "--listen-client-urls", "ftp://a:1"]).unwrap_err();
        assert!(error.to_string().contains("scheme"), "{error}");
        let error = Config::try_parse_from(["kvstore", "--listen-client-urls", "http://a:99999"])
            .unwrap_err();
        assert!(error.to_string().contains("port"), "{error}");
    }

    #[test]
    fn initial_cluster_must_name_this_member() {
        let config = Config::try_parse_from([
            "kvstore",
            "--name",
            "x",
            "--initial-cluster",
            "y=http://localhost:2380",
        ])
        .unwrap();
        assert!(config.validate().unwrap_err().contains("no member named"));
    }
}
