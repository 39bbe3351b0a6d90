//! Leases. Two halves, as in etcd's lessor:
//! - [`LeaseTable`]: which leases exist, their granted TTL and the keys attached to
//!   them. Changed only by the apply layer, so it is the same on every member, and
//!   persisted with the MVCC state.
//! - [`Expiries`]: when each lease expires. Only the leader (the "primary") keeps
//!   deadlines; they are local, never replicated, and refreshed to a full TTL plus an
//!   election timeout whenever a member becomes leader, so a failover never expires a
//!   lease its holder kept alive.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// The largest TTL etcd grants, in seconds.
pub const MAX_LEASE_TTL: i64 = 9_000_000_000;

/// One lease as the state machine knows it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LeaseRecord {
    /// The granted TTL in seconds.
    pub ttl: i64,
    /// Keys attached to the lease, in key order.
    pub keys: BTreeSet<Vec<u8>>,
}

/// The replicated lease state: leases and the keys attached to them.
#[derive(Debug, Default)]
pub struct LeaseTable {
    leases: HashMap<i64, LeaseRecord>,
    key_lease: HashMap<Vec<u8>, i64>,
}

impl LeaseTable {
    /// The lease `id`, if granted and not revoked.
    pub fn get(&self, id: i64) -> Option<&LeaseRecord> {
        self.leases.get(&id)
    }

    /// Every lease with its record.
    pub fn iter(&self) -> impl Iterator<Item = (i64, &LeaseRecord)> {
        self.leases.iter().map(|(id, record)| (*id, record))
    }

    /// Records a granted lease.
    pub fn insert(&mut self, id: i64, ttl: i64) {
        self.leases.insert(
            id,
            LeaseRecord {
                ttl,
                keys: BTreeSet::new(),
            },
        );
    }

    /// Removes a lease and returns its record (its keys are the caller's to delete).
    pub fn remove(&mut self, id: i64) -> Option<LeaseRecord> {
        let record = self.leases.remove(&id)?;
        for key in &record.keys {
            self.key_lease.remove(key);
        }
        Some(record)
    }

    /// `key` now carries `lease` (0: none); it leaves the lease it had before.
    pub fn attach(&mut self, key: &[u8], lease: i64) {
        if self.key_lease.is_empty() && lease == 0 {
            return;
        }
        let previous = if lease == 0 {
            self.key_lease.remove(key)
        } else {
            self.key_lease.insert(key.to_vec(), lease)
        };
        if let Some(previous) = previous {
            if previous != lease {
                if let Some(record) = self.leases.get_mut(&previous) {
                    record.keys.remove(key);
                }
            }
        }
        if lease != 0 {
            if let Some(record) = self.leases.get_mut(&lease) {
                record.keys.insert(key.to_vec());
            }
        }
    }

    /// `key` was deleted: it leaves its lease.
    pub fn detach(&mut self, key: &[u8]) {
        self.attach(key, 0);
    }
}

#[derive(Default)]
struct ExpiryState {
    primary: bool,
    /// What a promotion adds to every TTL.
    extend: Duration,
    deadlines: HashMap<i64, Instant>,
}

/// Lease deadlines, kept by the leader only.
#[derive(Default)]
pub struct Expiries {
    state: Mutex<ExpiryState>,
}

/// Why a lease could not be renewed or read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpiryError {
    /// This member is not the leader: it keeps no deadlines.
    NotPrimary,
    /// The lease has expired or does not exist.
    NotFound,
}

impl Expiries {
    /// A lease was granted with `ttl` seconds.
    pub fn granted(&self, id: i64, ttl: i64) {
        let mut state = self.state.lock();
        if state.primary {
            state.deadlines.insert(id, Instant::now() + seconds(ttl));
        }
    }

    /// A lease was revoked.
    pub fn revoked(&self, id: i64) {
        self.state.lock().deadlines.remove(&id);
    }

    /// This member became leader: every lease gets a full TTL plus `extend`.
    pub fn promote(&self, extend: Duration, leases: impl Iterator<Item = (i64, i64)>) {
        let now = Instant::now();
        let mut state = self.state.lock();
        state.primary = true;
        state.extend = extend;
        state.deadlines = leases
            .map(|(id, ttl)| (id, now + seconds(ttl) + extend))
            .collect();
    }

    /// This member stopped leading: it forgets all deadlines.
    pub fn demote(&self) {
        let mut state = self.state.lock();
        state.primary = false;
        state.deadlines.clear();
    }

    /// Whether this member keeps deadlines.
    pub fn is_primary(&self) -> bool {
        self.state.lock().primary
    }

    /// The extension of the last promotion, if this member is primary.
    pub fn primary_extension(&self) -> Option<Duration> {
        let state = self.state.lock();
        state.primary.then_some(state.extend)
    }

    /// Renews lease `id` (granted `ttl` seconds) from now.
    pub fn renew(&self, id: i64, ttl: i64) -> Result<(), ExpiryError> {
        let now = Instant::now();
        let mut state = self.state.lock();
        if !state.primary {
            return Err(ExpiryError::NotPrimary);
        }
        match state.deadlines.get_mut(&id) {
            Some(deadline) if *deadline > now => {
                *deadline = now + seconds(ttl);
                Ok(())
            }
            _ => Err(ExpiryError::NotFound),
        }
    }

    /// Time left on lease `id`.
    pub fn remaining(&self, id: i64) -> Result<Duration, ExpiryError> {
        let state = self.state.lock();
        if !state.primary {
            return Err(ExpiryError::NotPrimary);
        }
        let deadline = state.deadlines.get(&id).ok_or(ExpiryError::NotFound)?;
        Ok(deadline.saturating_duration_since(Instant::now()))
    }

    /// The deadline of lease `id`, for ordering listings.
    pub fn deadline(&self, id: i64) -> Option<Instant> {
        self.state.lock().deadlines.get(&id).copied()
    }

    /// Leases whose deadline has passed, oldest first, at most `limit`.
    pub fn expired(&self, limit: usize) -> Vec<i64> {
        let now = Instant::now();
        let state = self.state.lock();
        if !state.primary {
            return Vec::new();
        }
        let mut expired: Vec<(Instant, i64)> = state
            .deadlines
            .iter()
            .filter(|(_, deadline)| **deadline <= now)
            .map(|(id, deadline)| (*deadline, *id))
            .collect();
        expired.sort_unstable();
        expired.truncate(limit);
        expired.into_iter().map(|(_, id)| id).collect()
    }
}

fn seconds(ttl: i64) -> Duration {
    Duration::from_secs(ttl.clamp(0, MAX_LEASE_TTL) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_move_between_leases() {
        let mut table = LeaseTable::default();
        table.insert(1, 10);
        table.insert(2, 10);
        table.attach(b"a", 1);
        table.attach(b"b", 1);
        table.attach(b"a", 2);
        assert_eq!(table.get(1).unwrap().keys.len(), 1);
        assert!(table.get(2).unwrap().keys.contains(b"a".as_slice()));
        table.detach(b"b");
        assert!(table.get(1).unwrap().keys.is_empty());
        let removed = table.remove(2).unwrap();
        assert_eq!(removed.keys.len(), 1);
        // "a" no longer names lease 2: attaching it elsewhere touches nothing else.
        table.attach(b"a", 1);
        assert_eq!(table.get(1).unwrap().keys.len(), 1);
    }

    #[test]
    fn only_the_primary_keeps_deadlines() {
        let expiries = Expiries::default();
        expiries.granted(7, 5);
        assert_eq!(expiries.renew(7, 5), Err(ExpiryError::NotPrimary));
        expiries.promote(Duration::from_secs(1), [(7, 5)].into_iter());
        let left = expiries.remaining(7).unwrap();
        assert!(left > Duration::from_secs(5) && left <= Duration::from_secs(6));
        expiries.renew(7, 5).unwrap();
        assert!(expiries.remaining(7).unwrap() <= Duration::from_secs(5));
        expiries.granted(8, 0);
        assert_eq!(expiries.expired(10), vec![8]);
        assert_eq!(expiries.renew(8, 0), Err(ExpiryError::NotFound));
        expiries.demote();
        assert!(expiries.expired(10).is_empty());
    }
}
