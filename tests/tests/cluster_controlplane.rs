//! Cluster mode against a real control plane (`scripts/controlplane.sh`: etcd,
//! kube-apiserver, kube-controller-manager, kube-scheduler and kwok, built from Go modules):
//! everything the mocked API server of the controller tests cannot prove.
//!
//! - The chart is installed with the real Helm library into a namespace that enforces the
//!   `restricted` Pod Security level; the CRDs become Established; the API server itself
//!   refuses manifests the CRDs' schema and CEL rules forbid, with their messages.
//! - kwok plays the kubelet of three fake Nodes, two labelled `nvidia.com/gpu.present=true`:
//!   the chart's operator pods and the Mesh's agent DaemonSet pods are scheduled and marked
//!   Running, the DaemonSet's on exactly the labelled nodes.
//! - The operator runs as local processes (no container runs on a fake node), each as one of
//!   the chart's operator pods, authenticated with the chart ServiceAccount's token
//!   (TokenRequest): every call it makes is authorized by the chart's own RBAC.
//! - Agents run as local processes, one per labelled node, each with a token for the Mesh's
//!   ServiceAccount bound to its DaemonSet pod (TokenRequest, audience `infermesh`), dialling
//!   the operator through a stand-in for the gRPC Service (it forwards to the pod labelled
//!   leader, as the Service's selector does). The operator's TokenReview accepts them and
//!   refuses a token of another ServiceAccount.
//! - Workloads run to `Succeeded`; `kubectl get` and `kubectl describe` show the documented
//!   columns, conditions and Events; status is written by server-side apply under the
//!   operator's field manager; an Agent's `spec.unschedulable` drains it; the finalizer
//!   holds a deleted Workload while no operator runs and releases it when one does; a
//!   deleted node takes its Agent with it.
//! - Two operator processes: one holds the Lease; when it is killed in the middle of a
//!   Workload the other takes over within a lease period, resumes from Postgres, and no shard
//!   completed before the kill runs again; every shard is charged exactly once.
//!
//! It needs the control plane's binaries (`bash scripts/controlplane.sh build`, which the
//! README's test command runs) and fails, not skips, without them.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use infermesh_deploy::controlplane::ControlPlane;
use infermesh_tests::cluster::{
    Proc, apply, condition, free_port, grpc_ca, install_chart, json, names_where, node_yaml,
    running_pods_by_node, tensor_workload, wait_for,
};
use infermesh_tests::{bin, ledger, workspace};
use serde_json::Value;

const NS: &str = "infermesh";
const RELEASE: &str = "infermesh";
const TEAM: &str = "team-a";
const MESH: &str = "cpu";
const WORKLOADS: &str = "workloads.infermesh.dev";
const AGENTS: &str = "agents.infermesh.dev";
const MESHES: &str = "meshes.infermesh.dev";
const GPU_NODES: [&str; 2] = ["kwok-gpu-0", "kwok-gpu-1"];
const CPU_NODE: &str = "kwok-cpu-0";
/// The Pod Security level the chart's namespace enforces.
const PSS: &str = "restricted";
/// Seconds of the operators' leader Lease.
const LEASE: u64 = 6;

/// The gRPC Service's stand-in: a loopback port that forwards each new connection to the
/// operator process playing the pod labelled leader (what the Service's selector picks).
fn leader_proxy(kubeconfig: PathBuf, ports: BTreeMap<String, u16>) -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let ports = Arc::new(ports);
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            listener.set_nonblocking(true).expect("nonblocking");
            let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    continue;
                };
                let kubeconfig = kubeconfig.clone();
                let ports = ports.clone();
                tokio::spawn(async move {
                    let leader = tokio::task::spawn_blocking(move || {
                        let out = Command::new(infermesh_deploy::tools::kubectl().ok()?)
                            .arg("--kubeconfig")
                            .arg(&kubeconfig)
                            .args(["get", "pods", "-n", NS, "-l", "infermesh.dev/leader=true"])
                            .args(["-o", "jsonpath={.items[*].metadata.name}"])
                            .output()
                            .ok()?;
                        String::from_utf8(out.stdout).ok()
                    })
                    .await
                    .ok()
                    .flatten()
                    .unwrap_or_default();
                    let target = leader
                        .split_whitespace()
                        .find_map(|p| ports.get(p).copied());
                    let Some(target) = target else {
                        return; // no leader: the connection is refused, as by an empty Service
                    };
                    let addr = SocketAddr::from(([127, 0, 0, 1], target));
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(addr).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        });
    });
    port
}

fn mesh_yaml() -> String {
    format!(
        r#"apiVersion: infermesh.dev/v1alpha1
kind: Mesh
metadata: {{name: {MESH}}}
spec:
  nodeSelector: {{nvidia.com/gpu.present: "true"}}
  agent:
    slots: 2
    executionProviders: [cpu]
  leaseSeconds: 10
  heartbeatSeconds: 2
  pricing: {{perGpuSecond: 0, perCpuSecond: 0.05, perThousandRecords: 0.2}}
"#
    )
}

/// A tensor Workload over `records` records of `dir/in-<name>.jsonl`.
fn workload(dir: &Path, name: &str, records: usize, shard_bytes: &str) -> String {
    tensor_workload(dir, TEAM, MESH, name, records, shard_bytes)
}

/// Drains (or undrains) an Agent as a person would: its `spec.unschedulable`.
fn set_unschedulable(cp: &ControlPlane, agent: &str, unschedulable: bool) {
    let patch = serde_json::json!({"spec": {"unschedulable": unschedulable}}).to_string();
    cp.ok(
        &["patch", AGENTS, agent, "--type=merge", "-p", &patch],
        None,
    )
    .unwrap_or_else(|e| panic!("unschedulable={unschedulable}: {e:#}"));
}

/// One HTTP/1.1 request to the console: (status, headers and body).
fn http(port: u16, method: &str, path: &str, token: Option<&str>, form: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect to the console");
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nOrigin: http://127.0.0.1:{port}\r\n\
         Accept: text/html\r\n{auth}Content-Type: application/x-www-form-urlencoded\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{form}",
        form.len()
    );
    s.write_all(req.as_bytes()).expect("send");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let code = out.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    (code, out)
}

/// The session's CSRF token, as a page carries it.
fn csrf(page: &str) -> String {
    page.split(r#"name="csrf" value=""#)
        .nth(1)
        .and_then(|r| r.split('"').next())
        .or_else(|| {
            page.split("X-CSRF-Token&quot;:&quot;")
                .nth(1)
                .and_then(|r| r.split('&').next())
        })
        .unwrap_or_else(|| panic!("no CSRF token in the page:\n{page}"))
        .to_string()
}

/// The leader's console with two people's own ServiceAccount tokens: a viewer of team-a's
/// Workloads and an operator of them (and of the Agents). Each request is checked with a
/// TokenReview and a SubjectAccessReview by the real API server; the actions reach the
/// objects through the API.
fn console_with_people_s_tokens(cluster: &Cluster, first_uid: &str) {
    let cp = &cluster.cp;
    let leader = cluster.leader().expect("a leader");
    let port = cluster.http_ports[&leader];
    apply(
        cp,
        &format!(
            r#"apiVersion: v1
kind: ServiceAccount
metadata: {{name: viewer, namespace: {TEAM}}}
---
apiVersion: v1
kind: ServiceAccount
metadata: {{name: steward, namespace: {TEAM}}}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {{name: workload-viewer, namespace: {TEAM}}}
rules: [{{apiGroups: [infermesh.dev], resources: [workloads], verbs: [get, list]}}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {{name: workload-steward, namespace: {TEAM}}}
rules: [{{apiGroups: [infermesh.dev], resources: [workloads], verbs: [get, list, patch, delete]}}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {{name: agent-steward}}
rules: [{{apiGroups: [infermesh.dev], resources: [agents], verbs: [list, patch]}}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {{name: viewer, namespace: {TEAM}}}
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: Role, name: workload-viewer}}
subjects: [{{kind: ServiceAccount, name: viewer, namespace: {TEAM}}}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {{name: steward, namespace: {TEAM}}}
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: Role, name: workload-steward}}
subjects: [{{kind: ServiceAccount, name: steward, namespace: {TEAM}}}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {{name: agent-steward}}
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: agent-steward}}
subjects: [{{kind: ServiceAccount, name: steward, namespace: {TEAM}}}]
"#
        ),
    );
    let token = |sa: &str| {
        cp.ok(&["create", "token", sa, "-n", TEAM], None)
            .expect("TokenRequest")
            .trim()
            .to_string()
    };
    let (viewer, steward) = (token("viewer"), token("steward"));
    let page = format!("/workloads/{TEAM}/first/{first_uid}");

    // No token, and a token the API server does not know: a browser goes to the sign-in
    // form, anything else is refused.
    for token in [None, Some("not-a-token")] {
        let (code, head) = http(port, "GET", &page, token, "");
        assert_eq!(code, 303, "{head}");
        assert!(head.contains("location: /login"), "{head}");
        let (code, _) = http(port, "POST", &format!("{page}/cancel"), token, "csrf=x");
        assert_eq!(code, 401);
    }
    // The viewer reads team-a's Workload, sees no action, and may not list the agents.
    let (code, body) = http(port, "GET", &page, Some(&viewer), "");
    assert_eq!(code, 200, "{body}");
    assert!(
        body.contains("Succeeded") && body.contains("100%"),
        "{body}"
    );
    assert!(
        !body.contains(">Cancel<") && !body.contains(">Retry"),
        "{body}"
    );
    let (code, body) = http(port, "GET", "/agents", Some(&viewer), "");
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("list agents"), "{body}");
    // ... and may not delete it: refused, nothing sent.
    let form = format!(
        "csrf={}",
        csrf(&http(port, "GET", &page, Some(&viewer), "").1)
    );
    let (code, body) = http(
        port,
        "POST",
        &format!("{page}/cancel"),
        Some(&viewer),
        &form,
    );
    assert_eq!(code, 403, "{body}");
    assert!(json(cp, &["get", WORKLOADS, "first", "-n", TEAM]).is_ok());

    // The steward drains and undrains an Agent: its spec, through the API.
    let agent = format!("{MESH}-{}", GPU_NODES[1]);
    let (code, agents_page) = http(port, "GET", "/agents", Some(&steward), "");
    assert_eq!(code, 200, "{agents_page}");
    let form = format!("csrf={}", csrf(&agents_page));
    for (action, want) in [("drain", true), ("undrain", false)] {
        let (code, body) = http(
            port,
            "POST",
            &format!("/agents/{agent}/{action}"),
            Some(&steward),
            &form,
        );
        assert_eq!(code, 303, "{action}: {body}");
        let a = json(cp, &["get", AGENTS, &agent]).expect("agent");
        assert_eq!(a["spec"]["unschedulable"], want, "{action}: {a}");
    }
    // A forged CSRF token does nothing.
    let (code, _) = http(
        port,
        "POST",
        &format!("/agents/{agent}/drain"),
        Some(&steward),
        "csrf=forged",
    );
    assert_eq!(code, 403);
    let a = json(cp, &["get", AGENTS, &agent]).expect("agent");
    assert_eq!(a["spec"]["unschedulable"], false, "{a}");

    // A Workload that starts suspended: the steward resumes it, and cancels it once it is
    // done (a delete with the uid as precondition; the finalizer lets it go).
    let held = workload(cluster.dir.path(), "held", 40, "1Ki")
        .replace("\nspec:\n", "\nspec:\n  suspend: true\n");
    assert!(held.contains("suspend: true"), "{held}");
    apply(cp, &held);
    let uid = wait_for(
        "the held Workload admitted",
        Duration::from_secs(30),
        || {
            let uid = cluster.uid("held");
            let (code, body) = http(
                port,
                "GET",
                &format!("/workloads/{TEAM}/held/{uid}"),
                Some(&steward),
                "",
            );
            (code == 200 && body.contains(">Resume<"))
                .then_some(uid)
                .ok_or(body)
        },
    );
    let held_page = format!("/workloads/{TEAM}/held/{uid}");
    let form = format!(
        "csrf={}",
        csrf(&http(port, "GET", &held_page, Some(&steward), "").1)
    );
    let (code, body) = http(
        port,
        "POST",
        &format!("{held_page}/resume"),
        Some(&steward),
        &form,
    );
    assert_eq!(code, 303, "{body}");
    let w = json(cp, &["get", WORKLOADS, "held", "-n", TEAM]).expect("held");
    assert_eq!(w["spec"]["suspend"], false, "{w}");
    wait_phase(cp, "held", "Succeeded", Duration::from_secs(120));
    let (code, body) = http(
        port,
        "POST",
        &format!("{held_page}/cancel"),
        Some(&steward),
        &form,
    );
    assert_eq!(code, 303, "{body}");
    wait_gone(
        cp,
        "the cancelled Workload to go",
        &[WORKLOADS, "held", "-n", TEAM],
    );
}

/// Waits until `kubectl get ARGS` finds nothing (the object is gone).
fn wait_gone(cp: &ControlPlane, what: &str, args: &[&str]) {
    let mut all = vec!["get"];
    all.extend_from_slice(args);
    wait_for(what, Duration::from_secs(90), || {
        let out = cp.run(&all, None).map_err(|e| format!("{e:#}"))?;
        (!out.status.success())
            .then_some(())
            .ok_or_else(|| String::from_utf8_lossy(&out.stdout).into_owned())
    });
}

/// Waits for a Workload's phase and returns its status.
fn wait_phase(cp: &ControlPlane, name: &str, phase: &str, timeout: Duration) -> Value {
    wait_for(&format!("workload {name} {phase}"), timeout, || {
        let w = json(cp, &["get", WORKLOADS, name, "-n", TEAM])?;
        let s = w["status"].clone();
        if s["phase"] == phase {
            Ok(s)
        } else if s["phase"] == "Failed" {
            panic!("workload {name} failed: {s}");
        } else {
            Err(format!("phase {} shards {}", s["phase"], s["shards"]))
        }
    })
}

/// (apiGroup, resource[/subresource], verb) of every request `user` made, from the API
/// server's audit log, and the requests it refused (403). A server-side apply that created
/// its object (201) needs `create` as well as `patch`, so it counts as both.
fn audited(path: &Path, user: &str) -> (BTreeSet<(String, String, String)>, Vec<String>) {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut used = BTreeSet::new();
    let mut refused = Vec::new();
    for line in text.lines() {
        let Ok(e) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        if e["user"]["username"] != user || e["stage"] != "ResponseComplete" {
            continue;
        }
        let o = &e["objectRef"];
        let Some(resource) = o["resource"].as_str() else {
            continue; // a non-resource URL (discovery)
        };
        let resource = match o["subresource"].as_str() {
            Some(sub) => format!("{resource}/{sub}"),
            None => resource.to_string(),
        };
        let group = o["apiGroup"].as_str().unwrap_or_default().to_string();
        let verb = e["verb"].as_str().unwrap_or_default().to_string();
        let code = e["responseStatus"]["code"].as_i64().unwrap_or(0);
        if code == 403 {
            refused.push(format!(
                "{verb} {group}/{resource}: {}",
                e["responseStatus"]["message"]
            ));
            continue;
        }
        if verb == "patch" && code == 201 {
            used.insert((group.clone(), resource.clone(), "create".to_string()));
        }
        used.insert((group, resource, verb));
    }
    (used, refused)
}

/// (apiGroup, resource, verb) of every rule of a Role or ClusterRole.
fn rules(role: &Value) -> BTreeSet<(String, String, String)> {
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut out = BTreeSet::new();
    for r in role["rules"].as_array().cloned().unwrap_or_default() {
        for g in strings(&r["apiGroups"]) {
            for res in strings(&r["resources"]) {
                for v in strings(&r["verbs"]) {
                    out.insert((g.clone(), res.clone(), v));
                }
            }
        }
    }
    out
}

/// The event log of a workload (its uid), from the store.
fn events(url: &str, uid: &str) -> Vec<Value> {
    let run = ledger(url, &["events", "--workload", uid, "-o", "json"]);
    assert_eq!(run.code, Some(0), "{}", run.text());
    serde_json::from_str::<Value>(&run.stdout)
        .expect("events JSON")
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn count(events: &[Value], kind: &str) -> usize {
    events.iter().filter(|e| e["kind"] == kind).count()
}

struct Cluster {
    cp: ControlPlane,
    dir: tempfile::TempDir,
    url: String,
    operator_kubeconfig: PathBuf,
    /// Operator pod name -> its process's gRPC port.
    grpc_ports: BTreeMap<String, u16>,
    /// Operator pod name -> its process's HTTP port (metrics, health, the console).
    http_ports: BTreeMap<String, u16>,
    proxy: u16,
    ca: PathBuf,
}

impl Drop for Cluster {
    /// On failure: the tail of every process's log and of the API server's.
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        let mut logs: Vec<PathBuf> = std::fs::read_dir(self.dir.path())
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        logs.retain(|p| p.extension().is_some_and(|e| e == "log"));
        logs.sort();
        for path in logs {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            eprintln!(
                "==== {} (last 40 lines)\n{}",
                path.display(),
                lines[lines.len().saturating_sub(40)..].join("\n")
            );
        }
        eprintln!(
            "==== kube-apiserver\n{}",
            self.cp.log_tail("kube-apiserver", 20)
        );
    }
}

impl Cluster {
    fn operator(&self, pod: &str) -> Proc {
        let mut cmd = Command::new(bin("infermesh"));
        cmd.arg("operator")
            .env("KUBECONFIG", &self.operator_kubeconfig)
            .env("INFERMESH_DATABASE_URL", &self.url)
            .env("INFERMESH_NAMESPACE", NS)
            .env("INFERMESH_POD_NAME", pod)
            .env(
                "INFERMESH_GRPC_ADDR",
                format!("127.0.0.1:{}", self.grpc_ports[pod]),
            )
            .env(
                "INFERMESH_HTTP_ADDR",
                format!("127.0.0.1:{}", self.http_ports[pod]),
            )
            .env(
                "INFERMESH_GRPC_ENDPOINT",
                format!("https://{RELEASE}-grpc.{NS}.svc:7443"),
            )
            .env("INFERMESH_LEADER_LEASE_SECONDS", LEASE.to_string())
            .env("INFERMESH_LOG_JSON", "false")
            .env("INFERMESH_LOG", "info");
        Proc::spawn(&format!("operator-{pod}"), cmd, self.dir.path())
    }

    /// An agent process for `node`, with a token for `service_account` bound to `pod`.
    fn agent(&self, node: &str, service_account: &str, pod: Option<&str>) -> Proc {
        let mut args = vec![
            "create",
            "token",
            service_account,
            "-n",
            NS,
            "--audience",
            "infermesh",
            "--duration",
            "1h",
        ];
        if let Some(pod) = pod {
            args.extend(["--bound-object-kind", "Pod", "--bound-object-name", pod]);
        }
        let token = self.cp.ok(&args, None).expect("TokenRequest");
        let token_file = self
            .dir
            .path()
            .join(format!("token-{node}-{service_account}"));
        std::fs::write(&token_file, token.trim()).expect("token");
        let cache = self.dir.path().join(format!("cache-{node}"));
        std::fs::create_dir_all(&cache).expect("cache");
        let mut cmd = Command::new(bin("infermesh-agent"));
        cmd.env(
            "INFERMESH_OPERATOR",
            format!("https://127.0.0.1:{}", self.proxy),
        )
        .env(
            "INFERMESH_TLS_SERVER_NAME",
            format!("{RELEASE}-grpc.{NS}.svc"),
        )
        .env("INFERMESH_CA_CERT", &self.ca)
        .env("INFERMESH_TOKEN_FILE", &token_file)
        .env("INFERMESH_MESH", MESH)
        .env("INFERMESH_NODE", node)
        .env("INFERMESH_SLOTS", "2")
        .env("INFERMESH_EXECUTION_PROVIDERS", "cpu")
        .env("INFERMESH_MODEL_CACHE", &cache)
        .env(
            "INFERMESH_METRICS_ADDR",
            format!("127.0.0.1:{}", free_port()),
        )
        .env("INFERMESH_LOG_JSON", "false");
        Proc::spawn(
            &format!("agent-{node}-{service_account}"),
            cmd,
            self.dir.path(),
        )
    }

    fn leader(&self) -> Result<String, String> {
        let lease = json(
            &self.cp,
            &["get", "lease", "infermesh-operator-leader", "-n", NS],
        )?;
        lease["spec"]["holderIdentity"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| format!("no holder: {lease}"))
    }

    fn uid(&self, name: &str) -> String {
        self.cp
            .ok(
                &[
                    "get",
                    WORKLOADS,
                    name,
                    "-n",
                    TEAM,
                    "-o",
                    "jsonpath={.metadata.uid}",
                ],
                None,
            )
            .expect("uid")
            .trim()
            .to_string()
    }
}

#[test]
fn the_operator_runs_on_a_real_control_plane() {
    let t0 = Instant::now();
    let cp = ControlPlane::start().expect("the control plane starts");
    eprintln!("control plane ready in {:.1?}", cp.startup);
    let dir = tempfile::tempdir().expect("tmp");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let url = rt
        .block_on(infermesh_operator::store::testing::fresh_database())
        .expect("a throwaway Postgres");

    // Nodes: two GPU-labelled, one not. kwok marks them Ready.
    for n in GPU_NODES {
        apply(&cp, &node_yaml(n, true));
    }
    apply(&cp, &node_yaml(CPU_NODE, false));
    wait_for("three Ready nodes", Duration::from_secs(60), || {
        let nodes = json(&cp, &["get", "nodes"])?;
        let ready = names_where(&nodes, |n| {
            condition(&n["status"], "Ready")["status"] == "True"
        });
        (ready.len() == 3)
            .then_some(())
            .ok_or(format!("ready {ready:?}"))
    });

    // The chart's namespace enforces the restricted Pod Security level.
    cp.ok(&["create", "namespace", NS], None)
        .expect("namespace");
    cp.ok(
        &[
            "label",
            "namespace",
            NS,
            &format!("pod-security.kubernetes.io/enforce={PSS}"),
            &format!("pod-security.kubernetes.io/warn={PSS}"),
        ],
        None,
    )
    .expect("label");
    cp.ok(&["create", "namespace", TEAM], None).expect("team");
    // The chart, with the real Helm library: two operator replicas (the default), an external
    // database, no Mesh of its own.
    install_chart(&cp, NS, RELEASE, &url, &serde_json::json!({})).expect("the chart installs");

    // The API server itself refuses what the CRDs' schema and CEL rules forbid.
    let bad = workload(dir.path(), "bad", 1, "4Ki").replace("maxAttempts: 4", "maxAttempts: 0");
    let refused = cp
        .dry_run(&bad, None)
        .expect_err("maxAttempts 0 is refused");
    assert!(refused.contains("spec.maxAttempts"), "{refused}");
    // YAML 1.1, which kubectl reads, takes a bare `y` for the boolean true: an output named
    // y must be quoted (infermesh's own YAML 1.2 reader takes it as the string).
    let bare = workload(dir.path(), "bare", 1, "4Ki").replace(r#"["y", "s"]"#, "[y, s]");
    let refused = cp.dry_run(&bare, None).expect_err("a bare y is a boolean");
    assert!(refused.contains("outputs[0]: expected string"), "{refused}");
    let bad = mesh_yaml().replace("slots: 2", "slots: 0");
    let refused = cp.dry_run(&bad, None).expect_err("slots 0 is refused");
    assert!(refused.contains("spec.agent.slots"), "{refused}");
    let example = std::fs::read_to_string(workspace().join("examples/mesh.yaml")).expect("example");
    cp.dry_run(&example, None)
        .unwrap_or_else(|e| panic!("examples/mesh.yaml is accepted: {e}"));

    // The operator pods are scheduled on the fake nodes and Running (kwok); their names are
    // what the two operator processes play.
    let selector =
        format!("app.kubernetes.io/instance={RELEASE},app.kubernetes.io/component=operator");
    let pods: Vec<String> = wait_for("two Running operator pods", Duration::from_secs(90), || {
        let pods = json(&cp, &["get", "pods", "-n", NS, "-l", &selector])?;
        let running = names_where(&pods, |p| p["status"]["phase"] == "Running");
        (running.len() == 2)
            .then(|| running.clone())
            .ok_or(format!("running {running:?}"))
    });

    // The operator's credentials: its chart ServiceAccount's token.
    let token = cp
        .ok(
            &["create", "token", RELEASE, "-n", NS, "--duration", "2h"],
            None,
        )
        .expect("operator token");
    let operator_kubeconfig = cp
        .token_kubeconfig("operator", token.trim())
        .expect("kubeconfig");
    let grpc_ports: BTreeMap<String, u16> = pods.iter().map(|p| (p.clone(), free_port())).collect();
    let proxy = leader_proxy(cp.kubeconfig(), grpc_ports.clone());
    let ca = dir.path().join("grpc-ca.crt");
    let cluster = Cluster {
        cp,
        dir,
        url,
        operator_kubeconfig,
        grpc_ports,
        http_ports: pods.iter().map(|p| (p.clone(), free_port())).collect(),
        proxy,
        ca,
    };
    let mut operator_logs = Vec::new();
    let first = cluster.operator(&pods[0]);
    operator_logs.push(first.log.clone());
    let leader = wait_for(
        "the first operator to lead",
        Duration::from_secs(60),
        || cluster.leader(),
    );
    assert_eq!(leader, pods[0]);
    let mut second = cluster.operator(&pods[1]);
    operator_logs.push(second.log.clone());
    let cp = &cluster.cp;

    // The Meshes: the example (a GPU mesh) and a CPU one for the run; their DaemonSets get
    // pods on exactly the labelled nodes.
    apply(cp, &example);
    apply(cp, &mesh_yaml());
    let mesh_pods =
        |mesh: &str| running_pods_by_node(cp, NS, &format!("infermesh.dev/mesh={mesh}"));
    let example_mesh =
        serde_yaml::from_str::<Value>(&example).expect("example yaml")["metadata"]["name"]
            .as_str()
            .expect("name")
            .to_string();
    let expected: BTreeSet<String> = GPU_NODES.iter().map(|n| n.to_string()).collect();
    let mut agent_pods = BTreeMap::new();
    for mesh in [example_mesh.as_str(), MESH] {
        agent_pods = wait_for(
            &format!("mesh {mesh}'s agent pods on the GPU nodes"),
            Duration::from_secs(90),
            || {
                let p = mesh_pods(mesh)?;
                let nodes: BTreeSet<String> = p.keys().cloned().collect();
                (nodes == expected)
                    .then(|| p.clone())
                    .ok_or(format!("{p:?}"))
            },
        );
    }

    // The operator made the gRPC TLS Secret; agents trust its CA.
    let ca = grpc_ca(cp, NS, Duration::from_secs(60));
    std::fs::write(&cluster.ca, ca).expect("ca");

    // Agents: one per labelled node, each with a token bound to its DaemonSet pod.
    let mut agents: BTreeMap<&str, Proc> = BTreeMap::new();
    let agent_sa = format!("{RELEASE}-agent-{MESH}");
    for node in GPU_NODES {
        agents.insert(
            node,
            cluster.agent(node, &agent_sa, Some(&agent_pods[node])),
        );
    }
    let agent_name = |node: &str| format!("{MESH}-{node}");
    wait_for("two Ready Agents", Duration::from_secs(90), || {
        let a = json(
            cp,
            &["get", AGENTS, "-l", &format!("infermesh.dev/mesh={MESH}")],
        )?;
        let ready = names_where(&a, |a| a["status"]["phase"] == "Ready");
        (ready.len() == 2)
            .then_some(())
            .ok_or(format!("ready {ready:?}"))
    });
    for node in GPU_NODES {
        let a = json(cp, &["get", AGENTS, &agent_name(node)]).expect("agent");
        assert_eq!(a["spec"]["node"], node);
        assert_eq!(a["spec"]["mesh"], MESH);
    }

    // A token of another ServiceAccount is refused by the TokenReview check.
    cp.ok(&["create", "serviceaccount", "intruder", "-n", NS], None)
        .expect("sa");
    let intruder = cluster.agent(CPU_NODE, "intruder", None);
    wait_for(
        "the intruder to be refused",
        Duration::from_secs(30),
        || {
            let log = intruder.log();
            (log.contains("operator refused this agent")
                && log.contains("system:serviceaccount:infermesh:intruder may not serve mesh cpu"))
            .then_some(())
            .ok_or(log)
        },
    );
    drop(intruder);
    let a = json(cp, &["get", AGENTS]).expect("agents");
    assert!(
        a["items"]
            .as_array()
            .is_some_and(|i| i.iter().all(|a| a["spec"]["node"] != CPU_NODE)),
        "no Agent for the intruder: {a}"
    );

    // Drain one agent (spec.unschedulable): the first Workload runs on the other only.
    set_unschedulable(cp, &agent_name(GPU_NODES[1]), true);
    wait_for(
        "the drained Agent's status",
        Duration::from_secs(30),
        || {
            let a = json(cp, &["get", AGENTS, &agent_name(GPU_NODES[1])])?;
            (a["status"]["phase"] == "Draining")
                .then_some(())
                .ok_or(format!("{}", a["status"]))
        },
    );
    apply(cp, &workload(cluster.dir.path(), "first", 400, "2Ki"));
    let status = wait_phase(cp, "first", "Succeeded", Duration::from_secs(120));
    let total = status["shards"]["total"].as_u64().expect("total");
    assert!(total > 3, "{status}");
    assert_eq!(condition(&status, "Complete")["status"], "True", "{status}");
    assert_eq!(condition(&status, "Admitted")["status"], "True", "{status}");
    assert_eq!(status["records"], 400);
    let first_uid = cluster.uid("first");
    let ev = events(&cluster.url, &first_uid);
    let agents_used: BTreeSet<&str> = ev
        .iter()
        .filter(|e| e["kind"] == "shard.completed")
        .filter_map(|e| e["agent"].as_str())
        .collect();
    assert_eq!(
        agents_used,
        BTreeSet::from([agent_name(GPU_NODES[0]).as_str()]),
        "the drained agent got no shard"
    );
    set_unschedulable(cp, &agent_name(GPU_NODES[1]), false);

    // What a person looks at.
    let table = cp
        .ok(&["get", WORKLOADS, "-A"], None)
        .expect("get workloads");
    for column in [
        "NAMESPACE",
        "MESH",
        "STATUS",
        "PROGRESS",
        "ETA",
        "CREDITS",
        "AGE",
    ] {
        assert!(table.contains(column), "kubectl get workloads -A:\n{table}");
    }
    assert!(
        table.contains("first") && table.contains("Succeeded") && table.contains("100%"),
        "{table}"
    );
    let table = cp.ok(&["get", AGENTS], None).expect("get agents");
    for column in [
        "MESH", "NODE", "GPU", "STATUS", "RUNNING", "DONE", "CREDITS", "AGE",
    ] {
        assert!(table.contains(column), "kubectl get agents:\n{table}");
    }
    let described = wait_for(
        "the Events in kubectl describe",
        Duration::from_secs(30),
        || {
            let d = cp
                .ok(&["describe", WORKLOADS, "first", "-n", TEAM], None)
                .map_err(|e| format!("{e:#}"))?;
            (d.contains("Admitted") && d.contains("Succeeded") && d.contains("Events:"))
                .then(|| d.clone())
                .ok_or(d)
        },
    );
    for part in ["Conditions:", "Complete", "Shards:"] {
        assert!(described.contains(part), "kubectl describe:\n{described}");
    }
    console_with_people_s_tokens(&cluster, &first_uid);

    // Status is the operator's, written by server-side apply under its field manager.
    let w = json(
        cp,
        &[
            "get",
            WORKLOADS,
            "first",
            "-n",
            TEAM,
            "--show-managed-fields",
        ],
    )
    .expect("w");
    let managers: Vec<(String, String, String)> = w["metadata"]["managedFields"]
        .as_array()
        .map(|m| {
            m.iter()
                .map(|f| {
                    (
                        f["manager"].as_str().unwrap_or_default().to_string(),
                        f["operation"].as_str().unwrap_or_default().to_string(),
                        f["subresource"].as_str().unwrap_or_default().to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    assert!(
        managers.contains(&("infermesh-operator".into(), "Apply".into(), "status".into())),
        "status written by SSA as infermesh-operator: {managers:?}"
    );
    assert!(
        w["metadata"]["finalizers"]
            .as_array()
            .is_some_and(|f| !f.is_empty()),
        "a running operator holds a finalizer: {}",
        w["metadata"]
    );

    // Fail-over: the leader is killed in the middle of a Workload.
    apply(cp, &workload(cluster.dir.path(), "second", 6000, "1Ki"));
    let second_uid = wait_for("the second workload's uid", Duration::from_secs(30), || {
        let uid = cluster.uid("second");
        (!uid.is_empty())
            .then_some(uid)
            .ok_or_else(|| "no uid yet".to_string())
    });
    wait_for(
        "some of the second workload done",
        Duration::from_secs(120),
        || {
            let done = count(&events(&cluster.url, &second_uid), "shard.completed");
            (done >= 5).then_some(()).ok_or(format!("{done} completed"))
        },
    );
    for a in agents.values() {
        a.signal("-STOP");
    }
    first.signal("-KILL");
    let killed = Instant::now();
    let before = events(&cluster.url, &second_uid);
    let done_before: BTreeSet<i64> = before
        .iter()
        .filter(|e| e["kind"] == "shard.completed")
        .filter_map(|e| e["shard"].as_i64())
        .collect();
    let last_seq = before
        .iter()
        .filter_map(|e| e["seq"].as_i64())
        .max()
        .unwrap_or(0);
    for a in agents.values() {
        a.signal("-CONT");
    }
    let new_leader = wait_for(
        "the standby to lead",
        Duration::from_secs(4 * LEASE),
        || match cluster.leader()? {
            l if l == pods[1] => Ok(l),
            l => Err(format!("holder {l}")),
        },
    );
    let took_over = killed.elapsed();
    assert_eq!(new_leader, pods[1]);
    assert!(
        took_over <= Duration::from_secs(2 * LEASE + 5),
        "the standby took over in {took_over:?} (lease {LEASE}s)"
    );
    let status = wait_phase(cp, "second", "Succeeded", Duration::from_secs(240));
    let total = status["shards"]["total"].as_u64().expect("total") as usize;
    assert!(
        done_before.len() < total,
        "the kill came before the end ({} of {total} done)",
        done_before.len()
    );
    let after = events(&cluster.url, &second_uid);
    assert_eq!(
        count(&after, "shard.completed"),
        total,
        "each shard completed once"
    );
    for e in after
        .iter()
        .filter(|e| e["seq"].as_i64().unwrap_or(0) > last_seq)
    {
        if e["kind"] == "shard.assigned" {
            let shard = e["shard"].as_i64().unwrap_or(-1);
            assert!(
                !done_before.contains(&shard),
                "shard {shard} ran again after the fail-over: {e}"
            );
        }
    }
    let verify = ledger(&cluster.url, &["verify", "--outputs"]);
    assert_eq!(verify.code, Some(0), "{}", verify.text());
    assert!(second.running(), "the standby runs: {}", second.log());

    // The finalizer: with no operator, a deleted Workload waits; an operator releases it.
    drop(second);
    cp.ok(
        &["delete", WORKLOADS, "first", "-n", TEAM, "--wait=false"],
        None,
    )
    .expect("delete");
    std::thread::sleep(Duration::from_secs(3));
    let held = json(cp, &["get", WORKLOADS, "first", "-n", TEAM]).expect("still there");
    assert!(
        held["metadata"]["deletionTimestamp"].is_string(),
        "{}",
        held["metadata"]
    );
    let third = cluster.operator(&pods[0]);
    operator_logs.push(third.log.clone());
    wait_gone(
        cp,
        "the deleted Workload to go",
        &[WORKLOADS, "first", "-n", TEAM],
    );

    // A deleted Mesh takes its DaemonSet and ServiceAccount with it.
    cp.ok(&["delete", MESHES, &example_mesh, "--timeout=60s"], None)
        .expect("delete mesh");
    wait_for(
        "the Mesh's DaemonSet and ServiceAccount to go",
        Duration::from_secs(60),
        || {
            let left = cp
                .ok(
                    &["get", "daemonsets,serviceaccounts", "-n", NS, "-o", "name"],
                    None,
                )
                .map_err(|e| format!("{e:#}"))?;
            let mine = format!("{RELEASE}-agent-{example_mesh}");
            (!left.lines().any(|l| l.ends_with(&format!("/{mine}"))))
                .then_some(())
                .ok_or(left)
        },
    );

    // A deleted node takes its (disconnected) Agent with it.
    let gone = GPU_NODES[1];
    drop(agents.remove(gone));
    cp.ok(&["delete", "node", gone], None).expect("delete node");
    let agent = agent_name(gone);
    wait_gone(cp, "the Agent of the deleted node to go", &[AGENTS, &agent]);

    // Every call the operators made was allowed by the chart's RBAC, and every rule the chart
    // grants was used: the API server's audit log against the installed roles.
    let operator_user = format!("system:serviceaccount:{NS}:{RELEASE}");
    let (used, refused) = audited(&cp.dir().join("logs/audit.log"), &operator_user);
    assert!(
        refused.is_empty(),
        "calls the chart's RBAC refused: {refused:#?}"
    );
    let mut granted = BTreeSet::new();
    for role in [
        json(cp, &["get", "clusterrole", RELEASE]).expect("clusterrole"),
        json(cp, &["get", "role", RELEASE, "-n", NS]).expect("role"),
    ] {
        granted.extend(rules(&role));
    }
    let missing: Vec<_> = used.difference(&granted).collect();
    assert!(missing.is_empty(), "used but not granted: {missing:?}");
    // Granted for a path the suite does not take: kube-runtime's event recorder patches an
    // Event (its series count) when an identical one repeats.
    let untaken = BTreeSet::from([(
        "events.k8s.io".to_string(),
        "events".to_string(),
        "patch".to_string(),
    )]);
    let excess: Vec<_> = granted
        .difference(&used)
        .filter(|r| !untaken.contains(*r))
        .collect();
    assert!(
        excess.is_empty(),
        "the chart grants rules the operator never used (remove them, or make the suite use \
         them): {excess:?}\nused: {used:?}"
    );
    drop(third);
    drop(first);
    for path in &operator_logs {
        let log = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            !log.contains("forbidden") && !log.contains("Forbidden"),
            "an operator was refused a call; the chart's RBAC lacks a rule ({}):\n{log}",
            path.display()
        );
    }
    eprintln!(
        "control plane suite: {:.1?} in all (control plane start {:.1?}, fail-over {:.1?})",
        t0.elapsed(),
        cluster.cp.startup,
        took_over
    );
}
