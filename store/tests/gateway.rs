//! etcd's JSON gateway: etcd's documented curl calls (put, range, prefix range, txn,
//! lease grant, watch stream) give the same JSON from Debian's etcd and kvstore once
//! IDs and terms are set aside; Python's etcd3gw client round-trips; bad HTTP input
//! gets a 4xx with a message.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::time::Duration;

use common::{http_post, Kind, Server};
use serde_json::Value;

/// Removes what differs between two clusters: member and cluster IDs, terms, lease IDs.
fn normalize(mut json: Value) -> Value {
    fn walk(value: &mut Value) {
        match value {
            Value::Object(map) => {
                for key in ["cluster_id", "member_id", "raft_term", "ID", "lease"] {
                    if map.contains_key(key) {
                        map.insert(key.into(), "<id>".into());
                    }
                }
                map.values_mut().for_each(walk);
            }
            Value::Array(items) => items.iter_mut().for_each(walk),
            _ => {}
        }
    }
    walk(&mut json);
    json
}

const CALLS: &[(&str, &str)] = &[
    ("/v3/kv/put", r#"{"key": "Zm9v", "value": "YmFy"}"#),
    ("/v3/kv/range", r#"{"key": "Zm9v"}"#),
    (
        "/v3/kv/put",
        r#"{"key": "Zm9vMQ==", "value": "YmFyMQ==", "prev_kv": true}"#,
    ),
    (
        "/v3/kv/range",
        r#"{"key": "Zm9v", "range_end": "Zm9w", "sort_order": "DESCEND"}"#,
    ),
    (
        "/v3/kv/range",
        r#"{"key": "Zm9v", "range_end": "Zm9w", "count_only": true}"#,
    ),
    (
        "/v3/kv/txn",
        r#"{"compare":[{"target":"CREATE","key":"Zm9v","createRevision":"2"}],"success":[{"requestPut":{"key":"Zm9v","value":"YmFy"}}]}"#,
    ),
    (
        "/v3/kv/txn",
        r#"{"compare":[{"target":"VALUE","key":"Zm9v","value":"bm8="}],"failure":[{"request_range":{"key":"Zm9v"}}]}"#,
    ),
    ("/v3/lease/grant", r#"{"TTL": 30, "ID": 0}"#),
    (
        "/v3/kv/deleterange",
        r#"{"key": "Zm9vMQ==", "prev_kv": true}"#,
    ),
    ("/v3/kv/range", r#"{"key": "Zm9v", "revision": "99"}"#),
    ("/v3/kv/range", r#"{"key": ""}"#),
    ("/v3/kv/compaction", r#"{"revision": "3"}"#),
    ("/v3/kv/range", r#"{"key": "Zm9v", "revision": "2"}"#),
    ("/v3/maintenance/alarm", r#"{"action": "GET"}"#),
];

fn session(server: &Server) -> Vec<String> {
    let mut transcript = Vec::new();
    for (path, body) in CALLS {
        let (status, response) = http_post(server.client_port, path, body.as_bytes()).unwrap();
        let json: Value = serde_json::from_str(&response)
            .unwrap_or_else(|e| panic!("{path}: not JSON ({e}): {response}"));
        transcript.push(format!("{path} {body} -> {status} {}", normalize(json)));
    }
    transcript.push(format!(
        "watch -> {:?}",
        first_lines(
            server,
            "/v3/watch",
            r#"{"create_request": {"key": "Zm9v", "start_revision": "3"}}"#,
            2
        )
    ));
    let grant = http_post(server.client_port, "/v3/lease/grant", br#"{"TTL": 30}"#)
        .unwrap()
        .1;
    let lease = serde_json::from_str::<Value>(&grant).unwrap()["ID"].clone();
    let keepalive = format!(r#"{{"ID": {lease}}}"#);
    transcript.push(format!(
        "keepalive -> {:?}",
        first_lines(server, "/v3/lease/keepalive", &keepalive, 1)
    ));
    let campaign = format!(r#"{{"name": "ZQ==", "lease": {lease}, "value": "YQ=="}}"#);
    let (status, body) = http_post(
        server.client_port,
        "/v3/election/campaign",
        campaign.as_bytes(),
    )
    .unwrap();
    // Election keys name the lease: "e/<lease ID in hex>".
    let lease_key = |json: Value| {
        let text = json.to_string();
        let key = json["leader"]["key"]
            .as_str()
            .or(json["result"]["kv"]["key"].as_str())
            .unwrap_or("none")
            .to_string();
        text.replace(&key, "<lease key>")
    };
    let campaign: Value = serde_json::from_str(&body).unwrap();
    transcript.push(format!(
        "campaign -> {status} {}",
        lease_key(normalize(campaign))
    ));
    let observed = first_lines(server, "/v3/election/observe", r#"{"name": "ZQ=="}"#, 1);
    transcript.push(format!(
        "observe -> {:?}",
        observed.into_iter().map(lease_key).collect::<Vec<_>>()
    ));
    transcript
}

/// The first `count` JSON lines of a streaming gateway call.
fn first_lines(server: &Server, path: &str, body: &str, count: usize) -> Vec<Value> {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", server.client_port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(
        stream,
        "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut reader = BufReader::new(stream);
    let mut results = Vec::new();
    let mut line = String::new();
    while results.len() < count {
        line.clear();
        if reader.read_line(&mut line).unwrap() == 0 {
            break;
        }
        // Chunked transfer: JSON lines sit between chunk-size lines.
        if let Ok(json) = serde_json::from_str::<Value>(line.trim()) {
            if json.is_object() {
                results.push(normalize(json));
            }
        }
    }
    results
}

#[test]
fn documented_curl_calls_match_etcd() {
    let etcd = Server::start(Kind::Etcd);
    let kvstore = Server::start(Kind::Kvstore);
    let expected = session(&etcd);
    let actual = session(&kvstore);
    let differences: Vec<String> = expected
        .iter()
        .zip(&actual)
        .filter(|(e, a)| e != a)
        .map(|(e, a)| format!("--- etcd\n{e}\n--- kvstore\n{a}"))
        .collect();
    assert!(differences.is_empty(), "{}", differences.join("\n"));
    assert_eq!(expected.len(), actual.len());
}

#[test]
fn etcd3gw_round_trips() {
    let server = Server::start(Kind::Kvstore);
    let script = format!(
        r#"
import etcd3gw
client = etcd3gw.client(host="127.0.0.1", port={port})
client.put("greeting", "hello")
assert client.get("greeting") == [b"hello"], client.get("greeting")
lease = client.lease(ttl=30)
client.put("leased", "x", lease=lease)
assert lease.keys() == [b"leased"], lease.keys()
assert client.delete("greeting")
assert client.get("greeting") == []
print("ok")
"#,
        port = server.client_port
    );
    let output = std::process::Command::new("python3")
        .args(["-c", &script])
        .output()
        .expect("run python3");
    assert!(
        output.status.success() && String::from_utf8_lossy(&output.stdout).trim() == "ok",
        "etcd3gw failed (scripts/deps installs it with pip):\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn bad_http_input_gets_a_4xx_with_a_message() {
    let server = Server::start(Kind::Kvstore);
    let port = server.client_port;
    for (path, body, status) in [
        ("/v3/kv/range", b"{\"key\": ".to_vec(), 400),
        ("/v3/kv/range", b"{\"key\": 5}".to_vec(), 400),
        ("/v3/kv/put", b"[1, 2]".to_vec(), 400),
        ("/v3/kv/range", b"{}".to_vec(), 400),
        ("/v3/nothing/here", b"{}".to_vec(), 404),
        ("/v3/kv/put", vec![b' '; 3 << 20], 413),
    ] {
        let (got, response) = http_post(port, path, &body).unwrap();
        assert_eq!(got, status, "{path}: {response}");
        assert!(!response.trim().is_empty(), "{path}: empty error body");
    }
    // The server is still there.
    assert!(server.etcdctl(&["put", "k", "v"]).status.success());

    // Bodies follow --max-request-bytes, as gRPC messages do.
    let small = Server::start_with(Kind::Kvstore, &["--max-request-bytes=1024"]);
    let big = format!(
        r#"{{"key": "Zm9v", "value": "{}"}}"#,
        "QUFB".repeat(300_000)
    );
    let (got, response) = http_post(small.client_port, "/v3/kv/put", big.as_bytes()).unwrap();
    assert_eq!(got, 413, "{response}");
}
