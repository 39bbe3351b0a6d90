//! A removed member stops, as etcd's does: it logs that it has been permanently
//! removed and exits with status 0, whether it applied its own removal, was down
//! during it and is refused by its peers when it comes back, or starts again on data
//! that says it was removed. Each case runs against kvstore and Debian's etcd.

mod common;

use std::time::{Duration, Instant};

use common::{text, Cluster, Kind};

const REMOVED: &str = "the member has been permanently removed from the cluster";

/// The ID `member list` (asked of member `via`) shows for member `index`.
fn id_of(cluster: &Cluster, via: usize, index: usize) -> String {
    let peer_url = cluster.members[index].peer_url();
    let list = text(&cluster.etcdctl(via, &["member", "list"]));
    list.lines()
        .find(|line| line.contains(&peer_url))
        .and_then(|line| line.split(',').next())
        .unwrap_or_else(|| panic!("{peer_url} not in member list:\n{list}"))
        .to_string()
}

/// `member remove`, retried while the cluster answers "unhealthy cluster" (a member
/// connected for less than five seconds).
fn remove(cluster: &Cluster, via: usize, id: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let output = cluster.etcdctl(via, &["member", "remove", id]);
        if output.status.success() {
            return;
        }
        assert!(
            text(&output).contains("unhealthy cluster") && Instant::now() < deadline,
            "member remove {id}: {}",
            text(&output)
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Waits up to `timeout` for member `index` to exit: its exit code.
fn exit_of(cluster: &mut Cluster, index: usize, timeout: Duration) -> Option<i32> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(code) = cluster.exit_code(index) {
            return Some(code);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Checks that member `index` exited with 0 within 20 s and logged its removal
/// `times` times in all.
fn check_stopped(cluster: &mut Cluster, index: usize, times: usize, what: &str) {
    let code = exit_of(cluster, index, Duration::from_secs(20));
    let log = cluster.members[index].log_text();
    assert_eq!(
        code,
        Some(0),
        "{:?} {what}: the removed member should exit with 0\n{log}",
        cluster.kind
    );
    assert!(
        log.matches(REMOVED).count() >= times,
        "{:?} {what}: the log should say {REMOVED:?}\n{log}",
        cluster.kind
    );
}

fn removed_members_stop(kind: Kind) {
    let mut cluster = Cluster::start(kind, 4, "removed", &[]);
    assert!(cluster.etcdctl(0, &["put", "k", "v"]).status.success());
    let leader = cluster.wait_leader(Duration::from_secs(10));
    let others: Vec<usize> = (0..4).filter(|i| *i != leader).collect();

    // A running follower applies its own removal.
    let (running, down, via) = (others[0], others[1], others[2]);
    let id = id_of(&cluster, via, running);
    remove(&cluster, via, &id);
    check_stopped(&mut cluster, running, 1, "applied its removal");

    // Started again on its data dir, it stops again.
    let initial = cluster.initial_cluster();
    cluster.launch(running, &initial, "new");
    check_stopped(&mut cluster, running, 2, "restarted after its removal");

    // A member removed while it was down learns it from its peers when it returns.
    let id = id_of(&cluster, via, down);
    cluster.kill(down);
    remove(&cluster, via, &id);
    cluster.launch(down, &initial, "new");
    check_stopped(&mut cluster, down, 1, "removed while down");

    // The leader can be removed too; the two left elect another and keep the data.
    let id = id_of(&cluster, via, leader);
    remove(&cluster, via, &id);
    check_stopped(&mut cluster, leader, 1, "removed as leader");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let output = cluster.etcdctl(via, &["get", "k", "--print-value-only"]);
        if String::from_utf8_lossy(&output.stdout).trim() == "v" {
            break;
        }
        assert!(Instant::now() < deadline, "{}", text(&output));
        std::thread::sleep(Duration::from_millis(200));
    }
    let list = cluster.etcdctl(via, &["member", "list"]);
    let list = String::from_utf8_lossy(&list.stdout);
    assert_eq!(list.lines().count(), 1, "{list}");
}

#[test]
fn removed_members_stop_on_kvstore() {
    removed_members_stop(Kind::Kvstore);
}

#[test]
fn removed_members_stop_on_etcd() {
    removed_members_stop(Kind::Etcd);
}
