// host.cu: the host-side rules of v3 that need no GPU: which problems it takes, on which GPU its kernels run, and
// how a tensor is described to TMA. The tests check these on the CPU (tests/test_v3.cu).
#include "v3.h"

#include <string>

std::string v3_tensor_map_shape(int heads, int rows, int d, int box_rows, V3TensorMapShape* s) {
    if (heads < 1 || rows < 1) return "v3: a tensor map needs at least one head and one row";
    if (d % 64 != 0) return "v3: TMA boxes are 64 columns (128 bytes, the 128-byte swizzle's width); d = " + std::to_string(d) + " is not a multiple of 64";
    if (box_rows < 1 || box_rows > 256) return "v3: a TMA box has 1..256 rows, asked for " + std::to_string(box_rows);
    const uint64_t row_bytes = uint64_t(d) * 2;
    *s = V3TensorMapShape{{uint64_t(d), uint64_t(rows), uint64_t(heads)},
                          {row_bytes, row_bytes * uint64_t(rows)},
                          {64, uint32_t(box_rows), 1},
                          uint32_t(64 * 2 * box_rows)};
    return "";
}

std::string v3_unsupported(const Problem& p) {
    const int steps = int(v3_forward_steps().size());
    if (p.dtype == DType::fp32)
        return "v3 runs fp16 and bf16 (wgmma operands are 16-bit): use --dtype fp16 or --dtype bf16";
    if (p.d != 64 && p.d != 128 && p.d != 256) return "v3 supports head dims 64, 128 and 256, got " + std::to_string(p.d);
    if (p.Nq < 1 || p.Nk < 1)
        return "v3 needs Nq >= 1 and Nk >= 1, got Nq = " + std::to_string(p.Nq) + ", Nk = " + std::to_string(p.Nk);
    if ((long(p.Nq) + 63) / 64 * p.B * p.H > INT32_MAX)
        return "v3 numbers its Q tiles with 32-bit integers: B * H * ceil(Nq / 64) must be below 2^31";
    if (p.kernel < 0 || p.kernel > steps)
        return "v3 has steps 1.." + std::to_string(steps) + " (0 = the final one), got " + std::to_string(p.kernel);
    if (p.kernel != 0 && p.kernel != steps && p.dtype != DType::fp16)
        return "v3 steps before the final one are compiled for fp16 only (use --dtype fp16)";
    return "";
}

std::string v3_gpu_unusable() {
    if (!gpu_available()) return "no CUDA device found";
    const int sm = gpu_compute_capability();
    if (sm != 90)
        return "v3's kernels need a Hopper GPU (sm_90: TMA, wgmma, setmaxnreg), found sm_" + std::to_string(sm) +
               " (" + gpu_name() + ")";
    return "";
}
