//! What a run takes of a GPU's memory, known before it starts and without a GPU: the CUDA
//! engine on a memory planner ([`Gpu::memory_planner`]: buffers as sizes, nothing launched)
//! runs a training micro-batch's forward and backward pass, or an evaluation batch's forward
//! pass, allocating and freeing as it would on the GPU; the planner's high-water mark is the
//! step's peak in the GPU's memory pool (the stand-in driver test checks the two agree).

use anyhow::Result;

use crate::backend::Backend;
use crate::cuda::CudaEngine;
use crate::gpu::Gpu;
use crate::model::{Batch, Checkpointing, Model, ModelConfig};

/// How the run computes: what decides its buffers besides the model and the batch.
#[derive(Debug, Clone, Copy)]
pub struct Setup {
    /// bf16 mixed precision (else fp32).
    pub bf16: bool,
    /// The flash kernels (where they can run: bf16 and their head sizes), else the
    /// materialised attention.
    pub flash: bool,
    /// Optimizer moments kept: 2 for AdamW, 1 for LionW.
    pub moments: usize,
    /// Attention within documents (the documents' starts go to the GPU with each batch).
    pub documents: bool,
    pub checkpointing: Checkpointing,
}

impl Setup {
    /// As a training run of `cfg` computes.
    pub fn of_run(cfg: &crate::config::TrainConfig) -> Result<Setup> {
        Ok(Setup {
            bf16: cfg.bf16()?,
            flash: cfg.model.flash_attention,
            // LionW keeps one moment (no exp_avg_sq)
            moments: if cfg.optimizer.name == "lionw" { 1 } else { 2 },
            documents: cfg.data.generate_doc_lengths,
            checkpointing: cfg.activation_checkpointing,
        })
    }
}

/// Bytes of GPU memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    /// What the run holds throughout: weights, gradients, optimizer moments, the bf16 weight
    /// copy and the RoPE tables.
    pub state: u64,
    /// The most held at once during the pass, state included.
    pub peak: u64,
}

/// The engine a run with `setup` builds, on a memory planner; whether it runs the flash
/// kernels.
fn engine(cfg: ModelConfig, seq: usize, setup: &Setup) -> Result<(CudaEngine, bool)> {
    let model = Model::new(cfg, seq).with_checkpointing(setup.checkpointing);
    let mut e = CudaEngine::planned(model, setup.moments, setup.bf16)?;
    // as a run does: the materialised attention where the flash kernels cannot run
    let flash = setup.flash && e.set_flash_attention(true).is_ok();
    Ok((e, flash))
}

/// A batch of `b` sequences of `seq` positions. Only the number of distinct tokens matters
/// to the sizes (the embedding gradient groups positions by token): as many as can be.
fn run_batch(e: &mut CudaEngine, b: usize, seq: usize, setup: &Setup, train: bool) -> Result<()> {
    let vocab = e.vocab_size() as u32;
    let tokens: Vec<u32> = (0..(b * seq) as u32).map(|i| i % vocab).collect();
    let starts = vec![0u32; b * seq];
    let batch = Batch {
        inputs: &tokens,
        targets: &tokens,
        b,
        t: seq,
        doc_starts: setup.documents.then_some(starts.as_slice()),
    };
    match train {
        true => e.forward_backward(&batch, 1.0).map(drop),
        false => e.forward(&batch).map(drop),
    }
}

/// A training micro-batch of `micro` sequences of `seq` positions: its forward and backward
/// pass (the optimizer step allocates nothing more).
pub fn training(cfg: ModelConfig, seq: usize, micro: usize, setup: &Setup) -> Result<Plan> {
    let (mut e, _) = engine(cfg, seq, setup)?;
    pass(&mut e, micro, seq, setup, true)
}

/// An evaluation batch of `b` sequences during a training run (the engine holds its
/// optimizer moments): its forward pass.
pub fn evaluation(cfg: ModelConfig, seq: usize, b: usize, setup: &Setup) -> Result<Plan> {
    let (mut e, _) = engine(cfg, seq, setup)?;
    pass(&mut e, b, seq, setup, false)
}

/// Whether a run with `setup` runs the flash kernels.
pub fn runs_flash(cfg: ModelConfig, seq: usize, setup: &Setup) -> Result<bool> {
    Ok(engine(cfg, seq, setup)?.1)
}

fn pass(e: &mut CudaEngine, b: usize, seq: usize, setup: &Setup, train: bool) -> Result<Plan> {
    let state = peak(&e.gpu)?;
    e.gpu.reset_peak_memory()?;
    run_batch(e, b, seq, setup, train)?;
    Ok(Plan {
        state,
        peak: peak(&e.gpu)?,
    })
}

fn peak(gpu: &Gpu) -> Result<u64> {
    Ok(gpu.peak_memory()?.unwrap_or(0))
}

/// Bytes in GiB, or MiB or KiB below one of the larger, for tables.
pub fn gib(bytes: u64) -> String {
    let b = bytes as f64;
    match bytes {
        n if n >= 1 << 30 => format!("{:.1} GiB", b / (1u64 << 30) as f64),
        n if n >= 1 << 20 => format!("{:.1} MiB", b / (1u64 << 20) as f64),
        _ => format!("{:.1} KiB", b / 1024.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shipped OLMo-1B config's model.
    fn olmo_1b() -> ModelConfig {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/OLMo-1B.yaml");
        let (cfg, _) = crate::config::TrainConfig::load(&path).unwrap();
        cfg.model_config().unwrap().0
    }

    const FLASH: Setup = Setup {
        bf16: true,
        flash: true,
        moments: 2,
        documents: false,
        checkpointing: Checkpointing::Off,
    };

    #[test]
    fn the_state_is_weights_gradients_moments_and_the_bf16_copy() {
        let cfg = olmo_1b();
        let n = cfg.num_params() as u64;
        let plan = training(cfg, 2048, 1, &FLASH).unwrap();
        // f32 weights, gradients, 2 moments; the bf16 copy; small tables on top
        let tables = plan.state - 18 * n;
        assert!(tables < 4 << 20, "{} bytes past 18 per parameter", tables);
        let lion = training(
            cfg,
            2048,
            1,
            &Setup {
                moments: 1,
                ..FLASH
            },
        )
        .unwrap();
        assert_eq!(plan.state - lion.state, 4 * n);
        let fp32 = training(
            cfg,
            2048,
            1,
            &Setup {
                bf16: false,
                ..FLASH
            },
        )
        .unwrap();
        assert_eq!(plan.state - fp32.state, 2 * n);
    }

    #[test]
    fn activations_grow_with_the_batch_and_shrink_with_checkpointing_and_flash() {
        let cfg = olmo_1b();
        let act = |micro, setup: &Setup| {
            let p = training(cfg, 2048, micro, setup).unwrap();
            p.peak - p.state
        };
        let (one, eight) = (act(1, &FLASH), act(8, &FLASH));
        // the blocks' activations grow with the batch, the logits only up to a chunk's rows
        assert!(eight > 6 * one && eight < 8 * one, "{one} vs {eight}");
        let whole = Setup {
            checkpointing: Checkpointing::WholeLayer,
            ..FLASH
        };
        let half = Setup {
            checkpointing: Checkpointing::OneIn(2),
            ..FLASH
        };
        let (w, h) = (act(8, &whole), act(8, &half));
        assert!(w < h && h < eight, "{w} < {h} < {eight}");
        // OLMo-1B at 8 x 2048: about 91 KB a token in each of 16 blocks kept, 8 KB of it
        // their input, and a chunk of the f32 logits with their bf16 gradient
        let tokens = 8 * 2048u64;
        let rows = crate::cuda::head_chunk_rows(tokens as usize, 50304) as u64;
        assert_eq!(rows, 4096);
        let logits = rows * 50304 * 6;
        let per_token_block = (eight - logits) as f64 / (tokens * 16) as f64;
        assert!(
            (80e3..100e3).contains(&per_token_block),
            "{per_token_block}"
        );
        assert!(w < eight / 3, "{w} vs {eight}");
        // the materialised attention keeps each head's T x T probabilities (bf16)
        let mat = act(
            8,
            &Setup {
                flash: false,
                ..FLASH
            },
        );
        let probs = 16 * 16 * tokens * 2048 * 2;
        assert!(mat > eight + probs - probs / 100, "{mat} vs {eight}");
        // fine_grained keeps no block's attention probabilities or output: the backward pass
        // computes them again a block at a time. Under flash that saves the output and the
        // log-sum-exp of all 16 blocks (the peak comes before the backward pass).
        let fine = |flash| Setup {
            checkpointing: Checkpointing::FineGrained,
            flash,
            ..FLASH
        };
        let (fine_mat, fine_flash) = (act(8, &fine(false)), act(8, &fine(true)));
        let att = tokens * 2048 * 2;
        let lse = 16 * tokens * 4;
        assert!(
            fine_mat + 14 * (probs / 16 + att) < mat && fine_mat > eight,
            "{fine_mat} vs {mat}"
        );
        assert_eq!(
            eight - fine_flash,
            16 * (att + lse),
            "{fine_flash} vs {eight}"
        );
    }
}
