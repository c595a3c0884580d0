//! The `dolma` pipeline: Dolma-format I/O, configs, the parallel runner and the stages.

pub mod bloom;
pub mod config;
pub mod dedupe;
pub mod io;
pub mod mix;
#[cfg(feature = "parquet")]
pub mod parquet_input;
pub mod runner;
pub mod selector;
pub mod stat;
pub mod tag;
pub mod tokenize;
