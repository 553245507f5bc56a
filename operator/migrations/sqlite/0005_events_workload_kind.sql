-- A workload's events of one kind (the console's failures, timeline and finished shard grid)
-- without walking every event of that kind in the log.
CREATE INDEX events_workload_kind ON events (workload_uid, kind, seq);
