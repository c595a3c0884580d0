//! The engine's cuBLASLt calls (`olmo_train::cublaslt`) against a stand-in library
//! (`cublaslt_mock.c`) that checks them against cuBLASLt's documented contract (attribute
//! sizes, layouts, alignment promises, algorithm reuse) and computes on host memory. The
//! results must match the host emulator's GEMMs, which take the same specs by definition.
//!
//! The stand-in (`standin/`) loads the way cudarc loads the real library, from
//! `LD_LIBRARY_PATH`, which only takes effect in a fresh process: the test runs itself again in
//! one.

mod standin;

use olmo_train::cublaslt::Lt;
use olmo_train::gemm_plan::{self, Attn, Buf, GemmSpec};
use olmo_train::gpu::GemmLib;

#[test]
fn cublaslt_calls_keep_the_library_contract() {
    if standin::is_child() {
        return child();
    }
    let Some(out) = standin::in_child("cublaslt_calls_keep_the_library_contract") else {
        return;
    };
    // the child ran its checks against the stand-in, planning each problem once
    let stats = out
        .lines()
        .find_map(|l| l.strip_prefix("cublasLt mock: "))
        .unwrap_or_else(|| panic!("the stand-in was not used:\n{out}"));
    assert_eq!(stats, "8 heuristic calls, 16 matmuls", "{out}");
}

fn rnd(n: usize, seed: u64) -> Vec<f32> {
    olmo_train::xorshift::XorShift::new(seed).vec(n, 1.0)
}

fn bf16(v: &[f32]) -> Vec<u16> {
    v.iter()
        .map(|&x| half::bf16::from_f32(x).to_bits())
        .collect()
}

/// An output buffer, bf16 or f32, seeded so that accumulating GEMMs have something to add to,
/// and 256-byte aligned: the alignment is part of a plan's problem, so a heap address's luck
/// must not decide how many plans there are.
struct Out {
    f32: Vec<f32>,
    bf16: Option<Vec<u16>>,
    off: usize,
    n: usize,
}

impl Out {
    fn new(n: usize, is_bf16: bool) -> Out {
        let mut v = rnd(n + 128, 99);
        let mut o = Out {
            bf16: is_bf16.then(|| bf16(&v)),
            f32: Vec::new(),
            off: 0,
            n,
        };
        let (addr, elem) = match &o.bf16 {
            Some(h) => (h.as_ptr() as usize, 2),
            None => (v.as_ptr() as usize, 4),
        };
        o.off = (256 - addr % 256) % 256 / elem;
        // the seed as seen from the aligned start
        if o.bf16.is_none() {
            v.rotate_right(o.off);
            o.f32 = v;
        } else if let Some(h) = &mut o.bf16 {
            h.rotate_right(o.off);
        }
        o
    }
    fn ptr(&mut self) -> u64 {
        let p = match &mut self.bf16 {
            Some(h) => h[self.off..].as_mut_ptr() as u64,
            None => self.f32[self.off..].as_mut_ptr() as u64,
        };
        assert_eq!(p % 256, 0);
        p
    }
    fn values(&self) -> Vec<f32> {
        match &self.bf16 {
            Some(h) => h[self.off..self.off + self.n]
                .iter()
                .map(|&h| half::bf16::from_bits(h).to_f32())
                .collect(),
            None => self.f32[self.off..self.off + self.n].to_vec(),
        }
    }
}

fn child() {
    let mut workspace = vec![0u8; 4 << 20];
    let lt = Lt::new(workspace.as_mut_ptr() as u64, workspace.len()).unwrap();
    let (rows, inp, outp) = (6, 10, 7);
    let (b, t, heads, hd) = (2, 5, 3, 4);
    let d = heads * hd;
    // operands in both precisions, from one random stream
    let x32 = rnd(rows * inp.max(outp) + b * t * 3 * d + b * heads * t * t, 1);
    let x16 = bf16(&x32);
    let w32 = rnd(outp * inp, 2);
    let w16 = bf16(&w32);
    let r = rnd(rows * outp, 3);
    let (xf, xb) = (
        Buf::f32(x32.as_ptr() as u64),
        Buf {
            ptr: x16.as_ptr() as u64,
            bf16: true,
        },
    );
    let (wf, wb) = (
        Buf::f32(w32.as_ptr() as u64),
        Buf {
            ptr: w16.as_ptr() as u64,
            bf16: true,
        },
    );
    let rp = r.as_ptr() as u64;
    let at = Attn { t, heads, hd };
    let b16 = |p| Buf { ptr: p, bf16: true };
    // (name, output elements, output in bf16, spec writing at the address given)
    type Make<'a> = Box<dyn Fn(u64) -> GemmSpec + 'a>;
    let cases: Vec<(&str, usize, bool, Make)> = vec![
        (
            "linear f32",
            rows * outp,
            false,
            Box::new(|o| gemm_plan::linear_fwd(xf, wf, Buf::f32(o), rows, inp, outp)),
        ),
        (
            "linear bf16 -> bf16",
            rows * outp,
            true,
            Box::new(|o| gemm_plan::linear_fwd(xb, wb, b16(o), rows, inp, outp)),
        ),
        (
            "linear + residual",
            rows * outp,
            false,
            Box::new(|o| gemm_plan::linear_fwd_residual(xb, wb, rp, o, rows, inp, outp)),
        ),
        (
            "dx",
            rows * inp,
            true,
            Box::new(|o| gemm_plan::linear_dx(xb, wb, b16(o), rows, inp, outp)),
        ),
        (
            "dW +=",
            outp * inp,
            false,
            Box::new(|o| gemm_plan::linear_dw(xb, xb, o, rows, inp, outp)),
        ),
        // heads of a fused qkv row: hd = 4 bf16, so 8-byte aligned operands
        (
            "scores",
            b * heads * t * t,
            false,
            Box::new(|o| at.scores(1, xb, o, 0.5)),
        ),
        (
            "P V",
            b * t * d,
            true,
            Box::new(|o| at.output(1, xb, xb, b16(o))),
        ),
        (
            "dK",
            b * t * 3 * d,
            true,
            Box::new(|o| at.d_k(1, xb, xb, b16(o))),
        ),
    ];
    for (name, n, is_bf16, make) in &cases {
        let mut want = Out::new(*n, *is_bf16);
        olmo_train::cuda_host::gemm(&make(want.ptr()), GemmLib::CublasLt).unwrap();
        // twice: the second run reuses the first's plan, from fresh outputs
        for _ in 0..2 {
            let mut got = Out::new(*n, *is_bf16);
            // Safety: host buffers covering the spec's extents; the stand-in runs on the host.
            let ran = unsafe { lt.matmul(&make(got.ptr()), std::ptr::null_mut()) };
            assert!(ran.unwrap(), "{name}: no algorithm");
            let (g, w) = (got.values(), want.values());
            for (i, (a, e)) in g.iter().zip(&w).enumerate() {
                assert!(
                    (a - e).abs() <= 1e-6 * (1.0 + e.abs()),
                    "{name}[{i}]: {a} vs {e}"
                );
            }
        }
    }
    assert_eq!(lt.plan_counts(), (cases.len(), 0));
    drop(lt);
    drop(workspace);
}
