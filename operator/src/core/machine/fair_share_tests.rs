//! Fair share across namespaces, on simulated time: the pure machine driven as the executor
//! drives it (a round, the store's answer, Assigns; completions accepted, a round, commits),
//! with agents that finish each shard after its workload's shard time. After every step no
//! namespace holds more than its `maxSlots` (running or being committed); slot-seconds are
//! integrated between events.

use std::collections::{BTreeMap, BTreeSet};

use infermesh_crds::{Manifest, parse_manifests};

use super::*;
use crate::core::tests::{hello, workload};
use crate::core::validate;

const OUT: &str = "file:///out/";

fn mesh_spec(extra: &str) -> MeshSpec {
    let yaml = format!(
        "apiVersion: infermesh.dev/v1alpha1\nkind: Mesh\nmetadata: {{name: m}}\nspec:\n  \
         leaseSeconds: 3600\n  heartbeatSeconds: 1\n{extra}"
    );
    match parse_manifests(&yaml).expect("mesh").pop() {
        Some(Manifest::Mesh(m)) => m.spec,
        _ => panic!("mesh"),
    }
}

/// A workload to submit at `at` (seconds): `shards` shards that take `secs` each.
#[derive(Clone)]
struct Job {
    uid: &'static str,
    namespace: &'static str,
    shards: u32,
    secs: u64,
    priority: i32,
    at: u64,
}

fn job(uid: &'static str, namespace: &'static str, shards: u32, secs: u64, at: u64) -> Job {
    Job {
        uid,
        namespace,
        shards,
        secs,
        priority: 0,
        at,
    }
}

struct Sim {
    m: Machine,
    start: Instant,
    now: Instant,
    jobs: BTreeMap<&'static str, Job>,
    /// Jobs not submitted yet, by time.
    to_submit: Vec<Job>,
    /// (done at, agent, shard) of each running shard.
    running: BTreeSet<(Instant, String, u32, u32, String)>,
    /// First dispatch of each workload, in seconds.
    started: BTreeMap<&'static str, f64>,
    /// Slot-seconds by namespace, counted only while every namespace in `measured` has
    /// shards waiting (pending), and the time so measured.
    slot_seconds: BTreeMap<String, f64>,
    measured_for: f64,
    measured: Vec<&'static str>,
    /// The most slots each namespace's running shards ever held.
    peak: BTreeMap<String, u32>,
    /// Waiting summaries seen after rounds.
    waits: Vec<(String, SlotWait)>,
}

impl Sim {
    fn new(mesh_extra: &str, agents: usize, slots: u32, jobs: &[Job]) -> Self {
        let now = Instant::now();
        let mut m = Machine::default();
        m.mesh_set("m", mesh_spec(mesh_extra), Price::default());
        for i in 0..agents {
            let (_, effects) = m
                .attach(
                    &hello(&format!("a{i}"), slots),
                    &Principal::user("test"),
                    now,
                )
                .expect("attach");
            drop(effects);
        }
        let mut to_submit = jobs.to_vec();
        to_submit.sort_by_key(|j| std::cmp::Reverse(j.at));
        Self {
            m,
            start: now,
            now,
            jobs: jobs.iter().map(|j| (j.uid, j.clone())).collect(),
            to_submit,
            running: BTreeSet::new(),
            started: BTreeMap::new(),
            slot_seconds: BTreeMap::new(),
            measured_for: 0.0,
            measured: Vec::new(),
            peak: BTreeMap::new(),
            waits: Vec::new(),
        }
    }

    fn secs(&self) -> f64 {
        self.now.saturating_duration_since(self.start).as_secs_f64()
    }

    fn submit(&mut self, j: &Job) {
        let mut spec = workload(OUT, 3);
        spec.priority = j.priority;
        let validated = validate::validate(&spec).expect("valid");
        let shards = super::tests::shard_states(j.shards);
        // The property test's workload, renamed: its fields follow the machine's.
        let mut new = super::tests::new_workload(spec, validated, shards, false);
        new.key = format!("{}/{}/{}", j.namespace, j.uid, j.uid);
        new.uid = j.uid.into();
        new.namespace = j.namespace.into();
        new.name = j.uid.into();
        new.input_size = u64::from(j.shards) * 100;
        self.m.insert(new, self.now);
        self.m.admitted(j.uid, None, self.now);
    }

    /// Slots each namespace's shards hold now, from the shards themselves: (running, being
    /// committed).
    fn held(&self) -> BTreeMap<String, (u32, u32)> {
        let mut held: BTreeMap<String, (u32, u32)> = BTreeMap::new();
        for w in self.m.workloads.values() {
            let h = held.entry(w.namespace.clone()).or_default();
            for s in &w.shards {
                match s.status {
                    ShardStatus::Running { .. } => h.0 += 1,
                    ShardStatus::Committing { .. } => h.1 += 1,
                    _ => {}
                }
            }
        }
        held
    }

    /// Every namespace's `maxSlots` is kept, counting the shards being committed.
    fn check_caps(&mut self) {
        let spec = &self.m.meshes["m"].spec;
        for (ns, (running, committing)) in self.held() {
            if let Some(cap) = spec.share_of(&ns).max_slots {
                assert!(
                    running + committing <= cap,
                    "namespace {ns} holds {running} + {committing} slots, over its maxSlots \
                     {cap} at {:.1}s",
                    self.secs()
                );
            }
            let peak = self.peak.entry(ns).or_default();
            *peak = (*peak).max(running);
        }
    }

    fn round(&mut self) {
        let claims = self.m.plan_round(self.now);
        let won = vec![true; claims.len()];
        let effects = self.m.claims_stored(&claims, &won, self.now);
        for e in effects {
            if let Effect::Send { agent, msg } = e
                && let Down::Assign(a) = *msg
            {
                let shard = a.shard.expect("shard");
                let uid = key_uid(&shard.workload).to_string();
                let t = self.secs();
                let j = &self.jobs[uid.as_str()];
                self.started.entry(j.uid).or_insert(t);
                let done = self.now + Duration::from_secs(j.secs);
                self.running
                    .insert((done, agent, shard.index, shard.attempt, uid));
            }
        }
        self.check_caps();
        for w in self.m.workloads.values() {
            if let Some(wait) = self.m.fair.waiting.get(&w.uid) {
                self.waits.push((w.uid.clone(), wait.clone()));
            }
        }
    }

    fn pending(&self, uid: &str) -> bool {
        self.m
            .workloads
            .get(uid)
            .is_some_and(|w| w.shards.iter().any(|s| s.status == ShardStatus::Pending))
    }

    /// Runs until `until` seconds, or until nothing is left to do.
    fn run(&mut self, until: u64) {
        let end = self.start + Duration::from_secs(until);
        self.round();
        loop {
            let next_done = self.running.first().map(|r| r.0);
            let next_submit = self
                .to_submit
                .last()
                .map(|j| self.start + Duration::from_secs(j.at));
            let Some(next) = [next_done, next_submit].into_iter().flatten().min() else {
                break;
            };
            if next > end {
                break;
            }
            // Slot-seconds of the interval up to `next`.
            let dt = next.saturating_duration_since(self.now).as_secs_f64();
            if !self.measured.is_empty() && self.measured.iter().all(|ns| self.ns_pending(ns)) {
                self.measured_for += dt;
                for (ns, (running, committing)) in self.held() {
                    let n = running + committing;
                    *self.slot_seconds.entry(ns).or_default() += dt * f64::from(n);
                }
            }
            self.now = next;
            while self
                .to_submit
                .last()
                .is_some_and(|j| self.start + Duration::from_secs(j.at) <= self.now)
            {
                let j = self.to_submit.pop().expect("a job");
                self.submit(&j);
            }
            // Completions due now: accepted (the slot is free), a round, then committed.
            let mut accepted = Vec::new();
            while let Some(r) = self.running.first().cloned() {
                if r.0 > self.now {
                    break;
                }
                self.running.remove(&r);
                let (_, agent, index, attempt, uid) = r;
                let key = self.m.workloads[&uid].key.clone();
                let shard = pb::ShardRef {
                    workload: key,
                    index,
                    attempt,
                };
                let c = pb::Completed {
                    shard: Some(shard.clone()),
                    records: 1,
                    output_uri: outputs::attempt_uri(OUT, index, attempt),
                    sha256: "a".repeat(64),
                    compute_seconds: 0.0,
                    device: "cpu".into(),
                    output_bytes: 3,
                };
                let acc = self
                    .m
                    .accept_completion(&agent, &c, &shard, self.now)
                    .unwrap_or_else(|(_, r)| panic!("refused: {}", r.message));
                accepted.push((agent, c, acc));
            }
            self.check_caps();
            self.round();
            for (agent, c, acc) in accepted {
                let record = acc.charge(&agent, &c).expect("charge");
                let _ = self.m.committed(&record, true);
                if let Some(plan) = self.m.begin_finish(&acc.uid) {
                    self.m.workload_succeeded(&acc.uid, plan.message, self.now);
                }
            }
            self.check_caps();
            self.round();
        }
    }

    fn ns_pending(&self, ns: &str) -> bool {
        self.m
            .workloads
            .values()
            .any(|w| w.namespace == ns && self.pending(&w.uid))
    }

    /// Each measured namespace's fraction of the slot-seconds used while all had work.
    fn fractions(&self) -> BTreeMap<String, f64> {
        let total: f64 = self.slot_seconds.values().sum();
        self.slot_seconds
            .iter()
            .map(|(ns, s)| (ns.clone(), s / total))
            .collect()
    }
}

/// Namespaces `a` and `b` submit at different times (b well after a has taken every slot);
/// their shards take different times. Over the period both have shards waiting, each gets
/// its weight's fraction of the slot-seconds, within 10 %.
fn shares_follow_weights(weight_a: u32, weight_b: u32) -> BTreeMap<String, f64> {
    let mesh = format!(
        "  queues: [{{namespace: a, weight: {weight_a}}}, {{namespace: b, weight: {weight_b}}}]\n"
    );
    let jobs = [
        job("a1", "a", 3000, 10, 0),
        job("b1", "b", 1000, 25, 37),
        // A second workload of a later on: the namespace's share, not the workload count,
        // decides.
        job("a2", "a", 3000, 10, 400),
    ];
    let mut sim = Sim::new(&mesh, 4, 4, &jobs);
    sim.measured = vec!["a", "b"];
    sim.run(3000);
    assert!(
        sim.measured_for > 1500.0,
        "both namespaces had work for {:.0}s only",
        sim.measured_for
    );
    let f = sim.fractions();
    let total = f64::from(weight_a + weight_b);
    for (ns, w) in [("a", weight_a), ("b", weight_b)] {
        let want = f64::from(w) / total;
        let got = f[ns];
        assert!(
            (got - want).abs() <= 0.1 * want,
            "namespace {ns}: {got:.3} of the slot-seconds, want {want:.3} ± 10 % ({f:?})"
        );
    }
    eprintln!(
        "weights {weight_a}:{weight_b}: slot-second fractions {f:?} over {:.0}s",
        sim.measured_for
    );
    f
}

#[test]
fn two_namespaces_weighted_one_to_one_share_slot_seconds_evenly() {
    shares_follow_weights(1, 1);
}

#[test]
fn two_namespaces_weighted_three_to_one_share_slot_seconds_three_to_one() {
    shares_follow_weights(3, 1);
}

#[test]
fn a_namespace_alone_with_work_borrows_every_slot() {
    let mesh = "  queues: [{namespace: a, weight: 1}, {namespace: b, weight: 9}]\n";
    let mut sim = Sim::new(mesh, 2, 4, &[job("a1", "a", 200, 10, 0)]);
    sim.run(15);
    assert_eq!(
        sim.peak.get("a"),
        Some(&8),
        "b has nothing pending: a takes all 8 slots"
    );
}

#[test]
fn a_small_workload_behind_a_huge_one_starts_within_one_shard_time() {
    for (small_ns, label) in [("a", "same namespace"), ("b", "other namespace")] {
        let jobs = [
            job("huge", "a", 100_000, 10, 0),
            job("small", small_ns, 3, 10, 23),
        ];
        let mut sim = Sim::new("", 4, 2, &jobs);
        sim.run(60);
        let started = sim.started.get("small").copied();
        assert!(
            started.is_some_and(|t| t <= 23.0 + 10.0),
            "{label}: the small workload started at {started:?}s, submitted at 23s behind 8 \
             slots of 10s shards"
        );
        // Until it started it waited, with its place in the queue.
        assert!(
            sim.waits
                .iter()
                .any(|(uid, w)| uid == "small" && w.position == Some(1)),
            "{label}: {:?}",
            sim.waits
        );
    }
}

#[test]
fn max_slots_is_never_exceeded_even_with_slots_unused() {
    let mesh = "  queues: [{namespace: a, weight: 5, maxSlots: 3}]\n";
    let jobs = [
        job("a1", "a", 400, 7, 0),
        job("a2", "a", 400, 3, 5),
        job("b1", "b", 20, 11, 13),
    ];
    let mut sim = Sim::new(mesh, 3, 3, &jobs);
    // `check_caps` asserts the cap after every step.
    sim.run(600);
    assert_eq!(sim.peak.get("a"), Some(&3), "a reached its cap, no more");
    assert!(
        sim.peak.get("b").is_some_and(|p| *p >= 6),
        "b used the slots a may not: {:?}",
        sim.peak
    );
    // While capped, a's waiting workload says why.
    assert!(
        sim.waits.iter().any(|(uid, w)| uid.starts_with('a')
            && w.position.is_none()
            && w.message == "namespace a uses 3 of its 3 slots (maxSlots on mesh m)"),
        "{:?}",
        sim.waits.iter().take(5).collect::<Vec<_>>()
    );
}

#[test]
fn aging_lets_a_low_priority_workload_run() {
    let mut high = job("high", "a", 100_000, 10, 0);
    high.priority = 1000;
    let low = job("low", "a", 5, 10, 1);
    // One point a second: `low` (priority 0) ties with `high` after 1000 s waited.
    let mut sim = Sim::new("  agingSeconds: 1\n", 2, 2, &[high.clone(), low.clone()]);
    sim.run(1100);
    let started = sim.started.get("low").copied();
    assert!(
        started.is_some_and(|t| (1001.0..=1001.0 + 10.0).contains(&t)),
        "low started at {started:?}s"
    );
    // Without aging it waits for as long as `high` has shards to run.
    let mut sim = Sim::new("  agingSeconds: 0\n", 2, 2, &[high, low]);
    sim.run(1100);
    assert_eq!(sim.started.get("low"), None);
    assert!(sim.m.fair.waiting.contains_key("low"));
}

#[test]
fn effective_priority_grows_with_waiting_and_is_bounded() {
    let p = |prio, secs, aging| effective_priority(prio, Duration::from_secs(secs), aging);
    assert_eq!(p(10, 0, 60), 10);
    assert_eq!(p(10, 600, 60), 20);
    assert_eq!(p(0, u64::MAX, 1), 1000, "bounded by the highest priority");
    assert_eq!(p(990, 3600, 1), 1000);
    assert_eq!(p(10, 10_000, 0), 10, "0: no aging");
}

#[test]
fn waiting_workloads_get_positions_by_turn_and_their_share_message() {
    // 4 slots; a (weight 3) fills them; then b and more of a's wait.
    let mesh = "  queues: [{namespace: a, weight: 3}]\n";
    let jobs = [
        job("a1", "a", 1000, 100, 0),
        job("a2", "a", 10, 100, 1),
        job("b1", "b", 10, 100, 2),
        job("b2", "b", 10, 100, 3),
    ];
    let mut sim = Sim::new(mesh, 2, 2, &jobs);
    sim.run(50);
    let wait = |uid: &str| {
        sim.m
            .summary(&format!("{}/{uid}/{uid}", &uid[..1]))
            .and_then(|s| s.waiting)
    };
    assert!(wait("a1").is_none(), "a1 runs");
    // a holds 4 of the 4 slots (its share by weight is 3): b (share in use 0) starts one;
    // then b (1/1) is still below a (4/3), then a.
    let (b1, b2, a2) = (
        wait("b1").expect("b1 waits"),
        wait("b2").expect("b2 waits"),
        wait("a2").expect("a2 waits"),
    );
    assert_eq!(
        (b1.position, b2.position, a2.position),
        (Some(1), Some(2), Some(3)),
        "{b1:?} {b2:?} {a2:?}"
    );
    assert_eq!(b1.message, "position 1 in the queue of mesh m");
    assert_eq!(
        a2.message,
        "namespace a uses 4 slots, at or over its share by weight (3 of the 4 of mesh m); \
         position 3 in the queue of mesh m"
    );
}
