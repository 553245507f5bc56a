//! `infermesh local` refuses manifests a person gets wrong before anything runs: each case
//! exits 2 with a message that names the field, the document or the location, and leaves no
//! output and no database behind.

use std::path::Path;

use infermesh_tests::*;

fn run(dir: &Path, yaml: &str) -> Run {
    let path = dir.join("mesh.yaml");
    std::fs::write(&path, yaml).expect("manifest");
    run_local_on(
        &path,
        1,
        dir,
        &format!("sqlite://{}", dir.join("state.db").display()),
    )
}

fn refused(run: &Run, words: &[&str]) {
    assert_eq!(run.code, Some(2), "{}", run.text());
    for w in words {
        assert!(run.stderr.contains(w), "`{w}` not in: {}", run.text());
    }
}

#[test]
fn type_errors_name_their_field_and_shard_sizes_are_bounded() {
    let dir = tempfile::tempdir().expect("tmp");
    let (path, _input, out) = tensor_job(dir.path(), 20, "");
    let base = std::fs::read_to_string(&path).expect("manifest");
    let with = |extra: &str| base.replace("  batchSize: 16\n", extra);
    refused(
        &run(dir.path(), &with("  batchSize: \"abc\"\n")),
        &["spec.batchSize", "invalid type"],
    );
    refused(
        &run(dir.path(), &with("  batchSize: -1\n")),
        &["spec.batchSize"],
    );
    refused(
        &run(dir.path(), &with("  batchSize: 16\n  shardBytes: \"1\"\n")),
        &["spec.shardBytes", "minimum of 1Ki"],
    );
    refused(
        &run(dir.path(), &with("  batchSize: 16\n  shardBytes: 0\n")),
        &["spec.shardBytes"],
    );
    assert!(!out.exists(), "nothing ran");
    assert!(
        !dir.path().join("state.db").exists(),
        "no database for a refused manifest"
    );
    // A plain byte count is a quantity too.
    let ok = run(dir.path(), &with("  batchSize: 16\n  shardBytes: 131072\n"));
    assert_eq!(ok.code, Some(0), "{}", ok.text());
    assert_eq!(success_manifest(&out)["records"], 20);
}

#[test]
fn two_workloads_with_one_name_are_refused_naming_both_documents() {
    let dir = tempfile::tempdir().expect("tmp");
    let (path, _input, out) = tensor_job(dir.path(), 20, "");
    let text = std::fs::read_to_string(&path).expect("manifest");
    let workload = &text[text
        .find("apiVersion: infermesh.dev/v1alpha1\nkind: Workload")
        .expect("workload")..];
    let twice = format!("{text}---\n{workload}");
    refused(
        &run(dir.path(), &twice),
        &["documents 2 and 3", "Workload team-a/job"],
    );
    assert!(!out.exists(), "nothing ran, nothing was charged");
}

#[test]
fn an_output_that_cannot_be_written_is_found_before_anything_runs() {
    let dir = tempfile::tempdir().expect("tmp");
    let (path, _input, out) = tensor_job(dir.path(), 20, "");
    // A file where the output folder should be.
    std::fs::write(&out, "not a folder").expect("file");
    let text = std::fs::read_to_string(&path).expect("manifest");
    let started = std::time::Instant::now();
    refused(
        &run(dir.path(), &text),
        &["OutputNotWritable", &out.display().to_string()],
    );
    assert!(
        started.elapsed() < std::time::Duration::from_secs(30),
        "found at once, not after inference"
    );
    let proc = text.replace(&format!("{}/", out.display()), "/proc/infermesh-out/");
    refused(
        &run(dir.path(), &proc),
        &["OutputNotWritable", "/proc/infermesh-out"],
    );
}
