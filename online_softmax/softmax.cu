// softmax.cu: row softmax the online way, in two passes over the row. One block per row, like the 3-pass kernel
// in naive/softmax.cu; what changes is that its first two passes (the max, then the sum) become one.
//
// Pass 1 (Milakov & Gimelshein, Algorithm 3): every thread folds its scores s_j = scale * x_j into a running (m, l):
//     m_new = max(m, s_j),   l = l * exp(m - m_new) + exp(s_j - m_new),
// which is merge((m, l), (s_j, 1)): a single score s is the part whose max is s and whose sum is exp(s - s) = 1.
// add_score (merge.cuh) computes exactly that with one exp instead of two.
// The threads' states are then merged across the warp (shuffles) and across warps (shared memory). merge is
// associative, so any split of the row gives the same (m, l) up to rounding.
// Pass 2: y_j = exp(s_j - m) / l.
// The row is read twice and written once: 3 accesses per element instead of 4.
//
// How the row is read and written (vector loads, loads in flight, the block size) is naive/rows.cuh, shared with
// the 3-pass kernel, so the two kernels differ only in their passes.
#include "cuda_check.h"
#include "naive/rows.cuh"
#include "online_softmax/online_softmax.h"

namespace {

template <class Rows>
__global__ void __launch_bounds__(Rows::THREADS) softmax_online_kernel(const float* X, float* Y, float* lse, int C,
                                                                       float scale) {
    __shared__ SoftmaxState scratch[Rows::THREADS / 32];
    const float* x = X + (long long)blockIdx.x * C;
    float* y = Y + (long long)blockIdx.x * C;

    // Pass 1: the running (m, l) of this thread's scores, then of the row.
    // EXERCISE(online-rows-kernel): pass 1, the row's (m, l): each thread folds its scores, then the block merges
    SoftmaxState state = {-INFINITY, 0.0f};
    Rows::for_each(x, C, [&](float xj) { state = add_score(state, scale * xj); });
    const SoftmaxState row = Rows::reduce(state, [](SoftmaxState a, SoftmaxState b) { return merge(a, b); }, scratch);
    // END EXERCISE

    // Pass 2: y_j = exp(s_j - m) / l, the single-score part (s_j, 1) rescaled to the row's max, over l. For a row
    // of -inf (m = -inf, l = 0) rescale_factor gives 0 instead of exp(-inf - (-inf)) = NaN, and 1 / l is not taken.
    const float inv_l = row.l > 0.0f ? 1.0f / row.l : 0.0f;
    Rows::transform(x, y, C, [&](float xj) { return rescale_factor(scale * xj, row.m) * inv_l; });
    if (lse && threadIdx.x == 0) lse[blockIdx.x] = log_sum_exp(row);
}

}  // namespace

void softmax_rows_online(const float* X, float* Y, float* lse, int R, int C, float scale, cudaStream_t stream) {
    launch_row_blocks(X, Y, R, C, [&](auto rows) {
        using Rows = decltype(rows);
        softmax_online_kernel<Rows><<<R, Rows::THREADS, 0, stream>>>(X, Y, lse, C, scale);
    });
    CUDA_CHECK_LAUNCH();
}
