//! Text inputs other than plain JSONL: gzip and Zstandard files (read whole), and CSV.

use std::io::Read;

use serde_json::{Map, Value};

use crate::dataset::Compression;

/// The most bytes the compressed files of one shard may expand to, together: a shard is held
/// in memory, and a "zip bomb" must fail the shard, not the agent and its other slots.
pub const MAX_EXPANDED: u64 = 1 << 30;

/// Expands a whole compressed file, to at most `limit` bytes (what is left of the shard's
/// [`MAX_EXPANDED`]). gzip may hold several members (`cat a.gz b.gz`), Zstandard several
/// frames; all are read. A corrupt or truncated stream fails with where it broke.
pub fn decompress(data: &[u8], compression: Compression, limit: u64) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(data.len().saturating_mul(4).min(64 << 20));
    let result = match compression {
        Compression::None => return Ok(data.to_vec()),
        Compression::Gzip => flate2::read::MultiGzDecoder::new(data)
            .take(limit.saturating_add(1))
            .read_to_end(&mut out),
        Compression::Zstd => match zstd::stream::read::Decoder::new(data) {
            Ok(d) => d.take(limit.saturating_add(1)).read_to_end(&mut out),
            Err(e) => Err(e),
        },
    };
    match result {
        Ok(_) if out.len() as u64 > limit => Err(format!(
            "expands past the {} MiB a shard's compressed files may expand to together; split \
             it into smaller files",
            MAX_EXPANDED >> 20
        )),
        Ok(_) => Ok(out),
        Err(e) => Err(format!(
            "corrupt {} data after {} expanded bytes: {e}",
            compression.as_str(),
            out.len()
        )),
    }
}

/// A CSV record: where it is and its fields by column name.
#[derive(Clone, Debug, PartialEq)]
pub struct CsvRecord {
    /// 1-based line of the record within the bytes given.
    pub line: u64,
    /// Byte offset of the record in the file.
    pub offset: u64,
    /// Column name -> value (text as it is; empty cells are empty strings).
    pub fields: Map<String, Value>,
}

/// A bad CSV record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CsvError {
    /// 1-based line within the bytes given.
    pub line: u64,
    /// Byte offset in the file.
    pub offset: u64,
    /// What is wrong.
    pub what: String,
}

fn reader(data: &[u8], delimiter: u8) -> csv::Reader<&[u8]> {
    csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .delimiter(delimiter)
        .from_reader(data)
}

/// The column names of a CSV header line (a UTF-8 byte order mark before it is dropped).
pub fn csv_header(line: &[u8], delimiter: u8) -> Result<Vec<String>, String> {
    let line = line.strip_prefix(crate::shard::UTF8_BOM).unwrap_or(line);
    let mut r = reader(line, delimiter);
    let mut rec = csv::StringRecord::new();
    match r.read_record(&mut rec) {
        Ok(true) => {}
        Ok(false) => return Err("has no header line naming its columns".into()),
        Err(e) => return Err(format!("header line: {e}")),
    }
    let names: Vec<String> = rec.iter().map(|s| s.trim().to_string()).collect();
    if let Some(empty) = names.iter().position(String::is_empty) {
        return Err(format!("header line: column {} has no name", empty + 1));
    }
    for (i, n) in names.iter().enumerate() {
        if names[..i].contains(n) {
            return Err(format!("header line: column `{n}` is named twice"));
        }
    }
    Ok(names)
}

/// Parses CSV records from `data`, which starts at byte `begin` of its file. `header` names
/// the columns; when `begin` is 0 the first line is the header itself and is skipped. Blank
/// lines are skipped. Every record must have as many fields as the header. When `whole` is
/// false (a byte range of an uncompressed file, cut at newlines) a field may not hold a line
/// break: the planner cut the file at newlines, so a quoted field spanning lines would be
/// split between shards; such a record is refused rather than read as two.
pub fn csv_records(
    header: &[String],
    begin: u64,
    data: &[u8],
    delimiter: u8,
    whole: bool,
) -> Result<Vec<CsvRecord>, CsvError> {
    let mut r = reader(data, delimiter);
    let mut rec = csv::ByteRecord::new();
    let mut out = Vec::new();
    let mut first = begin == 0;
    loop {
        match r.read_byte_record(&mut rec) {
            Ok(false) => break,
            Ok(true) => {}
            Err(e) => {
                let pos = e
                    .position()
                    .cloned()
                    .unwrap_or_else(|| r.position().clone());
                return Err(CsvError {
                    line: pos.line(),
                    offset: begin + pos.byte(),
                    what: format!("not valid CSV: {e}"),
                });
            }
        }
        // The record's own start: the reader's position may still be before blank lines it
        // skipped.
        let pos = rec
            .position()
            .cloned()
            .unwrap_or_else(|| r.position().clone());
        let (mut line, mut at) = (pos.line(), pos.byte() as usize);
        while let Some(&b) = data.get(at).filter(|&&b| b == b'\n' || b == b'\r') {
            if b == b'\n' {
                line += 1;
            }
            at += 1;
        }
        let err = |what: String| CsvError {
            line,
            offset: begin + at as u64,
            what,
        };
        if first {
            first = false;
            continue;
        }
        if rec.len() == 1 && rec[0].iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        if rec.len() != header.len() {
            return Err(err(format!(
                "has {} fields, the header names {} columns",
                rec.len(),
                header.len()
            )));
        }
        let mut fields = Map::with_capacity(header.len());
        for (name, raw) in header.iter().zip(rec.iter()) {
            if !whole && raw.iter().any(|&b| b == b'\n' || b == b'\r') {
                return Err(err(format!(
                    "column `{name}` holds a line break; an uncompressed CSV is split at \
                     newlines, so its fields may not span lines (compress the file to have \
                     it read whole, or use JSONL or Parquet)"
                )));
            }
            let text = std::str::from_utf8(raw)
                .map_err(|_| err(format!("column `{name}` is not valid UTF-8")))?;
            fields.insert(name.clone(), Value::String(text.to_string()));
        }
        out.push(CsvRecord {
            line,
            offset: begin + at as u64,
            fields,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn gzip_members_and_zstd_frames_are_all_read() {
        let mut gz = Vec::new();
        for part in [&b"a\n"[..], b"b\n"] {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(part).expect("gz");
            gz.extend(e.finish().expect("gz"));
        }
        assert_eq!(
            decompress(&gz, Compression::Gzip, MAX_EXPANDED).expect("gzip"),
            b"a\nb\n"
        );
        // Past the shard's budget: refused, not held.
        let bomb = zstd::encode_all(&vec![b'x'; 1 << 20][..], 19).expect("zstd");
        let err = decompress(&bomb, Compression::Zstd, 1000).expect_err("over the limit");
        assert!(err.contains("expands past"), "{err}");
        let mut zs = zstd::encode_all(&b"x\n"[..], 1).expect("zstd");
        zs.extend(zstd::encode_all(&b"y\n"[..], 1).expect("zstd"));
        assert_eq!(
            decompress(&zs, Compression::Zstd, MAX_EXPANDED).expect("zstd"),
            b"x\ny\n"
        );
    }

    #[test]
    fn a_corrupt_stream_says_where_it_broke() {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(&[b'z'; 10_000]).expect("gz");
        let mut gz = e.finish().expect("gz");
        let n = gz.len();
        gz[n / 2] ^= 0xff;
        gz.truncate(n - 4);
        let err = decompress(&gz, Compression::Gzip, MAX_EXPANDED).expect_err("corrupt");
        assert!(err.starts_with("corrupt gzip data"), "{err}");
        assert!(decompress(b"not zstd", Compression::Zstd, MAX_EXPANDED).is_err());
    }

    #[test]
    fn csv_records_follow_the_header() {
        let header = csv_header(b"\xEF\xBB\xBFid,text\n", b',').expect("header");
        assert_eq!(header, ["id", "text"]);
        let data = b"id,text\n1,\"hello, world\"\n\n2,bye\n";
        let recs = csv_records(&header, 0, data, b',', false).expect("records");
        assert_eq!(recs.len(), 2);
        assert_eq!(recs[0].fields["text"], Value::from("hello, world"));
        assert_eq!((recs[1].line, recs[1].offset), (4, 26));
        // A range that starts later has no header line in it.
        let later = csv_records(&header, 100, b"3,x\n", b',', false).expect("records");
        assert_eq!(later[0].fields["id"], Value::from("3"));
        assert_eq!(later[0].offset, 100);
    }

    #[test]
    fn bad_csv_records_are_named() {
        let header = vec!["id".to_string(), "text".to_string()];
        let e = csv_records(&header, 0, b"id,text\n1,a\n2\n", b',', false).expect_err("short");
        assert_eq!(e.line, 3);
        assert!(e.what.contains("1 fields"), "{}", e.what);
        let e = csv_records(&header, 0, b"id,text\n1,\"two\nlines\"\n", b',', false)
            .expect_err("line break");
        assert!(e.what.contains("line break"), "{}", e.what);
        // Read whole (a compressed file), the quoted line break is kept.
        let whole =
            csv_records(&header, 0, b"id,text\n1,\"two\nlines\"\n", b',', true).expect("whole");
        assert_eq!(whole[0].fields["text"], Value::from("two\nlines"));
        assert!(csv_header(b"a,,b\n", b',').is_err());
        assert!(csv_header(b"a,a\n", b',').is_err());
        let tsv = csv_header(b"id\ttext\n", b'\t').expect("tsv");
        assert_eq!(tsv.len(), 2);
    }
}
