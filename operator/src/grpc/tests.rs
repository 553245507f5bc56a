//! AgentService over in-process `tokio::io::duplex` connections: a real tonic client and
//! server, no ports.

use std::sync::Arc;

use hyper_util::rt::TokioIo;
use infermesh_crds::{Manifest, parse_manifests};
use infermesh_proto as pb;
use pb::agent_message::Msg as Up;
use pb::agent_service_client::AgentServiceClient;
use pb::operator_message::Msg as Down;
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, UnboundedReceiverStream};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Streaming};

use super::*;
use crate::core::{Core, Submission};
use crate::store::sqlite::SqliteStore;

const TOKEN: &str = "s3cret-token";

/// A server on in-memory connections; `connect` makes a new client connection each call.
struct Harness {
    core: Arc<Core<SqliteStore>>,
    conns: mpsc::UnboundedSender<Result<tokio::io::DuplexStream, std::io::Error>>,
    _out: tempfile::TempDir,
}

impl Harness {
    async fn start() -> Self {
        let store = SqliteStore::open("sqlite::memory:").await.expect("store");
        let core = Arc::new(Core::new(store));
        let mesh =
            "apiVersion: infermesh.dev/v1alpha1\nkind: Mesh\nmetadata: {name: m}\nspec: {}\n";
        let Some(Manifest::Mesh(m)) = parse_manifests(mesh).expect("mesh").pop() else {
            panic!("mesh")
        };
        core.upsert_mesh("m", m.spec).await.expect("mesh");
        let (conns, incoming) = mpsc::unbounded_channel();
        let server = AgentServer::new(core.clone(), Arc::new(StaticToken::new(TOKEN)));
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(server.into_service())
                .serve_with_incoming(UnboundedReceiverStream::new(incoming)),
        );
        Self {
            core,
            conns,
            _out: tempfile::tempdir().expect("tmp"),
        }
    }

    async fn channel(&self) -> Channel {
        let (client, server) = tokio::io::duplex(1 << 16);
        self.conns.send(Ok(server)).expect("server running");
        let mut client = Some(client);
        Endpoint::try_from("http://in-memory")
            .expect("endpoint")
            .connect_with_connector(tower::service_fn(move |_| {
                let io = client
                    .take()
                    .ok_or_else(|| std::io::Error::other("one connection per channel"));
                async move { io.map(TokioIo::new) }
            }))
            .await
            .expect("connect")
    }

    /// Opens Attach with `token`, sending `first` first; returns the sender and the response.
    async fn attach(
        &self,
        token: Option<&str>,
        first: pb::AgentMessage,
    ) -> (
        mpsc::Sender<pb::AgentMessage>,
        Result<Streaming<pb::OperatorMessage>, tonic::Status>,
    ) {
        let mut client = AgentServiceClient::new(self.channel().await);
        let (tx, rx) = mpsc::channel(16);
        tx.send(first).await.expect("queue first message");
        let mut req = tonic::Request::new(ReceiverStream::new(rx));
        if let Some(t) = token {
            req.metadata_mut().insert(
                "authorization",
                format!("Bearer {t}").parse().expect("header"),
            );
        }
        (tx, client.attach(req).await.map(|r| r.into_inner()))
    }

    async fn submit(&self, shards: u64) {
        let out = format!("file://{}/", self._out.path().display());
        let yaml = format!(
            "apiVersion: infermesh.dev/v1alpha1\nkind: Workload\nmetadata: {{name: w}}\nspec:\n  mesh: m\n  \
             model: {{uri: \"file:///m.onnx\"}}\n  task: {{tensor: {{inputs: [{{name: x}}]}}}}\n  \
             input: {{uri: \"file:///in.jsonl\"}}\n  output: {{uri: \"{out}\"}}\n  shardBytes: \"10\"\n"
        );
        let Some(Manifest::Workload(w)) = parse_manifests(&yaml).expect("wl").pop() else {
            panic!("workload")
        };
        self.core
            .submit(Submission {
                namespace: "ns".into(),
                name: "w".into(),
                uid: "u".into(),
                spec: w.spec,
                input_size: shards * 10,
            })
            .await
            .expect("submit");
    }
}

fn hello(id: &str, slots: u32) -> pb::AgentMessage {
    pb::AgentMessage {
        msg: Some(Up::Hello(pb::Hello {
            agent_id: id.into(),
            node: "n".into(),
            mesh: "m".into(),
            version: "test".into(),
            capabilities: Some(pb::Capabilities {
                execution_providers: vec!["cpu".into()],
                slots,
                ..Default::default()
            }),
        })),
    }
}

async fn next(stream: &mut Streaming<pb::OperatorMessage>) -> Result<Down, tonic::Status> {
    let msg = tokio::time::timeout(std::time::Duration::from_secs(5), stream.message())
        .await
        .expect("a message within 5s")?;
    Ok(msg
        .and_then(|m| m.msg)
        .expect("a message, not the end of the stream"))
}

#[tokio::test]
async fn handshake_gets_welcome_with_the_mesh_lease() {
    let h = Harness::start().await;
    let (_tx, resp) = h.attach(Some(TOKEN), hello("a", 1)).await;
    let mut stream = resp.expect("attached");
    match next(&mut stream).await.expect("welcome") {
        Down::Welcome(w) => {
            assert_eq!(w.agent_name, "a");
            assert_eq!((w.lease_seconds, w.heartbeat_seconds), (30, 5));
        }
        other => panic!("expected Welcome, got {other:?}"),
    }
    assert_eq!(h.core.agents().await.len(), 1);
}

#[tokio::test]
async fn a_bad_or_missing_token_is_unauthenticated() {
    let h = Harness::start().await;
    let (_tx, resp) = h.attach(Some("wrong"), hello("a", 1)).await;
    assert_eq!(resp.expect_err("refused").code(), Code::Unauthenticated);
    let (_tx, resp) = h.attach(None, hello("a", 1)).await;
    let status = resp.expect_err("refused");
    assert_eq!(status.code(), Code::Unauthenticated);
    assert!(
        status.message().contains("authorization"),
        "{}",
        status.message()
    );
    assert!(h.core.agents().await.is_empty(), "no agent registered");
}

#[tokio::test]
async fn a_first_message_that_is_not_hello_is_invalid_argument() {
    let h = Harness::start().await;
    let beat = pb::AgentMessage {
        msg: Some(Up::Heartbeat(pb::Heartbeat::default())),
    };
    let (_tx, resp) = h.attach(Some(TOKEN), beat).await;
    assert_eq!(resp.expect_err("refused").code(), Code::InvalidArgument);
    let (_tx, resp) = h.attach(Some(TOKEN), hello("", 1)).await;
    assert_eq!(resp.expect_err("empty id").code(), Code::InvalidArgument);
}

#[tokio::test]
async fn a_malformed_message_ends_that_stream_and_does_not_disturb_another_agent() {
    let h = Harness::start().await;
    let (tx_bad, resp) = h.attach(Some(TOKEN), hello("bad", 1)).await;
    let mut bad = resp.expect("attached");
    assert!(matches!(next(&mut bad).await, Ok(Down::Welcome(_))));
    let (tx_good, resp) = h.attach(Some(TOKEN), hello("good", 1)).await;
    let mut good = resp.expect("attached");
    assert!(matches!(next(&mut good).await, Ok(Down::Welcome(_))));

    tx_bad
        .send(pb::AgentMessage { msg: None })
        .await
        .expect("send");
    let status = next(&mut bad).await.expect_err("the bad stream ends");
    assert_eq!(status.code(), Code::InvalidArgument);

    // The good agent still gets work and completes it.
    h.submit(1).await;
    let Down::Assign(assign) = next(&mut good).await.expect("assign") else {
        panic!("expected Assign")
    };
    let shard = assign.shard.expect("shard");
    let done = pb::Completed {
        shard: Some(shard),
        records: 3,
        output_uri: "file:///out/part-00000.jsonl".into(),
        sha256: "x".into(),
        compute_seconds: 0.1,
        device: "cpu".into(),
        output_bytes: 1,
    };
    tx_good
        .send(pb::AgentMessage {
            msg: Some(Up::Completed(done)),
        })
        .await
        .expect("send");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let w = &h.core.workloads().await[0];
        if w.phase == infermesh_crds::WorkloadPhase::Succeeded {
            assert_eq!(w.records, 3);
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "workload did not finish: {:?}",
            w.phase
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let agents = h.core.agents().await;
    assert!(agents.iter().any(|a| a.id == "good" && a.connected));
    assert!(agents.iter().any(|a| a.id == "bad" && !a.connected));
}
