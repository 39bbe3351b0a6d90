//! Generates the gRPC code for etcd's v3 API from `proto/` with a pure-Rust
//! protobuf compiler (protox), so a fresh machine needs nothing but cargo.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/etcd/api/mvccpb/kv.proto",
        "proto/etcd/api/authpb/auth.proto",
        "proto/etcd/api/etcdserverpb/rpc.proto",
        "proto/etcd/api/v3lockpb/v3lock.proto",
        "proto/etcd/api/v3electionpb/v3election.proto",
        "proto/kvstore/raft_internal.proto",
        "proto/kvstore/peer.proto",
    ];
    for file in files {
        println!("cargo:rerun-if-changed={file}");
    }
    let descriptors = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(descriptors)?;
    Ok(())
}
