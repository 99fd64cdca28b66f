// softmax.cu: row softmax the online way, in two passes over the row. One block per row, like the 3-pass kernel
// in naive/softmax.cu; what changes is that its first two passes (the max, then the sum) become one.
//
// Pass 1 (Milakov & Gimelshein, Algorithm 3): every thread folds its scores s_j = scale * x_j into a running (m, l):
//     m_new = max(m, s_j),   l = l * exp(m - m_new) + exp(s_j - m_new),
// which is merge((m, l), (s_j, 1)): a single score s is the part whose max is s and whose sum is exp(s - s) = 1.
// The threads' states are then merged across the warp (shuffles) and across warps (shared memory). merge is
// associative, so any split of the row gives the same (m, l) up to rounding.
// Pass 2: y_j = exp(s_j - m) / l.
// The row is read twice and written once: 3 accesses per element instead of 4.
//
// Memory: a thread issues UNROLL independent loads before it uses any, 16 bytes each when the rows allow it
// (C % 4 == 0 and 16-byte aligned arrays), single floats otherwise. The block size depends on the number of rows
// (measured on an H200, see online_softmax/rows_main.cu): with many rows, 256-thread blocks, many per SM, so one
// block's loads overlap another's merges; with too few rows to fill the GPU that way (a few hundred long rows),
// 1024-thread blocks, as that is what keeps enough bytes in flight. Each size is poor at the other's job: 1024
// threads on short rows spend their time in the block's merge and barriers (23% of copy bandwidth, not 99%).
#include <cstdint>

#include "cuda_check.h"
#include "online_softmax/online_softmax.h"

namespace {

// V consecutive floats, loaded and stored as one access (16 bytes for V = 4).
template <int V>
struct alignas(4 * V) Pack {
    float x[V];
};

// Merges every thread's state into the row's; every thread gets the result.
template <int THREADS>
__device__ SoftmaxState block_merge(SoftmaxState s, SoftmaxState* scratch /* [THREADS / 32] */) {
    for (int offset = 16; offset > 0; offset /= 2)
        s = merge(s, {__shfl_xor_sync(0xffffffffu, s.m, offset), __shfl_xor_sync(0xffffffffu, s.l, offset)});
    if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = s;
    __syncthreads();
    s = scratch[0];
    for (int w = 1; w < THREADS / 32; ++w) s = merge(s, scratch[w]);
    return s;
}

template <int THREADS, int UNROLL, int V>
__global__ void __launch_bounds__(THREADS) softmax_online_kernel(const float* X, float* Y, float* lse, int C,
                                                                 float scale) {
    __shared__ SoftmaxState scratch[THREADS / 32];
    const Pack<V>* x = reinterpret_cast<const Pack<V>*>(X + (long long)blockIdx.x * C);
    Pack<V>* y = reinterpret_cast<Pack<V>*>(Y + (long long)blockIdx.x * C);
    const int packs = C / V;  // the host picks V so that it divides C
    // Thread t handles packs t, t + THREADS, t + 2 * THREADS, ...; one step of the loops below covers UNROLL of them.
    constexpr int STEP = UNROLL * THREADS;

    // Pass 1: the running (m, l) of this thread's scores, then of the row.
    SoftmaxState state = {-INFINITY, 0.0f};
    for (int j0 = threadIdx.x; j0 < packs; j0 += STEP) {
        Pack<V> p[UNROLL];
#pragma unroll
        for (int u = 0; u < UNROLL; ++u)
            if (j0 + u * THREADS < packs) p[u] = x[j0 + u * THREADS];
#pragma unroll
        for (int u = 0; u < UNROLL; ++u)
            if (j0 + u * THREADS < packs)
#pragma unroll
                for (int k = 0; k < V; ++k) state = merge(state, {scale * p[u].x[k], 1.0f});
    }
    const SoftmaxState row = block_merge<THREADS>(state, scratch);

    // Pass 2: y_j = exp(s_j - m) / l, the single-score part (s_j, 1) rescaled to the row's max, over l. For a row
    // of -inf (m = -inf, l = 0) rescale_factor gives 0 instead of exp(-inf - (-inf)) = NaN, and 1 / l is not taken.
    const float inv_l = row.l > 0.0f ? 1.0f / row.l : 0.0f;
    for (int j0 = threadIdx.x; j0 < packs; j0 += STEP) {
        Pack<V> p[UNROLL];
#pragma unroll
        for (int u = 0; u < UNROLL; ++u)
            if (j0 + u * THREADS < packs) p[u] = x[j0 + u * THREADS];
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            if (j0 + u * THREADS >= packs) continue;
#pragma unroll
            for (int k = 0; k < V; ++k) p[u].x[k] = rescale_factor(scale * p[u].x[k], row.m) * inv_l;
            y[j0 + u * THREADS] = p[u];
        }
    }
    if (lse && threadIdx.x == 0) lse[blockIdx.x] = log_sum_exp(row);
}

template <int THREADS, int UNROLL>
void launch(const float* X, float* Y, float* lse, int R, int C, float scale, cudaStream_t stream) {
    const bool vectorised = C % 4 == 0 && reinterpret_cast<uintptr_t>(X) % 16 == 0 && reinterpret_cast<uintptr_t>(Y) % 16 == 0;
    if (vectorised)
        softmax_online_kernel<THREADS, UNROLL, 4><<<R, THREADS, 0, stream>>>(X, Y, lse, C, scale);
    else
        softmax_online_kernel<THREADS, UNROLL, 1><<<R, THREADS, 0, stream>>>(X, Y, lse, C, scale);
    CUDA_CHECK_LAUNCH();
}

}  // namespace

void softmax_rows_online(const float* X, float* Y, float* lse, int R, int C, float scale, cudaStream_t stream) {
    int device = 0, sms = 0;
    CUDA_CHECK(cudaGetDevice(&device));
    CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    // 2048 resident threads per SM: can 256-thread blocks, one per row, fill every SM?
    if (long(R) * 256 >= long(sms) * 2048)
        launch<256, 4>(X, Y, lse, R, C, scale, stream);
    else
        launch<1024, 2>(X, Y, lse, R, C, scale, stream);
}
