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
