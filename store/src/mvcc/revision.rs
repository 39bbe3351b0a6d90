//! Revisions and their on-disk key encoding: 8 big-endian bytes of the main revision,
//! `_`, 8 big-endian bytes of the sub revision, and a trailing `t` for a tombstone.
//! Big-endian keeps RocksDB's byte order equal to revision order.

/// A point in the store's history: `main` is the store revision of a Put, DeleteRange
/// or Txn; `sub` orders the changes made inside it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Revision {
    /// The store revision.
    pub main: i64,
    /// The change's position inside its store revision.
    pub sub: i64,
}

/// Length of an encoded revision without the tombstone mark.
pub const REVISION_KEY_LEN: usize = 17;
const TOMBSTONE_MARK: u8 = b't';

impl Revision {
    /// A revision.
    pub fn new(main: i64, sub: i64) -> Revision {
        Revision { main, sub }
    }

    /// The storage key of this revision; `tombstone` marks a deletion.
    pub fn to_key(self, tombstone: bool) -> Vec<u8> {
        let mut key = Vec::with_capacity(REVISION_KEY_LEN + 1);
        key.extend_from_slice(&self.main.to_be_bytes());
        key.push(b'_');
        key.extend_from_slice(&self.sub.to_be_bytes());
        if tombstone {
            key.push(TOMBSTONE_MARK);
        }
        key
    }

    /// Decodes a storage key into its revision and tombstone mark.
    pub fn from_key(key: &[u8]) -> Option<(Revision, bool)> {
        let tombstone = match key.len() {
            REVISION_KEY_LEN => false,
            len if len == REVISION_KEY_LEN + 1 && key[REVISION_KEY_LEN] == TOMBSTONE_MARK => true,
            _ => return None,
        };
        if key[8] != b'_' {
            return None;
        }
        let main = i64::from_be_bytes(key[0..8].try_into().ok()?);
        let sub = i64::from_be_bytes(key[9..17].try_into().ok()?);
        Some((Revision { main, sub }, tombstone))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        for (revision, tombstone) in [
            (Revision::new(1, 0), false),
            (Revision::new(5, 3), true),
            (Revision::new(i64::MAX, 7), false),
        ] {
            let key = revision.to_key(tombstone);
            assert_eq!(Revision::from_key(&key), Some((revision, tombstone)));
        }
    }

    #[test]
    fn byte_order_is_revision_order() {
        let revisions = [
            Revision::new(1, 0),
            Revision::new(1, 1),
            Revision::new(2, 0),
            Revision::new(256, 0),
            Revision::new(257, 9),
            Revision::new(1 << 40, 0),
        ];
        for pair in revisions.windows(2) {
            assert!(pair[0].to_key(false) < pair[1].to_key(false));
            assert!(pair[0].to_key(true) < pair[1].to_key(false));
        }
    }

    #[test]
    fn rejects_malformed_keys() {
        assert_eq!(Revision::from_key(b"short"), None);
        let mut key = Revision::new(1, 1).to_key(false);
        key[8] = b'x';
        assert_eq!(Revision::from_key(&key), None);
        let mut key = Revision::new(1, 1).to_key(false);
        key.push(b'q');
        assert_eq!(Revision::from_key(&key), None);
    }
}
