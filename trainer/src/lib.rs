//! `olmo-train`: an OLMo-architecture trainer on its own compute engine (explicit forward and
//! backward passes, CPU kernels on `gemm` + rayon), reading dolma token shards in OLMo's exact
//! data order.

pub mod backend;
pub mod checkpoint;
pub mod config;
pub mod cublaslt;
pub mod cuda;
pub mod cuda_host;
pub mod data;
pub mod data_indices;
pub mod dcp;
pub mod device;
pub mod dist;
pub mod eval;
pub mod export;
pub mod gemm_plan;
pub mod gpu;
pub mod gpu_check;
pub mod import;
pub mod instance_filter;
pub mod interpolation;
pub mod memory_plan;
pub mod model;
pub mod olmo_checkpoint;
pub mod ops;
pub mod optim;
pub mod permutation;
pub mod pickle;
pub mod plot;
pub mod schedule;
pub mod speed;
pub mod start;
pub mod stop;
pub mod torch_file;
pub mod train;
pub mod xorshift;
