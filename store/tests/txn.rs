//! Transactions etcdctl cannot express (range compares, nested transactions, reads
//! after writes in one transaction) sent over gRPC to Debian's etcd and to kvstore:
//! the responses must be equal once member-specific header fields are cleared.

mod common;

use common::{Kind, Server};
use kvstore::pb::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use kvstore::pb::etcdserverpb::kv_client::KvClient;
use kvstore::pb::etcdserverpb::request_op::Request as Op;
use kvstore::pb::etcdserverpb::response_op::Response as OpResponse;
use kvstore::pb::etcdserverpb::{
    Compare, DeleteRangeRequest, PutRequest, RangeRequest, RequestOp, ResponseHeader, TxnRequest,
    TxnResponse,
};

fn put(key: &str, value: &str) -> RequestOp {
    RequestOp {
        request: Some(Op::RequestPut(PutRequest {
            key: key.into(),
            value: value.into(),
            prev_kv: true,
            ..Default::default()
        })),
    }
}

fn get_prefix(prefix: &str) -> RequestOp {
    let mut end = prefix.as_bytes().to_vec();
    *end.last_mut().unwrap() += 1;
    RequestOp {
        request: Some(Op::RequestRange(RangeRequest {
            key: prefix.into(),
            range_end: end,
            ..Default::default()
        })),
    }
}

fn delete(key: &str) -> RequestOp {
    RequestOp {
        request: Some(Op::RequestDeleteRange(DeleteRangeRequest {
            key: key.into(),
            prev_kv: true,
            ..Default::default()
        })),
    }
}

fn nested(compare: Vec<Compare>, success: Vec<RequestOp>, failure: Vec<RequestOp>) -> RequestOp {
    RequestOp {
        request: Some(Op::RequestTxn(TxnRequest {
            compare,
            success,
            failure,
        })),
    }
}

fn compare(
    key: &str,
    range_end: &str,
    target: CompareTarget,
    result: CompareResult,
    value: TargetUnion,
) -> Compare {
    Compare {
        result: result as i32,
        target: target as i32,
        key: key.into(),
        range_end: range_end.into(),
        target_union: Some(value),
    }
}

/// Every key under app/ has version < 2: a compare over a range.
fn all_younger_than_version_2() -> Compare {
    compare(
        "app/",
        "app0",
        CompareTarget::Version,
        CompareResult::Less,
        TargetUnion::Version(2),
    )
}

fn transactions() -> Vec<TxnRequest> {
    vec![
        // Seed: several keys in one revision.
        TxnRequest {
            compare: vec![],
            success: vec![put("app/a", "1"), put("app/b", "2"), put("app/c", "3")],
            failure: vec![],
        },
        // Range compare: every key under app/ has version < 2.
        TxnRequest {
            compare: vec![all_younger_than_version_2()],
            success: vec![put("app/a", "10"), get_prefix("app/")],
            failure: vec![put("never", "x")],
        },
        // Now app/a has version 2: the same compare fails; failure branch reads and nests.
        TxnRequest {
            compare: vec![all_younger_than_version_2()],
            success: vec![put("never", "x")],
            failure: vec![
                get_prefix("app/"),
                nested(
                    vec![compare(
                        "app/b",
                        "",
                        CompareTarget::Value,
                        CompareResult::Equal,
                        TargetUnion::Value(b"2".to_vec()),
                    )],
                    vec![put("app/d", "4"), delete("app/c")],
                    vec![put("never2", "x")],
                ),
                get_prefix("app/"),
            ],
        },
        // Nested compares see the state before the outer transaction's writes.
        TxnRequest {
            compare: vec![],
            success: vec![
                put("app/e", "5"),
                nested(
                    vec![compare(
                        "app/e",
                        "",
                        CompareTarget::Create,
                        CompareResult::Equal,
                        TargetUnion::CreateRevision(0),
                    )],
                    vec![get_prefix("app/e")],
                    vec![put("never3", "x")],
                ),
            ],
            failure: vec![],
        },
        // MOD and NOT_EQUAL over a range; LEASE target.
        TxnRequest {
            compare: vec![
                compare(
                    "app/",
                    "app0",
                    CompareTarget::Mod,
                    CompareResult::Greater,
                    TargetUnion::ModRevision(1),
                ),
                compare(
                    "app/a",
                    "",
                    CompareTarget::Lease,
                    CompareResult::Equal,
                    TargetUnion::Lease(0),
                ),
                compare(
                    "app/zz",
                    "",
                    CompareTarget::Value,
                    CompareResult::NotEqual,
                    TargetUnion::Value(b"x".to_vec()),
                ),
            ],
            success: vec![put("ok", "1")],
            failure: vec![put("ok", "0")],
        },
        // Read-only transaction.
        TxnRequest {
            compare: vec![compare(
                "ok",
                "",
                CompareTarget::Version,
                CompareResult::Greater,
                TargetUnion::Version(0),
            )],
            success: vec![get_prefix("app/"), get_prefix("ok")],
            failure: vec![get_prefix("never")],
        },
    ]
}

fn clear_header(header: &mut Option<ResponseHeader>) {
    if let Some(header) = header {
        header.cluster_id = 0;
        header.member_id = 0;
        header.raft_term = 0;
    }
}

fn normalize(response: &mut TxnResponse) {
    clear_header(&mut response.header);
    for op in &mut response.responses {
        match op.response.as_mut() {
            Some(OpResponse::ResponseRange(r)) => clear_header(&mut r.header),
            Some(OpResponse::ResponsePut(r)) => clear_header(&mut r.header),
            Some(OpResponse::ResponseDeleteRange(r)) => clear_header(&mut r.header),
            Some(OpResponse::ResponseTxn(r)) => normalize(r),
            None => {}
        }
    }
}

async fn run(server: &Server) -> Vec<TxnResponse> {
    let mut kv = KvClient::new(server.channel().await);
    let mut responses = Vec::new();
    for request in transactions() {
        let mut response = kv.txn(request).await.expect("txn").into_inner();
        normalize(&mut response);
        responses.push(response);
    }
    responses
}

#[test]
fn grpc_transactions_match_etcd() {
    let etcd = Server::start(Kind::Etcd);
    let kvstore = Server::start(Kind::Kvstore);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let expected = runtime.block_on(run(&etcd));
    let actual = runtime.block_on(run(&kvstore));
    // Guard against both being trivially empty: the scenario takes both branches.
    let outcomes: Vec<bool> = expected.iter().map(|r| r.succeeded).collect();
    // Transaction 4 fails: a missing key never compares equal or unequal by value.
    assert_eq!(outcomes, vec![true, true, false, true, false, true]);
    for (number, (expected, actual)) in expected.iter().zip(&actual).enumerate() {
        assert_eq!(actual, expected, "transaction {number} differs from etcd");
    }
}
