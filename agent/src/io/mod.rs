//! Reading inputs and models, writing outputs.

pub mod cache;
pub mod parts;

pub use infermesh_io::{shard, store};
