//! The same etcdctl session against Debian's etcd and against kvstore: every command's
//! output must match once member IDs, terms, sizes and ports are normalized.

mod common;

use common::{normalize, text, Kind, Server};

/// One etcdctl invocation: arguments and optional stdin.
struct Step {
    args: &'static [&'static str],
    input: Option<&'static str>,
}

const fn run(args: &'static [&'static str]) -> Step {
    Step { args, input: None }
}

const TXN_SUCCESS: &str = "mod(\"foo\") > \"0\"\nvalue(\"foo\") = \"bar2\"\n\nput txnkey ok\nget foo\ndel key30\n\nput txnkey failed\n\n";
const TXN_FAILURE: &str =
    "version(\"foo\") = \"100\"\n\nput txnkey never\n\nget key --prefix\nput txnkey2 fallback\n\n";
const TXN_MISSING_KEY: &str =
    "create(\"missing\") = \"0\"\nvalue(\"missing\") != \"x\"\n\nput created yes\n\n\n";
const TXN_LESS: &str = "mod(\"key1\") < \"100\"\ncreate(\"key2\") != \"0\"\n\nget key2\n\n\n";

const SESSION: &[Step] = &[
    run(&["put", "foo", "bar"]),
    run(&["put", "foo", "bar2", "--prev-kv", "-w", "json"]),
    run(&["get", "foo", "-w", "json"]),
    run(&["put", "key1", "v1"]),
    run(&["put", "key2", "v2"]),
    run(&["put", "key3", "a3"]),
    run(&["put", "key30", "z30"]),
    run(&["put", "other", "x"]),
    run(&["get", "key", "--prefix", "-w", "json"]),
    run(&["get", "key", "--prefix"]),
    run(&["get", "key", "--prefix", "--limit", "2", "-w", "json"]),
    run(&[
        "get",
        "key",
        "--prefix",
        "--sort-by=VALUE",
        "--order=DESCEND",
    ]),
    run(&[
        "get",
        "key",
        "--prefix",
        "--sort-by=MODIFY",
        "--order=ASCEND",
        "-w",
        "json",
    ]),
    run(&[
        "get",
        "key",
        "--prefix",
        "--sort-by=CREATE",
        "--order=DESCEND",
        "--limit",
        "3",
        "-w",
        "json",
    ]),
    run(&["get", "key", "--prefix", "--sort-by=VERSION"]),
    run(&[
        "get",
        "key",
        "--prefix",
        "--sort-by=KEY",
        "--order=DESCEND",
        "--keys-only",
    ]),
    run(&["get", "key", "--prefix", "--keys-only", "-w", "json"]),
    run(&["get", "key", "--prefix", "--count-only", "-w", "json"]),
    run(&["get", "key2", "--from-key", "-w", "json"]),
    run(&["get", "", "--from-key", "--keys-only"]),
    run(&["get", "key1", "key3"]),
    run(&["get", "key3", "key1", "-w", "json"]),
    run(&["get", "foo", "--rev", "2", "-w", "json"]),
    run(&["get", "foo", "--rev", "1", "-w", "json"]),
    run(&[
        "get",
        "key",
        "--prefix",
        "--min-mod-rev",
        "5",
        "--max-mod-rev",
        "6",
        "-w",
        "json",
    ]),
    run(&["get", "key", "--prefix", "--min-create-rev", "6"]),
    run(&["get", "key", "--prefix", "--max-create-rev", "5"]),
    run(&["get", "foo", "--consistency", "s", "-w", "json"]),
    run(&["get", "nothing", "-w", "json"]),
    run(&["put", "foo", "--ignore-value", "-w", "json"]),
    run(&["put", "newkey", "--ignore-value"]),
    run(&["put", "newkey", "v", "--ignore-lease"]),
    run(&["put", "", "empty"]),
    run(&["get", "foo", "--rev", "1000"]),
    Step {
        args: &["txn", "-w", "json"],
        input: Some(TXN_SUCCESS),
    },
    Step {
        args: &["txn"],
        input: Some(TXN_FAILURE),
    },
    Step {
        args: &["txn", "-w", "json"],
        input: Some(TXN_MISSING_KEY),
    },
    Step {
        args: &["txn", "-w", "json"],
        input: Some(TXN_LESS),
    },
    run(&["del", "key1", "--prev-kv", "-w", "json"]),
    run(&["del", "key", "--prefix"]),
    run(&["del", "nothing", "-w", "json"]),
    run(&["del", "a", "--from-key", "--prev-kv"]),
    run(&["put", "foo", "again", "-w", "json"]),
    run(&["get", "foo", "-w", "json"]),
    run(&["compact", "5"]),
    run(&["get", "foo", "--rev", "4"]),
    run(&["get", "foo", "--rev", "5", "-w", "json"]),
    run(&["compact", "5"]),
    run(&["compact", "3"]),
    run(&["compact", "1000"]),
    run(&["compact", "8", "--physical"]),
    run(&["get", "", "--from-key", "-w", "json"]),
    run(&["defrag"]),
    run(&["alarm", "list"]),
    run(&["endpoint", "status", "-w", "json"]),
    run(&["endpoint", "health"]),
    run(&["member", "list", "-w", "json"]),
    run(&["member", "list"]),
];

#[test]
fn etcdctl_session_matches_etcd() {
    let etcd = Server::start(Kind::Etcd);
    let kvstore = Server::start(Kind::Kvstore);
    let servers = [&etcd, &kvstore];
    let mut mismatches = Vec::new();
    for (number, step) in SESSION.iter().enumerate() {
        let expected = normalize(
            &text(&etcd.etcdctl_with_input(step.args, step.input)),
            &servers,
        );
        let actual = normalize(
            &text(&kvstore.etcdctl_with_input(step.args, step.input)),
            &servers,
        );
        if expected != actual {
            mismatches.push(format!(
                "step {number} `etcdctl {}`\n--- etcd\n{expected}\n--- kvstore\n{actual}\n",
                step.args.join(" ")
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
