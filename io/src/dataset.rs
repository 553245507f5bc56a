//! Datasets: what a workload's input URI names (one object, a prefix of objects, or a glob),
//! in which record format and compression, and how its files are laid end to end so that a
//! shard is a range over them.
//!
//! Every file gets a span in one "virtual" byte space, in the order of its URI:
//! - an uncompressed JSONL or CSV file spans its size and can be cut anywhere: the records of
//!   a cut range are found by the newline rule of [`crate::shard`], file by file;
//! - a compressed file spans its size but is one unit: it is read whole, by one shard;
//! - a Parquet file spans its row groups' compressed sizes, each row group one unit.
//!
//! A unit belongs to the shard whose range holds the unit's first virtual byte, and the
//! planner moves every cut that falls inside a unit to the nearer end of it, so shards are
//! whole units and no shard is empty of them. Planning needs only sizes and (for Parquet)
//! the footers, never the data.

use std::sync::Arc;

use futures::{StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};

use crate::store::{Location, ObjectError};

/// Record formats.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// One JSON object per line.
    #[default]
    Jsonl,
    /// Comma-separated values with a header line naming the columns.
    Csv,
    /// Apache Parquet, read by row group.
    Parquet,
}

impl Format {
    /// `jsonl`, `csv` or `parquet`, as the protocol carries it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Jsonl => "jsonl",
            Self::Csv => "csv",
            Self::Parquet => "parquet",
        }
    }

    /// The format named `s` (`""` is JSONL, the protocol's default).
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "" | "jsonl" => Some(Self::Jsonl),
            "csv" => Some(Self::Csv),
            "parquet" => Some(Self::Parquet),
            _ => None,
        }
    }
}

/// Whole-file compression of a text input.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// Plain text, cut into byte ranges.
    #[default]
    None,
    /// gzip (RFC 1952), any number of members, as `gzip` and `pigz` write them.
    Gzip,
    /// Zstandard, any number of frames.
    Zstd,
}

impl Compression {
    /// `none`, `gzip` or `zstd`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Gzip => "gzip",
            Self::Zstd => "zstd",
        }
    }

    /// The compression named `s` (`""` is none).
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "" | "none" => Some(Self::None),
            "gzip" => Some(Self::Gzip),
            "zstd" => Some(Self::Zstd),
            _ => None,
        }
    }

    /// What a file's name says: `.gz`/`.gzip` gzip, `.zst`/`.zstd` Zstandard, else none.
    pub fn from_name(uri: &str) -> Self {
        let name = uri.rsplit('/').next().unwrap_or(uri).to_ascii_lowercase();
        if name.ends_with(".gz") || name.ends_with(".gzip") {
            Self::Gzip
        } else if name.ends_with(".zst") || name.ends_with(".zstd") {
            Self::Zstd
        } else {
            Self::None
        }
    }

    fn is_none(&self) -> bool {
        *self == Self::None
    }
}

/// One row group of a Parquet file, from its footer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RowGroup {
    /// Its compressed size in bytes (its span; at least 1).
    pub bytes: u64,
    /// Its rows.
    pub rows: u64,
}

/// One file of a dataset.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataFile {
    /// Its URI.
    pub uri: String,
    /// Its size in bytes when the dataset was resolved.
    pub size: u64,
    /// Its version (ETag) then, where the store names one: reads ask for exactly it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// How a text file is compressed.
    #[serde(default, skip_serializing_if = "Compression::is_none")]
    pub compression: Compression,
    /// A Parquet file's row groups.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub row_groups: Vec<RowGroup>,
}

/// The files of a workload's input, in order, and their format. The files are fixed once
/// the dataset is built (their layout is computed once, on first use).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Dataset {
    /// The record format of every file.
    pub format: Format,
    /// The files, sorted by URI.
    pub files: Vec<DataFile>,
    /// Where each file starts in the virtual byte space, then the total: computed once (an
    /// Assign and a Completed each ask for a shard's pieces), never stored.
    #[serde(skip)]
    bases: std::sync::OnceLock<Vec<u64>>,
}

/// The part of one file a shard reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Piece {
    /// Bytes `[start, end)` of an uncompressed text file, aligned to records by the reader.
    Bytes {
        /// Index of the file.
        file: usize,
        /// First byte.
        start: u64,
        /// One past the last byte.
        end: u64,
    },
    /// A compressed file, read whole.
    Whole {
        /// Index of the file.
        file: usize,
    },
    /// Row groups `[first, end)` of a Parquet file.
    RowGroups {
        /// Index of the file.
        file: usize,
        /// First row group.
        first: u32,
        /// One past the last row group.
        end: u32,
    },
}

impl Piece {
    /// Index of the file it reads.
    pub fn file(&self) -> usize {
        match *self {
            Self::Bytes { file, .. } | Self::Whole { file } | Self::RowGroups { file, .. } => file,
        }
    }
}

impl PartialEq for Dataset {
    /// The format and the files; whether the layout was computed yet does not matter.
    fn eq(&self, other: &Self) -> bool {
        self.format == other.format && self.files == other.files
    }
}

impl Eq for Dataset {}

impl Dataset {
    /// Whether file `i` can be cut at any byte (uncompressed text).
    fn splittable(&self, i: usize) -> bool {
        self.format != Format::Parquet && self.files[i].compression == Compression::None
    }

    /// File `i`'s span in the virtual byte space.
    fn span(&self, i: usize) -> u64 {
        let f = &self.files[i];
        if self.format == Format::Parquet {
            f.row_groups.iter().map(|g| g.bytes.max(1)).sum()
        } else {
            f.size
        }
    }

    /// A dataset of `files` in `format`.
    pub fn new(format: Format, files: Vec<DataFile>) -> Self {
        Self {
            format,
            files,
            bases: std::sync::OnceLock::new(),
        }
    }

    /// Where each file starts in the virtual byte space, and, last, the total.
    fn bases(&self) -> &[u64] {
        self.bases.get_or_init(|| {
            let mut at: u64 = 0;
            let mut out = Vec::with_capacity(self.files.len() + 1);
            for i in 0..self.files.len() {
                out.push(at);
                at = at.saturating_add(self.span(i));
            }
            out.push(at);
            out
        })
    }

    /// The virtual size: the sum of the files' spans.
    pub fn total(&self) -> u64 {
        self.bases().last().copied().unwrap_or(0)
    }

    /// Rows of the Parquet files (0 for text, whose records are counted only by reading).
    pub fn rows(&self) -> u64 {
        self.files
            .iter()
            .flat_map(|f| &f.row_groups)
            .map(|g| g.rows)
            .sum()
    }

    /// The unit boundaries of an unsplittable file `i` laid at `base`, in order, both ends
    /// included.
    fn unit_bounds(&self, i: usize, base: u64) -> Vec<u64> {
        if self.format == Format::Parquet {
            let mut at = base;
            let mut out = vec![at];
            for g in &self.files[i].row_groups {
                at += g.bytes.max(1);
                out.push(at);
            }
            out
        } else {
            vec![base, base + self.span(i)]
        }
    }

    /// The file whose span holds virtual byte `at` (`None` past the end).
    fn file_at(&self, bases: &[u64], at: u64) -> Option<usize> {
        // The last file whose base is <= at, skipping empty spans (they share a base with
        // the next file).
        let n = self.files.len();
        let i = bases[..n].partition_point(|&b| b <= at).checked_sub(1)?;
        let mut i = i;
        while i < n && bases[i + 1] <= at {
            i += 1;
        }
        (i < n).then_some(i)
    }

    /// Moves each cut that falls inside an unsplittable unit to the nearer end of the unit
    /// (the lower on a tie) and returns the ranges between the cuts, empty ones dropped:
    /// `cuts` are the ends of even ranges over [`Dataset::total`] (the planner's), ascending.
    pub fn snap(&self, cuts: &[u64]) -> Vec<(u64, u64)> {
        let total = self.total();
        let bases = self.bases();
        let mut points: Vec<u64> = Vec::with_capacity(cuts.len() + 2);
        points.push(0);
        for &cut in cuts {
            if cut == 0 || cut >= total {
                continue;
            }
            let Some(i) = self.file_at(bases, cut) else {
                continue;
            };
            if self.splittable(i) {
                points.push(cut);
                continue;
            }
            let bounds = self.unit_bounds(i, bases[i]);
            let k = bounds.partition_point(|&b| b <= cut);
            let (lo, hi) = (bounds[k - 1], bounds[k.min(bounds.len() - 1)]);
            points.push(if cut - lo <= hi - cut { lo } else { hi });
        }
        points.push(total);
        points.sort_unstable();
        points.dedup();
        points.windows(2).map(|w| (w[0], w[1])).collect()
    }

    /// The most records shard `[start, end)` can hold: the rows of its row groups; a byte per
    /// record of its byte ranges (as [`crate::shard`] aligns them); what a whole compressed
    /// file may expand to ([`crate::decode::MAX_EXPANDED`]).
    pub fn max_records(&self, start: u64, end: u64) -> u64 {
        self.pieces(start, end)
            .iter()
            .map(|p| match *p {
                Piece::Bytes { start, end, .. } => end - start + 1,
                Piece::Whole { .. } => crate::decode::MAX_EXPANDED + 1,
                Piece::RowGroups { file, first, end } => self.files[file].row_groups
                    [first as usize..end as usize]
                    .iter()
                    .map(|g| g.rows)
                    .sum(),
            })
            .fold(0u64, u64::saturating_add)
    }

    /// What shard `[start, end)` of the virtual space reads, file by file, in order.
    pub fn pieces(&self, start: u64, end: u64) -> Vec<Piece> {
        let bases = self.bases();
        let mut out = Vec::new();
        let first = self.file_at(bases, start).unwrap_or(self.files.len());
        for file in first..self.files.len() {
            let (base, span) = (bases[file], bases[file + 1] - bases[file]);
            if base >= end {
                break;
            }
            if span == 0 {
                continue;
            }
            if self.splittable(file) {
                let (s, e) = (start.max(base) - base, end.min(base + span) - base);
                if s < e {
                    out.push(Piece::Bytes {
                        file,
                        start: s,
                        end: e,
                    });
                }
            } else if self.format == Format::Parquet {
                let bounds = self.unit_bounds(file, base);
                let owned: Vec<u32> = (0..bounds.len() - 1)
                    .filter(|&g| (start..end).contains(&bounds[g]))
                    .map(|g| g as u32)
                    .collect();
                if let (Some(&first), Some(&last)) = (owned.first(), owned.last()) {
                    out.push(Piece::RowGroups {
                        file,
                        first,
                        end: last + 1,
                    });
                }
            } else if (start..end).contains(&base) {
                out.push(Piece::Whole { file });
            }
        }
        out
    }
}

/// Why a dataset could not be resolved.
#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    /// The URI, or an object of it, could not be reached.
    #[error(transparent)]
    Object(#[from] ObjectError),
    /// A prefix or glob that matches no file.
    #[error("{uri} matches no file{}", if *.pattern { " (the pattern is matched against the names under its directory; names starting with `_` or `.` are skipped)" } else { " (names starting with `_` or `.` are skipped)" })]
    NoMatch {
        /// The URI as given.
        uri: String,
        /// Whether it was a glob.
        pattern: bool,
    },
    /// A glob that does not parse.
    #[error("{uri} is not a usable glob: {reason}")]
    BadPattern {
        /// The URI as given.
        uri: String,
        /// Why.
        reason: String,
    },
    /// A listed file outside what the workload may read (a symbolic link out of its prefix).
    #[error("{message}")]
    Forbidden {
        /// What and why, naming the field.
        message: String,
    },
    /// A file that is not what the format says, or lacks a column the task reads.
    #[error("{uri}: {message}")]
    Invalid {
        /// The file.
        uri: String,
        /// What is wrong.
        message: String,
    },
}

impl DatasetError {
    /// Whether the input is missing (no object, no match) rather than unreadable or invalid.
    pub fn is_not_found(&self) -> bool {
        matches!(
            self,
            Self::NoMatch { .. } | Self::Object(ObjectError::NotFound { .. })
        )
    }

    /// Whether trying again could succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Object(e) if e.is_transient())
    }
}

/// What the dataset must be: its format, its compression (`None`: from each file's name),
/// and the top-level columns its records must have (checked in Parquet footers at once;
/// for text formats by the agents as they read).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Want {
    /// Record format.
    pub format: Format,
    /// Compression of text files; `None` infers it from each name.
    pub compression: Option<Compression>,
    /// Columns every record needs (the text field's first segment, tensor inputs).
    pub columns: Vec<String>,
    /// Where the files may be read from: each listed file is checked
    /// ([`crate::Grant::check`]) before anything of it is read. `None`: anywhere.
    pub confine: Option<crate::Grant>,
}

/// Footers read at once while resolving a dataset of many Parquet files.
const FOOTERS_AT_ONCE: usize = 32;

/// Whether `uri` names files by a pattern (`*`, `?`, `[`).
pub fn is_glob(uri: &str) -> bool {
    uri.contains(['*', '?', '['])
}

/// Whether a listed name is data: Spark's `_SUCCESS`, `_committed_*`, `.crc` files and the
/// like are not.
fn is_data_name(rel: &str) -> bool {
    rel.split('/')
        .all(|seg| !seg.is_empty() && !seg.starts_with('_') && !seg.starts_with('.'))
}

/// Resolves `uri` into the files it names: one object; every object under a prefix (a URI
/// ending in `/`); or those under a directory whose path below it matches a glob
/// (`s3://b/docs/part-*.parquet`; `*` stays within a path segment, `**` crosses them).
/// Names whose segments start with `_` or `.` are skipped under a prefix or glob. Parquet
/// files' footers are read (row groups, schema) and checked for `want.columns`.
pub async fn resolve(uri: &str, want: &Want) -> Result<Dataset, DatasetError> {
    let mut files = if is_glob(uri) {
        let cut = uri.find(['*', '?', '[']).unwrap_or(uri.len());
        let dir = &uri[..uri[..cut].rfind('/').map_or(0, |i| i + 1)];
        let pattern_text = &uri[dir.len()..];
        let pattern = glob::Pattern::new(pattern_text).map_err(|e| DatasetError::BadPattern {
            uri: uri.to_string(),
            reason: e.to_string(),
        })?;
        let options = glob::MatchOptions {
            case_sensitive: true,
            require_literal_separator: true,
            require_literal_leading_dot: true,
        };
        let listed = Location::parse(dir)?.list_versions().await?;
        listed
            .into_iter()
            .filter(|(rel, ..)| is_data_name(rel) && pattern.matches_with(rel, options))
            .map(|(rel, size, version)| file(&format!("{dir}{rel}"), size, version))
            .collect::<Vec<_>>()
    } else if uri.ends_with('/') {
        let listed = Location::parse(uri)?.list_versions().await?;
        listed
            .into_iter()
            .filter(|(rel, ..)| is_data_name(rel))
            .map(|(rel, size, version)| file(&format!("{uri}{rel}"), size, version))
            .collect()
    } else {
        let loc = Location::parse(uri)?;
        let (size, version) = loc.facts().await?;
        vec![file(loc.uri(), size, version)]
    };
    if let Some(grant) = &want.confine {
        for f in &files {
            grant
                .check("spec.input.uri", &f.uri, crate::Use::Read)
                .map_err(|message| DatasetError::Forbidden { message })?;
        }
    }
    if files.is_empty() {
        return Err(DatasetError::NoMatch {
            uri: uri.to_string(),
            pattern: is_glob(uri),
        });
    }
    files.sort_by(|a, b| a.uri.cmp(&b.uri));
    for f in &mut files {
        f.compression = match want.format {
            Format::Parquet => Compression::None,
            _ => want
                .compression
                .unwrap_or_else(|| Compression::from_name(&f.uri)),
        };
    }
    if want.format == Format::Parquet {
        let columns = Arc::new(want.columns.clone());
        files = futures::stream::iter(files.into_iter().map(|f| {
            let columns = columns.clone();
            async move { with_footer(f, &columns).await }
        }))
        .buffered(FOOTERS_AT_ONCE)
        .try_collect()
        .await?;
    }
    Ok(Dataset::new(want.format, files))
}

fn file(uri: &str, size: u64, version: Option<String>) -> DataFile {
    DataFile {
        uri: uri.to_string(),
        size,
        version,
        compression: Compression::None,
        row_groups: Vec::new(),
    }
}

/// Reads a Parquet file's footer: its row groups, and that it has `columns`.
async fn with_footer(mut f: DataFile, columns: &[String]) -> Result<DataFile, DatasetError> {
    let invalid = |message: String| DatasetError::Invalid {
        uri: f.uri.clone(),
        message,
    };
    if f.size == 0 {
        return Err(invalid(
            "an empty file is not Parquet (no footer); remove it or name the files".into(),
        ));
    }
    let loc = Location::parse(&f.uri)?;
    let meta = crate::columnar::footer(&loc, f.size)
        .await
        .map_err(invalid)?;
    let names: Vec<&str> = meta
        .schema
        .fields()
        .iter()
        .map(|c| c.name().as_str())
        .collect();
    for c in columns {
        if !names.contains(&c.as_str()) {
            return Err(invalid(format!(
                "has no column `{c}` (its columns: {})",
                names.join(", ")
            )));
        }
    }
    f.row_groups = meta.row_groups;
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(sizes: &[u64], compression: Compression) -> Dataset {
        Dataset::new(
            Format::Jsonl,
            sizes
                .iter()
                .enumerate()
                .map(|(i, &size)| DataFile {
                    uri: format!("file:///d/{i:03}.jsonl"),
                    size,
                    version: None,
                    compression,
                    row_groups: Vec::new(),
                })
                .collect(),
        )
    }

    fn parquet(groups: &[&[u64]]) -> Dataset {
        Dataset::new(
            Format::Parquet,
            groups
                .iter()
                .enumerate()
                .map(|(i, gs)| DataFile {
                    uri: format!("file:///d/{i:03}.parquet"),
                    size: 1000,
                    version: None,
                    compression: Compression::None,
                    row_groups: gs
                        .iter()
                        .map(|&bytes| RowGroup { bytes, rows: 10 })
                        .collect(),
                })
                .collect(),
        )
    }

    #[test]
    fn names_say_the_compression() {
        assert_eq!(
            Compression::from_name("s3://b/x.jsonl.gz"),
            Compression::Gzip
        );
        assert_eq!(
            Compression::from_name("file:///x.CSV.ZST"),
            Compression::Zstd
        );
        assert_eq!(Compression::from_name("file:///x.jsonl"), Compression::None);
        assert_eq!(
            Compression::from_name("file:///gz/x.jsonl"),
            Compression::None
        );
    }

    #[test]
    fn data_names_skip_markers_and_hidden_files() {
        assert!(is_data_name("part-0.parquet"));
        assert!(is_data_name("year=2024/part-0.parquet"));
        assert!(!is_data_name("_SUCCESS"));
        assert!(!is_data_name(".part-0.parquet.crc"));
        assert!(!is_data_name("_temporary/part-0.parquet"));
    }

    #[test]
    fn cuts_inside_units_move_to_the_nearer_end() {
        // Two gzip files of 100 and 50 bytes, one plain file of 100.
        let mut ds = text(&[100, 50, 100], Compression::Gzip);
        ds.files[2].compression = Compression::None;
        // 30 -> 0 (nearer), 70 -> 100, 120 -> 100, 140 -> 150, 200 stays (plain file).
        assert_eq!(
            ds.snap(&[30, 70, 120, 140, 200]),
            vec![(0, 100), (100, 150), (150, 200), (200, 250)]
        );
        assert_eq!(ds.pieces(0, 100), vec![Piece::Whole { file: 0 }]);
        assert_eq!(
            ds.pieces(150, 200),
            vec![Piece::Bytes {
                file: 2,
                start: 0,
                end: 50
            }]
        );
        // A range over the end of one plain file and the start of the next reads both.
        let plain = text(&[10, 0, 10], Compression::None);
        assert_eq!(
            plain.pieces(5, 15),
            vec![
                Piece::Bytes {
                    file: 0,
                    start: 5,
                    end: 10
                },
                Piece::Bytes {
                    file: 2,
                    start: 0,
                    end: 5
                }
            ]
        );
    }

    #[test]
    fn parquet_shards_are_whole_row_groups() {
        let ds = parquet(&[&[10, 10, 10], &[], &[30]]);
        assert_eq!(ds.total(), 60);
        let ranges = ds.snap(&[14, 26, 45]);
        assert_eq!(ranges, vec![(0, 10), (10, 30), (30, 60)]);
        assert_eq!(
            ds.pieces(10, 30),
            vec![Piece::RowGroups {
                file: 0,
                first: 1,
                end: 3
            }]
        );
        assert_eq!(
            ds.pieces(30, 60),
            vec![Piece::RowGroups {
                file: 2,
                first: 0,
                end: 1
            }]
        );
        assert_eq!(ds.rows(), 40);
    }

    #[test]
    fn the_dataset_round_trips_through_json() {
        let ds = parquet(&[&[1, 2]]);
        let json = serde_json::to_string(&ds).expect("json");
        assert_eq!(serde_json::from_str::<Dataset>(&json).expect("parse"), ds);
        let one = Dataset::new(
            Format::Jsonl,
            vec![DataFile {
                uri: "file:///x.jsonl".into(),
                size: 5,
                version: Some("v".into()),
                compression: Compression::None,
                row_groups: Vec::new(),
            }],
        );
        assert_eq!(
            serde_json::to_string(&one).expect("json"),
            r#"{"format":"jsonl","files":[{"uri":"file:///x.jsonl","size":5,"version":"v"}]}"#
        );
    }

    proptest::proptest! {
        /// Whatever the files and cuts, every unit lies in exactly one shard's pieces and
        /// every byte of a plain file in exactly one (the ranges partition each file).
        #[test]
        fn every_unit_and_byte_belongs_to_exactly_one_shard(
            spans in proptest::collection::vec((0u64..60, 0u8..3), 1..8),
            cuts in proptest::collection::vec(0u64..400, 0..12),
        ) {
            // kind 0: plain, 1: gzip (whole), 2: plain too, to mix them.
            let mut ds = text(&spans.iter().map(|s| s.0).collect::<Vec<_>>(), Compression::None);
            for (f, (_, kind)) in ds.files.iter_mut().zip(&spans) {
                if *kind == 1 { f.compression = Compression::Gzip; }
            }
            let mut cuts = cuts;
            cuts.sort_unstable();
            let ranges = ds.snap(&cuts);
            let mut whole = vec![0u32; ds.files.len()];
            let mut bytes: Vec<Vec<u32>> = ds.files.iter().map(|f| vec![0; f.size as usize]).collect();
            for (s, e) in &ranges {
                proptest::prop_assert!(s < e);
                let pieces = ds.pieces(*s, *e);
                proptest::prop_assert!(!pieces.is_empty(), "shard {s}..{e} reads nothing");
                for p in pieces {
                    match p {
                        Piece::Whole { file } => whole[file] += 1,
                        Piece::Bytes { file, start, end } => {
                            for b in start..end { bytes[file][b as usize] += 1; }
                        }
                        Piece::RowGroups { .. } => proptest::prop_assert!(false),
                    }
                }
            }
            for (i, f) in ds.files.iter().enumerate() {
                if f.size == 0 { continue; }
                if f.compression == Compression::Gzip {
                    proptest::prop_assert_eq!(whole[i], 1);
                } else {
                    proptest::prop_assert!(bytes[i].iter().all(|&n| n == 1));
                }
            }
        }

        #[test]
        fn every_row_group_belongs_to_exactly_one_shard(
            groups in proptest::collection::vec(proptest::collection::vec(1u64..40, 0..5), 1..6),
            cuts in proptest::collection::vec(0u64..600, 0..12),
        ) {
            let refs: Vec<&[u64]> = groups.iter().map(Vec::as_slice).collect();
            let ds = parquet(&refs);
            let mut cuts = cuts;
            cuts.sort_unstable();
            let mut seen: Vec<Vec<u32>> = groups.iter().map(|g| vec![0; g.len()]).collect();
            for (s, e) in ds.snap(&cuts) {
                let pieces = ds.pieces(s, e);
                proptest::prop_assert!(!pieces.is_empty());
                for p in pieces {
                    let Piece::RowGroups { file, first, end } = p else { proptest::prop_assert!(false); continue };
                    for g in first..end { seen[file][g as usize] += 1; }
                }
            }
            proptest::prop_assert!(seen.iter().flatten().all(|&n| n == 1));
        }
    }
}
