//! `infermesh-direct-bench`: the baseline the mesh is measured against — the best direct loop
//! over ONNX Runtime in one process, doing the same work per record as an agent does (parse the
//! JSON line, tokenize, sort by token count, batch, run, mean-pool, normalise, serialize an
//! output JSON line), but over the whole corpus at once, with one session, no gRPC, no shard
//! planning and no output files.
//!
//! The session is loaded once and one warm-up batch runs before timing starts; then `--repeat`
//! full passes are timed and the best and median throughput printed.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use anyhow::{Context, bail};
use clap::Parser;
use infermesh_agent::inference::embedding::Embedder;
use infermesh_agent::inference::runtime::{SessionConfig, init, load_session};
use infermesh_agent::inference::{BatchControl, Origin, parse_records};
use infermesh_agent::io::shard::records;
use infermesh_agent::metrics::AgentMetrics;
use ort::session::Session;
use serde_json::{Map, Value};

/// Times a direct ONNX Runtime text-embedding loop over a JSONL corpus.
#[derive(Parser, Debug)]
#[command(name = "infermesh-direct-bench", version)]
struct Args {
    /// The ONNX model.
    #[arg(long)]
    model: PathBuf,
    /// The tokenizer.json.
    #[arg(long)]
    tokenizer: PathBuf,
    /// JSONL input, one object per line.
    #[arg(long)]
    input: PathBuf,
    /// Records per ONNX Runtime run.
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// ONNX Runtime intra-op threads of the one session; default: all cores.
    #[arg(long)]
    threads: Option<usize>,
    /// Tokens kept per text.
    #[arg(long, default_value_t = 256)]
    max_length: usize,
    /// Timed passes over the whole corpus.
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// The record field holding the text.
    #[arg(long, default_value = "text")]
    text_field: String,
    /// The record field copied to each output line.
    #[arg(long, default_value = "id")]
    id_field: String,
    /// Path of libonnxruntime.so; default: ORT_DYLIB_PATH, then <infermesh home>/lib.
    #[arg(long, env = "INFERMESH_ORT_LIBRARY")]
    ort_library: Option<PathBuf>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("infermesh-direct-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Seconds one pass spent in each step.
#[derive(Clone, Copy, Debug, Default)]
struct Phases {
    parse: f64,
    tokenize: f64,
    embed: f64,
    serialize: f64,
}

/// What one pass did: records, serialized output bytes (kept so the work cannot be optimised
/// away), and where the time went.
struct PassResult {
    records: usize,
    bytes: usize,
    phases: Phases,
}

/// One pass: what an agent does to a shard's bytes, over the whole corpus.
fn pass(
    embedder: &Embedder,
    session: &mut Session,
    origin: &Origin<'_>,
    data: &[u8],
    batch: usize,
    id_field: &str,
    cancel: &AtomicBool,
) -> anyhow::Result<PassResult> {
    let mut t = Instant::now();
    let mut lap = || {
        let now = Instant::now();
        let secs = now.duration_since(t).as_secs_f64();
        t = now;
        secs
    };
    let parsed = parse_records(origin, records(0, data))?;
    let parse = lap();
    let encodings = embedder.encode(origin, &parsed)?;
    let tokenize = lap();
    // Batches are counted as the agent counts them, so the comparison includes that cost.
    let metrics = AgentMetrics::new();
    let control = BatchControl {
        size: batch,
        cancel,
        metrics: &metrics,
    };
    let vectors = embedder.embed(session, &encodings, &control)?;
    let embed = lap();
    let mut out = Vec::with_capacity(parsed.len() * 64);
    for (rec, v) in parsed.iter().zip(vectors) {
        let mut line = Map::new();
        if let Some(id) = rec.fields.get(id_field) {
            line.insert(id_field.to_string(), id.clone());
        }
        line.insert("embedding".to_string(), Value::from(v));
        serde_json::to_writer(&mut out, &line)?;
        out.push(b'\n');
    }
    let serialize = lap();
    Ok(PassResult {
        records: parsed.len(),
        bytes: out.len(),
        phases: Phases {
            parse,
            tokenize,
            embed,
            serialize,
        },
    })
}

fn median(sorted: &[f64]) -> f64 {
    match sorted.len() {
        0 => 0.0,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

fn read(path: &Path, what: &str) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("reading {what} {}", path.display()))
}

fn run(args: &Args) -> anyhow::Result<()> {
    if args.repeat == 0 {
        bail!("--repeat must be at least 1");
    }
    let batch = args.batch_size.max(1);
    let threads = args
        .threads
        .unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        })
        .max(1);

    // Untimed set-up: ONNX Runtime, the session, the tokenizer, the input bytes.
    init(args.ort_library.as_deref()).map_err(anyhow::Error::msg)?;
    let config = SessionConfig {
        intra_op_threads: threads,
        providers: vec!["cpu".to_string()],
        require_gpu: false,
    };
    let mut session = load_session(&args.model, &config)
        .map_err(|e| anyhow::anyhow!("model {} does not load: {e}", args.model.display()))?;
    let tokenizer_json = read(&args.tokenizer, "tokenizer")?;
    let tokenizer_uri = args.tokenizer.display().to_string();
    let embedder = Embedder::new(
        &tokenizer_json,
        &tokenizer_uri,
        &args.text_field,
        args.max_length.max(1),
        true,
        None,
    )?;
    let data = read(&args.input, "input")?;
    let input_uri = args.input.display().to_string();
    let origin = Origin {
        uri: &input_uri,
        shard: 0,
        lines_before: Some(0),
        parts: &[],
    };
    let cancel = AtomicBool::new(false);

    // Untimed warm-up: one batch of the first records.
    let first: Vec<u8> = data
        .split_inclusive(|&b| b == b'\n')
        .take(batch)
        .flatten()
        .copied()
        .collect();
    pass(
        &embedder,
        &mut session,
        &origin,
        &first,
        batch,
        &args.id_field,
        &cancel,
    )?;

    let mut rates = Vec::with_capacity(args.repeat);
    let mut n_records = 0;
    let mut passes = Vec::with_capacity(args.repeat);
    for i in 0..args.repeat {
        let t = Instant::now();
        let r = pass(
            &embedder,
            &mut session,
            &origin,
            &data,
            batch,
            &args.id_field,
            &cancel,
        )?;
        let secs = t.elapsed().as_secs_f64().max(1e-9);
        let n = r.records;
        n_records = n;
        rates.push(n as f64 / secs);
        let p = r.phases;
        if !args.json {
            println!(
                "pass {}: {n} records in {secs:.2}s ({:.1} records/s, {} output bytes; \
                 parse {:.2}s, tokenize {:.2}s, inference+pooling {:.2}s, serialize {:.2}s)",
                i + 1,
                n as f64 / secs,
                r.bytes,
                p.parse,
                p.tokenize,
                p.embed,
                p.serialize
            );
        }
        passes.push(serde_json::json!({
            "seconds": secs,
            "parse_s": p.parse,
            "tokenize_s": p.tokenize,
            "embed_s": p.embed,
            "serialize_s": p.serialize,
        }));
    }
    rates.sort_by(f64::total_cmp);
    let best = rates.last().copied().unwrap_or(0.0);
    let med = median(&rates);
    if args.json {
        let obj = serde_json::json!({
            "records": n_records,
            "best_rps": best,
            "median_rps": med,
            "threads": threads,
            "batch": batch,
            "repeat": args.repeat,
            "passes": passes,
        });
        println!("{obj}");
    } else {
        println!(
            "direct: {n_records} records, batch {batch}, {threads} thread(s): best {best:.1} records/s, median {med:.1} records/s over {} pass(es)",
            args.repeat
        );
    }
    Ok(())
}
