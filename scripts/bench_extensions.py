#!/usr/bin/env python3
"""The extensions' cost in v2's tensor-core forward or backward (bin/v2 --dtype fp16 --bench [--backward]), each
feature on and off, at the FlashAttention-2 benchmark shapes (hidden 2048: H = 2048 / d heads, batch x N = 16384),
and PyTorch's SDPA on the same feature in the same run where PyTorch has it (optional: without PyTorch those columns
say "-").

    feature   bin/v2 flags                         PyTorch SDPA (backend)
    plain     -                                    flash
    causal    --causal                             flash, is_causal
    gqa       --kv-heads H/8                       flash, enable_gqa (K/V with H/8 heads)
    dropout   --dropout 0.1                        flash, dropout_p = 0.1
    bias      --bias ([1, H, N, N] float32)        efficient (memory-efficient), a float attn_mask; N <= 4096
    alibi     --alibi                              -
    window    --window W/2,W/2-1 (W = 1024 keys)   -
    varlen    --seqlens N,N,... (B sequences)      -

Columns: our median ms; "x plain": our ms over our plain ms at the same shape (the feature's cost; for the window,
over our plain ms at N = W, which sees as many keys per query: the issue wants about 1.0); PyTorch's ms and
"vs torch": PyTorch's ms over ours (above 1: we are faster). Timing as bin/v2 --bench and scripts/torch_timing.py do
it: warm-up, L2 flushed before each rep, median. Usage:

    python3 scripts/bench_extensions.py [--ns 1024,4096,16384] [--ds 64,128] [--reps 10] [--features plain,gqa,...]
                                        [--pass fwd|bwd]

--pass bwd times the backward pass alone: ours is bin/v2's "bwd" row (its backward kernels after one forward),
PyTorch's is torch.autograd.grad of the SDPA output (the same backend), after one forward.
"""
import argparse, os, subprocess, sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
V2 = os.path.join(ROOT, "bin", "v2")
WINDOW = 1024  # the window row's keys per query

try:
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from torch_timing import time_cuda  # the same timing as scripts/compare_torch.py

    HAVE_TORCH = torch.cuda.is_available()
except ImportError:
    HAVE_TORCH = False


def flags(feature, B, H, N):
    return {
        "plain": [],
        "causal": ["--causal"],
        "gqa": ["--kv-heads", str(H // 8)],
        "dropout": ["--dropout", "0.1"],
        "bias": ["--bias"],
        "alibi": ["--alibi"],
        "window": ["--window", f"{WINDOW // 2},{WINDOW // 2 - 1}"],
        "varlen": ["--seqlens", ",".join([str(N)] * B)],
    }[feature]


def ours_ms(feature, B, H, N, d, reps, pas):
    shape = [] if feature == "varlen" else ["--batch", str(B), "--n", str(N)]
    cmd = [V2, "--dtype", "fp16", "--heads", str(H), "--d", str(d), "--bench", "--reps", str(reps)] + shape + \
        flags(feature, B, H, N) + (["--backward"] if pas == "bwd" else [])
    out = subprocess.run(cmd, capture_output=True, text=True)
    for line in out.stdout.splitlines():
        fields = line.split(",")
        if fields[0] == "csv" and fields[2] == pas:
            return float(fields[10])
    raise RuntimeError("bin/v2 failed: " + " ".join(cmd) + "\n" + out.stdout[-300:] + out.stderr[-300:])


def torch_ms(feature, B, H, N, d, reps, pas):
    """PyTorch's SDPA with the feature, or (None, why)."""
    if not HAVE_TORCH:
        return None, "no torch"
    bwd = pas == "bwd"
    q = torch.randn(B, H, N, d, device="cuda", dtype=torch.float16, requires_grad=bwd)
    kv_heads = H // 8 if feature == "gqa" else H
    k, v = (torch.randn(B, kv_heads, N, d, device="cuda", dtype=torch.float16, requires_grad=bwd) for _ in range(2))
    kwargs, backend = {}, SDPBackend.FLASH_ATTENTION
    if feature == "causal":
        kwargs["is_causal"] = True
    elif feature == "gqa":
        kwargs["enable_gqa"] = True
    elif feature == "dropout":
        kwargs["dropout_p"] = 0.1
    elif feature == "bias":
        kwargs["attn_mask"] = torch.randn(1, H, N, N, device="cuda", dtype=torch.float16)
        backend = SDPBackend.EFFICIENT_ATTENTION
    elif feature != "plain":
        return None, "no such feature"
    try:
        with sdpa_kernel(backend):
            if not bwd:
                return time_cuda(lambda: F.scaled_dot_product_attention(q, k, v, **kwargs), reps), backend.name.lower()
            o = F.scaled_dot_product_attention(q, k, v, **kwargs)
            do = torch.randn_like(o)
            grad = lambda: torch.autograd.grad(o, (q, k, v), do, retain_graph=True)  # noqa: E731
            return time_cuda(grad, reps), backend.name.lower()
    except RuntimeError as e:  # the backend refuses the feature or the shape
        return None, str(e).splitlines()[0][:40]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ns", default="1024,4096,16384")
    ap.add_argument("--ds", default="64,128")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--features", default="plain,causal,gqa,dropout,bias,alibi,window,varlen")
    ap.add_argument("--pass", dest="pas", choices=["fwd", "bwd"], default="fwd")
    a = ap.parse_args()
    gpu = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                         text=True).stdout.strip().splitlines()[0]
    backward = " --backward" if a.pas == "bwd" else ""
    print(f"# {gpu}; {a.pas}: bin/v2 --dtype fp16 --bench --reps {a.reps}{backward}; "
          f"torch {torch.__version__ if HAVE_TORCH else '-'}")
    print(f"| {'d':>3} | {'N':>5} | {'feature':<8} | {'ours ms':>8} | {'x plain':>7} | {'torch ms':>8} | "
          f"{'vs torch':>8} | torch backend |")
    print("|----:|------:|----------|---------:|--------:|---------:|---------:|---------------|")
    for d in map(int, a.ds.split(",")):
        H = 2048 // d
        plain = {}
        for N in map(int, a.ns.split(",")):
            B = 16384 // N
            for feature in a.features.split(","):
                if feature == "bias" and N > 4096:
                    continue  # [1, H, N, N] float32: 32 GiB at N = 16384, d = 64
                try:
                    ms = ours_ms(feature, B, H, N, d, a.reps, a.pas)
                except RuntimeError as e:
                    print(f"| {d:>3} | {N:>5} | {feature:<8} | failed: {str(e).splitlines()[0][:80]}")
                    continue
                if feature == "plain":
                    plain[N] = ms
                base = plain.get(WINDOW if feature == "window" else N)
                ratio = f"{ms / base:.2f}" if base else "-"
                t, backend = torch_ms(feature, B, H, N, d, a.reps, a.pas)
                vs = f"{t / ms:.2f}" if t else "-"
                print(f"| {d:>3} | {N:>5} | {feature:<8} | {ms:>8.3f} | {ratio:>7} | "
                      f"{(f'{t:.3f}' if t else '-'):>8} | {vs:>8} | {backend} |", flush=True)


if __name__ == "__main__":
    main()
