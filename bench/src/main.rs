//! kvbench: load for any etcd v3 endpoint (kvstore or etcd), measured the same way.
//! Each workload prints a table, or one JSON object with `--json`: operations,
//! errors, throughput and latency percentiles. A progress bar goes to stderr when it
//! is a terminal.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use connect::{Conn, Token};
use etcd_api::etcdserverpb::kv_client::KvClient;
use etcd_api::etcdserverpb::lease_client::LeaseClient;
use etcd_api::etcdserverpb::request_op::Request as Op;
use etcd_api::etcdserverpb::watch_client::WatchClient;
use etcd_api::etcdserverpb::watch_request::RequestUnion;
use etcd_api::etcdserverpb::{
    LeaseGrantRequest, LeaseKeepAliveRequest, PutRequest, RangeRequest, RequestOp, TxnRequest,
    WatchCreateRequest, WatchRequest,
};
use serde::Serialize;

mod connect;
mod null_server;

#[derive(Parser)]
#[command(
    name = "kvbench",
    version,
    about = "Load generator for etcd-compatible servers"
)]
struct Cli {
    #[command(flatten)]
    common: Common,
    #[command(subcommand)]
    workload: Workload,
}

#[derive(Args)]
struct Common {
    /// Client endpoints, comma separated (host:port or URLs); connections go round robin.
    #[arg(
        long,
        global = true,
        default_value = "127.0.0.1:2379",
        value_delimiter = ','
    )]
    endpoints: Vec<String>,
    /// gRPC connections to open.
    #[arg(long, global = true, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    conns: u64,
    /// Concurrent clients (requests in flight or streams).
    #[arg(long, global = true, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    clients: u64,
    /// Print one JSON object instead of a table.
    #[arg(long, global = true)]
    json: bool,
    #[command(flatten)]
    dial: connect::Dial,
    #[command(flatten)]
    security: connect::Security,
}

/// How much load a request workload sends.
#[derive(Args, Clone, Copy)]
struct Load {
    /// Requests in all (unless --duration is given).
    #[arg(long, default_value_t = 10_000)]
    total: u64,
    /// Run for this many seconds instead of --total requests.
    #[arg(long)]
    duration: Option<f64>,
    /// Requests per second across all clients (0: as fast as they answer).
    #[arg(long, default_value_t = 0)]
    rate: u64,
}

/// Keys written by put and txn-put.
#[derive(Args, Clone, Copy)]
struct Keys {
    /// Key size in bytes.
    #[arg(long, default_value_t = 8)]
    key_size: usize,
    /// Value size in bytes.
    #[arg(long, default_value_t = 8)]
    val_size: usize,
    /// Distinct keys written.
    #[arg(long, default_value_t = 10_000)]
    key_space: u64,
    /// Write keys in order instead of at random in the key space.
    #[arg(long)]
    sequential_keys: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum Consistency {
    /// Linearizable: confirmed with the leader.
    L,
    /// Serializable: served by the member asked.
    S,
}

#[derive(Subcommand)]
enum Workload {
    /// Puts.
    Put {
        #[command(flatten)]
        load: Load,
        #[command(flatten)]
        keys: Keys,
    },
    /// Gets of one key (written first with a value of --val-size bytes).
    Range {
        #[command(flatten)]
        load: Load,
        /// The key read (--key is the TLS key, as in etcdctl).
        #[arg(long, default_value = "kvbench/range")]
        range_key: String,
        /// Value size of the key read.
        #[arg(long, default_value_t = 8)]
        val_size: usize,
        /// l (linearizable) or s (serializable).
        #[arg(long, value_enum, default_value = "l")]
        consistency: Consistency,
    },
    /// Transactions of --txn-ops puts each.
    TxnPut {
        #[command(flatten)]
        load: Load,
        #[command(flatten)]
        keys: Keys,
        /// Puts per transaction.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
        txn_ops: u64,
    },
    /// Watch event latency: --watchers watchers of one key over --streams streams;
    /// one writer puts the send time into the key --puts times at --put-rate per
    /// second, and every delivery is timed.
    #[command(alias = "watch-latency")]
    Watch {
        /// Watchers in all.
        #[arg(long, default_value_t = 1000)]
        watchers: u64,
        /// Watch streams the watchers share (default: one each).
        #[arg(long)]
        streams: Option<u64>,
        /// Puts in all.
        #[arg(long, default_value_t = 200)]
        puts: u64,
        /// Puts per second.
        #[arg(long, alias = "rate", default_value_t = 100)]
        put_rate: u64,
    },
    /// Lease keep-alives: --clients streams each renew their own lease in a loop.
    LeaseKeepalive {
        #[command(flatten)]
        load: Load,
    },
    /// Serves a KV API that stores nothing, until stopped: Put, DeleteRange, Txn and
    /// Compact succeed at once and Range finds nothing. Writes from a workload (or
    /// etcdctl) against it measure the client's and gRPC's own cost on this
    /// machine, the ceiling for a server built on the same transport.
    NullServer {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:2379")]
        listen: std::net::SocketAddr,
        /// Make puts durable the least a server can: append each to this file and
        /// acknowledge it after one fdatasync per group of puts (group commit).
        #[arg(long, value_name = "FILE")]
        fsync_file: Option<std::path::PathBuf>,
    },
}

/// What a workload measured.
#[derive(Serialize)]
struct Report {
    workload: &'static str,
    operations: u64,
    errors: u64,
    seconds: f64,
    per_second: f64,
    latency_ms: Percentiles,
}

#[derive(Serialize)]
struct Percentiles {
    p50: f64,
    p90: f64,
    p99: f64,
    p999: f64,
    max: f64,
}

fn percentiles(mut samples: Vec<Duration>) -> Percentiles {
    samples.sort_unstable();
    let at = |q: f64| -> f64 {
        if samples.is_empty() {
            return 0.0;
        }
        let index = ((samples.len() as f64 * q).ceil() as usize).clamp(1, samples.len()) - 1;
        samples[index].as_secs_f64() * 1000.0
    };
    Percentiles {
        p50: at(0.50),
        p90: at(0.90),
        p99: at(0.99),
        p999: at(0.999),
        max: at(1.0),
    }
}

async fn connect(common: &Common) -> Result<(Vec<Conn>, Token)> {
    connect::connect(
        &common.endpoints,
        common.conns as usize,
        &common.dial,
        &common.security,
    )
    .await
}

fn padded(number: u64, size: usize) -> Vec<u8> {
    let mut text = format!("{number:0size$}").into_bytes();
    text.truncate(size.max(1));
    text
}

/// A small, fast generator for random keys (xorshift64*), seeded per client.
struct Random(u64);

impl Random {
    fn new(seed: u64) -> Random {
        Random(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

impl Keys {
    fn key(&self, number: u64, random: &mut Random) -> Vec<u8> {
        let space = self.key_space.max(1);
        let index = if self.sequential_keys {
            number % space
        } else {
            random.next() % space
        };
        padded(index, self.key_size)
    }
}

/// Hands out request numbers to clients: up to `total`, or until the duration is
/// over; with a rate, each number is released at its time.
struct Pacer {
    next: AtomicU64,
    total: u64,
    until: Option<Instant>,
    started: Instant,
    rate: u64,
    done: AtomicU64,
    stop: AtomicBool,
}

impl Pacer {
    fn new(load: Load) -> Arc<Pacer> {
        let started = Instant::now();
        Arc::new(Pacer {
            next: AtomicU64::new(0),
            total: if load.duration.is_some() {
                u64::MAX
            } else {
                load.total
            },
            until: load
                .duration
                .map(|seconds| started + Duration::from_secs_f64(seconds.max(0.0))),
            started,
            rate: load.rate,
            done: AtomicU64::new(0),
            stop: AtomicBool::new(false),
        })
    }

    /// The next request number, when it is due; None when the run is over.
    async fn take(&self) -> Option<u64> {
        if self.stop.load(Ordering::Relaxed) {
            return None;
        }
        let number = self.next.fetch_add(1, Ordering::Relaxed);
        if number >= self.total {
            return None;
        }
        if self.rate > 0 {
            let due = self.started + Duration::from_secs_f64(number as f64 / self.rate as f64);
            if self.until.is_some_and(|until| due >= until) {
                return None;
            }
            tokio::time::sleep_until(due.into()).await;
        }
        if self.until.is_some_and(|until| Instant::now() >= until) {
            return None;
        }
        Some(number)
    }

    fn finished_one(&self) {
        self.done.fetch_add(1, Ordering::Relaxed);
    }

    /// Progress on stderr, once a second, while the run goes on (a terminal only).
    fn show_progress(self: &Arc<Pacer>) -> Option<tokio::task::JoinHandle<()>> {
        if !std::io::stderr().is_terminal() {
            return None;
        }
        let pacer = self.clone();
        Some(tokio::spawn(async move {
            let mut ticker = tokio::time::interval(Duration::from_secs(1));
            ticker.tick().await;
            loop {
                ticker.tick().await;
                let done = pacer.done.load(Ordering::Relaxed);
                let elapsed = pacer.started.elapsed().as_secs_f64();
                let share = match pacer.until {
                    Some(until) => {
                        elapsed / (until - pacer.started).as_secs_f64().max(f64::EPSILON)
                    }
                    None => done as f64 / pacer.total.max(1) as f64,
                }
                .min(1.0);
                let filled = (share * 40.0) as usize;
                eprint!(
                    "\r[{}{}] {:>3.0}% {done} ops, {:.0} ops/s ",
                    "=".repeat(filled),
                    " ".repeat(40 - filled),
                    share * 100.0,
                    done as f64 / elapsed.max(f64::EPSILON)
                );
            }
        }))
    }
}

/// Runs `clients` request loops: each takes request numbers from the pacer and
/// times `request(client, number)`. Errors are counted, not timed. A request whose
/// token is refused is sent again once with a renewed token, timed from the first
/// send.
async fn run_requests<F, Fut>(
    common: &Common,
    load: Load,
    token: Token,
    workload: &'static str,
    request: F,
) -> Result<Report>
where
    F: Fn(usize, u64, &mut Random) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<(), tonic::Status>> + Send,
{
    let pacer = Pacer::new(load);
    let request = Arc::new(request);
    let errors = Arc::new(AtomicU64::new(0));
    let first_error = Arc::new(std::sync::Mutex::new(None::<String>));
    let progress = pacer.show_progress();
    let mut clients = Vec::new();
    for client in 0..common.clients as usize {
        let pacer = pacer.clone();
        let request = request.clone();
        let errors = errors.clone();
        let first_error = first_error.clone();
        let token = token.clone();
        clients.push(tokio::spawn(async move {
            let mut random = Random::new(client as u64 + 1);
            let mut samples = Vec::new();
            while let Some(number) = pacer.take().await {
                let sent = Instant::now();
                match token.retried(|| request(client, number, &mut random)).await {
                    Ok(()) => samples.push(sent.elapsed()),
                    Err(status) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        first_error
                            .lock()
                            .expect("lock")
                            .get_or_insert_with(|| status.to_string());
                    }
                }
                pacer.finished_one();
            }
            samples
        }));
    }
    let mut samples = Vec::new();
    for client in clients {
        samples.extend(client.await?);
    }
    let elapsed = pacer.started.elapsed();
    if let Some(progress) = progress {
        progress.abort();
        eprintln!();
    }
    let errors = errors.load(Ordering::Relaxed);
    if samples.is_empty() && errors > 0 {
        bail!(
            "every request failed: {}",
            first_error
                .lock()
                .expect("lock")
                .clone()
                .unwrap_or_default()
        );
    }
    if let Some(error) = first_error.lock().expect("lock").as_ref() {
        eprintln!("kvbench: {errors} requests failed; the first: {error}");
    }
    let mut report = report(workload, samples, elapsed);
    report.errors = errors;
    Ok(report)
}

async fn put(common: &Common, load: Load, keys: Keys) -> Result<Report> {
    let (channels, token) = connect(common).await?;
    let kvs: Vec<KvClient<Conn>> = channels.into_iter().map(KvClient::new).collect();
    let value = vec![b'v'; keys.val_size];
    run_requests(common, load, token, "put", move |client, number, random| {
        let mut kv = kvs[client % kvs.len()].clone();
        let request = PutRequest {
            key: keys.key(number, random),
            value: value.clone(),
            ..Default::default()
        };
        async move { kv.put(request).await.map(drop) }
    })
    .await
}

async fn range(
    common: &Common,
    load: Load,
    key: String,
    val_size: usize,
    consistency: Consistency,
) -> Result<Report> {
    let (channels, token) = connect(common).await?;
    let mut kvs: Vec<KvClient<Conn>> = channels.into_iter().map(KvClient::new).collect();
    kvs[0]
        .put(PutRequest {
            key: key.clone().into_bytes(),
            value: vec![b'v'; val_size],
            ..Default::default()
        })
        .await
        .context("writing the key to read")?;
    let serializable = matches!(consistency, Consistency::S);
    let workload = if serializable { "range-s" } else { "range-l" };
    run_requests(common, load, token, workload, move |client, _, _| {
        let mut kv = kvs[client % kvs.len()].clone();
        let request = RangeRequest {
            key: key.clone().into_bytes(),
            serializable,
            ..Default::default()
        };
        async move {
            let response = kv.range(request).await?.into_inner();
            if response.kvs.is_empty() {
                return Err(tonic::Status::not_found("the key read is gone"));
            }
            Ok(())
        }
    })
    .await
}

async fn txn_put(common: &Common, load: Load, keys: Keys, txn_ops: u64) -> Result<Report> {
    let (channels, token) = connect(common).await?;
    let kvs: Vec<KvClient<Conn>> = channels.into_iter().map(KvClient::new).collect();
    let value = vec![b'v'; keys.val_size];
    run_requests(
        common,
        load,
        token,
        "txn-put",
        move |client, number, random| {
            let mut kv = kvs[client % kvs.len()].clone();
            let mut seen = std::collections::HashSet::new();
            let success = (0..txn_ops)
                .map(|op| keys.key(number * txn_ops + op, random))
                // A txn may not put one key twice.
                .filter(|key| seen.insert(key.clone()))
                .map(|key| RequestOp {
                    request: Some(Op::RequestPut(PutRequest {
                        key,
                        value: value.clone(),
                        ..Default::default()
                    })),
                })
                .collect();
            let request = TxnRequest {
                success,
                ..Default::default()
            };
            async move { kv.txn(request).await.map(drop) }
        },
    )
    .await
}

fn report(workload: &'static str, samples: Vec<Duration>, elapsed: Duration) -> Report {
    let operations = samples.len() as u64;
    Report {
        workload,
        operations,
        errors: 0,
        seconds: elapsed.as_secs_f64(),
        per_second: operations as f64 / elapsed.as_secs_f64(),
        latency_ms: percentiles(samples),
    }
}

async fn watch(
    common: &Common,
    watchers: u64,
    streams: Option<u64>,
    puts: u64,
    put_rate: u64,
) -> Result<Report> {
    let (channels, token) = connect(common).await?;
    let key = b"kvbench/watch-latency".to_vec();
    let base = Instant::now();
    let streams = streams.unwrap_or(watchers).clamp(1, watchers.max(1));
    let mut readers = Vec::new();
    let mut senders = Vec::new();
    for stream_index in 0..streams as usize {
        // Watchers are spread evenly over the streams.
        let on_stream = watchers / streams + u64::from((stream_index as u64) < watchers % streams);
        let (sender, receiver) = tokio::sync::mpsc::channel(on_stream.max(1) as usize);
        // etcd answers a stream's headers with its first message: the requests go
        // out before the call is awaited.
        for _ in 0..on_stream {
            sender
                .send(WatchRequest {
                    request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
                        key: key.clone(),
                        ..Default::default()
                    })),
                })
                .await?;
        }
        let mut stream = WatchClient::new(channels[stream_index % channels.len()].clone())
            .watch(tokio_stream::wrappers::ReceiverStream::new(receiver))
            .await?
            .into_inner();
        for _ in 0..on_stream {
            let created = stream.message().await?.context("watch stream ended")?;
            if !created.created || created.canceled {
                bail!("watch not created: {}", created.cancel_reason);
            }
        }
        senders.push(sender);
        let expected = puts * on_stream;
        readers.push(tokio::spawn(async move {
            let mut samples = Vec::with_capacity(expected as usize);
            while (samples.len() as u64) < expected {
                let Some(response) = stream.message().await? else {
                    break;
                };
                let now = base.elapsed();
                for event in response.events {
                    let Some(kv) = event.kv else { continue };
                    let sent: u64 = std::str::from_utf8(&kv.value)
                        .ok()
                        .and_then(|text| text.parse().ok())
                        .unwrap_or(0);
                    samples.push(now.saturating_sub(Duration::from_nanos(sent)));
                }
            }
            Ok::<_, tonic::Status>(samples)
        }));
    }
    let kv = KvClient::new(channels[0].clone());
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / put_rate.max(1) as f64));
    let started = Instant::now();
    for _ in 0..puts {
        ticker.tick().await;
        let sent = base.elapsed().as_nanos() as u64;
        let put = PutRequest {
            key: key.clone(),
            value: sent.to_string().into_bytes(),
            ..Default::default()
        };
        token
            .retried(|| {
                let (mut kv, put) = (kv.clone(), put.clone());
                async move { kv.put(put).await }
            })
            .await?;
    }
    let mut samples = Vec::new();
    for reader in readers {
        samples.extend(
            tokio::time::timeout(Duration::from_secs(60), reader)
                .await
                .context("watchers did not receive every event within 60 s")???,
        );
    }
    drop(senders);
    Ok(report("watch", samples, started.elapsed()))
}

async fn lease_keepalive(common: &Common, load: Load) -> Result<Report> {
    let (channels, token) = connect(common).await?;
    let pacer = Pacer::new(load);
    let progress = pacer.show_progress();
    let mut clients = Vec::new();
    let mut streams = Vec::new();
    for client in 0..common.clients as usize {
        let channel = channels[client % channels.len()].clone();
        let leases = LeaseClient::new(channel.clone());
        let id = token
            .retried(|| {
                let mut leases = leases.clone();
                async move {
                    leases
                        .lease_grant(LeaseGrantRequest { ttl: 600, id: 0 })
                        .await
                }
            })
            .await?
            .into_inner()
            .id;
        let (sender, receiver) = tokio::sync::mpsc::channel(1);
        // etcd answers a stream's headers with its first message: one keep-alive
        // goes out before the call is awaited, and its answer is not timed.
        sender.send(LeaseKeepAliveRequest { id }).await?;
        let mut responses = LeaseClient::new(channel)
            .lease_keep_alive(tokio_stream::wrappers::ReceiverStream::new(receiver))
            .await?
            .into_inner();
        responses
            .message()
            .await?
            .context("keep-alive stream ended")?;
        streams.push((id, sender, responses));
    }
    for (id, sender, mut responses) in streams {
        let pacer = pacer.clone();
        clients.push(tokio::spawn(async move {
            let mut samples = Vec::new();
            while pacer.take().await.is_some() {
                let sent = Instant::now();
                if sender.send(LeaseKeepAliveRequest { id }).await.is_err() {
                    break;
                }
                let Some(response) = responses.message().await? else {
                    break;
                };
                if response.ttl <= 0 {
                    return Err(tonic::Status::not_found(format!("lease {id:x} expired")));
                }
                samples.push(sent.elapsed());
                pacer.finished_one();
            }
            Ok(samples)
        }));
    }
    let mut samples = Vec::new();
    for client in clients {
        samples.extend(client.await??);
    }
    if let Some(progress) = progress {
        progress.abort();
        eprintln!();
    }
    Ok(report("lease-keepalive", samples, pacer.started.elapsed()))
}

fn print(report: &Report, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string(report)?);
        return Ok(());
    }
    let l = &report.latency_ms;
    println!(
        "workload         ops       errors  seconds  ops/s      p50 ms  p90 ms  p99 ms  p99.9 ms  max ms"
    );
    println!(
        "{:<16} {:<9} {:<7} {:<8.2} {:<10.0} {:<7.3} {:<7.3} {:<7.3} {:<9.3} {:.3}",
        report.workload,
        report.operations,
        report.errors,
        report.seconds,
        report.per_second,
        l.p50,
        l.p90,
        l.p99,
        l.p999,
        l.max
    );
    Ok(())
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    let common = &cli.common;
    let result = match cli.workload {
        Workload::Put { load, keys } => put(common, load, keys).await,
        Workload::Range {
            load,
            range_key,
            val_size,
            consistency,
        } => range(common, load, range_key, val_size, consistency).await,
        Workload::TxnPut {
            load,
            keys,
            txn_ops,
        } => txn_put(common, load, keys, txn_ops).await,
        Workload::Watch {
            watchers,
            streams,
            puts,
            put_rate,
        } => watch(common, watchers, streams, puts, put_rate).await,
        Workload::LeaseKeepalive { load } => lease_keepalive(common, load).await,
        Workload::NullServer { listen, fsync_file } => {
            if let Err(error) = null_server::serve(listen, fsync_file.as_deref()).await {
                eprintln!("kvbench: {error:#}");
                std::process::exit(1);
            }
            return;
        }
    };
    match result.and_then(|report| print(&report, common.json)) {
        Ok(()) => {}
        Err(error) => {
            eprintln!("kvbench: {error:#}");
            std::process::exit(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_pick_nearest_ranks() {
        let samples: Vec<Duration> = (1..=1000).map(Duration::from_millis).collect();
        let p = percentiles(samples);
        assert_eq!(
            (p.p50, p.p90, p.p99, p.p999, p.max),
            (500.0, 900.0, 990.0, 999.0, 1000.0)
        );
        assert_eq!(percentiles(Vec::new()).max, 0.0);
    }

    #[test]
    fn keys_have_the_requested_size() {
        assert_eq!(padded(42, 8), b"00000042".to_vec());
        assert_eq!(padded(123_456, 3), b"123".to_vec());
    }

    #[test]
    fn random_keys_stay_in_the_key_space() {
        let keys = Keys {
            key_size: 8,
            val_size: 8,
            key_space: 100,
            sequential_keys: false,
        };
        let mut random = Random::new(1);
        let drawn: std::collections::HashSet<Vec<u8>> =
            (0..2_000).map(|n| keys.key(n, &mut random)).collect();
        assert!(drawn.len() > 90 && drawn.len() <= 100, "{}", drawn.len());
        let sequential = Keys {
            sequential_keys: true,
            ..keys
        };
        assert_eq!(sequential.key(105, &mut random), b"00000005".to_vec());
    }

    #[tokio::test]
    async fn the_pacer_stops_at_the_total_and_keeps_the_rate() {
        let pacer = Pacer::new(Load {
            total: 5,
            duration: None,
            rate: 0,
        });
        let mut taken = Vec::new();
        while let Some(number) = pacer.take().await {
            taken.push(number);
        }
        assert_eq!(taken, [0, 1, 2, 3, 4]);

        let started = Instant::now();
        let pacer = Pacer::new(Load {
            total: 21,
            duration: None,
            rate: 100,
        });
        while pacer.take().await.is_some() {}
        // The 21st request is due at 200 ms.
        assert!(started.elapsed() >= Duration::from_millis(195));

        let pacer = Pacer::new(Load {
            total: 10,
            duration: Some(0.05),
            rate: 100,
        });
        let mut count = 0;
        while pacer.take().await.is_some() {
            count += 1;
        }
        assert_eq!(count, 5);
    }
}
