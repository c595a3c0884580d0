#!/usr/bin/env bash
# One run handed between OLMo's own trainer (the `ai2-olmo` 0.6.0 package, on CPU through
# bench/olmo_run.py) and olmo-train, both ways, on the sample corpus's shards:
#   B: OLMo trains 8 steps, saving step4-unsharded; olmo-train resumes that checkpoint (read
#      without Python) for steps 5-8;
#   A: olmo-train trains 8 steps, saving step4; `export-olmo` writes it as OLMo's unsharded
#      checkpoint; OLMo resumes it for steps 5-8.
# Each resumed run should match the run that never stopped: the same loss, grad norm and LR
# at each step to float32 rounding (the two engines add in different orders), and the same
# instances in each batch (data-indices, OLMo's format on both sides), compared row by row.
#
#   bench/olmo_interop.sh        (OLMO_VENV: a venv with torch and ai2-olmo 0.6.0, default
#                                 bench/.venv-olmo, made on first use; WORK: default
#                                 /tmp/olmo-interop)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${OLMO_VENV:-bench/.venv-olmo}
. bench/common.sh
if ! "$VENV/bin/python" -c "import olmo.train" 2>/dev/null; then
  python_venv "$VENV" "torch, numpy, yaml" torch numpy pyyaml
  # ai2-olmo 0.6.0 pins torch < 2.5 and numpy < 2, which PyPI no longer has for new Pythons;
  # its code runs on today's, so it goes in without its pins and its imports go in by hand.
  "$VENV/bin/pip" install -q --no-deps ai2-olmo==0.6.0
  "$VENV/bin/pip" install -q omegaconf rich boto3 google-cloud-storage cached_path datasets \
    importlib_resources torchmetrics msgspec wandb scikit-learn packaging tokenizers safetensors
fi
if [ ! -f out/sample/tokens/part-00000-00001.npy ]; then
  ./quickstart.sh >/dev/null 2>&1
fi
cargo build --release -q -p olmo-train
BIN=./target/release/olmo-train
WORK=${WORK:-/tmp/olmo-interop}
rm -rf "$WORK" && mkdir -p "$WORK"
# A config both trainers read as it stands: OLMo's field names, its defaults for the rest.
# fp32 on both sides; one DDP rank (OLMo's FSDP needs CUDA); stop_at, because OLMo's fit
# otherwise runs 10 steps past max_duration.
cat > "$WORK/run.yaml" <<EOF
run_name: interop
seed: 6198
model:
  d_model: 128
  n_heads: 4
  n_layers: 2
  mlp_ratio: 4
  vocab_size: 4096
  embedding_size: 4096
  max_sequence_length: 64
  rope: true
  include_bias: false
  attention_dropout: 0.0
  residual_dropout: 0.0
  embedding_dropout: 0.0
  layer_norm_type: default
  layer_norm_with_affine: false
  weight_tying: true
  init_fn: normal
  init_std: 0.02
  init_device: cpu
  eos_token_id: 0
  pad_token_id: 1
optimizer:
  name: adamw
  learning_rate: 3.0e-3
  weight_decay: 0.1
  betas: [0.9, 0.95]
  eps: 1.0e-8
scheduler:
  name: cosine_with_warmup
  t_warmup: 3
  alpha_f: 0.1
tokenizer:
  identifier: out/sample/tokenizer.json
data:
  paths: [out/sample/tokens/part-00000-00000.npy, out/sample/tokens/part-00000-00001.npy]
  memmap_dtype: uint16
  num_workers: 0
precision: fp32
distributed_strategy: ddp
global_train_batch_size: 32
device_train_microbatch_size: 16
max_duration: 8
stop_at: 8
max_grad_norm: 1.0
softmax_auxiliary_loss: true
auxiliary_loss_multiplier: 1.0e-4
save_interval: 1000
save_interval_unsharded: 4
save_num_unsharded_checkpoints_to_keep: -1
no_pre_train_checkpoint: true
save_overwrite: true
console_log_interval: 1
EOF
PY="$VENV/bin/python"
olmo() { "$PY" bench/olmo_run.py "$@" >"$WORK/$(basename "$2" .jsonl).log" 2>&1 || {
  tail -20 "$WORK/$(basename "$2" .jsonl).log"; exit 1; }; }
ours() { "$BIN" train "$WORK/run.yaml" "$@" >"$WORK/$(basename "${1#*=}").log" 2>&1 || {
  tail -20 "$WORK/$(basename "${1#*=}").log"; exit 1; }; }

echo "== OLMo: steps 1-8"
olmo "$WORK/run.yaml" "$WORK/olmo.jsonl" --save_folder="$WORK/olmo"
echo "== B: olmo-train resumes OLMo's step4-unsharded"
ours --save_folder="$WORK/b" --load_path="$WORK/olmo/step4-unsharded"
echo "== olmo-train: steps 1-8"
ours --save_folder="$WORK/ours" --save_interval=4
echo "== A: OLMo resumes olmo-train's step4, exported"
"$BIN" export-olmo "$WORK/ours/step4" "$WORK/ours-step4-unsharded" >/dev/null
olmo "$WORK/run.yaml" "$WORK/a.jsonl" --save_folder="$WORK/a" --load_path="$WORK/ours-step4-unsharded"

"$PY" - "$WORK" <<'EOF'
import gzip, json, sys
work = sys.argv[1]

def metrics(path):
    rows = {}
    for line in open(path):
        m = json.loads(line)
        if "train/CrossEntropyLoss" in m:
            rows[int(m["step"]) if "step" in m else int(m["_step"])] = m
    return rows

def indices(path):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        return {int(s): i for s, i in (l.rstrip("\n").split("\t", 1) for l in f if l.strip())}

KEYS = [("train/CrossEntropyLoss", "loss"), ("optim/total_grad_norm", "grad norm"),
        ("optim/learning_rate_group0", "lr")]
ok = True
for name, straight, resumed, s_idx, r_idx in [
    ("B (OLMo -> olmo-train)", f"{work}/olmo.jsonl", f"{work}/b/metrics.jsonl",
     f"{work}/olmo/data-indices.tsv", f"{work}/b/data-indices/rank0.tsv.gz"),
    ("A (olmo-train -> OLMo)", f"{work}/ours/metrics.jsonl", f"{work}/a.jsonl",
     f"{work}/ours/data-indices/rank0.tsv.gz", f"{work}/a/data-indices.tsv"),
]:
    s, r = metrics(straight), metrics(resumed)
    si, ri = indices(s_idx), indices(r_idx)
    worst = {key: 0.0 for key, _ in KEYS}
    print(f"\n{name}: the run that never stopped | the resumed one")
    print("step | " + " | ".join(f"{label:>27}" for _, label in KEYS) + " | batch")
    for step in range(5, 9):
        if step not in r or step not in s:
            print(f"{step:4} | missing"); ok = False; continue
        cells = []
        for key, _ in KEYS:
            a, b = float(s[step][key]), float(r[step][key])
            worst[key] = max(worst[key], abs(a - b) / max(abs(a), 1e-30))
            cells.append(f"{a:.8g} {b:.8g}")
        same = si.get(step) is not None and si.get(step) == ri.get(step)
        ok &= same
        print(f"{step:4} | " + " | ".join(f"{c:>27}" for c in cells) + f" | {'same' if same else 'DIFFERENT'}")
    print("largest relative difference: " + ", ".join(f"{label} {worst[key]:.1e}" for key, label in KEYS))
    # The grad norm's bound is looser: OLMo's on CPU is torch's float32 vector_norm per tensor,
    # which loses up to ~1e-4 on the 524k-element embedding.
    ok &= worst["train/CrossEntropyLoss"] < 1e-6 and worst["optim/learning_rate_group0"] < 1e-6
    ok &= worst["optim/total_grad_norm"] < 2e-4
print(f"\n{'PASS' if ok else 'FAIL'}: the resumed runs match the ones that never stopped")
sys.exit(0 if ok else 1)
EOF
