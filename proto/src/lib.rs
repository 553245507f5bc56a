//! Generated types and service stubs of the infermesh agent protocol.
//!
//! One bidirectional stream per agent (`AgentService/Attach`); see
//! `proto/infermesh/v1/agent.proto` for the messages and `docs/architecture.md` for the semantics.
#![forbid(unsafe_code)]

/// `infermesh.v1`: the agent <-> operator protocol.
pub mod v1 {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("infermesh.v1");
}

pub use v1::*;

impl v1::ShardRef {
    /// A short human form, `namespace/name/uid#index@attempt`.
    pub fn display(&self) -> String {
        format!("{}#{}@{}", self.workload, self.index, self.attempt)
    }
}

impl std::fmt::Debug for v1::Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Credentials(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_assign_prints_without_its_credentials() {
        let assign = Assign {
            credentials: Some(Credentials {
                access_key_id: "AKIA-EXAMPLE".into(),
                secret_access_key: "wJalr-secret".into(),
                session_token: "tok-secret".into(),
                region: String::new(),
                bearer_token: "bearer-secret".into(),
            }),
            ..Default::default()
        };
        let shown = format!("{assign:?} {assign:#?}");
        for secret in [
            "AKIA-EXAMPLE",
            "wJalr-secret",
            "tok-secret",
            "bearer-secret",
        ] {
            assert!(!shown.contains(secret), "{shown}");
        }
        assert!(shown.contains("<redacted>"), "{shown}");
    }
}
