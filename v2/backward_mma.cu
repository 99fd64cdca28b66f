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
// Shared memory is swizzled, not padded: a tile row is 64 or 128 halves (8 or 16 chunks of 16 bytes) and chunk c of
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
__host__ __device__ constexpr int q_tile_rows(int d, bool br128_at_d64) { return d == 64 && br128_at_d64 ? 128 : 64; }
constexpr int Bc = 128;            // key rows per K/V tile (one thread block)
constexpr int kWarps = Bc / 16;    // each warp owns 16 keys of K_j, V_j, dK_j, dV_j
constexpr int kThreads = kWarps * 32;
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

// Starts the copy of rows [row0, row0 + kRows) of a [n_rows, kCols] global matrix into a swizzled shared tile;
// rows past n_rows are zero-filled.
template <int kRows, int kCols, typename T>
__device__ inline void load_tile_async(uint32_t tile, const T* gmem, int row0, int n_rows) {
    constexpr int kChunksPerRow = kCols / 8;
    for (int idx = threadIdx.x; idx < kRows * kChunksPerRow; idx += kThreads) {
        const int r = idx / kChunksPerRow, c = (idx % kChunksPerRow) * 8;
        const bool valid = row0 + r < n_rows;
        cp_async_16(tile + swizzle<kCols>(r, c), gmem + size_t(valid ? row0 + r : 0) * kCols + c, valid ? 16 : 0);
    }
}

// ------------------------------------------------------------------------------------------------------ kernels

// One warp per row of [B*H, Nq_pad]: D_i = rowsum(dO_i * O_i) (as common/blocks.cuh's rowsum_dO_O, here on 16-bit
// inputs and in the same pass as the rest) and LSE_i * log2(e). Rows that see no key
// (LSE = -inf) and the padding rows past Nq get LSE = +inf, so that P = exp2(s - inf) = 0 and they add nothing.
template <typename T, int kD>
__global__ void preprocess_kernel(const T* O, const T* dO, const float* LSE, float* lse_log2, float* D, int Nq,
                                  int Nq_pad, int rows) {
    const int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (row >= rows) return;
    const int bh = row / Nq_pad, i = row % Nq_pad;
    float sum = 0.0f, lse = INFINITY;
    if (i < Nq) {
        const size_t base = (size_t(bh) * Nq + i) * kD;
        for (int c = lane; c < kD; c += 32) sum += float(O[base + c]) * float(dO[base + c]);
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
    static constexpr int kTile = Bc * kD * 2, qTile = Br * kD * 2;
    static constexpr int K = 0, V = kTile;
    static constexpr int Q = 2 * kTile;                // kStages stages
    static constexpr int dO = Q + kStages * qTile;     // kStages stages
    static constexpr int dS = dO + kStages * qTile;    // dS_ij^T, [Bc][Br]
    static constexpr int lse = dS + Bc * Br * 2;       // float [kStages][Br]
    static constexpr int D = lse + kStages * Br * 4;   // float [kStages][Br]
    static constexpr int bytes = D + kStages * Br * 4;
};

template <typename T, int kD, int kStep>
__global__ void __launch_bounds__(kThreads, 1)
    dk_dv_kernel(const T* __restrict__ Q, const T* __restrict__ K, const T* __restrict__ V, const T* __restrict__ dO,
                 const float* __restrict__ lse_log2, const float* __restrict__ D, float* dQ_accum,
                 T* __restrict__ dK, T* __restrict__ dV, int Nq, int Nk, int Nq_pad, bool causal, float scale) {
    using F = Features<kStep>;
    constexpr int Br = q_tile_rows(kD, F::kBr128AtD64);
    using L = SharedLayout<kD, Br, F::kDoubleBuffer ? 2 : 1>;
    extern __shared__ __align__(128) unsigned char smem[];
    const uint32_t s = shared_addr(smem);
    const float* s_lse = reinterpret_cast<const float*>(smem + L::lse);
    const float* s_D = reinterpret_cast<const float*>(smem + L::D);

    const int bh = blockIdx.y, j0 = blockIdx.x * Bc;  // line 5: the grid walks the K/V tiles
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    Q += size_t(bh) * Nq * kD;
    dO += size_t(bh) * Nq * kD;
    K += size_t(bh) * Nk * kD;
    V += size_t(bh) * Nk * kD;
    dK += size_t(bh) * Nk * kD;
    dV += size_t(bh) * Nk * kD;
    lse_log2 += size_t(bh) * Nq_pad;
    D += size_t(bh) * Nq_pad;
    dQ_accum += size_t(bh) * Nq_pad * kD;

    // Query row i sees key j iff j <= i + shift. Q tiles whose last row sees none of K_j are skipped.
    const int shift = Nk - Nq;
    const int first_tile = causal ? max(0, j0 - shift) / Br : 0, n_tiles = Nq_pad / Br;
    // Nq_pad is a multiple of this step's Br (padded_rows below).

    auto load_q_tile = [&](int tile, int stage) {
        load_tile_async<Br, kD>(s + L::Q + stage * L::qTile, Q, tile * Br, Nq);
        load_tile_async<Br, kD>(s + L::dO + stage * L::qTile, dO, tile * Br, Nq);
        if (threadIdx.x < Br / 4)  // lse_log2 and D are padded to Nq_pad: whole 16-byte chunks
            cp_async_16(s + L::lse + stage * Br * 4 + threadIdx.x * 16, lse_log2 + tile * Br + threadIdx.x * 4, 16);
        else if (threadIdx.x < Br / 2)
            cp_async_16(s + L::D + stage * Br * 4 + (threadIdx.x - Br / 4) * 16,
                        D + tile * Br + (threadIdx.x - Br / 4) * 4, 16);
    };
    load_tile_async<Bc, kD>(s + L::K, K, j0, Nk);  // line 6
    load_tile_async<Bc, kD>(s + L::V, V, j0, Nk);
    load_q_tile(first_tile, 0);
    cp_async_commit();

    float dK_j[kD / 8][4] = {}, dV_j[kD / 8][4] = {};  // line 7: this warp's 16 keys x kD, as m16n8 fragments
    const float scale_log2 = scale * kLog2e;
    const int key_row = warp * 16;  // first row of this warp within K_j

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
        // block), B = dO_i stored [query][d], read with .trans.
#pragma unroll
        for (int n = 0; n < Br / 8; n += 2) {
            const uint32_t a[4] = {pack2<T>(S[n][0], S[n][1]), pack2<T>(S[n][2], S[n][3]),
                                   pack2<T>(S[n + 1][0], S[n + 1][1]), pack2<T>(S[n + 1][2], S[n + 1][3])};
#pragma unroll
            for (int c = 0; c < kD / 8; c += 2) {
                uint32_t b[4];
                ldmatrix_x4_trans(b, sdO + swizzle<kD>(n * 8 + ldm_bt_row(lane), c * 8 + ldm_bt_col(lane)));
                mma_m16n8k16<T>(dV_j[c], a, b[0], b[1]);
                mma_m16n8k16<T>(dV_j[c + 1], a, b[2], b[3]);
            }
        }

        // line 14: dS_ij^T = P_ij^T * (dP_ij^T - D_i), times scale here once instead of in both dK and dQ. It goes to
        // shared memory ([key][query]) for dQ, and stays in registers (packed) as the A operand of dK_j.
        uint32_t dS[Br / 8][2];
#pragma unroll
        for (int n = 0; n < Br / 8; ++n) {
            const int q = n * 8 + 2 * t;
            const float D0 = s_D[stage * Br + q], D1 = s_D[stage * Br + q + 1];
            dS[n][0] = pack2<T>(scale * S[n][0] * (dP[n][0] - D0), scale * S[n][1] * (dP[n][1] - D1));
            dS[n][1] = pack2<T>(scale * S[n][2] * (dP[n][2] - D0), scale * S[n][3] * (dP[n][3] - D1));
            *reinterpret_cast<uint32_t*>(smem + L::dS + swizzle<Br>(key_row + g, q)) = dS[n][0];
            *reinterpret_cast<uint32_t*>(smem + L::dS + swizzle<Br>(key_row + g + 8, q)) = dS[n][1];
        }

        // line 16: dK_j += dS_ij^T Q_i, B = Q_i stored [query][d], read with .trans.
#pragma unroll
        for (int n = 0; n < Br / 8; n += 2) {
            const uint32_t a[4] = {dS[n][0], dS[n][1], dS[n + 1][0], dS[n + 1][1]};
#pragma unroll
            for (int c = 0; c < kD / 8; c += 2) {
                uint32_t b[4];
                ldmatrix_x4_trans(b, sQ + swizzle<kD>(n * 8 + ldm_bt_row(lane), c * 8 + ldm_bt_col(lane)));
                mma_m16n8k16<T>(dK_j[c], a, b[0], b[1]);
                mma_m16n8k16<T>(dK_j[c + 1], a, b[2], b[3]);
            }
        }
        __syncthreads();  // all of dS_ij^T is in shared memory

        // line 15: dQ_i += dS_ij K_j, Br x kD. Warps tile it (Br / 32) x kWarpsN: warp (wm, wn) owns rows 32 wm..,
        // columns kCols wn... A = dS_ij, stored transposed, read with .trans; B = K_j stored [key][d], with .trans.
        constexpr int kWarpsN = kWarps / (Br / 32), kCols = kD / kWarpsN;
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
        // The accumulator is padded to Nq_pad rows, so the padding rows (whose dS is 0) need no bounds check.
#pragma unroll
        for (int m = 0; m < 2; ++m)
#pragma unroll
            for (int c = 0; c < kCols / 8; ++c) {
                float* row = dQ_accum + size_t(i0 + wm * 32 + m * 16 + g) * kD + wn * kCols + c * 8 + 2 * t;
                atomic_add2(row, dQ_i[m][c][0], dQ_i[m][c][1]);
                atomic_add2(row + 8 * kD, dQ_i[m][c][2], dQ_i[m][c][3]);
            }
    }

    // line 18: dK_j, dV_j: fragment c holds keys (g, g + 8) x columns 8c + 2t, +1 of this warp's 16 keys.
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        const int key = j0 + key_row + g + half * 8;
        if (key >= Nk) continue;
#pragma unroll
        for (int c = 0; c < kD / 8; ++c) {
            const size_t at = size_t(key) * kD + c * 8 + 2 * t;
            *reinterpret_cast<uint32_t*>(dK + at) = pack2<T>(dK_j[c][2 * half], dK_j[c][2 * half + 1]);
            *reinterpret_cast<uint32_t*>(dV + at) = pack2<T>(dV_j[c][2 * half], dV_j[c][2 * half + 1]);
        }
    }
}

// dQ = the fp32 accumulator [B*H, Nq_pad, d] without its padding rows, rounded to T; 4 elements per thread.
template <typename T, int kD>
__global__ void convert_dq_kernel(const float* dQ_accum, T* dQ, int Nq, int Nq_pad, size_t n_elems) {
    const size_t e = (size_t(blockIdx.x) * blockDim.x + threadIdx.x) * 4;
    if (e >= n_elems) return;
    const size_t bh = e / (size_t(Nq) * kD), within = e % (size_t(Nq) * kD);
    const float4 v = *reinterpret_cast<const float4*>(dQ_accum + bh * Nq_pad * kD + within);
    *reinterpret_cast<uint2*>(dQ + e) = make_uint2(pack2<T>(v.x, v.y), pack2<T>(v.z, v.w));
}

int step_of(const Problem& p) { return p.kernel == 0 ? kFinalStep : p.kernel; }

// Query rows of the dQ accumulator, LSE and D: Nq rounded up to this step's Br.
int padded_rows(const Problem& p) {
    const int Br = q_tile_rows(p.d, step_of(p) >= kFinalStep);
    return ceil_div(p.Nq, Br) * Br;
}

template <typename T, int kD, int kStep>
void launch(const Problem& p, const T* Q, const T* K, const T* V, const T* O, const float* LSE, const T* dO, T* dQ,
            T* dK, T* dV, void* workspace, cudaStream_t stream) {
    const int BH = p.B * p.H, Nq_pad = padded_rows(p);
    float* dQ_accum = static_cast<float*>(workspace);
    float* lse_log2 = dQ_accum + size_t(BH) * Nq_pad * kD;
    float* D = lse_log2 + size_t(BH) * Nq_pad;

    CUDA_CHECK(cudaMemsetAsync(dQ_accum, 0, size_t(BH) * Nq_pad * kD * sizeof(float), stream));  // line 3
    const int rows = BH * Nq_pad, rows_per_block = 8;
    preprocess_kernel<T, kD><<<ceil_div(rows, rows_per_block), rows_per_block * 32, 0, stream>>>(  // line 4
        O, dO, LSE, lse_log2, D, p.Nq, Nq_pad, rows);
    CUDA_CHECK_LAUNCH();

    constexpr int kBr = q_tile_rows(kD, Features<kStep>::kBr128AtD64);
    constexpr int smem = SharedLayout<kD, kBr, Features<kStep>::kDoubleBuffer ? 2 : 1>::bytes;
    // Once per instantiation, at its first launch: later (timed) launches do no host work but the launches.
    static const cudaError_t attribute_set =
        cudaFuncSetAttribute(dk_dv_kernel<T, kD, kStep>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    CUDA_CHECK(attribute_set);
    const dim3 grid(ceil_div(p.Nk, Bc), BH);
    dk_dv_kernel<T, kD, kStep><<<grid, kThreads, smem, stream>>>(Q, K, V, dO, lse_log2, D, dQ_accum, dK, dV, p.Nq,
                                                                 p.Nk, Nq_pad, p.causal, p.resolved_scale());
    CUDA_CHECK_LAUNCH();

    const size_t n_elems = p.q_elems();
    const int threads = 256;
    const size_t blocks = ceil_div(n_elems / 4, size_t(threads));
    convert_dq_kernel<T, kD><<<unsigned(blocks), threads, 0, stream>>>(dQ_accum, dQ, p.Nq, Nq_pad, n_elems);
    CUDA_CHECK_LAUNCH();
}

template <typename T, int kD>
std::string launch_step(const Problem& p, const void* Q, const void* K, const void* V, const void* O,
                        const float* LSE, const void* dO, void* dQ, void* dK, void* dV, void* workspace,
                        cudaStream_t stream) {
    auto in = [](const void* x) { return static_cast<const T*>(x); };
    auto out = [](void* x) { return static_cast<T*>(x); };
    const int step = step_of(p);
    if (step == kFinalStep) {
        launch<T, kD, kFinalStep>(p, in(Q), in(K), in(V), in(O), LSE, in(dO), out(dQ), out(dK), out(dV), workspace,
                                  stream);
        return "";
    }
    if constexpr (std::is_same_v<T, __half>) {
        switch (step) {
            case 1:
                launch<T, kD, 1>(p, in(Q), in(K), in(V), in(O), LSE, in(dO), out(dQ), out(dK), out(dV), workspace,
                                 stream);
                return "";
            case 2:
                launch<T, kD, 2>(p, in(Q), in(K), in(V), in(O), LSE, in(dO), out(dQ), out(dK), out(dV), workspace,
                                 stream);
                return "";
            default: break;
        }
    }
    return "v2 backward (mma) has no step " + std::to_string(p.kernel) + " compiled for " + dtype_name(p.dtype);
}

template <typename T>
std::string launch_for_d(const Problem& p, const void* Q, const void* K, const void* V, const void* O,
                         const float* LSE, const void* dO, void* dQ, void* dK, void* dV, void* workspace,
                         cudaStream_t stream) {
    switch (p.d) {
        case 64: return launch_step<T, 64>(p, Q, K, V, O, LSE, dO, dQ, dK, dV, workspace, stream);
        case 128: return launch_step<T, 128>(p, Q, K, V, O, LSE, dO, dQ, dK, dV, workspace, stream);
        default: return "v2 backward (mma) has no instantiation for head dim " + std::to_string(p.d);
    }
}

}  // namespace

bool v2_backward_mma_supports(const Problem& p, std::string* why) {
    const int n_steps = int(v2_backward_steps().size());
    std::string reason;
    if (p.dtype != DType::fp16 && p.dtype != DType::bf16)
        reason = std::string("v2 backward (mma) needs fp16 or bf16, got ") + dtype_name(p.dtype);
    else if (p.d != 64 && p.d != 128)
        reason = "v2 backward (mma) supports d = 64 and d = 128, got " + std::to_string(p.d);
    else if (p.Nq < 1 || p.Nk < 1)
        reason = "v2 backward (mma) needs Nq >= 1 and Nk >= 1, got Nq = " + std::to_string(p.Nq) + ", Nk = " +
                 std::to_string(p.Nk);
    else if (long(p.B) * p.H > 65535)
        reason = "v2 backward (mma) needs B*H <= 65535 (one grid row per head), got " + std::to_string(long(p.B) * p.H);
    else if (p.kernel < 0 || p.kernel > n_steps)
        reason = "v2 backward (mma) has steps 1.." + std::to_string(n_steps) + " (0 = the final one), got " +
                 std::to_string(p.kernel);
    else if (p.kernel != 0 && p.kernel != n_steps && p.dtype != DType::fp16)
        reason = "v2 backward (mma) steps before the final one are compiled for fp16 only (use --dtype fp16)";
    if (why) *why = reason;
    return reason.empty();
}

size_t v2_backward_mma_workspace_bytes(const Problem& p) {
    const size_t rows = size_t(p.B) * p.H * padded_rows(p);
    return rows * (p.d + 2) * sizeof(float);  // dQ accumulator [rows, d], LSE in log2 units [rows], D [rows]
}

std::string v2_backward_mma(const Problem& p, const void* Q, const void* K, const void* V, const void* O,
                            const float* LSE, const void* dO, void* dQ, void* dK, void* dV, void* workspace,
                            cudaStream_t stream) {
    std::string why;
    if (!v2_backward_mma_supports(p, &why)) return why;
    if (p.dtype == DType::fp16) return launch_for_d<__half>(p, Q, K, V, O, LSE, dO, dQ, dK, dV, workspace, stream);
    return launch_for_d<__nv_bfloat16>(p, Q, K, V, O, LSE, dO, dQ, dK, dV, workspace, stream);
}
