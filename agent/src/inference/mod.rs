//! Running a shard's records through a model: the two tasks and what they share.

pub mod embedding;
pub mod runtime;
pub mod tensor;

use std::sync::atomic::{AtomicBool, Ordering};

use infermesh_proto::ErrorKind;
use serde_json::{Map, Value};

use crate::io::shard::Record;
use crate::metrics::AgentMetrics;

/// Why a shard failed, as reported to the operator.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct ShardError {
    /// The kind, for the operator's reason and metrics.
    pub kind: ErrorKind,
    /// A message naming the problem (file, line, field).
    pub message: String,
    /// Whether another attempt could succeed.
    pub retryable: bool,
}

impl ShardError {
    /// A failure that another attempt would repeat.
    pub fn permanent(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            retryable: false,
        }
    }

    /// A failure another attempt may not see.
    pub fn transient(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            retryable: true,
        }
    }
}

/// One input record, parsed.
#[derive(Clone, Debug)]
pub struct Parsed {
    /// 1-based line within the shard.
    pub line: u64,
    /// Byte offset in the input object.
    pub offset: u64,
    /// The JSON object.
    pub fields: Map<String, Value>,
}

/// Where a shard's records come from, for error messages.
#[derive(Clone, Debug)]
pub struct Origin<'a> {
    /// Input URI.
    pub uri: &'a str,
    /// Shard index.
    pub shard: u32,
}

impl Origin<'_> {
    /// An `InvalidInput` error naming the record's line and offset.
    pub fn invalid(&self, rec: &Parsed, what: impl std::fmt::Display) -> ShardError {
        self.invalid_at(rec.line, rec.offset, what)
    }

    fn invalid_at(&self, line: u64, offset: u64, what: impl std::fmt::Display) -> ShardError {
        ShardError::permanent(
            ErrorKind::InvalidInput,
            format!(
                "{}: shard {} line {} (byte offset {}): {what}",
                self.uri, self.shard, line, offset
            ),
        )
    }
}

/// Parses each record as a JSON object. The first line that is not one fails the shard with
/// its line number.
pub fn parse_records<'a>(
    origin: &Origin<'_>,
    records: impl Iterator<Item = Record<'a>>,
) -> Result<Vec<Parsed>, ShardError> {
    records
        .map(|r| match serde_json::from_slice::<Value>(r.text) {
            Ok(Value::Object(fields)) => Ok(Parsed {
                line: r.line,
                offset: r.offset,
                fields,
            }),
            Ok(other) => Err(origin.invalid_at(
                r.line,
                r.offset,
                format!("expected a JSON object, found {}", json_kind(&other)),
            )),
            Err(e) => Err(origin.invalid_at(r.line, r.offset, format!("not valid JSON: {e}"))),
        })
        .collect()
}

/// The JSON type of a value, for messages.
pub fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// An ONNX Runtime error during a run: retrying on another node may help (out of memory on
/// a busy GPU), so it is retryable and counts against `maxAttempts`.
pub fn inference_error(e: impl std::fmt::Display) -> ShardError {
    ShardError::transient(ErrorKind::Inference, format!("ONNX Runtime failed: {e}"))
}

/// Batches of at most `batch` indices of `order`.
pub fn batches(order: &[usize], batch: usize) -> impl Iterator<Item = &[usize]> {
    order.chunks(batch.max(1))
}

/// How a task runs a shard's records: the batch size, the operator's cancel flag (checked
/// between batches) and the metrics each batch run is counted in.
#[derive(Clone, Copy, Debug)]
pub struct BatchControl<'a> {
    /// Records per batch (at least 1).
    pub size: usize,
    /// Set when the operator cancels the shard.
    pub cancel: &'a AtomicBool,
    /// Where each batch's latency and size go.
    pub metrics: &'a AgentMetrics,
}

impl BatchControl<'_> {
    /// A `Cancelled` error once the operator has cancelled the shard.
    pub fn check_cancelled(&self) -> Result<(), ShardError> {
        check_cancelled(self.cancel)
    }
}

/// A `Cancelled` error once `cancel` (the operator's cancel flag of a shard) is set.
pub fn check_cancelled(cancel: &AtomicBool) -> Result<(), ShardError> {
    if cancel.load(Ordering::Relaxed) {
        return Err(ShardError::permanent(
            ErrorKind::Cancelled,
            "cancelled by the operator",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::shard::records;

    #[test]
    fn a_line_that_is_not_json_fails_with_its_line_number() {
        let data = b"{\"text\":\"a\"}\nnot json\n";
        let origin = Origin {
            uri: "file:///in.jsonl",
            shard: 4,
        };
        let err = parse_records(&origin, records(1000, data)).expect_err("bad line");
        assert_eq!(err.kind, ErrorKind::InvalidInput);
        assert!(!err.retryable);
        assert!(
            err.message.contains("shard 4 line 2 (byte offset 1013)"),
            "{}",
            err.message
        );
        assert!(err.message.contains("not valid JSON"), "{}", err.message);
    }

    #[test]
    fn a_line_that_is_not_an_object_is_refused() {
        let origin = Origin { uri: "u", shard: 0 };
        let err = parse_records(&origin, records(0, b"[1,2]\n")).expect_err("array");
        assert!(
            err.message
                .contains("expected a JSON object, found an array"),
            "{}",
            err.message
        );
    }
}
