//! What the operator and the agents share of the data plane: objects named by URI
//! (`file://`, `s3://`, `http(s)://`, through `object_store`) and the record-alignment rule that
//! lets the planner cut an input into byte ranges knowing only its size.
#![forbid(unsafe_code)]

pub mod shard;
pub mod store;

pub use store::{Location, ObjectError, read_aligned};
