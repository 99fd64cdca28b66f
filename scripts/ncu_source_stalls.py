#!/usr/bin/env python3
"""Summarise ncu's per-instruction stall samples: the stall reasons over the kernel, then the instructions that hold
the most samples, each with its top reasons.

Input: the CSV of `ncu -i REPORT.ncu-rep --page source --csv --print-source sass` (plain or .xz), from a report taken
with `--section SourceCounters`. Usage: python3 scripts/ncu_source_stalls.py FILE.csv[.xz] [TOP] [--by-opcode]
With --by-opcode: the samples summed by opcode (HMMA, LDSM, FADD, ...) instead of by instruction, each with the
instructions executed and its top reasons, to set two kernels' stall mixes side by side.
"""
import csv, io, lzma, sys
from collections import Counter

args = [a for a in sys.argv[1:] if a != "--by-opcode"]
by_opcode = "--by-opcode" in sys.argv[1:]
path = args[0]
top = int(args[1]) if len(args) > 1 else 30
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
                int(r[col["Warp Stall Sampling (All Samples)"]] or 0), s, int(r[col["Instructions Executed"]] or 0)))
n = sum(total.values())
print(f"{n} samples; by reason: " + ", ".join(f"{k[6:]} {v / n:.1%}" for k, v in total.most_common(8)))
if by_opcode:
    samples, executed, why = Counter(), Counter(), {}
    for _, src, k, s, e in per:
        words = src.split()
        op = (words[1] if words[0].startswith("@") else words[0]).split(".")[0] if words else "?"
        samples[op] += k
        executed[op] += e
        why.setdefault(op, Counter()).update(s)
    print("opcode   samples  share  executed (warp instructions)  (top reasons)")
    for op, k in samples.most_common(top):
        reasons_op = ", ".join(f"{h[6:]} {v}" for h, v in why[op].most_common(3) if v)
        print(f"{op:8s} {k:8d} {k / n:6.1%}  {executed[op]:14d}  ({reasons_op})")
    sys.exit(0)
print("offset   samples  share  instruction  (top reasons)")
for off, src, k, s, _ in sorted(per, key=lambda x: -x[2])[:top]:
    why = ", ".join(f"{h[6:]} {v}" for h, v in sorted(s.items(), key=lambda x: -x[1])[:2] if v)
    print(f"{off:#07x} {k:8d} {k / n:6.1%}  {src[:64]:64s} ({why})")
