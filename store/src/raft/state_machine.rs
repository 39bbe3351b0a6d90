//! The Raft state machine: applies committed entries through the apply layer into the
//! MVCC store, recording the applied log id and membership in the same RocksDB batch.
//!
//! Snapshots are RocksDB checkpoints (hard links, so building one costs little memory
//! or disk) taken while apply is paused. A snapshot is turned into a stream of MVCC
//! records only when a peer needs it, and installing one replaces the MVCC history.

use std::collections::HashMap;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use openraft::storage::{RaftStateMachine, Snapshot, SnapshotMeta};
use openraft::{
    EntryPayload, ErrorSubject, ErrorVerb, OptionalSend, RaftLogId, RaftSnapshotBuilder,
};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use super::{
    decode, encode, io_error, Entry, LogId, Removals, Response, StorageError, StoredMembership,
    TypeConfig,
};
use crate::mvcc::Mvcc;
use crate::pb::kvstorepb::RaftBatchResponse;
use crate::storage::{meta_key, Storage, WriteBatch, CF_KV, CF_META};

/// The data of a snapshot in transfer: a file of MVCC records.
pub type SnapshotFile = tokio::fs::File;

const SNAPSHOT_MAGIC: &[u8; 8] = b"KVSNAP01";
/// Meta records that are part of the replicated state, besides leases.
const REPLICATED_META: &[&[u8]] = &[
    meta_key::MEMBER_ATTRIBUTES_PREFIX,
    meta_key::REMOVED_MEMBER_PREFIX,
    meta_key::ALARM_PREFIX,
    meta_key::AUTH_PREFIX,
];
/// How the names of everything this module (and the Snapshot RPC's export) writes
/// in the snapshot directory begin.
const SCRATCH_PREFIXES: &[&str] = &[
    "checkpoint-",
    "building-",
    "sending-",
    "built-",
    "receiving-",
    "export-",
];
/// Records per RocksDB batch while a snapshot stream is read.
const INSTALL_BATCH_BYTES: usize = 16 << 20;

/// The snapshot that is current: its metadata and the checkpoint holding its state.
#[derive(Serialize, Deserialize)]
struct CurrentSnapshot {
    meta: SnapshotMeta<u64, openraft::BasicNode>,
    checkpoint: String,
}

/// The head of a snapshot stream, before its records.
#[derive(Serialize, Deserialize)]
struct StreamHeader {
    compact_revision: i64,
    current_revision: i64,
    /// Granted leases: (ID, TTL in seconds). Their keys are found from the values.
    leases: Vec<(i64, i64)>,
    /// Other replicated records of the meta column family (member attributes,
    /// alarms), with their full keys.
    meta: Vec<(Vec<u8>, Vec<u8>)>,
}

/// Applied state shared between the state machine and its snapshot builders.
struct Shared {
    mvcc: Arc<Mvcc>,
    applied: Mutex<(Option<LogId>, StoredMembership)>,
    removals: Arc<Removals>,
    snapshot_dir: PathBuf,
    snapshot_sequence: AtomicU64,
    /// Client requests applied since the last snapshot, for `--snapshot-count`.
    requests_since_snapshot: Arc<AtomicU64>,
    /// Checkpoints being read for a follower, with their readers: a newer snapshot
    /// removes older checkpoints only once nobody reads them. Held while a snapshot
    /// is published, too.
    readers: Mutex<HashMap<String, usize>>,
}

/// A checkpoint taken and not yet published.
struct Taken {
    building: PathBuf,
    name: String,
    meta: SnapshotMeta<u64, openraft::BasicNode>,
}

/// A checkpoint kept while it is read; the last reader of a checkpoint that is no
/// longer current removes it.
struct Reading {
    shared: Arc<Shared>,
    checkpoint: String,
}

impl Drop for Reading {
    fn drop(&mut self) {
        let mut readers = self.shared.readers.lock();
        let Some(count) = readers.get_mut(&self.checkpoint) else {
            return;
        };
        *count -= 1;
        if *count > 0 {
            return;
        }
        readers.remove(&self.checkpoint);
        let current = read_current(self.shared.mvcc.storage());
        if !matches!(current, Ok(Some(current)) if current.checkpoint == self.checkpoint) {
            let _ = std::fs::remove_dir_all(self.shared.snapshot_dir.join(&self.checkpoint));
        }
    }
}

fn read_current(storage: &Storage) -> Result<Option<CurrentSnapshot>, StorageError> {
    match storage
        .get(CF_META, meta_key::SNAPSHOT)
        .map_err(|e| snapshot_error(ErrorVerb::Read, &e))?
    {
        Some(bytes) => decode(&bytes, ErrorSubject::Snapshot(None)).map(Some),
        None => Ok(None),
    }
}

/// The state machine handed to openraft.
#[derive(Clone)]
pub struct StateMachine {
    shared: Arc<Shared>,
}

fn sm_error<E: std::error::Error + 'static>(verb: ErrorVerb, error: &E) -> StorageError {
    io_error(ErrorSubject::StateMachine, verb, error)
}

fn snapshot_error<E: std::error::Error + 'static>(verb: ErrorVerb, error: &E) -> StorageError {
    io_error(ErrorSubject::Snapshot(None), verb, error)
}

impl StateMachine {
    /// Opens the state machine of member `own` over `mvcc`, reading the applied
    /// state it recorded. Snapshot checkpoints live under `snapshot_dir`.
    pub fn open(
        mvcc: Arc<Mvcc>,
        snapshot_dir: PathBuf,
        own: u64,
    ) -> Result<StateMachine, StorageError> {
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
        let removals = Removals::new(own, removed_members(&storage)?);
        std::fs::create_dir_all(&snapshot_dir).map_err(|e| snapshot_error(ErrorVerb::Write, &e))?;
        // Only the current checkpoint outlives the process. Anything else here was
        // left by a crash: a checkpoint being built, an older one kept for a reader,
        // a stream file or an export's scratch copy.
        let current = read_current(&storage)?.map(|current| current.checkpoint);
        if let Ok(entries) = std::fs::read_dir(&snapshot_dir) {
            for entry in entries.flatten() {
                let name = entry.file_name();
                let name = name.to_string_lossy();
                let ours = SCRATCH_PREFIXES
                    .iter()
                    .any(|prefix| name.starts_with(prefix));
                if ours && current.as_deref() != Some(name.as_ref()) {
                    let _ = std::fs::remove_dir_all(entry.path())
                        .or_else(|_| std::fs::remove_file(entry.path()));
                }
            }
        }
        Ok(StateMachine {
            shared: Arc::new(Shared {
                mvcc,
                applied: Mutex::new((last_applied, membership)),
                removals,
                snapshot_dir,
                // Starts from the clock so names never repeat across restarts.
                snapshot_sequence: AtomicU64::new(
                    std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |elapsed| elapsed.as_nanos() as u64),
                ),
                requests_since_snapshot: Arc::default(),
                readers: Mutex::default(),
            }),
        })
    }

    /// The members the applied log removed.
    pub fn removals(&self) -> Arc<Removals> {
        self.shared.removals.clone()
    }

    /// The MVCC store this state machine applies to.
    pub fn mvcc(&self) -> &Arc<Mvcc> {
        &self.shared.mvcc
    }

    /// A counter of client requests applied since the last snapshot.
    pub fn requests_since_snapshot(&self) -> Arc<AtomicU64> {
        self.shared.requests_since_snapshot.clone()
    }

    /// The current snapshot, its checkpoint kept until the returned guard is dropped.
    fn pin_current(&self) -> Result<Option<(CurrentSnapshot, Reading)>, StorageError> {
        let mut readers = self.shared.readers.lock();
        let Some(current) = read_current(self.shared.mvcc.storage())? else {
            return Ok(None);
        };
        *readers.entry(current.checkpoint.clone()).or_default() += 1;
        let reading = Reading {
            shared: self.shared.clone(),
            checkpoint: current.checkpoint.clone(),
        };
        Ok(Some((current, reading)))
    }

    /// Checkpoints the current state, for [`StateMachine::publish`]. Apply goes on
    /// meanwhile: the snapshot's metadata is read back from the checkpoint itself,
    /// where the applied log id and membership were written in the same batches as
    /// the data (and atomic flush keeps them together). `installed` names the
    /// metadata of a snapshot that was just installed instead.
    fn take_checkpoint(
        &self,
        installed: Option<&SnapshotMeta<u64, openraft::BasicNode>>,
    ) -> Result<Taken, StorageError> {
        let storage = self.shared.mvcc.storage();
        let (sequence, building) = self.scratch_path("building");
        if building.exists() {
            std::fs::remove_dir_all(&building).map_err(|e| snapshot_error(ErrorVerb::Write, &e))?;
        }
        storage
            .checkpoint(&building)
            .map_err(|e| snapshot_error(ErrorVerb::Write, &e))?;
        let meta = match installed {
            Some(meta) => meta.clone(),
            None => {
                let checkpoint = Storage::open_checkpoint(&building)
                    .map_err(|e| snapshot_error(ErrorVerb::Read, &e))?;
                let read = |key: &[u8]| {
                    checkpoint
                        .get(CF_META, key)
                        .map_err(|e| snapshot_error(ErrorVerb::Read, &e))
                };
                let last_log_id: Option<LogId> = match read(meta_key::LAST_APPLIED)? {
                    Some(bytes) => decode(&bytes, ErrorSubject::Snapshot(None))?,
                    None => None,
                };
                let last_membership: StoredMembership = match read(meta_key::MEMBERSHIP)? {
                    Some(bytes) => decode(&bytes, ErrorSubject::Snapshot(None))?,
                    None => StoredMembership::default(),
                };
                let snapshot_id = match &last_log_id {
                    Some(log_id) => {
                        format!("{}-{}-{}", log_id.leader_id.term, log_id.index, sequence)
                    }
                    None => format!("0-0-{sequence}"),
                };
                SnapshotMeta {
                    last_log_id,
                    last_membership,
                    snapshot_id,
                }
            }
        };
        Ok(Taken {
            building,
            name: format!("checkpoint-{sequence}"),
            meta,
        })
    }

    /// Makes a checkpoint the current snapshot and removes older checkpoints, unless
    /// the current snapshot is newer: openraft builds snapshots while it installs
    /// one from the leader, so a build that began before an install can end after it.
    fn publish(
        &self,
        taken: Taken,
    ) -> Result<SnapshotMeta<u64, openraft::BasicNode>, StorageError> {
        let Taken {
            building,
            name,
            meta,
        } = taken;
        let storage = self.shared.mvcc.storage();
        let readers = self.shared.readers.lock();
        if let Some(current) = read_current(storage)? {
            if current.meta.last_log_id > meta.last_log_id {
                tracing::info!(
                    snapshot_id = %meta.snapshot_id,
                    current = %current.meta.snapshot_id,
                    "dropped a snapshot older than the current one"
                );
                let _ = std::fs::remove_dir_all(&building);
                return Ok(meta);
            }
        }
        std::fs::rename(&building, self.shared.snapshot_dir.join(&name))
            .map_err(|e| snapshot_error(ErrorVerb::Write, &e))?;
        let current = CurrentSnapshot {
            meta: meta.clone(),
            checkpoint: name.clone(),
        };
        let mut batch = WriteBatch::default();
        batch.put_cf(storage.cf(CF_META), meta_key::SNAPSHOT, encode(&current));
        storage
            .write(batch, true)
            .map_err(|e| snapshot_error(ErrorVerb::Write, &e))?;
        // Older checkpoints are no longer needed, unless a follower's copy is being
        // read from one: its last reader removes it.
        if let Ok(entries) = std::fs::read_dir(&self.shared.snapshot_dir) {
            for entry in entries.flatten() {
                let file_name = entry.file_name();
                let file_name = file_name.to_string_lossy();
                if file_name.starts_with("checkpoint-")
                    && file_name != name.as_str()
                    && !readers.contains_key(file_name.as_ref())
                {
                    let _ = std::fs::remove_dir_all(entry.path());
                }
            }
        }
        Ok(meta)
    }
}

/// The members the applied log removed, as `storage` recorded them.
fn removed_members(storage: &Storage) -> Result<Vec<u64>, StorageError> {
    let records = storage
        .meta_with_prefix(meta_key::REMOVED_MEMBER_PREFIX)
        .map_err(|e| sm_error(ErrorVerb::Read, &e))?;
    Ok(records
        .iter()
        .filter_map(|(id, _)| Some(u64::from_be_bytes(id.as_slice().try_into().ok()?)))
        .collect())
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

fn write_frame(writer: &mut impl Write, bytes: &[u8]) -> std::io::Result<()> {
    writer.write_all(&(bytes.len() as u32).to_be_bytes())?;
    writer.write_all(bytes)
}

/// The frame length that ends the records; padding may follow it.
const END_OF_RECORDS: u32 = u32::MAX;
/// Streams are padded to a multiple of this, so that with etcd's 32-byte SHA-256
/// trailer their size is what `etcdctl snapshot save` checks for.
const STREAM_ALIGNMENT: u64 = 512;

/// Reads one length-prefixed frame; None at the end of the records.
fn read_frame(reader: &mut impl Read) -> std::io::Result<Option<Vec<u8>>> {
    let mut length = [0u8; 4];
    match reader.read_exact(&mut length) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    if u32::from_be_bytes(length) == END_OF_RECORDS {
        return Ok(None);
    }
    // The buffer grows with the bytes that actually arrive: a corrupt or hostile
    // length must not allocate gigabytes up front (found by fuzzing).
    let length = u64::from(u32::from_be_bytes(length));
    let mut bytes = Vec::new();
    reader.take(length).read_to_end(&mut bytes)?;
    if bytes.len() as u64 != length {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "snapshot stream ends inside a record",
        ));
    }
    Ok(Some(bytes))
}

/// Reads one length-prefixed frame that must be there.
fn read_required_frame(reader: &mut impl Read) -> std::io::Result<Vec<u8>> {
    read_frame(reader)?.ok_or_else(|| std::io::Error::from(std::io::ErrorKind::UnexpectedEof))
}

/// Writes a snapshot stream: the header, then each (revision key, value) record.
fn write_stream(
    writer: &mut impl Write,
    header: &StreamHeader,
    records: impl Iterator<Item = std::io::Result<(Vec<u8>, Vec<u8>)>>,
) -> std::io::Result<()> {
    writer.write_all(SNAPSHOT_MAGIC)?;
    write_frame(writer, &encode(header))?;
    for record in records {
        let (key, value) = record?;
        write_frame(writer, &key)?;
        write_frame(writer, &value)?;
    }
    writer.write_all(&END_OF_RECORDS.to_be_bytes())
}

/// Writes the MVCC records of the checkpoint at `checkpoint` to a stream file at `path`.
fn export_checkpoint(checkpoint: &Path, path: &Path) -> std::io::Result<std::fs::File> {
    let storage = Storage::open_checkpoint(checkpoint).map_err(std::io::Error::other)?;
    let read_i64 = |key: &[u8]| -> std::io::Result<i64> {
        Ok(storage
            .get(CF_META, key)
            .map_err(std::io::Error::other)?
            .and_then(|bytes| bytes.try_into().ok().map(i64::from_be_bytes))
            .unwrap_or(0))
    };
    let header = StreamHeader {
        compact_revision: read_i64(meta_key::COMPACT_REVISION)?,
        current_revision: read_i64(meta_key::CURRENT_REVISION)?,
        leases: storage.leases().map_err(std::io::Error::other)?,
        meta: {
            let mut records = Vec::new();
            for prefix in REPLICATED_META {
                for (key, value) in storage
                    .meta_with_prefix(prefix)
                    .map_err(std::io::Error::other)?
                {
                    records.push(([*prefix, &key].concat(), value));
                }
            }
            records
        },
    };
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(path)?;
    let mut writer = BufWriter::new(file);
    let records = storage
        .scan_cf(CF_KV, rocksdb::IteratorMode::Start)
        .map(|item| {
            item.map(|(key, value)| (key.to_vec(), value.to_vec()))
                .map_err(std::io::Error::other)
        });
    write_stream(&mut writer, &header, records)?;
    let mut file = writer.into_inner().map_err(|e| e.into_error())?;
    let length = file.metadata()?.len();
    let padding = (STREAM_ALIGNMENT - length % STREAM_ALIGNMENT) % STREAM_ALIGNMENT;
    file.write_all(&vec![0u8; padding as usize])?;
    file.sync_all()?;
    Ok(file)
}

/// Reads a snapshot stream into `storage`: history records are written in bounded
/// batches as they come (not yet visible as applied); the returned batch holds the
/// rest (revisions, leases, replicated meta) for the caller to write last. Returns
/// it with the stream's current revision.
pub fn load_stream(
    reader: &mut impl Read,
    storage: &Storage,
) -> std::io::Result<(WriteBatch, i64)> {
    let invalid = |message: String| std::io::Error::new(std::io::ErrorKind::InvalidData, message);
    let mut magic = [0u8; 8];
    reader.read_exact(&mut magic)?;
    if &magic != SNAPSHOT_MAGIC {
        return Err(invalid("not a kvstore snapshot stream".into()));
    }
    let header: StreamHeader = bincode::deserialize(&read_required_frame(reader)?)
        .map_err(|e| invalid(format!("malformed snapshot header: {e}")))?;
    let records = std::iter::from_fn(|| match read_frame(reader) {
        Ok(Some(key)) => Some(read_required_frame(reader).map(|value| (key, value))),
        Ok(None) => None,
        Err(error) => Some(Err(error)),
    });
    load(storage, header, records)
}

/// Loads what an etcd snapshot holds into `storage`, as [`load_stream`] does a
/// snapshot stream.
pub fn load_etcd_snapshot(
    snapshot: crate::etcd_snapshot::EtcdSnapshot,
    storage: &Storage,
) -> std::io::Result<(WriteBatch, i64)> {
    let header = StreamHeader {
        compact_revision: snapshot.compact_revision,
        current_revision: snapshot.current_revision,
        leases: snapshot.leases,
        meta: snapshot.auth,
    };
    load(storage, header, snapshot.records.into_iter().map(Ok))
}

/// [`load_stream`] once the header is read: the history `records`, then the rest.
fn load(
    storage: &Storage,
    header: StreamHeader,
    records: impl Iterator<Item = std::io::Result<(Vec<u8>, Vec<u8>)>>,
) -> std::io::Result<(WriteBatch, i64)> {
    let invalid = |message: String| std::io::Error::new(std::io::ErrorKind::InvalidData, message);
    let kv = storage.cf(CF_KV);
    let mut batch = WriteBatch::default();
    // Revision keys start with a non-negative big-endian i64, so all sort below 0xff.
    batch.delete_range_cf(kv, Vec::<u8>::new(), vec![0xffu8]);
    let mut batch_bytes = 0;
    for record in records {
        let (key, value) = record?;
        if crate::mvcc::Revision::from_key(&key).is_none() {
            return Err(invalid(format!(
                "malformed revision key {key:?} in snapshot"
            )));
        }
        batch_bytes += key.len() + value.len();
        batch.put_cf(kv, key, value);
        if batch_bytes > INSTALL_BATCH_BYTES {
            storage
                .write(std::mem::take(&mut batch), false)
                .map_err(std::io::Error::other)?;
            batch_bytes = 0;
        }
    }
    let meta_cf = storage.cf(CF_META);
    for prefix in [meta_key::LEASE_PREFIX].iter().chain(REPLICATED_META) {
        batch.delete_range_cf(meta_cf, *prefix, Storage::prefix_end(prefix).as_slice());
    }
    for (id, ttl) in &header.leases {
        batch.put_cf(meta_cf, meta_key::lease(*id), ttl.to_be_bytes());
    }
    for (key, value) in &header.meta {
        batch.put_cf(meta_cf, key, value);
    }
    batch.put_cf(
        meta_cf,
        meta_key::COMPACT_REVISION,
        header.compact_revision.to_be_bytes(),
    );
    batch.put_cf(
        meta_cf,
        meta_key::CURRENT_REVISION,
        header.current_revision.to_be_bytes(),
    );
    Ok((batch, header.current_revision))
}

/// Writes the current state of `storage` as a snapshot stream file at `path`, through
/// a checkpoint in `scratch` (removed afterwards). For the Snapshot RPC.
pub fn export(storage: &Storage, scratch: &Path, path: &Path) -> std::io::Result<std::fs::File> {
    if scratch.exists() {
        std::fs::remove_dir_all(scratch)?;
    }
    storage.checkpoint(scratch).map_err(std::io::Error::other)?;
    let result = export_checkpoint(scratch, path);
    let _ = std::fs::remove_dir_all(scratch);
    result
}

/// Runs disk work of snapshots (checkpoints, stream files) on tokio's blocking pool:
/// Raft's runtime is a single thread, which must go on with heartbeats and
/// appends meanwhile.
async fn off_raft_thread<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, StorageError> + Send + 'static,
) -> Result<T, StorageError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| snapshot_error(ErrorVerb::Write, &std::io::Error::other(e)))?
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    /// Takes a checkpoint of the state. openraft 0.9 keeps only the meta of a built
    /// snapshot (its state machine worker drops the data, and a follower's copy comes
    /// from [`RaftStateMachine::get_current_snapshot`]), so the checkpoint is not
    /// exported here: writing the whole store into a stream file every
    /// `--snapshot-count` requests doubled the write latency tail for nothing.
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        self.shared
            .requests_since_snapshot
            .store(0, Ordering::Relaxed);
        let this = self.clone();
        let (meta, empty) = off_raft_thread(move || {
            let meta = this.publish(this.take_checkpoint(None)?)?;
            Ok((meta, this.unlinked_file("built")?))
        })
        .await?;
        tracing::info!(snapshot_id = %meta.snapshot_id, "built snapshot");
        Ok(Snapshot {
            meta,
            snapshot: Box::new(tokio::fs::File::from_std(empty)),
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
        let apply_started = std::time::Instant::now();
        let mut writer = mvcc.write();
        let (mut last_applied, mut membership) = self.shared.applied.lock().clone();
        let mut responses = Vec::new();
        let mut requests = 0;
        let mut removed = Vec::new();
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
                    requests += batch.0.requests.len() as u64;
                }
                EntryPayload::Membership(config) => {
                    let gone = membership
                        .membership()
                        .nodes()
                        .map(|(id, _)| *id)
                        .filter(|id| config.get_node(id).is_none());
                    for id in gone {
                        let cf = mvcc.storage().cf(CF_META);
                        writer.batch().put_cf(cf, meta_key::removed_member(id), []);
                        removed.push(id);
                    }
                    membership = StoredMembership::new(last_applied, config.clone());
                }
            }
            responses.push(Response(RaftBatchResponse { responses: results }));
        }
        record_applied(writer.batch(), mvcc, &last_applied, &membership);
        let started = std::time::Instant::now();
        writer
            .commit()
            .map_err(|e| sm_error(ErrorVerb::Write, &e))?;
        crate::metrics::METRICS
            .backend_commit
            .observe(started.elapsed().as_secs_f64());
        let took = apply_started.elapsed();
        if took > std::time::Duration::from_millis(100) {
            tracing::warn!(took = ?took, requests, "apply request took too long");
        }
        *self.shared.applied.lock() = (last_applied, membership);
        self.shared.removals.record(removed);
        self.shared
            .requests_since_snapshot
            .fetch_add(requests, Ordering::Relaxed);
        Ok(responses)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<SnapshotFile>, StorageError> {
        let file = self.unlinked_file("receiving")?;
        Ok(Box::new(tokio::fs::File::from_std(file)))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<u64, openraft::BasicNode>,
        snapshot: Box<SnapshotFile>,
    ) -> Result<(), StorageError> {
        let file = snapshot.into_std().await;
        let this = self.clone();
        let meta = meta.clone();
        off_raft_thread(move || this.install(&meta, file)).await
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        let this = self.clone();
        off_raft_thread(move || this.current_snapshot()).await
    }
}

impl StateMachine {
    /// A name in the snapshot directory no other call gets, with its sequence number.
    fn scratch_path(&self, purpose: &str) -> (u64, PathBuf) {
        let sequence = self
            .shared
            .snapshot_sequence
            .fetch_add(1, Ordering::Relaxed);
        let path = self
            .shared
            .snapshot_dir
            .join(format!("{purpose}-{sequence}"));
        (sequence, path)
    }

    /// A new empty file in the snapshot directory, unlinked at once: the open handle
    /// keeps its data until it is dropped.
    fn unlinked_file(&self, purpose: &str) -> Result<std::fs::File, StorageError> {
        let (_, path) = self.scratch_path(purpose);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| snapshot_error(ErrorVerb::Write, &e))?;
        let _ = std::fs::remove_file(&path);
        Ok(file)
    }

    /// Replaces the state with a snapshot stream from the leader.
    fn install(
        &self,
        meta: &SnapshotMeta<u64, openraft::BasicNode>,
        mut file: std::fs::File,
    ) -> Result<(), StorageError> {
        let signature = || ErrorSubject::Snapshot(Some(meta.signature()));
        use std::io::Seek;
        file.seek(std::io::SeekFrom::Start(0))
            .map_err(|e| io_error(signature(), ErrorVerb::Read, &e))?;
        let mvcc = &self.shared.mvcc;
        let (mut batch, current_revision) = load_stream(&mut BufReader::new(file), mvcc.storage())
            .map_err(|e| io_error(signature(), ErrorVerb::Read, &e))?;
        record_applied(&mut batch, mvcc, &meta.last_log_id, &meta.last_membership);
        mvcc.replace(batch)
            .map_err(|e| sm_error(ErrorVerb::Write, &e))?;
        *self.shared.applied.lock() = (meta.last_log_id, meta.last_membership.clone());
        self.shared
            .removals
            .record(removed_members(mvcc.storage())?);
        tracing::info!(snapshot_id = %meta.snapshot_id, revision = current_revision, "installed snapshot from the leader");
        self.publish(self.take_checkpoint(Some(meta))?).map(|_| ())
    }

    /// The newest snapshot as a stream file, for a follower that needs it.
    fn current_snapshot(&self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        let Some((current, _reading)) = self.pin_current()? else {
            return Ok(None);
        };
        let checkpoint = self.shared.snapshot_dir.join(&current.checkpoint);
        let (_, stream_path) = self.scratch_path("sending");
        let signature = ErrorSubject::Snapshot(Some(current.meta.signature()));
        let mut file = export_checkpoint(&checkpoint, &stream_path)
            .map_err(|e| io_error(signature.clone(), ErrorVerb::Read, &e))?;
        let _ = std::fs::remove_file(&stream_path);
        use std::io::Seek;
        file.seek(std::io::SeekFrom::Start(0))
            .map_err(|e| io_error(signature, ErrorVerb::Read, &e))?;
        Ok(Some(Snapshot {
            meta: current.meta,
            snapshot: Box::new(tokio::fs::File::from_std(file)),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::log_store::LogStore;
    use openraft::testing::{StoreBuilder, Suite};

    /// Builds stores whose log writes appends up to `.0` bytes on the calling thread
    /// (`None`: the default limit).
    struct Builder(Option<usize>);

    impl StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for Builder {
        async fn build(&self) -> Result<(tempfile::TempDir, LogStore, StateMachine), StorageError> {
            let dir = tempfile::tempdir().expect("temp dir");
            let storage = Storage::open(&dir.path().join("member")).expect("open storage");
            let mvcc = Mvcc::open(storage.clone()).expect("open mvcc");
            let state_machine = StateMachine::open(mvcc, dir.path().join("snap"), 1)?;
            let log = match self.0 {
                Some(limit) => LogStore::with_inline_limit(storage, limit),
                None => LogStore::open(storage),
            };
            Ok((dir, log, state_machine))
        }
    }

    /// Found by the snapshot_stream fuzz target: a record length of 3.7 GB in a
    /// 20-byte stream allocated it all before reading.
    #[test]
    fn a_huge_record_length_is_an_error_not_an_allocation() {
        let dir = tempfile::tempdir().expect("temp dir");
        let storage = Storage::open(&dir.path().join("member")).expect("open storage");
        let mut stream = SNAPSHOT_MAGIC.to_vec();
        stream.extend([0xdf; 12]);
        match load_stream(&mut std::io::Cursor::new(stream), &storage) {
            Err(error) => assert_eq!(error.kind(), std::io::ErrorKind::UnexpectedEof),
            Ok(_) => panic!("a truncated stream loaded"),
        }
    }

    #[test]
    fn openraft_storage_suite() {
        Suite::test_all(Builder(None)).unwrap();
    }

    /// The log's two ways to write an append, each alone: all on the writer thread,
    /// all on the calling thread.
    #[test]
    fn openraft_storage_suite_with_each_append_path() {
        Suite::test_all(Builder(Some(0))).unwrap();
        Suite::test_all(Builder(Some(usize::MAX))).unwrap();
    }

    fn put_entry(index: u64, key: &str, value: &str) -> Entry {
        use crate::pb::etcdserverpb::PutRequest;
        use crate::pb::kvstorepb::{internal_raft_request, InternalRaftRequest, RaftBatch};
        Entry {
            log_id: openraft::LogId::new(openraft::CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Normal(super::super::Request(Arc::new(RaftBatch {
                requests: vec![InternalRaftRequest {
                    request: Some(internal_raft_request::Request::Put(PutRequest {
                        key: key.into(),
                        value: value.into(),
                        ..Default::default()
                    })),
                    auth: None,
                }],
            }))),
        }
    }

    fn request_entry(
        index: u64,
        request: crate::pb::kvstorepb::internal_raft_request::Request,
    ) -> Entry {
        use crate::pb::kvstorepb::{InternalRaftRequest, RaftBatch};
        Entry {
            log_id: openraft::LogId::new(openraft::CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Normal(super::super::Request(Arc::new(RaftBatch {
                requests: vec![InternalRaftRequest {
                    request: Some(request),
                    auth: None,
                }],
            }))),
        }
    }

    /// Found by CI: a follower's copy was exported from a checkpoint while a newer
    /// snapshot was built, which removed the checkpoint under the reader; the failed
    /// read stopped the leader ("etcdserver: server stopped").
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_snapshot_being_sent_survives_newer_snapshots() {
        let (dir, _, mut state_machine) = Builder(None).build().await.unwrap();
        let entries: Vec<Entry> = (1..=2000)
            .map(|index| put_entry(index, &format!("key-{index}"), "value"))
            .collect();
        state_machine.apply(entries).await.unwrap();
        state_machine
            .get_snapshot_builder()
            .await
            .build_snapshot()
            .await
            .unwrap();
        let mut builder = state_machine.get_snapshot_builder().await;
        let building = tokio::spawn(async move {
            for _ in 0..100 {
                builder.build_snapshot().await.unwrap();
            }
        });
        let mut sent = 0;
        while !building.is_finished() {
            let current = state_machine.get_current_snapshot().await;
            assert!(current.unwrap().is_some());
            sent += 1;
        }
        building.await.unwrap();
        assert!(sent > 1, "only {sent} snapshots were read");
        // Only the current checkpoint is left once nobody reads the others.
        let snap = dir.path().join("snap");
        let checkpoints = || -> Vec<String> {
            std::fs::read_dir(&snap)
                .unwrap()
                .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
                .filter(|name| name.starts_with("checkpoint-"))
                .collect()
        };
        let current = checkpoints();
        assert_eq!(current.len(), 1);
        // One kept for a reader when the process ended goes at the next start, with
        // the other leftovers of a crash.
        std::fs::create_dir(snap.join("checkpoint-1")).unwrap();
        std::fs::create_dir(snap.join("export-2")).unwrap();
        std::fs::write(snap.join("export-2.stream"), b"x").unwrap();
        std::fs::write(snap.join("sending-3"), b"x").unwrap();
        let mut reopened =
            StateMachine::open(state_machine.mvcc().clone(), snap.clone(), 1).unwrap();
        let left: Vec<String> = std::fs::read_dir(&snap)
            .unwrap()
            .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(left, current);
        assert!(reopened.get_current_snapshot().await.unwrap().is_some());
    }

    /// openraft builds snapshots while it installs one: a build that began before an
    /// install and ends after it must not make the older state current again.
    #[tokio::test]
    async fn a_snapshot_built_before_an_install_never_replaces_it() {
        let (_source_dir, _, mut source) = Builder(None).build().await.unwrap();
        let entries: Vec<Entry> = (1..=10)
            .map(|index| put_entry(index, "key", &index.to_string()))
            .collect();
        source.apply(entries).await.unwrap();
        source
            .get_snapshot_builder()
            .await
            .build_snapshot()
            .await
            .unwrap();
        let sent = source.get_current_snapshot().await.unwrap().unwrap();

        let (dir, _, mut target) = Builder(None).build().await.unwrap();
        target.apply([put_entry(1, "stale", "x")]).await.unwrap();
        let building = target.take_checkpoint(None).unwrap();
        target
            .install_snapshot(&sent.meta, sent.snapshot)
            .await
            .unwrap();
        let built = target.publish(building).unwrap();
        assert_eq!(built.last_log_id.unwrap().index, 1);

        let current = target.get_current_snapshot().await.unwrap().unwrap();
        assert_eq!(current.meta, sent.meta);
        let names: Vec<String> = std::fs::read_dir(dir.path().join("snap"))
            .unwrap()
            .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
    }

    #[tokio::test]
    async fn snapshot_moves_history_to_another_member() {
        use crate::pb::etcdserverpb::{LeaseGrantRequest, PutRequest};
        use crate::pb::kvstorepb::internal_raft_request::Request;
        let (_source_dir, _, mut source) = Builder(None).build().await.unwrap();
        source
            .apply([
                put_entry(1, "a", "1"),
                put_entry(2, "a", "2"),
                request_entry(3, Request::LeaseGrant(LeaseGrantRequest { id: 9, ttl: 60 })),
                request_entry(
                    4,
                    Request::Put(PutRequest {
                        key: b"b".to_vec(),
                        value: b"1".to_vec(),
                        lease: 9,
                        ..Default::default()
                    }),
                ),
            ])
            .await
            .unwrap();
        let built = source
            .get_snapshot_builder()
            .await
            .build_snapshot()
            .await
            .unwrap();
        assert_eq!(built.meta.last_log_id.unwrap().index, 4);
        // Later writes do not leak into the snapshot taken before them.
        source.apply([put_entry(5, "c", "1")]).await.unwrap();

        let (_target_dir, _, mut target) = Builder(None).build().await.unwrap();
        target.apply([put_entry(1, "stale", "x")]).await.unwrap();
        let current = source.get_current_snapshot().await.unwrap().unwrap();
        assert_eq!(current.meta, built.meta);
        target
            .install_snapshot(&current.meta, current.snapshot)
            .await
            .unwrap();

        let (applied, _) = target.applied_state().await.unwrap();
        assert_eq!(applied.unwrap().index, 4);
        let view = target.mvcc().read();
        // The lease came along, with its key attached.
        let lease = crate::mvcc::ReadView::leases(&view).get(9).unwrap();
        assert_eq!((lease.ttl, lease.keys.len()), (60, 1));
        let all = crate::mvcc::range(
            &view,
            &crate::pb::etcdserverpb::RangeRequest {
                key: vec![0],
                range_end: vec![0],
                ..Default::default()
            },
        )
        .unwrap();
        let pairs: Vec<(Vec<u8>, Vec<u8>, i64)> = all
            .kvs
            .into_iter()
            .map(|kv| (kv.key, kv.value, kv.version))
            .collect();
        assert_eq!(
            pairs,
            vec![
                (b"a".to_vec(), b"2".to_vec(), 2),
                (b"b".to_vec(), b"1".to_vec(), 1)
            ]
        );
        // History came along: "a" at revision 2 (the first write) is readable.
        let old = crate::mvcc::range(
            &view,
            &crate::pb::etcdserverpb::RangeRequest {
                key: b"a".to_vec(),
                revision: 2,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(old.kvs[0].value, b"1");
        assert_eq!(crate::mvcc::ReadView::current_revision(&view), 4);
    }
}
