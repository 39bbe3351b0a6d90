//! Member-to-member traffic on the peer URLs: openraft's RPCs (the network half that
//! openraft calls, and the service half that answers), and the calls a follower makes
//! to the leader: proposals, read indexes, lease renewals. Every call carries the
//! sender's cluster ID; a member answers no one from another cluster.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::BasicNode;
use parking_lot::Mutex;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use super::TypeConfig;
use crate::pb::kvstorepb::peer_client::PeerClient;
use crate::pb::kvstorepb::{PeerHeader, RaftMessage};

/// How long a connection attempt to a peer may take.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

/// Who is calling: this member and its cluster.
#[derive(Debug, Clone, Copy)]
pub struct Caller {
    /// The cluster ID.
    pub cluster_id: u64,
    /// This member's ID.
    pub member_id: u64,
}

impl Caller {
    /// The header every peer call carries.
    pub fn header(&self) -> Option<PeerHeader> {
        Some(PeerHeader {
            cluster_id: self.cluster_id,
            from: self.member_id,
        })
    }
}

/// A peer silent this long counts as disconnected: it answers heartbeats several
/// times a second while it is there.
const LINK_BROKEN: Duration = Duration::from_secs(2);

/// How a peer has been answering: since when without a break, and last when.
#[derive(Clone, Copy)]
struct Link {
    since: Instant,
    last: Instant,
}

/// Connections to peers by URL, shared by openraft's network and the forwarding
/// calls; each remembers how its peer has been answering (etcd's "active since").
pub struct Peers {
    caller: Caller,
    tls: Option<Arc<rustls::ClientConfig>>,
    connections: Mutex<HashMap<String, PeerClient<Channel>>>,
    links: Mutex<HashMap<u64, Link>>,
    /// Told when a peer refuses this member as removed.
    removals: Option<Arc<super::Removals>>,
}

impl Peers {
    /// Peer connections for `caller`; https peers are called with `tls`. A peer's
    /// refusal of a removed member is told to `removals`.
    pub fn new(
        caller: Caller,
        tls: Option<Arc<rustls::ClientConfig>>,
        removals: Option<Arc<super::Removals>>,
    ) -> Arc<Peers> {
        Arc::new(Peers {
            caller,
            tls,
            connections: Mutex::default(),
            links: Mutex::default(),
            removals,
        })
    }

    /// A new lazily connected channel to the peer at `url`.
    pub fn channel(&self, url: &str) -> Result<Channel, Status> {
        peer_channel(url, self.tls.clone())
    }

    /// Who is calling.
    pub fn caller(&self) -> Caller {
        self.caller
    }

    /// A client for the peer at `url` (connected lazily; cheap to clone).
    pub fn client(&self, url: &str) -> Result<PeerClient<Channel>, Status> {
        if let Some(client) = self.connections.lock().get(url) {
            return Ok(client.clone());
        }
        let client = PeerClient::new(peer_channel(url, self.tls.clone())?)
            .max_decoding_message_size(usize::MAX)
            .max_encoding_message_size(usize::MAX);
        self.connections
            .lock()
            .insert(url.to_string(), client.clone());
        Ok(client)
    }

    /// Records that `member` answered just now.
    pub fn answered(&self, member: u64) {
        let now = Instant::now();
        let mut links = self.links.lock();
        let link = links.entry(member).or_insert(Link {
            since: now,
            last: now,
        });
        if now.duration_since(link.last) > LINK_BROKEN {
            link.since = now;
        }
        link.last = now;
    }

    /// Whether `member` answered within `window`.
    pub fn answered_within(&self, member: u64, window: Duration) -> bool {
        self.links
            .lock()
            .get(&member)
            .is_some_and(|link| link.last.elapsed() <= window)
    }

    /// Whether `member` is connected now and has been, without a break, for at least
    /// `duration` (etcd's isConnectedSince).
    pub fn connected_for(&self, member: u64, duration: Duration) -> bool {
        self.links.lock().get(&member).is_some_and(|link| {
            link.last.elapsed() <= LINK_BROKEN && link.since.elapsed() >= duration
        })
    }
}

/// openraft's network: one [`PeerConnection`] per target.
#[derive(Clone)]
pub struct Network {
    peers: Arc<Peers>,
}

impl Network {
    /// A network over `peers`.
    pub fn new(peers: Arc<Peers>) -> Network {
        Network { peers }
    }
}

/// A lazily connected channel to the peer at `url`: TLS with `tls` for https URLs.
pub fn peer_channel(url: &str, tls: Option<Arc<rustls::ClientConfig>>) -> Result<Channel, Status> {
    let bad_url =
        |e: &dyn std::fmt::Display| Status::invalid_argument(format!("bad peer URL {url}: {e}"));
    let Some(rest) = url.strip_prefix("https://") else {
        return Ok(Channel::from_shared(url.to_string())
            .map_err(|e| bad_url(&e))?
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(5))
            .keep_alive_timeout(Duration::from_secs(5))
            .connect_lazy());
    };
    let tls = tls.ok_or_else(|| {
        Status::unavailable(format!(
            "peer URL {url} is https, but peer TLS is not configured (--peer-cert-file and --peer-key-file, or --peer-auto-tls)"
        ))
    })?;
    // The channel itself is told http: the connector below does the TLS, whatever
    // TLS support tonic was built with.
    let endpoint = Channel::from_shared(format!("http://{rest}"))
        .map_err(|e| bad_url(&e))?
        .http2_keep_alive_interval(Duration::from_secs(5))
        .keep_alive_timeout(Duration::from_secs(5));
    let connector = crate::tls::connector(tls, CONNECT_TIMEOUT);
    Ok(endpoint.connect_with_connector_lazy(connector))
}

/// openraft's connection to one peer.
pub struct PeerConnection {
    peers: Arc<Peers>,
    target: u64,
    url: String,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerConnection;

    async fn new_client(&mut self, target: u64, node: &BasicNode) -> Self::Network {
        PeerConnection {
            peers: self.peers.clone(),
            target,
            url: node.addr.clone(),
        }
    }
}

/// Encodes an openraft message for the wire.
pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    bincode::serialize(value).expect("openraft messages serialize")
}

/// Decodes an openraft message from the wire.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    bincode::deserialize(bytes).map_err(|e| format!("malformed raft message: {e}"))
}

type RemoteResult<T, E> = Result<T, RaftError<u64, E>>;

impl PeerConnection {
    async fn call<Req, Resp, E>(
        &mut self,
        method: &'static str,
        request: &Req,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<u64, BasicNode, RaftError<u64, E>>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let unreachable = |message: String| {
            RPCError::Unreachable(Unreachable::new(&std::io::Error::new(
                std::io::ErrorKind::NotConnected,
                message,
            )))
        };
        let network =
            |message: String| RPCError::Network(NetworkError::new(&std::io::Error::other(message)));
        let mut client = self
            .peers
            .client(&self.url)
            .map_err(|s| unreachable(s.to_string()))?;
        let message = RaftMessage {
            header: self.peers.caller.header(),
            payload: encode(request),
        };
        let call = async {
            match method {
                "append_entries" => client.append_entries(message).await,
                "vote" => client.vote(message).await,
                _ => client.install_snapshot(message).await,
            }
        };
        let started = Instant::now();
        let response = match tokio::time::timeout(option.hard_ttl(), call).await {
            Err(_) => return Err(network(format!("{method} to {:x} timed out", self.target))),
            Ok(Err(status)) if status.code() == tonic::Code::Unavailable => {
                return Err(unreachable(format!(
                    "member {:x} at {} is unreachable: {}",
                    self.target,
                    self.url,
                    status.message()
                )))
            }
            Ok(Err(status)) if is_removed_refusal(&status) => {
                if let Some(removals) = &self.peers.removals {
                    removals.refused_by_peer(self.target);
                }
                return Err(network(format!(
                    "{method} to {:x}: {}",
                    self.target,
                    status.message()
                )));
            }
            Ok(Err(status)) => {
                return Err(network(format!(
                    "{method} to {:x}: {}",
                    self.target,
                    status.message()
                )))
            }
            Ok(Ok(response)) => response.into_inner(),
        };
        self.peers.answered(self.target);
        if method == "append_entries" {
            crate::metrics::METRICS
                .peer_round_trip
                .with_label_values(&[&format!("{:x}", self.target)])
                .observe(started.elapsed().as_secs_f64());
        }
        let result: RemoteResult<Resp, E> = decode(&response.payload).map_err(network)?;
        result.map_err(|error| RPCError::RemoteError(RemoteError::new(self.target, error)))
    }
}

impl RaftNetwork<TypeConfig> for PeerConnection {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<u64>, RPCError<u64, BasicNode, RaftError<u64>>> {
        self.call("append_entries", &rpc, &option).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<u64>,
        RPCError<u64, BasicNode, RaftError<u64, InstallSnapshotError>>,
    > {
        self.call("install_snapshot", &rpc, &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<u64>,
        option: RPCOption,
    ) -> Result<VoteResponse<u64>, RPCError<u64, BasicNode, RaftError<u64>>> {
        self.call("vote", &rpc, &option).await
    }
}

/// The refusal of a call from a removed member (etcd's peers answer 410 Gone).
pub fn removed_refusal() -> Status {
    Status::not_found(super::REMOVED_MESSAGE)
}

fn is_removed_refusal(status: &Status) -> bool {
    status.code() == tonic::Code::NotFound && status.message() == super::REMOVED_MESSAGE
}

/// Checks that a peer call comes from this member's cluster.
pub fn check_cluster(
    own_cluster: u64,
    header: &Option<PeerHeader>,
    what: &str,
) -> Result<u64, Status> {
    let header = header
        .as_ref()
        .ok_or_else(|| Status::invalid_argument("peer call without a header"))?;
    if header.cluster_id != own_cluster {
        tracing::warn!(
            from = %format!("{:x}", header.from),
            their_cluster = %format!("{:x}", header.cluster_id),
            our_cluster = %format!("{own_cluster:x}"),
            call = what,
            "refused a peer of another cluster (check --initial-cluster-token and --initial-cluster)"
        );
        return Err(Status::failed_precondition(format!(
            "member of cluster {:x} refuses a peer of cluster {:x}",
            own_cluster, header.cluster_id
        )));
    }
    Ok(header.from)
}

/// The answer to an openraft RPC, as a wire message.
pub fn raft_reply<T: Serialize, E: Serialize>(
    result: Result<T, RaftError<u64, E>>,
) -> Result<Response<RaftMessage>, Status> {
    Ok(Response::new(RaftMessage {
        header: None,
        payload: encode(&result),
    }))
}

/// Decodes an openraft request from a wire message.
pub fn raft_request<T: DeserializeOwned>(request: &Request<RaftMessage>) -> Result<T, Status> {
    decode(&request.get_ref().payload).map_err(Status::invalid_argument)
}
