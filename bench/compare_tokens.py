#!/usr/bin/env python3
"""Compares two tokenize outputs document by document through their csv indexes.
usage: compare_tokens.py OURS_DIR THEIRS_DIR [--dtype uint16]
A document is keyed by (id, file name of src, loc); its tokens must be identical."""
import argparse, csv, gzip, os, sys
import array

def load(d, dtype):
    docs = {}
    for f in sorted(os.listdir(d)):
        if not f.endswith(".npy"):
            continue
        a = array.array("H" if dtype == "uint16" else "I")
        with open(os.path.join(d, f), "rb") as fh:
            a.frombytes(fh.read())
        with gzip.open(os.path.join(d, f[:-4] + ".csv.gz"), "rt", newline="") as fh:
            for start, end, id_, src, loc in csv.reader(fh):
                docs[(id_, os.path.basename(src), int(loc))] = a[int(start):int(end)].tolist()
    return docs

ap = argparse.ArgumentParser()
ap.add_argument("ours"); ap.add_argument("theirs"); ap.add_argument("--dtype", default="uint16")
a = ap.parse_args()
o, t = load(a.ours, a.dtype), load(a.theirs, a.dtype)
same = sum(1 for k, v in t.items() if o.get(k) == v)
print(f"documents: ours {len(o)}, dolma {len(t)}, identical token sequences {same}")
for k in [k for k, v in t.items() if o.get(k) != v][:3]:
    print("  differs:", k, (o.get(k) or [])[:12], t[k][:12])
sys.exit(0 if same == len(t) == len(o) else 1)
