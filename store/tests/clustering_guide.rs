//! etcd's clustering guide, run as written with `etcd` replaced by `kvstore`, and
//! 10.0.1.1x replaced by 127.0.0.1x. Each scenario runs in a network and mount
//! namespace of its own (unshare), so members use the guide's ports 2379 and 2380,
//! and dnsmasq serves DNS on 127.0.0.1:53 through a resolv.conf mounted over
//! /etc/resolv.conf.
//!
//! - Static: the same commands start a Debian etcd cluster and a kvstore cluster;
//!   `etcdctl member list` is byte for byte the same (IDs come from the URLs and the
//!   token in both).
//! - DNS SRV (`--discovery-srv`): `_etcd-server._tcp.example.com` names three members
//!   by host name and A records map the names to addresses. Debian's etcd 3.4.23
//!   cannot be the reference here: it drops the records of `_etcd-server._tcp` (a
//!   bug fixed in etcd 3.5), so plain-http SRV bootstrap fails there; kvstore
//!   follows 3.5.

mod common;

use std::process::Command;

use serde_json::Value;

/// Runs `script` in new network and mount namespaces with dnsmasq serving `records`
/// (dnsmasq options); returns its output.
fn in_namespace(dir: &std::path::Path, records: &[String], script: &str) -> String {
    let dns = records.join(" ");
    let full = format!(
        r#"set -u
ip link set lo up
echo "nameserver 127.0.0.1" > {dir}/resolv.conf
mount --bind {dir}/resolv.conf /etc/resolv.conf
dnsmasq --keep-in-foreground --no-resolv --no-hosts --listen-address=127.0.0.1 \
  --bind-interfaces --port=53 --user=root --pid-file= --local=/example.com/ \
  --local=/example.org/ {dns} >{dir}/dnsmasq.log 2>&1 &
trap 'kill $(jobs -p) 2>/dev/null; wait' EXIT
sleep 0.3
KVSTORE={kvstore}
ETCD={etcd}
ETCDCTL="{etcdctl}"
export ETCD_UNSUPPORTED_ARCH={arch}
export ETCDCTL_API=3
healthy() {{ # endpoints: waits up to 30 s for all of them to answer
  for i in $(seq 150); do
    $ETCDCTL --endpoints=$1 endpoint health >/dev/null 2>&1 && return
    sleep 0.2
  done
}}
{script}
"#,
        dir = dir.display(),
        kvstore = common::Server::binary(common::Kind::Kvstore),
        etcd = common::Server::binary(common::Kind::Etcd),
        etcdctl = common::ETCDCTL,
        arch = std::env::consts::ARCH,
    );
    let path = dir.join("scenario.sh");
    std::fs::write(&path, full).unwrap();
    let output = Command::new("timeout")
        .args(["120", "unshare", "--mount", "--net", "bash"])
        .arg(&path)
        .output()
        .expect("run unshare (util-linux)");
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

fn srv_records(service: &str) -> Vec<String> {
    (0..3)
        .flat_map(|i| {
            [
                format!("--srv-host={service}.example.com,m{i}.example.com,2380,0,0"),
                format!("--host-record=m{i}.example.com,127.0.0.1{i}"),
            ]
        })
        .collect()
}

/// The guide's static example with `binary`: member list, health, a put and a get.
fn static_example(binary: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display();
    let script = format!(
        r#"
CLUSTER=infra0=http://127.0.0.10:2380,infra1=http://127.0.0.11:2380,infra2=http://127.0.0.12:2380
for i in 0 1 2; do
  EXTRA=""
  [ $i = 0 ] && EXTRA=",http://127.0.0.1:2379"
  ${binary} --name infra$i --initial-advertise-peer-urls http://127.0.0.1$i:2380 \
    --listen-peer-urls http://127.0.0.1$i:2380 \
    --listen-client-urls http://127.0.0.1$i:2379$EXTRA \
    --advertise-client-urls http://127.0.0.1$i:2379 \
    --initial-cluster-token etcd-cluster-1 \
    --initial-cluster $CLUSTER \
    --initial-cluster-state new --data-dir {d}/infra$i >{d}/infra$i.log 2>&1 &
done
EP=127.0.0.10:2379,127.0.0.11:2379,127.0.0.12:2379
healthy $EP
echo "== member list"
$ETCDCTL member list | sort
echo "== health"
$ETCDCTL --endpoints=$EP endpoint health 2>&1 | sed 's/took = .*/took/' | sort
echo "== put"
$ETCDCTL put foo "Hello World!"
$ETCDCTL --endpoints=127.0.0.12:2379 get foo
"#
    );
    in_namespace(dir.path(), &[], &script)
}

#[test]
fn static_example_of_the_clustering_guide_matches_etcd() {
    let etcd = static_example("ETCD");
    let ours = static_example("KVSTORE");
    assert!(
        etcd.contains("== member list\n") && etcd.contains("infra2"),
        "etcd did not form the cluster:\n{etcd}"
    );
    assert_eq!(ours, etcd);
    assert!(ours.ends_with("OK\nfoo\nHello World!\n"), "{ours}");
}

#[test]
fn three_members_bootstrap_from_srv_records() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display();
    // m0 advertises its host name, m1 and m2 their addresses (both forms of the
    // guide).
    let script = format!(
        r#"
start() {{ # name, advertised peer URL, listen address
  $KVSTORE --name $1 --data-dir {d}/$1 --discovery-srv example.com \
    --initial-advertise-peer-urls $2 --initial-cluster-token srv-cluster \
    --initial-cluster-state new --advertise-client-urls http://$3:2379 \
    --listen-client-urls http://$3:2379 --listen-peer-urls http://$3:2380 \
    >{d}/$1.log 2>&1 &
}}
start m0 http://m0.example.com:2380 127.0.0.10
start m1 http://127.0.0.11:2380 127.0.0.11
start m2 http://127.0.0.12:2380 127.0.0.12
EP=http://m0.example.com:2379,http://m1.example.com:2379,http://m2.example.com:2379
healthy $EP
echo "== health"
ETCDCTL_API=3 $ETCDCTL --endpoints=$EP endpoint health 2>&1 | sed 's/took = .*/took/' | sort
echo "== members"
ETCDCTL_API=3 $ETCDCTL --endpoints=$EP member list -w json
echo
echo "== put"
ETCDCTL_API=3 $ETCDCTL --endpoints=http://m2.example.com:2379 put srv-key works
ETCDCTL_API=3 $ETCDCTL --endpoints=http://m0.example.com:2379 get srv-key --print-value-only
echo "== not in the records"
timeout 20 $KVSTORE --name stray --data-dir {d}/stray --discovery-srv example.com \
  --initial-advertise-peer-urls http://127.0.0.99:2380 --listen-peer-urls http://127.0.0.99:2380 \
  --listen-client-urls http://127.0.0.99:2379 --advertise-client-urls http://127.0.0.99:2379 \
  >{d}/stray.log 2>&1
echo "exit=$?"
tail -1 {d}/stray.log
echo "== no records"
timeout 20 $KVSTORE --name m0 --data-dir {d}/other --discovery-srv example.org \
  --initial-advertise-peer-urls http://127.0.0.10:2390 --listen-peer-urls http://127.0.0.10:2390 \
  --listen-client-urls http://127.0.0.10:2399 --advertise-client-urls http://127.0.0.10:2399 \
  >{d}/other.log 2>&1
echo "exit=$?"
tail -1 {d}/other.log
"#
    );
    let output = in_namespace(dir.path(), &srv_records("_etcd-server._tcp"), &script);
    let logs = || {
        ["m0", "m1", "m2", "dnsmasq"]
            .iter()
            .map(|name| {
                format!(
                    "--- {name}\n{}",
                    std::fs::read_to_string(dir.path().join(format!("{name}.log")))
                        .unwrap_or_default()
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    let section = |name: &str| {
        output
            .split(&format!("== {name}\n"))
            .nth(1)
            .and_then(|rest| rest.split("\n== ").next())
            .unwrap_or_default()
            .trim()
            .to_string()
    };
    assert_eq!(
        section("health"),
        "http://m0.example.com:2379 is healthy: successfully committed proposal: took\n\
         http://m1.example.com:2379 is healthy: successfully committed proposal: took\n\
         http://m2.example.com:2379 is healthy: successfully committed proposal: took",
        "{output}\n{}",
        logs()
    );
    let members: Value = serde_json::from_str(&section("members")).expect("member list JSON");
    let mut listed: Vec<String> = members["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| format!("{} {} {}", m["name"], m["peerURLs"], m["clientURLs"]))
        .collect();
    listed.sort();
    // Peer URLs are the SRV targets, as etcd records them.
    assert_eq!(
        listed,
        [
            r#""m0" ["http://m0.example.com:2380"] ["http://127.0.0.10:2379"]"#,
            r#""m1" ["http://m1.example.com:2380"] ["http://127.0.0.11:2379"]"#,
            r#""m2" ["http://m2.example.com:2380"] ["http://127.0.0.12:2379"]"#,
        ],
        "{output}"
    );
    // The IDs are etcd's for those URLs and the token.
    let ids: Vec<u64> = members["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["ID"].as_u64().unwrap())
        .collect();
    for i in 0..3 {
        let expected =
            kvstore::ids::member_id(&[format!("http://m{i}.example.com:2380")], "srv-cluster");
        assert!(ids.contains(&expected), "{ids:?} lacks m{i}'s {expected}");
    }
    assert_eq!(section("put"), "OK\nworks", "{output}");
    assert!(
        section("not in the records")
            .contains("cannot find local etcd member \"stray\" in SRV records"),
        "{output}"
    );
    assert!(!section("not in the records").starts_with("exit=0"));
    let none = section("no records");
    assert!(
        none.contains(
            "error querying DNS SRV records for _etcd-server lookup _etcd-server._tcp.example.org on 127.0.0.1:53: no such host"
        ),
        "{output}"
    );
}

#[test]
fn discovery_srv_name_picks_the_service() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display();
    let script = format!(
        r#"
for i in 0 1 2; do
  $KVSTORE --name m$i --data-dir {d}/m$i --discovery-srv example.com --discovery-srv-name prod \
    --initial-advertise-peer-urls http://m$i.example.com:2380 \
    --advertise-client-urls http://127.0.0.1$i:2379 \
    --listen-client-urls http://127.0.0.1$i:2379 --listen-peer-urls http://127.0.0.1$i:2380 \
    >{d}/m$i.log 2>&1 &
done
EP=http://127.0.0.10:2379,http://127.0.0.11:2379,http://127.0.0.12:2379
healthy $EP
ETCDCTL_API=3 $ETCDCTL --endpoints=$EP member list | cut -d, -f3,4 | sort
"#
    );
    let output = in_namespace(dir.path(), &srv_records("_etcd-server-prod._tcp"), &script);
    let listed: Vec<&str> = output.lines().map(str::trim).collect();
    assert_eq!(
        listed,
        [
            "m0, http://m0.example.com:2380",
            "m1, http://m1.example.com:2380",
            "m2, http://m2.example.com:2380"
        ],
        "{}",
        std::fs::read_to_string(dir.path().join("m0.log")).unwrap_or_default()
    );
}
