//! `infermesh-swarm`: attaches simulated agents to an operator over the real agent protocol and
//! measures it (see the library's documentation). Prints one JSON report on standard output
//! and a summary line on standard error.
//!
//! ```sh
//! infermesh local -f mesh.yaml --agents 0 --external-agents 100 --credentials creds.json &
//! infermesh-swarm --credentials creds.json --slots 4 --compute zero --operator-pid $!
//! ```
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use infermesh_agent::endpoint::TlsOptions;
use infermesh_swarm::{Compute, Config, Credentials, parse_duration};

/// Simulated agents over real gRPC, to load an operator and measure it.
#[derive(Parser, Debug)]
#[command(name = "infermesh-swarm", version)]
struct Args {
    /// The credentials file of `infermesh local --external-agents N --credentials FILE`
    /// (waited for, up to --wait).
    #[arg(long)]
    credentials: PathBuf,
    /// The operator's gRPC URL (default: the one in the credentials file).
    #[arg(long)]
    operator: Option<String>,
    /// Simulate only the first N agents of the file (default: all).
    #[arg(long)]
    agents: Option<usize>,
    /// Slots per agent.
    #[arg(long, default_value_t = 4)]
    slots: u32,
    /// Compute time per shard: zero, 5ms, exp:5ms (exponential, that mean), uniform:1ms..10ms.
    #[arg(long, default_value = "zero")]
    compute: Compute,
    /// Fraction of shards reported as failed (retryable).
    #[arg(long, default_value_t = 0.0)]
    fail_rate: f64,
    /// Fraction of shards during which the agent drops its stream and attaches again.
    #[arg(long, default_value_t = 0.0)]
    disconnect_rate: f64,
    /// Read each shard's records and write them back as its part (otherwise one record).
    #[arg(long)]
    echo: bool,
    /// End when nothing was assigned or reported for this long after the first Assign.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    idle_exit: Duration,
    /// End after this long in any case.
    #[arg(long, value_parser = parse_duration)]
    deadline: Option<Duration>,
    /// How long to wait for the credentials file.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    wait: Duration,
    /// Seed of the compute times, failures and disconnects.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// The operator's pid: its CPU time and memory are read from /proc.
    #[arg(long)]
    operator_pid: Option<u32>,
    /// Append the operator's `seconds rss_mb cpu_seconds` to this file at every sample.
    #[arg(long, requires = "operator_pid")]
    rss_log: Option<PathBuf>,
    /// How often the operator is sampled.
    #[arg(long, default_value = "200ms", value_parser = parse_duration)]
    sample_every: Duration,
    /// For an `https://` operator (cluster mode): the CA of its TLS Secret (`ca.crt`).
    #[arg(long)]
    ca_cert: Option<PathBuf>,
    /// For an `https://` operator: the name its certificate carries (default: the URL's host).
    #[arg(long)]
    tls_server_name: Option<String>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    for (name, rate) in [
        ("--fail-rate", args.fail_rate),
        ("--disconnect-rate", args.disconnect_rate),
    ] {
        if !(0.0..=1.0).contains(&rate) {
            eprintln!("infermesh-swarm: {name} must be between 0 and 1, not {rate}");
            return ExitCode::from(2);
        }
    }
    if args.slots == 0 {
        eprintln!("infermesh-swarm: --slots must be at least 1");
        return ExitCode::from(2);
    }
    let creds = match Credentials::read(&args.credentials, args.wait) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("infermesh-swarm: {e:#}");
            return ExitCode::from(2);
        }
    };
    let mut agents = creds.agents;
    if let Some(n) = args.agents {
        if n > agents.len() {
            eprintln!(
                "infermesh-swarm: --agents {n}, but {} holds credentials for {}",
                args.credentials.display(),
                agents.len()
            );
            return ExitCode::from(2);
        }
        agents.truncate(n);
    }
    let cfg = Config {
        operator: args.operator.unwrap_or(creds.operator),
        agents,
        slots: args.slots,
        compute: args.compute,
        fail_rate: args.fail_rate,
        disconnect_rate: args.disconnect_rate,
        echo: args.echo,
        idle_exit: args.idle_exit,
        deadline: args.deadline,
        seed: args.seed,
        operator_pid: args.operator_pid,
        rss_log: args.rss_log,
        sample_every: args.sample_every.max(Duration::from_millis(10)),
        tls: TlsOptions {
            ca_cert: args.ca_cert,
            server_name: args.tls_server_name,
        },
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("infermesh-swarm: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(infermesh_swarm::run(cfg)) {
        Ok(r) => {
            println!("{}", serde_json::to_string(&r).unwrap_or_default());
            let op = r
                .operator
                .as_ref()
                .map(|o| {
                    format!(
                        ", operator {:.2} CPU s ({:.0} ms per 1,000 shards; {:.0} while the \
                         whole mesh worked), peak RSS {:.0} MB",
                        o.cpu_seconds,
                        o.cpu_ms_per_1000_shards,
                        o.steady_cpu_ms_per_1000_shards,
                        o.peak_rss_mb
                    )
                })
                .unwrap_or_default();
            eprintln!(
                "infermesh-swarm: {} agents x {} slots: {} shards in {:.2} s = {:.0} shards/s; \
                 assignment latency p50 {:.2} ms p99 {:.2} ms{op}; ended: {}",
                r.agents,
                r.slots,
                r.completed,
                r.seconds,
                r.shards_per_second,
                r.latency.p50_ms,
                r.latency.p99_ms,
                r.ended
            );
            if r.attached == 0 {
                eprintln!(
                    "infermesh-swarm: no agent attached{}",
                    r.last_error
                        .map(|e| format!(" (last error: {e})"))
                        .unwrap_or_default()
                );
                return ExitCode::FAILURE;
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("infermesh-swarm: {e:#}");
            ExitCode::FAILURE
        }
    }
}
