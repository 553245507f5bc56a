//! `infermesh-swarm`: many simulated agents that speak the real agent protocol over real gRPC
//! to one operator, to measure what the operator — not ONNX Runtime — costs as a mesh grows.
//!
//! Each simulated agent attaches with its own credentials (one HTTP/2 connection each, like a
//! node's agent), says Hello with its slots, heartbeats at the interval the operator's Welcome
//! gives, and answers every Assign after a compute time drawn from a [`Compute`]: it writes a
//! part where the attempt is told to and reports it honestly (`Completed` with the part's
//! records, bytes and sha256, which the operator checks before it commits and charges), or,
//! at the configured rates, reports a retryable failure or drops its stream and attaches
//! again. With `echo` it reads its input range and writes the records back, so that the
//! outputs can be checked record by record; otherwise it writes a one-record part (no-op
//! shards). It runs no model.
//!
//! It measures shards per second, the assignment latency (a completion sent to the next
//! Assign received on that agent) and, given the operator's pid, the operator's CPU seconds
//! and resident memory from `/proc`.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use infermesh_agent::endpoint::{TlsOptions, operator_endpoint};
use infermesh_proto as pb;
use pb::agent_message::Msg as Up;
use pb::agent_service_client::AgentServiceClient;
use pb::operator_message::Msg as Down;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::MetadataValue;

/// One agent's credentials, as `infermesh local --external-agents` writes them.
#[derive(Clone, Debug, serde::Deserialize)]
pub struct Credential {
    /// The Mesh it belongs to.
    pub mesh: String,
    /// Its agent id.
    pub id: String,
    /// Its node.
    pub node: String,
    /// Its bearer token.
    pub token: String,
}

/// A credentials file of `infermesh local --external-agents N --credentials FILE`.
#[derive(Clone, Debug, serde::Deserialize)]
pub struct Credentials {
    /// The operator's gRPC URL.
    pub operator: String,
    /// The agents.
    pub agents: Vec<Credential>,
}

impl Credentials {
    /// Reads a credentials file, waiting up to `wait` for it to appear (the operator writes it
    /// once it listens).
    pub fn read(path: &Path, wait: Duration) -> anyhow::Result<Self> {
        let deadline = Instant::now() + wait;
        loop {
            match std::fs::read(path) {
                Ok(bytes) => {
                    return serde_json::from_slice(&bytes).with_context(|| {
                        format!(
                            "{}: not a credentials file of infermesh local",
                            path.display()
                        )
                    });
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => return Err(e).with_context(|| path.display().to_string()),
            }
        }
    }
}

/// How long a simulated shard computes.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Compute {
    /// Not at all: the shard completes as soon as its part is written.
    Zero,
    /// Always this long.
    Fixed(Duration),
    /// Exponentially distributed with this mean.
    Exponential(Duration),
    /// Uniformly distributed between the two.
    Uniform(Duration, Duration),
}

/// Parses `250us`, `5ms`, `1.5s` (a bare number is milliseconds).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let (num, scale) = if let Some(n) = t.strip_suffix("us") {
        (n, 1e-6)
    } else if let Some(n) = t.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = t.strip_suffix('s') {
        (n, 1.0)
    } else {
        (t, 1e-3)
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("{text:?} is not a duration (like 250us, 5ms or 1.5s)"))?;
    if !v.is_finite() || v < 0.0 || v * scale > 3600.0 {
        return Err(format!("{text:?} is not a duration between 0 and an hour"));
    }
    Ok(Duration::from_secs_f64(v * scale))
}

impl FromStr for Compute {
    type Err = String;

    /// `zero`, `5ms` (fixed), `exp:5ms` (exponential with that mean), `uniform:1ms..10ms`.
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s == "zero" || s == "0" {
            return Ok(Self::Zero);
        }
        if let Some(mean) = s.strip_prefix("exp:") {
            return Ok(Self::Exponential(parse_duration(mean)?));
        }
        if let Some(range) = s.strip_prefix("uniform:") {
            let (lo, hi) = range
                .split_once("..")
                .ok_or_else(|| format!("{s:?}: a uniform range is uniform:LO..HI"))?;
            let (lo, hi) = (parse_duration(lo)?, parse_duration(hi)?);
            if lo > hi {
                return Err(format!("{s:?}: the low end is above the high end"));
            }
            return Ok(Self::Uniform(lo, hi));
        }
        Ok(Self::Fixed(parse_duration(s)?))
    }
}

impl Compute {
    /// One shard's compute time.
    pub fn draw(&self, rng: &mut StdRng) -> Duration {
        match *self {
            Self::Zero => Duration::ZERO,
            Self::Fixed(d) => d,
            Self::Exponential(mean) => {
                let u: f64 = rng.random_range(0.0..1.0);
                mean.mul_f64(-(1.0 - u).ln())
            }
            Self::Uniform(lo, hi) => {
                if lo == hi {
                    lo
                } else {
                    Duration::from_secs_f64(rng.random_range(lo.as_secs_f64()..=hi.as_secs_f64()))
                }
            }
        }
    }
}

/// What a swarm does.
#[derive(Clone, Debug)]
pub struct Config {
    /// The operator's gRPC URL.
    pub operator: String,
    /// The agents to simulate.
    pub agents: Vec<Credential>,
    /// Slots each agent offers.
    pub slots: u32,
    /// Compute time per shard.
    pub compute: Compute,
    /// Fraction of shards reported as failed (retryable).
    pub fail_rate: f64,
    /// Fraction of shards during which the agent drops its stream (and attaches again).
    pub disconnect_rate: f64,
    /// Read each shard's records and write them back (otherwise a one-record part).
    pub echo: bool,
    /// End when nothing was assigned or completed for this long after the first Assign.
    pub idle_exit: Duration,
    /// End after this long in any case.
    pub deadline: Option<Duration>,
    /// Seed of the draws (compute times, failures, disconnects).
    pub seed: u64,
    /// The operator's pid, to read its CPU time and memory from `/proc`.
    pub operator_pid: Option<u32>,
    /// Append `seconds rss_mb cpu_seconds` of the operator every `sample_every` to this file.
    pub rss_log: Option<PathBuf>,
    /// How often the operator is sampled.
    pub sample_every: Duration,
    /// How the operator's certificate is verified when its URL is `https://` (cluster mode).
    pub tls: TlsOptions,
}

/// Quantiles of the assignment latency, in milliseconds.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Latency {
    /// Samples.
    pub samples: usize,
    /// Median.
    pub p50_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// Largest.
    pub max_ms: f64,
}

impl Latency {
    /// The quantiles of `ms` (sorted here).
    pub fn of(mut ms: Vec<f64>) -> Self {
        if ms.is_empty() {
            return Self::default();
        }
        ms.sort_by(f64::total_cmp);
        let q = |p: f64| ms[((ms.len() - 1) as f64 * p).round() as usize];
        Self {
            samples: ms.len(),
            p50_ms: q(0.5),
            p99_ms: q(0.99),
            max_ms: ms[ms.len() - 1],
        }
    }
}

/// The operator as `/proc` saw it during the run.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Operator {
    /// CPU seconds (user + system) from the first Assign to the end.
    pub cpu_seconds: f64,
    /// CPU milliseconds per 1,000 completed shards.
    pub cpu_ms_per_1000_shards: f64,
    /// CPU milliseconds per 1,000 shards completed while the whole mesh worked: from the first
    /// sample at which every agent had attached and shards were completing, to the first at
    /// which the last completion was counted. Attaching and leaving cost per agent, not per
    /// shard, and the whole-run figure above counts them over however many shards the run
    /// had; this one leaves them out (0 when no two samples fell in that window).
    pub steady_cpu_ms_per_1000_shards: f64,
    /// Seconds of that window.
    pub steady_seconds: f64,
    /// Shards completed in that window.
    pub steady_shards: u64,
    /// Its peak resident memory (VmHWM), MB.
    pub peak_rss_mb: f64,
    /// The largest resident memory sampled during the run, MB.
    pub max_sampled_rss_mb: f64,
}

/// Where the machine's CPU went during the run (from the first Assign to the end), when the
/// operator's pid was given: with the operator, the swarm and the database sharing the
/// machine, the sum is what bounds the rate.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Machine {
    /// Cores.
    pub cores: usize,
    /// The swarm's own CPU milliseconds per 1,000 completed shards.
    pub swarm_cpu_ms_per_1000_shards: f64,
    /// The whole machine's busy CPU milliseconds per 1,000 completed shards (operator, swarm,
    /// database and anything else running).
    pub machine_cpu_ms_per_1000_shards: f64,
    /// The share of all cores that was busy.
    pub busy: f64,
}

/// What a swarm measured.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Report {
    /// Simulated agents.
    pub agents: usize,
    /// Slots each.
    pub slots: u32,
    /// Agents that were welcomed at least once.
    pub attached: usize,
    /// Shards assigned (attempts).
    pub assigned: u64,
    /// Completed reports sent.
    pub completed: u64,
    /// Failed reports sent.
    pub failed: u64,
    /// Reports the operator refused, by reason.
    pub refused: BTreeMap<String, u64>,
    /// Streams dropped on purpose.
    pub disconnects: u64,
    /// Attach attempts that failed, and the last error.
    pub attach_errors: u64,
    /// The last attach error, if any.
    pub last_error: Option<String>,
    /// From the first Assign to the last report.
    pub seconds: f64,
    /// Completed shards per second over `seconds`.
    pub shards_per_second: f64,
    /// Completion sent → next Assign received, per agent.
    pub latency: Latency,
    /// The operator, when its pid was given.
    pub operator: Option<Operator>,
    /// The swarm and the whole machine over the same window, when the operator's pid was given.
    pub machine: Option<Machine>,
    /// Why the swarm ended: `drained` (the operator drained every agent), `idle` or `deadline`.
    pub ended: String,
}

#[derive(Default)]
struct Shared {
    assigned: AtomicU64,
    completed: AtomicU64,
    failed: AtomicU64,
    disconnects: AtomicU64,
    attach_errors: AtomicU64,
    attached: AtomicUsize,
    /// Nanoseconds after `start` of the first Assign (0: none yet) and of the last activity.
    first_assign: AtomicU64,
    last_activity: AtomicU64,
    refused: Mutex<BTreeMap<String, u64>>,
    last_error: Mutex<Option<String>>,
}

impl Shared {
    fn mark(&self, start: Instant, first: bool) {
        let now = start.elapsed().as_nanos() as u64 + 1;
        if first {
            let _ = self
                .first_assign
                .compare_exchange(0, now, Ordering::SeqCst, Ordering::SeqCst);
        }
        self.last_activity.fetch_max(now, Ordering::SeqCst);
    }
}

/// How a stream ended.
enum Ended {
    /// The operator drained the agent and nothing is left running.
    Drained,
    /// The swarm is ending.
    Stopped,
    /// The agent dropped its stream on purpose.
    Dropped,
}

/// What a finished shard asks its agent to do.
enum Done {
    Report(Box<pb::AgentMessage>, (String, u32)),
    Drop,
}

/// The facts of a part as the operator checks them: bytes, records (newlines), sha256.
pub fn part_facts(body: &[u8]) -> (u64, u64, String) {
    (
        body.len() as u64,
        body.iter().filter(|&&b| b == b'\n').count() as u64,
        hex::encode(Sha256::digest(body)),
    )
}

/// Runs the swarm until the operator drains every agent, or it is idle, or the deadline.
pub async fn run(cfg: Config) -> anyhow::Result<Report> {
    let cfg = Arc::new(cfg);
    let start = Instant::now();
    let shared = Arc::new(Shared::default());
    let (stop_tx, stop_rx) = watch::channel(false);
    let sampler = cfg.operator_pid.map(|pid| {
        let (cfg, stop) = (cfg.clone(), stop_rx.clone());
        tokio::spawn(sample(pid, start, cfg, shared.clone(), stop))
    });
    let mut agents = tokio::task::JoinSet::new();
    for (i, cred) in cfg.agents.iter().enumerate() {
        let (cfg, cred, shared, stop) =
            (cfg.clone(), cred.clone(), shared.clone(), stop_rx.clone());
        let seed = cfg
            .seed
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .wrapping_add(i as u64);
        agents.spawn(agent(cfg, cred, shared, stop, start, seed));
    }
    let deadline = cfg.deadline.map(|d| start + d);
    let mut latencies = Vec::new();
    let ended = loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        // Agents that ended (drained) are collected as they go.
        while let Some(r) = agents.try_join_next() {
            latencies.extend(r.unwrap_or_default());
        }
        if agents.is_empty() {
            break "drained";
        }
        let first = shared.first_assign.load(Ordering::SeqCst);
        let last = shared.last_activity.load(Ordering::SeqCst);
        let now = start.elapsed().as_nanos() as u64;
        if first > 0 && now.saturating_sub(last) > cfg.idle_exit.as_nanos() as u64 {
            break "idle";
        }
        if deadline.is_some_and(|d| Instant::now() > d) {
            break "deadline";
        }
    };
    let _ = stop_tx.send(true);
    while let Some(r) = agents.join_next().await {
        latencies.extend(r.unwrap_or_default());
    }
    let first = shared.first_assign.load(Ordering::SeqCst);
    let last = shared.last_activity.load(Ordering::SeqCst);
    let seconds = if first > 0 {
        (last.saturating_sub(first)) as f64 / 1e9
    } else {
        0.0
    };
    let completed = shared.completed.load(Ordering::SeqCst);
    let samples = match sampler {
        Some(s) => s.await.unwrap_or_default(),
        None => Vec::new(),
    };
    let operator = cfg.operator_pid.map(|pid| {
        let from = Duration::from_nanos(first);
        let cpu = spent(&samples, from, |s| s.cpu_seconds);
        let (steady_cpu, steady_seconds, steady_shards) =
            steady(&samples, cfg.agents.len(), completed).unwrap_or_default();
        Operator {
            cpu_seconds: cpu,
            cpu_ms_per_1000_shards: if completed > 0 {
                cpu * 1e6 / completed as f64
            } else {
                0.0
            },
            steady_cpu_ms_per_1000_shards: if steady_shards > 0 {
                steady_cpu * 1e6 / steady_shards as f64
            } else {
                0.0
            },
            steady_seconds,
            steady_shards,
            peak_rss_mb: proc_status(pid, "VmHWM:")
                .or_else(|| samples.iter().map(|s| s.rss_mb).reduce(f64::max))
                .unwrap_or(0.0),
            max_sampled_rss_mb: samples.iter().map(|s| s.rss_mb).fold(0.0, f64::max),
        }
    });
    let machine = cfg.operator_pid.map(|_| {
        let from = Duration::from_nanos(first);
        let per_1000 = |seconds: f64| {
            if completed > 0 {
                seconds * 1e6 / completed as f64
            } else {
                0.0
            }
        };
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let busy = spent(&samples, from, |s| s.machine_busy_seconds);
        let window = spent(&samples, from, |s| s.at.as_secs_f64());
        Machine {
            cores,
            swarm_cpu_ms_per_1000_shards: per_1000(spent(&samples, from, |s| s.own_cpu_seconds)),
            machine_cpu_ms_per_1000_shards: per_1000(busy),
            busy: if window > 0.0 {
                (busy / (window * cores as f64)).min(1.0)
            } else {
                0.0
            },
        }
    });
    Ok(Report {
        agents: cfg.agents.len(),
        slots: cfg.slots,
        attached: shared.attached.load(Ordering::SeqCst),
        assigned: shared.assigned.load(Ordering::SeqCst),
        completed,
        failed: shared.failed.load(Ordering::SeqCst),
        refused: shared.refused.lock().map(|r| r.clone()).unwrap_or_default(),
        disconnects: shared.disconnects.load(Ordering::SeqCst),
        attach_errors: shared.attach_errors.load(Ordering::SeqCst),
        last_error: shared.last_error.lock().ok().and_then(|e| e.clone()),
        seconds,
        shards_per_second: if seconds > 0.0 {
            completed as f64 / seconds
        } else {
            0.0
        },
        latency: Latency::of(latencies),
        operator,
        machine,
        ended: ended.to_string(),
    })
}

/// The operator's CPU seconds, the seconds and the shards completed from the first sample at
/// which all `agents` had attached and shards were completing to the first that counted all
/// `completed` shards; none when that window does not hold two samples.
fn steady(samples: &[Sample], agents: usize, completed: u64) -> Option<(f64, f64, u64)> {
    let begin = samples
        .iter()
        .position(|s| s.attached >= agents && s.completed > 0)?;
    let end = samples.iter().position(|s| s.completed >= completed)?;
    let (b, e) = (samples[begin], samples.get(end).filter(|_| end > begin)?);
    let shards = e.completed - b.completed;
    (shards > 0).then(|| {
        (
            (e.cpu_seconds - b.cpu_seconds).max(0.0),
            (e.at - b.at).as_secs_f64(),
            shards,
        )
    })
}

/// What a counter of the samples grew by from the first sample at or after `from` to the last.
fn spent(samples: &[Sample], from: Duration, of: impl Fn(&Sample) -> f64) -> f64 {
    let begin = samples
        .iter()
        .find(|s| s.at >= from)
        .or(samples.last())
        .map_or(0.0, &of);
    let end = samples.last().map_or(0.0, &of);
    (end - begin).max(0.0)
}

/// One simulated agent: attaches, works, attaches again after a dropped or broken stream, until
/// it is drained or the swarm ends. Returns its latency samples (ms).
async fn agent(
    cfg: Arc<Config>,
    cred: Credential,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
    start: Instant,
    seed: u64,
) -> Vec<f64> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut latencies = Vec::new();
    let mut welcomed = false;
    let mut backoff = Duration::from_millis(100);
    loop {
        if *stop.borrow() {
            break;
        }
        let ended = session(
            &cfg,
            &cred,
            &shared,
            &mut stop,
            start,
            &mut rng,
            &mut latencies,
            &mut welcomed,
        )
        .await;
        match ended {
            Ok(Ended::Drained | Ended::Stopped) => break,
            Ok(Ended::Dropped) => {
                shared.disconnects.fetch_add(1, Ordering::SeqCst);
                backoff = Duration::from_millis(100);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => {
                shared.attach_errors.fetch_add(1, Ordering::SeqCst);
                if let Ok(mut last) = shared.last_error.lock() {
                    *last = Some(format!("{}: {e:#}", cred.id));
                }
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stop.changed() => break,
                }
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
    latencies
}

#[allow(clippy::too_many_arguments)]
async fn session(
    cfg: &Arc<Config>,
    cred: &Credential,
    shared: &Arc<Shared>,
    stop: &mut watch::Receiver<bool>,
    start: Instant,
    rng: &mut StdRng,
    latencies: &mut Vec<f64>,
    welcomed: &mut bool,
) -> anyhow::Result<Ended> {
    // The agent's endpoint (plaintext on loopback, TLS verified against the operator's CA in
    // cluster mode), with PINGs spaced out: a thousand simulated agents share one machine.
    let channel = operator_endpoint(&cfg.operator, &cfg.tls)?
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(20))
        .connect()
        .await
        .context("connect")?;
    let bearer: MetadataValue<_> = format!("Bearer {}", cred.token)
        .parse()
        .context("the token is not a header value")?;
    let mut client =
        AgentServiceClient::with_interceptor(channel, move |mut req: tonic::Request<()>| {
            req.metadata_mut().insert("authorization", bearer.clone());
            Ok(req)
        });
    let (tx, rx) = mpsc::channel::<pb::AgentMessage>(1024);
    let hello = pb::Hello {
        agent_id: cred.id.clone(),
        node: cred.node.clone(),
        mesh: cred.mesh.clone(),
        version: format!("swarm-{}", env!("CARGO_PKG_VERSION")),
        capabilities: Some(pb::Capabilities {
            execution_providers: vec!["cpu".into()],
            slots: cfg.slots,
            cpus: 1,
            ..Default::default()
        }),
    };
    tx.send(pb::AgentMessage {
        msg: Some(Up::Hello(hello)),
    })
    .await?;
    let mut inbound = client
        .attach(ReceiverStream::new(rx))
        .await
        .context("attach")?
        .into_inner();
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<Done>();
    let mut running: HashMap<(String, u32), (u32, tokio::task::JoinHandle<()>)> = HashMap::new();
    let mut sent: VecDeque<Instant> = VecDeque::new();
    let mut beat = tokio::time::interval(Duration::from_secs(1));
    let mut draining = false;
    let ended = loop {
        tokio::select! {
            _ = stop.changed() => break Ended::Stopped,
            msg = inbound.message() => {
                let Some(msg) = msg.context("the stream broke")? else {
                    if draining {
                        break Ended::Drained;
                    }
                    anyhow::bail!("the operator closed the stream");
                };
                match msg.msg {
                    Some(Down::Welcome(w)) => {
                        if !*welcomed {
                            *welcomed = true;
                            shared.attached.fetch_add(1, Ordering::SeqCst);
                        }
                        let every = Duration::from_secs(u64::from(w.heartbeat_seconds.max(1)));
                        beat = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
                    }
                    Some(Down::Assign(a)) => {
                        if let Some(t) = sent.pop_front() {
                            latencies.push(t.elapsed().as_secs_f64() * 1e3);
                        }
                        shared.assigned.fetch_add(1, Ordering::SeqCst);
                        shared.mark(start, true);
                        let shard = a.shard.clone().unwrap_or_default();
                        let key = (shard.workload.clone(), shard.index);
                        let compute = cfg.compute.draw(rng);
                        let fate = if rng.random_bool(cfg.disconnect_rate.clamp(0.0, 1.0)) {
                            Fate::Drop
                        } else if rng.random_bool(cfg.fail_rate.clamp(0.0, 1.0)) {
                            Fate::Fail
                        } else {
                            Fate::Complete
                        };
                        let (done_tx, echo) = (done_tx.clone(), cfg.echo);
                        let task = tokio::spawn(async move {
                            let _ = done_tx.send(work(a, compute, fate, echo).await);
                        });
                        if let Some((_, old)) = running.insert(key, (shard.attempt, task)) {
                            old.abort();
                        }
                    }
                    Some(Down::Cancel(c)) => {
                        let shard = c.shard.unwrap_or_default();
                        let key = (shard.workload, shard.index);
                        if running.get(&key).is_some_and(|(att, _)| *att == shard.attempt)
                            && let Some((_, task)) = running.remove(&key)
                        {
                            task.abort();
                        }
                    }
                    Some(Down::Drain(_)) => {
                        draining = true;
                        if running.is_empty() {
                            break Ended::Drained;
                        }
                    }
                    Some(Down::Refused(r)) => {
                        if let Ok(mut m) = shared.refused.lock() {
                            *m.entry(r.reason).or_default() += 1;
                        }
                    }
                    None => {}
                }
            }
            done = done_rx.recv() => {
                match done {
                    Some(Done::Report(msg, key)) => {
                        running.remove(&key);
                        match &msg.msg {
                            Some(Up::Completed(_)) => shared.completed.fetch_add(1, Ordering::SeqCst),
                            _ => shared.failed.fetch_add(1, Ordering::SeqCst),
                        };
                        tx.send(*msg).await.context("the stream closed")?;
                        sent.push_back(Instant::now());
                        shared.mark(start, false);
                        if draining && running.is_empty() {
                            break Ended::Drained;
                        }
                    }
                    Some(Done::Drop) => break Ended::Dropped,
                    None => {}
                }
            }
            _ = beat.tick() => {
                let refs: Vec<pb::ShardRef> = running
                    .iter()
                    .map(|((w, i), (att, _))| pb::ShardRef { workload: w.clone(), index: *i, attempt: *att })
                    .collect();
                let hb = pb::Heartbeat {
                    free_slots: cfg.slots.saturating_sub(refs.len() as u32),
                    running: refs,
                    ..Default::default()
                };
                tx.send(pb::AgentMessage { msg: Some(Up::Heartbeat(hb)) })
                    .await
                    .context("the stream closed")?;
            }
        }
    };
    for (_, (_, task)) in running.drain() {
        task.abort();
    }
    Ok(ended)
}

#[derive(Clone, Copy)]
enum Fate {
    Complete,
    Fail,
    Drop,
}

/// Runs one simulated shard: computes, then writes its part and reports it (or fails, or asks
/// its agent to drop the stream).
async fn work(a: pb::Assign, compute: Duration, fate: Fate, echo: bool) -> Done {
    if !compute.is_zero() {
        tokio::time::sleep(compute).await;
    }
    let shard = a.shard.clone().unwrap_or_default();
    let key = (shard.workload.clone(), shard.index);
    let failed = |message: String| {
        Done::Report(
            Box::new(pb::AgentMessage {
                msg: Some(Up::Failed(pb::Failed {
                    shard: Some(shard.clone()),
                    kind: pb::ErrorKind::Io as i32,
                    message,
                    retryable: true,
                })),
            }),
            key.clone(),
        )
    };
    match fate {
        Fate::Drop => return Done::Drop,
        Fate::Fail => return failed("infermesh-swarm: a simulated failure".into()),
        Fate::Complete => {}
    }
    let body = if echo {
        match echo_body(&a).await {
            Ok(b) => b,
            Err(e) => return failed(format!("infermesh-swarm: reading the input: {e}")),
        }
    } else {
        b"{}\n".to_vec()
    };
    let (bytes, records, sha256) = part_facts(&body);
    let put = match infermesh_io::access::local_path(&a.output_uri) {
        // A local part is written in place, on this task's thread: a no-op shard's part is a
        // few bytes, and a hop to the blocking pool per shard (as the object store's put
        // makes) costs this load generator more than the write, on the machine it shares with
        // the operator it measures.
        Some(path) => write_local(&path, &body).map_err(|e| e.to_string()),
        None => match infermesh_io::Location::parse(&a.output_uri) {
            Ok(part) => part.put(body.into()).await.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        },
    };
    if let Err(e) = put {
        return failed(format!("infermesh-swarm: writing the part: {e}"));
    }
    Done::Report(
        Box::new(pb::AgentMessage {
            msg: Some(Up::Completed(pb::Completed {
                shard: Some(shard.clone()),
                records,
                output_uri: a.output_uri,
                sha256,
                compute_seconds: compute.as_secs_f64(),
                device: "cpu".into(),
                output_bytes: bytes,
            })),
        }),
        key,
    )
}

/// Writes a local part, making its folder when it is not there yet.
fn write_local(path: &Path, body: &[u8]) -> std::io::Result<()> {
    match std::fs::write(path, body) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            std::fs::write(path, body)
        }
        other => other,
    }
}

/// The records of the shard's input range, each on a line of its own.
async fn echo_body(a: &pb::Assign) -> anyhow::Result<Vec<u8>> {
    let input = a.input.as_ref().context("no input range")?;
    let loc = infermesh_io::Location::parse(&input.uri)?;
    let version = (!input.version.is_empty()).then_some(input.version.as_str());
    let (begin, bytes) =
        infermesh_io::read_aligned(&loc, input.start, input.end, input.size, version).await?;
    let mut body = Vec::with_capacity(bytes.len());
    for r in infermesh_io::shard::records(begin, &bytes) {
        body.extend_from_slice(r.text);
        body.push(b'\n');
    }
    Ok(body)
}

#[derive(Clone, Copy, Debug, Default)]
struct Sample {
    at: Duration,
    cpu_seconds: f64,
    rss_mb: f64,
    /// The swarm's own CPU seconds.
    own_cpu_seconds: f64,
    /// CPU seconds the whole machine has been busy, all cores together (`/proc/stat`).
    machine_busy_seconds: f64,
    /// Shards completed and agents attached so far.
    completed: u64,
    attached: usize,
}

/// A field of `/proc/PID/status` in kB, as MB.
fn proc_status(pid: u32, field: &str) -> Option<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = text.lines().find(|l| l.starts_with(field))?;
    let kb: f64 = line[field.len()..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}

/// User + system CPU seconds of `pid` from `/proc/PID/stat`.
fn proc_cpu(pid: u32, ticks: f64) -> Option<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces: fields are counted after its closing parenthesis.
    let rest = &text[text.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name and state.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / ticks)
}

/// Seconds the machine's cores have been busy, all together, from the first line of
/// `/proc/stat` (user, nice, system, irq, softirq and steal; idle and iowait are not busy).
fn machine_busy(ticks: f64) -> Option<f64> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    let line = text.lines().find(|l| l.starts_with("cpu "))?;
    let f: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().unwrap_or(0.0))
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is counted in user).
    let busy = [0, 1, 2, 5, 6, 7]
        .iter()
        .filter_map(|&i| f.get(i))
        .sum::<f64>();
    Some(busy / ticks)
}

/// Clock ticks per second (`getconf CLK_TCK`; 100 where it cannot be asked).
fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

async fn sample(
    pid: u32,
    start: Instant,
    cfg: Arc<Config>,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) -> Vec<Sample> {
    let ticks = clock_ticks();
    let mut log = cfg.rss_log.as_ref().and_then(|p| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
            .ok()
    });
    let mut out = Vec::new();
    let mut every = tokio::time::interval(cfg.sample_every);
    // None once the operator is gone.
    let take = || {
        Some(Sample {
            at: start.elapsed(),
            cpu_seconds: proc_cpu(pid, ticks)?,
            rss_mb: proc_status(pid, "VmRSS:")?,
            own_cpu_seconds: proc_cpu(std::process::id(), ticks).unwrap_or(0.0),
            machine_busy_seconds: machine_busy(ticks).unwrap_or(0.0),
            completed: shared.completed.load(Ordering::SeqCst),
            attached: shared.attached.load(Ordering::SeqCst),
        })
    };
    while let Some(s) = take() {
        if let Some(f) = log.as_mut() {
            use std::io::Write;
            let _ = writeln!(
                f,
                "{:.3} {:.1} {:.2}",
                s.at.as_secs_f64(),
                s.rss_mb,
                s.cpu_seconds
            );
        }
        out.push(s);
        tokio::select! {
            _ = every.tick() => {}
            _ = stop.changed() => {
                out.extend(take());
                break;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The steady window starts once every agent has attached and shards complete, and ends at
    /// the first sample that counted the last completion: the attach before it and the
    /// shutdown after it are left out.
    #[test]
    fn the_steady_window_leaves_out_attaching_and_leaving() {
        let at = |ms: u64, cpu: f64, completed: u64, attached: usize| Sample {
            at: Duration::from_millis(ms),
            cpu_seconds: cpu,
            completed,
            attached,
            ..Sample::default()
        };
        let samples = [
            at(0, 0.0, 0, 0),
            at(200, 0.5, 10, 2),  // attaching: 2 of 3
            at(400, 0.7, 100, 3), // the whole mesh, working
            at(600, 0.9, 300, 3),
            at(800, 1.1, 500, 3),  // the last completion counted
            at(1000, 2.0, 500, 0), // leaving
        ];
        let (cpu, seconds, shards) = steady(&samples, 3, 500).expect("a window");
        assert!((cpu - 0.4).abs() < 1e-9, "{cpu}");
        assert!((seconds - 0.4).abs() < 1e-9, "{seconds}");
        assert_eq!(shards, 400);
        // No sample after the mesh was whole, or none before the end: no window.
        assert_eq!(steady(&samples[..2], 3, 500), None);
        assert_eq!(steady(&samples, 4, 500), None);
        assert_eq!(steady(&[at(0, 0.0, 0, 3), at(200, 1.0, 0, 3)], 3, 0), None);
    }

    #[test]
    fn compute_times_parse_and_draw() {
        assert_eq!("zero".parse::<Compute>(), Ok(Compute::Zero));
        assert_eq!(
            "5ms".parse::<Compute>(),
            Ok(Compute::Fixed(Duration::from_millis(5)))
        );
        assert_eq!(
            "250us".parse::<Compute>(),
            Ok(Compute::Fixed(Duration::from_micros(250)))
        );
        assert_eq!(
            "uniform:1ms..3ms".parse::<Compute>(),
            Ok(Compute::Uniform(
                Duration::from_millis(1),
                Duration::from_millis(3)
            ))
        );
        for bad in [
            "",
            "fast",
            "-1ms",
            "uniform:3ms..1ms",
            "uniform:1ms",
            "exp:x",
            "5h",
        ] {
            assert!(bad.parse::<Compute>().is_err(), "{bad} parsed");
        }
        let mut rng = StdRng::seed_from_u64(1);
        let c: Compute = "uniform:1ms..3ms".parse().expect("parse");
        for _ in 0..100 {
            let d = c.draw(&mut rng);
            assert!(d >= Duration::from_millis(1) && d <= Duration::from_millis(3));
        }
        let e: Compute = "exp:2ms".parse().expect("parse");
        let mean = (0..20_000)
            .map(|_| e.draw(&mut rng).as_secs_f64())
            .sum::<f64>()
            / 20_000.0;
        assert!((mean - 0.002).abs() < 0.0002, "mean {mean}");
    }

    #[test]
    fn quantiles_and_part_facts() {
        let l = Latency::of((1..=100).map(f64::from).collect());
        assert_eq!(l.samples, 100);
        assert_eq!(l.max_ms, 100.0);
        assert!((l.p50_ms - 50.0).abs() <= 1.0);
        assert!((l.p99_ms - 99.0).abs() <= 1.0);
        assert_eq!(Latency::of(Vec::new()).samples, 0);
        let (bytes, records, sha) = part_facts(b"{}\n");
        assert_eq!((bytes, records), (3, 1));
        assert_eq!(
            sha,
            "ca3d163bab055381827226140568f3bef7eaac187cebd76878e0b63e9e442356"
        );
    }

    #[test]
    fn the_own_process_is_read_from_proc() {
        let pid = std::process::id();
        let cpu = proc_cpu(pid, clock_ticks()).expect("cpu");
        assert!(cpu >= 0.0);
        let rss = proc_status(pid, "VmRSS:").expect("rss");
        assert!(rss > 1.0, "{rss} MB");
        assert!(proc_status(pid, "NoSuchField:").is_none());
    }

    #[test]
    fn a_credentials_file_is_read_or_refused() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("c.json");
        std::fs::write(
            &path,
            r#"{"operator": "http://127.0.0.1:1", "agents": [{"mesh": "m", "id": "m-external-0", "node": "external-0", "token": "t"}]}"#,
        )
        .expect("write");
        let c = Credentials::read(&path, Duration::ZERO).expect("read");
        assert_eq!(c.agents.len(), 1);
        assert_eq!(c.agents[0].id, "m-external-0");
        std::fs::write(&path, "{}").expect("write");
        let err = Credentials::read(&path, Duration::ZERO).expect_err("not one");
        assert!(format!("{err:#}").contains("not a credentials file"));
        assert!(Credentials::read(&dir.path().join("none"), Duration::from_millis(100)).is_err());
    }
}
