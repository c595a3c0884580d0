//! AdamW as `torch.optim.AdamW` computes it (decoupled weight decay, bias-corrected moments),
//! and OLMo's gradient clipping: by the global norm (`max_grad_norm`), or adaptive, per tensor
//! (`max_grad_norm_ratio`).
//!
//! OLMo puts Linear weights in the decay group and norms, biases and (unless
//! `decay_embeddings`) embeddings in a group with weight decay 0: callers pass `decay` per
//! parameter.

use rayon::prelude::*;

/// Optimizer hyper-parameters (`optimizer.{learning_rate, betas, eps, weight_decay}`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamW {
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
}

/// First and second moments of one parameter tensor.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Moments {
    pub m: Vec<f32>,
    pub v: Vec<f32>,
}

impl Moments {
    pub fn zeros(n: usize) -> Moments {
        Moments {
            m: vec![0.0; n],
            v: vec![0.0; n],
        }
    }
}

impl AdamW {
    /// One update of `param` at optimizer step `step` (1-based) with learning rate `lr`.
    pub fn step(
        &self,
        step: u64,
        lr: f32,
        param: &mut [f32],
        grad: &[f32],
        state: &mut Moments,
        decay: bool,
    ) {
        self.step_slices(step, lr, param, grad, &mut state.m, &mut state.v, decay);
    }

    /// [`AdamW::step`] on borrowed moment slices (one parameter group of a flat buffer).
    #[allow(clippy::too_many_arguments)]
    pub fn step_slices(
        &self,
        step: u64,
        lr: f32,
        param: &mut [f32],
        grad: &[f32],
        m: &mut [f32],
        v: &mut [f32],
        decay: bool,
    ) {
        assert_eq!(param.len(), grad.len());
        assert_eq!(param.len(), m.len());
        assert_eq!(param.len(), v.len());
        let wd = if decay { self.weight_decay } else { 0.0 };
        let bc1 = 1.0 - self.beta1.powi(step as i32);
        let bc2_sqrt = (1.0 - self.beta2.powi(step as i32)).sqrt();
        let step_size = lr / bc1;
        // Elementwise, so chunking across threads cannot change a bit.
        const CHUNK: usize = 1 << 15;
        param
            .par_chunks_mut(CHUNK)
            .zip(grad.par_chunks(CHUNK))
            .zip(m.par_chunks_mut(CHUNK).zip(v.par_chunks_mut(CHUNK)))
            .for_each(|((param, grad), (m, v))| {
                for i in 0..param.len() {
                    let g = grad[i];
                    param[i] *= 1.0 - lr * wd;
                    m[i] += (g - m[i]) * (1.0 - self.beta1);
                    v[i] = v[i] * self.beta2 + (1.0 - self.beta2) * g * g;
                    let denom = v[i].sqrt() / bc2_sqrt + self.eps;
                    param[i] -= step_size * m[i] / denom;
                }
            });
    }
}

/// Σ x² of a gradient, from per-chunk partial sums combined in chunk order: the same bits
/// whatever the threads.
pub fn sum_of_squares(g: &[f32]) -> f64 {
    g.par_chunks(1 << 15)
        .map(|c| c.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>())
        .collect::<Vec<f64>>()
        .iter()
        .sum::<f64>()
}

/// OLMo's LionW (`olmo/optim.py`): decoupled weight decay, a step of `lr` along the sign of
/// `β1·m + (1 − β1)·g`, then `m ← β2·m + (1 − β2)·g`. Its one moment is kept where AdamW keeps
/// `exp_avg`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LionW {
    pub beta1: f32,
    pub beta2: f32,
    pub weight_decay: f32,
}

impl LionW {
    /// One update of `param` with learning rate `lr` on a moment slice.
    pub fn step_slices(
        &self,
        lr: f32,
        param: &mut [f32],
        grad: &[f32],
        m: &mut [f32],
        decay: bool,
    ) {
        assert_eq!(param.len(), grad.len());
        assert_eq!(param.len(), m.len());
        let wd = if decay { self.weight_decay } else { 0.0 };
        const CHUNK: usize = 1 << 15;
        param
            .par_chunks_mut(CHUNK)
            .zip(grad.par_chunks(CHUNK))
            .zip(m.par_chunks_mut(CHUNK))
            .for_each(|((param, grad), m)| {
                for i in 0..param.len() {
                    let g = grad[i];
                    param[i] *= 1.0 - lr * wd;
                    let update = m[i] * self.beta1 + g * (1.0 - self.beta1);
                    param[i] -= lr * sign(update);
                    m[i] = m[i] * self.beta2 + g * (1.0 - self.beta2);
                }
            });
    }
}

/// `torch.sign`: 0 at ±0 (Rust's `signum` gives ±1 there), NaN at NaN.
fn sign(x: f32) -> f32 {
    if x > 0.0 {
        1.0
    } else if x < 0.0 {
        -1.0
    } else {
        x * 0.0
    }
}

/// The optimizer a run steps with (`optimizer.name`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Optimizer {
    AdamW(AdamW),
    LionW(LionW),
}

impl Optimizer {
    pub fn betas(&self) -> (f32, f32) {
        match self {
            Optimizer::AdamW(a) => (a.beta1, a.beta2),
            Optimizer::LionW(l) => (l.beta1, l.beta2),
        }
    }
}

/// Scales all gradients so their global L2 norm is at most `max_norm`, as OLMo does
/// (`coef = max_norm / (norm + 1e-6)`, clamped at 1). Returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut [&mut [f32]], max_norm: f32) -> f32 {
    let total: f64 = grads.iter().map(|g| sum_of_squares(g)).sum();
    let norm = total.sqrt() as f32;
    let coef = (max_norm / (norm + 1e-6)).min(1.0);
    if coef < 1.0 {
        for g in grads.iter_mut() {
            g.par_iter_mut().for_each(|x| *x *= coef);
        }
    }
    norm
}

/// OLMo's adaptive clipping (`max_grad_norm_ratio`, its `_do_adaptive_clipping`): each
/// tensor's gradient is clipped to `ratio` times an exponential average of that tensor's own
/// clipped gradient norms, the average moving by `1 - max(β1, β2)` a step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdaptiveClip {
    pub ratio: f32,
    pub beta: f32,
}

impl AdaptiveClip {
    pub fn new(ratio: f64, opt: &Optimizer) -> AdaptiveClip {
        let (beta1, beta2) = opt.betas();
        AdaptiveClip {
            ratio: ratio as f32,
            beta: beta1.max(beta2),
        }
    }

    /// The clipping coefficient of each tensor for its gradient norm in `norms`, moving the
    /// averages in `avg` (one per tensor, `None` before the first). As OLMo, in f32: a tensor
    /// without an average takes its norm as one, and keeps it only after the run's first step
    /// (`global_step > 1`: OLMo adds no optimizer state before the optimizer has made it), so
    /// the average starts over at step 2.
    pub fn coefficients(
        &self,
        norms: &[f32],
        avg: &mut [Option<f32>],
        global_step: u64,
    ) -> Vec<f32> {
        let weight = (1.0 - self.beta as f64) as f32;
        norms
            .iter()
            .zip(avg.iter_mut())
            .map(|(&norm, kept)| {
                let mut a = kept.unwrap_or(norm);
                let coef = (self.ratio * a / (norm + 1e-6)).min(1.0);
                // torch's lerp for a weight under one half
                a += weight * (norm * coef - a);
                if kept.is_some() || global_step > 1 {
                    *kept = Some(a);
                }
                coef
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OPT: AdamW = AdamW {
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-5,
        weight_decay: 0.1,
    };

    #[test]
    fn first_step_moves_each_weight_by_about_lr() {
        // Step 1: m = 0.1 g, v = 0.05 g^2, bias-corrected m/sqrt(v) = sign(g).
        let mut p = vec![1.0f32, -2.0];
        let mut st = Moments::zeros(2);
        OPT.step(1, 1e-2, &mut p, &[0.5, -3.0], &mut st, true);
        let expect = |w: f32, g: f32| {
            w * (1.0 - 1e-2 * 0.1) - 1e-2 * g.signum() * g.abs() / (g.abs() + 1e-5)
        };
        assert!((p[0] - expect(1.0, 0.5)).abs() < 1e-6, "{p:?}");
        assert!((p[1] - expect(-2.0, -3.0)).abs() < 1e-6, "{p:?}");
        assert!((st.m[0] - 0.05).abs() < 1e-7 && (st.v[1] - 0.45).abs() < 1e-6);
    }

    #[test]
    fn no_decay_group_and_second_step() {
        let mut p = vec![1.0f32];
        let mut st = Moments::zeros(1);
        OPT.step(1, 1e-2, &mut p, &[1.0], &mut st, false);
        assert!((p[0] - (1.0 - 1e-2 / (1.0 + 1e-5))).abs() < 1e-6);
        // step 2 with the same gradient: m_hat = 1, v_hat = 1 -> another lr step
        let before = p[0];
        OPT.step(2, 1e-2, &mut p, &[1.0], &mut st, false);
        assert!((before - p[0] - 1e-2 / (1.0 + 1e-5)).abs() < 1e-6);
    }

    #[test]
    fn clipping_scales_to_the_max_norm() {
        let mut a = vec![3.0f32];
        let mut b = vec![4.0f32];
        let norm = clip_grad_norm(&mut [&mut a, &mut b], 1.0);
        assert!((norm - 5.0).abs() < 1e-6);
        assert!((a[0] - 0.6).abs() < 1e-5 && (b[0] - 0.8).abs() < 1e-5);
        let mut c = vec![0.1f32];
        clip_grad_norm(&mut [&mut c], 1.0);
        assert_eq!(c[0], 0.1);
    }

    #[test]
    fn lionw_steps_by_the_sign_of_the_interpolated_moment() {
        let lion = LionW {
            beta1: 0.9,
            beta2: 0.99,
            weight_decay: 0.1,
        };
        // m = 0: the update is g's sign; m then moves 1% toward g
        let (mut p, mut m) = (vec![1.0f32, 1.0, 1.0], vec![0.0f32; 3]);
        lion.step_slices(0.01, &mut p, &[0.5, -2.0, 0.0], &mut m, true);
        let decayed = 1.0 * (1.0 - 0.01 * 0.1);
        assert_eq!(p, [decayed - 0.01, decayed + 0.01, decayed]);
        assert!((m[0] - 0.005).abs() < 1e-7 && (m[1] + 0.02).abs() < 1e-7 && m[2] == 0.0);
        // a moment against a small gradient wins: 0.9·(−1) + 0.1·0.5 < 0, so the weight rises
        let (mut p, mut m) = (vec![0.0f32], vec![-1.0f32]);
        lion.step_slices(0.01, &mut p, &[0.5], &mut m, false);
        assert_eq!(p, [0.01]);
        assert!((m[0] - (-0.99 + 0.005)).abs() < 1e-6, "{m:?}");
    }

    #[test]
    fn adaptive_clipping_follows_each_tensors_own_average() {
        let clip = AdaptiveClip::new(1.5, &Optimizer::AdamW(OPT));
        assert_eq!(clip.beta, 0.95);
        let mut avg = vec![None, None];
        // step 1: each norm is its own average, so nothing is clipped, and nothing is kept
        assert_eq!(clip.coefficients(&[2.0, 0.5], &mut avg, 1), [1.0, 1.0]);
        assert_eq!(avg, [None, None]);
        // step 2 starts the averages over: 4 and 1, then moved 5% toward the (unclipped) norms
        assert_eq!(clip.coefficients(&[4.0, 1.0], &mut avg, 2), [1.0, 1.0]);
        assert_eq!(avg, [Some(4.0), Some(1.0)]);
        // step 3: the first tensor jumps to 10 > 1.5 x 4 and is clipped to 6; the average moves
        // toward the clipped norm; the second tensor, under its bound, is left alone
        let coefs = clip.coefficients(&[10.0, 1.2], &mut avg, 3);
        assert!((coefs[0] - 6.0 / (10.0 + 1e-6)).abs() < 1e-6, "{coefs:?}");
        assert_eq!(coefs[1], 1.0);
        let (a, b) = (avg[0].unwrap(), avg[1].unwrap());
        assert!((a - (4.0 + 0.05 * (6.0 - 4.0))).abs() < 1e-5, "{a}");
        assert!((b - (1.0 + 0.05 * 0.2)).abs() < 1e-6, "{b}");
        // a ratio under 1 clips from the first step on
        let tight = AdaptiveClip::new(0.5, &Optimizer::AdamW(OPT));
        let c = tight.coefficients(&[2.0], &mut [None], 1);
        assert!((c[0] - 0.5).abs() < 1e-6, "{c:?}");
    }
}
