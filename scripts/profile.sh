#!/usr/bin/env bash
# profile.sh: the ncu counters docs/profiling.md explains, one set at a time, for any program of the ladder.
#
#   bash scripts/profile.sh SET PROGRAM [ARGS...]
#     SET  tensor   tensor-pipe activity: how busy the mma.sync (HMMA) pipe is, and how many mma instructions ran
#          banks    shared-memory bank conflicts: extra wavefronts of shared loads and stores, against the requests
#          dram     DRAM bytes read and written (what really left the chip, after L2)
#          stalls   warp-state statistics: why warps were not issuing (ncu section WarpStateStats)
#   e.g. bash scripts/profile.sh tensor bin/v2 --dtype fp16 --n 4096 --d 128 --heads 16 --batch 1
#        bash scripts/profile.sh dram bin/v1 --batch 1 --heads 8 --n 4096 --d 64
#
# Every kernel the program launches is profiled once (ncu replays it as often as the counters need); pass
# --kernel-name through NCU_ARGS (NCU_ARGS="--kernel-name regex:forward") to keep one. Needs a GPU and ncu.
set -euo pipefail
cd "$(dirname "$0")/.."
set_name=${1:-}
[ $# -ge 2 ] || { sed -n '2,12p' "$0"; exit 2; }
shift
time_metric=gpu__time_duration.sum
case "$set_name" in
    tensor) what=(--metrics "sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active,sm__inst_executed_pipe_tensor_op_hmma.sum,$time_metric") ;;
    banks) what=(--metrics "l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_ld.sum,l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_st.sum,l1tex__data_pipe_lsu_wavefronts_mem_shared_op_ld.sum,smsp__sass_inst_executed_op_shared_ld.sum,smsp__sass_inst_executed_op_ldsm.sum,$time_metric") ;;
    dram) what=(--metrics "dram__bytes_read.sum,dram__bytes_write.sum,$time_metric") ;;
    stalls) what=(--section WarpStateStats --section SchedulerStats) ;;
    *) echo "error: SET is tensor, banks, dram or stalls, got '$set_name'" >&2; exit 2 ;;
esac
command -v ncu >/dev/null || { echo "error: ncu (Nsight Compute) is not on PATH" >&2; exit 2; }
program=$1
[ -x "$program" ] || make -s "$program"
# shellcheck disable=SC2086
exec ncu ${NCU_ARGS:-} "${what[@]}" "$@"
