//! Fair share end to end: `infermesh local` with a Mesh whose `queues` weigh namespace
//! `team-a` 3 and `team-b` 1, one workload in each, run by `infermesh-swarm` agents over real
//! gRPC (4 agents of 2 slots, 50 ms a shard). While both namespaces have shards waiting, the
//! slot-seconds each holds (from `shard.assigned` to `shard.completed` in the event log,
//! clipped to that period) split 3:1, within 10 %.

use std::collections::HashMap;

use infermesh_tests::*;

/// Shards of each workload (one 1 KiB record each).
const SHARDS: usize = 960;
const AGENTS: usize = 4;

fn time(at: &serde_json::Value) -> f64 {
    let t = at.as_str().expect("event time");
    chrono::DateTime::parse_from_rfc3339(t)
        .expect("RFC 3339")
        .timestamp_micros() as f64
        / 1e6
}

#[test]
fn two_namespaces_weighted_three_to_one_split_slot_seconds_three_to_one() {
    let dir = tempfile::tempdir().expect("tmp");
    let model = dir.path().join("model.onnx");
    std::fs::write(&model, b"not read").expect("model");
    let mut docs = vec![
        "apiVersion: infermesh.dev/v1alpha1\nkind: Mesh\nmetadata: {name: test}\nspec:\n  \
         nodeSelector: {}\n  agent: {slots: 2, executionProviders: [cpu]}\n  leaseSeconds: 10\n  \
         heartbeatSeconds: 1\n  queues:\n  - {namespace: team-a, weight: 3}\n  \
         - {namespace: team-b, weight: 1}\n"
            .to_string(),
    ];
    for ns in ["team-a", "team-b"] {
        let input = dir.path().join(format!("{ns}.jsonl"));
        let mut text = String::with_capacity(SHARDS * 1024);
        for i in 0..SHARDS {
            let bare = serde_json::json!({"id": i, "pad": ""}).to_string().len();
            text.push_str(
                &serde_json::json!({"id": i, "pad": "x".repeat(1023 - bare)}).to_string(),
            );
            text.push('\n');
        }
        std::fs::write(&input, text).expect("input");
        docs.push(format!(
            "apiVersion: infermesh.dev/v1alpha1\nkind: Workload\nmetadata: {{name: job, namespace: {ns}}}\n\
             spec:\n  mesh: test\n  model: {{uri: \"{}\"}}\n  task:\n    tensor:\n      inputs: [{{name: x}}]\n  \
             input: {{uri: \"{}\"}}\n  output: {{uri: \"{}/\"}}\n  shardBytes: 1Ki\n  maxAttempts: 5\n",
            model.display(),
            input.display(),
            dir.path().join(format!("out-{ns}")).display()
        ));
    }
    let path = dir.path().join("mesh.yaml");
    std::fs::write(&path, docs.join("---\n")).expect("manifest");
    let (local, creds, url) = spawn_local_for_swarm(&path, dir.path(), AGENTS);
    // Both exit 0 (checked there); the slot-seconds come from the event log.
    run_swarm_against(
        local,
        &creds,
        &[
            "--slots",
            "2",
            "--compute",
            "50ms",
            "--seed",
            "3",
            "--deadline",
            "240s",
        ],
    );

    let events = ledger(&url, &["events", "-o", "json"]);
    assert_eq!(events.code, Some(0), "{}", events.text());
    let events: Vec<serde_json::Value> = serde_json::from_str(&events.stdout).expect("events");
    // Each workload's namespace, from its admission.
    let namespace_of: HashMap<String, String> = events
        .iter()
        .filter(|e| e["kind"] == "workload.admitted")
        .filter_map(|e| {
            let uid = e["workload_uid"].as_str()?.to_string();
            let ns = e["message"].as_str()?.split('/').next()?.to_string();
            Some((uid, ns))
        })
        .collect();
    assert_eq!(namespace_of.len(), 2, "{namespace_of:?}");
    // Each attempt's interval, by namespace.
    let mut assigned: HashMap<(String, i64, i64), f64> = HashMap::new();
    let mut intervals: Vec<(String, f64, f64)> = Vec::new();
    for e in &events {
        let (Some(uid), Some(shard), Some(attempt)) = (
            e["workload_uid"].as_str(),
            e["shard"].as_i64(),
            e["attempt"].as_i64(),
        ) else {
            continue;
        };
        let key = (uid.to_string(), shard, attempt);
        match e["kind"].as_str() {
            Some("shard.assigned") => {
                assigned.insert(key, time(&e["at"]));
            }
            Some("shard.completed") => {
                let start = assigned.remove(&key).expect("completed after assigned");
                intervals.push((namespace_of[uid].clone(), start, time(&e["at"])));
            }
            _ => {}
        }
    }
    assert_eq!(intervals.len(), 2 * SHARDS, "every shard completed once");
    // The period both namespaces had shards waiting: from the later first assignment to the
    // earlier last one.
    let bound = |ns: &str, last: bool| {
        let starts = intervals.iter().filter(|i| i.0 == ns).map(|i| i.1);
        if last {
            starts.fold(f64::MIN, f64::max)
        } else {
            starts.fold(f64::MAX, f64::min)
        }
    };
    let from = bound("team-a", false).max(bound("team-b", false));
    let to = bound("team-a", true).min(bound("team-b", true));
    assert!(to - from > 2.0, "both had work for {:.2}s only", to - from);
    let mut slot_seconds: HashMap<&str, f64> = HashMap::new();
    for (ns, start, end) in &intervals {
        let clipped = end.min(to) - start.max(from);
        if clipped > 0.0 {
            *slot_seconds.entry(ns.as_str()).or_default() += clipped;
        }
    }
    let total: f64 = slot_seconds.values().sum();
    let a = slot_seconds["team-a"] / total;
    let b = slot_seconds["team-b"] / total;
    eprintln!(
        "slot-seconds over {:.2}s with both namespaces waiting: team-a {:.1} ({a:.3}), team-b {:.1} ({b:.3})",
        to - from,
        slot_seconds["team-a"],
        slot_seconds["team-b"]
    );
    assert!(
        (a - 0.75).abs() <= 0.075 && (b - 0.25).abs() <= 0.025,
        "team-a {a:.3} (want 0.75), team-b {b:.3} (want 0.25) of the slot-seconds, within 10 %"
    );
}
