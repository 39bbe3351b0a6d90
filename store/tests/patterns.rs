//! etcd's classic uses, run against kvstore with real processes: service discovery
//! with leases, a configuration center that survives a cut connection, exclusive
//! and ordered locks, leader election.

mod common;

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{background, Kind, Server, ETCDCTL};
use kvstore::pb::etcdserverpb::kv_client::KvClient;
use kvstore::pb::etcdserverpb::lease_client::LeaseClient;
use kvstore::pb::etcdserverpb::watch_client::WatchClient;
use kvstore::pb::etcdserverpb::watch_request::RequestUnion;
use kvstore::pb::etcdserverpb::{
    LeaseGrantRequest, LeaseRevokeRequest, PutRequest, RangeRequest, WatchCreateRequest,
    WatchRequest,
};
use kvstore::pb::v3electionpb::election_client::ElectionClient;
use kvstore::pb::v3electionpb::{CampaignRequest, LeaderRequest, ProclaimRequest, ResignRequest};
use kvstore::pb::v3lockpb::lock_client::LockClient;
use kvstore::pb::v3lockpb::{LockRequest, UnlockRequest};
use tokio::net::{TcpListener, TcpStream};
use tonic::transport::Channel;

fn current_revision(server: &Server) -> i64 {
    let output = server.etcdctl(&["get", "none", "-w", "json"]);
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).expect("json");
    json["header"]["revision"].as_i64().expect("revision")
}

fn shell(server: &Server, script: &str) -> common::Background {
    background(
        std::process::Command::new("sh")
            .arg("-c")
            .arg(script)
            .env("ETCDCTL_API", "3")
            .env("ETCDCTL", ETCDCTL)
            .env("ENDPOINT", server.endpoint()),
        false,
    )
}

#[test]
fn service_discovery_with_leases() {
    const TTL: u64 = 2;
    let server = Server::start(Kind::Kvstore);
    let from = current_revision(&server) + 1;
    let mut watcher = server.etcdctl_background(
        &["watch", "--prefix", "/services/", &format!("--rev={from}")],
        false,
    );
    let mut services: Vec<common::Background> = (0..3)
        .map(|id| {
            shell(
                &server,
                &format!(
                    "ID=$($ETCDCTL --endpoints=$ENDPOINT lease grant {TTL} | cut -d' ' -f2) && \
                     $ETCDCTL --endpoints=$ENDPOINT put --lease=$ID /services/web/{id} 10.0.0.{id}:80 && \
                     exec $ETCDCTL --endpoints=$ENDPOINT lease keep-alive $ID"
                ),
            )
        })
        .collect();
    let mut registered = std::collections::BTreeSet::new();
    while registered.len() < 3 {
        let key = watcher.wait_for(Duration::from_secs(10), |line| {
            line.starts_with("/services/web/")
        });
        let key = key.unwrap_or_else(|| panic!("not every service registered: {:?}", watcher.seen));
        registered.insert(key);
    }
    // Kept alive well past the TTL.
    std::thread::sleep(Duration::from_secs(TTL * 2));
    let listed = server.etcdctl(&["get", "--prefix", "/services/", "--keys-only"]);
    assert_eq!(
        String::from_utf8_lossy(&listed.stdout)
            .lines()
            .filter(|l| !l.is_empty())
            .count(),
        3
    );

    services[1].kill();
    let killed = Instant::now();
    let deleted = watcher.wait_for(Duration::from_secs(TTL + 5), |line| line == "DELETE");
    assert!(deleted.is_some(), "no DELETE seen: {:?}", watcher.seen);
    let key = watcher.wait_for(Duration::from_secs(1), |_| true);
    let elapsed = killed.elapsed();
    assert_eq!(key.as_deref(), Some("/services/web/1"));
    assert!(
        elapsed <= Duration::from_secs(TTL + 1),
        "key removed {elapsed:?} after the kill, TTL is {TTL}s"
    );
    let listed = server.etcdctl(&["get", "--prefix", "/services/", "--keys-only"]);
    let keys: Vec<String> = String::from_utf8_lossy(&listed.stdout)
        .lines()
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect();
    assert_eq!(keys, vec!["/services/web/0", "/services/web/2"]);
}

/// A TCP proxy whose connections can be cut, as a network failure would.
struct Proxy {
    port: u16,
    connections: Arc<parking_lot::Mutex<Vec<tokio::task::AbortHandle>>>,
}

impl Proxy {
    async fn start(target: String) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let connections: Arc<parking_lot::Mutex<Vec<tokio::task::AbortHandle>>> = Arc::default();
        let tracked = connections.clone();
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let target = target.clone();
                let task = tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                tracked.lock().push(task.abort_handle());
            }
        });
        Proxy { port, connections }
    }

    fn cut(&self) {
        for connection in self.connections.lock().drain(..) {
            connection.abort();
        }
    }
}

async fn watch_from(
    channel: Channel,
    key: &str,
    start_revision: i64,
) -> Result<tonic::Streaming<kvstore::pb::etcdserverpb::WatchResponse>, tonic::Status> {
    let request = WatchRequest {
        request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
            key: key.into(),
            start_revision,
            ..Default::default()
        })),
    };
    let (sender, receiver) = tokio::sync::mpsc::channel(1);
    sender.send(request).await.unwrap();
    let mut stream = WatchClient::new(channel)
        .watch(tokio_stream::wrappers::ReceiverStream::new(receiver))
        .await?
        .into_inner();
    // The request side stays open as long as the stream is read.
    tokio::spawn(async move {
        sender.closed().await;
    });
    let created = stream.message().await?.expect("created response");
    assert!(created.created);
    Ok(stream)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configuration_center_resumes_after_a_cut_connection() {
    const UPDATES: usize = 300;
    let server = Server::start(Kind::Kvstore);
    let mut kv = KvClient::new(server.channel().await);
    kv.put(PutRequest {
        key: "/config/app".into(),
        value: "v0".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    // The application reads its configuration once...
    let read = kv
        .range(RangeRequest {
            key: "/config/app".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(read.kvs[0].value, b"v0");
    let mut last_revision = read.header.unwrap().revision;

    let proxy = Proxy::start(server.endpoint()).await;
    let url = format!("http://127.0.0.1:{}", proxy.port);
    let channel = Channel::from_shared(url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut stream = watch_from(channel, "/config/app", last_revision + 1)
        .await
        .unwrap();

    // ...while an operator updates it.
    let writer = tokio::spawn(async move {
        for i in 1..=UPDATES {
            kv.put(PutRequest {
                key: "/config/app".into(),
                value: format!("v{i}").into(),
                ..Default::default()
            })
            .await
            .unwrap();
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    });

    let mut values = Vec::new();
    let mut cuts = 0;
    let mut resumed = 0;
    while values.len() < UPDATES {
        let next = tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .expect("an event or an error in time");
        match next {
            Ok(Some(response)) => {
                for event in response.events {
                    let kv = event.kv.unwrap();
                    assert!(kv.mod_revision > last_revision, "revision went back");
                    last_revision = kv.mod_revision;
                    values.push(String::from_utf8(kv.value).unwrap());
                }
                if cuts < 2 && values.len() >= 100 * (cuts + 1) {
                    proxy.cut();
                    cuts += 1;
                }
            }
            Ok(None) | Err(_) => {
                // The connection is gone: reconnect and resume after the last event.
                let channel = loop {
                    if let Ok(channel) = Channel::from_shared(url.clone()).unwrap().connect().await
                    {
                        break channel;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                };
                stream = watch_from(channel, "/config/app", last_revision + 1)
                    .await
                    .unwrap();
                resumed += 1;
            }
        }
    }
    writer.await.unwrap();
    assert_eq!(cuts, 2, "the connection was cut twice");
    assert!(resumed >= 2, "the watch resumed after each cut ({resumed})");
    let expected: Vec<String> = (1..=UPDATES).map(|i| format!("v{i}")).collect();
    assert_eq!(values, expected, "every update, in order, once");
}

fn append(log: &std::path::Path, line: &str) {
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(log)
        .unwrap();
    file.write_all(format!("{line}\n").as_bytes()).unwrap();
}

async fn grant(channel: &Channel, ttl: i64) -> i64 {
    LeaseClient::new(channel.clone())
        .lease_grant(LeaseGrantRequest { ttl, id: 0 })
        .await
        .unwrap()
        .into_inner()
        .id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exclusive_lock_through_etcdctl_and_the_lock_rpc() {
    const ROUNDS: usize = 3;
    let server = Server::start(Kind::Kvstore);
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("holders.log");
    std::fs::write(&log, "").unwrap();

    // Three processes take the lock through etcdctl; ETCD_LOCK_REV is the revision
    // at which each acquired it, a fencing token.
    let processes: Vec<common::Background> = (0..3)
        .map(|_| {
            shell(
                &server,
                &format!(
                    "for i in $(seq {ROUNDS}); do \
                       $ETCDCTL --endpoints=$ENDPOINT lock --ttl=5 shared -- \
                         sh -c 'echo start $ETCD_LOCK_REV >> {log}; sleep 0.05; echo end $ETCD_LOCK_REV >> {log}' \
                         || exit 1; \
                     done; echo finished",
                    log = log.display()
                ),
            )
        })
        .collect();
    // Three clients take it through the Lock RPC at the same time.
    let mut clients = Vec::new();
    for _ in 0..3 {
        let channel = server.channel().await;
        let log = log.clone();
        clients.push(tokio::spawn(async move {
            for _ in 0..ROUNDS {
                let lease = grant(&channel, 5).await;
                let mut lock = LockClient::new(channel.clone());
                let held = lock
                    .lock(LockRequest {
                        name: "shared".into(),
                        lease,
                    })
                    .await
                    .unwrap()
                    .into_inner();
                let fence = held.header.unwrap().revision;
                append(&log, &format!("start {fence}"));
                tokio::time::sleep(Duration::from_millis(50)).await;
                append(&log, &format!("end {fence}"));
                lock.unlock(UnlockRequest { key: held.key }).await.unwrap();
                LeaseClient::new(channel.clone())
                    .lease_revoke(LeaseRevokeRequest { id: lease })
                    .await
                    .unwrap();
            }
        }));
    }
    for client in clients {
        client.await.unwrap();
    }
    for mut process in processes {
        assert!(
            process
                .wait_for(Duration::from_secs(60), |l| l == "finished")
                .is_some(),
            "an etcdctl lock loop failed"
        );
    }

    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines.len(),
        2 * 6 * ROUNDS,
        "every holder logged twice:\n{text}"
    );
    let mut last_fence = 0;
    for pair in lines.chunks(2) {
        let start = pair[0].strip_prefix("start ").expect("a holder starts");
        let end = pair[1].strip_prefix("end ").expect("the same holder ends");
        assert_eq!(start, end, "two holders overlapped:\n{text}");
        let fence: i64 = start.parse().unwrap();
        assert!(fence > last_fence, "fencing tokens must grow:\n{text}");
        last_fence = fence;
    }
}

#[test]
fn a_killed_holder_loses_the_lock_when_its_lease_expires() {
    const TTL: u64 = 2;
    let server = Server::start(Kind::Kvstore);
    let ttl = format!("--ttl={TTL}");
    let mut holder = server.etcdctl_background(&["lock", &ttl, "door"], false);
    assert!(holder
        .wait_for(Duration::from_secs(10), |l| l.starts_with("door/"))
        .is_some());
    let mut waiter = server.etcdctl_background(&["lock", &ttl, "door"], false);
    // The waiter queues behind the holder.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let output = server.etcdctl(&["get", "--prefix", "door/", "--keys-only"]);
        let queued = String::from_utf8_lossy(&output.stdout)
            .lines()
            .filter(|line| line.starts_with("door/"))
            .count();
        if queued == 2 {
            break;
        }
        assert!(Instant::now() < deadline, "the waiter never queued");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(waiter
        .wait_for(Duration::from_millis(TTL * 1000 + 500), |_| true)
        .is_none());
    holder.kill();
    let killed = Instant::now();
    assert!(
        waiter
            .wait_for(Duration::from_secs(TTL + 5), |l| l.starts_with("door/"))
            .is_some(),
        "the waiter never got the lock"
    );
    let elapsed = killed.elapsed();
    assert!(
        elapsed <= Duration::from_millis(TTL * 1000 + 1500),
        "lock passed on {elapsed:?} after the kill; TTL is {TTL}s"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_acquire_in_create_revision_order() {
    const WAITERS: usize = 5;
    let server = Server::start(Kind::Kvstore);
    let channel = server.channel().await;
    let holder_lease = grant(&channel, 30).await;
    let held = LockClient::new(channel.clone())
        .lock(LockRequest {
            name: "queue".into(),
            lease: holder_lease,
        })
        .await
        .unwrap()
        .into_inner();
    let order = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let mut waiters = Vec::new();
    let counter = channel.clone();
    for number in 0..WAITERS {
        let channel = channel.clone();
        let order = order.clone();
        waiters.push(tokio::spawn(async move {
            let lease = grant(&channel, 30).await;
            let mut lock = LockClient::new(channel);
            let held = lock
                .lock(LockRequest {
                    name: "queue".into(),
                    lease,
                })
                .await
                .unwrap()
                .into_inner();
            order.lock().push(number);
            lock.unlock(UnlockRequest { key: held.key }).await.unwrap();
        }));
        // Wait until this waiter's key is in line before the next one starts.
        loop {
            let (count, _) = common::prefix_count(counter.clone(), "queue/").await;
            if count == number + 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    assert!(
        order.lock().is_empty(),
        "nobody acquires while the lock is held"
    );
    LockClient::new(channel.clone())
        .unlock(UnlockRequest { key: held.key })
        .await
        .unwrap();
    for waiter in waiters {
        tokio::time::timeout(Duration::from_secs(10), waiter)
            .await
            .expect("waiters finish")
            .unwrap();
    }
    assert_eq!(*order.lock(), (0..WAITERS).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_that_gives_up_leaves_the_line() {
    let server = Server::start(Kind::Kvstore);
    let channel = server.channel().await;
    let holder = grant(&channel, 30).await;
    LockClient::new(channel.clone())
        .lock(LockRequest {
            name: "line".into(),
            lease: holder,
        })
        .await
        .unwrap();
    let waiter = grant(&channel, 30).await;
    let mut lock = LockClient::new(channel.clone());
    let gave_up = tokio::time::timeout(
        Duration::from_millis(500),
        lock.lock(LockRequest {
            name: "line".into(),
            lease: waiter,
        }),
    )
    .await;
    assert!(
        gave_up.is_err(),
        "the lock is held: the waiter cannot get it"
    );
    // The waiter's key is withdrawn once its call is gone.
    let mut kv = KvClient::new(channel);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let keys = kv
            .range(RangeRequest {
                key: "line/".into(),
                range_end: "line0".into(),
                keys_only: true,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .kvs;
        if keys.len() == 1 {
            assert_eq!(keys[0].key, format!("line/{holder:x}").into_bytes());
            break;
        }
        assert!(Instant::now() < deadline, "the waiter's key stayed in line");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn election_campaign_observe_proclaim_resign() {
    let server = Server::start(Kind::Kvstore);
    let channel = server.channel().await;
    let mut election = ElectionClient::new(channel.clone());
    let missing = election
        .leader(LeaderRequest {
            name: "chief".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        (missing.code(), missing.message()),
        (tonic::Code::Unknown, "election: no leader")
    );

    let lease_a = grant(&channel, 30).await;
    let a = election
        .campaign(CampaignRequest {
            name: "chief".into(),
            lease: lease_a,
            value: "a".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .leader
        .unwrap();
    assert_eq!(a.key, format!("chief/{lease_a:x}").into_bytes());

    let mut observe = election
        .observe(LeaderRequest {
            name: "chief".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = observe.message().await.unwrap().unwrap();
    assert_eq!(first.kv.unwrap().value, b"a");

    let lease_b = grant(&channel, 30).await;
    let mut candidate = ElectionClient::new(channel.clone());
    let b = tokio::spawn(async move {
        candidate
            .campaign(CampaignRequest {
                name: "chief".into(),
                lease: lease_b,
                value: "b".into(),
            })
            .await
            .unwrap()
            .into_inner()
            .leader
            .unwrap()
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!b.is_finished(), "b waits while a leads");

    election
        .proclaim(ProclaimRequest {
            leader: Some(a.clone()),
            value: "a2".into(),
        })
        .await
        .unwrap();
    let proclaimed = observe.message().await.unwrap().unwrap();
    assert_eq!(proclaimed.kv.unwrap().value, b"a2");
    let leader = election
        .leader(LeaderRequest {
            name: "chief".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(leader.kv.unwrap().value, b"a2");

    election
        .resign(ResignRequest {
            leader: Some(a.clone()),
        })
        .await
        .unwrap();
    let b = tokio::time::timeout(Duration::from_secs(5), b)
        .await
        .expect("b is elected once a resigns")
        .unwrap();
    let next = observe.message().await.unwrap().unwrap();
    assert_eq!(next.kv.unwrap().value, b"b");

    // a no longer leads: proclaiming with its key fails as etcd's does.
    let stale = election
        .proclaim(ProclaimRequest {
            leader: Some(a),
            value: "again".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(stale.message(), "election: not leader");
    let empty = election
        .proclaim(ProclaimRequest {
            leader: None,
            value: "x".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(empty.message(), "\"leader\" field must be provided");
    assert_eq!(b.key, format!("chief/{lease_b:x}").into_bytes());
}

#[test]
fn etcdctl_elect_observes_and_campaigns() {
    let server = Server::start(Kind::Kvstore);
    let mut observer = server.etcdctl_background(&["elect", "-l", "vote"], false);
    let mut alice = server.etcdctl_background(&["elect", "vote", "alice"], false);
    assert!(alice
        .wait_for(Duration::from_secs(10), |l| l == "alice")
        .is_some());
    assert!(observer
        .wait_for(Duration::from_secs(10), |l| l == "alice")
        .is_some());
    let mut bob = server.etcdctl_background(&["elect", "vote", "bob"], false);
    assert!(bob
        .wait_for(Duration::from_millis(500), |l| l == "bob")
        .is_none());
    // alice's process dies; her lease (TTL 60 by default) is revoked by hand.
    alice.kill();
    let leases = server.etcdctl(&["lease", "list"]);
    let listed = String::from_utf8_lossy(&leases.stdout).to_string();
    let alice_key = observer
        .seen
        .iter()
        .find(|l| l.starts_with("vote/"))
        .cloned()
        .expect("observer printed alice's key");
    let alice_lease = alice_key.trim_start_matches("vote/").to_string();
    assert!(listed.contains(&alice_lease));
    server.etcdctl(&["lease", "revoke", &alice_lease]);
    assert!(bob
        .wait_for(Duration::from_secs(10), |l| l == "bob")
        .is_some());
    assert!(observer
        .wait_for(Duration::from_secs(10), |l| l == "bob")
        .is_some());
}
