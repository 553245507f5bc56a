//! Group commit: completions that arrive together are written in one transaction, so the
//! completion rate is not bounded by one commit (and one fsync) per shard, with
//! `synchronous_commit` left on.

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use super::{ChargeOutcome, CompletionRecord, Store, StoreError};

/// The most completions written in one transaction.
pub const MAX_BATCH: usize = 512;

/// A batch's failure: its message, and whether the database was unreachable.
type Reply = oneshot::Sender<Result<ChargeOutcome, (String, bool)>>;

/// A handle to the committer task.
#[derive(Clone, Debug)]
pub struct GroupCommitter {
    tx: mpsc::Sender<(CompletionRecord, Reply)>,
}

impl GroupCommitter {
    /// Starts the committer task on the current runtime. It ends when every handle is gone.
    pub fn spawn<S: Store>(store: Arc<S>) -> Self {
        let (tx, mut rx) = mpsc::channel::<(CompletionRecord, Reply)>(4 * MAX_BATCH);
        tokio::spawn(async move {
            let mut batch: Vec<(CompletionRecord, Reply)> = Vec::with_capacity(MAX_BATCH);
            // Whatever queued while the last transaction committed goes in the next one.
            while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
                let (records, replies): (Vec<_>, Vec<_>) = batch.drain(..).unzip();
                match store.complete_batch(&records).await {
                    Ok(outcomes) => {
                        for (reply, outcome) in replies.into_iter().zip(outcomes) {
                            let _ = reply.send(Ok(outcome));
                        }
                    }
                    Err(e) => {
                        let failure = (e.to_string(), e.is_transient());
                        for reply in replies {
                            let _ = reply.send(Err(failure.clone()));
                        }
                    }
                }
            }
        });
        Self { tx }
    }

    /// Records one completion, batched with whatever else is waiting.
    pub async fn complete(&self, record: CompletionRecord) -> Result<ChargeOutcome, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send((record, reply))
            .await
            .map_err(|_| StoreError::Commit("the committer has stopped".into()))?;
        answer
            .await
            .map_err(|_| StoreError::Commit("the committer has stopped".into()))?
            .map_err(|(message, transient)| {
                if transient {
                    StoreError::Unavailable(message)
                } else {
                    StoreError::Commit(message)
                }
            })
    }
}
