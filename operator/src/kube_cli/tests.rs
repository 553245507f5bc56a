//! The cluster commands against a mocked API server (tower-test, as `controller/tests.rs`):
//! each scenario asserts the method, path, query and body of every request, in order, and
//! that nothing else is sent; and the pure renderers and filters on their own.

use std::time::Duration;

use clap::Parser;
use http::{Request, Response};
use infermesh_crds::{Agent, AgentSpec, AgentStatus, Workload, WorkloadPhase, WorkloadSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::client::Body;
use serde_json::{Value, json};

use super::render::{self, Columns};
use super::*;

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

/// A request as the mock saw it.
#[derive(Debug)]
struct Seen {
    /// `key=value&` pairs, percent-decoded.
    query: String,
    content_type: String,
    body: Value,
}

/// The API server's side of a scenario.
struct Mock {
    handle: Handle,
}

impl Mock {
    /// Takes the next request, asserts its method and path, answers `status` with `reply`
    /// (JSON, or a string sent as text).
    async fn expect(&mut self, method: &str, path: &str, status: u16, reply: Value) -> Seen {
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
        let query = url::form_urlencoded::parse(uri.query().unwrap_or("").as_bytes())
            .map(|(k, v)| format!("{k}={v}&"))
            .collect();
        let content_type = request
            .headers()
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let bytes = request.into_body().collect_bytes().await.expect("body");
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).expect("JSON body")
        };
        let bytes = match reply {
            Value::String(text) => text.into_bytes(),
            other => serde_json::to_vec(&other).expect("json"),
        };
        send.send_response(
            Response::builder()
                .status(status)
                .body(Body::from(bytes))
                .expect("response"),
        );
        Seen {
            query,
            content_type,
            body,
        }
    }

    /// Asserts that no further request comes.
    async fn expect_nothing_more(&mut self) {
        let next =
            tokio::time::timeout(Duration::from_millis(200), self.handle.next_request()).await;
        if let Ok(Some((r, _))) = next {
            panic!("unexpected request {} {}", r.method(), r.uri());
        }
    }
}

fn mock_api() -> (Client, Mock) {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    (Client::new(service, "team-a"), Mock { handle })
}

/// Collects what a command prints.
#[derive(Default)]
struct Collect {
    out: String,
    warnings: Vec<String>,
}

impl Sink for Collect {
    fn out(&mut self, text: &str) {
        self.out.push_str(text);
    }
    fn warn(&mut self, text: &str) {
        self.warnings.push(text.to_string());
    }
}

fn parse(args: &[&str]) -> ClusterCommand {
    #[derive(clap::Parser)]
    struct Cli {
        #[command(subcommand)]
        command: ClusterCommand,
    }
    let mut argv = vec!["infermesh"];
    argv.extend(args);
    Cli::try_parse_from(argv).expect("arguments").command
}

/// Runs `infermesh ARGS` against the mock while `script` plays the server.
async fn run_cli(
    client: Client,
    args: &[&str],
    script: impl Future<Output = ()>,
) -> (Result<()>, Collect) {
    let command = parse(args);
    let mut sink = Collect::default();
    let (result, ()) = tokio::join!(run(client, &command, &mut sink), script);
    (result, sink)
}

const GROUP_PATH: &str = "/apis/infermesh.dev/v1alpha1";
const FAILURE: &str = "shard 2 attempt 3 on gpus-node-a: InvalidInput: file:///data/in.jsonl line 17 \
     (byte offset 1530): input \"x\": expected 4 floats, got 3";

fn now() -> Timestamp {
    "2026-05-01T12:00:00Z".parse().expect("time")
}

fn time(s: &str) -> Time {
    Time(s.parse().expect("time"))
}

fn spec() -> WorkloadSpec {
    serde_yaml::from_str(
        "mesh: gpus\nmodel: {uri: \"file:///data/model.onnx\"}\ntask: {tensor: {inputs: [{name: x}]}}\n\
         input: {uri: \"file:///data/in.jsonl\"}\noutput: {uri: \"file:///data/out/\"}\n",
    )
    .expect("spec")
}

fn workload(name: &str, phase: WorkloadPhase) -> Workload {
    let mut w = Workload::new(name, spec());
    w.metadata.namespace = Some("team-a".into());
    w.metadata.uid = Some(format!("{name}-uid"));
    w.metadata.generation = Some(1);
    w.metadata.resource_version = Some("42".into());
    w.metadata.creation_timestamp = Some(time("2026-05-01T11:55:00Z"));
    let mut status = infermesh_crds::WorkloadStatus {
        phase,
        records: 300,
        progress: Some("75%".into()),
        throughput: Some(12.5),
        eta: Some("1m4s".into()),
        credits_spent: Some("1.500000".into()),
        attempts_retried: 2,
        start_time: Some("2026-05-01T11:55:10Z".into()),
        observed_generation: Some(1),
        ..Default::default()
    };
    status.shards = infermesh_crds::ShardCounts {
        total: 4,
        pending: 0,
        running: 1,
        succeeded: 3,
        failed: 0,
    };
    w.status = Some(status);
    w
}

fn failing_workload() -> Workload {
    let mut w = workload("embed", WorkloadPhase::Failed);
    let status = w.status.as_mut().expect("status");
    status.shards.running = 0;
    status.shards.failed = 1;
    status.eta = None;
    status.completion_time = Some("2026-05-01T11:58:00Z".into());
    let cond = |type_: &str, status: &str, reason: &str, message: &str| Condition {
        type_: type_.into(),
        status: status.into(),
        reason: reason.into(),
        message: message.into(),
        last_transition_time: time("2026-05-01T11:58:00Z"),
        observed_generation: Some(1),
    };
    status.conditions = vec![
        cond("Admitted", "True", "Admitted", "4 shards planned"),
        cond("Complete", "False", "AttemptsExhausted", FAILURE),
        cond("Failed", "True", "AttemptsExhausted", FAILURE),
    ];
    w
}

fn agent(name: &str) -> Agent {
    let mut a = Agent::new(
        name,
        AgentSpec {
            mesh: "gpus".into(),
            node: "node-a".into(),
            unschedulable: false,
        },
    );
    a.metadata.uid = Some(format!("{name}-uid"));
    a.metadata.creation_timestamp = Some(time("2026-04-28T12:00:00Z"));
    a.status = Some(AgentStatus {
        phase: infermesh_crds::AgentPhase::Ready,
        gpu_summary: Some("2x NVIDIA L4 24Gi".into()),
        execution_providers: vec!["cuda".into(), "cpu".into()],
        models_cached: vec!["aa".into(), "bb".into()],
        models_loaded: vec!["aa".into()],
        slots: 2,
        running: 1,
        completed_shards: 17,
        credits: Some("3.250000".into()),
        last_heartbeat: Some("2026-05-01T11:59:57Z".into()),
        ..Default::default()
    });
    a
}

fn not_found(what: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "reason": "NotFound", "code": 404, "message": format!("{what} not found"),
           "details": {"name": "x", "group": "infermesh.dev"}})
}

fn event(name: &str, reason: &str, kind: &str, message: &str, at: &str, count: i32) -> Value {
    json!({
        "metadata": {"name": name, "namespace": "team-a", "resourceVersion": format!("{count}")},
        "involvedObject": {"apiVersion": "infermesh.dev/v1alpha1", "kind": "Workload",
                           "namespace": "team-a", "name": "embed", "uid": "embed-uid"},
        "reason": reason, "type": kind, "message": message,
        "eventTime": at, "reportingComponent": "infermesh-operator",
        "reportingInstance": "operator-0", "action": "Reconcile",
        "count": count
    })
}

fn event_list(items: Vec<Value>) -> Value {
    json!({"apiVersion": "v1", "kind": "EventList", "metadata": {"resourceVersion": "9"}, "items": items})
}

// ---- get ----------------------------------------------------------------------------------

#[tokio::test]
async fn get_json_round_trips_the_workload_list() {
    let items = vec![
        failing_workload(),
        workload("other", WorkloadPhase::Running),
    ];
    let mut reply = json!({
        "apiVersion": "infermesh.dev/v1alpha1", "kind": "WorkloadList",
        "metadata": {"resourceVersion": "77"},
        "items": serde_json::to_value(&items).expect("json"),
    });
    // An API server may leave out apiVersion and kind of list items: the output has them.
    reply["items"][1]
        .as_object_mut()
        .expect("object")
        .retain(|k, _| k != "apiVersion" && k != "kind");
    for (format, path) in [
        ("json", "namespaces/team-a/workloads"),
        ("yaml", "workloads"),
    ] {
        let (client, mut mock) = mock_api();
        let mut args = vec!["get", "workloads", "-o", format];
        if format == "yaml" {
            args.push("-A");
        }
        let answer = reply.clone();
        let (result, sink) = run_cli(client, &args, async {
            mock.expect("GET", &format!("{GROUP_PATH}/{path}"), 200, answer)
                .await;
        })
        .await;
        result.expect("get");
        mock.expect_nothing_more().await;
        let list: Value = if format == "json" {
            serde_json::from_str(&sink.out).expect("the output is JSON")
        } else {
            serde_yaml::from_str(&sink.out).expect("the output is YAML")
        };
        assert_eq!(list["apiVersion"], "v1", "{format}");
        assert_eq!(list["kind"], "List", "{format}");
        for item in list["items"].as_array().expect("items") {
            assert_eq!(item["apiVersion"], "infermesh.dev/v1alpha1");
            assert_eq!(item["kind"], "Workload");
        }
        let back: Vec<Workload> =
            serde_json::from_value(list["items"].clone()).expect("items are Workloads");
        assert_eq!(back.len(), items.len(), "{format}");
        for (b, i) in back.iter().zip(&items) {
            assert_eq!(
                (&b.metadata, &b.spec, &b.status),
                (&i.metadata, &i.spec, &i.status),
                "{format}"
            );
        }
        // The objects as returned: nothing dropped or added (but the filled-in types).
        let mut expected = reply["items"].clone();
        expected[1]["apiVersion"] = json!("infermesh.dev/v1alpha1");
        expected[1]["kind"] = json!("Workload");
        assert_eq!(list["items"], expected, "{format}");
    }
}

#[test]
fn workload_table_has_the_printer_columns() {
    let items = [
        failing_workload(),
        workload("other", WorkloadPhase::Running),
    ];
    let t = render::table(&items, false, false, now());
    assert_eq!(
        t.header,
        [
            "NAME", "MESH", "STATUS", "PROGRESS", "ETA", "CREDITS", "AGE"
        ]
    );
    assert_eq!(
        t.rows[0],
        ["embed", "gpus", "Failed", "75%", "<none>", "1.500000", "5m"]
    );
    assert_eq!(
        t.rows[1],
        ["other", "gpus", "Running", "75%", "1m4s", "1.500000", "5m"]
    );
    let text = t.render();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines[0],
        "NAME    MESH   STATUS    PROGRESS   ETA      CREDITS    AGE"
    );
    assert_eq!(
        lines[2],
        "other   gpus   Running   75%        1m4s     1.500000   5m"
    );

    let wide = render::table(&items, true, true, now());
    assert_eq!(wide.header[0], "NAMESPACE");
    assert_eq!(
        &wide.header[8..],
        [
            "SHARDS",
            "RUNNING",
            "FAILED",
            "RECORDS",
            "THROUGHPUT",
            "RETRIED",
            "SUSPEND"
        ]
    );
    assert_eq!(
        wide.rows[0],
        [
            "team-a", "embed", "gpus", "Failed", "75%", "<none>", "1.500000", "5m", "3/4", "0",
            "1", "300", "12.5/s", "2", "false"
        ]
    );
    // No status yet: <none>, as kubectl prints a missing column.
    let mut fresh = workload("fresh", WorkloadPhase::Pending);
    fresh.status = None;
    assert_eq!(
        fresh.row(false, false, now()),
        [
            "fresh", "gpus", "<none>", "<none>", "<none>", "<none>", "5m"
        ]
    );
}

#[tokio::test]
async fn get_agents_prints_their_table_from_the_cluster_scope() {
    let (client, mut mock) = mock_api();
    let mut drained = agent("gpus-node-b");
    drained.spec.unschedulable = true;
    drained.spec.node = "node-b".into();
    if let Some(s) = drained.status.as_mut() {
        s.phase = infermesh_crds::AgentPhase::Draining;
    }
    let items = vec![agent("gpus-node-a"), drained];
    let reply = json!({"apiVersion": "infermesh.dev/v1alpha1", "kind": "AgentList",
                       "metadata": {"resourceVersion": "5"}, "items": items});
    // -n is ignored for cluster-scoped Agents, as kubectl does.
    let (result, sink) = run_cli(
        client,
        &["get", "agents", "-n", "team-a", "-o", "wide"],
        async {
            mock.expect("GET", &format!("{GROUP_PATH}/agents"), 200, reply)
                .await;
        },
    )
    .await;
    result.expect("get agents");
    let lines: Vec<Vec<&str>> = sink
        .out
        .lines()
        .map(|l| {
            l.split("   ")
                .map(str::trim)
                .filter(|c| !c.is_empty())
                .collect()
        })
        .collect();
    assert_eq!(
        lines[0],
        [
            "NAME",
            "MESH",
            "NODE",
            "GPU",
            "STATUS",
            "RUNNING",
            "DONE",
            "CREDITS",
            "AGE",
            "SLOTS",
            "PROVIDERS",
            "MODELS",
            "HEARTBEAT",
            "UNSCHEDULABLE"
        ]
    );
    assert_eq!(lines.len(), 3, "{}", sink.out);
    assert_eq!(
        &lines[1][..5],
        [
            "gpus-node-a",
            "gpus",
            "node-a",
            "2x NVIDIA L4 24Gi",
            "Ready"
        ]
    );
    assert_eq!(&lines[1][5..8], ["1", "17", "3.250000"]);
    assert_eq!(&lines[1][9..12], ["2", "cuda,cpu", "1/2"]);
    assert_eq!(lines[2][4], "Draining");
    assert_eq!(lines[2][13], "true");

    let narrow = render::table(&[agent("gpus-node-a")], false, false, now());
    assert_eq!(
        narrow.header,
        [
            "NAME", "MESH", "NODE", "GPU", "STATUS", "RUNNING", "DONE", "CREDITS", "AGE"
        ]
    );
    assert_eq!(
        narrow.rows[0],
        [
            "gpus-node-a",
            "gpus",
            "node-a",
            "2x NVIDIA L4 24Gi",
            "Ready",
            "1",
            "17",
            "3.250000",
            "3d"
        ]
    );
}

#[tokio::test]
async fn get_watch_prints_the_table_then_a_row_per_change() {
    let (client, mut mock) = mock_api();
    let command = parse(&["get", "wl", "-w"]);
    let mut sink = Collect::default();
    let listed = workload("other", WorkloadPhase::Running);
    let mut changed = listed.clone();
    changed.status.as_mut().expect("status").phase = WorkloadPhase::Succeeded;
    changed.status.as_mut().expect("status").progress = Some("100%".into());
    {
        let fut = run(client, &command, &mut sink);
        tokio::pin!(fut);
        let path = format!("{GROUP_PATH}/namespaces/team-a/workloads");
        let script = async {
            let list = json!({"apiVersion": "infermesh.dev/v1alpha1", "kind": "WorkloadList",
                              "metadata": {"resourceVersion": "100"}, "items": [listed]});
            mock.expect("GET", &path, 200, list).await;
            let event = json!({"type": "MODIFIED", "object": changed});
            let seen = mock
                .expect("GET", &path, 200, Value::String(format!("{event}\n")))
                .await;
            assert!(seen.query.contains("watch=true&"), "{}", seen.query);
            assert!(
                seen.query.contains("resourceVersion=100&"),
                "{}",
                seen.query
            );
        };
        tokio::select! {
            r = &mut fut => panic!("the watch ended: {r:?}"),
            () = script => {}
        }
        // Let it print the change; it then waits for the next watch, which never comes.
        let _ = tokio::time::timeout(Duration::from_millis(300), &mut fut).await;
    }
    let lines: Vec<&str> = sink.out.lines().collect();
    assert_eq!(lines.len(), 3, "{}{:?}", sink.out, sink.warnings);
    assert!(
        lines[0].starts_with("NAME    MESH   STATUS"),
        "{}",
        lines[0]
    );
    assert!(
        lines[1].starts_with("other   gpus   Running   75%"),
        "{}",
        lines[1]
    );
    assert!(
        lines[2].starts_with("other   gpus   Succeeded   100%"),
        "{}",
        lines[2]
    );
}

// ---- describe -----------------------------------------------------------------------------

#[tokio::test]
async fn describe_of_a_failing_workload_shows_the_failing_input_line() {
    let (client, mut mock) = mock_api();
    let w = failing_workload();
    let shard_failed =
        format!("3 shard attempt(s) (shard#attempt: 2#1, 2#2, 2#3); last: {FAILURE}");
    let events = event_list(vec![
        event(
            "embed.2",
            "Failed",
            "Warning",
            FAILURE,
            "2026-05-01T11:58:00.000000Z",
            1,
        ),
        event(
            "embed.1",
            "ShardFailed",
            "Warning",
            &shard_failed,
            "2026-05-01T11:57:30.000000Z",
            3,
        ),
        event(
            "embed.0",
            "Admitted",
            "Normal",
            "4 shards planned",
            "2026-05-01T11:55:01.000000Z",
            1,
        ),
    ]);
    let (result, sink) = run_cli(client, &["describe", "workload", "embed"], async {
        mock.expect(
            "GET",
            &format!("{GROUP_PATH}/namespaces/team-a/workloads/embed"),
            200,
            serde_json::to_value(&w).expect("json"),
        )
        .await;
        let seen = mock
            .expect("GET", "/api/v1/namespaces/team-a/events", 200, events)
            .await;
        assert!(
            seen.query
                .contains("fieldSelector=involvedObject.uid=embed-uid&"),
            "{}",
            seen.query
        );
    })
    .await;
    result.expect("describe");
    mock.expect_nothing_more().await;
    let out = sink.out;
    // The failure, in full, in the conditions and in the Events.
    assert!(out.contains("line 17 (byte offset 1530): input \"x\": expected 4 floats, got 3"));
    let failed_condition = out
        .lines()
        .find(|l| l.trim_start().starts_with("Failed ") && l.contains("AttemptsExhausted"))
        .unwrap_or_else(|| panic!("no Failed condition row:\n{out}"));
    assert!(failed_condition.ends_with(FAILURE), "{failed_condition}");
    let shard_row = out
        .lines()
        .find(|l| l.contains("ShardFailed"))
        .unwrap_or_else(|| panic!("no ShardFailed event:\n{out}"));
    assert!(shard_row.contains("Warning"), "{shard_row}");
    assert!(shard_row.contains("(x3 over"), "{shard_row}");
    assert!(shard_row.ends_with(&shard_failed), "{shard_row}");
    // Events oldest first.
    let row = |start: &str| {
        out.lines()
            .position(|l| l.starts_with(start))
            .unwrap_or_else(|| panic!("no row {start:?} in\n{out}"))
    };
    let (admitted, failed_shard, failed) = (
        row("  Normal    Admitted"),
        row("  Warning   ShardFailed"),
        row("  Warning   Failed"),
    );
    assert!(admitted < failed_shard && failed_shard < failed, "{out}");
    // The status summary.
    for want in [
        "Name:",
        "Namespace:",
        "team-a",
        "Phase:                Failed",
        "Shards:               4 total: 0 pending, 0 running, 3 succeeded, 1 failed",
        "Records:              300",
        "Progress:             75%",
        "Throughput:           12.5 records/s",
        "ETA:                  <none>",
        "Credits spent:        1.500000",
        "Retried attempts:     2",
        "Mesh:           gpus",
        "Task:           tensor: inputs x; outputs all",
        "Input:          file:///data/in.jsonl (jsonl)",
    ] {
        assert!(out.contains(want), "missing {want:?} in\n{out}");
    }
}

#[test]
fn describe_shows_the_lifecycle_fields() {
    let mut w = failing_workload();
    w.spec.active_deadline_seconds = Some(3600);
    w.spec.retry_generation = 2;
    w.spec.ttl_seconds_after_finished = Some(600);
    if let Some(s) = w.status.as_mut() {
        s.observed_retry_generation = Some(1);
    }
    let out = render::describe_workload(&w, &Ok(Vec::new()), now());
    for want in [
        "Active deadline:     3600s",
        "Retry backoff:       2s, doubled per failed attempt",
        "Retry generation:    2 (acted on: 1)",
        "TTL after finished:  600s",
    ] {
        assert!(out.contains(want), "missing {want:?} in\n{out}");
    }
    let plain = render::describe_workload(&failing_workload(), &Ok(Vec::new()), now());
    for want in [
        "Active deadline:     <none>",
        "Retry generation:    0 (acted on: <none>)",
        "TTL after finished:  <none>",
    ] {
        assert!(plain.contains(want), "missing {want:?} in\n{plain}");
    }
}

#[test]
fn describe_continues_multi_line_messages_under_their_column() {
    let mut w = failing_workload();
    let conditions = &mut w.status.as_mut().expect("status").conditions;
    conditions[2].message = "first line\nline 17: expected 4 floats, got 3".into();
    let out = render::describe_workload(&w, &Ok(Vec::new()), now());
    let lines: Vec<&str> = out.lines().collect();
    let i = lines
        .iter()
        .position(|l| l.ends_with("first line"))
        .expect("first line");
    let column = lines[i].find("first line").expect("column");
    assert_eq!(
        lines[i + 1],
        format!("{}line 17: expected 4 floats, got 3", " ".repeat(column))
    );
    assert!(out.contains("Events:  <none>"), "{out}");
    let denied = render::describe_workload(&w, &Err("forbidden".into()), now());
    assert!(
        denied.contains("Events:  <cannot list: forbidden>"),
        "{denied}"
    );
}

#[tokio::test]
async fn describe_agent_shows_status_and_its_events() {
    let (client, mut mock) = mock_api();
    let a = agent("gpus-node-a");
    let mut lost = event(
        "gpus-node-a.1",
        "Lost",
        "Warning",
        "lease expired; 2 shards requeued",
        "2026-05-01T11:00:00.000000Z",
        1,
    );
    lost["involvedObject"] =
        json!({"apiVersion": "infermesh.dev/v1alpha1", "kind": "Agent", "name": "gpus-node-a"});
    let (result, sink) = run_cli(client, &["describe", "agent", "gpus-node-a"], async {
        mock.expect(
            "GET",
            &format!("{GROUP_PATH}/agents/gpus-node-a"),
            200,
            serde_json::to_value(&a).expect("json"),
        )
        .await;
        let seen = mock
            .expect(
                "GET",
                "/api/v1/namespaces/default/events",
                200,
                event_list(vec![lost]),
            )
            .await;
        assert!(
            seen.query.contains(
                "fieldSelector=involvedObject.kind=Agent,involvedObject.name=gpus-node-a&"
            ),
            "{}",
            seen.query
        );
    })
    .await;
    result.expect("describe agent");
    for want in [
        "Mesh:           gpus",
        "Node:           node-a",
        "Unschedulable:  false",
        "Phase:                Ready",
        "Completed shards:     17",
        "Execution providers:  cuda, cpu",
        "Last heartbeat:       2026-05-01T11:59:57Z",
        "lease expired; 2 shards requeued",
    ] {
        assert!(sink.out.contains(want), "missing {want:?} in\n{}", sink.out);
    }
}

// ---- changes ------------------------------------------------------------------------------

#[tokio::test]
async fn cancel_sends_exactly_one_delete() {
    let (client, mut mock) = mock_api();
    let w = serde_json::to_value(failing_workload()).expect("json");
    let (result, sink) = run_cli(
        client,
        &["cancel", "workload", "embed", "-n", "team-b"],
        async {
            let seen = mock
                .expect(
                    "DELETE",
                    &format!("{GROUP_PATH}/namespaces/team-b/workloads/embed"),
                    200,
                    w,
                )
                .await;
            // No body or an empty DeleteOptions: nothing that changes what DELETE does.
            assert!(
                seen.body.is_null()
                    || seen.body == json!({})
                    || seen.body == json!({"apiVersion": "v1", "kind": "DeleteOptions"}),
                "{}",
                seen.body
            );
        },
    )
    .await;
    result.expect("cancel");
    mock.expect_nothing_more().await;
    assert_eq!(
        sink.out,
        "workload team-b/embed deleted: the operator cancels its running shards\n"
    );
}

#[tokio::test]
async fn drain_and_undrain_merge_patch_unschedulable() {
    for (verb, value) in [("drain", true), ("undrain", false)] {
        let (client, mut mock) = mock_api();
        let reply = serde_json::to_value(agent("gpus-node-a")).expect("json");
        let (result, sink) = run_cli(client, &[verb, "agent", "gpus-node-a"], async {
            let seen = mock
                .expect(
                    "PATCH",
                    &format!("{GROUP_PATH}/agents/gpus-node-a"),
                    200,
                    reply,
                )
                .await;
            assert_eq!(seen.content_type, "application/merge-patch+json", "{verb}");
            assert_eq!(
                seen.body,
                json!({"spec": {"unschedulable": value}}),
                "{verb}"
            );
        })
        .await;
        result.expect(verb);
        mock.expect_nothing_more().await;
        assert!(
            sink.out.starts_with(&format!("agent gpus-node-a {verb}ed")),
            "{}",
            sink.out
        );
    }
}

#[tokio::test]
async fn suspend_and_resume_merge_patch_spec_suspend() {
    for (verb, value, said) in [("suspend", true, "suspended"), ("resume", false, "resumed")] {
        let (client, mut mock) = mock_api();
        let reply = serde_json::to_value(workload("embed", WorkloadPhase::Running)).expect("json");
        let (result, sink) = run_cli(client, &[verb, "wl", "embed"], async {
            let seen = mock
                .expect(
                    "PATCH",
                    &format!("{GROUP_PATH}/namespaces/team-a/workloads/embed"),
                    200,
                    reply,
                )
                .await;
            assert_eq!(seen.content_type, "application/merge-patch+json", "{verb}");
            assert_eq!(seen.body, json!({"spec": {"suspend": value}}), "{verb}");
        })
        .await;
        result.expect(verb);
        mock.expect_nothing_more().await;
        assert!(
            sink.out
                .starts_with(&format!("workload team-a/embed {said}")),
            "{}",
            sink.out
        );
    }
}

#[tokio::test]
async fn retry_patches_the_annotation_with_the_time_of_the_request() {
    let (client, mut mock) = mock_api();
    let mut failed = failing_workload();
    failed.metadata.annotations = Some(
        [(
            RETRY_ANNOTATION.to_string(),
            "2026-05-01T12:00:00Z".to_string(),
        )]
        .into(),
    );
    let reply = serde_json::to_value(&failed).expect("json");
    let at: Timestamp = "2026-05-01T12:00:00.123456Z".parse().expect("time");
    let (line, ()) = tokio::join!(retry(client, "team-a", "embed", at), async {
        let seen = mock
            .expect(
                "PATCH",
                &format!("{GROUP_PATH}/namespaces/team-a/workloads/embed"),
                200,
                reply,
            )
            .await;
        assert_eq!(seen.content_type, "application/merge-patch+json");
        assert_eq!(
            seen.body,
            json!({"metadata": {"annotations": {"infermesh.dev/retry": "2026-05-01T12:00:00Z"}}})
        );
    });
    let line = line.expect("retry");
    mock.expect_nothing_more().await;
    assert!(
        line.contains("retry requested (infermesh.dev/retry=2026-05-01T12:00:00Z)"),
        "{line}"
    );
    assert!(
        !line.contains("note:"),
        "a Failed workload needs no note: {line}"
    );

    // Through the command line, on a workload that has not failed: the request is sent, and
    // the output says what it will do.
    let (client, mut mock) = mock_api();
    let reply = serde_json::to_value(workload("embed", WorkloadPhase::Running)).expect("json");
    let before = Timestamp::now().as_second();
    let (result, sink) = run_cli(client, &["retry", "workload", "embed"], async {
        let seen = mock
            .expect(
                "PATCH",
                &format!("{GROUP_PATH}/namespaces/team-a/workloads/embed"),
                200,
                reply,
            )
            .await;
        let at = seen.body["metadata"]["annotations"][RETRY_ANNOTATION]
            .as_str()
            .expect("annotation")
            .parse::<Timestamp>()
            .expect("RFC 3339");
        assert!(at.as_second() >= before && at.as_second() <= Timestamp::now().as_second() + 1);
    })
    .await;
    result.expect("retry");
    assert!(
        sink.out
            .contains("note: the workload is Running, not Failed"),
        "{}",
        sink.out
    );
}

// ---- errors -------------------------------------------------------------------------------

#[tokio::test]
async fn not_found_and_forbidden_are_one_clear_line() {
    let cases: [(&[&str], &str, &str); 4] = [
        (
            &["describe", "workload", "foo"],
            "GET",
            "namespaces/team-a/workloads/foo",
        ),
        (
            &["cancel", "workload", "foo", "-n", "team-b"],
            "DELETE",
            "namespaces/team-b/workloads/foo",
        ),
        (
            &["suspend", "workload", "foo"],
            "PATCH",
            "namespaces/team-a/workloads/foo",
        ),
        (&["drain", "agent", "foo"], "PATCH", "agents/foo"),
    ];
    let names = [
        "Workload team-a/foo not found",
        "Workload team-b/foo not found",
        "Workload team-a/foo not found",
        "Agent foo not found",
    ];
    for ((args, method, path), want) in cases.into_iter().zip(names) {
        let (client, mut mock) = mock_api();
        let (result, sink) = run_cli(client, args, async {
            mock.expect(method, &format!("{GROUP_PATH}/{path}"), 404, not_found("x"))
                .await;
        })
        .await;
        assert_eq!(result, Err(CliError(want.to_string())), "{args:?}");
        assert!(sink.out.is_empty(), "{args:?}");
        mock.expect_nothing_more().await;
    }

    let (client, mut mock) = mock_api();
    let message = "workloads.infermesh.dev \"foo\" is forbidden: User \"bob\" cannot delete resource \"workloads\" in API group \"infermesh.dev\" in the namespace \"team-a\"";
    let forbidden = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                           "reason": "Forbidden", "code": 403, "message": message});
    let (result, _) = run_cli(client, &["cancel", "workload", "foo"], async {
        mock.expect(
            "DELETE",
            &format!("{GROUP_PATH}/namespaces/team-a/workloads/foo"),
            403,
            forbidden,
        )
        .await;
    })
    .await;
    let e = result.expect_err("forbidden");
    assert_eq!(e.0, format!("Workload team-a/foo: {message} (HTTP 403)"));
    assert!(!e.0.contains('\n'));

    // A cluster without the CRDs: the list is a 404, and the error says what to install.
    let (client, mut mock) = mock_api();
    let (result, _) = run_cli(client, &["get", "meshes"], async {
        mock.expect(
            "GET",
            &format!("{GROUP_PATH}/meshes"),
            404,
            not_found("the server could not find the requested resource"),
        )
        .await;
    })
    .await;
    let e = result.expect_err("no CRD");
    assert!(e.0.contains("no meshes.infermesh.dev resource"), "{e}");
    assert!(e.0.contains("infermesh crd | kubectl apply -f -"), "{e}");
}

// ---- logs ---------------------------------------------------------------------------------

#[test]
fn the_log_filter_keeps_only_lines_of_that_workload() {
    let log = "\
2026-05-01T11:55:02Z INFO attached to operator agent=gpus-node-a
2026-05-01T11:55:03Z INFO assigned shard=team-a/embed/embed-uid#2@1
2026-05-01T11:55:03Z INFO assigned shard=team-a/embed-2/other-uid#0@1
2026-05-01T11:55:04Z WARN failed shard=team-a/embed/embed-uid#2@1 error=line 17: expected 4 floats, got 3
2026-05-01T11:55:05Z INFO completed shard=team-b/embed/b-uid#0@1
{\"fields\":{\"workload\":\"team-a/embed\",\"message\":\"id field missing\"}}
2026-05-01T11:55:06Z INFO cancelled shard=team-a/embed.v2/x-uid#1@1
2026-05-01T11:55:07Z INFO part removed uri=file:///data/out/_attempts/embed-uid/part-00002
";
    let kept = logs::filter_log(
        "infermesh-agent-gpus-x1",
        log,
        "team-a",
        "embed",
        "embed-uid",
    );
    assert_eq!(
        kept,
        [
            "[pod/infermesh-agent-gpus-x1] 2026-05-01T11:55:03Z INFO assigned shard=team-a/embed/embed-uid#2@1",
            "[pod/infermesh-agent-gpus-x1] 2026-05-01T11:55:04Z WARN failed shard=team-a/embed/embed-uid#2@1 error=line 17: expected 4 floats, got 3",
            "[pod/infermesh-agent-gpus-x1] {\"fields\":{\"workload\":\"team-a/embed\",\"message\":\"id field missing\"}}",
            "[pod/infermesh-agent-gpus-x1] 2026-05-01T11:55:07Z INFO part removed uri=file:///data/out/_attempts/embed-uid/part-00002",
        ]
    );
    // Without a uid (none known) only whole `namespace/name` matches count.
    assert!(logs::mentions_workload(
        "x team-a/embed y",
        "team-a",
        "embed",
        ""
    ));
    assert!(!logs::mentions_workload(
        "x team-a/embedding y",
        "team-a",
        "embed",
        ""
    ));
    assert!(!logs::mentions_workload(
        "x xteam-a/embed y",
        "team-a",
        "embed",
        ""
    ));
    assert!(!logs::mentions_workload("nothing", "team-a", "embed", ""));
}

#[tokio::test]
async fn logs_prints_events_the_failure_and_the_agent_lines_of_the_workload() {
    let (client, mut mock) = mock_api();
    let w = failing_workload();
    let events = event_list(vec![
        event(
            "embed.2",
            "ShardFailed",
            "Warning",
            &format!("1 shard attempt(s) (shard#attempt: 2#3); last: {FAILURE}"),
            "2026-05-01T11:57:58.000000Z",
            1,
        ),
        event(
            "embed.1",
            "ShardRequeued",
            "Warning",
            "2 shard attempt(s) (shard#attempt: 2#1, 2#2); last: lease expired",
            "2026-05-01T11:56:00.000000Z",
            2,
        ),
    ]);
    let pod = |name: &str| json!({"metadata": {"name": name, "namespace": "infermesh"}});
    let pods = json!({"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": [pod("infermesh-agent-gpus-b"), pod("infermesh-agent-gpus-a")]});
    let (result, sink) = run_cli(client, &["logs", "workload", "embed", "--operator-namespace", "infermesh"], async {
        mock.expect("GET", &format!("{GROUP_PATH}/namespaces/team-a/workloads/embed"), 200, serde_json::to_value(&w).expect("json"))
            .await;
        let seen = mock.expect("GET", "/api/v1/namespaces/team-a/events", 200, events).await;
        assert!(seen.query.contains("fieldSelector=involvedObject.uid=embed-uid&"), "{}", seen.query);
        let seen = mock.expect("GET", "/api/v1/namespaces/infermesh/pods", 200, pods).await;
        assert!(
            seen.query.contains("labelSelector=app.kubernetes.io/name=infermesh-agent,infermesh.dev/mesh=gpus&"),
            "{}",
            seen.query
        );
        mock.expect("GET", "/api/v1/namespaces/infermesh/pods/infermesh-agent-gpus-a/log", 200,
                    Value::String("boot\nWARN failed shard=team-a/embed/embed-uid#2@3 error=line 17: expected 4 floats, got 3\nINFO assigned shard=team-b/x/x-uid#0@1\n".into()))
            .await;
        mock.expect("GET", "/api/v1/namespaces/infermesh/pods/infermesh-agent-gpus-b/log", 200,
                    Value::String("INFO assigned shard=team-a/embed/embed-uid#1@1\n".into()))
            .await;
    })
    .await;
    result.expect("logs");
    mock.expect_nothing_more().await;
    let lines: Vec<&str> = sink.out.lines().collect();
    assert_eq!(lines.len(), 5, "{}", sink.out);
    assert!(
        lines[0].starts_with("[event] 2026-05-01T11:56:00Z Warning ShardRequeued (x2): 2 shard"),
        "{}",
        lines[0]
    );
    assert!(
        lines[1].starts_with("[event] 2026-05-01T11:57:58Z Warning ShardFailed: 1 shard"),
        "{}",
        lines[1]
    );
    assert!(lines[1].ends_with(FAILURE), "{}", lines[1]);
    assert_eq!(
        lines[2],
        format!("[status] Failed: AttemptsExhausted: {FAILURE}")
    );
    assert_eq!(
        lines[3],
        "[pod/infermesh-agent-gpus-a] WARN failed shard=team-a/embed/embed-uid#2@3 error=line 17: expected 4 floats, got 3"
    );
    assert_eq!(
        lines[4],
        "[pod/infermesh-agent-gpus-b] INFO assigned shard=team-a/embed/embed-uid#1@1"
    );
    assert!(sink.warnings.is_empty(), "{:?}", sink.warnings);
}

#[tokio::test]
async fn logs_follow_streams_new_events_and_pod_lines() {
    let (client, mut mock) = mock_api();
    let w = serde_json::to_value(failing_workload()).expect("json");
    let old = event(
        "embed.1",
        "ShardRequeued",
        "Warning",
        "1 shard attempt(s); last: lease expired",
        "2026-05-01T11:56:00.000000Z",
        1,
    );
    let new = event(
        "embed.2",
        "ShardFailed",
        "Warning",
        FAILURE,
        "2026-05-01T11:57:00.000000Z",
        1,
    );
    let pods = json!({"apiVersion": "v1", "kind": "PodList", "metadata": {},
                      "items": [{"metadata": {"name": "agent-a", "namespace": "infermesh"}}]});
    let command = parse(&["logs", "workload", "embed", "-f"]);
    let mut sink = Collect::default();
    {
        let fut = run(client, &command, &mut sink);
        tokio::pin!(fut);
        let script = async {
            let wl_path = format!("{GROUP_PATH}/namespaces/team-a/workloads/embed");
            mock.expect("GET", &wl_path, 200, w).await;
            let list = event_list(vec![old.clone()]);
            mock.expect("GET", "/api/v1/namespaces/team-a/events", 200, list)
                .await;
            mock.expect("GET", "/api/v1/namespaces/infermesh/pods", 200, pods)
                .await;
            // The pod's log stream and the Events' watcher start together: answer them in
            // whatever order they come.
            let mut answered = (false, false, false);
            while answered != (true, true, true) {
                let (request, send) =
                    tokio::time::timeout(Duration::from_secs(5), mock.handle.next_request())
                        .await
                        .expect("a request")
                        .expect("client");
                let uri = request.uri().clone();
                let query: String =
                    url::form_urlencoded::parse(uri.query().unwrap_or("").as_bytes())
                        .map(|(k, v)| format!("{k}={v}&"))
                        .collect();
                let body = match uri.path() {
                    "/api/v1/namespaces/infermesh/pods/agent-a/log" => {
                        assert!(query.contains("follow=true&"), "{query}");
                        answered.0 = true;
                        "INFO assigned shard=team-a/embed/embed-uid#2@3\nINFO other shard=team-a/x/x-uid#0@1\n"
                            .to_string()
                    }
                    "/api/v1/namespaces/team-a/events" if !query.contains("watch=true") => {
                        assert!(
                            query.contains("fieldSelector=involvedObject.uid=embed-uid&"),
                            "{query}"
                        );
                        answered.1 = true;
                        event_list(vec![old.clone()]).to_string()
                    }
                    "/api/v1/namespaces/team-a/events" => {
                        answered.2 = true;
                        format!("{}\n", json!({"type": "ADDED", "object": new}))
                    }
                    other => panic!("unexpected request {other}?{query}"),
                };
                send.send_response(Response::new(Body::from(body.into_bytes())));
            }
        };
        tokio::select! {
            r = &mut fut => panic!("following ended: {r:?}"),
            () = script => {}
        }
        let _ = tokio::time::timeout(Duration::from_millis(300), &mut fut).await;
    }
    let lines: Vec<&str> = sink.out.lines().collect();
    assert_eq!(lines.len(), 4, "{}", sink.out);
    // What was there first, once (the watcher's first list does not print it again).
    assert!(lines[0].contains("ShardRequeued"), "{}", lines[0]);
    assert!(
        lines[1].starts_with("[status] Failed: AttemptsExhausted"),
        "{}",
        lines[1]
    );
    assert_eq!(
        lines.iter().filter(|l| l.contains("ShardRequeued")).count(),
        1
    );
    // Then what came, in either order.
    assert!(
        lines[2..].contains(&"[pod/agent-a] INFO assigned shard=team-a/embed/embed-uid#2@3"),
        "{}",
        sink.out
    );
    assert!(
        lines[2..]
            .iter()
            .any(|l| l.contains("Warning ShardFailed") && l.ends_with(FAILURE)),
        "{}",
        sink.out
    );
}

// ---- the rest -----------------------------------------------------------------------------

#[test]
fn kubectl_runs_the_same_binary_as_a_plugin() {
    use std::ffi::OsStr;
    assert!(invoked_as_kubectl_plugin(OsStr::new("kubectl-infermesh")));
    assert!(invoked_as_kubectl_plugin(OsStr::new(
        "/usr/local/bin/kubectl-infermesh"
    )));
    assert!(invoked_as_kubectl_plugin(OsStr::new(
        "C:/bin/kubectl-infermesh.exe"
    )));
    assert!(!invoked_as_kubectl_plugin(OsStr::new(
        "/usr/local/bin/infermesh"
    )));
    assert!(!invoked_as_kubectl_plugin(OsStr::new("kubectl")));
}

#[test]
fn arguments_parse_as_kubectl_spells_them() {
    assert_eq!(
        parse(&["get", "wl", "-A", "-o", "json"]),
        ClusterCommand::Get(GetArgs {
            kind: GetKind::Workloads,
            namespace: None,
            all_namespaces: true,
            output: Some(OutputFormat::Json),
            watch: false,
        })
    );
    assert!(matches!(
        parse(&["get", "mesh"]),
        ClusterCommand::Get(GetArgs {
            kind: GetKind::Meshes,
            ..
        })
    ));
    assert!(matches!(
        parse(&["logs", "workload", "w", "-n", "x", "-f"]),
        ClusterCommand::Logs(LogsArgs { follow: true, ref namespace, .. }) if namespace.as_deref() == Some("x")
    ));
    #[derive(clap::Parser)]
    struct Cli {
        #[command(subcommand)]
        command: ClusterCommand,
    }
    for bad in [
        &["get", "pods"][..],
        &["get", "wl", "-n", "a", "-A"],
        &["drain", "workload", "w"],
        &["cancel", "agent", "a"],
        &["get", "wl", "-o", "xml"],
    ] {
        let mut argv = vec!["infermesh"];
        argv.extend(bad);
        assert!(Cli::try_parse_from(argv).is_err(), "{bad:?}");
    }
}

#[test]
fn ages_read_as_kubectl_prints_them() {
    for (secs, want) in [
        (0, "0s"),
        (119, "119s"),
        (330, "5m30s"),
        (600, "10m"),
        (3 * 3600 + 120, "3h2m"),
        (30 * 3600, "30h"),
        (3 * 86400 + 4 * 3600, "3d4h"),
        (120 * 86400, "120d"),
        (3 * 365 * 86400 + 20 * 86400, "3y20d"),
        (-5, "0s"),
    ] {
        assert_eq!(render::human_duration(secs), want, "{secs}");
    }
}
