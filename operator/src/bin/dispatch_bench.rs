//! Dispatch microbenchmark of the core: no-op shards through the real core and a real store
//! (SQLite file or Postgres), completed at once by in-process agents that write a one-record
//! part where their attempt is told to and report it honestly. Prints one JSON line:
//! shards, agents, slots, seconds, shards per second.
//!
//! `infermesh-dispatch-bench --shards 5000 --agents 10 --slots 4 [--database-url URL]`

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

    let t0 = Instant::now();
    let key = core
        .submit(Submission {
            namespace: "bench".into(),
            name: "w".into(),
            uid: "bench-1".into(),
            spec: workload,
            input_size: args.shards * 1024,
            input_version: None,
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
