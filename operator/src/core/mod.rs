//! The operator core: workloads, shards, agents, leases and the ledger hook. It knows nothing
//! of Kubernetes; the controllers (cluster mode) and `infermesh local` drive it, and the gRPC
//! server feeds it agent messages.
//!
//! How it keeps its promises:
//! - **No I/O under the lock.** The state sits behind a `std::sync::Mutex`, whose guard cannot
//!   be held across an `.await`: every change is decided under the lock (the rules are pure
//!   functions: [`accounting`], [`scheduler`], [`lease`], [`planner`]), the store and object
//!   writes happen with the lock released, and memory follows what the store accepted.
//! - **Store first, memory follows.** A failed store write changes nothing in memory. Every
//!   store write that moves a shard is a compare-and-set on its state, holder and attempt, so
//!   two paths racing over one shard (a lease expiring while its completion is committed, two
//!   operators) cannot both win, and applying the winner to memory is idempotent.
//! - **Agents are untrusted.** A report is accepted only from the holder of the shard's
//!   current attempt; prices come from the operator's clock and the registered device; the
//!   part is checked and committed by the operator ([`outputs`]).
//! - **Finished workloads leave memory.** Their summaries stay until the caller has written
//!   them ([`Core::release`]); the store keeps the history.

pub mod accounting;
pub mod lease;
pub mod models;
pub mod outputs;
pub mod planner;
pub mod pricing;
pub mod progress;
pub mod scheduler;
pub mod sim;
pub mod validate;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, MutexGuard};
use std::time::{Duration, Instant};

use infermesh_crds::{MeshSpec, WorkloadPhase, WorkloadSpec};
use infermesh_io::Location;
use infermesh_proto as pb;
use pb::agent_message::Msg as Up;
use pb::operator_message::Msg as Down;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tokio::sync::mpsc;
use tonic::Status;

use crate::grpc::Principal;
use crate::store::group::GroupCommitter;
use crate::store::{
    ChargeOutcome, Claim, CompletionRecord, Event, EventKind, GrantKind, ShardRecord, Store,
    StoreError, WorkloadRecord,
};
use accounting::{Device, Refusal, Standing};
use lease::Requeue;
use outputs::{ManifestPart, PartFacts};
use pricing::{Price, format_credits};
use progress::{AgentSummary, WorkloadSummary};
use scheduler::{AgentView, PendingShard};
use validate::Validated;

/// Messages to one agent's stream.
pub type AgentSender = mpsc::UnboundedSender<Result<pb::OperatorMessage, Status>>;

/// Refused reports one stream may send before it is ended with `PermissionDenied`, so a
/// flood cannot fill the event log.
pub const MAX_REFUSALS: u32 = 32;

/// Disconnected agents with nothing running are forgotten after this long.
const FORGET_AFTER: Duration = Duration::from_secs(15 * 60);

/// Why the core refused something.
#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The workload names a Mesh the core does not know.
    #[error("MeshNotFound: mesh `{0}` does not exist")]
    MeshNotFound(String),
    /// The spec is invalid.
    #[error(transparent)]
    Invalid(#[from] validate::Invalid),
    /// A workload with this key is already running.
    #[error("workload {0} is already submitted")]
    Duplicate(String),
    /// The store holds this run (its uid) as finished: it is never run again.
    #[error("workload {key} already finished ({phase}); create a new Workload to run it again")]
    Finished {
        /// The workload key.
        key: String,
        /// `Succeeded` or `Failed`.
        phase: String,
    },
}

/// A workload ready to run: its identity, spec, and the input's size.
#[derive(Clone, Debug)]
pub struct Submission {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// Unique id of this run.
    pub uid: String,
    /// The spec (URIs already absolute).
    pub spec: WorkloadSpec,
    /// Size of the input object.
    pub input_size: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum ShardStatus {
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
    Succeeded,
    Failed,
}

impl ShardStatus {
    fn standing(&self) -> Standing<'_> {
        match self {
            Self::Pending => Standing::Pending,
            Self::Running { agent, .. } => Standing::Running { agent },
            Self::Committing { agent } => Standing::Committing { agent },
            Self::Elsewhere => Standing::Pending,
            Self::Succeeded => Standing::Succeeded,
            Self::Failed => Standing::Failed,
        }
    }
}

#[derive(Clone, Debug)]
struct ShardState {
    range: planner::ShardRange,
    status: ShardStatus,
    /// The current attempt (the last one started).
    attempt: u32,
    records: u64,
    sha256: String,
}

struct WorkloadState {
    key: String,
    uid: String,
    namespace: String,
    name: String,
    mesh: String,
    spec: WorkloadSpec,
    validated: Validated,
    input_size: u64,
    shards: Vec<ShardState>,
    /// Written to the store and dispatching (false while held for budget).
    admitted: bool,
    /// A terminal write (manifest or failure) is under way.
    finishing: bool,
    phase: WorkloadPhase,
    reason: String,
    message: String,
    submitted: Instant,
    finished: Option<Instant>,
    records: u64,
    bytes_done: u64,
    /// Shards succeeded, so a completion checks the end without a scan of every shard.
    succeeded: usize,
    credits: i64,
    retried: u32,
    /// Submission order, for listings.
    seq: u64,
    /// What the model's URI hashed to at admission when not its pinned sha256.
    model_drift: Option<String>,
}

impl WorkloadState {
    fn model_key(&self) -> String {
        if self.validated.model.sha256.is_empty() {
            self.validated.model.uri.clone()
        } else {
            self.validated.model.sha256.clone()
        }
    }
}

struct AgentState {
    id: String,
    mesh: String,
    node: String,
    /// Who attached it (a pod in a cluster); another instance may not replace a live stream.
    instance: Option<String>,
    session: u64,
    tx: AgentSender,
    connected: bool,
    disconnected_at: Option<Instant>,
    unschedulable: bool,
    slots: u32,
    providers: Vec<String>,
    gpus: Vec<pb::Gpu>,
    device: Device,
    loaded: BTreeSet<String>,
    cached: BTreeSet<String>,
    /// (workload uid, shard) assigned and not yet reported.
    running: BTreeSet<(String, u32)>,
    last_heartbeat: Instant,
    completed: u64,
    credits: i64,
    refusals: u32,
}

impl AgentState {
    fn send(&self, msg: Down) {
        let _ = self.tx.send(Ok(pb::OperatorMessage { msg: Some(msg) }));
    }
}

struct MeshState {
    spec: MeshSpec,
    price: Price,
}

#[derive(Default)]
struct State {
    meshes: BTreeMap<String, MeshState>,
    /// Live workloads, by uid.
    workloads: HashMap<String, WorkloadState>,
    /// Summaries of finished workloads not yet released, by key (with their order).
    finished: HashMap<String, (u64, WorkloadSummary)>,
    agents: BTreeMap<String, AgentState>,
    /// Balances of namespaces whose Mesh sets a budget, as last read plus what was charged.
    balances: HashMap<String, i64>,
    next_session: u64,
    next_seq: u64,
}

impl State {
    fn budgeted(&self, mesh: &str, namespace: &str) -> bool {
        self.meshes
            .get(mesh)
            .is_some_and(|m| m.spec.budgets.iter().any(|b| b.namespace == namespace))
    }

    fn out_of_credits(&self, w: &WorkloadState) -> bool {
        self.budgeted(&w.mesh, &w.namespace)
            && self.balances.get(&w.namespace).is_some_and(|b| *b <= 0)
    }

    /// The live workload a wire key (`namespace/name/uid`) names.
    fn live(&self, key: &str) -> Option<&WorkloadState> {
        self.workloads.get(key_uid(key)).filter(|w| w.key == key)
    }

    fn live_mut(&mut self, key: &str) -> Option<&mut WorkloadState> {
        self.workloads
            .get_mut(key_uid(key))
            .filter(|w| w.key == key)
    }
}

/// A registered agent stream: which agent, and which of its connections.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentHandle {
    /// Agent id.
    pub id: String,
    /// Connection number; a reconnect makes the old handle stale.
    pub session: u64,
}

/// Labels of a refused report.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusedLabels {
    /// The refusal's reason (`not_holder`, `stale_attempt`, ...).
    pub reason: String,
}

/// Shard counters of the core, exported as Prometheus metrics by the operator.
#[derive(Clone, Debug, Default)]
pub struct ShardCounters {
    /// Assignments sent to agents.
    pub dispatched: Counter,
    /// Completions committed and charged.
    pub completed: Counter,
    /// Shards failed for good (out of attempts, or a permanent error).
    pub failed: Counter,
    /// Shards put back in the queue.
    pub requeued: Counter,
    /// Reports refused, by reason.
    pub refused: Family<RefusedLabels, Counter>,
}

/// The core. `S` is the store backend.
pub struct Core<S: Store> {
    store: Arc<S>,
    committer: GroupCommitter,
    state: std::sync::Mutex<State>,
    /// One dispatch round at a time (claims are decided, stored, then applied).
    round: tokio::sync::Mutex<()>,
    counters: ShardCounters,
}

/// The key of a workload on the wire and in logs: `namespace/name/uid`.
pub fn workload_key(namespace: &str, name: &str, uid: &str) -> String {
    format!("{namespace}/{name}/{uid}")
}

/// The uid in a workload key (its last segment).
fn key_uid(key: &str) -> &str {
    key.rsplit('/').next().unwrap_or_default()
}

fn reason_for(kind: pb::ErrorKind) -> &'static str {
    match kind {
        pb::ErrorKind::ModelLoad => "ModelLoadFailed",
        pb::ErrorKind::TokenizerLoad => "TokenizerLoadFailed",
        pb::ErrorKind::InvalidInput => "InvalidInput",
        pb::ErrorKind::Io => "StorageError",
        pb::ErrorKind::Inference => "InferenceFailed",
        pb::ErrorKind::Cancelled | pb::ErrorKind::Unspecified => "ShardFailed",
    }
}

fn internal(e: impl std::fmt::Display) -> Status {
    Status::internal(e.to_string())
}

/// A completion that passed the checks needing no I/O.
struct Accepted {
    uid: String,
    namespace: String,
    output: String,
    index: u32,
    attempt: u32,
    elapsed: Duration,
    device: Device,
    price: Price,
}

impl<S: Store> Core<S> {
    /// A core over `store`.
    pub fn new(store: S) -> Self {
        let store = Arc::new(store);
        let committer = GroupCommitter::spawn(store.clone());
        Self {
            store,
            committer,
            state: std::sync::Mutex::new(State::default()),
            round: tokio::sync::Mutex::new(()),
            counters: ShardCounters::default(),
        }
    }

    fn st(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain data behind; carry on with it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The shard counters.
    pub fn counters(&self) -> &ShardCounters {
        &self.counters
    }

    /// The store.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// Workloads held in memory with their shards (finished ones leave).
    pub fn resident_workloads(&self) -> usize {
        self.st().workloads.len()
    }

    /// Forgets the summary of a finished workload once its final status is written.
    pub fn release(&self, key: &str) {
        self.st().finished.remove(key);
    }

    /// Forgets an agent whose object is gone (it must be disconnected).
    pub fn forget_agent(&self, id: &str) {
        let mut st = self.st();
        if st.agents.get(id).is_some_and(|a| !a.connected) {
            st.agents.remove(id);
        }
    }

    /// Pauses (or resumes) dispatch of a workload's shards; running shards finish.
    /// Returns false when the core does not know the workload.
    pub async fn set_suspend(&self, key: &str, suspend: bool) -> Result<bool, CoreError> {
        let resumed = {
            let mut st = self.st();
            if st.finished.contains_key(key) {
                return Ok(true);
            }
            let Some(w) = st.live_mut(key) else {
                return Ok(false);
            };
            if w.spec.suspend == suspend {
                return Ok(true);
            }
            w.spec.suspend = suspend;
            tracing::info!(workload = %key, suspend, "workload suspend changed");
            !suspend
        };
        if resumed {
            self.dispatch().await?;
        }
        Ok(true)
    }

    /// Cancels a workload (its object was deleted): running shards are cancelled on their
    /// agents, nothing more is dispatched, and the store records it as failed with `reason`.
    /// Completed shards stay charged. Returns false when the core does not know it.
    pub async fn cancel(&self, key: &str, reason: &str, message: &str) -> Result<bool, CoreError> {
        let uid = {
            let mut st = self.st();
            if st.finished.contains_key(key) {
                return Ok(true);
            }
            let Some(w) = st.live_mut(key) else {
                return Ok(false);
            };
            let uid = w.uid.clone();
            if !w.admitted {
                // Held, never written to the store: just stop considering it.
                w.phase = WorkloadPhase::Failed;
                w.reason = reason.to_string();
                w.message = message.to_string();
                w.finished = Some(Instant::now());
                retire(&mut st, &uid);
                return Ok(true);
            }
            uid
        };
        self.fail_workload(&uid, reason, message).await?;
        self.dispatch().await?;
        Ok(true)
    }

    /// Whether the core holds a workload with this key (running, held, or finished and not
    /// yet released).
    pub async fn knows(&self, key: &str) -> bool {
        let st = self.st();
        st.finished.contains_key(key) || st.live(key).is_some()
    }

    /// A summary of one workload.
    pub async fn workload(&self, key: &str) -> Option<WorkloadSummary> {
        let st = self.st();
        if let Some((_, s)) = st.finished.get(key) {
            return Some(s.clone());
        }
        st.live(key).map(summarize)
    }

    /// Whether the core knows the Mesh.
    pub async fn has_mesh(&self, name: &str) -> bool {
        self.st().meshes.contains_key(name)
    }

    /// Forgets a Mesh (deleted): its agents are told to drain and its workloads fail with
    /// `MeshDeleted` (nothing could run them any more).
    pub async fn remove_mesh(&self, name: &str) {
        let orphans: Vec<String> = {
            let mut st = self.st();
            st.meshes.remove(name);
            for a in st.agents.values().filter(|a| a.connected && a.mesh == name) {
                a.send(Down::Drain(pb::Drain {
                    reason: format!("mesh {name} was deleted"),
                }));
            }
            st.workloads
                .values()
                .filter(|w| w.mesh == name)
                .map(|w| w.uid.clone())
                .collect()
        };
        for uid in orphans {
            let message = format!("mesh {name} was deleted while the workload ran");
            if let Err(e) = self.fail_workload(&uid, "MeshDeleted", &message).await {
                tracing::error!(%uid, error = %e, "cannot fail the workload of a deleted mesh");
            }
        }
    }

    /// Adds or updates a Mesh, and brings each namespace's grant from it to the Mesh's
    /// budget (level-triggered: applying the same Mesh twice grants nothing more; a lower
    /// budget takes the difference back). Held workloads are then reconsidered.
    pub async fn upsert_mesh(&self, name: &str, spec: MeshSpec) -> Result<(), CoreError> {
        let price = Price::try_from(&spec.pricing)
            .map_err(|message| validate::Invalid::new("InvalidSpec", message))?;
        let mut targets = Vec::with_capacity(spec.budgets.len());
        for (i, budget) in spec.budgets.iter().enumerate() {
            let field = format!("spec.budgets[{i}].credits ({})", budget.namespace);
            let target =
                pricing::checked_amount(&field, budget.credits, pricing::MAX_BUDGET_CREDITS)
                    .map_err(|message| validate::Invalid::new("InvalidSpec", message))?;
            targets.push(target);
        }
        self.store
            .ensure_account(&crate::store::mesh_account(name))
            .await?;
        for (budget, target) in spec.budgets.iter().zip(targets) {
            let granted = self.store.granted(&budget.namespace, name).await?;
            if target != granted {
                let memo = format!("budget of namespace {} on mesh {name}", budget.namespace);
                self.store
                    .grant(
                        GrantKind::Budget,
                        &budget.namespace,
                        name,
                        target - granted,
                        &memo,
                    )
                    .await?;
                tracing::info!(namespace = %budget.namespace, mesh = %name, credits = budget.credits, "budget granted");
            }
        }
        self.st()
            .meshes
            .insert(name.to_string(), MeshState { spec, price });
        self.admit_held().await
    }

    /// Takes up the workloads the store says are still running (after a restart, or when a
    /// standby takes over): completed shards stay done and are not run again; shards that were
    /// running go back to the queue with their attempt counted. A workload whose stored spec
    /// no longer validates fails (the others carry on). Returns how many were resumed. Their
    /// Meshes must be known (`upsert_mesh`) first.
    pub async fn resume(&self) -> Result<usize, CoreError> {
        self.resume_where(|_| true).await
    }

    /// [`Core::resume`] for the stored workloads `keep` chooses (`infermesh local --resume`
    /// takes up only the workloads of the manifest it was given).
    pub async fn resume_where(
        &self,
        keep: impl Fn(&WorkloadRecord) -> bool,
    ) -> Result<usize, CoreError> {
        let stored = self.store.active_workloads().await?;
        let mut resumed = Vec::new();
        for sw in stored.into_iter().filter(|sw| keep(&sw.record)) {
            let r = &sw.record;
            let key = workload_key(&r.namespace, &r.name, &r.uid);
            if self.st().workloads.contains_key(&r.uid) {
                continue;
            }
            let parsed = serde_json::from_str::<WorkloadSpec>(&r.spec_json)
                .map_err(|e| e.to_string())
                .and_then(|spec| {
                    validate::validate(&spec)
                        .map(|v| (spec, v))
                        .map_err(|e| e.to_string())
                });
            let (spec, validated) = match parsed {
                Ok(ok) => ok,
                Err(e) => {
                    let message = format!("the stored spec no longer validates: {e}");
                    tracing::error!(workload = %key, %message, "workload not resumed");
                    self.store
                        .finish_workload(&r.uid, "Failed", &format!("InvalidSpec: {message}"))
                        .await?;
                    continue;
                }
            };
            let mut credits: i64 = 0;
            for c in self.store.charges(&r.uid).await? {
                credits = credits.saturating_add(c.amount);
            }
            let mut shards = Vec::with_capacity(sw.shards.len());
            let (mut records, mut bytes_done) = (0u64, 0u64);
            let mut exhausted = None;
            for s in &sw.shards {
                let status = match s.state.as_str() {
                    // Its last attempt was lost with the operator: the shard is out of them.
                    "running" if s.attempt >= spec.max_attempts => {
                        let message = format!(
                            "shard {} failed after {} attempts; last error: operator restarted: attempt lost",
                            s.index, s.attempt
                        );
                        self.store
                            .fail_shard(&r.uid, s.index, s.attempt, s.agent.as_deref(), &message)
                            .await?;
                        exhausted = Some(message);
                        ShardStatus::Failed
                    }
                    "succeeded" => {
                        records = records.saturating_add(s.records);
                        bytes_done = bytes_done.saturating_add(s.end - s.start);
                        ShardStatus::Succeeded
                    }
                    "failed" => ShardStatus::Failed,
                    "running" => {
                        self.store
                            .requeue(
                                &r.uid,
                                s.index,
                                s.attempt,
                                s.agent.as_deref(),
                                "operator restarted: attempt lost",
                            )
                            .await?;
                        ShardStatus::Pending
                    }
                    _ => ShardStatus::Pending,
                };
                shards.push(ShardState {
                    range: planner::ShardRange {
                        index: s.index,
                        start: s.start,
                        end: s.end,
                    },
                    status,
                    attempt: s.attempt,
                    records: s.records,
                    sha256: s.sha256.clone().unwrap_or_default(),
                });
            }
            let balance = self.balance_if_budgeted(&r.mesh, &r.namespace).await?;
            tracing::info!(workload = %key, shards = shards.len(), records, "workload resumed");
            {
                let mut st = self.st();
                if let Some(b) = balance {
                    st.balances.insert(r.namespace.clone(), b);
                }
                let seq = st.next_seq;
                st.next_seq += 1;
                let succeeded = shards
                    .iter()
                    .filter(|s| s.status == ShardStatus::Succeeded)
                    .count();
                st.workloads.insert(
                    r.uid.clone(),
                    WorkloadState {
                        key,
                        uid: r.uid.clone(),
                        namespace: r.namespace.clone(),
                        name: r.name.clone(),
                        mesh: r.mesh.clone(),
                        spec,
                        validated,
                        input_size: r.input_bytes,
                        shards,
                        admitted: true,
                        finishing: false,
                        phase: WorkloadPhase::Running,
                        reason: "Resumed".into(),
                        message: String::new(),
                        submitted: Instant::now(),
                        finished: None,
                        records,
                        bytes_done,
                        succeeded,
                        credits,
                        retried: 0,
                        seq,
                        model_drift: None,
                    },
                );
            }
            if let Some(message) = exhausted {
                self.fail_workload(&r.uid, "AttemptsExhausted", &message)
                    .await?;
                continue;
            }
            resumed.push(r.uid.clone());
        }
        for uid in &resumed {
            self.maybe_finish(uid).await?;
        }
        self.dispatch().await?;
        Ok(resumed.len())
    }

    async fn balance_if_budgeted(
        &self,
        mesh: &str,
        namespace: &str,
    ) -> Result<Option<i64>, StoreError> {
        if !self.st().budgeted(mesh, namespace) {
            return Ok(None);
        }
        let account = crate::store::namespace_account(namespace);
        Ok(Some(self.store.balance(&account).await?))
    }

    /// Validates and plans a workload; admits it when its namespace has budget (else holds it
    /// with `QuotaExceeded`), then dispatches what it can. A uid the store already holds is
    /// never started over: a running one is resumed, a finished one refused
    /// ([`CoreError::Finished`]).
    pub async fn submit(&self, sub: Submission) -> Result<String, CoreError> {
        let validated = validate::validate(&sub.spec)?;
        let key = workload_key(&sub.namespace, &sub.name, &sub.uid);
        {
            let st = self.st();
            if !st.meshes.contains_key(&sub.spec.mesh) {
                return Err(CoreError::MeshNotFound(sub.spec.mesh.clone()));
            }
            if st.workloads.contains_key(&sub.uid) || st.finished.contains_key(&key) {
                return Err(CoreError::Duplicate(key));
            }
        }
        match self.store.workload_phase(&sub.uid).await? {
            Some(phase) if phase == "Running" => {
                self.resume().await?;
                return Ok(key);
            }
            Some(phase) => return Err(CoreError::Finished { key, phase }),
            None => {}
        }
        // A new run: its output location must be writable and hold no earlier run's output
        // (unless the spec says to overwrite it). A resumed run never gets here.
        let overwrite = sub.spec.output.mode == infermesh_crds::OutputMode::Overwrite;
        outputs::prepare(&sub.spec.output.uri, overwrite)
            .await
            .map_err(|(reason, message)| validate::Invalid::new(reason, message))?;
        let drift = models::drift(&validated.model.uri, &validated.model.sha256).await;
        if let Some(actual) = &drift {
            let warning =
                models::drift_warning(&validated.model.uri, &validated.model.sha256, actual);
            tracing::warn!(workload = %key, %warning, "model changed behind its pin");
            self.store
                .append(&Event::new(EventKind::ModelChanged, warning).workload(&sub.uid))
                .await?;
        }
        {
            let mut st = self.st();
            if st.workloads.contains_key(&sub.uid) {
                return Err(CoreError::Duplicate(key));
            }
            // Slots of the Mesh's agents now; fewer are fine (only the last round is affected).
            let slots: u32 = st
                .agents
                .values()
                .filter(|a| a.connected && !a.unschedulable && a.mesh == sub.spec.mesh)
                .map(|a| a.slots)
                .sum();
            let ranges = planner::plan(sub.input_size, validated.shard_bytes, slots);
            let seq = st.next_seq;
            st.next_seq += 1;
            st.workloads.insert(
                sub.uid.clone(),
                WorkloadState {
                    key: key.clone(),
                    uid: sub.uid.clone(),
                    namespace: sub.namespace,
                    name: sub.name,
                    mesh: sub.spec.mesh.clone(),
                    spec: sub.spec,
                    validated,
                    input_size: sub.input_size,
                    shards: ranges
                        .into_iter()
                        .map(|range| ShardState {
                            range,
                            status: ShardStatus::Pending,
                            attempt: 0,
                            records: 0,
                            sha256: String::new(),
                        })
                        .collect(),
                    admitted: false,
                    finishing: false,
                    phase: WorkloadPhase::Pending,
                    reason: "Pending".into(),
                    message: String::new(),
                    submitted: Instant::now(),
                    finished: None,
                    records: 0,
                    bytes_done: 0,
                    succeeded: 0,
                    credits: 0,
                    retried: 0,
                    seq,
                    model_drift: drift,
                },
            );
        }
        self.try_admit(&sub.uid).await?;
        self.dispatch().await?;
        Ok(key)
    }

    /// Admits the held workloads whose namespaces have budget again (after a grant), and lets
    /// running workloads that had run out of credits dispatch again.
    pub async fn admit_held(&self) -> Result<(), CoreError> {
        let (held, namespaces): (Vec<String>, BTreeSet<(String, String)>) = {
            let st = self.st();
            let held = st
                .workloads
                .values()
                .filter(|w| !w.admitted && w.phase == WorkloadPhase::Pending)
                .map(|w| w.uid.clone())
                .collect();
            // Only namespaces that ran out are read again: charges keep the others' balances
            // in memory, and this runs every few seconds.
            let namespaces = st
                .workloads
                .values()
                .filter(|w| w.admitted && st.out_of_credits(w))
                .map(|w| (w.mesh.clone(), w.namespace.clone()))
                .collect();
            (held, namespaces)
        };
        for (mesh, ns) in namespaces {
            if let Some(b) = self.balance_if_budgeted(&mesh, &ns).await? {
                let mut st = self.st();
                st.balances.insert(ns.clone(), b);
                if b > 0 {
                    for w in st.workloads.values_mut() {
                        if w.namespace == ns && w.admitted && w.reason == "QuotaExceeded" {
                            w.reason = "Admitted".into();
                            w.message = String::new();
                        }
                    }
                }
            }
        }
        for uid in &held {
            self.try_admit(uid).await?;
        }
        self.dispatch().await?;
        Ok(())
    }

    /// Admits workload `uid` if its namespace's budget on its Mesh allows; holds it otherwise.
    async fn try_admit(&self, uid: &str) -> Result<(), CoreError> {
        let (record, shard_records, mesh, namespace) = {
            let st = self.st();
            let Some(w) = st.workloads.get(uid) else {
                return Ok(());
            };
            if w.admitted {
                return Ok(());
            }
            let record = WorkloadRecord {
                uid: w.uid.clone(),
                namespace: w.namespace.clone(),
                name: w.name.clone(),
                mesh: w.mesh.clone(),
                spec_json: serde_json::to_string(&w.spec).unwrap_or_default(),
                input_bytes: w.input_size,
            };
            let shards: Vec<ShardRecord> = w
                .shards
                .iter()
                .map(|s| ShardRecord {
                    index: s.range.index,
                    start: s.range.start,
                    end: s.range.end,
                })
                .collect();
            (record, shards, w.mesh.clone(), w.namespace.clone())
        };
        let balance = self.balance_if_budgeted(&mesh, &namespace).await?;
        if let Some(left) = balance
            && left <= 0
        {
            let (message, first) = {
                let mut st = self.st();
                st.balances.insert(namespace.clone(), left);
                let budget = st
                    .meshes
                    .get(&mesh)
                    .and_then(|m| m.spec.budgets.iter().find(|b| b.namespace == namespace))
                    .and_then(|b| pricing::credits_to_micro(b.credits).ok())
                    .unwrap_or(0);
                let Some(w) = st.workloads.get_mut(uid) else {
                    return Ok(());
                };
                let message = quota_message(&namespace, &mesh, left, budget);
                let first = w.reason != "QuotaExceeded";
                w.reason = "QuotaExceeded".into();
                w.message = message.clone();
                (message, first)
            };
            if first {
                tracing::warn!(workload = %record.uid, %message, "workload held");
                let e = Event::new(EventKind::WorkloadHeld, format!("QuotaExceeded: {message}"))
                    .workload(uid);
                self.store.append(&e).await?;
            }
            return Ok(());
        }
        self.store.create_workload(&record, &shard_records).await?;
        tracing::info!(workload = %uid, shards = shard_records.len(), bytes = record.input_bytes, "workload admitted");
        {
            let mut st = self.st();
            if let Some(b) = balance {
                st.balances.insert(namespace, b);
            }
            if let Some(w) = st.workloads.get_mut(uid) {
                w.admitted = true;
                w.phase = WorkloadPhase::Running;
                w.reason = "Admitted".into();
                w.message = String::new();
                w.submitted = Instant::now();
            }
        }
        self.maybe_finish(uid).await
    }

    /// Registers an agent's stream after its Hello; sends Welcome. The agent's identity comes
    /// from `who` (its credentials): a Hello naming another agent or node is refused, and a
    /// live stream of the same agent from another instance (pod) is not replaced.
    pub async fn attach(
        &self,
        hello: pb::Hello,
        who: &Principal,
        tx: AgentSender,
    ) -> Result<AgentHandle, Status> {
        if hello.agent_id.trim().is_empty() {
            return Err(Status::invalid_argument("Hello.agent_id must not be empty"));
        }
        let caps = hello.capabilities.unwrap_or_default();
        if caps.slots == 0 {
            return Err(Status::invalid_argument(
                "Hello.capabilities.slots must be at least 1",
            ));
        }
        if let Some(bound) = &who.agent
            && *bound != hello.agent_id
        {
            return Err(Status::permission_denied(format!(
                "these credentials belong to agent `{bound}`, not `{}`",
                hello.agent_id
            )));
        }
        if let Some(node) = &who.node
            && *node != hello.node
        {
            return Err(Status::permission_denied(format!(
                "these credentials belong to node `{node}`, not `{}`",
                hello.node
            )));
        }
        let (handle, replaced) = {
            let mut st = self.st();
            let Some(mesh) = st.meshes.get(&hello.mesh) else {
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
            if let Some(old) = st.agents.get_mut(&hello.agent_id) {
                if old.connected {
                    if old.instance.is_some() && old.instance != who.instance {
                        return Err(Status::already_exists(format!(
                            "agent `{}` is attached from another instance ({}); it is taken \
                             over only when that stream ends or its lease expires",
                            hello.agent_id,
                            old.instance.as_deref().unwrap_or("?")
                        )));
                    }
                    // The same instance reconnected: its old stream's shards go back to the
                    // queue.
                    old.connected = false;
                    replaced = std::mem::take(&mut old.running);
                }
                carried = (old.completed, old.credits, old.unschedulable);
            }
            st.next_session += 1;
            let session = st.next_session;
            let _ = tx.send(Ok(pb::OperatorMessage {
                msg: Some(Down::Welcome(welcome)),
            }));
            st.agents.insert(
                hello.agent_id.clone(),
                AgentState {
                    id: hello.agent_id.clone(),
                    mesh: hello.mesh.clone(),
                    node: hello.node.clone(),
                    instance: who.instance.clone(),
                    session,
                    tx,
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
                    last_heartbeat: Instant::now(),
                    completed: carried.0,
                    credits: carried.1,
                    refusals: 0,
                },
            );
            (
                AgentHandle {
                    id: hello.agent_id.clone(),
                    session,
                },
                replaced,
            )
        };
        let msg = format!(
            "node {} mesh {} slots {} providers {:?} gpus {} version {}",
            hello.node,
            hello.mesh,
            caps.slots,
            caps.execution_providers,
            caps.gpus.len(),
            hello.version
        );
        tracing::info!(agent = %hello.agent_id, %msg, "agent joined");
        self.store
            .append(&Event::new(EventKind::AgentJoined, msg).agent(&hello.agent_id))
            .await
            .map_err(internal)?;
        for (uid, index) in replaced {
            let attempt = self.attempt_of(&uid, index);
            self.requeue_or_fail(
                &uid,
                index,
                attempt,
                Some(&hello.agent_id),
                "agent reconnected",
                "AgentLost",
            )
            .await
            .map_err(internal)?;
        }
        self.dispatch().await.map_err(internal)?;
        Ok(handle)
    }

    fn attempt_of(&self, uid: &str, index: u32) -> u32 {
        self.st()
            .workloads
            .get(uid)
            .and_then(|w| w.shards.get(index as usize))
            .map(|s| s.attempt)
            .unwrap_or(0)
    }

    /// Handles one message from an attached agent. A malformed message is refused with
    /// `InvalidArgument` (the caller ends that stream; other agents are not disturbed); a
    /// report the agent may not make is answered with `Refused` and changes nothing.
    pub async fn handle(&self, who: &AgentHandle, msg: pb::AgentMessage) -> Result<(), Status> {
        {
            let st = self.st();
            if st
                .agents
                .get(&who.id)
                .is_none_or(|a| a.session != who.session || !a.connected)
            {
                return Err(Status::failed_precondition(
                    "this stream was replaced or its lease expired; reconnect",
                ));
            }
        }
        match msg.msg {
            None => Err(Status::invalid_argument("AgentMessage carries no message")),
            Some(Up::Hello(_)) => Err(Status::invalid_argument(
                "Hello was already sent on this stream",
            )),
            Some(Up::Heartbeat(hb)) => self.heartbeat(who, hb).await.map_err(internal),
            Some(Up::Completed(c)) => self.completed(who, c).await,
            Some(Up::Failed(f)) => self.failed(who, f).await,
        }
    }

    async fn heartbeat(&self, who: &AgentHandle, hb: pb::Heartbeat) -> Result<(), StoreError> {
        let lost = {
            let mut st = self.st();
            let grace = st
                .agents
                .get(&who.id)
                .and_then(|a| st.meshes.get(&a.mesh))
                .map(|m| Duration::from_secs(2 * u64::from(m.spec.heartbeat_seconds.max(1))))
                .unwrap_or(Duration::from_secs(10));
            let reported: HashSet<(&str, u32, u32)> = hb
                .running
                .iter()
                .map(|r| (key_uid(&r.workload), r.index, r.attempt))
                .collect();
            let now = Instant::now();
            let Some(a) = st.agents.get(&who.id) else {
                return Ok(());
            };
            // What the operator believes this agent runs; what of it the agent no longer
            // lists, past the grace, it lost.
            let mut believed: HashSet<(&str, u32, u32)> = HashSet::new();
            let mut lost = Vec::new();
            for (uid, index) in &a.running {
                let Some(s) = st
                    .workloads
                    .get(uid)
                    .and_then(|w| w.shards.get(*index as usize))
                else {
                    continue;
                };
                let ShardStatus::Running { agent, since } = &s.status else {
                    continue;
                };
                if *agent != who.id {
                    continue;
                }
                let held = (uid.as_str(), *index, s.attempt);
                believed.insert(held);
                if now.saturating_duration_since(*since) > grace && !reported.contains(&held) {
                    lost.push((uid.clone(), *index, s.attempt));
                }
            }
            // What it runs that it should not: cancel.
            let stray: Vec<pb::ShardRef> = hb
                .running
                .iter()
                .filter(|r| !believed.contains(&(key_uid(&r.workload), r.index, r.attempt)))
                .cloned()
                .collect();
            let Some(a) = st.agents.get_mut(&who.id) else {
                return Ok(());
            };
            a.last_heartbeat = now;
            a.loaded = hb.loaded_models.iter().cloned().collect();
            a.cached = hb.cached_models.iter().cloned().collect();
            for r in stray {
                tracing::info!(agent = %who.id, shard = %r.display(), "agent runs a shard it does not hold: cancelled");
                a.send(Down::Cancel(pb::Cancel {
                    shard: Some(r),
                    reason: "this agent does not hold that attempt".into(),
                }));
            }
            for (uid, index, _) in &lost {
                a.running.remove(&(uid.clone(), *index));
            }
            lost
        };
        if lost.is_empty() {
            return Ok(());
        }
        for (uid, index, attempt) in lost {
            self.requeue_or_fail(
                &uid,
                index,
                attempt,
                Some(&who.id),
                "the agent's heartbeat no longer lists the shard",
                "AgentLost",
            )
            .await?;
        }
        self.dispatch().await
    }

    /// Answers a report the agent may not make: a `Refused` on its stream, a
    /// `shard.report_refused` event (unless the store wrote it), the metric. Ends the stream
    /// with `PermissionDenied` past [`MAX_REFUSALS`].
    async fn refuse(
        &self,
        who: &AgentHandle,
        shard: &pb::ShardRef,
        uid: Option<&str>,
        refusal: Refusal,
        log_event: bool,
    ) -> Result<(), Status> {
        self.counters
            .refused
            .get_or_create(&RefusedLabels {
                reason: refusal.reason.into(),
            })
            .inc();
        tracing::warn!(agent = %who.id, shard = %shard.display(), reason = refusal.reason, message = %refusal.message, "report refused");
        if log_event {
            let mut e = Event::new(
                EventKind::ShardReportRefused,
                format!("{}: {}", refusal.reason, refusal.message),
            )
            .shard(shard.index, shard.attempt)
            .agent(&who.id);
            if let Some(uid) = uid {
                e = e.workload(uid);
            }
            self.store.append(&e).await.map_err(internal)?;
        }
        let refusals = {
            let mut st = self.st();
            let Some(a) = st.agents.get_mut(&who.id) else {
                return Ok(());
            };
            a.refusals += 1;
            a.send(Down::Refused(pb::Refused {
                shard: Some(shard.clone()),
                code: i32::from(refusal.code),
                reason: refusal.reason.into(),
                message: refusal.message,
            }));
            a.refusals
        };
        if refusals > MAX_REFUSALS {
            return Err(Status::permission_denied(format!(
                "{refusals} reports refused on this stream; disconnecting"
            )));
        }
        Ok(())
    }

    /// Judges a report's shard under the lock: `Ok((uid, workload state))` when `who` holds
    /// the reported attempt.
    fn judge(
        st: &State,
        who: &AgentHandle,
        shard: &pb::ShardRef,
    ) -> Result<String, (Option<String>, Refusal)> {
        let Some(w) = st.live(&shard.workload) else {
            let finished = st.finished.contains_key(&shard.workload);
            let refusal = if finished {
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
        accounting::judge_holder(s.status.standing(), s.attempt, &who.id, shard.attempt)
            .map_err(|r| (Some(uid.clone()), r))?;
        Ok(uid)
    }

    /// A completion: judged under the lock, its part checked and committed without it, then
    /// charged (group commit) and applied.
    async fn completed(&self, who: &AgentHandle, c: pb::Completed) -> Result<(), Status> {
        let shard = c
            .shard
            .clone()
            .ok_or_else(|| Status::invalid_argument("Completed carries no shard"))?;
        let verdict = {
            let mut st = self.st();
            Self::judge(&st, who, &shard).and_then(|uid| {
                let w = &st.workloads[&uid];
                let s = &w.shards[shard.index as usize];
                let expected = outputs::attempt_uri(&w.spec.output.uri, shard.index, s.attempt);
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
                let elapsed = since.elapsed();
                accounting::check_completed_numbers(
                    c.compute_seconds,
                    c.records,
                    accounting::max_records(s.range.start, s.range.end),
                    &c.sha256,
                    elapsed,
                )
                .map_err(|r| (Some(uid.clone()), r))?;
                let device = st
                    .agents
                    .get(&who.id)
                    .map(|a| a.device)
                    .unwrap_or(Device::Cpu);
                let price = st.meshes.get(&w.mesh).map(|m| m.price).unwrap_or_default();
                let accepted = Accepted {
                    uid: uid.clone(),
                    namespace: w.namespace.clone(),
                    output: w.spec.output.uri.clone(),
                    index: shard.index,
                    attempt: s.attempt,
                    elapsed,
                    device,
                    price,
                };
                // The slot is free from now on; the shard is the holder's until committed.
                if let Some(a) = st.agents.get_mut(&who.id) {
                    a.running.remove(&(uid.clone(), shard.index));
                }
                if let Some(w) = st.workloads.get_mut(&uid) {
                    w.shards[shard.index as usize].status = ShardStatus::Committing {
                        agent: who.id.clone(),
                    };
                }
                Ok(accepted)
            })
        };
        let acc = match verdict {
            Ok(acc) => acc,
            Err((uid, refusal)) => {
                return self
                    .refuse(who, &shard, uid.as_deref(), refusal, true)
                    .await;
            }
        };
        // The freed slot gets its next shard while this part is checked.
        self.dispatch().await.map_err(internal)?;

        let attempt_uri = outputs::attempt_uri(&acc.output, acc.index, acc.attempt);
        let reported = PartFacts {
            bytes: c.output_bytes,
            sha256: c.sha256.to_ascii_lowercase(),
            records: c.records,
        };
        let problem = match outputs::inspect(&attempt_uri).await {
            Ok(found) => outputs::compare(&reported, &found).err(),
            Err(e) => Some(format!("cannot read the part: {e}")),
        };
        let price = if problem.is_none() {
            let time = accounting::charged_time(acc.elapsed, c.compute_seconds);
            let device = acc.device.charged(&c.device);
            accounting::charge(&acc.price, device, time, c.records)
                .map(|p| (p, time, device))
                .map_err(|e| e.to_string())
        } else {
            Err(String::new())
        };
        let (price, time, device) = match (problem, price) {
            (None, Ok(p)) => p,
            (problem, price) => {
                let refusal = match problem {
                    Some(p) => Refusal::mismatch(p),
                    None => Refusal::invalid(price.err().unwrap_or_default()),
                };
                let reason = format!("{}: {}", refusal.reason, refusal.message);
                let answer = self
                    .refuse(who, &shard, Some(&acc.uid), refusal, true)
                    .await;
                // The holder's attempt produced nothing usable: it counts as a failed attempt.
                self.requeue_or_fail(
                    &acc.uid,
                    acc.index,
                    acc.attempt,
                    Some(&who.id),
                    &reason,
                    "OutputMismatch",
                )
                .await
                .map_err(internal)?;
                self.dispatch().await.map_err(internal)?;
                return answer;
            }
        };
        let record = CompletionRecord {
            workload_uid: acc.uid.clone(),
            namespace: acc.namespace.clone(),
            shard: acc.index,
            attempt: acc.attempt,
            agent: who.id.clone(),
            records: c.records,
            output_uri: outputs::part_uri(&acc.output, acc.index),
            sha256: reported.sha256.clone(),
            price,
            device: device.as_str().into(),
            compute_seconds: time.as_secs_f64(),
        };
        match self.committer.complete(record.clone()).await {
            Ok(ChargeOutcome::Charged) => {
                // Charged: move the part to its final name. A failure here is redone before
                // the manifest is written.
                if let Err(e) = outputs::commit(&acc.output, acc.index, acc.attempt).await {
                    tracing::warn!(workload = %acc.uid, shard = acc.index, error = %e, "part not moved to its final name yet");
                }
                self.apply_completion(&record);
                self.maybe_finish(&acc.uid).await.map_err(internal)?;
                Ok(())
            }
            Ok(ChargeOutcome::Refused) => {
                // The store says the attempt is not running there (another operator took
                // the shard): the event is in the log; tell the agent.
                {
                    let mut st = self.st();
                    if let Some(w) = st.workloads.get_mut(&acc.uid) {
                        let s = &mut w.shards[acc.index as usize];
                        if s.attempt == acc.attempt
                            && matches!(s.status, ShardStatus::Committing { .. })
                        {
                            s.status = ShardStatus::Elsewhere;
                        }
                    }
                }
                let refusal = Refusal {
                    code: tonic::Code::FailedPrecondition,
                    reason: "stale_attempt",
                    message: "the store does not hold this attempt as running on this agent".into(),
                };
                self.refuse(who, &shard, Some(&acc.uid), refusal, false)
                    .await
            }
            Err(e) => {
                // Not recorded: the attempt goes back to the queue.
                self.requeue_or_fail(
                    &acc.uid,
                    acc.index,
                    acc.attempt,
                    Some(&who.id),
                    &e.to_string(),
                    "StorageError",
                )
                .await
                .map_err(internal)?;
                self.dispatch().await.map_err(internal)?;
                Err(internal(e))
            }
        }
    }

    /// Applies a committed completion to memory.
    fn apply_completion(&self, c: &CompletionRecord) {
        let mut st = self.st();
        let State {
            workloads,
            agents,
            balances,
            ..
        } = &mut *st;
        let Some(w) = workloads.get_mut(&c.workload_uid) else {
            return;
        };
        let s = &mut w.shards[c.shard as usize];
        if s.status == ShardStatus::Succeeded || s.attempt != c.attempt {
            return;
        }
        s.status = ShardStatus::Succeeded;
        w.succeeded += 1;
        s.records = c.records;
        s.sha256 = c.sha256.clone();
        self.counters.completed.inc();
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
    }

    async fn failed(&self, who: &AgentHandle, f: pb::Failed) -> Result<(), Status> {
        let shard = f
            .shard
            .clone()
            .ok_or_else(|| Status::invalid_argument("Failed carries no shard"))?;
        let verdict = {
            let mut st = self.st();
            let verdict = Self::judge(&st, who, &shard);
            if let Ok(uid) = &verdict
                && let Some(a) = st.agents.get_mut(&who.id)
            {
                a.running.remove(&(uid.clone(), shard.index));
            }
            verdict
        };
        let uid = match verdict {
            Ok(uid) => uid,
            Err((uid, refusal)) => {
                return self
                    .refuse(who, &shard, uid.as_deref(), refusal, true)
                    .await;
            }
        };
        let kind = pb::ErrorKind::try_from(f.kind).unwrap_or(pb::ErrorKind::Unspecified);
        let message = f.message;
        tracing::warn!(workload = %shard.workload, shard = shard.index, attempt = shard.attempt, agent = %who.id, error = %message, retryable = f.retryable, "shard failed");
        if f.retryable {
            self.requeue_or_fail(
                &uid,
                shard.index,
                shard.attempt,
                Some(&who.id),
                &message,
                reason_for(kind),
            )
            .await
            .map_err(internal)?;
        } else {
            self.fail_shard(&uid, shard.index, shard.attempt, Some(&who.id), &message)
                .await
                .map_err(internal)?;
            self.fail_workload(&uid, reason_for(kind), &message)
                .await
                .map_err(internal)?;
        }
        self.dispatch().await.map_err(internal)
    }

    /// Marks a shard failed for good (store first).
    async fn fail_shard(
        &self,
        uid: &str,
        index: u32,
        attempt: u32,
        agent: Option<&str>,
        message: &str,
    ) -> Result<(), StoreError> {
        if self
            .store
            .fail_shard(uid, index, attempt, agent, message)
            .await?
        {
            let mut st = self.st();
            if let Some(s) = st
                .workloads
                .get_mut(uid)
                .and_then(|w| w.shards.get_mut(index as usize))
                && s.attempt == attempt
                && s.status != ShardStatus::Succeeded
            {
                s.status = ShardStatus::Failed;
                self.counters.failed.inc();
            }
        }
        Ok(())
    }

    /// Puts attempt `attempt` of a shard back in the queue, or fails the shard (and its
    /// workload) when it is out of attempts. Nothing happens unless the shard is still at that
    /// attempt and running (or being committed) there.
    async fn requeue_or_fail(
        &self,
        uid: &str,
        index: u32,
        attempt: u32,
        agent: Option<&str>,
        reason: &str,
        fail_reason: &'static str,
    ) -> Result<(), StoreError> {
        let decision = {
            let st = self.st();
            let Some(w) = st.workloads.get(uid) else {
                return Ok(());
            };
            let Some(s) = w.shards.get(index as usize) else {
                return Ok(());
            };
            let ours = match &s.status {
                ShardStatus::Running { agent: a, .. } | ShardStatus::Committing { agent: a } => {
                    agent.is_none_or(|x| x == a)
                }
                _ => false,
            };
            if !ours || s.attempt != attempt {
                return Ok(());
            }
            (
                lease::requeue(attempt, w.spec.max_attempts),
                w.phase.is_terminal(),
            )
        };
        match decision {
            (Requeue::Retry { .. }, false) => {
                let held = self
                    .store
                    .requeue(uid, index, attempt, agent, reason)
                    .await?;
                let mut st = self.st();
                if let Some(w) = st.workloads.get_mut(uid) {
                    let s = &mut w.shards[index as usize];
                    if held
                        && s.attempt == attempt
                        && matches!(
                            s.status,
                            ShardStatus::Running { .. } | ShardStatus::Committing { .. }
                        )
                    {
                        s.status = ShardStatus::Pending;
                        w.retried += 1;
                        self.counters.requeued.inc();
                        tracing::info!(workload = %w.key, shard = index, attempt, %reason, "shard requeued");
                    }
                }
                Ok(())
            }
            (Requeue::Retry { .. }, true) => {
                let mut st = self.st();
                if let Some(w) = st.workloads.get_mut(uid) {
                    w.shards[index as usize].status = ShardStatus::Pending;
                }
                Ok(())
            }
            (Requeue::Exhausted, _) => {
                let message =
                    format!("shard {index} failed after {attempt} attempts; last error: {reason}");
                self.fail_shard(uid, index, attempt, agent, &message)
                    .await?;
                let reason = if attempt > 1 {
                    "AttemptsExhausted"
                } else {
                    fail_reason
                };
                self.fail_workload(uid, reason, &message).await
            }
        }
    }

    /// Fails a workload: the store first, then memory; its running shards are cancelled on
    /// their agents (their slots are free from then on) and it leaves memory.
    async fn fail_workload(
        &self,
        uid: &str,
        reason: &str,
        message: &str,
    ) -> Result<(), StoreError> {
        {
            let mut st = self.st();
            let Some(w) = st.workloads.get_mut(uid) else {
                return Ok(());
            };
            if w.phase.is_terminal() || w.finishing {
                return Ok(());
            }
            w.finishing = true;
        }
        let admitted = self.st().workloads.get(uid).is_some_and(|w| w.admitted);
        if admitted
            && let Err(e) = self
                .store
                .finish_workload(uid, "Failed", &format!("{reason}: {message}"))
                .await
        {
            if let Some(w) = self.st().workloads.get_mut(uid) {
                w.finishing = false;
            }
            return Err(e);
        }
        let mut st = self.st();
        let State {
            workloads, agents, ..
        } = &mut *st;
        let Some(w) = workloads.get_mut(uid) else {
            return Ok(());
        };
        w.phase = WorkloadPhase::Failed;
        w.reason = reason.to_string();
        w.message = message.to_string();
        w.finished = Some(Instant::now());
        tracing::error!(workload = %w.key, %reason, %message, "workload failed");
        for a in agents.values_mut() {
            let cancelled: Vec<u32> = a
                .running
                .iter()
                .filter(|(u, _)| u == uid)
                .map(|(_, i)| *i)
                .collect();
            for index in cancelled {
                a.running.remove(&(uid.to_string(), index));
                a.send(Down::Cancel(pb::Cancel {
                    shard: Some(pb::ShardRef {
                        workload: w.key.clone(),
                        index,
                        attempt: w.shards[index as usize].attempt,
                    }),
                    reason: format!("workload failed: {reason}"),
                }));
            }
        }
        for s in &mut w.shards {
            if matches!(
                s.status,
                ShardStatus::Running { .. } | ShardStatus::Committing { .. }
            ) {
                s.status = ShardStatus::Pending;
            }
        }
        retire(&mut st, uid);
        Ok(())
    }

    /// Once every shard is done: commits any part not yet at its final name, writes the
    /// manifest (`_SUCCESS.json`, committed parts only), clears what attempts left, and marks
    /// the workload Succeeded. All of it without the lock.
    async fn maybe_finish(&self, uid: &str) -> Result<(), CoreError> {
        let (output, manifest, parts, message) = {
            let mut st = self.st();
            let Some(w) = st.workloads.get_mut(uid) else {
                return Ok(());
            };
            if !w.admitted || w.finishing || w.phase.is_terminal() || w.succeeded < w.shards.len() {
                return Ok(());
            }
            w.finishing = true;
            let output = w.spec.output.uri.clone();
            let parts: Vec<ManifestPart> = w
                .shards
                .iter()
                .map(|s| ManifestPart {
                    index: s.range.index,
                    uri: outputs::part_uri(&output, s.range.index),
                    records: s.records,
                    sha256: s.sha256.clone(),
                })
                .collect();
            let manifest = serde_json::json!({
                "workload": format!("{}/{}", w.namespace, w.name),
                "uid": w.uid,
                "input": w.spec.input.uri,
                "inputBytes": w.input_size,
                // The pinned sha256 is the model that ran (content addressing); when the
                // URI held another file at admission, what it hashed to is kept beside it.
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
                "completedAt": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            });
            let attempts: Vec<(u32, u32)> = w
                .shards
                .iter()
                .map(|s| (s.range.index, s.attempt))
                .collect();
            let message = format!("{} records in {} shards", w.records, w.shards.len());
            (output, manifest, attempts, message)
        };
        let written: Result<(), String> = async {
            for (index, attempt) in &parts {
                outputs::commit(&output, *index, *attempt)
                    .await
                    .map_err(|e| format!("cannot commit part {index}: {e}"))?;
            }
            let body = serde_json::to_vec_pretty(&manifest).map_err(|e| e.to_string())?;
            Location::parse(&output)
                .map_err(|e| e.to_string())?
                .child(outputs::MANIFEST)
                .put(body.into())
                .await
                .map_err(|e| format!("cannot write {}: {e}", outputs::MANIFEST))?;
            outputs::clear_attempts(&output)
                .await
                .map_err(|e| format!("cannot clear {}: {e}", outputs::ATTEMPTS))?;
            Ok(())
        }
        .await;
        let reset = |st: &mut State| {
            if let Some(w) = st.workloads.get_mut(uid) {
                w.finishing = false;
            }
        };
        if let Err(e) = written {
            reset(&mut self.st());
            self.fail_workload(uid, "StorageError", &e).await?;
            return Ok(());
        }
        if let Err(e) = self.store.finish_workload(uid, "Succeeded", &message).await {
            reset(&mut self.st());
            return Err(e.into());
        }
        let mut st = self.st();
        if let Some(w) = st.workloads.get_mut(uid) {
            w.phase = WorkloadPhase::Succeeded;
            w.reason = "Succeeded".into();
            w.message = message;
            w.finished = Some(Instant::now());
            tracing::info!(workload = %w.key, records = w.records, "workload succeeded");
        }
        retire(&mut st, uid);
        Ok(())
    }

    /// One dispatch round: pending shards to agents with free slots. Decided under the lock,
    /// claimed in the store in one statement, applied to memory after (store first).
    async fn dispatch(&self) -> Result<(), StoreError> {
        let _round = self.round.lock().await;
        let claims = {
            let mut st = self.st();
            plan_round(&mut st)
        };
        if claims.is_empty() {
            return Ok(());
        }
        let won = self.store.assign_batch(&claims).await?;
        let mut orphaned = Vec::new();
        {
            let mut st = self.st();
            let State {
                workloads, agents, ..
            } = &mut *st;
            let now = Instant::now();
            for (c, won) in claims.iter().zip(won) {
                let Some(w) = workloads.get_mut(&c.uid) else {
                    continue;
                };
                let s = &mut w.shards[c.shard as usize];
                if !won {
                    // Another operator claimed this attempt first: it runs there, not here.
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
                        a.send(Down::Assign(assignment(w, c.shard, c.attempt)));
                        self.counters.dispatched.inc();
                    }
                    _ => orphaned.push(c.clone()),
                }
            }
        }
        for c in orphaned {
            self.requeue_or_fail(
                &c.uid,
                c.shard,
                c.attempt,
                Some(&c.agent),
                "the agent left before its assignment went out",
                "AgentLost",
            )
            .await?;
        }
        Ok(())
    }

    /// An agent's stream ended. Its shards go back to the queue.
    pub async fn detach(&self, who: &AgentHandle, reason: &str) -> Result<(), CoreError> {
        self.lose_agent(&who.id, Some(who.session), reason).await?;
        self.dispatch().await?;
        Ok(())
    }

    async fn lose_agent(
        &self,
        id: &str,
        session: Option<u64>,
        reason: &str,
    ) -> Result<(), StoreError> {
        let running = {
            let mut st = self.st();
            let Some(a) = st.agents.get_mut(id) else {
                return Ok(());
            };
            if !a.connected || session.is_some_and(|s| s != a.session) {
                return Ok(());
            }
            a.connected = false;
            a.disconnected_at = Some(Instant::now());
            std::mem::take(&mut a.running)
        };
        if running.is_empty() {
            tracing::info!(agent = %id, %reason, "agent left");
        } else {
            tracing::warn!(agent = %id, shards = running.len(), %reason, "agent lost");
        }
        // Nothing held, nothing lost: a clean exit (a drain, a shutdown) is its own event.
        let event = if running.is_empty() {
            Event::new(EventKind::AgentLeft, reason)
        } else {
            Event::new(
                EventKind::AgentLost,
                format!("{reason}; {} shards requeued", running.len()),
            )
        };
        self.store.append(&event.agent(id)).await?;
        for (uid, index) in running {
            let attempt = self.attempt_of(&uid, index);
            self.requeue_or_fail(&uid, index, attempt, Some(id), reason, "AgentLost")
                .await?;
        }
        Ok(())
    }

    /// Expires the leases of agents silent for longer than their Mesh's lease, and forgets
    /// agents long gone.
    pub async fn reap(&self, now: Instant) -> Result<Vec<String>, CoreError> {
        let lost: Vec<(String, u64)> = {
            let mut st = self.st();
            st.agents.retain(|_, a| {
                a.connected
                    || !a.running.is_empty()
                    || a.disconnected_at
                        .is_none_or(|t| now.saturating_duration_since(t) < FORGET_AFTER)
            });
            let mut lost = Vec::new();
            for (mesh_name, mesh) in &st.meshes {
                let lease = Duration::from_secs(u64::from(mesh.spec.lease_seconds));
                let candidates = st
                    .agents
                    .values()
                    .filter(|a| a.connected && &a.mesh == mesh_name)
                    .map(|a| (a.id.as_str(), a.last_heartbeat));
                lost.extend(
                    lease::expired(now, lease, candidates)
                        .into_iter()
                        .map(|id| (id.to_string(), st.agents[id].session)),
                );
            }
            for (id, _) in &lost {
                if let Some(a) = st.agents.get(id) {
                    let _ = a.tx.send(Err(Status::deadline_exceeded(
                        "lease expired: no heartbeat",
                    )));
                }
            }
            lost
        };
        for (id, session) in &lost {
            self.lose_agent(id, Some(*session), "lease expired: no heartbeat")
                .await?;
        }
        let timed_out = self.take_timed_out(now);
        for (uid, index, attempt, agent, limit) in &timed_out {
            self.requeue_or_fail(
                uid,
                *index,
                *attempt,
                Some(agent),
                &format!("no report within the shard timeout of {limit}s"),
                "ShardTimeout",
            )
            .await?;
        }
        if !lost.is_empty() || !timed_out.is_empty() {
            self.dispatch().await?;
        }
        Ok(lost.into_iter().map(|(id, _)| id).collect())
    }

    /// Running attempts older than their workload's `shardTimeoutSeconds` at `now`: taken from
    /// their agents (a Cancel each; their slots are free) and returned for requeueing.
    fn take_timed_out(&self, now: Instant) -> Vec<(String, u32, u32, String, u32)> {
        let mut st = self.st();
        let State {
            workloads, agents, ..
        } = &mut *st;
        let mut out = Vec::new();
        for w in workloads.values() {
            let Some(limit) = w.spec.shard_timeout_seconds else {
                continue;
            };
            for s in &w.shards {
                if let ShardStatus::Running { agent, since } = &s.status
                    && now.saturating_duration_since(*since) > Duration::from_secs(u64::from(limit))
                {
                    if let Some(a) = agents.get_mut(agent) {
                        a.running.remove(&(w.uid.clone(), s.range.index));
                        a.send(Down::Cancel(pb::Cancel {
                            shard: Some(pb::ShardRef {
                                workload: w.key.clone(),
                                index: s.range.index,
                                attempt: s.attempt,
                            }),
                            reason: format!("no report within the shard timeout of {limit}s"),
                        }));
                    }
                    tracing::warn!(workload = %w.key, shard = s.range.index, attempt = s.attempt, %agent, limit, "shard timed out");
                    out.push((
                        w.uid.clone(),
                        s.range.index,
                        s.attempt,
                        agent.clone(),
                        limit,
                    ));
                }
            }
        }
        out
    }

    /// Drains (or undrains) an agent: no new shards; running ones finish.
    pub async fn set_unschedulable(
        &self,
        agent: &str,
        unschedulable: bool,
    ) -> Result<(), CoreError> {
        if let Some(a) = self.st().agents.get_mut(agent) {
            a.unschedulable = unschedulable;
        }
        Ok(self.dispatch().await?)
    }

    /// Tells every connected agent to drain (finish and exit).
    pub async fn drain_all(&self, reason: &str) {
        let st = self.st();
        for a in st.agents.values().filter(|a| a.connected) {
            a.send(Down::Drain(pb::Drain {
                reason: reason.into(),
            }));
        }
    }

    /// A summary of every workload the core holds, live and finished (until released), in
    /// the order they came.
    pub async fn workloads(&self) -> Vec<WorkloadSummary> {
        let st = self.st();
        let mut all: Vec<(u64, WorkloadSummary)> = st
            .workloads
            .values()
            .map(|w| (w.seq, summarize(w)))
            .chain(st.finished.values().cloned())
            .collect();
        all.sort_by_key(|(seq, _)| *seq);
        all.into_iter().map(|(_, s)| s).collect()
    }

    /// A summary of every agent.
    pub async fn agents(&self) -> Vec<AgentSummary> {
        let st = self.st();
        st.agents
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

/// Moves a finished workload's summary aside and drops its shards from memory.
fn retire(st: &mut State, uid: &str) {
    if let Some(w) = st.workloads.remove(uid) {
        for a in st.agents.values_mut() {
            a.running.retain(|(u, _)| u != uid);
        }
        st.finished.insert(w.key.clone(), (w.seq, summarize(&w)));
    }
}

/// The claims of one dispatch round (pure: reads the state, changes only reasons).
fn plan_round(st: &mut State) -> Vec<Claim> {
    let views: Vec<AgentView> = st
        .agents
        .values()
        .map(|a| AgentView {
            id: a.id.clone(),
            mesh: a.mesh.clone(),
            free_slots: a.slots.saturating_sub(a.running.len() as u32),
            schedulable: a.connected && !a.unschedulable,
            loaded: a.loaded.clone(),
            cached: a.cached.clone(),
            providers: a.providers.clone(),
            gpu_memory: a.gpus.iter().map(|g| g.memory_bytes).min().unwrap_or(0),
        })
        .collect();
    if views.iter().all(|v| !v.schedulable || v.free_slots == 0) {
        return Vec::new();
    }
    // Namespaces out of credits dispatch nothing more (running shards finish).
    let blocked: Vec<String> = st
        .workloads
        .values()
        .filter(|w| w.admitted && !w.phase.is_terminal() && st.out_of_credits(w))
        .map(|w| w.uid.clone())
        .collect();
    for uid in &blocked {
        let (ns, mesh, left, budget) = {
            let w = &st.workloads[uid];
            let budget = st
                .meshes
                .get(&w.mesh)
                .and_then(|m| m.spec.budgets.iter().find(|b| b.namespace == w.namespace))
                .and_then(|b| pricing::credits_to_micro(b.credits).ok())
                .unwrap_or(0);
            (
                w.namespace.clone(),
                w.mesh.clone(),
                st.balances.get(&w.namespace).copied().unwrap_or(0),
                budget,
            )
        };
        if let Some(w) = st.workloads.get_mut(uid)
            && w.reason != "QuotaExceeded"
        {
            tracing::warn!(workload = %w.key, "namespace out of credits: dispatch paused");
            w.reason = "QuotaExceeded".into();
            w.message = quota_message(&ns, &mesh, left, budget);
        }
    }
    let mut order: Vec<&WorkloadState> = st
        .workloads
        .values()
        .filter(|w| {
            w.phase == WorkloadPhase::Running && !w.spec.suspend && !blocked.contains(&w.uid)
        })
        .collect();
    order.sort_by_key(|w| w.seq);
    let mut pending = Vec::new();
    for (i, w) in order.iter().enumerate() {
        let model = w.model_key();
        pending.extend(
            w.shards
                .iter()
                // A shard out of attempts is failed, never claimed again.
                .filter(|s| s.status == ShardStatus::Pending && s.attempt < w.spec.max_attempts)
                .map(|s| PendingShard {
                    workload: i,
                    shard: s.range.index,
                    mesh: w.mesh.clone(),
                    priority: w.spec.priority,
                    model: model.clone(),
                    needs: w.validated.needs.clone(),
                }),
        );
    }
    scheduler::schedule(&views, &pending)
        .into_iter()
        .map(|p| {
            let w = order[p.workload];
            Claim {
                uid: w.uid.clone(),
                shard: p.shard,
                attempt: w.shards[p.shard as usize].attempt + 1,
                agent: views[p.agent].id.clone(),
            }
        })
        .collect()
}

/// The Assign of attempt `attempt` of shard `index`: the part goes to the attempt's own
/// location.
fn assignment(w: &WorkloadState, index: u32, attempt: u32) -> pb::Assign {
    let s = &w.shards[index as usize];
    pb::Assign {
        shard: Some(pb::ShardRef {
            workload: w.key.clone(),
            index,
            attempt,
        }),
        model: Some(w.validated.model.clone()),
        task: Some(w.validated.task.clone()),
        input: Some(pb::InputRange {
            uri: w.spec.input.uri.clone(),
            format: "jsonl".into(),
            start: s.range.start,
            end: s.range.end,
            size: w.input_size,
        }),
        output_uri: outputs::attempt_uri(&w.spec.output.uri, index, attempt),
        batch_size: w.spec.batch_size,
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
        shards_pending: count(|s| matches!(s, ShardStatus::Pending)),
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
    }
}

#[cfg(test)]
pub(crate) mod tests;
