//! Progress, throughput and ETA of a workload, and what a person reads of agents.

use std::time::Duration;

use infermesh_crds::WorkloadPhase;

/// Where a workload stands.
#[derive(Clone, Debug)]
pub struct WorkloadSummary {
    /// `namespace/name/uid`.
    pub key: String,
    /// Unique id of the run.
    pub uid: String,
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// Mesh.
    pub mesh: String,
    /// Phase.
    pub phase: WorkloadPhase,
    /// CamelCase reason of the phase (`Admitted`, `ModelLoadFailed`).
    pub reason: String,
    /// Detail.
    pub message: String,
    /// Shards planned.
    pub shards_total: u32,
    /// Waiting.
    pub shards_pending: u32,
    /// Assigned.
    pub shards_running: u32,
    /// Done.
    pub shards_succeeded: u32,
    /// Failed for good.
    pub shards_failed: u32,
    /// Records written.
    pub records: u64,
    /// Input bytes of succeeded shards.
    pub bytes_done: u64,
    /// Input size.
    pub input_bytes: u64,
    /// Since admission (until finished).
    pub elapsed: Duration,
    /// Micro-credits charged.
    pub credits: i64,
    /// Attempts beyond the first.
    pub attempts_retried: u32,
    /// `spec.suspend`: dispatch paused.
    pub suspended: bool,
    /// Output directory.
    pub output_uri: String,
    /// What a person should know that did not stop the run (a model changed behind its pin).
    pub warnings: Vec<String>,
    /// Admitted but holding no slot, with shards to run: why, and where it is in the queue.
    pub waiting: Option<SlotWait>,
}

/// The reason of an admitted workload that holds no slot yet (its `Running` condition).
pub const WAITING_FOR_SLOTS: &str = "WaitingForSlots";

/// Why an admitted workload holds no slot, and where it stands in its Mesh's queue.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlotWait {
    /// 1-based place among the Mesh's waiting workloads, in the order they get a first slot
    /// (`None` when its namespace is at its `maxSlots`, or beyond the places counted).
    pub position: Option<u32>,
    /// For a person: the place, or the namespace's share in use.
    pub message: String,
}

impl WorkloadSummary {
    /// Share of input bytes done, 0.0 to 1.0 (1.0 for an empty input).
    pub fn fraction(&self) -> f64 {
        if self.input_bytes == 0 {
            1.0
        } else {
            self.bytes_done as f64 / self.input_bytes as f64
        }
    }

    /// `42%`.
    pub fn progress(&self) -> String {
        format!("{:.0}%", (self.fraction() * 100.0).floor())
    }

    /// Records per second since admission.
    pub fn throughput(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs > 0.0 {
            self.records as f64 / secs
        } else {
            0.0
        }
    }

    /// Time left at the byte rate so far; `None` before the first shard is done or after the end.
    pub fn eta(&self) -> Option<Duration> {
        if self.phase.is_terminal() || self.bytes_done == 0 {
            return None;
        }
        let rate = self.bytes_done as f64 / self.elapsed.as_secs_f64().max(1e-3);
        Some(Duration::from_secs_f64(
            (self.input_bytes - self.bytes_done.min(self.input_bytes)) as f64 / rate,
        ))
    }
}

/// Where an agent stands.
#[derive(Clone, Debug)]
pub struct AgentSummary {
    /// Agent id.
    pub id: String,
    /// Mesh.
    pub mesh: String,
    /// Node.
    pub node: String,
    /// Stream up and lease held.
    pub connected: bool,
    /// Drained.
    pub unschedulable: bool,
    /// Slots.
    pub slots: u32,
    /// Shards running.
    pub running: u32,
    /// Shards completed and charged.
    pub completed: u64,
    /// Micro-credits earned.
    pub credits: i64,
    /// Execution providers.
    pub providers: Vec<String>,
    /// GPUs.
    pub gpus: u32,
    /// Product name of its first GPU (empty without one).
    pub gpu_product: String,
    /// Memory of its smallest GPU, in bytes.
    pub gpu_memory: u64,
    /// Models loaded in sessions (content hashes).
    pub models_loaded: Vec<String>,
    /// Models in the node's cache (content hashes).
    pub models_cached: Vec<String>,
    /// Time since its last heartbeat.
    pub since_heartbeat: Duration,
}

/// Where one shard of a live workload stands, for the console's shard grid.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShardCell {
    /// Index in the plan.
    pub index: u32,
    /// `pending`, `running`, `committing`, `elsewhere`, `succeeded` or `failed`.
    pub state: &'static str,
    /// The agent holding it (running or being committed).
    pub agent: Option<String>,
    /// Its current attempt (0 before the first).
    pub attempt: u32,
}

impl<S: crate::store::Store> super::Core<S> {
    /// Every shard of a live workload, in index order; `None` for a workload the core no
    /// longer runs (finished and released, or unknown): its shards are in the event log.
    pub fn shard_cells(&self, key: &str) -> Option<Vec<ShardCell>> {
        use super::machine::ShardStatus;
        self.read(|m| {
            let w = m.live(key)?;
            Some(
                w.shards
                    .iter()
                    .enumerate()
                    .map(|(i, s)| ShardCell {
                        index: i as u32,
                        state: match &s.status {
                            ShardStatus::Pending | ShardStatus::Backoff { .. } => "pending",
                            ShardStatus::Running { .. } => "running",
                            ShardStatus::Committing { .. } => "committing",
                            ShardStatus::Elsewhere => "elsewhere",
                            ShardStatus::Succeeded => "succeeded",
                            ShardStatus::Failed => "failed",
                        },
                        agent: s.status.holder().map(str::to_string),
                        attempt: s.attempt,
                    })
                    .collect(),
            )
        })
    }
}

/// `1h02m`, `3m12s`, `45s`.
pub fn format_duration(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(done: u64, total: u64, secs: u64) -> WorkloadSummary {
        WorkloadSummary {
            key: "ns/w/u".into(),
            uid: "u".into(),
            namespace: "ns".into(),
            name: "w".into(),
            mesh: "m".into(),
            phase: WorkloadPhase::Running,
            reason: String::new(),
            message: String::new(),
            shards_total: 4,
            shards_pending: 0,
            shards_running: 0,
            shards_succeeded: 0,
            shards_failed: 0,
            records: 500,
            bytes_done: done,
            input_bytes: total,
            elapsed: Duration::from_secs(secs),
            credits: 0,
            attempts_retried: 0,
            suspended: false,
            output_uri: String::new(),
            warnings: Vec::new(),
            waiting: None,
        }
    }

    #[test]
    fn progress_throughput_and_eta_follow_the_bytes_done() {
        let s = summary(250, 1000, 10);
        assert_eq!(s.progress(), "25%");
        assert!((s.throughput() - 50.0).abs() < 1e-9);
        assert_eq!(s.eta(), Some(Duration::from_secs(30)));
        assert_eq!(summary(0, 1000, 10).eta(), None);
    }

    #[test]
    fn durations_read_like_kubectl() {
        assert_eq!(format_duration(Duration::from_secs(45)), "45s");
        assert_eq!(format_duration(Duration::from_secs(192)), "3m12s");
        assert_eq!(format_duration(Duration::from_secs(3720)), "1h02m");
    }
}
