-- When the stored run of a workload began, for `spec.activeDeadlineSeconds`: NULL until the
-- workload is retried (`reopen_failed` sets it), the run then having begun at `created_at`
-- (its admission). Read through `Store::running_for`, so an operator that restarts or takes
-- over goes on counting where the last one was.
ALTER TABLE workloads ADD COLUMN started_at TIMESTAMPTZ;
