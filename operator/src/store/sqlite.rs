//! The SQLite backend: the embedded default of `infermesh local`.

use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{Row, Sqlite, Transaction};

use super::{
    Charge, ChargeOutcome, CompletionRecord, Event, EventFilter, EventKind, EventRow, ShardRecord,
    Store, StoreError, VerifyReport, WorkloadRecord, agent_account, namespace_account,
};

fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

/// A SQLite database file (WAL mode).
#[derive(Clone, Debug)]
pub struct SqliteStore {
    pool: SqlitePool,
}

impl SqliteStore {
    /// Opens (creating if missing) the database at `url` (`sqlite://PATH` or
    /// `sqlite::memory:`) and runs the migrations.
    pub async fn open(url: &str) -> Result<Self, StoreError> {
        let options = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(10));
        // One connection: SQLite has one writer anyway, and it keeps `:memory:` one database.
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(options)
            .await?;
        sqlx::migrate!("./migrations/sqlite").run(&pool).await?;
        Ok(Self { pool })
    }

    /// The pool, for tests that need to reach behind the store's back.
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }
}

async fn insert_event(tx: &mut Transaction<'_, Sqlite>, e: &Event) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO events (at, kind, workload_uid, shard_idx, attempt, agent, message) \
         VALUES (?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(now())
    .bind(e.kind.as_str())
    .bind(&e.workload_uid)
    .bind(e.shard.map(i64::from))
    .bind(e.attempt.map(i64::from))
    .bind(&e.agent)
    .bind(&e.message)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

impl Store for SqliteStore {
    async fn create_workload(
        &self,
        w: &WorkloadRecord,
        shards: &[ShardRecord],
    ) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        let at = now();
        sqlx::query(
            "INSERT INTO workloads (uid, namespace, name, mesh, spec, input_bytes, shards, phase, created_at) \
             VALUES (?, ?, ?, ?, ?, ?, ?, 'Running', ?)",
        )
        .bind(&w.uid)
        .bind(&w.namespace)
        .bind(&w.name)
        .bind(&w.mesh)
        .bind(&w.spec_json)
        .bind(w.input_bytes as i64)
        .bind(shards.len() as i64)
        .bind(&at)
        .execute(&mut *tx)
        .await?;
        for s in shards {
            sqlx::query(
                "INSERT INTO shards (workload_uid, idx, start_byte, end_byte, state, updated_at) \
                 VALUES (?, ?, ?, ?, 'pending', ?)",
            )
            .bind(&w.uid)
            .bind(i64::from(s.index))
            .bind(s.start as i64)
            .bind(s.end as i64)
            .bind(&at)
            .execute(&mut *tx)
            .await?;
        }
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
            "UPDATE shards SET state = 'running', attempt = ?, agent = ?, updated_at = ? \
             WHERE workload_uid = ? AND idx = ? AND state IN ('pending', 'running')",
        )
        .bind(i64::from(attempt))
        .bind(agent)
        .bind(now())
        .bind(uid)
        .bind(i64::from(shard))
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
            "UPDATE shards SET state = 'succeeded', attempt = ?, agent = ?, records = ?, output_uri = ?, \
             sha256 = ?, error = NULL, updated_at = ? \
             WHERE workload_uid = ? AND idx = ? AND state <> 'succeeded'",
        )
        .bind(i64::from(c.attempt))
        .bind(&c.agent)
        .bind(c.records as i64)
        .bind(&c.output_uri)
        .bind(&c.sha256)
        .bind(now())
        .bind(&c.workload_uid)
        .bind(i64::from(c.shard))
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
        // The unique charge_key makes a second charge of this shard fail here, whatever the
        // state column says.
        let tx_id: i64 = sqlx::query(
            "INSERT INTO ledger_transactions (kind, charge_key, workload_uid, shard_idx, memo, created_at) \
             VALUES ('charge', ?, ?, ?, ?, ?) RETURNING id",
        )
        .bind(format!("{}#{}", c.workload_uid, c.shard))
        .bind(&c.workload_uid)
        .bind(i64::from(c.shard))
        .bind(format!("{} records, {:.3}s on {}", c.records, c.compute_seconds, c.device))
        .bind(now())
        .fetch_one(&mut *tx)
        .await?
        .try_get(0)?;
        for (account, amount) in [
            (namespace_account(&c.namespace), -c.price),
            (agent_account(&c.agent), c.price),
        ] {
            sqlx::query("INSERT INTO ledger_entries (tx_id, account, amount) VALUES (?, ?, ?)")
                .bind(tx_id)
                .bind(&account)
                .bind(amount)
                .execute(&mut *tx)
                .await?;
            sqlx::query(
                "INSERT INTO accounts (name, balance) VALUES (?, ?) \
                 ON CONFLICT (name) DO UPDATE SET balance = accounts.balance + excluded.balance",
            )
            .bind(&account)
            .bind(amount)
            .execute(&mut *tx)
            .await?;
        }
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
            "UPDATE shards SET state = 'pending', agent = NULL, error = ?, updated_at = ? \
             WHERE workload_uid = ? AND idx = ? AND state = 'running'",
        )
        .bind(reason)
        .bind(now())
        .bind(uid)
        .bind(i64::from(shard))
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
            "UPDATE shards SET state = 'failed', error = ?, updated_at = ? \
             WHERE workload_uid = ? AND idx = ? AND state <> 'succeeded'",
        )
        .bind(message)
        .bind(now())
        .bind(uid)
        .bind(i64::from(shard))
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
        sqlx::query("UPDATE workloads SET phase = ?, message = ?, finished_at = ? WHERE uid = ?")
            .bind(phase)
            .bind(message)
            .bind(now())
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
            "SELECT seq, at, kind, workload_uid, shard_idx, attempt, agent, message FROM events \
             WHERE (?1 IS NULL OR workload_uid = ?1) AND (?2 IS NULL OR agent = ?2) \
               AND (?3 IS NULL OR kind = ?3) AND seq > COALESCE(?4, 0) \
             ORDER BY seq LIMIT COALESCE(?5, -1)",
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
        let rows = sqlx::query("SELECT account, SUM(amount) AS balance FROM ledger_entries GROUP BY account ORDER BY account")
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
                    MAX(CASE WHEN e.account LIKE 'namespace/%' THEN e.account END) AS debit, \
                    MAX(CASE WHEN e.account LIKE 'agent/%' THEN e.account END) AS credit, \
                    MAX(CASE WHEN e.account LIKE 'agent/%' THEN e.amount END) AS amount \
             FROM ledger_transactions t JOIN ledger_entries e ON e.tx_id = t.id \
             WHERE t.kind = 'charge' AND t.workload_uid = ? \
             GROUP BY t.id ORDER BY t.shard_idx",
        )
        .bind(uid)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(Charge {
                    workload_uid: r.try_get("workload_uid")?,
                    shard: r.try_get::<i64, _>("shard_idx")? as u32,
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
