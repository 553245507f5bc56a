//! `infermesh-agent`: the DaemonSet process (also spawned by `infermesh local`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use infermesh_agent::client::{self, ClientConfig};
use infermesh_agent::endpoint::TlsOptions;
use infermesh_agent::inference::runtime::{self, SessionConfig};
use infermesh_agent::io::cache::ModelCache;
use infermesh_agent::metrics::AgentMetrics;
use infermesh_agent::metrics_server;
use infermesh_agent::runner::Runner;
use infermesh_agent::token::TokenSource;

/// Runs ONNX Runtime on the shards the infermesh operator assigns.
#[derive(Parser, Debug)]
#[command(name = "infermesh-agent", version)]
struct Args {
    /// gRPC URL of the operator: http:// (local, loopback) or https:// (cluster, with --ca-cert).
    #[arg(long, env = "INFERMESH_OPERATOR")]
    operator: String,
    /// PEM file of the CA that signed the operator's certificate (the `ca.crt` of its TLS
    /// Secret); required for an https:// operator URL.
    #[arg(long, env = "INFERMESH_CA_CERT")]
    ca_cert: Option<PathBuf>,
    /// Name the operator's certificate must carry; default: the host of the operator URL.
    #[arg(long, env = "INFERMESH_TLS_SERVER_NAME")]
    tls_server_name: Option<String>,
    /// Bearer token; prefer INFERMESH_TOKEN or --token-file so it stays out of `ps`.
    #[arg(long, env = "INFERMESH_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// File holding the bearer token (a projected ServiceAccount token in a cluster); read
    /// again on every reconnect, since the kubelet rotates it.
    #[arg(long, env = "INFERMESH_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// Address to serve /metrics, /healthz and /readyz on (e.g. 0.0.0.0:9091); off if unset.
    #[arg(long, env = "INFERMESH_METRICS_ADDR")]
    metrics_addr: Option<SocketAddr>,
    /// The Mesh this agent serves.
    #[arg(long, env = "INFERMESH_MESH")]
    mesh: String,
    /// Node name; defaults to the host name.
    #[arg(long, env = "INFERMESH_NODE")]
    node: Option<String>,
    /// Agent id; defaults to `<mesh>-<node>`.
    #[arg(long, env = "INFERMESH_AGENT_ID")]
    agent_id: Option<String>,
    /// Shards run at once.
    #[arg(long, env = "INFERMESH_SLOTS", default_value_t = 1)]
    slots: usize,
    /// ONNX Runtime intra-op threads per slot; default: cores / slots.
    #[arg(long, env = "INFERMESH_INTRA_OP_THREADS")]
    intra_op_threads: Option<usize>,
    /// Execution providers in order of preference.
    #[arg(
        long,
        env = "INFERMESH_EXECUTION_PROVIDERS",
        value_delimiter = ',',
        default_value = "cuda,cpu"
    )]
    execution_providers: Vec<String>,
    /// Refuse to run on CPU when no GPU provider registers.
    #[arg(long, env = "INFERMESH_REQUIRE_GPU")]
    require_gpu: bool,
    /// Model cache directory; default: <infermesh home>/agent-cache.
    #[arg(long, env = "INFERMESH_MODEL_CACHE")]
    model_cache: Option<PathBuf>,
    /// Path of libonnxruntime.so; default: ORT_DYLIB_PATH, then <infermesh home>/lib.
    #[arg(long, env = "INFERMESH_ORT_LIBRARY")]
    ort_library: Option<PathBuf>,
    /// Log as JSON lines.
    #[arg(long, env = "INFERMESH_LOG_JSON")]
    log_json: bool,
    /// Exit when this process is gone (`infermesh local` passes its own pid, so agents do
    /// not outlive a killed run).
    #[arg(long, hide = true)]
    parent_pid: Option<u32>,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("INFERMESH_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,ort=warn"));
    let colour = infermesh_agent::logging::use_colour(
        std::io::IsTerminal::is_terminal(&std::io::stderr()),
        std::env::var_os("NO_COLOR")
            .as_deref()
            .map(|v| v.to_str().unwrap_or("non-UTF-8")),
    );
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour)
        .with_writer(std::io::stderr);
    if args.log_json {
        fmt.json().init();
    } else {
        fmt.init();
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("infermesh-agent: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("infermesh-agent: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let metrics = Arc::new(AgentMetrics::new());
    // Bound before anything slow, so /healthz answers while ONNX Runtime loads and a busy
    // port fails at once.
    if let Some(addr) = args.metrics_addr {
        let listener = metrics_server::bind(addr)
            .await
            .with_context(|| format!("cannot listen on --metrics-addr {addr}"))?;
        tracing::info!(%addr, "serving /metrics, /healthz and /readyz");
        let metrics = metrics.clone();
        tokio::spawn(async move {
            if let Err(e) = metrics_server::serve(listener, metrics).await {
                tracing::error!(error = %e, "metrics endpoint stopped");
            }
        });
    }
    runtime::init(args.ort_library.as_deref()).map_err(anyhow::Error::msg)?;
    let token = match (args.token, args.token_file) {
        (Some(t), _) => TokenSource::Fixed(t),
        (None, Some(f)) => TokenSource::File(f),
        (None, None) => anyhow::bail!("no token: set INFERMESH_TOKEN or --token-file"),
    };
    let node = match args.node {
        Some(n) => n,
        None => std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "localhost".into()),
    };
    let agent_id = args
        .agent_id
        .unwrap_or_else(|| format!("{}-{}", args.mesh, node));
    let providers = runtime::usable_providers(&args.execution_providers);
    let wants_gpu = args.execution_providers.iter().any(|p| p != "cpu");
    let has_gpu = providers.iter().any(|p| p != "cpu");
    if wants_gpu && !has_gpu {
        if args.require_gpu {
            anyhow::bail!(
                "no GPU execution provider registered (wanted {:?}) and the Mesh requires a GPU",
                args.execution_providers
            );
        }
        tracing::warn!(wanted = ?args.execution_providers, "no GPU execution provider on this node: running on CPU");
    }
    if providers.is_empty() {
        anyhow::bail!(
            "none of the execution providers {:?} is usable here",
            args.execution_providers
        );
    }
    let slots = args.slots.max(1);
    let threads = args
        .intra_op_threads
        .unwrap_or_else(|| (infermesh_agent::capabilities::cpus() as usize / slots).max(1));
    let cache_dir = args
        .model_cache
        .unwrap_or_else(|| runtime::infermesh_home().join("agent-cache"));
    let cache = ModelCache::new(&cache_dir)
        .with_context(|| format!("model cache {}", cache_dir.display()))?;
    let config = SessionConfig {
        intra_op_threads: threads,
        providers: providers.clone(),
        require_gpu: args.require_gpu,
    };
    tracing::info!(%agent_id, %node, mesh = %args.mesh, slots, threads, providers = ?providers, "agent starting");
    let runner = Arc::new(Runner::new(cache, config, slots, metrics.clone()));
    let client_config = ClientConfig {
        operator: args.operator,
        tls: TlsOptions {
            ca_cert: args.ca_cert,
            server_name: args.tls_server_name,
        },
        token,
        agent_id,
        node,
        mesh: args.mesh,
        execution_providers: providers,
    };
    let parent_gone = async move {
        let Some(pid) = args.parent_pid else {
            return std::future::pending().await;
        };
        let proc = std::path::PathBuf::from(format!("/proc/{pid}"));
        while proc.exists() {
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        }
    };
    tokio::select! {
        r = client::run(client_config, runner, metrics) => r,
        _ = tokio::signal::ctrl_c() => { tracing::info!("interrupted"); Ok(()) }
        _ = parent_gone => { tracing::warn!("the process that started this agent is gone: exiting"); Ok(()) }
    }
}
