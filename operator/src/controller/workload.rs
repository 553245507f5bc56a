//! The Workload controller: validate, admit (Mesh, matching agents, objects, budget), plan
//! (the core), and status. A Workload carries a finalizer while the operator holds its shards:
//! deleting it cancels the shards still running on agents.
//!
//! A Failed Workload is retried when its `infermesh.dev/retry` annotation takes a value other
//! than `status.lastRetry` ([`should_retry`]), or when its `spec.retryGeneration` is bumped
//! above `status.observedRetryGeneration` ([`should_retry_generation`]); the operator then
//! writes the value acted on to the status, so each value retries once.
//!
//! A finished Workload with `spec.ttlSecondsAfterFinished` is deleted that many seconds after
//! `status.completionTime` ([`deletion_due`]); the store (event log, ledger) keeps its history.
//!
//! [`admission`], [`running_status`], [`waiting_status`], [`should_retry`],
//! [`should_retry_generation`] and [`deletion_due`] are pure.

use std::sync::Arc;
use std::time::Duration;

use infermesh_crds::workload::RETRY_ANNOTATION;
use infermesh_crds::{ShardCounts, Workload, WorkloadPhase, WorkloadStatus};
use infermesh_io::{Credentials, Location, ObjectError};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::Api;
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::{Resource, ResourceExt};

use super::conditions::condition;
use super::{Context, Error, Result, WORKLOAD_FINALIZER};
use crate::core::progress::{AgentSummary, WAITING_FOR_SLOTS, WorkloadSummary, format_duration};
use crate::core::scheduler::{AgentView, Needs};
use crate::core::validate::{self, Invalid};
use crate::core::{CoreError, RetryOutcome, Submission, pricing, workload_key};
use crate::core::{inputs, tenancy};
use infermesh_io::access::scoped;

/// The field manager of `status.lastRetry`. It is not [`super::FIELD_MANAGER`]: the status
/// writer applies the rest of the status under that one without `lastRetry`, and server-side
/// apply would remove a field its manager stops sending.
pub const RETRY_FIELD_MANAGER: &str = "infermesh-operator-retry";

/// Why a workload is not admitted yet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Waiting {
    /// CamelCase reason (`NoMatchingAgents`).
    pub reason: &'static str,
    /// What is missing, for a person.
    pub message: String,
    /// When to look again.
    pub retry: Duration,
}

/// Whether some Ready agent of `mesh` can run a workload with `needs`; the unmet requirement
/// otherwise, naming it and what the agents lack.
pub fn admission(mesh: &str, needs: &Needs, agents: &[AgentSummary]) -> Result<(), Waiting> {
    let ready: Vec<&AgentSummary> = agents
        .iter()
        .filter(|a| a.mesh == mesh && a.connected && !a.unschedulable)
        .collect();
    if ready.is_empty() {
        return Err(Waiting {
            reason: "NoMatchingAgents",
            message: format!(
                "no Ready agent in mesh {mesh}: check `kubectl get agents` and the Mesh's DaemonSet"
            ),
            retry: Duration::from_secs(15),
        });
    }
    let mut unmet = Vec::new();
    for a in &ready {
        let view = AgentView {
            id: a.id.clone(),
            mesh: a.mesh.clone(),
            free_slots: a.slots,
            schedulable: true,
            loaded: Default::default(),
            cached: Default::default(),
            providers: a.providers.clone(),
            gpu_memory: a.gpu_memory,
        };
        match needs.unmet(&view) {
            None => return Ok(()),
            Some(need) => unmet.push(need),
        }
    }
    unmet.sort();
    unmet.dedup();
    Err(Waiting {
        reason: "NoMatchingAgents",
        message: format!(
            "none of the {} Ready agents of mesh {mesh} offers {}",
            ready.len(),
            unmet.join(", or ")
        ),
        retry: Duration::from_secs(15),
    })
}

/// Status of a workload the core holds.
pub fn running_status(
    summary: &WorkloadSummary,
    previous: Option<&WorkloadStatus>,
    generation: Option<i64>,
    now: Timestamp,
) -> WorkloadStatus {
    let prev_conditions = previous.map(|p| p.conditions.as_slice()).unwrap_or(&[]);
    let admitted = summary.phase != WorkloadPhase::Pending;
    let admitted_cond = if admitted {
        condition(
            prev_conditions,
            "Admitted",
            true,
            "Admitted",
            format!("{} shards planned", summary.shards_total),
            generation,
        )
    } else {
        condition(
            prev_conditions,
            "Admitted",
            false,
            reason_or(&summary.reason, "Pending"),
            summary.message.clone(),
            generation,
        )
    };
    let complete_cond = match summary.phase {
        WorkloadPhase::Succeeded => condition(
            prev_conditions,
            "Complete",
            true,
            "Succeeded",
            format!(
                "{} records in {} shards; output {}",
                summary.records, summary.shards_total, summary.output_uri
            ),
            generation,
        ),
        WorkloadPhase::Failed => condition(
            prev_conditions,
            "Complete",
            false,
            reason_or(&summary.reason, "Failed"),
            summary.message.clone(),
            generation,
        ),
        WorkloadPhase::Running if summary.suspended => condition(
            prev_conditions,
            "Complete",
            false,
            "Suspended",
            "spec.suspend is true: no new shards are dispatched; running ones finish",
            generation,
        ),
        WorkloadPhase::Running => condition(
            prev_conditions,
            "Complete",
            false,
            "Running",
            format!(
                "{} of {} shards done",
                summary.shards_succeeded, summary.shards_total
            ),
            generation,
        ),
        WorkloadPhase::Pending => condition(
            prev_conditions,
            "Complete",
            false,
            "Pending",
            "not admitted yet",
            generation,
        ),
    };
    let mut conditions = vec![admitted_cond, complete_cond];
    if admitted {
        let (status, reason, message) = running_condition(summary);
        conditions.push(condition(
            prev_conditions,
            "Running",
            status,
            reason,
            message,
            generation,
        ));
    }
    let start_time = previous.and_then(|p| p.start_time.clone()).or_else(|| {
        admitted.then(|| {
            let elapsed = SignedDuration::try_from(summary.elapsed).unwrap_or_default();
            now.checked_sub(elapsed).unwrap_or(now).to_string()
        })
    });
    let completion_time = if summary.phase.is_terminal() {
        previous
            .and_then(|p| p.completion_time.clone())
            .or_else(|| Some(now.to_string()))
    } else {
        None
    };
    WorkloadStatus {
        phase: summary.phase,
        shards: ShardCounts {
            total: summary.shards_total,
            pending: summary.shards_pending,
            running: summary.shards_running,
            succeeded: summary.shards_succeeded,
            failed: summary.shards_failed,
        },
        records: summary.records,
        progress: Some(summary.progress()),
        throughput: admitted.then(|| (summary.throughput() * 10.0).round() / 10.0),
        eta: summary.eta().map(format_duration),
        credits_spent: Some(pricing::format_credits(summary.credits)),
        attempts_retried: summary.attempts_retried,
        // Owned by their own field manager (`write_retry_marks`), never sent with the rest.
        last_retry: None,
        observed_retry_generation: None,
        start_time,
        completion_time,
        observed_generation: generation,
        conditions,
    }
}

/// The `Running` condition of an admitted workload: whether its shards hold slots, and when
/// not, why (`WaitingForSlots` with its place in the Mesh's queue or its namespace's share
/// in use, `Suspended`, `QuotaExceeded`, or how it finished).
pub fn running_condition(summary: &WorkloadSummary) -> (bool, &str, String) {
    match summary.phase {
        WorkloadPhase::Succeeded => (
            false,
            "Succeeded",
            format!(
                "{} records in {} shards; output {}",
                summary.records, summary.shards_total, summary.output_uri
            ),
        ),
        WorkloadPhase::Failed | WorkloadPhase::Pending => (
            false,
            reason_or(&summary.reason, "Failed"),
            summary.message.clone(),
        ),
        WorkloadPhase::Running if summary.suspended => (
            false,
            "Suspended",
            "spec.suspend is true: no new shards are dispatched".into(),
        ),
        WorkloadPhase::Running if summary.reason == "QuotaExceeded" => {
            (false, "QuotaExceeded", summary.message.clone())
        }
        WorkloadPhase::Running => match &summary.waiting {
            Some(w) => (false, WAITING_FOR_SLOTS, w.message.clone()),
            None => (
                true,
                "Running",
                format!(
                    "{} shards running, {} waiting",
                    summary.shards_running, summary.shards_pending
                ),
            ),
        },
    }
}

fn reason_or<'a>(reason: &'a str, default: &'a str) -> &'a str {
    if reason.is_empty() { default } else { reason }
}

/// Whether a Workload asks for a retry not acted on yet: it is Failed, and its
/// `infermesh.dev/retry` annotation (`annotation`) has a value, not blank, other than
/// `status.lastRetry`. Each value thus retries once.
pub fn should_retry(annotation: Option<&str>, status: Option<&WorkloadStatus>) -> bool {
    let Some(value) = annotation.filter(|v| !v.trim().is_empty()) else {
        return false;
    };
    status
        .is_some_and(|s| s.phase == WorkloadPhase::Failed && s.last_retry.as_deref() != Some(value))
}

/// Whether a Workload's `spec.retryGeneration` (`generation`) asks for a retry not acted on
/// yet: it is Failed and `generation` is above `status.observedRetryGeneration` (0 when
/// unset). Each value thus retries once; a bump while the workload is not Failed waits until
/// it is.
pub fn should_retry_generation(generation: u32, status: Option<&WorkloadStatus>) -> bool {
    status.is_some_and(|s| {
        s.phase == WorkloadPhase::Failed && generation > s.observed_retry_generation.unwrap_or(0)
    })
}

/// When a finished Workload is due for deletion under `spec.ttlSecondsAfterFinished`
/// (`ttl_seconds`): its `status.completionTime` plus the TTL. `None` without a TTL, when it
/// has not finished (Pending, Running), or when its completion time is missing or unreadable.
pub fn deletion_due(
    ttl_seconds: Option<u32>,
    status: Option<&WorkloadStatus>,
) -> Option<Timestamp> {
    let ttl = SignedDuration::from_secs(i64::from(ttl_seconds?));
    let status = status.filter(|s| s.phase.is_terminal())?;
    let finished: Timestamp = status.completion_time.as_deref()?.parse().ok()?;
    finished.checked_add(ttl).ok()
}

/// Status of a workload that waits before admission (or is invalid: `failed`).
pub fn waiting_status(
    previous: Option<&WorkloadStatus>,
    generation: Option<i64>,
    reason: &str,
    message: &str,
    failed: bool,
) -> WorkloadStatus {
    let prev = previous.map(|p| p.conditions.as_slice()).unwrap_or(&[]);
    let mut conditions = vec![condition(
        prev, "Admitted", false, reason, message, generation,
    )];
    if failed {
        conditions.push(condition(
            prev, "Complete", false, reason, message, generation,
        ));
    }
    WorkloadStatus {
        phase: if failed {
            WorkloadPhase::Failed
        } else {
            WorkloadPhase::Pending
        },
        observed_generation: generation,
        conditions,
        ..WorkloadStatus::default()
    }
}

/// The core's key of a Workload object.
pub fn key_of(w: &Workload) -> Result<String> {
    let ns = w
        .namespace()
        .ok_or_else(|| Error::MissingField(w.name_any(), "metadata.namespace"))?;
    let uid = w
        .uid()
        .ok_or_else(|| Error::MissingField(w.name_any(), "metadata.uid"))?;
    Ok(workload_key(&ns, &w.name_any(), &uid))
}

/// Writes a Workload's status (server-side apply on `/status`); `urgent` for a phase change.
pub async fn patch_status(
    ctx: &Context,
    namespace: &str,
    name: &str,
    status: &WorkloadStatus,
    urgent: bool,
) -> Result<()> {
    let api = Api::<Workload>::namespaced(ctx.client.clone(), namespace);
    super::apply_status(ctx, &api, name, status, urgent).await
}

/// Writes a Workload's status at most once per `workload_status_period`, counting every
/// writer (the reconciler at admission and the status writer), with the period measured
/// between the moments writes are sent, after their turn in the pacer. `now` is the
/// caller's clock. Returns whether it wrote. A phase change (`urgent`) waits in the pacer's
/// urgent lane.
pub async fn patch_status_throttled(
    ctx: &Context,
    namespace: &str,
    name: &str,
    status: &WorkloadStatus,
    now: std::time::Instant,
    urgent: bool,
) -> Result<bool> {
    let asked = std::time::Instant::now();
    ctx.pacer.turn(urgent).await;
    let sent = now + asked.elapsed();
    if !ctx.claim_workload_write(namespace, name, ctx.config.workload_status_period, sent) {
        return Ok(false);
    }
    let api = Api::<Workload>::namespaced(ctx.client.clone(), namespace);
    super::send_status(ctx, &api, name, status).await?;
    Ok(true)
}

async fn publish(ctx: &Context, w: &Workload, type_: EventType, reason: &str, note: String) {
    ctx.write("events", "create").await;
    let event = Event {
        type_,
        reason: reason.into(),
        note: Some(note),
        action: "Admission".into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&event, &w.object_ref(&())).await {
        tracing::warn!(error = %e, "cannot publish an event");
    }
}

/// Reconciles a Workload (behind its finalizer).
pub async fn reconcile(w: Arc<Workload>, ctx: Arc<Context>) -> Result<Action> {
    let _timer = super::ReconcileTimer::start(&ctx, "workload");
    let ns = w
        .namespace()
        .ok_or_else(|| Error::MissingField(w.name_any(), "metadata.namespace"))?;
    let api: Api<Workload> = Api::namespaced(ctx.client.clone(), &ns);
    ctx.pace_finalizer(w.as_ref(), WORKLOAD_FINALIZER, "workloads")
        .await;
    finalizer(&api, WORKLOAD_FINALIZER, w, |event| async {
        match event {
            Finalizer::Apply(w) => apply(&w, &ctx).await,
            Finalizer::Cleanup(w) => cleanup(&w, &ctx).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)))
}

async fn wait(ctx: &Context, w: &Workload, waiting: Waiting) -> Result<Action> {
    let ns = w.namespace().unwrap_or_default();
    let status = waiting_status(
        w.status.as_ref(),
        w.metadata.generation,
        waiting.reason,
        &waiting.message,
        false,
    );
    let changed = w
        .status
        .as_ref()
        .and_then(|s| s.conditions.first())
        .is_none_or(|c| c.reason != waiting.reason || c.message != waiting.message);
    if changed {
        tracing::info!(workload = %w.name_any(), reason = waiting.reason, message = %waiting.message, "workload waits");
        patch_status(ctx, &ns, &w.name_any(), &status, false).await?;
        publish(ctx, w, EventType::Warning, waiting.reason, waiting.message).await;
    }
    Ok(Action::requeue(waiting.retry))
}

/// The size and version (ETag) of the object at `uri` (the operator reads no data; agents
/// do), or why the workload waits: `not_found` when there is no such object, `StorageError`
/// otherwise.
async fn object_facts(
    field: &str,
    uri: &str,
    not_found: &'static str,
) -> Result<(u64, Option<String>), Waiting> {
    let facts = async { Location::parse(uri)?.facts().await };
    facts.await.map_err(|e| Waiting {
        reason: if matches!(e, ObjectError::NotFound { .. }) {
            not_found
        } else {
            "StorageError"
        },
        message: format!("{field}: {e}"),
        retry: Duration::from_secs(30),
    })
}

/// The credentials of `spec.credentials`, read from the Secret in the workload's namespace
/// (`get` only), or why the workload waits: the Secret is missing (`SecretNotFound`), the
/// operator may not read Secrets there (`Forbidden`: the namespace is not one of the chart's
/// `tenants.namespaces`), or it lacks the keys (`InvalidCredentials`). No message holds a
/// value of the Secret.
async fn credentials(
    ctx: &Context,
    ns: &str,
    spec: &infermesh_crds::WorkloadSpec,
) -> std::result::Result<Option<Credentials>, Waiting> {
    let Some(r) = &spec.credentials else {
        return Ok(None);
    };
    let name = &r.secret_ref.name;
    let waiting = |reason: &'static str, message: String| Waiting {
        reason,
        message: format!("spec.credentials.secretRef: {message}"),
        retry: Duration::from_secs(30),
    };
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    let secret = match secrets.get_opt(name).await {
        Ok(Some(s)) => s,
        Ok(None) => {
            return Err(waiting(
                "SecretNotFound",
                format!("Secret {ns}/{name} does not exist"),
            ));
        }
        Err(kube::Error::Api(e)) if e.code == 403 => {
            return Err(waiting(
                "Forbidden",
                format!(
                    "the operator may not read Secrets in namespace {ns}: add it to the chart's \
                     tenants.namespaces"
                ),
            ));
        }
        Err(e) => {
            return Err(waiting(
                "SecretUnavailable",
                format!("Secret {ns}/{name} could not be read: {e}"),
            ));
        }
    };
    let data = secret.data.unwrap_or_default();
    Credentials::from_secret(|k| data.get(k).map(|v| v.0.as_slice()))
        .map(Some)
        .map_err(|m| waiting("InvalidCredentials", format!("Secret {ns}/{name}: {m}")))
}

fn mesh_not_found(mesh: &str) -> Waiting {
    Waiting {
        reason: "MeshNotFound",
        message: format!("mesh {mesh} does not exist: `kubectl get meshes`"),
        retry: Duration::from_secs(30),
    }
}

async fn apply(w: &Workload, ctx: &Context) -> Result<Action> {
    let key = key_of(w)?;
    let ns = w.namespace().unwrap_or_default();
    let name = w.name_any();
    if let (Ok(mut g), Some(generation)) = (ctx.generations.lock(), w.metadata.generation) {
        g.insert(key.clone(), generation);
    }
    let asked = w.annotations().get(RETRY_ANNOTATION).map(String::as_str);
    let ask = RetryAsk {
        annotation: asked.filter(|_| should_retry(asked, w.status.as_ref())),
        generation: should_retry_generation(w.spec.retry_generation, w.status.as_ref())
            .then_some(w.spec.retry_generation),
    };
    let retrying = ask.annotation.is_some() || ask.generation.is_some();
    if retrying && let Some(later) = retry(ctx, w, &key, &ask).await? {
        return Ok(later);
    }
    // Not while a retry takes it up again, nor while the core runs it (a status that lags).
    if !retrying
        && let Some(due) = deletion_due(w.spec.ttl_seconds_after_finished, w.status.as_ref())
        && ctx
            .core
            .workload(&key)
            .await
            .is_none_or(|s| s.phase.is_terminal())
    {
        return delete_finished(ctx, w, due).await;
    }
    if ctx.core.knows(&key).await {
        ctx.core.set_suspend(&key, w.spec.suspend).await?;
        // Taken up after a restart or a retry, it waits for these; a rotated Secret is
        // picked up here too.
        if w.spec.credentials.is_some() {
            match credentials(ctx, &ns, &w.spec).await {
                Ok(c) => {
                    ctx.core.set_credentials(&key, c).await?;
                }
                Err(waiting) => return wait(ctx, w, waiting).await,
            }
        }
        return Ok(Action::requeue(Duration::from_secs(300)));
    }
    // Finished before this operator started (or before a fail-over): never run it again.
    if let Some(s) = &w.status
        && s.phase.is_terminal()
        && s.observed_generation == w.metadata.generation
    {
        return Ok(Action::await_change());
    }
    let validated = match validate::validate(&w.spec) {
        Ok(v) => v,
        Err(Invalid { reason, message }) => return invalid(ctx, w, reason, &message).await,
    };
    let mesh = &w.spec.mesh;
    if !ctx.core.has_mesh(mesh).await {
        return wait(ctx, w, mesh_not_found(mesh)).await;
    }
    // Before any object is touched: the namespace may use these locations (the Mesh's
    // `spec.tenants`), and reads and writes them with its own credentials.
    let grant = ctx.core.grant(mesh, &ns).await;
    if let Err(Invalid { reason, message }) = tenancy::check(&w.spec, grant.as_ref()) {
        return invalid(ctx, w, reason, &message).await;
    }
    let credentials = match credentials(ctx, &ns, &w.spec).await {
        Ok(c) => c,
        Err(waiting) => return wait(ctx, w, waiting).await,
    };
    if let Err(waiting) = admission(mesh, &validated.needs, &ctx.core.agents().await) {
        return wait(ctx, w, waiting).await;
    }
    let model = object_facts("spec.model.uri", &w.spec.model.uri, "ModelNotFound");
    if let Err(waiting) = scoped(credentials.clone(), model).await {
        return wait(ctx, w, waiting).await;
    }
    // The input's version is pinned with its size (every shard reads that very object); a
    // prefix, glob or columnar input is listed and its footers read, never its data.
    let resolved = inputs::resolve(&w.spec, &validated, grant.as_ref());
    let input = match scoped(credentials.clone(), resolved).await {
        Ok(input) => input,
        Err(e) => {
            let waiting = Waiting {
                reason: inputs::reason(&e),
                message: format!("spec.input.uri: {e}"),
                retry: Duration::from_secs(30),
            };
            return wait(ctx, w, waiting).await;
        }
    };
    let uid = w.uid().unwrap_or_default();
    match ctx
        .core
        .submit(Submission {
            namespace: ns.clone(),
            name: name.clone(),
            uid,
            spec: w.spec.clone(),
            input_size: input.size,
            input_version: input.version,
            input_files: input.files,
            credentials,
        })
        .await
    {
        Ok(_) | Err(CoreError::Duplicate(_)) => {}
        Err(CoreError::Finished { key, phase }) => {
            // This run finished before (the cache lagged, or the spec changed after the end):
            // it is never run again.
            tracing::info!(workload = %key, %phase, "finished workload not run again");
            return Ok(Action::await_change());
        }
        Err(CoreError::Invalid(Invalid { reason, message })) => {
            return invalid(ctx, w, reason, &message).await;
        }
        Err(CoreError::MeshNotFound(m)) => return wait(ctx, w, mesh_not_found(&m)).await,
        Err(CoreError::OutputInUse(message)) => {
            let waiting = Waiting {
                reason: "OutputInUse",
                message,
                retry: Duration::from_secs(10),
            };
            return wait(ctx, w, waiting).await;
        }
        Err(e) => return Err(e.into()),
    }
    if let Some(summary) = ctx.core.workload(&key).await {
        // The status writer may have written it a moment ago (it keeps it in step anyway);
        // the Event goes out either way.
        let status = running_status(
            &summary,
            w.status.as_ref(),
            w.metadata.generation,
            Timestamp::now(),
        );
        patch_status_throttled(ctx, &ns, &name, &status, std::time::Instant::now(), false).await?;
        let (type_, reason, note) = if summary.phase == WorkloadPhase::Pending {
            (
                EventType::Warning,
                reason_or(&summary.reason, "Pending").to_string(),
                summary.message.clone(),
            )
        } else {
            (
                EventType::Normal,
                "Admitted".to_string(),
                format!(
                    "{} shards planned over {} input bytes",
                    summary.shards_total, summary.input_bytes
                ),
            )
        };
        publish(ctx, w, type_, &reason, note).await;
    }
    Ok(Action::requeue(Duration::from_secs(300)))
}

/// Deletes a finished Workload whose `spec.ttlSecondsAfterFinished` passed at `due`, with a
/// Normal Event (`TTLExpired`) saying why; before `due`, looks again then. Only the object
/// goes: the store keeps the run's shards, charges and events.
async fn delete_finished(ctx: &Context, w: &Workload, due: Timestamp) -> Result<Action> {
    let now = Timestamp::now();
    if now < due {
        // In whole seconds, rounded up; looked at again at least hourly (a long TTL, a clock
        // that moved).
        let left = due.duration_since(now).as_secs().saturating_add(1);
        return Ok(Action::requeue(Duration::from_secs(
            left.clamp(1, 3600).unsigned_abs(),
        )));
    }
    let ns = w.namespace().unwrap_or_default();
    let name = w.name_any();
    let api = Api::<Workload>::namespaced(ctx.client.clone(), &ns);
    ctx.write("workloads", "delete").await;
    match api.delete(&name, &kube::api::DeleteParams::default()).await {
        Ok(_) => {}
        Err(e) if super::is_not_found(&e) => return Ok(Action::await_change()),
        Err(source) => return Err(Error::DeleteFinished { name, source }),
    }
    let ttl = w.spec.ttl_seconds_after_finished.unwrap_or_default();
    tracing::info!(workload = %name, namespace = %ns, ttl, "finished workload deleted (ttlSecondsAfterFinished)");
    publish(
        ctx,
        w,
        EventType::Normal,
        "TTLExpired",
        format!(
            "deleted {ttl}s after it finished (spec.ttlSecondsAfterFinished); its history stays \
             in the event log and the ledger"
        ),
    )
    .await;
    Ok(Action::await_change())
}

/// What asks for a retry of a Failed Workload: a new `infermesh.dev/retry` annotation value,
/// a bumped `spec.retryGeneration`, or both (one retry then, both recorded).
struct RetryAsk<'a> {
    annotation: Option<&'a str>,
    generation: Option<u32>,
}

impl RetryAsk<'_> {
    fn describe(&self) -> String {
        match (self.annotation, self.generation) {
            (Some(v), Some(g)) => format!("retry {v} (retryGeneration {g})"),
            (Some(v), None) => format!("retry {v}"),
            (None, Some(g)) => format!("retryGeneration {g}"),
            (None, None) => "retry".into(),
        }
    }
}

/// Retries a Failed Workload that asks for it (see [`should_retry`],
/// [`should_retry_generation`]), then records what was acted on (`status.lastRetry`,
/// `status.observedRetryGeneration`) so it is acted on once. The phase goes back to Running
/// through the status writer, as any running workload's. A refusal (not failed, unknown to
/// the store) is recorded too, with a Warning Event, and the reconcile goes on as usual
/// (`None`); a store that does not answer is asked again later, with nothing recorded
/// (`Some` action).
async fn retry(
    ctx: &Context,
    w: &Workload,
    key: &str,
    ask: &RetryAsk<'_>,
) -> Result<Option<Action>> {
    let ns = w.namespace().unwrap_or_default();
    let name = w.name_any();
    let value = ask.describe();
    let outcome = ctx.core.retry_failed(key).await?;
    let event = match &outcome {
        RetryOutcome::StoreUnavailable { message } => {
            tracing::warn!(workload = %key, %message, "retry waits for the store");
            return Ok(Some(Action::requeue(Duration::from_secs(5))));
        }
        RetryOutcome::Retried {
            requeued,
            failed,
            kept,
        } => Some((
            EventType::Normal,
            "Retried",
            format!(
                "{value}: {requeued} shards run again ({failed} had failed); \
                 {kept} succeeded shards kept"
            ),
        )),
        // Running already: an earlier attempt at this retry took it up.
        RetryOutcome::NotFailed { phase } if phase == "Running" || phase == "Pending" => None,
        RetryOutcome::NotFailed { phase } => Some((
            EventType::Warning,
            "RetryRefused",
            format!("{value}: the workload is {phase}, not Failed; nothing to retry"),
        )),
        RetryOutcome::Unknown => Some((
            EventType::Warning,
            "RetryRefused",
            format!("{value}: the operator holds no run of this Workload to retry"),
        )),
    };
    tracing::info!(workload = %key, retry = %value, outcome = ?outcome, "retry asked");
    let previous = w.status.as_ref();
    let last_retry = ask
        .annotation
        .or_else(|| previous.and_then(|s| s.last_retry.as_deref()));
    let observed = ask
        .generation
        .or_else(|| previous.and_then(|s| s.observed_retry_generation));
    write_retry_marks(ctx, &ns, &name, last_retry, observed).await?;
    if let Some((type_, reason, note)) = event {
        publish(ctx, w, type_, reason, note).await;
    }
    Ok(None)
}

/// Writes `status.lastRetry` and `status.observedRetryGeneration` alone, under
/// [`RETRY_FIELD_MANAGER`] (a phase change's turn). Both are sent whenever known: server-side
/// apply would remove a field its manager stops sending.
async fn write_retry_marks(
    ctx: &Context,
    namespace: &str,
    name: &str,
    last_retry: Option<&str>,
    observed_retry_generation: Option<u32>,
) -> Result<()> {
    let api = Api::<Workload>::namespaced(ctx.client.clone(), namespace);
    let mut status = serde_json::Map::new();
    if let Some(value) = last_retry {
        status.insert("lastRetry".into(), value.into());
    }
    if let Some(generation) = observed_retry_generation {
        status.insert("observedRetryGeneration".into(), generation.into());
    }
    let body = serde_json::json!({
        "apiVersion": Workload::api_version(&()),
        "kind": Workload::kind(&()),
        "status": status,
    });
    ctx.pacer.turn(true).await;
    ctx.metrics.write("workloads/status", "patch");
    let ssa = kube::api::PatchParams::apply(RETRY_FIELD_MANAGER).force();
    api.patch_status(name, &ssa, &kube::api::Patch::Apply(body))
        .await
        .map_err(|source| Error::PatchStatus {
            what: format!("Workload {name}"),
            source,
        })?;
    Ok(())
}

async fn invalid(ctx: &Context, w: &Workload, reason: &str, message: &str) -> Result<Action> {
    let status = waiting_status(
        w.status.as_ref(),
        w.metadata.generation,
        reason,
        message,
        true,
    );
    tracing::warn!(workload = %w.name_any(), reason, message, "invalid workload");
    // Refused for good (Failed): a phase change, ahead of routine writes.
    patch_status(
        ctx,
        &w.namespace().unwrap_or_default(),
        &w.name_any(),
        &status,
        true,
    )
    .await?;
    publish(ctx, w, EventType::Warning, reason, message.to_string()).await;
    // Not retried until the object changes.
    Ok(Action::await_change())
}

async fn cleanup(w: &Workload, ctx: &Context) -> Result<Action> {
    let key = key_of(w)?;
    if ctx
        .core
        .cancel(
            &key,
            "Deleted",
            "the Workload was deleted; running shards were cancelled",
        )
        .await?
    {
        tracing::info!(workload = %key, "workload deleted: shards cancelled");
    }
    Ok(Action::await_change())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::mesh::tests::summary as agent;

    fn needs(gpu: bool, mem: u64, provider: Option<&str>) -> Needs {
        Needs {
            gpu,
            min_gpu_memory: mem,
            provider: provider.map(str::to_string),
        }
    }

    fn wl(phase: WorkloadPhase, reason: &str) -> WorkloadSummary {
        WorkloadSummary {
            key: "ns/w/u".into(),
            uid: "u".into(),
            namespace: "ns".into(),
            name: "w".into(),
            mesh: "gpus".into(),
            phase,
            reason: reason.into(),
            message: format!("{reason} message"),
            shards_total: 10,
            shards_pending: 4,
            shards_running: 2,
            shards_succeeded: 4,
            shards_failed: 0,
            records: 400,
            bytes_done: 400,
            input_bytes: 1000,
            elapsed: Duration::from_secs(10),
            credits: 1_000_000,
            attempts_retried: 1,
            suspended: false,
            output_uri: "file:///out/".into(),
            warnings: Vec::new(),
            waiting: None,
        }
    }

    #[test]
    fn admission_names_the_unmet_requirement() {
        let cpu = agent("a", "gpus", true, false, 0);
        let gpu = agent("b", "gpus", true, false, 1);
        let drained_gpu = agent("c", "gpus", true, true, 1);
        let other_mesh_gpu = agent("d", "other", true, false, 1);
        assert!(admission("gpus", &needs(false, 0, None), std::slice::from_ref(&cpu)).is_ok());
        let w = admission(
            "gpus",
            &needs(true, 0, None),
            &[cpu.clone(), drained_gpu, other_mesh_gpu],
        )
        .expect_err("no GPU");
        assert_eq!(w.reason, "NoMatchingAgents");
        assert!(
            w.message.contains("a GPU execution provider"),
            "{}",
            w.message
        );
        assert!(admission("gpus", &needs(true, 0, None), &[cpu.clone(), gpu.clone()]).is_ok());
        let w = admission(
            "gpus",
            &needs(true, 80 << 30, None),
            std::slice::from_ref(&gpu),
        )
        .expect_err("memory");
        assert!(w.message.contains("bytes of GPU memory"), "{}", w.message);
        let w = admission("gpus", &needs(false, 0, Some("tensorrt")), &[cpu, gpu])
            .expect_err("provider");
        assert!(w.message.contains("`tensorrt`"), "{}", w.message);
        let w = admission("gpus", &needs(false, 0, None), &[]).expect_err("no agents");
        assert!(
            w.message.contains("no Ready agent in mesh gpus"),
            "{}",
            w.message
        );
    }

    #[test]
    fn running_status_reports_counts_progress_and_reasons() {
        let now = Timestamp::now();
        let s = running_status(&wl(WorkloadPhase::Running, "Admitted"), None, Some(4), now);
        assert_eq!(s.phase, WorkloadPhase::Running);
        assert_eq!(
            (
                s.shards.total,
                s.shards.pending,
                s.shards.running,
                s.shards.succeeded
            ),
            (10, 4, 2, 4)
        );
        assert_eq!(s.progress.as_deref(), Some("40%"));
        assert_eq!(s.throughput, Some(40.0));
        assert!(s.eta.is_some());
        assert_eq!(s.credits_spent.as_deref(), Some("1.000000"));
        assert!(s.start_time.is_some() && s.completion_time.is_none());
        assert_eq!(s.observed_generation, Some(4));
        assert_eq!(s.conditions[0].reason, "Admitted");
        assert_eq!(s.conditions[1].reason, "Running");

        let mut suspended = wl(WorkloadPhase::Running, "Admitted");
        suspended.suspended = true;
        assert_eq!(
            running_status(&suspended, Some(&s), Some(4), now).conditions[1].reason,
            "Suspended"
        );

        let held = running_status(
            &wl(WorkloadPhase::Pending, "QuotaExceeded"),
            None,
            None,
            now,
        );
        assert_eq!(held.conditions[0].status, "False");
        assert_eq!(held.conditions[0].reason, "QuotaExceeded");
        assert!(held.start_time.is_none());

        let failed = running_status(
            &wl(WorkloadPhase::Failed, "ModelLoadFailed"),
            Some(&s),
            None,
            now,
        );
        assert_eq!(failed.conditions[1].reason, "ModelLoadFailed");
        assert_eq!(failed.start_time, s.start_time, "the start time is kept");
        assert!(failed.completion_time.is_some());

        let mut done = wl(WorkloadPhase::Succeeded, "Succeeded");
        done.bytes_done = 1000;
        let ok = running_status(&done, Some(&s), None, now);
        assert_eq!(ok.conditions[1].status, "True");
        assert_eq!(ok.eta, None);
        assert_eq!(ok.progress.as_deref(), Some("100%"));
    }

    #[test]
    fn a_workload_waiting_for_slots_is_admitted_but_not_running_and_says_where_it_is() {
        let now = Timestamp::now();
        let mut waiting = wl(WorkloadPhase::Running, "Admitted");
        waiting.shards_running = 0;
        waiting.waiting = Some(crate::core::progress::SlotWait {
            position: Some(3),
            message: "position 3 in the queue of mesh gpus".into(),
        });
        let s = running_status(&waiting, None, Some(1), now);
        let cond = |s: &WorkloadStatus, t: &str| {
            s.conditions
                .iter()
                .find(|c| c.type_ == t)
                .cloned()
                .unwrap_or_else(|| panic!("no {t} condition in {:?}", s.conditions))
        };
        assert_eq!(s.phase, WorkloadPhase::Running);
        assert_eq!(cond(&s, "Admitted").status, "True");
        let running = cond(&s, "Running");
        assert_eq!(
            (running.status.as_str(), running.reason.as_str()),
            ("False", "WaitingForSlots")
        );
        assert_eq!(running.message, "position 3 in the queue of mesh gpus");

        waiting.waiting = Some(crate::core::progress::SlotWait {
            position: None,
            message: "namespace ns uses 6 of its 6 slots (maxSlots on mesh gpus)".into(),
        });
        let capped = running_status(&waiting, Some(&s), Some(1), now);
        assert_eq!(cond(&capped, "Running").reason, "WaitingForSlots");
        assert!(
            cond(&capped, "Running")
                .message
                .contains("uses 6 of its 6 slots (maxSlots"),
            "{:?}",
            capped.conditions
        );

        // Once it holds slots it runs; the transition time moves with the status.
        let started = running_status(
            &wl(WorkloadPhase::Running, "Admitted"),
            Some(&capped),
            Some(1),
            now,
        );
        let running = cond(&started, "Running");
        assert_eq!(
            (running.status.as_str(), running.reason.as_str()),
            ("True", "Running")
        );
        assert_eq!(running.message, "2 shards running, 4 waiting");

        let mut suspended = wl(WorkloadPhase::Running, "Admitted");
        suspended.suspended = true;
        assert_eq!(
            cond(&running_status(&suspended, None, None, now), "Running").reason,
            "Suspended"
        );
        let mut quota = wl(WorkloadPhase::Running, "QuotaExceeded");
        quota.waiting = None;
        assert_eq!(
            cond(&running_status(&quota, None, None, now), "Running").reason,
            "QuotaExceeded"
        );
        let failed = running_status(
            &wl(WorkloadPhase::Failed, "DeadlineExceeded"),
            None,
            None,
            now,
        );
        let running = cond(&failed, "Running");
        assert_eq!(
            (running.status.as_str(), running.reason.as_str()),
            ("False", "DeadlineExceeded")
        );
        let held = running_status(
            &wl(WorkloadPhase::Pending, "QuotaExceeded"),
            None,
            None,
            now,
        );
        assert!(
            held.conditions.iter().all(|c| c.type_ != "Running"),
            "not admitted: no Running condition"
        );
    }

    #[test]
    fn a_failed_workload_is_retried_once_per_annotation_value() {
        let status = |phase, last: Option<&str>| WorkloadStatus {
            phase,
            last_retry: last.map(str::to_string),
            ..WorkloadStatus::default()
        };
        let failed = status(WorkloadPhase::Failed, None);
        assert!(
            should_retry(Some("1"), Some(&failed)),
            "a first value retries"
        );
        assert!(
            !should_retry(None, Some(&failed)),
            "no annotation, no retry"
        );
        assert!(
            !should_retry(Some(""), Some(&failed)),
            "a blank value asks nothing"
        );
        assert!(!should_retry(Some("  "), Some(&failed)));
        assert!(!should_retry(Some("1"), None), "no status: it never ran");
        let retried = status(WorkloadPhase::Failed, Some("1"));
        assert!(
            !should_retry(Some("1"), Some(&retried)),
            "a value already acted on is not acted on again, even if it failed again"
        );
        assert!(
            should_retry(Some("2"), Some(&retried)),
            "a new value retries"
        );
        for phase in [
            WorkloadPhase::Pending,
            WorkloadPhase::Running,
            WorkloadPhase::Succeeded,
        ] {
            assert!(
                !should_retry(Some("2"), Some(&status(phase, Some("1")))),
                "only a Failed workload is retried ({phase:?})"
            );
        }
    }

    #[test]
    fn the_status_writer_never_sends_last_retry() {
        // `status.lastRetry` has a field manager of its own: the status writer's applies must
        // not carry it, or a later apply without it would remove it (and retry again).
        let mut previous = running_status(
            &wl(WorkloadPhase::Failed, "InvalidInput"),
            None,
            None,
            Timestamp::now(),
        );
        previous.last_retry = Some("1".into());
        let next = running_status(
            &wl(WorkloadPhase::Running, "Retried"),
            Some(&previous),
            None,
            Timestamp::now(),
        );
        assert_eq!(next.phase, WorkloadPhase::Running);
        assert_eq!(next.last_retry, None);
        let json = serde_json::to_value(&next).expect("json");
        assert!(json.get("lastRetry").is_none(), "{json}");
        assert!(
            next.completion_time.is_none(),
            "running again: no completion time"
        );
        let mut asked = previous.clone();
        asked.last_retry = Some("2".into());
        let json = serde_json::to_value(&asked).expect("json");
        assert_eq!(json["lastRetry"], "2", "the field's name on the wire");
        assert_ne!(RETRY_FIELD_MANAGER, super::super::FIELD_MANAGER);
    }

    #[test]
    fn waiting_and_invalid_statuses_carry_their_reason() {
        let w = waiting_status(
            None,
            Some(2),
            "MeshNotFound",
            "mesh x does not exist",
            false,
        );
        assert_eq!(w.phase, WorkloadPhase::Pending);
        assert_eq!(w.conditions.len(), 1);
        assert_eq!(w.conditions[0].reason, "MeshNotFound");
        let i = waiting_status(
            None,
            Some(2),
            "InvalidSpec",
            "spec.batchSize must be at least 1",
            true,
        );
        assert_eq!(i.phase, WorkloadPhase::Failed);
        assert_eq!(i.conditions[1].type_, "Complete");
        assert_eq!(i.conditions[1].reason, "InvalidSpec");
    }
}
