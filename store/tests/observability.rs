//! Metrics and health as operators use them: a real Prometheus (Debian's) scrapes a
//! three-member cluster and sees one leader, and a leader change; promtool accepts
//! every exposition; /health, /livez and /readyz answer for a healthy member, for one
//! that lost its quorum, and under the NOSPACE alarm.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{free_port, http_get, Cluster, Kind, Server};

struct Prometheus {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    fn start(targets: &[String]) -> Prometheus {
        assert!(
            std::path::Path::new("/usr/bin/prometheus").exists(),
            "prometheus is missing: run scripts/deps"
        );
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("prometheus.yml");
        let targets = targets
            .iter()
            .map(|t| format!("'{t}'"))
            .collect::<Vec<_>>()
            .join(", ");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: kvstore\n    static_configs:\n      - targets: [{targets}]\n"
            ),
        )
        .unwrap();
        let port = free_port();
        let child = Command::new("/usr/bin/prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start prometheus");
        Prometheus {
            child,
            port,
            _dir: dir,
        }
    }

    /// The samples of an instant query: (instance, value).
    fn query(&self, query: &str) -> Vec<(String, f64)> {
        let path = format!("/api/v1/query?query={}", query.replace(' ', "%20"));
        let Some((200, body)) = http_get(self.port, &path) else {
            return Vec::new();
        };
        let json: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        json["data"]["result"]
            .as_array()
            .map(|results| {
                results
                    .iter()
                    .map(|r| {
                        (
                            r["metric"]["instance"]
                                .as_str()
                                .unwrap_or_default()
                                .to_string(),
                            r["value"][1]
                                .as_str()
                                .unwrap_or("nan")
                                .parse()
                                .unwrap_or(f64::NAN),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Waits until `check` holds for the samples of `query`.
    fn wait_for(
        &self,
        query: &str,
        timeout: Duration,
        check: impl Fn(&[(String, f64)]) -> bool,
    ) -> Vec<(String, f64)> {
        let deadline = Instant::now() + timeout;
        loop {
            let samples = self.query(query);
            if check(&samples) {
                return samples;
            }
            assert!(
                Instant::now() < deadline,
                "{query}: condition not met, last samples {samples:?}"
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

/// etcd's own names that promtool's lint flags (gauges named `_total`, as etcd
/// defines them): kept for etcd's dashboards and alerts.
const ETCD_NAMES_PROMTOOL_FLAGS: &[&str] =
    &["etcd_debugging_mvcc_keys_total", "etcd_mvcc_watcher_total"];

/// promtool parses the exposition, and its lint finds nothing beyond etcd's own
/// names (Debian etcd's exposition draws the same findings for them).
fn promtool_accepts(exposition: &str) {
    use std::io::Write;
    let mut child = Command::new("/usr/bin/promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(exposition.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    let findings = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    // Exit 3 means lint findings only; anything else but 0 is a broken exposition.
    assert!(
        matches!(output.status.code(), Some(0) | Some(3)),
        "promtool check metrics failed:\n{findings}"
    );
    for line in findings.lines().filter(|l| !l.trim().is_empty()) {
        assert!(
            ETCD_NAMES_PROMTOOL_FLAGS
                .iter()
                .any(|name| line.starts_with(&format!("{name} "))),
            "promtool finding beyond etcd's own names: {line}"
        );
    }
}

#[test]
fn prometheus_scrapes_a_cluster_and_sees_one_leader_and_a_leader_change() {
    let mut cluster = Cluster::start(Kind::Kvstore, 3, "metrics", &[]);
    for index in 0..3 {
        assert!(cluster.etcdctl(index, &["put", "k", "v"]).status.success());
        let (status, exposition) =
            http_get(cluster.members[index].client_port, "/metrics").unwrap();
        assert_eq!(status, 200);
        for name in [
            "etcd_server_has_leader",
            "etcd_server_is_leader",
            "etcd_server_leader_changes_seen_total",
            "etcd_server_proposals_committed_total",
            "etcd_server_proposals_applied_total",
            "etcd_server_proposals_pending",
            "etcd_server_proposals_failed_total",
            "etcd_disk_wal_fsync_duration_seconds_bucket",
            "etcd_disk_backend_commit_duration_seconds_bucket",
            "etcd_mvcc_db_total_size_in_bytes",
            "etcd_mvcc_db_total_size_in_use_in_bytes",
            "etcd_server_quota_backend_bytes",
            "etcd_debugging_mvcc_keys_total",
            "etcd_mvcc_watcher_total",
            "etcd_server_version{server_version=",
            "grpc_server_started_total{grpc_method=\"Put\"",
            "grpc_server_handled_total{grpc_code=\"OK\",grpc_method=\"Put\"",
            "process_resident_memory_bytes",
        ] {
            assert!(exposition.contains(name), "{name} missing from /metrics");
        }
        promtool_accepts(&exposition);
    }
    let leader = cluster.wait_leader(Duration::from_secs(10));
    let followers: Vec<usize> = (0..3).filter(|i| *i != leader).collect();
    // Round trips are measured by the leader, to each follower.
    let (_, leader_metrics) = http_get(cluster.members[leader].client_port, "/metrics").unwrap();
    assert!(leader_metrics.contains("etcd_network_peer_round_trip_time_seconds_bucket{To="));

    let targets: Vec<String> = cluster.members.iter().map(|m| m.endpoint()).collect();
    let prometheus = Prometheus::start(&targets);
    prometheus.wait_for(
        "etcd_server_has_leader",
        Duration::from_secs(30),
        |samples| samples.len() == 3 && samples.iter().all(|(_, v)| *v == 1.0),
    );
    prometheus.wait_for(
        "sum(etcd_server_is_leader)",
        Duration::from_secs(10),
        |samples| samples.len() == 1 && samples[0].1 == 1.0,
    );
    let follower_target = cluster.members[followers[0]].endpoint();
    let before = prometheus
        .query("etcd_server_leader_changes_seen_total")
        .into_iter()
        .find(|(instance, _)| *instance == follower_target)
        .map(|(_, v)| v)
        .expect("the follower is scraped");

    cluster.kill(leader);
    cluster.wait_leader(Duration::from_secs(10));
    prometheus.wait_for(
        "etcd_server_leader_changes_seen_total",
        Duration::from_secs(30),
        |samples| {
            samples
                .iter()
                .any(|(instance, v)| *instance == follower_target && *v > before)
        },
    );
    prometheus.wait_for(
        "sum(etcd_server_is_leader)",
        Duration::from_secs(20),
        |samples| samples.len() == 1 && samples[0].1 == 1.0,
    );
}

#[test]
fn health_endpoints_for_healthy_leaderless_and_alarmed_members() {
    let mut cluster = Cluster::start(Kind::Kvstore, 3, "health", &[]);
    let port = cluster.members[0].client_port;
    assert_eq!(
        http_get(port, "/health").unwrap(),
        (200, r#"{"health":"true"}"#.to_string())
    );
    assert_eq!(http_get(port, "/livez").unwrap(), (200, "ok".to_string()));
    assert_eq!(http_get(port, "/readyz").unwrap(), (200, "ok".to_string()));
    let (status, verbose) = http_get(port, "/readyz?verbose").unwrap();
    assert_eq!(status, 200);
    assert_eq!(
        verbose,
        "[+]data_corruption ok\n[+]serializable_read ok\n[+]linearizable_read ok\nreadyz check passed\n"
    );
    assert_eq!(
        http_get(port, "/readyz/linearizable_read").unwrap(),
        (200, "ok".to_string())
    );
    assert_eq!(http_get(port, "/readyz/nonsense").unwrap().0, 404);
    let (status, version) = http_get(port, "/version").unwrap();
    assert_eq!(status, 200);
    assert!(version.contains("\"etcdserver\":\"3.5.0\""), "{version}");
    assert_eq!(http_get(port, "/no/such/path").unwrap().0, 404);

    // Quorum lost: two of three members gone.
    cluster.kill(1);
    cluster.kill(2);
    let deadline = Instant::now() + Duration::from_secs(15);
    let unhealthy = loop {
        let (status, body) = http_get(port, "/health").unwrap();
        // First its reads fail; once it campaigns it knows no leader.
        if status == 503 && body.contains("RAFT NO LEADER") {
            break body;
        }
        assert!(
            Instant::now() < deadline,
            "still healthy without a quorum: {body}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(unhealthy, r#"{"health":"false","reason":"RAFT NO LEADER"}"#);
    // Still alive (it serves local reads), but not ready.
    assert_eq!(http_get(port, "/livez").unwrap(), (200, "ok".to_string()));
    let (status, body) = http_get(port, "/readyz?verbose").unwrap();
    assert_eq!(status, 503);
    assert!(body.contains("[-]linearizable_read failed"), "{body}");
    assert!(body.ends_with("readyz check failed\n"), "{body}");
}

#[test]
fn health_reports_the_nospace_alarm_unless_excluded() {
    let server = Server::start_with(Kind::Kvstore, &["--quota-backend-bytes=16777216"]);
    let value = "v".repeat(1 << 20);
    for i in 0..100 {
        let output = server.etcdctl_with_input(&["put", &format!("k{i}")], Some(&value));
        if !output.status.success() {
            break;
        }
    }
    assert_eq!(
        http_get(server.client_port, "/health").unwrap(),
        (
            503,
            r#"{"health":"false","reason":"ALARM NOSPACE"}"#.to_string()
        )
    );
    assert_eq!(
        http_get(server.client_port, "/health?exclude=NOSPACE").unwrap(),
        (200, r#"{"health":"true"}"#.to_string())
    );
    assert_eq!(
        http_get(
            server.client_port,
            "/health?exclude=NOSPACE&serializable=true"
        )
        .unwrap(),
        (200, r#"{"health":"true"}"#.to_string())
    );
}

#[test]
fn metrics_urls_serve_metrics_and_health_only() {
    let port = free_port();
    let server = Server::start_with(
        Kind::Kvstore,
        &[&format!("--listen-metrics-urls=http://127.0.0.1:{port}")],
    );
    assert!(server.etcdctl(&["put", "k", "v"]).status.success());
    let (status, metrics) = http_get(port, "/metrics").unwrap();
    assert_eq!(status, 200);
    assert!(metrics.contains("etcd_server_has_leader 1"), "{metrics}");
    assert_eq!(
        http_get(port, "/health").unwrap(),
        (200, r#"{"health":"true"}"#.to_string())
    );
    assert_eq!(http_get(port, "/version").unwrap().0, 404);
}
