//! Stand-ins for the CUDA libraries, built with the system compilers for tests that run the
//! CUDA engine's real GPU code path without a GPU: `cuda_driver_mock.cpp` as libcuda and
//! libcublas, `cublaslt_mock.c` as libcublasLt, `nccl_mock.c` as libnccl. They load the way
//! cudarc loads the real libraries, from `LD_LIBRARY_PATH`, so only in a process started with
//! it set. NVRTC is the real one (the kernels' PTX is checked for each kernel's entry).

// Each test binary that includes this module uses a part of it.
#![allow(dead_code)]

use std::path::Path;
use std::process::Command;

/// Whether one of `compilers` built `src`; false when none is installed. One that is
/// installed but refuses the source fails the test (a broken stand-in or emulator is not a
/// skip).
pub fn compile(compilers: &[&str], args: &[&str], out: &Path, src: &Path) -> bool {
    let mut refused = Vec::new();
    for c in compilers {
        match Command::new(c)
            .args(args)
            .arg("-o")
            .arg(out)
            .arg(src)
            .status()
        {
            Ok(s) if s.success() => return true,
            Ok(s) => refused.push(format!("{c} ({s})")),
            Err(_) => {}
        }
    }
    assert!(
        refused.is_empty(),
        "could not build {}: {}",
        src.display(),
        refused.join(", ")
    );
    false
}

/// A folder holding the stand-ins, or `None` (said) when a compiler is missing.
pub fn build() -> Option<tempfile::TempDir> {
    let tests = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let cxx = ["c++", "g++", "clang++"];
    let cc = ["cc", "gcc", "clang"];
    let c_args = ["-std=c11", "-O1", "-Wall", "-Werror", "-shared", "-fPIC"];
    let ok = compile(
        &cxx,
        &["-std=c++20", "-O1", "-pthread", "-shared", "-fPIC"],
        &d.join("libcuda.so"),
        &tests.join("cuda_driver_mock.cpp"),
    ) && compile(&cc, &c_args, &d.join("libcublasLt.so"), &tests.join("cublaslt_mock.c"))
        && compile(&cc, &c_args, &d.join("libnccl.so"), &tests.join("nccl_mock.c"))
        // one file serves as the driver and as cuBLAS
        && std::fs::copy(d.join("libcuda.so"), d.join("libcublas.so")).is_ok();
    if !ok {
        eprintln!("skipped: no C/C++ compiler to build the CUDA stand-ins");
        return None;
    }
    Some(dir)
}

/// `LD_LIBRARY_PATH` with the stand-ins first (NVRTC stays reachable through the rest).
pub fn library_path(dir: &Path) -> String {
    match std::env::var("LD_LIBRARY_PATH") {
        Ok(p) if !p.is_empty() => format!("{}:{p}", dir.display()),
        _ => dir.display().to_string(),
    }
}

/// Set in the process a test runs itself again in.
const CHILD: &str = "OLMO_TRAIN_CUDA_STANDIN";

/// Whether this process is the test's run on the stand-ins (`in_child`).
pub fn is_child() -> bool {
    std::env::var_os(CHILD).is_some()
}

/// Runs the test `name` again in a fresh process with the stand-ins first on the library path;
/// its output (stdout, then stderr), or `None` when it skipped (said).
pub fn in_child(name: &str) -> Option<String> {
    in_child_with(name, &[])
}

/// `in_child` with more environment variables set in the child (the stand-ins' switches).
pub fn in_child_with(name: &str, env: &[(&str, &str)]) -> Option<String> {
    let dir = build()?;
    let out = Command::new(std::env::current_exe().unwrap())
        .args([name, "--exact", "--nocapture", "--test-threads", "1"])
        .env(CHILD, "1")
        .env("LD_LIBRARY_PATH", library_path(dir.path()))
        .envs(env.iter().copied())
        .output()
        .unwrap();
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    // under --nocapture the harness's "test NAME ... " precedes the child's own line
    if let Some((_, why)) = text.lines().find_map(|l| l.split_once("skipped: ")) {
        eprintln!("skipped: {why}");
        return None;
    }
    Some(text)
}
