//! Rendering and linting `charts/infermesh` with the real Helm library, through
//! `scripts/helm.py` run by the venv's Python. Renders are cached per values set for the life
//! of the test process (a render takes a fraction of a second, but every test needs several).

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex, OnceLock};

use anyhow::Context;
use serde::Deserialize;

use crate::object::{Object, parse_documents};
use crate::{NAMESPACE, RELEASE, tools, workspace};

/// What the chart installs for one set of values.
#[derive(Clone, Debug)]
pub struct Rendered {
    /// CRDs first (from `crds/`), then the templates' objects in template-path order.
    pub objects: Vec<Object>,
    /// The same objects as the YAML text Helm rendered (what `helm install` would read, with
    /// Go's YAML rules, before sending it to the API server), one entry per document.
    pub documents: Vec<RenderedDocument>,
    /// The rendered `NOTES.txt`.
    pub notes: String,
}

impl Rendered {
    /// The objects of one kind.
    pub fn of_kind<'a>(&'a self, kind: &str) -> impl Iterator<Item = &'a Object> + use<'a> {
        let kind = kind.to_string();
        self.objects.iter().filter(move |o| o.kind() == kind)
    }

    /// The one object of `kind` named `name`, if any.
    pub fn get(&self, kind: &str, name: &str) -> Option<&Object> {
        self.of_kind(kind).find(|o| o.name() == name)
    }
}

/// One document of a render, as text.
#[derive(Clone, Debug)]
pub struct RenderedDocument {
    /// The template path (`infermesh/templates/deployment.yaml`).
    pub source: String,
    /// The YAML Helm rendered.
    pub yaml: String,
}

/// Why a render gave no objects.
#[derive(Clone, Debug)]
pub enum RenderError {
    /// Helm refused the values or a template failed: the message Helm gives the user.
    Rejected(String),
    /// The tools are missing or broke; not a verdict on the chart.
    Setup(String),
}

impl fmt::Display for RenderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Rejected(m) => write!(f, "helm rejected the values: {m}"),
            Self::Setup(m) => write!(f, "{m}"),
        }
    }
}

impl std::error::Error for RenderError {}

/// The values sets every check runs on: the defaults, then each non-default case (files in
/// [`values_dir`], merged left to right).
pub const MATRIX: &[&[&str]] = &[
    &[],
    &["external-database.yaml"],
    &["bundled-postgres.yaml"],
    &["service-monitor.yaml"],
    &["network-policy.yaml"],
    &["external-database.yaml", "network-policy.yaml"],
    &["no-default-mesh.yaml"],
    &["existing-tls-secret.yaml"],
    &["cpu-only-mesh.yaml"],
    &["data-claim.yaml"],
    &["console-ingress.yaml"],
    &["tenants.yaml"],
    &["network-policy.yaml", "network-policy-object-store.yaml"],
];

/// The values files of the tests' matrix, `deploy/tests/values/`.
pub fn values_dir() -> PathBuf {
    workspace().join("deploy").join("tests").join("values")
}

/// Resolves a values file name against [`values_dir`] (absolute paths are kept).
pub fn values_file(name: &str) -> PathBuf {
    let p = Path::new(name);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        values_dir().join(p)
    }
}

#[derive(Deserialize)]
struct RenderOutput {
    objects: Vec<RenderedDoc>,
    notes: String,
}

#[derive(Deserialize)]
struct RenderedDoc {
    source: String,
    yaml: String,
}

/// Renders the chart for release `infermesh` in namespace `infermesh` with the values files
/// `values` (names in [`values_dir`], merged left to right; none: the defaults). Cached.
pub fn render(values: &[&str]) -> Result<Arc<Rendered>, RenderError> {
    type Cache = Mutex<HashMap<Vec<String>, Result<Arc<Rendered>, RenderError>>>;
    static CACHE: OnceLock<Cache> = OnceLock::new();
    let key: Vec<String> = values.iter().map(|v| v.to_string()).collect();
    let cache = CACHE.get_or_init(Default::default);
    if let Some(hit) = cache.lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
        return hit.clone();
    }
    // Rendered outside the lock so that tests render different values sets in parallel.
    let result = render_uncached(values).map(Arc::new);
    cache
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(key, result.clone());
    result
}

fn render_uncached(values: &[&str]) -> Result<Rendered, RenderError> {
    let python = tools::python().map_err(|e| RenderError::Setup(format!("{e:#}")))?;
    let script = workspace().join("scripts").join("helm.py");
    let out = Command::new(&python)
        .arg(&script)
        .arg("render")
        .arg("--json")
        .args(["--release", RELEASE, "--namespace", NAMESPACE])
        .args(values.iter().map(|v| values_file(v)))
        .output()
        .map_err(|e| RenderError::Setup(format!("running {}: {e}", script.display())))?;
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    match out.status.code() {
        Some(0) => {}
        // helm.py: 1 is Helm's verdict on the values or templates; anything else is setup.
        Some(1) => return Err(RenderError::Rejected(stderr)),
        _ => {
            return Err(RenderError::Setup(format!(
                "{} render failed ({}): {stderr}\n{}",
                script.display(),
                out.status,
                tools::SETUP_HINT
            )));
        }
    }
    let parsed: RenderOutput = serde_json::from_slice(&out.stdout)
        .map_err(|e| RenderError::Setup(format!("helm.py printed no JSON: {e}")))?;
    let mut objects = Vec::new();
    let mut documents = Vec::new();
    for doc in parsed.objects {
        objects.extend(
            parse_documents(&doc.source, &doc.yaml)
                .map_err(|e| RenderError::Rejected(format!("{e:#}")))?,
        );
        documents.push(RenderedDocument {
            source: doc.source,
            yaml: doc.yaml,
        });
    }
    Ok(Rendered {
        objects,
        documents,
        notes: parsed.notes,
    })
}

/// What `helm lint --strict` said.
#[derive(Clone, Debug)]
pub struct LintReport {
    /// No warning and no error (INFO advice such as "icon is recommended" is allowed).
    pub clean: bool,
    /// Every message, one a line.
    pub output: String,
}

/// Lints the chart with the values files `values` (strict: warnings count).
pub fn lint(values: &[&str]) -> anyhow::Result<LintReport> {
    let python = tools::python()?;
    let script = workspace().join("scripts").join("helm.py");
    let out = Command::new(&python)
        .arg(&script)
        .arg("lint")
        .args(["--namespace", NAMESPACE])
        .args(values.iter().map(|v| values_file(v)))
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    let output = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    anyhow::ensure!(
        matches!(out.status.code(), Some(0 | 1)),
        "helm.py lint failed ({}): {output}\n{}",
        out.status,
        tools::SETUP_HINT
    );
    Ok(LintReport {
        clean: out.status.success(),
        output,
    })
}
