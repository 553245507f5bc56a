//! The pure state machine under random event sequences, thousands of steps a second: a
//! virtual clock, agents that are honest, forged, stale, duplicated, silent or gone, another
//! operator that claims shards behind this one's back, store writes that fail, and operator
//! crashes rebuilt from the store. The store here is a model of the real one's
//! compare-and-set rules (the store contract tests hold both real backends to the same rules;
//! `core::tests::machine` drives the real executor on real SQLite).
//!
//! After every step: no shard is lost (each is pending, held, done or failed, in memory and in
//! the store alike), a succeeded shard is charged exactly once and to the holder of the
//! committed attempt, attempts never exceed `maxAttempts`, an agent never holds more than its
//! slots, and what memory believes agrees with the store.

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;

use super::*;
use crate::core::tests::{hello, mesh, workload};
use crate::core::validate;

const UID: &str = "u1";
const KEY: &str = "team-a/w/u1";
const SHARDS: u32 = 5;
const MAX_ATTEMPTS: u32 = 3;
const SLOTS: u32 = 2;
const AGENTS: usize = 3;
const TIMEOUT: u32 = 40;
const OUT: &str = "file:///out/";
/// The agent of another operator that claims shards behind this one's back.
const OTHER: &str = "other-operator-agent";

#[derive(Clone, Debug)]
enum Op {
    Attach(usize),
    Detach(usize),
    /// Honest completion of the agent's k-th held shard.
    Complete(usize, usize),
    /// Its completion, but the part the operator finds does not match the report.
    Mismatch(usize, usize),
    /// Its completion, but the store write fails.
    StoreDown(usize, usize),
    Fail(usize, usize, bool),
    /// A report of any shard and attempt; with absurd numbers when the flag is set.
    Forge(usize, u32, u32, bool),
    Duplicate(usize),
    /// A heartbeat, dropping the k-th held shard from the list when `Some(k)`.
    Heartbeat(usize, Option<usize>),
    /// Virtual seconds pass; leases and shard timeouts are checked.
    Tick(u64),
    /// Another operator claims a pending shard in the store.
    Steal(u32),
    /// Another operator takes a running shard over (it expired the lease it saw, and claimed
    /// the next attempt).
    Usurp(u32),
    Restart,
}

fn op() -> impl Strategy<Value = Op> {
    let a = 0..AGENTS;
    prop_oneof![
        3 => a.clone().prop_map(Op::Attach),
        1 => a.clone().prop_map(Op::Detach),
        8 => (a.clone(), 0..2usize).prop_map(|(a, k)| Op::Complete(a, k)),
        1 => (a.clone(), 0..2usize).prop_map(|(a, k)| Op::Mismatch(a, k)),
        1 => (a.clone(), 0..2usize).prop_map(|(a, k)| Op::StoreDown(a, k)),
        1 => (a.clone(), 0..2usize, any::<bool>()).prop_map(|(a, k, r)| Op::Fail(a, k, r)),
        3 => (a.clone(), 0..SHARDS + 1, 0..MAX_ATTEMPTS + 2, any::<bool>())
            .prop_map(|(a, s, t, absurd)| Op::Forge(a, s, t, absurd)),
        1 => a.clone().prop_map(Op::Duplicate),
        2 => (a, proptest::option::of(0..2usize)).prop_map(|(a, k)| Op::Heartbeat(a, k)),
        2 => prop_oneof![Just(1u64), Just(5), Just(25), Just(45)].prop_map(Op::Tick),
        1 => (0..SHARDS).prop_map(Op::Steal),
        1 => (0..SHARDS).prop_map(Op::Usurp),
        1 => Just(Op::Restart),
    ]
}

// ---- a model of the store's compare-and-set rules ------------------------------------------

#[derive(Clone, Debug, PartialEq, Eq)]
struct Row {
    state: &'static str,
    attempt: u32,
    agent: Option<String>,
    records: u64,
    sha256: String,
}

#[derive(Default)]
struct ModelStore {
    rows: Vec<Row>,
    /// shard -> (agent charged, attempt).
    charges: BTreeMap<u32, (String, u32)>,
    phase: Option<&'static str>,
    /// Requeues the store accepted since the machine was built.
    requeues: u32,
}

impl ModelStore {
    fn assign(&mut self, claims: &[Claim]) -> Vec<bool> {
        claims
            .iter()
            .map(|c| {
                let r = &mut self.rows[c.shard as usize];
                let won = r.state == "pending" && r.attempt + 1 == c.attempt;
                if won {
                    r.state = "running";
                    r.attempt = c.attempt;
                    r.agent = Some(c.agent.clone());
                }
                won
            })
            .collect()
    }

    fn requeue(&mut self, index: u32, attempt: u32, agent: Option<&str>) -> bool {
        let r = &mut self.rows[index as usize];
        let held = r.state == "running"
            && r.attempt == attempt
            && agent.is_none_or(|a| r.agent.as_deref() == Some(a));
        if held {
            r.state = "pending";
            r.agent = None;
            self.requeues += 1;
        }
        held
    }

    fn fail_shard(&mut self, index: u32, attempt: u32) -> bool {
        let r = &mut self.rows[index as usize];
        let held = r.state != "succeeded" && r.attempt == attempt;
        if held {
            r.state = "failed";
        }
        held
    }

    /// The charge and the completion, in one transaction.
    fn complete(&mut self, c: &CompletionRecord) -> bool {
        let r = &mut self.rows[c.shard as usize];
        let held = r.state == "running"
            && r.attempt == c.attempt
            && r.agent.as_deref() == Some(c.agent.as_str());
        if held {
            r.state = "succeeded";
            r.records = c.records;
            r.sha256 = c.sha256.clone();
            let before = self.charges.insert(c.shard, (c.agent.clone(), c.attempt));
            assert!(before.is_none(), "shard {} charged twice", c.shard);
        }
        held
    }
}

// ---- a synchronous executor over the model ---------------------------------------------------

struct Agent {
    handle: AgentHandle,
    held: Vec<pb::ShardRef>,
    last: Option<pb::Completed>,
}

struct World {
    m: Machine,
    store: ModelStore,
    agents: Vec<Option<Agent>>,
    /// Messages the machine sent, by agent.
    inbox: BTreeMap<String, Vec<Down>>,
    now: Instant,
    /// Completions the machine counted.
    completed: usize,
    /// Shards whose part this machine moved to its final name (every third move fails).
    moved: BTreeSet<u32>,
}

/// `n` pending shards of 100 bytes each, end to end.
pub(super) fn shard_states(n: u32) -> Vec<ShardState> {
    (0..n)
        .map(|i| {
            ShardState::new(planner::ShardRange {
                index: i,
                start: u64::from(i) * 100,
                end: u64::from(i + 1) * 100,
            })
        })
        .collect()
}

pub(super) fn new_workload(
    spec: WorkloadSpec,
    validated: Validated,
    shards: Vec<ShardState>,
    admitted: bool,
) -> NewWorkload {
    NewWorkload {
        key: KEY.into(),
        uid: UID.into(),
        namespace: "team-a".into(),
        name: "w".into(),
        spec,
        validated,
        input_size: u64::from(SHARDS) * 100,
        input_version: None,
        input_files: None,
        shards,
        admitted,
        credits: 0,
        model_drift: None,
        credentials: None,
    }
}

fn completion(shard: &pb::ShardRef, records: u64) -> pb::Completed {
    pb::Completed {
        shard: Some(shard.clone()),
        records,
        output_uri: outputs::attempt_uri(OUT, shard.index, shard.attempt),
        sha256: format!("{:064x}", shard.index * 100 + shard.attempt),
        compute_seconds: 0.5,
        device: "cpu".into(),
        output_bytes: 10 * records,
    }
}

impl World {
    fn new() -> Self {
        let now = Instant::now();
        let mut w = Self {
            m: Machine::default(),
            store: ModelStore::default(),
            agents: (0..AGENTS).map(|_| None).collect(),
            inbox: BTreeMap::new(),
            now,
            completed: 0,
            moved: BTreeSet::new(),
        };
        w.m.mesh_set("m", mesh(30), Price::default());
        let mut spec = workload(OUT, MAX_ATTEMPTS);
        spec.shard_timeout_seconds = Some(TIMEOUT);
        let validated = validate::validate(&spec).expect("valid");
        let shards = shard_states(SHARDS);
        w.store.rows = vec![
            Row {
                state: "pending",
                attempt: 0,
                agent: None,
                records: 0,
                sha256: String::new(),
            };
            SHARDS as usize
        ];
        w.store.phase = Some("Running");
        w.m.insert(new_workload(spec, validated, shards, false), now);
        w.m.admitted(UID, None, now);
        w
    }

    /// Performs effects as the real executor does: messages and counts at once, store writes
    /// in order (each answer fed back), one dispatch round at the end.
    fn run(&mut self, effects: Vec<Effect>) {
        let mut dispatch = false;
        for e in effects {
            match e {
                Effect::Send { agent, msg } => self.inbox.entry(agent).or_default().push(*msg),
                Effect::End { agent, .. } => {
                    // The stream is ended: the agent process sees its connection drop.
                    for slot in &mut self.agents {
                        if slot.as_ref().is_some_and(|a| a.handle.id == agent) {
                            *slot = None;
                        }
                    }
                }
                Effect::Count(Tally::Completed) => self.completed += 1,
                Effect::Count(_) => {}
                Effect::Requeue(order) => self.requeue_or_fail(order),
                Effect::Dispatch => dispatch = true,
            }
        }
        if dispatch {
            self.dispatch();
        }
    }

    fn dispatch(&mut self) {
        let claims = self.m.plan_round(self.now);
        if claims.is_empty() {
            return;
        }
        let won = self.store.assign(&claims);
        let effects = self.m.claims_stored(&claims, &won, self.now);
        // Orphans are requeued; no nested round (as the executor does).
        let effects = effects
            .into_iter()
            .filter(|e| !matches!(e, Effect::Dispatch))
            .collect();
        self.run(effects);
    }

    fn requeue_or_fail(&mut self, o: RequeueOrder) {
        match self
            .m
            .requeue_plan(&o.uid, o.index, o.attempt, o.agent.as_deref())
        {
            None => {}
            Some(RequeuePlan::Retry) => {
                let held = self.store.requeue(o.index, o.attempt, o.agent.as_deref());
                let effects = self.m.requeued(&o.uid, o.index, o.attempt, held, &o.reason);
                self.run(effects);
            }
            Some(RequeuePlan::Forget) => self.m.forget_attempt(&o.uid, o.index),
            Some(RequeuePlan::Exhausted) => {
                let held = self.store.fail_shard(o.index, o.attempt);
                let effects = self.m.shard_failed(&o.uid, o.index, o.attempt, held);
                self.run(effects);
                self.fail_workload(if o.attempt > 1 {
                    "AttemptsExhausted"
                } else {
                    o.fail_reason
                });
            }
        }
    }

    fn fail_workload(&mut self, reason: &str) {
        if self.m.begin_failure(UID).is_some() {
            self.store.phase = Some("Failed");
            let effects = self.m.workload_failed(UID, reason, "m", self.now);
            self.run(effects);
        }
    }

    fn maybe_finish(&mut self) {
        if let Some(plan) = self.m.begin_finish(UID) {
            // The manifest lists every part; only those whose move failed (every third shard's,
            // see `report`) or that a restart read back from the store are moved again.
            assert_eq!(
                plan.manifest["parts"].as_array().map(Vec::len),
                Some(SHARDS as usize)
            );
            let unmoved: Vec<u32> = (0..SHARDS).filter(|i| !self.moved.contains(i)).collect();
            assert_eq!(plan.parts.iter().map(|p| p.0).collect::<Vec<_>>(), unmoved);
            for (index, attempt) in &plan.parts {
                assert_eq!(
                    self.store.charges.get(index).map(|c| c.1),
                    Some(*attempt),
                    "the manifest lists the charged attempt of part {index}"
                );
            }
            self.store.phase = Some("Succeeded");
            self.m.workload_succeeded(UID, plan.message, self.now);
        }
    }

    /// Reads what the machine sent each agent: Assigns are held, Cancels dropped.
    fn collect(&mut self) {
        for a in self.agents.iter_mut().flatten() {
            for msg in self.inbox.remove(&a.handle.id).unwrap_or_default() {
                match msg {
                    Down::Assign(x) => a.held.extend(x.shard),
                    Down::Cancel(c) => {
                        if let Some(c) = c.shard {
                            a.held.retain(|s| *s != c);
                        }
                    }
                    _ => {}
                }
            }
        }
        self.inbox.clear();
    }

    fn take(&mut self, i: usize, k: usize) -> Option<(AgentHandle, pb::ShardRef)> {
        let a = self.agents[i].as_mut()?;
        (k < a.held.len()).then(|| (a.handle.clone(), a.held.remove(k)))
    }

    /// A report judged and, when accepted, its part checked (`part_ok`) and committed
    /// (`store_up`), as the executor does.
    fn report(&mut self, who: &AgentHandle, c: pb::Completed, part_ok: bool, store_up: bool) {
        let shard = c.shard.clone().expect("shard");
        let acc = match self.m.accept_completion(&who.id, &c, &shard, self.now) {
            Ok(acc) => acc,
            Err((_, refusal)) => {
                let (_, effects) = self.m.refused(&who.id, &shard, refusal);
                self.run(effects);
                return;
            }
        };
        self.dispatch();
        let order = |reason: &str, fail: &'static str| {
            Effect::Requeue(RequeueOrder {
                uid: acc.uid.clone(),
                index: acc.index,
                attempt: acc.attempt,
                agent: Some(who.id.clone()),
                reason: reason.into(),
                fail_reason: fail,
                backoff: false,
            })
        };
        if !part_ok {
            let (_, effects) = self.m.refused(&who.id, &shard, Refusal::mismatch("sha256"));
            self.run(effects);
            self.run(vec![order("mismatch", "OutputMismatch"), Effect::Dispatch]);
            return;
        }
        if !store_up {
            self.run(vec![order("store down", "StorageError"), Effect::Dispatch]);
            return;
        }
        let record = acc.charge(&who.id, &c).expect("price");
        if self.store.complete(&record) {
            let moved = record.shard % 3 != 0;
            if moved {
                self.moved.insert(record.shard);
            }
            let effects = self.m.committed(&record, moved);
            self.run(effects);
            self.maybe_finish();
        } else {
            self.m.lost_to_store(&acc.uid, acc.index, acc.attempt);
        }
    }

    fn attach(&mut self, i: usize) {
        if self.agents[i].is_some() {
            return;
        }
        let id = format!("a{i}");
        let (handle, effects) = self
            .m
            .attach(&hello(&id, SLOTS), &Principal::user("t"), self.now)
            .expect("attach");
        self.agents[i] = Some(Agent {
            handle,
            held: Vec::new(),
            last: None,
        });
        self.run(effects);
    }

    /// The operator crashed: a new machine is built from the store, as `Core::resume` does.
    fn restart(&mut self) {
        let spec = self.m.workloads.get(UID).map(|w| w.spec.clone());
        let mut m = Machine::default();
        m.mesh_set("m", mesh(30), Price::default());
        self.agents.iter_mut().for_each(|a| *a = None);
        self.inbox.clear();
        self.moved.clear();
        let Some(spec) = spec.filter(|_| self.store.phase == Some("Running")) else {
            self.m = m;
            return;
        };
        let mut exhausted = false;
        let shards = (0..SHARDS)
            .map(|i| {
                let r = &mut self.store.rows[i as usize];
                let status = match r.state {
                    "running" if r.attempt >= MAX_ATTEMPTS => {
                        r.state = "failed";
                        exhausted = true;
                        ShardStatus::Failed
                    }
                    "running" => {
                        r.state = "pending";
                        r.agent = None;
                        ShardStatus::Pending
                    }
                    "succeeded" => ShardStatus::Succeeded,
                    "failed" => {
                        exhausted = true;
                        ShardStatus::Failed
                    }
                    _ => ShardStatus::Pending,
                };
                ShardState {
                    status,
                    attempt: r.attempt,
                    records: r.records,
                    sha256: r.sha256.clone(),
                    ..ShardState::new(planner::ShardRange {
                        index: i,
                        start: u64::from(i) * 100,
                        end: u64::from(i + 1) * 100,
                    })
                }
            })
            .collect();
        let validated = validate::validate(&spec).expect("valid");
        m.insert(new_workload(spec, validated, shards, true), self.now);
        self.m = m;
        self.store.requeues = 0;
        if exhausted {
            self.fail_workload("AttemptsExhausted");
        } else {
            self.maybe_finish();
        }
        self.dispatch();
    }

    fn step(&mut self, op: &Op) {
        self.collect();
        match op.clone() {
            Op::Attach(i) => self.attach(i),
            Op::Detach(i) => {
                if let Some(a) = self.agents[i].take()
                    && let Some(orders) =
                        self.m
                            .agent_lost(&a.handle.id, Some(a.handle.session), self.now)
                {
                    let mut effects: Vec<Effect> =
                        orders.into_iter().map(Effect::Requeue).collect();
                    effects.push(Effect::Dispatch);
                    self.run(effects);
                }
            }
            Op::Complete(i, k) | Op::Mismatch(i, k) | Op::StoreDown(i, k) => {
                if let Some((h, shard)) = self.take(i, k) {
                    let c = completion(&shard, 3);
                    if let Some(a) = self.agents[i].as_mut() {
                        a.last = Some(c.clone());
                    }
                    let part_ok = !matches!(op, Op::Mismatch(..));
                    let store_up = !matches!(op, Op::StoreDown(..));
                    self.report(&h, c, part_ok, store_up);
                }
            }
            Op::Fail(i, k, retryable) => {
                if let Some((h, shard)) = self.take(i, k) {
                    match self.m.accept_failure(&h.id, &shard) {
                        Err((_, refusal)) => {
                            let (_, effects) = self.m.refused(&h.id, &shard, refusal);
                            self.run(effects);
                        }
                        Ok(uid) if retryable => self.run(vec![
                            Effect::Requeue(RequeueOrder {
                                uid,
                                index: shard.index,
                                attempt: shard.attempt,
                                agent: Some(h.id.clone()),
                                reason: "boom".into(),
                                fail_reason: "InferenceFailed",
                                backoff: false,
                            }),
                            Effect::Dispatch,
                        ]),
                        Ok(_) => {
                            let held = self.store.fail_shard(shard.index, shard.attempt);
                            let effects =
                                self.m.shard_failed(UID, shard.index, shard.attempt, held);
                            self.run(effects);
                            self.fail_workload("InferenceFailed");
                            self.dispatch();
                        }
                    }
                }
            }
            Op::Forge(i, index, attempt, absurd) => {
                if let Some(a) = self.agents[i].as_ref() {
                    let h = a.handle.clone();
                    let shard = pb::ShardRef {
                        workload: KEY.into(),
                        index,
                        attempt,
                    };
                    // A forged report of a shard the agent holds at that attempt is no forgery.
                    let honest = a.held.contains(&shard);
                    let mut c = completion(&shard, 3);
                    if absurd {
                        c.compute_seconds = 1e9;
                    }
                    let before = self.store.charges.clone();
                    self.report(&h, c, honest, true);
                    if !honest {
                        assert_eq!(before, self.store.charges, "a forged report was charged");
                    } else if let Some(a) = self.agents[i].as_mut() {
                        a.held.retain(|s| *s != shard);
                    }
                }
            }
            Op::Duplicate(i) => {
                if let Some(a) = self.agents[i].as_ref()
                    && let Some(last) = a.last.clone()
                {
                    let h = a.handle.clone();
                    let before = self.store.charges.clone();
                    self.report(&h, last, true, true);
                    assert_eq!(before, self.store.charges, "a duplicate was charged");
                }
            }
            Op::Heartbeat(i, drop) => {
                if let Some(a) = self.agents[i].as_mut() {
                    if let Some(k) = drop
                        && k < a.held.len()
                    {
                        // The agent lost that shard (its task died).
                        a.held.remove(k);
                    }
                    let hb = pb::Heartbeat {
                        running: a.held.clone(),
                        ..Default::default()
                    };
                    let id = a.handle.id.clone();
                    let effects = self.m.heartbeat(&id, &hb, self.now);
                    self.run(effects);
                }
            }
            Op::Tick(secs) => {
                self.now += Duration::from_secs(secs);
                let (lost, effects) = self.m.expire(self.now);
                self.run(effects);
                let mut later = Vec::new();
                for (id, session) in lost {
                    if let Some(orders) = self.m.agent_lost(&id, Some(session), self.now) {
                        later.extend(orders.into_iter().map(Effect::Requeue));
                    }
                }
                later.push(Effect::Dispatch);
                self.run(later);
                let effects = self.m.time_out(self.now);
                self.run(effects);
                // Agents still connected heartbeat what they hold.
                for i in 0..AGENTS {
                    self.collect();
                    self.step(&Op::Heartbeat(i, None));
                }
            }
            Op::Steal(index) => {
                let r = &mut self.store.rows[index as usize];
                if r.state == "pending" && r.attempt < MAX_ATTEMPTS {
                    r.state = "running";
                    r.attempt += 1;
                    r.agent = Some(OTHER.into());
                }
            }
            Op::Usurp(index) => {
                let r = &mut self.store.rows[index as usize];
                if r.state == "running" && r.attempt < MAX_ATTEMPTS {
                    r.attempt += 1;
                    r.agent = Some(OTHER.into());
                }
            }
            Op::Restart => self.restart(),
        }
        self.collect();
    }

    fn check(&self) {
        // Charges: once per succeeded shard, to the holder of the committed attempt.
        for (i, r) in self.store.rows.iter().enumerate() {
            assert!(
                r.attempt <= MAX_ATTEMPTS,
                "shard {i} at attempt {}",
                r.attempt
            );
            let charged = self.store.charges.get(&(i as u32));
            match (r.state, charged) {
                ("succeeded", Some((agent, attempt))) => {
                    assert_eq!(
                        Some(agent),
                        r.agent.as_ref(),
                        "shard {i} charged to its holder"
                    );
                    assert_eq!(
                        *attempt, r.attempt,
                        "shard {i} charged for its last attempt"
                    );
                }
                ("succeeded", None) => panic!("shard {i} succeeded uncharged"),
                (state, Some(_)) => panic!("shard {i} charged but {state}"),
                _ => {}
            }
        }
        assert_eq!(
            self.completed,
            self.store.charges.len(),
            "the machine counts each committed completion once"
        );
        // Memory agrees with the store while the workload lives.
        if let Some(w) = self.m.workloads.get(UID)
            && !w.finishing
        {
            assert_eq!(
                self.store.phase,
                Some("Running"),
                "live in memory, not in the store"
            );
            let done = w
                .shards
                .iter()
                .filter(|s| s.status == ShardStatus::Succeeded)
                .count();
            assert_eq!(w.succeeded, done);
            assert_eq!(
                w.retried, self.store.requeues,
                "requeues the store did not take"
            );
            for (s, r) in w.shards.iter().zip(&self.store.rows) {
                let i = s.range.index;
                if r.agent.as_deref() == Some(OTHER) {
                    // Another operator's claim: this one learns of it when its own claim or
                    // report loses, or at its next start; until then it may still believe
                    // in an older attempt of its own.
                    let stale = match &s.status {
                        ShardStatus::Pending
                        | ShardStatus::Elsewhere
                        | ShardStatus::Backoff { .. } => true,
                        ShardStatus::Running { .. } | ShardStatus::Committing { .. } => {
                            s.attempt < r.attempt
                        }
                        ShardStatus::Succeeded | ShardStatus::Failed => false,
                    };
                    assert!(
                        stale,
                        "shard {i}: memory {:?} at {}, store {r:?}",
                        s.status, s.attempt
                    );
                    continue;
                }
                assert_eq!(s.attempt, r.attempt, "shard {i} attempt");
                let agrees = match &s.status {
                    ShardStatus::Pending | ShardStatus::Backoff { .. } => r.state == "pending",
                    ShardStatus::Running { agent, .. } | ShardStatus::Committing { agent } => {
                        r.state == "running" && r.agent.as_deref() == Some(agent.as_str())
                    }
                    ShardStatus::Succeeded => r.state == "succeeded",
                    ShardStatus::Failed => r.state == "failed",
                    // Lost to another operator, whose attempt has ended since.
                    ShardStatus::Elsewhere => true,
                };
                assert!(agrees, "shard {i}: memory {:?}, store {r:?}", s.status);
            }
        } else {
            assert_ne!(
                self.store.phase,
                Some("Running"),
                "running in the store, gone from memory"
            );
        }
        // What each agent holds is what memory says it runs, within its slots.
        for a in self.m.agents.values() {
            assert!(a.running.len() as u32 <= a.slots, "{} over its slots", a.id);
            for (uid, index) in &a.running {
                let s = &self.m.workloads[uid].shards[*index as usize];
                assert!(
                    matches!(&s.status, ShardStatus::Running { agent, .. } if *agent == a.id),
                    "{} runs shard {index} which is {:?}",
                    a.id,
                    s.status
                );
            }
        }
    }

    /// An honest agent finishes what is left after a restart: the workload ends, and a
    /// success lists every shard once.
    fn close(&mut self) {
        self.step(&Op::Restart);
        self.check();
        let id = "closer".to_string();
        let (handle, effects) = self
            .m
            .attach(&hello(&id, 5), &Principal::user("t"), self.now)
            .expect("attach");
        self.run(effects);
        for _ in 0..=(SHARDS * MAX_ATTEMPTS) {
            let assigned: Vec<pb::ShardRef> = self
                .inbox
                .remove(&id)
                .unwrap_or_default()
                .into_iter()
                .filter_map(|m| match m {
                    Down::Assign(x) => x.shard,
                    _ => None,
                })
                .collect();
            if assigned.is_empty() {
                break;
            }
            for s in assigned {
                self.report(&handle, completion(&s, 3), true, true);
                self.check();
            }
        }
        assert!(self.m.workloads.is_empty(), "the workload left memory");
        // Its summary stays until released when it ended in this machine's time (one that
        // ended before the restart is only in the store, as after a real restart).
        let summary = self.m.summary(KEY);
        match self.store.phase {
            Some("Succeeded") => {
                assert_eq!(
                    self.store.charges.len() as u32,
                    SHARDS,
                    "every shard charged once"
                );
                if let Some(summary) = summary {
                    assert_eq!(summary.phase, WorkloadPhase::Succeeded);
                    assert_eq!(summary.shards_succeeded, SHARDS);
                }
            }
            Some("Failed") => {
                assert!(summary.is_none_or(|s| s.phase == WorkloadPhase::Failed));
                assert!(
                    self.store.rows.iter().any(|r| r.state == "failed")
                        || self
                            .store
                            .rows
                            .iter()
                            .any(|r| r.agent.as_deref() == Some(OTHER)),
                    "a failed workload has a failed shard"
                );
            }
            other => panic!(
                "the workload did not end: {other:?}, rows {:?}",
                self.store.rows
            ),
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2048, ..ProptestConfig::default() })]
    #[test]
    fn random_event_sequences_keep_the_invariants(ops in proptest::collection::vec(op(), 1..80)) {
        let mut world = World::new();
        world.dispatch();
        for op in &ops {
            world.step(op);
            world.check();
        }
        world.close();
    }
}

/// The machine holds no channels and does no I/O: a transition's messages come out as
/// effects, in order, for whoever performs them.
#[test]
fn messages_are_effects_in_order() {
    let mut w = World::new();
    let (_, effects) =
        w.m.attach(&hello("a0", 2), &Principal::user("t"), w.now)
            .expect("attach");
    assert!(
        matches!(&effects[0], Effect::Send { agent, msg } if agent == "a0" && matches!(**msg, Down::Welcome(_)))
    );
    assert!(matches!(effects.last(), Some(Effect::Dispatch)));
    let claims = w.m.plan_round(w.now);
    assert_eq!(claims.len(), 2, "two slots, two claims");
    assert!(claims.iter().all(|c| c.attempt == 1 && c.agent == "a0"));
    // The store lets the first claim through and gives the second to another operator.
    let effects = w.m.claims_stored(&claims, &[true, false], w.now);
    let sent: Vec<u32> = effects
        .iter()
        .filter_map(|e| match e {
            Effect::Send { msg, .. } => match &**msg {
                Down::Assign(a) => a.shard.as_ref().map(|s| s.index),
                _ => None,
            },
            _ => None,
        })
        .collect();
    assert_eq!(sent, vec![claims[0].shard]);
    assert!(
        effects
            .iter()
            .any(|e| matches!(e, Effect::Count(Tally::Dispatched)))
    );
    let lost = &w.m.workloads[UID].shards[claims[1].shard as usize];
    assert_eq!(lost.status, ShardStatus::Elsewhere);
    assert_eq!(w.m.agents["a0"].running.len(), 1);
}

/// A failed store write leaves the machine as it was: the decision transitions change
/// nothing the store has not accepted.
#[test]
fn a_refused_store_write_changes_nothing() {
    let mut w = World::new();
    w.attach(0);
    w.collect();
    let held = w.agents[0].as_ref().expect("agent").held.clone();
    assert_eq!(held.len(), 2);
    let s = &held[0];
    // The store did not hold the attempt any more (another operator requeued it).
    let effects = w.m.requeued(UID, s.index, s.attempt, false, "x");
    assert!(effects.is_empty());
    assert!(matches!(
        w.m.workloads[UID].shards[s.index as usize].status,
        ShardStatus::Running { .. }
    ));
    // A stale answer (an older attempt) changes nothing either.
    let effects = w.m.shard_failed(UID, s.index, s.attempt - 1, true);
    assert!(effects.is_empty());
    assert_eq!(w.m.workloads[UID].shards[s.index as usize].attempt, 1);
    // A completion record of an attempt the shard moved past is not applied.
    let record = CompletionRecord {
        workload_uid: UID.into(),
        namespace: "team-a".into(),
        shard: s.index,
        attempt: s.attempt + 1,
        agent: "a0".into(),
        records: 1,
        output_uri: String::new(),
        sha256: String::new(),
        price: 1,
        device: "cpu".into(),
        compute_seconds: 0.0,
    };
    assert!(w.m.committed(&record, true).is_empty());
    assert_eq!(w.m.workloads[UID].succeeded, 0);
}

/// A dispatch round looks at the queue from the first claimable shard on, and a shard that
/// goes back to the queue below that point is claimed again by the next round.
#[test]
fn a_requeued_shard_below_the_round_cursor_is_claimed_again() {
    let mut w = World::new();
    let claimed = |w: &mut World, agent: &str| -> Vec<u32> {
        w.m.attach(&hello(agent, 2), &Principal::user("t"), w.now)
            .expect("attach");
        let claims = w.m.plan_round(w.now);
        let won = vec![true; claims.len()];
        w.m.claims_stored(&claims, &won, w.now);
        let mut shards: Vec<u32> = claims.iter().map(|c| c.shard).collect();
        shards.sort_unstable();
        shards
    };
    assert_eq!(claimed(&mut w, "a0"), vec![0, 1]);
    assert_eq!(claimed(&mut w, "a1"), vec![2, 3]);
    assert_eq!(w.m.workloads[UID].claimable_from, 2);
    // Shard 0's attempt goes back to the queue (its holder's lease ran out).
    let effects = w.m.requeued(UID, 0, 1, true, "lease expired");
    assert!(!effects.is_empty());
    assert_eq!(w.m.workloads[UID].claimable_from, 0);
    assert_eq!(
        claimed(&mut w, "a2"),
        vec![0, 4],
        "shard 0 is claimed again"
    );
    assert_eq!(w.m.workloads[UID].shards[0].attempt, 2);
    // Nothing is left to claim: a round finds nothing and the cursor is past the end.
    assert!(claimed(&mut w, "a3").is_empty());
    assert_eq!(w.m.workloads[UID].claimable_from, SHARDS as usize);
}
