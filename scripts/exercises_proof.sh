#!/usr/bin/env bash
# The course kit's proof that its checks can fail and catch what they claim (docs/exercises.md, "How the checks
# are proven").
#
#   bash scripts/exercises_proof.sh cpu    no GPU needed; run by .ci/run. For every CPU exercise: a starter copy
#                                          with only that exercise blanked builds warnings-clean, its checks FAIL
#                                          there, the checks of every CPU exercise that does not build on it still
#                                          PASS, and all PASS in the reference. Every GPU exercise's blanked copy
#                                          builds too, and `make check` says it needs a GPU (exit code 4). Then each
#                                          classic bug of exercises/bugs.json, planted in the v2 CPU model, is
#                                          caught with its own hint.
#   bash scripts/exercises_proof.sh gpu    on a GPU of sm_80+ (scripts/exercises_gpu_proof.sh logs it): the same
#                                          fail-then-pass proof for every GPU exercise.
#   bash scripts/exercises_proof.sh KIND EX...   the same for the exercises named only (to split a long run).
#
# A copy reuses the reference's build/ (file times are kept), so only what the blanking changes is rebuilt.
set -euo pipefail
cd "$(dirname "$0")/.."
kind=${1:-}
[ "$kind" = cpu ] || [ "$kind" = gpu ] || { echo "usage: $0 cpu|gpu" >&2; exit 2; }
binary=bin/check_$kind
start=$(date +%s)
jobs=$(nproc)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
fail() { echo "exercises proof: FAIL: $*"; exit 1; }

make -s -j"$jobs" "$binary"
[ "$kind" = cpu ] || make -s -j"$jobs" bin/check_cpu  # the GPU copies' build seed needs the CPU objects too
exercises=$(python3 scripts/exercises.py names "$kind")
shift
[ $# -eq 0 ] || exercises="$*"
for ex in $exercises; do
    "$binary" "$ex" > "$work/reference.log" || { cat "$work/reference.log"; fail "$ex: its checks fail in the reference"; }
done
echo "reference: every $kind exercise's checks pass ($(echo $exercises | wc -w) exercises)"

# the commands refuse what they should: a non-empty DIR, an unknown exercise
mkdir -p "$work/full" && touch "$work/full/keep"
if make -s starter DIR="$work/full" EX=online-merge > /dev/null 2>&1; then fail "make starter wrote into a non-empty DIR"; fi
if python3 scripts/exercises.py check no-such-exercise > /dev/null 2>&1; then fail "make check accepted an unknown exercise"; fi
[ "$(ls "$work/full")" = keep ] || fail "make starter touched a non-empty DIR"
echo "make starter refuses a non-empty DIR; make check refuses an unknown exercise"

# copy DIR: a copy made by COMMAND (make starter / plant), seeded with the reference's objects
seeded_copy() {
    local dir=$1
    shift
    "$@" > /dev/null
    mkdir -p "$dir/build" && cp -a build/. "$dir/build/"
}

for ex in $exercises; do
    dir="$work/$ex"
    seeded_copy "$dir" make -s starter DIR="$dir" EX="$ex"
    if ! (cd "$dir" && make -s -j"$jobs" "$binary") > "$work/build.log" 2>&1; then
        cat "$work/build.log"
        fail "the starter copy with $ex blanked does not build"
    fi
    if (cd "$dir" && "$binary" "$ex") > "$work/blank.log"; then
        cat "$work/blank.log"
        fail "$ex: its checks PASS with the exercise blanked"
    fi
    failed=$(grep "^FAIL $ex/" "$work/blank.log" | cut -d: -f1 | sed "s|^FAIL $ex/||" | tr '\n' ' ')
    [ -n "$failed" ] || { cat "$work/blank.log"; fail "$ex: no check says FAIL"; }
    kept=0
    for other in $(python3 scripts/exercises.py independent "$ex" "$kind"); do
        [ "$other" = "$ex" ] && continue
        (cd "$dir" && "$binary" "$other") > "$work/other.log" || { cat "$work/other.log"; fail "$other fails with only $ex blanked"; }
        kept=$((kept + 1))
    done
    echo "blanked $ex: FAIL $failed| $kept exercises that do not build on it still PASS"
    rm -rf "$dir"
done

if [ "$kind" = cpu ] && [ $# -eq 0 ]; then
    for ex in $(python3 scripts/exercises.py names gpu); do
        dir="$work/$ex"
        seeded_copy "$dir" make -s starter DIR="$dir" EX="$ex"
        if ! (cd "$dir" && make -s -j"$jobs" bin/check_gpu) > "$work/build.log" 2>&1; then
            cat "$work/build.log"
            fail "the starter copy with $ex blanked does not build"
        fi
        if ! nvidia-smi -L > /dev/null 2>&1; then
            code=0
            (cd "$dir" && python3 scripts/exercises.py check "$ex") > "$work/skip.log" 2>&1 || code=$?
            [ "$code" = 4 ] && grep -q "^SKIP $ex: needs an NVIDIA GPU" "$work/skip.log" || { cat "$work/skip.log"; fail "$ex: make check without a GPU should skip with code 4, got $code"; }
            echo "blanked $ex (GPU): builds warnings-clean; without a GPU make check skips it (code 4)"
        else
            echo "blanked $ex (GPU): builds warnings-clean (its fail-then-pass proof: bash scripts/exercises_proof.sh gpu)"
        fi
        rm -rf "$dir"
    done
    while IFS=$'\t' read -r bug ex hint; do
        dir="$work/bug-$bug"
        seeded_copy "$dir" python3 scripts/exercises.py plant "$bug" "$dir"
        (cd "$dir" && make -s -j"$jobs" bin/check_cpu) > "$work/build.log" 2>&1 || { cat "$work/build.log"; fail "bug $bug: the copy does not build"; }
        if (cd "$dir" && bin/check_cpu "$ex") > "$work/bug.log"; then cat "$work/bug.log"; fail "bug $bug: $ex's checks pass"; fi
        found=$(grep "hint: " "$work/bug.log" | grep -F -m1 -- "$hint" || true)
        [ -n "$found" ] || { cat "$work/bug.log"; fail "bug $bug: no hint containing '$hint'"; }
        echo "planted $bug: $ex FAILs, $(echo "$found" | sed 's/^ *//' | cut -c1-120)..."
        rm -rf "$dir"
    done < <(python3 scripts/exercises.py bugs)
fi
echo "exercises proof ($kind): all good in $(( $(date +%s) - start )) s"
