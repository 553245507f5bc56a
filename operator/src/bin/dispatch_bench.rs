//! Dispatch microbenchmark of the core: no-op shards through the real core and a real store
//! (SQLite file or Postgres), completed at once by in-process agents that write a one-record
//! part where their attempt is told to and report it honestly. Prints one JSON line:
//! shards, agents, slots, seconds, shards per second.
//!
//! `infermesh-dispatch-bench --shards 5000 --agents 10 --slots 4 [--database-url URL]`
//!
//! With `--soak N` it runs N workloads of `--shards` shards one after another instead (each
//! released from memory once finished, as the status writer does in a cluster) and samples the
//! process's RSS from /proc every N/100 workloads: whether memory stays flat over a long life.

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use infermesh_crds::{Manifest, parse_manifests};
use infermesh_operator::core::{Core, Submission, sim};
use infermesh_operator::store::{self, Store};

#[derive(Parser, Debug)]
struct Args {
    /// Shards in the workload.
    #[arg(long, default_value_t = 5_000)]
    shards: u64,
    /// In-process agents.
    #[arg(long, default_value_t = 10)]
    agents: u32,
    /// Slots per agent.
    #[arg(long, default_value_t = 4)]
    slots: u32,
    /// The store (default: a fresh SQLite file in a temporary folder).
    #[arg(long)]
    database_url: Option<String>,
    /// Run this many workloads of `--shards` shards one after another, sampling RSS.
    #[arg(long)]
    soak: Option<u32>,
}

/// This process's resident set, in MB (`VmRSS` of /proc/self/status).
fn rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Submits `spec` as workload `i` (its own output folder) and waits for it to end; returns
/// its key.
async fn run_one<S: Store>(
    core: &Core<S>,
    spec: &infermesh_crds::WorkloadSpec,
    dir: &std::path::Path,
    i: u32,
    shards: u64,
) -> anyhow::Result<String> {
    let mut spec = spec.clone();
    spec.output.uri = format!("file://{}/out/w{i}/", dir.display());
    let t0 = Instant::now();
    let key = core
        .submit(Submission {
            namespace: "bench".into(),
            name: format!("w{i}"),
            uid: format!("bench-{i}"),
            spec,
            input_size: shards * 1024,
            input_version: None,
            input_files: None,
            credentials: None,
        })
        .await?;
    loop {
        match core.workload(&key).await {
            Some(w) if w.phase.is_terminal() => {
                anyhow::ensure!(
                    format!("{:?}", w.phase) == "Succeeded",
                    "workload {key} ended {:?}: {}",
                    w.phase,
                    w.message
                );
                return Ok(key);
            }
            _ if t0.elapsed() > Duration::from_secs(60) => {
                anyhow::bail!("workload {key} not done in 60 s")
            }
            _ => tokio::time::sleep(Duration::from_millis(1)).await,
        }
    }
}

/// The soak: `n` workloads one after another.
async fn soak<S: Store>(
    core: &Core<S>,
    spec: &infermesh_crds::WorkloadSpec,
    dir: &std::path::Path,
    n: u32,
    args: &Args,
    backend: &str,
) -> anyhow::Result<()> {
    let every = (n / 100).max(1);
    let t0 = Instant::now();
    let mut samples = vec![(0u32, rss_mb())];
    for i in 0..n {
        let key = run_one(core, spec, dir, i, args.shards).await?;
        // What the status writer does once the final status is written.
        core.release(&key);
        if (i + 1) % every == 0 {
            samples.push((i + 1, rss_mb()));
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    // Flatness after the first tenth (after the first 1,000 of 10,000).
    let settle = n / 10;
    let base = samples
        .iter()
        .find(|(i, _)| *i >= settle)
        .map_or(0.0, |s| s.1);
    let after_max = samples
        .iter()
        .filter(|(i, _)| *i >= settle)
        .map(|s| s.1)
        .fold(0.0, f64::max);
    let charges = core
        .store()
        .charges(&format!("bench-{}", n - 1))
        .await?
        .len();
    let ok = core.store().verify().await?.ok();
    println!(
        "{}",
        serde_json::json!({
            "mode": "soak",
            "backend": backend,
            "workloads": n,
            "shards_each": args.shards,
            "agents": args.agents,
            "slots": args.slots,
            "seconds": secs,
            "workloads_per_second": f64::from(n) / secs,
            "rss_mb": samples,
            "rss_at_settle_mb": base,
            "rss_max_after_settle_mb": after_max,
            "growth_after_settle": if base > 0.0 { after_max / base - 1.0 } else { 0.0 },
            "resident_workloads": core.resident_workloads(),
            "last_workload_charges": charges,
            "ledger_ok": ok,
        })
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let url = args
        .database_url
        .clone()
        .unwrap_or_else(|| format!("sqlite://{}", dir.path().join("bench.db").display()));
    let store = store::open(&url).await?;
    let backend = if url.starts_with("sqlite") {
        "sqlite"
    } else {
        "postgres"
    };
    let core = Arc::new(Core::new(store));
    let d = dir.path().display();
    let yaml = format!(
        "apiVersion: infermesh.dev/v1alpha1\nkind: Mesh\nmetadata: {{name: m}}\nspec:\n  leaseSeconds: 60\n  \
         pricing: {{perCpuSecond: 1.0, perThousandRecords: 1.0}}\n---\n\
         apiVersion: infermesh.dev/v1alpha1\nkind: Workload\nmetadata: {{name: w, namespace: bench}}\nspec:\n  mesh: m\n  \
         model: {{uri: \"file://{d}/model.onnx\"}}\n  task: {{tensor: {{inputs: [{{name: x}}]}}}}\n  \
         input: {{uri: \"file://{d}/in.jsonl\"}}\n  output: {{uri: \"file://{d}/out/\"}}\n  shardBytes: 1Ki\n"
    );
    let mut mesh = None;
    let mut workload = None;
    for m in parse_manifests(&yaml)? {
        match m {
            Manifest::Mesh(m) => mesh = Some(m.spec),
            Manifest::Workload(w) => workload = Some(w.spec),
            Manifest::Secret(_) => {}
        }
    }
    let (Some(mesh), Some(workload)) = (mesh, workload) else {
        anyhow::bail!("bench manifest");
    };
    core.upsert_mesh("m", mesh).await?;

    for i in 0..args.agents {
        let (id, node) = (format!("agent-{i}"), format!("node-{i}"));
        sim::attach_noop_agent(&core, &id, &node, "m", args.slots, Duration::ZERO)
            .await
            .map_err(|s| anyhow::anyhow!("{s}"))?;
    }

    if let Some(n) = args.soak {
        return soak(&core, &workload, dir.path(), n, &args, backend).await;
    }
    let t0 = Instant::now();
    let key = core
        .submit(Submission {
            namespace: "bench".into(),
            name: "w".into(),
            uid: "bench-1".into(),
            spec: workload,
            input_size: args.shards * 1024,
            input_version: None,
            input_files: None,
            credentials: None,
        })
        .await?;
    loop {
        let done = core
            .workload(&key)
            .await
            .is_some_and(|w| w.phase.is_terminal());
        if done {
            break;
        }
        if t0.elapsed() > Duration::from_secs(1800) {
            anyhow::bail!("not done in 30 minutes");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let secs = t0.elapsed().as_secs_f64();
    let summary = core.workload(&key).await;
    let charges = core.store().charges("bench-1").await?.len();
    let ok = core.store().verify().await?.ok();
    println!(
        "{}",
        serde_json::json!({
            "backend": backend,
            "shards": args.shards,
            "agents": args.agents,
            "slots": args.slots,
            "seconds": secs,
            "shards_per_second": args.shards as f64 / secs,
            "phase": summary.map(|s| format!("{:?}", s.phase)),
            "charges": charges,
            "ledger_ok": ok,
        })
    );
    Ok(())
}
