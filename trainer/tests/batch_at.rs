//! `olmo-train batch-at` end to end: the printed instances are the step's slice of NumPy's
//! permutation, with their files, offsets and tokens.

use std::process::Command;

use olmo_train::permutation::permutation;

#[test]
fn batch_at_prints_the_steps_instances() {
    let dir = tempfile::tempdir().unwrap();
    // two shards: 40 and 25 tokens -> 5 + 3 windows of 8
    let a: Vec<u8> = (0u16..40).flat_map(|t| t.to_le_bytes()).collect();
    let b: Vec<u8> = (1000u16..1025).flat_map(|t| t.to_le_bytes()).collect();
    std::fs::write(dir.path().join("a.npy"), a).unwrap();
    std::fs::write(dir.path().join("b.npy"), b).unwrap();
    let cfg = dir.path().join("c.yaml");
    std::fs::write(
        &cfg,
        format!(
            "model:\n  max_sequence_length: 8\n  vocab_size: 2000\ndata:\n  paths: ['{0}/a.npy', '{0}/b.npy']\n  memmap_dtype: uint16\nglobal_train_batch_size: 2\nseed: 6198\n",
            dir.path().display()
        ),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_olmo-train"))
        .args(["batch-at", "1", "-c", cfg.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let order = permutation(8, 6198);
    let lines: Vec<&str> = text.lines().skip(1).collect();
    assert_eq!(lines.len(), 2, "{text}");
    for (line, &inst) in lines.iter().zip(&order[2..4]) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(fields[0], inst.to_string());
        let (file, first) = if inst < 5 {
            ("a.npy", inst as u16 * 8)
        } else {
            ("b.npy", 1000 + (inst as u16 - 5) * 8)
        };
        assert!(fields[1].ends_with(file), "{line}");
        assert_eq!(
            fields[3].trim_start_matches('['),
            first.to_string(),
            "{line}"
        );
    }
    // the overrides `train` takes pick the same batch here: a batch of 3 and another seed
    let out = Command::new(env!("CARGO_BIN_EXE_olmo-train"))
        .args(["batch-at", "1", "-c", cfg.to_str().unwrap()])
        .args(["--global_train_batch_size=3", "--seed=7"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let firsts: Vec<String> = text
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().next().unwrap().to_string())
        .collect();
    let want: Vec<String> = permutation(8, 7)[3..6]
        .iter()
        .map(|i| i.to_string())
        .collect();
    assert_eq!(firsts, want, "{text}");
    // a vocabulary too small for the data is caught
    std::fs::write(
        &cfg,
        std::fs::read_to_string(&cfg)
            .unwrap()
            .replace("vocab_size: 2000", "vocab_size: 500"),
    )
    .unwrap();
    let bad = (0..4).map(|s| {
        Command::new(env!("CARGO_BIN_EXE_olmo-train"))
            .args(["batch-at", &s.to_string(), "-c", cfg.to_str().unwrap()])
            .output()
            .unwrap()
    });
    assert!(bad
        .into_iter()
        .any(|o| String::from_utf8_lossy(&o.stderr).contains("outside the vocabulary")));
}
