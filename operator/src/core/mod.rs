//! The operator core: workloads, shards, agents, leases and the ledger hook. It knows nothing
//! of Kubernetes; the controllers (cluster mode) and `infermesh local` drive it, and the gRPC
//! server feeds it agent messages.
//!
//! It is two parts: a pure state machine ([`machine`]: events in, effects out) and the
//! executor here ([`Core`]) that performs the effects. How it keeps its promises:
//! - **No I/O under the lock.** The machine sits behind a `std::sync::Mutex`, whose guard
//!   cannot be held across an `.await`. A transition runs under the lock and returns effects;
//!   messages to agents are channel pushes and are delivered there, store and object writes
//!   are performed with the lock released.
//! - **Store first, memory follows.** A change that needs the store is two transitions: one
//!   decides (claims a round, judges a report), the store write follows, and a second
//!   transition applies what the store accepted. A failed write changes nothing in memory.
//!   Every store write that moves a shard is a compare-and-set on its state, holder and
//!   attempt, so two paths racing over one shard (a lease expiring while its completion is
//!   committed, two operators) cannot both win, and applying the winner is idempotent.
//! - **Agents are untrusted.** A report is accepted only from the holder of the shard's
//!   current attempt; prices come from the operator's clock and the registered device; the
//!   part is checked and committed by the operator ([`outputs`]).
//! - **Finished workloads leave memory.** Their summaries stay until the caller has written
//!   them ([`Core::release`]); the store keeps the history.

pub mod accounting;
pub mod inputs;
pub mod lease;
pub mod machine;
pub mod models;
pub mod outputs;
pub mod parts;
pub mod planner;
pub mod pricing;
pub mod progress;
pub mod scheduler;
pub mod sim;
pub mod tenancy;
pub mod validate;

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, MutexGuard};
use std::time::Instant;

use infermesh_crds::{MeshSpec, WorkloadPhase, WorkloadSpec};
use infermesh_io::Location;
use infermesh_proto as pb;
use pb::agent_message::Msg as Up;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::mpsc;
use tonic::Status;

use crate::grpc::Principal;
use crate::store::group::GroupCommitter;
use crate::store::{
    ChargeOutcome, CompletionRecord, Event, EventKind, GrantKind, ReopenOutcome, ShardRecord,
    Store, StoreError, StoredWorkload, WorkloadRecord,
};
use accounting::Refusal;
use machine::{
    Effect, FinishPlan, Machine, NewWorkload, RequeueOrder, RequeuePlan, ShardState, ShardStatus,
    Tally,
};
use outputs::PartFacts;
use pricing::Price;
use progress::{AgentSummary, WorkloadSummary};

/// How long a ping of the store may take before the store counts as unavailable.
pub const PING_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);

/// Messages to one agent's stream.
pub type AgentSender = mpsc::UnboundedSender<Result<pb::OperatorMessage, Status>>;

/// Refused reports one stream may send before it is ended with `PermissionDenied`, so a
/// flood cannot fill the event log.
pub const MAX_REFUSALS: u32 = 32;

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
    /// Another live workload writes where this one would (an output location that is, or
    /// lies above or below, the other's): this one waits until that one finishes.
    #[error("OutputInUse: {0}")]
    OutputInUse(String),
    /// The store holds this run (its uid) as finished: it is never run again.
    #[error("workload {key} already finished ({phase}); create a new Workload to run it again")]
    Finished {
        /// The workload key.
        key: String,
        /// `Succeeded` or `Failed`.
        phase: String,
    },
}

impl CoreError {
    /// Whether the store failed in a way that waiting can cure (it does not answer).
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Store(e) if e.is_transient())
    }
}

/// Another live workload, as a workload of `namespace` may be told of it: by its key when it
/// is in the same namespace, else without naming it (another tenant's names are its own).
fn other_workload(key: &str, namespace: &str) -> String {
    if key.split('/').next() == Some(namespace) {
        format!("live workload {key}")
    } else {
        "a live workload of another namespace".into()
    }
}

/// The error of a part that cannot be moved yet: its workload's credentials are not held.
fn no_credentials(output: &str) -> infermesh_io::ObjectError {
    infermesh_io::ObjectError::local(
        output,
        std::io::Error::other("the workload's credentials are not held yet"),
    )
}

/// What [`Core::retry_failed`] did. Every outcome but `Retried` is a refusal that changed
/// nothing, for the caller to show.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RetryOutcome {
    /// The workload was failed and runs again.
    Retried {
        /// Shards put back in the queue (every shard that had not succeeded).
        requeued: u32,
        /// Of those, the shards that had failed for good.
        failed: u32,
        /// Succeeded shards kept, with their parts and charges.
        kept: u32,
    },
    /// The workload is not failed: `phase` is where it is (`Pending`, `Running`,
    /// `Succeeded`).
    NotFailed {
        /// Its phase.
        phase: String,
    },
    /// No workload with this key, here or in the store.
    Unknown,
    /// The store does not answer: nothing changed; ask again later.
    StoreUnavailable {
        /// What the store said.
        message: String,
    },
}

/// The name of a phase, as the store and the status write it.
fn phase_name(phase: WorkloadPhase) -> &'static str {
    match phase {
        WorkloadPhase::Pending => "Pending",
        WorkloadPhase::Running => "Running",
        WorkloadPhase::Succeeded => "Succeeded",
        WorkloadPhase::Failed => "Failed",
    }
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
    /// Version (ETag) of the input object when it was sized; every read asks for it.
    pub input_version: Option<String>,
    /// The input's files when it is not one plain JSONL object ([`inputs::resolve`]);
    /// `input_size` is then their virtual size.
    pub input_files: Option<infermesh_io::Dataset>,
    /// The object-store credentials of `spec.credentials` (read from its Secret by the
    /// caller): the operator's own reads and writes for this workload use them, and each of
    /// its Assigns carries them. Kept in memory only.
    pub credentials: Option<infermesh_io::Credentials>,
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
    /// 1 while the store answers, 0 during an outage.
    pub store_available: Gauge,
}

/// The machine and the agents' streams, behind one lock.
#[derive(Default)]
struct Inner {
    machine: Machine,
    /// Each agent's current stream: (session, sender).
    links: HashMap<String, (u64, AgentSender)>,
}

/// A checked completion waiting for the store: who reported it, the shard reference it
/// named, the workload's output location, and the record to commit.
type Held = (AgentHandle, pb::ShardRef, String, CompletionRecord);

/// The core: the state machine ([`machine`]) and its executor. `S` is the store backend.
pub struct Core<S: Store> {
    store: Arc<S>,
    committer: GroupCommitter,
    /// Part checks and moves, batched for local files ([`parts`]).
    parts: parts::Parts,
    inner: std::sync::Mutex<Inner>,
    /// One dispatch round at a time (claims are decided, stored, then applied).
    round: tokio::sync::Mutex<()>,
    /// A round was asked for while another ran: the running one goes round again instead of
    /// every caller queueing for a round of its own ([`Core::dispatch`]).
    round_wanted: AtomicBool,
    counters: ShardCounters,
    /// False while the store is unreachable: nothing is dispatched, and reports that need
    /// the store wait for it ([`Core::recover`]).
    store_up: Arc<AtomicBool>,
    /// Completions checked while the store was down, committed when it is back.
    parked: std::sync::Mutex<Vec<Held>>,
    /// A dispatch round or a requeue failed on the store: [`Core::sweep`] looks for what it
    /// left undone (only then: the look scans every live shard).
    sweep_owed: AtomicBool,
}

/// The key of a workload on the wire and in logs: `namespace/name/uid`.
pub fn workload_key(namespace: &str, name: &str, uid: &str) -> String {
    format!("{namespace}/{name}/{uid}")
}

fn reason_for(kind: pb::ErrorKind) -> &'static str {
    match kind {
        pb::ErrorKind::ModelLoad => "ModelLoadFailed",
        pb::ErrorKind::TokenizerLoad => "TokenizerLoadFailed",
        pb::ErrorKind::InvalidInput => "InvalidInput",
        pb::ErrorKind::Io => "StorageError",
        pb::ErrorKind::Inference => "InferenceFailed",
        pb::ErrorKind::Forbidden => "Forbidden",
        pb::ErrorKind::Cancelled | pb::ErrorKind::Unspecified => "ShardFailed",
    }
}

fn internal(e: impl std::fmt::Display) -> Status {
    Status::internal(e.to_string())
}

impl<S: Store> Core<S> {
    /// A core over `store`.
    pub fn new(store: S) -> Self {
        let store = Arc::new(store);
        let committer = GroupCommitter::spawn(store.clone());
        let counters = ShardCounters::default();
        counters.store_available.set(1);
        Self {
            store,
            committer,
            parts: parts::Parts::spawn(),
            inner: std::sync::Mutex::new(Inner::default()),
            round: tokio::sync::Mutex::new(()),
            round_wanted: AtomicBool::new(false),
            counters,
            store_up: Arc::new(AtomicBool::new(true)),
            parked: std::sync::Mutex::new(Vec::new()),
            sweep_owed: AtomicBool::new(false),
        }
    }

    /// Whether the store answered the last time it was asked (`/readyz` follows it).
    pub fn store_available(&self) -> bool {
        self.store_up.load(Ordering::Relaxed)
    }

    /// The flag behind [`Core::store_available`], for the readiness endpoint.
    pub fn store_flag(&self) -> Arc<AtomicBool> {
        self.store_up.clone()
    }

    /// After a store call failed: whether the store is unreachable (one round trip tells).
    /// If so the core goes into outage mode: dispatch pauses, agents stay attached, and
    /// [`Core::recover`] (the lease reaper calls it) picks up when the store answers again.
    pub async fn check_store(&self) -> bool {
        let answer = tokio::time::timeout(PING_TIMEOUT, self.store.ping())
            .await
            .unwrap_or_else(|_| Err(StoreError::Unavailable("no answer to a ping".into())));
        match answer {
            Ok(()) => false,
            Err(e) if e.is_transient() => {
                if self.store_up.swap(false, Ordering::Relaxed) {
                    self.counters.store_available.set(0);
                    tracing::error!(error = %e, "the store is unavailable: dispatch paused, reports held until it answers");
                }
                true
            }
            Err(_) => false,
        }
    }

    /// Once the store answers again after an outage: commits the completions held meanwhile,
    /// requeues what lost its holder while writes failed, finishes what was ready to, and
    /// dispatches. Returns whether the store is up (false: still down, try again later).
    pub async fn recover(&self) -> bool {
        if self.store_available() {
            return true;
        }
        match tokio::time::timeout(PING_TIMEOUT, self.store.ping()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "the store is still unavailable");
                return false;
            }
            Err(_) => return false,
        }
        tracing::info!("the store answers again: resuming");
        // Up from here: what follows writes to it (a failure marks it down again).
        self.store_up.store(true, Ordering::Relaxed);
        self.counters.store_available.set(1);
        let parked = std::mem::take(&mut *self.parked.lock().unwrap_or_else(|e| e.into_inner()));
        for (who, shard, output, record) in parked {
            if let Err(e) = self.commit(&who, &shard, &output, record).await {
                tracing::warn!(error = %e.message(), "a held completion could not be committed");
            }
        }
        let orders = self.read(Machine::orphans);
        for order in orders {
            if let Err(e) = self.requeue_or_fail(order).await {
                tracing::warn!(error = %e, "cannot requeue after the outage");
            }
        }
        let live: Vec<String> = self.read(|m| m.workloads.keys().cloned().collect());
        for uid in live {
            if let Err(e) = self.maybe_finish(&uid).await {
                tracing::warn!(error = %e, "cannot finish after the outage");
            }
        }
        if let Err(e) = self.dispatch().await {
            tracing::warn!(error = %e, "dispatch after the outage failed");
        }
        if !self.store_available() || self.check_store().await {
            return false; // down again: held work stays held, and `recover` runs again
        }
        true
    }

    /// Marks a sweep owed: a store write failed (or was refused) and left something that only
    /// the next [`Core::sweep`] takes up.
    fn owe_sweep(&self) {
        self.sweep_owed.store(true, Ordering::Relaxed);
    }

    /// Once a second while the store is up (the lease reaper calls it): finishes what a store
    /// write that failed without the store being declared down left undone. A write can time
    /// out while the ping after it gets through — the database restarted twice in a row, a
    /// pool that waited out the first restart — and then nothing else would ever retry it:
    /// the held completion would stay held, the lost agent's shard stay with nobody, the
    /// failed round never run, and the workload never end. Held completions are committed,
    /// stranded shards requeued, shards whose claim or requeue the store refused read back,
    /// finishes and failures whose write failed written again, and a round dispatched.
    /// Shards are scanned only when a sweep is owed ([`Core::owe_sweep`]); otherwise the
    /// sweep costs two flag reads.
    pub async fn sweep(&self) {
        let parked = std::mem::take(&mut *self.parked.lock().unwrap_or_else(|e| e.into_inner()));
        let owed = self.sweep_owed.swap(false, Ordering::Relaxed);
        if parked.is_empty() && !owed {
            return;
        }
        let stranded = if owed {
            self.read(Machine::stranded)
        } else {
            Vec::new()
        };
        tracing::info!(
            held = parked.len(),
            stranded = stranded.len(),
            "retrying what failed store writes left undone"
        );
        let committed = !parked.is_empty();
        for (who, shard, output, record) in parked {
            if let Err(e) = self.commit(&who, &shard, &output, record).await {
                tracing::warn!(error = %e.message(), "a held completion could not be committed");
            }
        }
        for order in stranded {
            if let Err(e) = self.requeue_or_fail(order).await {
                tracing::warn!(error = %e, "cannot requeue a stranded shard yet");
            }
        }
        if owed {
            self.reconcile_elsewhere().await;
            for (uid, reason, message) in self.read(Machine::failures_owed) {
                if let Err(e) = self.fail_workload(&uid, &reason, &message).await {
                    tracing::warn!(error = %e, "cannot record the workload's failure yet");
                }
            }
        }
        if committed || owed {
            let live: Vec<String> = self.read(|m| m.workloads.keys().cloned().collect());
            for uid in live {
                if let Err(e) = self.maybe_finish(&uid).await {
                    tracing::warn!(error = %e, "cannot finish yet");
                }
            }
        }
        if let Err(e) = self.dispatch().await {
            tracing::warn!(error = %e, "dispatch failed again");
        }
    }

    /// Shards whose claim the store refused follow what the store holds for them (see
    /// [`Machine::stored_elsewhere`]). Without this, a claim committed just as the store went
    /// down — its answer lost, the round failed — was claimed again after the outage, refused,
    /// and taken for another operator's: nobody ran it and the workload never ended.
    async fn reconcile_elsewhere(&self) {
        let shards = self.read(Machine::elsewhere);
        if shards.is_empty() {
            return;
        }
        let stored = match self.store.active_workloads().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the refused claims back yet");
                self.owe_sweep();
                return;
            }
        };
        let now = Instant::now();
        let mut later = Vec::new();
        for (uid, index) in shards {
            let Some(row) = stored
                .iter()
                .find(|w| w.record.uid == uid)
                .and_then(|w| w.shards.iter().find(|s| s.index == index))
            else {
                continue;
            };
            let (_, effects) = self.step(|m| {
                (
                    (),
                    m.stored_elsewhere(
                        &uid,
                        index,
                        &row.state,
                        row.attempt,
                        row.agent.as_deref(),
                        now,
                    ),
                )
            });
            later.extend(effects);
        }
        for effect in later {
            if let Effect::Requeue(order) = effect
                && let Err(e) = self.requeue_or_fail(order).await
            {
                tracing::warn!(error = %e, "cannot requeue a refused claim yet");
                self.owe_sweep();
            }
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves plain data behind; carry on with it.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reads the machine.
    fn read<T>(&self, f: impl FnOnce(&Machine) -> T) -> T {
        f(&self.lock().machine)
    }

    /// Runs a transition under the lock. Its messages and counts are delivered there (a
    /// channel push each, no I/O); the store writes it asks for are returned, to be performed
    /// with the lock released ([`Core::follow`]).
    fn step<T>(&self, f: impl FnOnce(&mut Machine) -> (T, Vec<Effect>)) -> (T, Vec<Effect>) {
        let mut inner = self.lock();
        let (out, effects) = f(&mut inner.machine);
        let mut later = Vec::new();
        for effect in effects {
            match effect {
                Effect::Send { agent, msg } => {
                    if let Some((_, tx)) = inner.links.get(&agent) {
                        let _ = tx.send(Ok(pb::OperatorMessage { msg: Some(*msg) }));
                    }
                }
                Effect::End {
                    agent,
                    session,
                    status,
                } => {
                    if let Some((s, tx)) = inner.links.get(&agent)
                        && *s == session
                    {
                        let _ = tx.send(Err(status));
                    }
                }
                Effect::Count(tally) => {
                    let counter = match tally {
                        Tally::Dispatched => &self.counters.dispatched,
                        Tally::Completed => &self.counters.completed,
                        Tally::Failed => &self.counters.failed,
                        Tally::Requeued => &self.counters.requeued,
                    };
                    counter.inc();
                }
                Effect::Requeue(_) | Effect::Dispatch => later.push(effect),
            }
        }
        (out, later)
    }

    /// A transition whose only effects are messages and counts.
    fn apply<T>(&self, f: impl FnOnce(&mut Machine) -> (T, Vec<Effect>)) -> T {
        let (out, later) = self.step(f);
        debug_assert!(later.is_empty(), "store effects dropped: {later:?}");
        out
    }

    /// Performs the store effects of a transition, in order, feeding each answer back to the
    /// machine; one dispatch round at the end when any was asked for.
    async fn follow(&self, effects: Vec<Effect>) -> Result<(), StoreError> {
        let mut dispatch = false;
        for effect in effects {
            match effect {
                Effect::Requeue(order) => self.requeue_or_fail(order).await?,
                Effect::Dispatch => dispatch = true,
                other => {
                    // Messages and counts are delivered by `step`.
                    self.apply(|_| ((), vec![other]));
                }
            }
        }
        if dispatch {
            self.dispatch().await?;
        }
        Ok(())
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
        self.read(|m| m.workloads.len())
    }

    /// Forgets the summary of a finished workload once its final status is written.
    pub fn release(&self, key: &str) {
        self.apply(|m| (m.release(key), Vec::new()));
    }

    /// Forgets an agent whose object is gone (it must be disconnected).
    pub fn forget_agent(&self, id: &str) {
        let mut inner = self.lock();
        inner.machine.forget_agent(id);
        if !inner.machine.agents.contains_key(id) {
            inner.links.remove(id);
        }
    }

    /// Pauses (or resumes) dispatch of a workload's shards; running shards finish.
    /// Returns false when the core does not know the workload.
    pub async fn set_suspend(&self, key: &str, suspend: bool) -> Result<bool, CoreError> {
        let (known, effects) = self.step(|m| match m.suspend(key, suspend) {
            Some(effects) => (true, effects),
            None => (false, Vec::new()),
        });
        self.follow(effects).await?;
        Ok(known)
    }

    /// Cancels a workload (its object was deleted): running shards are cancelled on their
    /// agents, nothing more is dispatched, and the store records it as failed with `reason`.
    /// Completed shards stay charged. Returns false when the core does not know it.
    pub async fn cancel(&self, key: &str, reason: &str, message: &str) -> Result<bool, CoreError> {
        let verdict = self.apply(|m| (m.cancel(key, reason, message, Instant::now()), Vec::new()));
        match verdict {
            None => Ok(false),
            Some(None) => Ok(true),
            Some(Some(uid)) => {
                self.fail_workload(&uid, reason, message).await?;
                self.dispatch().await?;
                Ok(true)
            }
        }
    }

    /// Whether the core holds a workload with this key (running, held, or finished and not
    /// yet released).
    pub async fn knows(&self, key: &str) -> bool {
        self.read(|m| m.knows(key))
    }

    /// A summary of one workload.
    pub async fn workload(&self, key: &str) -> Option<WorkloadSummary> {
        self.read(|m| m.summary(key))
    }

    /// Runs `fut`, a read or write of workload `uid`'s locations, with its credentials;
    /// `None` (and `fut` is not run) when its spec names credentials that are not held: the
    /// operator never falls back to its own keys for a tenant.
    async fn for_workload<F: Future>(&self, uid: &str, fut: F) -> Option<F::Output> {
        let credentials = self.read(|m| m.credentials_of(uid))?;
        Some(infermesh_io::access::scoped(credentials, fut).await)
    }

    /// Hands over (or renews) the credentials of a workload the core holds, from its
    /// `spec.credentials` Secret: a workload taken up after a restart or a retry waits for
    /// them before it dispatches or writes anything. Returns whether they changed (the same
    /// ones again, as every reconcile hands over, cost no dispatch round).
    pub async fn set_credentials(
        &self,
        key: &str,
        credentials: Option<infermesh_io::Credentials>,
    ) -> Result<bool, CoreError> {
        let Some(uid) = self.apply(|m| (m.set_credentials(key, credentials), Vec::new())) else {
            // Unchanged, or not a live workload here.
            return Ok(false);
        };
        self.maybe_finish(&uid).await?;
        self.dispatch().await?;
        Ok(true)
    }

    /// What `namespace` may use on Mesh `mesh` (`None`: the Mesh is unknown or lists no
    /// tenants, so no restriction).
    pub async fn grant(&self, mesh: &str, namespace: &str) -> Option<infermesh_io::Grant> {
        self.read(|m| {
            m.meshes
                .get(mesh)
                .and_then(|ms| tenancy::grant_of(&ms.spec, namespace))
        })
    }

    /// Whether the core knows the Mesh.
    pub async fn has_mesh(&self, name: &str) -> bool {
        self.read(|m| m.meshes.contains_key(name))
    }

    /// Forgets a Mesh (deleted): its agents are told to drain and its workloads fail with
    /// `MeshDeleted` (nothing could run them any more).
    pub async fn remove_mesh(&self, name: &str) {
        let orphans = self.apply(|m| m.mesh_removed(name));
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
        for (i, t) in spec.tenants.iter().flatten().enumerate() {
            for (what, prefixes) in [("read", &t.read), ("write", &t.write)] {
                for p in prefixes {
                    infermesh_io::access::plain(p).map_err(|e| {
                        validate::Invalid::new(
                            "InvalidSpec",
                            format!("spec.tenants[{i}].{what} ({}): {e}", t.namespace),
                        )
                    })?;
                }
            }
        }
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
        self.apply(|m| (m.mesh_set(name, spec, price), Vec::new()));
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
            let uid = sw.record.uid.clone();
            if self.take_up(sw).await? {
                resumed.push(uid);
            }
        }
        for uid in &resumed {
            self.maybe_finish(uid).await?;
        }
        self.dispatch().await?;
        Ok(resumed.len())
    }

    /// Takes up one workload the store holds as running (resumed after a restart, or reopened
    /// by a retry): succeeded shards stay done, shards caught running go back to the queue with
    /// their attempt counted, and a shard that failed for good fails the workload. Returns
    /// whether it now runs here (false: it was held here already, or it failed at once).
    async fn take_up(&self, sw: StoredWorkload) -> Result<bool, CoreError> {
        let r = &sw.record;
        let key = workload_key(&r.namespace, &r.name, &r.uid);
        if self.read(|m| m.workloads.contains_key(&r.uid)) {
            return Ok(false);
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
                return Ok(false);
            }
        };
        // The files the shards were cut from, as planned (never listed again).
        let input_files = match r
            .input_files
            .as_deref()
            .map(serde_json::from_str::<infermesh_io::Dataset>)
        {
            None => None,
            Some(Ok(ds)) => Some(std::sync::Arc::new(ds)),
            Some(Err(e)) => {
                let message = format!("the stored input files do not parse: {e}");
                tracing::error!(workload = %key, %message, "workload not resumed");
                self.store
                    .finish_workload(&r.uid, "Failed", &format!("InvalidInput: {message}"))
                    .await?;
                return Ok(false);
            }
        };
        let mut credits: i64 = 0;
        for c in self.store.charges(&r.uid).await? {
            credits = credits.saturating_add(c.amount);
        }
        let mut shards = Vec::with_capacity(sw.shards.len());
        let mut exhausted = None;
        for s in &sw.shards {
            // Attempts since the workload's last retry count towards `maxAttempts`.
            let used = s.attempt.saturating_sub(s.attempt_base);
            let status = match s.state.as_str() {
                // Its last attempt was lost with the operator: the shard is out of them.
                "running" if used >= spec.max_attempts => {
                    let message = format!(
                        "shard {} failed after {used} attempts; last error: operator restarted: attempt lost",
                        s.index
                    );
                    self.store
                        .fail_shard(&r.uid, s.index, s.attempt, s.agent.as_deref(), &message)
                        .await?;
                    exhausted = Some(("AttemptsExhausted", message));
                    ShardStatus::Failed
                }
                "succeeded" => ShardStatus::Succeeded,
                // A shard fails for good only with its workload; the operator stopped
                // between the two writes. The workload fails now, as it would have.
                "failed" => {
                    exhausted.get_or_insert_with(|| {
                        let message = format!(
                            "shard {} had failed for good before the operator restarted",
                            s.index
                        );
                        ("ShardFailed", message)
                    });
                    ShardStatus::Failed
                }
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
                status,
                attempt: s.attempt,
                base: s.attempt_base,
                records: s.records,
                sha256: s.sha256.clone().unwrap_or_default(),
                ..ShardState::new(planner::ShardRange {
                    index: s.index,
                    start: s.start,
                    end: s.end,
                })
            });
        }
        let balance = self.balance_if_budgeted(&r.mesh, &r.namespace).await?;
        // `spec.activeDeadlineSeconds` goes on counting from when the stored run began.
        let running_for = self.store.running_for(&r.uid).await?.unwrap_or_default();
        tracing::info!(workload = %key, shards = shards.len(), "workload resumed");
        let new = NewWorkload {
            key,
            uid: r.uid.clone(),
            namespace: r.namespace.clone(),
            name: r.name.clone(),
            spec,
            validated,
            input_size: r.input_bytes,
            input_version: r.input_version.clone(),
            input_files,
            shards,
            admitted: true,
            credits,
            model_drift: None,
            // Never stored: whoever holds the Secret hands them over again
            // (`Core::set_credentials`); until then the workload does no I/O.
            credentials: None,
        };
        let inserted = self.apply(|m| {
            // Two callers taking up one workload at once (a retry and a resume): one wins.
            if m.workloads.contains_key(&r.uid) {
                return (false, Vec::new());
            }
            if let Some(b) = balance {
                m.balance_read(&r.namespace, b);
            }
            let now = Instant::now();
            m.insert(new, now);
            m.start_clock(&r.uid, running_for, now);
            (true, Vec::new())
        });
        if !inserted {
            return Ok(false);
        }
        if let Some((reason, message)) = exhausted {
            self.fail_workload(&r.uid, reason, &message).await?;
            return Ok(false);
        }
        Ok(true)
    }

    /// Retries a failed workload (`key` as [`workload_key`] builds it): the store first
    /// ([`Store::reopen_failed`]: back to running, every shard that had not succeeded back to
    /// the queue with a fresh `spec.maxAttempts` attempts numbered above every earlier one, a
    /// `workload.retried` event), then the workload is taken up here as a resumed one and
    /// dispatched. Succeeded shards keep their parts and their single charge; when the rest
    /// succeed the workload finishes as any other (manifest, `_SUCCESS.json`). Works whether
    /// the failed workload's summary is still held here or was released. A workload that is
    /// not failed, an unknown one, or a store that does not answer is a refusal
    /// ([`RetryOutcome`]) and changes nothing.
    pub async fn retry_failed(&self, key: &str) -> Result<RetryOutcome, CoreError> {
        let uid = machine::key_uid(key).to_string();
        let live = self.read(|m| m.workloads.get(&uid).map(|w| (w.key == key, w.phase)));
        match live {
            Some((true, phase)) => {
                // Running, held for budget, or with its failure being written: not failed yet.
                return Ok(RetryOutcome::NotFailed {
                    phase: phase_name(phase).into(),
                });
            }
            Some((false, _)) => return Ok(RetryOutcome::Unknown),
            None => {}
        }
        if !self.store_available() {
            return Ok(RetryOutcome::StoreUnavailable {
                message: "the store does not answer (outage)".into(),
            });
        }
        let reopened = match self.store.reopen_failed(&uid).await {
            Ok(outcome) => outcome,
            Err(e) if e.is_transient() => {
                self.check_store().await;
                return Ok(RetryOutcome::StoreUnavailable {
                    message: e.to_string(),
                });
            }
            Err(e) => return Err(e.into()),
        };
        let (workload, requeued, failed, kept) = match reopened {
            ReopenOutcome::Unknown => return Ok(RetryOutcome::Unknown),
            ReopenOutcome::NotFailed { phase } => {
                // Running in the store but not here: a retry that reopened it and was cut
                // short before taking it up (the store failed in between). Taken up now.
                if phase == "Running" {
                    self.resume_where(|r| r.uid == uid).await?;
                }
                return Ok(RetryOutcome::NotFailed { phase });
            }
            ReopenOutcome::Reopened {
                workload,
                requeued,
                failed,
                kept,
            } => (workload, requeued, failed, kept),
        };
        let r = &workload.record;
        let stored_key = workload_key(&r.namespace, &r.name, &r.uid);
        tracing::info!(workload = %stored_key, requeued, failed, kept, "failed workload retried");
        // The failed run's summary (if not released yet) gives way to the running one.
        self.release(&stored_key);
        if self.take_up(*workload).await? {
            let message = crate::store::retried_message(requeued, failed, kept);
            self.apply(|m| (m.retried(&uid, message), Vec::new()));
            // Every shard may have succeeded already (the failure was in writing the manifest).
            self.maybe_finish(&uid).await?;
        }
        self.dispatch().await?;
        Ok(RetryOutcome::Retried {
            requeued,
            failed,
            kept,
        })
    }

    async fn balance_if_budgeted(
        &self,
        mesh: &str,
        namespace: &str,
    ) -> Result<Option<i64>, StoreError> {
        if !self.read(|m| m.budgeted(mesh, namespace)) {
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
        let grant = self.read(|m| {
            let Some(mesh) = m.meshes.get(&sub.spec.mesh) else {
                return Err(CoreError::MeshNotFound(sub.spec.mesh.clone()));
            };
            if m.workloads.contains_key(&sub.uid) || m.finished.contains_key(&key) {
                return Err(CoreError::Duplicate(key.clone()));
            }
            Ok(tenancy::grant_of(&mesh.spec, &sub.namespace))
        })?;
        // Before any object is touched: the namespace may use these locations.
        tenancy::check(&sub.spec, grant.as_ref())?;
        if sub.spec.credentials.is_some() && sub.credentials.is_none() {
            return Err(validate::Invalid::new(
                "CredentialsNotFound",
                "spec.credentials.secretRef: the Secret's credentials were not handed over",
            )
            .into());
        }
        if let Some(other) = self.read(|m| m.output_user(&sub.uid, &sub.spec.output.uri)) {
            return Err(CoreError::OutputInUse(format!(
                "spec.output.uri: {} overlaps the output of {}; this one starts when that one \
                 finishes",
                sub.spec.output.uri,
                other_workload(&other, &sub.namespace)
            )));
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
        let (prepared, drift) = infermesh_io::access::scoped(sub.credentials.clone(), async {
            let prepared = outputs::prepare(&sub.spec.output.uri, overwrite).await;
            let drift = match prepared {
                Ok(()) => models::drift(&validated.model.uri, &validated.model.sha256).await,
                Err(_) => None,
            };
            (prepared, drift)
        })
        .await;
        prepared.map_err(|(reason, message)| validate::Invalid::new(reason, message))?;
        if let Some(actual) = &drift {
            let warning =
                models::drift_warning(&validated.model.uri, &validated.model.sha256, actual);
            tracing::warn!(workload = %key, %warning, "model changed behind its pin");
            self.store
                .append(&Event::new(EventKind::ModelChanged, warning).workload(&sub.uid))
                .await?;
        }
        self.apply(|m| {
            if m.workloads.contains_key(&sub.uid) {
                return (Err(CoreError::Duplicate(key.clone())), Vec::new());
            }
            // Again under the lock: two submissions racing for one output.
            if let Some(other) = m.output_user(&sub.uid, &sub.spec.output.uri) {
                let message = format!(
                    "spec.output.uri: {} overlaps the output of {}",
                    sub.spec.output.uri,
                    other_workload(&other, &sub.namespace)
                );
                return (Err(CoreError::OutputInUse(message)), Vec::new());
            }
            // Slots of the Mesh's agents now; fewer are fine (only the last round is affected).
            let ranges = match &sub.input_files {
                None => planner::plan(
                    sub.input_size,
                    validated.shard_bytes,
                    m.mesh_slots(&sub.spec.mesh),
                ),
                Some(ds) => {
                    planner::plan_dataset(ds, validated.shard_bytes, m.mesh_slots(&sub.spec.mesh))
                }
            };
            let new = NewWorkload {
                key: key.clone(),
                uid: sub.uid.clone(),
                namespace: sub.namespace,
                name: sub.name,
                spec: sub.spec,
                validated,
                input_size: sub.input_size,
                input_version: sub.input_version,
                input_files: sub.input_files.map(std::sync::Arc::new),
                shards: ranges.into_iter().map(ShardState::new).collect(),
                admitted: false,
                credits: 0,
                model_drift: drift,
                credentials: sub.credentials,
            };
            m.insert(new, Instant::now());
            (Ok(()), Vec::new())
        })?;
        self.try_admit(&sub.uid).await?;
        self.dispatch().await?;
        Ok(key)
    }

    /// Admits the held workloads whose namespaces have budget again (after a grant), and lets
    /// running workloads that had run out of credits dispatch again.
    pub async fn admit_held(&self) -> Result<(), CoreError> {
        let (held, namespaces): (Vec<String>, BTreeSet<(String, String)>) = self.read(|m| {
            let held = m
                .workloads
                .values()
                .filter(|w| !w.admitted && w.phase == WorkloadPhase::Pending)
                .map(|w| w.uid.clone())
                .collect();
            // Only namespaces that ran out are read again: charges keep the others' balances
            // in memory, and this runs every few seconds.
            let namespaces = m
                .workloads
                .values()
                .filter(|w| {
                    w.admitted
                        && m.budgeted(&w.mesh, &w.namespace)
                        && m.balances.get(&w.namespace).is_some_and(|b| *b <= 0)
                })
                .map(|w| (w.mesh.clone(), w.namespace.clone()))
                .collect();
            (held, namespaces)
        });
        for (mesh, ns) in namespaces {
            if let Some(b) = self.balance_if_budgeted(&mesh, &ns).await? {
                self.apply(|m| (m.balance_read(&ns, b), Vec::new()));
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
        let found = self.read(|m| {
            let w = m.workloads.get(uid).filter(|w| !w.admitted)?;
            let record = WorkloadRecord {
                uid: w.uid.clone(),
                namespace: w.namespace.clone(),
                name: w.name.clone(),
                mesh: w.mesh.clone(),
                spec_json: serde_json::to_string(&w.spec).unwrap_or_default(),
                input_bytes: w.input_size,
                input_version: w.input_version.clone(),
                input_files: w
                    .input_files
                    .as_ref()
                    .and_then(|ds| serde_json::to_string(&**ds).ok()),
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
            Some((record, shards))
        });
        let Some((record, shard_records)) = found else {
            return Ok(());
        };
        let balance = self
            .balance_if_budgeted(&record.mesh, &record.namespace)
            .await?;
        if let Some(left) = balance
            && left <= 0
        {
            let held = self.apply(|m| (m.held(uid, left), Vec::new()));
            if let Some((message, true)) = held {
                tracing::warn!(workload = %record.uid, %message, "workload held");
                let e = Event::new(EventKind::WorkloadHeld, format!("QuotaExceeded: {message}"))
                    .workload(uid);
                self.store.append(&e).await?;
            }
            return Ok(());
        }
        self.store.create_workload(&record, &shard_records).await?;
        tracing::info!(workload = %uid, shards = shard_records.len(), bytes = record.input_bytes, "workload admitted");
        self.apply(|m| (m.admitted(uid, balance, Instant::now()), Vec::new()));
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
        let caps = hello.capabilities.clone().unwrap_or_default();
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
        let (handle, effects) = {
            let mut inner = self.lock();
            let (handle, effects) = inner.machine.attach(&hello, who, Instant::now())?;
            // The new stream is the agent's from now on; the old one (if any) hears no more.
            inner.links.insert(handle.id.clone(), (handle.session, tx));
            (handle, effects)
        };
        let (_, later) = self.step(|_| ((), effects));
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
        self.follow(later).await.map_err(internal)?;
        Ok(handle)
    }

    /// Handles one message from an attached agent. A malformed message is refused with
    /// `InvalidArgument` (the caller ends that stream; other agents are not disturbed); a
    /// report the agent may not make is answered with `Refused` and changes nothing.
    pub async fn handle(&self, who: &AgentHandle, msg: pb::AgentMessage) -> Result<(), Status> {
        if !self.read(|m| m.is_current(who)) {
            return Err(Status::failed_precondition(
                "this stream was replaced or its lease expired; reconnect",
            ));
        }
        let result = self.dispatch_message(who, msg).await;
        match result {
            // The store is unreachable: what this message needed waits for it (held
            // completions, requeues of lost holders); the agent stays attached.
            Err(status) if status.code() == tonic::Code::Internal && self.check_store().await => {
                tracing::warn!(agent = %who.id, error = %status.message(), "store unavailable: the agent's report waits for it");
                Ok(())
            }
            other => other,
        }
    }

    async fn dispatch_message(
        &self,
        who: &AgentHandle,
        msg: pb::AgentMessage,
    ) -> Result<(), Status> {
        match msg.msg {
            None => Err(Status::invalid_argument("AgentMessage carries no message")),
            Some(Up::Hello(_)) => Err(Status::invalid_argument(
                "Hello was already sent on this stream",
            )),
            Some(Up::Heartbeat(hb)) => {
                let (_, later) = self.step(|m| ((), m.heartbeat(&who.id, &hb, Instant::now())));
                self.follow(later).await.map_err(internal)
            }
            Some(Up::Completed(c)) => self.completed(who, c).await,
            Some(Up::Failed(f)) => self.failed(who, f).await,
        }
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
        // A late or losing attempt's part (a stream that stalled in a partition delivers its
        // Assign late; a thawed agent finishes what was requeued long ago) is removed here:
        // it can never be committed, and it would be left under `_attempts/` for good when
        // it was written after the workload's clean-up.
        // The workload is named by the report's key when it is no longer live (it finished).
        let named = uid.unwrap_or_else(|| machine::key_uid(&shard.workload));
        if let Some(part) = self.read(|m| m.superseded_part(named, shard.index, shard.attempt))
            && let Some(Err(e)) = self.for_workload(named, outputs::remove(&part)).await
        {
            tracing::warn!(part = %part, error = %e, "a superseded attempt's part was not removed");
        }
        let refusals = self.apply(|m| m.refused(&who.id, shard, refusal));
        if refusals > MAX_REFUSALS {
            return Err(Status::permission_denied(format!(
                "{refusals} reports refused on this stream; disconnecting"
            )));
        }
        Ok(())
    }

    /// A completion: judged by the machine, its part checked and committed without the lock,
    /// then charged (group commit) and applied.
    async fn completed(&self, who: &AgentHandle, c: pb::Completed) -> Result<(), Status> {
        let shard = c
            .shard
            .clone()
            .ok_or_else(|| Status::invalid_argument("Completed carries no shard"))?;
        let verdict = self.apply(|m| {
            (
                m.accept_completion(&who.id, &c, &shard, Instant::now()),
                Vec::new(),
            )
        });
        let acc = match verdict {
            Ok(acc) => acc,
            Err((uid, refusal)) => {
                return self
                    .refuse(who, &shard, uid.as_deref(), refusal, true)
                    .await;
            }
        };
        // The freed slot gets its next shard while this part is checked (best effort: the
        // completion is committed whatever happens to the round).
        if let Err(e) = self.dispatch().await
            && !self.check_store().await
        {
            tracing::warn!(error = %e, "dispatch after a completion failed");
        }

        let attempt_uri = outputs::attempt_uri_as(&acc.output, acc.index, acc.attempt, acc.ext);
        let reported = PartFacts {
            bytes: c.output_bytes,
            sha256: c.sha256.to_ascii_lowercase(),
            records: c.records,
        };
        let problem = match self
            .for_workload(&acc.uid, self.parts.inspect(&attempt_uri))
            .await
        {
            Some(Ok(found)) => outputs::compare(&reported, &found).err(),
            Some(Err(e)) => Some(format!("cannot read the part: {e}")),
            None => Some("the workload's credentials are not held".to_string()),
        };
        let record = match problem {
            None => acc.charge(&who.id, &c).map_err(|e| e.to_string()),
            Some(_) => Err(String::new()),
        };
        let record = match (problem, record) {
            (None, Ok(record)) => record,
            (problem, record) => {
                let refusal = match problem {
                    Some(p) => Refusal::mismatch(p),
                    None => Refusal::invalid(record.err().unwrap_or_default()),
                };
                let reason = format!("{}: {}", refusal.reason, refusal.message);
                let answer = self
                    .refuse(who, &shard, Some(&acc.uid), refusal, true)
                    .await;
                // The holder's attempt produced nothing usable: it counts as a failed attempt.
                let order = RequeueOrder {
                    uid: acc.uid.clone(),
                    index: acc.index,
                    attempt: acc.attempt,
                    agent: Some(who.id.clone()),
                    reason,
                    fail_reason: "OutputMismatch",
                    backoff: true,
                };
                self.follow(vec![Effect::Requeue(order), Effect::Dispatch])
                    .await
                    .map_err(internal)?;
                return answer;
            }
        };
        self.commit(who, &shard, &acc.output, record).await
    }

    /// Commits and charges a checked completion (group commit), then moves its part to its
    /// final name. When the store is unreachable the completion is held and committed by
    /// [`Core::recover`]; the shard stays with its holder meanwhile.
    async fn commit(
        &self,
        who: &AgentHandle,
        shard: &pb::ShardRef,
        output: &str,
        record: CompletionRecord,
    ) -> Result<(), Status> {
        let acc_uid = record.workload_uid.clone();
        let (index, attempt) = (record.shard, record.attempt);
        let answer = if self.store_available() {
            self.committer.complete(record.clone()).await
        } else {
            Err(StoreError::Unavailable("in an outage".into()))
        };
        match answer {
            Err(e) if e.is_transient() => {
                self.check_store().await;
                tracing::warn!(workload = %acc_uid, shard = index, error = %e, "completion held until the store answers");
                self.parked.lock().unwrap_or_else(|e| e.into_inner()).push((
                    who.clone(),
                    shard.clone(),
                    output.to_string(),
                    record,
                ));
                Ok(())
            }
            // AlreadyCharged: an earlier write of this very completion committed and its
            // answer was lost (the database went down after the commit); it was charged once.
            Ok(ChargeOutcome::Charged | ChargeOutcome::AlreadyCharged) => {
                // Charged: move the part to its final name. A failure here is redone before
                // the manifest is written.
                let ext = outputs::extension(&record.output_uri);
                let moved = match self
                    .for_workload(&acc_uid, self.parts.commit(output, index, attempt, ext))
                    .await
                    .unwrap_or_else(|| Err(no_credentials(output)))
                {
                    Ok(()) => true,
                    Err(e) => {
                        tracing::warn!(workload = %acc_uid, shard = index, error = %e, "part not moved to its final name yet");
                        false
                    }
                };
                self.apply(|m| ((), m.committed(&record, moved)));
                // The agent's report is recorded whatever comes of the finish: a finish that
                // failed is the sweep's to try again, not a reason to end its stream.
                if let Err(e) = self.maybe_finish(&acc_uid).await {
                    tracing::warn!(workload = %acc_uid, error = %e, "the workload's finish waits for the store");
                }
                Ok(())
            }
            Ok(ChargeOutcome::Refused) => {
                // The store says the attempt is not running there (another operator took
                // the shard): the event is in the log; tell the agent.
                self.apply(|m| {
                    m.lost_to_store(&acc_uid, index, attempt);
                    ((), Vec::new())
                });
                let refusal = Refusal {
                    code: tonic::Code::FailedPrecondition,
                    reason: "stale_attempt",
                    message: "the store does not hold this attempt as running on this agent".into(),
                };
                self.refuse(who, shard, Some(&acc_uid), refusal, false)
                    .await
            }
            Err(e) => {
                // Not recorded: the attempt goes back to the queue.
                let order = RequeueOrder {
                    uid: acc_uid.clone(),
                    index,
                    attempt,
                    agent: Some(who.id.clone()),
                    reason: e.to_string(),
                    fail_reason: "StorageError",
                    backoff: false,
                };
                self.follow(vec![Effect::Requeue(order), Effect::Dispatch])
                    .await
                    .map_err(internal)?;
                Err(internal(e))
            }
        }
    }

    async fn failed(&self, who: &AgentHandle, f: pb::Failed) -> Result<(), Status> {
        let shard = f
            .shard
            .clone()
            .ok_or_else(|| Status::invalid_argument("Failed carries no shard"))?;
        let uid = match self.apply(|m| (m.accept_failure(&who.id, &shard), Vec::new())) {
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
        let written = if f.retryable {
            self.requeue_or_fail(RequeueOrder {
                uid,
                index: shard.index,
                attempt: shard.attempt,
                agent: Some(who.id.clone()),
                reason: message,
                fail_reason: reason_for(kind),
                backoff: true,
            })
            .await
        } else {
            self.fail_for_good(
                &uid,
                shard.index,
                shard.attempt,
                Some(&who.id),
                reason_for(kind),
                &message,
            )
            .await
        };
        // The report is taken whatever its writes came to. The shard is no longer this
        // agent's, so a write that failed is the sweep's: it requeues the shard (which runs
        // again, and fails again if it must) or writes the failure it owes. Ending the stream
        // would only cost the agent its other shards.
        if let Err(e) = written {
            self.owe_sweep();
            if e.is_transient() {
                self.check_store().await;
            }
            tracing::warn!(workload = %shard.workload, shard = shard.index, error = %e, "the failure's store writes wait for the sweep");
        }
        if let Err(e) = self.dispatch().await {
            tracing::warn!(error = %e, "dispatch after a failure failed");
        }
        Ok(())
    }

    /// A shard failed for good (a non-retryable error, or out of attempts): the shard, then
    /// its workload, each store first.
    async fn fail_for_good(
        &self,
        uid: &str,
        index: u32,
        attempt: u32,
        agent: Option<&str>,
        reason: &str,
        message: &str,
    ) -> Result<(), StoreError> {
        let held = self
            .store
            .fail_shard(uid, index, attempt, agent, message)
            .await?;
        self.apply(|m| ((), m.shard_failed(uid, index, attempt, held)));
        self.fail_workload(uid, reason, message).await
    }

    /// Puts an attempt back in the queue, or fails the shard (and its workload) when it is out
    /// of attempts. Nothing happens unless the shard is still at that attempt and held there.
    async fn requeue_or_fail(&self, order: RequeueOrder) -> Result<(), StoreError> {
        // A requeue that failed leaves its shard with nobody: the sweep takes it up.
        self.requeue_or_fail_once(order).await.inspect_err(|_| {
            self.owe_sweep();
        })
    }

    async fn requeue_or_fail_once(&self, order: RequeueOrder) -> Result<(), StoreError> {
        let RequeueOrder {
            uid,
            index,
            attempt,
            agent,
            reason,
            fail_reason,
            backoff,
        } = order;
        if !self.store_available() {
            // Taken up by `recover` (`Machine::orphans`) once the store answers.
            return Ok(());
        }
        let plan = self.read(|m| m.requeue_plan(&uid, index, attempt, agent.as_deref()));
        match plan {
            None => Ok(()),
            Some(RequeuePlan::Retry) => {
                let held = self
                    .store
                    .requeue(&uid, index, attempt, agent.as_deref(), &reason)
                    .await?;
                if !held && self.apply(|m| (m.requeue_refused(&uid, index, attempt), Vec::new())) {
                    // The sweep reads the shard back from the store.
                    self.owe_sweep();
                    return Ok(());
                }
                self.apply(|m| {
                    let effects = m.requeued(&uid, index, attempt, held, &reason);
                    // Under the same lock: no round may claim it before it backs off.
                    if backoff && held {
                        m.back_off(&uid, index, attempt, Instant::now());
                    }
                    ((), effects)
                });
                Ok(())
            }
            Some(RequeuePlan::Forget) => {
                self.apply(|m| (m.forget_attempt(&uid, index), Vec::new()));
                Ok(())
            }
            Some(RequeuePlan::Exhausted) => {
                // Attempts since the workload's last retry (numbers keep growing across it).
                let used = self.read(|m| m.attempts_used(&uid, index, attempt));
                let message =
                    format!("shard {index} failed after {used} attempts; last error: {reason}");
                let reason = if used > 1 {
                    "AttemptsExhausted"
                } else {
                    fail_reason
                };
                self.fail_for_good(&uid, index, attempt, agent.as_deref(), reason, &message)
                    .await
            }
        }
    }

    /// Fails a workload: the store first, then the machine (which cancels its running shards
    /// on their agents and lets it leave memory).
    async fn fail_workload(
        &self,
        uid: &str,
        reason: &str,
        message: &str,
    ) -> Result<(), StoreError> {
        let Some(admitted) = self.apply(|m| (m.begin_failure(uid), Vec::new())) else {
            return Ok(());
        };
        if admitted
            && let Err(e) = self
                .store
                .finish_workload(uid, "Failed", &format!("{reason}: {message}"))
                .await
        {
            // Decided, not written: the sweep writes it again. Nothing else would: the shard
            // that failed is failed in the store already, and no later report comes.
            self.apply(|m| (m.defer_failure(uid, reason, message), Vec::new()));
            self.owe_sweep();
            return Err(e);
        }
        self.apply(|m| ((), m.workload_failed(uid, reason, message, Instant::now())));
        Ok(())
    }

    /// Once every shard is done: commits any part not yet at its final name, writes the
    /// manifest (`_SUCCESS.json`, committed parts only), clears what attempts left, and marks
    /// the workload Succeeded. All of it without the lock.
    async fn maybe_finish(&self, uid: &str) -> Result<(), CoreError> {
        // A finish that failed (its store write met a restarting database) is the sweep's
        // to try again: the last completion has come, and nothing else would ever finish the
        // workload.
        self.maybe_finish_once(uid).await.inspect_err(|_| {
            self.owe_sweep();
        })
    }

    async fn maybe_finish_once(&self, uid: &str) -> Result<(), CoreError> {
        // Not as the operator itself: a workload waiting for its credentials finishes when
        // they come (`Core::set_credentials`).
        if self.read(|m| m.lacks_credentials(uid)) {
            return Ok(());
        }
        let Some(plan) = self.apply(|m| (m.begin_finish(uid), Vec::new())) else {
            return Ok(());
        };
        let FinishPlan {
            output,
            ext,
            mut manifest,
            parts,
            message,
        } = plan;
        manifest["completedAt"] = serde_json::json!(
            chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
        );
        let written: Option<Result<(), String>> = self
            .for_workload(uid, async {
                for (index, attempt) in &parts {
                    self.parts
                        .commit(&output, *index, *attempt, ext)
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
            })
            .await;
        let written =
            written.unwrap_or_else(|| Err("the workload's credentials are not held".into()));
        if let Err(e) = written {
            self.apply(|m| (m.abort_terminal(uid), Vec::new()));
            self.fail_workload(uid, "StorageError", &e).await?;
            return Ok(());
        }
        if let Err(e) = self.store.finish_workload(uid, "Succeeded", &message).await {
            self.apply(|m| (m.abort_terminal(uid), Vec::new()));
            return Err(e.into());
        }
        self.apply(|m| {
            (
                m.workload_succeeded(uid, message, Instant::now()),
                Vec::new(),
            )
        });
        Ok(())
    }

    /// Dispatch rounds until nothing more was asked for. Rounds are coalesced: a caller that
    /// finds a round running leaves a mark and returns, and the running round goes again,
    /// so a burst of completions costs a few rounds (each claiming many shards in one store
    /// statement), not one round and one transaction each. The mark is read again after the
    /// round lock is released, so no request is lost between the last look and the release.
    async fn dispatch(&self) -> Result<(), StoreError> {
        loop {
            if !self.store_available() {
                return Ok(()); // paused until the store answers again (`recover`)
            }
            self.round_wanted.store(true, Ordering::SeqCst);
            let Ok(round) = self.round.try_lock() else {
                return Ok(()); // the holder sees the mark
            };
            while self.round_wanted.swap(false, Ordering::SeqCst) {
                self.dispatch_once().await?;
            }
            drop(round);
            if !self.round_wanted.load(Ordering::SeqCst) {
                return Ok(());
            }
        }
    }

    /// One dispatch round (the round lock held): the machine plans the claims (when the store
    /// is ready to take them: [`Store::assign_planned`]), the store takes them in one
    /// statement, the machine applies what the store accepted (store first).
    async fn dispatch_once(&self) -> Result<(), StoreError> {
        if !self.store_available() {
            return Ok(());
        }
        let owe = |e: StoreError| {
            self.owe_sweep();
            e
        };
        let plan = || self.apply(|m| (m.plan_round(Instant::now()), Vec::new()));
        let (claims, won) = self.store.assign_planned(plan).await.map_err(owe)?;
        if claims.is_empty() {
            return Ok(());
        }
        if won.iter().any(|w| !w) {
            // The store holds a claimed shard otherwise than memory believed: the sweep reads
            // it back (`Machine::stored_elsewhere`).
            self.owe_sweep();
        }
        let (_, later) = self.step(|m| ((), m.claims_stored(&claims, &won, Instant::now())));
        // Orphans (holders that left meanwhile) are requeued; no nested round.
        for effect in later {
            if let Effect::Requeue(order) = effect {
                self.requeue_or_fail(order).await.map_err(owe)?;
            }
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
        let Some(running) = self.apply(|m| (m.agent_lost(id, session, Instant::now()), Vec::new()))
        else {
            return Ok(());
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
        if self.store_available() {
            self.store.append(&event.agent(id)).await?;
        } else {
            tracing::warn!(agent = %id, "store unavailable: the agent's departure is not in the event log");
        }
        for order in running {
            self.requeue_or_fail(RequeueOrder {
                reason: reason.to_string(),
                ..order
            })
            .await?;
        }
        Ok(())
    }

    /// Expires the leases of agents silent for longer than their Mesh's lease, and forgets
    /// agents long gone.
    pub async fn reap(&self, now: Instant) -> Result<Vec<String>, CoreError> {
        let lost = {
            let mut inner = self.lock();
            let (lost, effects) = inner.machine.expire(now);
            let Inner { machine, links } = &mut *inner;
            links.retain(|id, _| machine.agents.contains_key(id));
            drop(inner);
            self.apply(|_| ((), effects));
            lost
        };
        for (id, session) in &lost {
            self.lose_agent(id, Some(*session), "lease expired: no heartbeat")
                .await?;
        }
        let (_, timed_out) = self.step(|m| ((), m.time_out(now)));
        let mut dispatch = !lost.is_empty();
        for effect in timed_out {
            match effect {
                Effect::Requeue(order) => self.requeue_or_fail(order).await?,
                _ => dispatch = true,
            }
        }
        dispatch |= self.lifecycle(now).await?;
        if dispatch {
            self.dispatch().await?;
        }
        Ok(lost.into_iter().map(|(id, _)| id).collect())
    }

    /// The lifecycle step of the periodic tick: shards whose backoff is over at `now` go back
    /// to pending, and workloads past their `spec.activeDeadlineSeconds` fail with
    /// `DeadlineExceeded` (store first; their running shards are cancelled on their agents,
    /// and a completion that comes later is refused, never charged). Returns whether a
    /// dispatch round is due. Nothing happens while the store does not answer: the failure
    /// is written when it does.
    async fn lifecycle(&self, now: Instant) -> Result<bool, StoreError> {
        let due = self.apply(|m| (m.backoffs_due(now), Vec::new()));
        if !self.store_available() {
            return Ok(due);
        }
        let late = self.read(|m| m.past_deadline(now));
        for (uid, message) in late {
            tracing::warn!(workload = %uid, %message, "workload past its deadline");
            self.fail_workload(&uid, "DeadlineExceeded", &message)
                .await?;
        }
        Ok(due)
    }

    /// Drains (or undrains) an agent: no new shards; running ones finish.
    pub async fn set_unschedulable(
        &self,
        agent: &str,
        unschedulable: bool,
    ) -> Result<(), CoreError> {
        self.apply(|m| (m.set_unschedulable(agent, unschedulable), Vec::new()));
        Ok(self.dispatch().await?)
    }

    /// Tells every connected agent to drain (finish and exit).
    pub async fn drain_all(&self, reason: &str) {
        self.apply(|m| ((), m.drain_all(reason)));
    }

    /// A summary of every workload the core holds, live and finished (until released), in
    /// the order they came.
    pub async fn workloads(&self) -> Vec<WorkloadSummary> {
        self.read(Machine::summaries)
    }

    /// A summary of every agent.
    pub async fn agents(&self) -> Vec<AgentSummary> {
        self.read(Machine::agent_summaries)
    }
}

#[cfg(test)]
mod dataset_tests;
#[cfg(test)]
mod tenancy_tests;
#[cfg(test)]
pub(crate) mod tests;
