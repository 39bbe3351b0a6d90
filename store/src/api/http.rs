//! The plain HTTP side of the client port, next to gRPC as etcd serves it: `/metrics`,
//! `/health`, `/livez`, `/readyz` and `/version`; and the gRPC server metrics, counted
//! as requests pass.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use crate::metrics::{code_name, METRICS};
use crate::pb::etcdserverpb::{AlarmType, RangeRequest};
use crate::server::EtcdServer;

/// How long a health check's read may take.
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// The HTTP routes of the client port.
pub fn router(server: Arc<EtcdServer>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/health", get(health))
        .route("/livez", get(livez))
        .route("/livez/{check}", get(livez_check))
        .route("/readyz", get(readyz))
        .route("/readyz/{check}", get(readyz_check))
        .route("/version", get(version))
        .with_state(server)
}

/// The routes of a `--listen-metrics-urls` listener: metrics and health only.
pub fn metrics_router(server: Arc<EtcdServer>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/health", get(health))
        .with_state(server)
}

/// Refreshes the gauges that mirror state, then renders every metric.
async fn metrics(State(server): State<Arc<EtcdServer>>) -> Response {
    let (leader, _, _, applied, _) = server.raft_status();
    let own = server.identity().member_id;
    METRICS.has_leader.set(i64::from(leader != 0));
    METRICS.is_leader.set(i64::from(leader == own));
    for counter in [&METRICS.proposals_committed, &METRICS.proposals_applied] {
        let seen = counter.get();
        if applied > seen {
            counter.inc_by(applied - seen);
        }
    }
    let storage = server.storage();
    METRICS.db_size.set(storage.size_bytes() as i64);
    METRICS
        .db_size_in_use
        .set(storage.size_in_use_bytes() as i64);
    METRICS
        .quota
        .set(server.limits().quota_backend_bytes as f64);
    METRICS.keys.set(server.mvcc().live_keys() as i64);
    METRICS
        .watchers
        .set(server.mvcc().hub().watcher_count() as i64);
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        METRICS.render(),
    )
        .into_response()
}

fn json(status: StatusCode, body: String) -> Response {
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// Why this member is unhealthy, if it is: alarms (unless excluded), no leader, or a
/// read that fails (linearizable unless `serializable`).
async fn unhealthy(server: &EtcdServer, excluded: &[String], serializable: bool) -> Option<String> {
    for (_, alarm) in server.mvcc().alarms() {
        let name = AlarmType::try_from(alarm).map_or("UNKNOWN", |a| a.as_str_name());
        if !excluded.iter().any(|e| e == name) {
            return Some(format!("ALARM {name}"));
        }
    }
    if server.raft_status().0 == 0 {
        return Some("RAFT NO LEADER".into());
    }
    let read = RangeRequest {
        key: b"health".to_vec(),
        serializable,
        ..Default::default()
    };
    match tokio::time::timeout(CHECK_TIMEOUT, server.range(&read)).await {
        Ok(Ok(_)) => None,
        Ok(Err(error)) => Some(format!("QGET ERROR: {error}")),
        Err(_) => Some("QGET ERROR: timed out".into()),
    }
}

/// etcd's `/health`: `{"health":"true"}`, or 503 with the reason.
async fn health(
    State(server): State<Arc<EtcdServer>>,
    Query(query): Query<Vec<(String, String)>>,
) -> Response {
    let (query, excluded) = parts(query);
    let serializable = query.get("serializable").is_some_and(|v| v == "true");
    match unhealthy(&server, &excluded, serializable).await {
        None => json(StatusCode::OK, r#"{"health":"true"}"#.into()),
        Some(reason) => json(
            StatusCode::SERVICE_UNAVAILABLE,
            serde_json::json!({"health": "false", "reason": reason}).to_string(),
        ),
    }
}

/// One named check of `/livez` or `/readyz`.
async fn run_check(server: &EtcdServer, check: &str) -> Result<(), String> {
    match check {
        "serializable_read" => {
            let read = RangeRequest {
                key: b"health".to_vec(),
                serializable: true,
                ..Default::default()
            };
            server
                .range(&read)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        }
        "linearizable_read" => {
            let read = RangeRequest {
                key: b"health".to_vec(),
                ..Default::default()
            };
            match tokio::time::timeout(CHECK_TIMEOUT, server.range(&read)).await {
                Ok(result) => result.map(|_| ()).map_err(|e| e.to_string()),
                Err(_) => Err("timed out".into()),
            }
        }
        "data_corruption" => {
            let corrupt = server
                .mvcc()
                .alarms()
                .iter()
                .any(|(_, alarm)| *alarm == AlarmType::Corrupt as i32);
            if corrupt {
                Err("alarm activated: CORRUPT".into())
            } else {
                Ok(())
            }
        }
        other => Err(format!("no such check {other}")),
    }
}

const LIVEZ: &[&str] = &["serializable_read"];
const READYZ: &[&str] = &["data_corruption", "serializable_read", "linearizable_read"];

/// The Kubernetes-style report etcd 3.5 serves: `ok`, or with `?verbose` one line
/// per check; `?exclude=check` skips one; 503 when any check fails.
async fn report(
    server: &EtcdServer,
    name: &str,
    checks: &[&str],
    query: &HashMap<String, String>,
    excluded: &[String],
) -> Response {
    let mut lines = String::new();
    let mut failed = false;
    for check in checks {
        if excluded.iter().any(|e| e == check) {
            lines.push_str(&format!("[+]{check} excluded: ok\n"));
            continue;
        }
        match run_check(server, check).await {
            Ok(()) => lines.push_str(&format!("[+]{check} ok\n")),
            Err(reason) => {
                failed = true;
                lines.push_str(&format!("[-]{check} failed: {reason}\n"));
            }
        }
    }
    let verbose = query.contains_key("verbose");
    let (status, body) = if failed {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{lines}{name} check failed\n"),
        )
    } else if verbose {
        (StatusCode::OK, format!("{lines}{name} check passed\n"))
    } else {
        (StatusCode::OK, "ok".to_string())
    };
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        body,
    )
        .into_response()
}

fn parts(query: Vec<(String, String)>) -> (HashMap<String, String>, Vec<String>) {
    let excluded = query
        .iter()
        .filter(|(key, _)| key == "exclude")
        .map(|(_, value)| value.clone())
        .collect();
    (query.into_iter().collect(), excluded)
}

async fn livez(
    State(server): State<Arc<EtcdServer>>,
    Query(query): Query<Vec<(String, String)>>,
) -> Response {
    let (query, excluded) = parts(query);
    report(&server, "livez", LIVEZ, &query, &excluded).await
}

async fn readyz(
    State(server): State<Arc<EtcdServer>>,
    Query(query): Query<Vec<(String, String)>>,
) -> Response {
    let (query, excluded) = parts(query);
    report(&server, "readyz", READYZ, &query, &excluded).await
}

async fn single_check(server: &EtcdServer, checks: &[&str], check: &str) -> Response {
    if !checks.contains(&check) {
        return (StatusCode::NOT_FOUND, format!("no such check {check}\n")).into_response();
    }
    match run_check(server, check).await {
        Ok(()) => (StatusCode::OK, "ok".to_string()).into_response(),
        Err(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("[-]{check} failed: {reason}\n"),
        )
            .into_response(),
    }
}

async fn livez_check(State(server): State<Arc<EtcdServer>>, Path(check): Path<String>) -> Response {
    single_check(&server, LIVEZ, &check).await
}

async fn readyz_check(
    State(server): State<Arc<EtcdServer>>,
    Path(check): Path<String>,
) -> Response {
    single_check(&server, READYZ, &check).await
}

async fn version() -> Response {
    json(
        StatusCode::OK,
        serde_json::json!({
            "etcdserver": crate::ETCD_API_VERSION,
            "etcdcluster": crate::ETCD_API_VERSION,
        })
        .to_string(),
    )
}

/// grpc-go's method types for etcd's streaming calls; everything else is unary.
fn grpc_type(method: &str) -> &'static str {
    match method {
        "Watch" | "LeaseKeepAlive" => "bidi_stream",
        "Snapshot" | "Observe" => "server_stream",
        _ => "unary",
    }
}

/// Counts gRPC calls by service, method and status code, as grpc-go's Prometheus
/// interceptors do (streams are counted when their headers come back).
pub async fn grpc_metrics(request: Request, next: Next) -> Response {
    let path = request.uri().path().to_string();
    let is_grpc = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"));
    let names = path
        .strip_prefix('/')
        .and_then(|p| p.split_once('/'))
        .map(|(service, method)| (service.to_string(), method.to_string()));
    let (Some((service, method)), true) = (names, is_grpc) else {
        let response = next.run(request).await;
        // gRPC's fallback answers unknown paths with "unimplemented"; plain HTTP
        // clients get a 404, as from etcd.
        if response.headers().contains_key("grpc-status") {
            return (StatusCode::NOT_FOUND, "404 page not found\n").into_response();
        }
        return response;
    };
    let kind = grpc_type(&method);
    METRICS
        .grpc_started
        .with_label_values(&[kind, &service, &method])
        .inc();
    let response = next.run(request).await;
    // Errors come back "trailers only", with the status in the headers.
    let code = response
        .headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok())
        .map_or(tonic::Code::Ok, tonic::Code::from);
    METRICS
        .grpc_handled
        .with_label_values(&[kind, &service, &method, code_name(code)])
        .inc();
    response
}
