//! `infermesh-chaos`: plays seeded fault schedules against real operator, agent and Postgres
//! processes and checks the invariants after each run (see `tests/src/chaos`). Run it through
//! `scripts/chaos.sh`, which builds it and the binaries first.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use infermesh_tests::chaos::{self, Env, RunReport, report};

/// Seeded fault injection against real processes; exit 0 only when every invariant held.
#[derive(Parser, Debug)]
#[command(name = "infermesh-chaos")]
struct Args {
    /// Play seeds FROM..FROM+N.
    #[arg(long, conflicts_with_all = ["seed", "ci"])]
    seeds: Option<u64>,
    /// First seed of --seeds.
    #[arg(long, default_value_t = 0)]
    from: u64,
    /// Play this one seed (10,000 and up: the kept regression of that seed, as it was played).
    #[arg(long, conflicts_with = "ci")]
    seed: Option<u64>,
    /// The fixed short set CI plays: one seed of every scenario, and mixes.
    #[arg(long)]
    ci: bool,
    /// Play the kept regression schedules too (`--ci` does).
    #[arg(long)]
    regressions: bool,
    /// Play this scenario (default: the one each seed picks).
    #[arg(long)]
    scenario: Option<String>,
    /// Folder for the runs (default: $TMPDIR/infermesh-chaos).
    #[arg(long)]
    root: Option<PathBuf>,
    /// Keep every run's folder (failing runs' are always kept).
    #[arg(long)]
    keep: bool,
    /// Append each run's report as a JSON line to this file.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Remove what an interrupted harness left (its `imc-*` network namespaces and the
    /// processes in them), then exit. Not while another harness runs.
    #[arg(long)]
    clean: bool,
    /// Play nothing: make the table from the runs of a `--report` file (with `--doc`, write it
    /// there), as if they had just been played.
    #[arg(long, value_name = "FILE")]
    table_from: Option<PathBuf>,
    /// Write the table into this Markdown file, between its chaos markers.
    #[arg(long)]
    doc: Option<PathBuf>,
    /// The harness's helpers, run by it inside a run's namespaces.
    #[command(subcommand)]
    helper: Option<Helper>,
}

/// What a run starts in the operator's namespace when its input and output are on S3.
#[derive(clap::Subcommand, Debug)]
enum Helper {
    /// A TCP proxy that holds each request for the milliseconds written in a file (the slow
    /// object store); serves until killed.
    Proxy {
        /// Address to listen on.
        #[arg(long)]
        listen: String,
        /// Address to pass the connections on to.
        #[arg(long)]
        upstream: String,
        /// File holding the delay in milliseconds (read at each request; absent: none).
        #[arg(long)]
        delay_file: PathBuf,
    },
    /// The harness's own reads and writes on the S3 server (`AWS_*` as object_store reads them).
    S3 {
        #[command(subcommand)]
        op: S3Op,
    },
}

#[derive(clap::Subcommand, Debug)]
enum S3Op {
    /// Create a bucket (waits for the server at `AWS_ENDPOINT` to listen).
    Bucket { name: String },
    /// Upload a file.
    Put { file: PathBuf, uri: String },
    /// Copy every object under a prefix into a folder.
    Get { prefix: String, dir: PathBuf },
    /// Print how many committed parts a prefix holds.
    Count { prefix: String },
}

fn helper(h: &Helper) -> ExitCode {
    let done = match h {
        Helper::Proxy {
            listen,
            upstream,
            delay_file,
        } => chaos::s3::proxy(listen, upstream, delay_file).map_err(|e| format!("proxy: {e}")),
        Helper::S3 { op } => match op {
            S3Op::Bucket { name } => {
                let endpoint = std::env::var("AWS_ENDPOINT").unwrap_or_default();
                chaos::s3::make_bucket(&endpoint, name)
            }
            S3Op::Put { file, uri } => chaos::s3::put(file, uri),
            S3Op::Get { prefix, dir } => chaos::s3::get(prefix, dir).map(|_| ()),
            S3Op::Count { prefix } => chaos::s3::count_parts(prefix).map(|n| println!("{n}")),
        },
    };
    match done {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("infermesh-chaos: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The last lines of each operator and agent log of a failed run's folder (escape codes
/// removed), on stderr.
fn print_log_tails(dir: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut logs: Vec<_> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .collect();
    logs.sort();
    for log in logs {
        let Ok(text) = std::fs::read_to_string(&log) else {
            continue;
        };
        let keep = if log.to_string_lossy().contains("operator") {
            60
        } else {
            12
        };
        let lines: Vec<&str> = text.lines().collect();
        eprintln!("       --- {} (last {keep} lines)", log.display());
        for line in &lines[lines.len().saturating_sub(keep)..] {
            let plain = strip_ansi(line);
            eprintln!("       | {}", plain.chars().take(400).collect::<String>());
        }
    }
}

fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ ... final byte in @..~
            for d in chars.by_ref() {
                if ('@'..='~').contains(&d) && d != '[' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn replay(r: &RunReport, explicit: bool) -> String {
    if r.seed >= 10_000 {
        format!("scripts/chaos.sh --seed {}", r.seed)
    } else if explicit {
        format!(
            "scripts/chaos.sh --seed {} --scenario {}",
            r.seed, r.scenario
        )
    } else {
        format!("scripts/chaos.sh --seed {}", r.seed)
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(h) = &args.helper {
        return helper(h);
    }
    if let Some(path) = &args.table_from {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("infermesh-chaos: {}: {e}", path.display());
                return ExitCode::from(2);
            }
        };
        let runs: Vec<RunReport> = text
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        let command = format!("scripts/chaos.sh --seeds {}", runs.len());
        return finish(&runs, &command, args.doc.as_deref());
    }
    if args.clean {
        let n = chaos::net::clean_all();
        println!("chaos: removed {n} network namespace(s)");
        return ExitCode::SUCCESS;
    }
    let seeds: Vec<u64> = if args.ci {
        chaos::ci_seeds()
    } else if let Some(s) = args.seed {
        vec![s]
    } else {
        (args.from..args.from + args.seeds.unwrap_or(chaos::SCENARIOS.len() as u64)).collect()
    };
    let namespaces = chaos::net::namespaces_available();
    let mut schedules = Vec::new();
    if args.ci || args.regressions {
        schedules.extend(chaos::regressions());
    }
    for s in &seeds {
        // A kept regression is replayed by its own seed (10,000 and up), as it was played.
        if *s >= 10_000 {
            match chaos::regressions().into_iter().find(|r| r.seed == *s) {
                Some(r) => schedules.push(r),
                None => {
                    eprintln!("infermesh-chaos: no kept regression has seed {s}");
                    return ExitCode::from(2);
                }
            }
            continue;
        }
        match chaos::schedule(*s, args.scenario.as_deref(), namespaces) {
            Ok(s) => schedules.push(s),
            Err(e) => {
                eprintln!("infermesh-chaos: {e}");
                return ExitCode::from(2);
            }
        }
    }
    let exe = std::env::current_exe().unwrap_or_default();
    let bin_dir = exe.parent().map(PathBuf::from).unwrap_or_default();
    for b in ["infermesh", "infermesh-agent"] {
        if !bin_dir.join(b).is_file() {
            eprintln!(
                "infermesh-chaos: {} is missing (cargo build --workspace --bins)",
                bin_dir.join(b).display()
            );
            return ExitCode::from(2);
        }
    }
    let root = args
        .root
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join("infermesh-chaos"));
    if let Err(e) = std::fs::create_dir_all(&root) {
        eprintln!("infermesh-chaos: {}: {e}", root.display());
        return ExitCode::from(2);
    }
    let model = match chaos::tensor_model(&root) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("infermesh-chaos: {e}");
            return ExitCode::from(2);
        }
    };
    let needs_pg = schedules
        .iter()
        .any(|s| s.store == chaos::StoreKind::Postgres);
    let pg = if needs_pg {
        match infermesh_operator::store::testing::PrivatePostgres::start() {
            Ok(pg) => Some(pg),
            Err(e) => {
                eprintln!("infermesh-chaos: no Postgres, its runs are skipped: {e}");
                None
            }
        }
    } else {
        None
    };
    let root_user = chaos::is_root();
    let env = Env {
        bin_dir,
        root: root.clone(),
        model,
        pg,
        namespaces,
        tmpfs: root_user,
        keep: args.keep,
    };
    if !namespaces {
        eprintln!("infermesh-chaos: no network namespaces (not root?): network faults are skipped");
    }
    let mut runs = Vec::new();
    for s in &schedules {
        let r = chaos::run_seed(&env, s);
        let mark = if !r.played() {
            "SKIP"
        } else if r.violations.is_empty() {
            "ok  "
        } else {
            "FAIL"
        };
        eprintln!(
            "{mark} seed {:>4} {:<16} {:<8} {} agents {:>6} records {:>6.1}s  {}  [{}]  {}",
            r.seed,
            r.scenario,
            r.store,
            r.agents,
            r.records,
            r.wall_s,
            r.outcome,
            r.faults.join("; "),
            r.recoveries
                .iter()
                .map(|(k, s)| format!("{k} {s:.2}s"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        for v in &r.violations {
            eprintln!("       violation: {v}");
        }
        if !r.violations.is_empty() {
            eprintln!(
                "       replay: {}   (folder {})",
                replay(&r, args.scenario.is_some()),
                r.dir
            );
            // CI keeps only what is printed: the logs' last lines say where the run stood.
            print_log_tails(std::path::Path::new(&r.dir));
        }
        if let Some(path) = &args.report {
            use std::io::Write;
            if let Ok(mut f) = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
            {
                let _ = writeln!(f, "{}", serde_json::to_string(&r).unwrap_or_default());
            }
        }
        runs.push(r);
    }
    let command: String = std::env::args()
        .skip(1)
        .fold("scripts/chaos.sh".to_string(), |a, b| {
            if b.starts_with("--doc")
                || b.ends_with(".md")
                || b.starts_with("--report")
                || b.ends_with(".jsonl")
            {
                a
            } else {
                format!("{a} {b}")
            }
        });
    finish(&runs, &command, args.doc.as_deref())
}

/// Prints the table (and writes it into `doc`) and the closing line; the exit code says
/// whether every invariant held.
fn finish(runs: &[RunReport], command: &str, doc: Option<&std::path::Path>) -> ExitCode {
    let table = report::table(runs, command);
    println!("{table}");
    if let Some(doc) = doc {
        let text = std::fs::read_to_string(doc).unwrap_or_default();
        match report::splice(&text, &table) {
            Ok(new) => {
                if let Err(e) = std::fs::write(doc, new) {
                    eprintln!("infermesh-chaos: {}: {e}", doc.display());
                }
            }
            Err(e) => eprintln!("infermesh-chaos: {}: {e}", doc.display()),
        }
    }
    let played = runs.iter().filter(|r| r.played()).count();
    let bad = runs.iter().filter(|r| !r.violations.is_empty()).count();
    println!(
        "chaos: {} passed, {bad} failed, {} skipped",
        played - bad,
        runs.len() - played
    );
    if bad == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
