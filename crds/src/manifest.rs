//! Reading Mesh and Workload manifests from multi-document YAML, strictly: an unknown field
//! is an error naming the field, as `kubectl apply` with strict field validation does.

use serde::de::DeserializeOwned;

use crate::{Mesh, Workload};

/// One object read from a manifest file.
#[derive(Clone, Debug)]
pub enum Manifest {
    /// A Mesh.
    Mesh(Box<Mesh>),
    /// A Workload.
    Workload(Box<Workload>),
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
        if api != "infermesh.dev/v1alpha1" {
            return Err(ManifestError::Header {
                doc,
                message: format!("apiVersion `{api}` is not infermesh.dev/v1alpha1"),
            });
        }
        let name = value
            .get("metadata")
            .and_then(|m| m.get("name"))
            .and_then(|n| n.as_str())
            .unwrap_or("<unnamed>")
            .to_string();
        match kind.as_str() {
            "Mesh" => out.push(Manifest::Mesh(Box::new(strict(doc, &kind, &name, value)?))),
            "Workload" => out.push(Manifest::Workload(Box::new(strict(
                doc, &kind, &name, value,
            )?))),
            other => {
                return Err(ManifestError::Header {
                    doc,
                    message: format!("kind `{other}` is not one of Mesh, Workload"),
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
pub fn deserialize_strict<'de, T, D>(de: D) -> Result<(T, Vec<String>), D::Error>
where
    T: serde::Deserialize<'de>,
    D: serde::Deserializer<'de>,
{
    let mut unknown = Vec::new();
    let parsed = serde_ignored::deserialize(de, |path| {
        let path = dotted(&path);
        if path != "apiVersion" && path != "kind" {
            unknown.push(path);
        }
    })?;
    Ok((parsed, unknown))
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
}
