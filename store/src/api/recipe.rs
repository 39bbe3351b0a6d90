//! The building blocks etcd's concurrency recipes (mutex, election) are made of, run
//! inside the server instead of through a client: ownership by lease, order by
//! create revision, waiting through watches.

use std::sync::Arc;

use tonic::Status;

use crate::mvcc::watch::{Delivery, WatchSpec};
use crate::pb::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use crate::pb::etcdserverpb::range_request::{SortOrder, SortTarget};
use crate::pb::etcdserverpb::request_op::Request as Op;
use crate::pb::etcdserverpb::response_op::Response as OpResponse;
use crate::pb::etcdserverpb::{
    Compare, DeleteRangeRequest, PutRequest, RangeRequest, RangeResponse, RequestOp,
    ResponseHeader, TxnRequest, TxnResponse,
};
use crate::pb::mvccpb::event::EventType;
use crate::pb::mvccpb::KeyValue;
use crate::server::EtcdServer;

/// The end of the range holding every key that starts with `prefix`, as etcd
/// computes it ("\0", every key, when the prefix is all 0xff bytes).
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// `create_revision(key) == revision`.
pub fn created_at(key: &[u8], revision: i64) -> Compare {
    Compare {
        result: CompareResult::Equal as i32,
        target: CompareTarget::Create as i32,
        key: key.to_vec(),
        range_end: Vec::new(),
        target_union: Some(TargetUnion::CreateRevision(revision)),
    }
}

/// A Put operation.
pub fn put_op(key: &[u8], value: &[u8], lease: i64) -> RequestOp {
    RequestOp {
        request: Some(Op::RequestPut(PutRequest {
            key: key.to_vec(),
            value: value.to_vec(),
            lease,
            ..Default::default()
        })),
    }
}

/// A Range operation.
pub fn range_op(request: RangeRequest) -> RequestOp {
    RequestOp {
        request: Some(Op::RequestRange(request)),
    }
}

/// A DeleteRange operation for one key.
pub fn delete_op(key: &[u8]) -> RequestOp {
    RequestOp {
        request: Some(Op::RequestDeleteRange(DeleteRangeRequest {
            key: key.to_vec(),
            ..Default::default()
        })),
    }
}

/// One key.
pub fn get(key: &[u8]) -> RangeRequest {
    RangeRequest {
        key: key.to_vec(),
        ..Default::default()
    }
}

/// The key under `prefix` created first (the owner or leader).
pub fn first_created(prefix: &[u8]) -> RangeRequest {
    RangeRequest {
        key: prefix.to_vec(),
        range_end: prefix_end(prefix),
        sort_target: SortTarget::Create as i32,
        sort_order: SortOrder::Ascend as i32,
        limit: 1,
        ..Default::default()
    }
}

/// The key under `prefix` created last at or before `max_create_revision`.
pub fn last_created_before(prefix: &[u8], max_create_revision: i64) -> RangeRequest {
    RangeRequest {
        key: prefix.to_vec(),
        range_end: prefix_end(prefix),
        sort_target: SortTarget::Create as i32,
        sort_order: SortOrder::Descend as i32,
        limit: 1,
        max_create_revision,
        ..Default::default()
    }
}

/// The key-values of operation `index` of a transaction's response.
pub fn range_result(response: &TxnResponse, index: usize) -> &[KeyValue] {
    match response
        .responses
        .get(index)
        .and_then(|r| r.response.as_ref())
    {
        Some(OpResponse::ResponseRange(RangeResponse { kvs, .. })) => kvs,
        _ => &[],
    }
}

/// A transaction.
pub async fn txn(
    server: &EtcdServer,
    compare: Vec<Compare>,
    success: Vec<RequestOp>,
    failure: Vec<RequestOp>,
) -> Result<TxnResponse, Status> {
    Ok(server
        .txn(TxnRequest {
            compare,
            success,
            failure,
        })
        .await?)
}

/// A gRPC status for an error that etcd's recipes return as plain Go errors.
pub fn recipe_error(message: &str) -> Status {
    Status::unknown(message)
}

/// Waits until `key` is deleted at or after `revision`.
pub async fn wait_delete(server: &EtcdServer, key: &[u8], revision: i64) -> Result<(), Status> {
    let mut stream = server.mvcc().watch_stream();
    stream
        .watch(&WatchSpec {
            key: key.to_vec(),
            start_revision: revision,
            ..Default::default()
        })
        .map_err(|e| Status::internal(e.to_string()))?;
    loop {
        match stream.next().await {
            Some(Delivery::Events { events, .. }) => {
                if events.iter().any(|e| e.r#type == EventType::Delete as i32) {
                    return Ok(());
                }
            }
            Some(Delivery::Compacted { .. }) => {
                return Err(crate::error::EtcdError::Compacted.into());
            }
            Some(Delivery::Progress { .. }) => {}
            None => return Err(crate::error::EtcdError::Stopped.into()),
        }
    }
}

/// Waits until every key under `prefix` created at or before `max_create_revision`
/// is gone; returns the header of the last check.
pub async fn wait_deletes(
    server: &EtcdServer,
    prefix: &[u8],
    max_create_revision: i64,
) -> Result<Option<ResponseHeader>, Status> {
    loop {
        let response = server
            .range(&last_created_before(prefix, max_create_revision))
            .await?;
        let Some(last) = response.kvs.first() else {
            return Ok(response.header);
        };
        let revision = response.header.as_ref().map_or(0, |h| h.revision);
        wait_delete(server, &last.key, revision).await?;
    }
}

/// Deletes a key the caller placed (when created at `revision`) unless disarmed: a
/// waiter whose client went away must not stay in line.
pub struct Withdraw {
    server: Arc<EtcdServer>,
    /// The user the key was created for; the withdrawal acts for the same one.
    caller: Result<Option<crate::pb::kvstorepb::AuthInfo>, crate::error::EtcdError>,
    key: Vec<u8>,
    revision: i64,
    armed: bool,
}

impl Withdraw {
    /// Arms a withdrawal of `key` created at `revision`.
    pub fn new(server: Arc<EtcdServer>, key: Vec<u8>, revision: i64) -> Withdraw {
        Withdraw {
            server,
            caller: crate::server::caller(),
            key,
            revision,
            armed: true,
        }
    }

    /// The key stays.
    pub fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for Withdraw {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let server = self.server.clone();
        let key = std::mem::take(&mut self.key);
        let revision = self.revision;
        let withdraw = async move {
            let _ = txn(
                &server,
                vec![created_at(&key, revision)],
                vec![delete_op(&key)],
                Vec::new(),
            )
            .await;
        };
        crate::server::spawn_as(self.caller.clone(), withdraw);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_ends_like_etcd() {
        assert_eq!(prefix_end(b"lock/"), b"lock0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff\xff"), vec![0]);
    }
}
