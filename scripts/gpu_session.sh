#!/usr/bin/env bash
# gpu_session.sh: what one session on a borrowed GPU runs to re-measure the project, logs under $OUT (default
# /tmp/gpu_session), one log per step and a summary line per step (exit code, seconds). Choose and order the steps
# with STEPS="..." (default: all, in this order; each is one repository command):
#   build     make -j all                                  (every program; pass ARCH=... through the environment)
#   test      REQUIRE_GPU=1 make test                      (every test; fails if a GPU test was skipped)
#   sanitize  make sanitize                                (four tools on every stage, SANITIZE_JOBS at a time)
#   run       make run                                     (the ladder on one problem)
#   bench     make bench                                   (every stage at the FlashAttention-2 shapes)
#   ratio     python3 scripts/compare_torch.py ...         (v2 against FlashAttention-2, both passes, the full table)
#   v3        python3 scripts/compare_v3.py ...            (v3's final kernel against cuDNN and FlashAttention-2)
#   ext       python3 scripts/bench_extensions.py ...      (each extension on/off and against PyTorch, both passes)
#   bridge    bash scripts/pytorch_tests.sh                (the PyTorch bridge's pytest suite)
#   ktime     python3 scripts/kernel_time.py ...           (the ratios again by summed kernel time, ncu)
# Needs a GPU; ratio, v3, ext, bridge and ktime need PyTorch, ktime also ncu. A device call has a time limit: split
# the steps over calls (STEPS="build test", then STEPS="sanitize ratio", ...); build outputs stay between calls.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_session}
mkdir -p "$OUT"
steps=${STEPS:-"build test sanitize run bench ratio v3 ext bridge ktime"}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee -a "$OUT/gpu.txt"
date -u | tee -a "$OUT/gpu.txt"
git log -1 --format="commit %h %s" 2>/dev/null | tee -a "$OUT/gpu.txt"
ns=1024,2048,4096,8192,16384
summary=()
for step in $steps; do
    start=$(date +%s)
    case $step in
        build)    make -j"$(nproc)" all >"$OUT/build.log" 2>&1 ;;
        test)     REQUIRE_GPU=1 make test >"$OUT/test.log" 2>&1 ;;
        sanitize) make sanitize >"$OUT/sanitize.log" 2>&1 ;;
        run)      make run >"$OUT/run.log" 2>&1 ;;
        bench)    BENCH_CSV="$OUT/bench.csv" make bench >"$OUT/bench.md" 2>&1 ;;
        ratio)    (cd scripts && python3 compare_torch.py --ns $ns --dtypes fp16,bf16 --ds 64,128 --passes fwd,bwd \
                       --reps 10 --skip-check) >"$OUT/ratio.md" 2>&1 ;;
        v3)       (cd scripts && python3 compare_v3.py --ns $ns --ds 64,128,256 --dtypes fp16,bf16 --causal 0,1 \
                       --steps 0 --reps 10) >"$OUT/v3.md" 2>&1 ;;
        ext)      { python3 scripts/bench_extensions.py --reps 10 &&
                    python3 scripts/bench_extensions.py --pass bwd --reps 10; } >"$OUT/ext.md" 2>&1 ;;
        bridge)   REQUIRE_GPU=1 bash scripts/pytorch_tests.sh >"$OUT/bridge.log" 2>&1 ;;
        ktime)    { python3 scripts/kernel_time.py --impls v2,fa2 --passes fwd,bwd --ds 64,128 --ns 4096,16384 &&
                    python3 scripts/kernel_time.py --impls v3,cudnn,fa2 --passes fwd --ds 64,128 \
                        --ns 1024,4096,16384; } >"$OUT/ktime.md" 2>&1 ;;
        *)        echo "unknown step '$step' (steps: build test sanitize run bench ratio v3 ext bridge ktime)" \
                      >"$OUT/$step.log"; false ;;
    esac
    rc=$?
    summary+=("$step: rc=$rc ($(( $(date +%s) - start )) s)")
    echo "${summary[-1]}"
done
printf '%s\n' "${summary[@]}" >>"$OUT/summary.txt"
