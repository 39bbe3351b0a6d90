//! The Lock service (v3lockpb): etcd's mutex recipe run in the server. A lock is a
//! key `<name>/<lease in hex>` attached to the caller's lease; the key created first
//! under `<name>/` holds the lock, the others wait for every older key to go.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::recipe::{
    self, created_at, first_created, get, put_op, range_op, range_result, Withdraw,
};
use crate::pb::etcdserverpb::DeleteRangeRequest;
use crate::pb::v3lockpb::lock_server::Lock;
use crate::pb::v3lockpb::{LockRequest, LockResponse, UnlockRequest, UnlockResponse};
use crate::server::EtcdServer;

/// The Lock service of one member.
pub struct LockService {
    server: Arc<EtcdServer>,
}

impl LockService {
    /// A Lock service over `server`.
    pub fn new(server: Arc<EtcdServer>) -> LockService {
        LockService { server }
    }
}

#[tonic::async_trait]
impl Lock for LockService {
    async fn lock(&self, request: Request<LockRequest>) -> Result<Response<LockResponse>, Status> {
        let request = request.into_inner();
        let server = &self.server;
        let mut prefix = request.name;
        prefix.push(b'/');
        let mut key = prefix.clone();
        key.extend_from_slice(format!("{:x}", request.lease).as_bytes());

        // Join the line, unless this lease is in it already; learn the owner at once.
        let joined = recipe::txn(
            server,
            vec![created_at(&key, 0)],
            vec![
                put_op(&key, b"", request.lease),
                range_op(first_created(&prefix)),
            ],
            vec![range_op(get(&key)), range_op(first_created(&prefix))],
        )
        .await?;
        let revision = if joined.succeeded {
            joined.header.as_ref().map_or(0, |h| h.revision)
        } else {
            range_result(&joined, 0)
                .first()
                .map_or(0, |kv| kv.create_revision)
        };
        let owner = range_result(&joined, 1);
        if owner.is_empty() || owner[0].create_revision == revision {
            return Ok(Response::new(LockResponse {
                header: joined.header,
                key,
            }));
        }

        let withdraw = Withdraw::new(server.clone(), key.clone(), revision);
        recipe::wait_deletes(server, &prefix, revision - 1).await?;
        // The lease may have expired while waiting, taking the key with it.
        let current = server.range(&get(&key)).await?;
        if current.kvs.is_empty() {
            withdraw.disarm();
            return Err(recipe::recipe_error("mutex: session is expired"));
        }
        withdraw.disarm();
        Ok(Response::new(LockResponse {
            header: current.header,
            key,
        }))
    }

    async fn unlock(
        &self,
        request: Request<UnlockRequest>,
    ) -> Result<Response<UnlockResponse>, Status> {
        let request = request.into_inner();
        if request.key.is_empty() {
            return Err(crate::error::EtcdError::EmptyKey.into());
        }
        let response = self
            .server
            .delete_range(DeleteRangeRequest {
                key: request.key,
                ..Default::default()
            })
            .await?;
        Ok(Response::new(UnlockResponse {
            header: response.header,
        }))
    }
}
