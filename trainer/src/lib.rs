//! `olmo-train`: the OLMo trainer (work in progress). What exists so far: the data order
//! (NumPy's PCG64 permutation, bit-identical to OLMo's), OLMo's learning-rate schedules, AdamW
//! and gradient clipping, and CPU reference kernels (LayerNorm, Linear, SwiGLU, RoPE, cross-entropy
//! with z-loss, causal attention) whose backward passes are checked against finite differences,
//! and the OLMo-1 decoder's forward/backward over a flat parameter buffer, checked end to end.

pub mod data;
pub mod model;
pub mod ops;
pub mod optim;
pub mod permutation;
pub mod schedule;
pub mod train;
