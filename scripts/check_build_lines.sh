#!/usr/bin/env bash
# check_build_lines.sh: the one-line nvcc command in the first comment of every program's main file must build that
# program on its own, as its comment promises. Run by CI after `make all` (no GPU: nothing is run). Exit 1 if any
# line fails.
#
# By default each line is checked without compiling its sources again (compiling them, six programs that share most
# of their sources, took CI 15 minutes on 2 cores): its source list is expanded by bash exactly as the line would
# be, every source must exist and have been compiled by `make all` with flags that include the line's (so it
# compiles with the line's flags), and the objects of exactly those sources must link into a program (so the list
# is complete and nothing is defined twice). FULL=1 runs every line as written instead (-arch=native becomes
# -arch=sm_80 without a GPU), in parallel.
set -u
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fails=0
files=(*/main.cu online_softmax/rows_main.cu)
BUILD=${BUILD:-build}
# the options every object of `make all` was compiled with (Makefile: NVCCFLAGS and -I. -Itests)
make_flags=" $(sed -n 's/^NVCCFLAGS ?= //p' Makefile) -I. -Itests "

line_of() { grep -m1 -E '^//   nvcc ' "$1" | sed -E 's|^//   ||; s| && \./.*$||'; }

# check_compiled: every line run as written, in parallel
check_compiled() {
    pids=()
    for f in "${files[@]}"; do
        line=$(line_of "$f")
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
}

# check_linked: every line's sources expanded, their flags and objects checked, the objects linked
check_linked() {
    for f in "${files[@]}"; do
        line=$(line_of "$f")
        if [ -z "$line" ]; then echo "FAIL: $f has no one-line nvcc build in its first comment"; fails=$((fails + 1)); continue; fi
        # the line's words as bash expands them (globs, braces, $(ls ... | grep ...)), run from the repository root
        mapfile -t words < <(bash -c 'for w in '"${line#nvcc }"'; do printf "%s\n" "$w"; done')
        why=""
        sources=()
        flags=()
        for ((k = 0; k < ${#words[@]}; k++)); do
            w=${words[k]}
            case $w in
                -o) k=$((k + 1)) ;;                                   # the output name
                -arch=*|-gencode) [ "$w" = -gencode ] && k=$((k + 1)) ;;  # the architecture: the line's own choice
                -*) flags+=("$w") ;;
                *.cu) sources+=("$w") ;;
                *) why="an argument that is neither an option nor a .cu file: '$w'" ;;
            esac
        done
        for w in "${flags[@]}"; do
            [[ "$make_flags" == *" $w "* ]] || why="option $w is not among make's ($make_flags): its objects say nothing about it"
        done
        objects=()
        for s in "${sources[@]}"; do
            if [ ! -f "$s" ]; then why="source $s does not exist"; break; fi
            o="$BUILD/${s%.cu}.o"
            if [ ! -f "$o" ] || [ "$o" -ot "$s" ]; then why="$o is missing or older than $s: run make all first"; break; fi
            objects+=("$o")
        done
        [ ${#sources[@]} -gt 0 ] || why="no .cu source in the line"
        if [ -z "$why" ] && ! nvcc "${objects[@]}" -o "$tmp/program" >"$tmp/link.log" 2>&1; then
            why="its sources' objects do not link: $(grep -m3 -iE "undefined|multiple|error" "$tmp/link.log" | tr '\n' ' ')"
        fi
        if [ -z "$why" ]; then echo "ok: the build line of $f (${#sources[@]} sources, linked from make's objects)"
        else echo "FAIL: the build line of $f: $why"; fails=$((fails + 1)); fi
    done
}

if [ "${FULL:-}" = 1 ]; then check_compiled; else check_linked; fi
[ $fails -eq 0 ] && echo "check_build_lines: all build" || echo "check_build_lines: $fails failed"
exit $((fails > 0))
