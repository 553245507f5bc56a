//! Helpers shared by the deploy tests.
#![allow(dead_code)] // each test file uses its own subset

use std::sync::Arc;

use infermesh_deploy::chart::{MATRIX, Rendered, render};
use infermesh_deploy::strict::{Typed, check};
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
