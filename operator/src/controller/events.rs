//! Kubernetes Events from the event log: admission, shard failures, requeues, completion and
//! agents joining or being lost show in `kubectl describe`. Shard events are summed per
//! workload and kind each round, so a burst of requeues is one Event, not hundreds.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType};

use super::Context;
use crate::store::{EventFilter, EventRow, Store};

/// One Kubernetes Event to publish.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Publish {
    /// `Workload` or `Agent`.
    pub kind: &'static str,
    /// Workload uid or agent name.
    pub subject: String,
    /// Warning or not.
    pub warning: bool,
    /// CamelCase reason.
    pub reason: &'static str,
    /// For a person.
    pub note: String,
}

/// The Events for a batch of log rows: shard failures and requeues summed per workload.
pub fn summarize(rows: &[EventRow]) -> Vec<Publish> {
    let mut out = Vec::new();
    let mut shards: BTreeMap<(String, &'static str), Vec<&EventRow>> = BTreeMap::new();
    for r in rows {
        let uid = r.workload_uid.clone().unwrap_or_default();
        match r.kind.as_str() {
            "shard.failed" => shards.entry((uid, "ShardFailed")).or_default().push(r),
            "shard.requeued" => shards.entry((uid, "ShardRequeued")).or_default().push(r),
            "workload.succeeded" => out.push(Publish {
                kind: "Workload",
                subject: uid,
                warning: false,
                reason: "Succeeded",
                note: r.message.clone(),
            }),
            "workload.model_changed" => out.push(Publish {
                kind: "Workload",
                subject: uid,
                warning: true,
                reason: "ModelChanged",
                note: r.message.clone(),
            }),
            "workload.failed" => out.push(Publish {
                kind: "Workload",
                subject: uid,
                warning: true,
                reason: "Failed",
                note: r.message.clone(),
            }),
            "agent.joined" | "agent.lost" | "agent.left" => {
                let (warning, reason) = match r.kind.as_str() {
                    "agent.joined" => (false, "Joined"),
                    "agent.left" => (false, "Left"),
                    _ => (true, "Lost"),
                };
                out.push(Publish {
                    kind: "Agent",
                    subject: r.agent.clone().unwrap_or_default(),
                    warning,
                    reason,
                    note: r.message.clone(),
                });
            }
            _ => {}
        }
    }
    for ((uid, reason), rows) in shards {
        let list: Vec<String> = rows
            .iter()
            .take(10)
            .map(|r| format!("{}#{}", r.shard.unwrap_or(-1), r.attempt.unwrap_or(0)))
            .collect();
        let more = rows.len().saturating_sub(10);
        let last = rows.last().map(|r| r.message.clone()).unwrap_or_default();
        out.push(Publish {
            kind: "Workload",
            subject: uid,
            warning: true,
            reason,
            note: format!(
                "{} shard attempt(s) (shard#attempt: {}{}); last: {last}",
                rows.len(),
                list.join(", "),
                if more > 0 {
                    format!(", +{more} more")
                } else {
                    String::new()
                }
            ),
        });
    }
    out
}

const PAGE: i64 = 5000;

/// Publishes Events from the log every two seconds, from the time it starts.
pub async fn run(ctx: Arc<Context>) {
    let mut after: Option<i64> = None;
    let since = Some(k8s_openapi::jiff::Timestamp::now().to_string());
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    loop {
        tick.tick().await;
        // Everything new since the last round, in pages.
        let mut rows = Vec::new();
        loop {
            let filter = EventFilter {
                after_seq: rows.last().map(|r: &EventRow| r.seq).or(after),
                since: if after.is_none() && rows.is_empty() {
                    since.clone()
                } else {
                    None
                },
                limit: Some(PAGE),
                ..EventFilter::default()
            };
            match ctx.core.store().events(&filter).await {
                Ok(page) => {
                    let full = page.len() as i64 == PAGE;
                    rows.extend(page);
                    if !full {
                        break;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the event log");
                    break;
                }
            }
        }
        let Some(last) = rows.last() else { continue };
        after = Some(last.seq);
        let workloads = ctx.core.workloads().await;
        for p in summarize(&rows) {
            let reference = match p.kind {
                "Workload" => {
                    let Some(w) = workloads.iter().find(|w| w.uid == p.subject) else {
                        continue;
                    };
                    ObjectReference {
                        api_version: Some("infermesh.dev/v1alpha1".into()),
                        kind: Some("Workload".into()),
                        namespace: Some(w.namespace.clone()),
                        name: Some(w.name.clone()),
                        uid: Some(w.uid.clone()),
                        ..ObjectReference::default()
                    }
                }
                _ => ObjectReference {
                    api_version: Some("infermesh.dev/v1alpha1".into()),
                    kind: Some("Agent".into()),
                    name: Some(p.subject.clone()),
                    ..ObjectReference::default()
                },
            };
            let event = Event {
                type_: if p.warning {
                    EventType::Warning
                } else {
                    EventType::Normal
                },
                reason: p.reason.into(),
                note: Some(p.note.chars().take(1000).collect()),
                action: "Reconcile".into(),
                secondary: None,
            };
            ctx.write("events", "create").await;
            if let Err(e) = ctx.recorder.publish(&event, &reference).await {
                tracing::warn!(error = %e, "cannot publish an event");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(seq: i64, kind: &str, uid: &str, shard: i64) -> EventRow {
        EventRow {
            seq,
            at: String::new(),
            kind: kind.into(),
            workload_uid: Some(uid.into()),
            shard: Some(shard),
            attempt: Some(1),
            agent: Some("gpus-node-a".into()),
            message: format!("m{seq}"),
        }
    }

    #[test]
    fn a_burst_of_requeues_is_one_event_per_workload() {
        let mut rows: Vec<EventRow> = (0..25).map(|i| row(i, "shard.requeued", "u1", i)).collect();
        rows.push(row(30, "shard.completed", "u1", 3));
        rows.push(row(31, "workload.succeeded", "u2", 0));
        rows.push(row(32, "agent.lost", "", 0));
        let out = summarize(&rows);
        assert_eq!(out.len(), 3, "{out:?}");
        let requeued = out
            .iter()
            .find(|p| p.reason == "ShardRequeued")
            .expect("requeue event");
        assert_eq!(requeued.subject, "u1");
        assert!(
            requeued.note.starts_with("25 shard attempt(s)"),
            "{}",
            requeued.note
        );
        assert!(requeued.note.contains("+15 more"), "{}", requeued.note);
        assert!(
            out.iter()
                .any(|p| p.reason == "Succeeded" && p.subject == "u2" && !p.warning)
        );
        assert!(
            out.iter()
                .any(|p| p.kind == "Agent" && p.reason == "Lost" && p.warning)
        );
    }
}
