//! Running one assigned shard end to end: fetch the model (cached by hash), read the shard's
//! records, run the task on a slot's ONNX Runtime session, write the output part in one put.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use infermesh_proto::{Assign, Completed, ErrorKind, task};
use ort::session::Session;
use serde_json::{Map, Value};

use crate::inference::embedding::Embedder;
use crate::inference::runtime::{SessionConfig, load_session};
use crate::inference::tensor::{self, InputBinding};
use crate::inference::{BatchControl, Origin, ShardError, parse_records};
use crate::io::cache::{CacheError, ModelCache, sha256_hex};
use crate::io::shard::records;
use crate::io::store::{Location, ObjectError, read_aligned};
use crate::metrics::{AgentMetrics, ShardResult};

/// Sessions kept per slot; one workload at a time is the common case, two covers a switch.
const MODELS_PER_SLOT: usize = 2;

/// What one slot holds between shards: its own sessions (`Session::run` takes `&mut self`, so
/// sessions are never shared between slots) and loaded tokenizers.
#[derive(Default)]
struct SlotState {
    sessions: Vec<(String, Session)>,
    embedders: HashMap<String, Arc<Embedder>>,
}

/// Runs shards on a fixed number of slots.
pub struct Runner {
    cache: ModelCache,
    config: SessionConfig,
    slots: Vec<Mutex<SlotState>>,
    free: tokio::sync::Mutex<Vec<usize>>,
    slot_freed: tokio::sync::Notify,
    /// Per slot, the models it has sessions for (kept apart from the slot state, which is
    /// moved out while a shard runs).
    loaded: Mutex<Vec<Vec<String>>>,
    metrics: Arc<AgentMetrics>,
}

fn object_error(kind: ErrorKind, e: ObjectError) -> ShardError {
    let retryable = e.is_transient();
    ShardError {
        kind,
        message: e.to_string(),
        retryable,
    }
}

impl Runner {
    /// A runner with `slots` slots, counting batches and shards in `metrics`.
    pub fn new(
        cache: ModelCache,
        config: SessionConfig,
        slots: usize,
        metrics: Arc<AgentMetrics>,
    ) -> Self {
        Self {
            cache,
            config,
            slots: (0..slots.max(1))
                .map(|_| Mutex::new(SlotState::default()))
                .collect(),
            free: tokio::sync::Mutex::new((0..slots.max(1)).rev().collect()),
            slot_freed: tokio::sync::Notify::new(),
            loaded: Mutex::new(vec![Vec::new(); slots.max(1)]),
            metrics,
        }
    }

    /// Number of slots.
    pub fn slots(&self) -> usize {
        self.slots.len()
    }

    /// sha256 of models with a live session on some slot.
    pub fn loaded_models(&self) -> Vec<String> {
        let all: BTreeSet<String> = self
            .loaded
            .lock()
            .map(|l| l.iter().flatten().cloned().collect())
            .unwrap_or_default();
        all.into_iter().collect()
    }

    /// sha256 of models in the node's cache.
    pub fn cached_models(&self) -> Vec<String> {
        self.cache.cached()
    }

    /// The device sessions run on (`cpu` or `cuda`).
    pub fn device(&self) -> &'static str {
        self.config.device()
    }

    async fn acquire(&self) -> usize {
        loop {
            let notified = self.slot_freed.notified();
            if let Some(i) = self.free.lock().await.pop() {
                return i;
            }
            notified.await;
        }
    }

    async fn release(&self, slot: usize) {
        self.free.lock().await.push(slot);
        self.slot_freed.notify_one();
    }

    /// Runs one shard; returns its completion report or why it failed.
    pub async fn run(
        &self,
        assign: &Assign,
        cancel: Arc<AtomicBool>,
    ) -> Result<Completed, ShardError> {
        let slot = self.acquire().await;
        let result = self.run_on(slot, assign, cancel).await;
        self.release(slot).await;
        match &result {
            Ok(_) => self.metrics.shard_finished(ShardResult::Completed),
            // A cancelled shard did not fail: the operator no longer wants it.
            Err(e) if e.kind == ErrorKind::Cancelled => {}
            Err(_) => self.metrics.shard_finished(ShardResult::Failed),
        }
        result
    }

    async fn run_on(
        &self,
        slot: usize,
        assign: &Assign,
        cancel: Arc<AtomicBool>,
    ) -> Result<Completed, ShardError> {
        let invalid = |m: &str| {
            ShardError::permanent(ErrorKind::Unspecified, format!("malformed assignment: {m}"))
        };
        let shard = assign.shard.clone().ok_or_else(|| invalid("no shard"))?;
        let model = assign.model.clone().ok_or_else(|| invalid("no model"))?;
        let task = assign.task.clone().ok_or_else(|| invalid("no task"))?;
        let input = assign
            .input
            .clone()
            .ok_or_else(|| invalid("no input range"))?;

        let expected = (!model.sha256.is_empty()).then_some(model.sha256.as_str());
        let (sha, model_path) =
            self.cache
                .model(&model.uri, expected)
                .await
                .map_err(|e| match e {
                    CacheError::Fetch(e) => {
                        let retryable = e.is_transient();
                        ShardError {
                            kind: ErrorKind::ModelLoad,
                            message: format!("model {}: {e}", model.uri),
                            retryable,
                        }
                    }
                    other => ShardError::permanent(ErrorKind::ModelLoad, other.to_string()),
                })?;

        let input_loc = Location::parse(&input.uri).map_err(|e| object_error(ErrorKind::Io, e))?;
        let (begin, data) = read_aligned(&input_loc, input.start, input.end, input.size)
            .await
            .map_err(|e| object_error(ErrorKind::Io, e))?;

        let embedder_src = match &task.kind {
            Some(task::Kind::TextEmbedding(te)) => {
                let key = format!(
                    "{}|{}|{}|{}|{}",
                    te.tokenizer_uri, te.text_field, te.max_length, te.normalize, te.output_name
                );
                let have = self.slots[slot]
                    .lock()
                    .map(|s| s.embedders.contains_key(&key))
                    .unwrap_or(false);
                let bytes = if have {
                    None
                } else {
                    let loc = Location::parse(&te.tokenizer_uri)
                        .map_err(|e| object_error(ErrorKind::TokenizerLoad, e))?;
                    Some(loc.get().await.map_err(|e| {
                        let retryable = e.is_transient();
                        ShardError {
                            kind: ErrorKind::TokenizerLoad,
                            message: format!("tokenizer {e}"),
                            retryable,
                        }
                    })?)
                };
                Some((key, bytes))
            }
            _ => None,
        };

        let started = Instant::now();
        let config = self.config.clone();
        let id_field = task.id_field.clone();
        let shard_index = shard.index;
        let input_uri = input_loc.uri().to_string();
        let batch = assign.batch_size.max(1) as usize;
        let metrics = self.metrics.clone();
        // The slot's state moves into the blocking thread and back, so no lock is held
        // across an await and inference never runs on the async workers.
        let mut state = std::mem::take(
            &mut *self.slots[slot]
                .lock()
                .map_err(|_| invalid("slot poisoned"))?,
        );
        let (state, outcome) = tokio::task::spawn_blocking(move || {
            let outcome = (|| -> Result<(Bytes, u64), ShardError> {
                ensure_session(&mut state, &sha, &model_path, &model.uri, &config)?;
                let origin = Origin {
                    uri: &input_uri,
                    shard: shard_index,
                };
                let parsed = parse_records(&origin, records(begin, &data))?;
                let control = BatchControl {
                    size: batch,
                    cancel: &cancel,
                    metrics: &metrics,
                };
                let outputs: Vec<RecordOutput> = match &task.kind {
                    Some(task::Kind::TextEmbedding(te)) => {
                        let (key, bytes) = embedder_src.unwrap_or_default();
                        let embedder = match (state.embedders.get(&key), bytes) {
                            (Some(e), _) => e.clone(),
                            (None, Some(bytes)) => {
                                let output_name =
                                    (!te.output_name.is_empty()).then(|| te.output_name.clone());
                                let e = Arc::new(Embedder::new(
                                    &bytes,
                                    &te.tokenizer_uri,
                                    &te.text_field,
                                    te.max_length.max(1) as usize,
                                    te.normalize,
                                    output_name,
                                )?);
                                state.embedders.insert(key, e.clone());
                                e
                            }
                            (None, None) => return Err(invalid("tokenizer not fetched")),
                        };
                        let encodings = embedder.encode(&origin, &parsed)?;
                        let vectors =
                            embedder.embed(session_mut(&mut state, &sha), &encodings, &control)?;
                        vectors.into_iter().map(RecordOutput::Embedding).collect()
                    }
                    Some(task::Kind::Tensor(t)) => {
                        let bindings: Vec<InputBinding> = t
                            .inputs
                            .iter()
                            .map(|i| InputBinding {
                                name: i.name.clone(),
                                field: if i.field.is_empty() {
                                    i.name.clone()
                                } else {
                                    i.field.clone()
                                },
                            })
                            .collect();
                        tensor::run(
                            session_mut(&mut state, &sha),
                            &origin,
                            &bindings,
                            &t.outputs,
                            &parsed,
                            &control,
                        )?
                        .into_iter()
                        .map(RecordOutput::Fields)
                        .collect()
                    }
                    None => return Err(invalid("task has no kind")),
                };
                let mut out = Vec::with_capacity(outputs.len() * 64);
                for (rec, output) in parsed.iter().zip(&outputs) {
                    write_line(&mut out, &id_field, rec.fields.get(&id_field), output)
                        .map_err(|e| invalid(&e.to_string()))?;
                }
                Ok((Bytes::from(out), parsed.len() as u64))
            })();
            (state, outcome)
        })
        .await
        .map_err(|e| {
            ShardError::transient(
                ErrorKind::Inference,
                format!("inference thread failed: {e}"),
            )
        })?;
        if let Ok(mut loaded) = self.loaded.lock() {
            loaded[slot] = state.sessions.iter().map(|(k, _)| k.clone()).collect();
        }
        if let Ok(mut guard) = self.slots[slot].lock() {
            *guard = state;
        }
        let (bytes, records) = outcome?;
        let compute_seconds = started.elapsed().as_secs_f64();

        let digest = sha256_hex(&bytes);
        let output_bytes = bytes.len() as u64;
        let out =
            Location::parse(&assign.output_uri).map_err(|e| object_error(ErrorKind::Io, e))?;
        out.put(bytes)
            .await
            .map_err(|e| object_error(ErrorKind::Io, e))?;
        Ok(Completed {
            shard: Some(shard),
            records,
            output_uri: out.uri().to_string(),
            sha256: digest,
            compute_seconds,
            device: self.device().to_string(),
            output_bytes,
        })
    }
}

/// What one record produced.
enum RecordOutput {
    /// A text embedding.
    Embedding(Vec<f32>),
    /// Named output tensors.
    Fields(Map<String, Value>),
}

/// Writes one output line: the record's id (when it has one), then its outputs. Embeddings
/// are written as f32 (the shortest text that reads back to the same f32), not widened to
/// f64, which halves the bytes of an embedding part.
fn write_line(
    out: &mut Vec<u8>,
    id_field: &str,
    id: Option<&Value>,
    output: &RecordOutput,
) -> serde_json::Result<()> {
    let mut first = true;
    let mut key = |out: &mut Vec<u8>, k: &str| -> serde_json::Result<()> {
        out.push(if first { b'{' } else { b',' });
        first = false;
        serde_json::to_writer(&mut *out, k)?;
        out.push(b':');
        Ok(())
    };
    if let Some(id) = id {
        key(out, id_field)?;
        serde_json::to_writer(&mut *out, id)?;
    }
    match output {
        RecordOutput::Embedding(v) => {
            key(out, "embedding")?;
            serde_json::to_writer(&mut *out, v)?;
        }
        RecordOutput::Fields(fields) => {
            for (k, v) in fields {
                key(out, k)?;
                serde_json::to_writer(&mut *out, v)?;
            }
        }
    }
    if first {
        out.push(b'{');
    }
    out.extend_from_slice(b"}\n");
    Ok(())
}

/// Makes sure the slot has a session for `sha` (last in its list), loading it and evicting the
/// least recently used one if not.
fn ensure_session(
    state: &mut SlotState,
    sha: &str,
    path: &std::path::Path,
    uri: &str,
    config: &SessionConfig,
) -> Result<(), ShardError> {
    if let Some(pos) = state.sessions.iter().position(|(k, _)| k == sha) {
        let entry = state.sessions.remove(pos);
        state.sessions.push(entry);
    } else {
        let session = load_session(path, config).map_err(|e| {
            ShardError::permanent(
                ErrorKind::ModelLoad,
                format!("model {uri} does not load: {e}"),
            )
        })?;
        if state.sessions.len() >= MODELS_PER_SLOT {
            state.sessions.remove(0);
        }
        state.sessions.push((sha.to_string(), session));
    }
    Ok(())
}

fn session_mut<'a>(state: &'a mut SlotState, sha: &str) -> &'a mut Session {
    // ensure_session ran first and left the session for `sha` last, so the list is not empty.
    let last = state.sessions.len() - 1;
    debug_assert_eq!(state.sessions[last].0, sha);
    &mut state.sessions[last].1
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn line(id: Option<Value>, output: RecordOutput) -> Value {
        let mut out = Vec::new();
        write_line(&mut out, "id", id.as_ref(), &output).expect("write");
        assert!(out.ends_with(b"}\n"));
        serde_json::from_slice(&out).expect("a JSON line")
    }

    #[test]
    fn output_lines_carry_the_id_then_the_outputs() {
        let v = line(
            Some(json!("doc-1")),
            RecordOutput::Embedding(vec![0.1, -2.5]),
        );
        assert_eq!(v, json!({"id": "doc-1", "embedding": [0.1, -2.5]}));
        let fields = Map::from_iter([
            ("y".to_string(), json!([1, 2])),
            ("s".to_string(), json!(3)),
        ]);
        assert_eq!(
            line(None, RecordOutput::Fields(fields)),
            json!({"y": [1, 2], "s": 3})
        );
        assert_eq!(line(None, RecordOutput::Fields(Map::new())), json!({}));
    }

    #[test]
    fn embeddings_are_written_as_short_f32() {
        let mut out = Vec::new();
        write_line(&mut out, "id", None, &RecordOutput::Embedding(vec![0.1])).expect("write");
        assert_eq!(out, b"{\"embedding\":[0.1]}\n");
    }
}
