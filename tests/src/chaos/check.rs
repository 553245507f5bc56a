//! The invariants checked after every run, and the recovery times read off the event log.
//!
//! - The workload reached a terminal phase within the bound.
//! - Succeeded: every input record is in the outputs exactly once; `infermesh ledger verify
//!   --outputs` is clean (every part matches `_SUCCESS.json` by sha256 and record count, no
//!   stray part or attempt file).
//! - Failed: only a fault that may fail a workload (disk, input) was played, and the reason
//!   names it.
//! - The ledger verifies: every transaction balances, one charge per succeeded shard, no
//!   charge without one.
//! - Each shard completed at most once, and no shard was assigned again after it completed
//!   (nothing run again after a restart); every committed part on disk is a completion in
//!   the store (an acknowledged completion survives a Postgres crash).
//! - Charges per agent equal the completions the store credits to that agent.
//! - The event log's sequence numbers are 1..n with no gap.
//! - No process panicked (logs scanned).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::process::Command;
use std::time::SystemTime;

use super::Fault;

/// When each fault started and healed.
#[derive(Clone, Debug, Default)]
pub struct Timeline {
    entries: Vec<Mark>,
}

#[derive(Clone, Debug)]
struct Mark {
    kind: &'static str,
    start: SystemTime,
    heal: Option<SystemTime>,
    agent: Option<usize>,
}

impl Timeline {
    /// Records a fault (or a return, `agent-back`).
    pub fn push(
        &mut self,
        kind: &'static str,
        start: SystemTime,
        heal: Option<SystemTime>,
        agent: Option<usize>,
    ) {
        self.entries.push(Mark {
            kind,
            start,
            heal,
            agent,
        });
    }
}

/// What the checks read.
pub struct Facts<'a> {
    /// A command for the `infermesh` binary, where it reaches the store and the outputs (in
    /// the operator's namespace, with the object store's `AWS_*`, when the run has one).
    pub infermesh: Box<dyn Fn() -> Command + 'a>,
    /// The store, as that command reaches it.
    pub url: String,
    /// The run's folder (logs).
    pub dir: PathBuf,
    /// The output folder (for a run on S3: the harness's copy of it).
    pub out: PathBuf,
    /// Records in the input as planned.
    pub records: usize,
    /// Agents.
    pub agents: usize,
    /// The faults scheduled.
    pub faults: Vec<Fault>,
    /// The last operator's exit code.
    pub exit: Option<i32>,
    /// The run passed its bound.
    pub timed_out: bool,
}

/// What the checks found.
pub struct Verdict {
    /// `Succeeded`, `Failed: …` or `no terminal phase`.
    pub outcome: String,
    /// Invariants that did not hold.
    pub violations: Vec<String>,
    /// Recovery times (kind, seconds).
    pub recoveries: Vec<(String, f64)>,
}

#[derive(Debug, serde::Deserialize)]
struct Event {
    seq: i64,
    at: String,
    kind: String,
    workload_uid: Option<String>,
    shard: Option<i64>,
    agent: Option<String>,
    #[serde(default)]
    message: String,
}

fn ledger(f: &Facts<'_>, args: &[&str]) -> Result<(Option<i32>, String), String> {
    let out = (f.infermesh)()
        .args(["ledger", "--database-url", &f.url])
        .args(args)
        .output()
        .map_err(|e| format!("infermesh ledger: {e}"))?;
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        text.push_str(&String::from_utf8_lossy(&out.stderr));
    }
    Ok((out.status.code(), text))
}

/// When an event was logged (the stores write RFC 3339).
fn at(e: &Event) -> Option<SystemTime> {
    chrono::DateTime::parse_from_rfc3339(&e.at)
        .ok()
        .map(SystemTime::from)
}

fn since(later: SystemTime, earlier: SystemTime) -> f64 {
    later
        .duration_since(earlier)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// The shards a stalled run left unfinished, by their last event in the log (up to eight),
/// so that a run that failed in CI says where it stopped without its folder.
fn unfinished(events: &[Event]) -> String {
    let start = events.first().and_then(at);
    let mut last: std::collections::BTreeMap<i64, &Event> = std::collections::BTreeMap::new();
    for e in events {
        if let Some(s) = e.shard
            && e.kind.starts_with("shard.")
        {
            last.insert(s, e);
        }
    }
    let open: Vec<String> = last
        .iter()
        .filter(|(_, e)| e.kind != "shard.completed")
        .map(|(s, e)| {
            let when = match (at(e), start) {
                (Some(t), Some(s)) => format!(" at +{:.1}s", since(t, s)),
                _ => String::new(),
            };
            format!(
                "shard {s}: {}{when} ({}{})",
                e.kind,
                e.agent.as_deref().unwrap_or("no agent"),
                if e.message.is_empty() {
                    String::new()
                } else {
                    format!("; {}", e.message)
                }
            )
        })
        .collect();
    if open.is_empty() {
        return format!("every one of the {} logged shards completed", last.len());
    }
    let shown = open.iter().take(8).cloned().collect::<Vec<_>>().join(", ");
    format!(
        "{} of {} logged shards unfinished: {shown}",
        open.len(),
        last.len()
    )
}

/// Checks every invariant of a finished run.
pub fn check(f: &Facts<'_>, timeline: &Timeline) -> Verdict {
    let mut v = Vec::new();
    let events: Vec<Event> = match ledger(f, &["events", "-o", "json"]) {
        Ok((Some(0), text)) => {
            // Kept with the run's logs: a failing run's store goes with the harness's Postgres.
            let _ = std::fs::write(f.dir.join("events.json"), &text);
            serde_json::from_str(&text).unwrap_or_else(|e| {
                v.push(format!("events are not JSON: {e}"));
                Vec::new()
            })
        }
        Ok((code, text)) => {
            v.push(format!("ledger events exited {code:?}: {text}"));
            Vec::new()
        }
        Err(e) => {
            v.push(e);
            Vec::new()
        }
    };

    // Terminal phase.
    let end = events
        .iter()
        .rev()
        .find(|e| e.kind == "workload.succeeded" || e.kind == "workload.failed");
    let outcome = match (end, f.timed_out) {
        (_, true) | (None, _) => {
            v.push(format!(
                "no terminal phase within the bound (operator exit {:?}); {}",
                f.exit,
                unfinished(&events)
            ));
            "no terminal phase".to_string()
        }
        (Some(e), false) if e.kind == "workload.succeeded" => {
            if f.exit != Some(0) {
                v.push(format!("succeeded, but the operator exited {:?}", f.exit));
            }
            "Succeeded".to_string()
        }
        (Some(e), false) => {
            let allowed: Vec<&Fault> = f.faults.iter().filter(|x| x.may_fail_workload()).collect();
            if allowed.is_empty() {
                v.push(format!(
                    "the workload failed under faults that must not fail it: {}",
                    e.message
                ));
            } else if !allowed
                .iter()
                .any(|x| x.failure_words().iter().any(|w| e.message.contains(w)))
            {
                v.push(format!(
                    "the failure does not name the fault ({}): {}",
                    allowed
                        .iter()
                        .map(|x| x.kind())
                        .collect::<Vec<_>>()
                        .join(", "),
                    e.message
                ));
            }
            if f.exit != Some(1) {
                v.push(format!("failed, but the operator exited {:?}", f.exit));
            }
            format!("Failed: {}", e.message)
        }
    };

    // The event log has no gap.
    let seqs: Vec<i64> = events.iter().map(|e| e.seq).collect();
    if let Some((i, s)) = seqs.iter().enumerate().find(|(i, s)| **s != *i as i64 + 1) {
        v.push(format!("event log: position {} holds seq {s}", i + 1));
    }

    // Shards: completed at most once, never assigned after completing.
    let mut completed: HashMap<(String, i64), &Event> = HashMap::new();
    let mut per_agent: BTreeMap<String, usize> = BTreeMap::new();
    for e in &events {
        let (Some(uid), Some(shard)) = (&e.workload_uid, e.shard) else {
            continue;
        };
        let key = (uid.clone(), shard);
        match e.kind.as_str() {
            "shard.completed" => {
                if completed.insert(key, e).is_some() {
                    v.push(format!("shard {shard} completed twice (seq {})", e.seq));
                }
                *per_agent
                    .entry(e.agent.clone().unwrap_or_default())
                    .or_default() += 1;
            }
            "shard.assigned" if completed.contains_key(&key) => {
                v.push(format!(
                    "shard {shard} assigned again after it completed (seq {})",
                    e.seq
                ));
            }
            _ => {}
        }
    }

    // Every committed part on disk is a completion in the store.
    let done: HashSet<i64> = completed.keys().map(|(_, s)| *s).collect();
    if let Ok(dir) = std::fs::read_dir(&f.out) {
        for e in dir.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(n) = name
                .strip_prefix("part-")
                .and_then(|r| r.strip_suffix(".jsonl"))
                .and_then(|n| n.parse::<i64>().ok())
                && !done.contains(&n)
            {
                v.push(format!("{name} is committed on disk but not in the store"));
            }
        }
    }

    // The ledger, and the outputs of a succeeded workload.
    match ledger(f, &["verify", "--outputs"]) {
        Ok((Some(0), _)) => {}
        Ok((code, text)) => v.push(format!("ledger verify exited {code:?}:\n{text}")),
        Err(e) => v.push(e),
    }
    if outcome == "Succeeded" {
        check_outputs(f, &mut v);
    }

    // Charges per agent equal its completions.
    for i in 0..f.agents {
        let id = format!("chaos-external-{i}");
        let charges = match ledger(f, &["statement", &format!("agent/{id}"), "-o", "json"]) {
            Ok((Some(0), text)) => serde_json::from_str::<serde_json::Value>(&text)
                .ok()
                .and_then(|j| {
                    j.get("entries")
                        .or(Some(&j))
                        .and_then(|e| e.as_array())
                        .map(|a| a.len())
                }),
            // An agent that was never charged has no account.
            Ok((Some(2), text)) if text.contains("no such account") => Some(0),
            _ => None,
        };
        let want = per_agent.get(&id).copied().unwrap_or(0);
        match charges {
            Some(n) if n == want => {}
            Some(n) => v.push(format!(
                "agent {id}: {n} ledger entries for {want} completions"
            )),
            None => v.push(format!("agent {id}: no statement")),
        }
    }

    // No panics.
    if let Ok(dir) = std::fs::read_dir(&f.dir) {
        for e in dir.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.ends_with(".log") {
                let text = std::fs::read_to_string(e.path()).unwrap_or_default();
                if let Some(line) = text.lines().find(|l| l.contains("panicked")) {
                    v.push(format!("{name}: {line}"));
                }
            }
        }
    }

    let recoveries = recoveries(&events, timeline);
    Verdict {
        outcome,
        violations: v,
        recoveries,
    }
}

fn check_outputs(f: &Facts<'_>, v: &mut Vec<String>) {
    let mut counts: HashMap<i64, usize> = HashMap::new();
    let Ok(dir) = std::fs::read_dir(&f.out) else {
        v.push(format!("no output folder {}", f.out.display()));
        return;
    };
    let mut parts: Vec<PathBuf> = dir
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("part-"))
        })
        .collect();
    parts.sort();
    // Each output is the model's on the input as planned: the input's record i is
    // x = [i/100, 1, -(i mod 7), 0.5], so s = sum(x); a record read from a replaced input
    // (whose second value is 2) is off by one.
    let mut wrong = 0usize;
    for p in &parts {
        let text = std::fs::read_to_string(p).unwrap_or_default();
        for line in text.lines() {
            let j = serde_json::from_str::<serde_json::Value>(line).ok();
            let (id, s) = match j.as_ref() {
                Some(j) => (j["id"].as_i64(), j["s"].as_f64()),
                None => (None, None),
            };
            match id {
                Some(id) => {
                    *counts.entry(id).or_default() += 1;
                    let want = id as f64 / 100.0 + 1.0 - (id % 7) as f64 + 0.5;
                    if s.is_none_or(|s| (s - want).abs() > 1e-3 * (1.0 + want.abs())) {
                        wrong += 1;
                    }
                }
                None => v.push(format!("{}: a line without an id", p.display())),
            }
        }
    }
    if wrong > 0 {
        v.push(format!(
            "outputs: {wrong} records do not match the input as planned (read from another object)"
        ));
    }
    let missing = (0..f.records as i64)
        .filter(|i| !counts.contains_key(i))
        .count();
    let twice = counts.values().filter(|c| **c > 1).count();
    let foreign = counts.keys().filter(|i| **i >= f.records as i64).count();
    if missing + twice + foreign > 0 {
        v.push(format!(
            "outputs: {missing} records missing, {twice} more than once, {foreign} not in the input"
        ));
    }
}

/// Recovery times from the event log:
/// - `agent-lost`: from the moment an agent was killed, frozen or cut off to the first
///   requeue of one of its shards (the lease ran out) — target lease + 2 s;
/// - `agent-back`: from a freeze's or partition's end (or a restart) to the agent's next
///   `agent.joined`;
/// - `<fault>`: from the end of a network, Postgres, operator or disk fault to the next
///   completed shard.
fn recoveries(events: &[Event], timeline: &Timeline) -> Vec<(String, f64)> {
    let timed: Vec<(SystemTime, &Event)> =
        events.iter().filter_map(|e| Some((at(e)?, e))).collect();
    let mut out = Vec::new();
    for m in &timeline.entries {
        let agent_id = m.agent.map(|i| format!("chaos-external-{i}"));
        let first = |after: SystemTime, pred: &dyn Fn(&Event) -> bool| {
            timed
                .iter()
                .find(|(t, e)| *t >= after && pred(e))
                .map(|(t, _)| since(*t, after))
        };
        match m.kind {
            "agent-kill" | "agent-freeze" | "partition" => {
                if let Some(s) = first(m.start, &|e| {
                    e.kind == "shard.requeued" && e.agent == agent_id
                }) {
                    out.push(("agent-lost".to_string(), s));
                }
                if let Some(heal) = m.heal
                    && let Some(s) =
                        first(heal, &|e| e.kind == "agent.joined" && e.agent == agent_id)
                {
                    out.push(("agent-back".to_string(), s));
                }
            }
            "agent-back" => {
                if let Some(s) = first(m.start, &|e| {
                    e.kind == "agent.joined" && e.agent == agent_id
                }) {
                    out.push(("agent-back".to_string(), s));
                }
            }
            kind => {
                if let Some(heal) = m.heal
                    && let Some(s) = first(heal, &|e| e.kind == "shard.completed")
                {
                    out.push((kind.to_string(), s));
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_times_parse_as_the_stores_write_them() {
        let e = |at: &str| Event {
            seq: 1,
            at: at.into(),
            kind: String::new(),
            workload_uid: None,
            shard: None,
            agent: None,
            message: String::new(),
        };
        let t = at(&e("2026-12-02T12:30:05.250Z")).expect("parse");
        let secs = t
            .duration_since(SystemTime::UNIX_EPOCH)
            .expect("after epoch")
            .as_secs_f64();
        assert!((secs - 1_796_214_605.25).abs() < 1e-6, "{secs}");
        assert_eq!(at(&e("2026-12-02 12:30:05.25+00:00")), Some(t));
        assert!(at(&e("yesterday")).is_none());
    }

    #[test]
    fn a_stalled_run_names_the_shards_it_left_unfinished() {
        let e = |secs: u32, kind: &str, shard: i64, agent: &str| Event {
            seq: 1,
            at: format!("2026-12-02T12:30:{secs:02}Z"),
            kind: kind.into(),
            workload_uid: Some("u".into()),
            shard: Some(shard),
            agent: Some(agent.into()),
            message: String::new(),
        };
        let mut events = vec![
            e(0, "shard.assigned", 0, "a"),
            e(0, "shard.assigned", 1, "b"),
            e(1, "shard.completed", 0, "a"),
            e(2, "agent.lost", 1, "b"),
            e(3, "shard.requeued", 1, "b"),
        ];
        assert_eq!(
            unfinished(&events),
            "1 of 2 logged shards unfinished: shard 1: shard.requeued at +3.0s (b)"
        );
        events.push(e(4, "shard.assigned", 1, "a"));
        events.push(e(5, "shard.completed", 1, "a"));
        assert_eq!(
            unfinished(&events),
            "every one of the 2 logged shards completed"
        );
    }
}
