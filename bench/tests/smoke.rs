//! Every kvbench workload, a few hundred operations each, against kvstore and against
//! Debian's etcd, so the tool keeps working with both. No timing is asserted: only
//! that each run completes every operation without errors and reports sane figures.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const KVBENCH: &str = env!("CARGO_BIN_EXE_kvbench");
const ETCD: &str = "/usr/bin/etcd";
const ETCDCTL: &str = "/usr/bin/etcdctl";

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// kvstore is built beside kvbench by `cargo test --workspace`.
fn kvstore_binary() -> PathBuf {
    let path = Path::new(KVBENCH).with_file_name("kvstore");
    assert!(
        path.exists(),
        "{} is missing: run the workspace's tests (cargo test --workspace)",
        path.display()
    );
    path
}

struct Server {
    child: Child,
    endpoint: String,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(binary: &Path) -> Server {
    start_secured(binary, None, &[])
}

/// A CA and one certificate it signed for 127.0.0.1 (CommonName root), which a
/// server and a client can both use.
struct Certs {
    dir: tempfile::TempDir,
}

impl Certs {
    fn new() -> Certs {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
        let dir = tempfile::tempdir().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_key = KeyPair::generate().unwrap();
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let mut params = CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "root");
        params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
        std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
        std::fs::write(dir.path().join("node.pem"), cert.pem()).unwrap();
        std::fs::write(dir.path().join("node-key.pem"), key.serialize_pem()).unwrap();
        Certs { dir }
    }

    fn flag(&self, name: &str, file: &str) -> String {
        format!("--{name}={}", self.dir.path().join(file).display())
    }

    /// etcdctl's and kvbench's flags: the CA, and the client certificate if `mutual`.
    fn client_flags(&self, mutual: bool) -> Vec<String> {
        let mut flags = vec![self.flag("cacert", "ca.pem")];
        if mutual {
            flags.push(self.flag("cert", "node.pem"));
            flags.push(self.flag("key", "node-key.pem"));
        }
        flags
    }
}

/// Starts `binary`; with `tls`, its client port serves https with the certificate,
/// and with `tls.1` (mutual) it also requires a client certificate from the CA;
/// `extra` flags follow.
fn start_secured(binary: &Path, tls: Option<(&Certs, bool)>, extra: &[String]) -> Server {
    assert!(
        binary.exists(),
        "{} is missing: run scripts/deps",
        binary.display()
    );
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut server_flags = extra.to_vec();
    let mut etcdctl_flags = Vec::new();
    if let Some((certs, mutual)) = tls {
        server_flags.push(certs.flag("cert-file", "node.pem"));
        server_flags.push(certs.flag("key-file", "node-key.pem"));
        // A trusted CA alone makes etcd require client certificates.
        if mutual {
            server_flags.push(certs.flag("trusted-ca-file", "ca.pem"));
            server_flags.push("--client-cert-auth".to_string());
        }
        etcdctl_flags = certs.client_flags(mutual);
    }
    // A port chosen free may be taken by another test before the server binds it:
    // a server that exits before it is healthy is started again on new ports.
    for _attempt in 0..5 {
        let dir = tempfile::tempdir().unwrap();
        let (client, peer) = (free_port(), free_port());
        let log = std::fs::File::create(dir.path().join("server.log")).unwrap();
        let mut child = Command::new(binary)
            .arg("--name=bench")
            .arg(format!("--data-dir={}", dir.path().join("data").display()))
            .arg(format!(
                "--listen-client-urls={scheme}://127.0.0.1:{client}"
            ))
            .arg(format!(
                "--advertise-client-urls={scheme}://127.0.0.1:{client}"
            ))
            .arg(format!("--listen-peer-urls=http://127.0.0.1:{peer}"))
            .arg(format!(
                "--initial-advertise-peer-urls=http://127.0.0.1:{peer}"
            ))
            .arg(format!("--initial-cluster=bench=http://127.0.0.1:{peer}"))
            .args(&server_flags)
            .env("ETCD_UNSUPPORTED_ARCH", std::env::consts::ARCH)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start the server");
        let endpoint = match tls {
            Some(_) => format!("https://127.0.0.1:{client}"),
            None => format!("127.0.0.1:{client}"),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let health = Command::new(ETCDCTL)
                .env("ETCDCTL_API", "3")
                .arg(format!("--endpoints={endpoint}"))
                .args(&etcdctl_flags)
                .args(["endpoint", "health"])
                .output()
                .expect("run etcdctl");
            if health.status.success() {
                return Server {
                    child,
                    endpoint,
                    _dir: dir,
                };
            }
            if matches!(child.try_wait(), Ok(Some(_))) {
                break;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                let log =
                    std::fs::read_to_string(dir.path().join("server.log")).unwrap_or_default();
                panic!("{} did not start; log:\n{log}", binary.display());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    panic!("{} exited at start five times", binary.display());
}

/// Runs kvbench with `--json`; its report.
fn kvbench<S: AsRef<std::ffi::OsStr> + std::fmt::Debug>(server: &Server, args: &[S]) -> Value {
    let output = Command::new(KVBENCH)
        .arg(format!("--endpoints={}", server.endpoint))
        .arg("--json")
        .args(args)
        .output()
        .expect("run kvbench");
    assert!(
        output.status.success(),
        "kvbench {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("one JSON report")
}

fn check(report: &Value, workload: &str, operations: u64) {
    assert_eq!(report["workload"], workload, "{report}");
    assert_eq!(report["operations"], operations, "{report}");
    assert_eq!(report["errors"], 0, "{report}");
    assert!(report["per_second"].as_f64().unwrap() > 0.0, "{report}");
    let latency = &report["latency_ms"];
    let ordered = ["p50", "p90", "p99", "p999", "max"]
        .windows(2)
        .all(|pair| latency[pair[0]].as_f64() <= latency[pair[1]].as_f64());
    assert!(
        ordered && latency["p50"].as_f64().unwrap() > 0.0,
        "{report}"
    );
}

fn every_workload(server: &Server) {
    let clients = ["--clients=8", "--conns=2"];
    let with = |extra: &[&'static str]| -> Vec<&'static str> {
        clients
            .iter()
            .copied()
            .chain(extra.iter().copied())
            .collect()
    };
    check(
        &kvbench(
            server,
            &with(&["put", "--total=300", "--key-size=16", "--val-size=64"]),
        ),
        "put",
        300,
    );
    check(
        &kvbench(
            server,
            &with(&["put", "--total=200", "--sequential-keys", "--rate=1000"]),
        ),
        "put",
        200,
    );
    check(
        &kvbench(server, &with(&["range", "--total=300", "--consistency=l"])),
        "range-l",
        300,
    );
    check(
        &kvbench(server, &with(&["range", "--total=300", "--consistency=s"])),
        "range-s",
        300,
    );
    check(
        &kvbench(server, &with(&["txn-put", "--total=200", "--txn-ops=4"])),
        "txn-put",
        200,
    );
    // 20 watchers on 4 streams, 15 puts: 300 deliveries.
    check(
        &kvbench(
            server,
            &[
                "watch",
                "--watchers=20",
                "--streams=4",
                "--puts=15",
                "--put-rate=200",
            ],
        ),
        "watch",
        300,
    );
    check(
        &kvbench(server, &with(&["lease-keepalive", "--total=300"])),
        "lease-keepalive",
        300,
    );
    let timed = kvbench(server, &with(&["put", "--duration=0.5", "--rate=400"]));
    assert_eq!(timed["errors"], 0, "{timed}");
    assert!(timed["operations"].as_u64().unwrap() > 0, "{timed}");
}

#[test]
fn every_workload_runs_against_kvstore() {
    every_workload(&start(&kvstore_binary()));
}

#[test]
fn every_workload_runs_against_etcd() {
    every_workload(&start(Path::new(ETCD)));
}

#[test]
fn bad_endpoints_are_reported() {
    let output = Command::new(KVBENCH)
        .args(["--endpoints=127.0.0.1:1", "put", "--total=1"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("cannot connect to http://127.0.0.1:1"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Starts `kvbench null-server` on a free port with `extra` arguments; its endpoint
/// once it accepts.
fn start_null_server(extra: &[&str]) -> Server {
    for _attempt in 0..5 {
        let port = free_port();
        let mut child = Command::new(KVBENCH)
            .args(["null-server", &format!("--listen=127.0.0.1:{port}")])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start kvbench null-server");
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Server {
                    child,
                    endpoint: format!("127.0.0.1:{port}"),
                    _dir: tempfile::tempdir().unwrap(),
                };
            }
            if matches!(child.try_wait(), Ok(Some(_))) {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
    panic!("kvbench null-server did not start five times");
}

#[test]
fn the_null_server_answers_kvbench_and_etcdctl() {
    let server = start_null_server(&[]);
    let clients = ["--clients=8", "--conns=2"];
    for (args, workload) in [
        (&["put", "--total=300"][..], "put"),
        (&["txn-put", "--total=200", "--txn-ops=4"][..], "txn-put"),
    ] {
        let args: Vec<&str> = clients.iter().chain(args).copied().collect();
        let operations = args
            .iter()
            .find_map(|arg| arg.strip_prefix("--total="))
            .unwrap()
            .parse()
            .unwrap();
        check(&kvbench(&server, &args), workload, operations);
    }
    // etcdctl's puts succeed and its reads find nothing, as check perf needs.
    let etcdctl = |args: &[&str]| {
        let output = Command::new(ETCDCTL)
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", server.endpoint))
            .args(args)
            .output()
            .expect("run etcdctl");
        assert!(output.status.success(), "etcdctl {args:?}: {output:?}");
        String::from_utf8(output.stdout).unwrap()
    };
    assert_eq!(etcdctl(&["put", "k", "v"]), "OK\n");
    assert_eq!(etcdctl(&["get", "k"]), "");
    assert_eq!(etcdctl(&["del", "--prefix", "k"]), "0\n");

    // A second one on the same address says why it cannot start.
    let output = Command::new(KVBENCH)
        .args(["null-server", &format!("--listen={}", server.endpoint)])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!("cannot listen on {}", server.endpoint)),
        "{stderr}"
    );
}

#[test]
fn the_syncing_null_server_appends_every_acknowledged_put() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("puts");
    let server = start_null_server(&[&format!("--fsync-file={}", file.display())]);
    let args = [
        "--clients=8",
        "--conns=2",
        "put",
        "--total=300",
        "--key-size=16",
        "--val-size=100",
    ];
    check(&kvbench(&server, &args), "put", 300);
    // Each acknowledged put's key and value are in the file.
    assert_eq!(std::fs::metadata(&file).unwrap().len(), 300 * (16 + 100));
    let output = Command::new(ETCDCTL)
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={}", server.endpoint))
        .args(["put", "durable-key", "durable-value"])
        .output()
        .expect("run etcdctl");
    assert!(output.status.success(), "{output:?}");
    let contents = std::fs::read(&file).unwrap();
    assert!(contents.ends_with(b"durable-keydurable-value"));

    // A file it cannot create is named in the error.
    let missing = dir.path().join("no-such-dir").join("puts");
    let output = Command::new(KVBENCH)
        .args([
            "null-server",
            &format!("--listen=127.0.0.1:{}", free_port()),
            &format!("--fsync-file={}", missing.display()),
        ])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!("cannot create {}", missing.display())),
        "{stderr}"
    );
}

/// `flags` followed by `extra`, as one argument list.
fn joined(flags: &[String], extra: &[&str]) -> Vec<String> {
    flags
        .iter()
        .cloned()
        .chain(extra.iter().map(|arg| arg.to_string()))
        .collect()
}

/// Runs kvbench, which must fail; its stderr.
fn kvbench_fails<S: AsRef<std::ffi::OsStr> + std::fmt::Debug>(
    server: &Server,
    args: &[S],
) -> String {
    let run = Command::new(KVBENCH)
        .arg(format!("--endpoints={}", server.endpoint))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run kvbench");
    let output = wait_within(run, Duration::from_secs(120), &format!("with {args:?}"));
    assert!(!output.status.success(), "kvbench {args:?} succeeded");
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn etcdctl_with(server: &Server, flags: &[String], args: &[&str]) {
    let output = Command::new(ETCDCTL)
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={}", server.endpoint))
        .args(flags)
        .args(args)
        .output()
        .expect("run etcdctl");
    assert!(output.status.success(), "etcdctl {args:?}: {output:?}");
}

/// kvbench against an https endpoint with etcd's authentication on: it needs the CA,
/// and a token from --user for every request, streams included.
fn tls_and_auth(binary: &Path) {
    let certs = Certs::new();
    let server = start_secured(binary, Some((&certs, false)), &[]);
    let tls = certs.client_flags(false);
    let with = |extra: &[&str]| joined(&tls, extra);
    let stderr = kvbench_fails(&server, &["put", "--total=10"]);
    assert!(
        stderr.contains("https endpoints need --cacert (or --insecure-skip-tls-verify)"),
        "{stderr}"
    );
    check(
        &kvbench(
            &server,
            &["--insecure-skip-tls-verify", "put", "--total=20"],
        ),
        "put",
        20,
    );
    let args = with(&["--clients=4", "put", "--total=100"]);
    check(&kvbench(&server, &args), "put", 100);

    etcdctl_with(
        &server,
        &tls,
        &["user", "add", "root", "--new-user-password=secret"],
    );
    etcdctl_with(&server, &tls, &["auth", "enable"]);

    let stderr = kvbench_fails(&server, &with(&["put", "--total=10"]));
    assert!(
        stderr.contains("etcdserver: user name is empty"),
        "{stderr}"
    );
    let stderr = kvbench_fails(&server, &with(&["--user=root:wrong", "put", "--total=10"]));
    assert!(
        stderr.contains(
            "cannot authenticate as root: etcdserver: authentication failed, invalid user ID or password"
        ),
        "{stderr}"
    );
    let stderr = kvbench_fails(&server, &with(&["--user=root", "put", "--total=10"]));
    assert!(stderr.contains("--user root needs a password"), "{stderr}");

    for (extra, workload, operations) in [
        (
            &["--user=root:secret", "--clients=4", "put", "--total=200"][..],
            "put",
            200,
        ),
        (
            &[
                "--user=root",
                "--password=secret",
                "--clients=4",
                "range",
                "--total=100",
            ][..],
            "range-l",
            100,
        ),
        (
            &[
                "--user=root:secret",
                "watch",
                "--watchers=4",
                "--puts=5",
                "--put-rate=100",
            ][..],
            "watch",
            20,
        ),
        (
            &[
                "--user=root:secret",
                "--clients=2",
                "lease-keepalive",
                "--total=50",
            ][..],
            "lease-keepalive",
            50,
        ),
    ] {
        let args = with(extra);
        check(&kvbench(&server, &args), workload, operations);
    }
}

#[test]
fn tls_and_auth_against_kvstore() {
    tls_and_auth(&kvstore_binary());
}

#[test]
fn tls_and_auth_against_etcd() {
    tls_and_auth(Path::new(ETCD));
}

/// kvbench against an endpoint that requires a client certificate.
fn mutual_tls(binary: &Path) {
    let certs = Certs::new();
    let server = start_secured(binary, Some((&certs, true)), &[]);
    let args = joined(
        &certs.client_flags(true),
        &["--clients=4", "put", "--total=100"],
    );
    check(&kvbench(&server, &args), "put", 100);
    // Without the client certificate every request fails.
    kvbench_fails(
        &server,
        &joined(&certs.client_flags(false), &["put", "--total=10"]),
    );
    // --cert without --key is refused before connecting.
    let stderr = kvbench_fails(
        &server,
        &joined(
            &[
                certs.flag("cacert", "ca.pem"),
                certs.flag("cert", "node.pem"),
            ],
            &["put"],
        ),
    );
    assert!(stderr.contains("--key"), "{stderr}");
}

#[test]
fn mutual_tls_against_kvstore() {
    mutual_tls(&kvstore_binary());
}

#[test]
fn mutual_tls_against_etcd() {
    mutual_tls(Path::new(ETCD));
}

/// The output of kvbench run as `child` (its output piped), which must end within
/// `limit`; `what` says what it ran against.
fn wait_within(mut child: Child, limit: Duration, what: &str) -> std::process::Output {
    let deadline = Instant::now() + limit;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("kvbench still waits {what} after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    child.wait_with_output().unwrap()
}

#[test]
fn a_silent_endpoint_fails_within_the_dial_timeout() {
    // The kernel accepts connections to it, but nothing ever answers.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    for endpoint in [
        format!("127.0.0.1:{port}"),
        format!("https://127.0.0.1:{port}"),
    ] {
        let run = Command::new(KVBENCH)
            .arg(format!("--endpoints={endpoint}"))
            .args(["--insecure-skip-tls-verify", "--dial-timeout=300ms"])
            .args(["put", "--total=1"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run kvbench");
        let output = wait_within(run, Duration::from_secs(10), "against a silent endpoint");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{stderr}");
        assert!(
            stderr.contains(&format!(
                "cannot connect to {endpoint}: no answer within --dial-timeout 300ms"
            )),
            "{stderr}"
        );
    }
    let output = Command::new(KVBENCH)
        .args(["--dial-timeout=2x", "put"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("invalid value '2x' for '--dial-timeout"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Starts a three-member cluster of `binary` on loopback; its members once they agree
/// on a leader, with that leader's member ID.
fn start_cluster(binary: &Path) -> (Vec<Server>, u64) {
    'attempt: for _attempt in 0..5 {
        let ports: Vec<(u16, u16)> = (0..3).map(|_| (free_port(), free_port())).collect();
        let initial_cluster = ports
            .iter()
            .enumerate()
            .map(|(n, (_, peer))| format!("m{n}=http://127.0.0.1:{peer}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut members = Vec::new();
        for (n, (client, peer)) in ports.iter().enumerate() {
            let dir = tempfile::tempdir().unwrap();
            let log = std::fs::File::create(dir.path().join("server.log")).unwrap();
            let child = Command::new(binary)
                .arg(format!("--name=m{n}"))
                .arg(format!("--data-dir={}", dir.path().join("data").display()))
                .arg(format!("--listen-client-urls=http://127.0.0.1:{client}"))
                .arg(format!("--advertise-client-urls=http://127.0.0.1:{client}"))
                .arg(format!("--listen-peer-urls=http://127.0.0.1:{peer}"))
                .arg(format!(
                    "--initial-advertise-peer-urls=http://127.0.0.1:{peer}"
                ))
                .arg(format!("--initial-cluster={initial_cluster}"))
                .arg("--initial-cluster-token=kvbench-leader")
                .env("ETCD_UNSUPPORTED_ARCH", std::env::consts::ARCH)
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("start a member");
            members.push(Server {
                child,
                endpoint: format!("127.0.0.1:{client}"),
                _dir: dir,
            });
        }
        let endpoints = members
            .iter()
            .map(|m| m.endpoint.as_str())
            .collect::<Vec<_>>()
            .join(",");
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if members
                .iter_mut()
                .any(|m| matches!(m.child.try_wait(), Ok(Some(_))))
            {
                continue 'attempt;
            }
            if let Some(statuses) = endpoint_statuses(&endpoints) {
                let leaders: Vec<u64> = statuses
                    .iter()
                    .map(|s| s["Status"]["leader"].as_u64().unwrap_or(0))
                    .collect();
                if leaders.len() == 3 && leaders[0] != 0 && leaders.iter().all(|l| *l == leaders[0])
                {
                    return (members, leaders[0]);
                }
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!("{}: no leader agreed within 30 s", binary.display());
    }
    panic!("{}: a member exited at start five times", binary.display());
}

/// `etcdctl endpoint status` of `endpoints` (comma separated), if every one answers.
fn endpoint_statuses(endpoints: &str) -> Option<Vec<Value>> {
    let status = Command::new(ETCDCTL)
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={endpoints}"))
        .args(["endpoint", "status", "-w", "json"])
        .output()
        .expect("run etcdctl");
    if !status.status.success() {
        return None;
    }
    serde_json::from_slice(&status.stdout).ok()
}

/// The member ID of the member at `endpoint`.
fn member_id(endpoint: &str) -> u64 {
    let statuses = endpoint_statuses(endpoint).expect("the member answers");
    statuses[0]["Status"]["header"]["member_id"]
        .as_u64()
        .unwrap()
}

/// The Put requests a member served, from its Prometheus metrics.
fn puts_served(endpoint: &str) -> u64 {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(endpoint).unwrap();
    write!(stream, "GET /metrics HTTP/1.0\r\nHost: {endpoint}\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    response
        .lines()
        .filter(|line| {
            line.starts_with("grpc_server_handled_total{")
                && line.contains("grpc_method=\"Put\"")
                && line.contains("grpc_code=\"OK\"")
        })
        .map(|line| line.rsplit(' ').next().unwrap().parse::<f64>().unwrap() as u64)
        .sum()
}

/// Given only a follower, `--target-leader` finds the leader and puts go to it alone.
fn target_leader(binary: &Path) {
    let (members, leader) = start_cluster(binary);
    let (leaders, followers): (Vec<&Server>, Vec<&Server>) = members
        .iter()
        .partition(|member| member_id(&member.endpoint) == leader);
    assert_eq!((leaders.len(), followers.len()), (1, 2));
    let before: Vec<u64> = members.iter().map(|m| puts_served(&m.endpoint)).collect();
    let output = Command::new(KVBENCH)
        .arg(format!("--endpoints={}", followers[0].endpoint))
        .args(["--target-leader", "--json", "--clients=4", "--conns=2"])
        .args(["put", "--total=200"])
        .output()
        .expect("run kvbench");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    check(
        &serde_json::from_slice(&output.stdout).expect("one JSON report"),
        "put",
        200,
    );
    assert!(
        stderr.contains(&format!("at http://{}", leaders[0].endpoint)),
        "{stderr}"
    );
    for (member, before) in members.iter().zip(before) {
        let served = puts_served(&member.endpoint) - before;
        if member.endpoint == leaders[0].endpoint {
            assert!(served >= 200, "the leader served {served} puts");
        } else {
            assert_eq!(served, 0, "follower {} served puts", member.endpoint);
        }
    }
}

#[test]
fn target_leader_against_kvstore() {
    target_leader(&kvstore_binary());
}

#[test]
fn target_leader_against_etcd() {
    target_leader(Path::new(ETCD));
}

/// Runs kvbench as `root` against `server` while `meanwhile` runs; its report, which
/// must show no errors.
fn kvbench_as_root(server: &Server, args: &[&str], meanwhile: impl FnOnce()) -> Value {
    let child = Command::new(KVBENCH)
        .arg(format!("--endpoints={}", server.endpoint))
        .args(["--json", "--user=root:secret"])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run kvbench");
    meanwhile();
    let output = child.wait_with_output().expect("kvbench ends");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "kvbench {args:?}: {stderr}");
    let report: Value = serde_json::from_slice(&output.stdout).expect("one JSON report");
    assert_eq!(report["errors"], 0, "{report} {stderr}");
    report
}

/// Tokens that expire (JWT with a 1 s TTL) or go stale (an auth change) during a run
/// are renewed, as etcd's client renews them: no request fails.
fn token_renewal(binary: &Path) {
    let keys = tempfile::tempdir().unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let (private, public) = (keys.path().join("jwt.key"), keys.path().join("jwt.pub"));
    std::fs::write(&private, key.serialize_pem()).unwrap();
    std::fs::write(&public, key.public_key_pem()).unwrap();
    let jwt = format!(
        "--auth-token=jwt,pub-key={},priv-key={},sign-method=ES256,ttl=1s",
        public.display(),
        private.display()
    );
    for flags in [vec![jwt], Vec::new()] {
        let server = start_secured(binary, None, &flags);
        etcdctl_with(
            &server,
            &[],
            &["user", "add", "root", "--new-user-password=secret"],
        );
        etcdctl_with(&server, &[], &["auth", "enable"]);
        let root = ["--user=root:secret".to_string()];
        let report = kvbench_as_root(
            &server,
            &["--clients=2", "put", "--duration=3", "--rate=50"],
            || {
                // Tokens issued before an auth change are refused from then on.
                std::thread::sleep(Duration::from_millis(1500));
                etcdctl_with(&server, &root, &["role", "add", "during-the-run"]);
            },
        );
        // 150 are due; on a busy machine the last ones may fall past the deadline.
        // Over 100 is past both the first expiry and the auth change.
        assert!(report["operations"].as_u64().unwrap() > 100, "{report}");
        let report = kvbench_as_root(
            &server,
            &["watch", "--watchers=2", "--puts=40", "--put-rate=20"],
            || {},
        );
        check(&report, "watch", 80);
    }
}

#[test]
fn token_renewal_against_kvstore() {
    token_renewal(&kvstore_binary());
}

#[test]
fn token_renewal_against_etcd() {
    token_renewal(Path::new(ETCD));
}

/// A server that stops answering mid-run (SIGSTOP) fails the requests in flight once
/// it ignores kvbench's HTTP/2 pings, so the run ends with errors instead of waiting
/// forever.
#[test]
fn a_server_that_hangs_mid_run_ends_the_run_with_errors() {
    let server = start(&kvstore_binary());
    let run = Command::new(KVBENCH)
        .arg(format!("--endpoints={}", server.endpoint))
        .args(["--json", "--clients=2", "put", "--duration=3", "--rate=50"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run kvbench");
    std::thread::sleep(Duration::from_secs(1));
    let stopped = Command::new("kill")
        .args(["-STOP", &server.child.id().to_string()])
        .status()
        .unwrap();
    assert!(stopped.success());
    // 10 s of silence before the ping, 10 s for its answer, and some slack.
    let output = wait_within(run, Duration::from_secs(45), "on a hung server");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    let report: Value = serde_json::from_slice(&output.stdout).expect("one JSON report");
    assert!(report["operations"].as_u64().unwrap() > 0, "{report}");
    assert!(report["errors"].as_u64().unwrap() > 0, "{report}");
    assert!(stderr.contains("requests failed"), "{stderr}");
}
