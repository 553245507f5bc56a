//! Helpers for runs against the real control plane of `scripts/controlplane.sh` (etcd,
//! kube-apiserver, kube-controller-manager, kube-scheduler and kwok): kwok Nodes, the chart
//! installed with the real Helm library, local processes that play pods, and polling with
//! `kubectl`. Shared by the control-plane test and `infermesh-cluster-bench`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use infermesh_deploy::controlplane::ControlPlane;
use serde_json::Value;

use crate::python;

/// Polls `probe` every 250 ms until it answers `Ok`; panics with its last answer after
/// `timeout`.
pub fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut probe: impl FnMut() -> Result<T, String>,
) -> T {
    let t0 = Instant::now();
    let mut last = String::new();
    while t0.elapsed() < timeout {
        match probe() {
            Ok(v) => return v,
            Err(e) => last = e,
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    panic!("timed out after {timeout:?} waiting for {what}: {last}");
}

/// `kubectl ARGS -o json`, parsed.
pub fn json(cp: &ControlPlane, args: &[&str]) -> Result<Value, String> {
    let mut all = args.to_vec();
    all.extend(["-o", "json"]);
    let text = cp.ok(&all, None).map_err(|e| format!("{e:#}"))?;
    serde_json::from_str(&text).map_err(|e| format!("kubectl {}: {e}", args.join(" ")))
}

/// `kubectl apply --server-side` of `yaml`; panics with the YAML if it is refused.
pub fn apply(cp: &ControlPlane, yaml: &str) {
    cp.ok(&["apply", "--server-side", "-f", "-"], Some(yaml))
        .unwrap_or_else(|e| panic!("{e:#}\n{yaml}"));
}

/// The condition of `type_` in a status (`null` when absent).
pub fn condition<'a>(status: &'a Value, type_: &str) -> &'a Value {
    status["conditions"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["type"] == type_))
        .unwrap_or(&Value::Null)
}

/// The names of a list's items that `keep` accepts.
pub fn names_where(list: &Value, keep: impl Fn(&Value) -> bool) -> Vec<String> {
    list["items"]
        .as_array()
        .map(|i| {
            i.iter()
                .filter(|o| keep(o))
                .filter_map(|o| o["metadata"]["name"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// A free loopback port.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A kwok Node (kwok marks it Ready); `gpu` labels it `nvidia.com/gpu.present=true` and gives
/// it eight GPUs.
pub fn node_yaml(name: &str, gpu: bool) -> String {
    let (label, gpus) = if gpu {
        (
            "\n    nvidia.com/gpu.present: \"true\"",
            ", nvidia.com/gpu: \"8\"",
        )
    } else {
        ("", "")
    };
    format!(
        "apiVersion: v1\nkind: Node\nmetadata:\n  name: {name}\n  annotations: {{kwok.x-k8s.io/node: fake}}\n  \
         labels:\n    kubernetes.io/hostname: {name}{label}\nstatus:\n  capacity: {{cpu: \"32\", memory: 256Gi, pods: \"110\"{gpus}}}\n  \
         allocatable: {{cpu: \"32\", memory: 256Gi, pods: \"110\"{gpus}}}\n"
    )
}

const HELM: &str = r#"
import json, sys
import helm_python as helm
kubeconfig, namespace, release, chart, values = sys.argv[1:6]
try:
    with helm.Config(kubeconfig_path=kubeconfig, namespace=namespace) as cfg:
        rel = cfg.install(chart, release, json.loads(values), namespace=namespace, timeout=300)
        print(json.dumps({k: rel.get(k) for k in ("name", "namespace", "revision", "status")}))
except helm.HelmError as e:
    sys.stderr.write(f"helm install: {type(e).__name__}: {e}\n")
    sys.exit(1)
"#;

/// `helm install RELEASE CHART -n NAMESPACE` with `values`, through the real Helm library
/// (`helm-python-sdk` in the test venv); panics with Helm's message if it fails.
pub fn helm_install(
    cp: &ControlPlane,
    namespace: &str,
    release: &str,
    chart: &Path,
    values: &Value,
) {
    let out = Command::new(python())
        .arg("-c")
        .arg(HELM)
        .arg(cp.kubeconfig())
        .args([namespace, release])
        .arg(chart)
        .arg(values.to_string())
        .output()
        .expect("python");
    assert!(
        out.status.success(),
        "helm install: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The CA certificate of the operator's gRPC TLS Secret (`infermesh-tls` in `namespace`),
/// waited for until the operator has made it.
pub fn grpc_ca(cp: &ControlPlane, namespace: &str, timeout: Duration) -> String {
    wait_for("the TLS Secret", timeout, || {
        let template = r#"go-template={{index .data "ca.crt" | base64decode}}"#;
        cp.ok(
            &[
                "get",
                "secret",
                "infermesh-tls",
                "-n",
                namespace,
                "-o",
                template,
            ],
            None,
        )
        .map_err(|e| format!("{e:#}"))
        .and_then(|ca| {
            ca.contains("BEGIN CERTIFICATE")
                .then_some(ca.clone())
                .ok_or(ca)
        })
    })
}

/// A local process killed on drop; its output goes to a log file.
pub struct Proc {
    /// What it plays (the log file's name).
    pub name: String,
    /// The process.
    pub child: Child,
    /// Its standard output and error.
    pub log: PathBuf,
}

impl Proc {
    /// Starts `cmd` with its output in `dir/NAME.log`.
    pub fn spawn(name: &str, mut cmd: Command, dir: &Path) -> Self {
        let log = dir.join(format!("{name}.log"));
        let file = std::fs::File::create(&log).expect("log file");
        let child = cmd
            .stdout(file.try_clone().expect("log"))
            .stderr(file)
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("start {name}: {e}"));
        Self {
            name: name.into(),
            child,
            log,
        }
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends `sig` (`-STOP`, `-KILL`, ...).
    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill {sig} {}", self.name);
    }

    /// Whether it has not exited.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The chart's CRDs.
pub const CRDS: [&str; 3] = [
    "workloads.infermesh.dev",
    "agents.infermesh.dev",
    "meshes.infermesh.dev",
];

/// Installs the chart as `release` in `namespace` (which must exist) with the real Helm
/// library: an external database (`database_url`, in Secret `<release>-external-db`), no
/// bundled Postgres, no Mesh of its own, plain-text logs, plus `values` on top; then waits
/// until the CRDs are Established.
pub fn install_chart(
    cp: &ControlPlane,
    namespace: &str,
    release: &str,
    database_url: &str,
    values: &Value,
) -> anyhow::Result<()> {
    let secret = format!("{release}-external-db");
    cp.ok(
        &[
            "create",
            "secret",
            "generic",
            &secret,
            "-n",
            namespace,
            &format!("--from-literal=DATABASE_URL={database_url}"),
        ],
        None,
    )?;
    let mut all = serde_json::json!({
        "database": {"existingSecret": secret},
        "postgres": {"enabled": false},
        "mesh": {"create": false},
        "logJson": false,
    });
    if let (Some(all), Some(extra)) = (all.as_object_mut(), values.as_object()) {
        all.extend(extra.clone());
    }
    helm_install(
        cp,
        namespace,
        release,
        &crate::workspace().join("charts/infermesh"),
        &all,
    );
    for crd in CRDS {
        cp.ok(
            &[
                "wait",
                "--for=condition=Established",
                &format!("crd/{crd}"),
                "--timeout=60s",
            ],
            None,
        )?;
    }
    Ok(())
}

/// node -> pod name of the Running pods in `namespace` that match `selector`.
pub fn running_pods_by_node(
    cp: &ControlPlane,
    namespace: &str,
    selector: &str,
) -> Result<std::collections::BTreeMap<String, String>, String> {
    let pods = json(cp, &["get", "pods", "-n", namespace, "-l", selector])?;
    Ok(pods["items"]
        .as_array()
        .map(|i| {
            i.iter()
                .filter(|p| p["status"]["phase"] == "Running")
                .filter_map(|p| {
                    Some((
                        p["spec"]["nodeName"].as_str()?.to_string(),
                        p["metadata"]["name"].as_str()?.to_string(),
                    ))
                })
                .collect()
        })
        .unwrap_or_default())
}

/// A tensor Workload `namespace/name` on Mesh `mesh` over `records` records written to
/// `dir/in-NAME.jsonl`, output under `dir/out-NAME/`, shards of `shard_bytes`.
pub fn tensor_workload(
    dir: &Path,
    namespace: &str,
    mesh: &str,
    name: &str,
    records: usize,
    shard_bytes: &str,
) -> String {
    let input = dir.join(format!("in-{name}.jsonl"));
    let mut text = String::new();
    for i in 0..records {
        let x = [i as f32 / 100.0, 1.0, -((i % 7) as f32), 0.5];
        text.push_str(&serde_json::json!({"id": i, "x": x}).to_string());
        text.push('\n');
    }
    std::fs::write(&input, text).expect("input");
    let model = crate::test_models().join("tensor.onnx");
    format!(
        r#"apiVersion: infermesh.dev/v1alpha1
kind: Workload
metadata: {{name: {name}, namespace: {namespace}}}
spec:
  mesh: {mesh}
  model: {{uri: "file://{}", sha256: "{}"}}
  task:
    tensor:
      inputs: [{{name: x}}]
      outputs: ["y", "s"]
  input: {{uri: "file://{}", format: jsonl}}
  output: {{uri: "file://{}/out-{name}/"}}
  shardBytes: {shard_bytes}
  batchSize: 16
  maxAttempts: 4
"#,
        model.display(),
        crate::sha256_file(&model),
        input.display(),
        dir.display(),
    )
}
