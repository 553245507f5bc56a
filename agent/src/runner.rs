//! Running one assigned shard end to end: fetch the model (cached by hash), read the shard's
//! records, run the task on a slot's ONNX Runtime session, write the output part in one put.

use std::any::Any;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use bytes::Bytes;
use futures::FutureExt;
use infermesh_proto::{Assign, Completed, ErrorKind, task};
use ort::session::Session;
use serde_json::{Map, Value};

use crate::inference::embedding::Embedder;
use crate::inference::runtime::{SessionConfig, load_session};
use crate::inference::tensor::{self, InputBinding};
use crate::inference::{
    BatchControl, Origin, Parsed, PartKind, PartOrigin, ShardError, check_cancelled, parse_records,
};
use crate::io::cache::{CacheError, ModelCache, sha256_hex};
use crate::io::parts;
use crate::io::shard::{count_newlines, records};
use crate::io::store::{Location, ObjectError, read_aligned};
use crate::metrics::{AgentMetrics, ShardResult};
use infermesh_io::columnar;
use infermesh_io::{Credentials, Grant, Use};

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
    /// Models fetched and hashed here, by URI: the size and version (ETag) the URI had then,
    /// and the sha256 it hashed to. Under a grant a cached model is used only when the
    /// tenant's HEAD of its URI finds that very version.
    verified: Mutex<HashMap<String, (u64, String, String)>>,
}

fn object_error(kind: ErrorKind, e: ObjectError) -> ShardError {
    let retryable = e.is_transient();
    ShardError {
        kind,
        message: e.to_string(),
        retryable,
        record: None,
    }
}

/// Why reading the shard's input range failed. An input that changed since it was planned is
/// invalid input that no retry fixes (the workload must be planned again); a range outside
/// the planned size is an assignment no operator sends.
fn input_error(e: ObjectError) -> ShardError {
    match e {
        ObjectError::Changed { .. } | ObjectError::Replaced { .. } => {
            ShardError::permanent(ErrorKind::InvalidInput, e.to_string())
        }
        ObjectError::BadRange { .. } => {
            ShardError::permanent(ErrorKind::Unspecified, format!("malformed assignment: {e}"))
        }
        e => object_error(ErrorKind::Io, e),
    }
}

/// The failure reported for a shard whose work panicked. Retryable: a panic is a bug in the
/// agent or a library it calls, not a verdict on the input, so another attempt (elsewhere,
/// or after an upgrade) may well succeed, and `maxAttempts` bounds what it costs if not.
fn panicked(payload: &(dyn Any + Send)) -> ShardError {
    let what = payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into());
    ShardError::transient(
        ErrorKind::Inference,
        format!("the agent panicked running the shard: {what}"),
    )
}

/// Runs a shard's `work`, turning a panic anywhere in it into a failed shard, so that it is
/// reported and its slot given back instead of the task silently vanishing.
pub async fn catch_panic(
    work: impl Future<Output = Result<Completed, ShardError>>,
) -> Result<Completed, ShardError> {
    AssertUnwindSafe(work)
        .catch_unwind()
        .await
        .unwrap_or_else(|payload| Err(panicked(&*payload)))
}

/// The most input bytes read to find a bad record's line (a failure path only): past that
/// the message names the record by its byte offset alone.
const MAX_LINE_SCAN: u64 = 4 << 30;

/// Names a bad record by its line in the input: counts the newlines before the shard's first
/// byte `begin`, reading `[0, begin)` through `input`, for `file://` inputs only (on S3 or
/// HTTP that would download everything before the shard). Any other error, or a read that
/// fails, is returned as it is (naming the record by its byte offset).
async fn locate_record(e: ShardError, input: &Location, begin: u64) -> ShardError {
    const STEP: u64 = 8 << 20;
    if e.record.is_none() || !input.uri().starts_with("file://") || begin > MAX_LINE_SCAN {
        return e;
    }
    let mut newlines = 0;
    let mut at = 0;
    while at < begin {
        let to = (at + STEP).min(begin);
        match input.get_range(at, to).await {
            Ok(bytes) if !bytes.is_empty() => newlines += count_newlines(&bytes),
            _ => return e,
        }
        at = to;
    }
    e.at_file_line(newlines)
}

/// Records of a shard without a usable id, and ids seen more than once in it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct IdCheck {
    /// Records whose id field is absent or null.
    missing: u64,
    /// The first of them: (part, line within the shard, byte offset).
    first_missing: Option<(usize, u64, u64)>,
    /// Records whose id an earlier record of the shard had.
    duplicates: u64,
    /// The first of them: (part, line within the shard, byte offset, the id as JSON).
    first_duplicate: Option<(usize, u64, u64, String)>,
}

/// Counts the records of a shard without `id_field` (or with a null one) and those repeating
/// an id already seen in the shard (ids compare as JSON: `1` and `"1"` differ). Nothing is
/// counted when `id_field` is empty.
fn id_check(id_field: &str, parsed: &[Parsed]) -> IdCheck {
    let mut check = IdCheck::default();
    if id_field.is_empty() {
        return check;
    }
    let mut seen = HashSet::with_capacity(parsed.len());
    for rec in parsed {
        match rec.field(id_field) {
            None | Some(Value::Null) => {
                check.missing += 1;
                check
                    .first_missing
                    .get_or_insert((rec.part, rec.line, rec.offset));
            }
            Some(id) => {
                let key = id.to_string();
                if seen.contains(&key) {
                    check.duplicates += 1;
                    if check.first_duplicate.is_none() {
                        check.first_duplicate = Some((rec.part, rec.line, rec.offset, key));
                    }
                } else {
                    seen.insert(key);
                }
            }
        }
    }
    check
}

impl IdCheck {
    /// One message per problem found (none when there is none). Lines are the input's when
    /// `origin` knows the newlines before the shard, else the shard's, said so.
    fn messages(&self, origin: &Origin<'_>, id_field: &str) -> Vec<String> {
        let at = |part: usize, line: u64, offset: u64| {
            if !origin.parts.is_empty() {
                return origin.place(part, line, offset);
            }
            match origin.lines_before {
                Some(before) => format!("line {} (byte offset {offset})", before + line),
                None => format!("byte offset {offset} (line {line} of the shard)"),
            }
        };
        let (uri, shard) = (origin.uri, origin.shard);
        let uri = if origin.parts.is_empty() {
            uri
        } else {
            "the input"
        };
        let mut out = Vec::new();
        if let Some((part, line, offset)) = self.first_missing {
            let n = self.missing;
            out.push(format!(
                "{uri}: {n} record{} of shard {shard} {} no `{id_field}` field (or a null one), \
                 so {} output line{} cannot be joined back to the input; the first is at {}",
                plural(n),
                if n == 1 { "has" } else { "have" },
                if n == 1 { "its" } else { "their" },
                plural(n),
                at(part, line, offset),
            ));
        }
        if let Some((part, line, offset, id)) = &self.first_duplicate {
            let n = self.duplicates;
            out.push(format!(
                "{uri}: {n} record{} of shard {shard} repeat{} an `{id_field}` seen earlier in \
                 the shard; the first is at {}, `{id_field}` {id}",
                plural(n),
                if n == 1 { "s" } else { "" },
                at(*part, *line, *offset),
            ));
        }
        out
    }

    /// Logs [`IdCheck::messages`] as warnings.
    fn warn(&self, origin: &Origin<'_>, workload: &str, id_field: &str) {
        for message in self.messages(origin, id_field) {
            tracing::warn!(
                workload,
                shard = origin.shard,
                missing = self.missing,
                duplicates = self.duplicates,
                "{message}"
            );
        }
    }
}

fn plural(n: u64) -> &'static str {
    if n == 1 { "" } else { "s" }
}

/// Every location an Assign names, with what it is used for and the field it came from.
fn locations(assign: &Assign) -> Vec<(&'static str, &str, Use)> {
    let mut out = Vec::new();
    if let Some(m) = &assign.model {
        out.push(("model", m.uri.as_str(), Use::Read));
    }
    if let Some(task::Kind::TextEmbedding(te)) = assign.task.as_ref().and_then(|t| t.kind.as_ref())
    {
        out.push(("tokenizer", te.tokenizer_uri.as_str(), Use::Read));
    }
    if let Some(input) = &assign.input {
        if input.parts.is_empty() {
            out.push(("input", input.uri.as_str(), Use::Read));
        }
        for p in &input.parts {
            out.push(("input", p.uri.as_str(), Use::Read));
        }
    }
    out.push(("output", assign.output_uri.as_str(), Use::Write));
    out
}

/// Refuses an Assign naming a location outside the access grant it carries (none: no
/// restriction), so that a compromised operator path cannot make this agent read or write
/// anything else. Also refuses dot segments and, for `file://`, symbolic links out of a
/// prefix.
pub fn check_access(assign: &Assign) -> Result<(), ShardError> {
    let Some(access) = &assign.access else {
        return Ok(());
    };
    let grant = Grant {
        read: access.read.clone(),
        write: access.write.clone(),
    };
    for (field, uri, what) in locations(assign) {
        grant
            .check(field, uri, what)
            .map_err(|m| ShardError::permanent(ErrorKind::Forbidden, format!("refused: {m}")))?;
    }
    Ok(())
}

/// The credentials an Assign carries, if any.
pub(crate) fn credentials(assign: &Assign) -> Option<Credentials> {
    let c = assign.credentials.as_ref()?;
    let some = |s: &str| (!s.is_empty()).then(|| s.to_string());
    Some(Credentials {
        access_key_id: c.access_key_id.clone(),
        secret_access_key: c.secret_access_key.clone(),
        session_token: some(&c.session_token),
        region: some(&c.region),
        bearer_token: some(&c.bearer_token),
    })
}

/// Writes the shard's output part in one put, unless the operator cancelled the shard
/// meanwhile: a cancelled attempt leaves nothing behind. Returns the part's URI.
async fn put_part(
    output_uri: &str,
    bytes: Bytes,
    cancel: &AtomicBool,
) -> Result<String, ShardError> {
    let out = Location::parse(output_uri).map_err(|e| object_error(ErrorKind::Io, e))?;
    check_cancelled(cancel)?;
    out.put(bytes)
        .await
        .map_err(|e| object_error(ErrorKind::Io, e))?;
    Ok(out.uri().to_string())
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
            verified: Mutex::default(),
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
    ///
    /// An Assign that carries an access grant is refused (`Forbidden`, before anything is
    /// read or a slot taken) when any location it names falls outside it. One that carries
    /// credentials runs with them: every read and write of the shard uses them, and they are
    /// dropped when it ends.
    pub async fn run(
        &self,
        assign: &Assign,
        cancel: Arc<AtomicBool>,
    ) -> Result<Completed, ShardError> {
        check_access(assign)?;
        let work = self.on_slot(|slot| self.run_on(slot, assign, cancel));
        infermesh_io::access::scoped(credentials(assign), work).await
    }

    /// Runs `work` on a free slot and gives the slot back however the work ends: a panic in
    /// it fails the shard (see [`panicked`]) and leaves the slot empty (its sessions may be
    /// half updated), rather than losing the slot for good.
    async fn on_slot<F, W>(&self, work: F) -> Result<Completed, ShardError>
    where
        F: FnOnce(usize) -> W,
        W: Future<Output = Result<Completed, ShardError>>,
    {
        let slot = self.acquire().await;
        let result = AssertUnwindSafe(async move { work(slot).await })
            .catch_unwind()
            .await;
        let result = result.unwrap_or_else(|payload| {
            self.clear_slot(slot);
            Err(panicked(&*payload))
        });
        self.release(slot).await;
        match &result {
            Ok(_) => self.metrics.shard_finished(ShardResult::Completed),
            // A cancelled shard did not fail: the operator no longer wants it.
            Err(e) if e.kind == ErrorKind::Cancelled => {}
            Err(_) => self.metrics.shard_finished(ShardResult::Failed),
        }
        result
    }

    /// Drops what the slot holds (its sessions and tokenizers).
    fn clear_slot(&self, slot: usize) {
        *self.slots[slot]
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = SlotState::default();
        if let Ok(mut loaded) = self.loaded.lock() {
            loaded[slot].clear();
        }
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
        // Cancelled while it waited for the slot.
        check_cancelled(&cancel)?;

        // The cache is keyed by content and shared by every tenant: under a grant a cached
        // model is used only when this tenant's HEAD of the URI it names (with its keys)
        // finds the version that was hashed here; otherwise it is fetched and hashed again.
        let model_error = |e: ObjectError| ShardError {
            kind: ErrorKind::ModelLoad,
            message: format!("model {}: {e}", model.uri),
            retryable: e.is_transient(),
            record: None,
        };
        let seen = if assign.access.is_some() {
            let (size, version) = Location::parse(&model.uri)
                .map_err(model_error)?
                .facts()
                .await
                .map_err(model_error)?;
            Some((size, version))
        } else {
            None
        };
        let expected = (!model.sha256.is_empty()).then(|| model.sha256.clone());
        // Under a grant: the sha256 this URI hashed to here, if the tenant's HEAD found the
        // same version (and it is the one pinned, if any). It stands in for an unpinned
        // model's hash too.
        let verified = match &seen {
            Some((size, Some(version))) => self
                .verified
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .get(&model.uri)
                .filter(|(s, v, sha)| {
                    s == size && v == version && expected.as_ref().is_none_or(|e| e == sha)
                })
                .map(|(_, _, sha)| sha.clone()),
            _ => None,
        };
        let by_hash = seen.is_none() || verified.is_some();
        let pinned = verified.or(expected);
        let (sha, model_path) = self
            .cache
            .model_from(&model.uri, pinned.as_deref(), by_hash)
            .await
            .map_err(|e| match e {
                CacheError::Fetch(e) => model_error(e),
                other => ShardError::permanent(ErrorKind::ModelLoad, other.to_string()),
            })?;
        if let Some((size, Some(version))) = seen {
            self.verified
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(model.uri.clone(), (size, version, sha.clone()));
        }

        // One plain JSONL object (a byte range of it), or parts of files.
        let (input_loc, begin, data, raw_parts, headers) = if input.parts.is_empty() {
            let loc = Location::parse(&input.uri).map_err(|e| object_error(ErrorKind::Io, e))?;
            let (begin, data) = read_aligned(
                &loc,
                input.start,
                input.end,
                input.size,
                Some(input.version.as_str()).filter(|v| !v.is_empty()),
            )
            .await
            .map_err(input_error)?;
            (Some(loc), begin, data, Vec::new(), Vec::new())
        } else {
            let raw = parts::read(&input).await?;
            let headers = parts::csv_headers(&input, &raw).await?;
            (None, 0, Bytes::new(), raw, headers)
        };
        let part_origins: Vec<PartOrigin> = raw_parts.iter().map(|p| p.origin.clone()).collect();
        let part_begins: Vec<(String, u64)> = raw_parts
            .iter()
            .filter(|p| p.origin.kind == PartKind::Text)
            .map(|p| (p.origin.uri.clone(), p.begin))
            .collect();
        let output_parquet = match assign.output_format.as_str() {
            "" | "jsonl" => false,
            "parquet" => true,
            other => return Err(invalid(&format!("unknown output format `{other}`"))),
        };
        let output_zstd = assign.output_zstd;

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
                // A slot's tokenizer serves another tenant only once that tenant has shown
                // it can read the URI (a HEAD with its keys).
                if have && assign.access.is_some() {
                    Location::parse(&te.tokenizer_uri)
                        .map_err(|e| object_error(ErrorKind::TokenizerLoad, e))?
                        .size()
                        .await
                        .map_err(|e| object_error(ErrorKind::TokenizerLoad, e))?;
                }
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
                            record: None,
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
        let workload = shard.workload.clone();
        let input_uri = input_loc
            .as_ref()
            .map(|l| l.uri().to_string())
            .unwrap_or_default();
        let batch = assign.batch_size.max(1) as usize;
        let metrics = self.metrics.clone();
        // The slot's state moves into the blocking thread and back, so no lock is held
        // across an await and inference never runs on the async workers.
        let mut state = std::mem::take(
            &mut *self.slots[slot]
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        );
        let blocking_cancel = cancel.clone();
        let joined = tokio::task::spawn_blocking(move || {
            let cancel = blocking_cancel;
            let outcome = (|| -> Result<(Bytes, u64), ShardError> {
                let origin = Origin {
                    uri: &input_uri,
                    shard: shard_index,
                    // The operator does not send the newlines before a shard (yet): known
                    // only for the shard at the start; the rest are found on failure.
                    lines_before: (begin == 0).then_some(0),
                    parts: &part_origins,
                };
                // Before the model loads: a bad record fails the shard without it.
                let parsed = if raw_parts.is_empty() {
                    parse_records(&origin, records(begin, &data))?
                } else {
                    parts::parse(&input, raw_parts, &headers, &origin)?
                };
                ensure_session(&mut state, &sha, &model_path, &model.uri, &config)?;
                let control = BatchControl {
                    size: batch,
                    cancel: &cancel,
                    metrics: &metrics,
                };
                // The embedding dimension the model declares, for a Parquet part with no record.
                let mut declared_dim = None;
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
                        declared_dim = embedder.declared_dim(session_mut(&mut state, &sha));
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
                let bytes = if output_parquet {
                    let shape = columnar::PartShape { dim: declared_dim };
                    let names = match &task.kind {
                        Some(task::Kind::Tensor(t)) => Some(t.outputs.clone()),
                        _ => None,
                    };
                    parquet_part(&id_field, &parsed, outputs, names, shape, output_zstd)?
                } else {
                    let mut out = Vec::with_capacity(outputs.len() * 64);
                    for (rec, output) in parsed.iter().zip(&outputs) {
                        write_line(&mut out, &id_field, rec.field(&id_field), output)
                            .map_err(|e| invalid(&e.to_string()))?;
                    }
                    Bytes::from(out)
                };
                id_check(&id_field, &parsed).warn(&origin, &workload, &id_field);
                Ok((bytes, parsed.len() as u64))
            })();
            (state, outcome)
        })
        .await;
        let (state, outcome) = match joined {
            Ok(done) => done,
            // The slot's sessions went down with the thread: the slot starts afresh.
            Err(e) => {
                self.clear_slot(slot);
                return Err(match e.try_into_panic() {
                    Ok(payload) => panicked(&*payload),
                    Err(e) => ShardError::transient(
                        ErrorKind::Inference,
                        format!("inference thread failed: {e}"),
                    ),
                });
            }
        };
        if let Ok(mut loaded) = self.loaded.lock() {
            loaded[slot] = state.sessions.iter().map(|(k, _)| k.clone()).collect();
        }
        if let Ok(mut guard) = self.slots[slot].lock() {
            *guard = state;
        }
        let (bytes, records) = match outcome {
            Ok(done) => done,
            Err(e) => {
                return Err(match (&input_loc, &e.record) {
                    (Some(loc), _) => locate_record(e, loc, begin).await,
                    (None, Some(at)) => {
                        let found = part_begins.iter().find(|(uri, _)| *uri == at.uri);
                        match (found, Location::parse(&at.uri)) {
                            (Some(&(_, begin)), Ok(loc)) => locate_record(e, &loc, begin).await,
                            _ => e,
                        }
                    }
                    (None, None) => e,
                });
            }
        };
        let compute_seconds = started.elapsed().as_secs_f64();

        let digest = sha256_hex(&bytes);
        let output_bytes = bytes.len() as u64;
        let output_uri = put_part(&assign.output_uri, bytes, &cancel).await?;
        Ok(Completed {
            shard: Some(shard),
            records,
            output_uri,
            sha256: digest,
            compute_seconds,
            device: self.device().to_string(),
            output_bytes,
        })
    }
}

/// The part as Parquet: the ids, then the embedding or each output tensor (flattened to
/// float32; see `infermesh_io::columnar::write_part`).
fn parquet_part(
    id_field: &str,
    parsed: &[Parsed],
    outputs: Vec<RecordOutput>,
    tensor_outputs: Option<Vec<String>>,
    shape: columnar::PartShape,
    zstd: bool,
) -> Result<Bytes, ShardError> {
    let ids: Vec<Option<&Value>> = parsed.iter().map(|r| r.field(id_field)).collect();
    let mut embeddings = Vec::new();
    let mut tensors: Vec<(String, Vec<Vec<f32>>)> = Vec::new();
    for output in outputs {
        match output {
            RecordOutput::Embedding(v) => embeddings.push(v),
            RecordOutput::Fields(fields) => {
                for (k, v) in fields {
                    let mut flat = Vec::new();
                    flatten_f32(&v, &mut flat);
                    match tensors.iter_mut().find(|(name, _)| *name == k) {
                        Some((_, rows)) => rows.push(flat),
                        None => tensors.push((k, vec![flat])),
                    }
                }
            }
        }
    }
    let columns = match tensor_outputs {
        None => columnar::PartColumns::Embeddings(embeddings),
        Some(named) => {
            // A part with no record still has the named outputs' columns.
            for name in named {
                if !tensors.iter().any(|(n, _)| *n == name) {
                    tensors.push((name, Vec::new()));
                }
            }
            columnar::PartColumns::Tensors(tensors)
        }
    };
    columnar::write_part_shaped(id_field, &ids, columns, shape, zstd).map_err(|e| {
        ShardError::permanent(ErrorKind::Io, format!("cannot write the Parquet part: {e}"))
    })
}

/// The numbers of a (nested) JSON array, in order, as float32.
fn flatten_f32(v: &Value, out: &mut Vec<f32>) {
    match v {
        Value::Array(items) => items.iter().for_each(|i| flatten_f32(i, out)),
        Value::Number(n) => out.push(n.as_f64().unwrap_or(f64::NAN) as f32),
        Value::Bool(b) => out.push(f32::from(u8::from(*b))),
        _ => {}
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
    use infermesh_proto::{InputRange, Model, ShardRef, Task};
    use serde_json::json;
    use std::time::Duration;

    /// A runner with `slots` slots and its cache under `dir`. Nothing here loads ONNX Runtime:
    /// the shards these tests run end before a session is built.
    fn runner(dir: &std::path::Path, slots: usize) -> Runner {
        let config = SessionConfig {
            intra_op_threads: 1,
            providers: vec!["cpu".into()],
            require_gpu: false,
        };
        let cache = ModelCache::new(dir.join("cache")).expect("cache");
        Runner::new(cache, config, slots, Arc::new(AgentMetrics::new()))
    }

    /// An assignment of `[start, end)` of `input`, planned at `size` bytes, with a model file
    /// under `dir` (any bytes: it is only fetched and hashed before these shards end).
    fn assign(dir: &std::path::Path, input: &str, start: u64, end: u64, size: u64) -> Assign {
        let model = dir.join("model.onnx");
        std::fs::write(&model, b"not loaded").expect("model");
        Assign {
            shard: Some(ShardRef {
                workload: "default/w".into(),
                index: 1,
                attempt: 1,
            }),
            model: Some(Model {
                uri: format!("file://{}", model.display()),
                sha256: String::new(),
            }),
            task: Some(Task {
                kind: Some(task::Kind::Tensor(infermesh_proto::Tensor::default())),
                id_field: "id".into(),
            }),
            input: Some(InputRange {
                uri: input.to_string(),
                format: "jsonl".into(),
                start,
                end,
                size,
                version: String::new(),
                ..Default::default()
            }),
            output_uri: format!("file://{}/out/part-00001.jsonl", dir.display()),
            batch_size: 4,
            ..Default::default()
        }
    }

    /// Under a grant: an Assign naming anything outside it is refused before a slot is taken
    /// or a byte read; and another tenant's model, in the cache by its sha256, is not handed
    /// to a tenant that pins that sha256 but names a URI of its own (the model is fetched
    /// from that URI and hashed, and the hash does not match).
    #[tokio::test]
    async fn a_grant_is_enforced_and_the_shared_cache_serves_no_other_tenants_model() {
        let dir = tempfile::tempdir().expect("tmp");
        let d = dir.path();
        for t in ["team-a", "team-b"] {
            std::fs::create_dir_all(d.join(t)).expect("mkdir");
        }
        std::fs::write(d.join("team-a/m.onnx"), b"team-a's model").expect("model");
        std::fs::write(d.join("team-b/m.onnx"), b"team-b's model").expect("model");
        std::fs::write(d.join("team-b/in.jsonl"), b"{\"id\":1,\"x\":[1.0]}\n").expect("in");
        let runner = runner(d, 1);
        let a_model = format!("file://{}/team-a/m.onnx", d.display());
        let (a_sha, _) = runner.cache.model(&a_model, None).await.expect("cached");
        let input = format!("file://{}/team-b/in.jsonl", d.display());
        let mut a = assign(d, &input, 0, 20, 20);
        a.access = Some(infermesh_proto::Access {
            read: vec![format!("file://{}/team-b/", d.display())],
            write: vec![format!("file://{}/team-b/out/", d.display())],
        });
        a.output_uri = format!("file://{}/team-b/out/part-00001.jsonl", d.display());
        // Outside the grant: team-a's model, or an output beside the write prefix.
        let mut outside = a.clone();
        outside.model = Some(Model {
            uri: a_model.clone(),
            sha256: String::new(),
        });
        let e = runner
            .run(&outside, Arc::new(AtomicBool::new(false)))
            .await
            .expect_err("forbidden");
        assert_eq!(e.kind, ErrorKind::Forbidden, "{e:?}");
        assert!(!e.retryable && e.message.contains("model"), "{}", e.message);
        let mut beside = a.clone();
        beside.output_uri = format!("file://{}/team-b/part-00001.jsonl", d.display());
        let e = runner
            .run(&beside, Arc::new(AtomicBool::new(false)))
            .await
            .expect_err("forbidden");
        assert_eq!(e.kind, ErrorKind::Forbidden, "{e:?}");
        // Inside, but pinned to team-a's model: fetched from team-b's URI, which differs.
        a.model = Some(Model {
            uri: format!("file://{}/team-b/m.onnx", d.display()),
            sha256: a_sha.clone(),
        });
        let e = runner
            .run(&a, Arc::new(AtomicBool::new(false)))
            .await
            .expect_err("not team-a's model");
        assert_eq!(e.kind, ErrorKind::ModelLoad, "{e:?}");
        assert!(e.message.contains(&a_sha), "{}", e.message);
        assert!(!d.join("team-b/out").exists(), "nothing was written");
    }

    /// An input truncated after planning fails its shard as invalid input that no retry
    /// fixes, naming both sizes, and the slot is free for the next shard.
    #[tokio::test]
    async fn an_input_that_shrank_since_planning_fails_the_shard_as_invalid_input() {
        let dir = tempfile::tempdir().expect("tmp");
        let data: Vec<u8> = (0..50)
            .flat_map(|i| format!("{{\"id\":{i},\"x\":[1.0,2.0]}}\n").into_bytes())
            .collect();
        let planned = data.len() as u64;
        let path = dir.path().join("in.jsonl");
        std::fs::write(&path, &data[..data.len() - 7]).expect("input");
        let uri = format!("file://{}", path.display());
        let runner = runner(dir.path(), 1);
        let cancel = Arc::new(AtomicBool::new(false));
        let last = assign(dir.path(), &uri, planned / 2, planned, planned);
        let err = runner
            .run(&last, cancel.clone())
            .await
            .expect_err("the input changed");
        assert_eq!(err.kind, ErrorKind::InvalidInput, "{}", err.message);
        assert!(!err.retryable, "{}", err.message);
        assert_eq!(
            err.message,
            format!(
                "input {uri} changed since it was planned: {planned} bytes planned, {} found; \
                 resubmit the workload",
                planned - 7
            )
        );
        // The one slot was given back: the next shard gets it (and fails the same way).
        let again = tokio::time::timeout(Duration::from_secs(10), runner.run(&last, cancel))
            .await
            .expect("the slot was freed");
        assert_eq!(again.expect_err("changed").kind, ErrorKind::InvalidInput);
        // A range past the planned size (no operator sends one) fails the shard, no panic.
        let outside = assign(dir.path(), &uri, planned + 5, planned + 9, planned);
        let err = runner
            .run(&outside, Arc::new(AtomicBool::new(false)))
            .await
            .expect_err("bad range");
        assert_eq!((err.kind, err.retryable), (ErrorKind::Unspecified, false));
        assert!(
            err.message.starts_with("malformed assignment: "),
            "{}",
            err.message
        );
    }

    /// A shard whose work panics fails as an inference error that names the panic, and its
    /// slot is given back (emptied) for the next shard.
    #[tokio::test]
    async fn a_panicking_shard_fails_and_frees_its_slot() {
        let dir = tempfile::tempdir().expect("tmp");
        let runner = runner(dir.path(), 1);
        let err = runner
            .on_slot(|_| async { panic!("boom in shard 7") })
            .await
            .expect_err("panicked");
        assert_eq!(err.kind, ErrorKind::Inference);
        assert!(err.retryable);
        assert!(err.message.contains("panicked"), "{}", err.message);
        assert!(err.message.contains("boom in shard 7"), "{}", err.message);
        // A formatted message (a String payload) is kept too.
        let err = catch_panic(async { panic!("shard {} broke", 9) })
            .await
            .expect_err("panicked");
        assert!(
            err.message
                .ends_with("panicked running the shard: shard 9 broke"),
            "{}",
            err.message
        );
        // The one slot is free again.
        let next = tokio::time::timeout(
            Duration::from_secs(10),
            runner.on_slot(|slot| async move {
                Err(ShardError::permanent(
                    ErrorKind::Unspecified,
                    format!("ran on slot {slot}"),
                ))
            }),
        )
        .await
        .expect("the slot was freed");
        assert_eq!(next.expect_err("ran").message, "ran on slot 0");
    }

    /// Once the operator has cancelled a shard, its output part is not written.
    #[tokio::test]
    async fn a_cancelled_shard_writes_no_output_part() {
        let dir = tempfile::tempdir().expect("tmp");
        let part = dir.path().join("part-00001.jsonl");
        let uri = format!("file://{}", part.display());
        let cancel = AtomicBool::new(true);
        let err = put_part(&uri, Bytes::from_static(b"{}\n"), &cancel)
            .await
            .expect_err("cancelled");
        assert_eq!(err.kind, ErrorKind::Cancelled);
        assert!(!part.exists(), "a cancelled shard wrote its part");
        cancel.store(false, std::sync::atomic::Ordering::Relaxed);
        let written = put_part(&uri, Bytes::from_static(b"{}\n"), &cancel)
            .await
            .expect("written");
        assert_eq!(written, uri);
        assert_eq!(std::fs::read(&part).expect("part"), b"{}\n");
    }

    /// A shard cancelled while it waited for a slot ends before it fetches anything.
    #[tokio::test]
    async fn a_shard_cancelled_before_it_starts_does_nothing() {
        let dir = tempfile::tempdir().expect("tmp");
        let runner = runner(dir.path(), 1);
        let missing = format!("file://{}/missing.jsonl", dir.path().display());
        let mut a = assign(dir.path(), &missing, 0, 10, 10);
        a.model = Some(Model {
            uri: format!("file://{}/missing.onnx", dir.path().display()),
            sha256: String::new(),
        });
        let err = runner
            .run(&a, Arc::new(AtomicBool::new(true)))
            .await
            .expect_err("cancelled");
        assert_eq!(err.kind, ErrorKind::Cancelled, "{}", err.message);
        assert!(runner.cached_models().is_empty());
    }

    /// A bad record in a shard that does not start the input is named by its line in the
    /// input file (not in the shard) and its byte offset, before any model is loaded.
    #[tokio::test]
    async fn a_bad_record_in_a_later_shard_is_named_by_its_line_in_the_input_file() {
        let dir = tempfile::tempdir().expect("tmp");
        let lines: Vec<String> = (1..=200)
            .map(|i| {
                if i == 150 {
                    "{\"id\": 150, \"x\": [1.0,".to_string()
                } else {
                    format!("{{\"id\":{i},\"x\":[1.0,2.0]}}")
                }
            })
            .collect();
        let data = lines.iter().map(|l| format!("{l}\n")).collect::<String>();
        let offset: usize = lines[..149].iter().map(|l| l.len() + 1).sum();
        let path = dir.path().join("in.jsonl");
        std::fs::write(&path, &data).expect("input");
        let uri = format!("file://{}", path.display());
        let size = data.len() as u64;
        let runner = runner(dir.path(), 1);
        // A shard starting 20 records before the bad one: its line 21 is the file's line 150.
        let start = offset as u64 - 20 * 24 - 5;
        let shard = assign(dir.path(), &uri, start, offset as u64 + 5, size);
        let err = runner
            .run(&shard, Arc::new(AtomicBool::new(false)))
            .await
            .expect_err("a bad record");
        assert_eq!(err.kind, ErrorKind::InvalidInput, "{}", err.message);
        assert_eq!(
            err.message,
            format!(
                "{uri} line 150 (byte offset {offset}): not valid JSON (column 22): \
                 EOF while parsing a value"
            )
        );

        // Elsewhere than in a local file the line would cost reading all before the shard:
        // the byte offset alone.
        let remote = Location::parse("http://127.0.0.1:9/in.jsonl").expect("uri");
        let origin = Origin {
            uri: remote.uri(),
            shard: 2,
            lines_before: None,
            parts: &[],
        };
        let begin = offset as u64 - 10;
        let bad = parse_records(&origin, records(begin, b"{}\nnot json\n")).expect_err("bad");
        let kept = locate_record(bad.clone(), &remote, begin).await;
        assert_eq!(kept, bad);
        assert!(
            kept.message.starts_with(&format!(
                "http://127.0.0.1:9/in.jsonl byte offset {}: not valid JSON",
                begin + 3
            )),
            "{}",
            kept.message
        );
    }

    fn parsed(lines: &[&str]) -> Vec<Parsed> {
        let origin = Origin {
            uri: "u",
            shard: 0,
            lines_before: Some(0),
            parts: &[],
        };
        let data = lines.iter().map(|l| format!("{l}\n")).collect::<String>();
        parse_records(&origin, records(100, data.as_bytes())).expect("records")
    }

    #[test]
    fn records_without_an_id_and_repeated_ids_are_counted() {
        let recs = parsed(&[
            r#"{"id": 1}"#,
            r#"{"x": 1}"#,
            r#"{"id": "1"}"#,
            r#"{"id": 1}"#,
            r#"{"id": null}"#,
            r#"{"id": {"a": [1]}}"#,
            r#"{"id": {"a": [1]}}"#,
            r#"{"id": 1}"#,
        ]);
        let check = id_check("id", &recs);
        assert_eq!(check.missing, 2, "{check:?}");
        // Line 2 of the shard, after the 10 bytes of line 1.
        assert_eq!(check.first_missing, Some((0, 2, 110)));
        // `1` twice more and the object once; `"1"` is another id than `1`.
        assert_eq!(check.duplicates, 3, "{check:?}");
        assert_eq!(check.first_duplicate, Some((0, 4, 131, "1".to_string())));
        // Another id field: all of them lack it.
        let other = id_check("key", &recs);
        assert_eq!((other.missing, other.duplicates), (8, 0));
        assert_eq!(other.first_missing, Some((0, 1, 100)));
        // No id field asked for: nothing to count.
        assert_eq!(id_check("", &recs), IdCheck::default());
        // Unique ids: nothing to warn about.
        let clean = id_check("id", &parsed(&[r#"{"id": 1}"#, r#"{"id": 2}"#]));
        assert_eq!(clean, IdCheck::default());
        assert!(clean.messages(&origin(None), "id").is_empty());

        // The warnings name the field, the counts and the first example.
        let [missing, repeated] = check
            .messages(&origin(None), "id")
            .try_into()
            .expect("two messages");
        assert_eq!(
            missing,
            "file:///in.jsonl: 2 records of shard 3 have no `id` field (or a null one), so \
             their output lines cannot be joined back to the input; the first is at byte \
             offset 110 (line 2 of the shard)"
        );
        assert_eq!(
            repeated,
            "file:///in.jsonl: 3 records of shard 3 repeat an `id` seen earlier in the shard; \
             the first is at byte offset 131 (line 4 of the shard), `id` 1"
        );
        // With the newlines before the shard known, lines are the input's.
        let one = id_check("id", &recs[..2]).messages(&origin(Some(40)), "id");
        assert_eq!(
            one,
            [
                "file:///in.jsonl: 1 record of shard 3 has no `id` field (or a null one), so its \
              output line cannot be joined back to the input; the first is at line 42 (byte \
              offset 110)"
            ]
        );
    }

    fn origin(lines_before: Option<u64>) -> Origin<'static> {
        Origin {
            uri: "file:///in.jsonl",
            shard: 3,
            lines_before,
            parts: &[],
        }
    }

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
