//! Helpers shared by the deploy tests.
#![allow(dead_code)] // each test file uses its own subset

use std::path::{Path, PathBuf};
use std::sync::Arc;

use infermesh_deploy::chart::{MATRIX, Rendered, render};
use infermesh_deploy::strict::{Typed, check};
use infermesh_deploy::workspace;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::EnvVar;

/// The chart rendered with `values`; a failure (tools missing included) fails the test.
pub fn rendered(values: &[&str]) -> Arc<Rendered> {
    render(values).unwrap_or_else(|e| panic!("rendering with {values:?}: {e}"))
}

/// Every case of the matrix, rendered.
pub fn matrix() -> Vec<(String, Arc<Rendered>)> {
    MATRIX
        .iter()
        .map(|v| {
            let name = if v.is_empty() {
                "defaults".to_string()
            } else {
                v.join(" + ")
            };
            (name, rendered(v))
        })
        .collect()
}

/// The operator Deployment of a render.
pub fn operator(r: &Rendered) -> Deployment {
    let obj = r
        .get("Deployment", "infermesh")
        .expect("operator Deployment");
    match check(obj).expect("typed") {
        Typed::Deployment(d) => *d,
        _ => unreachable!("a Deployment types as one"),
    }
}

/// The operator container's environment variable `name`.
pub fn env(d: &Deployment, name: &str) -> Option<EnvVar> {
    let spec = d.spec.as_ref()?.template.spec.as_ref()?;
    spec.containers[0]
        .env
        .iter()
        .flatten()
        .find(|e| e.name == name)
        .cloned()
}

/// The literal value of `name`, if it has one.
pub fn env_value(d: &Deployment, name: &str) -> Option<String> {
    env(d, name).and_then(|e| e.value)
}

/// Every YAML file under `examples/`, sorted.
pub fn example_files() -> Vec<PathBuf> {
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

/// A path relative to the workspace, for messages.
pub fn relative(p: &Path) -> String {
    p.strip_prefix(workspace())
        .unwrap_or(p)
        .display()
        .to_string()
}

/// The examples every test of them expects to find.
pub const EXPECTED_EXAMPLES: [&str; 4] = [
    "examples/mesh.yaml",
    "examples/workload-embed.yaml",
    "examples/workload-tensor.yaml",
    "examples/quickstart/quickstart.yaml",
];

/// `kubectl kustomize DIR` (relative to the workspace), its YAML output.
pub fn kustomize_text(dir: &str) -> String {
    let kubectl = infermesh_deploy::tools::kubectl().unwrap_or_else(|e| panic!("{e:#}"));
    let out = std::process::Command::new(&kubectl)
        .arg("kustomize")
        .arg(infermesh_deploy::workspace().join(dir))
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", kubectl.display()));
    assert!(
        out.status.success(),
        "kubectl kustomize {dir} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
