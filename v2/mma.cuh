// mma.cuh: the PTX wrappers the v2 tensor-core kernels share (forward_mma.cu, backward_mma.cu): mma.sync
// m16n8k16 (and m16n8k8) for fp16 and bf16, packing two floats into one register of two 16-bit values, ldmatrix x4
// and x2 (plain and .trans) and its lane addressing, cp.async with its commit / wait, the shared-address conversion,
// a one-instruction exp2 and named barriers. mma.sync m16n8k16, m16n8k8 in bf16 and cp.async need sm_80: compiled
// for an older GPU (make ARCH=sm_75) they become a trap (so does m16n8k8 in fp16, which no sm_75 path runs), and
// v2_unsupported refuses fp16/bf16 on such a device before anything launches.
//
// Fragment layouts (PTX ISA, "Matrix fragments for mma.m16n8k16"), with g = lane / 4 and t = lane % 4:
//
//   mma.sync.aligned.m16n8k16.row.col: D = A B + C, A 16x16 row-major, B 16x8 column-major, C and D 16x8 fp32.
//     A, 4 registers of two 16-bit values:
//       a[0] = (row g,   cols 2t,   2t+1)      a[1] = (row g+8, cols 2t,   2t+1)
//       a[2] = (row g,   cols 2t+8, 2t+9)      a[3] = (row g+8, cols 2t+8, 2t+9)
//     B, 2 registers of two 16-bit values:
//       b0   = (rows 2t,   2t+1, col g)        b1   = (rows 2t+8, 2t+9, col g)
//     C / D, 4 floats:
//       d[0], d[1] = (row g, cols 2t, 2t+1)    d[2], d[3] = (row g+8, cols 2t, 2t+1)
//   In every register the lower-indexed element sits in the low 16 bits (what pack2 produces). So the D fragments
//   of two adjacent n8 tiles (columns 0-7 and 8-15), packed pairwise as (d0, d1), (d2, d3) of the first and then of
//   the second, are exactly the A fragment of that 16x16 block: an accumulator (P, P^T, dS^T) can feed the next mma
//   without a trip through shared memory.
//
//   ldmatrix.sync.aligned.m8n8.x4.b16: four 8x8 matrices of 16-bit elements. Lanes 8m..8m+7 give the addresses of
//   rows 0..7 (16 bytes each) of matrix m; afterwards register m of lane l holds, of matrix m as stored,
//       plain:  row l/4,              cols 2(l%4), 2(l%4)+1    (the (g, 2t) pattern of an A or D fragment quarter)
//       .trans: rows 2(l%4), 2(l%4)+1, col l/4                (the same pattern, of the transposed matrix)
//   Hence, with the four matrices' addresses chosen in operand order:
//       A from a tile stored [m][k], plain:  (m 0-7, k 0-7), (m 8-15, k 0-7), (m 0-7, k 8-15), (m 8-15, k 8-15)
//       A from a tile stored [k][m], .trans: (k 0-7, m 0-7), (k 0-7, m 8-15), (k 8-15, m 0-7), (k 8-15, m 8-15)
//       B of two adjacent n8 tiles (b0, b1 of the first, then b0, b1 of the second)
//         from a tile stored [n][k], plain:  (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7), (n 8-15, k 8-15)
//         from a tile stored [k][n], .trans: (k 0-7, n 0-7), (k 8-15, n 0-7), (k 0-7, n 8-15), (k 8-15, n 8-15)
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstdint>

namespace v2_ptx {

// The 32-bit shared-state-space address of a pointer into shared memory (what ldmatrix and cp.async take).
__device__ __forceinline__ uint32_t shared_addr(const void* smem_ptr) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(smem_ptr));
}

// D += A B, m16n8k16, fp32 accumulators; T (__half or __nv_bfloat16) is the type of the A and B elements.
template <typename T>
__device__ __forceinline__ void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);

template <>
__device__ __forceinline__ void mma_m16n8k16<__half>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                                     uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
    __trap();  // compiled for an older GPU: v2_unsupported refuses fp16/bf16 there before anything launches
#endif
}

template <>
__device__ __forceinline__ void mma_m16n8k16<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                                            uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
    __trap();
#endif
}

// D += A B, m16n8k8: half the k of m16n8k16, for a head-dim tile that ends on 8 columns (the forward's 56 tile). Its
// A is the first two registers of m16n8k16's (a[0], a[1]: rows g and g+8, cols 2t, 2t+1), its B the first (b0).
template <typename T>
__device__ __forceinline__ void mma_m16n8k8(float (&d)[4], const uint32_t (&a)[2], uint32_t b0);

template <>
__device__ __forceinline__ void mma_m16n8k8<__half>(float (&d)[4], const uint32_t (&a)[2], uint32_t b0) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm("mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5}, {%6}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(b0));
#else
    __trap();
#endif
}

template <>
__device__ __forceinline__ void mma_m16n8k8<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[2], uint32_t b0) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm("mma.sync.aligned.m16n8k8.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5}, {%6}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(b0));
#else
    __trap();
#endif
}

// Two floats rounded (to nearest) to one register of two T values, lo in the low 16 bits (the fragment order).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);

template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
}

template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
}

// Four 8x8 matrices of 16-bit elements from shared memory, plain or transposed (see the layouts above).
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t smem_addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t smem_addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr));
}

// Two 8x8 matrices (lanes 0-15 give the row addresses, 0-7 of the first, 8-15 of the second), plain or transposed.
__device__ __forceinline__ void ldmatrix_x2(uint32_t (&r)[2], uint32_t smem_addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(smem_addr));
}

__device__ __forceinline__ void ldmatrix_x2_trans(uint32_t (&r)[2], uint32_t smem_addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1])
                 : "r"(smem_addr));
}

// ldmatrix lane addressing: the row and column (in elements), within a 16x16 block, of the address lane `lane`
// gives ldmatrix_x4 so that the four registers come out in mma operand order (the matrix lists above).
//   A from [m][k], plain:                           row = m, col = k
__device__ __forceinline__ int ldm_a_row(int lane) { return lane % 8 + lane / 8 % 2 * 8; }
__device__ __forceinline__ int ldm_a_col(int lane) { return lane / 16 * 8; }
//   A from [k][m], .trans:                          row = k, col = m
__device__ __forceinline__ int ldm_at_row(int lane) { return lane % 8 + lane / 16 * 8; }
__device__ __forceinline__ int ldm_at_col(int lane) { return lane / 8 % 2 * 8; }
//   B of two n8 tiles from [n][k], plain:           row = n, col = k
__device__ __forceinline__ int ldm_b_row(int lane) { return lane % 8 + lane / 16 * 8; }
__device__ __forceinline__ int ldm_b_col(int lane) { return lane / 8 % 2 * 8; }
//   B of two n8 tiles from [k][n], .trans:          row = k, col = n
__device__ __forceinline__ int ldm_bt_row(int lane) { return lane % 8 + lane / 8 % 2 * 8; }
__device__ __forceinline__ int ldm_bt_col(int lane) { return lane / 16 * 8; }

// Copies 16 bytes global -> shared without passing through registers. It reads src_bytes (16 or 0) bytes and
// fills the rest with zeros: src_bytes = 0 reads nothing and writes 16 zero bytes, which is how rows past the end
// of a matrix become zeros in shared memory (gmem must still be a valid address).
__device__ __forceinline__ void cp_async_16(uint32_t smem_addr, const void* gmem, int src_bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr), "l"(gmem), "r"(src_bytes));
#else
    __trap();
#endif
}
// Closes the group of this thread's cp.async issued since the previous commit.
__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}
// Waits until at most kPending of this thread's committed groups are still in flight (kPending = 0: all landed).
// Other threads' copies are visible only after a __syncthreads() that follows the wait.
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
#endif
}

// Asks the L2 for a tile of a row-major float matrix: rows row0..row0 + kRows - 1 (those below n_rows), columns
// col0..col0 + kCols - 1 (those below n_cols), rows ld floats apart. One `prefetch` per 128-byte line the row touches
// (at col0, every 32 columns after it, and the last column: kCols / 32 + 1 lines at most, whatever the alignment),
// thread x taking row x % kRows and every (kThreads / kRows)-th of its lines. A prefetch holds no register past its
// issue and waits for nothing; the loads that later read the tile find it in L2. (sm_90's bulk prefetch, one
// instruction a row, takes a warp-uniform address: with a row a lane it compiled to a loop over the lanes.) The
// backward's general dk_dv kernel asks for the next step's bias with it; in the forward's extension kernel, together
// with 8-byte bias loads, the forward ran slower (docs/extensions.md, "Bias").
template <int kRows, int kCols, int kThreads>
__device__ __forceinline__ void prefetch_l2_tile(const float* m, size_t ld, int row0, int col0, int n_rows, int n_cols) {
    static_assert(kThreads % kRows == 0, "whole rows a thread group");
    constexpr int kGroups = kThreads / kRows, kLines = kCols / 32 + 1;
    const int i = row0 + int(threadIdx.x) % kRows, group = int(threadIdx.x) / kRows;
    if (i < n_rows && col0 < n_cols) {
        const float* row = m + size_t(i) * ld;
        const int last = (col0 + kCols < n_cols ? col0 + kCols : n_cols) - 1;
#pragma unroll
        for (int c = 0; c < kLines; ++c) {
            const int col = col0 + 32 * c < last ? col0 + 32 * c : last;
            if (c % kGroups == group) asm volatile("prefetch.global.L2 [%0];" ::"l"(row + col));
        }
    }
}

// 2^x in one MUFU.EX2 instruction (flush-to-zero, relative error ~2^-22); exp2(-inf) = 0. exp2f itself, without
// -use_fast_math, wraps the same instruction in a denormal fix-up (a compare and two multiplies per call) that
// softmax probabilities, about to be rounded to 16 bits, do not need; in the forward kernel it measured up to 8%
// slower (d = 64, causal).
__device__ __forceinline__ float exp2_approx(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

// Named barriers (ids 1..15; 0 is __syncthreads): sync waits until `threads` threads (a multiple of 32) have
// arrived or synced at barrier `id`; arrive counts this warp and goes on. The v2 backward pairs warps with them, the
// v3 forward its warpgroups.
__device__ __forceinline__ void named_barrier_sync(int id, int threads) {
    asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
__device__ __forceinline__ void named_barrier_arrive(int id, int threads) {
    asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

}  // namespace v2_ptx
