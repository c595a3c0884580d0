#!/usr/bin/env bash
# Benchmark `dolma stat` against dolma 1.2.1's analyzer on the same attribute files and process
# count, and check that both give every histogram the same total and sum (to the last bits,
# which depend on the order files' sums are added in).
#
#   bench/stat.sh [CORPUS_DOCUMENTS_DIR] [PROCESSES]
#
# Defaults: ../shared/corpus/documents (the 128 MB development corpus) and 2 processes. The
# attributes are made first by this tool's `dolma tag` with the core taggers (not timed). The
# reference runs from $DOLMA_VENV (default bench/.venv-dolma); SKIP_REFERENCE=1 skips it.
# Prints attribute lines/s and MB/s (of compressed attribute files) for both.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/common.sh
ROOT=$(pwd)
CORPUS=$(corpus_dir "${1:-}")
PROCS=${2:-2}
WORK=$(mktemp -d /tmp/dolma-bench-stat.XXXXXX)
[ "${KEEP:-0}" = 1 ] || trap 'rm -rf "$WORK"' EXIT
cp -r "$CORPUS" "$WORK/documents"
cargo build --release -q -p dolma
DOLMA_FASTTEXT_LID_MODEL="$ROOT/tests/data/models/lid.176.ftz" ./target/release/dolma tag \
  --documents "$WORK/documents/*/*.gz" --experiment core --processes "$PROCS" --no-progress \
  --taggers char_length_v1 whitespace_tokenizer_v1 gopher_v1 c4_v2 pii_regex_with_counts_fast_v2 \
  repetitions_v1 ft_lang_id_en_doc_v2 2>"$WORK/tag.log" || { cat "$WORK/tag.log"; exit 1; }
ATTRS="$WORK/attributes/core/*/*.gz"
LINES=$(python3 -c "import glob,gzip,sys; print(sum(sum(1 for _ in gzip.open(f)) for f in glob.glob(sys.argv[1])))" "$ATTRS")
BYTES=$(python3 -c "import glob,os,sys; print(sum(os.path.getsize(f) for f in glob.glob(sys.argv[1])))" "$ATTRS")
echo "attributes: $LINES lines, $((BYTES / 1000000)) MB compressed; $PROCS processes; work dir $WORK"
sync
report() {
  python3 -c "import sys; s=float(sys.argv[1]); print(f'{sys.argv[2]}: {s:7.2f} s  {$LINES/s:9.0f} lines/s  {$BYTES/1e6/s:7.1f} MB/s')" "$1" "$2"
}
start=$(date +%s.%N)
./target/release/dolma stat --attributes "$ATTRS" --processes "$PROCS" --report "$WORK/ours" \
  --no-progress >"$WORK/ours.txt" 2>"$WORK/ours.log" || { cat "$WORK/ours.log"; exit 1; }
report "$(seconds_since "$start")" ours
grep "^stat: [0-9]" "$WORK/ours.log" || true
if [ "${SKIP_REFERENCE:-0}" = 1 ]; then
  exit 0
fi
VENV=$(reference_dolma)
start=$(date +%s.%N)
"$VENV/bin/dolma" stat --attributes "$ATTRS" --processes "$PROCS" --report "$WORK/ref" \
  >"$WORK/ref.txt" 2>&1 || { tail -20 "$WORK/ref.txt"; exit 1; }
report "$(seconds_since "$start")" "dolma 1.2.1"
python3 - "$WORK/ours/summaries.jsonl.gz" "$WORK/ref/summaries.jsonl.gz" <<'PY'
import gzip, json, sys
ours, ref = ({l["name"]: l for l in map(json.loads, gzip.open(p, "rt"))} for p in sys.argv[1:])
common = [n for n in ref if n in ours]
totals = sum(ours[n]["total"] == ref[n]["total"] for n in common)
exact = sum(ours[n]["sum"] == ref[n]["sum"] for n in common)
# dolma adds the files' sums in the order its summary files come back: the last bits differ
close = sum(abs(ours[n]["sum"] - ref[n]["sum"]) <= 1e-12 * max(abs(ref[n]["sum"]), 1.0) for n in common)
print(f"histograms: ours {len(ours)}, dolma {len(ref)}; same total: {totals}; same sum: {exact} (within 1e-12: {close})")
PY
