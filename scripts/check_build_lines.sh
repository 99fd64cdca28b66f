#!/usr/bin/env bash
# check_build_lines.sh: the one-line nvcc command in the first comment of every program's main file must build that
# program on its own, as its comment promises. Run by CI (no GPU: -arch=native becomes -arch=sm_80, and the program
# is built, not run). Exit 1 if any line fails.
set -u
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fails=0
pids=()
files=(*/main.cu online_softmax/rows_main.cu)
for f in "${files[@]}"; do
    line=$(grep -m1 -E '^//   nvcc ' "$f" | sed -E 's|^//   ||; s| && \./.*$||')
    if [ -z "$line" ]; then echo "FAIL: $f has no one-line nvcc build in its first comment"; fails=$((fails + 1)); continue; fi
    line=$(echo "$line" | sed -E "s|-arch=native|-arch=sm_80|; s|-o ([^ ]+)|-o $tmp/\\1|")
    (bash -c "$line" >"$tmp/$(echo "$f" | tr / _).log" 2>&1) &
    pids+=("$!:$f")
done
for entry in "${pids[@]}"; do
    pid=${entry%%:*}; f=${entry#*:}
    if wait "$pid"; then echo "ok: the build line of $f"
    else echo "FAIL: the build line of $f:"; tail -5 "$tmp/$(echo "$f" | tr / _).log"; fails=$((fails + 1)); fi
done
[ $fails -eq 0 ] && echo "check_build_lines: all build" || echo "check_build_lines: $fails failed"
exit $((fails > 0))
