//! Raft: openraft's type configuration, the RocksDB log store, the state machine
//! adapter and the peer network. Must not import the api or server layers.

// openraft's traits fix StorageError as the error type; it is large by its design.
#![allow(clippy::result_large_err)]

pub mod log_store;
pub mod network;
pub mod state_machine;

use prost::Message;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::pb::kvstorepb::{RaftBatch, RaftBatchResponse};

openraft::declare_raft_types!(
    /// kvstore's Raft types: etcd member IDs as node IDs, protobuf payloads.
    pub TypeConfig:
        D = Request,
        R = Response,
        NodeId = u64,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = tokio::fs::File,
        AsyncRuntime = openraft::TokioRuntime,
);

/// The Raft handle.
pub type Raft = openraft::Raft<TypeConfig>;
/// A log entry.
pub type Entry = openraft::Entry<TypeConfig>;
/// A log id.
pub type LogId = openraft::LogId<u64>;
/// A storage error.
pub type StorageError = openraft::StorageError<u64>;
/// A membership as stored with the applied state.
pub type StoredMembership = openraft::StoredMembership<u64, openraft::BasicNode>;

/// What a member is told when a peer refuses it for having been removed, and what it
/// logs before it stops (etcd's words).
pub const REMOVED_MESSAGE: &str = "the member has been permanently removed from the cluster";

/// The members removed from the cluster, as the applied log says (etcd's removed
/// set). Peers refuse their Raft calls; this member stops once it is among them,
/// whether it applied its own removal, a peer refused it, or it starts on data that
/// says so.
pub struct Removals {
    own: u64,
    ids: std::sync::RwLock<std::collections::BTreeSet<u64>>,
    own_removed: tokio::sync::watch::Sender<bool>,
}

impl Removals {
    /// The removed set of member `own`, starting from `ids`.
    pub fn new(own: u64, ids: impl IntoIterator<Item = u64>) -> std::sync::Arc<Removals> {
        let ids: std::collections::BTreeSet<u64> = ids.into_iter().collect();
        let (own_removed, _) = tokio::sync::watch::channel(ids.contains(&own));
        std::sync::Arc::new(Removals {
            own,
            ids: std::sync::RwLock::new(ids),
            own_removed,
        })
    }

    /// Whether member `id` was removed.
    pub fn contains(&self, id: u64) -> bool {
        self.ids.read().expect("removals lock").contains(&id)
    }

    /// Records that `ids` were removed (applied, or found in an installed snapshot).
    pub fn record(&self, ids: impl IntoIterator<Item = u64>) {
        let mut set = self.ids.write().expect("removals lock");
        set.extend(ids);
        if set.contains(&self.own) {
            self.own_removed.send_replace(true);
        }
    }

    /// A peer refused this member as removed.
    pub fn refused_by_peer(&self, peer: u64) {
        if !self.own_removed.send_replace(true) {
            tracing::warn!(peer = %format!("{peer:x}"), "a peer refused this member: {REMOVED_MESSAGE}");
        }
    }

    /// Resolves once this member is known to be removed.
    pub async fn own_removal(&self) {
        let mut removed = self.own_removed.subscribe();
        let _ = removed.wait_for(|removed| *removed).await;
    }
}

/// A log entry's payload: a batch of client mutations, serialized as protobuf bytes.
/// Shared, because openraft clones entries between the log, replication and apply.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Request(pub std::sync::Arc<RaftBatch>);

/// What applying a batch produced, one result per mutation, as protobuf bytes.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Response(pub RaftBatchResponse);

fn serialize_message<S: Serializer, M: Message>(
    message: &M,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serde_bytes::Bytes::new(&message.encode_to_vec()).serialize(serializer)
}

fn deserialize_message<'de, D: Deserializer<'de>, M: Message + Default>(
    deserializer: D,
) -> Result<M, D::Error> {
    let bytes = serde_bytes::ByteBuf::deserialize(deserializer)?;
    M::decode(bytes.as_slice()).map_err(serde::de::Error::custom)
}

impl Serialize for Request {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serialize_message(&*self.0, serializer)
    }
}

impl<'de> Deserialize<'de> for Request {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserialize_message(deserializer).map(|batch| Request(std::sync::Arc::new(batch)))
    }
}

impl Serialize for Response {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serialize_message(&self.0, serializer)
    }
}

impl<'de> Deserialize<'de> for Response {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserialize_message(deserializer).map(Response)
    }
}

/// Encodes a value for storage (bincode of its serde form).
pub(crate) fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    bincode::serialize(value).expect("raft records are plain data and always serialize")
}

/// Decodes a stored value, reporting corruption as a storage read error.
pub(crate) fn decode<T: serde::de::DeserializeOwned>(
    bytes: &[u8],
    subject: openraft::ErrorSubject<u64>,
) -> Result<T, StorageError> {
    bincode::deserialize(bytes).map_err(|error| {
        openraft::StorageIOError::new(
            subject,
            openraft::ErrorVerb::Read,
            openraft::AnyError::new(&error),
        )
        .into()
    })
}

/// Turns a storage-layer failure into openraft's error.
pub(crate) fn io_error<E: std::error::Error + 'static>(
    subject: openraft::ErrorSubject<u64>,
    verb: openraft::ErrorVerb,
    error: &E,
) -> StorageError {
    openraft::StorageIOError::new(subject, verb, openraft::AnyError::new(error)).into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb::etcdserverpb::PutRequest;
    use crate::pb::kvstorepb::{internal_raft_request, InternalRaftRequest};

    #[test]
    fn request_survives_entry_encoding() {
        let request = Request(std::sync::Arc::new(RaftBatch {
            requests: vec![InternalRaftRequest {
                request: Some(internal_raft_request::Request::Put(PutRequest {
                    key: b"k".to_vec(),
                    value: vec![0, 1, 2, 255],
                    ..Default::default()
                })),
                auth: None,
            }],
        }));
        let entry = Entry {
            log_id: openraft::LogId::new(openraft::CommittedLeaderId::new(3, 7), 42),
            payload: openraft::EntryPayload::Normal(request.clone()),
        };
        let decoded: Entry = decode(&encode(&entry), openraft::ErrorSubject::Logs).unwrap();
        assert_eq!(decoded.log_id, entry.log_id);
        match decoded.payload {
            openraft::EntryPayload::Normal(decoded_request) => assert_eq!(decoded_request, request),
            other => panic!("unexpected payload {other:?}"),
        }
    }
}
