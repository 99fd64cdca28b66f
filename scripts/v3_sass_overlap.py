#!/usr/bin/env python3
"""Where the wait for P V lands in v3's compiled kernels: a check of the SASS, not of the source.

Step 4 on writes Algorithm 2's order: wgmma wait_group 1 (S_j done), the softmax of S_j, wait_group 0 (P_{j-1} V_{j-1}
done). ptxas may move a wait earlier (waiting sooner is always correct), and what the GPU runs is the SASS. For every
forward_kernel from step 4 on, this prints how many MUFU.EX2 (the softmax's exponentials) lie between
`WARPGROUP.DEPBAR.LE gsb0, 0x1` and the next `WARPGROUP.DEPBAR.LE gsb0, 0x0`, and how many follow that wait before the
next HGMMA: "0 between" means the exponentials do not overlap P V.

Needs cuobjdump (the full CUDA toolkit; set CUOBJDUMP to its path otherwise).
Usage: python3 scripts/v3_sass_overlap.py [build/v3/forward.o]
"""
import os, re, subprocess, sys

obj = sys.argv[1] if len(sys.argv) > 1 else "build/v3/forward.o"
tool = os.environ.get("CUOBJDUMP", "cuobjdump")
try:
    sass = subprocess.run([tool, "-sass", obj], capture_output=True, text=True, check=True).stdout
except (OSError, subprocess.CalledProcessError) as e:
    sys.exit(f"v3_sass_overlap: cannot run {tool} -sass {obj}: {e}")

kernels, name = {}, None
for line in sass.splitlines():
    m = re.search(r"Function : (\S+)", line)
    if m:
        name = m.group(1)
        kernels[name] = []
        continue
    m = re.search(r"/\*[0-9a-f]{4}\*/\s+(.*?);", line)
    if name and m:
        kernels[name].append(m.group(1))

print("dtype d causal step: MUFU.EX2 between wait<1> and wait<0>, after wait<0> (per wait<1> in the kernel)")
for name, ins in sorted(kernels.items()):
    k = re.search(r"forward_kernelI(6__half|13__nv_bfloat16)Li(\d+)ELb(\d)ELi(\d+)E", name)
    if not k or int(k.group(4)) < 4:
        continue
    counts = []
    for i, t in enumerate(ins):
        if "DEPBAR.LE gsb0, 0x1" not in t:
            continue
        j, between = i + 1, 0
        while j < len(ins) and "DEPBAR.LE gsb0, 0x0" not in ins[j]:
            between += "MUFU.EX2" in ins[j]
            j += 1
        after = 0
        for t2 in ins[j + 1:]:
            if "HGMMA" in t2 or "DEPBAR" in t2:
                break
            after += "MUFU.EX2" in t2
        counts.append(f"{between} between, {after} after")
    dtype = "fp16" if "half" in k.group(1) else "bf16"
    print(f"{dtype} d={k.group(2)} causal={k.group(3)} step {k.group(4)}: " + "; ".join(counts))
