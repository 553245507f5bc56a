//! Validation of objects against a CRD's structural OpenAPI v3 schema, with the API server's
//! semantics for what `kubectl apply` sends (strict field validation, the default since
//! Kubernetes 1.27):
//!
//! - `type` (`x-kubernetes-int-or-string` takes either), `nullable` (a null in a non-nullable
//!   field is dropped, as the server prunes it, and then counts as missing), `required`, `enum`,
//!   `minimum`/`maximum` (and exclusive), `multipleOf`, `minLength`/`maxLength`, `pattern`,
//!   `minItems`/`maxItems`/`uniqueItems`, `minProperties`/`maxProperties`, `allOf`/`anyOf`/
//!   `oneOf`/`not`, `items`, `additionalProperties`;
//! - a field the schema does not declare is an error unless the schema has
//!   `x-kubernetes-preserve-unknown-fields` or `additionalProperties`;
//! - `format`: `date-time` is checked as the server does; the integer formats the generator
//!   writes (`int32`, `uint32`, `int64`, `uint64`) are range-checked — the server ignores
//!   `uint32`, but the operator's types would refuse the object, so it is an error here too;
//! - `apiVersion`, `kind` and `metadata` at the root are the server's (`metadata` is checked
//!   as `ObjectMeta` by strict typing);
//! - `x-kubernetes-validations` (CEL) rules are not evaluated here: [`Validation::cel_rules`]
//!   lists the ones that applied, and the operator's own validation, tested elsewhere, covers
//!   them.

use std::collections::BTreeMap;

use anyhow::{Context, bail};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceDefinition, JSONSchemaProps, JSONSchemaPropsOrArray, JSONSchemaPropsOrBool,
};
use regex::Regex;
use serde_json::Value;

use crate::object::{Object, parse_documents};
use crate::strict::strict;

/// What validating one object found.
#[derive(Clone, Debug, Default)]
pub struct Validation {
    /// Every violation, as `path: what`.
    pub errors: Vec<String>,
    /// CEL rules that applied but were not evaluated, as `path: rule`.
    pub cel_rules: Vec<String>,
}

/// The schemas of a set of CRDs, by `(apiVersion, kind)`.
#[derive(Clone, Debug, Default)]
pub struct Schemas {
    by_kind: BTreeMap<(String, String), JSONSchemaProps>,
}

impl Schemas {
    /// Reads every CRD in a multi-document YAML stream (strictly typed).
    pub fn from_crds_yaml(text: &str) -> anyhow::Result<Self> {
        let mut by_kind = BTreeMap::new();
        for obj in parse_documents("crds", text)? {
            let crd: CustomResourceDefinition =
                strict(&obj.value).with_context(|| obj.id().to_string())?;
            for version in &crd.spec.versions {
                let schema = version
                    .schema
                    .as_ref()
                    .and_then(|s| s.open_api_v3_schema.clone())
                    .with_context(|| {
                        format!("{} {} has no openAPIV3Schema", obj.name(), version.name)
                    })?;
                by_kind.insert(
                    (
                        format!("{}/{}", crd.spec.group, version.name),
                        crd.spec.names.kind.clone(),
                    ),
                    schema,
                );
            }
        }
        Ok(Self { by_kind })
    }

    /// The kinds known, as `apiVersion kind`.
    pub fn kinds(&self) -> Vec<String> {
        self.by_kind
            .keys()
            .map(|(a, k)| format!("{a} {k}"))
            .collect()
    }

    /// Validates `obj` against its kind's schema; an object of a kind these CRDs do not define
    /// is an error.
    pub fn validate(&self, obj: &Object) -> anyhow::Result<Validation> {
        let key = (obj.api_version().to_string(), obj.kind().to_string());
        let Some(schema) = self.by_kind.get(&key) else {
            bail!("no CRD defines {} {}", key.0, key.1);
        };
        let mut out = Validation::default();
        let mut root = obj.value.clone();
        // apiVersion and kind (matched above) and ObjectMeta are the server's, not the CRD
        // schema's.
        if let Some(map) = root.as_object_mut() {
            for k in ["apiVersion", "kind", "metadata"] {
                map.remove(k);
            }
        }
        let mut root_schema = schema.clone();
        if let Some(props) = root_schema.properties.as_mut() {
            props.remove("metadata");
        }
        validate(&root_schema, &root, "", &mut out)?;
        Ok(out)
    }
}

/// Validates `value` at `path` against `schema`, adding what it finds to `out`.
pub fn validate(
    schema: &JSONSchemaProps,
    value: &Value,
    path: &str,
    out: &mut Validation,
) -> anyhow::Result<()> {
    let at = if path.is_empty() { "<root>" } else { path };
    let mut err = |m: String| out.errors.push(format!("{at}: {m}"));

    if value.is_null() {
        if schema.nullable != Some(true) {
            err("null is not allowed".into());
        }
        return Ok(());
    }

    // Type.
    let int_or_string = schema.x_kubernetes_int_or_string == Some(true);
    let type_ok = match (schema.type_.as_deref(), int_or_string) {
        (_, true) => is_integer(value) || value.is_string(),
        (None, false) => true,
        (Some("object"), _) => value.is_object(),
        (Some("array"), _) => value.is_array(),
        (Some("string"), _) => value.is_string(),
        (Some("integer"), _) => is_integer(value),
        (Some("number"), _) => value.is_number(),
        (Some("boolean"), _) => value.is_boolean(),
        (Some(other), _) => bail!("{at}: schema type {other} is not a structural schema type"),
    };
    if !type_ok {
        let want = if int_or_string {
            "integer or string"
        } else {
            schema.type_.as_deref().unwrap_or("?")
        };
        err(format!("must be {want}, is {}", json_type(value)));
        return Ok(());
    }

    if let Some(allowed) = &schema.enum_
        && !allowed.iter().any(|a| a.0 == *value)
    {
        let list: Vec<String> = allowed.iter().map(|a| a.0.to_string()).collect();
        err(format!("{value} is not one of [{}]", list.join(", ")));
    }

    match value {
        Value::Number(n) => {
            let x = n.as_f64().unwrap_or(f64::NAN);
            if let Some(min) = schema.minimum {
                let exclusive = schema.exclusive_minimum == Some(true);
                if x < min || (exclusive && x == min) {
                    err(format!("{x} is below the minimum {min}"));
                }
            }
            if let Some(max) = schema.maximum {
                let exclusive = schema.exclusive_maximum == Some(true);
                if x > max || (exclusive && x == max) {
                    err(format!("{x} is above the maximum {max}"));
                }
            }
            if let Some(m) = schema.multiple_of
                && m > 0.0
                && (x / m).fract().abs() > 1e-9
            {
                err(format!("{x} is not a multiple of {m}"));
            }
            let range = match schema.format.as_deref() {
                Some("int32") => Some((i32::MIN as f64, i32::MAX as f64)),
                Some("uint32") => Some((0.0, u32::MAX as f64)),
                Some("int64") => Some((i64::MIN as f64, i64::MAX as f64)),
                Some("uint64") => Some((0.0, u64::MAX as f64)),
                _ => None,
            };
            if let Some((lo, hi)) = range
                && (x < lo || x > hi)
            {
                err(format!(
                    "{x} is out of range for {}",
                    schema.format.as_deref().unwrap_or("")
                ));
            }
        }
        Value::String(s) => {
            let len = s.chars().count() as i64;
            if let Some(min) = schema.min_length
                && len < min
            {
                err(format!("length {len} is below minLength {min}"));
            }
            if let Some(max) = schema.max_length
                && len > max
            {
                err(format!("length {len} is above maxLength {max}"));
            }
            if let Some(p) = &schema.pattern {
                let re = Regex::new(p).with_context(|| format!("{at}: pattern {p}"))?;
                if !re.is_match(s) {
                    err(format!("{s:?} does not match {p}"));
                }
            }
            if schema.format.as_deref() == Some("date-time") && !is_date_time(s) {
                err(format!("{s:?} is not an RFC 3339 date-time"));
            }
        }
        Value::Array(items) => {
            let n = items.len() as i64;
            if let Some(min) = schema.min_items
                && n < min
            {
                err(format!("{n} items, fewer than minItems {min}"));
            }
            if let Some(max) = schema.max_items
                && n > max
            {
                err(format!("{n} items, more than maxItems {max}"));
            }
            if schema.unique_items == Some(true) {
                for (i, a) in items.iter().enumerate() {
                    if items[..i].contains(a) {
                        err(format!("item {i} ({a}) repeats an earlier one"));
                    }
                }
            }
        }
        Value::Object(map) => {
            let n = map.len() as i64;
            if let Some(min) = schema.min_properties
                && n < min
            {
                err(format!("{n} properties, fewer than minProperties {min}"));
            }
            if let Some(max) = schema.max_properties
                && n > max
            {
                err(format!("{n} properties, more than maxProperties {max}"));
            }
            for r in schema.required.iter().flatten() {
                if map.get(r).is_none_or(|v| {
                    v.is_null()
                        && schema
                            .properties
                            .as_ref()
                            .and_then(|p| p.get(r))
                            .is_none_or(|s| s.nullable != Some(true))
                }) {
                    err(format!("missing required field {r:?}"));
                }
            }
        }
        _ => {}
    }

    // Children.
    if let Value::Array(items) = value {
        match &schema.items {
            Some(JSONSchemaPropsOrArray::Schema(s)) => {
                for (i, item) in items.iter().enumerate() {
                    validate(s, item, &format!("{path}[{i}]"), out)?;
                }
            }
            Some(JSONSchemaPropsOrArray::Schemas(ss)) => {
                for (i, (item, s)) in items.iter().zip(ss).enumerate() {
                    validate(s, item, &format!("{path}[{i}]"), out)?;
                }
            }
            None => {}
        }
    }
    if let Value::Object(map) = value {
        let preserve = schema.x_kubernetes_preserve_unknown_fields == Some(true);
        for (k, v) in map {
            let child = join(path, k);
            // A null in a non-nullable field is pruned by the server: it is as if absent.
            let declared = schema.properties.as_ref().and_then(|p| p.get(k));
            if v.is_null() && declared.is_some_and(|s| s.nullable != Some(true)) {
                continue;
            }
            match (declared, &schema.additional_properties) {
                (Some(s), _) => validate(s, v, &child, out)?,
                (None, Some(JSONSchemaPropsOrBool::Schema(s))) => validate(s, v, &child, out)?,
                (None, Some(JSONSchemaPropsOrBool::Bool(true))) => {}
                (None, _) if preserve => {}
                (None, _) => out.errors.push(format!("{child}: unknown field")),
            }
        }
    }

    // Combinators (structural schemas use them for validation only).
    for s in schema.all_of.iter().flatten() {
        validate(s, value, path, out)?;
    }
    if let Some(any) = &schema.any_of {
        let passing = count_passing(any, value, path)?;
        if passing == 0 {
            out.errors
                .push(format!("{at}: matches none of the anyOf alternatives"));
        }
    }
    if let Some(one) = &schema.one_of {
        let passing = count_passing(one, value, path)?;
        if passing != 1 {
            out.errors.push(format!(
                "{at}: matches {passing} of the oneOf alternatives, not exactly one"
            ));
        }
    }
    if let Some(not) = &schema.not
        && count_passing(std::slice::from_ref(not), value, path)? == 1
    {
        out.errors.push(format!("{at}: matches a `not` schema"));
    }

    for rule in schema.x_kubernetes_validations.iter().flatten() {
        out.cel_rules.push(format!("{at}: {}", rule.rule));
    }
    Ok(())
}

fn count_passing(schemas: &[JSONSchemaProps], value: &Value, path: &str) -> anyhow::Result<usize> {
    let mut n = 0;
    for s in schemas {
        let mut probe = Validation::default();
        validate(s, value, path, &mut probe)?;
        if probe.errors.is_empty() {
            n += 1;
        }
    }
    Ok(n)
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

fn is_integer(v: &Value) -> bool {
    match v {
        Value::Number(n) => {
            n.is_i64() || n.is_u64() || n.as_f64().is_some_and(|f| f.fract() == 0.0)
        }
        _ => false,
    }
}

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_f64() => "number",
        Value::Number(_) => "integer",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn is_date_time(s: &str) -> bool {
    static RE: std::sync::OnceLock<Option<Regex>> = std::sync::OnceLock::new();
    RE.get_or_init(|| {
        Regex::new(r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$").ok()
    })
    .as_ref()
    .is_some_and(|re| re.is_match(s))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn crds() -> Schemas {
        let text = std::fs::read_to_string(crate::workspace().join("crds/yaml/crds.yaml"))
            .expect("crds.yaml");
        Schemas::from_crds_yaml(&text).expect("schemas")
    }

    const WORKLOAD: &str = r#"
apiVersion: infermesh.dev/v1alpha1
kind: Workload
metadata: {name: w, namespace: team-a}
spec:
  mesh: m
  model: {uri: "file:///m.onnx"}
  task: {tensor: {inputs: [{name: x}]}}
  input: {uri: "file:///in.jsonl", format: jsonl}
  output: {uri: "file:///out/"}
  batchSize: 32
"#;

    fn errors(text: &str) -> Vec<String> {
        let obj = parse_documents("t", text).expect("yaml").remove(0);
        crds().validate(&obj).expect("known kind").errors
    }

    #[test]
    fn a_valid_workload_has_no_errors() {
        assert_eq!(errors(WORKLOAD), Vec::<String>::new());
    }

    #[test]
    fn each_kind_of_violation_is_found_and_located() {
        let cases = [
            (
                "batchSize: 32",
                "batchSize: \"32\"",
                "spec.batchSize: must be integer",
            ),
            (
                "batchSize: 32",
                "batchSize: 0",
                "spec.batchSize: 0 is below the minimum",
            ),
            (
                "batchSize: 32",
                "batchSize: 5000",
                "spec.batchSize: 5000 is above the maximum",
            ),
            (
                "batchSize: 32",
                "bachSize: 32",
                "spec.bachSize: unknown field",
            ),
            (
                "format: jsonl",
                "format: csvv",
                "spec.input.format: \"csvv\" is not one of",
            ),
            (
                "  mesh: m\n",
                "  mesh: \"\"\n",
                "spec.mesh: length 0 is below minLength 1",
            ),
            (
                "  model: {uri: \"file:///m.onnx\"}\n",
                "",
                "missing required field \"model\"",
            ),
            (
                "  batchSize: 32",
                "  batchSize: 32\n  shardBytes: lots",
                "spec.shardBytes: \"lots\" does not match",
            ),
        ];
        for (from, to, expect) in cases {
            let bad = WORKLOAD.replace(from, to);
            assert_ne!(bad, WORKLOAD, "{from}");
            let errs = errors(&bad);
            assert!(errs.iter().any(|e| e.contains(expect)), "{to}: {errs:?}");
        }
    }

    #[test]
    fn an_unknown_kind_is_an_error() {
        let obj = parse_documents("t", "apiVersion: infermesh.dev/v1alpha1\nkind: Job\n")
            .expect("yaml")
            .remove(0);
        assert!(crds().validate(&obj).is_err());
    }
}
