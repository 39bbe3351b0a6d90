//! Dialing etcd servers: endpoints given as `host:port` or as http/https URLs, TLS on
//! https ones, HTTP/2 pings so that a hung server fails the requests in flight rather
//! than stalling them, a bound on how long opening may take, and etcd's simple or JWT
//! auth token on every request, renewed when the server refuses it as etcd's client
//! does.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Status};

use crate::etcdserverpb::auth_client::AuthClient;
use crate::etcdserverpb::cluster_client::ClusterClient;
use crate::etcdserverpb::maintenance_client::MaintenanceClient;
use crate::etcdserverpb::{AuthenticateRequest, Member, MemberListRequest, StatusRequest};
use crate::tls::{ClientFiles, TlsOptions};

/// How long a connection with requests in flight may be silent before it is pinged.
/// Slower than etcd's default minimum ping interval (5 s), so etcd does not refuse
/// the pings.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// How long a ping may go unanswered before the connection is closed.
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// A request with no answer in this time fails, whatever happened to its connection.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a connection could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    /// The endpoint is not a URI.
    #[error("bad endpoint {endpoint}: {reason}")]
    BadEndpoint {
        /// The endpoint as given.
        endpoint: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The TLS configuration cannot be made (a file is missing or invalid).
    #[error("{0}")]
    Tls(String),
    /// The connection failed.
    #[error("cannot connect to {endpoint}: {reason}")]
    Connect {
        /// The endpoint's URL (http:// added to a bare host:port).
        endpoint: String,
        /// The transport's error, with its causes.
        reason: String,
    },
    /// The server did not answer within the dial timeout.
    #[error("cannot connect to {endpoint}: no answer within {timeout:?}")]
    Timeout {
        /// The endpoint as given.
        endpoint: String,
        /// The dial timeout.
        timeout: Duration,
    },
}

/// Opens connections to etcd servers with one TLS configuration and dial timeout.
#[derive(Debug, Default)]
pub struct Dialer {
    tls_files: Option<ClientFiles>,
    tls_options: TlsOptions,
    tls: OnceLock<Arc<rustls::ClientConfig>>,
    dial_timeout: Duration,
}

impl Dialer {
    /// A dialer for plain endpoints; https ones fail until [`Dialer::with_tls`].
    /// A zero `dial_timeout` waits as long as the system does.
    pub fn new(dial_timeout: Duration) -> Dialer {
        Dialer {
            dial_timeout,
            ..Default::default()
        }
    }

    /// Uses `files` for https endpoints (loaded when the first one is dialed).
    pub fn with_tls(mut self, files: ClientFiles, options: TlsOptions) -> Dialer {
        self.tls_files = Some(files);
        self.tls_options = options;
        self
    }

    fn tls(&self) -> Result<Arc<rustls::ClientConfig>, DialError> {
        if let Some(config) = self.tls.get() {
            return Ok(config.clone());
        }
        let files = self.tls_files.as_ref().ok_or_else(|| {
            DialError::Tls("https endpoints need a CA certificate (or to skip verification)".into())
        })?;
        let config =
            Arc::new(crate::tls::client_config(files, &self.tls_options).map_err(DialError::Tls)?);
        Ok(self.tls.get_or_init(|| config).clone())
    }

    /// Opens one connection to `endpoint` and waits for the server's first answer (to
    /// a Status request; any answer, even an error, shows it is there), within the
    /// dial timeout.
    pub async fn open(&self, endpoint: &str) -> Result<Channel, DialError> {
        let opening = async {
            let channel = self.connect(endpoint).await?;
            let _ = MaintenanceClient::new(channel.clone())
                .status(StatusRequest {})
                .await;
            Ok(channel)
        };
        if self.dial_timeout.is_zero() {
            return opening.await;
        }
        tokio::time::timeout(self.dial_timeout, opening)
            .await
            .unwrap_or_else(|_| {
                Err(DialError::Timeout {
                    endpoint: endpoint.to_string(),
                    timeout: self.dial_timeout,
                })
            })
    }

    /// A connection to `endpoint`, not bounded in time ([`Dialer::open`] bounds it).
    async fn connect(&self, endpoint: &str) -> Result<Channel, DialError> {
        let bad = |error: http::uri::InvalidUri| DialError::BadEndpoint {
            endpoint: endpoint.to_string(),
            reason: error.to_string(),
        };
        let failed = |url: &str, error: tonic::transport::Error| DialError::Connect {
            endpoint: url.to_string(),
            reason: chain(&error),
        };
        if let Some(rest) = endpoint.strip_prefix("https://") {
            let tls = self.tls()?;
            // The channel is told http: the connector does the TLS (and sets
            // TCP_NODELAY), whatever TLS support tonic was built with.
            let channel = Channel::from_shared(format!("http://{rest}")).map_err(bad)?;
            return keep_alive(channel)
                .connect_with_connector(crate::tls::connector(tls, Duration::MAX))
                .await
                .map_err(|error| failed(endpoint, error));
        }
        let url = if endpoint.contains("://") {
            endpoint.to_string()
        } else {
            format!("http://{endpoint}")
        };
        let channel = Channel::from_shared(url.clone()).map_err(bad)?;
        keep_alive(channel)
            .tcp_nodelay(true)
            .connect()
            .await
            .map_err(|error| failed(&url, error))
    }

    /// The leader: the first endpoint that answers Status names it, and its member
    /// list gives its URLs. The error lists what each endpoint said.
    pub async fn leader(&self, endpoints: &[String], token: &Token) -> Result<Member, String> {
        let mut failures = Vec::new();
        for endpoint in endpoints {
            let asked = async {
                let channel = self.open(endpoint).await.map_err(|e| e.to_string())?;
                let channel = InterceptedService::new(channel, token.clone());
                let status = MaintenanceClient::new(channel.clone())
                    .status(StatusRequest {})
                    .await
                    .map_err(|status| status.message().to_string())?
                    .into_inner();
                let members = ClusterClient::new(channel)
                    .member_list(MemberListRequest::default())
                    .await
                    .map_err(|status| status.message().to_string())?
                    .into_inner()
                    .members;
                Ok::<_, String>((status.leader, members))
            };
            match asked.await {
                Ok((0, _)) => failures.push(format!("{endpoint}: no leader")),
                Ok((leader, members)) => match members.into_iter().find(|m| m.id == leader) {
                    Some(member) => return Ok(member),
                    None => failures.push(format!("{endpoint}: leader {leader:x} is not a member")),
                },
                Err(error) => failures.push(format!("{endpoint}: {error}")),
            }
        }
        Err(format!("cannot find the leader ({})", failures.join("; ")))
    }
}

/// An error and its causes, as one line.
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Pings a connection that has requests in flight and has been silent for
/// [`KEEPALIVE_INTERVAL`]; no answer within [`KEEPALIVE_TIMEOUT`] closes it.
fn keep_alive(endpoint: Endpoint) -> Endpoint {
    endpoint
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
}

/// `call`, failed with DEADLINE_EXCEEDED if it has no answer within [`REQUEST_TIMEOUT`].
pub async fn bounded<T>(
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

/// How many times one request renews a refused token before the refusal stands.
pub const RENEWALS: u32 = 3;

/// The auth token (if any) that goes with every request, as metadata `token`. When
/// the server refuses it as expired or stale, [`Token::retried`] authenticates again,
/// as etcd's client does, so clients outlive a token's TTL and auth changes.
#[derive(Clone, Default)]
pub struct Token(Arc<TokenState>);

#[derive(Default)]
struct TokenState {
    current: RwLock<Option<MetadataValue<Ascii>>>,
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

/// One connection with the token on every request.
pub type Conn = InterceptedService<Channel, Token>;

impl Interceptor for Token {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(token) = &*self.0.current.read().expect("token lock") {
            request.metadata_mut().insert("token", token.clone());
        }
        Ok(request)
    }
}

impl Token {
    /// Authenticates as `name` over `channel`, which renewals use again.
    pub async fn login(channel: Channel, name: &str, password: &str) -> Result<Token, Status> {
        let token = authenticate(&channel, name, password).await?;
        Ok(Token(Arc::new(TokenState {
            current: RwLock::new(Some(token)),
            login: Some(Login {
                name: name.to_string(),
                password: password.to_string(),
                channel,
            }),
            ..Default::default()
        })))
    }

    /// `channel` with this token on every request.
    pub fn attach(&self, channel: Channel) -> Conn {
        InterceptedService::new(channel, self.clone())
    }

    /// Whether `status` refuses a token that authenticating again would replace:
    /// expired or unknown, issued before an auth change, or missing (the errors etcd's
    /// client renews on).
    fn refused(&self, status: &Status) -> bool {
        use crate::EtcdError::{AuthOldRevision, InvalidAuthToken, UserEmpty};
        self.0.login.is_some()
            && matches!(
                crate::EtcdError::from_peer_status(status),
                Some(InvalidAuthToken | AuthOldRevision | UserEmpty)
            )
    }

    fn generation(&self) -> u64 {
        self.0.generation.load(Ordering::Acquire)
    }

    /// Makes a request with `call` (bounded by [`REQUEST_TIMEOUT`]), and again with a
    /// renewed token each time the token is refused, up to [`RENEWALS`] times: a
    /// token renewed because it expired can go stale at once if an auth change lands
    /// before the retry.
    pub async fn retried<T, F, Fut>(&self, mut call: F) -> Result<T, Status>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, Status>>,
    {
        let mut renewals = 0;
        loop {
            let generation = self.generation();
            match bounded(call()).await {
                Err(status) if renewals < RENEWALS && self.refused(&status) => {
                    self.renew(generation).await?;
                    renewals += 1;
                }
                result => return result,
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bad_and_unreachable_endpoints_say_which() {
        let dialer = Dialer::new(Duration::from_secs(2));
        let error = dialer.open("http://bad host:1").await.unwrap_err();
        assert!(matches!(error, DialError::BadEndpoint { .. }), "{error}");
        // A port nobody listens on: bind one, then drop it.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let error = dialer.open(&format!("127.0.0.1:{port}")).await.unwrap_err();
        assert!(
            error
                .to_string()
                .starts_with(&format!("cannot connect to http://127.0.0.1:{port}")),
            "{error}"
        );
        let error = dialer.open("https://127.0.0.1:1").await.unwrap_err();
        assert!(matches!(error, DialError::Tls(_)), "{error}");
    }

    #[tokio::test]
    async fn a_silent_server_times_out() {
        // Accepts TCP and never speaks HTTP/2.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        let dialer = Dialer::new(Duration::from_millis(300));
        let error = dialer.open(&address.to_string()).await.unwrap_err();
        assert!(matches!(error, DialError::Timeout { .. }), "{error}");
        drop(listener);
    }
}
