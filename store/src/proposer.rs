//! Group commit: concurrent client mutations are gathered into one Raft entry, so one
//! log append and one fsync acknowledge many requests. openraft 0.9 flushes each
//! append before taking the next, so batching has to happen above it, here.

use std::sync::Arc;

use openraft::error::{ClientWriteError, RaftError};
use prost::Message;
use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::error::EtcdError;
use crate::pb::kvstorepb::internal_raft_response::Response;
use crate::pb::kvstorepb::{InternalRaftRequest, RaftBatch};
use crate::raft::{Raft, Request};

/// Most requests in one entry.
const MAX_BATCH_REQUESTS: usize = 4096;
/// Most bytes in one entry (a single request may exceed it alone).
const MAX_BATCH_BYTES: usize = 4 << 20;
/// Batches in flight at once: one being flushed while the next one is applied.
const MAX_BATCHES_IN_FLIGHT: usize = 2;

/// Why a proposal failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ProposeError {
    /// An etcd error for the client.
    #[error(transparent)]
    Etcd(#[from] EtcdError),
    /// Raft could not take the proposal.
    #[error("raft: {0}")]
    Raft(String),
}

type Reply = oneshot::Sender<Result<Response, ProposeError>>;

/// A queued proposal with its encoded size, measured once.
struct Pending {
    request: InternalRaftRequest,
    bytes: usize,
    reply: Reply,
}

/// Hands proposals to the batching task.
#[derive(Clone)]
pub struct Proposer {
    sender: mpsc::UnboundedSender<Pending>,
    max_request_bytes: usize,
}

impl Proposer {
    /// Starts the batching task for `raft`; requests over `max_request_bytes`
    /// (`--max-request-bytes`) are refused.
    pub fn start(raft: Raft, max_request_bytes: usize) -> Proposer {
        let (sender, receiver) = mpsc::unbounded_channel();
        tokio::spawn(run(raft, receiver));
        Proposer {
            sender,
            max_request_bytes,
        }
    }

    /// Proposes one mutation; resolves once it is committed and applied.
    pub async fn propose(&self, request: InternalRaftRequest) -> Result<Response, ProposeError> {
        let bytes = request.encoded_len();
        if bytes > self.max_request_bytes {
            return Err(EtcdError::RequestTooLarge.into());
        }
        let (reply, result) = oneshot::channel();
        self.sender
            .send(Pending {
                request,
                bytes,
                reply,
            })
            .map_err(|_| ProposeError::Etcd(EtcdError::Stopped))?;
        result
            .await
            .map_err(|_| ProposeError::Etcd(EtcdError::Stopped))?
    }
}

async fn run(raft: Raft, mut receiver: mpsc::UnboundedReceiver<Pending>) {
    let in_flight = Arc::new(Semaphore::new(MAX_BATCHES_IN_FLIGHT));
    loop {
        // Wait for capacity first, so requests keep gathering while batches are in flight.
        let permit = in_flight
            .clone()
            .acquire_owned()
            .await
            .expect("semaphore is never closed");
        let Some(first) = receiver.recv().await else {
            return;
        };
        let mut bytes = first.bytes;
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH_REQUESTS && bytes < MAX_BATCH_BYTES {
            match receiver.try_recv() {
                Ok(next) => {
                    bytes += next.bytes;
                    batch.push(next);
                }
                Err(_) => break,
            }
        }
        let raft = raft.clone();
        tokio::spawn(async move {
            commit(&raft, batch).await;
            drop(permit);
        });
    }
}

async fn commit(raft: &Raft, batch: Vec<Pending>) {
    let (requests, replies): (Vec<_>, Vec<_>) =
        batch.into_iter().map(|p| (p.request, p.reply)).unzip();
    let count = requests.len();
    match raft
        .client_write(Request(Arc::new(RaftBatch { requests })))
        .await
    {
        Ok(written) => {
            let responses = written.data.0.responses;
            debug_assert_eq!(responses.len(), count);
            for (reply, response) in replies.into_iter().zip(responses) {
                let result = match response.response {
                    Some(Response::Error(number)) => Err(EtcdError::from_number(number)
                        .unwrap_or(EtcdError::NotCapable)
                        .into()),
                    Some(response) => Ok(response),
                    None => Err(ProposeError::Raft(
                        "applied request produced no response".into(),
                    )),
                };
                let _ = reply.send(result);
            }
        }
        Err(error) => {
            let error = match error {
                RaftError::APIError(ClientWriteError::ForwardToLeader(forward)) => {
                    if forward.leader_id.is_some() {
                        ProposeError::Etcd(EtcdError::NotLeader)
                    } else {
                        ProposeError::Etcd(EtcdError::NoLeader)
                    }
                }
                RaftError::APIError(ClientWriteError::ChangeMembershipError(e)) => {
                    ProposeError::Raft(e.to_string())
                }
                RaftError::Fatal(_) => ProposeError::Etcd(EtcdError::Stopped),
            };
            for reply in replies {
                let _ = reply.send(Err(error.clone()));
            }
        }
    }
}
