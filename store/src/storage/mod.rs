//! RocksDB: the one database file set of a member. Every column family and meta key
//! is named here, and nothing outside this module opens or configures RocksDB.
//! Must not import the raft, mvcc or api layers.

use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use rocksdb::WriteBatch;
use rocksdb::{ColumnFamily, ColumnFamilyDescriptor, Options, WriteOptions, DB};

/// Raft log entries keyed by big-endian index.
pub const CF_RAFT_LOG: &str = "raft_log";
/// Raft metadata: vote, committed log id, last purged log id.
pub const CF_RAFT_META: &str = "raft_meta";
/// MVCC history: revision key -> encoded `mvccpb.KeyValue`.
pub const CF_KV: &str = "kv";
/// State machine metadata: applied log id, membership, compaction point.
pub const CF_META: &str = "meta";

const COLUMN_FAMILIES: [&str; 4] = [CF_RAFT_LOG, CF_RAFT_META, CF_KV, CF_META];

/// Keys inside [`CF_RAFT_META`].
/// Creates a directory only its owner may enter (0700), as etcd creates its data
/// dir; an existing directory that others may read, write or enter is refused, since
/// the data and keys in it are nobody else's business.
pub fn create_private_dir(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    if !path.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(path)?;
    }
    let mode = std::fs::metadata(path)?.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!(
                "directory {:?} exists, but its permission is {mode:04o}; it must be 0700 to prevent unprivileged access to the data (chmod 700 it)",
                path.display().to_string()
            ),
        ));
    }
    Ok(())
}

pub mod raft_meta_key {
    /// The persisted vote.
    pub const VOTE: &[u8] = b"vote";
    /// The last known committed log id.
    pub const COMMITTED: &[u8] = b"committed";
    /// The last purged log id.
    pub const LAST_PURGED: &[u8] = b"last_purged";
}

/// Keys inside [`CF_META`].
pub mod meta_key {
    /// The last applied log id.
    pub const LAST_APPLIED: &[u8] = b"last_applied";
    /// The last applied membership config.
    pub const MEMBERSHIP: &[u8] = b"membership";
    /// The revision history was compacted at.
    pub const COMPACT_REVISION: &[u8] = b"compact_revision";
    /// The current revision, kept so it survives compaction of its own key.
    pub const CURRENT_REVISION: &[u8] = b"current_revision";
    /// The member's identity: name, cluster token, peer URLs, member and cluster ID.
    pub const MEMBER: &[u8] = b"member";
    /// The founding membership of a data dir made by `kvstore snapshot restore`,
    /// used once at its first start.
    pub const BOOTSTRAP: &[u8] = b"bootstrap";
    /// The last snapshot's metadata and data.
    pub const SNAPSHOT: &[u8] = b"snapshot";
    /// Prefix of lease records: the lease ID (8 bytes big-endian) follows, the
    /// granted TTL (8 bytes big-endian) is the value.
    pub const LEASE_PREFIX: &[u8] = b"lease/";

    /// Prefix of member attribute records: the member ID (8 bytes big-endian)
    /// follows, an encoded `kvstorepb.MemberAttributes` is the value.
    pub const MEMBER_ATTRIBUTES_PREFIX: &[u8] = b"member_attr/";

    /// Prefix of members removed from the cluster (etcd's removed set): the member
    /// ID (8 bytes big-endian) follows; the value is empty.
    pub const REMOVED_MEMBER_PREFIX: &[u8] = b"removed_member/";

    /// Prefix of raised alarms: member ID (8 bytes big-endian) and alarm type (4
    /// bytes big-endian) follow; the value is empty.
    pub const ALARM_PREFIX: &[u8] = b"alarm/";

    /// Prefix of the auth store's records: `enabled` (one byte), `revision` (8 bytes
    /// big-endian), `user/<name>` (an encoded `authpb.User`, password hashed) and
    /// `role/<name>` (an encoded `authpb.Role`).
    pub const AUTH_PREFIX: &[u8] = b"auth/";

    /// The key of an alarm.
    pub fn alarm(member: u64, alarm: i32) -> Vec<u8> {
        let mut key = ALARM_PREFIX.to_vec();
        key.extend_from_slice(&member.to_be_bytes());
        key.extend_from_slice(&alarm.to_be_bytes());
        key
    }

    /// The key of member `id`'s attributes.
    pub fn member_attributes(id: u64) -> Vec<u8> {
        let mut key = MEMBER_ATTRIBUTES_PREFIX.to_vec();
        key.extend_from_slice(&id.to_be_bytes());
        key
    }

    /// The key recording that member `id` was removed.
    pub fn removed_member(id: u64) -> Vec<u8> {
        let mut key = REMOVED_MEMBER_PREFIX.to_vec();
        key.extend_from_slice(&id.to_be_bytes());
        key
    }

    /// The key of lease `id`'s record.
    pub fn lease(id: i64) -> Vec<u8> {
        let mut key = LEASE_PREFIX.to_vec();
        key.extend_from_slice(&id.to_be_bytes());
        key
    }
}

/// A stored key and value.
pub type Record = (Vec<u8>, Vec<u8>);

/// Errors of the storage layer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// RocksDB could not be opened at the data dir.
    #[error("failed to open rocksdb at {path}: {source}")]
    Open {
        /// Where.
        path: PathBuf,
        /// Why.
        source: rocksdb::Error,
    },
    /// A read or write failed.
    #[error("rocksdb {operation} failed: {source}")]
    Io {
        /// What was attempted.
        operation: &'static str,
        /// Why it failed.
        source: rocksdb::Error,
    },
    /// A stored record is malformed.
    #[error("corrupt record: {0}")]
    Corrupt(String),
}

/// The member's RocksDB with its named column families.
pub struct Storage {
    db: DB,
    path: PathBuf,
    /// `size_bytes` as last read, and when: reading it takes a dozen RocksDB
    /// property lookups, too many for every write's quota check.
    recent_size: parking_lot::Mutex<Option<(std::time::Instant, u64)>>,
}

/// How stale the size a quota check uses may be.
const SIZE_REFRESH: std::time::Duration = std::time::Duration::from_millis(50);

impl Storage {
    /// Stops RocksDB's flushes and compactions, waiting for running ones; for the end
    /// of the process. Every write was synced, so nothing depends on them.
    pub fn quiesce(&self) {
        self.db.cancel_all_background_work(true);
    }

    /// Opens (or creates) the database under `dir`.
    pub fn open(dir: &Path) -> Result<Arc<Storage>, Error> {
        let mut options = Options::default();
        options.create_if_missing(true);
        options.create_missing_column_families(true);
        options.set_max_background_jobs(2);
        options.set_keep_log_file_num(3);
        options.set_max_total_wal_size(256 << 20);
        // State machine writes skip the WAL (the Raft log is their durable record);
        // flushing all column families together keeps what survives a crash consistent.
        options.set_atomic_flush(true);
        // All memtables together stay under 32 MiB (the busiest is flushed first):
        // under a steady write load the log and the key-value families would
        // otherwise each hold two full memtables. Against 64 MiB in all with 32 MiB
        // memtables: peak RSS for 100,000 puts from 500 clients 125 -> 94 MiB at the
        // same throughput; 24 MiB with 8 MiB memtables cost a quarter of it.
        options.set_db_write_buffer_size(32 << 20);

        let descriptors = COLUMN_FAMILIES.iter().map(|name| {
            let mut cf_options = Options::default();
            cf_options.set_write_buffer_size(16 << 20);
            if *name == CF_KV {
                cf_options.set_compression_type(rocksdb::DBCompressionType::Lz4);
            } else {
                cf_options.set_compression_type(rocksdb::DBCompressionType::None);
            }
            ColumnFamilyDescriptor::new(*name, cf_options)
        });
        let db =
            DB::open_cf_descriptors(&options, dir, descriptors).map_err(|source| Error::Open {
                path: dir.to_path_buf(),
                source,
            })?;
        Ok(Arc::new(Storage {
            db,
            path: dir.to_path_buf(),
            recent_size: parking_lot::Mutex::new(None),
        }))
    }

    /// The directory the database lives in.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The handle of a column family created at open.
    pub fn cf(&self, name: &str) -> &ColumnFamily {
        self.db
            .cf_handle(name)
            .expect("every column family is created when the database is opened")
    }

    /// The raw database, for iterators and snapshots.
    pub fn db(&self) -> &DB {
        &self.db
    }

    /// Reads one value.
    pub fn get(&self, cf: &str, key: &[u8]) -> Result<Option<Vec<u8>>, Error> {
        self.db
            .get_cf(self.cf(cf), key)
            .map_err(|source| Error::Io {
                operation: "get",
                source,
            })
    }

    /// Iterates `cf` for a scan of all or much of it (index rebuild, hash, compaction,
    /// snapshot export): the blocks it reads stay out of the block cache, which they
    /// would fill with data no client asked for.
    pub fn scan_cf(
        &self,
        cf: &str,
        mode: rocksdb::IteratorMode<'_>,
    ) -> rocksdb::DBIteratorWithThreadMode<'_, DB> {
        let mut options = rocksdb::ReadOptions::default();
        options.fill_cache(false);
        self.db.iterator_cf_opt(self.cf(cf), options, mode)
    }

    /// Every record of [`CF_META`] under `prefix`, with the prefix removed from keys.
    pub fn meta_with_prefix(&self, prefix: &[u8]) -> Result<Vec<Record>, Error> {
        let mut records = Vec::new();
        let iterator = self.db.iterator_cf(
            self.cf(CF_META),
            rocksdb::IteratorMode::From(prefix, rocksdb::Direction::Forward),
        );
        for item in iterator {
            let (key, value) = item.map_err(|source| Error::Io {
                operation: "scan meta",
                source,
            })?;
            let Some(rest) = key.strip_prefix(prefix) else {
                break;
            };
            records.push((rest.to_vec(), value.to_vec()));
        }
        Ok(records)
    }

    /// The lease records: (ID, granted TTL), in ID byte order.
    pub fn leases(&self) -> Result<Vec<(i64, i64)>, Error> {
        self.meta_with_prefix(meta_key::LEASE_PREFIX)?
            .into_iter()
            .map(|(id, ttl)| {
                match (
                    <[u8; 8]>::try_from(id.as_slice()),
                    <[u8; 8]>::try_from(ttl.as_slice()),
                ) {
                    (Ok(id), Ok(ttl)) => Ok((i64::from_be_bytes(id), i64::from_be_bytes(ttl))),
                    _ => Err(Error::Corrupt(format!("malformed lease record {id:?}"))),
                }
            })
            .collect()
    }

    /// The end of the key range holding every key that starts with `prefix`.
    pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
        let mut end = prefix.to_vec();
        *end.last_mut().expect("prefixes are not empty") += 1;
        end
    }

    /// Writes a batch; with `sync` the WAL is fsynced before returning.
    pub fn write(&self, batch: WriteBatch, sync: bool) -> Result<(), Error> {
        let mut options = WriteOptions::default();
        options.set_sync(sync);
        self.write_with(batch, &options)
    }

    /// Writes a batch without the WAL: it survives a crash only once flushed, which
    /// (atomic flush) happens for all column families together. For state the Raft
    /// log can rebuild.
    pub fn write_unlogged(&self, batch: WriteBatch) -> Result<(), Error> {
        let mut options = WriteOptions::default();
        options.disable_wal(true);
        self.write_with(batch, &options)
    }

    fn write_with(&self, batch: WriteBatch, options: &WriteOptions) -> Result<(), Error> {
        self.db
            .write_opt(batch, options)
            .map_err(|source| Error::Io {
                operation: "write",
                source,
            })
    }

    /// Total bytes the database occupies: SST files, memtables and WAL-backed data.
    pub fn size_bytes(&self) -> u64 {
        let mut total = 0;
        for name in COLUMN_FAMILIES {
            let cf = self.cf(name);
            for property in [
                "rocksdb.total-sst-files-size",
                "rocksdb.cur-size-all-mem-tables",
            ] {
                total += self
                    .db
                    .property_int_value_cf(cf, property)
                    .ok()
                    .flatten()
                    .unwrap_or(0);
            }
        }
        total
    }

    /// `size_bytes`, read at most every 50 ms (for the quota check of each write).
    pub fn recent_size_bytes(&self) -> u64 {
        let mut recent = self.recent_size.lock();
        match *recent {
            Some((at, size)) if at.elapsed() < SIZE_REFRESH => size,
            _ => {
                let size = self.size_bytes();
                *recent = Some((std::time::Instant::now(), size));
                size
            }
        }
    }

    /// Bytes of live data, an estimate: what compaction would keep.
    pub fn size_in_use_bytes(&self) -> u64 {
        let mut total = 0;
        for name in COLUMN_FAMILIES {
            let cf = self.cf(name);
            for property in [
                "rocksdb.estimate-live-data-size",
                "rocksdb.cur-size-all-mem-tables",
            ] {
                total += self
                    .db
                    .property_int_value_cf(cf, property)
                    .ok()
                    .flatten()
                    .unwrap_or(0);
            }
        }
        total
    }

    /// Writes a consistent copy of the whole database to `dir` (hard links where
    /// possible, so it is cheap). `dir` must not exist yet.
    pub fn checkpoint(&self, dir: &Path) -> Result<(), Error> {
        rocksdb::checkpoint::Checkpoint::new(&self.db)
            .and_then(|checkpoint| checkpoint.create_checkpoint(dir))
            .map_err(|source| Error::Io {
                operation: "checkpoint",
                source,
            })
    }

    /// Writes the memtables of every column family to disk.
    pub fn flush(&self) -> Result<(), Error> {
        for name in COLUMN_FAMILIES {
            self.db
                .flush_cf(self.cf(name))
                .map_err(|source| Error::Io {
                    operation: "flush",
                    source,
                })?;
        }
        Ok(())
    }

    /// Opens a checkpoint made by [`Storage::checkpoint`] read-only.
    pub fn open_checkpoint(dir: &Path) -> Result<Storage, Error> {
        let db = DB::open_cf_for_read_only(&Options::default(), dir, COLUMN_FAMILIES, false)
            .map_err(|source| Error::Open {
                path: dir.to_path_buf(),
                source,
            })?;
        Ok(Storage {
            db,
            path: dir.to_path_buf(),
            recent_size: parking_lot::Mutex::new(None),
        })
    }

    /// Compacts every column family to reclaim the space of deleted data.
    pub fn defragment(&self) {
        for name in COLUMN_FAMILIES {
            self.db
                .compact_range_cf(self.cf(name), None::<&[u8]>, None::<&[u8]>);
        }
    }
}
