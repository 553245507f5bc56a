//! Validation of a Workload spec beyond what the CRD schema can say, and its translation into
//! what the agents are sent. Pure: unit-tested without any server.

use infermesh_crds::WorkloadSpec;
use infermesh_crds::quantity::parse_bytes;
use infermesh_io::Location;
use infermesh_proto as pb;

use super::scheduler::Needs;

/// Why a spec is invalid: a condition reason and a message naming the field.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{reason}: {message}")]
pub struct Invalid {
    /// CamelCase condition reason (`InvalidSpec`).
    pub reason: &'static str,
    /// What is wrong, naming the field.
    pub message: String,
}

/// The most tokens `maxLength` may ask for (the CRD schema's bound too).
pub const MAX_LENGTH: u32 = 8192;

impl Invalid {
    /// An invalid spec with `reason`.
    pub fn new(reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            reason,
            message: message.into(),
        }
    }
}

fn invalid(message: impl Into<String>) -> Invalid {
    Invalid {
        reason: "InvalidSpec",
        message: message.into(),
    }
}

/// A valid workload, in the protocol's terms.
#[derive(Clone, Debug, PartialEq)]
pub struct Validated {
    /// Target shard size in bytes.
    pub shard_bytes: u64,
    /// The model to send.
    pub model: pb::Model,
    /// The task to send.
    pub task: pb::Task,
    /// What an agent must offer.
    pub needs: Needs,
}

/// URI schemes the data plane reads and writes (through `object_store`).
pub const SCHEMES: [&str; 4] = ["file", "s3", "http", "https"];

/// Checks that `uri` is a URI of a supported scheme. Only the syntax: whether the object
/// exists is for admission (local mode) or the agent to find out.
fn check_uri(field: &str, uri: &str) -> Result<(), Invalid> {
    if uri.starts_with('/') {
        return Location::parse(uri)
            .map(|_| ())
            .map_err(|e| invalid(format!("{field}: {e}")));
    }
    let scheme = uri.split_once("://").map(|(s, _)| s).unwrap_or_default();
    if !SCHEMES.contains(&scheme) {
        return Err(invalid(format!(
            "{field}: `{uri}` is not a file://, s3:// or http(s):// URI"
        )));
    }
    Ok(())
}

/// Checks `spec` and builds what the agents are sent.
pub fn validate(spec: &WorkloadSpec) -> Result<Validated, Invalid> {
    let shard_bytes = spec.shard_size().map_err(invalid)?;
    if spec.batch_size == 0 {
        return Err(invalid("spec.batchSize must be at least 1"));
    }
    if spec.max_attempts == 0 {
        return Err(invalid("spec.maxAttempts must be at least 1"));
    }
    check_uri("spec.model.uri", &spec.model.uri)?;
    check_uri("spec.input.uri", &spec.input.uri)?;
    check_uri("spec.output.uri", &spec.output.uri)?;
    if let Some(sha) = &spec.model.sha256
        && (sha.len() != 64 || !sha.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
    {
        return Err(invalid(
            "spec.model.sha256 must be 64 lower-case hex digits",
        ));
    }
    let kind = match (&spec.task.text_embedding, &spec.task.tensor) {
        (Some(_), Some(_)) | (None, None) => {
            return Err(invalid(
                "spec.task: set exactly one of textEmbedding or tensor",
            ));
        }
        (Some(te), None) => {
            check_uri("spec.task.textEmbedding.tokenizer", &te.tokenizer)?;
            if te.text_field.is_empty() {
                return Err(invalid(
                    "spec.task.textEmbedding.textField must not be empty",
                ));
            }
            if te.max_length > MAX_LENGTH {
                return Err(invalid(format!(
                    "spec.task.textEmbedding.maxLength {} is more than {MAX_LENGTH} tokens; \
                     most encoders support 512 (their position embeddings)",
                    te.max_length
                )));
            }
            if te.max_length == 0 {
                return Err(invalid(
                    "spec.task.textEmbedding.maxLength must be at least 1",
                ));
            }
            pb::task::Kind::TextEmbedding(pb::TextEmbedding {
                tokenizer_uri: te.tokenizer.clone(),
                text_field: te.text_field.clone(),
                max_length: te.max_length,
                normalize: te.normalize,
                output_name: te.output_name.clone().unwrap_or_default(),
            })
        }
        (None, Some(t)) => {
            if t.inputs.is_empty() {
                return Err(invalid(
                    "spec.task.tensor.inputs must name at least one model input",
                ));
            }
            pb::task::Kind::Tensor(pb::Tensor {
                inputs: t
                    .inputs
                    .iter()
                    .map(|i| pb::TensorInput {
                        name: i.name.clone(),
                        field: i.field.clone().unwrap_or_default(),
                    })
                    .collect(),
                outputs: t.outputs.clone(),
            })
        }
    };
    let min_gpu_memory = match &spec.requirements.min_gpu_memory {
        Some(q) => {
            parse_bytes(q).map_err(|e| invalid(format!("spec.requirements.minGpuMemory: {e}")))?
        }
        None => 0,
    };
    Ok(Validated {
        shard_bytes,
        model: pb::Model {
            uri: spec.model.uri.clone(),
            sha256: spec.model.sha256.clone().unwrap_or_default(),
        },
        task: pb::Task {
            kind: Some(kind),
            id_field: spec.output.id_field.clone(),
        },
        needs: Needs {
            gpu: spec.requirements.gpu || min_gpu_memory > 0,
            min_gpu_memory,
            provider: spec
                .requirements
                .execution_provider
                .map(|p| p.as_str().to_string()),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use infermesh_crds::{Manifest, parse_manifests};

    fn spec(extra: &str) -> WorkloadSpec {
        let yaml = format!(
            "apiVersion: infermesh.dev/v1alpha1\nkind: Workload\nmetadata: {{name: w}}\nspec:\n  mesh: m\n  \
             model: {{uri: \"file:///m.onnx\"}}\n  input: {{uri: \"file:///in.jsonl\"}}\n  output: {{uri: \"file:///out\"}}\n{extra}"
        );
        match parse_manifests(&yaml).expect("parses").pop() {
            Some(Manifest::Workload(w)) => w.spec,
            other => panic!("not a workload: {other:?}"),
        }
    }

    #[test]
    fn max_length_is_bounded() {
        let te = |n: u32| {
            format!(
                "  task: {{textEmbedding: {{tokenizer: \"file:///t.json\", maxLength: {n}}}}}\n"
            )
        };
        assert!(validate(&spec(&te(512))).is_ok());
        let err = validate(&spec(&te(100_000))).expect_err("too long");
        assert!(err.message.contains("maxLength 100000"), "{err}");
    }

    #[test]
    fn a_tensor_workload_translates_to_the_protocol() {
        let v = validate(&spec("  task: {tensor: {inputs: [{name: x, field: feats}], outputs: [y]}}\n  shardBytes: 2Ki\n"))
            .expect("valid");
        assert_eq!(v.shard_bytes, 2048);
        let Some(pb::task::Kind::Tensor(t)) = v.task.kind else {
            panic!("tensor")
        };
        assert_eq!(t.inputs[0].field, "feats");
        assert_eq!(v.task.id_field, "id");
    }

    #[test]
    fn both_tasks_or_none_is_invalid_spec() {
        let both = spec(
            "  task: {tensor: {inputs: [{name: x}]}, textEmbedding: {tokenizer: \"file:///t.json\"}}\n",
        );
        let err = validate(&both).expect_err("both");
        assert_eq!(err.reason, "InvalidSpec");
        assert!(err.message.contains("exactly one"), "{err}");
        assert!(validate(&spec("  task: {}\n")).is_err());
    }

    #[test]
    fn bad_quantities_and_hashes_name_their_field() {
        let err = validate(&spec(
            "  task: {tensor: {inputs: [{name: x}]}}\n  shardBytes: 1Zi\n",
        ))
        .expect_err("unit");
        assert!(err.message.starts_with("spec.shardBytes"), "{err}");
        let err = validate(&spec(
            "  task: {tensor: {inputs: [{name: x}]}}\n  requirements: {minGpuMemory: lots}\n",
        ))
        .expect_err("qty");
        assert!(err.message.contains("minGpuMemory"), "{err}");
        let mut s = spec("  task: {tensor: {inputs: [{name: x}]}}\n");
        s.model.sha256 = Some("ABC".into());
        assert!(validate(&s).expect_err("sha").message.contains("sha256"));
    }

    #[test]
    fn unknown_uri_schemes_are_invalid_spec() {
        let mut s = spec("  task: {tensor: {inputs: [{name: x}]}}\n");
        s.input.uri = "ftp://host/in.jsonl".into();
        let err = validate(&s).expect_err("scheme");
        assert!(err.message.starts_with("spec.input.uri"), "{err}");
        s.input.uri = "s3://bucket/in.jsonl".into();
        assert!(validate(&s).is_ok());
    }

    #[test]
    fn gpu_memory_implies_a_gpu() {
        let v = validate(&spec(
            "  task: {tensor: {inputs: [{name: x}]}}\n  requirements: {minGpuMemory: 8Gi}\n",
        ))
        .expect("valid");
        assert!(v.needs.gpu);
        assert_eq!(v.needs.min_gpu_memory, 8 << 30);
    }
}
