//! Keeps Workload, Agent and Mesh status in step with the core at a throttled rate: status
//! writes are bounded by time, not by shards. Per tick (once a second) it writes at most
//! `status_writes_per_second` objects, each Workload at most once per
//! `workload_status_period` and each Agent at most once per `agent_status_period` (sooner
//! when its phase changes), and only what changed.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use infermesh_crds::{AgentPhase, AgentStatus, MeshStatus, WorkloadStatus};
use k8s_openapi::jiff::Timestamp;

use super::{Context, agent, mesh, workload};
use crate::metrics::MeshLabels;

struct Written<T> {
    at: Instant,
    status: T,
}

/// Which writes are due; pure bookkeeping, the writer does the calls.
pub struct StatusWriter {
    ctx: Arc<Context>,
    workloads: HashMap<String, Written<WorkloadStatus>>,
    agents: HashMap<String, Written<AgentStatus>>,
    meshes: BTreeMap<String, Written<MeshStatus>>,
    /// Agents registered but without an Agent object yet.
    created: std::collections::HashSet<String>,
    /// Objects due but over this tick's budget, first in line next tick.
    backlog: VecDeque<String>,
}

/// Whether a status with volatile parts (throughput, ETA, heartbeat) is worth writing now:
/// something changed, and the last write is at least `period` old, or the change is one a
/// person waits for (`urgent`).
pub fn due(last: Option<(Instant, bool)>, now: Instant, period: Duration, urgent: bool) -> bool {
    match last {
        None => true,
        Some((_, false)) => false,
        Some((at, true)) => urgent || now.saturating_duration_since(at) >= period,
    }
}

impl StatusWriter {
    /// A writer for `ctx`.
    pub fn new(ctx: Arc<Context>) -> Self {
        Self {
            ctx,
            workloads: HashMap::new(),
            agents: HashMap::new(),
            meshes: BTreeMap::new(),
            created: Default::default(),
            backlog: VecDeque::new(),
        }
    }

    /// Runs a tick a second until the task is dropped.
    pub async fn run(mut self) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.tick(Instant::now()).await;
        }
    }

    /// One round of writes. Returns how many status writes it made.
    pub async fn tick(&mut self, now: Instant) -> usize {
        let ctx = self.ctx.clone();
        let config = &ctx.config;
        let mut budget = config.status_writes_per_second as usize;
        let mut writes = 0;
        let wall = Timestamp::now();

        // Agents first: a new agent gets its object at once (within the budget).
        let agents = ctx.core.agents().await;
        for a in &agents {
            if !self.created.contains(&a.id) && budget > 0 {
                budget -= 1;
                writes += 1;
                match agent::create(&ctx, a).await {
                    Ok(()) => {
                        self.created.insert(a.id.clone());
                    }
                    Err(e) => tracing::warn!(agent = %a.id, error = %e, "cannot create Agent"),
                }
            }
        }
        let mut due_items: Vec<(bool, String)> = Vec::new();
        for a in &agents {
            if !self.created.contains(&a.id) {
                continue;
            }
            let prev = self.agents.get(&a.id);
            let status = agent::agent_status(a, prev.map(|w| &w.status), wall);
            let changed = prev.is_none_or(|w| !same_agent(&w.status, &status));
            let urgent = prev.is_none_or(|w| w.status.phase != status.phase);
            if due(
                prev.map(|w| (w.at, changed)),
                now,
                config.agent_status_period,
                urgent,
            ) {
                due_items.push((urgent, format!("agent/{}", a.id)));
            }
        }
        let summaries = ctx.core.workloads().await;
        let generations = ctx
            .generations
            .lock()
            .map(|g| g.clone())
            .unwrap_or_default();
        let mut by_key = HashMap::new();
        for s in &summaries {
            let prev = self.workloads.get(&s.key);
            let status = workload::running_status(
                s,
                prev.map(|w| &w.status),
                generations.get(&s.key).copied(),
                wall,
            );
            let changed = prev.is_none_or(|w| !same_workload(&w.status, &status));
            if due(
                prev.map(|w| (w.at, changed)),
                now,
                config.workload_status_period,
                false,
            ) {
                due_items.push((false, format!("workload/{}", s.key)));
            }
            by_key.insert(s.key.clone(), s);
        }
        // Backlog first, then urgent, then the rest.
        due_items.sort_by_key(|(urgent, _)| !urgent);
        let mut order: Vec<String> = self.backlog.drain(..).collect();
        for (_, id) in due_items {
            if !order.contains(&id) {
                order.push(id);
            }
        }
        for id in order {
            if budget == 0 {
                self.backlog.push_back(id);
                continue;
            }
            if let Some(agent_id) = id.strip_prefix("agent/") {
                let Some(a) = agents.iter().find(|a| a.id == agent_id) else {
                    continue;
                };
                let prev = self.agents.get(agent_id).map(|w| &w.status);
                let status = agent::agent_status(a, prev, wall);
                match agent::patch_status(&ctx, agent_id, &status).await {
                    Ok(()) => {
                        self.agents
                            .insert(agent_id.to_string(), Written { at: now, status });
                    }
                    Err(e) => {
                        tracing::warn!(agent = %agent_id, error = %e, "agent status not written")
                    }
                }
            } else if let Some(key) = id.strip_prefix("workload/") {
                let Some(s) = by_key.get(key) else { continue };
                // A write by the reconciler (at admission) counts for the throttle too.
                if !ctx.claim_workload_write(
                    &s.namespace,
                    &s.name,
                    config.workload_status_period,
                    now,
                ) {
                    continue;
                }
                let prev = self.workloads.get(key).map(|w| &w.status);
                let status = workload::running_status(s, prev, generations.get(key).copied(), wall);
                match workload::patch_status(&ctx, &s.namespace, &s.name, &status).await {
                    Ok(()) => {
                        self.workloads
                            .insert(key.to_string(), Written { at: now, status });
                    }
                    Err(e) => {
                        tracing::warn!(workload = %key, error = %e, "workload status not written")
                    }
                }
            }
            budget -= 1;
            writes += 1;
        }

        // Meshes: counts change rarely; written when they do, at most every 5 seconds.
        let observed = ctx.meshes.lock().await.clone();
        for (name, seen) in &observed {
            let prev = self.meshes.get(name);
            let status = mesh::mesh_status(name, prev.map(|w| &w.status), seen, &agents);
            ctx.metrics
                .agents_ready
                .get_or_create(&MeshLabels { mesh: name.clone() })
                .set(i64::from(status.agents_ready));
            let changed = prev.is_none_or(|w| !same_mesh(&w.status, &status));
            if budget > 0
                && due(
                    prev.map(|w| (w.at, changed)),
                    now,
                    Duration::from_secs(5),
                    false,
                )
            {
                match mesh::patch_status(&ctx, name, &status).await {
                    Ok(()) => {
                        self.meshes
                            .insert(name.clone(), Written { at: now, status });
                    }
                    Err(e) => tracing::warn!(mesh = %name, error = %e, "mesh status not written"),
                }
                budget -= 1;
                writes += 1;
            }
        }
        // One stream per connected agent.
        ctx.metrics
            .grpc_streams
            .set(agents.iter().filter(|a| a.connected).count() as i64);
        ctx.metrics
            .queue_depth
            .set(summaries.iter().map(|s| i64::from(s.shards_pending)).sum());
        writes
    }
}

fn same_agent(a: &AgentStatus, b: &AgentStatus) -> bool {
    a.phase == b.phase
        && a.running == b.running
        && a.completed_shards == b.completed_shards
        && a.credits == b.credits
        && a.models_loaded == b.models_loaded
        && a.models_cached == b.models_cached
        && a.slots == b.slots
        // The heartbeat alone moves every few seconds; write it when the agent is not Ready
        // (so a stalled one shows its last heartbeat) or with other changes.
        && (a.phase == AgentPhase::Ready || a.last_heartbeat == b.last_heartbeat)
}

fn same_workload(a: &WorkloadStatus, b: &WorkloadStatus) -> bool {
    a.phase == b.phase
        && a.shards == b.shards
        && a.records == b.records
        && a.credits_spent == b.credits_spent
        && a.attempts_retried == b.attempts_retried
        && a.conditions
            .iter()
            .map(|c| (&c.reason, &c.status))
            .eq(b.conditions.iter().map(|c| (&c.reason, &c.status)))
}

fn same_mesh(a: &MeshStatus, b: &MeshStatus) -> bool {
    a.agents_ready == b.agents_ready
        && a.agents_total == b.agents_total
        && a.slots == b.slots
        && a.gpus == b.gpus
        && a.observed_generation == b.observed_generation
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_status_is_due_only_when_changed_and_old_enough_or_urgent() {
        let t0 = Instant::now();
        let p = Duration::from_secs(2);
        assert!(due(None, t0, p, false), "never written");
        assert!(!due(Some((t0, false)), t0 + p * 10, p, false), "unchanged");
        assert!(!due(Some((t0, true)), t0 + p / 2, p, false), "too soon");
        assert!(
            due(Some((t0, true)), t0 + p, p, false),
            "changed and old enough"
        );
        assert!(due(Some((t0, true)), t0, p, true), "urgent");
    }
}
