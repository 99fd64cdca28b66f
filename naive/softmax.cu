// softmax.cu: row softmax the safe way, in three passes over the row (max, sum, normalise). One block per row.
//
// Why subtract the max: exp(x) overflows fp32 for x > 88.7, so softmax(x) = exp(x - m) / sum exp(x - m) with
// m = max x keeps every exponent <= 0. The cost is an extra pass: the row is read three times and written once.
#include <cmath>

#include "cuda_check.h"
#include "naive.h"

namespace {

constexpr int THREADS = 256;

// Reduces one value per thread to one value for the block (every thread gets the result).
template <class Op>
__device__ float block_reduce(float x, Op op, float* scratch /* [THREADS / 32] */) {
    for (int offset = 16; offset > 0; offset /= 2) x = op(x, __shfl_xor_sync(0xffffffffu, x, offset));
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) scratch[warp] = x;
    __syncthreads();
    x = scratch[0];
    for (int w = 1; w < THREADS / 32; ++w) x = op(x, scratch[w]);
    __syncthreads();  // scratch is reused by the next reduction
    return x;
}

__global__ void __launch_bounds__(THREADS) softmax_3pass_kernel(const float* X, float* Y, float* lse, int C,
                                                                float scale) {
    __shared__ float scratch[THREADS / 32];
    const float* x = X + (long long)blockIdx.x * C;
    float* y = Y + (long long)blockIdx.x * C;

    // Pass 1: m = max_j x_j
    float m = -INFINITY;
    for (int j = threadIdx.x; j < C; j += THREADS) m = fmaxf(m, x[j]);
    m = block_reduce(m, [](float a, float b) { return fmaxf(a, b); }, scratch);

    // Pass 2: l = sum_j exp(scale * (x_j - m)). A row of -inf (fully masked) has m = -inf: its sum is 0 and
    // x - m would be NaN, so skip the pass.
    float l = 0.0f;
    if (m != -INFINITY)
        for (int j = threadIdx.x; j < C; j += THREADS) l += expf(scale * (x[j] - m));
    l = block_reduce(l, [](float a, float b) { return a + b; }, scratch);

    // Pass 3: y_j = exp(scale * (x_j - m)) / l, or 0 for a fully masked row.
    const float inv_l = m == -INFINITY ? 0.0f : 1.0f / l;
    for (int j = threadIdx.x; j < C; j += THREADS) y[j] = m == -INFINITY ? 0.0f : expf(scale * (x[j] - m)) * inv_l;
    if (lse && threadIdx.x == 0) lse[blockIdx.x] = m == -INFINITY ? -INFINITY : scale * m + logf(l);
}

}  // namespace

void softmax_rows_3pass(const float* X, float* Y, float* lse, int R, int C, float scale, cudaStream_t stream) {
    softmax_3pass_kernel<<<R, THREADS, 0, stream>>>(X, Y, lse, C, scale);
    CUDA_CHECK_LAUNCH();
}
