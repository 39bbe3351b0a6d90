//! The objects a KvCluster owns, built by pure functions of the resource (and of
//! what the membership step decided): no client calls here, so every builder is
//! tested from YAML fixtures.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::ObjectMeta;
use kube::{Resource, ResourceExt};
use serde_json::{json, Value};

use crate::crd::{BootstrapMode, KvCluster};

/// The client port, as etcd's.
pub const CLIENT_PORT: i32 = 2379;
/// The peer port, as etcd's.
pub const PEER_PORT: i32 = 2380;
/// Where the data volume is mounted; the data dir is `data` inside it.
const DATA_MOUNT: &str = "/var/lib/kvstore";
/// The user the image runs as.
const USER: i64 = 65532;

/// Names and labels derived from one KvCluster.
pub struct Names<'a> {
    cluster: &'a KvCluster,
}

impl<'a> Names<'a> {
    pub fn of(cluster: &'a KvCluster) -> Names<'a> {
        Names { cluster }
    }

    fn name(&self) -> String {
        self.cluster.name_any()
    }

    fn namespace(&self) -> String {
        self.cluster.namespace().unwrap_or_else(|| "default".into())
    }

    /// The client Service (and the StatefulSet, and the PodDisruptionBudget).
    pub fn client_service(&self) -> String {
        self.name()
    }

    /// The headless Service that gives each member its DNS name.
    pub fn peer_service(&self) -> String {
        format!("{}-peer", self.name())
    }

    /// The ConfigMap of bootstrap settings the members read at their first start.
    pub fn bootstrap_config(&self) -> String {
        format!("{}-bootstrap", self.name())
    }

    /// Pod `ordinal`'s name.
    pub fn pod(&self, ordinal: usize) -> String {
        format!("{}-{ordinal}", self.name())
    }

    /// Pod `ordinal`'s stable DNS name.
    pub fn host(&self, ordinal: usize) -> String {
        format!(
            "{}.{}.{}.svc",
            self.pod(ordinal),
            self.peer_service(),
            self.namespace()
        )
    }

    /// Pod `ordinal`'s peer URL.
    pub fn peer_url(&self, ordinal: usize) -> String {
        format!("http://{}:{PEER_PORT}", self.host(ordinal))
    }

    /// Pod `ordinal`'s client URL.
    pub fn client_url(&self, ordinal: usize) -> String {
        format!("http://{}:{CLIENT_PORT}", self.host(ordinal))
    }

    /// Which Pod ordinal a peer URL belongs to, if it is one of this cluster's.
    pub fn ordinal_of(&self, peer_url: &str) -> Option<usize> {
        let rest = peer_url.strip_prefix("http://")?;
        let pod = rest.split('.').next()?;
        let ordinal = pod.strip_prefix(&format!("{}-", self.name()))?;
        let ordinal: usize = ordinal.parse().ok()?;
        (self.peer_url(ordinal) == peer_url).then_some(ordinal)
    }

    /// The labels every child carries; the selector is the first two.
    pub fn labels(&self) -> BTreeMap<String, String> {
        let mut labels = self.selector();
        labels.insert(
            "app.kubernetes.io/managed-by".into(),
            "kvstore-operator".into(),
        );
        labels
    }

    /// The labels that select the members' Pods.
    pub fn selector(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            ("app.kubernetes.io/name".into(), "kvstore".into()),
            ("app.kubernetes.io/instance".into(), self.name()),
        ])
    }

    /// The selector as a string, for the scale subresource.
    pub fn selector_string(&self) -> String {
        self.selector()
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The initial cluster token: the spec's, or one unique to this resource.
    pub fn token(&self) -> String {
        match &self.cluster.spec.bootstrap.token {
            Some(token) => token.clone(),
            None => format!(
                "{}-{}-{}",
                self.namespace(),
                self.name(),
                self.cluster.uid().unwrap_or_default()
            ),
        }
    }

    /// Metadata for a child called `name`, owned by the KvCluster.
    fn meta(&self, name: String) -> ObjectMeta {
        ObjectMeta {
            name: Some(name),
            namespace: Some(self.namespace()),
            labels: Some(self.labels()),
            owner_references: self.cluster.controller_owner_ref(&()).map(|o| vec![o]),
            ..Default::default()
        }
    }
}

/// The quorum of `members` voters.
pub fn quorum(members: i32) -> i32 {
    members / 2 + 1
}

fn typed<T: serde::de::DeserializeOwned>(value: Value) -> T {
    serde_json::from_value(value).expect("the builders write valid objects")
}

/// The headless Service: each member's stable DNS name, and the SRV records
/// `_etcd-server._tcp` and `_etcd-client._tcp` that DNS bootstrap reads.
pub fn peer_service(cluster: &KvCluster) -> Service {
    let names = Names::of(cluster);
    let mut service: Service = typed(json!({
        "spec": {
            "clusterIP": "None",
            // Members must find each other before any is ready: a member is ready
            // only once the cluster has a leader.
            "publishNotReadyAddresses": true,
            "selector": names.selector(),
            "ports": [
                {"name": "etcd-server", "port": PEER_PORT, "targetPort": "peer", "protocol": "TCP"},
                {"name": "etcd-client", "port": CLIENT_PORT, "targetPort": "client", "protocol": "TCP"},
            ],
        }
    }));
    service.metadata = names.meta(names.peer_service());
    service
}

/// The Service clients use: ready members only.
pub fn client_service(cluster: &KvCluster) -> Service {
    let names = Names::of(cluster);
    let mut service: Service = typed(json!({
        "spec": {
            "selector": names.selector(),
            "ports": [
                {"name": "client", "port": CLIENT_PORT, "targetPort": "client", "protocol": "TCP"},
            ],
        }
    }));
    service.metadata = names.meta(names.client_service());
    service
}

/// How a member that starts on an empty volume finds its cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Join {
    /// The founding members: Pods `0..size` form a new cluster.
    New { size: usize },
    /// The cluster exists; these are its members' (ordinal) peers, which a new
    /// member asks for its place.
    Existing { ordinals: Vec<usize> },
}

/// The bootstrap settings, as `ETCD_*` variables the Pods read through `envFrom`.
/// Changing them does not restart running members (their data dir wins); new
/// members read them when they first start.
pub fn bootstrap_config(cluster: &KvCluster, join: &Join) -> ConfigMap {
    let names = Names::of(cluster);
    let initial = |ordinals: &mut dyn Iterator<Item = usize>| {
        ordinals
            .map(|i| format!("{}={}", names.pod(i), names.peer_url(i)))
            .collect::<Vec<_>>()
            .join(",")
    };
    let mut data = BTreeMap::from([("ETCD_INITIAL_CLUSTER_TOKEN".into(), names.token())]);
    match join {
        Join::New { size } => {
            data.insert("ETCD_INITIAL_CLUSTER_STATE".into(), "new".into());
            match cluster.spec.bootstrap.mode {
                BootstrapMode::Static => {
                    data.insert("ETCD_INITIAL_CLUSTER".into(), initial(&mut (0..*size)));
                }
                BootstrapMode::Dns => {
                    let namespace = cluster.namespace().unwrap_or_else(|| "default".into());
                    data.insert(
                        "ETCD_DISCOVERY_SRV".into(),
                        format!("{}.{namespace}.svc", names.peer_service()),
                    );
                }
                BootstrapMode::Discovery => {
                    data.insert(
                        "ETCD_DISCOVERY".into(),
                        cluster
                            .spec
                            .bootstrap
                            .discovery_url
                            .clone()
                            .unwrap_or_default(),
                    );
                }
            }
        }
        Join::Existing { ordinals } => {
            data.insert("ETCD_INITIAL_CLUSTER_STATE".into(), "existing".into());
            data.insert(
                "ETCD_INITIAL_CLUSTER".into(),
                initial(&mut ordinals.iter().copied()),
            );
        }
    }
    ConfigMap {
        metadata: names.meta(names.bootstrap_config()),
        data: Some(data),
        ..Default::default()
    }
}

/// The image a cluster runs: the spec's, or the operator's default.
pub fn image(cluster: &KvCluster, default_image: &str) -> String {
    cluster
        .spec
        .image
        .clone()
        .unwrap_or_else(|| default_image.to_string())
}

/// The StatefulSet of members, at `replicas` Pods (which the membership step
/// decides, one member at a time). Pods are replaced only when the operator deletes
/// them (`OnDelete`), so upgrades go followers first and the leader last.
pub fn statefulset(cluster: &KvCluster, replicas: i32, default_image: &str) -> StatefulSet {
    let names = Names::of(cluster);
    let spec = &cluster.spec;
    let namespace = cluster.namespace().unwrap_or_else(|| "default".into());
    let peer = names.peer_service();
    let mut pod_labels = spec.pod.labels.clone();
    pod_labels.extend(names.labels());
    let affinity = match &spec.pod.affinity {
        Some(affinity) => serde_json::to_value(affinity).expect("affinity serializes"),
        None => json!({
            "podAntiAffinity": {
                "preferredDuringSchedulingIgnoredDuringExecution": [{
                    "weight": 100,
                    "podAffinityTerm": {
                        "topologyKey": "kubernetes.io/hostname",
                        "labelSelector": {"matchLabels": names.selector()},
                    },
                }],
            },
        }),
    };
    let args: Vec<String> = spec
        .flags
        .iter()
        .map(|(flag, value)| format!("--{flag}={value}"))
        .collect();
    let env = json!([
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "ETCD_NAME", "value": "$(POD_NAME)"},
        {"name": "ETCD_DATA_DIR", "value": format!("{DATA_MOUNT}/data")},
        {"name": "ETCD_LISTEN_CLIENT_URLS", "value": format!("http://0.0.0.0:{CLIENT_PORT}")},
        {"name": "ETCD_LISTEN_PEER_URLS", "value": format!("http://0.0.0.0:{PEER_PORT}")},
        {"name": "ETCD_ADVERTISE_CLIENT_URLS",
         "value": format!("http://$(POD_NAME).{peer}.{namespace}.svc:{CLIENT_PORT}")},
        {"name": "ETCD_INITIAL_ADVERTISE_PEER_URLS",
         "value": format!("http://$(POD_NAME).{peer}.{namespace}.svc:{PEER_PORT}")},
    ]);
    let mut container = json!({
        "name": "kvstore",
        "image": image(cluster, default_image),
        "args": args,
        "env": env,
        "envFrom": [{"configMapRef": {"name": names.bootstrap_config()}}],
        "ports": [
            {"name": "client", "containerPort": CLIENT_PORT, "protocol": "TCP"},
            {"name": "peer", "containerPort": PEER_PORT, "protocol": "TCP"},
        ],
        "livenessProbe": {
            "httpGet": {"path": "/livez", "port": "client"},
            "periodSeconds": 5,
            "failureThreshold": 6,
        },
        "readinessProbe": {
            "httpGet": {"path": "/readyz", "port": "client"},
            "periodSeconds": 2,
            "failureThreshold": 3,
        },
        "volumeMounts": [{"name": "data", "mountPath": DATA_MOUNT}],
    });
    if let Some(policy) = spec.image_pull_policy {
        container["imagePullPolicy"] = json!(policy.as_str());
    }
    if let Some(resources) = &spec.resources {
        container["resources"] = serde_json::to_value(resources).expect("resources serialize");
    }
    let mut pod_spec = json!({
        "terminationGracePeriodSeconds": 10,
        // The volume is given the member's group once (OnRootMismatch): a recursive
        // change at every mount would loosen the data dir to 0770, which kvstore
        // refuses.
        "securityContext": {
            "runAsUser": USER, "runAsGroup": USER, "fsGroup": USER,
            "fsGroupChangePolicy": "OnRootMismatch", "runAsNonRoot": true,
        },
        "affinity": affinity,
        "containers": [container],
    });
    if !spec.pod.tolerations.is_empty() {
        pod_spec["tolerations"] = serde_json::to_value(&spec.pod.tolerations).expect("serializes");
    }
    if !spec.pod.node_selector.is_empty() {
        pod_spec["nodeSelector"] = json!(spec.pod.node_selector);
    }
    if !spec.pod.topology_spread_constraints.is_empty() {
        pod_spec["topologySpreadConstraints"] =
            serde_json::to_value(&spec.pod.topology_spread_constraints).expect("serializes");
    }
    if let Some(class) = &spec.pod.priority_class_name {
        pod_spec["priorityClassName"] = json!(class);
    }
    let mut sts = json!({
        "spec": {
            "serviceName": peer,
            "replicas": replicas,
            // The founding members must all start together to elect a leader.
            "podManagementPolicy": "Parallel",
            "updateStrategy": {"type": "OnDelete"},
            "selector": {"matchLabels": names.selector()},
            "template": {
                "metadata": {"labels": pod_labels},
                "spec": pod_spec,
            },
        }
    });
    if !spec.pod.annotations.is_empty() {
        sts["spec"]["template"]["metadata"]["annotations"] = json!(spec.pod.annotations);
    }
    if spec.storage.empty_dir {
        sts["spec"]["template"]["spec"]["volumes"] = json!([{"name": "data", "emptyDir": {}}]);
    } else {
        let mut claim = json!({
            "metadata": {"name": "data", "labels": names.selector()},
            "spec": {
                "accessModes": ["ReadWriteOnce"],
                "resources": {"requests": {
                    "storage": spec.storage.size.clone().unwrap_or_else(|| "1Gi".into()),
                }},
            },
        });
        if let Some(class) = &spec.storage.storage_class_name {
            claim["spec"]["storageClassName"] = json!(class);
        }
        sts["spec"]["volumeClaimTemplates"] = json!([claim]);
        // A removed member's volume goes with it: a later member at the same
        // ordinal must start empty, not as the removed member.
        sts["spec"]["persistentVolumeClaimRetentionPolicy"] =
            json!({"whenScaled": "Delete", "whenDeleted": "Delete"});
    }
    let mut statefulset: StatefulSet = typed(sts);
    statefulset.metadata = names.meta(names.client_service());
    statefulset
}

/// The PodDisruptionBudget: voluntary disruptions (drains) may take members only
/// while a quorum of the spec's size stays.
pub fn disruption_budget(cluster: &KvCluster) -> PodDisruptionBudget {
    let names = Names::of(cluster);
    let mut budget: PodDisruptionBudget = typed(json!({
        "spec": {
            "minAvailable": quorum(cluster.spec.replicas),
            "selector": {"matchLabels": names.selector()},
        }
    }));
    budget.metadata = names.meta(names.client_service());
    budget
}

/// What is wrong with a spec that the schema cannot say: the field and why.
pub fn validate(cluster: &KvCluster) -> Result<(), String> {
    let spec = &cluster.spec;
    if !(1..=9).contains(&spec.replicas) {
        return Err(format!(
            "spec.replicas: {} is out of range (1 to 9)",
            spec.replicas
        ));
    }
    for flag in spec.flags.keys() {
        if !crate::crd::ALLOWED_FLAGS.contains(&flag.as_str()) {
            return Err(format!(
                "spec.flags: {flag:?} is not a flag the operator lets through (allowed: {})",
                crate::crd::ALLOWED_FLAGS.join(", ")
            ));
        }
    }
    match (spec.bootstrap.mode, &spec.bootstrap.discovery_url) {
        (BootstrapMode::Discovery, None) => {
            return Err("spec.bootstrap.discoveryUrl: required when mode is discovery".into())
        }
        (BootstrapMode::Discovery, Some(url))
            if !(url.starts_with("http://") || url.starts_with("https://")) =>
        {
            return Err(format!(
                "spec.bootstrap.discoveryUrl: {url:?} is not an http(s) URL"
            ))
        }
        (BootstrapMode::Static | BootstrapMode::Dns, Some(_)) => {
            return Err("spec.bootstrap.discoveryUrl: only used when mode is discovery".into())
        }
        _ => {}
    }
    if spec.storage.empty_dir
        && (spec.storage.size.is_some() || spec.storage.storage_class_name.is_some())
    {
        return Err("spec.storage.emptyDir: cannot be set with size or storageClassName".into());
    }
    if let Some(size) = &spec.storage.size {
        let digits = size.trim_end_matches(|c: char| c.is_ascii_alphabetic());
        let suffix = &size[digits.len()..];
        let known = ["", "k", "M", "G", "T", "Ki", "Mi", "Gi", "Ti"];
        if digits.is_empty() || digits.parse::<f64>().is_err() || !known.contains(&suffix) {
            return Err(format!(
                "spec.storage.size: {size:?} is not a quantity (for example 1Gi)"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
