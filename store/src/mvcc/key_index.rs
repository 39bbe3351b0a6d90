//! The in-memory history of one key: its generations (a life from creation to
//! deletion) and the revisions that changed it. Knows nothing of values or storage.

use std::collections::HashSet;

use smallvec::SmallVec;

use super::revision::Revision;

/// The revisions of a generation. Most keys are written once per generation, so one
/// is kept inline: the index holds every key of the store in memory, and a heap
/// allocation per key and generation would double its size.
pub type Revisions = SmallVec<[Revision; 1]>;

/// One life of a key: created at `created`, changed at each of `revisions`; when it is
/// closed, its last revision is the tombstone that ended it. Never empty.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Generation {
    /// Changes made in this generation, tombstone included.
    pub version: i64,
    /// The revision that created the key in this generation.
    pub created: Revision,
    /// The revisions still kept, oldest first.
    pub revisions: Revisions,
}

/// What the index knows of a key at a revision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyAt {
    /// The revision holding the key's value at that point.
    pub modified: Revision,
    /// The revision that created the key's current generation.
    pub created: Revision,
    /// The key's version at that point.
    pub version: i64,
}

/// The history of one key.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyIndex {
    /// Generations, oldest first. All but the last end with their tombstone; the last
    /// one does when `closed`. One is kept inline, as for [`Revisions`]: a deleted key
    /// keeps a single closed generation instead of opening an empty one, so deleting
    /// a large prefix allocates nothing per key.
    pub generations: SmallVec<[Generation; 1]>,
    /// Whether the last generation ended with a tombstone.
    pub closed: bool,
}

impl KeyIndex {
    /// Records a put at `revision`.
    pub fn put(&mut self, revision: Revision) {
        if self.closed || self.generations.is_empty() {
            self.generations.push(Generation::default());
            self.closed = false;
        }
        let generation = self
            .generations
            .last_mut()
            .expect("a generation was just ensured");
        if generation.revisions.is_empty() {
            generation.created = revision;
        }
        generation.revisions.push(revision);
        generation.version += 1;
    }

    /// Rebuilds the index entry of a key from a stored value whose earlier history may
    /// have been compacted away.
    pub fn restore(&mut self, created: Revision, modified: Revision, version: i64) {
        self.generations = smallvec::smallvec![Generation {
            version,
            created,
            revisions: smallvec::smallvec![modified],
        }];
        self.closed = false;
    }

    /// Records a deletion at `revision`; returns false when the key is not live.
    pub fn tombstone(&mut self, revision: Revision) -> bool {
        if !self.is_live() {
            return false;
        }
        self.put(revision);
        self.closed = true;
        true
    }

    /// Whether the key exists at the newest revision.
    pub fn is_live(&self) -> bool {
        !self.closed && self.generations.last().is_some()
    }

    /// Whether the generation at `position` ended with a tombstone.
    fn is_closed(&self, position: usize) -> bool {
        position + 1 < self.generations.len() || self.closed
    }

    /// The key as it was at store revision `at`, or None if it did not exist then.
    pub fn get(&self, at: i64) -> Option<KeyAt> {
        for (position, generation) in self.generations.iter().enumerate().rev() {
            let newest = generation.revisions.last()?;
            if self.is_closed(position) && newest.main <= at {
                // The tombstone that closed this generation came at or before `at`.
                return None;
            }
            let oldest = generation.revisions[0];
            if oldest.main > at {
                continue;
            }
            let index = generation.revisions.partition_point(|r| r.main <= at) - 1;
            let newer = (generation.revisions.len() - 1 - index) as i64;
            return Some(KeyAt {
                modified: generation.revisions[index],
                created: generation.created,
                version: generation.version - newer,
            });
        }
        None
    }

    /// Drops history below store revision `at`, keeping the revision that gives the
    /// key's value at `at`. Every revision this index still needs at or below `at` is
    /// added to `keep`. Returns true when nothing of the key remains.
    pub fn compact(&mut self, at: i64, keep: &mut HashSet<Revision>) -> bool {
        // Generations whose tombstone is at or below `at` are gone, tombstone and all.
        let mut first = 0;
        while first < self.generations.len() && self.is_closed(first) {
            let tombstone = self.generations[first]
                .revisions
                .last()
                .expect("a closed generation holds its tombstone");
            if tombstone.main > at {
                break;
            }
            first += 1;
        }
        if first == self.generations.len() {
            self.generations.clear();
            self.closed = false;
            return true;
        }
        let generation = &mut self.generations[first];
        if let Some(index) = generation.revisions.iter().rposition(|r| r.main <= at) {
            keep.insert(generation.revisions[index]);
            generation.revisions.drain(..index);
        }
        self.generations.drain(..first);
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rev(main: i64) -> Revision {
        Revision::new(main, 0)
    }

    /// put@2, put@4, delete@6, put@8, put@10
    fn history() -> KeyIndex {
        let mut index = KeyIndex::default();
        index.put(rev(2));
        index.put(rev(4));
        assert!(index.tombstone(rev(6)));
        index.put(rev(8));
        index.put(rev(10));
        index
    }

    #[test]
    fn get_walks_generations() {
        let index = history();
        assert_eq!(index.get(1), None);
        let at3 = index.get(3).unwrap();
        assert_eq!(
            (at3.modified, at3.created, at3.version),
            (rev(2), rev(2), 1)
        );
        let at5 = index.get(5).unwrap();
        assert_eq!(
            (at5.modified, at5.created, at5.version),
            (rev(4), rev(2), 2)
        );
        assert_eq!(index.get(6), None);
        assert_eq!(index.get(7), None);
        let at9 = index.get(9).unwrap();
        assert_eq!(
            (at9.modified, at9.created, at9.version),
            (rev(8), rev(8), 1)
        );
        let at100 = index.get(100).unwrap();
        assert_eq!((at100.modified, at100.version), (rev(10), 2));
        assert!(index.is_live());
    }

    #[test]
    fn tombstone_of_deleted_key_is_refused() {
        let mut index = KeyIndex::default();
        index.put(rev(1));
        assert!(index.tombstone(rev(2)));
        assert!(!index.tombstone(rev(3)));
        assert!(!index.is_live());
    }

    #[test]
    fn deleted_key_keeps_one_closed_generation_inline() {
        let mut index = KeyIndex::default();
        index.put(rev(1));
        assert!(index.tombstone(rev(2)));
        assert_eq!(index.generations.len(), 1);
        assert!(!index.generations.spilled());
        assert_eq!(index.get(1).unwrap().modified, rev(1));
        assert_eq!(index.get(2), None);
        index.put(rev(3));
        assert!(index.is_live());
        assert_eq!(index.generations.len(), 2);
        assert_eq!(index.get(2), None);
        let at3 = index.get(3).unwrap();
        assert_eq!((at3.created, at3.version), (rev(3), 1));
    }

    #[test]
    fn compact_keeps_value_at_compaction_point() {
        let mut index = history();
        let mut keep = HashSet::new();
        assert!(!index.compact(5, &mut keep));
        assert_eq!(keep, HashSet::from([rev(4)]));
        assert_eq!(index.get(5).unwrap().modified, rev(4));
        assert_eq!(index.get(5).unwrap().version, 2);
        assert_eq!(index.get(9).unwrap().modified, rev(8));
    }

    #[test]
    fn compact_past_tombstone_drops_generation() {
        let mut index = history();
        let mut keep = HashSet::new();
        assert!(!index.compact(7, &mut keep));
        assert!(keep.is_empty());
        assert_eq!(index.generations.len(), 1);
        assert_eq!(index.get(7), None);
        assert_eq!(index.get(8).unwrap().modified, rev(8));

        let mut keep = HashSet::new();
        assert!(!index.compact(10, &mut keep));
        assert_eq!(keep, HashSet::from([rev(10)]));
        assert_eq!(index.generations[0].revisions.as_slice(), [rev(10)]);
        assert_eq!(index.get(10).unwrap().version, 2);
    }

    #[test]
    fn compact_of_deleted_key_empties_it() {
        let mut index = KeyIndex::default();
        index.put(rev(1));
        index.tombstone(rev(2));
        let mut keep = HashSet::new();
        assert!(index.compact(2, &mut keep));
        assert!(keep.is_empty());
    }

    #[test]
    fn compact_exactly_at_tombstone_keeps_nothing() {
        let mut index = KeyIndex::default();
        index.put(rev(1));
        index.put(rev(3));
        index.tombstone(rev(5));
        index.put(rev(7));
        let mut keep = HashSet::new();
        assert!(!index.compact(5, &mut keep));
        assert!(keep.is_empty());
        assert_eq!(index.get(5), None);
        assert_eq!(index.get(7).unwrap().modified, rev(7));
    }

    #[test]
    fn restore_gives_version_of_stored_value() {
        let mut index = KeyIndex::default();
        index.restore(rev(3), rev(9), 4);
        let at = index.get(9).unwrap();
        assert_eq!((at.created, at.version), (rev(3), 4));
        assert_eq!(index.get(8), None);
    }
}
