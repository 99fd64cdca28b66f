#!/usr/bin/env bash
# cli_test.sh: every program refuses bad input with one line on stderr and a non-zero exit, never a crash,
# and round-trips .npy files. Runs with or without a GPU (without one, programs run their CPU models).
set -u
cd "$(dirname "$0")/.."
fails=0
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# expect CODE PROGRAM ARGS...: exit code CODE, and for a refusal exactly one stderr line starting "error:"
expect() {
    local want=$1; shift
    "$@" >"$tmp/out" 2>"$tmp/err" </dev/null
    local got=$?
    local lines
    lines=$(wc -l <"$tmp/err")
    if [ "$got" != "$want" ]; then
        echo "FAIL: '$*' exited $got, expected $want"; cat "$tmp/err"; fails=$((fails + 1))
    elif [ "$want" = 2 ] && { [ "$lines" != 1 ] || ! grep -q '^error: ' "$tmp/err"; }; then
        echo "FAIL: '$*' should print one 'error:' line, printed:"; cat "$tmp/err"; fails=$((fails + 1))
    else
        echo "ok: $* -> $got $( [ "$want" = 2 ] && cat "$tmp/err")"
    fi
}

# expect_within SECONDS CODE PROGRAM ARGS...: as expect, and the program must finish within SECONDS under a 2 GiB
# memory limit (a header that lies about its size must not make the reader allocate or wait)
expect_within() {
    local secs=$1; shift
    expect "$1" timeout "$secs" bash -c 'ulimit -v 2097152; exec "$@"' _ "${@:2}"
}

small="--batch 1 --heads 2 --n 33 --d 16"
for prog in bin/naive bin/online_softmax bin/v1 bin/v2; do
    [ -x "$prog" ] || continue
    expect 0 "$prog" --help
    expect 2 "$prog" --bogus
    expect 2 "$prog" --batch 0
    expect 2 "$prog" --n -5
    expect 2 "$prog" --n 12x
    expect 2 "$prog" --heads 99999999999
    expect 2 "$prog" --batch 65536 --heads 65536 --n 65536
    expect 2 "$prog" --batch 2147483647 --heads 2147483647 --n 2147483647 --d 2147483647  # beyond any integer (fuzz find)
    expect 2 "$prog" --n 8 --nq 4
    expect 2 "$prog" --d 1000
    expect 2 "$prog" --dist uniform
    expect 2 "$prog" --scale -1
    expect 2 "$prog" --n
    expect 2 "$prog" $'--bo\ngus'              # a newline in an argument stays inside the one error line (fuzz find)
    expect 2 "$prog" --n $'1\n2'
    expect 2 "$prog" --save --check          # a value-taking flag never swallows the next flag
    expect 2 "$prog" --load=
    expect 2 "$prog" --save=
    expect 2 "$prog" --load "$tmp" --n 64    # --load takes the sizes from its files
    expect 2 "$prog" --seed 3 --load "$tmp"
    [ -e ./--check ] && { echo "FAIL: a directory named --check was made"; fails=$((fails + 1)); rm -rf ./--check; }
    expect 2 "$prog" --load "$tmp/missing"
    expect 0 "$prog" $small --causal --check
    expect 2 "$prog" --window 3                # L,R
    expect 2 "$prog" --window 3,-2
    expect 2 "$prog" --dropout 1
    expect 2 "$prog" --dropout nan
    expect 2 "$prog" --dropout 0.999  # rounds to 256/256: every weight dropped
    expect 2 "$prog" --load "$tmp" --seed 3 --dropout 0  # --seed with --load keys only a dropout mask
    expect 2 "$prog" --heads 6 --kv-heads 4     # K/V heads must divide the query heads
    expect 2 "$prog" --load "$tmp" --kv-heads 2  # --load takes them from k.npy
    if [ "$prog" = bin/v2 ]; then             # the extensions run in v2's CPU model only so far
        expect 0 "$prog" $small --window 4,1 --dropout 0.3 --cpu --check
        expect 0 "$prog" $small --window 4,1 --dropout 0.3 --cpu --check --backward
        expect 0 "$prog" --batch 2 --heads 4 --kv-heads 2 --n 40 --d 16 --dropout 0.2 --cpu --check --backward
        expect 0 "$prog" $small --bias --alibi --causal --cpu --check --backward --save "$tmp/bias"
        [ -f "$tmp/bias/dbias.npy" ] || { echo "FAIL: --bias --backward --save wrote no dbias.npy"; fails=$((fails + 1)); }
        expect 0 "$prog" --heads 2 --d 16 --seqlens-q 5,17,1 --seqlens-k 30,2,9 --causal --cpu --check --backward
        expect 2 "$prog" --seqlens 3,4 --n 5        # the lists set the batch and the lengths
        expect 2 "$prog" --seqlens-q 3,4 --seqlens-k 5
        expect 2 "$prog" --seqlens 3,0
    else
        expect 2 "$prog" $small --window 4,1
        expect 2 "$prog" --heads 4 --kv-heads 2
        expect 2 "$prog" $small --alibi
    fi
    # .npy round trip: save the outputs, feed the inputs back through --load, outputs must not change
    mkdir -p "$tmp/io"
    python3 - "$tmp/io" <<'PY' 2>/dev/null || continue
import os, struct, sys, random
def header(shape_text, descr="<f4"):  # a .npy header, padded to a multiple of 64 bytes
    h = "{'descr': '%s', 'fortran_order': False, 'shape': (%s), }" % (descr, shape_text)
    h += " " * ((64 - (10 + len(h) + 1) % 64) % 64) + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(h)) + h.encode()
def save(path, shape, factor=1.0):  # random normal values times factor
    n = 1
    for s in shape: n *= s
    with open(path, "wb") as f:
        f.write(header(", ".join(map(str, shape))))
        f.write(struct.pack("<%df" % n, *[random.gauss(0, 1) * factor for _ in range(n)]))
d = sys.argv[1]
save(d + "/q.npy", (1, 2, 9, 16)); save(d + "/k.npy", (1, 2, 13, 16)); save(d + "/v.npy", (1, 2, 13, 16))
save(d + "/do.npy", (1, 2, 9, 16))
def header_only(path, shape_text):  # a valid float32 header with the given shape text and 64 bytes of data
    with open(path, "wb") as f:
        f.write(header(shape_text) + b"\0" * 64)
# headers that lie: each must be refused in one line, before anything is allocated
for name, text in (("huge", "1, 1, 1048576, 1048576"), ("toolong", "1, 1, 99999999999999999999999, 4"),
                   ("wrap", "1, 1, 4294967297, 4"), ("negative", "1, -2, 8, 16"), ("text", "1, two, 8, 16"),
                   ("float", "1, 2.5, 8, 16"), ("short", "1, 1, 4, 5")):
    header_only("%s/lie_%s.npy" % (d, name), text)
for name, factor in (("overflow", 1e19), ("big", 1e5)):  # scores beyond fp32; values beyond fp16
    os.makedirs("%s/%s" % (d, name), exist_ok=True)
    save("%s/%s/q.npy" % (d, name), (1, 2, 9, 16), factor)
    save("%s/%s/k.npy" % (d, name), (1, 2, 13, 16), factor)
    save("%s/%s/v.npy" % (d, name), (1, 2, 13, 16), 1.0)
with open(d + "/bad_dtype.npy", "wb") as f:
    f.write(header("1, 1, 1, 1", "<f8") + b"\0" * 8)
PY
    expect 0 "$prog" --load "$tmp/io" --save "$tmp/io/out" --check
    expect 2 "$prog" --load "$tmp/io/overflow"   # finite inputs whose scores overflow fp32 are refused
    grep -q "beyond what fp32" "$tmp/err" || { echo "FAIL: the overflow refusal should say why"; fails=$((fails + 1)); }
    [ -s "$tmp/io/out/o.npy" ] && [ -s "$tmp/io/out/lse.npy" ] || { echo "FAIL: $prog --save wrote no o.npy/lse.npy"; fails=$((fails + 1)); }
    mkdir -p "$tmp/bad"; cp "$tmp/io/q.npy" "$tmp/io/v.npy" "$tmp/bad/"; cp "$tmp/io/bad_dtype.npy" "$tmp/bad/k.npy"
    expect 2 "$prog" --load "$tmp/bad"
    head -c 150 "$tmp/io/q.npy" >"$tmp/bad/q.npy"; cp "$tmp/io/k.npy" "$tmp/bad/k.npy"
    expect 2 "$prog" --load "$tmp/bad"
    cp "$tmp/io/q.npy" "$tmp/bad/q.npy"; cp "$tmp/io/q.npy" "$tmp/bad/k.npy"
    expect 2 "$prog" --load "$tmp/bad"
    cp "$tmp/io/k.npy" "$tmp/bad/k.npy"
    for lie in "$tmp"/io/lie_*.npy; do
        cp "$lie" "$tmp/bad/q.npy"
        expect_within 10 2 "$prog" --load "$tmp/bad"
    done
    rm -f "$tmp/bad/q.npy"; mkfifo "$tmp/bad/q.npy"  # a FIFO must be refused, not read forever
    expect_within 10 2 "$prog" --load "$tmp/bad"
    rm -f "$tmp/bad/q.npy"
done
if [ -x bin/v2 ]; then
    expect 2 bin/v2 --dtype fp8
    expect 2 bin/v2 --dtype fp16 --d 12                 # head dims are multiples of 8 from 8 to 256
    expect 2 bin/v2 --deterministic                     # a backward flag without --backward
    expect 2 bin/v2 --backward --deterministic          # fp32: the CUDA-core backward has atomics only
    # --kernel with --backward picks a backward step (the final forward runs): the backward has one step more
    expect 0 bin/v2 --dtype fp16 --n 70 --d 64 --backward --kernel bwd-defer-dq --check
    expect 2 bin/v2 --dtype fp16 --n 70 --d 64 --kernel 7       # the forward has steps 1..6
    expect 2 bin/v2 --dtype fp16 --n 70 --d 64 --backward --kernel 8
    expect 2 bin/naive --backward --deterministic       # a stage without such a backward says so
    expect 2 bin/v2 --dtype fp16 --load "$tmp/io/big"   # 1e5 is no fp16 value
    expect 0 bin/v2 $small --backward --check
    # a check too large to run is not a pass: its own exit code, a row that says so, a size that is checked
    expect 4 bin/v2 --batch 4 --heads 8 --n 512 --d 64 --backward --check
    grep -q "SKIPPED: too large to check (--n 494)" "$tmp/out" || { echo "FAIL: the skipped row or its hint"; fails=$((fails + 1)); }
    expect 0 bin/v2 --batch 4 --heads 8 --n 494 --d 64 --backward --check
    # --backward --save writes the forward's outputs too
    rm -rf "$tmp/bwd"; expect 0 bin/v2 $small --backward --save "$tmp/bwd"
    for f in o lse dq dk dv; do
        [ -s "$tmp/bwd/$f.npy" ] || { echo "FAIL: --backward --save wrote no $f.npy"; fails=$((fails + 1)); }
    done
    # a packed batch through --load (cu_seqlens_q.npy, cu_seqlens_k.npy, int32, as FlashAttention takes them): two
    # sequences of equal lengths must give the padded batch's numbers, rows permuted from [B, H, N, d] to [T, H, d]
    if python3 - "$tmp/pk" <<'PY' 2>/dev/null; then
import os, random, struct, sys
def write(path, shape, values, descr="<f4"):
    h = "{'descr': '%s', 'fortran_order': False, 'shape': (%s,), }" % (descr, ", ".join(map(str, shape)))
    h += " " * ((64 - (10 + len(h) + 1) % 64) % 64) + "\n"
    with open(path, "wb") as f:
        f.write(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(h)) + h.encode())
        f.write(struct.pack("<%d%s" % (len(values), "i" if descr == "<i4" else "f"), *values))
d = sys.argv[1]
B, H, Nq, Nk, D = 2, 2, 9, 13, 16
for sub in ("padded", "packed", "bad_end", "no_k", "float_cu", "zero_len"):
    os.makedirs("%s/%s" % (d, sub), exist_ok=True)
for name, N in (("q", Nq), ("k", Nk), ("v", Nk), ("do", Nq)):
    x = [random.gauss(0, 1) for _ in range(B * H * N * D)]  # [B, H, N, d]
    write("%s/padded/%s.npy" % (d, name), (B, H, N, D), x)
    packed = [x[((b * H + h) * N + n) * D + c] for b in range(B) for n in range(N) for h in range(H) for c in range(D)]
    for sub in ("packed", "bad_end", "no_k", "float_cu", "zero_len"):
        write("%s/%s/%s.npy" % (d, sub, name), (B * N, H, D), packed)
for sub in ("packed", "bad_end", "no_k", "float_cu", "zero_len"):
    write("%s/%s/cu_seqlens_q.npy" % (d, sub), (3,), [0, Nq, 2 * Nq], "<i4")
for sub, cu_k in (("packed", [0, Nk, 2 * Nk]), ("bad_end", [0, Nk, 2 * Nk - 1]), ("zero_len", [0, 2 * Nk, 2 * Nk])):
    write("%s/%s/cu_seqlens_k.npy" % (d, sub), (3,), cu_k, "<i4")
write("%s/float_cu/cu_seqlens_k.npy" % d, (3,), [0.0, Nk, 2 * Nk])
PY
        expect 0 bin/v2 --load "$tmp/pk/padded" --causal --cpu --backward --save "$tmp/pk/padded/out"
        expect 0 bin/v2 --load "$tmp/pk/packed" --causal --cpu --backward --check --save "$tmp/pk/packed/out"
        python3 - "$tmp/pk" <<'PY' || { echo "FAIL: a packed --load must give the padded batch's outputs and gradients"; fails=$((fails + 1)); }
import struct, sys
def read(path):
    with open(path, "rb") as f:
        raw = f.read()
    n = struct.unpack("<H", raw[8:10])[0]
    body = raw[10 + n:]
    return struct.unpack("<%df" % (len(body) // 4), body)
d = sys.argv[1]
B, H, Nq, Nk, D = 2, 2, 9, 13, 16
worst = 0.0
for name, N, width in (("o", Nq, D), ("dq", Nq, D), ("dk", Nk, D), ("dv", Nk, D), ("lse", Nq, 1)):
    padded, packed = read("%s/padded/out/%s.npy" % (d, name)), read("%s/packed/out/%s.npy" % (d, name))
    for b in range(B):
        for h in range(H):
            for n in range(N):
                for c in range(width):
                    want = padded[((b * H + h) * N + n) * width + c]
                    got = packed[h * B * N + b * N + n] if name == "lse" else packed[((b * N + n) * H + h) * D + c]
                    worst = max(worst, abs(got - want))
print("packed vs padded: max abs difference %.3g" % worst)
sys.exit(0 if worst <= 1e-5 else 1)
PY
        expect 2 bin/v2 --load "$tmp/pk/bad_end" --cpu       # cu_seqlens_k must end at k.npy's tokens
        expect 2 bin/v2 --load "$tmp/pk/no_k" --cpu          # both cu_seqlens files
        expect 2 bin/v2 --load "$tmp/pk/float_cu" --cpu      # int32, as FlashAttention's interface takes them
        expect 2 bin/v2 --load "$tmp/pk/zero_len" --cpu     # every sequence at least one token
        expect 2 bin/v2 --load "$tmp/pk/packed" --seqlens 9,9  # the lengths come from the files
        expect 2 bin/v1 --load "$tmp/pk/packed"              # a packed batch is a v2 feature
    fi
    if ! nvidia-smi >/dev/null 2>&1; then  # without a GPU --bench times nothing and must say so
        expect 0 bin/v2 $small --bench
        grep -q "nothing is timed" "$tmp/out" && ! grep -q "^csv," "$tmp/out" ||
            { echo "FAIL: --bench without a GPU must say nothing was timed and print no CSV row"; fails=$((fails + 1)); }
    fi
fi
if [ -x bin/naive ]; then
    expect 2 bin/naive --dtype fp16
    expect 2 bin/naive --cpu --n 1048576 --d 1   # its score matrix alone is 4 TiB: refused, not std::bad_alloc
fi
# make run builds the programs only: it must not need doctest (bin/tests is not among its prerequisites)
if make -n run 2>/dev/null | grep -q "bin/tests"; then echo "FAIL: make run would build bin/tests (doctest)"; fails=$((fails + 1))
else echo "ok: make run does not build the tests"; fi

# a long CPU-model run says so up front and shows progress, head by head, on stderr
if [ -x bin/v2 ] && ! nvidia-smi >/dev/null 2>&1; then
    expect 0 bin/v2 --batch 1 --heads 3 --n 4096 --d 128   # 2.6e10 FLOP, over the 2e10 that counts as long
    grep -q "takes a while" "$tmp/out" && grep -q "head 3 of 3" "$tmp/err" ||
        { echo "FAIL: a long CPU-model run must announce itself and show progress"; fails=$((fails + 1)); }
fi

# v3 (Hopper): refusals in one line; without a Hopper GPU one line says so and the CPU model runs and checks
if [ -x bin/v3 ]; then
    expect 2 bin/v3 --n 33                                # fp32: wgmma operands are 16-bit
    expect 2 bin/v3 --dtype fp16 --d 96
    expect 2 bin/v3 --dtype fp16 --kernel 12              # steps 1..11
    expect 2 bin/v3 --dtype bf16 --kernel 1               # the steps before the final one are fp16 only
    expect 2 bin/v3 --dtype bf16 --kernel 8
    expect 0 bin/v3 --kernel list
    expect 0 bin/v3 --dtype bf16 --batch 1 --heads 2 --nq 77 --nk 45 --causal --check
    expect 0 bin/v3 --dtype fp16 --d 256 --batch 1 --heads 2 --nq 77 --nk 400 --causal --check
    if [ "$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n1)" != 9.0 ]; then
        grep -q "running the CPU model of v3 instead" "$tmp/out" ||
            { echo "FAIL: bin/v3 without a Hopper GPU must say so and run its CPU model"; fails=$((fails + 1)); }
    fi
fi

# make sanitize without the tool says which tool is missing and where it comes from
out=$(COMPUTE_SANITIZER=/nonexistent/compute-sanitizer bash scripts/sanitize.sh 2>&1)
if [ $? = 1 ] && echo "$out" | grep -q "not on PATH"; then echo "ok: sanitize.sh without the tool -> 1 $out"
else echo "FAIL: sanitize.sh without compute-sanitizer said: $out"; fails=$((fails + 1)); fi

# make sanitize's runs go in parallel (SANITIZE_JOBS) and its report keeps the list's order: with stand-ins for the
# tool (which finishes its runs in random order and fails one) and for nvidia-smi (a Hopper GPU), exit 1, the one
# failure named with the tool's lines, every other run clean, in order
if [ -x bin/v2 ] && [ -x bin/v3 ]; then
    mkdir -p "$tmp/fake"
    printf '#!/usr/bin/env bash\n[ "$1" = "--query-gpu=compute_cap" ] && echo 9.0\nexit 0\n' >"$tmp/fake/nvidia-smi"
    cat >"$tmp/fake/compute-sanitizer" <<'SH'
#!/usr/bin/env bash
sleep 0.0$(( RANDOM % 5 ))
if [ "$2" = racecheck ] && [[ "$*" == *"--d 128 --dtype bf16 --backward"* ]]; then
    echo "========= Error: Race reported between Write access and Read access"; exit 1
fi
echo "========= ERROR SUMMARY: 0 errors"
SH
    chmod +x "$tmp/fake/nvidia-smi" "$tmp/fake/compute-sanitizer"
    PATH="$tmp/fake:$PATH" COMPUTE_SANITIZER="$tmp/fake/compute-sanitizer" SANITIZE_JOBS=4 \
        bash scripts/sanitize.sh >"$tmp/san" 2>&1
    rc=$?
    runs=$(sed -n 's/^sanitize: \([0-9]*\) runs, 4 at a time.*/\1/p' "$tmp/san")
    if [ "$rc" = 1 ] && [ "$(grep -c '^FAIL: ' "$tmp/san")" = 1 ] && grep -q "^FAIL:  racecheck bin/v2 .*--d 128 --dtype bf16 --backward$" "$tmp/san" &&
       grep -A1 "^FAIL: " "$tmp/san" | grep -q "Race reported" && [ -n "$runs" ] &&
       [ "$(grep -cE '^(clean|FAIL): ' "$tmp/san")" = "$runs" ] &&
       [ "$(grep -E '^(clean|FAIL): ' "$tmp/san" | awk '{print $2}' | uniq | tr '\n' ' ')" = "memcheck racecheck synccheck initcheck " ] &&
       [ "$(head -n1 "$tmp/san")" = "clean: memcheck bin/naive --batch 1 --heads 2 --nq 77 --nk 45 --causal --check --d 40" ]; then
        echo "ok: sanitize.sh in parallel -> 1, $runs runs in order, the one planted failure reported"
    else
        echo "FAIL: sanitize.sh in parallel (rc $rc) reported:"; cat "$tmp/san"; fails=$((fails + 1))
    fi
fi

# the kernel-time cross-check: its parser of ncu's CSV (no GPU needed), and refusals in one line
expect 0 python3 scripts/kernel_time.py --self-test
expect 2 python3 scripts/kernel_time.py --impls v2,flash
expect 2 python3 scripts/kernel_time.py --impls v3,cudnn --passes bwd   # v3 is a forward; its backward is v2's
expect 2 python3 scripts/kernel_time.py --ds 60

if [ "$fails" -ne 0 ]; then echo "cli_test: $fails failures"; exit 1; fi
echo "cli_test: all passed"
