//! Protobuf code: etcd's wire packages (from the `etcd-api` crate, with etcd's JSON
//! mapping) and kvstore's Raft payloads and peer service, generated from `proto/`.

pub use etcd_api::{authpb, etcdserverpb, mvccpb, v3electionpb, v3lockpb};

/// kvstore's Raft log payloads.
#[allow(clippy::all, missing_docs, non_snake_case)]
pub mod kvstorepb {
    include!(concat!(env!("OUT_DIR"), "/kvstorepb.rs"));
}
