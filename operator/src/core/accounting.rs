//! The rules for what an agent reports, as pure functions: whether a report comes from the
//! holder of the shard's current attempt, whether its numbers are ones an honest agent could
//! send, and what a completed shard costs. Agents are untrusted: nothing here takes an
//! agent's word for anything the operator can measure or check itself.

use std::time::Duration;

use tonic::Code;

use super::pricing::Price;

/// Why a report was refused: the gRPC code, a short machine-readable reason, and a message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// The gRPC status code that says why.
    pub code: Code,
    /// `unknown_shard`, `not_holder`, `stale_attempt`, `duplicate`, `invalid_report` or
    /// `output_mismatch`.
    pub reason: &'static str,
    /// For people.
    pub message: String,
}

impl Refusal {
    fn new(code: Code, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            reason,
            message: message.into(),
        }
    }

    /// No such workload or shard.
    pub fn unknown(message: impl Into<String>) -> Self {
        Self::new(Code::NotFound, "unknown_shard", message)
    }

    /// A value no honest agent sends.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(Code::InvalidArgument, "invalid_report", message)
    }

    /// The output part is not what the report says.
    pub fn mismatch(message: impl Into<String>) -> Self {
        Self::new(Code::DataLoss, "output_mismatch", message)
    }
}

/// Where a shard stands, as far as judging a report goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Standing<'a> {
    /// Waiting in the queue (never assigned, or requeued).
    Pending,
    /// Running attempt `attempt` on `agent`.
    Running {
        /// The holder.
        agent: &'a str,
    },
    /// Its completion is being checked and committed.
    Committing {
        /// The holder whose report is being committed.
        agent: &'a str,
    },
    /// Done.
    Succeeded,
    /// Failed for good.
    Failed,
}

/// Whether a report of attempt `reported` from agent `from` may change a shard whose
/// current attempt is `current` and which stands as `standing`. Only the holder of the
/// current, running attempt may report it.
pub fn judge_holder(
    standing: Standing<'_>,
    current: u32,
    from: &str,
    reported: u32,
) -> Result<(), Refusal> {
    let duplicate = |message: String| Err(Refusal::new(Code::AlreadyExists, "duplicate", message));
    match standing {
        Standing::Running { agent } if agent == from && reported == current => Ok(()),
        Standing::Succeeded => duplicate("the shard is already done".into()),
        Standing::Committing { agent } if agent == from && reported == current => duplicate(
            format!("attempt {reported} was already reported; the shard is done"),
        ),
        // An older attempt: one this agent held before, or any earlier one of the shard.
        _ if reported < current
            && (reported > 0
                || matches!(standing, Standing::Running { agent } if agent == from)) =>
        {
            Err(Refusal::new(
                Code::FailedPrecondition,
                "stale_attempt",
                format!(
                    "attempt {reported} is stale: the shard is at attempt {current} (its lease \
                     expired or it was requeued); the report of an old attempt is never committed"
                ),
            ))
        }
        _ => Err(Refusal::new(
            Code::PermissionDenied,
            "not_holder",
            format!("this agent does not hold attempt {reported} of the shard"),
        )),
    }
}

/// The most records a shard of byte range `[start, end)` can hold: a shard owns the records
/// that start in `[start, end]` (see `infermesh_io::shard`), each at a distinct byte.
pub fn max_records(start: u64, end: u64) -> u64 {
    end.saturating_sub(start).saturating_add(1)
}

/// The most compute seconds a completion may claim beyond what the operator measured (clock
/// granularity and the time the report spent on the wire).
pub const CLAIM_SLACK: Duration = Duration::from_secs(60);

/// The checks of a `Completed` report's numbers that need no I/O. `elapsed` is the time the
/// operator measured since it sent the assignment.
pub fn check_completed_numbers(
    compute_seconds: f64,
    records: u64,
    max_records: u64,
    sha256: &str,
    elapsed: Duration,
) -> Result<(), Refusal> {
    if !compute_seconds.is_finite() || compute_seconds < 0.0 {
        return Err(Refusal::invalid(format!(
            "compute_seconds {compute_seconds} is not a finite, non-negative number"
        )));
    }
    if compute_seconds > (elapsed + CLAIM_SLACK).as_secs_f64() {
        return Err(Refusal::invalid(format!(
            "compute_seconds {compute_seconds} exceeds the {:.3}s since the shard was assigned",
            elapsed.as_secs_f64()
        )));
    }
    if records > max_records {
        return Err(Refusal::invalid(format!(
            "{records} records cannot come from a shard of {max_records} bytes"
        )));
    }
    if sha256.len() != 64 || !sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(Refusal::invalid(
            "sha256 is not 64 hexadecimal digits".to_string(),
        ));
    }
    Ok(())
}

/// The device class a shard is charged at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    /// A GPU execution provider.
    Gpu,
    /// The CPU.
    Cpu,
}

impl Device {
    /// The device an agent registered: a GPU only when it offered a GPU execution provider
    /// and reported at least one GPU.
    pub fn registered(providers: &[String], gpus: usize) -> Self {
        let gpu_provider = providers
            .iter()
            .any(|p| matches!(p.as_str(), "cuda" | "tensorrt" | "rocm" | "migraphx"));
        if gpu_provider && gpus > 0 {
            Self::Gpu
        } else {
            Self::Cpu
        }
    }

    /// The device charged: the registered one, lowered to the CPU when the agent says it ran
    /// there (an agent may lower its price, never raise it).
    pub fn charged(self, reported: &str) -> Self {
        if reported == "cpu" { Self::Cpu } else { self }
    }

    /// The name in events and memos.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Gpu => "gpu",
            Self::Cpu => "cpu",
        }
    }
}

/// The price would not fit in the ledger.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the charge overflows the ledger's range")]
pub struct Overflow;

/// The seconds charged: what the operator measured, lowered (never raised) by what the agent
/// reported.
pub fn charged_time(measured: Duration, reported_seconds: f64) -> Duration {
    if reported_seconds.is_finite() && reported_seconds >= 0.0 {
        measured.min(Duration::from_secs_f64(
            reported_seconds.min(measured.as_secs_f64()),
        ))
    } else {
        measured
    }
}

/// What a shard costs in micro-credits: `time` at the device's rate plus `records` at the
/// per-record rate, in checked integer arithmetic.
pub fn charge(
    price: &Price,
    device: Device,
    time: Duration,
    records: u64,
) -> Result<i64, Overflow> {
    let rate = match device {
        Device::Gpu => price.per_gpu_second,
        Device::Cpu => price.per_cpu_second,
    };
    // micro-credits per second x microseconds / 1e6, rounded half up.
    let time_part = i128::from(rate)
        .checked_mul(i128::try_from(time.as_micros()).map_err(|_| Overflow)?)
        .ok_or(Overflow)?
        .checked_add(500_000)
        .ok_or(Overflow)?
        / 1_000_000;
    let record_part = i128::from(price.per_thousand_records)
        .checked_mul(i128::from(records))
        .ok_or(Overflow)?
        .checked_add(500)
        .ok_or(Overflow)?
        / 1000;
    i64::try_from(time_part.checked_add(record_part).ok_or(Overflow)?).map_err(|_| Overflow)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn price() -> Price {
        Price {
            per_gpu_second: 1_000_000,
            per_cpu_second: 50_000,
            per_thousand_records: 200_000,
        }
    }

    #[test]
    fn only_the_holder_of_the_current_attempt_may_report() {
        let running = Standing::Running { agent: "a" };
        let committing = Standing::Committing { agent: "a" };
        assert_eq!(judge_holder(running, 2, "a", 2), Ok(()));
        // (standing, current attempt, sender, reported attempt, expected code and reason)
        let refused = [
            (running, 2, "b", 2, Code::PermissionDenied, "not_holder"),
            (running, 2, "b", 7, Code::PermissionDenied, "not_holder"),
            (
                running,
                2,
                "a",
                1,
                Code::FailedPrecondition,
                "stale_attempt",
            ),
            (running, 2, "a", 3, Code::PermissionDenied, "not_holder"),
            (
                Standing::Pending,
                0,
                "a",
                0,
                Code::PermissionDenied,
                "not_holder",
            ),
            (
                Standing::Pending,
                2,
                "a",
                1,
                Code::FailedPrecondition,
                "stale_attempt",
            ),
            (
                Standing::Succeeded,
                1,
                "a",
                1,
                Code::AlreadyExists,
                "duplicate",
            ),
            (
                Standing::Succeeded,
                1,
                "b",
                1,
                Code::AlreadyExists,
                "duplicate",
            ),
            (committing, 1, "a", 1, Code::AlreadyExists, "duplicate"),
            (committing, 1, "b", 1, Code::PermissionDenied, "not_holder"),
            (
                Standing::Failed,
                3,
                "a",
                3,
                Code::PermissionDenied,
                "not_holder",
            ),
        ];
        for (standing, current, from, reported, code, reason) in refused {
            let r = judge_holder(standing, current, from, reported).expect_err("refused");
            assert_eq!(
                (r.code, r.reason),
                (code, reason),
                "{standing:?} at {current}, attempt {reported} from {from}"
            );
        }
    }

    #[test]
    fn numbers_no_honest_agent_sends_are_refused() {
        let sha = "a".repeat(64);
        let t = Duration::from_secs(10);
        assert!(check_completed_numbers(9.0, 10, 100, &sha, t).is_ok());
        for bad in [f64::NAN, f64::INFINITY, -1.0, 1e9] {
            let r = check_completed_numbers(bad, 10, 100, &sha, t).unwrap_err();
            assert_eq!(
                (r.code, r.reason),
                (Code::InvalidArgument, "invalid_report"),
                "{bad}"
            );
        }
        assert!(check_completed_numbers(1.0, 101, 100, &sha, t).is_err());
        assert!(check_completed_numbers(1.0, u64::MAX, 100, &sha, t).is_err());
        assert!(check_completed_numbers(1.0, 1, 100, "made-up", t).is_err());
        assert!(check_completed_numbers(1.0, 1, 100, &"g".repeat(64), t).is_err());
    }

    #[test]
    fn the_operator_clock_bounds_the_time_charged() {
        let measured = Duration::from_secs(3);
        assert_eq!(charged_time(measured, 1.5), Duration::from_millis(1500));
        assert_eq!(
            charged_time(measured, 1e9),
            measured,
            "an agent cannot raise it"
        );
        assert_eq!(charged_time(measured, f64::NAN), measured);
        assert_eq!(charged_time(measured, -4.0), measured);
    }

    #[test]
    fn the_registered_device_sets_the_rate_and_a_report_may_only_lower_it() {
        let cpu_only = Device::registered(&["cpu".into()], 0);
        assert_eq!(
            cpu_only.charged("cuda"),
            Device::Cpu,
            "claiming a GPU raises nothing"
        );
        let gpu = Device::registered(&["cuda".into(), "cpu".into()], 1);
        assert_eq!(gpu.charged("cuda"), Device::Gpu);
        assert_eq!(gpu.charged("cpu"), Device::Cpu);
        assert_eq!(
            Device::registered(&["cuda".into()], 0),
            Device::Cpu,
            "no GPU, no GPU rate"
        );
        let p = price();
        assert_eq!(
            charge(&p, Device::Cpu, Duration::from_secs(2), 0),
            Ok(100_000)
        );
        assert_eq!(
            charge(&p, Device::Gpu, Duration::from_millis(500), 0),
            Ok(500_000)
        );
        assert_eq!(charge(&p, Device::Cpu, Duration::ZERO, 1500), Ok(300_000));
    }

    #[test]
    fn overflow_is_an_error_not_a_negative_charge() {
        let p = Price {
            per_gpu_second: i64::MAX,
            per_cpu_second: i64::MAX,
            per_thousand_records: i64::MAX,
        };
        assert_eq!(
            charge(&p, Device::Gpu, Duration::from_secs(10), 0),
            Err(Overflow)
        );
        assert_eq!(
            charge(&p, Device::Cpu, Duration::ZERO, u64::MAX),
            Err(Overflow)
        );
    }

    proptest! {
        #[test]
        fn charges_are_never_negative_and_grow_with_time_and_records(
            micros in 0u64..10_000_000_000, records in 0u64..10_000_000, more in 0u64..1_000_000,
        ) {
            let p = price();
            let t = Duration::from_micros(micros);
            let a = charge(&p, Device::Gpu, t, records).expect("fits");
            let b = charge(&p, Device::Gpu, t + Duration::from_micros(more), records + more).expect("fits");
            prop_assert!(a >= 0);
            prop_assert!(b >= a);
        }
    }
}
