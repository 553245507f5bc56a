//! The operator's Prometheus metrics (prometheus-client), served on `/metrics`.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::core::ShardCounters;

/// Labels of a reconcile metric.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ControllerLabels {
    /// `mesh`, `workload` or `agent`.
    pub controller: String,
}

/// Labels of a failed reconcile.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureLabels {
    /// `mesh`, `workload` or `agent`.
    pub controller: String,
    /// The error variant (also the Kubernetes Event reason).
    pub reason: String,
}

/// Labels of a mutating API call.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WriteLabels {
    /// Resource (`workloads/status`).
    pub resource: String,
    /// Verb (`patch`, `create`, `delete`).
    pub verb: String,
}

/// Labels per Mesh.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MeshLabels {
    /// Mesh name.
    pub mesh: String,
}

/// Every metric of the operator.
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    /// Reconciles started, by controller.
    pub reconciles: Family<ControllerLabels, Counter>,
    /// Reconciles failed, by controller and reason.
    pub failures: Family<FailureLabels, Counter>,
    /// Reconcile durations, by controller.
    pub duration: Family<ControllerLabels, Histogram>,
    /// Shards waiting for a slot.
    pub queue_depth: Gauge,
    /// Ready agents, by Mesh.
    pub agents_ready: Family<MeshLabels, Gauge>,
    /// Open agent streams.
    pub grpc_streams: Gauge,
    /// 1 while this replica holds the leader Lease.
    pub leader: Gauge,
    /// Mutating Kubernetes API calls, by resource and verb.
    pub api_writes: Family<WriteLabels, Counter>,
}

impl Metrics {
    /// Metrics registered in a fresh registry, with the core's shard counters.
    pub fn new(shards: &ShardCounters) -> Self {
        let mut registry = Registry::default();
        let reconciles = Family::<ControllerLabels, Counter>::default();
        let failures = Family::<FailureLabels, Counter>::default();
        let duration = Family::<ControllerLabels, Histogram>::new_with_constructor(
            (|| Histogram::new(exponential_buckets(0.001, 2.0, 14))) as fn() -> Histogram,
        );
        let queue_depth = Gauge::default();
        let agents_ready = Family::<MeshLabels, Gauge>::default();
        let grpc_streams = Gauge::default();
        let leader = Gauge::default();
        let api_writes = Family::<WriteLabels, Counter>::default();
        let r = &mut registry;
        r.register(
            "infermesh_reconciles",
            "Reconciles started",
            reconciles.clone(),
        );
        r.register(
            "infermesh_reconcile_failures",
            "Reconciles that failed, by error",
            failures.clone(),
        );
        r.register(
            "infermesh_reconcile_duration_seconds",
            "Reconcile durations",
            duration.clone(),
        );
        r.register(
            "infermesh_shards_dispatched",
            "Shard attempts sent to agents",
            shards.dispatched.clone(),
        );
        r.register(
            "infermesh_shards_completed",
            "Shards completed (first completion, charged)",
            shards.completed.clone(),
        );
        r.register(
            "infermesh_shards_failed",
            "Shards failed for good",
            shards.failed.clone(),
        );
        r.register(
            "infermesh_shards_requeued",
            "Shards put back in the queue",
            shards.requeued.clone(),
        );
        r.register(
            "infermesh_reports_refused",
            "Agent reports refused (not the holder of the current attempt, stale, duplicate, invalid, output mismatch), by reason",
            shards.refused.clone(),
        );
        r.register(
            "infermesh_store_available",
            "1 while the store answers, 0 during an outage (dispatch paused, reports held)",
            shards.store_available.clone(),
        );
        r.register(
            "infermesh_queue_depth",
            "Shards waiting for a slot",
            queue_depth.clone(),
        );
        r.register(
            "infermesh_agents_ready",
            "Ready agents by Mesh",
            agents_ready.clone(),
        );
        r.register(
            "infermesh_grpc_streams",
            "Open agent streams",
            grpc_streams.clone(),
        );
        r.register(
            "infermesh_leader",
            "1 while this replica is the leader",
            leader.clone(),
        );
        r.register(
            "infermesh_api_writes",
            "Mutating Kubernetes API calls",
            api_writes.clone(),
        );
        Self {
            registry: Arc::new(registry),
            reconciles,
            failures,
            duration,
            queue_depth,
            agents_ready,
            grpc_streams,
            leader,
            api_writes,
        }
    }

    /// Counts one mutating API call.
    pub fn write(&self, resource: &str, verb: &str) {
        self.api_writes
            .get_or_create(&WriteLabels {
                resource: resource.into(),
                verb: verb.into(),
            })
            .inc();
    }

    /// The OpenMetrics text of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
