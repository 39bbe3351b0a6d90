//! The KV service: Range, Put, DeleteRange, Txn, Compact.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::error::EtcdError;

use crate::pb::etcdserverpb::kv_server::Kv;
use crate::pb::etcdserverpb::range_request::{SortOrder, SortTarget};
use crate::pb::etcdserverpb::request_op::Request as Op;
use crate::pb::etcdserverpb::{
    CompactionRequest, CompactionResponse, DeleteRangeRequest, DeleteRangeResponse, PutRequest,
    PutResponse, RangeRequest, RangeResponse, RequestOp, TxnRequest, TxnResponse,
};
use crate::server::EtcdServer;

/// The KV service of one member.
pub struct KvService {
    server: Arc<EtcdServer>,
}

impl KvService {
    /// A KV service over `server`.
    pub fn new(server: Arc<EtcdServer>) -> KvService {
        KvService { server }
    }
}

fn check_range(request: &RangeRequest) -> Result<(), EtcdError> {
    if request.key.is_empty() {
        return Err(EtcdError::EmptyKey);
    }
    if SortOrder::try_from(request.sort_order).is_err()
        || SortTarget::try_from(request.sort_target).is_err()
    {
        return Err(EtcdError::InvalidSortOption);
    }
    Ok(())
}

fn check_put(request: &PutRequest) -> Result<(), EtcdError> {
    if request.key.is_empty() {
        return Err(EtcdError::EmptyKey);
    }
    if request.ignore_value && !request.value.is_empty() {
        return Err(EtcdError::ValueProvided);
    }
    if request.ignore_lease && request.lease != 0 {
        return Err(EtcdError::LeaseProvided);
    }
    Ok(())
}

fn check_delete(request: &DeleteRangeRequest) -> Result<(), EtcdError> {
    if request.key.is_empty() {
        return Err(EtcdError::EmptyKey);
    }
    Ok(())
}

fn check_op(op: &RequestOp, max_txn_ops: usize) -> Result<(), EtcdError> {
    match &op.request {
        Some(Op::RequestRange(range)) => check_range(range),
        Some(Op::RequestPut(put)) => check_put(put),
        Some(Op::RequestDeleteRange(delete)) => check_delete(delete),
        Some(Op::RequestTxn(txn)) => check_txn(txn, max_txn_ops),
        None => Err(EtcdError::KeyNotFound),
    }
}

/// etcd's structural checks of a transaction: operation count (nested transactions
/// share the budget), keys present, each operation valid.
pub fn check_txn(request: &TxnRequest, max_txn_ops: usize) -> Result<(), EtcdError> {
    let ops = request
        .compare
        .len()
        .max(request.success.len())
        .max(request.failure.len());
    if ops > max_txn_ops {
        return Err(EtcdError::TooManyOps);
    }
    if request.compare.iter().any(|compare| compare.key.is_empty()) {
        return Err(EtcdError::EmptyKey);
    }
    for op in request.success.iter().chain(&request.failure) {
        check_op(op, max_txn_ops - ops)?;
    }
    Ok(())
}

/// A key interval written by deletes: `[start, end)`, or the single key `start`.
struct Interval {
    start: Vec<u8>,
    end: Option<Vec<u8>>,
}

impl Interval {
    fn contains(&self, key: &[u8]) -> bool {
        match &self.end {
            None => self.start.as_slice() == key,
            Some(end) => self.start.as_slice() <= key && key < end.as_slice(),
        }
    }
}

/// etcd's duplicate-key rule: no key may be put twice, or put and deleted, along one
/// path of a transaction (the success and failure branches of a nested transaction
/// are exclusive, so each may put the same key). Returns the keys put and the
/// intervals deleted at this level and below.
fn check_intervals(ops: &[RequestOp]) -> Result<(Vec<Vec<u8>>, Vec<Interval>), EtcdError> {
    let mut deletes: Vec<Interval> = ops
        .iter()
        .filter_map(|op| match &op.request {
            Some(Op::RequestDeleteRange(delete)) => Some(Interval {
                start: delete.key.clone(),
                end: (!delete.range_end.is_empty()).then(|| delete.range_end.clone()),
            }),
            _ => None,
        })
        .collect();
    let mut puts: Vec<Vec<u8>> = Vec::new();
    let mut nested_deletes = Vec::new();
    for op in ops {
        let Some(Op::RequestTxn(nested)) = &op.request else {
            continue;
        };
        let (puts_then, deletes_then) = check_intervals(&nested.success)?;
        let (puts_else, deletes_else) = check_intervals(&nested.failure)?;
        for key in &puts_then {
            if puts.contains(key) || deletes.iter().any(|d| d.contains(key)) {
                return Err(EtcdError::DuplicateKey);
            }
            puts.push(key.clone());
        }
        for key in puts_else {
            if (puts.contains(&key) && !puts_then.contains(&key))
                || deletes.iter().any(|d| d.contains(&key))
            {
                return Err(EtcdError::DuplicateKey);
            }
            if !puts.contains(&key) {
                puts.push(key);
            }
        }
        nested_deletes.extend(deletes_then);
        nested_deletes.extend(deletes_else);
    }
    deletes.extend(nested_deletes);
    for op in ops {
        let Some(Op::RequestPut(put)) = &op.request else {
            continue;
        };
        if puts.contains(&put.key) || deletes.iter().any(|d| d.contains(&put.key)) {
            return Err(EtcdError::DuplicateKey);
        }
        puts.push(put.key.clone());
    }
    Ok((puts, deletes))
}

#[tonic::async_trait]
impl Kv for KvService {
    #[tracing::instrument(level = "debug", skip_all)]
    async fn range(
        &self,
        request: Request<RangeRequest>,
    ) -> Result<Response<RangeResponse>, Status> {
        let request = request.into_inner();
        check_range(&request)?;
        Ok(Response::new(self.server.range(&request).await?))
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn put(&self, request: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
        let request = request.into_inner();
        check_put(&request)?;
        Ok(Response::new(self.server.put(request).await?))
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn delete_range(
        &self,
        request: Request<DeleteRangeRequest>,
    ) -> Result<Response<DeleteRangeResponse>, Status> {
        let request = request.into_inner();
        check_delete(&request)?;
        Ok(Response::new(self.server.delete_range(request).await?))
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn txn(&self, request: Request<TxnRequest>) -> Result<Response<TxnResponse>, Status> {
        let request = request.into_inner();
        check_txn(&request, self.server.limits().max_txn_ops)?;
        check_intervals(&request.success)?;
        check_intervals(&request.failure)?;
        Ok(Response::new(self.server.txn(request).await?))
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn compact(
        &self,
        request: Request<CompactionRequest>,
    ) -> Result<Response<CompactionResponse>, Status> {
        Ok(Response::new(
            self.server.compact(request.into_inner()).await?,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb::etcdserverpb::{DeleteRangeRequest, PutRequest};

    fn put(key: &str) -> RequestOp {
        RequestOp {
            request: Some(Op::RequestPut(PutRequest {
                key: key.into(),
                ..Default::default()
            })),
        }
    }

    fn delete(key: &str, end: &str) -> RequestOp {
        RequestOp {
            request: Some(Op::RequestDeleteRange(DeleteRangeRequest {
                key: key.into(),
                range_end: end.into(),
                ..Default::default()
            })),
        }
    }

    fn nested(success: Vec<RequestOp>, failure: Vec<RequestOp>) -> RequestOp {
        RequestOp {
            request: Some(Op::RequestTxn(TxnRequest {
                compare: vec![],
                success,
                failure,
            })),
        }
    }

    #[test]
    fn duplicate_keys_are_found_along_one_path() {
        assert!(check_intervals(&[put("a"), put("b")]).is_ok());
        assert_eq!(
            check_intervals(&[put("a"), put("a")]).err(),
            Some(EtcdError::DuplicateKey)
        );
        assert_eq!(
            check_intervals(&[delete("a", "c"), put("b")]).err(),
            Some(EtcdError::DuplicateKey)
        );
        assert!(check_intervals(&[delete("a", "c"), put("c")]).is_ok());
        // Both branches of a nested txn may put the same key.
        assert!(check_intervals(&[nested(vec![put("x")], vec![put("x")])]).is_ok());
        assert_eq!(
            check_intervals(&[nested(vec![put("x")], vec![]), put("x")]).err(),
            Some(EtcdError::DuplicateKey)
        );
        assert_eq!(
            check_intervals(&[delete("x", ""), nested(vec![put("x")], vec![])]).err(),
            Some(EtcdError::DuplicateKey)
        );
        // Deletes may overlap each other.
        assert!(check_intervals(&[delete("a", "z"), delete("b", "")]).is_ok());
    }

    #[test]
    fn operation_limit_counts_the_widest_list() {
        let many: Vec<RequestOp> = (0..5).map(|i| put(&format!("k{i}"))).collect();
        let request = TxnRequest {
            compare: vec![],
            success: many.clone(),
            failure: vec![],
        };
        assert!(check_txn(&request, 5).is_ok());
        assert_eq!(check_txn(&request, 4).err(), Some(EtcdError::TooManyOps));
        let empty_op = TxnRequest {
            compare: vec![],
            success: vec![RequestOp { request: None }],
            failure: vec![],
        };
        assert_eq!(
            check_txn(&empty_op, 128).err(),
            Some(EtcdError::KeyNotFound)
        );
    }
}
