#!/usr/bin/env bash
# The same checkpoint scored three ways, for each block olmo-train implements: olmo-train's own
# held-out eval, the PyTorch twin (bench/torch_olmo.py, loading model.safetensors as OLMo names
# it) and transformers (after `olmo-train export-hf`): OLMo-1 blocks (OlmoForCausalLM, also with
# clip_qkv), pre-norm RMSNorm blocks (LlamaForCausalLM) and OLMo 2 blocks (Olmo2ForCausalLM), and
# grouped-query (Llama, 2 kv heads of 4) and multi-query (OLMo 2) attention. Each model
# trains STEPS steps of the tiny config on the sample corpus's shards (./quickstart.sh makes
# them), so the weights are far from their init; the three cross-entropies must agree to about
# 6 digits.
#
#   bench/hf_parity.sh [STEPS]      (TORCH_VENV: a venv with torch and transformers,
#                                    default bench/.venv-torch, made on first use)
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${1:-60}
VENV=${TORCH_VENV:-bench/.venv-torch}
. bench/common.sh
python_venv "$VENV" "torch, yaml, safetensors, transformers" torch numpy pyyaml safetensors transformers
if [ ! -f out/sample/tokens/part-00000-00004.npy ]; then
  ./quickstart.sh >/dev/null
fi
cargo build --release -q -p olmo-train
WORK=${WORK:-/tmp/olmo-train-hf-parity}
rm -rf "$WORK" && mkdir -p "$WORK"
HELD=out/sample/tokens/part-00000-00004.npy
RMS='  layer_norm_type: rms\n  layer_norm_with_affine: true\n  weight_tying: false'
OLMO2="$RMS\n  layer_norm_eps: 1.0e-6\n  rope_theta: 500000\n  norm_after: true\n  attention_layer_norm: true"
VARIANTS="olmo olmo-clip llama olmo2 llama-gqa olmo2-mqa"
for variant in $VARIANTS; do
  case $variant in
    olmo) block='  layer_norm_type: default\n  layer_norm_with_affine: false\n  weight_tying: true' ;;
    olmo-clip) block='  layer_norm_type: default\n  layer_norm_with_affine: false\n  weight_tying: true\n  clip_qkv: 0.1' ;;
    llama) block="$RMS" ;;
    olmo2) block="$OLMO2" ;;
    llama-gqa) block="$RMS\n  n_kv_heads: 2" ;;
    olmo2-mqa) block="$OLMO2\n  multi_query_attention: true" ;;
  esac
  sed -e "/^  layer_norm_type: default$/d" -e "/^  layer_norm_with_affine: false$/d" -e "/^  weight_tying: true$/d" \
      -e "s|^  rope: true$|  rope: true\n$block|" \
      -e "s|max_duration: 300|max_duration: $STEPS|" -e "s|eval_interval: 100|eval_interval: $STEPS|" \
      -e "s|save_interval: 100|save_interval: $STEPS|" -e "s|save_folder: out/sample/train|save_folder: $WORK/$variant|" \
      -e "/type: downstream/d" -e "/label: arc_easy/d" -e "/arc_easy_sample/d" \
      trainer/configs/tiny.yaml > "$WORK/$variant.yaml"
  echo "== $variant: $STEPS steps"
  ./target/release/olmo-train train -c "$WORK/$variant.yaml" 2>&1 | tail -1
  grep -o '"eval/sample-heldout/CrossEntropyLoss":[0-9.]*' "$WORK/$variant/metrics.jsonl" | tail -1
  ./target/release/olmo-train export-hf "$WORK/$variant/step$STEPS" "$WORK/$variant-hf" >/dev/null
  "$VENV/bin/python" bench/torch_olmo.py check "$WORK/$variant.yaml" "$WORK/$variant/step$STEPS" "$HELD" \
    --hf "$WORK/$variant-hf" 2>/dev/null
done
# The other way: a model transformers made and saved (random weights, norms included), read by
# `import-hf`, scored by olmo-train and by transformers.
for variant in $VARIANTS; do
  echo "== $variant: made by transformers, imported"
  "$VENV/bin/python" bench/hf_make.py "$WORK/$variant.yaml" "${variant%%-*}" "$WORK/$variant-made" 2>&1 | grep -v Warning
  ./target/release/olmo-train import-hf "$WORK/$variant-made" "$WORK/$variant-imported" -c "$WORK/$variant.yaml" 2>&1 | tail -1
  ./target/release/olmo-train eval -c "$WORK/$variant.yaml" --checkpoint "$WORK/$variant-imported" 2>/dev/null \
    | grep 'sample-heldout/CrossEntropyLoss'
  "$VENV/bin/python" bench/torch_olmo.py check "$WORK/$variant.yaml" "$WORK/$variant-imported" "$HELD" \
    --hf "$WORK/$variant-made" 2>&1 | grep -v Warning
done
