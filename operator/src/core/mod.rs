//! The operator core: workloads, shards, agents, leases and the ledger hook. It knows nothing
//! of Kubernetes; the controllers (cluster mode) and `infermesh local` drive it, and the gRPC
//! server feeds it agent messages.
//!
//! Every change goes through one lock and is written to the store before it takes effect in
//! memory, so a completion is charged once (first completion wins; the store's unique charge
//! key is the backstop) and the event log tells every change in order.

pub mod lease;
pub mod planner;
pub mod pricing;
pub mod progress;
pub mod scheduler;
pub mod validate;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use infermesh_crds::{MeshSpec, WorkloadPhase, WorkloadSpec};
use infermesh_io::Location;
use infermesh_proto as pb;
use pb::agent_message::Msg as Up;
use pb::operator_message::Msg as Down;
use prometheus_client::metrics::counter::Counter;
use tokio::sync::{Mutex, mpsc};
use tonic::Status;

use crate::store::group::GroupCommitter;
use crate::store::{
    ChargeOutcome, CompletionRecord, Event, EventKind, ShardRecord, Store, StoreError,
    WorkloadRecord,
};
use lease::Requeue;
use pricing::{Price, format_credits};
use progress::{AgentSummary, WorkloadSummary};
use scheduler::{AgentView, Needs, PendingShard};
use validate::Validated;

/// Messages to one agent's stream.
pub type AgentSender = mpsc::UnboundedSender<Result<pb::OperatorMessage, Status>>;

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
    Running { agent: String },
    Succeeded,
    Failed,
}

#[derive(Clone, Debug)]
struct ShardState {
    range: planner::ShardRange,
    status: ShardStatus,
    /// Attempts started so far.
    attempt: u32,
    records: u64,
    output_uri: String,
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
    phase: WorkloadPhase,
    reason: String,
    message: String,
    submitted: Instant,
    finished: Option<Instant>,
    records: u64,
    bytes_done: u64,
    credits: i64,
    retried: u32,
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
    session: u64,
    tx: AgentSender,
    connected: bool,
    unschedulable: bool,
    slots: u32,
    providers: Vec<String>,
    gpus: Vec<pb::Gpu>,
    loaded: BTreeSet<String>,
    cached: BTreeSet<String>,
    /// (workload index, shard) assigned and not yet reported.
    running: BTreeSet<(usize, u32)>,
    last_heartbeat: Instant,
    completed: u64,
    credits: i64,
}

struct MeshState {
    spec: MeshSpec,
    price: Price,
}

#[derive(Default)]
struct State {
    meshes: BTreeMap<String, MeshState>,
    workloads: Vec<WorkloadState>,
    by_key: HashMap<String, usize>,
    agents: BTreeMap<String, AgentState>,
    next_session: u64,
}

/// A registered agent stream: which agent, and which of its connections.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentHandle {
    /// Agent id.
    pub id: String,
    /// Connection number; a reconnect makes the old handle stale.
    pub session: u64,
}

/// Shard counters of the core, exported as Prometheus metrics by the operator.
#[derive(Clone, Debug, Default)]
pub struct ShardCounters {
    /// Assignments sent to agents.
    pub dispatched: Counter,
    /// First completions (charged).
    pub completed: Counter,
    /// Shards failed for good (out of attempts, or a permanent error).
    pub failed: Counter,
    /// Shards put back in the queue.
    pub requeued: Counter,
}

/// The core. `S` is the store backend.
pub struct Core<S: Store> {
    store: Arc<S>,
    committer: GroupCommitter,
    state: Mutex<State>,
    counters: ShardCounters,
}

/// The key of a workload on the wire and in logs: `namespace/name/uid`.
pub fn workload_key(namespace: &str, name: &str, uid: &str) -> String {
    format!("{namespace}/{name}/{uid}")
}

fn part_name(index: u32) -> String {
    format!("part-{index:05}.jsonl")
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

impl<S: Store> Core<S> {
    /// A core over `store`.
    pub fn new(store: S) -> Self {
        let store = Arc::new(store);
        let committer = GroupCommitter::spawn(store.clone());
        Self {
            store,
            committer,
            state: Mutex::new(State::default()),
            counters: ShardCounters::default(),
        }
    }

    /// The shard counters.
    pub fn counters(&self) -> &ShardCounters {
        &self.counters
    }

    /// Pauses (or resumes) dispatch of a workload's shards; running shards finish.
    /// Returns false when the core does not know the workload.
    pub async fn set_suspend(&self, key: &str, suspend: bool) -> Result<bool, CoreError> {
        let mut st = self.state.lock().await;
        let Some(&wl) = st.by_key.get(key) else {
            return Ok(false);
        };
        if st.workloads[wl].spec.suspend != suspend {
            st.workloads[wl].spec.suspend = suspend;
            tracing::info!(workload = %key, suspend, "workload suspend changed");
            if !suspend {
                self.dispatch(&mut st).await?;
            }
        }
        Ok(true)
    }

    /// Cancels a workload (its object was deleted): running shards are cancelled on their
    /// agents, nothing more is dispatched, and the store records it as failed with `reason`.
    /// Completed shards stay charged. Returns false when the core does not know it.
    pub async fn cancel(&self, key: &str, reason: &str, message: &str) -> Result<bool, CoreError> {
        let mut st = self.state.lock().await;
        let Some(&wl) = st.by_key.get(key) else {
            return Ok(false);
        };
        if !st.workloads[wl].admitted {
            // Held, never written to the store: just stop considering it.
            let w = &mut st.workloads[wl];
            w.phase = WorkloadPhase::Failed;
            w.reason = reason.to_string();
            w.message = message.to_string();
            w.finished = Some(Instant::now());
            return Ok(true);
        }
        self.fail_workload(&mut st, wl, reason, message).await?;
        self.dispatch(&mut st).await?;
        Ok(true)
    }

    /// Whether the core holds a workload with this key.
    pub async fn knows(&self, key: &str) -> bool {
        self.state.lock().await.by_key.contains_key(key)
    }

    /// A summary of one workload.
    pub async fn workload(&self, key: &str) -> Option<WorkloadSummary> {
        let st = self.state.lock().await;
        st.by_key
            .get(key)
            .map(|&i| self.summarize(&st.workloads[i]))
    }

    /// The Meshes the core knows.
    pub async fn has_mesh(&self, name: &str) -> bool {
        self.state.lock().await.meshes.contains_key(name)
    }

    /// Forgets a Mesh (deleted): its agents are told to drain.
    pub async fn remove_mesh(&self, name: &str) {
        let mut st = self.state.lock().await;
        st.meshes.remove(name);
        for a in st.agents.values().filter(|a| a.connected && a.mesh == name) {
            let _ = a.tx.send(Ok(pb::OperatorMessage {
                msg: Some(Down::Drain(pb::Drain {
                    reason: format!("mesh {name} was deleted"),
                })),
            }));
        }
    }

    /// The store.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// Adds or updates a Mesh, and brings each namespace's grant from it to the Mesh's
    /// budget (level-triggered: applying the same Mesh twice grants nothing more; a lower
    /// budget takes the difference back). Held workloads are then reconsidered.
    pub async fn upsert_mesh(&self, name: &str, spec: MeshSpec) -> Result<(), CoreError> {
        let price = Price::from(&spec.pricing);
        for budget in &spec.budgets {
            let target = pricing::credits_to_micro(budget.credits);
            let granted = self.store.granted(&budget.namespace, name).await?;
            if target != granted {
                let memo = format!("budget of namespace {} on mesh {name}", budget.namespace);
                self.store
                    .grant(&budget.namespace, name, target - granted, &memo)
                    .await?;
                tracing::info!(namespace = %budget.namespace, mesh = %name, credits = budget.credits, "budget granted");
            }
        }
        let mut st = self.state.lock().await;
        st.meshes
            .insert(name.to_string(), MeshState { spec, price });
        self.admit_held_locked(&mut st).await
    }

    /// Takes up the workloads the store says are still running (after a restart, or when a
    /// standby takes over): completed shards stay done and are not run again; shards that were
    /// running go back to the queue with their attempt counted. Returns how many workloads
    /// were resumed. Their Meshes must be known (`upsert_mesh`) first.
    pub async fn resume(&self) -> Result<usize, CoreError> {
        let stored = self.store.active_workloads().await?;
        let mut st = self.state.lock().await;
        let mut resumed = 0;
        for sw in stored {
            let r = &sw.record;
            let key = workload_key(&r.namespace, &r.name, &r.uid);
            if st.by_key.contains_key(&key) {
                continue;
            }
            let spec: WorkloadSpec = match serde_json::from_str(&r.spec_json) {
                Ok(spec) => spec,
                Err(e) => {
                    tracing::error!(workload = %key, error = %e, "stored spec does not parse; not resumed");
                    continue;
                }
            };
            let validated = validate::validate(&spec)?;
            let credits: i64 = self
                .store
                .charges(&r.uid)
                .await?
                .iter()
                .map(|c| c.amount)
                .sum();
            let mut shards = Vec::with_capacity(sw.shards.len());
            let (mut records, mut bytes_done) = (0, 0);
            for s in &sw.shards {
                let status = match s.state.as_str() {
                    "succeeded" => {
                        records += s.records;
                        bytes_done += s.end - s.start;
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
                    output_uri: s.output_uri.clone().unwrap_or_default(),
                    sha256: s.sha256.clone().unwrap_or_default(),
                });
            }
            tracing::info!(workload = %key, shards = shards.len(), records, "workload resumed");
            let index = st.workloads.len();
            st.workloads.push(WorkloadState {
                key: key.clone(),
                uid: r.uid.clone(),
                namespace: r.namespace.clone(),
                name: r.name.clone(),
                mesh: r.mesh.clone(),
                spec,
                validated,
                input_size: r.input_bytes,
                shards,
                admitted: true,
                phase: WorkloadPhase::Running,
                reason: "Resumed".into(),
                message: String::new(),
                submitted: Instant::now(),
                finished: None,
                records,
                bytes_done,
                credits,
                retried: 0,
            });
            st.by_key.insert(key, index);
            self.maybe_finish(&mut st, index).await?;
            resumed += 1;
        }
        self.dispatch(&mut st).await?;
        Ok(resumed)
    }

    /// Validates and plans a workload; admits it when its namespace has budget (else holds it
    /// with `QuotaExceeded`), then dispatches what it can.
    pub async fn submit(&self, sub: Submission) -> Result<String, CoreError> {
        let validated = validate::validate(&sub.spec)?;
        let mut st = self.state.lock().await;
        if !st.meshes.contains_key(&sub.spec.mesh) {
            return Err(CoreError::MeshNotFound(sub.spec.mesh.clone()));
        }
        let key = workload_key(&sub.namespace, &sub.name, &sub.uid);
        if st.by_key.contains_key(&key) {
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
        let index = st.workloads.len();
        st.workloads.push(WorkloadState {
            key: key.clone(),
            uid: sub.uid,
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
                    output_uri: String::new(),
                    sha256: String::new(),
                })
                .collect(),
            admitted: false,
            phase: WorkloadPhase::Pending,
            reason: "Pending".into(),
            message: String::new(),
            submitted: Instant::now(),
            finished: None,
            records: 0,
            bytes_done: 0,
            credits: 0,
            retried: 0,
        });
        st.by_key.insert(key.clone(), index);
        self.try_admit(&mut st, index).await?;
        self.dispatch(&mut st).await?;
        Ok(key)
    }

    /// Admits the held workloads whose namespaces have budget again (after a grant).
    pub async fn admit_held(&self) -> Result<(), CoreError> {
        let mut st = self.state.lock().await;
        self.admit_held_locked(&mut st).await
    }

    async fn admit_held_locked(&self, st: &mut State) -> Result<(), CoreError> {
        let held: Vec<usize> = (0..st.workloads.len())
            .filter(|&i| {
                !st.workloads[i].admitted && st.workloads[i].phase == WorkloadPhase::Pending
            })
            .collect();
        for i in &held {
            self.try_admit(st, *i).await?;
        }
        if !held.is_empty() {
            self.dispatch(st).await?;
        }
        Ok(())
    }

    /// Admits workload `wl` if its namespace's budget on its Mesh allows; holds it otherwise.
    async fn try_admit(&self, st: &mut State, wl: usize) -> Result<(), CoreError> {
        let w = &st.workloads[wl];
        let budget = st
            .meshes
            .get(&w.mesh)
            .and_then(|m| m.spec.budgets.iter().find(|b| b.namespace == w.namespace))
            .map(|b| pricing::credits_to_micro(b.credits));
        if let Some(budget) = budget {
            let left = self
                .store
                .balance(&crate::store::namespace_account(&w.namespace))
                .await?;
            if left <= 0 {
                let message = format!(
                    "namespace {} has {} credits left (budget {} on mesh {}); admitting needs more than 0 — \
                     raise the Mesh budget or run `infermesh ledger grant --namespace {} --mesh {} --credits N`",
                    w.namespace,
                    format_credits(left),
                    format_credits(budget),
                    w.mesh,
                    w.namespace,
                    w.mesh
                );
                if w.reason != "QuotaExceeded" {
                    tracing::warn!(workload = %w.key, %message, "workload held");
                    let e =
                        Event::new(EventKind::WorkloadHeld, format!("QuotaExceeded: {message}"))
                            .workload(&w.uid);
                    self.store.append(&e).await?;
                }
                let w = &mut st.workloads[wl];
                w.reason = "QuotaExceeded".into();
                w.message = message;
                return Ok(());
            }
        }
        let record = WorkloadRecord {
            uid: w.uid.clone(),
            namespace: w.namespace.clone(),
            name: w.name.clone(),
            mesh: w.mesh.clone(),
            spec_json: serde_json::to_string(&w.spec).unwrap_or_default(),
            input_bytes: w.input_size,
        };
        let shard_records: Vec<ShardRecord> = w
            .shards
            .iter()
            .map(|s| ShardRecord {
                index: s.range.index,
                start: s.range.start,
                end: s.range.end,
            })
            .collect();
        self.store.create_workload(&record, &shard_records).await?;
        tracing::info!(workload = %w.key, shards = shard_records.len(), bytes = w.input_size, "workload admitted");
        let w = &mut st.workloads[wl];
        w.admitted = true;
        w.phase = WorkloadPhase::Running;
        w.reason = "Admitted".into();
        w.message = String::new();
        w.submitted = Instant::now();
        self.maybe_finish(st, wl).await
    }

    /// Registers an agent's stream after its Hello; sends Welcome.
    pub async fn attach(&self, hello: pb::Hello, tx: AgentSender) -> Result<AgentHandle, Status> {
        if hello.agent_id.trim().is_empty() {
            return Err(Status::invalid_argument("Hello.agent_id must not be empty"));
        }
        let caps = hello.capabilities.unwrap_or_default();
        if caps.slots == 0 {
            return Err(Status::invalid_argument(
                "Hello.capabilities.slots must be at least 1",
            ));
        }
        let mut st = self.state.lock().await;
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
        // A reconnect replaces the old stream; what it ran goes back to the queue (a late
        // completion from it is still accepted: first completion wins).
        if st.agents.get(&hello.agent_id).is_some_and(|a| a.connected) {
            self.lose_agent(&mut st, &hello.agent_id, "agent reconnected")
                .await
                .map_err(internal)?;
        }
        st.next_session += 1;
        let session = st.next_session;
        let (completed, credits, unschedulable) = st
            .agents
            .get(&hello.agent_id)
            .map(|a| (a.completed, a.credits, a.unschedulable))
            .unwrap_or_default();
        let _ = tx.send(Ok(pb::OperatorMessage {
            msg: Some(Down::Welcome(welcome)),
        }));
        st.agents.insert(
            hello.agent_id.clone(),
            AgentState {
                id: hello.agent_id.clone(),
                mesh: hello.mesh.clone(),
                node: hello.node.clone(),
                session,
                tx,
                connected: true,
                unschedulable,
                slots: caps.slots,
                providers: caps.execution_providers.clone(),
                gpus: caps.gpus.clone(),
                loaded: BTreeSet::new(),
                cached: caps.cached_models.iter().cloned().collect(),
                running: BTreeSet::new(),
                last_heartbeat: Instant::now(),
                completed,
                credits,
            },
        );
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
        self.dispatch(&mut st).await.map_err(internal)?;
        Ok(AgentHandle {
            id: hello.agent_id,
            session,
        })
    }

    /// Handles one message from an attached agent. A malformed message is refused with
    /// `InvalidArgument` (the caller ends that stream; other agents are not disturbed).
    pub async fn handle(&self, who: &AgentHandle, msg: pb::AgentMessage) -> Result<(), Status> {
        let mut st = self.state.lock().await;
        if st
            .agents
            .get(&who.id)
            .is_none_or(|a| a.session != who.session || !a.connected)
        {
            return Err(Status::failed_precondition(
                "this stream was replaced or its lease expired; reconnect",
            ));
        }
        match msg.msg {
            None => Err(Status::invalid_argument("AgentMessage carries no message")),
            Some(Up::Hello(_)) => Err(Status::invalid_argument(
                "Hello was already sent on this stream",
            )),
            Some(Up::Heartbeat(hb)) => {
                if let Some(a) = st.agents.get_mut(&who.id) {
                    a.last_heartbeat = Instant::now();
                    a.loaded = hb.loaded_models.into_iter().collect();
                    a.cached = hb.cached_models.into_iter().collect();
                }
                Ok(())
            }
            Some(Up::Completed(c)) => {
                drop(st);
                self.completed(who, c).await
            }
            Some(Up::Failed(f)) => {
                let (wl, shard) = resolve(&st, f.shard.as_ref())?;
                self.failed(&mut st, who, wl, shard, f)
                    .await
                    .map_err(internal)?;
                self.dispatch(&mut st).await.map_err(internal)
            }
        }
    }

    /// An agent's stream ended. Its shards go back to the queue.
    pub async fn detach(&self, who: &AgentHandle, reason: &str) -> Result<(), CoreError> {
        let mut st = self.state.lock().await;
        if st
            .agents
            .get(&who.id)
            .is_some_and(|a| a.session == who.session && a.connected)
        {
            self.lose_agent(&mut st, &who.id, reason).await?;
            self.dispatch(&mut st).await?;
        }
        Ok(())
    }

    /// Expires the leases of agents silent for longer than their Mesh's lease.
    pub async fn reap(&self, now: Instant) -> Result<Vec<String>, CoreError> {
        let mut st = self.state.lock().await;
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
                    .map(str::to_string),
            );
        }
        for id in &lost {
            if let Some(a) = st.agents.get(id) {
                let _ = a.tx.send(Err(Status::deadline_exceeded(
                    "lease expired: no heartbeat",
                )));
            }
            self.lose_agent(&mut st, id, "lease expired: no heartbeat")
                .await?;
        }
        if !lost.is_empty() {
            self.dispatch(&mut st).await?;
        }
        Ok(lost)
    }

    /// Drains (or undrains) an agent: no new shards; running ones finish.
    pub async fn set_unschedulable(
        &self,
        agent: &str,
        unschedulable: bool,
    ) -> Result<(), CoreError> {
        let mut st = self.state.lock().await;
        if let Some(a) = st.agents.get_mut(agent) {
            a.unschedulable = unschedulable;
        }
        Ok(self.dispatch(&mut st).await?)
    }

    /// Tells every connected agent to drain (finish and exit).
    pub async fn drain_all(&self, reason: &str) {
        let st = self.state.lock().await;
        for a in st.agents.values().filter(|a| a.connected) {
            let _ = a.tx.send(Ok(pb::OperatorMessage {
                msg: Some(Down::Drain(pb::Drain {
                    reason: reason.into(),
                })),
            }));
        }
    }

    /// A summary of every workload.
    pub async fn workloads(&self) -> Vec<WorkloadSummary> {
        let st = self.state.lock().await;
        st.workloads.iter().map(|w| self.summarize(w)).collect()
    }

    /// A summary of every agent.
    pub async fn agents(&self) -> Vec<AgentSummary> {
        let st = self.state.lock().await;
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

    fn summarize(&self, w: &WorkloadState) -> WorkloadSummary {
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
            shards_pending: count(|s| *s == ShardStatus::Pending),
            shards_running: count(|s| matches!(s, ShardStatus::Running { .. })),
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
        }
    }

    async fn lose_agent(&self, st: &mut State, id: &str, reason: &str) -> Result<(), StoreError> {
        let Some(agent) = st.agents.get_mut(id) else {
            return Ok(());
        };
        agent.connected = false;
        let running = std::mem::take(&mut agent.running);
        if running.is_empty() {
            tracing::info!(agent = %id, %reason, "agent left");
        } else {
            tracing::warn!(agent = %id, shards = running.len(), %reason, "agent lost");
        }
        self.store
            .append(
                &Event::new(
                    EventKind::AgentLost,
                    format!("{reason}; {} shards requeued", running.len()),
                )
                .agent(id),
            )
            .await?;
        for (wl, shard) in running {
            self.requeue_or_fail(st, wl, shard, Some(id), reason, "AgentLost")
                .await?;
        }
        Ok(())
    }

    /// Puts a running shard back in the queue, or fails it when it is out of attempts.
    async fn requeue_or_fail(
        &self,
        st: &mut State,
        wl: usize,
        shard: u32,
        agent: Option<&str>,
        reason: &str,
        fail_reason: &'static str,
    ) -> Result<(), StoreError> {
        let w = &mut st.workloads[wl];
        let s = &mut w.shards[shard as usize];
        if !matches!(s.status, ShardStatus::Running { .. }) {
            return Ok(());
        }
        let attempt = s.attempt;
        match lease::requeue(attempt, w.spec.max_attempts) {
            Requeue::Retry { .. } if !w.phase.is_terminal() => {
                s.status = ShardStatus::Pending;
                w.retried += 1;
                self.counters.requeued.inc();
                tracing::info!(workload = %w.key, shard, attempt, %reason, "shard requeued");
                self.store
                    .requeue(&w.uid, shard, attempt, agent, reason)
                    .await
            }
            Requeue::Retry { .. } => {
                s.status = ShardStatus::Pending;
                Ok(())
            }
            Requeue::Exhausted => {
                s.status = ShardStatus::Failed;
                self.counters.failed.inc();
                let message =
                    format!("shard {shard} failed after {attempt} attempts; last error: {reason}");
                self.store
                    .fail_shard(&w.uid, shard, attempt, agent, &message)
                    .await?;
                let reason = if attempt > 1 {
                    "AttemptsExhausted"
                } else {
                    fail_reason
                };
                self.fail_workload(st, wl, reason, &message).await
            }
        }
    }

    async fn fail_workload(
        &self,
        st: &mut State,
        wl: usize,
        reason: &str,
        message: &str,
    ) -> Result<(), StoreError> {
        let w = &mut st.workloads[wl];
        if w.phase.is_terminal() {
            return Ok(());
        }
        w.phase = WorkloadPhase::Failed;
        w.reason = reason.to_string();
        w.message = message.to_string();
        w.finished = Some(Instant::now());
        tracing::error!(workload = %w.key, %reason, %message, "workload failed");
        let uid = w.uid.clone();
        let key = w.key.clone();
        // Cancel what still runs; their slots are free from now on.
        for a in st.agents.values_mut() {
            let cancelled: Vec<(usize, u32)> = a
                .running
                .iter()
                .filter(|(i, _)| *i == wl)
                .copied()
                .collect();
            for (i, shard) in cancelled {
                a.running.remove(&(i, shard));
                let _ = a.tx.send(Ok(pb::OperatorMessage {
                    msg: Some(Down::Cancel(pb::Cancel {
                        shard: Some(pb::ShardRef {
                            workload: key.clone(),
                            index: shard,
                            attempt: 0,
                        }),
                        reason: format!("workload failed: {reason}"),
                    })),
                }));
            }
        }
        for s in &mut st.workloads[wl].shards {
            if matches!(s.status, ShardStatus::Running { .. }) {
                s.status = ShardStatus::Pending;
            }
        }
        self.store
            .finish_workload(&uid, "Failed", &format!("{reason}: {message}"))
            .await
    }

    /// A completion: prepared under the lock, committed by the group committer without it
    /// (so completions arriving together share a transaction), applied under it again.
    async fn completed(&self, who: &AgentHandle, c: pb::Completed) -> Result<(), Status> {
        let (wl, shard, record) = {
            let mut st = self.state.lock().await;
            let (wl, shard) = resolve(&st, c.shard.as_ref())?;
            // The agent's slot is free from now on.
            if let Some(a) = st.agents.get_mut(&who.id) {
                a.running.remove(&(wl, shard));
            }
            let price = st
                .meshes
                .get(&st.workloads[wl].mesh)
                .map(|m| m.price)
                .unwrap_or_default();
            let w = &st.workloads[wl];
            let record = CompletionRecord {
                workload_uid: w.uid.clone(),
                namespace: w.namespace.clone(),
                shard,
                attempt: c.shard.as_ref().map(|s| s.attempt).unwrap_or(0),
                agent: who.id.clone(),
                records: c.records,
                output_uri: c.output_uri.clone(),
                sha256: c.sha256.clone(),
                price: price.charge(&c.device, c.compute_seconds, c.records),
                device: c.device.clone(),
                compute_seconds: c.compute_seconds,
            };
            (wl, shard, record)
        };
        let committed = self.committer.complete(record.clone()).await;
        let mut st = self.state.lock().await;
        match committed {
            Ok(outcome) => self
                .apply_completion(&mut st, wl, record, outcome)
                .await
                .map_err(internal)?,
            Err(e) => {
                // Not recorded: the shard must not stay marked as running on this agent.
                self.requeue_or_fail(
                    &mut st,
                    wl,
                    shard,
                    Some(&who.id),
                    &e.to_string(),
                    "StorageError",
                )
                .await
                .map_err(internal)?;
                return Err(internal(e));
            }
        }
        self.dispatch(&mut st).await.map_err(internal)
    }

    /// Applies a committed completion to the in-memory state.
    async fn apply_completion(
        &self,
        st: &mut State,
        wl: usize,
        c: CompletionRecord,
        outcome: ChargeOutcome,
    ) -> Result<(), CoreError> {
        let key = st.workloads[wl].key.clone();
        let shard = c.shard;
        if outcome == ChargeOutcome::Duplicate
            || st.workloads[wl].shards[shard as usize].status == ShardStatus::Succeeded
        {
            tracing::info!(workload = %key, shard, attempt = c.attempt, agent = %c.agent, "duplicate completion ignored");
            return Ok(());
        }
        let w = &mut st.workloads[wl];
        let s = &mut w.shards[shard as usize];
        // Another agent may hold a later attempt of this shard: it is no longer needed.
        let other = match &s.status {
            ShardStatus::Running { agent } if *agent != c.agent => Some(agent.clone()),
            _ => None,
        };
        s.status = ShardStatus::Succeeded;
        self.counters.completed.inc();
        s.records = c.records;
        s.output_uri = c.output_uri;
        s.sha256 = c.sha256;
        w.records += c.records;
        w.bytes_done += s.range.end - s.range.start;
        w.credits += c.price;
        if let Some(a) = st.agents.get_mut(&c.agent) {
            a.completed += 1;
            a.credits += c.price;
        }
        if let Some(other) = other.and_then(|o| st.agents.get_mut(&o)) {
            other.running.remove(&(wl, shard));
            let _ = other.tx.send(Ok(pb::OperatorMessage {
                msg: Some(Down::Cancel(pb::Cancel {
                    shard: Some(pb::ShardRef {
                        workload: key,
                        index: shard,
                        attempt: 0,
                    }),
                    reason: "completed by another agent".into(),
                })),
            }));
        }
        self.maybe_finish(st, wl).await
    }

    async fn failed(
        &self,
        st: &mut State,
        who: &AgentHandle,
        wl: usize,
        shard: u32,
        f: pb::Failed,
    ) -> Result<(), CoreError> {
        let attempt = f.shard.as_ref().map(|s| s.attempt).unwrap_or(0);
        let held = st
            .agents
            .get_mut(&who.id)
            .is_some_and(|a| a.running.remove(&(wl, shard)));
        let w = &st.workloads[wl];
        let s = &w.shards[shard as usize];
        // A stale report (the shard was requeued, or already done) changes nothing.
        let current = held
            && s.attempt == attempt
            && matches!(&s.status, ShardStatus::Running { agent } if *agent == who.id);
        if !current {
            tracing::info!(workload = %w.key, shard, attempt, "stale failure report ignored");
            return Ok(());
        }
        let kind = pb::ErrorKind::try_from(f.kind).unwrap_or(pb::ErrorKind::Unspecified);
        let message = f.message;
        tracing::warn!(workload = %w.key, shard, attempt, agent = %who.id, error = %message, retryable = f.retryable, "shard failed");
        if f.retryable {
            self.requeue_or_fail(st, wl, shard, Some(&who.id), &message, reason_for(kind))
                .await?;
        } else {
            let uid = w.uid.clone();
            st.workloads[wl].shards[shard as usize].status = ShardStatus::Failed;
            self.counters.failed.inc();
            self.store
                .fail_shard(&uid, shard, attempt, Some(&who.id), &message)
                .await?;
            self.fail_workload(st, wl, reason_for(kind), &message)
                .await?;
        }
        Ok(())
    }

    /// Marks a workload Succeeded and writes its manifest once every shard is done.
    async fn maybe_finish(&self, st: &mut State, wl: usize) -> Result<(), CoreError> {
        let w = &mut st.workloads[wl];
        if w.phase.is_terminal() || w.shards.iter().any(|s| s.status != ShardStatus::Succeeded) {
            return Ok(());
        }
        let manifest = serde_json::json!({
            "workload": format!("{}/{}", w.namespace, w.name),
            "uid": w.uid,
            "input": w.spec.input.uri,
            "inputBytes": w.input_size,
            "model": {"uri": w.validated.model.uri, "sha256": w.validated.model.sha256},
            "shards": w.shards.len(),
            "records": w.records,
            "parts": w.shards.iter().map(|s| serde_json::json!({
                "index": s.range.index,
                "uri": s.output_uri,
                "records": s.records,
                "sha256": s.sha256,
            })).collect::<Vec<_>>(),
            "completedAt": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        });
        let body = serde_json::to_vec_pretty(&manifest).unwrap_or_default();
        let written = match Location::parse(&w.spec.output.uri) {
            Ok(out) => out
                .child("_SUCCESS.json")
                .put(body.into())
                .await
                .map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        let uid = w.uid.clone();
        match written {
            Ok(()) => {
                w.phase = WorkloadPhase::Succeeded;
                w.reason = "Succeeded".into();
                w.message = format!("{} records in {} shards", w.records, w.shards.len());
                w.finished = Some(Instant::now());
                tracing::info!(workload = %w.key, records = w.records, "workload succeeded");
                let message = w.message.clone();
                self.store
                    .finish_workload(&uid, "Succeeded", &message)
                    .await?;
            }
            Err(e) => {
                self.fail_workload(
                    st,
                    wl,
                    "StorageError",
                    &format!("cannot write _SUCCESS.json: {e}"),
                )
                .await?;
            }
        }
        Ok(())
    }

    /// Assigns pending shards to agents with free slots.
    async fn dispatch(&self, st: &mut State) -> Result<(), StoreError> {
        let ids: Vec<String> = st.agents.keys().cloned().collect();
        let views: Vec<AgentView> = ids
            .iter()
            .filter_map(|id| st.agents.get(id))
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
            return Ok(());
        }
        let mut pending = Vec::new();
        for (i, w) in st.workloads.iter().enumerate() {
            if w.phase != WorkloadPhase::Running || w.spec.suspend {
                continue;
            }
            let model = w.model_key();
            let needs: Needs = w.validated.needs.clone();
            pending.extend(
                w.shards
                    .iter()
                    .filter(|s| s.status == ShardStatus::Pending)
                    .map(|s| PendingShard {
                        workload: i,
                        shard: s.range.index,
                        mesh: w.mesh.clone(),
                        priority: w.spec.priority,
                        model: model.clone(),
                        needs: needs.clone(),
                    }),
            );
        }
        for p in scheduler::schedule(&views, &pending) {
            let agent_id = &views[p.agent].id;
            let w = &mut st.workloads[p.workload];
            let s = &mut w.shards[p.shard as usize];
            s.attempt += 1;
            s.status = ShardStatus::Running {
                agent: agent_id.clone(),
            };
            let attempt = s.attempt;
            let assign = pb::Assign {
                shard: Some(pb::ShardRef {
                    workload: w.key.clone(),
                    index: p.shard,
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
                output_uri: format!(
                    "{}/{}",
                    w.spec.output.uri.trim_end_matches('/'),
                    part_name(p.shard)
                ),
                batch_size: w.spec.batch_size,
            };
            let uid = w.uid.clone();
            if !self.store.assign(&uid, p.shard, attempt, agent_id).await? {
                // Another operator claimed this attempt first: it runs there, not here.
                tracing::warn!(workload = %w.key, shard = p.shard, attempt, "shard claimed by another operator");
                w.shards[p.shard as usize].status = ShardStatus::Running {
                    agent: String::new(),
                };
                continue;
            }
            self.counters.dispatched.inc();
            if let Some(a) = st.agents.get_mut(agent_id) {
                a.running.insert((p.workload, p.shard));
                let _ = a.tx.send(Ok(pb::OperatorMessage {
                    msg: Some(Down::Assign(assign)),
                }));
            }
        }
        Ok(())
    }
}

fn internal(e: impl std::fmt::Display) -> Status {
    Status::internal(e.to_string())
}

/// Finds the workload and shard a report names; `InvalidArgument` when it names none.
fn resolve(st: &State, shard: Option<&pb::ShardRef>) -> Result<(usize, u32), Status> {
    let shard = shard.ok_or_else(|| Status::invalid_argument("report carries no shard"))?;
    let wl = *st.by_key.get(&shard.workload).ok_or_else(|| {
        Status::invalid_argument(format!("unknown workload `{}`", shard.workload))
    })?;
    if shard.index as usize >= st.workloads[wl].shards.len() {
        return Err(Status::invalid_argument(format!(
            "workload `{}` has no shard {}",
            shard.workload, shard.index
        )));
    }
    Ok((wl, shard.index))
}

#[cfg(test)]
mod tests;
