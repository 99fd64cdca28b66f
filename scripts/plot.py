#!/usr/bin/env python3
"""Draws `make steps` and `make bench` as plots: TFLOP/s against N, one line per step (or per stage and dtype),
PyTorch's FlashAttention-2 dashed where measured; one PNG per pass, a 2 x 2 grid of (d, causal) panels (bench:
TFLOP/s on a log scale, the rungs span two orders of magnitude).

Usage: python3 scripts/plot.py steps steps.csv OUTDIR     -> OUTDIR/steps_fwd.png, OUTDIR/steps_bwd.png
       python3 scripts/plot.py bench bench.csv OUTDIR     -> OUTDIR/bench_fwd.png, OUTDIR/bench_bwd.png
Skipped, with a one-line note, where matplotlib is not installed.
"""
import csv
import os
import sys
from collections import defaultdict


def lines_of(kind, path):
    """{pass: {(d, causal): {label: {N: TFLOP/s}}}} from either CSV."""
    out = defaultdict(lambda: defaultdict(lambda: defaultdict(dict)))
    with open(path) as f:
        for row in csv.DictReader(f):
            if not row.get("tflops"):
                continue
            if kind == "steps":
                pas, N = row["pass"], int(row["N"])
                label = "FlashAttention-2 (PyTorch)" if row["step"] == "0" else f"{row['step']} {row['name']}"
            else:
                pas, N = row["pass"], int(row["Nq"])
                label = f"{row['stage']} {row['dtype']}"
            out[pas][int(row["d"]), int(row["causal"])][label][N] = float(row["tflops"])
    return out


def main():
    kind, path, outdir = sys.argv[1], sys.argv[2], sys.argv[3]
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"(matplotlib not installed: no plots of {path})")
        return
    for pas, panels in lines_of(kind, path).items():
        keys = sorted(panels)
        fig, axes = plt.subplots(2, 2, figsize=(12, 8), squeeze=False)
        for ax, (d, causal) in zip(axes.flat, keys):
            for label, pts in sorted(panels[d, causal].items(), key=lambda kv: kv[0].startswith("Flash")):
                Ns = sorted(pts)
                style = "--" if label.startswith("Flash") else "-"
                ax.plot(Ns, [pts[N] for N in Ns], style, marker="o", label=label)
            ax.set_xscale("log", base=2)
            if kind == "bench":  # the rungs span two orders of magnitude
                ax.set_yscale("log")
            ax.set_title(f"{pas}, d = {d}, {'causal' if causal else 'not causal'}")
            ax.set_xlabel("N")
            ax.set_ylabel("TFLOP/s")
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[len(keys):]:
            ax.axis("off")
        axes.flat[0].legend(fontsize=8)
        fig.tight_layout()
        png = os.path.join(outdir, f"{kind}_{pas}.png")
        fig.savefig(png, dpi=100)
        plt.close(fig)
        print(f"plot: {png}")


if __name__ == "__main__":
    main()
