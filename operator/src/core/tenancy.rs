//! Who may use which locations: the Mesh's `spec.tenants`, applied to a workload before any
//! object is touched, and the overlaps between outputs. Pure: tested without any store.

use infermesh_crds::{MeshSpec, WorkloadSpec};
use infermesh_io::access::{self, Grant, Use};

use super::validate::Invalid;

/// What `namespace` may use on a Mesh: `None` when the Mesh lists no tenants (no
/// restriction); an empty grant for a namespace it does not list.
pub fn grant_of(mesh: &MeshSpec, namespace: &str) -> Option<Grant> {
    let tenants = mesh.tenants.as_ref()?;
    let mut grant = Grant::default();
    for t in tenants.iter().filter(|t| t.namespace == namespace) {
        grant.read.extend(t.read.iter().cloned());
        grant.write.extend(t.write.iter().cloned());
    }
    Some(grant)
}

/// Every location a workload reads: (field, URI).
pub fn reads(spec: &WorkloadSpec) -> Vec<(&'static str, &str)> {
    let mut reads = vec![("spec.model.uri", spec.model.uri.as_str())];
    if let Some(te) = &spec.task.text_embedding {
        reads.push(("spec.task.textEmbedding.tokenizer", te.tokenizer.as_str()));
    }
    reads.push(("spec.input.uri", spec.input.uri.as_str()));
    reads
}

/// Checks the workload's locations against its namespace's grant (none: no restriction):
/// `Forbidden`, naming the field and the prefixes, for the first that falls outside. Then,
/// whatever the grant, that it does not write inside what it reads (`InvalidSpec`).
pub fn check(spec: &WorkloadSpec, grant: Option<&Grant>) -> Result<(), Invalid> {
    if let Some(grant) = grant {
        for (field, uri) in reads(spec) {
            grant
                .check(field, uri, Use::Read)
                .map_err(|m| Invalid::new("Forbidden", m))?;
        }
        grant
            .check("spec.output.uri", &spec.output.uri, Use::Write)
            .map_err(|m| Invalid::new("Forbidden", m))?;
    }
    // A prefix is listed to any depth; a glob reaches below its directory only through a
    // `/` or `**` in its pattern (`*` stays within a name), else only the directory's own
    // files, where the parts of an output that is that very directory would be.
    let input = &spec.input.uri;
    let input_dir = access::literal_dir(input);
    let output = &spec.output.uri;
    let reads_own = if input.ends_with('/') && input_dir == input.as_str() {
        access::within(output, input_dir)
    } else if input_dir != input.as_str() {
        let pattern = &input[input_dir.len()..];
        if pattern.contains('/') || pattern.contains("**") {
            access::within(output, input_dir)
        } else {
            access::within(output, input_dir) && access::within(input_dir, output)
        }
    } else {
        false
    };
    if reads_own {
        return Err(Invalid::new(
            "InvalidSpec",
            format!(
                "spec.output.uri: {} is inside the input {input}: a run would read its own parts",
                spec.output.uri
            ),
        ));
    }
    Ok(())
}

/// Whether two output locations overlap: one is the other or lies below it.
pub fn outputs_overlap(a: &str, b: &str) -> bool {
    access::within(a, b) || access::within(b, a)
}

#[cfg(test)]
mod tests {
    use super::*;
    use infermesh_crds::{Manifest, TenantSpec, parse_manifests};

    fn workload(input: &str, output: &str, model: &str, tokenizer: &str) -> WorkloadSpec {
        let yaml = format!(
            "apiVersion: infermesh.dev/v1alpha1\nkind: Workload\nmetadata: {{name: w, namespace: team-b}}\n\
             spec:\n  mesh: m\n  model: {{uri: \"{model}\"}}\n  task:\n    textEmbedding: {{tokenizer: \"{tokenizer}\"}}\n  \
             input: {{uri: \"{input}\"}}\n  output: {{uri: \"{output}\"}}\n"
        );
        match parse_manifests(&yaml).expect("parse").remove(0) {
            Manifest::Workload(w) => w.spec,
            other => panic!("not a workload: {other:?}"),
        }
    }

    fn mesh() -> MeshSpec {
        let mut m: MeshSpec = serde_json::from_str("{}").expect("mesh");
        m.tenants = Some(vec![
            TenantSpec {
                namespace: "team-a".into(),
                read: vec!["s3://team-a/".into(), "s3://shared/models/".into()],
                write: vec!["s3://team-a/out/".into()],
            },
            TenantSpec {
                namespace: "team-b".into(),
                read: vec!["s3://team-b/".into(), "s3://shared/models/".into()],
                write: vec!["s3://team-b/out/".into()],
            },
        ]);
        m
    }

    #[test]
    fn a_namespace_gets_its_entries_and_an_unlisted_one_nothing() {
        let m = mesh();
        let b = grant_of(&m, "team-b").expect("listed");
        assert_eq!(b.read, vec!["s3://team-b/", "s3://shared/models/"]);
        assert_eq!(grant_of(&m, "team-c"), Some(Grant::default()));
        let open: MeshSpec = serde_json::from_str("{}").expect("mesh");
        assert_eq!(grant_of(&open, "team-c"), None);
    }

    #[test]
    fn each_field_naming_another_tenants_prefix_is_forbidden_by_name() {
        let m = mesh();
        let grant = grant_of(&m, "team-b");
        let ok = (
            "s3://team-b/in/",
            "s3://team-b/out/run-1/",
            "s3://shared/models/m.onnx",
            "s3://shared/models/tokenizer.json",
        );
        check(&workload(ok.0, ok.1, ok.2, ok.3), grant.as_ref()).expect("its own");
        let cases = [
            (
                workload("s3://team-a/in/", ok.1, ok.2, ok.3),
                "spec.input.uri",
            ),
            (
                workload(ok.0, "s3://team-a/out/x/", ok.2, ok.3),
                "spec.output.uri",
            ),
            (
                workload(ok.0, ok.1, "s3://team-a/m.onnx", ok.3),
                "spec.model.uri",
            ),
            (
                workload(ok.0, ok.1, ok.2, "s3://team-a/tok.json"),
                "spec.task.textEmbedding.tokenizer",
            ),
            // Readable is not writable; a lookalike bucket is another bucket.
            (
                workload(ok.0, "s3://team-b/in/out/", ok.2, ok.3),
                "spec.output.uri",
            ),
            (
                workload("s3://team-bb/in/", ok.1, ok.2, ok.3),
                "spec.input.uri",
            ),
            (
                workload("s3://team-b/**/../../team-a/*", ok.1, ok.2, ok.3),
                "spec.input.uri",
            ),
        ];
        for (spec, field) in cases {
            let e = check(&spec, grant.as_ref()).expect_err(field);
            assert_eq!(e.reason, "Forbidden", "{e}");
            assert!(e.message.starts_with(field), "{e}");
        }
        let e = check(
            &workload(ok.0, "s3://team-a/out/", ok.2, ok.3),
            grant.as_ref(),
        )
        .expect_err("team-a's output");
        assert!(e.message.contains("(s3://team-b/out/)"), "{e}");
    }

    #[test]
    fn an_output_inside_its_own_input_is_refused_with_or_without_tenants() {
        let e = check(
            &workload(
                "s3://b/docs/",
                "s3://b/docs/emb/",
                "s3://m/m.onnx",
                "s3://m/t.json",
            ),
            None,
        )
        .expect_err("inside");
        assert_eq!(e.reason, "InvalidSpec");
        assert!(e.message.starts_with("spec.output.uri"), "{e}");
        // A glob that descends reaches the output's parts; one within a folder's own names
        // reaches them only when the output is that folder.
        let m = ("s3://m/m", "s3://m/t");
        let deep = workload("s3://b/docs/**/*.jsonl", "s3://b/docs/emb/", m.0, m.1);
        assert!(check(&deep, None).is_err());
        let flat = workload("s3://b/docs/*.jsonl", "s3://b/docs/emb/", m.0, m.1);
        check(&flat, None).expect("the parts are one folder down");
        let same = workload("s3://b/docs/*.jsonl", "s3://b/docs/", m.0, m.1);
        assert!(check(&same, None).is_err());
        // Beside it, or one object's sibling, is fine.
        check(
            &workload(
                "s3://b/docs/",
                "s3://b/emb/",
                "s3://m/m.onnx",
                "s3://m/t.json",
            ),
            None,
        )
        .expect("beside");
        check(
            &workload(
                "s3://b/in.jsonl",
                "s3://b/out/",
                "s3://m/m.onnx",
                "s3://m/t.json",
            ),
            None,
        )
        .expect("one object");
    }

    #[test]
    fn outputs_overlap_by_whole_segments() {
        assert!(outputs_overlap("s3://b/out/", "s3://b/out/"));
        assert!(outputs_overlap("s3://b/out/", "s3://b/out/run-1/"));
        assert!(outputs_overlap("s3://b/out/run-1", "s3://b/out"));
        assert!(!outputs_overlap("s3://b/out-1/", "s3://b/out/"));
        assert!(!outputs_overlap("s3://b/out/", "s3://c/out/"));
        assert!(outputs_overlap("/tmp/x/out/", "file:///tmp/x/"));
    }
}
