//! `Workload`: a model and a dataset to run through it on a Mesh.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::mesh::ExecutionProvider;

/// The annotation that asks the operator to retry a Failed Workload: each new value retries
/// it once (see [`WorkloadStatus::last_retry`]), e.g.
/// `kubectl annotate workload NAME infermesh.dev/retry="$(date +%s)" --overwrite`.
pub const RETRY_ANNOTATION: &str = "infermesh.dev/retry";

/// A batch inference job: the operator splits `input` into shards, runs them on the agents of
/// `mesh` through `model`, and writes one output part per shard under `output.uri`.
#[derive(CustomResource, Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[kube(
    group = "infermesh.dev",
    version = "v1alpha1",
    kind = "Workload",
    plural = "workloads",
    shortname = "wl",
    namespaced,
    status = "WorkloadStatus",
    printcolumn = r#"{"name":"MESH","type":"string","jsonPath":".spec.mesh"}"#,
    printcolumn = r#"{"name":"STATUS","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"PROGRESS","type":"string","jsonPath":".status.progress"}"#,
    printcolumn = r#"{"name":"ETA","type":"string","jsonPath":".status.eta"}"#,
    printcolumn = r#"{"name":"CREDITS","type":"string","jsonPath":".status.creditsSpent"}"#,
    printcolumn = r#"{"name":"AGE","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadSpec {
    /// The Mesh whose agents run this workload.
    #[schemars(extend("minLength" = 1))]
    pub mesh: String,
    /// The ONNX model.
    pub model: ModelRef,
    /// What to do with each record.
    pub task: TaskSpec,
    /// The dataset.
    pub input: InputSpec,
    /// Where output parts and `_SUCCESS.json` go.
    pub output: OutputSpec,
    /// Target shard size in bytes of input: a quantity (`1Mi`, `256Ki`) or a plain number of
    /// bytes (`131072`); at least `1Ki`. Shards are aligned to record boundaries, so a shard
    /// may be slightly larger or smaller.
    #[serde(
        default = "default_shard_bytes",
        deserialize_with = "crate::quantity::int_or_string"
    )]
    #[schemars(schema_with = "crate::quantity::int_or_string_schema")]
    pub shard_bytes: String,
    /// Records per ONNX Runtime call.
    #[serde(default = "default_batch_size")]
    #[schemars(extend("minimum" = 1, "maximum" = 4096))]
    pub batch_size: u32,
    /// 0 to 1000; higher runs first when workloads of the same namespace compete for the
    /// namespace's share of the Mesh's slots (namespaces share slots by the Mesh's
    /// `queues` weights, whatever the priorities). A waiting workload's effective priority
    /// grows with the time it has waited (the Mesh's `agingSeconds`), so none is starved.
    #[serde(default)]
    #[schemars(extend("minimum" = 0, "maximum" = 1000))]
    pub priority: i32,
    /// Attempts per shard before the shard, and the workload, fail.
    #[serde(default = "default_max_attempts")]
    #[schemars(extend("minimum" = 1, "maximum" = 20))]
    pub max_attempts: u32,
    /// Seconds one shard attempt may run without a report before the operator takes it back
    /// (Cancel to the agent) and requeues it: a hung agent that still heartbeats. Unset: no
    /// limit but the agent's lease.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("minimum" = 1, "maximum" = 604800))]
    pub shard_timeout_seconds: Option<u32>,
    /// Seconds the workload may run, counted from when it started running (its admission,
    /// or its last retry); the count survives an operator restart. When it passes, the
    /// workload fails with reason `DeadlineExceeded`: running shards are cancelled on their
    /// agents and nothing more is charged (a completion that arrives later is refused).
    /// Unset: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("minimum" = 1, "maximum" = 4294967295u32))]
    pub active_deadline_seconds: Option<u32>,
    /// Base of the wait between a shard's failed attempt and its next one, in seconds: after
    /// its n-th attempt (since the workload's last retry) fails — a retryable error from the
    /// agent, a part that does not match its report, or the shard timeout — the shard waits
    /// `retryBackoffSeconds × 2^(n-1)`, at most 300 s, before it can be dispatched again.
    /// Attempts lost with their agent (lease expired, stream ended) are requeued at once: not
    /// the shard's fault. 0: no wait.
    #[serde(default = "default_retry_backoff_seconds")]
    #[schemars(extend("minimum" = 0, "maximum" = 300))]
    pub retry_backoff_seconds: u32,
    /// Bump to retry a Failed workload: when it is above `status.observedRetryGeneration`,
    /// the shards that had not succeeded run again (each with `maxAttempts` fresh attempts)
    /// and only they are charged; succeeded shards keep their parts and their one charge. The
    /// value acted on is written to `status.observedRetryGeneration`, so each bump retries
    /// once. Like the `infermesh.dev/retry` annotation, which still works; a bump while the
    /// workload is not Failed waits until it is.
    #[serde(default)]
    #[schemars(extend("minimum" = 0, "maximum" = 4294967295u32))]
    pub retry_generation: u32,
    /// Seconds after the workload finished (`status.completionTime`, Succeeded or Failed)
    /// at which the operator deletes the Workload object. Its history stays in the event log
    /// and the ledger (`infermesh ledger`, the console's history). Unset: kept until deleted
    /// by hand. Ignored by `infermesh local`, which has no object to delete.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("minimum" = 0, "maximum" = 4294967295u32))]
    pub ttl_seconds_after_finished: Option<u32>,
    /// What an agent must offer to run this workload.
    #[serde(default)]
    pub requirements: Requirements,
    /// When true no new shards are dispatched; running ones finish.
    #[serde(default)]
    pub suspend: bool,
    /// The object-store credentials this workload's reads and writes use, from a Secret in
    /// the workload's own namespace. The operator reads the Secret (it needs `get` on
    /// Secrets there: the chart's `tenants.namespaces`) and hands its values to an agent
    /// inside the Assign of each of this workload's shards; neither writes them anywhere.
    /// Unset: the credentials the operator and agents run with (the Mesh-wide secret, if any).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials: Option<CredentialsRef>,
}

/// Where a workload's object-store credentials are.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct CredentialsRef {
    /// A Secret in the workload's namespace. Its keys: `AWS_ACCESS_KEY_ID` and
    /// `AWS_SECRET_ACCESS_KEY` (with `AWS_SESSION_TOKEN`, `AWS_REGION` if needed) for S3, or
    /// `token` for an http(s) bearer token. The endpoint is the Mesh's, never the Secret's.
    pub secret_ref: SecretRef,
}

/// A Secret named in the referring object's own namespace.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct SecretRef {
    /// The Secret's name.
    #[schemars(extend("minLength" = 1, "maxLength" = 253))]
    pub name: String,
}

fn default_shard_bytes() -> String {
    crate::quantity::DEFAULT_SHARD_BYTES.to_string()
}

impl WorkloadSpec {
    /// `shardBytes` in bytes: a message naming `spec.shardBytes` when it is not a byte
    /// quantity or is below [`crate::quantity::MIN_SHARD_BYTES`] (a tiny shard size would cut
    /// an input into a shard per record or more).
    pub fn shard_size(&self) -> Result<u64, String> {
        crate::quantity::parse_shard_bytes(&self.shard_bytes)
            .map_err(|e| format!("spec.shardBytes: {e}"))
    }
}
fn default_batch_size() -> u32 {
    32
}
fn default_max_attempts() -> u32 {
    3
}
fn default_retry_backoff_seconds() -> u32 {
    2
}

/// Where the model is and what it must hash to.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ModelRef {
    /// `file://`, `s3://` or `http(s)://` URI of the `.onnx` file.
    #[schemars(extend("minLength" = 1))]
    pub uri: String,
    /// Hex sha256 of the file. Agents cache models by it and refuse a file that does not
    /// match. When omitted the agent hashes what it fetches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("pattern" = "^[0-9a-f]{64}$"))]
    pub sha256: Option<String>,
}

/// The task: exactly one of `textEmbedding` or `tensor`.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "has(self.textEmbedding) != has(self.tensor)",
     "message": "set exactly one of textEmbedding or tensor"}
]))]
pub struct TaskSpec {
    /// Embed a text field: tokenizer -> model -> mean pooling -> optional L2 normalisation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text_embedding: Option<TextEmbeddingTask>,
    /// Feed named numeric tensors from each record to the model; write named outputs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tensor: Option<TensorTask>,
}

/// Text embedding with a Hugging Face `tokenizer.json`.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TextEmbeddingTask {
    /// URI of `tokenizer.json`.
    #[schemars(extend("minLength" = 1))]
    pub tokenizer: String,
    /// The record field holding the text; a dotted path (`doc.body`) reaches into nested
    /// objects (and Parquet struct columns) when no field has the whole name.
    #[serde(default = "default_text_field")]
    pub text_field: String,
    /// Tokens kept per text; longer texts are truncated.
    #[serde(default = "default_max_length")]
    #[schemars(extend("minimum" = 1, "maximum" = 8192))]
    pub max_length: u32,
    /// L2-normalise each embedding.
    #[serde(default = "default_true")]
    pub normalize: bool,
    /// The model output holding per-token states `[batch, tokens, dim]`; defaults to the
    /// model's first output.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_name: Option<String>,
}

fn default_text_field() -> String {
    "text".to_string()
}
fn default_max_length() -> u32 {
    256
}
fn default_true() -> bool {
    true
}

/// Named tensors in, named tensors out.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TensorTask {
    /// Model inputs and the record fields that hold them (nested numeric arrays, one
    /// record's worth without the batch dimension).
    #[schemars(extend("minItems" = 1))]
    pub inputs: Vec<TensorInput>,
    /// Model outputs to write; all of them when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub outputs: Vec<String>,
}

/// One model input fed from a record field.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TensorInput {
    /// The model input's name.
    #[schemars(extend("minLength" = 1))]
    pub name: String,
    /// The record field; defaults to `name`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

/// The dataset.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct InputSpec {
    /// `file://`, `s3://` or `http(s)://` URI of the input: one object
    /// (`s3://b/docs.jsonl`), every object under a prefix (a URI ending in `/`:
    /// `s3://b/docs/`), or the objects under a directory whose names match a glob
    /// (`s3://b/docs/part-*.parquet`; `*` stays within a path segment, `**` crosses them).
    /// Under a prefix or glob, names whose segments start with `_` or `.` (`_SUCCESS`,
    /// `.crc` files) are skipped. Files are read in the order of their URIs.
    #[schemars(extend("minLength" = 1))]
    pub uri: String,
    /// Record format: `jsonl` (one JSON object per line, the default), `csv` (a header line
    /// naming the columns; every value is read as text) or `parquet` (sharded by row group;
    /// nested columns read as nested JSON).
    #[serde(default)]
    pub format: InputFormat,
    /// Compression of `jsonl` and `csv` files: `none`, `gzip` or `zstd`. Unset: each file's
    /// name says (`.gz`, `.zst`). A compressed file is read whole by one shard (several small
    /// ones may share a shard); uncompressed files are cut into byte ranges. Parquet files
    /// compress their pages themselves and take none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compression: Option<InputCompression>,
    /// `csv`: the field separator, one character (`\t` for TSV); `,` when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("minLength" = 1, "maxLength" = 1))]
    pub delimiter: Option<String>,
}

/// Input record formats.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum InputFormat {
    /// One JSON object per line.
    #[default]
    Jsonl,
    /// Comma-separated values with a header line.
    Csv,
    /// Apache Parquet.
    Parquet,
}

/// Whole-file compression of text inputs.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum InputCompression {
    /// Plain text.
    None,
    /// gzip (any number of members).
    Gzip,
    /// Zstandard (any number of frames).
    Zstd,
}

/// Where results go.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct OutputSpec {
    /// A directory URI; shard `n` writes `part-0000n.jsonl` there, and `_SUCCESS.json` is
    /// written when every shard is done.
    #[schemars(extend("minLength" = 1))]
    pub uri: String,
    /// A record field copied to its output line so results can be joined back; omitted from
    /// the output when a record lacks it.
    #[serde(default = "default_id_field")]
    pub id_field: String,
    /// What a new run does with a location that already holds a run's output (its parts,
    /// `_SUCCESS.json`, `_attempts/`): `error` (the default) refuses it, naming what is there;
    /// `overwrite` removes those first. Other files are never touched, and a run that resumes
    /// continues where it was.
    #[serde(default)]
    pub mode: OutputMode,
    /// Part format: `jsonl` (one JSON object per line, the default) or `parquet` (a column
    /// named by `idField` holding each record's id as text, then `embedding` as a fixed-size
    /// list of float32, or one column per output tensor, its values flattened to float32).
    #[serde(default)]
    pub format: OutputFormat,
    /// `parquet`: compress the columns with `zstd`, or `none`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compression: Option<OutputCompression>,
}

/// Output part formats.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum OutputFormat {
    /// `part-NNNNN.jsonl`.
    #[default]
    Jsonl,
    /// `part-NNNNN.parquet`.
    Parquet,
}

impl OutputFormat {
    /// The parts' file extension (and the protocol's name of the format).
    pub fn extension(self) -> &'static str {
        match self {
            Self::Jsonl => "jsonl",
            Self::Parquet => "parquet",
        }
    }
}

/// Compression of Parquet output.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum OutputCompression {
    /// Uncompressed pages.
    None,
    /// Zstandard pages.
    Zstd,
}

/// See [`OutputSpec::mode`].
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum OutputMode {
    /// Refuse a location that holds a run's output.
    #[default]
    Error,
    /// Remove a previous run's output first.
    Overwrite,
}

fn default_id_field() -> String {
    "id".to_string()
}

/// What an agent must offer.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Requirements {
    /// Run only on agents with a GPU execution provider.
    #[serde(default)]
    pub gpu: bool,
    /// Minimum memory per GPU (a quantity, `8Gi`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("pattern" = "^[0-9]+(\\.[0-9]+)?(Ki|Mi|Gi|Ti|k|K|M|G|T)?$"))]
    pub min_gpu_memory: Option<String>,
    /// Run only where this execution provider registered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub execution_provider: Option<ExecutionProvider>,
}

/// Lifecycle phase of a workload.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq, Hash)]
pub enum WorkloadPhase {
    /// Not yet admitted (see conditions for why it waits).
    #[default]
    Pending,
    /// Admitted and planned; shards are being dispatched.
    Running,
    /// Every shard succeeded and the manifest is written.
    Succeeded,
    /// A shard exhausted its attempts or hit a non-retryable error, or the spec is invalid.
    Failed,
}

impl WorkloadPhase {
    /// Succeeded or Failed.
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed)
    }
}

/// Shard counts by state.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ShardCounts {
    /// All shards of the plan.
    pub total: u32,
    /// Waiting for a slot.
    pub pending: u32,
    /// Assigned to an agent.
    pub running: u32,
    /// Done and charged.
    pub succeeded: u32,
    /// Out of attempts or failed for good.
    pub failed: u32,
}

/// Observed state of a workload.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadStatus {
    /// Pending, Running, Succeeded or Failed.
    #[serde(default)]
    pub phase: WorkloadPhase,
    /// Shard counts.
    #[serde(default)]
    pub shards: ShardCounts,
    /// Records written by succeeded shards.
    #[serde(default)]
    pub records: u64,
    /// Share of input bytes done, e.g. `42%`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<String>,
    /// Records per second since the workload started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub throughput: Option<f64>,
    /// Estimated time left, e.g. `3m12s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eta: Option<String>,
    /// Credits charged so far, as a decimal string.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credits_spent: Option<String>,
    /// Shard attempts beyond the first (requeues and retries).
    #[serde(default)]
    pub attempts_retried: u32,
    /// The value of the `infermesh.dev/retry` annotation the operator last acted on. Giving
    /// the annotation a new value while the Workload is Failed retries it once: the shards
    /// that had not succeeded run again, each with `spec.maxAttempts` fresh attempts, while
    /// succeeded shards keep their parts and are not charged again; the phase goes back to
    /// Running and, when they succeed, the Workload finishes as any other. Written by the
    /// operator, under a field manager of its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_retry: Option<String>,
    /// The `spec.retryGeneration` the operator last acted on (see there). Written by the
    /// operator, under the same field manager as `lastRetry`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_retry_generation: Option<u32>,
    /// When the first shard was dispatched (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<String>,
    /// When the workload reached Succeeded or Failed (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<String>,
    /// The generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Conditions (`Admitted`, `Running` (False with `WaitingForSlots` and the place in the
    /// queue while it waits for slots), `Progressing`, `Complete`, `Failed`) with specific
    /// reasons.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}
