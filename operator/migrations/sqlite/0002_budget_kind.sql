-- Budget reconciliation (bringing a namespace's grant to its Mesh's `budgets` entry) writes
-- its own transaction kind, `budget`, and counts only those: a grant made by hand
-- (`infermesh ledger grant`, kind `grant`) is never taken back by the next Mesh reconcile.
-- SQLite cannot change a CHECK constraint: the table is rebuilt (ids kept), with the foreign
-- keys of ledger_entries checked at commit, when they point at the rebuilt table.
PRAGMA defer_foreign_keys = ON;

CREATE TABLE ledger_transactions_v2 (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    kind         TEXT NOT NULL CHECK (kind IN ('charge', 'grant', 'budget', 'refund')),
    charge_key   TEXT UNIQUE,
    workload_uid TEXT,
    shard_idx    INTEGER,
    refund_of    INTEGER UNIQUE REFERENCES ledger_transactions(id),  -- a charge is refunded once
    memo         TEXT NOT NULL DEFAULT '',
    created_at   TEXT NOT NULL
);
-- Budget grants written before this migration carried kind `grant` and this memo.
INSERT INTO ledger_transactions_v2 (id, kind, charge_key, workload_uid, shard_idx, refund_of, memo, created_at)
    SELECT id,
           CASE WHEN kind = 'grant' AND memo LIKE 'budget of namespace %' THEN 'budget' ELSE kind END,
           charge_key, workload_uid, shard_idx, refund_of, memo, created_at
    FROM ledger_transactions;
DROP TABLE ledger_transactions;
ALTER TABLE ledger_transactions_v2 RENAME TO ledger_transactions;
