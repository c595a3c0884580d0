#!/usr/bin/env bash
# Registers, spills and shared memory of every CUDA kernel, without a GPU: compiles
# trainer/src/cuda_kernels.cu with NVRTC (as the engine does at run time) and assembles the
# PTX with ptxas from the PyPI CUDA wheels (downloaded once into $CACHE).
#   trainer/scripts/ptxas-report.sh [sm_90]
set -euo pipefail
cd "$(dirname "$0")/../.."
ARCH=${1:-sm_90}
CACHE=${CACHE:-$HOME/.cache/olmo-train-ptxas}
# one folder per wheel: pip --target does not merge two wheels' shared `nvidia/` folder
PTXAS=$CACHE/nvcc/nvidia/cu13/bin/ptxas
[ -x "$PTXAS" ] || python3 -m pip install -q --target "$CACHE/nvcc" "nvidia-cuda-nvcc==13.0.*"
[ -e "$CACHE/nvrtc/nvidia/cu13/lib/libnvrtc.so.13" ] ||
  python3 -m pip install -q --target "$CACHE/nvrtc" "nvidia-cuda-nvrtc==13.0.*"
export LD_LIBRARY_PATH="$CACHE/nvrtc/nvidia/cu13/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
python3 - "$ARCH" "$TMP/kernels.ptx" <<'PY'
import ctypes, sys
lib = ctypes.CDLL("libnvrtc.so.13")
src = open("trainer/src/cuda_kernels.cu", "rb").read()
prog = ctypes.c_void_p()
assert lib.nvrtcCreateProgram(ctypes.byref(prog), src, b"olmo_train_kernels.cu", 0, None, None) == 0
opts = (ctypes.c_char_p * 1)(b"--gpu-architecture=" + sys.argv[1].encode())
status = lib.nvrtcCompileProgram(prog, 1, opts)
n = ctypes.c_size_t()
lib.nvrtcGetProgramLogSize(prog, ctypes.byref(n))
log = ctypes.create_string_buffer(n.value)
lib.nvrtcGetProgramLog(prog, log)
sys.stderr.write(log.value.decode())
if status != 0:
    sys.exit("NVRTC failed")
lib.nvrtcGetPTXSize(prog, ctypes.byref(n))
ptx = ctypes.create_string_buffer(n.value)
lib.nvrtcGetPTX(prog, ptx)
open(sys.argv[2], "wb").write(ptx.value)
PY
"$PTXAS" -arch="$ARCH" -v "$TMP/kernels.ptx" -o "$TMP/kernels.cubin" 2>&1 |
  awk '/Compiling entry function/ { match($0, /'"'"'[^'"'"']+'"'"'/); k = substr($0, RSTART + 1, RLENGTH - 2) }
       /spill/ { sp = $0; sub(/.*info    : +/, "", sp) }
       /Used/ { u = $0; sub(/.*Used /, "", u); printf "%-20s %s | %s\n", k, u, sp }'
