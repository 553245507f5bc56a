//! `infermesh`: run in a cluster (`operator`), run the mesh on one machine (`local`), print the CRDs (`crd`), read the
//! ledger and the event log (`ledger`), and look at or change a cluster's Meshes, Agents and
//! Workloads (`get`, `describe`, `logs`, `suspend`, ...; also `kubectl infermesh ...` when
//! installed as `kubectl-infermesh`).

use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use infermesh_operator::cli;
use infermesh_operator::controller::run::OperatorArgs;
use infermesh_operator::core::pricing::format_credits;
use infermesh_operator::kube_cli::{self, ClusterCommand};
use infermesh_operator::local::{self, LocalArgs};
use infermesh_operator::store::{self, EventFilter, Store};
use infermesh_operator::{out, outln};

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
    /// Run in a Kubernetes cluster: controllers for Mesh, Agent and Workload, leader
    /// election, the agents' gRPC port (TLS, TokenReview), /metrics, /healthz, /readyz.
    Operator(Box<OperatorArgs>),
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
    #[command(flatten)]
    Cluster(ClusterCommand),
}

#[derive(Subcommand, Debug)]
enum LedgerCommand {
    /// Balance of every account, in credits.
    Balance {
        /// Only this namespace's account.
        #[arg(long)]
        namespace: Option<String>,
        /// Only this agent's account.
        #[arg(long)]
        agent: Option<String>,
        /// Only this Mesh's account.
        #[arg(long)]
        mesh: Option<String>,
        /// Output format.
        #[arg(short = 'o', long, value_enum, default_value_t = Format::Table)]
        output: Format,
    },
    /// Entries of one account over a time range, with the running balance.
    Statement {
        /// The account: `namespace/NAME`, `agent/ID` or `mesh/NAME`.
        #[arg(value_parser = cli::account)]
        account: String,
        /// From (RFC 3339, or a date: its start), inclusive.
        #[arg(long, default_value = "1970-01-01", value_parser = cli::from_time)]
        from: String,
        /// To (RFC 3339, or a date: its end), inclusive.
        #[arg(long, default_value = "9999-12-31", value_parser = cli::to_time)]
        to: String,
        /// Output format.
        #[arg(short = 'o', long, value_enum, default_value_t = Format::Table)]
        output: Format,
    },
    /// Grant a namespace credits from a Mesh (a budget top-up; negative takes back).
    Grant {
        /// The namespace.
        #[arg(long)]
        namespace: String,
        /// The Mesh granting.
        #[arg(long)]
        mesh: String,
        /// Credits: finite, not 0, at most 1e9 either way (negative takes back).
        #[arg(long, allow_hyphen_values = true, value_parser = cli::credits)]
        credits: f64,
    },
    /// Refund a shard's charge (agent back to namespace); a charge is refunded at most once.
    Refund {
        /// The charge's transaction id (see `statement`).
        transaction: i64,
        /// Why.
        #[arg(long, default_value = "refund")]
        memo: String,
    },
    /// Retention: drop (or `--archive`: detach and keep) the event log's monthly partitions
    /// that end on or before a date. Whole partitions only; rows are never deleted (Postgres).
    PruneEvents {
        /// Cut-off date, YYYY-MM-DD.
        #[arg(long)]
        before: String,
        /// Detach the partitions and keep them as plain tables instead of dropping them.
        #[arg(long)]
        archive: bool,
    },
    /// Prove the ledger's invariants: every transaction balances, every account's balance is
    /// the sum of its entries, every succeeded shard is charged exactly once, and no charge
    /// lacks a succeeded shard. Exits 1 naming the offending rows when one fails.
    Verify {
        /// Output format.
        #[arg(short = 'o', long, value_enum, default_value_t = Format::Table)]
        output: Format,
        /// Also check every succeeded workload's outputs: its `_SUCCESS.json` lists exactly
        /// the parts the store committed, each part exists with that sha256 and record count,
        /// and no stray part or attempt file is left.
        #[arg(long)]
        outputs: bool,
    },
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
        /// At most this many (1 or more).
        #[arg(long, value_parser = clap::value_parser!(i64).range(1..))]
        limit: Option<i64>,
        /// Only events at or after this time (RFC 3339, or a date: its start).
        #[arg(long, value_parser = cli::from_time)]
        since: Option<String>,
        /// Keep printing new events as they are committed (tail by sequence number).
        #[arg(long, short = 'f')]
        follow: bool,
        /// Output format.
        #[arg(short = 'o', long, value_enum, default_value_t = Format::Table)]
        output: Format,
    },
}

/// How `infermesh ledger` prints.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Format {
    /// Aligned columns for people.
    Table,
    /// JSON for scripts.
    Json,
}

/// The command line; started as `kubectl-infermesh` (a kubectl plugin) the commands are the
/// same and the usage says `kubectl infermesh`.
fn parse_args() -> Cli {
    let argv0 = std::env::args_os().next().unwrap_or_default();
    if !kube_cli::invoked_as_kubectl_plugin(&argv0) {
        return Cli::parse();
    }
    let matches = Cli::command().bin_name("kubectl infermesh").get_matches();
    Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
}

fn main() -> ExitCode {
    let cli = parse_args();
    let quiet = matches!(cli.command, Command::Local(_) | Command::Cluster(_));
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
                out!("{yaml}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("infermesh: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Local(args) => rt.block_on(local::run(args)),
        Command::Operator(args) => rt.block_on(infermesh_operator::controller::run::run(*args)),
        Command::Cluster(command) => {
            let result = rt.block_on(async {
                let client = kube_cli::connect().await?;
                kube_cli::run(client, &command, &mut kube_cli::Stdio).await
            });
            match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("infermesh: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Ledger {
            database_url,
            command,
        } => match rt.block_on(ledger(&database_url, command)) {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => ExitCode::FAILURE,
            Err(e) => {
                eprintln!("infermesh ledger: {e:#}");
                ExitCode::from(2)
            }
        },
    }
}

/// Runs a ledger command; `Ok(false)` when `verify` found a broken invariant.
async fn ledger(url: &str, command: LedgerCommand) -> anyhow::Result<bool> {
    // Reading a ledger never creates one: a mistyped path is an error, not an empty ledger.
    let store = store::open_existing(url).await?;
    match command {
        LedgerCommand::Balance {
            namespace,
            agent,
            mesh,
            output,
        } => {
            let wanted: Vec<String> = [
                namespace.map(|n| store::namespace_account(&n)),
                agent.map(|a| store::agent_account(&a)),
                mesh.map(|m| store::mesh_account(&m)),
            ]
            .into_iter()
            .flatten()
            .collect();
            let balances: Vec<(String, i64)> = store
                .balances()
                .await?
                .into_iter()
                .filter(|(a, _)| wanted.is_empty() || wanted.contains(a))
                .collect();
            if output == Format::Json {
                let rows: Vec<_> = balances
                    .iter()
                    .map(|(a, m)| serde_json::json!({"account": a, "microCredits": m, "credits": format_credits(*m)}))
                    .collect();
                outln!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                outln!("{:<40} {:>18}", "ACCOUNT", "CREDITS");
                for (account, micro) in balances {
                    outln!("{account:<40} {:>18}", format_credits(micro));
                }
            }
        }
        LedgerCommand::Statement {
            account,
            from,
            to,
            output,
        } => {
            if !store.balances().await?.iter().any(|(a, _)| *a == account) {
                anyhow::bail!(
                    "no such account `{account}` in this ledger (`infermesh ledger balance` lists them)"
                );
            }
            let lines = store.statement(&account, &from, &to).await?;
            if output == Format::Json {
                outln!("{}", serde_json::to_string_pretty(&lines)?);
                return Ok(true);
            }
            outln!(
                "{:>8}  {:<27} {:<7} {:>16} {:>16}  FOR",
                "TX",
                "AT",
                "KIND",
                "AMOUNT",
                "BALANCE"
            );
            let mut running = 0i64;
            for l in &lines {
                running = running.saturating_add(l.amount);
                let what = match (&l.workload_uid, l.shard) {
                    (Some(w), Some(s)) => format!("{w}#{s} {}", l.memo),
                    _ => l.memo.clone(),
                };
                outln!(
                    "{:>8}  {:<27} {:<7} {:>16} {:>16}  {what}",
                    l.tx_id,
                    l.at,
                    l.kind,
                    format_credits(l.amount),
                    format_credits(running)
                );
            }
        }
        LedgerCommand::Grant {
            namespace,
            mesh,
            credits,
        } => {
            let micro = infermesh_operator::core::pricing::credits_to_micro(credits)
                .map_err(|e| anyhow::anyhow!("--credits: {e}"))?;
            if !store.meshes().await?.contains(&mesh) {
                anyhow::bail!(
                    "no mesh `{mesh}` in this ledger: a Mesh is known once it has been applied (infermesh local, or the operator)"
                );
            }
            if namespace.trim().is_empty() || namespace.contains('/') {
                anyhow::bail!("`{namespace}` is not a namespace name");
            }
            let limit =
                infermesh_operator::core::pricing::credits_to_micro(cli::MAX_BALANCE_CREDITS)
                    .unwrap_or(i64::MAX);
            for account in [
                store::namespace_account(&namespace),
                store::mesh_account(&mesh),
            ] {
                let sign = if account.starts_with("mesh/") { -1 } else { 1 };
                let now = store.balance(&account).await?;
                let after = now.checked_add(sign * micro).filter(|b| b.abs() <= limit);
                if after.is_none() {
                    anyhow::bail!(
                        "the grant would take {account} past ±{} credits, the most a balance may hold",
                        cli::MAX_BALANCE_CREDITS
                    );
                }
            }
            let id = store
                .grant(
                    store::GrantKind::Manual,
                    &namespace,
                    &mesh,
                    micro,
                    "granted with infermesh ledger grant",
                )
                .await?;
            outln!(
                "transaction {id}: granted {} credits to namespace/{namespace} from mesh/{mesh}",
                format_credits(micro)
            );
        }
        LedgerCommand::Refund { transaction, memo } => {
            let id = store.refund(transaction, &memo).await?;
            outln!("transaction {id}: refunded charge {transaction}");
        }
        LedgerCommand::Verify { output, outputs } => {
            let report = store.verify().await?;
            let checked = if outputs {
                Some(infermesh_operator::core::outputs::verify_stored(&store).await?)
            } else {
                None
            };
            let outputs_ok = checked
                .as_ref()
                .is_none_or(|c| c.iter().all(|w| w.problems.is_empty()));
            if output == Format::Json {
                outln!(
                    "{}",
                    serde_json::to_string_pretty(
                        &serde_json::json!({"ok": report.ok() && outputs_ok, "report": report, "outputs": checked})
                    )?
                );
            } else {
                let mark = |ok: bool| if ok { "ok  " } else { "FAIL" };
                outln!(
                    "{} every transaction balances ({} transactions)",
                    mark(report.unbalanced_transactions.is_empty()),
                    report.transactions
                );
                for id in &report.unbalanced_transactions {
                    outln!("       transaction {id} does not balance");
                }
                outln!(
                    "{} every account's balance is the sum of its entries ({} accounts)",
                    mark(report.account_mismatches.is_empty()),
                    report.accounts
                );
                for (account, stored, sum) in &report.account_mismatches {
                    outln!(
                        "       account {account}: balance {stored}, entries sum to {sum} (micro-credits)"
                    );
                }
                outln!(
                    "{} every succeeded shard is charged exactly once",
                    mark(report.shards_not_charged_once.is_empty())
                );
                for (uid, shard, n) in &report.shards_not_charged_once {
                    outln!("       workload {uid} shard {shard}: {n} charges");
                }
                outln!(
                    "{} no charge without a succeeded shard",
                    mark(report.charges_without_success.is_empty())
                );
                for id in &report.charges_without_success {
                    outln!("       transaction {id} charges a shard that did not succeed");
                }
                if let Some(checked) = &checked {
                    let parts: usize = checked.iter().map(|w| w.parts).sum();
                    outln!(
                        "{} every succeeded workload's outputs match its manifest and the store ({} workloads, {parts} parts)",
                        mark(outputs_ok),
                        checked.len()
                    );
                    for w in checked {
                        for p in &w.problems {
                            outln!("       {}: {p}", w.workload);
                        }
                    }
                }
            }
            return Ok(report.ok() && outputs_ok);
        }
        LedgerCommand::PruneEvents { before, archive } => {
            for p in store.prune_events(&before, archive).await? {
                outln!("{} {p}", if archive { "archived" } else { "dropped" });
            }
        }
        LedgerCommand::Events {
            workload,
            agent,
            kind,
            limit,
            since,
            follow,
            output,
        } => {
            let mut filter = EventFilter {
                workload_uid: workload,
                agent,
                kind,
                after_seq: None,
                limit,
                since,
            };
            loop {
                let events = store.events(&filter).await?;
                if let Some(last) = events.last() {
                    filter.after_seq = Some(last.seq);
                }
                if output == Format::Json {
                    if follow {
                        // One object a line, so a follower can stream them.
                        for e in &events {
                            outln!("{}", serde_json::to_string(e)?);
                        }
                    } else {
                        outln!("{}", serde_json::to_string_pretty(&events)?);
                    }
                } else {
                    for e in &events {
                        outln!(
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
                if !follow {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            }
        }
    }
    Ok(true)
}
