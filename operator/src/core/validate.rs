//! Validation of a Workload spec beyond what the CRD schema can say, and its translation into
//! what the agents are sent. Pure: unit-tested without any server.

use infermesh_crds::WorkloadSpec;
use infermesh_crds::quantity::parse_bytes;
use infermesh_crds::workload::{InputCompression, InputFormat, OutputCompression, OutputFormat};
use infermesh_io::Location;
use infermesh_io::dataset::{Compression, Format, Want};
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

/// The highest `spec.priority` (the CRD schema's bound too); the lowest is 0.
pub const MAX_PRIORITY: i32 = 1000;

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
    /// What the input must be (format, compression, columns the task reads).
    pub input: Want,
    /// The CSV field separator.
    pub delimiter: u8,
    /// The parts' format.
    pub output_format: OutputFormat,
    /// Parquet parts: zstd-compressed columns.
    pub output_zstd: bool,
}

/// URI schemes the data plane reads and writes (through `object_store`).
pub const SCHEMES: [&str; 4] = ["file", "s3", "http", "https"];

/// Checks that `uri` is a URI of a supported scheme. Only the syntax: whether the object
/// exists is for admission (local mode) or the agent to find out.
fn check_uri(field: &str, uri: &str) -> Result<(), Invalid> {
    // No `..`: a location is what it says, never a way out of a prefix.
    infermesh_io::access::plain(uri).map_err(|e| invalid(format!("{field}: {e}")))?;
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
    if !(0..=MAX_PRIORITY).contains(&spec.priority) {
        return Err(invalid(format!(
            "spec.priority {} is out of range: it must be from 0 to {MAX_PRIORITY} (higher runs \
             first within its namespace's share)",
            spec.priority
        )));
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
    let (input, delimiter) = input_want(spec)?;
    let output_zstd = match (spec.output.format, spec.output.compression) {
        (_, None | Some(OutputCompression::None)) => false,
        (OutputFormat::Parquet, Some(OutputCompression::Zstd)) => true,
        (OutputFormat::Jsonl, Some(OutputCompression::Zstd)) => {
            return Err(invalid(
                "spec.output.compression applies to `parquet` parts; JSONL parts are written \
                 uncompressed",
            ));
        }
    };
    Ok(Validated {
        input,
        delimiter,
        output_format: spec.output.format,
        output_zstd,
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

/// The first segment of a dotted field path (`doc.body` -> `doc`): the column that holds it.
fn root(path: &str) -> String {
    path.split('.').next().unwrap_or(path).to_string()
}

/// What the input must be: its format and compression, and the top-level columns the task
/// reads (checked in Parquet footers at admission); the CSV delimiter.
fn input_want(spec: &WorkloadSpec) -> Result<(Want, u8), Invalid> {
    let format = match spec.input.format {
        InputFormat::Jsonl => Format::Jsonl,
        InputFormat::Csv => Format::Csv,
        InputFormat::Parquet => Format::Parquet,
    };
    let compression = spec.input.compression.map(|c| match c {
        InputCompression::None => Compression::None,
        InputCompression::Gzip => Compression::Gzip,
        InputCompression::Zstd => Compression::Zstd,
    });
    if format == Format::Parquet && compression.is_some_and(|c| c != Compression::None) {
        return Err(invalid(
            "spec.input.compression: Parquet files compress their own pages; leave it unset",
        ));
    }
    let delimiter = match spec.input.delimiter.as_deref() {
        None => b',',
        Some(d) if d.len() == 1 && d.is_ascii() && d != "\"" && d != "\n" && d != "\r" => {
            d.as_bytes()[0]
        }
        Some(d) => {
            return Err(invalid(format!(
                "spec.input.delimiter `{}` must be one ASCII character other than a quote or \
                 a line break",
                d.escape_default()
            )));
        }
    };
    if spec.input.delimiter.is_some() && format != Format::Csv {
        return Err(invalid("spec.input.delimiter applies to `csv` input only"));
    }
    let mut columns = Vec::new();
    if let Some(te) = &spec.task.text_embedding {
        columns.push(root(&te.text_field));
    }
    if let Some(t) = &spec.task.tensor {
        if format == Format::Csv {
            return Err(invalid(
                "spec.input.format: a tensor task reads numeric arrays, which CSV cells (text) \
                 cannot hold; use JSONL or Parquet input",
            ));
        }
        for i in &t.inputs {
            columns.push(root(i.field.as_deref().unwrap_or(&i.name)));
        }
    }
    Ok((
        Want {
            format,
            compression,
            columns,
            confine: None,
        },
        delimiter,
    ))
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
    fn input_and_output_formats_are_checked() {
        let te = "  task: {textEmbedding: {tokenizer: \"file:///t.json\", textField: doc.body}}\n";
        let with = |input: &str, output: &str| {
            let yaml = format!(
                "apiVersion: infermesh.dev/v1alpha1\nkind: Workload\nmetadata: {{name: w}}\nspec:\n  mesh: m\n  \
                 model: {{uri: \"file:///m.onnx\"}}\n  input: {{uri: \"file:///in/\", {input}}}\n  output: {{uri: \"file:///out\", {output}}}\n{te}"
            );
            match parse_manifests(&yaml).expect("parses").pop() {
                Some(Manifest::Workload(w)) => validate(&w.spec),
                other => panic!("not a workload: {other:?}"),
            }
        };
        let v = with("format: parquet", "format: parquet, compression: zstd").expect("valid");
        assert_eq!(v.input.format, Format::Parquet);
        assert_eq!(v.input.columns, ["doc"]);
        assert!(v.output_zstd);
        let v = with("format: csv, delimiter: \"\\t\"", "format: jsonl").expect("tsv");
        assert_eq!(v.delimiter, b'\t');
        assert_eq!(v.input.compression, None);
        let v = with("compression: gzip", "format: jsonl").expect("gzip");
        assert_eq!(v.input.compression, Some(Compression::Gzip));
        for (input, output, says) in [
            (
                "format: parquet, compression: gzip",
                "format: jsonl",
                "spec.input.compression",
            ),
            (
                "format: jsonl, delimiter: \";\"",
                "format: jsonl",
                "spec.input.delimiter",
            ),
            (
                "format: csv, delimiter: \"\\\"\"",
                "format: jsonl",
                "spec.input.delimiter",
            ),
            (
                "format: jsonl",
                "format: jsonl, compression: zstd",
                "spec.output.compression",
            ),
        ] {
            let err = with(input, output).expect_err(input);
            assert!(err.message.starts_with(says), "{input} / {output}: {err}");
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
    fn priority_out_of_range_is_refused_with_its_bounds() {
        let tensor = "  task: {tensor: {inputs: [{name: x}]}}\n";
        for ok in [0, 500, MAX_PRIORITY] {
            assert!(validate(&spec(&format!("{tensor}  priority: {ok}\n"))).is_ok());
        }
        for bad in [-1, MAX_PRIORITY + 1, i32::MIN] {
            let err =
                validate(&spec(&format!("{tensor}  priority: {bad}\n"))).expect_err("out of range");
            assert_eq!(err.reason, "InvalidSpec");
            assert!(
                err.message
                    .contains(&format!("spec.priority {bad} is out of range"))
                    && err.message.contains("from 0 to 1000"),
                "{err}"
            );
        }
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
