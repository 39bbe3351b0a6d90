//! The operator's Prometheus metrics: reconciles, failures by reason, reconcile
//! duration, managed clusters, and per cluster its members, healthy members and
//! leader changes.

use std::time::Duration;

use prometheus::core::Collector;
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder,
};

pub struct Metrics {
    registry: Registry,
    reconciles: IntCounterVec,
    failures: IntCounterVec,
    duration: HistogramVec,
    members: IntGaugeVec,
    healthy: IntGaugeVec,
    leader_changes: IntCounterVec,
}

impl Default for Metrics {
    fn default() -> Self {
        let registry =
            Registry::new_custom(Some("kvstore_operator".into()), None).expect("a valid prefix");
        let reconciles =
            IntCounterVec::new(Opts::new("reconciles_total", "Reconciles run"), &[]).unwrap();
        let failures = IntCounterVec::new(
            Opts::new(
                "reconcile_failures_total",
                "Reconciles that failed, by reason",
            ),
            &["reason"],
        )
        .unwrap();
        let duration = HistogramVec::new(
            HistogramOpts::new("reconcile_duration_seconds", "How long a reconcile took")
                .buckets(vec![0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]),
            &[],
        )
        .unwrap();
        let members = IntGaugeVec::new(
            Opts::new("cluster_members", "Members of a KvCluster"),
            &["namespace", "name"],
        )
        .unwrap();
        let healthy = IntGaugeVec::new(
            Opts::new(
                "cluster_healthy_members",
                "Members of a KvCluster that answer with a leader",
            ),
            &["namespace", "name"],
        )
        .unwrap();
        let leader_changes = IntCounterVec::new(
            Opts::new(
                "cluster_leader_changes_total",
                "Leader changes the operator saw",
            ),
            &["namespace", "name"],
        )
        .unwrap();
        for collector in [
            Box::new(reconciles.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(failures.clone()),
            Box::new(duration.clone()),
            Box::new(members.clone()),
            Box::new(healthy.clone()),
            Box::new(leader_changes.clone()),
        ] {
            registry.register(collector).expect("registered once");
        }
        Metrics {
            registry,
            reconciles,
            failures,
            duration,
            members,
            healthy,
            leader_changes,
        }
    }
}

impl Metrics {
    pub fn reconciled(&self, took: Duration) {
        self.reconciles.with_label_values::<&str>(&[]).inc();
        self.duration
            .with_label_values::<&str>(&[])
            .observe(took.as_secs_f64());
    }

    pub fn failure(&self, reason: &str) {
        self.failures.with_label_values(&[reason]).inc();
    }

    pub fn members(&self, namespace: &str, name: &str, members: i32, healthy: i32) {
        self.members
            .with_label_values(&[namespace, name])
            .set(members.into());
        self.healthy
            .with_label_values(&[namespace, name])
            .set(healthy.into());
    }

    pub fn leader_changed(&self, namespace: &str, name: &str) {
        self.leader_changes
            .with_label_values(&[namespace, name])
            .inc();
    }

    /// The text exposition, with `kvstore_operator_managed_clusters` counted from
    /// the clusters that have a members gauge.
    pub fn render(&self) -> String {
        let families = self.registry.gather();
        let managed = self
            .members
            .collect()
            .first()
            .map_or(0, |family| family.get_metric().len());
        let mut text = Vec::new();
        TextEncoder::new()
            .encode(&families, &mut text)
            .expect("text encoding");
        let mut text = String::from_utf8(text).expect("utf-8");
        text.push_str(&format!(
            "# HELP kvstore_operator_managed_clusters KvClusters the operator manages\n\
             # TYPE kvstore_operator_managed_clusters gauge\n\
             kvstore_operator_managed_clusters {managed}\n"
        ));
        text
    }
}
