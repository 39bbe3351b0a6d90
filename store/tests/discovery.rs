//! Bootstrap through Debian's etcd discovery service (discovery.etcd.io backed by a
//! Debian etcd with the v2 API), as etcd's clustering guide does it: three members
//! started with the same discovery URL form one cluster; a fourth is refused with
//! etcd's "cluster is full", and a member registering an ID again with etcd's
//! "found duplicate id".

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{free_port, Cluster, Kind, Server};

const DISCOVERY: &str = "/usr/bin/discovery.etcd.io";

struct DiscoveryService {
    child: Child,
    port: u16,
}

impl Drop for DiscoveryService {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_discovery(etcd: &Server) -> DiscoveryService {
    assert!(
        std::path::Path::new(DISCOVERY).exists(),
        "{DISCOVERY} is missing: run scripts/deps (it installs etcd-discovery)"
    );
    let port = free_port();
    let child = Command::new(DISCOVERY)
        .arg(format!("--addr=127.0.0.1:{port}"))
        .arg(format!("--etcd={}", etcd.url()))
        .arg(format!("--host=http://127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the discovery service");
    let service = DiscoveryService { child, port };
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "the discovery service did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    service
}

#[test]
fn three_members_bootstrap_through_etcd_discovery() {
    let etcd = Server::start_with(Kind::Etcd, &["--enable-v2"]);
    let service = start_discovery(&etcd);
    let (status, body) = common::http_get(service.port, "/new?size=3").expect("a discovery URL");
    assert_eq!(status, 200, "{body}");
    let url = body.trim().to_string();
    assert!(url.starts_with("http://"), "discovery URL: {url}");

    let mut cluster = Cluster::unstarted(Kind::Kvstore, 4, "discovered");
    for index in 0..3 {
        cluster.launch_with(index, &[format!("--discovery={url}")]);
    }
    cluster.wait_healthy(Duration::from_secs(30));
    let list = String::from_utf8_lossy(&cluster.etcdctl(0, &["member", "list"]).stdout).to_string();
    assert_eq!(list.lines().count(), 3, "{list}");
    for member in &cluster.members[..3] {
        assert!(list.contains(&member.peer_url()), "{list}");
    }
    assert!(cluster.etcdctl(1, &["put", "k", "v"]).status.success());

    // A fourth member finds the cluster full.
    cluster.launch_with(3, &[format!("--discovery={url}")]);
    let deadline = Instant::now() + Duration::from_secs(20);
    let code = loop {
        if let Some(code) = cluster.exit_code(3) {
            break code;
        }
        assert!(
            Instant::now() < deadline,
            "the fourth member did not give up"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_ne!(code, 0);
    assert!(
        cluster.members[3]
            .log_text()
            .contains("discovery: cluster is full"),
        "{}",
        cluster.members[3].log_text()
    );

    // A member that lost its data dir registers its ID again: refused.
    cluster.kill(2);
    std::fs::remove_dir_all(&cluster.members[2].data_dir).unwrap();
    let log_before = cluster.members[2].log_text().len();
    cluster.launch_with(2, &[format!("--discovery={url}")]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while cluster.exit_code(2).is_none() {
        assert!(
            Instant::now() < deadline,
            "the re-registering member did not give up"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        cluster.members[2].log_text()[log_before..].contains("discovery: found duplicate id"),
        "{}",
        cluster.members[2].log_text()
    );
}

/// Member IDs and the cluster ID of three members bootstrapped through the
/// discovery URL `url`, whose registry (in `backing`'s v2 store) is made afresh.
fn ids_through_discovery(
    backing: &Server,
    url: &str,
    mut cluster: Cluster,
) -> (Vec<String>, String) {
    let registry = url
        .strip_prefix(&backing.url())
        .expect("the registry is on the backing etcd")
        .to_string();
    let curl = |args: &[&str]| {
        let status = Command::new("curl")
            .args(["-sf", "-o", "/dev/null"])
            .args(args)
            .status()
            .expect("curl");
        status.success()
    };
    // The registry of an earlier run goes, so the same URL can be used again.
    curl(&[
        "-X",
        "DELETE",
        &format!("{}{registry}?recursive=true", backing.url()),
    ]);
    assert!(curl(&[
        "-X",
        "PUT",
        &format!("{url}/_config/size"),
        "-d",
        "value=3"
    ]));
    for index in 0..3 {
        cluster.launch_with(index, &[format!("--discovery={url}")]);
    }
    cluster.wait_healthy(Duration::from_secs(30));
    let list = cluster.etcdctl(0, &["member", "list", "-w", "json"]);
    let list: serde_json::Value = serde_json::from_slice(&list.stdout).expect("member list JSON");
    let mut ids: Vec<String> = list["members"]
        .as_array()
        .expect("members")
        .iter()
        .map(|m| format!("{:x}", m["ID"].as_u64().expect("an ID")))
        .collect();
    ids.sort();
    let cluster_id = format!(
        "{:x}",
        list["header"]["cluster_id"].as_u64().expect("a cluster ID")
    );
    cluster.terminate_all();
    (ids, cluster_id)
}

/// As etcd does, kvstore takes the discovery URL (not --initial-cluster-token) as the
/// token its member and cluster IDs derive from: the same URL and peer URLs give
/// etcd's IDs.
#[test]
fn discovery_derives_the_ids_etcd_derives() {
    let backing = Server::start_with(Kind::Etcd, &["--enable-v2"]);
    let url = format!("{}/v2/keys/_etcd/registry/parity", backing.url());
    let etcd = Cluster::unstarted(Kind::Etcd, 3, "ignored-by-discovery");
    let mut kvstore = Cluster::unstarted(Kind::Kvstore, 3, "also-ignored");
    for (ours, theirs) in kvstore.members.iter_mut().zip(&etcd.members) {
        ours.client_port = theirs.client_port;
        ours.peer_port = theirs.peer_port;
    }
    let expected = ids_through_discovery(&backing, &url, etcd);
    let got = ids_through_discovery(&backing, &url, kvstore);
    assert_eq!(
        got, expected,
        "kvstore's (member IDs, cluster ID) against etcd's"
    );
}
