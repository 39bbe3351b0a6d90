//! The NOSPACE alarm, run the same way against Debian's etcd and kvstore: writes past
//! `--quota-backend-bytes` are refused with etcd's error and raise the alarm; reads
//! and deletes still work; after compaction, defragmentation and `alarm disarm`,
//! writes are accepted again.

mod common;

use common::{text, Kind, Server};

fn normalize(output: &str) -> String {
    // Member IDs differ between the two servers.
    let mut out = String::new();
    let mut rest = output;
    while let Some(index) = rest.find("memberID:") {
        let (before, after) = rest.split_at(index + "memberID:".len());
        out.push_str(before);
        out.push_str("<id>");
        rest = after.trim_start_matches(|c: char| c.is_ascii_digit());
    }
    out.push_str(rest);
    out
}

/// The session's transcript, and how many puts were acknowledged and how many keys
/// the delete removed.
fn session(server: &Server) -> (Vec<String>, usize, usize) {
    let value = "v".repeat(1 << 20);
    let mut transcript = Vec::new();
    let mut written = 0;
    let refusal = loop {
        let output = server.etcdctl_with_input(&["put", &format!("k{written}")], Some(&value));
        if !output.status.success() {
            break text(&output);
        }
        written += 1;
        assert!(written < 100, "100 MiB written under a 16 MiB quota");
    };
    transcript.push(format!("refused after some writes: {refusal}"));
    transcript.push(format!(
        "alarm list: {}",
        text(&server.etcdctl(&["alarm", "list"]))
    ));
    transcript.push(format!(
        "put while alarmed: {}",
        text(&server.etcdctl_with_input(&["put", "small"], Some("x")))
    ));
    transcript.push(format!(
        "read while alarmed: {}",
        text(&server.etcdctl(&["get", "k0", "--keys-only"]))
    ));
    let deleted = server.etcdctl(&["del", "k", "--prefix"]);
    let deleted_count: usize = String::from_utf8_lossy(&deleted.stdout)
        .trim()
        .parse()
        .unwrap_or(0);
    // etcd's quota applier applies a put and then reports NOSPACE when the backend
    // crossed the quota in between, so etcd may hold one refused put more.
    transcript.push(format!(
        "delete while alarmed removed every acknowledged key: {}",
        deleted.status.success() && deleted_count >= written
    ));
    let status = server.etcdctl(&["get", "k", "-w", "json"]);
    let json: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    let revision = json["header"]["revision"].as_i64().unwrap().to_string();
    transcript.push(format!(
        "compact: {}",
        text(&server.etcdctl(&["compact", &revision])).replace(&revision, "<rev>")
    ));
    transcript.push(format!(
        "defrag: {}",
        text(&server.etcdctl(&["defrag"])).replace(&server.endpoint(), "<endpoint>")
    ));
    transcript.push(format!(
        "disarm: {}",
        text(&server.etcdctl(&["alarm", "disarm"]))
    ));
    transcript.push(format!(
        "put after disarm: {}",
        text(&server.etcdctl_with_input(&["put", "small"], Some("x")))
    ));
    transcript.push(format!(
        "alarm list: {}",
        text(&server.etcdctl(&["alarm", "list"]))
    ));
    let transcript = transcript
        .into_iter()
        .map(|line| normalize(&line))
        .collect();
    (transcript, written, deleted_count)
}

#[test]
fn nospace_alarm_matches_etcd() {
    let flags = ["--quota-backend-bytes=16777216"];
    let etcd = Server::start_with(Kind::Etcd, &flags);
    let kvstore = Server::start_with(Kind::Kvstore, &flags);
    let (expected, _, _) = session(&etcd);
    let (actual, written, deleted) = session(&kvstore);
    assert!(expected[0].contains("etcdserver: mvcc: database space exceeded"));
    assert_eq!(expected, actual);
    // kvstore refuses before it proposes or applies: a refused put is never stored.
    assert_eq!(deleted, written, "kvstore stored a put it refused");
}
