//! The core's state machine: what the operator believes about meshes, workloads, shards and
//! agents, and every rule that changes it. It is pure: no store, no channels, no clock, no
//! `async`. Each transition takes an event (a message from an agent, the store's answer to a
//! write, the time) and returns the effects that follow from it — messages to agents, counts,
//! and the store writes to make next ([`Effect`]). The executor ([`super::Core`]) performs
//! them: it sends messages, and it makes each store write *before* calling the transition that
//! applies its answer, so a failed write changes nothing here.
//!
//! A change that needs the store is therefore two transitions: one that decides (for example
//! [`Machine::plan_round`], which proposes claims, or [`Machine::accept_completion`], which
//! judges a report), and one that applies what the store accepted
//! ([`Machine::claims_stored`], [`Machine::committed`]). Applying is idempotent: an answer
//! for an attempt the shard has moved past changes nothing.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use infermesh_crds::{MeshSpec, WorkloadPhase, WorkloadSpec};
use infermesh_io::{Dataset, Piece};
use infermesh_proto as pb;
use pb::operator_message::Msg as Down;
use tonic::Status;

use super::accounting::{self, Device, Refusal, Standing};
use super::lease::{self, Requeue};
use super::outputs;
use super::planner;
use super::pricing::{self, Price, format_credits};
use super::progress::{AgentSummary, SlotWait, WorkloadSummary};
use super::scheduler::{self, AgentView, Offer, Waiter};
use super::validate::MAX_PRIORITY;
use super::validate::Validated;
use super::{AgentHandle, models};
use crate::grpc::Principal;
use crate::store::{Claim, CompletionRecord};

/// Disconnected agents with nothing running are forgotten after this long.
pub const FORGET_AFTER: Duration = Duration::from_secs(15 * 60);

/// What follows from a transition, for the executor to perform in order.
#[derive(Debug)]
pub enum Effect {
    /// A message on an agent's stream (its current one).
    Send {
        /// The agent.
        agent: String,
        /// The message (boxed: an Assign is large, the other effects small).
        msg: Box<Down>,
    },
    /// End connection `session` of an agent with an error.
    End {
        /// The agent.
        agent: String,
        /// Its connection.
        session: u64,
        /// Why.
        status: Status,
    },
    /// Count a shard transition in the metrics.
    Count(Tally),
    /// Put an attempt back in the queue, or fail it when it is out of attempts: a store write,
    /// then [`Machine::requeued`] or [`Machine::shard_failed`] with the store's answer.
    Requeue(RequeueOrder),
    /// Run a dispatch round: [`Machine::plan_round`], the claims to the store, then
    /// [`Machine::claims_stored`].
    Dispatch,
}

/// A shard transition counted in the metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tally {
    /// An assignment went out.
    Dispatched,
    /// A completion was committed and charged.
    Completed,
    /// A shard failed for good.
    Failed,
    /// A shard went back to the queue.
    Requeued,
}

/// An attempt to put back in the queue (or fail when out of attempts).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequeueOrder {
    /// Workload uid.
    pub uid: String,
    /// Shard index.
    pub index: u32,
    /// The attempt given up.
    pub attempt: u32,
    /// Its holder, when known (the store write is a compare-and-set on it).
    pub agent: Option<String>,
    /// Why, for the event log.
    pub reason: String,
    /// The workload's failure reason when this was its last attempt.
    pub fail_reason: &'static str,
    /// The attempt itself failed (a retryable error, a part that does not match its report,
    /// the shard timeout): the shard waits `spec.retryBackoffSeconds`, doubled per failed
    /// attempt, before its next one ([`Machine::back_off`]). False when it was lost through
    /// no fault of its own (its agent left, a store write failed): it is dispatched again at
    /// once.
    pub backoff: bool,
}

/// What a requeue of an attempt comes to, decided by [`Machine::requeue_plan`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequeuePlan {
    /// Back to the queue: the store first.
    Retry,
    /// The workload is over: back to pending in memory only (it is never dispatched again).
    Forget,
    /// Out of attempts: fail the shard and its workload.
    Exhausted,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum ShardStatus {
    Pending,
    Running {
        agent: String,
        since: Instant,
    },
    /// The holder reported it done; the part is being checked and committed.
    Committing {
        agent: String,
    },
    /// Claimed by another operator (its store claim won).
    Elsewhere,
    /// Pending (so in the store), waiting after a failed attempt until `until` before it can
    /// be claimed again; the periodic tick makes it `Pending` when due
    /// ([`Machine::backoffs_due`]).
    Backoff {
        until: Instant,
    },
    Succeeded,
    Failed,
}

impl ShardStatus {
    fn standing(&self) -> Standing<'_> {
        match self {
            Self::Pending => Standing::Pending,
            Self::Running { agent, .. } => Standing::Running { agent },
            Self::Committing { agent } => Standing::Committing { agent },
            Self::Elsewhere | Self::Backoff { .. } => Standing::Pending,
            Self::Succeeded => Standing::Succeeded,
            Self::Failed => Standing::Failed,
        }
    }

    /// The agent holding the shard (running or being committed).
    pub(super) fn holder(&self) -> Option<&str> {
        match self {
            Self::Running { agent, .. } | Self::Committing { agent } => Some(agent),
            _ => None,
        }
    }
}

#[derive(Clone, Debug)]
pub(super) struct ShardState {
    pub(super) range: planner::ShardRange,
    pub(super) status: ShardStatus,
    /// The current attempt (the last one started). Attempt numbers only ever grow: parts,
    /// claims and charges are keyed by them.
    pub(super) attempt: u32,
    /// The attempt the shard had when its workload was retried (0 when never retried): its
    /// attempts towards `spec.maxAttempts` count from here.
    pub(super) base: u32,
    pub(super) records: u64,
    pub(super) sha256: String,
    /// The committed part is known to be at its final name (moved by this operator). A shard
    /// read back from the store is not: its part is moved again, if need be, at the finish.
    pub(super) moved: bool,
}

impl ShardState {
    /// A shard never run.
    pub(super) fn new(range: planner::ShardRange) -> Self {
        Self {
            range,
            status: ShardStatus::Pending,
            attempt: 0,
            base: 0,
            records: 0,
            sha256: String::new(),
            moved: false,
        }
    }

    /// Attempts used towards `spec.maxAttempts`: those since the last retry of its workload,
    /// counting `attempt` as the current one.
    pub(super) fn used(&self, attempt: u32) -> u32 {
        attempt.saturating_sub(self.base)
    }
}

pub(super) struct WorkloadState {
    pub(super) key: String,
    pub(super) uid: String,
    pub(super) namespace: String,
    pub(super) name: String,
    pub(super) mesh: String,
    pub(super) spec: WorkloadSpec,
    pub(super) validated: Validated,
    pub(super) input_size: u64,
    /// The input's version when it was sized: every read asks for it.
    pub(super) input_version: Option<String>,
    /// The input's files when it is not one plain JSONL object: shards are ranges over them.
    pub(super) input_files: Option<Arc<Dataset>>,
    pub(super) shards: Vec<ShardState>,
    /// No shard below this index can be claimed: a dispatch round looks from here on (it
    /// moves up as shards are claimed, and down when one goes back to the queue), so a round
    /// costs the shards it places, not every shard of the workload.
    pub(super) claimable_from: usize,
    /// Written to the store and dispatching (false while held for budget).
    pub(super) admitted: bool,
    /// A terminal write (manifest or failure) is under way.
    pub(super) finishing: bool,
    /// A failure (reason, message) decided but not yet written: its store write failed, and
    /// the sweep writes it again ([`Machine::failures_owed`]).
    pub(super) failure_owed: Option<(String, String)>,
    pub(super) phase: WorkloadPhase,
    pub(super) reason: String,
    pub(super) message: String,
    pub(super) submitted: Instant,
    pub(super) finished: Option<Instant>,
    pub(super) records: u64,
    pub(super) bytes_done: u64,
    /// Shards succeeded, so a completion checks the end without a scan of every shard.
    pub(super) succeeded: usize,
    pub(super) credits: i64,
    pub(super) retried: u32,
    /// Submission order, for listings.
    pub(super) seq: u64,
    /// When `spec.activeDeadlineSeconds` runs out (counted from admission, or from the start
    /// of the run the store holds when taken up: [`Machine::start_clock`]).
    pub(super) deadline: Option<Instant>,
    /// What the model's URI hashed to at admission when not its pinned sha256.
    pub(super) model_drift: Option<String>,
    /// Its `spec.credentials`, once handed over (in memory only): its Assigns carry them.
    pub(super) credentials: Option<infermesh_io::Credentials>,
}

/// A workload entering the machine (submitted, or resumed from the store).
pub(super) struct NewWorkload {
    pub(super) key: String,
    pub(super) uid: String,
    pub(super) namespace: String,
    pub(super) name: String,
    pub(super) spec: WorkloadSpec,
    pub(super) validated: Validated,
    pub(super) input_size: u64,
    pub(super) input_version: Option<String>,
    pub(super) input_files: Option<Arc<Dataset>>,
    pub(super) shards: Vec<ShardState>,
    /// Already in the store (resumed).
    pub(super) admitted: bool,
    pub(super) credits: i64,
    pub(super) model_drift: Option<String>,
    pub(super) credentials: Option<infermesh_io::Credentials>,
}

impl WorkloadState {
    /// Its spec names credentials that have not been handed over (taken up after a restart
    /// or a retry): it neither dispatches nor writes until they are.
    fn lacks_credentials(&self) -> bool {
        self.spec.credentials.is_some() && self.credentials.is_none()
    }

    fn model_key(&self) -> String {
        if self.validated.model.sha256.is_empty() {
            self.validated.model.uri.clone()
        } else {
            self.validated.model.sha256.clone()
        }
    }
}

pub(super) struct AgentState {
    pub(super) id: String,
    pub(super) mesh: String,
    pub(super) node: String,
    /// Who attached it (a pod in a cluster); another instance may not replace a live stream.
    pub(super) instance: Option<String>,
    pub(super) session: u64,
    pub(super) connected: bool,
    pub(super) disconnected_at: Option<Instant>,
    pub(super) unschedulable: bool,
    pub(super) slots: u32,
    pub(super) providers: Vec<String>,
    pub(super) gpus: Vec<pb::Gpu>,
    pub(super) device: Device,
    pub(super) loaded: BTreeSet<String>,
    pub(super) cached: BTreeSet<String>,
    /// (workload uid, shard) assigned and not yet reported.
    pub(super) running: BTreeSet<(String, u32)>,
    pub(super) last_heartbeat: Instant,
    pub(super) completed: u64,
    pub(super) credits: i64,
    pub(super) refusals: u32,
}

pub(super) struct MeshState {
    pub(super) spec: MeshSpec,
    pub(super) price: Price,
}

/// A completion that passed the checks needing no I/O: the shard is now `Committing`.
#[derive(Clone, Debug)]
pub(super) struct Accepted {
    pub(super) uid: String,
    pub(super) namespace: String,
    pub(super) output: String,
    /// The parts' extension (`jsonl`, `parquet`).
    pub(super) ext: &'static str,
    pub(super) index: u32,
    pub(super) attempt: u32,
    pub(super) elapsed: Duration,
    pub(super) device: Device,
    pub(super) price: Price,
}

impl Accepted {
    /// What the completion `c` of `agent` is charged, priced by the operator's clock (the
    /// agent's figure may lower it) and the device the agent registered, as the record to
    /// commit. The part must have been checked against `c` first.
    pub(super) fn charge(
        &self,
        agent: &str,
        c: &pb::Completed,
    ) -> Result<CompletionRecord, accounting::Overflow> {
        let time = accounting::charged_time(self.elapsed, c.compute_seconds);
        let device = self.device.charged(&c.device);
        let price = accounting::charge(&self.price, device, time, c.records)?;
        Ok(CompletionRecord {
            workload_uid: self.uid.clone(),
            namespace: self.namespace.clone(),
            shard: self.index,
            attempt: self.attempt,
            agent: agent.to_string(),
            records: c.records,
            output_uri: outputs::part_uri_as(&self.output, self.index, self.ext),
            sha256: c.sha256.to_ascii_lowercase(),
            price,
            device: device.as_str().into(),
            compute_seconds: time.as_secs_f64(),
        })
    }
}

/// What a workload's success writes: its parts (to commit), its manifest, its message.
pub(super) struct FinishPlan {
    pub(super) output: String,
    /// The parts' extension.
    pub(super) ext: &'static str,
    pub(super) manifest: serde_json::Value,
    /// (shard, committed attempt) of every part.
    pub(super) parts: Vec<(u32, u32)>,
    pub(super) message: String,
}

/// A refused report: the workload it named (when known) and why.
pub(super) type Verdict<T> = Result<T, (Option<String>, Refusal)>;

/// Waiting workloads numbered in each Mesh's queue per round; those further back are told
/// only that more are ahead of them.
pub(super) const QUEUE_POSITIONS: usize = 100;

/// What fair share keeps between dispatch rounds.
#[derive(Default)]
pub(super) struct FairState {
    /// Shards being committed (their holder reported them done; the store has not answered):
    /// they hold their namespace's slots until it does. Pruned at each round.
    pub(super) committing: HashSet<(String, u32)>,
    /// Why each waiting workload (admitted, shards to run, no slot) waits, by uid, as of the
    /// last round.
    pub(super) waiting: HashMap<String, SlotWait>,
}

/// The namespaces' queues of one round, by Mesh and namespace.
#[derive(Default)]
struct Shares {
    queues: Vec<scheduler::Queue>,
    index: HashMap<String, HashMap<String, usize>>,
}

impl Shares {
    /// The queue of `namespace` on `mesh` (whose spec, when known, gives its weight and cap).
    fn queue(&mut self, spec: Option<&MeshSpec>, mesh: &str, namespace: &str) -> usize {
        if let Some(&q) = self.index.get(mesh).and_then(|m| m.get(namespace)) {
            return q;
        }
        let share = spec.map(|m| m.share_of(namespace));
        self.queues.push(scheduler::Queue {
            mesh: mesh.to_string(),
            namespace: namespace.to_string(),
            weight: share.map_or(1, |s| s.weight),
            max_slots: share.and_then(|s| s.max_slots),
            held: 0,
            committing: 0,
        });
        let q = self.queues.len() - 1;
        self.index
            .entry(mesh.to_string())
            .or_default()
            .insert(namespace.to_string(), q);
        q
    }
}

/// A workload's priority raised by the time it has waited since admission: a point per
/// `aging_seconds` (the Mesh's `agingSeconds`; 0: no aging), up to the highest priority, so a
/// low-priority workload eventually ties with the highest and takes its turn.
pub(super) fn effective_priority(priority: i32, waited: Duration, aging_seconds: u32) -> i64 {
    let own = i64::from(priority);
    if aging_seconds == 0 {
        return own;
    }
    let gained = i64::try_from(waited.as_secs() / u64::from(aging_seconds)).unwrap_or(i64::MAX);
    own.max(own.saturating_add(gained).min(i64::from(MAX_PRIORITY)))
}

/// The state machine.
#[derive(Default)]
pub(super) struct Machine {
    pub(super) meshes: BTreeMap<String, MeshState>,
    /// Live workloads, by uid.
    pub(super) workloads: HashMap<String, WorkloadState>,
    /// Summaries of finished workloads not yet released, by key (with their order).
    pub(super) finished: HashMap<String, (u64, WorkloadSummary)>,
    pub(super) agents: BTreeMap<String, AgentState>,
    /// Balances of namespaces whose Mesh sets a budget, as last read plus what was charged.
    pub(super) balances: HashMap<String, i64>,
    /// What fair share keeps from one round to the next.
    pub(super) fair: FairState,
    /// The credentials of finished workloads whose spec names some (by uid, with the key),
    /// until their summary is released: a late report's part is removed with them.
    pub(super) finished_credentials: HashMap<String, (String, Option<infermesh_io::Credentials>)>,
    next_session: u64,
    next_seq: u64,
}

impl Machine {
    /// The attempt part a refused report may have left behind, when no one can ever commit
    /// it: an attempt older than its shard's current one, another attempt of a shard that
    /// succeeded, or any attempt of a workload that finished. `None` for the current attempt
    /// of a shard still to be done: its holder may yet report it, and a report forged in its
    /// name must not delete an honest part.
    pub(super) fn superseded_part(&self, uid: &str, index: u32, attempt: u32) -> Option<String> {
        if let Some(w) = self.workloads.get(uid) {
            let s = w.shards.get(index as usize)?;
            let done = s.status == ShardStatus::Succeeded;
            return (attempt < s.attempt || (done && attempt != s.attempt)).then(|| {
                outputs::attempt_uri_as(
                    &w.spec.output.uri,
                    index,
                    attempt,
                    w.validated.output_format.extension(),
                )
            });
        }
        self.finished
            .iter()
            .find(|(key, _)| key_uid(key) == uid)
            .map(|(_, (_, summary))| outputs::attempt_uri(&summary.output_uri, index, attempt))
    }
}

/// The uid in a workload key (its last segment).
pub(super) fn key_uid(key: &str) -> &str {
    key.rsplit('/').next().unwrap_or_default()
}

fn send(effects: &mut Vec<Effect>, agent: &str, msg: Down) {
    effects.push(Effect::Send {
        agent: agent.to_string(),
        msg: Box::new(msg),
    });
}

fn cancel(effects: &mut Vec<Effect>, agent: &str, shard: pb::ShardRef, reason: String) {
    send(
        effects,
        agent,
        Down::Cancel(pb::Cancel {
            shard: Some(shard),
            reason,
        }),
    );
}

impl Machine {
    // ---- reading -------------------------------------------------------------------------

    pub(super) fn budgeted(&self, mesh: &str, namespace: &str) -> bool {
        self.meshes
            .get(mesh)
            .is_some_and(|m| m.spec.budgets.iter().any(|b| b.namespace == namespace))
    }

    fn out_of_credits(&self, w: &WorkloadState) -> bool {
        self.budgeted(&w.mesh, &w.namespace)
            && self.balances.get(&w.namespace).is_some_and(|b| *b <= 0)
    }

    /// The live workload a wire key (`namespace/name/uid`) names.
    pub(super) fn live(&self, key: &str) -> Option<&WorkloadState> {
        self.workloads.get(key_uid(key)).filter(|w| w.key == key)
    }

    fn live_mut(&mut self, key: &str) -> Option<&mut WorkloadState> {
        self.workloads
            .get_mut(key_uid(key))
            .filter(|w| w.key == key)
    }

    /// Whether the machine holds a workload with this key (live, or finished and unreleased).
    pub(super) fn knows(&self, key: &str) -> bool {
        self.finished.contains_key(key) || self.live(key).is_some()
    }

    /// The current attempt of a shard (0 when unknown).
    pub(super) fn attempt_of(&self, uid: &str, index: u32) -> u32 {
        self.workloads
            .get(uid)
            .and_then(|w| w.shards.get(index as usize))
            .map(|s| s.attempt)
            .unwrap_or(0)
    }

    /// The attempts shard `index` has used towards `spec.maxAttempts` when `attempt` is its
    /// current one (attempts since its workload's last retry).
    pub(super) fn attempts_used(&self, uid: &str, index: u32, attempt: u32) -> u32 {
        self.workloads
            .get(uid)
            .and_then(|w| w.shards.get(index as usize))
            .map_or(attempt, |s| s.used(attempt))
    }

    /// Slots of a Mesh's schedulable agents now.
    pub(super) fn mesh_slots(&self, mesh: &str) -> u32 {
        self.agents
            .values()
            .filter(|a| a.connected && !a.unschedulable && a.mesh == mesh)
            .map(|a| a.slots)
            .sum()
    }

    /// A namespace's budget on a Mesh, in micro-credits (0 when it has none).
    fn budget_of(&self, mesh: &str, namespace: &str) -> i64 {
        self.meshes
            .get(mesh)
            .and_then(|m| m.spec.budgets.iter().find(|b| b.namespace == namespace))
            .and_then(|b| pricing::credits_to_micro(b.credits).ok())
            .unwrap_or(0)
    }

    /// Every workload, live and finished (until released), in the order they came.
    pub(super) fn summaries(&self) -> Vec<WorkloadSummary> {
        let mut all: Vec<(u64, WorkloadSummary)> = self
            .workloads
            .values()
            .map(|w| (w.seq, self.summary_of(w)))
            .chain(self.finished.values().cloned())
            .collect();
        all.sort_by_key(|(seq, _)| *seq);
        all.into_iter().map(|(_, s)| s).collect()
    }

    /// One workload's summary.
    pub(super) fn summary(&self, key: &str) -> Option<WorkloadSummary> {
        if let Some((_, s)) = self.finished.get(key) {
            return Some(s.clone());
        }
        self.live(key).map(|w| self.summary_of(w))
    }

    /// Every agent's summary.
    pub(super) fn agent_summaries(&self) -> Vec<AgentSummary> {
        self.agents
            .values()
            .map(|a| AgentSummary {
                id: a.id.clone(),
                mesh: a.mesh.clone(),
                node: a.node.clone(),
                connected: a.connected,
                unschedulable: a.unschedulable,
                slots: a.slots,
                running: a.running.len() as u32,
                completed: a.completed,
                credits: a.credits,
                providers: a.providers.clone(),
                gpus: a.gpus.len() as u32,
                gpu_product: a
                    .gpus
                    .first()
                    .map(|g| g.product.clone())
                    .unwrap_or_default(),
                gpu_memory: a.gpus.iter().map(|g| g.memory_bytes).min().unwrap_or(0),
                models_loaded: a.loaded.iter().cloned().collect(),
                models_cached: a.cached.iter().cloned().collect(),
                since_heartbeat: a.last_heartbeat.elapsed(),
            })
            .collect()
    }

    // ---- meshes and workloads ------------------------------------------------------------

    /// A Mesh added or changed.
    pub(super) fn mesh_set(&mut self, name: &str, spec: MeshSpec, price: Price) {
        self.meshes
            .insert(name.to_string(), MeshState { spec, price });
    }

    /// A Mesh deleted: its agents drain; returns its workloads (to fail).
    pub(super) fn mesh_removed(&mut self, name: &str) -> (Vec<String>, Vec<Effect>) {
        self.meshes.remove(name);
        let mut effects = Vec::new();
        for a in self
            .agents
            .values()
            .filter(|a| a.connected && a.mesh == name)
        {
            send(
                &mut effects,
                &a.id,
                Down::Drain(pb::Drain {
                    reason: format!("mesh {name} was deleted"),
                }),
            );
        }
        let orphans = self
            .workloads
            .values()
            .filter(|w| w.mesh == name)
            .map(|w| w.uid.clone())
            .collect();
        (orphans, effects)
    }

    /// A workload enters (submitted: held until admitted; resumed: admitted and running).
    pub(super) fn insert(&mut self, new: NewWorkload, now: Instant) {
        let seq = self.next_seq;
        self.next_seq += 1;
        let (mut records, mut bytes_done, mut succeeded) = (0u64, 0u64, 0usize);
        for s in new
            .shards
            .iter()
            .filter(|s| s.status == ShardStatus::Succeeded)
        {
            records = records.saturating_add(s.records);
            bytes_done = bytes_done.saturating_add(s.range.end - s.range.start);
            succeeded += 1;
        }
        let (phase, reason) = if new.admitted {
            (WorkloadPhase::Running, "Resumed")
        } else {
            (WorkloadPhase::Pending, "Pending")
        };
        self.workloads.insert(
            new.uid.clone(),
            WorkloadState {
                key: new.key,
                uid: new.uid,
                namespace: new.namespace,
                name: new.name,
                mesh: new.spec.mesh.clone(),
                spec: new.spec,
                validated: new.validated,
                input_size: new.input_size,
                input_version: new.input_version,
                input_files: new.input_files,
                shards: new.shards,
                claimable_from: 0,
                admitted: new.admitted,
                finishing: false,
                failure_owed: None,
                phase,
                reason: reason.into(),
                message: String::new(),
                submitted: now,
                finished: None,
                records,
                bytes_done,
                succeeded,
                credits: new.credits,
                retried: 0,
                seq,
                deadline: None,
                model_drift: new.model_drift,
                credentials: new.credentials,
            },
        );
    }

    /// Whose keys workload `uid`'s reads and writes use, live or finished: `Some(None)` the
    /// operator's own (its spec names no credentials, or it is unknown); `None` when its spec
    /// names credentials that are not held (its I/O must wait or be skipped, never fall back
    /// to the operator's own keys).
    pub(super) fn credentials_of(&self, uid: &str) -> Option<Option<infermesh_io::Credentials>> {
        if let Some(w) = self.workloads.get(uid) {
            return match (&w.spec.credentials, &w.credentials) {
                (None, _) => Some(None),
                (Some(_), Some(c)) => Some(Some(c.clone())),
                (Some(_), None) => None,
            };
        }
        match self.finished_credentials.get(uid) {
            Some((_, Some(c))) => Some(Some(c.clone())),
            Some((_, None)) => None,
            None => Some(None),
        }
    }

    /// Whether workload `uid` waits for its credentials.
    pub(super) fn lacks_credentials(&self, uid: &str) -> bool {
        self.workloads
            .get(uid)
            .is_some_and(WorkloadState::lacks_credentials)
    }

    /// Sets the credentials of the live workload `key`; returns its uid when they changed.
    pub(super) fn set_credentials(
        &mut self,
        key: &str,
        credentials: Option<infermesh_io::Credentials>,
    ) -> Option<String> {
        let w = self.workloads.values_mut().find(|w| w.key == key)?;
        if w.credentials == credentials {
            return None;
        }
        w.credentials = credentials;
        Some(w.uid.clone())
    }

    /// A live workload other than `uid` whose output overlaps `output` (its key).
    pub(super) fn output_user(&self, uid: &str, output: &str) -> Option<String> {
        self.workloads
            .values()
            .filter(|w| w.uid != uid && !w.phase.is_terminal())
            .find(|w| super::tenancy::outputs_overlap(&w.spec.output.uri, output))
            .map(|w| w.key.clone())
    }

    /// A failed workload taken up again by a retry (its shards reopened in the store): it
    /// says so until something else does (a hold for budget, its end).
    pub(super) fn retried(&mut self, uid: &str, message: String) {
        if let Some(w) = self.workloads.get_mut(uid)
            && w.phase == WorkloadPhase::Running
            && w.reason == "Resumed"
        {
            w.reason = "Retried".into();
            w.message = message;
        }
    }

    /// A namespace's balance as read from the store.
    pub(super) fn balance_read(&mut self, namespace: &str, balance: i64) {
        self.balances.insert(namespace.to_string(), balance);
        if balance > 0 {
            for w in self.workloads.values_mut() {
                if w.namespace == namespace && w.admitted && w.reason == "QuotaExceeded" {
                    w.reason = "Admitted".into();
                    w.message = String::new();
                }
            }
        }
    }

    /// A workload held: its namespace has `left` credits. Returns the message, and whether
    /// this is news (it was not held for this already).
    pub(super) fn held(&mut self, uid: &str, left: i64) -> Option<(String, bool)> {
        let w = self.workloads.get(uid)?;
        let (namespace, mesh) = (w.namespace.clone(), w.mesh.clone());
        let budget = self.budget_of(&mesh, &namespace);
        self.balances.insert(namespace.clone(), left);
        let w = self.workloads.get_mut(uid)?;
        let message = quota_message(&namespace, &mesh, left, budget);
        let first = w.reason != "QuotaExceeded";
        w.reason = "QuotaExceeded".into();
        w.message = message.clone();
        Some((message, first))
    }

    /// A workload written to the store: it runs.
    pub(super) fn admitted(&mut self, uid: &str, balance: Option<i64>, now: Instant) {
        let Some(w) = self.workloads.get_mut(uid) else {
            return;
        };
        let namespace = w.namespace.clone();
        w.admitted = true;
        w.phase = WorkloadPhase::Running;
        w.reason = "Admitted".into();
        w.message = String::new();
        w.submitted = now;
        w.deadline = deadline(&w.spec, Duration::ZERO, now);
        if let Some(b) = balance {
            self.balances.insert(namespace, b);
        }
    }

    /// Pauses or resumes a workload. `None` when unknown; `Some(effects)` otherwise (a
    /// dispatch when it resumed).
    pub(super) fn suspend(&mut self, key: &str, suspend: bool) -> Option<Vec<Effect>> {
        if self.finished.contains_key(key) {
            return Some(Vec::new());
        }
        let w = self.live_mut(key)?;
        if w.spec.suspend == suspend {
            return Some(Vec::new());
        }
        w.spec.suspend = suspend;
        tracing::info!(workload = %key, suspend, "workload suspend changed");
        Some(if suspend {
            Vec::new()
        } else {
            vec![Effect::Dispatch]
        })
    }

    /// A workload cancelled (its object deleted). `None` when unknown; `Some(None)` when done
    /// here (finished, or held and never stored); `Some(Some(uid))` when the store must record
    /// its failure.
    pub(super) fn cancel(
        &mut self,
        key: &str,
        reason: &str,
        message: &str,
        now: Instant,
    ) -> Option<Option<String>> {
        if self.finished.contains_key(key) {
            return Some(None);
        }
        let w = self.live_mut(key)?;
        let uid = w.uid.clone();
        if w.admitted {
            return Some(Some(uid));
        }
        w.phase = WorkloadPhase::Failed;
        w.reason = reason.to_string();
        w.message = message.to_string();
        w.finished = Some(now);
        self.retire(&uid);
        Some(None)
    }

    /// Moves a finished workload's summary aside and drops its shards.
    fn retire(&mut self, uid: &str) {
        if let Some(w) = self.workloads.remove(uid) {
            for a in self.agents.values_mut() {
                a.running.retain(|(u, _)| u != uid);
            }
            if w.spec.credentials.is_some() {
                self.finished_credentials
                    .insert(w.uid.clone(), (w.key.clone(), w.credentials.clone()));
            }
            self.finished.insert(w.key.clone(), (w.seq, summarize(&w)));
        }
    }

    /// Forgets a finished workload's summary (its final status is written).
    pub(super) fn release(&mut self, key: &str) {
        self.finished.remove(key);
        self.finished_credentials.retain(|_, (k, _)| k != key);
    }

    // ---- agents --------------------------------------------------------------------------

    /// An agent's Hello, its identity already bound to `who`. Returns its handle and the
    /// effects: Welcome, the requeue of what its previous stream held (same instance
    /// reconnecting), a dispatch round.
    pub(super) fn attach(
        &mut self,
        hello: &pb::Hello,
        who: &Principal,
        now: Instant,
    ) -> Result<(AgentHandle, Vec<Effect>), Status> {
        let caps = hello.capabilities.clone().unwrap_or_default();
        let Some(mesh) = self.meshes.get(&hello.mesh) else {
            return Err(Status::failed_precondition(format!(
                "mesh `{}` does not exist",
                hello.mesh
            )));
        };
        let welcome = pb::Welcome {
            agent_name: hello.agent_id.clone(),
            lease_seconds: mesh.spec.lease_seconds,
            heartbeat_seconds: mesh.spec.heartbeat_seconds,
        };
        let mut replaced = BTreeSet::new();
        let mut carried = (0, 0, false);
        if let Some(old) = self.agents.get_mut(&hello.agent_id) {
            if old.connected {
                if old.instance.is_some() && old.instance != who.instance {
                    return Err(Status::already_exists(format!(
                        "agent `{}` is attached from another instance ({}); it is taken over \
                         only when that stream ends or its lease expires",
                        hello.agent_id,
                        old.instance.as_deref().unwrap_or("?")
                    )));
                }
                // The same instance reconnected: its old stream's shards go back to the queue.
                old.connected = false;
                replaced = std::mem::take(&mut old.running);
            }
            carried = (old.completed, old.credits, old.unschedulable);
        }
        self.next_session += 1;
        let session = self.next_session;
        let mut effects = Vec::new();
        send(&mut effects, &hello.agent_id, Down::Welcome(welcome));
        self.agents.insert(
            hello.agent_id.clone(),
            AgentState {
                id: hello.agent_id.clone(),
                mesh: hello.mesh.clone(),
                node: hello.node.clone(),
                instance: who.instance.clone(),
                session,
                connected: true,
                disconnected_at: None,
                unschedulable: carried.2,
                slots: caps.slots,
                providers: caps.execution_providers.clone(),
                device: Device::registered(&caps.execution_providers, caps.gpus.len()),
                gpus: caps.gpus.clone(),
                loaded: BTreeSet::new(),
                cached: caps.cached_models.iter().cloned().collect(),
                running: BTreeSet::new(),
                last_heartbeat: now,
                completed: carried.0,
                credits: carried.1,
                refusals: 0,
            },
        );
        for (uid, index) in replaced {
            effects.push(Effect::Requeue(RequeueOrder {
                attempt: self.attempt_of(&uid, index),
                uid,
                index,
                agent: Some(hello.agent_id.clone()),
                reason: "agent reconnected".into(),
                fail_reason: "AgentLost",
                backoff: false,
            }));
        }
        effects.push(Effect::Dispatch);
        Ok((
            AgentHandle {
                id: hello.agent_id.clone(),
                session,
            },
            effects,
        ))
    }

    /// Whether `who` is an agent's current, connected stream.
    pub(super) fn is_current(&self, who: &AgentHandle) -> bool {
        self.agents
            .get(&who.id)
            .is_some_and(|a| a.session == who.session && a.connected)
    }

    /// Drains (or undrains) an agent.
    pub(super) fn set_unschedulable(&mut self, agent: &str, unschedulable: bool) {
        if let Some(a) = self.agents.get_mut(agent) {
            a.unschedulable = unschedulable;
        }
    }

    /// Forgets an agent whose object is gone (only when disconnected).
    pub(super) fn forget_agent(&mut self, id: &str) {
        if self.agents.get(id).is_some_and(|a| !a.connected) {
            self.agents.remove(id);
        }
    }

    /// A Drain to every connected agent.
    pub(super) fn drain_all(&self, reason: &str) -> Vec<Effect> {
        let mut effects = Vec::new();
        for a in self.agents.values().filter(|a| a.connected) {
            send(
                &mut effects,
                &a.id,
                Down::Drain(pb::Drain {
                    reason: reason.into(),
                }),
            );
        }
        effects
    }

    /// A heartbeat: what the agent lists is reconciled with what the operator believes it
    /// runs. Attempts it no longer lists (past a grace of two heartbeats since assignment) are
    /// requeued; attempts it lists but does not hold are cancelled.
    pub(super) fn heartbeat(&mut self, id: &str, hb: &pb::Heartbeat, now: Instant) -> Vec<Effect> {
        let mut effects = Vec::new();
        let Some(a) = self.agents.get(id) else {
            return effects;
        };
        let grace = self
            .meshes
            .get(&a.mesh)
            .map(|m| Duration::from_secs(2 * u64::from(m.spec.heartbeat_seconds.max(1))))
            .unwrap_or(Duration::from_secs(10));
        let reported: HashSet<(&str, u32, u32)> = hb
            .running
            .iter()
            .map(|r| (key_uid(&r.workload), r.index, r.attempt))
            .collect();
        // What the operator believes this agent runs; what of it the agent no longer lists,
        // past the grace, it lost.
        let mut believed: HashSet<(&str, u32, u32)> = HashSet::new();
        let mut lost = Vec::new();
        for (uid, index) in &a.running {
            let Some(s) = self
                .workloads
                .get(uid)
                .and_then(|w| w.shards.get(*index as usize))
            else {
                continue;
            };
            let ShardStatus::Running { agent, since } = &s.status else {
                continue;
            };
            if agent != id {
                continue;
            }
            let held = (uid.as_str(), *index, s.attempt);
            believed.insert(held);
            if now.saturating_duration_since(*since) > grace && !reported.contains(&held) {
                lost.push((uid.clone(), *index, s.attempt));
            }
        }
        // What it runs that it should not: cancel.
        for r in hb
            .running
            .iter()
            .filter(|r| !believed.contains(&(key_uid(&r.workload), r.index, r.attempt)))
        {
            tracing::info!(agent = %id, shard = %r.display(), "agent runs a shard it does not hold: cancelled");
            cancel(
                &mut effects,
                id,
                r.clone(),
                "this agent does not hold that attempt".into(),
            );
        }
        let Some(a) = self.agents.get_mut(id) else {
            return effects;
        };
        a.last_heartbeat = now;
        a.loaded = hb.loaded_models.iter().cloned().collect();
        a.cached = hb.cached_models.iter().cloned().collect();
        if lost.is_empty() {
            return effects;
        }
        for (uid, index, attempt) in lost {
            a.running.remove(&(uid.clone(), index));
            effects.push(Effect::Requeue(RequeueOrder {
                uid,
                index,
                attempt,
                agent: Some(id.to_string()),
                reason: "the agent's heartbeat no longer lists the shard".into(),
                fail_reason: "AgentLost",
                backoff: false,
            }));
        }
        effects.push(Effect::Dispatch);
        effects
    }

    /// An agent's stream ended (or its lease expired): it is disconnected and what it held is
    /// returned, with each attempt, for requeueing. `None` when that stream is not current.
    pub(super) fn agent_lost(
        &mut self,
        id: &str,
        session: Option<u64>,
        now: Instant,
    ) -> Option<Vec<RequeueOrder>> {
        let a = self.agents.get_mut(id)?;
        if !a.connected || session.is_some_and(|s| s != a.session) {
            return None;
        }
        a.connected = false;
        a.disconnected_at = Some(now);
        let running = std::mem::take(&mut a.running);
        Some(
            running
                .into_iter()
                .map(|(uid, index)| RequeueOrder {
                    attempt: self.attempt_of(&uid, index),
                    uid,
                    index,
                    agent: Some(id.to_string()),
                    reason: String::new(),
                    fail_reason: "AgentLost",
                    backoff: false,
                })
                .collect(),
        )
    }

    /// Agents silent past their Mesh's lease at `now` (their streams are ended), after
    /// forgetting agents long gone. Returns (agent, session) of each.
    pub(super) fn expire(&mut self, now: Instant) -> (Vec<(String, u64)>, Vec<Effect>) {
        self.agents.retain(|_, a| {
            a.connected
                || !a.running.is_empty()
                || a.disconnected_at
                    .is_none_or(|t| now.saturating_duration_since(t) < FORGET_AFTER)
        });
        let mut lost = Vec::new();
        for (mesh_name, mesh) in &self.meshes {
            let lease = Duration::from_secs(u64::from(mesh.spec.lease_seconds));
            let candidates = self
                .agents
                .values()
                .filter(|a| a.connected && &a.mesh == mesh_name)
                .map(|a| (a.id.as_str(), a.last_heartbeat));
            lost.extend(
                lease::expired(now, lease, candidates)
                    .into_iter()
                    .map(|id| (id.to_string(), self.agents[id].session)),
            );
        }
        let effects = lost
            .iter()
            .map(|(id, session)| Effect::End {
                agent: id.clone(),
                session: *session,
                status: Status::deadline_exceeded("lease expired: no heartbeat"),
            })
            .collect();
        (lost, effects)
    }

    /// Running attempts older than their workload's `shardTimeoutSeconds` at `now`: taken from
    /// their agents (a Cancel each; their slots are free) and requeued.
    pub(super) fn time_out(&mut self, now: Instant) -> Vec<Effect> {
        let Self {
            workloads, agents, ..
        } = self;
        let mut effects = Vec::new();
        let mut orders = Vec::new();
        for w in workloads.values() {
            let Some(limit) = w.spec.shard_timeout_seconds else {
                continue;
            };
            for s in &w.shards {
                let ShardStatus::Running { agent, since } = &s.status else {
                    continue;
                };
                if now.saturating_duration_since(*since) <= Duration::from_secs(u64::from(limit)) {
                    continue;
                }
                let reason = format!("no report within the shard timeout of {limit}s");
                if let Some(a) = agents.get_mut(agent) {
                    a.running.remove(&(w.uid.clone(), s.range.index));
                    cancel(
                        &mut effects,
                        agent,
                        pb::ShardRef {
                            workload: w.key.clone(),
                            index: s.range.index,
                            attempt: s.attempt,
                        },
                        reason.clone(),
                    );
                }
                tracing::warn!(workload = %w.key, shard = s.range.index, attempt = s.attempt, %agent, limit, "shard timed out");
                orders.push(Effect::Requeue(RequeueOrder {
                    uid: w.uid.clone(),
                    index: s.range.index,
                    attempt: s.attempt,
                    agent: Some(agent.clone()),
                    reason,
                    fail_reason: "ShardTimeout",
                    backoff: true,
                }));
            }
        }
        if !orders.is_empty() {
            effects.extend(orders);
            effects.push(Effect::Dispatch);
        }
        effects
    }

    // ---- lifecycle: deadlines and backoff ----------------------------------------------

    /// Starts a workload's `spec.activeDeadlineSeconds` clock at `now`, the workload having
    /// run for `running_for` already: zero at admission, the time since the run the store
    /// holds began when taken up after a restart or a retry.
    pub(super) fn start_clock(&mut self, uid: &str, running_for: Duration, now: Instant) {
        if let Some(w) = self.workloads.get_mut(uid) {
            w.deadline = deadline(&w.spec, running_for, now);
        }
    }

    /// Running workloads whose `spec.activeDeadlineSeconds` has passed at `now`, each with
    /// the message of its failure (`DeadlineExceeded`), for the executor to fail. One whose
    /// terminal write is under way is left to it.
    pub(super) fn past_deadline(&self, now: Instant) -> Vec<(String, String)> {
        self.workloads
            .values()
            .filter(|w| w.admitted && !w.finishing && !w.phase.is_terminal())
            .filter(|w| w.deadline.is_some_and(|d| now >= d))
            .map(|w| {
                let limit = w.spec.active_deadline_seconds.unwrap_or_default();
                let message = format!(
                    "spec.activeDeadlineSeconds ({limit}s) passed with {} of {} shards done",
                    w.succeeded,
                    w.shards.len()
                );
                (w.uid.clone(), message)
            })
            .collect()
    }

    /// A requeue of attempt `attempt` caused by the attempt's own failure was stored: the
    /// shard waits `spec.retryBackoffSeconds × 2^(n-1)` (at most 5 minutes; `n` its attempts
    /// since the workload's last retry) before it can be claimed. Changes nothing unless the
    /// shard is pending at that attempt, or when the workload asks for no wait.
    pub(super) fn back_off(&mut self, uid: &str, index: u32, attempt: u32, now: Instant) {
        let Some(w) = self.workloads.get_mut(uid) else {
            return;
        };
        let base = w.spec.retry_backoff_seconds;
        let Some(s) = w.shards.get_mut(index as usize) else {
            return;
        };
        if base == 0 || w.phase.is_terminal() || s.attempt != attempt {
            return;
        }
        if s.status != ShardStatus::Pending {
            return;
        }
        let wait = lease::backoff(base, s.used(attempt));
        let Some(until) = now.checked_add(wait) else {
            return;
        };
        tracing::info!(workload = %w.key, shard = index, attempt, wait_s = wait.as_secs(), "shard backs off before its next attempt");
        s.status = ShardStatus::Backoff { until };
    }

    /// Shards whose backoff is over at `now` become pending again (the claim cursor lowered,
    /// as for a requeue). Returns whether any did: a dispatch round is due.
    pub(super) fn backoffs_due(&mut self, now: Instant) -> bool {
        let mut any = false;
        for w in self.workloads.values_mut() {
            let mut lowest = None;
            for s in &mut w.shards {
                if matches!(s.status, ShardStatus::Backoff { until } if until <= now) {
                    s.status = ShardStatus::Pending;
                    lowest.get_or_insert(s.range.index as usize);
                }
            }
            if let Some(first) = lowest {
                w.claimable_from = w.claimable_from.min(first);
                any = true;
            }
        }
        any
    }

    // ---- reports -------------------------------------------------------------------------

    /// Judges a report's shard: `Ok(uid)` when `who` holds the reported attempt.
    pub(super) fn judge(&self, who: &str, shard: &pb::ShardRef) -> Verdict<String> {
        let Some(w) = self.live(&shard.workload) else {
            let refusal = if self.finished.contains_key(&shard.workload) {
                Refusal {
                    code: tonic::Code::AlreadyExists,
                    reason: "duplicate",
                    message: format!("workload `{}` is already finished", shard.workload),
                }
            } else {
                Refusal::unknown(format!("no workload `{}`", shard.workload))
            };
            return Err((None, refusal));
        };
        let uid = w.uid.clone();
        let Some(s) = w.shards.get(shard.index as usize) else {
            return Err((
                Some(uid),
                Refusal::unknown(format!(
                    "workload `{}` has no shard {}",
                    shard.workload, shard.index
                )),
            ));
        };
        accounting::judge_holder(s.status.standing(), s.attempt, who, shard.attempt)
            .map_err(|r| (Some(uid.clone()), r))?;
        Ok(uid)
    }

    /// A `Completed` from `who` at `now`: judged (holder, attempt, output location, numbers);
    /// when accepted, the agent's slot is free and the shard is `Committing` until the store
    /// answers ([`Machine::committed`], [`Machine::lost_to_store`]) or the attempt is
    /// requeued.
    pub(super) fn accept_completion(
        &mut self,
        who: &str,
        c: &pb::Completed,
        shard: &pb::ShardRef,
        now: Instant,
    ) -> Verdict<Accepted> {
        let uid = self.judge(who, shard)?;
        let w = &self.workloads[&uid];
        let s = &w.shards[shard.index as usize];
        let expected = outputs::attempt_uri_as(
            &w.spec.output.uri,
            shard.index,
            s.attempt,
            w.validated.output_format.extension(),
        );
        if c.output_uri != expected {
            return Err((
                Some(uid),
                Refusal::invalid(format!(
                    "output_uri `{}` is not the one assigned (`{expected}`)",
                    c.output_uri
                )),
            ));
        }
        let ShardStatus::Running { since, .. } = s.status else {
            unreachable!("judge_holder accepts only a running shard");
        };
        let elapsed = now.saturating_duration_since(since);
        accounting::check_completed_numbers(
            c.compute_seconds,
            c.records,
            match &w.input_files {
                None => accounting::max_records(s.range.start, s.range.end),
                Some(ds) => ds.max_records(s.range.start, s.range.end),
            },
            &c.sha256,
            elapsed,
        )
        .map_err(|r| (Some(uid.clone()), r))?;
        let accepted = Accepted {
            uid: uid.clone(),
            namespace: w.namespace.clone(),
            output: w.spec.output.uri.clone(),
            ext: w.validated.output_format.extension(),
            index: shard.index,
            attempt: s.attempt,
            elapsed,
            device: self
                .agents
                .get(who)
                .map(|a| a.device)
                .unwrap_or(Device::Cpu),
            price: self
                .meshes
                .get(&w.mesh)
                .map(|m| m.price)
                .unwrap_or_default(),
        };
        // The slot is free from now on; the shard is the holder's until committed.
        if let Some(a) = self.agents.get_mut(who) {
            a.running.remove(&(uid.clone(), shard.index));
        }
        if let Some(w) = self.workloads.get_mut(&uid) {
            w.shards[shard.index as usize].status = ShardStatus::Committing {
                agent: who.to_string(),
            };
        }
        self.fair.committing.insert((uid.clone(), shard.index));
        Ok(accepted)
    }

    /// A `Failed` from `who`: judged; when accepted the agent's slot is free.
    pub(super) fn accept_failure(&mut self, who: &str, shard: &pb::ShardRef) -> Verdict<String> {
        let uid = self.judge(who, shard)?;
        if let Some(a) = self.agents.get_mut(who) {
            a.running.remove(&(uid.clone(), shard.index));
        }
        Ok(uid)
    }

    /// A refused report: counted against the stream, answered with `Refused`. Returns the
    /// stream's refusals so far.
    pub(super) fn refused(
        &mut self,
        who: &str,
        shard: &pb::ShardRef,
        refusal: Refusal,
    ) -> (u32, Vec<Effect>) {
        let Some(a) = self.agents.get_mut(who) else {
            return (0, Vec::new());
        };
        a.refusals += 1;
        let mut effects = Vec::new();
        send(
            &mut effects,
            who,
            Down::Refused(pb::Refused {
                shard: Some(shard.clone()),
                code: i32::from(refusal.code),
                reason: refusal.reason.into(),
                message: refusal.message,
            }),
        );
        (a.refusals, effects)
    }

    /// The store committed and charged a completion. Idempotent.
    pub(super) fn committed(&mut self, c: &CompletionRecord, moved: bool) -> Vec<Effect> {
        let Self {
            workloads,
            agents,
            balances,
            ..
        } = self;
        let Some(w) = workloads.get_mut(&c.workload_uid) else {
            return Vec::new();
        };
        let Some(s) = w.shards.get_mut(c.shard as usize) else {
            return Vec::new();
        };
        if s.status == ShardStatus::Succeeded || s.attempt != c.attempt {
            return Vec::new();
        }
        s.status = ShardStatus::Succeeded;
        s.records = c.records;
        s.sha256 = c.sha256.clone();
        s.moved = moved;
        w.succeeded += 1;
        w.records = w.records.saturating_add(c.records);
        w.bytes_done = w.bytes_done.saturating_add(s.range.end - s.range.start);
        w.credits = w.credits.saturating_add(c.price);
        if let Some(b) = balances.get_mut(&w.namespace) {
            *b = b.saturating_sub(c.price);
        }
        if let Some(a) = agents.get_mut(&c.agent) {
            a.completed += 1;
            a.credits = a.credits.saturating_add(c.price);
        }
        vec![Effect::Count(Tally::Completed)]
    }

    /// The store refused a completion: it does not hold that attempt as running there
    /// (another operator took the shard).
    pub(super) fn lost_to_store(&mut self, uid: &str, index: u32, attempt: u32) {
        if let Some(s) = self
            .workloads
            .get_mut(uid)
            .and_then(|w| w.shards.get_mut(index as usize))
            && s.attempt == attempt
            && matches!(s.status, ShardStatus::Committing { .. })
        {
            s.status = ShardStatus::Elsewhere;
        }
    }

    // ---- requeues and failures -----------------------------------------------------------

    /// Attempts whose holder no longer holds them in memory (its stream ended, or its report
    /// was taken but not recorded) while store writes failed: to requeue once the store is
    /// back. The store's compare-and-set settles any that were recorded meanwhile.
    pub(super) fn orphans(&self) -> Vec<RequeueOrder> {
        self.orphans_where(true)
    }

    /// Running shards whose holder is gone or no longer holds them: what a requeue that
    /// failed (a store write that timed out) left behind while the store was not declared
    /// down. Shards being committed are left alone: their commit is under way or held.
    /// Shards of live workloads whose claim the store refused (`Elsewhere`).
    pub(super) fn elsewhere(&self) -> Vec<(String, u32)> {
        self.workloads
            .values()
            .filter(|w| !w.phase.is_terminal())
            .flat_map(|w| {
                w.shards
                    .iter()
                    .filter(|s| s.status == ShardStatus::Elsewhere)
                    .map(|s| (w.uid.clone(), s.range.index))
            })
            .collect()
    }

    /// A shard whose claim the store refused, with what the store holds for it now: memory
    /// follows the store. Pending there (at another attempt): pending here at that attempt.
    /// Running there, on an agent that does not hold it here: the claim of an earlier round
    /// whose answer was lost (the store went down as it committed), or of an operator that no
    /// longer leads — nobody will run it, so it goes back to the queue (a compare-and-set on
    /// that attempt and holder). Done or failed there: left as it is.
    pub(super) fn stored_elsewhere(
        &mut self,
        uid: &str,
        index: u32,
        state: &str,
        attempt: u32,
        agent: Option<&str>,
        now: Instant,
    ) -> Vec<Effect> {
        let Some(w) = self.workloads.get_mut(uid) else {
            return Vec::new();
        };
        let Some(s) = w.shards.get_mut(index as usize) else {
            return Vec::new();
        };
        if s.status != ShardStatus::Elsewhere || w.phase.is_terminal() {
            return Vec::new();
        }
        match state {
            "pending" => {
                s.attempt = attempt;
                s.status = ShardStatus::Pending;
                w.claimable_from = w.claimable_from.min(index as usize);
                // The sweep that reads it back ends with a dispatch round.
                Vec::new()
            }
            "running" => {
                s.attempt = attempt;
                s.status = ShardStatus::Running {
                    agent: agent.unwrap_or_default().to_string(),
                    since: now,
                };
                tracing::warn!(workload = %w.key, shard = index, attempt, agent = agent.unwrap_or_default(), "the store holds a shard no agent of this operator runs: requeued");
                vec![Effect::Requeue(RequeueOrder {
                    uid: uid.to_string(),
                    index,
                    attempt,
                    agent: agent.map(str::to_string),
                    reason: "held in the store by no agent of this operator (a claim whose answer was lost)".into(),
                    fail_reason: "AgentLost",
                    backoff: false,
                })]
            }
            _ => Vec::new(),
        }
    }

    pub(super) fn stranded(&self) -> Vec<RequeueOrder> {
        self.orphans_where(false)
    }

    fn orphans_where(&self, committing_too: bool) -> Vec<RequeueOrder> {
        let mut out = Vec::new();
        for w in self.workloads.values().filter(|w| !w.phase.is_terminal()) {
            for s in &w.shards {
                let held = match &s.status {
                    ShardStatus::Running { agent, .. } => self.agents.get(agent).is_some_and(|a| {
                        a.connected && a.running.contains(&(w.uid.clone(), s.range.index))
                    }),
                    ShardStatus::Committing { .. } if committing_too => false,
                    ShardStatus::Committing { .. } => continue,
                    _ => continue,
                };
                if !held {
                    out.push(RequeueOrder {
                        uid: w.uid.clone(),
                        index: s.range.index,
                        attempt: s.attempt,
                        agent: s.status.holder().map(str::to_string),
                        reason: "its holder's report or departure was not recorded while the store was down".into(),
                        fail_reason: "AgentLost",
                        backoff: false,
                    });
                }
            }
        }
        out
    }

    /// What a requeue of attempt `attempt` comes to; `None` when the shard is no longer at
    /// that attempt, or not held by `agent` (when given).
    pub(super) fn requeue_plan(
        &self,
        uid: &str,
        index: u32,
        attempt: u32,
        agent: Option<&str>,
    ) -> Option<RequeuePlan> {
        let w = self.workloads.get(uid)?;
        let s = w.shards.get(index as usize)?;
        let holder = s.status.holder()?;
        if agent.is_some_and(|a| a != holder) || s.attempt != attempt {
            return None;
        }
        Some(match lease::requeue(s.used(attempt), w.spec.max_attempts) {
            Requeue::Exhausted => RequeuePlan::Exhausted,
            Requeue::Retry { .. } if w.phase.is_terminal() => RequeuePlan::Forget,
            Requeue::Retry { .. } => RequeuePlan::Retry,
        })
    }

    /// The store's answer to a requeue (`held`: it still held that attempt). Idempotent.
    pub(super) fn requeued(
        &mut self,
        uid: &str,
        index: u32,
        attempt: u32,
        held: bool,
        reason: &str,
    ) -> Vec<Effect> {
        let Some(w) = self.workloads.get_mut(uid) else {
            return Vec::new();
        };
        let Some(s) = w.shards.get_mut(index as usize) else {
            return Vec::new();
        };
        if !held || s.attempt != attempt || s.status.holder().is_none() {
            return Vec::new();
        }
        s.status = ShardStatus::Pending;
        w.claimable_from = w.claimable_from.min(index as usize);
        w.retried += 1;
        tracing::info!(workload = %w.key, shard = index, attempt, %reason, "shard requeued");
        vec![Effect::Count(Tally::Requeued)]
    }

    /// The store refused to requeue an attempt that memory still holds as running: the store
    /// holds the shard otherwise. Either an earlier requeue of this very attempt committed and
    /// its answer was lost (the database went down as it answered), so the store has it
    /// pending while memory still gives it to its departed holder, or another operator took
    /// it. Memory follows the store at the next sweep ([`Machine::stored_elsewhere`]); without
    /// this the shard stayed with nobody, every later requeue was refused the same way, and
    /// the workload never ended. Returns whether the shard was marked.
    pub(super) fn requeue_refused(&mut self, uid: &str, index: u32, attempt: u32) -> bool {
        let Some(w) = self.workloads.get_mut(uid) else {
            return false;
        };
        let Some(s) = w.shards.get_mut(index as usize) else {
            return false;
        };
        if w.phase.is_terminal()
            || s.attempt != attempt
            || !matches!(s.status, ShardStatus::Running { .. })
        {
            return false;
        }
        tracing::warn!(workload = %w.key, shard = index, attempt, "the store refused to requeue a shard memory holds as running: reading it back");
        s.status = ShardStatus::Elsewhere;
        true
    }

    /// A shard of a finished workload put back to pending in memory (nothing runs it again).
    pub(super) fn forget_attempt(&mut self, uid: &str, index: u32) {
        if let Some(w) = self.workloads.get_mut(uid)
            && let Some(s) = w.shards.get_mut(index as usize)
        {
            s.status = ShardStatus::Pending;
            w.claimable_from = w.claimable_from.min(index as usize);
        }
    }

    /// The store failed a shard for good (`held`: it still held that attempt). Idempotent.
    pub(super) fn shard_failed(
        &mut self,
        uid: &str,
        index: u32,
        attempt: u32,
        held: bool,
    ) -> Vec<Effect> {
        if let Some(s) = self
            .workloads
            .get_mut(uid)
            .and_then(|w| w.shards.get_mut(index as usize))
            && held
            && s.attempt == attempt
            && s.status != ShardStatus::Succeeded
            && s.status != ShardStatus::Failed
        {
            s.status = ShardStatus::Failed;
            return vec![Effect::Count(Tally::Failed)];
        }
        Vec::new()
    }

    /// Starts a terminal write for a workload: `Some(admitted)` when it may (it is live, not
    /// terminal and no other terminal write is under way).
    pub(super) fn begin_failure(&mut self, uid: &str) -> Option<bool> {
        let w = self.workloads.get_mut(uid)?;
        if w.phase.is_terminal() || w.finishing {
            return None;
        }
        w.finishing = true;
        Some(w.admitted)
    }

    /// A terminal write failed: the workload may try again later.
    pub(super) fn abort_terminal(&mut self, uid: &str) {
        if let Some(w) = self.workloads.get_mut(uid) {
            w.finishing = false;
        }
    }

    /// A workload's failure could not be written: it is owed, and the sweep writes it again.
    pub(super) fn defer_failure(&mut self, uid: &str, reason: &str, message: &str) {
        self.abort_terminal(uid);
        if let Some(w) = self.workloads.get_mut(uid)
            && !w.phase.is_terminal()
        {
            w.failure_owed = Some((reason.to_string(), message.to_string()));
        }
    }

    /// Live workloads whose failure is owed: (uid, reason, message).
    pub(super) fn failures_owed(&self) -> Vec<(String, String, String)> {
        self.workloads
            .values()
            .filter(|w| !w.phase.is_terminal())
            .filter_map(|w| {
                let (reason, message) = w.failure_owed.clone()?;
                Some((w.uid.clone(), reason, message))
            })
            .collect()
    }

    /// The store recorded a workload's failure: its running shards are cancelled on their
    /// agents (their slots are free) and it leaves memory.
    pub(super) fn workload_failed(
        &mut self,
        uid: &str,
        reason: &str,
        message: &str,
        now: Instant,
    ) -> Vec<Effect> {
        let Self {
            workloads, agents, ..
        } = self;
        let Some(w) = workloads.get_mut(uid) else {
            return Vec::new();
        };
        w.phase = WorkloadPhase::Failed;
        w.reason = reason.to_string();
        w.message = message.to_string();
        w.finished = Some(now);
        tracing::error!(workload = %w.key, %reason, %message, "workload failed");
        let mut effects = Vec::new();
        for a in agents.values_mut() {
            let cancelled: Vec<u32> = a
                .running
                .iter()
                .filter(|(u, _)| u == uid)
                .map(|(_, i)| *i)
                .collect();
            for index in cancelled {
                a.running.remove(&(uid.to_string(), index));
                cancel(
                    &mut effects,
                    &a.id,
                    pb::ShardRef {
                        workload: w.key.clone(),
                        index,
                        attempt: w.shards[index as usize].attempt,
                    },
                    format!("workload failed: {reason}"),
                );
            }
        }
        for s in &mut w.shards {
            if s.status.holder().is_some() {
                s.status = ShardStatus::Pending;
            }
        }
        w.claimable_from = 0;
        self.retire(uid);
        effects
    }

    /// When every shard of an admitted workload succeeded and no terminal write is under way:
    /// starts its success and returns what to write (the executor stamps the manifest's
    /// `completedAt`).
    pub(super) fn begin_finish(&mut self, uid: &str) -> Option<FinishPlan> {
        let w = self.workloads.get_mut(uid)?;
        // A workload whose failure is owed fails (a deadline passed as its last shards came).
        if !w.admitted
            || w.finishing
            || w.failure_owed.is_some()
            || w.phase.is_terminal()
            || w.succeeded < w.shards.len()
        {
            return None;
        }
        w.finishing = true;
        let output = w.spec.output.uri.clone();
        let ext = w.validated.output_format.extension();
        let parts: Vec<outputs::ManifestPart> = w
            .shards
            .iter()
            .map(|s| outputs::ManifestPart {
                index: s.range.index,
                uri: outputs::part_uri_as(&output, s.range.index, ext),
                records: s.records,
                sha256: s.sha256.clone(),
            })
            .collect();
        let manifest = serde_json::json!({
            "workload": format!("{}/{}", w.namespace, w.name),
            "uid": w.uid,
            "input": w.spec.input.uri,
            "inputBytes": w.input_size,
            // The pinned sha256 is the model that ran (content addressing); when the URI held
            // another file at admission, what it hashed to is kept beside it.
            "model": match &w.model_drift {
                None => serde_json::json!({"uri": w.validated.model.uri, "sha256": w.validated.model.sha256}),
                Some(actual) => serde_json::json!({
                    "uri": w.validated.model.uri,
                    "sha256": w.validated.model.sha256,
                    "uriSha256AtAdmission": actual,
                }),
            },
            "shards": w.shards.len(),
            "records": w.records,
            "parts": parts,
        });
        Some(FinishPlan {
            output,
            ext,
            manifest,
            // Only parts not known to be at their final name are moved (again) before the
            // manifest: one look per part at the end cost as much as the run's own moves.
            parts: w
                .shards
                .iter()
                .filter(|s| !s.moved)
                .map(|s| (s.range.index, s.attempt))
                .collect(),
            message: format!("{} records in {} shards", w.records, w.shards.len()),
        })
    }

    /// The store recorded a workload's success: it leaves memory.
    pub(super) fn workload_succeeded(&mut self, uid: &str, message: String, now: Instant) {
        if let Some(w) = self.workloads.get_mut(uid) {
            w.phase = WorkloadPhase::Succeeded;
            w.reason = "Succeeded".into();
            w.message = message;
            w.finished = Some(now);
            tracing::info!(workload = %w.key, records = w.records, "workload succeeded");
        }
        self.retire(uid);
    }

    // ---- dispatch ------------------------------------------------------------------------

    /// The claims of one dispatch round: pending shards of running workloads onto agents with
    /// free slots, each namespace's share of its Mesh kept ([`scheduler::schedule`]). Changes
    /// nothing but the hold reason of workloads whose namespace is out of credits (they
    /// dispatch nothing more; running shards finish) and what each waiting workload says of
    /// its wait ([`Machine::waiting_for_slots`]). `now` ages the waiting workloads' priorities.
    pub(super) fn plan_round(&mut self, now: Instant) -> Vec<Claim> {
        // Shards being committed hold their namespace's slots until the store answers.
        {
            let Self {
                fair, workloads, ..
            } = self;
            fair.committing.retain(|(uid, index)| {
                workloads
                    .get(uid)
                    .and_then(|w| w.shards.get(*index as usize))
                    .is_some_and(|s| matches!(s.status, ShardStatus::Committing { .. }))
            });
        }
        // Only agents that can take a shard now are copied for the scheduler: at a thousand
        // agents nearly all are full in any one round. The scheduler gives nothing to the
        // others, and the order of those kept is unchanged, so its choices are the same.
        let views: Vec<AgentView> = self
            .agents
            .values()
            .filter(|a| a.connected && !a.unschedulable && (a.running.len() as u32) < a.slots)
            .map(|a| AgentView {
                id: a.id.clone(),
                mesh: a.mesh.clone(),
                free_slots: a.slots.saturating_sub(a.running.len() as u32),
                schedulable: true,
                loaded: a.loaded.clone(),
                cached: a.cached.clone(),
                providers: a.providers.clone(),
                gpu_memory: a.gpus.iter().map(|g| g.memory_bytes).min().unwrap_or(0),
            })
            .collect();
        let blocked: Vec<String> = self
            .workloads
            .values()
            .filter(|w| w.admitted && !w.phase.is_terminal() && self.out_of_credits(w))
            .map(|w| w.uid.clone())
            .collect();
        for uid in &blocked {
            let (ns, mesh) = {
                let w = &self.workloads[uid];
                (w.namespace.clone(), w.mesh.clone())
            };
            let budget = self.budget_of(&mesh, &ns);
            let left = self.balances.get(&ns).copied().unwrap_or(0);
            if let Some(w) = self.workloads.get_mut(uid)
                && w.reason != "QuotaExceeded"
            {
                tracing::warn!(workload = %w.key, "namespace out of credits: dispatch paused");
                w.reason = "QuotaExceeded".into();
                w.message = quota_message(&ns, &mesh, left, budget);
            }
        }
        let mut order: Vec<&WorkloadState> = self
            .workloads
            .values()
            .filter(|w| {
                w.phase == WorkloadPhase::Running
                    && !w.spec.suspend
                    && !w.lacks_credentials()
                    && !blocked.contains(&w.uid)
            })
            .collect();
        order.sort_by_key(|w| w.seq);
        // No round places more shards than there are free slots, and the shards of one
        // workload are alike to the scheduler (mesh, model, needs, priority), so each workload
        // offers only its first `free` claimable shards: a round's cost follows the free
        // slots, not the queue. (With no slot free, each still looks for one, to know whether
        // it waits.)
        let free: usize = views
            .iter()
            .filter(|v| v.schedulable)
            .map(|v| v.free_slots as usize)
            .sum();
        let mut offers: Vec<Offer> = Vec::new();
        let mut cursors = Vec::with_capacity(order.len());
        let mut shares = Shares::default();
        for (i, w) in order.iter().enumerate() {
            let from = w.claimable_from.min(w.shards.len());
            // A shard out of attempts is failed, never claimed again.
            let mut claimable = w.shards[from..]
                .iter()
                .filter(|s| {
                    s.status == ShardStatus::Pending && s.used(s.attempt) < w.spec.max_attempts
                })
                .take(free.max(1))
                .peekable();
            cursors.push((
                w.uid.clone(),
                claimable
                    .peek()
                    .map_or(w.shards.len(), |s| s.range.index as usize),
            ));
            let shards: Vec<u32> = claimable.map(|s| s.range.index).collect();
            if shards.is_empty() {
                continue;
            }
            let mesh = self.meshes.get(&w.mesh).map(|m| &m.spec);
            offers.push(Offer {
                workload: i,
                queue: shares.queue(mesh, &w.mesh, &w.namespace),
                priority: effective_priority(
                    w.spec.priority,
                    now.saturating_duration_since(w.submitted),
                    mesh.map_or(0, |m| m.aging_seconds),
                ),
                held: 0,
                seq: w.seq,
                shards,
                model: w.model_key(),
                needs: w.validated.needs.clone(),
            });
        }
        // What each workload and namespace holds matters only when several compete or a cap
        // applies; then it is counted from the agents' assignments and the commits under way
        // (the running shards, not the queue).
        let contended = offers.len() > 1 || shares.queues.iter().any(|q| q.max_slots.is_some());
        let mut held = if contended {
            self.held_by_workload()
        } else {
            HashMap::new()
        };
        if contended {
            self.count_shares(&held, &mut shares);
            for o in &mut offers {
                o.held = held.get(order[o.workload].uid.as_str()).map_or(0, |h| h.0);
            }
        }
        let placements = scheduler::schedule(&views, &shares.queues, &offers);
        let claims: Vec<Claim> = placements
            .iter()
            .map(|p| {
                let w = order[p.workload];
                Claim {
                    uid: w.uid.clone(),
                    shard: p.shard,
                    attempt: w.shards[p.shard as usize].attempt + 1,
                    agent: views[p.agent].id.clone(),
                }
            })
            .collect();
        // Those that got nothing and hold nothing wait: why, and where.
        let mut placed = vec![0u32; order.len()];
        for p in &placements {
            placed[p.workload] += 1;
        }
        if !contended && offers.iter().any(|o| placed[o.workload] == 0) {
            held = self.held_by_workload();
            self.count_shares(&held, &mut shares);
        }
        for o in &offers {
            if let Some(q) = shares.queues.get_mut(o.queue) {
                q.held = q.held.saturating_add(placed[o.workload]);
            }
        }
        let waiters: Vec<(&str, Waiter)> = offers
            .iter()
            .filter(|o| placed[o.workload] == 0)
            .map(|o| (order[o.workload].uid.as_str(), o))
            .filter(|(uid, _)| held.get(uid).is_none_or(|h| h.0 + h.1 == 0))
            .map(|(uid, o)| {
                let waiter = Waiter {
                    queue: o.queue,
                    priority: o.priority,
                    seq: o.seq,
                };
                (uid, waiter)
            })
            .collect();
        let waiting = self.waiting_for_slots(&shares.queues, &waiters);
        // Nothing below the first claimable shard found can be claimed until one goes back
        // to the queue (which lowers the cursor).
        for (uid, first) in cursors {
            if let Some(w) = self.workloads.get_mut(&uid) {
                w.claimable_from = first;
            }
        }
        self.fair.waiting = waiting;
        claims
    }

    /// Slots held now by each workload's shards: (assigned to an agent, being committed).
    /// A shard taken back from an agent, awaiting its requeue, holds none: it runs nowhere.
    fn held_by_workload(&self) -> HashMap<&str, (u32, u32)> {
        let mut held: HashMap<&str, (u32, u32)> = HashMap::new();
        for a in self.agents.values() {
            // An agent's assignments are sorted by workload: one count per run of them.
            let mut run: Option<(&str, u32)> = None;
            for (uid, _) in &a.running {
                match &mut run {
                    Some((u, n)) if *u == uid.as_str() => *n += 1,
                    _ => {
                        if let Some((u, n)) = run.replace((uid.as_str(), 1)) {
                            held.entry(u).or_default().0 += n;
                        }
                    }
                }
            }
            if let Some((u, n)) = run {
                held.entry(u).or_default().0 += n;
            }
        }
        for (uid, _) in &self.fair.committing {
            held.entry(uid.as_str()).or_default().1 += 1;
        }
        held
    }

    /// Adds what each workload holds to its namespace's queue (made for it when it offers
    /// nothing this round: its slots still count towards the shares).
    fn count_shares(&self, held: &HashMap<&str, (u32, u32)>, shares: &mut Shares) {
        for q in &mut shares.queues {
            q.held = 0;
            q.committing = 0;
        }
        for (uid, (running, committing)) in held {
            let Some(w) = self.workloads.get(*uid) else {
                continue;
            };
            let mesh = self.meshes.get(&w.mesh).map(|m| &m.spec);
            let i = shares.queue(mesh, &w.mesh, &w.namespace);
            let q = &mut shares.queues[i];
            q.held = q.held.saturating_add(*running);
            q.committing = q.committing.saturating_add(*committing);
        }
    }

    /// Why each waiting workload waits and where it is, after a round (`queues` hold what
    /// each namespace holds with the round's placements): its namespace at its `maxSlots`, or
    /// at its share by weight of a full Mesh, and its place in the Mesh's queue (the first
    /// [`QUEUE_POSITIONS`] of each Mesh are numbered).
    fn waiting_for_slots(
        &self,
        queues: &[scheduler::Queue],
        waiters: &[(&str, Waiter)],
    ) -> HashMap<String, SlotWait> {
        if waiters.is_empty() {
            return HashMap::new();
        }
        let list: Vec<Waiter> = waiters.iter().map(|(_, w)| w.clone()).collect();
        let positions = scheduler::queue_positions(queues, &list, QUEUE_POSITIONS);
        let mut slots: HashMap<&str, u32> = HashMap::new();
        for a in self
            .agents
            .values()
            .filter(|a| a.connected && !a.unschedulable)
        {
            *slots.entry(a.mesh.as_str()).or_default() += a.slots;
        }
        let mut weights: HashMap<&str, u64> = HashMap::new();
        for q in queues {
            *weights.entry(q.mesh.as_str()).or_default() += u64::from(q.weight);
        }
        waiters
            .iter()
            .zip(positions)
            .map(|((uid, w), position)| {
                let q = &queues[w.queue];
                let place = match position {
                    Some(p) => format!("position {p} in the queue of mesh {}", q.mesh),
                    None => format!(
                        "more than {QUEUE_POSITIONS} workloads ahead of it in the queue of mesh {}",
                        q.mesh
                    ),
                };
                let total = slots.get(q.mesh.as_str()).copied().unwrap_or(0);
                let weight_sum = weights.get(q.mesh.as_str()).copied().unwrap_or(1).max(1);
                let share = u64::from(total) * u64::from(q.weight) / weight_sum;
                let message = match q.max_slots {
                    Some(cap) if q.held.saturating_add(q.committing) >= cap => format!(
                        "namespace {} uses {} of its {cap} slots (maxSlots on mesh {})",
                        q.namespace,
                        q.held.saturating_add(q.committing),
                        q.mesh
                    ),
                    _ if share >= 1 && u64::from(q.held) >= share => format!(
                        "namespace {} uses {} slots, at or over its share by weight ({share} of \
                         the {total} of mesh {}); {place}",
                        q.namespace, q.held, q.mesh
                    ),
                    _ => place,
                };
                (uid.to_string(), SlotWait { position, message })
            })
            .collect()
    }

    /// A workload's summary, with what it waits for.
    fn summary_of(&self, w: &WorkloadState) -> WorkloadSummary {
        let mut s = summarize(w);
        s.waiting = self.fair.waiting.get(&w.uid).cloned();
        s
    }

    /// The store's answer to a round's claims (`won[i]`: claim `i` was stored). Won claims
    /// run: an Assign to a connected holder, a requeue when it left meanwhile. Lost ones run
    /// elsewhere (another operator claimed that attempt first).
    pub(super) fn claims_stored(
        &mut self,
        claims: &[Claim],
        won: &[bool],
        now: Instant,
    ) -> Vec<Effect> {
        let Self {
            workloads, agents, ..
        } = self;
        let mut effects = Vec::new();
        for (c, won) in claims.iter().zip(won) {
            let Some(w) = workloads.get_mut(&c.uid) else {
                continue;
            };
            let Some(s) = w.shards.get_mut(c.shard as usize) else {
                continue;
            };
            if !won {
                tracing::warn!(workload = %w.key, shard = c.shard, attempt = c.attempt, "shard claimed by another operator");
                s.status = ShardStatus::Elsewhere;
                continue;
            }
            s.attempt = c.attempt;
            s.status = ShardStatus::Running {
                agent: c.agent.clone(),
                since: now,
            };
            if w.phase.is_terminal() {
                continue;
            }
            match agents.get_mut(&c.agent) {
                Some(a) if a.connected => {
                    a.running.insert((c.uid.clone(), c.shard));
                    send(
                        &mut effects,
                        &c.agent,
                        Down::Assign(assignment(
                            w,
                            c.shard,
                            c.attempt,
                            self.meshes.get(&w.mesh).map(|m| &m.spec),
                        )),
                    );
                    effects.push(Effect::Count(Tally::Dispatched));
                }
                _ => effects.push(Effect::Requeue(RequeueOrder {
                    uid: c.uid.clone(),
                    index: c.shard,
                    attempt: c.attempt,
                    agent: Some(c.agent.clone()),
                    reason: "the agent left before its assignment went out".into(),
                    fail_reason: "AgentLost",
                    backoff: false,
                })),
            }
        }
        effects
    }
}

/// When `spec.activeDeadlineSeconds` runs out for a workload that has run for `running_for`
/// at `now`; `None` without a deadline.
fn deadline(spec: &WorkloadSpec, running_for: Duration, now: Instant) -> Option<Instant> {
    let limit = Duration::from_secs(u64::from(spec.active_deadline_seconds?));
    now.checked_add(limit.saturating_sub(running_for))
}

fn quota_message(namespace: &str, mesh: &str, left: i64, budget: i64) -> String {
    format!(
        "namespace {namespace} has {} credits left (budget {} on mesh {mesh}); running needs more \
         than 0 — raise the Mesh budget or run `infermesh ledger grant --namespace {namespace} \
         --mesh {mesh} --credits N`",
        format_credits(left),
        format_credits(budget),
    )
}

/// The Assign of attempt `attempt` of shard `index`: the part goes to the attempt's own
/// location. It carries the workload's credentials, if any, and the Mesh's grant to its
/// namespace, if the Mesh names tenants (`mesh`: the Mesh's spec now).
fn assignment(
    w: &WorkloadState,
    index: u32,
    attempt: u32,
    mesh: Option<&infermesh_crds::MeshSpec>,
) -> pb::Assign {
    let s = &w.shards[index as usize];
    let access = mesh
        .and_then(|m| super::tenancy::grant_of(m, &w.namespace))
        .map(|g| pb::Access {
            read: g.read,
            write: g.write,
        });
    let credentials = w.credentials.as_ref().map(|c| pb::Credentials {
        access_key_id: c.access_key_id.clone(),
        secret_access_key: c.secret_access_key.clone(),
        session_token: c.session_token.clone().unwrap_or_default(),
        region: c.region.clone().unwrap_or_default(),
        bearer_token: c.bearer_token.clone().unwrap_or_default(),
    });
    pb::Assign {
        credentials,
        access,
        shard: Some(pb::ShardRef {
            workload: w.key.clone(),
            index,
            attempt,
        }),
        model: Some(w.validated.model.clone()),
        task: Some(w.validated.task.clone()),
        input: Some(match &w.input_files {
            None => pb::InputRange {
                uri: w.spec.input.uri.clone(),
                format: "jsonl".into(),
                start: s.range.start,
                end: s.range.end,
                size: w.input_size,
                version: w.input_version.clone().unwrap_or_default(),
                ..Default::default()
            },
            Some(ds) => input_parts(ds, &w.validated, s.range.start, s.range.end),
        }),
        output_uri: outputs::attempt_uri_as(
            &w.spec.output.uri,
            index,
            attempt,
            w.validated.output_format.extension(),
        ),
        batch_size: w.spec.batch_size,
        output_format: w.validated.output_format.extension().into(),
        output_zstd: w.validated.output_zstd,
    }
}

/// The input of shard `[start, end)` of a dataset: what it reads of each file.
fn input_parts(ds: &Dataset, v: &Validated, start: u64, end: u64) -> pb::InputRange {
    let parts = ds
        .pieces(start, end)
        .into_iter()
        .map(|p| {
            let f = &ds.files[p.file()];
            let mut part = pb::InputPart {
                uri: f.uri.clone(),
                size: f.size,
                version: f.version.clone().unwrap_or_default(),
                compression: f.compression.as_str().into(),
                ..Default::default()
            };
            match p {
                Piece::Bytes { start, end, .. } => (part.start, part.end) = (start, end),
                Piece::Whole { .. } => part.end = f.size,
                Piece::RowGroups { first, end, .. } => {
                    (part.row_group_start, part.row_group_end) = (first, end);
                    part.row_groups = f
                        .row_groups
                        .iter()
                        .map(|g| pb::RowGroupFacts {
                            bytes: g.bytes,
                            rows: g.rows,
                        })
                        .collect();
                }
            }
            part
        })
        .collect();
    pb::InputRange {
        format: ds.format.as_str().into(),
        parts,
        delimiter: if v.delimiter == b',' {
            String::new()
        } else {
            char::from(v.delimiter).to_string()
        },
        columns: if ds.format == infermesh_io::Format::Parquet {
            v.input
                .columns
                .iter()
                .map(String::as_str)
                // The id may be a dotted path too: its column is the first segment.
                .chain(v.task.id_field.split('.').next())
                .filter(|c| !c.is_empty())
                .map(String::from)
                .collect()
        } else {
            Vec::new()
        },
        ..Default::default()
    }
}

fn summarize(w: &WorkloadState) -> WorkloadSummary {
    let count =
        |f: fn(&ShardStatus) -> bool| w.shards.iter().filter(|s| f(&s.status)).count() as u32;
    let elapsed = w
        .finished
        .unwrap_or_else(Instant::now)
        .saturating_duration_since(w.submitted);
    WorkloadSummary {
        key: w.key.clone(),
        uid: w.uid.clone(),
        namespace: w.namespace.clone(),
        name: w.name.clone(),
        mesh: w.mesh.clone(),
        phase: w.phase,
        reason: w.reason.clone(),
        message: w.message.clone(),
        shards_total: w.shards.len() as u32,
        shards_pending: count(|s| matches!(s, ShardStatus::Pending | ShardStatus::Backoff { .. })),
        shards_running: count(|s| {
            matches!(
                s,
                ShardStatus::Running { .. }
                    | ShardStatus::Committing { .. }
                    | ShardStatus::Elsewhere
            )
        }),
        shards_succeeded: count(|s| *s == ShardStatus::Succeeded),
        shards_failed: count(|s| *s == ShardStatus::Failed),
        records: w.records,
        bytes_done: w.bytes_done,
        input_bytes: w.input_size,
        elapsed,
        credits: w.credits,
        attempts_retried: w.retried,
        suspended: w.spec.suspend,
        output_uri: w.spec.output.uri.clone(),
        warnings: w
            .model_drift
            .iter()
            .map(|actual| {
                models::drift_warning(&w.validated.model.uri, &w.validated.model.sha256, actual)
            })
            .collect(),
        // Filled in by the machine, which knows the queue (`Machine::summary_of`).
        waiting: None,
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod fair_share_tests;
