//! Shared harness for integration tests: start kvstore or Debian's etcd on free
//! loopback ports in a temp dir, run etcdctl against them, stop them on drop.
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Holds the test binary's one-at-a-time lock: tests that run several members on
/// two cores, or time elections, must not run beside each other.
pub fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A gRPC channel to a client URL.
pub async fn connect(url: String) -> tonic::transport::Channel {
    tonic::transport::Channel::from_shared(url.clone())
        .expect("valid URL")
        .connect()
        .await
        .unwrap_or_else(|error| panic!("connect to {url}: {error}"))
}

/// The Debian etcd server the tests compare against.
pub const ETCD: &str = "/usr/bin/etcd";
/// The Debian etcdctl the tests drive both servers with.
pub const ETCDCTL: &str = "/usr/bin/etcdctl";

/// A port nobody listens on right now, and one this process has not handed out
/// before (the kernel may give a just-released port again).
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .expect("bind an ephemeral port")
            .local_addr()
            .expect("local address")
            .port();
        let mut given = GIVEN
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// Which server a [`Server`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Our server.
    Kvstore,
    /// Debian's etcd.
    Etcd,
}

/// A running server process.
pub struct Server {
    pub kind: Kind,
    pub client_port: u16,
    pub peer_port: u16,
    pub data_dir: PathBuf,
    child: Option<Child>,
    _dir: Option<tempfile::TempDir>,
    log: PathBuf,
}

fn require(path: &str) {
    assert!(
        Path::new(path).exists(),
        "{path} is missing: run scripts/deps (the README's test command does) to install Debian's etcd-server and etcd-client"
    );
}

impl Server {
    /// Starts `kind` with a fresh data dir.
    pub fn start(kind: Kind) -> Server {
        Server::start_with(kind, &[])
    }

    /// Starts `kind` with a fresh data dir and extra flags.
    pub fn start_with(kind: Kind, extra: &[&str]) -> Server {
        let dir = tempfile::tempdir().expect("temp dir");
        let data_dir = dir.path().join("data");
        let mut server = Server {
            kind,
            client_port: 0,
            peer_port: 0,
            data_dir,
            child: None,
            log: dir.path().join("server.log"),
            _dir: Some(dir),
        };
        server.launch(extra);
        server
    }

    /// The binary for `kind`.
    pub fn binary(kind: Kind) -> &'static str {
        match kind {
            Kind::Kvstore => env!("CARGO_BIN_EXE_kvstore"),
            Kind::Etcd => {
                require(ETCD);
                ETCD
            }
        }
    }

    fn launch(&mut self, extra: &[&str]) {
        for _attempt in 0..5 {
            if self.client_port == 0 {
                self.client_port = free_port();
                self.peer_port = free_port();
            }
            let client = format!("http://127.0.0.1:{}", self.client_port);
            let peer = format!("http://127.0.0.1:{}", self.peer_port);
            let log = std::fs::File::create(&self.log).expect("log file");
            let mut command = Command::new(Server::binary(self.kind));
            command
                .arg("--name=test")
                .arg(format!("--data-dir={}", self.data_dir.display()))
                .arg(format!("--listen-client-urls={client}"))
                .arg(format!("--advertise-client-urls={client}"))
                .arg(format!("--listen-peer-urls={peer}"))
                .arg(format!("--initial-advertise-peer-urls={peer}"))
                .arg(format!("--initial-cluster=test={peer}"))
                .args(extra)
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("log file"))
                .stderr(log);
            if self.kind == Kind::Etcd {
                command.env("ETCD_UNSUPPORTED_ARCH", std::env::consts::ARCH);
            }
            let child = command.spawn().expect("spawn server");
            self.child = Some(child);
            if self.wait_ready(Duration::from_secs(20)) {
                return;
            }
            self.kill();
            // The port may have been taken between choosing and binding: choose again.
            self.client_port = 0;
        }
        panic!("{:?} did not start; log:\n{}", self.kind, self.log_text());
    }

    fn wait_ready(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(_)) = child.try_wait() {
                    return false;
                }
            }
            let output = self.etcdctl(&["--command-timeout=1s", "endpoint", "health"]);
            // With auth enabled an anonymous health check is refused, by a server
            // that is serving.
            if output.status.success()
                || String::from_utf8_lossy(&output.stderr)
                    .contains("etcdserver: user name is empty")
            {
                return true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    }

    /// The client endpoint, host:port.
    pub fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.client_port)
    }

    /// The client URL.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    /// A gRPC channel to this server.
    pub async fn channel(&self) -> tonic::transport::Channel {
        connect(self.url()).await
    }

    /// Runs etcdctl against this server.
    pub fn etcdctl(&self, args: &[&str]) -> Output {
        self.etcdctl_with_input(args, None)
    }

    /// Runs etcdctl against this server with `input` on stdin.
    pub fn etcdctl_with_input(&self, args: &[&str], input: Option<&str>) -> Output {
        require(ETCDCTL);
        let mut command = Command::new(ETCDCTL);
        command
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", self.endpoint()))
            .args(args)
            .stdin(if input.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command.spawn().expect("spawn etcdctl");
        if let Some(input) = input {
            use std::io::Write;
            let mut stdin = child.stdin.take().expect("stdin");
            stdin
                .write_all(input.as_bytes())
                .expect("write etcdctl stdin");
        }
        child.wait_with_output().expect("etcdctl output")
    }

    /// Kills the server with SIGKILL and waits for it to exit.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Waits up to `timeout` for the server to exit on its own; its exit status.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut()?;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// Restarts the server on the same ports and data dir.
    pub fn restart(&mut self) {
        self.kill();
        self.launch(&[]);
    }

    /// The server's process ID.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("server running").id()
    }

    /// The server's resident memory in bytes, from /proc.
    pub fn rss_bytes(&self) -> u64 {
        rss_of(self.pid())
    }

    /// What the server logged.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The resident memory of process `pid` in bytes, from /proc.
pub fn rss_of(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc status");
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| {
            rest.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
        .expect("VmRSS in /proc status")
        * 1024
}

/// stdout and stderr of an etcdctl run, without etcdctl's own retry log lines.
pub fn text(output: &Output) -> String {
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let stderr: Vec<&str> = stderr
        .lines()
        .filter(|line| !line.starts_with("{\"level\""))
        .collect();
    format!(
        "{}{}exit={}",
        stdout,
        if stderr.is_empty() {
            String::new()
        } else {
            stderr.join("\n") + "\n"
        },
        output.status.code().unwrap_or(-1)
    )
}

/// Fields whose values differ between any two clusters, never between behaviours.
pub const MEMBER_SPECIFIC: &[&str] = &[
    "cluster_id",
    "member_id",
    "raft_term",
    "leader",
    "raftIndex",
    "raftTerm",
    "raftAppliedIndex",
    "dbSize",
    "dbSizeInUse",
    "Endpoint",
    "ID",
    "peerURLs",
    "clientURLs",
];

/// The server's version, blanked only where a Status carries it: a key's `version`
/// (how many times it was put) is behaviour and must match.
const SERVER_VERSION: &str = "version";

/// Table columns that differ between any two clusters (`endpoint status` and
/// `member list` tables); every other column must match.
const MEMBER_SPECIFIC_COLUMNS: &[&str] = &[
    "ENDPOINT",
    "ID",
    "VERSION",
    "DB SIZE",
    "RAFT TERM",
    "RAFT INDEX",
    "RAFT APPLIED INDEX",
    "PEER ADDRS",
    "CLIENT ADDRS",
];

pub fn normalize_json(value: &mut Value) {
    match value {
        Value::Object(map) => {
            // A Status response (alone, or inside `endpoint status -w json`).
            let is_status = map.contains_key("dbSize") || map.contains_key("raftIndex");
            for (key, field) in map.iter_mut() {
                if MEMBER_SPECIFIC.contains(&key.as_str()) || (is_status && key == SERVER_VERSION) {
                    *field = Value::String("<normalized>".into());
                } else {
                    normalize_json(field);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(normalize_json),
        _ => {}
    }
}

/// The cells of a table row (`| a | b |`), trimmed.
fn table_cells(line: &str) -> Vec<String> {
    line.trim()
        .trim_matches('|')
        .split('|')
        .map(|cell| cell.trim().to_string())
        .collect()
}

pub fn normalize(output: &str, servers: &[&Server]) -> String {
    let mut output = output.to_string();
    for server in servers {
        output = output.replace(&server.endpoint(), "<endpoint>");
    }
    // The header of the table being read: which columns to blank.
    let mut header: Option<Vec<String>> = None;
    output
        .lines()
        .map(|line| {
            if let Ok(mut json) = serde_json::from_str::<Value>(line) {
                if json.is_object() || json.is_array() {
                    normalize_json(&mut json);
                    return json.to_string();
                }
            }
            if let Some((before, _)) = line.split_once("took =") {
                return format!("{before}took = <duration>");
            }
            // Table borders: their widths follow the cells' lengths.
            if line.starts_with('+') && line.trim_end().ends_with('+') {
                return "<border>".to_string();
            }
            if line.starts_with('|') {
                let cells = table_cells(line);
                let Some(columns) = &header else {
                    header = Some(cells.clone());
                    return cells.join(" | ");
                };
                return columns
                    .iter()
                    .zip(cells.iter())
                    .map(|(column, cell)| {
                        if MEMBER_SPECIFIC_COLUMNS.contains(&column.as_str()) {
                            "<normalized>"
                        } else {
                            cell.as_str()
                        }
                    })
                    .collect::<Vec<_>>()
                    .join(" | ");
            }
            header = None;
            // `member list` rows carry IDs and URLs.
            if line.contains(", ") && line.contains("http://") {
                return "<member row>".to_string();
            }
            line.to_string()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// A long-running etcdctl (watch, lease keep-alive, lock, elect) whose output is read
/// while it runs.
pub struct Background {
    child: Child,
    lines: std::sync::mpsc::Receiver<String>,
    stderr: std::sync::Arc<std::sync::Mutex<String>>,
    /// The process's stdin, when asked for.
    pub stdin: Option<std::process::ChildStdin>,
    /// Lines read so far.
    pub seen: Vec<String>,
}

impl Server {
    /// Starts etcdctl against this server in the background.
    pub fn etcdctl_background(&self, args: &[&str], with_stdin: bool) -> Background {
        background(
            Command::new(ETCDCTL)
                .env("ETCDCTL_API", "3")
                .arg(format!("--endpoints={}", self.endpoint()))
                .args(args),
            with_stdin,
        )
    }
}

/// Starts `command` with its output read in the background.
pub fn background(command: &mut Command, with_stdin: bool) -> Background {
    require(ETCDCTL);
    let mut child = command
        .stdin(if with_stdin {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn background process");
    let (sender, lines) = std::sync::mpsc::channel();
    let stdout = child.stdout.take().expect("stdout");
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if sender.send(line).is_err() {
                return;
            }
        }
    });
    let stderr = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let stderr_pipe = child.stderr.take().expect("stderr");
    let collected = stderr.clone();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr_pipe).lines() {
            let Ok(line) = line else { return };
            if !line.starts_with("{\"level\"") {
                let mut text = collected.lock().unwrap();
                text.push_str(&line);
                text.push('\n');
            }
        }
    });
    Background {
        stdin: child.stdin.take(),
        child,
        lines,
        stderr,
        seen: Vec::new(),
    }
}

impl Background {
    /// Reads lines until none arrived for `quiet` (or `limit` passed); returns them.
    pub fn read_until_quiet(&mut self, quiet: Duration, limit: Duration) -> Vec<String> {
        let deadline = Instant::now() + limit;
        let mut read = Vec::new();
        while Instant::now() < deadline {
            match self.lines.recv_timeout(quiet) {
                Ok(line) => read.push(line),
                Err(_) => break,
            }
        }
        self.seen.extend(read.iter().cloned());
        read
    }

    /// Waits for a line satisfying `wanted`; returns it.
    pub fn wait_for(&mut self, timeout: Duration, wanted: impl Fn(&str) -> bool) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.checked_duration_since(Instant::now())?;
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if wanted(&line) {
                        return Some(line);
                    }
                }
                Err(_) => return None,
            }
        }
    }

    /// The process ID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGKILL.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Closes stdin, waits up to `timeout` for the exit (then kills); returns every
    /// stdout line, stderr and the exit code as [`text`] formats them.
    pub fn finish(mut self, timeout: Duration) -> String {
        self.stdin.take();
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                break status.code().unwrap_or(-1);
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                break -9;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        // Give the reader threads a moment to drain the pipes.
        self.read_until_quiet(Duration::from_millis(200), Duration::from_secs(2));
        let mut out = String::new();
        for line in &self.seen {
            out.push_str(line);
            out.push('\n');
        }
        out.push_str(&self.stderr.lock().unwrap());
        format!("{out}exit={status}")
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A cluster of kvstore (or etcd) members on loopback, each in its own temp dir.
pub struct Cluster {
    pub members: Vec<Member>,
    pub token: String,
    pub kind: Kind,
    extra: Vec<String>,
    _dir: tempfile::TempDir,
}

/// One member of a [`Cluster`].
pub struct Member {
    pub name: String,
    pub client_port: u16,
    pub peer_port: u16,
    pub data_dir: PathBuf,
    pub log: PathBuf,
    child: Option<Child>,
}

impl Member {
    /// A member not started yet.
    pub fn new(
        name: &str,
        client_port: u16,
        peer_port: u16,
        data_dir: PathBuf,
        log: PathBuf,
    ) -> Member {
        Member {
            name: name.to_string(),
            client_port,
            peer_port,
            data_dir,
            log,
            child: None,
        }
    }

    pub fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.client_port)
    }
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }
    pub fn peer_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.peer_port)
    }
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }
    /// What the member logged.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
    /// A gRPC channel to this member.
    pub async fn channel(&self) -> tonic::transport::Channel {
        connect(self.url()).await
    }
}

impl Cluster {
    /// Starts `size` members with `--initial-cluster-state new` and `token`.
    pub fn start(kind: Kind, size: usize, token: &str, extra: &[&str]) -> Cluster {
        let mut cluster = Cluster::unstarted(kind, size, token);
        cluster.extra = extra.iter().map(|s| s.to_string()).collect();
        let initial = cluster.initial_cluster();
        for index in 0..size {
            cluster.launch(index, &initial, "new");
        }
        cluster.wait_healthy(Duration::from_secs(30));
        cluster
    }

    /// Starts `size` members whose `--initial-cluster` also names a member at
    /// `foreign_peer_url` that is not started (it belongs to another cluster).
    pub fn start_partial(kind: Kind, size: usize, token: &str, foreign_peer_url: &str) -> Cluster {
        let mut cluster = Cluster::unstarted(kind, size, token);
        let initial = format!("{},foreign={foreign_peer_url}", cluster.initial_cluster());
        for index in 0..size {
            cluster.launch(index, &initial, "new");
        }
        cluster
    }

    /// `--initial-cluster` for the current members.
    pub fn initial_cluster(&self) -> String {
        self.members
            .iter()
            .map(|m| format!("{}={}", m.name, m.peer_url()))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Starts member `index` (again) with `initial_cluster` and `state`.
    pub fn launch(&mut self, index: usize, initial_cluster: &str, state: &str) {
        let bootstrap = [
            format!("--initial-cluster={initial_cluster}"),
            format!("--initial-cluster-state={state}"),
        ];
        self.launch_with(index, &bootstrap);
    }

    /// Members on fresh ports and data dirs, not started yet.
    pub fn unstarted(kind: Kind, size: usize, token: &str) -> Cluster {
        let dir = tempfile::tempdir().expect("temp dir");
        let members = (0..size)
            .map(|index| Member {
                name: format!("m{index}"),
                client_port: free_port(),
                peer_port: free_port(),
                data_dir: dir.path().join(format!("m{index}")),
                log: dir.path().join(format!("m{index}.log")),
                child: None,
            })
            .collect();
        Cluster {
            members,
            token: token.to_string(),
            kind,
            extra: Vec::new(),
            _dir: dir,
        }
    }

    /// Whether member `index` exited, and with what code.
    pub fn exit_code(&mut self, index: usize) -> Option<i32> {
        let child = self.members[index].child.as_mut()?;
        child
            .try_wait()
            .ok()
            .flatten()
            .map(|status| status.code().unwrap_or(-1))
    }

    /// Starts member `index` with these bootstrap flags.
    pub fn launch_with(&mut self, index: usize, bootstrap: &[String]) {
        let member = &mut self.members[index];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&member.log)
            .expect("log file");
        let mut command = Command::new(Server::binary(self.kind));
        command
            .arg(format!("--name={}", member.name))
            .arg(format!("--data-dir={}", member.data_dir.display()))
            .arg(format!("--listen-client-urls={}", member.url()))
            .arg(format!("--advertise-client-urls={}", member.url()))
            .arg(format!("--listen-peer-urls={}", member.peer_url()))
            .arg(format!(
                "--initial-advertise-peer-urls={}",
                member.peer_url()
            ))
            .args(bootstrap)
            .arg(format!("--initial-cluster-token={}", self.token))
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file"))
            .stderr(log);
        if self.kind == Kind::Etcd {
            command.env("ETCD_UNSUPPORTED_ARCH", std::env::consts::ARCH);
        }
        member.child = Some(command.spawn().expect("spawn member"));
    }

    /// Restarts member `index` with its data dir.
    pub fn restart(&mut self, index: usize) {
        self.kill(index);
        let initial = self.initial_cluster();
        self.launch(index, &initial, "new");
    }

    /// SIGKILLs member `index`.
    pub fn kill(&mut self, index: usize) {
        if let Some(mut child) = self.members[index].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERMs every running member at once and waits for them: their exit codes.
    pub fn terminate_all(&mut self) -> Vec<Option<i32>> {
        for member in &self.members {
            if let Some(child) = &member.child {
                let _ = Command::new("kill")
                    .args(["-TERM", &child.id().to_string()])
                    .status();
            }
        }
        self.members
            .iter_mut()
            .filter_map(|member| member.child.take())
            .map(|mut child| child.wait().ok().and_then(|status| status.code()))
            .collect()
    }

    /// Runs etcdctl against member `index`.
    pub fn etcdctl(&self, index: usize, args: &[&str]) -> Output {
        Command::new(ETCDCTL)
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", self.members[index].endpoint()))
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run etcdctl")
    }

    /// Every running member's endpoint, comma separated.
    pub fn endpoints(&self) -> String {
        self.members
            .iter()
            .filter(|m| m.is_running())
            .map(Member::endpoint)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Waits until every running member answers a linearizable read.
    pub fn wait_healthy(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        for (index, member) in self.members.iter().enumerate() {
            if !member.is_running() {
                continue;
            }
            loop {
                let output = self.etcdctl(index, &["--command-timeout=2s", "endpoint", "health"]);
                if output.status.success() {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "member {} did not become healthy: {}\nlog:\n{}",
                    member.name,
                    text(&output),
                    member.log_text()
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }

    /// The status of member `index` as `endpoint status -w json` reports it.
    pub fn status(&self, index: usize) -> Option<Value> {
        let output = self.etcdctl(
            index,
            &["--command-timeout=1s", "endpoint", "status", "-w", "json"],
        );
        if !output.status.success() {
            return None;
        }
        let json: Value = serde_json::from_slice(&output.stdout).ok()?;
        json.as_array()?
            .first()
            .map(|entry| entry["Status"].clone())
    }

    /// The index of the member that leads, as the running members see it.
    pub fn leader(&self) -> Option<usize> {
        for (index, member) in self.members.iter().enumerate() {
            if !member.is_running() {
                continue;
            }
            let Some(status) = self.status(index) else {
                continue;
            };
            let leader = status["leader"].as_u64()?;
            let own = status["header"]["member_id"].as_u64()?;
            if leader == own {
                return Some(index);
            }
        }
        None
    }

    /// Waits for a leader among the running members.
    pub fn wait_leader(&self, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(leader) = self.leader() {
                return leader;
            }
            assert!(Instant::now() < deadline, "no leader within {timeout:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for index in 0..self.members.len() {
            self.kill(index);
        }
    }
}

/// A plain HTTP/1.0 GET on loopback: (status code, body).
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, body.to_string()))
}

/// A plain HTTP/1.0 POST on loopback: (status code, body).
pub fn http_post(port: u16, path: &str, body: &[u8]) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .ok()?;
    write!(
        stream,
        "POST {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .ok()?;
    stream.write_all(body).ok()?;
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    let response = String::from_utf8_lossy(&response).to_string();
    let (head, body) = response.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, body.to_string()))
}

/// How many keys start with `prefix` (a linearizable count-only range), and the
/// revision it was read at.
pub async fn prefix_count(channel: tonic::transport::Channel, prefix: &str) -> (usize, i64) {
    let mut end = prefix.as_bytes().to_vec();
    *end.last_mut().expect("a prefix") += 1;
    let response = kvstore::pb::etcdserverpb::kv_client::KvClient::new(channel)
        .range(kvstore::pb::etcdserverpb::RangeRequest {
            key: prefix.as_bytes().to_vec(),
            range_end: end,
            count_only: true,
            ..Default::default()
        })
        .await
        .expect("count range")
        .into_inner();
    let revision = response.header.map_or(0, |header| header.revision);
    (response.count as usize, revision)
}
