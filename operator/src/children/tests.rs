//! The builders, from the YAML fixtures in operator/tests/fixtures.

use serde_json::{json, Value};

use super::*;

fn fixture(name: &str) -> Vec<KvCluster> {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).expect("fixture");
    serde_yaml::Deserializer::from_str(&text)
        .map(|document| serde::Deserialize::deserialize(document).expect("a KvCluster"))
        .collect()
}

fn one(name: &str) -> KvCluster {
    fixture(name).remove(0)
}

fn value<T: serde::Serialize>(object: &T) -> Value {
    serde_json::to_value(object).unwrap()
}

fn env_of(container: &Value) -> std::collections::BTreeMap<String, Value> {
    container["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["name"].as_str().unwrap().to_string(), e.clone()))
        .collect()
}

#[test]
fn a_minimal_cluster_gets_etcd_defaults() {
    let cluster = one("minimal.yaml");
    assert_eq!(cluster.spec.replicas, 3);
    let sts = value(&statefulset(&cluster, 3, "kvstore.dev/kvstore:9"));
    assert_eq!(sts["metadata"]["name"], "kv");
    assert_eq!(sts["metadata"]["namespace"], "apps");
    assert_eq!(sts["spec"]["replicas"], 3);
    assert_eq!(sts["spec"]["serviceName"], "kv-peer");
    assert_eq!(sts["spec"]["podManagementPolicy"], "Parallel");
    assert_eq!(sts["spec"]["updateStrategy"]["type"], "OnDelete");
    let pod = &sts["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    assert_eq!(container["image"], "kvstore.dev/kvstore:9");
    assert!(container.get("imagePullPolicy").is_none());
    assert_eq!(container["args"], json!([]));
    let env = env_of(container);
    assert_eq!(env["ETCD_NAME"]["value"], "$(POD_NAME)");
    assert_eq!(env["ETCD_DATA_DIR"]["value"], "/var/lib/kvstore/data");
    assert_eq!(
        env["ETCD_INITIAL_ADVERTISE_PEER_URLS"]["value"],
        "http://$(POD_NAME).kv-peer.apps.svc:2380"
    );
    assert_eq!(
        env["ETCD_ADVERTISE_CLIENT_URLS"]["value"],
        "http://$(POD_NAME).kv-peer.apps.svc:2379"
    );
    assert_eq!(
        container["envFrom"][0]["configMapRef"]["name"],
        "kv-bootstrap"
    );
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/livez");
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
    for port in container["ports"].as_array().unwrap() {
        assert_eq!(port["protocol"], "TCP", "{port}");
    }
    assert_eq!(pod["securityContext"]["runAsUser"], 65532);
    assert_eq!(
        pod["securityContext"]["fsGroupChangePolicy"],
        "OnRootMismatch"
    );
    // Spread over nodes by default, preferred so a small cluster still schedules.
    let spread =
        &pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"][0];
    assert_eq!(
        spread["podAffinityTerm"]["topologyKey"],
        "kubernetes.io/hostname"
    );
    assert_eq!(
        spread["podAffinityTerm"]["labelSelector"]["matchLabels"]["app.kubernetes.io/instance"],
        "kv"
    );
    let claim = &sts["spec"]["volumeClaimTemplates"][0];
    assert_eq!(claim["spec"]["resources"]["requests"]["storage"], "1Gi");
    assert!(claim["spec"].get("storageClassName").is_none());
    assert_eq!(
        sts["spec"]["persistentVolumeClaimRetentionPolicy"]["whenScaled"],
        "Delete"
    );
    let owner = &sts["metadata"]["ownerReferences"][0];
    assert_eq!(owner["kind"], "KvCluster");
    assert_eq!(owner["controller"], true);
    assert_eq!(owner["uid"], "0b5c-uid");
}

#[test]
fn services_give_members_names_and_clients_one_address() {
    let cluster = one("minimal.yaml");
    let peer = value(&peer_service(&cluster));
    assert_eq!(peer["metadata"]["name"], "kv-peer");
    assert_eq!(peer["spec"]["clusterIP"], "None");
    assert_eq!(peer["spec"]["publishNotReadyAddresses"], true);
    let ports: Vec<(&str, i64)> = peer["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["name"].as_str().unwrap(), p["port"].as_i64().unwrap()))
        .collect();
    // The names the SRV records (_etcd-server._tcp, _etcd-client._tcp) come from.
    assert_eq!(ports, [("etcd-server", 2380), ("etcd-client", 2379)]);
    let client = value(&client_service(&cluster));
    assert_eq!(client["metadata"]["name"], "kv");
    assert!(client["spec"].get("clusterIP").is_none());
    assert!(client["spec"].get("publishNotReadyAddresses").is_none());
    for service in [&peer, &client] {
        assert_eq!(
            service["spec"]["selector"]["app.kubernetes.io/instance"],
            "kv"
        );
        for port in service["spec"]["ports"].as_array().unwrap() {
            assert_eq!(port["protocol"], "TCP");
        }
    }
}

#[test]
fn bootstrap_settings_follow_the_mode_and_the_membership() {
    let cluster = one("minimal.yaml");
    let new = value(&bootstrap_config(&cluster, &Join::New { size: 3 }));
    assert_eq!(new["data"]["ETCD_INITIAL_CLUSTER_STATE"], "new");
    assert_eq!(
        new["data"]["ETCD_INITIAL_CLUSTER"],
        "kv-0=http://kv-0.kv-peer.apps.svc:2380,kv-1=http://kv-1.kv-peer.apps.svc:2380,kv-2=http://kv-2.kv-peer.apps.svc:2380"
    );
    // A token unique to the resource, so two clusters never derive the same IDs.
    assert_eq!(
        new["data"]["ETCD_INITIAL_CLUSTER_TOKEN"],
        "apps-kv-0b5c-uid"
    );
    let joining = value(&bootstrap_config(
        &cluster,
        &Join::Existing {
            ordinals: vec![0, 2, 3],
        },
    ));
    assert_eq!(joining["data"]["ETCD_INITIAL_CLUSTER_STATE"], "existing");
    assert_eq!(
        joining["data"]["ETCD_INITIAL_CLUSTER"],
        "kv-0=http://kv-0.kv-peer.apps.svc:2380,kv-2=http://kv-2.kv-peer.apps.svc:2380,kv-3=http://kv-3.kv-peer.apps.svc:2380"
    );
    let dns = one("throwaway.yaml");
    let config = value(&bootstrap_config(&dns, &Join::New { size: 1 }));
    assert_eq!(config["data"]["ETCD_DISCOVERY_SRV"], "scratch-peer.ci.svc");
    assert!(config["data"].get("ETCD_INITIAL_CLUSTER").is_none());
    let full = one("full.yaml");
    let config = value(&bootstrap_config(&full, &Join::New { size: 5 }));
    assert_eq!(config["data"]["ETCD_INITIAL_CLUSTER_TOKEN"], "shared-token");
}

#[test]
fn every_override_reaches_the_pods() {
    let cluster = one("full.yaml");
    let sts = value(&statefulset(&cluster, 5, "unused"));
    let template = &sts["spec"]["template"];
    let labels = &template["metadata"]["labels"];
    assert_eq!(labels["team"], "platform");
    // The operator's labels win: the selector must keep matching.
    assert_eq!(labels["app.kubernetes.io/name"], "kvstore");
    assert_eq!(
        template["metadata"]["annotations"]["example.com/owner"],
        "platform"
    );
    let pod = &template["spec"];
    assert!(pod["affinity"]["nodeAffinity"].is_object());
    assert!(pod["affinity"].get("podAntiAffinity").is_none());
    assert_eq!(pod["tolerations"][0]["key"], "dedicated");
    assert_eq!(pod["nodeSelector"]["kubernetes.io/os"], "linux");
    assert_eq!(pod["topologySpreadConstraints"][0]["maxSkew"], 1);
    assert_eq!(pod["priorityClassName"], "system-cluster-critical");
    let container = &pod["containers"][0];
    assert_eq!(container["image"], "registry.example/kvstore:0.2.0");
    assert_eq!(container["imagePullPolicy"], "Always");
    assert_eq!(container["resources"]["limits"]["memory"], "1Gi");
    assert_eq!(
        container["args"],
        json!(["--quota-backend-bytes=4294967296", "--snapshot-count=10000"])
    );
    let claim = &sts["spec"]["volumeClaimTemplates"][0];
    assert_eq!(claim["spec"]["resources"]["requests"]["storage"], "8Gi");
    assert_eq!(claim["spec"]["storageClassName"], "fast");
}

#[test]
fn an_empty_dir_cluster_has_no_claims() {
    let cluster = one("throwaway.yaml");
    let sts = value(&statefulset(&cluster, 1, "img"));
    assert!(sts["spec"].get("volumeClaimTemplates").is_none());
    assert_eq!(
        sts["spec"]["template"]["spec"]["volumes"][0]["emptyDir"],
        json!({})
    );
}

#[test]
fn the_budget_keeps_a_quorum() {
    for (replicas, min) in [(1, 1), (2, 2), (3, 2), (4, 3), (5, 3), (7, 4)] {
        let mut cluster = one("minimal.yaml");
        cluster.spec.replicas = replicas;
        let budget = value(&disruption_budget(&cluster));
        assert_eq!(budget["spec"]["minAvailable"], min, "{replicas} members");
        assert_eq!(
            budget["spec"]["selector"]["matchLabels"]["app.kubernetes.io/instance"],
            "kv"
        );
    }
}

#[test]
fn peer_urls_map_back_to_ordinals() {
    let cluster = one("minimal.yaml");
    let names = Names::of(&cluster);
    assert_eq!(
        names.ordinal_of("http://kv-4.kv-peer.apps.svc:2380"),
        Some(4)
    );
    assert_eq!(names.ordinal_of("http://kv-4.kv-peer.other.svc:2380"), None);
    assert_eq!(names.ordinal_of("http://kvx-4.kv-peer.apps.svc:2380"), None);
    assert_eq!(names.ordinal_of("http://10.0.0.1:2380"), None);
    assert_eq!(
        names.selector_string(),
        "app.kubernetes.io/instance=kv,app.kubernetes.io/name=kvstore"
    );
}

#[test]
fn invalid_specs_name_the_field() {
    let expected = [
        "spec.flags: \"data-dir\" is not a flag the operator lets through",
        "spec.bootstrap.discoveryUrl: required when mode is discovery",
        "spec.storage.emptyDir: cannot be set with size or storageClassName",
        "spec.storage.size: \"lots\" is not a quantity",
        "spec.replicas: 12 is out of range (1 to 9)",
        "spec.bootstrap.discoveryUrl: only used when mode is discovery",
    ];
    let clusters = fixture("invalid.yaml");
    assert_eq!(clusters.len(), expected.len());
    for (cluster, expected) in clusters.iter().zip(expected) {
        let error = validate(cluster).expect_err(expected);
        assert!(error.starts_with(expected), "{error}");
    }
    for good in ["minimal.yaml", "full.yaml", "throwaway.yaml"] {
        assert_eq!(validate(&one(good)), Ok(()), "{good}");
    }
}
