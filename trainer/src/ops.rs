//! CPU kernels of the OLMo block, forward and backward, in f32 over row-major buffers: GEMMs
//! through the `gemm` crate (runtime AVX2/AVX-512/FMA dispatch), the rest as row-parallel
//! rayon loops. They are the reference the GPU kernels are checked against, so each backward
//! pass is verified against finite differences in the tests.
//!
//! Determinism: every reduction runs in a fixed order whatever the thread count (rows are
//! independent; GEMM depth blocking depends on cache sizes, not threads), so a run gives the
//! same bits with 1 or 16 threads.
//!
//! Shapes: activations are `[rows, dim]`; a Linear weight is `[out, in]` as in torch
//! (`y = x Wᵀ`); q, k, v live in the fused `[rows, 3d]` output of `att_proj`.

use gemm::Parallelism;
use rayon::prelude::*;

/// Rows per rayon task for elementwise kernels: big enough to amortise scheduling.
const ROW_CHUNK: usize = 16;

/// Which normalisation the blocks use (`layer_norm_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NormKind {
    /// `F.layer_norm` (mean and variance).
    LayerNorm,
    /// RMSNorm: `x · rsqrt(mean(x²) + eps)`.
    Rms,
}

/// Normalises each row of `x` into `out` (times `weight` when affine); keeps mean and rstd.
#[allow(clippy::too_many_arguments)]
pub fn norm_forward(
    kind: NormKind,
    x: &[f32],
    dim: usize,
    eps: f32,
    weight: Option<&[f32]>,
    out: &mut [f32],
    mean: &mut [f32],
    rstd: &mut [f32],
) {
    out.par_chunks_mut(dim * ROW_CHUNK)
        .zip(x.par_chunks(dim * ROW_CHUNK))
        .zip(
            mean.par_chunks_mut(ROW_CHUNK)
                .zip(rstd.par_chunks_mut(ROW_CHUNK)),
        )
        .for_each(|((out, x), (mean, rstd))| {
            for (r, row) in x.chunks_exact(dim).enumerate() {
                let m = match kind {
                    NormKind::LayerNorm => row.iter().sum::<f32>() / dim as f32,
                    NormKind::Rms => 0.0,
                };
                let var = row.iter().map(|v| (v - m) * (v - m)).sum::<f32>() / dim as f32;
                let s = 1.0 / (var + eps).sqrt();
                let o = &mut out[r * dim..(r + 1) * dim];
                match weight {
                    Some(w) => {
                        for ((o, v), w) in o.iter_mut().zip(row).zip(w) {
                            *o = (v - m) * s * w;
                        }
                    }
                    None => {
                        for (o, v) in o.iter_mut().zip(row) {
                            *o = (v - m) * s;
                        }
                    }
                }
                mean[r] = m;
                rstd[r] = s;
            }
        });
}

/// Adds dL/dx to `dx` (and dL/dweight to `dweight` when affine) given dL/dout.
#[allow(clippy::too_many_arguments)]
pub fn norm_backward(
    kind: NormKind,
    dout: &[f32],
    x: &[f32],
    mean: &[f32],
    rstd: &[f32],
    dim: usize,
    weight: Option<&[f32]>,
    dx: &mut [f32],
    dweight: Option<&mut [f32]>,
) {
    if let Some(dw) = dweight {
        // A column sum over rows: sequential in row order, so it does not depend on threads.
        for (r, (d, row)) in dout.chunks_exact(dim).zip(x.chunks_exact(dim)).enumerate() {
            let (m, s) = (mean[r], rstd[r]);
            for ((g, d), v) in dw.iter_mut().zip(d).zip(row) {
                *g += d * (v - m) * s;
            }
        }
    }
    dx.par_chunks_mut(dim * ROW_CHUNK)
        .enumerate()
        .for_each(|(c, dx)| {
            for (i, dxr) in dx.chunks_exact_mut(dim).enumerate() {
                let r = c * ROW_CHUNK + i;
                let row = &x[r * dim..(r + 1) * dim];
                let d = &dout[r * dim..(r + 1) * dim];
                let (m, s) = (mean[r], rstd[r]);
                let dn = |j: usize| weight.map_or(d[j], |w| d[j] * w[j]);
                let (mut dmean, mut dnorm_norm) = (0.0f32, 0.0f32);
                for (j, v) in row.iter().enumerate() {
                    let g = dn(j);
                    dmean += g;
                    dnorm_norm += g * (v - m) * s;
                }
                dmean /= dim as f32;
                dnorm_norm /= dim as f32;
                if kind == NormKind::Rms {
                    dmean = 0.0;
                }
                for j in 0..dim {
                    dxr[j] += s * (dn(j) - dmean - (row[j] - m) * s * dnorm_norm);
                }
            }
        });
}

/// `dst := (accumulate ? dst : 0) + scale · lhs · rhs`, with explicit row and column strides.
/// Safety of the raw call rests on the asserted extents.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_strided(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    dst_rs: usize,
    accumulate: bool,
    lhs: &[f32],
    lhs_rs: usize,
    lhs_cs: usize,
    rhs: &[f32],
    rhs_rs: usize,
    rhs_cs: usize,
    scale: f32,
    parallel: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    let last = |rs: usize, cs: usize, r: usize, c: usize| (r - 1) * rs + (c - 1) * cs;
    assert!(last(dst_rs, 1, m, n) < dst.len());
    if k > 0 {
        assert!(last(lhs_rs, lhs_cs, m, k) < lhs.len());
        assert!(last(rhs_rs, rhs_cs, k, n) < rhs.len());
    }
    // Safety: the extents were checked above.
    unsafe {
        gemm_raw(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            dst_rs,
            accumulate,
            lhs.as_ptr(),
            lhs_rs,
            lhs_cs,
            rhs.as_ptr(),
            rhs_rs,
            rhs_cs,
            scale,
            parallel,
        )
    }
}

/// [`gemm_strided`] on raw pointers, for parallel tasks that write disjoint, interleaved
/// regions of one buffer (heads of the attention output).
///
/// # Safety
/// The strided extents must lie inside live allocations, and no other task may touch the
/// written elements.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_raw(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    lhs: *const f32,
    lhs_rs: usize,
    lhs_cs: usize,
    rhs: *const f32,
    rhs_rs: usize,
    rhs_cs: usize,
    scale: f32,
    parallel: bool,
) {
    let par = if parallel {
        Parallelism::Rayon(0)
    } else {
        Parallelism::None
    };
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs as isize,
        accumulate,
        lhs,
        lhs_cs as isize,
        lhs_rs as isize,
        rhs,
        rhs_cs as isize,
        rhs_rs as isize,
        1.0,
        scale,
        false,
        false,
        false,
        par,
    )
}

/// `out[r, o] = Σ_i x[r, i] · w[o, i]` (no bias: OLMo's `include_bias=false`).
pub fn matmul_forward(x: &[f32], w: &[f32], rows: usize, inp: usize, outp: usize, out: &mut [f32]) {
    gemm_strided(
        rows, outp, inp, out, outp, false, x, inp, 1, w, 1, inp, 1.0, true,
    );
}

/// Writes dL/dx into `dx` and adds dL/dw into `dw`, given dL/dout.
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
    gemm_strided(
        rows, inp, outp, dx, inp, false, dout, outp, 1, w, inp, 1, 1.0, true,
    );
    gemm_strided(
        outp, inp, rows, dw, inp, true, dout, 1, outp, x, inp, 1, 1.0, true,
    );
}

fn sigmoid(v: f32) -> f32 {
    1.0 / (1.0 + (-v).exp())
}

/// OLMo's SwiGLU: the input's first half is the value, the second the gate:
/// `out = silu(gate) * value`, `x` is `[rows, 2h]`, `out` is `[rows, h]`.
pub fn swiglu_forward(x: &[f32], h: usize, out: &mut [f32]) {
    out.par_chunks_mut(h * ROW_CHUNK)
        .zip(x.par_chunks(2 * h * ROW_CHUNK))
        .for_each(|(out, x)| {
            for (o, row) in out.chunks_exact_mut(h).zip(x.chunks_exact(2 * h)) {
                let (v, g) = row.split_at(h);
                for ((o, v), g) in o.iter_mut().zip(v).zip(g) {
                    *o = g * sigmoid(*g) * v;
                }
            }
        });
}

/// Writes dL/dx (`[rows, 2h]`) given dL/dout.
pub fn swiglu_backward(dout: &[f32], x: &[f32], h: usize, dx: &mut [f32]) {
    dx.par_chunks_mut(2 * h * ROW_CHUNK)
        .zip(x.par_chunks(2 * h * ROW_CHUNK))
        .zip(dout.par_chunks(h * ROW_CHUNK))
        .for_each(|((dx, x), dout)| {
            for ((dxr, row), d) in dx
                .chunks_exact_mut(2 * h)
                .zip(x.chunks_exact(2 * h))
                .zip(dout.chunks_exact(h))
            {
                let (dv, dg) = dxr.split_at_mut(h);
                for i in 0..h {
                    let (v, g) = (row[i], row[h + i]);
                    let sig = sigmoid(g);
                    dv[i] = d[i] * g * sig;
                    dg[i] = d[i] * v * sig * (1.0 + g * (1.0 - sig));
                }
            }
        });
}

/// RoPE sin/cos tables `[seq, head_dim/2]`, computed in f32 as OLMo does (`inv_freq = 1 /
/// theta^(2j/hd)`, `freqs = t · inv_freq`).
pub struct RopeTable {
    pub sin: Vec<f32>,
    pub cos: Vec<f32>,
    pub half: usize,
}

impl RopeTable {
    pub fn new(seq: usize, head_dim: usize, theta: f32) -> RopeTable {
        let half = head_dim / 2;
        let inv: Vec<f32> = (0..half)
            .map(|j| 1.0 / theta.powf((2 * j) as f32 / head_dim as f32))
            .collect();
        let (mut sin, mut cos) = (
            Vec::with_capacity(seq * half),
            Vec::with_capacity(seq * half),
        );
        for t in 0..seq {
            for f in &inv {
                let (s, c) = (t as f32 * f).sin_cos();
                sin.push(s);
                cos.push(c);
            }
        }
        RopeTable { sin, cos, half }
    }
}

/// RoPE, NeoX "rotate half" layout, in place on the first `heads` heads of rows `stride` wide:
/// q's and then k's heads of fused `[b·seq, d + 2·kvd]` rows. `inverse` applies the
/// transpose, which is the backward pass (the rotation is orthogonal).
pub fn rope(
    x: &mut [f32],
    stride: usize,
    heads: usize,
    seq: usize,
    table: &RopeTable,
    inverse: bool,
) {
    let half = table.half;
    let hd = 2 * half;
    x.par_chunks_mut(stride).enumerate().for_each(|(r, row)| {
        let t = r % seq;
        let (sin, cos) = (
            &table.sin[t * half..(t + 1) * half],
            &table.cos[t * half..(t + 1) * half],
        );
        for head in row[..heads * hd].chunks_exact_mut(hd) {
            let (a, b) = head.split_at_mut(half);
            for j in 0..half {
                let s = if inverse { -sin[j] } else { sin[j] };
                let (x1, x2) = (a[j], b[j]);
                a[j] = x1 * cos[j] - x2 * s;
                b[j] = x2 * cos[j] + x1 * s;
            }
        }
    });
}

/// Grouped-query attention's layout change: fused `[rows, d + 2·kvd]` q|k|v rows (`kv_heads`
/// k and v heads of `hd`) to `[rows, 3d]` rows in which each k and v head is repeated for the
/// `heads / kv_heads` consecutive q heads sharing it (OLMo's `repeat_interleave`), the layout
/// the attention reads.
pub fn repeat_kv(x: &[f32], heads: usize, kv_heads: usize, hd: usize) -> Vec<f32> {
    let (d, kvd) = (heads * hd, kv_heads * hd);
    let group = heads / kv_heads;
    let mut out = Vec::with_capacity(x.len() / (d + 2 * kvd) * 3 * d);
    for row in x.chunks_exact(d + 2 * kvd) {
        out.extend_from_slice(&row[..d]);
        for part in row[d..].chunks_exact(kvd) {
            for head in part.chunks_exact(hd) {
                (0..group).for_each(|_| out.extend_from_slice(head));
            }
        }
    }
    out
}

/// The transpose of [`repeat_kv`], its backward pass: each k and v head's gradient is the sum
/// over the q heads sharing it, added in head order.
pub fn sum_kv(dx: &[f32], heads: usize, kv_heads: usize, hd: usize) -> Vec<f32> {
    let (d, kvd) = (heads * hd, kv_heads * hd);
    let group = heads / kv_heads;
    let mut out = Vec::with_capacity(dx.len() / (3 * d) * (d + 2 * kvd));
    for row in dx.chunks_exact(3 * d) {
        out.extend_from_slice(&row[..d]);
        for part in row[d..].chunks_exact(d) {
            for shared in part.chunks_exact(group * hd) {
                let mut sum = shared[..hd].to_vec();
                for head in shared[hd..].chunks_exact(hd) {
                    sum.iter_mut().zip(head).for_each(|(s, v)| *s += v);
                }
                out.extend_from_slice(&sum);
            }
        }
    }
    out
}

/// Causal softmax in place over one row of scaled scores at position `pos` of a document
/// that starts at `from`: entries `from..=pos` become probabilities, the others 0. Shared by
/// the CPU attention and the CUDA emulator.
pub fn softmax_causal_row(row: &mut [f32], from: usize, pos: usize) {
    let max = row[from..=pos]
        .iter()
        .copied()
        .fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for x in &mut row[from..=pos] {
        *x = (*x - max).exp();
        sum += *x;
    }
    let inv = 1.0 / sum;
    row[from..=pos].iter_mut().for_each(|x| *x *= inv);
    row[..from].fill(0.0);
    row[pos + 1..].fill(0.0);
}

/// OLMo's `clip_qkv`: clamps the fused q, k, v to [−c, c] in place. Returns which entries it
/// clipped, one bit each (entry `32w + i` is bit `i` of word `w`), for the backward pass:
/// torch's clamp passes the gradient of the entries within the bounds, ends included.
pub fn clip_qkv(x: &mut [f32], c: f32) -> Vec<u32> {
    x.chunks_mut(32)
        .map(|chunk| {
            let mut bits = 0u32;
            for (i, v) in chunk.iter_mut().enumerate() {
                if *v > c {
                    *v = c;
                } else if *v < -c {
                    *v = -c;
                } else {
                    continue;
                }
                bits |= 1 << i;
            }
            bits
        })
        .collect()
}

/// The clamp's backward: the gradient of each entry [`clip_qkv`] clipped is 0.
pub fn clip_qkv_backward(dx: &mut [f32], clipped: &[u32]) {
    for (chunk, &bits) in dx.chunks_mut(32).zip(clipped) {
        for (i, g) in chunk.iter_mut().enumerate() {
            if bits >> i & 1 == 1 {
                *g = 0.0;
            }
        }
    }
}

/// How many documents the sequences of `seq` positions hold, by their [`document_starts`]:
/// one more than each sequence's boundaries (its first may continue from before it).
pub fn document_count(starts: &[u32], seq: usize) -> u64 {
    starts
        .chunks(seq)
        .map(|w| w.windows(2).filter(|p| p[0] != p[1]).count() as u64 + 1)
        .sum()
}

/// Where each position's document starts within its sequence, for attention within documents
/// (OLMo's `generate_doc_lengths`): a document ends with its EOS token, so a position starts
/// one after the last EOS before it. `tokens` holds sequences of `seq` positions.
pub fn document_starts(tokens: &[u32], seq: usize, eos: u32) -> Vec<u32> {
    let mut starts = Vec::with_capacity(tokens.len());
    for s in tokens.chunks(seq) {
        let mut from = 0;
        for (i, &tok) in s.iter().enumerate() {
            starts.push(from);
            if tok == eos {
                from = i as u32 + 1;
            }
        }
    }
    starts
}

/// The softmax backward over one row, in place on `dp`: `dS = P ⊙ (dP − Σ P·dP) · scale` for
/// entries `..=pos`, 0 after.
pub fn softmax_causal_row_backward(p: &[f32], dp: &mut [f32], pos: usize, scale: f32) {
    let w: f32 = dp[..=pos].iter().zip(&p[..=pos]).map(|(a, b)| a * b).sum();
    for (x, pv) in dp[..=pos].iter_mut().zip(&p[..=pos]) {
        *x = pv * (*x - w) * scale;
    }
    dp[pos + 1..].fill(0.0);
}

/// A raw pointer that parallel tasks writing disjoint regions can share.
#[derive(Clone, Copy)]
struct SharedMut(*mut f32, usize);
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}

impl SharedMut {
    fn new(s: &mut [f32]) -> SharedMut {
        SharedMut(s.as_mut_ptr(), s.len())
    }
    /// The pointer `offset` elements in, after checking that a `[rows, cols]` block with row
    /// stride `rs` starting there stays inside the buffer.
    fn at(&self, offset: usize, rows: usize, cols: usize, rs: usize) -> *mut f32 {
        assert!(offset + (rows - 1) * rs + cols <= self.1);
        // Safety: in bounds, checked above.
        unsafe { self.0.add(offset) }
    }
}

/// Causal softmax attention for `b` sequences of `seq` positions, reading q, k, v from the
/// fused `[b·seq, 3d]` rows (`d = heads · hd`, scale 1/sqrt(hd)); writes `[b·seq, d]` into
/// `out` and keeps the probabilities `[b, heads, seq, seq]` for the backward pass. With
/// `starts` (see [`document_starts`]) a position attends only within its document; the
/// backward pass needs nothing more, as the probabilities outside are 0.
#[allow(clippy::too_many_arguments)]
pub fn attention_forward(
    qkv: &[f32],
    b: usize,
    seq: usize,
    heads: usize,
    hd: usize,
    starts: Option<&[u32]>,
    out: &mut [f32],
    probs: &mut [f32],
) {
    let d = heads * hd;
    assert_eq!(probs.len(), b * heads * seq * seq);
    assert_eq!(out.len(), b * seq * d);
    let scale = 1.0 / (hd as f32).sqrt();
    let out = SharedMut::new(out);
    probs
        .par_chunks_mut(seq * seq)
        .enumerate()
        .for_each(|(bh, p)| {
            let (bi, h) = (bh / heads, bh % heads);
            let base = bi * seq * 3 * d + h * hd;
            let q = &qkv[base..];
            let k = &qkv[base + d..];
            let v = &qkv[base + 2 * d..];
            gemm_strided(
                seq,
                seq,
                hd,
                p,
                seq,
                false,
                q,
                3 * d,
                1,
                k,
                1,
                3 * d,
                scale,
                false,
            );
            for (t, row) in p.chunks_exact_mut(seq).enumerate() {
                let from = starts.map_or(0, |s| s[bi * seq + t] as usize);
                softmax_causal_row(row, from, t);
            }
            assert!(seq * seq <= p.len() && (seq - 1) * 3 * d + hd <= v.len());
            // Safety: task (bi, h) writes rows bi·seq.. and columns h·hd.. only.
            unsafe {
                gemm_raw(
                    seq,
                    hd,
                    seq,
                    out.at(bi * seq * d + h * hd, seq, hd, d),
                    d,
                    false,
                    p.as_ptr(),
                    seq,
                    1,
                    v.as_ptr(),
                    3 * d,
                    1,
                    1.0,
                    false,
                )
            };
        });
}

/// Writes dL/dq, dL/dk, dL/dv into the fused `[b·seq, 3d]` `dqkv` given dL/dout and the
/// forward's probabilities.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    dout: &[f32],
    qkv: &[f32],
    probs: &[f32],
    b: usize,
    seq: usize,
    heads: usize,
    hd: usize,
    dqkv: &mut [f32],
) {
    let d = heads * hd;
    let scale = 1.0 / (hd as f32).sqrt();
    let dst = SharedMut::new(dqkv);
    (0..b * heads).into_par_iter().for_each(|bh| {
        let (bi, h) = (bh / heads, bh % heads);
        let p = &probs[bh * seq * seq..(bh + 1) * seq * seq];
        let base = bi * seq * 3 * d + h * hd;
        let (q, k, v) = (&qkv[base..], &qkv[base + d..], &qkv[base + 2 * d..]);
        let dout = &dout[bi * seq * d + h * hd..];
        assert!((seq - 1) * d + hd <= dout.len() && (seq - 1) * 3 * d + hd <= v.len());
        // Safety (here and below): task (bi, h) writes rows bi·seq.. and head h's columns of
        // q, k, v only; the extents are checked by `at`.
        // dV = Pᵀ dO
        unsafe {
            gemm_raw(
                seq,
                hd,
                seq,
                dst.at(base + 2 * d, seq, hd, 3 * d),
                3 * d,
                false,
                p.as_ptr(),
                1,
                seq,
                dout.as_ptr(),
                d,
                1,
                1.0,
                false,
            )
        };
        // dP = dO Vᵀ, then dS = P ⊙ (dP − rowsum(P ⊙ dP)) · scale
        let mut ds = vec![0.0f32; seq * seq];
        gemm_strided(
            seq,
            seq,
            hd,
            &mut ds,
            seq,
            false,
            dout,
            d,
            1,
            v,
            1,
            3 * d,
            1.0,
            false,
        );
        for (t, (row, prow)) in ds
            .chunks_exact_mut(seq)
            .zip(p.chunks_exact(seq))
            .enumerate()
        {
            softmax_causal_row_backward(prow, row, t, scale);
        }
        // dQ = dS K, dK = dSᵀ Q
        unsafe {
            gemm_raw(
                seq,
                hd,
                seq,
                dst.at(base, seq, hd, 3 * d),
                3 * d,
                false,
                ds.as_ptr(),
                seq,
                1,
                k.as_ptr(),
                3 * d,
                1,
                1.0,
                false,
            );
            gemm_raw(
                seq,
                hd,
                seq,
                dst.at(base + d, seq, hd, 3 * d),
                3 * d,
                false,
                ds.as_ptr(),
                1,
                seq,
                q.as_ptr(),
                3 * d,
                1,
                1.0,
                false,
            );
        }
    });
}

/// Targets equal to this are not scored (OLMo's label -100).
pub const IGNORE: u32 = u32::MAX;

/// Per-row cross-entropy of `logits` `[rows, vocab]` against `targets`, with the z-loss term
/// `z_loss · logsumexp²`. Returns per-row (log p(target), z term), both 0 for ignored rows.
/// When `grad_scale` is given, overwrites `logits` with `grad_scale · dL/dlogits` (the buffer
/// is not needed afterwards, and logits are the largest activation).
pub fn cross_entropy(
    logits: &mut [f32],
    targets: &[u32],
    vocab: usize,
    z_loss: f32,
    grad_scale: Option<f32>,
) -> Vec<(f32, f32)> {
    let mut out = vec![(0.0f32, 0.0f32); targets.len()];
    logits
        .par_chunks_mut(vocab)
        .zip(targets.par_iter())
        .zip(out.par_iter_mut())
        .for_each(|((row, &t), out)| {
            if t == IGNORE {
                if grad_scale.is_some() {
                    row.fill(0.0);
                }
                return;
            }
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let target = row[t as usize];
            match grad_scale {
                None => {
                    let sum: f32 = row.iter().map(|v| (v - max).exp()).sum();
                    let lse = max + sum.ln();
                    *out = (target - lse, z_loss * lse * lse);
                }
                Some(s) => {
                    // One exp per logit: keep exp(v - max) in place, then scale it into the
                    // gradient softmax · (1 + 2 z lse) · s.
                    let mut sum = 0.0f32;
                    for v in row.iter_mut() {
                        *v = (*v - max).exp();
                        sum += *v;
                    }
                    let lse = max + sum.ln();
                    *out = (target - lse, z_loss * lse * lse);
                    let k = (1.0 + 2.0 * z_loss * lse) * s / sum;
                    row.iter_mut().for_each(|v| *v *= k);
                    row[t as usize] -= s;
                }
            }
        });
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::xorshift::XorShift;

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
    fn norm_backward_matches_finite_differences() {
        for kind in [NormKind::LayerNorm, NormKind::Rms] {
            for affine in [false, true] {
                let mut rng = XorShift::new(1);
                let (rows, dim) = (3, 8);
                let x = rng.vec(rows * dim, 1.0);
                let r = rng.vec(rows * dim, 1.0);
                let w: Vec<f32> = rng.vec(dim, 0.5).iter().map(|v| v + 1.0).collect();
                let weight = affine.then_some(&w[..]);
                let fwd = |x: &[f32], w: Option<&[f32]>| {
                    let mut out = vec![0.0; rows * dim];
                    let (mut m, mut s) = (vec![0.0; rows], vec![0.0; rows]);
                    norm_forward(kind, x, dim, 1e-5, w, &mut out, &mut m, &mut s);
                    (out, m, s)
                };
                let (_, m, s) = fwd(&x, weight);
                let mut dx = vec![0.0; rows * dim];
                let mut dw = vec![0.0; dim];
                norm_backward(
                    kind,
                    &r,
                    &x,
                    &m,
                    &s,
                    dim,
                    weight,
                    &mut dx,
                    affine.then_some(&mut dw[..]),
                );
                check(&x, &dx, |x| dot(&fwd(x, weight).0, &r));
                if affine {
                    check(&w, &dw, |w| dot(&fwd(&x, Some(w)).0, &r));
                }
            }
        }
    }

    #[test]
    fn matmul_backward_matches_finite_differences() {
        let mut rng = XorShift::new(2);
        let (rows, inp, outp) = (3, 5, 4);
        let x = rng.vec(rows * inp, 1.0);
        let w = rng.vec(outp * inp, 1.0);
        let r = rng.vec(rows * outp, 1.0);
        let fwd = |x: &[f32], w: &[f32]| {
            let mut out = vec![0.0; rows * outp];
            matmul_forward(x, w, rows, inp, outp, &mut out);
            out
        };
        // forward equals the naive triple loop
        let y = fwd(&x, &w);
        for rr in 0..rows {
            for o in 0..outp {
                let naive: f32 = (0..inp).map(|i| x[rr * inp + i] * w[o * inp + i]).sum();
                assert!((naive - y[rr * outp + o]).abs() < 1e-5);
            }
        }
        let mut dx = vec![0.0; rows * inp];
        let mut dw = vec![0.0; outp * inp];
        matmul_backward(&r, &x, &w, rows, inp, outp, &mut dx, &mut dw);
        check(&x, &dx, |x| dot(&fwd(x, &w), &r));
        check(&w, &dw, |w| dot(&fwd(&x, w), &r));
    }

    #[test]
    fn swiglu_backward_matches_finite_differences_and_gates_with_the_second_half() {
        let mut rng = XorShift::new(3);
        let (rows, h) = (2, 3);
        let x = rng.vec(rows * 2 * h, 2.0);
        let r = rng.vec(rows * h, 1.0);
        let fwd = |x: &[f32]| {
            let mut out = vec![0.0; rows * h];
            swiglu_forward(x, h, &mut out);
            out
        };
        // value 2, gate 0: silu(0) = 0, so the output is 0; swapped it would be 2·silu(2)·0... = 0
        // too, so use value 0, gate 2: silu(2)·0 = 0, while a swapped layout gives silu(0)·2 = 0.
        // A decisive case: value 1, gate 10 ⇒ ≈ 10; swapped ⇒ silu(1)·10 ≈ 7.31.
        let mut one = vec![0.0; 1];
        swiglu_forward(&[1.0, 10.0], 1, &mut one);
        assert!((one[0] - 10.0 * sigmoid(10.0)).abs() < 1e-5);
        let mut dx = vec![0.0; rows * 2 * h];
        swiglu_backward(&r, &x, h, &mut dx);
        check(&x, &dx, |x| dot(&fwd(x), &r));
    }

    #[test]
    fn rope_rotates_half_pairs_and_its_inverse_is_the_backward_pass() {
        let mut rng = XorShift::new(4);
        // grouped-query rows: 2 q heads, 1 k head, 1 v head
        let (seq, heads, kv_heads, hd) = (3, 2, 1, 4);
        let w = (heads + 2 * kv_heads) * hd;
        let table = RopeTable::new(seq, hd, 10_000.0);
        let x = rng.vec(seq * w, 1.0);
        let r = rng.vec(seq * w, 1.0);
        let fwd = |x: &[f32]| {
            let mut y = x.to_vec();
            rope(&mut y, w, heads + kv_heads, seq, &table, false);
            y
        };
        let y = fwd(&x);
        // position 0 is the identity; v (the last head) is never rotated
        assert_eq!(&y[..w], &x[..w]);
        assert_eq!(&y[w + 3 * hd..2 * w], &x[w + 3 * hd..2 * w]);
        // position 1, head 0, pair (0, 2): angle 1 · theta^0 = 1 radian; k's head alike
        for at in [w, w + 2 * hd] {
            let (a, b) = (x[at], x[at + 2]);
            assert!((y[at] - (a * 1f32.cos() - b * 1f32.sin())).abs() < 1e-6);
        }
        let mut back = r.clone();
        rope(&mut back, w, heads + kv_heads, seq, &table, true);
        check(&x, &back, |x| dot(&fwd(x), &r));
    }

    #[test]
    fn kv_heads_repeat_for_the_q_heads_sharing_them_and_sum_back() {
        let mut rng = XorShift::new(12);
        let (rows, heads, kv_heads, hd) = (3, 6, 2, 2);
        let (d, kvd) = (heads * hd, kv_heads * hd);
        let x = rng.vec(rows * (d + 2 * kvd), 1.0);
        let y = repeat_kv(&x, heads, kv_heads, hd);
        assert_eq!(y.len(), rows * 3 * d);
        // row 1, q head 4 reads k head 1 (4 / 3) and v head 1
        let (xr, yr) = (&x[d + 2 * kvd..], &y[3 * d..]);
        assert_eq!(&yr[..d], &xr[..d]);
        assert_eq!(&yr[d + 4 * hd..d + 5 * hd], &xr[d + hd..d + 2 * hd]);
        assert_eq!(
            &yr[2 * d + 4 * hd..2 * d + 5 * hd],
            &xr[d + kvd + hd..d + kvd + 2 * hd]
        );
        assert_eq!(&yr[d..d + hd], &yr[d + 2 * hd..d + 3 * hd]);
        // sum_kv is its transpose: <repeat(x), r> = <x, sum(r)>
        let r = rng.vec(rows * 3 * d, 1.0);
        let back = sum_kv(&r, heads, kv_heads, hd);
        assert_eq!(back.len(), x.len());
        assert!((dot(&y, &r) - dot(&x, &back)).abs() < 1e-4);
        // with as many kv heads as q heads both are the identity
        assert_eq!(repeat_kv(&r, heads, heads, hd), r);
        assert_eq!(sum_kv(&r, heads, heads, hd), r);
    }

    #[test]
    fn attention_backward_matches_finite_differences() {
        let mut rng = XorShift::new(5);
        let (b, seq, heads, hd) = (2, 4, 2, 3);
        let d = heads * hd;
        let qkv = rng.vec(b * seq * 3 * d, 1.0);
        let r = rng.vec(b * seq * d, 1.0);
        let fwd = |qkv: &[f32]| {
            let mut out = vec![0.0; b * seq * d];
            let mut probs = vec![0.0; b * heads * seq * seq];
            attention_forward(qkv, b, seq, heads, hd, None, &mut out, &mut probs);
            (out, probs)
        };
        let (out, probs) = fwd(&qkv);
        // position 0 attends only to itself: its output is its own v
        for h in 0..heads {
            for i in 0..hd {
                assert!((out[h * hd + i] - qkv[2 * d + h * hd + i]).abs() < 1e-6);
            }
        }
        let mut dqkv = vec![0.0; qkv.len()];
        attention_backward(&r, &qkv, &probs, b, seq, heads, hd, &mut dqkv);
        check(&qkv, &dqkv, |x| dot(&fwd(x).0, &r));
    }

    #[test]
    fn attention_within_documents_sees_only_its_document() {
        let mut rng = XorShift::new(7);
        let (b, seq, heads, hd) = (2, 5, 2, 3);
        let d = heads * hd;
        // sequence 0: a document of 2 (its EOS, 9, included), then one of 3; sequence 1 ends
        // with an EOS and so is one document
        let tokens = [4, 9, 5, 6, 7, 1, 2, 3, 4, 9];
        let starts = document_starts(&tokens, seq, 9);
        assert_eq!(starts, [0, 0, 2, 2, 2, 0, 0, 0, 0, 0]);
        assert_eq!(document_count(&starts, seq), 3);
        let qkv = rng.vec(b * seq * 3 * d, 1.0);
        let r = rng.vec(b * seq * d, 1.0);
        let fwd = |qkv: &[f32]| {
            let mut out = vec![0.0; b * seq * d];
            let mut probs = vec![0.0; b * heads * seq * seq];
            attention_forward(qkv, b, seq, heads, hd, Some(&starts), &mut out, &mut probs);
            (out, probs)
        };
        let (out, probs) = fwd(&qkv);
        // the second document's first position attends only to itself
        for h in 0..heads {
            for i in 0..hd {
                let at = 2 * 3 * d + 2 * d + h * hd + i;
                assert!((out[2 * d + h * hd + i] - qkv[at]).abs() < 1e-6);
            }
        }
        // the first document changes nothing in the second
        let mut other = qkv.clone();
        other[..2 * 3 * d].iter_mut().for_each(|x| *x += 1.0);
        assert_eq!(fwd(&other).0[2 * d..5 * d], out[2 * d..5 * d]);
        // sequence 1 is one document: plain causal attention
        let mut plain_out = vec![0.0; b * seq * d];
        let mut plain_probs = vec![0.0; b * heads * seq * seq];
        attention_forward(
            &qkv,
            b,
            seq,
            heads,
            hd,
            None,
            &mut plain_out,
            &mut plain_probs,
        );
        assert_eq!(out[seq * d..], plain_out[seq * d..]);
        // the backward pass, unchanged, is the masked attention's gradient
        let mut dqkv = vec![0.0; qkv.len()];
        attention_backward(&r, &qkv, &probs, b, seq, heads, hd, &mut dqkv);
        check(&qkv, &dqkv, |x| dot(&fwd(x).0, &r));
    }

    #[test]
    fn clip_qkv_clamps_and_stops_the_gradient_of_what_it_clipped() {
        let mut x: Vec<f32> = (0..40).map(|i| (i as f32 - 20.0) * 0.5).collect();
        let before = x.clone();
        let bits = clip_qkv(&mut x, 8.0);
        assert_eq!(bits.len(), 2);
        for (i, (&a, &b)) in before.iter().zip(&x).enumerate() {
            assert_eq!(b, a.clamp(-8.0, 8.0));
            // the ends themselves pass their gradient, as torch's clamp
            assert_eq!(bits[i / 32] >> (i % 32) & 1 == 1, a.abs() > 8.0, "{i}: {a}");
        }
        let mut g = vec![1.0f32; 40];
        clip_qkv_backward(&mut g, &bits);
        assert_eq!(g.iter().filter(|&&v| v == 0.0).count(), 7);
        assert_eq!(g[4], 1.0); // -8 exactly
    }

    #[test]
    fn cross_entropy_with_z_loss_matches_finite_differences() {
        let mut rng = XorShift::new(6);
        let (rows, vocab) = (3, 7);
        let logits = rng.vec(rows * vocab, 3.0);
        let targets = [2u32, IGNORE, 6];
        let loss = |l: &[f32]| {
            let mut l = l.to_vec();
            cross_entropy(&mut l, &targets, vocab, 1e-2, None)
                .iter()
                .map(|(lp, z)| -(*lp as f64) + *z as f64)
                .sum::<f64>()
        };
        let mut grad = logits.clone();
        let per_row = cross_entropy(&mut grad, &targets, vocab, 1e-2, Some(1.0));
        assert_eq!(per_row[1], (0.0, 0.0));
        assert!(grad[vocab..2 * vocab].iter().all(|&g| g == 0.0));
        check(&logits, &grad, loss);
    }

    #[test]
    fn kernels_give_the_same_bits_on_one_thread_and_many() {
        let mut rng = XorShift::new(7);
        let (rows, inp, outp) = (70, 300, 130);
        let x = rng.vec(rows * inp, 1.0);
        let w = rng.vec(outp * inp, 1.0);
        let run = || {
            let mut y = vec![0.0; rows * outp];
            matmul_forward(&x, &w, rows, inp, outp, &mut y);
            let mut dx = vec![0.0; rows * inp];
            let mut dw = vec![0.0; outp * inp];
            matmul_backward(&y, &x, &w, rows, inp, outp, &mut dx, &mut dw);
            (y, dx, dw)
        };
        let one = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap()
            .install(run);
        let four = rayon::ThreadPoolBuilder::new()
            .num_threads(4)
            .build()
            .unwrap()
            .install(run);
        assert!(one == four);
    }
}
