//! The engine interface the training loop drives, with two implementations: the CPU engine
//! (here) and the CUDA engine (`cuda.rs`). An engine owns the parameters, their gradients and
//! AdamW's moments; the loop hands it batches and optimizer settings, and reads the state back
//! only for checkpoints.

use anyhow::{bail, Result};

use crate::dist::Tcp;
use crate::model::{Batch, Model, Scores};
use crate::optim::{clip_grad_norm, sum_of_squares, Optimizer};

/// Receives host copies of (params, exp_avg, exp_avg_sq).
pub type StateFn<'a> = dyn FnMut(&[f32], &[f32], &[f32]) -> Result<()> + 'a;

/// One optimizer update.
pub struct Update<'a> {
    /// AdamW's 1-based update count (its bias correction).
    pub step: u64,
    pub lr: f32,
    /// Global-norm clipping threshold, if any.
    pub max_norm: Option<f32>,
    /// Adaptive clipping instead: each tensor's clipping coefficient, in layout order.
    pub coefs: Option<&'a [f32]>,
    pub optimizer: Optimizer,
    /// Weight decay on or off per tensor, in layout order.
    pub decay: &'a [bool],
}

pub trait Backend {
    /// What runs where, for the log.
    fn describe(&self) -> String;
    /// Dense bf16 peak FLOP/s of the device, when known (for MFU).
    fn peak_flops(&self) -> Option<f64> {
        None
    }
    /// The most device memory in use at once so far, in bytes (`None` on the CPU).
    fn peak_memory(&self) -> Result<Option<u64>> {
        Ok(None)
    }
    /// The device's (free, total) memory in bytes now (`None` on the CPU).
    fn device_memory(&self) -> Option<(u64, u64)> {
        None
    }
    /// What the engine chose by timing since the last call (a kernel's block size), one line
    /// each, for the log: a run's speed depends on it, its bits do not.
    fn tuning_notes(&mut self) -> Vec<String> {
        Vec::new()
    }
    /// Scores a batch (no gradients).
    fn forward(&mut self, batch: &Batch) -> Result<Scores>;
    /// Scores a batch and adds `grad_scale · d(Σ CE + z)/dparams` to the gradient accumulator.
    fn forward_backward(&mut self, batch: &Batch, grad_scale: f32) -> Result<Scores>;
    fn zero_grad(&mut self) -> Result<()>;
    /// Sums the gradient accumulators of all ranks (data parallelism).
    fn all_reduce_grads(&mut self, tcp: &mut Tcp) -> Result<()>;
    /// Each tensor's gradient norm, in layout order (for adaptive clipping).
    fn grad_norms(&mut self) -> Result<Vec<f32>>;
    /// Clips the accumulated gradient and applies the optimizer; returns the norm before
    /// clipping.
    fn step(&mut self, u: &Update) -> Result<f32>;
    /// Calls `f(params, exp_avg, exp_avg_sq)` with host copies of the state.
    fn with_state(&mut self, f: &mut StateFn) -> Result<()>;
}

/// The CPU engine: the model's f32 passes over host buffers.
pub struct Cpu {
    pub model: Model,
    pub params: Vec<f32>,
    pub grads: Vec<f32>,
    pub exp_avg: Vec<f32>,
    pub exp_avg_sq: Vec<f32>,
}

impl Cpu {
    pub fn new(model: Model, params: Vec<f32>, exp_avg: Vec<f32>, exp_avg_sq: Vec<f32>) -> Cpu {
        let n = params.len();
        Cpu {
            model,
            params,
            grads: vec![0.0; n],
            exp_avg,
            exp_avg_sq,
        }
    }
}

impl Backend for Cpu {
    fn describe(&self) -> String {
        format!("cpu, f32, {} threads", rayon::current_num_threads())
    }

    fn forward(&mut self, batch: &Batch) -> Result<Scores> {
        Ok(self.model.forward(&self.params, batch))
    }

    fn forward_backward(&mut self, batch: &Batch, grad_scale: f32) -> Result<Scores> {
        Ok(self
            .model
            .forward_backward(&self.params, batch, grad_scale, &mut self.grads))
    }

    fn zero_grad(&mut self) -> Result<()> {
        self.grads.fill(0.0);
        Ok(())
    }

    fn all_reduce_grads(&mut self, tcp: &mut Tcp) -> Result<()> {
        tcp.all_reduce_f32(&mut self.grads)
    }

    fn grad_norms(&mut self) -> Result<Vec<f32>> {
        Ok(self
            .model
            .layout
            .tensors
            .iter()
            .map(|t| sum_of_squares(&self.grads[t.range()]).sqrt() as f32)
            .collect())
    }

    fn step(&mut self, u: &Update) -> Result<f32> {
        let max_norm = match u.coefs {
            Some(_) => f32::INFINITY,
            None => u.max_norm.unwrap_or(f32::INFINITY),
        };
        if self.exp_avg.len() != self.params.len() {
            bail!("this engine was built to evaluate, without optimizer moments");
        }
        if matches!(u.optimizer, Optimizer::AdamW(_)) && self.exp_avg_sq.len() != self.params.len()
        {
            bail!("AdamW needs a second moment, and this engine was built without one (for LionW)");
        }
        let norm = clip_grad_norm(&mut [&mut self.grads], max_norm);
        for (k, (t, &decay)) in self.model.layout.tensors.iter().zip(u.decay).enumerate() {
            let r = t.range();
            if let Some(&coef) = u.coefs.map(|c| &c[k]).filter(|&&c| c < 1.0) {
                self.grads[r.clone()].iter_mut().for_each(|g| *g *= coef);
            }
            match &u.optimizer {
                Optimizer::AdamW(a) => a.step_slices(
                    u.step,
                    u.lr,
                    &mut self.params[r.clone()],
                    &self.grads[r.clone()],
                    &mut self.exp_avg[r.clone()],
                    &mut self.exp_avg_sq[r],
                    decay,
                ),
                Optimizer::LionW(l) => l.step_slices(
                    u.lr,
                    &mut self.params[r.clone()],
                    &self.grads[r.clone()],
                    &mut self.exp_avg[r],
                    decay,
                ),
            }
        }
        Ok(norm)
    }

    fn with_state(&mut self, f: &mut StateFn) -> Result<()> {
        f(&self.params, &self.exp_avg, &self.exp_avg_sq)
    }
}
