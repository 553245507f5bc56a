//! moto's S3 server from the project venv on loopback, for end-to-end runs whose data lives on
//! S3: buckets and objects are made with boto3 (moto's own dependency) from the test, and the
//! processes under test reach the server through the standard `AWS_*` variables
//! ([`Moto::env`]), as they would a real S3-compatible store.
//!
//! [`Moto::start_with_auth`] has moto enforce IAM: requests are checked against the IAM users'
//! access keys (SigV4 signature included) and their identity policies, so [`Moto::tenant`]s
//! each reach only their own bucket and anything else is refused with 403, as on AWS. moto
//! (5.2) does this for every request once `INITIAL_NO_AUTH_ACTION_COUNT` actions went by
//! unchecked (`moto/core/authorization.py`, `moto/iam/access_control.py`); the harness sets
//! that count to 0 through `POST /moto-api/reset-auth` after making its admin user.

use std::ffi::OsStr;
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::python;

/// A running moto server, killed on drop.
pub struct Moto {
    child: Child,
    /// `http://127.0.0.1:PORT`.
    pub endpoint: String,
    /// The access key the harness's own requests ([`Moto::upload`], [`Moto::keys`],
    /// [`Moto::get`], [`Moto::tenant`]) are signed with: `testing` without IAM, an admin
    /// user's (allowed everything) under [`Moto::start_with_auth`].
    pub admin_access_key_id: String,
    /// Its secret.
    pub admin_secret_access_key: String,
    auth: bool,
}

/// A bucket and the key pair of the IAM user that may use it, and nothing else
/// ([`Moto::tenant`]).
#[derive(Clone, Debug)]
pub struct Tenant {
    /// The bucket.
    pub bucket: String,
    /// The IAM user's access key id.
    pub access_key_id: String,
    /// Its secret.
    pub secret_access_key: String,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What every boto3 script starts with: `s3` and `iam` clients for the endpoint and key pair
/// given as its first three arguments; its own arguments in `args`.
const BOTO: &str = r#"
import json, os, sys, boto3
def client(service):
    return boto3.client(service, endpoint_url=sys.argv[1], aws_access_key_id=sys.argv[2],
                        aws_secret_access_key=sys.argv[3], region_name="us-east-1")
s3, iam, args = client("s3"), client("iam"), sys.argv[4:]
"#;

impl Moto {
    /// Starts the server and waits until it listens. It checks no credentials: any key pair
    /// may do anything.
    pub fn start() -> Self {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let child = Command::new(python())
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
            .expect("start moto (scripts/setup.sh installs moto[server] in the venv)");
        let deadline = Instant::now() + Duration::from_secs(60);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "moto did not listen on {port}");
            std::thread::sleep(Duration::from_millis(100));
        }
        Self {
            child,
            endpoint: format!("http://127.0.0.1:{port}"),
            admin_access_key_id: "testing".into(),
            admin_secret_access_key: "testing".into(),
            auth: false,
        }
    }

    /// Starts the server with IAM enforced: only access keys of IAM users it holds are
    /// taken, a wrong signature is refused, and each action must be allowed by the user's
    /// policies. The admin user (`infermesh-admin`, allowed `*` on `*`) is made while nothing
    /// is checked yet; its keys are then the only ones that work until [`Moto::tenant`] makes
    /// more.
    pub fn start_with_auth() -> Self {
        let mut moto = Self::start();
        let script = r#"
import requests
iam.create_user(UserName="infermesh-admin")
iam.put_user_policy(UserName="infermesh-admin", PolicyName="admin", PolicyDocument=json.dumps(
    {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
key = iam.create_access_key(UserName="infermesh-admin")["AccessKey"]
# From here on every request is authenticated (INITIAL_NO_AUTH_ACTION_COUNT = 0).
requests.post(sys.argv[1] + "/moto-api/reset-auth", data=b"0").raise_for_status()
print(key["AccessKeyId"], key["SecretAccessKey"])
"#;
        let out =
            String::from_utf8(moto.boto("make the admin user", script, std::iter::empty::<&str>()))
                .expect("utf-8 keys");
        let (key, secret) = out.trim().split_once(' ').expect("admin key pair");
        moto.admin_access_key_id = key.to_string();
        moto.admin_secret_access_key = secret.to_string();
        moto.auth = true;
        moto
    }

    /// The variables that point a process at this server with `key`/`secret`.
    pub fn env(&self, key: &str, secret: &str) -> Vec<(String, String)> {
        [
            ("AWS_ENDPOINT_URL", self.endpoint.as_str()),
            ("AWS_REGION", "us-east-1"),
            ("AWS_ACCESS_KEY_ID", key),
            ("AWS_SECRET_ACCESS_KEY", secret),
            ("AWS_ALLOW_HTTP", "true"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    /// [`Moto::env`] with `tenant`'s keys.
    pub fn env_for(&self, tenant: &Tenant) -> Vec<(String, String)> {
        self.env(&tenant.access_key_id, &tenant.secret_access_key)
    }

    /// [`Moto::env`] with the admin keys.
    pub fn env_admin(&self) -> Vec<(String, String)> {
        self.env(&self.admin_access_key_id, &self.admin_secret_access_key)
    }

    /// A tenant `name` with its own bucket, also `name` (see [`Moto::tenant_in`]).
    pub fn tenant(&self, name: &str) -> Tenant {
        self.tenant_in(name, name)
    }

    /// Creates `bucket` (if missing) and IAM user `name` with an access key and an identity
    /// policy allowing `s3:*` on `arn:aws:s3:::<bucket>` and `arn:aws:s3:::<bucket>/*` only:
    /// its keys are refused (403) everywhere else. Only on a server from
    /// [`Moto::start_with_auth`].
    ///
    /// The bucket also gets a policy allowing the user, which is all it can usefully say on
    /// moto: moto evaluates bucket policies on object requests only and ignores their
    /// `Principal`, so a statement denying everyone but the user would deny the user too. The
    /// isolation comes from the identity policies, which moto enforces on every request.
    pub fn tenant_in(&self, name: &str, bucket: &str) -> Tenant {
        assert!(
            self.auth,
            "tenants need IAM enforced: start moto with Moto::start_with_auth"
        );
        let script = r#"
name, bucket = args
if bucket not in [b["Name"] for b in s3.list_buckets().get("Buckets", [])]:
    s3.create_bucket(Bucket=bucket)
arns = [f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"]
user = iam.create_user(UserName=name)["User"]["Arn"]
iam.put_user_policy(UserName=name, PolicyName="own-bucket", PolicyDocument=json.dumps(
    {"Version": "2012-10-17",
     "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": arns}]}))
s3.put_bucket_policy(Bucket=bucket, Policy=json.dumps(
    {"Version": "2012-10-17",
     "Statement": [{"Effect": "Allow", "Principal": {"AWS": [user]}, "Action": "s3:*",
                    "Resource": arns}]}))
key = iam.create_access_key(UserName=name)["AccessKey"]
print(key["AccessKeyId"], key["SecretAccessKey"])
"#;
        let out = String::from_utf8(self.boto("make a tenant", script, [name, bucket]))
            .expect("utf-8 keys");
        let (key, secret) = out.trim().split_once(' ').expect("tenant key pair");
        Tenant {
            bucket: bucket.to_string(),
            access_key_id: key.to_string(),
            secret_access_key: secret.to_string(),
        }
    }

    /// Creates `bucket` (if missing) and uploads every file under `dir` to it, keyed by its
    /// path below `dir`; with the admin keys.
    pub fn upload(&self, bucket: &str, dir: &Path) {
        let script = r#"
bucket, root = args
if bucket not in [b["Name"] for b in s3.list_buckets().get("Buckets", [])]:
    s3.create_bucket(Bucket=bucket)
for d, _, files in os.walk(root):
    for f in files:
        p = os.path.join(d, f)
        s3.upload_file(p, bucket, os.path.relpath(p, root))
"#;
        self.boto(
            "upload to moto",
            script,
            [OsStr::new(bucket), dir.as_os_str()],
        );
    }

    /// The keys of the objects in `bucket` under `prefix`, sorted; with the admin keys.
    pub fn keys(&self, bucket: &str, prefix: &str) -> Vec<String> {
        let script = r#"
bucket, prefix = args
keys = []
for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
    keys += [o["Key"] for o in page.get("Contents", [])]
print(json.dumps(sorted(keys)))
"#;
        serde_json::from_slice(&self.boto("list moto objects", script, [bucket, prefix]))
            .expect("key list")
    }

    /// The object `key` in `bucket`; with the admin keys.
    pub fn get(&self, bucket: &str, key: &str) -> Vec<u8> {
        let script = r#"
bucket, key = args
sys.stdout.buffer.write(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
"#;
        self.boto("read a moto object", script, [bucket, key])
    }

    /// Runs boto3 `script` (after [`BOTO`]) with the admin keys and `args`; its stdout.
    fn boto<S: AsRef<OsStr>>(
        &self,
        what: &str,
        script: &str,
        args: impl IntoIterator<Item = S>,
    ) -> Vec<u8> {
        let out = Command::new(python())
            .arg("-c")
            .arg(format!("{BOTO}{script}"))
            .args([
                &self.endpoint,
                &self.admin_access_key_id,
                &self.admin_secret_access_key,
            ])
            .args(args)
            .output()
            .expect("python");
        assert!(
            out.status.success(),
            "{what}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }
}
