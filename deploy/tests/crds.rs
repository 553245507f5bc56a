//! The CRDs: one source of truth (`crds/yaml/crds.yaml`, generated from the Rust types) copied
//! byte for byte into the chart and `k8s/base`, each small enough for client-side apply, and
//! every example manifest and chart-rendered Mesh valid against their OpenAPI schemas.

mod common;

use std::path::{Path, PathBuf};

use common::matrix;
use infermesh_deploy::object::parse_documents;
use infermesh_deploy::openapi::Schemas;
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

fn example_files() -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).expect("examples").flatten() {
            let p = e.path();
            if p.is_dir() && !p.is_symlink() {
                walk(&p, out);
            } else if p.extension().is_some_and(|x| x == "yaml" || x == "yml") {
                out.push(p);
            }
        }
    }
    let mut out = Vec::new();
    walk(&workspace().join("examples"), &mut out);
    out.sort();
    out
}

#[test]
fn every_example_validates_against_the_generated_crd_schemas() {
    let schemas = Schemas::from_crds_yaml(&generated()).expect("schemas");
    let files = example_files();
    let names: Vec<String> = files
        .iter()
        .map(|f| {
            f.strip_prefix(workspace())
                .unwrap_or(f)
                .display()
                .to_string()
        })
        .collect();
    for expected in [
        "examples/mesh.yaml",
        "examples/workload-embed.yaml",
        "examples/workload-tensor.yaml",
        "examples/quickstart/quickstart.yaml",
    ] {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} not in {names:?}"
        );
    }
    let mut objects = 0;
    for (f, name) in files.iter().zip(&names) {
        for o in parse_documents(name, &read(f)).expect("yaml") {
            let v = schemas
                .validate(&o)
                .unwrap_or_else(|e| panic!("{name}: {}: {e:#}", o.id()));
            assert!(
                v.errors.is_empty(),
                "{name}: {}:\n  {}",
                o.id(),
                v.errors.join("\n  ")
            );
            objects += 1;
        }
    }
    assert!(objects >= 5, "{objects} example objects");
}

#[test]
fn a_broken_example_is_caught_by_the_schema_check() {
    // The same check as above must fail on a plausible mistake in a real example.
    let schemas = Schemas::from_crds_yaml(&generated()).expect("schemas");
    let text = read(&workspace().join("examples/mesh.yaml"));
    for (from, to, expect) in [
        (
            "slots: 2",
            "slots: two",
            "spec.agent.slots: must be integer",
        ),
        ("slots: 2", "slot: 2", "spec.agent.slot: unknown field"),
        (
            "[cuda, cpu]",
            "[cuda, rocm]",
            "spec.agent.executionProviders[1]",
        ),
        (
            "leaseSeconds: 30",
            "leaseSeconds: 1",
            "spec.leaseSeconds: 1 is below the minimum 2",
        ),
        ("credits: 50000", "credits: -1", "spec.budgets[0].credits"),
    ] {
        let bad = text.replace(from, to);
        assert_ne!(bad, text, "{from}");
        let o = parse_documents("mesh.yaml", &bad).expect("yaml").remove(0);
        let errors = schemas.validate(&o).expect("known kind").errors;
        assert!(
            errors.iter().any(|e| e.contains(expect)),
            "{to}: {errors:?}"
        );
    }
}

#[test]
fn the_charts_mesh_validates_against_its_crd_schema_in_every_values_case() {
    let schemas = Schemas::from_crds_yaml(&generated()).expect("schemas");
    let mut meshes = 0;
    for (name, r) in matrix() {
        for o in r.of_kind("Mesh") {
            let v = schemas.validate(o).expect("Mesh is known");
            assert!(v.errors.is_empty(), "{name}: {}: {:?}", o.id(), v.errors);
            // And the operator's own parser, which is strict, reads it.
            let text = serde_yaml::to_string(&o.value).expect("yaml");
            infermesh_crds::parse_manifests(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
            meshes += 1;
        }
    }
    assert!(meshes >= 8, "{meshes} meshes");
}
