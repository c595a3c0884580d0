#!/usr/bin/env bash
# Benchmark olmo-train on CPU against the same model in PyTorch, and check it end to end:
#  1. tokenizes ../shared/corpus with the quickstart's 4096-token BPE (trained on the sample
#     mix when missing), ~2M tokens per file, and holds the last file out;
#  2. trains the tiny config for STEPS steps on the rest, with held-out perplexity (and the
#     unigram baseline) every 250 steps; prints tokens/s;
#  3. times the identical model, batch and optimizer in PyTorch (bench/torch_olmo.py) on the
#     same thread count;
#  4. scores the held-out file with the final checkpoint in the PyTorch twin and, exported with
#     `olmo-train export-hf`, in transformers' OlmoForCausalLM: all three must agree.
#
#   bench/train.sh [STEPS] [THREADS]      (TORCH_VENV: a venv with torch, default bench/.venv-torch)
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${1:-1500}
THREADS=${2:-2}
CORPUS=../shared/corpus/documents
if [ ! -d "$CORPUS" ]; then
  echo "corpus $CORPUS not found: this benchmark needs ../shared/corpus (not part of a clone)" >&2
  exit 1
fi
VENV=${TORCH_VENV:-bench/.venv-torch}
. bench/common.sh
python_venv "$VENV" "torch, yaml, safetensors, transformers" torch numpy pyyaml safetensors transformers
cargo build --release -q -p dolma -p olmo-train
WORK=${WORK:-/tmp/olmo-train-bench}
mkdir -p "$WORK"
TOK=out/sample/tokenizer.json
if [ ! -f "$TOK" ]; then
  # The quickstart's vocabulary, trained on the sample mix (one trained on the raw sample
  # documents splits the corpus differently: 49.2M tokens, not the 58.7M the README's numbers
  # are for): tag, dedupe and mix the sample as the quickstart does.
  mkdir -p out/sample
  cp -r tests/data/sample/documents out/sample/
  for stage in tag dedupe mix; do ./target/release/dolma -c mixes/sample-$stage.yaml $stage --no-progress; done
  ./target/release/dolma train-tokenizer --documents 'out/sample/mixed/*.jsonl.gz' \
    --vocab_size 4096 --output "$TOK"
fi
if [ ! -f "$WORK/tokens/.part-00000.done.json" ]; then
  ./target/release/dolma tokenize --documents "$(cd "$CORPUS" && pwd)/*/*.gz" --destination "$WORK/tokens" \
    --tokenizer.name_or_path "$TOK" --tokenizer.eos_token_id 0 --tokenizer.pad_token_id 1 \
    --dtype uint16 --max_size 2000000 --seed 3920 --processes "$THREADS" --no-progress
fi
FILES=("$WORK"/tokens/*.npy)
HELD=${FILES[-1]}
TRAIN=$(printf "'%s', " "${FILES[@]:0:${#FILES[@]}-1}")
sed -e "s|  paths: \['out/sample/tokens/part-00000-0000\[0-3\].npy'\]|  paths: [${TRAIN%, }]|" \
    -e "s|      paths: \[out/sample/tokens/part-00000-00004.npy\]|      paths: ['$HELD']\n    label_unused: x|" \
    -e "s|max_duration: 300|max_duration: $STEPS|" -e "s|eval_interval: 100|eval_interval: 250|" \
    -e "s|save_interval: 100|save_interval: 500|" -e "s|save_folder: out/sample/train|save_folder: $WORK/run|" \
    -e "s|sample-heldout|corpus-heldout|" -e "s|console_log_interval: 20|console_log_interval: 100|" \
    trainer/configs/tiny.yaml | sed '/label_unused/d' > "$WORK/tiny.yaml"
echo "== olmo-train, $THREADS threads: $(( ${#FILES[@]} - 1 )) training files, held out $(basename "$HELD")"
rm -rf "$WORK/run"
./target/release/olmo-train train -c "$WORK/tiny.yaml" --threads "$THREADS" 2>&1 | grep -v '^eval step' | tail -3
echo "== PyTorch, same model and batch, $THREADS threads"
"$VENV/bin/python" bench/torch_olmo.py bench "$WORK/tiny.yaml" --threads "$THREADS" --steps 30
echo "== held-out cross-entropy of the final checkpoint: olmo-train, PyTorch twin, transformers"
LAST=$(readlink "$WORK/run/latest")
grep -o '"eval/corpus-heldout/CrossEntropyLoss":[0-9.]*' "$WORK/run/metrics.jsonl" | tail -1
./target/release/olmo-train export-hf "$WORK/run/$LAST" "$WORK/hf" >/dev/null
"$VENV/bin/python" bench/torch_olmo.py check "$WORK/tiny.yaml" "$WORK/run/$LAST" "$HELD" --hf "$WORK/hf" 2>/dev/null
