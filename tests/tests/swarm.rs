//! `infermesh-swarm` at small scale, as a functional test (its speed is measured by
//! `scripts/bench-scale.sh`, not here): 20 simulated agents attach to `infermesh local` over
//! real gRPC with their own credentials and run 20,000 shards of one record each, echoing the
//! records into their parts. Some shards fail (retryably) and some streams are dropped in the
//! middle of a shard. Every record must be in the outputs exactly once, every shard completed
//! once and charged once, and `ledger verify --outputs` clean.

use std::collections::HashSet;
use std::process::{Command, Stdio};

use infermesh_tests::*;

const SHARDS: usize = 20_000;
const AGENTS: usize = 20;

#[test]
fn twenty_swarm_agents_run_twenty_thousand_shards_exactly_once() {
    let dir = tempfile::tempdir().expect("tmp");
    // Records of exactly 1 KiB with the newline: one per shard of 1Ki.
    let input = dir.path().join("in.jsonl");
    let mut text = String::with_capacity(SHARDS * 1024);
    for i in 0..SHARDS {
        let bare = serde_json::json!({"id": i, "pad": ""}).to_string().len();
        let line = serde_json::json!({"id": i, "pad": "x".repeat(1023 - bare)}).to_string();
        assert_eq!(line.len(), 1023);
        text.push_str(&line);
        text.push('\n');
    }
    std::fs::write(&input, text).expect("input");
    // The swarm runs no model: any file will do.
    let model = dir.path().join("model.onnx");
    std::fs::write(&model, b"not read").expect("model");
    let out = dir.path().join("out");
    let yaml = manifest(
        &model,
        None,
        "    tensor:\n      inputs: [{name: x}]",
        &input,
        &out,
        "  shardBytes: 1Ki\n  maxAttempts: 10\n",
    );
    let path = dir.path().join("mesh.yaml");
    std::fs::write(&path, yaml).expect("manifest");
    let (local, creds, url) = spawn_local_for_swarm(&path, dir.path(), AGENTS);
    let (swarm, _) = run_swarm_against(
        local,
        &creds,
        &[
            "--echo",
            "--fail-rate",
            "0.005",
            "--disconnect-rate",
            "0.001",
            "--seed",
            "7",
            "--deadline",
            "280s",
        ],
    );

    let report: serde_json::Value =
        serde_json::from_str(swarm.stdout.trim()).expect("the swarm's report is JSON");
    assert_eq!(report["attached"], AGENTS, "{report}");
    assert_eq!(report["ended"], "drained", "{report}");
    let completed = report["completed"].as_u64().expect("completed");
    assert!(completed >= SHARDS as u64, "{report}");
    assert!(
        report["failed"].as_u64() > Some(0),
        "failures were sent: {report}"
    );
    assert!(
        report["disconnects"].as_u64() > Some(0),
        "streams were dropped: {report}"
    );
    assert!(report["latency"]["samples"].as_u64() > Some(0), "{report}");
    assert!(
        report["operator"]["cpu_seconds"].as_f64() > Some(0.0),
        "{report}"
    );
    assert!(
        report["operator"]["peak_rss_mb"].as_f64() > Some(1.0),
        "{report}"
    );
    // The swarm's own CPU and the whole machine's, which holds the operator's and the swarm's.
    let machine = &report["machine"];
    let swarm_cpu = machine["swarm_cpu_ms_per_1000_shards"]
        .as_f64()
        .unwrap_or(0.0);
    let machine_cpu = machine["machine_cpu_ms_per_1000_shards"]
        .as_f64()
        .unwrap_or(0.0);
    let operator_cpu = report["operator"]["cpu_ms_per_1000_shards"]
        .as_f64()
        .unwrap_or(0.0);
    assert!(swarm_cpu > 0.0, "{report}");
    // The window in which the whole mesh worked: some of the run's shards, in some of its time.
    let steady_shards = report["operator"]["steady_shards"].as_u64().unwrap_or(0);
    assert!(steady_shards > 0 && steady_shards <= completed, "{report}");
    assert!(
        report["operator"]["steady_seconds"].as_f64() > Some(0.0)
            && report["operator"]["steady_seconds"].as_f64()
                <= report["seconds"].as_f64().map(|s| s + 1.0),
        "{report}"
    );
    // (Both are counted in clock ticks, sampled at slightly different moments: a tenth of slack.)
    assert!(machine_cpu >= 0.9 * swarm_cpu.max(operator_cpu), "{report}");
    let busy = machine["busy"].as_f64().unwrap_or(-1.0);
    assert!(busy > 0.0 && busy <= 1.0, "{report}");

    // Every record exactly once, as the input had it.
    let lines = read_parts(&out);
    assert_eq!(lines.len(), SHARDS, "one output line per record");
    let counts = id_counts(&lines);
    assert_eq!(counts.len(), SHARDS);
    assert!(
        counts.values().all(|c| *c == 1),
        "every record exactly once"
    );
    assert!(
        lines
            .iter()
            .all(|l| l["pad"].as_str().is_some_and(|p| p.len() > 1000))
    );

    // Every shard completed once, and charged once to the agent that completed it.
    let events = ledger(&url, &["events", "-o", "json"]);
    assert_eq!(events.code, Some(0), "{}", events.text());
    let events: Vec<serde_json::Value> = serde_json::from_str(&events.stdout).expect("events");
    let done: Vec<i64> = events
        .iter()
        .filter(|e| e["kind"] == "shard.completed")
        .filter_map(|e| e["shard"].as_i64())
        .collect();
    assert_eq!(done.len(), SHARDS, "one completion per shard");
    assert_eq!(done.iter().collect::<HashSet<_>>().len(), SHARDS);
    let mut charges = 0;
    for i in 0..AGENTS {
        let st = ledger(
            &url,
            &[
                "statement",
                &format!("agent/test-external-{i}"),
                "-o",
                "json",
            ],
        );
        assert_eq!(st.code, Some(0), "{}", st.text());
        let j: serde_json::Value = serde_json::from_str(&st.stdout).expect("statement");
        charges += j
            .get("entries")
            .or(Some(&j))
            .and_then(|e| e.as_array())
            .map_or(0, Vec::len);
    }
    assert_eq!(charges, SHARDS, "one charge per shard");
    let verify = ledger(&url, &["verify", "--outputs"]);
    assert_eq!(verify.code, Some(0), "{}", verify.text());
    eprintln!("{}", swarm.stderr.trim());
}

/// `infermesh local` with only external agents needs no `infermesh-agent` binary: a lone
/// `infermesh` (as a load test ships it) listens and writes the credentials.
#[test]
fn external_agents_alone_need_no_agent_binary() {
    let dir = tempfile::tempdir().expect("tmp");
    let lone = dir.path().join("bin");
    std::fs::create_dir(&lone).expect("bin dir");
    std::fs::copy(bin("infermesh"), lone.join("infermesh")).expect("copy infermesh");
    let input = dir.path().join("in.jsonl");
    std::fs::write(&input, "{\"id\": 0}\n").expect("input");
    let model = dir.path().join("model.onnx");
    std::fs::write(&model, b"not read").expect("model");
    let yaml = manifest(
        &model,
        None,
        "    tensor:\n      inputs: [{name: x}]",
        &input,
        &dir.path().join("out"),
        "",
    );
    let path = dir.path().join("mesh.yaml");
    std::fs::write(&path, yaml).expect("manifest");
    let creds = dir.path().join("creds.json");
    let mut command = Command::new(lone.join("infermesh"));
    command
        .arg("local")
        .arg("-f")
        .arg(&path)
        .args(["--agents", "0", "--external-agents", "1", "--credentials"])
        .arg(&creds)
        .args(["--listen", "127.0.0.1:0", "--no-progress", "--work-dir"])
        .arg(dir.path().join("work"))
        .arg("--database-url")
        .arg(format!(
            "sqlite://{}",
            dir.path().join("store.db").display()
        ))
        .env("PATH", "/usr/bin:/bin")
        .env_remove("INFERMESH_AGENT_BIN")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // The copy was written by this process, and a fork by the other test of this binary (in
    // another thread) inherits its write descriptor until that child execs: while it is held,
    // exec of the copy fails with ETXTBSY. That passes within moments; any other error fails.
    let mut tries = 0;
    let mut local = loop {
        match command.spawn() {
            Ok(child) => break child,
            Err(e) if e.kind() == std::io::ErrorKind::ExecutableFileBusy && tries < 100 => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            Err(e) => panic!("spawn infermesh local: {e}"),
        }
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !creds.exists() {
        if let Ok(Some(status)) = local.try_wait() {
            let mut err = String::new();
            if let Some(mut e) = local.stderr.take() {
                use std::io::Read;
                let _ = e.read_to_string(&mut err);
            }
            panic!("infermesh local exited ({status}) before it wrote the credentials:\n{err}");
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no credentials in 60 s"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let _ = local.kill();
    let _ = local.wait();
    let c: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&creds).expect("read")).expect("credentials JSON");
    assert_eq!(c["agents"].as_array().map(Vec::len), Some(1), "{c}");
}
