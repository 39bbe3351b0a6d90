//! Member and cluster IDs derived as etcd derives them, so that the same flags give
//! the same IDs as etcd and clusters started with different tokens never share IDs.

use sha1::{Digest, Sha1};

fn first_eight_bytes(digest: &[u8]) -> u64 {
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(bytes)
}

/// A member's ID: SHA-1 over its sorted peer URLs followed by the cluster token.
pub fn member_id(peer_urls: &[String], cluster_token: &str) -> u64 {
    let mut sorted = peer_urls.to_vec();
    sorted.sort();
    let mut hasher = Sha1::new();
    for url in &sorted {
        hasher.update(url.as_bytes());
    }
    hasher.update(cluster_token.as_bytes());
    first_eight_bytes(&hasher.finalize())
}

/// The cluster ID: SHA-1 over the sorted member IDs, each as 8 big-endian bytes.
pub fn cluster_id(member_ids: &[u64]) -> u64 {
    let mut sorted = member_ids.to_vec();
    sorted.sort_unstable();
    let mut hasher = Sha1::new();
    for id in sorted {
        hasher.update(id.to_be_bytes());
    }
    first_eight_bytes(&hasher.finalize())
}

/// Unique request and lease IDs, built as etcd builds them: the low 16 bits of the
/// member ID, then 40 bits of the start time in milliseconds and an 8-bit counter
/// that carries into the time bits.
pub struct IdGenerator {
    prefix: u64,
    suffix: std::sync::atomic::AtomicU64,
}

const SUFFIX_BITS: u32 = 48;

impl IdGenerator {
    /// A generator for member `member_id`, seeded from the clock.
    pub fn new(member_id: u64) -> IdGenerator {
        let millis = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |elapsed| elapsed.as_millis() as u64);
        IdGenerator {
            prefix: member_id << SUFFIX_BITS,
            suffix: std::sync::atomic::AtomicU64::new(millis << 8),
        }
    }

    /// The next ID.
    pub fn next(&self) -> u64 {
        let suffix = self
            .suffix
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            .wrapping_add(1);
        self.prefix | (suffix & ((1u64 << SUFFIX_BITS) - 1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_single_member_matches_etcd() {
        // `etcd` started with no flags reports these IDs.
        let member = member_id(&["http://localhost:2380".to_string()], "etcd-cluster");
        assert_eq!(format!("{member:x}"), "8e9e05c52164694d");
        assert_eq!(format!("{:x}", cluster_id(&[member])), "cdf818194e3a8c32");
    }

    #[test]
    fn generated_ids_carry_the_member_and_never_repeat() {
        let generator = IdGenerator::new(0x8e9e05c52164694d);
        let first = generator.next();
        let second = generator.next();
        assert_ne!(first, second);
        assert_eq!(first >> 48, 0x694d);
    }

    #[test]
    fn token_changes_ids() {
        let urls = ["http://127.0.0.1:2380".to_string()];
        assert_ne!(member_id(&urls, "a"), member_id(&urls, "b"));
    }
}
