//! The fixed short set of chaos seeds (one per scenario, and mixes; see `tests/src/chaos`):
//! real operator, agent and Postgres processes under agent SIGKILL and SIGSTOP, partitions,
//! packet loss, duplication and a slow link, Postgres killed and restarted, the operator
//! killed and resumed, a full and a read-only output, an input truncated or replaced, and a
//! slow object store (S3, behind a delaying proxy).
//! Every run's invariants must hold. The long run (`scripts/chaos.sh --seeds 200`) is a script.

use std::process::Command;

#[test]
fn the_ci_seeds_keep_every_invariant() {
    // The harness and the binaries it starts sit next to each other in target/<profile>.
    let harness = infermesh_tests::bin("infermesh-chaos");
    infermesh_tests::bin("infermesh");
    infermesh_tests::bin("infermesh-agent");
    let root = tempfile::tempdir().expect("tmp");
    let out = Command::new(&harness)
        .arg("--ci")
        .arg("--root")
        .arg(root.path())
        .output()
        .expect("run infermesh-chaos");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stderr}\n{stdout}");
    assert_eq!(
        out.status.code(),
        Some(0),
        "invariants broken:\n{stderr}\n{stdout}"
    );
    let closing = stdout
        .lines()
        .find(|l| l.starts_with("chaos: "))
        .expect("closing line");
    let skipped: usize = closing
        .split(", ")
        .find_map(|p| p.strip_suffix(" skipped"))
        .and_then(|n| n.parse().ok())
        .expect("skipped count");
    if infermesh_tests::chaos::is_root() {
        assert_eq!(skipped, 0, "as root every scenario is played: {closing}");
        // Every fault kind was played, not only scheduled.
        for kind in infermesh_tests::chaos::SCENARIOS
            .iter()
            .filter(|k| **k != "mixed")
        {
            let line = stderr
                .lines()
                .find(|l| l.contains(&format!(" {kind} ")) && l.starts_with("ok"))
                .unwrap_or_else(|| panic!("no passing run of {kind}:\n{stderr}"));
            assert!(
                !line.contains(&format!("{kind} not played")),
                "{kind} was not played: {line}"
            );
        }
    }
}
