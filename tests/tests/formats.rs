//! Real datasets end to end (`infermesh local`, real agents, the quickstart model): JSONL, CSV
//! and Parquet inputs, plain, gzip and Zstandard, one object, a prefix and a glob, cut into
//! random files and row groups; JSONL and Parquet outputs, the Parquet read back with an
//! independent reader (pyarrow). Every row is embedded exactly once.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use arrow_array::{ArrayRef, RecordBatch, StringArray, StructArray};
use infermesh_tests::*;
use rand::{Rng, SeedableRng};

/// `(id, text)` rows from the quickstart corpus.
fn rows(n: usize) -> Vec<(String, String)> {
    let corpus = std::fs::read_to_string(workspace().join("examples/quickstart/corpus.jsonl"))
        .expect("corpus");
    corpus
        .lines()
        .take(n)
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("json");
            (
                v["id"].as_str().expect("id").to_string(),
                v["text"].as_str().expect("text").to_string(),
            )
        })
        .collect()
}

/// Splits `rows` into `files` runs of random lengths (some may be empty).
fn split<'a, T>(rng: &mut rand::rngs::StdRng, rows: &'a [T], files: usize) -> Vec<&'a [T]> {
    let mut cuts: Vec<usize> = (0..files - 1)
        .map(|_| rng.random_range(0..=rows.len()))
        .collect();
    cuts.push(0);
    cuts.push(rows.len());
    cuts.sort_unstable();
    cuts.windows(2).map(|w| &rows[w[0]..w[1]]).collect()
}

fn compress(data: &[u8], how: u8) -> (Vec<u8>, &'static str) {
    match how {
        1 => {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(data).expect("gzip");
            (e.finish().expect("gzip"), ".gz")
        }
        2 => (zstd::encode_all(data, 3).expect("zstd"), ".zst"),
        _ => (data.to_vec(), ""),
    }
}

fn jsonl(rows: &[(String, String)]) -> Vec<u8> {
    rows.iter()
        .map(|(id, text)| serde_json::json!({"id": id, "text": text}).to_string() + "\n")
        .collect::<String>()
        .into_bytes()
}

fn csv(rows: &[(String, String)]) -> Vec<u8> {
    let mut out = String::from("id,text\n");
    for (id, text) in rows {
        out.push_str(&format!("{id},\"{}\"\n", text.replace('"', "\"\"")));
    }
    out.into_bytes()
}

/// A Parquet file of `rows` with row groups of `group` rows; the text nested in a struct
/// column `doc.body` when `nested`.
fn parquet(path: &Path, rows: &[(String, String)], group: usize, nested: bool) {
    let ids: ArrayRef = Arc::new(StringArray::from_iter_values(rows.iter().map(|r| &r.0)));
    let texts: ArrayRef = Arc::new(StringArray::from_iter_values(rows.iter().map(|r| &r.1)));
    let batch = if nested {
        let body = Arc::new(arrow_schema::Field::new(
            "body",
            arrow_schema::DataType::Utf8,
            false,
        ));
        let doc = StructArray::from(vec![(body, texts.clone())]);
        RecordBatch::try_from_iter(vec![("id", ids), ("doc", Arc::new(doc) as ArrayRef)])
    } else {
        RecordBatch::try_from_iter(vec![("id", ids), ("text", texts)])
    }
    .expect("batch");
    let props = parquet::file::properties::WriterProperties::builder()
        .set_max_row_group_size(group.max(1))
        .set_compression(parquet::basic::Compression::SNAPPY)
        .build();
    let file = std::fs::File::create(path).expect("create");
    let mut w =
        parquet::arrow::ArrowWriter::try_new(file, batch.schema(), Some(props)).expect("writer");
    w.write(&batch).expect("write");
    w.close().expect("close");
}

/// A Workload document on the `test` Mesh.
fn workload(name: &str, input: &str, output: &Path, extra: &str, text_field: &str) -> String {
    let (model, tokenizer) = minilm();
    format!(
        "---\napiVersion: infermesh.dev/v1alpha1\nkind: Workload\nmetadata: {{name: {name}, namespace: team-a}}\nspec:\n  mesh: test\n  \
         model: {{uri: \"{}\"}}\n  task:\n    textEmbedding:\n      tokenizer: \"{}\"\n      textField: {text_field}\n      maxLength: 64\n  \
         input: {{uri: \"{input}\"{extra}}}\n  output: {{uri: \"{}/\"OUTPUT_EXTRA}}\n  shardBytes: 1Ki\n  batchSize: 16\n",
        model.display(),
        tokenizer.display(),
        output.display(),
    )
}

const MESH: &str = "apiVersion: infermesh.dev/v1alpha1\nkind: Mesh\nmetadata: {name: test}\nspec:\n  nodeSelector: {}\n  \
     agent: {slots: 2, executionProviders: [cpu]}\n  leaseSeconds: 10\n  heartbeatSeconds: 1\n";

fn ids_of(lines: &[serde_json::Value]) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for l in lines {
        *out.entry(l["id"].as_str().expect("id is a string").to_string())
            .or_insert(0) += 1;
    }
    out
}

fn expect_once(what: &str, got: &BTreeMap<String, usize>, want: &BTreeSet<String>) {
    let seen: BTreeSet<String> = got.keys().cloned().collect();
    assert_eq!(
        &seen, want,
        "{what}: the ids written are not the rows of the input"
    );
    let twice: Vec<_> = got.iter().filter(|(_, n)| **n != 1).collect();
    assert!(
        twice.is_empty(),
        "{what}: rows written more than once: {twice:?}"
    );
}

/// Reads Parquet parts with pyarrow: `{id: embedding}` and the embedding column's type.
fn read_parquet_with_pyarrow(out: &Path) -> (BTreeMap<String, Vec<f64>>, String) {
    let script = r#"
import glob, json, sys
import pyarrow.parquet as pq
rows, kinds = {}, set()
for p in sorted(glob.glob(sys.argv[1] + "/part-*.parquet")):
    t = pq.read_table(p)
    kinds.add(str(t.schema.field("embedding").type))
    for i, e in zip(t.column("id").to_pylist(), t.column("embedding").to_pylist()):
        assert i not in rows, i
        rows[i] = e
print(json.dumps({"rows": rows, "kinds": sorted(kinds)}))
"#;
    let out = Command::new(python())
        .args(["-c", script])
        .arg(out)
        .output()
        .expect("python");
    assert!(
        out.status.success(),
        "pyarrow: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let rows = v["rows"]
        .as_object()
        .expect("rows")
        .iter()
        .map(|(k, e)| {
            let e = e
                .as_array()
                .expect("list")
                .iter()
                .map(|x| x.as_f64().expect("f"))
                .collect();
            (k.clone(), e)
        })
        .collect();
    (rows, v["kinds"].to_string())
}

#[test]
fn every_row_of_every_format_is_embedded_exactly_once() {
    let dir = tempfile::tempdir().expect("tmp");
    let d = dir.path();
    let seed: u64 = std::env::var("INFERMESH_FORMATS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::rng().random());
    eprintln!("seed {seed} (INFERMESH_FORMATS_SEED={seed} repeats it)");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let all = rows(150);
    let want: BTreeSet<String> = all.iter().map(|r| r.0.clone()).collect();

    // JSONL under a prefix: plain, gzip and zstd files of random sizes, and files a prefix
    // skips (`_SUCCESS`, a hidden file).
    std::fs::create_dir_all(d.join("jsonl/year=2026")).expect("dir");
    for (i, chunk) in split(&mut rng, &all, 5).iter().enumerate() {
        let (data, ext) = compress(&jsonl(chunk), rng.random_range(0..3));
        let sub = if i % 2 == 0 {
            "jsonl"
        } else {
            "jsonl/year=2026"
        };
        std::fs::write(d.join(format!("{sub}/part-{i}.jsonl{ext}")), data).expect("write");
    }
    std::fs::write(d.join("jsonl/_SUCCESS"), "{}").expect("marker");
    std::fs::write(d.join("jsonl/.part-0.crc"), "junk").expect("hidden");

    // CSV by a glob: a file beside them that the glob does not match is not read.
    std::fs::create_dir_all(d.join("csv")).expect("dir");
    for (i, chunk) in split(&mut rng, &all, 4).iter().enumerate() {
        let (data, ext) = compress(&csv(chunk), rng.random_range(0..3));
        std::fs::write(d.join(format!("csv/part-{i}.csv{ext}")), data).expect("write");
    }
    std::fs::write(d.join("csv/other.csv"), "id,text\nstray,never read\n").expect("stray");

    // Parquet: one object with random row groups (the text nested in a struct), and a
    // prefix of files with random row groups.
    parquet(&d.join("one.parquet"), &all, rng.random_range(1..=25), true);
    std::fs::create_dir_all(d.join("pq")).expect("dir");
    for (i, chunk) in split(&mut rng, &all, 4).iter().enumerate() {
        if chunk.is_empty() {
            continue;
        }
        parquet(
            &d.join(format!("pq/part-{i}.parquet")),
            chunk,
            rng.random_range(1..=40),
            false,
        );
    }

    let out = |n: &str| d.join(format!("out-{n}"));
    let mut yaml = MESH.to_string();
    let jobs: [(&str, String, &str, &str, &str); 5] = [
        (
            "jsonl-prefix",
            format!("{}/jsonl/", d.display()),
            "",
            "text",
            "",
        ),
        (
            "csv-glob",
            format!("{}/csv/part-*.csv*", d.display()),
            ", format: csv",
            "text",
            "",
        ),
        (
            "parquet-one",
            format!("{}/one.parquet", d.display()),
            ", format: parquet",
            "doc.body",
            ", format: parquet, compression: zstd",
        ),
        (
            "parquet-one-jsonl",
            format!("{}/one.parquet", d.display()),
            ", format: parquet",
            "doc.body",
            "",
        ),
        (
            "parquet-prefix",
            format!("{}/pq/", d.display()),
            ", format: parquet",
            "text",
            ", format: parquet",
        ),
    ];
    for (name, input, extra, field, output_extra) in &jobs {
        yaml.push_str(
            &workload(name, input, &out(name), extra, field).replace("OUTPUT_EXTRA", output_extra),
        );
    }
    let manifest = d.join("mesh.yaml");
    std::fs::write(&manifest, &yaml).expect("manifest");
    let run = run_local(&manifest, 2, d);
    assert_eq!(run.code, Some(0), "{}", run.text());

    expect_once(
        "jsonl-prefix",
        &ids_of(&read_parts(&out("jsonl-prefix"))),
        &want,
    );
    expect_once("csv-glob", &ids_of(&read_parts(&out("csv-glob"))), &want);
    let jsonl_of_parquet = read_parts(&out("parquet-one-jsonl"));
    expect_once("parquet-one-jsonl", &ids_of(&jsonl_of_parquet), &want);
    // The Parquet parts, read by pyarrow, hold the same ids and embeddings as the JSONL
    // output of the same input.
    let (pq_rows, kinds) = read_parquet_with_pyarrow(&out("parquet-one"));
    assert_eq!(kinds, r#"["fixed_size_list<item: float not null>[384]"]"#);
    assert_eq!(pq_rows.len(), all.len());
    for line in &jsonl_of_parquet {
        let id = line["id"].as_str().expect("id");
        let e: Vec<f64> = line["embedding"]
            .as_array()
            .expect("embedding")
            .iter()
            .map(|x| x.as_f64().expect("f"))
            .collect();
        let p = pq_rows
            .get(id)
            .unwrap_or_else(|| panic!("{id} not in the Parquet output"));
        assert_eq!(p.len(), 384);
        let worst = e
            .iter()
            .zip(p)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f64, f64::max);
        assert!(worst < 1e-6, "{id}: embeddings differ by {worst}");
    }
    let (prefix_rows, _) = read_parquet_with_pyarrow(&out("parquet-prefix"));
    assert_eq!(
        prefix_rows.keys().cloned().collect::<BTreeSet<_>>(),
        want,
        "parquet-prefix"
    );
    // The manifest lists the Parquet parts.
    let m = success_manifest(&out("parquet-one"));
    let parts = m["parts"].as_array().expect("parts");
    assert!(!parts.is_empty());
    assert!(
        parts
            .iter()
            .all(|p| p["uri"].as_str().is_some_and(|u| u.ends_with(".parquet"))),
        "{m}"
    );
    assert_eq!(m["records"], all.len());
}

/// The same formats read from an S3 server (moto), reached by the operator and the agents
/// through the standard `AWS_*` variables: a prefix of compressed JSONL, a glob of CSV, a
/// glob of Parquet.
#[test]
fn datasets_on_s3_are_read_end_to_end() {
    let moto = infermesh_tests::moto::Moto::start();
    let dir = tempfile::tempdir().expect("tmp");
    let d = dir.path();
    let mut rng = rand::rngs::StdRng::seed_from_u64(rand::rng().random());
    let all = rows(90);
    let want: BTreeSet<String> = all.iter().map(|r| r.0.clone()).collect();
    let src = d.join("bucket");
    std::fs::create_dir_all(src.join("jsonl")).expect("dir");
    std::fs::create_dir_all(src.join("csv")).expect("dir");
    std::fs::create_dir_all(src.join("pq")).expect("dir");
    for (i, chunk) in split(&mut rng, &all, 3).iter().enumerate() {
        let (data, ext) = compress(&jsonl(chunk), (i % 3) as u8);
        std::fs::write(src.join(format!("jsonl/part-{i}.jsonl{ext}")), data).expect("write");
        let (data, ext) = compress(&csv(chunk), ((i + 1) % 3) as u8);
        std::fs::write(src.join(format!("csv/part-{i}.csv{ext}")), data).expect("write");
        if !chunk.is_empty() {
            parquet(
                &src.join(format!("pq/part-{i}.parquet")),
                chunk,
                rng.random_range(1..=20),
                false,
            );
        }
    }
    std::fs::write(src.join("jsonl/_SUCCESS"), "{}").expect("marker");
    moto.upload("formats", &src);

    let out = |n: &str| d.join(format!("out-{n}"));
    let mut yaml = MESH.to_string();
    for (name, input, extra, output_extra) in [
        ("s3-jsonl", "s3://formats/jsonl/", "", ""),
        ("s3-csv", "s3://formats/csv/part-*", ", format: csv", ""),
        (
            "s3-parquet",
            "s3://formats/pq/part-*.parquet",
            ", format: parquet",
            ", format: parquet",
        ),
    ] {
        yaml.push_str(
            &workload(name, input, &out(name), extra, "text").replace("OUTPUT_EXTRA", output_extra),
        );
    }
    let manifest = d.join("mesh.yaml");
    std::fs::write(&manifest, &yaml).expect("manifest");
    let run: Run = local_command(&manifest, 2, d)
        .envs(moto.env("testing", "testing"))
        .output()
        .expect("run infermesh local")
        .into();
    assert_eq!(run.code, Some(0), "{}", run.text());
    expect_once("s3-jsonl", &ids_of(&read_parts(&out("s3-jsonl"))), &want);
    expect_once("s3-csv", &ids_of(&read_parts(&out("s3-csv"))), &want);
    let (rows, _) = read_parquet_with_pyarrow(&out("s3-parquet"));
    assert_eq!(
        rows.keys().cloned().collect::<BTreeSet<_>>(),
        want,
        "s3-parquet"
    );
}

#[test]
fn bad_datasets_fail_naming_the_file_and_disturb_nothing_else() {
    let dir = tempfile::tempdir().expect("tmp");
    let d = dir.path();
    let all = rows(40);
    // A good workload beside a gzip file that is corrupt halfway.
    std::fs::write(d.join("good.jsonl"), jsonl(&all)).expect("good");
    let (mut gz, _) = compress(&jsonl(&all), 1);
    let n = gz.len();
    gz[n / 2] ^= 0xff;
    gz.truncate(n - 6);
    std::fs::create_dir_all(d.join("bad")).expect("dir");
    std::fs::write(d.join("bad/docs.jsonl.gz"), gz).expect("bad");
    let mut yaml = MESH.to_string();
    for (name, input) in [
        ("good", format!("{}/good.jsonl", d.display())),
        ("corrupt", format!("{}/bad/", d.display())),
    ] {
        yaml.push_str(
            &workload(name, &input, &d.join(format!("out-{name}")), "", "text")
                .replace("OUTPUT_EXTRA", ""),
        );
    }
    let manifest = d.join("mesh.yaml");
    std::fs::write(&manifest, &yaml).expect("manifest");
    let run = run_local(&manifest, 1, d);
    assert_ne!(run.code, Some(0), "{}", run.text());
    let text = run.text();
    assert!(
        text.contains("bad/docs.jsonl.gz") && text.contains("corrupt gzip data"),
        "the failure names the file and what is wrong: {text}"
    );
    expect_once(
        "good",
        &ids_of(&read_parts(&d.join("out-good"))),
        &all.iter().map(|r| r.0.clone()).collect(),
    );

    // Refused before anything runs: a Parquet file without the text column, a glob that
    // matches nothing.
    parquet(&d.join("wrong.parquet"), &all, 10, true);
    for (input, extra, says) in [
        (
            format!("{}/wrong.parquet", d.display()),
            ", format: parquet",
            "wrong.parquet: has no column `text` (its columns: id, doc)",
        ),
        (
            format!("{}/nothing-*.jsonl", d.display()),
            "",
            "nothing-*.jsonl matches no file",
        ),
    ] {
        let yaml = MESH.to_string()
            + &workload("refused", &input, &d.join("out-refused"), extra, "text")
                .replace("OUTPUT_EXTRA", "");
        std::fs::write(&manifest, yaml).expect("manifest");
        let run = run_local(&manifest, 1, d);
        assert_ne!(run.code, Some(0), "{}", run.text());
        assert!(
            run.text().contains(says),
            "expected `{says}` in: {}",
            run.text()
        );
        assert!(!d.join("out-refused").exists(), "nothing was written");
    }
}
