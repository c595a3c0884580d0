//! The CUDA engine: the same passes as the CPU engine (`model.rs`), with GEMMs in cuBLASLt and
//! the other kernels (`cuda_kernels.cu`) compiled at run time by NVRTC for the present GPU.
//! Nothing CUDA is linked: cudarc loads the driver, NVRTC and cuBLAS(Lt) when the engine is
//! built.
//!
//! Mixed precision as OLMo's `amp_bf16`: f32 master weights, gradients and AdamW moments; GEMM
//! operands cast to bf16 (weights once per step, activations per use) with f32 accumulation
//! and f32 outputs; norms, softmax, RoPE and the loss in f32. `precision: fp32` keeps every
//! GEMM in f32.
//!
//! The same bits run to run on one GPU: sums that cross blocks (the embedding and norm-weight
//! gradients, the gradient norm) run in a fixed order, without atomics, and gpu-check runs the
//! same steps twice to check it. Against the CPU engine, results agree within bf16 tolerance.

use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use cudarc::cublas::sys::{
    cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType_t,
};
use cudarc::cublas::CudaBlas;
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, LaunchConfig, PushKernelArg,
};

use crate::backend::{Backend, StateFn, Update};
use crate::cublaslt::Lt;
use crate::gemm_plan::{self, cublas_args, Attn, Buf, GemmSpec};
use crate::model::{
    logit_chunk_rows, Batch, Checkpointing, LayerOffsets, Layout, Model, ModelConfig, Scores,
};
use crate::ops::{NormKind, RopeTable, IGNORE};
use crate::optim::Optimizer;

const SOURCE: &str = include_str!("cuda_kernels.cu");
const BLOCK: u32 = 256;
/// Blocks of the gradient norm's sum of squares (one partial sum each).
const SUMSQ_BLOCKS: usize = 4096;
/// Rows per partial sum of an affine norm's weight gradient.
const NORM_DW_ROWS: usize = 256;

const KERNELS: &[&str] = &[
    "embed_fwd",
    "embed_bwd",
    "norm_fwd",
    "norm_add_fwd",
    "cols_copy",
    "norm_bwd",
    "norm_dw_partial",
    "norm_dw_sum",
    "rope",
    "kv_repeat",
    "kv_sum",
    "softmax_fwd",
    "softmax_bwd",
    "softmax_fwd_bf16",
    "softmax_bwd_bf16",
    "clip_qkv",
    "clip_qkv_bf16",
    "clip_qkv_bwd",
    "clip_qkv_bwd_bf16",
    "swiglu_fwd",
    "swiglu_bwd",
    "swiglu_fwd_bf16",
    "swiglu_bwd_bf16",
    "rope_bf16",
    "cross_entropy",
    "cast_bf16",
    "sumsq",
    "adamw",
    "lionw",
    "flash_bwd_pre",
    "flash_fwd_32",
    "flash_dq_32",
    "flash_dkdv_32",
    "flash_fwd_64",
    "flash_dq_64",
    "flash_dkdv_64",
    "flash_fwd_128",
    "flash_dq_128",
    "flash_dkdv_128",
    "flash_fwd_32_wide",
    "flash_dq_32_wide",
    "flash_dkdv_32_wide",
    "flash_fwd_64_wide",
    "flash_dq_64_wide",
    "flash_dkdv_64_wide",
    "flash_fwd_128_wide",
    "flash_dq_128_wide",
    "flash_dkdv_128_wide",
];

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

/// An element type of engine buffers. `POISON` fills the host emulator's uninitialised
/// buffers, so an output a kernel forgot to write shows up as NaN (or an impossible id).
pub trait Elem:
    cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits + Copy + Default + 'static
{
    const POISON: Self;
}
impl Elem for f32 {
    const POISON: f32 = f32::NAN;
}
impl Elem for f64 {
    const POISON: f64 = f64::NAN;
}
impl Elem for u16 {
    const POISON: u16 = 0xFFFF;
}
impl Elem for u32 {
    const POISON: u32 = u32::MAX - 1;
}

/// A buffer in GPU memory, or in host memory when the engine runs on the host emulator, or
/// only its size when the engine plans memory ([`Gpu::memory_planner`]).
pub enum Mem<T> {
    Dev(CudaSlice<T>),
    Host(Vec<T>),
    Planned(Planned),
}

/// The bytes a memory plan holds now and has held at most at once.
#[derive(Default)]
pub struct Meter {
    now: std::sync::atomic::AtomicU64,
    high: std::sync::atomic::AtomicU64,
}

/// A buffer of a memory plan: its length, counted in its meter while it lives.
pub struct Planned {
    len: usize,
    bytes: u64,
    meter: Arc<Meter>,
}

impl Planned {
    fn new<T>(n: usize, meter: &Arc<Meter>) -> Planned {
        use std::sync::atomic::Ordering::SeqCst;
        let bytes = (n.max(1) * std::mem::size_of::<T>()) as u64;
        let now = meter.now.fetch_add(bytes, SeqCst) + bytes;
        meter.high.fetch_max(now, SeqCst);
        Planned {
            len: n.max(1),
            bytes,
            meter: meter.clone(),
        }
    }
}

impl Drop for Planned {
    fn drop(&mut self) {
        self.meter
            .now
            .fetch_sub(self.bytes, std::sync::atomic::Ordering::SeqCst);
    }
}

impl<T> Mem<T> {
    pub fn len(&self) -> usize {
        match self {
            Mem::Dev(s) => s.len(),
            Mem::Host(v) => v.len(),
            Mem::Planned(p) => p.len,
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

struct Cuda {
    // Dropped first: its plans and handle before the stream and context they use; with the
    // workspace it runs in.
    lt: Option<(Lt, CudaSlice<u8>)>,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    funcs: std::collections::HashMap<&'static str, CudaFunction>,
}

impl Cuda {
    /// A timing event recorded on the stream now.
    fn event(&self) -> Result<cudarc::driver::CudaEvent> {
        cu(
            self.stream
                .record_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT)),
            "event",
        )
    }
}

/// The library a GEMM runs in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GemmLib {
    /// `cublasLtMatmul`, an algorithm chosen once per problem by the heuristic, told the
    /// operands' real alignment; what the engine uses.
    CublasLt,
    /// `cublasGemmStridedBatchedEx`: the fallback for a problem cuBLASLt has no algorithm for,
    /// and everything under `OLMO_TRAIN_GEMM=cublas`.
    Cublas,
}

/// Where the engine's kernels run: a GPU (compiled kernels on one stream, cuBLAS), or the host
/// emulator, which runs the same launches and GEMMs with plain loops so that the engine's
/// orchestration (buffers, offsets, argument lists, launch shapes) is tested without a GPU.
pub struct Gpu {
    cuda: Option<Cuda>,
    /// A memory planner's meter: buffers are sizes only, launches and GEMMs do nothing.
    plan: Option<Arc<Meter>>,
    pub name: String,
    /// Compute capability (major, minor).
    pub arch: (i32, i32),
    /// While profiling: an event recorded after each launch and GEMM, with its label.
    profile: std::sync::Mutex<Option<Vec<(String, cudarc::driver::CudaEvent)>>>,
}

/// GPU time by kernel (or GEMM shape) over a profiled stretch: label, milliseconds, calls;
/// the time between consecutive events, so idle gaps (a CPU-bound host) count too.
pub type Profile = Vec<(String, f64, usize)>;

/// Activations are allocated and freed on the stream every step (`cuMemAllocAsync`). The
/// device's default pool returns freed memory to the driver at each synchronisation unless
/// its release threshold says otherwise, which would make every step map its tens of GB
/// again; keep it. Best effort: without stream-ordered allocation this changes nothing.
fn keep_freed_memory(ctx: &CudaContext) {
    use cudarc::driver::sys;
    // Safety: plain driver calls on this context's device with valid out-pointers.
    unsafe {
        let mut pool = std::ptr::null_mut();
        if sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()) == sys::CUresult::CUDA_SUCCESS
        {
            let mut keep = u64::MAX;
            let _ = sys::cuMemPoolSetAttribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                &mut keep as *mut u64 as *mut std::ffi::c_void,
            );
        }
    }
}

/// An allocation's result, its failure saying how much was asked, how much is free, and, when
/// the GPU is full, what to change.
fn alloc_err<S, E>(r: std::result::Result<S, cudarc::driver::DriverError>, n: usize) -> Result<S> {
    r.map_err(|e| {
        let bytes = n * std::mem::size_of::<E>();
        let free = cudarc::driver::result::mem_get_info()
            .map(|(free, total)| format!(" ({} of {} MiB free)", free >> 20, total >> 20))
            .unwrap_or_default();
        let hint = if e.0 == cudarc::driver::sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY {
            "; the GPU is full: lower device_train_microbatch_size (gradient accumulation keeps the global batch) or use flash attention"
        } else {
            ""
        };
        anyhow!("CUDA: allocating {} MiB failed: {e:?}{free}{hint}", bytes.div_ceil(1 << 20))
    })
}

fn cu<T, E: std::fmt::Debug>(r: std::result::Result<T, E>, what: &str) -> Result<T> {
    r.map_err(|e| anyhow!("CUDA: {what}: {e:?}"))
}

impl Gpu {
    pub fn new(ordinal: usize) -> Result<Gpu> {
        if let Err(why) = crate::device::cuda_unavailable() {
            bail!("cuda:{ordinal}: {why}");
        }
        let ctx = cu(CudaContext::new(ordinal), "creating the context")?;
        // One stream: no cross-stream events needed, and raw pointers stay valid.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.default_stream();
        keep_freed_memory(&ctx);
        let arch = cu(ctx.compute_capability(), "compute capability")?;
        let name = cu(ctx.name(), "device name")?;
        let module = load_kernels(&ctx, arch)?;
        let mut funcs = std::collections::HashMap::new();
        for &k in KERNELS {
            funcs.insert(k, cu(module.load_function(k), k)?);
        }
        let blas = cu(CudaBlas::new(stream.clone()), "creating the cuBLAS handle")?;
        let lt = match std::env::var("OLMO_TRAIN_GEMM").as_deref() {
            Ok("cublas") => None,
            Ok("cublaslt") | Err(_) => {
                // NVIDIA's advice: 32 MiB on Hopper and later, 4 MiB before.
                let size = if arch.0 >= 9 { 32 << 20 } else { 4 << 20 };
                // Safety: scratch memory for cuBLASLt alone.
                let ws = cu(unsafe { stream.alloc::<u8>(size) }, "cuBLASLt workspace")?;
                let lt = Lt::new(ws.device_ptr(&stream).0, size)?;
                Some((lt, ws))
            }
            Ok(other) => {
                bail!("OLMO_TRAIN_GEMM={other}: expected cublaslt (the default) or cublas")
            }
        };
        Ok(Gpu {
            plan: None,
            cuda: Some(Cuda {
                lt,
                ctx,
                stream,
                blas,
                funcs,
            }),
            name,
            arch,
            profile: Default::default(),
        })
    }

    /// The host emulator (for tests): no GPU, no CUDA library.
    pub fn host_emulator() -> Gpu {
        Gpu {
            cuda: None,
            plan: None,
            name: "host emulator".into(),
            arch: (0, 0),
            profile: Default::default(),
        }
    }

    /// A GPU that only counts: the engine on it allocates and frees its buffers as it would
    /// on a GPU, as sizes, and launches nothing, so `peak_memory` is what a step would take
    /// of the GPU's memory pool, without a GPU and in no time. Downloads read zeros.
    pub fn memory_planner() -> Gpu {
        Gpu {
            cuda: None,
            plan: Some(Default::default()),
            name: "memory planner".into(),
            arch: (9, 0),
            profile: Default::default(),
        }
    }

    /// The default memory pool (where the engine's stream-ordered allocations come from);
    /// `None` where allocations bypass it (a device without memory pools).
    fn pool(&self) -> Result<Option<cudarc::driver::sys::CUmemoryPool>> {
        let Some(c) = &self.cuda else { return Ok(None) };
        if !c.ctx.has_async_alloc() {
            return Ok(None);
        }
        let mut pool = std::ptr::null_mut();
        // Safety: a query of the context's own device.
        let r =
            unsafe { cudarc::driver::sys::cuDeviceGetDefaultMemPool(&mut pool, c.ctx.cu_device()) };
        cu(r.result(), "the default memory pool")?;
        Ok(Some(pool))
    }

    /// Restarts the peak of `peak_memory` from what is in use now.
    pub fn reset_peak_memory(&self) -> Result<()> {
        if let Some(m) = &self.plan {
            use std::sync::atomic::Ordering::SeqCst;
            m.high.store(m.now.load(SeqCst), SeqCst);
            return Ok(());
        }
        let Some(pool) = self.pool()? else {
            return Ok(());
        };
        let mut zero = 0u64;
        // Safety: USED_MEM_HIGH takes a u64, and only 0 (a reset).
        let r = unsafe {
            cudarc::driver::sys::cuMemPoolSetAttribute(
                pool,
                cudarc::driver::sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
                &mut zero as *mut u64 as *mut std::ffi::c_void,
            )
        };
        cu(r.result(), "resetting the memory peak")
    }

    /// The most GPU memory in use at once (bytes) since the context began or the last reset;
    /// `None` on the host emulator.
    pub fn peak_memory(&self) -> Result<Option<u64>> {
        if let Some(m) = &self.plan {
            return Ok(Some(m.high.load(std::sync::atomic::Ordering::SeqCst)));
        }
        let Some(pool) = self.pool()? else {
            return Ok(None);
        };
        let mut high = 0u64;
        // Safety: USED_MEM_HIGH is a u64.
        let r = unsafe {
            cudarc::driver::sys::cuMemPoolGetAttribute(
                pool,
                cudarc::driver::sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
                &mut high as *mut u64 as *mut std::ffi::c_void,
            )
        };
        cu(r.result(), "the memory peak")?;
        Ok(Some(high))
    }

    /// The device's (free, total) memory in bytes; `None` off a GPU.
    pub fn memory_info(&self) -> Option<(u64, u64)> {
        let c = self.cuda.as_ref()?;
        c.ctx.bind_to_thread().ok()?;
        let (free, total) = cudarc::driver::result::mem_get_info().ok()?;
        Some((free as u64, total as u64))
    }

    /// Starts timing every launch and GEMM on the stream (a no-op on the host emulator).
    pub fn profile_start(&self) -> Result<()> {
        let Some(c) = &self.cuda else { return Ok(()) };
        let start = c.event()?;
        *self.profile.lock().map_err(|_| anyhow!("profile lock"))? =
            Some(vec![("start".into(), start)]);
        Ok(())
    }

    /// Stops timing; the time by label, largest first.
    pub fn profile_end(&self) -> Result<Profile> {
        let marks = self
            .profile
            .lock()
            .map_err(|_| anyhow!("profile lock"))?
            .take()
            .unwrap_or_default();
        let mut by: std::collections::HashMap<String, (f64, usize)> = Default::default();
        for w in marks.windows(2) {
            let ms = cu(w[0].1.elapsed_ms(&w[1].1), "event time")? as f64;
            let e = by.entry(w[1].0.clone()).or_default();
            e.0 += ms;
            e.1 += 1;
        }
        let mut out: Profile = by.into_iter().map(|(k, (ms, n))| (k, ms, n)).collect();
        out.sort_by(|a, b| b.1.total_cmp(&a.1));
        Ok(out)
    }

    fn mark(&self, label: impl FnOnce() -> String) -> Result<()> {
        let Some(c) = &self.cuda else { return Ok(()) };
        let mut p = self.profile.lock().map_err(|_| anyhow!("profile lock"))?;
        if let Some(marks) = p.as_mut() {
            marks.push((label(), c.event()?));
        }
        Ok(())
    }

    fn stream(&self) -> Option<&Arc<CudaStream>> {
        self.cuda.as_ref().map(|c| &c.stream)
    }

    /// Raw address of a buffer (plus `offset` elements).
    pub fn ptr<T>(&self, s: &Mem<T>, offset: usize) -> u64 {
        let base = match (s, self.stream()) {
            (Mem::Dev(d), Some(st)) => d.device_ptr(st).0,
            (Mem::Host(v), _) => v.as_ptr() as u64,
            // an address nothing reads, aligned as an allocation's
            (Mem::Planned(_), _) => 1 << 40,
            (Mem::Dev(_), None) => unreachable!("device buffer on the host emulator"),
        };
        base + (offset * std::mem::size_of::<T>()) as u64
    }

    pub fn upload<T: Elem>(&self, v: &[T]) -> Result<Mem<T>> {
        if let Some(m) = &self.plan {
            return Ok(Mem::Planned(Planned::new::<T>(v.len(), m)));
        }
        match self.stream() {
            Some(st) => {
                let m = Mem::Dev(cu(st.clone_htod(v), "upload")?);
                self.mark(|| "(upload)".into())?;
                Ok(m)
            }
            None => Ok(Mem::Host(v.to_vec())),
        }
    }

    pub fn download<T: Elem>(&self, s: &Mem<T>) -> Result<Vec<T>> {
        match (s, self.stream()) {
            (Mem::Dev(d), Some(st)) => {
                let v = cu(st.clone_dtoh(d), "download")?;
                self.mark(|| "(download)".into())?;
                cu(st.synchronize(), "synchronize")?;
                Ok(v)
            }
            (Mem::Host(v), _) => Ok(v.clone()),
            (Mem::Planned(p), _) => Ok(vec![T::default(); p.len]),
            (Mem::Dev(_), None) => unreachable!("device buffer on the host emulator"),
        }
    }

    pub fn zeros<T: Elem>(&self, n: usize) -> Result<Mem<T>> {
        if let Some(m) = &self.plan {
            return Ok(Mem::Planned(Planned::new::<T>(n, m)));
        }
        match self.stream() {
            Some(st) => Ok(Mem::Dev(alloc_err::<_, T>(
                st.alloc_zeros::<T>(n.max(1)),
                n,
            )?)),
            None => Ok(Mem::Host(vec![T::default(); n.max(1)])),
        }
    }

    /// An uninitialised buffer, for outputs whose every element is written before any is read
    /// (GEMMs with beta = 0, row kernels that write whole rows): saves a memset pass. On the
    /// host emulator it is filled with `POISON`, so an unwritten element shows.
    pub fn scratch<T: Elem>(&self, n: usize) -> Result<Mem<T>> {
        if let Some(m) = &self.plan {
            return Ok(Mem::Planned(Planned::new::<T>(n, m)));
        }
        match self.stream() {
            // Safety: only used for outputs fully written by the next kernel or GEMM (the
            // emulator's poison checks that).
            Some(st) => Ok(Mem::Dev(alloc_err::<_, T>(
                unsafe { st.alloc::<T>(n.max(1)) },
                n,
            )?)),
            None => Ok(Mem::Host(vec![T::POISON; n.max(1)])),
        }
    }

    pub fn fill_zero<T: Elem>(&self, s: &mut Mem<T>) -> Result<()> {
        match (s, self.stream()) {
            (Mem::Dev(d), Some(st)) => {
                cu(st.memset_zeros(d), "memset")?;
                self.mark(|| "(memset)".into())
            }
            (Mem::Host(v), _) => {
                v.fill(T::default());
                Ok(())
            }
            (Mem::Planned(_), _) => Ok(()),
            (Mem::Dev(_), None) => unreachable!("device buffer on the host emulator"),
        }
    }

    pub fn copy_from_host<T: Elem>(&self, src: &[T], dst: &mut Mem<T>) -> Result<()> {
        match (dst, self.stream()) {
            (Mem::Dev(d), Some(st)) => cu(st.memcpy_htod(src, d), "upload"),
            (Mem::Host(v), _) => {
                v.copy_from_slice(src);
                Ok(())
            }
            (Mem::Planned(_), _) => Ok(()),
            (Mem::Dev(_), None) => unreachable!("device buffer on the host emulator"),
        }
    }

    /// Launches `name` with `args` (device pointers as u64, scalars as their types).
    pub fn launch(&self, name: &str, grid: u32, block: u32, args: &[Arg]) -> Result<()> {
        if self.plan.is_some() {
            return Ok(());
        }
        let Some(c) = &self.cuda else {
            return crate::cuda_host::launch(name, grid.max(1), block, args);
        };
        let f = c
            .funcs
            .get(name)
            .ok_or_else(|| anyhow!("no kernel {name}"))?;
        let mut b = c.stream.launch_builder(f);
        for a in args {
            match a {
                Arg::P(p) => b.arg(p),
                Arg::I(i) => b.arg(i),
                Arg::L(l) => b.arg(l),
                Arg::F(x) => b.arg(x),
            };
        }
        let cfg = LaunchConfig {
            grid_dim: (grid.max(1), 1, 1),
            block_dim: (block, 1, 1),
            shared_mem_bytes: 0,
        };
        // Safety: argument lists match the kernel signatures in cuda_kernels.cu (the host
        // emulator checks each launch's argument types against them).
        cu(unsafe { b.launch(cfg) }, name)?;
        self.mark(|| name.to_string())
    }

    /// GPU milliseconds of each launch (name, grid, block) on `args`: each once to warm up,
    /// then the best of `reps` runs; `None` on the host emulator.
    pub fn time_launches(
        &self,
        launches: &[(String, u32, u32)],
        args: &[Arg],
        reps: usize,
    ) -> Result<Option<Vec<f64>>> {
        let Some(c) = &self.cuda else { return Ok(None) };
        for (name, grid, block) in launches {
            self.launch(name, *grid, *block, args)?;
        }
        let mut best = vec![f64::INFINITY; launches.len()];
        for _ in 0..reps {
            for ((name, grid, block), best) in launches.iter().zip(&mut best) {
                let start = c.event()?;
                self.launch(name, *grid, *block, args)?;
                let end = c.event()?;
                *best = best.min(cu(start.elapsed_ms(&end), "event time")? as f64);
            }
        }
        Ok(Some(best))
    }

    /// Elementwise launch over `n` items.
    pub fn launch_n(&self, name: &str, n: usize, args: &[Arg]) -> Result<()> {
        self.launch(name, n.div_ceil(BLOCK as usize) as u32, BLOCK, args)
    }

    /// Runs a GEMM description (see `gemm_plan`): bf16 or f32 operands, f32 accumulation, an
    /// f32 or bf16 output; in cuBLASLt when it has an algorithm for the problem, else cuBLAS.
    pub fn gemm(&self, spec: &GemmSpec) -> Result<()> {
        self.gemm_in(spec, GemmLib::CublasLt).map(|_| ())
    }

    /// The library GEMMs run in unless a problem falls back: `None` on the host emulator.
    pub fn gemm_library(&self) -> Option<GemmLib> {
        let c = self.cuda.as_ref()?;
        Some(if c.lt.is_some() {
            GemmLib::CublasLt
        } else {
            GemmLib::Cublas
        })
    }

    /// How many GEMM problems run in cuBLASLt and how many fell back to cuBLAS, so far.
    pub fn gemm_plans(&self) -> Option<(usize, usize)> {
        let (lt, _) = self.cuda.as_ref()?.lt.as_ref()?;
        Some(lt.plan_counts())
    }

    /// `gemm` in the library asked for (cuBLASLt falling back to cuBLAS as `gemm` does);
    /// the library it ran in.
    pub fn gemm_in(&self, spec: &GemmSpec, lib: GemmLib) -> Result<GemmLib> {
        if spec.a.bf16 != spec.b.bf16 {
            bail!("gemm operands of mixed precision");
        }
        if spec.c_bf16 && spec.beta != 0.0 {
            bail!("a bf16 GEMM output cannot accumulate (beta {})", spec.beta);
        }
        if self.plan.is_some() {
            return Ok(lib);
        }
        let Some(c) = &self.cuda else {
            crate::cuda_host::gemm(spec, lib)?;
            return Ok(lib);
        };
        let ran = match (&c.lt, lib) {
            // Safety: the spec's addresses lie in live buffers of this engine, sized by the
            // caller; the stream is this engine's.
            (Some((lt, _)), GemmLib::CublasLt)
                if unsafe { lt.matmul(spec, c.stream.cu_stream() as *mut _)? } =>
            {
                GemmLib::CublasLt
            }
            _ => {
                self.gemm_cublas(c, spec)?;
                GemmLib::Cublas
            }
        };
        self.mark(|| {
            format!(
                "GEMM {}{}{}",
                spec.shape(),
                if spec.a.bf16 { " bf16" } else { " f32" },
                if ran == GemmLib::Cublas {
                    " (cuBLAS)"
                } else {
                    ""
                }
            )
        })?;
        Ok(ran)
    }

    fn gemm_cublas(&self, c: &Cuda, spec: &GemmSpec) -> Result<()> {
        if let Some((to, from, bytes)) = gemm_plan::cublas_c_copy(spec).map_err(|e| anyhow!(e))? {
            // Safety: both ranges lie in live buffers of the spec's output extent.
            cu(
                unsafe {
                    cudarc::driver::result::memcpy_dtod_async(to, from, bytes, c.stream.cu_stream())
                },
                "copying C",
            )?;
        }
        let ty = if spec.a.bf16 {
            cudaDataType_t::CUDA_R_16BF
        } else {
            cudaDataType_t::CUDA_R_32F
        };
        let op = |t: bool| {
            if t {
                cublasOperation_t::CUBLAS_OP_T
            } else {
                cublasOperation_t::CUBLAS_OP_N
            }
        };
        let a = cublas_args(spec);
        // Safety: the addresses come from live buffers of this engine, sized by the caller.
        let status = unsafe {
            cudarc::cublas::sys::cublasGemmStridedBatchedEx(
                *c.blas.handle(),
                op(a.trans_a),
                op(a.trans_b),
                a.m as i32,
                a.n as i32,
                a.k as i32,
                &spec.alpha as *const f32 as *const _,
                a.a as *const _,
                ty,
                a.lda as i32,
                a.stride_a as i64,
                a.b as *const _,
                ty,
                a.ldb as i32,
                a.stride_b as i64,
                &spec.beta as *const f32 as *const _,
                a.c as *mut _,
                if spec.c_bf16 {
                    cudaDataType_t::CUDA_R_16BF
                } else {
                    cudaDataType_t::CUDA_R_32F
                },
                a.ldc as i32,
                a.stride_c as i64,
                a.batch as i32,
                cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        };
        if status != cudarc::cublas::sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
            bail!("cuBLAS GEMM {} failed: {status:?}", spec.shape());
        }
        Ok(())
    }
}

/// A kernel argument.
#[derive(Clone, Copy)]
pub enum Arg {
    P(u64),
    I(i32),
    L(i64),
    F(f32),
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
    probs: Probs,
    att: Act,
    /// `norm_after` blocks: attn_out's output (attn_norm's input) and its statistics.
    attn_post: Option<(Mem<f32>, Stats)>,
    x_mid: Mem<f32>,
    ln2: Option<(Act, Stats)>,
    ff_in: Act,
    ff_act: Act,
    ff_post: Option<(Mem<f32>, Stats)>,
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
        if bf16 && gpu.cuda.is_some() && gpu.arch < (8, 0) {
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
            self.gpu.launch_n(
                "cast_bf16",
                n,
                &[
                    Arg::P(self.gpu.ptr(&self.params, 0)),
                    Arg::P(self.gpu.ptr(bf, 0)),
                    Arg::L(n as i64),
                ],
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
        self.gpu.launch_n(
            "cast_bf16",
            s.len(),
            &[
                Arg::P(self.gpu.ptr(s, 0)),
                Arg::P(self.gpu.ptr(&copy, 0)),
                Arg::L(s.len() as i64),
            ],
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
        self.gpu.launch_n(
            name,
            rows * heads * half,
            &[
                Arg::P(self.out_buf(qkv).ptr),
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
        self.gpu.launch_n(
            name,
            rows * h,
            &[
                Arg::P(self.out_buf(x).ptr),
                Arg::P(self.out_buf(&y).ptr),
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
        self.gpu.launch_n(
            name,
            rows * h,
            &[
                Arg::P(self.out_buf(dy).ptr),
                Arg::P(self.out_buf(x).ptr),
                Arg::P(self.out_buf(&dx).ptr),
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
        // only a GEMM operand: bf16 under mixed precision
        let att = self.operand_out(n * d)?;
        let qp = self.heads(&qkv, n)?;
        let probs = if self.flash {
            self.flash_forward(qp.buf.ptr, &att, (b, t), starts)?
        } else {
            self.materialised_forward(qp.buf, &att, (b, t), starts)?
        };
        drop(qp);
        let (x_mid, attn_post) = self.join(att.src(), (o.attn_out, (n, d, d)), o.attn_norm, x)?;
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
            probs,
            att,
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
            let (x_out, acts) = self.layer_forward(&x, o, (b, t), starts)?;
            let x_in = std::mem::replace(&mut x, x_out);
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
            let da = self.post_norm_back(&dx, &a.attn_post, o.attn_norm, n)?;
            // dO: only an operand (of attention's GEMMs or flash kernels), so bf16 under mixed
            // precision, written so by its GEMM
            let dout = da.as_ref().unwrap_or(&dx);
            let datt = self.linear_back(dout.into(), a.att.src(), o.attn_out, (n, d, d), true)?;
            drop(da);
            // only a GEMM operand after the inverse RoPE: bf16 under mixed precision
            let repeated = self.repeats_kv();
            let dheads = self.operand_out(n * if repeated { 3 * d } else { w })?;
            let dop = self.operand(datt.src())?;
            let qp = self.heads(&a.qkv, n)?;
            match &a.probs {
                Probs::Lse(lse) => {
                    self.flash_backward(qp.buf.ptr, &dop, (&a.att, lse), &dheads, (b, t), starts)?
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
    /// libnccl, gradients are summed through the host instead, and this says so.
    pub fn enable_nccl(&mut self, tcp: &mut crate::dist::Tcp) -> Result<()> {
        if !unsafe { cudarc::nccl::sys::is_culib_present() } {
            eprintln!(
                "olmo-train: libnccl not found: gradients are summed through the host (slow)"
            );
            return Ok(());
        }
        let mut bytes = if tcp.rank == 0 {
            let id = cu(cudarc::nccl::Id::new(), "NCCL id")?;
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
        let comm = cu(
            cudarc::nccl::Comm::from_rank(
                stream,
                tcp.rank,
                tcp.size,
                cudarc::nccl::Id::uninit(raw),
            ),
            "NCCL communicator",
        )?;
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
                cu(
                    comm.all_reduce_in_place(g, &cudarc::nccl::ReduceOp::Sum),
                    "NCCL all-reduce",
                )?;
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

/// Dense bf16 tensor-core peak by GPU name (half the sparse figure vendors quote), per GPU.
/// The name is matched by whole words, as the driver spells them ("NVIDIA H100 PCIe",
/// "NVIDIA A100-SXM4-80GB"), so an L40 is not taken for an L40S nor an A10G for an A10; the
/// PCIe and NVL forms of a part run at lower clocks than its SXM form. Unlisted parts give
/// `None` (no MFU unless `speed_monitor.gpu_flops_available` says).
pub fn peak_bf16_flops(name: &str) -> Option<f64> {
    let words: Vec<String> = name
        .split(|c: char| c.is_whitespace() || c == '-' || c == '_')
        .map(|w| w.to_ascii_uppercase())
        .collect();
    let has = |w: &str| words.iter().any(|x| x == w);
    let (pcie, nvl) = (has("PCIE"), has("NVL"));
    let tflops = words.iter().find_map(|w| {
        Some(match w.as_str() {
            "H100" | "H800" if pcie => 756.0,
            "H100" | "H200" if nvl => 835.0,
            "H100" | "H200" | "H800" | "GH200" => 989.4,
            "H20" => 148.0,
            "B200" => 2250.0,
            "B100" => 1750.0,
            "GB200" => 2500.0,
            "A100" | "A800" => 312.0,
            "A30" => 165.0,
            "A10" => 125.0,
            "L40S" => 362.0,
            "L40" => 181.0,
            "L4" => 121.0,
            // workstation parts accumulate bf16 products in f32 at full rate
            "A6000" => 154.8,
            "6000" if has("ADA") => 364.2,
            // GeForce parts do so at half their fp16-accumulate rate; the 4090 D and 3090 Ti
            // differ from these
            "4090" if !has("D") => 165.2,
            "3090" if !has("TI") => 71.0,
            _ => return None,
        })
    })?;
    Some(tflops * 1e12)
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

/// The kernels as NVRTC compiled them for one GPU architecture: the PTX, and the GPU code
/// (CUBIN) that NVRTC also makes for a real architecture such as `sm_90`.
#[derive(Clone)]
pub struct KernelImages {
    pub ptx: Vec<u8>,
    pub cubin: Option<Vec<u8>>,
    /// NVRTC's (major, minor) version.
    pub nvrtc: (i32, i32),
}

/// The kernels for a compute capability, compiled once per process.
fn images_for(arch: (i32, i32)) -> Result<KernelImages> {
    type Cache = Vec<((i32, i32), KernelImages)>;
    static CACHE: std::sync::Mutex<Cache> = std::sync::Mutex::new(Vec::new());
    let mut cache = CACHE.lock().map_err(|_| anyhow!("kernel cache poisoned"))?;
    if let Some((_, k)) = cache.iter().find(|(a, _)| *a == arch) {
        return Ok(k.clone());
    }
    let k = compile_kernels(&format!("sm_{}{}", arch.0, arch.1))?;
    cache.push((arch, k.clone()));
    Ok(k)
}

/// Compiles the kernels with NVRTC for `arch` (e.g. `sm_90`); needs no GPU, NVRTC is a plain
/// library.
pub fn compile_kernels(arch: &str) -> Result<KernelImages> {
    use cudarc::nvrtc::{result, sys};
    struct Program(sys::nvrtcProgram);
    impl Drop for Program {
        fn drop(&mut self) {
            // Safety: created by create_program, destroyed once.
            let _ = unsafe { result::destroy_program(self.0) };
        }
    }
    let src = std::ffi::CString::new(SOURCE)?;
    let prog = Program(
        result::create_program(&src, Some(c"olmo_train_kernels.cu"))
            .map_err(|e| anyhow!("NVRTC: creating the program: {e:?}"))?,
    );
    let opts = [format!("--gpu-architecture={arch}")];
    // Safety: prog is a live program; the images are read after a successful compile.
    unsafe {
        if let Err(e) = result::compile_program(prog.0, &opts) {
            let log: Vec<u8> = result::get_program_log(prog.0)
                .unwrap_or_default()
                .iter()
                .map(|&c| c as u8)
                .take_while(|&c| c != 0)
                .collect();
            let log = String::from_utf8_lossy(&log);
            bail!("NVRTC could not compile the kernels for {arch}: {e:?}\n{log}");
        }
        let ptx = result::get_ptx(prog.0).map_err(|e| anyhow!("NVRTC: the PTX: {e:?}"))?;
        let ptx = ptx.iter().map(|&c| c as u8).collect();
        let mut size = 0usize;
        let cubin = (sys::nvrtcGetCUBINSize(prog.0, &mut size) == sys::nvrtcResult::NVRTC_SUCCESS
            && size > 0)
            .then(|| {
                let mut v = vec![0u8; size];
                (sys::nvrtcGetCUBIN(prog.0, v.as_mut_ptr().cast())
                    == sys::nvrtcResult::NVRTC_SUCCESS)
                    .then_some(v)
            })
            .flatten();
        let (mut major, mut minor) = (0, 0);
        sys::nvrtcVersion(&mut major, &mut minor);
        Ok(KernelImages {
            ptx,
            cubin,
            nvrtc: (major, minor),
        })
    }
}

/// Loads the kernels: their CUBIN if the driver takes it, else their PTX. The CUBIN needs no
/// JIT, so it loads where the driver is older than NVRTC (within a CUDA major version), which
/// rejects that NVRTC's PTX as a newer ISA. The PTX serves where the CUBIN fails to load for
/// any other reason.
fn load_kernels(
    ctx: &Arc<CudaContext>,
    arch: (i32, i32),
) -> Result<Arc<cudarc::driver::CudaModule>> {
    let k = images_for(arch)?;
    let cubin_err = match &k.cubin {
        Some(c) => match ctx.load_module(cudarc::nvrtc::Ptx::from_binary(c.clone())) {
            Ok(m) => return Ok(m),
            Err(e) => Some(e),
        },
        None => None,
    };
    let ptx = std::ffi::CStr::from_bytes_until_nul(&k.ptx)
        .map_err(|_| anyhow!("NVRTC's PTX has no terminating NUL"))?
        .to_string_lossy()
        .into_owned();
    match ctx.load_module(cudarc::nvrtc::Ptx::from_src(ptx)) {
        Ok(m) => {
            if let Some(e) = cubin_err {
                eprintln!(
                    "note: the kernels' CUBIN from NVRTC {}.{} did not load ({e:?}); they run from PTX (JIT-compiled by the driver)",
                    k.nvrtc.0, k.nvrtc.1
                );
            }
            Ok(m)
        }
        Err(e) => {
            let mut driver = 0;
            // Safety: a plain query of the loaded driver.
            unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut driver) };
            bail!(
                "CUDA: the driver refused the kernels (sm_{}{}): CUBIN: {}; PTX: {e:?}. NVRTC is {}.{}, the driver supports CUDA {}.{}: the driver takes PTX from an NVRTC no newer than itself, and a CUBIN from one of its CUDA major version; put such an NVRTC first on LD_LIBRARY_PATH",
                arch.0,
                arch.1,
                cubin_err.map_or_else(|| "none made".into(), |c| format!("{c:?}")),
                k.nvrtc.0,
                k.nvrtc.1,
                driver / 1000,
                driver % 1000 / 10
            )
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

    #[test]
    fn bf16_peaks_follow_the_part_and_its_form() {
        let tf = |name: &str| super::peak_bf16_flops(name).map(|f| (f / 1e12).round());
        for (name, want) in [
            ("NVIDIA H200", Some(989.0)),
            ("NVIDIA H100 80GB HBM3", Some(989.0)),
            ("NVIDIA H100 PCIe", Some(756.0)),
            ("NVIDIA H100 NVL", Some(835.0)),
            ("NVIDIA H200 NVL", Some(835.0)),
            ("NVIDIA GH200 480GB", Some(989.0)),
            ("NVIDIA A100-SXM4-80GB", Some(312.0)),
            ("NVIDIA A100 80GB PCIe", Some(312.0)),
            ("NVIDIA A10", Some(125.0)),
            ("NVIDIA A10G", None),
            ("NVIDIA L40S", Some(362.0)),
            ("NVIDIA L40", Some(181.0)),
            ("NVIDIA L4", Some(121.0)),
            ("NVIDIA B200", Some(2250.0)),
            ("Tesla T4", None),
            ("NVIDIA GeForce RTX 4090", Some(165.0)),
            ("NVIDIA GeForce RTX 4090 D", None),
            ("NVIDIA GeForce RTX 3090", Some(71.0)),
            ("NVIDIA GeForce RTX 3090 Ti", None),
            ("NVIDIA RTX A6000", Some(155.0)),
            ("NVIDIA RTX 6000 Ada Generation", Some(364.0)),
            ("Quadro RTX 6000", None),
            ("CUDA stand-in (host emulation)", None),
        ] {
            assert_eq!(tf(name), want, "{name}");
        }
    }

    /// Runs where libnvrtc is loadable (CI installs it from PyPI; a GPU is not needed).
    #[test]
    fn kernels_compile_with_nvrtc_for_hopper_ampere_and_turing() {
        if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
            eprintln!("skipped: libnvrtc is not loadable here (LD_LIBRARY_PATH)");
            return;
        }
        for arch in ["sm_75", "sm_80", "sm_90"] {
            let k = super::compile_kernels(arch).unwrap();
            let ptx = String::from_utf8_lossy(&k.ptx);
            assert!(ptx.contains(".entry flash_fwd_128"), "{arch}: PTX");
            // GPU code for the real architecture, which loads without the driver's JIT
            let cubin = k.cubin.expect("a CUBIN");
            assert_eq!(&cubin[..4], b"\x7fELF", "{arch}: CUBIN");
            assert!(k.nvrtc.0 >= 11, "NVRTC {:?}", k.nvrtc);
        }
    }
}
