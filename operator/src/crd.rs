//! The `KvCluster` custom resource (group `kvstore.dev`, version `v1alpha1`): what a
//! user asks for, and the status the operator reports. Every field's `///` becomes
//! its description in the CRD, which is what `kubectl explain` prints.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Affinity, ResourceRequirements, Toleration, TopologySpreadConstraint,
};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A kvstore cluster: an etcd-compatible, Raft-replicated key-value store run as a
/// StatefulSet, with Services for clients and peers and a PodDisruptionBudget that
/// keeps its quorum.
// Printer columns repeat `type_`: clippy reads them as duplicated attributes.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "kvstore.dev",
    version = "v1alpha1",
    kind = "KvCluster",
    namespaced,
    shortname = "kvc",
    status = "KvClusterStatus",
    derive = "PartialEq",
    doc = "A kvstore cluster: an etcd-compatible key-value store run as a StatefulSet.",
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    ),
    printcolumn(
        name = "Replicas",
        type_ = "integer",
        json_path = ".spec.replicas",
        description = "Members asked for"
    ),
    printcolumn(
        name = "Ready",
        type_ = "integer",
        json_path = ".status.readyReplicas",
        description = "Members that are healthy"
    ),
    printcolumn(
        name = "Leader",
        type_ = "string",
        json_path = ".status.leader",
        description = "The Pod of the Raft leader"
    ),
    printcolumn(
        name = "Version",
        type_ = "string",
        json_path = ".status.version",
        description = "The kvstore version the members run"
    ),
    printcolumn(
        name = "Phase",
        type_ = "string",
        json_path = ".status.phase",
        description = "What the operator is doing"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct KvClusterSpec {
    /// How many members the cluster has. Odd sizes tolerate as many failures as the
    /// next even size, so 3 or 5 are usual; even sizes are allowed and reported in
    /// the Available condition. Scaling changes membership one member at a time,
    /// never below a quorum.
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 1, max = 9))]
    pub replicas: i32,

    /// The kvstore image. Defaults to the image the operator was started with
    /// (`--default-image`). Changing it rolls the members one at a time, followers
    /// first and the leader last.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub image: Option<String>,

    /// When the kubelet pulls the image: Always, IfNotPresent or Never.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_policy: Option<PullPolicy>,

    /// Where each member keeps its data.
    #[serde(default)]
    pub storage: Storage,

    /// CPU and memory for the kvstore container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,

    /// Additions to every member's Pod.
    #[serde(default)]
    pub pod: PodOverrides,

    /// How the first members find each other.
    #[serde(default)]
    pub bootstrap: Bootstrap,

    /// Extra kvstore flags, by name without the leading dashes (for example
    /// `snapshot-count: "10000"`). Only flags that do not conflict with what the
    /// operator sets are accepted: quota-backend-bytes, snapshot-count,
    /// heartbeat-interval, election-timeout, auto-compaction-mode,
    /// auto-compaction-retention, max-request-bytes, max-txn-ops, log-level,
    /// grpc-keepalive-min-time, grpc-keepalive-interval, grpc-keepalive-timeout.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub flags: BTreeMap<String, String>,
}

fn default_replicas() -> i32 {
    3
}

/// When the kubelet pulls an image.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum PullPolicy {
    /// Every time a container starts.
    Always,
    /// Only when the node does not have it.
    IfNotPresent,
    /// Never: the image must be on the node.
    Never,
}

impl PullPolicy {
    /// The name Kubernetes uses.
    pub fn as_str(self) -> &'static str {
        match self {
            PullPolicy::Always => "Always",
            PullPolicy::IfNotPresent => "IfNotPresent",
            PullPolicy::Never => "Never",
        }
    }
}

/// Where each member keeps its data.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Storage {
    /// The size of each member's PersistentVolumeClaim, as a Kubernetes quantity.
    /// Defaults to 1Gi.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<String>,
    /// The StorageClass of the claims; the cluster's default class when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class_name: Option<String>,
    /// Keep data in an emptyDir instead of a claim: the data of a member whose Pod
    /// is deleted is gone, and the operator replaces that member. For throwaway
    /// clusters.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub empty_dir: bool,
}

/// Additions to every member's Pod.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PodOverrides {
    /// Labels added to each Pod (the operator's own labels win).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Annotations added to each Pod.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// The Pods' affinity. When unset, members prefer to run on different nodes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "any_object")]
    pub affinity: Option<Affinity>,
    /// The Pods' tolerations.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "any_object_list")]
    pub tolerations: Vec<Toleration>,
    /// The Pods' node selector.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// The Pods' topology spread constraints.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "any_object_list")]
    pub topology_spread_constraints: Vec<TopologySpreadConstraint>,
    /// The Pods' priority class.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority_class_name: Option<String>,
}

/// How the first members find each other.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Bootstrap {
    /// static (the initial cluster from the StatefulSet's stable DNS names), dns
    /// (kvstore's --discovery-srv against the SRV records of the peer Service), or
    /// discovery (an etcd v2 discovery URL).
    #[serde(default)]
    pub mode: BootstrapMode,
    /// The initial cluster token, which member and cluster IDs derive from.
    /// Defaults to `<namespace>-<name>-<uid>`, so two clusters never share IDs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub token: Option<String>,
    /// The etcd discovery URL, for mode discovery (for example
    /// `http://discovery.example:8087/v2/keys/_etcd/registry/<token>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub discovery_url: Option<String>,
}

/// How the first members find each other.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum BootstrapMode {
    /// The initial cluster is listed from the members' stable DNS names.
    #[default]
    Static,
    /// The members read the initial cluster from the SRV records of the peer
    /// Service (`_etcd-server._tcp`).
    Dns,
    /// The members register with an etcd v2 discovery service.
    Discovery,
}

/// What the operator observed of a cluster.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KvClusterStatus {
    /// The generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Creating, Running, Scaling, Upgrading, Degraded or Invalid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    /// The number of members (the scale subresource reads it).
    #[serde(default)]
    pub replicas: i32,
    /// The number of healthy members.
    #[serde(default)]
    pub ready_replicas: i32,
    /// The label selector of the members' Pods (for the scale subresource, and so an
    /// HPA finds the Pods).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    /// The Pod whose member leads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leader: Option<String>,
    /// The cluster ID, in hex as etcdctl prints it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_id: Option<String>,
    /// The kvstore version the members report (the lowest, while they differ).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Whether the members have formed a cluster once (from then on new members
    /// join the existing one).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub bootstrapped: bool,
    /// The cluster's members, as its membership lists them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub members: Vec<MemberStatus>,
    /// Available, Progressing and Degraded.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// One member of the cluster.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MemberStatus {
    /// The member's name (its Pod's name), empty until it has started.
    pub name: String,
    /// The member ID, in hex as etcdctl prints it.
    pub id: String,
    /// Where its peers reach it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub peer_urls: Vec<String>,
    /// Where clients reach it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub client_urls: Vec<String>,
    /// Whether it leads.
    #[serde(default)]
    pub is_leader: bool,
    /// Whether it is a learner (catching up, without a vote).
    #[serde(default)]
    pub is_learner: bool,
    /// Whether it answered the operator's last status call.
    #[serde(default)]
    pub healthy: bool,
}

/// A condition, as Kubernetes' own objects report them.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// Available, Progressing or Degraded.
    #[serde(rename = "type")]
    pub type_: String,
    /// True, False or Unknown.
    pub status: String,
    /// A CamelCase word saying why.
    pub reason: String,
    /// What a person should know.
    pub message: String,
    /// When the status last changed (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<String>,
    /// The generation the condition was set for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// Kubernetes' own types, kept whole in the schema but not expanded: their own
/// validation applies when the Pod is created.
fn any_object(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": true
    })
}

fn any_object_list(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "array",
        "items": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}
    })
}

/// The flags a user may set through `spec.flags`.
pub const ALLOWED_FLAGS: &[&str] = &[
    "quota-backend-bytes",
    "snapshot-count",
    "heartbeat-interval",
    "election-timeout",
    "auto-compaction-mode",
    "auto-compaction-retention",
    "max-request-bytes",
    "max-txn-ops",
    "log-level",
    "grpc-keepalive-min-time",
    "grpc-keepalive-interval",
    "grpc-keepalive-timeout",
];
