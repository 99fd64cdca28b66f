#!/usr/bin/env bash
# make bench: every stage over the FlashAttention-2 benchmark shapes: hidden 2048 (d=64 with 32 heads, d=128 with
# 16 heads), batch x N = 16384, N from 512 to 16384, causal off and on. Prints a markdown table and writes the same
# rows as CSV to bench.csv (or $BENCH_CSV) and draws them as bench_fwd.png / bench_bwd.png (scripts/plot.py). Knobs: BENCH_NS="512 1024", BENCH_RUNS="v2:fp16 v1:fp32", BENCH_REPS.
# A run "v2:fp16:bwd-det" is the backward with --deterministic (dQ without atomics): its rows say stage v2-det, so
# its cost against v2's bwd rows (time, and peak device memory in MiB) reads off the same table and plot.
set -u
cd "$(dirname "$0")/.."
if ! nvidia-smi >/dev/null 2>&1; then echo "make bench needs a CUDA device (none found)"; exit 1; fi
csv=${BENCH_CSV:-bench.csv}
Ns=${BENCH_NS:-"512 1024 2048 4096 8192 16384"}
runs=${BENCH_RUNS:-"naive:fp32 online_softmax:fp32 v1:fp32 v2:fp32 v2:fp16 v2:bf16 v2:fp16:bwd v2:bf16:bwd v2:fp16:bwd-det v2:bf16:bwd-det"}
# v3 (FlashAttention-3) has kernels only for Hopper (sm_90); elsewhere it would time nothing and run its CPU model.
hopper=$([ "$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -n1)" = 9.0 ] && echo 1)
[ -z "${BENCH_RUNS:-}" ] && [ -n "$hopper" ] && runs="$runs v3:fp16 v3:bf16"
reps=${BENCH_REPS:-10}
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n1)
echo "# $gpu, $(date -u +%Y-%m-%d), make bench (reps $reps, median)"
echo "stage,pass,dtype,B,H,Nq,Nk,d,causal,ms,tflops,gbs,mib" >"$csv"
printf '| %-14s | %-4s | %-5s | %3s | %6s | %-6s | %9s | %8s | %9s |\n' stage pass dtype d N causal "TFLOP/s" ms "MiB"
printf '|%s|\n' "----------------|------|-------|-----|--------|--------|-----------|----------|-----------"
for run in $runs; do
    IFS=: read -r stage dtype pass <<<"$run"
    [ -x "bin/$stage" ] || continue
    extra=()
    [ "$dtype" != fp32 ] && extra+=(--dtype "$dtype")
    [ "${pass:-}" = bwd ] && extra+=(--backward)
    [ "${pass:-}" = bwd-det ] && extra+=(--backward --deterministic)
    for d in 64 128; do
        heads=$((2048 / d))
        for causal in 0 1; do
            for N in $Ns; do
                c=()
                [ "$causal" = 1 ] && c=(--causal)
                out=$("bin/$stage" --batch $((16384 / N)) --heads $heads --n "$N" --d $d "${c[@]}" "${extra[@]}" \
                      --bench --reps "$reps" 2>&1)
                line=$(echo "$out" | grep '^csv,' | tail -n1)
                if [ -z "$line" ]; then
                    why=$(echo "$out" | grep -m1 '^error' | cut -c1-60)
                    printf '| %-14s | %-4s | %-5s | %3s | %6s | %-6s | %9s | %8s | %9s |\n' "$stage" "${pass:-fwd}" "$dtype" $d "$N" "$causal" "-" "-" "${why:-failed}"
                    continue
                fi
                [ "${pass:-}" = bwd-det ] && line=${line/#csv,$stage,/csv,$stage-det,}
                echo "${line#csv,}" >>"$csv"
                IFS=, read -r _ st ps dt B H Nq Nk dd cz ms tf gbs mib <<<"$line"
                printf '| %-14s | %-4s | %-5s | %3s | %6s | %-6s | %9.1f | %8.3f | %9.0f |\n' "$st" "$ps" "$dt" "$dd" "$Nq" "$cz" "$tf" "$ms" "$mib"
            done
        done
    done
done
python3 scripts/plot.py bench "$csv" "$(dirname "$csv")"
echo "CSV: $csv"
