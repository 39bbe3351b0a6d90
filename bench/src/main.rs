//! kvbench: load for any etcd v3 endpoint (kvstore or etcd), measured the same way.
//! Each workload prints a table, or one JSON object with `--json`: operations,
//! throughput and latency percentiles.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use kvstore::pb::etcdserverpb::kv_client::KvClient;
use kvstore::pb::etcdserverpb::lease_client::LeaseClient;
use kvstore::pb::etcdserverpb::watch_client::WatchClient;
use kvstore::pb::etcdserverpb::watch_request::RequestUnion;
use kvstore::pb::etcdserverpb::{
    LeaseGrantRequest, LeaseKeepAliveRequest, PutRequest, WatchCreateRequest, WatchRequest,
};
use serde::Serialize;
use tonic::transport::Channel;

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
}

#[derive(Subcommand)]
enum Workload {
    /// Puts: `--total` requests from `--clients` clients.
    Put {
        /// Requests in all.
        #[arg(long, default_value_t = 10_000)]
        total: u64,
        /// Key size in bytes.
        #[arg(long, default_value_t = 8)]
        key_size: usize,
        /// Value size in bytes.
        #[arg(long, default_value_t = 8)]
        val_size: usize,
        /// Distinct keys written (sequentially numbered).
        #[arg(long, default_value_t = 10_000)]
        key_space: u64,
    },
    /// Watch event latency: `--watchers` streams watch one key; one writer puts the
    /// send time into it `--puts` times at `--rate` per second; every delivery is timed.
    WatchLatency {
        /// Watch streams, spread over the connections.
        #[arg(long, default_value_t = 1000)]
        watchers: u64,
        /// Puts in all.
        #[arg(long, default_value_t = 200)]
        puts: u64,
        /// Puts per second.
        #[arg(long, default_value_t = 100)]
        rate: u64,
    },
    /// Lease keep-alives: `--clients` streams each renew their own lease in a loop.
    LeaseKeepalive {
        /// Keep-alives in all.
        #[arg(long, default_value_t = 100_000)]
        total: u64,
    },
}

/// What a workload measured.
#[derive(Serialize)]
struct Report {
    workload: &'static str,
    operations: u64,
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

async fn connect(common: &Common) -> Result<Vec<Channel>> {
    let mut channels = Vec::new();
    for index in 0..common.conns as usize {
        let endpoint = &common.endpoints[index % common.endpoints.len()];
        let url = if endpoint.contains("://") {
            endpoint.clone()
        } else {
            format!("http://{endpoint}")
        };
        let channel = Channel::from_shared(url.clone())
            .with_context(|| format!("bad endpoint {endpoint}"))?
            .tcp_nodelay(true)
            .connect()
            .await
            .with_context(|| format!("cannot connect to {url}"))?;
        channels.push(channel);
    }
    Ok(channels)
}

fn padded(number: u64, size: usize) -> Vec<u8> {
    let mut text = format!("{number:0size$}").into_bytes();
    text.truncate(size.max(1));
    text
}

async fn put(
    common: &Common,
    total: u64,
    key_size: usize,
    val_size: usize,
    key_space: u64,
) -> Result<Report> {
    let channels = connect(common).await?;
    let next = Arc::new(AtomicU64::new(0));
    let value = vec![b'v'; val_size];
    let started = Instant::now();
    let mut clients = Vec::new();
    for client in 0..common.clients as usize {
        let mut kv = KvClient::new(channels[client % channels.len()].clone());
        let next = next.clone();
        let value = value.clone();
        clients.push(tokio::spawn(async move {
            let mut samples = Vec::new();
            loop {
                let number = next.fetch_add(1, Ordering::Relaxed);
                if number >= total {
                    return Ok::<_, tonic::Status>(samples);
                }
                let request = PutRequest {
                    key: padded(number % key_space.max(1), key_size),
                    value: value.clone(),
                    ..Default::default()
                };
                let sent = Instant::now();
                kv.put(request).await?;
                samples.push(sent.elapsed());
            }
        }));
    }
    let mut samples = Vec::new();
    for client in clients {
        samples.extend(client.await??);
    }
    Ok(report("put", samples, started.elapsed()))
}

fn report(workload: &'static str, samples: Vec<Duration>, elapsed: Duration) -> Report {
    let operations = samples.len() as u64;
    Report {
        workload,
        operations,
        seconds: elapsed.as_secs_f64(),
        per_second: operations as f64 / elapsed.as_secs_f64(),
        latency_ms: percentiles(samples),
    }
}

async fn watch_latency(common: &Common, watchers: u64, puts: u64, rate: u64) -> Result<Report> {
    let channels = connect(common).await?;
    let key = b"kvbench/watch-latency".to_vec();
    let base = Instant::now();
    let mut readers = Vec::new();
    let mut senders = Vec::new();
    for watcher in 0..watchers as usize {
        let (sender, receiver) = tokio::sync::mpsc::channel(1);
        sender
            .send(WatchRequest {
                request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
                    key: key.clone(),
                    ..Default::default()
                })),
            })
            .await?;
        let mut stream = WatchClient::new(channels[watcher % channels.len()].clone())
            .watch(tokio_stream::wrappers::ReceiverStream::new(receiver))
            .await?
            .into_inner();
        let created = stream.message().await?.context("watch stream ended")?;
        if !created.created || created.canceled {
            bail!("watch not created: {}", created.cancel_reason);
        }
        senders.push(sender);
        readers.push(tokio::spawn(async move {
            let mut samples = Vec::with_capacity(puts as usize);
            while (samples.len() as u64) < puts {
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
    let mut kv = KvClient::new(channels[0].clone());
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / rate.max(1) as f64));
    let started = Instant::now();
    for _ in 0..puts {
        ticker.tick().await;
        let sent = base.elapsed().as_nanos() as u64;
        kv.put(PutRequest {
            key: key.clone(),
            value: sent.to_string().into_bytes(),
            ..Default::default()
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
    let elapsed = started.elapsed();
    let mut report = report("watch-latency", samples, elapsed);
    report.per_second = report.operations as f64 / elapsed.as_secs_f64();
    Ok(report)
}

async fn lease_keepalive(common: &Common, total: u64) -> Result<Report> {
    let channels = connect(common).await?;
    let next = Arc::new(AtomicU64::new(0));
    let mut clients = Vec::new();
    let mut streams = Vec::new();
    for client in 0..common.clients as usize {
        let channel = channels[client % channels.len()].clone();
        let id = LeaseClient::new(channel.clone())
            .lease_grant(LeaseGrantRequest { ttl: 600, id: 0 })
            .await?
            .into_inner()
            .id;
        let (sender, receiver) = tokio::sync::mpsc::channel(1);
        sender.send(LeaseKeepAliveRequest { id }).await?;
        let responses = LeaseClient::new(channel)
            .lease_keep_alive(tokio_stream::wrappers::ReceiverStream::new(receiver))
            .await?
            .into_inner();
        streams.push((id, sender, responses));
    }
    let started = Instant::now();
    for (id, sender, mut responses) in streams {
        let next = next.clone();
        clients.push(tokio::spawn(async move {
            let mut samples = Vec::new();
            // The first request was sent when the stream opened.
            let mut sent = Instant::now();
            loop {
                let response = responses.message().await?;
                let Some(response) = response else { break };
                if response.ttl <= 0 {
                    return Err(tonic::Status::not_found(format!("lease {id:x} expired")));
                }
                samples.push(sent.elapsed());
                if next.fetch_add(1, Ordering::Relaxed) >= total {
                    break;
                }
                sent = Instant::now();
                if sender.send(LeaseKeepAliveRequest { id }).await.is_err() {
                    break;
                }
            }
            Ok(samples)
        }));
    }
    let mut samples = Vec::new();
    for client in clients {
        samples.extend(client.await??);
    }
    Ok(report("lease-keepalive", samples, started.elapsed()))
}

fn print(report: &Report, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string(report)?);
        return Ok(());
    }
    let l = &report.latency_ms;
    println!("workload     ops      seconds  ops/s      p50 ms  p90 ms  p99 ms  p99.9 ms  max ms");
    println!(
        "{:<12} {:<8} {:<8.2} {:<10.0} {:<7.3} {:<7.3} {:<7.3} {:<9.3} {:.3}",
        report.workload,
        report.operations,
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
    let result = match cli.workload {
        Workload::Put {
            total,
            key_size,
            val_size,
            key_space,
        } => put(&cli.common, total, key_size, val_size, key_space).await,
        Workload::WatchLatency {
            watchers,
            puts,
            rate,
        } => watch_latency(&cli.common, watchers, puts, rate).await,
        Workload::LeaseKeepalive { total } => lease_keepalive(&cli.common, total).await,
    };
    match result.and_then(|report| print(&report, cli.common.json)) {
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
}
