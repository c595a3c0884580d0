//! CPU reference kernels of the OLMo block, forward and backward, in f32 (llm.c style: plain
//! loops over row-major buffers). These are the reference the GPU kernels will be checked
//! against, so each backward pass is verified against finite differences in the tests.
//!
//! Shapes: `x` is `[rows, dim]`; a Linear weight is `[out, in]` as in torch (`y = x Wᵀ`).

/// Non-parametric LayerNorm (`F.layer_norm(x, None, None, eps)`); keeps mean and rstd per row.
pub fn layernorm_forward(
    x: &[f32],
    dim: usize,
    eps: f32,
    out: &mut [f32],
    mean: &mut [f32],
    rstd: &mut [f32],
) {
    for (r, row) in x.chunks_exact(dim).enumerate() {
        let m = row.iter().sum::<f32>() / dim as f32;
        let var = row.iter().map(|v| (v - m) * (v - m)).sum::<f32>() / dim as f32;
        let s = 1.0 / (var + eps).sqrt();
        for (o, v) in out[r * dim..(r + 1) * dim].iter_mut().zip(row) {
            *o = (v - m) * s;
        }
        mean[r] = m;
        rstd[r] = s;
    }
}

/// Adds dL/dx to `dx` given dL/dout.
pub fn layernorm_backward(
    dout: &[f32],
    x: &[f32],
    mean: &[f32],
    rstd: &[f32],
    dim: usize,
    dx: &mut [f32],
) {
    for r in 0..x.len() / dim {
        let row = &x[r * dim..(r + 1) * dim];
        let d = &dout[r * dim..(r + 1) * dim];
        let (m, s) = (mean[r], rstd[r]);
        let mut dmean = 0.0f32;
        let mut dnorm_norm = 0.0f32;
        for i in 0..dim {
            let norm = (row[i] - m) * s;
            dmean += d[i];
            dnorm_norm += d[i] * norm;
        }
        dmean /= dim as f32;
        dnorm_norm /= dim as f32;
        for i in 0..dim {
            let norm = (row[i] - m) * s;
            dx[r * dim + i] += s * (d[i] - dmean - norm * dnorm_norm);
        }
    }
}

/// `out[r, o] = Σ_i x[r, i] · w[o, i]` (no bias: OLMo's `include_bias=false`).
pub fn matmul_forward(x: &[f32], w: &[f32], rows: usize, inp: usize, outp: usize, out: &mut [f32]) {
    for r in 0..rows {
        let xr = &x[r * inp..(r + 1) * inp];
        for o in 0..outp {
            let wr = &w[o * inp..(o + 1) * inp];
            out[r * outp + o] = xr.iter().zip(wr).map(|(a, b)| a * b).sum();
        }
    }
}

/// Adds dL/dx and dL/dw given dL/dout.
#[allow(clippy::too_many_arguments)]
pub fn matmul_backward(
    dout: &[f32],
    x: &[f32],
    w: &[f32],
    rows: usize,
    inp: usize,
    outp: usize,
    dx: &mut [f32],
    dw: &mut [f32],
) {
    for r in 0..rows {
        for o in 0..outp {
            let g = dout[r * outp + o];
            for i in 0..inp {
                dx[r * inp + i] += g * w[o * inp + i];
                dw[o * inp + i] += g * x[r * inp + i];
            }
        }
    }
}

fn silu(v: f32) -> f32 {
    v / (1.0 + (-v).exp())
}

/// OLMo's SwiGLU: the input's first half is the value, the second the gate:
/// `out = silu(gate) * value`, `x` is `[rows, 2h]`, `out` is `[rows, h]`.
pub fn swiglu_forward(x: &[f32], h: usize, out: &mut [f32]) {
    for (r, row) in x.chunks_exact(2 * h).enumerate() {
        for i in 0..h {
            out[r * h + i] = silu(row[h + i]) * row[i];
        }
    }
}

pub fn swiglu_backward(dout: &[f32], x: &[f32], h: usize, dx: &mut [f32]) {
    for (r, row) in x.chunks_exact(2 * h).enumerate() {
        for i in 0..h {
            let (v, g) = (row[i], row[h + i]);
            let sig = 1.0 / (1.0 + (-g).exp());
            let d = dout[r * h + i];
            dx[r * 2 * h + i] += d * g * sig;
            dx[r * 2 * h + h + i] += d * v * sig * (1.0 + g * (1.0 - sig));
        }
    }
}

/// RoPE, NeoX "rotate half" layout, on `[seq, heads, head_dim]` in place; `inverse` applies the
/// transpose (which is the backward pass, the rotation being orthogonal).
pub fn rope(x: &mut [f32], seq: usize, heads: usize, head_dim: usize, theta: f32, inverse: bool) {
    let half = head_dim / 2;
    for t in 0..seq {
        for j in 0..half {
            let freq = 1.0 / theta.powf(2.0 * j as f32 / head_dim as f32);
            let (sin, cos) = (t as f32 * freq).sin_cos();
            let sin = if inverse { -sin } else { sin };
            for hh in 0..heads {
                let base = (t * heads + hh) * head_dim;
                let (a, b) = (x[base + j], x[base + half + j]);
                x[base + j] = a * cos - b * sin;
                x[base + half + j] = b * cos + a * sin;
            }
        }
    }
}

/// Causal softmax attention over `[seq, heads, head_dim]` q, k, v (scale 1/sqrt(head_dim));
/// keeps the probabilities `[heads, seq, seq]` for the backward pass.
#[allow(clippy::too_many_arguments)]
pub fn attention_forward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    seq: usize,
    heads: usize,
    hd: usize,
    out: &mut [f32],
    probs: &mut [f32],
) {
    let scale = 1.0 / (hd as f32).sqrt();
    let at = |t: usize, h: usize| (t * heads + h) * hd;
    for h in 0..heads {
        for t in 0..seq {
            let p = &mut probs[(h * seq + t) * seq..(h * seq + t + 1) * seq];
            let mut max = f32::MIN;
            for t2 in 0..=t {
                let s: f32 = q[at(t, h)..at(t, h) + hd]
                    .iter()
                    .zip(&k[at(t2, h)..at(t2, h) + hd])
                    .map(|(a, b)| a * b)
                    .sum();
                p[t2] = s * scale;
                max = max.max(p[t2]);
            }
            let mut sum = 0.0;
            for x in p.iter_mut().take(t + 1) {
                *x = (*x - max).exp();
                sum += *x;
            }
            for x in p.iter_mut().take(t + 1) {
                *x /= sum;
            }
            for x in p.iter_mut().skip(t + 1) {
                *x = 0.0;
            }
            let o = &mut out[at(t, h)..at(t, h) + hd];
            o.fill(0.0);
            for t2 in 0..=t {
                for (oi, vi) in o.iter_mut().zip(&v[at(t2, h)..at(t2, h) + hd]) {
                    *oi += p[t2] * vi;
                }
            }
        }
    }
}

/// Adds dL/dq, dL/dk, dL/dv given dL/dout and the forward's probabilities.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    dout: &[f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    probs: &[f32],
    seq: usize,
    heads: usize,
    hd: usize,
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
) {
    let scale = 1.0 / (hd as f32).sqrt();
    let at = |t: usize, h: usize| (t * heads + h) * hd;
    let mut dp = vec![0.0f32; seq];
    for h in 0..heads {
        for t in 0..seq {
            let p = &probs[(h * seq + t) * seq..(h * seq + t + 1) * seq];
            let d = &dout[at(t, h)..at(t, h) + hd];
            let mut weighted = 0.0;
            for t2 in 0..=t {
                dp[t2] = d
                    .iter()
                    .zip(&v[at(t2, h)..at(t2, h) + hd])
                    .map(|(a, b)| a * b)
                    .sum();
                weighted += p[t2] * dp[t2];
                for (dvi, di) in dv[at(t2, h)..at(t2, h) + hd].iter_mut().zip(d) {
                    *dvi += p[t2] * di;
                }
            }
            for t2 in 0..=t {
                let ds = p[t2] * (dp[t2] - weighted) * scale;
                for i in 0..hd {
                    dq[at(t, h) + i] += ds * k[at(t2, h) + i];
                    dk[at(t2, h) + i] += ds * q[at(t, h) + i];
                }
            }
        }
    }
}

/// Mean cross-entropy of `logits` `[rows, vocab]` against `targets`, plus `z_loss ·
/// mean(logsumexp²)`; writes dL/dlogits into `dlogits`. Returns (loss, z-loss term).
pub fn cross_entropy(
    logits: &[f32],
    targets: &[u32],
    vocab: usize,
    z_loss: f32,
    dlogits: &mut [f32],
) -> (f32, f32) {
    let rows = targets.len();
    let (mut loss, mut zl) = (0.0f64, 0.0f64);
    for r in 0..rows {
        let row = &logits[r * vocab..(r + 1) * vocab];
        let max = row.iter().copied().fold(f32::MIN, f32::max);
        let sum: f32 = row.iter().map(|v| (v - max).exp()).sum();
        let lse = max + sum.ln();
        let t = targets[r] as usize;
        loss += (lse - row[t]) as f64;
        zl += (z_loss * lse * lse) as f64;
        for (i, v) in row.iter().enumerate() {
            let p = (v - lse).exp();
            let mut g = p + 2.0 * z_loss * lse * p;
            if i == t {
                g -= 1.0;
            }
            dlogits[r * vocab + i] = g / rows as f32;
        }
    }
    (
        (loss / rows as f64) as f32 + (zl / rows as f64) as f32,
        (zl / rows as f64) as f32,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny deterministic generator for test inputs.
    struct Rng(u64);

    impl Rng {
        fn new(seed: u64) -> Rng {
            Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
        }
        /// `n` values uniform in [-scale, scale].
        fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
            (0..n)
                .map(|_| {
                    self.0 ^= self.0 << 13;
                    self.0 ^= self.0 >> 7;
                    self.0 ^= self.0 << 17;
                    ((self.0 >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
                })
                .collect()
        }
    }

    /// Checks `grad` (the analytic dL/dx) against central differences of `loss(x)`.
    fn check(x: &[f32], grad: &[f32], loss: impl Fn(&[f32]) -> f64) {
        let eps = 1e-2f32;
        for i in 0..x.len() {
            let mut xp = x.to_vec();
            let mut xm = x.to_vec();
            xp[i] += eps;
            xm[i] -= eps;
            let fd = (loss(&xp) - loss(&xm)) / (2.0 * eps as f64);
            let tol = 2e-3 * (1.0 + fd.abs());
            assert!(
                (fd - grad[i] as f64).abs() < tol,
                "element {i}: finite difference {fd}, backward {}",
                grad[i]
            );
        }
    }

    fn dot(a: &[f32], b: &[f32]) -> f64 {
        a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum()
    }

    #[test]
    fn layernorm_backward_matches_finite_differences() {
        let mut rng = Rng::new(1);
        let (rows, dim) = (3, 8);
        let x = rng.vec(rows * dim, 1.0);
        let r = rng.vec(rows * dim, 1.0);
        let fwd = |x: &[f32]| {
            let mut out = vec![0.0; rows * dim];
            let (mut m, mut s) = (vec![0.0; rows], vec![0.0; rows]);
            layernorm_forward(x, dim, 1e-5, &mut out, &mut m, &mut s);
            (out, m, s)
        };
        let (_, m, s) = fwd(&x);
        let mut dx = vec![0.0; rows * dim];
        layernorm_backward(&r, &x, &m, &s, dim, &mut dx);
        check(&x, &dx, |x| dot(&fwd(x).0, &r));
    }

    #[test]
    fn matmul_backward_matches_finite_differences() {
        let mut rng = Rng::new(2);
        let (rows, inp, outp) = (3, 5, 4);
        let x = rng.vec(rows * inp, 1.0);
        let w = rng.vec(outp * inp, 1.0);
        let r = rng.vec(rows * outp, 1.0);
        let f = |x: &[f32], w: &[f32]| {
            let mut out = vec![0.0; rows * outp];
            matmul_forward(x, w, rows, inp, outp, &mut out);
            dot(&out, &r)
        };
        let (mut dx, mut dw) = (vec![0.0; x.len()], vec![0.0; w.len()]);
        matmul_backward(&r, &x, &w, rows, inp, outp, &mut dx, &mut dw);
        check(&x, &dx, |x| f(x, &w));
        check(&w, &dw, |w| f(&x, w));
    }

    #[test]
    fn swiglu_backward_matches_finite_differences() {
        let mut rng = Rng::new(3);
        let (rows, h) = (2, 6);
        let x = rng.vec(rows * 2 * h, 2.0);
        let r = rng.vec(rows * h, 1.0);
        let f = |x: &[f32]| {
            let mut out = vec![0.0; rows * h];
            swiglu_forward(x, h, &mut out);
            dot(&out, &r)
        };
        let mut dx = vec![0.0; x.len()];
        swiglu_backward(&r, &x, h, &mut dx);
        check(&x, &dx, f);
        // first half is the value: a zero gate gives silu(0) = 0
        let mut out = vec![0.0; 1];
        swiglu_forward(&[3.0, 0.0], 1, &mut out);
        assert_eq!(out[0], 0.0);
    }

    #[test]
    fn rope_is_a_rotation_and_its_inverse_is_the_backward() {
        let mut rng = Rng::new(4);
        let (seq, heads, hd) = (5, 2, 8);
        let x = rng.vec(seq * heads * hd, 1.0);
        let r = rng.vec(x.len(), 1.0);
        let mut y = x.clone();
        rope(&mut y, seq, heads, hd, 10_000.0, false);
        // position 0 is unchanged; norms are kept
        assert_eq!(&y[..heads * hd], &x[..heads * hd]);
        assert!((dot(&y, &y) - dot(&x, &x)).abs() < 1e-3);
        let mut back = r.clone();
        rope(&mut back, seq, heads, hd, 10_000.0, true);
        check(&x, &back, |x| {
            let mut y = x.to_vec();
            rope(&mut y, seq, heads, hd, 10_000.0, false);
            dot(&y, &r)
        });
    }

    #[test]
    fn causal_attention_backward_matches_finite_differences() {
        let mut rng = Rng::new(6);
        let (seq, heads, hd) = (4, 2, 3);
        let n = seq * heads * hd;
        let (q, k, v) = (rng.vec(n, 1.0), rng.vec(n, 1.0), rng.vec(n, 1.0));
        let r = rng.vec(n, 1.0);
        let f = |q: &[f32], k: &[f32], v: &[f32]| {
            let mut out = vec![0.0; n];
            let mut p = vec![0.0; heads * seq * seq];
            attention_forward(q, k, v, seq, heads, hd, &mut out, &mut p);
            (out, p)
        };
        let (out, p) = f(&q, &k, &v);
        // causal: the first position attends only to itself
        assert_eq!(&out[..hd], &v[..hd]);
        assert!(p[1..seq].iter().all(|&x| x == 0.0));
        let (mut dq, mut dk, mut dv) = (vec![0.0; n], vec![0.0; n], vec![0.0; n]);
        attention_backward(
            &r, &q, &k, &v, &p, seq, heads, hd, &mut dq, &mut dk, &mut dv,
        );
        check(&q, &dq, |q| dot(&f(q, &k, &v).0, &r));
        check(&k, &dk, |k| dot(&f(&q, k, &v).0, &r));
        check(&v, &dv, |v| dot(&f(&q, &k, v).0, &r));
    }

    #[test]
    fn cross_entropy_with_z_loss_matches_finite_differences() {
        let mut rng = Rng::new(5);
        let (rows, vocab) = (3, 7);
        let logits = rng.vec(rows * vocab, 2.0);
        let targets = [1u32, 6, 0];
        let mut d = vec![0.0; logits.len()];
        let (loss, z) = cross_entropy(&logits, &targets, vocab, 1e-4, &mut d);
        assert!(z > 0.0 && loss > z);
        check(&logits, &d, |l| {
            let mut scratch = vec![0.0; l.len()];
            cross_entropy(l, &targets, vocab, 1e-4, &mut scratch).0 as f64
        });
        // uniform logits: loss = ln(vocab)
        let mut d = vec![0.0; vocab];
        let (loss, _) = cross_entropy(&vec![0.0; vocab], &[3], vocab, 0.0, &mut d);
        assert!((loss - (vocab as f32).ln()).abs() < 1e-6);
    }
}
