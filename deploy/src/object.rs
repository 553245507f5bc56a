//! Kubernetes objects as read from YAML: kind, name and namespace at hand, the rest as JSON.

use std::fmt;

use anyhow::Context;
use serde::Deserialize;
use serde_json::Value;

/// One object of a manifest stream.
#[derive(Clone, Debug, PartialEq)]
pub struct Object {
    /// Where it came from: a chart template path (`infermesh/templates/deployment.yaml`) or a
    /// file name.
    pub source: String,
    /// The object.
    pub value: Value,
}

/// `kind/namespace/name`, which identifies an object in a stream.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectId {
    /// `apiVersion`.
    pub api_version: String,
    /// `kind`.
    pub kind: String,
    /// `metadata.namespace`, empty for cluster-scoped objects.
    pub namespace: String,
    /// `metadata.name`.
    pub name: String,
}

impl fmt::Display for ObjectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.namespace.is_empty() {
            write!(f, "{}/{}", self.kind, self.name)
        } else {
            write!(f, "{}/{}/{}", self.kind, self.namespace, self.name)
        }
    }
}

impl Object {
    fn str_at(&self, pointer: &str) -> &str {
        self.value
            .pointer(pointer)
            .and_then(Value::as_str)
            .unwrap_or("")
    }

    /// `kind`.
    pub fn kind(&self) -> &str {
        self.str_at("/kind")
    }

    /// `apiVersion`.
    pub fn api_version(&self) -> &str {
        self.str_at("/apiVersion")
    }

    /// `metadata.name`.
    pub fn name(&self) -> &str {
        self.str_at("/metadata/name")
    }

    /// `metadata.namespace` (empty when unset).
    pub fn namespace(&self) -> &str {
        self.str_at("/metadata/namespace")
    }

    /// What identifies it.
    pub fn id(&self) -> ObjectId {
        ObjectId {
            api_version: self.api_version().to_string(),
            kind: self.kind().to_string(),
            namespace: self.namespace().to_string(),
            name: self.name().to_string(),
        }
    }

    /// An annotation's value.
    pub fn annotation(&self, key: &str) -> Option<&str> {
        self.value
            .pointer("/metadata/annotations")
            .and_then(|a| a.get(key))
            .and_then(Value::as_str)
    }
}

/// Reads every document of a YAML stream; empty documents are skipped.
pub fn parse_documents(source: &str, text: &str) -> anyhow::Result<Vec<Object>> {
    let mut out = Vec::new();
    for (i, de) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let value = Value::deserialize(de)
            .with_context(|| format!("{source}: document {} is not valid YAML", i + 1))?;
        if value.is_null() {
            continue;
        }
        anyhow::ensure!(
            value.is_object(),
            "{source}: document {} is not a mapping",
            i + 1
        );
        out.push(Object {
            source: source.to_string(),
            value,
        });
    }
    Ok(out)
}

/// Removes the labels in `keys` from every `labels` map in `value` (object metadata, pod
/// templates, volume claim templates), and drops a `labels` map left empty.
pub fn strip_labels(value: &mut Value, keys: &[&str]) {
    match value {
        Value::Object(map) => {
            if let Some(Value::Object(labels)) = map.get_mut("labels") {
                for k in keys {
                    labels.remove(*k);
                }
                if labels.is_empty() {
                    map.remove("labels");
                }
            }
            for v in map.values_mut() {
                strip_labels(v, keys);
            }
        }
        Value::Array(items) => {
            for v in items {
                strip_labels(v, keys);
            }
        }
        _ => {}
    }
}

/// Writes every integral number as an integer (`0.0` as `0`), as YAML round trips through
/// different tools do, so that comparisons see values, not spellings.
pub fn canonical_numbers(value: &mut Value) {
    match value {
        Value::Number(n) => {
            if let Some(f) = n.as_f64().filter(|f| f.fract() == 0.0 && f.abs() < 9.0e15)
                && !n.is_i64()
                && !n.is_u64()
            {
                // The guard above keeps f within i64's exact range.
                *value = Value::from(f as i64);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(canonical_numbers),
        Value::Object(map) => map.values_mut().for_each(canonical_numbers),
        _ => {}
    }
}

/// The first place where `a` and `b` differ, as a JSON pointer with both values; `None` when
/// equal.
pub fn first_difference(a: &Value, b: &Value) -> Option<String> {
    fn walk(a: &Value, b: &Value, at: &str) -> Option<String> {
        match (a, b) {
            (Value::Object(x), Value::Object(y)) => {
                for (k, va) in x {
                    let here = format!("{at}/{k}");
                    match y.get(k) {
                        Some(vb) => {
                            if let Some(d) = walk(va, vb, &here) {
                                return Some(d);
                            }
                        }
                        None => return Some(format!("{here}: {va} vs absent")),
                    }
                }
                y.iter()
                    .find(|(k, _)| !x.contains_key(*k))
                    .map(|(k, vb)| format!("{at}/{k}: absent vs {vb}"))
            }
            (Value::Array(x), Value::Array(y)) if x.len() == y.len() => x
                .iter()
                .zip(y)
                .enumerate()
                .find_map(|(i, (va, vb))| walk(va, vb, &format!("{at}/{i}"))),
            _ if a == b => None,
            _ => Some(format!(
                "{}: {a} vs {b}",
                if at.is_empty() { "/" } else { at }
            )),
        }
    }
    walk(a, b, "")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_are_read_with_their_identity_and_empty_ones_skipped() {
        let text = "---\n# only a comment\n---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: a, namespace: n}\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: n}\n";
        let objs = parse_documents("x.yaml", text).expect("parses");
        assert_eq!(objs.len(), 2);
        assert_eq!(objs[0].id().to_string(), "ConfigMap/n/a");
        assert_eq!(objs[1].id().to_string(), "Namespace/n");
    }

    #[test]
    fn numbers_compare_by_value_and_differences_are_located() {
        let mut a = serde_json::json!({"m": 0.0, "x": [1.5, 2.0]});
        canonical_numbers(&mut a);
        assert_eq!(a, serde_json::json!({"m": 0, "x": [1.5, 2]}));
        let b = serde_json::json!({"m": 0, "x": [1.5, 3]});
        assert_eq!(first_difference(&a, &b).as_deref(), Some("/x/1: 2 vs 3"));
        assert_eq!(first_difference(&a, &a), None);
    }

    #[test]
    fn helm_labels_are_stripped_everywhere_and_others_kept() {
        let mut v = serde_json::json!({
            "metadata": {"labels": {"helm.sh/chart": "c", "app": "a"}},
            "spec": {"template": {"metadata": {"labels": {"helm.sh/chart": "c"}}}}
        });
        strip_labels(&mut v, &["helm.sh/chart"]);
        assert_eq!(
            v,
            serde_json::json!({
                "metadata": {"labels": {"app": "a"}},
                "spec": {"template": {"metadata": {}}}
            })
        );
    }
}
