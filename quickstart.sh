#!/usr/bin/env bash
# The main job on the committed sample corpus: tag -> dedupe -> mix -> tokenize -> a short
# CPU training run of a tiny OLMo-style model on the resulting shards.
set -euo pipefail
cd "$(dirname "$0")"
cargo build --release -q -p dolma -p olmo-train
BIN=${CARGO_TARGET_DIR:-target}/release
DOLMA=$BIN/dolma
mkdir -p out/sample
cp -r tests/data/sample/documents out/sample/
$DOLMA -c mixes/sample-tag.yaml tag
# How the tags are distributed (to choose the mix's thresholds): tables in stat.txt
$DOLMA stat --attributes 'out/sample/attributes/core' --report out/sample/stat > out/sample/stat.txt
$DOLMA -c mixes/sample-dedupe.yaml dedupe
$DOLMA -c mixes/sample-mix.yaml mix
# A small byte-level BPE vocabulary trained on the mix itself (tiny models train faster on it).
[ -f out/sample/tokenizer.json ] || $DOLMA train-tokenizer --documents 'out/sample/mixed/*.jsonl.gz' \
  --vocab_size 4096 --output out/sample/tokenizer.json
$DOLMA -c mixes/sample-tokenize.yaml tokenize
$DOLMA tokens-info out/sample/tokens --tokenizer out/sample/tokenizer.json --decode 1
"$BIN"/olmo-train train -c trainer/configs/tiny.yaml
echo "done: attributes in out/sample/attributes (their distributions in out/sample/stat.txt), mixed documents in out/sample/mixed, token shards in out/sample/tokens, training metrics, loss curves (loss.png) and checkpoints in out/sample/train"
