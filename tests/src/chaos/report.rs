//! The table of a set of runs: per scenario, runs played, invariant violations, and the
//! recovery times (p50 and max) of each kind; written into `docs/reliability.md` between
//! markers by `scripts/chaos.sh --doc`.

use std::collections::BTreeMap;

use super::RunReport;

/// Marks the generated part of the doc.
pub const BEGIN: &str = "<!-- chaos:begin (written by scripts/chaos.sh --doc; do not edit) -->";
/// End of the generated part.
pub const END: &str = "<!-- chaos:end -->";

fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[i]
}

/// The Markdown tables of `runs`.
pub fn table(runs: &[RunReport], command: &str) -> String {
    let mut by: BTreeMap<&str, Vec<&RunReport>> = BTreeMap::new();
    for r in runs {
        by.entry(r.scenario.as_str()).or_default().push(r);
    }
    let mut s = String::new();
    let played: Vec<&RunReport> = runs.iter().filter(|r| r.played()).collect();
    let violations: usize = played.iter().map(|r| r.violations.len()).sum();
    s.push_str(&format!(
        "`{command}`: {} runs played ({} skipped), {} invariant violations.\n\n",
        played.len(),
        runs.len() - played.len(),
        violations
    ));
    s.push_str("| scenario | runs | on Postgres / SQLite | faults played | Succeeded | Failed (fault named) | violations | wall p50 (s) |\n");
    s.push_str("|---|---:|---:|---:|---:|---:|---:|---:|\n");
    for (scenario, rs) in &by {
        let rs: Vec<&&RunReport> = rs.iter().filter(|r| r.played()).collect();
        if rs.is_empty() {
            continue;
        }
        let pg = rs.iter().filter(|r| r.store == "postgres").count();
        let ok = rs.iter().filter(|r| r.outcome == "Succeeded").count();
        let failed = rs
            .iter()
            .filter(|r| r.outcome.starts_with("Failed"))
            .count();
        let v: usize = rs.iter().map(|r| r.violations.len()).sum();
        let faults: usize = rs.iter().map(|r| r.faults.len()).sum();
        let unplayed: usize = rs
            .iter()
            .map(|r| r.faults.iter().filter(|f| f.contains("not played")).count())
            .sum();
        let mut walls: Vec<f64> = rs.iter().map(|r| r.wall_s).collect();
        walls.sort_by(f64::total_cmp);
        s.push_str(&format!(
            "| {scenario} | {} | {pg} / {} | {} of {faults} | {ok} | {failed} | {v} | {:.1} |\n",
            rs.len(),
            rs.len() - pg,
            faults - unplayed,
            quantile(&walls, 0.5)
        ));
    }
    let mut rec: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    // Recovery times from the single-fault scenarios: in a mix, one fault's recovery waits
    // on another's (a lease cannot run out into a store that is down).
    for r in played.iter().filter(|r| r.scenario != "mixed") {
        for (k, secs) in &r.recoveries {
            rec.entry(k.as_str()).or_default().push(*secs);
        }
    }
    s.push_str("\n| recovery | what is timed | samples | p50 (s) | max (s) | target |\n");
    s.push_str("|---|---|---:|---:|---:|---|\n");
    for (k, xs) in rec.iter_mut() {
        xs.sort_by(f64::total_cmp);
        let (what, target) = match *k {
            "agent-lost" => (
                "agent killed, frozen or cut off → its shard requeued",
                "lease (4 s) + 2 s",
            ),
            "agent-back" => (
                "agent restarted, thawed or reconnected → attached again",
                "—",
            ),
            "pg-kill" | "pg-restart" => ("Postgres answers again → next shard committed", "10 s"),
            "operator-kill" => ("operator restarted → next shard committed", "5 s"),
            "store-slow" => ("object store back to speed → next shard committed", "—"),
            _ => ("fault healed → next shard committed", "—"),
        };
        s.push_str(&format!(
            "| {k} | {what} | {} | {:.2} | {:.2} | {target} |\n",
            xs.len(),
            quantile(xs, 0.5),
            xs.last().copied().unwrap_or(f64::NAN)
        ));
    }
    let bad: Vec<&&RunReport> = played.iter().filter(|r| !r.violations.is_empty()).collect();
    if !bad.is_empty() {
        s.push_str("\nRuns with violations:\n\n");
        for r in bad {
            s.push_str(&format!(
                "- seed {} ({}): {}\n",
                r.seed,
                r.scenario,
                r.violations.join("; ")
            ));
        }
    }
    s
}

/// `doc` with the part between the markers replaced by `table`.
pub fn splice(doc: &str, table: &str) -> Result<String, String> {
    let (head, rest) = doc
        .split_once(BEGIN)
        .ok_or("the doc has no chaos:begin marker")?;
    let (_, tail) = rest
        .split_once(END)
        .ok_or("the doc has no chaos:end marker")?;
    Ok(format!("{head}{BEGIN}\n{table}{END}{tail}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(seed: u64, scenario: &str, outcome: &str, v: &[&str], rec: &[(&str, f64)]) -> RunReport {
        RunReport {
            seed,
            scenario: scenario.into(),
            store: "postgres".into(),
            agents: 2,
            records: 10,
            faults: if seed == 28 {
                vec![format!("{scenario} not played: the run had ended")]
            } else {
                vec![format!("{scenario} at +1.0s")]
            },
            outcome: outcome.into(),
            violations: v.iter().map(|s| s.to_string()).collect(),
            recoveries: rec.iter().map(|(k, s)| (k.to_string(), *s)).collect(),
            wall_s: 10.0,
            dir: String::new(),
        }
    }

    #[test]
    fn the_table_counts_runs_violations_and_quantiles() {
        let runs = vec![
            run(0, "pg-kill", "Succeeded", &[], &[("pg-kill", 1.0)]),
            run(
                14,
                "pg-kill",
                "Succeeded",
                &["shard 3 completed twice"],
                &[("pg-kill", 3.0)],
            ),
            run(28, "pg-kill", "Succeeded", &[], &[("pg-kill", 2.0)]),
            run(9, "disk-full", "skipped: no tmpfs", &[], &[]),
        ];
        let t = table(&runs, "chaos --seeds 4");
        assert!(
            t.contains("3 runs played (1 skipped), 1 invariant violations"),
            "{t}"
        );
        assert!(
            t.contains("| pg-kill | 3 | 3 / 0 | 2 of 3 | 3 | 0 | 1 | 10.0 |"),
            "{t}"
        );
        assert!(t.contains("| pg-kill | Postgres answers again → next shard committed | 3 | 2.00 | 3.00 | 10 s |"), "{t}");
        assert!(
            t.contains("seed 14 (pg-kill): shard 3 completed twice"),
            "{t}"
        );
        let doc = format!("# R\n\nbefore\n{BEGIN}\nold\n{END}\nafter\n");
        let new = splice(&doc, &t).expect("splice");
        assert!(new.starts_with("# R\n\nbefore\n") && new.ends_with(&format!("{END}\nafter\n")));
        assert!(!new.contains("old") && new.contains("3 runs played"));
        assert!(splice("no markers", &t).is_err());
    }
}
