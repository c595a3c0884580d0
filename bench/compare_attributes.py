#!/usr/bin/env python3
"""Compares two attribute trees (ours vs dolma's) file by file and line by line.

usage: compare_attributes.py OURS_ROOT THEIRS_ROOT [--tol 1e-4] [--show 5]

Both roots hold `<tagger>/<source>/<file>.json.gz`. For every attribute key it counts values
(one value = one span's start, end and score) that agree: same start and end, score within tol.
Keys present on one side only count as disagreements. Prints a table per tagger and exits 1
if any tagger agrees on less than --min (default 0.99) of its values."""
import argparse
import gzip
import json
import os
import sys
from collections import defaultdict


def load(path):
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(l) for l in f]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("ours")
    ap.add_argument("theirs")
    ap.add_argument("--tol", type=float, default=1e-4)
    ap.add_argument("--min", type=float, default=0.99)
    ap.add_argument("--show", type=int, default=3)
    a = ap.parse_args()
    stats = defaultdict(lambda: [0, 0])  # tagger -> [agree, total]
    shown = defaultdict(int)
    for root, _, files in os.walk(a.theirs):
        for fn in files:
            if not fn.endswith(".gz"):
                continue
            tp = os.path.join(root, fn)
            rel = os.path.relpath(tp, a.theirs)
            tagger = rel.split(os.sep)[0]
            op = os.path.join(a.ours, rel)
            theirs = load(tp)
            ours = load(op) if os.path.exists(op) else []
            if len(ours) != len(theirs):
                print(f"{rel}: {len(ours)} lines vs {len(theirs)}")
            for lo, lt in zip(ours, theirs):
                assert lo["id"] == lt["id"], (rel, lo["id"], lt["id"])
                keys = set(lo["attributes"]) | set(lt["attributes"])
                for k in keys:
                    vo = lo["attributes"].get(k, [])
                    vt = lt["attributes"].get(k, [])
                    n = max(len(vo), len(vt))
                    agree = 0
                    for so, st in zip(vo, vt):
                        if so[0] == st[0] and so[1] == st[1] and abs(so[2] - st[2]) <= a.tol:
                            agree += 1
                    stats[tagger][0] += agree
                    stats[tagger][1] += n
                    if agree < n and shown[tagger] < a.show:
                        shown[tagger] += 1
                        print(f"  diff {tagger} {lt['id']} {k}: ours={vo[:4]} theirs={vt[:4]}")
    bad = False
    print(f"{'tagger':40s} {'agree':>10s} {'total':>10s} {'fraction':>9s}")
    for t, (ag, tot) in sorted(stats.items()):
        frac = ag / tot if tot else 1.0
        bad |= frac < a.min
        print(f"{t:40s} {ag:10d} {tot:10d} {frac:9.5f}")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
