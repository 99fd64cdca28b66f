#!/usr/bin/env bash
# make run: every stage on one default problem, checked against the stage below and float64, timed, as one table.
# Without a GPU each program runs its CPU model instead (on a smaller problem, so it takes seconds).
set -u
cd "$(dirname "$0")/.."
if nvidia-smi >/dev/null 2>&1; then
    problem=()
else
    echo "no CUDA device found: running each stage's CPU model on a small problem instead"
    problem=(--batch 1 --heads 4 --n 256)
fi
rows=()
status=0
run() {
    local out
    out=$("$@" --check --bench "${problem[@]}" 2>&1)
    local rc=$?
    echo "$out" | grep -v '^|' | grep -v '^csv,'
    rows+=("$(echo "$out" | grep '^|' | tail -n1)")
    [ $rc -eq 0 ] || status=1
}
for stage in naive online_softmax v1 v2; do
    [ -x "bin/$stage" ] && run "bin/$stage"
done
if [ -x bin/v2 ] && nvidia-smi >/dev/null 2>&1; then
    run bin/v2 --dtype fp16
    run bin/v2 --dtype bf16
fi
# v3 is fp16/bf16 only; without a Hopper GPU it says so and runs its CPU model (v2's algorithm).
if [ -x bin/v3 ]; then
    run bin/v3 --dtype fp16
    run bin/v3 --dtype bf16
fi
# The backward pass, on a problem small enough for the float64 reference backward to check every gradient.
backward=(--backward)
nvidia-smi >/dev/null 2>&1 && backward+=(--batch 2 --heads 4 --n 512)
[ -x bin/naive ] && run bin/naive "${backward[@]}"
if [ -x bin/v2 ]; then
    run bin/v2 "${backward[@]}"
    if nvidia-smi >/dev/null 2>&1; then
        run bin/v2 --dtype fp16 "${backward[@]}"
        run bin/v2 --dtype bf16 "${backward[@]}"
    fi
fi
echo
echo "| stage          | correct vs the stage below and float64                     |       time |          rate    | memory (GPU) or traffic (CPU model) |"
echo "|----------------|------------------------------------------------------------|------------|------------------|-----------|"
printf '%s\n' "${rows[@]}"
exit $status
