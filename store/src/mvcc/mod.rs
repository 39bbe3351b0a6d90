//! Multi-version key-value state with etcd's semantics: one store revision per
//! mutation, per-key create/mod revision and version, tombstones, reads at old
//! revisions until compaction. Knows nothing of gRPC or Raft: the apply layer is its
//! only writer. Values live in RocksDB by revision; the key index lives in memory and
//! is rebuilt from RocksDB at start.

pub mod key_index;
pub mod lease;
pub mod revision;
pub mod watch;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ops::Bound;
use std::sync::Arc;

use parking_lot::{RwLock, RwLockReadGuard, RwLockWriteGuard};
use prost::Message;

use crate::error::EtcdError;
use crate::pb::etcdserverpb::range_request::{SortOrder, SortTarget};
use crate::pb::etcdserverpb::{RangeRequest, RangeResponse};
use crate::pb::mvccpb::{event::EventType, Event, KeyValue};
use crate::storage::{meta_key, Storage, WriteBatch, CF_KV, CF_META};
use key_index::KeyIndex;
use lease::{Expiries, LeaseTable};
pub use revision::Revision;
use watch::WatchHub;

/// Errors of the MVCC layer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An etcd error for the client.
    #[error(transparent)]
    Etcd(#[from] EtcdError),
    /// Storage failed.
    #[error(transparent)]
    Storage(#[from] crate::storage::Error),
    /// A stored record could not be decoded.
    #[error("corrupt mvcc record at revision {revision:?}: {reason}")]
    Corrupt {
        /// Where.
        revision: Revision,
        /// What was wrong.
        reason: String,
    },
}

/// The set of keys a request addresses, decoded from etcd's `key`/`range_end` pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyRange {
    /// Exactly one key (`range_end` empty).
    Single(Vec<u8>),
    /// `[start, end)`; `end` None means every key from `start` on (`range_end` "\0").
    Span {
        /// First key.
        start: Vec<u8>,
        /// Exclusive end.
        end: Option<Vec<u8>>,
    },
}

impl KeyRange {
    /// Decodes etcd's key and range_end.
    pub fn new(key: &[u8], range_end: &[u8]) -> KeyRange {
        if range_end.is_empty() {
            KeyRange::Single(key.to_vec())
        } else if range_end == [0] {
            KeyRange::Span {
                start: key.to_vec(),
                end: None,
            }
        } else {
            KeyRange::Span {
                start: key.to_vec(),
                end: Some(range_end.to_vec()),
            }
        }
    }

    /// The range as BTreeMap bounds; None when it holds no key at all.
    fn bounds(&self) -> Option<KeyBounds<'_>> {
        match self {
            KeyRange::Single(key) => Some((Bound::Included(key), Bound::Included(key))),
            KeyRange::Span { start, end: None } => Some((Bound::Included(start), Bound::Unbounded)),
            KeyRange::Span {
                start,
                end: Some(end),
            } => (end > start).then_some((Bound::Included(start), Bound::Excluded(end))),
        }
    }

    fn iter<'a>(
        &self,
        keys: &'a KeyMap,
    ) -> impl Iterator<Item = (&'a Box<[u8]>, &'a KeyIndex)> + 'a {
        self.bounds()
            .map(|bounds| keys.range::<[u8], _>(bounds))
            .into_iter()
            .flatten()
    }

    fn iter_mut<'a>(
        &self,
        keys: &'a mut KeyMap,
    ) -> impl Iterator<Item = (&'a Box<[u8]>, &'a mut KeyIndex)> + 'a {
        self.bounds()
            .map(|bounds| keys.range_mut::<[u8], _>(bounds))
            .into_iter()
            .flatten()
    }
}

/// The key index: every key ever written and not yet compacted away, with its
/// history. Keys are boxed slices, 8 bytes smaller than vectors in every entry.
pub type KeyMap = BTreeMap<Box<[u8]>, KeyIndex>;

/// Lower and upper bound of a [`KeyRange`] in the key index.
type KeyBounds<'a> = (Bound<&'a [u8]>, Bound<&'a [u8]>);

/// The revision of an empty store.
pub const INITIAL_REVISION: i64 = 1;
/// The compaction revision of a store never compacted.
const NEVER_COMPACTED: i64 = -1;

/// The in-memory index and the revision counters, guarded together.
#[derive(Default)]
struct IndexState {
    keys: KeyMap,
    current_revision: i64,
    compact_revision: i64,
    leases: LeaseTable,
    /// Raised alarms: (member ID, alarm type).
    alarms: std::collections::BTreeSet<(u64, i32)>,
    /// Users, roles and permissions.
    auth: crate::auth::AuthState,
}

/// The MVCC store of one member, with its watchers and leases.
pub struct Mvcc {
    storage: Arc<Storage>,
    state: RwLock<IndexState>,
    hub: WatchHub,
    expiries: Expiries,
    /// How long a simple auth token stays valid without use, in seconds.
    token_ttl: std::sync::atomic::AtomicU64,
    /// Whether auth is enabled, readable without the index lock: every client
    /// request asks, and with auth disabled (the common case) that is all it asks.
    auth_enabled: std::sync::atomic::AtomicBool,
}

/// Read access to a consistent state of the store: either a reader's view of the
/// newest applied revision or the apply layer's view with its own pending writes.
pub trait ReadView {
    /// The newest revision visible to this view.
    fn current_revision(&self) -> i64;
    /// The revision history is compacted at.
    fn compact_revision(&self) -> i64;
    /// The key index.
    fn keys(&self) -> &KeyMap;
    /// The stored value written at `revision`.
    fn value(&self, revision: Revision) -> Result<KeyValue, Error>;
    /// The leases.
    fn leases(&self) -> &LeaseTable;
    /// Users, roles and permissions.
    fn auth(&self) -> &crate::auth::AuthState;
}

fn decode_value(revision: Revision, bytes: Option<Vec<u8>>) -> Result<KeyValue, Error> {
    let bytes = bytes.ok_or_else(|| Error::Corrupt {
        revision,
        reason: "indexed revision missing from storage".into(),
    })?;
    KeyValue::decode(bytes.as_slice()).map_err(|source| Error::Corrupt {
        revision,
        reason: source.to_string(),
    })
}

/// The key a tombstone deleted. A tombstone's value is the storage key of the value
/// it ended, which holds the key and outlives the tombstone (compaction keeps a key's
/// value as long as anything after it is kept): 17 bytes instead of a second copy of
/// the key, which counts when one request deletes a prefix of a large store.
pub(crate) fn tombstone_key(
    storage: &Storage,
    revision: Revision,
    value: &[u8],
) -> Result<Vec<u8>, Error> {
    let ended = match Revision::from_key(value) {
        Some((ended, false)) if ended < revision => ended,
        _ => {
            return Err(Error::Corrupt {
                revision,
                reason: "tombstone does not name the value it ended".into(),
            })
        }
    };
    Ok(decode_value(ended, storage.get(CF_KV, value)?)?.key)
}

/// A reader's view: the index under a shared lock.
pub struct Reader<'a> {
    state: RwLockReadGuard<'a, IndexState>,
    storage: &'a Storage,
}

impl ReadView for Reader<'_> {
    fn current_revision(&self) -> i64 {
        self.state.current_revision
    }
    fn compact_revision(&self) -> i64 {
        self.state.compact_revision
    }
    fn keys(&self) -> &KeyMap {
        &self.state.keys
    }
    fn value(&self, revision: Revision) -> Result<KeyValue, Error> {
        decode_value(revision, self.storage.get(CF_KV, &revision.to_key(false))?)
    }
    fn leases(&self) -> &LeaseTable {
        &self.state.leases
    }
    fn auth(&self) -> &crate::auth::AuthState {
        &self.state.auth
    }
}

/// The apply layer's view: exclusive access, writes collected in one RocksDB batch.
/// Nothing is visible to readers before [`Writer::commit`].
pub struct Writer<'a> {
    state: RwLockWriteGuard<'a, IndexState>,
    mvcc: &'a Mvcc,
    storage: &'a Storage,
    batch: WriteBatch,
    /// Events for watchers, collected only when there are watchers.
    events: Option<Vec<Event>>,
    pending_values: HashMap<Revision, KeyValue>,
    /// Changes made so far in the open store revision.
    sub_revision: i64,
}

impl ReadView for Writer<'_> {
    fn current_revision(&self) -> i64 {
        if self.sub_revision > 0 {
            self.state.current_revision + 1
        } else {
            self.state.current_revision
        }
    }
    fn compact_revision(&self) -> i64 {
        self.state.compact_revision
    }
    fn keys(&self) -> &KeyMap {
        &self.state.keys
    }
    fn value(&self, revision: Revision) -> Result<KeyValue, Error> {
        if let Some(value) = self.pending_values.get(&revision) {
            return Ok(value.clone());
        }
        decode_value(revision, self.storage.get(CF_KV, &revision.to_key(false))?)
    }
    fn leases(&self) -> &LeaseTable {
        &self.state.leases
    }
    fn auth(&self) -> &crate::auth::AuthState {
        &self.state.auth
    }
}

/// The keys of a range at a revision, found in the index.
pub struct Found {
    /// Keys with values, in key order, at most the requested limit.
    pub kvs: Vec<KeyValue>,
    /// All keys in the range at that revision, regardless of limit.
    pub count: i64,
}

/// Checks `revision` against the view and turns "0 or less" into the newest revision.
pub fn read_revision(view: &impl ReadView, revision: i64) -> Result<i64, EtcdError> {
    let current = view.current_revision();
    if revision > current {
        return Err(EtcdError::FutureRev);
    }
    let at = if revision <= 0 { current } else { revision };
    if at < view.compact_revision() {
        return Err(EtcdError::Compacted);
    }
    Ok(at)
}

/// Finds the keys in `range` as of revision `at` (already checked), reading at most
/// `limit` values (0: all); `count_only` reads none.
pub fn find(
    view: &impl ReadView,
    range: &KeyRange,
    at: i64,
    limit: usize,
    count_only: bool,
) -> Result<Found, Error> {
    let mut count = 0i64;
    let mut kvs = Vec::new();
    for (_, index) in range.iter(view.keys()) {
        let Some(found) = index.get(at) else { continue };
        count += 1;
        if count_only || (limit > 0 && kvs.len() >= limit) {
            continue;
        }
        kvs.push(view.value(found.modified)?);
    }
    Ok(Found { kvs, count })
}

/// etcd's Range: revision checks, filters, sorting, limit, keys_only and count_only.
/// The header is left for the caller.
pub fn range(view: &impl ReadView, request: &RangeRequest) -> Result<RangeResponse, Error> {
    let at = read_revision(view, request.revision)?;
    let key_range = KeyRange::new(&request.key, &request.range_end);
    let sort_order =
        SortOrder::try_from(request.sort_order).map_err(|_| EtcdError::InvalidSortOption)?;
    let sort_target =
        SortTarget::try_from(request.sort_target).map_err(|_| EtcdError::InvalidSortOption)?;
    let needs_all = sort_order != SortOrder::None
        || request.min_mod_revision != 0
        || request.max_mod_revision != 0
        || request.min_create_revision != 0
        || request.max_create_revision != 0;
    let fetch_limit = if needs_all || request.limit <= 0 {
        0
    } else {
        request.limit as usize + 1
    };
    let found = find(view, &key_range, at, fetch_limit, request.count_only)?;
    let mut response = RangeResponse {
        count: found.count,
        ..Default::default()
    };
    if request.count_only {
        return Ok(response);
    }
    let mut kvs = found.kvs;
    kvs.retain(|kv| {
        (request.max_mod_revision == 0 || kv.mod_revision <= request.max_mod_revision)
            && (request.min_mod_revision == 0 || kv.mod_revision >= request.min_mod_revision)
            && (request.max_create_revision == 0
                || kv.create_revision <= request.max_create_revision)
            && (request.min_create_revision == 0
                || kv.create_revision >= request.min_create_revision)
    });
    let mut order = sort_order;
    if sort_target != SortTarget::Key && order == SortOrder::None {
        order = SortOrder::Ascend;
    }
    if sort_target == SortTarget::Key && order == SortOrder::Ascend {
        order = SortOrder::None;
    }
    if order != SortOrder::None {
        let compare = |a: &KeyValue, b: &KeyValue| match sort_target {
            SortTarget::Key => a.key.cmp(&b.key),
            SortTarget::Version => a.version.cmp(&b.version),
            SortTarget::Create => a.create_revision.cmp(&b.create_revision),
            SortTarget::Mod => a.mod_revision.cmp(&b.mod_revision),
            SortTarget::Value => a.value.cmp(&b.value),
        };
        if order == SortOrder::Descend {
            kvs.sort_by(|a, b| compare(b, a));
        } else {
            kvs.sort_by(compare);
        }
    }
    if request.limit > 0 && kvs.len() > request.limit as usize {
        kvs.truncate(request.limit as usize);
        response.more = true;
    }
    if request.keys_only {
        for kv in &mut kvs {
            kv.value.clear();
        }
    }
    response.kvs = kvs;
    Ok(response)
}

/// Reads the revision counters and rebuilds the key index from stored history.
fn load_state(storage: &Storage) -> Result<IndexState, Error> {
    let mut state = IndexState::default();
    let read_i64 = |key: &[u8], default: i64| -> Result<i64, Error> {
        Ok(storage
            .get(CF_META, key)?
            .and_then(|bytes| bytes.try_into().ok().map(i64::from_be_bytes))
            .unwrap_or(default))
    };
    // As in etcd, an empty store is at revision 1 (the first write makes revision 2)
    // and has never been compacted.
    state.compact_revision = read_i64(meta_key::COMPACT_REVISION, NEVER_COMPACTED)?;
    state.current_revision = read_i64(meta_key::CURRENT_REVISION, INITIAL_REVISION)?;
    for (id, ttl) in storage.leases()? {
        state.leases.insert(id, ttl);
    }
    state.auth = crate::auth::AuthState::load(storage.meta_with_prefix(meta_key::AUTH_PREFIX)?);
    for (key, _) in storage.meta_with_prefix(meta_key::ALARM_PREFIX)? {
        if let (Ok(member), Ok(alarm)) = (
            <[u8; 8]>::try_from(&key[..key.len().min(8)]),
            <[u8; 4]>::try_from(&key[key.len().min(8)..]),
        ) {
            state
                .alarms
                .insert((u64::from_be_bytes(member), i32::from_be_bytes(alarm)));
        }
    }
    // The lease each live key carries, from its newest value.
    let mut lease_of_key: HashMap<Vec<u8>, i64> = HashMap::new();
    let iterator = storage.scan_cf(CF_KV, rocksdb::IteratorMode::Start);
    for item in iterator {
        let (key, value) = item.map_err(|source| crate::storage::Error::Io {
            operation: "scan kv",
            source,
        })?;
        let Some((revision, tombstone)) = Revision::from_key(&key) else {
            return Err(Error::Corrupt {
                revision: Revision::default(),
                reason: format!("malformed revision key {key:?}"),
            });
        };
        state.current_revision = state.current_revision.max(revision.main);
        if tombstone {
            let key = tombstone_key(storage, revision, &value)?;
            lease_of_key.remove(&key);
            state
                .keys
                .entry(key.into_boxed_slice())
                .or_default()
                .tombstone(revision);
            continue;
        }
        let kv = decode_value(revision, Some(value.to_vec()))?;
        if kv.lease != 0 {
            lease_of_key.insert(kv.key.clone(), kv.lease);
        } else {
            lease_of_key.remove(&kv.key);
        }
        let index = state.keys.entry(kv.key.into_boxed_slice()).or_default();
        if !index.is_live() && kv.create_revision != revision.main {
            // Compaction removed the earlier revisions of this generation.
            index.restore(Revision::new(kv.create_revision, 0), revision, kv.version);
        } else {
            index.put(revision);
        }
    }
    for (key, lease) in lease_of_key {
        state.leases.attach(&key, lease);
    }
    Ok(state)
}

impl Mvcc {
    /// Opens the MVCC state kept in `storage`, rebuilding the key index.
    pub fn open(storage: Arc<Storage>) -> Result<Arc<Mvcc>, Error> {
        let state = load_state(&storage)?;
        let auth_enabled = state.auth.enabled();
        Ok(Arc::new(Mvcc {
            storage,
            hub: WatchHub::new(state.current_revision),
            state: RwLock::new(state),
            expiries: Expiries::default(),
            token_ttl: std::sync::atomic::AtomicU64::new(300),
            auth_enabled: std::sync::atomic::AtomicBool::new(auth_enabled),
        }))
    }

    /// Writes `batch`, which replaces the stored history wholesale (a snapshot being
    /// installed), and rebuilds the index from it; readers wait meanwhile. Watchers
    /// catch up from the new history.
    pub fn replace(&self, batch: WriteBatch) -> Result<(), Error> {
        let mut state = self.state.write();
        self.storage.write(batch, true)?;
        *state = load_state(&self.storage)?;
        self.auth_enabled
            .store(state.auth.enabled(), std::sync::atomic::Ordering::Release);
        let current = state.current_revision;
        if let Some(extend) = self.expiries.primary_extension() {
            self.expiries.promote(
                extend,
                state.leases.iter().map(|(id, record)| (id, record.ttl)),
            );
        }
        drop(state);
        self.hub.restore(current);
        Ok(())
    }

    /// How long a simple auth token stays valid without use (`--auth-token-ttl`).
    pub fn token_ttl(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.token_ttl.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// Sets [`Mvcc::token_ttl`].
    pub fn set_token_ttl(&self, ttl: std::time::Duration) {
        self.token_ttl
            .store(ttl.as_secs().max(1), std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether auth is enabled, without taking the index lock.
    pub fn auth_enabled(&self) -> bool {
        self.auth_enabled.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Users, roles and permissions as applied.
    pub fn auth(&self) -> parking_lot::MappedRwLockReadGuard<'_, crate::auth::AuthState> {
        RwLockReadGuard::map(self.state.read(), |state| &state.auth)
    }

    /// Raised alarms: (member ID, alarm type).
    pub fn alarms(&self) -> Vec<(u64, i32)> {
        self.state.read().alarms.iter().copied().collect()
    }

    /// Lease deadlines (kept by the leader).
    pub fn expiries(&self) -> &Expiries {
        &self.expiries
    }

    /// This member became leader: every lease gets its full TTL plus `extend`.
    pub fn promote_leases(&self, extend: std::time::Duration) {
        let state = self.state.read();
        self.expiries.promote(
            extend,
            state.leases.iter().map(|(id, record)| (id, record.ttl)),
        );
    }

    /// A consistent read view of the newest applied revision.
    pub fn read(&self) -> Reader<'_> {
        Reader {
            state: self.state.read(),
            storage: &self.storage,
        }
    }

    /// The exclusive write view used by the apply layer.
    pub fn write(&self) -> Writer<'_> {
        Writer {
            state: self.state.write(),
            mvcc: self,
            storage: &self.storage,
            batch: WriteBatch::default(),
            events: self.hub.has_watchers().then(Vec::new),
            pending_values: HashMap::new(),
            sub_revision: 0,
        }
    }

    /// The newest applied revision.
    pub fn current_revision(&self) -> i64 {
        self.state.read().current_revision
    }

    /// The revision history is compacted at.
    pub fn compact_revision(&self) -> i64 {
        self.state.read().compact_revision
    }

    /// Number of keys live at the newest revision.
    pub fn live_keys(&self) -> usize {
        self.state
            .read()
            .keys
            .values()
            .filter(|index| index.is_live())
            .count()
    }

    /// etcd's HashKV: a CRC-32 over every stored change (key and value) from the
    /// compaction point up to `revision` (0: the newest), equal on members that
    /// applied the same history. Returns (hash, compact revision, hashed revision).
    pub fn hash_kv(&self, revision: i64) -> Result<(u32, i64, i64), Error> {
        let view = self.read();
        let at = read_revision(&view, revision)?;
        let compact = view.compact_revision();
        let mut hasher = crc32fast::Hasher::new();
        let end = Revision::new(at + 1, 0).to_key(false);
        for item in self.storage.scan_cf(CF_KV, rocksdb::IteratorMode::Start) {
            let (key, value) = item.map_err(|source| crate::storage::Error::Io {
                operation: "scan kv for hash",
                source,
            })?;
            if key.as_ref() >= end.as_slice() {
                break;
            }
            hasher.update(&key);
            hasher.update(&value);
        }
        Ok((hasher.finalize(), compact, at))
    }

    /// The storage the values live in.
    pub fn storage(&self) -> &Arc<Storage> {
        &self.storage
    }
}

/// The next change of the revision open above `current_revision`, counting it in
/// `sub_revision`.
fn take_revision(current_revision: i64, sub_revision: &mut i64) -> Revision {
    let revision = Revision::new(current_revision + 1, *sub_revision);
    *sub_revision += 1;
    revision
}

impl Writer<'_> {
    fn next_revision(&mut self) -> Revision {
        take_revision(self.state.current_revision, &mut self.sub_revision)
    }

    /// The live value of `key` as this view sees it.
    pub fn get(&self, key: &[u8]) -> Result<Option<KeyValue>, Error> {
        let at = self.current_revision();
        match self.state.keys.get(key).and_then(|index| index.get(at)) {
            Some(found) => Ok(Some(self.value(found.modified)?)),
            None => Ok(None),
        }
    }

    /// Writes `key` at the next change of the open revision; returns its revision.
    /// Creation revision and version come from the index: no value is read.
    pub fn put(&mut self, key: &[u8], value: Vec<u8>, lease: i64) -> Result<Revision, Error> {
        let at = self.current_revision();
        let revision = self.next_revision();
        // One search of the index for a key it holds (two for a new key): keys can be
        // long, and every comparison on the way down compares them.
        let IndexState { keys, leases, .. } = &mut *self.state;
        let index = match keys.get_mut(key) {
            Some(index) => index,
            None => keys.entry(Box::from(key)).or_default(),
        };
        let previous = index.get(at);
        index.put(revision);
        let kv = KeyValue {
            key: key.to_vec(),
            create_revision: previous.map_or(revision.main, |p| p.created.main),
            mod_revision: revision.main,
            version: previous.map_or(1, |p| p.version + 1),
            value,
            lease,
        };
        leases.attach(key, lease);
        self.batch.put_cf(
            self.storage.cf(CF_KV),
            revision.to_key(false),
            kv.encode_to_vec(),
        );
        if let Some(events) = &mut self.events {
            events.push(Event {
                r#type: EventType::Put as i32,
                kv: Some(kv.clone()),
                prev_kv: None,
            });
        }
        self.pending_values.insert(revision, kv);
        Ok(revision)
    }

    /// Deletes every live key in `range`; returns how many, and their values when
    /// `with_values` (values are read only then: a large delete stays cheap).
    pub fn delete_range(
        &mut self,
        range: &KeyRange,
        with_values: bool,
    ) -> Result<(i64, Vec<KeyValue>), Error> {
        let at = self.current_revision();
        // Values are read before anything changes, so a failed read changes nothing.
        let mut values = Vec::new();
        if with_values {
            let revisions: Vec<Revision> = range
                .iter(&self.state.keys)
                .filter_map(|(_, index)| index.get(at).map(|found| found.modified))
                .collect();
            values.reserve(revisions.len());
            for revision in revisions {
                values.push(self.value(revision)?);
            }
        }
        // One pass over the index, cloning no key: deleting a prefix of a large
        // store must not hold a second copy of its keys.
        let cf = self.storage.cf(CF_KV);
        // `next_revision` cannot be called while the loop borrows the index.
        let current = self.state.current_revision;
        let IndexState { keys, leases, .. } = &mut *self.state;
        let mut deleted = 0;
        for (key, index) in range.iter_mut(keys) {
            let Some(found) = index.get(at) else {
                continue;
            };
            let revision = take_revision(current, &mut self.sub_revision);
            deleted += 1;
            // The tombstone names the value it ends (see `tombstone_key`).
            self.batch
                .put_cf(cf, revision.to_key(true), found.modified.to_key(false));
            index.tombstone(revision);
            leases.detach(key);
            if let Some(events) = &mut self.events {
                events.push(Event {
                    r#type: EventType::Delete as i32,
                    kv: Some(KeyValue {
                        key: key.to_vec(),
                        mod_revision: revision.main,
                        ..Default::default()
                    }),
                    prev_kv: None,
                });
            }
        }
        Ok((deleted, values))
    }

    /// Closes the open store revision; returns the new current revision.
    pub fn end_revision(&mut self) -> i64 {
        if self.sub_revision > 0 {
            self.state.current_revision += 1;
            self.sub_revision = 0;
            let current = self.state.current_revision;
            self.batch.put_cf(
                self.storage.cf(CF_META),
                meta_key::CURRENT_REVISION,
                current.to_be_bytes(),
            );
        }
        self.state.current_revision
    }

    /// Removes history below `at`. Checks are etcd's: `at` must be above the last
    /// compaction and not in the future.
    pub fn compact(&mut self, at: i64) -> Result<(), Error> {
        if at <= self.state.compact_revision {
            return Err(EtcdError::Compacted.into());
        }
        if at > self.state.current_revision {
            return Err(EtcdError::FutureRev.into());
        }
        let mut keep = HashSet::new();
        self.state
            .keys
            .retain(|_, index| !index.compact(at, &mut keep));
        let cf = self.storage.cf(CF_KV);
        let end = Revision::new(at + 1, 0).to_key(false);
        let iterator = self.storage.scan_cf(
            CF_KV,
            rocksdb::IteratorMode::From(&end, rocksdb::Direction::Reverse),
        );
        let mut doomed = Vec::new();
        for item in iterator {
            let (key, _) = item.map_err(|source| crate::storage::Error::Io {
                operation: "scan kv for compaction",
                source,
            })?;
            let Some((revision, _)) = Revision::from_key(&key) else {
                continue;
            };
            if revision.main > at {
                continue;
            }
            if !keep.contains(&revision) {
                doomed.push(key);
            }
        }
        for key in doomed {
            self.batch.delete_cf(cf, key);
        }
        self.state.compact_revision = at;
        self.batch.put_cf(
            self.storage.cf(CF_META),
            meta_key::COMPACT_REVISION,
            at.to_be_bytes(),
        );
        Ok(())
    }

    /// Raises (`active`) or clears an alarm; returns whether anything changed.
    pub fn set_alarm(&mut self, member: u64, alarm: i32, active: bool) -> bool {
        let key = meta_key::alarm(member, alarm);
        let changed = if active {
            self.state.alarms.insert((member, alarm))
        } else {
            self.state.alarms.remove(&(member, alarm))
        };
        if changed {
            let cf = self.storage.cf(CF_META);
            if active {
                self.batch.put_cf(cf, key, b"");
            } else {
                self.batch.delete_cf(cf, key);
            }
        }
        changed
    }

    /// Whether any member raised `alarm`.
    pub fn alarmed(&self, alarm: i32) -> bool {
        self.state.alarms.iter().any(|(_, raised)| *raised == alarm)
    }

    /// How long a simple auth token stays valid without use.
    pub fn token_ttl(&self) -> std::time::Duration {
        self.mvcc.token_ttl()
    }

    /// Changes the auth store with `change`; on success its records are rewritten in
    /// the batch (auth changes are rare and the records few).
    pub fn change_auth<T>(
        &mut self,
        change: impl FnOnce(&mut crate::auth::AuthState) -> Result<T, EtcdError>,
    ) -> Result<T, EtcdError> {
        let result = change(&mut self.state.auth)?;
        // Set before the batch is written: a reader that sees it takes the index
        // lock, which this writer holds until the change is visible.
        self.mvcc.auth_enabled.store(
            self.state.auth.enabled(),
            std::sync::atomic::Ordering::Release,
        );
        let cf = self.storage.cf(CF_META);
        let mut end = meta_key::AUTH_PREFIX.to_vec();
        *end.last_mut().expect("prefix is not empty") += 1;
        self.batch
            .delete_range_cf(cf, meta_key::AUTH_PREFIX, end.as_slice());
        for (key, value) in self.state.auth.records() {
            self.batch
                .put_cf(cf, [meta_key::AUTH_PREFIX, key.as_slice()].concat(), value);
        }
        Ok(result)
    }

    /// Adds a write to the meta column family (member attributes) to the batch.
    pub fn put_meta(&mut self, key: &[u8], value: &[u8]) {
        self.batch.put_cf(self.storage.cf(CF_META), key, value);
    }

    /// Adds a write of the caller's own (applied state, membership) to the batch.
    pub fn batch(&mut self) -> &mut WriteBatch {
        &mut self.batch
    }

    /// Writes the batch, without the WAL: the Raft log is the durable record and
    /// entries not yet flushed here are applied again after a crash (snapshots flush
    /// before the log behind them is purged). Makes the new revisions visible.
    pub fn commit(self) -> Result<(), Error> {
        let Writer {
            state,
            mvcc,
            storage,
            batch,
            events,
            ..
        } = self;
        storage.write_unlogged(batch)?;
        let current = state.current_revision;
        drop(state);
        mvcc.hub.notify(events.as_deref(), current);
        Ok(())
    }

    /// Grants lease `id` with `ttl` seconds.
    pub fn grant_lease(&mut self, id: i64, ttl: i64) -> Result<(), Error> {
        if self.state.leases.get(id).is_some() {
            return Err(EtcdError::LeaseExist.into());
        }
        self.state.leases.insert(id, ttl);
        self.batch.put_cf(
            self.storage.cf(CF_META),
            meta_key::lease(id),
            ttl.to_be_bytes(),
        );
        self.mvcc.expiries.granted(id, ttl);
        Ok(())
    }

    /// Revokes lease `id`, deleting its keys in the open revision.
    pub fn revoke_lease(&mut self, id: i64) -> Result<(), Error> {
        let Some(record) = self.state.leases.get(id).cloned() else {
            return Err(EtcdError::LeaseNotFound.into());
        };
        for key in &record.keys {
            self.delete_range(&KeyRange::Single(key.clone()), false)?;
        }
        self.state.leases.remove(id);
        self.batch
            .delete_cf(self.storage.cf(CF_META), meta_key::lease(id));
        self.mvcc.expiries.revoked(id);
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn open() -> (tempfile::TempDir, Arc<Mvcc>) {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path()).unwrap();
        (dir, Mvcc::open(storage).unwrap())
    }

    pub(crate) fn put(mvcc: &Mvcc, key: &str, value: &str) -> i64 {
        let mut writer = mvcc.write();
        writer
            .put(key.as_bytes(), value.as_bytes().to_vec(), 0)
            .unwrap();
        let revision = writer.end_revision();
        writer.commit().unwrap();
        revision
    }

    /// Deletes `key` (without reading values) in a revision of its own.
    fn delete(mvcc: &Mvcc, key: &str) {
        let mut writer = mvcc.write();
        writer
            .delete_range(&KeyRange::new(key.as_bytes(), b""), false)
            .unwrap();
        writer.end_revision();
        writer.commit().unwrap();
    }

    fn get_at(mvcc: &Mvcc, key: &str, revision: i64) -> Result<Option<KeyValue>, Error> {
        let request = RangeRequest {
            key: key.as_bytes().to_vec(),
            revision,
            ..Default::default()
        };
        Ok(range(&mvcc.read(), &request)?.kvs.into_iter().next())
    }

    #[test]
    fn revisions_versions_and_history() {
        let (_dir, mvcc) = open();
        assert_eq!(mvcc.current_revision(), INITIAL_REVISION);
        assert_eq!(put(&mvcc, "a", "1"), 2);
        assert_eq!(put(&mvcc, "a", "2"), 3);
        let kv = get_at(&mvcc, "a", 0).unwrap().unwrap();
        assert_eq!((kv.create_revision, kv.mod_revision, kv.version), (2, 3, 2));
        assert_eq!(get_at(&mvcc, "a", 2).unwrap().unwrap().value, b"1");
        assert!(get_at(&mvcc, "a", 1).unwrap().is_none());
        assert!(matches!(
            get_at(&mvcc, "a", 4),
            Err(Error::Etcd(EtcdError::FutureRev))
        ));

        let mut writer = mvcc.write();
        let (deleted, values) = writer
            .delete_range(&KeyRange::new(b"a", b""), true)
            .unwrap();
        assert_eq!(deleted, 1);
        assert_eq!(values[0].value, b"2");
        assert_eq!(writer.end_revision(), 4);
        writer.commit().unwrap();
        assert!(get_at(&mvcc, "a", 0).unwrap().is_none());
        assert_eq!(put(&mvcc, "a", "3"), 5);
        let kv = get_at(&mvcc, "a", 0).unwrap().unwrap();
        assert_eq!((kv.create_revision, kv.version), (5, 1));
    }

    #[test]
    fn range_delete_writes_one_tombstone_per_live_key_and_survives_restart() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mvcc = Mvcc::open(Storage::open(dir.path()).unwrap()).unwrap();
            for key in ["p/a", "p/b", "p/c", "q"] {
                put(&mvcc, key, "v");
            }
            delete(&mvcc, "p/b");
            // p/b is already gone: only p/a and p/c are deleted, at 7.0 and 7.1.
            let mut writer = mvcc.write();
            let (deleted, values) = writer
                .delete_range(&KeyRange::new(b"p/", b"p0"), false)
                .unwrap();
            assert_eq!((deleted, values.len()), (2, 0));
            assert_eq!(writer.end_revision(), 7);
            writer.commit().unwrap();
            // Each tombstone names the value it ended: p/a@2, p/c@4.
            for (sub, ended, key) in [(0, 2, "p/a"), (1, 4, "p/c")] {
                let revision = Revision::new(7, sub);
                let stored = mvcc
                    .storage()
                    .get(CF_KV, &revision.to_key(true))
                    .unwrap()
                    .unwrap();
                assert_eq!(stored, Revision::new(ended, 0).to_key(false));
                let resolved = tombstone_key(mvcc.storage(), revision, &stored).unwrap();
                assert_eq!(resolved, key.as_bytes());
            }
            let empty = KeyRange::new(b"z", b"a");
            assert_eq!(mvcc.write().delete_range(&empty, true).unwrap().0, 0);
            // Compaction below the tombstones keeps the values they name.
            let mut writer = mvcc.write();
            writer.compact(6).unwrap();
            writer.commit().unwrap();
        }
        let mvcc = Mvcc::open(Storage::open(dir.path()).unwrap()).unwrap();
        assert_eq!(mvcc.current_revision(), 7);
        assert_eq!(mvcc.live_keys(), 1);
        assert!(get_at(&mvcc, "p/c", 0).unwrap().is_none());
        assert_eq!(get_at(&mvcc, "p/c", 6).unwrap().unwrap().mod_revision, 4);
        assert_eq!(put(&mvcc, "p/a", "again"), 8);
        let kv = get_at(&mvcc, "p/a", 0).unwrap().unwrap();
        assert_eq!((kv.create_revision, kv.version), (8, 1));
    }

    #[test]
    fn compaction_removes_history_and_survives_restart() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mvcc = Mvcc::open(Storage::open(dir.path()).unwrap()).unwrap();
            put(&mvcc, "a", "1");
            put(&mvcc, "a", "2");
            put(&mvcc, "b", "1");
            delete(&mvcc, "b");
            put(&mvcc, "c", "1");
            // History: a@2, a@3, b@4, b deleted@5, c@6.
            let mut writer = mvcc.write();
            writer.compact(5).unwrap();
            writer.commit().unwrap();
            assert!(matches!(
                get_at(&mvcc, "a", 4),
                Err(Error::Etcd(EtcdError::Compacted))
            ));
            assert_eq!(get_at(&mvcc, "a", 5).unwrap().unwrap().value, b"2");
            let mut writer = mvcc.write();
            assert!(matches!(
                writer.compact(5),
                Err(Error::Etcd(EtcdError::Compacted))
            ));
            assert!(matches!(
                writer.compact(9),
                Err(Error::Etcd(EtcdError::FutureRev))
            ));
        }
        let mvcc = Mvcc::open(Storage::open(dir.path()).unwrap()).unwrap();
        assert_eq!(mvcc.current_revision(), 6);
        assert_eq!(mvcc.compact_revision(), 5);
        let kv = get_at(&mvcc, "a", 0).unwrap().unwrap();
        assert_eq!(
            (kv.value.as_slice(), kv.create_revision, kv.version),
            (&b"2"[..], 2, 2)
        );
        assert!(get_at(&mvcc, "b", 0).unwrap().is_none());
        assert_eq!(mvcc.live_keys(), 2);
        // Only a@3 and c@6 remain on disk: a@2, b@4 and its tombstone are gone.
        let stored = mvcc
            .storage()
            .db()
            .iterator_cf(mvcc.storage().cf(CF_KV), rocksdb::IteratorMode::Start)
            .count();
        assert_eq!(stored, 2);
        assert_eq!(put(&mvcc, "a", "3"), 7);
        assert_eq!(get_at(&mvcc, "a", 0).unwrap().unwrap().version, 3);
    }

    #[test]
    fn leases_and_their_keys_survive_restart() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mvcc = Mvcc::open(Storage::open(dir.path()).unwrap()).unwrap();
            let mut writer = mvcc.write();
            writer.grant_lease(5, 60).unwrap();
            writer.grant_lease(6, 30).unwrap();
            assert!(matches!(
                writer.grant_lease(5, 10),
                Err(Error::Etcd(EtcdError::LeaseExist))
            ));
            writer.put(b"a", b"1".to_vec(), 5).unwrap();
            writer.put(b"b", b"1".to_vec(), 5).unwrap();
            writer.put(b"c", b"1".to_vec(), 6).unwrap();
            writer.end_revision();
            writer.commit().unwrap();
            // "b" moves to no lease, "c" is deleted.
            put(&mvcc, "b", "2");
            delete(&mvcc, "c");
        }
        let mvcc = Mvcc::open(Storage::open(dir.path()).unwrap()).unwrap();
        {
            let view = mvcc.read();
            let five = view.leases().get(5).unwrap();
            assert_eq!(five.ttl, 60);
            assert_eq!(five.keys.iter().collect::<Vec<_>>(), vec![&b"a".to_vec()]);
            assert!(view.leases().get(6).unwrap().keys.is_empty());
        }
        // Revoking deletes the attached keys in one revision.
        let before = mvcc.current_revision();
        let mut writer = mvcc.write();
        writer.revoke_lease(5).unwrap();
        assert_eq!(writer.end_revision(), before + 1);
        writer.commit().unwrap();
        assert!(get_at(&mvcc, "a", 0).unwrap().is_none());
        assert!(get_at(&mvcc, "b", 0).unwrap().is_some());
        let mut writer = mvcc.write();
        assert!(matches!(
            writer.revoke_lease(5),
            Err(Error::Etcd(EtcdError::LeaseNotFound))
        ));
        drop(writer);
        let reopened = Mvcc::open(mvcc.storage().clone());
        drop(mvcc);
        let reopened = reopened.unwrap();
        assert!(reopened.read().leases().get(5).is_none());
    }

    #[test]
    fn range_limit_sort_and_count() {
        let (_dir, mvcc) = open();
        put(&mvcc, "k1", "c");
        put(&mvcc, "k2", "a");
        put(&mvcc, "k3", "b");
        put(&mvcc, "l", "z");
        let request = RangeRequest {
            key: b"k".to_vec(),
            range_end: b"l".to_vec(),
            limit: 2,
            ..Default::default()
        };
        let response = range(&mvcc.read(), &request).unwrap();
        assert_eq!(response.kvs.len(), 2);
        assert!(response.more);
        assert_eq!(response.count, 3);

        let request = RangeRequest {
            key: b"k".to_vec(),
            range_end: b"l".to_vec(),
            sort_target: SortTarget::Value as i32,
            sort_order: SortOrder::Descend as i32,
            ..Default::default()
        };
        let keys: Vec<_> = range(&mvcc.read(), &request)
            .unwrap()
            .kvs
            .into_iter()
            .map(|kv| kv.key)
            .collect();
        assert_eq!(keys, vec![b"k1".to_vec(), b"k3".to_vec(), b"k2".to_vec()]);

        let inverted = RangeRequest {
            key: b"l".to_vec(),
            range_end: b"k".to_vec(),
            ..Default::default()
        };
        assert_eq!(range(&mvcc.read(), &inverted).unwrap().count, 0);
        let from_key = RangeRequest {
            key: b"k3".to_vec(),
            range_end: vec![0],
            count_only: true,
            ..Default::default()
        };
        let response = range(&mvcc.read(), &from_key).unwrap();
        assert_eq!((response.count, response.kvs.len()), (2, 0));
    }
}
