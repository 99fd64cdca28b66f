#!/usr/bin/env python3
"""Train a small GPT on this repository's own text, once on our attention and once on PyTorch's, and compare.

    python3 pytorch/train_gpt.py [--steps 400] [--out docs/measured/gpt]
    python3 pytorch/train_gpt.py --profile 10      # where a step's GPU time goes, kernel by kernel, for both

A byte-level GPT (6 layers, 8 heads of d = 64, context 1024, bf16 autocast) learns from the project's docs and
sources (every *.md, *.cu, *.cuh, *.h, *.py file, concatenated: the text ships with the project). The same model,
data order and initialisation train four times: attention by flash_scratch (v3's forward on Hopper, else v2's; v2's
backward) and by PyTorch's scaled_dot_product_attention (its default backend), each with two seeds. At one seed the
two attentions train side by side, a step of one and then a step of the other (which goes first alternates), so the
GPU's clocks, temperature and memory state weigh on both alike: timed one after the other, two runs of the same
PyTorch model differed by 8% (docs/pytorch.md). It prints a progress bar, then tokens per second for both, and
writes loss curves (CSV and PNG) to --out.

Pass criterion (stated before the run): with the same seed the two attentions give the same model up to rounding,
so their losses should differ far less than two seeds do. With L = the mean loss of the last 50 steps:
    max over seeds |L(ours) - L(torch)|  <=  seed-to-seed spread + 0.01,
where the spread is max(|L_torch(seed 1) - L_torch(seed 2)|, |L_ours(seed 1) - L_ours(seed 2)|); and our median
step time (over both seeds' steps after the first 20) is at most PyTorch's (tokens/s at least PyTorch's). Exit code 0 when both hold, 1 otherwise.
Needs PyTorch with a CUDA GPU of sm_80 or newer (matplotlib for the PNG; without it the plot is skipped).
"""
import argparse
import csv
import glob
import math
import os
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from flash_scratch import attention  # noqa: E402


def corpus():
    files = sorted(f for ext in ("md", "cu", "cuh", "h", "py") for f in glob.glob(f"{ROOT}/**/*.{ext}", recursive=True)
                   if "/build/" not in f and "/scratch/" not in f)
    data = b"".join(open(f, "rb").read() for f in files)
    return torch.tensor(list(data), dtype=torch.uint8), len(files)


class Block(nn.Module):
    def __init__(self, width, heads, attn):
        super().__init__()
        self.heads, self.attn = heads, attn
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x):
        B, T, C = x.shape
        # [B, T, 3, H, d] -> three [B, H, T, d] tensors, contiguous as both attentions are handed them
        q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4).contiguous()
        y = self.attn(q, k, v).transpose(1, 2).reshape(B, T, C)
        x = x + self.proj(y)
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, attn, layers=6, width=512, heads=8, context=1024, vocab=256):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, width), nn.Embedding(context, width)
        self.blocks = nn.ModuleList(Block(width, heads, attn) for _ in range(layers))
        self.ln, self.head = nn.LayerNorm(width), nn.Linear(width, vocab, bias=False)

    def forward(self, idx):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for b in self.blocks:
            x = b(x)
        return self.head(self.ln(x))


ATTENTIONS = {
    "ours": lambda q, k, v: attention(q, k, v, causal=True),
    "torch": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
}


NAMES = ("ours", "torch")


def make(name, seed, args):
    torch.manual_seed(seed)  # the same initial weights for both attentions
    model = GPT(ATTENTIONS[name], context=args.context).cuda()
    return model, torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)


def batch_of(data, args, gen):
    """A [batch, context + 1] chunk of the corpus from random starts drawn with gen (inputs and next-byte targets)."""
    starts = torch.randint(0, len(data) - args.context - 1, (args.batch,), generator=gen)
    return torch.stack([data[s:s + args.context + 1] for s in starts.tolist()]).cuda().long()


def train_step(model, opt, chunk):
    """One optimiser step on a [batch, context + 1] chunk of bytes (inputs and next-byte targets); returns the loss."""
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = model(chunk[:, :-1])
    loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return loss


def profile(data, args):
    """--profile K: K steps of each attention (after 10 unprofiled ones) under torch.profiler; prints each one's GPU
    kernels by total time and the difference between the two, kernel by kernel (names shortened to 90 characters)."""
    from torch.profiler import ProfilerActivity, profile as torch_profile
    gen = torch.Generator().manual_seed(1)
    chunks = [batch_of(data, args, gen) for _ in range(10 + args.profile)]
    totals = {}
    for name in NAMES:
        model, opt = make(name, 1, args)
        for chunk in chunks[:10]:
            train_step(model, opt, chunk)
        torch.cuda.synchronize()
        with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
            for chunk in chunks[10:]:
                train_step(model, opt, chunk)
            torch.cuda.synchronize()
        kernels = {}
        for e in prof.key_averages():
            us = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
            if us > 0:
                kernels[e.key[:90]] = (us / args.profile, e.count // args.profile)
        totals[name] = kernels
        print(f"\n{name}: GPU kernels a step, {args.profile} steps profiled: total "
              f"{sum(us for us, _ in kernels.values()) / 1e3:.3f} ms")
        for key, (us, n) in sorted(kernels.items(), key=lambda kv: -kv[1][0])[:25]:
            print(f"  {us / 1e3:8.3f} ms  {n:4d} calls  {key}")
    print("\nthe difference, ours - torch, kernels by name (ms a step; only |difference| >= 0.005 ms):")
    keys = set(totals["ours"]) | set(totals["torch"])
    diff = {k: totals["ours"].get(k, (0, 0))[0] - totals["torch"].get(k, (0, 0))[0] for k in keys}
    for k, us in sorted(diff.items(), key=lambda kv: -abs(kv[1])):
        if abs(us) >= 5:
            print(f"  {us / 1e3:+8.3f} ms  {k}")
    return 0


def train_pair(seed, data, args, bar):
    """Both attentions at one seed, step by step: the same initial weights, the same batches, the same schedule."""
    models, opts = {}, {}
    for name in NAMES:
        models[name], opts[name] = make(name, seed, args)
    gen = torch.Generator().manual_seed(seed)  # the same batches for both attentions at one seed
    losses, step_ms = {name: [] for name in NAMES}, {name: [] for name in NAMES}
    for step in range(args.steps):
        chunk = batch_of(data, args, gen)
        lr = args.lr * min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for name in NAMES if step % 2 == 0 else NAMES[::-1]:
            model, opt = models[name], opts[name]
            for g in opt.param_groups:
                g["lr"] = lr
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            loss = train_step(model, opt, chunk)
            torch.cuda.synchronize()
            step_ms[name].append((time.perf_counter() - t0) * 1e3)
            losses[name].append(loss.item())
            if not math.isfinite(losses[name][-1]):
                raise SystemExit(f"error: {name} seed {seed}: loss is {losses[name][-1]} at step {step}")
        bar(seed, step + 1, {name: losses[name][-1] for name in NAMES})
    # the first steps include warm-up and loading the kernels
    return {(name, seed): (losses[name], step_ms[name][20:]) for name in NAMES}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seeds", default="1,2")
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "measured", "gpt"))
    ap.add_argument("--profile", type=int, default=0, metavar="K",
                    help="no training run: profile K steps of each attention and list their GPU kernels")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("error: train_gpt.py needs a CUDA GPU")
    seeds = [int(s) for s in args.seeds.split(",")]
    if len(seeds) != 2:
        raise SystemExit("error: --seeds takes two seeds (the criterion compares seed-to-seed spread)")
    data, nfiles = corpus()
    if args.profile > 0:
        return profile(data, args)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; corpus: {nfiles} files, {len(data)} bytes; "
          f"{args.steps} steps of {args.batch} x {args.context} tokens", flush=True)
    runs = [(name, seed) for seed in seeds for name in NAMES]

    def bar(seed, step, loss):
        done = int(30 * step / args.steps)
        sys.stderr.write(f"\rseed {seed} [{'#' * done}{'.' * (30 - done)}] {step}/{args.steps} "
                         + ", ".join(f"{name} loss {loss[name]:.3f}" for name in NAMES))
        if step == args.steps:
            sys.stderr.write("\n")

    results = {}
    for seed in seeds:
        results.update(train_pair(seed, data, args, bar))

    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "loss.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step"] + [f"{n}_seed{s}" for n, s in runs])
        for i in range(args.steps):
            w.writerow([i + 1] + [f"{results[r][0][i]:.5f}" for r in runs])

    tail = {r: statistics.mean(results[r][0][-50:]) for r in runs}
    # tokens/s from the median step time over both seeds' timed steps together
    tok_s = {name: args.batch * args.context / (statistics.median(results[(name, seeds[0])][1] +
                                                                  results[(name, seeds[1])][1]) * 1e-3)
             for name in ("torch", "ours")}
    spread = max(abs(tail[(n, seeds[0])] - tail[(n, seeds[1])]) for n in ("torch", "ours"))
    diff = max(abs(tail[("ours", s)] - tail[("torch", s)]) for s in seeds)
    print("\n| attention | seed | mean loss, last 50 steps | median step (ms) | tokens/s |\n|---|---|---|---|---|")
    for n, s in runs:
        ms = statistics.median(results[(n, s)][1])
        print(f"| {n} | {s} | {tail[(n, s)]:.4f} | {ms:.2f} | {args.batch * args.context / (ms * 1e-3):,.0f} |")
    loss_ok = diff <= spread + 0.01
    speed_ok = tok_s["ours"] >= tok_s["torch"]
    print(f"\nloss: max |ours - torch| at one seed = {diff:.4f}; seed-to-seed spread = {spread:.4f}; "
          f"criterion diff <= spread + 0.01: {'PASS' if loss_ok else 'FAIL'}")
    print(f"tokens/s (median step over both seeds): ours {tok_s['ours']:,.0f}, torch {tok_s['torch']:,.0f}, ratio "
          f"{tok_s['ours'] / tok_s['torch']:.3f}: {'PASS' if speed_ok else 'FAIL'} (ours >= torch)")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(7, 4))
        for n, s in runs:
            ax.plot(range(1, args.steps + 1), results[(n, s)][0], label=f"{n}, seed {s}",
                    linestyle="-" if n == "ours" else "--", linewidth=1)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss (bytes, cross-entropy)")
        ax.set_title(f"small GPT on this repository's text, {torch.cuda.get_device_name()}")
        ax.set_ylim(top=min(6.0, ax.get_ylim()[1]))
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(args.out, "loss.png"), dpi=120)
        print(f"wrote {args.out}/loss.csv and loss.png")
    except ImportError:
        print(f"wrote {args.out}/loss.csv (matplotlib not installed: no plot)")
    return 0 if loss_ok and speed_ok else 1


if __name__ == "__main__":
    sys.exit(main())
