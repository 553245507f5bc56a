//! Models are content-addressed. A model file replaced behind its pinned sha256 is named at
//! admission (run output and event log), the pinned model is what runs (from the agents'
//! cache), and `_SUCCESS.json` records both the sha256 that ran and what the URI held.

use infermesh_tests::*;

#[test]
fn a_model_changed_behind_its_pin_is_reported_and_the_pinned_model_runs() {
    let dir = tempfile::tempdir().expect("tmp");
    let model = dir.path().join("model.onnx");
    std::fs::copy(test_models().join("tensor.onnx"), &model).expect("model");
    let pinned = sha256_file(&model);
    let url = format!("sqlite://{}", dir.path().join("state.db").display());
    let run_into = |out: &str| -> Run {
        let input = dir.path().join("in.jsonl");
        let text: String = (0..50)
            .map(|i| format!("{{\"id\": {i}, \"x\": [1, 2, 3, {i}]}}\n"))
            .collect();
        std::fs::write(&input, text).expect("input");
        let yaml = manifest(
            &model,
            Some(&pinned),
            "    tensor:\n      inputs: [{name: x}]",
            &input,
            &dir.path().join(out),
            "",
        );
        let path = dir.path().join("mesh.yaml");
        std::fs::write(&path, yaml).expect("manifest");
        run_local_on(&path, 1, dir.path(), &url)
    };
    let first = run_into("out-1");
    assert_eq!(first.code, Some(0), "{}", first.text());
    assert!(!first.stderr.contains("ModelChanged"), "{}", first.text());

    // Another file at the same path; the pin stays.
    std::fs::copy(test_models().join("corrupt.onnx"), &model).expect("replace");
    let now = sha256_file(&model);
    assert_ne!(now, pinned);
    let second = run_into("out-2");
    assert_eq!(
        second.code,
        Some(0),
        "the pinned model ran from the cache: {}",
        second.text()
    );
    assert!(second.stderr.contains("ModelChanged"), "{}", second.text());
    assert!(second.stderr.contains(&now), "{}", second.text());
    let manifest = success_manifest(&dir.path().join("out-2"));
    assert_eq!(manifest["model"]["sha256"], pinned.as_str(), "what ran");
    assert_eq!(
        manifest["model"]["uriSha256AtAdmission"],
        now.as_str(),
        "what the URI held"
    );
    let events = ledger(
        &url,
        &["events", "--kind", "workload.model_changed", "-o", "json"],
    );
    let rows: serde_json::Value = serde_json::from_str(&events.stdout).expect("json");
    assert_eq!(rows.as_array().map(Vec::len), Some(1), "{}", events.text());
}
