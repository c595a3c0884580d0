#!/usr/bin/env bash
# One run handed between OLMo's own trainer (the `ai2-olmo` 0.6.0 package, on CPU through
# bench/olmo_run.py) and olmo-train, both ways, on the sample corpus's shards:
#   B: OLMo trains 8 steps, saving step 4; olmo-train resumes that checkpoint (read without
#      Python) for steps 5-8;
#   A: olmo-train trains 8 steps, saving step4; `export-olmo` writes it as OLMo's unsharded
#      checkpoint; OLMo resumes it for steps 5-8;
# for each of VARIANTS (below: model blocks, optimizers, clipping, schedules, DDP and FSDP
# ranks), then OLMo's start-from-checkpoint OPTIONS. Each pair should train alike
# (bench/olmo_compare.py): the same loss and LR at each step to float32 rounding, the grad
# norm to OLMo's CPU rounding of it, and the same instances in each batch on each rank
# (data-indices, OLMo's format on both sides).
#
#   bench/olmo_interop.sh        (OLMO_VENV: a venv with torch and ai2-olmo 0.6.0, default
#                                 bench/.venv-olmo, made on first use; WORK: default
#                                 /tmp/olmo-interop; VARIANTS, OPTIONS: default all)
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
# Model and optimizer variants, as command-line overrides both trainers take: OLMo's blocks;
# OLMo 2's (RMSNorm with weights, norms after, q/k norms, untied output, norms and biases
# decayed); Llama's with grouped-query attention and a linear schedule; clip_qkv with OLMo's
# LionW and adaptive clipping, embeddings decayed; a schedule in tokens (inverse square root,
# warmup_min_lr) and a max_duration in tokens; clipping at every step (and t_max); and OLMo's
# block on two ranks (both trainers launched by torchrun, 16 windows a rank), each rank's
# batches compared: DDP; and FSDP, where olmo-train resumes OLMo's sharded checkpoint
# (torch_new: a torch.distributed.checkpoint folder) and OLMo's FSDP path the export.
variant_overrides() {
  local rms="--model.layer_norm_type=rms --model.layer_norm_with_affine=true --model.weight_tying=false"
  case $1 in
    olmo | ddp2) ;;
    fsdp2) echo "--distributed_strategy=fsdp --sharded_checkpointer=torch_new --save_interval=4" ;;
    olmo2) echo "$rms --model.layer_norm_eps=1e-6 --model.rope_theta=500000 --model.norm_after=true" \
      "--model.attention_layer_norm=true --optimizer.decay_norm_and_bias=true" ;;
    llama-gqa) echo "$rms --model.n_kv_heads=2 --scheduler.name=linear_with_warmup" ;;
    clip-lion) echo "--model.clip_qkv=0.5 --optimizer.name=lionw --optimizer.learning_rate=3e-4" \
      "--max_grad_norm_ratio=1.2 --optimizer.decay_embeddings=true" ;;
    tokens) echo "--max_duration=16384T --scheduler.name=inverse_sqrt_with_warmup --scheduler.units=tokens" \
      "--scheduler.t_warmup=6144 --scheduler.warmup_min_lr=3e-4" ;;
    clip) echo "--max_grad_norm=0.6 --scheduler.t_max=12" ;;
    *) echo "unknown variant $1" >&2; exit 2 ;;
  esac
}
VARIANTS=${VARIANTS:-olmo olmo2 llama-gqa clip-lion tokens clip ddp2 fsdp2}
# run NAME ARGS...: OLMo's trainer or olmo-train on run.yaml, in $W, launched as $variant asks
log() { echo "$W/$1.log"; }
olmo() { local name=$1; shift; "${olmo_launch[@]}" bench/olmo_run.py "$WORK/run.yaml" "$W/$name.jsonl" "$@" \
  >"$(log "$name")" 2>&1 || { tail -20 "$(log "$name")"; exit 1; }; }
ours() { local name=$1; shift; "${ours_launch[@]}" "$BIN" train "$WORK/run.yaml" "$@" \
  >"$(log "$name")" 2>&1 || { tail -20 "$(log "$name")"; exit 1; }; }
status=0
for variant in $VARIANTS; do
  W=$WORK/$variant
  mkdir -p "$W"
  # shellcheck disable=SC2046 # the overrides are words
  set -- $(variant_overrides "$variant")
  ranks=1 olmo_launch=("$PY") ours_launch=()
  resume=step4-unsharded
  [ "$variant" = fsdp2 ] && resume=step4
  if [ "$variant" = ddp2 ] || [ "$variant" = fsdp2 ]; then
    ranks=2
    olmo_launch=("$VENV/bin/torchrun" --standalone --nproc_per_node=2)
    ours_launch=("${olmo_launch[@]}" --no-python)
  fi
  echo "== $variant ${*:-(the config as it stands)}"
  echo "   OLMo: steps 1-8; olmo-train resumes its $resume"
  olmo olmo --save_folder="$W/olmo" "$@"
  ours b --save_folder="$W/b" --load_path="$W/olmo/$resume" "$@"
  echo "   olmo-train: steps 1-8; OLMo resumes its step 4, exported"
  ours ours --save_folder="$W/ours" --save_interval=4 "$@"
  "$BIN" export-olmo "$W/ours/step4" "$W/ours-step4-unsharded" >/dev/null
  olmo a --save_folder="$W/a" --load_path="$W/ours-step4-unsharded" "$@"
  "$PY" bench/olmo_compare.py "$W" "$ranks" || status=1
done

# OLMo's options for starting from a checkpoint: OLMo and olmo-train each resume OLMo's step 4
# (of the `olmo` variant) with the option, and must train alike.
OPTIONS=${OPTIONS:-reset_optimizer_state reset_trainer_state fast_forward_batches=2 restore_dataloader=false}
ck=$WORK/olmo/olmo/step4-unsharded
if [ -n "$OPTIONS" ] && [ -d "$ck" ]; then
  W=$WORK/options ranks=1 olmo_launch=("$PY") ours_launch=()
  mkdir -p "$W"
  pairs=()
  for opt in $OPTIONS; do
    name=${opt%%=*}
    [ "$opt" = "$name" ] && opt=$opt=true
    echo "== resuming OLMo's step 4 with --$opt"
    olmo "olmo-$name" --save_folder="$W/olmo-$name" --load_path="$ck" "--$opt"
    ours "ours-$name" --save_folder="$W/ours-$name" --load_path="$ck" "--$opt"
    pairs+=("--$opt: OLMo | olmo-train" "olmo-$name" "ours-$name")
  done
  "$PY" bench/olmo_compare.py "$W" 1 "${pairs[@]}" || status=1
elif [ -n "$OPTIONS" ]; then
  echo "== resume options skipped: they start from the olmo variant's checkpoint ($ck)"
fi
exit $status

