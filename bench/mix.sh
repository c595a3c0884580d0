#!/usr/bin/env bash
# Benchmark `dolma mix` against dolma 1.2.1's Rust mixer on the same inputs and thread count,
# and check that both write the same documents (ids and texts, as multisets).
#
#   bench/mix.sh ROOT [PROCESSES]
#
# ROOT holds documents/<source>/*.json.gz and, beside them, attributes/{ft_lang_id_en_doc_v2,
# gopher_v1,pii_regex_with_counts_fast_v2}/... as written by `dolma tag` (either tool; for a
# parity check use attributes made by dolma 1.2.1). The mix keeps English documents, drops
# short and PII-heavy ones, and masks e-mail addresses, in JSONPath syntax.
# The reference runs from $DOLMA_VENV (default bench/.venv-dolma); SKIP_REFERENCE=1 skips it.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/common.sh
ROOT=$(cd "${1:?usage: bench/mix.sh ROOT [PROCESSES]}" && pwd)
PROCS=${2:-2}
WORK=$(mktemp -d /tmp/dolma-bench-mix.XXXXXX)
[ "${KEEP:-0}" = 1 ] || trap 'rm -rf "$WORK"' EXIT
config() {
  cat <<YAML
streams:
  - name: mixed
    documents:
      - $ROOT/documents/*/*.gz
    attributes: [ft_lang_id_en_doc_v2, gopher_v1, pii_regex_with_counts_fast_v2]
    output:
      path: $1
      max_size_in_bytes: 100000000
      discard_fields: [attributes]
    filter:
      include:
        - "\$.attributes[?(@.ft_lang_id_en_doc_v2__ft_lang_id_en_doc_v2__en[0][2] > 0.5)]"
      exclude:
        - "\$.attributes[?(@.gopher_v1__gopher_v1__word_count[0][2] < 20)]"
        - "\$.attributes[?(@.pii_regex_with_counts_fast_v2__pii_regex_with_counts_fast_v2__doc_count[0][2] > 10)]"
    span_replacement:
      - span: "\$.attributes.pii_regex_with_counts_fast_v2__pii_regex_with_counts_fast_v2__EMAIL_ADDRESS"
        min_score: 0.5
        replacement: " |||EMAIL_ADDRESS||| "
processes: $PROCS
YAML
}
config "$WORK/ours" > "$WORK/ours.yaml"
config "$WORK/ref" > "$WORK/ref.yaml"
read -r DOCS BYTES < <(corpus_stats "$ROOT/documents")
echo "input: $ROOT: $DOCS docs, $((BYTES / 1000000)) MB of text; $PROCS threads; work dir $WORK"
cargo build --release -q -p dolma
sync
start=$(date +%s.%N)
./target/release/dolma -c "$WORK/ours.yaml" mix --no-progress 2>"$WORK/ours.log" || { cat "$WORK/ours.log"; exit 1; }
end=$(date +%s.%N)
grep "^mix: stream" "$WORK/ours.log" || true
OURS=$(python3 -c "print($end - $start)")
python3 -c "print(f'ours:  {$OURS:7.2f} s  {$DOCS/$OURS:9.0f} docs/s  {$BYTES/1e6/$OURS:7.1f} MB/s')"
if [ "${SKIP_REFERENCE:-0}" = 1 ]; then
  exit 0
fi
VENV=$(reference_dolma)
start=$(date +%s.%N)
"$VENV/bin/dolma" -c "$WORK/ref.yaml" mix >"$WORK/ref.log" 2>&1 || { tail -20 "$WORK/ref.log"; exit 1; }
end=$(date +%s.%N)
REF=$(python3 -c "print($end - $start)")
python3 -c "print(f'dolma: {$REF:7.2f} s  {$DOCS/$REF:9.0f} docs/s  {$BYTES/1e6/$REF:7.1f} MB/s')"
python3 -c "print(f'speed-up: {$REF/$OURS:.1f}x')"
python3 - "$WORK/ours" "$WORK/ref" <<'PY'
import collections, glob, gzip, json, sys
def docs(d):
    return collections.Counter(
        (x["id"], x["text"]) for f in glob.glob(d + "/*.gz") for x in map(json.loads, gzip.open(f, "rt")))
o, r = docs(sys.argv[1]), docs(sys.argv[2])
print(f"documents: ours {sum(o.values())}, dolma {sum(r.values())}, identical multisets: {o == r}")
sys.exit(0 if o == r else 1)
PY
