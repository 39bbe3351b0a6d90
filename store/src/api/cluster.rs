//! The Cluster service: membership as etcd reports it.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::pb::etcdserverpb::cluster_server::Cluster;
use crate::pb::etcdserverpb::{
    MemberAddRequest, MemberAddResponse, MemberListRequest, MemberListResponse,
    MemberPromoteRequest, MemberPromoteResponse, MemberRemoveRequest, MemberRemoveResponse,
    MemberUpdateRequest, MemberUpdateResponse,
};
use crate::server::EtcdServer;

/// The Cluster service of one member.
pub struct ClusterService {
    server: Arc<EtcdServer>,
}

impl ClusterService {
    /// A Cluster service over `server`.
    pub fn new(server: Arc<EtcdServer>) -> ClusterService {
        ClusterService { server }
    }
}

fn membership_changes_unsupported(method: &str) -> Status {
    Status::unimplemented(format!(
        "kvstore: {method} needs the peer transport, which this version does not have (single-member clusters only)"
    ))
}

#[tonic::async_trait]
impl Cluster for ClusterService {
    async fn member_add(
        &self,
        _request: Request<MemberAddRequest>,
    ) -> Result<Response<MemberAddResponse>, Status> {
        Err(membership_changes_unsupported("MemberAdd"))
    }

    async fn member_remove(
        &self,
        _request: Request<MemberRemoveRequest>,
    ) -> Result<Response<MemberRemoveResponse>, Status> {
        Err(membership_changes_unsupported("MemberRemove"))
    }

    async fn member_update(
        &self,
        _request: Request<MemberUpdateRequest>,
    ) -> Result<Response<MemberUpdateResponse>, Status> {
        Err(membership_changes_unsupported("MemberUpdate"))
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn member_list(
        &self,
        request: Request<MemberListRequest>,
    ) -> Result<Response<MemberListResponse>, Status> {
        if request.into_inner().linearizable {
            self.server.linearizable_read().await?;
        }
        Ok(Response::new(MemberListResponse {
            header: self.server.membership_header(),
            members: self.server.members(),
        }))
    }

    async fn member_promote(
        &self,
        _request: Request<MemberPromoteRequest>,
    ) -> Result<Response<MemberPromoteResponse>, Status> {
        Err(membership_changes_unsupported("MemberPromote"))
    }
}
