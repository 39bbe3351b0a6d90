//! Leases across a crash: granted leases and their keys survive SIGKILL; a member
//! that becomes leader again gives every lease a full TTL (plus an election timeout)
//! instead of expiring it for the time it was down, and afterwards leases that nobody
//! keeps alive expire through Raft, taking their keys with them.

mod common;

use std::time::{Duration, Instant};

use common::{Kind, Server};
use kvstore::pb::etcdserverpb::kv_client::KvClient;
use kvstore::pb::etcdserverpb::lease_client::LeaseClient;
use kvstore::pb::etcdserverpb::{
    LeaseGrantRequest, LeaseKeepAliveRequest, LeaseTimeToLiveRequest, PutRequest, RangeRequest,
};

async fn ttl_left(server: &Server, id: i64) -> (i64, Vec<Vec<u8>>) {
    let response = LeaseClient::new(server.channel().await)
        .lease_time_to_live(LeaseTimeToLiveRequest { id, keys: true })
        .await
        .unwrap()
        .into_inner();
    (response.ttl, response.keys)
}

async fn exists(server: &Server, key: &str) -> bool {
    let response = KvClient::new(server.channel().await)
        .range(RangeRequest {
            key: key.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    response.count == 1
}

async fn keep_alive_once(server: &Server, id: i64) -> i64 {
    let (sender, receiver) = tokio::sync::mpsc::channel(1);
    sender.send(LeaseKeepAliveRequest { id }).await.unwrap();
    let mut responses = LeaseClient::new(server.channel().await)
        .lease_keep_alive(tokio_stream::wrappers::ReceiverStream::new(receiver))
        .await
        .unwrap()
        .into_inner();
    responses.message().await.unwrap().unwrap().ttl
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_survive_a_crash_and_get_a_full_ttl_from_the_new_leader() {
    const TTL: i64 = 3;
    let mut server = Server::start(Kind::Kvstore);
    let mut lease = LeaseClient::new(server.channel().await);
    let kept = lease
        .lease_grant(LeaseGrantRequest { ttl: TTL, id: 0 })
        .await
        .unwrap()
        .into_inner()
        .id;
    let abandoned = lease
        .lease_grant(LeaseGrantRequest { ttl: TTL, id: 0 })
        .await
        .unwrap()
        .into_inner()
        .id;
    let mut kv = KvClient::new(server.channel().await);
    for (key, id) in [("kept", kept), ("abandoned", abandoned)] {
        kv.put(PutRequest {
            key: key.into(),
            value: "v".into(),
            lease: id,
            ..Default::default()
        })
        .await
        .unwrap();
    }

    // Down for longer than the TTL.
    server.kill();
    std::thread::sleep(Duration::from_secs(TTL as u64 + 1));
    server.restart();
    let restarted = Instant::now();

    // The leader granted a fresh TTL plus an election timeout (1 s): nothing expired
    // for the downtime.
    let (left, keys) = ttl_left(&server, kept).await;
    assert!((TTL - 1..=TTL + 1).contains(&left), "remaining TTL {left}");
    assert_eq!(keys, vec![b"kept".to_vec()]);
    assert!(exists(&server, "abandoned").await);

    // One lease is kept alive, the other is not.
    let deadline = restarted + Duration::from_secs(TTL as u64 + 4);
    while Instant::now() < deadline {
        assert_eq!(keep_alive_once(&server, kept).await, TTL);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(exists(&server, "kept").await);
    assert!(
        !exists(&server, "abandoned").await,
        "an abandoned lease expires"
    );
    assert_eq!(ttl_left(&server, abandoned).await.0, -1);
    assert_eq!(keep_alive_once(&server, abandoned).await, 0);
}
