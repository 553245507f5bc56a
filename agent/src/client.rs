//! The agent's side of the protocol: one `Attach` stream to the operator, reconnecting when
//! it drops; heartbeats; assignments run within the agent's slots; results reported back.
//! Each (re)connect builds the endpoint and reads the token afresh, so a renewed CA or a
//! rotated projected ServiceAccount token is used from the next connection on.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use infermesh_proto::agent_message::Msg as Up;
use infermesh_proto::agent_service_client::AgentServiceClient;
use infermesh_proto::operator_message::Msg as Down;
use infermesh_proto::{AgentMessage, Capabilities, Completed, Failed, Heartbeat, Hello, ShardRef};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::MetadataValue;

use crate::endpoint::{TlsOptions, operator_endpoint};
use crate::inference::ShardError;
use crate::metrics::AgentMetrics;
use crate::runner::{Runner, catch_panic};
use crate::token::TokenSource;

/// How the agent reaches the operator and who it is.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// gRPC URL of the operator: `http://127.0.0.1:50051` locally, `https://...` in a cluster.
    pub operator: String,
    /// How the operator's certificate is verified on `https://`.
    pub tls: TlsOptions,
    /// Where the bearer token comes from (its value is never logged).
    pub token: TokenSource,
    /// Stable agent id.
    pub agent_id: String,
    /// Node name.
    pub node: String,
    /// Mesh name.
    pub mesh: String,
    /// Execution providers that registered here.
    pub execution_providers: Vec<String>,
}

/// How an attach ended.
enum Ended {
    /// The operator drained us and nothing runs: exit.
    Drained,
}

/// Result of one shard, carried across reconnects.
/// A finished shard, with the credentials its Assign carried (a part it must discard is
/// removed with them, never with the agent's own).
type Outcome = (
    ShardRef,
    Result<Completed, ShardError>,
    Option<infermesh_io::Credentials>,
);

/// The shards running here, by workload, index and attempt, each with its cancel flag. Kept
/// across reconnects. Keyed by attempt too, so that a new attempt of a shard assigned while
/// an old one still winds down here neither hides it nor is forgotten when it ends.
#[derive(Debug, Default)]
struct Running(HashMap<(String, u32, u32), Arc<AtomicBool>>);

impl Running {
    fn key(shard: &ShardRef) -> (String, u32, u32) {
        (shard.workload.clone(), shard.index, shard.attempt)
    }

    /// Records an assigned shard and returns its cancel flag; `None` when that very attempt
    /// already runs here (an assignment received twice), which must not take a second slot.
    fn start(&mut self, shard: &ShardRef) -> Option<Arc<AtomicBool>> {
        let key = Self::key(shard);
        if self.0.contains_key(&key) {
            return None;
        }
        let cancel = Arc::new(AtomicBool::new(false));
        self.0.insert(key, cancel.clone());
        Some(cancel)
    }

    /// Sets the cancel flag of the shard's attempts running here (attempt 0: every attempt);
    /// returns how many.
    fn cancel(&self, shard: &ShardRef) -> usize {
        let mut n = 0;
        for ((w, i, a), flag) in &self.0 {
            if *w == shard.workload
                && *i == shard.index
                && (shard.attempt == 0 || *a == shard.attempt)
            {
                flag.store(true, Ordering::Relaxed);
                n += 1;
            }
        }
        n
    }

    /// Sets every cancel flag: the stream that assigned them is gone, and the operator has
    /// put those attempts back in the queue, so their parts would never be committed.
    fn cancel_all(&self) -> usize {
        for flag in self.0.values() {
            flag.store(true, Ordering::Relaxed);
        }
        self.0.len()
    }

    /// Forgets a finished shard; returns whether it had been cancelled.
    fn finish(&mut self, shard: &ShardRef) -> bool {
        self.0
            .remove(&Self::key(shard))
            .is_some_and(|flag| flag.load(Ordering::Relaxed))
    }

    fn len(&self) -> usize {
        self.0.len()
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The shards, for the heartbeat.
    fn refs(&self) -> Vec<ShardRef> {
        self.0
            .keys()
            .map(|(w, i, a)| ShardRef {
                workload: w.clone(),
                index: *i,
                attempt: *a,
            })
            .collect()
    }
}

/// Waits `backoff` with no stream up. A shard that finishes meanwhile is void (its stream is
/// gone and the operator requeued it): it leaves `running`, and a part it wrote is removed
/// now — not after a reconnect that may never come (the operator may be gone for good).
async fn wait_out(backoff: Duration, running: &mut Running, done_rx: &mut mpsc::Receiver<Outcome>) {
    let sleep = tokio::time::sleep(backoff);
    tokio::pin!(sleep);
    loop {
        tokio::select! {
            _ = &mut sleep => return,
            Some((shard, result, credentials)) = done_rx.recv() => {
                running.finish(&shard);
                tracing::info!(shard = %shard.display(), "finished with no stream up: void");
                if let Ok(done) = &result {
                    discard_part(&done.output_uri, credentials).await;
                }
            }
        }
    }
}

/// Removes the part of an attempt that finished after it was cancelled; best effort (a part
/// that cannot be removed is said so in the log, and the operator's `ledger verify --outputs`
/// names it).
async fn discard_part(uri: &str, credentials: Option<infermesh_io::Credentials>) {
    let removed = async { crate::io::store::Location::parse(uri)?.delete().await };
    match infermesh_io::access::scoped(credentials, removed).await {
        Ok(()) => tracing::info!(part = %uri, "part of a cancelled attempt removed"),
        Err(e) => {
            tracing::warn!(part = %uri, error = %e, "part of a cancelled attempt not removed")
        }
    }
}

/// Runs a shard's `work` on a task of its own. Its outcome always reaches `done`, a panic
/// included (as a failure, see [`catch_panic`]), so the shard is reported and leaves
/// [`Running`] instead of holding its place there for good.
fn spawn_shard<W>(
    shard: ShardRef,
    work: W,
    credentials: Option<infermesh_io::Credentials>,
    done: mpsc::Sender<Outcome>,
) where
    W: Future<Output = Result<Completed, ShardError>> + Send + 'static,
{
    tokio::spawn(async move {
        let result = catch_panic(work).await;
        let _ = done.send((shard, result, credentials)).await;
    });
}

/// What to tell the operator about a finished shard: `Completed` or `Failed`, or nothing
/// once the operator cancelled it (it no longer wants the shard; a cancelled shard does not
/// write its part unless the cancel came after the put).
fn report(shard: ShardRef, result: Result<Completed, ShardError>, cancelled: bool) -> Option<Up> {
    match result {
        _ if cancelled => {
            tracing::info!(shard = %shard.display(), "finished after it was cancelled: not reported");
            None
        }
        Ok(done) => {
            tracing::info!(shard = %shard.display(), records = done.records, secs = done.compute_seconds, "completed");
            Some(Up::Completed(done))
        }
        Err(e) if e.kind == infermesh_proto::ErrorKind::Cancelled => None,
        Err(e) => {
            tracing::warn!(shard = %shard.display(), error = %e.message, retryable = e.retryable, "failed");
            Some(Up::Failed(Failed {
                shard: Some(shard),
                kind: e.kind as i32,
                message: e.message,
                retryable: e.retryable,
            }))
        }
    }
}

/// Runs the agent until drained. Reconnects with backoff when the stream drops; gives up at
/// once when the operator refuses the token. A bad URL, TLS setting or token fails at once;
/// after that, a CA or token file that cannot be read is retried like a lost connection.
/// `metrics` shows whether the stream is attached.
pub async fn run(
    config: ClientConfig,
    runner: Arc<Runner>,
    metrics: Arc<AgentMetrics>,
) -> anyhow::Result<()> {
    operator_endpoint(&config.operator, &config.tls)?;
    config.token.read()?;
    let (done_tx, mut done_rx) = mpsc::channel::<Outcome>(64);
    let mut running = Running::default();
    const FIRST_RETRY: Duration = Duration::from_millis(200);
    let mut backoff = FIRST_RETRY;
    loop {
        let mut welcomed = false;
        let ended = attach(
            &config,
            &runner,
            &metrics,
            &done_tx,
            &mut done_rx,
            &mut running,
            &mut welcomed,
        )
        .await;
        // A stream that was up starts the backoff over: an operator that restarts (or a link
        // that comes back) after hours of work is found again in a fraction of a second, not
        // after the longest wait that earlier outages ran it up to.
        if welcomed {
            backoff = FIRST_RETRY;
        }
        match ended {
            Ok(Ended::Drained) => return Ok(()),
            Err(AttachError::Fatal(e)) => return Err(e),
            Err(AttachError::Retry(e)) => {
                let cancelled = running.cancel_all();
                if cancelled > 0 {
                    tracing::warn!(
                        shards = cancelled,
                        "stream lost: its attempts are void here too (the operator requeued them)"
                    );
                }
                // The whole chain: a TLS failure's cause (UnknownIssuer, NotValidForName) is
                // several sources down from tonic's "transport error".
                tracing::warn!(error = %format_args!("{e:#}"), retry_in = ?backoff, "connection to operator lost");
                wait_out(backoff, &mut running, &mut done_rx).await;
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        }
    }
}

enum AttachError {
    Retry(anyhow::Error),
    Fatal(anyhow::Error),
}

impl<E: Into<anyhow::Error>> From<E> for AttachError {
    fn from(e: E) -> Self {
        Self::Retry(e.into())
    }
}

/// Sets the `connected` metric while alive, and clears it however the attach ends.
struct Attached<'a>(&'a AgentMetrics);

impl<'a> Attached<'a> {
    fn new(metrics: &'a AgentMetrics) -> Self {
        metrics.set_connected(true);
        Self(metrics)
    }
}

impl Drop for Attached<'_> {
    fn drop(&mut self) {
        self.0.set_connected(false);
    }
}

async fn attach(
    config: &ClientConfig,
    runner: &Arc<Runner>,
    metrics: &AgentMetrics,
    done_tx: &mpsc::Sender<Outcome>,
    done_rx: &mut mpsc::Receiver<Outcome>,
    running: &mut Running,
    welcomed: &mut bool,
) -> Result<Ended, AttachError> {
    // Both were checked when the client started; read again so renewals are picked up.
    let endpoint = operator_endpoint(&config.operator, &config.tls)?;
    let token = config.token.read()?;
    let channel = endpoint.connect().await?;
    let bearer: MetadataValue<_> = format!("Bearer {token}").parse().map_err(|_| {
        AttachError::Fatal(anyhow::anyhow!(
            "the token has characters not allowed in a header"
        ))
    })?;
    let mut client =
        AgentServiceClient::with_interceptor(channel, move |mut req: tonic::Request<()>| {
            req.metadata_mut().insert("authorization", bearer.clone());
            Ok(req)
        });
    let (tx, rx) = mpsc::channel::<AgentMessage>(256);
    let hello = Hello {
        agent_id: config.agent_id.clone(),
        node: config.node.clone(),
        mesh: config.mesh.clone(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        capabilities: Some(Capabilities {
            execution_providers: config.execution_providers.clone(),
            gpus: crate::capabilities::gpus(),
            memory_bytes: crate::capabilities::memory_bytes(),
            cpus: crate::capabilities::cpus(),
            cached_models: runner.cached_models(),
            slots: runner.slots() as u32,
        }),
    };
    tx.send(AgentMessage {
        msg: Some(Up::Hello(hello)),
    })
    .await?;
    let mut inbound = match client.attach(ReceiverStream::new(rx)).await {
        Ok(r) => r.into_inner(),
        Err(s) if s.code() == tonic::Code::Unauthenticated => {
            return Err(AttachError::Fatal(anyhow::anyhow!(
                "operator refused this agent: {}",
                s.message()
            )));
        }
        Err(s) => return Err(AttachError::Retry(s.into())),
    };
    let welcome = match inbound.message().await {
        Ok(Some(m)) => m,
        Ok(None) => return Err(anyhow::anyhow!("operator closed the stream before Welcome").into()),
        Err(s)
            if matches!(
                s.code(),
                tonic::Code::Unauthenticated | tonic::Code::InvalidArgument
            ) =>
        {
            return Err(AttachError::Fatal(anyhow::anyhow!(
                "operator refused this agent: {}",
                s.message()
            )));
        }
        Err(s) => return Err(AttachError::Retry(s.into())),
    };
    let Some(Down::Welcome(welcome)) = welcome.msg else {
        return Err(anyhow::anyhow!("operator's first message was not Welcome").into());
    };
    tracing::info!(agent = %welcome.agent_name, lease = welcome.lease_seconds, "attached to operator");
    *welcomed = true;
    let _attached = Attached::new(metrics);
    let mut heartbeat =
        tokio::time::interval(Duration::from_secs(welcome.heartbeat_seconds.max(1) as u64));
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut draining = false;
    loop {
        if draining && running.is_empty() {
            return Ok(Ended::Drained);
        }
        tokio::select! {
            msg = inbound.message() => {
                let msg = match msg {
                    Ok(Some(m)) => m,
                    Ok(None) if draining => return Ok(Ended::Drained),
                    Ok(None) => return Err(anyhow::anyhow!("operator closed the stream").into()),
                    Err(s) => return Err(AttachError::Retry(s.into())),
                };
                match msg.msg {
                    Some(Down::Assign(assign)) => {
                        let Some(shard) = assign.shard.clone() else {
                            tracing::warn!("assignment without a shard: ignored");
                            continue;
                        };
                        let Some(cancel) = running.start(&shard) else {
                            tracing::warn!(shard = %shard.display(), "assigned again while it runs here: ignored");
                            continue;
                        };
                        tracing::info!(shard = %shard.display(), "assigned");
                        let runner = runner.clone();
                        let credentials = crate::runner::credentials(&assign);
                        let work = async move { runner.run(&assign, cancel).await };
                        spawn_shard(shard, work, credentials, done_tx.clone());
                    }
                    Some(Down::Cancel(c)) => {
                        if let Some(s) = c.shard
                            && running.cancel(&s) > 0
                        {
                            tracing::info!(shard = %s.display(), reason = %c.reason, "cancelled");
                        }
                    }
                    Some(Down::Drain(d)) => {
                        tracing::info!(reason = %d.reason, "draining");
                        draining = true;
                    }
                    Some(Down::Refused(r)) => {
                        // The operator did not accept a report of ours: it changed nothing
                        // there, and the slot was freed when the report went out.
                        let shard = r.shard.map(|s| s.display()).unwrap_or_default();
                        tracing::warn!(%shard, code = r.code, reason = %r.reason, message = %r.message, "operator refused a report");
                    }
                    Some(Down::Welcome(_)) | None => {}
                }
            }
            Some((shard, result, credentials)) = done_rx.recv() => {
                let cancelled = running.finish(&shard);
                if cancelled
                    && let Ok(done) = &result
                {
                    // Written before the cancel was seen (a thawed process, a stream lost
                    // mid-put): the part can never be committed, and nobody else would
                    // remove it.
                    discard_part(&done.output_uri, credentials).await;
                }
                let Some(msg) = report(shard, result, cancelled) else { continue };
                tx.send(AgentMessage { msg: Some(msg) }).await?;
            }
            _ = heartbeat.tick() => {
                let hb = Heartbeat {
                    free_slots: (runner.slots() as u32).saturating_sub(running.len() as u32),
                    loaded_models: runner.loaded_models(),
                    cached_models: runner.cached_models(),
                    running: running.refs(),
                    load: load_average(),
                };
                tx.send(AgentMessage { msg: Some(Up::Heartbeat(hb)) }).await?;
            }
        }
    }
}

fn load_average() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use infermesh_proto::ErrorKind;

    fn shard(index: u32, attempt: u32) -> ShardRef {
        ShardRef {
            workload: "default/w".into(),
            index,
            attempt,
        }
    }

    /// A shard whose work panics still reaches the report, as a retryable inference failure
    /// that names the panic.
    #[tokio::test]
    async fn a_panicking_shard_is_reported_failed() {
        let (done_tx, mut done_rx) = mpsc::channel::<Outcome>(1);
        spawn_shard(shard(3, 1), async { panic!("boom") }, None, done_tx);
        let (got, result, _) = tokio::time::timeout(Duration::from_secs(10), done_rx.recv())
            .await
            .expect("reported in time")
            .expect("the shard's outcome reached the client");
        assert_eq!(got, shard(3, 1));
        let Some(Up::Failed(f)) = report(got, result, false) else {
            panic!("not reported as failed");
        };
        assert_eq!(f.shard, Some(shard(3, 1)));
        assert_eq!(f.kind, ErrorKind::Inference as i32);
        assert!(f.retryable);
        assert!(
            f.message.contains("panicked") && f.message.contains("boom"),
            "{}",
            f.message
        );
    }

    /// Failures carry their kind and retryability; a cancelled shard is not reported at all,
    /// whether it completed, failed or stopped.
    #[test]
    fn reports_follow_the_result_unless_the_shard_was_cancelled() {
        let changed = ShardError::permanent(ErrorKind::InvalidInput, "input changed");
        let Some(Up::Failed(f)) = report(shard(1, 2), Err(changed.clone()), false) else {
            panic!("not reported as failed");
        };
        assert_eq!(
            (f.kind, f.retryable),
            (ErrorKind::InvalidInput as i32, false)
        );
        let done = Completed {
            shard: Some(shard(1, 2)),
            records: 5,
            ..Default::default()
        };
        assert!(matches!(
            report(shard(1, 2), Ok(done.clone()), false),
            Some(Up::Completed(c)) if c.records == 5
        ));
        assert!(report(shard(1, 2), Ok(done), true).is_none());
        assert!(report(shard(1, 2), Err(changed), true).is_none());
        let stopped = ShardError::permanent(ErrorKind::Cancelled, "cancelled by the operator");
        assert!(report(shard(1, 2), Err(stopped), false).is_none());
    }

    /// A new attempt of a shard assigned while the old one still runs here is tracked apart
    /// from it: the old one ending does not drop the new one, and a cancel without an
    /// attempt reaches both.
    #[test]
    fn running_shards_are_tracked_per_attempt() {
        let mut running = Running::default();
        let old = running.start(&shard(4, 1)).expect("started");
        assert!(
            running.start(&shard(4, 1)).is_none(),
            "the same attempt twice"
        );
        let new = running.start(&shard(4, 2)).expect("started");
        assert_eq!(running.len(), 2);

        assert_eq!(running.cancel(&shard(4, 1)), 1);
        assert!(old.load(Ordering::Relaxed) && !new.load(Ordering::Relaxed));
        assert!(
            running.finish(&shard(4, 1)),
            "the old attempt was cancelled"
        );
        assert_eq!(running.refs(), [shard(4, 2)]);

        assert_eq!(running.cancel(&shard(4, 0)), 1);
        assert!(new.load(Ordering::Relaxed));
        assert!(running.finish(&shard(4, 2)));
        assert!(running.is_empty());
        assert!(!running.finish(&shard(4, 2)), "finishing twice is harmless");
        let a = running.start(&shard(5, 1)).expect("started");
        let b = running.start(&shard(6, 1)).expect("started");
        assert_eq!(running.cancel_all(), 2, "a lost stream voids every attempt");
        assert!(a.load(Ordering::Relaxed) && b.load(Ordering::Relaxed));
    }
}
