//! `infermesh-api-bench`: the Kubernetes API write budget of the controllers. A simulated run
//! of N shards on M agents goes through the real Workload reconcile, status writer and Event
//! publisher against a mocked API server that answers every request and counts it; the
//! agents are in-process and complete each shard after a simulated compute time.
//!
//! Prints writes per second (mean, and the most in any sliding one-second window), writes per 1,000
//! shards, and status writes per Workload per 2 seconds.

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
use infermesh_operator::store;
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
}

#[derive(Default)]
struct Counts {
    /// (seconds since start, method, resource path shape)
    requests: Vec<(f64, String, String)>,
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
    std::fs::write(
        dir.path().join("in.jsonl"),
        vec![b'\n'; (args.shards * 1024) as usize],
    )?;
    let d = dir.path().display();
    let yaml = format!(
        "apiVersion: infermesh.dev/v1alpha1\nkind: Workload\nmetadata: {{name: bench, namespace: team-a}}\nspec:\n  mesh: gpus\n  \
         model: {{uri: \"file://{d}/model.onnx\"}}\n  task: {{tensor: {{inputs: [{{name: x}}]}}}}\n  \
         input: {{uri: \"file://{d}/in.jsonl\"}}\n  output: {{uri: \"file://{d}/out/\"}}\n  shardBytes: 1Ki\n"
    );
    let Some(Manifest::Workload(w)) = parse_manifests(&yaml)?.pop() else {
        anyhow::bail!("workload manifest")
    };
    let mut w: Workload = *w;
    w.metadata.uid = Some("bench-uid".into());
    w.metadata.generation = Some(1);
    w.metadata.finalizers = Some(vec![WORKLOAD_FINALIZER.into()]);
    let workload_json = serde_json::to_value(&w)?;

    let counts = Arc::new(Mutex::new(Counts::default()));
    let start = Instant::now();
    let c = counts.clone();
    let reply_workload = workload_json.clone();
    let service = tower::service_fn(move |req: Request<Body>| {
        let c = c.clone();
        let reply_workload = reply_workload.clone();
        async move {
            let method = req.method().to_string();
            let path = req.uri().path().to_string();
            // The resource (`workloads/status`), as RBAC names it.
            let shape =
                rbac::access(&method, &path, "").map_or_else(|| path.clone(), |a| a.resource);
            let body = req.into_body().collect_bytes().await.unwrap_or_default();
            let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            if let Ok(mut c) = c.lock() {
                c.requests
                    .push((start.elapsed().as_secs_f64(), method.clone(), shape.clone()));
            }
            let name = path
                .rsplit('/')
                .nth(usize::from(path.ends_with("/status")))
                .unwrap_or("x")
                .to_string();
            let reply = match shape.as_str() {
                "workloads" | "workloads/status" => reply_workload,
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
    workload::reconcile(Arc::new(w), ctx.clone())
        .await
        .map_err(|e| anyhow::anyhow!("reconcile: {e}"))?;
    let key = workload::key_of(&serde_json::from_value::<Workload>(workload_json)?)?;
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let s = core
            .workload(&key)
            .await
            .ok_or_else(|| anyhow::anyhow!("workload gone"))?;
        if s.phase.is_terminal() {
            anyhow::ensure!(s.shards_succeeded as u64 == args.shards, "{s:?}");
            break;
        }
    }
    let run_secs = t0.elapsed().as_secs_f64();
    // Let the last status and Events go out.
    tokio::time::sleep(Duration::from_secs(3)).await;
    writer.abort();
    publisher.abort();
    let total_secs = t0.elapsed().as_secs_f64();

    let c = counts.lock().map_err(|_| anyhow::anyhow!("lock"))?;
    let mutating: Vec<&(f64, String, String)> =
        c.requests.iter().filter(|(_, m, _)| m != "GET").collect();
    let mut by_kind: BTreeMap<String, usize> = BTreeMap::new();
    for (_, m, s) in &mutating {
        *by_kind.entry(format!("{m} {s}")).or_default() += 1;
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
    let mut all: Vec<f64> = mutating.iter().map(|(t, _, _)| *t).collect();
    all.sort_by(f64::total_cmp);
    let busiest = busiest_in(&all, 1.0);
    let workload_status = by_kind.get("PATCH workloads/status").copied().unwrap_or(0);
    let mut wl: Vec<f64> = mutating
        .iter()
        .filter(|(_, m, s)| m == "PATCH" && s == "workloads/status")
        .map(|(t, _, _)| *t)
        .collect();
    wl.sort_by(f64::total_cmp);
    let busiest_wl_2s = busiest_in(&wl, 2.0);
    let min_gap = wl
        .windows(2)
        .map(|w| w[1] - w[0])
        .fold(f64::INFINITY, f64::min);
    println!(
        "## API write budget: {} shards, {} agents x {} slots, {} ms per shard",
        args.shards, args.agents, args.slots, args.compute_ms
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
        mutating.len() as f64 * 1000.0 / args.shards as f64
    );
    println!("| Workload status writes in any 2 s (most) | {busiest_wl_2s} | <= 1 |");
    println!("| shortest gap between Workload status writes | {min_gap:.2} s | >= 2 s |");
    println!("| Workload status writes in all | {workload_status} | - |");
    Ok(())
}
