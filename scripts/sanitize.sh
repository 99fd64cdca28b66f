#!/usr/bin/env bash
# make sanitize: compute-sanitizer's memcheck, racecheck, synccheck and initcheck on small, awkward shapes of every
# stage (partial tiles, Nq != Nk, causal with fully masked rows). Exit 1 if any tool reports an error.
# The tools' runs are independent and mostly host-bound (the instrumented program runs slowly on the CPU side), so
# SANITIZE_JOBS of them (default: the CPU count, at most 8) run at once on the one GPU; the report keeps the list's
# order. SANITIZE_JOBS=1 runs them one after another.
set -u
cd "$(dirname "$0")/.."
cs=${COMPUTE_SANITIZER:-compute-sanitizer}
if ! command -v "$cs" >/dev/null 2>&1; then
    echo "make sanitize needs $cs, which is not on PATH (it ships with the CUDA Toolkit, in its bin/ folder next to" \
         "nvcc: add that folder to PATH, or set COMPUTE_SANITIZER=/path/to/compute-sanitizer)"
    exit 1
fi
if ! nvidia-smi >/dev/null 2>&1; then echo "make sanitize needs a CUDA device (none found)"; exit 1; fi
shape=(--batch 1 --heads 2 --nq 77 --nk 45 --causal --check)
runs=("bin/naive ${shape[*]} --d 40" "bin/naive ${shape[*]} --d 64 --backward"
      "bin/online_softmax ${shape[*]} --d 40" "bin/softmax_rows --rows 5 --cols 1000 --check --reps 1"
      "bin/v1 ${shape[*]} --d 40" "bin/v1 ${shape[*]} --d 128"
      "bin/v2 ${shape[*]} --d 40" "bin/v2 ${shape[*]} --d 64 --backward"
      "bin/v2 ${shape[*]} --d 64 --dtype fp16" "bin/v2 ${shape[*]} --d 128 --dtype bf16"
      "bin/v2 ${shape[*]} --d 64 --dtype fp16 --backward" "bin/v2 ${shape[*]} --d 128 --dtype bf16 --backward"
      # head dims between tiles (zero-filled columns), the 56 tile (a k8 step, 112-byte rows) and past 128 (the 256
      # tile's staggered K/V copies at d = 200 and 256), and the deterministic backward
      "bin/v2 ${shape[*]} --d 200 --dtype bf16" "bin/v2 ${shape[*]} --d 256 --dtype fp16"
      "bin/v2 ${shape[*]} --d 56 --dtype bf16" "bin/v2 ${shape[*]} --d 56 --dtype fp16 --bias"
      "bin/v2 ${shape[*]} --d 72 --dtype fp16 --backward"
      "bin/v2 ${shape[*]} --d 256 --dtype fp16 --backward" "bin/v2 ${shape[*]} --d 40 --dtype bf16 --backward --deterministic")
# the extensions in v2's tensor-core passes (docs/extensions.md): each feature, and all together with a packed batch
ext=(--heads 4 --d 64 --dtype fp16 --check)
runs+=("bin/v2 ${ext[*]} --nq 77 --nk 45 --causal --kv-heads 2" "bin/v2 ${shape[*]} --d 40 --dtype bf16 --window 9,3"
       "bin/v2 ${shape[*]} --d 128 --dtype fp16 --dropout 0.2" "bin/v2 ${shape[*]} --d 64 --dtype bf16 --bias"
       "bin/v2 ${shape[*]} --d 64 --dtype fp16 --alibi"
       "bin/v2 ${ext[*]} --seqlens-q 1,77,30 --seqlens-k 45,1,130 --causal --kv-heads 1 --window 20,-1 --dropout 0.1 --alibi"
       # and in the backward: dropout alone (the default kernels with the mask), grouped-query heads (causal: copies
       # of K and V and the group sum; short and non-causal: the Ext::layout group walk), the extension kernels
       "bin/v2 ${shape[*]} --d 64 --dtype bf16 --dropout 0.3 --backward"
       "bin/v2 ${ext[*]} --nq 77 --nk 45 --causal --kv-heads 2 --backward" "bin/v2 ${ext[*]} --nq 130 --nk 300 --kv-heads 1 --backward"
       "bin/v2 ${shape[*]} --d 40 --dtype bf16 --dropout 0.2 --window 9,3 --kv-heads 1 --backward")
# causal grids of many heads and few tiles: the heads in chunks, with unused blocks in front (GridOrder)
runs+=("bin/v2 --batch 6 --heads 100 --nq 100 --nk 127 --causal --check --d 64 --dtype fp16 --backward")
# the backward reading dO laid out [B, Nq, H, d] (Problem::dO_token_major: the PyTorch bridge's; no command-line
# flag sets it, so its doctest case runs it: d = 64, 72, 128, 256, atomic and deterministic dQ)
runs+=("bin/tests -tc=GPU?v2?backward?reads?a*")
# v2's earlier tensor-core steps (bin/v2 --kernel list; the last step of each pass is the kernel above)
for k in 1 2 3 4 5; do runs+=("bin/v2 ${shape[*]} --d 64 --dtype fp16 --kernel $k"); done
for k in 1 2 3 4 5 6; do runs+=("bin/v2 ${shape[*]} --d 64 --dtype fp16 --backward --kernel $k"); done
# v3 (Hopper only): every step in fp16 at d = 64, the final one in bf16 at d = 128. TMA and wgmma work outside the
# threads' own loads and stores; what the tools say about them is in docs/v3.md ("Sanitizers").
if [ "$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -n1)" = 9.0 ]; then
    for k in 1 2 3 4 5 6 7 8 9 10 11; do runs+=("bin/v3 ${shape[*]} --d 64 --dtype fp16 --kernel $k"); done
    runs+=("bin/v3 ${shape[*]} --d 128 --dtype bf16")
    # 45 keys are one K/V tile: with 400 the ring turns over and step 10's max moves or stays between tiles
    runs+=("bin/v3 --batch 1 --heads 2 --nq 77 --nk 400 --causal --check --d 128 --dtype fp16")
    runs+=("bin/v3 --batch 1 --heads 2 --nq 77 --nk 400 --check --d 256 --dtype bf16")  # K/V tiles of 80 keys (step 11)
    runs+=("bin/v3 --batch 1 --heads 2 --nq 77 --nk 400 --causal --check --d 256 --dtype fp16 --kernel 10")  # 64 keys
fi
jobs=${SANITIZE_JOBS:-$(( $(nproc) < 8 ? $(nproc) : 8 ))}
if ! [ "$jobs" -ge 1 ] 2>/dev/null; then echo "SANITIZE_JOBS must be a positive integer, got '$jobs'"; exit 1; fi
reports=$(mktemp -d)
trap 'rm -rf "$reports"' EXIT
# sanitize_one N TOOL RUN: the report of one run, in file N (a failure's report starts with "FAIL:")
sanitize_one() {
    local out
    if out=$($cs --tool "$2" --error-exitcode 1 $3 2>&1); then
        echo "clean: $2 $3" >"$reports/$1"
    else
        { echo "FAIL:  $2 $3"; echo "$out" | grep -E "=========|error" | head -20; } >"$reports/$1"
    fi
}
start=$(date +%s)
n=0
for tool in memcheck racecheck synccheck initcheck; do
    for run in "${runs[@]}"; do
        prog=${run%% *}
        [ -x "$prog" ] || continue
        while [ "$(jobs -rp | wc -l)" -ge "$jobs" ]; do wait -n; done
        sanitize_one "$n" "$tool" "$run" &
        n=$((n + 1))
    done
done
wait
failed=0
for ((k = 0; k < n; k++)); do
    cat "$reports/$k"
    grep -q "^FAIL:" "$reports/$k" && failed=1
done
echo "sanitize: $n runs, $jobs at a time, $(( $(date +%s) - start )) s"
[ $failed -eq 0 ] && echo "sanitize: all clean" || echo "sanitize: errors found"
exit $failed
