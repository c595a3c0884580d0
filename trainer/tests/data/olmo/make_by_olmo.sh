#!/usr/bin/env bash
# Makes by-olmo/: a checkpoint OLMo's own trainer wrote, and what it did next, for
# tests/train.rs. OLMo 0.6.0 (`ai2-olmo`, through bench/olmo_run.py: its Trainer on CPU, one
# DDP rank, fp32) trains the model of the tests' `Run::config` on the tests' periodic token
# files for 52 steps (an epoch is 48: 384 windows of 16 tokens, 8 a batch), saving an unsharded
# checkpoint every 2 steps. Kept: step2-unsharded and step46-unsharded (two steps before the
# epoch ends), each step's metrics as OLMo reported them (loss, LR, grad norm) and its
# data-indices (the instances of each batch). Then the same model on two FSDP ranks for 4 steps
# (under torchrun, 4 windows a rank), saving sharded checkpoints with OLMo's `torch_new`
# checkpointer: kept, by-olmo/fsdp/ with step2/ (model_and_optim/ as
# torch.distributed.checkpoint writes it, train/rank{0,1}.pt), the metrics and each rank's
# data-indices.
#
#   trainer/tests/data/olmo/make_by_olmo.sh    (OLMO_VENV: default bench/.venv-olmo, made by
#                                               bench/olmo_interop.sh)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../../../.." && pwd)
PY=${OLMO_VENV:-$root/bench/.venv-olmo}/bin/python
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# The tests' Run::new: 4096 and 2048 tokens of 3 1 4 1 5 9 2 6 5 3 5 repeating, uint16.
"$PY" - "$work" <<'PYEOF'
import sys
import numpy as np
for name, n in [("a.npy", 4096), ("b.npy", 2048)]:
    period = np.array([3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5], dtype=np.uint16)
    np.resize(period, n).astype("<u2").tofile(f"{sys.argv[1]}/{name}")
PYEOF
# Run::config's model and optimizer, with OLMo's defaults spelled out where ours differ
# (embedding_size: OLMo's is 50304; ours rounds vocab_size up to 128).
cat > "$work/run.yaml" <<YAML
model:
  d_model: 16
  n_heads: 2
  n_layers: 1
  vocab_size: 16
  embedding_size: 128
  max_sequence_length: 16
  rope: true
  include_bias: false
  layer_norm_with_affine: false
  attention_dropout: 0
  residual_dropout: 0
  embedding_dropout: 0
  init_device: cpu
optimizer:
  name: adamw
  learning_rate: 1.0e-2
  weight_decay: 0.1
scheduler:
  name: cosine_with_warmup
  t_warmup: 3
data:
  paths: [$work/a.npy, $work/b.npy]
  num_workers: 0
global_train_batch_size: 8
device_train_microbatch_size: 8
max_grad_norm: 1.0
precision: fp32
distributed_strategy: ddp
max_duration: 52
stop_at: 52
save_folder: $work/run
save_interval: 1000
save_interval_unsharded: 2
save_num_unsharded_checkpoints_to_keep: -1
no_pre_train_checkpoint: true
YAML
(cd "$root" && "$PY" bench/olmo_run.py "$work/run.yaml" "$work/metrics.jsonl") > "$work/log" 2>&1 || {
  tail -20 "$work/log"; exit 1; }
rm -rf "$here/by-olmo" && mkdir -p "$here/by-olmo"
cp -r "$work/run/step2-unsharded" "$work/run/step46-unsharded" "$here/by-olmo/"
cp "$work/run/data-indices/rank0.tsv" "$here/by-olmo/data-indices.tsv"
# keep FROM TO: each step's loss, grad norm and LR from OLMo's metrics
keep() {
  "$PY" - "$1" "$2" <<'PYEOF'
import json, sys
keys = ["step", "train/CrossEntropyLoss", "optim/total_grad_norm", "optim/learning_rate_group0"]
with open(sys.argv[2], "w") as out:
    for line in open(sys.argv[1]):
        m = json.loads(line)
        out.write(json.dumps({k: m[k] for k in keys}) + "\n")
PYEOF
}
keep "$work/metrics.jsonl" "$here/by-olmo/metrics.jsonl"
(cd "$root" && "$(dirname "$PY")/torchrun" --standalone --nproc_per_node=2 bench/olmo_run.py \
  "$work/run.yaml" "$work/fsdp-metrics.jsonl" --save_folder="$work/fsdp" --distributed_strategy=fsdp \
  --sharded_checkpointer=torch_new --save_interval=2 --save_interval_unsharded=null \
  --device_train_microbatch_size=4 --max_duration=4 --stop_at=4) > "$work/fsdp-log" 2>&1 || {
  tail -20 "$work/fsdp-log"; exit 1; }
mkdir -p "$here/by-olmo/fsdp"
cp -r "$work/fsdp/step2" "$here/by-olmo/fsdp/"
cp "$work/fsdp/data-indices/rank0.tsv" "$work/fsdp/data-indices/rank1.tsv" "$here/by-olmo/fsdp/"
keep "$work/fsdp-metrics.jsonl" "$here/by-olmo/fsdp/metrics.jsonl"
find "$here/by-olmo" -type f | sort | xargs ls -l
