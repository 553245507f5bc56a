//! The part checks and moves of completions, batched for local files.
//!
//! Every completion reads its attempt part (to check its size, sha256 and records) and, once
//! charged, renames it to its final name. Through `object_store` a local read is two hops to
//! the blocking pool (open, then read) and a rename one more, each a thread wake-up and a
//! context switch; at thousands of completions a second those switches, not the I/O, were
//! most of the operator's CPU. Here the local file work of whatever completions are waiting
//! goes to the blocking pool as one task: reads and renames of small files cost microseconds
//! each, so a batch is done in one wake-up.
//!
//! At most [`MAX_RUNNING`] batches run at once, so a disk that hangs on one file holds up
//! only the completions of the batches it holds, never the runtime's workers. Parts elsewhere
//! (S3, HTTP) take the async `object_store` path as before.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use infermesh_io::access::local_path;
use infermesh_io::{Location, ObjectError};
use tokio::sync::{Semaphore, mpsc, oneshot};

use super::outputs::{self, PartFacts};

/// Jobs one blocking task takes at most.
const MAX_BATCH: usize = 256;

/// Batches on the blocking pool at once.
const MAX_RUNNING: usize = 4;

enum Job {
    Inspect {
        uri: String,
        path: PathBuf,
        reply: oneshot::Sender<Result<PartFacts, ObjectError>>,
    },
    Commit {
        from_uri: String,
        from: PathBuf,
        to: PathBuf,
        reply: oneshot::Sender<Result<(), ObjectError>>,
    },
}

impl Job {
    fn run(self) {
        match self {
            Job::Inspect { uri, path, reply } => {
                let facts = std::fs::read(&path)
                    .map(|data| outputs::facts_for(&uri, &data))
                    .map_err(|e| ObjectError::local(&uri, e));
                let _ = reply.send(facts);
            }
            Job::Commit {
                from_uri,
                from,
                to,
                reply,
            } => {
                let _ =
                    reply.send(rename(&from, &to).map_err(|e| ObjectError::local(&from_uri, e)));
            }
        }
    }
}

/// Moves an attempt part to its final name. A part already moved (the attempt gone, the
/// final part there) is not an error, as with `outputs::commit`. The final name's folder is
/// the attempt folder's parent, so it exists whenever the attempt part does.
fn rename(from: &Path, to: &Path) -> std::io::Result<()> {
    match std::fs::rename(from, to) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && to.is_file() => Ok(()),
        other => other,
    }
}

/// The batcher. Cheap to clone; its task ends when every handle is gone.
#[derive(Clone)]
pub struct Parts {
    tx: mpsc::UnboundedSender<Job>,
}

impl Parts {
    /// Starts the batcher on the current runtime.
    pub fn spawn() -> Self {
        let (tx, mut rx) = mpsc::unbounded_channel::<Job>();
        let running = Arc::new(Semaphore::new(MAX_RUNNING));
        tokio::spawn(async move {
            let mut batch = Vec::with_capacity(MAX_BATCH);
            while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
                // While every permit is out, jobs queue and the next batch is larger.
                let Ok(permit) = running.clone().acquire_owned().await else {
                    return;
                };
                let jobs = std::mem::replace(&mut batch, Vec::with_capacity(MAX_BATCH));
                tokio::task::spawn_blocking(move || {
                    for job in jobs {
                        job.run();
                    }
                    drop(permit);
                });
            }
        });
        Self { tx }
    }

    fn gone() -> ObjectError {
        ObjectError::local(
            "(part batcher)",
            std::io::Error::other("the part batcher has stopped"),
        )
    }

    /// Reads a part and measures it.
    pub async fn inspect(&self, uri: &str) -> Result<PartFacts, ObjectError> {
        let Some(path) = local_path(uri) else {
            return outputs::inspect(uri).await;
        };
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(Job::Inspect {
                uri: uri.to_string(),
                path,
                reply,
            })
            .map_err(|_| Self::gone())?;
        answer.await.map_err(|_| Self::gone())?
    }

    /// Moves attempt `attempt`'s part of shard `index` to its final name under `output`.
    pub async fn commit(
        &self,
        output: &str,
        index: u32,
        attempt: u32,
        ext: &str,
    ) -> Result<(), ObjectError> {
        let from_uri = outputs::attempt_uri_as(output, index, attempt, ext);
        let to_uri = outputs::part_uri_as(output, index, ext);
        let (Some(from), Some(to)) = (local_path(&from_uri), local_path(&to_uri)) else {
            return outputs::commit(output, index, attempt, ext).await;
        };
        // The same check `Location::parse` makes (a URI it refuses is refused here too).
        Location::parse(&from_uri)?;
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(Job::Commit {
                from_uri,
                from,
                to,
                reply,
            })
            .map_err(|_| Self::gone())?;
        answer.await.map_err(|_| Self::gone())?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_local_uris_have_a_local_path() {
        assert_eq!(
            local_path("file:///tmp/out/part-00001.jsonl"),
            Some(PathBuf::from("/tmp/out/part-00001.jsonl"))
        );
        assert_eq!(local_path("/tmp/a b/x"), Some(PathBuf::from("/tmp/a b/x")));
        assert_eq!(
            local_path("file:///tmp/a%20b/x"),
            Some(PathBuf::from("/tmp/a b/x"))
        );
        assert_eq!(local_path("s3://bucket/out/part-00001.jsonl"), None);
        assert_eq!(local_path("http://host/out"), None);
        assert_eq!(local_path("relative/path"), None);
    }

    #[tokio::test]
    async fn a_batch_measures_and_moves_parts_as_the_object_store_path_does() {
        let dir = tempfile::tempdir().expect("tempdir");
        let output = format!("file://{}/out/", dir.path().display());
        let parts = Parts::spawn();
        // Many at once: they share batches.
        let mut checks = Vec::new();
        for i in 0..300u32 {
            let uri = outputs::attempt_uri(&output, i, 1);
            let body = format!("{{\"i\":{i}}}\n").repeat(i as usize % 3 + 1);
            Location::parse(&uri)
                .expect("uri")
                .put(body.clone().into())
                .await
                .expect("put");
            let (parts, output) = (parts.clone(), output.clone());
            checks.push(tokio::spawn(async move {
                let found = parts.inspect(&uri).await.expect("inspect");
                assert_eq!(found, outputs::facts(body.as_bytes()));
                assert_eq!(found, outputs::inspect(&uri).await.expect("object store"));
                parts.commit(&output, i, 1, "jsonl").await.expect("commit");
                // Moved already: not an error, and the final part is the attempt's.
                parts
                    .commit(&output, i, 1, "jsonl")
                    .await
                    .expect("commit again");
                let fin = Location::parse(&outputs::part_uri(&output, i)).expect("uri");
                assert_eq!(fin.get().await.expect("final part"), body.as_bytes());
            }));
        }
        for c in checks {
            c.await.expect("task");
        }
    }

    #[tokio::test]
    async fn a_missing_part_is_not_found_and_a_folder_is_no_part() {
        let dir = tempfile::tempdir().expect("tempdir");
        let parts = Parts::spawn();
        let output = format!("file://{}/out", dir.path().display());
        let uri = outputs::attempt_uri(&output, 7, 2);
        match parts.inspect(&uri).await {
            Err(ObjectError::NotFound { uri: u }) => assert_eq!(u, uri),
            other => panic!("expected NotFound, got {other:?}"),
        }
        match parts.commit(&output, 7, 2, "jsonl").await {
            Err(ObjectError::NotFound { .. }) => {}
            other => panic!("expected NotFound, got {other:?}"),
        }
        // A folder where the part should be: a permanent error, not transient.
        let dir_part = outputs::attempt_uri(&output, 8, 1);
        std::fs::create_dir_all(local_path(&dir_part).expect("local")).expect("mkdir");
        let e = parts
            .inspect(&dir_part)
            .await
            .expect_err("a folder is no part");
        assert!(!e.is_transient(), "{e:?}");
    }
}
