//! Parquet through the arrow-rs crates: a file's footer (for planning), the rows of some of
//! its row groups as JSON objects (for the agents), and output parts written as Parquet.

use std::sync::Arc;

use arrow_array::builder::{FixedSizeListBuilder, Float32Builder, StringBuilder};
use arrow_array::{ArrayRef, RecordBatch};
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use bytes::Bytes;
use futures::TryStreamExt;
use parquet::arrow::ProjectionMask;
use parquet::arrow::async_reader::{ParquetObjectReader, ParquetRecordBatchStreamBuilder};
use parquet::file::properties::WriterProperties;
use serde_json::{Map, Value};

use crate::dataset::RowGroup;
use crate::store::Location;

/// What planning needs of a Parquet file.
#[derive(Clone, Debug)]
pub struct Footer {
    /// Its Arrow schema.
    pub schema: SchemaRef,
    /// Its row groups: compressed bytes and rows.
    pub row_groups: Vec<RowGroup>,
}

fn builder_error(e: impl std::fmt::Display) -> String {
    let text = e.to_string();
    // "Parquet error: ..." / "External: ...": the crate's own prefixes say nothing to a user.
    let text = text.strip_prefix("Parquet error: ").unwrap_or(&text);
    format!("not a readable Parquet file: {text}")
}

async fn builder(
    loc: &Location,
    size: u64,
) -> Result<ParquetRecordBatchStreamBuilder<ParquetObjectReader>, String> {
    let reader = ParquetObjectReader::new(loc.store.clone(), loc.path.clone()).with_file_size(size);
    ParquetRecordBatchStreamBuilder::new(reader)
        .await
        .map_err(builder_error)
}

/// The most bytes one row group may hold uncompressed: a row group is read whole by one
/// shard and held in memory, so a bigger one (or a footer that claims one) is refused at
/// admission rather than taking an agent down.
pub const MAX_ROW_GROUP_BYTES: u64 = 1 << 30;

/// The row groups a footer declares, checked: sizes and counts that are not negative,
/// compressed sizes that fit in the file, uncompressed sizes within [`MAX_ROW_GROUP_BYTES`].
fn checked_groups(
    meta: &parquet::file::metadata::ParquetMetaData,
    size: u64,
) -> Result<Vec<RowGroup>, String> {
    let mut total: u64 = 0;
    let mut out = Vec::with_capacity(meta.num_row_groups());
    for (i, g) in meta.row_groups().iter().enumerate() {
        let (Ok(bytes), Ok(rows), Ok(raw)) = (
            u64::try_from(g.compressed_size()),
            u64::try_from(g.num_rows()),
            u64::try_from(g.total_byte_size()),
        ) else {
            return Err(format!(
                "row group {i}: its footer declares a negative size"
            ));
        };
        total = total.saturating_add(bytes);
        if total > size {
            return Err(format!(
                "row group {i}: its footer declares more compressed bytes than the file's {size}"
            ));
        }
        if raw > MAX_ROW_GROUP_BYTES {
            return Err(format!(
                "row group {i} holds {} MiB uncompressed, more than the {} MiB one shard may \
                 read; write the file with smaller row groups",
                raw >> 20,
                MAX_ROW_GROUP_BYTES >> 20
            ));
        }
        out.push(RowGroup {
            bytes: bytes.max(1),
            rows,
        });
    }
    Ok(out)
}

/// Reads the footer of the Parquet file at `loc` (`size` bytes): two small range reads.
pub async fn footer(loc: &Location, size: u64) -> Result<Footer, String> {
    let b = builder(loc, size).await?;
    let row_groups = checked_groups(b.metadata(), size)?;
    Ok(Footer {
        schema: b.schema().clone(),
        row_groups,
    })
}

/// One row read from Parquet.
#[derive(Clone, Debug)]
pub struct Row {
    /// Its row group.
    pub row_group: u32,
    /// 1-based row number within the file.
    pub row: u64,
    /// The row as a JSON object: its non-null columns (nested types as nested JSON).
    pub fields: Map<String, Value>,
}

/// Why rows could not be read: what, and whether another attempt could succeed (the store
/// failed, rather than the file being what it is).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadError {
    /// What went wrong.
    pub message: String,
    /// A store or network failure.
    pub transient: bool,
}

impl From<String> for ReadError {
    fn from(message: String) -> Self {
        Self {
            message,
            transient: false,
        }
    }
}

/// Reads row groups `[first, end)` of the Parquet file at `loc` (`size` bytes when planned),
/// only the top-level `columns` that exist (all when empty). `planned` are the row groups
/// as planned: a file whose row groups are not those any more was replaced since, and is
/// refused rather than read.
pub async fn read_rows(
    loc: &Location,
    size: u64,
    first: u32,
    end: u32,
    planned: &[RowGroup],
    columns: &[String],
) -> Result<Vec<Row>, ReadError> {
    let reader = ParquetObjectReader::new(loc.store.clone(), loc.path.clone()).with_file_size(size);
    let b = ParquetRecordBatchStreamBuilder::new(reader)
        .await
        .map_err(|e| ReadError {
            transient: matches!(e, parquet::errors::ParquetError::External(_)),
            message: builder_error(e),
        })?;
    let groups = b.metadata().row_groups();
    let now = checked_groups(b.metadata(), size)?;
    if now != planned {
        return Err(String::from(
            "changed since it was planned: its row groups are not the ones the shards were \
             cut from; resubmit the workload",
        )
        .into());
    }
    if first >= end || end as usize > groups.len() {
        return Err(ReadError::from(format!(
            "row groups {first}..{end} do not lie within its {} row groups",
            groups.len()
        )));
    }
    // Rows of the file before each row group, for row numbers in messages.
    let mut before = vec![0u64; groups.len() + 1];
    for (i, g) in now.iter().enumerate() {
        before[i + 1] = before[i] + g.rows;
    }
    let mask = if columns.is_empty() {
        ProjectionMask::all()
    } else {
        let fields = b.schema().fields();
        let roots: Vec<usize> = fields
            .iter()
            .enumerate()
            .filter(|(_, f)| columns.iter().any(|c| c == f.name()))
            .map(|(i, _)| i)
            .collect();
        ProjectionMask::roots(b.parquet_schema(), roots)
    };
    let stream = b
        .with_row_groups((first..end).map(|g| g as usize).collect())
        .with_projection(mask)
        .with_batch_size(4096)
        .build()
        .map_err(|e| ReadError::from(builder_error(e)))?;
    let mut stream = stream;
    let mut rows = Vec::new();
    let mut group = first as usize;
    let mut in_group = 0u64;
    // Batch by batch: each is turned into rows and dropped before the next is decoded.
    loop {
        let batch: RecordBatch = match stream.try_next().await {
            Ok(Some(batch)) => batch,
            Ok(None) => break,
            Err(e) => {
                let transient = matches!(e, parquet::errors::ParquetError::External(_));
                let text = e.to_string();
                return Err(ReadError {
                    message: format!(
                        "row group {group}: {}",
                        text.strip_prefix("Parquet error: ").unwrap_or(&text)
                    ),
                    transient,
                });
            }
        };
        let converted = batch_rows(&batch).map_err(|e| format!("row group {group}: {e}"))?;
        for fields in converted {
            while group < now.len() && in_group >= now[group].rows {
                group += 1;
                in_group = 0;
            }
            rows.push(Row {
                row_group: group as u32,
                row: before[group.min(now.len())] + in_group + 1,
                fields,
            });
            in_group += 1;
        }
    }
    Ok(rows)
}

/// The rows of a batch as JSON objects (arrow-json's encoding: nested lists and structs as
/// JSON arrays and objects, nulls left out).
fn batch_rows(batch: &RecordBatch) -> Result<Vec<Map<String, Value>>, String> {
    let mut buf = Vec::new();
    {
        let mut w = arrow_json::LineDelimitedWriter::new(&mut buf);
        w.write(batch)
            .map_err(|e| format!("a column cannot be read as JSON: {e}"))?;
        w.finish()
            .map_err(|e| format!("a column cannot be read as JSON: {e}"))?;
    }
    let mut out = Vec::with_capacity(batch.num_rows());
    for line in buf.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        match serde_json::from_slice::<Value>(line) {
            Ok(Value::Object(m)) => out.push(m),
            _ => return Err("a row does not convert to a JSON object".into()),
        }
    }
    // A batch of rows that are all null encodes as `{}` lines; keep one object per row.
    out.resize_with(batch.num_rows(), Map::new);
    Ok(out)
}

/// The columns of an output part.
pub enum PartColumns {
    /// Text embeddings of one dimension.
    Embeddings(Vec<Vec<f32>>),
    /// Named output tensors, each record's values flattened.
    Tensors(Vec<(String, Vec<Vec<f32>>)>),
}

/// The column types of a part follow from the task alone, so every part of a run has the same
/// schema (a dataset reader merges them): embeddings a fixed-size list of the model's
/// dimension (`dim`, taken from the vectors, else from the model for a part with no record),
/// tensor outputs variable-length lists (their sizes may differ between records).
#[derive(Clone, Copy, Debug, Default)]
pub struct PartShape {
    /// The embedding dimension when the part has no vector to take it from.
    pub dim: Option<usize>,
}

/// Writes an output part as Parquet: an `id` column (`id_field` named; the id as text: a
/// string as it is, anything else as its JSON) when `id_field` is not empty, then the
/// embedding (`embedding`, a fixed-size list of float32) or each named output tensor
/// (flattened float32, a fixed-size list when every record's has the same length). `zstd`
/// compresses the columns.
pub fn write_part(
    id_field: &str,
    ids: &[Option<&Value>],
    columns: PartColumns,
    zstd: bool,
) -> Result<Bytes, String> {
    write_part_shaped(id_field, ids, columns, PartShape::default(), zstd)
}

/// [`write_part`] with the embedding dimension of a part that may hold no record.
pub fn write_part_shaped(
    id_field: &str,
    ids: &[Option<&Value>],
    columns: PartColumns,
    shape: PartShape,
    zstd: bool,
) -> Result<Bytes, String> {
    let mut fields = Vec::new();
    let mut arrays: Vec<ArrayRef> = Vec::new();
    if !id_field.is_empty() {
        let mut b = StringBuilder::new();
        for id in ids {
            match id {
                None | Some(Value::Null) => b.append_null(),
                Some(Value::String(s)) => b.append_value(s),
                Some(other) => b.append_value(other.to_string()),
            }
        }
        fields.push(Field::new(id_field, DataType::Utf8, true));
        arrays.push(Arc::new(b.finish()));
    }
    let mut add_vectors = |name: &str, rows: &[Vec<f32>], fixed_dim: bool| -> Result<(), String> {
        let dim = rows.first().map_or(shape.dim.unwrap_or(0), Vec::len);
        if fixed_dim && !rows.iter().all(|r| r.len() == dim) {
            return Err(format!("`{name}` vectors of different lengths in one part"));
        }
        let fixed = fixed_dim;
        let item = Arc::new(Field::new("item", DataType::Float32, false));
        let array: ArrayRef = if fixed {
            let mut b = FixedSizeListBuilder::new(Float32Builder::new(), dim as i32)
                .with_field(item.clone());
            for r in rows {
                b.values().append_slice(r);
                b.append(true);
            }
            Arc::new(b.finish())
        } else {
            let mut b = arrow_array::builder::ListBuilder::new(Float32Builder::new())
                .with_field(item.clone());
            for r in rows {
                b.values().append_slice(r);
                b.append(true);
            }
            Arc::new(b.finish())
        };
        fields.push(Field::new(name, array.data_type().clone(), false));
        arrays.push(array);
        Ok(())
    };
    match &columns {
        PartColumns::Embeddings(rows) => add_vectors("embedding", rows, true)?,
        PartColumns::Tensors(outputs) => {
            for (name, rows) in outputs {
                add_vectors(name, rows, false)?;
            }
        }
    }
    let schema = Arc::new(Schema::new(fields));
    let batch = if arrays.is_empty() {
        RecordBatch::new_empty(schema.clone())
    } else {
        RecordBatch::try_new(schema.clone(), arrays).map_err(|e| e.to_string())?
    };
    let mut props = WriterProperties::builder();
    if zstd {
        props = props.set_compression(parquet::basic::Compression::ZSTD(
            parquet::basic::ZstdLevel::default(),
        ));
    }
    let mut out = Vec::new();
    let mut w = parquet::arrow::ArrowWriter::try_new(&mut out, schema, Some(props.build()))
        .map_err(|e| e.to_string())?;
    w.write(&batch).map_err(|e| e.to_string())?;
    w.close().map_err(|e| e.to_string())?;
    Ok(Bytes::from(out))
}

/// Whether `data` is a Parquet file (`PAR1` at both ends).
pub fn is_parquet(data: &[u8]) -> bool {
    data.len() >= 12 && data.starts_with(b"PAR1") && data.ends_with(b"PAR1")
}

/// Rows of a Parquet file held in memory, from its footer: the file's declared count, which
/// must be the sum of its row groups'.
pub fn parquet_rows(data: Bytes) -> Result<u64, String> {
    let meta = parquet::file::metadata::ParquetMetaDataReader::new()
        .parse_and_finish(&data)
        .map_err(builder_error)?;
    let declared = u64::try_from(meta.file_metadata().num_rows())
        .map_err(|_| "its footer declares a negative row count".to_string())?;
    let mut sum: u64 = 0;
    for g in meta.row_groups() {
        let rows = u64::try_from(g.num_rows())
            .map_err(|_| "a row group declares a negative row count".to_string())?;
        sum = sum.saturating_add(rows);
    }
    if sum != declared {
        return Err(format!(
            "its footer declares {declared} rows but its row groups hold {sum}"
        ));
    }
    Ok(declared)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_part_reads_back_with_its_ids_and_vectors() {
        let ids = [Value::from("a"), Value::from(7), Value::Null];
        let refs: Vec<Option<&Value>> = vec![Some(&ids[0]), Some(&ids[1]), None];
        let vecs = vec![vec![1.0, 2.0], vec![3.0, 4.0], vec![5.0, 6.0]];
        let data = write_part("id", &refs, PartColumns::Embeddings(vecs), true).expect("write");
        assert!(is_parquet(&data));
        assert_eq!(parquet_rows(data.clone()).expect("rows"), 3);
        let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(data)
            .expect("reader")
            .build()
            .expect("build");
        let batches: Vec<RecordBatch> = reader.map(|b| b.expect("batch")).collect();
        let rows = batch_rows(&batches[0]).expect("rows");
        assert_eq!(rows[0]["id"], Value::from("a"));
        assert_eq!(rows[1]["id"], Value::from("7"));
        assert!(!rows[2].contains_key("id"));
        assert_eq!(rows[2]["embedding"], serde_json::json!([5.0, 6.0]));
        assert!(matches!(
            batches[0].schema().field(1).data_type(),
            DataType::FixedSizeList(_, 2)
        ));
    }

    fn schema_of(data: Bytes) -> SchemaRef {
        parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(data)
            .expect("reader")
            .schema()
            .clone()
    }

    #[test]
    fn every_part_of_a_task_has_the_same_schema() {
        let id = Value::from("a");
        let full = write_part_shaped(
            "id",
            &[Some(&id)],
            PartColumns::Embeddings(vec![vec![1.0; 3]]),
            PartShape { dim: Some(3) },
            false,
        )
        .expect("part");
        // A part with no record takes the dimension the model declares.
        let empty = write_part_shaped(
            "id",
            &[],
            PartColumns::Embeddings(Vec::new()),
            PartShape { dim: Some(3) },
            false,
        )
        .expect("empty part");
        assert_eq!(schema_of(full), schema_of(empty));
        // Tensor outputs are variable-length lists whatever the records hold.
        let tensors = |rows: Vec<Vec<f32>>| {
            let ids: Vec<Option<&Value>> = rows.iter().map(|_| Some(&id)).collect();
            schema_of(
                write_part(
                    "id",
                    &ids,
                    PartColumns::Tensors(vec![("y".into(), rows)]),
                    false,
                )
                .expect("part"),
            )
        };
        let same = tensors(vec![vec![1.0, 2.0], vec![3.0, 4.0]]);
        assert_eq!(same, tensors(vec![vec![1.0], vec![2.0, 3.0, 4.0]]));
        assert_eq!(same, tensors(Vec::new()));
        assert!(matches!(same.field(1).data_type(), DataType::List(_)));
        // Embeddings of different lengths in one part are refused, not written ragged.
        assert!(
            write_part(
                "id",
                &[Some(&id), Some(&id)],
                PartColumns::Embeddings(vec![vec![1.0], vec![1.0, 2.0]]),
                false
            )
            .is_err()
        );
    }

    #[test]
    fn jsonl_is_not_parquet() {
        assert!(!is_parquet(b"{\"id\":1}\n"));
        assert!(parquet_rows(Bytes::from_static(b"PAR1 not really PAR1")).is_err());
    }
}
