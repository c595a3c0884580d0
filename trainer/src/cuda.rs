//! The CUDA engine: the same passes as the CPU engine (`model.rs`), with GEMMs in cuBLASLt and
//! the other kernels (`cuda_kernels.cu`) compiled at run time by NVRTC for the present GPU,
//! run on a [`Gpu`] (`gpu.rs`: the buffers, launches and GEMMs, on a GPU, the host emulator
//! or the memory planner).
//!
//! Mixed precision as OLMo's `amp_bf16`: f32 master weights, gradients and AdamW moments; GEMM
//! operands cast to bf16 (weights once per step, activations per use) with f32 accumulation
//! and f32 outputs; norms, softmax, RoPE and the loss in f32. `precision: fp32` keeps every
//! GEMM in f32.
//!
//! The same bits run to run on one GPU: sums that cross blocks (the embedding and norm-weight
//! gradients, the gradient norm) run in a fixed order, without atomics, and gpu-check runs the
//! same steps twice to check it. Against the CPU engine, results agree within bf16 tolerance.

use anyhow::{anyhow, bail, Context, Result};

use crate::backend::{Backend, StateFn, Update};
use crate::gemm_plan::{self, Attn, Buf, GemmSpec};
use crate::gpu::{peak_bf16_flops, vec_width, Arg, GemmLib, Gpu, Mem, BLOCK};
use crate::model::{
    logit_chunk_rows, Batch, Checkpointing, LayerOffsets, Layout, Model, ModelConfig, Scores,
};
use crate::ops::{NormKind, RopeTable, IGNORE};
use crate::optim::Optimizer;

/// An NCCL failure with its result code and NCCL's own words (cudarc's error prints only
/// "NcclError").
fn nccl_error(e: cudarc::nccl::result::NcclError, what: &str) -> anyhow::Error {
    let text = |p: *const std::ffi::c_char| {
        if p.is_null() {
            String::new()
        } else {
            // Safety: NCCL returns NUL-terminated static or thread-local strings.
            unsafe { std::ffi::CStr::from_ptr(p) }
                .to_string_lossy()
                .into_owned()
        }
    };
    // cudarc panics on a symbol the library lacks: ncclGetLastError came in NCCL 2.13.
    // Safety: a lookup in the loaded library; neither call takes a pointer of ours (a null
    // communicator asks for the thread's last error).
    let has = |name: &str| unsafe {
        cudarc::nccl::sys::culib()
            .get::<unsafe extern "C" fn()>(name.as_bytes())
            .is_ok()
    };
    let (general, last) = unsafe {
        (
            text(cudarc::nccl::sys::ncclGetErrorString(e.0)),
            if has("ncclGetLastError") {
                text(cudarc::nccl::sys::ncclGetLastError(std::ptr::null_mut()))
            } else {
                String::new()
            },
        )
    };
    let last = if last.is_empty() {
        String::new()
    } else {
        format!(": {last}")
    };
    anyhow!("CUDA: {what}: {:?} ({general}){last}", e.0)
}

/// Blocks of the gradient norm's sum of squares (one partial sum each).
const SUMSQ_BLOCKS: usize = 4096;
/// Rows per partial sum of an affine norm's weight gradient.
const NORM_DW_ROWS: usize = 256;

/// Head sizes the flash-attention kernels are instantiated for.
pub const FLASH_HEAD_DIMS: [usize; 3] = [32, 64, 128];

/// Warps per block of a flash kernel (`fwd`, `dq` or `dkdv`), each warp 16 query rows (or 16
/// keys in dK/dV), in its narrow or wide build.
pub fn flash_warps(kind: &str, wide: bool) -> usize {
    match (kind, wide) {
        ("dkdv", false) => 2,
        ("dkdv", true) | (_, false) => 4,
        (_, true) => 8,
    }
}

/// The block size the flash kernels run with. Both sizes give the same bits (the kernel test
/// checks), so the choice changes only speed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlashBlocks {
    /// The forward and dQ in blocks of 64 query rows (4 warps), dK/dV of 32 keys (2 warps).
    Narrow,
    /// 128 query rows (8 warps) and 64 keys (4 warps): each K, V (or Q, dO) tile that a block
    /// loads serves twice the rows.
    Wide,
    /// Each kernel times both on its first launch for a shape and keeps the faster (the
    /// default; narrow where nothing can be timed, as on the host emulator).
    Fastest,
}

impl FlashBlocks {
    /// `OLMO_TRAIN_FLASH_BLOCKS`: narrow, wide or fastest (the default).
    pub fn from_env() -> Result<FlashBlocks> {
        match std::env::var("OLMO_TRAIN_FLASH_BLOCKS").as_deref() {
            Err(_) | Ok("fastest") => Ok(FlashBlocks::Fastest),
            Ok("narrow") => Ok(FlashBlocks::Narrow),
            Ok("wide") => Ok(FlashBlocks::Wide),
            Ok(other) => bail!(
                "OLMO_TRAIN_FLASH_BLOCKS={other}: expected fastest (the default), narrow or wide"
            ),
        }
    }
}

/// A flash kernel's block size chosen by timing: kind, batch, sequence, whether wide, and the
/// milliseconds each size took (narrow, wide).
#[derive(Clone, Debug)]
pub struct FlashChoice {
    pub kind: &'static str,
    pub b: usize,
    pub t: usize,
    pub wide: bool,
    pub ms: [f64; 2],
}

impl FlashChoice {
    /// One line for the log: the size chosen, and both sizes' times and TFLOP/s for a model of
    /// `heads` heads of `hd`.
    pub fn line(&self, heads: usize, hd: usize) -> String {
        let flops = flash_flops(self.kind, self.b, self.t, heads, hd).unwrap_or(0.0);
        let tf = |ms: f64| flops / (ms * 1e-3) / 1e12;
        format!(
            "flash_{} ({}x{}): {} blocks ({:.3} ms; narrow {:.3} ms, {:.0} TFLOP/s; wide {:.3} ms, {:.0} TFLOP/s)",
            self.kind,
            self.b,
            self.t,
            if self.wide { "wide" } else { "narrow" },
            self.ms[self.wide as usize],
            self.ms[0],
            tf(self.ms[0]),
            self.ms[1],
            tf(self.ms[1])
        )
    }
}

/// Model FLOPs of one launch of the flash kernel `kind` (`fwd`, `dq`, `dkdv`) over `b`
/// sequences of `t` positions with `heads` heads of `hd`. They count the causal half only (as
/// FlashAttention reports), and recompute: 2 products for the forward, 3 for dQ, 4 for dK, dV.
pub fn flash_flops(kind: &str, b: usize, t: usize, heads: usize, hd: usize) -> Option<f64> {
    let products = match kind {
        "fwd" => 2.0,
        "dq" => 3.0,
        "dkdv" => 4.0,
        _ => return None,
    };
    let pairs = (b * heads) as f64 * (t * (t + 1) / 2) as f64;
    Some(products * 2.0 * pairs * hd as f64)
}

/// An activation prepared as a GEMM operand: the f32 buffer itself, or its bf16 copy.
struct Prepared {
    buf: Buf,
    _copy: Option<Act>,
}

/// An activation: f32, or (under mixed precision) bf16 only where it is never more than a
/// GEMM operand. Such kernels write the bf16 copy themselves: the same bits as a cast of
/// the f32 result, without writing, reading and casting the f32 buffer again.
enum Act {
    F32(Mem<f32>),
    Bf16(Mem<u16>),
}

/// A borrowed activation, as a GEMM's input.
#[derive(Clone, Copy)]
enum Src<'a> {
    F32(&'a Mem<f32>),
    Bf16(&'a Mem<u16>),
}

impl Act {
    fn src(&self) -> Src<'_> {
        match self {
            Act::F32(m) => Src::F32(m),
            Act::Bf16(m) => Src::Bf16(m),
        }
    }
}

impl<'a> From<&'a Mem<f32>> for Src<'a> {
    fn from(m: &'a Mem<f32>) -> Src<'a> {
        Src::F32(m)
    }
}

/// What the attention keeps for its backward pass: the probabilities, f32 or (under mixed
/// precision) bf16 only, as they are a GEMM operand both ways and bf16 halves the largest
/// activation and its traffic; or, with flash attention, only each row's log-sum-exp.
enum Probs {
    F32(Mem<f32>),
    Bf16(Mem<u16>),
    Lse(Mem<f32>),
}

impl Probs {
    fn buf(&self, gpu: &Gpu) -> Buf {
        match self {
            Probs::F32(m) | Probs::Lse(m) => Buf::f32(gpu.ptr(m, 0)),
            Probs::Bf16(m) => Buf {
                ptr: gpu.ptr(m, 0),
                bf16: true,
            },
        }
    }
}

/// Device activations of one layer, for its backward pass.
struct Acts {
    /// Pre-norm blocks: attn_norm's output (att_proj's input) and its statistics.
    ln1: Option<(Act, Stats)>,
    qkv: Act,
    /// The entries `clip_qkv` clipped, one bit each.
    clipped: Option<Mem<u32>>,
    /// QK-norm's inputs (q, k before their norms, in the projection's type) and statistics.
    qk: Option<[(Act, Stats); 2]>,
    /// None under `fine_grained` checkpointing, which computes it again from `qkv`.
    attention: Option<Attention>,
    /// `norm_after` blocks: attn_out's output (attn_norm's input) and its statistics.
    attn_post: Option<(Mem<f32>, Stats)>,
    x_mid: Mem<f32>,
    ln2: Option<(Act, Stats)>,
    ff_in: Act,
    ff_act: Act,
    ff_post: Option<(Mem<f32>, Stats)>,
}

/// The attention's output (attn_out's input) and what its backward pass keeps of it.
struct Attention {
    att: Act,
    probs: Probs,
}

/// What the backward pass has of a layer: its input, and its activations unless activation
/// checkpointing computes them again.
struct Kept {
    x_in: Mem<f32>,
    acts: Option<Acts>,
}

/// A norm's per-row mean and reciprocal deviation, for its backward pass.
struct Stats {
    mean: Mem<f32>,
    rstd: Mem<f32>,
}

pub struct CudaEngine {
    pub gpu: Gpu,
    cfg: ModelConfig,
    layout: Layout,
    /// The layers whose activations the backward pass computes again.
    checkpointing: Checkpointing,
    /// Rows of logits at a time, in place of [`head_chunk_rows`] (for tests).
    head_rows: Option<usize>,
    bf16: bool,
    /// Attention by the flash kernels (bf16 only) instead of GEMMs over materialised T×T
    /// scores and probabilities.
    flash: bool,
    params: Mem<f32>,
    /// The bf16 copy of the weights, under mixed precision only.
    params_bf: Option<Mem<u16>>,
    grads: Mem<f32>,
    /// The optimizer's first moment; none for an engine that only evaluates (given an empty
    /// slice).
    exp_avg: Option<Mem<f32>>,
    /// AdamW's second moment; none for LionW (given an empty slice), which keeps one moment.
    exp_avg_sq: Option<Mem<f32>>,
    cos: Mem<f32>,
    sin: Mem<f32>,
    max_seq: usize,
    /// Reused scalar for the gradient norm.
    norm_acc: Mem<f64>,
    /// NCCL communicator across ranks, when data parallel and libnccl is present.
    nccl: Option<cudarc::nccl::Comm>,
    /// The flash kernels' block size, and what timing chose where it is `Fastest`.
    flash_blocks: FlashBlocks,
    flash_choices: std::sync::Mutex<Vec<FlashChoice>>,
    /// How many of `flash_choices` `tuning_notes` has returned.
    flash_noted: usize,
}

impl CudaEngine {
    pub fn new(
        ordinal: usize,
        model: Model,
        params: &[f32],
        exp_avg: &[f32],
        exp_avg_sq: &[f32],
    ) -> Result<CudaEngine> {
        Self::with_precision(ordinal, model, params, exp_avg, exp_avg_sq, true)
    }

    pub fn with_precision(
        ordinal: usize,
        model: Model,
        params: &[f32],
        exp_avg: &[f32],
        exp_avg_sq: &[f32],
        bf16: bool,
    ) -> Result<CudaEngine> {
        let gpu = Gpu::new(ordinal)?;
        Self::on(gpu, model, [params, exp_avg, exp_avg_sq], bf16)
    }

    /// The engine on a given device (a GPU, or the host emulator for tests).
    pub fn on(gpu: Gpu, model: Model, state: [&[f32]; 3], bf16: bool) -> Result<CudaEngine> {
        if bf16 && gpu.on_device() && gpu.arch < (8, 0) {
            bail!(
                "bf16 mixed precision (precision: amp_bf16, the default) needs an Ampere or newer GPU (compute capability 8.0+): {} is sm_{}{}; set precision: fp32 to train on it",
                gpu.name,
                gpu.arch.0,
                gpu.arch.1
            );
        }
        let [params, exp_avg, exp_avg_sq] = state;
        // an optimizer moment the engine does not need comes as an empty slice
        let upload_unless_empty = |v: &[f32]| match v.is_empty() {
            true => Ok(None),
            false => gpu.upload(v).map(Some),
        };
        let params = gpu.upload(params)?;
        let moments = [
            upload_unless_empty(exp_avg)?,
            upload_unless_empty(exp_avg_sq)?,
        ];
        Self::assemble(gpu, model, params, moments, bf16)
    }

    /// The engine on a [`Gpu::memory_planner`]: its state as sizes (`moments` optimizer
    /// moments: 2 for AdamW, 1 for LionW, 0 to evaluate), to see what its steps would take of
    /// a GPU's memory.
    pub fn planned(model: Model, moments: usize, bf16: bool) -> Result<CudaEngine> {
        let gpu = Gpu::memory_planner();
        let n = model.layout.total;
        let moment = |k: usize| (moments > k).then(|| gpu.zeros::<f32>(n)).transpose();
        let params = gpu.zeros(n)?;
        let moments = [moment(0)?, moment(1)?];
        Self::assemble(gpu, model, params, moments, bf16)
    }

    /// The engine from its state on the device: parameters and the optimizer's moments.
    fn assemble(
        gpu: Gpu,
        model: Model,
        params: Mem<f32>,
        [exp_avg, exp_avg_sq]: [Option<Mem<f32>>; 2],
        bf16: bool,
    ) -> Result<CudaEngine> {
        let cfg = model.cfg;
        let max_seq = model.max_seq();
        let table = RopeTable::new(max_seq, cfg.head_dim(), cfg.rope_theta);
        let n = model.layout.total;
        if params.len() != n {
            bail!("{} parameters for a model of {n}", params.len());
        }
        let e = CudaEngine {
            params,
            params_bf: bf16.then(|| gpu.zeros(n)).transpose()?,
            grads: gpu.zeros(n)?,
            exp_avg,
            exp_avg_sq,
            cos: gpu.upload(&table.cos)?,
            sin: gpu.upload(&table.sin)?,
            norm_acc: gpu.zeros(SUMSQ_BLOCKS)?,
            nccl: None,
            checkpointing: model.checkpointing,
            head_rows: None,
            layout: model.layout.clone(),
            cfg,
            bf16,
            flash: false,
            flash_blocks: FlashBlocks::from_env()?,
            flash_choices: Default::default(),
            flash_noted: 0,
            max_seq,
            gpu,
        };
        e.refresh_bf16()?;
        Ok(e)
    }

    /// Switches attention to the flash kernels (or back). They need bf16 mixed precision and
    /// a head size they are instantiated for; otherwise this says why and changes nothing.
    pub fn set_flash_attention(&mut self, on: bool) -> Result<()> {
        if on {
            let hd = self.cfg.head_dim();
            if !self.bf16 {
                bail!("flash attention runs in bf16 mixed precision only (precision is fp32)");
            }
            if !FLASH_HEAD_DIMS.contains(&hd) {
                bail!("flash attention is built for head sizes {FLASH_HEAD_DIMS:?}, not {hd}");
            }
        }
        self.flash = on;
        Ok(())
    }

    pub fn vocab_size(&self) -> usize {
        self.cfg.vocab_size
    }

    /// Sets which layers the backward pass computes again (the model's at construction).
    pub fn set_checkpointing(&mut self, checkpointing: Checkpointing) {
        self.checkpointing = checkpointing;
    }

    /// Computes the logits `rows` rows at a time (`None`: as [`head_chunk_rows`] says).
    pub fn set_head_rows(&mut self, rows: Option<usize>) {
        self.head_rows = rows;
    }

    /// Sets the flash kernels' block size (`OLMO_TRAIN_FLASH_BLOCKS` otherwise); the bits do
    /// not depend on it.
    pub fn set_flash_blocks(&mut self, blocks: FlashBlocks) {
        self.flash_blocks = blocks;
    }

    /// The flash kernels' block sizes chosen by timing so far.
    pub fn flash_choices(&self) -> Vec<FlashChoice> {
        self.flash_choices
            .lock()
            .map(|c| c.clone())
            .unwrap_or_default()
    }

    /// Launches the flash kernel `kind` (`fwd`, `dq`, `dkdv`) over b sequences of t positions
    /// in the block size that `flash_blocks` says; under `Fastest`, the first launch for a
    /// shape times both and the choice is kept. Both write the same outputs, so running one
    /// twice is harmless.
    fn flash_launch(&self, kind: &'static str, b: usize, t: usize, args: &[Arg]) -> Result<()> {
        let (hh, hd, _) = self.attn_shape();
        // dK/dV's blocks are a kv head's keys (each summing its q heads' gradients)
        let heads = match kind {
            "dkdv" => self.cfg.n_kv_heads,
            _ => hh,
        };
        let shape = |wide: bool| {
            let warps = flash_warps(kind, wide);
            let name = format!("flash_{kind}_{hd}{}", if wide { "_wide" } else { "" });
            (
                name,
                (b * heads * t.div_ceil(16 * warps)) as u32,
                32 * warps as u32,
            )
        };
        let wide = match self.flash_blocks {
            FlashBlocks::Narrow => false,
            FlashBlocks::Wide => true,
            FlashBlocks::Fastest => {
                self.wide_is_faster(kind, b, t, [shape(false), shape(true)], args)?
            }
        };
        let (name, grid, block) = shape(wide);
        self.gpu.launch(&name, grid, block, args)
    }

    /// Whether the wide build of a flash kernel is the faster for this shape: timed once
    /// (launches: narrow, wide), then remembered; false where nothing can be timed.
    fn wide_is_faster(
        &self,
        kind: &'static str,
        b: usize,
        t: usize,
        launches: [(String, u32, u32); 2],
        args: &[Arg],
    ) -> Result<bool> {
        let mut chosen = self
            .flash_choices
            .lock()
            .map_err(|_| anyhow!("flash choices lock"))?;
        if let Some(c) = chosen.iter().find(|c| (c.kind, c.b, c.t) == (kind, b, t)) {
            return Ok(c.wide);
        }
        let Some(ms) = self.gpu.time_launches(&launches, args, 3)? else {
            return Ok(false);
        };
        let wide = ms[1] < ms[0];
        chosen.push(FlashChoice {
            kind,
            b,
            t,
            wide,
            ms: [ms[0], ms[1]],
        });
        Ok(wide)
    }

    /// Recasts the bf16 weight copy from the f32 master weights.
    fn refresh_bf16(&self) -> Result<()> {
        if let Some(bf) = &self.params_bf {
            let n = self.layout.total;
            let (x, y) = (self.gpu.ptr(&self.params, 0), self.gpu.ptr(bf, 0));
            self.gpu.launch_n(
                "cast_bf16",
                n / vec_width(true, &[n], &[x, y]),
                &[Arg::P(x), Arg::P(y), Arg::L(n as i64)],
            )?;
        }
        Ok(())
    }

    /// The weights starting at `offset` as a GEMM operand buffer (the bf16 copy under mixed
    /// precision).
    fn weight(&self, offset: usize) -> Buf {
        match &self.params_bf {
            Some(bf) => Buf {
                ptr: self.gpu.ptr(bf, offset),
                bf16: true,
            },
            None => Buf::f32(self.gpu.ptr(&self.params, offset)),
        }
    }

    /// An activation as a GEMM operand (cast to bf16 under mixed precision).
    fn prepare(&self, s: &Mem<f32>) -> Result<Prepared> {
        if !self.bf16 {
            return Ok(Prepared {
                buf: Buf::f32(self.gpu.ptr(s, 0)),
                _copy: None,
            });
        }
        let copy: Mem<u16> = self.gpu.scratch(s.len())?;
        let (n, x, y) = (s.len(), self.gpu.ptr(s, 0), self.gpu.ptr(&copy, 0));
        self.gpu.launch_n(
            "cast_bf16",
            n / vec_width(true, &[n], &[x, y]),
            &[Arg::P(x), Arg::P(y), Arg::L(n as i64)],
        )?;
        Ok(Prepared {
            buf: Buf {
                ptr: self.gpu.ptr(&copy, 0),
                bf16: true,
            },
            _copy: Some(Act::Bf16(copy)),
        })
    }

    fn p(&self, s: &Mem<f32>) -> Arg {
        Arg::P(self.gpu.ptr(s, 0))
    }

    /// An activation as a GEMM operand: bf16 ones as they are, f32 ones `prepare`d.
    fn operand(&self, x: Src) -> Result<Prepared> {
        match x {
            Src::F32(m) => self.prepare(m),
            Src::Bf16(m) => Ok(Prepared {
                buf: Buf {
                    ptr: self.gpu.ptr(m, 0),
                    bf16: true,
                },
                _copy: None,
            }),
        }
    }

    /// A buffer of `n` elements for a result that is only a GEMM operand: bf16 under mixed
    /// precision, else f32.
    fn operand_out(&self, n: usize) -> Result<Act> {
        Ok(if self.bf16 {
            Act::Bf16(self.gpu.scratch(n)?)
        } else {
            Act::F32(self.gpu.scratch(n)?)
        })
    }

    /// A GEMM's fresh output: `operand_out` when it is only an operand, else f32.
    fn gemm_out(&self, n: usize, to_operand: bool) -> Result<Act> {
        if to_operand {
            self.operand_out(n)
        } else {
            Ok(Act::F32(self.gpu.scratch(n)?))
        }
    }

    /// The (f32, bf16) output pointer pair of kernels that write either; the other is null.
    fn out_args(&self, a: &Act) -> [Arg; 2] {
        match a {
            Act::F32(m) => [Arg::P(self.gpu.ptr(m, 0)), Arg::P(0)],
            Act::Bf16(m) => [Arg::P(0), Arg::P(self.gpu.ptr(m, 0))],
        }
    }

    /// A buffer's address as a GEMM output of its type.
    fn out_buf(&self, a: &Act) -> Buf {
        match a {
            Act::F32(m) => Buf::f32(self.gpu.ptr(m, 0)),
            Act::Bf16(m) => Buf {
                ptr: self.gpu.ptr(m, 0),
                bf16: true,
            },
        }
    }

    /// `y = x Wᵀ` for rows of x; W at `w` is `[outp, inp]`. `to_operand`: y is only a GEMM
    /// operand (or the input of a kernel that makes one), so under mixed precision the GEMM
    /// writes it in bf16, as autocast does; otherwise f32.
    fn linear(
        &self,
        x: Src,
        w: usize,
        (rows, inp, outp): (usize, usize, usize),
        to_operand: bool,
    ) -> Result<Act> {
        let y = self.gemm_out(rows * outp, to_operand)?;
        let xp = self.operand(x)?;
        self.gpu.gemm(&gemm_plan::linear_fwd(
            xp.buf,
            self.weight(w),
            self.out_buf(&y),
            rows,
            inp,
            outp,
        ))?;
        Ok(y)
    }

    /// `r + x Wᵀ` into a fresh f32 buffer, the residual added by the GEMM (C ≠ D) rather than
    /// by a kernel reading both tensors again.
    fn linear_residual(
        &self,
        x: Src,
        w: usize,
        (rows, inp, outp): (usize, usize, usize),
        r: &Mem<f32>,
    ) -> Result<Mem<f32>> {
        let y = self.gpu.scratch::<f32>(rows * outp)?;
        let xp = self.operand(x)?;
        self.gpu.gemm(&gemm_plan::linear_fwd_residual(
            xp.buf,
            self.weight(w),
            self.gpu.ptr(r, 0),
            self.gpu.ptr(&y, 0),
            rows,
            inp,
            outp,
        ))?;
        Ok(y)
    }

    /// `linear` into f32.
    fn linear_f32(&self, x: Src, w: usize, shape: (usize, usize, usize)) -> Result<Mem<f32>> {
        match self.linear(x, w, shape, false)? {
            Act::F32(m) => Ok(m),
            Act::Bf16(_) => unreachable!("an f32 GEMM output"),
        }
    }

    /// dx = dy W (fresh buffer; bf16 under mixed precision with `to_operand`), dW += dyᵀ x.
    fn linear_back(
        &self,
        dy: Src,
        x: Src,
        w: usize,
        (rows, inp, outp): (usize, usize, usize),
        to_operand: bool,
    ) -> Result<Act> {
        let dx = self.gemm_out(rows * inp, to_operand)?;
        self.linear_back_to(dy, x, w, (rows, inp, outp), self.out_buf(&dx), 0.0)?;
        Ok(dx)
    }

    /// `linear_back` adding dx into the f32 `acc` (the residual stream's gradient) in the
    /// GEMM itself.
    fn linear_back_add(
        &self,
        dy: Src,
        x: Src,
        w: usize,
        shape: (usize, usize, usize),
        acc: &Mem<f32>,
    ) -> Result<()> {
        let acc = Buf::f32(self.gpu.ptr(acc, 0));
        self.linear_back_to(dy, x, w, shape, acc, 1.0)
    }

    /// dx = dy W + beta·dx, dW += dyᵀ x.
    fn linear_back_to(
        &self,
        dy: Src,
        x: Src,
        w: usize,
        (rows, inp, outp): (usize, usize, usize),
        dx: Buf,
        beta: f32,
    ) -> Result<()> {
        let dyp = self.operand(dy)?;
        self.gpu.gemm(&GemmSpec {
            beta,
            ..gemm_plan::linear_dx(dyp.buf, self.weight(w), dx, rows, inp, outp)
        })?;
        let xp = self.operand(x)?;
        self.gpu.gemm(&gemm_plan::linear_dw(
            dyp.buf,
            xp.buf,
            self.gpu.ptr(&self.grads, w),
            rows,
            inp,
            outp,
        ))
    }

    /// `linear_back` with dx in f32.
    fn linear_back_f32(
        &self,
        dy: Src,
        x: Src,
        w: usize,
        shape: (usize, usize, usize),
    ) -> Result<Mem<f32>> {
        match self.linear_back(dy, x, w, shape, false)? {
            Act::F32(m) => Ok(m),
            Act::Bf16(_) => unreachable!("an f32 GEMM output"),
        }
    }

    fn stats(&self, rows: usize) -> Result<Stats> {
        Ok(Stats {
            mean: self.gpu.scratch(rows)?,
            rstd: self.gpu.scratch(rows)?,
        })
    }

    fn norm_weight(&self, w: Option<usize>) -> Arg {
        Arg::P(w.map_or(0, |o| self.gpu.ptr(&self.params, o)))
    }

    fn norm_rms(&self) -> Arg {
        Arg::I((self.cfg.norm == NormKind::Rms) as i32)
    }

    /// The normalised rows, only ever a GEMM operand (bf16 under mixed precision), with the
    /// rows' means and reciprocal deviations for the backward pass.
    fn norm(&self, x: &Mem<f32>, w: Option<usize>, rows: usize) -> Result<(Act, Stats)> {
        self.norm_of(x, w, (rows, self.cfg.d_model))
    }

    /// `norm` of rows `d` wide (QK-norm's k is `kvd` wide).
    fn norm_of(
        &self,
        x: &Mem<f32>,
        w: Option<usize>,
        (rows, d): (usize, usize),
    ) -> Result<(Act, Stats)> {
        let y = self.operand_out(rows * d)?;
        let st = self.norm_launch("norm_fwd", x, w, self.out_args(&y), (rows, d))?;
        Ok((y, st))
    }

    /// `res + norm(x)` into a fresh f32 buffer: a `norm_after` branch joining the residual.
    fn norm_add(
        &self,
        x: &Mem<f32>,
        w: Option<usize>,
        res: &Mem<f32>,
        rows: usize,
    ) -> Result<(Mem<f32>, Stats)> {
        let y = self.gpu.scratch::<f32>(rows * self.cfg.d_model)?;
        let shape = (rows, self.cfg.d_model);
        let st = self.norm_launch("norm_add_fwd", x, w, [self.p(res), self.p(&y)], shape)?;
        Ok((y, st))
    }

    /// Launches `norm_fwd` (`[a, b]`: its f32 and bf16 outputs) or `norm_add_fwd` (the
    /// residual and the output); returns the rows' statistics.
    fn norm_launch(
        &self,
        name: &str,
        x: &Mem<f32>,
        w: Option<usize>,
        [a, b]: [Arg; 2],
        (rows, d): (usize, usize),
    ) -> Result<Stats> {
        let st = self.stats(rows)?;
        self.gpu.launch(
            name,
            rows as u32,
            BLOCK,
            &[
                self.p(x),
                self.norm_weight(w),
                a,
                b,
                self.p(&st.mean),
                self.p(&st.rstd),
                Arg::I(d as i32),
                Arg::F(self.cfg.eps),
                self.norm_rms(),
            ],
        )?;
        Ok(st)
    }

    /// Adds the norm's dL/dx into `dx` (and dL/dw into the gradients) given dL/dy.
    fn norm_back(
        &self,
        dy: &Mem<f32>,
        (x, st): (&Mem<f32>, &Stats),
        w: Option<usize>,
        (rows, d): (usize, usize),
        dx: &Mem<f32>,
    ) -> Result<()> {
        self.gpu.launch(
            "norm_bwd",
            rows as u32,
            BLOCK,
            &[
                self.p(dy),
                self.p(x),
                self.p(&st.mean),
                self.p(&st.rstd),
                self.norm_weight(w),
                self.p(dx),
                Arg::I(d as i32),
                self.norm_rms(),
            ],
        )?;
        let Some(w) = w else { return Ok(()) };
        // dL/dw: partial sums over chunks of rows, then their sum in chunk order
        let chunks = rows.div_ceil(NORM_DW_ROWS);
        let partial = self.gpu.scratch::<f32>(chunks * d)?;
        self.gpu.launch(
            "norm_dw_partial",
            (d.div_ceil(32) * chunks) as u32,
            BLOCK,
            &[
                self.p(dy),
                self.p(x),
                self.p(&st.mean),
                self.p(&st.rstd),
                self.p(&partial),
                Arg::L(rows as i64),
                Arg::I(d as i32),
                Arg::I(NORM_DW_ROWS as i32),
            ],
        )?;
        self.gpu.launch(
            "norm_dw_sum",
            d.div_ceil(BLOCK as usize) as u32,
            BLOCK,
            &[
                self.p(&partial),
                Arg::P(self.gpu.ptr(&self.grads, w)),
                Arg::I(chunks as i32),
                Arg::I(d as i32),
            ],
        )
    }

    /// A pre-norm block's norm of a branch input, with its statistics; none under `norm_after`,
    /// where the branch reads the residual stream as it is.
    fn pre_norm(
        &self,
        x: &Mem<f32>,
        w: Option<usize>,
        rows: usize,
    ) -> Result<Option<(Act, Stats)>> {
        (!self.cfg.norm_after)
            .then(|| self.norm(x, w, rows))
            .transpose()
    }

    /// A branch's output projection `proj(h)` (its offset and GEMM shape) joining the residual
    /// stream `r`: `r + proj(h)`, the residual added by the GEMM, or under `norm_after`
    /// `r + norm(proj(h))`, keeping `proj(h)` and the norm's statistics.
    #[allow(clippy::type_complexity)]
    fn join(
        &self,
        h: Src,
        (proj, shape): (usize, (usize, usize, usize)),
        norm: Option<usize>,
        r: &Mem<f32>,
    ) -> Result<(Mem<f32>, Option<(Mem<f32>, Stats)>)> {
        if !self.cfg.norm_after {
            return Ok((self.linear_residual(h, proj, shape, r)?, None));
        }
        let out = self.linear_f32(h, proj, shape)?;
        let (joined, st) = self.norm_add(&out, norm, r, shape.0)?;
        Ok((joined, Some((out, st))))
    }

    /// dL/d(branch output) given dL/d(joined) `dy`, when `norm_after` put a norm between them
    /// (`post`: the branch output and the norm's statistics); else the branch's gradient is
    /// `dy` itself.
    fn post_norm_back(
        &self,
        dy: &Mem<f32>,
        post: &Option<(Mem<f32>, Stats)>,
        w: Option<usize>,
        rows: usize,
    ) -> Result<Option<Mem<f32>>> {
        let Some((out, st)) = post else {
            return Ok(None);
        };
        let d = self.cfg.d_model;
        let dout = self.gpu.zeros::<f32>(rows * d)?;
        self.norm_back(dy, (out, st), w, (rows, d), &dout)?;
        Ok(Some(dout))
    }

    /// The backward of a branch's input projection `proj(h)` (its offset and GEMM shape),
    /// adding dL/dx into `dx`: `h` is `norm(x)` in pre-norm blocks (`pre`: that output and
    /// statistics), or `x` itself under `norm_after`, whose gradient the GEMM then adds.
    fn input_back(
        &self,
        dy: Src,
        (x, pre): (&Mem<f32>, &Option<(Act, Stats)>),
        (proj, shape): (usize, (usize, usize, usize)),
        norm: Option<usize>,
        dx: &Mem<f32>,
    ) -> Result<()> {
        match pre {
            Some((h, st)) => {
                let dh = self.linear_back_f32(dy, h.src(), proj, shape)?;
                self.norm_back(&dh, (x, st), norm, (shape.0, shape.1), dx)
            }
            None => self.linear_back_add(dy, x.into(), proj, shape, dx),
        }
    }

    /// An activation's address `offset` elements in, and whether it is bf16.
    fn act_at(&self, a: &Act, offset: usize) -> (u64, bool) {
        match a {
            Act::F32(m) => (self.gpu.ptr(m, offset), false),
            Act::Bf16(m) => (self.gpu.ptr(m, offset), true),
        }
    }

    /// `cols` columns of `rows` rows from `src` (leading dimension `lds`) to `dst` (`ldd`).
    fn cols_copy(
        &self,
        (src, src_bf16): (u64, bool),
        lds: usize,
        (dst, dst_bf16): (u64, bool),
        ldd: usize,
        (rows, cols): (usize, usize),
    ) -> Result<()> {
        self.gpu.launch_n(
            "cols_copy",
            rows * cols,
            &[
                Arg::P(src),
                Arg::I(src_bf16 as i32),
                Arg::L(lds as i64),
                Arg::P(dst),
                Arg::I(dst_bf16 as i32),
                Arg::L(ldd as i64),
                Arg::L(rows as i64),
                Arg::I(cols as i32),
            ],
        )
    }

    /// QK-norm in place on the q and k columns of the fused qkv rows (in their type), through
    /// the row-norm kernels: q and k are copied out in f32, normalised, and copied back. Returns
    /// those inputs and their statistics for the backward pass, kept in the projection's type:
    /// under mixed precision q and k are bf16 already, so a bf16 copy keeps every bit at half
    /// an f32 copy's memory (OLMo 2 7B at 4 × 4096 positions: 8.6 GB instead of 17).
    fn qk_norm(&self, qkv: &Act, o: &LayerOffsets, n: usize) -> Result<[(Act, Stats); 2]> {
        let stride = self.cfg.qkv_width();
        let [q, k] = self.q_and_k();
        let mut saved = Vec::with_capacity(2);
        for ((from, d), w) in [(q, o.q_norm), (k, o.k_norm)] {
            let raw = self.gpu.scratch::<f32>(n * d)?;
            let raw_at = (self.gpu.ptr(&raw, 0), false);
            self.cols_copy(self.act_at(qkv, from), stride, raw_at, d, (n, d))?;
            let (y, st) = self.norm_of(&raw, w, (n, d))?;
            self.cols_copy(
                self.act_at(&y, 0),
                d,
                self.act_at(qkv, from),
                stride,
                (n, d),
            )?;
            let kept = match qkv {
                Act::F32(_) => Act::F32(raw),
                Act::Bf16(_) => {
                    let kept = self.gpu.scratch::<u16>(n * d)?;
                    let at = (self.gpu.ptr(&kept, 0), true);
                    self.cols_copy(raw_at, d, at, d, (n, d))?;
                    Act::Bf16(kept)
                }
            };
            saved.push((kept, st));
        }
        Ok(saved.try_into().unwrap_or_else(|_| unreachable!("q and k")))
    }

    /// QK-norm's backward in place on the q and k columns of the qkv gradient.
    fn qk_norm_back(
        &self,
        dqkv: &Act,
        saved: &[(Act, Stats); 2],
        o: &LayerOffsets,
        n: usize,
    ) -> Result<()> {
        let stride = self.cfg.qkv_width();
        let [q, k] = self.q_and_k();
        for (((from, d), w), (kept, st)) in [(q, o.q_norm), (k, o.k_norm)].into_iter().zip(saved) {
            // the norm kernels read f32: a bf16 input widens (exactly) for this layer only
            let widened;
            let raw = match kept {
                Act::F32(m) => m,
                Act::Bf16(_) => {
                    widened = self.gpu.scratch::<f32>(n * d)?;
                    let at = (self.gpu.ptr(&widened, 0), false);
                    self.cols_copy(self.act_at(kept, 0), d, at, d, (n, d))?;
                    &widened
                }
            };
            let dy = self.gpu.scratch::<f32>(n * d)?;
            let dy_at = (self.gpu.ptr(&dy, 0), false);
            self.cols_copy(self.act_at(dqkv, from), stride, dy_at, d, (n, d))?;
            let dx = self.gpu.zeros::<f32>(n * d)?;
            self.norm_back(&dy, (raw, st), w, (n, d), &dx)?;
            let dx_at = (self.gpu.ptr(&dx, 0), false);
            self.cols_copy(dx_at, d, self.act_at(dqkv, from), stride, (n, d))?;
        }
        Ok(())
    }

    /// RoPE on q and k of fused qkv rows, or (`inverse`) its transpose on their gradients; in
    /// place, on bf16 rows under mixed precision (the qkv projection and its gradient are bf16
    /// there), else on f32 rows.
    fn rope(&self, qkv: &Act, rows: usize, t: usize, inverse: bool) -> Result<()> {
        let c = &self.cfg;
        let (half, heads) = (c.head_dim() / 2, c.n_heads + c.n_kv_heads);
        let name = match qkv {
            Act::F32(_) => "rope",
            Act::Bf16(_) => "rope_bf16",
        };
        let x = self.out_buf(qkv);
        let v = vec_width(x.bf16, &[half, c.qkv_width()], &[x.ptr]);
        self.gpu.launch_n(
            name,
            rows * heads * half / v,
            &[
                Arg::P(x.ptr),
                self.p(&self.cos),
                self.p(&self.sin),
                Arg::L(rows as i64),
                Arg::I(t as i32),
                Arg::I(heads as i32),
                Arg::I(half as i32),
                Arg::I(c.qkv_width() as i32),
                Arg::I(inverse as i32),
            ],
        )
    }

    /// The q and k column blocks of fused qkv rows: (first column, width).
    fn q_and_k(&self) -> [(usize, usize); 2] {
        [(0, self.cfg.d_model), (self.cfg.d_model, self.cfg.kv_dim())]
    }

    /// Whether the attention reads a copy of q|k|v with each kv head repeated for its q heads
    /// (and writes its gradient so): grouped-query attention over materialised scores, whose
    /// batched GEMMs take one k and v head per q head. The flash kernels read kv heads in place.
    fn repeats_kv(&self) -> bool {
        self.cfg.n_kv_heads != self.cfg.n_heads && !self.flash
    }

    /// The attention's q|k|v rows as an operand: the fused projection itself, or where
    /// `repeats_kv` an `[n, 3d]` copy with each kv head repeated for its q heads (made again for
    /// the backward pass rather than kept).
    fn heads(&self, qkv: &Act, n: usize) -> Result<Prepared> {
        let c = &self.cfg;
        if !self.repeats_kv() {
            return self.operand(qkv.src());
        }
        let out = self.operand_out(n * 3 * c.d_model)?;
        self.kv_layout("kv_repeat", qkv, &out, n)?;
        Ok(Prepared {
            buf: self.out_buf(&out),
            _copy: Some(out),
        })
    }

    /// `kv_repeat` from fused q|k|v rows to the attention's, or `kv_sum` back, between
    /// buffers of either type.
    fn kv_layout(&self, name: &str, from: &Act, to: &Act, n: usize) -> Result<()> {
        let c = &self.cfg;
        let (src, src_bf16) = self.act_at(from, 0);
        let (dst, dst_bf16) = self.act_at(to, 0);
        let width = match name {
            "kv_repeat" => 3 * c.d_model,
            _ => c.qkv_width(),
        };
        self.gpu.launch_n(
            name,
            n * width,
            &[
                Arg::P(src),
                Arg::I(src_bf16 as i32),
                Arg::P(dst),
                Arg::I(dst_bf16 as i32),
                Arg::L(n as i64),
                Arg::I(c.n_heads as i32),
                Arg::I(c.n_kv_heads as i32),
                Arg::I(c.head_dim() as i32),
            ],
        )
    }

    /// OLMo's `clip_qkv` in place on the fused projection, in its type; returns the entries it
    /// clipped, one bit each, for the backward pass.
    fn clip_qkv(&self, qkv: &Act, n: usize, c: f32) -> Result<Mem<u32>> {
        let bits = self.gpu.scratch::<u32>(n.div_ceil(32))?;
        let name = match qkv {
            Act::F32(_) => "clip_qkv",
            Act::Bf16(_) => "clip_qkv_bf16",
        };
        self.gpu.launch_n(
            name,
            n.div_ceil(32),
            &[
                Arg::P(self.out_buf(qkv).ptr),
                Arg::P(self.gpu.ptr(&bits, 0)),
                Arg::L(n as i64),
                Arg::F(c),
            ],
        )?;
        Ok(bits)
    }

    /// The clamp's backward in place: the clipped entries' gradient is 0.
    fn clip_qkv_back(&self, dqkv: &Act, n: usize, bits: &Mem<u32>) -> Result<()> {
        let name = match dqkv {
            Act::F32(_) => "clip_qkv_bwd",
            Act::Bf16(_) => "clip_qkv_bwd_bf16",
        };
        self.gpu.launch_n(
            name,
            n.div_ceil(32),
            &[
                Arg::P(self.out_buf(dqkv).ptr),
                Arg::P(self.gpu.ptr(bits, 0)),
                Arg::L(n as i64),
            ],
        )
    }

    /// SwiGLU of `[rows, 2h]` into `[rows, h]`, in the input's type.
    fn swiglu(&self, x: &Act, rows: usize) -> Result<Act> {
        let h = self.cfg.mlp_hidden;
        let (name, y) = match x {
            Act::F32(_) => ("swiglu_fwd", Act::F32(self.gpu.scratch(rows * h)?)),
            Act::Bf16(_) => ("swiglu_fwd_bf16", Act::Bf16(self.gpu.scratch(rows * h)?)),
        };
        let (xb, yb) = (self.out_buf(x), self.out_buf(&y));
        let v = vec_width(xb.bf16, &[h], &[xb.ptr, yb.ptr]);
        self.gpu.launch_n(
            name,
            rows * h / v,
            &[
                Arg::P(xb.ptr),
                Arg::P(yb.ptr),
                Arg::L(rows as i64),
                Arg::I(h as i32),
            ],
        )?;
        Ok(y)
    }

    /// SwiGLU's backward: dL/d(value | gate) from dL/dy, in the inputs' type.
    fn swiglu_back(&self, dy: &Act, x: &Act, rows: usize) -> Result<Act> {
        let h = self.cfg.mlp_hidden;
        let (name, dx) = match (dy, x) {
            (Act::F32(_), Act::F32(_)) => ("swiglu_bwd", Act::F32(self.gpu.scratch(rows * 2 * h)?)),
            (Act::Bf16(_), Act::Bf16(_)) => (
                "swiglu_bwd_bf16",
                Act::Bf16(self.gpu.scratch(rows * 2 * h)?),
            ),
            _ => bail!("SwiGLU backward over mixed f32 and bf16 buffers"),
        };
        let (dyb, xb, dxb) = (self.out_buf(dy), self.out_buf(x), self.out_buf(&dx));
        let v = vec_width(xb.bf16, &[h], &[dyb.ptr, xb.ptr, dxb.ptr]);
        self.gpu.launch_n(
            name,
            rows * h / v,
            &[
                Arg::P(dyb.ptr),
                Arg::P(xb.ptr),
                Arg::P(dxb.ptr),
                Arg::L(rows as i64),
                Arg::I(h as i32),
            ],
        )?;
        Ok(dx)
    }

    fn attn_shape(&self) -> (usize, usize, f32) {
        let hd = self.cfg.head_dim();
        (self.cfg.n_heads, hd, 1.0 / (hd as f32).sqrt())
    }

    /// Attention over materialised scores: `S = Q Kᵀ` and `O = P V` as batched GEMMs around a
    /// causal softmax kernel (within documents where `starts`, the device's document starts,
    /// is not 0). Returns the probabilities for the backward pass.
    fn materialised_forward(
        &self,
        qkv: Buf,
        att: &Act,
        (b, t): (usize, usize),
        starts: u64,
    ) -> Result<Probs> {
        let (hh, hd, scale) = self.attn_shape();
        let scores = self.gpu.scratch::<f32>(b * hh * t * t)?;
        let at = Attn { t, heads: hh, hd };
        for bi in 0..b {
            self.gpu
                .gemm(&at.scores(bi, qkv, self.gpu.ptr(&scores, 0), scale))?;
        }
        let rows = (b * hh * t) as u32;
        let probs = if self.bf16 {
            let p = self.gpu.scratch::<u16>(b * hh * t * t)?;
            self.gpu.launch(
                "softmax_fwd_bf16",
                rows,
                BLOCK,
                &[
                    self.p(&scores),
                    Arg::P(self.gpu.ptr(&p, 0)),
                    Arg::P(starts),
                    Arg::I(t as i32),
                    Arg::I(hh as i32),
                ],
            )?;
            Probs::Bf16(p)
        } else {
            self.gpu.launch(
                "softmax_fwd",
                rows,
                BLOCK,
                &[
                    self.p(&scores),
                    Arg::P(starts),
                    Arg::I(t as i32),
                    Arg::I(hh as i32),
                ],
            )?;
            Probs::F32(scores)
        };
        let pbuf = probs.buf(&self.gpu);
        for bi in 0..b {
            self.gpu
                .gemm(&at.output(bi, pbuf, qkv, self.out_buf(att)))?;
        }
        Ok(probs)
    }

    /// The materialised attention's backward into `dqkv` (before the inverse RoPE).
    fn materialised_backward(
        &self,
        probs: &Probs,
        qkv: &Prepared,
        dout: &Prepared,
        dqkv: &Act,
        b: usize,
        t: usize,
    ) -> Result<()> {
        let (hh, hd, scale) = self.attn_shape();
        let dp = self.gpu.scratch::<f32>(b * hh * t * t)?;
        let at = Attn { t, heads: hh, hd };
        let pbuf = probs.buf(&self.gpu);
        let (dq, dpp) = (self.out_buf(dqkv), self.gpu.ptr(&dp, 0));
        for bi in 0..b {
            self.gpu.gemm(&at.d_v(bi, pbuf, dout.buf, dq))?;
            self.gpu.gemm(&at.d_p(bi, dout.buf, qkv.buf, dpp))?;
        }
        let rows = (b * hh * t) as u32;
        let dsp = match probs {
            Probs::Bf16(p) => {
                let ds = self.gpu.scratch::<u16>(b * hh * t * t)?;
                self.gpu.launch(
                    "softmax_bwd_bf16",
                    rows,
                    BLOCK,
                    &[
                        Arg::P(self.gpu.ptr(p, 0)),
                        self.p(&dp),
                        Arg::P(self.gpu.ptr(&ds, 0)),
                        Arg::I(t as i32),
                        Arg::F(scale),
                    ],
                )?;
                Prepared {
                    buf: Buf {
                        ptr: self.gpu.ptr(&ds, 0),
                        bf16: true,
                    },
                    _copy: Some(Act::Bf16(ds)),
                }
            }
            Probs::F32(p) => {
                self.gpu.launch(
                    "softmax_bwd",
                    rows,
                    BLOCK,
                    &[self.p(p), self.p(&dp), Arg::I(t as i32), Arg::F(scale)],
                )?;
                self.prepare(&dp)?
            }
            Probs::Lse(_) => bail!("materialised attention backward without probabilities"),
        };
        for bi in 0..b {
            self.gpu.gemm(&at.d_q(bi, dsp.buf, qkv.buf, dq))?;
            self.gpu.gemm(&at.d_k(bi, dsp.buf, qkv.buf, dq))?;
        }
        Ok(())
    }

    /// Flash attention: `att` from the bf16 qkv at `qkv` without T×T buffers. Returns each
    /// row's log-sum-exp for the backward pass.
    fn flash_forward(
        &self,
        qkv: u64,
        att: &Act,
        (b, t): (usize, usize),
        starts: u64,
    ) -> Result<Probs> {
        let Act::Bf16(att) = att else {
            bail!("flash attention writes a bf16 output");
        };
        let (hh, _, scale) = self.attn_shape();
        let lse = self.gpu.scratch::<f32>(b * hh * t)?;
        let args = [
            Arg::P(qkv),
            Arg::P(self.gpu.ptr(att, 0)),
            self.p(&lse),
            Arg::I(t as i32),
            Arg::I(hh as i32),
            Arg::I(self.cfg.n_kv_heads as i32),
            Arg::F(scale),
            Arg::P(starts),
        ];
        self.flash_launch("fwd", b, t, &args)?;
        Ok(Probs::Lse(lse))
    }

    /// Flash attention's backward into `dqkv` (before the inverse RoPE): `D = rowsum(dO ∘ O)`
    /// from the bf16 output and its bf16 gradient (the dO that dP = dO Vᵀ uses, as in
    /// FlashAttention-2, so that each row of dS sums to zero as it should), then dQ over
    /// query blocks and dK, dV over each kv head's key blocks (summing the q heads that share
    /// it), each recomputing P from the log-sum-exp.
    fn flash_backward(
        &self,
        qkv: u64,
        dout: &Prepared,
        (att, lse): (&Act, &Mem<f32>),
        dqkv: &Act,
        (b, t): (usize, usize),
        starts: u64,
    ) -> Result<()> {
        let (hh, hd, scale) = self.attn_shape();
        if !matches!(dqkv, Act::Bf16(_)) {
            bail!("flash attention writes a bf16 qkv gradient");
        }
        let n = b * t;
        let dsum = self.gpu.scratch::<f32>(b * hh * t)?;
        self.gpu.launch(
            "flash_bwd_pre",
            (n * hh * 32).div_ceil(BLOCK as usize) as u32,
            BLOCK,
            &[
                Arg::P(dout.buf.ptr),
                Arg::P(self.out_buf(att).ptr),
                self.p(&dsum),
                Arg::L(n as i64),
                Arg::I(t as i32),
                Arg::I(hh as i32),
                Arg::I(hd as i32),
            ],
        )?;
        let args = [
            Arg::P(qkv),
            Arg::P(dout.buf.ptr),
            self.p(lse),
            self.p(&dsum),
            Arg::P(self.out_buf(dqkv).ptr),
            Arg::I(t as i32),
            Arg::I(hh as i32),
            Arg::I(self.cfg.n_kv_heads as i32),
            Arg::F(scale),
            Arg::P(starts),
        ];
        self.flash_launch("dq", b, t, &args)?;
        self.flash_launch("dkdv", b, t, &args)
    }

    /// Causal attention over the (RoPE'd) q, k and v rows of `qkv`.
    fn attention(&self, qkv: &Act, (b, t): (usize, usize), starts: u64) -> Result<Attention> {
        let n = b * t;
        // only a GEMM operand: bf16 under mixed precision
        let att = self.operand_out(n * self.cfg.d_model)?;
        let qp = self.heads(qkv, n)?;
        let probs = if self.flash {
            self.flash_forward(qp.buf.ptr, &att, (b, t), starts)?
        } else {
            self.materialised_forward(qp.buf, &att, (b, t), starts)?
        };
        Ok(Attention { att, probs })
    }

    /// One block's forward pass from its input `x`: its output, and the activations its
    /// backward pass reads.
    fn layer_forward(
        &self,
        x: &Mem<f32>,
        o: &LayerOffsets,
        (b, t): (usize, usize),
        starts: u64,
    ) -> Result<(Mem<f32>, Acts)> {
        let c = self.cfg;
        let (d, h, w) = (c.d_model, c.mlp_hidden, c.qkv_width());
        let n = b * t;
        // Attention branch: pre-norm `x + attn(norm(x))`, or `x + norm(attn(x))`.
        let ln1 = self.pre_norm(x, o.attn_norm, n)?;
        let h1 = ln1.as_ref().map_or(Src::F32(x), |(y, _)| y.src());
        let qkv = self.linear(h1, o.att_proj, (n, d, w), true)?;
        let clipped = c
            .clip_qkv
            .map(|c| self.clip_qkv(&qkv, n * w, c))
            .transpose()?;
        let qk = c.qk_norm.then(|| self.qk_norm(&qkv, o, n)).transpose()?;
        self.rope(&qkv, n, t, false)?;
        let attention = self.attention(&qkv, (b, t), starts)?;
        let attn_out = (o.attn_out, (n, d, d));
        let (x_mid, attn_post) = self.join(attention.att.src(), attn_out, o.attn_norm, x)?;
        // MLP branch, alike.
        let ln2 = self.pre_norm(&x_mid, o.ff_norm, n)?;
        let h2 = ln2.as_ref().map_or(Src::F32(&x_mid), |(y, _)| y.src());
        let ff_in = self.linear(h2, o.ff_proj, (n, d, 2 * h), true)?;
        let ff_act = self.swiglu(&ff_in, n)?;
        let (x_out, ff_post) = self.join(ff_act.src(), (o.ff_out, (n, h, d)), o.ff_norm, &x_mid)?;
        let acts = Acts {
            ln1,
            qkv,
            clipped,
            qk,
            attention: Some(attention),
            attn_post,
            x_mid,
            ln2,
            ff_in,
            ff_act,
            ff_post,
        };
        Ok((x_out, acts))
    }

    fn run(&mut self, batch: &Batch, backward: Option<f32>) -> Result<Scores> {
        let c = self.cfg;
        let (d, h, w) = (c.d_model, c.mlp_hidden, c.qkv_width());
        let (b, t) = (batch.b, batch.t);
        let n = b * t;
        let emb = c.embedding_size;
        if t > self.max_seq {
            bail!(
                "a batch of {t} positions exceeds the model's {}",
                self.max_seq
            );
        }
        let gpu = &self.gpu;
        let ids = gpu.upload(batch.inputs)?;
        let tgts = gpu.upload(batch.targets)?;
        let doc_starts = batch.doc_starts.map(|s| gpu.upload(s)).transpose()?;
        let starts = doc_starts.as_ref().map_or(0, |s| gpu.ptr(s, 0));
        // the embedding gradient's positions grouped by token, uploaded with the inputs
        let by_token = match backward {
            Some(_) => {
                let g = TokenGroups::new(batch.inputs);
                Some((
                    gpu.upload(&g.tokens)?,
                    gpu.upload(&g.starts)?,
                    gpu.upload(&g.positions)?,
                ))
            }
            None => None,
        };
        let lay = self.layout.clone();
        let mut x = gpu.scratch::<f32>(n * d)?;
        gpu.launch_n(
            "embed_fwd",
            n * d,
            &[
                self.p_u32(&ids),
                Arg::P(gpu.ptr(&self.params, lay.wte)),
                self.p(&x),
                Arg::L(n as i64),
                Arg::I(d as i32),
            ],
        )?;
        let mut kept = Vec::new();
        for (i, o) in lay.layers.iter().enumerate() {
            let (x_out, mut acts) = self.layer_forward(&x, o, (b, t), starts)?;
            let x_in = std::mem::replace(&mut x, x_out);
            if self.checkpointing.recomputes_attention() {
                acts.attention = None;
            }
            if backward.is_some() {
                let acts = (!self.checkpointing.recomputes(i)).then_some(acts);
                kept.push(Kept { x_in, acts });
            }
        }
        let (lnf, lnf_st) = self.norm(&x, lay.ln_f, n)?;
        let head = lay.head.unwrap_or(lay.wte);
        let lnf_op = self.operand(lnf.src())?;
        let logp = self.gpu.scratch::<f32>(n)?;
        let zt = self.gpu.scratch::<f32>(n)?;
        // dL/d(final norm's output), the head's dx, written chunk by chunk
        let dlnf = backward
            .map(|_| self.gpu.scratch::<f32>(n * d))
            .transpose()?;
        // The logits a chunk of rows at a time (the step's largest tensor otherwise): each
        // chunk's loss and, in a backward pass, its share of dx and of the head's gradient.
        let chunk = self
            .head_rows
            .unwrap_or_else(|| head_chunk_rows(n, emb))
            .max(1);
        for r0 in (0..n).step_by(chunk) {
            let rows = chunk.min(n - r0);
            let x_rows = lnf_op.buf.offset(r0 * d);
            let logits = self.gpu.scratch::<f32>(rows * emb)?;
            let logits_buf = Buf::f32(self.gpu.ptr(&logits, 0));
            self.gpu.gemm(&gemm_plan::linear_fwd(
                x_rows,
                self.weight(head),
                logits_buf,
                rows,
                d,
                emb,
            ))?;
            // dL/dlogits: only an operand of the head's GEMMs, so in bf16 under mixed
            // precision (written by the loss kernel), else in place over the f32 logits
            let dlogits = match backward {
                Some(_) if self.bf16 => Some(self.gpu.scratch::<u16>(rows * emb)?),
                _ => None,
            };
            self.gpu.launch(
                "cross_entropy",
                rows as u32,
                BLOCK,
                &[
                    self.p(&logits),
                    Arg::P(dlogits.as_ref().map_or(0, |g| self.gpu.ptr(g, 0))),
                    Arg::P(self.gpu.ptr(&tgts, r0)),
                    Arg::P(self.gpu.ptr(&logp, r0)),
                    Arg::P(self.gpu.ptr(&zt, r0)),
                    Arg::I(emb as i32),
                    Arg::F(c.z_loss),
                    Arg::F(backward.unwrap_or(0.0)),
                    Arg::I(backward.is_some() as i32),
                ],
            )?;
            if let Some(dlnf) = &dlnf {
                let dy = match &dlogits {
                    Some(g) => Buf {
                        ptr: self.gpu.ptr(g, 0),
                        bf16: true,
                    },
                    None => logits_buf,
                };
                let dx = Buf::f32(self.gpu.ptr(dlnf, r0 * d));
                let w = self.weight(head);
                self.gpu
                    .gemm(&gemm_plan::linear_dx(dy, w, dx, rows, d, emb))?;
                let dw = self.gpu.ptr(&self.grads, head);
                self.gpu
                    .gemm(&gemm_plan::linear_dw(dy, x_rows, dw, rows, d, emb))?;
            }
        }
        drop(lnf_op);
        let logprobs = self.gpu.download(&logp)?;
        let z = self.gpu.download(&zt)?;
        let mut scores = Scores {
            logprobs: logprobs.clone(),
            ..Default::default()
        };
        for ((lp, zv), &tg) in logprobs.iter().zip(&z).zip(batch.targets) {
            if tg != IGNORE {
                scores.ce_sum -= *lp as f64;
                scores.z_sum += *zv as f64;
                scores.count += 1;
            }
        }
        let Some(dlnf) = dlnf else {
            return Ok(scores);
        };
        drop(lnf);

        // Backward from dL/d(final norm's output).
        let dx = self.gpu.zeros::<f32>(n * d)?;
        self.norm_back(&dlnf, (&x, &lnf_st), lay.ln_f, (n, d), &dx)?;
        for (o, k) in lay.layers.iter().zip(kept).rev() {
            let a = &match k.acts {
                Some(a) => a,
                None => self.layer_forward(&k.x_in, o, (b, t), starts)?.1,
            };
            // MLP branch; `dx` is dL/dx_out, and the residual's share of dL/dx_mid.
            let df = self.post_norm_back(&dx, &a.ff_post, o.ff_norm, n)?;
            let dout = df.as_ref().unwrap_or(&dx);
            let dff_act =
                self.linear_back(dout.into(), a.ff_act.src(), o.ff_out, (n, h, d), true)?;
            drop(df);
            let dff_in = self.swiglu_back(&dff_act, &a.ff_in, n)?;
            drop(dff_act);
            let proj = (o.ff_proj, (n, d, 2 * h));
            self.input_back(dff_in.src(), (&a.x_mid, &a.ln2), proj, o.ff_norm, &dx)?;
            drop(dff_in);
            // Attention branch, alike; `dx` is now dL/dx_mid.
            let again;
            let attention = match &a.attention {
                Some(kept) => kept,
                None => {
                    again = self.attention(&a.qkv, (b, t), starts)?;
                    &again
                }
            };
            let da = self.post_norm_back(&dx, &a.attn_post, o.attn_norm, n)?;
            // dO: only an operand (of attention's GEMMs or flash kernels), so bf16 under mixed
            // precision, written so by its GEMM
            let dout = da.as_ref().unwrap_or(&dx);
            let att = &attention.att;
            let datt = self.linear_back(dout.into(), att.src(), o.attn_out, (n, d, d), true)?;
            drop(da);
            // only a GEMM operand after the inverse RoPE: bf16 under mixed precision
            let repeated = self.repeats_kv();
            let dheads = self.operand_out(n * if repeated { 3 * d } else { w })?;
            let dop = self.operand(datt.src())?;
            let qp = self.heads(&a.qkv, n)?;
            match &attention.probs {
                Probs::Lse(lse) => {
                    self.flash_backward(qp.buf.ptr, &dop, (att, lse), &dheads, (b, t), starts)?
                }
                probs => self.materialised_backward(probs, &qp, &dop, &dheads, b, t)?,
            }
            drop((dop, qp, datt));
            let dqkv = match repeated {
                false => dheads,
                true => {
                    let sum = self.operand_out(n * w)?;
                    self.kv_layout("kv_sum", &dheads, &sum, n)?;
                    sum
                }
            };
            self.rope(&dqkv, n, t, true)?;
            if let Some(saved) = &a.qk {
                self.qk_norm_back(&dqkv, saved, o, n)?;
            }
            if let Some(bits) = &a.clipped {
                self.clip_qkv_back(&dqkv, n * w, bits)?;
            }
            let proj = (o.att_proj, (n, d, w));
            self.input_back(dqkv.src(), (&k.x_in, &a.ln1), proj, o.attn_norm, &dx)?;
        }
        let (tokens, starts, positions) = by_token.expect("uploaded for the backward pass");
        self.gpu.launch(
            "embed_bwd",
            tokens.len() as u32,
            BLOCK,
            &[
                self.p_u32(&tokens),
                self.p_u32(&starts),
                self.p_u32(&positions),
                self.p(&dx),
                Arg::P(self.gpu.ptr(&self.grads, lay.wte)),
                Arg::I(d as i32),
            ],
        )?;
        Ok(scores)
    }

    fn p_u32(&self, s: &Mem<u32>) -> Arg {
        Arg::P(self.gpu.ptr(s, 0))
    }

    /// Sets up NCCL across the ranks of `tcp` (rank 0's unique id travels over TCP). Without
    /// libnccl, or with `OLMO_TRAIN_NCCL=0` (NCCL refuses two ranks on one GPU, which is how
    /// the data-parallel path can be checked on a single GPU), gradients are summed through
    /// the host instead, and this says so.
    pub fn enable_nccl(&mut self, tcp: &mut crate::dist::Tcp) -> Result<()> {
        if std::env::var("OLMO_TRAIN_NCCL").is_ok_and(|v| v == "0") {
            eprintln!(
                "olmo-train: OLMO_TRAIN_NCCL=0: gradients are summed through the host (slow)"
            );
            return Ok(());
        }
        if !unsafe { cudarc::nccl::sys::is_culib_present() } {
            eprintln!(
                "olmo-train: libnccl not found: gradients are summed through the host (slow)"
            );
            return Ok(());
        }
        let mut bytes = if tcp.rank == 0 {
            let id = cudarc::nccl::Id::new().map_err(|e| nccl_error(e, "NCCL id"))?;
            id.internal().iter().map(|&c| c as u8).collect()
        } else {
            Vec::new()
        };
        tcp.broadcast(&mut bytes)?;
        if bytes.len() != 128 {
            bail!("NCCL id of {} bytes", bytes.len());
        }
        let mut raw = [0 as std::ffi::c_char; 128];
        for (r, b) in raw.iter_mut().zip(&bytes) {
            *r = *b as std::ffi::c_char;
        }
        let stream = self
            .gpu
            .stream()
            .ok_or_else(|| anyhow!("NCCL needs a GPU"))?
            .clone();
        let comm = cudarc::nccl::Comm::from_rank(
            stream,
            tcp.rank,
            tcp.size,
            cudarc::nccl::Id::uninit(raw),
        )
        .map_err(|e| {
            let hint = if e.0 == cudarc::nccl::sys::ncclResult_t::ncclInvalidUsage {
                " (NCCL refuses two ranks on one GPU: check that LOCAL_RANK differs between \
                 the ranks of a host, or set OLMO_TRAIN_NCCL=0 to sum gradients through the host)"
            } else {
                ""
            };
            let what = format!(
                "creating the NCCL communicator, rank {} of {}",
                tcp.rank, tcp.size
            );
            anyhow!("{}{hint}", nccl_error(e, &what))
        })?;
        self.nccl = Some(comm);
        Ok(())
    }

    /// Host copy of the gradient accumulator (for checks).
    pub fn grads(&self) -> Result<Vec<f32>> {
        self.gpu.download(&self.grads)
    }
}

impl Backend for CudaEngine {
    fn describe(&self) -> String {
        format!(
            "cuda ({}, sm_{}{}), {}{}, {} attention",
            self.gpu.name,
            self.gpu.arch.0,
            self.gpu.arch.1,
            match self.gpu.gemm_library() {
                Some(GemmLib::Cublas) => "cuBLAS ",
                Some(GemmLib::CublasLt) => "cuBLASLt ",
                None => "",
            },
            if self.bf16 {
                "bf16 GEMMs, f32 master weights"
            } else {
                "f32"
            },
            if self.flash { "flash" } else { "materialised" }
        )
    }

    fn peak_flops(&self) -> Option<f64> {
        peak_bf16_flops(&self.gpu.name)
    }

    fn peak_memory(&self) -> Result<Option<u64>> {
        self.gpu.peak_memory()
    }

    fn device_memory(&self) -> Option<(u64, u64)> {
        self.gpu.memory_info()
    }

    fn tuning_notes(&mut self) -> Vec<String> {
        let (heads, hd) = (self.cfg.n_heads, self.cfg.head_dim());
        let lines: Vec<String> = self.flash_choices()[self.flash_noted..]
            .iter()
            .map(|c| c.line(heads, hd))
            .collect();
        self.flash_noted += lines.len();
        lines
    }

    fn forward(&mut self, batch: &Batch) -> Result<Scores> {
        self.run(batch, None)
    }

    fn forward_backward(&mut self, batch: &Batch, grad_scale: f32) -> Result<Scores> {
        self.run(batch, Some(grad_scale))
    }

    fn zero_grad(&mut self) -> Result<()> {
        self.gpu.fill_zero(&mut self.grads)
    }

    fn all_reduce_grads(&mut self, tcp: &mut crate::dist::Tcp) -> Result<()> {
        match (&self.nccl, &mut self.grads) {
            (Some(comm), Mem::Dev(g)) => {
                comm.all_reduce_in_place(g, &cudarc::nccl::ReduceOp::Sum)
                    .map_err(|e| nccl_error(e, "NCCL all-reduce"))?;
            }
            _ => {
                let mut g = self.gpu.download(&self.grads)?;
                tcp.all_reduce_f32(&mut g)?;
                self.gpu.copy_from_host(&g, &mut self.grads)?;
            }
        }
        Ok(())
    }

    fn grad_norms(&mut self) -> Result<Vec<f32>> {
        // each tensor's partial sums in a segment of their own, read back in one download
        let tensors = &self.layout.tensors;
        let acc = self.gpu.zeros::<f64>(tensors.len() * SUMSQ_BLOCKS)?;
        let blocks = |len: usize| len.div_ceil(BLOCK as usize).min(SUMSQ_BLOCKS);
        for (k, t) in tensors.iter().enumerate() {
            self.gpu.launch(
                "sumsq",
                blocks(t.len()) as u32,
                BLOCK,
                &[
                    Arg::P(self.gpu.ptr(&self.grads, t.offset)),
                    Arg::L(t.len() as i64),
                    Arg::P(self.gpu.ptr(&acc, k * SUMSQ_BLOCKS)),
                ],
            )?;
        }
        let parts = self.gpu.download(&acc)?;
        Ok(tensors
            .iter()
            .zip(parts.chunks(SUMSQ_BLOCKS))
            .map(|(t, p)| p[..blocks(t.len())].iter().sum::<f64>().sqrt() as f32)
            .collect())
    }

    fn step(&mut self, u: &Update) -> Result<f32> {
        let n = self.layout.total;
        let blocks = n.div_ceil(BLOCK as usize).min(SUMSQ_BLOCKS);
        self.gpu.launch(
            "sumsq",
            blocks as u32,
            BLOCK,
            &[
                self.p(&self.grads),
                Arg::L(n as i64),
                Arg::P(self.gpu.ptr(&self.norm_acc, 0)),
            ],
        )?;
        // the blocks' parts added in block order: the same bits on every run
        let parts = self.gpu.download(&self.norm_acc)?;
        let norm = parts[..blocks].iter().sum::<f64>().sqrt() as f32;
        let global = u.max_norm.map_or(1.0, |m| (m / (norm + 1e-6)).min(1.0));
        let Some(exp_avg) = &self.exp_avg else {
            bail!("this engine was built to evaluate, without optimizer moments");
        };
        for (k, (t, &decay)) in self.layout.tensors.iter().zip(u.decay).enumerate() {
            let len = t.len();
            let coef = u.coefs.map_or(global, |c| c[k]);
            let weights = [
                Arg::P(self.gpu.ptr(&self.params, t.offset)),
                Arg::P(
                    self.params_bf
                        .as_ref()
                        .map_or(0, |bf| self.gpu.ptr(bf, t.offset)),
                ),
                Arg::P(self.gpu.ptr(&self.grads, t.offset)),
                Arg::P(self.gpu.ptr(exp_avg, t.offset)),
            ];
            match &u.optimizer {
                Optimizer::AdamW(a) => {
                    let Some(v) = &self.exp_avg_sq else {
                        bail!("AdamW needs a second moment, and this engine was built without one (for LionW)");
                    };
                    let bc1 = 1.0 - a.beta1.powi(u.step as i32);
                    let bc2_sqrt = (1.0 - a.beta2.powi(u.step as i32)).sqrt();
                    let mut args = weights.to_vec();
                    args.extend([
                        Arg::P(self.gpu.ptr(v, t.offset)),
                        Arg::L(len as i64),
                        Arg::F(u.lr),
                        Arg::F(a.beta1),
                        Arg::F(a.beta2),
                        Arg::F(a.eps),
                        Arg::F(if decay { a.weight_decay } else { 0.0 }),
                        Arg::F(bc1),
                        Arg::F(bc2_sqrt),
                        Arg::F(coef),
                    ]);
                    self.gpu.launch_n("adamw", len, &args)?;
                }
                Optimizer::LionW(l) => {
                    let mut args = weights.to_vec();
                    args.extend([
                        Arg::L(len as i64),
                        Arg::F(u.lr),
                        Arg::F(l.beta1),
                        Arg::F(l.beta2),
                        Arg::F(if decay { l.weight_decay } else { 0.0 }),
                        Arg::F(coef),
                    ]);
                    self.gpu.launch_n("lionw", len, &args)?;
                }
            }
        }
        Ok(norm)
    }

    fn with_state(&mut self, f: &mut StateFn) -> Result<()> {
        let p = self.gpu.download(&self.params)?;
        let download = |m: &Option<Mem<f32>>| match m {
            Some(m) => self.gpu.download(m),
            None => Ok(Vec::new()),
        };
        let (m, v) = (download(&self.exp_avg)?, download(&self.exp_avg_sq)?);
        f(&p, &m, &v).context("with the engine's state")
    }
}

/// Rows of logits computed at once: chunks with at most 1 GiB of f32 logits (see
/// [`logit_chunk_rows`]). A 50k vocabulary allows up to 5,336 rows; 8 x 2048 rows go in
/// chunks of 4,096.
pub fn head_chunk_rows(n: usize, emb: usize) -> usize {
    logit_chunk_rows(n, emb, 1 << 30)
}

/// A batch's positions grouped by input token, for the embedding gradient (`embed_bwd`):
/// the distinct tokens ascending, and for the i-th, its positions (ascending) at
/// `positions[starts[i]..starts[i + 1]]`.
#[derive(Debug, PartialEq)]
pub struct TokenGroups {
    pub tokens: Vec<u32>,
    pub starts: Vec<u32>,
    pub positions: Vec<u32>,
}

impl TokenGroups {
    pub fn new(ids: &[u32]) -> TokenGroups {
        let mut positions: Vec<u32> = (0..ids.len() as u32).collect();
        // stable: a token's positions stay ascending
        positions.sort_by_key(|&p| ids[p as usize]);
        let (mut tokens, mut starts) = (Vec::new(), Vec::new());
        for (i, &p) in positions.iter().enumerate() {
            let id = ids[p as usize];
            if tokens.last() != Some(&id) {
                tokens.push(id);
                starts.push(i as u32);
            }
        }
        starts.push(positions.len() as u32);
        TokenGroups {
            tokens,
            starts,
            positions,
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn token_groups_list_each_tokens_positions_in_order() {
        let g = super::TokenGroups::new(&[7, 2, 7, 0, 2, 7]);
        assert_eq!(g.tokens, [0, 2, 7]);
        assert_eq!(g.starts, [0, 1, 3, 6]);
        assert_eq!(g.positions, [3, 1, 4, 0, 2, 5]);
        let one = super::TokenGroups::new(&[5]);
        assert_eq!(
            (one.tokens, one.starts, one.positions),
            (vec![5], vec![0, 1], vec![0])
        );
    }
}
