//! TLS on the client and peer ports, driven by Debian's etcdctl: server TLS, mutual
//! TLS, refused clients, certificate rotation without restart, automatic TLS, a
//! three-member cluster over peer TLS that keeps out a peer from another CA, and a
//! flood of connections that never start their handshake. Also the data dir's
//! permissions.

mod common;

use std::io::Read;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{free_port, text, ETCDCTL};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

/// A CA that signs certificates for the tests.
struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::CrlSign,
        ];
        let key = KeyPair::generate().expect("CA key");
        let cert = params.self_signed(&key).expect("CA certificate");
        Ca { cert, key }
    }

    /// Writes `<name>.pem` and `<name>-key.pem` for 127.0.0.1 and localhost with
    /// CommonName `cn`; returns their paths.
    fn issue(&self, dir: &Path, name: &str, cn: &str) -> (PathBuf, PathBuf) {
        self.issue_for(dir, name, cn, &["127.0.0.1", "localhost"], None)
    }

    /// As [`Ca::issue`], for the hosts `names` and with serial number `serial`.
    fn issue_for(
        &self,
        dir: &Path,
        name: &str,
        cn: &str,
        names: &[&str],
        serial: Option<u64>,
    ) -> (PathBuf, PathBuf) {
        let mut params = CertificateParams::new(
            names
                .iter()
                .map(|name| name.to_string())
                .collect::<Vec<_>>(),
        )
        .expect("params");
        params.serial_number = serial.map(rcgen::SerialNumber::from);
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate().expect("key");
        let cert = params
            .signed_by(&key, &self.cert, &self.key)
            .expect("signed certificate");
        let cert_path = dir.join(format!("{name}.pem"));
        let key_path = dir.join(format!("{name}-key.pem"));
        std::fs::write(&cert_path, cert.pem()).expect("write cert");
        std::fs::write(&key_path, key.serialize_pem()).expect("write key");
        (cert_path, key_path)
    }

    /// Writes `path`: this CA's revocation list of the serial numbers `revoked`, in
    /// PEM or else DER.
    fn write_crl(&self, path: &Path, revoked: &[u64], pem: bool) {
        let params = rcgen::CertificateRevocationListParams {
            this_update: rcgen::date_time_ymd(2025, 1, 1),
            next_update: rcgen::date_time_ymd(2040, 1, 1),
            crl_number: rcgen::SerialNumber::from(revoked.len() as u64 + 1),
            issuing_distribution_point: None,
            revoked_certs: revoked
                .iter()
                .map(|serial| rcgen::RevokedCertParams {
                    serial_number: rcgen::SerialNumber::from(*serial),
                    revocation_time: rcgen::date_time_ymd(2025, 6, 1),
                    reason_code: Some(rcgen::RevocationReason::KeyCompromise),
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        };
        let crl = params.signed_by(&self.cert, &self.key).expect("CRL");
        let bytes = if pem {
            crl.pem().expect("CRL PEM").into_bytes()
        } else {
            crl.der().to_vec()
        };
        std::fs::write(path, bytes).expect("write CRL");
    }

    fn write(&self, dir: &Path, name: &str) -> PathBuf {
        let path = dir.join(format!("{name}.pem"));
        std::fs::write(&path, self.cert.pem()).expect("write CA");
        path
    }
}

/// Certificates for one test: CA 1 (trusted), CA 2 (foreign), a server pair and
/// client pairs from each.
struct Pki {
    dir: tempfile::TempDir,
    ca: PathBuf,
    other_ca: PathBuf,
    server: (PathBuf, PathBuf),
    client: (PathBuf, PathBuf),
    foreign_client: (PathBuf, PathBuf),
    cas: (Ca, Ca),
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().expect("temp dir");
        let first = Ca::new("kvstore test CA");
        let second = Ca::new("some other CA");
        Pki {
            ca: first.write(dir.path(), "ca"),
            other_ca: second.write(dir.path(), "other-ca"),
            server: first.issue(dir.path(), "server", "server"),
            client: first.issue(dir.path(), "client", "root"),
            foreign_client: second.issue(dir.path(), "foreign", "root"),
            cas: (first, second),
            dir,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

fn arg(path: &Path) -> String {
    path.display().to_string()
}

/// A kvstore process with arbitrary flags, stopped on drop.
struct Kvstore {
    child: Child,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Kvstore {
    fn start(data_dir: &Path, args: &[String]) -> Kvstore {
        Kvstore::start_binary(env!("CARGO_BIN_EXE_kvstore"), data_dir, args)
    }

    /// Starts `binary` (kvstore, or Debian's etcd to compare with).
    fn start_binary(binary: &str, data_dir: &Path, args: &[String]) -> Kvstore {
        let dir = tempfile::tempdir().expect("temp dir");
        let log = dir.path().join("kvstore.log");
        let mut command = Command::new(binary);
        if binary == common::ETCD {
            command.env("ETCD_UNSUPPORTED_ARCH", std::env::consts::ARCH);
        }
        let child = command
            .arg(format!("--data-dir={}", data_dir.display()))
            .args(args)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).expect("log"))
            .stderr(std::fs::File::create(dir.path().join("stderr.log")).expect("log"))
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {binary}: {e}"));
        Kvstore {
            child,
            log,
            _dir: dir,
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
            + &std::fs::read_to_string(self._dir.path().join("stderr.log")).unwrap_or_default()
    }

    fn rss_bytes(&self) -> u64 {
        common::rss_of(self.child.id())
    }
}

impl Drop for Kvstore {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A single member on free ports: client URL `scheme`, plain peer URL.
fn single_member_args(scheme: &str, client_port: u16, extra: &[String]) -> Vec<String> {
    let peer = format!("http://127.0.0.1:{}", free_port());
    let client = format!("{scheme}://127.0.0.1:{client_port}");
    let mut args = vec![
        format!("--listen-client-urls={client}"),
        format!("--advertise-client-urls={client}"),
        format!("--listen-peer-urls={peer}"),
        format!("--initial-advertise-peer-urls={peer}"),
        format!("--initial-cluster=default={peer}"),
    ];
    args.extend_from_slice(extra);
    args
}

fn etcdctl(endpoint: &str, tls: &[String], args: &[&str]) -> String {
    let output = Command::new(ETCDCTL)
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={endpoint}"))
        .arg("--dial-timeout=2s")
        .arg("--command-timeout=3s")
        .args(tls)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run etcdctl");
    text(&output)
}

fn client_tls(pki: &Pki, ca: &Path, pair: Option<&(PathBuf, PathBuf)>) -> Vec<String> {
    let mut flags = vec![format!("--cacert={}", arg(ca))];
    if let Some((cert, key)) = pair {
        flags.push(format!("--cert={}", arg(cert)));
        flags.push(format!("--key={}", arg(key)));
    }
    let _ = pki;
    flags
}

fn wait_until(timeout: Duration, mut ready: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if ready() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    false
}

fn healthy(endpoint: &str, tls: &[String]) -> bool {
    etcdctl(endpoint, tls, &["endpoint", "health"]).ends_with("exit=0")
}

/// Starts one member serving clients over https with the server pair and `extra`
/// flags, and waits until etcdctl with `probe` finds it healthy.
fn start_https(
    pki: &Pki,
    data_dir: &Path,
    extra: &[String],
    probe: &[String],
) -> (Kvstore, String) {
    start_https_binary(env!("CARGO_BIN_EXE_kvstore"), pki, data_dir, extra, probe)
}

fn start_https_binary(
    binary: &str,
    pki: &Pki,
    data_dir: &Path,
    extra: &[String],
    probe: &[String],
) -> (Kvstore, String) {
    let port = free_port();
    let mut flags = vec![
        format!("--cert-file={}", arg(&pki.server.0)),
        format!("--key-file={}", arg(&pki.server.1)),
    ];
    flags.extend_from_slice(extra);
    let server =
        Kvstore::start_binary(binary, data_dir, &single_member_args("https", port, &flags));
    let endpoint = format!("https://127.0.0.1:{port}");
    assert!(
        wait_until(Duration::from_secs(20), || healthy(&endpoint, probe)),
        "not healthy over TLS; log:\n{}",
        server.log_text()
    );
    (server, endpoint)
}

#[test]
fn server_tls_and_mutual_tls_with_etcdctl() {
    let pki = Pki::new();
    let data = tempfile::tempdir().expect("temp dir");
    let trusted = client_tls(&pki, &pki.ca, None);
    let (server, endpoint) = start_https(&pki, &data.path().join("d"), &[], &trusted);
    assert_eq!(
        etcdctl(&endpoint, &trusted, &["put", "k", "v"]),
        "OK\nexit=0"
    );
    assert_eq!(
        etcdctl(&endpoint, &trusted, &["get", "k", "--print-value-only"]),
        "v\nexit=0"
    );
    // The HTTP endpoints are served over TLS too.
    assert!(etcdctl(&endpoint, &trusted, &["endpoint", "status"]).ends_with("exit=0"));
    let health = Command::new("curl")
        .args(["-s", "--cacert", &arg(&pki.ca)])
        .arg(format!("{endpoint}/health"))
        .output()
        .expect("curl");
    assert_eq!(
        String::from_utf8_lossy(&health.stdout),
        r#"{"health":"true"}"#
    );
    // A client that does not trust the CA, and a plain-text client, get nothing.
    let out = etcdctl(
        &endpoint,
        &client_tls(&pki, &pki.other_ca, None),
        &["get", "k"],
    );
    assert!(!out.ends_with("exit=0") && !out.contains("\nv\n"), "{out}");
    let plain = endpoint.replacen("https://", "http://", 1);
    let out = etcdctl(&plain, &[], &["get", "k"]);
    assert!(!out.ends_with("exit=0"), "{out}");
    drop(server);

    // Mutual TLS: a certificate from the trusted CA is required.
    let with_cert = client_tls(&pki, &pki.ca, Some(&pki.client));
    let (_server, endpoint) = start_https(
        &pki,
        &data.path().join("d"),
        &[
            format!("--trusted-ca-file={}", arg(&pki.ca)),
            "--client-cert-auth".to_string(),
        ],
        &with_cert,
    );
    assert_eq!(
        etcdctl(&endpoint, &with_cert, &["get", "k", "--print-value-only"]),
        "v\nexit=0"
    );
    refuses_clients_without_a_trusted_certificate(&pki, &endpoint, "kvstore");

    // With auth enabled, the certificate's CommonName names the user.
    for args in [
        &["user", "add", "root:pw", "--interactive=false"][..],
        &["user", "grant-role", "root", "root"],
        &["auth", "enable"],
    ] {
        let out = etcdctl(&endpoint, &with_cert, args);
        assert!(out.ends_with("exit=0"), "{args:?}: {out}");
    }
    assert_eq!(
        etcdctl(&endpoint, &with_cert, &["get", "k", "--print-value-only"]),
        "v\nexit=0",
        "CN root acts as root"
    );
    assert!(etcdctl(&endpoint, &with_cert, &["user", "list"]).contains("root"));
}

/// A client with no certificate, and one with a certificate from another CA, read
/// nothing from `endpoint` (which holds k = v).
fn refuses_clients_without_a_trusted_certificate(pki: &Pki, endpoint: &str, server: &str) {
    for (who, pair) in [
        ("no client certificate", None),
        ("a foreign client certificate", Some(&pki.foreign_client)),
    ] {
        let out = etcdctl(endpoint, &client_tls(pki, &pki.ca, pair), &["get", "k"]);
        assert!(
            !out.ends_with("exit=0") && !out.contains("\nv\n"),
            "{server} served a client with {who}: {out}"
        );
    }
}

/// etcd requires client certificates from the trusted CA as soon as
/// `--trusted-ca-file` is given, with or without `--client-cert-auth`; so does kvstore.
#[test]
fn a_trusted_ca_alone_requires_client_certificates_as_in_etcd() {
    let pki = Pki::new();
    let with_cert = client_tls(&pki, &pki.ca, Some(&pki.client));
    for binary in [env!("CARGO_BIN_EXE_kvstore"), common::ETCD] {
        let data = tempfile::tempdir().expect("temp dir");
        let (server, endpoint) = start_https_binary(
            binary,
            &pki,
            &data.path().join("d"),
            &[format!("--trusted-ca-file={}", arg(&pki.ca))],
            &with_cert,
        );
        assert_eq!(
            etcdctl(&endpoint, &with_cert, &["put", "k", "v"]),
            "OK\nexit=0",
            "{binary}"
        );
        refuses_clients_without_a_trusted_certificate(&pki, &endpoint, binary);
        drop(server);
    }
}

/// `--client-crl-file` and `--client-cert-allowed-hostname`, against kvstore and
/// etcd alike: a revoked client certificate, and one for another host, are refused;
/// a certificate revoked later is refused without a restart.
#[test]
fn revoked_and_other_host_client_certificates_are_refused_as_in_etcd() {
    let pki = Pki::new();
    let (first, _) = &pki.cas;
    let dir = pki.dir.path();
    let good = first.issue_for(dir, "good", "good", &["127.0.0.1", "localhost"], Some(1001));
    let revoked = first.issue_for(dir, "revoked", "revoked", &["localhost"], Some(1002));
    let elsewhere = first.issue_for(dir, "elsewhere", "elsewhere", &["elsewhere.example"], None);
    let crl = pki.path("crl.pem");
    let with = |pair| client_tls(&pki, &pki.ca, Some(pair));
    for binary in [env!("CARGO_BIN_EXE_kvstore"), common::ETCD] {
        first.write_crl(&crl, &[1002], true);
        let data = tempfile::tempdir().expect("temp dir");
        let (server, endpoint) = start_https_binary(
            binary,
            &pki,
            &data.path().join("d"),
            &[
                format!("--trusted-ca-file={}", arg(&pki.ca)),
                "--client-cert-auth".to_string(),
                format!("--client-crl-file={}", arg(&crl)),
                "--client-cert-allowed-hostname=localhost".to_string(),
            ],
            &with(&good),
        );
        assert_eq!(
            etcdctl(&endpoint, &with(&good), &["put", "k", "v"]),
            "OK\nexit=0",
            "{binary}"
        );
        for (who, pair) in [("revoked", &revoked), ("for another host", &elsewhere)] {
            let out = etcdctl(&endpoint, &with(pair), &["get", "k"]);
            assert!(
                !out.ends_with("exit=0") && !out.contains("\nv\n"),
                "{binary} served a client certificate {who}: {out}"
            );
        }
        // Revoked while the server runs (in a DER list this time): refused once the
        // new list is read.
        first.write_crl(&crl, &[1001, 1002], false);
        assert!(
            wait_until(Duration::from_secs(10), || !healthy(
                &endpoint,
                &with(&good)
            )),
            "{binary} still serves a certificate revoked 10 s ago"
        );
        drop(server);
    }
}

/// Revocation lists that cannot be used, and allowed-name flags that cannot be
/// honoured, stop kvstore at start with a message naming the file or the flags.
#[test]
fn unusable_revocation_lists_and_allowed_names_are_reported() {
    let pki = Pki::new();
    let garbage = pki.path("garbage.crl");
    std::fs::write(&garbage, "not a revocation list").unwrap();
    let tls = |extra: &[String]| {
        let mut flags = vec![
            format!("--cert-file={}", arg(&pki.server.0)),
            format!("--key-file={}", arg(&pki.server.1)),
            format!("--trusted-ca-file={}", arg(&pki.ca)),
        ];
        flags.extend_from_slice(extra);
        single_member_args("https", free_port(), &flags)
    };
    let cases: [(Vec<String>, &str); 4] = [
        (
            tls(&[format!("--client-crl-file={}", arg(&garbage))]),
            "garbage.crl: no certificate revocation list found",
        ),
        (
            tls(&[format!("--client-crl-file={}", arg(&pki.path("missing.crl")))]),
            "missing.crl",
        ),
        (
            tls(&["--client-cert-allowed-hostname=not a host!".to_string()]),
            "--client-cert-allowed-hostname: \"not a host!\" is neither a DNS name nor an IP address",
        ),
        (
            tls(&[
                "--peer-cert-allowed-cn=a".to_string(),
                "--peer-cert-allowed-hostname=b".to_string(),
            ]),
            "--peer-cert-allowed-cn (\"a\") and --peer-cert-allowed-hostname (\"b\") are mutually exclusive",
        ),
    ];
    for (args, expected) in cases {
        let data = tempfile::tempdir().expect("temp dir");
        let output = Command::new(env!("CARGO_BIN_EXE_kvstore"))
            .arg(format!("--data-dir={}", data.path().join("d").display()))
            .args(&args)
            .stdin(Stdio::null())
            .output()
            .expect("run kvstore");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            !output.status.success() && stderr.contains(expected),
            "{args:?}: {}\n{stderr}",
            output.status
        );
    }
}

#[test]
fn certificates_rotate_without_restart() {
    let pki = Pki::new();
    let data = tempfile::tempdir().expect("temp dir");
    let live_cert = pki.path("live.pem");
    let live_key = pki.path("live-key.pem");
    std::fs::copy(&pki.server.0, &live_cert).expect("copy");
    std::fs::copy(&pki.server.1, &live_key).expect("copy");
    let port = free_port();
    let endpoint = format!("https://127.0.0.1:{port}");
    let server = Kvstore::start(
        &data.path().join("d"),
        &single_member_args(
            "https",
            port,
            &[
                format!("--cert-file={}", arg(&live_cert)),
                format!("--key-file={}", arg(&live_key)),
            ],
        ),
    );
    let old_ca = client_tls(&pki, &pki.ca, None);
    let new_ca = client_tls(&pki, &pki.other_ca, None);
    assert!(
        wait_until(Duration::from_secs(20), || healthy(&endpoint, &old_ca)),
        "log:\n{}",
        server.log_text()
    );
    assert!(!healthy(&endpoint, &new_ca));
    let pid = server.child.id();

    // The new pair, from the other CA, replaces the files in place.
    let (cert, key) = pki.cas.1.issue(pki.dir.path(), "rotated", "server");
    std::fs::copy(&key, &live_key).expect("rotate key");
    std::fs::copy(&cert, &live_cert).expect("rotate cert");
    assert!(
        wait_until(Duration::from_secs(10), || healthy(&endpoint, &new_ca)),
        "rotated certificate not served; log:\n{}",
        server.log_text()
    );
    assert!(!healthy(&endpoint, &old_ca), "old certificate still served");
    assert_eq!(server.child.id(), pid);
    assert!(server.log_text().contains("reloaded"));
}

#[test]
fn auto_tls_serves_a_generated_certificate() {
    let data = tempfile::tempdir().expect("temp dir");
    let data_dir = data.path().join("d");
    let port = free_port();
    let endpoint = format!("https://127.0.0.1:{port}");
    let server = Kvstore::start(
        &data_dir,
        &single_member_args(
            "https",
            port,
            &[
                "--auto-tls".to_string(),
                "--self-signed-cert-validity=2".to_string(),
            ],
        ),
    );
    // etcdctl 3.4 uses TLS without certificates only when told the transport is
    // not insecure.
    let insecure = vec![
        "--insecure-transport=false".to_string(),
        "--insecure-skip-tls-verify".to_string(),
    ];
    assert!(
        wait_until(Duration::from_secs(20), || healthy(&endpoint, &insecure)),
        "log:\n{}",
        server.log_text()
    );
    assert_eq!(
        etcdctl(&endpoint, &insecure, &["put", "a", "b"]),
        "OK\nexit=0"
    );
    let fixtures = data_dir.join("fixtures/client");
    assert!(fixtures.join("cert.pem").exists());
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(fixtures.join("key.pem"))
        .expect("key")
        .permissions()
        .mode();
    assert_eq!(mode & 0o077, 0, "key readable by others: {mode:o}");
    // Nobody vouches for a self-signed certificate.
    let pki = Pki::new();
    assert!(!healthy(&endpoint, &client_tls(&pki, &pki.ca, None)));
}

/// Starts member `index` of a 3-member cluster with https peer URLs.
fn tls_member(
    index: usize,
    ports: &[(u16, u16)],
    data: &Path,
    pki: &Pki,
    pair: &(PathBuf, PathBuf),
) -> Kvstore {
    tls_member_with(
        index,
        ports,
        data,
        &[
            format!("--peer-cert-file={}", arg(&pair.0)),
            format!("--peer-key-file={}", arg(&pair.1)),
            format!("--peer-trusted-ca-file={}", arg(&pki.ca)),
            "--peer-client-cert-auth".to_string(),
        ],
    )
}

fn tls_member_with(index: usize, ports: &[(u16, u16)], data: &Path, tls: &[String]) -> Kvstore {
    let cluster: Vec<String> = ports
        .iter()
        .enumerate()
        .map(|(i, (_, peer))| format!("m{i}=https://127.0.0.1:{peer}"))
        .collect();
    let (client, peer) = ports[index];
    Kvstore::start(
        &data.join(format!("m{index}")),
        &[
            format!("--name=m{index}"),
            format!("--listen-client-urls=http://127.0.0.1:{client}"),
            format!("--advertise-client-urls=http://127.0.0.1:{client}"),
            format!("--listen-peer-urls=https://127.0.0.1:{peer}"),
            format!("--initial-advertise-peer-urls=https://127.0.0.1:{peer}"),
            format!("--initial-cluster={}", cluster.join(",")),
            "--initial-cluster-token=tls-cluster".to_string(),
        ]
        .into_iter()
        .chain(tls.iter().cloned())
        .collect::<Vec<_>>(),
    )
}

/// Waits until each of `members` (the first of `ports`) answers a health check.
fn wait_members_healthy(members: &[Kvstore], ports: &[(u16, u16)]) {
    for (i, member) in members.iter().enumerate() {
        let endpoint = format!("127.0.0.1:{}", ports[i].0);
        assert!(
            wait_until(Duration::from_secs(30), || healthy(&endpoint, &[])),
            "m{i} not healthy; log:\n{}",
            member.log_text()
        );
    }
}

#[test]
fn three_members_over_peer_tls_keep_out_a_foreign_peer() {
    let _one = common::one_at_a_time();
    let pki = Pki::new();
    let data = tempfile::tempdir().expect("temp dir");
    let ports: Vec<(u16, u16)> = (0..3).map(|_| (free_port(), free_port())).collect();
    let endpoint = |i: usize| format!("127.0.0.1:{}", ports[i].0);
    let members: Vec<Kvstore> = (0..3)
        .map(|i| tls_member(i, &ports, data.path(), &pki, &pki.server))
        .collect();
    wait_members_healthy(&members, &ports);
    assert_eq!(
        etcdctl(&endpoint(0), &[], &["put", "k", "over-tls"]),
        "OK\nexit=0"
    );
    assert_eq!(
        etcdctl(&endpoint(2), &[], &["get", "k", "--print-value-only"]),
        "over-tls\nexit=0"
    );
    let list = etcdctl(&endpoint(1), &[], &["member", "list"]);
    assert_eq!(list.matches("https://127.0.0.1:").count(), 3, "{list}");
    drop(members);

    // A member whose certificate comes from another CA is refused by the others;
    // the two that trust each other form the cluster without it.
    let data = tempfile::tempdir().expect("temp dir");
    let ports: Vec<(u16, u16)> = (0..3).map(|_| (free_port(), free_port())).collect();
    let endpoint = |i: usize| format!("127.0.0.1:{}", ports[i].0);
    let good: Vec<Kvstore> = (0..2)
        .map(|i| tls_member(i, &ports, data.path(), &pki, &pki.server))
        .collect();
    let foreign = tls_member(2, &ports, data.path(), &pki, &pki.foreign_client);
    wait_members_healthy(&good, &ports);
    assert_eq!(
        etcdctl(&endpoint(0), &[], &["put", "k", "two"]),
        "OK\nexit=0"
    );
    std::thread::sleep(Duration::from_secs(3));
    let out = etcdctl(&endpoint(2), &[], &["get", "k", "--consistency=s"]);
    assert!(
        !out.contains("two"),
        "the foreign member got data: {out}\n{}",
        foreign.log_text()
    );
    assert!(!healthy(&endpoint(2), &[]), "the foreign member joined");
    let list = etcdctl(&endpoint(0), &[], &["member", "list"]);
    assert!(list.contains("unstarted"), "{list}");
}

#[test]
fn stalled_handshakes_do_not_exhaust_the_server() {
    // This process holds the stalled connections: allow it the descriptors.
    raise_open_files();
    let pki = Pki::new();
    let data = tempfile::tempdir().expect("temp dir");
    let trusted = client_tls(&pki, &pki.ca, None);
    let (server, endpoint) = start_https(
        &pki,
        &data.path().join("d"),
        &["--tls-handshake-timeout=3s".to_string()],
        &trusted,
    );
    let port: u16 = endpoint
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("port");
    let before = server.rss_bytes();
    // Connections that never send a ClientHello, and some that stop half way.
    let mut stalled = Vec::new();
    for i in 0..1500 {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        if i % 3 == 0 {
            use std::io::Write;
            // A TLS record header announcing a handshake that never arrives.
            let _ = stream.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01]);
        }
        stalled.push(stream);
    }
    // Others are still served meanwhile.
    let started = Instant::now();
    assert_eq!(
        etcdctl(&endpoint, &trusted, &["put", "busy", "yes"]),
        "OK\nexit=0"
    );
    assert!(started.elapsed() < Duration::from_secs(3));
    let during = server.rss_bytes();
    assert!(
        during < before + (64 << 20),
        "RSS grew from {before} to {during} bytes for 1500 stalled handshakes"
    );
    // The server drops them once the handshake timeout passes.
    std::thread::sleep(Duration::from_secs(4));
    let mut closed = 0;
    for stream in &mut stalled {
        stream
            .set_read_timeout(Some(Duration::from_millis(50)))
            .expect("timeout");
        let mut buffer = [0u8; 16];
        if matches!(stream.read(&mut buffer), Ok(0) | Err(_))
            && stream.read(&mut buffer).map(|n| n == 0).unwrap_or(true)
        {
            closed += 1;
        }
    }
    assert!(
        closed >= 1490,
        "only {closed} of 1500 stalled connections closed"
    );
    assert!(healthy(&endpoint, &trusted));
}

fn raise_open_files() {
    // SAFETY: plain getrlimit/setrlimit on this process.
    unsafe {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
            limit.rlim_cur = limit.rlim_max.min(65536);
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

#[test]
fn data_dir_is_private() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("temp dir");
    // A new data dir is created 0700.
    let fresh = dir.path().join("fresh");
    let port = free_port();
    let server = Kvstore::start(&fresh, &single_member_args("http", port, &[]));
    assert!(
        wait_until(Duration::from_secs(20), || healthy(
            &format!("127.0.0.1:{port}"),
            &[]
        )),
        "log:\n{}",
        server.log_text()
    );
    let mode = std::fs::metadata(&fresh)
        .expect("data dir")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o700);
    drop(server);
    // One others may read is refused, with the reason.
    let loose = dir.path().join("loose");
    std::fs::create_dir(&loose).expect("mkdir");
    std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let output = Command::new(env!("CARGO_BIN_EXE_kvstore"))
        .arg(format!("--data-dir={}", loose.display()))
        .args(single_member_args("http", free_port(), &[]))
        .output()
        .expect("run kvstore");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("0755") && stderr.contains("0700"),
        "{stderr}"
    );
}

#[test]
fn peer_auto_tls_and_allowed_common_name() {
    let _one = common::one_at_a_time();
    // Three members over self-signed peer certificates.
    let data = tempfile::tempdir().expect("temp dir");
    let ports: Vec<(u16, u16)> = (0..3).map(|_| (free_port(), free_port())).collect();
    let endpoint = |ports: &[(u16, u16)], i: usize| format!("127.0.0.1:{}", ports[i].0);
    let members: Vec<Kvstore> = (0..3)
        .map(|i| tls_member_with(i, &ports, data.path(), &["--peer-auto-tls".to_string()]))
        .collect();
    wait_members_healthy(&members, &ports);
    assert_eq!(
        etcdctl(&endpoint(&ports, 0), &[], &["put", "k", "auto"]),
        "OK\nexit=0"
    );
    assert_eq!(
        etcdctl(
            &endpoint(&ports, 2),
            &[],
            &["get", "k", "--print-value-only"]
        ),
        "auto\nexit=0"
    );
    assert!(data.path().join("m1/fixtures/peer/cert.pem").exists());
    drop(members);

    // --peer-cert-allowed-cn: a peer certificate from the trusted CA but with another
    // CommonName is refused.
    let pki = Pki::new();
    let member_pair = pki.cas.0.issue(pki.dir.path(), "member", "member");
    let intruder_pair = pki.cas.0.issue(pki.dir.path(), "intruder", "intruder");
    let flags = |pair: &(PathBuf, PathBuf)| {
        vec![
            format!("--peer-cert-file={}", arg(&pair.0)),
            format!("--peer-key-file={}", arg(&pair.1)),
            format!("--peer-trusted-ca-file={}", arg(&pki.ca)),
            "--peer-client-cert-auth".to_string(),
            "--peer-cert-allowed-cn=member".to_string(),
        ]
    };
    let data = tempfile::tempdir().expect("temp dir");
    let ports: Vec<(u16, u16)> = (0..3).map(|_| (free_port(), free_port())).collect();
    let good: Vec<Kvstore> = (0..2)
        .map(|i| tls_member_with(i, &ports, data.path(), &flags(&member_pair)))
        .collect();
    wait_members_healthy(&good, &ports);
    assert_eq!(
        etcdctl(&endpoint(&ports, 0), &[], &["put", "k", "cn"]),
        "OK\nexit=0"
    );
    // The intruder joins once the two have a leader. Started together, the intruder
    // (which hears the others but cannot reach them) campaigns in ever higher terms
    // and could keep them from electing for longer than this test waits.
    let intruder = tls_member_with(2, &ports, data.path(), &flags(&intruder_pair));
    // The intruder's calls are refused: it never gets its name published through
    // the leader, so the others list it as unstarted, and it serves no client.
    std::thread::sleep(Duration::from_secs(3));
    let list = etcdctl(&endpoint(&ports, 0), &[], &["member", "list"]);
    assert!(list.contains("unstarted"), "{list}");
    assert!(
        !healthy(&endpoint(&ports, 2), &[]),
        "the intruder serves clients; log:\n{}",
        intruder.log_text()
    );
}

/// As etcd, a member refuses a peer connection whose client certificate names
/// other addresses than the one it comes from (unless
/// `--experimental-peer-skip-client-san-verification`). Checked with curl on the
/// peer port of kvstore and of etcd: any HTTP answer means the connection was kept
/// (HTTP/1.1, which etcd's peer port sends to its HTTP handlers, not to gRPC).
#[test]
fn peer_certificates_must_name_the_address_they_come_from_as_in_etcd() {
    let pki = Pki::new();
    let (first, _) = &pki.cas;
    let here = first.issue(pki.dir.path(), "here", "here");
    let far = first.issue_for(pki.dir.path(), "far", "far", &["10.9.8.7"], None);
    let answers = |peer_port: u16, (cert, key): &(PathBuf, PathBuf)| {
        Command::new("curl")
            .args(["-s", "--http1.1", "-o", "/dev/null", "--max-time", "5"])
            .args([
                "--cacert",
                &arg(&pki.ca),
                "--cert",
                &arg(cert),
                "--key",
                &arg(key),
            ])
            .arg(format!("https://127.0.0.1:{peer_port}/version"))
            .status()
            .expect("curl")
            .success()
    };
    for binary in [env!("CARGO_BIN_EXE_kvstore"), common::ETCD] {
        for skip in [false, true] {
            let data = tempfile::tempdir().expect("temp dir");
            let (client, peer) = (free_port(), free_port());
            let mut args = vec![
                format!("--listen-client-urls=http://127.0.0.1:{client}"),
                format!("--advertise-client-urls=http://127.0.0.1:{client}"),
                format!("--listen-peer-urls=https://127.0.0.1:{peer}"),
                format!("--initial-advertise-peer-urls=https://127.0.0.1:{peer}"),
                format!("--initial-cluster=default=https://127.0.0.1:{peer}"),
                format!("--peer-cert-file={}", arg(&pki.server.0)),
                format!("--peer-key-file={}", arg(&pki.server.1)),
                format!("--peer-trusted-ca-file={}", arg(&pki.ca)),
                "--peer-client-cert-auth".to_string(),
            ];
            if skip {
                args.push("--experimental-peer-skip-client-san-verification".to_string());
            }
            let server = Kvstore::start_binary(binary, &data.path().join("d"), &args);
            let endpoint = format!("127.0.0.1:{client}");
            assert!(
                wait_until(Duration::from_secs(20), || healthy(&endpoint, &[])),
                "{binary} did not start; log:\n{}",
                server.log_text()
            );
            assert!(
                answers(peer, &here),
                "{binary} refused a peer certificate for 127.0.0.1"
            );
            assert_eq!(
                answers(peer, &far),
                skip,
                "{binary}, skip {skip}: a peer certificate for 10.9.8.7 only, from 127.0.0.1"
            );
        }
    }
}

#[test]
fn connections_beyond_the_limit_wait_their_turn() {
    let data = tempfile::tempdir().expect("temp dir");
    let port = free_port();
    let endpoint = format!("127.0.0.1:{port}");
    let server = Kvstore::start(
        &data.path().join("d"),
        &single_member_args("http", port, &["--max-connections=20".to_string()]),
    );
    assert!(
        wait_until(Duration::from_secs(20), || healthy(&endpoint, &[])),
        "log:\n{}",
        server.log_text()
    );
    // Wait until etcdctl's own connection is gone before taking every slot.
    std::thread::sleep(Duration::from_millis(500));
    let held: Vec<TcpStream> = (0..20)
        .map(|_| TcpStream::connect(("127.0.0.1", port)).expect("connect"))
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let out = etcdctl(&endpoint, &[], &["get", "k"]);
    assert!(!out.ends_with("exit=0"), "served beyond the limit: {out}");
    drop(held);
    assert!(
        wait_until(Duration::from_secs(10), || healthy(&endpoint, &[])),
        "not served after the slots were freed"
    );
}

fn curl_health(endpoint: &str, ca: &Path, options: &[&str]) -> bool {
    let output = Command::new("curl")
        .args(["-s", "--max-time", "5", "--cacert", &arg(ca)])
        .args(options)
        .arg(format!("{endpoint}/health"))
        .output()
        .expect("curl");
    output.status.success() && String::from_utf8_lossy(&output.stdout).contains("true")
}

#[test]
fn tls_versions_and_cipher_suites_follow_the_flags() {
    let pki = Pki::new();
    let data = tempfile::tempdir().expect("temp dir");
    let trusted = client_tls(&pki, &pki.ca, None);
    let start = |extra: &[&str]| {
        let extra: Vec<String> = extra.iter().map(|flag| flag.to_string()).collect();
        let dir = data.path().join(format!("d{}", extra.len()));
        start_https(&pki, &dir, &extra, &trusted)
    };
    // TLS 1.3 only: a TLS 1.2 client is refused.
    let (_server, endpoint) = start(&["--tls-min-version=TLS1.3"]);
    assert!(curl_health(&endpoint, &pki.ca, &[]));
    assert!(!curl_health(&endpoint, &pki.ca, &["--tls-max", "1.2"]));
    // TLS 1.2 with one cipher suite: a client offering only another is refused.
    let (_server, endpoint) = start(&[
        "--tls-max-version=TLS1.2",
        "--cipher-suites=TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
    ]);
    assert!(curl_health(
        &endpoint,
        &pki.ca,
        &["--ciphers", "ECDHE-ECDSA-AES128-GCM-SHA256"]
    ));
    assert!(!curl_health(
        &endpoint,
        &pki.ca,
        &["--ciphers", "ECDHE-ECDSA-AES256-GCM-SHA384"]
    ));
    // A suite rustls does not have is named in the error.
    let output = Command::new(env!("CARGO_BIN_EXE_kvstore"))
        .arg(format!("--data-dir={}", data.path().join("bad").display()))
        .arg("--cipher-suites=TLS_RSA_WITH_RC4_128_SHA")
        .output()
        .expect("run kvstore");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("--cipher-suites") && stderr.contains("TLS_RSA_WITH_RC4_128_SHA"),
        "{stderr}"
    );
}
