//! `s3://` through [`Location`] against a real S3 server on loopback: moto's server from the
//! project venv (`scripts/setup.sh` installs it), configured only by the standard `AWS_*`
//! variables, as the operator and the agents are in a cluster.
//!
//! The variables are read by the process, and tests may not set them on themselves, so
//! `s3_through_the_aws_variables` starts the server and runs `s3_round_trip` (ignored when run
//! alone) in a child of this test binary with the variables set.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use infermesh_io::Location;

const BUCKET: &str = "infermesh-test";

/// moto's S3 server on 127.0.0.1, killed on drop.
struct Moto {
    child: Child,
    endpoint: String,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Moto {
    fn start() -> Self {
        let python = infermesh_io::infermesh_home().join("venv/bin/python");
        let has_moto = Command::new(&python)
            .args(["-c", "import moto.server, flask, werkzeug"])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            has_moto,
            "{} lacks moto[server]: run scripts/setup.sh (it installs the S3 test server)",
            python.display()
        );
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let child = Command::new(&python)
            .args([
                "-m",
                "moto.server",
                "-H",
                "127.0.0.1",
                "-p",
                &port.to_string(),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start moto");
        let moto = Self {
            child,
            endpoint: format!("http://127.0.0.1:{port}"),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "moto did not listen on {port}");
            std::thread::sleep(Duration::from_millis(100));
        }
        moto
    }

    /// Creates a bucket with a plain `PUT /bucket` (object_store has no call for that; moto
    /// takes unsigned requests).
    fn create_bucket(&self, bucket: &str) {
        let addr = self.endpoint.trim_start_matches("http://");
        let mut conn = TcpStream::connect(addr).expect("connect");
        write!(
            conn,
            "PUT /{bucket} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )
        .expect("send");
        let mut reply = String::new();
        conn.read_to_string(&mut reply).expect("reply");
        assert!(reply.starts_with("HTTP/1.1 200"), "create bucket: {reply}");
    }
}

#[test]
fn s3_through_the_aws_variables() {
    let moto = Moto::start();
    moto.create_bucket(BUCKET);
    // The two spellings of the endpoint and of the region that deployments use.
    let configs = [
        [
            ("AWS_ENDPOINT_URL", moto.endpoint.as_str()),
            ("AWS_REGION", "us-east-1"),
        ],
        [
            ("AWS_ENDPOINT", moto.endpoint.as_str()),
            ("AWS_DEFAULT_REGION", "eu-west-1"),
        ],
    ];
    for (n, config) in configs.iter().enumerate() {
        let mut cmd = Command::new(std::env::current_exe().expect("test binary"));
        cmd.args([
            "s3_round_trip",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ]);
        for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("AWS_")) {
            cmd.env_remove(k);
        }
        cmd.envs(config.iter().copied())
            .env("AWS_ACCESS_KEY_ID", "testing")
            .env("AWS_SECRET_ACCESS_KEY", "testing")
            .env("AWS_ALLOW_HTTP", "true")
            .env("INFERMESH_S3_TEST_PREFIX", format!("run{n}"));
        let out = cmd.output().expect("run the child test");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success() && text.contains("1 passed"),
            "s3_round_trip with {config:?}:\n{text}"
        );
    }
}

#[tokio::test]
#[ignore = "run by s3_through_the_aws_variables, which starts the server and sets AWS_*"]
async fn s3_round_trip() {
    let prefix = std::env::var("INFERMESH_S3_TEST_PREFIX").expect("run by the parent test");
    let base = format!("s3://{BUCKET}/{prefix}");
    let data = common::jsonl(40);

    let input = Location::parse(&format!("{base}/in/data.jsonl")).expect("uri");
    assert_eq!(input.uri(), format!("{base}/in/data.jsonl"));
    input.put(Bytes::from(data.clone())).await.expect("put");
    common::check_reads(&input, &data).await;

    // The input replaced by a shorter or a longer one after it was planned.
    let planned = data.len() as u64;
    let changed = Location::parse(&format!("{base}/in/changed.jsonl")).expect("uri");
    for found in [data.len() - 100, data.len() / 2, data.len() + 50] {
        let mut now = data.clone();
        now.resize(found, b'\n');
        changed.put(Bytes::from(now)).await.expect("put");
        common::check_changed(&changed, planned, found as u64).await;
    }

    // Output parts are written as children of a directory-like prefix and read back by URI.
    let out = Location::parse(&format!("{base}/out/")).expect("uri");
    let part = out.child("part-00001.jsonl");
    assert_eq!(part.uri(), format!("{base}/out/part-00001.jsonl"));
    part.put(Bytes::from_static(b"{\"a\":1}\n"))
        .await
        .expect("put");
    part.put(Bytes::from_static(b"{\"a\":2}\n"))
        .await
        .expect("put");
    let back = Location::parse(&format!("{base}/out/part-00001.jsonl")).expect("uri");
    assert_eq!(back.get().await.expect("get part"), &b"{\"a\":2}\n"[..]);

    common::check_not_found(&format!("{base}/in/missing.jsonl")).await;
    common::check_not_found(&format!("{base}/out/part-00002.jsonl")).await;

    // The operator commits an attempt's part by a server-side copy then delete, lists what a
    // location holds, and clears what attempts left.
    let attempt = out.child("_attempts").child("part-00003.a2.jsonl");
    attempt
        .put(Bytes::from_static(b"{\"a\":3}\n"))
        .await
        .expect("put attempt");
    let stray = out.child("_attempts").child("part-00004.a1.jsonl");
    stray
        .put(Bytes::from_static(b"late\n"))
        .await
        .expect("put stray");
    let committed = out.child("part-00003.jsonl");
    attempt
        .rename_to(&committed)
        .await
        .expect("server-side rename");
    assert_eq!(committed.get().await.expect("get"), &b"{\"a\":3}\n"[..]);
    common::check_not_found(attempt.uri()).await;
    let listed: Vec<String> = out
        .list()
        .await
        .expect("list")
        .into_iter()
        .map(|(uri, _)| uri)
        .collect();
    assert!(listed.contains(&committed.uri().to_string()), "{listed:?}");
    assert!(listed.contains(&stray.uri().to_string()), "{listed:?}");
    assert_eq!(out.child("_attempts").delete_all().await.expect("clear"), 1);
    common::check_not_found(stray.uri()).await;
    datasets_on_s3(&base).await;
}

/// A prefix of plain and gzip JSONL (and a marker file it skips), and a glob of Parquet
/// files, resolved and read piece by piece over S3: every record once.
async fn datasets_on_s3(base: &str) {
    use infermesh_io::columnar;
    use infermesh_io::dataset::{self, Compression, Format, Piece, Want};

    let put = |uri: String, data: Vec<u8>| async move {
        Location::parse(&uri)
            .expect("uri")
            .put(Bytes::from(data))
            .await
            .expect("put");
    };
    let lines = |from: usize, n: usize| -> Vec<u8> {
        (from..from + n)
            .flat_map(|i| format!("{{\"id\":{i}}}\n").into_bytes())
            .collect()
    };
    put(format!("{base}/ds/jsonl/a.jsonl"), lines(0, 30)).await;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&lines(30, 20)).expect("gzip");
    put(
        format!("{base}/ds/jsonl/b.jsonl.gz"),
        gz.finish().expect("gzip"),
    )
    .await;
    put(format!("{base}/ds/jsonl/_SUCCESS"), b"{}".to_vec()).await;
    let ds = dataset::resolve(&format!("{base}/ds/jsonl/"), &Want::default())
        .await
        .expect("prefix");
    assert_eq!(ds.files.len(), 2, "{ds:?}");
    assert_eq!(ds.files[1].compression, Compression::Gzip);
    assert!(
        ds.files.iter().all(|f| f.version.is_some()),
        "S3 names versions"
    );
    let mut records = 0;
    for (s, e) in ds.snap(&[17, 40, 70]) {
        for piece in ds.pieces(s, e) {
            let f = &ds.files[piece.file()];
            let loc = Location::parse(&f.uri).expect("uri");
            records += match piece {
                Piece::Bytes { start, end, .. } => {
                    let (_, data) =
                        infermesh_io::read_aligned(&loc, start, end, f.size, f.version.as_deref())
                            .await
                            .expect("range");
                    infermesh_io::shard::count_newlines(&data)
                }
                Piece::Whole { .. } => {
                    let data = loc.get().await.expect("get");
                    let text = infermesh_io::decode::decompress(
                        &data,
                        f.compression,
                        infermesh_io::decode::MAX_EXPANDED,
                    )
                    .expect("gunzip");
                    infermesh_io::shard::count_newlines(&text)
                }
                Piece::RowGroups { .. } => panic!("no Parquet here"),
            };
        }
    }
    assert_eq!(records, 50, "every JSONL record once");

    for (i, n) in [(0usize, 7usize), (1, 11)] {
        let ids: Vec<serde_json::Value> = (0..n)
            .map(|k| serde_json::json!(format!("{i}-{k}")))
            .collect();
        let refs: Vec<Option<&serde_json::Value>> = ids.iter().map(Some).collect();
        let vecs = vec![vec![1.0f32, 2.0]; n];
        let data =
            columnar::write_part("id", &refs, columnar::PartColumns::Embeddings(vecs), false)
                .expect("parquet");
        put(format!("{base}/ds/pq/part-{i}.parquet"), data.to_vec()).await;
    }
    put(format!("{base}/ds/pq/notes.txt"), b"not data".to_vec()).await;
    let want = Want {
        format: Format::Parquet,
        compression: None,
        columns: vec!["embedding".into()],
        confine: None,
    };
    let ds = dataset::resolve(&format!("{base}/ds/pq/part-*.parquet"), &want)
        .await
        .expect("glob");
    assert_eq!(ds.files.len(), 2);
    assert_eq!(ds.rows(), 18);
    let mut rows = 0;
    for (s, e) in ds.snap(&[1]) {
        for piece in ds.pieces(s, e) {
            let Piece::RowGroups { file, first, end } = piece else {
                panic!("row groups")
            };
            let f = &ds.files[file];
            let loc = Location::parse(&f.uri).expect("uri");
            rows += columnar::read_rows(&loc, f.size, first, end, &f.row_groups, &[])
                .await
                .expect("rows")
                .len();
        }
    }
    assert_eq!(rows, 18, "every Parquet row once");
    let missing = Want {
        columns: vec!["text".into()],
        ..want.clone()
    };
    let err = dataset::resolve(&format!("{base}/ds/pq/part-*.parquet"), &missing)
        .await
        .expect_err("no text column");
    assert!(err.to_string().contains("has no column `text`"), "{err}");
    let none = dataset::resolve(&format!("{base}/ds/pq/nothing-*.parquet"), &want)
        .await
        .expect_err("no match");
    assert!(none.is_not_found(), "{none}");
}
