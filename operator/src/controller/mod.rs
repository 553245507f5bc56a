//! Cluster mode: the controllers that translate Mesh, Agent and Workload objects to and from
//! the core, leader election, agent authentication by TokenReview, and the TLS certificate of
//! the gRPC port.
//!
//! Each controller's reconcile is a pipeline of small steps (validate and build are pure
//! functions, tested without a client), then apply, then status by server-side apply on
//! `/status` with one field manager. Status that follows the core (shard counts, progress,
//! agent load) is written by [`status::StatusWriter`] at a throttled rate: the subtasks live in
//! the store, never in etcd.

pub mod agent;
pub mod conditions;
pub mod events;
pub mod leader;
pub mod mesh;
pub mod rbac;
pub mod run;
pub mod status;
pub mod tls;
pub mod token_review;
pub mod workload;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use kube::runtime::events::Recorder;
use tokio::sync::Mutex;

use crate::core::{Core, CoreError};
use crate::metrics::Metrics;
use crate::store::AnyStore;

/// The one field manager of every server-side apply the operator sends.
pub const FIELD_MANAGER: &str = "infermesh-operator";
/// The finalizer on Meshes (the operator owns their DaemonSet and ServiceAccount).
pub const MESH_FINALIZER: &str = "infermesh.dev/mesh-cleanup";
/// The finalizer on Workloads (the operator owns their shards and ledger rows).
pub const WORKLOAD_FINALIZER: &str = "infermesh.dev/workload-cleanup";
/// The audience of the agents' projected ServiceAccount tokens.
pub const TOKEN_AUDIENCE: &str = "infermesh";
/// Label the leader puts on its own pod; the gRPC Service selects it.
pub const LEADER_LABEL: &str = "infermesh.dev/leader";

/// Settings of cluster mode (from `infermesh operator`'s flags).
#[derive(Clone, Debug)]
pub struct Config {
    /// The operator's namespace: agent DaemonSets, their ServiceAccounts, the TLS Secret and
    /// the leader Lease live here.
    pub namespace: String,
    /// The URL agents dial (`https://infermesh-grpc.infermesh.svc:7443`).
    pub grpc_endpoint: String,
    /// Agent image when a Mesh does not name one.
    pub agent_image: String,
    /// The Secret with `tls.crt`, `tls.key` and `ca.crt` for the gRPC port.
    pub tls_secret: String,
    /// An existing PVC mounted at `/data` in every agent (file:// inputs and outputs).
    pub data_claim: Option<String>,
    /// A Secret whose keys become environment variables of every agent (object-store
    /// credentials: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION, AWS_ENDPOINT, ...).
    pub object_store_secret: Option<String>,
    /// At most one status write per Workload per this period.
    pub workload_status_period: Duration,
    /// At most one status write per Agent per this period (phase changes go out sooner).
    pub agent_status_period: Duration,
    /// At most this many status writes per tick of the status writer (once a second), so
    /// that reconcilers keep room under `api_writes_per_second`.
    pub status_writes_per_second: u32,
    /// At most this many mutating API calls per second, all controllers together: every
    /// write waits its turn in [`Context::write`].
    pub api_writes_per_second: u32,
}

impl Config {
    /// Settings for tests and the write-budget benchmark.
    pub fn for_namespace(namespace: &str) -> Self {
        Self {
            namespace: namespace.into(),
            grpc_endpoint: format!("https://infermesh-grpc.{namespace}.svc:7443"),
            agent_image: "ghcr.io/infermesh/infermesh-agent:0.1.0".into(),
            tls_secret: "infermesh-tls".into(),
            data_claim: None,
            object_store_secret: None,
            workload_status_period: Duration::from_secs(2),
            agent_status_period: Duration::from_secs(10),
            status_writes_per_second: 10,
            api_writes_per_second: 15,
        }
    }
}

/// What the Mesh controller last saw of a Mesh that its status needs.
#[derive(Clone, Debug, Default)]
pub struct MeshObserved {
    /// `metadata.generation`.
    pub generation: Option<i64>,
    /// Nodes the DaemonSet should run on.
    pub desired: Option<i32>,
}

/// Shared by every controller.
pub struct Context {
    /// The Kubernetes client.
    pub client: kube::Client,
    /// The core.
    pub core: Arc<Core<AnyStore>>,
    /// Settings.
    pub config: Config,
    /// Metrics.
    pub metrics: Metrics,
    /// Publishes Kubernetes Events.
    pub recorder: Recorder,
    /// Per Mesh, what its status needs beyond the core.
    pub meshes: Mutex<BTreeMap<String, MeshObserved>>,
    /// When each Workload's status (`namespace/name`) was last written, by anyone: the
    /// status writer's throttle counts the reconciler's writes too.
    pub workload_writes: std::sync::Mutex<std::collections::HashMap<String, std::time::Instant>>,
    /// `metadata.generation` of each Workload the reconciler saw, by core key: the status
    /// writer reports it as `observedGeneration`.
    pub generations: std::sync::Mutex<std::collections::HashMap<String, i64>>,
    /// Paces the mutating API calls.
    pub pacer: WritePacer,
}

/// Spaces calls at least `1 / rate` apart, so any one-second window holds at most `rate + 1`
/// of them, however many tasks ask at once. Two lanes share that rate: a call in the urgent
/// lane (a phase change a person waits for) takes the next free turn ahead of every routine
/// call still waiting (Agent creates, Events, progress refreshes); within a lane, turns go in
/// the order asked. A turn nobody is waiting for is not kept: the pacer never saves up a burst.
pub struct WritePacer {
    interval: Duration,
    state: Arc<std::sync::Mutex<PacerState>>,
}

#[derive(Default)]
struct PacerState {
    /// The earliest moment of the next turn.
    next: Option<tokio::time::Instant>,
    /// Waiting calls: urgent, then routine.
    urgent: std::collections::VecDeque<tokio::sync::oneshot::Sender<()>>,
    routine: std::collections::VecDeque<tokio::sync::oneshot::Sender<()>>,
    /// Whether a task is handing out turns.
    dispatching: bool,
}

impl WritePacer {
    /// At most `per_second` calls a second.
    pub fn new(per_second: u32) -> Self {
        Self {
            interval: Duration::from_secs(1) / per_second.max(1),
            state: Arc::default(),
        }
    }

    /// Waits for a routine call's turn.
    pub async fn wait(&self) {
        self.turn(false).await;
    }

    /// Waits for an urgent call's turn (ahead of routine calls).
    pub async fn wait_urgent(&self) {
        self.turn(true).await;
    }

    /// Waits for a turn in the urgent lane (`urgent`) or the routine one.
    pub async fn turn(&self, urgent: bool) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let start = {
            let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            if urgent {
                st.urgent.push_back(tx);
            } else {
                st.routine.push_back(tx);
            }
            !std::mem::replace(&mut st.dispatching, true)
        };
        if start {
            tokio::spawn(dispatch(self.state.clone(), self.interval));
        }
        // The dispatcher only ends with both lanes empty, so this turn comes.
        let _ = rx.await;
    }
}

/// Hands out turns, one per `interval`, urgent first, until nobody waits.
async fn dispatch(state: Arc<std::sync::Mutex<PacerState>>, interval: Duration) {
    loop {
        let at = {
            let st = state.lock().unwrap_or_else(|e| e.into_inner());
            st.next.map_or_else(tokio::time::Instant::now, |n| {
                n.max(tokio::time::Instant::now())
            })
        };
        tokio::time::sleep_until(at).await;
        let mut st = state.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let Some(tx) = st.urgent.pop_front().or_else(|| st.routine.pop_front()) else {
                st.dispatching = false;
                return;
            };
            // A caller that gave up (its future dropped) does not use the turn.
            if tx.send(()).is_ok() {
                st.next = Some(at + interval);
                break;
            }
        }
    }
}

impl Context {
    /// A context.
    pub fn new(
        client: kube::Client,
        core: Arc<Core<AnyStore>>,
        config: Config,
        metrics: Metrics,
        instance: &str,
    ) -> Self {
        let config_rate = config.api_writes_per_second;
        let recorder = Recorder::new(
            client.clone(),
            kube::runtime::events::Reporter {
                controller: FIELD_MANAGER.into(),
                instance: Some(instance.into()),
            },
        );
        Self {
            client,
            core,
            config,
            metrics,
            recorder,
            meshes: Mutex::new(BTreeMap::new()),
            workload_writes: Default::default(),
            generations: Default::default(),
            pacer: WritePacer::new(config_rate),
        }
    }
}

impl Context {
    /// Waits for a mutating API call's turn (see [`WritePacer`]) and counts it.
    pub async fn write(&self, resource: &str, verb: &str) {
        self.pacer.wait().await;
        self.metrics.write(resource, verb);
    }

    /// Waits for the turn of the patch that kube-runtime's `finalizer` helper is about to make
    /// on `obj` (of `resource`), if it makes one: adding `finalizer` to an object that is not
    /// being deleted, or removing it from one that is. A thousand Workloads applied at once
    /// are a thousand such patches; unpaced, they burst past the budget.
    pub async fn pace_finalizer<K: kube::Resource>(
        &self,
        obj: &K,
        finalizer: &str,
        resource: &str,
    ) {
        let has = obj
            .meta()
            .finalizers
            .iter()
            .flatten()
            .any(|f| f == finalizer);
        let deleting = obj.meta().deletion_timestamp.is_some();
        if has == deleting {
            self.write(resource, "patch").await;
        }
    }

    /// Claims the right to write a Workload's status at `now`: true (and recorded) when
    /// nobody wrote it within `period`. See [`workload::patch_status_throttled`].
    pub fn claim_workload_write(
        &self,
        namespace: &str,
        name: &str,
        period: Duration,
        now: std::time::Instant,
    ) -> bool {
        let Ok(mut writes) = self.workload_writes.lock() else {
            return true;
        };
        let key = format!("{namespace}/{name}");
        match writes.get(&key) {
            Some(at) if now.saturating_duration_since(*at) < period => false,
            _ => {
                writes.insert(key, now);
                true
            }
        }
    }
}

/// Why a reconcile failed. The variant names the action that failed; it doubles as the
/// metric label and the Event reason.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Server-side apply of an agent DaemonSet failed.
    #[error("failed to apply the agent DaemonSet {name}: {source}")]
    ApplyDaemonSet {
        /// DaemonSet name.
        name: String,
        /// The API error.
        source: kube::Error,
    },
    /// Server-side apply of an agent ServiceAccount failed.
    #[error("failed to apply the agent ServiceAccount {name}: {source}")]
    ApplyServiceAccount {
        /// ServiceAccount name.
        name: String,
        /// The API error.
        source: kube::Error,
    },
    /// Deleting what a Mesh owns failed.
    #[error("failed to delete {what}: {source}")]
    DeleteOwned {
        /// What.
        what: String,
        /// The API error.
        source: kube::Error,
    },
    /// A status patch failed.
    #[error("failed to patch the status of {what}: {source}")]
    PatchStatus {
        /// Which object.
        what: String,
        /// The API error.
        source: kube::Error,
    },
    /// Reading a Node or Pods failed.
    #[error("failed to look up {what}: {source}")]
    Lookup {
        /// What.
        what: String,
        /// The API error.
        source: kube::Error,
    },
    /// Creating an Agent failed.
    #[error("failed to create Agent {name}: {source}")]
    CreateAgent {
        /// Agent name.
        name: String,
        /// The API error.
        source: kube::Error,
    },
    /// Deleting an Agent failed.
    #[error("failed to delete Agent {name}: {source}")]
    DeleteAgent {
        /// Agent name.
        name: String,
        /// The API error.
        source: kube::Error,
    },
    /// Deleting a finished Workload whose `spec.ttlSecondsAfterFinished` passed failed.
    #[error("failed to delete the finished Workload {name}: {source}")]
    DeleteFinished {
        /// Workload name.
        name: String,
        /// The API error.
        source: kube::Error,
    },
    /// The core refused or its store failed.
    #[error("core: {0}")]
    Core(#[from] CoreError),
    /// Adding or removing a finalizer failed.
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
    /// An object lacks a field the API server always sets.
    #[error("{0} has no {1}")]
    MissingField(String, &'static str),
}

impl Error {
    /// The variant's name: the metric label and Event reason.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::ApplyDaemonSet { .. } => "ApplyDaemonSet",
            Self::ApplyServiceAccount { .. } => "ApplyServiceAccount",
            Self::DeleteOwned { .. } => "DeleteOwned",
            Self::PatchStatus { .. } => "PatchStatus",
            Self::Lookup { .. } => "Lookup",
            Self::CreateAgent { .. } => "CreateAgent",
            Self::DeleteAgent { .. } => "DeleteAgent",
            Self::DeleteFinished { .. } => "DeleteFinished",
            Self::Core(_) => "Core",
            Self::Finalizer(_) => "Finalizer",
            Self::MissingField(..) => "MissingField",
        }
    }
}

/// Result of a reconcile step.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Writes an object's status by server-side apply on `/status` under [`FIELD_MANAGER`], in
/// its turn (see [`WritePacer`]; `urgent` for a phase change), and counts the write.
pub async fn apply_status<K>(
    ctx: &Context,
    api: &kube::Api<K>,
    name: &str,
    status: &impl serde::Serialize,
    urgent: bool,
) -> Result<()>
where
    K: kube::Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    ctx.pacer.turn(urgent).await;
    send_status(ctx, api, name, status).await
}

/// [`apply_status`] for a caller that has already waited its turn.
pub async fn send_status<K>(
    ctx: &Context,
    api: &kube::Api<K>,
    name: &str,
    status: &impl serde::Serialize,
) -> Result<()>
where
    K: kube::Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let body = serde_json::json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "status": status,
    });
    ctx.metrics
        .write(&format!("{}/status", K::plural(&())), "patch");
    let ssa = kube::api::PatchParams::apply(FIELD_MANAGER).force();
    api.patch_status(name, &ssa, &kube::api::Patch::Apply(body))
        .await
        .map_err(|source| Error::PatchStatus {
            what: format!("{} {name}", K::kind(&())),
            source,
        })?;
    Ok(())
}

/// Whether an API error is a 404.
pub fn is_not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 404)
}

/// Whether an API error is a 409.
pub fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

/// Logs a failed reconcile, counts it by reason, and requeues soon.
pub fn error_policy<K>(
    controller: &'static str,
) -> impl Fn(Arc<K>, &Error, Arc<Context>) -> kube::runtime::controller::Action {
    move |_obj, error, ctx| {
        tracing::warn!(controller, reason = error.metric_label(), error = %error, "reconcile failed");
        ctx.metrics
            .failures
            .get_or_create(&crate::metrics::FailureLabels {
                controller: controller.into(),
                reason: error.metric_label().into(),
            })
            .inc();
        kube::runtime::controller::Action::requeue(Duration::from_secs(5))
    }
}

/// Counts a reconcile and times it.
pub struct ReconcileTimer {
    labels: crate::metrics::ControllerLabels,
    start: std::time::Instant,
    metrics: Metrics,
}

impl ReconcileTimer {
    /// Starts timing a reconcile of `controller`.
    pub fn start(ctx: &Context, controller: &str) -> Self {
        let labels = crate::metrics::ControllerLabels {
            controller: controller.into(),
        };
        ctx.metrics.reconciles.get_or_create(&labels).inc();
        Self {
            labels,
            start: std::time::Instant::now(),
            metrics: ctx.metrics.clone(),
        }
    }
}

impl Drop for ReconcileTimer {
    fn drop(&mut self) {
        self.metrics
            .duration
            .get_or_create(&self.labels)
            .observe(self.start.elapsed().as_secs_f64());
    }
}
