//! Watch under load: every watcher of many receives every event in order, and a
//! watcher that stops reading costs bounded memory while writers go on.

mod common;

use std::time::{Duration, Instant};

use common::{Kind, Server};
use futures::StreamExt;
use kvstore::pb::etcdserverpb::kv_client::KvClient;
use kvstore::pb::etcdserverpb::watch_client::WatchClient;
use kvstore::pb::etcdserverpb::watch_request::RequestUnion;
use kvstore::pb::etcdserverpb::{PutRequest, WatchCreateRequest, WatchRequest, WatchResponse};
use tonic::transport::Channel;

/// Opens a watch stream on `prefix` from `start_revision`; returns it once created.
async fn watch_prefix(
    channel: Channel,
    prefix: &str,
    start_revision: i64,
) -> (
    tonic::Streaming<WatchResponse>,
    tokio::sync::mpsc::Sender<WatchRequest>,
) {
    let mut end = prefix.as_bytes().to_vec();
    *end.last_mut().unwrap() += 1;
    let (sender, receiver) = tokio::sync::mpsc::channel(1);
    sender
        .send(WatchRequest {
            request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
                key: prefix.into(),
                range_end: end,
                start_revision,
                ..Default::default()
            })),
        })
        .await
        .unwrap();
    let mut stream = WatchClient::new(channel)
        .watch(tokio_stream::wrappers::ReceiverStream::new(receiver))
        .await
        .unwrap()
        .into_inner();
    let created = stream.message().await.unwrap().unwrap();
    assert!(created.created && !created.canceled);
    (stream, sender)
}

/// Reads a stream until `last` is seen; fails on any revision out of order, missing
/// or repeated.
async fn expect_revisions(
    mut stream: tonic::Streaming<WatchResponse>,
    first: i64,
    last: i64,
) -> Result<(), String> {
    let mut next = first;
    while next <= last {
        let response = stream
            .message()
            .await
            .map_err(|e| e.to_string())?
            .ok_or("stream ended")?;
        for event in response.events {
            let revision = event.kv.map_or(0, |kv| kv.mod_revision);
            if revision != next {
                return Err(format!("expected revision {next}, got {revision}"));
            }
            next += 1;
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_watchers_each_see_every_event_in_order() {
    const WATCHERS: usize = 1000;
    const CONNECTIONS: usize = 10;
    const WRITES: i64 = 10_000;
    let server = Server::start(Kind::Kvstore);
    let mut channels = Vec::new();
    for _ in 0..CONNECTIONS {
        channels.push(server.channel().await);
    }
    let kv = KvClient::new(channels[0].clone());
    let start = common::prefix_count(server.channel().await, "none/")
        .await
        .1
        + 1;
    let last = start + WRITES - 1;
    let mut readers = Vec::new();
    let mut senders = Vec::new();
    for number in 0..WATCHERS {
        let (stream, sender) =
            watch_prefix(channels[number % CONNECTIONS].clone(), "/load/", start).await;
        senders.push(sender);
        readers.push(tokio::spawn(expect_revisions(stream, start, last)));
    }
    // One writer, a few requests in flight.
    let started = Instant::now();
    futures::stream::iter(0..WRITES)
        .map(|i| {
            let mut kv = kv.clone();
            async move {
                kv.put(PutRequest {
                    key: format!("/load/{}", i % 100).into(),
                    value: format!("value-{i}").into(),
                    ..Default::default()
                })
                .await
                .unwrap();
            }
        })
        .buffer_unordered(32)
        .collect::<Vec<()>>()
        .await;
    let written = started.elapsed();
    for reader in readers {
        tokio::time::timeout(Duration::from_secs(120), reader)
            .await
            .expect("every watcher finishes in time")
            .unwrap()
            .unwrap();
    }
    eprintln!(
        "{WRITES} writes in {written:?}; {WATCHERS} watchers received all {} events in {:?}",
        WRITES as usize * WATCHERS,
        started.elapsed()
    );
    drop(senders);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_watcher_keeps_memory_bounded_and_catches_up() {
    const VALUES: i64 = 1000;
    const VALUE_BYTES: usize = 1 << 20;
    let server = Server::start(Kind::Kvstore);
    let mut kv = KvClient::new(server.channel().await);
    let start = common::prefix_count(server.channel().await, "none/")
        .await
        .1
        + 1;
    // A client that watches and then stops reading, on its own connection.
    let (stalled, _sender) = watch_prefix(server.channel().await, "/big/", start).await;
    let before = server.rss_bytes();
    let mut peak = before;
    for i in 0..VALUES {
        kv.put(PutRequest {
            key: format!("/big/{}", i % 10).into(),
            value: vec![b'a' + (i % 26) as u8; VALUE_BYTES],
            ..Default::default()
        })
        .await
        .unwrap();
        if i % 10 == 0 {
            peak = peak.max(server.rss_bytes());
        }
    }
    peak = peak.max(server.rss_bytes());
    let written = VALUES as u64 * VALUE_BYTES as u64;
    let growth = peak.saturating_sub(before);
    eprintln!(
        "wrote {} MiB past a stalled watcher: RSS {} -> peak {} MiB",
        written >> 20,
        before >> 20,
        peak >> 20
    );
    assert!(
        growth < written / 4,
        "server memory grew by {} MiB while {} MiB were written past a stalled watcher",
        growth >> 20,
        written >> 20
    );
    // The watcher resumes reading and gets everything, in order.
    tokio::time::timeout(
        Duration::from_secs(120),
        expect_revisions(stalled, start, start + VALUES - 1),
    )
    .await
    .expect("the stalled watcher catches up in time")
    .unwrap();
}
