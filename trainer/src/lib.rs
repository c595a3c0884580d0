//! `olmo-train`: the OLMo trainer (work in progress). What exists so far: the data order
//! (NumPy's PCG64 permutation, bit-identical to OLMo's) and OLMo's learning-rate schedules.

pub mod data;
pub mod permutation;
pub mod schedule;
