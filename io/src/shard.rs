//! Record alignment of byte-range shards.
//!
//! The rule (`docs/architecture.md`, data plane): a shard `[start, end)` starts after the first newline at or after
//! its start offset (a shard at offset 0 starts at 0) and ends at the first newline at or
//! after its end offset (or at the end of the object). Two neighbouring shards look for the same newline, so every record
//! belongs to exactly one shard whatever the byte ranges are, and planning needs only the
//! object's size.

/// Where a shard's records lie in the object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Aligned {
    /// First byte of the shard's first record.
    pub begin: u64,
    /// One past the last byte (the trailing newline included) of its last record.
    pub end: u64,
}

/// Finds where the shard `[start, end)` begins, given the bytes of the object from `start`
/// on (at least up to and including the first newline at or after `start`, or to the end of
/// the object). Returns `None` when no newline follows `start`: the shard owns no record.
pub fn aligned_begin(start: u64, from_start: &[u8]) -> Option<u64> {
    if start == 0 {
        return Some(0);
    }
    memchr_newline(from_start).map(|i| start + i as u64 + 1)
}

/// Finds where the shard ends, given bytes of the object from `end` on: one past the first
/// newline at or after `end`; `size` when `end` is at the end of the object. `None` when the
/// bytes given hold no newline (the caller reads on, or, at the end of the object, uses `size`).
pub fn aligned_end(end: u64, size: u64, from_end: &[u8]) -> Option<u64> {
    if end >= size {
        return Some(size);
    }
    memchr_newline(from_end).map(|i| end + i as u64 + 1)
}

fn memchr_newline(bytes: &[u8]) -> Option<usize> {
    bytes.iter().position(|&b| b == b'\n')
}

/// Number of newlines in `bytes`: with the newlines before a shard's first byte, a line of the
/// shard becomes a line of the object.
pub fn count_newlines(bytes: &[u8]) -> u64 {
    bytes.iter().filter(|&&b| b == b'\n').count() as u64
}

/// The UTF-8 byte order mark some editors and exporters put at the start of a text file.
pub const UTF8_BOM: &[u8] = b"\xEF\xBB\xBF";

/// One record: its text (without the newline) and where it was.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Record<'a> {
    /// 1-based line number within the shard.
    pub line: u64,
    /// Byte offset of the record in the whole object.
    pub offset: u64,
    /// The line, without its newline (and without a trailing `\r`).
    pub text: &'a [u8],
}

/// Splits the aligned bytes of a shard (which begin at object offset `begin`) into records,
/// skipping blank lines. A UTF-8 byte order mark at the very start of the object (offset 0)
/// is not part of the first record (its offset is still that of its line, 0).
pub fn records(begin: u64, bytes: &[u8]) -> impl Iterator<Item = Record<'_>> {
    let mut offset = begin;
    bytes
        .split_inclusive(|&b| b == b'\n')
        .enumerate()
        .filter_map(move |(i, raw)| {
            let at = offset;
            offset += raw.len() as u64;
            let raw = match raw.strip_prefix(UTF8_BOM) {
                Some(rest) if at == 0 => rest,
                _ => raw,
            };
            let mut text = raw.strip_suffix(b"\n").unwrap_or(raw);
            text = text.strip_suffix(b"\r").unwrap_or(text);
            if text.iter().all(u8::is_ascii_whitespace) {
                return None;
            }
            Some(Record {
                line: i as u64 + 1,
                offset: at,
                text,
            })
        })
}

/// Aligns `[start, end)` on a whole object held in memory (tests and small inputs).
pub fn align_in_memory(data: &[u8], start: u64, end: u64) -> Option<Aligned> {
    let size = data.len() as u64;
    let begin = aligned_begin(start, &data[start.min(size) as usize..])?;
    // The slice reaches the end of the object, so no newline means the record runs to it.
    let end = aligned_end(end, size, &data[end.min(size) as usize..]).unwrap_or(size);
    (begin < end).then_some(Aligned { begin, end })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owned(data: &[u8], ranges: &[(u64, u64)]) -> Vec<String> {
        ranges
            .iter()
            .filter_map(|&(s, e)| align_in_memory(data, s, e))
            .flat_map(|a| {
                records(a.begin, &data[a.begin as usize..a.end as usize])
                    .map(|r| String::from_utf8_lossy(r.text).into_owned())
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    #[test]
    fn a_boundary_on_a_newline_gives_the_next_record_to_the_left_shard() {
        let data = b"aa\nbb\ncc\n";
        // Shard boundary at 3 (the first byte of "bb"): "bb" belongs to the first shard,
        // because it ends at the first newline at or after 3.
        assert_eq!(owned(data, &[(0, 3), (3, 9)]), ["aa", "bb", "cc"]);
        assert_eq!(owned(data, &[(0, 2), (2, 9)]), ["aa", "bb", "cc"]);
    }

    #[test]
    fn a_file_without_final_newline_keeps_its_last_record() {
        let data = b"aa\nbb";
        assert_eq!(owned(data, &[(0, 1), (1, 5)]), ["aa", "bb"]);
        assert_eq!(owned(data, &[(0, 4), (4, 5)]), ["aa", "bb"]);
    }

    #[test]
    fn a_byte_order_mark_at_the_start_of_the_object_is_skipped() {
        let data = b"\xEF\xBB\xBF{\"a\":1}\n{\"a\":2}\n";
        let recs: Vec<_> = records(0, data).collect();
        assert_eq!(recs.len(), 2);
        assert_eq!((recs[0].line, recs[0].offset), (1, 0));
        assert_eq!(recs[0].text, b"{\"a\":1}");
        // A BOM-only first line is blank.
        assert_eq!(records(0, b"\xEF\xBB\xBF\n{}\n").count(), 1);
        // Only at offset 0 of the object: elsewhere the bytes are the record's, left for the
        // JSON parser to refuse.
        let later: Vec<_> = records(10, b"\xEF\xBB\xBF{}\n").collect();
        assert_eq!(later[0].text, b"\xEF\xBB\xBF{}");
        let second_line: Vec<_> = records(0, b"{}\n\xEF\xBB\xBF{}\n").collect();
        assert_eq!(second_line[1].text, b"\xEF\xBB\xBF{}");
    }

    #[test]
    fn newlines_are_counted() {
        assert_eq!(count_newlines(b""), 0);
        assert_eq!(count_newlines(b"a\n\nb\r\nc"), 3);
    }

    #[test]
    fn line_numbers_and_offsets_are_reported() {
        let data = b"x\n\n{\"a\":1}\r\n";
        let recs: Vec<_> = records(100, data).collect();
        assert_eq!(recs.len(), 2);
        assert_eq!(
            (recs[1].line, recs[1].offset, recs[1].text),
            (3, 103, &b"{\"a\":1}"[..])
        );
    }
}
