//! `infermesh local`: the whole mesh on one machine. Reads Mesh and Workload manifests, starts
//! the core and the gRPC server on loopback, spawns agent processes, runs the workloads with a
//! progress bar, and prints a summary. Exit code 0 only when every workload succeeded.

mod manifests;
mod summary;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use infermesh_crds::WorkloadPhase;
use rand::Rng;
use tokio::process::{Child, Command};

use crate::core::progress::format_duration;
use crate::core::{Core, CoreError, Submission};
use crate::grpc;
use crate::store::{self, Store, StoreError};

pub use manifests::{LocalPlan, absolutize, load_plan};

/// How long start-up waits for a store that does not answer.
const STORE_PATIENCE: Duration = Duration::from_secs(60);

/// Options of `infermesh local`.
#[derive(Args, Debug, Clone)]
pub struct LocalArgs {
    /// Manifest file with Mesh and Workload documents.
    #[arg(short = 'f', long = "file")]
    pub file: PathBuf,
    /// Agent processes per Mesh.
    #[arg(long, default_value_t = 2)]
    pub agents: usize,
    /// Store URL: `sqlite://PATH` (the default) or `postgres://…`.
    #[arg(long, env = "INFERMESH_DATABASE_URL", default_value_t = default_database_url())]
    pub database_url: String,
    /// The agent binary; default: `infermesh-agent` next to this executable, then on PATH.
    #[arg(long, env = "INFERMESH_AGENT_BIN")]
    pub agent_bin: Option<PathBuf>,
    /// ONNX Runtime intra-op threads per agent slot; default: cores / (agents x slots).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Namespace for Workloads that name none.
    #[arg(long, default_value = "default")]
    pub namespace: String,
    /// Directory for agent logs and model caches; default: <infermesh home>/local.
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
    /// Give up after this many seconds.
    #[arg(long)]
    pub timeout: Option<u64>,
    /// No progress bar.
    #[arg(long)]
    pub no_progress: bool,
    /// Take up the workloads a previous run left unfinished in the store (after it was
    /// killed) instead of starting them again: completed shards are not run again.
    #[arg(long)]
    pub resume: bool,
    /// With `--resume`: take up every unfinished workload in the store, not only those of
    /// this manifest (same namespace, name and output).
    #[arg(long, requires = "resume")]
    pub resume_all: bool,
    /// Also mint credentials for N agents that `infermesh local` does not start itself (a load
    /// generator, an agent run by hand, a test): each gets its own id
    /// (`<mesh>-external-<i>`) and token, written with the gRPC address to
    /// `<run dir>/external-agents.json` (readable by the owner only).
    #[arg(long, default_value_t = 0)]
    pub external_agents: usize,
    /// Where the external agents' credentials are written (default:
    /// `<run dir>/external-agents.json`). A file already there is read first and the tokens
    /// of the agents it names are kept, so agents run by hand attach again after the run is
    /// restarted with `--resume`.
    #[arg(long, requires = "external_agents")]
    pub credentials: Option<PathBuf>,
    /// Address of the agents' gRPC server (plain HTTP/2; loopback by default). Another
    /// address (one in a network namespace of your own, say) is for external agents.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: std::net::SocketAddr,
    /// Serve the web console on loopback while the run goes (its URL, with a one-time
    /// random token, is printed at the start).
    #[arg(long)]
    pub ui: bool,
    /// The console's address (loopback only).
    #[arg(long, default_value = "127.0.0.1:0", requires = "ui")]
    pub ui_addr: std::net::SocketAddr,
    /// Keep serving the console after the run, until interrupted (Ctrl-C).
    #[arg(long, requires = "ui")]
    pub ui_keep: bool,
}

pub use infermesh_io::infermesh_home;

/// `sqlite://<infermesh home>/local.db`.
pub fn default_database_url() -> String {
    format!("sqlite://{}", infermesh_home().join("local.db").display())
}

fn agent_binary(explicit: Option<&PathBuf>) -> Result<PathBuf, String> {
    if let Some(p) = explicit {
        return if p.is_file() {
            Ok(p.clone())
        } else {
            Err(format!("agent binary {} does not exist", p.display()))
        };
    }
    let sibling = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|d| d.join("infermesh-agent")));
    if let Some(s) = sibling.filter(|s| s.is_file()) {
        return Ok(s);
    }
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join("infermesh-agent"))
                .find(|p| p.is_file())
        })
        .ok_or_else(|| {
            "infermesh-agent not found next to infermesh or on PATH (use --agent-bin)".to_string()
        })
}

struct AgentProcess {
    id: String,
    mesh: String,
    log: PathBuf,
    child: Child,
    exit: Option<std::process::ExitStatus>,
}

/// Runs `infermesh local`; prints errors and the summary; returns the exit code.
pub async fn run(args: LocalArgs) -> ExitCode {
    match run_inner(&args).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("infermesh local: {e}");
            ExitCode::from(2)
        }
    }
}

async fn run_inner(args: &LocalArgs) -> Result<ExitCode, String> {
    let plan = load_plan(&args.file, &args.namespace).await?;
    // Only agents it starts itself need the agent binary: external ones bring their own.
    let agent_bin = if args.agents > 0 {
        Some(agent_binary(args.agent_bin.as_ref())?)
    } else {
        None
    };
    if args.agents == 0 && args.external_agents == 0 {
        return Err("--agents must be at least 1 (or give --external-agents)".into());
    }
    let kept = match &args.credentials {
        Some(path) => kept_tokens(path)?,
        None => std::collections::HashMap::new(),
    };
    // The default home is made when missing; an explicit path's folder must exist (named
    // when it does not).
    if args.database_url == default_database_url() {
        let home = infermesh_home();
        std::fs::create_dir_all(&home)
            .map_err(|e| format!("cannot create {}: {e}", home.display()))?;
    }
    // A store that does not answer yet (a database restarting as this run is resumed) is
    // waited for, a minute at most; the steps after it too.
    let store = store::patiently(
        "opening the store",
        STORE_PATIENCE,
        StoreError::is_transient,
        async || store::open(&args.database_url).await,
    )
    .await
    .map_err(|e| format!("{}: {e}", args.database_url))?;
    let core = Arc::new(Core::new(store));
    let console_url = if args.ui {
        Some(start_console(&core, args.ui_addr).await?)
    } else {
        None
    };
    for (name, spec) in &plan.meshes {
        store::patiently(
            "storing the Meshes",
            STORE_PATIENCE,
            CoreError::is_transient,
            async || core.upsert_mesh(name, spec.clone()).await,
        )
        .await
        .map_err(|e| format!("Mesh {name}: {e}"))?;
    }

    // The same workload (namespace, name and output) unfinished in the store is resumed with
    // --resume, and otherwise refused, before any agent starts, with the command that resumes
    // it: a run never starts over silently (that would run and charge its shards again).
    if !args.resume {
        let stored = store::patiently(
            "reading the store",
            STORE_PATIENCE,
            StoreError::is_transient,
            async || core.store().active_workloads().await,
        )
        .await
        .map_err(|e| format!("reading the store: {e}"))?;
        if let Some(sw) = stored.iter().find(|sw| same_workload(&plan, &sw.record)) {
            let done = sw.shards.iter().filter(|s| s.state == "succeeded").count();
            return Err(format!(
                "Workload {}/{} has an unfinished run in the store (uid {}, {done} of {} shards done); \
                 finish it with:\n  {}\n(a new run would do and charge those shards again)",
                sw.record.namespace,
                sw.record.name,
                sw.record.uid,
                sw.shards.len(),
                resume_command()
            ));
        }
    }

    // A new run's output location must be writable and hold no earlier run's output (unless
    // the Workload says to overwrite it): found now, before any agent starts.
    if !args.resume {
        for w in &plan.workloads {
            let overwrite = w.spec.output.mode == infermesh_crds::OutputMode::Overwrite;
            let prepare = crate::core::outputs::prepare(&w.spec.output.uri, overwrite);
            let prepared = infermesh_io::access::scoped(w.credentials.clone(), prepare).await;
            prepared.map_err(|(reason, message)| {
                format!("Workload {}/{}: {reason}: {message}", w.namespace, w.name)
            })?;
        }
    }

    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", args.listen))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    // Each agent process gets its own random token, bound to its id and node: one agent's
    // credentials cannot attach as another.
    let token = crate::console::auth::random_hex;
    let mut tokens = grpc::AgentTokens::new();
    let mut agent_tokens: Vec<(String, String, String)> = Vec::new();
    let mut external = Vec::new();
    for mesh_name in plan.meshes.keys() {
        for i in 0..args.agents {
            let (id, node, t) = (
                format!("{mesh_name}-local-{i}"),
                format!("local-{i}"),
                token(),
            );
            tokens.insert(t.clone(), &id, &node);
            agent_tokens.push((id, node, t));
        }
        for i in 0..args.external_agents {
            let id = format!("{mesh_name}-external-{i}");
            let t = kept.get(&id).cloned().unwrap_or_else(token);
            let node = format!("external-{i}");
            tokens.insert(t.clone(), &id, &node);
            external
                .push(serde_json::json!({"mesh": mesh_name, "id": id, "node": node, "token": t}));
        }
    }
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let server = {
        let core = core.clone();
        let auth = Arc::new(tokens);
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            let shutdown = async move {
                let _ = stop.changed().await;
            };
            grpc::serve(listener, core, auth, None, shutdown).await
        })
    };
    let reaper = tokio::spawn(grpc::reap_leases(core.clone(), stop_rx.clone()));

    let run_id: String = format!("{:08x}", rand::rng().random::<u32>());
    let work_dir = args
        .work_dir
        .clone()
        .unwrap_or_else(|| infermesh_home().join("local"));
    let log_dir = work_dir.join(format!("run-{run_id}"));
    std::fs::create_dir_all(&log_dir).map_err(|e| format!("{}: {e}", log_dir.display()))?;
    if !external.is_empty() {
        let path = args
            .credentials
            .clone()
            .unwrap_or_else(|| log_dir.join("external-agents.json"));
        let body = serde_json::json!({"operator": format!("http://{addr}"), "agents": external});
        write_private(&path, &serde_json::to_vec_pretty(&body).unwrap_or_default())
            .map_err(|e| format!("{}: {e}", path.display()))?;
        eprintln!(
            "infermesh local: credentials of {} external agent(s) in {}",
            external.len(),
            path.display()
        );
    }
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);

    let mut agents: Vec<AgentProcess> = Vec::new();
    for (mesh_name, mesh) in &plan.meshes {
        let slots = mesh.agent.slots.max(1) as usize;
        let threads = args
            .threads
            .or(mesh.agent.intra_op_threads.map(|t| t as usize))
            .unwrap_or_else(|| (cores / (args.agents.max(1) * slots)).max(1));
        let providers: Vec<&str> = mesh
            .agent
            .execution_providers
            .iter()
            .map(|p| p.as_str())
            .collect();
        for i in 0..args.agents {
            let Some(agent_bin) = &agent_bin else { break };
            let id = format!("{mesh_name}-local-{i}");
            let token = agent_tokens
                .iter()
                .find(|(a, _, _)| *a == id)
                .map(|(_, _, t)| t.clone())
                .unwrap_or_default();
            let log = log_dir.join(format!("{id}.log"));
            let log_file =
                std::fs::File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
            let child = Command::new(agent_bin)
                .env("INFERMESH_TOKEN", &token)
                .arg("--operator")
                .arg(format!("http://{addr}"))
                .args([
                    "--mesh",
                    mesh_name,
                    "--node",
                    &format!("local-{i}"),
                    "--agent-id",
                    &id,
                ])
                .args([
                    "--slots",
                    &slots.to_string(),
                    "--intra-op-threads",
                    &threads.to_string(),
                ])
                .arg("--execution-providers")
                .arg(providers.join(","))
                .arg("--model-cache")
                .arg(work_dir.join("model-cache"))
                .arg("--parent-pid")
                .arg(std::process::id().to_string())
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(log_file)
                .kill_on_drop(true)
                .spawn()
                .map_err(|e| format!("cannot start {}: {e}", agent_bin.display()))?;
            agents.push(AgentProcess {
                id,
                mesh: mesh_name.clone(),
                log,
                child,
                exit: None,
            });
        }
    }

    let started = Instant::now();
    let outcome = drive(args, &core, &plan, &mut agents).await;
    let wall = started.elapsed();

    core.drain_all("infermesh local is done").await;
    let deadline = Instant::now() + Duration::from_secs(5);
    for a in &mut agents {
        while a.exit.is_none() && Instant::now() < deadline {
            a.exit = a.child.try_wait().ok().flatten();
            if a.exit.is_none() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        if a.exit.is_none() {
            let _ = a.child.kill().await;
        }
    }
    let _ = stop_tx.send(true);
    let _ = reaper.await;
    let _ = tokio::time::timeout(Duration::from_secs(2), server).await;

    let workloads = core.workloads().await;
    let agent_summaries = core.agents().await;
    let balances = core.store().balances().await.unwrap_or_default();
    // A run that failed before any workload started (agents that cannot attach, no ONNX
    // Runtime) has nothing to sum up: the error alone says what happened.
    if !workloads.is_empty() {
        summary::print(
            &workloads,
            &agent_summaries,
            &agents_info(&agents),
            wall,
            &args.database_url,
            &balances,
            &log_dir,
        );
    }
    if let (true, Some(url)) = (args.ui_keep, &console_url) {
        eprintln!(
            "infermesh local: the run is over; the console still serves at {url} (Ctrl-C to stop)"
        );
        let _ = tokio::signal::ctrl_c().await;
    }
    if let Err(e) = outcome {
        if let Some(code) = e
            .strip_prefix(INTERRUPTED)
            .and_then(|c| c.parse::<u8>().ok())
        {
            return Ok(ExitCode::from(code));
        }
        eprintln!("infermesh local: {e}");
        return Ok(ExitCode::FAILURE);
    }
    let ok = !workloads.is_empty()
        && workloads
            .iter()
            .all(|w| w.phase == WorkloadPhase::Succeeded);
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Starts the web console on `addr` (loopback only) with a fresh random token; prints and
/// returns its URL.
async fn start_console<S: Store + 'static>(
    core: &Arc<Core<S>>,
    addr: std::net::SocketAddr,
) -> Result<String, String> {
    if !addr.ip().is_loopback() {
        return Err(format!(
            "--ui-addr {addr} is not a loopback address: the local console is for this machine only"
        ));
    }
    let token = crate::console::auth::random_hex();
    let console = crate::console::Console::new(
        core.clone(),
        crate::console::auth::Authority::Local {
            token: token.clone(),
        },
    );
    console.start();
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot serve the console on {addr}: {e}"))?;
    let bound = listener.local_addr().map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        if let Err(e) = crate::console::serve(listener, console).await {
            tracing::error!(error = %e, "the console stopped");
        }
    });
    let url = format!("http://{bound}/?token={token}");
    eprintln!("infermesh local: console at {url}");
    Ok(url)
}

/// The tokens of a credentials file written by an earlier run, by agent id; none when the
/// file does not exist. A file that exists but cannot be read or parsed is an error: the
/// agents holding its tokens would be refused.
fn kept_tokens(
    path: &std::path::Path,
) -> Result<std::collections::HashMap<String, String>, String> {
    let body = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Default::default()),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    #[derive(serde::Deserialize)]
    struct Entry {
        id: String,
        token: String,
    }
    #[derive(serde::Deserialize)]
    struct File {
        agents: Vec<Entry>,
    }
    let file: File = serde_json::from_slice(&body).map_err(|e| {
        format!(
            "{}: not a credentials file of infermesh local: {e}",
            path.display()
        )
    })?;
    let valid = |t: &str| t.len() >= 32 && t.bytes().all(|b| b.is_ascii_hexdigit());
    if let Some(bad) = file.agents.iter().find(|a| !valid(&a.token)) {
        return Err(format!(
            "{}: the token of {} is not 32 or more hex digits",
            path.display(),
            bad.id
        ));
    }
    Ok(file.agents.into_iter().map(|a| (a.id, a.token)).collect())
}

/// Writes a file only its owner may read (it holds credentials).
fn write_private(path: &std::path::Path, body: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    // Written beside and renamed over: a reader never sees half a file, and a file left by an
    // earlier run with wider permissions is replaced, not reused.
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(body)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

fn agents_info(agents: &[AgentProcess]) -> Vec<(String, String, Option<i32>)> {
    agents
        .iter()
        .map(|a| {
            (
                a.id.clone(),
                a.log.display().to_string(),
                a.exit.and_then(|s| s.code()),
            )
        })
        .collect()
}

/// Waits for the agents, submits the workloads and follows them to the end.
async fn drive<S: Store>(
    args: &LocalArgs,
    core: &Arc<Core<S>>,
    plan: &LocalPlan,
    agents: &mut [AgentProcess],
) -> Result<(), String> {
    // Wait for the agents to attach, so a broken agent set-up reports itself at once.
    let attach_deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let attached = core
            .agents()
            .await
            .iter()
            .filter(|a| a.connected && agents.iter().any(|p| p.id == a.id))
            .count();
        if attached == agents.len() {
            break;
        }
        for a in agents.iter_mut() {
            if let Ok(Some(status)) = a.child.try_wait() {
                a.exit = Some(status);
                return Err(format!(
                    "agent {} exited ({status}) before attaching:\n{}",
                    a.id,
                    log_tail(&a.log)
                ));
            }
        }
        if Instant::now() > attach_deadline {
            return Err(format!(
                "only {attached} of {} agents attached within 60s; logs in {}",
                agents.len(),
                agents[0].log.display()
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let bars = MultiProgress::with_draw_target(if args.no_progress {
        ProgressDrawTarget::hidden()
    } else {
        ProgressDrawTarget::stderr()
    });
    let style = ProgressStyle::with_template("{prefix:<28} [{bar:32}] {percent:>3}% {msg}")
        .map_err(|e| e.to_string())?
        .progress_chars("=> ");
    let mut tracked = Vec::new();
    let ours = |r: &crate::store::WorkloadRecord| same_workload(plan, r);
    if args.resume {
        let n = store::patiently(
            "resuming from the store",
            STORE_PATIENCE,
            CoreError::is_transient,
            async || {
                if args.resume_all {
                    core.resume().await
                } else {
                    core.resume_where(ours).await
                }
            },
        )
        .await
        .map_err(|e| format!("resuming from the store: {e}"))?;
        bars.suspend(|| {
            eprintln!("infermesh local: resumed {n} unfinished workload(s) from the store")
        });
    }
    let resumed = core.workloads().await;
    // Workloads whose output another live one writes to (`OutputInUse`): submitted again
    // each tick until that one has finished.
    let mut waiting: Vec<&manifests::LocalWorkload> = Vec::new();
    // A workload's progress bar, over `bytes` input bytes.
    let bar_for = |w: &manifests::LocalWorkload, bytes: u64| {
        let bar = bars.add(ProgressBar::new(bytes.max(1)));
        bar.set_style(style.clone());
        bar.set_prefix(format!("{}/{}", w.namespace, w.name));
        bar
    };
    for w in &plan.workloads {
        // A resumed run of the same workload stands in for a new one.
        if let Some(r) = resumed
            .iter()
            .find(|r| r.namespace == w.namespace && r.name == w.name)
        {
            // Its credentials were never stored: handed over again.
            if w.credentials.is_some() {
                core.set_credentials(&r.key, w.credentials.clone())
                    .await
                    .map_err(|e| format!("Workload {}/{}: {e}", w.namespace, w.name))?;
            }
            tracked.push((r.key.clone(), bar_for(w, r.input_bytes)));
            continue;
        }
        match submit_local(core, w, &bars).await? {
            Some(key) => tracked.push((key, bar_for(w, w.input_size))),
            None => waiting.push(w),
        }
    }

    let deadline = args
        .timeout
        .map(|t| Instant::now() + Duration::from_secs(t));
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    let mut last_admit = Instant::now();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| format!("cannot watch SIGTERM: {e}"))?;
    loop {
        let signal = tokio::select! {
            _ = tick.tick() => None,
            _ = tokio::signal::ctrl_c() => Some(("SIGINT", 130u8)),
            _ = term.recv() => Some(("SIGTERM", 143u8)),
        };
        if let Some((name, code)) = signal {
            let summaries = core.workloads().await;
            bars.suspend(|| {
                eprintln!("\ninfermesh local: stopped by {name}.");
                for s in summaries
                    .iter()
                    .filter(|s| tracked.iter().any(|(k, _)| *k == s.key))
                {
                    eprintln!(
                        "  {}/{}: {}/{} shards done, {} records",
                        s.namespace, s.name, s.shards_succeeded, s.shards_total, s.records
                    );
                }
                eprintln!(
                    "Completed shards are kept and charged once. Finish the run with:\n  {}",
                    resume_command()
                );
            });
            return Err(Interrupted(code).to_string());
        }
        // Held workloads (QuotaExceeded) start once credits are granted, also by
        // `infermesh ledger grant` from another shell.
        if last_admit.elapsed() > Duration::from_secs(2) {
            last_admit = Instant::now();
            // Its dispatch round meets the store like any other: a store that does not
            // answer is the outage handling's to wait out (the reaper runs the round again),
            // never a reason to end the run.
            if let Err(e) = core.admit_held().await {
                if !e.is_transient() {
                    return Err(e.to_string());
                }
                tracing::warn!(error = %e, "admitting held workloads waits for the store");
            }
        }
        if !waiting.is_empty() {
            let mut still = Vec::new();
            for w in waiting.drain(..) {
                match submit_local(core, w, &bars).await? {
                    Some(key) => tracked.push((key, bar_for(w, w.input_size))),
                    None => still.push(w),
                }
            }
            waiting = still;
        }
        let summaries = core.workloads().await;
        for (key, bar) in &tracked {
            if let Some(s) = summaries.iter().find(|s| &s.key == key) {
                bar.set_position(s.bytes_done);
                let eta = s.eta().map(format_duration).unwrap_or_else(|| "-".into());
                bar.set_message(format!(
                    "{} records  {:.0}/s  shards {}/{}  ETA {eta}",
                    s.records,
                    s.throughput(),
                    s.shards_succeeded,
                    s.shards_total
                ));
                if s.phase.is_terminal() && !bar.is_finished() {
                    bar.finish_with_message(format!("{:?}: {} records", s.phase, s.records));
                }
            }
        }
        if waiting.is_empty() && summaries.iter().all(|s| s.phase.is_terminal()) {
            return Ok(());
        }
        for a in agents.iter_mut() {
            if a.exit.is_none()
                && let Ok(Some(status)) = a.child.try_wait()
            {
                a.exit = Some(status);
                bars.suspend(|| {
                    eprintln!("agent {} exited ({status}); log: {}", a.id, a.log.display())
                });
            }
        }
        let unfinished_meshes: Vec<&String> = summaries
            .iter()
            .filter(|s| !s.phase.is_terminal())
            .map(|s| &s.mesh)
            .collect();
        for mesh in unfinished_meshes {
            // Only when this run started agents of its own: external ones come and go (they
            // may reconnect after a restart), and the timeout bounds a run that has none.
            let ours: Vec<&AgentProcess> = agents.iter().filter(|a| &a.mesh == mesh).collect();
            if !ours.is_empty() && ours.iter().all(|a| a.exit.is_some()) {
                let last = agents
                    .iter()
                    .rev()
                    .find(|a| &a.mesh == mesh)
                    .map(|a| log_tail(&a.log))
                    .unwrap_or_default();
                return Err(format!(
                    "every agent of mesh {mesh} exited with work left; last log:\n{last}"
                ));
            }
        }
        if deadline.is_some_and(|d| Instant::now() > d) {
            return Err(format!("timed out after {}s", args.timeout.unwrap_or(0)));
        }
    }
}

/// Submits one of the manifest's workloads: its key, or `None` when it waits because
/// another live workload writes where it would (`OutputInUse`, said once, on stderr).
async fn submit_local<S: Store>(
    core: &Core<S>,
    w: &manifests::LocalWorkload,
    bars: &MultiProgress,
) -> Result<Option<String>, String> {
    let uid = format!("{:08x}", rand::rng().random::<u32>());
    let submitted = core
        .submit(Submission {
            namespace: w.namespace.clone(),
            name: w.name.clone(),
            uid,
            spec: w.spec.clone(),
            input_size: w.input_size,
            input_version: w.input_version.clone(),
            input_files: w.input_files.clone(),
            credentials: w.credentials.clone(),
        })
        .await;
    let key = match submitted {
        Ok(key) => key,
        Err(CoreError::OutputInUse(message)) => {
            static SAID: std::sync::Mutex<std::collections::BTreeSet<String>> =
                std::sync::Mutex::new(std::collections::BTreeSet::new());
            let who = format!("{}/{}", w.namespace, w.name);
            if SAID
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(who.clone())
            {
                bars.suspend(|| eprintln!("infermesh local: {who} waits: OutputInUse: {message}"));
            }
            return Ok(None);
        }
        Err(e) => return Err(format!("Workload {}/{}: {e}", w.namespace, w.name)),
    };
    if let Some(s) = core.workload(&key).await {
        for warning in &s.warnings {
            bars.suspend(|| {
                eprintln!(
                    "infermesh local: warning: {}/{}: {warning}",
                    w.namespace, w.name
                )
            });
        }
    }
    Ok(Some(key))
}

/// Whether a stored workload is one of the manifest's: same namespace, name and output.
fn same_workload(plan: &LocalPlan, r: &crate::store::WorkloadRecord) -> bool {
    let output = serde_json::from_str::<infermesh_crds::WorkloadSpec>(&r.spec_json)
        .map(|s| s.output.uri)
        .unwrap_or_default();
    plan.workloads
        .iter()
        .any(|w| w.namespace == r.namespace && w.name == r.name && w.spec.output.uri == output)
}

/// A run stopped by a signal; its exit code (130 for SIGINT, 143 for SIGTERM).
struct Interrupted(u8);

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{INTERRUPTED}{}", self.0)
    }
}

const INTERRUPTED: &str = "interrupted by signal, exit ";

/// The command line of this run with `--resume` (once), quoted for a POSIX shell.
fn resume_command() -> String {
    let mut args: Vec<String> = std::env::args().collect();
    if !args.iter().any(|a| a == "--resume") {
        args.push("--resume".into());
    }
    args.iter()
        .map(|a| shell_quote(a))
        .collect::<Vec<_>>()
        .join(" ")
}

fn shell_quote(a: &str) -> String {
    if !a.is_empty()
        && a.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:@,+".contains(c))
    {
        a.to_string()
    } else {
        format!("'{}'", a.replace('\'', "'\\''"))
    }
}

fn log_tail(path: &std::path::Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Kept credentials: none from a missing file; a file that is not one, or holds a token
    /// that is not, is refused by name (its agents would be turned away); a good one keeps
    /// every agent's token; a new file is written for its owner only.
    #[test]
    fn credentials_are_kept_across_runs_and_checked() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("creds.json");
        assert!(kept_tokens(&path).expect("missing is fine").is_empty());

        std::fs::write(&path, "not json").expect("write");
        let err = kept_tokens(&path).expect_err("not a credentials file");
        assert!(
            err.contains("creds.json") && err.contains("not a credentials file"),
            "{err}"
        );

        std::fs::write(
            &path,
            r#"{"agents": [{"id": "m-external-0", "token": "short"}]}"#,
        )
        .expect("write");
        let err = kept_tokens(&path).expect_err("bad token");
        assert!(err.contains("m-external-0"), "{err}");

        let token = "ab".repeat(32);
        let body = serde_json::json!({"operator": "http://127.0.0.1:1", "agents": [
            {"mesh": "m", "id": "m-external-0", "node": "external-0", "token": token}
        ]});
        write_private(&path, body.to_string().as_bytes()).expect("write");
        let kept = kept_tokens(&path).expect("kept");
        assert_eq!(kept.get("m-external-0"), Some(&token));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "readable by its owner only");
    }
}
