#!/usr/bin/env python3
"""The cross-check by kernel time: one attention pass timed as the sum of Nsight Compute's gpu__time_duration over
every kernel the pass launches, for our kernels and for PyTorch's backends, at the FlashAttention-2 benchmark
shapes (hidden 2048: H = 2048 / d heads, B = 16384 / N).

    python3 scripts/kernel_time.py --impls v2,fa2 --passes bwd --ds 64,128 --ns 4096,8192 --causal 0,1
    python3 scripts/kernel_time.py --impls v3,cudnn,fa2 --passes fwd --ns 1024,4096,16384

Why a second timing: compare_torch.py and compare_v3.py time a call between CUDA events, which includes what the
call does on the host while the GPU waits; ncu times the kernels alone. The two can disagree by several points
(docs/profiling.md, "Kernel time"), so the headline ratios are checked both ways.

How: every (impl, shape) runs in its own process under `ncu --profile-from-start off`. The child makes the inputs
(random normal), runs the pass once outside the profiled range (warm-up: the extension's lazy load, library
autotuning), then REPS times between cudaProfilerStart and cudaProfilerStop. The per-pass time is the profiled
kernels' total over REPS; the backward's forward runs outside the range. ncu's defaults stay: kernels serialised,
caches flushed before each kernel, clocks locked to base, so absolute times are lower than in the event-timed
scripts and only the ratio is compared. Memsets and copies are not kernels and ncu does not time them, on either
side. Ours runs through the PyTorch bridge (pytorch/flash_scratch: the same kernel sources as bin/v2 and bin/v3):
impl v2 is the v2 forward and backward; v3 the Hopper forward (the backward is v2's, so v3 is for --passes fwd).
Libraries: fa2 (SDPA's flash backend), cudnn (SDPA's cuDNN backend), sdpa (whatever SDPA picks by default).

Needs a GPU, ncu and PyTorch; a missing one is one line on stderr and exit 2. `--self-test` checks the parsing of
ncu's CSV (no GPU; tests/cli_test.sh runs it).
"""
import argparse
import csv
import os
import shutil
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
IMPLS = ("v2", "v3", "fa2", "cudnn", "sdpa")
UNIT_NS = {"nsecond": 1.0, "ns": 1.0, "usecond": 1e3, "us": 1e3, "msecond": 1e6, "ms": 1e6, "second": 1e9, "s": 1e9}


def fail(msg):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def shape_of(d, N):
    return 16384 // N, 2048 // d  # B, H


def parse_ncu_csv(text):
    """(kernel name, ns) for every profiled kernel, in launch order, from `ncu --csv` output (other lines ignored)."""
    rows = list(csv.reader(line for line in text.splitlines() if line.startswith('"')))
    header = next((r for r in rows if "Kernel Name" in r and "Metric Value" in r), None)
    if header is None:
        return []
    col = {name: header.index(name) for name in ("Kernel Name", "Metric Name", "Metric Unit", "Metric Value")}
    kernels = []
    for r in rows:
        if r is header or len(r) != len(header) or r[col["Metric Name"]] != "gpu__time_duration.sum":
            continue
        unit = r[col["Metric Unit"]]
        if unit not in UNIT_NS:
            raise ValueError(f"unknown time unit '{unit}' in ncu's output")
        kernels.append((r[col["Kernel Name"]], float(r[col["Metric Value"]].replace(",", "")) * UNIT_NS[unit]))
    return kernels


def short_name(kernel):
    """A kernel's name without its return type, template arguments and parameters (ncu prints either form)."""
    # Keep what lies outside every <...> and (...), after "(anonymous namespace)::" is dropped (v2's kernels live in
    # one: split at the first "(", they would all be "void").
    depth, kept = 0, []
    for ch in kernel.replace("(anonymous namespace)::", ""):
        if ch in "<(":
            depth += 1
        elif ch in ">)":
            depth -= 1
        elif depth == 0:
            kept.append(ch)
    return "".join(kept).strip().split(" ")[-1]


def summarise(kernels, reps):
    """Per pass: total ns, and (short name, launches, ns) for each kernel name in order of first launch."""
    by_name = {}
    for name, ns in kernels:
        launches, total = by_name.get(short := short_name(name), (0, 0.0))
        by_name[short] = (launches + 1, total + ns)
    parts = [(name, launches / reps, total / reps) for name, (launches, total) in by_name.items()]
    return sum(ns for _, ns in kernels) / reps, parts


def child(impl, pas, dtype, d, causal, N, reps):
    """Runs under ncu: the pass once unprofiled, then `reps` times in the profiled range."""
    import contextlib

    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    B, H = shape_of(d, N)
    dt = {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, H, N, d, device="cuda", dtype=dt, requires_grad=pas == "bwd") for _ in range(3))
    if impl in ("v2", "v3"):
        sys.path.insert(0, os.path.join(REPO, "pytorch"))
        from flash_scratch import attention, forward_kernel, set_hopper_forward

        set_hopper_forward(impl == "v3")
        if impl == "v3" and not forward_kernel(q, k, v).startswith("v3"):
            fail(f"impl v3 cannot run here: {forward_kernel(q, k, v)}")
        ctx = contextlib.nullcontext()
        attn = lambda: attention(q, k, v, causal=bool(causal))  # noqa: E731
    else:
        backends = {"fa2": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}
        ctx = sdpa_kernel(backends[impl]) if impl in backends else contextlib.nullcontext()  # sdpa: its own pick
        attn = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=bool(causal))  # noqa: E731
    with ctx:
        if pas == "fwd":
            run = attn
        else:
            o = attn()
            do = torch.randn_like(o)
            run = lambda: torch.autograd.grad(o, (q, k, v), do, retain_graph=True)  # noqa: E731
        run()
        torch.cuda.synchronize()
        for _ in range(reps):
            torch.cuda.profiler.start()
            run()
            torch.cuda.synchronize()
            torch.cuda.profiler.stop()


def measure(ncu, impl, pas, dtype, d, causal, N, reps):
    cmd = [ncu, "--profile-from-start", "off", "--metrics", "gpu__time_duration.sum", "--csv", "--print-units",
           "base", sys.executable, os.path.abspath(__file__), "--child", impl, pas, dtype, str(d), str(causal), str(N),
           str(reps)]
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    kernels = parse_ncu_csv(p.stdout)
    if p.returncode != 0 or not kernels:
        err = [line for line in (p.stderr + p.stdout).splitlines() if line.strip()]
        return None, f"{impl} failed (exit {p.returncode}): {err[-1] if err else 'no kernels profiled'}"
    if len(kernels) % reps:
        return None, f"{impl}: {len(kernels)} kernels over {reps} repetitions, not the same count in each"
    return summarise(kernels, reps), None


def self_test():
    sample = "\n".join([
        "==PROF== Connected to process 1234 (/usr/bin/python3)",
        '"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size","Grid Size",'
        '"Device","CC","Section Name","Metric Name","Metric Unit","Metric Value"',
        '"0","1234","python3","h","void flash::preprocess_kernel<64, (int)1>(Params)","1","7","(256, 1, 1)",'
        '"(32, 1, 1)","0","9.0","Command line profiler metrics","gpu__time_duration.sum","nsecond","135,744"',
        '"1","1234","python3","h","void (anonymous namespace)::dk_dv_kernel<Features<(int)5>, __half>(BackwardArgs, float)",'
        '"1","7","(256, 1, 1)","(32, 1, 1)","0","9.0","Command line profiler metrics","gpu__time_duration.sum","usecond",'
        '"14.5"',
        '"2","1234","python3","h","void flash::preprocess_kernel<64, (int)1>(Params)","1","7","(256, 1, 1)",'
        '"(32, 1, 1)","0","9.0","Command line profiler metrics","gpu__time_duration.sum","nsecond","136256"',
        '"3","1234","python3","h","void dk_dv_kernel<Features<(int)5>, __half>(BackwardArgs, float)","1","7",'
        '"(256, 1, 1)","(32, 1, 1)","0","9.0","Command line profiler metrics","gpu__time_duration.sum","nsecond",'
        '"14,500"',
        "==PROF== Disconnected from process 1234",
    ])
    kernels = parse_ncu_csv(sample)
    assert [short_name(n) for n, _ in kernels] == ["flash::preprocess_kernel", "dk_dv_kernel"] * 2, kernels
    assert [ns for _, ns in kernels] == [135744.0, 14500.0, 136256.0, 14500.0], kernels
    total, parts = summarise(kernels, 2)
    assert total == (135744 + 14500 + 136256 + 14500) / 2, total
    assert parts == [("flash::preprocess_kernel", 1.0, 136000.0), ("dk_dv_kernel", 1.0, 14500.0)], parts
    assert parse_ncu_csv("==PROF== No kernels were profiled.") == []
    try:
        parse_ncu_csv(sample.replace('"usecond"', '"furlong"'))
        raise AssertionError("an unknown unit must be refused")
    except ValueError:
        pass
    print("kernel_time.py self-test: ok")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--impls", default="v2,fa2", help=f"comma-separated, of {', '.join(IMPLS)}; ratios are to --ref")
    ap.add_argument("--ref", default=None, help="the impl the ratios are taken against (default: fa2, else the last)")
    ap.add_argument("--passes", default="fwd,bwd")
    ap.add_argument("--dtypes", default="fp16")
    ap.add_argument("--ds", default="64,128")
    ap.add_argument("--ns", default="4096,8192")
    ap.add_argument("--causal", default="0,1")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--child", nargs=7, metavar=("IMPL", "PASS", "DTYPE", "D", "CAUSAL", "N", "REPS"),
                    help=argparse.SUPPRESS)
    ap.add_argument("--self-test", action="store_true", help="check the ncu CSV parser and exit (no GPU)")
    a = ap.parse_args()
    if a.self_test:
        return self_test()
    if a.child:
        impl, pas, dtype, d, causal, N, reps = a.child
        return child(impl, pas, dtype, int(d), int(causal), int(N), int(reps))

    try:
        impls = a.impls.split(",")
        passes = a.passes.split(",")
        dtypes = a.dtypes.split(",")
        ds, ns, causals = ([int(x) for x in s.split(",")] for s in (a.ds, a.ns, a.causal))
    except ValueError as e:
        fail(f"bad number in --ds, --ns or --causal: {e}")
    bad = ([i for i in impls if i not in IMPLS] + [p for p in passes if p not in ("fwd", "bwd")]
           + [t for t in dtypes if t not in ("fp16", "bf16")] + [str(c) for c in causals if c not in (0, 1)]
           + [str(d) for d in ds if d < 8 or d > 256 or d % 8] + [str(n) for n in ns if n < 1 or n > 16384])
    if bad:
        fail(f"unknown or unsupported value(s): {', '.join(bad)} (impls {', '.join(IMPLS)}; passes fwd, bwd; dtypes "
             "fp16, bf16; causal 0, 1; d a multiple of 8 up to 256; N from 1 to 16384)")
    if a.reps < 1:
        fail("--reps must be at least 1")
    if "v3" in impls and "bwd" in passes:
        fail("impl v3 is the Hopper forward; its backward is v2's: time v3 with --passes fwd")
    ref = a.ref or ("fa2" if "fa2" in impls else impls[-1])
    if ref not in impls:
        fail(f"--ref {ref} is not in --impls")
    ncu = shutil.which("ncu")
    if ncu is None:
        fail("ncu (Nsight Compute) is not on PATH")
    try:
        import torch
    except ImportError:
        fail("PyTorch is not installed")
    if not torch.cuda.is_available():
        fail("no CUDA device")
    sys.path.insert(0, HERE)
    from torch_timing import flops  # the FLOP count every timing script uses (imports torch, so not at the top)

    if {"v2", "v3"} & set(impls):  # build the extension here, not under the profiler
        sys.path.insert(0, os.path.join(REPO, "pytorch"))
        import flash_scratch  # noqa: F401

    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, {' '.join(sys.argv)}")
    print("# per pass: the sum of gpu__time_duration.sum over every kernel the pass launches (ncu defaults: "
          f"serialised, caches flushed, base clocks), mean of {a.reps}; ratio = {ref} ms / impl ms (above 1: faster)")
    print("| pass | dtype | d | causal | N | impl | kernel ms | TFLOP/s | ratio | kernels (launches a pass, ms) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    failed = 0
    for pas in passes:
        for dtype in dtypes:
            for d in ds:
                for causal in causals:
                    for N in ns:
                        B, H = shape_of(d, N)
                        results = {}
                        for impl in impls:
                            res, err = measure(ncu, impl, pas, dtype, d, causal, N, a.reps)
                            if err:
                                print(f"# {pas} {dtype} d={d} causal={causal} N={N}: {err}", flush=True)
                                failed += 1
                            else:
                                results[impl] = res
                        for impl, (total, parts) in results.items():
                            ratio = f"{results[ref][0] / total:.3f}" if ref in results else "-"
                            kernels = "; ".join(f"{name} x{n:g} {t / 1e6:.3f}" for name, n, t in parts)
                            print(f"| {pas} | {dtype} | {d} | {causal} | {N} | {impl} | {total / 1e6:.3f} | "
                                  f"{flops(B, H, N, d, causal, pas == 'bwd') / total / 1e3:.1f} | {ratio} | {kernels} |",
                                  flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
