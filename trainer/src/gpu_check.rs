//! `olmo-train gpu-check`: the one prepared run for a GPU machine. It builds nothing there (the
//! binary is built on a CPU machine and copied over) and, in a few minutes:
//!  1. checks the CUDA engine against the CPU engine on random inputs: loss, per-position
//!     log-probabilities, every tensor's gradient (which localises a wrong kernel: norm weights
//!     → `norm_bwd`, att_proj → attention/RoPE, wte → embedding/loss, ...) and one AdamW step,
//!     in fp32 and in bf16 mixed precision, for LayerNorm/tied and RMSNorm/untied models;
//!  2. runs the GEMMs of an OLMo-1B step in cuBLASLt (the engine's library) and in cuBLAS:
//!     the two must agree, and their TFLOP/s say how far the GEMMs alone are from peak;
//!  3. trains a small model for a few hundred steps on the committed token file (the loss must
//!     fall) and prints tokens/s;
//!  4. times a few steps of OLMo-1B at sequence 2048 and prints tokens/s and MFU.
//!
//! It exits non-zero when a check fails, after printing the whole table.

use std::time::Instant;

use anyhow::{bail, Result};

use crate::backend::{Backend, Cpu, Update};
use crate::cuda::{flash_flops, CudaEngine, FlashBlocks};
use crate::gemm_plan::{self, Attn, Buf, GemmSpec};
use crate::gpu::{GemmLib, Gpu, Mem};
use crate::memory_plan::gib;
use crate::model::{init_params, Batch, Checkpointing, Init, InitFn, Model, ModelConfig, Role};
use crate::ops::{NormKind, IGNORE};
use crate::optim::AdamW;
use crate::xorshift::XorShift;

/// H100/H200 SXM dense bf16 peak, FLOP/s (half the sparse figure): MFU's denominator where the
/// GPU's own is not known.
const H200_BF16_PEAK: f64 = 989.4e12;

/// The peak MFU is measured against: the GPU's (`gpu::peak_bf16_flops`), else the H200's,
/// with a word saying which.
fn mfu_peak(e: &CudaEngine) -> (f64, &'static str) {
    match e.peak_flops() {
        Some(p) => (p, ""),
        None => (H200_BF16_PEAK, " (an H200's: this GPU's peak is not known)"),
    }
}

pub struct Options {
    pub ordinal: usize,
    pub train_steps: u64,
    pub olmo_1b_steps: u64,
    /// Steps of a 1B model in OLMo 2 blocks (0: none).
    pub olmo2_1b_steps: u64,
    pub olmo_1b_micro: usize,
    /// A raw uint16 token file for the training check.
    pub tokens: Option<std::path::PathBuf>,
    /// The attention paths to check and time: `false` materialised, `true` flash.
    pub attention: Vec<bool>,
    /// Timed runs of each OLMo-1B GEMM in cuBLASLt and in cuBLAS (0: no GEMM table).
    pub gemm_reps: usize,
}

fn rel(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den.max(1e-30)).sqrt()
}

/// Three model variants, 4 heads, 2 layers, at a given width and vocabulary: LayerNorm/tied,
/// RMSNorm+weight/untied with `clip_qkv`, and OLMo 2's block (RMSNorm+weight/untied, norms
/// after each branch, QK-norm). The clip bound is 3 standard deviations of the projections
/// under `compare_engines`' init: it clips a few entries in a thousand, and few lie within bf16
/// rounding of it (each such entry may clip in bf16 and not in f32, or the reverse, which drops
/// or keeps its whole gradient: the relative error grows as the square root of their share).
pub fn variants(d: usize, vocab: usize) -> [(&'static str, ModelConfig); 3] {
    let model = |norm, affine, tying| ModelConfig {
        d_model: d,
        n_heads: 4,
        n_kv_heads: 4,
        n_layers: 2,
        mlp_hidden: 2 * d,
        vocab_size: vocab,
        embedding_size: vocab.div_ceil(128) * 128,
        rope_theta: 10_000.0,
        eps: 1e-5,
        z_loss: 1e-4,
        norm,
        norm_affine: affine,
        weight_tying: tying,
        clip_qkv: None,
        norm_after: false,
        qk_norm: false,
        qk_norm_affine: false,
    };
    let clipped = ModelConfig {
        clip_qkv: Some(3.0 * 0.05 * (d as f32).sqrt()),
        n_kv_heads: 1,
        ..model(NormKind::Rms, true, false)
    };
    let olmo2 = ModelConfig {
        norm_after: true,
        qk_norm: true,
        qk_norm_affine: true,
        n_kv_heads: 2,
        ..model(NormKind::Rms, true, false)
    };
    [
        ("layernorm, tied", model(NormKind::LayerNorm, false, true)),
        ("rmsnorm+weight, untied, clip_qkv, 1 kv head", clipped),
        ("OLMo 2 block: norm_after, QK-norm, 2 kv heads", olmo2),
    ]
}

/// A CUDA engine for a model, initial state and precision (bf16 or not).
pub type MakeEngine<'a> = dyn Fn(Model, [&[f32]; 3], bool) -> Result<CudaEngine> + 'a;

/// Part 1: the CUDA engine against the CPU engine on random inputs of `b` sequences of `t`
/// positions, with the materialised attention (fp32 and bf16) and/or the flash attention
/// (bf16), as `attention` lists them. Prints a table; returns whether every check passed.
pub fn compare_engines(
    make: &MakeEngine,
    models: &[(&str, ModelConfig)],
    (b, t): (usize, usize),
    attention: &[bool],
) -> Result<bool> {
    let mut all_ok = true;
    println!("| model | precision | quantity | relative L2 error | tolerance | ok |");
    println!("|---|---|---|---|---|---|");
    for &(label, cfg) in models {
        let mut rng = XorShift::from_state(0x9E37_79B9_7F4A_7C15);
        let inputs: Vec<u32> = (0..b * t)
            .map(|_| (rng.next_u64() % cfg.vocab_size as u64) as u32)
            .collect();
        let targets: Vec<u32> = (0..b * t)
            .map(|i| {
                if i % 17 == 5 {
                    IGNORE
                } else {
                    (rng.next_u64() % cfg.vocab_size as u64) as u32
                }
            })
            .collect();
        // attention within documents too: sequences cut by EOS tokens (here id 0) at
        // positions that fall inside and on the edges of the flash kernels' tiles
        let mut doc_inputs = inputs.clone();
        for (k, i) in (0..b * t).step_by(t / 3 + 5).enumerate() {
            doc_inputs[(i + k * 7) % (b * t)] = 0;
        }
        let doc_starts = crate::ops::document_starts(&doc_inputs, t, 0);
        let batches = [
            Batch {
                inputs: &inputs,
                targets: &targets,
                b,
                t,
                doc_starts: None,
            },
            Batch {
                inputs: &doc_inputs,
                targets: &targets,
                b,
                t,
                doc_starts: Some(&doc_starts),
            },
        ];
        let scored = targets.iter().filter(|&&x| x != IGNORE).count() as f32;
        let mut params = init_params(&cfg, &Init::new(InitFn::Normal, 0.05), 7);
        let layout = crate::model::Layout::new(&cfg);
        for tns in &layout.tensors {
            if tns.role == Role::Norm {
                for (j, p) in params[tns.range()].iter_mut().enumerate() {
                    *p = 1.0 + 0.001 * (j % 50) as f32;
                }
            }
        }
        let n = params.len();
        let decay = layout.decay_mask(false, false);
        let update = |_: ()| Update {
            step: 1,
            lr: 1e-3,
            max_norm: Some(1.0),
            coefs: None,
            optimizer: crate::optim::Optimizer::AdamW(AdamW {
                beta1: 0.9,
                beta2: 0.95,
                eps: 1e-8,
                weight_decay: 0.1,
            }),
            decay: &decay,
        };
        // the CPU engine's scores, gradients, norm and updated weights for each batch
        let mut reference = Vec::new();
        for batch in &batches {
            let mut cpu = Cpu::new(
                Model::new(cfg, t),
                params.clone(),
                vec![0.0; n],
                vec![0.0; n],
            );
            let want = cpu.forward_backward(batch, 1.0 / scored)?;
            let want_grads = cpu.grads.clone();
            let want_norm = cpu.step(&update(()))?;
            reference.push((want, want_grads, want_norm, cpu.params));
        }
        let flash_ok = crate::cuda::FLASH_HEAD_DIMS.contains(&cfg.head_dim());
        for (precision, bf16, flash, docs, tol) in [
            ("fp32", false, false, false, 1e-4),
            ("bf16", true, false, false, 3e-2),
            ("bf16 flash", true, true, false, 3e-2),
            ("fp32 documents", false, false, true, 1e-4),
            ("bf16 documents", true, false, true, 3e-2),
            ("bf16 flash documents", true, true, true, 3e-2),
        ] {
            if !attention.contains(&flash) {
                continue;
            }
            if flash && !flash_ok {
                println!(
                    "| {label} | {precision} | (no flash kernels for head size {}) | | | |",
                    cfg.head_dim()
                );
                continue;
            }
            let batch = &batches[usize::from(docs)];
            let (want, want_grads, want_norm, want_params) = &reference[usize::from(docs)];
            let zeros = vec![0.0; n];
            let mut gpu = make(Model::new(cfg, t), [&params, &zeros, &zeros], bf16)?;
            gpu.set_flash_attention(flash)?;
            let got = gpu.forward_backward(batch, 1.0 / scored)?;
            let grads = gpu.grads()?;
            let mut rows: Vec<(String, f64)> = vec![
                (
                    "loss (CE + z)".into(),
                    ((got.ce_sum + got.z_sum) / (want.ce_sum + want.z_sum) - 1.0).abs(),
                ),
                (
                    "log p(target) per position".into(),
                    rel(&got.logprobs, &want.logprobs),
                ),
            ];
            // Gradients by role, worst over layers.
            let mut by_role: std::collections::BTreeMap<String, f64> = Default::default();
            for tns in &layout.tensors {
                let name = tns
                    .name
                    .rsplit_once(".weight")
                    .map(|(a, _)| a.rsplit('.').next().unwrap_or(a).to_string())
                    .unwrap_or_default();
                let e = rel(&grads[tns.range()], &want_grads[tns.range()]);
                let slot = by_role.entry(format!("grad {name}")).or_insert(0.0);
                *slot = slot.max(e);
            }
            rows.extend(by_role);
            let norm = gpu.step(&update(()))?;
            rows.push(("grad norm".into(), ((norm / want_norm) as f64 - 1.0).abs()));
            let mut after = Vec::new();
            gpu.with_state(&mut |p, _, _| {
                after = p.to_vec();
                Ok(())
            })?;
            rows.push(("params after AdamW".into(), rel(&after, want_params)));
            for (q, e) in rows {
                let ok = e.is_finite() && e <= tol;
                all_ok &= ok;
                println!(
                    "| {label} | {precision} | {q} | {e:.2e} | {tol:.0e} | {} |",
                    if ok { "yes" } else { "NO" }
                );
            }
        }
    }
    Ok(all_ok)
}

/// A mitchell-initialised model on the GPU, its decay mask and parameter count.
fn fresh_engine(
    ordinal: usize,
    cfg: ModelConfig,
    seq: usize,
    flash: bool,
) -> Result<(CudaEngine, Vec<bool>, usize)> {
    let decay = crate::model::Layout::new(&cfg).decay_mask(false, false);
    let params = init_params(&cfg, &Init::new(InitFn::Mitchell, 0.02), 1);
    let n = params.len();
    let zeros = vec![0.0; n];
    let mut engine = CudaEngine::new(ordinal, Model::new(cfg, seq), &params, &zeros, &zeros)?;
    engine.set_flash_attention(flash)?;
    Ok((engine, decay, n))
}

fn attention_name(flash: bool) -> &'static str {
    if flash {
        "flash attention"
    } else {
        "materialised attention"
    }
}

/// Windows of `seq + 1` tokens from a raw uint16 file, or a deterministic Zipf-ish stream.
fn token_windows(
    path: Option<&std::path::Path>,
    seq: usize,
    vocab: usize,
) -> Result<Vec<Vec<u32>>> {
    let tokens: Vec<u32> = match path {
        Some(p) => std::fs::read(p)?
            .chunks_exact(2)
            .map(|c| (u16::from_le_bytes([c[0], c[1]]) as u32).min(vocab as u32 - 1))
            .collect(),
        None => {
            let mut rng = XorShift::from_state(42);
            (0..1 << 20)
                .map(|_| {
                    let u = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
                    ((vocab as f64).powf(u) as u32).min(vocab as u32 - 1)
                })
                .collect()
        }
    };
    Ok(tokens.chunks_exact(seq + 1).map(|w| w.to_vec()).collect())
}

/// Times `steps` optimizer steps (after `warmup`) of `micro`-sized batches; returns
/// (tokens/s, first loss, last loss).
fn time_training(
    engine: &mut dyn Backend,
    windows: &[Vec<u32>],
    micro: usize,
    warmup: u64,
    steps: u64,
    decay: &[bool],
    lr: f32,
) -> Result<(f64, f64, f64)> {
    let (mut inputs, mut targets) = (Vec::new(), Vec::new());
    let mut start = Instant::now();
    let (mut first, mut last) = (f64::NAN, f64::NAN);
    let seq = windows[0].len() - 1;
    for s in 0..warmup + steps {
        if s == warmup {
            start = Instant::now();
        }
        let at = (s as usize * micro) % (windows.len() - micro + 1);
        let batch = Batch::from_windows(&windows[at..at + micro], &mut inputs, &mut targets);
        engine.zero_grad()?;
        let sc = engine.forward_backward(&batch, 1.0 / (micro * seq) as f32)?;
        engine.step(&Update {
            step: s + 1,
            lr,
            max_norm: Some(1.0),
            coefs: None,
            optimizer: crate::optim::Optimizer::AdamW(AdamW {
                beta1: 0.9,
                beta2: 0.95,
                eps: 1e-8,
                weight_decay: 0.1,
            }),
            decay,
        })?;
        let loss = sc.ce_sum / sc.count as f64;
        if s == 0 {
            first = loss;
        }
        last = loss;
    }
    let secs = start.elapsed().as_secs_f64();
    Ok(((steps as usize * micro * seq) as f64 / secs, first, last))
}

/// Model FLOPs of one call of a profiled launch, where they are known: a GEMM (label
/// `GEMM MxNxK[ xBATCH] ...`) or a flash-attention kernel over `b` sequences of `t` positions
/// with `heads` heads of `hd` (`flash_flops`).
fn call_flops(label: &str, b: usize, t: usize, heads: usize, hd: usize) -> Option<f64> {
    if let Some(rest) = label.strip_prefix("GEMM ") {
        let mut words = rest.split(' ');
        let dims: Vec<f64> = words
            .next()?
            .split('x')
            .map(|v| v.parse().ok())
            .collect::<Option<_>>()?;
        let batch: f64 = match words.next().and_then(|w| w.strip_prefix('x')) {
            Some(n) => n.parse().ok()?,
            None => 1.0,
        };
        return match dims[..] {
            [m, n, k] => Some(2.0 * m * n * k * batch),
            _ => None,
        };
    }
    let kind = label.strip_prefix("flash_")?.split('_').next()?;
    flash_flops(kind, b, t, heads, hd)
}

/// The block size each flash kernel runs in, as timed on its first launch (the same bits
/// either way), with the TFLOP/s of both sizes.
fn print_flash_choices(engine: &CudaEngine, cfg: &ModelConfig) {
    for c in engine.flash_choices() {
        println!("{}", c.line(cfg.n_heads, cfg.head_dim()));
    }
}

/// FNV-1a over the bits of an engine's weights and AdamW moments.
pub fn state_hash(engine: &mut dyn Backend) -> Result<u64> {
    let mut hash = 0xcbf29ce484222325u64;
    engine.with_state(&mut |p, m, v| {
        for x in p.iter().chain(m).chain(v) {
            hash = (hash ^ x.to_bits() as u64).wrapping_mul(0x100000001b3);
        }
        Ok(())
    })?;
    Ok(hash)
}

/// One more optimizer step with every launch and GEMM timed on the GPU: where the step's time
/// goes, for the next round of kernel work.
fn profile_step(
    engine: &mut CudaEngine,
    windows: &[Vec<u32>],
    micro: usize,
    decay: &[bool],
    cfg: &ModelConfig,
) -> Result<()> {
    let (seq, heads, hd) = (windows[0].len() - 1, cfg.n_heads, cfg.head_dim());
    engine.gpu.profile_start()?;
    time_training(engine, windows, micro, 0, 1, decay, 4e-4)?;
    let rows = engine.gpu.profile_end()?;
    let total: f64 = rows.iter().map(|r| r.1).sum();
    if let Some((lt, fallback)) = engine.gpu.gemm_plans() {
        println!("\nGEMM problems: {lt} in cuBLASLt, {fallback} fell back to cuBLAS");
    }
    println!("\nGPU time of one step by kernel and GEMM shape (m x n x k): {total:.1} ms\n");
    println!("| kernel | ms | share | calls | TFLOP/s |");
    println!("|---|---|---|---|---|");
    for (label, ms, calls) in rows.iter().take(24) {
        let tflops = call_flops(label, micro, seq, heads, hd)
            .map(|f| format!("{:.0}", f * *calls as f64 / (ms * 1e-3) / 1e12))
            .unwrap_or_default();
        println!(
            "| {label} | {ms:.2} | {:.1}% | {calls} | {tflops} |",
            100.0 * ms / total.max(1e-9)
        );
    }
    if rows.len() > 24 {
        let rest: f64 = rows[24..].iter().map(|r| r.1).sum();
        println!(
            "| ({} more) | {rest:.2} | {:.1}% | |",
            rows.len() - 24,
            100.0 * rest / total.max(1e-9)
        );
    }
    println!();
    Ok(())
}

/// Runs `spec` in `lib` into a zeroed output; the output's f32 values (bf16 outputs widened).
fn gemm_result(gpu: &Gpu, spec: &GemmSpec, lib: GemmLib, out: &mut Mem<f32>) -> Result<Vec<f32>> {
    gpu.fill_zero(out)?;
    if gpu.gemm_in(spec, lib)? != lib {
        bail!("the GEMM {} did not run in {lib:?}", spec.shape());
    }
    let v = gpu.download(out)?;
    let n = spec.m * spec.n * spec.batch;
    Ok(if spec.c_bf16 {
        v.iter()
            .flat_map(|x| {
                let b = x.to_bits();
                [b as u16, (b >> 16) as u16]
            })
            .take(n)
            .map(|h| half::bf16::from_bits(h).to_f32())
            .collect()
    } else {
        v[..n].to_vec()
    })
}

/// Milliseconds per run of `spec` in `lib`, over `reps` runs after one untimed.
fn gemm_ms(gpu: &Gpu, spec: &GemmSpec, lib: GemmLib, reps: usize) -> Result<f64> {
    gpu.gemm_in(spec, lib)?;
    gpu.profile_start()?;
    for _ in 0..reps {
        gpu.gemm_in(spec, lib)?;
    }
    let rows = gpu.profile_end()?;
    Ok(rows.iter().map(|r| r.1).sum::<f64>() / reps as f64)
}

/// The sizes of the GEMM table: rows of a micro-batch, width, MLP hidden size, vocabulary;
/// attention over sequences of 2048 (or `rows`, if fewer) with heads of 128 (at least two).
#[derive(Clone, Copy)]
pub struct GemmDims {
    pub rows: usize,
    pub d: usize,
    pub h: usize,
    pub v: usize,
}

impl GemmDims {
    fn attention(&self) -> Attn {
        let hd = 128.min(self.d / 2);
        Attn {
            t: 2048.min(self.rows),
            heads: self.d / hd,
            hd,
        }
    }
}

/// The GEMMs of one layer and the head (OLMo-1B's on a GPU), each in cuBLASLt and in cuBLAS
/// on the same random bf16 operands: results within bf16 rounding of each other, and TFLOP/s. Materialised attention's batched GEMMs are there too: their operands
/// (heads of a fused qkv row) are the least aligned the engine hands cuBLASLt.
pub fn gemm_table(gpu: &Gpu, dims: GemmDims, reps: usize) -> Result<bool> {
    let GemmDims { rows, d, h, v } = dims;
    let attn = dims.attention();
    let t = attn.t;
    // the head runs on chunks of rows, as the engine runs it
    let head_rows = crate::cuda::head_chunk_rows(rows, v);
    // one buffer of random bf16 for every operand, one f32 residual, one output
    let mut rng = XorShift::from_state(7);
    // the largest operand: the head's dlogits, the probabilities, or a weight
    let n_src = [
        head_rows * v,
        rows * h,
        attn.heads * t * t,
        v * d,
        h * d,
        t * 3 * d,
    ]
    .into_iter()
    .max()
    .unwrap_or(0);
    let src: Vec<u16> = (0..n_src)
        .map(|_| half::bf16::from_f32(rng.symmetric()).to_bits())
        .collect();
    let src = gpu.upload(&src)?;
    let resid: Vec<f32> = (0..rows * d)
        .map(|i| (i % 97) as f32 / 97.0 - 0.5)
        .collect();
    let resid = gpu.upload(&resid)?;
    let (s, r) = (gpu.ptr(&src, 0), gpu.ptr(&resid, 0));
    let bf = Buf { ptr: s, bf16: true };
    let b16 = |o: u64| Buf { ptr: o, bf16: true };
    // each GEMM into its own output, at the address given
    type Make<'a> = Box<dyn Fn(u64) -> GemmSpec + 'a>;
    let specs: Vec<(&str, Make)> = vec![
        (
            "qkv",
            Box::new(|o| gemm_plan::linear_fwd(bf, bf, b16(o), rows, d, 3 * d)),
        ),
        (
            "attn out + residual",
            Box::new(|o| gemm_plan::linear_fwd_residual(bf, bf, r, o, rows, d, d)),
        ),
        (
            "ff in",
            Box::new(|o| gemm_plan::linear_fwd(bf, bf, b16(o), rows, d, 2 * h)),
        ),
        (
            "ff out + residual",
            Box::new(|o| gemm_plan::linear_fwd_residual(bf, bf, r, o, rows, h, d)),
        ),
        (
            "head (logits)",
            Box::new(|o| gemm_plan::linear_fwd(bf, bf, Buf::f32(o), head_rows, d, v)),
        ),
        (
            "ff out dx",
            Box::new(|o| gemm_plan::linear_dx(bf, bf, b16(o), rows, h, d)),
        ),
        (
            "ff out dW",
            Box::new(|o| gemm_plan::linear_dw(bf, bf, o, rows, h, d)),
        ),
        (
            "head dW",
            Box::new(|o| gemm_plan::linear_dw(bf, bf, o, head_rows, d, v)),
        ),
        ("scores (1 seq)", Box::new(|o| attn.scores(0, bf, o, 0.088))),
        ("P V (1 seq)", Box::new(|o| attn.output(0, bf, bf, b16(o)))),
    ];
    println!("| GEMM | m x n x k (x batch) | cuBLASLt TFLOP/s | cuBLAS TFLOP/s | rel diff | ok |");
    println!("|---|---|---|---|---|---|");
    let mut all = true;
    for (name, make) in &specs {
        // every spec's output extent is its m·n·batch elements from the start
        let probe = make(0);
        let mut out = gpu.zeros::<f32>(probe.m * probe.n * probe.batch)?;
        let spec = &make(gpu.ptr(&out, 0));
        let lt = gemm_result(gpu, spec, GemmLib::CublasLt, &mut out)?;
        let cb = gemm_result(gpu, spec, GemmLib::Cublas, &mut out)?;
        let e = rel(&lt, &cb);
        // the same sums in another order, rounded once to bf16 at most
        let ok = e.is_finite() && e < 1e-2;
        all &= ok;
        let flop = 2.0 * (spec.m * spec.n * spec.k * spec.batch) as f64;
        // no timings on the host emulator
        let tf = |ms: f64| {
            if ms > 0.0 {
                format!("{:.0}", flop / (ms * 1e-3) / 1e12)
            } else {
                "-".into()
            }
        };
        let (t_lt, t_cb) = (
            gemm_ms(gpu, spec, GemmLib::CublasLt, reps)?,
            gemm_ms(gpu, spec, GemmLib::Cublas, reps)?,
        );
        println!(
            "| {name} | {} | {} | {} | {e:.1e} | {} |",
            spec.shape(),
            tf(t_lt),
            tf(t_cb),
            if ok { "yes" } else { "NO" }
        );
    }
    Ok(all)
}

pub fn run(opts: &Options) -> Result<()> {
    if let Err(why) = crate::device::cuda_unavailable() {
        bail!("gpu-check needs a GPU: {why}");
    }
    let probe = crate::gpu::Gpu::new(opts.ordinal)?;
    println!(
        "# olmo-train gpu-check on {} (sm_{}{})\n",
        probe.name, probe.arch.0, probe.arch.1
    );
    drop(probe);
    println!("## 1. CUDA engine vs CPU engine (random inputs)\n");
    let ordinal = opts.ordinal;
    let ok = compare_engines(
        &|m, [p, e, v], bf16| CudaEngine::with_precision(ordinal, m, p, e, v, bf16),
        &[
            variants(256, 1000)[0],
            variants(512, 1000)[1],
            variants(512, 1000)[2],
        ],
        (3, 100),
        &opts.attention,
    )?;

    let gemms_ok = if opts.gemm_reps > 0 {
        println!(
            "\n## 2. OLMo-1B GEMMs (micro-batch {} x 2048, bf16): cuBLASLt vs cuBLAS\n",
            opts.olmo_1b_micro
        );
        let gpu = Gpu::new(ordinal)?;
        if gpu.gemm_library() == Some(GemmLib::CublasLt) {
            let dims = GemmDims {
                rows: opts.olmo_1b_micro * 2048,
                d: 2048,
                h: 8192,
                v: 50304,
            };
            gemm_table(&gpu, dims, opts.gemm_reps)?
        } else {
            println!("(OLMO_TRAIN_GEMM=cublas: no cuBLASLt to compare)");
            true
        }
    } else {
        true
    };

    println!("\n## 3. training a small model (d 512, 8 layers, seq 512, OLMo vocabulary)\n");
    let cfg = ModelConfig {
        d_model: 512,
        n_heads: 8,
        n_kv_heads: 8,
        n_layers: 8,
        mlp_hidden: 2048,
        vocab_size: 50280,
        embedding_size: 50304,
        rope_theta: 10_000.0,
        eps: 1e-5,
        z_loss: 1e-4,
        norm: NormKind::LayerNorm,
        norm_affine: false,
        weight_tying: true,
        clip_qkv: None,
        norm_after: false,
        qk_norm: false,
        qk_norm_affine: false,
    };
    let seq = 512;
    let windows = token_windows(opts.tokens.as_deref(), seq, cfg.vocab_size)?;
    let micro = 16.min(windows.len());
    let mut falls = true;
    for &flash in &opts.attention {
        let (mut gpu, decay, n) = fresh_engine(opts.ordinal, cfg, seq, flash)?;
        let (tps, first, last) =
            time_training(&mut gpu, &windows, micro, 2, opts.train_steps, &decay, 1e-3)?;
        print_flash_choices(&gpu, &cfg);
        let fell = last < first - 1.0;
        falls &= fell;
        println!(
            "{}: {} parameters, {} windows; {} steps of {micro}x{seq}: loss {first:.3} -> {last:.3} ({}), {tps:.0} tokens/s, MFU {:.1}%",
            attention_name(flash),
            n,
            windows.len(),
            opts.train_steps + 2,
            if fell { "falls" } else { "DOES NOT FALL" },
            100.0 * cfg.flops_per_token(seq) * tps / mfu_peak(&gpu).0
        );
    }

    // The same steps twice from the same start give the same bits: no sum depends on the order
    // the GPU runs blocks in (affine norms, to include their weight gradient).
    println!("\n| repeat run (affine norms, 3 steps, twice) | same bits |\n|---|---|");
    let affine = ModelConfig {
        norm_affine: true,
        ..cfg
    };
    let mut repeats = true;
    for &flash in &opts.attention {
        // the flash kernels' two block sizes must give the same bits too
        let blocks: &[FlashBlocks] = if flash {
            &[FlashBlocks::Narrow, FlashBlocks::Narrow, FlashBlocks::Wide]
        } else {
            &[FlashBlocks::Narrow; 2]
        };
        let mut hashes = Vec::new();
        for &b in blocks {
            let (mut gpu, decay, _) = fresh_engine(opts.ordinal, affine, seq, flash)?;
            gpu.set_flash_blocks(b);
            time_training(&mut gpu, &windows, micro, 0, 3, &decay, 1e-3)?;
            hashes.push(state_hash(&mut gpu)?);
        }
        // layers or attentions computed again in the backward pass must give what keeping
        // them gave
        let mut checkpointed = Vec::new();
        for c in [Checkpointing::OneIn(2), Checkpointing::FineGrained] {
            let (mut gpu, decay, _) = fresh_engine(opts.ordinal, affine, seq, flash)?;
            gpu.set_flash_blocks(FlashBlocks::Narrow);
            gpu.set_checkpointing(c);
            time_training(&mut gpu, &windows, micro, 0, 3, &decay, 1e-3)?;
            checkpointed.push((c, state_hash(&mut gpu)?));
        }
        let mut row = |what: String, same: bool| {
            repeats &= same;
            println!("| {what} | {} |", if same { "yes" } else { "NO" });
        };
        row(attention_name(flash).to_string(), hashes[0] == hashes[1]);
        for (c, hash) in checkpointed {
            row(
                format!(
                    "{}: activation checkpointing {} vs none",
                    attention_name(flash),
                    c.name()
                ),
                hashes[0] == hash,
            );
        }
        if flash {
            row(
                format!("{}: wide blocks vs narrow", attention_name(flash)),
                hashes[0] == hashes[2],
            );
        }
    }

    // OLMo-1B's shape; OLMo 2 1B has it too, with its own blocks, vocabulary and head
    let olmo_1b = ModelConfig {
        d_model: 2048,
        n_heads: 16,
        n_kv_heads: 16,
        n_layers: 16,
        mlp_hidden: 8192,
        ..cfg
    };
    if opts.olmo_1b_steps > 0 {
        println!("\n## 4. OLMo-1B, sequence 2048, bf16 GEMMs\n");
        time_large(opts, olmo_1b, opts.olmo_1b_steps, true)?;
    }
    if opts.olmo2_1b_steps > 0 {
        println!("\n## 4b. OLMo 2 1B blocks (norm_after, QK-norm, untied 100,352-row head), sequence 2048, bf16 GEMMs\n");
        let olmo2_1b = ModelConfig {
            vocab_size: 100278,
            embedding_size: 100352,
            norm: NormKind::Rms,
            norm_affine: true,
            weight_tying: false,
            norm_after: true,
            qk_norm: true,
            qk_norm_affine: true,
            eps: 1e-6,
            rope_theta: 500_000.0,
            ..olmo_1b
        };
        time_large(opts, olmo2_1b, opts.olmo2_1b_steps, false)?;
    }
    if !ok || !falls || !gemms_ok || !repeats {
        bail!("gpu-check: some checks failed (see the table)");
    }
    println!("\ngpu-check: all checks passed");
    Ok(())
}

/// The GPU memory pool's peak, and what the memory planner foresaw for the same step (the
/// GPU's also holds cuBLASLt's workspace).
fn measured_and_planned(
    e: &CudaEngine,
    cfg: ModelConfig,
    micro: usize,
    flash: bool,
    checkpointing: Checkpointing,
) -> Result<String> {
    let setup = crate::memory_plan::Setup {
        bf16: true,
        flash,
        moments: 2,
        documents: false,
        checkpointing,
    };
    let planned = crate::memory_plan::training(cfg, 2048, micro, &setup)?.peak;
    Ok(match e.gpu.peak_memory()? {
        Some(b) => format!(
            "{} (memory planner: {}, {:+.1} MiB)",
            gib(b),
            gib(planned),
            (b as f64 - planned as f64) / (1u64 << 20) as f64
        ),
        None => format!("unknown: no memory pool (memory planner: {})", gib(planned)),
    })
}

/// Part 4: a 1B model at sequence 2048 for `steps` steps per attention path: tokens/s, MFU and
/// peak memory, the flash block sizes chosen, and (`profile`) one step timed kernel by kernel.
fn time_large(opts: &Options, cfg: ModelConfig, steps: u64, profile: bool) -> Result<()> {
    let seq = 2048;
    let windows = token_windows(None, seq, cfg.vocab_size)?;
    let micro = opts.olmo_1b_micro;
    for &flash in &opts.attention {
        let (mut gpu, decay, n) = fresh_engine(opts.ordinal, cfg, seq, flash)?;
        gpu.gpu.reset_peak_memory()?;
        let (tps, first, last) = time_training(&mut gpu, &windows, micro, 1, steps, &decay, 4e-4)?;
        let peak = measured_and_planned(&gpu, cfg, micro, flash, Checkpointing::Off)?;
        let flops = cfg.flops_per_token(seq);
        let (bf16_peak, whose) = mfu_peak(&gpu);
        println!(
            "{}: {n} parameters, micro-batch {micro}x{seq}: {tps:.0} tokens/s, {:.2} GFLOPs/token, {:.1} TFLOP/s, MFU {:.1}% of {:.0} TFLOP/s{whose}, peak GPU memory {peak} (loss {first:.3} -> {last:.3})",
            attention_name(flash),
            flops / 1e9,
            flops * tps / 1e12,
            100.0 * flops * tps / bf16_peak,
            bf16_peak / 1e12
        );
        print_flash_choices(&gpu, &cfg);
        if profile {
            profile_step(&mut gpu, &windows, micro, &decay, &cfg)?;
        }
        // the same engine with every layer computed again in the backward pass: the memory
        // that saves and the time it costs
        gpu.set_checkpointing(Checkpointing::WholeLayer);
        gpu.gpu.reset_peak_memory()?;
        let (ckpt_tps, ..) = time_training(&mut gpu, &windows, micro, 1, steps, &decay, 4e-4)?;
        let ckpt_peak = measured_and_planned(&gpu, cfg, micro, flash, Checkpointing::WholeLayer)?;
        println!(
            "{} with activation checkpointing whole_layer: {ckpt_tps:.0} tokens/s ({:.0}% of the above), peak GPU memory {ckpt_peak}",
            attention_name(flash),
            100.0 * ckpt_tps / tps
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The table's comparison on the host emulator, which runs each library by its own
    /// definition from the engine's arguments: the cuBLAS fallback (with its copy of C for
    /// the residual GEMMs) must give what cuBLASLt gives.
    #[test]
    fn gemm_table_agrees_across_libraries_on_the_host_emulator() {
        let dims = GemmDims {
            rows: 24,
            d: 16,
            h: 40,
            v: 56,
        };
        assert_eq!(dims.attention().heads, 2);
        assert!(gemm_table(&Gpu::host_emulator(), dims, 1).unwrap());
    }

    #[test]
    fn profile_rows_know_their_flops() {
        let f = |label| call_flops(label, 2, 4, 3, 8);
        assert_eq!(f("GEMM 16x24x32 bf16"), Some(2.0 * 16.0 * 24.0 * 32.0));
        assert_eq!(f("GEMM 4x4x8 x6 bf16 (cuBLAS)"), Some(2.0 * 128.0 * 6.0));
        // 2 sequences × 3 heads × 10 causal pairs × 2 FLOPs × 8 per product
        assert_eq!(f("flash_fwd_8"), Some(2.0 * 2.0 * 60.0 * 8.0));
        assert_eq!(f("flash_dq_8"), Some(3.0 * 2.0 * 60.0 * 8.0));
        assert_eq!(f("flash_dkdv_8"), Some(4.0 * 2.0 * 60.0 * 8.0));
        assert_eq!(f("flash_dkdv_8_wide"), Some(4.0 * 2.0 * 60.0 * 8.0));
        assert_eq!(f("flash_bwd_pre"), None);
        assert_eq!(f("norm_fwd"), None);
        assert_eq!(f("GEMM bogus"), None);
    }
}
