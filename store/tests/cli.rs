//! The kvstore command line: bad flags, an unusable data dir and a port in use give
//! a clear message naming the problem and a non-zero exit, never a panic or a hang.

mod common;

use std::net::TcpListener;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

fn kvstore(args: &[&str], data_dir: &std::path::Path) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_kvstore"))
        .args(args)
        .current_dir(data_dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Every case here must exit by itself; a hang fails the test instead of blocking it.
    for _ in 0..200 {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.kill().unwrap();
    panic!("kvstore {args:?} did not exit within 10 s");
}

fn free_urls() -> (String, String) {
    (
        format!(
            "--listen-client-urls=http://127.0.0.1:{}",
            common::free_port()
        ),
        format!(
            "--listen-peer-urls=http://127.0.0.1:{}",
            common::free_port()
        ),
    )
}

fn assert_fails_with(output: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success(),
        "expected failure, got success; stderr: {stderr}"
    );
    assert!(
        stderr.contains(needle),
        "stderr does not mention {needle:?}: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "kvstore panicked: {stderr}");
}

#[test]
fn version_and_help() {
    let dir = tempfile::tempdir().unwrap();
    let output = kvstore(&["--version"], dir.path());
    assert!(output.status.success());
    assert!(String::from_utf8_lossy(&output.stdout).contains(env!("CARGO_PKG_VERSION")));
    let output = kvstore(&["--help"], dir.path());
    assert!(output.status.success());
    let help = String::from_utf8_lossy(&output.stdout);
    for flag in [
        "--name",
        "--data-dir",
        "--listen-client-urls",
        "--max-txn-ops",
        "--quota-backend-bytes",
    ] {
        assert!(help.contains(flag), "--help does not list {flag}");
    }
}

#[test]
fn bad_flags_name_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    assert_fails_with(&kvstore(&["--no-such-flag"], dir.path()), "--no-such-flag");
    assert_fails_with(
        &kvstore(&["--listen-client-urls", "localhost:2379"], dir.path()),
        "--listen-client-urls",
    );
    assert_fails_with(
        &kvstore(&["--max-txn-ops", "many"], dir.path()),
        "--max-txn-ops",
    );
    assert_fails_with(
        &kvstore(&["--initial-cluster-state", "old"], dir.path()),
        "--initial-cluster-state",
    );
    let (client, peer) = free_urls();
    let output = kvstore(
        &[
            &client,
            &peer,
            "--initial-cluster",
            "other=http://localhost:2380",
        ],
        dir.path(),
    );
    assert_fails_with(&output, "--initial-cluster");
    // Two ways to find the initial cluster: etcd's message.
    let output = kvstore(
        &[
            &client,
            &peer,
            "--discovery-srv",
            "example.com",
            "--discovery",
            "http://127.0.0.1:1/x",
        ],
        dir.path(),
    );
    assert_fails_with(
        &output,
        "multiple discovery or bootstrap flags are set. Choose one of \"initial-cluster\", \"discovery\" or \"discovery-srv\"",
    );
}

#[test]
fn flags_come_from_the_environment_too() {
    let dir = tempfile::tempdir().unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_kvstore"))
        .env("ETCD_MAX_TXN_OPS", "zero")
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("--max-txn-ops"));
}

#[test]
fn unusable_data_dir_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("not-a-dir");
    std::fs::write(&file, b"x").unwrap();
    let (client, peer) = free_urls();
    let data_dir = format!("--data-dir={}", file.display());
    let output = kvstore(&[&client, &peer, &data_dir], dir.path());
    assert_fails_with(&output, "cannot use data directory");
    assert!(String::from_utf8_lossy(&output.stderr).contains("not-a-dir"));
}

#[test]
fn port_in_use_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let client = format!("--listen-client-urls=http://127.0.0.1:{port}");
    let (_, peer) = free_urls();
    let output = kvstore(&[&client, &peer], dir.path());
    assert_fails_with(&output, "failed to listen on http://127.0.0.1:");
    assert!(
        !dir.path().join("default.kvstore").exists(),
        "data dir created although the port was taken"
    );
}

#[test]
fn json_logs_have_one_object_per_line_with_structured_fields() {
    let mut server = common::Server::start_with(common::Kind::Kvstore, &["--log-format=json"]);
    assert!(server.etcdctl(&["put", "k", "v"]).status.success());
    assert!(server.etcdctl(&["compact", "2"]).status.success());
    server.kill();
    let log = server.log_text();
    let mut messages = Vec::new();
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        let json: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
        assert!(
            json["level"].is_string() && json["timestamp"].is_string(),
            "{line}"
        );
        messages.push(json["message"].as_str().unwrap_or_default().to_string());
        if json["message"] == "compacted history" {
            assert_eq!(json["revision"], 2, "{line}");
        }
    }
    for expected in [
        "kvstore member started",
        "leader changed",
        "compacted history",
    ] {
        assert!(
            messages.iter().any(|m| m == expected),
            "no {expected:?} in {messages:?}"
        );
    }

    let dir = tempfile::tempdir().unwrap();
    let output = kvstore(&["--log-format=yaml"], dir.path());
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("--log-format"));
}
