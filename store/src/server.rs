//! The server: owns the Raft node and the MVCC store; turns client mutations into
//! proposals, serves linearizable and serializable reads, and answers with etcd's
//! response headers. Knows nothing of gRPC services beyond `Status`.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use openraft::error::RaftError;
use openraft::{BasicNode, ServerState};
use serde::{Deserialize, Serialize};

use crate::auth::Access;
use crate::config::ClusterState;
use crate::config::Config;
use crate::error::EtcdError;
use crate::ids::IdGenerator;
use crate::mvcc::lease::ExpiryError;
use crate::mvcc::Mvcc;
use crate::mvcc::ReadView;
use crate::pb::etcdserverpb::{
    DeleteRangeRequest, DeleteRangeResponse, LeaseGrantRequest, LeaseGrantResponse,
    LeaseLeasesResponse, LeaseRevokeRequest, LeaseRevokeResponse, LeaseStatus,
    LeaseTimeToLiveResponse, Member, PutRequest, PutResponse, RangeRequest, RangeResponse,
    ResponseHeader, TxnRequest, TxnResponse,
};
use crate::pb::kvstorepb::internal_raft_request::Request as Proposal;
use crate::pb::kvstorepb::internal_raft_response::Response;
use crate::pb::kvstorepb::AuthInfo;
use crate::pb::kvstorepb::InternalRaftRequest;
use crate::pb::kvstorepb::{
    LeaseRenewRequest, LeaseTimeToLiveForward, MemberAttributes, PeerHeader, RaftBatch,
    RaftBatchResponse,
};
use crate::proposer::{ProposeError, Proposer};
use crate::raft::log_store::LogStore;
use crate::raft::network::{Caller, Network, Peers};
use crate::raft::state_machine::StateMachine;
use crate::raft::Raft;
use crate::storage::{meta_key, Storage, WriteBatch, CF_META};
use crate::transfer::TransferGate;

/// Errors of starting or running the server.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An etcd error for the client.
    #[error(transparent)]
    Etcd(#[from] EtcdError),
    /// The data directory cannot be used.
    #[error("cannot use data directory {path}: {reason}")]
    DataDir {
        /// Which directory.
        path: String,
        /// Why.
        reason: String,
    },
    /// Storage failed.
    #[error(transparent)]
    Storage(#[from] crate::storage::Error),
    /// The MVCC state could not be loaded or read.
    #[error(transparent)]
    Mvcc(#[from] crate::mvcc::Error),
    /// Raft failed.
    #[error("raft: {0}")]
    Raft(String),
    /// The initial cluster could not be found (discovery, DNS SRV records).
    #[error("{0}")]
    Bootstrap(String),
    /// Certificates or TLS flags cannot be used.
    #[error("TLS: {0}")]
    Tls(String),
    /// The state machine answered a request with the wrong kind of response.
    #[error("unexpected apply result: {0}")]
    Unexpected(String),
}

impl From<Error> for tonic::Status {
    fn from(error: Error) -> Self {
        match error {
            Error::Etcd(error) => error.into(),
            Error::Mvcc(crate::mvcc::Error::Etcd(error)) => error.into(),
            other => tonic::Status::internal(other.to_string()),
        }
    }
}

impl From<crate::mvcc::Error> for tonic::Status {
    fn from(error: crate::mvcc::Error) -> Self {
        Error::from(error).into()
    }
}

/// Proposes `$proposal`, expects the applied response `$variant` and fills its
/// header with this member's cluster fields.
macro_rules! proposed {
    ($server:expr, $proposal:expr, $variant:path) => {
        match $server.propose_request($proposal).await? {
            $variant(mut response) => {
                $server.fill_header(&mut response.header);
                Ok(response)
            }
            other => Err(Error::Unexpected(format!("{other:?}"))),
        }
    };
}

/// Who this member is, fixed when its data dir is created.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Identity {
    /// `--name` at creation.
    pub name: String,
    /// The etcd member ID.
    pub member_id: u64,
    /// The etcd cluster ID.
    pub cluster_id: u64,
    /// Peer URLs at creation.
    pub peer_urls: Vec<String>,
}

/// Limits taken from the flags.
#[derive(Debug, Clone)]
pub struct Limits {
    /// `--max-request-bytes`.
    pub max_request_bytes: usize,
    /// `--max-txn-ops`.
    pub max_txn_ops: usize,
    /// `--quota-backend-bytes` in effect.
    pub quota_backend_bytes: i64,
    /// The smallest lease TTL granted, in seconds, computed as etcd does.
    pub min_lease_ttl: i64,
    /// The election timeout, which a new leader adds to every lease's TTL.
    pub election_timeout: Duration,
    /// How often watchers that asked for it get progress notifications.
    pub watch_progress_notify_interval: Duration,
    /// `--client-cert-auth`: a client certificate's CommonName names the user of
    /// requests that carry no token.
    pub client_cert_auth: bool,
    /// `--bcrypt-cost`.
    pub bcrypt_cost: u32,
}

tokio::task_local! {
    /// The user the client request being served acts for (or why its token was
    /// refused), set by the API layer around each request. Work the server does on
    /// its own (lease expiry, alarms it raises) runs outside it.
    pub static CALLER: Result<AuthInfo, EtcdError>;
}

/// The user the current client request acts for; `None` for the server's own work.
pub fn caller() -> Result<Option<AuthInfo>, EtcdError> {
    match CALLER.try_with(Clone::clone) {
        Ok(Ok(auth)) => Ok(Some(auth)),
        Ok(Err(error)) => Err(error),
        Err(_) => Ok(None),
    }
}

/// Runs `work` on a task of its own, acting for `caller` (as [`caller`] returned it
/// in the request that started the work).
pub fn spawn_as<F>(caller: Result<Option<AuthInfo>, EtcdError>, work: F)
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    match caller.transpose() {
        None => {
            tokio::spawn(work);
        }
        Some(caller) => {
            tokio::spawn(CALLER.scope(caller, work));
        }
    }
}

/// Go's name of a gRPC code, as it appears in "rpc error: code = ... desc = ...".
fn go_code_name(code: tonic::Code) -> String {
    format!("{code:?}")
}

/// An etcd error as Go's gRPC client prints it (watch cancel reasons carry this).
pub fn go_rpc_error(error: EtcdError) -> String {
    format!(
        "rpc error: code = {} desc = {error}",
        go_code_name(error.code())
    )
}

/// etcd's minimum lease TTL: one and a half election timeouts, counted in whole
/// heartbeat ticks, rounded up to whole seconds.
pub fn min_lease_ttl(heartbeat_ms: u64, election_ms: u64) -> i64 {
    let election_ticks = election_ms / heartbeat_ms.max(1);
    let min_ms = (3 * election_ticks / 2) * heartbeat_ms;
    min_ms.div_ceil(1000) as i64
}

/// A running member.
pub struct EtcdServer {
    raft: Raft,
    proposer: Proposer,
    mvcc: Arc<Mvcc>,
    storage: Arc<Storage>,
    identity: Identity,
    name: String,
    client_urls: Vec<String>,
    limits: Limits,
    /// How auth tokens are made and checked (`--auth-token`).
    tokens: crate::token::TokenProvider,
    ids: IdGenerator,
    peers: Arc<Peers>,
    /// The members the applied log removed; this member stops once it is one.
    removals: Arc<crate::raft::Removals>,
    transfer: Arc<TransferGate>,
    reads: tokio::sync::mpsc::UnboundedSender<ReadWaiter>,
}

/// A linearizable read waiting for the next confirmation round; `local_only` when
/// this member must lead (ReadIndex asked by a follower).
struct ReadWaiter {
    local_only: bool,
    reply: tokio::sync::oneshot::Sender<Result<u64, EtcdError>>,
}

/// etcd's linearizable read loop: every read waiting when a round starts shares
/// that round's confirmation, one leadership check on the leader, or one ReadIndex
/// call to the leader on a follower. Reads that arrive during a round wait for the
/// next, so each confirmation starts after its reads arrived. Ends with the server.
async fn confirm_reads(
    server: std::sync::Weak<EtcdServer>,
    mut waiting: tokio::sync::mpsc::UnboundedReceiver<ReadWaiter>,
) {
    while let Some(first) = waiting.recv().await {
        let mut round = vec![first];
        while let Ok(next) = waiting.try_recv() {
            round.push(next);
        }
        let Some(server) = server.upgrade() else {
            return;
        };
        server.transfer.wait_open().await;
        // Err(None): this member does not lead.
        let local: Result<u64, Option<EtcdError>> = match server.raft.get_read_log_id().await {
            Ok((read_log_id, _)) => Ok(read_log_id.map_or(0, |log_id| log_id.index)),
            Err(RaftError::APIError(openraft::error::CheckIsLeaderError::ForwardToLeader(_))) => {
                Err(None)
            }
            Err(RaftError::APIError(_)) => Err(Some(EtcdError::NoLeader)),
            Err(RaftError::Fatal(_)) => Err(Some(EtcdError::Stopped)),
        };
        let forwarded = if local == Err(None) && round.iter().any(|waiter| !waiter.local_only) {
            Some(server.read_index_from_leader().await)
        } else {
            None
        };
        for waiter in round {
            let result = match (&local, waiter.local_only) {
                (Ok(index), _) => Ok(*index),
                (Err(Some(error)), _) => Err(*error),
                (Err(None), true) => Err(EtcdError::NoLeader),
                (Err(None), false) => forwarded.unwrap_or(Err(EtcdError::NoLeader)),
            };
            let _ = waiter.reply.send(result);
        }
    }
}

/// The identity of a founding member: IDs derived from the peer URLs of
/// `--initial-cluster` and the token, as etcd derives them.
pub fn new_member_identity(config: &Config) -> Result<Identity, Error> {
    let ids: Vec<u64> = initial_members(config)?.into_keys().collect();
    // This member's URLs as `--initial-cluster` names them: the advertised ones, or
    // for --discovery-srv the SRV targets, which every member derives IDs from.
    let mut peer_urls: Vec<String> = config
        .initial_cluster_members()
        .map_err(Error::Raft)?
        .into_iter()
        .filter(|(name, _)| *name == config.name)
        .map(|(_, url)| url.to_string())
        .collect();
    if peer_urls.is_empty() {
        peer_urls = config.initial_advertise_peer_urls.strings();
    }
    Ok(Identity {
        name: config.name.clone(),
        member_id: crate::ids::member_id(&peer_urls, &config.initial_cluster_token),
        cluster_id: crate::ids::cluster_id(&ids),
        peer_urls,
    })
}

/// The founding membership: every `--initial-cluster` member as a voter.
pub fn initial_members(config: &Config) -> Result<BTreeMap<u64, BasicNode>, Error> {
    let token = &config.initial_cluster_token;
    let mut urls_by_name: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (name, url) in config.initial_cluster_members().map_err(Error::Raft)? {
        urls_by_name.entry(name).or_default().push(url.to_string());
    }
    Ok(urls_by_name
        .values()
        .map(|urls| {
            let mut sorted = urls.clone();
            sorted.sort();
            (
                crate::ids::member_id(urls, token),
                BasicNode::new(sorted[0].clone()),
            )
        })
        .collect())
}

/// The identity of a member joining an existing cluster (`--initial-cluster-state
/// existing`, after `member add`): learned from the other members listed in
/// `--initial-cluster`, by matching this member's peer URLs.
async fn joining_member_identity(config: &Config) -> Result<Identity, Error> {
    let own: std::collections::BTreeSet<String> = config
        .initial_advertise_peer_urls
        .strings()
        .into_iter()
        .collect();
    let others: Vec<String> = config
        .initial_cluster_members()
        .map_err(Error::Raft)?
        .into_iter()
        .map(|(_, url)| url.to_string())
        .filter(|url| !own.contains(url))
        .collect();
    let peers = Peers::new(
        Caller {
            cluster_id: 0,
            member_id: 0,
        },
        peer_client_tls(config)?,
        None,
    );
    let mut failures = Vec::new();
    for url in &others {
        let mut client = match peers.client(url) {
            Ok(client) => client,
            Err(status) => {
                failures.push(format!("{url}: {}", status.message()));
                continue;
            }
        };
        let response = match client
            .members(PeerHeader {
                cluster_id: 0,
                from: 0,
            })
            .await
        {
            Ok(response) => response.into_inner(),
            Err(status) => {
                failures.push(format!("{url}: {}", status.message()));
                continue;
            }
        };
        for member in response.members {
            let urls: std::collections::BTreeSet<String> = member.peer_ur_ls.into_iter().collect();
            if urls == own {
                return Ok(Identity {
                    name: config.name.clone(),
                    member_id: member.id,
                    cluster_id: response.cluster_id,
                    peer_urls: own.into_iter().collect(),
                });
            }
        }
        return Err(Error::Raft(format!(
            "the cluster at {url} has no member with peer URLs {}: add it first with `etcdctl member add`",
            own.iter().cloned().collect::<Vec<_>>().join(",")
        )));
    }
    Err(Error::Raft(format!(
        "--initial-cluster-state existing: cannot reach any other member of --initial-cluster ({})",
        failures.join("; ")
    )))
}

/// The TLS client side of calls to https peers, from the peer TLS flags.
fn peer_client_tls(config: &Config) -> Result<Option<Arc<rustls::ClientConfig>>, Error> {
    let Some(files) = config.peer_tls_files().map_err(Error::Tls)? else {
        return Ok(None);
    };
    let client = crate::tls::client_config(&files, &config.tls_options()).map_err(Error::Tls)?;
    Ok(Some(Arc::new(client)))
}

fn open_data_dir(path: &Path) -> Result<(), Error> {
    let data_dir_error = |reason: String| Error::DataDir {
        path: path.display().to_string(),
        reason,
    };
    if path.exists() && !path.is_dir() {
        return Err(data_dir_error("it exists and is not a directory".into()));
    }
    crate::storage::create_private_dir(path).map_err(|e| data_dir_error(e.to_string()))?;
    // Probe writability now, so the error names the directory rather than a RocksDB file.
    let probe = path.join(".kvstore-probe");
    std::fs::write(&probe, b"").map_err(|e| data_dir_error(e.to_string()))?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

/// A runtime of its own for Raft (its core, state machine worker and the
/// proposer), on a dedicated thread: under load hundreds of client connection tasks
/// are runnable at once, and the serial commit pipeline must not queue behind them.
/// One thread: the pipeline's steps hand over to each other without waking another
/// thread (a sequential put took 0.63 ms at p50 with two workers, 0.53 ms with one);
/// snapshot disk work goes to the blocking pool. The thread lives as long as the
/// process.
fn raft_runtime() -> Result<tokio::runtime::Handle, Error> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .thread_name("raft")
        .enable_all()
        .build()
        .map_err(|e| Error::Raft(format!("cannot start the raft runtime: {e}")))?;
    let handle = runtime.handle().clone();
    std::thread::Builder::new()
        .name("raft".into())
        .spawn(move || runtime.block_on(std::future::pending::<()>()))
        .map_err(|e| Error::Raft(format!("cannot start the raft thread: {e}")))?;
    Ok(handle)
}

/// An error a peer returned, back as an etcd error when it is one.
fn status_error(status: tonic::Status) -> Error {
    match EtcdError::from_peer_status(&status) {
        Some(error) => Error::Etcd(error),
        None => Error::Raft(status.message().to_string()),
    }
}

fn is_serializable(request: &TxnRequest) -> bool {
    use crate::pb::etcdserverpb::request_op::Request as Op;
    request
        .success
        .iter()
        .chain(&request.failure)
        .all(|op| match &op.request {
            Some(Op::RequestRange(range)) => range.serializable,
            Some(Op::RequestTxn(nested)) => is_serializable(nested),
            _ => false,
        })
}

/// The Raft term, from openraft's server metrics: the term of the vote this member
/// holds (a member learns a term through a vote or a leader, both in its vote).
fn current_term(metrics: &openraft::metrics::RaftServerMetrics<u64, BasicNode>) -> u64 {
    metrics.vote.leader_id().get_term()
}

/// Keeps lease deadlines with the leader: a member that becomes leader gives every
/// lease a full TTL plus an election timeout (as etcd's lessor Promote does), one that
/// stops leading forgets them. Ends with the server. Watches the server metrics,
/// which change with the vote, state and leader only, not with every entry.
async fn follow_leadership(server: std::sync::Weak<EtcdServer>) {
    let Some(mut metrics) = server.upgrade().map(|server| server.raft.server_metrics()) else {
        return;
    };
    let mut leading_term = None;
    let mut known_leader = None;
    loop {
        let (state, term, leader) = {
            let current = metrics.borrow_and_update();
            (
                current.state,
                current_term(&current),
                current.current_leader,
            )
        };
        if leader.is_some() && leader != known_leader {
            crate::metrics::METRICS.leader_changes.inc();
            tracing::info!(leader = %format!("{:x}", leader.unwrap_or(0)), term, "leader changed");
        }
        if leader.is_some() {
            known_leader = leader;
        }
        let Some(server) = server.upgrade() else {
            return;
        };
        if state == ServerState::Leader {
            if leading_term != Some(term) {
                // Everything committed before this term must be applied first, so
                // the promotion sees every lease.
                let _ = server.raft.ensure_linearizable().await;
                server.mvcc.promote_leases(server.limits.election_timeout);
                tracing::info!(term, "became leader; lease deadlines refreshed");
                leading_term = Some(term);
            }
        } else if leading_term.take().is_some() {
            server.mvcc.expiries().demote();
            tracing::info!(term, "lost leadership");
        }
        drop(server);
        if metrics.changed().await.is_err() {
            return;
        }
    }
}

/// Publishes this member's name and client URLs through the log once a leader is
/// there, as etcd members do at start; retries until it is applied.
async fn publish_attributes(server: std::sync::Weak<EtcdServer>) {
    loop {
        let Some(strong) = server.upgrade() else {
            return;
        };
        let attributes = MemberAttributes {
            id: strong.identity.member_id,
            name: strong.name.clone(),
            client_urls: strong.client_urls.clone(),
        };
        if strong.member_attributes().get(&attributes.id) == Some(&attributes) {
            return;
        }
        let request = InternalRaftRequest {
            request: Some(Proposal::MemberAttributes(attributes)),
            auth: None,
        };
        match strong.propose(request).await {
            Ok(_) => return,
            Err(error) => tracing::debug!(%error, "publishing member attributes; will retry"),
        }
        drop(strong);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// On the leader, revokes leases whose deadline passed, through Raft. Ends with the
/// server.
async fn expire_leases(server: std::sync::Weak<EtcdServer>) {
    let mut interval = tokio::time::interval(Duration::from_millis(500));
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        let Some(server) = server.upgrade() else {
            return;
        };
        // etcd revokes at most 1,000 leases per second.
        let expired = server.mvcc.expiries().expired(500);
        let revocations = expired.into_iter().map(|id| {
            let server = server.clone();
            async move {
                match server.lease_revoke(id).await {
                    Ok(_) => tracing::info!(lease = %format!("{id:x}"), "revoked expired lease"),
                    Err(Error::Etcd(EtcdError::LeaseNotFound)) => {}
                    Err(error) => {
                        tracing::warn!(lease = %format!("{id:x}"), %error, "failed to revoke expired lease")
                    }
                }
            }
        });
        futures::future::join_all(revocations).await;
    }
}

/// Asks Raft for a snapshot (which lets it purge the log behind it) once
/// `snapshot_count` client requests were applied since the last one, as etcd's
/// `--snapshot-count` does. Ends with the server.
async fn trigger_snapshots(
    server: std::sync::Weak<EtcdServer>,
    requests_since_snapshot: Arc<std::sync::atomic::AtomicU64>,
    snapshot_count: u64,
) {
    let mut interval = tokio::time::interval(Duration::from_millis(200));
    loop {
        interval.tick().await;
        let Some(server) = server.upgrade() else {
            return;
        };
        if requests_since_snapshot.load(std::sync::atomic::Ordering::Relaxed) >= snapshot_count {
            // Reset here too, so a slow build is not asked for again at every tick.
            requests_since_snapshot.store(0, std::sync::atomic::Ordering::Relaxed);
            if server.raft.trigger().snapshot().await.is_err() {
                return;
            }
        }
    }
}

impl EtcdServer {
    /// Opens the data dir, recovers state from disk and starts Raft. A fresh data dir
    /// bootstraps a one-member cluster.
    pub async fn start(config: &Config) -> Result<Arc<EtcdServer>, Error> {
        let data_dir = config.data_dir();
        let mut discovered;
        let mut config = config;
        open_data_dir(&data_dir)?;
        let storage = Storage::open(&data_dir.join("member"))?;
        let mvcc = Mvcc::open(storage.clone())?;

        let stored_identity = storage
            .get(CF_META, meta_key::MEMBER)?
            .map(|bytes| serde_json::from_slice::<Identity>(&bytes))
            .transpose()
            .map_err(|e| Error::DataDir {
                path: data_dir.display().to_string(),
                reason: format!("member record is corrupt: {e}"),
            })?;
        let fresh = stored_identity.is_none();
        // The initial cluster of a new member may come from a discovery service or
        // from DNS SRV records, as etcd's does.
        let found = match (fresh, &config.discovery, &config.discovery_srv) {
            (true, Some(url), _) => {
                let peer_urls = config.initial_advertise_peer_urls.strings();
                // As etcd: with a discovery URL, the URL is the cluster token that
                // member and cluster IDs derive from.
                let member_id = crate::ids::member_id(&peer_urls, url);
                Some(
                    crate::discovery::join(url, member_id, &config.name, &peer_urls)
                        .await
                        .map_err(|e| e.to_string()),
                )
            }
            (true, None, Some(domain)) => Some(
                crate::srv::initial_cluster(
                    domain,
                    config.discovery_srv_name.as_deref(),
                    &config.name,
                    &config.initial_advertise_peer_urls.0,
                )
                .await,
            ),
            _ => None,
        };
        if let Some(found) = found {
            let cluster = found.map_err(Error::Bootstrap)?;
            tracing::info!(initial_cluster = %cluster, "found the initial cluster");
            discovered = config.clone();
            if let Some(url) = &config.discovery {
                discovered.initial_cluster_token = url.clone();
            }
            discovered.discovery = None;
            discovered.discovery_srv = None;
            discovered.initial_cluster = Some(cluster);
            config = &discovered;
        }
        let identity = match stored_identity {
            Some(identity) => {
                tracing::info!(member_id = %format!("{:x}", identity.member_id), "found existing member in data dir; ignoring --initial-cluster flags");
                identity
            }
            None => {
                let identity = match config.initial_cluster_state {
                    ClusterState::New => new_member_identity(config)?,
                    ClusterState::Existing => joining_member_identity(config).await?,
                };
                let mut batch = WriteBatch::default();
                batch.put_cf(
                    storage.cf(CF_META),
                    meta_key::MEMBER,
                    serde_json::to_vec(&identity).expect("identity serializes"),
                );
                storage.write(batch, true)?;
                identity
            }
        };

        let raft_config = openraft::Config {
            cluster_name: config.initial_cluster_token.clone(),
            heartbeat_interval: config.heartbeat_interval,
            // openraft waits out a leader lease (election_timeout_max) and then a
            // random election timeout after the last heartbeat, and a voter refuses
            // candidates while its own lease holds (which is what keeps a member
            // back from a partition from disrupting the cluster, as etcd's pre-vote
            // does). With these bounds a follower campaigns between 1.3 and 1.6
            // --election-timeouts after the leader's last heartbeat, so a new leader
            // comes within two of them even with openraft's tick (1.5 heartbeats)
            // and a refused first candidate.
            election_timeout_min: (config.election_timeout / 2).max(config.heartbeat_interval + 1),
            election_timeout_max: (config.election_timeout * 4 / 5)
                .max(config.heartbeat_interval + 2),
            // Snapshots follow applied client requests (see `trigger_snapshots`), not
            // log entries: one entry carries a whole batch.
            snapshot_policy: openraft::SnapshotPolicy::Never,
            // Entries carry batches of requests, so fewer are kept than etcd's 5,000.
            max_in_snapshot_log_to_keep: 1000,
            enable_tick: true,
            ..Default::default()
        }
        .validate()
        .map_err(|e| Error::Raft(e.to_string()))?;

        let log_store = LogStore::open(storage.clone());
        let state_machine =
            StateMachine::open(mvcc.clone(), data_dir.join("snap"), identity.member_id)
                .map_err(|e| Error::Raft(e.to_string()))?;
        let removals = state_machine.removals();
        let requests_since_snapshot = state_machine.requests_since_snapshot();
        let raft_runtime = raft_runtime()?;
        let member_id = identity.member_id;
        let peers = Peers::new(
            Caller {
                cluster_id: identity.cluster_id,
                member_id,
            },
            peer_client_tls(config)?,
            Some(removals.clone()),
        );
        let network = Network::new(peers.clone());
        let raft = raft_runtime
            .spawn(async move {
                Raft::new(
                    member_id,
                    Arc::new(raft_config),
                    network,
                    log_store,
                    state_machine,
                )
                .await
            })
            .await
            .map_err(|e| Error::Raft(e.to_string()))?
            .map_err(|e| Error::Raft(e.to_string()))?;

        let restored: Option<BTreeMap<u64, BasicNode>> = storage
            .get(CF_META, meta_key::BOOTSTRAP)?
            .and_then(|bytes| bincode::deserialize(&bytes).ok());
        let bootstrap =
            (fresh && config.initial_cluster_state == ClusterState::New) || restored.is_some();
        if bootstrap {
            // Every founding member initializes with the same membership; openraft
            // accepts the identical first entry from each. A restored data dir
            // carries the membership its restore was given.
            let members = match restored {
                Some(members) => {
                    let mut batch = WriteBatch::default();
                    batch.delete_cf(storage.cf(CF_META), meta_key::BOOTSTRAP);
                    storage.write(batch, true)?;
                    members
                }
                None => initial_members(config)?,
            };
            match raft.initialize(members).await {
                Ok(()) => {}
                Err(RaftError::APIError(openraft::error::InitializeError::NotAllowed(_))) => {}
                Err(e) => return Err(Error::Raft(e.to_string())),
            }
        } else {
            // A lone voter need not wait an election timeout to lead again.
            let voters: Vec<u64> = raft
                .metrics()
                .borrow()
                .membership_config
                .membership()
                .voter_ids()
                .collect();
            if voters == [identity.member_id] {
                let _ = raft.trigger().elect().await;
            }
        }

        let transfer = TransferGate::new();
        let (reads, waiting_reads) = tokio::sync::mpsc::unbounded_channel();
        let tokens =
            crate::token::TokenProvider::from_flag(&config.auth_token).map_err(Error::Bootstrap)?;
        mvcc.set_token_ttl(Duration::from_secs(config.auth_token_ttl));
        let server = Arc::new(EtcdServer {
            tokens,
            reads,
            proposer: {
                let _inside = raft_runtime.enter();
                Proposer::start(
                    raft.clone(),
                    peers.clone(),
                    transfer.clone(),
                    config.max_request_bytes as usize,
                )
            },
            peers,
            removals,
            transfer,
            raft,
            mvcc,
            storage,
            ids: IdGenerator::new(identity.member_id),
            identity,
            name: config.name.clone(),
            client_urls: config.advertise_client_urls.strings(),
            limits: Limits {
                max_request_bytes: config.max_request_bytes as usize,
                max_txn_ops: config.max_txn_ops as usize,
                quota_backend_bytes: config.quota_backend_bytes(),
                min_lease_ttl: min_lease_ttl(config.heartbeat_interval, config.election_timeout),
                election_timeout: Duration::from_millis(config.election_timeout),
                watch_progress_notify_interval: config.experimental_watch_progress_notify_interval,
                client_cert_auth: config.client_cert_auth,
                bcrypt_cost: config.bcrypt_cost,
            },
        });
        tokio::spawn(follow_leadership(Arc::downgrade(&server)));
        tokio::spawn(confirm_reads(Arc::downgrade(&server), waiting_reads));
        tokio::spawn(publish_attributes(Arc::downgrade(&server)));
        tokio::spawn(expire_leases(Arc::downgrade(&server)));
        tokio::spawn(trigger_snapshots(
            Arc::downgrade(&server),
            requests_since_snapshot,
            config.snapshot_count,
        ));
        Ok(server)
    }

    /// Waits until this member's attributes are applied (see `publish_attributes`).
    pub async fn wait_published(&self) {
        loop {
            let own = self.member_attributes().remove(&self.identity.member_id);
            if own.is_some_and(|a| a.name == self.name && a.client_urls == self.client_urls) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until Raft stops on an error (a disk read or write that failed, a panic
    /// in its core) and returns the error. Such a member serves nothing more; as
    /// etcd does, it should exit so that its supervisor restarts it from its disk.
    pub async fn raft_failed(&self) -> String {
        let mut metrics = self.raft.metrics();
        loop {
            if let Err(fatal) = &metrics.borrow_and_update().running_state {
                if !matches!(fatal, openraft::error::Fatal::Stopped) {
                    return fatal.to_string();
                }
            }
            if metrics.changed().await.is_err() {
                // Raft ended without an error: it was shut down.
                return std::future::pending().await;
            }
        }
    }

    /// Waits up to `timeout` until a leader is known.
    pub async fn wait_for_leader(&self, timeout: Duration) {
        let mut metrics = self.raft.metrics();
        let _ = tokio::time::timeout(timeout, async {
            loop {
                if metrics.borrow().current_leader.is_some() {
                    return;
                }
                if metrics.changed().await.is_err() {
                    return;
                }
            }
        })
        .await;
    }

    /// The MVCC store.
    pub fn mvcc(&self) -> &Arc<Mvcc> {
        &self.mvcc
    }

    /// The member's identity.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// Limits from the flags.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// The storage.
    pub fn storage(&self) -> &Arc<Storage> {
        &self.storage
    }

    /// A response header for `revision` (0: the current revision).
    pub fn header(&self, revision: i64) -> Option<ResponseHeader> {
        let revision = if revision == 0 {
            self.mvcc.current_revision()
        } else {
            revision
        };
        Some(ResponseHeader {
            cluster_id: self.identity.cluster_id,
            member_id: self.identity.member_id,
            revision,
            raft_term: current_term(&self.raft.server_metrics().borrow()),
        })
    }

    /// A header without a revision, as etcd sends for Cluster responses.
    pub fn membership_header(&self) -> Option<ResponseHeader> {
        Some(ResponseHeader {
            revision: 0,
            ..self.header(0).expect("header is always built")
        })
    }

    /// Fills the cluster fields of a header the apply layer produced.
    pub fn fill_header(&self, header: &mut Option<ResponseHeader>) {
        let revision = header.as_ref().map_or(0, |h| h.revision);
        *header = self.header(revision);
    }

    /// Proposes a mutation and waits until it is committed and applied.
    #[tracing::instrument(level = "debug", skip_all)]
    pub async fn propose(&self, request: InternalRaftRequest) -> Result<Response, Error> {
        self.proposer
            .propose(request)
            .await
            .map_err(|error| match error {
                ProposeError::Etcd(error) => Error::Etcd(error),
                ProposeError::Raft(message) => Error::Raft(message),
            })
    }

    /// Proposes a client request, on behalf of the user it acts for.
    async fn propose_request(&self, request: Proposal) -> Result<Response, Error> {
        self.propose_as(request, caller()?).await
    }

    async fn propose_as(
        &self,
        request: Proposal,
        auth: Option<AuthInfo>,
    ) -> Result<Response, Error> {
        let response = self
            .propose(InternalRaftRequest {
                request: Some(request),
                auth,
            })
            .await?;
        match response {
            Response::Error(number) => Err(Error::Etcd(
                EtcdError::from_number(number).unwrap_or(EtcdError::NotCapable),
            )),
            other => Ok(other),
        }
    }

    /// A Range, linearizable unless the request asks for serializable.
    pub async fn range(&self, request: &RangeRequest) -> Result<RangeResponse, Error> {
        self.check_read(&request.key, &request.range_end)?;
        if !request.serializable {
            self.linearizable_read().await?;
        }
        let view = self.mvcc.read();
        crate::mvcc::ReadView::auth(&view).check(
            caller()?.as_ref(),
            &request.key,
            &request.range_end,
            Access::Read,
        )?;
        let mut response = crate::mvcc::range(&view, request)?;
        let revision = crate::mvcc::ReadView::current_revision(&view);
        drop(view);
        response.header = self.header(revision);
        Ok(response)
    }

    /// Whether the current client may read `key`..`range_end` (checked again where
    /// the read happens; this one answers before waiting for a read index).
    pub fn check_read(&self, key: &[u8], range_end: &[u8]) -> Result<(), EtcdError> {
        self.check_read_as(caller(), key, range_end)
    }

    /// Whether `caller` (as [`caller`] returned it) may read `key`..`range_end`.
    pub fn check_read_as(
        &self,
        caller: Result<Option<AuthInfo>, EtcdError>,
        key: &[u8],
        range_end: &[u8],
    ) -> Result<(), EtcdError> {
        if !self.mvcc.auth_enabled() {
            return Ok(());
        }
        self.mvcc
            .auth()
            .check(caller?.as_ref(), key, range_end, Access::Read)
    }

    /// Whether the current client may administer the cluster (root), as etcd asks
    /// of the Cluster and Maintenance calls and auth management.
    pub fn check_admin(&self) -> Result<(), EtcdError> {
        if !self.mvcc.auth_enabled() {
            return Ok(());
        }
        self.mvcc.auth().check_admin(caller()?.as_ref())
    }

    /// Who a client request acts for: the user of its token, else (with
    /// `--client-cert-auth`) its certificate's CommonName, else nobody. With auth
    /// disabled tokens are ignored, as etcd ignores them.
    pub fn resolve_caller(
        &self,
        token: Option<&str>,
        common_name: Option<&str>,
    ) -> Result<AuthInfo, EtcdError> {
        if !self.mvcc.auth_enabled() {
            return Ok(AuthInfo::default());
        }
        let auth = self.mvcc.auth();
        let username = match (token, common_name) {
            (Some(token), _) => match &self.tokens {
                crate::token::TokenProvider::Simple => auth
                    .token_user(token, self.mvcc.token_ttl())
                    .ok_or(EtcdError::InvalidAuthToken)?,
                // A signed token carries the revision it was issued at: a token
                // older than the last auth change fails in apply.
                crate::token::TokenProvider::Jwt(jwt) => {
                    let (username, revision) =
                        jwt.verify(token).ok_or(EtcdError::InvalidAuthToken)?;
                    return Ok(AuthInfo { username, revision });
                }
            },
            (None, Some(name)) if self.limits.client_cert_auth => name.to_string(),
            (None, _) => return Ok(AuthInfo::default()),
        };
        Ok(AuthInfo {
            username,
            revision: auth.revision(),
        })
    }

    /// Proposes an auth management request for the current client, whose
    /// permission apply checks.
    pub async fn auth_change(&self, request: Proposal) -> Result<(), Error> {
        self.propose_auth(request, caller()?).await
    }

    async fn propose_auth(&self, request: Proposal, auth: Option<AuthInfo>) -> Result<(), Error> {
        match self.propose_as(request, auth).await? {
            Response::Auth(_) => Ok(()),
            other => Err(Error::Unexpected(format!("{other:?}"))),
        }
    }

    /// Checks a password and hands out a simple token valid on every member.
    pub async fn authenticate(&self, name: &str, password: &str) -> Result<String, Error> {
        self.linearizable_read().await?;
        loop {
            let (hash, revision) = {
                let auth = self.mvcc.auth();
                if !auth.enabled() {
                    return Err(EtcdError::AuthNotEnabled.into());
                }
                let user = auth.user(name).ok_or(EtcdError::AuthFailed)?;
                if user.options.is_some_and(|options| options.no_password) {
                    return Err(EtcdError::AuthFailed.into());
                }
                (
                    String::from_utf8_lossy(&user.password).into_owned(),
                    auth.revision(),
                )
            };
            let password = password.to_string();
            let matches = tokio::task::spawn_blocking(move || bcrypt::verify(password, &hash))
                .await
                .map_err(|e| Error::Raft(e.to_string()))?
                .unwrap_or(false);
            if !matches {
                tracing::info!(user = name, "authentication failed: invalid password");
                return Err(EtcdError::AuthFailed.into());
            }
            if let crate::token::TokenProvider::Jwt(jwt) = &self.tokens {
                return jwt.sign(name, revision).map_err(Error::Raft);
            }
            let token = crate::auth::new_simple_token();
            let request =
                Proposal::Authenticate(crate::pb::kvstorepb::InternalAuthenticateRequest {
                    name: name.to_string(),
                    simple_token: token.clone(),
                });
            self.propose_auth(request, None).await?;
            // The user changed while the password was checked: check again.
            if self.mvcc.auth().revision() == revision {
                return Ok(token);
            }
        }
    }

    /// Hashes a password with bcrypt at `--bcrypt-cost`, off the async threads.
    pub async fn hash_password(&self, password: String) -> Result<String, Error> {
        let cost = self.limits.bcrypt_cost;
        tokio::task::spawn_blocking(move || bcrypt::hash(password, cost))
            .await
            .map_err(|e| Error::Raft(e.to_string()))?
            .map_err(|e| Error::Raft(format!("cannot hash the password: {e}")))
    }

    /// etcd's quota: a request that would take the backend over
    /// `--quota-backend-bytes` raises the NOSPACE alarm and is refused.
    async fn check_quota(&self, cost: usize) -> Result<(), Error> {
        let quota = self.limits.quota_backend_bytes;
        if quota <= 0 {
            return Ok(());
        }
        // A size up to 50 ms old decides while the backend is well below the quota
        // (reading it takes a dozen RocksDB property lookups); near the quota the
        // size is read afresh, so the alarm comes exactly where it would.
        let margin = quota / 8;
        if self.storage.recent_size_bytes() as i64 + cost as i64 + margin <= quota
            || self.storage.size_bytes() as i64 + cost as i64 <= quota
        {
            return Ok(());
        }
        let alarm = crate::pb::etcdserverpb::AlarmRequest {
            action: crate::pb::etcdserverpb::alarm_request::AlarmAction::Activate as i32,
            member_id: self.identity.member_id,
            alarm: crate::pb::etcdserverpb::AlarmType::Nospace as i32,
        };
        if let Err(error) = self.propose_as(Proposal::Alarm(alarm), None).await {
            tracing::warn!(%error, "cannot raise the NOSPACE alarm");
        }
        Err(EtcdError::NoSpace.into())
    }

    /// Raises, clears or lists alarms through Raft.
    pub async fn alarm(
        &self,
        request: crate::pb::etcdserverpb::AlarmRequest,
    ) -> Result<crate::pb::etcdserverpb::AlarmResponse, Error> {
        proposed!(self, Proposal::Alarm(request), Response::Alarm)
    }

    /// A Put, through Raft.
    pub async fn put(&self, request: PutRequest) -> Result<PutResponse, Error> {
        self.check_quota(prost::Message::encoded_len(&request))
            .await?;
        proposed!(self, Proposal::Put(request), Response::Put)
    }

    /// A Compaction, through Raft (applied synchronously, so `physical` needs no
    /// extra wait).
    pub async fn compact(
        &self,
        request: crate::pb::etcdserverpb::CompactionRequest,
    ) -> Result<crate::pb::etcdserverpb::CompactionResponse, Error> {
        proposed!(self, Proposal::Compaction(request), Response::Compaction)
    }

    /// A DeleteRange, through Raft.
    pub async fn delete_range(
        &self,
        request: DeleteRangeRequest,
    ) -> Result<DeleteRangeResponse, Error> {
        proposed!(self, Proposal::DeleteRange(request), Response::DeleteRange)
    }

    /// A Txn: through Raft when it writes; as a read when it only reads.
    pub async fn txn(&self, request: TxnRequest) -> Result<TxnResponse, Error> {
        if crate::apply::is_read_only(&request) {
            if !is_serializable(&request) {
                self.linearizable_read().await?;
            }
            let mut view = self.mvcc.read();
            {
                use crate::mvcc::ReadView;
                view.auth()
                    .check_txn(caller()?.as_ref(), &request, view.leases())?;
            }
            let mut response = crate::apply::read_only_txn(&mut view, &request)?;
            drop(view);
            self.fill_header(&mut response.header);
            return Ok(response);
        }
        self.check_quota(prost::Message::encoded_len(&request))
            .await?;
        proposed!(self, Proposal::Txn(request), Response::Txn)
    }

    /// Grants a lease: `id` 0 lets the server choose; a TTL below the minimum is
    /// raised to it, as etcd does.
    pub async fn lease_grant(&self, id: i64, ttl: i64) -> Result<LeaseGrantResponse, Error> {
        if ttl > crate::mvcc::lease::MAX_LEASE_TTL {
            return Err(EtcdError::LeaseTtlTooLarge.into());
        }
        let mut id = id;
        while id == 0 {
            id = (self.ids.next() & (u64::MAX >> 1)) as i64;
        }
        let request = LeaseGrantRequest {
            id,
            ttl: ttl.max(self.limits.min_lease_ttl),
        };
        self.check_quota(prost::Message::encoded_len(&request))
            .await?;
        proposed!(self, Proposal::LeaseGrant(request), Response::LeaseGrant)
    }

    /// Revokes a lease and deletes its keys.
    pub async fn lease_revoke(&self, id: i64) -> Result<LeaseRevokeResponse, Error> {
        proposed!(
            self,
            Proposal::LeaseRevoke(LeaseRevokeRequest { id }),
            Response::LeaseRevoke
        )
    }

    fn expiry_error(error: ExpiryError) -> Error {
        match error {
            ExpiryError::NotFound => EtcdError::LeaseNotFound.into(),
            // Followers forward lease traffic to the leader once peers are connected;
            // until then only the leader answers.
            ExpiryError::NotPrimary => EtcdError::NoLeader.into(),
        }
    }

    /// Renews a lease on this member, which must be the leader; returns its TTL.
    pub fn lease_renew_local(&self, id: i64) -> Result<i64, Error> {
        let ttl = self
            .mvcc
            .read()
            .leases()
            .get(id)
            .map(|record| record.ttl)
            .ok_or(Error::Etcd(EtcdError::LeaseNotFound))?;
        self.mvcc
            .expiries()
            .renew(id, ttl)
            .map_err(EtcdServer::expiry_error)?;
        Ok(ttl)
    }

    /// Renews a lease where its deadline is kept (on the leader); returns its TTL.
    pub async fn lease_renew(&self, id: i64) -> Result<i64, Error> {
        match self.lease_renew_local(id) {
            Err(Error::Etcd(EtcdError::NoLeader)) => {
                let (mut leader, header) = self.leader_client()?;
                let response = leader
                    .lease_renew(LeaseRenewRequest { header, id })
                    .await
                    .map_err(status_error)?
                    .into_inner();
                if response.ttl <= 0 {
                    return Err(EtcdError::LeaseNotFound.into());
                }
                Ok(response.ttl)
            }
            other => other,
        }
    }

    /// A lease's granted and remaining TTL, and optionally its keys, from this
    /// member's deadlines (it must be the leader).
    pub fn lease_time_to_live_local(
        &self,
        id: i64,
        keys: bool,
    ) -> Result<LeaseTimeToLiveResponse, Error> {
        let view = self.mvcc.read();
        let record = view
            .leases()
            .get(id)
            .ok_or(Error::Etcd(EtcdError::LeaseNotFound))?;
        let remaining = self
            .mvcc
            .expiries()
            .remaining(id)
            .map_err(EtcdServer::expiry_error)?;
        Ok(LeaseTimeToLiveResponse {
            header: self.header(0),
            id,
            ttl: remaining.as_secs() as i64,
            granted_ttl: record.ttl,
            keys: if keys {
                record.keys.iter().cloned().collect()
            } else {
                Vec::new()
            },
        })
    }

    /// A lease's granted and remaining TTL, asked of the leader.
    pub async fn lease_time_to_live(
        &self,
        id: i64,
        keys: bool,
    ) -> Result<LeaseTimeToLiveResponse, Error> {
        match self.lease_time_to_live_local(id, keys) {
            Err(Error::Etcd(EtcdError::NoLeader)) => {
                let (mut leader, header) = self.leader_client()?;
                let mut response = leader
                    .lease_time_to_live(LeaseTimeToLiveForward {
                        header,
                        request: Some(crate::pb::etcdserverpb::LeaseTimeToLiveRequest { id, keys }),
                    })
                    .await
                    .map_err(status_error)?
                    .into_inner();
                if response.ttl < 0 {
                    return Err(EtcdError::LeaseNotFound.into());
                }
                response.header = self.header(0);
                Ok(response)
            }
            other => other,
        }
    }

    /// A client for the current leader and the header to call it with.
    fn leader_client(
        &self,
    ) -> Result<
        (
            crate::pb::kvstorepb::peer_client::PeerClient<tonic::transport::Channel>,
            Option<PeerHeader>,
        ),
        Error,
    > {
        let metrics = self.raft.metrics().borrow().clone();
        let leader = metrics
            .current_leader
            .ok_or(Error::Etcd(EtcdError::NoLeader))?;
        if leader == self.identity.member_id {
            return Err(EtcdError::NoLeader.into());
        }
        let url = metrics
            .membership_config
            .membership()
            .get_node(&leader)
            .map(|node| node.addr.clone())
            .ok_or(Error::Etcd(EtcdError::NoLeader))?;
        let client = self
            .peers
            .client(&url)
            .map_err(|_| Error::Etcd(EtcdError::NoLeader))?;
        Ok((client, self.peers.caller().header()))
    }

    /// Proposes a batch a follower forwarded; this member must lead.
    pub async fn propose_forwarded(&self, batch: RaftBatch) -> Result<RaftBatchResponse, Error> {
        self.transfer.wait_open().await;
        match self
            .raft
            .client_write(crate::raft::Request(Arc::new(batch)))
            .await
        {
            Ok(written) => Ok(written.data.0),
            Err(RaftError::APIError(openraft::error::ClientWriteError::ForwardToLeader(_))) => {
                Err(EtcdError::LeaderChanged.into())
            }
            Err(RaftError::APIError(error)) => Err(Error::Raft(error.to_string())),
            Err(RaftError::Fatal(_)) => Err(EtcdError::Stopped.into()),
        }
    }

    /// The log index a linearizable read must wait for, confirmed by a quorum; this
    /// member must lead.
    pub async fn read_index_local(&self) -> Result<u64, Error> {
        Ok(self.read_index(true).await?)
    }

    /// The log index a linearizable read must wait for, from the next confirmation
    /// round (see `confirm_reads`).
    async fn read_index(&self, local_only: bool) -> Result<u64, EtcdError> {
        let (reply, index) = tokio::sync::oneshot::channel();
        self.reads
            .send(ReadWaiter { local_only, reply })
            .map_err(|_| EtcdError::Stopped)?;
        index.await.map_err(|_| EtcdError::Stopped)?
    }

    /// The leader's read index, asked over the peer service.
    async fn read_index_from_leader(&self) -> Result<u64, EtcdError> {
        let (mut leader, header) = self.leader_client().map_err(|_| EtcdError::NoLeader)?;
        match leader.read_index(header.unwrap_or_default()).await {
            Ok(response) => Ok(response.into_inner().index),
            Err(status) => Err(match status_error(status) {
                Error::Etcd(error) => error,
                _ => EtcdError::NoLeader,
            }),
        }
    }

    /// Exports the current state as a snapshot stream file (already unlinked: the
    /// handle is all that is left of it).
    pub async fn export_snapshot(&self) -> std::io::Result<std::fs::File> {
        let storage = self.storage.clone();
        let dir = storage
            .path()
            .parent()
            .map(|data| data.join("snap"))
            .unwrap_or_else(|| storage.path().join("snap"));
        tokio::task::spawn_blocking(move || {
            std::fs::create_dir_all(&dir)?;
            let nonce = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |elapsed| elapsed.as_nanos());
            let scratch = dir.join(format!("export-{nonce}"));
            let path = dir.join(format!("export-{nonce}.stream"));
            let file = crate::raft::state_machine::export(&storage, &scratch, &path)?;
            std::fs::remove_file(&path)?;
            let mut file = file;
            std::io::Seek::seek(&mut file, std::io::SeekFrom::Start(0))?;
            Ok(file)
        })
        .await
        .map_err(std::io::Error::other)?
    }

    /// The member's identity and the cluster's members, for joining members.
    pub fn cluster_id(&self) -> u64 {
        self.identity.cluster_id
    }

    /// Every lease, soonest to expire first.
    pub fn leases(&self) -> LeaseLeasesResponse {
        let mut ids: Vec<i64> = self.mvcc.read().leases().iter().map(|(id, _)| id).collect();
        let expiries = self.mvcc.expiries();
        ids.sort_by_key(|id| (expiries.deadline(*id), *id));
        LeaseLeasesResponse {
            header: self.header(0),
            leases: ids.into_iter().map(|id| LeaseStatus { id }).collect(),
        }
    }

    /// Waits until this member has applied everything committed before the call, as
    /// confirmed by the leader (ReadIndex): after it a read sees every acknowledged
    /// write. On a follower the leader is asked for the index.
    pub async fn linearizable_read(&self) -> Result<(), Error> {
        let index = self.read_index(false).await?;
        if self
            .raft
            .metrics()
            .borrow()
            .last_applied
            .is_some_and(|applied| applied.index >= index)
        {
            return Ok(());
        }
        self.raft
            .wait(Some(Duration::from_secs(5)))
            .applied_index_at_least(Some(index), "linearizable read")
            .await
            .map_err(|_| Error::Etcd(EtcdError::Timeout))?;
        Ok(())
    }

    /// Published member attributes (name, client URLs) by member ID.
    pub fn member_attributes(&self) -> BTreeMap<u64, MemberAttributes> {
        let records = self
            .storage
            .meta_with_prefix(meta_key::MEMBER_ATTRIBUTES_PREFIX)
            .unwrap_or_default();
        records
            .into_iter()
            .filter_map(|(_, value)| {
                <MemberAttributes as prost::Message>::decode(value.as_slice()).ok()
            })
            .map(|attributes| (attributes.id, attributes))
            .collect()
    }

    /// The cluster's members as etcd lists them: a member that has not published
    /// its attributes yet has no name and no client URLs.
    pub fn members(&self) -> Vec<Member> {
        let metrics = self.raft.metrics().borrow().clone();
        let membership = metrics.membership_config.membership().clone();
        let learners: Vec<u64> = membership.learner_ids().collect();
        let mut attributes = self.member_attributes();
        attributes.insert(
            self.identity.member_id,
            MemberAttributes {
                id: self.identity.member_id,
                name: self.name.clone(),
                client_urls: self.client_urls.clone(),
            },
        );
        membership
            .nodes()
            .map(|(id, node)| {
                let published = attributes.remove(id).unwrap_or_default();
                Member {
                    id: *id,
                    name: published.name,
                    peer_ur_ls: node.addr.split(',').map(String::from).collect(),
                    client_ur_ls: published.client_urls,
                    is_learner: learners.contains(id),
                }
            })
            .collect()
    }

    /// The members the applied log removed, for the peer service and `main`.
    pub fn removals(&self) -> &crate::raft::Removals {
        &self.removals
    }

    /// The Raft handle, for the peer service and membership changes.
    pub fn raft(&self) -> &Raft {
        &self.raft
    }

    /// Holds proposals and read confirmations back while leadership is handed over.
    pub fn transfer_gate(&self) -> &TransferGate {
        &self.transfer
    }

    /// Connections to the other members.
    pub fn peers(&self) -> &Peers {
        &self.peers
    }

    /// The leader this member knows of now: none while it campaigns or once its vote
    /// is no longer a leader's (openraft keeps the last leader in `current_leader`),
    /// and, as etcd's CheckQuorum, none on a leader that has not heard from a quorum
    /// of voters within an election timeout (unless it is silent on purpose, handing
    /// leadership over).
    fn known_leader(&self, metrics: &openraft::RaftMetrics<u64, BasicNode>) -> Option<u64> {
        match metrics.state {
            ServerState::Leader if self.transfer.in_progress() => Some(metrics.id),
            ServerState::Leader => {
                let voters: Vec<u64> = metrics.membership_config.membership().voter_ids().collect();
                let heard = voters
                    .iter()
                    .filter(|id| {
                        **id == metrics.id
                            || self
                                .peers
                                .answered_within(**id, self.limits.election_timeout)
                    })
                    .count();
                (heard > voters.len() / 2).then_some(metrics.id)
            }
            ServerState::Candidate => None,
            _ if metrics.vote.is_committed() => metrics.current_leader,
            _ => None,
        }
    }

    /// Called when this member refused a candidate. If the candidate's log is shorter
    /// than this member's and the leader has been silent for an election timeout,
    /// this member campaigns at once: voters refuse the shorter log, so waiting for
    /// this member's own timer would only leave the cluster without a leader longer
    /// (and the shorter log might campaign again first). A live leader's followers
    /// never do this.
    pub fn campaign_if_longer_log(&self, candidate_log: Option<openraft::LogId<u64>>) {
        let metrics = self.raft.metrics().borrow().clone();
        if metrics.state != ServerState::Follower
            || !metrics
                .membership_config
                .membership()
                .voter_ids()
                .any(|id| id == self.identity.member_id)
            || metrics.last_log_index <= candidate_log.map(|log_id| log_id.index)
        {
            return;
        }
        let leader_silent = metrics.current_leader.is_none_or(|leader| {
            leader == self.identity.member_id
                || !self
                    .peers
                    .answered_within(leader, self.limits.election_timeout)
        });
        if !leader_silent {
            return;
        }
        tracing::info!(
            candidate_last_index = candidate_log.map_or(0, |log_id| log_id.index),
            own_last_index = metrics.last_log_index.unwrap_or(0),
            "refused a candidate with a shorter log while the leader is silent; campaigning"
        );
        let raft = self.raft.clone();
        tokio::spawn(async move {
            let _ = raft.trigger().elect().await;
        });
    }

    /// Raft status for the Status RPC: leader, last log index, term, applied index.
    pub fn raft_status(&self) -> (u64, u64, u64, u64, bool) {
        let metrics = self.raft.metrics().borrow().clone();
        (
            self.known_leader(&metrics).unwrap_or(0),
            metrics.last_log_index.unwrap_or(0),
            metrics.current_term,
            metrics.last_applied.map_or(0, |log_id| log_id.index),
            metrics.state == ServerState::Learner,
        )
    }

    /// Stops Raft, then RocksDB's background work.
    pub async fn shutdown(&self) {
        let _ = self.raft.shutdown().await;
        self.storage.quiesce();
    }
}
