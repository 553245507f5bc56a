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
    /// 1-based line within the shard (a Parquet row: its row number in the file).
    pub line: u64,
    /// Byte offset in the input object (a Parquet row: its row group).
    pub offset: u64,
    /// The JSON object.
    pub fields: Map<String, Value>,
    /// Which of [`Origin::parts`] it came from (0 when the shard has one input object).
    pub part: usize,
}

impl Parsed {
    /// The value at `path`: the field of that name, else, for a dotted path (`doc.body`),
    /// the value reached through nested objects.
    pub fn field(&self, path: &str) -> Option<&Value> {
        field_at(&self.fields, path)
    }
}

/// The value at `path` in `fields`: the field named `path` itself, else the dotted path
/// (`doc.body`) followed through nested objects.
pub fn field_at<'a>(fields: &'a Map<String, Value>, path: &str) -> Option<&'a Value> {
    if let Some(v) = fields.get(path) {
        return Some(v);
    }
    let mut segments = path.split('.');
    let mut at = fields.get(segments.next()?)?;
    for seg in segments {
        at = at.as_object()?.get(seg)?;
    }
    Some(at)
}

/// Where the records of one part of a shard come from, for error messages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartOrigin {
    /// The file.
    pub uri: String,
    /// Newlines in the file before the part's first byte, when known (text).
    pub lines_before: Option<u64>,
    /// How its records are numbered.
    pub kind: PartKind,
}

/// How a part's records are located.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PartKind {
    /// A byte range of an uncompressed text file: lines and byte offsets of the file.
    Text,
    /// A whole compressed file: lines and offsets of its expanded text.
    Expanded,
    /// Parquet: `line` is the row's number in the file, `offset` its row group.
    Rows,
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
    /// A shard of several files, CSV, Parquet or compressed input: where each part's records
    /// come from (`uri` and `lines_before` above are then unused). Empty: one object.
    pub parts: &'a [PartOrigin],
}

impl Origin<'_> {
    /// An `InvalidInput` error naming the record's line in the input (when known) and its
    /// byte offset.
    pub fn invalid(&self, rec: &Parsed, what: impl std::fmt::Display) -> ShardError {
        self.invalid_in(rec.part, rec.line, rec.offset, what)
    }

    /// Where record `(line, offset)` of part `part` is, in words:
    /// `file:///in.jsonl line 150 (byte offset 20182)`,
    /// `s3://b/x.parquet row group 3 (row 7 of the file)`.
    pub fn place(&self, part: usize, line: u64, offset: u64) -> String {
        let (uri, lines_before, kind) = self.source(part);
        match (kind, lines_before) {
            (PartKind::Rows, _) => format!("{uri} row group {offset} (row {line} of the file)"),
            (PartKind::Expanded, _) => {
                format!("{uri} line {line} (byte offset {offset} of the expanded text)")
            }
            (PartKind::Text, Some(before)) => {
                format!("{uri} line {} (byte offset {offset})", before + line)
            }
            (PartKind::Text, None) => format!("{uri} byte offset {offset}"),
        }
    }

    fn source(&self, part: usize) -> (&str, Option<u64>, PartKind) {
        match self.parts.get(part) {
            Some(p) => (&p.uri, p.lines_before, p.kind),
            None => (self.uri, self.lines_before, PartKind::Text),
        }
    }

    /// An `InvalidInput` error for record `(line, offset)` of part `part`.
    pub fn invalid_in(
        &self,
        part: usize,
        line: u64,
        offset: u64,
        what: impl std::fmt::Display,
    ) -> ShardError {
        let what = what.to_string();
        let (uri, lines_before, kind) = self.source(part);
        let mut err = ShardError::permanent(
            ErrorKind::InvalidInput,
            format!("{}: {what}", self.place(part, line, offset)),
        );
        if kind == PartKind::Text && lines_before.is_none() {
            err.record = Some(RecordAt {
                uri: uri.to_string(),
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
    parse_records_in(origin, 0, records)
}

/// [`parse_records`] for part `part` of a shard of several parts.
pub fn parse_records_in<'a>(
    origin: &Origin<'_>,
    part: usize,
    records: impl Iterator<Item = Record<'a>>,
) -> Result<Vec<Parsed>, ShardError> {
    records
        .map(|r| match serde_json::from_slice::<Value>(r.text) {
            Ok(Value::Object(fields)) => Ok(Parsed {
                line: r.line,
                offset: r.offset,
                fields,
                part,
            }),
            Ok(other) => Err(origin.invalid_in(
                part,
                r.line,
                r.offset,
                format!("expected a JSON object, found {}", json_kind(&other)),
            )),
            Err(e) => Err(origin.invalid_in(part, r.line, r.offset, not_json(&e))),
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
            parts: &[],
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
            parts: &[],
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
            parts: &[],
        };
        let parsed = parse_records(&origin, records(0, b"\xEF\xBB\xBF{\"id\":1}\n{\"id\":2}\n"))
            .expect("a BOM is skipped");
        assert_eq!(parsed.len(), 2);
        assert_eq!(parsed[0].fields["id"], 1);
    }

    #[test]
    fn dotted_paths_reach_into_nested_objects() {
        let fields: Map<String, Value> =
            serde_json::from_str(r#"{"doc":{"body":"b","meta":{"lang":"en"}},"a.b":1}"#)
                .expect("json");
        assert_eq!(field_at(&fields, "doc.body"), Some(&Value::from("b")));
        assert_eq!(field_at(&fields, "doc.meta.lang"), Some(&Value::from("en")));
        // A field whose name has the dot wins over the path.
        assert_eq!(field_at(&fields, "a.b"), Some(&Value::from(1)));
        assert_eq!(field_at(&fields, "doc.missing"), None);
        assert_eq!(field_at(&fields, "doc.body.deeper"), None);
    }

    #[test]
    fn records_of_parts_are_named_by_their_file() {
        let parts = [
            PartOrigin {
                uri: "s3://b/a.parquet".into(),
                lines_before: None,
                kind: PartKind::Rows,
            },
            PartOrigin {
                uri: "s3://b/c.jsonl.gz".into(),
                lines_before: Some(0),
                kind: PartKind::Expanded,
            },
            PartOrigin {
                uri: "file:///d/e.csv".into(),
                lines_before: None,
                kind: PartKind::Text,
            },
        ];
        let origin = Origin {
            uri: "",
            shard: 3,
            lines_before: None,
            parts: &parts,
        };
        let e = origin.invalid_in(0, 7, 2, "no `text`");
        assert_eq!(
            e.message,
            "s3://b/a.parquet row group 2 (row 7 of the file): no `text`"
        );
        assert_eq!(e.record, None);
        let e = origin.invalid_in(1, 3, 40, "bad");
        assert_eq!(
            e.message,
            "s3://b/c.jsonl.gz line 3 (byte offset 40 of the expanded text): bad"
        );
        let e = origin.invalid_in(2, 2, 900, "bad");
        assert_eq!(e.message, "file:///d/e.csv byte offset 900: bad");
        assert_eq!(e.record.expect("to locate").uri, "file:///d/e.csv");
    }

    #[test]
    fn a_line_that_is_not_an_object_is_refused() {
        let origin = Origin {
            uri: "u",
            shard: 0,
            lines_before: Some(0),
            parts: &[],
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
