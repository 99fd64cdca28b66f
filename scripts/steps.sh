#!/usr/bin/env bash
# make steps: every tensor-core optimisation step of v2 (bin/v2 --dtype fp16 --kernel K; bin/v2 --kernel list names
# them), forward and backward, on the FlashAttention-2 benchmark shapes: hidden 2048 (d=64 with 32 heads, d=128
# with 16 heads), batch x N = 16384, N = 1k..16k, causal off and on, fp16. Prints one markdown table (TFLOP/s per
# step; ratio to the step before, to the final kernel, and to PyTorch's FlashAttention-2 backend where python3 can
# import torch), writes the rows to steps.csv and draws steps_fwd.png / steps_bwd.png (scripts/plot.py).
# Knobs: STEPS_NS="1024 4096", STEPS_DS="64", STEPS_CAUSAL="0", STEPS_PASSES="fwd", STEPS_REPS=10,
#        STEPS_TORCH=0 (skip PyTorch), STEPS_CSV=steps.csv, STEPS_PLOTS=dir (default: next to the CSV).
set -u
cd "$(dirname "$0")/.."
if ! nvidia-smi >/dev/null 2>&1; then echo "make steps needs a CUDA device (none found)"; exit 1; fi
[ -x bin/v2 ] || { echo "error: bin/v2 not built (run make)"; exit 1; }
reps=${STEPS_REPS:-10}
echo "# $(nvidia-smi --query-gpu=name --format=csv,noheader | head -n1), $(date -u +%Y-%m-%d), make steps (fp16," \
     "reps $reps, median)"
csv=${STEPS_CSV:-steps.csv}
echo "pass,step,name,d,causal,N,ms,tflops" >"$csv"
Ns=${STEPS_NS:-"1024 2048 4096 8192 16384"} ds=${STEPS_DS:-"64 128"} causals=${STEPS_CAUSAL:-"0 1"}
passes=${STEPS_PASSES:-"fwd bwd"}
shapes=()
for pass in $passes; do
    flag=()
    [ "$pass" = bwd ] && flag=(--backward)
    word=$([ "$pass" = bwd ] && echo backward || echo forward)
    bin/v2 --kernel list | awk -v w="$word" '$1 == w { print $2, $3 }' >"$csv.list"
    while read -r k name; do
        for d in $ds; do
            for causal in $causals; do
                for N in $Ns; do
                    c=()
                    [ "$causal" = 1 ] && c=(--causal)
                    line=$(bin/v2 --batch $((16384 / N)) --heads $((2048 / d)) --n "$N" --d "$d" "${c[@]}" "${flag[@]}" \
                           --dtype fp16 --kernel "$k" --bench --reps "$reps" 2>&1 | grep '^csv,' | tail -n1)
                    IFS=, read -r _ _ _ _ _ _ _ _ _ _ ms tf _ <<<"${line:-}"
                    echo "$pass,$k,$name,$d,$causal,$N,${ms:-},${tf:-}" >>"$csv"
                done
            done
        done
    done <"$csv.list"
    for d in $ds; do for causal in $causals; do for N in $Ns; do shapes+=("$pass:$d:$causal:$N"); done; done; done
done
rm -f "$csv.list"
if [ "${STEPS_TORCH:-1}" != 0 ] && python3 -c "import torch; assert torch.cuda.is_available()" 2>/dev/null; then
    python3 scripts/torch_timing.py --dtype fp16 --reps "$reps" "${shapes[@]}" |
        awk -F, '{ print $2 ",0,FlashAttention-2," $3 "," $4 "," $5 "," $6 "," $7 }' >>"$csv"
else
    echo "(PyTorch with CUDA not found: no FlashAttention-2 column)"
fi
python3 scripts/steps_table.py "$csv"
python3 scripts/plot.py steps "$csv" "${STEPS_PLOTS:-$(dirname "$csv")}"
echo "CSV: $csv"
