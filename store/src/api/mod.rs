//! The gRPC services of etcd's v3 API. Handlers validate requests, call the server
//! and fill response headers; they never change state themselves.

pub mod auth;
pub mod authority;
pub mod cluster;
pub mod election;
pub mod gateway;
pub mod http;
pub mod kv;
pub mod lease;
pub mod lock;
pub mod maintenance;
pub mod peer;
pub mod recipe;
pub mod watch;

use std::sync::Arc;

use crate::pb::etcdserverpb::auth_server::AuthServer;
use crate::pb::etcdserverpb::cluster_server::ClusterServer;
use crate::pb::etcdserverpb::kv_server::KvServer;
use crate::pb::etcdserverpb::lease_server::LeaseServer;
use crate::pb::etcdserverpb::maintenance_server::MaintenanceServer;
use crate::pb::etcdserverpb::watch_server::WatchServer;
use crate::pb::v3electionpb::election_server::ElectionServer;
use crate::pb::v3lockpb::lock_server::LockServer;
use crate::server::EtcdServer;

/// gRPC's own framing on top of `--max-request-bytes`, as etcd allows.
pub const GRPC_OVERHEAD_BYTES: usize = 512 * 1024;

/// All client services of a member, ready to serve: gRPC, and HTTP/1.1 or HTTP/2
/// for the metrics, health and version endpoints on the same port.
pub fn routes(server: Arc<EtcdServer>) -> tonic::service::Routes {
    // JSON bodies are base64 and field names on top of the request itself.
    let max_body = (server.limits().max_request_bytes + GRPC_OVERHEAD_BYTES) * 4 / 3;
    let router = grpc_routes(server.clone())
        .into_axum_router()
        .merge(http::router(server.clone()))
        .merge(
            gateway::router(server.clone()).layer(axum::extract::DefaultBodyLimit::max(max_body)),
        )
        .layer(axum::middleware::from_fn_with_state(server, with_caller))
        .layer(axum::middleware::from_fn(http::grpc_metrics));
    tonic::service::Routes::from(router)
}

/// Runs a client request as the user its token (metadata `token`, or the
/// gateway's `Authorization` header) or its client certificate names; a token that
/// is not valid is reported by whatever the request does that needs a user.
/// Authenticate ignores tokens, as etcd's does.
async fn with_caller(
    axum::extract::State(server): axum::extract::State<Arc<EtcdServer>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let headers = request.headers();
    let token = headers
        .get("token")
        .or_else(|| headers.get(::http::header::AUTHORIZATION))
        .and_then(|value| value.to_str().ok())
        .map(str::to_string);
    let common_name = request
        .extensions()
        .get::<crate::listener::ConnectionInfo>()
        .and_then(|info| info.common_name.clone());
    let caller = if request.uri().path().ends_with("/Authenticate")
        || request.uri().path() == "/v3/auth/authenticate"
    {
        Ok(Default::default())
    } else {
        server.resolve_caller(token.as_deref(), common_name.as_deref())
    };
    crate::server::CALLER.scope(caller, next.run(request)).await
}

fn grpc_routes(server: Arc<EtcdServer>) -> tonic::service::Routes {
    let max_message = server.limits().max_request_bytes + GRPC_OVERHEAD_BYTES;
    tonic::service::Routes::new(
        KvServer::new(kv::KvService::new(server.clone()))
            .max_decoding_message_size(max_message)
            .max_encoding_message_size(usize::MAX),
    )
    .add_service(
        ClusterServer::new(cluster::ClusterService::new(server.clone()))
            .max_decoding_message_size(max_message),
    )
    .add_service(
        MaintenanceServer::new(maintenance::MaintenanceService::new(server.clone()))
            .max_decoding_message_size(max_message),
    )
    .add_service(
        WatchServer::new(watch::WatchService::new(server.clone()))
            .max_decoding_message_size(max_message)
            .max_encoding_message_size(usize::MAX),
    )
    .add_service(
        LeaseServer::new(lease::LeaseService::new(server.clone()))
            .max_decoding_message_size(max_message),
    )
    .add_service(
        LockServer::new(lock::LockService::new(server.clone()))
            .max_decoding_message_size(max_message),
    )
    .add_service(
        AuthServer::new(auth::AuthService::new(server.clone()))
            .max_decoding_message_size(max_message),
    )
    .add_service(
        ElectionServer::new(election::ElectionService::new(server))
            .max_decoding_message_size(max_message),
    )
}
