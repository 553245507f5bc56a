//! Scheduling: which pending shard goes to which agent. A pure function of the agents' free
//! slots and what they hold, and of the pending shards in priority order, so it is tested
//! without any server.

use std::collections::BTreeSet;

/// What the scheduler needs to know of an agent.
#[derive(Clone, Debug, Default)]
pub struct AgentView {
    /// Agent id.
    pub id: String,
    /// The Mesh it serves.
    pub mesh: String,
    /// Slots not taken by outstanding assignments (the operator never exceeds this).
    pub free_slots: u32,
    /// Draining or not Ready: gets nothing.
    pub schedulable: bool,
    /// Models with a live session (sha256).
    pub loaded: BTreeSet<String>,
    /// Models in the node's cache (sha256).
    pub cached: BTreeSet<String>,
    /// Execution providers that registered.
    pub providers: Vec<String>,
    /// Smallest memory of its GPUs, in bytes (0: no GPU).
    pub gpu_memory: u64,
}

/// What an agent must offer to run a workload's shards.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Needs {
    /// A GPU execution provider.
    pub gpu: bool,
    /// At least this much memory per GPU.
    pub min_gpu_memory: u64,
    /// This execution provider.
    pub provider: Option<String>,
}

impl Needs {
    /// Whether `agent` satisfies these needs; the unmet need otherwise.
    pub fn unmet(&self, agent: &AgentView) -> Option<String> {
        let has_gpu = agent.providers.iter().any(|p| p != "cpu");
        if self.gpu && !has_gpu {
            return Some("a GPU execution provider".into());
        }
        if self.min_gpu_memory > 0 && agent.gpu_memory < self.min_gpu_memory {
            return Some(format!("{} bytes of GPU memory", self.min_gpu_memory));
        }
        if let Some(p) = &self.provider
            && !agent.providers.contains(p)
        {
            return Some(format!("the `{p}` execution provider"));
        }
        None
    }
}

/// A shard waiting for a slot.
#[derive(Clone, Debug)]
pub struct PendingShard {
    /// Index of its workload in the caller's list.
    pub workload: usize,
    /// Shard index.
    pub shard: u32,
    /// The Mesh of its workload.
    pub mesh: String,
    /// Workload priority (higher first).
    pub priority: i32,
    /// Model key (sha256, or the URI when no hash is given) for locality.
    pub model: String,
    /// What the agent must offer.
    pub needs: Needs,
}

/// One decision: run `shard` of `workload` on agent `agent` (an index into the agents).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Placement {
    /// Workload index.
    pub workload: usize,
    /// Shard index.
    pub shard: u32,
    /// Agent index.
    pub agent: usize,
}

/// Places pending shards on agents with free slots. Shards go in priority order (then in the
/// order given); each goes to the eligible agent that has its model loaded, else cached, else
/// the one with the most free slots. Never places more than an agent's free slots, nothing on
/// an unschedulable agent, nothing across Meshes.
pub fn schedule(agents: &[AgentView], pending: &[PendingShard]) -> Vec<Placement> {
    let mut free: Vec<u32> = agents
        .iter()
        .map(|a| if a.schedulable { a.free_slots } else { 0 })
        .collect();
    let mut total: u64 = free.iter().map(|&f| u64::from(f)).sum();
    let mut order: Vec<usize> = (0..pending.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(pending[i].priority));
    let mut out = Vec::new();
    for i in order {
        if total == 0 {
            break;
        }
        let p = &pending[i];
        let best = agents
            .iter()
            .enumerate()
            .filter(|(a, agent)| {
                free[*a] > 0 && agent.mesh == p.mesh && p.needs.unmet(agent).is_none()
            })
            .max_by_key(|(a, agent)| {
                let locality = if agent.loaded.contains(&p.model) {
                    2
                } else if agent.cached.contains(&p.model) {
                    1
                } else {
                    0
                };
                // Ties: most free slots, then the lowest index (stable).
                (locality, free[*a], std::cmp::Reverse(*a))
            })
            .map(|(a, _)| a);
        if let Some(a) = best {
            free[a] -= 1;
            total -= 1;
            out.push(Placement {
                workload: p.workload,
                shard: p.shard,
                agent: a,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent(id: &str, free: u32) -> AgentView {
        AgentView {
            id: id.into(),
            mesh: "m".into(),
            free_slots: free,
            schedulable: true,
            providers: vec!["cpu".into()],
            ..Default::default()
        }
    }

    fn shards(n: u32, model: &str) -> Vec<PendingShard> {
        (0..n)
            .map(|i| PendingShard {
                workload: 0,
                shard: i,
                mesh: "m".into(),
                priority: 0,
                model: model.into(),
                needs: Needs::default(),
            })
            .collect()
    }

    #[test]
    fn slots_are_respected() {
        let agents = [agent("a", 2), agent("b", 1)];
        let placed = schedule(&agents, &shards(10, "x"));
        assert_eq!(placed.len(), 3);
        assert_eq!(placed.iter().filter(|p| p.agent == 0).count(), 2);
        assert_eq!(placed.iter().filter(|p| p.agent == 1).count(), 1);
    }

    #[test]
    fn model_locality_is_preferred() {
        let mut warm = agent("warm", 1);
        warm.loaded.insert("x".into());
        let mut cached = agent("cached", 1);
        cached.cached.insert("x".into());
        let cold = agent("cold", 3);
        let agents = [cold, cached, warm];
        let placed = schedule(&agents, &shards(2, "x"));
        assert_eq!(
            placed[0].agent, 2,
            "the agent with the model loaded comes first"
        );
        assert_eq!(placed[1].agent, 1, "then the one with it cached");
    }

    #[test]
    fn a_drained_agent_gets_nothing() {
        let mut drained = agent("d", 4);
        drained.schedulable = false;
        assert!(schedule(&[drained], &shards(3, "x")).is_empty());
    }

    #[test]
    fn requirements_and_meshes_are_respected() {
        let mut gpu = agent("gpu", 1);
        gpu.providers = vec!["cuda".into(), "cpu".into()];
        gpu.gpu_memory = 16 << 30;
        let mut other_mesh = agent("other", 4);
        other_mesh.mesh = "n".into();
        let agents = [agent("cpu", 4), other_mesh, gpu];
        let mut pending = shards(3, "x");
        for p in &mut pending {
            p.needs = Needs {
                gpu: true,
                min_gpu_memory: 8 << 30,
                provider: None,
            };
        }
        let placed = schedule(&agents, &pending);
        assert_eq!(
            placed,
            vec![Placement {
                workload: 0,
                shard: 0,
                agent: 2
            }]
        );
        let need_more = Needs {
            gpu: true,
            min_gpu_memory: 32 << 30,
            provider: None,
        };
        assert!(
            need_more
                .unmet(&agents[2])
                .expect("unmet")
                .contains("GPU memory")
        );
    }

    #[test]
    fn higher_priority_goes_first() {
        let mut pending = shards(3, "x");
        pending[2].priority = 5;
        let placed = schedule(&[agent("a", 1)], &pending);
        assert_eq!(placed[0].shard, 2);
    }
}
