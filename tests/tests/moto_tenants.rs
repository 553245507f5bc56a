//! Two tenants on one moto server with IAM enforced ([`Moto::start_with_auth`]): each key pair
//! reaches its own bucket and is refused (403) on the other's, for requests made through
//! `object_store` as the operator and the agents make them.
//!
//! [`Location`] reads its keys from the `AWS_*` variables of the process, and tests may not set
//! them on themselves, so `probe` (ignored when run alone) runs in a child of this test binary
//! with [`Moto::env_for`] a tenant, as an agent would be started.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;

use infermesh_io::Location;
use infermesh_tests::moto::{Moto, Tenant};

/// What the child probes: one `op<TAB>uri` a line.
const OPS: &str = "INFERMESH_MOTO_PROBE";

/// The outcome of each operation, by `(op, uri)`: `Ok` with what it returned, `Err` with
/// the error as [`Location`] reports it.
type Outcomes = HashMap<(String, String), Result<String, String>>;

/// Runs `ops` in a child of this test binary with `env` as its only `AWS_*` variables.
fn run_probe(env: &[(String, String)], ops: &[(&str, &str)]) -> Outcomes {
    let mut cmd = Command::new(std::env::current_exe().expect("test binary"));
    cmd.args([
        "probe",
        "--exact",
        "--ignored",
        "--nocapture",
        "--test-threads=1",
    ]);
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("AWS_")) {
        cmd.env_remove(k);
    }
    let ops_text: Vec<String> = ops.iter().map(|(op, uri)| format!("{op}\t{uri}")).collect();
    cmd.envs(env.iter().cloned()).env(OPS, ops_text.join("\n"));
    let out = cmd.output().expect("run the child test");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && text.contains("1 passed"),
        "probe:\n{text}"
    );
    let outcomes: Outcomes = text
        .lines()
        // libtest prints `test probe ... ` ahead of the first line.
        .filter_map(|l| l.split_once("PROBE\t").map(|(_, l)| l))
        .map(|l| {
            let mut f = l.splitn(4, '\t');
            let (op, uri, how, said) = (
                f.next().unwrap_or_default(),
                f.next().unwrap_or_default(),
                f.next().unwrap_or_default(),
                serde_json::from_str::<String>(f.next().unwrap_or_default())
                    .unwrap_or_else(|e| panic!("probe line {l}: {e}")),
            );
            let said = if how == "ok" { Ok(said) } else { Err(said) };
            ((op.to_string(), uri.to_string()), said)
        })
        .collect();
    assert_eq!(outcomes.len(), ops.len(), "probe:\n{text}");
    outcomes
}

fn outcome<'a>(o: &'a Outcomes, op: &str, uri: &str) -> &'a Result<String, String> {
    o.get(&(op.to_string(), uri.to_string()))
        .unwrap_or_else(|| panic!("no outcome for {op} {uri}"))
}

/// Asserts `op` on `uri` was refused with 403, the error naming `code` where moto sent a body
/// (HEAD has none).
fn refused(o: &Outcomes, who: &str, op: &str, uri: &str, code: &str) {
    match outcome(o, op, uri) {
        Ok(got) => panic!("{who}: {op} {uri} was allowed: {got}"),
        Err(e) => assert!(
            e.contains("403") && (op == "head" || e.contains(code)),
            "{who}: {op} {uri}: not a 403 {code}: {e}"
        ),
    }
}

fn allowed<'a>(o: &'a Outcomes, who: &str, op: &str, uri: &str) -> &'a str {
    match outcome(o, op, uri) {
        Ok(got) => got,
        Err(e) => panic!("{who}: {op} {uri} was refused: {e}"),
    }
}

/// The status line of a plain, unsigned HTTP request.
fn unsigned(moto: &Moto, method: &str, path: &str) -> String {
    let addr = moto.endpoint.trim_start_matches("http://");
    let mut conn = TcpStream::connect(addr).expect("connect");
    write!(
        conn,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .expect("send");
    let mut reply = String::new();
    conn.read_to_string(&mut reply).expect("reply");
    reply.lines().next().unwrap_or_default().to_string()
}

const INPUT: &[u8] = b"{\"id\":1}\n{\"id\":2}\n";

fn seed(moto: &Moto, t: &Tenant) {
    let dir = tempfile::tempdir().expect("tmp");
    std::fs::create_dir_all(dir.path().join("in")).expect("dir");
    std::fs::write(dir.path().join("in/data.jsonl"), INPUT).expect("write");
    moto.upload(&t.bucket, dir.path());
}

#[test]
fn tenant_keys_reach_only_their_own_bucket() {
    let moto = Moto::start_with_auth();
    let a = moto.tenant("tenant-a");
    let b = moto.tenant("tenant-b");
    seed(&moto, &a);
    seed(&moto, &b);
    let input = |t: &Tenant| format!("s3://{}/in/data.jsonl", t.bucket);
    let prefix = |t: &Tenant| format!("s3://{}/in/", t.bucket);
    let part = |t: &Tenant, who: &str| format!("s3://{}/out/{who}.jsonl", t.bucket);
    let (a_in, b_in, a_dir, b_dir) = (input(&a), input(&b), prefix(&a), prefix(&b));
    let (a_part, b_part) = (part(&a, "a"), part(&b, "a"));

    // A's keys: everything in A's bucket; GET, ranged GET, HEAD, LIST, PUT and DELETE refused
    // in B's.
    let o = run_probe(
        &moto.env_for(&a),
        &[
            ("get", &a_in),
            ("range", &a_in),
            ("head", &a_in),
            ("list", &a_dir),
            ("put", &a_part),
            ("get", &b_in),
            ("range", &b_in),
            ("head", &b_in),
            ("list", &b_dir),
            ("put", &b_part),
            ("delete", &b_in),
        ],
    );
    let n = INPUT.len();
    assert_eq!(
        allowed(&o, "A", "get", &a_in),
        String::from_utf8_lossy(INPUT)
    );
    assert_eq!(
        allowed(&o, "A", "range", &a_in),
        String::from_utf8_lossy(&INPUT[2..6])
    );
    assert_eq!(allowed(&o, "A", "head", &a_in), n.to_string());
    assert_eq!(
        allowed(&o, "A", "list", &a_dir),
        format!("{a_dir}data.jsonl={n}")
    );
    allowed(&o, "A", "put", &a_part);
    for op in ["get", "range", "head", "list", "delete"] {
        let uri = if op == "list" { &b_dir } else { &b_in };
        refused(&o, "A", op, uri, "AccessDenied");
    }
    refused(&o, "A", "put", &b_part, "AccessDenied");

    // The admin sees A's part, and B's bucket as it was.
    assert_eq!(moto.keys(&a.bucket, "out/"), ["out/a.jsonl"]);
    assert_eq!(moto.get(&a.bucket, "out/a.jsonl"), b"probe");
    assert_eq!(moto.keys(&b.bucket, ""), ["in/data.jsonl"]);
    assert_eq!(moto.get(&b.bucket, "in/data.jsonl"), INPUT);

    // B's keys: the same the other way round.
    let o = run_probe(
        &moto.env_for(&b),
        &[
            ("get", &b_in),
            ("list", &b_dir),
            ("get", &a_in),
            ("list", &a_dir),
        ],
    );
    allowed(&o, "B", "get", &b_in);
    allowed(&o, "B", "list", &b_dir);
    refused(&o, "B", "get", &a_in, "AccessDenied");
    refused(&o, "B", "list", &a_dir, "AccessDenied");

    // A's key id with a wrong secret, a key id moto does not hold, and the `testing` keys of
    // a server without IAM: refused on A's own bucket.
    let wrong_secret = moto.env(&a.access_key_id, "not-the-secret");
    let unknown = moto.env(
        "AKIAIOSFODNN7EXAMPLE",
        "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
    );
    let testing = moto.env("testing", "testing");
    for (who, env, code) in [
        ("wrong secret", &wrong_secret, "SignatureDoesNotMatch"),
        ("unknown key", &unknown, "InvalidAccessKeyId"),
        ("testing keys", &testing, "InvalidAccessKeyId"),
    ] {
        let o = run_probe(
            env,
            &[
                ("get", &a_in),
                ("head", &a_in),
                ("list", &a_dir),
                ("put", &a_part),
            ],
        );
        for op in ["get", "head", "list"] {
            let uri = if op == "list" { &a_dir } else { &a_in };
            refused(&o, who, op, uri, code);
        }
        refused(&o, who, "put", &a_part, code);
    }
    assert_eq!(moto.get(&a.bucket, "out/a.jsonl"), b"probe");

    // Unsigned requests are refused too (moto answers 403, or 500 where it looks for the
    // missing signature).
    for (method, path) in [
        ("GET", format!("/{}/in/data.jsonl", a.bucket)),
        ("GET", format!("/{}", a.bucket)),
        ("PUT", format!("/{}/out/anon.jsonl", a.bucket)),
    ] {
        let status = unsigned(&moto, method, &path);
        let code = status.split(' ').nth(1).unwrap_or_default();
        assert!(
            code.len() == 3 && !code.starts_with('2'),
            "unsigned {method} {path}: {status}"
        );
    }
    assert_eq!(moto.keys(&a.bucket, "out/"), ["out/a.jsonl"]);
}

/// Runs the operations in `INFERMESH_MOTO_PROBE` through [`Location`] (configured by the
/// `AWS_*` variables) and prints each outcome on a `PROBE` line (what it said as a JSON string).
#[tokio::test]
#[ignore = "run by tenant_keys_reach_only_their_own_bucket, which sets AWS_* for it"]
async fn probe() {
    let ops = std::env::var(OPS).expect("INFERMESH_MOTO_PROBE");
    for line in ops.lines() {
        let (op, uri) = line.split_once('\t').expect("op<TAB>uri");
        let at = Location::parse(uri).expect("uri");
        let got = match op {
            "get" => at
                .get()
                .await
                .map(|b| String::from_utf8_lossy(&b).into_owned()),
            "range" => at
                .get_range(2, 6)
                .await
                .map(|b| String::from_utf8_lossy(&b).into_owned()),
            "head" => at.size().await.map(|n| n.to_string()),
            "list" => at.list().await.map(|l| {
                l.iter()
                    .map(|(u, n)| format!("{u}={n}"))
                    .collect::<Vec<_>>()
                    .join(",")
            }),
            "put" => at
                .put(b"probe".to_vec().into())
                .await
                .map(|()| String::new()),
            "delete" => at.delete().await.map(|()| String::new()),
            _ => panic!("unknown op {op}"),
        };
        let (how, said) = match got {
            Ok(v) => ("ok", v),
            Err(e) => ("err", e.to_string()),
        };
        println!(
            "PROBE\t{op}\t{uri}\t{how}\t{}",
            serde_json::Value::from(said)
        );
    }
}
