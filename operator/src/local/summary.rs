//! The table `infermesh local` ends with.

use std::path::Path;
use std::time::Duration;

use crate::core::pricing::format_credits;
use crate::core::progress::{AgentSummary, WorkloadSummary, format_duration};

/// Prints the summary to stdout.
pub fn print(
    workloads: &[WorkloadSummary],
    agents: &[AgentSummary],
    processes: &[(String, String, Option<i32>)],
    wall: Duration,
    database_url: &str,
    balances: &[(String, i64)],
    log_dir: &Path,
) {
    let records: u64 = workloads.iter().map(|w| w.records).sum();
    let secs = wall.as_secs_f64().max(1e-9);
    crate::outln!();
    crate::outln!(
        "infermesh local: {} workload(s), {} agent(s), {records} records in {:.2}s ({:.1} records/s)",
        workloads.len(),
        agents.len(),
        secs,
        records as f64 / secs
    );
    crate::outln!();
    crate::outln!(
        "{:<32} {:<10} {:>9} {:>9} {:>9} {:>11} {:>8} {:>14}",
        "WORKLOAD",
        "STATUS",
        "SHARDS",
        "RECORDS",
        "WALL",
        "RECORDS/S",
        "RETRIED",
        "CREDITS"
    );
    for w in workloads {
        crate::outln!(
            "{:<32} {:<10} {:>9} {:>9} {:>9} {:>11.1} {:>8} {:>14}",
            format!("{}/{}", w.namespace, w.name),
            format!("{:?}", w.phase),
            format!("{}/{}", w.shards_succeeded, w.shards_total),
            w.records,
            format_duration(w.elapsed),
            w.throughput(),
            w.attempts_retried,
            format_credits(w.credits)
        );
    }
    crate::outln!();
    crate::outln!(
        "{:<24} {:<10} {:>7} {:>14} {:<10} EXIT",
        "AGENT",
        "NODE",
        "SHARDS",
        "CREDITS",
        "DEVICE"
    );
    for a in agents {
        let exit = processes
            .iter()
            .find(|(id, _, _)| *id == a.id)
            .map(|(_, _, code)| {
                code.map(|c| c.to_string())
                    .unwrap_or_else(|| "killed".into())
            })
            .unwrap_or_default();
        crate::outln!(
            "{:<24} {:<10} {:>7} {:>14} {:<10} {}",
            a.id,
            a.node,
            a.completed,
            format_credits(a.credits),
            a.providers.first().map(String::as_str).unwrap_or("-"),
            exit
        );
    }
    crate::outln!();
    for w in workloads {
        if w.phase == infermesh_crds::WorkloadPhase::Succeeded {
            crate::outln!(
                "{}/{}: outputs in {} ({} + _SUCCESS.json)",
                w.namespace,
                w.name,
                w.output_uri,
                plural(u64::from(w.shards_total), "part", "parts")
            );
        } else {
            crate::outln!("{}/{}: {}", w.namespace, w.name, status_line(w));
        }
    }
    let spent: Vec<String> = balances
        .iter()
        .filter(|(a, _)| a.starts_with("namespace/"))
        .map(|(a, b)| format!("{a} {}", format_credits(*b)))
        .collect();
    crate::outln!(
        "ledger: {database_url} (balances: {})",
        if spent.is_empty() {
            "-".to_string()
        } else {
            spent.join(", ")
        }
    );
    crate::outln!("agent logs: {}", log_dir.display());
}

/// `1 part`, `6 parts`.
pub fn plural(n: u64, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// Where an unfinished or failed workload stands, in words: its phase, reason and message,
/// and how far it got (never a bare `Running — Admitted: `).
pub fn status_line(w: &WorkloadSummary) -> String {
    let mut line = format!("{:?}", w.phase);
    if !w.reason.is_empty() {
        line.push_str(&format!(" ({})", w.reason));
    }
    if !w.message.is_empty() {
        line.push_str(&format!(": {}", w.message));
    }
    if let Some(wait) = &w.waiting {
        line.push_str(&format!("; waiting for slots: {}", wait.message));
    }
    line.push_str(&format!(
        "; {}/{} shards done, {} records",
        w.shards_succeeded, w.shards_total, w.records
    ));
    line
}

#[cfg(test)]
mod wording {
    use super::*;

    #[test]
    fn counts_read_as_english() {
        assert_eq!(plural(1, "part", "parts"), "1 part");
        assert_eq!(plural(6, "part", "parts"), "6 parts");
    }
}
