//! Bad input gets a clear message naming the problem and a non-zero exit; nothing panics.

use std::path::Path;

use infermesh_tests::*;

struct Case {
    dir: tempfile::TempDir,
}

impl Case {
    fn new() -> Self {
        Self {
            dir: tempfile::tempdir().expect("tmp"),
        }
    }

    fn path(&self, name: &str) -> std::path::PathBuf {
        self.dir.path().join(name)
    }

    /// Writes `n` text records, replacing line `bad` (1-based) with `bad_text`.
    fn texts(&self, n: usize, bad: Option<(usize, &str)>) -> std::path::PathBuf {
        let mut text = String::new();
        for i in 1..=n {
            match bad {
                Some((line, t)) if line == i => text.push_str(t),
                _ => text.push_str(
                    &serde_json::json!({"id": i, "text": format!("the cat sat on mat {i}")})
                        .to_string(),
                ),
            }
            text.push('\n');
        }
        let p = self.path("texts.jsonl");
        std::fs::write(&p, text).expect("input");
        p
    }

    fn embed_manifest(
        &self,
        model: &Path,
        sha: Option<&str>,
        tokenizer: &Path,
        input: &Path,
    ) -> std::path::PathBuf {
        let task = format!(
            "    textEmbedding:\n      tokenizer: \"{}\"\n      maxLength: 32",
            tokenizer.display()
        );
        let yaml = manifest(
            model,
            sha,
            &task,
            input,
            &self.path("out"),
            "  maxAttempts: 2\n",
        );
        self.write("mesh.yaml", &yaml)
    }

    fn write(&self, name: &str, text: &str) -> std::path::PathBuf {
        let p = self.path(name);
        std::fs::write(&p, text).expect("write");
        p
    }

    fn run(&self, manifest: &Path) -> Run {
        let run = run_local(manifest, 1, self.dir.path());
        assert!(
            !run.stderr.contains("panicked") && !run.stdout.contains("panicked"),
            "{}",
            run.text()
        );
        for log in walk(&self.path("work")) {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            assert!(
                !text.contains("panicked"),
                "agent log {} shows a panic:\n{text}",
                log.display()
            );
        }
        run
    }
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .flat_map(|p| {
            if p.is_dir() {
                walk(&p)
            } else if p.extension().is_some_and(|e| e == "log") {
                vec![p]
            } else {
                vec![]
            }
        })
        .collect()
}

fn tiny() -> (std::path::PathBuf, std::path::PathBuf) {
    let m = test_models();
    (m.join("tiny_embed.onnx"), m.join("tiny_tokenizer.json"))
}

#[test]
fn the_tiny_model_runs_so_the_failures_below_are_about_their_input() {
    let c = Case::new();
    let (model, tok) = tiny();
    let input = c.texts(20, None);
    let run = c.run(&c.embed_manifest(&model, None, &tok, &input));
    assert_eq!(run.code, Some(0), "{}", run.text());
    assert_eq!(read_parts(&c.path("out")).len(), 20);
}

#[test]
fn a_manifest_with_an_unknown_field_is_refused_with_its_name() {
    let c = Case::new();
    let (model, tok) = tiny();
    let input = c.texts(5, None);
    let yaml = std::fs::read_to_string(c.embed_manifest(&model, None, &tok, &input)).expect("yaml");
    let bad = c.write(
        "bad.yaml",
        &yaml.replace("  batchSize: 16", "  batchSize: 16\n  modle: oops"),
    );
    let run = c.run(&bad);
    assert_eq!(run.code, Some(2), "{}", run.text());
    assert!(
        run.stderr.contains("unknown field spec.modle"),
        "{}",
        run.text()
    );
    assert!(run.stderr.contains("Workload job"), "{}", run.text());
}

#[test]
fn a_manifest_without_a_model_is_refused() {
    let c = Case::new();
    let (model, tok) = tiny();
    let input = c.texts(5, None);
    let yaml = std::fs::read_to_string(c.embed_manifest(&model, None, &tok, &input)).expect("yaml");
    let without: String = yaml
        .lines()
        .filter(|l| !l.trim_start().starts_with("model:"))
        .map(|l| format!("{l}\n"))
        .collect();
    let run = c.run(&c.write("bad.yaml", &without));
    assert_eq!(run.code, Some(2), "{}", run.text());
    assert!(
        run.stderr.contains("missing field `model`"),
        "{}",
        run.text()
    );
}

#[test]
fn a_missing_model_file_is_model_not_found() {
    let c = Case::new();
    let (_, tok) = tiny();
    let input = c.texts(5, None);
    let run = c.run(&c.embed_manifest(&c.path("nope.onnx"), None, &tok, &input));
    assert_eq!(run.code, Some(2), "{}", run.text());
    assert!(
        run.stderr.contains("ModelNotFound") && run.stderr.contains("nope.onnx"),
        "{}",
        run.text()
    );
}

#[test]
fn a_corrupt_model_fails_the_workload_with_model_load_failed() {
    let c = Case::new();
    let (_, tok) = tiny();
    let input = c.texts(5, None);
    let run = c.run(&c.embed_manifest(&test_models().join("corrupt.onnx"), None, &tok, &input));
    assert_eq!(run.code, Some(1), "{}", run.text());
    assert!(
        run.stdout.contains("ModelLoadFailed") && run.stdout.contains("does not load"),
        "{}",
        run.text()
    );
}

#[test]
fn a_model_with_the_wrong_sha256_is_refused() {
    let c = Case::new();
    let (model, tok) = tiny();
    let input = c.texts(5, None);
    let wrong = "0".repeat(64);
    let run = c.run(&c.embed_manifest(&model, Some(&wrong), &tok, &input));
    assert_eq!(run.code, Some(1), "{}", run.text());
    assert!(run.stdout.contains("ModelLoadFailed"), "{}", run.text());
    assert!(
        run.stdout.contains(&format!("expects {wrong}")),
        "{}",
        run.text()
    );
}

#[test]
fn a_tokenizer_that_does_not_load_fails_the_workload() {
    let c = Case::new();
    let (model, _) = tiny();
    let input = c.texts(5, None);
    let run = c.run(&c.embed_manifest(
        &model,
        None,
        &test_models().join("bad_tokenizer.json"),
        &input,
    ));
    assert_eq!(run.code, Some(1), "{}", run.text());
    assert!(
        run.stdout.contains("TokenizerLoadFailed") && run.stdout.contains("does not load"),
        "{}",
        run.text()
    );
}

#[test]
fn an_input_line_that_is_not_json_fails_the_shard_with_its_line_number() {
    let c = Case::new();
    let (model, tok) = tiny();
    let input = c.texts(12, Some((7, "this is not json")));
    let run = c.run(&c.embed_manifest(&model, None, &tok, &input));
    assert_eq!(run.code, Some(1), "{}", run.text());
    assert!(run.stdout.contains("InvalidInput"), "{}", run.text());
    assert!(
        run.stdout.contains("line 7") && run.stdout.contains("not valid JSON"),
        "{}",
        run.text()
    );
}

#[test]
fn an_input_line_without_the_text_field_names_line_and_field() {
    let c = Case::new();
    let (model, tok) = tiny();
    let input = c.texts(9, Some((4, r#"{"id": 4, "body": "no text here"}"#)));
    let run = c.run(&c.embed_manifest(&model, None, &tok, &input));
    assert_eq!(run.code, Some(1), "{}", run.text());
    assert!(
        run.stdout.contains("line 4") && run.stdout.contains("has no `text` field"),
        "{}",
        run.text()
    );
}
