#!/usr/bin/env bash
# bank_conflicts.sh: ncu's shared-memory bank-conflict counters for the tensor-core forward kernel, with the
# padded rows it ships with (v2/forward_mma.cu: kPitch = kD + 8 once ldmatrix is in) and with that padding removed
# (kPitch = kD), built into a scratch copy under build/. Needs a GPU and ncu. Usage: bash scripts/bank_conflicts.sh
# [N] [d]. docs/profiling.md explains the counters.
set -eu
cd "$(dirname "$0")/.."
N=${1:-4096}
d=${2:-128}
make -s bin/v2
mkdir -p build/nopad
sed 's/^constexpr int kPitch = Features<kStep>::kLdmatrix ? kD + 8 : kD;/constexpr int kPitch = kD;/' v2/forward_mma.cu >build/nopad/forward_mma.cu
grep -q '^constexpr int kPitch = kD;' build/nopad/forward_mma.cu  # the substitution must have happened
objs=$(ls build/v2/*.o build/v1/*.o build/online_softmax/*.o build/naive/*.o build/tests/harness/*.o | grep -v forward_mma.o | grep -v -E '/(rows_)?main\.o$')
nvcc -O3 -std=c++20 -arch=native -I. -Itests -Iv2 -c build/nopad/forward_mma.cu -o build/nopad/forward_mma.o
nvcc -O3 -std=c++20 -arch=native build/v2/main.o build/nopad/forward_mma.o $objs -o build/nopad/v2
metrics=l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_ld.sum,smsp__sass_inst_executed_op_ldsm.sum,gpu__time_duration.sum
for variant in bin/v2 build/nopad/v2; do
    echo "== $variant (padded rows: $([ "$variant" = bin/v2 ] && echo yes || echo no))"
    ncu --kernel-name regex:forward --metrics "$metrics" "$variant" --batch 1 --heads 16 --n "$N" --d "$d" --dtype fp16 \
        | grep -E "bank_conflicts|ldsm|duration"
done
