//! `Agent`: one per (mesh, node), created by the operator when an agent registers.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// An inference agent on one node, as the operator sees it. Created by the operator when the
/// agent registers over gRPC; set `spec.unschedulable: true` to drain it.
#[derive(CustomResource, Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[kube(
    group = "infermesh.dev",
    version = "v1alpha1",
    kind = "Agent",
    plural = "agents",
    status = "AgentStatus",
    printcolumn = r#"{"name":"MESH","type":"string","jsonPath":".spec.mesh"}"#,
    printcolumn = r#"{"name":"NODE","type":"string","jsonPath":".spec.node"}"#,
    printcolumn = r#"{"name":"GPU","type":"string","jsonPath":".status.gpuSummary"}"#,
    printcolumn = r#"{"name":"STATUS","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"RUNNING","type":"integer","jsonPath":".status.running"}"#,
    printcolumn = r#"{"name":"DONE","type":"integer","jsonPath":".status.completedShards"}"#,
    printcolumn = r#"{"name":"CREDITS","type":"string","jsonPath":".status.credits"}"#,
    printcolumn = r#"{"name":"AGE","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct AgentSpec {
    /// The Mesh this agent belongs to.
    #[schemars(extend("minLength" = 1))]
    pub mesh: String,
    /// The node it runs on.
    #[schemars(extend("minLength" = 1))]
    pub node: String,
    /// When true the agent gets no new shards; running ones finish.
    #[serde(default)]
    pub unschedulable: bool,
}

/// Lifecycle phase of an agent.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
pub enum AgentPhase {
    /// Registered, heartbeating, taking shards.
    Ready,
    /// Registered and heartbeating, but `unschedulable`: finishes what it runs.
    Draining,
    /// Missed its lease or its stream dropped; its shards were requeued.
    #[default]
    NotReady,
}

/// GPUs on the agent's node.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct GpuInfo {
    /// Product name, e.g. `NVIDIA A10`.
    pub product: String,
    /// Memory per GPU in bytes.
    pub memory_bytes: u64,
    /// Number of GPUs.
    pub count: u32,
}

/// Observed state of an agent.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AgentStatus {
    /// Ready, Draining or NotReady.
    #[serde(default)]
    pub phase: AgentPhase,
    /// GPUs the agent found, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu: Option<GpuInfo>,
    /// A short form of `gpu` for `kubectl get` (`2x NVIDIA A10` or `none`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_summary: Option<String>,
    /// Execution providers that registered on this node, in preference order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub execution_providers: Vec<String>,
    /// sha256 of models in the node's cache.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub models_cached: Vec<String>,
    /// sha256 of models with a live session.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub models_loaded: Vec<String>,
    /// Shards the agent runs at once.
    #[serde(default)]
    pub slots: u32,
    /// Shards running now.
    #[serde(default)]
    pub running: u32,
    /// Shards completed (and charged) on this agent.
    #[serde(default)]
    pub completed_shards: u64,
    /// Credits earned, as a decimal string.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credits: Option<String>,
    /// When the last heartbeat arrived (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_heartbeat: Option<String>,
    /// Conditions (`Ready`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}
