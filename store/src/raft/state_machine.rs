//! The Raft state machine: applies committed entries through the apply layer into the
//! MVCC store, records the applied log id and membership in the same RocksDB batch,
//! and builds and installs snapshots of the whole key-value state.

use std::io::Cursor;
use std::sync::Arc;

use openraft::storage::{RaftStateMachine, Snapshot, SnapshotMeta};
use openraft::{
    EntryPayload, ErrorSubject, ErrorVerb, OptionalSend, RaftLogId, RaftSnapshotBuilder,
};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use super::{
    decode, encode, io_error, Entry, LogId, Response, StorageError, StoredMembership, TypeConfig,
};
use crate::mvcc::Mvcc;
use crate::pb::kvstorepb::RaftBatchResponse;
use crate::storage::{meta_key, WriteBatch, CF_KV, CF_META};

/// What a snapshot carries besides openraft's metadata: every stored MVCC record.
#[derive(Serialize, Deserialize)]
struct SnapshotPayload {
    records: Vec<(Vec<u8>, Vec<u8>)>,
    compact_revision: i64,
    current_revision: i64,
}

#[derive(Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<u64, openraft::BasicNode>,
    data: Vec<u8>,
}

/// Applied state shared between the state machine and its snapshot builders.
struct Shared {
    mvcc: Arc<Mvcc>,
    applied: Mutex<(Option<LogId>, StoredMembership)>,
    snapshot_sequence: std::sync::atomic::AtomicU64,
}

/// The state machine handed to openraft.
#[derive(Clone)]
pub struct StateMachine {
    shared: Arc<Shared>,
}

fn sm_error<E: std::error::Error + 'static>(verb: ErrorVerb, error: &E) -> StorageError {
    io_error(ErrorSubject::StateMachine, verb, error)
}

impl StateMachine {
    /// Opens the state machine over `mvcc`, reading the applied state it recorded.
    pub fn open(mvcc: Arc<Mvcc>) -> Result<StateMachine, StorageError> {
        let storage = mvcc.storage().clone();
        let read = |key: &[u8]| {
            storage
                .get(CF_META, key)
                .map_err(|e| sm_error(ErrorVerb::Read, &e))
        };
        let last_applied: Option<LogId> = match read(meta_key::LAST_APPLIED)? {
            Some(bytes) => decode(&bytes, ErrorSubject::StateMachine)?,
            None => None,
        };
        let membership: StoredMembership = match read(meta_key::MEMBERSHIP)? {
            Some(bytes) => decode(&bytes, ErrorSubject::StateMachine)?,
            None => StoredMembership::default(),
        };
        Ok(StateMachine {
            shared: Arc::new(Shared {
                mvcc,
                applied: Mutex::new((last_applied, membership)),
                snapshot_sequence: Default::default(),
            }),
        })
    }

    /// The MVCC store this state machine applies to.
    pub fn mvcc(&self) -> &Arc<Mvcc> {
        &self.shared.mvcc
    }
}

fn record_applied(
    batch: &mut WriteBatch,
    mvcc: &Mvcc,
    last_applied: &Option<LogId>,
    membership: &StoredMembership,
) {
    let cf = mvcc.storage().cf(CF_META);
    batch.put_cf(cf, meta_key::LAST_APPLIED, encode(last_applied));
    batch.put_cf(cf, meta_key::MEMBERSHIP, encode(membership));
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let mvcc = &self.shared.mvcc;
        // The read view blocks apply, so records and applied state agree.
        let (payload, last_applied, membership) = {
            let view = mvcc.read();
            let (last_applied, membership) = self.shared.applied.lock().clone();
            let storage = mvcc.storage();
            let mut records = Vec::new();
            for item in storage
                .db()
                .iterator_cf(storage.cf(CF_KV), rocksdb::IteratorMode::Start)
            {
                let (key, value) = item.map_err(|e| sm_error(ErrorVerb::Read, &e))?;
                records.push((key.to_vec(), value.to_vec()));
            }
            use crate::mvcc::ReadView;
            let payload = SnapshotPayload {
                records,
                compact_revision: view.compact_revision(),
                current_revision: view.current_revision(),
            };
            (payload, last_applied, membership)
        };
        let sequence = self
            .shared
            .snapshot_sequence
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let snapshot_id = match &last_applied {
            Some(log_id) => format!("{}-{}-{}", log_id.leader_id, log_id.index, sequence),
            None => format!("--{sequence}"),
        };
        let meta = SnapshotMeta {
            last_log_id: last_applied,
            last_membership: membership,
            snapshot_id,
        };
        let data = encode(&payload);
        let stored = StoredSnapshot {
            meta: meta.clone(),
            data: data.clone(),
        };
        let mut batch = WriteBatch::default();
        batch.put_cf(
            mvcc.storage().cf(CF_META),
            meta_key::SNAPSHOT,
            encode(&stored),
        );
        mvcc.storage().write(batch, true).map_err(|e| {
            io_error(
                ErrorSubject::Snapshot(Some(meta.signature())),
                ErrorVerb::Write,
                &e,
            )
        })?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = StateMachine;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        Ok(self.shared.applied.lock().clone())
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Response>, StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mvcc = &self.shared.mvcc;
        let mut writer = mvcc.write();
        let (mut last_applied, mut membership) = self.shared.applied.lock().clone();
        let mut responses = Vec::new();
        for entry in entries {
            last_applied = Some(*entry.get_log_id());
            let mut results = Vec::new();
            match &entry.payload {
                EntryPayload::Blank => {}
                EntryPayload::Normal(batch) => {
                    for request in &batch.0.requests {
                        let result = crate::apply::apply(&mut writer, request);
                        results.push(result.map_err(|e| sm_error(ErrorVerb::Write, &e))?);
                    }
                }
                EntryPayload::Membership(config) => {
                    membership = StoredMembership::new(last_applied, config.clone());
                }
            }
            responses.push(Response(RaftBatchResponse { responses: results }));
        }
        record_applied(writer.batch(), mvcc, &last_applied, &membership);
        writer
            .commit()
            .map_err(|e| sm_error(ErrorVerb::Write, &e))?;
        *self.shared.applied.lock() = (last_applied, membership);
        Ok(responses)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<u64, openraft::BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        let data = snapshot.into_inner();
        let payload: SnapshotPayload =
            decode(&data, ErrorSubject::Snapshot(Some(meta.signature())))?;
        let mvcc = &self.shared.mvcc;
        let storage = mvcc.storage();
        let mut batch = WriteBatch::default();
        let kv = storage.cf(CF_KV);
        // Revision keys start with a non-negative big-endian i64, so all sort below 0xff.
        batch.delete_range_cf(kv, Vec::<u8>::new(), vec![0xffu8]);
        for (key, value) in &payload.records {
            batch.put_cf(kv, key, value);
        }
        let meta_cf = storage.cf(CF_META);
        batch.put_cf(
            meta_cf,
            meta_key::COMPACT_REVISION,
            payload.compact_revision.to_be_bytes(),
        );
        batch.put_cf(
            meta_cf,
            meta_key::CURRENT_REVISION,
            payload.current_revision.to_be_bytes(),
        );
        record_applied(&mut batch, mvcc, &meta.last_log_id, &meta.last_membership);
        let stored = StoredSnapshot {
            meta: meta.clone(),
            data,
        };
        batch.put_cf(meta_cf, meta_key::SNAPSHOT, encode(&stored));
        mvcc.replace(batch)
            .map_err(|e| sm_error(ErrorVerb::Write, &e))?;
        *self.shared.applied.lock() = (meta.last_log_id, meta.last_membership.clone());
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        let storage = self.shared.mvcc.storage();
        let Some(bytes) = storage
            .get(CF_META, meta_key::SNAPSHOT)
            .map_err(|e| sm_error(ErrorVerb::Read, &e))?
        else {
            return Ok(None);
        };
        let stored: StoredSnapshot = decode(&bytes, ErrorSubject::Snapshot(None))?;
        Ok(Some(Snapshot {
            meta: stored.meta,
            snapshot: Box::new(Cursor::new(stored.data)),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::log_store::LogStore;
    use crate::storage::Storage;
    use openraft::testing::{StoreBuilder, Suite};

    struct Builder;

    impl StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for Builder {
        async fn build(&self) -> Result<(tempfile::TempDir, LogStore, StateMachine), StorageError> {
            let dir = tempfile::tempdir().expect("temp dir");
            let storage = Storage::open(dir.path()).expect("open storage");
            let mvcc = Mvcc::open(storage.clone()).expect("open mvcc");
            Ok((dir, LogStore::open(storage), StateMachine::open(mvcc)?))
        }
    }

    #[test]
    fn openraft_storage_suite() {
        Suite::test_all(Builder).unwrap();
    }
}
