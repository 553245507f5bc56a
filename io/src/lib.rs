//! What the operator and the agents share of the data plane: objects named by URI
//! (`file://`, `s3://`, `http(s)://`, through `object_store`) and the record-alignment rule that
//! lets the planner cut an input into byte ranges knowing only its size.
#![forbid(unsafe_code)]

pub mod access;
pub mod columnar;
pub mod dataset;
pub mod decode;
mod ops;
pub mod shard;
pub mod store;

pub use access::{Credentials, Grant, Use};
pub use dataset::{Compression, DataFile, Dataset, Format, Piece};
pub use store::{Location, ObjectError, read_aligned};

/// Where infermesh keeps what it downloads and makes on a machine: `$INFERMESH_HOME`, else
/// `$XDG_CACHE_HOME/infermesh`, else `~/.cache/infermesh` (where `scripts/setup.sh` puts the
/// ONNX Runtime library and the quickstart model).
pub fn infermesh_home() -> std::path::PathBuf {
    use std::path::PathBuf;
    if let Some(home) = std::env::var_os("INFERMESH_HOME") {
        return PathBuf::from(home);
    }
    if let Some(cache) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(cache).join("infermesh");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp"));
    home.join(".cache").join("infermesh")
}
