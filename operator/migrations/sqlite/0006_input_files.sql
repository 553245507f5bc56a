-- The files of a workload's input when it is more than one object or not plain JSONL (a
-- prefix, a glob, CSV, Parquet, compressed files): a JSON document listing each file's URI,
-- size, version, compression and, for Parquet, its row groups. Shards are ranges over the
-- files laid end to end, so a resumed run re-plans nothing and reads the same files.
-- NULL: the input is the one object of `spec.input.uri`, sized by `input_bytes`.
ALTER TABLE workloads ADD COLUMN input_files TEXT;
