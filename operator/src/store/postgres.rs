//! The Postgres backend: the store of cluster mode.

use std::time::Duration;

use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::{Postgres, Row, Transaction};

use super::{
    Charge, ChargeOutcome, CompletionRecord, Event, EventFilter, EventKind, EventRow, RefundError,
    ShardRecord, StatementLine, Store, StoreError, StoredShard, StoredWorkload, VerifyReport,
    WorkloadRecord, mesh_account, namespace_account,
};

/// A Postgres database.
#[derive(Clone, Debug)]
pub struct PgStore {
    pool: PgPool,
}

impl PgStore {
    /// Connects to `url` (`postgres://…`) and runs the migrations.
    pub async fn open(url: &str) -> Result<Self, StoreError> {
        let pool = PgPoolOptions::new()
            .max_connections(16)
            .acquire_timeout(Duration::from_secs(30))
            .connect(url)
            .await?;
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
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext('infermesh.event_partitions'))")
            .execute(&mut *tx)
            .await?;
        for _ in 0..months {
            let end = start
                .checked_add_months(chrono::Months::new(1))
                .unwrap_or(start);
            let name = format!("events_{}", start.format("%Y_%m"));
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

/// Appends an event in `tx`. The counter row is locked until `tx` commits, so `seq` order is
/// commit order.
async fn insert_event(tx: &mut Transaction<'_, Postgres>, e: &Event) -> Result<(), sqlx::Error> {
    sqlx::query(
        "WITH next AS (UPDATE event_counter SET last = last + 1 RETURNING last) \
         INSERT INTO events (seq, kind, workload_uid, shard_idx, attempt, agent, message) \
         SELECT last, $1, $2, $3, $4, $5, $6 FROM next",
    )
    .bind(e.kind.as_str())
    .bind(&e.workload_uid)
    .bind(e.shard.map(|s| s as i32))
    .bind(e.attempt.map(|a| a as i32))
    .bind(&e.agent)
    .bind(&e.message)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Writes a transaction's entries and moves the accounts' balances with them, one statement
/// each whatever the number of entries.
async fn post(
    tx: &mut Transaction<'_, Postgres>,
    tx_id: i64,
    entries: &[(String, i64)],
) -> Result<(), sqlx::Error> {
    let accounts: Vec<&str> = entries.iter().map(|(a, _)| a.as_str()).collect();
    let amounts: Vec<i64> = entries.iter().map(|(_, m)| *m).collect();
    sqlx::query(
        "INSERT INTO ledger_entries (tx_id, account, amount) SELECT $1, a, m FROM UNNEST($2::text[], $3::bigint[]) AS u(a, m)",
    )
    .bind(tx_id)
    .bind(&accounts)
    .bind(&amounts)
    .execute(&mut **tx)
    .await?;
    // Sorted, so concurrent transactions lock account rows in one order and never deadlock.
    let mut sums: std::collections::BTreeMap<&str, i64> = std::collections::BTreeMap::new();
    for (a, m) in entries {
        *sums.entry(a.as_str()).or_default() += m;
    }
    let names: Vec<&str> = sums.keys().copied().collect();
    let deltas: Vec<i64> = sums.values().copied().collect();
    sqlx::query(
        "INSERT INTO accounts (name, balance) SELECT a, m FROM UNNEST($1::text[], $2::bigint[]) AS u(a, m) \
         ON CONFLICT (name) DO UPDATE SET balance = accounts.balance + excluded.balance",
    )
    .bind(&names)
    .bind(&deltas)
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
    use std::collections::{BTreeMap, HashMap, HashSet};
    if cs.is_empty() {
        return Ok(Vec::new());
    }
    // Within the batch the first completion of a shard is its candidate; later ones are
    // duplicates whatever the database says.
    let mut first: HashMap<(&str, u32), usize> = HashMap::new();
    for (i, c) in cs.iter().enumerate() {
        first.entry((c.workload_uid.as_str(), c.shard)).or_insert(i);
    }
    let candidates: Vec<&CompletionRecord> = cs
        .iter()
        .enumerate()
        .filter(|(i, c)| first.get(&(c.workload_uid.as_str(), c.shard)) == Some(i))
        .map(|(_, c)| c)
        .collect();
    let mut tx = pool.begin().await?;
    let col =
        |f: fn(&CompletionRecord) -> String| candidates.iter().map(|c| f(c)).collect::<Vec<_>>();
    let updated = sqlx::query(
        "UPDATE shards s SET state = 'succeeded', attempt = c.attempt, agent = c.agent, records = c.records, \
                output_uri = c.uri, sha256 = c.sha, error = NULL, updated_at = now() \
         FROM UNNEST($1::text[], $2::int[], $3::int[], $4::text[], $5::bigint[], $6::text[], $7::text[]) \
              AS c(uid, idx, attempt, agent, records, uri, sha) \
         WHERE s.workload_uid = c.uid AND s.idx = c.idx AND s.state <> 'succeeded' \
         RETURNING s.workload_uid, s.idx",
    )
    .bind(col(|c| c.workload_uid.clone()))
    .bind(candidates.iter().map(|c| c.shard as i32).collect::<Vec<_>>())
    .bind(candidates.iter().map(|c| c.attempt as i32).collect::<Vec<_>>())
    .bind(col(|c| c.agent.clone()))
    .bind(candidates.iter().map(|c| c.records as i64).collect::<Vec<_>>())
    .bind(col(|c| c.output_uri.clone()))
    .bind(col(|c| c.sha256.clone()))
    .fetch_all(&mut *tx)
    .await?;
    let mut charged: HashSet<(String, u32)> = HashSet::new();
    for r in &updated {
        charged.insert((r.try_get(0)?, r.try_get::<i32, _>(1)? as u32));
    }
    let outcomes: Vec<ChargeOutcome> = cs
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let is_first = first.get(&(c.workload_uid.as_str(), c.shard)) == Some(&i);
            if is_first && charged.contains(&(c.workload_uid.clone(), c.shard)) {
                ChargeOutcome::Charged
            } else {
                ChargeOutcome::Duplicate
            }
        })
        .collect();
    let charges: Vec<&CompletionRecord> = cs
        .iter()
        .zip(&outcomes)
        .filter(|(_, o)| **o == ChargeOutcome::Charged)
        .map(|(c, _)| c)
        .collect();
    if !charges.is_empty() {
        let keys: Vec<String> = charges.iter().map(|c| c.charge_key()).collect();
        let ids = sqlx::query(
            "INSERT INTO ledger_transactions (kind, charge_key, workload_uid, shard_idx, memo) \
             SELECT 'charge', k, u, i, m FROM UNNEST($1::text[], $2::text[], $3::int[], $4::text[]) AS t(k, u, i, m) \
             RETURNING id, charge_key",
        )
        .bind(&keys)
        .bind(charges.iter().map(|c| c.workload_uid.clone()).collect::<Vec<_>>())
        .bind(charges.iter().map(|c| c.shard as i32).collect::<Vec<_>>())
        .bind(charges.iter().map(|c| c.memo()).collect::<Vec<_>>())
        .fetch_all(&mut *tx)
        .await?;
        let mut id_of: HashMap<String, i64> = HashMap::new();
        for r in &ids {
            id_of.insert(r.try_get(1)?, r.try_get(0)?);
        }
        let (mut tx_ids, mut accounts, mut amounts) = (Vec::new(), Vec::new(), Vec::new());
        let mut deltas: BTreeMap<String, i64> = BTreeMap::new();
        for (c, key) in charges.iter().zip(&keys) {
            let id = id_of
                .get(key)
                .copied()
                .ok_or_else(|| sqlx::Error::RowNotFound)?;
            for (account, amount) in c.entries() {
                *deltas.entry(account.clone()).or_default() += amount;
                tx_ids.push(id);
                accounts.push(account);
                amounts.push(amount);
            }
        }
        sqlx::query(
            "INSERT INTO ledger_entries (tx_id, account, amount) \
             SELECT t, a, m FROM UNNEST($1::bigint[], $2::text[], $3::bigint[]) AS u(t, a, m)",
        )
        .bind(&tx_ids)
        .bind(&accounts)
        .bind(&amounts)
        .execute(&mut *tx)
        .await?;
        // Sorted by name (BTreeMap), so concurrent batches lock account rows in one order.
        sqlx::query(
            "INSERT INTO accounts (name, balance) SELECT a, m FROM UNNEST($1::text[], $2::bigint[]) AS u(a, m) \
             ON CONFLICT (name) DO UPDATE SET balance = accounts.balance + excluded.balance",
        )
        .bind(deltas.keys().cloned().collect::<Vec<_>>())
        .bind(deltas.values().copied().collect::<Vec<_>>())
        .execute(&mut *tx)
        .await?;
    }
    let events: Vec<Event> = cs.iter().zip(&outcomes).map(|(c, o)| c.event(*o)).collect();
    insert_events(&mut tx, &events).await?;
    tx.commit().await?;
    Ok(outcomes)
}

/// Appends events in `tx` with consecutive sequence numbers taken from the counter row in
/// one step (see [`insert_event`]).
async fn insert_events(
    tx: &mut Transaction<'_, Postgres>,
    events: &[Event],
) -> Result<(), sqlx::Error> {
    let n = events.len() as i64;
    let last: i64 = sqlx::query("UPDATE event_counter SET last = last + $1 RETURNING last")
        .bind(n)
        .fetch_one(&mut **tx)
        .await?
        .try_get(0)?;
    let seqs: Vec<i64> = (last - n + 1..=last).collect();
    sqlx::query(
        "INSERT INTO events (seq, kind, workload_uid, shard_idx, attempt, agent, message) \
         SELECT * FROM UNNEST($1::bigint[], $2::text[], $3::text[], $4::int[], $5::int[], $6::text[], $7::text[])",
    )
    .bind(&seqs)
    .bind(events.iter().map(|e| e.kind.as_str()).collect::<Vec<_>>())
    .bind(events.iter().map(|e| e.workload_uid.clone()).collect::<Vec<_>>())
    .bind(events.iter().map(|e| e.shard.map(|s| s as i32)).collect::<Vec<_>>())
    .bind(events.iter().map(|e| e.attempt.map(|a| a as i32)).collect::<Vec<_>>())
    .bind(events.iter().map(|e| e.agent.clone()).collect::<Vec<_>>())
    .bind(events.iter().map(|e| e.message.clone()).collect::<Vec<_>>())
    .execute(&mut **tx)
    .await?;
    Ok(())
}

impl Store for PgStore {
    async fn create_workload(
        &self,
        w: &WorkloadRecord,
        shards: &[ShardRecord],
    ) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO workloads (uid, namespace, name, mesh, spec, input_bytes, shards, phase) \
             VALUES ($1, $2, $3, $4, $5::jsonb, $6, $7, 'Running')",
        )
        .bind(&w.uid)
        .bind(&w.namespace)
        .bind(&w.name)
        .bind(&w.mesh)
        .bind(&w.spec_json)
        .bind(w.input_bytes as i64)
        .bind(shards.len() as i32)
        .execute(&mut *tx)
        .await?;
        // One statement for all shards, however many.
        let idx: Vec<i32> = shards.iter().map(|s| s.index as i32).collect();
        let starts: Vec<i64> = shards.iter().map(|s| s.start as i64).collect();
        let ends: Vec<i64> = shards.iter().map(|s| s.end as i64).collect();
        sqlx::query(
            "INSERT INTO shards (workload_uid, idx, start_byte, end_byte, state) \
             SELECT $1, i, s, e, 'pending' FROM UNNEST($2::int[], $3::bigint[], $4::bigint[]) AS t(i, s, e)",
        )
        .bind(&w.uid)
        .bind(&idx)
        .bind(&starts)
        .bind(&ends)
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
        insert_event(
            &mut tx,
            &Event::new(EventKind::WorkloadAdmitted, msg).workload(&w.uid),
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn assign(
        &self,
        uid: &str,
        shard: u32,
        attempt: u32,
        agent: &str,
    ) -> Result<bool, StoreError> {
        let mut tx = self.pool.begin().await?;
        let claimed = sqlx::query(
            "UPDATE shards SET state = 'running', attempt = $1, agent = $2, updated_at = now() \
             WHERE workload_uid = $3 AND idx = $4 AND state = 'pending' AND attempt = $1 - 1",
        )
        .bind(attempt as i32)
        .bind(agent)
        .bind(uid)
        .bind(shard as i32)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        if claimed {
            let e = Event::new(
                EventKind::ShardAssigned,
                format!("attempt {attempt} on {agent}"),
            )
            .workload(uid)
            .shard(shard, attempt)
            .agent(agent);
            insert_event(&mut tx, &e).await?;
        }
        tx.commit().await?;
        Ok(claimed)
    }

    async fn active_workloads(&self) -> Result<Vec<StoredWorkload>, StoreError> {
        let rows = sqlx::query("SELECT uid, namespace, name, mesh, spec::text AS spec, input_bytes FROM workloads WHERE phase = 'Running' ORDER BY created_at, uid").fetch_all(&self.pool).await?;
        let mut out = Vec::with_capacity(rows.len());
        for r in &rows {
            let record = WorkloadRecord {
                uid: r.try_get("uid")?,
                namespace: r.try_get("namespace")?,
                name: r.try_get("name")?,
                mesh: r.try_get("mesh")?,
                spec_json: r.try_get::<String, _>("spec")?,
                input_bytes: r.try_get::<i64, _>("input_bytes")? as u64,
            };
            let shard_rows = sqlx::query(
                "SELECT idx::bigint AS idx, start_byte, end_byte, state, attempt::bigint AS attempt, agent, records, output_uri, sha256 \
                 FROM shards WHERE workload_uid = $1 ORDER BY idx",
            )
            .bind(&record.uid)
            .fetch_all(&self.pool)
            .await?;
            let shards = shard_rows
                .iter()
                .map(|s| {
                    Ok(StoredShard {
                        index: s.try_get::<i64, _>("idx")? as u32,
                        start: s.try_get::<i64, _>("start_byte")? as u64,
                        end: s.try_get::<i64, _>("end_byte")? as u64,
                        state: s.try_get("state")?,
                        attempt: s.try_get::<i64, _>("attempt")? as u32,
                        agent: s.try_get("agent")?,
                        records: s.try_get::<Option<i64>, _>("records")?.unwrap_or(0) as u64,
                        output_uri: s.try_get("output_uri")?,
                        sha256: s.try_get("sha256")?,
                    })
                })
                .collect::<Result<Vec<_>, sqlx::Error>>()?;
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
    ) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "UPDATE shards SET state = 'pending', agent = NULL, error = $1, updated_at = now() \
             WHERE workload_uid = $2 AND idx = $3 AND state = 'running'",
        )
        .bind(reason)
        .bind(uid)
        .bind(shard as i32)
        .execute(&mut *tx)
        .await?;
        let mut e = Event::new(EventKind::ShardRequeued, reason)
            .workload(uid)
            .shard(shard, attempt);
        e.agent = agent.map(str::to_string);
        insert_event(&mut tx, &e).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn fail_shard(
        &self,
        uid: &str,
        shard: u32,
        attempt: u32,
        agent: Option<&str>,
        message: &str,
    ) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "UPDATE shards SET state = 'failed', error = $1, updated_at = now() \
             WHERE workload_uid = $2 AND idx = $3 AND state <> 'succeeded'",
        )
        .bind(message)
        .bind(uid)
        .bind(shard as i32)
        .execute(&mut *tx)
        .await?;
        let mut e = Event::new(EventKind::ShardFailed, message)
            .workload(uid)
            .shard(shard, attempt);
        e.agent = agent.map(str::to_string);
        insert_event(&mut tx, &e).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn finish_workload(
        &self,
        uid: &str,
        phase: &str,
        message: &str,
    ) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "UPDATE workloads SET phase = $1, message = $2, finished_at = now() WHERE uid = $3",
        )
        .bind(phase)
        .bind(message)
        .bind(uid)
        .execute(&mut *tx)
        .await?;
        let kind = if phase == "Succeeded" {
            EventKind::WorkloadSucceeded
        } else {
            EventKind::WorkloadFailed
        };
        insert_event(&mut tx, &Event::new(kind, message).workload(uid)).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn append(&self, event: &Event) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        insert_event(&mut tx, event).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn events(&self, f: &EventFilter) -> Result<Vec<EventRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT seq, to_char(at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"') AS at, kind, \
                    workload_uid, shard_idx::bigint AS shard_idx, attempt::bigint AS attempt, agent, message \
             FROM events \
             WHERE ($1::text IS NULL OR workload_uid = $1) AND ($2::text IS NULL OR agent = $2) \
               AND ($3::text IS NULL OR kind = $3) AND seq > COALESCE($4, 0) \
               AND ($6::timestamptz IS NULL OR at >= $6::timestamptz) \
             ORDER BY seq LIMIT $5",
        )
        .bind(&f.workload_uid)
        .bind(&f.agent)
        .bind(&f.kind)
        .bind(f.after_seq)
        .bind(f.limit)
        .bind(&f.since)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(EventRow {
                    seq: r.try_get("seq")?,
                    at: r.try_get("at")?,
                    kind: r.try_get("kind")?,
                    workload_uid: r.try_get("workload_uid")?,
                    shard: r.try_get("shard_idx")?,
                    attempt: r.try_get("attempt")?,
                    agent: r.try_get("agent")?,
                    message: r.try_get("message")?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(StoreError::from)
    }

    async fn balances(&self) -> Result<Vec<(String, i64)>, StoreError> {
        let rows = sqlx::query(
            "SELECT account, SUM(amount)::bigint AS balance FROM ledger_entries GROUP BY account ORDER BY account",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| Ok((r.try_get("account")?, r.try_get("balance")?)))
            .collect::<Result<_, sqlx::Error>>()
            .map_err(StoreError::from)
    }

    async fn charges(&self, uid: &str) -> Result<Vec<Charge>, StoreError> {
        let rows = sqlx::query(
            "SELECT t.workload_uid, t.shard_idx, \
                    MAX(e.account) FILTER (WHERE e.account LIKE 'namespace/%') AS debit, \
                    MAX(e.account) FILTER (WHERE e.account LIKE 'agent/%') AS credit, \
                    MAX(e.amount) FILTER (WHERE e.account LIKE 'agent/%') AS amount \
             FROM ledger_transactions t JOIN ledger_entries e ON e.tx_id = t.id \
             WHERE t.kind = 'charge' AND t.workload_uid = $1 \
             GROUP BY t.id ORDER BY t.shard_idx",
        )
        .bind(uid)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(Charge {
                    workload_uid: r.try_get("workload_uid")?,
                    shard: r.try_get::<i32, _>("shard_idx")? as u32,
                    from: r.try_get::<Option<String>, _>("debit")?.unwrap_or_default(),
                    to: r
                        .try_get::<Option<String>, _>("credit")?
                        .unwrap_or_default(),
                    amount: r.try_get::<Option<i64>, _>("amount")?.unwrap_or(0),
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(StoreError::from)
    }

    async fn verify(&self) -> Result<VerifyReport, StoreError> {
        super::run_verify!(&self.pool)
    }

    async fn grant(
        &self,
        namespace: &str,
        mesh: &str,
        amount: i64,
        memo: &str,
    ) -> Result<i64, StoreError> {
        let mut tx = self.pool.begin().await?;
        let tx_id: i64 = sqlx::query(
            "INSERT INTO ledger_transactions (kind, memo) VALUES ('grant', $1) RETURNING id",
        )
        .bind(memo)
        .fetch_one(&mut *tx)
        .await?
        .try_get(0)?;
        post(
            &mut tx,
            tx_id,
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
        let total: Option<i64> = sqlx::query(
            "SELECT SUM(e.amount)::bigint FROM ledger_entries e JOIN ledger_transactions t ON t.id = e.tx_id \
             WHERE t.kind = 'grant' AND e.account = $1 AND EXISTS \
               (SELECT 1 FROM ledger_entries o WHERE o.tx_id = t.id AND o.account = $2)",
        )
        .bind(namespace_account(namespace))
        .bind(mesh_account(mesh))
        .fetch_one(&self.pool)
        .await?
        .try_get(0)?;
        Ok(total.unwrap_or(0))
    }

    async fn refund(&self, charge: i64, memo: &str) -> Result<i64, RefundError> {
        let mut tx = self.pool.begin().await.map_err(StoreError::from)?;
        let row = sqlx::query(
            "SELECT kind, workload_uid, shard_idx FROM ledger_transactions WHERE id = $1",
        )
        .bind(charge)
        .fetch_optional(&mut *tx)
        .await
        .map_err(StoreError::from)?;
        let Some(row) = row.filter(|r| r.try_get::<String, _>("kind").is_ok_and(|k| k == "charge"))
        else {
            return Err(RefundError::NotACharge(charge));
        };
        let entries: Vec<(String, i64)> =
            sqlx::query("SELECT account, amount FROM ledger_entries WHERE tx_id = $1")
                .bind(charge)
                .fetch_all(&mut *tx)
                .await
                .map_err(StoreError::from)?
                .iter()
                .map(|r| Ok((r.try_get("account")?, -r.try_get::<i64, _>("amount")?)))
                .collect::<Result<_, sqlx::Error>>()
                .map_err(StoreError::from)?;
        let inserted = sqlx::query(
            "INSERT INTO ledger_transactions (kind, refund_of, workload_uid, shard_idx, memo) \
             VALUES ('refund', $1, $2, $3, $4) RETURNING id",
        )
        .bind(charge)
        .bind(
            row.try_get::<Option<String>, _>("workload_uid")
                .map_err(StoreError::from)?,
        )
        .bind(
            row.try_get::<Option<i32>, _>("shard_idx")
                .map_err(StoreError::from)?,
        )
        .bind(memo)
        .fetch_one(&mut *tx)
        .await;
        let tx_id: i64 = match inserted {
            Ok(r) => r.try_get(0).map_err(StoreError::from)?,
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
                return Err(RefundError::AlreadyRefunded(charge));
            }
            Err(e) => return Err(StoreError::from(e).into()),
        };
        post(&mut tx, tx_id, &entries)
            .await
            .map_err(StoreError::from)?;
        tx.commit().await.map_err(StoreError::from)?;
        Ok(tx_id)
    }

    async fn prune_events(&self, before: &str, archive: bool) -> Result<Vec<String>, StoreError> {
        let cutoff = chrono::NaiveDate::parse_from_str(before, "%Y-%m-%d")
            .map_err(|_| StoreError::Unsupported("--before takes a date, YYYY-MM-DD"))?;
        let partitions = sqlx::query(
            "SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) FROM pg_inherits i \
             JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = 'events'::regclass ORDER BY c.relname",
        )
        .fetch_all(&self.pool)
        .await?;
        let mut removed = Vec::new();
        for p in &partitions {
            let name: String = p.try_get(0)?;
            let Some(end) = partition_end(&name) else {
                continue;
            };
            if end > cutoff {
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

    async fn balance(&self, account: &str) -> Result<i64, StoreError> {
        let b: Option<i64> = sqlx::query("SELECT balance FROM accounts WHERE name = $1")
            .bind(account)
            .fetch_optional(&self.pool)
            .await?
            .map(|r| r.try_get(0))
            .transpose()?;
        Ok(b.unwrap_or(0))
    }

    async fn statement(
        &self,
        account: &str,
        from: &str,
        to: &str,
    ) -> Result<Vec<StatementLine>, StoreError> {
        let rows = sqlx::query(
            "SELECT t.id, t.kind, to_char(t.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'), \
                    e.amount, t.workload_uid, t.shard_idx::bigint, t.memo \
             FROM ledger_entries e JOIN ledger_transactions t ON t.id = e.tx_id \
             WHERE e.account = $1 AND t.created_at >= $2::timestamptz AND t.created_at <= $3::timestamptz ORDER BY t.id, e.id",
        )
        .bind(account)
        .bind(from)
        .bind(to)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(StatementLine {
                    tx_id: r.try_get(0)?,
                    kind: r.try_get(1)?,
                    at: r.try_get(2)?,
                    amount: r.try_get(3)?,
                    workload_uid: r.try_get(4)?,
                    shard: r.try_get(5)?,
                    memo: r.try_get(6)?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(StoreError::from)
    }
}
