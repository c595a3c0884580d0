//! `olmo-train`: the OLMo trainer (work in progress). What exists so far: the data order
//! (NumPy's PCG64 permutation, bit-identical to OLMo's), OLMo's learning-rate schedules, AdamW
//! and gradient clipping.

pub mod data;
pub mod optim;
pub mod permutation;
pub mod schedule;
