//! End to end with separate processes: `infermesh local` (core + gRPC server) and two
//! `infermesh-agent` processes running the generated tensor model.

use infermesh_operator::store::{self, EventFilter, Store};
use infermesh_tests::*;

/// Runs the tensor workload on `database_url` (SQLite file when `None`) and checks outputs,
/// charges and events; returns the state directory and the database URL.
async fn run_tensor_mesh(database_url: Option<String>) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().expect("tmp");
    let models = test_models();
    let input = dir.path().join("in.jsonl");
    let n = 3000;
    let mut text = String::new();
    for i in 0..n {
        let x = [i as f32 / 100.0, 1.0, -((i % 7) as f32), 0.5];
        text.push_str(&serde_json::json!({"id": i, "x": x}).to_string());
        text.push('\n');
        if i % 500 == 0 {
            text.push('\n'); // blank lines are not records
        }
    }
    std::fs::write(&input, &text).expect("input");
    let out = dir.path().join("out");
    let task = "    tensor:\n      inputs: [{name: x}]\n      outputs: [y, s]";
    let model = models.join("tensor.onnx");
    let yaml = manifest(
        &model,
        Some(&sha256_file(&model)),
        task,
        &input,
        &out,
        "  shardBytes: 4Ki\n",
    );
    let manifest_path = dir.path().join("mesh.yaml");
    std::fs::write(&manifest_path, yaml).expect("manifest");

    let url = database_url
        .unwrap_or_else(|| format!("sqlite://{}", dir.path().join("state.db").display()));
    let run: Run = local_command(&manifest_path, 2, dir.path())
        .arg("--database-url")
        .arg(&url)
        .output()
        .expect("run infermesh local")
        .into();
    assert_eq!(run.code, Some(0), "{}", run.text());
    assert!(run.stdout.contains("Succeeded"), "{}", run.text());

    let lines = read_parts(&out);
    let counts = id_counts(&lines);
    assert_eq!(lines.len(), n, "one output line per record");
    assert_eq!(counts.len(), n, "every id present");
    assert!(counts.values().all(|&c| c == 1), "no id twice");
    // y = x @ W + b with W = arange(12).reshape(4, 3) / 10, b = [0.5, -1, 2]; s = sum(x).
    for l in lines.iter().filter(|l| l["id"] == 123) {
        let x = [1.23f32, 1.0, -((123 % 7) as f32), 0.5];
        let w = |r: usize, c: usize| (r * 3 + c) as f32 / 10.0;
        let b = [0.5f32, -1.0, 2.0];
        for c in 0..3 {
            let want: f32 = (0..4).map(|r| x[r] * w(r, c)).sum::<f32>() + b[c];
            let got = l["y"][c].as_f64().expect("y") as f32;
            assert!((got - want).abs() < 1e-4, "y[{c}] = {got}, want {want}");
        }
        let s = l["s"].as_f64().expect("s") as f32;
        assert!((s - x.iter().sum::<f32>()).abs() < 1e-4);
    }

    let manifest = success_manifest(&out);
    assert_eq!(manifest["records"], n);
    let shards = manifest["shards"].as_u64().expect("shards") as usize;
    assert!(shards > 10, "the input was cut into many shards ({shards})");
    let uid = manifest["uid"].as_str().expect("uid").to_string();

    let store = store::open(&url).await.expect("db");
    let charges = store.charges(&uid).await.expect("charges");
    assert_eq!(charges.len(), shards, "shard charges = shards");
    let mut charged: Vec<u32> = charges.iter().map(|c| c.shard).collect();
    charged.dedup();
    assert_eq!(charged.len(), shards, "no shard charged twice");
    assert!(
        charges
            .iter()
            .all(|c| c.from == "namespace/team-a" && c.to.starts_with("agent/test-local-"))
    );
    let balances = store.balances().await.expect("balances");
    assert_eq!(
        balances.iter().map(|(_, b)| b).sum::<i64>(),
        0,
        "double entry sums to zero: {balances:?}"
    );
    let completed = store
        .events(&EventFilter {
            workload_uid: Some(uid),
            kind: Some("shard.completed".into()),
            ..Default::default()
        })
        .await
        .expect("events");
    assert_eq!(completed.len(), shards);
    let agents: std::collections::BTreeSet<_> =
        completed.iter().filter_map(|e| e.agent.clone()).collect();
    assert_eq!(agents.len(), 2, "both agents ran shards: {agents:?}");
    (dir, url)
}

#[tokio::test(flavor = "multi_thread")]
async fn every_record_appears_exactly_once_and_each_shard_is_charged_once() {
    let (dir, url) = run_tensor_mesh(None).await;
    let verify = ledger(&url, &["verify"]);
    assert_eq!(verify.code, Some(0), "{}", verify.text());
    // A row inserted behind the ledger's back is found and named.
    let db = dir.path().join("state.db");
    let out = std::process::Command::new(python())
        .arg("-c")
        .arg("import sqlite3,sys; c=sqlite3.connect(sys.argv[1]); c.execute(\"INSERT INTO ledger_entries (tx_id, account, amount) VALUES (3, 'agent/test-local-0', 7)\"); c.commit()")
        .arg(&db)
        .output()
        .expect("python");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let verify = ledger(&url, &["verify"]);
    assert_eq!(verify.code, Some(1), "{}", verify.text());
    assert!(
        verify.stdout.contains("transaction 3 does not balance"),
        "{}",
        verify.text()
    );
    assert!(
        verify.stdout.contains("account agent/test-local-0"),
        "{}",
        verify.text()
    );
    let json = ledger(&url, &["verify", "-o", "json"]);
    let report: serde_json::Value = serde_json::from_str(&json.stdout).expect("json");
    assert_eq!(report["ok"], false);
    assert_eq!(report["report"]["unbalanced_transactions"][0], 3);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_same_mesh_runs_on_postgres() {
    let url = store::testing::fresh_database()
        .await
        .expect("test Postgres");
    let (_dir, url) = run_tensor_mesh(Some(url)).await;
    let verify = ledger(&url, &["verify"]);
    assert_eq!(verify.code, Some(0), "{}", verify.text());
    let balance = ledger(&url, &["balance", "-o", "json"]);
    let rows: serde_json::Value = serde_json::from_str(&balance.stdout).expect("json");
    let total: i64 = rows
        .as_array()
        .expect("rows")
        .iter()
        .map(|r| r["microCredits"].as_i64().unwrap_or(0))
        .sum();
    assert_eq!(total, 0, "double entry: {}", balance.stdout);
}
