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
}
