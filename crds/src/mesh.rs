//! `Mesh`: a pool of agents on the nodes a selector picks, with its pricing, budgets and
//! fair share of slots among namespaces.

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
    /// Fair share of this Mesh's slots among namespaces. While workloads of several
    /// namespaces wait, each free slot goes to the namespace with the lowest share in use
    /// (slots it holds divided by its weight), so over time each holds slots in proportion to
    /// its weight; a namespace alone with pending work may use every slot (it borrows what
    /// the others leave unused), and `maxSlots` caps it in any case. A namespace without an
    /// entry has weight `defaultWeight` and no cap. Within a namespace, workloads run by
    /// priority, raised the longer they wait (see `agingSeconds`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["namespace"]))]
    pub queues: Vec<QueueSpec>,
    /// Weight of a namespace with no entry in `queues`.
    #[serde(default = "default_weight")]
    #[schemars(extend("minimum" = 1, "maximum" = 1000))]
    pub default_weight: u32,
    /// Seconds a workload waits, from its admission, for each point its effective priority
    /// gains (up to the highest priority, 1000), so that a low-priority workload is not
    /// starved by a stream of higher-priority ones. 0 turns aging off.
    #[serde(default = "default_aging_seconds")]
    #[schemars(extend("minimum" = 0, "maximum" = 86400))]
    pub aging_seconds: u32,
    /// Which locations each namespace's workloads may use. When the list is present, a
    /// workload may read its model, tokenizer and input only under its namespace's `read`
    /// prefixes and write its output only under its `write` prefixes (a namespace without an
    /// entry may use none); anything else is refused at admission with `Forbidden`, before
    /// any object is touched, and agents refuse such an Assign too. Absent: no restriction
    /// (a single-tenant mesh).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["namespace"]))]
    pub tenants: Option<Vec<TenantSpec>>,
}

/// The locations one namespace's workloads may use on a Mesh.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct TenantSpec {
    /// The namespace this entry applies to.
    #[schemars(extend("minLength" = 1, "maxLength" = 63))]
    pub namespace: String,
    /// URI prefixes its models, tokenizers and inputs may come from (`s3://team-a/`,
    /// `file:///data/team-a/`). A prefix ending in `/` covers what is below it; one that does
    /// not also covers the object of exactly that name.
    #[serde(default)]
    pub read: Vec<String>,
    /// URI prefixes its outputs may be written under.
    #[serde(default)]
    pub write: Vec<String>,
}

/// The highest weight of a namespace on a Mesh (the CRD schema's bound too).
pub const MAX_WEIGHT: u32 = 1000;

/// A namespace's share of a Mesh's slots.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct QueueSpec {
    /// The namespace this entry applies to.
    #[schemars(extend("minLength" = 1, "maxLength" = 63))]
    pub namespace: String,
    /// Its weight: with pending work everywhere, namespaces hold slots in proportion to their
    /// weights.
    #[serde(default = "default_weight")]
    #[schemars(extend("minimum" = 1, "maximum" = 1000))]
    pub weight: u32,
    /// The most slots its shards may hold at once on this Mesh (running or being committed),
    /// even when the others leave slots unused. No cap when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("minimum" = 0, "maximum" = 4294967295u32))]
    pub max_slots: Option<u32>,
}

/// What a namespace may use of a Mesh's slots: its weight (1 to [`MAX_WEIGHT`]) and its cap.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Share {
    /// Weight, within bounds.
    pub weight: u32,
    /// `maxSlots`, if any.
    pub max_slots: Option<u32>,
}

impl MeshSpec {
    /// The share of `namespace`: its `queues` entry, else the default weight and no cap.
    /// Weights out of bounds (possible only without an API server to check them) are brought
    /// within them.
    pub fn share_of(&self, namespace: &str) -> Share {
        let (weight, max_slots) = self
            .queues
            .iter()
            .find(|q| q.namespace == namespace)
            .map_or((self.default_weight, None), |q| (q.weight, q.max_slots));
        Share {
            weight: weight.clamp(1, MAX_WEIGHT),
            max_slots,
        }
    }
}

fn default_weight() -> u32 {
    1
}
fn default_aging_seconds() -> u32 {
    60
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

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(yaml: &str) -> MeshSpec {
        serde_yaml::from_str(yaml).expect("mesh spec")
    }

    #[test]
    fn queues_give_weights_and_caps_and_the_rest_get_the_default() {
        let s =
            spec("queues:\n- {namespace: team-a, weight: 3, maxSlots: 6}\n- {namespace: team-b}\n");
        assert_eq!(
            s.share_of("team-a"),
            Share {
                weight: 3,
                max_slots: Some(6)
            }
        );
        assert_eq!(s.share_of("team-b").weight, 1, "weight defaults to 1");
        assert_eq!(
            s.share_of("other"),
            Share {
                weight: 1,
                max_slots: None
            }
        );
        assert_eq!(s.aging_seconds, 60);
        let s = spec(
            "defaultWeight: 4\nqueues: [{namespace: x, weight: 0}, {namespace: y, weight: 5000}]\n",
        );
        assert_eq!(s.share_of("other").weight, 4);
        // Out of the schema's bounds (no API server in local mode): brought within them.
        assert_eq!(s.share_of("x").weight, 1);
        assert_eq!(s.share_of("y").weight, MAX_WEIGHT);
        let json =
            serde_json::to_value(spec("queues: [{namespace: a, maxSlots: 2}]\n")).expect("json");
        assert_eq!(json["queues"][0]["maxSlots"], 2, "camelCase on the wire");
    }
}
