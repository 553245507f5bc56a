-- infermesh store, SQLite backend: workloads, shards, the ledger and the event log.

CREATE TABLE workloads (
    uid         TEXT PRIMARY KEY,
    namespace   TEXT NOT NULL,
    name        TEXT NOT NULL,
    mesh        TEXT NOT NULL,
    spec        TEXT NOT NULL,           -- the Workload spec as JSON
    input_bytes INTEGER NOT NULL,
    shards      INTEGER NOT NULL,
    phase       TEXT NOT NULL,
    message     TEXT,
    created_at  TEXT NOT NULL,
    finished_at TEXT
);

CREATE TABLE shards (
    workload_uid TEXT NOT NULL REFERENCES workloads(uid),
    idx          INTEGER NOT NULL,
    start_byte   INTEGER NOT NULL,
    end_byte     INTEGER NOT NULL,
    state        TEXT NOT NULL CHECK (state IN ('pending', 'running', 'succeeded', 'failed')),
    attempt      INTEGER NOT NULL DEFAULT 0,
    agent        TEXT,
    records      INTEGER,
    output_uri   TEXT,
    sha256       TEXT,
    error        TEXT,
    updated_at   TEXT NOT NULL,
    PRIMARY KEY (workload_uid, idx)
);

-- Double-entry ledger in integer micro-credits. A charge carries charge_key
-- '<workload uid>#<shard>', unique: a second charge of a shard cannot be written.
CREATE TABLE ledger_transactions (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    kind         TEXT NOT NULL CHECK (kind IN ('charge', 'grant', 'refund')),
    charge_key   TEXT UNIQUE,
    workload_uid TEXT,
    shard_idx    INTEGER,
    refund_of    INTEGER UNIQUE REFERENCES ledger_transactions(id),  -- a charge is refunded once
    memo         TEXT NOT NULL DEFAULT '',
    created_at   TEXT NOT NULL
);

CREATE TABLE ledger_entries (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    tx_id   INTEGER NOT NULL REFERENCES ledger_transactions(id),
    account TEXT NOT NULL,
    amount  INTEGER NOT NULL
);
-- Each account's balance, kept in the same transaction as its entries; `ledger verify`
-- checks it against the sum of the entries.
CREATE TABLE accounts (
    name    TEXT PRIMARY KEY,
    balance BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX ledger_entries_account ON ledger_entries(account);
CREATE INDEX ledger_entries_tx ON ledger_entries(tx_id);

-- Append-only event log: one row per state change, in commit order (SQLite has one writer,
-- so rowid order is commit order).
CREATE TABLE events (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    at           TEXT NOT NULL,
    kind         TEXT NOT NULL,
    workload_uid TEXT,
    shard_idx    INTEGER,
    attempt      INTEGER,
    agent        TEXT,
    message      TEXT NOT NULL DEFAULT ''
);
CREATE INDEX events_workload ON events(workload_uid, seq);
CREATE INDEX events_agent ON events(agent, seq);
CREATE INDEX events_kind ON events(kind, seq);
CREATE INDEX events_at ON events(at);

CREATE TRIGGER events_refuse_update BEFORE UPDATE ON events
BEGIN
    SELECT RAISE(ABORT, 'the event log is append-only: UPDATE refused');
END;
CREATE TRIGGER events_refuse_delete BEFORE DELETE ON events
BEGIN
    SELECT RAISE(ABORT, 'the event log is append-only: DELETE refused');
END;
