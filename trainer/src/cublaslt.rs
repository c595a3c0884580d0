//! GEMMs in cuBLASLt: `GemmSpec`s (see `gemm_plan`) run through `cublasLtMatmul`, each problem
//! planned once (descriptors, and the heuristic's algorithm for the operands' real
//! alignment). Only raw addresses cross this module, so a test can run it against a stand-in
//! library that checks the calls against cuBLASLt's documented contract
//! (`tests/cublaslt_mock.c`) without a GPU.

use anyhow::{anyhow, Result};
use cudarc::cublas::sys::cublasOperation_t;
use cudarc::cublaslt::{result as lt_result, sys as lt_sys};

use crate::gemm_plan::{lt_args, GemmSpec, LtLayout};

/// cuBLASLt: a handle, a workspace, and a plan (descriptors and algorithm) per problem.
pub struct Lt {
    handle: lt_sys::cublasLtHandle_t,
    workspace: u64,
    workspace_size: usize,
    /// `None` for a problem cuBLASLt has no algorithm for (it runs in cuBLAS).
    plans: std::sync::Mutex<std::collections::HashMap<LtKey, Option<LtPlan>>>,
}

/// What a plan depends on: everything in the arguments but the addresses and the scalars.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct LtKey {
    trans: (bool, bool),
    layouts: [LtLayout; 3],
    batch: usize,
    align: [u32; 4],
}

struct LtPlan {
    desc: lt_sys::cublasLtMatmulDesc_t,
    layouts: [lt_sys::cublasLtMatrixLayout_t; 3],
    algo: lt_sys::cublasLtMatmulAlgo_t,
}

// Safety: the descriptors are plain host objects, used under the plans' lock or read-only.
unsafe impl Send for LtPlan {}
unsafe impl Send for Lt {}
unsafe impl Sync for Lt {}

impl Drop for LtPlan {
    fn drop(&mut self) {
        // Safety: created by `LtPlan::new`, destroyed once.
        unsafe {
            let _ = lt_result::destroy_matmul_desc(self.desc);
            for l in self.layouts.into_iter().filter(|l| !l.is_null()) {
                let _ = lt_result::destroy_matrix_layout(l);
            }
        }
    }
}

impl Drop for Lt {
    fn drop(&mut self) {
        if let Ok(p) = self.plans.get_mut() {
            p.clear();
        }
        // Safety: the handle outlives every plan, which are gone.
        unsafe {
            let _ = lt_result::destroy_handle(self.handle);
        }
    }
}

fn lt_err(what: &str, e: lt_result::CublasError) -> anyhow::Error {
    anyhow!("cuBLASLt: {what}: {:?}", e.0)
}

impl Lt {
    /// A handle whose GEMMs use `workspace_size` bytes of device memory at `workspace`, which
    /// the caller keeps alive as long as the handle.
    pub fn new(workspace: u64, workspace_size: usize) -> Result<Lt> {
        let handle = lt_result::create_handle().map_err(|e| lt_err("creating the handle", e))?;
        Ok(Lt {
            handle,
            workspace,
            workspace_size,
            plans: Default::default(),
        })
    }

    /// Runs `spec` on `stream`, with the plan made for its problem the first time it is seen;
    /// false, without running it, when the heuristic has no algorithm for the problem (said
    /// once per problem), for the caller to run it elsewhere.
    ///
    /// # Safety
    /// The spec's addresses must lie in live device buffers covering its extents, and
    /// `stream` must be a stream of the context the handle was made in (or null).
    pub unsafe fn matmul(&self, spec: &GemmSpec, stream: *mut std::ffi::c_void) -> Result<bool> {
        let a = lt_args(spec);
        let key = LtKey {
            trans: (a.trans_a, a.trans_b),
            layouts: [a.a_layout, a.b_layout, a.cd_layout],
            batch: a.batch,
            align: a.alignments(),
        };
        let mut plans = self
            .plans
            .lock()
            .map_err(|_| anyhow!("cuBLASLt plans lock"))?;
        let plan = plans.entry(key).or_insert_with(|| match LtPlan::new(self, &key) {
            Ok(p) => Some(p),
            Err(e) => {
                eprintln!(
                    "note: cuBLASLt has no algorithm for the GEMM {} (alignments {:?}): {:?}; it runs in cuBLAS",
                    spec.shape(),
                    key.align,
                    e.0
                );
                None
            }
        });
        let Some(plan) = plan else { return Ok(false) };
        let [la, lb, lc] = plan.layouts;
        // Safety: as the caller promises; the plan was made for exactly these layouts and
        // alignments.
        unsafe {
            lt_result::matmul(
                self.handle,
                plan.desc,
                &spec.alpha as *const f32 as *const _,
                &spec.beta as *const f32 as *const _,
                a.a as *const _,
                la,
                a.b as *const _,
                lb,
                a.c as *const _,
                lc,
                a.d as *mut _,
                lc,
                &plan.algo,
                self.workspace as *mut _,
                self.workspace_size,
                stream as _,
            )
        }
        .map_err(|e| anyhow!("cuBLASLt GEMM {} failed: {:?}", spec.shape(), e.0))?;
        Ok(true)
    }

    /// How many problems have a plan (cuBLASLt algorithm), and how many fell back.
    pub fn plan_counts(&self) -> (usize, usize) {
        let plans = self.plans.lock().map(|p| {
            let with = p.values().filter(|v| v.is_some()).count();
            (with, p.len() - with)
        });
        plans.unwrap_or_default()
    }
}

impl LtPlan {
    /// Descriptors for `key` and the heuristic's best algorithm (an error when it has none).
    fn new(lt: &Lt, key: &LtKey) -> std::result::Result<LtPlan, lt_result::CublasError> {
        use lt_sys::cublasLtMatmulDescAttributes_t as D;
        use lt_sys::cublasLtMatmulPreferenceAttributes_t as P;
        let ty = |b: bool| {
            if b {
                lt_sys::cudaDataType_t::CUDA_R_16BF
            } else {
                lt_sys::cudaDataType_t::CUDA_R_32F
            }
        };
        // f32 operands keep f32 products (no TF32): `precision: fp32` means it.
        let desc = lt_result::create_matmul_desc(
            lt_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            lt_sys::cudaDataType_t::CUDA_R_32F,
        )?;
        let mut plan = LtPlan {
            desc,
            layouts: [std::ptr::null_mut(); 3],
            algo: lt_sys::cublasLtMatmulAlgo_t { data: [0; 8] },
        };
        for (slot, l) in plan.layouts.iter_mut().zip(&key.layouts) {
            *slot = lt_result::create_matrix_layout(
                ty(l.bf16),
                l.rows as u64,
                l.cols as u64,
                l.ld as i64,
            )?;
            if key.batch > 1 {
                let (count, stride) = (key.batch as i32, l.stride as i64);
                // Safety: attribute values of the documented types and sizes.
                unsafe {
                    lt_result::set_matrix_layout_attribute(
                        *slot,
                        lt_sys::cublasLtMatrixLayoutAttribute_t::CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT,
                        &count as *const i32 as *const _,
                        4,
                    )
                    .and_then(|_| {
                        lt_result::set_matrix_layout_attribute(
                            *slot,
                            lt_sys::cublasLtMatrixLayoutAttribute_t::CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET,
                            &stride as *const i64 as *const _,
                            8,
                        )
                    })?;
                }
            }
        }
        let op = |t: bool| -> i32 {
            if t {
                cublasOperation_t::CUBLAS_OP_T as i32
            } else {
                cublasOperation_t::CUBLAS_OP_N as i32
            }
        };
        let pref = lt_result::create_matmul_pref()?;
        let found = (|| {
            // Safety: attribute values of the documented types and sizes.
            unsafe {
                for (attr, v) in [
                    (D::CUBLASLT_MATMUL_DESC_TRANSA, op(key.trans.0)),
                    (D::CUBLASLT_MATMUL_DESC_TRANSB, op(key.trans.1)),
                ] {
                    lt_result::set_matmul_desc_attribute(
                        plan.desc,
                        attr,
                        &v as *const i32 as *const _,
                        4,
                    )?;
                }
                let ws = lt.workspace_size as u64;
                lt_result::set_matmul_pref_attribute(
                    pref,
                    P::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                    &ws as *const u64 as *const _,
                    8,
                )?;
                let attrs = [
                    P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
                    P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                    P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES,
                    P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES,
                ];
                for (attr, v) in attrs.into_iter().zip(key.align) {
                    lt_result::set_matmul_pref_attribute(
                        pref,
                        attr,
                        &v as *const u32 as *const _,
                        4,
                    )?;
                }
                let [a, b, c] = plan.layouts;
                lt_result::get_matmul_algo_heuristic(lt.handle, plan.desc, a, b, c, c, pref)
            }
        })();
        // Safety: created above, destroyed once.
        unsafe {
            let _ = lt_result::destroy_matmul_pref(pref);
        }
        plan.algo = found?.algo;
        Ok(plan)
    }
}
