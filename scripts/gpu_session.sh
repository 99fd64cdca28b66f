#!/usr/bin/env bash
# gpu_session.sh: everything one borrowed-GPU session should do, in one call, logs under $OUT:
# build, REQUIRE_GPU=1 make test, make sanitize, make run, make bench, and the PyTorch comparison.
# Choose steps with STEPS="build test sanitize run bench torch" (default: all).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_session}
mkdir -p "$OUT"
steps=${STEPS:-"build test sanitize run bench torch"}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
date -u | tee -a "$OUT/gpu.txt"
summary=()
for step in $steps; do
    start=$(date +%s)
    case $step in
        build)    make -j16 all >"$OUT/build.log" 2>&1 ;;
        test)     REQUIRE_GPU=1 make test >"$OUT/test.log" 2>&1 ;;
        sanitize) make sanitize >"$OUT/sanitize.log" 2>&1 ;;
        run)      make run >"$OUT/run.log" 2>&1 ;;
        bench)    BENCH_CSV="$OUT/bench.csv" make bench >"$OUT/bench.md" 2>&1 ;;
        torch)    python3 scripts/compare_torch.py ${TORCH_ARGS:-} >"$OUT/torch.md" 2>&1 ;;
    esac
    rc=$?
    summary+=("$step: rc=$rc ($(( $(date +%s) - start )) s)")
done
printf '%s\n' "${summary[@]}" | tee "$OUT/summary.txt"
