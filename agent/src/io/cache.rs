//! The node's model cache: models stored by content hash, so a model is fetched once per node
//! and a file that does not hash to what the Workload says is refused.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use sha2::{Digest, Sha256};

use super::store::{Location, ObjectError};

/// Why a model could not be put in the cache.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// Fetching failed.
    #[error("cannot fetch model: {0}")]
    Fetch(#[from] ObjectError),
    /// The file's sha256 is not the one the Workload names.
    #[error("model {uri} has sha256 {actual}, but the workload expects {expected}")]
    HashMismatch {
        /// The model URI.
        uri: String,
        /// The hash in the spec.
        expected: String,
        /// The hash of what was fetched.
        actual: String,
    },
    /// The cache directory could not be written.
    #[error("model cache {dir}: {source}")]
    Local {
        /// The cache directory.
        dir: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// Hex sha256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Models on local disk, named `<sha256>.onnx`.
#[derive(Clone, Debug)]
pub struct ModelCache {
    dir: PathBuf,
}

impl ModelCache {
    /// A cache in `dir` (created when missing).
    pub fn new(dir: impl Into<PathBuf>) -> std::io::Result<Self> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir)?;
        Ok(Self { dir })
    }

    /// The cache directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// sha256 of every cached model.
    pub fn cached(&self) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut out: Vec<String> = entries
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                let sha = name.strip_suffix(".onnx")?;
                (sha.len() == 64 && sha.bytes().all(|b| b.is_ascii_hexdigit()))
                    .then(|| sha.to_string())
            })
            .collect();
        out.sort();
        out
    }

    /// The local path of the model at `uri`, fetching and verifying it unless a model with
    /// the `expected` hash is already cached. Returns the model's sha256 and path.
    pub async fn model(
        &self,
        uri: &str,
        expected: Option<&str>,
    ) -> Result<(String, PathBuf), CacheError> {
        self.model_from(uri, expected, true).await
    }

    /// [`ModelCache::model`], but with `by_hash` false the model is always fetched from
    /// `uri` and hashed, even when the cache holds the sha256 it is pinned to (a tenant must
    /// show it can read what it names: the cache is shared by every tenant).
    pub async fn model_from(
        &self,
        uri: &str,
        expected: Option<&str>,
        by_hash: bool,
    ) -> Result<(String, PathBuf), CacheError> {
        if let Some(sha) = expected.filter(|_| by_hash) {
            let path = self.dir.join(format!("{sha}.onnx"));
            if path.is_file() {
                return Ok((sha.to_string(), path));
            }
        }
        let bytes = Location::parse(uri)?.get().await?;
        let actual = sha256_hex(&bytes);
        if let Some(expected) = expected
            && expected != actual
        {
            return Err(CacheError::HashMismatch {
                uri: uri.to_string(),
                expected: expected.to_string(),
                actual,
            });
        }
        let path = self.dir.join(format!("{actual}.onnx"));
        if !path.is_file() {
            self.store(&path, &actual, &bytes).await?;
        }
        Ok((actual, path))
    }

    /// Writes `bytes` (which hash to `sha`) to `path` through a temporary file and a rename,
    /// so a concurrent reader never sees half a model. Each call has its own temporary name
    /// (process id and a counter), so the slots of one agent, or two agents sharing the cache,
    /// fetching the same model at once never write into or rename each other's file. If the
    /// rename fails but another fetch has meanwhile put the same model in place, that is
    /// success.
    async fn store(&self, path: &Path, sha: &str, bytes: &[u8]) -> Result<(), CacheError> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let local = |source| CacheError::Local {
            dir: self.dir.clone(),
            source,
        };
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let tmp = self
            .dir
            .join(format!(".{sha}.{}.{n}.tmp", std::process::id()));
        let written = match tokio::fs::write(&tmp, bytes).await {
            Ok(()) => tokio::fs::rename(&tmp, path).await,
            Err(e) => Err(e),
        };
        let Err(e) = written else {
            return Ok(());
        };
        let _ = tokio::fs::remove_file(&tmp).await;
        match tokio::fs::read(path).await {
            Ok(there) if sha256_hex(&there) == sha => Ok(()),
            _ => Err(local(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_model_is_cached_by_hash_and_a_wrong_hash_is_refused() {
        let src = tempfile::tempdir().expect("tmp");
        let cache_dir = tempfile::tempdir().expect("tmp");
        let model = src.path().join("m.onnx");
        std::fs::write(&model, b"model bytes").expect("write");
        let uri = format!("file://{}", model.display());
        let cache = ModelCache::new(cache_dir.path()).expect("cache");

        let (sha, path) = cache.model(&uri, None).await.expect("fetch");
        assert_eq!(sha, sha256_hex(b"model bytes"));
        assert_eq!(std::fs::read(&path).expect("read"), b"model bytes");
        assert_eq!(cache.cached(), vec![sha.clone()]);

        let wrong = "0".repeat(64);
        let err = cache.model(&uri, Some(&wrong)).await.expect_err("mismatch");
        assert!(matches!(err, CacheError::HashMismatch { .. }), "{err}");
        assert!(err.to_string().contains(&sha), "{err}");

        let missing = format!("file://{}/nope.onnx", src.path().display());
        let err = cache.model(&missing, None).await.expect_err("missing");
        assert!(err.to_string().contains("does not exist"), "{err}");
    }

    /// A write that fails while the same model is already in place (another fetch won the
    /// race) is success; with anything else there, the failure stands.
    #[tokio::test]
    async fn a_failed_write_is_success_when_the_model_is_already_in_place() {
        let dir = tempfile::tempdir().expect("tmp");
        let cache = ModelCache::new(dir.path().join("cache")).expect("cache");
        // The cache directory is gone, so writing the temporary file fails.
        std::fs::remove_dir(cache.dir()).expect("rmdir");
        let path = dir.path().join("model.onnx");
        let sha = sha256_hex(b"model bytes");
        std::fs::write(&path, b"model bytes").expect("write");
        cache
            .store(&path, &sha, b"model bytes")
            .await
            .expect("already in place");
        std::fs::write(&path, b"other bytes").expect("write");
        let err = cache
            .store(&path, &sha, b"model bytes")
            .await
            .expect_err("not in place");
        assert!(matches!(err, CacheError::Local { .. }), "{err}");
    }

    /// The slots of one agent fetching the same model into a cold cache at once all get it,
    /// whole, and leave no temporary file behind.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_fetches_of_one_model_into_a_cold_cache_all_succeed() {
        let src = tempfile::tempdir().expect("tmp");
        let model = src.path().join("m.onnx");
        // Big enough that the fetches' writes and renames overlap.
        let bytes: Vec<u8> = (0u32..8 << 20)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
            .collect();
        std::fs::write(&model, &bytes).expect("write");
        let sha = sha256_hex(&bytes);
        let uri = format!("file://{}", model.display());
        for expected in [Some(sha.clone()), None] {
            let cache_dir = tempfile::tempdir().expect("tmp");
            let cache = ModelCache::new(cache_dir.path()).expect("cache");
            let fetches = (0..8).map(|_| {
                let (cache, uri, expected) = (cache.clone(), uri.clone(), expected.clone());
                tokio::spawn(async move { cache.model(&uri, expected.as_deref()).await })
            });
            let want = cache_dir.path().join(format!("{sha}.onnx"));
            for fetched in futures::future::join_all(fetches).await {
                let (got, path) = fetched.expect("task").expect("fetch");
                assert_eq!(
                    (got.as_str(), path.as_path()),
                    (sha.as_str(), want.as_path())
                );
            }
            assert_eq!(sha256_hex(&std::fs::read(&want).expect("read")), sha);
            let names: Vec<String> = std::fs::read_dir(cache_dir.path())
                .expect("list")
                .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
                .collect();
            assert_eq!(names, [format!("{sha}.onnx")], "no temporary file is left");
        }
    }
}
