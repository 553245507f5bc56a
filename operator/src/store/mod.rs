//! The store: shards, the ledger and the event log. One trait, a backend per database
//! (SQLite here; Postgres slots in behind the same trait), and one contract test suite.

pub mod group;
pub mod postgres;
pub mod sqlite;
pub mod testing;

#[cfg(test)]
mod contract;

use std::future::Future;

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database reported an error.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// Migrations failed.
    #[error("migrating the database failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// The backend cannot do this.
    #[error("{0}")]
    Unsupported(&'static str),
    /// A group commit failed (the message of the batch's error).
    #[error("committing completions failed: {0}")]
    Commit(String),
    /// The URL names no supported database.
    #[error("unsupported database URL `{0}` (use sqlite://PATH or postgres://…)")]
    UnsupportedUrl(String),
    /// The folder of a SQLite database does not exist.
    #[error("the folder {0} of the SQLite database does not exist")]
    MissingFolder(String),
    /// The database server could not be reached.
    #[error("cannot reach the Postgres server at {0}")]
    Unreachable(String),
    /// A command that only reads found no database where the URL points.
    #[error("no database at {0}: nothing has run with this --database-url yet (a mistyped path?)")]
    Missing(String),
    /// The database could not be reached for a while (a group commit's batch failed so).
    #[error("the database is unavailable: {0}")]
    Unavailable(String),
}

impl StoreError {
    /// Whether the database could not be reached (down, restarting, refusing connections,
    /// the connection dropped): worth waiting out, unlike a refused or malformed write.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Unavailable(_) | Self::Unreachable(_) => true,
            Self::Database(e) => transient(e),
            _ => false,
        }
    }
}

fn transient(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_) => true,
        // Postgres: connection exceptions (08), shutting down or starting up (57P01-57P03),
        // too many connections (53300).
        sqlx::Error::Database(d) => d.code().is_some_and(|c| {
            c.starts_with("08") || matches!(c.as_ref(), "57P01" | "57P02" | "57P03" | "53300")
        }),
        _ => false,
    }
}

/// A workload as stored.
#[derive(Clone, Debug)]
pub struct WorkloadRecord {
    /// Unique id of this run of the workload.
    pub uid: String,
    /// Namespace (the account charged).
    pub namespace: String,
    /// Name.
    pub name: String,
    /// Mesh.
    pub mesh: String,
    /// The spec as JSON.
    pub spec_json: String,
    /// Input size.
    pub input_bytes: u64,
    /// The input object's version (ETag) when it was planned; `None` when the store named
    /// none (reads then check the size only).
    pub input_version: Option<String>,
    /// The input's files as JSON (an `infermesh_io::Dataset`) when it is not one plain JSONL
    /// object; `None` otherwise.
    pub input_files: Option<String>,
}

/// A workload as the store holds it, for resuming.
#[derive(Clone, Debug)]
pub struct StoredWorkload {
    /// The workload.
    pub record: WorkloadRecord,
    /// Its shards, by index.
    pub shards: Vec<StoredShard>,
}

/// A shard as the store holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredShard {
    /// Index.
    pub index: u32,
    /// First byte.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
    /// `pending`, `running`, `succeeded` or `failed`.
    pub state: String,
    /// Attempts started: the number of the last one (attempt numbers only ever grow).
    pub attempt: u32,
    /// The attempt the shard had when its workload was last retried
    /// ([`Store::reopen_failed`]); 0 when never retried. The attempts it has used towards
    /// `spec.maxAttempts` are `attempt - attempt_base`.
    pub attempt_base: u32,
    /// The agent of the last attempt.
    pub agent: Option<String>,
    /// Records written (succeeded shards).
    pub records: u64,
    /// The output part (succeeded shards).
    pub output_uri: Option<String>,
    /// sha256 of the part (succeeded shards).
    pub sha256: Option<String>,
}

/// What [`Store::reopen_failed`] did.
#[derive(Clone, Debug)]
pub enum ReopenOutcome {
    /// The workload was `Failed` and is `Running` again: every shard that had not succeeded is
    /// pending, with a fresh series of attempts numbered above every attempt it had.
    Reopened {
        /// The workload as stored after the change, with its shards (what a core resumes).
        workload: Box<StoredWorkload>,
        /// Shards put back in the queue (every shard not succeeded).
        requeued: u32,
        /// Of those, the shards that had failed for good.
        failed: u32,
        /// Succeeded shards, kept with their parts and charges.
        kept: u32,
    },
    /// The workload is not `Failed` (`Running`, `Succeeded`): nothing changed.
    NotFailed {
        /// Its stored phase.
        phase: String,
    },
    /// No workload with that uid is stored: nothing changed.
    Unknown,
}

/// The message of a `workload.retried` event.
pub(crate) fn retried_message(requeued: u32, failed: u32, kept: u32) -> String {
    format!(
        "retried: {requeued} shards requeued ({failed} had failed, {} had not finished), \
         {kept} succeeded shards kept",
        requeued - failed
    )
}

/// A planned shard.
#[derive(Clone, Copy, Debug)]
pub struct ShardRecord {
    /// Index.
    pub index: u32,
    /// First byte.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
}

/// A shard completion to record and charge.
#[derive(Clone, Debug)]
pub struct CompletionRecord {
    /// Workload uid.
    pub workload_uid: String,
    /// Namespace charged.
    pub namespace: String,
    /// Shard index.
    pub shard: u32,
    /// The attempt that completed.
    pub attempt: u32,
    /// The agent credited.
    pub agent: String,
    /// Records written.
    pub records: u64,
    /// The output part.
    pub output_uri: String,
    /// sha256 of the part.
    pub sha256: String,
    /// Price in micro-credits.
    pub price: i64,
    /// Device and seconds, for the event message.
    pub device: String,
    /// Seconds of compute.
    pub compute_seconds: f64,
}

/// How a group commit judges its batch, the same on both stores. Within the batch the first
/// completion of a shard is its candidate; later ones are refused whatever the database says.
/// Each candidate is then a compare-and-set on the shard's state, holder and attempt.
pub(crate) struct BatchJudge<'a> {
    cs: &'a [CompletionRecord],
    first: std::collections::HashMap<(&'a str, u32), usize>,
}

/// Shards as a batch statement returns them, (workload uid, index), kept by uid then index:
/// a batch has a few workloads and hundreds of shards, and a shard is looked up by
/// `(&str, index)` without copying its uid.
#[derive(Debug, Default)]
pub(crate) struct ShardSet(std::collections::HashMap<String, std::collections::HashSet<u32>>);

impl ShardSet {
    pub(crate) fn insert(&mut self, uid: String, shard: u32) {
        self.0.entry(uid).or_default().insert(shard);
    }

    pub(crate) fn contains(&self, uid: &str, shard: u32) -> bool {
        self.0.get(uid).is_some_and(|s| s.contains(&shard))
    }

    pub(crate) fn len(&self) -> usize {
        self.0.values().map(|s| s.len()).sum()
    }
}

impl FromIterator<(String, u32)> for ShardSet {
    fn from_iter<I: IntoIterator<Item = (String, u32)>>(shards: I) -> Self {
        let mut set = Self::default();
        for (uid, shard) in shards {
            set.insert(uid, shard);
        }
        set
    }
}

impl<'a> BatchJudge<'a> {
    pub(crate) fn new(cs: &'a [CompletionRecord]) -> Self {
        let mut first = std::collections::HashMap::new();
        for (i, c) in cs.iter().enumerate() {
            first.entry((c.workload_uid.as_str(), c.shard)).or_insert(i);
        }
        Self { cs, first }
    }

    fn is_first(&self, i: usize, c: &CompletionRecord) -> bool {
        self.first.get(&(c.workload_uid.as_str(), c.shard)) == Some(&i)
    }

    /// The first completion of each shard, in batch order.
    pub(crate) fn candidates(&self) -> Vec<&'a CompletionRecord> {
        let cs = self.cs;
        cs.iter()
            .enumerate()
            .filter(|(i, c)| self.is_first(*i, c))
            .map(|(_, c)| c)
            .collect()
    }

    /// Each completion's outcome: `charged` holds the shards whose compare-and-set took,
    /// `recorded` those already done by that very attempt on that agent (an earlier commit
    /// whose answer was lost).
    pub(crate) fn outcomes(&self, charged: &ShardSet, recorded: &ShardSet) -> Vec<ChargeOutcome> {
        self.cs
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let (uid, shard) = (c.workload_uid.as_str(), c.shard);
                if !self.is_first(i, c) {
                    ChargeOutcome::Refused
                } else if charged.contains(uid, shard) {
                    ChargeOutcome::Charged
                } else if recorded.contains(uid, shard) {
                    ChargeOutcome::AlreadyCharged
                } else {
                    ChargeOutcome::Refused
                }
            })
            .collect()
    }

    /// The completions to charge, and the events of the whole batch (in batch order).
    pub(crate) fn charges_and_events(
        &self,
        outcomes: &[ChargeOutcome],
    ) -> (Vec<&'a CompletionRecord>, Vec<Event>) {
        let cs = self.cs;
        let charges = cs
            .iter()
            .zip(outcomes)
            .filter(|(_, o)| **o == ChargeOutcome::Charged)
            .map(|(c, _)| c)
            .collect();
        let events = cs
            .iter()
            .zip(outcomes)
            .filter_map(|(c, o)| c.event(*o))
            .collect();
        (charges, events)
    }
}

impl CompletionRecord {
    /// The ledger's unique key of this shard's charge.
    pub fn charge_key(&self) -> String {
        format!("{}#{}", self.workload_uid, self.shard)
    }

    /// The memo of the charge transaction.
    pub fn memo(&self) -> String {
        format!(
            "{} records, {:.3}s on {}",
            self.records, self.compute_seconds, self.device
        )
    }

    /// The entries of the charge: namespace to agent.
    pub fn entries(&self) -> [(String, i64); 2] {
        [
            (namespace_account(&self.namespace), -self.price),
            (agent_account(&self.agent), self.price),
        ]
    }

    /// The event this completion logs (none when it was recorded before).
    pub fn event(&self, outcome: ChargeOutcome) -> Option<Event> {
        let e = match outcome {
            ChargeOutcome::AlreadyCharged => return None,
            ChargeOutcome::Charged => Event::new(
                EventKind::ShardCompleted,
                format!(
                    "{} records by {} in {:.3}s ({}), charged {} micro-credits",
                    self.records, self.agent, self.compute_seconds, self.device, self.price
                ),
            ),
            ChargeOutcome::Refused => Event::new(
                EventKind::ShardReportRefused,
                format!(
                    "stale_attempt: the store refused attempt {} of {}: it is not the shard's \
                     running attempt held by that agent (done, requeued or claimed elsewhere)",
                    self.attempt, self.agent
                ),
            ),
        };
        Some(
            e.workload(&self.workload_uid)
                .shard(self.shard, self.attempt)
                .agent(&self.agent),
        )
    }
}

/// What recording a completion did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChargeOutcome {
    /// The completion came from the holder of the shard's running attempt: the shard is
    /// marked done and charged.
    Charged,
    /// The shard is not running that attempt on that agent (already done, requeued, never
    /// assigned to it): nothing written but a `shard.report_refused` event.
    Refused,
    /// The shard is already done by this very attempt on this very agent: an earlier write of
    /// this completion committed, but its answer was lost (the connection broke after the
    /// commit). Nothing is written again; the caller goes on as if it had been `Charged`,
    /// which it was, once.
    AlreadyCharged,
}

/// A claim of one shard for one attempt on one agent, made in a dispatch round.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claim {
    /// Workload uid.
    pub uid: String,
    /// Shard index.
    pub shard: u32,
    /// The attempt it starts (the stored attempt + 1).
    pub attempt: u32,
    /// The agent that runs it.
    pub agent: String,
}

/// A round's outcome from the claims the store accepted (the rows its claim statement
/// returned): per claim in order whether it won, and the `shard.assigned` events of those
/// that did.
pub(crate) fn claims_won(claims: &[Claim], accepted: &ShardSet) -> (Vec<bool>, Vec<Event>) {
    let won: Vec<bool> = claims
        .iter()
        .map(|c| accepted.contains(&c.uid, c.shard))
        .collect();
    let events = claims
        .iter()
        .zip(&won)
        .filter(|(_, w)| **w)
        .map(|(c, _)| {
            Event::new(
                EventKind::ShardAssigned,
                format!("attempt {} on {}", c.attempt, c.agent),
            )
            .workload(&c.uid)
            .shard(c.shard, c.attempt)
            .agent(&c.agent)
        })
        .collect();
    (won, events)
}

/// Kinds of events; one per state change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// A workload was admitted and planned.
    WorkloadAdmitted,
    /// A workload was held (`QuotaExceeded`).
    WorkloadHeld,
    /// A workload's model URI no longer hashes to its pinned sha256.
    ModelChanged,
    /// Every shard of a workload succeeded.
    WorkloadSucceeded,
    /// A workload failed.
    WorkloadFailed,
    /// A failed workload was retried: its shards that had not succeeded went back to the
    /// queue ([`Store::reopen_failed`]).
    WorkloadRetried,
    /// A shard was assigned to an agent.
    ShardAssigned,
    /// A shard completed (first completion: charged).
    ShardCompleted,
    /// A report (Completed or Failed) refused: not from the holder of the shard's current
    /// attempt, stale, a duplicate, or not what its output part shows.
    ShardReportRefused,
    /// A shard attempt failed.
    ShardFailed,
    /// A shard went back to the queue.
    ShardRequeued,
    /// An agent registered.
    AgentJoined,
    /// An agent's stream dropped or its lease expired while it held shards.
    AgentLost,
    /// An agent's stream ended with nothing running on it (a clean exit, a drain).
    AgentLeft,
}

impl EventKind {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::WorkloadAdmitted => "workload.admitted",
            Self::WorkloadHeld => "workload.held",
            Self::ModelChanged => "workload.model_changed",
            Self::WorkloadSucceeded => "workload.succeeded",
            Self::WorkloadFailed => "workload.failed",
            Self::WorkloadRetried => "workload.retried",
            Self::ShardAssigned => "shard.assigned",
            Self::ShardCompleted => "shard.completed",
            Self::ShardReportRefused => "shard.report_refused",
            Self::ShardFailed => "shard.failed",
            Self::ShardRequeued => "shard.requeued",
            Self::AgentJoined => "agent.joined",
            Self::AgentLost => "agent.lost",
            Self::AgentLeft => "agent.left",
        }
    }
}

/// An event to append.
#[derive(Clone, Debug)]
pub struct Event {
    /// Kind.
    pub kind: EventKind,
    /// Workload uid, if any.
    pub workload_uid: Option<String>,
    /// Shard index, if any.
    pub shard: Option<u32>,
    /// Attempt, if any.
    pub attempt: Option<u32>,
    /// Agent, if any.
    pub agent: Option<String>,
    /// Human-readable detail.
    pub message: String,
}

impl Event {
    /// An event of `kind` with a message and nothing else set.
    pub fn new(kind: EventKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            workload_uid: None,
            shard: None,
            attempt: None,
            agent: None,
            message: message.into(),
        }
    }

    /// Sets the workload.
    pub fn workload(mut self, uid: &str) -> Self {
        self.workload_uid = Some(uid.to_string());
        self
    }

    /// Sets shard and attempt.
    pub fn shard(mut self, shard: u32, attempt: u32) -> Self {
        self.shard = Some(shard);
        self.attempt = Some(attempt);
        self
    }

    /// Sets the agent.
    pub fn agent(mut self, agent: &str) -> Self {
        self.agent = Some(agent.to_string());
        self
    }
}

/// A stored event.
#[derive(Clone, Debug, serde::Serialize)]
pub struct EventRow {
    /// Position in the log.
    pub seq: i64,
    /// When (RFC 3339).
    pub at: String,
    /// Kind name.
    pub kind: String,
    /// Workload uid.
    pub workload_uid: Option<String>,
    /// Shard.
    pub shard: Option<i64>,
    /// Attempt.
    pub attempt: Option<i64>,
    /// Agent.
    pub agent: Option<String>,
    /// Detail.
    pub message: String,
}

/// Which events to read.
#[derive(Clone, Debug, Default)]
pub struct EventFilter {
    /// Only this workload.
    pub workload_uid: Option<String>,
    /// Only this agent.
    pub agent: Option<String>,
    /// Only this kind (`shard.requeued`).
    pub kind: Option<String>,
    /// Only events after this sequence number.
    pub after_seq: Option<i64>,
    /// At most this many.
    pub limit: Option<i64>,
    /// Only events at or after this time (RFC 3339).
    pub since: Option<String>,
}

impl EventFilter {
    /// Adds ` AND column = value` for each of the workload, agent and kind filters given, and
    /// nothing for the others: a statement that names only the filters in use lets the
    /// database use its indexes, where `(? IS NULL OR column = ?)` does not.
    pub(crate) fn push_equalities<'a, DB>(&self, q: &mut sqlx::QueryBuilder<'a, DB>)
    where
        DB: sqlx::Database,
        String: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    {
        for (column, value) in [
            ("workload_uid", &self.workload_uid),
            ("agent", &self.agent),
            ("kind", &self.kind),
        ] {
            if let Some(v) = value {
                q.push(format_args!(" AND {column} = "))
                    .push_bind(v.clone());
            }
        }
    }
}

/// One charge of a shard, as the ledger holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Charge {
    /// Workload uid.
    pub workload_uid: String,
    /// Shard index.
    pub shard: u32,
    /// Account debited (the namespace).
    pub from: String,
    /// Account credited (the agent).
    pub to: String,
    /// Micro-credits.
    pub amount: i64,
}

/// What `ledger verify` found. Empty lists mean the invariant holds.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct VerifyReport {
    /// Transactions checked.
    pub transactions: i64,
    /// Accounts checked.
    pub accounts: i64,
    /// Transactions whose entries do not sum to zero (or that have none).
    pub unbalanced_transactions: Vec<i64>,
    /// Accounts whose stored balance differs from the sum of their entries:
    /// (account, stored, sum of entries).
    pub account_mismatches: Vec<(String, i64, i64)>,
    /// Succeeded shards not charged exactly once: (workload uid, shard, charges).
    pub shards_not_charged_once: Vec<(String, i64, i64)>,
    /// Charge transactions whose shard did not succeed.
    pub charges_without_success: Vec<i64>,
}

impl VerifyReport {
    /// Whether every invariant holds.
    pub fn ok(&self) -> bool {
        self.unbalanced_transactions.is_empty()
            && self.account_mismatches.is_empty()
            && self.shards_not_charged_once.is_empty()
            && self.charges_without_success.is_empty()
    }
}

/// One entry of an account's statement.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct StatementLine {
    /// Transaction id.
    pub tx_id: i64,
    /// `charge`, `grant` or `refund`.
    pub kind: String,
    /// When (RFC 3339).
    pub at: String,
    /// Micro-credits into (positive) or out of (negative) the account.
    pub amount: i64,
    /// Workload of a charge or refund.
    pub workload_uid: Option<String>,
    /// Shard of a charge or refund.
    pub shard: Option<i64>,
    /// What it was for.
    pub memo: String,
}

/// Why a refund was refused.
#[derive(Debug, thiserror::Error)]
pub enum RefundError {
    /// No charge with that id.
    #[error("transaction {0} is not a charge")]
    NotACharge(i64),
    /// It was refunded before.
    #[error("charge {0} is already refunded")]
    AlreadyRefunded(i64),
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Who moved credits from a Mesh to a namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GrantKind {
    /// Bringing the namespace's grant to the Mesh's `budgets` entry (kind `budget`).
    Budget,
    /// `infermesh ledger grant` (kind `grant`), which a Mesh reconcile never takes back.
    Manual,
}

impl GrantKind {
    /// The stored transaction kind.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Budget => "budget",
            Self::Manual => "grant",
        }
    }
}

/// The account of a Mesh: where its budget grants come from.
pub fn mesh_account(mesh: &str) -> String {
    format!("mesh/{mesh}")
}

/// The account of a namespace.
pub fn namespace_account(ns: &str) -> String {
    format!("namespace/{ns}")
}

/// The account of an agent.
pub fn agent_account(agent: &str) -> String {
    format!("agent/{agent}")
}

/// Where the operator keeps its state. Every method that changes state appends its event in
/// the same transaction, so the log and the state never disagree.
pub trait Store: Send + Sync + 'static {
    /// Records an admitted workload and its planned shards.
    fn create_workload(
        &self,
        w: &WorkloadRecord,
        shards: &[ShardRecord],
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Claims pending shards, each for its attempt on its agent, in one statement: a
    /// compare-and-set on each shard's state and attempt, so of several operators racing for
    /// the same shard exactly one wins. Returns, per claim in order, whether it won.
    fn assign_batch(
        &self,
        claims: &[Claim],
    ) -> impl Future<Output = Result<Vec<bool>, StoreError>> + Send;

    /// A dispatch round's claims, planned by `plan` as late as the store allows, then claimed
    /// as [`Store::assign_batch`] does. A store with one connection takes the connection first
    /// and plans then, so the round holds every slot freed while the connection was busy;
    /// others plan at once. Returns the claims and, per claim in order, whether it won.
    fn assign_planned<F>(
        &self,
        plan: F,
    ) -> impl Future<Output = Result<(Vec<Claim>, Vec<bool>), StoreError>> + Send
    where
        F: FnOnce() -> Vec<Claim> + Send,
    {
        async move {
            let claims = plan();
            if claims.is_empty() {
                return Ok((claims, Vec::new()));
            }
            let won = self.assign_batch(&claims).await?;
            Ok((claims, won))
        }
    }

    /// Claims one shard (see [`Store::assign_batch`]).
    fn assign(
        &self,
        uid: &str,
        shard: u32,
        attempt: u32,
        agent: &str,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send {
        async move {
            let claim = Claim {
                uid: uid.into(),
                shard,
                attempt,
                agent: agent.into(),
            };
            Ok(self
                .assign_batch(std::slice::from_ref(&claim))
                .await?
                .first()
                .copied()
                .unwrap_or(false))
        }
    }

    /// Opens an account with a zero balance if it has none (a Mesh's account when the Mesh is
    /// applied, so the ledger knows every Mesh).
    fn ensure_account(&self, name: &str) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// The Meshes the ledger knows: those with an account (every applied Mesh has one) or
    /// with a stored workload, sorted.
    fn meshes(&self) -> impl Future<Output = Result<Vec<String>, StoreError>> + Send;

    /// The stored phase of workload `uid` (`Running`, `Succeeded`, `Failed`), if it is stored.
    fn workload_phase(
        &self,
        uid: &str,
    ) -> impl Future<Output = Result<Option<String>, StoreError>> + Send;

    /// Workloads in `phase` (`Running`, `Succeeded`, `Failed`), with their shards.
    fn workloads_in_phase(
        &self,
        phase: &str,
    ) -> impl Future<Output = Result<Vec<StoredWorkload>, StoreError>> + Send;

    /// Workloads still running, with their shards: what an operator resumes from after a
    /// restart or a take-over.
    fn active_workloads(
        &self,
    ) -> impl Future<Output = Result<Vec<StoredWorkload>, StoreError>> + Send {
        self.workloads_in_phase("Running")
    }

    /// Records a completion: a compare-and-set on the shard's state (`running`), holder and
    /// attempt. When it holds, the shard is marked succeeded and charged (namespace -> agent)
    /// in one transaction; otherwise nothing changes but a `shard.report_refused` event.
    fn complete(
        &self,
        c: &CompletionRecord,
    ) -> impl Future<Output = Result<ChargeOutcome, StoreError>> + Send {
        async move {
            let outcomes = self.complete_batch(std::slice::from_ref(c)).await?;
            Ok(outcomes.first().copied().unwrap_or(ChargeOutcome::Refused))
        }
    }

    /// Records many completions in one transaction (group commit): one outcome per record, in
    /// order. Within a batch, as across batches, a shard is charged at most once.
    fn complete_batch(
        &self,
        cs: &[CompletionRecord],
    ) -> impl Future<Output = Result<Vec<ChargeOutcome>, StoreError>> + Send;

    /// Attempt `attempt` of a running shard was lost or failed and the shard goes back to the
    /// queue: a compare-and-set on state and attempt. Returns whether it held (the event is
    /// written only then).
    fn requeue(
        &self,
        uid: &str,
        shard: u32,
        attempt: u32,
        agent: Option<&str>,
        reason: &str,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// A shard failed for good at attempt `attempt`: a compare-and-set on the attempt (a
    /// succeeded shard stays succeeded). Returns whether it held.
    fn fail_shard(
        &self,
        uid: &str,
        shard: u32,
        attempt: u32,
        agent: Option<&str>,
        message: &str,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// A workload reached a terminal phase (`Succeeded`, `Failed`).
    fn finish_workload(
        &self,
        uid: &str,
        phase: &str,
        message: &str,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Retries a failed workload, in one transaction: a workload in phase `Failed` goes back
    /// to `Running`, every shard of it that had not succeeded goes back to `pending` (no
    /// agent) with `attempt_base` set to its attempt, and a `workload.retried` event says how
    /// many shards were requeued. Succeeded shards, their parts and their charges are kept.
    /// Attempt numbers are never reused: a requeued shard's next claim is its attempt + 1, and
    /// it has `spec.maxAttempts` attempts from there. A workload in another phase, or an
    /// unknown uid, is refused ([`ReopenOutcome::NotFailed`], [`ReopenOutcome::Unknown`]) and
    /// nothing changes.
    fn reopen_failed(
        &self,
        uid: &str,
    ) -> impl Future<Output = Result<ReopenOutcome, StoreError>> + Send;

    /// How long the stored run of workload `uid` has been running, by the store's clock:
    /// since its admission, or since its last retry ([`Store::reopen_failed`]). What
    /// `spec.activeDeadlineSeconds` counts, so that it survives a restart or a take-over.
    /// `None` for an unknown uid.
    fn running_for(
        &self,
        uid: &str,
    ) -> impl Future<Output = Result<Option<std::time::Duration>, StoreError>> + Send;

    /// Appends an event that comes with no other change (agent joined or lost).
    fn append(&self, event: &Event) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Reads events in sequence order.
    fn events(
        &self,
        filter: &EventFilter,
    ) -> impl Future<Output = Result<Vec<EventRow>, StoreError>> + Send;

    /// Balance of every account, in micro-credits.
    fn balances(&self) -> impl Future<Output = Result<Vec<(String, i64)>, StoreError>> + Send;

    /// Every shard charge of a workload.
    fn charges(&self, uid: &str) -> impl Future<Output = Result<Vec<Charge>, StoreError>> + Send;

    /// Checks the ledger's invariants (see [`VerifyReport`]).
    fn verify(&self) -> impl Future<Output = Result<VerifyReport, StoreError>> + Send;

    /// Grants `amount` micro-credits (negative: takes back) from a Mesh to a namespace, as a
    /// transaction of `kind`: a Mesh's budget reconciliation, or a grant by hand.
    fn grant(
        &self,
        kind: GrantKind,
        namespace: &str,
        mesh: &str,
        amount: i64,
        memo: &str,
    ) -> impl Future<Output = Result<i64, StoreError>> + Send;

    /// Micro-credits a Mesh's budget has granted a namespace, net (budget transactions only:
    /// grants by hand are not the budget's, and reconciling the budget leaves them alone).
    fn granted(
        &self,
        namespace: &str,
        mesh: &str,
    ) -> impl Future<Output = Result<i64, StoreError>> + Send;

    /// Reverses a charge (agent back to namespace), once.
    fn refund(
        &self,
        charge: i64,
        memo: &str,
    ) -> impl Future<Output = Result<i64, RefundError>> + Send;

    /// Drops (or, with `archive`, detaches and keeps as plain tables) every monthly partition
    /// of the event log that ends on or before `before` (`YYYY-MM-DD`): retention by whole
    /// partitions, never by deleting rows. Returns the partitions removed.
    fn prune_events(
        &self,
        before: &str,
        archive: bool,
    ) -> impl Future<Output = Result<Vec<String>, StoreError>> + Send;

    /// An account's balance.
    fn balance(&self, account: &str) -> impl Future<Output = Result<i64, StoreError>> + Send;

    /// One round trip to the database: whether it answers now.
    fn ping(&self) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// An account's entries between two RFC 3339 times (inclusive), oldest first.
    fn statement(
        &self,
        account: &str,
        from: &str,
        to: &str,
    ) -> impl Future<Output = Result<Vec<StatementLine>, StoreError>> + Send;
}

/// The store a URL names: `sqlite://PATH` (or `sqlite::memory:`) or `postgres://…`.
#[derive(Clone, Debug)]
pub enum AnyStore {
    /// SQLite.
    Sqlite(sqlite::SqliteStore),
    /// Postgres.
    Postgres(postgres::PgStore),
}

/// Opens (and migrates) the store `url` names.
pub async fn open(url: &str) -> Result<AnyStore, StoreError> {
    if let Some(rest) = url.strip_prefix("sqlite:") {
        // Name the folder that is missing instead of SQLite's "unable to open database file".
        let path = std::path::Path::new(
            rest.strip_prefix("//")
                .unwrap_or(rest)
                .split('?')
                .next()
                .unwrap_or_default(),
        );
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
            && !rest.contains(":memory:")
            && !dir.is_dir()
        {
            return Err(StoreError::MissingFolder(dir.display().to_string()));
        }
    }
    if url.starts_with("sqlite:") {
        Ok(AnyStore::Sqlite(sqlite::SqliteStore::open(url).await?))
    } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(AnyStore::Postgres(postgres::PgStore::open(url).await?))
    } else {
        Err(StoreError::UnsupportedUrl(url.to_string()))
    }
}

/// Runs a start-up step against the store, waiting out a store that does not answer — a
/// database restarting, or starting along with us — for up to `patience`: asked again after
/// 0.5, 1, 2, then every 4 s, saying so once. Errors that waiting cannot cure return at once.
pub async fn patiently<T, E: std::fmt::Display>(
    what: &str,
    patience: std::time::Duration,
    transient: impl Fn(&E) -> bool,
    mut step: impl AsyncFnMut() -> Result<T, E>,
) -> Result<T, E> {
    let deadline = tokio::time::Instant::now() + patience;
    let mut wait = std::time::Duration::from_millis(500);
    let mut said = false;
    loop {
        match step().await {
            Err(e) if transient(&e) && tokio::time::Instant::now() + wait < deadline => {
                if !said {
                    tracing::warn!(error = %e, "{what}: the store does not answer; waiting up to {patience:?}");
                    said = true;
                }
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(std::time::Duration::from_secs(4));
            }
            Err(e) => return Err(e),
            Ok(v) => {
                if said {
                    tracing::info!("{what}: the store answers");
                }
                return Ok(v);
            }
        }
    }
}

/// Opens the store `url` names only if it exists: a command that reads a ledger must not
/// create an empty one at a mistyped SQLite path (Postgres databases are made by their owner).
pub async fn open_existing(url: &str) -> Result<AnyStore, StoreError> {
    if let Some(rest) = url.strip_prefix("sqlite:") {
        let path = rest.strip_prefix("//").unwrap_or(rest);
        let path = path.split('?').next().unwrap_or_default();
        if !path.is_empty() && !path.contains(":memory:") && !std::path::Path::new(path).exists() {
            return Err(StoreError::Missing(path.to_string()));
        }
    }
    open(url).await
}

/// Calls the same method on whichever backend.
macro_rules! each {
    ($self:ident, $s:ident => $call:expr) => {
        match $self {
            AnyStore::Sqlite($s) => $call.await,
            AnyStore::Postgres($s) => $call.await,
        }
    };
}

impl Store for AnyStore {
    async fn create_workload(
        &self,
        w: &WorkloadRecord,
        shards: &[ShardRecord],
    ) -> Result<(), StoreError> {
        each!(self, s => s.create_workload(w, shards))
    }
    async fn assign_batch(&self, claims: &[Claim]) -> Result<Vec<bool>, StoreError> {
        each!(self, s => s.assign_batch(claims))
    }
    async fn assign_planned<F>(&self, plan: F) -> Result<(Vec<Claim>, Vec<bool>), StoreError>
    where
        F: FnOnce() -> Vec<Claim> + Send,
    {
        each!(self, s => s.assign_planned(plan))
    }
    async fn workload_phase(&self, uid: &str) -> Result<Option<String>, StoreError> {
        each!(self, s => s.workload_phase(uid))
    }
    async fn meshes(&self) -> Result<Vec<String>, StoreError> {
        each!(self, s => s.meshes())
    }
    async fn ensure_account(&self, name: &str) -> Result<(), StoreError> {
        each!(self, s => s.ensure_account(name))
    }
    async fn workloads_in_phase(&self, phase: &str) -> Result<Vec<StoredWorkload>, StoreError> {
        each!(self, s => s.workloads_in_phase(phase))
    }
    async fn complete_batch(
        &self,
        cs: &[CompletionRecord],
    ) -> Result<Vec<ChargeOutcome>, StoreError> {
        each!(self, s => s.complete_batch(cs))
    }
    async fn requeue(
        &self,
        uid: &str,
        shard: u32,
        attempt: u32,
        agent: Option<&str>,
        reason: &str,
    ) -> Result<bool, StoreError> {
        each!(self, s => s.requeue(uid, shard, attempt, agent, reason))
    }
    async fn fail_shard(
        &self,
        uid: &str,
        shard: u32,
        attempt: u32,
        agent: Option<&str>,
        message: &str,
    ) -> Result<bool, StoreError> {
        each!(self, s => s.fail_shard(uid, shard, attempt, agent, message))
    }
    async fn finish_workload(
        &self,
        uid: &str,
        phase: &str,
        message: &str,
    ) -> Result<(), StoreError> {
        each!(self, s => s.finish_workload(uid, phase, message))
    }
    async fn reopen_failed(&self, uid: &str) -> Result<ReopenOutcome, StoreError> {
        each!(self, s => s.reopen_failed(uid))
    }
    async fn running_for(&self, uid: &str) -> Result<Option<std::time::Duration>, StoreError> {
        each!(self, s => s.running_for(uid))
    }
    async fn append(&self, event: &Event) -> Result<(), StoreError> {
        each!(self, s => s.append(event))
    }
    async fn events(&self, filter: &EventFilter) -> Result<Vec<EventRow>, StoreError> {
        each!(self, s => s.events(filter))
    }
    async fn balances(&self) -> Result<Vec<(String, i64)>, StoreError> {
        each!(self, s => s.balances())
    }
    async fn charges(&self, uid: &str) -> Result<Vec<Charge>, StoreError> {
        each!(self, s => s.charges(uid))
    }
    async fn verify(&self) -> Result<VerifyReport, StoreError> {
        each!(self, s => s.verify())
    }
    async fn grant(
        &self,
        kind: GrantKind,
        namespace: &str,
        mesh: &str,
        amount: i64,
        memo: &str,
    ) -> Result<i64, StoreError> {
        each!(self, s => s.grant(kind, namespace, mesh, amount, memo))
    }
    async fn granted(&self, namespace: &str, mesh: &str) -> Result<i64, StoreError> {
        each!(self, s => s.granted(namespace, mesh))
    }
    async fn refund(&self, charge: i64, memo: &str) -> Result<i64, RefundError> {
        each!(self, s => s.refund(charge, memo))
    }
    async fn balance(&self, account: &str) -> Result<i64, StoreError> {
        each!(self, s => s.balance(account))
    }
    async fn ping(&self) -> Result<(), StoreError> {
        each!(self, s => s.ping())
    }
    async fn prune_events(&self, before: &str, archive: bool) -> Result<Vec<String>, StoreError> {
        each!(self, s => s.prune_events(before, archive))
    }
    async fn statement(
        &self,
        account: &str,
        from: &str,
        to: &str,
    ) -> Result<Vec<StatementLine>, StoreError> {
        each!(self, s => s.statement(account, from, to))
    }
}

#[cfg(test)]
mod patience_tests {
    use super::*;
    use std::time::Duration;

    /// A store that does not answer is asked again until it does; an error waiting cannot
    /// cure returns at once; past the patience the last error returns.
    #[tokio::test(start_paused = true)]
    async fn start_up_waits_out_a_store_that_does_not_answer() {
        let down = || StoreError::Unavailable("connection refused".into());
        let mut calls = 0;
        let got = patiently(
            "t",
            Duration::from_secs(60),
            StoreError::is_transient,
            async || {
                calls += 1;
                if calls < 4 { Err(down()) } else { Ok(calls) }
            },
        )
        .await
        .expect("answers at last");
        assert_eq!(got, 4);

        let mut calls = 0;
        let err = patiently(
            "t",
            Duration::from_secs(60),
            StoreError::is_transient,
            async || {
                calls += 1;
                Err::<(), _>(StoreError::UnsupportedUrl("mysql://x".into()))
            },
        )
        .await
        .expect_err("not curable");
        assert!(matches!(err, StoreError::UnsupportedUrl(_)));
        assert_eq!(calls, 1, "no waiting for what waiting cannot cure");

        let started = tokio::time::Instant::now();
        let mut calls = 0;
        let err = patiently(
            "t",
            Duration::from_secs(10),
            StoreError::is_transient,
            async || {
                calls += 1;
                Err::<(), _>(down())
            },
        )
        .await
        .expect_err("never answers");
        assert!(err.is_transient());
        let waited = started.elapsed();
        assert!(waited <= Duration::from_secs(10), "{waited:?}");
        assert!(calls >= 4, "asked again after 0.5, 1, 2, 4 s: {calls}");
    }
}
