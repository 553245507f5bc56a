//! Shared helpers of the end-to-end tests: where the binaries, the Python reference and the
//! models are, generated test models, and running `infermesh local` as a separate process.
//!
//! These tests use real parts: the `infermesh` and `infermesh-agent` binaries as separate
//! processes talking gRPC on loopback, ONNX Runtime from the pinned wheel, and models made
//! by `scripts/gen_test_models.py` (or the quickstart's MiniLM). `scripts/setup.sh` installs
//! what they need; a missing piece fails the test with the command that installs it.
#![forbid(unsafe_code)]

pub mod chaos;
pub mod cluster;
pub mod moto;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

/// The workspace root.
pub fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

fn require(path: PathBuf, what: &str) -> PathBuf {
    assert!(
        path.exists(),
        "{what} missing at {}: run `bash scripts/setup.sh` first",
        path.display()
    );
    path
}

/// A binary of the workspace, next to the test executables. `cargo test` builds a package's
/// binaries only for that package's own integration tests, so the first test that needs them
/// builds `infermesh` and `infermesh-agent` (once per test process; scripts/test.sh builds
/// them beforehand anyway).
pub fn bin(name: &str) -> PathBuf {
    static BUILT: OnceLock<Result<(), String>> = OnceLock::new();
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let path = dir.join(name);
    if !path.exists() {
        let built = BUILT.get_or_init(|| {
            let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
            let profile = dir.file_name().and_then(|p| p.to_str()).unwrap_or("debug");
            let mut cmd = Command::new(cargo);
            cmd.current_dir(workspace()).args([
                "build",
                "-p",
                "infermesh-operator",
                "-p",
                "infermesh-agent",
                "--bins",
            ]);
            if profile == "release" {
                cmd.arg("--release");
            }
            let out = cmd.output().map_err(|e| e.to_string())?;
            if out.status.success() {
                Ok(())
            } else {
                Err(String::from_utf8_lossy(&out.stderr).into_owned())
            }
        });
        if let Err(e) = built {
            panic!("building the binaries for the end-to-end tests failed:\n{e}");
        }
    }
    require(
        path,
        &format!("binary {name} (cargo build --workspace --bins)"),
    )
}

/// The Python of the set-up venv (onnxruntime, tokenizers, onnx, numpy).
pub fn python() -> PathBuf {
    require(
        infermesh_io::infermesh_home().join("venv/bin/python"),
        "the Python venv",
    )
}

/// The quickstart model and tokenizer (all-MiniLM-L6-v2 int8).
pub fn minilm() -> (PathBuf, PathBuf) {
    let dir = infermesh_io::infermesh_home().join("models/minilm");
    (
        require(dir.join("model.onnx"), "the MiniLM model"),
        require(dir.join("tokenizer.json"), "the MiniLM tokenizer"),
    )
}

/// Small models generated once per test process by `scripts/gen_test_models.py`:
/// tensor.onnx, tiny_embed.onnx, tiny_tokenizer.json, corrupt.onnx, bad_tokenizer.json.
pub fn test_models() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir =
            std::env::temp_dir().join(format!("infermesh-test-models-{}", std::process::id()));
        let out = Command::new(python())
            .arg(workspace().join("scripts/gen_test_models.py"))
            .arg("--out")
            .arg(&dir)
            .output()
            .expect("run gen_test_models.py");
        assert!(
            out.status.success(),
            "gen_test_models.py failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        dir
    })
}

/// sha256 of a file, hex.
pub fn sha256_file(path: &Path) -> String {
    let out = Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("sha256sum");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// What a run printed.
#[derive(Debug)]
pub struct Run {
    /// Exit code (`None`: killed by a signal).
    pub code: Option<i32>,
    /// Standard output (the summary).
    pub stdout: String,
    /// Standard error (errors, agent exits).
    pub stderr: String,
}

impl From<Output> for Run {
    fn from(o: Output) -> Self {
        Self {
            code: o.status.code(),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
}

impl Run {
    /// stdout and stderr together, for messages.
    pub fn text(&self) -> String {
        format!("--- stdout\n{}\n--- stderr\n{}", self.stdout, self.stderr)
    }
}

/// The `infermesh local` command for a manifest, with agent logs and caches in `dir`
/// (the caller adds `--database-url`).
pub fn local_command(manifest: &Path, agents: usize, dir: &Path) -> Command {
    let mut cmd = Command::new(bin("infermesh"));
    cmd.arg("local")
        .arg("-f")
        .arg(manifest)
        .arg("--agents")
        .arg(agents.to_string())
        .arg("--no-progress")
        .arg("--timeout")
        .arg("300")
        .arg("--work-dir")
        .arg(dir.join("work"))
        .env("INFERMESH_AGENT_BIN", bin("infermesh-agent"));
    cmd
}

/// Starts `infermesh local` on `manifest` waiting for `agents` external agents (an
/// `infermesh-swarm`), with a SQLite store and the agents' credentials under `dir`. Returns
/// the process (stdout and stderr piped), the credentials file and the store URL.
pub fn spawn_local_for_swarm(
    manifest: &Path,
    dir: &Path,
    agents: usize,
) -> (std::process::Child, PathBuf, String) {
    let creds = dir.join("creds.json");
    let url = format!("sqlite://{}", dir.join("store.db").display());
    let local = local_command(manifest, 0, dir)
        .args(["--external-agents", &agents.to_string(), "--credentials"])
        .arg(&creds)
        .args(["--listen", "127.0.0.1:0", "--database-url", &url])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn infermesh local");
    (local, creds, url)
}

/// Runs `infermesh-swarm` with `args` against an operator from [`spawn_local_for_swarm`] (its
/// pid given, for the operator's CPU and memory), then waits for the operator. Both must exit
/// 0; returns the swarm's run and the operator's.
pub fn run_swarm_against(local: std::process::Child, creds: &Path, args: &[&str]) -> (Run, Run) {
    let swarm: Run = std::process::Command::new(bin("infermesh-swarm"))
        .arg("--credentials")
        .arg(creds)
        .args(args)
        .args(["--operator-pid", &local.id().to_string()])
        .output()
        .expect("run infermesh-swarm")
        .into();
    let local: Run = local.wait_with_output().expect("wait").into();
    assert_eq!(local.code, Some(0), "{}", local.text());
    assert_eq!(swarm.code, Some(0), "{}", swarm.text());
    (swarm, local)
}

/// Runs `infermesh local` to the end on the store `url`.
pub fn run_local_on(manifest: &Path, agents: usize, dir: &Path, url: &str) -> Run {
    local_command(manifest, agents, dir)
        .args(["--database-url", url])
        .output()
        .expect("run infermesh local")
        .into()
}

/// Runs `infermesh local` to the end.
pub fn run_local(manifest: &Path, agents: usize, dir: &Path) -> Run {
    local_command(manifest, agents, dir)
        .output()
        .expect("run infermesh local")
        .into()
}

/// Runs `infermesh ledger --database-url URL ARGS…`.
pub fn ledger(url: &str, args: &[&str]) -> Run {
    Command::new(bin("infermesh"))
        .args(["ledger", "--database-url", url])
        .args(args)
        .output()
        .expect("run infermesh ledger")
        .into()
}

/// A MiniLM embedding job over the first `n` quickstart texts, written to `dir/mesh.yaml`
/// (outputs in `dir/out`). Returns the manifest path, the input and the output directory.
pub fn minilm_job(
    dir: &Path,
    n: usize,
    max_length: u32,
    extra: &str,
) -> (PathBuf, PathBuf, PathBuf) {
    let (model, tokenizer) = minilm();
    let corpus = std::fs::read_to_string(workspace().join("examples/quickstart/corpus.jsonl"))
        .expect("corpus");
    let input = dir.join("texts.jsonl");
    std::fs::write(
        &input,
        corpus.lines().take(n).collect::<Vec<_>>().join("\n") + "\n",
    )
    .expect("input");
    let out = dir.join("out");
    let task = format!(
        "    textEmbedding:\n      tokenizer: \"{}\"\n      textField: text\n      maxLength: {max_length}\n      normalize: true",
        tokenizer.display()
    );
    let yaml = manifest(
        &model,
        Some(&sha256_file(&model)),
        &task,
        &input,
        &out,
        extra,
    );
    let path = dir.join("mesh.yaml");
    std::fs::write(&path, yaml).expect("manifest");
    (path, input, out)
}

/// A tensor job over `n` generated records (`{"id": i, "x": [4 floats]}`) on the generated
/// tensor model, written to `dir/mesh.yaml` (outputs in `dir/out`). Returns the manifest
/// path, the input and the output directory.
pub fn tensor_job(dir: &Path, n: usize, extra: &str) -> (PathBuf, PathBuf, PathBuf) {
    let input = dir.join("in.jsonl");
    let mut text = String::new();
    for i in 0..n {
        let x = [i as f32 / 100.0, 1.0, -((i % 7) as f32), 0.5];
        text.push_str(&serde_json::json!({"id": i, "x": x}).to_string());
        text.push('\n');
    }
    std::fs::write(&input, &text).expect("input");
    let out = dir.join("out");
    let model = test_models().join("tensor.onnx");
    let task = "    tensor:\n      inputs: [{name: x}]\n      outputs: [y, s]";
    let yaml = manifest(
        &model,
        Some(&sha256_file(&model)),
        task,
        &input,
        &out,
        extra,
    );
    let path = dir.join("mesh.yaml");
    std::fs::write(&path, yaml).expect("manifest");
    (path, input, out)
}

/// A Mesh and a Workload as YAML. `task` and `extra` are indented spec lines.
pub fn manifest(
    model: &Path,
    sha256: Option<&str>,
    task: &str,
    input: &Path,
    output: &Path,
    extra: &str,
) -> String {
    let sha = sha256
        .map(|s| format!(", sha256: \"{s}\""))
        .unwrap_or_default();
    format!(
        "apiVersion: infermesh.dev/v1alpha1\nkind: Mesh\nmetadata: {{name: test}}\nspec:\n  nodeSelector: {{}}\n  \
         agent: {{slots: 1, executionProviders: [cpu]}}\n  leaseSeconds: 10\n  heartbeatSeconds: 1\n  \
         pricing: {{perCpuSecond: 0.05, perThousandRecords: 0.2}}\n---\n\
         apiVersion: infermesh.dev/v1alpha1\nkind: Workload\nmetadata: {{name: job, namespace: team-a}}\nspec:\n  mesh: test\n  \
         model: {{uri: \"{}\"{sha}}}\n  task:\n{task}\n  input: {{uri: \"{}\"}}\n  output: {{uri: \"{}/\"}}\n  batchSize: 16\n{extra}",
        model.display(),
        input.display(),
        output.display()
    )
}

/// Every output line of every part in `dir`, parsed.
pub fn read_parts(dir: &Path) -> Vec<serde_json::Value> {
    let mut parts: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("output dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("part-"))
        })
        .collect();
    parts.sort();
    parts
        .iter()
        .flat_map(|p| {
            std::fs::read_to_string(p)
                .expect("part")
                .lines()
                .map(|l| serde_json::from_str(l).expect("output line is JSON"))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// How often each id appears in the outputs.
pub fn id_counts(lines: &[serde_json::Value]) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for l in lines {
        *counts.entry(l["id"].to_string()).or_insert(0) += 1;
    }
    counts
}

/// The `_SUCCESS.json` manifest of an output directory.
pub fn success_manifest(dir: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(dir.join("_SUCCESS.json")).expect("_SUCCESS.json");
    serde_json::from_str(&text).expect("manifest JSON")
}

/// Processes whose parent is `pid` and whose command name is `name`.
pub fn children_named(pid: u32, name: &str) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| {
            let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
            // pid (comm) state ppid ...
            let Some((comm_part, rest)) = stat.rsplit_once(") ") else {
                return false;
            };
            let comm = comm_part
                .split_once(" (")
                .map(|(_, c)| c)
                .unwrap_or_default();
            let ppid = rest
                .split_whitespace()
                .nth(1)
                .and_then(|v| v.parse::<u32>().ok());
            ppid == Some(pid) && name.starts_with(comm)
        })
        .collect()
}
