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
# bf16), the OLMo-1B GEMMs in cuBLASLt vs cuBLAS (first process only), a 300-step training run with tokens/s, the same 3 steps run twice (same bits? and with the flash kernels' wide blocks, with every other layer computed again in the backward pass, and with each attention computed again (fine_grained)), OLMo-1B at sequence 2048 (tokens/s, MFU, peak GPU memory, the block size timing chose for each flash kernel, a profiled step with TFLOP/s per GEMM shape and flash kernel, and tokens/s and peak memory with whole-layer activation checkpointing); then
# the same OLMo-1B in PyTorch on the same GPU (bf16 autocast, SDPA) for comparison; then
# `olmo-train train` itself: the tiny config for 30 steps in fp32 on the GPU and on the CPU
# (the final train and eval losses must agree to 1e-3; metrics.jsonl must have the GPU's peak
# memory); the tiny config in bf16 straight and stopped at step 15 then rerun (same bytes at
# step 30); two ranks on this GPU summing through the host (one process's loss to 1e-5), then
# with NCCL (which refuses two ranks on one GPU: shows the error); and OLMo-1B for a few steps
# with the command's own tokens/s, MFU and peak memory.
# MICRO (default 8, OLMo-1B's device_train_microbatch_size) sets the OLMo-1B micro-batch of both;
# ATTENTIONS (default "materialised flash") the attention paths to run, e.g. "flash" for a quick
# rerun; OLMO2_1B_STEPS=N adds N steps of a 1B model in OLMo 2 blocks, in olmo-train and PyTorch (default 0); TRAIN_STEPS, OLMO_1B_STEPS, GEMM_REPS (0: no GEMM table), TRAIN_CMD_STEPS and
# TRAIN_CMD=0 (no `train` runs) shorten it further; CHECKS=0 runs only the `train` commands;
# OLMO_7B_STEPS=N adds N steps of OLMo-7B through `train` (micro-batch 2, and 8 with whole_layer).
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
LIBS="${LIBS#:}"
# (no empty entry: one would search the current folder)
export LD_LIBRARY_PATH="$LIBS${LIBS:+${LD_LIBRARY_PATH:+:}}${LD_LIBRARY_PATH:-}"

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
[ "${CHECKS:-1}" = 0 ] && ATTENTIONS=skip
for attention in ${ATTENTIONS:-materialised flash}; do
  [ "$attention" = skip ] && break
  echo "== olmo-train gpu-check --attention $attention"
  timeout "${CHECK_TIMEOUT:-180}" "$BIN" gpu-check --attention $attention --train-steps "${TRAIN_STEPS:-300}" \
    --olmo-1b-steps "${OLMO_1B_STEPS:-5}" --olmo2-1b-steps "${OLMO2_1B_STEPS:-0}" --micro "${MICRO:-8}" --gemm-reps "$reps" 2>&1 | tee -a "$LOG" || status=$?
  reps=0
  echo
done
echo
echo "== PyTorch on the same GPU: OLMo-1B, micro-batch ${MICRO:-8} x 2048, bf16 autocast"
if [ "${CHECKS:-1}" = 0 ]; then
  echo "(CHECKS=0: skipped)"
elif [ -n "$PY" ]; then
  timeout "${TORCH_TIMEOUT:-180}" "$PY" bench/torch_olmo.py bench trainer/configs/OLMo-1B.yaml --device cuda --amp-bf16 \
    --batch "${MICRO:-8}" --micro "${MICRO:-8}" --seq 2048 --steps "${OLMO_1B_STEPS:-5}" 2>&1 | tee -a "$LOG" || status=$?
  if [ "${OLMO2_1B_STEPS:-0}" != 0 ]; then
    echo "== PyTorch on the same GPU: OLMo 2 1B blocks, micro-batch ${MICRO:-8} x 2048, bf16 autocast"
    timeout "${TORCH_TIMEOUT:-180}" "$PY" bench/torch_olmo.py bench trainer/configs/OLMo2-1B.yaml --device cuda --amp-bf16 \
      --batch "${MICRO:-8}" --micro "${MICRO:-8}" --seq 2048 --steps "$OLMO2_1B_STEPS" 2>&1 | tee -a "$LOG" || status=$?
  fi
else
  echo "(no Python with torch found: set TORCH_PYTHON)"
fi

# `olmo-train train` itself on the GPU: its data order, schedule, AdamW, clipping, evals,
# metrics and checkpoints, which gpu-check's own loop does not go through. The tiny model in
# fp32 on the GPU and on this machine's CPU from the same init must end at the same loss; then
# OLMo-1B in bf16 shows the command's windowed tokens/s, MFU and peak memory. TRAIN_CMD=0 skips.
if [ "${TRAIN_CMD:-1}" != 0 ]; then
  TOK=tests/data/golden/tokens/part-0-00000.npy
  RUNS=$(mktemp -d)
  tiny() {  # device, then more overrides
    local dev=$1; shift
    timeout "${TRAIN_CMD_TIMEOUT:-60}" "$BIN" train trainer/configs/tiny.yaml --device "$dev" \
      --model.vocab_size=50280 "--data.paths=[$TOK]" --global_train_batch_size=16 \
      --device_train_microbatch_size=8 --max_duration=30 --scheduler.t_warmup=5 \
      "--evaluators=[{label: held, data: {paths: [$TOK]}}]" --eval_interval=30 \
      --eval_subset_num_batches=4 --console_log_interval=10 --save_folder="$RUNS/tiny-$dev" "$@" 2>&1
  }
  echo "== olmo-train train: the tiny config, 30 steps in fp32, on the GPU and on the CPU"
  tiny cuda --precision=fp32 | tee -a "$LOG" || status=$?
  tiny cpu | tee -a "$LOG" || status=$?
  last() { grep -o "\"$2\":[-0-9.e+]*" "$RUNS/tiny-$1/metrics.jsonl" 2>/dev/null | tail -1 | cut -d: -f2; }
  # loss_row WHAT GOT REFERENCE NAME TOL: a row of GOT against NAME's REFERENCE, relative; NO
  # (and a failed status) when off by more than TOL or missing.
  loss_row() {
    local row
    row=$(awk -v w="$1" -v g="$2" -v c="$3" -v n="$4" -v tol="$5" 'BEGIN {
      if (g == "" || c == "") { printf "| train command, tiny | fp32 | %s: missing | - | %s | NO |\n", w, tol; exit }
      r = (g > c ? g - c : c - g) / (c > 0 ? c : 1)
      printf "| train command, tiny | fp32 | %s: %.6f vs %s %.6f | %.1e | %s | %s |\n", w, g, n, c, r, tol, (r <= tol + 0 ? "yes" : "NO") }')
    echo "$row" | tee -a "$LOG"
    case $row in *"| NO |") status=1 ;; esac
  }
  for what in train/CrossEntropyLoss eval/held/CrossEntropyLoss; do
    loss_row "$what at step 30" "$(last cuda "$what")" "$(last cpu "$what")" CPU 1e-03
  done
  peak=NO
  grep -q '"System/Peak GPU Memory (MB)"' "$RUNS/tiny-cuda/metrics.jsonl" 2>/dev/null && peak=yes
  echo "| train command, tiny | fp32 | System/Peak GPU Memory (MB) in metrics.jsonl | - | - | $peak |" | tee -a "$LOG"
  [ $peak = yes ] || status=1

  # A run stopped and resumed on the GPU (bf16 mixed precision) must end with the bytes of one
  # that never stopped: the weights, AdamW's state and the trainer state at step 30.
  echo "== olmo-train train: the tiny config in bf16, 30 steps straight, and stopped at 15 then rerun"
  tiny cuda --save_interval=15 --save_folder="$RUNS/straight" | tail -1 | tee -a "$LOG" || status=$?
  tiny cuda --save_interval=15 --save_folder="$RUNS/resumed" --stop_at=15 | tail -1 | tee -a "$LOG" || status=$?
  tiny cuda --save_interval=15 --save_folder="$RUNS/resumed" | tail -1 | tee -a "$LOG" || status=$?
  for f in model.safetensors optim.safetensors train.json; do
    same=NO
    cmp -s "$RUNS/straight/step30/$f" "$RUNS/resumed/step30/$f" && same=yes
    echo "| train command, tiny | bf16 | step30/$f after a resume at step 15: same bytes as straight | - | - | $same |" | tee -a "$LOG"
    [ $same = yes ] || status=1
  done

  # Two data-parallel ranks on this one GPU, gradients summed through the host (NCCL refuses
  # two ranks on one device): each trains on its half of every batch, and together they must
  # give the single process's losses. Then the same with NCCL, to show how it refuses.
  two_ranks() {  # label, then VAR=value settings for both ranks
    local label=$1 port=$((29400 + RANDOM % 500)) pids=() r rc=0
    shift
    for r in 0 1; do
      (
        [ $# -gt 0 ] && export "$@"
        export RANK=$r WORLD_SIZE=2 LOCAL_RANK=0 LOCAL_WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=$port
        tiny cuda --precision=fp32 --save_folder="$RUNS/tiny-$label"
      ) >"$RUNS/$label-rank$r.log" 2>&1 &
      pids+=($!)
    done
    for r in 0 1; do wait "${pids[$r]}" || rc=$?; done
    return $rc
  }
  echo "== olmo-train train: the tiny config in fp32, two ranks on this GPU (host all-reduce)"
  two_ranks host OLMO_TRAIN_NCCL=0 || status=$?
  tail -1 "$RUNS/host-rank0.log" | tee -a "$LOG"
  loss_row "2 ranks, train loss at step 30" "$(last host train/CrossEntropyLoss)" \
    "$(last cuda train/CrossEntropyLoss)" "1 process" 1e-05
  echo "== NCCL with two ranks on one GPU (expected to be refused, with an error rather than a hang)"
  TRAIN_CMD_TIMEOUT=30 two_ranks nccl
  echo "exit status $?; the ranks' last lines:"
  tail -n2 "$RUNS/nccl-rank0.log" "$RUNS/nccl-rank1.log"
  echo
  echo "== olmo-train train: OLMo-1B, ${TRAIN_CMD_STEPS:-25} steps of micro-batch ${MICRO:-8} x 2048, bf16, no checkpoint"
  timeout "${TRAIN_CMD_TIMEOUT:-90}" "$BIN" train trainer/configs/OLMo-1B.yaml --device cuda \
    "--data.paths=[$TOK]" --global_train_batch_size="${MICRO:-8}" --device_train_microbatch_size="${MICRO:-8}" \
    --max_duration="${TRAIN_CMD_STEPS:-25}" --scheduler.t_warmup=5 "--evaluators=[]" --save_folder=null \
    --speed_monitor.window_size=10 --console_log_interval=5 2>&1 | sed -u 's/^/OLMo-1B train: /' | tee -a "$LOG" || status=$?
  # OLMo-7B (OLMO_7B_STEPS=N): the micro-batch the config sets (2) without checkpointing, which
  # the memory planner puts at 134.9 GiB of the H200's 139.8, and 8 with whole_layer (127.2).
  if [ "${OLMO_7B_STEPS:-0}" != 0 ]; then
    for mode in "null 2" "whole_layer 8"; do
      set -- $mode
      echo "== olmo-train train: OLMo-7B, $OLMO_7B_STEPS steps of micro-batch $2 x 2048, bf16, activation_checkpointing $1"
      timeout "${OLMO_7B_TIMEOUT:-150}" "$BIN" train trainer/configs/OLMo-7B.yaml --device cuda \
        "--data.paths=[$TOK]" --global_train_batch_size="$2" --device_train_microbatch_size="$2" \
        --activation_checkpointing="$1" --max_duration="$OLMO_7B_STEPS" --scheduler.t_warmup=2 \
        "--evaluators=[]" --save_folder=null --speed_monitor.window_size=3 --console_log_interval=2 2>&1 |
        sed -u "s/^/OLMo-7B $1: /" | tee -a "$LOG" || status=$?
    done
  fi
  rm -rf "$RUNS"
  echo
fi

# The issue's must-show in a few lines.
echo
echo "== Summary"
echo "checks failed: $(grep -c '| NO |' "$LOG")"
grep -F '| NO |' "$LOG" | grep -v '^| train command' | head -20
grep -E '^(materialised|flash) attention: .*micro-batch' "$LOG" || echo "(no OLMo-1B timing)"
grep -E '^flash_(fwd|dq|dkdv) \([0-9]+x2048\)' "$LOG" || true
grep -E '^pytorch .*tokens/s' "$LOG" || echo "(no PyTorch timing)"
grep -E '^\| train command' "$LOG"
grep -E '^OLMo-1B train: (step .*tokens/s|olmo-train: done)' "$LOG" | tail -2
grep -E '^OLMo-7B [a-z_]+: (olmo-train: GPU memory|step .*tokens/s|olmo-train: done|error)' "$LOG"
echo "exit status: $status"
exit $status
