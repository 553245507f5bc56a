//! The real API server's verdict on what infermesh ships, from a control plane of its own
//! (`infermesh_deploy::controlplane`: kube-apiserver v1.34 with its default admission plugins,
//! PodSecurity included, the controllers, and kwok for a fake node).
//!
//! One test and one control plane: every check runs in sequence against it, and the test
//! fails with the list of every check that failed, after printing what it checked.
//!
//! 1. The CRDs are applied (server-side) and become Established.
//! 2. Every example, and the k3s overlay, is accepted by a server-side dry run: the CRDs'
//!    OpenAPI schemas, their CEL rules and strict field validation, as `kubectl apply` meets
//!    them.
//! 3. Bad manifests are refused, each with the server's message checked: every case the old
//!    hand-written schema validator had, the integer bounds it checked and the server did not
//!    until the schema said so, at least one case per CEL rule in the CRDs (found by walking
//!    them), an unknown field in a built-in kind, and YAML that Go reads differently.
//! 4. In namespace `infermesh`, labelled as `k8s/overlays/k3s/namespace.yaml` labels it (Pod
//!    Security "restricted", enforced), every object of every chart render in the values matrix
//!    is accepted without a warning, and so is a Pod made from each pod template: PodSecurity
//!    only warns on a Deployment or StatefulSet and enforces on its Pods. Pods that break the
//!    level one rule at a time (from the operator's pod) are refused with PodSecurity's
//!    message.
//! 5. The chart's RBAC with two tenant namespaces, applied for real, asked of the API server's
//!    RBAC authorizer (`kubectl auth can-i` as the operator's ServiceAccount): get on any Secret
//!    in a tenant namespace but no list or watch; no Secret in other namespaces or cluster-wide;
//!    in the release namespace the TLS Secret only (and create). The agents' ServiceAccount
//!    may read no Secret.
//! 6. The agent DaemonSet the operator builds for a Mesh: with `modelCache: EmptyDir` its pod
//!    is admitted under "restricted"; with `HostPath` it is refused under "restricted" and
//!    "baseline" and admitted under "privileged". Then the real DaemonSet controller, with a
//!    kwok node, makes the EmptyDir agent's pod in the restricted namespace and is refused the
//!    HostPath agent's pod there.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use common::{EXPECTED_EXAMPLES, example_files, kustomize_text, matrix, relative, rendered};
use infermesh_crds::{Manifest, Mesh, ModelCache};
use infermesh_deploy::chart::Rendered;
use infermesh_deploy::controlplane::ControlPlane;
use infermesh_deploy::object::{Object, parse_documents};
use infermesh_deploy::{NAMESPACE, workspace};
use infermesh_operator::controller::Config;
use infermesh_operator::controller::mesh::{build_daemonset, build_service_account};
use serde_json::{Value, json};

/// The start of PodSecurity's refusal in a namespace enforcing "restricted".
const RESTRICTED: &str = "violates PodSecurity \"restricted:latest\"";
/// Its warning for a workload object (enforcement applies to Pods only).
const RESTRICTED_WARNING: &str = "would violate PodSecurity \"restricted:latest\"";
/// A namespace enforcing "baseline", and one enforcing "privileged" (no restriction).
const BASELINE_NS: &str = "infermesh-baseline";
const PRIVILEGED_NS: &str = "infermesh-privileged";

/// API groups the test control plane does not serve, so their objects cannot be dry-run:
/// the Prometheus Operator's monitors (its CRDs belong to that operator and are not installed
/// here). `strict.rs` types these objects field by field instead (`tests/objects.rs`).
const NOT_SERVED: [&str; 1] = ["monitoring.coreos.com/"];

fn read(path: &str) -> String {
    let p = workspace().join(path);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// `text` with `from` replaced by `to`; `from` must occur.
fn variant(text: &str, from: &str, to: &str) -> String {
    assert!(text.contains(from), "{from:?} is not in the base text");
    text.replacen(from, to, 1)
}

/// `text` without the line `header` and the more-indented lines that follow it.
fn without_block(text: &str, header: &str) -> String {
    let indent = header.len() - header.trim_start().len();
    let mut out = String::new();
    let mut skipping = false;
    let mut found = false;
    for line in text.lines() {
        let depth = line.len() - line.trim_start().len();
        if line == header {
            skipping = true;
            found = true;
            continue;
        }
        if skipping && (line.trim().is_empty() || depth > indent) {
            continue;
        }
        skipping = false;
        out.push_str(line);
        out.push('\n');
    }
    assert!(found, "{header:?} is not in the base text");
    out
}

/// Removes `key` from the object `v`.
fn remove(v: &mut Value, key: &str) {
    if let Some(map) = v.as_object_mut() {
        map.remove(key);
    }
}

/// A `v1` List of `items`, as JSON (what kubectl reads in one go).
fn list(items: Vec<Value>) -> String {
    json!({"apiVersion": "v1", "kind": "List", "items": items}).to_string()
}

/// The Pod a workload controller would make from `obj`'s pod template, in `namespace`: same
/// spec and template metadata; a StatefulSet's claim templates become its claims' volumes.
/// `None` for a kind without a pod template.
fn pod_of(obj: &Value, namespace: &str) -> Option<Value> {
    let kind = obj["kind"].as_str()?;
    let name = obj["metadata"]["name"].as_str()?;
    let template = match kind {
        "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" | "Job" => {
            &obj["spec"]["template"]
        }
        "CronJob" => &obj["spec"]["jobTemplate"]["spec"]["template"],
        _ => return None,
    };
    let mut spec = template["spec"].clone();
    let mut pod_name = format!("{name}-pod");
    if kind == "StatefulSet" {
        pod_name = format!("{name}-0");
        for claim in obj["spec"]["volumeClaimTemplates"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let claim = claim["metadata"]["name"].as_str()?;
            let volume = json!({"name": claim,
                                "persistentVolumeClaim": {"claimName": format!("{claim}-{pod_name}")}});
            match spec["volumes"].as_array_mut() {
                Some(v) => v.push(volume),
                None => spec["volumes"] = json!([volume]),
            }
        }
    }
    let mut metadata = template
        .get("metadata")
        .cloned()
        .unwrap_or_else(|| json!({}));
    metadata["name"] = json!(pod_name);
    metadata["namespace"] = json!(namespace);
    Some(json!({"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec}))
}

/// What the server said to one `kubectl apply`.
struct Answer {
    accepted: bool,
    /// stderr: the refusal, or the warnings of an acceptance.
    said: String,
}

/// The control plane and what the checks found so far.
struct Checks<'a> {
    cp: &'a ControlPlane,
    failures: Vec<String>,
    /// What was checked, in order, with how many.
    counts: Vec<(String, usize)>,
    /// Where the time went.
    timings: Vec<(&'static str, Duration)>,
}

impl<'a> Checks<'a> {
    fn new(cp: &'a ControlPlane) -> Self {
        Self {
            cp,
            failures: Vec::new(),
            counts: Vec::new(),
            timings: Vec::new(),
        }
    }

    fn count(&mut self, what: &str) {
        match self.counts.iter_mut().find(|(w, _)| w == what) {
            Some((_, n)) => *n += 1,
            None => self.counts.push((what.to_string(), 1)),
        }
    }

    fn counted(&self, what: &str) -> usize {
        self.counts
            .iter()
            .find(|(w, _)| w == what)
            .map_or(0, |(_, n)| *n)
    }

    fn fail(&mut self, message: String) {
        eprintln!("FAILED: {message}");
        self.failures.push(message);
    }

    fn timed(&mut self, section: &'static str, f: impl FnOnce(&mut Self)) {
        let t0 = Instant::now();
        f(self);
        self.timings.push((section, t0.elapsed()));
    }

    /// `kubectl apply --server-side` of `text`, for real (`dry_run` false) or as a server-side
    /// dry run.
    fn apply_raw(&self, text: &str, namespace: Option<&str>, dry_run: bool) -> Answer {
        let mut args = vec!["apply", "--server-side", "-f", "-"];
        if dry_run {
            args.push("--dry-run=server");
        }
        if let Some(ns) = namespace {
            args.extend(["-n", ns]);
        }
        match self.cp.run(&args, Some(text)) {
            Ok(out) => Answer {
                accepted: out.status.success(),
                said: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            },
            Err(e) => Answer {
                accepted: false,
                said: format!("{e:#}"),
            },
        }
    }

    /// Applies `text` for real (setting up the cluster for later checks).
    fn apply(&mut self, what: &str, text: &str, namespace: Option<&str>) {
        let a = self.apply_raw(text, namespace, false);
        if !a.accepted {
            self.fail(format!("{what}: apply failed: {}", a.said));
        }
    }

    /// Expects a dry run of `text` to be accepted with no warning (`warning` empty) or with a
    /// warning that contains every string of `warning`.
    fn accepts(
        &mut self,
        counter: &str,
        what: &str,
        text: &str,
        namespace: Option<&str>,
        warning: &[&str],
    ) {
        self.count(counter);
        let a = self.apply_raw(text, namespace, true);
        let warned: Vec<&str> = a
            .said
            .lines()
            .filter(|l| l.starts_with("Warning:"))
            .collect();
        if !a.accepted {
            self.fail(format!("{what}: refused: {}", a.said));
        } else if warning.is_empty() && !warned.is_empty() {
            self.fail(format!(
                "{what}: accepted with warnings:\n  {}",
                warned.join("\n  ")
            ));
        } else if !warning.iter().all(|w| warned.iter().any(|l| l.contains(w))) {
            self.fail(format!(
                "{what}: accepted, but without the warning {warning:?}: {:?}",
                a.said
            ));
        }
    }

    /// Expects a dry run of `text` to be refused with a message that contains every string
    /// of `expect`.
    fn refuses(
        &mut self,
        counter: &str,
        what: &str,
        text: &str,
        namespace: Option<&str>,
        expect: &[&str],
    ) {
        self.count(counter);
        let a = self.apply_raw(text, namespace, true);
        if a.accepted {
            self.fail(format!(
                "{what}: accepted, expected a refusal with {expect:?}"
            ));
        } else if let Some(missing) = expect.iter().find(|e| !a.said.contains(*e)) {
            self.fail(format!(
                "{what}: refused, but the message lacks {missing:?}: {}",
                a.said
            ));
        }
    }

    /// Waits up to `limit` for `kubectl args` to print something that satisfies `done`.
    fn wait_for(
        &mut self,
        what: &str,
        args: &[&str],
        limit: Duration,
        done: impl Fn(&str) -> bool,
    ) {
        let t0 = Instant::now();
        let mut last = String::new();
        while t0.elapsed() < limit {
            match self.cp.ok(args, None) {
                Ok(out) if done(&out) => return,
                Ok(out) => last = out,
                Err(e) => last = format!("{e:#}"),
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        self.fail(format!(
            "{what}: not seen within {limit:?}; last `kubectl {}`: {last}",
            args.join(" ")
        ));
    }

    /// Waits until `namespace` has its `default` ServiceAccount (made by the controller
    /// manager; the ServiceAccount admission plugin refuses a Pod whose account is missing).
    fn wait_for_default_service_account(&mut self, namespace: &str) {
        self.wait_for(
            &format!("ServiceAccount default in {namespace}"),
            &[
                "get",
                "serviceaccount",
                "default",
                "-n",
                namespace,
                "-o",
                "name",
            ],
            Duration::from_secs(60),
            |out| out.contains("serviceaccount/default"),
        );
    }
}

// --- 1. CRDs ------------------------------------------------------------------------------

fn crds(c: &mut Checks) {
    let text = read("crds/yaml/crds.yaml");
    let names: Vec<String> = parse_documents("crds.yaml", &text)
        .expect("crds.yaml")
        .iter()
        .map(|o| o.name().to_string())
        .collect();
    c.apply("crds/yaml/crds.yaml", &text, None);
    for name in &names {
        let crd = format!("crd/{name}");
        match c.cp.ok(
            &["wait", "--for=condition=Established", &crd, "--timeout=60s"],
            None,
        ) {
            Ok(_) => c.count("CRDs applied and Established"),
            Err(e) => c.fail(format!("{crd}: {e:#}")),
        }
    }
}

// --- Namespaces ---------------------------------------------------------------------------

/// The restricted namespace is the k3s overlay's own Namespace object; the others are made
/// here for the agents' levels.
fn namespaces(c: &mut Checks) {
    let text = read("k8s/overlays/k3s/namespace.yaml");
    let ns = parse_documents("namespace.yaml", &text)
        .expect("namespace.yaml")
        .remove(0);
    assert_eq!(ns.name(), NAMESPACE);
    for mode in ["enforce", "warn", "audit"] {
        let label = ns
            .value
            .pointer("/metadata/labels")
            .and_then(|l| l.get(format!("pod-security.kubernetes.io/{mode}")))
            .and_then(Value::as_str);
        if label != Some("restricted") {
            c.fail(format!(
                "k8s/overlays/k3s/namespace.yaml: pod-security.kubernetes.io/{mode} is {label:?}, not restricted"
            ));
        }
    }
    c.apply("k8s/overlays/k3s/namespace.yaml", &text, None);
    for (name, level) in [(BASELINE_NS, "baseline"), (PRIVILEGED_NS, "privileged")] {
        let labels: BTreeMap<String, &str> = ["enforce", "warn", "audit"]
            .iter()
            .map(|m| (format!("pod-security.kubernetes.io/{m}"), level))
            .collect();
        let obj = json!({"apiVersion": "v1", "kind": "Namespace",
                         "metadata": {"name": name, "labels": labels}});
        c.apply(name, &obj.to_string(), None);
    }
    for name in [NAMESPACE, BASELINE_NS, PRIVILEGED_NS] {
        c.wait_for_default_service_account(name);
    }
}

// --- 2. Examples and the k3s overlay ------------------------------------------------------

fn examples(c: &mut Checks) {
    let files = example_files();
    let names: Vec<String> = files.iter().map(|f| relative(f)).collect();
    for expected in EXPECTED_EXAMPLES {
        if !names.iter().any(|n| n == expected) {
            c.fail(format!("{expected} not in {names:?}"));
        }
    }
    // The namespaces the examples' Workloads live in, made first as a user would.
    let mut made = BTreeSet::new();
    for (f, name) in files.iter().zip(&names) {
        let text = std::fs::read_to_string(f).expect("example");
        let objects = parse_documents(name, &text).expect("yaml");
        for o in &objects {
            let ns = o.namespace().to_string();
            if !ns.is_empty() && made.insert(ns.clone()) {
                let obj =
                    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}});
                c.apply(&ns, &obj.to_string(), None);
            }
            c.count("example objects");
        }
        c.accepts("example files accepted", name, &text, None, &[]);
    }

    let text = kustomize_text("k8s/overlays/k3s");
    for _ in parse_documents("k3s", &text).expect("yaml") {
        c.count("k3s overlay objects");
    }
    c.accepts(
        "k3s overlay accepted",
        "kubectl kustomize k8s/overlays/k3s",
        &text,
        Some(NAMESPACE),
        &[],
    );
}

// --- 3. Bad manifests ---------------------------------------------------------------------

/// Every CEL rule's message in the CRDs, as `<crd>: <message>`.
fn cel_messages() -> BTreeSet<String> {
    fn walk(v: &Value, crd: &str, out: &mut BTreeSet<String>) {
        match v {
            Value::Object(map) => {
                for (k, child) in map {
                    if k == "x-kubernetes-validations" {
                        for rule in child.as_array().into_iter().flatten() {
                            let message = rule["message"].as_str().unwrap_or_else(|| {
                                panic!("{crd}: a CEL rule without a message: {rule}")
                            });
                            out.insert(format!("{crd}: {message}"));
                        }
                    } else {
                        walk(child, crd, out);
                    }
                }
            }
            Value::Array(items) => items.iter().for_each(|i| walk(i, crd, out)),
            _ => {}
        }
    }
    let mut out = BTreeSet::new();
    for crd in parse_documents("crds.yaml", &read("crds/yaml/crds.yaml")).expect("yaml") {
        walk(&crd.value, crd.name(), &mut out);
    }
    out
}

fn bad_manifests(c: &mut Checks) {
    let mesh = read("examples/mesh.yaml");
    let embed = read("examples/workload-embed.yaml");
    const MESHES: &str = "meshes.infermesh.dev";
    const WORKLOADS: &str = "workloads.infermesh.dev";
    const HEARTBEAT: &str = "heartbeatSeconds must be shorter than leaseSeconds";
    const ONE_TASK: &str = "set exactly one of textEmbedding or tensor";
    // (what, the manifest, CEL rule it exercises if any, expected in the message)
    let cases: Vec<(&str, String, Option<String>, Vec<&str>)> = vec![
        // The old hand-written validator's cases on examples/mesh.yaml.
        (
            "Mesh: slots not a number",
            variant(&mesh, "slots: 2", "slots: two"),
            None,
            vec![".spec.agent.slots: expected numeric"],
        ),
        (
            "Mesh: unknown field",
            variant(&mesh, "slots: 2", "slot: 2"),
            None,
            vec![".spec.agent.slot: field not declared in schema"],
        ),
        (
            "Mesh: unknown execution provider",
            variant(&mesh, "[cuda, cpu]", "[cuda, rocm]"),
            None,
            vec!["spec.agent.executionProviders[1]: Unsupported value: \"rocm\""],
        ),
        (
            "Mesh: lease below its minimum",
            variant(&mesh, "leaseSeconds: 30", "leaseSeconds: 1"),
            None,
            vec![
                "spec.leaseSeconds: Invalid value: 1",
                "greater than or equal to 2",
            ],
        ),
        (
            "Mesh: negative budget",
            variant(&mesh, "credits: 50000", "credits: -1"),
            None,
            vec!["spec.budgets[0].credits: Invalid value: -1"],
        ),
        (
            "Mesh: intraOpThreads beyond uint32",
            variant(
                &mesh,
                "slots: 2",
                "slots: 2\n    intraOpThreads: 4294967296",
            ),
            None,
            vec!["spec.agent.intraOpThreads: Invalid value: 4294967296"],
        ),
        (
            "Mesh: unknown model cache",
            variant(&mesh, "modelCache: EmptyDir", "modelCache: Disk"),
            None,
            vec!["spec.agent.modelCache: Unsupported value: \"Disk\""],
        ),
        (
            "Mesh: heartbeat not below the lease (CEL)",
            variant(&mesh, "heartbeatSeconds: 5", "heartbeatSeconds: 30"),
            Some(format!("{MESHES}: {HEARTBEAT}")),
            vec!["spec: Invalid value: \"object\"", HEARTBEAT],
        ),
        // The old hand-written validator's cases on a Workload.
        (
            "Workload: batchSize a string",
            variant(&embed, "batchSize: 32", "batchSize: \"32\""),
            None,
            vec![".spec.batchSize: expected numeric"],
        ),
        (
            "Workload: batchSize below its minimum",
            variant(&embed, "batchSize: 32", "batchSize: 0"),
            None,
            vec![
                "spec.batchSize: Invalid value: 0",
                "greater than or equal to 1",
            ],
        ),
        (
            "Workload: batchSize above its maximum",
            variant(&embed, "batchSize: 32", "batchSize: 5000"),
            None,
            vec![
                "spec.batchSize: Invalid value: 5000",
                "less than or equal to 4096",
            ],
        ),
        (
            "Workload: unknown field",
            variant(&embed, "batchSize: 32", "bachSize: 32"),
            None,
            vec![".spec.bachSize: field not declared in schema"],
        ),
        (
            "Workload: unknown input format",
            variant(&embed, "format: jsonl", "format: csvv"),
            None,
            vec!["spec.input.format: Unsupported value: \"csvv\""],
        ),
        (
            "Workload: empty mesh name",
            variant(&embed, "  mesh: gpus\n", "  mesh: \"\"\n"),
            None,
            vec!["spec.mesh: Invalid value: \"\"", "at least 1 chars long"],
        ),
        (
            "Workload: no model",
            without_block(&embed, "  model:"),
            None,
            vec!["spec.model: Required value"],
        ),
        (
            "Workload: shardBytes not a quantity",
            variant(&embed, "shardBytes: 1Mi", "shardBytes: lots"),
            None,
            vec!["spec.shardBytes: Invalid value: \"lots\"", "should match"],
        ),
        (
            "Mesh: a queue of weight 0",
            variant(&mesh, "weight: 3", "weight: 0"),
            None,
            vec!["spec.queues[0].weight: Invalid value: 0"],
        ),
        (
            "Mesh: a namespace queued twice",
            variant(
                &mesh,
                "namespace: team-b\n      weight: 1",
                "namespace: team-a\n      weight: 1",
            ),
            None,
            // Server-side apply refuses it first, as the list's map keys say.
            vec![".spec.queues: duplicate entries for key [namespace=\"team-a\"]"],
        ),
        (
            "Workload: priority below 0",
            variant(&embed, "batchSize: 32", "batchSize: 32\n  priority: -1"),
            None,
            vec!["spec.priority: Invalid value: -1"],
        ),
        (
            "Workload: priority beyond int32",
            variant(
                &embed,
                "batchSize: 32",
                "batchSize: 32\n  priority: 2147483648",
            ),
            None,
            vec!["spec.priority: Invalid value: 2147483648"],
        ),
        (
            "Workload: both tasks (CEL)",
            variant(
                &embed,
                "  task:\n",
                "  task:\n    tensor: {inputs: [{name: x}]}\n",
            ),
            Some(format!("{WORKLOADS}: {ONE_TASK}")),
            vec!["spec.task: Invalid value: \"object\"", ONE_TASK],
        ),
        (
            "Workload: no task (CEL)",
            variant(
                &without_block(&embed, "    textEmbedding:"),
                "  task:\n",
                "  task: {}\n",
            ),
            Some(format!("{WORKLOADS}: {ONE_TASK}")),
            vec!["spec.task: Invalid value: \"object\"", ONE_TASK],
        ),
        // YAML 1.1, which kubectl (and Helm) read: a bare `y` is the boolean true, where the
        // operator's own parser (YAML 1.2) reads the string "y".
        (
            "Workload: a bare y where a string belongs",
            variant(&embed, "textField: text", "textField: y"),
            None,
            vec![".spec.task.textEmbedding.textField: expected string"],
        ),
    ];
    let mut cel_checked = BTreeSet::new();
    for (what, text, cel, expect) in cases {
        c.refuses("bad manifests refused", what, &text, None, &expect);
        if let Some(rule) = cel {
            c.count("of them, CEL rule cases");
            cel_checked.insert(rule);
        }
    }
    let rules = cel_messages();
    for rule in rules.difference(&cel_checked) {
        c.fail(format!("CEL rule without a refused case here: {rule}"));
    }
    for rule in cel_checked.difference(&rules) {
        c.fail(format!(
            "a case names a CEL rule the CRDs do not have: {rule}"
        ));
    }
    for _ in &rules {
        c.count("CEL rules in the CRDs");
    }

    // Strict field validation covers built-in kinds too (what strict.rs checks for them).
    let deployment = operator_deployment(&rendered(&[]));
    let mut bad = deployment.clone();
    bad["spec"]["template"]["spec"]["securityContext"]["runAsNonRooot"] = json!(true);
    c.refuses(
        "bad manifests refused",
        "Deployment: unknown field in the pod's securityContext",
        &bad.to_string(),
        Some(NAMESPACE),
        &[".spec.template.spec.securityContext.runAsNonRooot: field not declared in schema"],
    );
}

// --- 4. The chart in a restricted namespace -------------------------------------------------

fn operator_deployment(r: &Rendered) -> Value {
    r.get("Deployment", "infermesh")
        .expect("the operator Deployment")
        .value
        .clone()
}

fn served(o: &Object) -> bool {
    !NOT_SERVED.iter().any(|g| o.api_version().starts_with(g))
}

fn chart(c: &mut Checks) {
    let mut other_namespaces = BTreeSet::new();
    for (name, r) in matrix() {
        c.count("chart renders");
        // Helm's own text, as `helm install` would send it, minus what is not served here; by
        // namespace (the release's, unless a template names another: the Grafana dashboard's).
        let mut streams: BTreeMap<String, String> = BTreeMap::new();
        let mut parsed = 0;
        for doc in &r.documents {
            let objects = parse_documents(&doc.source, &doc.yaml).expect("rendered yaml");
            parsed += objects.len();
            let namespaces: BTreeSet<&str> = objects
                .iter()
                .map(|o| match o.namespace() {
                    "" => NAMESPACE,
                    ns => ns,
                })
                .collect();
            assert!(
                namespaces.len() <= 1,
                "{name}: {}: {namespaces:?}",
                doc.source
            );
            if objects.iter().all(served) {
                for _ in &objects {
                    c.count("chart objects accepted");
                }
                if let Some(ns) = namespaces.first() {
                    let stream = streams.entry(ns.to_string()).or_default();
                    stream.push_str("---\n");
                    stream.push_str(&doc.yaml);
                    stream.push('\n');
                }
            } else {
                for o in &objects {
                    c.count("chart objects of kinds not served here (typed by strict.rs)");
                    assert!(!served(o), "{name}: {} shares a document", o.id());
                }
            }
        }
        assert_eq!(parsed, r.objects.len(), "{name}: documents and objects");
        for (ns, stream) in &streams {
            if ns != NAMESPACE && other_namespaces.insert(ns.clone()) {
                // Made by whoever runs what reads it (kube-prometheus-stack for Grafana's).
                let obj =
                    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}});
                c.apply(ns, &obj.to_string(), None);
            }
            c.accepts(
                "chart renders accepted (per namespace)",
                &format!("chart ({name}) in {ns}"),
                stream,
                Some(ns),
                &[],
            );
        }

        // Pods are what PodSecurity enforces on; their ServiceAccounts must exist.
        let accounts: Vec<Value> = r
            .of_kind("ServiceAccount")
            .map(|o| o.value.clone())
            .collect();
        if !accounts.is_empty() {
            c.apply(
                &format!("chart ({name}) ServiceAccounts"),
                &list(accounts),
                Some(NAMESPACE),
            );
        }
        let pods: Vec<Value> = r
            .objects
            .iter()
            .filter_map(|o| pod_of(&o.value, NAMESPACE))
            .collect();
        for _ in &pods {
            c.count("chart pod templates admitted as Pods");
        }
        c.accepts(
            "chart renders' Pods accepted",
            &format!("chart ({name}) Pods"),
            &list(pods),
            Some(NAMESPACE),
            &[],
        );
    }
}

/// Pods that break "restricted" one rule at a time, from the operator's pod: each refused.
fn pod_security(c: &mut Checks) {
    let deployment = operator_deployment(&rendered(&[]));
    let pod = pod_of(&deployment, NAMESPACE).expect("operator pod");
    c.accepts(
        "Pod Security: compliant Pods admitted",
        "the operator's pod",
        &pod.to_string(),
        Some(NAMESPACE),
        &[],
    );
    type Edit = fn(&mut Value);
    fn container(p: &mut Value) -> &mut Value {
        &mut p["spec"]["containers"][0]["securityContext"]
    }
    let cases: [(&str, Edit, &[&str]); 11] = [
        (
            "privileged",
            |p| {
                container(p)["privileged"] = json!(true);
                // The API's own validation refuses privileged with allowPrivilegeEscalation
                // false before PodSecurity sees it.
                remove(container(p), "allowPrivilegeEscalation");
            },
            &["privileged (container \"operator\" must not set securityContext.privileged=true)"],
        ),
        (
            "runAsNonRoot removed",
            |p| {
                remove(&mut p["spec"]["securityContext"], "runAsNonRoot");
                remove(container(p), "runAsNonRoot");
            },
            &["runAsNonRoot != true"],
        ),
        (
            "runAsNonRoot false",
            |p| container(p)["runAsNonRoot"] = json!(false),
            &["runAsNonRoot != true"],
        ),
        (
            "runAsUser 0",
            |p| p["spec"]["securityContext"]["runAsUser"] = json!(0),
            &["runAsUser=0"],
        ),
        (
            "seccomp Unconfined",
            |p| container(p)["seccompProfile"] = json!({"type": "Unconfined"}),
            &["seccompProfile"],
        ),
        (
            "allowPrivilegeEscalation",
            |p| container(p)["allowPrivilegeEscalation"] = json!(true),
            &["allowPrivilegeEscalation != false"],
        ),
        (
            "capabilities not dropped",
            |p| container(p)["capabilities"] = json!({"drop": ["NET_RAW"]}),
            &["unrestricted capabilities", "drop=[\"ALL\"]"],
        ),
        (
            "capability added",
            |p| container(p)["capabilities"]["add"] = json!(["SYS_ADMIN"]),
            &["unrestricted capabilities", "\"SYS_ADMIN\""],
        ),
        (
            "hostPath volume",
            |p| {
                if let Some(v) = p["spec"]["volumes"].as_array_mut() {
                    v.push(json!({"name": "host", "hostPath": {"path": "/"}}));
                }
            },
            &["restricted volume types", "hostPath"],
        ),
        (
            "hostNetwork",
            |p| p["spec"]["hostNetwork"] = json!(true),
            &["host namespaces (hostNetwork=true)"],
        ),
        (
            "hostPort",
            |p| p["spec"]["containers"][0]["ports"][0]["hostPort"] = json!(7443),
            &["hostPort"],
        ),
    ];
    for (what, edit, expect) in cases {
        let mut bad = pod.clone();
        edit(&mut bad);
        let mut all = vec![RESTRICTED];
        all.extend(expect);
        c.refuses(
            "Pod Security: non-compliant Pods refused",
            &format!("the operator's pod with {what}"),
            &bad.to_string(),
            Some(NAMESPACE),
            &all,
        );
    }

    // A workload object is only warned about: the reason the Pods are checked above.
    let mut privileged = deployment;
    let sc = &mut privileged["spec"]["template"]["spec"]["containers"][0]["securityContext"];
    sc["privileged"] = json!(true);
    remove(sc, "allowPrivilegeEscalation");
    c.accepts(
        "Pod Security: workloads warned, not refused",
        "the operator Deployment, privileged",
        &privileged.to_string(),
        Some(NAMESPACE),
        &[RESTRICTED_WARNING, "privileged"],
    );

    // Not a Pod Security rule: this project's own, checked in objects.rs.
    let mut writable = pod;
    container(&mut writable)["readOnlyRootFilesystem"] = json!(false);
    c.accepts(
        "Pod Security: compliant Pods admitted",
        "the operator's pod with a writable root filesystem",
        &writable.to_string(),
        Some(NAMESPACE),
        &[],
    );
}

// --- 5. Secrets: the tenants' Roles, asked of the RBAC authorizer ----------------------------

/// The tenant namespaces of `deploy/tests/values/tenants.yaml`.
const TENANTS: [&str; 2] = ["team-a", "team-b"];

fn secret_access(c: &mut Checks) {
    let r = rendered(&["tenants.yaml"]);
    let rbac: Vec<Value> = r
        .objects
        .iter()
        .filter(|o| {
            matches!(
                o.kind(),
                "ClusterRole" | "ClusterRoleBinding" | "Role" | "RoleBinding"
            )
        })
        .map(|o| o.value.clone())
        .collect();
    for ns in TENANTS {
        // Made by the chart section already; made here too so this section stands alone.
        let obj = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}});
        c.apply(ns, &obj.to_string(), None);
    }
    c.apply("the chart's RBAC with tenants.yaml", &list(rbac), None);
    let operator = format!("system:serviceaccount:{NAMESPACE}:infermesh");
    let agent = format!("system:serviceaccount:{NAMESPACE}:infermesh-agent-gpus");
    let mut cases: Vec<(&str, &str, String, Option<&str>, bool)> = Vec::new();
    for ns in TENANTS {
        cases.extend([
            (
                operator.as_str(),
                "get",
                "secrets/s3-credentials".to_string(),
                Some(ns),
                true,
            ),
            (
                operator.as_str(),
                "get",
                "secrets/any-other-name".to_string(),
                Some(ns),
                true,
            ),
            (
                operator.as_str(),
                "list",
                "secrets".to_string(),
                Some(ns),
                false,
            ),
            (
                operator.as_str(),
                "watch",
                "secrets".to_string(),
                Some(ns),
                false,
            ),
            (
                operator.as_str(),
                "create",
                "secrets".to_string(),
                Some(ns),
                false,
            ),
            (
                operator.as_str(),
                "update",
                "secrets/s3-credentials".to_string(),
                Some(ns),
                false,
            ),
            (
                agent.as_str(),
                "get",
                "secrets/s3-credentials".to_string(),
                Some(ns),
                false,
            ),
        ]);
    }
    cases.extend([
        // A namespace not listed.
        (
            operator.as_str(),
            "get",
            "secrets/s3-credentials".to_string(),
            Some("team-c"),
            false,
        ),
        // Cluster-wide.
        (operator.as_str(), "get", "secrets".to_string(), None, false),
        (
            operator.as_str(),
            "list",
            "secrets".to_string(),
            None,
            false,
        ),
        // The release namespace: the TLS Secret, by name, and create; nothing else.
        (
            operator.as_str(),
            "get",
            "secrets/infermesh-tls".to_string(),
            Some(NAMESPACE),
            true,
        ),
        (
            operator.as_str(),
            "create",
            "secrets".to_string(),
            Some(NAMESPACE),
            true,
        ),
        (
            operator.as_str(),
            "get",
            "secrets/infermesh-database".to_string(),
            Some(NAMESPACE),
            false,
        ),
        (
            operator.as_str(),
            "list",
            "secrets".to_string(),
            Some(NAMESPACE),
            false,
        ),
        (
            agent.as_str(),
            "get",
            "secrets/infermesh-tls".to_string(),
            Some(NAMESPACE),
            false,
        ),
    ]);
    for (user, verb, resource, ns, expected) in cases {
        let mut args = vec!["auth", "can-i", verb, resource.as_str(), "--as", user];
        match ns {
            Some(ns) => args.extend(["-n", ns]),
            None => args.push("--all-namespaces"),
        }
        let what = format!(
            "{user} {verb} {resource} in {}",
            ns.unwrap_or("every namespace")
        );
        match c.cp.run(&args, None) {
            Ok(out) => {
                let said = String::from_utf8_lossy(&out.stdout).trim().to_string();
                match said.as_str() {
                    "yes" | "no" if (said == "yes") == expected => {
                        c.count("Secret access as the RBAC authorizer decides it");
                    }
                    "yes" | "no" => c.fail(format!("{what}: {said}, expected the opposite")),
                    _ => c.fail(format!(
                        "{what}: kubectl auth can-i said {said:?}: {}",
                        String::from_utf8_lossy(&out.stderr).trim()
                    )),
                }
            }
            Err(e) => c.fail(format!("{what}: {e:#}")),
        }
    }
}

// --- 6. The agent DaemonSet -----------------------------------------------------------------

fn example_mesh(name: &str, cache: ModelCache) -> Mesh {
    let text = read("examples/mesh.yaml");
    let mut mesh = match infermesh_crds::parse_manifests(&text)
        .expect("examples/mesh.yaml")
        .pop()
    {
        Some(Manifest::Mesh(m)) => *m,
        _ => panic!("examples/mesh.yaml holds one Mesh"),
    };
    mesh.metadata.name = Some(name.to_string());
    mesh.spec.agent.model_cache = cache;
    mesh
}

/// The agent ServiceAccount and DaemonSet of `mesh` with the operator in `namespace`, as JSON.
fn agent_objects(mesh: &Mesh, namespace: &str) -> (Value, Value) {
    let config = Config::for_namespace(namespace);
    (
        serde_json::to_value(build_service_account(mesh, &config)).expect("json"),
        serde_json::to_value(build_daemonset(mesh, &config)).expect("json"),
    )
}

fn agents(c: &mut Checks) {
    let counter_ok = "agent Pods admitted";
    let counter_refused = "agent Pods refused";
    // The Mesh itself, with each cache, is valid.
    for cache in ["EmptyDir", "HostPath"] {
        let text = variant(
            &read("examples/mesh.yaml"),
            "modelCache: EmptyDir",
            &format!("modelCache: {cache}"),
        );
        c.accepts(
            "Meshes with each modelCache accepted",
            &format!("Mesh with modelCache {cache}"),
            &text,
            None,
            &[],
        );
    }

    // EmptyDir: restricted.
    let mesh = example_mesh("gpus", ModelCache::EmptyDir);
    let (sa, ds) = agent_objects(&mesh, NAMESPACE);
    c.apply("agent ServiceAccount", &sa.to_string(), None);
    c.accepts(
        "agent DaemonSets accepted",
        "EmptyDir agent DaemonSet in the restricted namespace",
        &ds.to_string(),
        None,
        &[],
    );
    let pod = pod_of(&ds, NAMESPACE).expect("agent pod");
    c.accepts(
        counter_ok,
        "EmptyDir agent Pod in the restricted namespace",
        &pod.to_string(),
        None,
        &[],
    );

    // HostPath: privileged only.
    let mesh = example_mesh("gpus", ModelCache::HostPath);
    let (_, ds) = agent_objects(&mesh, NAMESPACE);
    c.accepts(
        "agent DaemonSets accepted",
        "HostPath agent DaemonSet in the restricted namespace (warned)",
        &ds.to_string(),
        None,
        &[RESTRICTED_WARNING, "hostPath"],
    );
    let pod = pod_of(&ds, NAMESPACE).expect("agent pod");
    c.refuses(
        counter_refused,
        "HostPath agent Pod in the restricted namespace",
        &pod.to_string(),
        None,
        &[
            RESTRICTED,
            "restricted volume types (volume \"model-cache\" uses restricted volume type \"hostPath\")",
            "runAsUser=0",
        ],
    );
    for (ns, verdict) in [(BASELINE_NS, false), (PRIVILEGED_NS, true)] {
        let (sa, ds) = agent_objects(&mesh, ns);
        c.apply("agent ServiceAccount", &sa.to_string(), None);
        let pod = pod_of(&ds, ns).expect("agent pod");
        let what = format!("HostPath agent Pod in {ns}");
        if verdict {
            c.accepts(counter_ok, &what, &pod.to_string(), None, &[]);
        } else {
            c.refuses(
                counter_refused,
                &what,
                &pod.to_string(),
                None,
                &[
                    "violates PodSecurity \"baseline:latest\"",
                    "hostPath volumes (volume \"model-cache\")",
                ],
            );
        }
    }
}

/// The real DaemonSet controller with a kwok node: it makes the EmptyDir agent's pod in the
/// restricted namespace, and is refused the HostPath agent's pod there (and not in the
/// privileged one).
fn agents_for_real(c: &mut Checks) {
    let node = json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": "kwok-gpu-0",
                     "annotations": {"kwok.x-k8s.io/node": "fake"},
                     "labels": {"kubernetes.io/hostname": "kwok-gpu-0",
                                "nvidia.com/gpu.present": "true"}},
        "status": {"capacity": {"cpu": "32", "memory": "256Gi", "pods": "110", "nvidia.com/gpu": "8"},
                   "allocatable": {"cpu": "32", "memory": "256Gi", "pods": "110", "nvidia.com/gpu": "8"}}
    });
    c.apply("kwok node", &node.to_string(), None);
    let limit = Duration::from_secs(60);
    for (mesh, cache, ns, admitted) in [
        ("gpus", ModelCache::EmptyDir, NAMESPACE, true),
        ("gpus-hostpath", ModelCache::HostPath, NAMESPACE, false),
        ("gpus-hostpath", ModelCache::HostPath, PRIVILEGED_NS, true),
    ] {
        let (sa, ds) = agent_objects(&example_mesh(mesh, cache), ns);
        c.apply("agent ServiceAccount", &sa.to_string(), None);
        c.apply("agent DaemonSet", &ds.to_string(), None);
        let selector = format!("infermesh.dev/mesh={mesh}");
        let what = format!("{cache:?} agent DaemonSet {mesh} in {ns}");
        if admitted {
            c.wait_for(
                &format!("{what}: its pod"),
                &["get", "pods", "-n", ns, "-l", &selector, "-o", "name"],
                limit,
                |out| out.contains("pod/"),
            );
            c.count("real DaemonSets whose pod was made");
        } else {
            let field = format!(
                "involvedObject.kind=DaemonSet,involvedObject.name=infermesh-agent-{mesh},reason=FailedCreate"
            );
            c.wait_for(
                &format!("{what}: FailedCreate by PodSecurity"),
                &[
                    "get",
                    "events",
                    "-n",
                    ns,
                    "--field-selector",
                    &field,
                    "-o",
                    "jsonpath={.items[*].message}",
                ],
                limit,
                |out| out.contains(RESTRICTED),
            );
            match c.cp.ok(
                &["get", "pods", "-n", ns, "-l", &selector, "-o", "name"],
                None,
            ) {
                Ok(out) if out.trim().is_empty() => {}
                Ok(out) => c.fail(format!("{what}: pods exist: {out}")),
                Err(e) => c.fail(format!("{what}: {e:#}")),
            }
            c.count("real DaemonSets refused their pod");
        }
    }
}

#[test]
fn the_api_server_accepts_what_infermesh_ships_and_refuses_what_it_must() {
    let t0 = Instant::now();
    let cp = ControlPlane::start().unwrap_or_else(|e| panic!("{e:#}"));
    println!(
        "control plane: up in {:.1} s (start to ready, binaries cached)",
        cp.startup.as_secs_f64()
    );
    let mut c = Checks::new(&cp);
    c.timed("CRDs", crds);
    c.timed("namespaces", namespaces);
    c.timed("examples and the k3s overlay", examples);
    c.timed("bad manifests", bad_manifests);
    c.timed("chart renders and their Pods", chart);
    c.timed("Pod Security cases", pod_security);
    c.timed("Secrets: tenant Roles, real RBAC", secret_access);
    c.timed("agent DaemonSet, dry runs", agents);
    c.timed("agent DaemonSet, real controller", agents_for_real);

    println!("checked:");
    for (what, n) in &c.counts {
        println!("  {n:>4}  {what}");
    }
    println!("time:");
    println!("  {:>6.1} s  control plane start", cp.startup.as_secs_f64());
    for (section, d) in &c.timings {
        println!("  {:>6.1} s  {section}", d.as_secs_f64());
    }
    println!("  {:>6.1} s  in all", t0.elapsed().as_secs_f64());

    // Guards against a check that silently ran on nothing.
    for (what, at_least) in [
        ("CRDs applied and Established", 3),
        ("example files accepted", 4),
        ("example objects", 5),
        ("bad manifests refused", 20),
        ("chart renders", 10),
        ("chart pod templates admitted as Pods", 9 + 7),
        ("Pod Security: non-compliant Pods refused", 11),
        ("Secret access as the RBAC authorizer decides it", 22),
        ("agent Pods admitted", 2),
        ("agent Pods refused", 2),
    ] {
        let n = c.counted(what);
        if n < at_least {
            c.fail(format!(
                "only {n} of {what:?}, expected at least {at_least}"
            ));
        }
    }
    if !c.failures.is_empty() {
        eprintln!(
            "kube-apiserver log (tail):\n{}",
            cp.log_tail("kube-apiserver", 20)
        );
    }
    assert!(
        c.failures.is_empty(),
        "{} check(s) failed:\n- {}",
        c.failures.len(),
        c.failures.join("\n- ")
    );
}
