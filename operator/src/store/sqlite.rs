//! The SQLite backend: the embedded default of `infermesh local`.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqliteSynchronous};
use sqlx::{ConnectOptions, Connection, Row, Sqlite, Transaction};

use super::{
    BatchJudge, Charge, ChargeOutcome, Claim, CompletionRecord, Event, EventFilter, EventKind,
    EventRow, GrantKind, RefundError, ReopenOutcome, ShardRecord, ShardSet, StatementLine, Store,
    StoreError, StoredShard, StoredWorkload, VerifyReport, WorkloadRecord, mesh_account,
    namespace_account, retried_message,
};

fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

/// How often the checkpointer copies the write-ahead log's new pages into the database file.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(100);

/// The log's length (pages) at which the writer checkpoints itself, on its own thread and
/// inside a commit. The checkpointer has copied nearly all of it by then, so the writer copies
/// only the last moments' pages and starts the log over from its beginning (a checkpoint on
/// another connection cannot restart the log while the writer keeps appending). Also the
/// bound on the log should the checkpointer fall behind: 4,096 pages are 16 MiB.
const WRITER_CHECKPOINT_PAGES: u32 = 4096;

/// The rows the connection's thread may send ahead of the task reading them. A dispatch
/// round's or a group commit's statement returns a row per shard (hundreds): at sqlx's
/// default of 50 the thread stopped every 50 rows until the task, scheduled on a busy
/// machine, had read them, and the connection sat idle meanwhile (5,000 context switches
/// a second at 100 agents).
const ROW_BUFFER: usize = 2 * super::group::MAX_BATCH;

/// A SQLite database file (WAL mode).
#[derive(Clone, Debug)]
pub struct SqliteStore {
    /// The one connection every store call takes in turn. Held directly rather than through
    /// a pool of one: sqlx's pool pings a connection on each release, from a task it spawns,
    /// which put a round trip to the connection's thread and a task hand-off between any two
    /// transactions, and the dispatch rounds and group commits take turns on it hundreds of
    /// times a second.
    conn: Arc<tokio::sync::Mutex<Held>>,
    /// The checkpointer of a database file (none in memory); it stops with the last clone.
    _checkpointer: Option<Arc<Checkpointer>>,
}

/// The store's connection, and whether a transaction that [`Script`]s began on it is still
/// open: its holder was dropped (cancelled) between two of the transaction's round trips.
/// Such a transaction is rolled back by the next holder before anything else
/// ([`SqliteStore::held`]), as sqlx does for a dropped `Transaction` of its own.
#[derive(Debug)]
struct Held {
    conn: SqliteConnection,
    open: bool,
}

impl Held {
    /// The connection, for a transaction that [`Script`]s begin and end: marked open until
    /// [`Held::settle`] ends it, so that a holder dropped in between leaves a mark.
    fn begin(&mut self) -> &mut SqliteConnection {
        self.open = true;
        &mut self.conn
    }

    /// Ends the transaction of `result`: on success its last script committed it; on failure
    /// it is rolled back (a statement failed before, or the commit itself did).
    async fn settle<T>(&mut self, result: Result<T, sqlx::Error>) -> Result<T, sqlx::Error> {
        if result.is_err() {
            self.roll_back().await;
        }
        self.open = false;
        result
    }

    async fn roll_back(&mut self) {
        // "No transaction is active" is the one expected failure: the statement that began it
        // failed, or never ran.
        if let Err(e) = sqlx::query("ROLLBACK").execute(&mut self.conn).await {
            tracing::debug!(error = %e, "SQLite rollback");
        }
    }
}

/// Copies the write-ahead log into the database file from a connection of its own, so the
/// one writer connection does not: at SQLite's default (a checkpoint by the committing
/// writer every 1,000 pages) a commit now and then also wrote and synced megabytes of pages
/// while every store call waited behind it. A passive checkpoint takes no lock the writer
/// needs and skips frames a reader still uses; failures are logged and tried again.
#[derive(Debug)]
struct Checkpointer(tokio::task::JoinHandle<()>);

impl Checkpointer {
    async fn start(options: SqliteConnectOptions) -> Result<Self, StoreError> {
        let mut conn = options.connect().await?;
        Ok(Self(tokio::spawn(async move {
            let mut tick = tokio::time::interval(CHECKPOINT_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut failing = false;
            loop {
                tick.tick().await;
                match sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
                    .execute(&mut conn)
                    .await
                {
                    Ok(_) if failing => {
                        failing = false;
                        tracing::info!("SQLite checkpoints go through again");
                    }
                    Ok(_) => {}
                    Err(e) if !failing => {
                        failing = true;
                        tracing::warn!(error = %e, "SQLite checkpoint failed; the writer checkpoints meanwhile");
                    }
                    Err(_) => {}
                }
            }
        })))
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        self.0.abort();
    }
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
            .busy_timeout(Duration::from_secs(10))
            .pragma("wal_autocheckpoint", WRITER_CHECKPOINT_PAGES.to_string())
            // A statement's own journal (to undo it alone) goes to a temporary file once it
            // passes 64 KiB, which a dispatch round's or a group commit's multi-row statement
            // does: in memory it cost no write calls (4 to 7 % more shards/s at 100 agents).
            .pragma("temp_store", "memory")
            .row_buffer_size(ROW_BUFFER);
        // Two processes opening one new file at once (`infermesh local` and `infermesh ledger`)
        // can race in the migrations: SQLite answers "locked" at once rather than waiting, or
        // the loser finds the tables the winner just made. Once the winner is done the
        // migrations are applied, so try again for a while.
        let mut tries = 0;
        loop {
            match Self::connect(options.clone()).await {
                Err(StoreError::Database(e))
                    if tries < 50 && e.to_string().contains("database is locked") => {}
                Err(StoreError::Migrate(
                    sqlx::migrate::MigrateError::Execute(_)
                    | sqlx::migrate::MigrateError::ExecuteMigration(..),
                )) if tries < 20 => {}
                other => return other,
            }
            tries += 1;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn connect(options: SqliteConnectOptions) -> Result<Self, StoreError> {
        // One connection: SQLite has one writer anyway, and it keeps `:memory:` one database.
        let mut conn = options.connect().await?;
        sqlx::migrate!("./migrations/sqlite")
            .run_direct(&mut conn)
            .await?;
        // A database in memory has no write-ahead log (its journal mode stays "memory").
        let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
            .fetch_one(&mut conn)
            .await?;
        let checkpointer = if mode.eq_ignore_ascii_case("wal") {
            Some(Arc::new(Checkpointer::start(options).await?))
        } else {
            None
        };
        Ok(Self {
            conn: Arc::new(tokio::sync::Mutex::new(Held { conn, open: false })),
            _checkpointer: checkpointer,
        })
    }

    /// The connection, for store calls and for tests that reach behind the store's back;
    /// every other caller waits while it is held.
    pub async fn conn(&self) -> tokio::sync::MappedMutexGuard<'_, SqliteConnection> {
        tokio::sync::MutexGuard::map(self.held().await, |h| &mut h.conn)
    }

    /// The connection, a transaction left open by a cancelled holder rolled back first.
    async fn held(&self) -> tokio::sync::MutexGuard<'_, Held> {
        let mut held = self.conn.lock().await;
        if held.open {
            tracing::warn!("a store call was cancelled inside its transaction; rolling it back");
            held.roll_back().await;
            held.open = false;
        }
        held
    }
}

/// Rows per multi-row statement: SQLite binds at most 32,766 parameters, and each statement
/// here binds at most 8 a row. Every statement is one round trip to the connection's thread,
/// so a batch costs a handful of them, not a handful per row.
const ROWS_PER_STATEMENT: usize = 500;

/// `(?, ?, …)` repeated `rows` times, `width` placeholders each.
fn placeholders(rows: usize, width: usize) -> String {
    let row = format!("({})", vec!["?"; width].join(", "));
    vec![row.as_str(); rows].join(", ")
}

/// Statements sent to the connection's thread as one command, their `?` parameters bound in
/// order across them (sqlx runs them one after another and stops at the first that fails).
/// Each command is a round trip between the async task and the connection's thread, and on
/// a busy machine each round trip waited about a millisecond for the thread to be scheduled:
/// the hot transactions send what does not depend on an earlier answer together.
struct Script<'q> {
    sql: String,
    args: sqlx::sqlite::SqliteArguments<'q>,
    failed: Option<sqlx::error::BoxDynError>,
}

impl<'q> Script<'q> {
    fn new(sql: &str) -> Self {
        Self {
            sql: sql.to_owned(),
            args: Default::default(),
            failed: None,
        }
    }

    /// Appends a statement (its `;` included).
    fn push(&mut self, sql: &str) -> &mut Self {
        self.sql.push_str(sql);
        self
    }

    fn bind<T>(&mut self, value: T) -> &mut Self
    where
        T: 'q + sqlx::Encode<'q, Sqlite> + sqlx::Type<Sqlite>,
    {
        use sqlx::Arguments;
        if let Err(e) = self.args.add(value) {
            self.failed.get_or_insert(e);
        }
        self
    }

    /// Runs the statements, and returns the rows any of them returned.
    async fn run(
        self,
        conn: &mut SqliteConnection,
    ) -> Result<Vec<sqlx::sqlite::SqliteRow>, sqlx::Error> {
        if let Some(e) = self.failed {
            return Err(sqlx::Error::Encode(e));
        }
        sqlx::query_with(&self.sql, self.args).fetch_all(conn).await
    }

    /// Appends the inserts of events in order, one statement per [`ROWS_PER_STATEMENT`].
    fn events(&mut self, es: &'q [Event], at: &'q str) -> &mut Self {
        for chunk in es.chunks(ROWS_PER_STATEMENT) {
            self.push(&format!(
                "INSERT INTO events (at, kind, workload_uid, shard_idx, attempt, agent, message) VALUES {};",
                placeholders(chunk.len(), 7)
            ));
            for e in chunk {
                self.bind(at)
                    .bind(e.kind.as_str())
                    .bind(&e.workload_uid)
                    .bind(e.shard.map(i64::from))
                    .bind(e.attempt.map(i64::from))
                    .bind(&e.agent)
                    .bind(&e.message);
            }
        }
        self
    }

    /// Appends the moves of accounts' balances by `net`, one statement per
    /// [`ROWS_PER_STATEMENT`] accounts.
    fn balances(&mut self, net: &[(&'q str, i64)]) -> &mut Self {
        for chunk in net.chunks(ROWS_PER_STATEMENT) {
            self.push(&format!(
                "INSERT INTO accounts (name, balance) VALUES {} \
                 ON CONFLICT (name) DO UPDATE SET balance = accounts.balance + excluded.balance;",
                placeholders(chunk.len(), 2)
            ));
            for (account, amount) in chunk {
                self.bind(*account).bind(*amount);
            }
        }
        self
    }
}

/// Each account's net amount in `entries` (`(account, amount)`), by account.
fn net_amounts<'a>(entries: impl IntoIterator<Item = (&'a str, i64)>) -> Vec<(&'a str, i64)> {
    let mut net: std::collections::BTreeMap<&str, i64> = std::collections::BTreeMap::new();
    for (account, amount) in entries {
        *net.entry(account).or_default() += amount;
    }
    net.into_iter().collect()
}

async fn insert_event(tx: &mut Transaction<'_, Sqlite>, e: &Event) -> Result<(), sqlx::Error> {
    let at = now();
    let mut script = Script::new("");
    script.events(std::slice::from_ref(e), &at);
    script.run(tx).await.map(|_| ())
}

/// Writes a transaction's entries and moves the accounts' balances with them.
async fn post(
    tx: &mut Transaction<'_, Sqlite>,
    tx_id: i64,
    entries: &[(String, i64)],
) -> Result<(), sqlx::Error> {
    let posted: Vec<(i64, &str, i64)> = entries
        .iter()
        .map(|(account, amount)| (tx_id, account.as_str(), *amount))
        .collect();
    post_all(tx, &posted).await
}

/// Writes entries `(tx_id, account, amount)` of any number of transactions, and moves each
/// account's balance once by its net amount.
async fn post_all(
    tx: &mut Transaction<'_, Sqlite>,
    entries: &[(i64, &str, i64)],
) -> Result<(), sqlx::Error> {
    let mut script = Script::new("");
    for chunk in entries.chunks(ROWS_PER_STATEMENT) {
        script.push(&format!(
            "INSERT INTO ledger_entries (tx_id, account, amount) VALUES {};",
            placeholders(chunk.len(), 3)
        ));
        for (tx_id, account, amount) in chunk {
            script.bind(*tx_id).bind(*account).bind(*amount);
        }
    }
    let net = net_amounts(
        entries
            .iter()
            .map(|(_, account, amount)| (*account, *amount)),
    );
    script.balances(&net);
    script.run(tx).await.map(|_| ())
}

/// Binds the attempt a completion names: (workload uid, index, attempt, agent).
fn bind_attempt<'s, 'q>(q: &'s mut Script<'q>, c: &'q CompletionRecord) -> &'s mut Script<'q> {
    q.bind(&c.workload_uid)
        .bind(i64::from(c.shard))
        .bind(i64::from(c.attempt))
        .bind(&c.agent)
}

/// The shards of rows `(workload uid, index)` that a claim or a completion statement returned.
fn shards_of(rows: Vec<sqlx::sqlite::SqliteRow>) -> Result<ShardSet, sqlx::Error> {
    rows.iter()
        .map(|row| Ok((row.try_get(0)?, row.try_get::<i64, _>(1)? as u32)))
        .collect()
}

/// Claims pending shards inside a transaction of its own ([`Store::assign_batch`]), in two
/// round trips: `BEGIN` with the compare-and-set of every claim, then the claims' events
/// with `COMMIT` (the events name only the claims the store accepted).
async fn claim_on(held: &mut Held, claims: &[Claim]) -> Result<Vec<bool>, StoreError> {
    let result = claim_turns(held.begin(), claims).await;
    Ok(held.settle(result).await?)
}

async fn claim_turns(
    conn: &mut SqliteConnection,
    claims: &[Claim],
) -> Result<Vec<bool>, sqlx::Error> {
    let at = now();
    let mut first = Script::new("BEGIN;");
    // One statement per 500 claims (SQLite binds at most 32,766 parameters); a dispatch
    // round is bounded by the free slots, so this is one statement in practice.
    for chunk in claims.chunks(ROWS_PER_STATEMENT) {
        first.push(&format!(
            "WITH c(uid, idx, attempt, agent) AS (VALUES {}) \
             UPDATE shards SET state = 'running', attempt = c.attempt, agent = c.agent, updated_at = ? \
             FROM c WHERE shards.workload_uid = c.uid AND shards.idx = c.idx \
               AND shards.state = 'pending' AND shards.attempt = c.attempt - 1 \
             RETURNING shards.workload_uid, shards.idx;",
            placeholders(chunk.len(), 4)
        ));
        for c in chunk {
            first
                .bind(&c.uid)
                .bind(i64::from(c.shard))
                .bind(i64::from(c.attempt))
                .bind(&c.agent);
        }
        first.bind(at.as_str());
    }
    let accepted = shards_of(first.run(conn).await?)?;
    let (won, events) = super::claims_won(claims, &accepted);
    let mut last = Script::new("");
    last.events(&events, &at).push("COMMIT;");
    last.run(conn).await?;
    Ok(won)
}

/// Records a batch of completions inside a transaction of its own, in two round trips (a
/// third when something was refused): `BEGIN` with the compare-and-set of every candidate,
/// then the charges, their entries, the balances, the events and `COMMIT`. Within the batch
/// the first completion of a shard is its candidate; later ones are refused whatever the
/// database says. Each candidate is a compare-and-set on the shard's state, holder and
/// attempt; the unique charge key refuses a second charge of a shard whatever the state
/// column says.
async fn complete_on(
    held: &mut Held,
    cs: &[CompletionRecord],
) -> Result<Vec<ChargeOutcome>, sqlx::Error> {
    let result = complete_turns(held.begin(), cs).await;
    held.settle(result).await
}

async fn complete_turns(
    conn: &mut SqliteConnection,
    cs: &[CompletionRecord],
) -> Result<Vec<ChargeOutcome>, sqlx::Error> {
    let judge = BatchJudge::new(cs);
    let candidates = judge.candidates();
    let at = now();
    let mut first = Script::new("BEGIN;");
    for chunk in candidates.chunks(ROWS_PER_STATEMENT) {
        first.push(&format!(
            "WITH c(uid, idx, attempt, agent, records, uri, sha) AS (VALUES {}) \
             UPDATE shards SET state = 'succeeded', records = c.records, output_uri = c.uri, \
                    sha256 = c.sha, error = NULL, updated_at = ? \
             FROM c WHERE shards.workload_uid = c.uid AND shards.idx = c.idx \
               AND shards.state = 'running' AND shards.agent = c.agent AND shards.attempt = c.attempt \
               AND EXISTS (SELECT 1 FROM workloads w WHERE w.uid = c.uid AND w.phase = 'Running') \
             RETURNING shards.workload_uid, shards.idx;",
            placeholders(chunk.len(), 7)
        ));
        for c in chunk {
            bind_attempt(&mut first, c)
                .bind(c.records as i64)
                .bind(&c.output_uri)
                .bind(&c.sha256);
        }
        first.bind(at.as_str());
    }
    let charged = shards_of(first.run(conn).await?)?;
    // A candidate the compare-and-set refused may be this very completion, committed by an
    // earlier transaction whose answer was lost: then the shard is done by that attempt on
    // that agent. Only asked when something was refused (rare).
    let mut recorded = ShardSet::default();
    if charged.len() < candidates.len() {
        let refused: Vec<&&CompletionRecord> = candidates
            .iter()
            .filter(|c| !charged.contains(&c.workload_uid, c.shard))
            .collect();
        let mut ask = Script::new("");
        for chunk in refused.chunks(ROWS_PER_STATEMENT) {
            ask.push(&format!(
                "WITH c(uid, idx, attempt, agent) AS (VALUES {}) \
                 SELECT s.workload_uid, s.idx FROM shards s JOIN c \
                   ON s.workload_uid = c.uid AND s.idx = c.idx \
                 WHERE s.state = 'succeeded' AND s.agent = c.agent AND s.attempt = c.attempt;",
                placeholders(chunk.len(), 4)
            ));
            for c in chunk {
                bind_attempt(&mut ask, c);
            }
        }
        recorded = shards_of(ask.run(conn).await?)?;
    }
    let outcomes = judge.outcomes(&charged, &recorded);
    let (charges, events) = judge.charges_and_events(&outcomes);
    let keys: Vec<String> = charges.iter().map(|c| c.charge_key()).collect();
    let entries: Vec<[(String, i64); 2]> = charges.iter().map(|c| c.entries()).collect();
    let mut last = Script::new("");
    for (chunk, chunk_keys) in charges
        .chunks(ROWS_PER_STATEMENT)
        .zip(keys.chunks(ROWS_PER_STATEMENT))
    {
        last.push(&format!(
            "INSERT INTO ledger_transactions (kind, charge_key, workload_uid, shard_idx, memo, created_at) \
             VALUES {};",
            placeholders(chunk.len(), 6)
        ));
        for (c, key) in chunk.iter().zip(chunk_keys) {
            last.bind("charge")
                .bind(key.as_str())
                .bind(&c.workload_uid)
                .bind(i64::from(c.shard))
                .bind(c.memo())
                .bind(at.as_str());
        }
    }
    // Each charge's entries name their transaction by its unique charge key (just inserted),
    // so they go in the same round trip as the charges instead of waiting for their ids; `n`
    // keeps them in the order they are listed.
    let rows: Vec<(&str, &str, i64)> = keys
        .iter()
        .zip(&entries)
        .flat_map(|(key, pair)| {
            pair.iter()
                .map(move |(account, amount)| (key.as_str(), account.as_str(), *amount))
        })
        .collect();
    for (i, chunk) in rows.chunks(ROWS_PER_STATEMENT).enumerate() {
        last.push(&format!(
            "WITH c(n, charge_key, account, amount) AS (VALUES {}) \
             INSERT INTO ledger_entries (tx_id, account, amount) \
             SELECT t.id, c.account, c.amount FROM c \
             JOIN ledger_transactions t ON t.charge_key = c.charge_key ORDER BY c.n;",
            placeholders(chunk.len(), 4)
        ));
        for (j, (key, account, amount)) in chunk.iter().enumerate() {
            let n = (i * ROWS_PER_STATEMENT + j) as i64;
            last.bind(n).bind(*key).bind(*account).bind(*amount);
        }
    }
    let net = net_amounts(rows.iter().map(|(_, account, amount)| (*account, *amount)));
    last.balances(&net).events(&events, &at).push("COMMIT;");
    last.run(conn).await?;
    Ok(outcomes)
}

/// The columns of a workload that [`workload_record`] reads.
const WORKLOAD_COLUMNS: &str =
    "uid, namespace, name, mesh, spec, input_bytes, input_version, input_files";

fn workload_record(r: &sqlx::sqlite::SqliteRow) -> Result<WorkloadRecord, sqlx::Error> {
    Ok(WorkloadRecord {
        uid: r.try_get("uid")?,
        namespace: r.try_get("namespace")?,
        name: r.try_get("name")?,
        mesh: r.try_get("mesh")?,
        spec_json: r.try_get::<String, _>("spec")?,
        input_bytes: r.try_get::<i64, _>("input_bytes")? as u64,
        input_version: r.try_get::<Option<String>, _>("input_version")?,
        input_files: r.try_get::<Option<String>, _>("input_files")?,
    })
}

/// A workload's shards, by index.
async fn stored_shards<'e>(
    db: impl sqlx::Executor<'e, Database = Sqlite>,
    uid: &str,
) -> Result<Vec<StoredShard>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT idx, start_byte, end_byte, state, attempt, attempt_base, agent, records, output_uri, sha256 \
         FROM shards WHERE workload_uid = ? ORDER BY idx",
    )
    .bind(uid)
    .fetch_all(db)
    .await?;
    rows.iter()
        .map(|s| {
            Ok(StoredShard {
                index: s.try_get::<i64, _>("idx")? as u32,
                start: s.try_get::<i64, _>("start_byte")? as u64,
                end: s.try_get::<i64, _>("end_byte")? as u64,
                state: s.try_get("state")?,
                attempt: s.try_get::<i64, _>("attempt")? as u32,
                attempt_base: s.try_get::<i64, _>("attempt_base")? as u32,
                agent: s.try_get("agent")?,
                records: s.try_get::<Option<i64>, _>("records")?.unwrap_or(0) as u64,
                output_uri: s.try_get("output_uri")?,
                sha256: s.try_get("sha256")?,
            })
        })
        .collect()
}

impl Store for SqliteStore {
    async fn create_workload(
        &self,
        w: &WorkloadRecord,
        shards: &[ShardRecord],
    ) -> Result<(), StoreError> {
        let mut conn = self.conn().await;
        let mut tx = conn.begin().await?;
        let at = now();
        sqlx::query(
            "INSERT INTO workloads (uid, namespace, name, mesh, spec, input_bytes, shards, phase, created_at, input_version, input_files) \
             VALUES (?, ?, ?, ?, ?, ?, ?, 'Running', ?, ?, ?)",
        )
        .bind(&w.uid)
        .bind(&w.namespace)
        .bind(&w.name)
        .bind(&w.mesh)
        .bind(&w.spec_json)
        .bind(w.input_bytes as i64)
        .bind(shards.len() as i64)
        .bind(&at)
        .bind(&w.input_version)
        .bind(&w.input_files)
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

    async fn assign_batch(&self, claims: &[Claim]) -> Result<Vec<bool>, StoreError> {
        let mut held = self.held().await;
        claim_on(&mut held, claims).await
    }

    async fn assign_planned<F>(&self, plan: F) -> Result<(Vec<Claim>, Vec<bool>), StoreError>
    where
        F: FnOnce() -> Vec<Claim> + Send,
    {
        // The one connection first, the plan then: while a round waited for the connection
        // (busy with a batch of completions) the slots those completions freed went unseen
        // until the round after, so each slot waited about two rounds instead of one.
        let mut held = self.held().await;
        let claims = plan();
        if claims.is_empty() {
            return Ok((claims, Vec::new()));
        }
        let won = claim_on(&mut held, &claims).await?;
        Ok((claims, won))
    }

    async fn ensure_account(&self, name: &str) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO accounts (name, balance) VALUES (?, 0) ON CONFLICT (name) DO NOTHING",
        )
        .bind(name)
        .execute(&mut *self.conn().await)
        .await?;
        Ok(())
    }

    async fn meshes(&self) -> Result<Vec<String>, StoreError> {
        Ok(sqlx::query_scalar(
            "SELECT mesh FROM workloads UNION SELECT substr(name, 6) FROM accounts \
             WHERE name LIKE 'mesh/%' ORDER BY 1",
        )
        .fetch_all(&mut *self.conn().await)
        .await?)
    }

    async fn workload_phase(&self, uid: &str) -> Result<Option<String>, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT phase FROM workloads WHERE uid = ?")
                .bind(uid)
                .fetch_optional(&mut *self.conn().await)
                .await?,
        )
    }

    async fn workloads_in_phase(&self, phase: &str) -> Result<Vec<StoredWorkload>, StoreError> {
        let mut conn = self.conn().await;
        let rows = sqlx::query(&format!(
            "SELECT {WORKLOAD_COLUMNS} FROM workloads WHERE phase = ? ORDER BY created_at, uid"
        ))
        .bind(phase)
        .fetch_all(&mut *conn)
        .await?;
        let mut out = Vec::with_capacity(rows.len());
        for r in &rows {
            let record = workload_record(r)?;
            let shards = stored_shards(&mut *conn, &record.uid).await?;
            out.push(StoredWorkload { record, shards });
        }
        Ok(out)
    }

    async fn complete_batch(
        &self,
        cs: &[CompletionRecord],
    ) -> Result<Vec<ChargeOutcome>, StoreError> {
        let mut held = self.held().await;
        match complete_on(&mut held, cs).await {
            Ok(outcomes) => Ok(outcomes),
            // The unique charge key refused a charge the state column let through (a ledger
            // changed behind our back): record the batch one by one, so only that charge fails.
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() && cs.len() > 1 => {
                let mut outcomes = Vec::with_capacity(cs.len());
                for c in cs {
                    outcomes.push(complete_on(&mut held, std::slice::from_ref(c)).await?[0]);
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
        let mut conn = self.conn().await;
        let mut tx = conn.begin().await?;
        let held = sqlx::query(
            "UPDATE shards SET state = 'pending', agent = NULL, error = ?, updated_at = ? \
             WHERE workload_uid = ? AND idx = ? AND state = 'running' AND attempt = ?",
        )
        .bind(reason)
        .bind(now())
        .bind(uid)
        .bind(i64::from(shard))
        .bind(i64::from(attempt))
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
        insert_event(&mut tx, &e).await?;
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
        let mut conn = self.conn().await;
        let mut tx = conn.begin().await?;
        let held = sqlx::query(
            "UPDATE shards SET state = 'failed', error = ?, updated_at = ? \
             WHERE workload_uid = ? AND idx = ? AND state <> 'succeeded' AND attempt = ?",
        )
        .bind(message)
        .bind(now())
        .bind(uid)
        .bind(i64::from(shard))
        .bind(i64::from(attempt))
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
        insert_event(&mut tx, &e).await?;
        tx.commit().await?;
        Ok(true)
    }

    async fn finish_workload(
        &self,
        uid: &str,
        phase: &str,
        message: &str,
    ) -> Result<(), StoreError> {
        let mut conn = self.conn().await;
        let mut tx = conn.begin().await?;
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

    async fn reopen_failed(&self, uid: &str) -> Result<ReopenOutcome, StoreError> {
        let mut conn = self.conn().await;
        let mut tx = conn.begin().await?;
        // The compare-and-set on the phase comes first: it takes SQLite's write lock, so what
        // is read below cannot change before the commit.
        let reopened = sqlx::query(
            "UPDATE workloads SET phase = 'Running', message = NULL, finished_at = NULL, started_at = ? \
             WHERE uid = ? AND phase = 'Failed'",
        )
        .bind(now())
        .bind(uid)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        if !reopened {
            let phase: Option<String> =
                sqlx::query_scalar("SELECT phase FROM workloads WHERE uid = ?")
                    .bind(uid)
                    .fetch_optional(&mut *tx)
                    .await?;
            return Ok(match phase {
                Some(phase) => ReopenOutcome::NotFailed { phase },
                None => ReopenOutcome::Unknown,
            });
        }
        let states: Vec<String> = sqlx::query_scalar(
            "SELECT state FROM shards WHERE workload_uid = ? AND state <> 'succeeded'",
        )
        .bind(uid)
        .fetch_all(&mut *tx)
        .await?;
        let requeued = states.len() as u32;
        let failed = states.iter().filter(|s| *s == "failed").count() as u32;
        sqlx::query(
            "UPDATE shards SET state = 'pending', agent = NULL, attempt_base = attempt, updated_at = ? \
             WHERE workload_uid = ? AND state <> 'succeeded'",
        )
        .bind(now())
        .bind(uid)
        .execute(&mut *tx)
        .await?;
        let row = sqlx::query(&format!(
            "SELECT {WORKLOAD_COLUMNS} FROM workloads WHERE uid = ?"
        ))
        .bind(uid)
        .fetch_one(&mut *tx)
        .await?;
        let record = workload_record(&row)?;
        let shards = stored_shards(&mut *tx, uid).await?;
        let kept = (shards.len() as u32).saturating_sub(requeued);
        insert_event(
            &mut tx,
            &Event::new(
                EventKind::WorkloadRetried,
                retried_message(requeued, failed, kept),
            )
            .workload(uid),
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
        let seconds: Option<f64> = sqlx::query_scalar(
            "SELECT (julianday('now') - julianday(COALESCE(started_at, created_at))) * 86400.0 \
             FROM workloads WHERE uid = ?",
        )
        .bind(uid)
        .fetch_optional(&mut *self.conn().await)
        .await?;
        Ok(seconds.map(|s| std::time::Duration::try_from_secs_f64(s.max(0.0)).unwrap_or_default()))
    }

    async fn append(&self, event: &Event) -> Result<(), StoreError> {
        let mut conn = self.conn().await;
        let mut tx = conn.begin().await?;
        insert_event(&mut tx, event).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn events(&self, f: &EventFilter) -> Result<Vec<EventRow>, StoreError> {
        // Only the filters given are in the statement: `(? IS NULL OR col = ?)` would keep
        // SQLite from its indexes (it walked the whole log by seq for a workload's failures).
        let mut q = sqlx::QueryBuilder::<sqlx::Sqlite>::new(
            "SELECT seq, at, kind, workload_uid, shard_idx, attempt, agent, message FROM events \
             WHERE seq > ",
        );
        q.push_bind(f.after_seq.unwrap_or(0));
        f.push_equalities(&mut q);
        if let Some(since) = &f.since {
            q.push(" AND at >= ").push_bind(since.clone());
        }
        q.push(" ORDER BY seq LIMIT ")
            .push_bind(f.limit.unwrap_or(-1));
        let rows = q.build().fetch_all(&mut *self.conn().await).await?;
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
            .fetch_all(&mut *self.conn().await)
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
        .fetch_all(&mut *self.conn().await)
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
        let mut conn = self.conn().await;
        let counts = sqlx::query(
            "SELECT (SELECT COUNT(*) FROM ledger_transactions) AS t, (SELECT COUNT(*) FROM accounts) AS a",
        )
        .fetch_one(&mut *conn)
        .await?;
        let mut report = VerifyReport {
            transactions: counts.try_get("t")?,
            accounts: counts.try_get("a")?,
            ..Default::default()
        };
        let unbalanced = "SELECT t.id FROM ledger_transactions t LEFT JOIN ledger_entries e ON e.tx_id = t.id \
             GROUP BY t.id HAVING COALESCE(SUM(e.amount), 0) <> 0 OR COUNT(e.id) = 0 ORDER BY t.id";
        for r in sqlx::query(unbalanced).fetch_all(&mut *conn).await? {
            report.unbalanced_transactions.push(r.try_get(0)?);
        }
        let mismatched = "WITH sums AS (SELECT account, SUM(amount) AS total FROM ledger_entries GROUP BY account) \
             SELECT a.name, a.balance, COALESCE(s.total, 0) FROM accounts a LEFT JOIN sums s ON s.account = a.name \
             WHERE a.balance <> COALESCE(s.total, 0) \
             UNION ALL SELECT s.account, 0, s.total FROM sums s \
             WHERE NOT EXISTS (SELECT 1 FROM accounts a WHERE a.name = s.account) ORDER BY 1";
        for r in sqlx::query(mismatched).fetch_all(&mut *conn).await? {
            report
                .account_mismatches
                .push((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?));
        }
        let not_once = "SELECT s.workload_uid, s.idx, COUNT(t.id) FROM shards s \
             LEFT JOIN ledger_transactions t ON t.kind = 'charge' AND t.workload_uid = s.workload_uid AND t.shard_idx = s.idx \
             WHERE s.state = 'succeeded' GROUP BY s.workload_uid, s.idx HAVING COUNT(t.id) <> 1 ORDER BY 1, 2";
        for r in sqlx::query(not_once).fetch_all(&mut *conn).await? {
            report
                .shards_not_charged_once
                .push((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?));
        }
        let orphans = "SELECT t.id FROM ledger_transactions t \
             LEFT JOIN shards s ON s.workload_uid = t.workload_uid AND s.idx = t.shard_idx \
             WHERE t.kind = 'charge' AND (s.state IS NULL OR s.state <> 'succeeded') ORDER BY t.id";
        for r in sqlx::query(orphans).fetch_all(&mut *conn).await? {
            report.charges_without_success.push(r.try_get(0)?);
        }
        Ok(report)
    }

    async fn grant(
        &self,
        kind: GrantKind,
        namespace: &str,
        mesh: &str,
        amount: i64,
        memo: &str,
    ) -> Result<i64, StoreError> {
        let mut conn = self.conn().await;
        let mut tx = conn.begin().await?;
        let tx_id: i64 = sqlx::query(
            "INSERT INTO ledger_transactions (kind, memo, created_at) VALUES (?, ?, ?) RETURNING id",
        )
        .bind(kind.as_str())
        .bind(memo)
        .bind(now())
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
            "SELECT SUM(e.amount) FROM ledger_entries e JOIN ledger_transactions t ON t.id = e.tx_id \
             WHERE t.kind = 'budget' AND e.account = ? AND EXISTS \
               (SELECT 1 FROM ledger_entries o WHERE o.tx_id = t.id AND o.account = ?)",
        )
        .bind(namespace_account(namespace))
        .bind(mesh_account(mesh))
        .fetch_one(&mut *self.conn().await)
        .await?
        .try_get(0)?;
        Ok(total.unwrap_or(0))
    }

    async fn refund(&self, charge: i64, memo: &str) -> Result<i64, RefundError> {
        let mut conn = self.conn().await;
        let mut tx = conn.begin().await.map_err(StoreError::from)?;
        let row = sqlx::query(
            "SELECT kind, workload_uid, shard_idx FROM ledger_transactions WHERE id = ?",
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
            sqlx::query("SELECT account, amount FROM ledger_entries WHERE tx_id = ?")
                .bind(charge)
                .fetch_all(&mut *tx)
                .await
                .map_err(StoreError::from)?
                .iter()
                .map(|r| Ok((r.try_get("account")?, -r.try_get::<i64, _>("amount")?)))
                .collect::<Result<_, sqlx::Error>>()
                .map_err(StoreError::from)?;
        let inserted = sqlx::query(
            "INSERT INTO ledger_transactions (kind, refund_of, workload_uid, shard_idx, memo, created_at) \
             VALUES ('refund', ?, ?, ?, ?, ?) RETURNING id",
        )
        .bind(charge)
        .bind(row.try_get::<Option<String>, _>("workload_uid").map_err(StoreError::from)?)
        .bind(row.try_get::<Option<i64>, _>("shard_idx").map_err(StoreError::from)?)
        .bind(memo)
        .bind(now())
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

    async fn prune_events(&self, _before: &str, _archive: bool) -> Result<Vec<String>, StoreError> {
        Err(StoreError::Unsupported(
            "event retention works on Postgres, by whole monthly partitions; SQLite keeps every event",
        ))
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1")
            .execute(&mut *self.conn().await)
            .await?;
        Ok(())
    }

    async fn balance(&self, account: &str) -> Result<i64, StoreError> {
        let b: Option<i64> = sqlx::query("SELECT balance FROM accounts WHERE name = ?")
            .bind(account)
            .fetch_optional(&mut *self.conn().await)
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
            "SELECT t.id, t.kind, t.created_at, e.amount, t.workload_uid, t.shard_idx, t.memo \
             FROM ledger_entries e JOIN ledger_transactions t ON t.id = e.tx_id \
             WHERE e.account = ? AND t.created_at >= ? AND t.created_at <= ? ORDER BY t.id, e.id",
        )
        .bind(account)
        .bind(from)
        .bind(to)
        .fetch_all(&mut *self.conn().await)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn several_processes_can_open_a_new_database_at_once() {
        let url = crate::store::testing::Backend::Sqlite.fresh_url().await;
        let opens: Vec<_> = (0..6)
            .map(|_| {
                tokio::spawn({
                    let url = url.clone();
                    async move { SqliteStore::open(&url).await.map(|_| ()) }
                })
            })
            .collect();
        for o in opens {
            o.await.expect("task").expect("every open succeeds");
        }
    }

    /// The log reaches the database file from the checkpointer's connection, long before the
    /// writer's own checkpoint (at [`WRITER_CHECKPOINT_PAGES`]) would copy it; and once all of
    /// it is copied, the writer's next transaction starts the log over instead of growing it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_checkpointer_copies_the_log_into_the_file_without_the_writer() {
        let url = crate::store::testing::Backend::Sqlite.fresh_url().await;
        let path = std::path::PathBuf::from(url.trim_start_matches("sqlite://"));
        let wal_path = path.with_extension("db-wal");
        let store = SqliteStore::open(&url).await.expect("open");
        assert!(
            store._checkpointer.is_some(),
            "a database file has a checkpointer"
        );
        let size = |p: &std::path::Path| std::fs::metadata(p).expect("file").len();
        // About 2 MB of events in 100 commits: some 1,400 pages (5.6 MB) written to the log,
        // far below the writer's threshold.
        let message = "x".repeat(20_000);
        let write = |from: usize| {
            let (store, message) = (store.clone(), message.clone());
            async move {
                for i in from..from + 100 {
                    store
                        .append(
                            &Event::new(EventKind::AgentLeft, format!("{i} {message}")).agent("a"),
                        )
                        .await
                        .expect("append");
                }
            }
        };
        let before = size(&path);
        write(0).await;
        let first_log = size(&wal_path);
        // Until the checkpointer has copied the whole log: the file holds the events' pages
        // and has stopped growing for half a second (five of its ticks). A file still growing
        // is a checkpoint under way, and the log starts over only once all of it is copied.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let (mut last, mut still_since) = (size(&path), std::time::Instant::now());
        while std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let now = size(&path);
            if now != last {
                (last, still_since) = (now, std::time::Instant::now());
            } else if now >= before + 1_500_000
                && still_since.elapsed() >= Duration::from_millis(500)
            {
                break;
            }
        }
        let grown = size(&path);
        assert!(
            grown >= before + 1_500_000,
            "the database file holds the events' pages: {before} -> {grown} bytes"
        );
        // Without a checkpoint since, the second 2 MB would be appended to the first.
        write(100).await;
        let second_log = size(&wal_path);
        assert!(
            second_log < first_log + first_log / 4,
            "the log started over: {first_log} bytes after the first writes, {second_log} after the second"
        );
    }

    /// A store call dropped (cancelled) between two round trips of its transaction leaves the
    /// transaction open on the connection: the next caller rolls it back before its own work,
    /// so nothing of the dropped call is committed and the next call's work is.
    #[tokio::test]
    async fn a_transaction_left_open_by_a_cancelled_call_is_rolled_back() {
        let store = SqliteStore::open("sqlite::memory:").await.expect("open");
        {
            let mut held = store.held().await;
            held.open = true;
            Script::new("BEGIN; INSERT INTO accounts (name, balance) VALUES ('ghost', 5);")
                .run(&mut held.conn)
                .await
                .expect("the first round trip");
            // Dropped here, before the round trip that would commit.
        }
        store
            .ensure_account("namespace/real")
            .await
            .expect("the next call goes through");
        let names: Vec<String> = sqlx::query_scalar("SELECT name FROM accounts ORDER BY name")
            .fetch_all(&mut *store.conn().await)
            .await
            .expect("accounts");
        assert_eq!(
            names,
            ["namespace/real"],
            "the dropped call's insert is gone"
        );
        assert!(!store.held().await.open);
    }

    /// A round plans only once the one connection is its own: the slots freed by the
    /// completions committed meanwhile are in its plan.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_round_plans_once_the_connection_is_free() {
        let store = SqliteStore::open("sqlite::memory:").await.expect("open");
        let busy = store.conn().await;
        let planned = Arc::new(std::sync::Mutex::new(None::<std::time::Instant>));
        let round = tokio::spawn({
            let (store, planned) = (store.clone(), planned.clone());
            async move {
                store
                    .assign_planned(move || {
                        *planned.lock().expect("lock") = Some(std::time::Instant::now());
                        Vec::new()
                    })
                    .await
            }
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(
            planned.lock().expect("lock").is_none(),
            "no plan while another holds the connection"
        );
        let released = std::time::Instant::now();
        drop(busy);
        let (claims, won) = round.await.expect("task").expect("round");
        assert!(claims.is_empty() && won.is_empty());
        let at = planned.lock().expect("lock").expect("planned once free");
        assert!(at >= released, "planned after the connection came back");
    }

    #[tokio::test]
    async fn a_database_in_memory_has_no_checkpointer() {
        let store = SqliteStore::open("sqlite::memory:").await.expect("open");
        assert!(store._checkpointer.is_none());
        store
            .append(&Event::new(EventKind::AgentLeft, "gone").agent("a"))
            .await
            .expect("a write still goes through");
    }
}
