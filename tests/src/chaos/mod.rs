//! A seeded fault-injection harness in the manner of TigerBeetle's VOPR and Jepsen: one seed
//! fixes a schedule of faults (which, on whom, when, for how long) that is played against
//! real processes — `infermesh local` as the operator core and gRPC server, on a private
//! Postgres or on SQLite; the real `infermesh-agent` binaries with ONNX Runtime, each in a
//! network namespace of its own — and then every invariant of the system is checked
//! ([`check`]). A failing seed prints the command that replays it.

pub mod check;
pub mod net;
pub mod report;
mod run;
pub mod s3;

pub use run::{Env, RunReport, run_seed};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::time::Duration;

/// Whether this process runs as root (namespaces, tmpfs mounts).
pub fn is_root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0\n"))
        .unwrap_or(false)
}

/// The generated tensor model (`scripts/gen_test_models.py`), made under `root`.
pub fn tensor_model(root: &std::path::Path) -> Result<std::path::PathBuf, String> {
    let dir = root.join("models");
    let out = std::process::Command::new(crate::python())
        .arg(crate::workspace().join("scripts/gen_test_models.py"))
        .arg("--out")
        .arg(&dir)
        .output()
        .map_err(|e| format!("gen_test_models.py: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "gen_test_models.py failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(dir.join("tensor.onnx"))
}

/// What a fault does.
#[derive(Clone, Debug, PartialEq)]
pub enum Fault {
    /// SIGKILL an agent; start it again after `restart` (a node that reboots) or never.
    AgentKill {
        agent: usize,
        restart: Option<Duration>,
    },
    /// SIGSTOP an agent for longer than its lease, then SIGCONT (a gray failure).
    AgentFreeze { agent: usize, hold: Duration },
    /// An agent's link down, then up.
    Partition { agent: usize, hold: Duration },
    /// Random packet loss on an agent's link.
    Loss {
        agent: usize,
        percent: u32,
        hold: Duration,
    },
    /// Random packet duplication towards the operator.
    Duplicate {
        agent: usize,
        percent: u32,
        hold: Duration,
    },
    /// A slow link (token bucket: queueing delay).
    Slow {
        agent: usize,
        kbit: u32,
        hold: Duration,
    },
    /// Postgres SIGKILLed, started again after `down`.
    PostgresKill { down: Duration },
    /// `pg_ctl restart -m fast`.
    PostgresRestart,
    /// The operator SIGKILLed, started again with `--resume` after `down`.
    OperatorKill { down: Duration },
    /// The output file system filled up, freed after `hold`.
    DiskFull { hold: Duration },
    /// The output file system remounted read-only, writable again after `hold`.
    ReadOnly { hold: Duration },
    /// The input truncated to `keep` of its length.
    InputTruncated { keep_percent: u32 },
    /// The input replaced by another file: of the same size (other values), or longer.
    InputReplaced { same_size: bool },
    /// The object store (S3) slow: every request to it held `delay` before it is passed on,
    /// for `hold` (reads of the input, puts and copies of parts alike).
    StoreSlow { delay: Duration, hold: Duration },
}

impl Fault {
    /// The fault's kind, as scenarios and the report name it.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::AgentKill { .. } => "agent-kill",
            Self::AgentFreeze { .. } => "agent-freeze",
            Self::Partition { .. } => "partition",
            Self::Loss { .. } => "net-loss",
            Self::Duplicate { .. } => "net-dup",
            Self::Slow { .. } => "net-slow",
            Self::PostgresKill { .. } => "pg-kill",
            Self::PostgresRestart => "pg-restart",
            Self::OperatorKill { .. } => "operator-kill",
            Self::DiskFull { .. } => "disk-full",
            Self::ReadOnly { .. } => "read-only",
            Self::InputTruncated { .. } => "input-truncated",
            Self::InputReplaced { .. } => "input-replaced",
            Self::StoreSlow { .. } => "store-slow",
        }
    }

    /// Whether the fault needs network namespaces.
    pub fn needs_namespaces(&self) -> bool {
        matches!(
            self,
            Self::Partition { .. } | Self::Loss { .. } | Self::Duplicate { .. } | Self::Slow { .. }
        )
    }

    /// Whether the fault needs Postgres (it is about the database server).
    pub fn needs_postgres(&self) -> bool {
        matches!(self, Self::PostgresKill { .. } | Self::PostgresRestart)
    }

    /// Whether the fault needs the input and output on an object store (S3) behind the
    /// harness's delaying proxy.
    pub fn needs_object_store(&self) -> bool {
        matches!(self, Self::StoreSlow { .. })
    }

    /// Whether the fault needs the output on a file system of its own (tmpfs; root).
    pub fn needs_tmpfs(&self) -> bool {
        matches!(self, Self::DiskFull { .. } | Self::ReadOnly { .. })
    }

    /// Whether the workload may end Failed because of it (and then its reason must name it).
    pub fn may_fail_workload(&self) -> bool {
        matches!(
            self,
            Self::DiskFull { .. }
                | Self::ReadOnly { .. }
                | Self::InputTruncated { .. }
                | Self::InputReplaced { .. }
        )
    }

    /// Words one of which a Failed workload's reason or message must hold for this fault.
    pub fn failure_words(&self) -> &'static [&'static str] {
        match self {
            Self::DiskFull { .. } => &["No space left", "StorageError", "OutputNotWritable"],
            Self::ReadOnly { .. } => &["Read-only", "read-only", "OutputNotWritable"],
            Self::InputTruncated { .. } | Self::InputReplaced { .. } => &["changed"],
            _ => &[],
        }
    }
}

/// The scenarios: every fault kind alone, then mixes.
pub const SCENARIOS: &[&str] = &[
    "agent-kill",
    "agent-freeze",
    "partition",
    "net-loss",
    "net-dup",
    "net-slow",
    "pg-kill",
    "pg-restart",
    "operator-kill",
    "disk-full",
    "read-only",
    "input-truncated",
    "input-replaced",
    "store-slow",
    "mixed",
];

/// Which store a run uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreKind {
    /// A database on the harness's private Postgres.
    Postgres,
    /// A SQLite file.
    Sqlite,
}

/// A fault and when it starts, counted from the first committed part.
#[derive(Clone, Debug)]
pub struct Timed {
    /// Start, after the first committed part.
    pub at: Duration,
    /// The fault.
    pub fault: Fault,
}

/// One run's whole schedule, a function of the seed (and the scenario).
#[derive(Clone, Debug)]
pub struct Schedule {
    /// Seed.
    pub seed: u64,
    /// Scenario.
    pub scenario: String,
    /// Store.
    pub store: StoreKind,
    /// Agents.
    pub agents: usize,
    /// Records in the input.
    pub records: usize,
    /// The Workload's `shardBytes`.
    pub shard_bytes: String,
    /// Faults in start order.
    pub faults: Vec<Timed>,
}

impl Schedule {
    /// Whether the input and output live on the harness's S3 server (a fault is about it).
    pub fn object_store(&self) -> bool {
        self.faults.iter().any(|t| t.fault.needs_object_store())
    }
}

/// The scenario a seed plays when none is named: the seeds take the scenarios in turn.
pub fn scenario_of(seed: u64) -> &'static str {
    SCENARIOS[(seed % SCENARIOS.len() as u64) as usize]
}

fn ms(rng: &mut StdRng, lo: u64, hi: u64) -> Duration {
    Duration::from_millis(rng.random_range(lo..=hi))
}

/// A fault of `kind` with seeded parameters. `lease` is the Mesh's lease.
fn fault(kind: &str, rng: &mut StdRng, agents: usize, lease: Duration) -> Fault {
    let agent = rng.random_range(0..agents);
    let lease_ms = lease.as_millis() as u64;
    match kind {
        "agent-kill" => Fault::AgentKill {
            agent,
            restart: rng.random_bool(0.5).then(|| ms(rng, 500, 2 * lease_ms)),
        },
        "agent-freeze" => Fault::AgentFreeze {
            agent,
            hold: ms(rng, lease_ms + 1_000, 2 * lease_ms + 2_000),
        },
        "partition" => Fault::Partition {
            agent,
            hold: ms(rng, 1_000, 2 * lease_ms + 2_000),
        },
        "net-loss" => Fault::Loss {
            agent,
            percent: rng.random_range(10..=60),
            hold: ms(rng, 2_000, 8_000),
        },
        "net-dup" => Fault::Duplicate {
            agent,
            percent: rng.random_range(10..=50),
            hold: ms(rng, 2_000, 8_000),
        },
        "net-slow" => Fault::Slow {
            agent,
            kbit: rng.random_range(32..=256),
            hold: ms(rng, 2_000, 8_000),
        },
        "pg-kill" => Fault::PostgresKill {
            down: ms(rng, 500, 8_000),
        },
        "pg-restart" => Fault::PostgresRestart,
        "operator-kill" => Fault::OperatorKill {
            down: ms(rng, 200, 3_000),
        },
        "disk-full" => Fault::DiskFull {
            hold: ms(rng, 500, 6_000),
        },
        "read-only" => Fault::ReadOnly {
            hold: ms(rng, 500, 6_000),
        },
        "input-truncated" => Fault::InputTruncated {
            keep_percent: rng.random_range(10..=90),
        },
        "input-replaced" => Fault::InputReplaced {
            same_size: rng.random_bool(0.5),
        },
        "store-slow" => Fault::StoreSlow {
            delay: ms(rng, 100, 1_500),
            hold: ms(rng, 2_000, 8_000),
        },
        other => panic!("no fault kind {other}"),
    }
}

/// The faults a mixed run draws from: those that must not fail the workload.
const SURVIVABLE: &[&str] = &[
    "agent-kill",
    "agent-freeze",
    "partition",
    "net-loss",
    "net-dup",
    "net-slow",
    "pg-kill",
    "pg-restart",
    "operator-kill",
    "store-slow",
];

/// The Mesh's lease in every run.
pub const LEASE: Duration = Duration::from_secs(4);

/// The schedule of `seed` for `scenario` (default: [`scenario_of`]). `namespaces` says
/// whether network faults are possible (a mixed run leaves them out otherwise).
pub fn schedule(seed: u64, scenario: Option<&str>, namespaces: bool) -> Result<Schedule, String> {
    let scenario = scenario.unwrap_or_else(|| scenario_of(seed)).to_string();
    if !SCENARIOS.contains(&scenario.as_str()) {
        return Err(format!(
            "no scenario {scenario}; the scenarios are {}",
            SCENARIOS.join(", ")
        ));
    }
    let mut rng = StdRng::seed_from_u64(seed);
    let agents = rng.random_range(2..=4);
    let records = rng.random_range(300_000..=450_000);
    let mut faults = Vec::new();
    if scenario == "mixed" {
        let n = rng.random_range(2..=4);
        for _ in 0..n {
            let pool: Vec<&str> = SURVIVABLE
                .iter()
                .copied()
                .filter(|k| {
                    namespaces || !matches!(*k, "partition" | "net-loss" | "net-dup" | "net-slow")
                })
                .collect();
            let kind = pool[rng.random_range(0..pool.len())];
            faults.push(Timed {
                at: ms(&mut rng, 0, 4_000),
                fault: fault(kind, &mut rng, agents, LEASE),
            });
        }
        faults.sort_by_key(|t| t.at);
        // Some agent must stay to finish the work: killing every agent for good leaves a
        // workload that waits for agents, not a fault the system can ride out.
        let mut gone = std::collections::HashSet::new();
        for t in &mut faults {
            if let Fault::AgentKill {
                agent,
                restart: restart @ None,
            } = &mut t.fault
            {
                gone.insert(*agent);
                if gone.len() == agents {
                    gone.remove(agent);
                    *restart = Some(ms(&mut rng, 500, 2 * LEASE.as_millis() as u64));
                }
            }
        }
    } else {
        faults.push(Timed {
            at: ms(&mut rng, 0, 2_000),
            fault: fault(&scenario, &mut rng, agents, LEASE),
        });
    }
    // SQLite where no fault is about Postgres, on every other seed.
    let store = if faults.iter().all(|t| !t.fault.needs_postgres()) && rng.random_bool(0.5) {
        StoreKind::Sqlite
    } else {
        StoreKind::Postgres
    };
    Ok(Schedule {
        seed,
        scenario,
        store,
        agents,
        records,
        shard_bytes: "48Ki".into(),
        faults,
    })
}

/// Schedules that once broke an invariant, kept as they were played then (the seed's schedule
/// has moved on since): CI plays them with the seeds. Their seeds are 10,000 and up.
pub fn regressions() -> Vec<Schedule> {
    let at = Duration::from_millis;
    vec![
        // Seed 0 of the mixed scenario at an earlier layout: an agent cut off just before the
        // workload finished got an Assign sent into the partition delivered 8 s late, ran it,
        // and left its attempt part under `_attempts/` after the clean-up (`ledger verify
        // --outputs`: a stray part). Fixed by HTTP/2 keepalive on the agent's stream (the
        // stream breaks in the partition, the Assign is never delivered) and by removing a
        // superseded attempt's part when its report is refused.
        Schedule {
            seed: 10_000,
            scenario: "mixed".into(),
            store: StoreKind::Postgres,
            agents: 4,
            records: 20_774,
            shard_bytes: "8Ki".into(),
            faults: vec![
                Timed {
                    at: at(200),
                    fault: Fault::PostgresKill { down: at(7_030) },
                },
                Timed {
                    at: at(4_500),
                    fault: Fault::PostgresRestart,
                },
                Timed {
                    at: at(4_600),
                    fault: Fault::Partition {
                        agent: 0,
                        hold: at(8_102),
                    },
                },
            ],
        },
        // Seed 27 (mixed): Postgres killed twice in a row. A completion's write timed out in
        // the pool while the ping after it got through, so no outage was declared: the
        // completion stayed held, the shards of the agents lost meanwhile stayed with nobody,
        // and the workload never ended (no terminal phase in 150 s). Fixed by the sweep the
        // lease reaper runs every second (`Core::sweep`).
        Schedule {
            seed: 10_001,
            scenario: "mixed".into(),
            store: StoreKind::Postgres,
            agents: 4,
            records: 331_627,
            shard_bytes: "48Ki".into(),
            faults: vec![
                Timed {
                    at: at(3_200),
                    fault: Fault::PostgresKill { down: at(5_791) },
                },
                Timed {
                    at: at(3_700),
                    fault: Fault::PostgresKill { down: at(4_280) },
                },
            ],
        },
        // Seed 83 (mixed): the operator killed and started again with `--resume` while
        // Postgres was down; it exited at once ("cannot open the store"), leaving the
        // workload without an operator. Start-up now waits for the store, a minute at most
        // (`store::patiently`), in `infermesh local` and `infermesh operator`.
        Schedule {
            seed: 10_002,
            scenario: "mixed".into(),
            store: StoreKind::Postgres,
            agents: 2,
            records: 406_145,
            shard_bytes: "48Ki".into(),
            faults: vec![
                Timed {
                    at: at(1_300),
                    fault: Fault::OperatorKill { down: at(2_461) },
                },
                Timed {
                    at: at(1_900),
                    fault: Fault::PostgresKill { down: at(3_147) },
                },
                Timed {
                    at: at(2_800),
                    fault: Fault::Partition {
                        agent: 1,
                        hold: at(8_223),
                    },
                },
                Timed {
                    at: at(3_200),
                    fault: Fault::PostgresKill { down: at(7_802) },
                },
            ],
        },
        // Seed 111 (mixed): an agent frozen past its lease finished its shard when thawed
        // and wrote the part before it saw its stream was gone; it then dropped the result
        // unreported, and the part stayed under `_attempts/` (a stray part). An agent now
        // removes the part of an attempt that finished after it was cancelled.
        Schedule {
            seed: 10_003,
            scenario: "mixed".into(),
            store: StoreKind::Sqlite,
            agents: 3,
            records: 342_112,
            shard_bytes: "48Ki".into(),
            faults: vec![
                Timed {
                    at: at(800),
                    fault: Fault::AgentFreeze {
                        agent: 0,
                        hold: at(5_438),
                    },
                },
                Timed {
                    at: at(3_600),
                    fault: Fault::Slow {
                        agent: 1,
                        kbit: 206,
                        hold: at(6_126),
                    },
                },
            ],
        },
        // Seed 161 (pg-restart): `infermesh local` exited during `pg_ctl restart`: the
        // periodic admission of held workloads ran a dispatch round that met the restarting
        // database, and its error ended the run. A store that does not answer is now left
        // to the outage handling there too.
        Schedule {
            seed: 10_004,
            scenario: "pg-restart".into(),
            store: StoreKind::Postgres,
            agents: 3,
            records: 330_367,
            shard_bytes: "48Ki".into(),
            faults: vec![Timed {
                at: at(1_600),
                fault: Fault::PostgresRestart,
            }],
        },
    ]
}

/// The fixed seeds CI plays: the first seed of every scenario (seed `i` plays scenario `i`),
/// and two mixed ones.
pub fn ci_seeds() -> Vec<u64> {
    // (and the regressions, played by `--ci` as well)
    let mut seeds: Vec<u64> = (0..SCENARIOS.len() as u64).collect();
    seeds.push(SCENARIOS.len() as u64 * 2 - 1);
    seeds
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_fixes_the_schedule() {
        for seed in 0..600 {
            let a = schedule(seed, None, true).expect("schedule");
            let b = schedule(seed, None, true).expect("schedule");
            assert_eq!(format!("{a:?}"), format!("{b:?}"));
            assert_eq!(a.scenario, scenario_of(seed));
            assert!(!a.faults.is_empty());
            assert!(a.faults.windows(2).all(|w| w[0].at <= w[1].at));
            if a.scenario != "mixed" {
                assert_eq!(a.faults[0].fault.kind(), a.scenario);
            }
            if a.faults.iter().any(|t| t.fault.needs_postgres()) {
                assert_eq!(a.store, StoreKind::Postgres);
            }
            let gone: std::collections::HashSet<usize> = a
                .faults
                .iter()
                .filter_map(|t| match t.fault {
                    Fault::AgentKill {
                        agent,
                        restart: None,
                    } => Some(agent),
                    _ => None,
                })
                .collect();
            assert!(
                gone.len() < a.agents,
                "seed {seed}: every agent killed for good"
            );
        }
        let stores: std::collections::HashSet<_> = (0..200)
            .map(|s| format!("{:?}", schedule(s, None, true).expect("schedule").store))
            .collect();
        assert_eq!(stores.len(), 2, "both stores are played");
    }

    #[test]
    fn without_namespaces_a_mix_has_no_network_fault() {
        for seed in 0..300 {
            let s = schedule(seed, Some("mixed"), false).expect("schedule");
            assert!(s.faults.iter().all(|t| !t.fault.needs_namespaces()));
        }
        assert!(schedule(1, Some("no-such"), true).is_err());
    }

    #[test]
    fn some_mixes_put_the_input_and_output_on_the_object_store() {
        let on_s3: Vec<u64> = (0..600)
            .filter(|s| scenario_of(*s) == "mixed")
            .filter(|s| schedule(*s, None, true).expect("schedule").object_store())
            .collect();
        eprintln!("mixed seeds on S3: {on_s3:?}");
        assert!(!on_s3.is_empty());
        let single = schedule(13, Some("store-slow"), false).expect("schedule");
        assert!(single.object_store());
        assert!(
            !schedule(13, Some("agent-kill"), true)
                .expect("schedule")
                .object_store()
        );
    }

    #[test]
    fn ci_seeds_cover_every_scenario() {
        let played: std::collections::HashSet<_> =
            ci_seeds().into_iter().map(scenario_of).collect();
        assert_eq!(played.len(), SCENARIOS.len());
    }
}
