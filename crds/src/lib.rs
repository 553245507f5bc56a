//! Custom resources of infermesh: [`Mesh`], [`Agent`] and [`Workload`]
//! (group `infermesh.dev`, version `v1alpha1`).
//!
//! The CRD YAML under `crds/yaml/` is generated from these types (`infermesh crd`), and a test
//! fails when the committed YAML drifts from them. Doc comments on fields become the schema
//! descriptions that `kubectl explain` shows, so every field has one.
#![forbid(unsafe_code)]

pub mod agent;
pub mod manifest;
pub mod mesh;
pub mod quantity;
pub mod workload;

pub use agent::{Agent, AgentPhase, AgentSpec, AgentStatus};
pub use manifest::{Manifest, ManifestError, parse_manifests};
pub use mesh::{
    AgentTemplate, Budget, ExecutionProvider, Mesh, MeshSpec, MeshStatus, ModelCache, Pricing,
    TenantSpec,
};
pub use workload::{
    CredentialsRef, InputCompression, InputFormat, InputSpec, ModelRef, OutputCompression,
    OutputFormat, OutputMode, OutputSpec, Requirements, SecretRef, ShardCounts, TaskSpec,
    TensorInput, TensorTask, TextEmbeddingTask, Workload, WorkloadPhase, WorkloadSpec,
    WorkloadStatus,
};

/// The API group of every infermesh resource.
pub const GROUP: &str = "infermesh.dev";

/// All CRDs, in the order they should be applied.
pub fn all_crds()
-> Vec<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition>
{
    use kube::CustomResourceExt;
    vec![Mesh::crd(), Agent::crd(), Workload::crd()]
}

/// The CRDs as one multi-document YAML stream (what `infermesh crd` prints and what is
/// committed under `crds/yaml/`).
pub fn crds_yaml() -> Result<String, serde_yaml::Error> {
    let mut out = String::new();
    for crd in all_crds() {
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(&crd)?);
    }
    Ok(out)
}
