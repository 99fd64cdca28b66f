// forward_mma.cu: the FlashAttention-2 forward pass (Dao, 2023, Algorithm 1) on tensor cores.
//
// One CTA of 4 warps owns one tile Q_i of Br query rows of one (batch, head) and walks the key/value tiles
// K_j, V_j of Bc rows each:
//
//     S    = Q_i K_j^T                                   mma.sync m16n8k16, fp32 accumulators
//     m'   = max(m_i, rowmax(S) * scale * log2 e)        softmax statistics in the log2 domain, fp32
//     P    = exp2(S * scale * log2 e - m')               one FFMA + one EX2 per score
//     l_i  = l_i * exp2(m_i - m') + rowsum(P)
//     O_i  = O_i * exp2(m_i - m') + P V_j                P stays in registers (see below)
//
// and at the end writes O_i / l_i and LSE_i = (m_i + log2 l_i) * ln 2 (natural log, as tests/problem.h wants).
//
// Work split: each warp owns Br/4 contiguous query rows of Q_i (32 rows = two m16 tiles when Br = 128), so the
// warps never exchange softmax statistics; the Q loop is the grid (one CTA per Q tile), the K/V loop is in the CTA.
//
// Data movement:
//   global -> shared  cp.async (16 bytes a thread), K_j and V_j double-buffered: the copy of tile j+1 is issued
//                     before tile j is computed, so it lands while the tensor cores work.
//   shared -> regs    ldmatrix.x4; Q_i and K_j non-transposed, V_j with .trans (fragment layouts: mma.cuh).
//   S -> P            the fp32 accumulator fragment of S is exactly the A-operand fragment of P for the second
//                     mma once packed to 16 bits, so P never touches shared memory.
//
// Shared-memory layout: every tile row holds d elements plus 8 elements (16 bytes) of padding. ldmatrix reads
// 8 rows of 16 bytes per 8x8 matrix; with a row pitch of 2d + 16 bytes = an odd number of 16-byte chunks, the 8 rows
// start in 8 different 16-byte slots of a 128-byte bank line, so the read is conflict-free for every head dim
// (32, 64, 96, 128). We pad rather than XOR-swizzle because one rule then covers all four head dims (a 64-byte row
// of d = 32 does not fit the usual 128-byte swizzle) and every ldmatrix address is a per-thread base plus a
// compile-time offset. The cost is 16 bytes a row (6% of shared memory at d = 128). Measured without the padding
// (row pitch 2d bytes, 8-way conflicts): 3.4-3.8x slower on an H200 (d = 128, N = 16k: 330 -> 91 TFLOP/s).
//
// Causal masking is bottom-right aligned (row i sees key j iff j < causal_key_end(i)). K/V tiles entirely above the
// diagonal are never loaded (the loop stops at the last key the tile's last row sees); only tiles that straddle the
// diagonal, and the last tile when Nk is not a multiple of Bc, pay for the mask.
#include "forward_mma.h"
#include "cuda_check.h"
#include "mma.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>

namespace v2_mma {

using namespace v2_ptx;  // mma_m16n8k16, pack2, ldmatrix_x4(_trans), cp_async_*, exp2_approx, shared_addr

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;

// ---------------------------------------------------------------------------------------------------------------
// Tiles in shared memory: kRows rows of kD elements, row pitch kD + 8 elements (the padding above).

template <int kD>
constexpr int kPitch = kD + 8;

template <int kBr, int kBc, int kD>
constexpr int smem_bytes() {
    return (kBr + 2 * 2 * kBc) * kPitch<kD> * 2;  // Q_i, then K_j and V_j twice each (double buffer)
}

// Starts the copy of rows [row0, row0 + kRows) of a [N, kD] matrix into a shared tile; rows >= N become zeros.
// Thread x copies the 16-byte chunk x % kChunksPerRow of rows x / kChunksPerRow + i * kRowsPerPass, so that every
// address below is a per-thread base plus a compile-time offset. (d = 96 has 12 chunks a row: 120 threads copy.)
template <int kRows, int kD, typename T>
__device__ __forceinline__ void load_tile(uint32_t smem_tile, const T* gmem, int row0, int N) {
    constexpr int kChunksPerRow = kD / 8;
    constexpr int kRowsPerPass = kThreads / kChunksPerRow;
    constexpr bool kEven = kThreads % kChunksPerRow == 0 && kRows % kRowsPerPass == 0;
    const int r0 = threadIdx.x / kChunksPerRow, c = threadIdx.x % kChunksPerRow * 8;
    const T* tile = gmem + size_t(row0) * kD;  // row0 < N always, so this is a valid address for zero-fills too
#pragma unroll
    for (int i = 0; i < (kRows + kRowsPerPass - 1) / kRowsPerPass; ++i) {
        const int r = r0 + i * kRowsPerPass;
        if (!kEven && (r0 >= kRowsPerPass || r >= kRows)) continue;
        const bool in_range = r < N - row0;
        cp_async_16(smem_tile + (r * kPitch<kD> + c) * 2, tile + (in_range ? r * kD + c : 0), in_range ? 16 : 0);
    }
}

// ---------------------------------------------------------------------------------------------------------------
// The kernel. Grid: (ceil(Nq / Br), B * H). Block: 4 warps.

template <typename T, int kD, int kBr, int kBc, bool kCausal>
__global__ void __launch_bounds__(kThreads, 2)
    flash_forward_kernel(const T* __restrict__ Q, const T* __restrict__ K, const T* __restrict__ V,
                         T* __restrict__ O, float* __restrict__ LSE, int Nq, int Nk, float scale_log2) {
    constexpr int kWarpRows = kBr / kWarps;   // query rows per warp
    constexpr int kMTiles = kWarpRows / 16;   // m16 tiles per warp
    constexpr int kNTiles = kBc / 8;          // n8 tiles of S = Q_i K_j^T
    constexpr int kDTiles = kD / 8;           // n8 tiles of O_i
    constexpr int kPitchBytes = kPitch<kD> * 2;
    static_assert(kWarpRows % 16 == 0 && kBc % 16 == 0 && kD % 16 == 0, "tiles are whole mma fragments");
    static_assert(sizeof(T) == 2, "16-bit operands");

    extern __shared__ __align__(16) unsigned char smem[];
    const uint32_t sQ = shared_addr(smem);
    const uint32_t sK = sQ + kBr * kPitchBytes;        // two buffers of kBc rows
    const uint32_t sV = sK + 2 * kBc * kPitchBytes;    // two buffers of kBc rows
    constexpr uint32_t kKVTileBytes = kBc * kPitchBytes;

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int g = lane / 4, t = lane % 4;  // fragment coordinates (see mma.cuh)

    // Causal: the last Q tiles see the most keys; launching them first shortens the tail of the grid.
    const int q_tile = kCausal ? gridDim.x - 1 - blockIdx.x : blockIdx.x;
    const int q0 = q_tile * kBr;
    const size_t bh = blockIdx.y;
    const T* Q_i = Q + (bh * Nq + q0) * kD;
    const T* K_bh = K + bh * Nk * kD;
    const T* V_bh = V + bh * Nk * kD;

    // Keys this Q tile visits: all of them, or (causal) up to the last key its last real row sees.
    const int q_end = min(q0 + kBr, Nq);
    const int kv_end = kCausal ? min(Nk, causal_key_end(q_end - 1, Nq, Nk)) : Nk;
    const int n_tiles = kv_end > 0 ? (kv_end + kBc - 1) / kBc : 0;

    load_tile<kBr, kD>(sQ, Q_i, 0, Nq - q0);
    if (n_tiles > 0) {
        load_tile<kBc, kD>(sK, K_bh, 0, Nk);
        load_tile<kBc, kD>(sV, V_bh, 0, Nk);
    }
    cp_async_commit();

    // Per-lane ldmatrix row addresses (see mma.cuh); the loops below add compile-time offsets.
    //   Q (A operand):  matrices (rows 0-7, k 0-7), (rows 8-15, k 0-7), (rows 0-7, k 8-15), (rows 8-15, k 8-15)
    //   K (B operand of S, two n8 tiles): (keys 0-7, d 0-7), (keys 0-7, d 8-15), (keys 8-15, d 0-7), (keys 8-15, d 8-15)
    //   V (B operand of O, two n8 tiles, transposed): (keys 0-7, d 0-7), (keys 8-15, d 0-7), (keys 0-7, d 8-15), ...
    const int warp_row0 = warp * kWarpRows;
    const uint32_t q_addr = sQ + (warp_row0 + lane % 16) * kPitchBytes + lane / 16 * 16;
    const uint32_t k_addr = sK + (lane % 8 + lane / 16 * 8) * kPitchBytes + lane / 8 % 2 * 16;
    const uint32_t v_addr = sV + (lane % 8 + lane / 8 % 2 * 8) * kPitchBytes + lane / 16 * 16;

    float O_i[kMTiles][kDTiles][4] = {};  // unnormalised output rows g and g+8 of each m tile, fp32
    float m_i[kMTiles][2];                // running row max, log2 domain (already times scale * log2 e)
    float l_i[kMTiles][2];                // running row sum of this thread's columns; the quad sums them at the end
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            m_i[mt][h] = -INFINITY;
            l_i[mt][h] = 0.0f;
        }
    }

    for (int j = 0; j < n_tiles; ++j) {
        // Prefetch K_{j+1}, V_{j+1} into the other buffer (freed by the barrier at the end of iteration j-1).
        // The group is committed even when empty so that "wait until one group is pending" always means tile j.
        if (j + 1 < n_tiles) {
            load_tile<kBc, kD>(sK + (j + 1) % 2 * kKVTileBytes, K_bh, (j + 1) * kBc, Nk);
            load_tile<kBc, kD>(sV + (j + 1) % 2 * kKVTileBytes, V_bh, (j + 1) * kBc, Nk);
        }
        cp_async_commit();
        cp_async_wait<1>();
        __syncthreads();
        const uint32_t K_j = k_addr + j % 2 * kKVTileBytes;
        const uint32_t V_j = v_addr + j % 2 * kKVTileBytes;

        // S = Q_i K_j^T: kMTiles x kNTiles fragments of 16x8.
        float S[kMTiles][kNTiles][4] = {};
#pragma unroll
        for (int kk = 0; kk < kD / 16; ++kk) {
            uint32_t a[kMTiles][4];
#pragma unroll
            for (int mt = 0; mt < kMTiles; ++mt) ldmatrix_x4(a[mt], q_addr + mt * 16 * kPitchBytes + kk * 32);
#pragma unroll
            for (int np = 0; np < kNTiles / 2; ++np) {
                uint32_t b[4];
                ldmatrix_x4(b, K_j + np * 16 * kPitchBytes + kk * 32);
#pragma unroll
                for (int mt = 0; mt < kMTiles; ++mt) {
                    mma_m16n8k16<T>(S[mt][2 * np], a[mt], b[0], b[1]);
                    mma_m16n8k16<T>(S[mt][2 * np + 1], a[mt], b[2], b[3]);
                }
            }
        }

        // Mask keys past Nk (last tile) and, causal, keys right of the diagonal. Warp-uniform branch: only tiles
        // that reach past Nk or past the first key this warp's first row may not see take it.
        const int key0 = j * kBc;
        if (key0 + kBc > Nk || (kCausal && key0 + kBc > causal_key_end(q0 + warp_row0, Nq, Nk))) {
#pragma unroll
            for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int row = q0 + warp_row0 + mt * 16 + g + e / 2 * 8;
                    const int key_end = kCausal ? min(Nk, causal_key_end(row, Nq, Nk)) : Nk;
#pragma unroll
                    for (int nt = 0; nt < kNTiles; ++nt) {
                        if (key0 + nt * 8 + 2 * t + e % 2 >= key_end) S[mt][nt][e] = -INFINITY;
                    }
                }
            }
        }

        // Online softmax. Each row lives in one quad of lanes (same g), so the row max needs two shuffles.
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
            for (int h = 0; h < 2; ++h) {  // h = 0: row g, h = 1: row g + 8 (accumulator elements 2h, 2h+1)
                float row_max = -INFINITY;
#pragma unroll
                for (int nt = 0; nt < kNTiles; ++nt)
                    row_max = fmaxf(row_max, fmaxf(S[mt][nt][2 * h], S[mt][nt][2 * h + 1]));
                row_max = fmaxf(row_max, __shfl_xor_sync(0xffffffffu, row_max, 1));
                row_max = fmaxf(row_max, __shfl_xor_sync(0xffffffffu, row_max, 2));
                const float m_new = fmaxf(m_i[mt][h], row_max * scale_log2);
                // A row that has seen only masked keys keeps m = -inf; subtracting -inf from -inf would give NaN,
                // so such a row uses 0 as its base: every exp2 below is then exp2(-inf) = 0.
                const float base = m_new == -INFINITY ? 0.0f : m_new;
                const float alpha = exp2_approx(m_i[mt][h] - base);
                m_i[mt][h] = m_new;
                l_i[mt][h] *= alpha;
#pragma unroll
                for (int dt = 0; dt < kDTiles; ++dt) {
                    O_i[mt][dt][2 * h] *= alpha;
                    O_i[mt][dt][2 * h + 1] *= alpha;
                }
#pragma unroll
                for (int nt = 0; nt < kNTiles; ++nt) {
#pragma unroll
                    for (int e = 2 * h; e < 2 * h + 2; ++e) {
                        S[mt][nt][e] = exp2_approx(fmaf(S[mt][nt][e], scale_log2, -base));  // S now holds P
                        l_i[mt][h] += S[mt][nt][e];
                    }
                }
            }
        }

        // O_i += P V_j. The A fragment of P for keys 16kk..16kk+15 is the accumulators of S's n8 tiles 2kk and
        // 2kk+1, packed in pairs: (row g, keys 2t, 2t+1), (row g+8, ...), (row g, keys 2t+8, +9), (row g+8, ...).
#pragma unroll
        for (int kk = 0; kk < kBc / 16; ++kk) {
            uint32_t p[kMTiles][4];
#pragma unroll
            for (int mt = 0; mt < kMTiles; ++mt) {
                p[mt][0] = pack2<T>(S[mt][2 * kk][0], S[mt][2 * kk][1]);
                p[mt][1] = pack2<T>(S[mt][2 * kk][2], S[mt][2 * kk][3]);
                p[mt][2] = pack2<T>(S[mt][2 * kk + 1][0], S[mt][2 * kk + 1][1]);
                p[mt][3] = pack2<T>(S[mt][2 * kk + 1][2], S[mt][2 * kk + 1][3]);
            }
#pragma unroll
            for (int dp = 0; dp < kDTiles / 2; ++dp) {
                uint32_t b[4];
                ldmatrix_x4_trans(b, V_j + kk * 16 * kPitchBytes + dp * 32);
#pragma unroll
                for (int mt = 0; mt < kMTiles; ++mt) {
                    mma_m16n8k16<T>(O_i[mt][2 * dp], p[mt], b[0], b[1]);
                    mma_m16n8k16<T>(O_i[mt][2 * dp + 1], p[mt], b[2], b[3]);
                }
            }
        }
        __syncthreads();  // everyone is done with buffer j % 2 before iteration j+1 refills it
    }

    // Epilogue. O_i / l_i goes to this warp's own rows of the Q tile in shared memory (only this warp ever read
    // them), then leaves in 16-byte coalesced stores. The barrier matters only when n_tiles == 0, where nothing
    // has waited for the copy of Q_i yet.
    cp_async_wait<0>();
    __syncthreads();
    T* sO = reinterpret_cast<T*>(smem);
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            float l = l_i[mt][h];
            l += __shfl_xor_sync(0xffffffffu, l, 1);
            l += __shfl_xor_sync(0xffffffffu, l, 2);
            // l = 0 exactly when the row saw no key (otherwise its max element contributed exp2(0) = 1).
            const float inv_l = l > 0.0f ? 1.0f / l : 0.0f;
            const int r = warp_row0 + mt * 16 + g + h * 8;
#pragma unroll
            for (int dt = 0; dt < kDTiles; ++dt) {
                *reinterpret_cast<uint32_t*>(&sO[r * kPitch<kD> + dt * 8 + 2 * t]) =
                    pack2<T>(O_i[mt][dt][2 * h] * inv_l, O_i[mt][dt][2 * h + 1] * inv_l);
            }
            if (t == 0 && q0 + r < Nq)
                LSE[bh * Nq + q0 + r] = l > 0.0f ? (m_i[mt][h] + log2f(l)) * 0.69314718055994531f : -INFINITY;
        }
    }
    __syncwarp();
    constexpr int kChunksPerRow = kD * 2 / 16;
    T* O_out = O + (bh * Nq + q0) * kD;
#pragma unroll
    for (int i = 0; i < kWarpRows * kChunksPerRow / 32; ++i) {
        const int chunk = i * 32 + lane;
        const int r = warp_row0 + chunk / kChunksPerRow;
        const int c = chunk % kChunksPerRow * 8;
        if (q0 + r < Nq)
            *reinterpret_cast<uint4*>(&O_out[size_t(r) * kD + c]) =
                *reinterpret_cast<const uint4*>(&sO[r * kPitch<kD> + c]);
    }
}

template <typename T, int kD, int kBr, int kBc, bool kCausal>
void launch(const Problem& p, const void* Q, const void* K, const void* V, void* O, float* LSE, cudaStream_t stream) {
    auto kernel = flash_forward_kernel<T, kD, kBr, kBc, kCausal>;
    constexpr int kSmem = smem_bytes<kBr, kBc, kD>();
    CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem));
    const dim3 grid((p.Nq + kBr - 1) / kBr, p.B * p.H);
    const float scale_log2 = p.resolved_scale() * 1.4426950408889634f;
    kernel<<<grid, kThreads, kSmem, stream>>>(static_cast<const T*>(Q), static_cast<const T*>(K),
                                             static_cast<const T*>(V), static_cast<T*>(O), LSE, p.Nq, p.Nk,
                                             scale_log2);
    CUDA_CHECK_LAUNCH();
}

// Tile shapes (Br x Bc) per head dim. Measured on an H200 (fp16, hidden 2048, B*N = 16384, TFLOP/s at N = 1k .. 16k;
// scratch benchmark, 2026-11-21), 4 warps a CTA in every case:
//   d = 64,  non-causal: 128x64 291..307   128x128 281..296   64x64 255..269   64x128 227..242
//   d = 64,  causal:     128x64 229..297   128x128 234..303   64x64 219..259   64x128 191..246
//   d = 128, non-causal: 128x64 322..348   128x32  299..313   64x64 245..258   64x128 198..215
//   d = 128, causal:     128x64 245..326   128x32  229..295   64x64 211..259   64x128 165..219
// Br = 128 (32 rows a warp) halves the shared-memory reads of K_j and V_j per mma against Br = 64, which is what
// separates the rows above; Bc = 64 keeps S (Br x Bc fp32) small enough next to O_i to stay in 255 registers with
// no spills (Br = 128, Bc = 128 at d = 64 sits at the register limit and is no faster: the causal gap is within the
// ~5% run-to-run spread of one kernel timed twice). Head dims 32 and 96 (not timed) take the same shape.
template <typename T, int kD, int kBr, int kBc>
void launch_causal_or_not(const Problem& p, const void* Q, const void* K, const void* V, void* O, float* LSE,
                          cudaStream_t stream) {
    if (p.causal)
        launch<T, kD, kBr, kBc, true>(p, Q, K, V, O, LSE, stream);
    else
        launch<T, kD, kBr, kBc, false>(p, Q, K, V, O, LSE, stream);
}

template <typename T>
void launch_for_head_dim(const Problem& p, const void* Q, const void* K, const void* V, void* O, float* LSE,
                         cudaStream_t stream) {
    switch (p.d) {
        case 32: launch_causal_or_not<T, 32, 128, 64>(p, Q, K, V, O, LSE, stream); break;
        case 64: launch_causal_or_not<T, 64, 128, 64>(p, Q, K, V, O, LSE, stream); break;
        case 96: launch_causal_or_not<T, 96, 128, 64>(p, Q, K, V, O, LSE, stream); break;
        case 128: launch_causal_or_not<T, 128, 128, 64>(p, Q, K, V, O, LSE, stream); break;
    }
}

}  // namespace v2_mma

bool v2_mma_supports(const Problem& p, std::string* why) {
    if (p.dtype != DType::fp16 && p.dtype != DType::bf16) {
        *why = std::string("v2 mma forward needs fp16 or bf16 inputs (tensor-core operands), got ") + dtype_name(p.dtype);
        return false;
    }
    if (p.d != 32 && p.d != 64 && p.d != 96 && p.d != 128) {
        *why = "v2 mma forward supports head dims 32, 64, 96 and 128, got " + std::to_string(p.d);
        return false;
    }
    if (p.Nq < 1 || p.Nk < 1) {
        *why = "v2 mma forward needs Nq >= 1 and Nk >= 1, got Nq = " + std::to_string(p.Nq) + ", Nk = " +
               std::to_string(p.Nk);
        return false;
    }
    if (long(p.B) * p.H > 65535) {
        *why = "v2 mma forward needs B*H <= 65535 (one grid row per head), got " + std::to_string(long(p.B) * p.H);
        return false;
    }
    return true;
}

void v2_forward_mma(const Problem& p, const void* Q, const void* K, const void* V, void* O, float* LSE,
                    cudaStream_t stream) {
    std::string why;
    if (!v2_mma_supports(p, &why)) {
        std::fprintf(stderr, "error: %s\n", why.c_str());
        std::exit(1);
    }
    if (p.dtype == DType::fp16)
        v2_mma::launch_for_head_dim<__half>(p, Q, K, V, O, LSE, stream);
    else
        v2_mma::launch_for_head_dim<__nv_bfloat16>(p, Q, K, V, O, LSE, stream);
}
