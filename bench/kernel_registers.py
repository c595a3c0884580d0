#!/usr/bin/env python3
"""Registers and spills of the CUDA engine's kernels as ptxas reports them, per architecture,
through NVRTC alone (no GPU): the check to run after touching a kernel, since a kernel that
spills or needs more registers runs fewer warps per SM. Compares two versions of the source
when given two (e.g. a git revision's and the working tree's).

    bench/kernel_registers.py [--arch sm_90,sm_80] [--only flash] [OLD.cu] [NEW.cu]

NVRTC: libnvrtc.so.13 on the library path, or the one .ci/run installs
(~/.cache/olmo-train-nvrtc). The default source is trainer/src/cuda_kernels.cu. To compare
with a revision: git show REV:trainer/src/cuda_kernels.cu > /tmp/old.cu, then pass both.
"""
import argparse
import ctypes
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def nvrtc():
    cached = os.path.expanduser("~/.cache/olmo-train-nvrtc/nvidia/cu13/lib")
    for d in ["", cached + "/"]:
        try:
            # NVRTC opens its builtins library by name at compile time: load it first
            ctypes.CDLL(d + "libnvrtc-builtins.so.13.0", mode=ctypes.RTLD_GLOBAL)
            return ctypes.CDLL(d + "libnvrtc.so.13")
        except OSError:
            pass
    sys.exit("no libnvrtc.so.13: pip install --target ~/.cache/olmo-train-nvrtc 'nvidia-cuda-nvrtc==13.0.*'")


def report(lib, path, arch):
    """{kernel: (registers, spill bytes stored + loaded)} from ptxas' verbose log."""
    src = open(path, "rb").read()
    prog = ctypes.c_void_p()
    if lib.nvrtcCreateProgram(ctypes.byref(prog), src, b"cuda_kernels.cu", 0, None, None):
        sys.exit(f"{path}: nvrtcCreateProgram failed")
    opts = [f"--gpu-architecture={arch}".encode(), b"--ptxas-options=--verbose"]
    rc = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, log)
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
    log = log.value.decode(errors="replace")
    if rc:
        sys.exit(f"{path} for {arch}: NVRTC error {rc}\n{log}")
    out, kernel, spill = {}, None, 0
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '(\w+)'", line)
        if m:
            kernel, spill = m.group(1), 0
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and kernel:
            spill = int(m.group(1)) + int(m.group(2))
        m = re.search(r"Used (\d+) registers", line)
        if m and kernel:
            out[kernel] = (int(m.group(1)), spill)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="sm_90,sm_80")
    ap.add_argument("--only", default="", help="kernels whose name contains this")
    ap.add_argument("sources", nargs="*")
    a = ap.parse_args()
    sources = a.sources or [os.path.join(HERE, "..", "trainer", "src", "cuda_kernels.cu")]
    if len(sources) > 2:
        sys.exit("one source, or two to compare")
    lib = nvrtc()
    for arch in a.arch.split(","):
        reps = [report(lib, s, arch) for s in sources]
        names = sorted(set().union(*reps))
        print(f"{arch}: kernel, registers (spill bytes)" + (": old -> new" if len(reps) == 2 else ""))
        for k in names:
            if a.only not in k:
                continue
            cells = [f"{r[k][0]:3} ({r[k][1]:3})" if k in r else "      -  " for r in reps]
            mark = ""
            if len(reps) == 2 and all(k in r for r in reps) and reps[0][k] != reps[1][k]:
                mark = "   *"
            print(f"  {k:28} " + " -> ".join(cells) + mark)


if __name__ == "__main__":
    main()
