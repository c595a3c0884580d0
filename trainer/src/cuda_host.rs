//! The host emulator behind `Gpu::host_emulator()`: every kernel launch and GEMM the CUDA
//! engine issues, executed with plain loops on host memory (addresses are host pointers).
//! Each launch's argument list is checked against the kernel's signature in
//! `cuda_kernels.cu` (count and types), and its grid against the work it must cover. A test
//! then runs the whole CUDA engine here against the CPU engine, which exercises everything but
//! the GPU itself. Kernel semantics follow the `.cu` source; `tests/cuda_kernels.rs` checks that
//! source separately.

use anyhow::{anyhow, bail, Result};

use crate::gemm_plan::{cublas_args, cublas_c_copy, lt_args, lt_problem, GemmSpec, LtLayout};
use crate::gpu::vec_width;
use crate::gpu::Arg;
use crate::gpu::GemmLib;
use crate::ops::{softmax_causal_row, softmax_causal_row_backward, IGNORE};

/// Argument kinds of each kernel: pointer, int, long, float.
fn signature(name: &str) -> Option<&'static str> {
    Some(match name {
        "embed_fwd" => "PPPLI",
        "embed_bwd" => "PPPPPI",
        "norm_fwd" | "norm_add_fwd" => "PPPPPPIFI",
        "cols_copy" => "PILPILLI",
        "norm_bwd" => "PPPPPPII",
        "norm_dw_partial" => "PPPPPLII",
        "norm_dw_sum" => "PPII",
        "rope" | "rope_bf16" => "PPPLIIIII",
        "kv_repeat" | "kv_sum" => "PIPILIII",
        "softmax_fwd" => "PPII",
        "softmax_bwd" => "PPIF",
        "softmax_fwd_bf16" => "PPPII",
        "softmax_bwd_bf16" => "PPPIF",
        "clip_qkv" | "clip_qkv_bf16" => "PPLF",
        "clip_qkv_bwd" | "clip_qkv_bwd_bf16" => "PPL",
        "swiglu_fwd" | "swiglu_fwd_bf16" => "PPLI",
        "swiglu_bwd" | "swiglu_bwd_bf16" => "PPPLI",
        "cross_entropy" => "PPPPPIFFI",
        "cast_bf16" => "PPL",
        "sumsq" => "PLP",
        "adamw" => "PPPPPLFFFFFFFF",
        "lionw" => "PPPPLFFFFF",
        "flash_bwd_pre" => "PPPLIII",
        _ => {
            return flash_kernel(name).map(|(kind, _, _)| match kind {
                "fwd" => "PPPIIIFP",
                _ => "PPPPPIIIFP",
            })
        }
    })
}

fn p(a: &[Arg], i: usize) -> u64 {
    match a[i] {
        Arg::P(v) => v,
        _ => unreachable!(),
    }
}
fn int(a: &[Arg], i: usize) -> usize {
    match a[i] {
        Arg::I(v) => v as usize,
        Arg::L(v) => v as usize,
        _ => unreachable!(),
    }
}
fn f(a: &[Arg], i: usize) -> f32 {
    match a[i] {
        Arg::F(v) => v,
        _ => unreachable!(),
    }
}

/// The norm kernels' `rms` flag.
fn norm_kind(rms: usize) -> crate::ops::NormKind {
    if rms == 1 {
        crate::ops::NormKind::Rms
    } else {
        crate::ops::NormKind::LayerNorm
    }
}

/// A host slice at an emulated device address.
///
/// Safety: the engine hands out addresses of live host buffers of at least `n` elements;
/// the debug assertion below catches a null (absent optional) pointer.
unsafe fn at<'a, T>(addr: u64, n: usize) -> &'a mut [T] {
    debug_assert!(addr != 0);
    std::slice::from_raw_parts_mut(addr as *mut T, n)
}

fn bf16_to_f32(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

/// A kernel's f32 or bf16 input as f32.
///
/// Safety: `addr` is a live host buffer of `n` elements of that type.
unsafe fn read_f32_or_bf16(addr: u64, n: usize, bf16: bool) -> Vec<f32> {
    if bf16 {
        at::<u16>(addr, n).iter().map(|&b| bf16_to_f32(b)).collect()
    } else {
        at::<f32>(addr, n).to_vec()
    }
}

/// A kernel result into its f32 output, or rounded into its bf16 output.
///
/// Safety: `addr` is a live host buffer of `v.len()` elements of that type.
unsafe fn write_f32_or_bf16(v: &[f32], addr: u64, bf16: bool) {
    if bf16 {
        for (o, x) in at::<u16>(addr, v.len()).iter_mut().zip(v) {
            *o = half::bf16::from_f32(*x).to_bits();
        }
    } else {
        at::<f32>(addr, v.len()).copy_from_slice(v);
    }
}

/// Runs one kernel launch.
pub fn launch(name: &str, grid: u32, block: u32, a: &[Arg]) -> Result<()> {
    let Some(sig) = signature(name) else {
        bail!("host emulator: unknown kernel {name}");
    };
    if sig.len() != a.len() {
        bail!(
            "{name}: {} arguments, the kernel takes {}",
            a.len(),
            sig.len()
        );
    }
    for (i, (k, arg)) in sig.chars().zip(a).enumerate() {
        let ok = matches!(
            (k, arg),
            ('P', Arg::P(_)) | ('I', Arg::I(_)) | ('L', Arg::L(_)) | ('F', Arg::F(_))
        );
        if !ok {
            bail!("{name}: argument {i} has the wrong type (expected {k})");
        }
    }
    if !block.is_multiple_of(32) || block > 1024 {
        bail!("{name}: block of {block} threads");
    }
    let threads = grid as usize * block as usize;
    let covers = |n: usize| -> Result<()> {
        if threads < n {
            bail!("{name}: {threads} threads for {n} elements");
        }
        Ok(())
    };
    let rows = grid as usize;
    // Safety (all arms): addresses are live host buffers sized by the engine for these shapes.
    unsafe {
        match name {
            "embed_fwd" => {
                let (n, d) = (int(a, 3), int(a, 4));
                covers(n * d)?;
                let ids = at::<u32>(p(a, 0), n);
                // the embedding table spans the largest id used
                let rows_used = ids.iter().map(|&i| i as usize + 1).max().unwrap_or(0);
                let wte = at::<f32>(p(a, 1), rows_used * d);
                let x = at::<f32>(p(a, 2), n * d);
                for (row, &id) in x.chunks_exact_mut(d).zip(ids.iter()) {
                    row.copy_from_slice(&wte[id as usize * d..][..d]);
                }
            }
            "embed_bwd" => {
                // a block per distinct token, summing its positions' rows in order
                let (groups, d) = (grid as usize, int(a, 5));
                let tokens = at::<u32>(p(a, 0), groups);
                let starts = at::<u32>(p(a, 1), groups + 1);
                let positions = at::<u32>(p(a, 2), starts[groups] as usize);
                let n = positions.iter().map(|&q| q as usize + 1).max().unwrap_or(0);
                let dx = at::<f32>(p(a, 3), n * d);
                let rows_used = tokens.iter().map(|&i| i as usize + 1).max().unwrap_or(0);
                let dwte = at::<f32>(p(a, 4), rows_used * d);
                for (g, &tok) in tokens.iter().enumerate() {
                    let mut acc = vec![0.0f32; d];
                    for &q in &positions[starts[g] as usize..starts[g + 1] as usize] {
                        let row = &dx[q as usize * d..][..d];
                        acc.iter_mut().zip(row).for_each(|(s, r)| *s += r);
                    }
                    let out = &mut dwte[tok as usize * d..][..d];
                    out.iter_mut().zip(&acc).for_each(|(o, s)| *o += s);
                }
            }
            "norm_fwd" | "norm_add_fwd" => {
                let d = int(a, 6);
                let x = at::<f32>(p(a, 0), rows * d);
                let w = (p(a, 1) != 0).then(|| &*at::<f32>(p(a, 1), d));
                let mut y = vec![0.0; rows * d];
                crate::ops::norm_forward(
                    norm_kind(int(a, 8)),
                    x,
                    d,
                    f(a, 7),
                    w,
                    &mut y,
                    at(p(a, 4), rows),
                    at(p(a, 5), rows),
                );
                if name == "norm_add_fwd" {
                    // the residual (argument 2) added, into the f32 output (argument 3)
                    let res = at::<f32>(p(a, 2), rows * d);
                    y.iter_mut().zip(res.iter()).for_each(|(y, r)| *y += r);
                    write_f32_or_bf16(&y, p(a, 3), false);
                } else if p(a, 3) != 0 {
                    // the f32 output, or the bf16 one when that pointer is set
                    write_f32_or_bf16(&y, p(a, 3), true);
                } else {
                    write_f32_or_bf16(&y, p(a, 2), false);
                }
            }
            "cols_copy" => {
                let (lds, ldd, n, cols) = (int(a, 2), int(a, 5), int(a, 6), int(a, 7));
                covers(n * cols)?;
                let (sb, db) = (int(a, 1) == 1, int(a, 4) == 1);
                if n > 0 {
                    let span = |ld: usize| (n - 1) * ld + cols;
                    let v = read_f32_or_bf16(p(a, 0), span(lds), sb);
                    let mut out = read_f32_or_bf16(p(a, 3), span(ldd), db);
                    for r in 0..n {
                        out[r * ldd..][..cols].copy_from_slice(&v[r * lds..][..cols]);
                    }
                    write_f32_or_bf16(&out, p(a, 3), db);
                }
            }
            "kv_repeat" | "kv_sum" => {
                let (n, heads, kv_heads, hd) = (int(a, 4), int(a, 5), int(a, 6), int(a, 7));
                let (d, w) = (heads * hd, (heads + 2 * kv_heads) * hd);
                let (from, to) = if name == "kv_repeat" {
                    (w, 3 * d)
                } else {
                    (3 * d, w)
                };
                covers(n * to)?;
                let (sb, db) = (int(a, 1) == 1, int(a, 3) == 1);
                let x = read_f32_or_bf16(p(a, 0), n * from, sb);
                let y = match name {
                    "kv_repeat" => crate::ops::repeat_kv(&x, heads, kv_heads, hd),
                    _ => crate::ops::sum_kv(&x, heads, kv_heads, hd),
                };
                write_f32_or_bf16(&y, p(a, 2), db);
            }
            "norm_bwd" => {
                let d = int(a, 6);
                let kind = norm_kind(int(a, 7));
                let w = (p(a, 4) != 0).then(|| &*at::<f32>(p(a, 4), d));
                crate::ops::norm_backward(
                    kind,
                    at(p(a, 0), rows * d),
                    at(p(a, 1), rows * d),
                    at(p(a, 2), rows),
                    at(p(a, 3), rows),
                    d,
                    w,
                    at(p(a, 5), rows * d),
                    None,
                );
            }
            "norm_dw_partial" => {
                let (n, d, chunk) = (int(a, 5), int(a, 6), int(a, 7));
                let chunks = n.div_ceil(chunk);
                if grid as usize != d.div_ceil(32) * chunks {
                    bail!("{name}: {grid} blocks for {chunks} chunks of {d} columns");
                }
                let (dy, x) = (at::<f32>(p(a, 0), n * d), at::<f32>(p(a, 1), n * d));
                let (mean, rstd) = (at::<f32>(p(a, 2), n), at::<f32>(p(a, 3), n));
                let partial = at::<f32>(p(a, 4), chunks * d);
                for (c, out) in partial.chunks_exact_mut(d).enumerate() {
                    out.fill(0.0);
                    for r in c * chunk..n.min((c + 1) * chunk) {
                        for (j, o) in out.iter_mut().enumerate() {
                            *o += dy[r * d + j] * (x[r * d + j] - mean[r]) * rstd[r];
                        }
                    }
                }
            }
            "norm_dw_sum" => {
                let (chunks, d) = (int(a, 2), int(a, 3));
                covers(d)?;
                let partial = at::<f32>(p(a, 0), chunks * d);
                let dw = at::<f32>(p(a, 1), d);
                for c in partial.chunks_exact(d) {
                    dw.iter_mut().zip(c).for_each(|(w, s)| *w += s);
                }
            }
            "softmax_fwd" => {
                let (t, heads) = (int(a, 2), int(a, 3));
                let from = doc_start(p(a, 1), t, heads);
                for (r, row) in at::<f32>(p(a, 0), rows * t).chunks_exact_mut(t).enumerate() {
                    softmax_causal_row(row, from(r), r % t);
                }
            }
            "softmax_bwd" => {
                let (t, scale) = (int(a, 2), f(a, 3));
                let pr = at::<f32>(p(a, 0), rows * t);
                let dp = at::<f32>(p(a, 1), rows * t);
                for (r, (pr, dp)) in pr.chunks_exact(t).zip(dp.chunks_exact_mut(t)).enumerate() {
                    softmax_causal_row_backward(pr, dp, r % t, scale);
                }
            }
            "softmax_fwd_bf16" => {
                let (t, heads) = (int(a, 3), int(a, 4));
                let from = doc_start(p(a, 2), t, heads);
                let s = at::<f32>(p(a, 0), rows * t);
                let out = at::<u16>(p(a, 1), rows * t);
                for (r, (row, out)) in s
                    .chunks_exact_mut(t)
                    .zip(out.chunks_exact_mut(t))
                    .enumerate()
                {
                    // the kernel also uses its scores as scratch
                    softmax_causal_row(row, from(r), r % t);
                    for (o, v) in out.iter_mut().zip(row.iter()) {
                        *o = half::bf16::from_f32(*v).to_bits();
                    }
                }
            }
            "softmax_bwd_bf16" => {
                let (t, scale) = (int(a, 3), f(a, 4));
                let pr = at::<u16>(p(a, 0), rows * t);
                let dp = at::<f32>(p(a, 1), rows * t);
                let ds = at::<u16>(p(a, 2), rows * t);
                for r in 0..rows {
                    let pf: Vec<f32> = pr[r * t..][..t].iter().map(|&b| bf16_to_f32(b)).collect();
                    let mut g = dp[r * t..][..t].to_vec();
                    softmax_causal_row_backward(&pf, &mut g, r % t, scale);
                    for (o, v) in ds[r * t..][..t].iter_mut().zip(&g) {
                        *o = half::bf16::from_f32(*v).to_bits();
                    }
                }
            }
            "clip_qkv" | "clip_qkv_bf16" => {
                let (n, c) = (int(a, 2), f(a, 3));
                covers(n.div_ceil(32))?;
                let bf = name.ends_with("_bf16");
                let mut x = read_f32_or_bf16(p(a, 0), n, bf);
                let bits = crate::ops::clip_qkv(&mut x, c);
                write_f32_or_bf16(&x, p(a, 0), bf);
                at::<u32>(p(a, 1), bits.len()).copy_from_slice(&bits);
            }
            "clip_qkv_bwd" | "clip_qkv_bwd_bf16" => {
                let n = int(a, 2);
                covers(n.div_ceil(32))?;
                let bf = name.ends_with("_bf16");
                let mut dx = read_f32_or_bf16(p(a, 0), n, bf);
                crate::ops::clip_qkv_backward(&mut dx, at::<u32>(p(a, 1), n.div_ceil(32)));
                write_f32_or_bf16(&dx, p(a, 0), bf);
            }
            "swiglu_fwd" | "swiglu_fwd_bf16" => {
                let (n, h) = (int(a, 2), int(a, 3));
                let bf = name.ends_with("_bf16");
                covers(n * h / vec_width(bf, &[h], &[p(a, 0), p(a, 1)]))?;
                let x = read_f32_or_bf16(p(a, 0), n * 2 * h, bf);
                let mut y = vec![0.0; n * h];
                crate::ops::swiglu_forward(&x, h, &mut y);
                write_f32_or_bf16(&y, p(a, 1), bf);
            }
            "swiglu_bwd" | "swiglu_bwd_bf16" => {
                let (n, h) = (int(a, 3), int(a, 4));
                let bf = name.ends_with("_bf16");
                let v = vec_width(bf, &[h], &[p(a, 0), p(a, 1), p(a, 2)]);
                covers(n * h / v)?;
                let dy = read_f32_or_bf16(p(a, 0), n * h, bf);
                let x = read_f32_or_bf16(p(a, 1), n * 2 * h, bf);
                let mut dx = vec![0.0; n * 2 * h];
                crate::ops::swiglu_backward(&dy, &x, h, &mut dx);
                write_f32_or_bf16(&dx, p(a, 2), bf);
            }
            // rope: f32 rows; rope_bf16: bf16 rows. In place.
            "rope" | "rope_bf16" => {
                let bf = name == "rope_bf16";
                let (n, t, heads, half, stride, inv) = (
                    int(a, 3),
                    int(a, 4),
                    int(a, 5),
                    int(a, 6),
                    int(a, 7),
                    int(a, 8),
                );
                covers(n * heads * half / vec_width(bf, &[half, stride], &[p(a, 0)]))?;
                let mut x = read_f32_or_bf16(p(a, 0), n * stride, bf);
                let table = crate::ops::RopeTable {
                    cos: at::<f32>(p(a, 1), t * half).to_vec(),
                    sin: at::<f32>(p(a, 2), t * half).to_vec(),
                    half,
                };
                crate::ops::rope(&mut x, stride, heads, t, &table, inv == 1);
                write_f32_or_bf16(&x, p(a, 0), bf);
            }
            "cross_entropy" => {
                let v = int(a, 5);
                let targets = at::<u32>(p(a, 2), rows);
                if let Some(t) = targets.iter().find(|&&t| t != IGNORE && t as usize >= v) {
                    bail!("cross_entropy: target {t} outside {v} logits");
                }
                let back = int(a, 8) == 1;
                let logits = at::<f32>(p(a, 0), rows * v);
                let bf16_grad = p(a, 1) != 0;
                // into bf16, the logits stay: work on a copy
                let mut work = if bf16_grad {
                    logits.to_vec()
                } else {
                    Vec::new()
                };
                let per_row = crate::ops::cross_entropy(
                    if bf16_grad { &mut work } else { logits },
                    targets,
                    v,
                    f(a, 6),
                    back.then(|| f(a, 7)),
                );
                if back && bf16_grad {
                    write_f32_or_bf16(&work, p(a, 1), true);
                }
                let (lp, zt) = (at::<f32>(p(a, 3), rows), at::<f32>(p(a, 4), rows));
                for (r, (l, z)) in per_row.into_iter().enumerate() {
                    lp[r] = l;
                    zt[r] = z;
                }
            }
            "cast_bf16" => {
                let n = int(a, 2);
                covers(n / vec_width(true, &[n], &[p(a, 0), p(a, 1)]))?;
                let (x, y) = (at::<f32>(p(a, 0), n), at::<u16>(p(a, 1), n));
                for i in 0..n {
                    y[i] = half::bf16::from_f32(x[i]).to_bits();
                }
            }
            "sumsq" => {
                // block b's part: the elements its grid-stride loop visits
                let n = int(a, 1);
                let x = at::<f32>(p(a, 0), n);
                let parts = at::<f64>(p(a, 2), grid as usize);
                parts.fill(0.0);
                for (i, &v) in x.iter().enumerate() {
                    parts[(i / block as usize) % grid as usize] += (v as f64) * (v as f64);
                }
            }
            "adamw" => {
                let n = int(a, 5);
                covers(n)?;
                let (lr, b1, b2, eps, wd, bc1, bc2s, coef) = (
                    f(a, 6),
                    f(a, 7),
                    f(a, 8),
                    f(a, 9),
                    f(a, 10),
                    f(a, 11),
                    f(a, 12),
                    f(a, 13),
                );
                let (pp, g) = (at::<f32>(p(a, 0), n), at::<f32>(p(a, 2), n));
                let (m, v) = (at::<f32>(p(a, 3), n), at::<f32>(p(a, 4), n));
                let mut pb = (p(a, 1) != 0).then(|| at::<u16>(p(a, 1), n));
                for i in 0..n {
                    let gi = g[i] * coef;
                    let pi = pp[i] * (1.0 - lr * wd);
                    m[i] += (gi - m[i]) * (1.0 - b1);
                    v[i] = v[i] * b2 + (1.0 - b2) * gi * gi;
                    pp[i] = pi - (lr / bc1) * m[i] / (v[i].sqrt() / bc2s + eps);
                    if let Some(pb) = pb.as_mut() {
                        pb[i] = half::bf16::from_f32(pp[i]).to_bits();
                    }
                }
            }
            "lionw" => {
                let n = int(a, 4);
                covers(n)?;
                let (lr, b1, b2, wd, coef) = (f(a, 5), f(a, 6), f(a, 7), f(a, 8), f(a, 9));
                let (pp, g, m) = (
                    at::<f32>(p(a, 0), n),
                    at::<f32>(p(a, 2), n),
                    at::<f32>(p(a, 3), n),
                );
                let scaled: Vec<f32> = g.iter().map(|&x| x * coef).collect();
                let lion = crate::optim::LionW {
                    beta1: b1,
                    beta2: b2,
                    weight_decay: wd,
                };
                lion.step_slices(lr, pp, &scaled, m, true);
                if p(a, 1) != 0 {
                    let pb = at::<u16>(p(a, 1), n);
                    for (b, &v) in pb.iter_mut().zip(pp.iter()) {
                        *b = half::bf16::from_f32(v).to_bits();
                    }
                }
            }
            "flash_bwd_pre" => {
                let (n, t, heads, hd) = (int(a, 3), int(a, 4), int(a, 5), int(a, 6));
                covers(n * heads * 32)?;
                let d = heads * hd;
                let (dout, out) = (at::<u16>(p(a, 0), n * d), at::<u16>(p(a, 1), n * d));
                let dsum = at::<f32>(p(a, 2), n * heads);
                for r in 0..n {
                    for h in 0..heads {
                        let i = r * d + h * hd;
                        let v: f32 = (0..hd)
                            .map(|c| bf16_to_f32(dout[i + c]) * bf16_to_f32(out[i + c]))
                            .sum();
                        dsum[((r / t) * heads + h) * t + r % t] = v;
                    }
                }
            }
            _ if name.starts_with("flash_") => flash(name, grid as usize, block, a)?,
            _ => unreachable!(),
        }
    }
    Ok(())
}

/// The document start of softmax row `r` (position `r % t` of sequence `r / (heads·t)`) from
/// the kernels' `starts` argument, 0 where it is null (attention over the whole sequence).
///
/// Safety: `ptr` is null or holds the starts of every sequence the rows cover.
unsafe fn doc_start(ptr: u64, t: usize, heads: usize) -> impl Fn(usize) -> usize {
    move |r: usize| {
        if ptr == 0 {
            return 0;
        }
        let (bi, pos) = (r / (heads * t), r % t);
        // Safety: as the function's.
        unsafe { *(ptr as *const u32).add(bi * t + pos) as usize }
    }
}

/// A flash-attention kernel's name read as (kind, head size, wide): `flash_fwd_128`,
/// `flash_dkdv_64_wide`, ... for the head sizes the `.cu` file instantiates.
fn flash_kernel(name: &str) -> Option<(&'static str, usize, bool)> {
    let rest = name.strip_prefix("flash_")?;
    let (rest, wide) = match rest.strip_suffix("_wide") {
        Some(r) => (r, true),
        None => (rest, false),
    };
    let (kind, hd) = rest.rsplit_once('_')?;
    let kind = ["fwd", "dq", "dkdv"].into_iter().find(|k| *k == kind)?;
    let hd = hd
        .parse()
        .ok()
        .filter(|h| crate::cuda::FLASH_HEAD_DIMS.contains(h))?;
    Some((kind, hd, wide))
}

/// The flash-attention kernels by their definition: causal softmax attention of the bf16
/// q, k, v (and bf16 dO), with f32 arithmetic, each q head reading its kv head (the fused rows
/// hold `kv_heads` k and v heads) and dK, dV summing the q heads sharing one; the batch size
/// follows from the grid, whose shape is checked against the kernels' blocks (16 rows a warp:
/// the forward and dQ 4 warps, or 8 wide, a block per q head; dK/dV 2, or 4 wide, a block per
/// kv head).
///
/// Safety: as `launch`.
unsafe fn flash(name: &str, grid: usize, block: u32, a: &[Arg]) -> Result<()> {
    let Some((kind, hd, wide)) = flash_kernel(name) else {
        bail!("host emulator: unknown kernel {name}");
    };
    let (t, heads, kv_heads, scale, starts) = match kind {
        "fwd" => (int(a, 3), int(a, 4), int(a, 5), f(a, 6), p(a, 7)),
        _ => (int(a, 5), int(a, 6), int(a, 7), f(a, 8), p(a, 9)),
    };
    if kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
        bail!("{name}: {heads} heads cannot share {kv_heads} kv heads");
    }
    let warps = crate::cuda::flash_warps(kind, wide);
    let (rows_per_block, threads) = (16 * warps, 32 * warps as u32);
    let block_heads = if kind == "dkdv" { kv_heads } else { heads };
    let blocks = t.div_ceil(rows_per_block) * block_heads;
    if block != threads || !grid.is_multiple_of(blocks) || grid == 0 {
        bail!("{name}: grid {grid} of {block} threads for T {t} and {block_heads} heads");
    }
    let b = grid / blocks;
    let (d, kvd, group) = (heads * hd, kv_heads * hd, heads / kv_heads);
    let w = d + 2 * kvd;
    let n = b * t;
    let bf = |v: u16| bf16_to_f32(v);
    let qkv = at::<u16>(p(a, 0), n * w);
    let (q, k, v) = (
        |r: usize, h: usize, c: usize| bf(qkv[r * w + h * hd + c]),
        |r: usize, h: usize, c: usize| bf(qkv[r * w + d + h / group * hd + c]),
        |r: usize, h: usize, c: usize| bf(qkv[r * w + d + kvd + h / group * hd + c]),
    );
    let dot = |x: &dyn Fn(usize) -> f32, y: &dyn Fn(usize) -> f32| -> f32 {
        (0..hd).map(|c| x(c) * y(c)).sum()
    };
    // scaled score of query row i and key row j (rows of the same sequence) in q head h
    let score = |i: usize, j: usize, h: usize| dot(&|c| q(i, h, c), &|c| k(j, h, c)) * scale;
    // where the document of position i of sequence bi starts (0: attention over the sequence)
    let from = |bi: usize, i: usize| {
        if starts == 0 {
            0
        } else {
            at::<u32>(starts, n)[bi * t + i] as usize
        }
    };
    if kind == "fwd" {
        let out = at::<u16>(p(a, 1), n * d);
        let lse = at::<f32>(p(a, 2), b * heads * t);
        for bi in 0..b {
            for h in 0..heads {
                for i in 0..t {
                    let r = bi * t + i;
                    let lo = from(bi, i);
                    let s: Vec<f32> = (lo..=i).map(|j| score(r, bi * t + j, h)).collect();
                    let mx = s.iter().copied().fold(f32::MIN, f32::max);
                    let e: Vec<f32> = s.iter().map(|x| (x - mx).exp()).collect();
                    let sum: f32 = e.iter().sum();
                    for c in 0..hd {
                        let o = (lo..=i)
                            .zip(&e)
                            .map(|(j, e)| e * v(bi * t + j, h, c))
                            .sum::<f32>()
                            / sum;
                        out[r * d + h * hd + c] = half::bf16::from_f32(o).to_bits();
                    }
                    lse[(bi * heads + h) * t + i] = mx + sum.ln();
                }
            }
        }
        return Ok(());
    }
    let dout = at::<u16>(p(a, 1), n * d);
    let lse = at::<f32>(p(a, 2), b * heads * t);
    let dsum = at::<f32>(p(a, 3), b * heads * t);
    let dqkv = at::<u16>(p(a, 4), n * w);
    let bits = |v: f32| half::bf16::from_f32(v).to_bits();
    let g = |r: usize, h: usize, c: usize| bf(dout[r * d + h * hd + c]);
    // dK and dV of each position's kv heads, summed over the q heads that share them
    let mut dkv = vec![0f32; if kind == "dkdv" { n * 2 * kvd } else { 0 }];
    for bi in 0..b {
        for h in 0..heads {
            let st = |i: usize| (bi * heads + h) * t + i;
            // P and dS = P ∘ (dP − D) of query i, key j
            let pds = |i: usize, j: usize| {
                let (ri, rj) = (bi * t + i, bi * t + j);
                let pr = (score(ri, rj, h) - lse[st(i)]).exp();
                let dp = dot(&|c| g(ri, h, c), &|c| v(rj, h, c));
                (pr, pr * (dp - dsum[st(i)]))
            };
            for x in 0..t {
                let rx = bi * t + x;
                if kind == "dq" {
                    let keys = from(bi, x)..=x;
                    let ds: Vec<f32> = keys.clone().map(|j| pds(x, j).1).collect();
                    for c in 0..hd {
                        let sum = keys
                            .clone()
                            .zip(&ds)
                            .map(|(j, ds)| ds * k(bi * t + j, h, c));
                        dqkv[rx * w + h * hd + c] = bits(scale * sum.sum::<f32>());
                    }
                } else {
                    // the queries of key x's document see it; later ones get P = dS = 0
                    let pd: Vec<(f32, f32)> = (x..t)
                        .map(|i| {
                            if from(bi, i) > x {
                                (0.0, 0.0)
                            } else {
                                pds(i, x)
                            }
                        })
                        .collect();
                    let row = &mut dkv[rx * 2 * kvd..][..2 * kvd];
                    for c in 0..hd {
                        let (mut dk, mut dv) = (0.0, 0.0);
                        for (o, &(pr, ds)) in pd.iter().enumerate() {
                            let ri = bi * t + x + o;
                            dk += ds * q(ri, h, c);
                            dv += pr * g(ri, h, c);
                        }
                        row[h / group * hd + c] += dk;
                        row[kvd + h / group * hd + c] += dv;
                    }
                }
            }
        }
    }
    for (r, sums) in dkv.chunks_exact(2 * kvd).enumerate() {
        let row = &mut dqkv[r * w + d..][..2 * kvd];
        for (i, (o, &s)) in row.iter_mut().zip(sums).enumerate() {
            *o = bits(if i < kvd { scale * s } else { s });
        }
    }
    Ok(())
}

/// A GEMM in `lib` by that library's definition (column-major, from exactly the arguments
/// the engine would pass it) on host memory, refusing what cuBLASLt would refuse.
pub fn gemm(spec: &GemmSpec, lib: GemmLib) -> Result<()> {
    let scalars = (spec.alpha, spec.beta);
    match lib {
        GemmLib::CublasLt => {
            let a = lt_args(spec);
            let (m, n, k) =
                lt_problem(&a).map_err(|e| anyhow!("cuBLASLt GEMM {}: {e}", spec.shape()))?;
            let at = |l: &LtLayout, bt: usize, r: usize, c: usize| bt * l.stride + r + c * l.ld;
            let (la, lb, lc) = (&a.a_layout, &a.b_layout, &a.cd_layout);
            host_gemm(
                (m, n, k, a.batch),
                [
                    (a.a, la.bf16),
                    (a.b, lb.bf16),
                    (a.c, lc.bf16),
                    (a.d, lc.bf16),
                ],
                scalars,
                |bt, i, l| {
                    let (r, c) = if a.trans_a { (l, i) } else { (i, l) };
                    at(la, bt, r, c)
                },
                |bt, l, j| {
                    let (r, c) = if a.trans_b { (j, l) } else { (l, j) };
                    at(lb, bt, r, c)
                },
                |bt, i, j| at(lc, bt, i, j),
            );
        }
        GemmLib::Cublas => {
            if let Some((dst, src, bytes)) = cublas_c_copy(spec).map_err(|e| anyhow!(e))? {
                // Safety: both ranges lie in live host buffers of the output's extent.
                unsafe { std::ptr::copy(src as *const u8, dst as *mut u8, bytes) };
            }
            let a = cublas_args(spec);
            let ix = |t: bool, ld: usize, stride: usize| {
                move |bt: usize, r: usize, c: usize| {
                    bt * stride + if t { c + r * ld } else { r + c * ld }
                }
            };
            let (ia, ib) = (
                ix(a.trans_a, a.lda, a.stride_a),
                ix(a.trans_b, a.ldb, a.stride_b),
            );
            let bf16 = spec.a.bf16;
            host_gemm(
                (a.m, a.n, a.k, a.batch),
                [
                    (a.a, bf16),
                    (a.b, bf16),
                    (a.c, spec.c_bf16),
                    (a.c, spec.c_bf16),
                ],
                scalars,
                ia,
                ib,
                |bt, i, j| bt * a.stride_c + i + j * a.ldc,
            );
        }
    }
    Ok(())
}

/// `D = alpha · op(A) · op(B) + beta · C` for each of `batch`, on host pointers `[A, B, C, D]`
/// (each with its bf16 flag), where op(A)[i, l], op(B)[l, j] and C/D[i, j] of matrix `bt` lie
/// at the indices the closures give.
fn host_gemm(
    (m, n, k, batch): (usize, usize, usize, usize),
    [a, b, c, d]: [(u64, bool); 4],
    (alpha, beta): (f32, f32),
    ia: impl Fn(usize, usize, usize) -> usize,
    ib: impl Fn(usize, usize, usize) -> usize,
    ic: impl Fn(usize, usize, usize) -> usize,
) {
    let read = |(addr, bf16): (u64, bool), i: usize| -> f32 {
        // Safety: the arguments' extents lie inside live host buffers.
        unsafe {
            if bf16 {
                bf16_to_f32(*(addr as *const u16).add(i))
            } else {
                *(addr as *const f32).add(i)
            }
        }
    };
    for bt in 0..batch {
        for i in 0..m {
            for j in 0..n {
                let mut acc = 0.0f32;
                for l in 0..k {
                    acc += read(a, ia(bt, i, l)) * read(b, ib(bt, l, j));
                }
                let o = ic(bt, i, j);
                // beta = 0 must not read C (it may be uninitialised).
                let v = if beta == 0.0 {
                    alpha * acc
                } else {
                    alpha * acc + beta * read(c, o)
                };
                // Safety: as above, for the output.
                unsafe {
                    if d.1 {
                        *(d.0 as *mut u16).add(o) = half::bf16::from_f32(v).to_bits();
                    } else {
                        *(d.0 as *mut f32).add(o) = v;
                    }
                }
            }
        }
    }
}
