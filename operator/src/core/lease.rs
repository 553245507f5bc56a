//! Leases: an agent holds its assignments while it heartbeats. One that has been silent for
//! longer than the lease loses them (they go back to the queue with attempt + 1).

use std::time::{Duration, Instant};

/// The agents among `(id, last heartbeat)` whose lease ran out at `now`.
pub fn expired<'a>(
    now: Instant,
    lease: Duration,
    agents: impl IntoIterator<Item = (&'a str, Instant)>,
) -> Vec<&'a str> {
    agents
        .into_iter()
        .filter(|(_, last)| now.saturating_duration_since(*last) > lease)
        .map(|(id, _)| id)
        .collect()
}

/// What happens to a shard taken from an agent after attempt `attempt`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Requeue {
    /// Back to the queue; its next attempt is `next`.
    Retry {
        /// The next attempt number.
        next: u32,
    },
    /// Out of attempts: the shard, and its workload, fail.
    Exhausted,
}

/// Decides a shard's fate after its `attempt`-th attempt was lost or failed retryably.
pub fn requeue(attempt: u32, max_attempts: u32) -> Requeue {
    if attempt >= max_attempts {
        Requeue::Exhausted
    } else {
        Requeue::Retry { next: attempt + 1 }
    }
}

/// The longest wait between a shard's failed attempt and its next one.
pub const MAX_BACKOFF: Duration = Duration::from_secs(300);

/// How long a shard waits after its `failed`-th attempt (since its workload's last retry)
/// failed, for a workload whose `spec.retryBackoffSeconds` is `base_seconds`:
/// `base × 2^(failed-1)`, at most [`MAX_BACKOFF`]; zero when `base_seconds` is 0.
pub fn backoff(base_seconds: u32, failed: u32) -> Duration {
    let doublings = failed.saturating_sub(1).min(31);
    let seconds = u64::from(base_seconds).saturating_mul(1u64 << doublings);
    Duration::from_secs(seconds).min(MAX_BACKOFF)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_agent_silent_past_its_lease_expires() {
        let t0 = Instant::now();
        let lease = Duration::from_secs(10);
        let agents = [("fresh", t0 + Duration::from_secs(5)), ("stale", t0)];
        assert_eq!(
            expired(t0 + Duration::from_secs(11), lease, agents),
            ["stale"]
        );
        assert!(expired(t0 + Duration::from_secs(10), lease, agents).is_empty());
    }

    #[test]
    fn requeue_counts_attempts_up_to_the_maximum() {
        assert_eq!(requeue(1, 3), Requeue::Retry { next: 2 });
        assert_eq!(requeue(2, 3), Requeue::Retry { next: 3 });
        assert_eq!(requeue(3, 3), Requeue::Exhausted);
        assert_eq!(requeue(1, 1), Requeue::Exhausted);
    }

    #[test]
    fn backoff_doubles_per_failed_attempt_up_to_five_minutes() {
        let secs = |failed| backoff(2, failed).as_secs();
        assert_eq!([secs(1), secs(2), secs(3), secs(4)], [2, 4, 8, 16]);
        assert_eq!(secs(0), 2, "a first failure waits the base");
        assert_eq!(secs(9), 300, "capped");
        assert_eq!(backoff(2, u32::MAX), MAX_BACKOFF, "no overflow");
        assert_eq!(backoff(300, 2), MAX_BACKOFF);
        assert_eq!(backoff(0, 5), Duration::ZERO, "0: no wait");
    }
}
