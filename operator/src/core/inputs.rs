//! What a workload's input names, resolved at admission: one plain JSONL object (sized and
//! versioned, as every workload's input once was), or a dataset of files (a prefix, a glob,
//! CSV, Parquet, compressed files) whose layout the shards are cut from.

use infermesh_crds::WorkloadSpec;
use infermesh_io::dataset::{self, DatasetError, Format};
use infermesh_io::{Compression, Dataset};

use super::validate::Validated;

/// A resolved input.
#[derive(Clone, Debug, PartialEq)]
pub struct Resolved {
    /// The size the shards are cut from: the object's bytes, or the dataset's virtual size.
    pub size: u64,
    /// The object's version (one plain object only; a dataset keeps one per file).
    pub version: Option<String>,
    /// The files, when the input is more than one plain JSONL object.
    pub files: Option<Dataset>,
}

/// Resolves `spec.input` as `v` says it must be (format, compression, columns): lists a
/// prefix or glob, reads Parquet footers. Touches no data.
///
/// With a `grant` (the Mesh names tenants), each listed file must lie inside it (a link out
/// of the prefix is refused before the file is read); the URI itself was checked before
/// ([`super::tenancy::check`]).
pub async fn resolve(
    spec: &WorkloadSpec,
    v: &Validated,
    grant: Option<&infermesh_io::Grant>,
) -> Result<Resolved, DatasetError> {
    let uri = &spec.input.uri;
    let want = dataset::Want {
        confine: grant.cloned(),
        ..v.input.clone()
    };
    let ds = dataset::resolve(uri, &want).await?;
    let plain_one = !dataset::is_glob(uri)
        && !uri.ends_with('/')
        && ds.format == Format::Jsonl
        && ds.files.len() == 1
        && ds.files[0].compression == Compression::None;
    if plain_one {
        let f = &ds.files[0];
        return Ok(Resolved {
            size: f.size,
            version: f.version.clone(),
            files: None,
        });
    }
    Ok(Resolved {
        size: ds.total(),
        version: None,
        files: Some(ds),
    })
}

/// The condition reason for an input that did not resolve: `InputNotFound` (no object, no
/// match), `InvalidInput` (not what the format says, a missing column, a bad glob), or
/// `StorageError`.
pub fn reason(e: &DatasetError) -> &'static str {
    match e {
        _ if e.is_not_found() => "InputNotFound",
        DatasetError::Invalid { .. } | DatasetError::BadPattern { .. } => "InvalidInput",
        DatasetError::Forbidden { .. } => "Forbidden",
        _ => "StorageError",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::validate::validate;
    use infermesh_crds::{Manifest, parse_manifests};

    fn spec(input: &str) -> WorkloadSpec {
        let yaml = format!(
            "apiVersion: infermesh.dev/v1alpha1\nkind: Workload\nmetadata: {{name: w}}\nspec:\n  mesh: m\n  \
             model: {{uri: \"file:///m.onnx\"}}\n  task: {{textEmbedding: {{tokenizer: \"file:///t.json\"}}}}\n  \
             input: {input}\n  output: {{uri: \"file:///out/\"}}\n"
        );
        match parse_manifests(&yaml).expect("parses").pop() {
            Some(Manifest::Workload(w)) => w.spec,
            other => panic!("not a workload: {other:?}"),
        }
    }

    async fn resolved(input: &str) -> Result<Resolved, DatasetError> {
        let s = spec(input);
        let v = validate(&s).expect("valid");
        resolve(&s, &v, None).await
    }

    #[tokio::test]
    async fn one_plain_object_stays_one_object_and_the_rest_are_datasets() {
        let dir = tempfile::tempdir().expect("tmp");
        let d = dir.path().display();
        std::fs::write(dir.path().join("a.jsonl"), "{\"text\":\"x\"}\n").expect("write");
        std::fs::write(dir.path().join("b.jsonl.gz"), b"\x1f\x8b").expect("write");
        let one = resolved(&format!("{{uri: \"file://{d}/a.jsonl\"}}"))
            .await
            .expect("one");
        assert_eq!((one.size, one.files), (13, None));
        assert!(one.version.is_some(), "the object's version is pinned");
        let prefix = resolved(&format!("{{uri: \"file://{d}/\"}}"))
            .await
            .expect("prefix");
        let files = prefix.files.expect("a dataset");
        assert_eq!(files.files.len(), 2);
        assert_eq!(files.files[1].compression, Compression::Gzip);
        assert_eq!(prefix.size, files.total());
        // One compressed object is a dataset too: it is read whole.
        let gz = resolved(&format!("{{uri: \"file://{d}/b.jsonl.gz\"}}"))
            .await
            .expect("gz");
        assert!(gz.files.is_some());
    }

    #[tokio::test]
    async fn what_does_not_resolve_says_why() {
        let dir = tempfile::tempdir().expect("tmp");
        let d = dir.path().display();
        let none = resolved(&format!("{{uri: \"file://{d}/part-*.jsonl\"}}"))
            .await
            .expect_err("no match");
        assert_eq!(reason(&none), "InputNotFound");
        assert!(
            none.to_string().contains("part-*.jsonl matches no file"),
            "{none}"
        );
        let missing = resolved(&format!("{{uri: \"file://{d}/missing.jsonl\"}}"))
            .await
            .expect_err("missing");
        assert_eq!(reason(&missing), "InputNotFound");
        std::fs::write(dir.path().join("x.parquet"), "not parquet at all").expect("write");
        let bad = resolved(&format!(
            "{{uri: \"file://{d}/x.parquet\", format: parquet}}"
        ))
        .await
        .expect_err("not parquet");
        assert_eq!(reason(&bad), "InvalidInput");
        assert!(
            bad.to_string()
                .contains("x.parquet: not a readable Parquet file"),
            "{bad}"
        );
    }
}
