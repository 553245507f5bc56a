//! The CRDs: one source of truth (`crds/yaml/crds.yaml`, generated from the Rust types) copied
//! byte for byte into the chart and `k8s/base`, each small enough for client-side apply, every
//! spec integer bounded so that the operator can read what the API server admits, and every
//! example and chart-rendered Mesh read by the operator's own strict parser. The API server's
//! verdict on the examples (schema, CEL rules) is in `apiserver.rs`.

mod common;

use std::path::Path;

use common::{EXPECTED_EXAMPLES, example_files, matrix, relative};
use infermesh_deploy::object::parse_documents;
use infermesh_deploy::{chart_dir, workspace};

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn generated() -> String {
    read(&workspace().join("crds/yaml/crds.yaml"))
}

#[test]
fn the_charts_crds_are_a_byte_copy_of_the_generated_crds() {
    let copy = read(&chart_dir().join("crds/crds.yaml"));
    assert!(
        copy == generated(),
        "charts/infermesh/crds/crds.yaml differs from crds/yaml/crds.yaml: run scripts/render-k8s.sh"
    );
    // Nothing else in crds/: Helm would install it too.
    let files: Vec<_> = std::fs::read_dir(chart_dir().join("crds"))
        .expect("crds dir")
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(files, ["crds.yaml"]);
}

#[test]
fn the_kustomize_bases_crds_are_a_byte_copy_of_the_generated_crds() {
    let copy = read(&workspace().join("k8s/base/crds.yaml"));
    assert!(
        copy == generated(),
        "k8s/base/crds.yaml differs from crds/yaml/crds.yaml: run scripts/render-k8s.sh"
    );
}

#[test]
fn every_crd_fits_the_client_side_apply_annotation() {
    // `kubectl apply` (and Argo CD without ServerSideApply) stores the object as JSON in the
    // kubectl.kubernetes.io/last-applied-configuration annotation; all of an object's
    // annotations together may take at most 256 KiB.
    const LIMIT: usize = 256 * 1024;
    let crds = parse_documents("crds.yaml", &generated()).expect("yaml");
    assert_eq!(crds.len(), 3);
    for crd in &crds {
        assert_eq!(crd.kind(), "CustomResourceDefinition");
        let annotation = serde_json::to_string(&crd.value).expect("json");
        // The stored annotation, key included, plus the CRD's own annotations.
        let own: usize = crd
            .value
            .pointer("/metadata/annotations")
            .and_then(|a| a.as_object())
            .map(|a| a.iter().map(|(k, v)| k.len() + v.to_string().len()).sum())
            .unwrap_or(0);
        let total =
            "kubectl.kubernetes.io/last-applied-configuration".len() + annotation.len() + own;
        assert!(
            total < LIMIT,
            "{}: {total} bytes of annotations, limit {LIMIT}",
            crd.name()
        );
    }
}

#[test]
fn every_example_and_every_charts_mesh_is_read_by_the_operators_own_parser() {
    // The API server's verdict on the same objects is in apiserver.rs. This is the other
    // reader: `infermesh local -f` and the controllers deserialize them strictly into the
    // Rust types, which the server's schema cannot vouch for (a `format` it ignores, a
    // default only Rust knows).
    let files = example_files();
    let names: Vec<String> = files.iter().map(|f| relative(f)).collect();
    for expected in EXPECTED_EXAMPLES {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} not in {names:?}"
        );
    }
    let mut objects = 0;
    for (f, name) in files.iter().zip(&names) {
        let parsed =
            infermesh_crds::parse_manifests(&read(f)).unwrap_or_else(|e| panic!("{name}: {e}"));
        objects += parsed.len();
    }
    assert!(objects >= 5, "{objects} example objects");
    let mut meshes = 0;
    for (name, r) in matrix() {
        for o in r.of_kind("Mesh") {
            let text = serde_yaml::to_string(&o.value).expect("yaml");
            infermesh_crds::parse_manifests(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
            meshes += 1;
        }
    }
    assert!(meshes >= 8, "{meshes} meshes");
}

#[test]
fn every_integer_in_a_spec_is_bounded_to_its_rust_type() {
    // The API server ignores an integer's `format` (int32, uint32, ...), so a value the
    // operator's types cannot hold would be stored, and then every read of that object by the
    // operator would fail. `minimum` and `maximum` are what the server checks: each spec
    // integer needs both, within its format's range. (A check of our schema, which the
    // server cannot do; apiserver.rs shows the server refusing an out-of-range value.)
    fn walk(schema: &serde_json::Value, path: &str, out: &mut Vec<String>) {
        let range = match schema.get("format").and_then(|f| f.as_str()) {
            Some("int32") => Some((f64::from(i32::MIN), f64::from(i32::MAX))),
            Some("uint32") => Some((0.0, f64::from(u32::MAX))),
            Some("int64") => Some((i64::MIN as f64, i64::MAX as f64)),
            Some("uint64") => Some((0.0, u64::MAX as f64)),
            _ => None,
        };
        if schema.get("type").and_then(|t| t.as_str()) == Some("integer")
            && let Some((lo, hi)) = range
        {
            let min = schema.get("minimum").and_then(|m| m.as_f64());
            let max = schema.get("maximum").and_then(|m| m.as_f64());
            if !min.is_some_and(|m| m >= lo) || !max.is_some_and(|m| m <= hi) {
                out.push(format!("{path}: {min:?}..{max:?} is not within {lo}..{hi}"));
            }
        }
        if let Some(props) = schema.get("properties").and_then(|p| p.as_object()) {
            for (k, v) in props {
                // Kubernetes' own Toleration: its int64 is checked by its own code.
                if k != "tolerations" {
                    walk(v, &format!("{path}.{k}"), out);
                }
            }
        }
        for key in ["items", "additionalProperties"] {
            if let Some(v) = schema.get(key).filter(|v| v.is_object()) {
                walk(v, &format!("{path}[]"), out);
            }
        }
    }
    let mut out = Vec::new();
    for crd in parse_documents("crds.yaml", &generated()).expect("yaml") {
        for version in crd.value["spec"]["versions"].as_array().expect("versions") {
            let spec = &version["schema"]["openAPIV3Schema"]["properties"]["spec"];
            walk(spec, &format!("{} spec", crd.name()), &mut out);
        }
    }
    assert!(out.is_empty(), "{}", out.join("\n"));
}
