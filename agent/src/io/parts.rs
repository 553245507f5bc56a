//! A shard made of parts (several files, CSV, Parquet, compressed files): reading what each
//! part holds (I/O, on the async side) and turning it into records (CPU, on the slot's
//! blocking thread).

use bytes::Bytes;
use infermesh_io::columnar::{self, Row};
use infermesh_io::dataset::{Compression, Format, RowGroup};
use infermesh_io::decode;
use infermesh_io::shard::records;
use infermesh_io::store::{Location, ObjectError, read_aligned};
use infermesh_proto::{ErrorKind, InputPart, InputRange};

use crate::inference::{Origin, Parsed, PartKind, PartOrigin, ShardError, parse_records_in};

/// The longest CSV header line read to name the columns of a range that starts later in
/// its file.
const MAX_HEADER: u64 = 1 << 20;

/// What one part holds, read but not yet parsed.
pub struct RawPart {
    /// Where its records come from.
    pub origin: PartOrigin,
    /// Its first byte in the file (text ranges; 0 otherwise).
    pub begin: u64,
    body: Body,
}

enum Body {
    /// Aligned bytes of a text file.
    Text(Bytes),
    /// A whole compressed text file.
    Compressed(Bytes, Compression),
    /// Parquet rows.
    Rows(Vec<Row>),
}

fn malformed(m: impl std::fmt::Display) -> ShardError {
    ShardError::permanent(ErrorKind::Unspecified, format!("malformed assignment: {m}"))
}

fn object_error(e: ObjectError) -> ShardError {
    match e {
        ObjectError::Changed { .. } | ObjectError::Replaced { .. } => {
            ShardError::permanent(ErrorKind::InvalidInput, e.to_string())
        }
        ObjectError::BadRange { .. } => malformed(e),
        e => ShardError {
            kind: ErrorKind::Io,
            retryable: e.is_transient(),
            message: e.to_string(),
            record: None,
        },
    }
}

/// The input's format, from the assignment.
pub fn format_of(input: &InputRange) -> Result<Format, ShardError> {
    Format::parse(&input.format)
        .ok_or_else(|| malformed(format!("unknown input format `{}`", input.format)))
}

/// The CSV delimiter, from the assignment.
pub fn delimiter_of(input: &InputRange) -> Result<u8, ShardError> {
    match input.delimiter.as_bytes() {
        [] => Ok(b','),
        [d] if d.is_ascii() && !matches!(d, b'"' | b'\n' | b'\r') => Ok(*d),
        _ => Err(malformed(format!(
            "delimiter `{}`",
            input.delimiter.escape_default()
        ))),
    }
}

/// Reads every part of the shard.
pub async fn read(input: &InputRange) -> Result<Vec<RawPart>, ShardError> {
    let format = format_of(input)?;
    let mut out = Vec::with_capacity(input.parts.len());
    for part in &input.parts {
        out.push(read_one(format, part, &input.columns).await?);
    }
    Ok(out)
}

async fn read_one(
    format: Format,
    part: &InputPart,
    columns: &[String],
) -> Result<RawPart, ShardError> {
    let loc = Location::parse(&part.uri).map_err(object_error)?;
    let uri = loc.uri().to_string();
    let version = Some(part.version.as_str()).filter(|v| !v.is_empty());
    let compression = Compression::parse(&part.compression)
        .ok_or_else(|| malformed(format!("unknown compression `{}`", part.compression)))?;
    if format == Format::Parquet {
        if part.row_group_start >= part.row_group_end {
            return Err(malformed(format!("{uri}: no row group")));
        }
        let planned: Vec<RowGroup> = part
            .row_groups
            .iter()
            .map(|g| RowGroup {
                bytes: g.bytes,
                rows: g.rows,
            })
            .collect();
        let rows = columnar::read_rows(
            &loc,
            part.size,
            part.row_group_start,
            part.row_group_end,
            &planned,
            columns,
        )
        .await
        .map_err(|e| ShardError {
            kind: if e.transient {
                ErrorKind::Io
            } else {
                ErrorKind::InvalidInput
            },
            message: format!("{uri}: {}", e.message),
            retryable: e.transient,
            record: None,
        })?;
        return Ok(RawPart {
            origin: PartOrigin {
                uri,
                lines_before: None,
                kind: PartKind::Rows,
            },
            begin: 0,
            body: Body::Rows(rows),
        });
    }
    if compression != Compression::None {
        // Read whole: exactly the planned object.
        let (begin, data) = read_aligned(&loc, 0, part.size, part.size, version)
            .await
            .map_err(object_error)?;
        debug_assert_eq!(begin, 0);
        return Ok(RawPart {
            origin: PartOrigin {
                uri,
                lines_before: Some(0),
                kind: PartKind::Expanded,
            },
            begin: 0,
            body: Body::Compressed(data, compression),
        });
    }
    let (begin, data) = read_aligned(&loc, part.start, part.end, part.size, version)
        .await
        .map_err(object_error)?;
    Ok(RawPart {
        origin: PartOrigin {
            uri,
            lines_before: (begin == 0).then_some(0),
            kind: PartKind::Text,
        },
        begin,
        body: Body::Text(data),
    })
}

/// The header line of a CSV file, for a range that starts after it.
pub async fn csv_header(uri: &str, size: u64, delimiter: u8) -> Result<Vec<String>, ShardError> {
    let loc = Location::parse(uri).map_err(object_error)?;
    // At most MAX_HEADER bytes are read, whatever the file holds.
    let head = loc
        .get_range(0, size.min(MAX_HEADER + 1))
        .await
        .map_err(object_error)?;
    let line = match head.iter().position(|&b| b == b'\n') {
        Some(i) => &head[..i],
        None if (head.len() as u64) < size || head.len() as u64 > MAX_HEADER => {
            return Err(ShardError::permanent(
                ErrorKind::InvalidInput,
                format!(
                    "{uri}: the header line is longer than {} KiB",
                    MAX_HEADER >> 10
                ),
            ));
        }
        None => &head[..],
    };
    decode::csv_header(line, delimiter)
        .map_err(|e| ShardError::permanent(ErrorKind::InvalidInput, format!("{uri}: {e}")))
}

/// Headers of the CSV parts whose range starts after the header line (read on the async
/// side, once per part).
pub async fn csv_headers(
    input: &InputRange,
    parts: &[RawPart],
) -> Result<Vec<Option<Vec<String>>>, ShardError> {
    let mut out = Vec::with_capacity(parts.len());
    if format_of(input)? != Format::Csv {
        out.resize(parts.len(), None);
        return Ok(out);
    }
    let delimiter = delimiter_of(input)?;
    for (raw, part) in parts.iter().zip(&input.parts) {
        out.push(match raw.body {
            Body::Text(_) if raw.begin > 0 => {
                Some(csv_header(&part.uri, part.size, delimiter).await?)
            }
            _ => None,
        });
    }
    Ok(out)
}

/// Turns the parts into records (on a blocking thread: decompression and parsing are CPU).
pub fn parse(
    input: &InputRange,
    parts: Vec<RawPart>,
    headers: &[Option<Vec<String>>],
    origin: &Origin<'_>,
) -> Result<Vec<Parsed>, ShardError> {
    let format = format_of(input)?;
    let delimiter = delimiter_of(input)?;
    let mut out = Vec::new();
    // What the shard's compressed files may still expand to, together.
    let mut budget = decode::MAX_EXPANDED;
    for (i, part) in parts.into_iter().enumerate() {
        let uri = part.origin.uri.clone();
        let (text, begin, whole) = match part.body {
            Body::Rows(rows) => {
                out.extend(rows.into_iter().map(|r| Parsed {
                    line: r.row,
                    offset: u64::from(r.row_group),
                    fields: r.fields,
                    part: i,
                }));
                continue;
            }
            Body::Text(data) => (data.to_vec(), part.begin, false),
            Body::Compressed(data, compression) => {
                let expanded = decode::decompress(&data, compression, budget).map_err(|e| {
                    ShardError::permanent(ErrorKind::InvalidInput, format!("{uri}: {e}"))
                })?;
                budget -= expanded.len() as u64;
                (expanded, 0, true)
            }
        };
        match format {
            Format::Jsonl | Format::Parquet => {
                let parsed = parse_records_in(origin, i, records(begin, &text))?;
                out.extend(parsed);
            }
            Format::Csv => {
                let header = match headers.get(i).cloned().flatten() {
                    Some(h) => h,
                    None => {
                        let first = text.split(|&b| b == b'\n').next().unwrap_or_default();
                        decode::csv_header(first, delimiter).map_err(|e| {
                            ShardError::permanent(ErrorKind::InvalidInput, format!("{uri}: {e}"))
                        })?
                    }
                };
                let recs = decode::csv_records(&header, begin, &text, delimiter, whole)
                    .map_err(|e| origin.invalid_in(i, e.line, e.offset, e.what))?;
                out.extend(recs.into_iter().map(|r| Parsed {
                    line: r.line,
                    offset: r.offset,
                    fields: r.fields,
                    part: i,
                }));
            }
        }
    }
    Ok(out)
}
