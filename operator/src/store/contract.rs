//! The store contract, run against both backends: what every Store must do whatever the
//! database under it.

use std::sync::Arc;
use std::time::Duration;

use super::testing::{Backend, both};
use super::*;

async fn workload(store: &impl Store, uid: &str, shards: u32) {
    let w = WorkloadRecord {
        uid: uid.into(),
        namespace: "team-a".into(),
        name: format!("w-{uid}"),
        mesh: "m".into(),
        spec_json: "{}".into(),
        input_bytes: u64::from(shards) * 100,
        input_version: Some("etag-1".into()),
        input_files: Some(r#"{"format":"csv","files":[]}"#.into()),
    };
    let s: Vec<ShardRecord> = (0..shards)
        .map(|i| ShardRecord {
            index: i,
            start: u64::from(i) * 100,
            end: u64::from(i + 1) * 100,
        })
        .collect();
    store
        .create_workload(&w, &s)
        .await
        .expect("create workload");
}

/// `n` "operators" on one new database, each with its own pool.
async fn operators(backend: Backend, n: usize) -> Vec<Arc<AnyStore>> {
    let url = backend.fresh_url().await;
    let mut stores = Vec::with_capacity(n);
    for _ in 0..n {
        stores.push(Arc::new(open(&url).await.expect("open")));
    }
    stores
}

/// Runs the same SQL on either backend behind the store's back.
async fn raw(store: &AnyStore, sql: &str) -> Result<(), sqlx::Error> {
    super::testing::raw_sql(store, sql, sql).await
}

fn completion(uid: &str, shard: u32, attempt: u32, agent: &str) -> CompletionRecord {
    CompletionRecord {
        workload_uid: uid.into(),
        namespace: "team-a".into(),
        shard,
        attempt,
        agent: agent.into(),
        records: 10,
        output_uri: format!("file:///out/part-{shard:05}.jsonl"),
        sha256: "h".into(),
        price: 1_000 + i64::from(shard),
        device: "cpu".into(),
        compute_seconds: 0.5,
    }
}

async fn kinds(store: &impl Store, uid: &str) -> Vec<String> {
    let f = EventFilter {
        workload_uid: Some(uid.into()),
        ..Default::default()
    };
    store
        .events(&f)
        .await
        .expect("events")
        .into_iter()
        .map(|e| e.kind)
        .collect()
}

async fn only_the_holder_of_the_running_attempt_completes_and_is_charged_once(backend: Backend) {
    let store = backend.open().await;
    workload(&store, "u", 2).await;
    // Never assigned: refused, nothing charged.
    assert_eq!(
        store
            .complete(&completion("u", 1, 1, "a"))
            .await
            .expect("unassigned"),
        ChargeOutcome::Refused
    );
    store.assign("u", 0, 1, "a").await.expect("assign");
    // Another agent, or the holder with another attempt: refused.
    for (attempt, agent) in [(1, "b"), (2, "a"), (0, "a")] {
        assert_eq!(
            store
                .complete(&completion("u", 0, attempt, agent))
                .await
                .expect("forged"),
            ChargeOutcome::Refused,
            "attempt {attempt} from {agent}"
        );
    }
    assert_eq!(
        store
            .complete(&completion("u", 0, 1, "a"))
            .await
            .expect("first"),
        ChargeOutcome::Charged
    );
    assert_eq!(
        store
            .complete(&completion("u", 0, 1, "a"))
            .await
            .expect("again"),
        ChargeOutcome::AlreadyCharged,
        "the charged completion written again (its first answer lost): recorded, not again"
    );
    // After it succeeded, another attempt or agent is still refused.
    for (attempt, agent) in [(1, "b"), (2, "a")] {
        assert_eq!(
            store
                .complete(&completion("u", 0, attempt, agent))
                .await
                .expect("late"),
            ChargeOutcome::Refused,
            "attempt {attempt} from {agent} after success"
        );
    }
    let charges = store.charges("u").await.expect("charges");
    assert_eq!(charges.len(), 1);
    assert_eq!(
        (
            charges[0].from.as_str(),
            charges[0].to.as_str(),
            charges[0].amount
        ),
        ("namespace/team-a", "agent/a", 1000)
    );
    assert_eq!(
        kinds(&store, "u").await,
        [
            "workload.admitted",
            "shard.report_refused",
            "shard.assigned",
            "shard.report_refused",
            "shard.report_refused",
            "shard.report_refused",
            "shard.completed",
            // (the completion written again logs nothing)
            "shard.report_refused",
            "shard.report_refused"
        ]
    );
    // The stored shard still names the holder and attempt that were charged.
    let active = store.active_workloads().await.expect("active");
    let s0 = &active[0].shards[0];
    assert_eq!(
        (s0.state.as_str(), s0.agent.as_deref(), s0.attempt),
        ("succeeded", Some("a"), 1)
    );
    let balances = store.balances().await.expect("balances");
    assert_eq!(
        balances,
        vec![
            ("agent/a".to_string(), 1000),
            ("namespace/team-a".to_string(), -1000)
        ]
    );
    let report = store.verify().await.expect("verify");
    assert!(report.ok(), "{report:?}");
    assert_eq!((report.transactions, report.accounts), (1, 2));
}

async fn queue_transitions_are_logged_in_order(backend: Backend) {
    let store = backend.open().await;
    workload(&store, "u", 1).await;
    store.assign("u", 0, 1, "a").await.expect("assign");
    assert!(
        !store
            .requeue("u", 0, 2, Some("a"), "a stale attempt")
            .await
            .expect("requeue"),
        "requeue of another attempt changes nothing"
    );
    assert!(
        store
            .requeue("u", 0, 1, Some("a"), "lease expired")
            .await
            .expect("requeue")
    );
    assert!(
        !store
            .requeue("u", 0, 1, Some("a"), "twice")
            .await
            .expect("requeue"),
        "a second requeue of the same attempt changes nothing"
    );
    store.assign("u", 0, 2, "b").await.expect("assign");
    assert!(
        !store
            .fail_shard("u", 0, 1, Some("a"), "stale")
            .await
            .expect("fail"),
        "failing an old attempt changes nothing"
    );
    assert!(
        store
            .fail_shard("u", 0, 2, Some("b"), "bad line")
            .await
            .expect("fail")
    );
    store
        .finish_workload("u", "Failed", "InvalidInput: bad line")
        .await
        .expect("finish");
    assert_eq!(
        kinds(&store, "u").await,
        [
            "workload.admitted",
            "shard.assigned",
            "shard.requeued",
            "shard.assigned",
            "shard.failed",
            "workload.failed"
        ]
    );
    let all = store.events(&EventFilter::default()).await.expect("events");
    assert!(
        all.windows(2).all(|w| w[0].seq < w[1].seq),
        "strictly increasing seq"
    );
    let tail = store
        .events(&EventFilter {
            after_seq: Some(all[2].seq),
            ..Default::default()
        })
        .await
        .expect("tail");
    assert_eq!(tail.len(), all.len() - 3);
    let by_agent = store
        .events(&EventFilter {
            agent: Some("b".into()),
            ..Default::default()
        })
        .await
        .expect("agent");
    assert_eq!(by_agent.len(), 2);
    let since = EventFilter {
        since: Some(all[3].at.clone()),
        ..Default::default()
    };
    // Events of one instant are all at or after it, so count the way the filter should.
    let expected = all.iter().filter(|e| e.at >= all[3].at).count();
    assert!(expected >= all.len() - 3);
    assert_eq!(store.events(&since).await.expect("since").len(), expected);
    let future = EventFilter {
        since: Some("2999-01-01T00:00:00Z".into()),
        ..Default::default()
    };
    assert!(store.events(&future).await.expect("future").is_empty());
    assert!(store.verify().await.expect("verify").ok());
}

async fn racing_completions_from_several_operators_charge_each_shard_once(backend: Backend) {
    let stores = operators(backend, 3).await;
    let shards = 20u32;
    workload(&*stores[0], "race", shards).await;
    // Each shard runs attempt 1 on one agent; every racer reports every shard, as itself
    // and with several attempts: only the holder's report of attempt 1 may be charged.
    for shard in 0..shards {
        let agent = format!("agent-{}", shard % 5);
        assert!(
            stores[0]
                .assign("race", shard, 1, &agent)
                .await
                .expect("assign")
        );
    }
    let mut tasks = Vec::new();
    for t in 0..60u32 {
        let store = stores[(t % 3) as usize].clone();
        tasks.push(tokio::spawn(async move {
            let mut charged = 0;
            for shard in (0..shards).map(|s| (s + t) % shards) {
                let c = completion(
                    "race",
                    shard,
                    1 + t % 2,
                    &format!("agent-{}", (shard + t) % 5),
                );
                if store.complete(&c).await.expect("complete") == ChargeOutcome::Charged {
                    charged += 1;
                }
            }
            charged
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.expect("task");
    }
    assert_eq!(
        total, shards,
        "exactly one completion per shard was charged"
    );
    assert_eq!(
        stores[0].charges("race").await.expect("charges").len(),
        shards as usize
    );
    let report = stores[1].verify().await.expect("verify");
    assert!(report.ok(), "{report:?}");
    let sum: i64 = stores[2]
        .balances()
        .await
        .expect("balances")
        .iter()
        .map(|(_, b)| b)
        .sum();
    assert_eq!(sum, 0);
}

async fn the_event_log_refuses_update_and_delete(backend: Backend) {
    let store = backend.open().await;
    workload(&store, "u", 1).await;
    let update = raw(&store, "UPDATE events SET message = 'x'").await;
    let delete = raw(&store, "DELETE FROM events").await;
    for (what, result) in [("UPDATE", update), ("DELETE", delete)] {
        let err = result.expect_err("refused").to_string();
        assert!(
            err.contains("append-only") && err.contains(what),
            "{what}: {err}"
        );
    }
    assert_eq!(
        kinds(&store, "u").await,
        ["workload.admitted"],
        "the row is unchanged"
    );
}

async fn verify_names_rows_written_behind_the_ledgers_back(backend: Backend) {
    let store = backend.open().await;
    workload(&store, "u", 3).await;
    store.assign("u", 0, 1, "a").await.expect("assign");
    store
        .complete(&completion("u", 0, 1, "a"))
        .await
        .expect("complete");
    assert!(store.verify().await.expect("verify").ok());
    // An entry inserted directly (its transaction no longer balances, the account's balance
    // no longer matches), and a charge for a shard that never succeeded.
    let sql = [
        "INSERT INTO ledger_entries (tx_id, account, amount) VALUES (1, 'agent/a', 500)",
        "INSERT INTO ledger_transactions (kind, charge_key, workload_uid, shard_idx, memo, created_at) \
         VALUES ('charge', 'u#2', 'u', 2, 'forged', '2026-01-01T00:00:00Z')",
    ];
    match &store {
        AnyStore::Sqlite(_) => {
            for q in sql {
                raw(&store, q).await.expect("corrupt");
            }
        }
        AnyStore::Postgres(s) => {
            // The database itself refuses an unbalanced transaction; disabling its check is
            // what "behind its back" takes here.
            let mut tx = s.pool().begin().await.expect("tx");
            sqlx::query("ALTER TABLE ledger_entries DISABLE TRIGGER ledger_entries_balanced")
                .execute(&mut *tx)
                .await
                .expect("disable");
            for q in sql {
                sqlx::query(q).execute(&mut *tx).await.expect("corrupt");
            }
            sqlx::query("ALTER TABLE ledger_entries ENABLE TRIGGER ledger_entries_balanced")
                .execute(&mut *tx)
                .await
                .expect("enable");
            tx.commit().await.expect("commit");
        }
    }
    let report = store.verify().await.expect("verify");
    assert!(!report.ok());
    assert!(report.unbalanced_transactions.contains(&1), "{report:?}");
    assert!(
        report.unbalanced_transactions.contains(&2),
        "a transaction without entries: {report:?}"
    );
    assert_eq!(
        report.account_mismatches,
        vec![("agent/a".to_string(), 1000, 1500)]
    );
    assert_eq!(report.charges_without_success, vec![2]);
    assert!(report.shards_not_charged_once.is_empty());
}

/// Postgres checks balance at commit; SQLite has no deferred triggers, so there `verify` is
/// the check (see the test above).
#[tokio::test]
async fn postgres_refuses_an_unbalanced_transaction() {
    let AnyStore::Postgres(store) = Backend::Postgres.open().await else {
        panic!("Backend::Postgres opens Postgres")
    };
    let mut tx = store.pool().begin().await.expect("tx");
    sqlx::query("INSERT INTO ledger_transactions (id, kind, memo) VALUES (99, 'grant', 'half')")
        .execute(&mut *tx)
        .await
        .expect("tx row");
    sqlx::query(
        "INSERT INTO ledger_entries (tx_id, account, amount) VALUES (99, 'namespace/x', 5)",
    )
    .execute(&mut *tx)
    .await
    .expect("entry");
    let err = tx
        .commit()
        .await
        .expect_err("refused at commit")
        .to_string();
    assert!(err.contains("does not balance"), "{err}");
}

both!(only_the_holder_of_the_running_attempt_completes_and_is_charged_once);
both!(queue_transitions_are_logged_in_order);
both!(racing_completions_from_several_operators_charge_each_shard_once);
both!(the_event_log_refuses_update_and_delete);
both!(verify_names_rows_written_behind_the_ledgers_back);

async fn refunds_reverse_a_charge_once_and_statements_list_entries(backend: Backend) {
    let store = backend.open().await;
    workload(&store, "u", 2).await;
    store
        .grant(GrantKind::Manual, "team-a", "m", 50_000, "budget")
        .await
        .expect("grant");
    store.assign("u", 0, 1, "a").await.expect("assign");
    store
        .complete(&completion("u", 0, 1, "a"))
        .await
        .expect("charge");
    let charge = store
        .statement("agent/a", "2000-01-01T00:00:00Z", "2999-01-01T00:00:00Z")
        .await
        .expect("statement")[0]
        .tx_id;
    let refund = store.refund(charge, "bad output").await.expect("refund");
    assert!(
        matches!(store.refund(charge, "again").await, Err(RefundError::AlreadyRefunded(id)) if id == charge)
    );
    assert!(matches!(
        store.refund(refund, "a refund is no charge").await,
        Err(RefundError::NotACharge(_))
    ));
    assert_eq!(store.balance("agent/a").await.expect("balance"), 0);
    assert_eq!(
        store.balance("namespace/team-a").await.expect("balance"),
        50_000
    );
    let lines = store
        .statement(
            "namespace/team-a",
            "2000-01-01T00:00:00Z",
            "2999-01-01T00:00:00Z",
        )
        .await
        .expect("statement");
    let kinds: Vec<(&str, i64)> = lines.iter().map(|l| (l.kind.as_str(), l.amount)).collect();
    assert_eq!(
        kinds,
        [("grant", 50_000), ("charge", -1000), ("refund", 1000)]
    );
    assert_eq!(lines[1].shard, Some(0));
    let none = store
        .statement(
            "namespace/team-a",
            "2000-01-01T00:00:00Z",
            "2000-01-02T00:00:00Z",
        )
        .await
        .expect("empty range");
    assert!(none.is_empty());
    let report = store.verify().await.expect("verify");
    assert!(report.ok(), "{report:?}");
}

both!(refunds_reverse_a_charge_once_and_statements_list_entries);

async fn a_planned_round_claims_what_its_plan_asks_once(backend: Backend) {
    let store = backend.open().await;
    workload(&store, "u", 3).await;
    let claim = |shard: u32| Claim {
        uid: "u".into(),
        shard,
        attempt: 1,
        agent: "a".into(),
    };
    let (claims, won) = store
        .assign_planned(|| vec![claim(0), claim(2)])
        .await
        .expect("round");
    assert_eq!(claims, [claim(0), claim(2)], "the plan's claims, in order");
    assert_eq!(won, [true, true]);
    let (claims, won) = store
        .assign_planned(|| vec![claim(2), claim(1)])
        .await
        .expect("second round");
    assert_eq!(claims.len(), 2);
    assert_eq!(won, [false, true], "shard 2 is taken already");
    let (claims, won) = store.assign_planned(Vec::new).await.expect("empty round");
    assert!(
        claims.is_empty() && won.is_empty(),
        "nothing planned, nothing claimed"
    );
    let active = store.active_workloads().await.expect("active");
    let running: Vec<u32> = active[0]
        .shards
        .iter()
        .filter(|s| s.state == "running")
        .map(|s| s.index)
        .collect();
    assert_eq!(running, [0, 1, 2]);
}

both!(a_planned_round_claims_what_its_plan_asks_once);

async fn a_batch_charges_each_shard_at_most_once_and_only_its_holder(backend: Backend) {
    let store = backend.open().await;
    workload(&store, "u", 4).await;
    let claims: Vec<Claim> = [(0, "a"), (1, "a"), (2, "b")]
        .into_iter()
        .map(|(shard, agent)| Claim {
            uid: "u".into(),
            shard,
            attempt: 1,
            agent: agent.into(),
        })
        .collect();
    assert_eq!(
        store.assign_batch(&claims).await.expect("claims"),
        [true, true, true],
        "one round, one statement"
    );
    assert_eq!(
        store.assign_batch(&claims).await.expect("again"),
        [false, false, false],
        "claimed already"
    );
    store
        .complete(&completion("u", 0, 1, "a"))
        .await
        .expect("earlier");
    let batch = [
        completion("u", 0, 1, "a"), // this very completion, recorded before the batch
        completion("u", 1, 1, "a"),
        completion("u", 1, 1, "a"), // second in the batch
        completion("u", 2, 1, "b"),
        completion("u", 3, 1, "b"), // never assigned
    ];
    let outcomes = store.complete_batch(&batch).await.expect("batch");
    use ChargeOutcome::{AlreadyCharged, Charged, Refused};
    assert_eq!(
        outcomes,
        [AlreadyCharged, Charged, Refused, Charged, Refused]
    );
    let charges = store.charges("u").await.expect("charges");
    let shards: Vec<(u32, &str)> = charges.iter().map(|c| (c.shard, c.to.as_str())).collect();
    assert_eq!(shards, [(0, "agent/a"), (1, "agent/a"), (2, "agent/b")]);
    let events = store.events(&EventFilter::default()).await.expect("events");
    let tail: Vec<&str> = events
        .iter()
        .rev()
        .take(5)
        .rev()
        .map(|e| e.kind.as_str())
        .collect();
    assert_eq!(
        tail,
        [
            "shard.completed", // shard 0, before the batch (nothing logged again for it)
            "shard.completed",
            "shard.report_refused",
            "shard.completed",
            "shard.report_refused"
        ]
    );
    assert!(
        events.windows(2).all(|w| w[1].seq == w[0].seq + 1),
        "no gaps in the sequence"
    );
    assert!(store.verify().await.expect("verify").ok());
}

both!(a_batch_charges_each_shard_at_most_once_and_only_its_holder);

/// Batches larger than one statement takes (SQLite writes 500 rows a statement): every claim,
/// charge, entry and event is written once, and the balances move by the batch's net.
async fn a_batch_larger_than_a_statement_is_written_whole(backend: Backend) {
    let store = backend.open().await;
    let n = 1_234u32;
    workload(&store, "big", n).await;
    let claims: Vec<Claim> = (0..n)
        .map(|shard| Claim {
            uid: "big".into(),
            shard,
            attempt: 1,
            agent: format!("a{}", shard % 3),
        })
        .collect();
    let won = store.assign_batch(&claims).await.expect("claims");
    assert!(won.iter().all(|w| *w) && won.len() == n as usize);
    let batch: Vec<CompletionRecord> = claims
        .iter()
        .map(|c| completion("big", c.shard, 1, &c.agent))
        .collect();
    let outcomes = store.complete_batch(&batch).await.expect("batch");
    assert!(outcomes.iter().all(|o| *o == ChargeOutcome::Charged));
    assert_eq!(
        store.charges("big").await.expect("charges").len(),
        n as usize
    );
    let total: i64 = batch.iter().map(|c| c.price).sum();
    let balances: std::collections::HashMap<String, i64> = store
        .balances()
        .await
        .expect("balances")
        .into_iter()
        .collect();
    assert_eq!(balances.get(&namespace_account("team-a")), Some(&-total));
    let agents: i64 = (0..3)
        .map(|a| balances.get(&format!("agent/a{a}")).copied().unwrap_or(0))
        .sum();
    assert_eq!(agents, total);
    let kinds = kinds(&store, "big").await;
    for kind in ["shard.assigned", "shard.completed"] {
        assert_eq!(
            kinds.iter().filter(|k| *k == kind).count(),
            n as usize,
            "{kind}"
        );
    }
    assert!(store.verify().await.expect("verify").ok());
}

both!(a_batch_larger_than_a_statement_is_written_whole);

async fn claims_are_exclusive_across_operators(backend: Backend) {
    let stores = operators(backend, 3).await;
    let shards = 30u32;
    workload(&*stores[0], "claim", shards).await;
    let mut tasks = Vec::new();
    for op in 0..6u32 {
        let store = stores[(op % 3) as usize].clone();
        tasks.push(tokio::spawn(async move {
            let mut won = Vec::new();
            for shard in 0..shards {
                if store
                    .assign("claim", shard, 1, &format!("agent-of-op-{op}"))
                    .await
                    .expect("assign")
                {
                    won.push(shard);
                }
            }
            won
        }));
    }
    let mut winners = vec![0u32; shards as usize];
    for t in tasks {
        for shard in t.await.expect("task") {
            winners[shard as usize] += 1;
        }
    }
    assert!(
        winners.iter().all(|&w| w == 1),
        "each shard claimed exactly once: {winners:?}"
    );
    // A stale attempt cannot claim again; after a requeue the next attempt can, once.
    assert!(
        !stores[0]
            .assign("claim", 0, 1, "late")
            .await
            .expect("stale")
    );
    stores[1]
        .requeue("claim", 0, 1, None, "lease expired")
        .await
        .expect("requeue");
    assert!(
        !stores[2]
            .assign("claim", 0, 1, "stale attempt")
            .await
            .expect("old attempt")
    );
    assert!(
        stores[2]
            .assign("claim", 0, 2, "b")
            .await
            .expect("next attempt")
    );
    assert!(!stores[0].assign("claim", 0, 2, "c").await.expect("taken"));
    let assigned = stores[0]
        .events(&EventFilter {
            kind: Some("shard.assigned".into()),
            ..Default::default()
        })
        .await
        .expect("events");
    assert_eq!(
        assigned.len(),
        shards as usize + 1,
        "one event per claim won"
    );
}

async fn running_workloads_are_listed_for_resuming(backend: Backend) {
    let store = backend.open().await;
    workload(&store, "live", 3).await;
    workload(&store, "done", 1).await;
    store
        .finish_workload("done", "Succeeded", "ok")
        .await
        .expect("finish");
    assert!(store.assign("live", 1, 1, "a").await.expect("assign"));
    assert!(store.assign("live", 0, 1, "a").await.expect("assign"));
    store
        .complete(&completion("live", 0, 1, "a"))
        .await
        .expect("complete");
    let active = store.active_workloads().await.expect("active");
    assert_eq!(active.len(), 1);
    let states: Vec<(&str, u32)> = active[0]
        .shards
        .iter()
        .map(|s| (s.state.as_str(), s.attempt))
        .collect();
    assert_eq!(states, [("succeeded", 1), ("running", 1), ("pending", 0)]);
    assert_eq!(active[0].shards[0].records, 10);
    assert_eq!(active[0].record.input_bytes, 300);
    assert_eq!(
        active[0].record.input_version.as_deref(),
        Some("etag-1"),
        "the input's version is kept for the reads of a resumed run"
    );
}

both!(claims_are_exclusive_across_operators);
both!(running_workloads_are_listed_for_resuming);

/// Retention drops or archives whole monthly partitions and never touches a row.
#[tokio::test]
async fn event_retention_removes_whole_partitions_only() {
    let AnyStore::Postgres(store) = Backend::Postgres.open().await else {
        panic!("postgres")
    };
    let jan = chrono::NaiveDate::from_ymd_opt(2026, 1, 1).expect("date");
    store
        .ensure_event_partitions(jan, 3)
        .await
        .expect("partitions");
    for (seq, at) in [
        (1001, "2026-01-15T00:00:00Z"),
        (1002, "2026-02-10T00:00:00Z"),
        (1003, "2026-03-05T00:00:00Z"),
    ] {
        sqlx::query("INSERT INTO events (seq, at, kind, message) VALUES ($1, $2::timestamptz, 'test.old', '')")
            .bind(seq as i64)
            .bind(at)
            .execute(store.pool())
            .await
            .expect("old event");
    }
    let seqs = || async {
        sqlx::query_scalar::<_, i64>("SELECT seq FROM events WHERE kind = 'test.old' ORDER BY seq")
            .fetch_all(store.pool())
            .await
            .expect("seqs")
    };
    assert_eq!(
        store
            .prune_events("2026-02-01", false)
            .await
            .expect("prune"),
        ["events_2026_01"]
    );
    assert_eq!(seqs().await, [1002, 1003]);
    // Archiving detaches the partition and keeps it as a table of its own.
    assert_eq!(
        store
            .prune_events("2026-03-01", true)
            .await
            .expect("archive"),
        ["events_2026_02"]
    );
    assert_eq!(seqs().await, [1003]);
    let archived: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM events_2026_02")
        .fetch_one(store.pool())
        .await
        .expect("archive");
    assert_eq!(archived, 1);
    // A cut-off inside a month removes nothing of it.
    assert!(
        store
            .prune_events("2026-03-20", false)
            .await
            .expect("prune")
            .is_empty()
    );
    let err = sqlx::query("DELETE FROM events WHERE seq = 1003")
        .execute(store.pool())
        .await
        .expect_err("refused");
    assert!(err.to_string().contains("append-only"), "{err}");
}

#[tokio::test]
async fn sqlite_says_retention_needs_postgres() {
    let store = Backend::Sqlite.open().await;
    let err = store
        .prune_events("2026-01-01", false)
        .await
        .expect_err("unsupported");
    assert!(err.to_string().contains("Postgres"), "{err}");
}

async fn budget_reconciliation_counts_only_budget_grants(backend: Backend) {
    let store = backend.open().await;
    store
        .grant(
            GrantKind::Budget,
            "team-a",
            "m",
            10_000,
            "budget of namespace team-a on mesh m",
        )
        .await
        .expect("budget");
    store
        .grant(GrantKind::Manual, "team-a", "m", 3_000, "by hand")
        .await
        .expect("manual");
    assert_eq!(store.granted("team-a", "m").await.expect("granted"), 10_000);
    assert_eq!(
        store.balance("namespace/team-a").await.expect("balance"),
        13_000
    );
    let kinds: Vec<String> = store
        .statement(
            "namespace/team-a",
            "2000-01-01T00:00:00Z",
            "2999-01-01T00:00:00Z",
        )
        .await
        .expect("statement")
        .into_iter()
        .map(|l| l.kind)
        .collect();
    assert_eq!(kinds, ["budget", "grant"]);
    workload(&store, "w1", 1).await;
    assert_eq!(
        store.meshes().await.expect("meshes"),
        ["m"],
        "from the account and the workload"
    );
    assert!(store.verify().await.expect("verify").ok());
}

both!(budget_reconciliation_counts_only_budget_grants);

/// The shards of `uid` as the store holds them: (state, attempt, attempt base, agent).
async fn shard_rows(store: &impl Store, uid: &str) -> Vec<(String, u32, u32, Option<String>)> {
    let mut all = store.workloads_in_phase("Running").await.expect("running");
    all.extend(store.workloads_in_phase("Failed").await.expect("failed"));
    all.extend(store.workloads_in_phase("Succeeded").await.expect("done"));
    let w = all
        .into_iter()
        .find(|w| w.record.uid == uid)
        .expect("stored");
    w.shards
        .into_iter()
        .map(|s| (s.state, s.attempt, s.attempt_base, s.agent))
        .collect()
}

fn row(
    state: &str,
    attempt: u32,
    base: u32,
    agent: Option<&str>,
) -> (String, u32, u32, Option<String>) {
    (state.into(), attempt, base, agent.map(str::to_string))
}

/// Retrying a failed workload: back to running, every shard that had not succeeded pending
/// again with a fresh series of attempts numbered above its earlier ones, the succeeded shard
/// kept with its one charge, and a `workload.retried` event, in one transaction. A workload
/// that is running, succeeded or unknown is refused and nothing changes.
async fn a_failed_workload_is_reopened_keeping_its_succeeded_shards(backend: Backend) {
    let store = backend.open().await;
    workload(&store, "u", 4).await;
    workload(&store, "other", 1).await;
    // Shard 0 succeeded (charged); shard 1 failed for good at its second attempt; shard 2
    // was running when the workload failed; shard 3 never ran.
    assert!(store.assign("u", 0, 1, "a").await.expect("assign"));
    assert_eq!(
        store
            .complete(&completion("u", 0, 1, "a"))
            .await
            .expect("complete"),
        ChargeOutcome::Charged
    );
    assert!(store.assign("u", 1, 1, "a").await.expect("assign"));
    assert!(
        store
            .requeue("u", 1, 1, Some("a"), "lost")
            .await
            .expect("requeue")
    );
    assert!(store.assign("u", 1, 2, "b").await.expect("assign"));
    assert!(
        store
            .fail_shard("u", 1, 2, Some("b"), "bad line")
            .await
            .expect("fail")
    );
    assert!(store.assign("u", 2, 1, "a").await.expect("assign"));
    store
        .finish_workload("u", "Failed", "InvalidInput: bad line")
        .await
        .expect("finish");
    assert!(store.assign("other", 0, 1, "a").await.expect("assign"));
    let failed_rows = shard_rows(&store, "u").await;
    let other_rows = shard_rows(&store, "other").await;
    let events_before = store
        .events(&EventFilter::default())
        .await
        .expect("events")
        .len();

    // Refused: a running workload, an unknown uid. Nothing changes.
    match store.reopen_failed("other").await.expect("reopen") {
        ReopenOutcome::NotFailed { phase } => assert_eq!(phase, "Running"),
        other => panic!("a running workload is not reopened: {other:?}"),
    }
    assert!(matches!(
        store.reopen_failed("nope").await.expect("reopen"),
        ReopenOutcome::Unknown
    ));
    assert_eq!(shard_rows(&store, "other").await, other_rows);
    assert_eq!(shard_rows(&store, "u").await, failed_rows);
    assert_eq!(
        store.workload_phase("u").await.expect("phase").as_deref(),
        Some("Failed")
    );
    assert_eq!(
        store
            .events(&EventFilter::default())
            .await
            .expect("events")
            .len(),
        events_before,
        "a refusal logs nothing"
    );

    let ReopenOutcome::Reopened {
        workload: reopened,
        requeued,
        failed,
        kept,
    } = store.reopen_failed("u").await.expect("reopen")
    else {
        panic!("a failed workload is reopened");
    };
    assert_eq!((requeued, failed, kept), (3, 1, 1));
    assert_eq!(reopened.record.uid, "u");
    assert_eq!(reopened.record.input_version.as_deref(), Some("etag-1"));
    assert_eq!(
        reopened.record.input_files.as_deref(),
        Some(r#"{"format":"csv","files":[]}"#),
        "a dataset's files come back as planned"
    );
    let expected = [
        row("succeeded", 1, 0, Some("a")),
        row("pending", 2, 2, None),
        row("pending", 1, 1, None),
        row("pending", 0, 0, None),
    ];
    let got: Vec<_> = reopened
        .shards
        .iter()
        .map(|s| (s.state.clone(), s.attempt, s.attempt_base, s.agent.clone()))
        .collect();
    assert_eq!(got, expected, "what the retry returns is what it stored");
    assert_eq!(shard_rows(&store, "u").await, expected);
    assert_eq!(
        reopened.shards[0].output_uri.as_deref(),
        Some("file:///out/part-00000.jsonl"),
        "the succeeded shard keeps its part"
    );
    assert_eq!(
        store.workload_phase("u").await.expect("phase").as_deref(),
        Some("Running")
    );
    let active = store.active_workloads().await.expect("active");
    assert!(active.iter().any(|w| w.record.uid == "u"), "resumable");
    let retried = store
        .events(&EventFilter {
            kind: Some("workload.retried".into()),
            ..Default::default()
        })
        .await
        .expect("events");
    assert_eq!(retried.len(), 1);
    assert_eq!(retried[0].workload_uid.as_deref(), Some("u"));
    assert!(
        retried[0].message.contains("3 shards requeued")
            && retried[0].message.contains("1 had failed")
            && retried[0].message.contains("1 succeeded shards kept"),
        "{}",
        retried[0].message
    );
    // Once reopened it is running: a second retry is refused.
    assert!(matches!(
        store.reopen_failed("u").await.expect("again"),
        ReopenOutcome::NotFailed { ref phase } if phase == "Running"
    ));

    // Attempt numbers are never reused: the old attempts can neither be claimed nor
    // completed; the next ones can.
    assert!(!store.assign("u", 1, 2, "c").await.expect("old attempt"));
    assert!(!store.assign("u", 2, 1, "c").await.expect("old attempt"));
    assert_eq!(
        store
            .complete(&completion("u", 2, 1, "a"))
            .await
            .expect("late report of the cut-short attempt"),
        ChargeOutcome::Refused
    );
    assert!(store.assign("u", 1, 3, "c").await.expect("next attempt"));
    assert!(store.assign("u", 2, 2, "c").await.expect("next attempt"));
    assert!(store.assign("u", 3, 1, "c").await.expect("first attempt"));
    for (shard, attempt) in [(1, 3), (2, 2), (3, 1)] {
        assert_eq!(
            store
                .complete(&completion("u", shard, attempt, "c"))
                .await
                .expect("complete"),
            ChargeOutcome::Charged
        );
    }
    // The kept shard is not charged again, whatever is reported for it.
    assert_eq!(
        store
            .complete(&completion("u", 0, 1, "a"))
            .await
            .expect("again"),
        ChargeOutcome::AlreadyCharged
    );
    assert_eq!(
        store
            .complete(&completion("u", 0, 2, "c"))
            .await
            .expect("another attempt"),
        ChargeOutcome::Refused
    );
    let charges = store.charges("u").await.expect("charges");
    let to: Vec<(u32, &str)> = charges.iter().map(|c| (c.shard, c.to.as_str())).collect();
    assert_eq!(
        to,
        [
            (0, "agent/a"),
            (1, "agent/c"),
            (2, "agent/c"),
            (3, "agent/c")
        ],
        "each shard charged once, to the agent whose attempt succeeded"
    );
    let report = store.verify().await.expect("verify");
    assert!(report.ok(), "{report:?}");
    store
        .finish_workload("u", "Succeeded", "done")
        .await
        .expect("finish");
    assert!(matches!(
        store.reopen_failed("u").await.expect("succeeded"),
        ReopenOutcome::NotFailed { ref phase } if phase == "Succeeded"
    ));
    assert_eq!(
        kinds(&store, "u").await.last().map(String::as_str),
        Some("workload.succeeded"),
        "the refusal logged nothing"
    );
    assert!(store.verify().await.expect("verify").ok());
}

/// Of two retries of one failed workload at once (two operators), exactly one reopens it; a
/// shard retried a second time starts a new series above the first retry's attempts.
async fn concurrent_retries_reopen_once_and_attempts_keep_growing(backend: Backend) {
    let stores = operators(backend, 2).await;
    workload(&*stores[0], "u", 1).await;
    assert!(stores[0].assign("u", 0, 1, "a").await.expect("assign"));
    assert!(
        stores[0]
            .fail_shard("u", 0, 1, Some("a"), "boom")
            .await
            .expect("fail")
    );
    stores[0]
        .finish_workload("u", "Failed", "InferenceFailed: boom")
        .await
        .expect("finish");
    let (x, y) = tokio::join!(stores[0].reopen_failed("u"), stores[1].reopen_failed("u"));
    let outcomes = [x.expect("x"), y.expect("y")];
    let reopened = outcomes
        .iter()
        .filter(|o| matches!(o, ReopenOutcome::Reopened { .. }))
        .count();
    assert_eq!(reopened, 1, "{outcomes:?}");
    assert!(
        outcomes
            .iter()
            .any(|o| matches!(o, ReopenOutcome::NotFailed { phase } if phase == "Running")),
        "{outcomes:?}"
    );
    assert_eq!(
        shard_rows(&*stores[0], "u").await,
        [row("pending", 1, 1, None)]
    );
    // It fails again at attempt 3 of the second series...
    assert!(stores[1].assign("u", 0, 2, "b").await.expect("assign"));
    assert!(
        stores[1]
            .requeue("u", 0, 2, Some("b"), "lost")
            .await
            .expect("requeue")
    );
    assert!(stores[1].assign("u", 0, 3, "b").await.expect("assign"));
    assert!(
        stores[1]
            .fail_shard("u", 0, 3, Some("b"), "boom again")
            .await
            .expect("fail")
    );
    stores[1]
        .finish_workload("u", "Failed", "InferenceFailed: boom again")
        .await
        .expect("finish");
    // ...and a second retry starts a third series above it.
    assert!(matches!(
        stores[0].reopen_failed("u").await.expect("reopen"),
        ReopenOutcome::Reopened {
            requeued: 1,
            failed: 1,
            kept: 0,
            ..
        }
    ));
    assert_eq!(
        shard_rows(&*stores[0], "u").await,
        [row("pending", 3, 3, None)]
    );
    assert!(
        !stores[0]
            .assign("u", 0, 3, "c")
            .await
            .expect("used attempt")
    );
    assert!(
        stores[0]
            .assign("u", 0, 4, "c")
            .await
            .expect("next attempt")
    );
    assert_eq!(
        stores[0]
            .complete(&completion("u", 0, 4, "c"))
            .await
            .expect("complete"),
        ChargeOutcome::Charged
    );
    assert_eq!(
        kinds(&*stores[1], "u")
            .await
            .iter()
            .filter(|k| *k == "workload.retried")
            .count(),
        2
    );
    let report = stores[1].verify().await.expect("verify");
    assert!(report.ok(), "{report:?}");
}

both!(a_failed_workload_is_reopened_keeping_its_succeeded_shards);
both!(concurrent_retries_reopen_once_and_attempts_keep_growing);

/// `spec.activeDeadlineSeconds` counts what [`Store::running_for`] says: the time since the
/// workload's admission, read back by any operator (a restart, a take-over), and since its last
/// retry once retried. A workload that failed (its deadline passed) takes no completion: the
/// holder's attempt is refused and nothing is charged, even when the report was accepted before
/// the failure was written.
async fn a_workload_runs_from_its_admission_or_last_retry_and_takes_no_completion_once_failed(
    backend: Backend,
) {
    let store = backend.open().await;
    workload(&store, "u", 2).await;
    let fresh = store.running_for("u").await.expect("read").expect("stored");
    assert!(fresh < Duration::from_secs(60), "{fresh:?}");
    assert_eq!(store.running_for("nope").await.expect("read"), None);
    // Admitted 1000 s ago, as an operator that restarts finds it.
    super::testing::raw_sql(
        &store,
        "UPDATE workloads SET created_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now', '-1000 seconds') WHERE uid = 'u'",
        "UPDATE workloads SET created_at = now() - interval '1000 seconds' WHERE uid = 'u'",
    )
    .await
    .expect("backdate");
    let old = store.running_for("u").await.expect("read").expect("stored");
    assert!(
        (Duration::from_secs(990)..Duration::from_secs(1100)).contains(&old),
        "{old:?}"
    );

    assert!(store.assign("u", 0, 1, "a").await.expect("assign"));
    store
        .finish_workload("u", "Failed", "DeadlineExceeded: 1s passed")
        .await
        .expect("finish");
    assert_eq!(
        store
            .complete(&completion("u", 0, 1, "a"))
            .await
            .expect("complete"),
        ChargeOutcome::Refused,
        "the holder's completion of a failed workload is refused"
    );
    assert!(store.charges("u").await.expect("charges").is_empty());
    let report = store.verify().await.expect("verify");
    assert!(report.ok(), "{report:?}");

    assert!(matches!(
        store.reopen_failed("u").await.expect("reopen"),
        ReopenOutcome::Reopened { .. }
    ));
    let retried = store.running_for("u").await.expect("read").expect("stored");
    assert!(
        retried < Duration::from_secs(60),
        "a retry starts the count again: {retried:?}"
    );
}

both!(a_workload_runs_from_its_admission_or_last_retry_and_takes_no_completion_once_failed);
