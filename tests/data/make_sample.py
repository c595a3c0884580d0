#!/usr/bin/env python3
"""Rebuilds tests/data/sample from ../shared/corpus: a deterministic every-k-th-line subset
per source (see SOURCES), gzip-compressed. Run from the repository root."""
import gzip
import json
import os
import sys

SRC = os.path.join("..", "shared", "corpus", "documents")
DST = os.path.join("tests", "data", "sample", "documents")
# source -> documents to keep
SOURCES = {
    "brown-corpus": 60,
    "debian-handbook": 150,
    "email-spamassassin": 300,
    "fortunes": 2000,
    "gnome-user-docs": 600,
    "nlp-corpus": 1000,
    "python-docs": 40,
}

def main() -> None:
    if not os.path.isdir(SRC):
        sys.exit(f"{SRC} not found: this script needs the shared corpus beside the repository")
    for source, keep in SOURCES.items():
        files = sorted(os.listdir(os.path.join(SRC, source)))
        lines = []
        for f in files:
            with gzip.open(os.path.join(SRC, source, f), "rt", encoding="utf-8") as fh:
                lines.extend(fh)
        step = max(1, len(lines) // keep)
        picked = lines[::step][:keep]
        os.makedirs(os.path.join(DST, source), exist_ok=True)
        out = os.path.join(DST, source, f"{source}-0000.json.gz")
        with gzip.GzipFile(out, "wb", mtime=0) as fh:
            for ln in picked:
                json.loads(ln)  # fail loudly on anything odd
                fh.write(ln.encode("utf-8"))
        print(source, len(picked), os.path.getsize(out))

if __name__ == "__main__":
    main()
