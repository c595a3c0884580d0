//! The CUDA engine's real GPU code path run without a GPU: cudarc's driver calls, the engine's
//! packed kernel arguments and launch shapes, its allocations, copies, memsets and events, its
//! cuBLAS and cuBLASLt calls, and the PTX NVRTC makes from `cuda_kernels.cu`. Stand-in
//! libraries take the GPU's place (see `standin/mod.rs`): kernels found in the PTX run in the
//! host emulation of the same source, GEMMs by their libraries' definitions, and every copy
//! must stay inside an allocation. The engine is compared with the CPU engine (`gpu-check`'s
//! table). The stand-ins only load in a fresh process, so the test runs itself again in one.
//! Without NVRTC (or a C/C++ compiler) it says it skipped.

mod standin;

use olmo_train::backend::Backend;
use olmo_train::cuda::CudaEngine;
use olmo_train::gpu::{Arg, GemmLib, Gpu};
use olmo_train::gpu_check::{compare_engines, gemm_table, variants, GemmDims};
use olmo_train::memory_plan;
use olmo_train::model::{init_params, Batch, Checkpointing, Init, InitFn, Model};

/// In the child: whether CUDA (the stand-ins and a real NVRTC) is usable; says why not.
fn usable() -> bool {
    match olmo_train::device::cuda_unavailable() {
        Ok(n) => {
            assert_eq!(n, 1);
            true
        }
        Err(why) if why.contains("nvrtc") => {
            println!("skipped: {why}");
            false
        }
        Err(why) => panic!("the stand-ins did not load: {why}"),
    }
}

#[test]
fn cuda_engine_through_the_driver_matches_the_cpu_engine() {
    if !standin::is_child() {
        if let Some(out) =
            standin::in_child("cuda_engine_through_the_driver_matches_the_cpu_engine")
        {
            // the kernels loaded as GPU code (no JIT), the GEMMs went through cuBLASLt
            assert!(out.contains("cuda stand-in: loaded a CUBIN of"), "{out}");
            assert!(!out.contains("run from PTX"), "{out}");
            assert!(out.contains("cublasLt mock:"), "{out}");
            assert!(!out.contains("runs in cuBLAS"), "{out}");
            assert!(
                out.contains("step's peak above the resident state"),
                "{out}"
            );
            let line = out.lines().find(|l| l.contains("step's peak")).unwrap();
            eprintln!("{line}");
        }
        return;
    }
    if !usable() {
        return;
    }
    // gpu-check's three variants, small (every CUDA thread is a host thread here): two heads of
    // 32, the smallest the flash kernels are built for, read by 2 kv heads or, where the
    // variant says 1, one (multi-query); 20 positions: partial blocks
    let models = variants(64, 64).map(|(name, mut cfg)| {
        cfg.n_heads = 2;
        cfg.n_kv_heads = cfg.n_kv_heads.min(2);
        (name, cfg)
    });
    let ok = compare_engines(
        &|m, [p, e, v], bf16| CudaEngine::with_precision(0, m, p, e, v, bf16),
        &models,
        (1, 20),
        &[false, true],
    )
    .unwrap();
    assert!(ok, "see the table above");

    // gpu-check's GEMM table: both libraries on the same operands, timed with events
    let gpu = Gpu::new(0).unwrap();
    assert_eq!(gpu.gemm_library(), Some(GemmLib::CublasLt));
    let dims = GemmDims {
        rows: 24,
        d: 16,
        h: 40,
        v: 56,
    };
    assert!(gemm_table(&gpu, dims, 2).unwrap());
    drop(gpu);

    // a profiled step: every launch and GEMM timed by events, by label
    let (_, cfg) = models[1];
    let params = init_params(&cfg, &Init::new(InitFn::Mitchell, 0.02), 5);
    let zeros = vec![0.0; params.len()];
    let mut engine = CudaEngine::new(0, Model::new(cfg, 16), &params, &zeros, &zeros).unwrap();
    let tokens: Vec<u32> = (0..2 * 16).map(|i| (i * 5 % 64) as u32).collect();
    let batch = Batch {
        inputs: &tokens,
        targets: &tokens,
        b: 2,
        t: 16,
        doc_starts: None,
    };
    engine.gpu.reset_peak_memory().unwrap();
    engine.gpu.profile_start().unwrap();
    engine.forward_backward(&batch, 1.0 / 32.0).unwrap();
    let rows = engine.gpu.profile_end().unwrap();
    // the peak counts what stayed allocated (weights, gradients, AdamW state: 4 f32 each)
    // and the step's activations on top
    let peak = engine.gpu.peak_memory().unwrap().unwrap() as usize;
    assert!(peak > 16 * params.len(), "{peak} bytes");
    let calls = |label: &str| {
        rows.iter()
            .filter(|r| r.0.starts_with(label))
            .map(|r| r.2)
            .sum::<usize>()
    };
    // per layer: 4 projections forward and 8 backward (dx, dW), the materialised attention's 2
    // per sequence forward and 4 backward; the head's 3
    assert_eq!(calls("GEMM"), 2 * (4 + 8 + 2 * 2 + 4 * 2) + 3, "{rows:?}");
    assert_eq!(calls("norm_fwd"), 2 * 2 + 1, "{rows:?}");
    assert!(
        rows.iter().all(|r| r.1 >= 0.0 && r.1.is_finite()),
        "{rows:?}"
    );
    assert_eq!(engine.gpu.gemm_plans().map(|p| p.1), Some(0));

    // activation checkpointing: the same step holds less at its peak above what stays
    // allocated, and gives the same gradients
    let step_peak = |engine: &mut CudaEngine| {
        engine.zero_grad().unwrap();
        engine.gpu.reset_peak_memory().unwrap();
        let resident = engine.gpu.peak_memory().unwrap().unwrap();
        engine.forward_backward(&batch, 1.0 / 32.0).unwrap();
        let peak = engine.gpu.peak_memory().unwrap().unwrap();
        (peak - resident, engine.grads().unwrap())
    };
    let (kept, grads) = step_peak(&mut engine);
    engine.set_checkpointing(Checkpointing::WholeLayer);
    let (again, same) = step_peak(&mut engine);
    assert!(again < kept, "{again} vs {kept} bytes");
    assert!(same == grads);
    engine.set_checkpointing(Checkpointing::FineGrained);
    let (fine, same) = step_peak(&mut engine);
    println!(
        "step's peak above the resident state: {kept} bytes, whole_layer {again}, fine_grained {fine}"
    );
    assert!(fine < kept, "{fine} vs {kept} bytes");
    assert!(same == grads);
    engine.set_checkpointing(Checkpointing::Off);
    engine.set_flash_attention(true).unwrap();
    let (flash, _) = step_peak(&mut engine);
    // the memory planner (no GPU, nothing computed) foresees those peaks to the byte
    for (checkpointing, flash, measured) in [
        (Checkpointing::Off, false, kept),
        (Checkpointing::WholeLayer, false, again),
        (Checkpointing::FineGrained, false, fine),
        (Checkpointing::Off, true, flash),
    ] {
        let setup = memory_plan::Setup {
            bf16: true,
            flash,
            moments: 2,
            documents: false,
            checkpointing,
        };
        let plan = memory_plan::training(cfg, 16, 2, &setup).unwrap();
        let foreseen = plan.peak - plan.state;
        assert_eq!(foreseen, measured, "{checkpointing:?}, flash {flash}");
    }
}

/// A driver that refuses NVRTC's CUBIN (an older CUDA major version) gets the PTX instead,
/// and says so; one that refuses both gets an error that names NVRTC's and the driver's
/// versions and what to do.
#[test]
fn kernels_load_from_ptx_where_the_driver_refuses_their_cubin() {
    if !standin::is_child() {
        if let Some(out) = standin::in_child_with(
            "kernels_load_from_ptx_where_the_driver_refuses_their_cubin",
            &[("CUDA_STANDIN_NO_CUBIN", "1")],
        ) {
            assert!(out.contains("cuda stand-in: refused a CUBIN"), "{out}");
            assert!(out.contains("note: the kernels' CUBIN from NVRTC"), "{out}");
            assert!(out.contains("they run from PTX"), "{out}");
            assert!(!out.contains("loaded a CUBIN"), "{out}");
        }
        if let Some(out) = standin::in_child_with(
            "kernels_load_from_ptx_where_the_driver_refuses_their_cubin",
            &[("CUDA_STANDIN_NO_CUBIN", "1"), ("CUDA_STANDIN_NO_PTX", "1")],
        ) {
            assert!(out.contains("refused the PTX"), "{out}");
            assert!(out.contains("refused both"), "{out}");
        }
        return;
    }
    if !usable() {
        return;
    }
    let both_refused = std::env::var_os("CUDA_STANDIN_NO_PTX").is_some();
    match Gpu::new(0) {
        Ok(gpu) => {
            assert!(!both_refused, "loaded with CUBIN and PTX refused");
            // a kernel of the PTX module runs
            let x = gpu.upload(&[3.0f32, -4.5]).unwrap();
            let y = gpu.scratch::<u16>(2).unwrap();
            let args = [Arg::P(gpu.ptr(&x, 0)), Arg::P(gpu.ptr(&y, 0)), Arg::L(2)];
            gpu.launch_n("cast_bf16", 2, &args).unwrap();
            let bf = [3.0f32, -4.5].map(|v| half::bf16::from_f32(v).to_bits());
            assert_eq!(gpu.download(&y).unwrap(), bf);
        }
        Err(e) => {
            assert!(both_refused, "{e:#}");
            let e = format!("{e:#}");
            for part in [
                "CUBIN: ",
                "PTX: ",
                "NVRTC is ",
                "the driver supports CUDA 13.0",
                "LD_LIBRARY_PATH",
            ] {
                assert!(e.contains(part), "{part:?} not in: {e}");
            }
            println!("refused both: {e}");
        }
    }
}

/// On a GPU older than Ampere (a Turing T4, sm_75) the kernels still build and load, the
/// fp32 engine runs and matches the CPU engine, and bf16 mixed precision is refused with what
/// to do instead.
#[test]
fn a_turing_gpu_runs_the_fp32_engine_and_refuses_bf16() {
    const NAME: &str = "a_turing_gpu_runs_the_fp32_engine_and_refuses_bf16";
    if !standin::is_child() {
        if let Some(out) = standin::in_child_with(NAME, &[("CUDA_STANDIN_ARCH", "75")]) {
            assert!(out.contains("cuda stand-in: loaded a CUBIN of"), "{out}");
        }
        return;
    }
    if !usable() {
        return;
    }
    let (_, cfg) = variants(64, 64)[0];
    let params = init_params(&cfg, &Init::new(InitFn::Mitchell, 0.02), 4);
    let zeros = vec![0.0; params.len()];
    let model = || Model::new(cfg, 16);
    let e = CudaEngine::with_precision(0, model(), &params, &zeros, &zeros, true)
        .err()
        .expect("bf16 refused before Ampere");
    let e = format!("{e:#}");
    assert!(e.contains("sm_75") && e.contains("precision: fp32"), "{e}");

    let mut gpu = CudaEngine::with_precision(0, model(), &params, &zeros, &zeros, false).unwrap();
    assert_eq!(gpu.gpu.arch, (7, 5));
    let mut cpu = olmo_train::backend::Cpu::new(model(), params.clone(), zeros.clone(), zeros);
    let tokens: Vec<u32> = (0..2 * 16).map(|i| (i * 11 % 64) as u32).collect();
    let batch = Batch {
        inputs: &tokens,
        targets: &tokens,
        b: 2,
        t: 16,
        doc_starts: None,
    };
    let (g, c) = (
        gpu.forward_backward(&batch, 1.0 / 32.0).unwrap(),
        cpu.forward_backward(&batch, 1.0 / 32.0).unwrap(),
    );
    let rel = (g.ce_sum - c.ce_sum).abs() / c.ce_sum.abs();
    assert!(rel < 1e-5, "loss {} vs {}", g.ce_sum, c.ce_sum);
}

/// The CUDA engine's training steps give the same bits whatever order the GPU runs blocks in
/// (no float atomics or other order-dependent sums), so a rerun or a resumed run on a GPU
/// repeats a run exactly. The emulation runs blocks in grid order, then again last to first;
/// the model has an affine norm and runs the flash kernels in bf16, in either block size.
#[test]
fn cuda_training_steps_do_not_depend_on_the_order_blocks_run_in() {
    const NAME: &str = "cuda_training_steps_do_not_depend_on_the_order_blocks_run_in";
    if !standin::is_child() {
        // blocks in grid order with each flash kernel's block size chosen by timing; last to
        // first with the narrow blocks; in grid order with the wide ones
        let envs: [&[(&str, &str)]; 3] = [
            &[],
            &[
                ("CUDA_EMU_BLOCKS_REVERSED", "1"),
                ("OLMO_TRAIN_FLASH_BLOCKS", "narrow"),
            ],
            &[("OLMO_TRAIN_FLASH_BLOCKS", "wide")],
        ];
        let outs: Vec<String> = envs
            .into_iter()
            .filter_map(|env| standin::in_child_with(NAME, env))
            .collect();
        if outs.is_empty() {
            return;
        }
        // timing chose a block size for each of the three kernels, once
        let timed = ["flash fwd ", "flash dq ", "flash dkdv "]
            .iter()
            .filter(|k| outs[0].matches(*k).count() == 1)
            .count();
        assert_eq!(timed, 3, "{}", outs[0]);
        let runs: Vec<&str> = outs
            .iter()
            .map(|out| {
                let at = out.find("state bits:").unwrap_or_else(|| panic!("{out}"));
                out[at..].lines().next().unwrap()
            })
            .collect();
        assert_eq!(
            runs[0], runs[1],
            "the order of blocks or the block size changed the result"
        );
        assert_eq!(runs[0], runs[2], "the block size changed the result");
        return;
    }
    if !usable() {
        return;
    }
    let (_, mut cfg) = variants(64, 64)[1];
    cfg.n_heads = 2;
    let decay = olmo_train::model::Layout::new(&cfg).decay_mask(false, false);
    let params = init_params(&cfg, &Init::new(InitFn::Mitchell, 0.02), 9);
    let zeros = vec![0.0; params.len()];
    let mut engine =
        CudaEngine::with_precision(0, Model::new(cfg, 24), &params, &zeros, &zeros, true).unwrap();
    engine.set_flash_attention(true).unwrap();
    // repeated tokens: the embedding gradient sums several rows per token
    let tokens: Vec<u32> = (0..2 * 24).map(|i| (i * 7 % 13) as u32).collect();
    let targets: Vec<u32> = (0..2 * 24).map(|i| (i * 5 % 64) as u32).collect();
    let batch = Batch {
        inputs: &tokens,
        targets: &targets,
        b: 2,
        t: 24,
        doc_starts: None,
    };
    let mut norms = Vec::new();
    for step in 1..=2 {
        engine.zero_grad().unwrap();
        engine.forward_backward(&batch, 1.0 / 48.0).unwrap();
        norms.push(
            engine
                .step(&olmo_train::backend::Update {
                    step,
                    lr: 1e-3,
                    max_norm: Some(1.0),
                    coefs: None,
                    optimizer: olmo_train::optim::Optimizer::AdamW(olmo_train::optim::AdamW {
                        beta1: 0.9,
                        beta2: 0.95,
                        eps: 1e-8,
                        weight_decay: 0.1,
                    }),
                    decay: &decay,
                })
                .unwrap()
                .to_bits(),
        );
    }
    for c in engine.flash_choices() {
        println!(
            "flash {} {}x{}: wide {} {:?}",
            c.kind, c.b, c.t, c.wide, c.ms
        );
    }
    let hash = olmo_train::gpu_check::state_hash(&mut engine).unwrap();
    println!("state bits: {hash:016x}, gradient norms {norms:?}");
}
