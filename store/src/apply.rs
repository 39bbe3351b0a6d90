//! Apply: the only code that changes the key-value state. Deterministic: the same
//! request on the same state gives the same result on every member. Requests were
//! validated by the api layer; what depends on the state (revisions, existing keys)
//! is checked here.

use crate::error::EtcdError;
use crate::mvcc::{self, KeyRange, ReadView, Writer};
use crate::pb::etcdserverpb::alarm_request::AlarmAction;
use crate::pb::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use crate::pb::etcdserverpb::request_op::Request as Op;
use crate::pb::etcdserverpb::response_op::Response as OpResponse;
use crate::pb::etcdserverpb::{AlarmMember, AlarmRequest, AlarmResponse, AlarmType};
use crate::pb::etcdserverpb::{
    CompactionRequest, CompactionResponse, Compare, DeleteRangeRequest, DeleteRangeResponse,
    LeaseGrantRequest, LeaseGrantResponse, LeaseRevokeRequest, LeaseRevokeResponse, PutRequest,
    PutResponse, RangeResponse, ResponseHeader, ResponseOp, TxnRequest, TxnResponse,
};
use crate::pb::kvstorepb::internal_raft_request::Request;
use crate::pb::kvstorepb::internal_raft_response::Response;
use crate::pb::kvstorepb::{AuthApplied, InternalRaftRequest, InternalRaftResponse};
use crate::pb::mvccpb::KeyValue;

/// Applies one proposal. Client errors become an error response; only storage
/// failures are returned as `Err`.
#[tracing::instrument(level = "trace", skip_all)]
pub fn apply(
    writer: &mut Writer<'_>,
    request: &InternalRaftRequest,
) -> Result<InternalRaftResponse, mvcc::Error> {
    // As etcd's applier chain: permissions first, then the space quota; both
    // hold while an alarm is raised.
    if let Err(error) = check_permission(writer, request) {
        return Ok(InternalRaftResponse {
            response: Some(Response::Error(error.number())),
        });
    }
    if writer.alarmed(AlarmType::Nospace as i32) && grows(request) {
        return Ok(InternalRaftResponse {
            response: Some(Response::Error(EtcdError::NoSpace.number())),
        });
    }
    let result = match &request.request {
        Some(Request::Put(put_request)) => put(writer, put_request).map(Response::Put),
        Some(Request::DeleteRange(delete)) => {
            delete_range(writer, delete).map(Response::DeleteRange)
        }
        Some(Request::Txn(txn_request)) => txn(writer, txn_request).map(Response::Txn),
        Some(Request::Compaction(compaction)) => {
            compact(writer, compaction).map(Response::Compaction)
        }
        Some(Request::LeaseGrant(grant)) => lease_grant(writer, grant).map(Response::LeaseGrant),
        Some(Request::LeaseRevoke(revoke)) => {
            lease_revoke(writer, revoke).map(Response::LeaseRevoke)
        }
        Some(Request::Alarm(alarm)) => Ok(Response::Alarm(apply_alarm(writer, alarm))),
        Some(Request::MemberAttributes(attributes)) => {
            writer.put_meta(
                &crate::storage::meta_key::member_attributes(attributes.id),
                &prost::Message::encode_to_vec(attributes),
            );
            Ok(Response::MemberAttributes(attributes.clone()))
        }
        Some(Request::Authenticate(authenticate)) => {
            let state = writer.auth();
            if !state.enabled() {
                Err(EtcdError::AuthNotEnabled.into())
            } else if state.user(&authenticate.name).is_none() {
                Err(EtcdError::AuthFailed.into())
            } else {
                state.add_token(
                    &authenticate.simple_token,
                    &authenticate.name,
                    writer.token_ttl(),
                );
                Ok(auth_applied(writer))
            }
        }
        Some(Request::AuthEnable(_)) => change_auth(writer, |state| state.enable()),
        Some(Request::AuthDisable(_)) => change_auth(writer, |state| {
            state.disable();
            Ok(())
        }),
        Some(Request::UserAdd(add)) => change_auth(writer, |state| state.user_add(add)),
        Some(Request::UserDelete(delete)) => {
            change_auth(writer, |state| state.user_delete(&delete.name))
        }
        Some(Request::UserChangePassword(change)) => {
            change_auth(writer, |state| state.user_change_password(change))
        }
        Some(Request::UserGrantRole(grant)) => {
            change_auth(writer, |state| state.user_grant_role(grant))
        }
        Some(Request::UserRevokeRole(revoke)) => {
            change_auth(writer, |state| state.user_revoke_role(revoke))
        }
        Some(Request::RoleAdd(add)) => change_auth(writer, |state| state.role_add(&add.name)),
        Some(Request::RoleDelete(delete)) => {
            change_auth(writer, |state| state.role_delete(&delete.role))
        }
        Some(Request::RoleGrantPermission(grant)) => {
            change_auth(writer, |state| state.role_grant_permission(grant))
        }
        Some(Request::RoleRevokePermission(revoke)) => {
            change_auth(writer, |state| state.role_revoke_permission(revoke))
        }
        None => Ok(Response::Error(EtcdError::NotCapable.number())),
    };
    let response = match result {
        Ok(response) => response,
        Err(mvcc::Error::Etcd(error)) => Response::Error(error.number()),
        Err(other) => return Err(other),
    };
    Ok(InternalRaftResponse {
        response: Some(response),
    })
}

/// The permission checks of etcd's auth applier, made where the request takes
/// effect: what the request's user may do is decided by the auth store as of this
/// entry, and a request checked against an older auth revision is refused.
fn check_permission(writer: &Writer<'_>, request: &InternalRaftRequest) -> Result<(), EtcdError> {
    let auth = request.auth.as_ref();
    let state = writer.auth();
    if !state.enabled() {
        return Ok(());
    }
    match &request.request {
        Some(Request::Put(put)) => state.check_put(auth, put, writer.leases()),
        Some(Request::DeleteRange(delete)) => state.check_delete(auth, delete),
        Some(Request::Txn(txn)) => state.check_txn(auth, txn, writer.leases()),
        Some(Request::LeaseRevoke(revoke)) => {
            state.check_lease_keys(auth, revoke.id, writer.leases())
        }
        Some(Request::LeaseGrant(_)) | Some(Request::Authenticate(_)) => Ok(()),
        Some(Request::MemberAttributes(_)) | None => Ok(()),
        // Compaction and alarms change what every user sees; auth management is
        // the root's.
        Some(_) => state.check_admin(auth),
    }
}

fn auth_applied(writer: &Writer<'_>) -> Response {
    Response::Auth(AuthApplied {
        revision: writer.auth().revision(),
    })
}

fn change_auth(
    writer: &mut Writer<'_>,
    change: impl FnOnce(&mut crate::auth::AuthState) -> Result<(), EtcdError>,
) -> Result<Response, mvcc::Error> {
    writer.change_auth(change)?;
    Ok(auth_applied(writer))
}

/// Whether a request may grow the store: refused while the NOSPACE alarm is raised,
/// as etcd's capped applier does (deletes, compaction and alarms go through).
fn grows(request: &InternalRaftRequest) -> bool {
    fn txn_puts(txn: &TxnRequest) -> bool {
        txn.success
            .iter()
            .chain(&txn.failure)
            .any(|op| match &op.request {
                Some(Op::RequestPut(_)) => true,
                Some(Op::RequestTxn(nested)) => txn_puts(nested),
                _ => false,
            })
    }
    match &request.request {
        Some(Request::Put(_)) | Some(Request::LeaseGrant(_)) => true,
        Some(Request::Txn(txn)) => txn_puts(txn),
        _ => false,
    }
}

fn apply_alarm(writer: &mut Writer<'_>, request: &AlarmRequest) -> AlarmResponse {
    let mut changed = Vec::new();
    let action = AlarmAction::try_from(request.action).unwrap_or(AlarmAction::Get);
    match action {
        AlarmAction::Get => {}
        AlarmAction::Activate => {
            if request.alarm != AlarmType::None as i32
                && writer.set_alarm(request.member_id, request.alarm, true)
            {
                tracing::warn!(member = %format!("{:x}", request.member_id), alarm = request.alarm, "alarm raised");
            }
            changed.push(AlarmMember {
                member_id: request.member_id,
                alarm: request.alarm,
            });
        }
        AlarmAction::Deactivate => {
            if writer.set_alarm(request.member_id, request.alarm, false) {
                tracing::info!(member = %format!("{:x}", request.member_id), alarm = request.alarm, "alarm cleared");
                changed.push(AlarmMember {
                    member_id: request.member_id,
                    alarm: request.alarm,
                });
            }
        }
    }
    AlarmResponse {
        header: header(writer.current_revision()),
        alarms: changed,
    }
}

fn header(revision: i64) -> Option<ResponseHeader> {
    Some(ResponseHeader {
        revision,
        ..Default::default()
    })
}

fn put(writer: &mut Writer<'_>, request: &PutRequest) -> Result<PutResponse, mvcc::Error> {
    let response = put_in_txn(writer, request)?;
    writer.end_revision();
    Ok(response)
}

fn put_in_txn(writer: &mut Writer<'_>, request: &PutRequest) -> Result<PutResponse, mvcc::Error> {
    // The previous value is read only when the request needs it.
    let previous = if request.prev_kv || request.ignore_value || request.ignore_lease {
        writer.get(&request.key)?
    } else {
        None
    };
    if (request.ignore_value || request.ignore_lease) && previous.is_none() {
        return Err(EtcdError::KeyNotFound.into());
    }
    check_lease(&*writer, request)?;
    let value = match (&previous, request.ignore_value) {
        (Some(previous), true) => previous.value.clone(),
        _ => request.value.clone(),
    };
    let lease = match (&previous, request.ignore_lease) {
        (Some(previous), true) => previous.lease,
        _ => request.lease,
    };
    let revision = writer.put(&request.key, value, lease)?;
    Ok(PutResponse {
        header: header(revision.main),
        prev_kv: if request.prev_kv { previous } else { None },
    })
}

fn delete_range(
    writer: &mut Writer<'_>,
    request: &DeleteRangeRequest,
) -> Result<DeleteRangeResponse, mvcc::Error> {
    let response = delete_in_txn(writer, request)?;
    writer.end_revision();
    Ok(response)
}

fn delete_in_txn(
    writer: &mut Writer<'_>,
    request: &DeleteRangeRequest,
) -> Result<DeleteRangeResponse, mvcc::Error> {
    let (deleted, prev_kvs) = writer.delete_range(
        &KeyRange::new(&request.key, &request.range_end),
        request.prev_kv,
    )?;
    Ok(DeleteRangeResponse {
        header: header(writer.current_revision()),
        deleted,
        prev_kvs,
    })
}

/// A Put may only attach a lease that exists.
fn check_lease(view: &impl ReadView, request: &PutRequest) -> Result<(), EtcdError> {
    if request.lease != 0 && view.leases().get(request.lease).is_none() {
        return Err(EtcdError::LeaseNotFound);
    }
    Ok(())
}

fn lease_grant(
    writer: &mut Writer<'_>,
    request: &LeaseGrantRequest,
) -> Result<LeaseGrantResponse, mvcc::Error> {
    if request.id == 0 {
        return Err(EtcdError::LeaseNotFound.into());
    }
    if request.ttl > mvcc::lease::MAX_LEASE_TTL {
        return Err(EtcdError::LeaseTtlTooLarge.into());
    }
    writer.grant_lease(request.id, request.ttl)?;
    Ok(LeaseGrantResponse {
        header: header(writer.current_revision()),
        id: request.id,
        ttl: request.ttl,
        error: String::new(),
    })
}

fn lease_revoke(
    writer: &mut Writer<'_>,
    request: &LeaseRevokeRequest,
) -> Result<LeaseRevokeResponse, mvcc::Error> {
    writer.revoke_lease(request.id)?;
    let revision = writer.end_revision();
    tracing::debug!(lease = %format!("{:x}", request.id), revision, "revoked lease");
    Ok(LeaseRevokeResponse {
        header: header(revision),
    })
}

fn compact(
    writer: &mut Writer<'_>,
    request: &CompactionRequest,
) -> Result<CompactionResponse, mvcc::Error> {
    writer.compact(request.revision)?;
    tracing::info!(revision = request.revision, "compacted history");
    Ok(CompactionResponse {
        header: header(writer.current_revision()),
    })
}

/// Evaluates one compare against the state before the transaction's writes.
pub fn compare(view: &impl ReadView, compare: &Compare) -> Result<bool, mvcc::Error> {
    let at = view.current_revision();
    let found = mvcc::find(
        view,
        &KeyRange::new(&compare.key, &compare.range_end),
        at,
        0,
        false,
    )?;
    let target = CompareTarget::try_from(compare.target).unwrap_or(CompareTarget::Version);
    if found.kvs.is_empty() {
        // A missing key compares as all zeroes, except that no value equals it.
        if target == CompareTarget::Value {
            return Ok(false);
        }
        return Ok(compare_one(compare, target, &KeyValue::default()));
    }
    Ok(found.kvs.iter().all(|kv| compare_one(compare, target, kv)))
}

fn compare_one(compare: &Compare, target: CompareTarget, kv: &KeyValue) -> bool {
    let ordering = match (target, &compare.target_union) {
        (CompareTarget::Value, Some(TargetUnion::Value(value))) => {
            kv.value.as_slice().cmp(value.as_slice())
        }
        (CompareTarget::Value, _) => kv.value.as_slice().cmp(&[]),
        (CompareTarget::Version, Some(TargetUnion::Version(version))) => kv.version.cmp(version),
        (CompareTarget::Create, Some(TargetUnion::CreateRevision(revision))) => {
            kv.create_revision.cmp(revision)
        }
        (CompareTarget::Mod, Some(TargetUnion::ModRevision(revision))) => {
            kv.mod_revision.cmp(revision)
        }
        (CompareTarget::Lease, Some(TargetUnion::Lease(lease))) => kv.lease.cmp(lease),
        (CompareTarget::Version, _) => kv.version.cmp(&0),
        (CompareTarget::Create, _) => kv.create_revision.cmp(&0),
        (CompareTarget::Mod, _) => kv.mod_revision.cmp(&0),
        (CompareTarget::Lease, _) => kv.lease.cmp(&0),
    };
    match CompareResult::try_from(compare.result).unwrap_or(CompareResult::Equal) {
        CompareResult::Equal => ordering.is_eq(),
        CompareResult::NotEqual => ordering.is_ne(),
        CompareResult::Greater => ordering.is_gt(),
        CompareResult::Less => ordering.is_lt(),
    }
}

/// The branch each (nested) transaction takes, decided before any write, as etcd does.
fn branches(
    view: &impl ReadView,
    request: &TxnRequest,
    path: &mut Vec<bool>,
) -> Result<(), mvcc::Error> {
    let mut succeeded = true;
    for condition in &request.compare {
        if !compare(view, condition)? {
            succeeded = false;
            break;
        }
    }
    path.push(succeeded);
    let ops = if succeeded {
        &request.success
    } else {
        &request.failure
    };
    for op in ops {
        if let Some(Op::RequestTxn(nested)) = &op.request {
            branches(view, nested, path)?;
        }
    }
    Ok(())
}

/// Checks what depends on state before anything is written: put options that need an
/// existing key, and revisions of reads.
fn check_ops(
    view: &impl ReadView,
    request: &TxnRequest,
    path: &[bool],
    position: &mut usize,
) -> Result<(), mvcc::Error> {
    let ops = if path[*position] {
        &request.success
    } else {
        &request.failure
    };
    *position += 1;
    for op in ops {
        match &op.request {
            Some(Op::RequestRange(range)) => {
                mvcc::read_revision(view, range.revision)?;
            }
            Some(Op::RequestPut(put)) => {
                if put.ignore_value || put.ignore_lease {
                    let at = view.current_revision();
                    if mvcc::find(view, &KeyRange::new(&put.key, b""), at, 0, true)?.count == 0 {
                        return Err(EtcdError::KeyNotFound.into());
                    }
                }
                check_lease(view, put)?;
            }
            Some(Op::RequestTxn(nested)) => check_ops(view, nested, path, position)?,
            _ => {}
        }
    }
    Ok(())
}

/// What a transaction's operations run against: the apply layer's writer, or a
/// reader for transactions that only read.
pub trait TxnView: ReadView {
    /// A Put inside the transaction.
    fn put_op(&mut self, request: &PutRequest) -> Result<PutResponse, mvcc::Error>;
    /// A DeleteRange inside the transaction.
    fn delete_op(
        &mut self,
        request: &DeleteRangeRequest,
    ) -> Result<DeleteRangeResponse, mvcc::Error>;
}

impl TxnView for Writer<'_> {
    fn put_op(&mut self, request: &PutRequest) -> Result<PutResponse, mvcc::Error> {
        put_in_txn(self, request)
    }
    fn delete_op(
        &mut self,
        request: &DeleteRangeRequest,
    ) -> Result<DeleteRangeResponse, mvcc::Error> {
        delete_in_txn(self, request)
    }
}

/// Readers serve only transactions that [`is_read_only`] accepted.
impl TxnView for mvcc::Reader<'_> {
    fn put_op(&mut self, _request: &PutRequest) -> Result<PutResponse, mvcc::Error> {
        Err(EtcdError::NotCapable.into())
    }
    fn delete_op(
        &mut self,
        _request: &DeleteRangeRequest,
    ) -> Result<DeleteRangeResponse, mvcc::Error> {
        Err(EtcdError::NotCapable.into())
    }
}

fn run_ops<V: TxnView>(
    view: &mut V,
    request: &TxnRequest,
    path: &[bool],
    position: &mut usize,
) -> Result<TxnResponse, mvcc::Error> {
    let succeeded = path[*position];
    *position += 1;
    let ops = if succeeded {
        &request.success
    } else {
        &request.failure
    };
    let mut responses = Vec::with_capacity(ops.len());
    for op in ops {
        let response = match &op.request {
            Some(Op::RequestRange(range)) => {
                let mut response: RangeResponse = mvcc::range(&*view, range)?;
                response.header = header(view.current_revision());
                OpResponse::ResponseRange(response)
            }
            Some(Op::RequestPut(put)) => OpResponse::ResponsePut(view.put_op(put)?),
            Some(Op::RequestDeleteRange(delete)) => {
                OpResponse::ResponseDeleteRange(view.delete_op(delete)?)
            }
            Some(Op::RequestTxn(nested)) => {
                OpResponse::ResponseTxn(run_ops(view, nested, path, position)?)
            }
            None => continue,
        };
        responses.push(ResponseOp {
            response: Some(response),
        });
    }
    // etcd leaves the revision of a nested transaction's header unset; the caller
    // sets the outermost one.
    Ok(TxnResponse {
        header: Some(ResponseHeader::default()),
        succeeded,
        responses,
    })
}

/// Runs a transaction: compares first, then the chosen branch's operations, all in
/// one store revision (or none, when nothing is written).
pub fn txn(writer: &mut Writer<'_>, request: &TxnRequest) -> Result<TxnResponse, mvcc::Error> {
    let mut path = Vec::new();
    branches(&*writer, request, &mut path)?;
    check_ops(&*writer, request, &path, &mut 0)?;
    let mut response = run_ops(writer, request, &path, &mut 0)?;
    let revision = writer.end_revision();
    response.header = header(revision);
    Ok(response)
}

/// Whether a transaction writes nothing, so it can be served as a read.
pub fn is_read_only(request: &TxnRequest) -> bool {
    request
        .success
        .iter()
        .chain(&request.failure)
        .all(|op| match &op.request {
            Some(Op::RequestRange(_)) | None => true,
            Some(Op::RequestTxn(nested)) => is_read_only(nested),
            Some(_) => false,
        })
}

/// Runs a transaction that [`is_read_only`] accepted on a reader.
pub fn read_only_txn(
    view: &mut mvcc::Reader<'_>,
    request: &TxnRequest,
) -> Result<TxnResponse, mvcc::Error> {
    let mut path = Vec::new();
    branches(&*view, request, &mut path)?;
    check_ops(&*view, request, &path, &mut 0)?;
    let mut response = run_ops(view, request, &path, &mut 0)?;
    response.header = header(view.current_revision());
    Ok(response)
}
