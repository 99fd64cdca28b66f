// blocks.cuh: the small building blocks every rung shares: ceil-division, warp reductions, the SM count, and the
// backward pass's D_i = rowsum(dO_i * O_i). Included by path ("common/blocks.cuh"; the repository root is on the
// include path). Matrix views of the naive rung stay in naive/naive.h; the tensor-core building blocks (mma,
// ldmatrix and its lane addressing, cp.async) in v2/mma.cuh.
#pragma once
#include <cuda_runtime.h>

#include "cuda_check.h"

// ceil(a / b) for a >= 0, b > 0: how many tiles of b cover a.
template <typename I>
__host__ __device__ constexpr I ceil_div(I a, I b) {
    return (a + b - 1) / b;
}

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

// The current device's number of SMs, read once (at the first call), never hard-coded.
inline int device_sm_count() {
    static const int sms = [] {
        int device = 0, n = 0;
        CUDA_CHECK(cudaGetDevice(&device));
        CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
        return n;
    }();
    return sms;
}

// D_i = sum_c dO_ic * O_ic for `rows` rows of d floats, one warp per row (a template only so that every file can
// include it; T = float).
template <typename T>
__global__ void rowsum_dO_O_kernel(const T* dO, const T* O, float* D, long long rows, int d) {
    const long long row = blockIdx.x * (long long)(blockDim.x / 32) + threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    if (row >= rows) return;
    float acc = 0.0f;
    for (int c = lane; c < d; c += 32) acc += float(dO[row * d + c]) * float(O[row * d + c]);
    acc = warp_sum(acc);
    if (lane == 0) D[row] = acc;
}
inline void rowsum_dO_O(const float* dO, const float* O, float* D, long long rows, int d) {
    constexpr int kRowsPerBlock = 8;  // 8 warps, 256 threads
    rowsum_dO_O_kernel<float><<<unsigned(ceil_div(rows, (long long)kRowsPerBlock)), 32 * kRowsPerBlock>>>(dO, O, D,
                                                                                                       rows, d);
    CUDA_CHECK_LAUNCH();
}
