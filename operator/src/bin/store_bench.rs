//! `infermesh-store-bench`: shard completions recorded per second (queue state + ledger
//! transaction + event) on Postgres with `synchronous_commit=on`, one transaction per
//! completion against group commit, and pgbench's select-only and simple-update runs on the
//! same server as the machine's reference. Prints a JSON object.

use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use clap::Parser;
use infermesh_operator::store::group::GroupCommitter;
use infermesh_operator::store::{
    self, AnyStore, CompletionRecord, ShardRecord, Store, WorkloadRecord,
};
use sqlx::Connection;

#[derive(Parser, Debug)]
struct Args {
    /// Postgres server URL (a maintenance database); default: a throwaway local cluster.
    #[arg(long, env = "DATABASE_URL")]
    database_url: Option<String>,
    /// Completions per mode.
    #[arg(long, default_value_t = 20_000)]
    completions: u32,
    /// Concurrent reporters (agents' streams).
    #[arg(long, default_value_t = 64)]
    concurrency: u32,
    /// Seconds of each pgbench run.
    #[arg(long, default_value_t = 10)]
    pgbench_seconds: u32,
}

async fn fresh(admin: &str, name: &str) -> anyhow::Result<(String, AnyStore)> {
    let mut c = sqlx::PgConnection::connect(admin).await?;
    sqlx::query(&format!("DROP DATABASE IF EXISTS {name}"))
        .execute(&mut c)
        .await?;
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut c)
        .await?;
    let base = admin.rsplit_once('/').map(|(b, _)| b).unwrap_or(admin);
    let url = format!("{base}/{name}");
    let store = store::open(&url).await?;
    Ok((url, store))
}

fn record(uid: &str, shard: u32) -> CompletionRecord {
    CompletionRecord {
        workload_uid: uid.into(),
        namespace: "bench".into(),
        shard,
        attempt: 1,
        agent: format!("agent-{}", shard % 8),
        records: 100,
        output_uri: format!("file:///out/part-{shard:05}.jsonl"),
        sha256: "0".repeat(64),
        price: 1234,
        device: "cpu".into(),
        compute_seconds: 0.1,
    }
}

async fn prepare(store: &AnyStore, n: u32) -> anyhow::Result<()> {
    let w = WorkloadRecord {
        uid: "bench".into(),
        namespace: "bench".into(),
        name: "bench".into(),
        mesh: "m".into(),
        spec_json: "{}".into(),
        input_bytes: u64::from(n),
        input_version: None,
        input_files: None,
    };
    let shards: Vec<ShardRecord> = (0..n)
        .map(|i| ShardRecord {
            index: i,
            start: u64::from(i),
            end: u64::from(i) + 1,
        })
        .collect();
    store.create_workload(&w, &shards).await?;
    Ok(())
}

/// Runs `n` completions from `c` concurrent reporters; returns completions per second.
async fn run(store: Arc<AnyStore>, group: bool, n: u32, c: u32) -> anyhow::Result<f64> {
    let committer = group.then(|| GroupCommitter::spawn(store.clone()));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for t in 0..c {
        let store = store.clone();
        let committer = committer.clone();
        tasks.push(tokio::spawn(async move {
            let mut shard = t;
            while shard < n {
                let r = record("bench", shard);
                match &committer {
                    Some(g) => g.complete(r).await?,
                    None => store.complete(&r).await?,
                };
                shard += c;
            }
            Ok::<_, anyhow::Error>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let secs = started.elapsed().as_secs_f64();
    let report = store.verify().await?;
    anyhow::ensure!(
        report.ok() && report.transactions == i64::from(n),
        "ledger does not verify: {report:?}"
    );
    Ok(f64::from(n) / secs)
}

fn pgbench(admin: &str, args: &[&str]) -> anyhow::Result<String> {
    let url = url::Url::parse(admin)?;
    let out = Command::new("pgbench")
        .args([
            "-h",
            url.host_str().unwrap_or("127.0.0.1"),
            "-p",
            &url.port().unwrap_or(5432).to_string(),
        ])
        .args([
            "-U",
            if url.username().is_empty() {
                "postgres"
            } else {
                url.username()
            },
        ])
        .args(args)
        .arg("pgbench")
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "pgbench {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn tps(out: &str) -> f64 {
    out.lines()
        .find_map(|l| l.strip_prefix("tps = "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let admin = match args.database_url {
        Some(u) => u,
        None => store::testing::cluster_url().map_err(anyhow::Error::msg)?,
    };
    let mut conn = sqlx::PgConnection::connect(&admin).await?;
    let sync: String = sqlx::query_scalar("SHOW synchronous_commit")
        .fetch_one(&mut conn)
        .await?;
    let fsync: String = sqlx::query_scalar("SHOW fsync")
        .fetch_one(&mut conn)
        .await?;
    let version: String = sqlx::query_scalar("SHOW server_version")
        .fetch_one(&mut conn)
        .await?;
    let (n, c) = (args.completions, args.concurrency);

    let (_, single) = fresh(&admin, "bench_single").await?;
    prepare(&single, n).await?;
    let one_per_tx = run(Arc::new(single), false, n, c).await?;
    let (_, grouped) = fresh(&admin, "bench_group").await?;
    prepare(&grouped, n).await?;
    let group = run(Arc::new(grouped), true, n, c).await?;

    sqlx::query("DROP DATABASE IF EXISTS pgbench")
        .execute(&mut conn)
        .await?;
    sqlx::query("CREATE DATABASE pgbench")
        .execute(&mut conn)
        .await?;
    pgbench(&admin, &["-i", "-q", "-s", "10"])?;
    let secs = args.pgbench_seconds.to_string();
    let select = tps(&pgbench(
        &admin,
        &["-S", "-c", "8", "-j", "2", "-T", &secs],
    )?);
    let update = tps(&pgbench(
        &admin,
        &["-N", "-c", "8", "-j", "2", "-T", &secs],
    )?);

    let result = serde_json::json!({
        "postgres": version,
        "synchronous_commit": sync,
        "fsync": fsync,
        "completions": n,
        "concurrency": c,
        "one_per_transaction_per_s": one_per_tx,
        "group_commit_per_s": group,
        "ratio": group / one_per_tx,
        "pgbench_select_only_tps": select,
        "pgbench_simple_update_tps": update,
    });
    println!("{}", serde_json::to_string_pretty(&result)?);
    Ok(())
}
