// softmax.cu: row softmax the safe way, in three passes over the row (max, sum, normalise). One block per row.
//
// Why subtract the max: exp(x) overflows fp32 for x > 88.7, so softmax(x) = exp(x - m) / sum exp(x - m) with
// m = max x keeps every exponent <= 0. The cost is an extra pass: the row is read three times and written once.
//
// How the row is read and written (vector loads, loads in flight, the block size) is naive/rows.cuh, shared with
// the online kernel of the next rung, so the two kernels differ only in their passes.
#include <cmath>

#include "cuda_check.h"
#include "naive.h"
#include "naive/rows.cuh"

namespace {

template <class Rows>
__global__ void __launch_bounds__(Rows::THREADS) softmax_3pass_kernel(const float* X, float* Y, float* lse, int C,
                                                                      float scale) {
    __shared__ float scratch[Rows::THREADS / 32];
    const float* x = X + (long long)blockIdx.x * C;
    float* y = Y + (long long)blockIdx.x * C;

    // EXERCISE(softmax-3pass-kernel): the three passes over row x (max, sum, normalise into y), and its LSE
    // Pass 1: m = max_j x_j
    float m = -INFINITY;
    Rows::for_each(x, C, [&](float xj) { m = fmaxf(m, xj); });
    m = Rows::reduce(m, [](float a, float b) { return fmaxf(a, b); }, scratch);

    // Pass 2: l = sum_j exp(scale * (x_j - m)). A row of -inf (fully masked) has m = -inf: its sum is 0 and
    // x - m would be NaN, so skip the pass.
    float l = 0.0f;
    if (m != -INFINITY) Rows::for_each(x, C, [&](float xj) { l += expf(scale * (xj - m)); });
    l = Rows::reduce(l, [](float a, float b) { return a + b; }, scratch);

    // Pass 3: y_j = exp(scale * (x_j - m)) / l, or 0 for a fully masked row.
    const float inv_l = m == -INFINITY ? 0.0f : 1.0f / l;
    Rows::transform(x, y, C, [&](float xj) { return m == -INFINITY ? 0.0f : expf(scale * (xj - m)) * inv_l; });
    if (lse && threadIdx.x == 0) lse[blockIdx.x] = m == -INFINITY ? -INFINITY : scale * m + logf(l);
    // END EXERCISE
}

}  // namespace

void softmax_rows_3pass(const float* X, float* Y, float* lse, int R, int C, float scale, cudaStream_t stream) {
    launch_row_blocks(X, Y, R, C, [&](auto rows) {
        using Rows = decltype(rows);
        softmax_3pass_kernel<Rows><<<R, Rows::THREADS, 0, stream>>>(X, Y, lse, C, scale);
    });
    CUDA_CHECK_LAUNCH();
}
