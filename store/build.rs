//! Generates kvstore's own protobuf code (Raft payloads and the peer service) from
//! `proto/` with a pure-Rust protobuf compiler (protox). Those files import etcd's
//! messages, which the `etcd-api` crate generates: references to them point there.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/kvstore/raft_internal.proto",
        "proto/kvstore/peer.proto",
    ];
    for file in files {
        println!("cargo:rerun-if-changed={file}");
    }
    // The imported etcd files stay in the set (prost needs their messages to derive
    // traits); only kvstorepb.rs is included, and its references to etcd's types
    // point into etcd-api.
    let descriptors = protox::compile(files, ["proto", "../etcd-api/proto"])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .extern_path(".etcdserverpb", "::etcd_api::etcdserverpb")
        .extern_path(".mvccpb", "::etcd_api::mvccpb")
        .extern_path(".authpb", "::etcd_api::authpb")
        .compile_fds(descriptors)?;
    Ok(())
}
