//! The GPU the CUDA engine runs on: its buffers (device memory; host memory on the host
//! emulator; sizes only on the memory planner), kernel launches, GEMMs in cuBLASLt or cuBLAS,
//! profiling, and the kernels themselves, compiled at run time by NVRTC for the present GPU.
//! Nothing CUDA is linked: cudarc loads the driver, NVRTC and cuBLAS(Lt) when a `Gpu` is made.

use std::sync::Arc;

use anyhow::{anyhow, bail, Result};
use cudarc::cublas::sys::{
    cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType_t,
};
use cudarc::cublas::CudaBlas;
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, LaunchConfig, PushKernelArg,
};

use crate::cublaslt::Lt;
use crate::gemm_plan::{self, cublas_args, GemmSpec};

const SOURCE: &str = include_str!("cuda_kernels.cu");
/// Threads per block of the element-wise kernels.
pub(crate) const BLOCK: u32 = 256;

/// Elements per thread of the elementwise kernels that move 16-byte vectors (SwiGLU, RoPE,
/// `cast_bf16`): a vector of bf16 (8) or f32 (4) elements when every count splits into whole
/// vectors and every address is 16-byte aligned, else 1. The kernels make the same test
/// (`vec16_ok` in cuda_kernels.cu), so the grid and the kernel agree.
pub(crate) fn vec_width(bf16: bool, counts: &[usize], ptrs: &[u64]) -> usize {
    let v = if bf16 { 8 } else { 4 };
    let whole = counts.iter().all(|c| c % v == 0);
    let aligned = ptrs.iter().all(|p| p % 16 == 0);
    if whole && aligned {
        v
    } else {
        1
    }
}

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

pub(crate) fn cu<T, E: std::fmt::Debug>(r: std::result::Result<T, E>, what: &str) -> Result<T> {
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

    /// Whether launches run on a GPU (not the host emulator or the memory planner).
    pub fn on_device(&self) -> bool {
        self.cuda.is_some()
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

    /// The stream every launch and GEMM runs on (none off a GPU); NCCL runs on it too.
    pub(crate) fn stream(&self) -> Option<&Arc<CudaStream>> {
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
