//! `infermesh-cluster-bench`: the cluster-mode write path at scale on the real control plane
//! of the test suite (`scripts/controlplane.sh`): N kwok Nodes labelled as GPU nodes carry the
//! Mesh's agent DaemonSet pods, one operator process runs as the chart's operator pod (its
//! ServiceAccount's token, the chart's RBAC), and `infermesh-swarm` attaches one simulated
//! agent per node over TLS, each with a token bound to its DaemonSet pod (TokenReview). Then
//! W Workloads are applied at once and run to `Succeeded`.
//!
//! It prints, as a markdown table (and as JSON with `--json`):
//! - how long the operator took to create the N Agent objects and make them Ready;
//! - every mutating call the operator made, from the API server's audit log: per second on
//!   average and at worst over any 10 s, by resource and verb;
//! - how stale an Agent's status got (sampled: now minus the `lastHeartbeat` it shows, while
//!   agents were attached) and how late each Workload's `Succeeded` reached the API after the
//!   core recorded it (the event log's `workload.succeeded`);
//! - the swarm's figures (shards/s, assignment latency, the operator's CPU and peak RSS).
//!
//! A benchmark that prints figures, not a test: `scripts/bench-scale.sh` runs it.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::{DateTime, Utc};
use clap::Parser;
use futures::{StreamExt, TryStreamExt};
use infermesh_crds::{Agent, Workload};
use infermesh_deploy::controlplane::ControlPlane;
use infermesh_operator::store::{self, Store};
use infermesh_tests::cluster::{
    Proc, apply, free_port, grpc_ca, install_chart, json, names_where, node_yaml,
    running_pods_by_node, tensor_workload, wait_for,
};
use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::api::{Api, ListParams, PostParams};
use kube::runtime::watcher;
use serde_json::{Value, json};

const NS: &str = "infermesh";
const RELEASE: &str = "infermesh";
const TEAM: &str = "team-a";
const MESH: &str = "swarm";
/// Verbs that change the cluster's state.
const MUTATING: [&str; 5] = ["create", "update", "patch", "delete", "deletecollection"];

/// The cluster-mode write path with N kwok nodes and N swarm agents.
#[derive(Parser, Debug)]
#[command(name = "infermesh-cluster-bench")]
struct Args {
    /// kwok Nodes (each carries one agent pod; one swarm agent per node).
    #[arg(long, default_value_t = 1000)]
    nodes: usize,
    /// Workloads applied at once.
    #[arg(long, default_value_t = 1000)]
    workloads: usize,
    /// Records per Workload (about 25 records make a 1 KiB shard).
    #[arg(long, default_value_t = 250)]
    records: usize,
    /// Compute time per shard, as `infermesh-swarm --compute` takes it.
    #[arg(long, default_value = "exp:5s")]
    compute: String,
    /// Slots per agent.
    #[arg(long, default_value_t = 1)]
    slots: u32,
    /// Write the figures as JSON here too.
    #[arg(long)]
    json: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Runtime::new()?;
    let t0 = Instant::now();
    let cp = ControlPlane::start()?;
    eprintln!("control plane ready in {:.1?}", cp.startup);
    let dir = tempfile::tempdir()?;
    let url = rt
        .block_on(store::testing::fresh_database())
        .map_err(|e| anyhow::anyhow!("a throwaway Postgres: {e}"))?;

    // kwok Nodes, labelled as GPU nodes, applied in chunks.
    let names: Vec<String> = (0..args.nodes).map(|i| format!("kwok-{i:04}")).collect();
    for chunk in names.chunks(250) {
        let yaml: Vec<String> = chunk.iter().map(|n| node_yaml(n, true)).collect();
        apply(&cp, &yaml.join("---\n"));
    }
    wait_for("every node Ready", Duration::from_secs(600), || {
        let nodes = json(&cp, &["get", "nodes"])?;
        let ready = names_where(&nodes, |n| {
            infermesh_tests::cluster::condition(&n["status"], "Ready")["status"] == "True"
        });
        (ready.len() == args.nodes).then_some(()).ok_or(format!(
            "{} of {} Ready",
            ready.len(),
            args.nodes
        ))
    });
    eprintln!("{} nodes Ready at {:.0?}", args.nodes, t0.elapsed());

    for ns in [NS, TEAM] {
        cp.ok(&["create", "namespace", ns], None)?;
    }
    install_chart(&cp, NS, RELEASE, &url, &json!({"replicas": 1}))?;
    let selector =
        format!("app.kubernetes.io/instance={RELEASE},app.kubernetes.io/component=operator");
    let pod = wait_for("the operator pod Running", Duration::from_secs(120), || {
        let pods = json(&cp, &["get", "pods", "-n", NS, "-l", &selector])?;
        names_where(&pods, |p| p["status"]["phase"] == "Running")
            .pop()
            .ok_or("none yet".to_string())
    });
    let token = cp.ok(
        &["create", "token", RELEASE, "-n", NS, "--duration", "2h"],
        None,
    )?;
    let operator_kubeconfig = cp.token_kubeconfig("operator", token.trim())?;
    let operator_user = format!("system:serviceaccount:{NS}:{RELEASE}");
    let grpc_port = free_port();
    let http_port = free_port();
    let mut cmd = Command::new(sibling("infermesh")?);
    cmd.arg("operator")
        .env("KUBECONFIG", &operator_kubeconfig)
        .env("INFERMESH_DATABASE_URL", &url)
        .env("INFERMESH_NAMESPACE", NS)
        .env("INFERMESH_POD_NAME", &pod)
        .env("INFERMESH_GRPC_ADDR", format!("127.0.0.1:{grpc_port}"))
        .env("INFERMESH_HTTP_ADDR", format!("127.0.0.1:{http_port}"))
        .env(
            "INFERMESH_GRPC_ENDPOINT",
            format!("https://{RELEASE}-grpc.{NS}.svc:7443"),
        )
        .env("INFERMESH_LOG_JSON", "false")
        .env("INFERMESH_LOG", "warn");
    let mut operator = Proc::spawn("operator", cmd, dir.path());
    wait_for("the operator to lead", Duration::from_secs(60), || {
        let lease = json(
            &cp,
            &["get", "lease", "infermesh-operator-leader", "-n", NS],
        )?;
        (lease["spec"]["holderIdentity"] == pod.as_str())
            .then_some(())
            .ok_or(format!("{}", lease["spec"]["holderIdentity"]))
    });

    // The Mesh: its DaemonSet gets one pod on every node, marked Running by kwok.
    apply(&cp, &mesh_yaml(args.slots));
    let agent_pods: BTreeMap<String, String> = wait_for(
        "an agent pod Running on every node",
        Duration::from_secs(900),
        || {
            let running = running_pods_by_node(&cp, NS, &format!("infermesh.dev/mesh={MESH}"))?;
            (running.len() == args.nodes)
                .then(|| running.clone())
                .ok_or(format!("{} of {} Running", running.len(), args.nodes))
        },
    );
    eprintln!("{} agent pods Running at {:.0?}", args.nodes, t0.elapsed());
    let ca = dir.path().join("grpc-ca.crt");
    std::fs::write(&ca, grpc_ca(&cp, NS, Duration::from_secs(60)))?;

    // A token per agent, bound to its DaemonSet pod (what the kubelet projects into the pod).
    let admin = rt.block_on(client(&cp.kubeconfig()))?;
    let agent_sa = format!("{RELEASE}-agent-{MESH}");
    let tokens: Vec<(String, String)> = rt.block_on(async {
        let sas: Api<ServiceAccount> = Api::namespaced(admin.clone(), NS);
        futures::stream::iter(agent_pods.clone())
            .map(|(node, pod)| {
                let sas = sas.clone();
                let agent_sa = agent_sa.clone();
                async move {
                    let request = TokenRequest {
                        spec: TokenRequestSpec {
                            audiences: vec!["infermesh".into()],
                            bound_object_ref: Some(BoundObjectReference {
                                api_version: Some("v1".into()),
                                kind: Some("Pod".into()),
                                name: Some(pod),
                                uid: None,
                            }),
                            expiration_seconds: Some(7200),
                        },
                        ..TokenRequest::default()
                    };
                    let answer = sas
                        .create_token_request(&agent_sa, &PostParams::default(), &request)
                        .await?;
                    let token = answer.status.map(|s| s.token).unwrap_or_default();
                    anyhow::Ok((node, token))
                }
            })
            .buffer_unordered(16)
            .try_collect()
            .await
    })?;
    let creds = json!({
        "operator": format!("https://127.0.0.1:{grpc_port}"),
        "agents": tokens.iter().map(|(node, token)| json!({
            "mesh": MESH, "id": format!("{MESH}-{node}"), "node": node, "token": token,
        })).collect::<Vec<_>>(),
    });
    let creds_file = dir.path().join("credentials.json");
    std::fs::write(&creds_file, creds.to_string())?;

    // The Workloads' inputs.
    let manifests: Vec<String> = (0..args.workloads)
        .map(|i| {
            tensor_workload(
                dir.path(),
                TEAM,
                MESH,
                &format!("w{i:04}"),
                args.records,
                "1Ki",
            )
        })
        .collect();

    // Watch the API from here on: Workloads' phases, Agents' heartbeats.
    let seen = Arc::new(Mutex::new(Seen::default()));
    let watching = rt.spawn(watch(admin.clone(), seen.clone()));

    // The swarm attaches; the operator creates the Agent objects.
    let attach_wall = Utc::now();
    let attach = Instant::now();
    let report_file = dir.path().join("swarm.json");
    let swarm = Command::new(sibling("infermesh-swarm")?)
        .arg("--credentials")
        .arg(&creds_file)
        .arg("--ca-cert")
        .arg(&ca)
        .args(["--tls-server-name", &format!("{RELEASE}-grpc.{NS}.svc")])
        .args(["--slots", &args.slots.to_string()])
        .args(["--compute", &args.compute])
        .args(["--operator-pid", &operator.child.id().to_string()])
        .args(["--idle-exit", "30s", "--sample-every", "1s"])
        .stdout(std::fs::File::create(&report_file)?)
        .stderr(std::fs::File::create(dir.path().join("swarm.log"))?)
        .stdin(Stdio::null())
        .spawn()
        .context("infermesh-swarm")?;
    let mut swarm = Reaped(swarm);
    wait_for(
        "every Agent Ready in the API",
        Duration::from_secs(900),
        || {
            let ready = seen.lock().expect("seen").agents_ready();
            (ready == args.nodes)
                .then_some(())
                .ok_or(format!("{ready} of {} Agents Ready", args.nodes))
        },
    );
    let agents_ready_s = attach.elapsed().as_secs_f64();
    eprintln!("{} Agents Ready after {agents_ready_s:.1} s", args.nodes);

    // The Workloads, all at once.
    let applied = Instant::now();
    seen.lock().expect("seen").running = true;
    for chunk in manifests.chunks(100) {
        apply(&cp, &chunk.join("---\n"));
    }
    let apply_s = applied.elapsed().as_secs_f64();
    wait_for(
        "every Workload Succeeded in the API",
        Duration::from_secs(3600),
        || {
            let s = seen.lock().expect("seen");
            if let Some((name, phase)) = s.failed.first() {
                panic!("workload {name} ended {phase}");
            }
            (s.succeeded.len() == args.workloads)
                .then_some(())
                .ok_or(format!(
                    "{} of {} Succeeded",
                    s.succeeded.len(),
                    args.workloads
                ))
        },
    );
    let workloads_s = applied.elapsed().as_secs_f64();
    seen.lock().expect("seen").running = false;
    eprintln!(
        "{} Workloads Succeeded {workloads_s:.1} s after they were applied",
        args.workloads
    );
    let status = swarm.0.wait()?;
    anyhow::ensure!(status.success(), "infermesh-swarm: {status}");
    let swarm_report: Value =
        serde_json::from_slice(&std::fs::read(&report_file)?).context("the swarm's report")?;
    let end_wall = Utc::now();
    watching.abort();
    anyhow::ensure!(
        operator.running(),
        "the operator exited:\n{}",
        operator.log()
    );

    // How late each final phase reached the API after the core recorded it.
    let store = rt.block_on(store::open(&url))?;
    let succeeded = rt.block_on(store.events(&store::EventFilter {
        kind: Some("workload.succeeded".into()),
        ..Default::default()
    }))?;
    let seen = seen.lock().expect("seen");
    let mut lags: Vec<f64> = Vec::new();
    for e in &succeeded {
        let Some(uid) = &e.workload_uid else { continue };
        if let Some(api) = seen.succeeded.get(uid) {
            let core = DateTime::parse_from_rfc3339(&e.at)?.with_timezone(&Utc);
            lags.push((*api - core).num_milliseconds() as f64 / 1000.0);
        }
    }
    anyhow::ensure!(
        lags.len() == args.workloads,
        "{} of {} Workloads have a workload.succeeded event",
        lags.len(),
        args.workloads
    );
    lags.sort_by(f64::total_cmp);

    // The operator's mutating calls, from the audit log.
    let calls = audit(
        &cp.dir().join("logs/audit.log"),
        &operator_user,
        attach_wall,
        end_wall,
    )?;
    let window_s = (end_wall - attach_wall).num_milliseconds() as f64 / 1000.0;
    let total = calls.writes;
    let staleness = quantiles(seen.staleness.clone());
    let figures = json!({
        "nodes": args.nodes,
        "workloads": args.workloads,
        "records_per_workload": args.records,
        "compute": args.compute,
        "slots": args.slots,
        "control_plane_startup_s": cp.startup.as_secs_f64(),
        "agents_ready_s": agents_ready_s,
        "workloads_applied_s": apply_s,
        "workloads_succeeded_s": workloads_s,
        "window_s": window_s,
        "mutating_calls": total,
        "mutating_per_s": total as f64 / window_s,
        "mutating_max_10s_per_s": calls.max_10s as f64 / 10.0,
        "by_call": calls.by_call.iter().map(|(k, v)| (k.clone(), json!(v))).collect::<serde_json::Map<_, _>>(),
        "agent_status_age_s": staleness,
        "agent_status_samples": seen.staleness.len(),
        "phase_lag_s": {"p50": q(&lags, 0.5), "p99": q(&lags, 0.99), "max": lags.last().copied().unwrap_or(0.0),
            "over_5s": lags.iter().filter(|l| **l > 5.0).count(), "all": lags},
        "swarm": swarm_report,
    });
    print!("{}", table(&figures));
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&figures)?)?;
    }
    drop(operator);
    Ok(())
}

/// A binary built beside this one (`cargo build --release --bins`).
fn sibling(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let path = exe.parent().context("the bench's directory")?.join(name);
    anyhow::ensure!(
        path.exists(),
        "{} is missing: build it beside this bench (scripts/bench-cluster.sh does)",
        path.display()
    );
    Ok(path)
}

/// A child process killed and reaped on drop (the swarm, if the bench fails first).
struct Reaped(std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The Mesh of the run: every GPU-labelled node, `slots` per agent, a long lease.
fn mesh_yaml(slots: u32) -> String {
    format!(
        r#"apiVersion: infermesh.dev/v1alpha1
kind: Mesh
metadata: {{name: {MESH}}}
spec:
  nodeSelector: {{nvidia.com/gpu.present: "true"}}
  agent:
    slots: {slots}
    executionProviders: [cpu]
  leaseSeconds: 60
  heartbeatSeconds: 5
  pricing: {{perGpuSecond: 0, perCpuSecond: 0.05, perThousandRecords: 0.2}}
"#
    )
}

/// What the bench's watches saw.
#[derive(Default)]
struct Seen {
    /// Workload uid -> when the API first showed it `Succeeded`.
    succeeded: HashMap<String, DateTime<Utc>>,
    /// Workloads that ended otherwise: (name, phase).
    failed: Vec<(String, String)>,
    /// Agent name -> whether the API shows it Ready.
    ready: HashMap<String, bool>,
    /// Sampled ages (seconds) of Agents' `lastHeartbeat` while the Workloads run.
    staleness: Vec<f64>,
    /// Whether the Workloads run (ages are sampled then: an idle Ready agent's status is not
    /// rewritten for its heartbeat alone, so its age grows without anything going stale).
    running: bool,
}

impl Seen {
    fn agents_ready(&self) -> usize {
        self.ready.values().filter(|r| **r).count()
    }
}

async fn client(kubeconfig: &Path) -> anyhow::Result<kube::Client> {
    let config = kube::Config::from_custom_kubeconfig(
        kube::config::Kubeconfig::read_from(kubeconfig)?,
        &kube::config::KubeConfigOptions::default(),
    )
    .await?;
    Ok(kube::Client::try_from(config)?)
}

/// Watches Workloads (when each reached its final phase in the API) and samples every Agent's
/// status age every 5 s.
async fn watch(client: kube::Client, seen: Arc<Mutex<Seen>>) {
    let workloads: Api<Workload> = Api::all(client.clone());
    let agents: Api<Agent> = Api::all(client);
    let s = seen.clone();
    let phases = async move {
        let mut stream = watcher(workloads, watcher::Config::default()).boxed();
        while let Some(event) = stream.next().await {
            let objects = match event {
                Ok(watcher::Event::Apply(w) | watcher::Event::InitApply(w)) => vec![w],
                _ => continue,
            };
            for w in objects {
                let Some(status) = &w.status else { continue };
                let phase = format!("{:?}", status.phase);
                let uid = w.metadata.uid.clone().unwrap_or_default();
                let mut s = s.lock().expect("seen");
                match phase.as_str() {
                    "Succeeded" => {
                        s.succeeded.entry(uid).or_insert_with(Utc::now);
                    }
                    "Failed" | "Cancelled" => {
                        let name = w.metadata.name.clone().unwrap_or_default();
                        s.failed.push((name, phase));
                    }
                    _ => {}
                }
            }
        }
    };
    let ages = async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tick.tick().await;
            let Ok(list) = agents.list(&ListParams::default()).await else {
                continue;
            };
            let now = Utc::now();
            let mut s = seen.lock().expect("seen");
            for a in list {
                let name = a.metadata.name.clone().unwrap_or_default();
                let Some(status) = &a.status else {
                    s.ready.insert(name, false);
                    continue;
                };
                let ready = format!("{:?}", status.phase) == "Ready";
                s.ready.insert(name, ready);
                if let Some(beat) = status
                    .last_heartbeat
                    .as_deref()
                    .and_then(|b| DateTime::parse_from_rfc3339(b).ok())
                    && ready
                    && s.running
                {
                    s.staleness
                        .push((now - beat.with_timezone(&Utc)).num_milliseconds() as f64 / 1000.0);
                }
            }
        }
    };
    tokio::join!(phases, ages);
}

/// The operator's mutating calls in the audit log between `from` and `to`.
struct Calls {
    /// `verb resource[/subresource]` -> count (TokenReviews included).
    by_call: BTreeMap<String, usize>,
    /// Calls that write something (all but TokenReviews).
    writes: usize,
    /// The most calls in any 10 s.
    max_10s: usize,
}

fn audit(path: &Path, user: &str, from: DateTime<Utc>, to: DateTime<Utc>) -> anyhow::Result<Calls> {
    let text = std::fs::read_to_string(path).with_context(|| path.display().to_string())?;
    let mut by_call = BTreeMap::new();
    let mut at: Vec<i64> = Vec::new();
    for line in text.lines() {
        let Ok(e) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        if e["user"]["username"] != user || e["stage"] != "ResponseComplete" {
            continue;
        }
        let verb = e["verb"].as_str().unwrap_or_default();
        if !MUTATING.contains(&verb) {
            continue;
        }
        let Some(when) = e["requestReceivedTimestamp"]
            .as_str()
            .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
            .map(|t| t.with_timezone(&Utc))
        else {
            continue;
        };
        if when < from || when > to {
            continue;
        }
        let o = &e["objectRef"];
        let resource = match (o["resource"].as_str(), o["subresource"].as_str()) {
            (Some(r), Some(sub)) => format!("{r}/{sub}"),
            (Some(r), None) => r.to_string(),
            _ => continue,
        };
        *by_call.entry(format!("{verb} {resource}")).or_insert(0) += 1;
        // A TokenReview is a `create` that stores nothing (the API server answers it and
        // forgets it): listed, but not counted against the write budget.
        if resource != "tokenreviews" {
            at.push(when.timestamp_millis());
        }
    }
    at.sort_unstable();
    // The most calls in any 10 s window (two pointers over the sorted times).
    let mut max_10s = 0;
    let mut lo = 0;
    for hi in 0..at.len() {
        while at[hi] - at[lo] >= 10_000 {
            lo += 1;
        }
        max_10s = max_10s.max(hi - lo + 1);
    }
    Ok(Calls {
        by_call,
        writes: at.len(),
        max_10s,
    })
}

fn q(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn quantiles(mut v: Vec<f64>) -> Value {
    v.sort_by(f64::total_cmp);
    json!({"p50": q(&v, 0.5), "p99": q(&v, 0.99), "max": v.last().copied().unwrap_or(0.0)})
}

/// The figures as a markdown table.
fn table(f: &Value) -> String {
    let n = |v: &Value| v.as_f64().unwrap_or(0.0);
    let mut out = format!(
        "Cluster mode on the real control plane: {} kwok nodes, {} swarm agents x {} slot(s), {} \
         Workloads of {} records (1 KiB shards), compute {}\n\n| figure | value |\n|---|---:|\n",
        f["nodes"],
        f["nodes"],
        f["slots"],
        f["workloads"],
        f["records_per_workload"],
        f["compute"].as_str().unwrap_or_default()
    );
    let rows = [
        ("control plane start (s)", n(&f["control_plane_startup_s"])),
        (
            "all Agents Ready in the API after attach (s)",
            n(&f["agents_ready_s"]),
        ),
        ("applying the Workloads (s)", n(&f["workloads_applied_s"])),
        (
            "all Workloads Succeeded in the API after apply (s)",
            n(&f["workloads_succeeded_s"]),
        ),
        ("measured window (s)", n(&f["window_s"])),
        (
            "operator's mutating calls (TokenReviews apart)",
            n(&f["mutating_calls"]),
        ),
        ("mutating calls/s, average", n(&f["mutating_per_s"])),
        (
            "mutating calls/s, worst 10 s",
            n(&f["mutating_max_10s_per_s"]),
        ),
        (
            "Agent status age p50 (s)",
            n(&f["agent_status_age_s"]["p50"]),
        ),
        (
            "Agent status age p99 (s)",
            n(&f["agent_status_age_s"]["p99"]),
        ),
        (
            "Agent status age max (s)",
            n(&f["agent_status_age_s"]["max"]),
        ),
        (
            "final phase in the API after the core, p50 (s)",
            n(&f["phase_lag_s"]["p50"]),
        ),
        (
            "final phase in the API after the core, p99 (s)",
            n(&f["phase_lag_s"]["p99"]),
        ),
        (
            "final phase in the API after the core, max (s)",
            n(&f["phase_lag_s"]["max"]),
        ),
        (
            "final phases later than 5 s",
            n(&f["phase_lag_s"]["over_5s"]),
        ),
        ("swarm shards/s", n(&f["swarm"]["shards_per_second"])),
        (
            "assignment latency p99 (ms)",
            n(&f["swarm"]["latency"]["p99_ms"]),
        ),
        (
            "operator CPU (s)",
            n(&f["swarm"]["operator"]["cpu_seconds"]),
        ),
        (
            "operator peak RSS (MB)",
            n(&f["swarm"]["operator"]["peak_rss_mb"]),
        ),
    ];
    for (name, v) in rows {
        out.push_str(&format!("| {name} | {v:.1} |\n"));
    }
    out.push_str("\n| mutating call | count |\n|---|---:|\n");
    if let Some(calls) = f["by_call"].as_object() {
        for (call, count) in calls {
            out.push_str(&format!("| {call} | {count} |\n"));
        }
    }
    out
}
