//! Reads a snapshot written by etcd (`etcdctl snapshot save` against etcd: its bbolt
//! database file) so that `kvstore snapshot restore` can move an etcd cluster's data
//! to kvstore. The keys' history, revisions, compaction point, leases, users and
//! roles (with their bcrypt hashes) and whether auth is enabled come over; etcd's
//! members, alarms and cluster version do not (restore sets the membership).
//!
//! The bbolt format, as far as this reader needs it: two meta pages at the start
//! (the valid one with the higher transaction id wins) name the root bucket's page;
//! buckets are B+trees of branch and leaf pages; a bucket with no pages of its own
//! is stored inline in its parent's leaf value. Integers are little-endian.

use std::collections::HashMap;

use prost::Message;

use crate::mvcc::Revision;
use crate::pb::mvccpb::KeyValue;

const MAGIC: u32 = 0xED0C_DAED;
const VERSION: u32 = 2;
const PAGE_HEADER: usize = 16;
const ELEMENT: usize = 16;
const BRANCH_PAGE: u16 = 0x01;
const LEAF_PAGE: u16 = 0x02;
const BUCKET_LEAF: u32 = 0x01;

/// What an etcd snapshot holds that kvstore restores.
pub struct EtcdSnapshot {
    /// (revision key, value) in kvstore's form, in revision order.
    pub records: Vec<(Vec<u8>, Vec<u8>)>,
    /// The revision of the last write.
    pub current_revision: i64,
    /// The revision up to which history was compacted.
    pub compact_revision: i64,
    /// Granted leases: (ID, TTL in seconds).
    pub leases: Vec<(i64, i64)>,
    /// The auth store as kvstore's meta records (full keys).
    pub auth: Vec<(Vec<u8>, Vec<u8>)>,
}

/// etcd's `leasepb.Lease`.
#[derive(Clone, PartialEq, Message)]
struct Lease {
    #[prost(int64, tag = "1")]
    id: i64,
    #[prost(int64, tag = "2")]
    ttl: i64,
}

fn u16_at(bytes: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(bytes.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(bytes: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?))
}

fn u64_at(bytes: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(bytes.get(at..at + 8)?.try_into().ok()?))
}

/// Whether `bytes` begins like a bbolt database.
pub fn is_bbolt(bytes: &[u8]) -> bool {
    u32_at(bytes, PAGE_HEADER) == Some(MAGIC)
}

/// A bbolt file being read: its bytes and page size.
struct Db<'a> {
    bytes: &'a [u8],
    page_size: usize,
    /// Pages visited so far: a damaged tree that points back into itself must not
    /// make the walk endless.
    visited: std::cell::Cell<usize>,
}

/// A page: the bytes from its header to the end of its overflow pages (or of an
/// inline bucket's value).
type Page<'a> = &'a [u8];

impl<'a> Db<'a> {
    fn open(bytes: &'a [u8]) -> Result<(Db<'a>, u64), String> {
        let meta = |offset: usize| -> Option<(usize, u64, u64)> {
            let meta = bytes.get(offset + PAGE_HEADER..offset + PAGE_HEADER + 64)?;
            if u32_at(meta, 0)? != MAGIC || u32_at(meta, 4)? != VERSION {
                return None;
            }
            // FNV-1a 64 of the fields before the checksum.
            let checksum = meta[..56]
                .iter()
                .fold(0xcbf2_9ce4_8422_2325u64, |hash, byte| {
                    (hash ^ u64::from(*byte)).wrapping_mul(0x0000_0100_0000_01b3)
                });
            if checksum != u64_at(meta, 56)? {
                return None;
            }
            let page_size = u32_at(meta, 8)? as usize;
            Some((page_size, u64_at(meta, 16)?, u64_at(meta, 48)?))
        };
        let first = meta(0);
        let page_size = first
            .map(|(size, _, _)| size)
            .or_else(|| Some(u32_at(bytes, PAGE_HEADER + 8)? as usize))
            .filter(|size| (512..=1 << 20).contains(size))
            .ok_or("not a bbolt database: no valid meta page")?;
        let second = meta(page_size);
        let (_, root, _) = [first, second]
            .into_iter()
            .flatten()
            .max_by_key(|(_, _, txid)| *txid)
            .ok_or("not a bbolt database: no valid meta page")?;
        let db = Db {
            bytes,
            page_size,
            visited: std::cell::Cell::new(0),
        };
        Ok((db, root))
    }

    fn page(&self, id: u64) -> Result<Page<'a>, String> {
        let start = usize::try_from(id)
            .ok()
            .and_then(|id| id.checked_mul(self.page_size))
            .filter(|start| start + PAGE_HEADER <= self.bytes.len())
            .ok_or(format!("page {id} is beyond the end of the file"))?;
        let overflow = u32_at(self.bytes, start + 12).unwrap_or(0) as usize;
        let end = (start + (overflow + 1) * self.page_size).min(self.bytes.len());
        Ok(&self.bytes[start..end])
    }

    /// Calls `visit` with every (flags, key, value) of the bucket whose pages start at
    /// `page`, in key order.
    fn walk(
        &self,
        page: Page<'a>,
        depth: usize,
        visit: &mut dyn FnMut(u32, &'a [u8], &'a [u8]) -> Result<(), String>,
    ) -> Result<(), String> {
        self.visited.set(self.visited.get() + 1);
        if depth > 64 || self.visited.get() > 2 * (self.bytes.len() / self.page_size) + 64 {
            return Err("damaged bucket tree: it points back into itself".into());
        }
        let corrupt = || "corrupt page".to_string();
        let flags = u16_at(page, 8).ok_or_else(corrupt)?;
        let count = usize::from(u16_at(page, 10).ok_or_else(corrupt)?);
        for index in 0..count {
            let element = PAGE_HEADER + index * ELEMENT;
            match flags {
                BRANCH_PAGE => {
                    let child = u64_at(page, element + 8).ok_or_else(corrupt)?;
                    self.walk(self.page(child)?, depth + 1, visit)?;
                }
                LEAF_PAGE => {
                    let kind = u32_at(page, element).ok_or_else(corrupt)?;
                    let position =
                        element + u32_at(page, element + 4).ok_or_else(corrupt)? as usize;
                    let key_size = u32_at(page, element + 8).ok_or_else(corrupt)? as usize;
                    let value_size = u32_at(page, element + 12).ok_or_else(corrupt)? as usize;
                    let key = page
                        .get(position..position + key_size)
                        .ok_or_else(corrupt)?;
                    let value = page
                        .get(position + key_size..position + key_size + value_size)
                        .ok_or_else(corrupt)?;
                    visit(kind, key, value)?;
                }
                other => return Err(format!("unexpected page type {other:#x} in a bucket")),
            }
        }
        Ok(())
    }

    /// The first page of a bucket, from its value in the parent bucket.
    fn bucket(&self, value: &'a [u8]) -> Result<Page<'a>, String> {
        let root = u64_at(value, 0).ok_or("corrupt bucket header")?;
        if root == 0 {
            // An inline bucket: its page follows the 16-byte header.
            value
                .get(16..)
                .ok_or_else(|| "corrupt inline bucket".into())
        } else {
            self.page(root)
        }
    }

    /// The top-level buckets by name.
    fn buckets(&self, root: u64) -> Result<HashMap<&'a [u8], Page<'a>>, String> {
        let mut buckets = HashMap::new();
        self.walk(self.page(root)?, 0, &mut |kind, key, value| {
            if kind & BUCKET_LEAF != 0 {
                buckets.insert(key, self.bucket(value)?);
            }
            Ok(())
        })?;
        Ok(buckets)
    }
}

/// Reads an etcd snapshot (a bbolt file; a trailing hash is ignored).
pub fn read(bytes: &[u8]) -> Result<EtcdSnapshot, String> {
    let (db, root) = Db::open(bytes)?;
    let buckets = db.buckets(root)?;
    let mut snapshot = EtcdSnapshot {
        records: Vec::new(),
        current_revision: 0,
        compact_revision: 0,
        leases: Vec::new(),
        auth: Vec::new(),
    };
    // etcd's auth buckets hold the same authpb records kvstore keeps under its auth
    // prefix; they are decoded here only to refuse damaged ones.
    let prefix = crate::storage::meta_key::AUTH_PREFIX;
    for (bucket, kind) in [(&b"authUsers"[..], "user/"), (b"authRoles", "role/")] {
        if let Some(page) = buckets.get(bucket) {
            db.walk(page, 0, &mut |_, name, value| {
                let valid = match kind {
                    "user/" => crate::pb::authpb::User::decode(value).is_ok(),
                    _ => crate::pb::authpb::Role::decode(value).is_ok(),
                };
                if !valid {
                    return Err(format!("corrupt {kind}{}", String::from_utf8_lossy(name)));
                }
                let key = [prefix, kind.as_bytes(), name].concat();
                snapshot.auth.push((key, value.to_vec()));
                Ok(())
            })?;
        }
    }
    if let Some(auth) = buckets.get(&b"auth"[..]) {
        db.walk(auth, 0, &mut |_, key, value| {
            match key {
                b"authEnabled" => snapshot
                    .auth
                    .push(([prefix, b"enabled"].concat(), vec![u8::from(value == [1])])),
                b"authRevision" => {
                    let revision: [u8; 8] = value.try_into().map_err(|_| "corrupt authRevision")?;
                    snapshot
                        .auth
                        .push(([prefix, b"revision"].concat(), revision.to_vec()));
                }
                _ => {}
            }
            Ok(())
        })?;
    }
    if let Some(meta) = buckets.get(&b"meta"[..]) {
        db.walk(meta, 0, &mut |_, key, value| {
            if key == b"finishedCompactRev" {
                let (revision, _) = Revision::from_key(value)
                    .ok_or("corrupt finishedCompactRev in the meta bucket")?;
                snapshot.compact_revision = revision.main;
            }
            Ok(())
        })?;
    }
    if let Some(leases) = buckets.get(&b"lease"[..]) {
        db.walk(leases, 0, &mut |_, _, value| {
            let lease = Lease::decode(value).map_err(|e| format!("corrupt lease: {e}"))?;
            snapshot.leases.push((lease.id, lease.ttl));
            Ok(())
        })?;
    }
    // kvstore's tombstone holds the revision key of the value it ends, where etcd's
    // holds the key itself: the last value of each key is remembered on the way.
    let mut last_value: HashMap<Vec<u8>, Vec<u8>> = HashMap::new();
    let keys = buckets
        .get(&b"key"[..])
        .ok_or("not an etcd snapshot: no key bucket")?;
    db.walk(keys, 0, &mut |_, key, value| {
        let (revision, tombstone) = Revision::from_key(key)
            .ok_or_else(|| format!("corrupt revision key {key:?} in the key bucket"))?;
        snapshot.current_revision = snapshot.current_revision.max(revision.main);
        let kv = KeyValue::decode(value)
            .map_err(|e| format!("corrupt value at revision {}: {e}", revision.main))?;
        if tombstone {
            // A tombstone whose value was compacted away hides nothing left.
            if let Some(ended) = last_value.remove(&kv.key) {
                snapshot.records.push((key.to_vec(), ended));
            }
        } else {
            last_value.insert(kv.key, key.to_vec());
            snapshot.records.push((key.to_vec(), value.to_vec()));
        }
        Ok(())
    })?;
    snapshot.current_revision = snapshot.current_revision.max(snapshot.compact_revision);
    Ok(snapshot)
}
