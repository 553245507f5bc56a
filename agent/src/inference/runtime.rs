//! ONNX Runtime: finding and loading the library, registering execution providers, building
//! sessions. This is the agent's one FFI edge; `ort` keeps the unsafe inside itself.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use ort::session::Session;
use ort::session::builder::GraphOptimizationLevel;

static ENVIRONMENT: OnceLock<Result<ort::environment::Environment, String>> = OnceLock::new();

pub use infermesh_io::infermesh_home;

/// Where `libonnxruntime.so` is looked for, in order: the explicit path, `ORT_DYLIB_PATH`,
/// `<infermesh home>/lib/libonnxruntime.so`, `/usr/local/lib/libonnxruntime.so`,
/// `/usr/lib/libonnxruntime.so`. Returns the first that exists.
pub fn find_ort_library(explicit: Option<&Path>) -> Result<PathBuf, String> {
    let mut candidates: Vec<PathBuf> = Vec::new();
    candidates.extend(explicit.map(Path::to_path_buf));
    candidates.extend(std::env::var_os("ORT_DYLIB_PATH").map(PathBuf::from));
    candidates.push(infermesh_home().join("lib").join("libonnxruntime.so"));
    candidates.push(PathBuf::from("/usr/local/lib/libonnxruntime.so"));
    candidates.push(PathBuf::from("/usr/lib/libonnxruntime.so"));
    if let Some(explicit) = explicit {
        // An explicit path that does not exist is a mistake to report, not to paper over.
        if !explicit.is_file() {
            return Err(format!(
                "ONNX Runtime library {} does not exist",
                explicit.display()
            ));
        }
    }
    candidates.into_iter().find(|p| p.is_file()).ok_or_else(|| {
        "ONNX Runtime library not found: set ORT_DYLIB_PATH or run scripts/setup.sh \
         (it installs lib/libonnxruntime.so under ~/.cache/infermesh)"
            .to_string()
    })
}

/// Loads ONNX Runtime once per process. Later calls return the first call's outcome.
pub fn init(explicit: Option<&Path>) -> Result<(), String> {
    ENVIRONMENT
        .get_or_init(|| {
            let path = find_ort_library(explicit)?;
            tracing::info!(library = %path.display(), "loading ONNX Runtime");
            ort::init_from(&path)
                .map_err(|e| format!("cannot load ONNX Runtime from {}: {e}", path.display()))?
                .with_name("infermesh")
                .build()
                .map_err(|e| format!("cannot start ONNX Runtime: {e}"))
        })
        .as_ref()
        .map(|_| ())
        .map_err(Clone::clone)
}

/// Execution providers this process can use, in preference order among `wanted`
/// (`cpu` is always usable when wanted).
pub fn usable_providers(wanted: &[String]) -> Vec<String> {
    wanted
        .iter()
        .filter(|p| match p.as_str() {
            "cpu" => true,
            "cuda" => cuda_available(),
            _ => false,
        })
        .cloned()
        .collect()
}

/// Whether CUDA can run here. ONNX Runtime lists its CUDA provider whenever the library was
/// built with it (onnxruntime-gpu's is, GPU or not), and a session whose CUDA provider fails to
/// register quietly runs on CPU; either way the agent would report `cuda` for CPU work (and
/// the ledger would price it per GPU-second). So this also wants an NVIDIA device node and a
/// provider that registers (its CUDA libraries load).
#[cfg(feature = "cuda")]
fn cuda_available() -> bool {
    use ort::ep::ExecutionProvider;
    if !ort::ep::CUDA::is_available().unwrap_or(false) {
        return false;
    }
    if !nvidia_device_in(Path::new("/dev")) {
        tracing::info!("no NVIDIA device in /dev: the CUDA execution provider is not used");
        return false;
    }
    match cuda_registers() {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(error = %e, "the CUDA execution provider does not register");
            false
        }
    }
}

/// Registers the CUDA provider on a throwaway session builder, failing instead of falling back.
#[cfg(feature = "cuda")]
fn cuda_registers() -> Result<(), String> {
    let Some(Ok(env)) = ENVIRONMENT.get() else {
        return Err("ONNX Runtime is not loaded".into());
    };
    Session::builder(env)
        .map_err(|e| e.to_string())?
        .with_execution_providers([ort::ep::CUDA::default().build().error_on_failure()])
        .map_err(|e| e.to_string())?;
    Ok(())
}

/// Whether `dev` holds an NVIDIA GPU device node (`nvidia0`, `nvidia1`, ...; not `nvidiactl`).
pub fn nvidia_device_in(dev: &Path) -> bool {
    std::fs::read_dir(dev)
        .map(|entries| {
            entries.flatten().any(|e| {
                e.file_name()
                    .to_str()
                    .and_then(|n| n.strip_prefix("nvidia"))
                    .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
            })
        })
        .unwrap_or(false)
}

#[cfg(not(feature = "cuda"))]
fn cuda_available() -> bool {
    false
}

/// How sessions are built.
#[derive(Clone, Debug)]
pub struct SessionConfig {
    /// Intra-op threads per session.
    pub intra_op_threads: usize,
    /// Providers to register, in order (`cuda`, `cpu`).
    pub providers: Vec<String>,
    /// Fail instead of falling back to CPU when a GPU provider does not register.
    pub require_gpu: bool,
}

impl SessionConfig {
    /// The device a session built with this config runs on.
    pub fn device(&self) -> &'static str {
        if self.providers.first().is_some_and(|p| p == "cuda") {
            "cuda"
        } else {
            "cpu"
        }
    }
}

/// Builds a session for the model file at `path`.
pub fn load_session(path: &Path, config: &SessionConfig) -> Result<Session, ort::Error> {
    let env = match ENVIRONMENT.get() {
        Some(Ok(env)) => env,
        Some(Err(e)) => return Err(ort::Error::new(e.clone())),
        None => {
            return Err(ort::Error::new(
                "ONNX Runtime is not loaded: call runtime::init first",
            ));
        }
    };
    let mut builder = Session::builder(env)?
        .with_optimization_level(GraphOptimizationLevel::Level3)
        .map_err(ort::Error::<()>::from)?
        .with_intra_threads(config.intra_op_threads.max(1))
        .map_err(ort::Error::<()>::from)?
        .with_inter_threads(1)
        .map_err(ort::Error::<()>::from)?;
    #[cfg(feature = "cuda")]
    if config.providers.iter().any(|p| p == "cuda") {
        let cuda = ort::ep::CUDA::default().build();
        let cuda = if config.require_gpu {
            cuda.error_on_failure()
        } else {
            cuda
        };
        builder = builder
            .with_execution_providers([cuda])
            .map_err(ort::Error::<()>::from)?;
    }
    #[cfg(not(feature = "cuda"))]
    let _ = config.require_gpu;
    builder.commit_from_file(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_numbered_nvidia_device_node_counts_as_a_gpu() {
        let dev = tempfile::tempdir().expect("tempdir");
        assert!(!nvidia_device_in(dev.path()));
        for name in ["nvidiactl", "nvidia-uvm", "nvidia-modeset", "null"] {
            std::fs::write(dev.path().join(name), "").expect("node");
        }
        assert!(!nvidia_device_in(dev.path()), "control nodes are not a GPU");
        std::fs::write(dev.path().join("nvidia0"), "").expect("node");
        assert!(nvidia_device_in(dev.path()));
        assert!(!nvidia_device_in(&dev.path().join("missing")));
    }
}
