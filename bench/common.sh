# Shared by the bench/*.sh scripts (sourced, not run).

# corpus_stats DIR: prints "<documents> <bytes of text>" over DIR's *.gz JSON lines.
corpus_stats() {
  python3 - "$1" <<'PY'
import gzip, json, os, sys
d = b = 0
for root, _, files in os.walk(sys.argv[1]):
    for f in files:
        if f.endswith(".gz"):
            with gzip.open(os.path.join(root, f), "rt", encoding="utf-8") as fh:
                for line in fh:
                    d += 1
                    b += len(json.loads(line)["text"].encode("utf-8"))
print(d, b)
PY
}

# reference_dolma: echoes the path of dolma 1.2.1's venv ($DOLMA_VENV, default
# bench/.venv-dolma), creating it with pip when missing.
reference_dolma() {
  local venv=${DOLMA_VENV:-bench/.venv-dolma}
  if [ ! -x "$venv/bin/dolma" ]; then
    python3 -m venv "$venv" >&2
    "$venv/bin/pip" install -q dolma==1.2.1 boto3==1.26.76 >&2
  fi
  (cd "$venv" && pwd)
}

# python_venv VENV "IMPORTS" PACKAGE...: makes VENV and pip-installs the packages into it
# unless its python can already `import IMPORTS` (comma-separated modules).
python_venv() {
  local venv=$1 imports=$2
  shift 2
  if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import $imports" 2>/dev/null; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q "$@"
  fi
}

# seconds_since START: elapsed seconds (float) since a `date +%s.%N` stamp.
seconds_since() {
  python3 -c "import sys, time; print(time.time() - float(sys.argv[1]))" "$1"
}

# corpus_dir [DIR]: echoes DIR (default ../shared/corpus/documents) as an absolute path, or
# says it is missing and fails: the benchmarks need ../shared, which a clone does not have.
corpus_dir() {
  local dir=${1:-../shared/corpus/documents}
  if [ ! -d "$dir" ]; then
    echo "corpus $dir not found: this benchmark needs ../shared/corpus (not part of a clone)" >&2
    return 1
  fi
  (cd "$dir" && pwd)
}
