//! The Postgres backend: the store of cluster mode.

use std::time::Duration;

use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::{Postgres, Row, Transaction};

use super::{
    Charge, ChargeOutcome, CompletionRecord, Event, EventFilter, EventKind, EventRow, ShardRecord,
    Store, StoreError, VerifyReport, WorkloadRecord, agent_account, namespace_account,
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
        Ok(Self { pool })
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
    ) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "UPDATE shards SET state = 'running', attempt = $1, agent = $2, updated_at = now() \
             WHERE workload_uid = $3 AND idx = $4 AND state IN ('pending', 'running')",
        )
        .bind(attempt as i32)
        .bind(agent)
        .bind(uid)
        .bind(shard as i32)
        .execute(&mut *tx)
        .await?;
        let e = Event::new(
            EventKind::ShardAssigned,
            format!("attempt {attempt} on {agent}"),
        )
        .workload(uid)
        .shard(shard, attempt)
        .agent(agent);
        insert_event(&mut tx, &e).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn complete(&self, c: &CompletionRecord) -> Result<ChargeOutcome, StoreError> {
        let mut tx = self.pool.begin().await?;
        let updated = sqlx::query(
            "UPDATE shards SET state = 'succeeded', attempt = $1, agent = $2, records = $3, \
             output_uri = $4, sha256 = $5, error = NULL, updated_at = now() \
             WHERE workload_uid = $6 AND idx = $7 AND state <> 'succeeded'",
        )
        .bind(c.attempt as i32)
        .bind(&c.agent)
        .bind(c.records as i64)
        .bind(&c.output_uri)
        .bind(&c.sha256)
        .bind(&c.workload_uid)
        .bind(c.shard as i32)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if updated == 0 {
            let e = Event::new(
                EventKind::ShardDuplicate,
                format!(
                    "attempt {} on {} ignored: shard already done",
                    c.attempt, c.agent
                ),
            )
            .workload(&c.workload_uid)
            .shard(c.shard, c.attempt)
            .agent(&c.agent);
            insert_event(&mut tx, &e).await?;
            tx.commit().await?;
            return Ok(ChargeOutcome::Duplicate);
        }
        // The unique charge_key refuses a second charge of this shard, whatever the state.
        let tx_id: i64 = sqlx::query(
            "INSERT INTO ledger_transactions (kind, charge_key, workload_uid, shard_idx, memo) \
             VALUES ('charge', $1, $2, $3, $4) RETURNING id",
        )
        .bind(format!("{}#{}", c.workload_uid, c.shard))
        .bind(&c.workload_uid)
        .bind(c.shard as i32)
        .bind(format!(
            "{} records, {:.3}s on {}",
            c.records, c.compute_seconds, c.device
        ))
        .fetch_one(&mut *tx)
        .await?
        .try_get(0)?;
        sqlx::query(
            "INSERT INTO ledger_entries (tx_id, account, amount) VALUES ($1, $2, $3), ($1, $4, $5)",
        )
        .bind(tx_id)
        .bind(namespace_account(&c.namespace))
        .bind(-c.price)
        .bind(agent_account(&c.agent))
        .bind(c.price)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO accounts (name, balance) VALUES ($1, $2), ($3, $4) \
             ON CONFLICT (name) DO UPDATE SET balance = accounts.balance + excluded.balance",
        )
        .bind(namespace_account(&c.namespace))
        .bind(-c.price)
        .bind(agent_account(&c.agent))
        .bind(c.price)
        .execute(&mut *tx)
        .await?;
        let e = Event::new(
            EventKind::ShardCompleted,
            format!(
                "{} records by {} in {:.3}s ({}), charged {} micro-credits",
                c.records, c.agent, c.compute_seconds, c.device, c.price
            ),
        )
        .workload(&c.workload_uid)
        .shard(c.shard, c.attempt)
        .agent(&c.agent);
        insert_event(&mut tx, &e).await?;
        tx.commit().await?;
        Ok(ChargeOutcome::Charged)
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
             ORDER BY seq LIMIT $5",
        )
        .bind(&f.workload_uid)
        .bind(&f.agent)
        .bind(&f.kind)
        .bind(f.after_seq)
        .bind(f.limit)
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
}
