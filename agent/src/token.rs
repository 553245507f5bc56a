//! The bearer token the agent presents to the operator. In a cluster it is a projected
//! ServiceAccount token that the kubelet rotates in place, so a token file is read again on
//! every (re)connect rather than once at start.

use std::path::PathBuf;

/// Where the bearer token comes from.
#[derive(Clone)]
pub enum TokenSource {
    /// A fixed token (`INFERMESH_TOKEN`; `infermesh local` makes one per run).
    Fixed(String),
    /// A file read on each connect (`--token-file`, a projected ServiceAccount token).
    File(PathBuf),
}

// By hand, so the token never reaches a log through `{:?}`.
impl std::fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Fixed(_) => f.write_str("Fixed(<redacted>)"),
            Self::File(path) => f.debug_tuple("File").field(path).finish(),
        }
    }
}

/// Why no token could be had.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The token file could not be read.
    #[error("cannot read token file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The token is empty.
    #[error("the token {0} is empty")]
    Empty(String),
}

impl TokenSource {
    /// The token as of now, trimmed of surrounding whitespace (a file's trailing newline).
    pub fn read(&self) -> Result<String, TokenError> {
        let (token, what) = match self {
            Self::Fixed(t) => (t.trim().to_string(), "given".to_string()),
            Self::File(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| TokenError::Read {
                    path: path.clone(),
                    source,
                })?;
                (text.trim().to_string(), format!("in {}", path.display()))
            }
        };
        if token.is_empty() {
            return Err(TokenError::Empty(what));
        }
        Ok(token)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_file_is_read_again_each_time() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("token");
        std::fs::write(&path, "token-A\n").expect("write A");
        let source = TokenSource::File(path.clone());
        assert_eq!(source.read().expect("read A"), "token-A");
        // The kubelet swaps the projected file in place; the next read sees the new token.
        std::fs::write(&path, "token-B\n").expect("write B");
        assert_eq!(source.read().expect("read B"), "token-B");
    }

    #[test]
    fn a_missing_or_empty_token_file_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("token");
        let err = TokenSource::File(path.clone())
            .read()
            .expect_err("missing file");
        assert!(
            err.to_string().contains(&path.display().to_string()),
            "{err}"
        );
        std::fs::write(&path, "  \n").expect("write");
        let err = TokenSource::File(path.clone()).read().expect_err("empty");
        assert!(matches!(err, TokenError::Empty(_)), "{err}");
    }

    #[test]
    fn a_fixed_token_never_shows_in_debug_output() {
        let shown = format!("{:?}", TokenSource::Fixed("s3cr3t".into()));
        assert!(!shown.contains("s3cr3t"), "{shown}");
    }
}
