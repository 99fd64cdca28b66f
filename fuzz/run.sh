#!/usr/bin/env bash
# fuzz/run.sh: builds the two libFuzzer targets (clang, with AddressSanitizer and UndefinedBehaviorSanitizer; host
# code only: the harness files are compiled as plain C++) and runs each for FUZZ_SECONDS (default 45) from the
# committed seed corpus in fuzz/corpus/. Exit 1 on any crash, leak, sanitizer report or over-allocation (libFuzzer's
# -rss_limit_mb and -malloc_limit_mb). Used by CI; needs clang with its runtime (Debian: clang, libclang-rt-dev).
set -u
cd "$(dirname "$0")/.."
CXX=${FUZZ_CXX:-clang++}
if ! command -v "$CXX" >/dev/null 2>&1; then echo "fuzz: $CXX not found (apt-get install clang)"; exit 1; fi
out=${FUZZ_BUILD:-build/fuzz}
mkdir -p "$out"
flags=(-std=c++20 -g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined -x c++
       -D__host__= -D__device__= -I. -Itests -isystem /usr/local/cuda/include)
build() {  # build NAME SOURCES...
    local name=$1; shift
    "$CXX" "${flags[@]}" "$@" -o "$out/$name" -x none -lpthread || { echo "fuzz: building $name failed"; exit 1; }
}
build fuzz_npy fuzz/fuzz_npy.cpp tests/harness/npy.cu
build fuzz_cli fuzz/fuzz_cli.cpp tests/harness/cli.cu tests/harness/inputs.cu
secs=${FUZZ_SECONDS:-45}
fails=0
for t in npy cli; do
    mkdir -p "$out/corpus_$t"
    log="$out/fuzz_$t.log"
    "$out/fuzz_$t" -max_total_time="$secs" -rss_limit_mb=2048 -malloc_limit_mb=1024 -max_len=4096 \
        -artifact_prefix="$out/crash_$t-" "$out/corpus_$t" "fuzz/corpus/$t" >"$log" 2>&1
    rc=$?
    runs=$(grep -oE 'Done [0-9]+ runs' "$log" | tail -1)
    if [ $rc -eq 0 ]; then echo "fuzz $t: ${runs:-?}, no crash (${secs} s)"
    else echo "fuzz $t: FAILED (rc $rc); see $log"; grep -E "ERROR|SUMMARY|runtime error" "$log" | head -5; fails=1; fi
done
exit $fails
