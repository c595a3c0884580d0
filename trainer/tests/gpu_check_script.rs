//! `trainer/scripts/gpu-check.sh` without a GPU: a stand-in binary in place of olmo-train
//! prints table rows, so the script's own work (the whole-output log a remote runner needs,
//! the summary of failures and timings, the exit status) is checked here.

use std::path::Path;
use std::process::Command;

#[test]
fn the_script_keeps_its_whole_output_and_sums_up_the_failures() {
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("olmo-train");
    // one failing and one passing row per process, an OLMo-1B timing line, then the
    // attention path in an exit status, so the last process's status is the script's
    std::fs::write(
        &bin,
        "#!/bin/sh\n\
         echo \"| tiny | bf16 | grad $3 | 5.0e-02 | 3e-02 | NO |\"\n\
         echo \"| tiny | bf16 | loss | 1.0e-03 | 3e-02 | yes |\"\n\
         echo \"$3 attention: OLMo-1B, micro-batch 8 x 2048: 1 tokens/s\"\n\
         [ \"$3\" = materialised ]\n",
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
    assert!(!summary.contains("| yes |"), "{summary}");
    assert!(summary.ends_with("exit status: 1\n"), "{summary}");

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
