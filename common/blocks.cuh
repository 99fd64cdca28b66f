// blocks.cuh: the small building blocks every rung's kernels share: ceil-division and warp reductions.
// Included by path ("common/blocks.cuh", the repository root is on the include path).
#pragma once

// ceil(a / b) for a >= 0, b > 0: how many tiles of b cover a.
__host__ __device__ inline int ceil_div(int a, int b) { return (a + b - 1) / b; }

// Max and sum over groups of kWidth consecutive lanes (kWidth a power of two <= 32; 32 = the whole warp) by
// butterfly shuffles: every lane of a group ends with the group's result.
template <int kWidth = 32>
__device__ inline float warp_max(float x) {
    for (int offset = kWidth / 2; offset > 0; offset /= 2) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, offset));
    return x;
}
template <int kWidth = 32>
__device__ inline float warp_sum(float x) {
    for (int offset = kWidth / 2; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
    return x;
}
