//! The whole CUDA engine (its buffers, offsets, kernel argument lists, launch shapes, GEMM
//! descriptions, mixed precision and optimizer step) run on the host emulator and compared with
//! the CPU engine: the same table `olmo-train gpu-check` prints on a GPU, with the same
//! tolerances. Only the GPU itself (NVRTC-compiled code, cuBLAS, memory) is left out.

use olmo_train::backend::{Backend, Cpu};
use olmo_train::cuda::{CudaEngine, FlashBlocks};
use olmo_train::gpu::Gpu;
use olmo_train::gpu_check::{compare_engines, variants};
use olmo_train::model::{init_params, Batch, Init, InitFn, Model};
use olmo_train::ops::IGNORE;

/// `n` input ids and targets below a 100-token vocabulary, the targets at positions
/// `ignored` says IGNORE.
fn tokens(n: usize, ignored: impl Fn(usize) -> bool) -> (Vec<u32>, Vec<u32>) {
    let inputs = (0..n).map(|i| (i * 7 % 100) as u32).collect();
    let targets = (0..n)
        .map(|i| match ignored(i) {
            true => IGNORE,
            false => (i * 3 % 100) as u32,
        })
        .collect();
    (inputs, targets)
}

#[test]
fn cuda_engine_on_the_host_emulator_matches_the_cpu_engine() {
    let ok = compare_engines(
        &|m, state, bf16| CudaEngine::on(Gpu::host_emulator(), m, state, bf16),
        // head size 32: the flash kernels' rows run too; 40 positions: partial blocks
        &variants(128, 100),
        (2, 40),
        &[false, true],
    )
    .unwrap();
    assert!(ok, "see the table above (cargo test -- --nocapture)");
}

#[test]
fn wide_flash_blocks_on_the_host_emulator_match_the_cpu_engine() {
    // the launch shapes of the wide flash kernels (128 query rows, 64 keys) checked against
    // their work; 40 positions: one partial block of each
    let ok = compare_engines(
        &|m, state, bf16| {
            let mut e = CudaEngine::on(Gpu::host_emulator(), m, state, bf16)?;
            e.set_flash_blocks(FlashBlocks::Wide);
            Ok(e)
        },
        &variants(128, 100),
        (2, 40),
        &[true],
    )
    .unwrap();
    assert!(ok, "see the table above (cargo test -- --nocapture)");
}

#[test]
fn padded_multiple_choice_batches_score_alike() {
    // right padding and ignored targets, as the downstream evaluator sends them
    let [(_, cfg), ..] = variants(32, 100);
    let params = init_params(&cfg, &Init::new(InitFn::Mitchell, 0.02), 3);
    let n = params.len();
    let zeros = vec![0.0; n];
    let mut gpu = CudaEngine::on(
        Gpu::host_emulator(),
        Model::new(cfg, 16),
        [&params, &zeros, &zeros],
        false,
    )
    .unwrap();
    let mut cpu = Cpu::new(Model::new(cfg, 16), params, zeros.clone(), zeros);
    let (inputs, targets) = tokens(2 * 10, |i| i % 10 < 6);
    let batch = Batch {
        inputs: &inputs,
        targets: &targets,
        b: 2,
        t: 10,
        doc_starts: None,
    };
    let (a, b) = (gpu.forward(&batch).unwrap(), cpu.forward(&batch).unwrap());
    assert_eq!(a.count, b.count);
    for (x, y) in a.logprobs.iter().zip(&b.logprobs) {
        assert!((x - y).abs() < 1e-5, "{x} vs {y}");
    }
}

#[test]
fn engines_hold_only_the_moments_their_optimizer_needs() {
    use olmo_train::backend::Update;
    use olmo_train::optim::{AdamW, LionW, Optimizer};
    let [(_, cfg), ..] = variants(32, 100);
    let params = init_params(&cfg, &Init::new(InitFn::Normal, 0.02), 3);
    let n = params.len();
    let zeros = vec![0.0; n];
    let decay = vec![true; Model::new(cfg, 8).layout.tensors.len()];
    let update = |optimizer| Update {
        step: 1,
        lr: 1e-3,
        max_norm: Some(1.0),
        coefs: None,
        optimizer,
        decay: &decay,
    };
    let lion = Optimizer::LionW(LionW {
        beta1: 0.9,
        beta2: 0.99,
        weight_decay: 0.0,
    });
    let adam = Optimizer::AdamW(AdamW {
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.0,
    });
    let (inputs, targets) = tokens(16, |_| false);
    let batch = Batch {
        inputs: &inputs,
        targets: &targets,
        b: 2,
        t: 8,
        doc_starts: None,
    };
    let engines: Vec<Box<dyn Backend>> = vec![
        Box::new(
            CudaEngine::on(
                Gpu::host_emulator(),
                Model::new(cfg, 8),
                [&params, &zeros, &[]],
                false,
            )
            .unwrap(),
        ),
        Box::new(Cpu::new(
            Model::new(cfg, 8),
            params.clone(),
            zeros.clone(),
            Vec::new(),
        )),
    ];
    for mut e in engines {
        // LionW without a second moment steps, and saves none
        e.forward_backward(&batch, 1.0).unwrap();
        e.step(&update(lion)).unwrap();
        e.with_state(&mut |p, m, v| {
            assert!(p != params.as_slice() && m.iter().any(|&x| x != 0.0) && v.is_empty());
            Ok(())
        })
        .unwrap();
        let err = e.step(&update(adam)).unwrap_err().to_string();
        assert!(err.contains("AdamW needs a second moment"), "{err}");
    }
    // an engine built to evaluate holds no moments at all, and refuses to step
    let mut eval = CudaEngine::on(
        Gpu::host_emulator(),
        Model::new(cfg, 8),
        [&params, &[], &[]],
        true,
    )
    .unwrap();
    eval.forward(&batch).unwrap();
    let err = eval.step(&update(lion)).unwrap_err().to_string();
    assert!(err.contains("built to evaluate"), "{err}");
}

#[test]
fn checkpointed_layers_on_the_host_emulator_give_the_same_bits() {
    use olmo_train::model::Checkpointing;
    // gpu-check's variants with 3 layers (so one_in_two keeps one and computes two again), head
    // size 32 (the flash kernels run), grouped-query attention in two of them; documents
    for (name, cfg) in variants(128, 100) {
        let cfg = olmo_train::model::ModelConfig { n_layers: 3, ..cfg };
        let params = init_params(&cfg, &Init::new(InitFn::Mitchell, 0.02), 7);
        let zeros = vec![0.0; params.len()];
        let (b, t) = (2, 24);
        let (inputs, targets) = tokens(b * t, |_| false);
        let starts = olmo_train::ops::document_starts(&inputs, t, 0);
        assert!(starts.iter().any(|&s| s > 0), "no document boundary");
        let batch = Batch {
            inputs: &inputs,
            targets: &targets,
            b,
            t,
            doc_starts: Some(&starts),
        };
        for (bf16, flash) in [(false, false), (true, false), (true, true)] {
            let run = |c: Checkpointing| {
                let model = Model::new(cfg, t).with_checkpointing(c);
                let state = [params.as_slice(), &zeros, &zeros];
                let mut e = CudaEngine::on(Gpu::host_emulator(), model, state, bf16).unwrap();
                e.set_flash_attention(flash).unwrap();
                let s = e.forward_backward(&batch, 1.0 / 48.0).unwrap();
                (s.ce_sum, s.logprobs, e.grads().unwrap())
            };
            let plain = run(Checkpointing::Off);
            assert!(plain.2.iter().any(|&g| g != 0.0));
            let strategies = [
                Checkpointing::WholeLayer,
                Checkpointing::OneIn(2),
                Checkpointing::FineGrained,
            ];
            for c in strategies {
                assert!(
                    run(c) == plain,
                    "{name}, bf16 {bf16}, flash {flash}: {} changes the results",
                    c.name()
                );
            }
        }
    }
}

#[test]
fn logits_a_chunk_of_rows_at_a_time_score_and_train_alike() {
    // 48 rows in chunks of 20: two whole chunks and a partial one; tied and untied heads
    for (name, cfg) in &variants(64, 100)[..2] {
        let params = init_params(cfg, &Init::new(InitFn::Mitchell, 0.02), 11);
        let zeros = vec![0.0; params.len()];
        let (b, t) = (2, 24);
        let (inputs, targets) = tokens(b * t, |i| i % 9 == 4);
        let batch = Batch {
            inputs: &inputs,
            targets: &targets,
            b,
            t,
            doc_starts: None,
        };
        for bf16 in [false, true] {
            let run = |rows: Option<usize>| {
                let model = Model::new(*cfg, t);
                let state = [params.as_slice(), &zeros, &zeros];
                let mut e = CudaEngine::on(Gpu::host_emulator(), model, state, bf16).unwrap();
                e.set_head_rows(rows);
                let s = e.forward_backward(&batch, 1.0 / 48.0).unwrap();
                (s, e.grads().unwrap())
            };
            let ((whole, g), (chunked, gc)) = (run(None), run(Some(20)));
            // each row's logits, loss and dx do not depend on the chunk it is in
            assert!(whole.logprobs == chunked.logprobs, "{name}, bf16 {bf16}");
            assert_eq!((whole.ce_sum, whole.count), (chunked.ce_sum, chunked.count));
            // the head's gradient sums the chunks' parts: the same to rounding; the rest is
            // the same bits
            let layout = Model::new(*cfg, t).layout;
            let head = layout.head.unwrap_or(layout.wte);
            let range = head..head + cfg.embedding_size * cfg.d_model;
            let (mut num, mut den) = (0.0f64, 0.0f64);
            for (i, (a, c)) in g.iter().zip(&gc).enumerate() {
                if range.contains(&i) {
                    num += ((a - c) as f64).powi(2);
                    den += (*a as f64).powi(2);
                } else {
                    assert!(a.to_bits() == c.to_bits(), "{name}, bf16 {bf16}: param {i}");
                }
            }
            assert!(
                den > 0.0 && (num / den).sqrt() < 1e-6,
                "{name}, bf16 {bf16}"
            );
        }
    }
}
