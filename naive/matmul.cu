// matmul.cu: one tiled fp32 matrix product, used for every product of the naive forward and backward passes
// (S = Q K^T, O = P V, dV = P^T dO, dP = dO V^T, dQ = dS K, dK = dS^T Q) and by the online_softmax stage.
//
// Each 256-thread block computes a 64 x 64 tile of C. It walks K in steps of 16: the 64 x 16 slab of A and the
// 16 x 64 slab of B go to shared memory, and each thread accumulates a 4 x 4 sub-tile in registers, so every
// value loaded from shared memory feeds 4 multiply-adds.
#include <cmath>

#include "common/blocks.cuh"
#include "cuda_check.h"
#include "naive.h"

namespace {

constexpr int BM = 64, BN = 64, BK = 16, THREADS = 256;

// Loads a rows x cols slab starting at (r0, c0) into tile[col][row] (transposed: column-major in shared memory,
// so the compute loop reads 4 consecutive rows as one float4). Out-of-range elements are 0. The fastest-moving
// thread index follows whichever dimension is contiguous in memory, so global reads coalesce for A and A^T alike.
template <int ROWS, int COLS>
__device__ void load_slab(float (&tile)[COLS][ROWS + 4], const float* base, const MatrixView& v, int r0, int c0,
                          int nrows, int ncols) {
    for (int e = threadIdx.x; e < ROWS * COLS; e += THREADS) {
        const bool cols_fastest = v.col_stride == 1;
        const int r = cols_fastest ? e / COLS : e % ROWS;
        const int c = cols_fastest ? e % COLS : e / ROWS;
        const int gr = r0 + r, gc = c0 + c;
        tile[c][r] = (gr < nrows && gc < ncols) ? base[(long long)gr * v.row_stride + (long long)gc * v.col_stride] : 0.0f;
    }
}

__global__ void __launch_bounds__(THREADS) batched_matmul_kernel(int M, int N, int K, float alpha, MatrixView A,
                                                                 MatrixView B, float* C, int causal_Nq) {
    __shared__ __align__(16) float As[BK][BM + 4];  // As[k][m]; +4 keeps rows 16-byte aligned and shifts banks
    __shared__ __align__(16) float Bs[BK][BN + 4];  // Bs[k][n]
    const int b = blockIdx.z, m0 = blockIdx.y * BM, n0 = blockIdx.x * BN;
    const float* a = A.ptr + b * A.batch_stride;
    const float* bm = B.ptr + b * B.batch_stride;
    const int tm = threadIdx.x / 16 * 4, tn = threadIdx.x % 16 * 4;  // this thread's 4 x 4 sub-tile
    float acc[4][4] = {};
    for (int k0 = 0; k0 < K; k0 += BK) {
        load_slab<BM, BK>(As, a, A, m0, k0, M, K);
        // B is K x N: its slab is rows k0.., cols n0..; stored Bs[k][n], i.e. row-major, so load it as B^T's slab.
        const MatrixView Bt{B.ptr, B.batch_stride, B.col_stride, B.row_stride};
        load_slab<BN, BK>(Bs, bm, Bt, n0, k0, N, K);
        __syncthreads();
        // EXERCISE(tiled-matmul): this thread's 4 x 4 sub-tile of C accumulates the slab's BK rank-1 updates
#pragma unroll
        for (int k = 0; k < BK; ++k) {
            const float4 x = *reinterpret_cast<const float4*>(&As[k][tm]);
            const float4 y = *reinterpret_cast<const float4*>(&Bs[k][tn]);
            const float xs[4] = {x.x, x.y, x.z, x.w}, ys[4] = {y.x, y.y, y.z, y.w};
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int j = 0; j < 4; ++j) acc[i][j] += xs[i] * ys[j];
        }
        // END EXERCISE
        __syncthreads();  // the next slab overwrites As and Bs
    }
    for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 4; ++j) {
            const int r = m0 + tm + i, c = n0 + tn + j;
            if (r >= M || c >= N) continue;
            const bool masked = causal_Nq > 0 && c >= causal_key_end(r, causal_Nq, N);
            C[(long long)b * M * N + (long long)r * N + c] = masked ? -INFINITY : alpha * acc[i][j];
        }
}

}  // namespace

void batched_matmul(int batches, int M, int N, int K, float alpha, MatrixView A, MatrixView B, float* C,
                    int causal_Nq, cudaStream_t stream) {
    const dim3 grid(ceil_div(N, BN), ceil_div(M, BM), batches);
    batched_matmul_kernel<<<grid, THREADS, 0, stream>>>(M, N, K, alpha, A, B, C, causal_Nq);
    CUDA_CHECK_LAUNCH();
}
