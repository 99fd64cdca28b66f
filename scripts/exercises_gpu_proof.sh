#!/usr/bin/env bash
# The GPU exercises' fail-then-pass proof, on a GPU of sm_80 or newer: for each, a starter copy with only that
# exercise blanked builds, its checks FAIL there, the GPU exercises that do not build on it still PASS, and all PASS
# in the reference (scripts/exercises_proof.sh gpu). The log goes to docs/measured/exercises_gpu_proof.log, headed
# by the GPU, the date and the commit, to be committed. Exercise names as arguments run only those (LOG=path to log
# elsewhere), to split the run: e.g. LOG=part2.log bash scripts/exercises_gpu_proof.sh warp-softmax-fp32 ...
# COMMIT=hash names the commit when the tree was copied without its history.
set -euo pipefail
cd "$(dirname "$0")/.."
log=${LOG:-docs/measured/exercises_gpu_proof.log}
{
    echo "# bash scripts/exercises_gpu_proof.sh, $(date -u '+%Y-%m-%d %H:%M UTC'), commit ${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo '?')}"
    nvidia-smi --query-gpu=name,compute_cap,driver_version --format=csv,noheader
    bash scripts/exercises_proof.sh gpu "$@"
} 2>&1 | tee "$log"
exit "${PIPESTATUS[0]}"
