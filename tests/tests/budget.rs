//! Budgets across processes: a workload whose namespace is out of credits is held with
//! `QuotaExceeded` (not failed) and runs once `infermesh ledger grant` tops the namespace up.

use std::process::Stdio;
use std::time::{Duration, Instant};

use infermesh_tests::*;

#[test]
fn a_workload_over_budget_is_held_and_runs_after_a_grant() {
    let dir = tempfile::tempdir().expect("tmp");
    let models = test_models();
    let input = dir.path().join("in.jsonl");
    let text: String = (0..200)
        .map(|i| format!("{{\"id\": {i}, \"x\": [1, 2, 3, {i}]}}\n"))
        .collect();
    std::fs::write(&input, text).expect("input");
    let out = dir.path().join("out");
    let yaml = manifest(
        &models.join("tensor.onnx"),
        None,
        "    tensor:\n      inputs: [{name: x}]",
        &input,
        &out,
        "  shardBytes: 1Ki\n",
    )
    .replace(
        "  pricing:",
        "  budgets: [{namespace: team-a, credits: 0}]\n  pricing:",
    );
    let manifest_path = dir.path().join("mesh.yaml");
    std::fs::write(&manifest_path, yaml).expect("manifest");
    let url = format!("sqlite://{}", dir.path().join("state.db").display());

    let mut child = local_command(&manifest_path, 1, dir.path())
        .arg("--database-url")
        .arg(&url)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");

    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        assert!(Instant::now() < deadline, "the workload was never held");
        if let Ok(Some(status)) = child.try_wait() {
            let run = Run::from(child.wait_with_output().expect("output"));
            panic!(
                "infermesh local ended ({status}) before the grant:\n{}",
                run.text()
            );
        }
        let held = ledger(&url, &["events", "--kind", "workload.held", "-o", "json"]);
        if held.code == Some(0) && held.stdout.contains("QuotaExceeded") {
            assert!(held.stdout.contains("credits left"), "{}", held.text());
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        !out.join("_SUCCESS.json").exists(),
        "nothing ran while held"
    );
    let grant = ledger(
        &url,
        &[
            "grant",
            "--namespace",
            "team-a",
            "--mesh",
            "test",
            "--credits",
            "5",
        ],
    );
    assert_eq!(grant.code, Some(0), "{}", grant.text());

    let run = Run::from(child.wait_with_output().expect("wait"));
    assert_eq!(run.code, Some(0), "{}", run.text());
    assert_eq!(read_parts(&out).len(), 200);
    let balance = ledger(&url, &["balance", "--namespace", "team-a", "-o", "json"]);
    let rows: serde_json::Value = serde_json::from_str(&balance.stdout).expect("json");
    let left = rows[0]["microCredits"].as_i64().expect("balance");
    assert!(
        left < 5_000_000 && left > 0,
        "charged against the grant: {left}"
    );
    let verify = ledger(&url, &["verify"]);
    assert_eq!(verify.code, Some(0), "{}", verify.text());
}
