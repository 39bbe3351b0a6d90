//! The Auth service: enabling authentication, users, roles and permissions, and
//! Authenticate. Changes go through Raft, where apply checks that the caller holds
//! the root role; passwords are hashed here, before proposing, so the log, the
//! snapshots and the other members never see them in clear.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::error::EtcdError;
use crate::pb::etcdserverpb::auth_server::Auth;
use crate::pb::etcdserverpb::*;
use crate::pb::kvstorepb::internal_raft_request::Request as Proposal;
use crate::server::EtcdServer;

/// The Auth service of one member.
pub struct AuthService {
    server: Arc<EtcdServer>,
}

impl AuthService {
    /// An Auth service over `server`.
    pub fn new(server: Arc<EtcdServer>) -> AuthService {
        AuthService { server }
    }

    /// Proposes a change and answers with a header.
    async fn change(&self, proposal: Proposal) -> Result<Option<ResponseHeader>, Status> {
        self.server.auth_change(proposal).await?;
        Ok(self.server.header(0))
    }

    /// A linearizable read of the auth store for the current client, who must be
    /// root unless `allowed_anyway` (a user reading itself or a role it holds).
    async fn read_allowed(
        &self,
        allowed_anyway: impl FnOnce(&str) -> bool,
    ) -> Result<Option<ResponseHeader>, Status> {
        self.server.linearizable_read().await?;
        if let Err(error) = self.server.check_admin() {
            let caller = crate::server::caller()?.unwrap_or_default();
            if !allowed_anyway(&caller.username) {
                return Err(error.into());
            }
        }
        Ok(self.server.header(0))
    }
}

#[tonic::async_trait]
impl Auth for AuthService {
    async fn auth_enable(
        &self,
        request: Request<AuthEnableRequest>,
    ) -> Result<Response<AuthEnableResponse>, Status> {
        let header = self
            .change(Proposal::AuthEnable(request.into_inner()))
            .await?;
        tracing::info!("authentication enabled");
        Ok(Response::new(AuthEnableResponse { header }))
    }

    async fn auth_disable(
        &self,
        request: Request<AuthDisableRequest>,
    ) -> Result<Response<AuthDisableResponse>, Status> {
        let header = self
            .change(Proposal::AuthDisable(request.into_inner()))
            .await?;
        tracing::info!("authentication disabled");
        Ok(Response::new(AuthDisableResponse { header }))
    }

    async fn auth_status(
        &self,
        _request: Request<AuthStatusRequest>,
    ) -> Result<Response<AuthStatusResponse>, Status> {
        self.server.linearizable_read().await?;
        let (enabled, auth_revision) = {
            let auth = self.server.mvcc().auth();
            (auth.enabled(), auth.revision())
        };
        Ok(Response::new(AuthStatusResponse {
            header: self.server.header(0),
            enabled,
            auth_revision,
        }))
    }

    async fn authenticate(
        &self,
        request: Request<AuthenticateRequest>,
    ) -> Result<Response<AuthenticateResponse>, Status> {
        let request = request.into_inner();
        let token = self
            .server
            .authenticate(&request.name, &request.password)
            .await?;
        Ok(Response::new(AuthenticateResponse {
            header: self.server.header(0),
            token,
        }))
    }

    async fn user_add(
        &self,
        request: Request<AuthUserAddRequest>,
    ) -> Result<Response<AuthUserAddResponse>, Status> {
        let mut request = request.into_inner();
        if request.name.is_empty() {
            return Err(EtcdError::UserEmpty.into());
        }
        let no_password = request.options.is_some_and(|options| options.no_password);
        let password = std::mem::take(&mut request.password);
        request.hashed_password = if no_password {
            String::new()
        } else {
            self.server.hash_password(password).await?
        };
        let header = self.change(Proposal::UserAdd(request)).await?;
        Ok(Response::new(AuthUserAddResponse { header }))
    }

    async fn user_get(
        &self,
        request: Request<AuthUserGetRequest>,
    ) -> Result<Response<AuthUserGetResponse>, Status> {
        let request = request.into_inner();
        let header = self.read_allowed(|caller| caller == request.name).await?;
        let roles = self
            .server
            .mvcc()
            .auth()
            .user(&request.name)
            .map(|user| user.roles.clone())
            .ok_or(EtcdError::UserNotFound)?;
        Ok(Response::new(AuthUserGetResponse { header, roles }))
    }

    async fn user_list(
        &self,
        _request: Request<AuthUserListRequest>,
    ) -> Result<Response<AuthUserListResponse>, Status> {
        let header = self.read_allowed(|_| false).await?;
        let users = self.server.mvcc().auth().user_names();
        Ok(Response::new(AuthUserListResponse { header, users }))
    }

    async fn user_delete(
        &self,
        request: Request<AuthUserDeleteRequest>,
    ) -> Result<Response<AuthUserDeleteResponse>, Status> {
        let header = self
            .change(Proposal::UserDelete(request.into_inner()))
            .await?;
        Ok(Response::new(AuthUserDeleteResponse { header }))
    }

    async fn user_change_password(
        &self,
        request: Request<AuthUserChangePasswordRequest>,
    ) -> Result<Response<AuthUserChangePasswordResponse>, Status> {
        let mut request = request.into_inner();
        let password = std::mem::take(&mut request.password);
        request.hashed_password = self.server.hash_password(password).await?;
        let header = self.change(Proposal::UserChangePassword(request)).await?;
        Ok(Response::new(AuthUserChangePasswordResponse { header }))
    }

    async fn user_grant_role(
        &self,
        request: Request<AuthUserGrantRoleRequest>,
    ) -> Result<Response<AuthUserGrantRoleResponse>, Status> {
        let header = self
            .change(Proposal::UserGrantRole(request.into_inner()))
            .await?;
        Ok(Response::new(AuthUserGrantRoleResponse { header }))
    }

    async fn user_revoke_role(
        &self,
        request: Request<AuthUserRevokeRoleRequest>,
    ) -> Result<Response<AuthUserRevokeRoleResponse>, Status> {
        let header = self
            .change(Proposal::UserRevokeRole(request.into_inner()))
            .await?;
        Ok(Response::new(AuthUserRevokeRoleResponse { header }))
    }

    async fn role_add(
        &self,
        request: Request<AuthRoleAddRequest>,
    ) -> Result<Response<AuthRoleAddResponse>, Status> {
        let header = self.change(Proposal::RoleAdd(request.into_inner())).await?;
        Ok(Response::new(AuthRoleAddResponse { header }))
    }

    async fn role_get(
        &self,
        request: Request<AuthRoleGetRequest>,
    ) -> Result<Response<AuthRoleGetResponse>, Status> {
        let request = request.into_inner();
        let server = &self.server;
        let header = self
            .read_allowed(|caller| server.mvcc().auth().has_role(caller, &request.role))
            .await?;
        let perm = self
            .server
            .mvcc()
            .auth()
            .role(&request.role)
            .map(|role| role.key_permission.clone())
            .ok_or(EtcdError::RoleNotFound)?;
        Ok(Response::new(AuthRoleGetResponse { header, perm }))
    }

    async fn role_list(
        &self,
        _request: Request<AuthRoleListRequest>,
    ) -> Result<Response<AuthRoleListResponse>, Status> {
        let header = self.read_allowed(|_| false).await?;
        let roles = self.server.mvcc().auth().role_names();
        Ok(Response::new(AuthRoleListResponse { header, roles }))
    }

    async fn role_delete(
        &self,
        request: Request<AuthRoleDeleteRequest>,
    ) -> Result<Response<AuthRoleDeleteResponse>, Status> {
        let header = self
            .change(Proposal::RoleDelete(request.into_inner()))
            .await?;
        Ok(Response::new(AuthRoleDeleteResponse { header }))
    }

    async fn role_grant_permission(
        &self,
        request: Request<AuthRoleGrantPermissionRequest>,
    ) -> Result<Response<AuthRoleGrantPermissionResponse>, Status> {
        let header = self
            .change(Proposal::RoleGrantPermission(request.into_inner()))
            .await?;
        Ok(Response::new(AuthRoleGrantPermissionResponse { header }))
    }

    async fn role_revoke_permission(
        &self,
        request: Request<AuthRoleRevokePermissionRequest>,
    ) -> Result<Response<AuthRoleRevokePermissionResponse>, Status> {
        let header = self
            .change(Proposal::RoleRevokePermission(request.into_inner()))
            .await?;
        Ok(Response::new(AuthRoleRevokePermissionResponse { header }))
    }
}
