//! What the cluster commands print, from the typed objects: `get` tables (the CRDs' printer
//! columns, more with `-o wide`), v1 Lists for `-o json|yaml`, and `describe` reports.
//! Pure: the time is a parameter.

use std::fmt::Write as _;

use infermesh_crds::{Agent, Mesh, Workload, WorkloadSpec};
use k8s_openapi::api::core::v1::Event as KubeEvent;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::api::{ApiResource, DynamicObject, TypeMeta};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use super::{CliError, RETRY_ANNOTATION, Result};

/// What kubectl prints for a column with no value.
pub const NONE: &str = "<none>";

/// Spaces between columns (as kubectl).
const GAP: usize = 3;

/// A table: a header and rows of cells.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Table {
    /// Column names (empty for rows printed under an earlier header).
    pub header: Vec<String>,
    /// The rows.
    pub rows: Vec<Vec<String>>,
}

impl Table {
    /// The width of each column: its widest cell or header.
    pub fn widths(&self) -> Vec<usize> {
        let mut w: Vec<usize> = self.header.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (i, cell) in row.iter().enumerate() {
                let n = cell.chars().count();
                match w.get_mut(i) {
                    Some(x) => *x = (*x).max(n),
                    None => w.push(n),
                }
            }
        }
        w
    }

    /// Aligned columns, the header first.
    pub fn render(&self) -> String {
        self.render_with(&self.widths())
    }

    /// Aligned to at least `widths` (a `-w` row under the first table's header).
    pub fn render_with(&self, widths: &[usize]) -> String {
        let mut out = String::new();
        let lines = (!self.header.is_empty())
            .then_some(&self.header)
            .into_iter()
            .chain(&self.rows);
        for cells in lines {
            let mut line = String::new();
            for (i, cell) in cells.iter().enumerate() {
                line.push_str(cell);
                if i + 1 < cells.len() {
                    let width = widths.get(i).copied().unwrap_or(0);
                    let pad = width.saturating_sub(cell.chars().count()) + GAP;
                    line.extend(std::iter::repeat_n(' ', pad));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// How a resource shows in a `get` table.
pub trait Columns {
    /// Column names; `all_namespaces` adds NAMESPACE first (namespaced kinds only).
    fn header(wide: bool, all_namespaces: bool) -> Vec<String>;
    /// The cells of one object.
    fn row(&self, wide: bool, all_namespaces: bool, now: Timestamp) -> Vec<String>;
}

/// The table of `items`.
pub fn table<K: Columns>(items: &[K], wide: bool, all_namespaces: bool, now: Timestamp) -> Table {
    Table {
        header: K::header(wide, all_namespaces),
        rows: items
            .iter()
            .map(|i| i.row(wide, all_namespaces, now))
            .collect(),
    }
}

fn strings(names: &[&str]) -> Vec<String> {
    names.iter().map(|s| s.to_string()).collect()
}

fn or_none(v: Option<&str>) -> String {
    match v {
        Some(s) if !s.is_empty() => s.to_string(),
        _ => NONE.to_string(),
    }
}

/// kubectl's short form of a duration: `45s`, `5m30s`, `42m`, `5h3m`, `30h`, `3d4h`, `120d`,
/// `3y20d`.
pub fn human_duration(seconds: i64) -> String {
    if seconds < 0 {
        return "0s".into();
    }
    let (m, h, d) = (seconds / 60, seconds / 3600, seconds / 86400);
    let y = d / 365;
    if seconds < 120 {
        format!("{seconds}s")
    } else if m < 10 {
        match seconds % 60 {
            0 => format!("{m}m"),
            s => format!("{m}m{s}s"),
        }
    } else if h < 3 {
        format!("{m}m")
    } else if h < 8 {
        match m % 60 {
            0 => format!("{h}h"),
            mm => format!("{h}h{mm}m"),
        }
    } else if h < 48 {
        format!("{h}h")
    } else if d < 8 {
        match h % 24 {
            0 => format!("{d}d"),
            hh => format!("{d}d{hh}h"),
        }
    } else if y < 2 {
        format!("{d}d")
    } else if y < 8 {
        match d % 365 {
            0 => format!("{y}y"),
            dd => format!("{y}y{dd}d"),
        }
    } else {
        format!("{y}y")
    }
}

/// Time since `t`, kubectl's way.
pub fn age(t: Option<Timestamp>, now: Timestamp) -> String {
    match t {
        Some(t) => human_duration(now.duration_since(t).as_secs()),
        None => "<unknown>".into(),
    }
}

fn created(meta: &kube::api::ObjectMeta) -> Option<Timestamp> {
    meta.creation_timestamp.as_ref().map(|t| t.0)
}

/// An RFC 3339 time in a status (`startTime`, `lastHeartbeat`) with its age: `TIME (5m ago)`.
fn time_and_age(t: Option<&str>, now: Timestamp) -> String {
    match t {
        None => NONE.into(),
        Some(s) => match s.parse::<Timestamp>() {
            Ok(ts) => format!("{s} ({} ago)", age(Some(ts), now)),
            Err(_) => s.to_string(),
        },
    }
}

fn throughput(t: Option<f64>) -> String {
    match t {
        Some(v) if v.is_finite() => format!("{v:.1}/s"),
        _ => NONE.into(),
    }
}

impl Columns for Workload {
    fn header(wide: bool, all_namespaces: bool) -> Vec<String> {
        let mut h = Vec::new();
        if all_namespaces {
            h.push("NAMESPACE");
        }
        h.extend([
            "NAME", "MESH", "STATUS", "PROGRESS", "ETA", "CREDITS", "AGE",
        ]);
        if wide {
            h.extend([
                "SHARDS",
                "RUNNING",
                "FAILED",
                "RECORDS",
                "THROUGHPUT",
                "RETRIED",
                "SUSPEND",
            ]);
        }
        strings(&h)
    }

    fn row(&self, wide: bool, all_namespaces: bool, now: Timestamp) -> Vec<String> {
        let s = self.status.as_ref();
        let mut r = Vec::new();
        if all_namespaces {
            r.push(self.namespace().unwrap_or_default());
        }
        r.extend([
            self.name_any(),
            self.spec.mesh.clone(),
            s.map(|s| format!("{:?}", s.phase))
                .unwrap_or_else(|| NONE.into()),
            or_none(s.and_then(|s| s.progress.as_deref())),
            or_none(s.and_then(|s| s.eta.as_deref())),
            or_none(s.and_then(|s| s.credits_spent.as_deref())),
            age(created(&self.metadata), now),
        ]);
        if wide {
            let shards = s.map(|s| &s.shards);
            r.extend([
                shards
                    .map(|c| format!("{}/{}", c.succeeded, c.total))
                    .unwrap_or_else(|| NONE.into()),
                shards
                    .map(|c| c.running.to_string())
                    .unwrap_or_else(|| NONE.into()),
                shards
                    .map(|c| c.failed.to_string())
                    .unwrap_or_else(|| NONE.into()),
                s.map(|s| s.records.to_string())
                    .unwrap_or_else(|| NONE.into()),
                throughput(s.and_then(|s| s.throughput)),
                s.map(|s| s.attempts_retried.to_string())
                    .unwrap_or_else(|| NONE.into()),
                self.spec.suspend.to_string(),
            ]);
        }
        r
    }
}

impl Columns for Agent {
    fn header(wide: bool, _all_namespaces: bool) -> Vec<String> {
        let mut h = vec![
            "NAME", "MESH", "NODE", "GPU", "STATUS", "RUNNING", "DONE", "CREDITS", "AGE",
        ];
        if wide {
            h.extend(["SLOTS", "PROVIDERS", "MODELS", "HEARTBEAT", "UNSCHEDULABLE"]);
        }
        strings(&h)
    }

    fn row(&self, wide: bool, _all_namespaces: bool, now: Timestamp) -> Vec<String> {
        let s = self.status.as_ref();
        let mut r = vec![
            self.name_any(),
            self.spec.mesh.clone(),
            self.spec.node.clone(),
            or_none(s.and_then(|s| s.gpu_summary.as_deref())),
            s.map(|s| format!("{:?}", s.phase))
                .unwrap_or_else(|| NONE.into()),
            s.map(|s| s.running.to_string())
                .unwrap_or_else(|| NONE.into()),
            s.map(|s| s.completed_shards.to_string())
                .unwrap_or_else(|| NONE.into()),
            or_none(s.and_then(|s| s.credits.as_deref())),
            age(created(&self.metadata), now),
        ];
        if wide {
            r.extend([
                s.map(|s| s.slots.to_string())
                    .unwrap_or_else(|| NONE.into()),
                s.filter(|s| !s.execution_providers.is_empty())
                    .map(|s| s.execution_providers.join(","))
                    .unwrap_or_else(|| NONE.into()),
                s.map(|s| format!("{}/{}", s.models_loaded.len(), s.models_cached.len()))
                    .unwrap_or_else(|| NONE.into()),
                match s.and_then(|s| s.last_heartbeat.as_deref()) {
                    Some(t) => match t.parse::<Timestamp>() {
                        Ok(t) => format!("{} ago", age(Some(t), now)),
                        Err(_) => t.to_string(),
                    },
                    None => NONE.into(),
                },
                self.spec.unschedulable.to_string(),
            ]);
        }
        r
    }
}

impl Columns for Mesh {
    fn header(wide: bool, _all_namespaces: bool) -> Vec<String> {
        let mut h = vec!["NAME", "READY", "AGENTS", "SLOTS", "GPUS", "AGE"];
        if wide {
            h.extend(["SELECTOR", "PROVIDERS", "LEASE", "CONDITION"]);
        }
        strings(&h)
    }

    fn row(&self, wide: bool, _all_namespaces: bool, now: Timestamp) -> Vec<String> {
        let s = self.status.as_ref();
        let num = |f: fn(&infermesh_crds::MeshStatus) -> u32| {
            s.map(|s| f(s).to_string()).unwrap_or_else(|| NONE.into())
        };
        let mut r = vec![
            self.name_any(),
            num(|s| s.agents_ready),
            num(|s| s.agents_total),
            num(|s| s.slots),
            num(|s| s.gpus),
            age(created(&self.metadata), now),
        ];
        if wide {
            let selector: Vec<String> = self
                .spec
                .node_selector
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            let providers: Vec<&str> = self
                .spec
                .agent
                .execution_providers
                .iter()
                .map(|p| p.as_str())
                .collect();
            r.extend([
                or_none(Some(&selector.join(","))),
                providers.join(","),
                format!("{}s", self.spec.lease_seconds),
                s.and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"))
                    .map(|c| format!("Ready={} {}", c.status, c.reason))
                    .unwrap_or_else(|| NONE.into()),
            ]);
        }
        r
    }
}

// ---- -o json | yaml -------------------------------------------------------------------------

/// The object as the API returned it, with `apiVersion` and `kind` (list items may lack them).
fn with_types(ar: &ApiResource, o: &DynamicObject) -> DynamicObject {
    let mut o = o.clone();
    if o.types.is_none() {
        o.types = Some(TypeMeta {
            api_version: ar.api_version.clone(),
            kind: ar.kind.clone(),
        });
    }
    o
}

fn list_value(ar: &ApiResource, items: &[DynamicObject]) -> Result<Value> {
    let items: Vec<Value> = items
        .iter()
        .map(|o| serde_json::to_value(with_types(ar, o)))
        .collect::<Result<_, _>>()
        .map_err(|e| CliError(format!("cannot encode the {}: {e}", ar.plural)))?;
    Ok(json!({
        "apiVersion": "v1",
        "kind": "List",
        "metadata": {"resourceVersion": ""},
        "items": items,
    }))
}

/// `-o json`: a v1 List of the objects, as JSON.
pub fn list_json(ar: &ApiResource, items: &[DynamicObject]) -> Result<String> {
    let v = list_value(ar, items)?;
    serde_json::to_string_pretty(&v)
        .map(|s| s + "\n")
        .map_err(|e| CliError(format!("cannot encode the {}: {e}", ar.plural)))
}

/// `-o yaml`: the same List as YAML.
pub fn list_yaml(ar: &ApiResource, items: &[DynamicObject]) -> Result<String> {
    let v = list_value(ar, items)?;
    serde_yaml::to_string(&v).map_err(|e| CliError(format!("cannot encode the {}: {e}", ar.plural)))
}

/// One object as a JSON document, or a YAML one starting `---` (`get -w -o json|yaml`).
pub fn object_doc(ar: &ApiResource, o: &DynamicObject, yaml: bool) -> Result<String> {
    let o = with_types(ar, o);
    let text = if yaml {
        serde_yaml::to_string(&o)
            .map(|s| format!("---\n{s}"))
            .map_err(|e| e.to_string())
    } else {
        serde_json::to_string_pretty(&o)
            .map(|s| s + "\n")
            .map_err(|e| e.to_string())
    };
    text.map_err(|e| CliError(format!("cannot encode {}: {e}", o.name_any())))
}

/// A raw object as its typed resource; an error names the object.
pub fn typed<K: DeserializeOwned>(o: &DynamicObject) -> Result<K> {
    serde_json::to_value(o)
        .and_then(serde_json::from_value)
        .map_err(|e| {
            let name = match o.metadata.namespace.as_deref() {
                Some(ns) => format!("{ns}/{}", o.name_any()),
                None => o.name_any(),
            };
            CliError(format!("cannot read {name} as returned by the API: {e}"))
        })
}

// ---- describe ----------------------------------------------------------------------------

/// When an Event last happened.
pub fn event_time(e: &KubeEvent) -> Option<Timestamp> {
    e.series
        .as_ref()
        .and_then(|s| s.last_observed_time.as_ref())
        .map(|t| t.0)
        .or_else(|| e.last_timestamp.as_ref().map(|t| t.0))
        .or_else(|| e.event_time.as_ref().map(|t| t.0))
        .or_else(|| e.first_timestamp.as_ref().map(|t| t.0))
        .or_else(|| e.metadata.creation_timestamp.as_ref().map(|t| t.0))
}

/// When an Event first happened.
fn event_first_time(e: &KubeEvent) -> Option<Timestamp> {
    e.event_time
        .as_ref()
        .map(|t| t.0)
        .or_else(|| e.first_timestamp.as_ref().map(|t| t.0))
        .or_else(|| e.metadata.creation_timestamp.as_ref().map(|t| t.0))
}

/// How many times an Event happened.
pub fn event_count(e: &KubeEvent) -> i32 {
    e.series
        .as_ref()
        .and_then(|s| s.count)
        .or(e.count)
        .unwrap_or(1)
        .max(1)
}

/// Events oldest first (by when they last happened; ties by name).
pub fn sort_events(mut events: Vec<KubeEvent>) -> Vec<KubeEvent> {
    events.sort_by(|a, b| {
        event_time(a)
            .cmp(&event_time(b))
            .then_with(|| a.metadata.name.cmp(&b.metadata.name))
    });
    events
}

/// A table whose last column is free text: printed in full, its further lines indented to
/// that column, never cut.
fn free_text_table(out: &mut String, indent: &str, header: &[&str], rows: &[Vec<String>]) {
    let mut table = Table {
        header: strings(header),
        rows: Vec::new(),
    };
    let mut rests: Vec<Vec<String>> = Vec::new();
    for row in rows {
        let mut row = row.clone();
        let last = row.pop().unwrap_or_default();
        let mut lines = last.lines().map(str::to_string);
        row.push(lines.next().unwrap_or_default());
        table.rows.push(row);
        rests.push(lines.collect());
    }
    let widths = table.widths();
    let column: usize = widths
        .iter()
        .take(widths.len().saturating_sub(1))
        .map(|w| w + GAP)
        .sum();
    let rendered = table.render_with(&widths);
    let mut lines = rendered.lines();
    if let Some(h) = lines.next() {
        let _ = writeln!(out, "{indent}{h}");
    }
    for (line, rest) in lines.zip(&rests) {
        let _ = writeln!(out, "{indent}{line}");
        for more in rest {
            let _ = writeln!(out, "{indent}{}{more}", " ".repeat(column));
        }
    }
}

fn conditions_section(out: &mut String, conditions: &[Condition], now: Timestamp) {
    if conditions.is_empty() {
        out.push_str("Conditions:  <none>\n");
        return;
    }
    out.push_str("Conditions:\n");
    let rows: Vec<Vec<String>> = conditions
        .iter()
        .map(|c| {
            vec![
                c.type_.clone(),
                c.status.clone(),
                or_none(Some(&c.reason)),
                age(Some(c.last_transition_time.0), now),
                or_none(Some(&c.message)),
            ]
        })
        .collect();
    free_text_table(
        out,
        "  ",
        &["Type", "Status", "Reason", "Since", "Message"],
        &rows,
    );
}

fn events_section(
    out: &mut String,
    events: &std::result::Result<Vec<KubeEvent>, String>,
    now: Timestamp,
) {
    let events = match events {
        Err(why) => {
            let _ = writeln!(out, "Events:  <cannot list: {why}>");
            return;
        }
        Ok(e) if e.is_empty() => {
            out.push_str("Events:  <none>\n");
            return;
        }
        Ok(e) => e,
    };
    out.push_str("Events:\n");
    let rows: Vec<Vec<String>> = events
        .iter()
        .map(|e| {
            let count = event_count(e);
            let when = if count > 1 {
                format!(
                    "{} (x{count} over {})",
                    age(event_time(e), now),
                    age(event_first_time(e), now)
                )
            } else {
                age(event_time(e), now)
            };
            let from = e
                .reporting_component
                .clone()
                .filter(|s| !s.is_empty())
                .or_else(|| e.source.as_ref().and_then(|s| s.component.clone()));
            vec![
                or_none(e.type_.as_deref()),
                or_none(e.reason.as_deref()),
                when,
                or_none(from.as_deref()),
                or_none(e.message.as_deref()),
            ]
        })
        .collect();
    free_text_table(
        out,
        "  ",
        &["Type", "Reason", "Age", "From", "Message"],
        &rows,
    );
}

/// Aligned `Key:  value` lines under `indent`.
fn fields(out: &mut String, indent: &str, pairs: &[(&str, String)]) {
    let width = pairs
        .iter()
        .map(|(k, _)| k.chars().count() + 1)
        .max()
        .unwrap_or(0);
    for (k, v) in pairs {
        let key = format!("{k}:");
        let _ = writeln!(out, "{indent}{key:<width$}  {v}");
    }
}

fn metadata_fields(
    out: &mut String,
    meta: &kube::api::ObjectMeta,
    namespaced: bool,
    now: Timestamp,
) {
    let mut pairs = vec![("Name", or_none(meta.name.as_deref()))];
    if namespaced {
        pairs.push(("Namespace", or_none(meta.namespace.as_deref())));
    }
    let labels = meta
        .labels
        .as_ref()
        .map(|l| {
            l.iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(",")
        })
        .filter(|s| !s.is_empty());
    pairs.push(("Labels", or_none(labels.as_deref())));
    pairs.push(("UID", or_none(meta.uid.as_deref())));
    pairs.push((
        "Created",
        match created(meta) {
            Some(t) => format!("{t} ({} ago)", age(Some(t), now)),
            None => NONE.into(),
        },
    ));
    if let Some(t) = &meta.deletion_timestamp {
        pairs.push((
            "Deleting",
            format!(
                "since {} (finalizers: {})",
                t.0,
                meta.finalizers.clone().unwrap_or_default().join(", ")
            ),
        ));
    }
    fields(out, "", &pairs);
}

/// A unit enum value as the manifest spells it (`jsonl`, `overwrite`).
fn serde_name<T: serde::Serialize>(v: &T) -> String {
    match serde_json::to_value(v) {
        Ok(Value::String(s)) => s,
        _ => NONE.into(),
    }
}

/// The task in one line.
pub fn task_summary(spec: &WorkloadSpec) -> String {
    if let Some(t) = &spec.task.text_embedding {
        let mut s = format!(
            "textEmbedding: tokenizer {}, field {:?}, max length {}, {}",
            t.tokenizer,
            t.text_field,
            t.max_length,
            if t.normalize {
                "normalized"
            } else {
                "not normalized"
            }
        );
        if let Some(o) = &t.output_name {
            let _ = write!(s, ", output {o}");
        }
        s
    } else if let Some(t) = &spec.task.tensor {
        let inputs: Vec<String> = t
            .inputs
            .iter()
            .map(|i| match &i.field {
                Some(f) if f != &i.name => format!("{} <- {f}", i.name),
                _ => i.name.clone(),
            })
            .collect();
        let outputs = if t.outputs.is_empty() {
            "all".to_string()
        } else {
            t.outputs.join(", ")
        };
        format!("tensor: inputs {}; outputs {outputs}", inputs.join(", "))
    } else {
        NONE.into()
    }
}

/// `infermesh describe workload`: spec, status, conditions (messages in full: a failure's
/// message names the input line) and Events, oldest first.
pub fn describe_workload(
    w: &Workload,
    events: &std::result::Result<Vec<KubeEvent>, String>,
    now: Timestamp,
) -> String {
    let mut out = String::new();
    metadata_fields(&mut out, &w.metadata, true, now);
    let spec = &w.spec;
    out.push_str("Spec:\n");
    let model = match &spec.model.sha256 {
        Some(sha) => format!("{} (sha256 {sha})", spec.model.uri),
        None => spec.model.uri.clone(),
    };
    let mut requirements = Vec::new();
    if spec.requirements.gpu {
        requirements.push("a GPU".to_string());
    }
    if let Some(m) = &spec.requirements.min_gpu_memory {
        requirements.push(format!("GPU memory >= {m}"));
    }
    if let Some(p) = spec.requirements.execution_provider {
        requirements.push(format!("execution provider {}", p.as_str()));
    }
    fields(
        &mut out,
        "  ",
        &[
            ("Mesh", spec.mesh.clone()),
            ("Model", model),
            ("Task", task_summary(spec)),
            (
                "Input",
                format!("{} ({})", spec.input.uri, serde_name(&spec.input.format)),
            ),
            (
                "Output",
                format!(
                    "{} (id field {:?}, mode {})",
                    spec.output.uri,
                    spec.output.id_field,
                    serde_name(&spec.output.mode)
                ),
            ),
            ("Shard bytes", spec.shard_bytes.clone()),
            ("Batch size", spec.batch_size.to_string()),
            ("Priority", spec.priority.to_string()),
            ("Max attempts", spec.max_attempts.to_string()),
            (
                "Shard timeout",
                spec.shard_timeout_seconds
                    .map(|s| format!("{s}s"))
                    .unwrap_or_else(|| NONE.into()),
            ),
            (
                "Requirements",
                if requirements.is_empty() {
                    NONE.into()
                } else {
                    requirements.join(", ")
                },
            ),
            ("Suspend", spec.suspend.to_string()),
        ],
    );
    // The lifecycle fields (docs/architecture.md, "Lifecycle"), aligned among themselves.
    let seconds = |s: Option<u32>| s.map_or_else(|| NONE.to_string(), |s| format!("{s}s"));
    let acted_on = w
        .status
        .as_ref()
        .and_then(|s| s.observed_retry_generation)
        .map_or_else(|| NONE.to_string(), |g| g.to_string());
    fields(
        &mut out,
        "  ",
        &[
            ("Active deadline", seconds(spec.active_deadline_seconds)),
            (
                "Retry backoff",
                format!(
                    "{}s, doubled per failed attempt",
                    spec.retry_backoff_seconds
                ),
            ),
            (
                "Retry generation",
                format!("{} (acted on: {acted_on})", spec.retry_generation),
            ),
            (
                "TTL after finished",
                seconds(spec.ttl_seconds_after_finished),
            ),
        ],
    );
    if let Some(at) = w.annotations().get(RETRY_ANNOTATION) {
        fields(&mut out, "", &[("Retry requested", at.clone())]);
    }
    let Some(s) = &w.status else {
        out.push_str("Status:  <none> (the operator has not reported on it yet)\n");
        events_section(&mut out, events, now);
        return out;
    };
    out.push_str("Status:\n");
    let c = &s.shards;
    fields(
        &mut out,
        "  ",
        &[
            ("Phase", format!("{:?}", s.phase)),
            (
                "Shards",
                format!(
                    "{} total: {} pending, {} running, {} succeeded, {} failed",
                    c.total, c.pending, c.running, c.succeeded, c.failed
                ),
            ),
            ("Records", s.records.to_string()),
            ("Progress", or_none(s.progress.as_deref())),
            (
                "Throughput",
                match s.throughput {
                    Some(t) if t.is_finite() => format!("{t:.1} records/s"),
                    _ => NONE.into(),
                },
            ),
            ("ETA", or_none(s.eta.as_deref())),
            ("Credits spent", or_none(s.credits_spent.as_deref())),
            ("Retried attempts", s.attempts_retried.to_string()),
            ("Started", time_and_age(s.start_time.as_deref(), now)),
            ("Completed", time_and_age(s.completion_time.as_deref(), now)),
            (
                "Observed generation",
                match (s.observed_generation, w.metadata.generation) {
                    (Some(o), Some(g)) if o != g => {
                        format!("{o} (the spec is at generation {g})")
                    }
                    (Some(o), _) => o.to_string(),
                    (None, _) => NONE.into(),
                },
            ),
        ],
    );
    conditions_section(&mut out, &s.conditions, now);
    events_section(&mut out, events, now);
    out
}

/// `infermesh describe agent`.
pub fn describe_agent(
    a: &Agent,
    events: &std::result::Result<Vec<KubeEvent>, String>,
    now: Timestamp,
) -> String {
    let mut out = String::new();
    metadata_fields(&mut out, &a.metadata, false, now);
    out.push_str("Spec:\n");
    fields(
        &mut out,
        "  ",
        &[
            ("Mesh", a.spec.mesh.clone()),
            ("Node", a.spec.node.clone()),
            ("Unschedulable", a.spec.unschedulable.to_string()),
        ],
    );
    let Some(s) = &a.status else {
        out.push_str("Status:  <none>\n");
        events_section(&mut out, events, now);
        return out;
    };
    out.push_str("Status:\n");
    let list = |v: &[String]| {
        if v.is_empty() {
            NONE.to_string()
        } else {
            v.join(", ")
        }
    };
    fields(
        &mut out,
        "  ",
        &[
            ("Phase", format!("{:?}", s.phase)),
            (
                "GPU",
                match &s.gpu {
                    Some(g) => format!(
                        "{}x {} ({} MiB each)",
                        g.count,
                        g.product,
                        g.memory_bytes >> 20
                    ),
                    None => or_none(s.gpu_summary.as_deref()),
                },
            ),
            ("Execution providers", list(&s.execution_providers)),
            ("Slots", s.slots.to_string()),
            ("Running", s.running.to_string()),
            ("Completed shards", s.completed_shards.to_string()),
            ("Credits", or_none(s.credits.as_deref())),
            (
                "Last heartbeat",
                time_and_age(s.last_heartbeat.as_deref(), now),
            ),
            ("Models cached", list(&s.models_cached)),
            ("Models loaded", list(&s.models_loaded)),
        ],
    );
    conditions_section(&mut out, &s.conditions, now);
    events_section(&mut out, events, now);
    out
}
