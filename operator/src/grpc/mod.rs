//! The gRPC side of the operator: `AgentService/Attach`. Authenticates the stream's bearer
//! token, takes the agent's Hello, and feeds its messages to the core. A refused token is
//! `Unauthenticated`, a malformed message `InvalidArgument`; either ends that stream alone.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use infermesh_proto::agent_message::Msg as Up;
use infermesh_proto::agent_service_server::{AgentService, AgentServiceServer};
use infermesh_proto::{AgentMessage, OperatorMessage};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::{TcpListenerStream, UnboundedReceiverStream};
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status, Streaming};

use crate::core::Core;
use crate::store::Store;

/// How long an agent has to send Hello after opening its stream.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// Who a bearer token belongs to, as the operator established it: never what the agent says
/// of itself. The core refuses a Hello that names another agent or node than the credentials
/// are bound to, and a stream from another instance than the live one.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Principal {
    /// The user (`system:serviceaccount:<namespace>:<name>` in a cluster; `local`).
    pub user: String,
    /// The agent id the credentials are bound to, when they are.
    pub agent: Option<String>,
    /// The node the credentials are bound to, when they are.
    pub node: Option<String>,
    /// Which running instance holds them (a pod name in a cluster; the agent locally).
    pub instance: Option<String>,
}

impl Principal {
    /// A user bound to nothing more.
    pub fn user(user: impl Into<String>) -> Self {
        Self {
            user: user.into(),
            ..Self::default()
        }
    }
}

/// Decides whether a bearer token may attach, and for which Mesh.
pub trait Authenticator: Send + Sync + 'static {
    /// Who holds `token`; `Unauthenticated` when nobody (or it cannot be checked).
    fn authenticate(&self, token: &str) -> impl Future<Output = Result<Principal, Status>> + Send;

    /// Whether `who` may serve as an agent of `mesh` (`Unauthenticated` otherwise); may bind
    /// the principal further (to the agent id it must use on that Mesh).
    fn authorize(&self, who: &mut Principal, mesh: &str) -> Result<(), Status> {
        let _ = (who, mesh);
        Ok(())
    }
}

/// Compares every byte whatever the first mismatch, so timing tells nothing.
fn same_secret(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    a.iter()
        .zip(b)
        .fold(a.len() ^ b.len(), |acc, (x, y)| acc | usize::from(x ^ y))
        == 0
}

/// One shared token, bound to no agent (tests and tools).
pub struct StaticToken(String);

impl StaticToken {
    /// Accepts exactly `token`.
    pub fn new(token: impl Into<String>) -> Self {
        Self(token.into())
    }
}

impl Authenticator for StaticToken {
    async fn authenticate(&self, token: &str) -> Result<Principal, Status> {
        if same_secret(&self.0, token) {
            Ok(Principal::user("local"))
        } else {
            Err(Status::unauthenticated("invalid bearer token"))
        }
    }
}

/// One token per agent (local mode: each spawned agent gets its own, random, made at start),
/// bound to that agent's id and node.
#[derive(Default)]
pub struct AgentTokens(Vec<(String, Principal)>);

impl AgentTokens {
    /// No tokens yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Accepts `token` for agent `agent` on node `node`.
    pub fn insert(&mut self, token: impl Into<String>, agent: &str, node: &str) {
        self.0.push((
            token.into(),
            Principal {
                user: format!("local:{agent}"),
                agent: Some(agent.into()),
                node: Some(node.into()),
                instance: Some(agent.into()),
            },
        ));
    }
}

impl Authenticator for AgentTokens {
    async fn authenticate(&self, token: &str) -> Result<Principal, Status> {
        // Check every token, so timing tells nothing of which one came close.
        let mut found = None;
        for (t, who) in &self.0 {
            if same_secret(t, token) {
                found = Some(who.clone());
            }
        }
        found.ok_or_else(|| Status::unauthenticated("invalid bearer token"))
    }
}

/// The bearer token of a call.
pub fn bearer(metadata: &MetadataMap) -> Result<&str, Status> {
    let value = metadata.get("authorization").ok_or_else(|| {
        Status::unauthenticated("missing `authorization: Bearer <token>` metadata")
    })?;
    value
        .to_str()
        .ok()
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| {
            Status::unauthenticated("the authorization metadata is not `Bearer <token>`")
        })
}

/// The AgentService implementation, generic over the store and the authenticator.
pub struct AgentServer<S: Store, A: Authenticator> {
    core: Arc<Core<S>>,
    auth: Arc<A>,
    /// Reports in flight over every stream ([`REPORTS_IN_FLIGHT_TOTAL`]).
    reports: Arc<tokio::sync::Semaphore>,
}

impl<S: Store, A: Authenticator> AgentServer<S, A> {
    /// A server feeding `core`.
    pub fn new(core: Arc<Core<S>>, auth: Arc<A>) -> Self {
        Self {
            core,
            auth,
            reports: Arc::new(tokio::sync::Semaphore::new(REPORTS_IN_FLIGHT_TOTAL)),
        }
    }

    /// As a tonic service.
    pub fn into_service(self) -> AgentServiceServer<Self> {
        AgentServiceServer::new(self)
    }
}

#[tonic::async_trait]
impl<S: Store, A: Authenticator> AgentService for AgentServer<S, A> {
    type AttachStream = UnboundedReceiverStream<Result<OperatorMessage, Status>>;

    #[tracing::instrument(skip_all, fields(agent))]
    async fn attach(
        &self,
        request: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Self::AttachStream>, Status> {
        let token = bearer(request.metadata())?;
        let mut principal = self.auth.authenticate(token).await?;
        let mut inbound = request.into_inner();
        let first = tokio::time::timeout(HELLO_TIMEOUT, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no Hello within 10 seconds"))??;
        let hello = match first {
            Some(AgentMessage {
                msg: Some(Up::Hello(hello)),
            }) => hello,
            Some(_) => {
                return Err(Status::invalid_argument(
                    "the first message on a stream must be Hello",
                ));
            }
            None => return Err(Status::invalid_argument("stream closed before Hello")),
        };
        tracing::Span::current().record("agent", hello.agent_id.as_str());
        self.auth.authorize(&mut principal, &hello.mesh)?;
        let (tx, rx) = mpsc::unbounded_channel();
        let handle = self.core.attach(hello, &principal, tx.clone()).await?;
        let (core, reports) = (self.core.clone(), self.reports.clone());
        tokio::spawn(async move {
            let reason = serve_stream(&core, &handle, &mut inbound, &tx, &reports).await;
            if let Err(e) = core.detach(&handle, &reason).await {
                tracing::error!(agent = %handle.id, error = %e, "cannot record the agent's departure");
            }
        });
        Ok(Response::new(UnboundedReceiverStream::new(rx)))
    }
}

/// Reports of one stream handled at once, at most. A report's judgement (is this the
/// holder's running attempt?) is made in the order the reports came; what follows (the part
/// read, the group commit, the move) overlaps, so an agent's next report does not wait for the
/// last one's commit.
const REPORTS_IN_FLIGHT: usize = 16;

/// Reports handled at once over all streams. A judged completion frees its slot at once, so
/// without a bound the commits could fall ever further behind the judgements (each report in
/// flight holds its message and its state: at 1,000 agents an unbounded backlog took the
/// operator past 500 MB). Past the bound, streams are not read until commits catch up; two
/// group-commit batches' worth lets one batch form while another commits.
const REPORTS_IN_FLIGHT_TOTAL: usize = 2 * crate::store::group::MAX_BATCH;

/// Reads one agent's stream until it ends; returns why it ended. Every report handed to the
/// core is first polled at once, so its judgement, made before its first wait, happens in
/// stream order: a heartbeat never overtakes the completion sent before it. On the way out
/// the reports in flight are finished before the caller records the departure.
async fn serve_stream<S: Store>(
    core: &Arc<Core<S>>,
    handle: &crate::core::AgentHandle,
    inbound: &mut Streaming<AgentMessage>,
    tx: &mpsc::UnboundedSender<Result<OperatorMessage, Status>>,
    reports: &Arc<tokio::sync::Semaphore>,
) -> String {
    use futures::StreamExt;
    use std::task::Poll;
    let mut in_flight = futures::stream::FuturesUnordered::new();
    let mut permit = None;
    let refused = |status: Status| {
        tracing::warn!(agent = %handle.id, code = ?status.code(), message = %status.message(), "refusing agent message");
        let reason = format!("stream ended: {}", status.message());
        let _ = tx.send(Err(status));
        reason
    };
    let reason = loop {
        tokio::select! {
            biased;
            Some(result) = in_flight.next(), if !in_flight.is_empty() => {
                if let Err(status) = result {
                    break refused(status);
                }
            }
            got = reports.clone().acquire_owned(),
                if permit.is_none() && in_flight.len() < REPORTS_IN_FLIGHT =>
            {
                permit = got.ok();
            }
            message = inbound.message(), if permit.is_some() => match message {
                Ok(Some(msg)) => {
                    let held = permit.take();
                    let handled = core.handle(handle, msg);
                    let mut report = Box::pin(async move {
                        let result = handled.await;
                        drop(held);
                        result
                    });
                    match futures::poll!(&mut report) {
                        Poll::Ready(Ok(())) => {}
                        Poll::Ready(Err(status)) => break refused(status),
                        Poll::Pending => in_flight.push(report),
                    }
                }
                Ok(None) => break "stream closed by the agent".to_string(),
                Err(status) => break format!("stream broke: {}", status.message()),
            },
        }
    };
    drop(permit);
    while let Some(result) = in_flight.next().await {
        if let Err(status) = result {
            tracing::warn!(agent = %handle.id, code = ?status.code(), message = %status.message(), "refusing agent message");
        }
    }
    reason
}

/// Serves AgentService on `listener` until `shutdown` resolves.
pub async fn serve<S: Store, A: Authenticator>(
    listener: TcpListener,
    core: Arc<Core<S>>,
    auth: Arc<A>,
    tls: Option<tonic::transport::ServerTlsConfig>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    let mut builder = tonic::transport::Server::builder().tcp_nodelay(true);
    if let Some(tls) = tls {
        builder = builder.tls_config(tls)?;
    }
    builder
        .add_service(AgentServer::new(core, auth).into_service())
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
        .await
}

/// Expires leases once a second until the core is dropped elsewhere and `stop` fires.
pub async fn reap_leases<S: Store>(
    core: Arc<Core<S>>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    // While the store is down: asked again after 1, 2, then every 4 s.
    let mut backoff = Duration::from_secs(1);
    let mut next_probe = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = tick.tick() => {
                if !core.store_available() {
                    if tokio::time::Instant::now() < next_probe {
                        continue;
                    }
                    if core.recover().await {
                        backoff = Duration::from_secs(1);
                    } else {
                        next_probe = tokio::time::Instant::now() + backoff;
                        backoff = (backoff * 2).min(Duration::from_secs(4));
                    }
                    continue;
                }
                if let Err(e) = core.reap(std::time::Instant::now()).await
                    && !core.check_store().await
                {
                    tracing::error!(error = %e, "lease reaper failed");
                }
                if core.store_available() {
                    core.sweep().await;
                }
            }
            _ = stop.changed() => return,
        }
    }
}

#[cfg(test)]
mod tests;
