//! The CUDA engine's GEMMs as plain descriptions, separate from cuBLAS so they can be checked
//! without a GPU: the tests run them through a column-major reference of
//! `cublasGemmStridedBatchedEx` on host memory and compare with the CPU kernels.
//!
//! Convention: every matrix is row-major. A spec computes, for each of `batch` matrices,
//! `C[m×n] = alpha · op(A) · op(B) + beta · C` with `op(A)` m×k (A stored k×m when `ta`) and
//! `op(B)` k×n (stored n×k when `tb`). cuBLAS, being column-major, is handed the transposed
//! problem `Cᵀ = op(B)ᵀ · op(A)ᵀ` on the same buffers.

/// A device buffer of f32 (or its bf16 copy) by address.
#[derive(Clone, Copy, Debug)]
pub struct Buf {
    pub ptr: u64,
    pub bf16: bool,
}

impl Buf {
    pub fn f32(ptr: u64) -> Buf {
        Buf { ptr, bf16: false }
    }
    /// The operand starting `offset` elements in, with `ld` elements per row.
    pub fn at(&self, offset: usize, ld: usize) -> Operand {
        Operand {
            ptr: self.ptr + (offset * if self.bf16 { 2 } else { 4 }) as u64,
            ld,
            bf16: self.bf16,
        }
    }
}

/// A GEMM operand: address, leading dimension (elements), element type.
#[derive(Clone, Copy, Debug)]
pub struct Operand {
    pub ptr: u64,
    pub ld: usize,
    pub bf16: bool,
}

#[derive(Clone, Copy, Debug)]
pub struct GemmSpec {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub a: Operand,
    pub ta: bool,
    pub b: Operand,
    pub tb: bool,
    /// Output address and leading dimension; the output is f32, or bf16 with `c_bf16`
    /// (accumulation is f32 either way; `beta` must then be 0).
    pub c: u64,
    pub ldc: usize,
    pub c_bf16: bool,
    pub alpha: f32,
    pub beta: f32,
    pub batch: usize,
    /// Element strides between batch matrices of A, B and C.
    pub sa: usize,
    pub sb: usize,
    pub sc: usize,
}

/// `cublasGemmStridedBatchedEx`'s arguments for a spec (column-major, the problem transposed).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CublasArgs {
    pub trans_a: bool,
    pub trans_b: bool,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub a: u64,
    pub lda: usize,
    pub stride_a: usize,
    pub b: u64,
    pub ldb: usize,
    pub stride_b: usize,
    pub c: u64,
    pub ldc: usize,
    pub stride_c: usize,
    pub batch: usize,
}

pub fn cublas_args(s: &GemmSpec) -> CublasArgs {
    CublasArgs {
        trans_a: s.tb,
        trans_b: s.ta,
        m: s.n,
        n: s.m,
        k: s.k,
        a: s.b.ptr,
        lda: s.b.ld,
        stride_a: s.sb,
        b: s.a.ptr,
        ldb: s.a.ld,
        stride_b: s.sa,
        c: s.c,
        ldc: s.ldc,
        stride_c: s.sc,
        batch: s.batch,
    }
}

/// `y = x Wᵀ`: x `[rows, inp]`, W `[outp, inp]`, y `[rows, outp]`.
pub fn linear_fwd(x: Buf, w: Buf, y: Buf, rows: usize, inp: usize, outp: usize) -> GemmSpec {
    GemmSpec {
        m: rows,
        n: outp,
        k: inp,
        a: x.at(0, inp),
        ta: false,
        b: w.at(0, inp),
        tb: true,
        c: y.ptr,
        ldc: outp,
        c_bf16: y.bf16,
        alpha: 1.0,
        beta: 0.0,
        batch: 1,
        sa: 0,
        sb: 0,
        sc: 0,
    }
}

/// `dx = dy W` (overwrites dx).
pub fn linear_dx(dy: Buf, w: Buf, dx: Buf, rows: usize, inp: usize, outp: usize) -> GemmSpec {
    GemmSpec {
        m: rows,
        n: inp,
        k: outp,
        a: dy.at(0, outp),
        ta: false,
        b: w.at(0, inp),
        tb: false,
        c: dx.ptr,
        ldc: inp,
        c_bf16: dx.bf16,
        alpha: 1.0,
        beta: 0.0,
        batch: 1,
        sa: 0,
        sb: 0,
        sc: 0,
    }
}

/// `dW += dyᵀ x`.
pub fn linear_dw(dy: Buf, x: Buf, dw: u64, rows: usize, inp: usize, outp: usize) -> GemmSpec {
    GemmSpec {
        m: outp,
        n: inp,
        k: rows,
        a: dy.at(0, outp),
        ta: true,
        b: x.at(0, inp),
        tb: false,
        c: dw,
        ldc: inp,
        c_bf16: false,
        alpha: 1.0,
        beta: 1.0,
        batch: 1,
        sa: 0,
        sb: 0,
        sc: 0,
    }
}

/// Attention over fused `[b·t, 3d]` qkv rows, all heads of one sequence per GEMM (heads are
/// `hd` columns apart); probabilities `[b, heads, t, t]`; outputs `[b·t, d]`.
#[derive(Clone, Copy, Debug)]
pub struct Attn {
    pub t: usize,
    pub heads: usize,
    pub hd: usize,
}

impl Attn {
    fn d(&self) -> usize {
        self.heads * self.hd
    }
    fn qkv_row(&self, bi: usize) -> usize {
        bi * self.t * 3 * self.d()
    }
    fn probs_at(&self, bi: usize) -> usize {
        bi * self.heads * self.t * self.t
    }
    fn spec(
        &self,
        (m, n, k): (usize, usize, usize),
        (a, ta, sa): (Operand, bool, usize),
        (b, tb, sb): (Operand, bool, usize),
        (c, sc): (Operand, usize),
        alpha: f32,
    ) -> GemmSpec {
        GemmSpec {
            m,
            n,
            k,
            a,
            ta,
            b,
            tb,
            c: c.ptr,
            ldc: c.ld,
            c_bf16: c.bf16,
            alpha,
            beta: 0.0,
            batch: self.heads,
            sa,
            sb,
            sc,
        }
    }

    /// `S = scale · Q Kᵀ` into the probabilities buffer (softmax follows in place).
    pub fn scores(&self, bi: usize, qkv: Buf, probs: u64, scale: f32) -> GemmSpec {
        let (t, d, hd) = (self.t, self.d(), self.hd);
        let base = self.qkv_row(bi);
        self.spec(
            (t, t, hd),
            (qkv.at(base, 3 * d), false, hd),
            (qkv.at(base + d, 3 * d), true, hd),
            (Buf::f32(probs).at(self.probs_at(bi), t), t * t),
            scale,
        )
    }

    /// `O = P V` into the `[b·t, d]` output (f32, or bf16 as `out` says).
    pub fn output(&self, bi: usize, probs: Buf, qkv: Buf, out: Buf) -> GemmSpec {
        let (t, d, hd) = (self.t, self.d(), self.hd);
        self.spec(
            (t, hd, t),
            (probs.at(self.probs_at(bi), t), false, t * t),
            (qkv.at(self.qkv_row(bi) + 2 * d, 3 * d), false, hd),
            (out.at(bi * t * d, d), hd),
            1.0,
        )
    }

    /// `dV = Pᵀ dO` into the v part of dqkv.
    pub fn d_v(&self, bi: usize, probs: Buf, dout: Buf, dqkv: Buf) -> GemmSpec {
        let (t, d, hd) = (self.t, self.d(), self.hd);
        self.spec(
            (t, hd, t),
            (probs.at(self.probs_at(bi), t), true, t * t),
            (dout.at(bi * t * d, d), false, hd),
            (dqkv.at(self.qkv_row(bi) + 2 * d, 3 * d), hd),
            1.0,
        )
    }

    /// `dP = dO Vᵀ` into a probabilities-shaped buffer.
    pub fn d_p(&self, bi: usize, dout: Buf, qkv: Buf, dp: u64) -> GemmSpec {
        let (t, d, hd) = (self.t, self.d(), self.hd);
        self.spec(
            (t, t, hd),
            (dout.at(bi * t * d, d), false, hd),
            (qkv.at(self.qkv_row(bi) + 2 * d, 3 * d), true, hd),
            (Buf::f32(dp).at(self.probs_at(bi), t), t * t),
            1.0,
        )
    }

    /// `dQ = dS K` into the q part of dqkv.
    pub fn d_q(&self, bi: usize, ds: Buf, qkv: Buf, dqkv: Buf) -> GemmSpec {
        let (t, d, hd) = (self.t, self.d(), self.hd);
        self.spec(
            (t, hd, t),
            (ds.at(self.probs_at(bi), t), false, t * t),
            (qkv.at(self.qkv_row(bi) + d, 3 * d), false, hd),
            (dqkv.at(self.qkv_row(bi), 3 * d), hd),
            1.0,
        )
    }

    /// `dK = dSᵀ Q` into the k part of dqkv.
    pub fn d_k(&self, bi: usize, ds: Buf, qkv: Buf, dqkv: Buf) -> GemmSpec {
        let (t, d, hd) = (self.t, self.d(), self.hd);
        self.spec(
            (t, hd, t),
            (ds.at(self.probs_at(bi), t), true, t * t),
            (qkv.at(self.qkv_row(bi), 3 * d), false, hd),
            (dqkv.at(self.qkv_row(bi) + d, 3 * d), hd),
            1.0,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops;

    /// Host "device memory": f32 buffers at distinct fake addresses.
    struct Mem(Vec<(u64, Vec<f32>)>);

    impl Mem {
        fn add(&mut self, data: Vec<f32>) -> u64 {
            let base = (self.0.len() as u64 + 1) << 32;
            self.0.push((base, data));
            base
        }
        fn loc(&self, addr: u64) -> (usize, usize) {
            let i = (addr >> 32) as usize - 1;
            (i, ((addr - self.0[i].0) / 4) as usize)
        }
        fn get(&self, addr: u64, i: usize) -> f32 {
            let (b, o) = self.loc(addr);
            self.0[b].1[o + i]
        }
        fn data(&self, addr: u64) -> &[f32] {
            &self.0[self.loc(addr).0].1
        }
    }

    /// cuBLAS's column-major strided-batched GEMM, by definition.
    fn cublas(mem: &mut Mem, a: &CublasArgs, alpha: f32, beta: f32) {
        for bt in 0..a.batch {
            for i in 0..a.m {
                for j in 0..a.n {
                    let mut acc = 0.0f32;
                    for l in 0..a.k {
                        let x = if a.trans_a {
                            mem.get(a.a, bt * a.stride_a + l + i * a.lda)
                        } else {
                            mem.get(a.a, bt * a.stride_a + i + l * a.lda)
                        };
                        let y = if a.trans_b {
                            mem.get(a.b, bt * a.stride_b + j + l * a.ldb)
                        } else {
                            mem.get(a.b, bt * a.stride_b + l + j * a.ldb)
                        };
                        acc += x * y;
                    }
                    let (cb, co) = mem.loc(a.c);
                    let c = &mut mem.0[cb].1[co + bt * a.stride_c + i + j * a.ldc];
                    *c = alpha * acc + beta * *c;
                }
            }
        }
    }

    fn run(mem: &mut Mem, s: GemmSpec) {
        cublas(mem, &cublas_args(&s), s.alpha, s.beta);
    }

    fn rnd(n: usize, seed: u64) -> Vec<f32> {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
            })
            .collect()
    }

    fn close(a: &[f32], b: &[f32]) {
        assert_eq!(a.len(), b.len());
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!((x - y).abs() < 1e-4 * (1.0 + y.abs()), "[{i}]: {x} vs {y}");
        }
    }

    #[test]
    fn linear_specs_match_the_cpu_kernels() {
        let (rows, inp, outp) = (5, 7, 3);
        let (x, w, dy) = (rnd(rows * inp, 1), rnd(outp * inp, 2), rnd(rows * outp, 3));
        let mut mem = Mem(Vec::new());
        let (px, pw, pdy) = (mem.add(x.clone()), mem.add(w.clone()), mem.add(dy.clone()));
        let py = mem.add(vec![0.0; rows * outp]);
        let pdx = mem.add(vec![0.0; rows * inp]);
        let dw0 = rnd(outp * inp, 4);
        let pdw = mem.add(dw0.clone());
        run(
            &mut mem,
            linear_fwd(Buf::f32(px), Buf::f32(pw), Buf::f32(py), rows, inp, outp),
        );
        run(
            &mut mem,
            linear_dx(Buf::f32(pdy), Buf::f32(pw), Buf::f32(pdx), rows, inp, outp),
        );
        run(
            &mut mem,
            linear_dw(Buf::f32(pdy), Buf::f32(px), pdw, rows, inp, outp),
        );
        let mut y = vec![0.0; rows * outp];
        ops::matmul_forward(&x, &w, rows, inp, outp, &mut y);
        let (mut dx, mut dw) = (vec![0.0; rows * inp], dw0);
        ops::matmul_backward(&dy, &x, &w, rows, inp, outp, &mut dx, &mut dw);
        close(mem.data(py), &y);
        close(mem.data(pdx), &dx);
        close(mem.data(pdw), &dw);
    }

    #[test]
    fn attention_specs_match_the_cpu_kernels() {
        let (b, t, heads, hd) = (2, 5, 3, 4);
        let d = heads * hd;
        let at = Attn { t, heads, hd };
        let scale = 1.0 / (hd as f32).sqrt();
        let qkv = rnd(b * t * 3 * d, 5);
        let dout = rnd(b * t * d, 6);
        let mut mem = Mem(Vec::new());
        let pq = mem.add(qkv.clone());
        let pp = mem.add(vec![0.0; b * heads * t * t]);
        let po = mem.add(vec![0.0; b * t * d]);
        for bi in 0..b {
            run(&mut mem, at.scores(bi, Buf::f32(pq), pp, scale));
        }
        // the softmax kernel's job, on the host
        let (pb, _) = mem.loc(pp);
        for (r, row) in mem.0[pb].1.chunks_exact_mut(t).enumerate() {
            let tt = r % t;
            let mx = row[..=tt].iter().copied().fold(f32::MIN, f32::max);
            let s: f32 = row[..=tt].iter().map(|v| (v - mx).exp()).sum();
            for (i, v) in row.iter_mut().enumerate() {
                *v = if i <= tt { (*v - mx).exp() / s } else { 0.0 };
            }
        }
        for bi in 0..b {
            run(
                &mut mem,
                at.output(bi, Buf::f32(pp), Buf::f32(pq), Buf::f32(po)),
            );
        }
        let mut out = vec![0.0; b * t * d];
        let mut probs = vec![0.0; b * heads * t * t];
        ops::attention_forward(&qkv, b, t, heads, hd, &mut out, &mut probs);
        close(mem.data(pp), &probs);
        close(mem.data(po), &out);

        let pdo = mem.add(dout.clone());
        let pdqkv = mem.add(vec![0.0; b * t * 3 * d]);
        let pdp = mem.add(vec![0.0; b * heads * t * t]);
        for bi in 0..b {
            run(
                &mut mem,
                at.d_v(bi, Buf::f32(pp), Buf::f32(pdo), Buf::f32(pdqkv)),
            );
            run(&mut mem, at.d_p(bi, Buf::f32(pdo), Buf::f32(pq), pdp));
        }
        // the softmax-backward kernel's job
        let (db, _) = mem.loc(pdp);
        let p = mem.data(pp).to_vec();
        for (r, row) in mem.0[db].1.chunks_exact_mut(t).enumerate() {
            let tt = r % t;
            let pr = &p[r * t..(r + 1) * t];
            let w: f32 = (0..=tt).map(|i| pr[i] * row[i]).sum();
            for (i, v) in row.iter_mut().enumerate() {
                *v = if i <= tt {
                    pr[i] * (*v - w) * scale
                } else {
                    0.0
                };
            }
        }
        for bi in 0..b {
            run(
                &mut mem,
                at.d_q(bi, Buf::f32(pdp), Buf::f32(pq), Buf::f32(pdqkv)),
            );
            run(
                &mut mem,
                at.d_k(bi, Buf::f32(pdp), Buf::f32(pq), Buf::f32(pdqkv)),
            );
        }
        let mut dqkv = vec![0.0; b * t * 3 * d];
        ops::attention_backward(&dout, &qkv, &probs, b, t, heads, hd, &mut dqkv);
        close(mem.data(pdqkv), &dqkv);
    }
}
