//! `etcdctl snapshot save` against kvstore, as against etcd, then `kvstore snapshot
//! restore` into the data dirs of a new three-member cluster: the keys, their
//! revisions and the leases come back, and every member holds the same history.

mod common;

use std::time::Duration;

use common::{text, Cluster, Kind, Server};
use kvstore::pb::etcdserverpb::maintenance_client::MaintenanceClient;
use kvstore::pb::etcdserverpb::HashKvRequest;

fn save(server: &Server, path: &std::path::Path) -> String {
    let output = server.etcdctl(&["snapshot", "save", path.to_str().unwrap()]);
    String::from_utf8_lossy(&output.stdout).replace(path.to_str().unwrap(), "<path>")
        + &format!("exit={}", output.status.code().unwrap_or(-1))
}

fn write_data(server: &Server) -> String {
    for (key, value) in [("a", "1"), ("b", "2"), ("a", "3"), ("c", "4")] {
        assert!(server.etcdctl(&["put", key, value]).status.success());
    }
    let grant =
        String::from_utf8_lossy(&server.etcdctl(&["lease", "grant", "600"]).stdout).to_string();
    let lease = grant.split_whitespace().nth(1).unwrap().to_string();
    assert!(server
        .etcdctl(&["put", "--lease", &lease, "leased", "x"])
        .status
        .success());
    assert!(server.etcdctl(&["compact", "3"]).status.success());
    lease
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_save_and_restore_into_a_new_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let etcd = Server::start(Kind::Etcd);
    let kvstore = Server::start(Kind::Kvstore);
    write_data(&etcd);
    let lease = write_data(&kvstore);
    let etcd_file = dir.path().join("etcd.db");
    let file = dir.path().join("kvstore.db");
    assert_eq!(save(&kvstore, &file), save(&etcd, &etcd_file));
    let before = text(&kvstore.etcdctl(&["get", "", "--from-key", "-w", "json"]));

    // Restore into three fresh data dirs and start a new cluster from them.
    let mut cluster = Cluster::unstarted(Kind::Kvstore, 3, "restored");
    let initial = cluster.initial_cluster();
    let binary = Server::binary(Kind::Kvstore);
    for member in &cluster.members {
        let output = std::process::Command::new(binary)
            .args(["snapshot", "restore", file.to_str().unwrap()])
            .arg(format!("--name={}", member.name))
            .arg(format!("--data-dir={}", member.data_dir.display()))
            .arg(format!("--initial-cluster={initial}"))
            .arg("--initial-cluster-token=restored")
            .arg(format!(
                "--initial-advertise-peer-urls={}",
                member.peer_url()
            ))
            .output()
            .unwrap();
        assert!(output.status.success(), "{}", text(&output));
    }
    for index in 0..3 {
        // No --initial-cluster flags: the data dir carries the membership.
        cluster.launch_with(index, &[]);
    }
    cluster.wait_healthy(Duration::from_secs(30));

    let after = text(&cluster.etcdctl(1, &["get", "", "--from-key", "-w", "json"]));
    let strip = |json: &str| -> serde_json::Value {
        let mut value: serde_json::Value =
            serde_json::from_str(json.lines().next().unwrap()).unwrap();
        value["header"] = serde_json::Value::Null;
        value
    };
    assert_eq!(
        strip(&after),
        strip(&before),
        "keys, values and revisions come back"
    );
    let ttl = text(&cluster.etcdctl(2, &["lease", "timetolive", "--keys", &lease]));
    assert!(ttl.contains("attached keys([leased])"), "{ttl}");
    let list = String::from_utf8_lossy(&cluster.etcdctl(0, &["member", "list"]).stdout).to_string();
    assert_eq!(list.lines().count(), 3, "{list}");
    assert!(cluster.etcdctl(0, &["put", "new", "1"]).status.success());

    let mut hashes = Vec::new();
    for member in &cluster.members {
        let hash = MaintenanceClient::new(member.channel().await)
            .hash_kv(HashKvRequest { revision: 0 })
            .await
            .unwrap()
            .into_inner();
        hashes.push((hash.hash_revision, hash.hash));
    }
    assert!(hashes.windows(2).all(|p| p[0] == p[1]), "{hashes:?}");

    // A restore never overwrites, and a damaged file is refused.
    let again = std::process::Command::new(binary)
        .args(["snapshot", "restore", file.to_str().unwrap()])
        .arg(format!(
            "--data-dir={}",
            cluster.members[0].data_dir.display()
        ))
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert!(text(&again).contains("exists"), "{}", text(&again));
    let mut damaged = std::fs::read(&file).unwrap();
    damaged[10] ^= 0xff;
    let damaged_path = dir.path().join("damaged.db");
    std::fs::write(&damaged_path, damaged).unwrap();
    let refused = std::process::Command::new(binary)
        .args(["snapshot", "restore", damaged_path.to_str().unwrap()])
        .arg(format!("--data-dir={}", dir.path().join("x").display()))
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(
        text(&refused).contains("integrity check failed"),
        "{}",
        text(&refused)
    );
}
