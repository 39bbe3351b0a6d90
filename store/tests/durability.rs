//! Nothing acknowledged is lost: writers put keys while the server is killed with
//! SIGKILL at a random moment; after restart every acknowledged write is there with
//! its revision, and revisions continue from where they were. A member whose disk
//! fails under Raft exits, as etcd does, and keeps everything it acknowledged.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Kind, Server};
use kvstore::pb::etcdserverpb::kv_client::KvClient;
use kvstore::pb::etcdserverpb::{PutRequest, RangeRequest};
use rand::Rng;
use tonic::transport::Channel;

const WRITERS: usize = 16;

async fn client(server: &Server) -> KvClient<Channel> {
    let channel = server.channel().await;
    KvClient::new(channel)
}

/// key -> (value, revision) of every acknowledged put.
type Acknowledged = Arc<Mutex<HashMap<Vec<u8>, (Vec<u8>, i64)>>>;

async fn write_until_failure(
    mut kv: KvClient<Channel>,
    writer: usize,
    cycle: usize,
    acknowledged: Acknowledged,
) {
    for sequence in 0.. {
        // Keys repeat across cycles, so values must be checked, not just presence.
        let key = format!("durable/{writer}/{}", sequence % 500).into_bytes();
        let value = format!("cycle{cycle}-seq{sequence}").into_bytes();
        let request = PutRequest {
            key: key.clone(),
            value: value.clone(),
            ..Default::default()
        };
        match kv.put(request).await {
            Ok(response) => {
                let revision = response.into_inner().header.expect("header").revision;
                acknowledged.lock().unwrap().insert(key, (value, revision));
            }
            Err(_) => return,
        }
    }
}

/// key -> (value, revision) of every stored key the writers write.
async fn stored(kv: &mut KvClient<Channel>) -> HashMap<Vec<u8>, (Vec<u8>, i64)> {
    let stored = kv
        .range(RangeRequest {
            key: b"durable/".to_vec(),
            range_end: b"durable0".to_vec(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    stored
        .kvs
        .into_iter()
        .map(|kv| (kv.key, (kv.value, kv.mod_revision)))
        .collect()
}

#[test]
fn acknowledged_writes_survive_sigkill() {
    let mut server = Server::start(Kind::Kvstore);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let acknowledged: Acknowledged = Arc::default();
    let mut rng = rand::thread_rng();
    for cycle in 0..3 {
        let kill_after = Duration::from_millis(rng.gen_range(300..1500));
        runtime.block_on(async {
            let mut writers = Vec::new();
            for writer in 0..WRITERS {
                let kv = client(&server).await;
                writers.push(tokio::spawn(write_until_failure(
                    kv,
                    writer,
                    cycle,
                    acknowledged.clone(),
                )));
            }
            tokio::time::sleep(kill_after).await;
            server.kill();
            for writer in writers {
                writer.await.unwrap();
            }
        });
        let expected = acknowledged.lock().unwrap().clone();
        assert!(
            !expected.is_empty(),
            "no write was acknowledged before the kill"
        );
        let highest = expected
            .values()
            .map(|(_, revision)| *revision)
            .max()
            .unwrap();

        server.restart();
        runtime.block_on(async {
            let mut kv = client(&server).await;
            let stored = stored(&mut kv).await;
            let mut lost = 0;
            for (key, (value, revision)) in &expected {
                match stored.get(key) {
                    // A later unacknowledged put of the same key may also have landed.
                    Some((stored_value, stored_revision)) if stored_revision >= revision => {
                        if stored_revision == revision {
                            assert_eq!(stored_value, value, "key {:?}", String::from_utf8_lossy(key));
                        }
                    }
                    _ => lost += 1,
                }
            }
            assert_eq!(lost, 0, "cycle {cycle}: {lost} of {} acknowledged writes lost", expected.len());
            let next = kv
                .put(PutRequest {
                    key: b"after-restart".to_vec(),
                    value: b"x".to_vec(),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            let next_revision = next.header.unwrap().revision;
            assert!(next_revision > highest, "revision went back: {next_revision} after {highest}");
            eprintln!(
                "cycle {cycle}: killed after {kill_after:?}, {} keys acknowledged, highest revision {highest}, next {next_revision}",
                expected.len()
            );
        });
    }
}

/// A snapshot that cannot be written stops Raft. The member then exits with an error
/// instead of answering "etcdserver: server stopped" for ever, so that a supervisor
/// (systemd, a StatefulSet) restarts it; restarted, it has every acknowledged write.
#[test]
fn a_member_whose_disk_fails_exits_and_keeps_what_it_acknowledged() {
    let mut server = Server::start_with(Kind::Kvstore, &["--snapshot-count=50"]);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    // The snapshot directory becomes a file: the next snapshot cannot be written.
    let snap = server.data_dir.join("snap");
    std::fs::remove_dir_all(&snap).unwrap();
    std::fs::write(&snap, b"not a directory").unwrap();
    let acknowledged: Acknowledged = Arc::default();
    runtime.block_on(async {
        let kv = client(&server).await;
        tokio::time::timeout(
            Duration::from_secs(20),
            write_until_failure(kv, 0, 0, acknowledged.clone()),
        )
        .await
        .expect("puts went on for 20 s past a snapshot that cannot be written");
    });
    let written = acknowledged.lock().unwrap().len();
    assert!(written >= 50, "only {written} puts before the failure");
    let status = server
        .wait_exit(Duration::from_secs(10))
        .unwrap_or_else(|| panic!("the member did not exit; log:\n{}", server.log_text()));
    assert!(!status.success(), "exit status {status}");
    let log = server.log_text();
    assert!(log.contains("raft stopped on an error"), "log:\n{log}");

    std::fs::remove_file(&snap).unwrap();
    server.restart();
    runtime.block_on(async {
        let stored = stored(&mut client(&server).await).await;
        for (key, (value, revision)) in acknowledged.lock().unwrap().iter() {
            let found = stored.get(key).map(|(value, revision)| (value, revision));
            assert_eq!(
                found,
                Some((value, revision)),
                "key {:?}",
                String::from_utf8_lossy(key)
            );
        }
    });
}
