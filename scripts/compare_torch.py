#!/usr/bin/env python3
"""Optional: compare bin/v2 (fp16/bf16, tensor cores) with PyTorch's FlashAttention-2 backend on the same GPU.

Needs PyTorch with CUDA (nothing else in the project does). Two parts:
  1. correctness: random q, k, v (and dO) saved as .npy, run through `bin/v2 --load --save`, compared with
     torch.nn.functional.scaled_dot_product_attention on the same inputs (and with autograd for dq, dk, dv);
  2. speed: the FlashAttention-2 benchmark shapes (hidden 2048, batch x N = 16384), torch's flash backend timed
     with CUDA events (warm-up, median of reps, L2 flushed before each rep, as bin/v2 --bench does), our numbers
     from `bin/v2 --bench`, and the ratio ours / FlashAttention-2. Pass bwd-det is our backward with
     --deterministic (dQ without atomics) against FlashAttention-2's ordinary backward: the ratio is its cost.

Usage: python3 scripts/compare_torch.py [--ns 1024,2048] [--dtypes fp16,bf16] [--passes fwd,bwd,bwd-det]
                                        [--ds 64,128,256] [--reps 20]
"""
import argparse, os, subprocess, sys, tempfile

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from torch_timing import TORCH_DTYPE, flops, torch_ms  # FlashAttention-2 timed as bin/v2 --bench times ours

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
V2 = os.path.join(ROOT, "bin", "v2")


def ours_ms(B, H, N, d, causal, dtype, bwd, reps, deterministic=False):
    cmd = [V2, "--batch", str(B), "--heads", str(H), "--n", str(N), "--d", str(d), "--dtype", dtype,
           "--bench", "--reps", str(reps)] + (["--causal"] if causal else []) + (["--backward"] if bwd else []) \
        + (["--deterministic"] if deterministic else [])
    out = subprocess.run(cmd, capture_output=True, text=True)
    for line in out.stdout.splitlines():
        if line.startswith("csv,"):
            return float(line.split(",")[10])
    raise RuntimeError("bin/v2 failed: " + " ".join(cmd) + "\n" + out.stdout + out.stderr)


def save(path, t):
    np.save(path, t.detach().float().cpu().numpy().astype(np.float32))


def check(dtype, causal, Nq, Nk, d, bwd):
    """Our outputs (via .npy) against torch's on the same rounded inputs; error relative to torch's own error."""
    torch.manual_seed(0)
    B, H = 2, 3
    q = torch.randn(B, H, Nq, d, device="cuda").to(TORCH_DTYPE[dtype])
    k = torch.randn(B, H, Nk, d, device="cuda").to(TORCH_DTYPE[dtype])
    v = torch.randn(B, H, Nk, d, device="cuda").to(TORCH_DTYPE[dtype])
    do = torch.randn(B, H, Nq, d, device="cuda").to(TORCH_DTYPE[dtype])
    with tempfile.TemporaryDirectory() as tmp:
        for name, t in (("q", q), ("k", k), ("v", v), ("do", do)):
            save(os.path.join(tmp, name + ".npy"), t)
        cmd = [V2, "--load", tmp, "--save", tmp, "--dtype", dtype] + (["--causal"] if causal else []) + (["--backward"] if bwd else [])
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            return f"bin/v2 failed: {r.stderr.strip() or r.stdout.strip()[-200:]}"
        # torch's causal mask is top-left aligned; ours is bottom-right. They agree when Nq == Nk.
        qf, kf, vf = (t.double().requires_grad_(bwd) for t in (q, k, v))
        ref = F.scaled_dot_product_attention(qf, kf, vf, is_causal=causal)
        qs, ks, vs = (t.clone().requires_grad_(bwd) for t in (q, k, v))
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            low = F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal)
        pairs = [("o", low, ref)]
        if bwd:
            g_ref = torch.autograd.grad(ref, (qf, kf, vf), do.double())
            g_low = torch.autograd.grad(low, (qs, ks, vs), do)
            pairs = [(n, gl, gr) for n, gl, gr in zip(("dq", "dk", "dv"), g_low, g_ref)]
        parts = []
        for name, t_low, t_ref in pairs:
            ours = torch.from_numpy(np.load(os.path.join(tmp, name + ".npy"))).cuda().double()
            err_ours = (ours - t_ref).abs().max().item()
            err_torch = (t_low.double() - t_ref).abs().max().item()
            ok = err_ours <= 2 * err_torch + 1e-3
            parts.append(f"{name}: ours {err_ours:.2e} vs torch {err_torch:.2e} {'ok' if ok else 'FAIL'}")
        return "; ".join(parts)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ns", default="512,1024,2048,4096,8192,16384")
    ap.add_argument("--dtypes", default="fp16,bf16")
    ap.add_argument("--passes", default="fwd,bwd")
    ap.add_argument("--ds", default="64,128", help="head dims; H = 2048 // d heads")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--skip-check", action="store_true")
    a = ap.parse_args()
    if not os.path.exists(V2):
        sys.exit("error: bin/v2 not built (run make)")
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, scripts/compare_torch.py {' '.join(sys.argv[1:])}")
    if not a.skip_check:
        print("\n## Correctness through --load/--save (max abs error vs float64; torch's flash backend on the same inputs)")
        for dtype in a.dtypes.split(","):
            for bwd in [p == "bwd" for p in a.passes.split(",") if p != "bwd-det"]:
                for causal, Nq, Nk, d in ((False, 257, 300, 64), (True, 300, 300, 128), (False, 1000, 77, 128)):
                    print(f"- {dtype} {'bwd' if bwd else 'fwd'} causal={int(causal)} Nq={Nq} Nk={Nk} d={d}: "
                          + check(dtype, causal, Nq, Nk, d, bwd))
    print("\n## Speed: TFLOP/s, ours / FlashAttention-2 (PyTorch flash backend), same GPU, same run")
    print("| pass | dtype | d | causal | N | FA2 TFLOP/s | ours TFLOP/s | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for pas in a.passes.split(","):
        bwd, det = pas != "fwd", pas == "bwd-det"
        for dtype in a.dtypes.split(","):
            for d in map(int, a.ds.split(",")):
                for causal in (False, True):
                    for N in map(int, a.ns.split(",")):
                        B, H = 16384 // N, 2048 // d
                        f = flops(B, H, N, d, causal, bwd)
                        t_ref = torch_ms(B, H, N, d, causal, dtype, bwd, a.reps)
                        t_ours = ours_ms(B, H, N, d, causal, dtype, bwd, a.reps, det)
                        print(f"| {pas} | {dtype} | {d} | {int(causal)} | {N} | "
                              f"{f / t_ref / 1e9:.1f} | {f / t_ours / 1e9:.1f} | {t_ref / t_ours:.2f} |", flush=True)


if __name__ == "__main__":
    main()
