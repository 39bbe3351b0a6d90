//! The Election service (v3electionpb): etcd's election recipe run in the server.
//! Candidates put `<name>/<lease in hex>` under their lease; the key created first is
//! the leader, whose value is the proclaimed one.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::recipe::{
    self, created_at, delete_op, first_created, get, prefix_end, put_op, range_op, range_result,
    recipe_error, Withdraw,
};
use crate::mvcc::watch::{Delivery, WatchSpec};
use crate::pb::etcdserverpb::ResponseHeader;
use crate::pb::mvccpb::event::EventType;
use crate::pb::mvccpb::KeyValue;
use crate::pb::v3electionpb::election_server::Election;
use crate::pb::v3electionpb::{
    CampaignRequest, CampaignResponse, LeaderKey, LeaderRequest, LeaderResponse, ProclaimRequest,
    ProclaimResponse, ResignRequest, ResignResponse,
};
use crate::server::EtcdServer;

/// The Election service of one member.
pub struct ElectionService {
    server: Arc<EtcdServer>,
}

impl ElectionService {
    /// An Election service over `server`.
    pub fn new(server: Arc<EtcdServer>) -> ElectionService {
        ElectionService { server }
    }
}

fn missing_leader() -> Status {
    recipe_error("\"leader\" field must be provided")
}

fn election_prefix(name: &[u8]) -> Vec<u8> {
    let mut prefix = name.to_vec();
    prefix.push(b'/');
    prefix
}

/// Puts a new value on the leader key if it is still the one created at `rev`.
async fn proclaim(
    server: &EtcdServer,
    leader: &LeaderKey,
    value: &[u8],
) -> Result<Option<ResponseHeader>, Status> {
    let response = recipe::txn(
        server,
        vec![created_at(&leader.key, leader.rev)],
        vec![put_op(&leader.key, value, leader.lease)],
        Vec::new(),
    )
    .await?;
    if !response.succeeded {
        return Err(recipe_error("election: not leader"));
    }
    Ok(response.header)
}

/// Deletes the leader key if it is still the one created at `rev`.
async fn resign(server: &EtcdServer, leader: &LeaderKey) -> Result<Option<ResponseHeader>, Status> {
    let response = recipe::txn(
        server,
        vec![created_at(&leader.key, leader.rev)],
        vec![delete_op(&leader.key)],
        Vec::new(),
    )
    .await?;
    Ok(response.header)
}

type ObserveStream = Pin<Box<dyn Stream<Item = Result<LeaderResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Election for ElectionService {
    async fn campaign(
        &self,
        request: Request<CampaignRequest>,
    ) -> Result<Response<CampaignResponse>, Status> {
        let request = request.into_inner();
        let server = &self.server;
        let prefix = election_prefix(&request.name);
        let mut key = prefix.clone();
        key.extend_from_slice(format!("{:x}", request.lease).as_bytes());
        let joined = recipe::txn(
            server,
            vec![created_at(&key, 0)],
            vec![put_op(&key, &request.value, request.lease)],
            vec![range_op(get(&key))],
        )
        .await?;
        let mut leader = LeaderKey {
            name: request.name.clone(),
            key: key.clone(),
            rev: joined.header.as_ref().map_or(0, |h| h.revision),
            lease: request.lease,
        };
        if !joined.succeeded {
            let existing = range_result(&joined, 0)
                .first()
                .cloned()
                .unwrap_or_default();
            leader.rev = existing.create_revision;
            if existing.value != request.value {
                if let Err(error) = proclaim(server, &leader, &request.value).await {
                    let _ = resign(server, &leader).await;
                    return Err(error);
                }
            }
        }
        let withdraw = Withdraw::new(server.clone(), key, leader.rev);
        recipe::wait_deletes(server, &prefix, leader.rev - 1).await?;
        withdraw.disarm();
        Ok(Response::new(CampaignResponse {
            header: joined.header,
            leader: Some(leader),
        }))
    }

    async fn proclaim(
        &self,
        request: Request<ProclaimRequest>,
    ) -> Result<Response<ProclaimResponse>, Status> {
        let request = request.into_inner();
        let leader = request.leader.ok_or_else(missing_leader)?;
        let header = proclaim(&self.server, &leader, &request.value).await?;
        Ok(Response::new(ProclaimResponse { header }))
    }

    async fn leader(
        &self,
        request: Request<LeaderRequest>,
    ) -> Result<Response<LeaderResponse>, Status> {
        let prefix = election_prefix(&request.into_inner().name);
        let response = self.server.range(&first_created(&prefix)).await?;
        let Some(kv) = response.kvs.into_iter().next() else {
            return Err(recipe_error("election: no leader"));
        };
        Ok(Response::new(LeaderResponse {
            header: response.header,
            kv: Some(kv),
        }))
    }

    type ObserveStream = ObserveStream;

    async fn observe(
        &self,
        request: Request<LeaderRequest>,
    ) -> Result<Response<Self::ObserveStream>, Status> {
        let prefix = election_prefix(&request.into_inner().name);
        let (responses, outbound) = mpsc::channel(16);
        let server = self.server.clone();
        // The observer reads as the user who asked, though in a task of its own.
        crate::server::spawn_as(crate::server::caller(), async move {
            if let Err(status) = observe(&server, &prefix, &responses).await {
                let _ = responses.send(Err(status)).await;
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(outbound))))
    }

    async fn resign(
        &self,
        request: Request<ResignRequest>,
    ) -> Result<Response<ResignResponse>, Status> {
        let leader = request.into_inner().leader.ok_or_else(missing_leader)?;
        let header = resign(&self.server, &leader).await?;
        Ok(Response::new(ResignResponse { header }))
    }
}

/// Sends the current leader's value, then every value it proclaims, then the next
/// leader's, until the client goes away.
async fn observe(
    server: &Arc<EtcdServer>,
    prefix: &[u8],
    responses: &mpsc::Sender<Result<LeaderResponse, Status>>,
) -> Result<(), Status> {
    loop {
        let current = server.range(&first_created(prefix)).await?;
        let (mut header, kv): (Option<ResponseHeader>, KeyValue) =
            match current.kvs.into_iter().next() {
                Some(kv) => (current.header, kv),
                None => {
                    // Wait for the first candidate.
                    let revision = current.header.as_ref().map_or(0, |h| h.revision);
                    let mut stream = server.mvcc().watch_stream();
                    stream
                        .watch(&WatchSpec {
                            key: prefix.to_vec(),
                            range_end: prefix_end(prefix),
                            start_revision: revision,
                            no_delete: true,
                            ..Default::default()
                        })
                        .map_err(|e| Status::internal(e.to_string()))?;
                    let kv = loop {
                        let delivery = tokio::select! {
                            delivery = stream.next() => delivery,
                            _ = responses.closed() => return Ok(()),
                        };
                        match delivery {
                            Some(Delivery::Events { events, .. }) => {
                                if let Some(kv) = events.into_iter().find_map(|e| e.kv) {
                                    break kv;
                                }
                            }
                            Some(Delivery::Progress { .. }) => {}
                            Some(Delivery::Compacted { .. }) | None => return Ok(()),
                        }
                    };
                    (server.header(kv.mod_revision), kv)
                }
            };
        if responses
            .send(Ok(LeaderResponse {
                header,
                kv: Some(kv.clone()),
            }))
            .await
            .is_err()
        {
            return Ok(());
        }
        // Follow this leader's key until it is deleted.
        let from = header.as_ref().map_or(0, |h| h.revision) + 1;
        let mut stream = server.mvcc().watch_stream();
        stream
            .watch(&WatchSpec {
                key: kv.key.clone(),
                start_revision: from,
                ..Default::default()
            })
            .map_err(|e| Status::internal(e.to_string()))?;
        'follow: loop {
            tokio::select! {
                delivery = stream.next() => match delivery {
                    Some(Delivery::Events { events, revision, .. }) => {
                        for event in events {
                            if event.r#type == EventType::Delete as i32 {
                                break 'follow;
                            }
                            header = server.header(revision);
                            if responses
                                .send(Ok(LeaderResponse { header, kv: event.kv }))
                                .await
                                .is_err()
                            {
                                return Ok(());
                            }
                        }
                    }
                    Some(Delivery::Progress { .. }) => {}
                    Some(Delivery::Compacted { .. }) | None => return Ok(()),
                },
                _ = responses.closed() => return Ok(()),
            }
        }
    }
}
