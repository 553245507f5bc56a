//! Behaviour of the core, driven as the gRPC layer drives it, on a real (in-memory) SQLite store.

use std::time::{Duration, Instant};

use infermesh_crds::{Manifest, MeshSpec, WorkloadPhase, WorkloadSpec, parse_manifests};
use infermesh_proto as pb;
use pb::agent_message::Msg as Up;
use pb::operator_message::Msg as Down;
use tokio::sync::mpsc;

use super::*;
use crate::store::testing::{Backend, both};
use crate::store::{AnyStore, EventFilter, Store};

pub(crate) type Rx = mpsc::UnboundedReceiver<Result<pb::OperatorMessage, Status>>;

struct Fixture {
    core: Core<AnyStore>,
    out: tempfile::TempDir,
}

pub(crate) fn mesh(lease: u32) -> MeshSpec {
    let yaml = format!(
        "apiVersion: infermesh.dev/v1alpha1\nkind: Mesh\nmetadata: {{name: m}}\nspec:\n  leaseSeconds: {lease}\n  heartbeatSeconds: 1\n  \
         pricing: {{perCpuSecond: 1.0, perThousandRecords: 1.0}}\n"
    );
    match parse_manifests(&yaml).expect("mesh").pop() {
        Some(Manifest::Mesh(m)) => m.spec,
        _ => panic!("mesh"),
    }
}

pub(crate) fn workload(out: &str, max_attempts: u32) -> WorkloadSpec {
    let yaml = format!(
        "apiVersion: infermesh.dev/v1alpha1\nkind: Workload\nmetadata: {{name: w}}\nspec:\n  mesh: m\n  \
         model: {{uri: \"file:///m.onnx\", sha256: \"{}\"}}\n  task: {{tensor: {{inputs: [{{name: x}}]}}}}\n  \
         input: {{uri: \"file:///in.jsonl\"}}\n  output: {{uri: \"{out}\"}}\n  shardBytes: 1Ki\n  maxAttempts: {max_attempts}\n  \
         retryBackoffSeconds: 0\n",
        "a".repeat(64)
    );
    match parse_manifests(&yaml).expect("workload").pop() {
        Some(Manifest::Workload(w)) => w.spec,
        _ => panic!("workload"),
    }
}

impl Fixture {
    async fn new(backend: Backend, lease: u32) -> Self {
        let core = Core::new(backend.open().await);
        core.upsert_mesh("m", mesh(lease)).await.expect("mesh");
        Self {
            core,
            out: tempfile::tempdir().expect("tmp"),
        }
    }

    fn output(&self) -> String {
        format!("file://{}/", self.out.path().display())
    }

    /// Submits a workload of `shards` shards (100 input bytes each).
    async fn submit(&self, shards: u64, max_attempts: u32) -> String {
        self.submit_as("u1", shards, max_attempts).await
    }

    async fn submit_as(&self, uid: &str, shards: u64, max_attempts: u32) -> String {
        self.core
            .submit(Submission {
                namespace: "team-a".into(),
                name: format!("w-{uid}"),
                uid: uid.into(),
                spec: workload(&self.output(), max_attempts),
                input_size: shards * 1024,
                input_version: None,
                input_files: None,
                credentials: None,
            })
            .await
            .expect("submit")
    }

    async fn agent(&self, id: &str, slots: u32) -> (AgentHandle, Rx) {
        attach(&self.core, id, slots, &Principal::user("test")).await
    }

    /// What an honest agent does: writes a part of `records` lines where the attempt was
    /// told to, and reports it.
    async fn complete(
        &self,
        who: &AgentHandle,
        shard: &pb::ShardRef,
        records: u64,
    ) -> Result<(), Status> {
        let msg = write_part(&self.output(), shard, records);
        self.report(who, msg).await
    }

    async fn report(&self, who: &AgentHandle, msg: pb::Completed) -> Result<(), Status> {
        self.core
            .handle(
                who,
                pb::AgentMessage {
                    msg: Some(Up::Completed(msg)),
                },
            )
            .await
    }

    async fn events(&self, kind: &str) -> usize {
        count_events(&self.core, kind).await
    }

    async fn phase(&self) -> WorkloadPhase {
        self.core.workloads().await[0].phase
    }
}

async fn count_events(core: &Core<AnyStore>, kind: &str) -> usize {
    let f = EventFilter {
        kind: Some(kind.into()),
        ..Default::default()
    };
    core.store().events(&f).await.expect("events").len()
}

/// The Hello of test agent `id` on node `node-<id>` of mesh `m` (CPU only).
pub(crate) fn hello(id: &str, slots: u32) -> pb::Hello {
    pb::Hello {
        agent_id: id.into(),
        node: format!("node-{id}"),
        mesh: "m".into(),
        version: "test".into(),
        capabilities: Some(pb::Capabilities {
            execution_providers: vec!["cpu".into()],
            slots,
            ..Default::default()
        }),
    }
}

pub(crate) async fn attach(
    core: &Core<AnyStore>,
    id: &str,
    slots: u32,
    who: &Principal,
) -> (AgentHandle, Rx) {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let handle = core
        .attach(hello(id, slots), who, tx)
        .await
        .expect("attach");
    match rx.recv().await {
        Some(Ok(pb::OperatorMessage {
            msg: Some(Down::Welcome(w)),
        })) => assert_eq!(w.agent_name, id),
        other => panic!("expected Welcome, got {other:?}"),
    }
    (handle, rx)
}

/// Writes `records` lines for `shard` at its attempt's location; the honest report of it.
fn write_part(output: &str, shard: &pb::ShardRef, records: u64) -> pb::Completed {
    let uri = outputs::attempt_uri(output, shard.index, shard.attempt);
    let body: String = (0..records)
        .map(|r| format!("{{\"id\":\"{}-{r}\",\"y\":[1.0]}}\n", shard.index))
        .collect();
    let path = uri.strip_prefix("file://").expect("file uri");
    std::fs::create_dir_all(std::path::Path::new(path).parent().expect("dir")).expect("mkdir");
    std::fs::write(path, &body).expect("write part");
    let facts = outputs::facts(body.as_bytes());
    pb::Completed {
        shard: Some(shard.clone()),
        records,
        output_uri: uri,
        sha256: facts.sha256,
        compute_seconds: 0.001,
        device: "cpu".into(),
        output_bytes: facts.bytes,
    }
}

/// Every message waiting in an agent's stream.
fn drain(rx: &mut Rx) -> Vec<Result<pb::OperatorMessage, Status>> {
    std::iter::from_fn(|| rx.try_recv().ok()).collect()
}

/// The refusals waiting in an agent's stream: (code, reason).
fn refusals(rx: &mut Rx) -> Vec<(tonic::Code, String)> {
    drain(rx)
        .into_iter()
        .filter_map(|m| match m {
            Ok(pb::OperatorMessage {
                msg: Some(Down::Refused(r)),
            }) => Some((tonic::Code::from(r.code), r.reason)),
            _ => None,
        })
        .collect()
}

/// The assignments waiting in an agent's stream.
fn assigned(rx: &mut Rx) -> Vec<pb::ShardRef> {
    let mut out = Vec::new();
    while let Ok(msg) = rx.try_recv() {
        if let Ok(pb::OperatorMessage {
            msg: Some(Down::Assign(a)),
        }) = msg
        {
            out.push(a.shard.expect("shard"));
        }
    }
    out
}

async fn slots_bound_the_outstanding_assignments(backend: Backend) {
    let f = Fixture::new(backend, 30).await;
    f.submit(5, 3).await;
    let (a, mut rx) = f.agent("a", 2).await;
    let first = assigned(&mut rx);
    assert_eq!(first.len(), 2, "two slots, two assignments");
    f.complete(&a, &first[0], 10).await.expect("complete");
    assert_eq!(
        assigned(&mut rx).len(),
        1,
        "one slot freed, one more assignment"
    );
}

async fn only_the_holder_completes_and_each_shard_is_charged_once(backend: Backend) {
    let f = Fixture::new(backend, 30).await;
    let key = f.submit(2, 3).await;
    let (a, mut rx_a) = f.agent("a", 1).await;
    let (b, mut rx_b) = f.agent("b", 1).await;
    let shard_a = assigned(&mut rx_a).pop().expect("a has a shard");
    let shard_b = assigned(&mut rx_b).pop().expect("b has a shard");
    assert_ne!(shard_a.index, shard_b.index);
    assert!(
        shard_a.attempt == 1 && shard_b.attempt == 1,
        "first attempts"
    );

    // b reports a's shard before a does: b does not hold it.
    let forged = write_part(&f.output(), &shard_a, 10);
    f.report(&b, forged).await.expect("refused, stream kept");
    assert_eq!(
        refusals(&mut rx_b),
        [(tonic::Code::PermissionDenied, "not_holder".to_string())]
    );
    let started = Instant::now();
    f.complete(&a, &shard_a, 10).await.expect("first");
    f.complete(&a, &shard_a, 10)
        .await
        .expect("refused, stream kept");
    assert_eq!(
        refusals(&mut rx_a),
        [(tonic::Code::AlreadyExists, "duplicate".to_string())]
    );
    f.complete(&b, &shard_b, 20).await.expect("b's own");
    let wall = started.elapsed();

    let charges = f.core.store().charges("u1").await.expect("charges");
    let to: Vec<(u32, &str)> = charges.iter().map(|c| (c.shard, c.to.as_str())).collect();
    assert_eq!(
        to,
        [(shard_a.index, "agent/a"), (shard_b.index, "agent/b")],
        "one charge per shard, to its holder"
    );
    assert_eq!(f.events("shard.report_refused").await, 2);
    let summary = &f.core.workloads().await[0];
    assert_eq!(summary.key, key);
    assert_eq!(summary.records, 30, "records counted once");
    assert_eq!(summary.phase, WorkloadPhase::Succeeded);
    // 10 + 20 records at 1 credit per thousand, plus at most the operator's measured
    // seconds at 1 credit per cpu-second (the agents' 0.001 s lowers it further).
    assert!(
        summary.credits >= 30_000 && summary.credits <= 30_000 + 2_000,
        "{} ({wall:?})",
        summary.credits
    );
    let manifest = std::fs::read_to_string(f.out.path().join("_SUCCESS.json")).expect("manifest");
    let manifest: serde_json::Value = serde_json::from_str(&manifest).expect("json");
    assert_eq!(manifest["records"], 30);
    let parts: Vec<outputs::ManifestPart> =
        serde_json::from_value(manifest["parts"].clone()).expect("parts");
    assert_eq!(parts.len(), 2);
    assert!(
        outputs::verify_outputs(&f.output(), &parts)
            .await
            .is_empty()
    );
    assert!(
        !f.out.path().join(outputs::ATTEMPTS).exists(),
        "no attempt file is left"
    );
    assert_eq!(
        f.core.resident_workloads(),
        0,
        "a finished workload leaves memory"
    );
}

async fn a_lost_agent_requeues_its_shards_with_the_next_attempt(backend: Backend) {
    let f = Fixture::new(backend, 30).await;
    f.submit(1, 3).await;
    let (a, mut rx_a) = f.agent("a", 1).await;
    let first = assigned(&mut rx_a).pop().expect("assigned");
    assert_eq!(first.attempt, 1);
    f.core
        .detach(&a, "stream closed by the agent")
        .await
        .expect("detach");
    assert_eq!(f.events("shard.requeued").await, 1);
    let (_b, mut rx_b) = f.agent("b", 1).await;
    let again = assigned(&mut rx_b).pop().expect("reassigned");
    assert_eq!((again.index, again.attempt), (first.index, 2));
    assert_eq!(f.core.workloads().await[0].attempts_retried, 1);
}

async fn an_agent_that_misses_its_lease_loses_its_shards(backend: Backend) {
    let f = Fixture::new(backend, 2).await;
    f.submit(1, 3).await;
    let (_a, mut rx_a) = f.agent("a", 1).await;
    assert_eq!(assigned(&mut rx_a).len(), 1);
    assert!(
        f.core.reap(Instant::now()).await.expect("reap").is_empty(),
        "fresh lease holds"
    );
    let lost = f
        .core
        .reap(Instant::now() + Duration::from_secs(3))
        .await
        .expect("reap");
    assert_eq!(lost, ["a"]);
    let closed = rx_a.try_recv().expect("the stream is ended");
    assert_eq!(
        closed.expect_err("an error ends it").code(),
        tonic::Code::DeadlineExceeded
    );
    assert_eq!(f.events("agent.lost").await, 1);
    let (_b, mut rx_b) = f.agent("b", 1).await;
    assert_eq!(assigned(&mut rx_b).pop().map(|s| s.attempt), Some(2));
}

async fn a_shard_out_of_attempts_fails_the_workload(backend: Backend) {
    let f = Fixture::new(backend, 30).await;
    f.submit(1, 2).await;
    for agent in ["a", "b"] {
        let (h, mut rx) = f.agent(agent, 1).await;
        assert_eq!(assigned(&mut rx).len(), 1);
        f.core.detach(&h, "stream broke").await.expect("detach");
    }
    let s = &f.core.workloads().await[0];
    assert_eq!(s.phase, WorkloadPhase::Failed);
    assert_eq!(s.reason, "AttemptsExhausted");
    assert!(s.message.contains("after 2 attempts"), "{}", s.message);
    assert_eq!(f.events("workload.failed").await, 1);
}

async fn a_permanent_failure_fails_the_workload_and_cancels_the_rest(backend: Backend) {
    let f = Fixture::new(backend, 30).await;
    f.submit(3, 3).await;
    let (a, mut rx_a) = f.agent("a", 2).await;
    let shards = assigned(&mut rx_a);
    assert_eq!(shards.len(), 2);
    let failed = pb::Failed {
        shard: Some(shards[0].clone()),
        kind: pb::ErrorKind::InvalidInput as i32,
        message: "file:///in.jsonl: shard 0 line 3 (byte offset 40): not valid JSON".into(),
        retryable: false,
    };
    f.core
        .handle(
            &a,
            pb::AgentMessage {
                msg: Some(Up::Failed(failed)),
            },
        )
        .await
        .expect("handled");
    let s = &f.core.workloads().await[0];
    assert_eq!(s.phase, WorkloadPhase::Failed);
    assert_eq!(s.reason, "InvalidInput");
    assert!(s.message.contains("line 3"), "{}", s.message);
    let cancelled: Vec<_> = std::iter::from_fn(|| rx_a.try_recv().ok())
        .filter_map(|m| match m {
            Ok(pb::OperatorMessage {
                msg: Some(Down::Cancel(c)),
            }) => c.shard,
            _ => None,
        })
        .collect();
    assert_eq!(cancelled.len(), 1);
    assert_eq!(cancelled[0].index, shards[1].index);
}

async fn a_drained_agent_gets_no_new_shards(backend: Backend) {
    let f = Fixture::new(backend, 30).await;
    let (a, mut rx_a) = f.agent("a", 1).await;
    f.core.set_unschedulable("a", true).await.expect("drain");
    f.submit(2, 3).await;
    assert!(assigned(&mut rx_a).is_empty());
    f.core.set_unschedulable("a", false).await.expect("undrain");
    assert_eq!(assigned(&mut rx_a).len(), 1);
    let _ = a;
}

async fn malformed_messages_are_invalid_argument(backend: Backend) {
    let f = Fixture::new(backend, 30).await;
    f.submit(1, 3).await;
    let (a, mut rx) = f.agent("a", 1).await;
    let empty = f
        .core
        .handle(&a, pb::AgentMessage { msg: None })
        .await
        .expect_err("empty");
    assert_eq!(empty.code(), tonic::Code::InvalidArgument);
    let no_shard = f
        .report(&a, pb::Completed::default())
        .await
        .expect_err("no shard");
    assert_eq!(no_shard.code(), tonic::Code::InvalidArgument);
    let _ = assigned(&mut rx);
    // Reports naming no workload or shard are refused and leave the stream up.
    let unknown = pb::ShardRef {
        workload: "nope/x/y".into(),
        index: 0,
        attempt: 1,
    };
    f.complete(&a, &unknown, 1).await.expect("refused");
    let out_of_range = pb::ShardRef {
        workload: "team-a/w-u1/u1".into(),
        index: 99,
        attempt: 1,
    };
    f.complete(&a, &out_of_range, 1).await.expect("refused");
    let got: Vec<_> = drain(&mut rx)
        .into_iter()
        .filter_map(|m| match m {
            Ok(pb::OperatorMessage {
                msg: Some(Down::Refused(r)),
            }) => Some((tonic::Code::from(r.code), r.message)),
            _ => None,
        })
        .collect();
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!(got[0].0, tonic::Code::NotFound);
    assert!(got[1].1.contains("no shard 99"), "{}", got[1].1);
}

async fn an_empty_input_succeeds_at_once(backend: Backend) {
    let f = Fixture::new(backend, 30).await;
    f.submit(0, 3).await;
    assert_eq!(f.phase().await, WorkloadPhase::Succeeded);
}

both!(slots_bound_the_outstanding_assignments);
both!(only_the_holder_completes_and_each_shard_is_charged_once);
both!(a_lost_agent_requeues_its_shards_with_the_next_attempt);
both!(an_agent_that_misses_its_lease_loses_its_shards);
both!(a_shard_out_of_attempts_fails_the_workload);
both!(a_permanent_failure_fails_the_workload_and_cancels_the_rest);
both!(a_drained_agent_gets_no_new_shards);
both!(malformed_messages_are_invalid_argument);
both!(an_empty_input_succeeds_at_once);

fn mesh_with_budget(credits: f64) -> MeshSpec {
    let mut m = mesh(30);
    m.budgets = vec![infermesh_crds::Budget {
        namespace: "team-a".into(),
        credits,
    }];
    m
}

async fn a_workload_over_budget_is_held_and_runs_after_a_grant(backend: Backend) {
    let f = Fixture::new(backend, 30).await;
    f.core
        .upsert_mesh("m", mesh_with_budget(0.0))
        .await
        .expect("mesh");
    f.submit(2, 3).await;
    let (_a, mut rx) = f.agent("a", 1).await;
    let s = &f.core.workloads().await[0];
    assert_eq!(
        (s.phase, s.reason.as_str()),
        (WorkloadPhase::Pending, "QuotaExceeded")
    );
    assert!(s.message.contains("0.000000 credits left"), "{}", s.message);
    assert!(s.message.contains("needs more than 0"), "{}", s.message);
    assert!(
        assigned(&mut rx).is_empty(),
        "a held workload dispatches nothing"
    );
    assert_eq!(f.events("workload.held").await, 1);
    assert_eq!(f.events("workload.admitted").await, 0);

    f.core
        .store()
        .grant(GrantKind::Manual, "team-a", "m", 5_000_000, "top-up")
        .await
        .expect("grant");
    f.core.admit_held().await.expect("admit");
    let s = &f.core.workloads().await[0];
    assert_eq!(
        s.phase,
        WorkloadPhase::Running,
        "{}: {}",
        s.reason,
        s.message
    );
    assert_eq!(assigned(&mut rx).len(), 1);
    assert_eq!(f.events("workload.admitted").await, 1);
}

async fn mesh_budgets_are_granted_once_however_often_the_mesh_is_applied(backend: Backend) {
    let f = Fixture::new(backend, 30).await;
    for _ in 0..3 {
        f.core
            .upsert_mesh("m", mesh_with_budget(10.0))
            .await
            .expect("mesh");
    }
    let store = f.core.store();
    assert_eq!(
        store.granted("team-a", "m").await.expect("granted"),
        10_000_000
    );
    assert_eq!(
        store.balance("namespace/team-a").await.expect("balance"),
        10_000_000
    );
    f.core
        .upsert_mesh("m", mesh_with_budget(4.0))
        .await
        .expect("lower budget");
    assert_eq!(
        store.granted("team-a", "m").await.expect("granted"),
        4_000_000
    );
    assert_eq!(
        store.balance("mesh/m").await.expect("mesh account"),
        -4_000_000
    );
    // A grant by hand is not the budget's: the next reconcile leaves it alone.
    store
        .grant(GrantKind::Manual, "team-a", "m", 3_000_000, "by hand")
        .await
        .expect("grant");
    for _ in 0..2 {
        f.core
            .upsert_mesh("m", mesh_with_budget(4.0))
            .await
            .expect("reconcile");
    }
    assert_eq!(
        store.balance("namespace/team-a").await.expect("balance"),
        7_000_000,
        "budget 4 + 3 by hand"
    );
    assert!(store.verify().await.expect("verify").ok());
}

async fn a_budget_with_credits_left_admits_at_once(backend: Backend) {
    let f = Fixture::new(backend, 30).await;
    f.core
        .upsert_mesh("m", mesh_with_budget(1.0))
        .await
        .expect("mesh");
    f.submit(1, 3).await;
    assert_eq!(f.phase().await, WorkloadPhase::Running);
}

both!(a_workload_over_budget_is_held_and_runs_after_a_grant);
both!(mesh_budgets_are_granted_once_however_often_the_mesh_is_applied);
both!(a_budget_with_credits_left_admits_at_once);

async fn a_new_operator_resumes_without_rerunning_completed_shards(backend: Backend) {
    let url = backend.fresh_url().await;
    let out = tempfile::tempdir().expect("tmp");
    let spec = workload(&format!("file://{}/", out.path().display()), 3);
    let got_done;
    {
        let first = Core::new(crate::store::open(&url).await.expect("open"));
        first.upsert_mesh("m", mesh(30)).await.expect("mesh");
        first
            .submit(Submission {
                namespace: "team-a".into(),
                name: "w".into(),
                uid: "u1".into(),
                spec,
                input_size: 4096,
                input_version: None,
                input_files: None,
                credentials: None,
            })
            .await
            .expect("submit");
        let (a, mut rx) = attach(&first, "a", 2, &Principal::user("t")).await;
        let got = assigned(&mut rx);
        assert_eq!(got.len(), 2);
        got_done = got[0].index;
        let done = write_part(&format!("file://{}/", out.path().display()), &got[0], 7);
        first
            .handle(
                &a,
                pb::AgentMessage {
                    msg: Some(Up::Completed(done)),
                },
            )
            .await
            .expect("complete");
        // The operator goes away with shard got[1] still running on `a`.
    }
    let second = Fixture {
        core: Core::new(crate::store::open(&url).await.expect("reopen")),
        out,
    };
    second.core.upsert_mesh("m", mesh(30)).await.expect("mesh");
    assert_eq!(second.core.resume().await.expect("resume"), 1);
    let s = &second.core.workloads().await[0];
    assert_eq!(
        (s.phase, s.records, s.shards_succeeded),
        (WorkloadPhase::Running, 7, 1)
    );
    let (b, mut rx) = second.agent("b", 4).await;
    let mut again = assigned(&mut rx);
    again.sort_by_key(|s| s.index);
    let shards: Vec<(u32, u32)> = again.iter().map(|s| (s.index, s.attempt)).collect();
    assert_eq!(
        shards.len(),
        3,
        "the completed shard is not run again: {shards:?}"
    );
    // `a` held two shards when the operator went: the one it was given first and the one it
    // got when its first completion freed a slot. Both run again as attempt 2.
    assert_eq!(
        shards.iter().filter(|(_, attempt)| *attempt == 2).count(),
        2,
        "{shards:?}"
    );
    assert!(!shards.iter().any(|(i, _)| *i == got_done), "{shards:?}");
    for shard in &again {
        second.complete(&b, shard, 7).await.expect("complete");
    }
    let s = &second.core.workloads().await[0];
    assert_eq!((s.phase, s.records), (WorkloadPhase::Succeeded, 28));
    assert_eq!(
        second
            .core
            .store()
            .charges("u1")
            .await
            .expect("charges")
            .len(),
        4
    );
    assert!(second.core.store().verify().await.expect("verify").ok());
    assert_eq!(second.events("shard.requeued").await, 2);
}

both!(a_new_operator_resumes_without_rerunning_completed_shards);

/// Every way an authenticated agent can lie about its work, against one honest agent: each
/// lie is refused with its code and event, and the honest run ends as if the liar were not
/// there.
async fn forged_reports_are_refused_and_change_nothing(backend: Backend) {
    let f = Fixture::new(backend, 30).await;
    f.submit(3, 3).await;
    let (honest, mut rx_h) = f.agent("honest", 1).await;
    let (liar, mut rx_l) = f.agent("liar", 1).await;
    let mine = assigned(&mut rx_h).pop().expect("honest has a shard");
    let theirs = assigned(&mut rx_l).pop().expect("liar has a shard");
    let out = f.output();

    // The liar reports the honest agent's shard, with a part it wrote itself.
    f.report(&liar, write_part(&out, &mine, 5))
        .await
        .expect("kept");
    // A shard nobody was given yet (the third one).
    let third = (0..3u32)
        .find(|i| *i != mine.index && *i != theirs.index)
        .expect("a third shard");
    let unassigned = pb::ShardRef {
        index: third,
        ..mine.clone()
    };
    f.report(&liar, write_part(&out, &unassigned, 5))
        .await
        .expect("kept");
    // Its own shard, but with numbers no honest agent sends.
    let mut bad = write_part(&out, &theirs, 5);
    for compute in [f64::NAN, f64::INFINITY, -1.0, 1e9] {
        bad.compute_seconds = compute;
        f.report(&liar, bad.clone()).await.expect("kept");
    }
    bad.compute_seconds = 0.001;
    bad.records = 1_000_000;
    f.report(&liar, bad.clone()).await.expect("kept");
    // Another output location than the one assigned.
    let mut elsewhere = write_part(&out, &theirs, 5);
    elsewhere.output_uri = outputs::part_uri(&out, theirs.index);
    f.report(&liar, elsewhere).await.expect("kept");
    let got: Vec<String> = refusals(&mut rx_l).into_iter().map(|(_, r)| r).collect();
    assert_eq!(
        got,
        [
            "not_holder",
            "not_holder",
            "invalid_report",
            "invalid_report",
            "invalid_report",
            "invalid_report",
            "invalid_report",
            "invalid_report"
        ]
    );
    // A made-up sha256: the part says otherwise. The attempt counts as failed and is
    // requeued; the next attempt goes to whoever has a slot.
    let mut made_up = write_part(&out, &theirs, 5);
    made_up.sha256 = "0".repeat(64);
    f.report(&liar, made_up).await.expect("kept");
    let msgs = drain(&mut rx_l);
    let refused: Vec<_> = msgs
        .iter()
        .filter_map(|m| match m {
            Ok(pb::OperatorMessage {
                msg: Some(Down::Refused(r)),
            }) => Some((tonic::Code::from(r.code), r.reason.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(
        refused,
        [(tonic::Code::DataLoss, "output_mismatch".to_string())]
    );
    let retry: Vec<pb::ShardRef> = msgs
        .into_iter()
        .filter_map(|m| match m {
            Ok(pb::OperatorMessage {
                msg: Some(Down::Assign(a)),
            }) => a.shard,
            _ => None,
        })
        .collect();
    assert_eq!(retry.len(), 1, "the freed slot gets a shard");
    assert_eq!(
        f.core.store().charges("u1").await.expect("charges").len(),
        0
    );

    // The honest agent finishes everything it is given; the liar's retry too, honestly.
    f.complete(&honest, &mine, 7).await.expect("honest");
    let mut queue: Vec<(AgentHandle, pb::ShardRef)> =
        retry.into_iter().map(|s| (liar.clone(), s)).collect();
    loop {
        queue.extend(assigned(&mut rx_h).into_iter().map(|s| (honest.clone(), s)));
        let Some((who, shard)) = queue.pop() else {
            break;
        };
        f.complete(&who, &shard, 7).await.expect("complete");
        queue.extend(assigned(&mut rx_l).into_iter().map(|s| (liar.clone(), s)));
    }
    let s = &f.core.workloads().await[0];
    assert_eq!(
        (s.phase, s.records),
        (WorkloadPhase::Succeeded, 21),
        "{}",
        s.message
    );
    let charges = f.core.store().charges("u1").await.expect("charges");
    assert_eq!(charges.len(), 3, "one charge per shard: {charges:?}");
    assert!(
        charges.iter().all(|c| c.amount > 0 && c.amount < 100_000),
        "{charges:?}"
    );
    assert_eq!(f.events("shard.report_refused").await, 9);
    let report = f.core.store().verify().await.expect("verify");
    assert!(report.ok(), "{report:?}");
    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(f.out.path().join("_SUCCESS.json")).expect("manifest"),
    )
    .expect("json");
    let parts: Vec<outputs::ManifestPart> =
        serde_json::from_value(manifest["parts"].clone()).expect("parts");
    let problems = outputs::verify_outputs(&f.output(), &parts).await;
    assert!(problems.is_empty(), "{problems:?}");
    let refused = f
        .core
        .counters()
        .refused
        .get_or_create(&RefusedLabels {
            reason: "invalid_report".into(),
        })
        .get();
    assert_eq!(refused, 6);
}

async fn a_flood_of_refused_reports_ends_that_stream_only(backend: Backend) {
    let f = Fixture::new(backend, 30).await;
    f.submit(2, 3).await;
    let (honest, mut rx_h) = f.agent("honest", 1).await;
    let (liar, _rx_l) = f.agent("liar", 1).await;
    let mine = assigned(&mut rx_h).pop().expect("shard");
    let forged = write_part(&f.output(), &mine, 1);
    let mut ended = None;
    for i in 0..(MAX_REFUSALS + 5) {
        if let Err(e) = f.report(&liar, forged.clone()).await {
            ended = Some((i, e));
            break;
        }
    }
    let (at, status) = ended.expect("the flood ends the stream");
    assert_eq!(at, MAX_REFUSALS, "after {MAX_REFUSALS} refusals");
    assert_eq!(status.code(), tonic::Code::PermissionDenied);
    assert_eq!(
        f.events("shard.report_refused").await,
        MAX_REFUSALS as usize + 1
    );
    f.complete(&honest, &mine, 3)
        .await
        .expect("the honest agent is not disturbed");
    assert_eq!(
        f.core.store().charges("u1").await.expect("charges").len(),
        1
    );
}

async fn identity_comes_from_credentials(backend: Backend) {
    let f = Fixture::new(backend, 30).await;
    f.submit(1, 3).await;
    let bound = |agent: &str, instance: &str| Principal {
        user: "sa".into(),
        agent: Some(agent.into()),
        node: Some(format!("node-{agent}")),
        instance: Some(instance.into()),
    };
    let (tx, _rx) = mpsc::unbounded_channel();
    let other_agent = f
        .core
        .attach(hello("victim", 1), &bound("thief", "pod-t"), tx)
        .await
        .expect_err("another agent's id");
    assert_eq!(other_agent.code(), tonic::Code::PermissionDenied);
    let mut wrong_node = hello("victim", 1);
    wrong_node.node = "node-elsewhere".into();
    let (tx, _rx) = mpsc::unbounded_channel();
    let err = f
        .core
        .attach(wrong_node, &bound("victim", "pod-v"), tx)
        .await
        .expect_err("another node");
    assert_eq!(err.code(), tonic::Code::PermissionDenied);

    let (victim, mut rx_v) = attach(&f.core, "victim", 1, &bound("victim", "pod-v")).await;
    let shard = assigned(&mut rx_v).pop().expect("shard");
    // A second pod with the same agent's credentials cannot evict the live stream.
    let (tx, _rx) = mpsc::unbounded_channel();
    let evict = f
        .core
        .attach(hello("victim", 1), &bound("victim", "pod-2"), tx)
        .await
        .expect_err("live stream of another pod");
    assert_eq!(evict.code(), tonic::Code::AlreadyExists);
    f.complete(&victim, &shard, 2)
        .await
        .expect("the victim's stream still works");
    assert_eq!(f.phase().await, WorkloadPhase::Succeeded);
    // The same pod reconnecting replaces its own stream.
    let (again, _rx) = attach(&f.core, "victim", 1, &bound("victim", "pod-v")).await;
    assert_ne!(again.session, victim.session);
    let stale = f
        .core
        .handle(
            &victim,
            pb::AgentMessage {
                msg: Some(Up::Heartbeat(pb::Heartbeat::default())),
            },
        )
        .await
        .expect_err("the old stream is gone");
    assert_eq!(stale.code(), tonic::Code::FailedPrecondition);
}

async fn a_namespace_out_of_credits_gets_no_new_dispatches(backend: Backend) {
    let f = Fixture::new(backend, 30).await;
    // 0.005 credits: one shard of 10 records costs 0.01 plus its seconds.
    f.core
        .upsert_mesh("m", mesh_with_budget(0.005))
        .await
        .expect("mesh");
    f.submit(4, 3).await;
    let (a, mut rx) = f.agent("a", 2).await;
    let first = assigned(&mut rx);
    assert_eq!(first.len(), 2);
    // The freed slot is refilled while the part is checked, before the charge lands.
    f.complete(&a, &first[0], 10).await.expect("complete");
    let more = assigned(&mut rx);
    assert_eq!(more.len(), 1);
    f.complete(&a, &first[1], 10).await.expect("complete");
    assert!(assigned(&mut rx).is_empty(), "out of credits: nothing new");
    f.complete(&a, &more[0], 10)
        .await
        .expect("a running shard finishes");
    let s = &f.core.workloads().await[0];
    assert_eq!(
        (s.phase, s.reason.as_str()),
        (WorkloadPhase::Running, "QuotaExceeded")
    );
    let balance = f
        .core
        .store()
        .balance("namespace/team-a")
        .await
        .expect("balance");
    assert!(
        balance < 0 && balance > -40_000,
        "overshoot bounded by what ran: {balance}"
    );
    f.core
        .store()
        .grant(GrantKind::Manual, "team-a", "m", 1_000_000, "top-up")
        .await
        .expect("grant");
    f.core.admit_held().await.expect("admit");
    let last = assigned(&mut rx);
    assert_eq!(last.len(), 1, "dispatch resumes after a grant");
    f.complete(&a, &last[0], 10).await.expect("complete");
    assert_eq!(f.phase().await, WorkloadPhase::Succeeded);
    assert!(f.core.store().verify().await.expect("verify").ok());
}

async fn a_uid_already_stored_is_never_started_over(backend: Backend) {
    let f = Fixture::new(backend, 30).await;
    f.submit(1, 3).await;
    let (a, mut rx) = f.agent("a", 1).await;
    let shard = assigned(&mut rx).pop().expect("shard");
    f.complete(&a, &shard, 1).await.expect("complete");
    assert_eq!(f.phase().await, WorkloadPhase::Succeeded);
    f.core.release("team-a/w-u1/u1");
    assert!(!f.core.knows("team-a/w-u1/u1").await);
    let again = f
        .core
        .submit(Submission {
            namespace: "team-a".into(),
            name: "w-u1".into(),
            uid: "u1".into(),
            spec: workload(&f.output(), 3),
            input_size: 1024,
            input_version: None,
            input_files: None,
            credentials: None,
        })
        .await
        .expect_err("finished");
    assert!(
        matches!(again, CoreError::Finished { ref phase, .. } if phase == "Succeeded"),
        "{again}"
    );
    assert!(!f.core.knows("team-a/w-u1/u1").await, "no ghost is left");
    f.core
        .upsert_mesh("m", mesh(30))
        .await
        .expect("a Mesh reconcile still works");
    assert_eq!(
        f.core.store().charges("u1").await.expect("charges").len(),
        1
    );
}

async fn a_stored_spec_that_no_longer_validates_fails_only_its_workload(backend: Backend) {
    let url = backend.fresh_url().await;
    let out = tempfile::tempdir().expect("tmp");
    let store = crate::store::open(&url).await.expect("open");
    let record = |uid: &str, spec: String| WorkloadRecord {
        uid: uid.into(),
        namespace: "team-a".into(),
        name: uid.into(),
        mesh: "m".into(),
        spec_json: spec,
        input_bytes: 100,
        input_version: None,
        input_files: None,
    };
    let good = serde_json::to_string(&workload(&format!("file://{}/", out.path().display()), 3))
        .expect("json");
    let shard = [ShardRecord {
        index: 0,
        start: 0,
        end: 100,
    }];
    store
        .create_workload(&record("bad", "{\"mesh\": 7}".into()), &shard)
        .await
        .expect("bad");
    store
        .create_workload(&record("good", good), &shard)
        .await
        .expect("good");
    let core = Core::new(store);
    core.upsert_mesh("m", mesh(30)).await.expect("mesh");
    assert_eq!(core.resume().await.expect("resume does not abort"), 1);
    assert_eq!(
        core.store()
            .workload_phase("bad")
            .await
            .expect("phase")
            .as_deref(),
        Some("Failed")
    );
    let failed = count_events(&core, "workload.failed").await;
    assert_eq!(failed, 1);
}

/// A shard fails for good only together with its workload (two store writes). An operator
/// that stopped between them leaves a running workload with a failed shard; the next one
/// fails that workload at resume instead of waiting forever for the shard.
async fn a_workload_left_with_a_failed_shard_fails_at_resume(backend: Backend) {
    let url = backend.fresh_url().await;
    let out = tempfile::tempdir().expect("tmp");
    let output = format!("file://{}/", out.path().display());
    let core = Core::new(crate::store::open(&url).await.expect("open"));
    core.upsert_mesh("m", mesh(30)).await.expect("mesh");
    for uid in ["broken", "fine"] {
        core.submit(Submission {
            namespace: "team-a".into(),
            name: uid.into(),
            uid: uid.into(),
            spec: workload(&format!("{output}{uid}/"), 3),
            input_size: 2 * 1024,
            input_version: None,
            input_files: None,
            credentials: None,
        })
        .await
        .expect("submit");
    }
    let (_a, mut rx) = attach(&core, "a", 1, &Principal::user("t")).await;
    let shard = assigned(&mut rx).pop().expect("shard");
    let uid = super::machine::key_uid(&shard.workload).to_string();
    // The first of the two writes, then the operator stops.
    assert!(
        core.store()
            .fail_shard(&uid, shard.index, shard.attempt, Some("a"), "boom")
            .await
            .expect("fail shard")
    );
    drop(core);
    let core = Core::new(crate::store::open(&url).await.expect("reopen"));
    core.upsert_mesh("m", mesh(30)).await.expect("mesh");
    assert_eq!(
        core.resume().await.expect("resume"),
        1,
        "only the other one resumes"
    );
    let phase = core.store().workload_phase(&uid).await.expect("phase");
    assert_eq!(phase.as_deref(), Some("Failed"));
    let summary = core.workloads().await;
    let failed = summary.iter().find(|w| w.uid == uid).expect("summary");
    assert_eq!(failed.reason, "ShardFailed");
    assert!(
        failed.message.contains(&format!("shard {}", shard.index)),
        "{}",
        failed.message
    );
    let other = if uid == "broken" { "fine" } else { "broken" };
    let phase = core.store().workload_phase(other).await.expect("phase");
    assert_eq!(phase.as_deref(), Some("Running"));
}

async fn heartbeats_reconcile_what_the_agent_runs(backend: Backend) {
    let f = Fixture::new(backend, 30).await;
    f.submit(2, 3).await;
    let (a, mut rx) = f.agent("a", 1).await;
    let shard = assigned(&mut rx).pop().expect("shard");
    let beat = |running: Vec<pb::ShardRef>| pb::AgentMessage {
        msg: Some(Up::Heartbeat(pb::Heartbeat {
            running,
            ..Default::default()
        })),
    };
    // A shard it says it runs but does not hold: cancelled.
    let foreign = pb::ShardRef {
        index: 1 - shard.index,
        ..shard.clone()
    };
    f.core
        .handle(&a, beat(vec![shard.clone(), foreign.clone()]))
        .await
        .expect("beat");
    let cancels: Vec<u32> = drain(&mut rx)
        .into_iter()
        .filter_map(|m| match m {
            Ok(pb::OperatorMessage {
                msg: Some(Down::Cancel(c)),
            }) => c.shard.map(|s| s.index),
            _ => None,
        })
        .collect();
    assert_eq!(cancels, [foreign.index]);
    // Fresh assignments are not taken back: the heartbeat may have left before they came.
    f.core.handle(&a, beat(vec![])).await.expect("beat");
    assert_eq!(f.events("shard.requeued").await, 0);
    // Past the grace (two heartbeat periods), a shard the agent no longer lists is lost.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    f.core.handle(&a, beat(vec![])).await.expect("beat");
    assert_eq!(f.events("shard.requeued").await, 1);
    let again = assigned(&mut rx);
    assert_eq!(again.len(), 1, "the slot is free again");
}

async fn finished_workloads_leave_memory(backend: Backend) {
    let f = Fixture::new(backend, 30).await;
    let (a, mut rx) = f.agent("a", 2).await;
    for i in 0..20 {
        let uid = format!("run-{i}");
        // Each run writes to its own location (a new run refuses one holding another's parts).
        let key = f
            .core
            .submit(Submission {
                namespace: "team-a".into(),
                name: uid.clone(),
                uid: uid.clone(),
                spec: workload(&format!("{}{uid}/", f.output()), 3),
                input_size: 3 * 1024,
                input_version: None,
                input_files: None,
                credentials: None,
            })
            .await
            .expect("submit");
        assert_eq!(f.core.resident_workloads(), 1);
        let out = format!("{}{uid}/", f.output());
        for _ in 0..100 {
            if f.core.resident_workloads() == 0 {
                break;
            }
            for shard in assigned(&mut rx) {
                f.report(&a, write_part(&out, &shard, 2))
                    .await
                    .expect("complete");
            }
            tokio::task::yield_now().await;
        }
        let s = f
            .core
            .workload(&key)
            .await
            .expect("the summary stays until released");
        assert_eq!(s.phase, WorkloadPhase::Succeeded);
        f.core.release(&key);
        assert!(f.core.workload(&key).await.is_none());
    }
    assert_eq!(f.core.resident_workloads(), 0);
    assert!(f.core.workloads().await.is_empty());
}

async fn deleting_a_mesh_fails_its_workloads(backend: Backend) {
    let f = Fixture::new(backend, 30).await;
    f.submit(2, 3).await;
    let (_a, mut rx) = f.agent("a", 1).await;
    assert_eq!(assigned(&mut rx).len(), 1);
    f.core.remove_mesh("m").await;
    let s = &f.core.workloads().await[0];
    assert_eq!(
        (s.phase, s.reason.as_str()),
        (WorkloadPhase::Failed, "MeshDeleted")
    );
    let kinds: Vec<bool> = drain(&mut rx)
        .iter()
        .map(|m| {
            matches!(
                m,
                Ok(pb::OperatorMessage {
                    msg: Some(Down::Drain(_))
                })
            )
        })
        .collect();
    assert!(kinds.contains(&true), "its agents are told to drain");
}

/// One shard running on agent "a", which is then lost with its requeue order dropped, as a
/// failed store write drops it (which also marks a sweep owed): the fixture and the shard.
async fn lost_with_its_requeue_dropped(backend: Backend) -> (Fixture, pb::ShardRef) {
    let f = Fixture::new(backend, 30).await;
    f.submit(1, 3).await;
    let (_a, mut rx_a) = f.agent("a", 1).await;
    let first = assigned(&mut rx_a).pop().expect("shard");
    let orders = f
        .core
        .apply(|m| (m.agent_lost("a", None, Instant::now()), Vec::new()))
        .expect("a was attached");
    assert_eq!(orders.len(), 1);
    (f, first)
}

/// A sweep owed (as a failed write marks it), and agent "b" attached with a free slot that
/// nothing is given: memory still holds the lost shard on "a".
async fn owed_with_a_free_agent(f: &Fixture) -> (AgentHandle, Rx) {
    f.core
        .sweep_owed
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let (b, mut rx_b) = f.agent("b", 1).await;
    assert!(
        assigned(&mut rx_b).is_empty(),
        "nothing to give: memory still holds the shard on a"
    );
    (b, rx_b)
}

/// An agent is lost but the requeue of its shard never reaches the store (the write timed
/// out while the next ping got through, so no outage was declared): the shard is left with
/// nobody. The sweep the lease reaper runs every second requeues it and dispatches it, and
/// the workload ends; before the sweep it would have waited forever. Found by the chaos
/// harness (seed 27: Postgres killed twice in a row).
async fn a_requeue_lost_to_a_failed_write_is_swept_up(backend: Backend) {
    let (f, first) = lost_with_its_requeue_dropped(backend).await;
    f.core.sweep().await;
    assert_eq!(
        f.events("shard.requeued").await,
        0,
        "nothing failed that the core knows of: the sweep does not scan"
    );
    let (b, mut rx_b) = owed_with_a_free_agent(&f).await;
    assert_eq!(f.events("shard.requeued").await, 0);
    f.core.sweep().await;
    assert_eq!(f.events("shard.requeued").await, 1, "the sweep requeued it");
    let next = assigned(&mut rx_b).pop().expect("dispatched again");
    assert_eq!((next.index, next.attempt), (first.index, 2));
    f.complete(&b, &next, 3).await.expect("complete");
    assert_eq!(f.phase().await, WorkloadPhase::Succeeded);
    // Nothing left undone: a second sweep changes nothing.
    f.core.sweep().await;
    assert_eq!(f.events("shard.requeued").await, 1);
}

/// An agent is lost and the requeue of its shard commits in the store, but its answer is
/// lost (the database restarted as it answered), so memory still gives the shard to the
/// departed agent. The sweep requeues it again; the store refuses (it holds the shard
/// pending, not running there), and memory reads the shard back from the store instead of
/// keeping it with nobody: it is dispatched again and the workload ends. Before, every
/// later requeue was refused the same way and the workload never ended (found reading the
/// code after the chaos harness's regression 10,000 stalled in CI).
async fn a_requeue_whose_answer_was_lost_is_read_back(backend: Backend) {
    let (f, first) = lost_with_its_requeue_dropped(backend).await;
    // The requeue commits; the core never hears of it, and a sweep is owed.
    assert!(
        f.core
            .store()
            .requeue("u1", first.index, first.attempt, Some("a"), "lease expired")
            .await
            .expect("requeue"),
        "the store held the attempt"
    );
    let (b, mut rx_b) = owed_with_a_free_agent(&f).await;
    f.core.sweep().await;
    let next = assigned(&mut rx_b)
        .pop()
        .expect("read back as pending and dispatched again");
    assert_eq!((next.index, next.attempt), (first.index, 2));
    assert_eq!(
        f.events("shard.requeued").await,
        1,
        "requeued once: the refused second requeue logs nothing"
    );
    f.complete(&b, &next, 3).await.expect("complete");
    assert_eq!(f.phase().await, WorkloadPhase::Succeeded);
    let charges = f.core.store().charges("u1").await.expect("charges");
    assert_eq!(charges.len(), 1, "charged once");
}

/// Makes the store refuse to write `value` into `table.column` (`on`), or take it again,
/// with a trigger: a write that fails as one meeting a restarting database would.
async fn refuse_update(core: &Core<AnyStore>, table: &str, column: &str, value: &str, on: bool) {
    let name = format!("refuse_{table}_{}", value.to_lowercase());
    let (sqlite, postgres) = if on {
        (
            format!(
                "CREATE TRIGGER {name} BEFORE UPDATE ON {table} WHEN NEW.{column} = '{value}' \
                 BEGIN SELECT RAISE(ABORT, 'the database is restarting'); END"
            ),
            format!(
                "CREATE FUNCTION {name}() RETURNS trigger AS $$ BEGIN \
                 RAISE EXCEPTION 'the database is restarting'; END $$ LANGUAGE plpgsql; \
                 CREATE TRIGGER {name} BEFORE UPDATE ON {table} FOR EACH ROW \
                 WHEN (NEW.{column} = '{value}') EXECUTE FUNCTION {name}()"
            ),
        )
    } else {
        (
            format!("DROP TRIGGER {name}"),
            format!("DROP TRIGGER {name} ON {table}"),
        )
    };
    crate::store::testing::raw_sql(core.store(), &sqlite, &postgres)
        .await
        .expect("trigger");
}

/// [`refuse_update`] of a workload's phase.
async fn refuse_phase(core: &Core<AnyStore>, phase: &str, on: bool) {
    refuse_update(core, "workloads", "phase", phase, on).await;
}

/// A sweep while the store still refuses the terminal write: it tries the write again, which
/// fails again, so the workload stays Running and the sweep is owed once more.
async fn sweep_while_refused(f: &Fixture) {
    f.core.sweep().await;
    assert_eq!(f.phase().await, WorkloadPhase::Running);
    assert!(
        f.core.sweep_owed.load(std::sync::atomic::Ordering::Relaxed),
        "tried again, refused again, owed again"
    );
}

/// The last shard is committed, but the store write that marks the workload Succeeded fails
/// (the database restarting as it came). The agent's report is taken (its stream stays up),
/// and the sweep finishes the workload once the store takes writes again. Before, nothing
/// tried the finish again: every shard had succeeded and the workload stayed Running for
/// good.
async fn a_finish_that_failed_is_tried_again_by_the_sweep(backend: Backend) {
    let f = Fixture::new(backend, 30).await;
    f.submit(1, 3).await;
    let (a, mut rx_a) = f.agent("a", 1).await;
    let shard = assigned(&mut rx_a).pop().expect("shard");
    refuse_phase(&f.core, "Succeeded", true).await;
    f.complete(&a, &shard, 3)
        .await
        .expect("the report is taken: the finish is not the agent's to answer for");
    assert!(refusals(&mut rx_a).is_empty(), "nothing refused");
    assert_eq!(
        f.core.store().charges("u1").await.expect("charges").len(),
        1
    );
    assert_eq!(f.phase().await, WorkloadPhase::Running, "the finish failed");
    sweep_while_refused(&f).await;
    refuse_phase(&f.core, "Succeeded", false).await;
    f.core.sweep().await;
    assert_eq!(f.phase().await, WorkloadPhase::Succeeded);
    assert_eq!(f.events("workload.succeeded").await, 1);
    assert_eq!(
        f.core.store().charges("u1").await.expect("charges").len(),
        1,
        "charged once"
    );
}

/// A shard fails for good, but the store write that marks its workload Failed fails (the
/// database restarting as it came). The failure is owed, and the sweep writes it once the
/// store takes writes again. Before, nothing wrote it again: the shard was failed in the
/// store, no later report came, and the workload stayed Running for good.
async fn a_failure_that_could_not_be_written_is_written_by_the_sweep(backend: Backend) {
    let f = Fixture::new(backend, 30).await;
    f.submit(2, 1).await;
    let (a, mut rx_a) = f.agent("a", 2).await;
    let shards = assigned(&mut rx_a);
    assert_eq!(shards.len(), 2);
    refuse_phase(&f.core, "Failed", true).await;
    f.core
        .handle(&a, failure(&shards[0], false, "line 3: not valid JSON"))
        .await
        .expect("the report is taken: the workload's failure is the sweep's to write");
    assert_eq!(
        f.phase().await,
        WorkloadPhase::Running,
        "the failure's write failed"
    );
    sweep_while_refused(&f).await;
    refuse_phase(&f.core, "Failed", false).await;
    f.core.sweep().await;
    let s = &f.core.workloads().await[0];
    assert_eq!(s.phase, WorkloadPhase::Failed);
    assert_eq!(s.reason, "InvalidInput");
    assert!(s.message.contains("line 3"), "{}", s.message);
    assert_eq!(f.events("workload.failed").await, 1);
    assert_eq!(
        f.core
            .store()
            .workload_phase("u1")
            .await
            .expect("phase")
            .as_deref(),
        Some("Failed")
    );
}

/// A workload passes its deadline, and the write of its failure fails; its last shard then
/// comes in and is charged (the store still has the workload running). The failure decided
/// first is what the workload ends with, once it can be written: the finish does not
/// overtake it with a Succeeded.
async fn an_owed_failure_is_not_overtaken_by_a_finish(backend: Backend) {
    let f = Fixture::new(backend, 30).await;
    let mut spec = workload(&f.output(), 3);
    spec.active_deadline_seconds = Some(10);
    submit_spec(&f.core, spec, 1).await;
    let (a, mut rx_a) = f.agent("a", 1).await;
    let shard = assigned(&mut rx_a).pop().expect("shard");
    refuse_phase(&f.core, "Failed", true).await;
    f.core
        .reap(Instant::now() + Duration::from_secs(11))
        .await
        .expect_err("the deadline's failure cannot be written");
    f.complete(&a, &shard, 3).await.expect("complete");
    assert_eq!(
        f.core.store().charges("u1").await.expect("charges").len(),
        1
    );
    assert_eq!(f.phase().await, WorkloadPhase::Running, "not finished");
    refuse_phase(&f.core, "Failed", false).await;
    f.core.sweep().await;
    let s = &f.core.workloads().await[0];
    assert_eq!(
        (s.phase, s.reason.as_str()),
        (WorkloadPhase::Failed, "DeadlineExceeded")
    );
    assert_eq!(f.events("workload.succeeded").await, 0);
    assert_eq!(f.events("workload.failed").await, 1);
}

/// A shard fails for good, but the store refuses to record the shard's failure (the database
/// restarting as the report came). The report is taken and the agent's stream stays up; the
/// shard, no longer the agent's, is the sweep's: it is requeued, runs again, and its second
/// failure fails the workload. Before, the report was answered with an internal error that
/// ended the stream, and the shard (already off the agent's list, so not requeued with the
/// agent's others) stayed with nobody.
async fn a_failure_report_whose_write_failed_is_taken_and_swept_up(backend: Backend) {
    let f = Fixture::new(backend, 30).await;
    f.submit(1, 3).await;
    let (a, mut rx_a) = f.agent("a", 1).await;
    let shard = assigned(&mut rx_a).pop().expect("shard");
    refuse_update(&f.core, "shards", "state", "failed", true).await;
    f.core
        .handle(&a, failure(&shard, false, "line 3: not valid JSON"))
        .await
        .expect("the report is taken: its write failing is not the agent's to answer for");
    assert_eq!(f.phase().await, WorkloadPhase::Running);
    refuse_update(&f.core, "shards", "state", "failed", false).await;
    f.core.sweep().await;
    let again = assigned(&mut rx_a).pop().expect("requeued and run again");
    assert_eq!(
        (again.index, again.attempt),
        (shard.index, shard.attempt + 1)
    );
    f.core
        .handle(&a, failure(&again, false, "line 3: not valid JSON"))
        .await
        .expect("handled");
    let s = &f.core.workloads().await[0];
    assert_eq!(
        (s.phase, s.reason.as_str()),
        (WorkloadPhase::Failed, "InvalidInput")
    );
    assert_eq!(f.events("shard.failed").await, 1);
    assert_eq!(f.events("workload.failed").await, 1);
}

/// A completion's commit went through but its answer was lost (the database went down right
/// after it), so the operator writes it again: the store says it is already this attempt's,
/// and the shard counts as committed, charged once. Before, the second write was refused as
/// stale, the shard taken for lost to another operator, and the workload never ended (found
/// by `tests/store_outage.rs` under load).
async fn a_commit_whose_answer_was_lost_is_not_taken_for_a_lost_shard(backend: Backend) {
    let f = Fixture::new(backend, 30).await;
    f.submit(1, 3).await;
    let (a, mut rx_a) = f.agent("a", 1).await;
    let shard = assigned(&mut rx_a).pop().expect("shard");
    // The first write of this completion, committed; its answer never reached the core.
    let report = write_part(&f.output(), &shard, 3);
    let first = crate::store::CompletionRecord {
        workload_uid: "u1".into(),
        namespace: "team-a".into(),
        shard: shard.index,
        attempt: shard.attempt,
        agent: "a".into(),
        records: 3,
        output_uri: report.output_uri.clone(),
        sha256: report.sha256.clone(),
        price: 1_000,
        device: "cpu".into(),
        compute_seconds: 0.1,
    };
    assert_eq!(
        f.core.store().complete(&first).await.expect("first write"),
        crate::store::ChargeOutcome::Charged
    );
    // The core writes it again.
    f.report(&a, report).await.expect("completed");
    assert!(refusals(&mut rx_a).is_empty(), "nothing refused");
    assert_eq!(f.phase().await, WorkloadPhase::Succeeded);
    let charges = f.core.store().charges("u1").await.expect("charges");
    assert_eq!(charges.len(), 1, "charged once");
    assert!(
        f.out.path().join(outputs::part_name(shard.index)).exists(),
        "the part is committed under its final name"
    );
}

/// A claim that committed just as the store went down (its answer lost, the round failed)
/// is claimed again after the outage and refused. It is not taken for another operator's
/// for good: the sweep reads the store back, requeues the shard nobody runs, and the
/// workload finishes with each shard charged once. (Found by `tests/store_outage.rs`.)
async fn a_claim_whose_answer_was_lost_is_requeued_not_abandoned(backend: Backend) {
    let f = Fixture::new(backend, 30).await;
    f.submit(2, 3).await;
    let uid = "u1".to_string();
    // An earlier round's claim of shard 0, committed; its answer never reached the core.
    let ghost = crate::store::Claim {
        uid: uid.clone(),
        shard: 0,
        attempt: 1,
        agent: "a".into(),
    };
    assert_eq!(
        f.core.store().assign_batch(&[ghost]).await.expect("claim"),
        vec![true]
    );
    let (a, mut rx) = f.agent("a", 1).await;
    // The round claims shard 0 again and is refused.
    assert!(
        assigned(&mut rx).is_empty(),
        "the refused claim sends nothing"
    );
    f.core.sweep().await;
    let mut done = 0;
    for _ in 0..4 {
        for shard in assigned(&mut rx) {
            if shard.index == 0 {
                assert_eq!(shard.attempt, 2, "the lost claim used attempt 1");
            }
            let report = write_part(&f.output(), &shard, 1);
            f.report(&a, report).await.expect("completed");
            done += 1;
        }
        if done == 2 {
            break;
        }
        f.core.sweep().await;
    }
    assert_eq!(done, 2, "both shards ran");
    assert_eq!(f.phase().await, WorkloadPhase::Succeeded);
    let charges = f.core.store().charges(&uid).await.expect("charges");
    assert_eq!(charges.len(), 2, "each shard charged once");
}

/// A late report from an attempt whose lease expired is refused; the part committed and
/// the agent credited are those of the attempt that holds the shard.
async fn a_late_report_of_an_expired_attempt_is_never_committed(backend: Backend) {
    let f = Fixture::new(backend, 2).await;
    f.submit(1, 3).await;
    let (frozen, mut rx_f) = f.agent("frozen", 1).await;
    let old = assigned(&mut rx_f).pop().expect("shard");
    f.core
        .reap(Instant::now() + Duration::from_secs(3))
        .await
        .expect("reap");
    let (thawed_later, mut rx_n) = f.agent("next", 1).await;
    let new = assigned(&mut rx_n).pop().expect("reassigned");
    assert_eq!(new.attempt, 2);
    // The frozen agent wakes and reports on its old stream: refused, it was replaced.
    let late = write_part(&f.output(), &old, 9);
    let err = f
        .report(&frozen, late.clone())
        .await
        .expect_err("its stream is gone");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    // It reconnects and reports the old attempt again: stale.
    let (back, mut rx_b) = f.agent("frozen", 1).await;
    f.report(&back, late.clone()).await.expect("kept");
    assert_eq!(
        refusals(&mut rx_b),
        [(tonic::Code::FailedPrecondition, "stale_attempt".to_string())]
    );
    let attempt_part = |a: &pb::ShardRef| {
        f.out.path().join(format!(
            "{}/part-{:05}.a{}.jsonl",
            outputs::ATTEMPTS,
            a.index,
            a.attempt
        ))
    };
    assert!(
        !attempt_part(&old).exists(),
        "the refused, superseded attempt's part is removed"
    );
    // A report in the name of the current attempt, from an agent that does not hold it, is
    // refused and leaves the holder's part alone.
    let honest = write_part(&f.output(), &new, 4);
    f.report(&back, honest.clone()).await.expect("kept");
    assert_eq!(refusals(&mut rx_b)[0].1, "not_holder");
    assert!(
        attempt_part(&new).exists(),
        "the holder's part is untouched"
    );
    f.report(&thawed_later, honest).await.expect("complete");
    let charges = f.core.store().charges("u1").await.expect("charges");
    assert_eq!(charges.len(), 1);
    assert_eq!(charges[0].to, "agent/next");
    let part =
        std::fs::read_to_string(f.out.path().join(outputs::part_name(new.index))).expect("part");
    assert_eq!(
        part.lines().count(),
        4,
        "the committed part is the holder's"
    );
    assert!(
        !f.out.path().join(outputs::ATTEMPTS).exists(),
        "the late part was cleared"
    );
    // The old attempt runs to its end once more after the workload finished (its Assign came
    // late out of a partition) and writes its part after the clean-up: the refusal removes it.
    let again = write_part(&f.output(), &old, 9);
    assert!(attempt_part(&old).exists());
    f.report(&back, again).await.expect("kept");
    assert!(
        !attempt_part(&old).exists(),
        "a part written after the clean-up is removed when its report is refused"
    );
}

async fn a_hung_shard_is_taken_back_after_its_timeout(backend: Backend) {
    let f = Fixture::new(backend, 30).await;
    let mut spec = workload(&f.output(), 3);
    spec.shard_timeout_seconds = Some(5);
    f.core
        .submit(Submission {
            namespace: "team-a".into(),
            name: "w".into(),
            uid: "u1".into(),
            spec,
            input_size: 1024,
            input_version: None,
            input_files: None,
            credentials: None,
        })
        .await
        .expect("submit");
    let (a, mut rx) = f.agent("a", 1).await;
    let first = assigned(&mut rx).pop().expect("shard");
    assert!(
        f.core
            .reap(Instant::now() + Duration::from_secs(4))
            .await
            .expect("reap")
            .is_empty()
    );
    assert_eq!(f.events("shard.requeued").await, 0, "within the timeout");
    // The agent heartbeats (its lease holds) but never reports: past 5 s the shard is taken
    // back, the agent told to cancel it, and the next attempt dispatched.
    f.core
        .reap(Instant::now() + Duration::from_secs(6))
        .await
        .expect("reap");
    assert_eq!(f.events("shard.requeued").await, 1);
    let msgs = drain(&mut rx);
    let cancelled = msgs.iter().any(|m| {
        matches!(m, Ok(pb::OperatorMessage { msg: Some(Down::Cancel(c)) }) if c.shard.as_ref().is_some_and(|s| s.attempt == 1))
    });
    assert!(cancelled, "{msgs:?}");
    let next = msgs
        .into_iter()
        .find_map(|m| match m {
            Ok(pb::OperatorMessage {
                msg: Some(Down::Assign(x)),
            }) => x.shard,
            _ => None,
        })
        .expect("the next attempt");
    assert_eq!(next.attempt, 2);
    // The old attempt's late report is stale; the new one completes.
    f.complete(&a, &first, 1).await.expect("refused, kept");
    f.complete(&a, &next, 1).await.expect("complete");
    assert_eq!(f.phase().await, WorkloadPhase::Succeeded);
    assert_eq!(
        f.core.store().charges("u1").await.expect("charges").len(),
        1
    );
}

both!(a_hung_shard_is_taken_back_after_its_timeout);
both!(forged_reports_are_refused_and_change_nothing);
both!(a_flood_of_refused_reports_ends_that_stream_only);
both!(identity_comes_from_credentials);
both!(a_namespace_out_of_credits_gets_no_new_dispatches);
both!(a_uid_already_stored_is_never_started_over);
both!(a_stored_spec_that_no_longer_validates_fails_only_its_workload);
both!(heartbeats_reconcile_what_the_agent_runs);
both!(a_workload_left_with_a_failed_shard_fails_at_resume);
both!(finished_workloads_leave_memory);
both!(a_requeue_lost_to_a_failed_write_is_swept_up);
both!(a_requeue_whose_answer_was_lost_is_read_back);
both!(a_finish_that_failed_is_tried_again_by_the_sweep);
both!(a_failure_that_could_not_be_written_is_written_by_the_sweep);
both!(a_failure_report_whose_write_failed_is_taken_and_swept_up);
both!(an_owed_failure_is_not_overtaken_by_a_finish);
both!(a_commit_whose_answer_was_lost_is_not_taken_for_a_lost_shard);
both!(deleting_a_mesh_fails_its_workloads);
both!(a_late_report_of_an_expired_attempt_is_never_committed);
both!(a_claim_whose_answer_was_lost_is_requeued_not_abandoned);

/// Postgres goes away for a while and comes back: the operator keeps its agents attached,
/// dispatches nothing, holds the completion that arrived meanwhile, says it is not available,
/// and when the store answers again commits what it held, requeues the shard of an agent that
/// left during the outage, and finishes the workload with every shard charged once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_outage_pauses_dispatch_keeps_agents_and_loses_nothing() {
    let pg = crate::store::testing::PrivatePostgres::start().expect("a private Postgres");
    let core = Core::new(crate::store::open(&pg.admin_url()).await.expect("open"));
    core.upsert_mesh("m", mesh(30)).await.expect("mesh");
    let out = tempfile::tempdir().expect("tmp");
    let output = format!("file://{}/", out.path().display());
    core.submit(Submission {
        namespace: "team-a".into(),
        name: "w".into(),
        uid: "u1".into(),
        spec: workload(&output, 3),
        input_size: 6 * 1024,
        input_version: None,
        input_files: None,
        credentials: None,
    })
    .await
    .expect("submit");
    async fn report(core: &Core<AnyStore>, h: &AgentHandle, msg: Up) -> Result<(), Status> {
        core.handle(h, pb::AgentMessage { msg: Some(msg) }).await
    }
    let (a, mut rx_a) = attach(&core, "a", 2, &Principal::user("t")).await;
    let (b, mut rx_b) = attach(&core, "b", 1, &Principal::user("t")).await;
    let held_a = assigned(&mut rx_a);
    let held_b = assigned(&mut rx_b);
    assert_eq!((held_a.len(), held_b.len()), (2, 1));
    report(&core, &a, Up::Completed(write_part(&output, &held_a[0], 2)))
        .await
        .expect("complete before the outage");
    let before = assigned(&mut rx_a);
    assert_eq!(before.len(), 1, "the freed slot got the next shard");

    pg.stop().expect("stop Postgres");
    // A completion while the store is down: held, and the agent's stream stays up.
    report(&core, &a, Up::Completed(write_part(&output, &held_a[1], 2)))
        .await
        .expect("the report is taken, not an error that ends the stream");
    assert!(!core.store_available());
    assert_eq!(core.counters().store_available.get(), 0);
    // Heartbeats go on; nothing is dispatched into the freed slot.
    report(
        &core,
        &a,
        Up::Heartbeat(pb::Heartbeat {
            running: before.clone(),
            ..Default::default()
        }),
    )
    .await
    .expect("heartbeat");
    assert!(
        assigned(&mut rx_a).is_empty(),
        "no dispatch while the store is down"
    );
    // An agent leaves during the outage: its departure cannot be written.
    let _ = core.detach(&b, "gone during the outage").await;
    assert!(!core.recover().await, "still down");

    pg.start_again().expect("start Postgres");
    let t0 = Instant::now();
    while !core.recover().await {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the core never saw the store return"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(core.store_available());
    assert_eq!(core.counters().store_available.get(), 1);
    let charges = core.store().charges("u1").await.expect("charges");
    assert!(
        charges.iter().any(|c| c.shard == held_a[1].index),
        "the completion held during the outage was committed: {charges:?}"
    );
    // Everything left runs on a: b's shard was requeued, the rest dispatched again.
    let mut todo = before;
    let t0 = Instant::now();
    while core
        .workload("team-a/w/u1")
        .await
        .is_some_and(|w| w.phase != WorkloadPhase::Succeeded)
    {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the workload did not finish"
        );
        todo.extend(assigned(&mut rx_a));
        for s in std::mem::take(&mut todo) {
            report(&core, &a, Up::Completed(write_part(&output, &s, 2)))
                .await
                .expect("complete");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let charges = core.store().charges("u1").await.expect("charges");
    // b completed nothing: everything, its requeued shard included, was a's.
    assert!(charges.iter().all(|c| c.to == "agent/a"), "{charges:?}");
    assert!(charges.iter().any(|c| c.shard == held_b[0].index));
    let mut shards: Vec<u32> = charges.iter().map(|c| c.shard).collect();
    shards.sort_unstable();
    assert_eq!(
        shards,
        (0..6).collect::<Vec<u32>>(),
        "each shard charged once"
    );
    assert!(core.store().verify().await.expect("verify").ok());
}

/// The core as a state machine under random event sequences (assignments, honest and forged
/// completions, failures, duplicates, stale reports, disconnects, lease expiry, an operator
/// crash and resume): no shard is lost, a succeeded shard is charged exactly once and to the
/// holder of the committed attempt, attempts never exceed `maxAttempts`, and memory agrees
/// with the store after every step.
mod machine {
    use super::*;
    use proptest::prelude::*;

    #[derive(Clone, Debug)]
    enum Op {
        Attach(usize),
        Detach(usize),
        Complete(usize, usize),
        Fail(usize, usize, bool),
        Forge(usize, u32, u32),
        Duplicate(usize),
        Heartbeat(usize),
        Expire,
        Restart,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            2 => (0..3usize).prop_map(Op::Attach),
            1 => (0..3usize).prop_map(Op::Detach),
            6 => (0..3usize, 0..2usize).prop_map(|(a, k)| Op::Complete(a, k)),
            1 => (0..3usize, 0..2usize, any::<bool>()).prop_map(|(a, k, r)| Op::Fail(a, k, r)),
            2 => (0..3usize, 0..6u32, 0..4u32).prop_map(|(a, s, t)| Op::Forge(a, s, t)),
            1 => (0..3usize).prop_map(Op::Duplicate),
            1 => (0..3usize).prop_map(Op::Heartbeat),
            1 => Just(Op::Expire),
            1 => Just(Op::Restart),
        ]
    }

    const MAX_ATTEMPTS: u32 = 4;
    const SHARDS: u64 = 5;

    struct Agent {
        handle: AgentHandle,
        rx: Rx,
        held: Vec<pb::ShardRef>,
        last: Option<pb::Completed>,
    }

    struct World {
        url: String,
        out: tempfile::TempDir,
        forged: tempfile::TempDir,
        core: Core<AnyStore>,
        agents: Vec<Option<Agent>>,
        key: String,
    }

    impl World {
        fn output(&self) -> String {
            format!("file://{}/", self.out.path().display())
        }

        /// Sends one agent message; a refusal or an ended stream is an outcome the invariants
        /// must hold through, not a test failure.
        async fn send(&self, h: &AgentHandle, msg: Up) {
            let _ = self
                .core
                .handle(h, pb::AgentMessage { msg: Some(msg) })
                .await;
        }

        fn collect(&mut self) {
            for a in self.agents.iter_mut().flatten() {
                for m in drain(&mut a.rx) {
                    match m {
                        Ok(pb::OperatorMessage {
                            msg: Some(Down::Assign(x)),
                        }) => a.held.extend(x.shard),
                        Ok(pb::OperatorMessage {
                            msg: Some(Down::Cancel(c)),
                        }) => {
                            if let Some(c) = c.shard {
                                a.held.retain(|s| s.index != c.index);
                            }
                        }
                        _ => {}
                    }
                }
            }
        }

        async fn step(&mut self, op: &Op) {
            self.collect();
            let out = self.output();
            match op.clone() {
                Op::Attach(i) => {
                    if self.agents[i].is_none() {
                        let (handle, rx) =
                            attach(&self.core, &format!("a{i}"), 2, &Principal::user("t")).await;
                        self.agents[i] = Some(Agent {
                            handle,
                            rx,
                            held: Vec::new(),
                            last: None,
                        });
                    }
                }
                Op::Detach(i) => {
                    if let Some(a) = self.agents[i].take() {
                        self.core.detach(&a.handle, "gone").await.expect("detach");
                    }
                }
                Op::Complete(i, k) => {
                    if let Some(a) = self.agents[i].as_mut()
                        && k < a.held.len()
                    {
                        let shard = a.held.remove(k);
                        let msg = write_part(&out, &shard, 3);
                        a.last = Some(msg.clone());
                        let h = a.handle.clone();
                        self.send(&h, Up::Completed(msg)).await;
                    }
                }
                Op::Fail(i, k, retryable) => {
                    if let Some(a) = self.agents[i].as_mut()
                        && k < a.held.len()
                    {
                        let shard = a.held.remove(k);
                        let f = pb::Failed {
                            shard: Some(shard),
                            kind: pb::ErrorKind::Inference as i32,
                            message: "boom".into(),
                            retryable,
                        };
                        let h = a.handle.clone();
                        self.send(&h, Up::Failed(f)).await;
                    }
                }
                Op::Forge(i, index, attempt) => {
                    if let Some(a) = self.agents[i].as_ref() {
                        let shard = pb::ShardRef {
                            workload: self.key.clone(),
                            index,
                            attempt,
                        };
                        // Forged reports never write into another attempt's location.
                        let elsewhere = format!("file://{}/", self.forged.path().display());
                        let mut msg = write_part(&elsewhere, &shard, 2);
                        msg.output_uri = outputs::attempt_uri(&out, index, attempt);
                        let h = a.handle.clone();
                        self.send(&h, Up::Completed(msg)).await;
                    }
                }
                Op::Duplicate(i) => {
                    if let Some(a) = self.agents[i].as_ref()
                        && let Some(last) = a.last.clone()
                    {
                        let h = a.handle.clone();
                        self.send(&h, Up::Completed(last)).await;
                    }
                }
                Op::Heartbeat(i) => {
                    if let Some(a) = self.agents[i].as_ref() {
                        let hb = pb::Heartbeat {
                            running: a.held.clone(),
                            ..Default::default()
                        };
                        let h = a.handle.clone();
                        self.send(&h, Up::Heartbeat(hb)).await;
                    }
                }
                Op::Expire => {
                    self.core
                        .reap(Instant::now() + Duration::from_secs(60))
                        .await
                        .expect("reap");
                    for a in &mut self.agents {
                        *a = None;
                    }
                }
                Op::Restart => {
                    let core = Core::new(crate::store::open(&self.url).await.expect("reopen"));
                    core.upsert_mesh("m", mesh(30)).await.expect("mesh");
                    core.resume().await.expect("resume");
                    self.core = core;
                    for a in &mut self.agents {
                        *a = None;
                    }
                }
            }
            self.collect();
        }

        /// Memory and store agree; attempts are bounded; charges match succeeded shards.
        async fn check(&self) {
            let uid = "u1";
            let stored = self
                .core
                .store()
                .workloads_in_phase("Running")
                .await
                .expect("stored");
            let charges = self.core.store().charges(uid).await.expect("charges");
            {
                let inner = self.core.lock();
                let st = &inner.machine;
                if let Some(w) = st.workloads.get(uid)
                    && w.admitted
                    && !w.finishing
                    && !w.phase.is_terminal()
                {
                    let sw = stored
                        .iter()
                        .find(|s| s.record.uid == uid)
                        .expect("stored while live");
                    let done = w
                        .shards
                        .iter()
                        .filter(|s| s.status == ShardStatus::Succeeded)
                        .count();
                    assert_eq!(w.succeeded, done, "the succeeded count follows the shards");
                    for (m, s) in w.shards.iter().zip(&sw.shards) {
                        assert!(m.attempt <= MAX_ATTEMPTS, "attempt {} > max", m.attempt);
                        assert_eq!(m.attempt, s.attempt, "shard {} attempt", s.index);
                        let agrees = match &m.status {
                            ShardStatus::Pending | ShardStatus::Backoff { .. } => {
                                s.state == "pending"
                            }
                            ShardStatus::Running { agent, .. }
                            | ShardStatus::Committing { agent } => {
                                s.state == "running" && s.agent.as_deref() == Some(agent.as_str())
                            }
                            ShardStatus::Succeeded => s.state == "succeeded",
                            ShardStatus::Failed => s.state == "failed",
                            ShardStatus::Elsewhere => true,
                        };
                        assert!(
                            agrees,
                            "shard {}: memory {:?}, store {} {:?}",
                            s.index, m.status, s.state, s.agent
                        );
                    }
                }
            }
            let mut seen = std::collections::HashSet::new();
            for c in &charges {
                assert!(seen.insert(c.shard), "shard {} charged twice", c.shard);
                assert!(c.amount >= 0);
            }
            if let Some(sw) = stored.iter().find(|s| s.record.uid == uid) {
                for s in &sw.shards {
                    let charged = charges.iter().find(|c| c.shard == s.index);
                    match (s.state.as_str(), charged) {
                        ("succeeded", Some(c)) => assert_eq!(
                            Some(c.to.trim_start_matches("agent/")),
                            s.agent.as_deref(),
                            "shard {} charged to the holder of the committed attempt",
                            s.index
                        ),
                        ("succeeded", None) => panic!("shard {} succeeded uncharged", s.index),
                        (_, Some(_)) => panic!("shard {} charged but {}", s.index, s.state),
                        _ => {}
                    }
                }
            }
            assert!(self.core.store().verify().await.expect("verify").ok());
        }
    }

    async fn run(ops: Vec<Op>) {
        let url = Backend::Sqlite.fresh_url().await;
        let out = tempfile::tempdir().expect("tmp");
        let core = Core::new(crate::store::open(&url).await.expect("open"));
        core.upsert_mesh("m", mesh(30)).await.expect("mesh");
        let spec = workload(&format!("file://{}/", out.path().display()), MAX_ATTEMPTS);
        let key = core
            .submit(Submission {
                namespace: "team-a".into(),
                name: "w".into(),
                uid: "u1".into(),
                spec,
                input_size: SHARDS * 1024,
                input_version: None,
                input_files: None,
                credentials: None,
            })
            .await
            .expect("submit");
        let forged = tempfile::tempdir().expect("tmp");
        let mut world = World {
            url,
            out,
            forged,
            core,
            agents: vec![None, None, None],
            key,
        };
        for op in &ops {
            world.step(op).await;
            world.check().await;
        }
        // Then an honest agent finishes what is left: nothing was lost.
        world.step(&Op::Restart).await;
        let (h, mut rx) = attach(&world.core, "closer", 5, &Principal::user("t")).await;
        for _ in 0..(SHARDS * u64::from(MAX_ATTEMPTS)) {
            let shards = assigned(&mut rx);
            if shards.is_empty() {
                break;
            }
            for s in shards {
                world
                    .core
                    .handle(
                        &h,
                        pb::AgentMessage {
                            msg: Some(Up::Completed(write_part(&world.output(), &s, 3))),
                        },
                    )
                    .await
                    .expect("complete");
            }
        }
        let s = world.core.workloads().await;
        let phase = s.first().map(|s| s.phase);
        let stored = world
            .core
            .store()
            .workload_phase("u1")
            .await
            .expect("phase");
        let charges = world.core.store().charges("u1").await.expect("charges");
        match stored.as_deref() {
            Some("Succeeded") => {
                assert_eq!(charges.len() as u64, SHARDS, "every shard charged once");
                let manifest: serde_json::Value = serde_json::from_slice(
                    &std::fs::read(world.out.path().join("_SUCCESS.json")).expect("manifest"),
                )
                .expect("json");
                let parts: Vec<outputs::ManifestPart> =
                    serde_json::from_value(manifest["parts"].clone()).expect("parts");
                let problems = outputs::verify_outputs(&world.output(), &parts).await;
                assert!(problems.is_empty(), "{problems:?}");
            }
            Some("Failed") => {
                let failed = count_events(&world.core, "shard.failed").await;
                assert!(failed >= 1, "a failed workload names its failed shard");
            }
            other => panic!("the workload did not end: {other:?} / {phase:?}"),
        }
        assert!(world.core.store().verify().await.expect("verify").ok());
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]
        #[test]
        fn random_event_sequences_keep_the_invariants(ops in proptest::collection::vec(op(), 1..40)) {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(run(ops));
        }
    }
}

/// A `Failed` report of `shard` from its agent.
fn failure(shard: &pb::ShardRef, retryable: bool, message: &str) -> pb::AgentMessage {
    pb::AgentMessage {
        msg: Some(Up::Failed(pb::Failed {
            shard: Some(shard.clone()),
            kind: if retryable {
                pb::ErrorKind::Io as i32
            } else {
                pb::ErrorKind::InvalidInput as i32
            },
            message: message.into(),
            retryable,
        })),
    }
}

/// (index, attempt) of assignments, by index.
fn by_index(mut shards: Vec<pb::ShardRef>) -> Vec<(u32, u32)> {
    shards.sort_by_key(|s| s.index);
    shards.iter().map(|s| (s.index, s.attempt)).collect()
}

/// What finished a workload at `out`: its manifest's parts, checked against the files.
async fn manifest_parts(out: &std::path::Path, output: &str) -> Vec<outputs::ManifestPart> {
    let manifest = std::fs::read_to_string(out.join(outputs::MANIFEST)).expect("manifest");
    let manifest: serde_json::Value = serde_json::from_str(&manifest).expect("json");
    let parts: Vec<outputs::ManifestPart> =
        serde_json::from_value(manifest["parts"].clone()).expect("parts");
    let problems = outputs::verify_outputs(output, &parts).await;
    assert!(problems.is_empty(), "{problems:?}");
    parts
}

/// A workload whose shard ran out of attempts fails; retried (its summary still held), only
/// the shards that had not succeeded run again, at attempts above every earlier one and with
/// a fresh `maxAttempts`; the succeeded shard keeps its part and its one charge, a late report
/// of the attempt cut short by the failure is refused, and the workload finishes as any other.
async fn a_retried_workload_runs_only_what_had_not_succeeded_and_finishes(backend: Backend) {
    let f = Fixture::new(backend, 30).await;
    let key = f.submit(3, 2).await;
    let (a, mut rx) = f.agent("a", 3).await;
    let mut first = assigned(&mut rx);
    first.sort_by_key(|s| s.index);
    assert_eq!(by_index(first.clone()), [(0, 1), (1, 1), (2, 1)]);
    f.complete(&a, &first[0], 5).await.expect("complete");
    let flaky = "the object store timed out";
    f.core
        .handle(&a, failure(&first[1], true, flaky))
        .await
        .expect("failed");
    let second = assigned(&mut rx);
    assert_eq!(by_index(second.clone()), [(1, 2)]);
    f.core
        .handle(&a, failure(&second[0], true, flaky))
        .await
        .expect("failed");
    let s = f.core.workload(&key).await.expect("held until released");
    assert_eq!(
        (s.phase, s.reason.as_str()),
        (WorkloadPhase::Failed, "AttemptsExhausted")
    );
    assert_eq!((s.shards_succeeded, s.shards_failed), (1, 1));
    drain(&mut rx); // the Cancel of shard 2
    let payer = crate::store::namespace_account("team-a");
    let charged_before = f.core.store().charges("u1").await.expect("charges");
    assert_eq!(
        charged_before.iter().map(|c| c.shard).collect::<Vec<_>>(),
        [0]
    );
    let balance_before = f.core.store().balance(&payer).await.expect("balance");

    // The object store is fine again: retry.
    let outcome = f.core.retry_failed(&key).await.expect("retry");
    assert_eq!(
        outcome,
        RetryOutcome::Retried {
            requeued: 2,
            failed: 1,
            kept: 1
        }
    );
    let again = {
        let mut v = assigned(&mut rx);
        v.sort_by_key(|s| s.index);
        v
    };
    assert_eq!(
        by_index(again.clone()),
        [(1, 3), (2, 2)],
        "only what had not succeeded runs, each above every attempt it had"
    );
    let s = f.core.workload(&key).await.expect("live again");
    assert_eq!(
        (s.phase, s.reason.as_str(), s.shards_succeeded, s.records),
        (WorkloadPhase::Running, "Retried", 1, 5)
    );
    assert_eq!(
        f.core.workloads().await.len(),
        1,
        "one summary, the live one"
    );
    assert_eq!(
        f.core.retry_failed(&key).await.expect("again"),
        RetryOutcome::NotFailed {
            phase: "Running".into()
        },
        "a running workload is not retried"
    );
    // A fresh series of two attempts: attempt 3 is the first of it, so a flaky failure
    // requeues the shard instead of failing it.
    f.core
        .handle(&a, failure(&again[0], true, flaky))
        .await
        .expect("failed");
    let third = assigned(&mut rx);
    assert_eq!(by_index(third.clone()), [(1, 4)]);
    // The attempt cut short by the failure reports late: stale, never charged.
    f.complete(&a, &first[2], 9).await.expect("refused, kept");
    assert_eq!(
        refusals(&mut rx),
        [(tonic::Code::FailedPrecondition, "stale_attempt".to_string())]
    );
    f.complete(&a, &again[1], 7).await.expect("complete");
    f.complete(&a, &third[0], 6).await.expect("complete");

    let s = f.core.workload(&key).await.expect("summary");
    assert_eq!((s.phase, s.records), (WorkloadPhase::Succeeded, 18));
    let store = f.core.store();
    let charges = store.charges("u1").await.expect("charges");
    assert_eq!(
        charges.iter().map(|c| c.shard).collect::<Vec<_>>(),
        [0, 1, 2],
        "every shard charged exactly once"
    );
    // The ledger shows charges for the retry's new successes only: the kept shard's charge
    // is the one it had, and the namespace paid exactly the new ones.
    let new: Vec<_> = charges
        .iter()
        .filter(|c| !charged_before.contains(c))
        .collect();
    assert_eq!(new.iter().map(|c| c.shard).collect::<Vec<_>>(), [1, 2]);
    let paid = balance_before - store.balance(&payer).await.expect("balance");
    assert_eq!(paid, new.iter().map(|c| c.amount).sum::<i64>());
    let report = store.verify().await.expect("verify");
    assert!(report.ok(), "{report:?}");
    let parts = manifest_parts(f.out.path(), &f.output()).await;
    assert_eq!(
        parts
            .iter()
            .map(|p| (p.index, p.records))
            .collect::<Vec<_>>(),
        [(0, 5), (1, 6), (2, 7)],
        "the manifest lists every part, the kept one included"
    );
    assert!(!f.out.path().join(outputs::ATTEMPTS).exists());
    let attempts: Vec<i64> = store
        .events(&EventFilter {
            workload_uid: Some("u1".into()),
            kind: Some("shard.assigned".into()),
            ..Default::default()
        })
        .await
        .expect("events")
        .iter()
        .filter(|e| e.shard == Some(1))
        .filter_map(|e| e.attempt)
        .collect();
    assert_eq!(attempts, [1, 2, 3, 4], "no attempt number is used twice");
    for (kind, n) in [
        ("workload.failed", 1),
        ("workload.retried", 1),
        ("workload.succeeded", 1),
    ] {
        assert_eq!(f.events(kind).await, n, "{kind}");
    }
    assert_eq!(
        f.core.retry_failed(&key).await.expect("done"),
        RetryOutcome::NotFailed {
            phase: "Succeeded".into()
        }
    );
}

/// A shard's bad input fails its workload for good; once the cause is fixed (a healthy
/// agent), a retry of the failed workload, released from memory after its final status, runs
/// the failed shard again and the workload succeeds. Refusals change nothing.
async fn a_released_failed_workload_is_retried_once_its_cause_is_fixed(backend: Backend) {
    let f = Fixture::new(backend, 30).await;
    let key = f.submit(2, 3).await;
    let (broken, mut rx_a) = f.agent("broken", 2).await;
    let got = {
        let mut v = assigned(&mut rx_a);
        v.sort_by_key(|s| s.index);
        v
    };
    assert_eq!(by_index(got.clone()), [(0, 1), (1, 1)]);
    assert_eq!(
        f.core.retry_failed(&key).await.expect("running"),
        RetryOutcome::NotFailed {
            phase: "Running".into()
        }
    );
    f.complete(&broken, &got[0], 3).await.expect("complete");
    f.core
        .handle(
            &broken,
            failure(&got[1], false, "shard 1 line 2: not valid JSON"),
        )
        .await
        .expect("failed");
    assert_eq!(f.phase().await, WorkloadPhase::Failed);
    f.core.release(&key);
    assert!(f.core.workload(&key).await.is_none());
    f.core
        .detach(&broken, "the agent was replaced")
        .await
        .expect("detach");
    assert_eq!(
        f.core
            .retry_failed("team-a/w-u1/no-such-uid")
            .await
            .expect("unknown"),
        RetryOutcome::Unknown
    );
    assert_eq!(
        f.events("workload.retried").await,
        0,
        "refusals log nothing"
    );
    let store = f.core.store();
    assert_eq!(
        store.workload_phase("u1").await.expect("phase").as_deref(),
        Some("Failed")
    );

    let (healthy, mut rx_b) = f.agent("healthy", 2).await;
    assert!(
        assigned(&mut rx_b).is_empty(),
        "a failed workload runs nothing"
    );
    assert_eq!(
        f.core.retry_failed(&key).await.expect("retry"),
        RetryOutcome::Retried {
            requeued: 1,
            failed: 1,
            kept: 1
        }
    );
    let again = assigned(&mut rx_b);
    assert_eq!(by_index(again.clone()), [(1, 2)]);
    f.complete(&healthy, &again[0], 4).await.expect("complete");
    let s = f.core.workload(&key).await.expect("summary");
    assert_eq!((s.phase, s.records), (WorkloadPhase::Succeeded, 7));
    assert_eq!(s.credits, {
        let charges = store.charges("u1").await.expect("charges");
        assert_eq!(
            charges
                .iter()
                .map(|c| (c.shard, c.to.as_str()))
                .collect::<Vec<_>>(),
            [(0, "agent/broken"), (1, "agent/healthy")],
            "the kept shard is not charged again"
        );
        charges.iter().map(|c| c.amount).sum::<i64>()
    });
    assert!(store.verify().await.expect("verify").ok());
    assert_eq!(
        store.workload_phase("u1").await.expect("phase").as_deref(),
        Some("Succeeded")
    );
    let parts = manifest_parts(f.out.path(), &f.output()).await;
    assert_eq!(
        parts
            .iter()
            .map(|p| (p.index, p.records))
            .collect::<Vec<_>>(),
        [(0, 3), (1, 4)]
    );
}

both!(a_retried_workload_runs_only_what_had_not_succeeded_and_finishes);
both!(a_released_failed_workload_is_retried_once_its_cause_is_fixed);

/// Submits `spec` as workload `u1` (`shards` shards of 1 KiB) to `core`.
async fn submit_spec(core: &Core<AnyStore>, spec: WorkloadSpec, shards: u64) -> String {
    core.submit(Submission {
        namespace: "team-a".into(),
        name: "w".into(),
        uid: "u1".into(),
        spec,
        input_size: shards * 1024,
        input_version: None,
        input_files: None,
        credentials: None,
    })
    .await
    .expect("submit")
}

/// A workload past its `spec.activeDeadlineSeconds` fails with `DeadlineExceeded` at the
/// next tick: its running shard is cancelled on its agent, the failure is in the event log,
/// and the completion that arrives after it is refused and never charged.
async fn a_workload_past_its_deadline_fails_and_is_charged_nothing_more(backend: Backend) {
    let f = Fixture::new(backend, 300).await;
    let mut spec = workload(&f.output(), 3);
    spec.active_deadline_seconds = Some(60);
    let key = submit_spec(&f.core, spec, 3).await;
    let (a, mut rx) = f.agent("a", 2).await;
    let mut first = assigned(&mut rx);
    first.sort_by_key(|s| s.index);
    assert_eq!(by_index(first.clone()), [(0, 1), (1, 1)]);
    f.complete(&a, &first[0], 4).await.expect("complete");
    let second = assigned(&mut rx);
    assert_eq!(by_index(second.clone()), [(2, 1)]);
    f.core
        .reap(Instant::now() + Duration::from_secs(50))
        .await
        .expect("reap");
    assert_eq!(
        f.phase().await,
        WorkloadPhase::Running,
        "within the deadline"
    );

    f.core
        .reap(Instant::now() + Duration::from_secs(61))
        .await
        .expect("reap");
    let s = f.core.workload(&key).await.expect("summary");
    assert_eq!(
        (s.phase, s.reason.as_str(), s.shards_running),
        (WorkloadPhase::Failed, "DeadlineExceeded", 0)
    );
    assert!(s.message.contains("activeDeadlineSeconds"), "{}", s.message);
    assert_eq!(f.events("workload.failed").await, 1);
    let cancelled: Vec<u32> = drain(&mut rx)
        .into_iter()
        .filter_map(|m| match m {
            Ok(pb::OperatorMessage {
                msg: Some(Down::Cancel(c)),
            }) => c.shard.map(|s| s.index),
            _ => None,
        })
        .collect();
    let mut cancelled = cancelled;
    cancelled.sort_unstable();
    assert_eq!(cancelled, [1, 2], "both running shards were cancelled");

    // The agent finishes shard 1 anyway and reports it: refused, nothing charged.
    f.complete(&a, &first[1], 4).await.expect("refused, kept");
    assert_eq!(
        refusals(&mut rx),
        [(tonic::Code::AlreadyExists, "duplicate".to_string())]
    );
    let store = f.core.store();
    let charges = store.charges("u1").await.expect("charges");
    assert_eq!(
        charges.iter().map(|c| c.shard).collect::<Vec<_>>(),
        [0],
        "only the shard done before the deadline is charged"
    );
    assert!(store.verify().await.expect("verify").ok());
    assert_eq!(
        store.workload_phase("u1").await.expect("phase").as_deref(),
        Some("Failed")
    );
}

/// An operator that takes a workload up (a restart, a take-over) goes on counting its
/// deadline from when the stored run began, not from its own start.
async fn the_deadline_survives_an_operator_restart(backend: Backend) {
    let url = backend.fresh_url().await;
    let out = tempfile::tempdir().expect("tmp");
    let mut spec = workload(&format!("file://{}/", out.path().display()), 3);
    spec.active_deadline_seconds = Some(100);
    {
        let first = Core::new(crate::store::open(&url).await.expect("open"));
        first.upsert_mesh("m", mesh(300)).await.expect("mesh");
        submit_spec(&first, spec, 2).await;
        // The operator goes away; the workload was admitted 95 s before the next one starts.
        crate::store::testing::raw_sql(
            first.store(),
            "UPDATE workloads SET created_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now', '-95 seconds')",
            "UPDATE workloads SET created_at = now() - interval '95 seconds'",
        )
        .await
        .expect("backdate");
    }
    let second = Core::new(crate::store::open(&url).await.expect("reopen"));
    second.upsert_mesh("m", mesh(300)).await.expect("mesh");
    assert_eq!(second.resume().await.expect("resume"), 1);
    second
        .reap(Instant::now() + Duration::from_secs(2))
        .await
        .expect("reap");
    assert_eq!(second.workloads().await[0].phase, WorkloadPhase::Running);
    second
        .reap(Instant::now() + Duration::from_secs(6))
        .await
        .expect("reap");
    let s = &second.workloads().await[0];
    assert_eq!(
        (s.phase, s.reason.as_str()),
        (WorkloadPhase::Failed, "DeadlineExceeded"),
        "100 s from the stored admission, not from the restart"
    );
}

/// A shard whose attempt failed waits before its next one: `spec.retryBackoffSeconds`,
/// doubled per failed attempt, counting as pending meanwhile. An attempt lost with its agent
/// is not the shard's fault: it runs again at once.
async fn a_failed_attempt_backs_off_before_its_next_and_a_lost_one_does_not(backend: Backend) {
    let f = Fixture::new(backend, 300).await;
    let mut spec = workload(&f.output(), 5);
    spec.retry_backoff_seconds = 10;
    let key = submit_spec(&f.core, spec, 1).await;
    let (a, mut rx) = f.agent("a", 1).await;
    let first = assigned(&mut rx).pop().expect("attempt 1");
    f.core
        .handle(&a, failure(&first, true, "flaky"))
        .await
        .expect("failed");
    assert!(
        assigned(&mut rx).is_empty(),
        "no attempt before the backoff"
    );
    let s = f.core.workload(&key).await.expect("summary");
    assert_eq!(
        (s.phase, s.shards_pending, s.shards_running),
        (WorkloadPhase::Running, 1, 0),
        "a backing-off shard counts as pending"
    );
    f.core
        .reap(Instant::now() + Duration::from_secs(8))
        .await
        .expect("reap");
    assert!(assigned(&mut rx).is_empty(), "10 s after the first failure");
    f.core
        .reap(Instant::now() + Duration::from_secs(11))
        .await
        .expect("reap");
    let second = assigned(&mut rx).pop().expect("attempt 2");
    assert_eq!(second.attempt, 2);

    // The second failure waits twice as long.
    f.core
        .handle(&a, failure(&second, true, "flaky"))
        .await
        .expect("failed");
    f.core
        .reap(Instant::now() + Duration::from_secs(15))
        .await
        .expect("reap");
    assert!(
        assigned(&mut rx).is_empty(),
        "20 s after the second failure"
    );
    f.core
        .reap(Instant::now() + Duration::from_secs(21))
        .await
        .expect("reap");
    let third = assigned(&mut rx).pop().expect("attempt 3");
    assert_eq!(third.attempt, 3);

    // Its agent goes away: the shard goes to the other agent at once, no backoff.
    let (b, mut rx_b) = f.agent("b", 1).await;
    f.core.detach(&a, "stream ended").await.expect("detach");
    let fourth = assigned(&mut rx_b).pop().expect("attempt 4, at once");
    assert_eq!(fourth.attempt, 4);
    f.complete(&b, &fourth, 3).await.expect("complete");
    assert_eq!(f.phase().await, WorkloadPhase::Succeeded);
    assert_eq!(
        f.core.store().charges("u1").await.expect("charges").len(),
        1
    );
}

both!(a_workload_past_its_deadline_fails_and_is_charged_nothing_more);
both!(the_deadline_survives_an_operator_restart);
both!(a_failed_attempt_backs_off_before_its_next_and_a_lost_one_does_not);
