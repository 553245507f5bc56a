//! A real Kubernetes control plane for a test: `scripts/controlplane.sh up` in a state dir of
//! its own (etcd, kube-apiserver, kube-controller-manager, kube-scheduler and kwok on
//! 127.0.0.1, built from Go modules and cached by pin), stopped and removed when the guard
//! drops. See `tests/controlplane/README.md`.
//!
//! A test that needs one fails when it cannot start (no Go toolchain, a component that does
//! not come up): it never passes without having talked to an API server.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};

use crate::{tools, workspace};

/// A running control plane; stopped (and its state dir removed) on drop.
pub struct ControlPlane {
    dir: PathBuf,
    env: BTreeMap<String, String>,
    /// How long `up` took (start to ready, the binaries already built).
    pub startup: Duration,
}

fn script() -> PathBuf {
    workspace().join("scripts").join("controlplane.sh")
}

impl ControlPlane {
    /// Builds the binaries if their pins changed, starts the components and waits until the
    /// API server is ready and the controllers run.
    pub fn start() -> anyhow::Result<Self> {
        let built = Command::new("bash")
            .arg(script())
            .arg("build")
            .stdout(Stdio::null())
            .status()
            .context("running scripts/controlplane.sh build")?;
        if !built.success() {
            bail!(
                "scripts/controlplane.sh build failed ({built}); it needs Go >= 1.26: run `bash scripts/setup.sh`"
            );
        }
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let dir = std::env::temp_dir().join(format!("infermesh-cp-{}-{nanos}", std::process::id()));
        let t0 = Instant::now();
        let out = Command::new("bash")
            .arg(script())
            .arg("up")
            .arg(&dir)
            .stderr(Stdio::inherit())
            .output()
            .context("running scripts/controlplane.sh up")?;
        let startup = t0.elapsed();
        // Whatever happened, the guard owns the dir from here (drop stops what started).
        let mut cp = Self {
            dir,
            env: BTreeMap::new(),
            startup,
        };
        if !out.status.success() {
            bail!(
                "scripts/controlplane.sh up {} failed ({}); its logs are printed above",
                cp.dir.display(),
                out.status
            );
        }
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            if let Some((k, v)) = line
                .strip_prefix("export ")
                .and_then(|kv| kv.split_once('='))
            {
                cp.env.insert(k.to_string(), v.to_string());
            }
        }
        if !cp.kubeconfig().exists() {
            bail!(
                "scripts/controlplane.sh up printed no KUBECONFIG: {:?}",
                cp.env
            );
        }
        Ok(cp)
    }

    /// The admin kubeconfig (`system:masters`).
    pub fn kubeconfig(&self) -> PathBuf {
        self.env
            .get("KUBECONFIG")
            .map(PathBuf::from)
            .unwrap_or_else(|| self.dir.join("kubeconfig"))
    }

    /// The API server's URL (`https://127.0.0.1:<port>`).
    pub fn apiserver(&self) -> &str {
        self.env
            .get("INFERMESH_CP_APISERVER")
            .map(String::as_str)
            .unwrap_or_default()
    }

    /// The state dir (`pki/`, `logs/`, ...).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The cluster CA certificate.
    pub fn ca_cert(&self) -> PathBuf {
        self.dir.join("pki").join("ca.crt")
    }

    /// A kubeconfig for this API server that authenticates with a bearer `token` (a
    /// ServiceAccount's, from TokenRequest), written next to the admin one.
    pub fn token_kubeconfig(&self, name: &str, token: &str) -> anyhow::Result<PathBuf> {
        let path = self.dir.join(format!("kubeconfig-{name}"));
        let body = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: cp\n  cluster:\n    server: {}\n    \
             certificate-authority: {}\nusers:\n- name: {name}\n  user:\n    token: {token}\n\
             contexts:\n- name: {name}\n  context: {{cluster: cp, user: {name}}}\ncurrent-context: {name}\n",
            self.apiserver(),
            self.ca_cert().display()
        );
        std::fs::write(&path, body).with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }

    /// `kubectl` against this control plane as the admin.
    pub fn kubectl(&self) -> anyhow::Result<Command> {
        let mut c = Command::new(tools::kubectl()?);
        c.arg("--kubeconfig").arg(self.kubeconfig());
        Ok(c)
    }

    /// Runs `kubectl args` (with `stdin` when given) and returns its output, whatever its
    /// exit status.
    pub fn run(&self, args: &[&str], stdin: Option<&str>) -> anyhow::Result<Output> {
        let mut c = self.kubectl()?;
        c.args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = c.spawn().context("starting kubectl")?;
        if let Some(input) = stdin {
            child
                .stdin
                .take()
                .context("kubectl stdin")?
                .write_all(input.as_bytes())
                .context("writing to kubectl")?;
        }
        child.wait_with_output().context("waiting for kubectl")
    }

    /// Runs `kubectl args` and returns its stdout; an error (with stderr) when it fails.
    pub fn ok(&self, args: &[&str], stdin: Option<&str>) -> anyhow::Result<String> {
        let out = self.run(args, stdin)?;
        if !out.status.success() {
            bail!(
                "kubectl {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// What the API server says of `yaml` on a server-side dry run of `kubectl apply`
    /// (schema, CEL rules and admission, Pod Security included): `Ok` when it would accept
    /// every object, else the server's messages.
    pub fn dry_run(&self, yaml: &str, namespace: Option<&str>) -> Result<(), String> {
        let mut args = vec!["apply", "--dry-run=server", "--server-side", "-f", "-"];
        if let Some(ns) = namespace {
            args.extend(["-n", ns]);
        }
        match self.run(&args, Some(yaml)) {
            Ok(out) if out.status.success() => Ok(()),
            Ok(out) => Err(String::from_utf8_lossy(&out.stderr).trim().to_string()),
            Err(e) => Err(format!("{e:#}")),
        }
    }

    /// The tail of a component's log (`kube-apiserver`, `etcd`, `kwok`, ...), for failures.
    pub fn log_tail(&self, component: &str, lines: usize) -> String {
        let path = self.dir.join("logs").join(format!("{component}.log"));
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        if std::env::var_os("INFERMESH_CP_KEEP").is_some() {
            eprintln!(
                "INFERMESH_CP_KEEP: the control plane in {} is left running",
                self.dir.display()
            );
            return;
        }
        let _ = Command::new("bash")
            .arg(script())
            .arg("down")
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}
