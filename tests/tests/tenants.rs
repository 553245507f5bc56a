//! Tenant isolation end to end, on moto's S3 server with IAM enforced: two namespaces, each
//! with its own bucket, its own access keys (a Secret of its namespace) and policies that
//! allow only its bucket. The operator and the agents run with no keys of their own.
//!
//! - Each tenant's workload runs with its own keys (`infermesh local`, real agents).
//! - A workload naming the other tenant's bucket is refused at admission (`Forbidden`), and
//!   nothing of that bucket is read or written.
//! - A real agent process handed an Assign whose input lies outside the grant that came with
//!   it refuses it (`Forbidden`), and runs one inside it with the keys it carries.
//! - Neither tenant's secret appears in any log line, metric, event-log row or store file.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use infermesh_proto as pb;
use infermesh_tests::moto::{Moto, Tenant};
use infermesh_tests::*;

/// Records per tenant.
const N: usize = 60;

/// Uploads the tensor model and an input of [`N`] records to the tenant's bucket; returns
/// the model's sha256.
fn seed(moto: &Moto, t: &Tenant, dir: &Path) -> String {
    let src = dir.join(format!("src-{}", t.bucket));
    std::fs::create_dir_all(&src).expect("dir");
    let model = test_models().join("tensor.onnx");
    std::fs::copy(&model, src.join("tensor.onnx")).expect("model");
    let mut text = String::new();
    for i in 0..N {
        let x = [i as f32 / 10.0, 1.0, 0.5, -1.0];
        let id = format!("{}-{i}", t.bucket);
        text.push_str(&serde_json::json!({"id": id, "x": x}).to_string());
        text.push('\n');
    }
    std::fs::write(src.join("in.jsonl"), text).expect("input");
    moto.upload(&t.bucket, &src);
    sha256_file(&model)
}

/// moto with IAM enforced, tenants `team-a` and `team-b` (buckets of those names) seeded
/// with the model and an input, a folder for the run, and the model's sha256.
fn two_tenants() -> (Moto, Tenant, Tenant, tempfile::TempDir, String) {
    let moto = Moto::start_with_auth();
    let a = moto.tenant("team-a");
    let b = moto.tenant("team-b");
    let dir = tempfile::tempdir().expect("tmp");
    let sha = seed(&moto, &a, dir.path());
    seed(&moto, &b, dir.path());
    (moto, a, b, dir, sha)
}

const MESH: &str = "apiVersion: infermesh.dev/v1alpha1\nkind: Mesh\nmetadata: {name: shared}\nspec:\n  \
    agent: {slots: 1, executionProviders: [cpu]}\n  leaseSeconds: 10\n  heartbeatSeconds: 1\n  \
    pricing: {perCpuSecond: 0.05, perThousandRecords: 0.2}\n  tenants:\n  \
    - {namespace: team-a, read: [\"s3://team-a/\"], write: [\"s3://team-a/out/\"]}\n  \
    - {namespace: team-b, read: [\"s3://team-b/\"], write: [\"s3://team-b/out/\"]}\n";

fn secret(ns: &str, t: &Tenant) -> String {
    format!(
        "---\napiVersion: v1\nkind: Secret\nmetadata: {{name: s3, namespace: {ns}}}\nstringData:\n  \
         AWS_ACCESS_KEY_ID: \"{}\"\n  AWS_SECRET_ACCESS_KEY: \"{}\"\n",
        t.access_key_id, t.secret_access_key
    )
}

fn workload(ns: &str, name: &str, model_sha: &str, model: &str, input: &str, out: &str) -> String {
    format!(
        "---\napiVersion: infermesh.dev/v1alpha1\nkind: Workload\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  \
         mesh: shared\n  model: {{uri: \"{model}\", sha256: \"{model_sha}\"}}\n  \
         task:\n    tensor:\n      inputs: [{{name: x}}]\n      outputs: [y]\n  \
         input: {{uri: \"{input}\"}}\n  output: {{uri: \"{out}\"}}\n  shardBytes: 1Ki\n  \
         credentials: {{secretRef: {{name: s3}}}}\n"
    )
}

/// `infermesh local` on `manifest` with the server's endpoint and no keys of its own.
fn local(moto: &Moto, manifest: &Path, dir: &Path, db: &str) -> Run {
    let mut cmd = local_command(manifest, 2, dir);
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("AWS_")) {
        cmd.env_remove(k);
    }
    cmd.env("AWS_ENDPOINT_URL", &moto.endpoint)
        .env("AWS_REGION", "us-east-1")
        .env("AWS_ALLOW_HTTP", "true")
        .env("INFERMESH_LOG", "debug")
        .args(["--database-url", db])
        .output()
        .expect("run infermesh local")
        .into()
}

/// Every file under `dir`, read (logs, caches, the store).
fn files_under(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Ok(bytes) = std::fs::read(&p) {
                out.push((p.display().to_string(), bytes));
            }
        }
    }
    out
}

fn assert_absent(secrets: &[&str], what: &str, bytes: &[u8]) {
    for s in secrets {
        assert!(
            !bytes.windows(s.len()).any(|w| w == s.as_bytes()),
            "a tenant's secret appears in {what}"
        );
    }
}

#[test]
fn each_tenant_runs_with_its_own_keys_and_is_refused_the_others_bucket() {
    let (moto, a, b, dir, sha) = two_tenants();
    let d = dir.path();
    let secrets = [a.secret_access_key.as_str(), b.secret_access_key.as_str()];

    // 1. Each with its own keys, side by side.
    let mut yaml = MESH.to_string();
    yaml.push_str(&secret("team-a", &a));
    yaml.push_str(&secret("team-b", &b));
    for (ns, t) in [("team-a", &a), ("team-b", &b)] {
        let bucket = &t.bucket;
        yaml.push_str(&workload(
            ns,
            "embed",
            &sha,
            &format!("s3://{bucket}/tensor.onnx"),
            &format!("s3://{bucket}/in.jsonl"),
            &format!("s3://{bucket}/out/run-1/"),
        ));
    }
    let manifest = d.join("mesh.yaml");
    std::fs::write(&manifest, &yaml).expect("manifest");
    let db = format!("sqlite://{}?mode=rwc", d.join("store.db").display());
    let run = local(&moto, &manifest, d, &db);
    assert_eq!(run.code, Some(0), "{}", run.text());
    for t in [&a, &b] {
        let keys = moto.keys(&t.bucket, "out/run-1/");
        assert!(
            keys.iter().any(|k| k.ends_with("_SUCCESS.json")),
            "{}: {keys:?}",
            t.bucket
        );
        let mut ids: BTreeMap<String, usize> = BTreeMap::new();
        for k in keys.iter().filter(|k| k.ends_with(".jsonl")) {
            assert!(!k.contains("_attempts"), "left behind: {k}");
            let body = moto.get(&t.bucket, k);
            for line in String::from_utf8(body).expect("utf-8").lines() {
                let v: serde_json::Value = serde_json::from_str(line).expect("json");
                *ids.entry(v["id"].as_str().expect("id").to_string())
                    .or_default() += 1;
            }
        }
        assert_eq!(ids.len(), N, "{}: every record", t.bucket);
        assert!(ids.values().all(|&c| c == 1), "{}: each once", t.bucket);
        assert!(
            ids.keys().all(|id| id.starts_with(&t.bucket)),
            "{}: only its own records",
            t.bucket
        );
    }

    // 2. team-b names team-a's bucket (input, then model, then output): refused at admission.
    let a_before = moto.keys("team-a", "");
    let cases = [
        (
            "spec.input.uri",
            workload(
                "team-b",
                "steal",
                &sha,
                "s3://team-b/tensor.onnx",
                "s3://team-a/in.jsonl",
                "s3://team-b/out/steal/",
            ),
        ),
        (
            "spec.model.uri",
            workload(
                "team-b",
                "steal",
                &sha,
                "s3://team-a/tensor.onnx",
                "s3://team-b/in.jsonl",
                "s3://team-b/out/steal/",
            ),
        ),
        (
            "spec.output.uri",
            workload(
                "team-b",
                "clobber",
                &sha,
                "s3://team-b/tensor.onnx",
                "s3://team-b/in.jsonl",
                "s3://team-a/out/run-1/",
            ),
        ),
    ];
    for (field, doc) in cases {
        let yaml = format!("{MESH}{}{doc}", secret("team-b", &b));
        std::fs::write(&manifest, &yaml).expect("manifest");
        let run = local(&moto, &manifest, d, &db);
        assert_ne!(run.code, Some(0), "{}", run.text());
        let text = run.text();
        assert!(
            text.contains("Forbidden") && text.contains(field) && text.contains("s3://team-a/"),
            "{field}: {text}"
        );
        assert_absent(&secrets, "a refused run's output", text.as_bytes());
    }
    assert_eq!(
        moto.keys("team-a", ""),
        a_before,
        "team-a's bucket was touched"
    );

    // 3. Without the Mesh's tenants, team-b's keys still cannot read team-a's bucket: the
    //    store itself refuses them (a clear error at admission, nothing run).
    let open_mesh = MESH.split("  tenants:").next().expect("mesh").to_string();
    let doc = workload(
        "team-b",
        "steal",
        &sha,
        "s3://team-b/tensor.onnx",
        "s3://team-a/in.jsonl",
        "s3://team-b/out/steal-2/",
    );
    std::fs::write(
        &manifest,
        format!("{open_mesh}{}{doc}", secret("team-b", &b)),
    )
    .expect("manifest");
    let run = local(&moto, &manifest, d, &db);
    assert_ne!(run.code, Some(0), "{}", run.text());
    assert!(
        run.text().contains("s3://team-a/in.jsonl") && run.text().contains("403"),
        "{}",
        run.text()
    );
    assert!(moto.keys("team-b", "out/steal-2/").is_empty());

    // 4. No secret in the logs of any run, the agents' logs and caches, the store, or the
    //    event log as `infermesh events` shows it.
    assert_absent(&secrets, "the first run's output", run.text().as_bytes());
    for (path, bytes) in files_under(d)
        .iter()
        .filter(|(p, _)| !p.ends_with("mesh.yaml"))
    {
        assert_absent(&secrets, path, bytes);
    }
    let events = Command::new(bin("infermesh"))
        .args([
            "ledger",
            "--database-url",
            &db,
            "events",
            "--output",
            "json",
        ])
        .output()
        .expect("infermesh events");
    let text = String::from_utf8_lossy(&events.stdout);
    assert!(text.contains("team-a") && text.contains("team-b"), "{text}");
    assert_absent(&secrets, "the event log", text.as_bytes());
}

/// An operator stand-in: takes one agent's stream, welcomes it, sends the Assigns it is
/// given, and hands back what the agent reports.
mod standin {
    use super::pb;
    use pb::agent_service_server::{AgentService, AgentServiceServer};
    use tokio::sync::mpsc;
    use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
    use tonic::{Request, Response, Status, Streaming};

    pub struct Standin {
        pub assigns: std::sync::Mutex<Option<mpsc::Receiver<pb::Assign>>>,
        pub reports: mpsc::Sender<pb::agent_message::Msg>,
    }

    #[tonic::async_trait]
    impl AgentService for Standin {
        type AttachStream = ReceiverStream<Result<pb::OperatorMessage, Status>>;

        async fn attach(
            &self,
            request: Request<Streaming<pb::AgentMessage>>,
        ) -> Result<Response<Self::AttachStream>, Status> {
            let mut inbound = request.into_inner();
            let (tx, rx) = mpsc::channel(16);
            let mut assigns = self
                .assigns
                .lock()
                .expect("lock")
                .take()
                .ok_or_else(|| Status::unavailable("one stream only"))?;
            let reports = self.reports.clone();
            tokio::spawn(async move {
                let welcome = pb::OperatorMessage {
                    msg: Some(pb::operator_message::Msg::Welcome(pb::Welcome {
                        agent_name: "standin".into(),
                        lease_seconds: 30,
                        heartbeat_seconds: 1,
                    })),
                };
                let _ = tx.send(Ok(welcome)).await;
                loop {
                    tokio::select! {
                        Some(a) = assigns.recv() => {
                            let msg = pb::operator_message::Msg::Assign(a);
                            let _ = tx.send(Ok(pb::OperatorMessage { msg: Some(msg) })).await;
                        }
                        m = inbound.message() => match m {
                            Ok(Some(pb::AgentMessage { msg: Some(msg) })) => {
                                let _ = reports.send(msg).await;
                            }
                            _ => return,
                        },
                    }
                }
            });
            Ok(Response::new(ReceiverStream::new(rx)))
        }
    }

    /// Serves on loopback; returns the address.
    pub async fn serve(s: Standin) -> std::net::SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(AgentServiceServer::new(s))
                .serve_with_incoming(TcpListenerStream::new(listener)),
        );
        addr
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_refuses_an_assign_outside_its_grant_and_runs_one_inside_with_its_keys() {
    let (moto, a, b, dir, sha) = two_tenants();
    let d = dir.path();

    let (assign_tx, assign_rx) = tokio::sync::mpsc::channel(4);
    let (report_tx, mut reports) = tokio::sync::mpsc::channel(64);
    let addr = standin::serve(standin::Standin {
        assigns: std::sync::Mutex::new(Some(assign_rx)),
        reports: report_tx,
    })
    .await;
    let metrics_port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port();
    let log = std::fs::File::create(d.join("agent.log")).expect("log");
    let mut cmd = tokio::process::Command::new(bin("infermesh-agent"));
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("AWS_")) {
        cmd.env_remove(k);
    }
    let mut agent = cmd
        .env("AWS_ENDPOINT_URL", &moto.endpoint)
        .env("AWS_REGION", "us-east-1")
        .env("AWS_ALLOW_HTTP", "true")
        .env("INFERMESH_TOKEN", "standin")
        .env("INFERMESH_LOG", "debug")
        .args(["--operator", &format!("http://{addr}")])
        .args(["--mesh", "shared", "--node", "n1", "--agent-id", "a1"])
        .args(["--execution-providers", "cpu", "--intra-op-threads", "1"])
        .arg("--model-cache")
        .arg(d.join("cache"))
        .args(["--metrics-addr", &format!("127.0.0.1:{metrics_port}")])
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .expect("start the agent");

    let b_keys = pb::Credentials {
        access_key_id: b.access_key_id.clone(),
        secret_access_key: b.secret_access_key.clone(),
        ..Default::default()
    };
    let size = moto.get("team-b", "in.jsonl").len() as u64;
    let assign = |index: u32, input: &str| pb::Assign {
        shard: Some(pb::ShardRef {
            workload: "team-b/embed/u1".into(),
            index,
            attempt: 1,
        }),
        model: Some(pb::Model {
            uri: "s3://team-b/tensor.onnx".into(),
            sha256: sha.clone(),
        }),
        task: Some(pb::Task {
            kind: Some(pb::task::Kind::Tensor(pb::Tensor {
                inputs: vec![pb::TensorInput {
                    name: "x".into(),
                    field: "x".into(),
                }],
                outputs: vec!["y".into()],
            })),
            id_field: "id".into(),
        }),
        input: Some(pb::InputRange {
            uri: input.into(),
            format: "jsonl".into(),
            start: 0,
            end: size,
            size,
            ..Default::default()
        }),
        output_uri: format!("s3://team-b/out/run/_attempts/part-{index:05}.a1.jsonl"),
        batch_size: 16,
        credentials: Some(b_keys.clone()),
        access: Some(pb::Access {
            read: vec!["s3://team-b/".into()],
            write: vec!["s3://team-b/out/".into()],
        }),
        ..Default::default()
    };

    let next_report = async |reports: &mut tokio::sync::mpsc::Receiver<pb::agent_message::Msg>| {
        loop {
            let msg = tokio::time::timeout(Duration::from_secs(120), reports.recv())
                .await
                .expect("a report in time")
                .expect("the stream");
            match msg {
                pb::agent_message::Msg::Completed(_) | pb::agent_message::Msg::Failed(_) => {
                    return msg;
                }
                _ => {}
            }
        }
    };
    // Outside the grant (team-a's input): refused before anything is read.
    assign_tx
        .send(assign(0, "s3://team-a/in.jsonl"))
        .await
        .expect("send");
    match next_report(&mut reports).await {
        pb::agent_message::Msg::Failed(f) => {
            assert_eq!(f.kind(), pb::ErrorKind::Forbidden, "{f:?}");
            assert!(!f.retryable);
            assert!(
                f.message.contains("s3://team-a/in.jsonl") && f.message.contains("s3://team-b/"),
                "{}",
                f.message
            );
        }
        other => panic!("expected Failed, got {other:?}"),
    }
    // Inside it: run with team-b's keys, the only ones the agent has.
    assign_tx
        .send(assign(1, "s3://team-b/in.jsonl"))
        .await
        .expect("send");
    match next_report(&mut reports).await {
        pb::agent_message::Msg::Completed(c) => {
            assert_eq!(c.records, N as u64);
            let key = "out/run/_attempts/part-00001.a1.jsonl";
            assert!(moto.keys("team-b", "out/run/").contains(&key.to_string()));
        }
        other => panic!("expected Completed, got {other:?}"),
    }
    assert!(moto.keys("team-a", "out/").is_empty(), "team-a was written");

    // Its metrics and log hold neither tenant's secret.
    let metrics = http_get(metrics_port, "/metrics");
    assert!(metrics.contains("infermesh_agent"), "{metrics}");
    agent.kill().await.expect("kill");
    let log = std::fs::read(d.join("agent.log")).expect("log");
    assert!(
        String::from_utf8_lossy(&log).contains("refused"),
        "the refusal is in the agent's log"
    );
    for s in [&a.secret_access_key, &b.secret_access_key] {
        assert!(!metrics.contains(s.as_str()), "a secret in the metrics");
        assert!(
            !log.windows(s.len()).any(|w| w == s.as_bytes()),
            "a secret in the agent's log"
        );
    }
}

/// A plain HTTP/1.1 GET on loopback: the body.
fn http_get(port: u16, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .expect("write");
    let mut text = String::new();
    s.read_to_string(&mut text).expect("read");
    text
}

/// `infermesh local` with two Workloads whose outputs nest: the second waits (`OutputInUse`,
/// said once) while the first runs, then runs itself; both finish with every record once.
#[test]
fn a_workload_whose_output_nests_in_a_live_ones_waits_then_runs() {
    let dir = tempfile::tempdir().expect("tmp");
    let d = dir.path();
    let (first, input, _) = tensor_job(d, 200, "  shardBytes: 1Ki\n");
    let yaml = std::fs::read_to_string(&first).expect("manifest");
    // The same job again, writing to the folder above the first one's output.
    let out = d.join("out");
    let inner = d.join("out/inner");
    let yaml = yaml.replace(
        &format!("{}/", out.display()),
        &format!("{}/", inner.display()),
    );
    let second = yaml
        .split("---\n")
        .nth(1)
        .expect("the workload")
        .replace("name: job,", "name: outer,")
        .replace(
            &format!("{}/", inner.display()),
            &format!("{}/", out.display()),
        );
    std::fs::write(&first, format!("{yaml}---\n{second}")).expect("manifest");
    let run = run_local(&first, 2, d);
    assert_eq!(run.code, Some(0), "{}", run.text());
    assert_eq!(
        run.stderr.matches("waits: OutputInUse").count(),
        1,
        "{}",
        run.text()
    );
    assert!(run.stderr.contains("team-a/outer waits"), "{}", run.text());
    let n = std::fs::read_to_string(&input)
        .expect("input")
        .lines()
        .count();
    for o in [&inner, &out] {
        let counts = id_counts(&read_parts(o));
        assert_eq!(counts.len(), n, "{}", o.display());
        assert!(counts.values().all(|&c| c == 1), "{}", o.display());
    }
}
