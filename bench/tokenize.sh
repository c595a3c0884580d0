#!/usr/bin/env bash
# Benchmark `dolma tokenize` against `dolma tokens` 1.2.1 on the same files and process count
# (NeoX tokenizer of OLMo-1/7B, eos 50279, pad 1, uint16), check that every document's token
# sequence is identical, and print our speed as a fraction of the tokenizers crate's raw
# `encode_batch` speed on the same texts (the practical ceiling).
#
#   bench/tokenize.sh [CORPUS_DOCUMENTS_DIR] [PROCESSES]
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/common.sh
CORPUS=$(corpus_dir "${1:-}")
PROCS=${2:-2}
TOK=$(pwd)/tests/data/tokenizers/allenai_gpt-neox-olmo-dolma-v1_5.json
WORK=$(mktemp -d /tmp/dolma-bench-tokenize.XXXXXX)
[ "${KEEP:-0}" = 1 ] || trap 'rm -rf "$WORK"' EXIT
cargo build --release -q -p dolma --example encode_ceiling
sync
ARGS=(--tokenizer.name_or_path "$TOK" --tokenizer.eos_token_id 50279 --tokenizer.pad_token_id 1 --dtype uint16 --processes "$PROCS")
start=$(date +%s.%N)
./target/release/dolma tokenize --documents "$CORPUS/*/*.gz" --destination "$WORK/ours" "${ARGS[@]}" --no-progress 2>"$WORK/ours.log" \
  || { cat "$WORK/ours.log"; exit 1; }
end=$(date +%s.%N)
OURS=$(python3 -c "print($end - $start)")
tail -1 "$WORK/ours.log"
read -r DOCS TOKENS < <(python3 - "$WORK/ours" <<'PY'
import gzip, os, sys
d = t = 0
for f in os.listdir(sys.argv[1]):
    if f.endswith(".csv.gz"):
        for row in gzip.open(os.path.join(sys.argv[1], f), "rt"):
            s, e = row.split(",", 2)[:2]
            d += 1; t += int(e) - int(s)
print(d, t)
PY
)
python3 -c "print(f'ours:  {$OURS:7.1f} s  {$DOCS/$OURS:8.0f} docs/s  {$TOKENS/$OURS:10.0f} tokens/s')"
CEIL=$(./target/release/examples/encode_ceiling "$TOK" "$CORPUS/*/*.gz" | tee /dev/stderr | sed -E 's/.* ([0-9]+) tokens\/s/\1/')
python3 -c "print(f'ours / raw encode_batch: {($TOKENS/$OURS)/$CEIL:.2f}')"
if [ "${SKIP_REFERENCE:-0}" = 1 ]; then
  exit 0
fi
VENV=$(reference_dolma)
start=$(date +%s.%N)
"$VENV/bin/dolma" tokens --documents "$CORPUS/*/*.gz" --destination "$WORK/ref" "${ARGS[@]}" >"$WORK/ref.log" 2>&1 \
  || { tail -20 "$WORK/ref.log"; exit 1; }
end=$(date +%s.%N)
REF=$(python3 -c "print($end - $start)")
python3 -c "print(f'dolma: {$REF:7.1f} s  {$DOCS/$REF:8.0f} docs/s  {$TOKENS/$REF:10.0f} tokens/s')"
python3 -c "print(f'speed-up: {$REF/$OURS:.1f}x')"
python3 bench/compare_tokens.py "$WORK/ours" "$WORK/ref"
