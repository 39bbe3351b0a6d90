//! Prometheus metrics with etcd's names and meanings, so etcd's dashboards and
//! alerts work unchanged. Counters and histograms are updated where things happen;
//! gauges that mirror state (leader, sizes, keys, watchers) are read at scrape time.

use std::sync::LazyLock;

use prometheus::{
    exponential_buckets, Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter,
    IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Every metric of this process.
pub struct Metrics {
    registry: Registry,
    /// `etcd_server_has_leader`.
    pub has_leader: IntGauge,
    /// `etcd_server_is_leader`.
    pub is_leader: IntGauge,
    /// `etcd_server_leader_changes_seen_total`.
    pub leader_changes: IntCounter,
    /// `etcd_server_proposals_committed_total`.
    pub proposals_committed: IntCounter,
    /// `etcd_server_proposals_applied_total`.
    pub proposals_applied: IntCounter,
    /// `etcd_server_proposals_pending`.
    pub proposals_pending: IntGauge,
    /// `etcd_server_proposals_failed_total`.
    pub proposals_failed: IntCounter,
    /// `etcd_disk_wal_fsync_duration_seconds`.
    pub wal_fsync: Histogram,
    /// `etcd_disk_backend_commit_duration_seconds`.
    pub backend_commit: Histogram,
    /// `etcd_mvcc_db_total_size_in_bytes`.
    pub db_size: IntGauge,
    /// `etcd_mvcc_db_total_size_in_use_in_bytes`.
    pub db_size_in_use: IntGauge,
    /// `etcd_server_quota_backend_bytes`.
    pub quota: Gauge,
    /// `etcd_network_peer_round_trip_time_seconds`, by peer.
    pub peer_round_trip: HistogramVec,
    /// `etcd_debugging_mvcc_keys_total`.
    pub keys: IntGauge,
    /// `etcd_mvcc_watcher_total`.
    pub watchers: IntGauge,
    /// `etcd_server_version`.
    pub version: IntGaugeVec,
    /// `grpc_server_started_total`.
    pub grpc_started: IntCounterVec,
    /// `grpc_server_handled_total`.
    pub grpc_handled: IntCounterVec,
}

fn register<T: prometheus::core::Collector + Clone + 'static>(registry: &Registry, metric: T) -> T {
    registry
        .register(Box::new(metric.clone()))
        .expect("metric names are unique");
    metric
}

impl Metrics {
    fn new() -> Metrics {
        let registry = Registry::new();
        let gauge = |name: &str, help: &str| {
            register(&registry, IntGauge::new(name, help).expect("valid metric"))
        };
        let counter = |name: &str, help: &str| {
            register(
                &registry,
                IntCounter::new(name, help).expect("valid metric"),
            )
        };
        // etcd's disk histograms: 1 ms doubling to about 8 s.
        let disk = |name: &str, help: &str| {
            let opts = HistogramOpts::new(name, help)
                .buckets(exponential_buckets(0.001, 2.0, 14).expect("valid buckets"));
            register(&registry, Histogram::with_opts(opts).expect("valid metric"))
        };
        let grpc = ["grpc_type", "grpc_service", "grpc_method"];
        let metrics = Metrics {
            has_leader: gauge(
                "etcd_server_has_leader",
                "Whether or not a leader exists. 1 is existence, 0 is not.",
            ),
            is_leader: gauge(
                "etcd_server_is_leader",
                "Whether or not this member is a leader. 1 if is, 0 otherwise.",
            ),
            leader_changes: counter(
                "etcd_server_leader_changes_seen_total",
                "The number of leader changes seen.",
            ),
            proposals_committed: counter(
                "etcd_server_proposals_committed_total",
                "The total number of consensus proposals committed.",
            ),
            proposals_applied: counter(
                "etcd_server_proposals_applied_total",
                "The total number of consensus proposals applied.",
            ),
            proposals_pending: gauge(
                "etcd_server_proposals_pending",
                "The current number of pending proposals to commit.",
            ),
            proposals_failed: counter(
                "etcd_server_proposals_failed_total",
                "The total number of failed proposals seen.",
            ),
            wal_fsync: disk(
                "etcd_disk_wal_fsync_duration_seconds",
                "The latency distributions of fsync called by WAL.",
            ),
            backend_commit: disk(
                "etcd_disk_backend_commit_duration_seconds",
                "The latency distributions of commit called by backend.",
            ),
            db_size: gauge(
                "etcd_mvcc_db_total_size_in_bytes",
                "Total size of the underlying database physically allocated in bytes.",
            ),
            db_size_in_use: gauge(
                "etcd_mvcc_db_total_size_in_use_in_bytes",
                "Total size of the underlying database logically in use in bytes.",
            ),
            quota: register(
                &registry,
                Gauge::new(
                    "etcd_server_quota_backend_bytes",
                    "Current backend storage quota size in bytes.",
                )
                .expect("valid metric"),
            ),
            peer_round_trip: register(
                &registry,
                HistogramVec::new(
                    HistogramOpts::new(
                        "etcd_network_peer_round_trip_time_seconds",
                        "Round-Trip-Time histogram between peers",
                    )
                    .buckets(exponential_buckets(0.0001, 2.0, 14).expect("valid buckets")),
                    &["To"],
                )
                .expect("valid metric"),
            ),
            keys: gauge("etcd_debugging_mvcc_keys_total", "Total number of keys."),
            watchers: gauge(
                "etcd_mvcc_watcher_total",
                "Total number of watchers.",
            ),
            version: register(
                &registry,
                IntGaugeVec::new(
                    Opts::new(
                        "etcd_server_version",
                        "Which version is running. 1 for 'server_version' label with current version.",
                    ),
                    &["server_version"],
                )
                .expect("valid metric"),
            ),
            grpc_started: register(
                &registry,
                IntCounterVec::new(
                    Opts::new(
                        "grpc_server_started_total",
                        "Total number of RPCs started on the server.",
                    ),
                    &grpc,
                )
                .expect("valid metric"),
            ),
            grpc_handled: register(
                &registry,
                IntCounterVec::new(
                    Opts::new(
                        "grpc_server_handled_total",
                        "Total number of RPCs completed on the server, regardless of success or failure.",
                    ),
                    &["grpc_type", "grpc_service", "grpc_method", "grpc_code"],
                )
                .expect("valid metric"),
            ),
            registry,
        };
        metrics
            .version
            .with_label_values(&[crate::ETCD_API_VERSION])
            .set(1);
        #[cfg(target_os = "linux")]
        metrics
            .registry
            .register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ))
            .expect("process metrics register once");
        metrics
    }

    /// The exposition of every metric, in Prometheus' text format.
    pub fn render(&self) -> String {
        let mut buffer = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buffer)
            .expect("text encoding does not fail");
        String::from_utf8(buffer).expect("the text format is UTF-8")
    }
}

/// The process's metrics.
pub static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// The gRPC code names grpc-go's Prometheus middleware uses as labels.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "Canceled",
        Unknown => "Unknown",
        InvalidArgument => "InvalidArgument",
        DeadlineExceeded => "DeadlineExceeded",
        NotFound => "NotFound",
        AlreadyExists => "AlreadyExists",
        PermissionDenied => "PermissionDenied",
        ResourceExhausted => "ResourceExhausted",
        FailedPrecondition => "FailedPrecondition",
        Aborted => "Aborted",
        OutOfRange => "OutOfRange",
        Unimplemented => "Unimplemented",
        Internal => "Internal",
        Unavailable => "Unavailable",
        DataLoss => "DataLoss",
        Unauthenticated => "Unauthenticated",
    }
}
