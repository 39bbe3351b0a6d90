//! etcd's v3 API for Rust, the analogue of etcd's `go.etcd.io/etcd/api` module: the
//! protocol messages and gRPC clients and servers generated from etcd's `.proto`
//! files (with etcd's JSON mapping behind the `json` feature), the one table of etcd's
//! errors, the client side of TLS and dialing, and Go duration parsing.
//!
//! It links no storage engine and no Raft: kvbench and the operator depend on this
//! crate, never on the server.

pub mod client;
pub mod duration;
pub mod error;
pub mod tls;

pub use error::EtcdError;

#[allow(clippy::all, missing_docs, non_snake_case)]
mod generated {
    /// etcd's stored key-values and events.
    pub mod mvccpb {
        include!(concat!(env!("OUT_DIR"), "/mvccpb.rs"));
        #[cfg(feature = "json")]
        include!(concat!(env!("OUT_DIR"), "/mvccpb.serde.rs"));
    }
    /// etcd's users, roles and permissions.
    pub mod authpb {
        include!(concat!(env!("OUT_DIR"), "/authpb.rs"));
        #[cfg(feature = "json")]
        include!(concat!(env!("OUT_DIR"), "/authpb.serde.rs"));
    }
    /// etcd's v3 client API services and messages.
    pub mod etcdserverpb {
        include!(concat!(env!("OUT_DIR"), "/etcdserverpb.rs"));
        #[cfg(feature = "json")]
        include!(concat!(env!("OUT_DIR"), "/etcdserverpb.serde.rs"));
    }
    /// etcd's lock service.
    pub mod v3lockpb {
        include!(concat!(env!("OUT_DIR"), "/v3lockpb.rs"));
        #[cfg(feature = "json")]
        include!(concat!(env!("OUT_DIR"), "/v3lockpb.serde.rs"));
    }
    /// etcd's election service.
    pub mod v3electionpb {
        include!(concat!(env!("OUT_DIR"), "/v3electionpb.rs"));
        #[cfg(feature = "json")]
        include!(concat!(env!("OUT_DIR"), "/v3electionpb.serde.rs"));
    }
}

pub use generated::{authpb, etcdserverpb, mvccpb, v3electionpb, v3lockpb};

/// The `.proto` files this crate was generated from, for crates whose own files
/// import them (`import "etcd/api/etcdserverpb/rpc.proto"`).
pub const PROTO_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/proto");
