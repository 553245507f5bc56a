//! Agents are untrusted. A rogue agent with credentials of its own (minted by `infermesh local
//! --external-agents 1`, the way a stolen or compromised pod token would be in a cluster)
//! attaches to a real `infermesh local` over real gRPC while two honest agent processes run a
//! workload, and lies in every way the protocol lets it: completions of shards it was never
//! given (of this workload and of another Mesh's), stale attempts, duplicates, another output
//! location, a part whose sha256 is made up, absurd and non-finite numbers, an id that belongs
//! to a live agent, a flood. Each lie is refused with its code and logged; the honest
//! workloads succeed with every record exactly once; nothing is charged to the rogue; the
//! ledger and the outputs verify.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use infermesh_operator::store::{self, EventFilter, Store};
use infermesh_proto as pb;
use infermesh_tests::*;
use pb::agent_message::Msg as Up;
use pb::operator_message::Msg as Down;
use sqlx::Row;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

type Inbound = tonic::Streaming<pb::OperatorMessage>;

struct Rogue {
    tx: mpsc::Sender<pb::AgentMessage>,
    inbound: Inbound,
}

fn hello(id: &str, node: &str, mesh: &str) -> pb::AgentMessage {
    pb::AgentMessage {
        msg: Some(Up::Hello(pb::Hello {
            agent_id: id.into(),
            node: node.into(),
            mesh: mesh.into(),
            version: "rogue".into(),
            capabilities: Some(pb::Capabilities {
                execution_providers: vec!["cpu".into()],
                slots: 1,
                ..Default::default()
            }),
        })),
    }
}

async fn attach(
    operator: &str,
    token: &str,
    first: pb::AgentMessage,
) -> Result<(mpsc::Sender<pb::AgentMessage>, Inbound), tonic::Status> {
    let mut client = pb::agent_service_client::AgentServiceClient::connect(operator.to_string())
        .await
        .expect("connect");
    let (tx, rx) = mpsc::channel(256);
    tx.send(first).await.expect("hello");
    let mut req = tonic::Request::new(ReceiverStream::new(rx));
    req.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("header"),
    );
    let mut inbound = client.attach(req).await?.into_inner();
    match inbound.message().await? {
        Some(pb::OperatorMessage {
            msg: Some(Down::Welcome(_)),
        }) => Ok((tx, inbound)),
        other => panic!("expected Welcome, got {other:?}"),
    }
}

impl Rogue {
    async fn send(&self, c: pb::Completed) {
        self.tx
            .send(pb::AgentMessage {
                msg: Some(Up::Completed(c)),
            })
            .await
            .expect("send");
    }

    /// The next message that is not a heartbeat-free Cancel or Drain.
    async fn next(&mut self) -> Result<Option<Down>, tonic::Status> {
        let msg = tokio::time::timeout(Duration::from_secs(20), self.inbound.message())
            .await
            .expect("an answer within 20s")?;
        Ok(msg.and_then(|m| m.msg))
    }

    /// Waits for the answer to one report: its refusal (code, reason).
    async fn refusal(&mut self) -> (Code, String) {
        loop {
            match self.next().await.expect("stream up") {
                Some(Down::Refused(r)) => return (Code::from(r.code), r.reason),
                Some(_) => continue,
                None => panic!("the stream ended"),
            }
        }
    }
}

/// A report of `shard` with `records` made-up lines; with `write`, the rogue writes them at
/// `uri` (only ever its own attempt's location: it has no business in anyone else's).
fn forged(shard: pb::ShardRef, uri: &str, records: u64, write: bool) -> pb::Completed {
    let body: String = (0..records).map(|i| format!("{{\"id\":{i}}}\n")).collect();
    if let Some(path) = uri.strip_prefix("file://").filter(|_| write) {
        let path = Path::new(path);
        std::fs::create_dir_all(path.parent().expect("dir")).expect("mkdir");
        std::fs::write(path, &body).expect("write");
    }
    let facts = infermesh_operator::core::outputs::facts(body.as_bytes());
    pb::Completed {
        shard: Some(shard),
        records,
        output_uri: uri.into(),
        sha256: facts.sha256,
        compute_seconds: 0.01,
        device: "cpu".into(),
        output_bytes: facts.bytes,
    }
}

/// Every part `_SUCCESS.json` lists is on disk with the sha256 it gives.
fn parts_match_their_manifest(parts: &[serde_json::Value]) {
    for p in parts {
        let file = PathBuf::from(
            p["uri"]
                .as_str()
                .expect("uri")
                .trim_start_matches("file://"),
        );
        assert_eq!(
            sha256_file(&file),
            p["sha256"].as_str().expect("sha"),
            "{}",
            file.display()
        );
    }
}

fn wait_for_file(dir: &Path, name: &str, deadline: Instant) -> PathBuf {
    loop {
        assert!(
            Instant::now() < deadline,
            "no {name} under {}",
            dir.display()
        );
        if let Ok(runs) = std::fs::read_dir(dir) {
            for run in runs.flatten() {
                let p = run.path().join(name);
                if p.exists() {
                    return p;
                }
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rogue_agent_is_refused_and_the_honest_run_is_exact() {
    let dir = tempfile::tempdir().expect("tmp");
    let n = 4800;
    let (path, _input, out) = tensor_job(dir.path(), n, "  shardBytes: 2Ki\n  maxAttempts: 3\n");
    // A budget of 100 credits, short leases (the rogue sits on the one shard it is given),
    // and a second Mesh with a workload of its own.
    let other_out = dir.path().join("other-out");
    let other_in = dir.path().join("other.jsonl");
    std::fs::write(&other_in, "{\"id\": 1, \"x\": [1, 2, 3, 4]}\n").expect("input");
    let yaml = std::fs::read_to_string(&path)
        .expect("manifest")
        .replace("leaseSeconds: 10", "leaseSeconds: 3")
        .replace(
            "pricing: {perCpuSecond: 0.05, perThousandRecords: 0.2}",
            "pricing: {perCpuSecond: 0.05, perThousandRecords: 0.2}\n  budgets: [{namespace: team-a, credits: 100}]",
        );
    let model = test_models().join("tensor.onnx");
    let other = format!(
        "---\napiVersion: infermesh.dev/v1alpha1\nkind: Mesh\nmetadata: {{name: other}}\nspec:\n  nodeSelector: {{}}\n  \
         agent: {{slots: 1, executionProviders: [cpu]}}\n---\napiVersion: infermesh.dev/v1alpha1\nkind: Workload\n\
         metadata: {{name: theirs, namespace: team-b}}\nspec:\n  mesh: other\n  model: {{uri: \"{}\"}}\n  task:\n    tensor:\n      inputs: [{{name: x}}]\n  \
         input: {{uri: \"{}\"}}\n  output: {{uri: \"{}/\"}}\n",
        model.display(),
        other_in.display(),
        other_out.display()
    );
    std::fs::write(&path, yaml + &other).expect("manifest");

    let url = format!("sqlite://{}", dir.path().join("state.db").display());
    let child = local_command(&path, 2, dir.path())
        .arg("--database-url")
        .arg(&url)
        .arg("--external-agents")
        .arg("1")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn infermesh local");
    let deadline = Instant::now() + Duration::from_secs(120);
    let creds = wait_for_file(&dir.path().join("work"), "external-agents.json", deadline);
    let creds: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&creds).expect("read")).expect("json");
    let operator = creds["operator"].as_str().expect("operator").to_string();
    let mine = creds["agents"]
        .as_array()
        .expect("agents")
        .iter()
        .find(|a| a["mesh"] == "test")
        .expect("an external agent of mesh test")
        .clone();
    let (id, node, token) = (
        mine["id"].as_str().expect("id").to_string(),
        mine["node"].as_str().expect("node").to_string(),
        mine["token"].as_str().expect("token").to_string(),
    );

    // The rogue attaches first, while the honest agents start: they finish the job's shards in
    // well under a second, and a rogue that came after would find none left to be given.
    let (tx, inbound) = attach(&operator, &token, hello(&id, &node, "test"))
        .await
        .expect("the rogue's own credentials attach");
    let mut rogue = Rogue { tx, inbound };
    let given = loop {
        match rogue.next().await.expect("stream") {
            Some(Down::Assign(a)) => break a,
            Some(_) => continue,
            None => panic!("stream ended before an assignment"),
        }
    };
    let shard = given.shard.clone().expect("shard");

    // Credentials name one agent: claiming a live agent's id, or another node, is refused,
    // and a made-up token is not accepted at all.
    let err = attach(&operator, &token, hello("test-local-0", "local-0", "test"))
        .await
        .expect_err("another agent's id");
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");
    let err = attach(&operator, &token, hello(&id, "local-0", "test"))
        .await
        .expect_err("another node");
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");
    let err = attach(&operator, "made-up", hello(&id, &node, "test"))
        .await
        .expect_err("no such token");
    assert_eq!(err.code(), Code::Unauthenticated, "{err}");
    let attempt_uri = given.output_uri.clone();
    assert!(
        attempt_uri.contains("/_attempts/"),
        "each attempt writes to its own location: {attempt_uri}"
    );

    // The keys of every workload, as an attacker who read them somewhere would know them.
    let db = sqlx::SqlitePool::connect(&url).await.expect("db");
    let mut keys = BTreeMap::new();
    while keys.len() < 2 {
        assert!(
            Instant::now() < deadline,
            "both workloads admitted: {keys:?}"
        );
        let rows = sqlx::query("SELECT namespace, name, uid, shards FROM workloads")
            .fetch_all(&db)
            .await
            .expect("workloads");
        for r in &rows {
            let key = format!(
                "{}/{}/{}",
                r.get::<String, _>(0),
                r.get::<String, _>(1),
                r.get::<String, _>(2)
            );
            keys.insert(r.get::<String, _>(1), (key, r.get::<i64, _>(3) as u32));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (job, shards) = keys.get("job").cloned().expect("job");
    let (theirs, _) = keys
        .get("theirs")
        .cloned()
        .expect("the other mesh's workload");
    assert_eq!(job, shard.workload);
    let base = out.display().to_string();
    // Each report's refusal; a shard someone else holds may also be done by then (`duplicate`).
    let mut expected: Vec<Vec<(Code, &str)>> = Vec::new();
    let held_elsewhere = || {
        vec![
            (Code::PermissionDenied, "not_holder"),
            (Code::AlreadyExists, "duplicate"),
        ]
    };

    // Shards it was never given: of this workload and of another Mesh's.
    let other_index = (shard.index + 1) % shards;
    let never = pb::ShardRef {
        index: other_index,
        ..shard.clone()
    };
    rogue
        .send(forged(
            never.clone(),
            &format!("file://{base}/_attempts/part-{other_index:05}.a1.jsonl"),
            5,
            false,
        ))
        .await;
    expected.push(held_elsewhere());
    let foreign = pb::ShardRef {
        workload: theirs.clone(),
        index: 0,
        attempt: 1,
    };
    rogue
        .send(forged(
            foreign,
            &format!(
                "file://{}/_attempts/part-00000.a1.jsonl",
                other_out.display()
            ),
            1,
            false,
        ))
        .await;
    expected.push(held_elsewhere());
    // A workload that does not exist.
    let missing = pb::ShardRef {
        workload: "team-a/nope/0000".into(),
        ..shard.clone()
    };
    rogue.send(forged(missing, &attempt_uri, 1, false)).await;
    expected.push(vec![(Code::NotFound, "unknown_shard")]);
    // Its own shard with an older attempt number.
    let stale = pb::ShardRef {
        attempt: shard.attempt.saturating_sub(1),
        ..shard.clone()
    };
    rogue.send(forged(stale, &attempt_uri, 5, true)).await;
    expected.push(vec![(Code::FailedPrecondition, "stale_attempt")]);
    // Its own shard with numbers no honest agent sends.
    for (compute, records) in [
        (1e9, 5),
        (f64::NAN, 5),
        (-3.0, 5),
        (f64::INFINITY, 5),
        (0.01, 10_000_000),
    ] {
        let mut c = forged(shard.clone(), &attempt_uri, 5, true);
        c.compute_seconds = compute;
        c.records = records;
        rogue.send(c).await;
        expected.push(vec![(Code::InvalidArgument, "invalid_report")]);
    }
    // Its own shard, written somewhere else than assigned.
    rogue
        .send(forged(
            shard.clone(),
            &format!("file://{base}/part-{:05}.jsonl", shard.index),
            5,
            false,
        ))
        .await;
    expected.push(vec![(Code::InvalidArgument, "invalid_report")]);
    // An agent's reports are handled concurrently (each judged in order, its refusal sent once
    // the event is logged), so the refusals may come in another order: each report gets one,
    // and every one is among those expected.
    let mut got = Vec::new();
    for _ in &expected {
        got.push(rogue.refusal().await);
    }
    let mut wants: Vec<&Vec<(Code, &str)>> = expected.iter().collect();
    wants.sort_by_key(|w| w.len()); // the single-answer ones first
    for want in wants {
        let at = got
            .iter()
            .position(|g| want.contains(&(g.0, g.1.as_str())))
            .unwrap_or_else(|| panic!("no refusal among {got:?} is one of {want:?}"));
        got.remove(at);
    }
    // A made-up sha256 for a part it wrote: the part says otherwise. The attempt counts as
    // failed and the shard goes back to the queue for an honest agent.
    let mut lie = forged(shard.clone(), &attempt_uri, 5, true);
    lie.sha256 = "f".repeat(64);
    rogue.send(lie).await;
    assert_eq!(
        rogue.refusal().await,
        (Code::DataLoss, "output_mismatch".into())
    );
    // The same report again: the attempt is over (requeued, taken by an honest agent, or
    // already done by it).
    let mut again = forged(shard.clone(), &attempt_uri, 5, false);
    again.compute_seconds = 0.01;
    rogue.send(again).await;
    let (code, _) = rogue.refusal().await;
    assert!(
        matches!(
            code,
            Code::FailedPrecondition | Code::PermissionDenied | Code::AlreadyExists
        ),
        "{code:?}"
    );
    let sent = expected.len() + 2;
    // A flood: every shard of the workload, over and over, until the operator hangs up.
    for i in 0..(10 * shards) {
        let s = pb::ShardRef {
            index: i % shards,
            attempt: i / shards + 1,
            ..shard.clone()
        };
        let msg = pb::AgentMessage {
            msg: Some(Up::Completed(forged(s, &attempt_uri, 1, false))),
        };
        if rogue.tx.send(msg).await.is_err() {
            break;
        }
    }
    let mut ended = None;
    loop {
        match rogue.next().await {
            Ok(Some(_)) => continue,
            Ok(None) => break,
            Err(status) => {
                ended = Some(status);
                break;
            }
        }
    }
    let ended = ended.expect("the flood ends the stream");
    assert_eq!(ended.code(), Code::PermissionDenied, "{ended}");
    drop(rogue);

    // The honest agents finish everything.
    let run = Run::from(child.wait_with_output().expect("wait"));
    assert_eq!(run.code, Some(0), "{}", run.text());
    let lines = read_parts(&out);
    let counts = id_counts(&lines);
    assert_eq!(counts.len(), n, "every record present");
    assert!(counts.values().all(|&c| c == 1), "no record twice");
    assert!(!out.join("_attempts").exists(), "no attempt file left");
    let manifest = success_manifest(&out);
    let parts = manifest["parts"].as_array().expect("parts");
    assert_eq!(parts.len() as u32, shards);
    parts_match_their_manifest(parts);

    let store = store::open(&url).await.expect("db");
    let uid = job.rsplit('/').next().expect("uid");
    let charges = store.charges(uid).await.expect("charges");
    assert_eq!(charges.len() as u32, shards, "one charge per shard");
    assert!(
        charges.iter().all(|c| c.to != format!("agent/{id}")),
        "nothing charged to the rogue"
    );
    let balances: BTreeMap<String, i64> = store
        .balances()
        .await
        .expect("balances")
        .into_iter()
        .collect();
    assert_eq!(
        balances.get(&format!("agent/{id}")).copied().unwrap_or(0),
        0
    );
    let spent: i64 = charges.iter().map(|c| c.amount).sum();
    assert_eq!(balances["namespace/team-a"], 100_000_000 - spent);
    // Per record: 0.2 credits per thousand; per second: 0.05 at most for the wall time of
    // the run on each of two agents.
    let records_part = (n as i64 * 200_000) / 1000;
    assert!(spent >= records_part - shards as i64, "{spent}");
    assert!(spent < records_part + 2 * 50_000 * 300, "{spent}");
    let refused = store
        .events(&EventFilter {
            kind: Some("shard.report_refused".into()),
            ..Default::default()
        })
        .await
        .expect("events");
    assert!(
        refused.len() > sent,
        "every refusal is logged: {}",
        refused.len()
    );
    assert!(
        refused
            .iter()
            .all(|e| e.agent.as_deref() == Some(id.as_str()))
    );
    let verify = ledger(&url, &["verify", "--outputs"]);
    assert_eq!(verify.code, Some(0), "{}", verify.text());
    assert!(verify.stdout.contains("outputs match"), "{}", verify.text());
}

/// An agent frozen (SIGSTOP) past its lease and thawed later: its shards were requeued when
/// the lease ran out, what it reports on waking is refused, and the workload succeeds with
/// parts that match `_SUCCESS.json` byte for byte and one charge per shard.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_agent_thawed_after_its_lease_changes_nothing() {
    let dir = tempfile::tempdir().expect("tmp");
    let n = 800;
    let (path, _input, out) =
        minilm_job(dir.path(), n, 128, "  shardBytes: 8Ki\n  maxAttempts: 4\n");
    let yaml = std::fs::read_to_string(&path)
        .expect("manifest")
        .replace("leaseSeconds: 10", "leaseSeconds: 3");
    std::fs::write(&path, yaml).expect("manifest");
    let url = format!("sqlite://{}", dir.path().join("state.db").display());
    let child = local_command(&path, 2, dir.path())
        .arg("--database-url")
        .arg(&url)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn infermesh local");
    let deadline = Instant::now() + Duration::from_secs(120);
    let frozen = loop {
        assert!(Instant::now() < deadline, "no progress within 120s");
        let agents = children_named(child.id(), "infermesh-agent");
        let started = std::fs::read_dir(&out).map(|d| d.count()).unwrap_or(0);
        if started >= 1 && agents.len() == 2 {
            break agents[0];
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let signal = |sig: &str| {
        let ok = std::process::Command::new("kill")
            .args([sig, &frozen.to_string()])
            .status()
            .expect("kill");
        assert!(ok.success());
    };
    signal("-STOP");
    // Past the lease (3 s) and the reaper's tick.
    std::thread::sleep(Duration::from_secs(6));
    signal("-CONT");
    let run = Run::from(child.wait_with_output().expect("wait"));
    assert_eq!(run.code, Some(0), "{}", run.text());

    let lines = read_parts(&out);
    let counts = id_counts(&lines);
    assert_eq!(counts.len(), n, "every record present");
    assert!(counts.values().all(|&c| c == 1), "no record twice");
    let manifest = success_manifest(&out);
    let parts = manifest["parts"].as_array().expect("parts");
    parts_match_their_manifest(parts);
    let uid = manifest["uid"].as_str().expect("uid");
    let store = store::open(&url).await.expect("db");
    let charges = store.charges(uid).await.expect("charges");
    assert_eq!(charges.len(), parts.len(), "one charge per shard");
    let mut lost = Vec::new();
    for kind in ["agent.lost", "agent.left"] {
        lost.extend(
            store
                .events(&EventFilter {
                    kind: Some(kind.into()),
                    ..Default::default()
                })
                .await
                .expect("events"),
        );
    }
    assert!(
        lost.iter().any(|e| e.message.contains("lease expired")),
        "the frozen agent lost its lease: {lost:?}"
    );
    let verify = ledger(&url, &["verify", "--outputs"]);
    assert_eq!(verify.code, Some(0), "{}", verify.text());
}
