//! End to end on the real quickstart model: the mesh's embeddings match embeddings computed
//! independently by Python onnxruntime + tokenizers, one text at a time without padding.

use std::collections::HashMap;
use std::process::Command;

use infermesh_tests::*;

#[test]
fn mesh_embeddings_match_python_onnxruntime() {
    let (model, tokenizer) = minilm();
    let dir = tempfile::tempdir().expect("tmp");
    // The first 400 quickstart texts: short and long ones, several shards.
    let (manifest_path, input, out) = minilm_job(dir.path(), 400, 256, "  shardBytes: 16Ki\n");

    let run = run_local(&manifest_path, 2, dir.path());
    assert_eq!(run.code, Some(0), "{}", run.text());

    let reference = dir.path().join("reference.jsonl");
    let py = Command::new(python())
        .arg(workspace().join("scripts/reference_embeddings.py"))
        .args([
            "--model".as_ref(),
            model.as_os_str(),
            "--tokenizer".as_ref(),
            tokenizer.as_os_str(),
        ])
        .args([
            "--input".as_ref(),
            input.as_os_str(),
            "--output".as_ref(),
            reference.as_os_str(),
        ])
        .args(["--max-length", "256"])
        .output()
        .expect("run reference_embeddings.py");
    assert!(
        py.status.success(),
        "reference failed: {}",
        String::from_utf8_lossy(&py.stderr)
    );
    let want: HashMap<String, Vec<f64>> = std::fs::read_to_string(&reference)
        .expect("reference")
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("json");
            let e = v["embedding"]
                .as_array()
                .expect("embedding")
                .iter()
                .map(|x| x.as_f64().unwrap_or(f64::NAN))
                .collect();
            (v["id"].to_string(), e)
        })
        .collect();

    let got = read_parts(&out);
    assert_eq!(got.len(), 400);
    assert_eq!(want.len(), 400);
    let mut worst = 1.0f64;
    for line in &got {
        let id = line["id"].to_string();
        let e: Vec<f64> = line["embedding"]
            .as_array()
            .expect("embedding")
            .iter()
            .map(|x| x.as_f64().unwrap_or(f64::NAN))
            .collect();
        let r = want
            .get(&id)
            .unwrap_or_else(|| panic!("no reference for {id}"));
        assert_eq!(e.len(), 384);
        let dot: f64 = e.iter().zip(r).map(|(a, b)| a * b).sum();
        let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
        let cos = dot / (norm(&e) * norm(r));
        worst = worst.min(cos);
        assert!(cos >= 0.999, "record {id}: cosine {cos} < 0.999");
    }
    eprintln!("worst cosine over 400 records: {worst:.6}");
}
