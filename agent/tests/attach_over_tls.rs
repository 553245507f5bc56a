//! The agent against an in-process operator stand-in that serves gRPC over TLS, with a CA and
//! certificate made here by rcgen (as the operator provisions its own): the CA decides whether
//! the agent connects, and a rotated token file is read again on reconnect.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use infermesh_agent::client::{self, ClientConfig};
use infermesh_agent::endpoint::{TlsOptions, operator_endpoint};
use infermesh_agent::inference::runtime::SessionConfig;
use infermesh_agent::io::cache::ModelCache;
use infermesh_agent::metrics::AgentMetrics;
use infermesh_agent::runner::Runner;
use infermesh_agent::token::TokenSource;
use infermesh_proto::agent_message::Msg as Up;
use infermesh_proto::agent_service_server::{AgentService, AgentServiceServer};
use infermesh_proto::operator_message::Msg as Down;
use infermesh_proto::{AgentMessage, OperatorMessage, Welcome};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::transport::{Identity, Server, ServerTlsConfig};
use tonic::{Request, Response, Status, Streaming};

/// The only name in the operator's certificate (no IP SAN, so a name must be verified).
const SERVER_NAME: &str = "operator.infermesh.test";

/// A CA, written as `<name>.crt`, and a server certificate it signed for [`SERVER_NAME`].
struct Pki {
    ca_path: PathBuf,
    server_cert_pem: String,
    server_key_pem: String,
}

fn make_pki(dir: &Path, name: &str) -> Pki {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params
        .distinguished_name
        .push(DnType::CommonName, format!("{name} CA"));
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("CA key"))
        .expect("CA certificate");
    let ca_path = dir.join(format!("{name}.crt"));
    std::fs::write(&ca_path, ca.pem()).expect("write CA");

    let mut params = CertificateParams::new(vec![SERVER_NAME.to_string()]).expect("params");
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let key = KeyPair::generate().expect("server key");
    let cert = params.signed_by(&key, &ca).expect("server certificate");
    Pki {
        ca_path,
        server_cert_pem: cert.pem(),
        server_key_pem: key.serialize_pem(),
    }
}

/// One `Attach` as the stand-in saw it: the bearer token, the agent's messages, and the
/// sender of the operator's side of the stream (dropping it ends the stream).
struct Attached {
    token: String,
    inbound: Streaming<AgentMessage>,
    outbound: mpsc::Sender<Result<OperatorMessage, Status>>,
}

struct StandIn {
    attaches: mpsc::Sender<Attached>,
}

#[tonic::async_trait]
impl AgentService for StandIn {
    type AttachStream = ReceiverStream<Result<OperatorMessage, Status>>;

    async fn attach(
        &self,
        request: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Self::AttachStream>, Status> {
        let token = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| Status::unauthenticated("no bearer token"))?
            .to_string();
        let (outbound, rx) = mpsc::channel(16);
        self.attaches
            .send(Attached {
                token,
                inbound: request.into_inner(),
                outbound,
            })
            .await
            .map_err(|_| Status::unavailable("test over"))?;
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// Serves the stand-in over TLS on a loopback port; returns its address and its attaches.
async fn serve_tls(pki: &Pki) -> (SocketAddr, mpsc::Receiver<Attached>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (attaches, rx) = mpsc::channel(4);
    let tls = ServerTlsConfig::new().identity(Identity::from_pem(
        &pki.server_cert_pem,
        &pki.server_key_pem,
    ));
    let server = Server::builder()
        .tls_config(tls)
        .expect("server TLS config")
        .add_service(AgentServiceServer::new(StandIn { attaches }))
        .serve_with_incoming(TcpListenerStream::new(listener));
    tokio::spawn(server);
    (addr, rx)
}

fn tls(ca: &Path, server_name: Option<&str>) -> TlsOptions {
    TlsOptions {
        ca_cert: Some(ca.to_path_buf()),
        server_name: server_name.map(str::to_string),
    }
}

/// Waits (bounded) for `cond` to hold.
async fn eventually(what: &str, cond: impl Fn() -> bool) {
    for _ in 0..200 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("timed out waiting until {what}");
}

async fn next_attach(rx: &mut mpsc::Receiver<Attached>) -> Attached {
    tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("an attach within 10 s")
        .expect("the stand-in is running")
}

#[tokio::test]
async fn the_agent_connects_over_tls_with_the_operators_ca_and_not_with_another() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = make_pki(dir.path(), "operator");
    let other = make_pki(dir.path(), "other");
    let (addr, _attaches) = serve_tls(&pki).await;
    let url = format!("https://127.0.0.1:{}", addr.port());

    operator_endpoint(&url, &tls(&pki.ca_path, Some(SERVER_NAME)))
        .expect("endpoint")
        .connect()
        .await
        .expect("the operator's CA and name verify");

    let err = operator_endpoint(&url, &tls(&other.ca_path, Some(SERVER_NAME)))
        .expect("endpoint")
        .connect()
        .await
        .expect_err("a certificate from another CA is refused");
    let chain = format!("{:?}", anyhow::Error::from(err));
    assert!(
        chain.contains("UnknownIssuer") || chain.contains("invalid peer certificate"),
        "{chain}"
    );

    // The certificate names the operator, not 127.0.0.1: without --tls-server-name the URL's
    // host is what must verify, and it does not.
    operator_endpoint(&url, &tls(&pki.ca_path, None))
        .expect("endpoint")
        .connect()
        .await
        .expect_err("the URL's host is not in the certificate");
}

#[tokio::test]
async fn a_rotated_token_file_is_sent_on_reconnect_and_readiness_follows_the_stream() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = make_pki(dir.path(), "operator");
    let (addr, mut attaches) = serve_tls(&pki).await;
    let token_path = dir.path().join("token");
    std::fs::write(&token_path, "token-A\n").expect("write token A");

    let metrics = Arc::new(AgentMetrics::new());
    let cache = ModelCache::new(dir.path().join("cache")).expect("cache");
    let session = SessionConfig {
        intra_op_threads: 1,
        providers: vec!["cpu".into()],
        require_gpu: false,
    };
    let runner = Arc::new(Runner::new(cache, session, 1, metrics.clone()));
    let config = ClientConfig {
        operator: format!("https://127.0.0.1:{}", addr.port()),
        tls: tls(&pki.ca_path, Some(SERVER_NAME)),
        token: TokenSource::File(token_path.clone()),
        agent_id: "gpus-node-1".into(),
        node: "node-1".into(),
        mesh: "gpus".into(),
        execution_providers: vec!["cpu".into()],
    };
    let agent = tokio::spawn(client::run(config, runner, metrics.clone()));

    let mut first = next_attach(&mut attaches).await;
    assert_eq!(first.token, "token-A");
    let hello = first.inbound.message().await.expect("a message");
    match hello.and_then(|m| m.msg) {
        Some(Up::Hello(h)) => assert_eq!(h.agent_id, "gpus-node-1"),
        other => panic!("first message is not Hello: {other:?}"),
    }
    assert!(!metrics.is_connected(), "not ready before Welcome");
    let welcome = OperatorMessage {
        msg: Some(Down::Welcome(Welcome {
            agent_name: "gpus-node-1".into(),
            lease_seconds: 30,
            heartbeat_seconds: 60,
        })),
    };
    first
        .outbound
        .send(Ok(welcome.clone()))
        .await
        .expect("send Welcome");
    eventually("the agent is attached", || metrics.is_connected()).await;

    // The kubelet rotates the projected token, then the stream drops.
    std::fs::write(&token_path, "token-B\n").expect("write token B");
    drop(first);
    let second = next_attach(&mut attaches).await;
    assert_eq!(second.token, "token-B", "the token file is read again");
    assert!(
        !metrics.is_connected(),
        "not ready between the drop and the next Welcome"
    );
    second.outbound.send(Ok(welcome)).await.expect("Welcome");
    eventually("the agent is attached again", || metrics.is_connected()).await;
    assert!(!agent.is_finished(), "the agent keeps running");
    agent.abort();
}
