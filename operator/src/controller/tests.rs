//! The controllers against a mocked API server (tower-test), in the style of kube-rs's
//! controller-rs: an [`ApiServerVerifier`] plays one scenario per behaviour, asserting the
//! method, path and body of each request in order, and each scenario has a timeout so a
//! missing call fails. Every request is also checked against the committed RBAC rules.

use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{Request, Response};
use infermesh_crds::{
    Agent, AgentSpec, Manifest, Mesh, Workload, WorkloadPhase, WorkloadSpec, WorkloadStatus,
    parse_manifests,
};
use infermesh_proto as pb;
use kube::Client;
use kube::client::Body;
use kube::runtime::controller::Action;
use pb::operator_message::Msg as Down;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;

use super::rbac::{Rules, access};
use super::*;
use crate::core::{AgentHandle, Core};
use crate::store::Store;
use crate::store::testing::Backend;

const NS: &str = "infermesh";

type ApiServerHandle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

/// Plays the API server's side of one scenario.
struct ApiServerVerifier {
    handle: ApiServerHandle,
    rules: Rules,
    /// (verb, resource) of every request seen.
    seen: Vec<(String, String)>,
    /// The query string of the last request, percent-decoded.
    last_query: String,
}

impl ApiServerVerifier {
    /// Takes the next request; asserts its method and path (without the query) and that
    /// RBAC allows it; answers `status` with `reply`. Returns the request's JSON body.
    async fn expect(&mut self, method: &str, path: &str, status: u16, reply: Value) -> Value {
        let (request, send) =
            tokio::time::timeout(Duration::from_secs(5), self.handle.next_request())
                .await
                .unwrap_or_else(|_| panic!("timed out waiting for {method} {path}"))
                .unwrap_or_else(|| panic!("client gone before {method} {path}"));
        let uri = request.uri().clone();
        assert_eq!(
            (request.method().as_str(), uri.path()),
            (method, path),
            "unexpected request {} {uri}",
            request.method()
        );
        let a = access(method, uri.path(), uri.query().unwrap_or("")).expect("a resource path");
        assert!(self.rules.allows(&a, NS), "rbac.yaml does not allow {a:?}");
        self.seen.push((a.verb.clone(), a.resource.clone()));
        self.last_query = url::form_urlencoded::parse(uri.query().unwrap_or("").as_bytes())
            .map(|(k, v)| format!("{k}={v}&"))
            .collect();
        let bytes = request.into_body().collect_bytes().await.expect("body");
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).expect("JSON body")
        };
        // `Null` echoes the request (an Event POST is answered with the Event).
        let reply = if reply.is_null() { body.clone() } else { reply };
        let response = Response::builder()
            .status(status)
            .body(Body::from(serde_json::to_vec(&reply).expect("json")))
            .expect("response");
        send.send_response(response);
        body
    }

    /// Answers a kube-runtime Event POST (in the object's namespace) and returns it.
    async fn expect_event(&mut self, namespace: &str) -> Value {
        let path = format!("/apis/events.k8s.io/v1/namespaces/{namespace}/events");
        self.expect("POST", &path, 201, Value::Null).await
    }

    /// Asserts no further request arrives within a moment.
    async fn expect_nothing_more(&mut self) {
        let next =
            tokio::time::timeout(Duration::from_millis(300), self.handle.next_request()).await;
        if let Ok(Some((r, _))) = next {
            panic!("unexpected request {} {}", r.method(), r.uri());
        }
    }
}

struct Fixture {
    ctx: Arc<Context>,
    verifier: ApiServerVerifier,
    data: tempfile::TempDir,
}

fn not_found() -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": "not found"})
}

impl Fixture {
    fn mesh_json(&self) -> Value {
        serde_json::to_value(self.mesh(true)).expect("json")
    }

    fn workload_json(&self) -> Value {
        serde_json::to_value(self.workload(self.workload_spec(""), true)).expect("json")
    }

    async fn new() -> Self {
        let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let client = Client::new(service, "default");
        let core = Arc::new(Core::new(Backend::Sqlite.open().await));
        let metrics = crate::metrics::Metrics::new(core.counters());
        let mut config = Config::for_namespace(NS);
        config.workload_status_period = Duration::from_secs(2);
        let ctx = Arc::new(Context::new(client, core, config, metrics, "operator-0"));
        let data = tempfile::tempdir().expect("tmp");
        std::fs::write(data.path().join("model.onnx"), b"onnx").expect("model");
        // About 4 KiB: four shards of the 1 KiB minimum.
        let input: String = (0..400).map(|i| format!("{{\"x\": [{i}]}}\n")).collect();
        std::fs::write(data.path().join("in.jsonl"), input).expect("input");
        Self {
            ctx,
            verifier: ApiServerVerifier {
                handle,
                rules: Rules::committed().expect("rbac.yaml"),
                seen: Vec::new(),
                last_query: String::new(),
            },
            data,
        }
    }

    fn mesh(&self, finalized: bool) -> Mesh {
        let yaml = "apiVersion: infermesh.dev/v1alpha1\nkind: Mesh\nmetadata: {name: gpus}\nspec:\n  \
                    agent: {slots: 2, executionProviders: [cuda, cpu]}\n  leaseSeconds: 5\n";
        let Some(Manifest::Mesh(mut m)) = parse_manifests(yaml).expect("mesh").pop() else {
            panic!("mesh")
        };
        m.metadata.uid = Some("mesh-uid".into());
        m.metadata.generation = Some(3);
        if finalized {
            m.metadata.finalizers = Some(vec![MESH_FINALIZER.into()]);
        }
        *m
    }

    fn workload_spec(&self, extra: &str) -> WorkloadSpec {
        let d = self.data.path().display();
        let yaml = format!(
            "apiVersion: infermesh.dev/v1alpha1\nkind: Workload\nmetadata: {{name: w, namespace: team-a}}\nspec:\n  mesh: gpus\n  \
             model: {{uri: \"file://{d}/model.onnx\"}}\n  task: {{tensor: {{inputs: [{{name: x}}]}}}}\n  \
             input: {{uri: \"file://{d}/in.jsonl\"}}\n  output: {{uri: \"file://{d}/out/\"}}\n  shardBytes: 1Ki\n{extra}"
        );
        match parse_manifests(&yaml).expect("workload").pop() {
            Some(Manifest::Workload(w)) => w.spec,
            _ => panic!("workload"),
        }
    }

    fn workload(&self, spec: WorkloadSpec, finalized: bool) -> Workload {
        let mut w = Workload::new("w", spec);
        w.metadata.namespace = Some("team-a".into());
        w.metadata.uid = Some("w-uid".into());
        w.metadata.generation = Some(1);
        if finalized {
            w.metadata.finalizers = Some(vec![WORKLOAD_FINALIZER.into()]);
        }
        w
    }

    /// Submits Workload `w` straight to the core (as an earlier reconcile would have), 400
    /// input bytes: 4 shards. Returns its key.
    async fn submit(&self, w: &Workload) -> String {
        self.ctx
            .core
            .submit(crate::core::Submission {
                namespace: "team-a".into(),
                name: "w".into(),
                uid: "w-uid".into(),
                spec: w.spec.clone(),
                input_size: 4096,
                input_version: None,
                input_files: None,
                credentials: None,
            })
            .await
            .expect("submit")
    }

    /// Runs one Workload reconcile in the background, for the verifier to answer.
    fn reconcile_workload(&self, w: Workload) -> tokio::task::JoinHandle<Result<Action>> {
        tokio::spawn(workload::reconcile(Arc::new(w), self.ctx.clone()))
    }

    /// Expects the status patch of Workload team-a/w; returns the status sent.
    async fn expect_workload_status(&mut self) -> Value {
        let reply = self.workload_json();
        let body = self
            .verifier
            .expect(
                "PATCH",
                "/apis/infermesh.dev/v1alpha1/namespaces/team-a/workloads/w/status",
                200,
                reply,
            )
            .await;
        body["status"].clone()
    }

    /// Loads Mesh `gpus` into the core (as the Mesh controller would).
    async fn with_mesh(&self) {
        let m = self.mesh(true);
        self.ctx
            .core
            .upsert_mesh("gpus", m.spec)
            .await
            .expect("mesh");
    }

    /// Registers an agent as its Hello would.
    async fn agent(
        &self,
        id: &str,
        providers: &[&str],
    ) -> (
        AgentHandle,
        mpsc::UnboundedReceiver<Result<pb::OperatorMessage, tonic::Status>>,
    ) {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let hello = pb::Hello {
            agent_id: id.into(),
            node: format!("node-{id}"),
            mesh: "gpus".into(),
            version: "test".into(),
            capabilities: Some(pb::Capabilities {
                execution_providers: providers.iter().map(|p| p.to_string()).collect(),
                slots: 2,
                ..Default::default()
            }),
        };
        let handle = self
            .ctx
            .core
            .attach(hello, &crate::grpc::Principal::user("test"), tx)
            .await
            .expect("attach");
        assert!(matches!(
            rx.recv().await,
            Some(Ok(pb::OperatorMessage {
                msg: Some(Down::Welcome(_))
            }))
        ));
        (handle, rx)
    }
}

fn agent_json(name: &str) -> Value {
    json!({"apiVersion": "infermesh.dev/v1alpha1", "kind": "Agent", "metadata": {"name": name},
           "spec": {"mesh": "gpus", "node": format!("node-{name}")}})
}

fn agent_object(name: &str, node: &str, unschedulable: bool) -> Agent {
    Agent::new(
        name,
        AgentSpec {
            mesh: "gpus".into(),
            node: node.into(),
            unschedulable,
        },
    )
}

impl ApiServerVerifier {
    /// Expects the deletion of Agent `name`.
    async fn expect_agent_deleted(&mut self, name: &str) {
        let path = format!("/apis/infermesh.dev/v1alpha1/agents/{name}");
        self.expect("DELETE", &path, 200, agent_json(name)).await;
    }
}

fn reason_of(status: &Value, type_: &str) -> String {
    status["conditions"]
        .as_array()
        .expect("conditions")
        .iter()
        .find(|c| c["type"] == type_)
        .map(|c| c["reason"].as_str().unwrap_or_default().to_string())
        .unwrap_or_default()
}

#[tokio::test]
async fn mesh_creates_its_daemonset_and_reports_status() {
    let mut f = Fixture::new().await;
    let mesh = Arc::new(f.mesh(true));
    let ctx = f.ctx.clone();
    let run = tokio::spawn(mesh::reconcile(mesh.clone(), ctx));
    let sa = f
        .verifier
        .expect("PATCH", "/api/v1/namespaces/infermesh/serviceaccounts/infermesh-agent-gpus", 200, json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "infermesh-agent-gpus"}}))
        .await;
    assert_eq!(sa["automountServiceAccountToken"], false);
    assert_eq!(sa["metadata"]["ownerReferences"][0]["kind"], "Mesh");
    let ds = f
        .verifier
        .expect(
            "PATCH",
            "/apis/apps/v1/namespaces/infermesh/daemonsets/infermesh-agent-gpus",
            200,
            json!({"apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": {"name": "infermesh-agent-gpus"},
                   "status": {"desiredNumberScheduled": 2, "currentNumberScheduled": 0, "numberMisscheduled": 0, "numberReady": 0}}),
        )
        .await;
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["nodeSelector"]["nvidia.com/gpu.present"], "true");
    assert_eq!(pod["serviceAccountName"], "infermesh-agent-gpus");
    let env = pod["containers"][0]["env"].as_array().expect("env");
    let var = |n: &str| {
        env.iter()
            .find(|e| e["name"] == n)
            .map(|e| e["value"].clone())
    };
    assert_eq!(
        var("INFERMESH_OPERATOR"),
        Some(json!("https://infermesh-grpc.infermesh.svc:7443"))
    );
    assert_eq!(var("INFERMESH_SLOTS"), Some(json!("2")));
    assert_eq!(
        var("INFERMESH_EXECUTION_PROVIDERS"),
        Some(json!("cuda,cpu"))
    );
    let status = f
        .verifier
        .expect(
            "PATCH",
            "/apis/infermesh.dev/v1alpha1/meshes/gpus/status",
            200,
            f.mesh_json(),
        )
        .await;
    assert_eq!(status["status"]["agentsTotal"], 2);
    assert_eq!(status["status"]["agentsReady"], 0);
    assert_eq!(status["status"]["observedGeneration"], 3);
    assert_eq!(reason_of(&status["status"], "Ready"), "NoAgentsReady");
    let action = run.await.expect("join").expect("reconcile");
    assert_eq!(action, Action::requeue(Duration::from_secs(300)));
    assert!(f.ctx.core.has_mesh("gpus").await, "the core knows the mesh");
}

#[tokio::test]
async fn a_new_mesh_gets_the_finalizer_first() {
    let mut f = Fixture::new().await;
    let run = tokio::spawn(mesh::reconcile(Arc::new(f.mesh(false)), f.ctx.clone()));
    let patch = f
        .verifier
        .expect(
            "PATCH",
            "/apis/infermesh.dev/v1alpha1/meshes/gpus",
            200,
            serde_json::to_value(f.mesh(true)).expect("json"),
        )
        .await;
    assert!(patch.to_string().contains(MESH_FINALIZER), "{patch}");
    assert_eq!(
        run.await.expect("join").expect("reconcile"),
        Action::await_change()
    );
    f.verifier.expect_nothing_more().await;
}

#[tokio::test]
async fn deleting_a_mesh_removes_its_daemonset_and_service_account() {
    let mut f = Fixture::new().await;
    f.with_mesh().await;
    let mut mesh = f.mesh(true);
    mesh.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        k8s_openapi::jiff::Timestamp::now(),
    ));
    let run = tokio::spawn(mesh::reconcile(Arc::new(mesh.clone()), f.ctx.clone()));
    f.verifier
        .expect(
            "DELETE",
            "/apis/apps/v1/namespaces/infermesh/daemonsets/infermesh-agent-gpus",
            200,
            json!({}),
        )
        .await;
    f.verifier
        .expect(
            "DELETE",
            "/api/v1/namespaces/infermesh/serviceaccounts/infermesh-agent-gpus",
            404,
            not_found(),
        )
        .await;
    let patch = f
        .verifier
        .expect(
            "PATCH",
            "/apis/infermesh.dev/v1alpha1/meshes/gpus",
            200,
            serde_json::to_value(&mesh).expect("json"),
        )
        .await;
    assert!(
        patch.to_string().contains("remove"),
        "the finalizer is removed: {patch}"
    );
    run.await.expect("join").expect("reconcile");
    assert!(!f.ctx.core.has_mesh("gpus").await);
}

#[tokio::test]
async fn workload_gets_a_finalizer_is_admitted_and_gets_its_status() {
    let mut f = Fixture::new().await;
    f.with_mesh().await;
    let (_a, mut rx) = f.agent("gpus-a", &["cpu"]).await;
    let spec = f.workload_spec("");
    // First pass: the finalizer.
    let run = f.reconcile_workload(f.workload(spec.clone(), false));
    let patch = f
        .verifier
        .expect(
            "PATCH",
            "/apis/infermesh.dev/v1alpha1/namespaces/team-a/workloads/w",
            200,
            serde_json::to_value(f.workload(spec.clone(), true)).expect("json"),
        )
        .await;
    assert!(patch.to_string().contains(WORKLOAD_FINALIZER), "{patch}");
    assert_eq!(
        run.await.expect("join").expect("reconcile"),
        Action::await_change()
    );
    // Second pass: admitted, planned, status and an Event.
    let run = f.reconcile_workload(f.workload(spec, true));
    let status = f.expect_workload_status().await;
    assert_eq!(status["phase"], "Running");
    assert!(
        status["shards"]["total"].as_u64().expect("total") >= 2,
        "{status}"
    );
    assert_eq!(reason_of(&status, "Admitted"), "Admitted");
    let event = f.verifier.expect_event("team-a").await;
    assert_eq!(event["reason"], "Admitted");
    assert_eq!(event["regarding"]["name"], "w");
    run.await.expect("join").expect("reconcile");
    // The agent got work.
    expect_assign(&mut rx).await;
}

#[tokio::test]
async fn invalid_workload_gets_condition_and_is_not_requeued() {
    let mut f = Fixture::new().await;
    f.with_mesh().await;
    let mut spec = f.workload_spec("");
    spec.shard_bytes = "a lot".into();
    let run = f.reconcile_workload(f.workload(spec, true));
    let status = f.expect_workload_status().await;
    assert_eq!(status["phase"], "Failed");
    assert_eq!(reason_of(&status, "Admitted"), "InvalidSpec");
    let message = status["conditions"][0]["message"]
        .as_str()
        .expect("message");
    assert!(message.contains("spec.shardBytes"), "{message}");
    let event = f.verifier.expect_event("team-a").await;
    assert_eq!(event["type"], "Warning");
    assert_eq!(event["reason"], "InvalidSpec");
    assert_eq!(
        run.await.expect("join").expect("reconcile"),
        Action::await_change()
    );
    assert!(
        f.ctx.core.workloads().await.is_empty(),
        "nothing was planned"
    );
}

#[tokio::test]
async fn a_workload_no_ready_agent_can_run_waits_with_no_matching_agents() {
    let mut f = Fixture::new().await;
    f.with_mesh().await;
    let _cpu_only = f.agent("gpus-a", &["cpu"]).await;
    let spec = f.workload_spec("  requirements: {gpu: true}\n");
    let run = f.reconcile_workload(f.workload(spec, true));
    let status = f.expect_workload_status().await;
    assert_eq!(status["phase"], "Pending");
    assert_eq!(reason_of(&status, "Admitted"), "NoMatchingAgents");
    let message = status["conditions"][0]["message"]
        .as_str()
        .expect("message");
    assert!(
        message.contains("a GPU execution provider"),
        "the unmet requirement is named: {message}"
    );
    f.verifier.expect_event("team-a").await;
    assert_eq!(
        run.await.expect("join").expect("reconcile"),
        Action::requeue(Duration::from_secs(15))
    );
}

#[tokio::test]
async fn deletion_cancels_running_shards_and_removes_the_finalizer() {
    let mut f = Fixture::new().await;
    f.with_mesh().await;
    let (_a, mut rx) = f.agent("gpus-a", &["cpu"]).await;
    let spec = f.workload_spec("");
    let w = f.workload(spec, true);
    let key = f.submit(&w).await;
    let assigned = rx.recv().await.expect("open").expect("ok");
    assert!(matches!(assigned.msg, Some(Down::Assign(_))));
    let mut deleting = w.clone();
    deleting.metadata.deletion_timestamp = Some(
        k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::now()),
    );
    let run = f.reconcile_workload(deleting);
    let patch = f
        .verifier
        .expect(
            "PATCH",
            "/apis/infermesh.dev/v1alpha1/namespaces/team-a/workloads/w",
            200,
            serde_json::to_value(&w).expect("json"),
        )
        .await;
    assert!(patch.to_string().contains("remove"), "{patch}");
    assert_eq!(
        run.await.expect("join").expect("reconcile"),
        Action::await_change()
    );
    let mut cancelled = false;
    while let Ok(Some(Ok(m))) = tokio::time::timeout(Duration::from_millis(200), rx.recv()).await {
        cancelled |= matches!(m.msg, Some(Down::Cancel(_)));
    }
    assert!(cancelled, "the agent was told to cancel");
    let s = f.ctx.core.workload(&key).await.expect("known");
    assert_eq!(s.reason, "Deleted");
    assert_eq!(s.shards_running, 0);
}

#[tokio::test]
async fn suspend_pauses_dispatch() {
    let mut f = Fixture::new().await;
    f.with_mesh().await;
    let spec = f.workload_spec("");
    let w = f.workload(spec, true);
    let key = f.submit(&w).await;
    let mut suspended = w.clone();
    suspended.spec.suspend = true;
    workload::reconcile(Arc::new(suspended), f.ctx.clone())
        .await
        .expect("reconcile");
    let (_a, mut rx) = f.agent("gpus-a", &["cpu"]).await;
    let got = tokio::time::timeout(Duration::from_millis(300), rx.recv()).await;
    assert!(got.is_err(), "nothing dispatched while suspended: {got:?}");
    workload::reconcile(Arc::new(w), f.ctx.clone())
        .await
        .expect("reconcile");
    let got = tokio::time::timeout(Duration::from_secs(2), rx.recv())
        .await
        .expect("assign");
    assert!(matches!(
        got,
        Some(Ok(pb::OperatorMessage {
            msg: Some(Down::Assign(_))
        }))
    ));
    assert!(!f.ctx.core.workload(&key).await.expect("known").suspended);
    f.verifier.expect_nothing_more().await;
}

#[tokio::test]
async fn agent_registration_creates_an_agent() {
    let mut f = Fixture::new().await;
    f.with_mesh().await;
    let _a = f.agent("gpus-a", &["cpu"]).await;
    let mut writer = status::StatusWriter::new(f.ctx.clone());
    let tick = tokio::spawn(async move {
        let n = writer.tick(Instant::now()).await;
        (writer, n)
    });
    let created = f.verifier.expect("POST", "/apis/infermesh.dev/v1alpha1/agents", 201, json!({
        "apiVersion": "infermesh.dev/v1alpha1", "kind": "Agent", "metadata": {"name": "gpus-a"}, "spec": {"mesh": "gpus", "node": "node-gpus-a"}}))
        .await;
    assert_eq!(created["metadata"]["name"], "gpus-a");
    assert_eq!(created["spec"]["mesh"], "gpus");
    assert_eq!(created["spec"]["node"], "node-gpus-a");
    let status = f
        .verifier
        .expect(
            "PATCH",
            "/apis/infermesh.dev/v1alpha1/agents/gpus-a/status",
            200,
            agent_json("gpus-a"),
        )
        .await;
    assert_eq!(status["status"]["phase"], "Ready");
    assert_eq!(status["status"]["slots"], 2);
    assert_eq!(status["status"]["gpuSummary"], "none (cpu)");
    let (mut writer, n) = tick.await.expect("join");
    assert_eq!(n, 2, "one create, one status");
    // Nothing changed: the next tick writes nothing.
    let again = tokio::time::timeout(Duration::from_secs(5), writer.tick(Instant::now())).await;
    assert_eq!(again.expect("no request waits for an answer"), 0);
}

#[tokio::test]
async fn a_missed_lease_marks_the_agent_not_ready_and_requeues_its_shards() {
    let mut f = Fixture::new().await;
    f.with_mesh().await;
    let (_a, mut rx) = f.agent("gpus-a", &["cpu"]).await;
    let key = f.submit(&f.workload(f.workload_spec(""), true)).await;
    assert!(matches!(
        rx.recv().await,
        Some(Ok(pb::OperatorMessage {
            msg: Some(Down::Assign(_))
        }))
    ));
    let mut writer = status::StatusWriter::new(f.ctx.clone());
    let tick = tokio::spawn(async move {
        writer.tick(Instant::now()).await;
        writer
    });
    f.verifier
        .expect(
            "POST",
            "/apis/infermesh.dev/v1alpha1/agents",
            201,
            agent_json("gpus-a"),
        )
        .await;
    let s = f
        .verifier
        .expect(
            "PATCH",
            "/apis/infermesh.dev/v1alpha1/agents/gpus-a/status",
            200,
            agent_json("gpus-a"),
        )
        .await;
    assert_eq!(s["status"]["phase"], "Ready");
    assert_eq!(s["status"]["running"], 2);
    f.expect_workload_status().await;
    let mut writer = tick.await.expect("join");

    // The lease (5 s) passes without a heartbeat.
    let lost = f
        .ctx
        .core
        .reap(Instant::now() + Duration::from_secs(6))
        .await
        .expect("reap");
    assert_eq!(lost, vec!["gpus-a".to_string()]);
    let summary = f.ctx.core.workload(&key).await.expect("known");
    assert_eq!(
        summary.shards_running, 0,
        "its shards went back to the queue"
    );
    assert_eq!(summary.attempts_retried, 2);
    let tick =
        tokio::spawn(async move { writer.tick(Instant::now() + Duration::from_secs(3)).await });
    let s = f
        .verifier
        .expect(
            "PATCH",
            "/apis/infermesh.dev/v1alpha1/agents/gpus-a/status",
            200,
            agent_json("gpus-a"),
        )
        .await;
    assert_eq!(s["status"]["phase"], "NotReady");
    assert_eq!(reason_of(&s["status"], "Ready"), "LeaseExpired");
    let w = f.expect_workload_status().await;
    assert_eq!(w["shards"]["running"], 0);
    assert_eq!(w["attemptsRetried"], 2);
    assert_eq!(tick.await.expect("join"), 2);
}

#[tokio::test]
async fn a_workload_phase_change_is_written_before_routine_refreshes() {
    let mut f = Fixture::new().await;
    f.with_mesh().await;
    let (_a, mut rx) = f.agent("gpus-a", &["cpu"]).await;
    let key = f.submit(&f.workload(f.workload_spec(""), true)).await;
    assert!(matches!(
        rx.recv().await,
        Some(Ok(pb::OperatorMessage {
            msg: Some(Down::Assign(_))
        }))
    ));
    let t0 = Instant::now();
    let mut writer = status::StatusWriter::new(f.ctx.clone());
    let tick = tokio::spawn(async move {
        writer.tick(t0).await;
        writer
    });
    let agent_status = "/apis/infermesh.dev/v1alpha1/agents/gpus-a/status";
    f.verifier
        .expect(
            "POST",
            "/apis/infermesh.dev/v1alpha1/agents",
            201,
            agent_json("gpus-a"),
        )
        .await;
    let s = f
        .verifier
        .expect("PATCH", agent_status, 200, agent_json("gpus-a"))
        .await;
    assert_eq!(s["status"]["running"], 2);
    assert_eq!(f.expect_workload_status().await["phase"], "Running");
    let mut writer = tick.await.expect("join");

    // Both change: the Workload ends (Failed), the agent's running shards are taken back.
    assert!(
        f.ctx
            .core
            .cancel(&key, "Deleted", "deleted by the test")
            .await
            .expect("cancel")
    );
    // Both were last written at the same moment, the agent first; the phase goes first now.
    let tick = tokio::spawn(async move { writer.tick(t0 + Duration::from_secs(20)).await });
    let w = f.expect_workload_status().await;
    assert_eq!(w["phase"], "Failed");
    let s = f
        .verifier
        .expect("PATCH", agent_status, 200, agent_json("gpus-a"))
        .await;
    assert_eq!(s["status"]["running"], 0);
    assert_eq!(tick.await.expect("join"), 2);
    f.verifier.expect_nothing_more().await;
}

#[tokio::test]
async fn an_unschedulable_agent_is_drained() {
    let mut f = Fixture::new().await;
    f.with_mesh().await;
    let _a = f.agent("gpus-a", &["cpu"]).await;
    let mut agent = agent_object("gpus-a", "node-gpus-a", true);
    agent.metadata.uid = Some("a-uid".into());
    let action = agent::reconcile(Arc::new(agent), f.ctx.clone())
        .await
        .expect("reconcile");
    assert_eq!(action, Action::requeue(Duration::from_secs(300)));
    let a = f.ctx.core.agents().await.pop().expect("agent");
    assert!(a.unschedulable);
    assert_eq!(agent::phase(&a), infermesh_crds::AgentPhase::Draining);
    f.verifier.expect_nothing_more().await;
}

#[tokio::test]
async fn the_agent_of_a_deleted_node_is_removed() {
    let mut f = Fixture::new().await;
    let agent = agent_object("gpus-b", "node-b", false);
    let run = tokio::spawn(agent::reconcile(Arc::new(agent), f.ctx.clone()));
    f.verifier
        .expect("GET", "/api/v1/nodes/node-b", 404, not_found())
        .await;
    f.verifier.expect_agent_deleted("gpus-b").await;
    assert_eq!(
        run.await.expect("join").expect("reconcile"),
        Action::await_change()
    );
}

#[tokio::test]
async fn the_agent_whose_pod_is_gone_is_removed_but_not_while_its_pod_runs() {
    let mut f = Fixture::new().await;
    let agent = agent_object("gpus-c", "node-c", false);
    let node = json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-c"}});
    let pods = |n: usize| json!({"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": (0..n).map(|i| json!({"metadata": {"name": format!("p{i}")}})).collect::<Vec<_>>()});
    let run = tokio::spawn(agent::reconcile(Arc::new(agent.clone()), f.ctx.clone()));
    f.verifier
        .expect("GET", "/api/v1/nodes/node-c", 200, node.clone())
        .await;
    f.verifier
        .expect("GET", "/api/v1/namespaces/infermesh/pods", 200, pods(1))
        .await;
    // Only this Mesh's agent pods on this node.
    let query = f.verifier.last_query.clone();
    assert!(
        query.contains("labelSelector=infermesh.dev/mesh=gpus&"),
        "{query}"
    );
    assert!(
        query.contains("fieldSelector=spec.nodeName=node-c&"),
        "{query}"
    );
    assert_eq!(
        run.await.expect("join").expect("reconcile"),
        Action::requeue(Duration::from_secs(60))
    );
    let run = tokio::spawn(agent::reconcile(Arc::new(agent), f.ctx.clone()));
    f.verifier
        .expect("GET", "/api/v1/nodes/node-c", 200, node)
        .await;
    f.verifier
        .expect("GET", "/api/v1/namespaces/infermesh/pods", 200, pods(0))
        .await;
    f.verifier.expect_agent_deleted("gpus-c").await;
    assert_eq!(
        run.await.expect("join").expect("reconcile"),
        Action::await_change()
    );
}

#[tokio::test]
async fn leader_election_acquires_and_renews_the_lease() {
    let mut f = Fixture::new().await;
    let api = kube::Api::<k8s_openapi::api::coordination::v1::Lease>::namespaced(
        f.ctx.client.clone(),
        NS,
    );
    let elector = Arc::new(leader::LeaderElector::new(
        api,
        "leader",
        "operator-0",
        Duration::from_secs(15),
    ));
    let path = "/apis/coordination.k8s.io/v1/namespaces/infermesh/leases/leader";
    // Nobody holds it: created.
    let e = elector.clone();
    let run = tokio::spawn(async move { e.try_lead().await });
    f.verifier.expect("GET", path, 404, not_found()).await;
    let created = f
        .verifier
        .expect("POST", "/apis/coordination.k8s.io/v1/namespaces/infermesh/leases", 201, json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": {"name": "leader"}}))
        .await;
    assert_eq!(created["spec"]["holderIdentity"], "operator-0");
    assert_eq!(created["spec"]["leaseDurationSeconds"], 15);
    assert!(run.await.expect("join").expect("lead"));
    // Ours: renewed by a replace carrying the resourceVersion read.
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    let ours = json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": {"name": "leader", "resourceVersion": "7"},
                      "spec": {"holderIdentity": "operator-0", "leaseDurationSeconds": 15, "acquireTime": now, "renewTime": now, "leaseTransitions": 0}});
    let e = elector.clone();
    let run = tokio::spawn(async move { e.try_lead().await });
    f.verifier.expect("GET", path, 200, ours.clone()).await;
    let renewed = f.verifier.expect("PUT", path, 200, ours).await;
    assert_eq!(renewed["metadata"]["resourceVersion"], "7");
    assert_eq!(renewed["spec"]["holderIdentity"], "operator-0");
    assert!(run.await.expect("join").expect("lead"));
    // Another replica's live lease: followed, nothing written.
    let theirs = json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": {"name": "leader", "resourceVersion": "8"},
                        "spec": {"holderIdentity": "operator-1", "leaseDurationSeconds": 15, "renewTime": k8s_openapi::jiff::Timestamp::now().to_string()}});
    let e = elector.clone();
    let run = tokio::spawn(async move { e.try_lead().await });
    f.verifier.expect("GET", path, 200, theirs).await;
    assert!(!run.await.expect("join").expect("follow"));
    // A lost race on the replace (409) is not leading.
    let stale = json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": {"name": "leader", "resourceVersion": "9"},
                       "spec": {"holderIdentity": "operator-1", "leaseDurationSeconds": 15, "renewTime": "2020-01-01T00:00:00Z"}});
    let e = elector.clone();
    let run = tokio::spawn(async move { e.try_lead().await });
    f.verifier.expect("GET", path, 200, stale).await;
    let taken = f
        .verifier
        .expect("PUT", path, 409, json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Conflict", "code": 409, "message": "conflict"}))
        .await;
    assert_eq!(
        taken["spec"]["leaseTransitions"], 1,
        "a take-over counts a transition"
    );
    assert!(!run.await.expect("join").expect("lost race"));
}

/// A leader that died without a clean exit keeps its pod's leader label, and the gRPC
/// Service would send agents to it too (the control-plane suite's fail-over found it): the
/// new leader takes the label off every other pod.
#[tokio::test]
async fn a_new_leader_takes_the_label_off_former_leaders() {
    let mut f = Fixture::new().await;
    let client = f.ctx.client.clone();
    let run = tokio::spawn(async move { run::unlabel_others(&client, NS, "operator-1").await });
    let pod = |name: &str| json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": NS, "labels": {LEADER_LABEL: "true"}}});
    f.verifier
        .expect(
            "GET",
            "/api/v1/namespaces/infermesh/pods",
            200,
            json!({"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": [pod("operator-0"), pod("operator-1")]}),
        )
        .await;
    assert!(
        f.verifier
            .last_query
            .contains("labelSelector=infermesh.dev/leader=true&"),
        "{}",
        f.verifier.last_query
    );
    let patch = f
        .verifier
        .expect(
            "PATCH",
            "/api/v1/namespaces/infermesh/pods/operator-0",
            200,
            pod("operator-0"),
        )
        .await;
    // A merge patch that removes the label: the key, set to null.
    assert_eq!(
        patch["metadata"]["labels"]
            .as_object()
            .and_then(|l| l.get(LEADER_LABEL)),
        Some(&Value::Null),
        "{patch}"
    );
    run.await.expect("join").expect("unlabelled");
    f.verifier.expect_nothing_more().await;
}

#[tokio::test]
async fn a_token_review_that_is_not_authenticated_or_names_another_service_account_is_refused() {
    use crate::grpc::Authenticator;
    let mut f = Fixture::new().await;
    let reviewer = Arc::new(token_review::TokenReviewer::new(
        f.ctx.client.clone(),
        NS,
        None,
    ));
    let path = "/apis/authentication.k8s.io/v1/tokenreviews";
    let review = |authenticated: bool, user: &str| {
        json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": {},
               "status": {"authenticated": authenticated, "user": {"username": user}, "audiences": ["infermesh"]}})
    };
    // Not authenticated.
    let r = reviewer.clone();
    let run = tokio::spawn(async move { r.authenticate("bad-token").await });
    let sent = f
        .verifier
        .expect("POST", path, 201, review(false, ""))
        .await;
    assert_eq!(sent["spec"]["token"], "bad-token");
    assert_eq!(sent["spec"]["audiences"][0], "infermesh");
    let err = run.await.expect("join").expect_err("refused");
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    // Authenticated, but as another ServiceAccount than the Mesh's.
    let r = reviewer.clone();
    let run = tokio::spawn(async move { r.authenticate("other-token").await });
    f.verifier
        .expect(
            "POST",
            path,
            201,
            review(true, "system:serviceaccount:infermesh:default"),
        )
        .await;
    let mut who = run.await.expect("join").expect("authenticated");
    let err = reviewer
        .authorize(&mut who, "gpus")
        .expect_err("not the mesh's account");
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    assert!(
        err.message().contains("infermesh-agent-gpus"),
        "{}",
        err.message()
    );
    // The Mesh's own ServiceAccount is accepted, for that Mesh only; the answer is cached.
    let r = reviewer.clone();
    let run = tokio::spawn(async move { r.authenticate("good-token").await });
    f.verifier
        .expect(
            "POST",
            path,
            201,
            review(true, "system:serviceaccount:infermesh:infermesh-agent-gpus"),
        )
        .await;
    let who = run.await.expect("join").expect("authenticated");
    assert_eq!(who.node, None, "no node claim in this review");
    reviewer
        .authorize(&mut who.clone(), "gpus")
        .expect("the mesh's agents");
    assert!(reviewer.authorize(&mut who.clone(), "other-mesh").is_err());
    let again = reviewer.authenticate("good-token").await.expect("cached");
    assert_eq!(again, who);
    // A projected token bound to its pod and node: the agent's identity is `<mesh>-<node>`,
    // whatever its Hello will say.
    let r = reviewer.clone();
    let run = tokio::spawn(async move { r.authenticate("bound-token").await });
    f.verifier
        .expect(
            "POST",
            path,
            201,
            json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": {},
                   "status": {"authenticated": true, "audiences": ["infermesh"],
                              "user": {"username": "system:serviceaccount:infermesh:infermesh-agent-gpus",
                                       "extra": {"authentication.kubernetes.io/node-name": ["node-a"],
                                                 "authentication.kubernetes.io/pod-name": ["infermesh-agent-gpus-x7k2p"]}}}}),
        )
        .await;
    let mut bound = run.await.expect("join").expect("authenticated");
    assert_eq!(bound.node.as_deref(), Some("node-a"));
    assert_eq!(
        bound.instance.as_deref(),
        Some("infermesh-agent-gpus-x7k2p")
    );
    reviewer
        .authorize(&mut bound, "gpus")
        .expect("the mesh's agent");
    assert_eq!(
        bound.agent.as_deref(),
        Some("gpus-node-a"),
        "bound to its node's agent id"
    );
    f.verifier.expect_nothing_more().await;
}

#[test]
fn rbac_yaml_grants_the_calls_made_outside_the_scenarios() {
    // The scenarios above check each request they see against the rules. The watches run
    // inside kube-runtime's controllers, and start-up (CRD check, TLS Secret, pod label) runs
    // in `run`, which no scenario drives: their calls are listed here.
    let rules = Rules::committed().expect("rbac.yaml");
    let all: Vec<(String, String)> = rules
        .cluster
        .iter()
        .chain(&rules.namespace)
        .flat_map(|r| {
            r.resources
                .iter()
                .flat_map(move |res| r.verbs.iter().map(move |v| (v.clone(), res.clone())))
        })
        .collect();
    for needed in [
        ("watch", "meshes"),
        ("watch", "workloads"),
        ("watch", "agents"),
        ("watch", "daemonsets"),
        ("list", "meshes"),
        ("get", "customresourcedefinitions"),
        ("get", "secrets"),
        ("create", "secrets"),
        ("patch", "pods"),
        ("list", "pods"),
        ("create", "events"),
        ("patch", "events"),
    ] {
        assert!(
            all.contains(&(needed.0.to_string(), needed.1.to_string())),
            "rbac.yaml lacks {needed:?}"
        );
    }
}

#[tokio::test]
async fn the_grpc_port_serves_tls_with_the_provisioned_certificate_and_agents_trusting_its_ca_attach()
 {
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};
    let core = Arc::new(Core::new(Backend::Sqlite.open().await));
    let m = Fixture::new().await.mesh(true);
    core.upsert_mesh("gpus", m.spec).await.expect("mesh");
    let host = "infermesh-grpc.infermesh.svc";
    let material = tls::generate(&tls::subject_names(host)).expect("certificate");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(crate::grpc::serve(
        listener,
        core.clone(),
        Arc::new(crate::grpc::StaticToken::new("t")),
        Some(tls::server_config(&material)),
        std::future::pending(),
    ));
    let attach = |ca: String| async move {
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(ca))
            .domain_name(host);
        let channel = Endpoint::from_shared(format!("https://127.0.0.1:{port}"))
            .expect("endpoint")
            .tls_config(tls)
            .expect("tls")
            .connect()
            .await?;
        let mut client = pb::agent_service_client::AgentServiceClient::new(channel);
        let hello = pb::AgentMessage {
            msg: Some(pb::agent_message::Msg::Hello(pb::Hello {
                agent_id: "gpus-a".into(),
                node: "a".into(),
                mesh: "gpus".into(),
                version: "t".into(),
                capabilities: Some(pb::Capabilities {
                    execution_providers: vec!["cpu".into()],
                    slots: 1,
                    ..Default::default()
                }),
            })),
        };
        let mut request =
            tonic::Request::new(tokio_stream::iter(vec![hello]).chain(tokio_stream::pending()));
        request
            .metadata_mut()
            .insert("authorization", "Bearer t".parse().expect("header"));
        let mut stream = client
            .attach(request)
            .await
            .map_err(|s| anyhow_status(&s))?
            .into_inner();
        let first = stream.message().await.map_err(|s| anyhow_status(&s))?;
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(first)
    };
    let first = tokio::time::timeout(Duration::from_secs(10), attach(material.ca.clone()))
        .await
        .expect("in time")
        .expect("attached over TLS");
    assert!(
        matches!(
            first,
            Some(pb::OperatorMessage {
                msg: Some(Down::Welcome(_))
            })
        ),
        "{first:?}"
    );
    // A client that trusts another CA is refused at the handshake.
    let other = tls::generate(&tls::subject_names(host)).expect("other CA");
    let refused = tokio::time::timeout(Duration::from_secs(10), attach(other.ca))
        .await
        .expect("in time");
    let err = refused.expect_err("a foreign CA must not verify the operator's certificate");
    // The refusal is the certificate check (the other CA has the same name, so rustls says
    // BadSignature), several sources down the transport error.
    let mut chain = err.to_string();
    let mut source = err.source();
    while let Some(e) = source {
        chain.push_str(&format!(" / {e}"));
        source = e.source();
    }
    assert!(chain.contains("invalid peer certificate"), "{chain}");
}

fn anyhow_status(s: &tonic::Status) -> Box<dyn std::error::Error + Send + Sync> {
    format!("{:?}: {}", s.code(), s.message()).into()
}

#[tokio::test]
async fn startup_names_the_command_to_install_missing_crds() {
    let mut f = Fixture::new().await;
    let client = f.ctx.client.clone();
    let run = tokio::spawn(async move { run::check_crds(&client).await });
    let crd = json!({"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition", "metadata": {"name": "meshes.infermesh.dev"},
                     "spec": {"group": "infermesh.dev", "names": {"kind": "Mesh", "plural": "meshes"}, "scope": "Cluster", "versions": []}});
    f.verifier
        .expect(
            "GET",
            "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/meshes.infermesh.dev",
            200,
            crd,
        )
        .await;
    f.verifier
        .expect(
            "GET",
            "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/agents.infermesh.dev",
            404,
            not_found(),
        )
        .await;
    let err = run.await.expect("join").expect_err("agents CRD missing");
    assert!(
        err.contains("agents.infermesh.dev is not installed"),
        "{err}"
    );
    assert!(err.contains("infermesh crd | kubectl apply -f -"), "{err}");
}

#[tokio::test(start_paused = true)]
async fn an_urgent_write_goes_ahead_of_routine_writes_already_waiting() {
    let pacer = Arc::new(WritePacer::new(10));
    let order = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for i in 0..10 {
        let (p, o) = (pacer.clone(), order.clone());
        tasks.push(tokio::spawn(async move {
            p.wait().await;
            o.lock().expect("order").push(format!("routine-{i}"));
        }));
        tokio::task::yield_now().await;
    }
    // Turns at 0 and 100 ms go to the first two routine calls; at 150 ms an urgent call asks.
    tokio::time::sleep(Duration::from_millis(150)).await;
    let (p, o) = (pacer.clone(), order.clone());
    tasks.push(tokio::spawn(async move {
        p.wait_urgent().await;
        o.lock().expect("order").push("urgent".to_string());
    }));
    for t in tasks {
        t.await.expect("join");
    }
    let order = order.lock().expect("order").clone();
    assert_eq!(order.len(), 11);
    assert_eq!(
        order.iter().position(|s| s == "urgent"),
        Some(2),
        "the urgent call takes the next turn, ahead of eight routine calls: {order:?}"
    );
    let routine: Vec<String> = order
        .iter()
        .filter(|s| s.starts_with("routine"))
        .cloned()
        .collect();
    let asked: Vec<String> = (0..10).map(|i| format!("routine-{i}")).collect();
    assert_eq!(routine, asked, "routine calls keep their order");
}

#[tokio::test(start_paused = true)]
async fn the_write_pacer_keeps_any_second_to_its_rate_however_many_tasks_write() {
    let pacer = Arc::new(WritePacer::new(15));
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let pacer = pacer.clone();
        tasks.push(tokio::spawn(async move {
            let mut at = Vec::new();
            for _ in 0..15 {
                pacer.wait().await;
                at.push(tokio::time::Instant::now());
            }
            at
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("join"));
    }
    all.sort();
    assert_eq!(all.len(), 60);
    for (i, start) in all.iter().enumerate() {
        let in_window = all[i..]
            .iter()
            .take_while(|t| t.duration_since(*start) < Duration::from_secs(1))
            .count();
        assert!(in_window <= 16, "{in_window} calls within one second");
    }
    let span = all[59].duration_since(all[0]);
    assert!(
        span >= Duration::from_millis(59 * 66),
        "paced, not bursty: {span:?}"
    );
}

// ---- lifecycle: retryGeneration and ttlSecondsAfterFinished ---------------------------------

/// A status in `phase` that finished `ago` before now (its `completionTime`).
fn finished_status(phase: WorkloadPhase, ago: Duration) -> WorkloadStatus {
    let at = k8s_openapi::jiff::Timestamp::now()
        - k8s_openapi::jiff::SignedDuration::try_from(ago).expect("duration");
    WorkloadStatus {
        phase,
        completion_time: Some(at.to_string()),
        ..WorkloadStatus::default()
    }
}

#[test]
fn deletion_is_due_ttl_seconds_after_the_workload_finished() {
    let done = finished_status(WorkloadPhase::Succeeded, Duration::ZERO);
    let finished: k8s_openapi::jiff::Timestamp = done
        .completion_time
        .as_deref()
        .expect("time")
        .parse()
        .expect("rfc3339");
    let due = workload::deletion_due(Some(60), Some(&done)).expect("due");
    assert_eq!(due.duration_since(finished).as_secs(), 60);
    assert_eq!(
        workload::deletion_due(Some(0), Some(&done)),
        Some(finished),
        "0: at once"
    );
    let failed = finished_status(WorkloadPhase::Failed, Duration::ZERO);
    assert!(
        workload::deletion_due(Some(60), Some(&failed)).is_some(),
        "a failed workload too"
    );
    assert_eq!(workload::deletion_due(None, Some(&done)), None, "no TTL");
    assert_eq!(workload::deletion_due(Some(60), None), None, "no status");
    for phase in [WorkloadPhase::Pending, WorkloadPhase::Running] {
        let mut running = done.clone();
        running.phase = phase;
        assert_eq!(
            workload::deletion_due(Some(60), Some(&running)),
            None,
            "not finished: {phase:?}"
        );
    }
    let mut unknown = done.clone();
    unknown.completion_time = None;
    assert_eq!(workload::deletion_due(Some(60), Some(&unknown)), None);
    unknown.completion_time = Some("yesterday".into());
    assert_eq!(workload::deletion_due(Some(60), Some(&unknown)), None);
}

#[test]
fn a_failed_workload_is_retried_once_per_retry_generation() {
    let status = |phase, observed: Option<u32>| WorkloadStatus {
        phase,
        observed_retry_generation: observed,
        ..WorkloadStatus::default()
    };
    let failed = status(WorkloadPhase::Failed, None);
    assert!(
        !workload::should_retry_generation(0, Some(&failed)),
        "the default asks nothing"
    );
    assert!(workload::should_retry_generation(1, Some(&failed)));
    assert!(!workload::should_retry_generation(1, None), "never ran");
    let retried = status(WorkloadPhase::Failed, Some(1));
    assert!(
        !workload::should_retry_generation(1, Some(&retried)),
        "a generation acted on is not acted on again, even if it failed again"
    );
    assert!(workload::should_retry_generation(2, Some(&retried)));
    assert!(
        !workload::should_retry_generation(0, Some(&retried)),
        "lowered: nothing"
    );
    for phase in [
        WorkloadPhase::Pending,
        WorkloadPhase::Running,
        WorkloadPhase::Succeeded,
    ] {
        assert!(
            !workload::should_retry_generation(2, Some(&status(phase, Some(1)))),
            "only a Failed workload is retried ({phase:?})"
        );
    }
}

/// A Workload whose run failed (in the core and in the store), finished long enough ago.
async fn failed_run(f: &Fixture, ttl: Option<u32>, ago: Duration) -> (Workload, String) {
    let mut w = f.workload(f.workload_spec(""), true);
    w.spec.ttl_seconds_after_finished = ttl;
    let key = f.submit(&w).await;
    assert!(
        f.ctx
            .core
            .cancel(&key, "InvalidInput", "failed for the test")
            .await
            .expect("cancel")
    );
    w.status = Some(finished_status(WorkloadPhase::Failed, ago));
    (w, key)
}

#[tokio::test]
async fn a_finished_workload_is_deleted_once_its_ttl_has_passed_and_its_history_stays() {
    let mut f = Fixture::new().await;
    f.with_mesh().await;
    let (w, key) = failed_run(&f, Some(60), Duration::from_secs(61)).await;
    f.ctx.core.release(&key);
    let run = f.reconcile_workload(w.clone());
    f.verifier
        .expect(
            "DELETE",
            "/apis/infermesh.dev/v1alpha1/namespaces/team-a/workloads/w",
            200,
            serde_json::to_value(&w).expect("json"),
        )
        .await;
    let event = f.verifier.expect_event("team-a").await;
    assert_eq!(event["reason"], "TTLExpired");
    assert_eq!(event["type"], "Normal");
    assert!(
        event["note"]
            .as_str()
            .expect("note")
            .contains("ttlSecondsAfterFinished"),
        "{event}"
    );
    assert_eq!(
        run.await.expect("join").expect("reconcile"),
        Action::await_change()
    );
    f.verifier.expect_nothing_more().await;
    // Only the object went: the store keeps the run and its events.
    use crate::store::Store as _;
    let store = f.ctx.core.store();
    assert_eq!(
        store
            .workload_phase("w-uid")
            .await
            .expect("phase")
            .as_deref(),
        Some("Failed")
    );
    let events = store
        .events(&crate::store::EventFilter {
            workload_uid: Some("w-uid".into()),
            ..Default::default()
        })
        .await
        .expect("events");
    assert!(
        events.iter().any(|e| e.kind == "workload.failed"),
        "{events:?}"
    );
}

#[tokio::test]
async fn a_workload_is_not_deleted_before_its_ttl_nor_while_it_runs() {
    let mut f = Fixture::new().await;
    f.with_mesh().await;
    // Finished 10 s ago with a TTL of 60 s: looked at again when due, nothing sent.
    let (w, _) = failed_run(&f, Some(60), Duration::from_secs(10)).await;
    let action = f
        .reconcile_workload(w)
        .await
        .expect("join")
        .expect("reconcile");
    assert!(
        (45..=52).any(|s| action == Action::requeue(Duration::from_secs(s))),
        "requeued for when the TTL passes: {action:?}"
    );
    f.verifier.expect_nothing_more().await;

    // A running workload with a TTL of 0 is left alone.
    let mut running = f.workload(f.workload_spec("  ttlSecondsAfterFinished: 0\n"), true);
    running.metadata.uid = Some("w-uid-2".into());
    running.status = Some(WorkloadStatus {
        phase: WorkloadPhase::Running,
        ..WorkloadStatus::default()
    });
    f.ctx
        .core
        .submit(crate::core::Submission {
            namespace: "team-a".into(),
            name: "w".into(),
            uid: "w-uid-2".into(),
            spec: running.spec.clone(),
            input_size: 4096,
            input_version: None,
            input_files: None,
            credentials: None,
        })
        .await
        .expect("submit");
    let action = f
        .reconcile_workload(running.clone())
        .await
        .expect("join")
        .expect("reconcile");
    assert_eq!(action, Action::requeue(Duration::from_secs(300)));
    // Nor one whose object says Failed while the core runs it again (a status that lags
    // behind a retry).
    running.status = Some(finished_status(
        WorkloadPhase::Failed,
        Duration::from_secs(600),
    ));
    f.reconcile_workload(running)
        .await
        .expect("join")
        .expect("reconcile");
    f.verifier.expect_nothing_more().await;
}

#[tokio::test]
async fn bumping_retry_generation_retries_a_failed_workload_once() {
    let mut f = Fixture::new().await;
    f.with_mesh().await;
    let (mut w, key) = failed_run(&f, None, Duration::from_secs(5)).await;
    let (_a, mut rx) = f.agent("gpus-a", &["cpu"]).await;
    w.spec.retry_generation = 1;
    w.metadata.generation = Some(2);
    if let Some(s) = w.status.as_mut() {
        // Retried once before by the annotation: that mark must survive this write.
        s.last_retry = Some("first".into());
    }
    let run = f.reconcile_workload(w.clone());
    let patch = f
        .verifier
        .expect(
            "PATCH",
            "/apis/infermesh.dev/v1alpha1/namespaces/team-a/workloads/w/status",
            200,
            serde_json::to_value(&w).expect("json"),
        )
        .await;
    assert!(
        f.verifier
            .last_query
            .contains(&format!("fieldManager={}", workload::RETRY_FIELD_MANAGER)),
        "{}",
        f.verifier.last_query
    );
    assert_eq!(
        patch["status"],
        json!({"lastRetry": "first", "observedRetryGeneration": 1})
    );
    let event = f.verifier.expect_event("team-a").await;
    assert_eq!(event["reason"], "Retried");
    assert!(
        event["note"]
            .as_str()
            .expect("note")
            .starts_with("retryGeneration 1:"),
        "{event}"
    );
    run.await.expect("join").expect("reconcile");
    let s = f.ctx.core.workload(&key).await.expect("live again");
    assert_eq!(
        (s.phase, s.reason.as_str()),
        (WorkloadPhase::Running, "Retried")
    );
    expect_assign(&mut rx).await;

    // The same generation again (the object still says Failed, the mark written): nothing.
    if let Some(s) = w.status.as_mut() {
        s.observed_retry_generation = Some(1);
    }
    f.reconcile_workload(w)
        .await
        .expect("join")
        .expect("reconcile");
    f.verifier.expect_nothing_more().await;
}

/// Waits (2 s at most) for the agent's next message and checks that it is an Assign.
async fn expect_assign(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<Result<pb::OperatorMessage, tonic::Status>>,
) {
    let msg = tokio::time::timeout(Duration::from_secs(2), rx.recv())
        .await
        .expect("assign")
        .expect("open");
    assert!(
        matches!(
            msg,
            Ok(pb::OperatorMessage {
                msg: Some(Down::Assign(_))
            })
        ),
        "{msg:?}"
    );
}

/// Loads Mesh `gpus` with `spec.tenants` (team-a may read and write only under
/// `<data>/team-a/`) into the core.
async fn with_tenanted_mesh(f: &Fixture) {
    let mut m = f.mesh(true);
    let d = f.data.path().display();
    m.spec.tenants = Some(vec![infermesh_crds::TenantSpec {
        namespace: "team-a".into(),
        read: vec![format!("file://{d}/team-a/")],
        write: vec![format!("file://{d}/team-a/out/")],
    }]);
    f.ctx.core.upsert_mesh("gpus", m.spec).await.expect("mesh");
}

/// The credentials Secret of team-a, as the API server returns it.
fn team_a_secret() -> Value {
    json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "s3", "namespace": "team-a"},
        "data": {
            "AWS_ACCESS_KEY_ID": "QUtJQVRFQU1B",
            "AWS_SECRET_ACCESS_KEY": "c0VjUmVULXRlYW0tYS12YWx1ZQ=="
        }
    })
}

const TEAM_A_SECRET: &str = "sEcReT-team-a-value";

#[tokio::test]
async fn a_location_outside_the_namespaces_grant_is_forbidden_before_anything_is_read() {
    let mut f = Fixture::new().await;
    with_tenanted_mesh(&f).await;
    let _agent = f.agent("gpus-a", &["cpu"]).await;
    // The fixture's model and input lie beside `team-a/`, not under it.
    let spec = f.workload_spec("  credentials: {secretRef: {name: s3}}\n");
    let run = f.reconcile_workload(f.workload(spec, true));
    let status = f.expect_workload_status().await;
    assert_eq!(status["phase"], "Failed");
    assert_eq!(reason_of(&status, "Admitted"), "Forbidden");
    let message = status["conditions"][0]["message"]
        .as_str()
        .expect("message");
    let d = f.data.path().display();
    assert!(
        message.starts_with("spec.model.uri") && message.contains(&format!("file://{d}/team-a/")),
        "the field and the prefix are named: {message}"
    );
    let event = f.verifier.expect_event("team-a").await;
    assert_eq!(event["reason"], "Forbidden");
    assert_eq!(
        run.await.expect("join").expect("reconcile"),
        Action::await_change()
    );
    // Refused before its Secret was read, and before any object was: no GET, no output.
    f.verifier.expect_nothing_more().await;
    assert!(!f.verifier.seen.iter().any(|(_, r)| r == "secrets"));
    assert!(!f.data.path().join("out").exists());
    assert!(f.ctx.core.workloads().await.is_empty());
}

#[tokio::test]
async fn credentials_are_read_from_the_workloads_namespace_and_travel_only_in_the_assign() {
    let mut f = Fixture::new().await;
    f.with_mesh().await;
    let (_a, mut rx) = f.agent("gpus-a", &["cpu"]).await;
    let spec = f.workload_spec("  credentials: {secretRef: {name: s3}}\n");
    let run = f.reconcile_workload(f.workload(spec, true));
    f.verifier
        .expect(
            "GET",
            "/api/v1/namespaces/team-a/secrets/s3",
            200,
            team_a_secret(),
        )
        .await;
    let status = f.expect_workload_status().await;
    assert_eq!(status["phase"], "Running", "{status}");
    let event = f.verifier.expect_event("team-a").await;
    run.await.expect("join").expect("reconcile");
    for body in [&status, &event] {
        assert!(!body.to_string().contains(TEAM_A_SECRET), "{body}");
    }
    let msg = tokio::time::timeout(Duration::from_secs(2), rx.recv())
        .await
        .expect("assign")
        .expect("open")
        .expect("ok");
    let Some(Down::Assign(assign)) = msg.msg else {
        panic!("expected an Assign, got {msg:?}")
    };
    let c = assign.credentials.as_ref().expect("credentials");
    assert_eq!(
        (c.access_key_id.as_str(), c.secret_access_key.as_str()),
        ("AKIATEAMA", TEAM_A_SECRET)
    );
    assert!(!format!("{assign:?}").contains(TEAM_A_SECRET));
    // Neither the metrics nor the event log hold it.
    let metrics = f.ctx.metrics.encode();
    assert!(!metrics.contains(TEAM_A_SECRET));
    let events = f
        .ctx
        .core
        .store()
        .events(&crate::store::EventFilter::default())
        .await
        .expect("events");
    assert!(!format!("{events:?}").contains(TEAM_A_SECRET));
}

#[tokio::test]
async fn a_missing_or_unreadable_secret_makes_the_workload_wait_saying_why() {
    let mut f = Fixture::new().await;
    f.with_mesh().await;
    let spec = f.workload_spec("  credentials: {secretRef: {name: s3}}\n");
    for (code, reply, reason, said) in [
        (
            404,
            not_found(),
            "SecretNotFound",
            "Secret team-a/s3 does not exist",
        ),
        (
            403,
            json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Forbidden", "code": 403, "message": "forbidden"}),
            "Forbidden",
            "tenants.namespaces",
        ),
        (
            200,
            json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s3"}, "data": {"AWS_ACCESS_KEY_ID": "QUtJQVRFQU1B"}}),
            "InvalidCredentials",
            "without AWS_SECRET_ACCESS_KEY",
        ),
    ] {
        let run = f.reconcile_workload(f.workload(spec.clone(), true));
        f.verifier
            .expect("GET", "/api/v1/namespaces/team-a/secrets/s3", code, reply)
            .await;
        let status = f.expect_workload_status().await;
        assert_eq!(status["phase"], "Pending");
        assert_eq!(reason_of(&status, "Admitted"), reason);
        let message = status["conditions"][0]["message"]
            .as_str()
            .expect("message");
        assert!(
            message.starts_with("spec.credentials.secretRef") && message.contains(said),
            "{message}"
        );
        f.verifier.expect_event("team-a").await;
        assert_eq!(
            run.await.expect("join").expect("reconcile"),
            Action::requeue(Duration::from_secs(30))
        );
        assert!(f.ctx.core.workloads().await.is_empty());
    }
}

#[tokio::test]
async fn a_workload_whose_output_overlaps_a_live_ones_waits_with_output_in_use() {
    let mut f = Fixture::new().await;
    f.with_mesh().await;
    let _agent = f.agent("gpus-a", &["cpu"]).await;
    let first = f.workload(f.workload_spec(""), true);
    let key = f.submit(&first).await;
    // Another Workload writing below the first one's output.
    let d = f.data.path().display();
    let mut spec = f.workload_spec("");
    spec.output.uri = format!("file://{d}/out/more/");
    let mut second = f.workload(spec, true);
    second.metadata.name = Some("w2".into());
    second.metadata.uid = Some("w2-uid".into());
    let run = f.reconcile_workload(second);
    let body = f
        .verifier
        .expect(
            "PATCH",
            "/apis/infermesh.dev/v1alpha1/namespaces/team-a/workloads/w2/status",
            200,
            f.workload_json(),
        )
        .await;
    let status = &body["status"];
    assert_eq!(status["phase"], "Pending");
    assert_eq!(reason_of(status, "Admitted"), "OutputInUse");
    let message = status["conditions"][0]["message"]
        .as_str()
        .expect("message");
    assert!(message.contains(&key), "names the live workload: {message}");
    let event = f.verifier.expect_event("team-a").await;
    assert_eq!(event["reason"], "OutputInUse");
    assert_eq!(
        run.await.expect("join").expect("reconcile"),
        Action::requeue(Duration::from_secs(10))
    );
    assert_eq!(f.ctx.core.workloads().await.len(), 1);
}
