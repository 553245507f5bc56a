//! What keeps the console live: one task follows the event log and hands each batch of new
//! rows, rendered once, to every open page (Server-Sent Events); another samples the
//! workloads' record counts for the overview's rate and the throughput charts.
//!
//! The cost is per batch, not per page: the log is read once every [`POLL`] however many
//! consoles are open, each row is rendered once, and a page's stream only filters the batch
//! and writes the rows it wants.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::broadcast;

use super::lock;
use crate::core::Core;
use crate::store::{EventFilter, EventRow, Store};

/// How often the event log is read for new rows.
pub const POLL: Duration = Duration::from_millis(500);
/// The most rows read at once.
const PAGE: i64 = 2_000;
/// Rows kept for a page that opens (the events page's first screen).
pub const RECENT: usize = 300;
/// How often the rates are sampled.
pub const SAMPLE: Duration = Duration::from_secs(2);
/// Samples kept per workload (20 minutes at [`SAMPLE`]).
const SERIES: usize = 600;

/// One event-log row and its HTML, rendered once for every page that shows it.
#[derive(Clone, Debug)]
pub struct Row {
    /// The row.
    pub event: EventRow,
    /// `<tr>…</tr>` (escaped).
    pub html: String,
}

/// New rows of the event log, in order.
#[derive(Debug)]
pub struct Batch {
    /// The rows.
    pub rows: Vec<Row>,
}

/// The event-log follower.
pub struct Feed {
    tx: broadcast::Sender<Arc<Batch>>,
    recent: Mutex<VecDeque<Row>>,
    /// The last sequence number read (0 before any).
    last: std::sync::atomic::AtomicI64,
}

impl Feed {
    /// A feed with nothing read yet.
    pub fn new() -> Arc<Self> {
        let (tx, _) = broadcast::channel(64);
        Arc::new(Self {
            tx,
            recent: Mutex::new(VecDeque::new()),
            last: Default::default(),
        })
    }

    /// New batches from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Batch>> {
        self.tx.subscribe()
    }

    /// The newest rows read, oldest first.
    pub fn recent(&self) -> Vec<Row> {
        lock(&self.recent).iter().cloned().collect()
    }

    /// The last sequence number read.
    pub fn last_seq(&self) -> i64 {
        self.last.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// How many pages follow the feed now.
    pub fn watchers(&self) -> usize {
        self.tx.receiver_count()
    }

    /// Takes rows read from the log: keeps the newest, sends them to every open page.
    pub fn publish(&self, events: Vec<EventRow>) {
        if events.is_empty() {
            return;
        }
        let rows: Vec<Row> = events
            .into_iter()
            .map(|event| Row {
                html: super::pages::event_row(&event).into_string(),
                event,
            })
            .collect();
        if let Some(last) = rows.last() {
            self.last
                .store(last.event.seq, std::sync::atomic::Ordering::Relaxed);
        }
        {
            let mut recent = lock(&self.recent);
            for r in rows.iter().rev().take(RECENT).rev() {
                recent.push_back(r.clone());
            }
            while recent.len() > RECENT {
                recent.pop_front();
            }
        }
        // No page open: nothing to send (not an error).
        let _ = self.tx.send(Arc::new(Batch { rows }));
    }

    /// Follows the log of `store` until the process ends: first the last hour (for the
    /// events page's first screen), then every [`POLL`] what is new.
    pub async fn follow<S: Store>(self: Arc<Self>, core: Arc<Core<S>>) {
        let store = core.store();
        let since = chrono::Utc::now() - chrono::Duration::hours(1);
        let mut filter = EventFilter {
            since: Some(since.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)),
            limit: Some(PAGE),
            ..Default::default()
        };
        let mut tick = tokio::time::interval(POLL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            loop {
                match store.events(&filter).await {
                    Ok(rows) => {
                        let full = rows.len() as i64 >= PAGE;
                        if let Some(last) = rows.last() {
                            filter.after_seq = Some(last.seq);
                            filter.since = None;
                        }
                        self.publish(rows);
                        if !full {
                            break;
                        }
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "console: cannot read the event log");
                        break;
                    }
                }
            }
        }
    }
}

/// Record counts over time: the overview's records/s and each workload's chart.
#[derive(Default)]
pub struct Rates {
    inner: Mutex<RatesInner>,
}

#[derive(Default)]
struct RatesInner {
    /// Per workload key: (unix seconds, records) samples, oldest first.
    series: HashMap<String, VecDeque<(f64, u64)>>,
    /// (when, records/s over the last interval), the newest sample.
    now: Option<(Instant, f64)>,
}

impl Rates {
    /// Takes one sample of every workload's records.
    pub fn sample(&self, at: f64, records: impl IntoIterator<Item = (String, u64, bool)>) {
        let mut inner = lock(&self.inner);
        let mut rate = 0.0;
        let mut seen = std::collections::HashSet::new();
        for (key, n, finished) in records {
            let series = inner.series.entry(key.clone()).or_default();
            if let Some(&(t0, n0)) = series.back() {
                if at > t0 && n >= n0 {
                    rate += (n - n0) as f64 / (at - t0);
                }
                // A finished workload's series ends with its first sample after the end.
                if finished && series.len() > 1 && series.back().map(|s| s.1) == Some(n) {
                    seen.insert(key);
                    continue;
                }
            }
            series.push_back((at, n));
            while series.len() > SERIES {
                series.pop_front();
            }
            seen.insert(key);
        }
        // Workloads the core released leave the charts with it.
        inner.series.retain(|k, _| seen.contains(k));
        inner.now = Some((Instant::now(), rate));
    }

    /// Records per second across every workload over the last sample interval.
    pub fn records_per_second(&self) -> f64 {
        lock(&self.inner)
            .now
            .filter(|(at, _)| at.elapsed() < SAMPLE * 3)
            .map_or(0.0, |(_, r)| r)
    }

    /// A workload's records per second over its last sample interval (0 when it has no
    /// recent sample).
    pub fn current(&self, key: &str) -> f64 {
        let inner = lock(&self.inner);
        let Some(s) = inner.series.get(key) else {
            return 0.0;
        };
        let (Some(&(t1, n1)), Some(&(t0, n0))) = (s.back(), s.iter().rev().nth(1)) else {
            return 0.0;
        };
        if unix_now() - t1 > SAMPLE.as_secs_f64() * 3.0 {
            return 0.0;
        }
        n1.saturating_sub(n0) as f64 / (t1 - t0).max(1e-3)
    }

    /// A workload's chart: (unix seconds, records/s) between consecutive samples.
    pub fn series(&self, key: &str) -> Vec<(f64, f64)> {
        let inner = lock(&self.inner);
        let Some(s) = inner.series.get(key) else {
            return Vec::new();
        };
        s.iter()
            .zip(s.iter().skip(1))
            .map(|(&(t0, n0), &(t1, n1))| {
                let dt = (t1 - t0).max(1e-3);
                (t1, n1.saturating_sub(n0) as f64 / dt)
            })
            .collect()
    }

    /// Samples the workloads of `core` every [`SAMPLE`] until the process ends.
    pub async fn follow<S: Store>(self: Arc<Self>, core: Arc<Core<S>>) {
        let mut tick = tokio::time::interval(SAMPLE);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let at = unix_now();
            let workloads = core.workloads().await;
            self.sample(
                at,
                workloads
                    .into_iter()
                    .map(|w| (w.key, w.records, w.phase.is_terminal())),
            );
        }
    }
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(seq: i64, kind: &str) -> EventRow {
        EventRow {
            seq,
            at: "2026-12-03T10:00:00Z".into(),
            kind: kind.into(),
            workload_uid: Some("u1".into()),
            shard: Some(seq),
            attempt: Some(1),
            agent: Some("a<b>".into()),
            message: "line 3: bad <script>".into(),
        }
    }

    #[tokio::test]
    async fn a_batch_is_rendered_once_and_reaches_every_page() {
        let feed = Feed::new();
        let mut a = feed.subscribe();
        let mut b = feed.subscribe();
        assert_eq!(feed.watchers(), 2);
        feed.publish(vec![ev(1, "shard.failed"), ev(2, "shard.completed")]);
        let (ba, bb) = (a.recv().await.expect("a"), b.recv().await.expect("b"));
        assert!(Arc::ptr_eq(&ba, &bb), "one batch shared, not one per page");
        assert_eq!(ba.rows.len(), 2);
        assert_eq!(feed.last_seq(), 2);
        // The agent's own words are escaped.
        assert!(
            ba.rows[0].html.contains("&lt;script&gt;"),
            "{}",
            ba.rows[0].html
        );
        assert!(!ba.rows[0].html.contains("<script>"));
    }

    #[test]
    fn the_recent_rows_are_bounded_and_newest_last() {
        let feed = Feed::new();
        feed.publish((1..=RECENT as i64 + 50).map(|i| ev(i, "k")).collect());
        feed.publish(vec![ev(RECENT as i64 + 51, "k")]);
        let recent = feed.recent();
        assert_eq!(recent.len(), RECENT);
        assert_eq!(recent.last().map(|r| r.event.seq), Some(RECENT as i64 + 51));
        assert_eq!(recent.first().map(|r| r.event.seq), Some(52));
    }

    #[test]
    fn rates_follow_the_records_and_drop_released_workloads() {
        let r = Rates::default();
        r.sample(100.0, [("w1".into(), 0, false), ("w2".into(), 0, false)]);
        r.sample(
            102.0,
            [("w1".into(), 200, false), ("w2".into(), 100, false)],
        );
        assert!((r.records_per_second() - 150.0).abs() < 1e-9);
        assert_eq!(r.series("w1"), vec![(102.0, 100.0)]);
        // w2 released: its series goes.
        r.sample(104.0, [("w1".into(), 300, true)]);
        assert!(r.series("w2").is_empty());
        assert_eq!(r.series("w1").len(), 2);
        // Finished and unchanged: no more points.
        r.sample(106.0, [("w1".into(), 300, true)]);
        assert_eq!(r.series("w1").len(), 2);
    }
}
