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

type Rx = mpsc::UnboundedReceiver<Result<pb::OperatorMessage, Status>>;

struct Fixture {
    core: Core<AnyStore>,
    out: tempfile::TempDir,
}

fn mesh(lease: u32) -> MeshSpec {
    let yaml = format!(
        "apiVersion: infermesh.dev/v1alpha1\nkind: Mesh\nmetadata: {{name: m}}\nspec:\n  leaseSeconds: {lease}\n  heartbeatSeconds: 1\n  \
         pricing: {{perCpuSecond: 1.0, perThousandRecords: 1.0}}\n"
    );
    match parse_manifests(&yaml).expect("mesh").pop() {
        Some(Manifest::Mesh(m)) => m.spec,
        _ => panic!("mesh"),
    }
}

fn workload(out: &str, max_attempts: u32) -> WorkloadSpec {
    let yaml = format!(
        "apiVersion: infermesh.dev/v1alpha1\nkind: Workload\nmetadata: {{name: w}}\nspec:\n  mesh: m\n  \
         model: {{uri: \"file:///m.onnx\", sha256: \"{}\"}}\n  task: {{tensor: {{inputs: [{{name: x}}]}}}}\n  \
         input: {{uri: \"file:///in.jsonl\"}}\n  output: {{uri: \"{out}\"}}\n  shardBytes: \"100\"\n  maxAttempts: {max_attempts}\n",
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

    /// Submits a workload of `shards` shards (100 input bytes each).
    async fn submit(&self, shards: u64, max_attempts: u32) -> String {
        let out = format!("file://{}/", self.out.path().display());
        self.core
            .submit(Submission {
                namespace: "team-a".into(),
                name: "w".into(),
                uid: "u1".into(),
                spec: workload(&out, max_attempts),
                input_size: shards * 100,
            })
            .await
            .expect("submit")
    }

    async fn agent(&self, id: &str, slots: u32) -> (AgentHandle, Rx) {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let hello = pb::Hello {
            agent_id: id.into(),
            node: format!("node-{id}"),
            mesh: "m".into(),
            version: "test".into(),
            capabilities: Some(pb::Capabilities {
                execution_providers: vec!["cpu".into()],
                slots,
                ..Default::default()
            }),
        };
        let handle = self.core.attach(hello, tx).await.expect("attach");
        match rx.recv().await {
            Some(Ok(pb::OperatorMessage {
                msg: Some(Down::Welcome(w)),
            })) => assert_eq!(w.agent_name, id),
            other => panic!("expected Welcome, got {other:?}"),
        }
        (handle, rx)
    }

    async fn complete(
        &self,
        who: &AgentHandle,
        shard: &pb::ShardRef,
        records: u64,
    ) -> Result<(), Status> {
        let msg = pb::Completed {
            shard: Some(shard.clone()),
            records,
            output_uri: format!("file:///out/part-{:05}.jsonl", shard.index),
            sha256: "s".into(),
            compute_seconds: 1.0,
            device: "cpu".into(),
            output_bytes: 10,
        };
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
        let f = EventFilter {
            kind: Some(kind.into()),
            ..Default::default()
        };
        self.core.store().events(&f).await.expect("events").len()
    }

    async fn phase(&self) -> WorkloadPhase {
        self.core.workloads().await[0].phase
    }
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

async fn first_completion_wins_and_charges_once(backend: Backend) {
    let f = Fixture::new(backend, 30).await;
    let key = f.submit(2, 3).await;
    let (a, mut rx_a) = f.agent("a", 1).await;
    let (b, mut rx_b) = f.agent("b", 1).await;
    let shard_a = assigned(&mut rx_a).pop().expect("a has a shard");
    let shard_b = assigned(&mut rx_b).pop().expect("b has a shard");
    assert_ne!(shard_a.index, shard_b.index);

    f.complete(&a, &shard_a, 10).await.expect("first");
    f.complete(&a, &shard_a, 10)
        .await
        .expect("duplicate is acknowledged");
    // b reports a's shard too (as after a requeue): acknowledged, ignored.
    f.complete(&b, &shard_a, 10)
        .await
        .expect("late completion is acknowledged");
    f.complete(&b, &shard_b, 20).await.expect("b's own");

    let charges = f.core.store().charges("u1").await.expect("charges");
    assert_eq!(charges.len(), 2, "one charge per shard: {charges:?}");
    assert_eq!(f.events("shard.duplicate").await, 2);
    let summary = &f.core.workloads().await[0];
    assert_eq!(summary.key, key);
    assert_eq!(summary.records, 30, "records counted once");
    assert_eq!(summary.phase, WorkloadPhase::Succeeded);
    // 1 cpu-second at 1 credit + 10 or 20 records at 1 credit per thousand.
    assert_eq!(summary.credits, 2 * 1_000_000 + 10_000 + 20_000);
    let manifest = std::fs::read_to_string(f.out.path().join("_SUCCESS.json")).expect("manifest");
    let manifest: serde_json::Value = serde_json::from_str(&manifest).expect("json");
    assert_eq!(manifest["records"], 30);
    assert_eq!(manifest["parts"].as_array().map(Vec::len), Some(2));
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
    let (a, _rx) = f.agent("a", 1).await;
    let empty = f
        .core
        .handle(&a, pb::AgentMessage { msg: None })
        .await
        .expect_err("empty");
    assert_eq!(empty.code(), tonic::Code::InvalidArgument);
    let unknown = pb::ShardRef {
        workload: "nope/x/y".into(),
        index: 0,
        attempt: 1,
    };
    let err = f
        .complete(&a, &unknown, 1)
        .await
        .expect_err("unknown workload");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    let out_of_range = pb::ShardRef {
        workload: "team-a/w/u1".into(),
        index: 99,
        attempt: 1,
    };
    let err = f
        .complete(&a, &out_of_range, 1)
        .await
        .expect_err("no such shard");
    assert!(err.message().contains("no shard 99"), "{}", err.message());
}

async fn an_empty_input_succeeds_at_once(backend: Backend) {
    let f = Fixture::new(backend, 30).await;
    f.submit(0, 3).await;
    assert_eq!(f.phase().await, WorkloadPhase::Succeeded);
}

both!(slots_bound_the_outstanding_assignments);
both!(first_completion_wins_and_charges_once);
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
        .grant("team-a", "m", 5_000_000, "top-up")
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
                input_size: 400,
            })
            .await
            .expect("submit");
        let (tx, mut rx) = mpsc::unbounded_channel();
        let hello = pb::Hello {
            agent_id: "a".into(),
            node: "n".into(),
            mesh: "m".into(),
            version: "t".into(),
            capabilities: Some(pb::Capabilities {
                execution_providers: vec!["cpu".into()],
                slots: 2,
                ..Default::default()
            }),
        };
        let a = first.attach(hello, tx).await.expect("attach");
        let got = assigned(&mut rx);
        assert_eq!(got.len(), 2);
        got_done = got[0].index;
        let done = pb::Completed {
            shard: Some(got[0].clone()),
            records: 7,
            device: "cpu".into(),
            ..Default::default()
        };
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
