//! infermesh: the operator core, its gRPC server, the store, and `infermesh local`.
#![forbid(unsafe_code)]

pub mod core;
pub mod grpc;
pub mod local;
pub mod store;
