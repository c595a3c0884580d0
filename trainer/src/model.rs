//! The OLMo-1 decoder on the CPU reference kernels: explicit forward and backward passes over
//! one flat parameter buffer (llm.c style), checked end to end against finite differences.
//!
//! Block (pre-norm, no biases, non-parametric LayerNorm): `x += attn_out(attn(rope(q), rope(k),
//! v))` with `q, k, v = split(att_proj(ln(x)))`, then `x += ff_out(swiglu(ff_proj(ln(x))))`;
//! a final LayerNorm, and logits against the tied embedding (padded to a multiple of 128).

use crate::ops::*;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ModelConfig {
    pub d_model: usize,
    pub n_heads: usize,
    pub n_layers: usize,
    /// SwiGLU hidden size `h` (ff_proj is `2h × d`).
    pub mlp_hidden: usize,
    pub vocab_size: usize,
    pub rope_theta: f32,
    pub eps: f32,
    pub z_loss: f32,
}

impl ModelConfig {
    /// Embedding rows: the vocabulary padded to a multiple of 128, as OLMo's `embedding_size`.
    pub fn embedding_size(&self) -> usize {
        self.vocab_size.div_ceil(128) * 128
    }
    fn head_dim(&self) -> usize {
        self.d_model / self.n_heads
    }
    fn layer_params(&self) -> usize {
        let d = self.d_model;
        3 * d * d + d * d + 2 * self.mlp_hidden * d + d * self.mlp_hidden
    }
    pub fn num_params(&self) -> usize {
        self.embedding_size() * self.d_model + self.n_layers * self.layer_params()
    }
}

/// Offsets of one layer's weights in the flat buffer.
struct LayerOffsets {
    att_proj: usize,
    attn_out: usize,
    ff_proj: usize,
    ff_out: usize,
}

fn layer(cfg: &ModelConfig, l: usize) -> LayerOffsets {
    let d = cfg.d_model;
    let base = cfg.embedding_size() * d + l * cfg.layer_params();
    LayerOffsets {
        att_proj: base,
        attn_out: base + 3 * d * d,
        ff_proj: base + 4 * d * d,
        ff_out: base + 4 * d * d + 2 * cfg.mlp_hidden * d,
    }
}

/// Activations one layer's backward pass needs.
#[derive(Default)]
struct LayerActs {
    x_in: Vec<f32>,
    ln1: Vec<f32>,
    ln1_mean: Vec<f32>,
    ln1_rstd: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    probs: Vec<f32>,
    att: Vec<f32>,
    x_mid: Vec<f32>,
    ln2: Vec<f32>,
    ln2_mean: Vec<f32>,
    ln2_rstd: Vec<f32>,
    ff_in: Vec<f32>,
    ff_act: Vec<f32>,
}

/// Loss of one sequence and the gradient of its parameters (added into `grads`).
/// `tokens` has `seq + 1` ids: inputs are `tokens[..seq]`, targets `tokens[1..]`.
pub fn forward_backward(
    cfg: &ModelConfig,
    params: &[f32],
    tokens: &[u32],
    grads: &mut [f32],
) -> (f32, f32) {
    let (d, hh, h) = (cfg.d_model, cfg.n_heads, cfg.mlp_hidden);
    let hd = cfg.head_dim();
    let seq = tokens.len() - 1;
    let emb = cfg.embedding_size();
    let wte = &params[..emb * d];

    // Forward.
    let mut x: Vec<f32> = tokens[..seq]
        .iter()
        .flat_map(|&t| wte[t as usize * d..(t as usize + 1) * d].to_vec())
        .collect();
    let mut acts: Vec<LayerActs> = Vec::with_capacity(cfg.n_layers);
    for l in 0..cfg.n_layers {
        let o = layer(cfg, l);
        let mut a = LayerActs {
            x_in: x.clone(),
            ..Default::default()
        };
        a.ln1 = vec![0.0; seq * d];
        a.ln1_mean = vec![0.0; seq];
        a.ln1_rstd = vec![0.0; seq];
        layernorm_forward(&x, d, cfg.eps, &mut a.ln1, &mut a.ln1_mean, &mut a.ln1_rstd);
        let mut qkv = vec![0.0; seq * 3 * d];
        matmul_forward(
            &a.ln1,
            &params[o.att_proj..o.att_proj + 3 * d * d],
            seq,
            d,
            3 * d,
            &mut qkv,
        );
        a.q = qkv
            .chunks_exact(3 * d)
            .flat_map(|r| r[..d].to_vec())
            .collect();
        a.k = qkv
            .chunks_exact(3 * d)
            .flat_map(|r| r[d..2 * d].to_vec())
            .collect();
        a.v = qkv
            .chunks_exact(3 * d)
            .flat_map(|r| r[2 * d..].to_vec())
            .collect();
        rope(&mut a.q, seq, hh, hd, cfg.rope_theta, false);
        rope(&mut a.k, seq, hh, hd, cfg.rope_theta, false);
        a.att = vec![0.0; seq * d];
        a.probs = vec![0.0; hh * seq * seq];
        attention_forward(&a.q, &a.k, &a.v, seq, hh, hd, &mut a.att, &mut a.probs);
        let mut proj = vec![0.0; seq * d];
        matmul_forward(
            &a.att,
            &params[o.attn_out..o.attn_out + d * d],
            seq,
            d,
            d,
            &mut proj,
        );
        a.x_mid = x.iter().zip(&proj).map(|(a, b)| a + b).collect();
        a.ln2 = vec![0.0; seq * d];
        a.ln2_mean = vec![0.0; seq];
        a.ln2_rstd = vec![0.0; seq];
        layernorm_forward(
            &a.x_mid,
            d,
            cfg.eps,
            &mut a.ln2,
            &mut a.ln2_mean,
            &mut a.ln2_rstd,
        );
        a.ff_in = vec![0.0; seq * 2 * h];
        matmul_forward(
            &a.ln2,
            &params[o.ff_proj..o.ff_proj + 2 * h * d],
            seq,
            d,
            2 * h,
            &mut a.ff_in,
        );
        a.ff_act = vec![0.0; seq * h];
        swiglu_forward(&a.ff_in, h, &mut a.ff_act);
        let mut ff = vec![0.0; seq * d];
        matmul_forward(
            &a.ff_act,
            &params[o.ff_out..o.ff_out + d * h],
            seq,
            h,
            d,
            &mut ff,
        );
        x = a.x_mid.iter().zip(&ff).map(|(a, b)| a + b).collect();
        acts.push(a);
    }
    let mut lnf = vec![0.0; seq * d];
    let (mut lnf_mean, mut lnf_rstd) = (vec![0.0; seq], vec![0.0; seq]);
    layernorm_forward(&x, d, cfg.eps, &mut lnf, &mut lnf_mean, &mut lnf_rstd);
    let mut logits = vec![0.0; seq * emb];
    matmul_forward(&lnf, wte, seq, d, emb, &mut logits);
    let mut dlogits = vec![0.0; seq * emb];
    let (loss, z) = cross_entropy(&logits, &tokens[1..], emb, cfg.z_loss, &mut dlogits);

    // Backward.
    let mut dlnf = vec![0.0; seq * d];
    matmul_backward(
        &dlogits,
        &lnf,
        wte,
        seq,
        d,
        emb,
        &mut dlnf,
        &mut grads[..emb * d],
    );
    let mut dx = vec![0.0; seq * d];
    layernorm_backward(&dlnf, &x, &lnf_mean, &lnf_rstd, d, &mut dx);
    for l in (0..cfg.n_layers).rev() {
        let o = layer(cfg, l);
        let a = &acts[l];
        // MLP branch: x_out = x_mid + ff_out(swiglu(ff_proj(ln2(x_mid))))
        let mut dff_act = vec![0.0; seq * h];
        matmul_backward(
            &dx,
            &a.ff_act,
            &params[o.ff_out..o.ff_out + d * h],
            seq,
            h,
            d,
            &mut dff_act,
            &mut grads[o.ff_out..o.ff_out + d * h],
        );
        let mut dff_in = vec![0.0; seq * 2 * h];
        swiglu_backward(&dff_act, &a.ff_in, h, &mut dff_in);
        let mut dln2 = vec![0.0; seq * d];
        matmul_backward(
            &dff_in,
            &a.ln2,
            &params[o.ff_proj..o.ff_proj + 2 * h * d],
            seq,
            d,
            2 * h,
            &mut dln2,
            &mut grads[o.ff_proj..o.ff_proj + 2 * h * d],
        );
        let mut dx_mid = dx.clone();
        layernorm_backward(&dln2, &a.x_mid, &a.ln2_mean, &a.ln2_rstd, d, &mut dx_mid);
        // Attention branch: x_mid = x_in + attn_out(attn(...))
        let mut datt = vec![0.0; seq * d];
        matmul_backward(
            &dx_mid,
            &a.att,
            &params[o.attn_out..o.attn_out + d * d],
            seq,
            d,
            d,
            &mut datt,
            &mut grads[o.attn_out..o.attn_out + d * d],
        );
        let (mut dq, mut dk, mut dv) = (vec![0.0; seq * d], vec![0.0; seq * d], vec![0.0; seq * d]);
        attention_backward(
            &datt, &a.q, &a.k, &a.v, &a.probs, seq, hh, hd, &mut dq, &mut dk, &mut dv,
        );
        rope(&mut dq, seq, hh, hd, cfg.rope_theta, true);
        rope(&mut dk, seq, hh, hd, cfg.rope_theta, true);
        let mut dqkv = vec![0.0; seq * 3 * d];
        for t in 0..seq {
            dqkv[t * 3 * d..t * 3 * d + d].copy_from_slice(&dq[t * d..(t + 1) * d]);
            dqkv[t * 3 * d + d..t * 3 * d + 2 * d].copy_from_slice(&dk[t * d..(t + 1) * d]);
            dqkv[t * 3 * d + 2 * d..(t + 1) * 3 * d].copy_from_slice(&dv[t * d..(t + 1) * d]);
        }
        let mut dln1 = vec![0.0; seq * d];
        matmul_backward(
            &dqkv,
            &a.ln1,
            &params[o.att_proj..o.att_proj + 3 * d * d],
            seq,
            d,
            3 * d,
            &mut dln1,
            &mut grads[o.att_proj..o.att_proj + 3 * d * d],
        );
        let mut dx_in = dx_mid.clone();
        layernorm_backward(&dln1, &a.x_in, &a.ln1_mean, &a.ln1_rstd, d, &mut dx_in);
        dx = dx_in;
    }
    // Embedding lookup.
    for (t, &tok) in tokens[..seq].iter().enumerate() {
        for i in 0..d {
            grads[tok as usize * d + i] += dx[t * d + i];
        }
    }
    (loss, z)
}

/// OLMo's `normal` init: N(0, std) for every weight (truncated at ±3 std).
pub fn init_normal(cfg: &ModelConfig, std: f32, seed: u64) -> Vec<f32> {
    let mut g = crate::permutation::Pcg64::new(seed);
    (0..cfg.num_params())
        .map(|_| loop {
            // Box-Muller on two uniforms in (0, 1].
            let u1 = ((g.next_u64() >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
            let u2 = (g.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
            let z = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
            if z.abs() <= 3.0 {
                break z as f32 * std;
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::optim::{AdamW, Moments};

    fn tiny() -> ModelConfig {
        ModelConfig {
            d_model: 8,
            n_heads: 2,
            n_layers: 2,
            mlp_hidden: 12,
            vocab_size: 20,
            rope_theta: 10_000.0,
            eps: 1e-5,
            z_loss: 1e-4,
        }
    }

    #[test]
    fn whole_model_gradient_matches_finite_differences() {
        let cfg = tiny();
        let params = init_normal(&cfg, 0.3, 1);
        let tokens = [3u32, 7, 1, 19, 4, 7];
        let mut grads = vec![0.0; params.len()];
        forward_backward(&cfg, &params, &tokens, &mut grads);
        let d = cfg.d_model;
        let emb = cfg.embedding_size();
        let l0 = layer(&cfg, 0);
        let l1 = layer(&cfg, 1);
        // embedding rows used as inputs and as outputs, every weight matrix of both layers
        let probes = [
            3 * d + 1,
            19 * d + 5,
            10 * d + 2,
            l0.att_proj + 5,
            l0.att_proj + 2 * d * d + 9,
            l0.attn_out + 17,
            l0.ff_proj + 30,
            l0.ff_proj + cfg.mlp_hidden * d + 3,
            l0.ff_out + 40,
            l1.att_proj + d * d + 11,
            l1.ff_out + 7,
        ];
        assert!(probes.iter().all(|&p| p < params.len()) && emb == 128);
        for &p in &probes {
            let eps = 1e-2f32;
            let loss_at = |delta: f32| {
                let mut q = params.clone();
                q[p] += delta;
                let mut scratch = vec![0.0; q.len()];
                forward_backward(&cfg, &q, &tokens, &mut scratch).0 as f64
            };
            let fd = (loss_at(eps) - loss_at(-eps)) / (2.0 * eps as f64);
            assert!(
                (fd - grads[p] as f64).abs() < 2e-3 * (1.0 + fd.abs()),
                "param {p}: finite difference {fd}, backward {}",
                grads[p]
            );
        }
    }

    #[test]
    fn adamw_steps_fit_a_fixed_sequence() {
        let cfg = tiny();
        let mut params = init_normal(&cfg, 0.02, 2);
        let tokens = [1u32, 2, 3, 4, 5, 6, 7, 8, 9];
        let opt = AdamW {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.0,
        };
        let mut state = Moments::zeros(params.len());
        let mut first = None;
        let mut last = 0.0;
        for step in 1..=200 {
            let mut grads = vec![0.0; params.len()];
            let (loss, _) = forward_backward(&cfg, &params, &tokens, &mut grads);
            first.get_or_insert(loss);
            last = loss;
            opt.step(step, 1e-2, &mut params, &grads, &mut state, true);
        }
        let first = first.unwrap();
        // starts near ln(128) (uniform over the padded vocabulary), ends far below
        assert!((first - (128f32).ln()).abs() < 0.1, "{first}");
        assert!(last < 0.5, "loss went from {first} to {last}");
    }
}
