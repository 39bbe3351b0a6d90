//! The Cluster service: membership as etcd reports and changes it. Changes are made
//! by the leader; other members pass them on to it.

use std::sync::Arc;

use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use crate::error::EtcdError;
use crate::pb::etcdserverpb::cluster_client::ClusterClient;
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

    /// The leader's Cluster service, when this member does not lead.
    async fn leader(&self) -> Result<Option<ClusterClient<Channel>>, Status> {
        if self.server.is_leader() {
            return Ok(None);
        }
        let url = self
            .server
            .leader_peer_url()
            .ok_or_else(|| Status::from(EtcdError::NoLeader))?;
        let channel = self
            .server
            .peers()
            .channel(&url)
            .map_err(|_| Status::from(EtcdError::NoLeader))?;
        Ok(Some(ClusterClient::new(channel)))
    }
}

#[tonic::async_trait]
impl Cluster for ClusterService {
    async fn member_add(
        &self,
        request: Request<MemberAddRequest>,
    ) -> Result<Response<MemberAddResponse>, Status> {
        // As etcd with auth enabled: the root role only.
        self.server.check_admin()?;
        if let Some(mut leader) = self.leader().await? {
            return leader.member_add(request.into_inner()).await;
        }
        let request = request.into_inner();
        let member = self
            .server
            .member_add(&request.peer_ur_ls, request.is_learner)
            .await?;
        Ok(Response::new(MemberAddResponse {
            header: self.server.membership_header(),
            member: Some(member),
            members: self.server.members(),
        }))
    }

    async fn member_remove(
        &self,
        request: Request<MemberRemoveRequest>,
    ) -> Result<Response<MemberRemoveResponse>, Status> {
        // As etcd with auth enabled: the root role only.
        self.server.check_admin()?;
        if let Some(mut leader) = self.leader().await? {
            return leader.member_remove(request.into_inner()).await;
        }
        self.server.member_remove(request.into_inner().id).await?;
        Ok(Response::new(MemberRemoveResponse {
            header: self.server.membership_header(),
            members: self.server.members(),
        }))
    }

    async fn member_update(
        &self,
        request: Request<MemberUpdateRequest>,
    ) -> Result<Response<MemberUpdateResponse>, Status> {
        // As etcd with auth enabled: the root role only.
        self.server.check_admin()?;
        if let Some(mut leader) = self.leader().await? {
            return leader.member_update(request.into_inner()).await;
        }
        let request = request.into_inner();
        self.server
            .member_update(request.id, &request.peer_ur_ls)
            .await?;
        Ok(Response::new(MemberUpdateResponse {
            header: self.server.membership_header(),
            members: self.server.members(),
        }))
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn member_list(
        &self,
        request: Request<MemberListRequest>,
    ) -> Result<Response<MemberListResponse>, Status> {
        // As etcd with auth enabled: the root role only.
        self.server.check_admin()?;
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
        request: Request<MemberPromoteRequest>,
    ) -> Result<Response<MemberPromoteResponse>, Status> {
        // As etcd with auth enabled: the root role only.
        self.server.check_admin()?;
        if let Some(mut leader) = self.leader().await? {
            return leader.member_promote(request.into_inner()).await;
        }
        self.server.member_promote(request.into_inner().id).await?;
        Ok(Response::new(MemberPromoteResponse {
            header: self.server.membership_header(),
            members: self.server.members(),
        }))
    }
}
