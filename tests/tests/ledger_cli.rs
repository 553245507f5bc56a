//! `infermesh ledger` as a person types it: amounts that would break the ledger are refused,
//! filters are parsed strictly, read-only commands create nothing, and printing into a closed
//! pipe ends quietly. Each refusal exits 2 with a message naming the problem, and the ledger
//! verifies afterwards.

use std::path::Path;
use std::process::Command;

use infermesh_tests::*;

/// A finished local run with a budget for team-a, so the ledger has accounts and events.
fn ledger_with_a_run(dir: &Path) -> String {
    let (path, _input, _out) = tensor_job(dir, 200, "  shardBytes: 2Ki\n");
    let yaml = std::fs::read_to_string(&path).expect("manifest").replace(
        "pricing: {perCpuSecond: 0.05, perThousandRecords: 0.2}",
        "pricing: {perCpuSecond: 0.05, perThousandRecords: 0.2}\n  budgets: [{namespace: team-a, credits: 100}]",
    );
    std::fs::write(&path, yaml).expect("manifest");
    let url = format!("sqlite://{}", dir.join("state.db").display());
    let run: Run = run_local_on(&path, 1, dir, &url);
    assert_eq!(run.code, Some(0), "{}", run.text());
    url
}

fn refused(run: &Run, words: &[&str]) {
    assert_eq!(run.code, Some(2), "{}", run.text());
    for w in words {
        assert!(run.stderr.contains(w), "`{w}` not in: {}", run.text());
    }
    assert!(!run.stderr.contains("panicked"), "{}", run.text());
}

#[test]
fn amounts_that_would_break_the_ledger_are_refused_and_it_still_verifies() {
    let dir = tempfile::tempdir().expect("tmp");
    let url = ledger_with_a_run(dir.path());
    let grant = |credits: &str| {
        ledger(
            &url,
            &[
                "grant",
                "--namespace",
                "team-a",
                "--mesh",
                "test",
                "--credits",
                credits,
            ],
        )
    };
    refused(&grant("1e300"), &["--credits", "more than one grant"]);
    refused(&grant("NaN"), &["--credits", "finite"]);
    refused(&grant("inf"), &["--credits", "finite"]);
    refused(&grant("0"), &["--credits", "0 credits"]);
    refused(&grant("lots"), &["--credits", "not a number"]);
    let ok = grant("12.5");
    assert_eq!(ok.code, Some(0), "{}", ok.text());
    let ok = grant("-2.5");
    assert_eq!(
        ok.code,
        Some(0),
        "a negative grant takes back: {}",
        ok.text()
    );
    for args in [
        &["balance"][..],
        &["verify"],
        &["statement", "namespace/team-a"],
    ] {
        let run = ledger(&url, args);
        assert_eq!(run.code, Some(0), "{args:?}: {}", run.text());
    }
    let balance = ledger(&url, &["balance", "--namespace", "team-a", "-o", "json"]);
    let rows: serde_json::Value = serde_json::from_str(&balance.stdout).expect("json");
    let micro = rows[0]["microCredits"].as_i64().expect("balance");
    assert!(
        micro > 100_000_000 && micro < 110_000_000,
        "budget 100 + 10 - spent: {micro}"
    );
    refused(
        &ledger(
            &url,
            &[
                "grant",
                "--namespace",
                "team-a",
                "--mesh",
                "nosuchmesh",
                "--credits",
                "5",
            ],
        ),
        &["no mesh `nosuchmesh`"],
    );

    // A Mesh whose budget is negative, not a number or absurd is refused at once.
    for (credits, words) in [
        ("-100", "non-negative"),
        (".nan", "non-negative"),
        ("1e300", "maximum"),
    ] {
        let (path, _input, _out) = tensor_job(dir.path(), 10, "");
        let yaml = std::fs::read_to_string(&path).expect("manifest").replace(
            "pricing: {perCpuSecond: 0.05, perThousandRecords: 0.2}",
            &format!(
                "pricing: {{perCpuSecond: 0.05, perThousandRecords: 0.2}}\n  budgets: [{{namespace: team-a, credits: {credits}}}]"
            ),
        );
        std::fs::write(&path, yaml).expect("manifest");
        let run: Run = run_local_on(&path, 1, dir.path(), &url);
        refused(&run, &["spec.budgets[0].credits", words]);
    }
    let verify = ledger(&url, &["verify"]);
    assert_eq!(verify.code, Some(0), "{}", verify.text());
}

#[test]
fn filters_are_parsed_strictly() {
    let dir = tempfile::tempdir().expect("tmp");
    let url = ledger_with_a_run(dir.path());
    refused(
        &ledger(
            &url,
            &["statement", "namespace/team-a", "--from", "yesterday"],
        ),
        &["--from", "not a time"],
    );
    refused(
        &ledger(&url, &["statement", "namespace/team-a", "--to", "garbage"]),
        &["--to", "not a time"],
    );
    refused(
        &ledger(&url, &["events", "--since", "notadate"]),
        &["--since", "not a time"],
    );
    refused(&ledger(&url, &["events", "--limit=-1"]), &["--limit"]);
    refused(&ledger(&url, &["events", "--limit", "0"]), &["--limit"]);
    refused(&ledger(&url, &["statement", "nobody"]), &["not an account"]);
    refused(
        &ledger(&url, &["statement", "namespace/nobody"]),
        &["no such account `namespace/nobody`"],
    );
    // Dates are days; good filters still work.
    let run = ledger(
        &url,
        &[
            "statement",
            "namespace/team-a",
            "--from",
            "2000-01-01",
            "--to",
            "2999-12-31",
        ],
    );
    assert_eq!(run.code, Some(0), "{}", run.text());
    assert!(run.stdout.contains("budget"), "{}", run.text());
    let run = ledger(&url, &["events", "--limit", "3", "-o", "json"]);
    let events: serde_json::Value = serde_json::from_str(&run.stdout).expect("json");
    assert_eq!(events.as_array().map(Vec::len), Some(3));
}

#[test]
fn read_only_commands_create_no_database() {
    let dir = tempfile::tempdir().expect("tmp");
    let missing = dir.path().join("typo.db");
    let url = format!("sqlite://{}", missing.display());
    for args in [&["verify"][..], &["balance"], &["events"]] {
        refused(&ledger(&url, args), &["no database at", "typo.db"]);
    }
    assert!(!missing.exists(), "nothing was created");
}

#[test]
fn printing_into_a_closed_pipe_ends_quietly() {
    let dir = tempfile::tempdir().expect("tmp");
    let url = ledger_with_a_run(dir.path());
    let out = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "set -o pipefail; '{}' ledger --database-url '{url}' events | head -1",
            bin("infermesh").display()
        ))
        .output()
        .expect("bash");
    let run = Run::from(out);
    assert_eq!(run.code, Some(0), "{}", run.text());
    assert_eq!(run.stdout.lines().count(), 1, "{}", run.text());
    assert!(run.stderr.is_empty(), "quiet: {}", run.text());
}

#[test]
fn a_missing_folder_or_an_unreachable_server_is_named_at_once() {
    let dir = tempfile::tempdir().expect("tmp");
    let (path, _input, _out) = tensor_job(dir.path(), 10, "");
    let nowhere = dir.path().join("no-such-folder").join("state.db");
    let run = run_local_on(
        &path,
        1,
        dir.path(),
        &format!("sqlite://{}", nowhere.display()),
    );
    refused(&run, &["no-such-folder", "does not exist"]);
    let started = std::time::Instant::now();
    let run = ledger("postgres://infermesh@127.0.0.1:1/ledger", &["balance"]);
    refused(&run, &["cannot reach the Postgres server at 127.0.0.1:1"]);
    assert!(
        started.elapsed() < std::time::Duration::from_secs(15),
        "said within seconds"
    );
}

/// Outputs never mix across runs: a second run into a location that holds the first run's
/// parts is refused, naming it, and changes nothing; with `output.mode: overwrite` it replaces
/// them, and the location then holds exactly what its `_SUCCESS.json` lists.
#[test]
fn a_second_run_never_mixes_its_parts_with_the_first() {
    let dir = tempfile::tempdir().expect("tmp");
    let url = format!("sqlite://{}", dir.path().join("state.db").display());
    let (path, _input, out) = tensor_job(dir.path(), 400, "  shardBytes: 2Ki\n");
    let run: Run = run_local_on(&path, 1, dir.path(), &url);
    assert_eq!(run.code, Some(0), "{}", run.text());
    let first = success_manifest(&out);
    let first_parts = first["parts"].as_array().expect("parts").len();
    assert!(first_parts > 2, "several parts: {first_parts}");

    // A shorter input cut in larger shards, into the same location.
    let (path, _input, out2) = tensor_job(dir.path(), 100, "  shardBytes: 128Ki\n");
    assert_eq!(out, out2);
    let run: Run = run_local_on(&path, 1, dir.path(), &url);
    refused(
        &run,
        &["OutputNotEmpty", &out.display().to_string(), "overwrite"],
    );
    assert_eq!(success_manifest(&out), first, "nothing changed");

    let yaml = std::fs::read_to_string(&path).expect("manifest").replace(
        &format!("uri: \"{}/\"}}", out.display()),
        &format!("uri: \"{}/\", mode: overwrite}}", out.display()),
    );
    assert!(yaml.contains("mode: overwrite"), "{yaml}");
    std::fs::write(&path, yaml).expect("manifest");
    let run: Run = run_local_on(&path, 1, dir.path(), &url);
    assert_eq!(run.code, Some(0), "{}", run.text());
    let second = success_manifest(&out);
    let listed: Vec<String> = second["parts"]
        .as_array()
        .expect("parts")
        .iter()
        .map(|p| {
            p["uri"]
                .as_str()
                .expect("uri")
                .rsplit('/')
                .next()
                .expect("name")
                .to_string()
        })
        .collect();
    let mut present: Vec<String> = std::fs::read_dir(&out)
        .expect("out")
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .filter(|n| n.starts_with("part-"))
        .collect();
    present.sort();
    assert_eq!(present, listed, "exactly the parts the manifest lists");
    assert_eq!(read_parts(&out).len(), 100, "no stale part");
    let verify = ledger(&url, &["verify", "--outputs"]);
    assert_eq!(verify.code, Some(0), "{}", verify.text());
}
