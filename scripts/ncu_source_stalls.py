#!/usr/bin/env python3
"""Summarise ncu's per-instruction stall samples: the stall reasons over the kernel, then the instructions that hold
the most samples, each with its top reasons.

Input: the CSV of `ncu -i REPORT.ncu-rep --page source --csv --print-source sass` (plain or .xz), from a report taken
with `--section SourceCounters`. Usage: python3 scripts/ncu_source_stalls.py FILE.csv[.xz] [TOP]
"""
import csv, io, lzma, sys
from collections import Counter

path = sys.argv[1]
top = int(sys.argv[2]) if len(sys.argv) > 2 else 30
text = lzma.open(path, "rt").read() if path.endswith(".xz") else open(path).read()
rows = list(csv.reader(io.StringIO(text)))
header = next(r for r in rows if r and r[0] == "Address")
col = {h: i for i, h in enumerate(header)}
reasons = [h for h in header if h.startswith("stall_") and "Not Issued" not in h]
body = [r for r in rows[rows.index(header) + 1:] if len(r) == len(header)]
base = int(body[0][col["Address"]], 16)

total, per = Counter(), []
for r in body:
    s = {h: int(r[col[h]] or 0) for h in reasons}
    total.update(s)
    per.append((int(r[col["Address"]], 16) - base, r[col["Source"]].strip(),
                int(r[col["Warp Stall Sampling (All Samples)"]] or 0), s))
n = sum(total.values())
print(f"{n} samples; by reason: " + ", ".join(f"{k[6:]} {v / n:.1%}" for k, v in total.most_common(8)))
print("offset   samples  share  instruction  (top reasons)")
for off, src, k, s in sorted(per, key=lambda x: -x[2])[:top]:
    why = ", ".join(f"{h[6:]} {v}" for h, v in sorted(s.items(), key=lambda x: -x[1])[:2] if v)
    print(f"{off:#07x} {k:8d} {k / n:6.1%}  {src[:64]:64s} ({why})")
