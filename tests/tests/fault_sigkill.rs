//! Fault: SIGKILL one agent mid-workload. The workload still succeeds, every record appears
//! exactly once, every shard is charged exactly once, and the event log shows the requeue.

use std::time::{Duration, Instant};

use infermesh_operator::store::sqlite::SqliteStore;
use infermesh_operator::store::{EventFilter, Store};
use infermesh_tests::*;

#[tokio::test(flavor = "multi_thread")]
async fn a_sigkilled_agent_loses_nothing_and_nothing_is_counted_twice() {
    let dir = tempfile::tempdir().expect("tmp");
    let n = 1500;
    let (manifest_path, _input, out) =
        minilm_job(dir.path(), n, 128, "  shardBytes: 8Ki\n  maxAttempts: 3\n");

    let child = local_command(&manifest_path, 2, dir.path())
        .arg("--database-url")
        .arg(format!(
            "sqlite://{}",
            dir.path().join("state.db").display()
        ))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn infermesh local");

    // Once the mesh is under way (a first part written), kill an agent that is running a
    // shard: with one slot each and a queue of shards, both agents are busy.
    let deadline = Instant::now() + Duration::from_secs(120);
    let victim = loop {
        assert!(Instant::now() < deadline, "no progress within 120s");
        let parts = std::fs::read_dir(&out).map(|d| d.count()).unwrap_or(0);
        let agents = children_named(child.id(), "infermesh-agent");
        if parts >= 1 && agents.len() == 2 {
            break agents[0];
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let killed = std::process::Command::new("kill")
        .args(["-KILL", &victim.to_string()])
        .status()
        .expect("kill");
    assert!(killed.success());

    let output = child.wait_with_output().expect("wait");
    let run = Run::from(output);
    assert_eq!(run.code, Some(0), "{}", run.text());
    assert!(
        run.stderr.contains("exited"),
        "the summary tells of the dead agent: {}",
        run.text()
    );

    let lines = read_parts(&out);
    let counts = id_counts(&lines);
    assert_eq!(counts.len(), n, "every record present");
    assert!(counts.values().all(|&c| c == 1), "no record twice");
    let manifest = success_manifest(&out);
    assert_eq!(manifest["records"], n);
    let shards = manifest["shards"].as_u64().expect("shards") as usize;
    let uid = manifest["uid"].as_str().expect("uid").to_string();

    let store = SqliteStore::open(&format!(
        "sqlite://{}",
        dir.path().join("state.db").display()
    ))
    .await
    .expect("db");
    let charges = store.charges(&uid).await.expect("charges");
    assert_eq!(charges.len(), shards, "each shard charged exactly once");
    let events = |kind: &str| {
        let f = EventFilter {
            workload_uid: None,
            kind: Some(kind.into()),
            ..Default::default()
        };
        let store = store.clone();
        async move { store.events(&f).await.expect("events") }
    };
    // Both agents are busy almost all the time, but the kill can land in the moment between
    // a completion and the next assignment, when the victim holds nothing: then its departure
    // is `agent.left` and there is nothing to requeue. Either way it is logged while the
    // workload still runs (the survivor leaves after it succeeded).
    let lost = events("agent.lost").await;
    let left = events("agent.left").await;
    let succeeded = events("workload.succeeded").await;
    let end = succeeded
        .first()
        .map(|e| e.seq)
        .expect("workload.succeeded");
    assert!(
        lost.iter()
            .chain(&left)
            .any(|e| e.seq < end && e.message.contains("stream")),
        "the loss is logged before the end (seq {end}): lost {lost:?}, left {left:?}"
    );
    if lost.is_empty() {
        eprintln!("the victim held no shard when it was killed: nothing to requeue");
        return;
    }
    let requeued = events("shard.requeued").await;
    assert!(
        !requeued.is_empty(),
        "the killed agent's shard was requeued"
    );
    let first = &requeued[0];
    let again = store
        .events(&EventFilter {
            workload_uid: Some(uid.clone()),
            kind: Some("shard.assigned".into()),
            ..Default::default()
        })
        .await
        .expect("events");
    assert!(
        again
            .iter()
            .any(|e| e.shard == first.shard && e.attempt == Some(first.attempt.unwrap_or(0) + 1)),
        "the requeued shard ran again with attempt + 1"
    );
}
