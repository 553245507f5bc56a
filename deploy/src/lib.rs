//! Checks of infermesh's install paths, shared by the tests under `deploy/tests/`: the Helm
//! chart rendered by the real Helm library (`scripts/helm.py`, the pinned PyPI package
//! `helm-python-sdk`), `kubectl kustomize` of `k8s/`, the Argo CD Application, and a real API
//! server's verdict on all of it.
//!
//! - [`tools`] finds the venv's Python (with the Helm SDK) and `kubectl`, or says to run
//!   `scripts/setup.sh`;
//! - [`chart`] renders and lints the chart, once per values set per test process;
//! - [`object`] holds rendered objects and reads multi-document YAML;
//! - [`strict`] deserializes each object into its `k8s-openapi` (or infermesh, or monitoring,
//!   or Argo CD) type and reports every field the type does not know;
//! - [`rbac`] reads the operator's list of API calls (`operator/src/controller/rbac.yaml`);
//! - [`controlplane`] starts a real control plane (`scripts/controlplane.sh`) for a test.
//!
//! The CRDs' schemas and CEL rules, and Pod Security admission, are not re-implemented here:
//! `deploy/tests/apiserver.rs` hands the examples, bad manifests, every chart render and the
//! agent DaemonSet to a real kube-apiserver (server-side dry run) in a namespace that enforces
//! Pod Security "restricted". What stays hand-written is what no API server checks: the
//! project's own rules (a read-only root filesystem, `tests/objects.rs`), kinds the test
//! server does not serve (the Prometheus Operator's monitors and the Argo CD Application, typed
//! by [`strict`]), and the CRDs' integer bounds against the Rust types (`tests/crds.rs`).
#![forbid(unsafe_code)]

pub mod chart;
pub mod controlplane;
pub mod object;
pub mod rbac;
pub mod strict;
pub mod tools;

use std::path::{Path, PathBuf};

/// The workspace root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(".."))
}

/// The chart directory, `charts/infermesh`.
pub fn chart_dir() -> PathBuf {
    workspace().join("charts").join("infermesh")
}

/// The release name and namespace every render uses (also those of `k8s/base`).
pub const RELEASE: &str = "infermesh";
/// See [`RELEASE`].
pub const NAMESPACE: &str = "infermesh";

/// Labels only Helm sets; `k8s/base` carries everything else the chart renders.
pub const HELM_ONLY_LABELS: [&str; 2] = ["helm.sh/chart", "app.kubernetes.io/managed-by"];
