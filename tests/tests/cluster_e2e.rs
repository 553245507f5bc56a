//! Cluster end to end: installs `charts/infermesh` with the Helm SDK into a fresh namespace of
//! a real cluster (k3s or kind), runs a tensor Workload on a CPU-only Mesh to `Succeeded`, and
//! checks what a user would look at: the Workload's status and conditions, the Agent and Mesh
//! objects, the Kubernetes Events, the output parts and `_SUCCESS.json` on the data volume, the
//! leader Lease, the leader's `/metrics`, and the ledger (`infermesh ledger verify`, balances
//! and the event log) inside the operator pod.
//!
//! It runs only when `INFERMESH_E2E_KUBECONFIG` names a kubeconfig (a relative path is taken
//! from the workspace root); without it the test prints SKIPPED on the terminal and returns.
//!
//! ```sh
//! # kind: build the two images, load them, run
//! docker build -f Dockerfile.operator -t infermesh-operator:e2e .
//! docker build -f Dockerfile.agent -t infermesh-agent:e2e .
//! kind create cluster --name infermesh-e2e
//! kind load docker-image infermesh-operator:e2e infermesh-agent:e2e --name infermesh-e2e
//! kind get kubeconfig --name infermesh-e2e > /tmp/kind.kubeconfig
//! INFERMESH_E2E_KUBECONFIG=/tmp/kind.kubeconfig \
//!   INFERMESH_E2E_OPERATOR_IMAGE=docker.io/library/infermesh-operator:e2e \
//!   INFERMESH_E2E_AGENT_IMAGE=docker.io/library/infermesh-agent:e2e \
//!   cargo test -p infermesh-tests --test cluster_e2e -- --nocapture
//! # k3s: KUBECONFIG is /etc/rancher/k3s/k3s.yaml; import the images with
//! #   docker save infermesh-agent:e2e | sudo k3s ctr images import -
//! ```
//!
//! More variables:
//! - `INFERMESH_E2E_OPERATOR_IMAGE`, `INFERMESH_E2E_AGENT_IMAGE`: `repository:tag` (default:
//!   the chart's `image.repository` / `image.agentRepository` at its appVersion). The chart
//!   gives both images one tag (`image.tag`), so the two tags must be equal.
//! - `INFERMESH_E2E_NODE`: the node to run on (default: the first Ready, schedulable,
//!   untainted node). Everything (operator, Postgres, the one agent, the data volume) runs there,
//!   so a ReadWriteOnce volume is enough.
//! - `INFERMESH_E2E_STORAGE_CLASS`: class of the data PVC (default: the cluster's default,
//!   local-path on k3s, standard on kind).
//! - `INFERMESH_E2E_KEEP=1`: leave the namespace, release and Mesh in place for debugging.
//!
//! Needs: `kubectl` on PATH, the project venv (`bash scripts/setup.sh`: the Helm SDK
//! helm-python-sdk, and onnx/numpy for `scripts/gen_test_models.py`), and a cluster that runs no
//! other infermesh operator (an operator reconciles Meshes and Workloads cluster-wide). It
//! creates a namespace `infermesh-e2e-<id>`, a Helm release of the same name, a cluster-scoped
//! Mesh `e2e-<id>`, and removes all of them afterwards, also when the test fails (the CRDs stay,
//! as after any `helm uninstall`). On failure it prints pods, events and logs first.

use std::ffi::OsString;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use infermesh_tests::{python, sha256_file, test_models, workspace};
use serde_json::Value;

/// The variable that names the cluster.
const KUBECONFIG_VAR: &str = "INFERMESH_E2E_KUBECONFIG";
/// Records in the input (a few dozen 4 KiB shards).
const RECORDS: usize = 2000;
/// The Workload's name.
const WORKLOAD: &str = "e2e-tensor";
/// The data PVC, mounted at /data in the operator and the agents (`data.existingClaim`).
const DATA_CLAIM: &str = "e2e-data";
/// Resource names with their group: `workloads` alone is ambiguous where Kueue is installed.
const WORKLOADS: &str = "workloads.infermesh.dev";
const AGENTS: &str = "agents.infermesh.dev";
const MESHES: &str = "meshes.infermesh.dev";
/// The agents' user (the DaemonSet's runAsUser and the operator's).
const AGENT_UID: u32 = 65532;

/// The kubeconfig of the cluster to test, from the variable's value: `Ok(None)` when unset or
/// empty (the suite is skipped), an error when it names no file.
fn cluster_from(value: Option<OsString>) -> Result<Option<PathBuf>, String> {
    let Some(value) = value.filter(|v| !v.is_empty()) else {
        return Ok(None);
    };
    let path = PathBuf::from(value);
    let path = if path.is_relative() {
        workspace().join(path)
    } else {
        path
    };
    if path.is_file() {
        Ok(Some(path))
    } else {
        Err(format!(
            "{KUBECONFIG_VAR}={} is not a file: point it at the kubeconfig of a k3s or kind \
             cluster (or unset it to skip the cluster end-to-end suite)",
            path.display()
        ))
    }
}

/// The kubeconfig named by `INFERMESH_E2E_KUBECONFIG`, if any.
fn cluster() -> Result<Option<PathBuf>, String> {
    cluster_from(std::env::var_os(KUBECONFIG_VAR))
}

/// What a skipped run prints.
fn skip_message() -> String {
    format!(
        "\n\
         ************************************************************************************\n\
         SKIPPED: the cluster end-to-end suite (tests/tests/cluster_e2e.rs) did NOT run:\n\
         {KUBECONFIG_VAR} is not set. It installs charts/infermesh into a real cluster and\n\
         runs a Workload to Succeeded. To run it against k3s or kind:\n\
         \n\
         {KUBECONFIG_VAR}=/path/to/kubeconfig \\\n\
         INFERMESH_E2E_OPERATOR_IMAGE=<repo>:<tag> INFERMESH_E2E_AGENT_IMAGE=<repo>:<tag> \\\n\
         cargo test -p infermesh-tests --test cluster_e2e -- --nocapture\n\
         \n\
         (see the top of tests/tests/cluster_e2e.rs for building and loading the images)\n\
         ************************************************************************************\n"
    )
}

/// `repository:tag` split in two; a registry port (`host:5000/name`) is not a tag. Digests
/// cannot be expressed in the chart's values (`image.repository` + `image.tag`).
fn split_image(image: &str) -> Result<(String, String), String> {
    if image.contains('@') {
        return Err(format!(
            "image `{image}`: the chart takes `repository` and `tag`, not a digest; tag the image"
        ));
    }
    let name_start = image.rfind('/').map_or(0, |i| i + 1);
    match image[name_start..].rfind(':') {
        Some(i) if i + 1 < image.len() - name_start => {
            let at = name_start + i;
            Ok((image[..at].to_string(), image[at + 1..].to_string()))
        }
        _ => Err(format!("image `{image}` has no tag: give `repository:tag`")),
    }
}

/// The chart's default `(operator repository, agent repository, tag)`.
fn chart_images() -> (String, String, String) {
    let chart = workspace().join("charts/infermesh");
    let values: Value = serde_yaml::from_str(
        &std::fs::read_to_string(chart.join("values.yaml")).expect("read values.yaml"),
    )
    .expect("values.yaml is YAML");
    let meta: Value = serde_yaml::from_str(
        &std::fs::read_to_string(chart.join("Chart.yaml")).expect("read Chart.yaml"),
    )
    .expect("Chart.yaml is YAML");
    let image = &values["image"];
    let tag = image["tag"]
        .as_str()
        .filter(|t| !t.is_empty())
        .or_else(|| meta["appVersion"].as_str())
        .expect("image.tag or appVersion")
        .to_string();
    (
        image["repository"]
            .as_str()
            .expect("image.repository")
            .to_string(),
        image["agentRepository"]
            .as_str()
            .expect("image.agentRepository")
            .to_string(),
        tag,
    )
}

/// `(operator repository, agent repository, tag)` from the environment or the chart.
fn images() -> (String, String, String) {
    let (default_op, default_agent, default_tag) = chart_images();
    let pick = |var: &str, repo: &str| match std::env::var(var) {
        Ok(v) if !v.is_empty() => split_image(&v).unwrap_or_else(|e| panic!("{var}: {e}")),
        _ => (repo.to_string(), default_tag.clone()),
    };
    let (op_repo, op_tag) = pick("INFERMESH_E2E_OPERATOR_IMAGE", &default_op);
    let (agent_repo, agent_tag) = pick("INFERMESH_E2E_AGENT_IMAGE", &default_agent);
    assert_eq!(
        op_tag, agent_tag,
        "the chart gives the operator and the agent one tag (image.tag): tag both images the same"
    );
    (op_repo, agent_repo, op_tag)
}

/// Runs `kubectl` against one cluster.
#[derive(Clone)]
struct Kubectl {
    kubeconfig: PathBuf,
}

impl Kubectl {
    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("kubectl");
        cmd.env("KUBECONFIG", &self.kubeconfig).args(args);
        cmd
    }

    /// Runs it; `Err(stderr)` when it fails.
    fn run(&self, args: &[&str]) -> Result<String, String> {
        let out = self
            .command(args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run kubectl (is it on PATH?): {e}"));
        outcome(out)
    }

    /// Runs it with `input` on stdin.
    fn run_with(&self, args: &[&str], input: &str) -> Result<String, String> {
        let mut child = self
            .command(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run kubectl (is it on PATH?): {e}"));
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input.as_bytes())
            .expect("write to kubectl");
        outcome(child.wait_with_output().expect("kubectl"))
    }

    /// Runs it and panics with kubectl's message when it fails.
    fn ok(&self, args: &[&str]) -> String {
        self.run(args)
            .unwrap_or_else(|e| panic!("kubectl {} failed: {e}", args.join(" ")))
    }

    /// `kubectl apply -f -` of `yaml`.
    fn apply(&self, yaml: &str) {
        if let Err(e) = self.run_with(&["apply", "-f", "-"], yaml) {
            panic!("kubectl apply failed: {e}\n--- manifest\n{yaml}");
        }
    }

    /// Output of `kubectl ARGS -o json`, parsed.
    fn json(&self, args: &[&str]) -> Result<Value, String> {
        let mut all = args.to_vec();
        all.extend(["-o", "json"]);
        let text = self.run(&all)?;
        serde_json::from_str(&text).map_err(|e| format!("kubectl output is not JSON: {e}"))
    }
}

fn outcome(out: Output) -> Result<String, String> {
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "exit {:?}: {}{}",
            out.status.code(),
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        ))
    }
}

/// Polls `probe` every 3 s until it returns `Ok`, for at most `timeout`; panics naming `what`
/// and the last state the probe described.
fn wait_for<T>(what: &str, timeout: Duration, mut probe: impl FnMut() -> Result<T, String>) -> T {
    let start = Instant::now();
    let mut said = Instant::now();
    loop {
        let last = match probe() {
            Ok(v) => {
                eprintln!("e2e: {what}: done after {:.0?}", start.elapsed());
                return v;
            }
            Err(state) => state,
        };
        if start.elapsed() >= timeout {
            panic!("timed out after {timeout:?} waiting for {what}; last: {last}");
        }
        if said.elapsed() >= Duration::from_secs(30) {
            eprintln!(
                "e2e: still waiting for {what} ({:.0?}): {last}",
                start.elapsed()
            );
            said = Instant::now();
        }
        std::thread::sleep(Duration::from_secs(3));
    }
}

/// The Helm SDK (helm-python-sdk, the project venv's) installing or uninstalling a release.
/// `argv`: action kubeconfig namespace release [chart values-json].
const HELM: &str = r#"
import json, sys
import helm_python as helm
action, kubeconfig, namespace, release = sys.argv[1:5]
try:
    with helm.Config(kubeconfig_path=kubeconfig, namespace=namespace) as cfg:
        if action == "install":
            chart, values = sys.argv[5], json.loads(sys.argv[6])
            rel = cfg.install(chart, release, values, namespace=namespace, timeout=300)
            print(json.dumps({k: rel.get(k) for k in ("name", "namespace", "revision", "status")}))
        else:
            cfg.uninstall(release, ignore_not_found=True, timeout=300)
            print(json.dumps({"uninstalled": release}))
except helm.HelmError as e:
    sys.stderr.write(f"helm {action}: {type(e).__name__}: {e}\n")
    sys.exit(1)
"#;

fn helm(args: &[&str]) -> Result<String, String> {
    let out = Command::new(python())
        .arg("-c")
        .arg(HELM)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run the venv's Python: {e}"));
    outcome(out)
}

/// What the test made in the cluster; removed on drop, also when the test panics.
struct Installation {
    kubectl: Kubectl,
    namespace: String,
    release: String,
    mesh: String,
    installed: bool,
}

impl Installation {
    fn operator_selector(&self) -> String {
        format!(
            "app.kubernetes.io/instance={},app.kubernetes.io/component=operator",
            self.release
        )
    }

    /// What a person would look at first, printed before the clean-up of a failed run.
    fn dump(&self) {
        let ns = self.namespace.as_str();
        let mesh_label = format!("infermesh.dev/mesh={}", self.mesh);
        let operator = self.operator_selector();
        let looks: Vec<Vec<&str>> = vec![
            vec![
                "get",
                "pods,jobs,pvc,daemonsets,deployments,statefulsets",
                "-n",
                ns,
                "-o",
                "wide",
            ],
            vec![
                "get",
                "meshes.infermesh.dev,agents.infermesh.dev",
                "-o",
                "wide",
            ],
            vec!["get", WORKLOADS, "-n", ns, "-o", "yaml"],
            vec!["get", "events", "-n", ns, "--sort-by=.lastTimestamp"],
            vec![
                "logs",
                "-n",
                ns,
                "-l",
                &operator,
                "--all-containers",
                "--prefix",
                "--tail=200",
            ],
            vec![
                "logs",
                "-n",
                ns,
                "-l",
                &mesh_label,
                "--all-containers",
                "--prefix",
                "--tail=200",
            ],
            vec!["logs", "-n", ns, "job/e2e-seed", "--tail=50"],
        ];
        eprintln!("\n======== e2e diagnostics (namespace {ns}) ========");
        for args in looks {
            eprintln!("---- kubectl {}", args.join(" "));
            match self.kubectl.run(&args) {
                Ok(text) | Err(text) => eprintln!("{text}"),
            }
        }
        eprintln!("======== end of diagnostics ========\n");
    }

    /// Deletes an object; when the operator cannot remove its finalizer in time (it may be
    /// the thing that failed), drops the finalizers so the namespace can go.
    fn delete_with_finalizer(&self, kind_name: &str, namespace: Option<&str>) {
        let mut args = vec!["delete", kind_name, "--ignore-not-found", "--timeout=90s"];
        let mut patch = vec![
            "patch",
            kind_name,
            "--type=merge",
            "-p",
            r#"{"metadata":{"finalizers":null}}"#,
        ];
        if let Some(ns) = namespace {
            args.extend(["-n", ns]);
            patch.extend(["-n", ns]);
        }
        if let Err(e) = self.kubectl.run(&args) {
            eprintln!(
                "e2e clean-up: {kind_name} was not deleted in time ({e}); removing its finalizers"
            );
            if let Err(e) = self.kubectl.run(&patch) {
                eprintln!("e2e clean-up: kubectl {}: {e}", patch.join(" "));
            }
        }
    }
}

impl Drop for Installation {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump();
        }
        if std::env::var("INFERMESH_E2E_KEEP").is_ok_and(|v| v == "1") {
            eprintln!(
                "e2e: INFERMESH_E2E_KEEP=1: left namespace {}, release {} and Mesh {} in place",
                self.namespace, self.release, self.mesh
            );
            return;
        }
        let ns = self.namespace.as_str();
        // The operator removes the Workload's and the Mesh's finalizers: delete them while it
        // still runs, then the release, then the namespace.
        if let Ok(list) = self
            .kubectl
            .run(&["get", WORKLOADS, "-n", ns, "-o", "name"])
        {
            for w in list.lines().filter(|l| !l.is_empty()) {
                self.delete_with_finalizer(w, Some(ns));
            }
        }
        self.delete_with_finalizer(&format!("{MESHES}/{}", self.mesh), None);
        let agents = format!("infermesh.dev/mesh={}", self.mesh);
        if let Err(e) = self
            .kubectl
            .run(&["delete", AGENTS, "-l", &agents, "--ignore-not-found"])
        {
            eprintln!("e2e clean-up: deleting the Agents: {e}");
        }
        if self.installed {
            let kubeconfig = self.kubectl.kubeconfig.to_string_lossy().into_owned();
            if let Err(e) = helm(&["uninstall", &kubeconfig, ns, &self.release]) {
                eprintln!("e2e clean-up: {e}");
            }
        }
        match self.kubectl.run(&[
            "delete",
            "namespace",
            ns,
            "--ignore-not-found",
            "--timeout=180s",
        ]) {
            Ok(_) => eprintln!(
                "e2e: removed namespace {ns}, release {} and Mesh {}",
                self.release, self.mesh
            ),
            Err(e) => eprintln!("e2e clean-up: namespace {ns} is not gone yet: {e}"),
        }
    }
}

/// The node to run on: `INFERMESH_E2E_NODE`, or the first Ready, schedulable node without
/// NoSchedule/NoExecute taints.
fn pick_node(kubectl: &Kubectl) -> String {
    if let Ok(n) = std::env::var("INFERMESH_E2E_NODE")
        && !n.is_empty()
    {
        return n;
    }
    let nodes = kubectl.json(&["get", "nodes"]).expect("list nodes");
    let mut fit: Vec<String> = nodes["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter(|n| {
            let ready = n["status"]["conditions"].as_array().is_some_and(|c| {
                c.iter()
                    .any(|c| c["type"] == "Ready" && c["status"] == "True")
            });
            let cordoned = n["spec"]["unschedulable"] == true;
            let tainted = n["spec"]["taints"].as_array().is_some_and(|t| {
                t.iter()
                    .any(|t| t["effect"] == "NoSchedule" || t["effect"] == "NoExecute")
            });
            ready && !cordoned && !tainted
        })
        .filter_map(|n| n["metadata"]["name"].as_str().map(str::to_string))
        .collect();
    fit.sort();
    fit.into_iter().next().unwrap_or_else(|| {
        panic!("no Ready, schedulable, untainted node: set INFERMESH_E2E_NODE to one to use")
    })
}

/// The input: `RECORDS` records `{"id", "x": [4 floats]}`, with blank lines mixed in.
fn input_jsonl() -> String {
    let mut text = String::new();
    for i in 0..RECORDS {
        let x = [i as f32 / 100.0, 1.0, -((i % 7) as f32), 0.5];
        text.push_str(&serde_json::json!({"id": i, "x": x}).to_string());
        text.push('\n');
        if i % 500 == 0 {
            text.push('\n');
        }
    }
    text
}

/// The data PVC and the Job that puts the model and the input on it (from a ConfigMap) and
/// hands it to the agents' user.
fn seed_manifests(ns: &str, node: &str, image: &str, storage_class: Option<&str>) -> String {
    let class = storage_class
        .map(|c| format!("  storageClassName: {c}\n"))
        .unwrap_or_default();
    format!(
        r#"apiVersion: v1
kind: PersistentVolumeClaim
metadata: {{name: {DATA_CLAIM}, namespace: {ns}}}
spec:
  accessModes: [ReadWriteOnce]
{class}  resources: {{requests: {{storage: 1Gi}}}}
---
apiVersion: batch/v1
kind: Job
metadata: {{name: e2e-seed, namespace: {ns}}}
spec:
  backoffLimit: 2
  template:
    spec:
      restartPolicy: Never
      nodeSelector: {{kubernetes.io/hostname: "{node}"}}
      containers:
        - name: seed
          image: "{image}"
          imagePullPolicy: IfNotPresent
          command:
            - /bin/sh
            - -c
            - set -e; mkdir -p /data/e2e/out; cp /seed/tensor.onnx /seed/in.jsonl /data/e2e/;
              chown -R {AGENT_UID}:{AGENT_UID} /data/e2e; ls -ln /data/e2e
          securityContext: {{runAsUser: 0, runAsNonRoot: false}}
          volumeMounts:
            - {{name: seed, mountPath: /seed, readOnly: true}}
            - {{name: data, mountPath: /data}}
      volumes:
        - name: seed
          configMap: {{name: e2e-seed}}
        - name: data
          persistentVolumeClaim: {{claimName: {DATA_CLAIM}}}
"#
    )
}

/// Chart values: one node, the data claim, a CPU-only Mesh with short leases.
fn chart_values(
    (op_repo, agent_repo, tag): &(String, String, String),
    node: &str,
    mesh: &str,
    storage_class: Option<&str>,
) -> Value {
    let mut values = serde_json::json!({
        "image": {"repository": op_repo, "agentRepository": agent_repo, "tag": tag},
        "nodeSelector": {"kubernetes.io/hostname": node},
        "logJson": false,
        "data": {"existingClaim": DATA_CLAIM},
        "mesh": {
            "create": true,
            "name": mesh,
            // null drops the chart's default key (Helm merges maps).
            "nodeSelector": {"nvidia.com/gpu.present": null, "kubernetes.io/hostname": node},
            "tolerations": [],
            "resources": null,
            "executionProviders": ["cpu"],
            "slots": 2,
            "leaseSeconds": 15,
            "heartbeatSeconds": 3,
            "pricing": {"perGpuSecond": 0, "perCpuSecond": 0.05, "perThousandRecords": 0.2}
        }
    });
    if let Some(class) = storage_class {
        values["postgres"] = serde_json::json!({"persistence": {"storageClass": class}});
    }
    values
}

fn workload_manifest(ns: &str, mesh: &str, sha256: &str) -> String {
    format!(
        r#"apiVersion: infermesh.dev/v1alpha1
kind: Workload
metadata: {{name: {WORKLOAD}, namespace: {ns}}}
spec:
  mesh: {mesh}
  model: {{uri: "file:///data/e2e/tensor.onnx", sha256: "{sha256}"}}
  task:
    tensor:
      inputs: [{{name: x}}]
      outputs: ["y", "s"]
  input: {{uri: "file:///data/e2e/in.jsonl", format: jsonl}}
  output: {{uri: "file:///data/e2e/out/"}}
  shardBytes: 4Ki
  batchSize: 64
  maxAttempts: 3
"#
    )
}

/// The condition of `type_` in a status.
fn condition<'a>(status: &'a Value, type_: &str) -> &'a Value {
    status["conditions"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["type"] == type_))
        .unwrap_or(&Value::Null)
}

/// A metric's value in Prometheus text (`name value`, no labels).
fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

#[test]
fn a_workload_runs_to_succeeded_on_a_cluster() {
    let kubeconfig = match cluster() {
        Ok(Some(k)) => k,
        Ok(None) => {
            // Straight to the terminal: libtest captures eprintln! of a passing test.
            let _ = std::io::stderr()
                .lock()
                .write_all(skip_message().as_bytes());
            return;
        }
        Err(e) => panic!("{e}"),
    };
    let kubectl = Kubectl {
        kubeconfig: kubeconfig.clone(),
    };
    let kubeconfig = kubeconfig.to_string_lossy().into_owned();
    let images = images();
    let agent_image = format!("{}:{}", images.1, images.2);

    // An operator elsewhere in the cluster would reconcile this test's objects too.
    let others = kubectl
        .json(&[
            "get",
            "deployments",
            "-A",
            "-l",
            "app.kubernetes.io/part-of=infermesh,app.kubernetes.io/component=operator",
        ])
        .unwrap_or_else(|e| panic!("cannot reach the cluster in {kubeconfig}: {e}"));
    let others: Vec<String> = others["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|d| format!("{}/{}", d["metadata"]["namespace"], d["metadata"]["name"]))
        .collect();
    assert!(
        others.is_empty(),
        "an infermesh operator already runs in this cluster ({others:?}); it would reconcile \
         this test's Mesh and Workload too: run the suite on a cluster without one"
    );

    let id = {
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default();
        format!(
            "{:06x}",
            (secs ^ (u64::from(std::process::id()) << 12)) & 0xff_ffff
        )
    };
    let ns = format!("infermesh-e2e-{id}");
    // Contains "infermesh": the chart's fullname is the release name, so the Deployment is
    // `<release>`, the Lease `<release>-leader`, the Services `<release>-grpc|-metrics`.
    let release = ns.clone();
    let mesh = format!("e2e-{id}");
    let node = pick_node(&kubectl);
    eprintln!(
        "e2e: namespace/release {ns}, Mesh {mesh}, node {node}, images {}:{} and {agent_image}",
        images.0, images.2
    );

    kubectl.ok(&["create", "namespace", &ns]);
    let mut inst = Installation {
        kubectl: kubectl.clone(),
        namespace: ns.clone(),
        release: release.clone(),
        mesh: mesh.clone(),
        installed: false,
    };

    // The model and the input, on the data volume the operator and the agents mount.
    let model = test_models().join("tensor.onnx");
    let sha = sha256_file(&model);
    assert_eq!(sha.len(), 64, "sha256 of {}", model.display());
    let dir = tempfile::tempdir().expect("tmp");
    let input = dir.path().join("in.jsonl");
    std::fs::write(&input, input_jsonl()).expect("write input");
    kubectl.ok(&[
        "create",
        "configmap",
        "e2e-seed",
        "-n",
        &ns,
        &format!("--from-file=tensor.onnx={}", model.display()),
        &format!("--from-file=in.jsonl={}", input.display()),
    ]);
    let storage_class = std::env::var("INFERMESH_E2E_STORAGE_CLASS")
        .ok()
        .filter(|c| !c.is_empty());
    kubectl.apply(&seed_manifests(
        &ns,
        &node,
        &agent_image,
        storage_class.as_deref(),
    ));
    wait_for(
        "the seed Job (pulls the agent image)",
        Duration::from_secs(600),
        || {
            let job = kubectl.json(&["get", "job", "e2e-seed", "-n", &ns])?;
            let s = &job["status"];
            if s["succeeded"].as_u64().unwrap_or(0) >= 1 {
                return Ok(());
            }
            if condition(s, "Failed")["status"] == "True" {
                panic!("the seed Job failed: {}", condition(s, "Failed"));
            }
            Err(format!("job status {s}"))
        },
    );

    // The chart, with the real Helm library.
    let values = chart_values(&images, &node, &mesh, storage_class.as_deref()).to_string();
    let chart = workspace().join("charts/infermesh");
    // Uninstalled on drop even if the install fails half-way (uninstall ignores "not found").
    inst.installed = true;
    let installed = helm(&[
        "install",
        &kubeconfig,
        &ns,
        &release,
        &chart.to_string_lossy(),
        &values,
    ])
    .unwrap_or_else(|e| panic!("helm install failed: {e}"));
    let rel: Value = serde_json::from_str(installed.trim()).expect("helm's answer is JSON");
    assert_eq!(rel["status"], "deployed", "{rel}");
    eprintln!("e2e: installed {rel}");

    kubectl.ok(&[
        "-n",
        &ns,
        "rollout",
        "status",
        &format!("statefulset/{release}-postgres"),
        "--timeout=600s",
    ]);
    kubectl.ok(&[
        "-n",
        &ns,
        "rollout",
        "status",
        &format!("deployment/{release}"),
        "--timeout=600s",
    ]);

    // One leader: it holds the Lease and labels its own pod for the -grpc Service.
    let leader = wait_for("a leader", Duration::from_secs(120), || {
        let lease = kubectl.json(&["get", "lease", &format!("{release}-leader"), "-n", &ns])?;
        let holder = lease["spec"]["holderIdentity"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let labelled =
            kubectl.json(&["get", "pods", "-n", &ns, "-l", "infermesh.dev/leader=true"])?;
        let names: Vec<&str> = labelled["items"]
            .as_array()
            .map(|i| {
                i.iter()
                    .filter_map(|p| p["metadata"]["name"].as_str())
                    .collect()
            })
            .unwrap_or_default();
        if !holder.is_empty() && names == [holder.as_str()] {
            Ok(holder)
        } else {
            Err(format!(
                "Lease holder `{holder}`, pods labelled leader {names:?}"
            ))
        }
    });
    let operator_pods = kubectl.ok(&[
        "get",
        "pods",
        "-n",
        &ns,
        "-l",
        &inst.operator_selector(),
        "-o",
        "name",
    ]);
    assert!(
        operator_pods.lines().any(|p| p == format!("pod/{leader}")),
        "the leader {leader} is an operator pod: {operator_pods}"
    );

    // The Mesh's agent registers and becomes a Ready Agent.
    let agent_name = format!("{mesh}-{node}");
    let mesh_label = format!("infermesh.dev/mesh={mesh}");
    wait_for(
        "the Agent to be Ready (pulls the agent image)",
        Duration::from_secs(600),
        || {
            let agents = kubectl.json(&["get", AGENTS, "-l", &mesh_label])?;
            let items = agents["items"].as_array().cloned().unwrap_or_default();
            match items.as_slice() {
                [a] if a["status"]["phase"] == "Ready" => Ok(()),
                _ => Err(format!(
                    "agents {:?}",
                    items
                        .iter()
                        .map(|a| (a["metadata"]["name"].clone(), a["status"]["phase"].clone()))
                        .collect::<Vec<_>>()
                )),
            }
        },
    );
    let agent = kubectl
        .json(&["get", AGENTS, &agent_name])
        .expect("Agent <mesh>-<node>");
    assert_eq!(agent["spec"]["mesh"], mesh.as_str());
    assert_eq!(agent["spec"]["node"], node.as_str());
    assert_eq!(agent["spec"]["unschedulable"], false);
    assert!(
        agent["status"]["executionProviders"]
            .as_array()
            .is_some_and(|p| p.iter().any(|p| p == "cpu")),
        "the agent offers cpu: {}",
        agent["status"]
    );
    wait_for(
        "the Mesh to count its agent",
        Duration::from_secs(120),
        || {
            let m = kubectl.json(&["get", MESHES, &mesh])?;
            let ready = m["status"]["agentsReady"].as_u64().unwrap_or(0);
            if ready == 1 && condition(&m["status"], "Ready")["status"] == "True" {
                Ok(())
            } else {
                Err(format!("mesh status {}", m["status"]))
            }
        },
    );

    // The Workload, to Succeeded.
    kubectl.apply(&workload_manifest(&ns, &mesh, &sha));
    let status = wait_for("the Workload to succeed", Duration::from_secs(600), || {
        let w = kubectl.json(&["get", WORKLOADS, WORKLOAD, "-n", &ns])?;
        let s = w["status"].clone();
        match s["phase"].as_str() {
            Some("Succeeded") => Ok(s),
            Some("Failed") => panic!("the Workload failed: {s}"),
            _ => Err(format!(
                "phase {} progress {} conditions {}",
                s["phase"], s["progress"], s["conditions"]
            )),
        }
    });
    let total = status["shards"]["total"].as_u64().expect("shards.total");
    assert!(total > 10, "the input was cut into many shards: {status}");
    assert_eq!(status["shards"]["succeeded"], total, "{status}");
    for k in ["pending", "running", "failed"] {
        assert_eq!(status["shards"][k], 0, "shards.{k}: {status}");
    }
    assert_eq!(status["records"], RECORDS as u64, "{status}");
    assert_eq!(status["progress"], "100%", "{status}");
    let admitted = condition(&status, "Admitted");
    assert_eq!(admitted["status"], "True", "{status}");
    assert_eq!(admitted["reason"], "Admitted", "{status}");
    let complete = condition(&status, "Complete");
    assert_eq!(complete["status"], "True", "{status}");
    assert_eq!(complete["reason"], "Succeeded", "{status}");
    assert!(
        status["startTime"].is_string() && status["completionTime"].is_string(),
        "{status}"
    );
    let spent = status["creditsSpent"]
        .as_str()
        .expect("creditsSpent")
        .to_string();
    assert!(
        spent.parse::<f64>().is_ok_and(|c| c > 0.0),
        "credits spent: {status}"
    );
    let uid = kubectl
        .ok(&[
            "get",
            WORKLOADS,
            WORKLOAD,
            "-n",
            &ns,
            "-o",
            "jsonpath={.metadata.uid}",
        ])
        .trim()
        .to_string();

    // `kubectl get` alone tells the story.
    let table = kubectl.ok(&["get", WORKLOADS, "-n", &ns]);
    for column in ["MESH", "STATUS", "PROGRESS", "ETA", "CREDITS", "AGE"] {
        assert!(table.contains(column), "kubectl get workloads: {table}");
    }
    assert!(
        table.contains("Succeeded") && table.contains("100%"),
        "{table}"
    );
    let table = kubectl.ok(&["get", AGENTS, "-l", &mesh_label]);
    for column in [
        "MESH", "NODE", "GPU", "STATUS", "RUNNING", "DONE", "CREDITS", "AGE",
    ] {
        assert!(table.contains(column), "kubectl get agents: {table}");
    }

    // The outputs, read in the agent pod (it mounts the data volume and has a shell).
    let pod = kubectl
        .ok(&[
            "get",
            "pods",
            "-n",
            &ns,
            "-l",
            &mesh_label,
            "-o",
            "jsonpath={.items[0].metadata.name}",
        ])
        .trim()
        .to_string();
    let read = |script: &str| {
        kubectl.ok(&[
            "exec", "-n", &ns, &pod, "-c", "agent", "--", "/bin/sh", "-c", script,
        ])
    };
    let manifest: Value = serde_json::from_str(&read("cat /data/e2e/out/_SUCCESS.json"))
        .expect("_SUCCESS.json is JSON");
    assert_eq!(manifest["records"], RECORDS as u64, "{manifest}");
    assert_eq!(manifest["shards"], total, "{manifest}");
    assert_eq!(manifest["uid"], uid.as_str(), "{manifest}");
    let lines: Vec<Value> = read("cat /data/e2e/out/part-*.jsonl")
        .lines()
        .map(|l| serde_json::from_str(l).expect("an output line is JSON"))
        .collect();
    assert_eq!(lines.len(), RECORDS, "one output line per record");
    let mut ids: Vec<u64> = lines.iter().filter_map(|l| l["id"].as_u64()).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), RECORDS, "every id exactly once");
    // y = x @ W + b with W = arange(12).reshape(4, 3) / 10, b = [0.5, -1, 2]; s = sum(x).
    let l = lines.iter().find(|l| l["id"] == 123).expect("record 123");
    let x = [1.23f32, 1.0, -((123 % 7) as f32), 0.5];
    for c in 0..3 {
        let want: f32 = (0..4)
            .map(|r| x[r] * (r * 3 + c) as f32 / 10.0)
            .sum::<f32>()
            + [0.5, -1.0, 2.0][c];
        let got = l["y"][c].as_f64().expect("y") as f32;
        assert!((got - want).abs() < 1e-4, "y[{c}] = {got}, want {want}");
    }
    let s = l["s"].as_f64().expect("s") as f32;
    assert!((s - x.iter().sum::<f32>()).abs() < 1e-4, "s = {s}");

    // Kubernetes Events: admission (the controller) and completion (from the event log).
    let selector = format!("involvedObject.kind=Workload,involvedObject.name={WORKLOAD}");
    wait_for(
        "the Admitted and Succeeded Events",
        Duration::from_secs(60),
        || {
            let events =
                kubectl.json(&["get", "events", "-n", &ns, "--field-selector", &selector])?;
            let reasons: Vec<&str> = events["items"]
                .as_array()
                .map(|i| i.iter().filter_map(|e| e["reason"].as_str()).collect())
                .unwrap_or_default();
            if reasons.contains(&"Admitted") && reasons.contains(&"Succeeded") {
                Ok(())
            } else {
                Err(format!("event reasons {reasons:?}"))
            }
        },
    );

    // The Agent's status counts the shards (written at a throttled rate).
    wait_for(
        "the Agent to count the shards",
        Duration::from_secs(90),
        || {
            let a = kubectl.json(&["get", AGENTS, &agent_name])?;
            if a["status"]["completedShards"] == total && a["status"]["running"] == 0 {
                Ok(())
            } else {
                Err(format!("agent status {}", a["status"]))
            }
        },
    );

    // The leader's /metrics, through the API server's pod proxy.
    let metrics = kubectl.ok(&[
        "get",
        "--raw",
        &format!("/api/v1/namespaces/{ns}/pods/{leader}:8080/proxy/metrics"),
    ]);
    assert_eq!(metric(&metrics, "infermesh_leader"), Some(1.0), "{metrics}");
    assert!(
        metric(&metrics, "infermesh_shards_completed_total").is_some_and(|n| n >= 1.0),
        "{metrics}"
    );

    // The ledger, with the operator image's own CLI (INFERMESH_DATABASE_URL is in its env).
    let deploy = format!("deploy/{release}");
    let ledger = |args: &[&str]| {
        let mut all = vec![
            "exec",
            "-n",
            ns.as_str(),
            deploy.as_str(),
            "-c",
            "operator",
            "--",
            "infermesh",
            "ledger",
        ];
        all.extend_from_slice(args);
        kubectl.ok(&all)
    };
    let verify: Value =
        serde_json::from_str(&ledger(&["verify", "-o", "json"])).expect("verify JSON");
    assert_eq!(verify["ok"], true, "{verify}");
    let balances: Value =
        serde_json::from_str(&ledger(&["balance", "-o", "json"])).expect("balance JSON");
    let rows = balances.as_array().expect("rows");
    let sum: i64 = rows
        .iter()
        .map(|r| r["microCredits"].as_i64().unwrap_or(0))
        .sum();
    assert_eq!(sum, 0, "double entry: {balances}");
    let account = |name: &str| {
        rows.iter()
            .find(|r| r["account"] == name)
            .cloned()
            .unwrap_or_default()
    };
    let payer = account(&format!("namespace/{ns}"));
    assert_eq!(
        payer["credits"],
        format!("-{spent}"),
        "the namespace paid creditsSpent: {balances}"
    );
    let earner = account(&format!("agent/{agent_name}"));
    assert_eq!(
        earner["credits"],
        spent.as_str(),
        "the one agent earned it: {balances}"
    );
    let completed: Value = serde_json::from_str(&ledger(&[
        "events",
        "--workload",
        &uid,
        "--kind",
        "shard.completed",
        "-o",
        "json",
    ]))
    .expect("events JSON");
    assert_eq!(
        completed.as_array().map(Vec::len),
        Some(total as usize),
        "one shard.completed event per shard"
    );

    // Deleting the Workload: the operator cancels what is left and lets it go.
    kubectl.ok(&["delete", WORKLOADS, WORKLOAD, "-n", &ns, "--timeout=90s"]);
    eprintln!("e2e: {WORKLOAD} succeeded with {total} shards, {RECORDS} records, {spent} credits");
    drop(inst);
}

#[test]
fn without_the_variable_the_suite_is_skipped_and_says_how_to_run_it() {
    assert_eq!(cluster_from(None), Ok(None));
    assert_eq!(cluster_from(Some(OsString::new())), Ok(None));
    let msg = skip_message();
    assert!(msg.contains("SKIPPED"), "{msg}");
    assert!(msg.contains(KUBECONFIG_VAR), "{msg}");
    assert!(
        msg.contains("cargo test -p infermesh-tests --test cluster_e2e"),
        "{msg}"
    );
}

#[test]
fn a_kubeconfig_that_is_not_a_file_fails_instead_of_skipping() {
    let err = cluster_from(Some("/nonexistent/infermesh/kubeconfig".into())).expect_err("no file");
    assert!(err.contains("/nonexistent/infermesh/kubeconfig"), "{err}");
    let file = tempfile::NamedTempFile::new().expect("tmp");
    assert_eq!(
        cluster_from(Some(file.path().as_os_str().to_owned())),
        Ok(Some(file.path().to_path_buf()))
    );
    // Relative paths are taken from the workspace root.
    assert_eq!(
        cluster_from(Some("Cargo.toml".into())),
        Ok(Some(workspace().join("Cargo.toml")))
    );
}

#[test]
fn images_split_into_repository_and_tag() {
    let ok = |s: &str| split_image(s).expect(s);
    assert_eq!(
        ok("ghcr.io/infermesh/infermesh-agent:0.1.0"),
        ("ghcr.io/infermesh/infermesh-agent".into(), "0.1.0".into())
    );
    assert_eq!(
        ok("localhost:5000/agent:e2e"),
        ("localhost:5000/agent".into(), "e2e".into())
    );
    assert_eq!(ok("agent:dev"), ("agent".into(), "dev".into()));
    assert!(split_image("localhost:5000/agent").is_err());
    assert!(split_image("agent:").is_err());
    assert!(split_image("agent@sha256:0123").is_err());
    let (op, agent, tag) = chart_images();
    assert!(
        op.ends_with("infermesh-operator") && agent.ends_with("infermesh-agent"),
        "{op} {agent}"
    );
    assert!(!tag.is_empty());
}

#[test]
fn the_workload_and_seed_manifests_are_what_the_operator_accepts() {
    let sha = "0".repeat(64);
    let w: infermesh_crds::Workload =
        serde_yaml::from_str(&workload_manifest("ns-e2e", "e2e-abc", &sha)).expect("Workload");
    assert_eq!(w.spec.mesh, "e2e-abc");
    let valid = infermesh_operator::core::validate::validate(&w.spec).expect("a valid spec");
    assert_eq!(valid.shard_bytes, 4096);
    assert!(!valid.needs.gpu, "a CPU-only Mesh can run it");
    let docs: Vec<Value> = seed_manifests("ns-e2e", "node-a", "reg/agent:e2e", Some("fast"))
        .split("\n---\n")
        .map(|d| serde_yaml::from_str(d).expect("seed YAML"))
        .collect();
    assert_eq!(docs[0]["kind"], "PersistentVolumeClaim");
    assert_eq!(docs[0]["metadata"]["name"], DATA_CLAIM);
    assert_eq!(docs[0]["spec"]["storageClassName"], "fast");
    let pod = &docs[1]["spec"]["template"]["spec"];
    assert_eq!(pod["nodeSelector"]["kubernetes.io/hostname"], "node-a");
    let script = pod["containers"][0]["command"][2].as_str().expect("script");
    assert!(
        script.contains("cp /seed/tensor.onnx /seed/in.jsonl /data/e2e/; chown -R 65532:65532"),
        "{script}"
    );
}

#[test]
fn the_e2e_values_render_a_cpu_only_mesh_on_one_node() {
    let release = "infermesh-e2e-abc123";
    let images = (
        "reg/op".to_string(),
        "reg/agent".to_string(),
        "e2e".to_string(),
    );
    let values = chart_values(&images, "node-a", "e2e-abc123", Some("fast"));
    let dir = tempfile::tempdir().expect("tmp");
    let file = dir.path().join("values.yaml");
    std::fs::write(&file, values.to_string()).expect("values");
    let out = Command::new(python())
        .arg(workspace().join("scripts/helm.py"))
        .args([
            "render",
            "--json",
            "--release",
            release,
            "--namespace",
            release,
        ])
        .arg(&file)
        .output()
        .expect("helm.py");
    let text = outcome(out).unwrap_or_else(|e| panic!("the chart refused the e2e values: {e}"));
    let rendered: Value = serde_json::from_str(&text).expect("JSON");
    let objects: Vec<Value> = rendered["objects"]
        .as_array()
        .expect("objects")
        .iter()
        .map(|o| serde_yaml::from_str(o["yaml"].as_str().expect("yaml")).expect("object"))
        .collect();
    let find = |kind: &str, name: &str| {
        objects
            .iter()
            .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("no {kind} {name} in the render"))
    };
    let mesh = &find("Mesh", "e2e-abc123")["spec"];
    assert_eq!(
        mesh["nodeSelector"],
        serde_json::json!({"kubernetes.io/hostname": "node-a"})
    );
    assert_eq!(
        mesh["agent"]["executionProviders"],
        serde_json::json!(["cpu"])
    );
    assert!(mesh["agent"]["resources"].is_null(), "{mesh}");
    assert!(mesh["tolerations"].is_null(), "{mesh}");
    assert!(mesh["heartbeatSeconds"].as_u64() < mesh["leaseSeconds"].as_u64());
    let pod = &find("Deployment", release)["spec"]["template"]["spec"];
    assert_eq!(pod["nodeSelector"]["kubernetes.io/hostname"], "node-a");
    let operator = &pod["containers"][0];
    assert_eq!(operator["name"], "operator");
    assert_eq!(operator["image"], "reg/op:e2e");
    let env = |name: &str| {
        operator["env"]
            .as_array()
            .and_then(|e| e.iter().find(|v| v["name"] == name))
            .map(|v| v["value"].clone())
            .unwrap_or_default()
    };
    assert_eq!(env("INFERMESH_DATA_CLAIM"), DATA_CLAIM);
    assert_eq!(env("INFERMESH_AGENT_IMAGE"), "reg/agent:e2e");
    assert_eq!(env("INFERMESH_LEADER_LEASE"), format!("{release}-leader"));
    let postgres = find("StatefulSet", &format!("{release}-postgres"));
    assert_eq!(
        postgres["spec"]["volumeClaimTemplates"][0]["spec"]["storageClassName"],
        "fast"
    );
    find("Service", &format!("{release}-grpc"));
    find("Service", &format!("{release}-metrics"));
}

#[test]
fn the_cluster_quickstart_manifests_parse_and_validate() {
    let doc = std::fs::read_to_string(workspace().join("docs/cluster-quickstart.md"))
        .expect("docs/cluster-quickstart.md");
    // The contents of fenced blocks; each infermesh object runs to its heredoc's end.
    let manifests: Vec<&str> = doc
        .split("```")
        .skip(1)
        .step_by(2)
        .filter_map(|block| {
            let start = block.find("apiVersion: infermesh.dev/v1alpha1")?;
            block[start..].split("\nEOF").next()
        })
        .collect();
    let (mut meshes, mut workloads) = (0, 0);
    for m in &manifests {
        for object in infermesh_crds::parse_manifests(m).unwrap_or_else(|e| panic!("{e}\n{m}")) {
            match object {
                infermesh_crds::Manifest::Mesh(mesh) => {
                    meshes += 1;
                    assert!(mesh.spec.heartbeat_seconds < mesh.spec.lease_seconds);
                }
                infermesh_crds::Manifest::Workload(w) => {
                    workloads += 1;
                    infermesh_operator::core::validate::validate(&w.spec)
                        .unwrap_or_else(|e| panic!("{e}\n{m}"));
                }
                infermesh_crds::Manifest::Secret(_) => panic!("no Secret expected\n{m}"),
            }
        }
    }
    assert_eq!((meshes, workloads), (1, 1), "{manifests:?}");
}
