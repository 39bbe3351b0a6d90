//! The Raft log in RocksDB. Large appends are handed to one writer thread that merges
//! everything queued into a single fsynced batch (group commit) and only then reports
//! the entries flushed, so the Raft thread goes on applying meanwhile; a small append
//! with nothing queued ahead of it is written and fsynced on the Raft thread itself,
//! which saves two thread wake-ups per entry when the load is light. Recent entries
//! stay in memory so replication and apply read them without touching disk.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::Arc;

use openraft::storage::{LogFlushed, LogState, RaftLogReader, RaftLogStorage};
use openraft::{ErrorSubject, ErrorVerb, OptionalSend, RaftLogId, Vote};
use parking_lot::Mutex;

use super::{decode, encode, io_error, Entry, LogId, StorageError, TypeConfig};
use crate::storage::{raft_meta_key, Storage, WriteBatch, CF_RAFT_LOG, CF_RAFT_META};

/// Flushed entries stay in memory for readers close behind the tail (apply,
/// replication), up to this many entries and this many encoded bytes.
const FLUSHED_ENTRIES_KEPT: usize = 1024;
const FLUSHED_BYTES_KEPT: usize = 8 << 20;
/// Appends up to this many encoded bytes are written on the Raft thread when the
/// writer thread has nothing queued. Larger ones (many requests in one batch, when
/// the load is heavy) go to the writer thread, so applying the previous batch
/// overlaps their fsync.
const INLINE_APPEND_BYTES: usize = 64 << 10;

fn log_key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

/// Recent entries with their encoded sizes.
#[derive(Default)]
struct Cache {
    entries: BTreeMap<u64, (Entry, usize)>,
    bytes: usize,
}

impl Cache {
    fn insert(&mut self, index: u64, entry: Entry, size: usize) {
        if let Some((_, old)) = self.entries.insert(index, (entry, size)) {
            self.bytes -= old;
        }
        self.bytes += size;
    }

    /// Drops entries from `index` on.
    fn truncate(&mut self, index: u64) {
        for (_, (_, size)) in self.entries.split_off(&index) {
            self.bytes -= size;
        }
    }

    /// Drops entries up to and including `index`.
    fn purge(&mut self, index: u64) {
        let kept = self.entries.split_off(&(index + 1));
        let dropped = std::mem::replace(&mut self.entries, kept);
        self.bytes -= dropped.values().map(|(_, size)| size).sum::<usize>();
    }

    /// Drops the oldest flushed entries beyond the memory budget.
    fn trim(&mut self, flushed: u64) {
        while let Some((&first, (_, size))) = self.entries.first_key_value() {
            let over_budget =
                self.entries.len() > FLUSHED_ENTRIES_KEPT || self.bytes > FLUSHED_BYTES_KEPT;
            if first > flushed || !over_budget {
                break;
            }
            self.bytes -= *size;
            self.entries.pop_first();
        }
    }
}

enum WriterCommand {
    Append {
        batch: Vec<(u64, Vec<u8>)>,
        callback: LogFlushed<TypeConfig>,
    },
    /// Answers once everything queued before it is on disk.
    Barrier(std::sync::mpsc::SyncSender<()>),
}

struct Shared {
    storage: Arc<Storage>,
    /// A suffix of the log: every entry not yet flushed, and recent flushed ones.
    cache: Mutex<Cache>,
    writer: Mutex<mpsc::Sender<WriterCommand>>,
    /// Commands sent to the writer thread and not yet completed.
    queued: AtomicUsize,
    /// The largest append written on the calling thread.
    inline_limit: usize,
}

/// The log store handed to openraft; clones share one log.
#[derive(Clone)]
pub struct LogStore {
    shared: Arc<Shared>,
}

impl LogStore {
    /// Opens the log kept in `storage` and starts its writer thread.
    pub fn open(storage: Arc<Storage>) -> LogStore {
        LogStore::with_inline_limit(storage, INLINE_APPEND_BYTES)
    }

    /// As [`LogStore::open`], writing appends of up to `inline_limit` bytes on the
    /// calling thread (0: every append goes to the writer thread).
    pub(crate) fn with_inline_limit(storage: Arc<Storage>, inline_limit: usize) -> LogStore {
        let (sender, receiver) = mpsc::channel();
        let shared = Arc::new(Shared {
            storage,
            cache: Mutex::new(Cache::default()),
            writer: Mutex::new(sender),
            queued: AtomicUsize::new(0),
            inline_limit,
        });
        let weak = Arc::downgrade(&shared);
        std::thread::Builder::new()
            .name("raft-log-writer".into())
            .spawn(move || writer_loop(weak, receiver))
            .expect("spawning the raft log writer thread");
        LogStore { shared }
    }

    fn send(&self, command: WriterCommand) -> Result<(), StorageError> {
        self.shared.queued.fetch_add(1, Ordering::AcqRel);
        self.shared.writer.lock().send(command).map_err(|_| {
            io_error(
                ErrorSubject::Logs,
                ErrorVerb::Write,
                &std::io::Error::other("raft log writer stopped"),
            )
        })
    }

    /// Waits until every queued append is on disk.
    fn barrier(&self) -> Result<(), StorageError> {
        let (sender, receiver) = std::sync::mpsc::sync_channel(1);
        self.send(WriterCommand::Barrier(sender))?;
        receiver.recv().map_err(|_| {
            io_error(
                ErrorSubject::Logs,
                ErrorVerb::Write,
                &std::io::Error::other("raft log writer stopped"),
            )
        })
    }

    fn read_meta<T: serde::de::DeserializeOwned>(
        &self,
        key: &[u8],
        subject: ErrorSubject<u64>,
    ) -> Result<Option<T>, StorageError> {
        match self.shared.storage.get(CF_RAFT_META, key) {
            Ok(Some(bytes)) => decode(&bytes, subject).map(Some),
            Ok(None) => Ok(None),
            Err(error) => Err(io_error(subject, ErrorVerb::Read, &error)),
        }
    }

    fn write_meta<T: serde::Serialize>(
        &self,
        key: &[u8],
        value: &T,
        sync: bool,
        subject: ErrorSubject<u64>,
    ) -> Result<(), StorageError> {
        let storage = &self.shared.storage;
        let mut batch = WriteBatch::default();
        batch.put_cf(storage.cf(CF_RAFT_META), key, encode(value));
        storage
            .write(batch, sync)
            .map_err(|error| io_error(subject, ErrorVerb::Write, &error))
    }

    fn last_stored(&self) -> Result<Option<LogId>, StorageError> {
        let storage = &self.shared.storage;
        let mut iterator = storage
            .db()
            .iterator_cf(storage.cf(CF_RAFT_LOG), rocksdb::IteratorMode::End);
        match iterator.next() {
            Some(Ok((_, value))) => Ok(Some(
                *decode::<Entry>(&value, ErrorSubject::Logs)?.get_log_id(),
            )),
            Some(Err(error)) => Err(io_error(ErrorSubject::Logs, ErrorVerb::Read, &error)),
            None => Ok(None),
        }
    }
}

/// Writes `entries` to the log in one fsynced batch and drops flushed entries from
/// the cache beyond its budget.
fn write_entries<'a>(
    shared: &Shared,
    entries: impl IntoIterator<Item = &'a (u64, Vec<u8>)>,
) -> Result<(), std::io::Error> {
    let mut batch = WriteBatch::default();
    let cf = shared.storage.cf(CF_RAFT_LOG);
    let mut last_index = None;
    for (index, bytes) in entries {
        batch.put_cf(cf, log_key(*index), bytes);
        last_index = Some(*index);
    }
    let Some(last_index) = last_index else {
        return Ok(());
    };
    let started = std::time::Instant::now();
    let written = shared
        .storage
        .write(batch, true)
        .map_err(std::io::Error::other);
    let took = started.elapsed();
    crate::metrics::METRICS
        .wal_fsync
        .observe(took.as_secs_f64());
    if took > std::time::Duration::from_secs(1) {
        tracing::warn!(took = ?took, "slow fdatasync");
    }
    written?;
    shared.cache.lock().trim(last_index);
    Ok(())
}

fn writer_loop(shared: std::sync::Weak<Shared>, receiver: mpsc::Receiver<WriterCommand>) {
    while let Ok(first) = receiver.recv() {
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let mut commands = vec![first];
        while let Ok(next) = receiver.try_recv() {
            commands.push(next);
        }
        let result = write_entries(
            &shared,
            commands.iter().flat_map(|command| match command {
                WriterCommand::Append { batch, .. } => batch.as_slice(),
                WriterCommand::Barrier(_) => &[],
            }),
        );
        let completed = commands.len();
        for command in commands {
            match command {
                WriterCommand::Append { callback, .. } => {
                    let outcome = match &result {
                        Ok(()) => Ok(()),
                        Err(error) => Err(std::io::Error::other(error.to_string())),
                    };
                    callback.log_io_completed(outcome);
                }
                WriterCommand::Barrier(done) => {
                    let _ = done.send(());
                }
            }
        }
        // Only now may an append be written inline: everything before it is on disk
        // and reported in order.
        shared.queued.fetch_sub(completed, Ordering::AcqRel);
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let start = match range.start_bound() {
            Bound::Included(start) => *start,
            Bound::Excluded(start) => start + 1,
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(end) => Some(end + 1),
            Bound::Excluded(end) => Some(*end),
            Bound::Unbounded => None,
        };
        // Cached entries first: anything older than the cache is already on disk.
        let (cached, cache_start) = {
            let cache = self.shared.cache.lock();
            let cache_start = cache.entries.first_key_value().map(|(index, _)| *index);
            let upper = end.map_or(Bound::Unbounded, Bound::Excluded);
            let cached: Vec<Entry> = cache
                .entries
                .range((Bound::Included(start), upper))
                .map(|(_, (entry, _))| entry.clone())
                .collect();
            (cached, cache_start)
        };
        let disk_end = match (cache_start, end) {
            (Some(cache_start), Some(end)) => end.min(cache_start),
            (Some(cache_start), None) => cache_start,
            (None, end) => end.unwrap_or(u64::MAX),
        };
        let mut entries = Vec::new();
        if start < disk_end {
            let storage = &self.shared.storage;
            let from = log_key(start);
            let iterator = storage.db().iterator_cf(
                storage.cf(CF_RAFT_LOG),
                rocksdb::IteratorMode::From(&from, rocksdb::Direction::Forward),
            );
            for item in iterator {
                let (key, value) =
                    item.map_err(|error| io_error(ErrorSubject::Logs, ErrorVerb::Read, &error))?;
                let index =
                    u64::from_be_bytes(key.as_ref().try_into().expect("log keys are 8 bytes"));
                if index >= disk_end {
                    break;
                }
                entries.push(decode::<Entry>(&value, ErrorSubject::Logs)?);
            }
        }
        entries.extend(cached);
        Ok(entries)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let last_purged_log_id: Option<LogId> =
            self.read_meta(raft_meta_key::LAST_PURGED, ErrorSubject::Logs)?;
        let cached_last = self
            .shared
            .cache
            .lock()
            .entries
            .last_key_value()
            .map(|(_, (entry, _))| *entry.get_log_id());
        let last = match cached_last {
            Some(last) => Some(last),
            None => self.last_stored()?,
        };
        Ok(LogState {
            last_purged_log_id,
            last_log_id: last.or(last_purged_log_id),
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<u64>) -> Result<(), StorageError> {
        self.write_meta(raft_meta_key::VOTE, vote, true, ErrorSubject::Vote)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<u64>>, StorageError> {
        self.read_meta(raft_meta_key::VOTE, ErrorSubject::Vote)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        // Not fsynced: a lost committed mark only delays re-applying, never loses data.
        self.write_meta(
            raft_meta_key::COMMITTED,
            &committed,
            false,
            ErrorSubject::Store,
        )
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        Ok(self
            .read_meta::<Option<LogId>>(raft_meta_key::COMMITTED, ErrorSubject::Store)?
            .flatten())
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut batch = Vec::new();
        let mut bytes_total = 0;
        {
            let mut cache = self.shared.cache.lock();
            for entry in entries {
                let index = entry.get_log_id().index;
                let bytes = encode(&entry);
                bytes_total += bytes.len();
                cache.insert(index, entry, bytes.len());
                batch.push((index, bytes));
            }
        }
        // Appends come one at a time from the Raft core, so nothing can be queued
        // between this check and the write.
        if bytes_total <= self.shared.inline_limit
            && self.shared.queued.load(Ordering::Acquire) == 0
        {
            callback.log_io_completed(write_entries(&self.shared, &batch));
            return Ok(());
        }
        self.send(WriterCommand::Append { batch, callback })
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.barrier()?;
        self.shared.cache.lock().truncate(log_id.index);
        let storage = &self.shared.storage;
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(
            storage.cf(CF_RAFT_LOG),
            log_key(log_id.index),
            log_key(u64::MAX),
        );
        storage
            .write(batch, true)
            .map_err(|error| io_error(ErrorSubject::Logs, ErrorVerb::Delete, &error))
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.barrier()?;
        self.shared.cache.lock().purge(log_id.index);
        let storage = &self.shared.storage;
        let mut batch = WriteBatch::default();
        batch.put_cf(
            storage.cf(CF_RAFT_META),
            raft_meta_key::LAST_PURGED,
            encode(&log_id),
        );
        batch.delete_range_cf(
            storage.cf(CF_RAFT_LOG),
            log_key(0),
            log_key(log_id.index + 1),
        );
        storage
            .write(batch, true)
            .map_err(|error| io_error(ErrorSubject::Logs, ErrorVerb::Delete, &error))
    }
}
