//! `etcdctl snapshot save` against kvstore, as against etcd, then `kvstore snapshot
//! restore` into the data dirs of a new three-member cluster: the keys, their
//! revisions and the leases come back, and every member holds the same history.

mod common;

use std::time::Duration;

use common::{text, Cluster, Kind, Server};
use kvstore::pb::etcdserverpb::maintenance_client::MaintenanceClient;
use kvstore::pb::etcdserverpb::HashKvRequest;

fn save(server: &Server, path: &std::path::Path) -> String {
    save_with(server, path, &[])
}

fn save_with(server: &Server, path: &std::path::Path, flags: &[&str]) -> String {
    let args = [flags, &["snapshot", "save", path.to_str().unwrap()]].concat();
    let output = server.etcdctl(&args);
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
    let binary = Server::binary(Kind::Kvstore);
    for index in 0..3 {
        let output = restore_member(&cluster, index, &file, "restored");
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

    // HashKV is answered from each member's own state: a follower may not have
    // applied the last put yet, so the members are asked until they agree.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let mut hashes = Vec::new();
        for member in &cluster.members {
            let hash = MaintenanceClient::new(member.channel().await)
                .hash_kv(HashKvRequest { revision: 0 })
                .await
                .unwrap()
                .into_inner();
            hashes.push((hash.hash_revision, hash.hash));
        }
        if hashes.windows(2).all(|p| p[0] == p[1]) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{hashes:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

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

/// Restores `file` into member `index` of `cluster` (whose token is `token`) with
/// kvstore's restore command.
fn restore_member(
    cluster: &Cluster,
    index: usize,
    file: &std::path::Path,
    token: &str,
) -> std::process::Output {
    let member = &cluster.members[index];
    std::process::Command::new(Server::binary(Kind::Kvstore))
        .args(["snapshot", "restore", file.to_str().unwrap()])
        .arg(format!("--name={}", member.name))
        .arg(format!("--data-dir={}", member.data_dir.display()))
        .arg(format!("--initial-cluster={}", cluster.initial_cluster()))
        .arg(format!("--initial-cluster-token={token}"))
        .arg(format!(
            "--initial-advertise-peer-urls={}",
            member.peer_url()
        ))
        .output()
        .unwrap()
}

/// A snapshot saved from Debian's etcd (its bbolt file) restores into kvstore: the
/// same etcdctl queries give the same answers from the restored kvstore as from the
/// etcd it came from (keys, values, revisions, history after the compaction point,
/// the compaction itself, leases and their keys), and revisions go on from there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_etcd_snapshot_restores_into_kvstore() {
    use kvstore::pb::etcdserverpb::kv_client::KvClient;
    use kvstore::pb::etcdserverpb::PutRequest;
    let dir = tempfile::tempdir().unwrap();
    let etcd = Server::start(Kind::Etcd);
    let lease = write_data(&etcd);
    for args in [&["del", "b"][..], &["put", "b", "again"], &["del", "c"]] {
        assert!(etcd.etcdctl(args).status.success(), "{args:?}");
    }
    // Enough data for bbolt to need branch pages and overflow pages.
    let mut kv = KvClient::new(etcd.channel().await);
    for index in 0..400 {
        let size = if index % 100 == 0 { 20_000 } else { 1_000 };
        kv.put(PutRequest {
            key: format!("bulk/{index:04}").into_bytes(),
            value: vec![b'v'; size],
            ..Default::default()
        })
        .await
        .unwrap();
    }
    // Users, a role and auth enabled come over too.
    for args in [
        &["user", "add", "root:rootpw", "--interactive=false"][..],
        &["user", "add", "alice:secret", "--interactive=false"],
        &["role", "add", "reader"],
        &[
            "role",
            "grant-permission",
            "reader",
            "--prefix=true",
            "read",
            "bulk/",
        ],
        &["user", "grant-role", "alice", "reader"],
        &["auth", "enable"],
    ] {
        let output = etcd.etcdctl(args);
        assert!(output.status.success(), "{args:?}: {}", text(&output));
    }
    let root = "--user=root:rootpw";
    let alice = "--user=alice:secret";
    let file = dir.path().join("etcd.db");
    assert!(save_with(&etcd, &file, &[root]).ends_with("exit=0"));
    let queries: Vec<Vec<String>> = [
        vec![root, "get", "", "--from-key", "-w", "json"],
        vec![root, "get", "a", "--rev=3", "-w", "json"],
        vec![root, "get", "", "--from-key", "--rev=6", "-w", "json"],
        vec![root, "get", "c", "--rev=2"],
        vec![root, "lease", "list"],
        vec![root, "lease", "timetolive", "--keys", lease.as_str()],
        vec![root, "user", "list"],
        vec![root, "role", "get", "reader"],
        vec![alice, "get", "bulk/0001", "--print-value-only", "--hex"],
        vec![alice, "put", "bulk/0001", "x"],
        vec!["get", "a"],
        vec![root, "put", "after", "1", "-w", "json"],
        vec![root, "get", "after", "-w", "json"],
    ]
    .into_iter()
    .map(|query| query.into_iter().map(String::from).collect())
    .collect();
    let strip = |output: std::process::Output| -> String {
        let out = text(&output);
        match serde_json::from_str::<serde_json::Value>(out.lines().next().unwrap_or("")) {
            Ok(mut value) => {
                // Which member answered differs; the revision must not.
                let revision = value["header"]["revision"].clone();
                value["header"] = serde_json::json!({ "revision": revision });
                value.to_string()
            }
            // The TTL left may differ by a second or two.
            Err(_) => match out.split_once(" remaining(") {
                Some((before, after)) => {
                    format!(
                        "{before}{}",
                        after.split_once("),").map_or("", |(_, rest)| rest)
                    )
                }
                None => out,
            },
        }
    };
    let ask = |server: &dyn Fn(&[&str]) -> std::process::Output| -> Vec<String> {
        queries
            .iter()
            .map(|query| {
                let args: Vec<&str> = query.iter().map(String::as_str).collect();
                format!("{args:?}: {}", strip(server(&args)))
            })
            .collect()
    };
    let expected = ask(&|args| etcd.etcdctl(args));
    drop(etcd);

    let mut cluster = Cluster::unstarted(Kind::Kvstore, 1, "migrated");
    let output = restore_member(&cluster, 0, &file, "migrated");
    assert!(output.status.success(), "{}", text(&output));
    cluster.launch_with(0, &[]);
    // Auth is enabled: health is asked as root.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !cluster
        .etcdctl(0, &[root, "endpoint", "health"])
        .status
        .success()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "{}",
            cluster.members[0].log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let restored = ask(&|args| cluster.etcdctl(0, args));
    for (restored, expected) in restored.iter().zip(&expected) {
        assert_eq!(restored, expected);
    }
    assert!(expected[4].contains("found 1 leases"), "{}", expected[4]);
    assert!(
        expected[5].contains("attached keys([leased])"),
        "{}",
        expected[5]
    );
    assert!(
        expected[3].contains("required revision has been compacted"),
        "{}",
        expected[3]
    );
    assert!(expected[6].contains("alice"), "{}", expected[6]);
    assert!(expected[9].contains("permission denied"), "{}", expected[9]);
    assert!(
        expected[10].contains("user name is empty"),
        "{}",
        expected[10]
    );

    // Damaged files never panic the reader: cut short anywhere, or with bytes
    // flipped across the file, they are read or refused.
    let bytes = std::fs::read(&file).unwrap();
    assert!(kvstore::etcd_snapshot::read(&bytes).is_ok());
    for cut in (0..bytes.len()).step_by(997) {
        let _ = kvstore::etcd_snapshot::read(&bytes[..cut]);
    }
    for position in (0..bytes.len()).step_by(389) {
        let mut flipped = bytes.clone();
        flipped[position] ^= 0xa5;
        let _ = kvstore::etcd_snapshot::read(&flipped);
    }

    // A damaged bbolt file is refused with a message, not restored in part.
    let mut damaged = std::fs::read(&file).unwrap();
    let length = damaged.len();
    damaged.truncate(length / 3);
    let damaged_path = dir.path().join("damaged.db");
    std::fs::write(&damaged_path, damaged).unwrap();
    let refused = std::process::Command::new(Server::binary(Kind::Kvstore))
        .args(["snapshot", "restore", damaged_path.to_str().unwrap()])
        .arg("--skip-hash-check")
        .arg(format!("--data-dir={}", dir.path().join("x").display()))
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(
        text(&refused).contains("cannot read etcd snapshot"),
        "{}",
        text(&refused)
    );
    assert!(!dir.path().join("x").exists());
}
