// blocks.cuh: the small building blocks every rung shares: ceil-division, warp reductions, the SM count, the order
// of a causal grid's blocks (GridOrder), and the backward pass's D_i = rowsum(dO_i * O_i). Included by path
// ("common/blocks.cuh"; the repository root is on the include path). Matrix views of the naive rung stay in
// naive/naive.h; the tensor-core building blocks (mma, ldmatrix and its lane addressing, cp.async) in v2/mma.cuh.
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

// The order in which a grid's blocks take (tile, head) pairs, for grids where every head's tile 0 is the heaviest
// (causal: v2's forward takes its Q tiles last first, its dK/dV kernel its K/V tiles first first). The GPU starts
// blocks about in the order of their linear index, x fastest, then y, then z. Taken head by head, the last heads'
// heavy tiles start last, and at the end a few SMs still work while the others idle. Taken tile-major over all heads,
// every heavy tile starts first and the tail is light, but each wave of blocks then holds tiles of many heads, whose
// inputs do not share L2. In between: the heads in chunks of `chunk`, each chunk tile-major. The grid is (chunk,
// tiles, chunks): block (x, y, z) takes tile y of head z chunk + x - pad, where the pad < chunk unused heads sit in
// front of the first chunk (their blocks return at once), so that the grid ends on a full chunk. With chunk = 1 the
// grid is (1, tiles, heads), each head's tiles in turn. Block coordinates, a multiply and an add: no division.
struct GridOrder {
    int chunk = 1;  // heads a chunk
    int pad = 0;    // chunks * chunk - heads
    // The head of block (x, z); negative for the first chunk's unused blocks.
    __host__ __device__ int head(int x, int z) const { return z * chunk + x - pad; }
};
struct OrderedGrid {
    GridOrder order;
    dim3 grid;
};
inline OrderedGrid ordered_grid(int tiles, int heads, int chunk) {
    const int chunks = ceil_div(heads, chunk);
    return {GridOrder{chunk, chunks * chunk - heads}, dim3(unsigned(chunk), unsigned(tiles), unsigned(chunks))};
}
// The chunk of v2's causal launches: the fewest heads whose tiles fill two waves of the grid (slots: the blocks
// resident on the GPU at once), at least one, at most all of them. On an H100 (docs/v2.md, "The causal grid order")
// all heads in one chunk lost up to 13% (short backward sequences) and chunks of one wave up to 5%, where two waves
// stayed within 1.5% of the best of the three at every shape timed: up to 10% faster than head by head, 0.8% slower
// at worst.
inline int heavy_first_chunk(int tiles, int heads, int slots) {
    const int chunk = ceil_div(2 * slots, tiles);
    return chunk < 1 ? 1 : chunk < heads ? chunk : heads;
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
