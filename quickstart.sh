#!/usr/bin/env bash
# The main job on the committed sample corpus: tag -> dedupe -> mix -> tokenize.
# (The CPU training run joins this script when olmo-train lands.)
set -euo pipefail
cd "$(dirname "$0")"
cargo build --release -q -p dolma
DOLMA=./target/release/dolma
mkdir -p out/sample
cp -r tests/data/sample/documents out/sample/
$DOLMA -c mixes/sample-tag.yaml tag
$DOLMA -c mixes/sample-dedupe.yaml dedupe
$DOLMA -c mixes/sample-mix.yaml mix
$DOLMA -c mixes/sample-tokenize.yaml tokenize
$DOLMA tokens-info out/sample/tokens --tokenizer tests/data/tokenizers/allenai_gpt-neox-olmo-dolma-v1_5.json --decode 1
echo "done: attributes in out/sample/attributes, mixed documents in out/sample/mixed, token shards in out/sample/tokens"
