//! Group commit: many concurrent writes share Raft entries (and so fsyncs), visible
//! as far fewer Raft log entries than writes.

mod common;

use common::{Kind, Server};
use kvstore::pb::etcdserverpb::kv_client::KvClient;
use kvstore::pb::etcdserverpb::maintenance_client::MaintenanceClient;
use kvstore::pb::etcdserverpb::{PutRequest, StatusRequest};

const CLIENTS: usize = 200;

#[test]
fn concurrent_writes_share_raft_entries() {
    let server = Server::start(Kind::Kvstore);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let channel = server.channel().await;
        let mut maintenance = MaintenanceClient::new(channel.clone());
        let before = maintenance
            .status(StatusRequest {})
            .await
            .unwrap()
            .into_inner()
            .raft_index;
        let mut writers = Vec::new();
        for client in 0..CLIENTS {
            let mut kv = KvClient::new(channel.clone());
            writers.push(tokio::spawn(async move {
                kv.put(PutRequest {
                    key: format!("concurrent/{client}").into_bytes(),
                    value: b"v".to_vec(),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner()
                .header
                .unwrap()
                .revision
            }));
        }
        let mut revisions = Vec::new();
        for writer in writers {
            revisions.push(writer.await.unwrap());
        }
        revisions.sort_unstable();
        revisions.dedup();
        assert_eq!(revisions.len(), CLIENTS, "every write has its own revision");
        let after = maintenance
            .status(StatusRequest {})
            .await
            .unwrap()
            .into_inner()
            .raft_index;
        let entries = after - before;
        eprintln!("{CLIENTS} concurrent writes took {entries} raft entries");
        assert!(
            entries < CLIENTS as u64 / 2,
            "{CLIENTS} writes took {entries} raft entries: no group commit"
        );
    });
}
