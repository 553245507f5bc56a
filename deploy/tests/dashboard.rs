//! The Grafana dashboard charts every metric the operator and the agents expose, and names
//! no metric they do not.

use std::collections::BTreeSet;

use infermesh_deploy::chart_dir;
use regex::Regex;

/// The metric families the operator and the agents expose (series names as Prometheus stores
/// them: counters with `_total`, histograms by their `_bucket`).
const METRICS: &[&str] = &[
    "infermesh_reconciles_total",
    "infermesh_reconcile_failures_total",
    "infermesh_reconcile_duration_seconds_bucket",
    "infermesh_shards_dispatched_total",
    "infermesh_shards_completed_total",
    "infermesh_shards_failed_total",
    "infermesh_shards_requeued_total",
    "infermesh_queue_depth",
    "infermesh_agents_ready",
    "infermesh_grpc_streams",
    "infermesh_leader",
    "infermesh_api_writes_total",
    "infermesh_agent_inference_seconds_bucket",
    "infermesh_agent_batch_size_bucket",
    "infermesh_agent_records_total",
    "infermesh_agent_shards_total",
    "infermesh_agent_records_per_second",
    "infermesh_agent_connected",
];

fn expressions() -> Vec<String> {
    let text =
        std::fs::read_to_string(chart_dir().join("dashboards/infermesh.json")).expect("dashboard");
    let dash: serde_json::Value = serde_json::from_str(&text).expect("dashboard is JSON");
    assert_eq!(dash["uid"], "infermesh");
    let mut out = Vec::new();
    fn walk(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, v) in m {
                    match (k.as_str(), v) {
                        ("expr" | "definition", serde_json::Value::String(s)) => {
                            out.push(s.clone())
                        }
                        _ => walk(v, out),
                    }
                }
            }
            serde_json::Value::Array(a) => a.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    walk(&dash, &mut out);
    out
}

#[test]
fn the_dashboard_charts_every_exposed_metric() {
    let all = expressions().join("\n");
    for m in METRICS {
        assert!(
            Regex::new(&format!(r"\b{m}\b"))
                .expect("regex")
                .is_match(&all),
            "{m} is not on the dashboard"
        );
    }
}

#[test]
fn the_dashboard_names_no_metric_that_is_not_exposed() {
    let re = Regex::new(r"\binfermesh_[a-z_]+").expect("regex");
    let known: BTreeSet<&str> = METRICS.iter().copied().collect();
    for e in expressions() {
        for m in re.find_iter(&e) {
            assert!(known.contains(m.as_str()), "{} in {e:?}", m.as_str());
        }
    }
}
