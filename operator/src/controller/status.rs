//! Keeps Workload, Agent and Mesh status in step with the core at a throttled rate: status
//! writes are bounded by time, not by shards. Per tick (once a second) it writes at most
//! `status_writes_per_second` objects, each Workload at most once per
//! `workload_status_period` and each Agent at most once per `agent_status_period` (sooner
//! when its phase changes), and only what changed.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use infermesh_crds::{AgentPhase, AgentStatus, MeshStatus, WorkloadStatus};
use k8s_openapi::jiff::Timestamp;

use super::{Context, agent, mesh, workload};
use crate::metrics::MeshLabels;

/// How long a routine write of one tick may wait for its turn in the pacer.
const ROUTINE_WAIT: Duration = Duration::from_secs(1);

struct Written<T> {
    at: Instant,
    status: T,
}

/// Writes the status that is due, remembering what it wrote and when.
pub struct StatusWriter {
    ctx: Arc<Context>,
    workloads: HashMap<String, Written<WorkloadStatus>>,
    agents: HashMap<String, Written<AgentStatus>>,
    meshes: BTreeMap<String, Written<MeshStatus>>,
    /// Agents whose Agent object exists.
    created: HashSet<String>,
}

/// The order of due writes: phase changes a person waits for, Workloads' before Agents', then
/// routine refreshes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Rank {
    WorkloadPhase,
    AgentPhase,
    Refresh,
}

impl Rank {
    /// `phase` when the write is urgent, else a routine refresh.
    fn of(urgent: bool, phase: Rank) -> Rank {
        if urgent { phase } else { Rank::Refresh }
    }
}

/// Runs a write: an urgent one to the end (its lane is short), a routine one only until
/// `deadline` (`None` when it gave up its turn in the pacer).
async fn in_turn<T>(
    urgent: bool,
    deadline: tokio::time::Instant,
    write: impl std::future::Future<Output = T>,
) -> Option<T> {
    if urgent {
        Some(write.await)
    } else {
        tokio::time::timeout_at(deadline, write).await.ok()
    }
}

/// A status write that is due: an index into this tick's agents or workloads, and the status.
enum Due {
    Agent(usize, AgentStatus),
    Workload(usize, WorkloadStatus),
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
            created: HashSet::new(),
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

    /// One round of writes. Returns how many API writes it made.
    pub async fn tick(&mut self, now: Instant) -> usize {
        let ctx = self.ctx.clone();
        let config = &ctx.config;
        let mut budget = config.status_writes_per_second as usize;
        let mut writes = 0;
        let wall = Timestamp::now();
        // Routine writes (creates, refreshes) wait their turn in the pacer at most until the
        // next tick: when reconcilers or Events have filled the routine lane (a thousand
        // Workloads admitted at once), they give up the turn and are first in line next
        // time, so this tick's phase changes still go out.
        let deadline = tokio::time::Instant::now() + ROUTINE_WAIT;
        let mut routine_open = true;

        // Agents first: a new agent gets its object at once (within the budget).
        let agents = ctx.core.agents().await;
        for a in &agents {
            if !self.created.contains(&a.id) && budget > 0 && routine_open {
                match tokio::time::timeout_at(deadline, agent::create(&ctx, a)).await {
                    Err(_) => routine_open = false,
                    Ok(Ok(())) => {
                        budget -= 1;
                        writes += 1;
                        self.created.insert(a.id.clone());
                    }
                    Ok(Err(e)) => {
                        budget -= 1;
                        writes += 1;
                        tracing::warn!(agent = %a.id, error = %e, "cannot create Agent")
                    }
                }
            }
        }
        // Nothing outlives its object: forget agents the core no longer holds.
        self.created.retain(|id| agents.iter().any(|a| &a.id == id));
        self.agents
            .retain(|id, _| agents.iter().any(|a| &a.id == id));
        // Every status that is due, built once: (rank, last written, the write).
        let mut due_writes: Vec<(Rank, Option<Instant>, Due)> = Vec::new();
        for (i, a) in agents.iter().enumerate() {
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
                let rank = Rank::of(urgent, Rank::AgentPhase);
                due_writes.push((rank, prev.map(|w| w.at), Due::Agent(i, status)));
            }
        }
        let summaries = ctx.core.workloads().await;
        self.workloads
            .retain(|key, _| summaries.iter().any(|s| &s.key == key));
        let generations = ctx
            .generations
            .lock()
            .map(|g| g.clone())
            .unwrap_or_default();
        for (i, s) in summaries.iter().enumerate() {
            let prev = self.workloads.get(&s.key);
            let generation = generations.get(&s.key).copied();
            let status = workload::running_status(s, prev.map(|w| &w.status), generation, wall);
            let changed = prev.is_none_or(|w| !same_workload(&w.status, &status));
            // A phase change (Running, Succeeded, Failed) is what a person waits for: it goes
            // before every routine refresh, as an Agent's does; so does a final phase this
            // writer never wrote a status before (a Workload that ended between the
            // reconciler's admission write and this writer's first). The per-Workload throttle
            // (one write per `workload_status_period`) still holds.
            let urgent = prev.map_or(status.phase.is_terminal(), |w| {
                w.status.phase != status.phase
            });
            if due(
                prev.map(|w| (w.at, changed)),
                now,
                config.workload_status_period,
                urgent,
            ) {
                let rank = Rank::of(urgent, Rank::WorkloadPhase);
                due_writes.push((rank, prev.map(|w| w.at), Due::Workload(i, status)));
            }
        }
        // Workloads' phase changes first, then Agents' (a thousand agents attaching at once
        // are a thousand first statuses), then the longest unwritten (never-written before
        // all): what is over this tick's budget is first in line on the next one.
        due_writes.sort_by_key(|(rank, at, _)| (*rank, *at));
        for (rank, _, write) in due_writes {
            let urgent = rank != Rank::Refresh;
            if budget == 0 || !(urgent || routine_open) {
                break;
            }
            match write {
                Due::Agent(i, status) => {
                    let id = &agents[i].id;
                    let sent = in_turn(
                        urgent,
                        deadline,
                        agent::patch_status(&ctx, id, &status, urgent),
                    )
                    .await;
                    let Some(sent) = sent else {
                        routine_open = false;
                        continue;
                    };
                    match sent {
                        Ok(()) => {
                            self.agents.insert(id.clone(), Written { at: now, status });
                        }
                        Err(e) => {
                            tracing::warn!(agent = %id, error = %e, "agent status not written")
                        }
                    }
                }
                Due::Workload(i, status) => {
                    let s = &summaries[i];
                    // A write by the reconciler (at admission) counts for the throttle too.
                    let sent = in_turn(
                        urgent,
                        deadline,
                        workload::patch_status_throttled(
                            &ctx,
                            &s.namespace,
                            &s.name,
                            &status,
                            now,
                            urgent,
                        ),
                    )
                    .await;
                    let Some(sent) = sent else {
                        routine_open = false;
                        continue;
                    };
                    match sent {
                        Ok(false) => continue,
                        Ok(true) => {
                            if s.phase.is_terminal() {
                                // Its final status is written: the core and this writer
                                // forget it (the store keeps its history).
                                ctx.core.release(&s.key);
                                if let Ok(mut g) = ctx.generations.lock() {
                                    g.remove(&s.key);
                                }
                            }
                            self.workloads
                                .insert(s.key.clone(), Written { at: now, status });
                        }
                        Err(e) => {
                            tracing::warn!(workload = %s.key, error = %e, "workload status not written")
                        }
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
            let status = mesh::mesh_status(
                name,
                prev.map(|w| &w.status),
                seen,
                &agents,
                ctx.core.store_available(),
            );
            ctx.metrics
                .agents_ready
                .get_or_create(&MeshLabels { mesh: name.clone() })
                .set(i64::from(status.agents_ready));
            let changed = prev.is_none_or(|w| !same_mesh(&w.status, &status));
            if budget > 0
                && routine_open
                && due(
                    prev.map(|w| (w.at, changed)),
                    now,
                    Duration::from_secs(5),
                    false,
                )
            {
                match tokio::time::timeout_at(deadline, mesh::patch_status(&ctx, name, &status))
                    .await
                {
                    Err(_) => {
                        routine_open = false;
                        continue;
                    }
                    Ok(Ok(())) => {
                        self.meshes
                            .insert(name.clone(), Written { at: now, status });
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(mesh = %name, error = %e, "mesh status not written")
                    }
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
