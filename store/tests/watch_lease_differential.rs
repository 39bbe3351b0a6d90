//! The same etcdctl watch and lease sessions against Debian's etcd and against
//! kvstore, and the same gRPC watch conversation: outputs must match once IDs, terms
//! and remaining TTLs are normalized.

mod common;

use std::time::Duration;

use common::{normalize, text, Kind, Server};
use kvstore::pb::etcdserverpb::watch_client::WatchClient;
use kvstore::pb::etcdserverpb::watch_create_request::FilterType;
use kvstore::pb::etcdserverpb::watch_request::RequestUnion;
use kvstore::pb::etcdserverpb::{
    WatchCancelRequest, WatchCreateRequest, WatchProgressRequest, WatchRequest, WatchResponse,
};

/// One step of a session. Arguments may name `{lease}`: the lease the last
/// [`Step::Grant`] created on that server.
enum Step {
    /// etcdctl with these arguments.
    Run(&'static [&'static str]),
    /// etcdctl with stdin.
    Input(&'static [&'static str], &'static str),
    /// `lease grant`, remembering the lease.
    Grant(&'static str),
    /// A background etcdctl (a watch), read until it is quiet, then stopped.
    Watch(&'static [&'static str]),
    /// A background watch while other commands run.
    WatchWhile(&'static [&'static str], &'static [&'static [&'static str]]),
    /// `etcdctl watch -i` fed these lines; stdin is closed once output is quiet.
    Interactive(&'static str),
}

const TXN: &str = "\nput foo/b y\nput zed z\n\n";
const QUIET: Duration = Duration::from_millis(800);
/// How long a quiet watch may take to exit by itself (a canceled one does) before
/// it is stopped.
const EXIT_GRACE: Duration = Duration::from_millis(300);

const SESSION: &[Step] = &[
    Step::Run(&["put", "foo", "1"]),
    Step::Run(&["put", "foo", "2"]),
    Step::Run(&["put", "foo/a", "x"]),
    Step::Run(&["put", "bar", "b"]),
    Step::Run(&["del", "foo"]),
    Step::Input(&["txn"], TXN),
    Step::Run(&["put", "foo", "3"]),
    Step::Watch(&["watch", "--rev=1", "foo"]),
    Step::Watch(&["watch", "--rev=1", "--prefix", "foo"]),
    Step::Watch(&["watch", "--rev=1", "--prev-kv", "--prefix", "foo"]),
    Step::Watch(&["watch", "--rev=1", "bar", "zzz"]),
    Step::Watch(&["watch", "--rev=4", "-w", "json", "--prefix", "foo"]),
    Step::Watch(&["watch", "--rev=3", "--prev-kv", "-w", "json", "foo"]),
    Step::Watch(&[
        "watch",
        "--rev=1",
        "--prefix",
        "foo",
        "--",
        "sh",
        "-c",
        "echo \"$ETCD_WATCH_EVENT_TYPE $ETCD_WATCH_KEY $ETCD_WATCH_VALUE $ETCD_WATCH_REVISION\"",
    ]),
    Step::Watch(&["watch", "--rev=1", "zzz", "aaa"]),
    Step::WatchWhile(
        &["watch", "--rev=9", "--prev-kv", "foo"],
        &[&["put", "foo", "4"], &["del", "foo"], &["put", "foo", "5"]],
    ),
    Step::Interactive("watch --rev=1 foo\n"),
    Step::Interactive("watch --rev=2 --prefix foo --prev-kv\n"),
    // Leases.
    Step::Grant("100"),
    Step::Run(&["put", "--lease={lease}", "lk1", "v1"]),
    Step::Run(&["put", "--lease={lease}", "lk2", "v2"]),
    Step::Run(&["get", "lk1", "-w", "json"]),
    Step::Run(&["lease", "timetolive", "{lease}"]),
    Step::Run(&["lease", "timetolive", "--keys", "{lease}"]),
    Step::Run(&["lease", "timetolive", "--keys", "{lease}", "-w", "json"]),
    Step::Run(&["lease", "list"]),
    Step::Run(&["lease", "keep-alive", "--once", "{lease}"]),
    Step::Run(&["put", "lk1", "detached"]),
    Step::Run(&["lease", "timetolive", "--keys", "{lease}"]),
    Step::Run(&["lease", "revoke", "{lease}"]),
    Step::Run(&["get", "lk", "--prefix"]),
    Step::Watch(&["watch", "--rev=13", "--prefix", "lk"]),
    Step::Run(&["lease", "timetolive", "{lease}"]),
    Step::Run(&["lease", "revoke", "{lease}"]),
    Step::Run(&["lease", "keep-alive", "--once", "{lease}"]),
    Step::Run(&["lease", "list"]),
    Step::Run(&["put", "--lease=1234abcd", "x", "y"]),
    Step::Run(&["lease", "grant", "9000000001"]),
    Step::Run(&["lease", "grant", "1", "-w", "json"]),
    Step::Grant("1"),
    Step::Run(&["lease", "timetolive", "{lease}", "-w", "json"]),
    // History below the compaction point.
    Step::Run(&["compact", "5"]),
    Step::Watch(&["watch", "--rev=2", "foo"]),
    Step::Watch(&["watch", "--rev=5", "--prefix", "foo"]),
    Step::Interactive("watch --rev=3 foo\n"),
];

/// Lease IDs (long hex or decimal tokens) and remaining TTLs differ between any two
/// runs.
fn normalize_leases(output: &str) -> String {
    output
        .lines()
        .map(
            |line| match serde_json::from_str::<serde_json::Value>(line) {
                Ok(mut json) if json.is_object() => {
                    normalize_lease_json(&mut json);
                    json.to_string()
                }
                _ => normalize_lease_text(line),
            },
        )
        .collect::<Vec<_>>()
        .join("\n")
}

fn normalize_lease_json(json: &mut serde_json::Value) {
    match json {
        serde_json::Value::Object(map) => {
            // etcd lists a lease's keys in map order, which varies.
            if let Some(keys) = map.get_mut("keys").and_then(|k| k.as_array_mut()) {
                keys.sort_by_key(|k| k.to_string());
            }
            for (key, value) in map.iter_mut() {
                // Remaining TTLs tick; IDs are chosen by each server.
                if matches!(key.as_str(), "ttl" | "id" | "lease") && value.as_i64().unwrap_or(0) > 0
                {
                    *value = "<n>".into();
                } else {
                    normalize_lease_json(value);
                }
            }
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(normalize_lease_json),
        _ => {}
    }
}

fn normalize_lease_text(line: &str) -> String {
    let mut out = String::new();
    let mut token = String::new();
    let flush = |token: &mut String, out: &mut String| {
        if token.len() >= 10 && token.chars().all(|c| c.is_ascii_hexdigit()) {
            out.push_str("<lease>");
        } else {
            out.push_str(token);
        }
        token.clear();
    };
    for c in line.chars() {
        if c.is_ascii_alphanumeric() {
            token.push(c);
        } else {
            flush(&mut token, &mut out);
            out.push(c);
        }
    }
    flush(&mut token, &mut out);
    // etcd lists a lease's keys in map order, which varies.
    if let Some((before, rest)) = out.split_once("attached keys([") {
        if let Some((keys, after)) = rest.split_once("])") {
            let mut keys: Vec<&str> = keys.split(' ').collect();
            keys.sort_unstable();
            out = format!("{before}attached keys([{}]){after}", keys.join(" "));
        }
    }
    // "remaining(99s)" depends on timing.
    let mut result = String::new();
    let mut rest = out.as_str();
    while let Some(index) = rest.find("remaining(") {
        let (before, after) = rest.split_at(index + "remaining(".len());
        result.push_str(before);
        let digits = after.chars().take_while(|c| c.is_ascii_digit()).count();
        result.push_str("<n>");
        rest = &after[digits..];
    }
    result.push_str(rest);
    result
}

fn run_step(server: &Server, step: &Step, lease: &mut String) -> String {
    let substitute = |args: &[&str]| -> Vec<String> {
        args.iter()
            .map(|arg| arg.replace("{lease}", lease))
            .collect()
    };
    match step {
        Step::Run(args) => {
            let args = substitute(args);
            let refs: Vec<&str> = args.iter().map(String::as_str).collect();
            text(&server.etcdctl(&refs))
        }
        Step::Input(args, input) => text(&server.etcdctl_with_input(args, Some(input))),
        Step::Grant(ttl) => {
            let output = server.etcdctl(&["lease", "grant", ttl]);
            let stdout = String::from_utf8_lossy(&output.stdout).to_string();
            *lease = stdout
                .split_whitespace()
                .nth(1)
                .unwrap_or_default()
                .to_string();
            text(&output)
        }
        Step::Watch(args) => {
            let args = substitute(args);
            let refs: Vec<&str> = args.iter().map(String::as_str).collect();
            let mut watch = server.etcdctl_background(&refs, false);
            watch.read_until_quiet(QUIET, Duration::from_secs(10));
            watch.finish(EXIT_GRACE)
        }
        Step::WatchWhile(args, commands) => {
            let mut watch = server.etcdctl_background(args, false);
            std::thread::sleep(Duration::from_millis(300));
            let mut outputs = String::new();
            for command in *commands {
                outputs.push_str(&text(&server.etcdctl(command)));
                outputs.push('\n');
            }
            watch.read_until_quiet(QUIET, Duration::from_secs(10));
            format!("{outputs}{}", watch.finish(EXIT_GRACE))
        }
        Step::Interactive(input) => {
            let mut watch = server.etcdctl_background(&["watch", "-i"], true);
            {
                use std::io::Write;
                let stdin = watch.stdin.as_mut().expect("stdin");
                stdin.write_all(input.as_bytes()).expect("write stdin");
                stdin.flush().expect("flush stdin");
            }
            watch.read_until_quiet(QUIET, Duration::from_secs(10));
            watch.finish(Duration::from_secs(5))
        }
    }
}

fn describe(step: &Step) -> String {
    match step {
        Step::Run(args) | Step::Input(args, _) | Step::Watch(args) | Step::WatchWhile(args, _) => {
            args.join(" ")
        }
        Step::Grant(ttl) => format!("lease grant {ttl}"),
        Step::Interactive(input) => format!("watch -i <<< {input:?}"),
    }
}

#[test]
fn etcdctl_watch_and_lease_sessions_match_etcd() {
    let etcd = Server::start(Kind::Etcd);
    let kvstore = Server::start(Kind::Kvstore);
    let servers = [&etcd, &kvstore];
    let (mut etcd_lease, mut kvstore_lease) = (String::new(), String::new());
    let mut mismatches = Vec::new();
    for (number, step) in SESSION.iter().enumerate() {
        let expected = normalize_leases(&normalize(
            &run_step(&etcd, step, &mut etcd_lease),
            &servers,
        ));
        let actual = normalize_leases(&normalize(
            &run_step(&kvstore, step, &mut kvstore_lease),
            &servers,
        ));
        if std::env::var_os("SHOW_SESSION").is_some() {
            eprintln!("step {number} `etcdctl {}`\n{expected}\n", describe(step));
        }
        if expected != actual {
            mismatches.push(format!(
                "step {number} `etcdctl {}`\n--- etcd\n{expected}\n--- kvstore\n{actual}\n",
                describe(step)
            ));
        }
    }
    assert!(
        mismatches.is_empty(),
        "{} of {} steps differ:\n{}",
        mismatches.len(),
        SESSION.len(),
        mismatches.join("\n")
    );
}

fn create(key: &str, range_end: &str, start_revision: i64) -> WatchRequest {
    WatchRequest {
        request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
            key: key.into(),
            range_end: range_end.into(),
            start_revision,
            ..Default::default()
        })),
    }
}

fn with(request: WatchRequest, change: impl FnOnce(&mut WatchCreateRequest)) -> WatchRequest {
    let mut request = request;
    if let Some(RequestUnion::CreateRequest(create)) = &mut request.request_union {
        change(create);
    }
    request
}

/// A watch conversation over gRPC: requests, then the responses they produce.
async fn conversation(server: &Server) -> Vec<String> {
    let channel = server.channel().await;
    let mut kv = kvstore::pb::etcdserverpb::kv_client::KvClient::new(channel.clone());
    for (key, value) in [("a", "1"), ("b", "1"), ("a", "2")] {
        kv.put(kvstore::pb::etcdserverpb::PutRequest {
            key: key.into(),
            value: value.into(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    kv.delete_range(kvstore::pb::etcdserverpb::DeleteRangeRequest {
        key: "b".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    // Revision 5 now.
    let (sender, receiver) = tokio::sync::mpsc::channel(16);
    // grpc-go sends response headers with the first message: the call completes
    // only once a request was answered, so it is awaited after the first send.
    let mut call = Some(tokio::spawn(async move {
        WatchClient::new(channel)
            .watch(tokio_stream::wrappers::ReceiverStream::new(receiver))
            .await
    }));
    let mut responses_slot = None;
    let requests = vec![
        // Server-chosen IDs start at 0.
        (create("a", "", 1), 2),
        (create("a", "c", 2), 2),
        // A client-chosen ID, then the same again.
        (with(create("b", "", 1), |c| c.watch_id = 7), 2),
        (with(create("b", "", 1), |c| c.watch_id = 7), 1),
        // Filters and prev_kv.
        (
            with(create("a", "z", 1), |c| {
                c.filters = vec![FilterType::Noput as i32];
                c.prev_kv = true;
            }),
            2,
        ),
        (
            with(create("a", "z", 1), |c| {
                c.filters = vec![FilterType::Nodelete as i32];
            }),
            2,
        ),
        // Empty range, from-key, every key.
        (create("z", "a", 0), 1),
        (create("b", "\0", 1), 2),
        (create("", "\0", 4), 2),
        // A watch on the future: created, nothing yet.
        (create("a", "", 0), 1),
        // Cancel an existing and a missing watcher.
        (
            WatchRequest {
                request_union: Some(RequestUnion::CancelRequest(WatchCancelRequest {
                    watch_id: 0,
                })),
            },
            1,
        ),
        (
            WatchRequest {
                request_union: Some(RequestUnion::CancelRequest(WatchCancelRequest {
                    watch_id: 99,
                })),
            },
            0,
        ),
        // Progress: all synced, so one response.
        (
            WatchRequest {
                request_union: Some(RequestUnion::ProgressRequest(WatchProgressRequest {})),
            },
            1,
        ),
    ];
    let mut transcript = Vec::new();
    for (request, expected) in requests {
        transcript.push(format!("> {request:?}"));
        sender.send(request).await.unwrap();
        if let Some(call) = call.take() {
            responses_slot = Some(call.await.unwrap().unwrap().into_inner());
        }
        let responses = responses_slot.as_mut().expect("call made");
        for _ in 0..expected {
            let response: WatchResponse =
                tokio::time::timeout(Duration::from_secs(5), responses.message())
                    .await
                    .expect("a response in time")
                    .unwrap()
                    .unwrap();
            transcript.push(describe_response(response));
        }
    }
    // A live write reaches watchers 1 (a..c), 3 (no deletes), 5 (every key) and 6
    // (the future one); 2 filters puts out, 4 starts at "b", 0 was canceled.
    kv.put(kvstore::pb::etcdserverpb::PutRequest {
        key: "a".into(),
        value: "3".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let responses = responses_slot.as_mut().expect("call made");
    let mut live = Vec::new();
    for _ in 0..4 {
        let response = tokio::time::timeout(Duration::from_secs(5), responses.message())
            .await
            .expect("a response in time")
            .unwrap()
            .unwrap();
        live.push(describe_response(response));
    }
    live.sort();
    transcript.extend(live);
    transcript
}

fn describe_response(mut response: WatchResponse) -> String {
    if let Some(header) = &mut response.header {
        header.cluster_id = 0;
        header.member_id = 0;
        header.raft_term = 0;
    }
    format!("< {response:?}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_watch_conversation_matches_etcd() {
    let etcd = Server::start(Kind::Etcd);
    let kvstore = Server::start(Kind::Kvstore);
    let expected = conversation(&etcd).await;
    let actual = conversation(&kvstore).await;
    if expected != actual {
        let mut report = String::new();
        for (number, (e, a)) in expected.iter().zip(&actual).enumerate() {
            let marker = if e == a { " " } else { "!" };
            report.push_str(&format!(
                "{marker}{number} etcd:    {e}\n{marker}{number} kvstore: {a}\n"
            ));
        }
        panic!("watch conversations differ:\n{report}");
    }
}

/// The next response, with values replaced by their sizes.
async fn next_sized(responses: &mut tonic::Streaming<WatchResponse>) -> String {
    let mut response = tokio::time::timeout(Duration::from_secs(5), responses.message())
        .await
        .expect("a response in time")
        .unwrap()
        .unwrap();
    for event in &mut response.events {
        if let Some(kv) = &mut event.kv {
            kv.value = format!("<{} bytes>", kv.value.len()).into_bytes();
        }
    }
    describe_response(response)
}

/// Responses to a watch with `progress_notify` (every `--experimental-watch-progress-
/// notify-interval`) and one with `fragment` over history larger than
/// `--max-request-bytes`.
async fn progress_and_fragments(server: &Server) -> Vec<String> {
    let channel = server.channel().await;
    let mut kv = kvstore::pb::etcdserverpb::kv_client::KvClient::new(channel.clone());
    for i in 0..8 {
        kv.put(kvstore::pb::etcdserverpb::PutRequest {
            key: format!("big/{i}").into(),
            value: vec![b'x'; 140_000],
            ..Default::default()
        })
        .await
        .unwrap();
    }
    let (sender, receiver) = tokio::sync::mpsc::channel(4);
    sender
        .send(with(create("big/", "big0", 1), |c| c.fragment = true))
        .await
        .unwrap();
    let mut responses = WatchClient::new(channel)
        .watch(tokio_stream::wrappers::ReceiverStream::new(receiver))
        .await
        .unwrap()
        .into_inner();
    let mut transcript = Vec::new();
    transcript.push(next_sized(&mut responses).await);
    // Fragments until one without the flag.
    loop {
        let response = next_sized(&mut responses).await;
        let last = !response.contains("fragment: true");
        transcript.push(response);
        if last {
            break;
        }
    }
    sender
        .send(with(create("quiet", "", 0), |c| c.progress_notify = true))
        .await
        .unwrap();
    transcript.push(next_sized(&mut responses).await);
    // Nothing happens to "quiet": the next response is a progress notification.
    transcript.push(next_sized(&mut responses).await);
    transcript
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_notifications_and_fragments_match_etcd() {
    let flags = [
        "--max-request-bytes=150000",
        "--experimental-watch-progress-notify-interval=500ms",
    ];
    let etcd = Server::start_with(Kind::Etcd, &flags);
    let kvstore = Server::start_with(Kind::Kvstore, &flags);
    let expected = progress_and_fragments(&etcd).await;
    let actual = progress_and_fragments(&kvstore).await;
    assert!(
        expected.len() > 4,
        "etcd fragmented the history: {expected:#?}"
    );
    assert_eq!(expected, actual);
}
