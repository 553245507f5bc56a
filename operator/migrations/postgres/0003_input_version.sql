-- The version of the input object the shards were cut from (its ETag: for a local file,
-- inode, modification time and size), so that every read can ask for exactly that object
-- and an input replaced or rewritten mid-run fails its workload by name instead of mixing
-- two objects' records. NULL: a workload admitted before this column, or a store that
-- names no version; its reads check the size only.
ALTER TABLE workloads ADD COLUMN input_version TEXT;
