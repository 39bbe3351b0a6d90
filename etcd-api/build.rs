//! Generates the gRPC code for etcd's v3 API from `proto/` with a pure-Rust protobuf
//! compiler (protox), so a fresh machine needs nothing but cargo. The descriptor set
//! is written too, so crates that import these files (kvstore's own Raft payloads)
//! can compile against the same definitions.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/etcd/api/mvccpb/kv.proto",
        "proto/etcd/api/authpb/auth.proto",
        "proto/etcd/api/etcdserverpb/rpc.proto",
        "proto/etcd/api/v3lockpb/v3lock.proto",
        "proto/etcd/api/v3electionpb/v3election.proto",
    ];
    for file in files {
        println!("cargo:rerun-if-changed={file}");
    }
    let descriptors = protox::compile(files, ["proto"])?;
    if std::env::var_os("CARGO_FEATURE_JSON").is_some() {
        let encoded = prost::Message::encode_to_vec(&descriptors);
        pbjson_build::Builder::new()
            .register_descriptors(&encoded)?
            .preserve_proto_field_names()
            .build(&[
                ".etcdserverpb",
                ".mvccpb",
                ".authpb",
                ".v3lockpb",
                ".v3electionpb",
            ])?;
    }
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(descriptors)?;
    Ok(())
}
