//! Scheduling: which pending shard goes to which agent. A pure function of the agents' free
//! slots and what they hold, of each namespace's share of its Mesh (weight, cap, slots held)
//! and of the shards each workload offers, so it is tested without any server.

use std::cmp::{Ordering, Reverse};
use std::collections::{BTreeSet, BinaryHeap, HashMap};

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

/// A namespace's standing on a Mesh in one round: its share of the Mesh's slots.
#[derive(Clone, Debug)]
pub struct Queue {
    /// The Mesh.
    pub mesh: String,
    /// The namespace.
    pub namespace: String,
    /// Its weight (at least 1).
    pub weight: u32,
    /// `maxSlots`: the most slots its shards may hold at once, if capped.
    pub max_slots: Option<u32>,
    /// Slots its shards hold on agents now: its share in use is this over its weight.
    pub held: u32,
    /// Its shards reported done and being committed: their agents' slots are free, so they
    /// are not in its share (a namespace whose shards just finished is not made to wait for
    /// the store), but they count against `max_slots` until the store answers.
    pub committing: u32,
}

impl Queue {
    /// Whether it may take one more slot: running and committing shards under `max_slots`.
    pub fn under_cap(&self) -> bool {
        self.max_slots
            .is_none_or(|cap| self.held.saturating_add(self.committing) < cap)
    }
}

/// Which of two queues gets the next slot: the lower share in use (slots held divided by
/// weight, compared without division), then the higher weight. `Less` means `a` first.
fn turn(a: &Queue, b: &Queue) -> Ordering {
    let share = |q: &Queue, other: &Queue| u64::from(q.held) * u64::from(other.weight.max(1));
    share(a, b).cmp(&share(b, a)).then(b.weight.cmp(&a.weight))
}

/// A workload's claimable shards, offered to one round.
#[derive(Clone, Debug)]
pub struct Offer {
    /// Index of the workload in the caller's list.
    pub workload: usize,
    /// Index of its namespace's [`Queue`].
    pub queue: usize,
    /// Effective priority (its own, raised by aging): higher first within its namespace.
    pub priority: i64,
    /// Slots the workload holds now: among equals, the one holding fewest goes first.
    pub held: u32,
    /// Submission order: among equals still, the earliest.
    pub seq: u64,
    /// Its first claimable shards, in order (no more than the round's free slots).
    pub shards: Vec<u32>,
    /// Model key (sha256, or the URI when no hash is given) for locality.
    pub model: String,
    /// What the agent must offer.
    pub needs: Needs,
}

impl Offer {
    /// The order within a namespace: higher priority, then fewer slots held, then earlier.
    fn rank(&self, placed: u32) -> (i64, Reverse<u32>, Reverse<u64>) {
        (
            self.priority,
            Reverse(self.held.saturating_add(placed)),
            Reverse(self.seq),
        )
    }
}

/// An offer in its namespace's heap: its rank ([`Offer::rank`]) and its index.
type Ranked = (i64, Reverse<u32>, Reverse<u64>, Reverse<usize>);

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

/// Places offered shards on agents with free slots, one slot at a time. Each slot goes to
/// the namespace with the lowest share in use (slots held divided by weight; ties to the
/// higher weight, then the earliest workload) among those with something to place and under
/// their `maxSlots`, so a namespace alone with work takes every free slot and several share
/// them by weight. Within a namespace it goes to the workload of highest effective
/// priority, then the one holding fewest slots (a small workload behind a huge one starts at
/// the next free slot), then the earliest. The shard goes to the eligible agent of its Mesh that has its model loaded,
/// else cached, else the one with the most free slots. Never places more than an agent's free
/// slots, nothing on an unschedulable agent, nothing across Meshes, and nothing past a cap.
///
/// The cost is that of the placements made (each looks at the queues and the agents with
/// free slots) plus the offers, never that of the shards left waiting.
pub fn schedule(agents: &[AgentView], queues: &[Queue], offers: &[Offer]) -> Vec<Placement> {
    let mut free: Vec<u32> = agents
        .iter()
        .map(|a| if a.schedulable { a.free_slots } else { 0 })
        .collect();
    let mut mesh_free: HashMap<&str, u64> = HashMap::new();
    for (a, f) in agents.iter().zip(&free) {
        *mesh_free.entry(a.mesh.as_str()).or_default() += u64::from(*f);
    }
    let mut queues: Vec<Queue> = queues.to_vec();
    // Each queue's offers, best first (a heap: an offer's rank falls as it is placed).
    let mut heaps: Vec<BinaryHeap<Ranked>> = vec![BinaryHeap::new(); queues.len()];
    for (i, o) in offers.iter().enumerate() {
        if !o.shards.is_empty() && o.queue < queues.len() {
            let (p, h, s) = o.rank(0);
            heaps[o.queue].push((p, h, s, Reverse(i)));
        }
    }
    let mut placed = vec![0u32; offers.len()];
    let mut out = Vec::new();
    loop {
        let next = (0..queues.len())
            .filter(|&q| {
                !heaps[q].is_empty()
                    && queues[q].under_cap()
                    && mesh_free
                        .get(queues[q].mesh.as_str())
                        .is_some_and(|f| *f > 0)
            })
            .min_by(|&a, &b| {
                let first = |q: usize| heaps[q].peek().map(|top| top.2.0);
                turn(&queues[a], &queues[b])
                    .then_with(|| first(a).cmp(&first(b)))
                    .then(a.cmp(&b))
            });
        let Some(q) = next else { break };
        let Some((_, _, _, Reverse(i))) = heaps[q].pop() else {
            break;
        };
        let o = &offers[i];
        let mesh = queues[q].mesh.as_str();
        let best = agents
            .iter()
            .enumerate()
            .filter(|(a, agent)| {
                free[*a] > 0 && agent.mesh == mesh && o.needs.unmet(agent).is_none()
            })
            .max_by_key(|(a, agent)| {
                let locality = if agent.loaded.contains(&o.model) {
                    2
                } else if agent.cached.contains(&o.model) {
                    1
                } else {
                    0
                };
                // Ties: most free slots, then the lowest index (stable).
                (locality, free[*a], Reverse(*a))
            })
            .map(|(a, _)| a);
        // No agent can take this workload's shards now (they are alike): it is left out of
        // this round, and the others of its namespace have their turn.
        let Some(a) = best else { continue };
        free[a] -= 1;
        if let Some(f) = mesh_free.get_mut(mesh) {
            *f -= 1;
        }
        queues[q].held = queues[q].held.saturating_add(1);
        out.push(Placement {
            workload: o.workload,
            shard: o.shards[placed[i] as usize],
            agent: a,
        });
        placed[i] += 1;
        if (placed[i] as usize) < o.shards.len() {
            let (p, h, s) = o.rank(placed[i]);
            heaps[q].push((p, h, s, Reverse(i)));
        }
    }
    out
}

/// A workload that holds no slot and waits for one, for [`queue_positions`].
#[derive(Clone, Debug)]
pub struct Waiter {
    /// Index of its namespace's [`Queue`].
    pub queue: usize,
    /// Effective priority.
    pub priority: i64,
    /// Submission order.
    pub seq: u64,
}

/// The positions (1-based) of waiting workloads in their Mesh's queue: the order in which
/// they would get their first slot, namespaces taking turns as in [`schedule`] (each start
/// counted as a slot held), and within a namespace by effective priority, then submission.
/// Only the first `limit` of each Mesh are numbered, so the cost is that of sorting the
/// waiting workloads' first `limit` per namespace; a workload whose namespace is at its
/// `maxSlots` gets no position (it waits for its own namespace's shards), nor do those past
/// the limit.
pub fn queue_positions(queues: &[Queue], waiting: &[Waiter], limit: usize) -> Vec<Option<u32>> {
    let mut out = vec![None; waiting.len()];
    if limit == 0 {
        return out;
    }
    let mut lists: Vec<Vec<usize>> = vec![Vec::new(); queues.len()];
    for (i, w) in waiting.iter().enumerate() {
        if let Some(l) = lists.get_mut(w.queue) {
            l.push(i);
        }
    }
    let key = |&i: &usize| (Reverse(waiting[i].priority), waiting[i].seq, i);
    for l in &mut lists {
        if l.len() > limit {
            l.select_nth_unstable_by_key(limit - 1, key);
            l.truncate(limit);
        }
        l.sort_unstable_by_key(key);
    }
    let mut queues: Vec<Queue> = queues.to_vec();
    let mut next = vec![0usize; queues.len()];
    let mut numbered: HashMap<String, u32> = HashMap::new();
    loop {
        let pick = (0..queues.len())
            .filter(|&q| {
                next[q] < lists[q].len()
                    && queues[q].under_cap()
                    && numbered
                        .get(&queues[q].mesh)
                        .is_none_or(|n| (*n as usize) < limit)
            })
            .min_by(|&a, &b| {
                turn(&queues[a], &queues[b])
                    .then_with(|| {
                        waiting[lists[a][next[a]]]
                            .seq
                            .cmp(&waiting[lists[b][next[b]]].seq)
                    })
                    .then(a.cmp(&b))
            });
        let Some(q) = pick else { break };
        let n = numbered.entry(queues[q].mesh.clone()).or_default();
        *n += 1;
        out[lists[q][next[q]]] = Some(*n);
        next[q] += 1;
        queues[q].held = queues[q].held.saturating_add(1);
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

    fn queue(namespace: &str, weight: u32, max_slots: Option<u32>, held: u32) -> Queue {
        Queue {
            mesh: "m".into(),
            namespace: namespace.into(),
            weight,
            max_slots,
            held,
            committing: 0,
        }
    }

    fn offer(workload: usize, queue: usize, n: u32, model: &str) -> Offer {
        Offer {
            workload,
            queue,
            priority: 0,
            held: 0,
            seq: workload as u64,
            shards: (0..n).collect(),
            model: model.into(),
            needs: Needs::default(),
        }
    }

    /// One namespace, one workload of `n` shards.
    fn alone(n: u32, model: &str) -> (Vec<Queue>, Vec<Offer>) {
        (vec![queue("a", 1, None, 0)], vec![offer(0, 0, n, model)])
    }

    fn per_workload(placed: &[Placement], workloads: usize) -> Vec<usize> {
        (0..workloads)
            .map(|w| placed.iter().filter(|p| p.workload == w).count())
            .collect()
    }

    #[test]
    fn slots_are_respected() {
        let agents = [agent("a", 2), agent("b", 1)];
        let (q, o) = alone(10, "x");
        let placed = schedule(&agents, &q, &o);
        assert_eq!(placed.len(), 3);
        assert_eq!(placed.iter().filter(|p| p.agent == 0).count(), 2);
        assert_eq!(placed.iter().filter(|p| p.agent == 1).count(), 1);
        let shards: Vec<u32> = placed.iter().map(|p| p.shard).collect();
        assert_eq!(shards, vec![0, 1, 2], "a workload's shards go in order");
    }

    #[test]
    fn model_locality_is_preferred() {
        let mut warm = agent("warm", 1);
        warm.loaded.insert("x".into());
        let mut cached = agent("cached", 1);
        cached.cached.insert("x".into());
        let cold = agent("cold", 3);
        let agents = [cold, cached, warm];
        let (q, o) = alone(2, "x");
        let placed = schedule(&agents, &q, &o);
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
        let (q, o) = alone(3, "x");
        assert!(schedule(&[drained], &q, &o).is_empty());
    }

    #[test]
    fn requirements_and_meshes_are_respected() {
        let mut gpu = agent("gpu", 1);
        gpu.providers = vec!["cuda".into(), "cpu".into()];
        gpu.gpu_memory = 16 << 30;
        let mut other_mesh = agent("other", 4);
        other_mesh.mesh = "n".into();
        let agents = [agent("cpu", 4), other_mesh, gpu];
        let (q, mut o) = alone(3, "x");
        o[0].needs = Needs {
            gpu: true,
            min_gpu_memory: 8 << 30,
            provider: None,
        };
        let placed = schedule(&agents, &q, &o);
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
    fn higher_priority_goes_first_within_a_namespace() {
        let q = vec![queue("a", 1, None, 0)];
        let mut o = vec![offer(0, 0, 3, "x"), offer(1, 0, 3, "x")];
        o[1].priority = 5;
        let placed = schedule(&[agent("a", 2)], &q, &o);
        assert_eq!(per_workload(&placed, 2), vec![0, 2]);
    }

    #[test]
    fn slots_are_divided_among_namespaces_by_weight() {
        let agents = [agent("a", 4), agent("b", 4)];
        let q = vec![queue("a", 3, None, 0), queue("b", 1, None, 0)];
        let o = vec![offer(0, 0, 8, "x"), offer(1, 1, 8, "x")];
        let placed = schedule(&agents, &q, &o);
        assert_eq!(per_workload(&placed, 2), vec![6, 2], "3:1 of 8 slots");
        let even = vec![queue("a", 1, None, 0), queue("b", 1, None, 0)];
        assert_eq!(
            per_workload(&schedule(&agents, &even, &o), 2),
            vec![4, 4],
            "1:1"
        );
    }

    #[test]
    fn a_namespace_alone_with_work_borrows_every_slot() {
        let agents = [agent("a", 8)];
        // `b` holds nothing and offers nothing: `a` may use what `b` would be owed.
        let q = vec![queue("a", 1, None, 0), queue("b", 3, None, 0)];
        let placed = schedule(&agents, &q, &[offer(0, 0, 20, "x")]);
        assert_eq!(placed.len(), 8);
    }

    #[test]
    fn the_namespace_furthest_below_its_share_gets_the_next_slot() {
        let o = vec![offer(0, 0, 4, "x"), offer(1, 1, 4, "x")];
        // a (weight 3) holds 6, share 2 in use; b (weight 1) holds 1, share 1: b is below.
        let q = vec![queue("a", 3, None, 6), queue("b", 1, None, 1)];
        assert_eq!(
            per_workload(&schedule(&[agent("x", 1)], &q, &o), 2),
            vec![0, 1]
        );
        // a holds 2 (share 2/3), b holds 1 (share 1): a is below.
        let q = vec![queue("a", 3, None, 2), queue("b", 1, None, 1)];
        assert_eq!(
            per_workload(&schedule(&[agent("x", 1)], &q, &o), 2),
            vec![1, 0]
        );
        // Equal shares in use: the higher weight first.
        let q = vec![queue("b", 1, None, 1), queue("a", 3, None, 3)];
        let o = vec![offer(0, 0, 4, "x"), offer(1, 1, 4, "x")];
        assert_eq!(
            per_workload(&schedule(&[agent("x", 1)], &q, &o), 2),
            vec![0, 1]
        );
    }

    #[test]
    fn max_slots_is_a_hard_cap_even_with_slots_unused() {
        let agents = [agent("a", 8)];
        let q = vec![queue("a", 10, Some(3), 1), queue("b", 1, None, 0)];
        let o = vec![offer(0, 0, 20, "x"), offer(1, 1, 2, "x")];
        let placed = schedule(&agents, &q, &o);
        assert_eq!(
            per_workload(&placed, 2),
            vec![2, 2],
            "a reaches its cap of 3 (it held 1); b takes its 2; the rest stay free"
        );
        let q = vec![queue("a", 1, Some(0), 0)];
        assert!(schedule(&agents, &q, &o[..1]).is_empty(), "a cap of 0");
        // Shards being committed count against the cap (not against the share).
        let mut q = vec![queue("a", 1, Some(3), 1), queue("b", 1, None, 0)];
        q[0].committing = 2;
        assert!(
            schedule(&agents, &q, &o[..1]).is_empty(),
            "1 running + 2 committing"
        );
        q[0].committing = 1;
        assert_eq!(per_workload(&schedule(&agents, &q, &o[..1]), 1), vec![1]);
    }

    #[test]
    fn a_small_workload_behind_a_huge_one_gets_the_next_free_slot() {
        let q = vec![queue("a", 1, None, 7)];
        let mut huge = offer(0, 0, 1, "x");
        huge.held = 7;
        let small = offer(1, 0, 1, "x");
        let placed = schedule(&[agent("x", 1)], &q, &[huge, small]);
        assert_eq!(per_workload(&placed, 2), vec![0, 1]);
    }

    #[test]
    fn a_workload_no_agent_can_run_leaves_the_slots_to_others() {
        let q = vec![queue("a", 1, None, 0)];
        let mut gpu = offer(0, 0, 4, "x");
        gpu.needs.gpu = true;
        gpu.priority = 9;
        let placed = schedule(&[agent("cpu", 2)], &q, &[gpu, offer(1, 0, 4, "x")]);
        assert_eq!(per_workload(&placed, 2), vec![0, 2]);
    }

    #[test]
    fn queue_positions_take_turns_by_weight_and_skip_capped_namespaces() {
        let w = |queue, priority, seq| Waiter {
            queue,
            priority,
            seq,
        };
        let q = vec![queue("a", 1, None, 0), queue("b", 1, None, 0)];
        let waiting = [w(0, 0, 1), w(0, 5, 2), w(1, 0, 0)];
        // a and b tie: b's workload came first; then a's by priority.
        assert_eq!(
            queue_positions(&q, &waiting, 10),
            vec![Some(3), Some(2), Some(1)]
        );
        assert_eq!(
            queue_positions(&q, &waiting, 2),
            vec![None, Some(2), Some(1)],
            "only the first `limit` are numbered"
        );
        // b holds 2 slots with weight 1; a holds 1 with weight 3: a's go first.
        let q = vec![queue("a", 3, None, 1), queue("b", 1, None, 2)];
        assert_eq!(
            queue_positions(&q, &waiting, 10),
            vec![Some(2), Some(1), Some(3)]
        );
        let q = vec![queue("a", 1, Some(2), 2), queue("b", 1, None, 5)];
        assert_eq!(
            queue_positions(&q, &waiting, 10),
            vec![None, None, Some(1)],
            "a is at its maxSlots"
        );
    }
}
