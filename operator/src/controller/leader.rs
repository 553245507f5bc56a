//! Leader election with a `coordination.k8s.io` Lease: only the leader reconciles and
//! serves agents. The leader renews every third of the lease; a standby takes over once the
//! lease has gone unrenewed for its whole duration, and resumes from the store. A leader
//! that cannot renew in time stops (the pod restarts as a standby), so two leaders never act
//! at once for longer than the clock skew between them.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, ObjectMeta, PostParams};

/// What a replica should do with the Lease as it finds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Nobody holds it, or the holder let it expire: take it.
    Acquire,
    /// We hold it: renew it.
    Renew,
    /// Someone else holds it until it expires.
    Follow {
        /// The holder.
        holder: String,
    },
}

/// The pure rule of the election.
pub fn decide(spec: Option<&LeaseSpec>, me: &str, now: Timestamp) -> Decision {
    let Some(spec) = spec else {
        return Decision::Acquire;
    };
    let holder = spec.holder_identity.clone().unwrap_or_default();
    if holder == me {
        return Decision::Renew;
    }
    if holder.is_empty() {
        return Decision::Acquire;
    }
    let duration = SignedDuration::from_secs(i64::from(spec.lease_duration_seconds.unwrap_or(15)));
    let renewed = spec
        .renew_time
        .as_ref()
        .or(spec.acquire_time.as_ref())
        .map(|t| t.0);
    match renewed {
        Some(at) if at.checked_add(duration).is_ok_and(|end| end > now) => {
            Decision::Follow { holder }
        }
        _ => Decision::Acquire,
    }
}

/// One replica's side of the election.
pub struct LeaderElector {
    api: Api<Lease>,
    name: String,
    identity: String,
    duration: Duration,
}

impl LeaderElector {
    /// Competes for Lease `name` in `api`'s namespace as `identity`.
    pub fn new(api: Api<Lease>, name: &str, identity: &str, duration: Duration) -> Self {
        Self {
            api,
            name: name.into(),
            identity: identity.into(),
            duration,
        }
    }

    /// How often the leader renews.
    pub fn renew_every(&self) -> Duration {
        self.duration / 3
    }

    /// The lease duration.
    pub fn duration(&self) -> Duration {
        self.duration
    }

    fn spec(&self, previous: Option<&LeaseSpec>, now: Timestamp) -> LeaseSpec {
        let ours =
            previous.and_then(|p| p.holder_identity.as_deref()) == Some(self.identity.as_str());
        let transitions = previous.and_then(|p| p.lease_transitions).unwrap_or(0);
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(self.duration.as_secs() as i32),
            acquire_time: if ours {
                previous.and_then(|p| p.acquire_time.clone())
            } else {
                Some(MicroTime(now))
            },
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(if ours || previous.is_none() {
                transitions
            } else {
                transitions + 1
            }),
            ..LeaseSpec::default()
        }
    }

    /// Takes or renews the Lease if the rule allows. `Ok(true)` while we lead. A lost race
    /// (409 on create or replace) is `Ok(false)`.
    pub async fn try_lead(&self) -> Result<bool, kube::Error> {
        let now = Timestamp::now();
        let current = self.api.get_opt(&self.name).await?;
        let Some(current) = current else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(self.spec(None, now)),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(e) if super::is_conflict(&e) => Ok(false),
                Err(e) => Err(e),
            };
        };
        match decide(current.spec.as_ref(), &self.identity, now) {
            Decision::Follow { .. } => Ok(false),
            Decision::Acquire | Decision::Renew => {
                let mut lease = current.clone();
                lease.spec = Some(self.spec(current.spec.as_ref(), now));
                // The resourceVersion we read makes this a compare-and-swap.
                match self
                    .api
                    .replace(&self.name, &PostParams::default(), &lease)
                    .await
                {
                    Ok(_) => Ok(true),
                    Err(e) if super::is_conflict(&e) => Ok(false),
                    Err(e) => Err(e),
                }
            }
        }
    }

    /// Waits until this replica leads, trying every `renew_every`.
    pub async fn acquire(&self) {
        loop {
            match self.try_lead().await {
                Ok(true) => return,
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(error = %e, lease = %self.name, "cannot read or write the leader Lease")
                }
            }
            tokio::time::sleep(self.renew_every()).await;
        }
    }

    /// Renews until a renewal fails for longer than the lease; then returns (the caller
    /// stops leading).
    pub async fn hold(&self) {
        let mut last_ok = std::time::Instant::now();
        loop {
            tokio::time::sleep(self.renew_every()).await;
            match self.try_lead().await {
                Ok(true) => last_ok = std::time::Instant::now(),
                Ok(false) => {
                    tracing::error!(lease = %self.name, "another replica holds the leader Lease");
                    return;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot renew the leader Lease");
                    // Stop before the lease could expire and a standby take over.
                    if last_ok.elapsed() + self.renew_every() >= self.duration {
                        return;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(holder: &str, renewed_secs_ago: i64) -> LeaseSpec {
        let t = Timestamp::now()
            .checked_sub(SignedDuration::from_secs(renewed_secs_ago))
            .expect("time");
        LeaseSpec {
            holder_identity: Some(holder.into()),
            lease_duration_seconds: Some(15),
            renew_time: Some(MicroTime(t)),
            acquire_time: Some(MicroTime(t)),
            ..LeaseSpec::default()
        }
    }

    #[test]
    fn a_missing_or_expired_lease_is_acquired() {
        let now = Timestamp::now();
        assert_eq!(decide(None, "a", now), Decision::Acquire);
        assert_eq!(decide(Some(&held("b", 16)), "a", now), Decision::Acquire);
        assert_eq!(
            decide(Some(&LeaseSpec::default()), "a", now),
            Decision::Acquire
        );
    }

    #[test]
    fn a_live_lease_of_another_is_followed_and_ours_is_renewed() {
        let now = Timestamp::now();
        assert_eq!(
            decide(Some(&held("b", 5)), "a", now),
            Decision::Follow { holder: "b".into() }
        );
        assert_eq!(decide(Some(&held("a", 5)), "a", now), Decision::Renew);
        assert_eq!(decide(Some(&held("a", 60)), "a", now), Decision::Renew);
    }
}
