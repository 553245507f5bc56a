//! `Mesh`: a pool of agents on the nodes a selector picks, with its pricing and budgets.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{ResourceRequirements, Toleration};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A pool of inference agents: one agent per node matched by `nodeSelector`, run by a
/// DaemonSet the operator owns. Workloads name the Mesh they run on.
#[derive(CustomResource, Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[kube(
    group = "infermesh.dev",
    version = "v1alpha1",
    kind = "Mesh",
    plural = "meshes",
    shortname = "mesh",
    status = "MeshStatus",
    printcolumn = r#"{"name":"READY","type":"integer","jsonPath":".status.agentsReady"}"#,
    printcolumn = r#"{"name":"AGENTS","type":"integer","jsonPath":".status.agentsTotal"}"#,
    printcolumn = r#"{"name":"SLOTS","type":"integer","jsonPath":".status.slots"}"#,
    printcolumn = r#"{"name":"GPUS","type":"integer","jsonPath":".status.gpus"}"#,
    printcolumn = r#"{"name":"AGE","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "self.heartbeatSeconds < self.leaseSeconds",
     "message": "heartbeatSeconds must be shorter than leaseSeconds"}
]))]
pub struct MeshSpec {
    /// Nodes that run an agent of this Mesh. Defaults to `nvidia.com/gpu.present: "true"`.
    #[serde(default = "default_node_selector")]
    pub node_selector: BTreeMap<String, String>,
    /// Tolerations for the agent pods (GPU nodes are often tainted).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    /// How each agent runs.
    #[serde(default)]
    pub agent: AgentTemplate,
    /// Seconds an agent keeps its shards without a heartbeat; after that they are requeued.
    #[serde(default = "default_lease_seconds")]
    #[schemars(extend("minimum" = 2, "maximum" = 3600))]
    pub lease_seconds: u32,
    /// Seconds between agent heartbeats; must be shorter than `leaseSeconds`.
    #[serde(default = "default_heartbeat_seconds")]
    #[schemars(extend("minimum" = 1, "maximum" = 600))]
    pub heartbeat_seconds: u32,
    /// What a completed shard costs, charged once per shard from the Workload's namespace.
    #[serde(default)]
    pub pricing: Pricing,
    /// Credit budgets per namespace; a namespace without an entry is not limited.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub budgets: Vec<Budget>,
}

fn default_node_selector() -> BTreeMap<String, String> {
    BTreeMap::from([("nvidia.com/gpu.present".to_string(), "true".to_string())])
}
fn default_lease_seconds() -> u32 {
    30
}
fn default_heartbeat_seconds() -> u32 {
    5
}

/// How the agents of a Mesh run.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AgentTemplate {
    /// Agent container image; defaults to the image matching the operator's version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Compute resources of the agent container (set `nvidia.com/gpu` limits here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Shards an agent runs at once; each slot has its own ONNX Runtime session.
    #[serde(default = "default_slots")]
    #[schemars(extend("minimum" = 1, "maximum" = 64))]
    pub slots: u32,
    /// Execution providers in order of preference. An agent uses the first that registers;
    /// `cpu` is the fallback only when listed.
    #[serde(default = "default_execution_providers")]
    #[schemars(extend("minItems" = 1))]
    pub execution_providers: Vec<ExecutionProvider>,
    /// ONNX Runtime intra-op threads per slot; defaults to the node's cores divided by slots.
    // The API server does not check `format: uint32`; the maximum keeps a Mesh the operator
    // could not read out of the cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("minimum" = 1, "maximum" = 4294967295u32))]
    pub intra_op_threads: Option<u32>,
    /// Where each agent keeps the models it downloads, and so which Pod Security level its
    /// pods need. `EmptyDir` (the default): a volume of the pod, emptied when the pod is
    /// deleted or replaced (a change to the DaemonSet, an eviction), after which the agent
    /// downloads its models again; the pods meet the "restricted" level. `HostPath`: the
    /// node's directory `/var/cache/infermesh/<mesh>`, kept from one pod to the next and
    /// handed to the agent's user by an init container that runs as root; the pods need the
    /// "privileged" level, so the namespace the agents run in (the operator's) must be
    /// labelled `pod-security.kubernetes.io/enforce=privileged`, or their pods are refused.
    #[serde(default)]
    pub model_cache: ModelCache,
}

/// See [`AgentTemplate::model_cache`].
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
pub enum ModelCache {
    /// An emptyDir volume of the agent pod (Pod Security level "restricted").
    #[default]
    EmptyDir,
    /// A hostPath directory on the node (Pod Security level "privileged").
    HostPath,
}

impl Default for AgentTemplate {
    fn default() -> Self {
        Self {
            image: None,
            resources: None,
            slots: default_slots(),
            execution_providers: default_execution_providers(),
            intra_op_threads: None,
            model_cache: ModelCache::default(),
        }
    }
}

fn default_slots() -> u32 {
    1
}
fn default_execution_providers() -> Vec<ExecutionProvider> {
    vec![ExecutionProvider::Cuda, ExecutionProvider::Cpu]
}

/// An ONNX Runtime execution provider.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum ExecutionProvider {
    /// NVIDIA CUDA.
    Cuda,
    /// NVIDIA TensorRT.
    Tensorrt,
    /// The CPU provider (always available).
    Cpu,
}

impl ExecutionProvider {
    /// The lower-case name used in the protocol and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Cuda => "cuda",
            Self::Tensorrt => "tensorrt",
            Self::Cpu => "cpu",
        }
    }

    /// Parses the lower-case name.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "cuda" => Some(Self::Cuda),
            "tensorrt" => Some(Self::Tensorrt),
            "cpu" => Some(Self::Cpu),
            _ => None,
        }
    }

    /// Whether this provider runs on a GPU.
    pub fn is_gpu(self) -> bool {
        !matches!(self, Self::Cpu)
    }
}

/// Prices in credits; any combination may be set. A shard's charge is
/// `perGpuSecond * gpu seconds + perCpuSecond * cpu seconds + perThousandRecords * records / 1000`,
/// kept in integer micro-credits.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Pricing {
    /// Credits per second a shard holds a GPU.
    #[serde(default)]
    #[schemars(extend("minimum" = 0))]
    pub per_gpu_second: f64,
    /// Credits per second a shard runs on CPU.
    #[serde(default)]
    #[schemars(extend("minimum" = 0))]
    pub per_cpu_second: f64,
    /// Credits per 1,000 records processed.
    #[serde(default)]
    #[schemars(extend("minimum" = 0))]
    pub per_thousand_records: f64,
}

/// A namespace's credit budget on this Mesh.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Budget {
    /// The namespace the budget applies to.
    #[schemars(extend("minLength" = 1))]
    pub namespace: String,
    /// Credits the namespace may spend.
    #[schemars(extend("minimum" = 0))]
    pub credits: f64,
}

/// Observed state of a Mesh.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MeshStatus {
    /// Agents that are Ready.
    #[serde(default)]
    pub agents_ready: u32,
    /// Agents registered, ready or not.
    #[serde(default)]
    pub agents_total: u32,
    /// Slots over Ready agents.
    #[serde(default)]
    pub slots: u32,
    /// GPUs over Ready agents.
    #[serde(default)]
    pub gpus: u32,
    /// The generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Conditions (`Ready`, `DaemonSetReady`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}
