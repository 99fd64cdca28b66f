// backward_mma.cu: the FlashAttention-2 backward pass (Dao 2023, Algorithm 2) on tensor cores.
//
// Three kernels, one stream (after a memset that zeroes the fp32 dQ accumulator):
//   1. preprocess: D_i = rowsum(dO_i * O_i), and LSE_i rescaled to log2 units (so P = exp2(...)), both fp32.
//   2. dk_dv:      one thread block per (K/V tile j, batch*head). It keeps dK_j and dV_j in fp32 registers and
//                  walks the Q tiles i, recomputing S_ij and P_ij from Q_i, K_j and LSE_i:
//                      P_ij  = exp(scale * Q_i K_j^T - LSE_i)      dV_j += P_ij^T dO_i
//                      dP_ij = dO_i V_j^T                          dS_ij = P_ij * (dP_ij - D_i)
//                      dK_j += scale * dS_ij^T Q_i                 dQ_i += scale * dS_ij K_j   (fp32 atomics)
//   3. convert:    dQ = the fp32 accumulator, rounded to fp16/bf16.
//
// --deterministic (p.deterministic) replaces the atomics: dk_dv skips dQ, and a fourth kernel, dq, gives each thread
// block one Q tile i and walks the K/V tiles j = 0, 1, ... in order, recomputing S_ij, P_ij and dP_ij to form
// dS_ij and summing dQ_i = scale * sum_j dS_ij K_j in registers; dQ_i is written once. Every sum then has a fixed
// order, so dQ, dK and dV are the same bits on every run. This is the order of the CPU model's deterministic dQ
// (v2_model_backward_scheduled in model.cu, exercise deterministic-dq-model): per Q tile, K/V tiles in order, scale
// applied once at the end. Its cost: S_ij and dP_ij twice (7 Br x Bc x d products instead of 5), no dQ accumulator.
//
// Head dims: any multiple of 8 from 8 to 256 runs the tile kD = 64, 128, 192 or 256 that holds it
// (v2_backward_mma_head_dim_tile); columns d..kD-1 of every shared tile are zero-filled by cp.async (nothing past
// column d is read from device memory) and are never stored. Past kD = 128 one warp's dK_j and dV_j rows would need
// kD registers a thread, so the K/V tile shrinks to 64 keys and two warps share each 16 keys, one half of the
// columns of dK_j and dV_j each (8 warps): both compute S_ij^T and dP_ij^T of their 16 keys over all kD columns.
//
// The `// line N` comments are the lines of Algorithm 2 of the FlashAttention-2 paper (as in backward_fp32.cu).
//
// Why atomics for dQ: the alternative, a second kernel parallel over Q tiles, must recompute S_ij and dP_ij
// (two of the five Br x Bc x d products) to form dS_ij, i.e. 7 products instead of 5, 40% more tensor-core work.
// The atomics cost one fp32 red per dQ element per K/V tile; they go to L2 and overlap the next tile's products.
//
// The transposed formulation. A warp owns 16 rows of K_j (16 keys) and computes S_ij^T = K_j Q_i^T, 16 x Br, so
// that the accumulator fragment of P_ij^T is already the A operand of dV_j += P_ij^T dO_i (and dS_ij^T that of
// dK_j += dS_ij^T Q_i): P never goes through shared memory, and dS only once, for dQ_i = dS_ij K_j.
//
// Shared memory is swizzled, not padded: a tile row is 64 to 256 halves (8 to 32 chunks of 16 bytes) and chunk c of
// row r is stored at chunk c ^ (r % 8). ldmatrix reads 8 rows at one chunk index: without the swizzle all 8 land
// in the same 4 banks (rows are a multiple of 128 bytes apart); with it they are 8 distinct chunks, conflict free.
//
// The optimisation steps (bin/v2 --dtype fp16 --backward --kernel K; v2_backward_steps() below names them) are
// this one kernel template with fewer features switched on: step 1 loads each Q_i, dO_i only once the previous
// tile is done, step 2 adds the cp.async double buffer (Q_{i+1}, dO_{i+1} land while tile i is computed), step 3
// (the final kernel) takes Br = 128 query rows per Q tile at d = 64.
#include "backward_mma.h"
#include "cuda_check.h"
#include "mma.cuh"
#include "common/blocks.cuh"
#include "v2.h"  // v2_backward_steps

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstdint>
#include <string>
#include <type_traits>

const std::vector<KernelStep>& v2_backward_steps() {
    static const std::vector<KernelStep> steps = {
        {"bwd-1-stage", "mma.sync, ldmatrix on swizzled tiles, P^T and dS^T kept as A fragments; Br = 64; "
                           "Q_i, dO_i loaded after tile i-1 is done"},
        {"bwd-2-stage", "cp.async double buffer: Q_{i+1}, dO_{i+1}, LSE, D land while tile i is computed"},
        {"bwd-br128", "d = 64 takes Br = 128 query rows a Q tile: half the barriers and K_j, V_j fragment reloads"},
    };
    return steps;
}

namespace {

using namespace v2_ptx;  // mma_m16n8k16, pack2, ldmatrix_x4(_trans), ldm_*, cp_async_*, exp2_approx, shared_addr

constexpr int kFinalStep = 3;
template <int kStep>
struct Features {
    static constexpr bool kDoubleBuffer = kStep >= 2;  // 2: Q_i, dO_i (and LSE_i, D_i) in two cp.async stages
    static constexpr bool kBr128AtD64 = kStep >= 3;    // 3: Br = 128 at d = 64
};

// Query rows per Q tile (the inner loop). From step 3 on, d = 64 takes 128: each Q tile then costs half the
// barriers and K_j/V_j fragment reloads per FLOP, and the registers allow it (S^T, dP^T 64 each, dK_j, dV_j 32
// each, per thread). d = 128 takes 64, since dK_j and dV_j already need 128 registers per thread.
// (kD is the head-dim tile.) Past 128, Br = 64 and the column split below keep the same register budget as kD = 128.
__host__ __device__ constexpr int q_tile_rows(int kD, bool br128_at_d64) { return kD == 64 && br128_at_d64 ? 128 : 64; }
// The K/V tile of one dk_dv thread block: Bc keys, kParts warps per 16 of them, each owning kD / kParts columns of
// those keys' dK_j, dV_j rows. Past kD = 128, 64 keys and two parts: K_j, V_j, and two stages of Q_i, dO_i then take
// 201 KiB of shared memory at kD = 256 (one block of 8 warps an SM), and each thread holds kD / 2 columns of its
// dK_j, dV_j rows (128 registers, as at kD = 128). The price: the two warps of a part pair both compute S_ij^T and
// dP_ij^T, 2 of the 5 products, for their 16 keys (7 products' work instead of 5). (Measured on an H200, d = 256,
// N = 4096, fp16: the two parts as two thread blocks of 4 warps each, one block an SM, ran at 0.53x
// FlashAttention-2 non-causal, 0.58x causal.)
template <int kD>
struct KVTile {
    static constexpr int Bc = kD <= 128 ? 128 : 64;
    static constexpr int kParts = kD <= 128 ? 1 : 2;
    static constexpr int kKeyWarps = Bc / 16;  // warps of one part: one per 16 keys
    static constexpr int kWarps = kKeyWarps * kParts;
    static constexpr int kThreads = kWarps * 32;
    static constexpr int kPartCols = kD / kParts;
};
constexpr float kLog2e = 1.4426950408889634f;

// ---------------------------------------------------------------- kernel-specific wrappers (the shared ones: mma.cuh)

// dQ accumulation: sm_90 has a two-float atomic add (one instruction for the pair d0, d1 of a fragment).
__device__ inline void atomic_add2(float* addr, float x, float y) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    atomicAdd(reinterpret_cast<float2*>(addr), make_float2(x, y));
#else
    atomicAdd(addr, x);
    atomicAdd(addr + 1, y);
#endif
}

// ------------------------------------------------------------------------------------------- shared tile layout

// Byte offset of element (r, c) in a swizzled shared tile with kCols 16-bit elements per row (see the top).
template <int kCols>
__device__ inline uint32_t swizzle(int r, int c) {
    static_assert(kCols % 64 == 0, "the swizzle needs rows of at least 8 chunks of 16 bytes");
    return uint32_t(r * kCols * 2 + (((c / 8) ^ (r % 8)) * 16) + (c % 8) * 2);
}

// Starts the copy of rows [row0, row0 + kRows) of a [n_rows, d] global matrix (d <= kCols, a multiple of 8) into a
// swizzled shared tile of kCols columns, by kThreads threads; rows past n_rows and columns past d are zero-filled.
template <int kRows, int kCols, int kThreads, typename T>
__device__ inline void load_tile_async(uint32_t tile, const T* gmem, int row0, int n_rows, int d) {
    constexpr int kChunksPerRow = kCols / 8;
    for (int idx = threadIdx.x; idx < kRows * kChunksPerRow; idx += kThreads) {
        const int r = idx / kChunksPerRow, c = (idx % kChunksPerRow) * 8;
        const bool valid = row0 + r < n_rows && c < d;
        cp_async_16(tile + swizzle<kCols>(r, c), gmem + (valid ? size_t(row0 + r) * d + c : 0), valid ? 16 : 0);
    }
}

// ------------------------------------------------------------------------------------------------------ kernels

// One warp per row of [B*H, Nq_pad]: D_i = rowsum(dO_i * O_i) (as common/blocks.cuh's rowsum_dO_O, here on 16-bit
// inputs and in the same pass as the rest) and LSE_i * log2(e). Rows that see no key
// (LSE = -inf) and the padding rows past Nq get LSE = +inf, so that P = exp2(s - inf) = 0 and they add nothing.
template <typename T>
__global__ void preprocess_kernel(const T* O, const T* dO, const float* LSE, float* lse_log2, float* D, int Nq,
                                  int Nq_pad, int rows, int d) {
    const int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (row >= rows) return;
    const int bh = row / Nq_pad, i = row % Nq_pad;
    float sum = 0.0f, lse = INFINITY;
    if (i < Nq) {
        const size_t base = (size_t(bh) * Nq + i) * d;
        for (int c = lane; c < d; c += 32) sum += float(O[base + c]) * float(dO[base + c]);
        const float l = LSE[size_t(bh) * Nq + i];
        lse = l == -INFINITY ? INFINITY : l * kLog2e;
    }
    sum = warp_sum(sum);
    if (lane == 0) {
        D[row] = sum;
        lse_log2[row] = lse;
    }
}

template <int kD, int Br, int kStages>
struct SharedLayout {  // byte offsets into dynamic shared memory
    static constexpr int Bc = KVTile<kD>::Bc;
    static constexpr int kTile = Bc * kD * 2, qTile = Br * kD * 2;
    static constexpr int K = 0, V = kTile;
    static constexpr int Q = 2 * kTile;                // kStages stages
    static constexpr int dO = Q + kStages * qTile;     // kStages stages
    static constexpr int dS = dO + kStages * qTile;    // dS_ij^T, [Bc][Br]
    static constexpr int lse = dS + Bc * Br * 2;       // float [kStages][Br]
    static constexpr int D = lse + kStages * Br * 4;   // float [kStages][Br]
    static constexpr int bytes = D + kStages * Br * 4;
};

// Grid: (ceil(Nk / Bc), B * H). d is the head dim in device memory, kD its tile; kExactD: d == kD, known at compile
// time (see kExactVariant below). dQ_accum is [Nq_pad, kD] per head; with atomic_dq false (--deterministic) nothing
// goes to it and the dq kernel computes dQ.
template <typename T, int kD, int kStep, bool kExactD>
__global__ void __launch_bounds__(KVTile<kD>::kThreads, 1)
    dk_dv_kernel(const T* __restrict__ Q, const T* __restrict__ K, const T* __restrict__ V, const T* __restrict__ dO,
                 const float* __restrict__ lse_log2, const float* __restrict__ D, float* dQ_accum,
                 T* __restrict__ dK, T* __restrict__ dV, int Nq, int Nk, int Nq_pad, int head_dim, bool causal,
                 float scale, bool atomic_dq) {
    using F = Features<kStep>;
    const int d = kExactD ? kD : head_dim;
    constexpr int Br = q_tile_rows(kD, F::kBr128AtD64);
    constexpr int Bc = KVTile<kD>::Bc, kWarps = KVTile<kD>::kWarps, kThreads = KVTile<kD>::kThreads;
    constexpr int kKeyWarps = KVTile<kD>::kKeyWarps, kPartCols = KVTile<kD>::kPartCols;
    using L = SharedLayout<kD, Br, F::kDoubleBuffer ? 2 : 1>;
    extern __shared__ __align__(128) unsigned char smem[];
    const uint32_t s = shared_addr(smem);
    const float* s_lse = reinterpret_cast<const float*>(smem + L::lse);
    const float* s_D = reinterpret_cast<const float*>(smem + L::D);

    const int bh = blockIdx.y, j0 = blockIdx.x * Bc;  // line 5: the grid walks the K/V tiles
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    Q += size_t(bh) * Nq * d;
    dO += size_t(bh) * Nq * d;
    K += size_t(bh) * Nk * d;
    V += size_t(bh) * Nk * d;
    dK += size_t(bh) * Nk * d;
    dV += size_t(bh) * Nk * d;
    lse_log2 += size_t(bh) * Nq_pad;
    D += size_t(bh) * Nq_pad;
    dQ_accum += size_t(bh) * Nq_pad * kD;

    // Query row i sees key j iff j <= i + shift. Q tiles whose last row sees none of K_j are skipped.
    const int shift = Nk - Nq;
    const int first_tile = causal ? max(0, j0 - shift) / Br : 0, n_tiles = Nq_pad / Br;
    // Nq_pad is a multiple of this step's Br (padded_rows below).

    auto load_q_tile = [&](int tile, int stage) {
        load_tile_async<Br, kD, kThreads>(s + L::Q + stage * L::qTile, Q, tile * Br, Nq, d);
        load_tile_async<Br, kD, kThreads>(s + L::dO + stage * L::qTile, dO, tile * Br, Nq, d);
        if (threadIdx.x < Br / 4)  // lse_log2 and D are padded to Nq_pad: whole 16-byte chunks
            cp_async_16(s + L::lse + stage * Br * 4 + threadIdx.x * 16, lse_log2 + tile * Br + threadIdx.x * 4, 16);
        else if (threadIdx.x < Br / 2)
            cp_async_16(s + L::D + stage * Br * 4 + (threadIdx.x - Br / 4) * 16,
                        D + tile * Br + (threadIdx.x - Br / 4) * 4, 16);
    };
    load_tile_async<Bc, kD, kThreads>(s + L::K, K, j0, Nk, d);  // line 6
    load_tile_async<Bc, kD, kThreads>(s + L::V, V, j0, Nk, d);
    load_q_tile(first_tile, 0);
    cp_async_commit();

    // line 7: this warp's 16 keys x its part's kPartCols columns, as m16n8 fragments
    float dK_j[kPartCols / 8][4] = {}, dV_j[kPartCols / 8][4] = {};
    const float scale_log2 = scale * kLog2e;
    const int key_row = warp % kKeyWarps * 16;      // first row of this warp within K_j
    // First column of this warp's part of dK_j, dV_j (a constant 0 with one part, so that the swizzled addresses
    // below stay a per-lane base plus compile-time offsets).
    const int col0 = KVTile<kD>::kParts == 1 ? 0 : warp / kKeyWarps * kPartCols;

    for (int tile = first_tile; tile < n_tiles; ++tile) {  // line 8 (line 9: load_q_tile; O_i is in D_i)
        const int stage = F::kDoubleBuffer ? (tile - first_tile) & 1 : 0, i0 = tile * Br;
        const uint32_t sQ = s + L::Q + stage * L::qTile, sdO = s + L::dO + stage * L::qTile;
        if (!F::kDoubleBuffer && tile > first_tile) {
            // One stage: every warp passed the barrier before dQ of tile - 1, the last reads of Q, dO, LSE, D.
            load_q_tile(tile, 0);
            cp_async_commit();
        }
        cp_async_wait<0>();
        __syncthreads();  // Q_i, dO_i landed; every warp is done with the other stage and with dS of tile - 1
        if (F::kDoubleBuffer && tile + 1 < n_tiles) {
            load_q_tile(tile + 1, stage ^ 1);
            cp_async_commit();
        }

        // lines 10 and 13: S_ij^T = K_j Q_i^T and dP_ij^T = V_j dO_i^T, 16 keys x Br queries per warp.
        float S[Br / 8][4] = {}, dP[Br / 8][4] = {};
#pragma unroll
        for (int k = 0; k < kD; k += 16) {
            uint32_t a_K[4], a_V[4];
            ldmatrix_x4(a_K, s + L::K + swizzle<kD>(key_row + ldm_a_row(lane), k + ldm_a_col(lane)));
            ldmatrix_x4(a_V, s + L::V + swizzle<kD>(key_row + ldm_a_row(lane), k + ldm_a_col(lane)));
#pragma unroll
            for (int n = 0; n < Br / 8; n += 2) {
                uint32_t b[4];
                ldmatrix_x4(b, sQ + swizzle<kD>(n * 8 + ldm_b_row(lane), k + ldm_b_col(lane)));
                mma_m16n8k16<T>(S[n], a_K, b[0], b[1]);
                mma_m16n8k16<T>(S[n + 1], a_K, b[2], b[3]);
                ldmatrix_x4(b, sdO + swizzle<kD>(n * 8 + ldm_b_row(lane), k + ldm_b_col(lane)));
                mma_m16n8k16<T>(dP[n], a_V, b[0], b[1]);
                mma_m16n8k16<T>(dP[n + 1], a_V, b[2], b[3]);
            }
        }

        // line 11: P_ij^T = exp2(S * scale * log2(e) - LSE_i * log2(e)). This lane holds keys (g, g + 8) and, in
        // fragment n, queries 8n + 2t, 8n + 2t + 1 (see the D layout in mma.cuh). Masking is needed only on the last
        // K/V tile (keys past Nk) and on Q tiles that cross the causal diagonal.
        const bool needs_mask = j0 + Bc > Nk || (causal && i0 + shift < j0 + Bc - 1);
#pragma unroll
        for (int n = 0; n < Br / 8; ++n) {
            const int q = n * 8 + 2 * t;
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                float p = exp2_approx(S[n][e] * scale_log2 - s_lse[stage * Br + q + (e & 1)]);
                if (needs_mask) {
                    const int key = j0 + key_row + g + (e / 2) * 8, query = i0 + q + (e & 1);
                    if (key >= Nk || (causal && key > query + shift)) p = 0.0f;
                }
                S[n][e] = p;
            }
        }

        // line 12: dV_j += P_ij^T dO_i: A = P^T straight from the accumulators (fragments n, n+1 form one 16x16 A
        // block), B = dO_i stored [query][d], read with .trans (this warp's columns).
#pragma unroll
        for (int n = 0; n < Br / 8; n += 2) {
            const uint32_t a[4] = {pack2<T>(S[n][0], S[n][1]), pack2<T>(S[n][2], S[n][3]),
                                   pack2<T>(S[n + 1][0], S[n + 1][1]), pack2<T>(S[n + 1][2], S[n + 1][3])};
#pragma unroll
            for (int c = 0; c < kPartCols / 8; c += 2) {
                uint32_t b[4];
                ldmatrix_x4_trans(b, sdO + swizzle<kD>(n * 8 + ldm_bt_row(lane), col0 + c * 8 + ldm_bt_col(lane)));
                mma_m16n8k16<T>(dV_j[c], a, b[0], b[1]);
                mma_m16n8k16<T>(dV_j[c + 1], a, b[2], b[3]);
            }
        }

        // line 14: dS_ij^T = P_ij^T * (dP_ij^T - D_i), times scale here once instead of in both dK and dQ. It goes to
        // shared memory ([key][query]) for dQ (unless --deterministic), and stays in registers (packed) as the A
        // operand of dK_j.
        uint32_t dS[Br / 8][2];
#pragma unroll
        for (int n = 0; n < Br / 8; ++n) {
            const int q = n * 8 + 2 * t;
            const float D0 = s_D[stage * Br + q], D1 = s_D[stage * Br + q + 1];
            dS[n][0] = pack2<T>(scale * S[n][0] * (dP[n][0] - D0), scale * S[n][1] * (dP[n][1] - D1));
            dS[n][1] = pack2<T>(scale * S[n][2] * (dP[n][2] - D0), scale * S[n][3] * (dP[n][3] - D1));
            if (atomic_dq && col0 == 0) {  // one warp of a part pair writes the pair's (identical) dS
                *reinterpret_cast<uint32_t*>(smem + L::dS + swizzle<Br>(key_row + g, q)) = dS[n][0];
                *reinterpret_cast<uint32_t*>(smem + L::dS + swizzle<Br>(key_row + g + 8, q)) = dS[n][1];
            }
        }

        // line 16: dK_j += dS_ij^T Q_i, B = Q_i stored [query][d], read with .trans (this warp's columns).
#pragma unroll
        for (int n = 0; n < Br / 8; n += 2) {
            const uint32_t a[4] = {dS[n][0], dS[n][1], dS[n + 1][0], dS[n + 1][1]};
#pragma unroll
            for (int c = 0; c < kPartCols / 8; c += 2) {
                uint32_t b[4];
                ldmatrix_x4_trans(b, sQ + swizzle<kD>(n * 8 + ldm_bt_row(lane), col0 + c * 8 + ldm_bt_col(lane)));
                mma_m16n8k16<T>(dK_j[c], a, b[0], b[1]);
                mma_m16n8k16<T>(dK_j[c + 1], a, b[2], b[3]);
            }
        }
        __syncthreads();  // all of dS_ij^T is in shared memory (one stage: every warp is done with Q_i, dO_i)
        if (!atomic_dq) continue;  // --deterministic: the dq kernel computes dQ

        // line 15: dQ_i += dS_ij K_j, Br x kD. Warps tile it (Br / 32) x kWarpsN: warp (wm, wn) owns rows 32 wm..,
        // columns kCols wn... A = dS_ij, stored transposed, read with .trans; B = K_j stored [key][d], with .trans.
        constexpr int kWarpsN = kWarps / (Br / 32), kCols = kD / kWarpsN;
        static_assert(kCols % 16 == 0, "whole x4 B fragments");
        const int wm = warp / kWarpsN, wn = warp % kWarpsN;
        float dQ_i[2][kCols / 8][4] = {};
#pragma unroll
        for (int k = 0; k < Bc; k += 16) {
            uint32_t a[2][4];
#pragma unroll
            for (int m = 0; m < 2; ++m)
                ldmatrix_x4_trans(a[m], s + L::dS + swizzle<Br>(k + ldm_at_row(lane), wm * 32 + m * 16 + ldm_at_col(lane)));
#pragma unroll
            for (int c = 0; c < kCols / 8; c += 2) {
                uint32_t b[4];
                ldmatrix_x4_trans(b, s + L::K + swizzle<kD>(k + ldm_bt_row(lane), wn * kCols + c * 8 + ldm_bt_col(lane)));
#pragma unroll
                for (int m = 0; m < 2; ++m) {
                    mma_m16n8k16<T>(dQ_i[m][c], a[m], b[0], b[1]);
                    mma_m16n8k16<T>(dQ_i[m][c + 1], a[m], b[2], b[3]);
                }
            }
        }
        // The accumulator is padded to Nq_pad rows and kD columns, so the padding rows (whose dS is 0) need no
        // bounds check; columns past d (zeros, as K_j's are) are skipped.
#pragma unroll
        for (int m = 0; m < 2; ++m)
#pragma unroll
            for (int c = 0; c < kCols / 8; ++c) {
                const int col = wn * kCols + c * 8;
                if (col >= d) continue;
                float* row = dQ_accum + size_t(i0 + wm * 32 + m * 16 + g) * kD + col + 2 * t;
                atomic_add2(row, dQ_i[m][c][0], dQ_i[m][c][1]);
                atomic_add2(row + 8 * kD, dQ_i[m][c][2], dQ_i[m][c][3]);
            }
    }

    // line 18: dK_j, dV_j: fragment c holds keys (g, g + 8) x columns col0 + 8c + 2t, +1 of this warp's 16 keys.
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        const int key = j0 + key_row + g + half * 8;
        if (key >= Nk) continue;
#pragma unroll
        for (int c = 0; c < kPartCols / 8; ++c) {
            if (col0 + c * 8 >= d) continue;
            const size_t at = size_t(key) * d + col0 + c * 8 + 2 * t;
            *reinterpret_cast<uint32_t*>(dK + at) = pack2<T>(dK_j[c][2 * half], dK_j[c][2 * half + 1]);
            *reinterpret_cast<uint32_t*>(dV + at) = pack2<T>(dV_j[c][2 * half], dV_j[c][2 * half + 1]);
        }
    }
}

// --deterministic: dQ_i = scale * sum_j dS_ij K_j, one thread block of 4 warps per Q tile of 64 rows (16 a warp), the
// K/V tiles walked in order j = 0, 1, ... (as v2_model_backward_scheduled's deterministic dQ). The layout of the
// forward kernel: the warp's 16 query rows are the M side of S_ij = Q_i K_j^T and dP_ij = dO_i V_j^T, so the
// accumulator fragment of dS_ij is the A operand of dQ_i += dS_ij K_j, as P's is of P V in the forward; K_j and V_j
// are double-buffered. Grid: (Nq_pad / 64, B * H). dQ is [B, H, Nq, d] of T, written once.
constexpr int kDqRows = 64, kDqWarps = 4, kDqThreads = kDqWarps * 32;
// Keys per K/V tile: each thread holds kD / 2 registers of dQ_i and Bc / 2 each of S_ij and dP_ij.
template <int kD>
__host__ __device__ constexpr int dq_key_rows() { return kD <= 128 ? 64 : 32; }
template <int kD>
constexpr int dq_smem_bytes() { return (2 * kDqRows + 4 * dq_key_rows<kD>()) * kD * 2; }  // Q_i, dO_i; K_j, V_j x2

template <typename T, int kD>
__global__ void __launch_bounds__(kDqThreads, 1)
    dq_kernel(const T* __restrict__ Q, const T* __restrict__ K, const T* __restrict__ V, const T* __restrict__ dO,
              const float* __restrict__ lse_log2, const float* __restrict__ D, T* __restrict__ dQ, int Nq, int Nk,
              int Nq_pad, int d, bool causal, float scale) {
    constexpr int Bc = dq_key_rows<kD>(), kTile = Bc * kD * 2;
    extern __shared__ __align__(128) unsigned char smem[];
    const uint32_t sQ = shared_addr(smem), sdO = sQ + kDqRows * kD * 2, sK = sdO + kDqRows * kD * 2;
    const uint32_t sV = sK + 2 * kTile;  // K_j and V_j: two buffers each

    // Causal: the last Q tiles see the most keys; launching them first shortens the tail of the grid.
    const int q_tile = causal ? gridDim.x - 1 - blockIdx.x : blockIdx.x;
    const int bh = blockIdx.y, i0 = q_tile * kDqRows;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    Q += size_t(bh) * Nq * d;
    dO += size_t(bh) * Nq * d;
    dQ += size_t(bh) * Nq * d;
    K += size_t(bh) * Nk * d;
    V += size_t(bh) * Nk * d;
    lse_log2 += size_t(bh) * Nq_pad;
    D += size_t(bh) * Nq_pad;

    // Keys this Q tile visits: all, or (causal) up to the last key its last real row sees.
    const int shift = Nk - Nq, row_end = min(i0 + kDqRows, Nq);
    const int kv_end = causal ? min(Nk, row_end - 1 + shift + 1) : Nk;
    const int n_tiles = kv_end > 0 ? ceil_div(kv_end, Bc) : 0;
    load_tile_async<kDqRows, kD, kDqThreads>(sQ, Q, i0, Nq, d);
    load_tile_async<kDqRows, kD, kDqThreads>(sdO, dO, i0, Nq, d);
    if (n_tiles > 0) {
        load_tile_async<Bc, kD, kDqThreads>(sK, K, 0, Nk, d);
        load_tile_async<Bc, kD, kDqThreads>(sV, V, 0, Nk, d);
    }
    cp_async_commit();

    // This lane's rows g and g + 8 of the warp's 16 (lse_log2 = +inf, D = 0 for padding rows and rows that see no
    // key: their P is 0).
    const int row0 = i0 + warp * 16 + g;
    const float lse[2] = {lse_log2[row0], lse_log2[row0 + 8]}, Di[2] = {D[row0], D[row0 + 8]};
    const float scale_log2 = scale * kLog2e;
    float dQ_i[kD / 8][4] = {};

    for (int j = 0; j < n_tiles; ++j) {  // the K/V tiles in order: the fixed summation order of dQ_i
        if (j + 1 < n_tiles) {  // K_{j+1}, V_{j+1} into the other buffer (freed by the barrier ending iteration j-1)
            load_tile_async<Bc, kD, kDqThreads>(sK + (j + 1) % 2 * kTile, K, (j + 1) * Bc, Nk, d);
            load_tile_async<Bc, kD, kDqThreads>(sV + (j + 1) % 2 * kTile, V, (j + 1) * Bc, Nk, d);
        }
        cp_async_commit();  // committed even when empty, so that "one group pending" always means tile j landed
        cp_async_wait<1>();
        __syncthreads();
        const uint32_t K_j = sK + j % 2 * kTile, V_j = sV + j % 2 * kTile;

        // lines 10 and 13 again: S_ij = Q_i K_j^T and dP_ij = dO_i V_j^T, 16 queries x Bc keys per warp.
        float S[Bc / 8][4] = {}, dP[Bc / 8][4] = {};
#pragma unroll
        for (int k = 0; k < kD; k += 16) {
            uint32_t a_Q[4], a_dO[4];
            ldmatrix_x4(a_Q, sQ + swizzle<kD>(warp * 16 + ldm_a_row(lane), k + ldm_a_col(lane)));
            ldmatrix_x4(a_dO, sdO + swizzle<kD>(warp * 16 + ldm_a_row(lane), k + ldm_a_col(lane)));
#pragma unroll
            for (int n = 0; n < Bc / 8; n += 2) {
                uint32_t b[4];
                ldmatrix_x4(b, K_j + swizzle<kD>(n * 8 + ldm_b_row(lane), k + ldm_b_col(lane)));
                mma_m16n8k16<T>(S[n], a_Q, b[0], b[1]);
                mma_m16n8k16<T>(S[n + 1], a_Q, b[2], b[3]);
                ldmatrix_x4(b, V_j + swizzle<kD>(n * 8 + ldm_b_row(lane), k + ldm_b_col(lane)));
                mma_m16n8k16<T>(dP[n], a_dO, b[0], b[1]);
                mma_m16n8k16<T>(dP[n + 1], a_dO, b[2], b[3]);
            }
        }

        // lines 11 and 14 again: P_ij = exp2(S * scale * log2 e - LSE_i * log2 e), dS_ij = P_ij * (dP_ij - D_i), in
        // place of S. Element e of fragment n: row g + 8 (e / 2), key 8n + 2t + e % 2. Masked: keys past Nk, and
        // causal keys right of the diagonal (only tiles that reach past this warp's first row's last key take the
        // branch).
        const int key0 = j * Bc;
        const bool needs_mask = key0 + Bc > Nk || (causal && key0 + Bc - 1 > i0 + warp * 16 + shift);
#pragma unroll
        for (int n = 0; n < Bc / 8; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                float p = exp2_approx(S[n][e] * scale_log2 - lse[e / 2]);
                if (needs_mask) {
                    const int key = key0 + n * 8 + 2 * t + e % 2, query = row0 + e / 2 * 8;
                    if (key >= Nk || (causal && key > query + shift)) p = 0.0f;
                }
                S[n][e] = p * (dP[n][e] - Di[e / 2]);
            }

        // line 15: dQ_i += dS_ij K_j: A = dS_ij from the accumulators (fragments 2kk, 2kk + 1 form one 16x16 A
        // block), B = K_j stored [key][d], read with .trans.
#pragma unroll
        for (int kk = 0; kk < Bc / 16; ++kk) {
            const uint32_t a[4] = {pack2<T>(S[2 * kk][0], S[2 * kk][1]), pack2<T>(S[2 * kk][2], S[2 * kk][3]),
                                   pack2<T>(S[2 * kk + 1][0], S[2 * kk + 1][1]),
                                   pack2<T>(S[2 * kk + 1][2], S[2 * kk + 1][3])};
#pragma unroll
            for (int c = 0; c < kD / 8; c += 2) {
                uint32_t b[4];
                ldmatrix_x4_trans(b, K_j + swizzle<kD>(kk * 16 + ldm_bt_row(lane), c * 8 + ldm_bt_col(lane)));
                mma_m16n8k16<T>(dQ_i[c], a, b[0], b[1]);
                mma_m16n8k16<T>(dQ_i[c + 1], a, b[2], b[3]);
            }
        }
        __syncthreads();  // every warp is done with the K/V buffer of tile j before it is refilled
    }
    cp_async_wait<0>();  // with no K/V tile to walk, the copies of Q_i and dO_i were never waited for

    // dQ_i times scale, once, written once: fragment c holds rows (g, g + 8) x columns 8c + 2t, +1.
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        const int row = row0 + half * 8;
        if (row >= Nq) continue;
#pragma unroll
        for (int c = 0; c < kD / 8; ++c) {
            if (c * 8 >= d) continue;
            *reinterpret_cast<uint32_t*>(dQ + size_t(row) * d + c * 8 + 2 * t) =
                pack2<T>(scale * dQ_i[c][2 * half], scale * dQ_i[c][2 * half + 1]);
        }
    }
}

// dQ = the fp32 accumulator [B*H, Nq_pad, kD] without its padding rows and columns, rounded to T; 4 elements per
// thread (d is a multiple of 8, so the 4 never straddle a row).
// Indices fit in 32 bits (one tensor has at most 2^31 - 1 elements: problem_size_unsupported), so the divisions are
// 32-bit ones.
template <typename T>
__global__ void convert_dq_kernel(const float* dQ_accum, T* dQ, int Nq, int Nq_pad, int d, int kD, size_t n_elems) {
    const size_t e = (size_t(blockIdx.x) * blockDim.x + threadIdx.x) * 4;
    if (e >= n_elems) return;
    const unsigned row = unsigned(e) / unsigned(d), col = unsigned(e) % unsigned(d);
    const size_t bh = row / unsigned(Nq), i = row % unsigned(Nq);
    const float4 v = *reinterpret_cast<const float4*>(dQ_accum + (bh * Nq_pad + i) * kD + col);
    *reinterpret_cast<uint2*>(dQ + e) = make_uint2(pack2<T>(v.x, v.y), pack2<T>(v.z, v.w));
}

int step_of(const Problem& p) { return p.kernel == 0 ? kFinalStep : p.kernel; }

// Query rows of the dQ accumulator, LSE and D: Nq rounded up to this step's Br (a multiple of the dq kernel's 64).
int padded_rows(const Problem& p) {
    const int Br = q_tile_rows(v2_backward_mma_head_dim_tile(p.d), step_of(p) >= kFinalStep);
    return ceil_div(p.Nq, Br) * Br;
}

template <typename T, int kD, int kStep, bool kExactD>
void launch(const Problem& p, const T* Q, const T* K, const T* V, const T* O, const float* LSE, const T* dO, T* dQ,
            T* dK, T* dV, void* workspace, cudaStream_t stream) {
    const int BH = p.B * p.H, Nq_pad = padded_rows(p);
    // Workspace: lse_log2 [BH, Nq_pad], D [BH, Nq_pad], then (atomics only) the dQ accumulator [BH, Nq_pad, kD].
    float* lse_log2 = static_cast<float*>(workspace);
    float* D = lse_log2 + size_t(BH) * Nq_pad;
    float* dQ_accum = p.deterministic ? nullptr : D + size_t(BH) * Nq_pad;

    if (!p.deterministic)  // line 3
        CUDA_CHECK(cudaMemsetAsync(dQ_accum, 0, size_t(BH) * Nq_pad * kD * sizeof(float), stream));
    const int rows = BH * Nq_pad, rows_per_block = 8;
    preprocess_kernel<T><<<ceil_div(rows, rows_per_block), rows_per_block * 32, 0, stream>>>(  // line 4
        O, dO, LSE, lse_log2, D, p.Nq, Nq_pad, rows, p.d);
    CUDA_CHECK_LAUNCH();

    constexpr int kBr = q_tile_rows(kD, Features<kStep>::kBr128AtD64);
    constexpr int smem = SharedLayout<kD, kBr, Features<kStep>::kDoubleBuffer ? 2 : 1>::bytes;
    // Once per instantiation, at its first launch: later (timed) launches do no host work but the launches.
    static const cudaError_t attribute_set =
        cudaFuncSetAttribute(dk_dv_kernel<T, kD, kStep, kExactD>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    CUDA_CHECK(attribute_set);
    const dim3 grid(ceil_div(p.Nk, KVTile<kD>::Bc), BH);
    dk_dv_kernel<T, kD, kStep, kExactD><<<grid, KVTile<kD>::kThreads, smem, stream>>>(
        Q, K, V, dO, lse_log2, D, dQ_accum, dK, dV, p.Nq, p.Nk, Nq_pad, p.d, p.causal, p.resolved_scale(),
        !p.deterministic);
    CUDA_CHECK_LAUNCH();

    if (p.deterministic) {
        constexpr int dq_smem = dq_smem_bytes<kD>();
        static const cudaError_t dq_attribute_set =
            cudaFuncSetAttribute(dq_kernel<T, kD>, cudaFuncAttributeMaxDynamicSharedMemorySize, dq_smem);
        CUDA_CHECK(dq_attribute_set);
        dq_kernel<T, kD><<<dim3(ceil_div(p.Nq, kDqRows), BH), kDqThreads, dq_smem, stream>>>(
            Q, K, V, dO, lse_log2, D, dQ, p.Nq, p.Nk, Nq_pad, p.d, p.causal, p.resolved_scale());
        CUDA_CHECK_LAUNCH();
        return;
    }
    const size_t n_elems = p.q_elems();
    const int threads = 256;
    const size_t blocks = ceil_div(n_elems / 4, size_t(threads));
    convert_dq_kernel<T><<<unsigned(blocks), threads, 0, stream>>>(dQ_accum, dQ, p.Nq, Nq_pad, p.d, kD, n_elems);
    CUDA_CHECK_LAUNCH();
}

// Tiles whose final dk_dv kernel also has a variant for d == kD with d a compile-time constant, beside the one for
// any d <= kD (as in forward_mma.cu): the head dims of the benchmarks (64, 128) and 256. Why: on an H200 the
// runtime-d backward alone ran 10% (d = 64) and 7% (d = 128) slower than the one before it, which had d = kD (fp16,
// N = 4096, B = 4, hidden 2048; docs/measured/v2_head_dims_run2.log). Part of that may be col0 above, which was a
// runtime value then. That this variant wins the time back is not yet measured.
template <int kD>
constexpr bool kExactVariant = kD == 64 || kD == 128 || kD == 256;

template <typename T, int kD>
std::string launch_step(const Problem& p, const void* Q, const void* K, const void* V, const void* O,
                        const float* LSE, const void* dO, void* dQ, void* dK, void* dV, void* workspace,
                        cudaStream_t stream) {
    auto in = [](const void* x) { return static_cast<const T*>(x); };
    auto out = [](void* x) { return static_cast<T*>(x); };
    const int step = step_of(p);
    if (step == kFinalStep) {
        if constexpr (kExactVariant<kD>) {
            if (p.d == kD) {
                launch<T, kD, kFinalStep, true>(p, in(Q), in(K), in(V), in(O), LSE, in(dO), out(dQ), out(dK), out(dV),
                                                workspace, stream);
                return "";
            }
        }
        launch<T, kD, kFinalStep, false>(p, in(Q), in(K), in(V), in(O), LSE, in(dO), out(dQ), out(dK), out(dV),
                                         workspace, stream);
        return "";
    }
    if constexpr (std::is_same_v<T, __half> && kD <= 128) {
        switch (step) {
            case 1:
                launch<T, kD, 1, true>(p, in(Q), in(K), in(V), in(O), LSE, in(dO), out(dQ), out(dK), out(dV),
                                       workspace, stream);
                return "";
            case 2:
                launch<T, kD, 2, true>(p, in(Q), in(K), in(V), in(O), LSE, in(dO), out(dQ), out(dK), out(dV),
                                       workspace, stream);
                return "";
            default: break;
        }
    }
    return "v2 backward (mma) has no step " + std::to_string(p.kernel) + " compiled for " + dtype_name(p.dtype) +
           " at head dim " + std::to_string(p.d);
}

// The dispatch table: head dim d runs the tile v2_backward_mma_head_dim_tile(d).
template <typename T>
std::string launch_for_d(const Problem& p, const void* Q, const void* K, const void* V, const void* O,
                         const float* LSE, const void* dO, void* dQ, void* dK, void* dV, void* workspace,
                         cudaStream_t stream) {
    switch (v2_backward_mma_head_dim_tile(p.d)) {
        case 64: return launch_step<T, 64>(p, Q, K, V, O, LSE, dO, dQ, dK, dV, workspace, stream);
        case 128: return launch_step<T, 128>(p, Q, K, V, O, LSE, dO, dQ, dK, dV, workspace, stream);
        case 192: return launch_step<T, 192>(p, Q, K, V, O, LSE, dO, dQ, dK, dV, workspace, stream);
        case 256: return launch_step<T, 256>(p, Q, K, V, O, LSE, dO, dQ, dK, dV, workspace, stream);
        default: return "v2 backward (mma) has no tile for head dim " + std::to_string(p.d);
    }
}

}  // namespace

int v2_backward_mma_head_dim_tile(int d) {
    if (d < 8 || d > 256 || d % 8 != 0) return 0;
    for (int tile : {64, 128, 192, 256})
        if (d <= tile) return tile;
    return 0;
}

bool v2_backward_mma_supports(const Problem& p, std::string* why) {
    const int n_steps = int(v2_backward_steps().size());
    std::string reason;
    if (p.dtype != DType::fp16 && p.dtype != DType::bf16)
        reason = std::string("v2 backward (mma) needs fp16 or bf16, got ") + dtype_name(p.dtype);
    else if (v2_backward_mma_head_dim_tile(p.d) == 0)
        reason = "v2 backward (mma) supports head dims that are multiples of 8 from 8 to 256, got " +
                 std::to_string(p.d);
    else if (p.Nq < 1 || p.Nk < 1)
        reason = "v2 backward (mma) needs Nq >= 1 and Nk >= 1, got Nq = " + std::to_string(p.Nq) + ", Nk = " +
                 std::to_string(p.Nk);
    else if (long(p.B) * p.H > 65535)
        reason = "v2 backward (mma) needs B*H <= 65535 (one grid row per head), got " + std::to_string(long(p.B) * p.H);
    else if (p.kernel < 0 || p.kernel > n_steps)
        reason = "v2 backward (mma) has steps 1.." + std::to_string(n_steps) + " (0 = the final one), got " +
                 std::to_string(p.kernel);
    else if (p.kernel != 0 && p.kernel != n_steps && (p.dtype != DType::fp16 || (p.d != 64 && p.d != 128)))
        reason = "v2 backward (mma) steps before the final one are compiled for fp16 and d = 64, 128 only (got " +
                 std::string(dtype_name(p.dtype)) + ", d = " + std::to_string(p.d) + ")";
    if (why) *why = reason;
    return reason.empty();
}

size_t v2_backward_mma_workspace_bytes(const Problem& p) {
    const size_t rows = size_t(p.B) * p.H * padded_rows(p);
    // LSE in log2 units [rows], D [rows], and with atomics the fp32 dQ accumulator [rows, tile]
    return rows * (2 + (p.deterministic ? 0 : v2_backward_mma_head_dim_tile(p.d))) * sizeof(float);
}

std::string v2_backward_mma(const Problem& p, const void* Q, const void* K, const void* V, const void* O,
                            const float* LSE, const void* dO, void* dQ, void* dK, void* dV, void* workspace,
                            cudaStream_t stream) {
    std::string why;
    if (!v2_backward_mma_supports(p, &why)) return why;
    if (p.dtype == DType::fp16) return launch_for_d<__half>(p, Q, K, V, O, LSE, dO, dQ, dK, dV, workspace, stream);
    return launch_for_d<__nv_bfloat16>(p, Q, K, V, O, LSE, dO, dQ, dK, dV, workspace, stream);
}
