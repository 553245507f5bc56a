//! Every manifest under `examples/` parses strictly and every Workload in it validates.

use infermesh_crds::{Manifest, parse_manifests};
use infermesh_operator::core::tenancy;
use infermesh_operator::core::validate::validate;
use infermesh_operator::local::absolutize;
use infermesh_tests::workspace;

fn yaml_files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir)
        .expect("examples dir")
        .filter_map(|e| e.ok())
    {
        let p = e.path();
        if p.is_dir() && !p.is_symlink() {
            out.extend(yaml_files(&p));
        } else if p.extension().is_some_and(|x| x == "yaml" || x == "yml") {
            out.push(p);
        }
    }
    out.sort();
    out
}

#[test]
fn every_example_manifest_parses_and_validates() {
    let files = yaml_files(&workspace().join("examples"));
    assert!(files.len() >= 4, "examples found: {files:?}");
    let (mut meshes, mut workloads) = (0, 0);
    for f in &files {
        let text = std::fs::read_to_string(f).expect("read");
        let docs = parse_manifests(&text).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        // A Mesh of the same file that names tenants confines that file's Workloads.
        let meshes_here: Vec<(String, infermesh_crds::MeshSpec)> = docs
            .iter()
            .filter_map(|d| match d {
                Manifest::Mesh(m) => {
                    Some((m.metadata.name.clone().unwrap_or_default(), m.spec.clone()))
                }
                _ => None,
            })
            .collect();
        for d in docs {
            match d {
                Manifest::Mesh(m) => {
                    meshes += 1;
                    assert!(
                        m.spec.heartbeat_seconds < m.spec.lease_seconds,
                        "{}",
                        f.display()
                    );
                }
                Manifest::Workload(w) => {
                    workloads += 1;
                    // Local manifests may use paths relative to the file, as `infermesh local` does.
                    let base = f.parent().expect("dir");
                    let mut spec = w.spec;
                    for uri in [
                        &mut spec.model.uri,
                        &mut spec.input.uri,
                        &mut spec.output.uri,
                    ] {
                        *uri = absolutize(uri, base);
                    }
                    if let Some(te) = &mut spec.task.text_embedding {
                        te.tokenizer = absolutize(&te.tokenizer, base);
                    }
                    validate(&spec).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
                    let ns = w.metadata.namespace.clone().unwrap_or_default();
                    let grant = meshes_here
                        .iter()
                        .find(|(name, _)| *name == spec.mesh)
                        .and_then(|(_, m)| tenancy::grant_of(m, &ns));
                    tenancy::check(&spec, grant.as_ref())
                        .unwrap_or_else(|e| panic!("{}: {e}", f.display()));
                }
                // A tenant's credentials, for `spec.credentials` in local mode.
                Manifest::Secret(s) => {
                    assert!(s.metadata.name.is_some(), "{}", f.display());
                }
            }
        }
    }
    assert!(
        meshes >= 2 && workloads >= 3,
        "{meshes} meshes, {workloads} workloads"
    );
}
