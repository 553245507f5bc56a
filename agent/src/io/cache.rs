//! The node's model cache: models stored by content hash, so a model is fetched once per node
//! and a file that does not hash to what the Workload says is refused.

use std::path::{Path, PathBuf};

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
        if let Some(sha) = expected {
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
            // Write then rename, so a concurrent reader never sees half a model.
            let local = |source| CacheError::Local {
                dir: self.dir.clone(),
                source,
            };
            let tmp = self
                .dir
                .join(format!(".{actual}.{}.tmp", std::process::id()));
            tokio::fs::write(&tmp, &bytes).await.map_err(local)?;
            tokio::fs::rename(&tmp, &path).await.map_err(local)?;
        }
        Ok((actual, path))
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
}
