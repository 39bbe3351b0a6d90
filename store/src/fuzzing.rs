//! Entry points for the fuzz targets (`fuzz/`): each takes bytes as they would come
//! from a client, a peer or the disk and runs them through the decoding and apply
//! code the server itself uses. None of them may panic, whatever the bytes.

use std::sync::Arc;

use prost::Message;

use crate::mvcc::{Mvcc, ReadView};
use crate::pb::etcdserverpb::{RangeRequest, TxnRequest};
use crate::pb::kvstorepb::RaftBatch;
use crate::pb::mvccpb::KeyValue;
use crate::storage::Storage;

/// A store in a temporary directory that fuzzed requests are applied to.
pub struct ApplyHarness {
    mvcc: Arc<Mvcc>,
    _dir: tempfile::TempDir,
}

impl ApplyHarness {
    /// A fresh, empty store.
    pub fn new() -> ApplyHarness {
        let dir = tempfile::tempdir().expect("temp dir");
        let storage = Storage::open(&dir.path().join("member")).expect("open storage");
        let mvcc = Mvcc::open(storage).expect("open store");
        ApplyHarness { mvcc, _dir: dir }
    }

    /// Decodes `bytes` as a Raft log entry's batch and applies every request in it;
    /// or, if it is no batch, as a client's Range or read-only Txn and serves it.
    pub fn run(&self, bytes: &[u8]) {
        let Some((&kind, bytes)) = bytes.split_first() else {
            return;
        };
        match kind % 3 {
            0 => {
                let Ok(batch) = RaftBatch::decode(bytes) else {
                    return;
                };
                for request in &batch.requests {
                    let mut writer = self.mvcc.write();
                    if crate::apply::apply(&mut writer, request).is_ok() {
                        let _ = writer.commit();
                    }
                }
            }
            1 => {
                if let Ok(request) = RangeRequest::decode(bytes) {
                    let view = self.mvcc.read();
                    let _ = crate::mvcc::range(&view, &request);
                }
            }
            _ => {
                if let Ok(request) = TxnRequest::decode(bytes) {
                    if crate::apply::is_read_only(&request) {
                        let mut view = self.mvcc.read();
                        let _ = view.auth().check_txn(None, &request, view.leases());
                        let _ = crate::apply::read_only_txn(&mut view, &request);
                    }
                }
            }
        }
    }
}

impl Default for ApplyHarness {
    fn default() -> Self {
        ApplyHarness::new()
    }
}

/// Decodes what kvstore reads back from its own disk: a Raft log entry, a stored
/// key-value and its revision key, auth records, and a certificate's subject.
pub fn decode_records(bytes: &[u8]) {
    let Some((&kind, bytes)) = bytes.split_first() else {
        return;
    };
    match kind % 4 {
        0 => {
            let _ = crate::raft::decode::<crate::raft::Entry>(bytes, openraft::ErrorSubject::Logs);
        }
        1 => {
            let _ = KeyValue::decode(bytes);
            let _ = crate::mvcc::revision::Revision::from_key(bytes);
        }
        2 => {
            // Records as length-prefixed key and value pairs.
            let mut records = Vec::new();
            let mut rest = bytes;
            while rest.len() >= 2 {
                let (key_len, value_len) = (usize::from(rest[0]), usize::from(rest[1]));
                rest = &rest[2..];
                if rest.len() < key_len + value_len {
                    break;
                }
                records.push((
                    rest[..key_len].to_vec(),
                    rest[key_len..key_len + value_len].to_vec(),
                ));
                rest = &rest[key_len + value_len..];
            }
            let state = crate::auth::AuthState::load(records);
            let info = crate::pb::kvstorepb::AuthInfo {
                username: "root".into(),
                revision: state.revision(),
            };
            let _ = state.check(Some(&info), b"key", b"\0", crate::auth::Access::Read);
            let _ = state.records();
        }
        _ => {
            let _ = crate::tls::common_name(bytes);
        }
    }
}

/// A store that fuzzed snapshot streams are loaded into.
pub struct SnapshotHarness {
    storage: Arc<Storage>,
    _dir: tempfile::TempDir,
}

impl SnapshotHarness {
    /// A fresh, empty store.
    pub fn new() -> SnapshotHarness {
        let dir = tempfile::tempdir().expect("temp dir");
        let storage = Storage::open(&dir.path().join("member")).expect("open storage");
        SnapshotHarness { storage, _dir: dir }
    }

    /// Reads `bytes` as a snapshot stream sent by a leader (or a snapshot file given
    /// to `kvstore snapshot restore`).
    pub fn load(&self, bytes: &[u8]) {
        let _ = crate::raft::state_machine::load_stream(
            &mut std::io::Cursor::new(bytes),
            &self.storage,
        );
    }
}

impl Default for SnapshotHarness {
    fn default() -> Self {
        SnapshotHarness::new()
    }
}
