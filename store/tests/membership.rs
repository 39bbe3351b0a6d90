//! Runtime membership through etcdctl, as etcd's runtime reconfiguration guide does
//! it: `member add`, start the new member with `--initial-cluster-state existing`,
//! promote learners, remove members, replace a member whose data was lost, and
//! refuse removals that would cost the quorum.

mod common;

use std::time::{Duration, Instant};

use common::{free_port, text, Cluster, Kind, Member};

fn stdout(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stdout).to_string()
}

/// The member ID `member list` shows for `peer_url`. `member list` is served from
/// the asked member's own applied state, which may trail the member that made the
/// change by a heartbeat: it is asked again for up to 5 s.
fn member_id(cluster: &Cluster, via: usize, peer_url: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let list = stdout(&cluster.etcdctl(via, &["member", "list"]));
        if let Some(id) = list
            .lines()
            .find(|line| line.contains(peer_url))
            .and_then(|line| line.split(',').next())
        {
            return id.to_string();
        }
        assert!(
            Instant::now() < deadline,
            "{peer_url} not in member list:\n{list}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Adds a member entry for a new process and returns its index.
fn new_member(cluster: &mut Cluster, name: &str) -> usize {
    let dir = cluster.members[0].data_dir.parent().unwrap().to_path_buf();
    cluster.members.push(Member::new(
        name,
        free_port(),
        free_port(),
        dir.join(name),
        dir.join(format!("{name}.log")),
    ));
    cluster.members.len() - 1
}

/// The ETCD_INITIAL_CLUSTER line etcdctl prints after `member add`.
fn initial_cluster_of(output: &str) -> String {
    output
        .lines()
        .find_map(|line| line.strip_prefix("ETCD_INITIAL_CLUSTER="))
        .expect("member add prints ETCD_INITIAL_CLUSTER")
        .trim_matches('"')
        .to_string()
}

/// Runs etcdctl until the cluster stops answering "unhealthy cluster": like etcd, a
/// member is added (or a connected one removed) only once every voter has been
/// connected for five seconds.
fn reconfigure(cluster: &Cluster, via: usize, args: &[&str]) -> std::process::Output {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let output = cluster.etcdctl(via, args);
        if !text(&output).contains("etcdserver: unhealthy cluster") || Instant::now() > deadline {
            return output;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn wait_for(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn add_a_learner_promote_it_and_remove_it() {
    let mut cluster = Cluster::start(Kind::Kvstore, 3, "grow", &[]);
    cluster.etcdctl(0, &["put", "before", "1"]);
    let leader = cluster.wait_leader(Duration::from_secs(10));
    let follower = (leader + 1) % 3;
    let new = new_member(&mut cluster, "m3");
    let peer_url = cluster.members[new].peer_url();

    // Asked of a follower, which passes the change to the leader.
    let added = reconfigure(
        &cluster,
        follower,
        &[
            "member",
            "add",
            "m3",
            &format!("--peer-urls={peer_url}"),
            "--learner",
        ],
    );
    assert!(added.status.success(), "{}", text(&added));
    let added_text = stdout(&added);
    assert!(added_text.contains("ETCD_INITIAL_CLUSTER_STATE=\"existing\""));
    let id = member_id(&cluster, 0, &peer_url);
    let list = stdout(&cluster.etcdctl(0, &["member", "list"]));
    assert!(
        list.contains(&format!("{id}, unstarted, , {peer_url}, , true")),
        "{list}"
    );

    // Not started, so not in sync: promotion is refused with etcd's error.
    let early = cluster.etcdctl(0, &["member", "promote", &id]);
    assert!(
        text(&early)
            .contains("etcdserver: can only promote a learner member which is in sync with leader"),
        "{}",
        text(&early)
    );

    cluster.launch(new, &initial_cluster_of(&added_text), "existing");
    wait_for("the learner to catch up", Duration::from_secs(20), || {
        stdout(&cluster.etcdctl(
            new,
            &["get", "before", "--print-value-only", "--consistency=s"],
        ))
        .trim()
            == "1"
    });
    wait_for("the promotion", Duration::from_secs(20), || {
        cluster
            .etcdctl(0, &["member", "promote", &id])
            .status
            .success()
    });
    let list = stdout(&cluster.etcdctl(0, &["member", "list"]));
    assert!(
        list.contains(&format!("{id}, started, m3, {peer_url}")),
        "{list}"
    );
    assert!(!list.contains("true"), "no learner is left: {list}");
    // The new voter takes writes.
    assert!(cluster
        .etcdctl(new, &["put", "from-new", "1"])
        .status
        .success());

    let removed = cluster.etcdctl(0, &["member", "remove", &id]);
    assert!(
        // etcdctl prints IDs with %16x: padded with spaces.
        stdout(&removed).contains(&format!("Member {id:>16} removed from cluster")),
        "{}",
        text(&removed)
    );
    cluster.kill(new);
    let list = stdout(&cluster.etcdctl(0, &["member", "list"]));
    assert_eq!(list.lines().count(), 3, "{list}");
    assert!(cluster.etcdctl(0, &["put", "after", "1"]).status.success());
}

#[test]
fn replace_a_member_whose_data_dir_was_wiped() {
    let mut cluster = Cluster::start(Kind::Kvstore, 3, "replace", &[]);
    cluster.etcdctl(0, &["put", "kept", "yes"]);
    let leader = cluster.wait_leader(Duration::from_secs(10));
    let lost = (leader + 1) % 3;
    let via = (leader + 2) % 3;
    let peer_url = cluster.members[lost].peer_url();
    let name = cluster.members[lost].name.clone();
    let old_id = member_id(&cluster, via, &peer_url);
    cluster.kill(lost);
    std::fs::remove_dir_all(&cluster.members[lost].data_dir).unwrap();

    let removed = reconfigure(&cluster, via, &["member", "remove", &old_id]);
    assert!(removed.status.success(), "{}", text(&removed));
    let added = reconfigure(
        &cluster,
        via,
        &["member", "add", &name, &format!("--peer-urls={peer_url}")],
    );
    assert!(added.status.success(), "{}", text(&added));
    let new_id = member_id(&cluster, via, &peer_url);
    assert_ne!(new_id, old_id, "a replaced member gets a new ID");

    cluster.launch(lost, &initial_cluster_of(&stdout(&added)), "existing");
    cluster.wait_healthy(Duration::from_secs(30));
    assert_eq!(
        stdout(&cluster.etcdctl(lost, &["get", "kept", "--print-value-only"])).trim(),
        "yes"
    );
    wait_for(
        "the new member to publish itself",
        Duration::from_secs(10),
        || {
            stdout(&cluster.etcdctl(via, &["member", "list"]))
                .contains(&format!("{new_id}, started, {name}, {peer_url}"))
        },
    );
}

#[test]
fn removals_that_would_lose_the_quorum_are_refused() {
    let mut cluster = Cluster::start(Kind::Kvstore, 3, "unsafe", &[]);
    let leader = cluster.wait_leader(Duration::from_secs(10));
    let down = (leader + 1) % 3;
    let other = (leader + 2) % 3;
    cluster.kill(down);
    // Wait until the leader no longer counts the killed member as connected.
    std::thread::sleep(Duration::from_secs(6));
    let other_id = member_id(&cluster, leader, &cluster.members[other].peer_url());
    let refused = cluster.etcdctl(leader, &["member", "remove", &other_id]);
    assert!(
        text(&refused)
            .contains("etcdserver: re-configuration failed due to not enough started members"),
        "{}",
        text(&refused)
    );
    // Removing the member that is down leaves two connected voters of two: allowed.
    let down_id = member_id(&cluster, leader, &cluster.members[down].peer_url());
    let removed = cluster.etcdctl(leader, &["member", "remove", &down_id]);
    assert!(removed.status.success(), "{}", text(&removed));
    // Adding a voter while only... a learner limit: one learner at a time.
    let first = cluster.etcdctl(
        leader,
        &[
            "member",
            "add",
            "l1",
            "--peer-urls=http://127.0.0.1:1",
            "--learner",
        ],
    );
    assert!(first.status.success(), "{}", text(&first));
    let second = cluster.etcdctl(
        leader,
        &[
            "member",
            "add",
            "l2",
            "--peer-urls=http://127.0.0.1:2",
            "--learner",
        ],
    );
    assert!(
        text(&second).contains("etcdserver: too many learner members in cluster"),
        "{}",
        text(&second)
    );
    let duplicate = cluster.etcdctl(
        leader,
        &["member", "add", "l3", "--peer-urls=http://127.0.0.1:1"],
    );
    assert!(
        text(&duplicate).contains("etcdserver: Peer URLs already exists"),
        "{}",
        text(&duplicate)
    );
}

/// As etcd: a member is added only once every voter has been connected to the leader
/// for five seconds; before that the answer is "etcdserver: unhealthy cluster".
#[test]
fn adds_wait_until_every_voter_was_connected_for_a_while() {
    let started = Instant::now();
    let cluster = Cluster::start(Kind::Kvstore, 3, "young", &[]);
    let leader = cluster.wait_leader(Duration::from_secs(10));
    let add = [
        "member",
        "add",
        "l1",
        "--learner",
        "--peer-urls=http://127.0.0.1:9",
    ];
    let early = cluster.etcdctl(leader, &add);
    // The cluster came up within a few seconds, so its links are younger than 5 s.
    if started.elapsed() < Duration::from_millis(4500) {
        assert!(
            text(&early).contains("etcdserver: unhealthy cluster"),
            "{}",
            text(&early)
        );
    } else {
        eprintln!(
            "the cluster took {:?} to start; the early add was not checked",
            started.elapsed()
        );
    }
    let later = reconfigure(&cluster, leader, &add);
    assert!(later.status.success(), "{}", text(&later));
}
