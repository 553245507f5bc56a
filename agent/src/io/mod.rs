//! Reading inputs and models, writing outputs.

pub mod cache;

pub use infermesh_io::{shard, store};
