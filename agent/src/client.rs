//! The agent's side of the protocol: one `Attach` stream to the operator, reconnecting when
//! it drops; heartbeats; assignments run within the agent's slots; results reported back.
//! Each (re)connect builds the endpoint and reads the token afresh, so a renewed CA or a
//! rotated projected ServiceAccount token is used from the next connection on.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use infermesh_proto::agent_message::Msg as Up;
use infermesh_proto::agent_service_client::AgentServiceClient;
use infermesh_proto::operator_message::Msg as Down;
use infermesh_proto::{AgentMessage, Capabilities, Failed, Heartbeat, Hello, ShardRef};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::MetadataValue;

use crate::endpoint::{TlsOptions, operator_endpoint};
use crate::metrics::AgentMetrics;
use crate::runner::Runner;
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
type Outcome = (
    ShardRef,
    Result<infermesh_proto::Completed, crate::inference::ShardError>,
);

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
    let mut running: HashMap<(String, u32), (u32, Arc<AtomicBool>)> = HashMap::new();
    let mut backoff = Duration::from_millis(200);
    loop {
        let ended = attach(
            &config,
            &runner,
            &metrics,
            &done_tx,
            &mut done_rx,
            &mut running,
        )
        .await;
        match ended {
            Ok(Ended::Drained) => return Ok(()),
            Err(AttachError::Fatal(e)) => return Err(e),
            Err(AttachError::Retry(e)) => {
                // The whole chain: a TLS failure's cause (UnknownIssuer, NotValidForName) is
                // several sources down from tonic's "transport error".
                tracing::warn!(error = %format_args!("{e:#}"), retry_in = ?backoff, "connection to operator lost");
                tokio::time::sleep(backoff).await;
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
    running: &mut HashMap<(String, u32), (u32, Arc<AtomicBool>)>,
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
                        let Some(shard) = assign.shard.clone() else { continue };
                        let cancel = Arc::new(AtomicBool::new(false));
                        running.insert((shard.workload.clone(), shard.index), (shard.attempt, cancel.clone()));
                        tracing::info!(shard = %shard.display(), "assigned");
                        let runner = runner.clone();
                        let done = done_tx.clone();
                        tokio::spawn(async move {
                            let result = runner.run(&assign, cancel).await;
                            let _ = done.send((shard, result)).await;
                        });
                    }
                    Some(Down::Cancel(c)) => {
                        if let Some(s) = c.shard
                            && let Some((_, flag)) = running.get(&(s.workload.clone(), s.index))
                        {
                            tracing::info!(shard = %s.display(), reason = %c.reason, "cancelled");
                            flag.store(true, Ordering::Relaxed);
                        }
                    }
                    Some(Down::Drain(d)) => {
                        tracing::info!(reason = %d.reason, "draining");
                        draining = true;
                    }
                    Some(Down::Welcome(_)) | None => {}
                }
            }
            Some((shard, result)) = done_rx.recv() => {
                running.remove(&(shard.workload.clone(), shard.index));
                let msg = match result {
                    Ok(done) => {
                        tracing::info!(shard = %shard.display(), records = done.records, secs = done.compute_seconds, "completed");
                        Up::Completed(done)
                    }
                    Err(e) if e.kind == infermesh_proto::ErrorKind::Cancelled => continue,
                    Err(e) => {
                        tracing::warn!(shard = %shard.display(), error = %e.message, retryable = e.retryable, "failed");
                        Up::Failed(Failed { shard: Some(shard), kind: e.kind as i32, message: e.message, retryable: e.retryable })
                    }
                };
                tx.send(AgentMessage { msg: Some(msg) }).await?;
            }
            _ = heartbeat.tick() => {
                let hb = Heartbeat {
                    free_slots: (runner.slots() as u32).saturating_sub(running.len() as u32),
                    loaded_models: runner.loaded_models(),
                    cached_models: runner.cached_models(),
                    running: running.iter().map(|((w, i), (a, _))| ShardRef { workload: w.clone(), index: *i, attempt: *a }).collect(),
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
