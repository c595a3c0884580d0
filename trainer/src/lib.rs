//! `olmo-train`: the OLMo trainer (work in progress). What exists so far is the data order:
//! NumPy's PCG64 permutation, bit-identical to OLMo's.

pub mod data;
pub mod permutation;
