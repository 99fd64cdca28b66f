#!/usr/bin/env python3
"""Optional: time bin/v3 (each --kernel step) against PyTorch's cuDNN and FlashAttention-2 backends in one run.

Needs PyTorch with CUDA and a Hopper GPU. The FlashAttention-2 benchmark shapes (hidden 2048: H = 2048 / d heads,
B = 16384 / N), forward only. Torch is timed as bin/v3 --bench times ours: CUDA events, 3 warm-ups, median of reps,
L2 flushed before each rep (scripts/torch_timing.py). One CSV line per shape and implementation:
    impl,dtype,d,causal,N,ms,TFLOP/s
then a table of each step's ratio to cuDNN and to FlashAttention-2.

Usage: python3 scripts/compare_v3.py [--ns 1024,4096] [--ds 64,128] [--dtypes fp16] [--steps 1,5] [--reps 20]
Step 0 is the final kernel as `bin/v3` runs it without --kernel (its choice of step: v3_step_of in v3/v3.h).
"""
import argparse, os, subprocess, sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from torch_timing import TORCH_DTYPE, flops, time_cuda

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
V3 = os.path.join(ROOT, "bin", "v3")
BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "fa2": SDPBackend.FLASH_ATTENTION}


def torch_ms(backend, B, H, N, d, causal, dtype, reps):
    q, k, v = (torch.randn(B, H, N, d, device="cuda", dtype=TORCH_DTYPE[dtype]) for _ in range(3))
    with sdpa_kernel(BACKENDS[backend]):
        return time_cuda(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal), reps)


def v3_ms(step, B, H, N, d, causal, dtype, reps):
    cmd = ["timeout", "120", V3, "--batch", str(B), "--heads", str(H), "--n", str(N), "--d", str(d), "--dtype", dtype,
           "--bench", "--reps", str(reps)] + (["--kernel", str(step)] if int(step) else [])
    cmd += ["--causal"] if causal else []
    out = subprocess.run(cmd, capture_output=True, text=True)
    for line in out.stdout.splitlines():
        if line.startswith("csv,"):
            return float(line.split(",")[10])
    raise RuntimeError("bin/v3 failed: " + " ".join(cmd) + "\n" + out.stdout + out.stderr)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ns", default="1024,2048,4096,8192,16384")
    ap.add_argument("--ds", default="64,128")
    ap.add_argument("--dtypes", default="fp16")
    ap.add_argument("--steps", default="1,2,3,4,5,6,7,8,9")
    ap.add_argument("--causal", default="0,1")
    ap.add_argument("--reps", type=int, default=20)
    a = ap.parse_args()
    if not os.path.exists(V3):
        sys.exit("error: bin/v3 not built (run make)")
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}")
    rows = []
    for dtype in a.dtypes.split(","):
        for d in map(int, a.ds.split(",")):
            for causal in map(int, a.causal.split(",")):
                for N in map(int, a.ns.split(",")):
                    B, H = 16384 // N, 2048 // d
                    f = flops(B, H, N, d, causal, False)
                    res = {}
                    for impl in ["cudnn", "fa2"] + [f"v3:k{s}" for s in a.steps.split(",")]:
                        try:
                            ms = (torch_ms(impl, B, H, N, d, bool(causal), dtype, a.reps) if impl in BACKENDS
                                  else v3_ms(int(impl[4:]), B, H, N, d, causal, dtype, a.reps))
                        except Exception as e:  # a backend missing for this shape: say so, go on
                            print(f"# {impl} {dtype} d={d} causal={causal} N={N}: {str(e).splitlines()[0]}")
                            continue
                        res[impl] = f / ms / 1e9
                        print(f"{impl},{dtype},{d},{causal},{N},{ms:.4f},{res[impl]:.1f}", flush=True)
                    rows.append((dtype, d, causal, N, res))
    print("\n| dtype | d | causal | N | cuDNN | FA2 | " + " | ".join(f"v3 k{s}" for s in a.steps.split(",")) +
          " | last / cuDNN | last / FA2 |")
    for dtype, d, causal, N, res in rows:
        steps = [res.get(f"v3:k{s}") for s in a.steps.split(",")]
        last = steps[-1]
        cells = [f"{x:.0f}" if x else "-" for x in [res.get("cudnn"), res.get("fa2")] + steps]
        ratio = lambda ref: f"{last / res[ref]:.2f}x" if last and res.get(ref) else "-"
        print(f"| {dtype} | {d} | {causal} | {N} | " + " | ".join(cells) + f" | {ratio('cudnn')} | {ratio('fa2')} |")


if __name__ == "__main__":
    main()
