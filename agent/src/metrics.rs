//! The agent's Prometheus metrics: inference latency and batch sizes, records and shards
//! done, recent throughput, and whether the stream to the operator is attached.
//!
//! Names are part of the interface (the Grafana dashboard in `charts/infermesh/dashboards/`
//! reads them): `infermesh_agent_inference_seconds`, `infermesh_agent_batch_size`,
//! `infermesh_agent_records_total`, `infermesh_agent_shards_total{result}`,
//! `infermesh_agent_records_per_second` and `infermesh_agent_connected`.
//!
//! The hot path is one call per batch ([`AgentMetrics::observe_batch`]): atomic adds plus the
//! histograms' short critical sections, never anything per record.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// The window `infermesh_agent_records_per_second` averages over, in seconds.
pub const RATE_WINDOW_SECS: u64 = 10;

/// How a shard ended, as the `result` label of `infermesh_agent_shards_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShardResult {
    /// The shard's output part was written and reported.
    Completed,
    /// The shard failed (cancelled shards are not counted).
    Failed,
}

/// The agent's metrics and the registry that exposes them. Cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct AgentMetrics {
    registry: Registry,
    inference_seconds: Histogram,
    batch_size: Histogram,
    records: Counter,
    shards_completed: Counter,
    shards_failed: Counter,
    records_per_second: Gauge<f64, AtomicU64>,
    connected: Gauge,
    recent: RecentRecords,
}

impl Default for AgentMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl AgentMetrics {
    /// Fresh metrics, all at zero, registered under the `infermesh_agent` prefix.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("infermesh_agent");
        // 1 ms .. ~33 s: a batch of a small model on a GPU up to a large batch on a slow CPU.
        let inference_seconds = Histogram::new(exponential_buckets(0.001, 2.0, 16));
        registry.register(
            "inference_seconds",
            "Time ONNX Runtime took to run one batch",
            inference_seconds.clone(),
        );
        // 1 .. 1024 records.
        let batch_size = Histogram::new(exponential_buckets(1.0, 2.0, 11));
        registry.register(
            "batch_size",
            "Records in each batch run",
            batch_size.clone(),
        );
        let records = Counter::default();
        registry.register("records", "Records run through a model", records.clone());
        let shards = Family::<[(&'static str, &'static str); 1], Counter>::default();
        // Both series exist from the start (at 0), so rate() and alerts see them at once; the
        // handles are kept so counting a shard takes no lock on the family.
        let shards_completed = shards.get_or_create(&[("result", "completed")]).clone();
        let shards_failed = shards.get_or_create(&[("result", "failed")]).clone();
        registry.register("shards", "Shards finished, by result", shards);
        let records_per_second = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "records_per_second",
            format!("Records run per second over the last {RATE_WINDOW_SECS} s"),
            records_per_second.clone(),
        );
        let connected = Gauge::default();
        registry.register(
            "connected",
            "1 while the agent's stream to the operator is attached, else 0",
            connected.clone(),
        );
        Self {
            registry,
            inference_seconds,
            batch_size,
            records,
            shards_completed,
            shards_failed,
            records_per_second,
            connected,
            recent: RecentRecords::new(),
        }
    }

    /// Records one batch: `records` records that ONNX Runtime ran in `run`.
    pub fn observe_batch(&self, records: usize, run: Duration) {
        self.inference_seconds.observe(run.as_secs_f64());
        self.batch_size.observe(records as f64);
        self.records.inc_by(records as u64);
        self.recent.add(records as u64);
    }

    /// Counts a finished shard.
    pub fn shard_finished(&self, result: ShardResult) {
        match result {
            ShardResult::Completed => self.shards_completed.inc(),
            ShardResult::Failed => self.shards_failed.inc(),
        };
    }

    /// Marks the stream to the operator attached or not.
    pub fn set_connected(&self, connected: bool) {
        self.connected.set(i64::from(connected));
    }

    /// Whether the stream to the operator is attached (what `/readyz` answers).
    pub fn is_connected(&self) -> bool {
        self.connected.get() == 1
    }

    /// Records run per second over the last [`RATE_WINDOW_SECS`] seconds.
    pub fn records_per_second(&self) -> f64 {
        self.recent.per_second()
    }

    /// The metrics in the OpenMetrics text format.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        // The rate is computed when scraped rather than kept current on the hot path.
        self.records_per_second.set(self.recent.per_second());
        let mut out = String::with_capacity(4096);
        encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

/// Records per one-second bucket over the last [`RATE_WINDOW_SECS`] seconds, lock-free: each
/// bucket is one `u64` holding the second it counts (high 32 bits) and its count (low 32).
#[derive(Debug)]
struct RecentRecords {
    start: Instant,
    buckets: [AtomicU64; RATE_WINDOW_SECS as usize],
}

impl RecentRecords {
    fn new() -> Self {
        Self {
            start: Instant::now(),
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }

    /// The current second since start, plus one so that 0 marks an unused bucket.
    fn second(&self) -> u64 {
        (self.start.elapsed().as_secs() + 1) & 0xffff_ffff
    }

    fn add(&self, n: u64) {
        let sec = self.second();
        let n = n.min(u64::from(u32::MAX));
        let bucket = &self.buckets[(sec % RATE_WINDOW_SECS) as usize];
        let mut cur = bucket.load(Ordering::Relaxed);
        loop {
            // A bucket last used in an earlier second starts over.
            let next = if cur >> 32 == sec {
                let count = (cur & 0xffff_ffff)
                    .saturating_add(n)
                    .min(u64::from(u32::MAX));
                (sec << 32) | count
            } else {
                (sec << 32) | n
            };
            match bucket.compare_exchange_weak(cur, next, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return,
                Err(seen) => cur = seen,
            }
        }
    }

    fn per_second(&self) -> f64 {
        let now = self.second();
        let total: u64 = self
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .filter(|v| {
                let sec = v >> 32;
                sec != 0 && sec <= now && now - sec < RATE_WINDOW_SECS
            })
            .map(|v| v & 0xffff_ffff)
            .sum();
        total as f64 / RATE_WINDOW_SECS as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_counts_records_and_lands_in_both_histograms() {
        let m = AgentMetrics::new();
        m.observe_batch(32, Duration::from_millis(20));
        m.observe_batch(8, Duration::from_millis(5));
        m.shard_finished(ShardResult::Completed);
        let text = m.encode().expect("encode");
        assert!(
            text.contains("infermesh_agent_records_total 40\n"),
            "{text}"
        );
        assert!(
            text.contains("infermesh_agent_batch_size_count 2\n"),
            "{text}"
        );
        assert!(
            text.contains("infermesh_agent_batch_size_sum 40.0\n"),
            "{text}"
        );
        assert!(
            text.contains("infermesh_agent_inference_seconds_count 2\n"),
            "{text}"
        );
        assert!(
            text.contains("infermesh_agent_shards_total{result=\"completed\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("infermesh_agent_shards_total{result=\"failed\"} 0\n"),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[test]
    fn records_per_second_averages_the_recent_window() {
        let m = AgentMetrics::new();
        assert_eq!(m.records_per_second(), 0.0);
        m.observe_batch(30, Duration::from_millis(1));
        m.observe_batch(20, Duration::from_millis(1));
        assert_eq!(m.records_per_second(), 50.0 / RATE_WINDOW_SECS as f64);
        let text = m.encode().expect("encode");
        assert!(
            text.contains("infermesh_agent_records_per_second 5.0\n"),
            "{text}"
        );
    }

    #[test]
    fn buckets_older_than_the_window_do_not_count() {
        let r = RecentRecords {
            start: Instant::now()
                .checked_sub(Duration::from_secs(100))
                .expect("the clock has run 100 s"),
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
        };
        let now = r.second();
        let stale = now - RATE_WINDOW_SECS;
        let recent = now - 3;
        r.buckets[(stale % RATE_WINDOW_SECS) as usize]
            .store((stale << 32) | 1000, Ordering::Relaxed);
        assert_eq!(r.per_second(), 0.0, "a bucket one window old is ignored");
        r.buckets[(recent % RATE_WINDOW_SECS) as usize]
            .store((recent << 32) | 20, Ordering::Relaxed);
        assert_eq!(r.per_second(), 2.0);
        // The current second's bucket may be the stale one: adding to it starts it over.
        r.add(7);
        assert_eq!(r.per_second(), 2.7);
    }

    #[test]
    fn connected_follows_the_stream() {
        let m = AgentMetrics::new();
        assert!(!m.is_connected());
        m.set_connected(true);
        assert!(m.is_connected());
        assert!(
            m.encode()
                .expect("encode")
                .contains("infermesh_agent_connected 1\n")
        );
        m.set_connected(false);
        assert!(!m.is_connected());
    }
}
