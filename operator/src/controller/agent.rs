//! Agents: an Agent object per registered agent (created when it says Hello, status from the
//! core at a throttled rate by [`super::status::StatusWriter`]), `spec.unschedulable` drains,
//! and Agents of deleted nodes or pods are removed.
//!
//! [`agent_status`] and [`build_agent`] are pure.

use std::sync::Arc;
use std::time::Duration;

use infermesh_crds::agent::GpuInfo;
use infermesh_crds::{Agent, AgentPhase, AgentSpec, AgentStatus};
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams, ObjectMeta, PostParams};
use kube::runtime::controller::Action;

use super::conditions::condition;
use super::{Context, Error, Result};
use crate::core::pricing::format_credits;
use crate::core::progress::AgentSummary;

/// The phase of an agent the core knows.
pub fn phase(a: &AgentSummary) -> AgentPhase {
    match (a.connected, a.unschedulable) {
        (false, _) => AgentPhase::NotReady,
        (true, true) => AgentPhase::Draining,
        (true, false) => AgentPhase::Ready,
    }
}

/// The Agent object made when an agent registers.
pub fn build_agent(a: &AgentSummary) -> Agent {
    let mut agent = Agent::new(
        &a.id,
        AgentSpec {
            mesh: a.mesh.clone(),
            node: a.node.clone(),
            unschedulable: false,
        },
    );
    agent.metadata = ObjectMeta {
        name: Some(a.id.clone()),
        labels: Some(
            [
                ("infermesh.dev/mesh".to_string(), a.mesh.clone()),
                ("infermesh.dev/node".to_string(), a.node.clone()),
            ]
            .into(),
        ),
        ..ObjectMeta::default()
    };
    agent
}

fn human_bytes(bytes: u64) -> String {
    let gib = bytes as f64 / f64::from(1u32 << 30);
    if gib >= 1.0 {
        format!("{gib:.0}Gi")
    } else {
        format!("{}Mi", bytes >> 20)
    }
}

/// The status of an agent from the core's view of it.
pub fn agent_status(
    a: &AgentSummary,
    previous: Option<&AgentStatus>,
    now: Timestamp,
) -> AgentStatus {
    let phase = phase(a);
    let gpu = (a.gpus > 0).then(|| GpuInfo {
        product: a.gpu_product.clone(),
        memory_bytes: a.gpu_memory,
        count: a.gpus,
    });
    let gpu_summary = Some(match &gpu {
        Some(g) => format!("{}x {} {}", g.count, g.product, human_bytes(g.memory_bytes)),
        None => "none (cpu)".to_string(),
    });
    let since = SignedDuration::try_from(a.since_heartbeat).unwrap_or_default();
    let last_heartbeat = now.checked_sub(since).unwrap_or(now);
    // Whole seconds: a heartbeat a few ms later is not a change worth a write.
    let last_heartbeat = Timestamp::from_second(last_heartbeat.as_second())
        .unwrap_or(last_heartbeat)
        .to_string();
    let prev = previous.map(|p| p.conditions.as_slice()).unwrap_or(&[]);
    let cond = match phase {
        AgentPhase::Ready => condition(
            prev,
            "Ready",
            true,
            "Heartbeating",
            "stream up, lease held",
            None,
        ),
        AgentPhase::Draining => condition(
            prev,
            "Ready",
            false,
            "Unschedulable",
            "spec.unschedulable is true: no new shards; running ones finish",
            None,
        ),
        AgentPhase::NotReady => condition(
            prev,
            "Ready",
            false,
            "LeaseExpired",
            "the agent's stream dropped or it missed its lease; its shards were requeued",
            None,
        ),
    };
    AgentStatus {
        phase,
        gpu,
        gpu_summary,
        execution_providers: a.providers.clone(),
        models_cached: a.models_cached.clone(),
        models_loaded: a.models_loaded.clone(),
        slots: a.slots,
        running: a.running,
        completed_shards: a.completed,
        credits: Some(format_credits(a.credits)),
        last_heartbeat: Some(last_heartbeat),
        conditions: vec![cond],
    }
}

/// Creates the Agent object of a newly registered agent (an existing one is kept: its
/// `spec.unschedulable` belongs to the user).
pub async fn create(ctx: &Context, a: &AgentSummary) -> Result<()> {
    let api: Api<Agent> = Api::all(ctx.client.clone());
    ctx.write("agents", "create").await;
    match api.create(&PostParams::default(), &build_agent(a)).await {
        Ok(_) => {
            tracing::info!(agent = %a.id, mesh = %a.mesh, node = %a.node, "Agent created");
            Ok(())
        }
        Err(e) if super::is_conflict(&e) => Ok(()),
        Err(source) => Err(Error::CreateAgent {
            name: a.id.clone(),
            source,
        }),
    }
}

/// Writes an Agent's status (server-side apply on `/status`).
pub async fn patch_status(
    ctx: &Context,
    name: &str,
    status: &AgentStatus,
    urgent: bool,
) -> Result<()> {
    super::apply_status(
        ctx,
        &Api::<Agent>::all(ctx.client.clone()),
        name,
        status,
        urgent,
    )
    .await
}

/// Reconciles an Agent object: applies `spec.unschedulable` to the core, and deletes the
/// Agent when it is not connected and its node, or its agent pod on that node, is gone.
pub async fn reconcile(agent: Arc<Agent>, ctx: Arc<Context>) -> Result<Action> {
    let _timer = super::ReconcileTimer::start(&ctx, "agent");
    let name = agent.name_any();
    ctx.core
        .set_unschedulable(&name, agent.spec.unschedulable)
        .await?;
    let connected = ctx
        .core
        .agents()
        .await
        .iter()
        .any(|a| a.id == name && a.connected);
    if connected {
        return Ok(Action::requeue(Duration::from_secs(300)));
    }
    let gone = match node_and_pod_gone(&ctx, &agent).await? {
        Some(why) => why,
        None => return Ok(Action::requeue(Duration::from_secs(60))),
    };
    let api: Api<Agent> = Api::all(ctx.client.clone());
    ctx.write("agents", "delete").await;
    match api.delete(&name, &DeleteParams::default()).await {
        Ok(_) => tracing::info!(agent = %name, %gone, "Agent removed"),
        Err(e) if super::is_not_found(&e) => {}
        Err(source) => return Err(Error::DeleteAgent { name, source }),
    }
    // The core forgets it too (its history stays in the event log and the ledger).
    ctx.core.forget_agent(&name);
    Ok(Action::await_change())
}

/// Why a disconnected agent is gone for good (its node was deleted, or no agent pod of its
/// Mesh runs on the node any more), or `None` while it may come back.
async fn node_and_pod_gone(ctx: &Context, agent: &Agent) -> Result<Option<String>> {
    let node = &agent.spec.node;
    let nodes: Api<Node> = Api::all(ctx.client.clone());
    match nodes.get(node).await {
        Err(e) if super::is_not_found(&e) => return Ok(Some(format!("node {node} was deleted"))),
        Err(source) => {
            return Err(Error::Lookup {
                what: format!("Node {node}"),
                source,
            });
        }
        Ok(_) => {}
    }
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ctx.config.namespace);
    let lp = ListParams::default()
        .labels(&format!("infermesh.dev/mesh={}", agent.spec.mesh))
        .fields(&format!("spec.nodeName={node}"));
    let list = pods.list(&lp).await.map_err(|source| Error::Lookup {
        what: format!("agent pods on node {node}"),
        source,
    })?;
    Ok(list.items.is_empty().then(|| {
        format!(
            "no agent pod of mesh {} runs on node {node}",
            agent.spec.mesh
        )
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::mesh::tests::summary;

    #[test]
    fn phases_follow_connection_and_drain() {
        assert_eq!(phase(&summary("a", "m", true, false, 0)), AgentPhase::Ready);
        assert_eq!(
            phase(&summary("a", "m", true, true, 0)),
            AgentPhase::Draining
        );
        assert_eq!(
            phase(&summary("a", "m", false, true, 0)),
            AgentPhase::NotReady
        );
    }

    #[test]
    fn agent_status_shows_gpu_load_and_reasons() {
        let mut a = summary("a", "m", true, false, 2);
        a.running = 1;
        a.completed = 7;
        a.credits = 2_500_000;
        let s = agent_status(&a, None, Timestamp::now());
        assert_eq!(s.gpu_summary.as_deref(), Some("2x NVIDIA L4 48Gi"));
        assert_eq!((s.running, s.completed_shards, s.slots), (1, 7, 2));
        assert_eq!(s.credits.as_deref(), Some("2.500000"));
        assert_eq!(s.conditions[0].reason, "Heartbeating");
        let lost = agent_status(
            &summary("a", "m", false, false, 0),
            Some(&s),
            Timestamp::now(),
        );
        assert_eq!(lost.phase, AgentPhase::NotReady);
        assert_eq!(lost.gpu_summary.as_deref(), Some("none (cpu)"));
        assert_eq!(lost.conditions[0].reason, "LeaseExpired");
        let drained = agent_status(&summary("a", "m", true, true, 0), None, Timestamp::now());
        assert_eq!(drained.conditions[0].reason, "Unschedulable");
    }

    #[test]
    fn the_agent_object_names_its_mesh_and_node() {
        let agent = build_agent(&summary("gpus-n1", "gpus", true, false, 1));
        assert_eq!(agent.metadata.name.as_deref(), Some("gpus-n1"));
        assert_eq!(agent.spec.mesh, "gpus");
        assert_eq!(agent.spec.node, "node-gpus-n1");
        assert!(!agent.spec.unschedulable);
    }
}
