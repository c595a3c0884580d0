//! The CUDA kernels' logic checked without a GPU: `cuda_emulator.cpp` compiles
//! `src/cuda_kernels.cu` unchanged as C++, runs each CUDA thread as a fiber with barriers for
//! `__syncthreads` and warp shuffles (`cuda_emulation.hpp`), and these tests compare its
//! outputs with the CPU kernels of `ops.rs`. It catches indexing, reduction and launch-shape
//! mistakes; what it cannot catch (GPU memory model, cuBLAS, NVRTC) is left to `olmo-train
//! gpu-check`. Skipped with a message where no C++20 compiler is installed.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

mod standin;

use olmo_train::cuda::TokenGroups;
use olmo_train::ops::{self, NormKind, RopeTable, IGNORE};

fn emulator() -> Option<&'static Path> {
    static BIN: OnceLock<Option<PathBuf>> = OnceLock::new();
    BIN.get_or_init(|| {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/cuda_emulator.cpp");
        let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("cuda_emulator");
        let cxx = ["c++", "g++", "clang++"];
        if standin::compile(&cxx, &["-std=c++20", "-O1", "-pthread"], &out, &src) {
            return Some(out);
        }
        eprintln!("skipped: no C++20 compiler (c++, g++ or clang++) to build the CUDA emulator");
        None
    })
    .as_deref()
}

struct Bufs(tempfile::TempDir);

impl Bufs {
    fn new() -> Bufs {
        Bufs(tempfile::tempdir().unwrap())
    }
    fn put(&self, name: &str, v: &[f32]) {
        let b: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        std::fs::write(self.0.path().join(name), b).unwrap();
    }
    /// `v` rounded to bf16 (to nearest even), as the kernels' bf16 inputs.
    fn put_bf16(&self, name: &str, v: &[f32]) {
        let b: Vec<u8> = v
            .iter()
            .flat_map(|&x| half::bf16::from_f32(x).to_bits().to_le_bytes())
            .collect();
        std::fs::write(self.0.path().join(name), b).unwrap();
    }
    fn put_u32(&self, name: &str, v: &[u32]) {
        let b: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        std::fs::write(self.0.path().join(name), b).unwrap();
    }
    fn get(&self, name: &str) -> Vec<f32> {
        std::fs::read(self.0.path().join(name))
            .unwrap()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }
    fn raw(&self, name: &str) -> Vec<u8> {
        std::fs::read(self.0.path().join(name)).unwrap()
    }
    fn run(&self, bin: &Path, kernel: &str, block: u32, args: &[String]) {
        let o = Command::new(bin)
            .arg(kernel)
            .arg(self.0.path())
            .arg(block.to_string())
            .args(args)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "{kernel}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
}

fn rnd(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    olmo_train::xorshift::XorShift::new(seed).vec(n, scale)
}

fn close(what: &str, got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= tol * (1.0 + w.abs()),
            "{what}[{i}]: emulated kernel {g}, CPU {w}"
        );
    }
}

macro_rules! s {
    ($($x:expr),*) => { [$($x.to_string()),*] };
}

#[test]
fn norm_kernels_match_the_cpu() {
    let Some(bin) = emulator() else { return };
    // d = 70 is not a multiple of the block: strided loops and partial warps are exercised
    for (kind, affine, block) in [
        (NormKind::LayerNorm, false, 64),
        (NormKind::Rms, true, 64),
        (NormKind::LayerNorm, true, 256),
    ] {
        let (rows, d) = (3, 70);
        let b = Bufs::new();
        let x = rnd(rows * d, 1, 2.0);
        let w: Vec<f32> = rnd(d, 2, 0.5).iter().map(|v| v + 1.0).collect();
        let wt = affine.then_some(&w[..]);
        b.put("x", &x);
        b.put("w", &w);
        let res = rnd(rows * d, 9, 3.0);
        b.put("res", &res);
        let rms = (kind == NormKind::Rms) as i32;
        b.run(
            bin,
            "norm_fwd",
            block,
            &s![rows, d, 1e-5, rms, affine as i32],
        );
        let (mut y, mut m, mut r) = (vec![0.0; rows * d], vec![0.0; rows], vec![0.0; rows]);
        ops::norm_forward(kind, &x, d, 1e-5, wt, &mut y, &mut m, &mut r);
        close("norm_fwd y", &b.get("y"), &y, 1e-5);
        same_bf16("norm_fwd into bf16", &b, "y_bf16", &b.get("y"));
        close("norm_fwd rstd", &b.get("rstd"), &r, 1e-5);
        let added: Vec<f32> = y.iter().zip(&res).map(|(y, r)| y + r).collect();
        close("norm_add_fwd y", &b.get("y_add"), &added, 1e-5);
        let dy = rnd(rows * d, 3, 1.0);
        let dx0 = rnd(rows * d, 4, 1.0);
        let dw0 = rnd(d, 5, 1.0);
        b.put("dy", &dy);
        b.put("mean", &m);
        b.put("rstd", &r);
        b.put("dx", &dx0);
        b.put("dw", &dw0);
        // dw over chunks of 2 rows: two partial sums, the second of one row
        b.run(bin, "norm_bwd", block, &s![rows, d, rms, affine as i32, 2]);
        let (mut dx, mut dw) = (dx0.clone(), dw0.clone());
        ops::norm_backward(
            kind,
            &dy,
            &x,
            &m,
            &r,
            d,
            wt,
            &mut dx,
            affine.then_some(&mut dw[..]),
        );
        close("norm_bwd dx", &b.get("dx"), &dx, 1e-4);
        if affine {
            close("norm_bwd dw", &b.get("dw"), &dw, 1e-4);
        }
    }
}

#[test]
fn cols_copy_moves_a_column_block_between_types_and_strides() {
    let Some(bin) = emulator() else { return };
    // QK-norm's traffic: k (columns d..2d of [rows, 3d]) out to [rows, d] and back in
    let (rows, d) = (5, 24);
    let bf = |v: &[f32]| -> Vec<f32> {
        v.iter()
            .map(|&x| half::bf16::from_f32(x).to_f32())
            .collect()
    };
    for (lds, ldd, src_len, dst_len, src_at, dst_at) in [
        (3 * d, d, rows * 3 * d, rows * d, d, 0),
        (d, 3 * d, rows * d, rows * 3 * d, 0, d),
    ] {
        let b = Bufs::new();
        let src = rnd(src_len, 11, 2.0);
        let dst = rnd(dst_len, 12, 2.0);
        // the kernel sees the buffers from the block's first column on
        let (src_view, dst_view) = (&src[src_at..], &dst[dst_at..]);
        b.put("src", src_view);
        b.put("dst", dst_view);
        b.run(bin, "cols_copy", 64, &s![rows, d, lds, ldd]);
        let want = |s: &[f32], dst: &[f32]| {
            let mut w = dst.to_vec();
            for r in 0..rows {
                w[r * ldd..][..d].copy_from_slice(&s[r * lds..][..d]);
            }
            w
        };
        // untouched columns keep their values (rounded where the buffer is bf16)
        close(
            "f32 -> f32",
            &b.get("f32_f32"),
            &want(src_view, dst_view),
            0.0,
        );
        close(
            "bf16 -> f32",
            &b.get("bf16_f32"),
            &want(&bf(src_view), dst_view),
            0.0,
        );
        close(
            "f32 -> bf16",
            &bf16_file(&b, "f32_bf16"),
            &bf(&want(src_view, dst_view)),
            0.0,
        );
        close(
            "bf16 -> bf16",
            &bf16_file(&b, "bf16_bf16"),
            &want(&bf(src_view), &bf(dst_view)),
            0.0,
        );
    }
}

#[test]
fn rope_kernel_matches_the_cpu_both_ways() {
    let Some(bin) = emulator() else { return };
    // grouped-query rows: 4 q heads, 2 k heads, 2 v heads
    // head size 8: f32 rows by 4-element vectors, bf16 rows by element; 16: both by vectors
    let (bsz, t, heads, kv_heads) = (2, 5, 4, 2);
    let rows = bsz * t;
    // q and k rotated in place, in f32 and in bf16
    for (hd, inverse) in [(8, false), (8, true), (16, false), (16, true)] {
        let w = (heads + 2 * kv_heads) * hd;
        let table = RopeTable::new(16, hd, 10_000.0);
        let b = Bufs::new();
        let x = rnd(rows * w, 6, 1.0);
        b.put("x", &x);
        b.put("cos", &table.cos);
        b.put("sin", &table.sin);
        let rotated = heads + kv_heads;
        b.run(
            bin,
            "rope",
            64,
            &s![rows, t, rotated, hd / 2, w, inverse as i32],
        );
        let mut want = x.clone();
        ops::rope(&mut want, w, rotated, t, &table, inverse);
        let got = b.get("x");
        close("rope", &got, &want, 1e-6);
        // in place on bf16 rows: the CPU RoPE of the rounded input, rounded once more
        let mut want: Vec<f32> = x
            .iter()
            .map(|&v| half::bf16::from_f32(v).to_f32())
            .collect();
        ops::rope(&mut want, w, rotated, t, &table, inverse);
        close("rope_bf16", &bf16_file(&b, "x_bf16"), &want, 1.0 / 128.0);
    }
}

#[test]
fn kv_layout_kernels_match_the_cpu() {
    let Some(bin) = emulator() else { return };
    // 6 q heads sharing 3 kv heads, and multi-query attention
    for kv_heads in [3, 1] {
        let (rows, heads, hd) = (5, 6, 4);
        let (d, w) = (heads * hd, (heads + 2 * kv_heads) * hd);
        let x = rnd(rows * w, 50, 1.0);
        let dy = rnd(rows * 3 * d, 51, 1.0);
        let b = Bufs::new();
        b.put("x", &x);
        b.put("dy", &dy);
        b.run(bin, "kv", 64, &s![rows, heads, kv_heads, hd]);
        // repeating copies exactly; the sum adds in head order as the CPU does
        let want = ops::repeat_kv(&x, heads, kv_heads, hd);
        close("kv_repeat", &b.get("y"), &want, 0.0);
        let want = ops::sum_kv(&dy, heads, kv_heads, hd);
        close("kv_sum", &b.get("dx"), &want, 0.0);
        // bf16: of the rounded inputs, rounded once more
        let round = |v: &[f32]| -> Vec<f32> {
            v.iter()
                .map(|&v| half::bf16::from_f32(v).to_f32())
                .collect()
        };
        let want = ops::repeat_kv(&round(&x), heads, kv_heads, hd);
        close("kv_repeat bf16", &bf16_file(&b, "y_bf16"), &want, 0.0);
        let want = round(&ops::sum_kv(&round(&dy), heads, kv_heads, hd));
        close("kv_sum bf16", &bf16_file(&b, "dx_bf16"), &want, 0.0);
    }
}

#[test]
fn clip_qkv_kernels_match_the_cpu() {
    let Some(bin) = emulator() else { return };
    // 1000 entries: a last word of 8; a bound that clips about a third of them
    let n = 1000;
    let x = rnd(n, 40, 2.0);
    let dy = rnd(n, 41, 1.0);
    let b = Bufs::new();
    b.put("x", &x);
    b.put("dy", &dy);
    b.run(bin, "clip_qkv", 64, &s![n, 1.25f32]);
    let words = |name: &str| -> Vec<u32> {
        b.raw(name)
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    };
    let (mut want_x, mut want_dy) = (x.clone(), dy.clone());
    let bits = ops::clip_qkv(&mut want_x, 1.25);
    ops::clip_qkv_backward(&mut want_dy, &bits);
    assert!(bits.iter().map(|w| w.count_ones()).sum::<u32>() > 200);
    assert_eq!(words("bits"), bits);
    assert_eq!(b.get("x"), want_x);
    assert_eq!(b.get("dy"), want_dy);
    // on bf16: the same of the rounded values, bit for bit
    let round = |v: &[f32]| -> Vec<f32> {
        v.iter()
            .map(|&x| half::bf16::from_f32(x).to_f32())
            .collect()
    };
    let (mut want_x, mut want_dy) = (round(&x), round(&dy));
    let bits = ops::clip_qkv(&mut want_x, 1.25);
    ops::clip_qkv_backward(&mut want_dy, &bits);
    assert_eq!(words("bits_bf16"), bits);
    assert_eq!(bf16_file(&b, "x_bf16"), want_x);
    assert_eq!(bf16_file(&b, "dy_bf16"), want_dy);
}

#[test]
fn softmax_kernels_match_the_cpu_attention() {
    let Some(bin) = emulator() else { return };
    // The attention's probabilities and score gradients, through the CPU attention itself:
    // rows of length t, position = row % t (causal), as the engine launches them; over the
    // whole sequence, and within documents (sequence 0 holds three, sequence 1 one).
    let (bsz, t, heads, hd) = (2, 37, 2, 4);
    let d = heads * hd;
    let qkv = rnd(bsz * t * 3 * d, 7, 1.0);
    let mut tokens = vec![1u32; bsz * t];
    tokens[4] = 0;
    tokens[20] = 0;
    let doc_starts = ops::document_starts(&tokens, t, 0);
    for starts in [None, Some(&doc_starts[..])] {
        let mut out = vec![0.0; bsz * t * d];
        let mut probs = vec![0.0; bsz * heads * t * t];
        ops::attention_forward(&qkv, bsz, t, heads, hd, starts, &mut out, &mut probs);
        // scaled scores, as the GEMM writes them
        let scale = 1.0 / (hd as f32).sqrt();
        let mut scores = vec![0.0f32; probs.len()];
        for bi in 0..bsz {
            for h in 0..heads {
                for i in 0..t {
                    for j in 0..t {
                        let q = &qkv[(bi * t + i) * 3 * d + h * hd..][..hd];
                        let k = &qkv[(bi * t + j) * 3 * d + d + h * hd..][..hd];
                        scores[((bi * heads + h) * t + i) * t + j] =
                            q.iter().zip(k).map(|(a, b)| a * b).sum::<f32>() * scale;
                    }
                }
            }
        }
        let rows = bsz * heads * t;
        for block in [32, 64] {
            let b = Bufs::new();
            b.put("s", &scores);
            if let Some(s) = starts {
                b.put_u32("starts", s);
            }
            b.run(bin, "softmax_fwd", block, &s![rows, t, heads]);
            let what = format!("softmax_fwd (documents: {})", starts.is_some());
            close(&what, &b.get("s"), &probs, 1e-5);
            let dp = rnd(probs.len(), 8, 1.0);
            b.put("p", &probs);
            b.put("dp", &dp);
            b.run(bin, "softmax_bwd", block, &s![rows, t, scale]);
            let mut want = dp.clone();
            for (r, g) in want.chunks_exact_mut(t).enumerate() {
                ops::softmax_causal_row_backward(&probs[r * t..][..t], g, r % t, scale);
            }
            close("softmax_bwd", &b.get("dp"), &want, 1e-5);
        }
    }
    // the backward of probabilities that are 0 before the document is 0 there too
    let mut out = vec![0.0; bsz * t * d];
    let mut probs = vec![0.0; bsz * heads * t * t];
    ops::attention_forward(
        &qkv,
        bsz,
        t,
        heads,
        hd,
        Some(&doc_starts),
        &mut out,
        &mut probs,
    );
    let row = &probs[30 * t..][..t];
    assert!(row[..21].iter().all(|&p| p == 0.0) && row[21..=30].iter().all(|&p| p > 0.0));
}

/// A buffer of bf16 values, as f32.
fn bf16_file(b: &Bufs, name: &str) -> Vec<f32> {
    b.raw(name)
        .chunks_exact(2)
        .map(|c| half::bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
        .collect()
}

/// A kernel's bf16 output is its f32 output rounded to nearest even, bit for bit.
fn same_bf16(what: &str, b: &Bufs, name: &str, f32_out: &[f32]) {
    let got: Vec<u16> = b
        .raw(name)
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .collect();
    let want: Vec<u16> = f32_out
        .iter()
        .map(|&x| half::bf16::from_f32(x).to_bits())
        .collect();
    assert_eq!(got, want, "{what}");
}

/// Relative L2 error of `got` against `want`.
fn rel_l2(got: &[f32], want: &[f32]) -> f64 {
    let num: f64 = got
        .iter()
        .zip(want)
        .map(|(a, b)| ((a - b) as f64).powi(2))
        .sum();
    let den: f64 = want.iter().map(|b| (*b as f64).powi(2)).sum();
    (num / den.max(1e-30)).sqrt()
}

#[test]
fn flash_attention_kernels_match_the_cpu_attention() {
    let Some(bin) = emulator() else { return };
    // Sequence lengths that are not multiples of the blocks' 32, 64 or 128 rows, each head
    // size the engine instantiates, more than one batch row and head; at T 150, blocks that
    // stream several key (and query) tiles through their buffers, with the causal mask on
    // some tiles and not on others.
    // Then within documents: boundaries inside tiles and on their edges, documents shorter
    // than a tile, one spanning several, so that blocks skip leading key tiles (forward, dQ)
    // and rows meet tiles wholly before their document.
    // Then grouped- and multi-query attention: q heads read their kv head in place, and dK/dV
    // sums the gradients of the q heads sharing it (across their query tiles, within
    // documents too).
    for (bsz, t, heads, kv_heads, hd, eos_at) in [
        (1, 70, 2, 2, 32, &[][..]),
        (2, 64, 1, 1, 64, &[]),
        (1, 40, 1, 1, 128, &[]),
        (1, 150, 1, 1, 128, &[]),
        (2, 150, 1, 1, 64, &[3, 31, 32, 63, 64, 65, 129, 170, 250]),
        (1, 100, 2, 2, 32, &[0, 1, 2, 47, 95]),
        (2, 70, 4, 2, 32, &[]),
        (1, 100, 3, 1, 64, &[5, 40, 41, 97]),
        (1, 40, 2, 1, 128, &[]),
    ] {
        let mut tokens = vec![1u32; bsz * t];
        eos_at.iter().for_each(|&i| tokens[i] = 0);
        let doc_starts = ops::document_starts(&tokens, t, 0);
        let starts = (!eos_at.is_empty()).then_some(&doc_starts[..]);
        let (d, kvd) = (heads * hd, kv_heads * hd);
        let w = d + 2 * kvd;
        let bf = |v: Vec<f32>| -> Vec<f32> {
            v.iter()
                .map(|&x| half::bf16::from_f32(x).to_f32())
                .collect()
        };
        // bf16-representable inputs: the kernels read bf16, the CPU attention reads f32
        let qkv = bf(rnd(bsz * t * w, 30 + hd as u64, 1.5));
        let dout = bf(rnd(bsz * t * d, 31 + hd as u64, 1.0));
        // the CPU attention reads each kv head repeated for its q heads, and sums them back
        let heads_qkv = ops::repeat_kv(&qkv, heads, kv_heads, hd);
        let mut out = vec![0.0; bsz * t * d];
        let mut probs = vec![0.0; bsz * heads * t * t];
        ops::attention_forward(&heads_qkv, bsz, t, heads, hd, starts, &mut out, &mut probs);
        let mut dheads = vec![0.0; heads_qkv.len()];
        ops::attention_backward(&dout, &heads_qkv, &probs, bsz, t, heads, hd, &mut dheads);
        let dqkv = ops::sum_kv(&dheads, heads, kv_heads, hd);
        let scale = 1.0 / (hd as f32).sqrt();
        let doc_start = |bi: usize, i: usize| starts.map_or(0, |s| s[bi * t + i] as usize);

        let b = Bufs::new();
        b.put_bf16("qkv", &qkv);
        b.put_bf16("dout", &dout);
        if let Some(s) = starts {
            b.put_u32("starts", s);
        }
        b.run(bin, "flash", 128, &s![bsz, t, heads, kv_heads, hd, scale]);

        let what =
            format!("b {bsz}, T {t}, {heads} heads ({kv_heads} kv) of {hd}, EOS at {eos_at:?}");
        let got_out = bf16_file(&b, "out");
        let e = rel_l2(&got_out, &out);
        assert!(e < 1e-2, "{what}: output relative error {e:.2e}");
        // log-sum-exp of the scaled causal scores, and D = rowsum(dO ∘ O)
        let (lse, dsum) = (b.get("lse"), b.get("dsum"));
        for bi in 0..bsz {
            for h in 0..heads {
                for i in 0..t {
                    let q = &qkv[(bi * t + i) * w + h * hd..][..hd];
                    let kh = h / (heads / kv_heads);
                    let s: Vec<f64> = (doc_start(bi, i)..=i)
                        .map(|j| {
                            let k = &qkv[(bi * t + j) * w + d + kh * hd..][..hd];
                            q.iter().zip(k).map(|(a, b)| (a * b) as f64).sum::<f64>() * scale as f64
                        })
                        .collect();
                    let mx = s.iter().copied().fold(f64::MIN, f64::max);
                    let want = mx + s.iter().map(|x| (x - mx).exp()).sum::<f64>().ln();
                    let got = lse[(bi * heads + h) * t + i] as f64;
                    assert!(
                        (got - want).abs() < 1e-3,
                        "{what}: lse[{i}] {got} vs {want}"
                    );
                    let o = &got_out[(bi * t + i) * d + h * hd..][..hd];
                    let g = &dout[(bi * t + i) * d + h * hd..][..hd];
                    let want: f32 = o.iter().zip(g).map(|(a, b)| a * b).sum();
                    let got = dsum[(bi * heads + h) * t + i];
                    assert!((got - want).abs() < 1e-4 * (1.0 + want.abs()), "{what}: D");
                }
            }
        }
        let got = bf16_file(&b, "dqkv");
        for (cols, name) in [(0..d, "dq"), (d..d + kvd, "dk"), (d + kvd..w, "dv")] {
            let pick = |v: &[f32]| -> Vec<f32> {
                v.chunks_exact(w)
                    .flat_map(|r| r[cols.clone()].to_vec())
                    .collect()
            };
            let e = rel_l2(&pick(&got), &pick(&dqkv));
            assert!(e < 2e-2, "{what}: {name} relative error {e:.2e}");
        }
        // The wide blocks (forward and dQ 8 warps, dK/dV 4) give the same bits, so the engine
        // may run whichever is faster.
        for name in ["out", "lse", "dsum", "dqkv"] {
            let (narrow, wide) = (b.raw(name), b.raw(&format!("{name}_wide")));
            assert_eq!(narrow.len(), wide.len(), "{what}: {name}");
            if let Some(i) = narrow.iter().zip(&wide).position(|(x, y)| x != y) {
                panic!("{what}: {name} differs between the block sizes at byte {i}");
            }
        }
    }
}

#[test]
fn bf16_softmax_kernels_round_the_cpu_values() {
    let Some(bin) = emulator() else { return };
    let (rows, t, scale) = (2 * 3 * 19, 19, 0.35f32);
    let s_in = rnd(rows * t, 20, 3.0);
    let dp = rnd(rows * t, 21, 1.0);
    let b = Bufs::new();
    b.put("s", &s_in);
    b.put("dp", &dp);
    b.run(bin, "softmax_bf16", 64, &s![rows, t, scale]);
    let bf = |name: &str| -> Vec<f32> {
        b.raw(name)
            .chunks_exact(2)
            .map(|c| half::bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
            .collect()
    };
    let (p, ds) = (bf("p"), bf("ds"));
    for r in 0..rows {
        let pos = r % t;
        let row = &s_in[r * t..][..t];
        let mx = row[..=pos].iter().copied().fold(f32::MIN, f32::max);
        let sum: f32 = row[..=pos].iter().map(|v| (v - mx).exp()).sum();
        // the backward uses the rounded probabilities, as the kernel does
        let pr = &p[r * t..][..t];
        let w: f32 = (0..=pos).map(|i| pr[i] * dp[r * t + i]).sum();
        for i in 0..t {
            let (want_p, want_ds) = if i <= pos {
                (
                    (row[i] - mx).exp() / sum,
                    pr[i] * (dp[r * t + i] - w) * scale,
                )
            } else {
                (0.0, 0.0)
            };
            // bf16 keeps 8 significant bits
            assert!(
                (pr[i] - want_p).abs() <= 4e-3 * want_p.abs() + 1e-7,
                "p[{r},{i}]"
            );
            assert!(
                (ds[r * t + i] - want_ds).abs() <= 4e-3 * want_ds.abs() + 1e-6,
                "ds[{r},{i}]: {} vs {want_ds}",
                ds[r * t + i]
            );
        }
    }
}

#[test]
fn swiglu_embedding_and_elementwise_kernels_match_the_cpu() {
    let Some(bin) = emulator() else { return };
    // h = 13: one thread per element; h = 16: per 16-byte vector (4 f32 or 8 bf16; the
    // emulator's buffers come from malloc, 16-byte aligned)
    for (rows, h) in [(7, 13), (5, 16)] {
        let b = Bufs::new();
        let x = rnd(rows * 2 * h, 9, 3.0);
        let dy = rnd(rows * h, 10, 1.0);
        b.put("x", &x);
        b.put("dy", &dy);
        b.run(bin, "swiglu", 64, &s![rows, h]);
        let mut y = vec![0.0; rows * h];
        ops::swiglu_forward(&x, h, &mut y);
        let mut dx = vec![0.0; rows * 2 * h];
        ops::swiglu_backward(&dy, &x, h, &mut dx);
        close("swiglu_fwd", &b.get("y"), &y, 1e-5);
        close("swiglu_bwd", &b.get("dx"), &dx, 1e-5);
        // bf16 in and out: the f32 kernels' results on the rounded inputs, rounded
        let round = |v: &[f32]| -> Vec<f32> {
            v.iter()
                .map(|&x| half::bf16::from_f32(x).to_f32())
                .collect()
        };
        let (xr, dyr) = (round(&x), round(&dy));
        let f = Bufs::new();
        f.put("x", &xr);
        f.put("dy", &dyr);
        f.run(bin, "swiglu", 64, &s![rows, h]);
        let bf = Bufs::new();
        bf.put_bf16("x", &xr);
        bf.put_bf16("dy", &dyr);
        bf.run(bin, "swiglu_bf16", 64, &s![rows, h]);
        same_bf16("swiglu_fwd_bf16", &bf, "y", &f.get("y"));
        same_bf16("swiglu_bwd_bf16", &bf, "dx", &f.get("dx"));
    }
    let b = Bufs::new();

    let (n, d, vocab) = (9, 6, 5);
    let ids: Vec<u32> = (0..n as u32).map(|i| (i * 7 + 1) % vocab).collect();
    let wte = rnd(vocab as usize * d, 11, 1.0);
    let g = rnd(n * d, 12, 1.0);
    b.put_u32("ids", &ids);
    b.put("wte", &wte);
    b.put("dx", &g);
    // accumulates into what the gradient held
    let dwte0 = rnd(wte.len(), 14, 1.0);
    b.put("dwte", &dwte0);
    let groups = TokenGroups::new(&ids);
    b.put_u32("tokens", &groups.tokens);
    b.put_u32("starts", &groups.starts);
    b.put_u32("positions", &groups.positions);
    b.run(bin, "embed", 64, &s![n, d]);
    let want_x: Vec<f32> = ids
        .iter()
        .flat_map(|&i| wte[i as usize * d..(i as usize + 1) * d].to_vec())
        .collect();
    close("embed_fwd", &b.get("x"), &want_x, 0.0);
    let mut want_g = dwte0.clone();
    for (r, &i) in ids.iter().enumerate() {
        for j in 0..d {
            want_g[i as usize * d + j] += g[r * d + j];
        }
    }
    close("embed_bwd", &b.get("dwte"), &want_g, 1e-6);

    // 1000: 8 elements a thread; 1003: one
    for n in [1000, 1003] {
        elementwise_kernels_match_the_cpu(bin, n);
    }
}

fn elementwise_kernels_match_the_cpu(bin: &Path, n: usize) {
    let b = Bufs::new();
    let a = rnd(n, 13, 100.0);
    b.put("a", &a);
    b.run(bin, "elementwise", 64, &s![n]);
    let bf: Vec<u16> = b
        .raw("bf16")
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .collect();
    let want_bf: Vec<u16> = a
        .iter()
        .map(|&x| half::bf16::from_f32(x).to_bits())
        .collect();
    assert_eq!(bf, want_bf, "cast_bf16 rounds to nearest even");
    let ss: f64 = b
        .raw("sumsq")
        .chunks_exact(8)
        .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
        .sum();
    let want_ss: f64 = a.iter().map(|&x| (x as f64) * (x as f64)).sum();
    assert!((ss / want_ss - 1.0).abs() < 1e-5, "sumsq {ss} vs {want_ss}");
}

#[test]
fn cross_entropy_kernel_matches_the_cpu() {
    let Some(bin) = emulator() else { return };
    // 300 logits: threads of a 256-thread block see one or two (the running max and sum are
    // rescaled); 100: some threads see none
    let rows = 4;
    for (vocab, targets, backward) in [
        (300, [7u32, IGNORE, 299, 0], false),
        (300, [7, IGNORE, 299, 0], true),
        (100, [5, 99, IGNORE, 0], true),
    ] {
        let logits = rnd(rows * vocab, 15, 5.0);
        let b = Bufs::new();
        b.put("logits", &logits);
        b.put_u32("targets", &targets);
        b.run(
            bin,
            "cross_entropy",
            256,
            &s![rows, vocab, 1e-3, 0.25, backward as i32],
        );
        let mut want = logits.clone();
        let per_row =
            ops::cross_entropy(&mut want, &targets, vocab, 1e-3, backward.then_some(0.25));
        let lp: Vec<f32> = per_row.iter().map(|r| r.0).collect();
        let zt: Vec<f32> = per_row.iter().map(|r| r.1).collect();
        close("cross_entropy logp", &b.get("logp"), &lp, 1e-5);
        close("cross_entropy z", &b.get("zt"), &zt, 1e-5);
        if backward {
            let got = b.get("logits");
            close("cross_entropy grad", &got, &want, 1e-5);
            // the bf16 gradient (logits left unchanged) is the f32 one rounded
            same_bf16("cross_entropy grad into bf16", &b, "dlogits_bf16", &got);
        }
    }
}

#[test]
fn adamw_kernel_matches_the_cpu_optimizer() {
    let Some(bin) = emulator() else { return };
    let n = 500;
    let (p, g) = (rnd(n, 16, 1.0), rnd(n, 17, 0.1));
    let (m, v) = (
        rnd(n, 18, 0.01),
        rnd(n, 19, 0.001)
            .iter()
            .map(|x| x.abs())
            .collect::<Vec<_>>(),
    );
    let opt = olmo_train::optim::AdamW {
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
    };
    let (step, lr, coef) = (3u64, 1e-3f32, 0.5f32);
    let b = Bufs::new();
    b.put("p", &p);
    b.put("g", &g);
    b.put("m", &m);
    b.put("v", &v);
    let bc1 = 1.0 - opt.beta1.powi(step as i32);
    let bc2 = (1.0 - opt.beta2.powi(step as i32)).sqrt();
    b.run(
        bin,
        "adamw",
        64,
        &s![
            n,
            lr,
            opt.beta1,
            opt.beta2,
            opt.eps,
            opt.weight_decay,
            bc1,
            bc2,
            coef
        ],
    );
    // the CPU applies clipping to the gradient first
    let clipped: Vec<f32> = g.iter().map(|x| x * coef).collect();
    let (mut wp, mut wm, mut wv) = (p.clone(), m.clone(), v.clone());
    opt.step_slices(step, lr, &mut wp, &clipped, &mut wm, &mut wv, true);
    close("adamw p", &b.get("p"), &wp, 1e-6);
    close("adamw m", &b.get("m"), &wm, 1e-6);
    close("adamw v", &b.get("v"), &wv, 1e-6);
    // with the bf16 copy: the same update, and the copy is its rounding
    assert_eq!(b.get("p2"), b.get("p"));
    let pb: Vec<u16> = b
        .raw("pb")
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .collect();
    let want: Vec<u16> = b
        .get("p")
        .iter()
        .map(|&x| half::bf16::from_f32(x).to_bits())
        .collect();
    assert_eq!(pb, want);
}

#[test]
fn lionw_kernel_matches_the_cpu_optimizer() {
    let Some(bin) = emulator() else { return };
    let n = 500;
    let (p, mut g, m) = (rnd(n, 26, 1.0), rnd(n, 27, 0.1), rnd(n, 28, 0.01));
    // zero gradients and moments: torch.sign(0) = 0, so those weights only decay
    g[..10].fill(0.0);
    let mut m = m;
    m[..10].fill(0.0);
    let lion = olmo_train::optim::LionW {
        beta1: 0.9,
        beta2: 0.99,
        weight_decay: 0.1,
    };
    let (lr, coef) = (1e-3f32, 0.5f32);
    let b = Bufs::new();
    b.put("p", &p);
    b.put("g", &g);
    b.put("m", &m);
    b.run(
        bin,
        "lionw",
        64,
        &s![n, lr, lion.beta1, lion.beta2, lion.weight_decay, coef],
    );
    let clipped: Vec<f32> = g.iter().map(|x| x * coef).collect();
    let (mut wp, mut wm) = (p.clone(), m.clone());
    lion.step_slices(lr, &mut wp, &clipped, &mut wm, true);
    assert_eq!(b.get("p"), wp);
    assert_eq!(b.get("m"), wm);
    assert_eq!(wp[0], p[0] * (1.0 - lr * 0.1));
    // with the bf16 copy: the same update, and the copy is its rounding
    assert_eq!(b.get("p2"), wp);
    let pb: Vec<u16> = b
        .raw("pb")
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .collect();
    let want: Vec<u16> = wp
        .iter()
        .map(|&x| half::bf16::from_f32(x).to_bits())
        .collect();
    assert_eq!(pb, want);
}
