#!/usr/bin/env bash
# Reading the weights of a checkpoint of OLMo-1B's size (1.18B parameters, 4.7 GB of F32) from
# four files: olmo-train from its own model.safetensors and from OLMo's model.pt (written from
# it by `olmo-train export-olmo`), and PyTorch's torch.load and safetensors' load_file of the
# same two files. Prints GB/s for each, the files read once before (a warm page cache: what is
# timed is the reader, not the disk).
#
#   bench/checkpoint.sh      (TORCH_VENV: a venv with torch and safetensors, default
#                             bench/.venv-torch, made on first use; WORK: where the 9.4 GB of
#                             files go, default /tmp/olmo-train-checkpoint-bench)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${TORCH_VENV:-bench/.venv-torch}
. bench/common.sh
python_venv "$VENV" "torch, safetensors" torch numpy safetensors
cargo build --release -q -p olmo-train --example read_checkpoint
WORK=${WORK:-/tmp/olmo-train-checkpoint-bench}
rm -rf "$WORK" && mkdir -p "$WORK/ours"
cp trainer/configs/OLMo-1B.yaml "$WORK/ours/config.yaml"
# OLMo-1B's tensors (d 2048, 16 blocks, SwiGLU hidden 8192, 50304 embedding rows, tied, no
# norm weights) under OLMo's names, random
"$VENV/bin/python" - "$WORK/ours/model.safetensors" <<'PY'
import sys
import torch
from safetensors.torch import save_file
d, layers, hidden, rows = 2048, 16, 8192, 50304
t = {"transformer.wte.weight": torch.randn(rows, d)}
for l in range(layers):
    p = f"transformer.blocks.{l}."
    t[p + "att_proj.weight"] = torch.randn(3 * d, d)
    t[p + "attn_out.weight"] = torch.randn(d, d)
    t[p + "ff_proj.weight"] = torch.randn(2 * hidden, d)
    t[p + "ff_out.weight"] = torch.randn(d, hidden)
save_file(t, sys.argv[1])
PY
start=$(date +%s.%N)
target/release/olmo-train export-olmo "$WORK/ours" "$WORK/olmo/step1-unsharded" >/dev/null
echo "olmo-train export-olmo: model.pt written (and synced to disk) in $(python3 -c "import sys,time;print(round(time.time()-float(sys.argv[1]),2))" "$start") s"
cat "$WORK/ours/model.safetensors" "$WORK/olmo/step1-unsharded/model.pt" >/dev/null
target/release/examples/read_checkpoint "$WORK/ours"
target/release/examples/read_checkpoint "$WORK/olmo/step1-unsharded"
"$VENV/bin/python" - "$WORK" <<'PY'
import sys, time
import torch
from safetensors.torch import load_file
work = sys.argv[1]
# load_file maps the file and reads nothing until used: its tensors are copied into memory, as
# olmo-train's reader and torch.load put them there
for name, load in [
    (
        "safetensors load_file + copy",
        lambda: {k: v.clone() for k, v in load_file(f"{work}/ours/model.safetensors").items()},
    ),
    ("torch.load", lambda: torch.load(f"{work}/olmo/step1-unsharded/model.pt", weights_only=True)),
]:
    t = time.time()
    sd = load()
    s = time.time() - t
    gb = sum(v.numel() for v in sd.values()) * 4 / 1e9
    print(f"{name}: {gb:.2f} GB in {s:.2f} s: {gb / s:.2f} GB/s")
    del sd
PY
rm -rf "$WORK"
