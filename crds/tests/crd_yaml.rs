//! The committed CRD YAML must be exactly what the types generate.

#[test]
fn committed_crd_yaml_matches_the_types() {
    let generated = infermesh_crds::crds_yaml().expect("serialize CRDs");
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/yaml/crds.yaml");
    if std::env::var_os("INFERMESH_BLESS").is_some() {
        std::fs::write(path, &generated).expect("write crds.yaml");
    }
    let committed = std::fs::read_to_string(path).unwrap_or_default();
    assert!(
        committed == generated,
        "crds/yaml/crds.yaml is out of date with the Rust types; regenerate it with\n  \
         cargo run -p infermesh-operator -- crd > crds/yaml/crds.yaml\n(or INFERMESH_BLESS=1 cargo test -p infermesh-crds)"
    );
}

#[test]
fn every_crd_stays_far_below_the_client_side_apply_annotation_limit() {
    // kubectl apply (client-side) stores the whole object in an annotation capped at 256 KiB.
    for crd in infermesh_crds::all_crds() {
        let json = serde_json::to_vec(&crd).expect("json");
        assert!(
            json.len() < 128 * 1024,
            "{} is {} bytes",
            crd.metadata.name.unwrap_or_default(),
            json.len()
        );
    }
}

#[test]
fn printer_columns_are_the_ones_kubectl_get_shows() {
    let cols = |crd: &k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition| {
        crd.spec.versions[0]
            .additional_printer_columns
            .as_ref()
            .map(|c| c.iter().map(|c| c.name.clone()).collect::<Vec<_>>())
            .unwrap_or_default()
    };
    use kube::CustomResourceExt;
    assert_eq!(
        cols(&infermesh_crds::Agent::crd()),
        [
            "MESH", "NODE", "GPU", "STATUS", "RUNNING", "DONE", "CREDITS", "AGE"
        ]
    );
    assert_eq!(
        cols(&infermesh_crds::Workload::crd()),
        ["MESH", "STATUS", "PROGRESS", "ETA", "CREDITS", "AGE"]
    );
}

#[test]
fn the_schema_carries_cel_rules_and_bounds() {
    let yaml = infermesh_crds::crds_yaml().expect("yaml");
    assert!(yaml.contains("has(self.textEmbedding) != has(self.tensor)"));
    assert!(yaml.contains("self.heartbeatSeconds < self.leaseSeconds"));
    assert!(yaml.contains("^[0-9a-f]{64}$"));
}
