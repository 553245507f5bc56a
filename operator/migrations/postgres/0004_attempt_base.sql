-- Retrying a failed workload (`reopen_failed`) gives each shard that had not succeeded a
-- fresh `maxAttempts`: its attempts go on numbering from where they were (parts, claims and
-- charges are keyed by attempt, so a number is never used twice), and `attempt_base` is the
-- attempt it had when the retry began. The attempts a shard has used are
-- `attempt - attempt_base`; 0 for every shard never retried.
ALTER TABLE shards ADD COLUMN attempt_base INTEGER NOT NULL DEFAULT 0;
