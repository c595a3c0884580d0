//! `olmo-train train` end to end on a synthetic shard: the loss falls and metrics are written.

use std::process::Command;

#[test]
fn training_lowers_the_loss_and_writes_metrics() {
    let dir = tempfile::tempdir().unwrap();
    // a periodic stream: easy to predict once learnt
    let tokens: Vec<u8> = (0..4096u16)
        .map(|i| [3u16, 1, 4, 1, 5, 9, 2, 6][i as usize % 8])
        .flat_map(|t| t.to_le_bytes())
        .collect();
    std::fs::write(dir.path().join("t.npy"), tokens).unwrap();
    let out = dir.path().join("run");
    let cfg = dir.path().join("c.yaml");
    std::fs::write(
        &cfg,
        format!(
            "model:\n  d_model: 16\n  n_heads: 2\n  n_layers: 1\n  vocab_size: 16\n  max_sequence_length: 16\n\
             optimizer:\n  learning_rate: 1.0e-2\nscheduler:\n  name: constant\ndata:\n  paths: ['{}/t.npy']\n\
             global_train_batch_size: 4\nmax_duration: 40\nmax_grad_norm: 1.0\nsave_folder: {}\n",
            dir.path().display(),
            out.display()
        ),
    )
    .unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_olmo-train"))
        .args(["train", "-c", cfg.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let metrics: Vec<serde_json::Value> = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(metrics.len(), 40);
    let loss = |i: usize| metrics[i]["train/CrossEntropyLoss"].as_f64().unwrap();
    // starts near ln(128) (uniform over the padded vocabulary)
    assert!((loss(0) - 128f64.ln()).abs() < 0.2, "{}", loss(0));
    assert!(loss(39) < 1.0, "loss went from {} to {}", loss(0), loss(39));
    // a vocabulary too small for the data is an error, not a crash
    std::fs::write(
        &cfg,
        std::fs::read_to_string(&cfg)
            .unwrap()
            .replace("vocab_size: 16", "vocab_size: 8"),
    )
    .unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_olmo-train"))
        .args(["train", "-c", cfg.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("outside the vocabulary"));
}
