//! kvstore: an etcd-compatible key-value store replicated with Raft and kept in RocksDB.
//!
//! Layers, from the wire inwards: `api` (gRPC services) -> `server` (proposals and
//! reads) -> `raft` (openraft log store and state machine) -> `apply` (the only code
//! that mutates state) -> `mvcc` (revisions and key index) -> `storage` (RocksDB).

pub mod api;
pub mod apply;
pub mod auth;
pub mod config;
pub mod discovery;
pub use etcd_api::error;
pub mod etcd_snapshot;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
pub mod ids;
pub mod listener;
pub mod membership;
pub mod metrics;
pub mod mvcc;
pub mod pb;
pub mod proposer;
pub mod raft;
pub mod restore;
pub mod server;
pub mod srv;
pub mod storage;
pub mod tls;
pub mod token;
pub mod transfer;

/// The etcd API version kvstore speaks; reported by Status and `--version`.
pub const ETCD_API_VERSION: &str = "3.5.0";
/// kvstore's own version.
pub const KVSTORE_VERSION: &str = env!("CARGO_PKG_VERSION");
