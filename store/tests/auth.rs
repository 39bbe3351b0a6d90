//! Authentication and role-based access: one etcdctl script run against Debian's
//! etcd and against kvstore must give the same output (users, roles, grants on keys,
//! ranges and prefixes, allowed and denied reads, writes, txns, watches, maintenance
//! calls); then the attacks that broke etcd before must fail against kvstore.

mod common;

use std::process::{Command, Stdio};

use common::{normalize, text, Kind, Server};
use futures::StreamExt;
use kvstore::pb::etcdserverpb::kv_client::KvClient;
use kvstore::pb::etcdserverpb::request_op::Request as Op;
use kvstore::pb::etcdserverpb::watch_client::WatchClient;
use kvstore::pb::etcdserverpb::watch_request::RequestUnion;
use kvstore::pb::etcdserverpb::{
    PutRequest, RangeRequest, RequestOp, TxnRequest, WatchCreateRequest, WatchRequest,
};

const ROOT: &str = "--user=root:rootpw";
const ALICE: &str = "--user=alice:alicepw";

/// One step of the script: etcdctl arguments and what goes to its stdin.
struct Step {
    args: Vec<String>,
    input: Option<&'static str>,
    /// Ends the command after this many seconds (watches).
    timeout: Option<u32>,
}

fn step(args: &[&str]) -> Step {
    Step {
        args: args.iter().map(|s| s.to_string()).collect(),
        input: None,
        timeout: None,
    }
}

fn with_input(args: &[&str], input: &'static str) -> Step {
    Step {
        input: Some(input),
        ..step(args)
    }
}

fn timed(args: &[&str], seconds: u32) -> Step {
    Step {
        timeout: Some(seconds),
        ..step(args)
    }
}

/// Brings auth up the way etcd's documentation does, with a role whose grants
/// cover a key, a prefix and a range.
fn setup_steps() -> Vec<Step> {
    vec![
        step(&["auth", "enable"]),
        step(&["user", "add", "root:rootpw", "--interactive=false"]),
        step(&["auth", "enable"]),
        step(&["user", "grant-role", "root", "root"]),
        step(&["role", "add", "root"]),
        step(&["user", "grant-role", "root", "root"]),
        step(&["auth", "enable"]),
        step(&["put", "a", "1"]),
        step(&[ROOT, "put", "a", "1"]),
        step(&["--user=root:wrong", "get", "a"]),
        step(&["--user=nobody:x", "get", "a"]),
        step(&[ROOT, "user", "add", "alice:alicepw", "--interactive=false"]),
        step(&[ROOT, "role", "add", "reader"]),
        step(&[ROOT, "role", "grant-permission", "reader", "read", "foo"]),
        step(&[
            ROOT,
            "role",
            "grant-permission",
            "reader",
            "--prefix",
            "readwrite",
            "pub/",
        ]),
        step(&[
            ROOT,
            "role",
            "grant-permission",
            "reader",
            "readwrite",
            "r1",
            "r5",
        ]),
        step(&[ROOT, "role", "grant-permission", "reader", "write", "w"]),
        step(&[ROOT, "role", "get", "reader"]),
        step(&[ROOT, "user", "grant-role", "alice", "reader"]),
        step(&[ROOT, "user", "get", "alice"]),
        step(&[ROOT, "user", "list"]),
        step(&[ROOT, "role", "list"]),
        step(&[ROOT, "put", "foo", "bar"]),
        step(&[ROOT, "put", "secret", "s"]),
        step(&[ROOT, "put", "w", "hidden"]),
    ]
}

fn script() -> Vec<Step> {
    let mut steps = setup_steps();
    steps.extend([
        step(&[ALICE, "get", "foo"]),
        step(&[ALICE, "put", "foo", "x"]),
        step(&[ALICE, "get", "secret"]),
        step(&[ALICE, "put", "pub/x", "1"]),
        step(&[ALICE, "get", "pub/", "--prefix"]),
        step(&[ALICE, "get", "r1", "r5"]),
        step(&[ALICE, "get", "r1", "r6"]),
        step(&[ALICE, "get", "", "--prefix"]),
        step(&[ALICE, "get", "foo", "--from-key"]),
        step(&[ALICE, "put", "w", "mine"]),
        step(&[ALICE, "get", "w"]),
        step(&[ALICE, "del", "pub/x"]),
        step(&[ALICE, "del", "secret"]),
        step(&[ALICE, "user", "list"]),
        step(&[ALICE, "role", "list"]),
        step(&[ALICE, "user", "get", "alice"]),
        step(&[ALICE, "user", "get", "root"]),
        step(&[ALICE, "role", "get", "reader"]),
        step(&[ALICE, "role", "get", "root"]),
        step(&[ALICE, "user", "add", "bob:x", "--interactive=false"]),
        step(&[
            ALICE,
            "role",
            "grant-permission",
            "reader",
            "readwrite",
            "secret",
        ]),
        step(&[ALICE, "auth", "disable"]),
        step(&[ROOT, "user", "delete", "root"]),
        step(&[ROOT, "user", "revoke-role", "root", "root"]),
        step(&[ROOT, "role", "delete", "root"]),
        step(&[ROOT, "user", "revoke-role", "alice", "nope"]),
        step(&[ROOT, "role", "revoke-permission", "reader", "nokey"]),
        step(&[ROOT, "user", "add", "alice:x", "--interactive=false"]),
        step(&[ROOT, "role", "add", "reader"]),
        step(&[ROOT, "user", "grant-role", "alice", "nope"]),
        step(&[ROOT, "user", "get", "nobody"]),
        step(&[ROOT, "role", "get", "nope"]),
        timed(&[ALICE, "watch", "foo", "--rev", "1"], 3),
        timed(&[ALICE, "watch", "secret", "--rev", "1"], 3),
        timed(&[ALICE, "watch", "pub/", "--prefix", "--rev", "1"], 3),
        step(&[ALICE, "lease", "grant", "100"]),
        step(&[ALICE, "endpoint", "health"]),
        step(&[ALICE, "defrag"]),
        step(&[ALICE, "endpoint", "hashkv"]),
        with_input(
            &[ALICE, "txn"],
            "value(\"foo\") = \"bar\"\n\nput pub/y 2\n\nget foo\n\n",
        ),
        with_input(
            &[ALICE, "txn"],
            "value(\"secret\") = \"s\"\n\nput pub/y 2\n\n\n",
        ),
        with_input(&[ALICE, "txn"], "\nput secret x\n\n\n"),
        with_input(
            &[ROOT, "user", "passwd", "alice", "--interactive=false"],
            "newpw\n",
        ),
        step(&[ALICE, "get", "foo"]),
        step(&["--user=alice:newpw", "get", "foo"]),
        step(&[ROOT, "role", "revoke-permission", "reader", "foo"]),
        step(&["--user=alice:newpw", "get", "foo"]),
        step(&[ROOT, "user", "revoke-role", "alice", "reader"]),
        step(&["--user=alice:newpw", "get", "pub/y"]),
        step(&[ROOT, "role", "delete", "reader"]),
        step(&[ROOT, "user", "delete", "alice"]),
        step(&["--user=alice:newpw", "get", "foo"]),
        step(&["get", "foo"]),
        step(&[ROOT, "auth", "disable"]),
        step(&["get", "foo"]),
        step(&["user", "list"]),
    ]);
    steps
}

fn run_step(server: &Server, step: &Step) -> String {
    let args: Vec<&str> = step.args.iter().map(String::as_str).collect();
    let output = match step.timeout {
        None => server.etcdctl_with_input(&args, step.input),
        Some(seconds) => Command::new("timeout")
            .arg(seconds.to_string())
            .arg(common::ETCDCTL)
            .arg(format!("--endpoints={}", server.endpoint()))
            .args(&args)
            .stdin(Stdio::null())
            .output()
            .expect("run timeout etcdctl"),
    };
    let mut out = text(&output);
    // Lease IDs are chosen by each server.
    if let Some(rest) = out.strip_prefix("lease ") {
        if let Some((_, tail)) = rest.split_once(' ') {
            out = format!("lease <id> {tail}");
        }
    }
    out
}

fn transcript(server: &Server, steps: &[Step]) -> String {
    steps
        .iter()
        .map(|step| {
            format!(
                "$ etcdctl {}\n{}",
                step.args.join(" "),
                normalize(&run_step(server, step), &[server])
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn auth_script_matches_etcd() {
    let etcd = Server::start(Kind::Etcd);
    let kvstore = Server::start(Kind::Kvstore);
    let steps = script();
    let expected = transcript(&etcd, &steps);
    let actual = transcript(&kvstore, &steps);
    if expected != actual {
        let diff: Vec<String> = expected
            .lines()
            .zip(actual.lines())
            .filter(|(a, b)| a != b)
            .map(|(a, b)| format!("etcd:    {a}\nkvstore: {b}"))
            .collect();
        panic!(
            "transcripts differ:\n{}\n\nkvstore transcript:\n{actual}",
            diff.join("\n")
        );
    }
    // The script saw the denials it was written for.
    assert!(actual.contains("etcdserver: permission denied"), "{actual}");
    assert!(actual.contains("auth: permission denied"), "{actual}");
    assert!(
        actual.contains("etcdserver: authentication failed, invalid user ID or password"),
        "{actual}"
    );
}

/// Calls etcd 3.4 lets any user make, kvstore lets only root make: they change or
/// reveal what every tenant shares (the cluster's members, its alarms, the
/// history every user's keys live in).
#[test]
fn cluster_wide_calls_are_root_only() {
    let kvstore = Server::start(Kind::Kvstore);
    for step in setup_steps() {
        run_step(&kvstore, &step);
    }
    for args in [
        &[ALICE, "member", "list"][..],
        &[ALICE, "alarm", "list"],
        &[ALICE, "alarm", "disarm"],
        &[ALICE, "compaction", "2"],
        &[ALICE, "move-leader", "1"],
        &[ALICE, "snapshot", "save", "/dev/null"],
    ] {
        let out = text(&kvstore.etcdctl(args));
        assert!(
            out.contains("permission denied") && !out.ends_with("exit=0"),
            "{args:?}: {out}"
        );
    }
    // Without any user at all, the same.
    let out = text(&kvstore.etcdctl(&["member", "list"]));
    assert!(out.contains("etcdserver: user name is empty"), "{out}");
    // Root may.
    for args in [
        &[ROOT, "member", "list"][..],
        &[ROOT, "alarm", "list"],
        &[ROOT, "compaction", "2"],
    ] {
        let out = text(&kvstore.etcdctl(args));
        assert!(out.ends_with("exit=0"), "{args:?}: {out}");
    }
}

fn authenticate(server: &Server, user: &str, password: &str) -> String {
    let body = format!(r#"{{"name":"{user}","password":"{password}"}}"#);
    let (status, response) =
        common::http_post(server.client_port, "/v3/auth/authenticate", body.as_bytes())
            .expect("authenticate over the gateway");
    assert_eq!(status, 200, "{response}");
    let json: serde_json::Value = serde_json::from_str(&response).expect("JSON");
    json["token"].as_str().expect("token").to_string()
}

/// The gateway's answer to a Range of "foo" with `token` in `Authorization`.
fn gateway_get_foo(server: &Server, token: &str) -> String {
    let output = Command::new("curl")
        .args(["-s", "-H", &format!("Authorization: {token}"), "-d"])
        .arg(r#"{"key":"Zm9v"}"#)
        .arg(format!("http://{}/v3/kv/range", server.endpoint()))
        .output()
        .expect("curl");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Attacks that read or wrote outside a grant in etcd before: each must be refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attacks_outside_a_grant_are_refused() {
    let kvstore = Server::start(Kind::Kvstore);
    for step in setup_steps() {
        run_step(&kvstore, &step);
    }
    // A nested transaction reaching a key the user may not write (etcd before
    // 3.4.26 checked only the outer level).
    let token = authenticate(&kvstore, "alice", "alicepw");
    let channel = kvstore.channel().await;
    let header: tonic::metadata::MetadataValue<_> = token.parse().expect("token header");
    let mut kv = KvClient::with_interceptor(channel, move |mut request: tonic::Request<()>| {
        request.metadata_mut().insert("token", header.clone());
        Ok(request)
    });
    let put = |key: &str| RequestOp {
        request: Some(Op::RequestPut(PutRequest {
            key: key.as_bytes().to_vec(),
            value: b"stolen".to_vec(),
            ..Default::default()
        })),
    };
    let nested = TxnRequest {
        success: vec![
            put("pub/ok"),
            RequestOp {
                request: Some(Op::RequestTxn(TxnRequest {
                    success: vec![put("secret")],
                    ..Default::default()
                })),
            },
        ],
        ..Default::default()
    };
    let error = kv.txn(nested).await.expect_err("nested txn allowed");
    assert_eq!(error.code(), tonic::Code::PermissionDenied, "{error:?}");
    assert_eq!(error.message(), "etcdserver: permission denied");
    // A nested read of an ungranted key, too.
    let nested_read = TxnRequest {
        success: vec![RequestOp {
            request: Some(Op::RequestTxn(TxnRequest {
                success: vec![RequestOp {
                    request: Some(Op::RequestRange(RangeRequest {
                        key: b"secret".to_vec(),
                        ..Default::default()
                    })),
                }],
                ..Default::default()
            })),
        }],
        ..Default::default()
    };
    let error = kv.txn(nested_read).await.expect_err("nested read allowed");
    assert_eq!(error.code(), tonic::Code::PermissionDenied);
    let out = text(&kvstore.etcdctl(&[ROOT, "get", "secret", "--print-value-only"]));
    assert_eq!(out, "s\nexit=0", "the nested put changed the key");
    assert!(
        text(&kvstore.etcdctl(&[ROOT, "get", "pub/ok"])).ends_with("exit=0"),
        "the refused txn left no trace"
    );
    assert_eq!(
        text(&kvstore.etcdctl(&[ROOT, "get", "pub/ok", "--print-value-only"])),
        "exit=0"
    );

    // prev_kv would reveal the value of a key the user may only write.
    for args in [
        &[ALICE, "put", "w", "x", "--prev-kv"][..],
        &[ALICE, "del", "w", "--prev-kv"],
    ] {
        let out = text(&kvstore.etcdctl(args));
        assert!(
            out.contains("etcdserver: permission denied"),
            "{args:?}: {out}"
        );
        assert!(!out.contains("hidden"), "{args:?} leaked: {out}");
    }
    assert_eq!(
        text(&kvstore.etcdctl(&[ROOT, "get", "w", "--print-value-only"])),
        "hidden\nexit=0"
    );

    // A watch from a granted key to the end of the key space would stream every
    // later key.
    // (etcdctl 3.4 cannot ask for it: over gRPC, range end "\0".)
    let watch_header: tonic::metadata::MetadataValue<_> = token.parse().expect("token header");
    let mut watch = WatchClient::with_interceptor(
        kvstore.channel().await,
        move |mut request: tonic::Request<()>| {
            request.metadata_mut().insert("token", watch_header.clone());
            Ok(request)
        },
    );
    let create = WatchRequest {
        request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
            key: b"foo".to_vec(),
            range_end: vec![0],
            start_revision: 1,
            ..Default::default()
        })),
    };
    let mut responses = watch
        .watch(futures::stream::iter(vec![create]).chain(futures::stream::pending()))
        .await
        .expect("watch stream")
        .into_inner();
    let first = tokio::time::timeout(std::time::Duration::from_secs(5), responses.message())
        .await
        .expect("watch answered")
        .expect("watch response")
        .expect("a response");
    assert!(first.canceled && first.created, "{first:?}");
    assert_eq!(
        first.cancel_reason,
        "rpc error: code = PermissionDenied desc = etcdserver: permission denied"
    );
    assert!(first.events.is_empty(), "{first:?}");
    let out = run_step(
        &kvstore,
        &timed(&[ALICE, "watch", "r1", "r9", "--rev", "1"], 3),
    );
    assert!(out.contains("permission denied"), "{out}");

    // LeaseTimeToLive with keys would list keys the user may not read.
    let out = text(&kvstore.etcdctl(&[ROOT, "lease", "grant", "600"]));
    let lease = out.split_whitespace().nth(1).expect("lease id").to_string();
    let out = text(&kvstore.etcdctl(&[ROOT, "put", "secret2", "v", "--lease", &lease]));
    assert!(out.ends_with("exit=0"), "{out}");
    let out = text(&kvstore.etcdctl(&[ALICE, "lease", "timetolive", &lease, "--keys"]));
    assert!(out.contains("etcdserver: permission denied"), "{out}");
    assert!(!out.contains("secret2"), "{out}");
    let out = text(&kvstore.etcdctl(&[ALICE, "lease", "timetolive", &lease]));
    assert!(out.contains("remaining"), "{out}");
    // Revoking the lease, or attaching a key to it, would delete keys the user may
    // not write.
    let out = text(&kvstore.etcdctl(&[ALICE, "lease", "revoke", &lease]));
    assert!(out.contains("etcdserver: permission denied"), "{out}");
    let out = text(&kvstore.etcdctl(&[ALICE, "put", "pub/z", "1", "--lease", &lease]));
    assert!(out.contains("etcdserver: permission denied"), "{out}");
    assert_eq!(
        text(&kvstore.etcdctl(&[ROOT, "get", "secret2", "--print-value-only"])),
        "v\nexit=0"
    );

    // A token stops working when its user's password changes or the user goes.
    let out = text(&kvstore.etcdctl_with_input(
        &[ROOT, "user", "passwd", "alice", "--interactive=false"],
        Some("other\n"),
    ));
    assert!(out.ends_with("exit=0"), "{out}");
    let error = kv
        .range(RangeRequest {
            key: b"foo".to_vec(),
            ..Default::default()
        })
        .await
        .expect_err("old token still valid");
    assert_eq!(error.code(), tonic::Code::Unauthenticated);
    assert_eq!(error.message(), "etcdserver: invalid auth token");
}

/// Passwords are stored hashed: neither the data dir nor the log holds them in
/// clear.
#[test]
fn passwords_are_never_stored_or_logged_in_clear() {
    let mut kvstore = Server::start(Kind::Kvstore);
    let password = "Sup3rSecretPassw0rd";
    let out = text(&kvstore.etcdctl(&[
        "user",
        "add",
        &format!("carol:{password}"),
        "--interactive=false",
    ]));
    assert!(out.ends_with("exit=0"), "{out}");
    let out = text(&kvstore.etcdctl_with_input(
        &["user", "passwd", "carol", "--interactive=false"],
        Some("An0therSecret\n"),
    ));
    assert!(out.ends_with("exit=0"), "{out}");
    kvstore.kill();
    let mut found = Vec::new();
    let mut stack = vec![kvstore.data_dir.clone()];
    while let Some(path) = stack.pop() {
        if path.is_dir() {
            for entry in std::fs::read_dir(&path).expect("read dir") {
                stack.push(entry.expect("entry").path());
            }
        } else if let Ok(bytes) = std::fs::read(&path) {
            for secret in [password.as_bytes(), b"An0therSecret"] {
                if bytes.windows(secret.len()).any(|window| window == secret) {
                    found.push(path.display().to_string());
                }
            }
        }
    }
    assert!(found.is_empty(), "password in clear in {found:?}");
    let log = kvstore.log_text();
    assert!(!log.contains(password) && !log.contains("An0therSecret"));
}

/// Writes an ES256 key pair and returns the `--auth-token` flag that uses it.
fn jwt_flag(dir: &std::path::Path) -> String {
    let key = rcgen::KeyPair::generate().expect("key");
    let private = dir.join("jwt.key");
    let public = dir.join("jwt.pub");
    std::fs::write(&private, key.serialize_pem()).expect("write key");
    std::fs::write(&public, key.public_key_pem()).expect("write key");
    format!(
        "--auth-token=jwt,pub-key={},priv-key={},sign-method=ES256,ttl=5m",
        public.display(),
        private.display()
    )
}

/// JWT tokens: the same grants and denials as etcd with the same flag; a token
/// carries its auth revision, so one issued before an auth change is refused.
#[test]
fn jwt_tokens_behave_as_etcds() {
    let keys = tempfile::tempdir().expect("temp dir");
    let flag = jwt_flag(keys.path());
    let etcd = Server::start_with(Kind::Etcd, &[&flag]);
    let kvstore = Server::start_with(Kind::Kvstore, &[&flag]);
    let mut steps = setup_steps();
    steps.extend([
        step(&[ALICE, "get", "foo"]),
        step(&[ALICE, "get", "secret"]),
        step(&[ALICE, "put", "pub/j", "1"]),
        step(&["--user=alice:wrong", "get", "foo"]),
    ]);
    let expected = transcript(&etcd, &steps);
    let actual = transcript(&kvstore, &steps);
    assert_eq!(expected, actual);

    let token = authenticate(&kvstore, "alice", "alicepw");
    assert_eq!(token.split('.').count(), 3, "not a JWT: {token}");
    let get = |token: &str| gateway_get_foo(&kvstore, token);
    assert!(get(&token).contains("\"count\":\"1\""), "{}", get(&token));
    assert!(get("x.y.z").contains("etcdserver: invalid auth token"));
    // Any auth change makes earlier tokens stale.
    let out = text(&kvstore.etcdctl(&[ROOT, "role", "add", "another"]));
    assert!(out.ends_with("exit=0"), "{out}");
    assert!(
        get(&token).contains("etcdserver: revision of auth store is old"),
        "{}",
        get(&token)
    );
    let fresh = authenticate(&kvstore, "alice", "alicepw");
    assert!(get(&fresh).contains("\"count\":\"1\""));
}

/// A simple token lapses after --auth-token-ttl seconds without use.
#[test]
fn simple_tokens_lapse_when_unused() {
    let kvstore = Server::start_with(Kind::Kvstore, &["--auth-token-ttl=1"]);
    for step in setup_steps() {
        run_step(&kvstore, &step);
    }
    let token = authenticate(&kvstore, "alice", "alicepw");
    let range = |token: &str| gateway_get_foo(&kvstore, token);
    assert!(
        range(&token).contains("\"count\":\"1\""),
        "{}",
        range(&token)
    );
    std::thread::sleep(std::time::Duration::from_millis(2500));
    assert!(
        range(&token).contains("etcdserver: invalid auth token"),
        "{}",
        range(&token)
    );
}

/// AuthStatus (etcdctl 3.4 has no command for it): over the gateway.
#[test]
fn auth_status_reports_the_flag_and_revision() {
    let kvstore = Server::start(Kind::Kvstore);
    let status = || {
        let (code, body) =
            common::http_post(kvstore.client_port, "/v3/auth/status", b"{}").expect("status");
        assert_eq!(code, 200, "{body}");
        serde_json::from_str::<serde_json::Value>(&body).expect("JSON")
    };
    let before = status();
    assert!(before.get("enabled").is_none_or(|v| v == false), "{before}");
    for step in setup_steps() {
        run_step(&kvstore, &step);
    }
    let after = status();
    assert_eq!(after["enabled"], true, "{after}");
    let revision: u64 = after["authRevision"]
        .as_str()
        .and_then(|text| text.parse().ok())
        .expect("authRevision");
    assert!(revision >= 5, "{after}");
}

/// Permissions hold while an alarm is raised: the NOSPACE alarm refuses growth to
/// everyone, and what is refused for lack of permission stays refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permissions_hold_while_an_alarm_is_raised() {
    use kvstore::pb::etcdserverpb::alarm_request::AlarmAction;
    use kvstore::pb::etcdserverpb::maintenance_client::MaintenanceClient;
    use kvstore::pb::etcdserverpb::{AlarmRequest, AlarmType};
    let kvstore = Server::start(Kind::Kvstore);
    for step in setup_steps() {
        run_step(&kvstore, &step);
    }
    let token: tonic::metadata::MetadataValue<_> = authenticate(&kvstore, "root", "rootpw")
        .parse()
        .expect("token header");
    let mut maintenance = MaintenanceClient::with_interceptor(
        kvstore.channel().await,
        move |mut request: tonic::Request<()>| {
            request.metadata_mut().insert("token", token.clone());
            Ok(request)
        },
    );
    maintenance
        .alarm(AlarmRequest {
            action: AlarmAction::Activate as i32,
            member_id: 0,
            alarm: AlarmType::Nospace as i32,
        })
        .await
        .expect("root raises NOSPACE");
    let out = text(&kvstore.etcdctl(&[ALICE, "put", "pub/x", "1"]));
    assert!(
        out.contains("etcdserver: mvcc: database space exceeded"),
        "{out}"
    );
    for args in [
        &[ALICE, "put", "secret", "x"][..],
        &[ALICE, "del", "secret"],
        &[ALICE, "alarm", "disarm"],
    ] {
        let out = text(&kvstore.etcdctl(args));
        assert!(out.contains("permission denied"), "{args:?}: {out}");
    }
    assert_eq!(
        text(&kvstore.etcdctl(&[ROOT, "get", "secret", "--print-value-only"])),
        "s\nexit=0"
    );
    let out = text(&kvstore.etcdctl(&[ROOT, "alarm", "disarm"]));
    assert!(out.contains("NOSPACE"), "{out}");
    assert_eq!(
        text(&kvstore.etcdctl(&[ALICE, "put", "pub/x", "1"])),
        "OK\nexit=0"
    );
}

/// Users, roles, grants and the enabled flag survive a restart.
#[test]
fn auth_survives_a_restart() {
    let mut kvstore = Server::start(Kind::Kvstore);
    for step in setup_steps() {
        run_step(&kvstore, &step);
    }
    kvstore.restart();
    assert_eq!(
        text(&kvstore.etcdctl(&[ALICE, "get", "foo", "--print-value-only"])),
        "bar\nexit=0"
    );
    let out = text(&kvstore.etcdctl(&[ALICE, "get", "secret"]));
    assert!(out.contains("etcdserver: permission denied"), "{out}");
    let out = text(&kvstore.etcdctl(&["get", "foo"]));
    assert!(out.contains("etcdserver: user name is empty"), "{out}");
    let out = text(&kvstore.etcdctl(&[ROOT, "role", "get", "reader"]));
    assert!(out.contains("[r1, r5)"), "{out}");
}

/// The server-side lock and election recipes act for the calling user, also in the
/// tasks they run on their own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_and_election_act_for_the_caller() {
    use kvstore::pb::etcdserverpb::lease_client::LeaseClient;
    use kvstore::pb::etcdserverpb::LeaseGrantRequest;
    use kvstore::pb::v3electionpb::election_client::ElectionClient;
    use kvstore::pb::v3electionpb::LeaderRequest;
    use kvstore::pb::v3lockpb::lock_client::LockClient;
    use kvstore::pb::v3lockpb::LockRequest;
    let kvstore = Server::start(Kind::Kvstore);
    for step in setup_steps() {
        run_step(&kvstore, &step);
    }
    let token: tonic::metadata::MetadataValue<_> = authenticate(&kvstore, "alice", "alicepw")
        .parse()
        .expect("token header");
    let with_token = move |mut request: tonic::Request<()>| {
        request.metadata_mut().insert("token", token.clone());
        Ok(request)
    };
    let channel = kvstore.channel().await;
    let lease = LeaseClient::with_interceptor(channel.clone(), with_token.clone())
        .lease_grant(LeaseGrantRequest { ttl: 60, id: 0 })
        .await
        .expect("lease")
        .into_inner()
        .id;
    let mut lock = LockClient::with_interceptor(channel.clone(), with_token.clone());
    let held = lock
        .lock(LockRequest {
            name: b"pub/lock".to_vec(),
            lease,
        })
        .await
        .expect("a lock under a granted prefix");
    assert!(held.into_inner().key.starts_with(b"pub/lock/"));
    let error = lock
        .lock(LockRequest {
            name: b"secret-lock".to_vec(),
            lease,
        })
        .await
        .expect_err("a lock outside the grant");
    assert_eq!(error.code(), tonic::Code::PermissionDenied, "{error:?}");
    // Observe runs in a task of its own: it still reads as alice.
    let mut election = ElectionClient::with_interceptor(channel, with_token);
    let outcome: Result<(), tonic::Status> = match election
        .observe(LeaderRequest {
            name: b"secret-election".to_vec(),
        })
        .await
    {
        Err(status) => Err(status),
        Ok(response) => {
            let mut stream = response.into_inner();
            match tokio::time::timeout(std::time::Duration::from_secs(5), stream.message()).await {
                Ok(Err(status)) => Err(status),
                other => panic!("observe outside the grant answered {other:?}"),
            }
        }
    };
    let status = outcome.expect_err("observe outside the grant");
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
}
