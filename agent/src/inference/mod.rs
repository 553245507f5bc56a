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
    /// The bad record, when the message names one only by its byte offset: the runner can
    /// then find its line in the input (see [`ShardError::at_file_line`]).
    pub record: Option<RecordAt>,
}

/// Where a bad record is, for a message that does not yet name its line in the input.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordAt {
    /// The input URI.
    pub uri: String,
    /// 1-based line within the shard.
    pub line_in_shard: u64,
    /// Byte offset of the record in the input.
    pub offset: u64,
    /// What is wrong with it.
    pub what: String,
}

impl ShardError {
    /// A failure that another attempt would repeat.
    pub fn permanent(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            retryable: false,
            record: None,
        }
    }

    /// A failure another attempt may not see.
    pub fn transient(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            retryable: true,
            record: None,
        }
    }

    /// The same error naming its record by line of the input, given the number of newlines
    /// in the input before the shard's first byte. Unchanged when it names no record.
    pub fn at_file_line(mut self, lines_before: u64) -> Self {
        if let Some(at) = self.record.take() {
            self.message = record_message(
                &at.uri,
                Some(lines_before + at.line_in_shard),
                at.offset,
                &at.what,
            );
        }
        self
    }
}

/// `file:///in.jsonl line 150 (byte offset 20182): what`, or, the line unknown,
/// `s3://b/in.jsonl byte offset 20182: what`.
fn record_message(uri: &str, line: Option<u64>, offset: u64, what: &str) -> String {
    match line {
        Some(line) => format!("{uri} line {line} (byte offset {offset}): {what}"),
        None => format!("{uri} byte offset {offset}: {what}"),
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
    /// Newlines in the input before the shard's first byte, when known without reading the
    /// input from its start: 0 for a shard that starts at offset 0. Then a bad record is
    /// named by its line in the input; otherwise by its byte offset, and the runner finds the
    /// line where that is cheap (see [`ShardError::at_file_line`]).
    pub lines_before: Option<u64>,
}

impl Origin<'_> {
    /// An `InvalidInput` error naming the record's line in the input (when known) and its
    /// byte offset.
    pub fn invalid(&self, rec: &Parsed, what: impl std::fmt::Display) -> ShardError {
        self.invalid_at(rec.line, rec.offset, what)
    }

    fn invalid_at(&self, line: u64, offset: u64, what: impl std::fmt::Display) -> ShardError {
        let what = what.to_string();
        let file_line = self.lines_before.map(|before| before + line);
        let mut err = ShardError::permanent(
            ErrorKind::InvalidInput,
            record_message(self.uri, file_line, offset, &what),
        );
        if file_line.is_none() {
            err.record = Some(RecordAt {
                uri: self.uri.to_string(),
                line_in_shard: line,
                offset,
                what,
            });
        }
        err
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
            Err(e) => Err(origin.invalid_at(r.line, r.offset, not_json(&e))),
        })
        .collect()
}

/// `not valid JSON (column 7): expected value`: a record is one line, so serde_json's
/// `at line 1 column 7` would only be mistaken for a line of the input.
fn not_json(e: &serde_json::Error) -> String {
    let full = e.to_string();
    let at = format!(" at line {} column {}", e.line(), e.column());
    match full.strip_suffix(&at) {
        Some(what) if e.column() > 0 => format!("not valid JSON (column {}): {what}", e.column()),
        Some(what) => format!("not valid JSON: {what}"),
        None => format!("not valid JSON: {full}"),
    }
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
    fn a_bad_line_of_the_first_shard_is_named_by_its_line_in_the_input() {
        let data = b"{\"text\":\"a\"}\nnot json\n";
        let origin = Origin {
            uri: "file:///in.jsonl",
            shard: 0,
            lines_before: Some(0),
        };
        let err = parse_records(&origin, records(0, data)).expect_err("bad line");
        assert_eq!(err.kind, ErrorKind::InvalidInput);
        assert!(!err.retryable);
        assert!(
            err.message.starts_with(
                "file:///in.jsonl line 2 (byte offset 13): not valid JSON (column 2): "
            ),
            "{}",
            err.message
        );
        assert_eq!(err.record, None, "nothing left to find");
    }

    #[test]
    fn a_bad_line_of_a_later_shard_is_named_by_its_byte_offset_until_its_line_is_known() {
        let data = b"{\"text\":\"a\"}\nnot json\n";
        let origin = Origin {
            uri: "s3://bucket/in.jsonl",
            shard: 4,
            lines_before: None,
        };
        let err = parse_records(&origin, records(1000, data)).expect_err("bad line");
        assert!(
            err.message
                .starts_with("s3://bucket/in.jsonl byte offset 1013: not valid JSON (column 2): "),
            "{}",
            err.message
        );
        assert_eq!(
            err.message,
            "s3://bucket/in.jsonl byte offset 1013: not valid JSON (column 2): expected ident"
        );
        // With the newlines before the shard (98: the shard's line 2 is the input's 100).
        let located = err.at_file_line(98);
        assert!(
            located.message.starts_with(
                "s3://bucket/in.jsonl line 100 (byte offset 1013): not valid JSON (column 2): "
            ),
            "{}",
            located.message
        );
        assert_eq!(located.record, None);
        // An error about no record stays as it is.
        let other = ShardError::permanent(ErrorKind::Io, "disk on fire").at_file_line(7);
        assert_eq!(other.message, "disk on fire");
    }

    #[test]
    fn a_byte_order_mark_at_the_start_of_the_input_is_not_an_error() {
        let origin = Origin {
            uri: "u",
            shard: 0,
            lines_before: Some(0),
        };
        let parsed = parse_records(&origin, records(0, b"\xEF\xBB\xBF{\"id\":1}\n{\"id\":2}\n"))
            .expect("a BOM is skipped");
        assert_eq!(parsed.len(), 2);
        assert_eq!(parsed[0].fields["id"], 1);
    }

    #[test]
    fn a_line_that_is_not_an_object_is_refused() {
        let origin = Origin {
            uri: "u",
            shard: 0,
            lines_before: Some(0),
        };
        let err = parse_records(&origin, records(0, b"[1,2]\n")).expect_err("array");
        assert!(
            err.message
                .contains("expected a JSON object, found an array"),
            "{}",
            err.message
        );
    }
}
