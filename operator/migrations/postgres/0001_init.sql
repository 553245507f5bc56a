-- infermesh store, Postgres backend: workloads, shards, the ledger and the event log.

CREATE TABLE workloads (
    uid         TEXT PRIMARY KEY,
    namespace   TEXT NOT NULL,
    name        TEXT NOT NULL,
    mesh        TEXT NOT NULL,
    spec        JSONB NOT NULL,
    input_bytes BIGINT NOT NULL,
    shards      INTEGER NOT NULL,
    phase       TEXT NOT NULL,
    message     TEXT,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    finished_at TIMESTAMPTZ
);

CREATE TABLE shards (
    workload_uid TEXT NOT NULL REFERENCES workloads(uid),
    idx          INTEGER NOT NULL,
    start_byte   BIGINT NOT NULL,
    end_byte     BIGINT NOT NULL,
    state        TEXT NOT NULL CHECK (state IN ('pending', 'running', 'succeeded', 'failed')),
    attempt      INTEGER NOT NULL DEFAULT 0,
    agent        TEXT,
    records      BIGINT,
    output_uri   TEXT,
    sha256       TEXT,
    error        TEXT,
    updated_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (workload_uid, idx)
);
CREATE INDEX shards_pending ON shards (workload_uid, idx) WHERE state = 'pending';

-- Double-entry ledger in integer micro-credits. A charge carries charge_key
-- '<workload uid>#<shard>', unique: a second charge of a shard cannot be written.
CREATE TABLE ledger_transactions (
    id           BIGSERIAL PRIMARY KEY,
    kind         TEXT NOT NULL CHECK (kind IN ('charge', 'grant', 'refund')),
    charge_key   TEXT UNIQUE,
    workload_uid TEXT,
    shard_idx    INTEGER,
    refund_of    BIGINT UNIQUE REFERENCES ledger_transactions(id),  -- a charge is refunded once
    memo         TEXT NOT NULL DEFAULT '',
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    CHECK ((kind = 'charge') = (charge_key IS NOT NULL)),
    CHECK ((kind = 'refund') = (refund_of IS NOT NULL))
);

CREATE TABLE ledger_entries (
    id      BIGSERIAL PRIMARY KEY,
    tx_id   BIGINT NOT NULL REFERENCES ledger_transactions(id),
    account TEXT NOT NULL,
    amount  BIGINT NOT NULL
);
-- Each account's balance, kept in the same transaction as its entries; `ledger verify`
-- checks it against the sum of the entries.
CREATE TABLE accounts (
    name    TEXT PRIMARY KEY,
    balance BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX ledger_entries_account ON ledger_entries (account);
CREATE INDEX ledger_entries_tx ON ledger_entries (tx_id);

-- Every transaction balances: checked at commit, once its entries are all written.
CREATE FUNCTION ledger_check_balanced() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE total BIGINT;
BEGIN
    SELECT COALESCE(SUM(amount), 0) INTO total FROM ledger_entries WHERE tx_id = NEW.tx_id;
    IF total <> 0 THEN
        RAISE EXCEPTION 'ledger transaction % does not balance (sum %)', NEW.tx_id, total;
    END IF;
    RETURN NULL;
END $$;
CREATE CONSTRAINT TRIGGER ledger_entries_balanced AFTER INSERT ON ledger_entries
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION ledger_check_balanced();

-- Append-only event log. `seq` comes from a one-row counter updated in the writing
-- transaction: the row lock is held until commit, so sequence order is commit order and a
-- reader tailing by `seq` never misses a row that commits later with a lower number (which
-- a plain bigserial cannot promise under concurrent writers).
CREATE TABLE event_counter (
    one  BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (one),
    last BIGINT NOT NULL
);
INSERT INTO event_counter (last) VALUES (0);

-- Partitioned by time, so retention archives or drops whole partitions (monthly:
-- events_YYYYMM, made ahead by the operator) and never rewrites a row. The default partition
-- catches anything outside the made ones, so no event is ever refused.
CREATE TABLE events (
    seq          BIGINT NOT NULL,
    at           TIMESTAMPTZ NOT NULL DEFAULT now(),
    kind         TEXT NOT NULL,
    workload_uid TEXT,
    shard_idx    INTEGER,
    attempt      INTEGER,
    agent        TEXT,
    message      TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (seq, at)
) PARTITION BY RANGE (at);
CREATE TABLE events_default PARTITION OF events DEFAULT;
CREATE INDEX events_seq ON events (seq);
CREATE INDEX events_workload ON events (workload_uid, seq);
CREATE INDEX events_agent ON events (agent, seq);
CREATE INDEX events_kind ON events (kind, seq);
CREATE INDEX events_at ON events (at);

CREATE FUNCTION events_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the event log is append-only: % refused', TG_OP;
END $$;
CREATE TRIGGER events_append_only BEFORE UPDATE OR DELETE ON events
    FOR EACH ROW EXECUTE FUNCTION events_refuse_change();
CREATE TRIGGER events_no_truncate BEFORE TRUNCATE ON events
    FOR EACH STATEMENT EXECUTE FUNCTION events_refuse_change();
