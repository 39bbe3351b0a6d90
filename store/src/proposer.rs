//! Group commit: concurrent client mutations are gathered into one Raft entry, so one
//! log append and one fsync acknowledge many requests. openraft 0.9 flushes each
//! append before taking the next, so batching has to happen above it, here. On a
//! follower the batch goes to the leader, which proposes it as one entry.

use std::sync::Arc;

use openraft::error::{ClientWriteError, RaftError};
use prost::Message;
use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::error::EtcdError;
use crate::pb::kvstorepb::internal_raft_response::Response;
use crate::pb::kvstorepb::{ForwardRequest, InternalRaftRequest, RaftBatch, RaftBatchResponse};
use crate::raft::network::Peers;
use crate::raft::{Raft, Request};
use crate::transfer::TransferGate;

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
    /// Batches wait while `gate` holds proposals back (see [`TransferGate`]).
    pub fn start(
        raft: Raft,
        peers: Arc<Peers>,
        gate: Arc<TransferGate>,
        max_request_bytes: usize,
    ) -> Proposer {
        let (sender, receiver) = mpsc::unbounded_channel();
        tokio::spawn(run(raft, peers, gate, receiver));
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
        let metrics = &crate::metrics::METRICS;
        metrics.proposals_pending.inc();
        let outcome = result
            .await
            .map_err(|_| ProposeError::Etcd(EtcdError::Stopped));
        metrics.proposals_pending.dec();
        // A proposal fails when consensus does, not when the request was refused.
        if matches!(
            outcome,
            Err(_)
                | Ok(Err(ProposeError::Raft(_)))
                | Ok(Err(ProposeError::Etcd(
                    EtcdError::NoLeader | EtcdError::Stopped | EtcdError::LeaderChanged
                )))
        ) {
            metrics.proposals_failed.inc();
        }
        outcome?
    }
}

async fn run(
    raft: Raft,
    peers: Arc<Peers>,
    gate: Arc<TransferGate>,
    mut receiver: mpsc::UnboundedReceiver<Pending>,
) {
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
        let peers = peers.clone();
        let gate = gate.clone();
        tokio::spawn(async move {
            gate.wait_open().await;
            commit(&raft, &peers, batch).await;
            drop(permit);
        });
    }
}

/// Sends a batch to the leader, which proposes it.
async fn forward(
    peers: &Peers,
    leader_url: &str,
    batch: RaftBatch,
) -> Result<RaftBatchResponse, ProposeError> {
    let mut client = peers
        .client(leader_url)
        .map_err(|_| ProposeError::Etcd(EtcdError::NoLeader))?;
    match client
        .propose(ForwardRequest {
            header: peers.caller().header(),
            batch: Some(batch),
        })
        .await
    {
        Ok(response) => Ok(response.into_inner()),
        Err(status) => Err(match EtcdError::from_peer_status(&status) {
            Some(error) => ProposeError::Etcd(error),
            None => ProposeError::Raft(status.message().to_string()),
        }),
    }
}

async fn commit(raft: &Raft, peers: &Peers, batch: Vec<Pending>) {
    let (requests, replies): (Vec<_>, Vec<_>) =
        batch.into_iter().map(|p| (p.request, p.reply)).unzip();
    let count = requests.len();
    let batch = Arc::new(RaftBatch { requests });
    let result = match raft.client_write(Request(batch.clone())).await {
        Ok(written) => Ok(written.data.0),
        Err(RaftError::APIError(ClientWriteError::ForwardToLeader(leader))) => {
            match leader.leader_node {
                Some(node) => forward(peers, &node.addr, (*batch).clone()).await,
                None => Err(ProposeError::Etcd(EtcdError::NoLeader)),
            }
        }
        Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(e))) => {
            Err(ProposeError::Raft(e.to_string()))
        }
        Err(RaftError::Fatal(_)) => Err(ProposeError::Etcd(EtcdError::Stopped)),
    };
    match result {
        Ok(written) => {
            let responses = written.responses;
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
            for reply in replies {
                let _ = reply.send(Err(error.clone()));
            }
        }
    }
}
