//! crds/kvcluster.yaml is `kvstore-operator crd`'s output, never edited by hand.

#[test]
fn the_checked_in_crd_is_generated() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_kvstore-operator"))
        .arg("crd")
        .output()
        .expect("run kvstore-operator crd");
    assert!(output.status.success());
    let generated = String::from_utf8(output.stdout).unwrap();
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../crds/kvcluster.yaml");
    let checked_in = std::fs::read_to_string(path).unwrap();
    assert!(
        generated == checked_in,
        "crds/kvcluster.yaml differs from `kvstore-operator crd`: regenerate it with\n  cargo run -p kvstore-operator -- crd > crds/kvcluster.yaml"
    );
    for needed in [
        "scale:",
        "specReplicasPath: .spec.replicas",
        "statusReplicasPath: .status.replicas",
        "labelSelectorPath: .status.selector",
        "status: {}",
        "- kvc",
    ] {
        assert!(generated.contains(needed), "the CRD lacks {needed:?}");
    }
}
