//! Kubernetes-style conditions (`type`, `status`, `reason`, `message`, `observedGeneration`).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

/// A condition. `lastTransitionTime` is kept from `previous` when the status did not change,
/// so re-applying the same condition does not move it.
pub fn condition(
    previous: &[Condition],
    type_: &str,
    ok: bool,
    reason: &str,
    message: impl Into<String>,
    generation: Option<i64>,
) -> Condition {
    let status = if ok { "True" } else { "False" };
    let last_transition_time = previous
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or_else(|| Time(Timestamp::now()));
    Condition {
        type_: type_.into(),
        status: status.into(),
        reason: reason.into(),
        message: message.into(),
        observed_generation: generation,
        last_transition_time,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transition_time_moves_only_when_the_status_changes() {
        let first = condition(&[], "Ready", false, "NoAgentsReady", "none", Some(1));
        let same = condition(
            std::slice::from_ref(&first),
            "Ready",
            false,
            "NoAgentsReady",
            "still none",
            Some(2),
        );
        assert_eq!(same.last_transition_time, first.last_transition_time);
        assert_eq!(same.message, "still none");
        assert_eq!(same.observed_generation, Some(2));
        std::thread::sleep(std::time::Duration::from_millis(2));
        let flipped = condition(
            std::slice::from_ref(&first),
            "Ready",
            true,
            "AgentsReady",
            "1",
            Some(2),
        );
        assert_eq!(flipped.status, "True");
        assert_ne!(flipped.last_transition_time, first.last_transition_time);
    }
}
