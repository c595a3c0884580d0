//! End to end from documents to a trained model: `dolma train-tokenizer` and `dolma tokenize`
//! on the committed sample corpus, then a short `olmo-train` run (the library, in process)
//! that must bring held-out perplexity well below the unigram baseline.

mod common;

use common::*;

#[test]
fn tiny_model_beats_the_unigram_baseline_on_held_out_sample_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let docs = repo().join("tests/data/sample/documents/*/*.json.gz");
    let tok = d.join("tokenizer.json");
    let o = dolma(&[
        "train-tokenizer",
        "--documents",
        docs.to_str().unwrap(),
        "--vocab_size",
        "2048",
        "--output",
        tok.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let cfg = d.join("tokenize.yaml");
    std::fs::write(
        &cfg,
        format!(
            "documents: ['{}']\ndestination: {}\ntokenizer:\n  name_or_path: {}\n  eos_token_id: 0\n  pad_token_id: 1\n\
             dtype: uint16\nseed: 3920\nmax_size: 250000\nprocesses: 2\n",
            docs.display(),
            d.join("tokens").display(),
            tok.display()
        ),
    )
    .unwrap();
    let o = dolma(&["-c", cfg.to_str().unwrap(), "tokenize"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let mut files: Vec<_> = std::fs::read_dir(d.join("tokens"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "npy"))
        .collect();
    files.sort();
    assert!(files.len() >= 3, "{files:?}");
    // the first file is held out, the others are trained on
    let held_out = files.remove(0);
    let list = |fs: &[std::path::PathBuf]| {
        fs.iter()
            .map(|p| format!("'{}'", p.display()))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let run = d.join("run");
    let text = format!(
        "model: {{d_model: 64, n_heads: 4, n_layers: 2, mlp_ratio: 4, vocab_size: 2048, max_sequence_length: 64,\
         \x20 rope: true, include_bias: false, layer_norm_with_affine: false,\
         \x20 attention_dropout: 0, residual_dropout: 0, embedding_dropout: 0}}\n\
         optimizer: {{name: adamw, learning_rate: 3.0e-3, weight_decay: 0.1, eps: 1.0e-8}}\n\
         scheduler: {{name: cosine_with_warmup, t_warmup: 10}}\n\
         data: {{paths: [{}]}}\n\
         evaluators:\n  - label: held-out\n    data: {{paths: ['{}']}}\n\
         eval_interval: 1000\neval_subset_num_batches: 20\ndevice_eval_batch_size: 32\n\
         global_train_batch_size: 32\ndevice_train_microbatch_size: 16\nmax_duration: 150\nmax_grad_norm: 1.0\n\
         save_folder: '{}'\nsave_interval: 1000\ndevice: cpu\n",
        list(&files),
        held_out.display(),
        run.display()
    );
    let cfg: olmo_train::config::TrainConfig = serde_saphyr::from_str(&text).unwrap();
    olmo_train::train::run(cfg, &text).unwrap();
    let metrics: Vec<serde_json::Value> = std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let unigram = metrics[0]["eval/held-out/UnigramCrossEntropy"]
        .as_f64()
        .unwrap();
    let start = metrics[0]["eval/held-out/CrossEntropyLoss"]
        .as_f64()
        .unwrap();
    let end = metrics
        .iter()
        .rev()
        .find_map(|m| m["eval/held-out/CrossEntropyLoss"].as_f64())
        .unwrap();
    // an untrained model is near uniform (ln 2048 = 7.62), worse than unigram statistics
    assert!((start - 2048f64.ln()).abs() < 0.1, "start {start}");
    assert!(unigram < start - 0.5, "unigram {unigram}, start {start}");
    // trained: well below the unigram baseline (perplexity at least 1.5x lower)
    assert!(
        end < unigram - 1.5f64.ln(),
        "held-out cross-entropy {end} vs unigram {unigram}"
    );
    assert!(run.join("step150/model.safetensors").exists());
    assert!(run.join("loss.png").exists());
}
