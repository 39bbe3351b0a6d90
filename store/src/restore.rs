//! `kvstore snapshot restore`: turns a file written by the Snapshot RPC (`etcdctl
//! snapshot save`, against kvstore or against etcd) into the data dir of a member
//! of a new cluster, as `etcdutl snapshot restore` does. The history, leases and
//! revisions come from the file; the membership is the one given by the flags, and
//! old members and alarms are dropped.

use std::io::Read;
use std::path::PathBuf;

use clap::Parser;
use sha2::Digest;

use crate::config::Config;
use crate::storage::{meta_key, Storage, WriteBatch, CF_META};

/// `kvstore snapshot restore` flags, named as etcdutl's.
#[derive(Debug, Parser)]
#[command(
    name = "kvstore snapshot restore",
    about = "Restores a snapshot into a new data dir"
)]
pub struct RestoreArgs {
    /// The snapshot file (from `etcdctl snapshot save`).
    pub file: PathBuf,
    /// Path to the data directory to create (default `${name}.kvstore`).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Human-readable name for this member.
    #[arg(long, default_value = "default")]
    pub name: String,
    /// Initial cluster configuration for restore bootstrap.
    #[arg(long)]
    pub initial_cluster: Option<String>,
    /// Initial cluster token for the etcd cluster during restore bootstrap.
    #[arg(long, default_value = "etcd-cluster")]
    pub initial_cluster_token: String,
    /// List of this member's peer URLs to advertise to the rest of the cluster.
    #[arg(long, default_value = "http://localhost:2380")]
    pub initial_advertise_peer_urls: String,
    /// Ignore the snapshot's integrity hash.
    #[arg(long)]
    pub skip_hash_check: bool,
}

/// Restores `args.file` into a new data dir; returns its path.
pub fn restore(args: &RestoreArgs) -> anyhow::Result<PathBuf> {
    let mut flags = vec![
        "kvstore".to_string(),
        format!("--name={}", args.name),
        format!("--initial-cluster-token={}", args.initial_cluster_token),
        format!(
            "--initial-advertise-peer-urls={}",
            args.initial_advertise_peer_urls
        ),
    ];
    if let Some(cluster) = &args.initial_cluster {
        flags.push(format!("--initial-cluster={cluster}"));
    }
    if let Some(dir) = &args.data_dir {
        flags.push(format!("--data-dir={}", dir.display()));
    }
    let config = Config::try_parse_from(flags).map_err(|e| anyhow::anyhow!("{e}"))?;
    config
        .validate()
        .map_err(|e| anyhow::anyhow!("invalid flags: {e}"))?;
    let data_dir = config.data_dir();
    if data_dir.exists() {
        anyhow::bail!("data-dir {:?} exists", data_dir.display().to_string());
    }

    let mut bytes = Vec::new();
    std::fs::File::open(&args.file)
        .and_then(|mut file| file.read_to_end(&mut bytes))
        .map_err(|e| anyhow::anyhow!("cannot read snapshot {}: {e}", args.file.display()))?;
    if bytes.len() < 32 {
        anyhow::bail!("snapshot file {} is too short", args.file.display());
    }
    let (body, trailer) = bytes.split_at(bytes.len() - 32);
    if !args.skip_hash_check {
        let digest = sha2::Sha256::digest(body);
        if digest.as_slice() != trailer {
            anyhow::bail!(
                "snapshot file integrity check failed: expected sha256 {}, got {}",
                hex(trailer),
                hex(&digest)
            );
        }
    }
    let identity = crate::server::new_member_identity(&config)?;
    let members = crate::server::initial_members(&config)?;

    // A snapshot saved from etcd is its bbolt database; one saved from kvstore is a
    // kvstore snapshot stream. An etcd snapshot is read whole before the data dir is
    // created, so a damaged one leaves nothing behind.
    let etcd_snapshot = crate::etcd_snapshot::is_bbolt(body)
        .then(|| crate::etcd_snapshot::read(body))
        .transpose()
        .map_err(|e| anyhow::anyhow!("cannot read etcd snapshot {}: {e}", args.file.display()))?;
    crate::storage::create_private_dir(&data_dir)?;
    let storage = Storage::open(&data_dir.join("member"))?;
    let (mut batch, revision) = match etcd_snapshot {
        Some(snapshot) => crate::raft::state_machine::load_etcd_snapshot(snapshot, &storage)?,
        None => crate::raft::state_machine::load_stream(&mut std::io::Cursor::new(body), &storage)?,
    };
    finish(&mut batch, &storage, &identity, &members);
    storage.write(batch, true)?;
    storage.flush()?;
    tracing::info!(data_dir = %data_dir.display(), revision, "restored snapshot");
    Ok(data_dir)
}

fn finish(
    batch: &mut WriteBatch,
    storage: &Storage,
    identity: &crate::server::Identity,
    members: &std::collections::BTreeMap<u64, openraft::BasicNode>,
) {
    let cf = storage.cf(CF_META);
    // The old cluster's members, removals and alarms do not carry over.
    for prefix in [
        meta_key::MEMBER_ATTRIBUTES_PREFIX,
        meta_key::REMOVED_MEMBER_PREFIX,
        meta_key::ALARM_PREFIX,
    ] {
        batch.delete_range_cf(cf, prefix, Storage::prefix_end(prefix).as_slice());
    }
    batch.put_cf(
        cf,
        meta_key::MEMBER,
        serde_json::to_vec(identity).expect("identity serializes"),
    );
    batch.put_cf(
        cf,
        meta_key::BOOTSTRAP,
        bincode::serialize(members).expect("membership serializes"),
    );
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
