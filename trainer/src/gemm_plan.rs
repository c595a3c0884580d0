//! The CUDA engine's GEMMs as plain descriptions, separate from cuBLAS so they can be checked
//! without a GPU: the tests run them through column-major references of `cublasLtMatmul`
//! (the engine's GEMM) and `cublasGemmStridedBatchedEx` (its fallback) on host memory and
//! compare with the CPU kernels; the host emulator runs the engine's GEMMs through the first.
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
    /// The buffer starting `offset` elements in.
    pub fn offset(&self, offset: usize) -> Buf {
        Buf {
            ptr: self.ptr + (offset * if self.bf16 { 2 } else { 4 }) as u64,
            bf16: self.bf16,
        }
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
    /// Where C is read from when it is not the output (cuBLASLt's C ≠ D): a residual added
    /// in the GEMM's epilogue instead of by a kernel of its own. Same layout as the output.
    pub c_src: Option<u64>,
    pub alpha: f32,
    pub beta: f32,
    pub batch: usize,
    /// Element strides between batch matrices of A, B and C.
    pub sa: usize,
    pub sb: usize,
    pub sc: usize,
}

impl GemmSpec {
    /// `m×n×k`, and ` xB` for a batch of B: how logs, errors and profiles name the problem.
    pub fn shape(&self) -> String {
        let batch = if self.batch > 1 {
            format!(" x{}", self.batch)
        } else {
            String::new()
        };
        format!("{}x{}x{}{batch}", self.m, self.n, self.k)
    }
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

/// The copy cuBLAS needs before a spec that reads C elsewhere (it reads C where it writes D):
/// `(to, from, bytes)`, or none when C is the output or unread (beta 0).
pub fn cublas_c_copy(s: &GemmSpec) -> Result<Option<(u64, u64, usize)>, String> {
    match s.c_src {
        Some(src) if s.beta != 0.0 => {
            if s.batch != 1 || s.ldc != s.n || s.c_bf16 {
                return Err(format!(
                    "cuBLAS: the GEMM {} reads C elsewhere, which needs one contiguous f32 output",
                    s.shape()
                ));
            }
            Ok(Some((s.c, src, s.m * s.n * 4)))
        }
        _ => Ok(None),
    }
}

/// A matrix as a cuBLASLt layout describes it: column-major `rows × cols` with `ld` elements
/// from one column to the next and, in a batch, `stride` elements from one matrix to the next.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LtLayout {
    pub rows: usize,
    pub cols: usize,
    pub ld: usize,
    pub stride: usize,
    pub bf16: bool,
}

impl LtLayout {
    /// The alignment in bytes, at most 256 (what cuBLASLt assumes unless told otherwise), of
    /// every matrix of a batch of `batch` starting at `ptr`. An algorithm chosen for a better
    /// aligned operand than the real one may fault or refuse, so the engine tells the
    /// heuristic this: heads of a fused qkv row, for one, start only `2·hd` bytes apart.
    pub fn alignment(&self, ptr: u64, batch: usize) -> u32 {
        let elem = if self.bf16 { 2 } else { 4 };
        let mut bits = ptr | 256;
        if batch > 1 {
            bits |= (self.stride * elem) as u64;
        }
        1 << bits.trailing_zeros()
    }
}

/// `cublasLtMatmul`'s arguments for a spec: `D = alpha · op(A) · op(B) + beta · C` per batch
/// matrix, column-major, the problem transposed as for cuBLAS. C and D share a layout; they
/// are one buffer unless the spec reads C elsewhere (`c_src`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LtArgs {
    pub trans_a: bool,
    pub trans_b: bool,
    pub a: u64,
    pub a_layout: LtLayout,
    pub b: u64,
    pub b_layout: LtLayout,
    pub c: u64,
    pub d: u64,
    pub cd_layout: LtLayout,
    pub batch: usize,
}

impl LtArgs {
    /// The alignments of A, B, C and D, for the heuristic's preferences.
    pub fn alignments(&self) -> [u32; 4] {
        [
            self.a_layout.alignment(self.a, self.batch),
            self.b_layout.alignment(self.b, self.batch),
            self.cd_layout.alignment(self.c, self.batch),
            self.cd_layout.alignment(self.d, self.batch),
        ]
    }
}

pub fn lt_args(s: &GemmSpec) -> LtArgs {
    let c = cublas_args(s);
    // a layout describes the matrix as stored: op(A) m×k is stored k×m when transposed
    let stored = |t: bool, r: usize, cols: usize| if t { (cols, r) } else { (r, cols) };
    let (ar, ac) = stored(c.trans_a, c.m, c.k);
    let (br, bc) = stored(c.trans_b, c.k, c.n);
    LtArgs {
        trans_a: c.trans_a,
        trans_b: c.trans_b,
        a: c.a,
        a_layout: LtLayout {
            rows: ar,
            cols: ac,
            ld: c.lda,
            stride: c.stride_a,
            bf16: s.b.bf16,
        },
        b: c.b,
        b_layout: LtLayout {
            rows: br,
            cols: bc,
            ld: c.ldb,
            stride: c.stride_b,
            bf16: s.a.bf16,
        },
        c: s.c_src.unwrap_or(s.c),
        d: s.c,
        cd_layout: LtLayout {
            rows: c.m,
            cols: c.n,
            ld: c.ldc,
            stride: c.stride_c,
            bf16: s.c_bf16,
        },
        batch: c.batch,
    }
}

/// The problem a set of layouts describes, `(m, n, k)`, or why cuBLASLt would refuse it
/// (`CUBLAS_STATUS_INVALID_VALUE`): shapes that do not chain, a leading dimension shorter
/// than a column.
pub fn lt_problem(a: &LtArgs) -> Result<(usize, usize, usize), String> {
    let op = |t: bool, l: &LtLayout| {
        if t {
            (l.cols, l.rows)
        } else {
            (l.rows, l.cols)
        }
    };
    let (m, k) = op(a.trans_a, &a.a_layout);
    let (k2, n) = op(a.trans_b, &a.b_layout);
    let (m2, n2) = (a.cd_layout.rows, a.cd_layout.cols);
    if k != k2 || m != m2 || n != n2 {
        return Err(format!(
            "layouts do not chain: op(A) {m}x{k}, op(B) {k2}x{n}, C {m2}x{n2}"
        ));
    }
    for (name, l) in [("A", &a.a_layout), ("B", &a.b_layout), ("C", &a.cd_layout)] {
        if l.ld < l.rows.max(1) {
            return Err(format!("{name}: ld {} < rows {}", l.ld, l.rows));
        }
    }
    Ok((m, n, k))
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
        c_src: None,
        alpha: 1.0,
        beta: 0.0,
        batch: 1,
        sa: 0,
        sb: 0,
        sc: 0,
    }
}

/// `y = r + x Wᵀ`: `linear_fwd` with the residual `r` (f32, `[rows, outp]`) added by the
/// GEMM (y is then f32 too).
pub fn linear_fwd_residual(
    x: Buf,
    w: Buf,
    r: u64,
    y: u64,
    rows: usize,
    inp: usize,
    outp: usize,
) -> GemmSpec {
    GemmSpec {
        c_src: Some(r),
        beta: 1.0,
        ..linear_fwd(x, w, Buf::f32(y), rows, inp, outp)
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
        c_src: None,
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
        c_src: None,
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
            c_src: None,
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
    #[derive(Clone, PartialEq, Debug)]
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

    /// `cublasLtMatmul` by its definition (column-major layouts, C read from `c`, D written
    /// at `d`).
    fn lt(mem: &mut Mem, a: &LtArgs, alpha: f32, beta: f32) {
        let (m, n, k) = lt_problem(a).unwrap();
        let at = |l: &LtLayout, bt: usize, r: usize, c: usize| bt * l.stride + r + c * l.ld;
        for bt in 0..a.batch {
            for i in 0..m {
                for j in 0..n {
                    let mut acc = 0.0f32;
                    for l in 0..k {
                        let (r, c) = if a.trans_a { (l, i) } else { (i, l) };
                        let x = mem.get(a.a, at(&a.a_layout, bt, r, c));
                        let (r, c) = if a.trans_b { (j, l) } else { (l, j) };
                        acc += x * mem.get(a.b, at(&a.b_layout, bt, r, c));
                    }
                    let o = at(&a.cd_layout, bt, i, j);
                    let c = mem.get(a.c, o);
                    let (db, dof) = mem.loc(a.d);
                    mem.0[db].1[dof + o] = alpha * acc + beta * c;
                }
            }
        }
    }

    /// Runs a spec through the cuBLASLt reference, and (C being the output) through the
    /// cuBLAS one too: the engine's GEMM and its fallback must agree to the bit.
    fn run(mem: &mut Mem, s: GemmSpec) {
        let before = mem.clone();
        lt(mem, &lt_args(&s), s.alpha, s.beta);
        if s.c_src.is_none() {
            let mut other = before;
            cublas(&mut other, &cublas_args(&s), s.alpha, s.beta);
            assert_eq!(*mem, other, "cuBLASLt and cuBLAS arguments disagree");
        }
    }

    #[test]
    fn residual_specs_add_in_the_epilogue() {
        let (rows, inp, outp) = (4, 6, 5);
        let (x, w, r) = (rnd(rows * inp, 7), rnd(outp * inp, 8), rnd(rows * outp, 9));
        let mut mem = Mem(Vec::new());
        let (px, pw, pr) = (mem.add(x.clone()), mem.add(w.clone()), mem.add(r.clone()));
        let py = mem.add(vec![f32::NAN; rows * outp]);
        run(
            &mut mem,
            linear_fwd_residual(Buf::f32(px), Buf::f32(pw), pr, py, rows, inp, outp),
        );
        let mut y = vec![0.0; rows * outp];
        ops::matmul_forward(&x, &w, rows, inp, outp, &mut y);
        let want: Vec<f32> = y.iter().zip(&r).map(|(a, b)| a + b).collect();
        close(mem.data(py), &want);
        assert_eq!(mem.data(pr), &r[..], "the residual is an input only");
    }

    #[test]
    fn layouts_describe_the_problem_and_its_alignment() {
        let at = Attn {
            t: 8,
            heads: 4,
            hd: 16,
        };
        let qkv = Buf {
            ptr: 1 << 20,
            bf16: true,
        };
        let s = at.scores(1, qkv, 1 << 30, 0.25);
        let a = lt_args(&s);
        assert_eq!(lt_problem(&a), Ok((8, 8, 16)));
        // K and Q of sequence 1: heads 16 bf16 (32 bytes) apart
        assert_eq!(a.alignments()[..2], [32, 32]);
        assert_eq!(
            LtLayout {
                stride: 64,
                ..a.a_layout
            }
            .alignment(1 << 20, 4),
            128
        );
        assert_eq!(a.cd_layout.alignment(1 << 30, 1), 256);
        assert_eq!(a.cd_layout.alignment((1 << 30) + 4, 1), 4);
        let bad = LtArgs {
            cd_layout: LtLayout {
                ld: 3,
                ..a.cd_layout
            },
            ..a
        };
        assert!(lt_problem(&bad).unwrap_err().contains("ld 3 < rows 8"));
        let bad = LtArgs {
            trans_b: !a.trans_b,
            ..a
        };
        assert!(lt_problem(&bad).unwrap_err().contains("do not chain"));
    }

    fn rnd(n: usize, seed: u64) -> Vec<f32> {
        crate::xorshift::XorShift::new(seed).vec(n, 1.0)
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
        ops::attention_forward(&qkv, b, t, heads, hd, None, &mut out, &mut probs);
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
