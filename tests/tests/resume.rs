//! `infermesh local --resume`: a run killed mid-workload is taken up from the store by the
//! next run; completed shards are not run again and nothing is charged twice.

use std::collections::BTreeSet;
use std::process::Stdio;
use std::time::{Duration, Instant};

use infermesh_operator::store::{self, EventFilter, Store};
use infermesh_tests::*;

fn agents_running(marker: &str) -> usize {
    let out = std::process::Command::new("pgrep")
        .args(["-f", marker])
        .output()
        .expect("pgrep");
    String::from_utf8_lossy(&out.stdout).lines().count()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_run_resumes_without_rerunning_completed_shards() {
    let dir = tempfile::tempdir().expect("tmp");
    let n = 1200;
    let (manifest_path, _input, out) = minilm_job(dir.path(), n, 128, "  shardBytes: 8Ki\n");
    let url = format!("sqlite://{}", dir.path().join("state.db").display());

    let mut first = local_command(&manifest_path, 2, dir.path())
        .arg("--database-url")
        .arg(&url)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let deadline = Instant::now() + Duration::from_secs(120);
    while std::fs::read_dir(&out).map(|d| d.count()).unwrap_or(0) < 3 {
        assert!(Instant::now() < deadline, "no progress within 120s");
        std::thread::sleep(Duration::from_millis(20));
    }
    first.kill().expect("SIGKILL infermesh local");
    first.wait().expect("reaped");

    // Its agents notice and exit rather than outlive it.
    let marker = dir.path().join("work").display().to_string();
    let deadline = Instant::now() + Duration::from_secs(15);
    while agents_running(&marker) > 0 {
        assert!(Instant::now() < deadline, "agents outlived the killed run");
        std::thread::sleep(Duration::from_millis(200));
    }

    let db = store::open(&url).await.expect("db");
    let admitted = db
        .events(&EventFilter {
            kind: Some("workload.admitted".into()),
            ..Default::default()
        })
        .await
        .expect("events");
    assert_eq!(admitted.len(), 1);
    let uid = admitted[0].workload_uid.clone().expect("uid");
    let done_before: BTreeSet<u32> = db
        .charges(&uid)
        .await
        .expect("charges")
        .iter()
        .map(|c| c.shard)
        .collect();
    assert!(
        !done_before.is_empty(),
        "some shards finished before the kill"
    );
    let last_seq = db
        .events(&EventFilter::default())
        .await
        .expect("events")
        .last()
        .map(|e| e.seq)
        .unwrap_or(0);
    drop(db);

    let second: Run = local_command(&manifest_path, 2, dir.path())
        .arg("--database-url")
        .arg(&url)
        .arg("--resume")
        .output()
        .expect("resume")
        .into();
    assert_eq!(second.code, Some(0), "{}", second.text());
    assert!(
        second.stderr.contains("resumed 1 unfinished workload"),
        "{}",
        second.text()
    );

    let lines = read_parts(&out);
    let counts = id_counts(&lines);
    assert_eq!(counts.len(), n, "every record present");
    assert!(counts.values().all(|&c| c == 1), "no record twice");
    let manifest = success_manifest(&out);
    assert_eq!(
        manifest["uid"],
        uid.as_str(),
        "the same workload finished, not a new one"
    );
    let shards = manifest["shards"].as_u64().expect("shards") as usize;

    let db = store::open(&url).await.expect("db");
    assert_eq!(
        db.charges(&uid).await.expect("charges").len(),
        shards,
        "each shard charged once"
    );
    let after = db
        .events(&EventFilter {
            kind: Some("shard.assigned".into()),
            after_seq: Some(last_seq),
            ..Default::default()
        })
        .await
        .expect("events");
    let rerun: Vec<u32> = after
        .iter()
        .filter_map(|e| e.shard.map(|s| s as u32))
        .filter(|s| done_before.contains(s))
        .collect();
    assert!(rerun.is_empty(), "completed shards ran again: {rerun:?}");
    assert!(db.verify().await.expect("verify").ok());
}

/// Ctrl-C: the run says what was done and the exact command that resumes it; running the
/// same manifest again without `--resume` is refused with that command (never a silent
/// start-over that would charge shards twice); the printed command finishes the run; and
/// `--resume` of another manifest does not take this workload up.
#[tokio::test(flavor = "multi_thread")]
async fn an_interrupted_run_tells_how_to_resume_and_is_never_started_over() {
    let dir = tempfile::tempdir().expect("tmp");
    let n = 1200;
    let (manifest_path, _input, out) = minilm_job(dir.path(), n, 128, "  shardBytes: 8Ki\n");
    let url = format!("sqlite://{}", dir.path().join("state.db").display());
    let first = local_command(&manifest_path, 2, dir.path())
        .arg("--database-url")
        .arg(&url)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let deadline = Instant::now() + Duration::from_secs(120);
    while std::fs::read_dir(&out)
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| e.file_name().to_string_lossy().starts_with("part-"))
                .count()
        })
        .unwrap_or(0)
        < 2
    {
        assert!(Instant::now() < deadline, "no progress within 120s");
        std::thread::sleep(Duration::from_millis(20));
    }
    let sent = std::process::Command::new("kill")
        .args(["-INT", &first.id().to_string()])
        .status()
        .expect("kill");
    assert!(sent.success());
    let stopped = Run::from(first.wait_with_output().expect("wait"));
    assert_eq!(stopped.code, Some(130), "{}", stopped.text());
    assert!(
        stopped.stderr.contains("stopped by SIGINT"),
        "{}",
        stopped.text()
    );
    assert!(stopped.stderr.contains("shards done"), "{}", stopped.text());
    let command = stopped
        .stderr
        .lines()
        .skip_while(|l| !l.contains("Finish the run with"))
        .nth(1)
        .expect("the resume command")
        .trim()
        .to_string();
    assert!(
        command.contains("--resume") && command.contains("local"),
        "{command}"
    );

    // The same manifest again, without --resume: refused, naming the command.
    let again: Run = run_local_on(&manifest_path, 2, dir.path(), &url);
    assert_eq!(again.code, Some(2), "{}", again.text());
    assert!(again.stderr.contains("unfinished run"), "{}", again.text());
    assert!(again.stderr.contains("--resume"), "{}", again.text());

    // --resume of another manifest (another output) leaves this workload alone.
    let other_dir = dir.path().join("other");
    std::fs::create_dir_all(&other_dir).expect("dir");
    let (other_manifest, _, other_out) = minilm_job(&other_dir, 20, 128, "");
    let other: Run = local_command(&other_manifest, 1, &other_dir)
        .arg("--database-url")
        .arg(&url)
        .arg("--resume")
        .output()
        .expect("other")
        .into();
    assert_eq!(other.code, Some(0), "{}", other.text());
    assert!(
        other.stderr.contains("resumed 0 unfinished"),
        "{}",
        other.text()
    );
    assert_eq!(success_manifest(&other_out)["records"], 20);
    assert!(
        !out.join("_SUCCESS.json").exists(),
        "the interrupted run was not taken up"
    );

    // The printed command finishes the run: every record once, every shard charged once.
    let resumed = std::process::Command::new("bash")
        .arg("-c")
        .arg(&command)
        .env("INFERMESH_AGENT_BIN", bin("infermesh-agent"))
        .output()
        .expect("resume");
    let resumed = Run::from(resumed);
    assert_eq!(resumed.code, Some(0), "{}", resumed.text());
    let lines = read_parts(&out);
    let counts = id_counts(&lines);
    assert_eq!(counts.len(), n, "every record present");
    assert!(counts.values().all(|&c| c == 1), "no record twice");
    let manifest = success_manifest(&out);
    let uid = manifest["uid"].as_str().expect("uid").to_string();
    let db = store::open(&url).await.expect("db");
    let shards = manifest["shards"].as_u64().expect("shards") as usize;
    assert_eq!(db.charges(&uid).await.expect("charges").len(), shards);
    assert!(db.verify().await.expect("verify").ok());
}
