//! Bad requests get etcd's gRPC code and message, from etcd and kvstore alike, and
//! the server keeps serving afterwards.

mod common;

use common::{Kind, Server};
use kvstore::pb::etcdserverpb::kv_client::KvClient;
use kvstore::pb::etcdserverpb::request_op::Request as Op;
use kvstore::pb::etcdserverpb::{
    CompactionRequest, DeleteRangeRequest, PutRequest, RangeRequest, RequestOp, TxnRequest,
};
use tonic::Code;

type Outcome = Result<String, (Code, String)>;

fn put_op(key: &str) -> RequestOp {
    RequestOp {
        request: Some(Op::RequestPut(PutRequest {
            key: key.into(),
            value: b"v".to_vec(),
            ..Default::default()
        })),
    }
}

fn txn(success: Vec<RequestOp>) -> TxnRequest {
    TxnRequest {
        compare: vec![],
        success,
        failure: vec![],
    }
}

/// Runs every bad request against one server and records what came back.
async fn probe(server: &Server) -> Vec<(&'static str, Outcome)> {
    let channel = server.channel().await;
    let mut kv = KvClient::new(channel)
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20);
    let status = |error: tonic::Status| (error.code(), error.message().to_string());
    let mut outcomes: Vec<(&'static str, Outcome)> = Vec::new();

    // History: k@2, k@3, k@4, then compact at 3.
    for value in ["1", "2", "3"] {
        kv.put(PutRequest {
            key: b"k".to_vec(),
            value: value.into(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    kv.compact(CompactionRequest {
        revision: 3,
        physical: true,
    })
    .await
    .unwrap();

    let put = |key: &[u8], size: usize| PutRequest {
        key: key.to_vec(),
        value: vec![b'x'; size],
        ..Default::default()
    };
    let result = kv.put(put(b"big", 1_600_000)).await;
    outcomes.push((
        "value over --max-request-bytes",
        result.map(|_| "ok".into()).map_err(status),
    ));
    let result = kv.put(put(b"", 1)).await;
    outcomes.push((
        "put with empty key",
        result.map(|_| "ok".into()).map_err(status),
    ));
    let result = kv
        .delete_range(DeleteRangeRequest {
            key: vec![],
            ..Default::default()
        })
        .await;
    outcomes.push((
        "delete with empty key",
        result.map(|_| "ok".into()).map_err(status),
    ));
    let result = kv
        .range(RangeRequest {
            key: vec![],
            ..Default::default()
        })
        .await;
    outcomes.push((
        "range with empty key",
        result.map(|_| "ok".into()).map_err(status),
    ));
    let result = kv
        .range(RangeRequest {
            key: b"z".to_vec(),
            range_end: b"a".to_vec(),
            ..Default::default()
        })
        .await;
    outcomes.push((
        "inverted range",
        result
            .map(|r| format!("count={} kvs={}", r.get_ref().count, r.get_ref().kvs.len()))
            .map_err(status),
    ));
    let result = kv
        .range(RangeRequest {
            key: b"k".to_vec(),
            revision: 1000,
            ..Default::default()
        })
        .await;
    outcomes.push((
        "future revision",
        result.map(|_| "ok".into()).map_err(status),
    ));
    let result = kv
        .range(RangeRequest {
            key: b"k".to_vec(),
            revision: 2,
            ..Default::default()
        })
        .await;
    outcomes.push((
        "compacted revision",
        result.map(|_| "ok".into()).map_err(status),
    ));
    let result = kv
        .range(RangeRequest {
            key: b"k".to_vec(),
            sort_order: 7,
            ..Default::default()
        })
        .await;
    outcomes.push((
        "invalid sort order",
        result.map(|_| "ok".into()).map_err(status),
    ));
    let ops: Vec<RequestOp> = (0..129).map(|i| put_op(&format!("op{i}"))).collect();
    let result = kv.txn(txn(ops)).await;
    outcomes.push((
        "txn over --max-txn-ops",
        result.map(|_| "ok".into()).map_err(status),
    ));
    let ops: Vec<RequestOp> = (0..128).map(|i| put_op(&format!("op{i}"))).collect();
    let result = kv.txn(txn(ops)).await;
    outcomes.push((
        "txn at --max-txn-ops",
        result
            .map(|r| format!("succeeded={}", r.get_ref().succeeded))
            .map_err(status),
    ));
    let result = kv.txn(txn(vec![put_op("dup"), put_op("dup")])).await;
    outcomes.push((
        "txn with duplicate key",
        result.map(|_| "ok".into()).map_err(status),
    ));
    let nested = RequestOp {
        request: Some(Op::RequestTxn(txn(vec![put_op("dup")]))),
    };
    let result = kv.txn(txn(vec![put_op("dup"), nested])).await;
    outcomes.push((
        "nested txn with duplicate key",
        result.map(|_| "ok".into()).map_err(status),
    ));
    let result = kv.txn(txn(vec![RequestOp { request: None }])).await;
    outcomes.push((
        "txn with empty operation",
        result.map(|_| "ok".into()).map_err(status),
    ));
    let result = kv
        .put(PutRequest {
            key: b"k".to_vec(),
            value: b"v".to_vec(),
            ignore_value: true,
            ..Default::default()
        })
        .await;
    outcomes.push((
        "ignore_value with a value",
        result.map(|_| "ok".into()).map_err(status),
    ));
    let result = kv
        .put(PutRequest {
            key: b"k".to_vec(),
            lease: 5,
            ignore_lease: true,
            ..Default::default()
        })
        .await;
    outcomes.push((
        "ignore_lease with a lease",
        result.map(|_| "ok".into()).map_err(status),
    ));
    let result = kv
        .compact(CompactionRequest {
            revision: 2,
            physical: false,
        })
        .await;
    outcomes.push((
        "compact below compaction",
        result.map(|_| "ok".into()).map_err(status),
    ));
    let result = kv
        .compact(CompactionRequest {
            revision: 9999,
            physical: false,
        })
        .await;
    outcomes.push((
        "compact in the future",
        result.map(|_| "ok".into()).map_err(status),
    ));

    // Still serving.
    kv.put(put(b"after", 3)).await.expect("put after bad input");
    let after = kv
        .range(RangeRequest {
            key: b"after".to_vec(),
            ..Default::default()
        })
        .await
        .expect("range after bad input");
    outcomes.push((
        "still serving",
        Ok(format!("kvs={}", after.get_ref().kvs.len())),
    ));
    outcomes
}

#[test]
fn bad_input_gets_etcd_errors() {
    let etcd = Server::start(Kind::Etcd);
    let kvstore = Server::start(Kind::Kvstore);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let expected = runtime.block_on(probe(&etcd));
    let actual = runtime.block_on(probe(&kvstore));

    let invalid = |message: &str| Err((Code::InvalidArgument, message.to_string()));
    let out_of_range = |message: &str| Err((Code::OutOfRange, message.to_string()));
    let known: Vec<(&str, Outcome)> = vec![
        (
            "value over --max-request-bytes",
            invalid("etcdserver: request is too large"),
        ),
        (
            "put with empty key",
            invalid("etcdserver: key is not provided"),
        ),
        (
            "delete with empty key",
            invalid("etcdserver: key is not provided"),
        ),
        (
            "range with empty key",
            invalid("etcdserver: key is not provided"),
        ),
        ("inverted range", Ok("count=0 kvs=0".into())),
        (
            "future revision",
            out_of_range("etcdserver: mvcc: required revision is a future revision"),
        ),
        (
            "compacted revision",
            out_of_range("etcdserver: mvcc: required revision has been compacted"),
        ),
        (
            "invalid sort order",
            invalid("etcdserver: invalid sort option"),
        ),
        (
            "txn over --max-txn-ops",
            invalid("etcdserver: too many operations in txn request"),
        ),
        ("txn at --max-txn-ops", Ok("succeeded=true".into())),
        (
            "txn with duplicate key",
            invalid("etcdserver: duplicate key given in txn request"),
        ),
        (
            "nested txn with duplicate key",
            invalid("etcdserver: duplicate key given in txn request"),
        ),
        (
            "txn with empty operation",
            invalid("etcdserver: key not found"),
        ),
        (
            "ignore_value with a value",
            invalid("etcdserver: value is provided"),
        ),
        (
            "ignore_lease with a lease",
            invalid("etcdserver: lease is provided"),
        ),
        (
            "compact below compaction",
            out_of_range("etcdserver: mvcc: required revision has been compacted"),
        ),
        (
            "compact in the future",
            out_of_range("etcdserver: mvcc: required revision is a future revision"),
        ),
        ("still serving", Ok("kvs=1".into())),
    ];
    // etcd 3.4 (Debian's) silently ignores an unknown sort order; etcd 3.5 rejects it
    // with "invalid sort option", and kvstore follows 3.5.
    let newer_than_reference = ["invalid sort order"];
    for ((name, etcd_outcome), (_, known_outcome)) in expected.iter().zip(&known) {
        if !newer_than_reference.contains(name) {
            assert_eq!(
                etcd_outcome, known_outcome,
                "Debian's etcd no longer answers {name:?} as this test expects"
            );
        }
    }
    assert_eq!(expected.len(), known.len());
    assert_eq!(actual, known, "kvstore differs from etcd");
}
