//! Multi-member clusters on loopback: leader loss, a member catching up by snapshot,
//! rolling restarts under load, and clusters with different tokens kept apart. After
//! each, every acknowledged write is on every member and HashKV agrees.

// Each test holds the file's one-at-a-time lock for its whole run, awaits included:
// every tokio test has a runtime of its own, so nothing waits on the lock's holder.
#![allow(clippy::await_holding_lock)]

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Cluster, Kind};
use kvstore::pb::etcdserverpb::kv_client::KvClient;
use kvstore::pb::etcdserverpb::maintenance_client::MaintenanceClient;
use kvstore::pb::etcdserverpb::{HashKvRequest, PutRequest, RangeRequest, StatusRequest};
use tonic::transport::Channel;

/// key -> value of every acknowledged put.
type Acknowledged = Arc<Mutex<BTreeMap<Vec<u8>, Vec<u8>>>>;

struct Writers {
    stop: Arc<AtomicBool>,
    acknowledged_count: Arc<std::sync::atomic::AtomicUsize>,
    acknowledged: Acknowledged,
    tasks: Vec<tokio::task::JoinHandle<usize>>,
}

/// Starts `count` writers, spread over the members' client URLs, each putting its
/// own keys in a loop; a put is acknowledged only when it returned OK.
fn start_writers(cluster: &Cluster, count: usize) -> Writers {
    let stop = Arc::new(AtomicBool::new(false));
    let acknowledged: Acknowledged = Arc::default();
    let acknowledged_count = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let urls: Vec<String> = cluster.members.iter().map(|m| m.url()).collect();
    let tasks = (0..count)
        .map(|writer| {
            let url = urls[writer % urls.len()].clone();
            let stop = stop.clone();
            let acknowledged = acknowledged.clone();
            let acknowledged_count = acknowledged_count.clone();
            tokio::spawn(async move {
                let channel = Channel::from_shared(url)
                    .unwrap()
                    .connect_timeout(Duration::from_millis(300))
                    .connect_lazy();
                let mut kv = KvClient::new(channel);
                let mut ok = 0;
                for sequence in 0.. {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let key = format!("w/{writer}/{}", sequence % 300).into_bytes();
                    let value = format!("{sequence}").into_bytes();
                    let put = kv.put(PutRequest {
                        key: key.clone(),
                        value: value.clone(),
                        ..Default::default()
                    });
                    match tokio::time::timeout(Duration::from_secs(3), put).await {
                        Ok(Ok(_)) => {
                            acknowledged.lock().unwrap().insert(key, value);
                            acknowledged_count.fetch_add(1, Ordering::Relaxed);
                            ok += 1;
                        }
                        _ => tokio::time::sleep(Duration::from_millis(20)).await,
                    }
                }
                ok
            })
        })
        .collect();
    Writers {
        stop,
        acknowledged_count,
        acknowledged,
        tasks,
    }
}

impl Writers {
    async fn finish(self) -> (usize, BTreeMap<Vec<u8>, Vec<u8>>) {
        self.stop.store(true, Ordering::Relaxed);
        let mut total = 0;
        for task in self.tasks {
            total += task.await.unwrap();
        }
        let acknowledged = self.acknowledged.lock().unwrap().clone();
        (total, acknowledged)
    }

    /// Writes acknowledged so far.
    fn count(&self) -> usize {
        self.acknowledged_count.load(Ordering::Relaxed)
    }
}

/// Checks that every running member holds every acknowledged write (a later write
/// to a key may have been acknowledged or not: the newest acknowledged value or a
/// newer one) and that HashKV agrees at one revision.
async fn verify(cluster: &Cluster, acknowledged: &BTreeMap<Vec<u8>, Vec<u8>>) {
    let mut hashes = Vec::new();
    let leader = cluster.wait_leader(Duration::from_secs(10));
    let (_, revision) = common::prefix_count(cluster.members[leader].channel().await, "w/").await;
    for member in cluster.members.iter().filter(|m| m.is_running()) {
        let channel = member.channel().await;
        // Linearizable: the member has applied everything committed.
        let stored: BTreeMap<Vec<u8>, Vec<u8>> = KvClient::new(channel.clone())
            .range(RangeRequest {
                key: b"w/".to_vec(),
                range_end: b"w0".to_vec(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .kvs
            .into_iter()
            .map(|kv| (kv.key, kv.value))
            .collect();
        for (key, value) in acknowledged {
            let found = stored.get(key).unwrap_or_else(|| {
                panic!(
                    "{}: acknowledged key {} is missing",
                    member.name,
                    String::from_utf8_lossy(key)
                )
            });
            let acked: u64 = String::from_utf8_lossy(value).parse().unwrap();
            let have: u64 = String::from_utf8_lossy(found).parse().unwrap();
            assert!(
                have >= acked,
                "{}: key {} went back from {acked} to {have}",
                member.name,
                String::from_utf8_lossy(key)
            );
        }
        let hash = MaintenanceClient::new(channel)
            .hash_kv(HashKvRequest { revision })
            .await
            .unwrap()
            .into_inner();
        hashes.push((member.name.clone(), hash.hash));
    }
    assert!(
        hashes.windows(2).all(|pair| pair[0].1 == pair[1].1),
        "HashKV differs at revision {revision}: {hashes:?}"
    );
}

/// The Raft term in the header of a put answered by member `index`.
async fn put_term(cluster: &Cluster, index: usize) -> u64 {
    let response = KvClient::new(cluster.members[index].channel().await)
        .put(PutRequest {
            key: b"term-probe".to_vec(),
            value: b"v".to_vec(),
            ..Default::default()
        })
        .await
        .expect("put through the leader")
        .into_inner();
    response.header.expect("a response header").raft_term
}

/// Waits until a running member other than `old` leads; its index. Members are asked
/// over gRPC every 20 ms, so the time measured is the election's, not that of
/// starting etcdctl once per member on a busy machine.
async fn wait_new_leader(cluster: &Cluster, old: usize, timeout: Duration) -> usize {
    let deadline = Instant::now() + timeout;
    loop {
        for (index, member) in cluster.members.iter().enumerate() {
            if index == old || !member.is_running() {
                continue;
            }
            let asked = tokio::time::timeout(Duration::from_millis(500), async {
                MaintenanceClient::new(member.channel().await)
                    .status(StatusRequest {})
                    .await
            })
            .await;
            if let Ok(Ok(status)) = asked {
                let status = status.into_inner();
                let own = status.header.map(|header| header.member_id);
                if status.leader != 0 && own == Some(status.leader) {
                    return index;
                }
            }
        }
        assert!(
            Instant::now() < deadline,
            "no new leader within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn leader_loss(size: usize) {
    let mut cluster = Cluster::start(Kind::Kvstore, size, &format!("loss-{size}"), &[]);
    let leader = cluster.wait_leader(Duration::from_secs(10));
    let term_before = put_term(&cluster, leader).await;
    let writers = start_writers(&cluster, 8);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let before = writers.count();
    assert!(before > 0, "writes go through before the kill");

    cluster.kill(leader);
    let killed = Instant::now();
    let new_leader = wait_new_leader(&cluster, leader, Duration::from_secs(10)).await;
    let elapsed = killed.elapsed();
    assert_ne!(new_leader, leader);
    eprintln!("{size} members: new leader {elapsed:?} after the leader was killed");
    // Two election timeouts (1 s each), plus the time to ask every member.
    assert!(
        elapsed < Duration::from_millis(2500),
        "new leader only after {elapsed:?}"
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        writers.count() > before,
        "writes continue under the new leader"
    );
    // Response headers carry the new term, the one the member's status reports.
    let term_after = put_term(&cluster, new_leader).await;
    assert!(term_after > term_before, "{term_after} after {term_before}");
    let status = MaintenanceClient::new(cluster.members[new_leader].channel().await)
        .status(StatusRequest {})
        .await
        .expect("status of the new leader")
        .into_inner();
    assert_eq!(status.raft_term, term_after);

    // The killed member comes back and catches up.
    tokio::task::block_in_place(|| {
        cluster.restart(leader);
        cluster.wait_healthy(Duration::from_secs(20));
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (total, acknowledged) = writers.finish().await;
    eprintln!("{total} writes acknowledged");
    verify(&cluster, &acknowledged).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_members_lose_their_leader_and_nothing_else() {
    let _serial = common::one_at_a_time();
    leader_loss(3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_members_lose_their_leader_and_nothing_else() {
    let _serial = common::one_at_a_time();
    leader_loss(5).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_down_during_many_writes_catches_up_by_snapshot() {
    let _serial = common::one_at_a_time();
    const WRITES: usize = 20_000;
    let mut cluster = Cluster::start(Kind::Kvstore, 3, "snapshot", &["--snapshot-count=1000"]);
    let leader = cluster.wait_leader(Duration::from_secs(10));
    let down = (leader + 1) % 3;
    cluster.kill(down);
    let mut kv = KvClient::new(cluster.members[leader].channel().await);
    let mut acknowledged = BTreeMap::new();
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let mut kv = kv.clone();
        let next = next.clone();
        tasks.push(tokio::spawn(async move {
            let mut written = Vec::new();
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= WRITES {
                    return Ok::<_, tonic::Status>(written);
                }
                let key = format!("w/{n}").into_bytes();
                kv.put(PutRequest {
                    key: key.clone(),
                    value: b"1".to_vec(),
                    ..Default::default()
                })
                .await?;
                written.push(key);
            }
        }));
    }
    for task in tasks {
        match task.await.unwrap() {
            Ok(written) => {
                for key in written {
                    acknowledged.insert(key, b"1".to_vec());
                }
            }
            Err(status) => panic!(
                "a put failed: {status}\nleader's log:\n{}",
                cluster.members[leader].log_text()
            ),
        }
    }
    tokio::task::block_in_place(|| {
        cluster.restart(down);
        cluster.wait_healthy(Duration::from_secs(30));
    });
    let (count, _) = common::prefix_count(cluster.members[down].channel().await, "w/").await;
    assert_eq!(count, WRITES);
    assert!(
        cluster.members[down]
            .log_text()
            .contains("installed snapshot from the leader"),
        "the member caught up without a snapshot; log:\n{}",
        cluster.members[down].log_text()
    );
    kv.put(PutRequest {
        key: b"w/last".to_vec(),
        value: b"1".to_vec(),
        ..Default::default()
    })
    .await
    .unwrap();
    acknowledged.insert(b"w/last".to_vec(), b"1".to_vec());
    verify(&cluster, &acknowledged).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_under_load_loses_nothing() {
    let _serial = common::one_at_a_time();
    let mut cluster = Cluster::start(Kind::Kvstore, 3, "rolling", &[]);
    let writers = start_writers(&cluster, 6);
    tokio::time::sleep(Duration::from_millis(500)).await;
    for index in 0..3 {
        tokio::task::block_in_place(|| {
            cluster.kill(index);
            std::thread::sleep(Duration::from_millis(300));
            cluster.restart(index);
            cluster.wait_healthy(Duration::from_secs(20));
        });
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let (total, acknowledged) = writers.finish().await;
    assert!(total > 0);
    eprintln!("{total} writes acknowledged across the rolling restart");
    verify(&cluster, &acknowledged).await;
}

#[test]
fn clusters_with_different_tokens_never_merge() {
    let _serial = common::one_at_a_time();
    let first = Cluster::start(Kind::Kvstore, 3, "token-a", &[]);
    // A second cluster whose --initial-cluster names one of the first cluster's
    // peer URLs as its own third member.
    let second = Cluster::start_partial(Kind::Kvstore, 2, "token-b", &first.members[0].peer_url());
    second.wait_healthy(Duration::from_secs(30));
    first.etcdctl(0, &["put", "owner", "first"]);
    second.etcdctl(0, &["put", "owner", "second"]);
    std::thread::sleep(Duration::from_secs(2));

    let ids = |cluster: &Cluster| -> Vec<String> {
        let output = cluster.etcdctl(0, &["member", "list"]);
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .map(|line| line.split(',').next().unwrap_or_default().to_string())
            .collect()
    };
    let first_ids = ids(&first);
    let second_ids = ids(&second);
    assert_eq!(first_ids.len(), 3);
    assert!(
        first_ids.iter().all(|id| !second_ids.contains(id)),
        "member IDs shared: {first_ids:?} {second_ids:?}"
    );
    let get = |cluster: &Cluster| {
        String::from_utf8_lossy(
            &cluster
                .etcdctl(0, &["get", "owner", "--print-value-only"])
                .stdout,
        )
        .trim()
        .to_string()
    };
    assert_eq!(get(&first), "first");
    assert_eq!(get(&second), "second");
    assert!(
        first.members[0]
            .log_text()
            .contains("refused a peer of another cluster"),
        "the first cluster's member did not log the refusal:\n{}",
        first.members[0].log_text()
    );
}

/// SIGTERM ends every member with exit code 0, also when all members stop at once
/// (RocksDB once aborted the process at exit: "terminate called without an active
/// exception", in about one stop of five).
#[test]
fn sigterm_stops_every_member_cleanly() {
    let _serial = common::one_at_a_time();
    for round in 0..5 {
        let mut cluster = Cluster::start(Kind::Kvstore, 3, &format!("stop-{round}"), &[]);
        let put = cluster.etcdctl(0, &["put", "k", "v"]);
        assert!(put.status.success());
        let codes = cluster.terminate_all();
        let logs: Vec<String> = cluster.members.iter().map(|m| m.log_text()).collect();
        assert_eq!(codes, [Some(0); 3], "round {round}:\n{}", logs.join("\n"));
        assert!(
            logs.iter().all(|log| !log.contains("terminate called")),
            "{}",
            logs.join("\n")
        );
    }
}
