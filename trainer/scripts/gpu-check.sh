#!/usr/bin/env bash
# The GPU check of olmo-train's CUDA engine: one run of a few minutes on a GPU machine that
# builds nothing there. Build the binary on a CPU machine first
#   cargo build --release -p olmo-train
# and copy the working tree with target/release/olmo-train to the GPU machine (the device tool:
# carry ["target/release/olmo-train"]; the binary needs glibc >= 2.34 there, as on Ubuntu 22.04+,
# Debian 12 and RHEL 9). Then:
#   trainer/scripts/gpu-check.sh
# prints, for the materialised attention and then the flash attention (one process each): the
# CUDA engine against the CPU engine (loss, log-probs, every gradient, an AdamW step; fp32 and
# bf16), the OLMo-1B GEMMs in cuBLASLt vs cuBLAS (first process only), a 300-step training run with tokens/s, the same 3 steps run twice (same bits? and with the flash kernels' wide blocks), OLMo-1B at sequence 2048 (tokens/s, MFU, peak GPU memory, the block size timing chose for each flash kernel, and a profiled step with TFLOP/s per GEMM shape and flash kernel); then
# the same OLMo-1B in PyTorch on the same GPU (bf16 autocast, SDPA) for comparison.
# MICRO (default 8, OLMo-1B's device_train_microbatch_size) sets the OLMo-1B micro-batch of both;
# ATTENTIONS (default "materialised flash") the attention paths to run, e.g. "flash" for a quick
# rerun; TRAIN_STEPS, OLMO_1B_STEPS and GEMM_REPS (0: no GEMM table) shorten it further.
# GPU_CHECK_LOG=FILE also writes the whole output to FILE, for a remote runner that returns
# only the end of the output (the device tool here: GPU_CHECK_LOG=$OUT/gpu-check.log): the
# kernel table of the first process comes first, far from that end.
set -uo pipefail
if [ -n "${GPU_CHECK_LOG:-}" ]; then
  : >"$GPU_CHECK_LOG" || { echo "cannot write GPU_CHECK_LOG=$GPU_CHECK_LOG" >&2; exit 1; }
  exec > >(tee -a "$GPU_CHECK_LOG") 2>&1
  TEE_PID=$!
fi
LOG=""
# On exit, let tee write the last lines before this script's caller reads the file.
trap '[ -n "$LOG" ] && rm -f "$LOG"; if [ -n "${TEE_PID:-}" ]; then exec >&- 2>&-; wait "$TEE_PID"; fi' EXIT
cd "$(dirname "$0")/../.."
BIN=${BIN:-target/release/olmo-train}
[ -x "$BIN" ] || { echo "no $BIN: build it on a CPU machine and copy it over" >&2; exit 1; }

# A Python with torch (TORCH_PYTHON, else the first that imports it).
PY=${TORCH_PYTHON:-}
if [ -z "$PY" ]; then
  for p in python3 /opt/*/bin/python3 /root/*/bin/python3 /root/.venv*/bin/python3 /workspace/*/bin/python3 /venv*/bin/python3; do
    if [ -x "$(command -v "$p" 2>/dev/null)" ] && "$p" -c "import torch" 2>/dev/null; then PY=$p; break; fi
  done
fi

# Libraries: the CUDA prefix first (its NVRTC emits PTX the installed driver accepts), then the
# nvidia-* wheels of the torch venv.
LIBS=""
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do
  [ -d "$d" ] && LIBS="$LIBS:$d"
done
if [ -n "$PY" ]; then
  for d in $("$PY" -c "import nvidia, os, glob; r=os.path.dirname(nvidia.__path__[0] if hasattr(nvidia,'__path__') else nvidia.__file__); print(' '.join(glob.glob(os.path.join(r,'nvidia','*','lib'))))" 2>/dev/null); do
    LIBS="$LIBS:$d"
  done
fi
export LD_LIBRARY_PATH="${LIBS#:}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

echo "== GPU"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "(no nvidia-smi)"
echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
echo
status=0
LOG=$(mktemp)
# One process per attention path: a fault in the flash kernels (which poisons the CUDA
# context) cannot take the materialised path's results with it.
# The GEMM table (cuBLASLt vs cuBLAS) once, with the first.
reps=${GEMM_REPS:-10}
for attention in ${ATTENTIONS:-materialised flash}; do
  echo "== olmo-train gpu-check --attention $attention"
  timeout "${CHECK_TIMEOUT:-180}" "$BIN" gpu-check --attention $attention --train-steps "${TRAIN_STEPS:-300}" \
    --olmo-1b-steps "${OLMO_1B_STEPS:-5}" --micro "${MICRO:-8}" --gemm-reps "$reps" 2>&1 | tee -a "$LOG" || status=$?
  reps=0
  echo
done
echo
echo "== PyTorch on the same GPU: OLMo-1B, micro-batch ${MICRO:-8} x 2048, bf16 autocast"
if [ -n "$PY" ]; then
  timeout "${TORCH_TIMEOUT:-180}" "$PY" bench/torch_olmo.py bench trainer/configs/OLMo-1B.yaml --device cuda --amp-bf16 \
    --batch "${MICRO:-8}" --micro "${MICRO:-8}" --seq 2048 --steps "${OLMO_1B_STEPS:-5}" 2>&1 | tee -a "$LOG" || status=$?
else
  echo "(no Python with torch found: set TORCH_PYTHON)"
fi

# The issue's must-show in a few lines.
echo
echo "== Summary"
echo "checks failed: $(grep -c '| NO |' "$LOG")"
grep -F '| NO |' "$LOG" | head -20
grep -E '^(materialised|flash) attention: .*micro-batch' "$LOG" || echo "(no OLMo-1B timing)"
grep -E '^flash_(fwd|dq|dkdv) \([0-9]+x2048\)' "$LOG" || true
grep -E '^pytorch .*tokens/s' "$LOG" || echo "(no PyTorch timing)"
echo "exit status: $status"
exit $status
