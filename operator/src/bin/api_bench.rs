//! `infermesh-api-bench`: the Kubernetes API write budget of the controllers. A simulated run
//! of N shards on M agents goes through the real Workload reconcile, status writer and Event
//! publisher against a mocked API server that answers every request and counts it; the
//! agents are in-process and complete each shard after a simulated compute time.
//!
//! Prints writes per second (mean, and the most in any sliding one-second window), writes per 1,000
//! shards, and status writes per Workload per 2 seconds. With `--workloads N` the shards are
//! spread over N Workloads run at once, and it also prints how stale a Workload's or an
//! Agent's status got at worst (the longest time without a write while it was live) and how
//! long each Workload's final phase took to be written after the core reached it.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use http::{Request, Response};
use infermesh_crds::{Manifest, Workload, parse_manifests};
use infermesh_operator::controller::{
    Config, Context, WORKLOAD_FINALIZER, events, rbac, status, workload,
};
use infermesh_operator::core::{Core, sim};
use infermesh_operator::metrics::Metrics;
use infermesh_operator::store::{self, Store};
use kube::ResourceExt;
use kube::client::Body;
use serde_json::{Value, json};

#[derive(Parser, Debug)]
struct Args {
    /// Shards in the workload.
    #[arg(long, default_value_t = 10_000)]
    shards: u64,
    /// Simulated agents.
    #[arg(long, default_value_t = 8)]
    agents: usize,
    /// Slots per agent.
    #[arg(long, default_value_t = 2)]
    slots: u32,
    /// Simulated compute time per shard, in milliseconds.
    #[arg(long, default_value_t = 10)]
    compute_ms: u64,
    /// Workloads run at once, the shards spread evenly over them.
    #[arg(long, default_value_t = 1)]
    workloads: u64,
}

/// One request the mocked API server answered.
struct Call {
    /// Seconds since the start.
    at: f64,
    method: String,
    /// The resource as RBAC names it (`workloads/status`).
    shape: String,
    /// The object's name.
    name: String,
    /// For a Workload status write, the phase it carried.
    phase: Option<String>,
}

#[derive(Default)]
struct Counts {
    requests: Vec<Call>,
}

/// The longest gap in `writes` (sorted) within [`from`, `to`], counting from `from` to the first
/// write and from the last to `to`.
fn longest_gap(writes: &[f64], from: f64, to: f64) -> f64 {
    let mut last = from;
    let mut longest: f64 = 0.0;
    for &t in writes.iter().filter(|t| **t >= from && **t <= to) {
        longest = longest.max(t - last);
        last = t;
    }
    longest.max(to - last)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("error"))
        .init();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("model.onnx"), b"model")?;
    let each = args.shards / args.workloads.max(1);
    anyhow::ensure!(each > 0, "fewer shards than workloads");
    std::fs::write(
        dir.path().join("in.jsonl"),
        vec![b'\n'; (each * 1024) as usize],
    )?;
    let d = dir.path().display();
    let mut workloads: Vec<(Workload, Value)> = Vec::new();
    for i in 0..args.workloads.max(1) {
        // One Workload keeps its old name, so the single-Workload figures read as before.
        let name = if args.workloads <= 1 {
            "bench".to_string()
        } else {
            format!("bench-{i}")
        };
        let yaml = format!(
            "apiVersion: infermesh.dev/v1alpha1\nkind: Workload\nmetadata: {{name: {name}, namespace: team-a}}\nspec:\n  mesh: gpus\n  \
             model: {{uri: \"file://{d}/model.onnx\"}}\n  task: {{tensor: {{inputs: [{{name: x}}]}}}}\n  \
             input: {{uri: \"file://{d}/in.jsonl\"}}\n  output: {{uri: \"file://{d}/out/{name}/\"}}\n  shardBytes: 1Ki\n"
        );
        let Some(Manifest::Workload(w)) = parse_manifests(&yaml)?.pop() else {
            anyhow::bail!("workload manifest")
        };
        let mut w: Workload = *w;
        w.metadata.uid = Some(format!("{name}-uid"));
        w.metadata.generation = Some(1);
        w.metadata.finalizers = Some(vec![WORKLOAD_FINALIZER.into()]);
        let json = serde_json::to_value(&w)?;
        workloads.push((w, json));
    }
    let replies: Arc<BTreeMap<String, Value>> = Arc::new(
        workloads
            .iter()
            .map(|(w, json)| (w.name_any(), json.clone()))
            .collect(),
    );

    let counts = Arc::new(Mutex::new(Counts::default()));
    let start = Instant::now();
    let start_wall = chrono::Utc::now();
    let c = counts.clone();
    let service = tower::service_fn(move |req: Request<Body>| {
        let c = c.clone();
        let replies = replies.clone();
        async move {
            let method = req.method().to_string();
            let path = req.uri().path().to_string();
            // The resource (`workloads/status`), as RBAC names it.
            let shape =
                rbac::access(&method, &path, "").map_or_else(|| path.clone(), |a| a.resource);
            let body = req.into_body().collect_bytes().await.unwrap_or_default();
            let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            let name = path
                .rsplit('/')
                .nth(usize::from(path.ends_with("/status")))
                .unwrap_or("x")
                .to_string();
            if let Ok(mut c) = c.lock() {
                c.requests.push(Call {
                    at: start.elapsed().as_secs_f64(),
                    method: method.clone(),
                    shape: shape.clone(),
                    name: body["metadata"]["name"]
                        .as_str()
                        .map_or_else(|| name.clone(), str::to_string),
                    phase: body["status"]["phase"].as_str().map(str::to_string),
                });
            }
            let reply = match shape.as_str() {
                "workloads" | "workloads/status" => replies
                    .get(&name)
                    .or_else(|| replies.values().next())
                    .cloned()
                    .unwrap_or(Value::Null),
                "agents" | "agents/status" => {
                    json!({"apiVersion": "infermesh.dev/v1alpha1", "kind": "Agent",
                    "metadata": {"name": body["metadata"]["name"].as_str().unwrap_or(&name)}, "spec": {"mesh": "gpus", "node": "n"}})
                }
                "meshes/status" => {
                    json!({"apiVersion": "infermesh.dev/v1alpha1", "kind": "Mesh", "metadata": {"name": name}, "spec": {}})
                }
                _ => body,
            };
            Ok::<_, std::convert::Infallible>(Response::new(Body::from(
                serde_json::to_vec(&reply).unwrap_or_default(),
            )))
        }
    });
    let client = kube::Client::new(service, "default");
    let db = dir.path().join("store.db");
    let store = store::open(&format!("sqlite://{}", db.display())).await?;
    let core = Arc::new(Core::new(store));
    let metrics = Metrics::new(core.counters());
    let ctx = Arc::new(Context::new(
        client,
        core.clone(),
        Config::for_namespace("infermesh"),
        metrics,
        "bench",
    ));
    let mesh_yaml = "apiVersion: infermesh.dev/v1alpha1\nkind: Mesh\nmetadata: {name: gpus}\nspec:\n  leaseSeconds: 30\n";
    let Some(Manifest::Mesh(mesh)) = parse_manifests(mesh_yaml)?.pop() else {
        anyhow::bail!("mesh manifest")
    };
    core.upsert_mesh("gpus", mesh.spec.clone()).await?;

    // Agents: complete each assignment after the simulated compute time.
    for i in 0..args.agents {
        let (id, node) = (format!("gpus-node-{i}"), format!("node-{i}"));
        let compute = Duration::from_millis(args.compute_ms);
        sim::attach_noop_agent(&core, &id, &node, "gpus", args.slots, compute)
            .await
            .map_err(|s| anyhow::anyhow!("{s}"))?;
    }

    let writer = tokio::spawn(status::StatusWriter::new(ctx.clone()).run());
    let publisher = tokio::spawn(events::run(ctx.clone()));
    let t0 = Instant::now();
    let mut keys = Vec::new();
    for (w, _) in &workloads {
        workload::reconcile(Arc::new(w.clone()), ctx.clone())
            .await
            .map_err(|e| anyhow::anyhow!("reconcile: {e}"))?;
        keys.push((w.name_any(), workload::key_of(w)?));
    }
    let admitted = start.elapsed().as_secs_f64();
    // Wait until every Workload ended: terminal in the core, or already released (its final
    // status written).
    let mut done: std::collections::BTreeSet<String> = std::collections::BTreeSet::new();
    while done.len() < keys.len() {
        tokio::time::sleep(Duration::from_millis(200)).await;
        for (name, key) in &keys {
            if done.contains(name) {
                continue;
            }
            match core.workload(key).await {
                Some(s) if s.phase.is_terminal() => {
                    anyhow::ensure!(s.shards_succeeded == s.shards_total, "{s:?}");
                    done.insert(name.clone());
                }
                Some(_) => {}
                None => {
                    done.insert(name.clone());
                }
            }
        }
    }
    // When the core reached each final phase: the store's `workload.succeeded` events, on the
    // same clock as the calls (seconds since the start).
    let succeeded = core
        .store()
        .events(&store::EventFilter {
            kind: Some("workload.succeeded".into()),
            ..Default::default()
        })
        .await?;
    let by_uid: BTreeMap<String, &String> = keys
        .iter()
        .map(|(name, _)| (format!("{name}-uid"), name))
        .collect();
    let mut ended: BTreeMap<String, f64> = BTreeMap::new();
    for e in succeeded {
        let at = chrono::DateTime::parse_from_rfc3339(&e.at)?.with_timezone(&chrono::Utc);
        let since = (at - start_wall).num_microseconds().unwrap_or(0) as f64 / 1e6;
        if let Some(name) = e.workload_uid.as_deref().and_then(|u| by_uid.get(u)) {
            ended.insert((*name).clone(), since);
        }
    }
    anyhow::ensure!(
        ended.len() == keys.len(),
        "{} of {} Workloads succeeded",
        ended.len(),
        keys.len()
    );
    let run_secs = t0.elapsed().as_secs_f64();
    // The shards as planned (the planner may round a count up to a multiple of the slots), from
    // the store: a finished Workload may already be released from the core.
    let shards: u64 = core
        .store()
        .workloads_in_phase("Succeeded")
        .await?
        .iter()
        .map(|w| w.shards.len() as u64)
        .sum();
    // Let the last status and Events go out (every final phase written, or 30 s).
    let wait_from = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let written = counts
            .lock()
            .map(|c| {
                c.requests
                    .iter()
                    .filter(|r| {
                        r.shape == "workloads/status" && r.phase.as_deref() == Some("Succeeded")
                    })
                    .map(|r| r.name.clone())
                    .collect::<std::collections::BTreeSet<_>>()
                    .len()
            })
            .unwrap_or(0);
        if (written >= keys.len() && wait_from.elapsed() >= Duration::from_secs(3))
            || wait_from.elapsed() > Duration::from_secs(30)
        {
            break;
        }
    }
    writer.abort();
    publisher.abort();
    let total_secs = t0.elapsed().as_secs_f64();

    let c = counts.lock().map_err(|_| anyhow::anyhow!("lock"))?;
    let mutating: Vec<&Call> = c.requests.iter().filter(|r| r.method != "GET").collect();
    let mut by_kind: BTreeMap<String, usize> = BTreeMap::new();
    for r in &mutating {
        *by_kind
            .entry(format!("{} {}", r.method, r.shape))
            .or_default() += 1;
    }
    // Sliding windows: the most calls within any `width` seconds, starting at a call.
    let busiest_in = |times: &[f64], width: f64| {
        (0..times.len())
            .map(|i| {
                times[i..]
                    .iter()
                    .take_while(|t| **t - times[i] < width)
                    .count()
            })
            .max()
            .unwrap_or(0)
    };
    let mut all: Vec<f64> = mutating.iter().map(|r| r.at).collect();
    all.sort_by(f64::total_cmp);
    let busiest = busiest_in(&all, 1.0);
    let workload_status = by_kind.get("PATCH workloads/status").copied().unwrap_or(0);
    // Status writes per object, sorted.
    let writes_of = |shape: &str| {
        let mut by: BTreeMap<String, Vec<f64>> = BTreeMap::new();
        for r in mutating.iter().filter(|r| r.shape == shape) {
            by.entry(r.name.clone()).or_default().push(r.at);
        }
        by.values_mut().for_each(|v| v.sort_by(f64::total_cmp));
        by
    };
    let wl_by = writes_of("workloads/status");
    let busiest_wl_2s = wl_by
        .values()
        .map(|v| busiest_in(v, 2.0))
        .max()
        .unwrap_or(0);
    let min_gap = wl_by
        .values()
        .flat_map(|v| v.windows(2).map(|w| w[1] - w[0]))
        .fold(f64::INFINITY, f64::min);
    // The final phase: from the core reaching it to the first write that carries it.
    let mut phase_lag: Vec<f64> = Vec::new();
    let mut unwritten = 0usize;
    for (name, at) in &ended {
        let first = mutating
            .iter()
            .filter(|r| r.shape == "workloads/status" && &r.name == name)
            .filter(|r| r.phase.as_deref() == Some("Succeeded"))
            .map(|r| r.at)
            .fold(f64::INFINITY, f64::min);
        if first.is_finite() {
            phase_lag.push((first - at).max(0.0));
        } else {
            unwritten += 1;
        }
    }
    phase_lag.sort_by(f64::total_cmp);
    let pct = |v: &[f64], q: f64| {
        if v.is_empty() {
            f64::NAN
        } else {
            v[((v.len() - 1) as f64 * q).round() as usize]
        }
    };
    // Staleness: a live Workload's longest time without a status write (from its admission
    // to its final phase); an Agent's over the run (from its creation to the run's end).
    let wl_stale = ended
        .iter()
        .map(|(name, at)| {
            longest_gap(
                wl_by.get(name).map_or(&[][..], Vec::as_slice),
                admitted,
                *at,
            )
        })
        .fold(0.0, f64::max);
    let run_end = ended.values().copied().fold(admitted, f64::max);
    let agent_writes = {
        let mut by = writes_of("agents/status");
        for (name, v) in writes_of("agents") {
            by.entry(name).or_default().extend(v);
        }
        by.values_mut().for_each(|v| v.sort_by(f64::total_cmp));
        by
    };
    let agent_stale = agent_writes
        .values()
        .map(|v| longest_gap(v, v.first().copied().unwrap_or(0.0), run_end))
        .fold(0.0, f64::max);
    let agents_created = by_kind.get("POST agents").copied().unwrap_or(0)
        + by_kind.get("PATCH agents").copied().unwrap_or(0);
    println!(
        "## API write budget: {} shards in {} Workload(s), {} agents x {} slots, {} ms per shard",
        shards,
        keys.len(),
        args.agents,
        args.slots,
        args.compute_ms
    );
    println!();
    println!("run {run_secs:.1} s (until Succeeded), counted over {total_secs:.1} s");
    println!();
    println!("| calls | count |");
    println!("|---|---:|");
    for (k, n) in &by_kind {
        println!("| {k} | {n} |");
    }
    println!("| **all mutating** | **{}** |", mutating.len());
    println!();
    println!("| figure | value | target |");
    println!("|---|---:|---:|");
    println!(
        "| mutating calls per second (mean) | {:.2} | <= 20 |",
        mutating.len() as f64 / total_secs
    );
    println!("| mutating calls in any one second (most) | {busiest} | <= 20 |");
    println!(
        "| mutating calls per 1,000 shards | {:.2} | - |",
        mutating.len() as f64 * 1000.0 / shards as f64
    );
    println!("| Workload status writes in any 2 s (most) | {busiest_wl_2s} | <= 1 |");
    println!("| shortest gap between Workload status writes | {min_gap:.2} s | >= 2 s |");
    println!("| Workload status writes in all | {workload_status} | - |");
    println!(
        "| final phase written after the core reached it: p50 / max | {:.2} s / {:.2} s | <= 5 s |",
        pct(&phase_lag, 0.5),
        pct(&phase_lag, 1.0)
    );
    println!("| final phases never written | {unwritten} | 0 |");
    println!("| longest a live Workload went without a status write | {wl_stale:.1} s | <= 60 s |");
    println!(
        "| longest an Agent went without a status write ({} of {} agents written) | {agent_stale:.1} s | <= 60 s |",
        agent_writes.len(),
        args.agents
    );
    println!("| Agent objects created or applied | {agents_created} | - |");
    Ok(())
}
