//! `k8s/`: the kustomize base is the chart's default render (so it cannot drift from the chart),
//! and `kubectl kustomize k8s/overlays/k3s` gives the same objects plus exactly the overlay's
//! declared changes.

mod common;

use std::collections::BTreeMap;

use common::{kustomize_text, rendered};
use infermesh_deploy::object::{
    Object, ObjectId, canonical_numbers, first_difference, parse_documents, strip_labels,
};
use infermesh_deploy::strict::check;
use infermesh_deploy::{HELM_ONLY_LABELS, workspace};
use serde_json::json;

fn kustomize(dir: &str) -> Vec<Object> {
    parse_documents(dir, &kustomize_text(dir)).expect("kustomize output")
}

fn by_id(objects: Vec<Object>) -> BTreeMap<ObjectId, serde_json::Value> {
    let mut out = BTreeMap::new();
    for mut o in objects {
        let id = o.id();
        canonical_numbers(&mut o.value);
        assert!(out.insert(id.clone(), o.value).is_none(), "{id} twice");
    }
    out
}

/// The chart's default render as k8s/base should hold it: Helm's labels stripped, and without
/// the bundled Postgres's password Secret (generated at install by Helm; plain-YAML users
/// create it, see k8s/base/kustomization.yaml).
fn chart_as_base() -> BTreeMap<ObjectId, serde_json::Value> {
    let r = rendered(&[]);
    let mut objects: Vec<Object> = r
        .objects
        .iter()
        .filter(|o| !(o.kind() == "Secret" && o.name() == "infermesh-database"))
        .cloned()
        .collect();
    for o in &mut objects {
        strip_labels(&mut o.value, &HELM_ONLY_LABELS);
    }
    by_id(objects)
}

fn diff(
    expected: &BTreeMap<ObjectId, serde_json::Value>,
    got: &BTreeMap<ObjectId, serde_json::Value>,
) -> Vec<String> {
    let mut out = Vec::new();
    for (id, v) in expected {
        match got.get(id) {
            None => out.push(format!("missing {id}")),
            Some(g) => {
                if let Some(d) = first_difference(v, g) {
                    out.push(format!("{id} differs at {d} (expected vs got)"));
                }
            }
        }
    }
    for id in got.keys() {
        if !expected.contains_key(id) {
            out.push(format!("unexpected {id}"));
        }
    }
    out
}

#[test]
fn the_kustomize_base_is_the_charts_default_render_without_helm_labels() {
    let base = by_id(kustomize("k8s/base"));
    let d = diff(&chart_as_base(), &base);
    assert!(
        d.is_empty(),
        "k8s/base drifted from the chart: run scripts/render-k8s.sh\n{}",
        d.join("\n")
    );
}

#[test]
fn the_k3s_overlay_is_the_chart_plus_only_its_declared_changes() {
    let mut expected = chart_as_base();
    // Declared in k8s/overlays/k3s/kustomization.yaml: the Namespace (Pod Security
    // "restricted", which tests/apiserver.rs shows every pod of the chart meets), and the bundled
    // Postgres's volume on k3s's local-path StorageClass.
    let ns = ObjectId {
        api_version: "v1".into(),
        kind: "Namespace".into(),
        namespace: String::new(),
        name: "infermesh".into(),
    };
    expected.insert(
        ns,
        json!({"apiVersion": "v1", "kind": "Namespace",
               "metadata": {"name": "infermesh", "labels": {
                   "app.kubernetes.io/part-of": "infermesh",
                   "pod-security.kubernetes.io/enforce": "restricted",
                   "pod-security.kubernetes.io/warn": "restricted",
                   "pod-security.kubernetes.io/audit": "restricted"}}}),
    );
    let sts = expected
        .iter_mut()
        .find(|(id, _)| id.kind == "StatefulSet" && id.name == "infermesh-postgres")
        .map(|(_, v)| v)
        .expect("the chart renders the Postgres StatefulSet");
    sts["spec"]["volumeClaimTemplates"][0]["spec"]["storageClassName"] = json!("local-path");

    let overlay = kustomize("k8s/overlays/k3s");
    for o in &overlay {
        check(o).unwrap_or_else(|e| panic!("{}: {e:#}", o.id()));
    }
    let d = diff(&expected, &by_id(overlay));
    assert!(d.is_empty(), "{}", d.join("\n"));
}

#[test]
fn the_base_carries_no_helm_labels_and_lists_every_file() {
    let base = workspace().join("k8s/base");
    let kustomization = std::fs::read_to_string(base.join("kustomization.yaml")).expect("read");
    for e in std::fs::read_dir(&base).expect("base").flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if name == "kustomization.yaml" {
            continue;
        }
        assert!(
            kustomization.contains(&format!("  - {name}\n")),
            "{name} is not listed in k8s/base/kustomization.yaml"
        );
        let text = std::fs::read_to_string(e.path()).expect("read");
        for label in HELM_ONLY_LABELS {
            assert!(!text.contains(label), "{name} carries {label}");
        }
    }
}
