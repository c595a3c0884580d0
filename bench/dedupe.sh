#!/usr/bin/env bash
# Benchmark `dolma dedupe` (paragraph mode) against dolma 1.2.1's Rust deduper on the same
# files and thread count, and check that both mark the same paragraphs.
#
#   bench/dedupe.sh [CORPUS_DOCUMENTS_DIR] [PROCESSES]
#
# Defaults: ../shared/corpus/documents and 2 threads. The reference runs from $DOLMA_VENV
# (default bench/.venv-dolma, created with pip when missing); SKIP_REFERENCE=1 skips it.
# Prints docs/s, MB/s and peak RSS of both, and the filter's size.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/common.sh
ROOT=$(pwd)
CORPUS=$(corpus_dir "${1:-}")
PROCS=${2:-2}
WORK=$(mktemp -d /tmp/dolma-bench-dedupe.XXXXXX)
[ "${KEEP:-0}" = 1 ] || trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/ours" "$WORK/ref"
cp -r "$CORPUS" "$WORK/ours/documents"
cp -r "$CORPUS" "$WORK/ref/documents"
sync  # let the copies reach the disk before timing anything
read -r DOCS BYTES < <(corpus_stats "$CORPUS")
echo "corpus: $CORPUS: $DOCS docs, $((BYTES / 1000000)) MB of text; $PROCS threads; work dir $WORK"
ARGS=(--dedupe.name para_dedupe --dedupe.paragraphs.attribute_name bff_duplicate_paragraph_spans
      --bloom_filter.estimated_doc_count 10000000 --bloom_filter.desired_false_positive_rate 1e-6
      --processes "$PROCS")

cargo build --release -q -p dolma
/usr/bin/time -f "%e %M" -o "$WORK/ours.time" ./target/release/dolma dedupe \
  --documents "$WORK/ours/documents/*/*.gz" "${ARGS[@]}" --bloom_filter.file "$WORK/ours/filter.bin" \
  --no-progress 2>"$WORK/ours.log" || { cat "$WORK/ours.log"; exit 1; }
grep -E "^(dedupe|bloom)" "$WORK/ours.log" || true
read -r OURS OURS_KB < "$WORK/ours.time"
python3 -c "print(f'ours:  {$OURS:7.2f} s  {$DOCS/$OURS:9.0f} docs/s  {$BYTES/1e6/$OURS:7.1f} MB/s  peak RSS {$OURS_KB/1024:.0f} MiB')"

if [ "${SKIP_REFERENCE:-0}" = 1 ]; then
  exit 0
fi
VENV=$(reference_dolma)
(cd "$WORK/ref" && /usr/bin/time -f "%e %M" -o "$WORK/ref.time" "$VENV/bin/dolma" dedupe \
  --documents "$WORK/ref/documents/*/*.gz" "${ARGS[@]}" --bloom_filter.file "$WORK/ref/filter.bin" \
  --no-bloom_filter.read_only >"$WORK/ref.log" 2>&1) || { tail -20 "$WORK/ref.log"; exit 1; }
read -r REF REF_KB < "$WORK/ref.time"
python3 -c "print(f'dolma: {$REF:7.2f} s  {$DOCS/$REF:9.0f} docs/s  {$BYTES/1e6/$REF:7.1f} MB/s  peak RSS {$REF_KB/1024:.0f} MiB')"
python3 -c "print(f'speed-up: {$REF/$OURS:.1f}x')"
if [ "$PROCS" = 1 ]; then
  python3 bench/compare_dedupe.py "$WORK/ours/attributes/para_dedupe" "$WORK/ref/attributes/para_dedupe" \
    --docs "$WORK/ref/documents"
else
  echo "(span comparison needs PROCESSES=1: dolma keeps whichever copy a thread sees first)"
fi
