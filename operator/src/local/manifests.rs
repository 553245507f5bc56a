//! Reading a local manifest file: parse strictly, make URIs absolute (relative paths are taken
//! from the manifest's directory), validate, and check that inputs and models exist before
//! any agent starts, so a typo costs a clear message and no run.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use infermesh_crds::{Manifest, MeshSpec, WorkloadSpec, parse_manifests};
use infermesh_io::{Location, ObjectError};

use crate::core::validate::validate;
use crate::core::{inputs, tenancy};

/// A workload read from the file, ready to submit.
#[derive(Clone, Debug)]
pub struct LocalWorkload {
    /// Namespace (from metadata, else `--namespace`).
    pub namespace: String,
    /// Name.
    pub name: String,
    /// Spec with absolute URIs.
    pub spec: WorkloadSpec,
    /// Input size in bytes.
    pub input_size: u64,
    /// Input version (ETag) at that size: every shard reads that very object.
    pub input_version: Option<String>,
    /// The input's files when it is not one plain JSONL object.
    pub input_files: Option<infermesh_io::Dataset>,
    /// `spec.credentials`, from a Secret of the same file and namespace.
    pub credentials: Option<infermesh_io::Credentials>,
}

/// What a manifest file asks for.
#[derive(Clone, Debug, Default)]
pub struct LocalPlan {
    /// Meshes by name.
    pub meshes: BTreeMap<String, MeshSpec>,
    /// Workloads in file order.
    pub workloads: Vec<LocalWorkload>,
}

/// Makes `uri` absolute: URIs with a scheme stay; paths become `file://` URIs, relative ones
/// from `base`.
pub fn absolutize(uri: &str, base: &Path) -> String {
    if uri.contains("://") {
        return uri.to_string();
    }
    let path = if Path::new(uri).is_absolute() {
        PathBuf::from(uri)
    } else {
        base.join(uri)
    };
    let mut normal = PathBuf::new();
    for c in path.components() {
        match c {
            std::path::Component::ParentDir => {
                normal.pop();
            }
            std::path::Component::CurDir => {}
            other => normal.push(other),
        }
    }
    let mut s = format!("file://{}", normal.display());
    if uri.ends_with('/') && !s.ends_with('/') {
        s.push('/');
    }
    s
}

async fn must_exist(what: &str, reason: &str, uri: &str) -> Result<(u64, Option<String>), String> {
    let loc = Location::parse(uri).map_err(|e| format!("InvalidSpec: {what}: {e}"))?;
    loc.facts().await.map_err(|e| match e {
        ObjectError::NotFound { .. } => format!("{reason}: {what} {uri} does not exist"),
        other => format!("{reason}: {what}: {other}"),
    })
}

/// The credentials of a Secret document: its `data` (base64), with `stringData` over it as
/// the API server would merge them.
fn secret_credentials(
    secret: &k8s_openapi::api::core::v1::Secret,
) -> Result<infermesh_io::Credentials, String> {
    let mut data: BTreeMap<String, Vec<u8>> = secret
        .data
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.0.clone()))
        .collect();
    for (k, v) in secret.string_data.iter().flatten() {
        data.insert(k.clone(), v.clone().into_bytes());
    }
    infermesh_io::Credentials::from_secret(|k| data.get(k).map(Vec::as_slice))
}

/// Reads, checks and resolves the manifest file.
pub async fn load_plan(file: &Path, default_namespace: &str) -> Result<LocalPlan, String> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| format!("cannot read {}: {e}", file.display()))?;
    let docs = parse_manifests(&text).map_err(|e| format!("{}: {e}", file.display()))?;
    let base = file
        .canonicalize()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .unwrap_or_else(|| PathBuf::from("."));
    let mut plan = LocalPlan::default();
    let mut workloads = Vec::new();
    // namespace/name is an identity: a second document with the same one is refused, naming
    // both (documents are counted from 1, in file order).
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    // Secrets by `namespace/name`.
    let mut secrets: BTreeMap<String, k8s_openapi::api::core::v1::Secret> = BTreeMap::new();
    for (i, doc) in docs.into_iter().enumerate() {
        let (kind, id) = match &doc {
            Manifest::Mesh(m) => (
                "Mesh",
                m.metadata.name.clone().unwrap_or_else(|| "default".into()),
            ),
            Manifest::Secret(secret) => (
                "Secret",
                format!(
                    "{}/{}",
                    secret
                        .metadata
                        .namespace
                        .clone()
                        .unwrap_or_else(|| default_namespace.to_string()),
                    secret.metadata.name.clone().unwrap_or_default()
                ),
            ),
            Manifest::Workload(w) => (
                "Workload",
                format!(
                    "{}/{}",
                    w.metadata
                        .namespace
                        .clone()
                        .unwrap_or_else(|| default_namespace.to_string()),
                    w.metadata.name.clone().unwrap_or_else(|| "workload".into())
                ),
            ),
        };
        if let Some(first) = seen.insert(format!("{kind} {id}"), i + 1) {
            return Err(format!(
                "{}: documents {first} and {} are both {kind} {id}; each must have its own name",
                file.display(),
                i + 1
            ));
        }
        match doc {
            Manifest::Mesh(m) => {
                let name = m.metadata.name.clone().unwrap_or_else(|| "default".into());
                plan.meshes.insert(name, m.spec.clone());
            }
            Manifest::Workload(w) => workloads.push(*w),
            Manifest::Secret(secret) => {
                secrets.insert(id, *secret);
            }
        }
    }
    if workloads.is_empty() {
        return Err(format!("{}: no Workload to run", file.display()));
    }
    for w in workloads {
        let namespace = w
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| default_namespace.to_string());
        let name = w.metadata.name.clone().unwrap_or_else(|| "workload".into());
        let who = format!("Workload {namespace}/{name}");
        let mut spec = w.spec;
        spec.model.uri = absolutize(&spec.model.uri, &base);
        spec.input.uri = absolutize(&spec.input.uri, &base);
        spec.output.uri = absolutize(&spec.output.uri, &base);
        if let Some(te) = &mut spec.task.text_embedding {
            te.tokenizer = absolutize(&te.tokenizer, &base);
        }
        if !plan.meshes.contains_key(&spec.mesh) {
            return Err(format!(
                "{who}: MeshNotFound: mesh `{}` is not defined in {}",
                spec.mesh,
                file.display()
            ));
        }
        let validated = validate(&spec).map_err(|e| format!("{who}: {e}"))?;
        // Before any object is touched: the Mesh's `spec.tenants` allow these locations.
        let grant = plan
            .meshes
            .get(&spec.mesh)
            .and_then(|m| tenancy::grant_of(m, &namespace));
        tenancy::check(&spec, grant.as_ref()).map_err(|e| format!("{who}: {e}"))?;
        let credentials = match &spec.credentials {
            None => None,
            Some(r) => {
                let id = format!("{namespace}/{}", r.secret_ref.name);
                let secret = secrets.get(&id).ok_or_else(|| {
                    format!(
                        "{who}: SecretNotFound: spec.credentials.secretRef: Secret {id} is not \
                         in {} (a `v1` Secret document in the workload's namespace)",
                        file.display()
                    )
                })?;
                Some(secret_credentials(secret).map_err(|e| {
                    format!(
                        "{who}: InvalidCredentials: spec.credentials.secretRef: Secret {id}: {e}"
                    )
                })?)
            }
        };
        let checks = async {
            let input = inputs::resolve(&spec, &validated, grant.as_ref())
                .await
                .map_err(|e| format!("{who}: {}: input: {e}", inputs::reason(&e)))?;
            must_exist("model", "ModelNotFound", &spec.model.uri)
                .await
                .map_err(|e| format!("{who}: {e}"))?;
            if let Some(te) = &spec.task.text_embedding {
                must_exist("tokenizer", "TokenizerNotFound", &te.tokenizer)
                    .await
                    .map_err(|e| format!("{who}: {e}"))?;
            }
            Ok::<_, String>(input)
        };
        let input = infermesh_io::access::scoped(credentials.clone(), checks).await?;
        plan.workloads.push(LocalWorkload {
            namespace,
            name,
            spec,
            input_size: input.size,
            input_version: input.version,
            input_files: input.files,
            credentials,
        });
    }
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths_resolve_from_the_manifest_directory() {
        let base = Path::new("/srv/jobs");
        assert_eq!(
            absolutize("data/in.jsonl", base),
            "file:///srv/jobs/data/in.jsonl"
        );
        assert_eq!(
            absolutize("../models/m.onnx", base),
            "file:///srv/models/m.onnx"
        );
        assert_eq!(absolutize("out/", base), "file:///srv/jobs/out/");
        assert_eq!(absolutize("/abs/x", base), "file:///abs/x");
        assert_eq!(absolutize("s3://bucket/x", base), "s3://bucket/x");
    }

    #[tokio::test]
    async fn two_workloads_with_one_name_are_refused_naming_both_documents() {
        let dir = tempfile::tempdir().expect("tmp");
        let wl = "apiVersion: infermesh.dev/v1alpha1\nkind: Workload\nmetadata: {name: job, namespace: team-a}\n\
                  spec:\n  mesh: m\n  model: {uri: m.onnx}\n  task: {tensor: {inputs: [{name: x}]}}\n  \
                  input: {uri: in.jsonl}\n  output: {uri: out/}\n";
        let mesh =
            "apiVersion: infermesh.dev/v1alpha1\nkind: Mesh\nmetadata: {name: m}\nspec: {}\n";
        let file = dir.path().join("mesh.yaml");
        std::fs::write(&file, format!("{mesh}---\n{wl}---\n{wl}")).expect("write");
        let err = load_plan(&file, "default").await.expect_err("duplicate");
        assert!(err.contains("documents 2 and 3"), "{err}");
        assert!(err.contains("Workload team-a/job"), "{err}");
        // The same name in another namespace is another workload.
        let other = wl.replace("namespace: team-a", "namespace: team-b");
        std::fs::write(&file, format!("{mesh}---\n{wl}---\n{other}")).expect("write");
        let err = load_plan(&file, "default")
            .await
            .expect_err("no input file");
        assert!(!err.contains("documents"), "{err}");
    }
}
