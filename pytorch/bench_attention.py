#!/usr/bin/env python3
"""Where the GPT demo's time goes: one attention call (forward, and forward + backward) through flash_scratch and
through PyTorch's scaled_dot_product_attention, at the demo's shape and at a large one.

    python3 pytorch/bench_attention.py

Two numbers per case, medians of many repetitions: GPU time between CUDA events (the L2 flushed before each rep),
and host time per call with the GPU kept busy (what a training loop pays in Python and dispatch per call). Our GPU
time is given twice: as flash_scratch runs it (v3 forward on Hopper for d = 64, 128 and 256) and with the v2 forward
(set_hopper_forward(False)); the backward is v2's in both.
"""
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.join(os.path.dirname(HERE), "scripts")]
from flash_scratch import attention, forward_kernel, set_hopper_forward  # noqa: E402
from torch_timing import time_cuda  # noqa: E402  (CUDA events, warm-up, L2 flushed, median)


def host_us(fn, reps=200):
    """Host time per call while the GPU works through the queue: calls are issued back to back."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e6)
    torch.cuda.synchronize()
    return statistics.median(times)


def main():
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, bf16, causal")
    print("| B, H, N, d | our forward | pass | ours GPU ms | ours, v2 forward, GPU ms | torch GPU ms | "
          "ours host us/call | torch host us/call |")
    print("|---|---|---|---|---|---|---|---|")
    for B, H, N, d in ((16, 8, 1024, 64), (4, 16, 4096, 128)):
        q, k, v = (torch.randn(B, H, N, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        do = torch.randn(B, H, N, d, device="cuda", dtype=torch.bfloat16)
        kernel = forward_kernel(q, k, v).split(" ")[0]
        ours = lambda: attention(q, k, v, causal=True)  # noqa: E731
        theirs = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
        for name, fwd in (("fwd", None), ("fwd+bwd", True)):
            if fwd is None:
                fo, ft = ours, theirs
            else:
                def fo():
                    torch.autograd.grad(ours(), (q, k, v), do)

                def ft():
                    torch.autograd.grad(theirs(), (q, k, v), do)
            ours_ms = time_cuda(fo, 50)
            set_hopper_forward(False)
            ours_v2_ms = time_cuda(fo, 50)
            set_hopper_forward(True)
            print(f"| {B}, {H}, {N}, {d} | {kernel} | {name} | {ours_ms:.3f} | {ours_v2_ms:.3f} | {time_cuda(ft, 50):.3f} | "
                  f"{host_us(fo):.0f} | {host_us(ft):.0f} |", flush=True)


if __name__ == "__main__":
    main()
