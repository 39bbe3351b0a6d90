//! The cluster-wide etcdctl commands against a three-member Debian etcd and a
//! three-member kvstore: member list, move-leader, endpoint status and health with
//! `--cluster`, alarm list, defrag, snapshot save and hashkv give the same results
//! once IDs, ports, sizes and terms are named by member. Endpoints are given as
//! `http://` URLs, as etcd's documentation writes them. Also: leadership moves
//! under write load without losing an acknowledged write.

// The one-at-a-time lock is held across awaits: every tokio test has a runtime of
// its own, so nothing waits on the lock's holder.
#![allow(clippy::await_holding_lock)]

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{text, Cluster, Kind};
use kvstore::pb::etcdserverpb::kv_client::KvClient;
use kvstore::pb::etcdserverpb::{PutRequest, RangeRequest};
use serde_json::Value;
use tonic::transport::Channel;

/// Runs etcdctl with the given endpoints.
fn etcdctl(endpoints: &str, args: &[&str]) -> String {
    let output = std::process::Command::new(common::ETCDCTL)
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={endpoints}"))
        .args(args)
        .output()
        .expect("run etcdctl");
    text(&output)
}

/// What names a cluster's members, IDs and URLs in normalized output.
struct Names {
    /// (text to replace, replacement), longest first.
    replacements: Vec<(String, String)>,
    /// Member ID (decimal) -> name.
    by_id: BTreeMap<u64, String>,
}

impl Names {
    fn of(cluster: &Cluster) -> Names {
        let list: Value = serde_json::from_str(&first_json(&etcdctl(
            &urls(cluster),
            &["member", "list", "-w", "json"],
        )))
        .expect("member list JSON");
        let mut replacements = Vec::new();
        let mut by_id = BTreeMap::new();
        for member in list["members"].as_array().expect("members") {
            let id = member["ID"].as_u64().expect("ID");
            let name = member["name"].as_str().unwrap_or_default();
            let name = if name.is_empty() {
                "unstarted".to_string()
            } else {
                name.to_string()
            };
            replacements.push((format!("{id:x}"), format!("<{name}>")));
            by_id.insert(id, name);
        }
        let cluster_id = list["header"]["cluster_id"].as_u64().expect("cluster_id");
        replacements.push((format!("{cluster_id:x}"), "<cluster>".into()));
        for member in &cluster.members {
            replacements.push((member.url(), format!("<{} client>", member.name)));
            replacements.push((member.endpoint(), format!("<{} client>", member.name)));
            replacements.push((member.peer_url(), format!("<{} peer>", member.name)));
        }
        replacements.sort_by_key(|(from, _)| std::cmp::Reverse(from.len()));
        Names {
            replacements,
            by_id,
        }
    }

    fn apply(&self, output: &str) -> String {
        let mut output = output.to_string();
        for (from, to) in &self.replacements {
            output = output.replace(from.as_str(), to);
        }
        output
    }

    fn name(&self, id: &Value) -> String {
        id.as_u64()
            .and_then(|id| self.by_id.get(&id).cloned())
            .unwrap_or_else(|| format!("unknown {id}"))
    }
}

fn first_json(output: &str) -> String {
    output
        .lines()
        .find(|line| line.starts_with('{') || line.starts_with('['))
        .unwrap_or("null")
        .to_string()
}

fn urls(cluster: &Cluster) -> String {
    cluster
        .members
        .iter()
        .map(|m| m.url())
        .collect::<Vec<_>>()
        .join(",")
}

fn sorted_lines(output: &str) -> String {
    let mut lines: Vec<&str> = output.lines().collect();
    lines.sort();
    lines.join("\n")
}

fn hex_id(cluster: &Cluster, names: &Names, member: usize) -> String {
    let name = &cluster.members[member].name;
    let id = names
        .by_id
        .iter()
        .find(|(_, n)| *n == name)
        .map(|(id, _)| *id)
        .expect("member has an ID");
    format!("{id:x}")
}

/// `endpoint status -w json` as (endpoint, member, leader, learner, errors) rows.
fn status_rows(names: &Names, status: &Value) -> String {
    let mut rows: Vec<String> = status
        .as_array()
        .expect("status array")
        .iter()
        .map(|entry| {
            let s = &entry["Status"];
            names.apply(&format!(
                "{} member={} leader={} learner={} errors={}",
                entry["Endpoint"].as_str().unwrap_or_default(),
                names.name(&s["header"]["member_id"]),
                names.name(&s["leader"]),
                s["isLearner"],
                s["errors"]
            ))
        })
        .collect();
    rows.sort();
    rows.join("\n")
}

/// Each line with runs of spaces made one (etcdctl pads IDs to a width).
fn squeezed(output: &str) -> String {
    output
        .lines()
        .map(|line| line.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect::<Vec<_>>()
        .join("\n")
}

/// `endpoint health` output without its timings.
fn health_lines(output: &str) -> String {
    output
        .lines()
        .map(|line| match line.split_once("took =") {
            Some((before, _)) => format!("{before}took = <duration>"),
            None => line.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The session: each entry is one command's normalized result.
fn session(cluster: &Cluster, dir: &std::path::Path) -> Vec<(String, String)> {
    let all = urls(cluster);
    let names = Names::of(cluster);
    let mut results = Vec::new();
    let mut record = |what: &str, output: String| results.push((what.to_string(), output));

    record(
        "member list",
        sorted_lines(&names.apply(&etcdctl(&all, &["member", "list"]))),
    );
    record(
        "member list -w table",
        // Column widths follow the IDs' lengths, which differ.
        sorted_lines(&squeezed(
            &names.apply(&etcdctl(&all, &["member", "list", "-w", "table"])),
        )),
    );
    let list: Value = serde_json::from_str(&first_json(&etcdctl(
        &all,
        &["member", "list", "-w", "json"],
    )))
    .unwrap();
    let mut members: Vec<String> = list["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            names.apply(&format!(
                "{} {} {} {} learner={}",
                names.name(&m["ID"]),
                m["name"],
                m["peerURLs"],
                m["clientURLs"],
                m["isLearner"]
            ))
        })
        .collect();
    members.sort();
    record("member list -w json", members.join("\n"));

    // Move the leader to m1, so both clusters lead from the same member.
    let to_m1 = hex_id(cluster, &names, 1);
    let moved = names.apply(&etcdctl(&all, &["move-leader", &to_m1]));
    let moved = match moved.split_once(" to ") {
        Some((from, to)) if from.starts_with("Leadership transferred from ") => {
            format!("Leadership transferred from <leader> to {to}")
        }
        _ => moved,
    };
    record("move-leader m1", moved);
    record(
        "move-leader m1 again",
        names.apply(&etcdctl(&all, &["move-leader", &to_m1])),
    );
    record(
        "move-leader unknown",
        names.apply(&etcdctl(&all, &["move-leader", "1234"])),
    );
    record(
        "move-leader not hex",
        names.apply(&etcdctl(&all, &["move-leader", "xyz"])),
    );
    record(
        "move-leader via a follower only",
        names.apply(&etcdctl(
            &cluster.members[2].url(),
            &["move-leader", &hex_id(cluster, &names, 0)],
        )),
    );

    let status: Value = serde_json::from_str(&first_json(&etcdctl(
        &all,
        &["endpoint", "status", "--cluster", "-w", "json"],
    )))
    .unwrap();
    record(
        "endpoint status --cluster -w json",
        status_rows(&names, &status),
    );
    // The simple format: endpoint, ID, version, size, leader, learner, term, index,
    // applied index, errors; version, size and the Raft numbers differ by build.
    let simple = etcdctl(&all, &["endpoint", "status", "--cluster"]);
    let mut rows: Vec<String> = simple
        .lines()
        .map(|line| {
            let fields: Vec<&str> = line.split(", ").collect();
            if fields.len() < 6 {
                return line.to_string();
            }
            names.apply(&format!(
                "{} {} leader={} learner={} errors={}",
                fields[0],
                fields[1],
                fields[4],
                fields[5],
                fields.get(9).unwrap_or(&"")
            ))
        })
        .collect();
    rows.sort();
    record("endpoint status --cluster", rows.join("\n"));
    let health = names.apply(&etcdctl(&all, &["endpoint", "health", "--cluster"]));
    record(
        "endpoint health --cluster",
        sorted_lines(&health_lines(&health)),
    );

    // Endpoints as host:port, the other way etcdctl is given them.
    let bare = cluster.endpoints();
    let health = names.apply(&etcdctl(&bare, &["endpoint", "health"]));
    record(
        "endpoint health (host:port)",
        sorted_lines(&health_lines(&health)),
    );
    let status: Value = serde_json::from_str(&first_json(&etcdctl(
        &bare,
        &["endpoint", "status", "-w", "json"],
    )))
    .unwrap();
    record("endpoint status (host:port)", status_rows(&names, &status));

    record(
        "alarm list",
        names.apply(&etcdctl(&all, &["alarm", "list"])),
    );
    record(
        "defrag --cluster",
        sorted_lines(&names.apply(&etcdctl(&all, &["defrag", "--cluster"]))),
    );
    record(
        "defrag",
        sorted_lines(&names.apply(&etcdctl(&all, &["defrag"]))),
    );

    for index in 0..20 {
        etcdctl(&all, &["put", &format!("key{index}"), "value"]);
    }
    let snapshot = dir.join("snap.db");
    let saved = etcdctl(
        &cluster.members[0].url(),
        &["snapshot", "save", snapshot.to_str().unwrap()],
    )
    .replace(dir.to_str().unwrap(), "<dir>");
    record("snapshot save", saved);
    // Each member's hash of the same revision must agree (the values differ between
    // implementations).
    let hashes = etcdctl(&all, &["endpoint", "hashkv", "--cluster"]);
    let values: Vec<&str> = hashes
        .lines()
        .filter_map(|line| line.rsplit_once(", ").map(|(_, hash)| hash))
        .collect();
    record(
        "endpoint hashkv --cluster",
        format!(
            "{} members, {} distinct hashes, {}",
            values.len(),
            values
                .iter()
                .collect::<std::collections::BTreeSet<_>>()
                .len(),
            hashes.lines().last().unwrap_or_default()
        ),
    );

    // A learner can't lead. (etcd adds members only once every voter has been
    // connected for five seconds.)
    std::thread::sleep(Duration::from_secs(6));
    let added = etcdctl(
        &all,
        &[
            "member",
            "add",
            "learner",
            "--learner",
            "--peer-urls=http://127.0.0.1:9",
        ],
    );
    assert!(added.contains("added to cluster"), "{added}");
    let names = Names::of(cluster);
    let learner = names
        .by_id
        .iter()
        .find(|(_, name)| *name == "unstarted")
        .map(|(id, _)| format!("{id:x}"))
        .expect("learner listed");
    record(
        "move-leader to a learner",
        names.apply(&etcdctl(&all, &["move-leader", &learner])),
    );
    record(
        "member list with a learner",
        sorted_lines(&names.apply(&etcdctl(&all, &["member", "list"]))),
    );
    // etcdctl pads IDs to 16 columns, and IDs differ in length.
    let removed = names.apply(&etcdctl(&all, &["member", "remove", &learner]));
    record("member remove learner", squeezed(&removed));
    record(
        "member list via a follower",
        sorted_lines(&names.apply(&etcdctl(&cluster.members[2].url(), &["member", "list"]))),
    );
    results
}

#[test]
fn cluster_commands_match_etcd() {
    let _serial = common::one_at_a_time();
    let dir = tempfile::tempdir().unwrap();
    let etcd_dir = dir.path().join("etcd");
    let ours_dir = dir.path().join("kvstore");
    std::fs::create_dir_all(&etcd_dir).unwrap();
    std::fs::create_dir_all(&ours_dir).unwrap();

    let etcd = Cluster::start(Kind::Etcd, 3, "differential", &[]);
    let expected = session(&etcd, &etcd_dir);
    drop(etcd);
    let ours = Cluster::start(Kind::Kvstore, 3, "differential", &[]);
    let actual = session(&ours, &ours_dir);

    let mut mismatches = Vec::new();
    for ((what, want), (_, got)) in expected.iter().zip(&actual) {
        if want != got {
            mismatches.push(format!("--- {what}\netcd:\n{want}\nkvstore:\n{got}\n"));
        }
    }
    assert!(
        mismatches.is_empty(),
        "{} of {} commands differ:\n{}",
        mismatches.len(),
        expected.len(),
        mismatches.join("\n")
    );
    // The substance, not only the sameness.
    let find = |what: &str| {
        actual
            .iter()
            .find(|(w, _)| w == what)
            .map(|(_, output)| output.clone())
            .unwrap()
    };
    assert!(find("move-leader m1").ends_with("to <m1>\nexit=0"));
    assert!(find("endpoint status --cluster -w json").contains("member=m1 leader=m1"));
    assert!(find("endpoint hashkv --cluster").starts_with("3 members, 1 distinct hashes"));
}

/// Puts in a loop through every member; returns the acknowledged keys.
async fn write_until(
    urls: Vec<String>,
    stop: Arc<AtomicBool>,
    failures: Arc<AtomicUsize>,
) -> Vec<Vec<u8>> {
    let acknowledged = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for (writer, url) in urls.iter().cycle().take(6).enumerate() {
        let channel = Channel::from_shared(url.clone()).unwrap().connect_lazy();
        let stop = stop.clone();
        let failures = failures.clone();
        let acknowledged = acknowledged.clone();
        tasks.push(tokio::spawn(async move {
            let mut kv = KvClient::new(channel);
            let mut sequence = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let key = format!("w{writer}-{sequence}").into_bytes();
                sequence += 1;
                let put = PutRequest {
                    key: key.clone(),
                    value: b"v".to_vec(),
                    ..Default::default()
                };
                match tokio::time::timeout(Duration::from_secs(5), kv.put(put)).await {
                    Ok(Ok(_)) => acknowledged.lock().unwrap().push(key),
                    _ => {
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let keys = acknowledged.lock().unwrap().clone();
    keys
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leadership_moves_under_writes_without_loss() {
    let _serial = common::one_at_a_time();
    let cluster = Cluster::start(Kind::Kvstore, 3, "move-under-load", &[]);
    let all = urls(&cluster);
    let names = Names::of(&cluster);
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicUsize::new(0));
    let writers = tokio::spawn(write_until(
        cluster.members.iter().map(|m| m.url()).collect(),
        stop.clone(),
        failures.clone(),
    ));
    tokio::time::sleep(Duration::from_millis(500)).await;
    for target in [1, 2, 0] {
        let id = hex_id(&cluster, &names, target);
        let started = Instant::now();
        let moved = etcdctl(&all, &["move-leader", &id]);
        assert!(moved.ends_with(&format!("to {id}\nexit=0")), "{moved}");
        // One leader lease (--election-timeout) plus a heartbeat, and an election.
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(cluster.leader(), Some(target));
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let acknowledged = writers.await.unwrap();
    assert!(
        acknowledged.len() > 100,
        "only {} writes",
        acknowledged.len()
    );
    for member in &cluster.members {
        let mut kv = KvClient::new(member.channel().await);
        let range = kv
            .range(RangeRequest {
                key: b"w".to_vec(),
                range_end: b"x".to_vec(),
                keys_only: true,
                serializable: false,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let stored: std::collections::HashSet<Vec<u8>> =
            range.kvs.into_iter().map(|kv| kv.key).collect();
        let missing = acknowledged
            .iter()
            .filter(|key| !stored.contains(*key))
            .count();
        assert_eq!(missing, 0, "{} lost on {}", missing, member.name);
    }
    eprintln!(
        "{} writes acknowledged, {} failed during three transfers",
        acknowledged.len(),
        failures.load(Ordering::Relaxed)
    );
}
