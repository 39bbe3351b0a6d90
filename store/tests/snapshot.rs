//! `--snapshot-count`: after that many applied requests a snapshot (a RocksDB
//! checkpoint) is taken and the Raft log behind it is purged; a restart after a purge
//! recovers every key.

mod common;

use common::{Kind, Server};
use kvstore::pb::etcdserverpb::kv_client::KvClient;
use kvstore::pb::etcdserverpb::{PutRequest, RangeRequest};
use kvstore::storage::{meta_key, Storage, CF_META, CF_RAFT_LOG};

const PUTS: usize = 6500;

#[test]
fn snapshots_purge_the_log_and_restart_recovers() {
    let mut server = Server::start_with(Kind::Kvstore, &["--snapshot-count=500"]);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let channel = server.channel().await;
        let mut kv = KvClient::new(channel);
        // One client, one request per Raft entry: the log grows by one entry per put.
        for i in 0..PUTS {
            kv.put(PutRequest {
                key: format!("snap/{i:05}").into_bytes(),
                value: format!("value-{i}").into_bytes(),
                ..Default::default()
            })
            .await
            .unwrap();
        }
    });
    // Let the last snapshot trigger (every 200 ms) and its purge happen.
    std::thread::sleep(std::time::Duration::from_millis(1500));
    server.kill();

    {
        let storage = Storage::open(&server.data_dir.join("member")).unwrap();
        assert!(
            storage.get(CF_META, meta_key::SNAPSHOT).unwrap().is_some(),
            "no snapshot recorded"
        );
        let mut log = storage
            .db()
            .iterator_cf(storage.cf(CF_RAFT_LOG), rocksdb::IteratorMode::Start);
        let (first, _) = log.next().expect("log has entries").unwrap();
        let first = u64::from_be_bytes(first.as_ref().try_into().unwrap());
        assert!(first > 100, "log was not purged: first entry is {first}");
        let checkpoints = std::fs::read_dir(server.data_dir.join("snap"))
            .unwrap()
            .filter(|entry| {
                entry
                    .as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .starts_with("checkpoint-")
            })
            .count();
        assert_eq!(checkpoints, 1, "old checkpoints are removed");
    }

    server.restart();
    runtime.block_on(async {
        let channel = server.channel().await;
        let mut kv = KvClient::new(channel);
        let response = kv
            .range(RangeRequest {
                key: b"snap/".to_vec(),
                range_end: b"snap0".to_vec(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(response.kvs.len(), PUTS);
        for (i, kv) in response.kvs.iter().enumerate() {
            assert_eq!(kv.value, format!("value-{i}").into_bytes());
        }
        assert_eq!(response.header.unwrap().revision, PUTS as i64 + 1);
    });
}
