//! Reading Mesh and Workload manifests from multi-document YAML, strictly: an unknown field
//! is an error naming the field, as `kubectl apply` with strict field validation does.

use serde::de::DeserializeOwned;

use crate::{Mesh, Workload};

/// One object read from a manifest file. Its `Debug` never prints a Secret's data.
#[derive(Clone)]
pub enum Manifest {
    /// A Mesh.
    Mesh(Box<Mesh>),
    /// A Workload.
    Workload(Box<Workload>),
    /// A Secret (`v1`), for `spec.credentials` of the Workloads of its namespace when no
    /// cluster holds it (`infermesh local`).
    Secret(Box<k8s_openapi::api::core::v1::Secret>),
}

impl std::fmt::Debug for Manifest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Mesh(m) => f.debug_tuple("Mesh").field(m).finish(),
            Self::Workload(w) => f.debug_tuple("Workload").field(w).finish(),
            Self::Secret(s) => write!(
                f,
                "Secret({}/{}, <redacted>)",
                s.metadata.namespace.as_deref().unwrap_or_default(),
                s.metadata.name.as_deref().unwrap_or_default()
            ),
        }
    }
}

/// Why a manifest could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// The text is not YAML.
    #[error("document {doc}: not valid YAML: {source}")]
    Yaml {
        /// 1-based document index.
        doc: usize,
        /// The parser's error.
        source: serde_yaml::Error,
    },
    /// A document lacks `kind` or `apiVersion`, or names another API.
    #[error("document {doc}: {message}")]
    Header {
        /// 1-based document index.
        doc: usize,
        /// What is wrong.
        message: String,
    },
    /// The document does not match its kind's schema (a missing field, a wrong type).
    #[error("document {doc} ({kind} {name}): {message}")]
    Schema {
        /// 1-based document index.
        doc: usize,
        /// The object's kind.
        kind: String,
        /// The object's name, or `<unnamed>`.
        name: String,
        /// The deserializer's message, which names the field.
        message: String,
    },
    /// Fields the schema does not know (typos such as `modle`).
    #[error("document {doc} ({kind} {name}): unknown field{} {}", if fields.len() > 1 { "s" } else { "" }, fields.join(", "))]
    UnknownFields {
        /// 1-based document index.
        doc: usize,
        /// The object's kind.
        kind: String,
        /// The object's name.
        name: String,
        /// Dotted paths of the unknown fields.
        fields: Vec<String>,
    },
}

/// Parses every document of `text` into Mesh and Workload objects, refusing unknown fields,
/// unknown kinds and other API groups. Empty documents are skipped.
pub fn parse_manifests(text: &str) -> Result<Vec<Manifest>, ManifestError> {
    use serde::Deserialize;
    let mut out = Vec::new();
    for (i, de) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let doc = i + 1;
        let value = serde_yaml::Value::deserialize(de)
            .map_err(|source| ManifestError::Yaml { doc, source })?;
        if value.is_null() {
            continue;
        }
        let field = |k: &str| value.get(k).and_then(|v| v.as_str()).map(str::to_string);
        let kind = field("kind").ok_or_else(|| ManifestError::Header {
            doc,
            message: "missing `kind`".into(),
        })?;
        let api = field("apiVersion").ok_or_else(|| ManifestError::Header {
            doc,
            message: "missing `apiVersion`".into(),
        })?;
        let name = value
            .get("metadata")
            .and_then(|m| m.get("name"))
            .and_then(|n| n.as_str())
            .unwrap_or("<unnamed>")
            .to_string();
        if kind == "Secret" && api == "v1" {
            // Never echo a Secret's text: the message names the field only.
            let secret = serde_yaml::from_value(value).map_err(|_| ManifestError::Schema {
                doc,
                kind: kind.clone(),
                name,
                message: "not a valid Secret (`data` values must be base64, `stringData` \
                          values text)"
                    .into(),
            })?;
            out.push(Manifest::Secret(Box::new(secret)));
            continue;
        }
        if api != "infermesh.dev/v1alpha1" {
            return Err(ManifestError::Header {
                doc,
                message: format!("apiVersion `{api}` is not infermesh.dev/v1alpha1"),
            });
        }
        match kind.as_str() {
            "Mesh" => out.push(Manifest::Mesh(Box::new(strict(doc, &kind, &name, value)?))),
            "Workload" => out.push(Manifest::Workload(Box::new(strict(
                doc, &kind, &name, value,
            )?))),
            other => {
                return Err(ManifestError::Header {
                    doc,
                    message: format!("kind `{other}` is not one of Mesh, Workload, Secret (v1)"),
                });
            }
        }
    }
    Ok(out)
}

fn strict<T: DeserializeOwned>(
    doc: usize,
    kind: &str,
    name: &str,
    value: serde_yaml::Value,
) -> Result<T, ManifestError> {
    let (parsed, unknown) = deserialize_strict(value).map_err(|e| ManifestError::Schema {
        doc,
        kind: kind.to_string(),
        name: name.to_string(),
        message: e.to_string(),
    })?;
    if !unknown.is_empty() {
        return Err(ManifestError::UnknownFields {
            doc,
            kind: kind.to_string(),
            name: name.to_string(),
            fields: unknown,
        });
    }
    Ok(parsed)
}

/// Deserializes `de` into `T` and lists, by dotted path (`spec.containers.0.name`), every
/// field `T` does not know. `apiVersion` and `kind` are not listed: types derived by
/// kube-derive take them from the type, not from a field.
///
/// An error (a wrong type, a missing field, a value out of range) is prefixed with the dotted
/// path of where it happened: `spec.batchSize: invalid type: string "abc", expected u32`.
pub fn deserialize_strict<'de, T, D>(de: D) -> Result<(T, Vec<String>), D::Error>
where
    T: serde::Deserialize<'de>,
    D: serde::Deserializer<'de>,
{
    use serde::de::Error;
    let mut unknown = Vec::new();
    let mut note = |path: serde_ignored::Path<'_>| {
        let path = dotted(&path);
        if path != "apiVersion" && path != "kind" {
            unknown.push(path);
        }
    };
    let ignored = serde_ignored::Deserializer::new(de, &mut note);
    let parsed = serde_path_to_error::deserialize(ignored).map_err(|e| {
        let path = tracked(e.path());
        let inner = e.into_inner();
        if path.is_empty() {
            inner
        } else {
            D::Error::custom(format!("{path}: {inner}"))
        }
    })?;
    Ok((parsed, unknown))
}

/// serde_path_to_error's path in the same dotted form as [`dotted`] (`inputs.0.name`, where
/// it would write `inputs[0].name`).
fn tracked(path: &serde_path_to_error::Path) -> String {
    use serde_path_to_error::Segment;
    let segments: Vec<String> = path
        .iter()
        .map(|segment| match segment {
            Segment::Seq { index } => index.to_string(),
            Segment::Map { key } => key.clone(),
            Segment::Enum { variant } => variant.clone(),
            Segment::Unknown => "?".to_string(),
        })
        .collect();
    segments.join(".")
}

/// serde_ignored's path without its markers for `Option` and newtype layers (which it
/// prints as `?`).
fn dotted(path: &serde_ignored::Path<'_>) -> String {
    use serde_ignored::Path;
    let join = |parent: String, segment: &str| {
        if parent.is_empty() {
            segment.to_string()
        } else {
            format!("{parent}.{segment}")
        }
    };
    match path {
        Path::Root => String::new(),
        Path::Seq { parent, index } => join(dotted(parent), &index.to_string()),
        Path::Map { parent, key } => join(dotted(parent), key),
        Path::Some { parent }
        | Path::NewtypeStruct { parent }
        | Path::NewtypeVariant { parent } => dotted(parent),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WORKLOAD: &str = r#"
apiVersion: infermesh.dev/v1alpha1
kind: Workload
metadata: {name: w, namespace: team-a}
spec:
  mesh: m
  model: {uri: "file:///m.onnx"}
  task: {tensor: {inputs: [{name: x}]}}
  input: {uri: "file:///in.jsonl"}
  output: {uri: "file:///out/"}
"#;

    #[test]
    fn a_valid_workload_parses_with_defaults() {
        let parsed = parse_manifests(WORKLOAD).expect("parses");
        let [Manifest::Workload(w)] = parsed.as_slice() else {
            panic!("one workload")
        };
        assert_eq!(w.spec.batch_size, 32);
        assert_eq!(w.spec.max_attempts, 3);
        assert_eq!(w.spec.shard_bytes, "1Mi");
        assert_eq!(w.spec.output.id_field, "id");
    }

    #[test]
    fn an_unknown_field_is_named() {
        let bad = WORKLOAD
            .replace("batch", "x")
            .replace("  mesh: m", "  mesh: m\n  modle: oops");
        let err = parse_manifests(&bad).expect_err("unknown field");
        let msg = err.to_string();
        assert!(
            msg.contains("unknown field") && msg.contains("spec.modle"),
            "{msg}"
        );
        assert!(msg.contains("Workload w"), "{msg}");
    }

    #[test]
    fn a_nested_unknown_field_is_named_by_its_dotted_path() {
        // `task.textEmbedding` is an Option: serde_ignored marks that layer, the path does not.
        let bad = WORKLOAD.replace(
            "  task: {tensor: {inputs: [{name: x}]}}",
            "  task: {tensor: {inputs: [{name: x, feild: y}]}}",
        );
        let msg = parse_manifests(&bad)
            .expect_err("unknown field")
            .to_string();
        assert!(
            msg.contains("unknown field spec.task.tensor.inputs.0.feild"),
            "{msg}"
        );
    }

    #[test]
    fn a_missing_model_is_named() {
        let bad = WORKLOAD.replace("  model: {uri: \"file:///m.onnx\"}\n", "");
        let msg = parse_manifests(&bad)
            .expect_err("missing model")
            .to_string();
        assert!(msg.contains("missing field `model`"), "{msg}");
    }

    /// `WORKLOAD` with `extra` lines added to its spec.
    fn with_spec(extra: &str) -> String {
        format!("{WORKLOAD}{extra}")
    }

    fn schema_error(extra: &str) -> String {
        let err = parse_manifests(&with_spec(extra)).expect_err("a type error");
        assert!(matches!(err, ManifestError::Schema { .. }), "{err:?}");
        err.to_string()
    }

    #[test]
    fn type_errors_name_the_field_path() {
        assert_eq!(
            schema_error("  batchSize: \"abc\"\n"),
            "document 1 (Workload w): spec.batchSize: invalid type: string \"abc\", expected u32"
        );
        let msg = schema_error("  batchSize: -1\n");
        assert!(
            msg.starts_with("document 1 (Workload w): spec.batchSize: invalid value: integer `-1`"),
            "{msg}"
        );
        let msg = schema_error("  shardBytes: 1.5\n");
        assert!(
            msg.starts_with(
                "document 1 (Workload w): spec.shardBytes: invalid type: floating point `1.5`"
            ),
            "{msg}"
        );
        assert!(msg.contains("a byte quantity"), "{msg}");
        let msg = schema_error("  shardBytes: [1Mi]\n");
        assert!(
            msg.contains("spec.shardBytes: invalid type: sequence"),
            "{msg}"
        );
    }

    #[test]
    fn a_nested_type_error_names_its_dotted_path() {
        let bad = WORKLOAD.replace(
            "  task: {tensor: {inputs: [{name: x}]}}",
            "  task: {tensor: {inputs: [{name: x}, {name: [y]}]}}",
        );
        let msg = parse_manifests(&bad).expect_err("type error").to_string();
        assert!(
            msg.contains(
                "spec.task.tensor.inputs.1.name: invalid type: sequence, expected a string"
            ),
            "{msg}"
        );
        // A missing field is named with the object that lacks it.
        let bad = WORKLOAD.replace(
            "  output: {uri: \"file:///out/\"}",
            "  output: {idField: k}",
        );
        let msg = parse_manifests(&bad).expect_err("missing").to_string();
        assert!(msg.contains("spec.output: missing field `uri`"), "{msg}");
        // Mesh documents too.
        let mesh = "apiVersion: infermesh.dev/v1alpha1\nkind: Mesh\nmetadata: {name: m}\n\
                    spec: {nodeSelector: {gpu: [a]}, leaseSeconds: soon}\n";
        let msg = parse_manifests(mesh).expect_err("type error").to_string();
        assert!(
            msg.starts_with("document 1 (Mesh m): spec.nodeSelector.gpu: invalid type: sequence"),
            "{msg}"
        );
    }

    #[test]
    fn shard_bytes_takes_a_quantity_or_a_plain_number_of_bytes() {
        let spec = |extra: &str| match parse_manifests(&with_spec(extra)).expect("parses").pop() {
            Some(Manifest::Workload(w)) => w.spec,
            other => panic!("{other:?}"),
        };
        let plain = spec("  shardBytes: 131072\n");
        assert_eq!(plain.shard_bytes, "131072");
        assert_eq!(plain.shard_size(), Ok(131_072));
        assert_eq!(spec("  shardBytes: 2Ki\n").shard_size(), Ok(2048));
        assert_eq!(spec("  shardBytes: \"4096\"\n").shard_size(), Ok(4096));
        // The API server keeps a null for a nullable field: the default then.
        assert_eq!(spec("  shardBytes: null\n").shard_bytes, "1Mi");
        // `0` and `"1"` parse (the schema takes them) but are refused as shard sizes, naming
        // the field, the value and the minimum.
        for (yaml, value) in [("0", "0"), ("\"1\"", "1"), ("1000", "1000")] {
            let err = spec(&format!("  shardBytes: {yaml}\n"))
                .shard_size()
                .expect_err("below the minimum");
            assert!(
                err.starts_with(&format!("spec.shardBytes: `{value}` is ")),
                "{err}"
            );
            assert!(
                err.contains("below the minimum of 1Ki (1024 bytes)"),
                "{err}"
            );
        }
        // A negative number reads (the API server takes any integer: the object must stay
        // readable) and is refused as a shard size.
        let err = spec("  shardBytes: -1\n")
            .shard_size()
            .expect_err("negative");
        assert_eq!(err, "spec.shardBytes: `-1` must be a non-negative quantity");
        let err = spec("  shardBytes: a lot\n")
            .shard_size()
            .expect_err("garbage");
        assert!(err.starts_with("spec.shardBytes: "), "{err}");
    }

    #[test]
    fn other_kinds_and_groups_are_refused() {
        let msg = parse_manifests("apiVersion: v1\nkind: Pod\nmetadata: {name: p}\n")
            .expect_err("not ours")
            .to_string();
        assert!(msg.contains("apiVersion `v1`"), "{msg}");
        let msg = parse_manifests("apiVersion: infermesh.dev/v1alpha1\nkind: Job\n")
            .expect_err("not ours")
            .to_string();
        assert!(msg.contains("kind `Job`"), "{msg}");
    }

    #[test]
    fn a_secret_document_is_read_and_never_printed() {
        let text = "apiVersion: v1\nkind: Secret\nmetadata: {name: s3, namespace: team-a}\n\
                    stringData: {AWS_SECRET_ACCESS_KEY: wJalr-very-secret}\n";
        let docs = parse_manifests(text).expect("parse");
        let shown = format!("{docs:?}");
        assert!(
            shown.contains("Secret(team-a/s3") && !shown.contains("wJalr"),
            "{shown}"
        );
        // A bad one is refused without echoing its text.
        let bad = "apiVersion: v1\nkind: Secret\nmetadata: {name: s3}\ndata: {K: \"wJalr-not-base64!\"}\n";
        let e = parse_manifests(bad).expect_err("not base64").to_string();
        assert!(e.contains("Secret s3") && !e.contains("wJalr"), "{e}");
    }
}
