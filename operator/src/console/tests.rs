//! The console's handlers, driven through the router as a browser would (no socket): every
//! page and action, locally (one token) and in a cluster against a mocked API server that
//! answers TokenReviews and SubjectAccessReviews by a policy and records every other call,
//! so a refusal can be shown to have done nothing.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body as AxumBody;
use http::{Request, Response, StatusCode};
use infermesh_proto as pb;
use kube::client::Body;
use serde_json::{Value, json};
use tower::ServiceExt;

use super::*;
use crate::controller::rbac::{Rules, access};
use crate::core::tests::{hello, mesh, workload as workload_spec};
use crate::core::{AgentHandle, Submission};
use crate::grpc::Principal;
use crate::store::AnyStore;

const TOKEN: &str = "local-secret-token";

struct Mesh {
    core: Arc<Core<AnyStore>>,
    _out: tempfile::TempDir,
    agent: AgentHandle,
    _rx: tokio::sync::mpsc::UnboundedReceiver<Result<pb::OperatorMessage, tonic::Status>>,
    key: String,
}

/// A core with Mesh `m`, agent `a1` (2 slots) and Workload team-a/w-u1 (4 shards, 2 running).
async fn mesh_with_work() -> Mesh {
    let store = crate::store::open("sqlite::memory:").await.expect("store");
    let core = Arc::new(Core::new(store));
    core.upsert_mesh("m", mesh(30)).await.expect("mesh");
    let out = tempfile::tempdir().expect("tmp");
    let key = core
        .submit(Submission {
            namespace: "team-a".into(),
            name: "w-u1".into(),
            uid: "u1".into(),
            spec: workload_spec(&format!("file://{}/", out.path().display()), 1),
            input_size: 4 * 1024,
            input_version: None,
            input_files: None,
            credentials: None,
        })
        .await
        .expect("submit");
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let agent = core
        .attach(hello("a1", 2), &Principal::user("test"), tx)
        .await
        .expect("attach");
    Mesh {
        core,
        _out: out,
        agent,
        _rx: rx,
        key,
    }
}

fn local_console(core: &Arc<Core<AnyStore>>) -> Arc<Console<AnyStore>> {
    Console::new(
        core.clone(),
        Authority::Local {
            token: TOKEN.into(),
        },
    )
}

async fn send(app: &Router, req: Request<AxumBody>) -> (StatusCode, HeaderMap, String) {
    let res = app.clone().oneshot(req).await.expect("infallible");
    let status = res.status();
    let headers = res.headers().clone();
    let bytes = axum::body::to_bytes(res.into_body(), 4 << 20)
        .await
        .expect("body");
    (
        status,
        headers,
        String::from_utf8_lossy(&bytes).into_owned(),
    )
}

fn get(path: &str, token: Option<&str>) -> Request<AxumBody> {
    let mut b = Request::get(path).header("accept", "text/html");
    if let Some(t) = token {
        b = b.header("cookie", format!("{COOKIE}={t}"));
    }
    b.body(AxumBody::empty()).expect("request")
}

fn post(path: &str, token: &str, csrf: &str) -> Request<AxumBody> {
    Request::post(path)
        .header("authorization", format!("Bearer {token}"))
        .header("content-type", "application/x-www-form-urlencoded")
        .header("host", "console.test")
        .header("origin", "http://console.test")
        .body(AxumBody::from(format!("csrf={csrf}")))
        .expect("request")
}

fn csrf_of(c: &Console<AnyStore>, token: &str) -> String {
    auth::csrf_token(&c.key, token)
}

#[tokio::test]
async fn every_local_page_renders_for_the_local_token() {
    let m = mesh_with_work().await;
    let c = local_console(&m.core);
    let app = router(c.clone());
    let w = m.core.workload(&m.key).await.expect("workload");
    let url = pages::workload_url(&w);
    for (path, expect) in [
        ("/", "Agents ready"),
        ("/agents", "node-a1"),
        ("/workloads", "w-u1"),
        (url.as_str(), "Shards"),
        ("/ledger", "The ledger verifies"),
        ("/events", "event-rows"),
    ] {
        let (status, headers, body) = send(&app, get(path, Some(TOKEN))).await;
        assert_eq!(status, StatusCode::OK, "{path}: {body}");
        assert!(body.contains(expect), "{path} lacks {expect:?}: {body}");
        assert_eq!(headers[header::CONTENT_SECURITY_POLICY], CSP, "{path}");
        assert_eq!(headers[header::CACHE_CONTROL], "no-store", "{path}");
        // No secret in a page: the token never appears, the CSRF token does.
        assert!(!body.contains(TOKEN), "{path} shows the token");
        assert!(
            body.contains(&csrf_of(&c, TOKEN)),
            "{path} lacks the CSRF token"
        );
        // No inline script or style: the CSP would block it.
        assert!(
            !body.contains("<script>") && !body.contains("style="),
            "{path}"
        );
    }
    // The overview counts the agent and the queue.
    let (_, _, body) = send(&app, get("/", Some(TOKEN))).await;
    assert!(
        body.contains(r#"<dd id="agents-ready">1 / 1</dd>"#),
        "{body}"
    );
    assert!(body.contains(r#"<dd id="slots">2 / 0</dd>"#), "{body}");
    assert!(body.contains(r#"<dd id="queue">2</dd>"#), "{body}");
    // The workload page's grid shows its four shards, two held by a1.
    let (_, _, body) = send(&app, get(&url, Some(TOKEN))).await;
    assert_eq!(
        body.matches(r#"<li class="cell s-running""#).count(),
        2,
        "{body}"
    );
    assert_eq!(
        body.matches(r#"<li class="cell s-pending""#).count(),
        2,
        "{body}"
    );
    assert!(body.contains("agent a1"), "{body}");
    // htmx's refresh gets the region alone.
    let req = Request::get(url.as_str())
        .header("cookie", format!("{COOKIE}={TOKEN}"))
        .header("hx-request", "true")
        .body(AxumBody::empty())
        .expect("req");
    let (status, _, body) = send(&app, req).await;
    assert_eq!(status, StatusCode::OK);
    assert!(body.starts_with(r#"<div id="region""#), "{body}");
    assert!(!body.contains("<html"));
    // The chart's series is JSON.
    let (status, _, body) = send(&app, get(&format!("{url}/series"), Some(TOKEN))).await;
    assert_eq!(status, StatusCode::OK);
    let v: Value = serde_json::from_str(&body).expect("json");
    assert!(v["t"].is_array() && v["rps"].is_array(), "{v}");
    // The assets are served with their types, and need no session.
    let (status, headers, _) = send(&app, get("/assets/console.js", None)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        headers[header::CONTENT_TYPE],
        "text/javascript; charset=utf-8"
    );
}

#[tokio::test]
async fn the_local_token_in_the_url_becomes_a_cookie_and_leaves_the_address_bar() {
    let m = mesh_with_work().await;
    let app = router(local_console(&m.core));
    let (status, headers, _) = send(
        &app,
        get(&format!("/workloads?token={TOKEN}&phase=Running"), None),
    )
    .await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    assert_eq!(headers[header::LOCATION], "/workloads?phase=Running");
    let cookie = headers[header::SET_COOKIE].to_str().expect("ascii");
    assert!(
        cookie.starts_with(&format!("{COOKIE}={TOKEN};")),
        "{cookie}"
    );
    assert!(cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"));
    // A wrong token in the URL is refused, and sets nothing.
    let (status, headers, _) = send(&app, get("/?token=guess", None)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(headers.get(header::SET_COOKIE).is_none());
}

#[tokio::test]
async fn without_the_local_token_nothing_is_shown_or_done() {
    let m = mesh_with_work().await;
    let c = local_console(&m.core);
    let app = router(c.clone());
    for path in [
        "/",
        "/agents",
        "/workloads",
        "/ledger",
        "/events",
        "/events/stream",
    ] {
        let (status, _, body) = send(&app, get(path, None)).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{path}");
        assert!(
            !body.contains("w-u1") && !body.contains("node-a1"),
            "{path}"
        );
        let (status, _, _) = send(&app, get(path, Some("wrong"))).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{path}");
    }
    let w = m.core.workload(&m.key).await.expect("w");
    let suspend = format!("{}/suspend", pages::workload_url(&w));
    let (status, _, _) = send(&app, post(&suspend, "wrong", &csrf_of(&c, "wrong"))).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(!m.core.workload(&m.key).await.expect("w").suspended);
}

#[tokio::test]
async fn local_actions_suspend_resume_cancel_and_drain_with_the_csrf_token() {
    let m = mesh_with_work().await;
    let c = local_console(&m.core);
    let app = router(c.clone());
    let csrf = csrf_of(&c, TOKEN);
    let base = pages::workload_url(&m.core.workload(&m.key).await.expect("w"));

    // A forged CSRF token: refused, nothing done.
    let (status, _, body) = send(&app, post(&format!("{base}/suspend"), TOKEN, "forged")).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(body.contains("CSRF"));
    assert!(!m.core.workload(&m.key).await.expect("w").suspended);
    // The right token from another site: refused too.
    let mut req = post(&format!("{base}/suspend"), TOKEN, &csrf);
    req.headers_mut()
        .insert("origin", HeaderValue::from_static("https://evil.test"));
    assert_eq!(send(&app, req).await.0, StatusCode::FORBIDDEN);
    assert!(!m.core.workload(&m.key).await.expect("w").suspended);

    let (status, headers, _) = send(&app, post(&format!("{base}/suspend"), TOKEN, &csrf)).await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    assert_eq!(headers[header::LOCATION], base);
    assert!(m.core.workload(&m.key).await.expect("w").suspended);
    let (_, _, page) = send(&app, get(&base, Some(TOKEN))).await;
    assert!(
        page.contains(">Resume<") && page.contains("Suspended"),
        "{page}"
    );
    send(&app, post(&format!("{base}/resume"), TOKEN, &csrf)).await;
    assert!(!m.core.workload(&m.key).await.expect("w").suspended);

    // Drain and undrain the agent.
    let (status, _, _) = send(&app, post("/agents/a1/drain", TOKEN, &csrf)).await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    assert!(m.core.agents().await[0].unschedulable);
    let (_, _, page) = send(&app, get("/agents", Some(TOKEN))).await;
    assert!(
        page.contains("Draining") && page.contains(">Undrain<"),
        "{page}"
    );
    send(&app, post("/agents/a1/undrain", TOKEN, &csrf)).await;
    assert!(!m.core.agents().await[0].unschedulable);
    let (status, _, _) = send(&app, post("/agents/nobody/drain", TOKEN, &csrf)).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // An unknown action, and retry of a running workload, change nothing.
    let (status, _, _) = send(&app, post(&format!("{base}/explode"), TOKEN, &csrf)).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _, body) = send(&app, post(&format!("{base}/retry"), TOKEN, &csrf)).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");

    // Cancel ends it.
    let (status, _, _) = send(&app, post(&format!("{base}/cancel"), TOKEN, &csrf)).await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    let w = m.core.workload(&m.key).await.expect("w");
    assert_eq!(w.phase, WorkloadPhase::Failed);
    assert_eq!(w.reason, "Cancelled");
    let _ = &m.agent;
}

#[tokio::test]
async fn a_failed_shard_shows_its_input_line_and_retry_runs_it_again() {
    let m = mesh_with_work().await;
    let c = local_console(&m.core);
    let app = router(c.clone());
    let cells = m.core.shard_cells(&m.key).expect("live");
    let running = cells
        .iter()
        .find(|c| c.state == "running")
        .expect("a running shard");
    m.core
        .handle(
            &m.agent,
            pb::AgentMessage {
                msg: Some(pb::agent_message::Msg::Failed(pb::Failed {
                    shard: Some(pb::ShardRef {
                        workload: m.key.clone(),
                        index: running.index,
                        attempt: running.attempt,
                    }),
                    kind: pb::ErrorKind::InvalidInput as i32,
                    message: "line 17: expected 4 floats, got 3".into(),
                    retryable: false,
                })),
            },
        )
        .await
        .expect("failed report");
    let w = m.core.workload(&m.key).await.expect("w");
    assert_eq!(w.phase, WorkloadPhase::Failed);
    let base = pages::workload_url(&w);
    let (_, _, page) = send(&app, get(&base, Some(TOKEN))).await;
    assert!(page.contains("line 17: expected 4 floats, got 3"), "{page}");
    assert!(page.contains(r#"class="failure""#), "{page}");
    assert!(page.contains(">Retry failed shards<"), "{page}");
    // The events page and the stream's backlog carry it too.
    let (_, _, events) = send(&app, get("/events", Some(TOKEN))).await;
    assert!(events.contains("event-rows"));
    let csrf = csrf_of(&c, TOKEN);
    let (status, _, body) = send(&app, post(&format!("{base}/retry"), TOKEN, &csrf)).await;
    assert_eq!(status, StatusCode::SEE_OTHER, "{body}");
    let w = m.core.workload(&m.key).await.expect("w");
    assert_eq!(w.phase, WorkloadPhase::Running, "{w:?}");
}

/// Reads the first message of an SSE response within a few seconds.
async fn first_sse_message(app: &Router, req: Request<AxumBody>) -> String {
    use futures::StreamExt;
    let res = app.clone().oneshot(req).await.expect("infallible");
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers()[header::CONTENT_TYPE], "text/event-stream");
    let mut body = res.into_body().into_data_stream();
    let mut text = String::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !text.contains("\n\n") || !text.contains("event: ") {
        let data = tokio::time::timeout_at(deadline, body.next())
            .await
            .expect("an SSE message in time")
            .expect("a frame")
            .expect("ok");
        text.push_str(&String::from_utf8_lossy(&data));
    }
    text
}

#[tokio::test]
async fn the_event_stream_sends_new_rows_and_resumes_from_last_event_id() {
    let m = mesh_with_work().await;
    let c = local_console(&m.core);
    let app = router(c.clone());
    // Everything in the log so far.
    let all = m
        .core
        .store()
        .events(&EventFilter::default())
        .await
        .expect("events");
    assert!(all.len() >= 3, "{all:?}");
    let first = all[0].seq;
    // Resuming after the first event: the rest comes from the store, oldest first.
    let req = Request::get("/events/stream?rows=1")
        .header("cookie", format!("{COOKIE}={TOKEN}"))
        .header("last-event-id", first.to_string())
        .body(AxumBody::empty())
        .expect("req");
    let msg = first_sse_message(&app, req).await;
    let last = all.last().expect("rows").seq;
    assert!(msg.contains(&format!("id: {last}\n")), "{msg}");
    assert!(!msg.contains(&format!(r#"data-seq="{first}""#)), "{msg}");
    assert!(
        msg.contains(&format!(r#"data-seq="{}""#, all[1].seq)),
        "{msg}"
    );
    // A page that is not the events page gets a tick, not the rows.
    let req = Request::get(format!("/events/stream?workload=u1&after={first}"))
        .header("cookie", format!("{COOKIE}={TOKEN}"))
        .body(AxumBody::empty())
        .expect("req");
    let msg = first_sse_message(&app, req).await;
    assert!(
        msg.contains("event: tick\n") && msg.contains("data: 1\n"),
        "{msg}"
    );
    assert!(!msg.contains("<tr"), "{msg}");
    // A live page gets what the feed publishes next, filtered by its query.
    let req = Request::get("/events/stream?kind=shard.failed&rows=1")
        .header("cookie", format!("{COOKIE}={TOKEN}"))
        .body(AxumBody::empty())
        .expect("req");
    let feed = c.feed().clone();
    let waiter = tokio::spawn({
        let app = app.clone();
        async move { first_sse_message(&app, req).await }
    });
    // Published until the page has subscribed (the first sends may find no one yet).
    let mut seq = last;
    while !waiter.is_finished() {
        seq += 2;
        let ev = |seq: i64, kind: &str| EventRow {
            seq,
            at: "2026-12-03T10:00:00Z".into(),
            kind: kind.into(),
            workload_uid: Some("u1".into()),
            shard: Some(1),
            attempt: Some(1),
            agent: Some("a1".into()),
            message: format!("m{seq}"),
        };
        feed.publish(vec![ev(seq - 1, "shard.assigned"), ev(seq, "shard.failed")]);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let msg = waiter.await.expect("stream");
    assert!(
        msg.contains("shard.failed") && !msg.contains("shard.assigned"),
        "{msg}"
    );
}

// ---- in a cluster ---------------------------------------------------------------------

type ApiHandle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

/// What the mocked API server saw: (method, path, JSON body) of every call that is not a
/// review.
type Calls = Arc<Mutex<Vec<(String, String, Value)>>>;

/// Answers reviews by a policy: tokens `alice` (may do everything on workloads in team-a
/// and on agents) and `bob` (may only get and list workloads in team-a); any other token is
/// not authenticated. Records every other call and answers it with `{}` (200).
fn api_server(mut handle: ApiHandle) -> Calls {
    let calls: Calls = Arc::default();
    let seen = calls.clone();
    let rules = Rules::committed().expect("rbac.yaml");
    tokio::spawn(async move {
        while let Some((req, send)) = handle.next_request().await {
            let method = req.method().to_string();
            let uri = req.uri().clone();
            let a = access(&method, uri.path(), uri.query().unwrap_or("")).expect("resource");
            assert!(
                rules.allows(&a, "infermesh"),
                "rbac.yaml does not allow the console's {a:?}"
            );
            let bytes = req.into_body().collect_bytes().await.expect("body");
            let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            let reply = match uri.path() {
                "/apis/authentication.k8s.io/v1/tokenreviews" => {
                    let user = match body["spec"]["token"].as_str() {
                        Some("alice") => Some("alice"),
                        Some("bob") => Some("bob"),
                        _ => None,
                    };
                    let mut r = body.clone();
                    r["status"] = match user {
                        Some(u) => {
                            json!({"authenticated": true, "user": {"username": u, "uid": format!("uid-{u}"), "groups": ["system:authenticated"]}})
                        }
                        None => json!({"authenticated": false, "error": "token expired"}),
                    };
                    r
                }
                "/apis/authorization.k8s.io/v1/subjectaccessreviews" => {
                    let spec = &body["spec"];
                    let ra = &spec["resourceAttributes"];
                    let (user, verb, resource, ns) = (
                        spec["user"].as_str().unwrap_or(""),
                        ra["verb"].as_str().unwrap_or(""),
                        ra["resource"].as_str().unwrap_or(""),
                        ra["namespace"].as_str(),
                    );
                    assert_eq!(ra["group"], "infermesh.dev");
                    let allowed = match (user, resource) {
                        ("alice", "workloads") => ns == Some("team-a"),
                        ("alice", "agents") => true,
                        ("bob", "workloads") => {
                            ns == Some("team-a") && matches!(verb, "get" | "list")
                        }
                        _ => false,
                    };
                    let mut r = body.clone();
                    r["status"] = json!({"allowed": allowed});
                    r
                }
                path if method == "GET" && path.ends_with("/workloads") => {
                    json!({"apiVersion": "infermesh.dev/v1alpha1", "kind": "WorkloadList", "metadata": {}, "items": [done_workload()]})
                }
                "/apis/infermesh.dev/v1alpha1/namespaces/team-a/workloads/done" => done_workload(),
                path => {
                    seen.lock().expect("calls").push((
                        method.clone(),
                        path.to_string(),
                        body.clone(),
                    ));
                    if path.contains("/agents/") {
                        json!({"apiVersion": "infermesh.dev/v1alpha1", "kind": "Agent", "metadata": {"name": "a1"}, "spec": {"mesh": "m", "node": "node-a1", "unschedulable": true}})
                    } else {
                        json!({"apiVersion": "infermesh.dev/v1alpha1", "kind": "Workload", "metadata": {"name": "w-u1", "namespace": "team-a", "uid": "u1"}, "spec": workload_json()})
                    }
                }
            };
            send.send_response(
                Response::builder()
                    .status(200)
                    .body(Body::from(serde_json::to_vec(&reply).expect("json")))
                    .expect("response"),
            );
        }
    });
    calls
}

/// A Workload that finished before the console looked: the core holds it no more.
fn done_workload() -> Value {
    json!({"apiVersion": "infermesh.dev/v1alpha1", "kind": "Workload",
           "metadata": {"name": "done", "namespace": "team-a", "uid": "u9"},
           "spec": workload_json(),
           "status": {"phase": "Succeeded", "shards": {"total": 3, "pending": 0, "running": 0, "succeeded": 3, "failed": 0}, "records": 1200,
                      "progress": "100%", "creditsSpent": "1.500000",
                      "startTime": "2026-12-03T10:00:00Z", "completionTime": "2026-12-03T10:01:00Z",
                      "conditions": [{"type": "Complete", "status": "True", "reason": "AllShardsSucceeded",
                                      "message": "3 shards", "lastTransitionTime": "2026-12-03T10:01:00Z"}]}})
}

fn workload_json() -> Value {
    serde_json::to_value(workload_spec("file:///tmp/out/", 1)).expect("spec")
}

fn cluster_console(core: &Arc<Core<AnyStore>>) -> (Arc<Console<AnyStore>>, Calls) {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(service, "default");
    let calls = api_server(handle);
    (
        Console::new(core.clone(), Authority::cluster(client)),
        calls,
    )
}

fn calls(c: &Calls) -> Vec<(String, String, Value)> {
    c.lock().expect("calls").clone()
}

#[tokio::test]
async fn in_a_cluster_a_page_needs_a_token_the_api_server_accepts() {
    let m = mesh_with_work().await;
    let (c, calls_seen) = cluster_console(&m.core);
    let app = router(c);
    // No token: a page goes to the sign-in form; anything else is 401.
    let (status, headers, _) = send(&app, get("/workloads", None)).await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    assert_eq!(headers[header::LOCATION], "/login");
    let req = Request::get("/events/stream")
        .body(AxumBody::empty())
        .expect("req");
    assert_eq!(send(&app, req).await.0, StatusCode::UNAUTHORIZED);
    // A token TokenReview rejects.
    let req = Request::get("/workloads")
        .header("authorization", "Bearer stolen")
        .body(AxumBody::empty())
        .expect("req");
    let (status, _, body) = send(&app, req).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(body.contains("token expired"), "{body}");
    // The sign-in form takes a good token into a cookie, and refuses a bad one.
    let form = |t: &str| {
        Request::post("/login")
            .header("content-type", "application/x-www-form-urlencoded")
            .body(AxumBody::from(format!("token={t}")))
            .expect("req")
    };
    let (status, headers, _) = send(&app, form("alice")).await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    assert!(
        headers[header::SET_COOKIE]
            .to_str()
            .expect("ascii")
            .starts_with(&format!("{COOKIE}=alice;"))
    );
    let (status, _, body) = send(&app, form("stolen")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(body.contains("token expired"));
    assert!(calls(&calls_seen).is_empty(), "no call but reviews");
}

#[tokio::test]
async fn in_a_cluster_each_read_is_authorized_by_a_subject_access_review() {
    let m = mesh_with_work().await;
    let (c, _) = cluster_console(&m.core);
    let app = router(c);
    let base = pages::workload_url(&m.core.workload(&m.key).await.expect("w"));
    // bob may read team-a's workloads, not the agents.
    let (status, _, page) = send(&app, get(&base, Some("bob"))).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert!(page.contains("w-u1"));
    // ... and sees no action he may not take.
    assert!(
        !page.contains(">Suspend<") && !page.contains(">Cancel<"),
        "{page}"
    );
    let (status, _, page) = send(&app, get("/agents", Some("bob"))).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(page.contains("list agents (cluster-wide)"), "{page}");
    assert!(!page.contains("node-a1"));
    let (_, _, page) = send(&app, get("/", Some("bob"))).await;
    assert!(page.contains("hidden: you may not list agents"), "{page}");
    // alice sees the actions.
    let (_, _, page) = send(&app, get(&base, Some("alice"))).await;
    assert!(
        page.contains(">Suspend<") && page.contains(">Cancel<"),
        "{page}"
    );
    // Another namespace's workload is hidden from both: a workload in team-b.
    let other = m
        .core
        .submit(Submission {
            namespace: "team-b".into(),
            name: "secret".into(),
            uid: "u2".into(),
            spec: workload_spec("file:///tmp/never/", 1),
            input_size: 1024,
            input_version: None,
            input_files: None,
            credentials: None,
        })
        .await
        .expect("submit");
    let (_, _, page) = send(&app, get("/workloads", Some("alice"))).await;
    assert!(page.contains("w-u1") && !page.contains("secret"), "{page}");
    assert!(page.contains("1 namespace(s) hidden"), "{page}");
    let w2 = m.core.workload(&other).await.expect("w2");
    let (status, _, page) = send(&app, get(&pages::workload_url(&w2), Some("alice"))).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(!page.contains("tmp/never"));
}

#[tokio::test]
async fn in_a_cluster_a_finished_workload_the_core_let_go_comes_from_the_api_server() {
    let m = mesh_with_work().await;
    let (c, _) = cluster_console(&m.core);
    let app = router(c);
    let (status, _, page) = send(&app, get("/workloads", Some("bob"))).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert!(page.contains("w-u1") && page.contains(">done<"), "{page}");
    let (status, _, page) = send(&app, get("/workloads/team-a/done/u9", Some("bob"))).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert!(
        page.contains("Succeeded") && page.contains("100%"),
        "{page}"
    );
    assert!(
        page.contains("1.500000") && page.contains("AllShardsSucceeded"),
        "{page}"
    );
    assert!(
        page.contains("1m00s"),
        "elapsed from the status times: {page}"
    );
    // Another uid under the same name is not that Workload.
    let (status, _, _) = send(&app, get("/workloads/team-a/done/u8", Some("bob"))).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn in_a_cluster_an_action_without_the_verb_is_refused_and_sends_nothing() {
    let m = mesh_with_work().await;
    let (c, calls_seen) = cluster_console(&m.core);
    let app = router(c.clone());
    let base = pages::workload_url(&m.core.workload(&m.key).await.expect("w"));
    // bob may get but not patch or delete.
    for action in ["suspend", "cancel", "retry"] {
        let (status, _, body) = send(
            &app,
            post(&format!("{base}/{action}"), "bob", &csrf_of(&c, "bob")),
        )
        .await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{action}: {body}");
    }
    // alice with a forged CSRF token (or bob's): refused before any review.
    let (status, _, _) = send(
        &app,
        post(&format!("{base}/suspend"), "alice", &csrf_of(&c, "bob")),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _, _) = send(&app, post("/agents/a1/drain", "bob", &csrf_of(&c, "bob"))).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(calls(&calls_seen).is_empty(), "{:?}", calls(&calls_seen));
    assert!(!m.core.workload(&m.key).await.expect("w").suspended);
    assert!(!m.core.agents().await[0].unschedulable);
}

#[tokio::test]
async fn in_a_cluster_actions_go_through_the_kubernetes_api() {
    let m = mesh_with_work().await;
    let (c, calls_seen) = cluster_console(&m.core);
    let app = router(c.clone());
    let base = pages::workload_url(&m.core.workload(&m.key).await.expect("w"));
    let csrf = csrf_of(&c, "alice");
    for action in ["suspend", "resume", "retry", "cancel"] {
        let (status, _, body) = send(&app, post(&format!("{base}/{action}"), "alice", &csrf)).await;
        assert_eq!(status, StatusCode::SEE_OTHER, "{action}: {body}");
    }
    let (status, _, _) = send(&app, post("/agents/a1/drain", "alice", &csrf)).await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    let seen = calls(&calls_seen);
    let path = "/apis/infermesh.dev/v1alpha1/namespaces/team-a/workloads/w-u1";
    assert_eq!(seen.len(), 5, "{seen:?}");
    assert_eq!((seen[0].0.as_str(), seen[0].1.as_str()), ("PATCH", path));
    assert_eq!(
        seen[0].2,
        json!({"metadata": {"uid": "u1"}, "spec": {"suspend": true}})
    );
    assert_eq!(seen[1].2["spec"]["suspend"], false);
    assert_eq!(seen[2].2["metadata"]["uid"], "u1");
    assert!(seen[2].2["metadata"]["annotations"][RETRY_ANNOTATION].is_string());
    assert_eq!((seen[3].0.as_str(), seen[3].1.as_str()), ("DELETE", path));
    assert_eq!(seen[3].2["preconditions"]["uid"], "u1");
    assert_eq!(
        (seen[4].0.as_str(), seen[4].1.as_str()),
        ("PATCH", "/apis/infermesh.dev/v1alpha1/agents/a1")
    );
    assert_eq!(seen[4].2, json!({"spec": {"unschedulable": true}}));
    // The core was not touched directly: the controllers act on what the API server holds.
    assert!(!m.core.workload(&m.key).await.expect("w").suspended);
    assert!(!m.core.agents().await[0].unschedulable);
}

#[tokio::test]
async fn in_a_cluster_the_stream_shows_only_events_the_person_may_read() {
    let m = mesh_with_work().await;
    let (c, _) = cluster_console(&m.core);
    let app = router(c.clone());
    let all = m
        .core
        .store()
        .events(&EventFilter::default())
        .await
        .expect("events");
    // bob: team-a's workload events yes, agent events (agent.joined) no.
    let req = Request::get("/events/stream?after=0&rows=1")
        .header("authorization", "Bearer bob")
        .body(AxumBody::empty())
        .expect("req");
    let msg = first_sse_message(&app, req).await;
    assert!(all.iter().any(|e| e.kind == "agent.joined"), "{all:?}");
    assert!(!msg.contains("agent.joined"), "{msg}");
    assert!(msg.contains("workload.admitted"), "{msg}");
}

#[tokio::test]
async fn a_name_kubernetes_would_not_allow_is_refused_before_any_review_or_call() {
    let m = mesh_with_work().await;
    let (c, calls_seen) = cluster_console(&m.core);
    let app = router(c.clone());
    let csrf = csrf_of(&c, "alice");
    for path in [
        "/agents/a1%2Fstatus/drain",
        "/agents/..%2F..%2Fnamespaces/drain",
        "/workloads/team-a/w-u1%2Fstatus/u1/suspend",
        "/workloads/team-a/w%00/u1/cancel",
    ] {
        let (status, _, body) = send(&app, post(path, "alice", &csrf)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path}: {body}");
    }
    let (status, _, _) = send(&app, get("/workloads/team-a/..%2Fx/u1", Some("alice"))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(calls(&calls_seen).is_empty(), "{:?}", calls(&calls_seen));
    assert!(valid_name("test-local-0") && valid_name("3f2a-11ef") && !valid_name(".."));
}

#[tokio::test]
async fn a_page_is_served_again_for_a_second_per_person_and_an_action_refreshes_it() {
    let m = mesh_with_work().await;
    let (c, _) = cluster_console(&m.core);
    let app = router(c.clone());
    let base = pages::workload_url(&m.core.workload(&m.key).await.expect("w"));
    // alice's render (with her actions and her CSRF token) is never bob's.
    let (_, _, alice) = send(&app, get(&base, Some("alice"))).await;
    assert!(alice.contains(">Cancel<"));
    let (_, _, bob) = send(&app, get(&base, Some("bob"))).await;
    assert!(!bob.contains(">Cancel<"), "{bob}");
    assert!(!bob.contains(&csrf_of(&c, "alice")));
    // A change the page did not make shows within the second...
    m.core.set_suspend(&m.key, true).await.expect("suspend");
    let (_, _, again) = send(&app, get(&base, Some("alice"))).await;
    assert_eq!(again, alice, "served again within {PAGE_TTL:?}");
    tokio::time::sleep(PAGE_TTL).await;
    let (_, _, later) = send(&app, get(&base, Some("alice"))).await;
    assert!(later.contains(">Resume<"), "{later}");
    // ... and one it made shows at once.
    let local = local_console(&m.core);
    let app = router(local.clone());
    let (_, _, before) = send(&app, get(&base, Some(TOKEN))).await;
    assert!(before.contains(">Resume<"));
    let (status, _, _) = send(
        &app,
        post(&format!("{base}/resume"), TOKEN, &csrf_of(&local, TOKEN)),
    )
    .await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    let (_, _, after) = send(&app, get(&base, Some(TOKEN))).await;
    assert!(after.contains(">Suspend<"), "{after}");
}
