#!/usr/bin/env bash
# Benchmark `dolma tag` against the reference dolma 1.2.1 on the same files and process count.
#
#   bench/tag.sh [CORPUS_DOCUMENTS_DIR] [PROCESSES]
#
# Defaults: ../shared/corpus/documents (the 128 MB development corpus) and 2 processes.
# Taggers: the core set char_length_v1, whitespace_tokenizer_v1, gopher_v1, c4_v2,
# pii_regex_with_counts_fast_v2, repetitions_v1, ft_lang_id_en_doc_v2 (lid.176).
# The reference runs from a venv at $DOLMA_VENV (default bench/.venv-dolma), created with
# `pip install dolma==1.2.1 boto3==1.26.76` when missing; set SKIP_REFERENCE=1 to skip it.
# Prints docs/s and MB/s (of document text) for both, the speed-up, and checks that both
# produced the same attributes (bench/compare_attributes.py).
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/common.sh
ROOT=$(pwd)
CORPUS=$(corpus_dir "${1:-}")
PROCS=${2:-2}
MODEL="$ROOT/tests/data/models/lid.176.ftz"
TAGGERS=${TAGGERS:-"char_length_v1 whitespace_tokenizer_v1 gopher_v1 c4_v2 pii_regex_with_counts_fast_v2 repetitions_v1 ft_lang_id_en_doc_v2"}
WORK=$(mktemp -d /tmp/dolma-bench-tag.XXXXXX)
# KEEP=1 keeps the work directory (both attribute trees) for inspection.
[ "${KEEP:-0}" = 1 ] || trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/ours" "$WORK/ref"
cp -r "$CORPUS" "$WORK/ours/documents"
cp -r "$CORPUS" "$WORK/ref/documents"
sync  # let the copies reach the disk before timing anything
read -r DOCS BYTES < <(corpus_stats "$CORPUS")
echo "work directory: $WORK"
echo "corpus: $CORPUS: $DOCS docs, $((BYTES / 1000000)) MB of text; $PROCS processes"

cargo build --release -q -p dolma
start=$(date +%s.%N)
DOLMA_FASTTEXT_LID_MODEL="$MODEL" ./target/release/dolma tag --documents "$WORK/ours/documents/*/*.gz" \
  --taggers $TAGGERS --processes "$PROCS" --no-progress 2>"$WORK/ours.log" \
  || { cat "$WORK/ours.log"; exit 1; }
end=$(date +%s.%N)
OURS=$(python3 -c "print($end - $start)")
python3 -c "print(f'ours:  {$OURS:8.1f} s  {$DOCS/$OURS:10.0f} docs/s  {$BYTES/1e6/$OURS:8.2f} MB/s')"

if [ "${SKIP_REFERENCE:-0}" = 1 ]; then
  exit 0
fi
VENV=$(reference_dolma)
# dolma looks for lid.176 in its cache under the sha256 of the download URL.
export XDG_CACHE_HOME="$WORK/cache"
H=$(python3 -c "import hashlib;print(hashlib.sha256(b'https://dl.fbaipublicfiles.com/fasttext/supervised-models/lid.176.bin').hexdigest())")
mkdir -p "$XDG_CACHE_HOME/dolma" && cp "$MODEL" "$XDG_CACHE_HOME/dolma/$H.176.bin"
start=$(date +%s.%N)
(cd "$WORK/ref" && "$VENV/bin/dolma" tag --documents "$WORK/ref/documents/*/*.gz" --taggers $TAGGERS \
  --processes "$PROCS" >"$WORK/ref.log" 2>&1) || { tail -30 "$WORK/ref.log"; exit 1; }
end=$(date +%s.%N)
REF=$(python3 -c "print($end - $start)")
python3 -c "print(f'dolma: {$REF:8.1f} s  {$DOCS/$REF:10.0f} docs/s  {$BYTES/1e6/$REF:8.2f} MB/s')"
python3 -c "print(f'speed-up: {$REF/$OURS:.1f}x')"
python3 bench/compare_attributes.py "$WORK/ours/attributes" "$WORK/ref/attributes" --show 2
