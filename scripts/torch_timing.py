#!/usr/bin/env python3
"""PyTorch's FlashAttention-2 backend timed the way bin/<stage> --bench times our kernels: CUDA events, 3 warm-ups,
median of reps, L2 flushed before each rep. Used by scripts/compare_torch.py and scripts/steps.sh.

As a program it prints one CSV line per shape: fa2,PASS,D,CAUSAL,N,MS,TFLOPS (hidden 2048: H = 2048 / d heads,
B = 16384 / N), for shapes given as PASS:D:CAUSAL:N, e.g.
    python3 scripts/torch_timing.py --dtype fp16 --reps 10 fwd:64:0:1024 bwd:128:1:4096
"""
import argparse

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

TORCH_DTYPE = {"fp16": torch.float16, "bf16": torch.bfloat16}


def flops(B, H, N, d, causal, bwd):
    f = 4.0 * B * H * N * N * d * (0.5 if causal else 1.0)
    return f * 2.5 if bwd else f


def time_cuda(fn, reps):
    flush = torch.empty(256 * 1024 * 1024, dtype=torch.uint8, device="cuda")
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        flush.zero_()
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    return float(np.median(times))


def torch_ms(B, H, N, d, causal, dtype, bwd, reps):
    q, k, v = (torch.randn(B, H, N, d, device="cuda", dtype=TORCH_DTYPE[dtype], requires_grad=bwd) for _ in range(3))
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        if not bwd:
            return time_cuda(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal), reps)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        do = torch.randn_like(o)
        return time_cuda(lambda: torch.autograd.grad(o, (q, k, v), do, retain_graph=True), reps)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="fp16")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("shapes", nargs="+", help="PASS:D:CAUSAL:N")
    a = ap.parse_args()
    for shape in a.shapes:
        pas, d, causal, N = shape.split(":")
        d, causal, N, bwd = int(d), int(causal), int(N), pas == "bwd"
        B, H = 16384 // N, 2048 // d
        ms = torch_ms(B, H, N, d, bool(causal), a.dtype, bwd, a.reps)
        print(f"fa2,{pas},{d},{causal},{N},{ms:.4f},{flops(B, H, N, d, causal, bwd) / ms / 1e9:.1f}", flush=True)


if __name__ == "__main__":
    main()
