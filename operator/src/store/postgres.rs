//! The Postgres backend: the store of cluster mode.
//!
//! Queries are checked against the schema at compile time (`sqlx::query!`); the offline data
//! in `operator/.sqlx/` lets builds run with no database (`SQLX_OFFLINE=true`, set in
//! `.cargo/config.toml`; `scripts/sqlx-prepare.sh` regenerates it after a query changes). The
//! only queries built at run time are the partition DDL, whose table names are data.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use sqlx::Row;
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::{Postgres, Transaction};

use super::{
    BatchJudge, Charge, ChargeOutcome, Claim, CompletionRecord, Event, EventFilter, EventKind,
    EventRow, GrantKind, RefundError, ReopenOutcome, ShardRecord, ShardSet, StatementLine, Store,
    StoreError, StoredShard, StoredWorkload, VerifyReport, WorkloadRecord, mesh_account,
    namespace_account, retried_message,
};

/// A Postgres database.
#[derive(Clone, Debug)]
pub struct PgStore {
    pool: PgPool,
}

/// How long a write waits for a pooled connection before it fails. A server that is down is
/// noticed within this (connection refused is retried until then); the core then pings the
/// store ([`crate::core::PING_TIMEOUT`]) and pauses dispatch until it answers again.
pub const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);

impl PgStore {
    /// Connects to `url` (`postgres://…`), runs the migrations and makes the event log's
    /// partitions for this month and the next two.
    pub async fn open(url: &str) -> Result<Self, StoreError> {
        // The first connection says at once which server could not be reached; later ones
        // wait for the pool as before.
        let options: sqlx::postgres::PgConnectOptions = url.parse()?;
        let server = format!("{}:{}", options.get_host(), options.get_port());
        let pool = PgPoolOptions::new()
            .max_connections(16)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(options);
        let pool = tokio::time::timeout(Duration::from_secs(10), pool)
            .await
            .map_err(|_| StoreError::Unreachable(format!("{server}: no answer within 10 s")))?
            .map_err(|e| match e {
                sqlx::Error::Io(io) => StoreError::Unreachable(format!("{server}: {io}")),
                sqlx::Error::PoolTimedOut => {
                    StoreError::Unreachable(format!("{server}: no connection within 30 s"))
                }
                other => other.into(),
            })?;
        sqlx::migrate!("./migrations/postgres").run(&pool).await?;
        let store = Self { pool };
        store
            .ensure_event_partitions(chrono::Utc::now().date_naive(), 3)
            .await?;
        Ok(store)
    }

    /// Makes the monthly event partitions from the month of `from` for `months` months, if
    /// missing (an operator calls this at start and then daily).
    pub async fn ensure_event_partitions(
        &self,
        from: chrono::NaiveDate,
        months: u32,
    ) -> Result<(), StoreError> {
        use chrono::Datelike;
        let mut start =
            chrono::NaiveDate::from_ymd_opt(from.year(), from.month(), 1).unwrap_or(from);
        // Several operators may start at once: one makes the partitions at a time.
        let mut tx = self.pool.begin().await?;
        sqlx::query!("SELECT pg_advisory_xact_lock(hashtext('infermesh.event_partitions'))")
            .fetch_one(&mut *tx)
            .await?;
        for _ in 0..months {
            let end = start
                .checked_add_months(chrono::Months::new(1))
                .unwrap_or(start);
            let name = format!("events_{}", start.format("%Y_%m"));
            // DDL with a table name: built at run time from a date, never from input.
            sqlx::query(&format!(
                "CREATE TABLE IF NOT EXISTS {name} PARTITION OF events FOR VALUES FROM ('{start}') TO ('{end}')"
            ))
            .execute(&mut *tx)
            .await?;
            start = end;
        }
        tx.commit().await?;
        Ok(())
    }

    /// The pool, for tests that reach behind the store's back.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }
}

/// Appends events in `tx` with consecutive sequence numbers taken from the counter row. The
/// row stays locked until `tx` commits, so sequence order is commit order and a reader tailing
/// by `seq` never misses a row that commits later with a lower number.
async fn insert_events(
    tx: &mut Transaction<'_, Postgres>,
    events: &[Event],
) -> Result<(), sqlx::Error> {
    let n = events.len() as i64;
    let last = sqlx::query_scalar!(
        "UPDATE event_counter SET last = last + $1 RETURNING last",
        n
    )
    .fetch_one(&mut **tx)
    .await?;
    let seqs: Vec<i64> = (last - n + 1..=last).collect();
    // Arrays carry no NULLs here: absent values travel as "" and -1 and come back as NULL.
    let kinds: Vec<String> = events.iter().map(|e| e.kind.as_str().to_string()).collect();
    let workloads: Vec<String> = events
        .iter()
        .map(|e| e.workload_uid.clone().unwrap_or_default())
        .collect();
    let shards: Vec<i32> = events
        .iter()
        .map(|e| e.shard.map_or(-1, |s| s as i32))
        .collect();
    let attempts: Vec<i32> = events
        .iter()
        .map(|e| e.attempt.map_or(-1, |a| a as i32))
        .collect();
    let agents: Vec<String> = events
        .iter()
        .map(|e| e.agent.clone().unwrap_or_default())
        .collect();
    let messages: Vec<String> = events.iter().map(|e| e.message.clone()).collect();
    sqlx::query!(
        "INSERT INTO events (seq, kind, workload_uid, shard_idx, attempt, agent, message) \
         SELECT q, k, NULLIF(w, ''), NULLIF(s, -1), NULLIF(a, -1), NULLIF(g, ''), m \
         FROM UNNEST($1::bigint[], $2::text[], $3::text[], $4::int[], $5::int[], $6::text[], $7::text[]) \
              AS u(q, k, w, s, a, g, m)",
        &seqs,
        &kinds,
        &workloads,
        &shards,
        &attempts,
        &agents,
        &messages,
    )
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Writes a transaction's entries and moves the accounts' balances with them, one statement
/// each whatever the number of entries.
async fn post(
    tx: &mut Transaction<'_, Postgres>,
    tx_ids: &[i64],
    entries: &[(String, i64)],
) -> Result<(), sqlx::Error> {
    let accounts: Vec<String> = entries.iter().map(|(a, _)| a.clone()).collect();
    let amounts: Vec<i64> = entries.iter().map(|(_, m)| *m).collect();
    sqlx::query!(
        "INSERT INTO ledger_entries (tx_id, account, amount) \
         SELECT t, a, m FROM UNNEST($1::bigint[], $2::text[], $3::bigint[]) AS u(t, a, m)",
        tx_ids,
        &accounts,
        &amounts,
    )
    .execute(&mut **tx)
    .await?;
    // Summed and sorted by name, so concurrent transactions lock account rows in one order
    // and never deadlock.
    let mut sums: BTreeMap<&str, i64> = BTreeMap::new();
    for (a, m) in entries {
        *sums.entry(a.as_str()).or_default() += m;
    }
    let names: Vec<String> = sums.keys().map(|k| k.to_string()).collect();
    let deltas: Vec<i64> = sums.values().copied().collect();
    sqlx::query!(
        "INSERT INTO accounts (name, balance) SELECT a, m FROM UNNEST($1::text[], $2::bigint[]) AS u(a, m) \
         ON CONFLICT (name) DO UPDATE SET balance = accounts.balance + excluded.balance",
        &names,
        &deltas,
    )
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// The first day after a monthly partition `events_YYYY_MM`.
fn partition_end(name: &str) -> Option<chrono::NaiveDate> {
    let ym = name.strip_prefix("events_")?;
    let (y, m) = ym.split_once('_')?;
    let start = chrono::NaiveDate::from_ymd_opt(y.parse().ok()?, m.parse().ok()?, 1)?;
    start.checked_add_months(chrono::Months::new(1))
}

/// Records a batch of completions in one transaction with a fixed number of set-based
/// statements, however large the batch: this is what makes group commit pay.
async fn complete_set(
    pool: &PgPool,
    cs: &[CompletionRecord],
) -> Result<Vec<ChargeOutcome>, sqlx::Error> {
    if cs.is_empty() {
        return Ok(Vec::new());
    }
    let judge = BatchJudge::new(cs);
    let candidates = judge.candidates();
    let mut tx = pool.begin().await?;
    let uids: Vec<String> = candidates.iter().map(|c| c.workload_uid.clone()).collect();
    let idxs: Vec<i32> = candidates.iter().map(|c| c.shard as i32).collect();
    let attempts: Vec<i32> = candidates.iter().map(|c| c.attempt as i32).collect();
    let agents: Vec<String> = candidates.iter().map(|c| c.agent.clone()).collect();
    let records: Vec<i64> = candidates.iter().map(|c| c.records as i64).collect();
    let uris: Vec<String> = candidates.iter().map(|c| c.output_uri.clone()).collect();
    let shas: Vec<String> = candidates.iter().map(|c| c.sha256.clone()).collect();
    let updated = sqlx::query!(
        "UPDATE shards s SET state = 'succeeded', records = c.records, \
                output_uri = c.uri, sha256 = c.sha, error = NULL, updated_at = now() \
         FROM UNNEST($1::text[], $2::int[], $3::int[], $4::text[], $5::bigint[], $6::text[], $7::text[]) \
              AS c(uid, idx, attempt, agent, records, uri, sha) \
         WHERE s.workload_uid = c.uid AND s.idx = c.idx \
           AND s.state = 'running' AND s.agent = c.agent AND s.attempt = c.attempt \
           AND EXISTS (SELECT 1 FROM workloads w WHERE w.uid = c.uid AND w.phase = 'Running') \
         RETURNING s.workload_uid, s.idx",
        &uids,
        &idxs,
        &attempts,
        &agents,
        &records,
        &uris,
        &shas,
    )
    .fetch_all(&mut *tx)
    .await?;
    let charged: ShardSet = updated
        .into_iter()
        .map(|r| (r.workload_uid, r.idx as u32))
        .collect();
    // A candidate the compare-and-set refused may be this very completion, committed by an
    // earlier transaction whose answer was lost: then the shard is done by that attempt on
    // that agent. Only asked when something was refused (rare).
    let mut recorded = ShardSet::default();
    if charged.len() < candidates.len() {
        let rows = sqlx::query!(
            "SELECT s.workload_uid, s.idx FROM shards s \
             JOIN UNNEST($1::text[], $2::int[], $3::int[], $4::text[]) AS c(uid, idx, attempt, agent) \
               ON s.workload_uid = c.uid AND s.idx = c.idx \
             WHERE s.state = 'succeeded' AND s.agent = c.agent AND s.attempt = c.attempt",
            &uids,
            &idxs,
            &attempts,
            &agents,
        )
        .fetch_all(&mut *tx)
        .await?;
        recorded = rows
            .into_iter()
            .map(|r| (r.workload_uid, r.idx as u32))
            .filter(|(uid, shard)| !charged.contains(uid, *shard))
            .collect();
    }
    let outcomes = judge.outcomes(&charged, &recorded);
    let (charges, events) = judge.charges_and_events(&outcomes);
    if !charges.is_empty() {
        let keys: Vec<String> = charges.iter().map(|c| c.charge_key()).collect();
        let uids: Vec<String> = charges.iter().map(|c| c.workload_uid.clone()).collect();
        let idxs: Vec<i32> = charges.iter().map(|c| c.shard as i32).collect();
        let memos: Vec<String> = charges.iter().map(|c| c.memo()).collect();
        // The unique charge_key refuses a second charge of a shard, whatever the state column said.
        let ids = sqlx::query!(
            "INSERT INTO ledger_transactions (kind, charge_key, workload_uid, shard_idx, memo) \
             SELECT 'charge', k, u, i, m FROM UNNEST($1::text[], $2::text[], $3::int[], $4::text[]) AS t(k, u, i, m) \
             RETURNING id, charge_key AS \"charge_key!\"",
            &keys,
            &uids,
            &idxs,
            &memos,
        )
        .fetch_all(&mut *tx)
        .await?;
        let id_of: HashMap<String, i64> = ids.into_iter().map(|r| (r.charge_key, r.id)).collect();
        let (mut tx_ids, mut entries) = (Vec::new(), Vec::new());
        for (c, key) in charges.iter().zip(&keys) {
            let id = id_of.get(key).copied().ok_or(sqlx::Error::RowNotFound)?;
            for entry in c.entries() {
                tx_ids.push(id);
                entries.push(entry);
            }
        }
        post(&mut tx, &tx_ids, &entries).await?;
    }
    insert_events(&mut tx, &events).await?;
    tx.commit().await?;
    Ok(outcomes)
}

/// A workload's shards, by index.
async fn stored_shards<'e>(
    db: impl sqlx::Executor<'e, Database = Postgres>,
    uid: &str,
) -> Result<Vec<StoredShard>, sqlx::Error> {
    Ok(sqlx::query!(
        "SELECT idx, start_byte, end_byte, state, attempt, attempt_base, agent, records, output_uri, sha256 \
         FROM shards WHERE workload_uid = $1 ORDER BY idx",
        uid
    )
    .fetch_all(db)
    .await?
    .into_iter()
    .map(|s| StoredShard {
        index: s.idx as u32,
        start: s.start_byte as u64,
        end: s.end_byte as u64,
        state: s.state,
        attempt: s.attempt as u32,
        attempt_base: s.attempt_base as u32,
        agent: s.agent,
        records: s.records.unwrap_or(0) as u64,
        output_uri: s.output_uri,
        sha256: s.sha256,
    })
    .collect())
}

impl Store for PgStore {
    async fn create_workload(
        &self,
        w: &WorkloadRecord,
        shards: &[ShardRecord],
    ) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        let spec: serde_json::Value =
            serde_json::from_str(&w.spec_json).unwrap_or(serde_json::Value::Null);
        sqlx::query!(
            "INSERT INTO workloads (uid, namespace, name, mesh, spec, input_bytes, shards, phase, input_version, input_files) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, 'Running', $8, $9)",
            w.uid,
            w.namespace,
            w.name,
            w.mesh,
            spec,
            w.input_bytes as i64,
            shards.len() as i32,
            w.input_version,
            w.input_files,
        )
        .execute(&mut *tx)
        .await?;
        // One statement for all shards, however many.
        let idx: Vec<i32> = shards.iter().map(|s| s.index as i32).collect();
        let starts: Vec<i64> = shards.iter().map(|s| s.start as i64).collect();
        let ends: Vec<i64> = shards.iter().map(|s| s.end as i64).collect();
        sqlx::query!(
            "INSERT INTO shards (workload_uid, idx, start_byte, end_byte, state) \
             SELECT $1, i, s, e, 'pending' FROM UNNEST($2::int[], $3::bigint[], $4::bigint[]) AS t(i, s, e)",
            w.uid,
            &idx,
            &starts,
            &ends,
        )
        .execute(&mut *tx)
        .await?;
        let msg = format!(
            "{}/{} admitted on mesh {}: {} bytes in {} shards",
            w.namespace,
            w.name,
            w.mesh,
            w.input_bytes,
            shards.len()
        );
        insert_events(
            &mut tx,
            &[Event::new(EventKind::WorkloadAdmitted, msg).workload(&w.uid)],
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn assign_batch(&self, claims: &[Claim]) -> Result<Vec<bool>, StoreError> {
        if claims.is_empty() {
            return Ok(Vec::new());
        }
        let uids: Vec<String> = claims.iter().map(|c| c.uid.clone()).collect();
        let idxs: Vec<i32> = claims.iter().map(|c| c.shard as i32).collect();
        let attempts: Vec<i32> = claims.iter().map(|c| c.attempt as i32).collect();
        let agents: Vec<String> = claims.iter().map(|c| c.agent.clone()).collect();
        let mut tx = self.pool.begin().await?;
        // The whole round in one statement: each claim is a compare-and-set on state and attempt.
        let accepted: ShardSet = sqlx::query!(
            "UPDATE shards s SET state = 'running', attempt = c.attempt, agent = c.agent, updated_at = now() \
             FROM UNNEST($1::text[], $2::int[], $3::int[], $4::text[]) AS c(uid, idx, attempt, agent) \
             WHERE s.workload_uid = c.uid AND s.idx = c.idx AND s.state = 'pending' AND s.attempt = c.attempt - 1 \
             RETURNING s.workload_uid, s.idx",
            &uids,
            &idxs,
            &attempts,
            &agents,
        )
        .fetch_all(&mut *tx)
        .await?
        .into_iter()
        .map(|r| (r.workload_uid, r.idx as u32))
        .collect();
        let (won, events) = super::claims_won(claims, &accepted);
        if !events.is_empty() {
            insert_events(&mut tx, &events).await?;
        }
        tx.commit().await?;
        Ok(won)
    }

    async fn ensure_account(&self, name: &str) -> Result<(), StoreError> {
        sqlx::query!(
            "INSERT INTO accounts (name, balance) VALUES ($1, 0) ON CONFLICT (name) DO NOTHING",
            name
        )
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn meshes(&self) -> Result<Vec<String>, StoreError> {
        Ok(sqlx::query_scalar!(
            "SELECT mesh AS \"mesh!\" FROM workloads UNION SELECT substr(name, 6) FROM accounts \
             WHERE name LIKE 'mesh/%' ORDER BY 1"
        )
        .fetch_all(&self.pool)
        .await?)
    }

    async fn workload_phase(&self, uid: &str) -> Result<Option<String>, StoreError> {
        Ok(
            sqlx::query_scalar!("SELECT phase FROM workloads WHERE uid = $1", uid)
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    async fn workloads_in_phase(&self, phase: &str) -> Result<Vec<StoredWorkload>, StoreError> {
        let rows = sqlx::query!(
            "SELECT uid, namespace, name, mesh, spec::text AS \"spec!\", input_bytes, input_version, input_files FROM workloads \
             WHERE phase = $1 ORDER BY created_at, uid",
            phase
        )
        .fetch_all(&self.pool)
        .await?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            let shards = stored_shards(&self.pool, &r.uid).await?;
            let record = WorkloadRecord {
                uid: r.uid,
                namespace: r.namespace,
                name: r.name,
                mesh: r.mesh,
                spec_json: r.spec,
                input_bytes: r.input_bytes as u64,
                input_version: r.input_version,
                input_files: r.input_files,
            };
            out.push(StoredWorkload { record, shards });
        }
        Ok(out)
    }

    async fn complete_batch(
        &self,
        cs: &[CompletionRecord],
    ) -> Result<Vec<ChargeOutcome>, StoreError> {
        match complete_set(&self.pool, cs).await {
            Ok(outcomes) => Ok(outcomes),
            // The unique charge key refused a charge the state column let through (a ledger
            // changed behind our back): record the batch one by one, so only that charge fails.
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() && cs.len() > 1 => {
                let mut outcomes = Vec::with_capacity(cs.len());
                for c in cs {
                    outcomes.push(complete_set(&self.pool, std::slice::from_ref(c)).await?[0]);
                }
                Ok(outcomes)
            }
            Err(e) => Err(e.into()),
        }
    }

    async fn requeue(
        &self,
        uid: &str,
        shard: u32,
        attempt: u32,
        agent: Option<&str>,
        reason: &str,
    ) -> Result<bool, StoreError> {
        let mut tx = self.pool.begin().await?;
        let held = sqlx::query!(
            "UPDATE shards SET state = 'pending', agent = NULL, error = $1, updated_at = now() \
             WHERE workload_uid = $2 AND idx = $3 AND state = 'running' AND attempt = $4",
            reason,
            uid,
            shard as i32,
            attempt as i32,
        )
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        if !held {
            return Ok(false);
        }
        let mut e = Event::new(EventKind::ShardRequeued, reason)
            .workload(uid)
            .shard(shard, attempt);
        e.agent = agent.map(str::to_string);
        insert_events(&mut tx, &[e]).await?;
        tx.commit().await?;
        Ok(true)
    }

    async fn fail_shard(
        &self,
        uid: &str,
        shard: u32,
        attempt: u32,
        agent: Option<&str>,
        message: &str,
    ) -> Result<bool, StoreError> {
        let mut tx = self.pool.begin().await?;
        let held = sqlx::query!(
            "UPDATE shards SET state = 'failed', error = $1, updated_at = now() \
             WHERE workload_uid = $2 AND idx = $3 AND state <> 'succeeded' AND attempt = $4",
            message,
            uid,
            shard as i32,
            attempt as i32,
        )
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        if !held {
            return Ok(false);
        }
        let mut e = Event::new(EventKind::ShardFailed, message)
            .workload(uid)
            .shard(shard, attempt);
        e.agent = agent.map(str::to_string);
        insert_events(&mut tx, &[e]).await?;
        tx.commit().await?;
        Ok(true)
    }

    async fn finish_workload(
        &self,
        uid: &str,
        phase: &str,
        message: &str,
    ) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query!(
            "UPDATE workloads SET phase = $1, message = $2, finished_at = now() WHERE uid = $3",
            phase,
            message,
            uid,
        )
        .execute(&mut *tx)
        .await?;
        let kind = if phase == "Succeeded" {
            EventKind::WorkloadSucceeded
        } else {
            EventKind::WorkloadFailed
        };
        insert_events(&mut tx, &[Event::new(kind, message).workload(uid)]).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn reopen_failed(&self, uid: &str) -> Result<ReopenOutcome, StoreError> {
        let mut tx = self.pool.begin().await?;
        // The compare-and-set on the phase locks the workload's row: of two retries at once,
        // one reopens and the other then finds it running.
        let reopened = sqlx::query!(
            "UPDATE workloads SET phase = 'Running', message = NULL, finished_at = NULL, started_at = now() \
             WHERE uid = $1 AND phase = 'Failed'",
            uid
        )
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        if !reopened {
            let phase = sqlx::query_scalar!("SELECT phase FROM workloads WHERE uid = $1", uid)
                .fetch_optional(&mut *tx)
                .await?;
            return Ok(match phase {
                Some(phase) => ReopenOutcome::NotFailed { phase },
                None => ReopenOutcome::Unknown,
            });
        }
        // Locked until the commit: a completion racing for one of them (an attempt committed
        // as its workload failed) either lands first, and its shard stays succeeded, or finds
        // the shard pending and is refused.
        let states = sqlx::query_scalar!(
            "SELECT state FROM shards WHERE workload_uid = $1 AND state <> 'succeeded' ORDER BY idx FOR UPDATE",
            uid
        )
        .fetch_all(&mut *tx)
        .await?;
        let requeued = states.len() as u32;
        let failed = states.iter().filter(|s| *s == "failed").count() as u32;
        sqlx::query!(
            "UPDATE shards SET state = 'pending', agent = NULL, attempt_base = attempt, updated_at = now() \
             WHERE workload_uid = $1 AND state <> 'succeeded'",
            uid
        )
        .execute(&mut *tx)
        .await?;
        let r = sqlx::query!(
            "SELECT uid, namespace, name, mesh, spec::text AS \"spec!\", input_bytes, input_version, input_files FROM workloads \
             WHERE uid = $1",
            uid
        )
        .fetch_one(&mut *tx)
        .await?;
        let shards = stored_shards(&mut *tx, uid).await?;
        let record = WorkloadRecord {
            uid: r.uid,
            namespace: r.namespace,
            name: r.name,
            mesh: r.mesh,
            spec_json: r.spec,
            input_bytes: r.input_bytes as u64,
            input_version: r.input_version,
            input_files: r.input_files,
        };
        let kept = (shards.len() as u32).saturating_sub(requeued);
        insert_events(
            &mut tx,
            &[Event::new(
                EventKind::WorkloadRetried,
                retried_message(requeued, failed, kept),
            )
            .workload(uid)],
        )
        .await?;
        tx.commit().await?;
        Ok(ReopenOutcome::Reopened {
            workload: Box::new(StoredWorkload { record, shards }),
            requeued,
            failed,
            kept,
        })
    }

    async fn running_for(&self, uid: &str) -> Result<Option<std::time::Duration>, StoreError> {
        let seconds = sqlx::query_scalar!(
            "SELECT EXTRACT(EPOCH FROM now() - COALESCE(started_at, created_at))::float8 AS \"s!\" \
             FROM workloads WHERE uid = $1",
            uid
        )
        .fetch_optional(&self.pool)
        .await?;
        Ok(seconds.map(|s| std::time::Duration::try_from_secs_f64(s.max(0.0)).unwrap_or_default()))
    }

    async fn append(&self, event: &Event) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        insert_events(&mut tx, std::slice::from_ref(event)).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn events(&self, f: &EventFilter) -> Result<Vec<EventRow>, StoreError> {
        let since: Option<chrono::DateTime<chrono::Utc>> = match &f.since {
            Some(s) => Some(
                chrono::DateTime::parse_from_rfc3339(s)
                    .map_err(|_| StoreError::Unsupported("--since takes an RFC 3339 time"))?
                    .with_timezone(&chrono::Utc),
            ),
            None => None,
        };
        // Only the filters given are in the statement, so the planner can use the log's
        // indexes (a generic plan of `($1 IS NULL OR col = $1)` cannot).
        let mut q = sqlx::QueryBuilder::<sqlx::Postgres>::new(
            "SELECT seq, to_char(at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"') AS at, kind, \
                    workload_uid, shard_idx, attempt, agent, message \
             FROM events WHERE seq > ",
        );
        q.push_bind(f.after_seq.unwrap_or(0));
        f.push_equalities(&mut q);
        if let Some(since) = since {
            q.push(" AND at >= ").push_bind(since);
        }
        q.push(" ORDER BY seq");
        if let Some(limit) = f.limit {
            q.push(" LIMIT ").push_bind(limit);
        }
        let rows = q.build().fetch_all(&self.pool).await?;
        rows.iter()
            .map(|r| {
                Ok(EventRow {
                    seq: r.try_get("seq")?,
                    at: r.try_get("at")?,
                    kind: r.try_get("kind")?,
                    workload_uid: r.try_get("workload_uid")?,
                    shard: r.try_get::<Option<i32>, _>("shard_idx")?.map(i64::from),
                    attempt: r.try_get::<Option<i32>, _>("attempt")?.map(i64::from),
                    agent: r.try_get("agent")?,
                    message: r.try_get("message")?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(StoreError::from)
    }

    async fn balances(&self) -> Result<Vec<(String, i64)>, StoreError> {
        let rows = sqlx::query!(
            "SELECT account, SUM(amount)::bigint AS \"balance!\" FROM ledger_entries GROUP BY account ORDER BY account"
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(|r| (r.account, r.balance)).collect())
    }

    async fn charges(&self, uid: &str) -> Result<Vec<Charge>, StoreError> {
        let rows = sqlx::query!(
            "SELECT t.workload_uid, t.shard_idx, \
                    MAX(e.account) FILTER (WHERE e.account LIKE 'namespace/%') AS debit, \
                    MAX(e.account) FILTER (WHERE e.account LIKE 'agent/%') AS credit, \
                    MAX(e.amount) FILTER (WHERE e.account LIKE 'agent/%') AS amount \
             FROM ledger_transactions t JOIN ledger_entries e ON e.tx_id = t.id \
             WHERE t.kind = 'charge' AND t.workload_uid = $1 \
             GROUP BY t.id ORDER BY t.shard_idx",
            uid
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| Charge {
                workload_uid: r.workload_uid.unwrap_or_default(),
                shard: r.shard_idx.unwrap_or(0) as u32,
                from: r.debit.unwrap_or_default(),
                to: r.credit.unwrap_or_default(),
                amount: r.amount.unwrap_or(0),
            })
            .collect())
    }

    async fn verify(&self) -> Result<VerifyReport, StoreError> {
        let counts = sqlx::query!(
            "SELECT (SELECT COUNT(*) FROM ledger_transactions) AS \"t!\", (SELECT COUNT(*) FROM accounts) AS \"a!\""
        )
        .fetch_one(&self.pool)
        .await?;
        let unbalanced = sqlx::query_scalar!(
            "SELECT t.id FROM ledger_transactions t LEFT JOIN ledger_entries e ON e.tx_id = t.id \
             GROUP BY t.id HAVING COALESCE(SUM(e.amount), 0) <> 0 OR COUNT(e.id) = 0 ORDER BY t.id"
        )
        .fetch_all(&self.pool)
        .await?;
        let mismatched = sqlx::query!(
            "WITH sums AS (SELECT account, SUM(amount)::bigint AS total FROM ledger_entries GROUP BY account) \
             SELECT a.name AS \"name!\", a.balance AS \"stored!\", COALESCE(s.total, 0)::bigint AS \"total!\" \
             FROM accounts a LEFT JOIN sums s ON s.account = a.name WHERE a.balance <> COALESCE(s.total, 0) \
             UNION ALL SELECT s.account, 0::bigint, s.total FROM sums s \
             WHERE NOT EXISTS (SELECT 1 FROM accounts a WHERE a.name = s.account) ORDER BY 1"
        )
        .fetch_all(&self.pool)
        .await?;
        let not_once = sqlx::query!(
            "SELECT s.workload_uid, s.idx::bigint AS \"idx!\", COUNT(t.id) AS \"n!\" FROM shards s \
             LEFT JOIN ledger_transactions t ON t.kind = 'charge' AND t.workload_uid = s.workload_uid AND t.shard_idx = s.idx \
             WHERE s.state = 'succeeded' GROUP BY s.workload_uid, s.idx HAVING COUNT(t.id) <> 1 ORDER BY 1, 2"
        )
        .fetch_all(&self.pool)
        .await?;
        let orphans = sqlx::query_scalar!(
            "SELECT t.id FROM ledger_transactions t \
             LEFT JOIN shards s ON s.workload_uid = t.workload_uid AND s.idx = t.shard_idx \
             WHERE t.kind = 'charge' AND (s.state IS NULL OR s.state <> 'succeeded') ORDER BY t.id"
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(VerifyReport {
            transactions: counts.t,
            accounts: counts.a,
            unbalanced_transactions: unbalanced,
            account_mismatches: mismatched
                .into_iter()
                .map(|r| (r.name, r.stored, r.total))
                .collect(),
            shards_not_charged_once: not_once
                .into_iter()
                .map(|r| (r.workload_uid, r.idx, r.n))
                .collect(),
            charges_without_success: orphans,
        })
    }

    async fn grant(
        &self,
        kind: GrantKind,
        namespace: &str,
        mesh: &str,
        amount: i64,
        memo: &str,
    ) -> Result<i64, StoreError> {
        let mut tx = self.pool.begin().await?;
        let tx_id = sqlx::query_scalar!(
            "INSERT INTO ledger_transactions (kind, memo) VALUES ($1, $2) RETURNING id",
            kind.as_str(),
            memo
        )
        .fetch_one(&mut *tx)
        .await?;
        post(
            &mut tx,
            &[tx_id, tx_id],
            &[
                (mesh_account(mesh), -amount),
                (namespace_account(namespace), amount),
            ],
        )
        .await?;
        tx.commit().await?;
        Ok(tx_id)
    }

    async fn granted(&self, namespace: &str, mesh: &str) -> Result<i64, StoreError> {
        let total = sqlx::query_scalar!(
            "SELECT SUM(e.amount)::bigint FROM ledger_entries e JOIN ledger_transactions t ON t.id = e.tx_id \
             WHERE t.kind = 'budget' AND e.account = $1 AND EXISTS \
               (SELECT 1 FROM ledger_entries o WHERE o.tx_id = t.id AND o.account = $2)",
            namespace_account(namespace),
            mesh_account(mesh),
        )
        .fetch_one(&self.pool)
        .await?;
        Ok(total.unwrap_or(0))
    }

    async fn refund(&self, charge: i64, memo: &str) -> Result<i64, RefundError> {
        let mut tx = self.pool.begin().await.map_err(StoreError::from)?;
        let row = sqlx::query!(
            "SELECT kind, workload_uid, shard_idx FROM ledger_transactions WHERE id = $1",
            charge
        )
        .fetch_optional(&mut *tx)
        .await
        .map_err(StoreError::from)?;
        let Some(row) = row.filter(|r| r.kind == "charge") else {
            return Err(RefundError::NotACharge(charge));
        };
        let entries: Vec<(String, i64)> = sqlx::query!(
            "SELECT account, amount FROM ledger_entries WHERE tx_id = $1 ORDER BY id",
            charge
        )
        .fetch_all(&mut *tx)
        .await
        .map_err(StoreError::from)?
        .into_iter()
        .map(|r| (r.account, -r.amount))
        .collect();
        let inserted = sqlx::query_scalar!(
            "INSERT INTO ledger_transactions (kind, refund_of, workload_uid, shard_idx, memo) \
             VALUES ('refund', $1, $2, $3, $4) RETURNING id",
            charge,
            row.workload_uid,
            row.shard_idx,
            memo,
        )
        .fetch_one(&mut *tx)
        .await;
        let tx_id = match inserted {
            Ok(id) => id,
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
                return Err(RefundError::AlreadyRefunded(charge));
            }
            Err(e) => return Err(StoreError::from(e).into()),
        };
        let ids = vec![tx_id; entries.len()];
        post(&mut tx, &ids, &entries)
            .await
            .map_err(StoreError::from)?;
        tx.commit().await.map_err(StoreError::from)?;
        Ok(tx_id)
    }

    async fn prune_events(&self, before: &str, archive: bool) -> Result<Vec<String>, StoreError> {
        let cutoff = chrono::NaiveDate::parse_from_str(before, "%Y-%m-%d")
            .map_err(|_| StoreError::Unsupported("--before takes a date, YYYY-MM-DD"))?;
        let partitions = sqlx::query_scalar!(
            "SELECT c.relname::text AS \"name!\" FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid \
             WHERE i.inhparent = 'events'::regclass ORDER BY 1"
        )
        .fetch_all(&self.pool)
        .await?;
        let mut removed = Vec::new();
        for name in partitions {
            // Only whole months that end by the cut-off; never the default partition.
            if partition_end(&name).is_none_or(|end| end > cutoff) {
                continue;
            }
            let mut tx = self.pool.begin().await?;
            sqlx::query(&format!("ALTER TABLE events DETACH PARTITION {name}"))
                .execute(&mut *tx)
                .await?;
            if !archive {
                sqlx::query(&format!("DROP TABLE {name}"))
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await?;
            removed.push(name);
        }
        Ok(removed)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    async fn balance(&self, account: &str) -> Result<i64, StoreError> {
        let b = sqlx::query_scalar!("SELECT balance FROM accounts WHERE name = $1", account)
            .fetch_optional(&self.pool)
            .await?;
        Ok(b.unwrap_or(0))
    }

    async fn statement(
        &self,
        account: &str,
        from: &str,
        to: &str,
    ) -> Result<Vec<StatementLine>, StoreError> {
        let time = |s: &str| {
            chrono::DateTime::parse_from_rfc3339(s)
                .map(|t| t.with_timezone(&chrono::Utc))
                .map_err(|_| StoreError::Unsupported("--from and --to take RFC 3339 times"))
        };
        let rows = sqlx::query!(
            "SELECT t.id, t.kind, to_char(t.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"') AS \"at!\", \
                    e.amount, t.workload_uid, t.shard_idx, t.memo \
             FROM ledger_entries e JOIN ledger_transactions t ON t.id = e.tx_id \
             WHERE e.account = $1 AND t.created_at >= $2 AND t.created_at <= $3 ORDER BY t.id, e.id",
            account,
            time(from)?,
            time(to)?,
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| StatementLine {
                tx_id: r.id,
                kind: r.kind,
                at: r.at,
                amount: r.amount,
                workload_uid: r.workload_uid,
                shard: r.shard_idx.map(i64::from),
                memo: r.memo,
            })
            .collect())
    }
}
