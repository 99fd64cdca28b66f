// rows.cuh: how the row softmax kernels move memory, written once for the safe 3-pass kernel (naive/softmax.cu)
// and the online 2-pass kernel (online_softmax/softmax.cu). Both run one block per row and read the row through
// RowBlock's loops, so they move memory equally well and differ only in the algorithm: what they compute per
// score, and how many times they read the row.
//
// Memory: a thread issues UNROLL independent loads before it uses any, 16 bytes each when the rows allow it
// (C % 4 == 0 and 16-byte aligned arrays), single floats otherwise. The block size depends on the number of rows
// (measured on an H200 with the online kernel, see online_softmax/rows_main.cu): with many rows, 256-thread
// blocks, many per SM, so one block's loads overlap another's reductions; with too few rows to fill the GPU that
// way (a few hundred long rows), 1024-thread blocks, as that is what keeps enough bytes in flight. Each size is
// poor at the other's job: 1024 threads on short rows spend their time in the block's reductions and barriers
// (23% of copy bandwidth, not 99%).
#pragma once
#include <cstdint>
#include <cstring>

#include "common/blocks.cuh"  // device_sm_count
#include "cuda_check.h"

// V consecutive floats, loaded and stored as one access (16 bytes for V = 4).
template <int V>
struct alignas(4 * V) Pack {
    float x[V];
};

// __shfl_xor_sync for a value made of 32-bit words (a float, the online softmax's (m, l)): one shuffle per word.
template <class T>
__device__ T shuffle_xor(T value, int offset) {
    static_assert(sizeof(T) % 4 == 0, "shuffled 4 bytes at a time");
    unsigned words[sizeof(T) / 4];
    memcpy(words, &value, sizeof(T));
    for (unsigned& w : words) w = __shfl_xor_sync(0xffffffffu, w, offset);
    memcpy(&value, words, sizeof(T));
    return value;
}

// One block of THREADS threads per row of C floats, read as C / V packs of V floats (V divides C). Thread t
// handles packs t, t + THREADS, t + 2 * THREADS, ...; one step of the loops covers UNROLL of them, loaded before
// any is used.
template <int THREADS_, int UNROLL_, int V_>
struct RowBlock {
    static constexpr int THREADS = THREADS_, UNROLL = UNROLL_, V = V_;

    // Calls f(x_j) for this thread's share of the row x.
    template <class F>
    __device__ static void for_each(const float* x, int C, F f) {
        const Pack<V>* packs = reinterpret_cast<const Pack<V>*>(x);
        const int n = C / V;
        for (int j0 = threadIdx.x; j0 < n; j0 += UNROLL * THREADS) {
            Pack<V> p[UNROLL];
#pragma unroll
            for (int u = 0; u < UNROLL; ++u)
                if (j0 + u * THREADS < n) p[u] = packs[j0 + u * THREADS];
#pragma unroll
            for (int u = 0; u < UNROLL; ++u)
                if (j0 + u * THREADS < n)
#pragma unroll
                    for (int k = 0; k < V; ++k) f(p[u].x[k]);
        }
    }

    // y_j = f(x_j) for this thread's share of the row. y may be x: every element is read, then written, by the
    // same thread.
    template <class F>
    __device__ static void transform(const float* x, float* y, int C, F f) {
        const Pack<V>* in = reinterpret_cast<const Pack<V>*>(x);
        Pack<V>* out = reinterpret_cast<Pack<V>*>(y);
        const int n = C / V;
        for (int j0 = threadIdx.x; j0 < n; j0 += UNROLL * THREADS) {
            Pack<V> p[UNROLL];
#pragma unroll
            for (int u = 0; u < UNROLL; ++u)
                if (j0 + u * THREADS < n) p[u] = in[j0 + u * THREADS];
#pragma unroll
            for (int u = 0; u < UNROLL; ++u) {
                if (j0 + u * THREADS >= n) continue;
#pragma unroll
                for (int k = 0; k < V; ++k) p[u].x[k] = f(p[u].x[k]);
                out[j0 + u * THREADS] = p[u];
            }
        }
    }

    // Combines one value per thread into one for the block with op (associative); every thread gets the result.
    // Butterfly shuffles inside each warp, then one value per warp through shared memory.
    template <class T, class Op>
    __device__ static T reduce(T value, Op op, T* scratch /* [THREADS / 32] */) {
        // EXERCISE(block-reduction): combine one value per thread with op: shuffles in each warp, then across warps
        for (int offset = 16; offset > 0; offset /= 2) value = op(value, shuffle_xor(value, offset));
        if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = value;
        __syncthreads();
        value = scratch[0];
        for (int w = 1; w < THREADS / 32; ++w) value = op(value, scratch[w]);
        __syncthreads();  // scratch may be reused by the next reduction
        return value;
        // END EXERCISE
    }
};

// Chooses the RowBlock for R rows of C floats from X into Y and calls launch(RowBlock<...>{}), which starts the
// kernel for it with one block of RowBlock::THREADS threads per row.
template <class Launch>
void launch_row_blocks(const float* X, const float* Y, int R, int C, Launch launch) {
    const int sms = device_sm_count();
    const bool vectorised = C % 4 == 0 && reinterpret_cast<uintptr_t>(X) % 16 == 0 && reinterpret_cast<uintptr_t>(Y) % 16 == 0;
    // 2048 resident threads per SM: can 256-thread blocks, one per row, fill every SM?
    if (long(R) * 256 >= long(sms) * 2048) {
        if (vectorised) launch(RowBlock<256, 4, 4>{});
        else launch(RowBlock<256, 4, 1>{});
    } else {
        if (vectorised) launch(RowBlock<1024, 2, 4>{});
        else launch(RowBlock<1024, 2, 1>{});
    }
}
