//! Code generated from `proto/`: etcd's wire packages and kvstore's Raft payloads.
#![allow(clippy::all, missing_docs, non_snake_case)]

/// etcd's stored key-values and events.
pub mod mvccpb {
    include!(concat!(env!("OUT_DIR"), "/mvccpb.rs"));
}
/// etcd's users, roles and permissions.
pub mod authpb {
    include!(concat!(env!("OUT_DIR"), "/authpb.rs"));
}
/// etcd's v3 client API services and messages.
pub mod etcdserverpb {
    include!(concat!(env!("OUT_DIR"), "/etcdserverpb.rs"));
}
/// etcd's lock service.
pub mod v3lockpb {
    include!(concat!(env!("OUT_DIR"), "/v3lockpb.rs"));
}
/// etcd's election service.
pub mod v3electionpb {
    include!(concat!(env!("OUT_DIR"), "/v3electionpb.rs"));
}
/// kvstore's Raft log payloads.
pub mod kvstorepb {
    include!(concat!(env!("OUT_DIR"), "/kvstorepb.rs"));
}
