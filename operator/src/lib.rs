//! infermesh: the operator core, its gRPC server, the store, and `infermesh local`.
#![forbid(unsafe_code)]

pub mod cli;
pub mod console;
pub mod controller;
pub mod core;
pub mod grpc;
pub mod http;
pub mod kube_cli;
pub mod local;
pub mod metrics;
pub mod store;
