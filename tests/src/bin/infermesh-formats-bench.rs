//! What the input and output formats cost: the same texts embedded by `infermesh local` (the
//! quickstart model, 2 agents) from JSONL, CSV and Parquet, as one file and as 100 files,
//! written as JSONL and as Parquet; and how long planning takes for 10,000 files. Prints one
//! JSON object (and a table on stderr); `scripts/bench-formats.sh` runs it on a release build
//! and writes the figures into `docs/benchmarks.md`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use arrow_array::{ArrayRef, RecordBatch, StringArray};
use clap::Parser;
use infermesh_io::dataset::{self, Format, Want};
use infermesh_tests::{minilm, workspace};

#[derive(Parser)]
struct Args {
    /// Texts embedded per run (from the quickstart corpus, repeated past its 4,000).
    #[arg(long, default_value_t = 2000)]
    texts: usize,
    /// Runs of each variant (the best is kept).
    #[arg(long, default_value_t = 2)]
    repeat: usize,
    /// Files of the planning measurement.
    #[arg(long, default_value_t = 10_000)]
    plan_files: usize,
}

fn texts(n: usize) -> Vec<(String, String)> {
    let corpus = std::fs::read_to_string(workspace().join("examples/quickstart/corpus.jsonl"))
        .expect("corpus");
    let all: Vec<String> = corpus
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("json");
            v["text"].as_str().unwrap_or_default().to_string()
        })
        .collect();
    (0..n)
        .map(|i| (format!("doc-{i:06}"), all[i % all.len()].clone()))
        .collect()
}

fn write_as(format: &str, path: &Path, rows: &[(String, String)]) {
    match format {
        "jsonl" => {
            let text: String = rows
                .iter()
                .map(|(id, t)| serde_json::json!({"id": id, "text": t}).to_string() + "\n")
                .collect();
            std::fs::write(path, text).expect("write");
        }
        "csv" => {
            let mut text = String::from("id,text\n");
            for (id, t) in rows {
                text.push_str(&format!("{id},\"{}\"\n", t.replace('"', "\"\"")));
            }
            std::fs::write(path, text).expect("write");
        }
        _ => {
            let ids: ArrayRef = Arc::new(StringArray::from_iter_values(rows.iter().map(|r| &r.0)));
            let ts: ArrayRef = Arc::new(StringArray::from_iter_values(rows.iter().map(|r| &r.1)));
            let batch = RecordBatch::try_from_iter(vec![("id", ids), ("text", ts)]).expect("batch");
            let props = parquet::file::properties::WriterProperties::builder()
                .set_max_row_group_size(100)
                .set_compression(parquet::basic::Compression::SNAPPY)
                .build();
            let file = std::fs::File::create(path).expect("create");
            let mut w = parquet::arrow::ArrowWriter::try_new(file, batch.schema(), Some(props))
                .expect("writer");
            w.write(&batch).expect("write");
            w.close().expect("close");
        }
    }
}

/// Writes `rows` as `files` files of `format` under `dir`; returns the input URI.
fn dataset_of(dir: &Path, format: &str, files: usize, rows: &[(String, String)]) -> String {
    let d = dir.join(format!("{format}-{files}"));
    std::fs::create_dir_all(&d).expect("dir");
    let per = rows.len().div_ceil(files);
    for (i, chunk) in rows.chunks(per).enumerate() {
        write_as(format, &d.join(format!("part-{i:05}.{format}")), chunk);
    }
    if files == 1 {
        format!("{}/part-00000.{format}", d.display())
    } else {
        format!("{}/", d.display())
    }
}

fn target_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("exe");
    exe.parent().expect("dir").join(name)
}

/// Seconds `infermesh local` takes to embed the input.
fn run(dir: &Path, input: &str, in_format: &str, out_format: &str, tag: &str) -> f64 {
    let (model, tokenizer) = minilm();
    let out = dir.join(format!("out-{tag}"));
    let _ = std::fs::remove_dir_all(&out);
    let yaml = format!(
        "apiVersion: infermesh.dev/v1alpha1\nkind: Mesh\nmetadata: {{name: bench}}\nspec:\n  nodeSelector: {{}}\n  \
         agent: {{slots: 1, executionProviders: [cpu]}}\n---\napiVersion: infermesh.dev/v1alpha1\nkind: Workload\n\
         metadata: {{name: {tag}, namespace: bench}}\nspec:\n  mesh: bench\n  model: {{uri: \"{}\"}}\n  task:\n    textEmbedding:\n      \
         tokenizer: \"{}\"\n      maxLength: 128\n  input: {{uri: \"{input}\", format: {in_format}}}\n  \
         output: {{uri: \"{}/\", format: {out_format}}}\n  shardBytes: 64Ki\n  batchSize: 32\n",
        model.display(),
        tokenizer.display(),
        out.display()
    );
    let manifest = dir.join(format!("{tag}.yaml"));
    std::fs::write(&manifest, yaml).expect("manifest");
    let started = Instant::now();
    let done = Command::new(target_bin("infermesh"))
        .args(["local", "-f"])
        .arg(&manifest)
        .args(["--agents", "2", "--no-progress", "--work-dir"])
        .arg(dir.join(format!("work-{tag}")))
        .env("INFERMESH_AGENT_BIN", target_bin("infermesh-agent"))
        .output()
        .expect("infermesh local");
    let secs = started.elapsed().as_secs_f64();
    assert!(
        done.status.success(),
        "{tag}: {}{}",
        String::from_utf8_lossy(&done.stdout),
        String::from_utf8_lossy(&done.stderr)
    );
    secs
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let dir = tempfile::tempdir().expect("tmp");
    let rows = texts(args.texts);
    let mut results = Vec::new();
    let variants = [
        ("jsonl", 1, "jsonl"),
        ("jsonl", 1, "parquet"),
        ("csv", 1, "jsonl"),
        ("parquet", 1, "jsonl"),
        ("parquet", 1, "parquet"),
        ("jsonl", 100, "jsonl"),
        ("csv", 100, "jsonl"),
        ("parquet", 100, "jsonl"),
        ("parquet", 100, "parquet"),
    ];
    // A warm-up run: the model and the tokenizer into the page cache and the agents' cache.
    let warm = dataset_of(dir.path(), "jsonl", 1, &rows);
    run(dir.path(), &warm, "jsonl", "jsonl", "warm-up");
    let mut baseline = None;
    for (format, files, out) in variants {
        let input = dataset_of(dir.path(), format, files, &rows);
        let tag = format!("{format}-{files}-to-{out}");
        let best = (0..args.repeat.max(1))
            .map(|_| run(dir.path(), &input, format, out, &tag))
            .fold(f64::INFINITY, f64::min);
        let rate = args.texts as f64 / best;
        let base = *baseline.get_or_insert(rate);
        eprintln!(
            "{tag:<28} {best:7.2} s  {rate:8.1} texts/s  {:+6.1} % vs JSONL -> JSONL",
            (rate / base - 1.0) * 100.0
        );
        results.push(serde_json::json!({
            "input": format, "files": files, "output": out, "seconds": best,
            "textsPerSecond": rate, "vsJsonl": rate / base,
        }));
    }

    // Planning: 10,000 small files of each format, resolved (listed, footers read) and cut.
    let mut planning = Vec::new();
    for format in ["jsonl", "parquet"] {
        let d = dir.path().join(format!("plan-{format}"));
        std::fs::create_dir_all(&d).expect("dir");
        for i in 0..args.plan_files {
            write_as(
                format,
                &d.join(format!("part-{i:05}.{format}")),
                &rows[i % rows.len()..][..1],
            );
        }
        let want = Want {
            format: if format == "jsonl" {
                Format::Jsonl
            } else {
                Format::Parquet
            },
            compression: None,
            columns: vec!["text".into()],
            confine: None,
        };
        let started = Instant::now();
        let ds = dataset::resolve(&format!("{}/", d.display()), &want)
            .await
            .expect("resolve");
        let resolved = started.elapsed().as_secs_f64();
        let shards = infermesh_operator::core::planner::plan_dataset(&ds, 1 << 20, 8).len();
        let total = started.elapsed().as_secs_f64();
        eprintln!(
            "planning {} {format} files: resolved in {resolved:.2} s, {shards} shards in {total:.2} s",
            ds.files.len()
        );
        planning.push(serde_json::json!({
            "format": format, "files": ds.files.len(), "resolveSeconds": resolved,
            "planSeconds": total, "shards": shards,
        }));
    }
    println!(
        "{}",
        serde_json::json!({"texts": args.texts, "runs": results, "planning": planning})
    );
}
