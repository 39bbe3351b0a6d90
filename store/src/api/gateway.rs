//! etcd's JSON gateway: `POST /v3/<service>/<method>` with the request as JSON
//! (proto field names, 64-bit integers as strings, bytes as base64) answered by the
//! same service code as gRPC. Watch streams newline-delimited `{"result": ...}`
//! objects, as etcd's gateway does. Errors are JSON with the gRPC code and message.

use std::future::Future;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use futures::StreamExt;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tonic::{Code, Status};

use super::auth::AuthService;
use super::cluster::ClusterService;
use super::election::ElectionService;
use super::kv::KvService;
use super::lease::LeaseService;
use super::lock::LockService;
use super::maintenance::MaintenanceService;
use super::watch::WatchService;
use crate::pb::etcdserverpb::auth_server::Auth;
use crate::pb::etcdserverpb::cluster_server::Cluster;
use crate::pb::etcdserverpb::kv_server::Kv;
use crate::pb::etcdserverpb::lease_server::Lease;
use crate::pb::etcdserverpb::maintenance_server::Maintenance;
use crate::pb::etcdserverpb::{LeaseKeepAliveRequest, WatchRequest};
use crate::pb::v3electionpb::election_server::Election;
use crate::pb::v3lockpb::lock_server::Lock;
use crate::server::EtcdServer;

/// The HTTP status grpc-gateway gives each gRPC code.
fn http_status(code: Code) -> StatusCode {
    match code {
        Code::Ok => StatusCode::OK,
        Code::Cancelled => StatusCode::REQUEST_TIMEOUT,
        Code::Unknown | Code::Internal | Code::DataLoss => StatusCode::INTERNAL_SERVER_ERROR,
        Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => {
            StatusCode::BAD_REQUEST
        }
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
    }
}

fn error(status: &Status) -> Response {
    let body = serde_json::json!({
        "error": status.message(),
        "code": status.code() as i32,
        "message": status.message(),
    });
    (
        http_status(status.code()),
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

/// Decodes a request body; an empty body is the default request.
fn decode<T: DeserializeOwned + Default>(body: &Bytes) -> Result<T, Status> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(body)
        .map_err(|e| Status::invalid_argument(format!("invalid JSON request body: {e}")))
}

async fn unary<Req, Resp, Fut>(
    body: Bytes,
    call: impl FnOnce(tonic::Request<Req>) -> Fut,
) -> Response
where
    Req: DeserializeOwned + Default,
    Resp: Serialize,
    Fut: Future<Output = Result<tonic::Response<Resp>, Status>>,
{
    let request = match decode::<Req>(&body) {
        Ok(request) => request,
        Err(status) => return error(&status),
    };
    match call(tonic::Request::new(request)).await {
        Ok(response) => match serde_json::to_string(response.get_ref()) {
            Ok(json) => (
                StatusCode::OK,
                [(header::CONTENT_TYPE, "application/json")],
                json,
            )
                .into_response(),
            Err(e) => error(&Status::internal(e.to_string())),
        },
        Err(status) => error(&status),
    }
}

/// The services behind the gateway.
struct Services {
    auth: AuthService,
    kv: KvService,
    lease: LeaseService,
    cluster: ClusterService,
    maintenance: MaintenanceService,
    watch: WatchService,
    lock: LockService,
    election: ElectionService,
}

macro_rules! route {
    ($router:ident, $services:ident, $path:literal, $service:ident . $method:ident) => {{
        let services = $services.clone();
        $router = $router.route(
            $path,
            post(move |body: Bytes| async move {
                unary(body, |request| services.$service.$method(request)).await
            }),
        );
    }};
}

/// The gateway's routes.
pub fn router(server: Arc<EtcdServer>) -> Router {
    let services = Arc::new(Services {
        auth: AuthService::new(server.clone()),
        kv: KvService::new(server.clone()),
        lease: LeaseService::new(server.clone()),
        cluster: ClusterService::new(server.clone()),
        maintenance: MaintenanceService::new(server.clone()),
        watch: WatchService::new(server.clone()),
        lock: LockService::new(server.clone()),
        election: ElectionService::new(server),
    });
    let mut router = Router::new();
    route!(router, services, "/v3/kv/range", kv.range);
    route!(router, services, "/v3/kv/put", kv.put);
    route!(router, services, "/v3/kv/deleterange", kv.delete_range);
    route!(router, services, "/v3/kv/txn", kv.txn);
    route!(router, services, "/v3/kv/compaction", kv.compact);
    route!(router, services, "/v3/lease/grant", lease.lease_grant);
    route!(router, services, "/v3/lease/revoke", lease.lease_revoke);
    route!(router, services, "/v3/kv/lease/revoke", lease.lease_revoke);
    route!(
        router,
        services,
        "/v3/lease/timetolive",
        lease.lease_time_to_live
    );
    route!(
        router,
        services,
        "/v3/kv/lease/timetolive",
        lease.lease_time_to_live
    );
    route!(router, services, "/v3/lease/leases", lease.lease_leases);
    route!(router, services, "/v3/kv/lease/leases", lease.lease_leases);
    route!(
        router,
        services,
        "/v3/cluster/member/add",
        cluster.member_add
    );
    route!(
        router,
        services,
        "/v3/cluster/member/remove",
        cluster.member_remove
    );
    route!(
        router,
        services,
        "/v3/cluster/member/update",
        cluster.member_update
    );
    route!(
        router,
        services,
        "/v3/cluster/member/list",
        cluster.member_list
    );
    route!(
        router,
        services,
        "/v3/cluster/member/promote",
        cluster.member_promote
    );
    route!(router, services, "/v3/maintenance/alarm", maintenance.alarm);
    route!(
        router,
        services,
        "/v3/maintenance/status",
        maintenance.status
    );
    route!(
        router,
        services,
        "/v3/maintenance/defragment",
        maintenance.defragment
    );
    route!(
        router,
        services,
        "/v3/maintenance/hash",
        maintenance.hash_kv
    );
    route!(router, services, "/v3/auth/enable", auth.auth_enable);
    route!(router, services, "/v3/auth/disable", auth.auth_disable);
    route!(router, services, "/v3/auth/status", auth.auth_status);
    route!(router, services, "/v3/auth/authenticate", auth.authenticate);
    route!(router, services, "/v3/auth/user/add", auth.user_add);
    route!(router, services, "/v3/auth/user/get", auth.user_get);
    route!(router, services, "/v3/auth/user/list", auth.user_list);
    route!(router, services, "/v3/auth/user/delete", auth.user_delete);
    route!(
        router,
        services,
        "/v3/auth/user/changepw",
        auth.user_change_password
    );
    route!(
        router,
        services,
        "/v3/auth/user/grant",
        auth.user_grant_role
    );
    route!(
        router,
        services,
        "/v3/auth/user/revoke",
        auth.user_revoke_role
    );
    route!(router, services, "/v3/auth/role/add", auth.role_add);
    route!(router, services, "/v3/auth/role/get", auth.role_get);
    route!(router, services, "/v3/auth/role/list", auth.role_list);
    route!(router, services, "/v3/auth/role/delete", auth.role_delete);
    route!(
        router,
        services,
        "/v3/auth/role/grant",
        auth.role_grant_permission
    );
    route!(
        router,
        services,
        "/v3/auth/role/revoke",
        auth.role_revoke_permission
    );
    route!(router, services, "/v3/lock/lock", lock.lock);
    route!(router, services, "/v3/lock/unlock", lock.unlock);
    route!(router, services, "/v3/election/campaign", election.campaign);
    route!(router, services, "/v3/election/proclaim", election.proclaim);
    route!(router, services, "/v3/election/leader", election.leader);
    route!(router, services, "/v3/election/resign", election.resign);
    let streams = services.clone();
    router = router.route(
        "/v3/watch",
        post(move |body: Bytes| async move {
            match requests::<WatchRequest>(&body) {
                Ok(inbound) => lines(streams.watch.session(inbound)),
                Err(status) => error(&status),
            }
        }),
    );
    let streams = services.clone();
    router = router.route(
        "/v3/lease/keepalive",
        post(move |body: Bytes| async move {
            match requests::<LeaseKeepAliveRequest>(&body) {
                Ok(inbound) => lines(streams.lease.keep_alive_session(inbound)),
                Err(status) => error(&status),
            }
        }),
    );
    let streams = services.clone();
    router = router.route(
        "/v3/maintenance/snapshot",
        post(move |body: Bytes| async move {
            server_stream(body, |request| streams.maintenance.snapshot(request)).await
        }),
    );
    let streams = services;
    router.route(
        "/v3/election/observe",
        post(move |body: Bytes| async move {
            server_stream(body, |request| streams.election.observe(request)).await
        }),
    )
}

/// The requests of a streaming call, as a stream.
type Requests<T> = std::pin::Pin<Box<dyn futures::Stream<Item = Result<T, Status>> + Send>>;

/// The requests of a streaming call's body (one or more JSON objects), followed by a
/// request side that stays open while the client listens.
fn requests<T: DeserializeOwned + Send + 'static>(body: &Bytes) -> Result<Requests<T>, Status> {
    let mut requests = Vec::new();
    for request in serde_json::Deserializer::from_slice(body).into_iter::<T>() {
        let request = request
            .map_err(|e| Status::invalid_argument(format!("invalid JSON request body: {e}")))?;
        requests.push(Ok(request));
    }
    Ok(Box::pin(
        futures::stream::iter(requests).chain(futures::stream::pending()),
    ))
}

/// A response stream as etcd's gateway sends it: one `{"result": ...}` (or
/// `{"error": ...}`) object per line.
fn lines<T: Serialize + Send + 'static>(
    responses: tokio::sync::mpsc::Receiver<Result<T, Status>>,
) -> Response {
    stream_body(tokio_stream::wrappers::ReceiverStream::new(responses))
}

fn stream_body<T: Serialize + Send + 'static>(
    responses: impl futures::Stream<Item = Result<T, Status>> + Send + 'static,
) -> Response {
    let lines = responses.map(|item| {
        let json = match item {
            Ok(response) => serde_json::json!({ "result": response }),
            Err(status) => serde_json::json!({
                "error": {"grpc_code": status.code() as i32, "message": status.message()}
            }),
        };
        Ok::<_, std::convert::Infallible>(format!("{json}\n"))
    });
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        Body::from_stream(lines),
    )
        .into_response()
}

/// A call with one request and a stream of responses.
async fn server_stream<Req, S, T, Fut>(
    body: Bytes,
    call: impl FnOnce(tonic::Request<Req>) -> Fut,
) -> Response
where
    Req: DeserializeOwned + Default,
    S: futures::Stream<Item = Result<T, Status>> + Send + 'static,
    T: Serialize + Send + 'static,
    Fut: Future<Output = Result<tonic::Response<S>, Status>>,
{
    let request = match decode::<Req>(&body) {
        Ok(request) => request,
        Err(status) => return error(&status),
    };
    match call(tonic::Request::new(request)).await {
        Ok(response) => stream_body(response.into_inner()),
        Err(status) => error(&status),
    }
}
