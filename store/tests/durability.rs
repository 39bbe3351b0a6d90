//! Nothing acknowledged is lost: writers put keys while the server is killed with
//! SIGKILL at a random moment; after restart every acknowledged write is there with
//! its revision, and revisions continue from where they were.

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
            let stored = kv
                .range(RangeRequest {
                    key: b"durable/".to_vec(),
                    range_end: b"durable0".to_vec(),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            let stored: HashMap<Vec<u8>, (Vec<u8>, i64)> =
                stored.kvs.into_iter().map(|kv| (kv.key, (kv.value, kv.mod_revision))).collect();
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
