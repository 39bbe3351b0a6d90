//! The Peer service on the peer URLs: openraft's RPCs, and what followers ask of the
//! leader. Every call must come from this member's cluster.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::error::EtcdError;
use crate::pb::etcdserverpb::LeaseTimeToLiveResponse;
use crate::pb::kvstorepb::peer_server::Peer;
use crate::pb::kvstorepb::{
    ForwardRequest, LeaseRenewRequest, LeaseRenewResponse, LeaseTimeToLiveForward, MembersResponse,
    PeerHeader, RaftBatchResponse, RaftMessage, ReadIndexResponse, TimeoutNowResponse,
};
use crate::raft::network::{check_cluster, raft_reply, raft_request};
use crate::server::{Error, EtcdServer};

/// The Peer service of one member.
pub struct PeerService {
    server: Arc<EtcdServer>,
}

impl PeerService {
    /// A Peer service over `server`.
    pub fn new(server: Arc<EtcdServer>) -> PeerService {
        PeerService { server }
    }

    /// Checks the caller's cluster; a caller of this cluster counts as connected.
    fn check(&self, header: &Option<PeerHeader>, what: &str) -> Result<u64, Status> {
        let from = check_cluster(self.server.cluster_id(), header, what)?;
        if self.server.removals().contains(from) {
            return Err(crate::raft::network::removed_refusal());
        }
        self.server.peers().answered(from);
        Ok(from)
    }
}

#[tonic::async_trait]
impl Peer for PeerService {
    async fn append_entries(
        &self,
        request: Request<RaftMessage>,
    ) -> Result<Response<RaftMessage>, Status> {
        self.check(&request.get_ref().header, "append_entries")?;
        let rpc = raft_request(&request)?;
        raft_reply(self.server.raft().append_entries(rpc).await)
    }

    async fn vote(&self, request: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        self.check(&request.get_ref().header, "vote")?;
        let rpc: openraft::raft::VoteRequest<u64> = raft_request(&request)?;
        let candidate_log = rpc.last_log_id;
        let result = self.server.raft().vote(rpc).await;
        if result.as_ref().is_ok_and(|response| !response.vote_granted) {
            self.server.campaign_if_longer_log(candidate_log);
        }
        raft_reply(result)
    }

    async fn install_snapshot(
        &self,
        request: Request<RaftMessage>,
    ) -> Result<Response<RaftMessage>, Status> {
        self.check(&request.get_ref().header, "install_snapshot")?;
        let rpc = raft_request(&request)?;
        raft_reply(self.server.raft().install_snapshot(rpc).await)
    }

    async fn propose(
        &self,
        request: Request<ForwardRequest>,
    ) -> Result<Response<RaftBatchResponse>, Status> {
        let request = request.into_inner();
        self.check(&request.header, "propose")?;
        let batch = request
            .batch
            .ok_or_else(|| Status::invalid_argument("forwarded proposal without a batch"))?;
        Ok(Response::new(self.server.propose_forwarded(batch).await?))
    }

    async fn read_index(
        &self,
        request: Request<PeerHeader>,
    ) -> Result<Response<ReadIndexResponse>, Status> {
        self.check(&Some(request.into_inner()), "read_index")?;
        let index = self.server.read_index_local().await?;
        Ok(Response::new(ReadIndexResponse { index }))
    }

    async fn lease_renew(
        &self,
        request: Request<LeaseRenewRequest>,
    ) -> Result<Response<LeaseRenewResponse>, Status> {
        let request = request.into_inner();
        self.check(&request.header, "lease_renew")?;
        let ttl = match self.server.lease_renew_local(request.id) {
            Ok(ttl) => ttl,
            Err(Error::Etcd(EtcdError::LeaseNotFound)) => 0,
            Err(error) => return Err(error.into()),
        };
        Ok(Response::new(LeaseRenewResponse { ttl }))
    }

    async fn lease_time_to_live(
        &self,
        request: Request<LeaseTimeToLiveForward>,
    ) -> Result<Response<LeaseTimeToLiveResponse>, Status> {
        let request = request.into_inner();
        self.check(&request.header, "lease_time_to_live")?;
        let inner = request.request.unwrap_or_default();
        match self.server.lease_time_to_live_local(inner.id, inner.keys) {
            Ok(response) => Ok(Response::new(response)),
            Err(Error::Etcd(EtcdError::LeaseNotFound)) => {
                Ok(Response::new(LeaseTimeToLiveResponse {
                    id: inner.id,
                    ttl: -1,
                    ..Default::default()
                }))
            }
            Err(error) => Err(error.into()),
        }
    }

    async fn members(
        &self,
        request: Request<PeerHeader>,
    ) -> Result<Response<MembersResponse>, Status> {
        let header = request.into_inner();
        // A joining member does not know its cluster yet and sends 0.
        if header.cluster_id != 0 {
            self.check(&Some(header), "members")?;
        }
        Ok(Response::new(MembersResponse {
            cluster_id: self.server.cluster_id(),
            members: self.server.members(),
        }))
    }

    async fn timeout_now(
        &self,
        request: Request<PeerHeader>,
    ) -> Result<Response<TimeoutNowResponse>, Status> {
        let from = self.check(&Some(request.into_inner()), "timeout_now")?;
        tracing::info!(from = %format!("{from:x}"), "campaigning at the leader's request");
        self.server
            .raft()
            .trigger()
            .elect()
            .await
            .map_err(|_| Status::from(EtcdError::Stopped))?;
        Ok(Response::new(TimeoutNowResponse {}))
    }
}

/// The peer service, ready to serve on the peer URLs, with the Cluster service that
/// followers pass membership changes on to.
pub fn peer_routes(server: Arc<EtcdServer>) -> tonic::service::Routes {
    tonic::service::Routes::new(
        crate::pb::kvstorepb::peer_server::PeerServer::new(PeerService::new(server.clone()))
            .max_decoding_message_size(usize::MAX)
            .max_encoding_message_size(usize::MAX),
    )
    .add_service(crate::pb::etcdserverpb::cluster_server::ClusterServer::new(
        super::cluster::ClusterService::new(server),
    ))
}
