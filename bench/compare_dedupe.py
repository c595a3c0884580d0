#!/usr/bin/env python3
"""Compares dedupe attribute trees (ours vs dolma's): per file and line, the set of marked
spans. usage: compare_dedupe.py OURS_ATTR_DIR THEIRS_ATTR_DIR [--min 0.999]
Agreement = spans marked by both / spans marked by either (over the whole corpus)."""
import argparse, gzip, json, os, sys

ap = argparse.ArgumentParser()
ap.add_argument("ours"); ap.add_argument("theirs"); ap.add_argument("--min", type=float, default=0.999)
ap.add_argument("--show", type=int, default=5)
ap.add_argument("--docs", help="documents dir: clamp dolma's spans to the text length (its paragraph "
                "offsets mix bytes and chars, so on non-ASCII text the last span ends past the text)")
a = ap.parse_args()
both = either = docs = 0
shown = 0
for root, _, files in os.walk(a.theirs):
    for f in files:
        tp = os.path.join(root, f); rel = os.path.relpath(tp, a.theirs)
        op = os.path.join(a.ours, rel)
        t = [json.loads(l) for l in gzip.open(tp, "rt")]
        if a.docs:
            texts = [json.loads(l)["text"] for l in gzip.open(os.path.join(a.docs, rel), "rt")]
            for lt, text in zip(t, texts):
                n = len(text)
                for v in lt["attributes"].values():
                    for s in v:
                        s[1] = min(s[1], n)
        o = [json.loads(l) for l in gzip.open(op, "rt")] if os.path.exists(op) else []
        if len(o) != len(t):
            print(f"{rel}: {len(o)} lines vs {len(t)}"); either += 1; continue
        for lo, lt in zip(o, t):
            assert lo["id"] == lt["id"]
            docs += 1
            so = {(s[0], s[1], round(s[2], 4)) for v in lo["attributes"].values() for s in v}
            st = {(s[0], s[1], round(s[2], 4)) for v in lt["attributes"].values() for s in v}
            both += len(so & st); either += len(so | st)
            if so != st and shown < a.show:
                shown += 1
                print(f"  diff {lt['id']}: only ours {sorted(so - st)[:4]} only theirs {sorted(st - so)[:4]}")
frac = both / either if either else 1.0
print(f"docs {docs}, spans marked by either {either}, by both {both}: agreement {frac:.5f}")
sys.exit(0 if frac >= a.min else 1)
