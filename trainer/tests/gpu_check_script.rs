//! `trainer/scripts/gpu-check.sh` without a GPU: a stand-in binary in place of olmo-train
//! prints table rows, so the script's own work (the whole-output log a remote runner needs,
//! the summary of failures and timings, the exit status) is checked here.

use std::path::Path;
use std::process::Command;

#[test]
fn the_script_keeps_its_whole_output_and_sums_up_the_failures() {
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("olmo-train");
    // gpu-check: one failing and one passing row per process, an OLMo-1B timing line, then
    // the attention path in an exit status, so the last process's status is the script's.
    // train: the metrics a run would write in its --save_folder (on `cuda` the train loss
    // $CUDA_LOSS and a peak memory), or progress lines for OLMo-1B.
    std::fs::write(
        &bin,
        r#"#!/bin/bash
if [ "$1" = train ]; then
  for a in "$@"; do case $a in --save_folder=*) out=${a#*=};; esac; done
  if [[ $2 == *OLMo-1B* ]]; then
    echo 'step     25/25  loss 7.0  12345 tokens/s  MFU 41.0%  ETA 0s'
    echo 'olmo-train: done: 25 steps this run'
    exit 0
  fi
  case " $* " in
    *' --device cpu '*) loss=5.0; peak='';;
    *) loss=${CUDA_LOSS:-5.0}; peak=',"System/Peak GPU Memory (MB)":12.5';;
  esac
  # checkpoints: a run with --stop_at leaves that step; a rerun over it (a resume) writes step 30
  # as $RESUMED_BYTES, a run from the start as "same"
  stop=''
  for a in "$@"; do case $a in --stop_at=*) stop=${a#*=};; esac; done
  if [ -n "$stop" ]; then
    mkdir -p "$out/step$stop"
  else
    bytes=same
    [ -d "$out/step15" ] && bytes=${RESUMED_BYTES:-same}
    mkdir -p "$out/step30"
    for f in model.safetensors optim.safetensors train.json; do echo "$bytes" > "$out/step30/$f"; done
  fi
  mkdir -p "$out"
  echo "{\"step\":30,\"train/CrossEntropyLoss\":$loss$peak}" > "$out/metrics.jsonl"
  echo '{"step":30,"eval/held/CrossEntropyLoss":4.25}' >> "$out/metrics.jsonl"
  exit 0
fi
echo "| tiny | bf16 | grad $3 | 5.0e-02 | 3e-02 | NO |"
echo "| tiny | bf16 | loss | 1.0e-03 | 3e-02 | yes |"
echo "$3 attention: OLMo-1B, micro-batch 8 x 2048: 1 tokens/s"
[ "$3" = materialised ]
"#,
    )
    .unwrap();
    std::fs::set_permissions(&bin, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let log = dir.path().join("gpu-check.log");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/gpu-check.sh");
    let out = Command::new("bash")
        .arg(&script)
        .env("BIN", &bin)
        .env("TORCH_PYTHON", "/bin/true")
        .env("GPU_CHECK_LOG", &log)
        .output()
        .unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    // the flash process failed: the script says so in its status
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    // the log holds everything the script printed, to its last line
    assert_eq!(std::fs::read_to_string(&log).unwrap(), stdout);
    let summary = stdout.split("== Summary\n").nth(1).expect(&stdout);
    assert!(summary.starts_with("checks failed: 2\n"), "{summary}");
    for attention in ["materialised", "flash"] {
        assert!(
            summary.contains(&format!(
                "| tiny | bf16 | grad {attention} | 5.0e-02 | 3e-02 | NO |"
            )),
            "{summary}"
        );
        assert!(
            summary.contains(&format!("{attention} attention: OLMo-1B, micro-batch 8")),
            "{summary}"
        );
    }
    // the train command's rows, passing ones too; no passing kernel row
    assert!(
        !summary.contains("| loss | 1.0e-03 | 3e-02 | yes |"),
        "{summary}"
    );
    for row in [
        "| train command, tiny | fp32 | train/CrossEntropyLoss at step 30: 5.000000 vs CPU 5.000000 | 0.0e+00 | 1e-03 | yes |",
        "| train command, tiny | fp32 | eval/held/CrossEntropyLoss at step 30: 4.250000 vs CPU 4.250000 | 0.0e+00 | 1e-03 | yes |",
    ] {
        assert!(summary.contains(row), "{row} in {summary}");
    }
    assert!(
        summary.contains("System/Peak GPU Memory (MB) in metrics.jsonl | - | - | yes |"),
        "{summary}"
    );
    for f in ["model.safetensors", "optim.safetensors", "train.json"] {
        let row = format!("| train command, tiny | bf16 | step30/{f} after a resume at step 15: same bytes as straight | - | - | yes |");
        assert!(summary.contains(&row), "{row} in {summary}");
    }
    assert!(
        summary.contains("| train command, tiny | fp32 | 2 ranks, train loss at step 30: 5.000000 vs 1 process 5.000000 | 0.0e+00 | 1e-05 | yes |"),
        "{summary}"
    );
    assert!(
        summary.contains("OLMo-1B train: step     25/25  loss 7.0  12345 tokens/s  MFU 41.0%"),
        "{summary}"
    );
    assert!(summary.ends_with("exit status: 1\n"), "{summary}");

    // a GPU loss off the CPU's by more than the tolerance, and a resumed run's checkpoint not
    // the straight run's bytes, fail the script, though every process exited well (the
    // materialised stand-in does)
    let out = Command::new("bash")
        .arg(&script)
        .env("BIN", &bin)
        .env("TORCH_PYTHON", "/bin/true")
        .env("ATTENTIONS", "materialised")
        .env("CUDA_LOSS", "5.01")
        .env("RESUMED_BYTES", "other")
        .output()
        .unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    let summary = stdout.split("== Summary\n").nth(1).expect(&stdout);
    assert!(summary.starts_with("checks failed: 5\n"), "{summary}");
    assert!(
        summary.contains("step30/optim.safetensors after a resume at step 15: same bytes as straight | - | - | NO |"),
        "{summary}"
    );
    assert!(
        summary.contains(
            "train/CrossEntropyLoss at step 30: 5.010000 vs CPU 5.000000 | 2.0e-03 | 1e-03 | NO |"
        ),
        "{summary}"
    );
    assert!(summary.contains("eval/held/CrossEntropyLoss at step 30: 4.250000 vs CPU 4.250000 | 0.0e+00 | 1e-03 | yes |"), "{summary}");

    // a log that cannot be written stops the script before anything runs
    let out = Command::new("bash")
        .arg(&script)
        .env("BIN", &bin)
        .env("GPU_CHECK_LOG", dir.path().join("no/such/dir/log"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr.contains("cannot write GPU_CHECK_LOG="), "{stderr}");
    assert!(out.stdout.is_empty());
}
