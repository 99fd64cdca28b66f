#!/usr/bin/env python3
"""Prints the markdown table of `make steps` from its CSV (pass,step,name,d,causal,N,ms,tflops; step 0 is PyTorch's
FlashAttention-2): one row per (pass, d, causal, step) with TFLOP/s at each N, then the geometric mean over N of
this step's speed against the step before, the final step and FlashAttention-2.

Usage: python3 scripts/steps_table.py steps.csv
"""
import csv
import math
import sys
from collections import defaultdict


def geomean_ratio(a, b, Ns):
    r = [a[N] / b[N] for N in Ns if a.get(N) and b.get(N)]
    return f"{math.exp(sum(map(math.log, r)) / len(r)):.2f}" if r else "-"


def main():
    tf = defaultdict(dict)  # (pass, d, causal, step) -> {N: TFLOP/s}
    names, Ns = {}, set()
    with open(sys.argv[1]) as f:
        for row in csv.DictReader(f):
            key = (row["pass"], int(row["d"]), int(row["causal"]), int(row["step"]))
            names[key[0], key[3]] = row["name"]
            N = int(row["N"])
            Ns.add(N)
            if row["tflops"]:
                tf[key][N] = float(row["tflops"])
    Ns = sorted(Ns)
    print("| pass | d | causal | step | " + " | ".join(f"N={N // 1024}k" if N >= 1024 else f"N={N}" for N in Ns)
          + " | x prev | x final | x FA2 |")
    print("|---|---|---|---|" + "---|" * len(Ns) + "---|---|---|")
    for pas, d, causal in sorted({k[:3] for k in tf}, key=lambda k: (k[0] != "fwd", k[1], k[2])):
        steps = sorted(s for (p, dd, c, s) in tf if (p, dd, c) == (pas, d, causal) and s > 0)
        if not steps:
            continue
        final, fa2 = tf[pas, d, causal, steps[-1]], tf.get((pas, d, causal, 0), {})
        for i, s in enumerate([0] + steps if fa2 else steps):
            mine = tf[pas, d, causal, s]
            cells = " | ".join(f"{mine[N]:.1f}" if N in mine else "-" for N in Ns)
            if s == 0:
                print(f"| {pas} | {d} | {causal} | FlashAttention-2 (PyTorch) | {cells} | | | |")
                continue
            prev = geomean_ratio(mine, tf[pas, d, causal, steps[steps.index(s) - 1]], Ns) if s != steps[0] else "-"
            print(f"| {pas} | {d} | {causal} | {s} {names[pas, s]} | {cells} | {prev} | "
                  f"{geomean_ratio(mine, final, Ns)} | {geomean_ratio(mine, fa2, Ns)} |")


if __name__ == "__main__":
    main()
