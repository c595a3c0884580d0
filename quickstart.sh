#!/usr/bin/env bash
# The main job on the committed sample corpus: tag, then dedupe paragraphs.
# (mix, tokenize and training join this script as those stages land.)
set -euo pipefail
cd "$(dirname "$0")"
cargo build --release -q -p dolma
DOLMA=./target/release/dolma
mkdir -p out/sample
cp -r tests/data/sample/documents out/sample/
$DOLMA -c mixes/sample-tag.yaml tag
$DOLMA -c mixes/sample-dedupe.yaml dedupe
echo "done: attributes under out/sample/attributes/ (core, dedupe_paragraphs)"
