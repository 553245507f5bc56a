//! The infermesh agent: attaches to the operator over gRPC, runs assigned shards on ONNX
//! Runtime, writes one output part per shard and reports back.
#![forbid(unsafe_code)]

pub mod capabilities;
pub mod client;
pub mod endpoint;
pub mod inference;
pub mod io;
pub mod logging;
pub mod metrics;
pub mod metrics_server;
pub mod runner;
pub mod token;
