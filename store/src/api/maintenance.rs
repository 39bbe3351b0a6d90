//! The Maintenance service: member status, alarms, defragmentation.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use tonic::{Request, Response, Status};

use crate::pb::etcdserverpb::maintenance_server::Maintenance;
use crate::pb::etcdserverpb::{
    AlarmMember, AlarmRequest, AlarmResponse, DefragmentRequest, DefragmentResponse,
    DowngradeRequest, DowngradeResponse, HashKvRequest, HashKvResponse, HashRequest, HashResponse,
    MoveLeaderRequest, MoveLeaderResponse, SnapshotRequest, SnapshotResponse, StatusRequest,
    StatusResponse,
};
use crate::server::EtcdServer;

/// The Maintenance service of one member.
pub struct MaintenanceService {
    server: Arc<EtcdServer>,
}

impl MaintenanceService {
    /// A Maintenance service over `server`.
    pub fn new(server: Arc<EtcdServer>) -> MaintenanceService {
        MaintenanceService { server }
    }
}

fn not_yet(method: &str) -> Status {
    Status::unimplemented(format!(
        "kvstore: {method} is not supported by this version"
    ))
}

/// The root role only, when auth is enabled. etcd's Maintenance service answers
/// with the auth store's own errors (code Unknown, "auth: ..."), unlike the other
/// services; clients see exactly that.
fn admin_only(server: &EtcdServer) -> Result<(), Status> {
    use crate::error::EtcdError;
    server.check_admin().map_err(|error| {
        let raw = match error {
            EtcdError::PermissionDenied => "auth: permission denied",
            EtcdError::UserEmpty => "auth: user name is empty",
            EtcdError::UserNotFound => "auth: user not found",
            EtcdError::InvalidAuthToken => "auth: invalid auth token",
            other => return Status::from(other),
        };
        Status::unknown(raw)
    })
}

/// Bytes per Snapshot response, as etcd sends them.
const SNAPSHOT_CHUNK_BYTES: usize = 32 * 1024;

#[tonic::async_trait]
impl Maintenance for MaintenanceService {
    async fn alarm(
        &self,
        request: Request<AlarmRequest>,
    ) -> Result<Response<AlarmResponse>, Status> {
        // As etcd with auth enabled: the root role only.
        self.server.check_admin()?;
        let request = request.into_inner();
        // etcd answers Alarm without a response header.
        if request.action != crate::pb::etcdserverpb::alarm_request::AlarmAction::Get as i32 {
            let mut response = self.server.alarm(request).await?;
            response.header = None;
            return Ok(Response::new(response));
        }
        Ok(Response::new(AlarmResponse {
            header: None,
            alarms: self
                .server
                .mvcc()
                .alarms()
                .into_iter()
                .map(|(member_id, alarm)| AlarmMember { member_id, alarm })
                .collect(),
        }))
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn status(
        &self,
        _request: Request<StatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        let (leader, raft_index, raft_term, applied_index, is_learner) = self.server.raft_status();
        let storage = self.server.storage();
        Ok(Response::new(StatusResponse {
            header: self.server.header(0),
            version: crate::ETCD_API_VERSION.to_string(),
            db_size: storage.size_bytes() as i64,
            leader,
            raft_index,
            raft_term,
            raft_applied_index: applied_index,
            // As etcd: each raised alarm in protobuf text form.
            errors: self
                .server
                .mvcc()
                .alarms()
                .into_iter()
                .map(|(member, alarm)| {
                    let name = crate::pb::etcdserverpb::AlarmType::try_from(alarm)
                        .map_or_else(|_| alarm.to_string(), |a| a.as_str_name().to_string());
                    format!("memberID:{member} alarm:{name} ")
                })
                .collect(),
            db_size_in_use: storage.size_in_use_bytes() as i64,
            is_learner,
            storage_version: String::new(),
            db_size_quota: self.server.limits().quota_backend_bytes,
            downgrade_info: None,
        }))
    }

    #[tracing::instrument(level = "info", skip_all)]
    async fn defragment(
        &self,
        _request: Request<DefragmentRequest>,
    ) -> Result<Response<DefragmentResponse>, Status> {
        admin_only(&self.server)?;
        let storage = self.server.storage().clone();
        tokio::task::spawn_blocking(move || storage.defragment())
            .await
            .map_err(|e| Status::internal(format!("defragment failed: {e}")))?;
        Ok(Response::new(DefragmentResponse {
            header: self.server.header(0),
        }))
    }

    async fn hash(&self, _request: Request<HashRequest>) -> Result<Response<HashResponse>, Status> {
        admin_only(&self.server)?;
        // The whole key-value history, as HashKV at the newest revision.
        let (hash, _, _) = self.server.mvcc().hash_kv(0)?;
        Ok(Response::new(HashResponse {
            header: self.server.header(0),
            hash,
        }))
    }

    async fn hash_kv(
        &self,
        request: Request<HashKvRequest>,
    ) -> Result<Response<HashKvResponse>, Status> {
        admin_only(&self.server)?;
        let (hash, compact_revision, hash_revision) =
            self.server.mvcc().hash_kv(request.into_inner().revision)?;
        Ok(Response::new(HashKvResponse {
            header: self.server.header(0),
            hash,
            compact_revision,
            hash_revision,
        }))
    }

    type SnapshotStream = Pin<Box<dyn Stream<Item = Result<SnapshotResponse, Status>> + Send>>;

    /// The member's whole state as a stream of chunks, followed (as etcd does) by
    /// the SHA-256 of everything before it, so a restore can check the file.
    async fn snapshot(
        &self,
        _request: Request<SnapshotRequest>,
    ) -> Result<Response<Self::SnapshotStream>, Status> {
        admin_only(&self.server)?;
        let file = self
            .server
            .export_snapshot()
            .await
            .map_err(|e| Status::internal(format!("snapshot failed: {e}")))?;
        let header = self.server.header(0);
        let (sender, receiver) = tokio::sync::mpsc::channel(4);
        tokio::task::spawn_blocking(move || {
            use sha2::Digest;
            use std::io::Read;
            let mut file = file;
            let total = file.metadata().map(|m| m.len()).unwrap_or(0) + 32;
            let mut sent = 0u64;
            let mut hasher = sha2::Sha256::new();
            let mut buffer = vec![0u8; SNAPSHOT_CHUNK_BYTES];
            loop {
                let read = match file.read(&mut buffer) {
                    Ok(0) => break,
                    Ok(read) => read,
                    Err(e) => {
                        let _ = sender.blocking_send(Err(Status::internal(e.to_string())));
                        return;
                    }
                };
                hasher.update(&buffer[..read]);
                sent += read as u64;
                let chunk = SnapshotResponse {
                    header,
                    remaining_bytes: total - sent,
                    blob: buffer[..read].to_vec(),
                    ..Default::default()
                };
                if sender.blocking_send(Ok(chunk)).is_err() {
                    return;
                }
            }
            let _ = sender.blocking_send(Ok(SnapshotResponse {
                header,
                remaining_bytes: 0,
                blob: hasher.finalize().to_vec(),
                ..Default::default()
            }));
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(receiver),
        )))
    }

    async fn move_leader(
        &self,
        request: Request<MoveLeaderRequest>,
    ) -> Result<Response<MoveLeaderResponse>, Status> {
        admin_only(&self.server)?;
        self.server
            .move_leader(request.into_inner().target_id)
            .await?;
        // etcd answers with an empty response, without a header.
        Ok(Response::new(MoveLeaderResponse::default()))
    }

    async fn downgrade(
        &self,
        _request: Request<DowngradeRequest>,
    ) -> Result<Response<DowngradeResponse>, Status> {
        Err(not_yet("Downgrade"))
    }
}
