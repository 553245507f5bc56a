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
use crate::store::AnyStore;
use crate::store::testing::{Backend, both};

const TOKEN: &str = "s3cret-token";

/// A server on in-memory connections; `connect` makes a new client connection each call.
struct Harness {
    core: Arc<Core<AnyStore>>,
    conns: mpsc::UnboundedSender<Result<tokio::io::DuplexStream, std::io::Error>>,
    _out: tempfile::TempDir,
}

impl Harness {
    async fn start() -> Self {
        Self::start_on(Backend::Sqlite).await
    }

    async fn start_on(backend: Backend) -> Self {
        let core = Arc::new(Core::new(backend.open().await));
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
             input: {{uri: \"file:///in.jsonl\"}}\n  output: {{uri: \"{out}\"}}\n  shardBytes: 1Ki\n"
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
                input_size: shards * 1024,
                input_version: None,
                input_files: None,
                credentials: None,
            })
            .await
            .expect("submit");
    }
}

fn hello(id: &str, slots: u32) -> pb::AgentMessage {
    pb::AgentMessage {
        msg: Some(Up::Hello(crate::core::tests::hello(id, slots))),
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
    // An honest agent: three records written where the attempt was told to.
    let body = b"{\"y\":1}\n{\"y\":2}\n{\"y\":3}\n".to_vec();
    let facts = crate::core::outputs::facts(&body);
    infermesh_io::Location::parse(&assign.output_uri)
        .expect("uri")
        .put(body.into())
        .await
        .expect("part");
    let done = pb::Completed {
        shard: Some(shard),
        records: 3,
        output_uri: assign.output_uri.clone(),
        sha256: facts.sha256,
        compute_seconds: 0.0,
        device: "cpu".into(),
        output_bytes: facts.bytes,
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

/// Reports an agent may not make are answered with `Refused` over the real protocol, and the
/// stream stays up for its honest work.
async fn a_forged_report_over_grpc_is_refused_and_the_stream_stays(backend: Backend) {
    let h = Harness::start_on(backend).await;
    let (_tx_a, resp) = h.attach(Some(TOKEN), hello("a", 1)).await;
    let mut a = resp.expect("a attached");
    assert!(matches!(
        next(&mut a).await.expect("welcome"),
        Down::Welcome(_)
    ));
    let (tx_b, resp) = h.attach(Some(TOKEN), hello("b", 1)).await;
    let mut b = resp.expect("b attached");
    assert!(matches!(
        next(&mut b).await.expect("welcome"),
        Down::Welcome(_)
    ));
    h.submit(2).await;
    let Down::Assign(for_a) = next(&mut a).await.expect("assign") else {
        panic!("expected Assign")
    };
    let Down::Assign(for_b) = next(&mut b).await.expect("assign") else {
        panic!("expected Assign")
    };
    let part = |uri: &str| {
        let body = b"{\"y\":1}\n".to_vec();
        let facts = crate::core::outputs::facts(&body);
        let path = uri.strip_prefix("file://").expect("file").to_string();
        std::fs::create_dir_all(std::path::Path::new(&path).parent().expect("dir")).expect("mkdir");
        std::fs::write(&path, &body).expect("write");
        facts
    };
    // b reports a's shard.
    let facts = part(&for_a.output_uri);
    let forged = pb::Completed {
        shard: for_a.shard.clone(),
        records: 1,
        output_uri: for_a.output_uri.clone(),
        sha256: facts.sha256.clone(),
        compute_seconds: 0.0,
        device: "cpu".into(),
        output_bytes: facts.bytes,
    };
    tx_b.send(pb::AgentMessage {
        msg: Some(Up::Completed(forged)),
    })
    .await
    .expect("send");
    let Down::Refused(r) = next(&mut b).await.expect("refused") else {
        panic!("expected Refused")
    };
    assert_eq!(
        (Code::from(r.code), r.reason.as_str()),
        (Code::PermissionDenied, "not_holder")
    );
    assert_eq!(r.shard, for_a.shard);
    // Its own shard, honestly: accepted on the same stream.
    let facts = part(&for_b.output_uri);
    let done = pb::Completed {
        shard: for_b.shard.clone(),
        records: 1,
        output_uri: for_b.output_uri.clone(),
        sha256: facts.sha256,
        compute_seconds: 0.0,
        device: "cpu".into(),
        output_bytes: facts.bytes,
    };
    tx_b.send(pb::AgentMessage {
        msg: Some(Up::Completed(done)),
    })
    .await
    .expect("send");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let charges = h.core.store().charges("u").await.expect("charges");
        if charges.len() == 1 {
            assert_eq!(charges[0].to, "agent/b");
            assert_eq!(charges[0].shard, for_b.shard.as_ref().expect("shard").index);
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "b's own shard was not charged"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let refused = h
        .core
        .store()
        .events(&crate::store::EventFilter {
            kind: Some("shard.report_refused".into()),
            ..Default::default()
        })
        .await
        .expect("events");
    assert_eq!(refused.len(), 1);
    assert_eq!(refused[0].agent.as_deref(), Some("b"));
}

both!(a_forged_report_over_grpc_is_refused_and_the_stream_stays);
