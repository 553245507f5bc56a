//! `infermesh`: run the mesh on one machine (`local`), print the CRDs (`crd`), read the
//! ledger and the event log (`ledger`).

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use infermesh_operator::core::pricing::format_credits;
use infermesh_operator::local::{self, LocalArgs};
use infermesh_operator::store::{self, EventFilter, Store};

/// Batch ONNX inference across the GPU nodes of a cluster, or on one machine.
#[derive(Parser, Debug)]
#[command(name = "infermesh", version)]
struct Cli {
    /// Log as JSON lines.
    #[arg(long, global = true, env = "INFERMESH_LOG_JSON")]
    log_json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run Meshes and Workloads from a manifest file on this machine: the core, a gRPC server
    /// on loopback, N agent processes and an embedded SQLite store.
    Local(LocalArgs),
    /// Print the CustomResourceDefinitions as YAML.
    Crd,
    /// Read the credit ledger and the event log.
    Ledger {
        /// Database URL.
        #[arg(long, env = "INFERMESH_DATABASE_URL", default_value_t = local::default_database_url())]
        database_url: String,
        #[command(subcommand)]
        command: LedgerCommand,
    },
}

#[derive(Subcommand, Debug)]
enum LedgerCommand {
    /// Balance of every account, in credits.
    Balance,
    /// Events in order; filter by workload uid, agent or kind.
    Events {
        /// Only this workload uid.
        #[arg(long)]
        workload: Option<String>,
        /// Only this agent.
        #[arg(long)]
        agent: Option<String>,
        /// Only this kind (`shard.requeued`).
        #[arg(long)]
        kind: Option<String>,
        /// At most this many.
        #[arg(long)]
        limit: Option<i64>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let quiet = matches!(cli.command, Command::Local(_));
    let default = if quiet { "warn" } else { "info" };
    let filter = tracing_subscriber::EnvFilter::try_from_env("INFERMESH_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if cli.log_json {
        fmt.json().init();
    } else {
        fmt.init();
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("infermesh: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match cli.command {
        Command::Crd => match infermesh_crds::crds_yaml() {
            Ok(yaml) => {
                print!("{yaml}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("infermesh: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Local(args) => rt.block_on(local::run(args)),
        Command::Ledger {
            database_url,
            command,
        } => match rt.block_on(ledger(&database_url, command)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("infermesh ledger: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}

async fn ledger(url: &str, command: LedgerCommand) -> anyhow::Result<()> {
    let store = store::open(url).await?;
    match command {
        LedgerCommand::Balance => {
            println!("{:<40} {:>18}", "ACCOUNT", "CREDITS");
            for (account, micro) in store.balances().await? {
                println!("{account:<40} {:>18}", format_credits(micro));
            }
        }
        LedgerCommand::Events {
            workload,
            agent,
            kind,
            limit,
        } => {
            let filter = EventFilter {
                workload_uid: workload,
                agent,
                kind,
                after_seq: None,
                limit,
            };
            for e in store.events(&filter).await? {
                println!(
                    "{:>6} {} {:<18} {} {} {} {}",
                    e.seq,
                    e.at,
                    e.kind,
                    e.workload_uid.as_deref().unwrap_or("-"),
                    e.shard
                        .map(|s| format!("#{s}@{}", e.attempt.unwrap_or(0)))
                        .unwrap_or_else(|| "-".into()),
                    e.agent.as_deref().unwrap_or("-"),
                    e.message
                );
            }
        }
    }
    Ok(())
}
