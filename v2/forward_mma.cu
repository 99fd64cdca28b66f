// forward_mma.cu: the FlashAttention-2 forward pass (Dao, 2023, Algorithm 1) on tensor cores.
//
// One CTA of 4 warps (8 past head dim 128) owns one tile Q_i of Br query rows of one (batch, head) and walks the
// key/value tiles K_j, V_j of Bc rows each:
//
//     S    = Q_i K_j^T                                   mma.sync m16n8k16, fp32 accumulators
//     m'   = max(m_i, rowmax(S) * scale * log2 e)        softmax statistics in the log2 domain, fp32
//     P    = exp2(S * scale * log2 e - m')               one FFMA + one EX2 per score
//     l_i  = l_i * exp2(m_i - m') + rowsum(P)
//     O_i  = O_i * exp2(m_i - m') + P V_j                P stays in registers (see below)
//
// and at the end writes O_i / l_i and LSE_i = (m_i + log2 l_i) * ln 2 (natural log, as tests/problem.h wants).
// The `// line N` comments in the kernel are the lines of Algorithm 1 of the FlashAttention-2 paper; symbols as in
// forward_fp32.cu, plus m_i, l_i held in the log2 domain from the exp2 step on.
//
// Work split: each warp owns Br / kWarps contiguous query rows of Q_i (32 rows = two m16 tiles with 4 warps), so the
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
// start in 8 different 16-byte slots of a 128-byte bank line, so the read is conflict-free for every head-dim tile
// (32, 64, 96, 128, 192, 256). We pad rather than XOR-swizzle because one rule then covers all six tiles (a 64-byte row
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
#include "common/blocks.cuh"
#include "v2.h"  // v2_forward_steps

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <type_traits>
#include <vector>

namespace v2_mma {

using namespace v2_ptx;  // mma_m16n8k16, pack2, ldmatrix_x4(_trans), ldm_*, cp_async_*, exp2_approx, shared_addr

// ---------------------------------------------------------------------------------------------------------------
// The optimisation steps (bin/v2 --dtype fp16 --kernel K; v2_forward_steps() below names them). One kernel
// template serves them all; each step switches on one more idea, and step kFinalStep is the kernel described above.

template <int kStep>
struct Features {
    static constexpr bool kPInRegisters = kStep >= 2;    // 2: P stays in registers (accumulator = A fragment)
    static constexpr bool kLdmatrix = kStep >= 3;        // 3: ldmatrix.x4 on rows padded by 16 bytes
    static constexpr bool kCpAsync = kStep >= 4;         // 4: cp.async, K_j and V_j double-buffered
    static constexpr bool kExp2 = kStep >= 5;            // 5: exp2 with the scale folded into one FFMA,
    static constexpr bool kStagedEpilogue = kStep >= 5;  //    and O_i leaves through shared memory
};
constexpr int kFinalStep = 5;

}  // namespace v2_mma

const std::vector<KernelStep>& v2_forward_steps() {
    static const std::vector<KernelStep> steps = {
        {"mma-smem", "mma.sync m16n8k16; fragments by plain shared loads, P written to and re-read from shared memory"},
        {"p-registers", "P stays in registers: S's accumulator fragment, packed to 16 bits, is P's A fragment"},
        {"ldmatrix", "fragments by ldmatrix.x4; tile rows padded by 16 bytes so its 8-row reads are conflict-free"},
        {"cp-async", "K_j, V_j copied with cp.async into two buffers: tile j+1 lands while tile j is computed"},
        {"exp2-epilogue", "exp2 with scale * log2 e folded into one FFMA; O_i staged in shared memory, 16-byte stores"},
    };
    static_assert(v2_mma::kFinalStep == 5, "one entry per step");
    return steps;
}

namespace v2_mma {

// ---------------------------------------------------------------------------------------------------------------
// Tiles in shared memory: kRows rows of kD elements, row pitch kD elements, plus 8 (16 bytes, the padding above)
// from the ldmatrix step on.

template <int kD, int kStep>
constexpr int kPitch = Features<kStep>::kLdmatrix ? kD + 8 : kD;

template <int kBr, int kBc, int kD, int kStep>
constexpr int smem_bytes() {
    constexpr int kKVBuffers = Features<kStep>::kCpAsync ? 2 : 1;
    constexpr int kPBytes = Features<kStep>::kPInRegisters ? 0 : kBr * kBc * 2;
    return (kBr + 2 * kKVBuffers * kBc) * kPitch<kD, kStep> * 2 + kPBytes;  // Q_i, K_j and V_j (x2), P
}

// Plain shared-memory accesses by shared address: what the steps before ldmatrix and cp.async use instead.
__device__ __forceinline__ uint32_t lds32(uint32_t addr) {
    uint32_t v;
    asm volatile("ld.shared.b32 %0, [%1];\n" : "=r"(v) : "r"(addr) : "memory");
    return v;
}
__device__ __forceinline__ uint32_t lds16(uint32_t addr) {
    unsigned short v;
    asm volatile("ld.shared.b16 %0, [%1];\n" : "=h"(v) : "r"(addr) : "memory");
    return v;
}
__device__ __forceinline__ void sts32(uint32_t addr, uint32_t v) {
    asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(addr), "r"(v) : "memory");
}
__device__ __forceinline__ void sts128(uint32_t addr, uint4 v) {
    asm volatile("st.shared.v4.b32 [%0], {%1, %2, %3, %4};\n" ::"r"(addr), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w)
                 : "memory");
}

// Copies rows [row0, row0 + kRows) of a [N, d] matrix (d <= kD, a multiple of 8) into a shared tile of kD columns
// and row pitch kPitchBytes; rows >= N and columns >= d become zeros (nothing past row N or column d is read).
// Thread x copies the 16-byte chunk x % kChunksPerRow of rows x / kChunksPerRow + i * kRowsPerPass, so that every
// shared address below is a per-thread base plus a compile-time offset. (kD = 96 has 12 chunks a row: 120 threads
// copy.) kAsync: cp.async, which the caller commits and waits for; otherwise a load and a store per chunk.
template <int kRows, int kD, int kPitchBytes, int kThreads, bool kAsync, typename T>
__device__ __forceinline__ void load_tile(uint32_t smem_tile, const T* gmem, int row0, int N, int d) {
    constexpr int kChunksPerRow = kD / 8;
    constexpr int kRowsPerPass = kThreads / kChunksPerRow;
    constexpr bool kEven = kThreads % kChunksPerRow == 0 && kRows % kRowsPerPass == 0;
    const int r0 = threadIdx.x / kChunksPerRow, c = threadIdx.x % kChunksPerRow * 8;
    const T* tile = gmem + size_t(row0) * d;  // row0 < N always, so this is a valid address for zero-fills too
#pragma unroll
    for (int i = 0; i < ceil_div(kRows, kRowsPerPass); ++i) {
        const int r = r0 + i * kRowsPerPass;
        if (!kEven && (r0 >= kRowsPerPass || r >= kRows)) continue;
        const bool in_range = r < N - row0 && c < d;
        const T* src = tile + (in_range ? r * d + c : 0);
        if constexpr (kAsync)
            cp_async_16(smem_tile + r * kPitchBytes + c * 2, src, in_range ? 16 : 0);
        else
            sts128(smem_tile + r * kPitchBytes + c * 2,
                   in_range ? *reinterpret_cast<const uint4*>(src) : make_uint4(0, 0, 0, 0));
    }
}

// The mma operands of one 16x16 block of a shared tile with row pitch kPitchBytes, in the register order of
// mma.cuh: by one ldmatrix.x4 (kLdmatrix), or by plain loads of each register's two elements. `addr` is
// the block's address plus this lane's offset *_lane(lane): where ldmatrix wants this lane's row address, or, for
// plain loads, the (row g, col 2t) element of the fragment ((row 2t, col g) for a tile read transposed).
template <bool kLdmatrix, int kPitchBytes>
struct Fragments {
    static __device__ __forceinline__ uint32_t a_lane(int lane) {  // A, tile stored [m][k]
        return kLdmatrix ? ldm_a_row(lane) * kPitchBytes + ldm_a_col(lane) * 2 : lane / 4 * kPitchBytes + lane % 4 * 4;
    }
    static __device__ __forceinline__ uint32_t b_lane(int lane) {  // B of two n8 tiles, tile stored [n][k]
        return kLdmatrix ? ldm_b_row(lane) * kPitchBytes + ldm_b_col(lane) * 2 : lane / 4 * kPitchBytes + lane % 4 * 4;
    }
    static __device__ __forceinline__ uint32_t bt_lane(int lane) {  // B of two n8 tiles, tile stored [k][n]
        return kLdmatrix ? ldm_bt_row(lane) * kPitchBytes + ldm_bt_col(lane) * 2
                         : lane % 4 * 2 * kPitchBytes + lane / 4 * 2;
    }
    // a0..a3: (m 0-7 | 8-15) x (k 0-7 | 8-15), m first
    static __device__ __forceinline__ void a(uint32_t (&r)[4], uint32_t addr) {
        if constexpr (kLdmatrix) {
            ldmatrix_x4(r, addr);
        } else {
            r[0] = lds32(addr), r[1] = lds32(addr + 8 * kPitchBytes);
            r[2] = lds32(addr + 16), r[3] = lds32(addr + 8 * kPitchBytes + 16);
        }
    }
    // b0, b1 of the n8 tile n 0-7, then of n 8-15
    static __device__ __forceinline__ void b(uint32_t (&r)[4], uint32_t addr) {
        if constexpr (kLdmatrix) {
            ldmatrix_x4(r, addr);
        } else {
            r[0] = lds32(addr), r[1] = lds32(addr + 16);
            r[2] = lds32(addr + 8 * kPitchBytes), r[3] = lds32(addr + 8 * kPitchBytes + 16);
        }
    }
    // the same from a tile stored [k][n]: each register's two elements are in two rows
    static __device__ __forceinline__ void bt(uint32_t (&r)[4], uint32_t addr) {
        if constexpr (kLdmatrix) {
            ldmatrix_x4_trans(r, addr);
        } else {
            auto pair = [](uint32_t at) { return lds16(at) | lds16(at + kPitchBytes) << 16; };
            r[0] = pair(addr), r[1] = pair(addr + 8 * kPitchBytes);
            r[2] = pair(addr + 16), r[3] = pair(addr + 8 * kPitchBytes + 16);
        }
    }
};

// e^x (statistics in natural units) until the exp2 step, then 2^x (statistics in log2 units).
template <bool kExp2>
__device__ __forceinline__ float softmax_exp(float x) {
    if constexpr (kExp2)
        return exp2_approx(x);
    else
        return expf(x);
}

// ---------------------------------------------------------------------------------------------------------------
// The kernel. Grid: (ceil(Nq / Br), B * H). Block: kWarps warps (4, or 8 past kD = 128: see Tile below), 8 warps an
// SM either way (2 CTAs of 4 or 1 of 8), which lets each thread have up to 255 registers. scale_exp is
// scale * log2 e from the exp2 step on, the softmax scale before it. d is the head dim in device memory, kD the
// tile's (d <= kD): columns d..kD-1 of the shared tiles are zeros, so they add nothing to S and give O_i columns that
// are never stored. kExactD: d == kD, known at compile time (see kExactVariant below).

template <typename T, int kD, int kBr, int kBc, int kWarps, bool kCausal, int kStep, bool kExactD>
__global__ void __launch_bounds__(kWarps * 32, 8 / kWarps)
    flash_forward_kernel(const T* __restrict__ Q, const T* __restrict__ K, const T* __restrict__ V,
                         T* __restrict__ O, float* __restrict__ LSE, int Nq, int Nk, int head_dim, float scale_exp) {
    using F = Features<kStep>;
    const int d = kExactD ? kD : head_dim;
    constexpr int kThreads = kWarps * 32;
    constexpr int kWarpRows = kBr / kWarps;   // query rows per warp
    constexpr int kMTiles = kWarpRows / 16;   // m16 tiles per warp
    constexpr int kNTiles = kBc / 8;          // n8 tiles of S = Q_i K_j^T
    constexpr int kDTiles = kD / 8;           // n8 tiles of O_i
    constexpr int kPitchBytes = kPitch<kD, kStep> * 2;
    constexpr int kPPitchBytes = kBc * 2;     // step 1: P in shared memory, [Br][Bc] after the V buffer
    using Frag = Fragments<F::kLdmatrix, kPitchBytes>;
    static_assert(kWarpRows % 16 == 0 && kBc % 16 == 0 && kD % 16 == 0, "tiles are whole mma fragments");
    static_assert(sizeof(T) == 2, "16-bit operands");

    extern __shared__ __align__(16) unsigned char smem[];
    constexpr uint32_t kKVTileBytes = kBc * kPitchBytes;
    constexpr int kKVBuffers = F::kCpAsync ? 2 : 1;
    const uint32_t sQ = shared_addr(smem);
    const uint32_t sK = sQ + kBr * kPitchBytes;           // kKVBuffers buffers of kBc rows
    const uint32_t sV = sK + kKVBuffers * kKVTileBytes;   // kKVBuffers buffers of kBc rows

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int g = lane / 4, t = lane % 4;  // fragment coordinates (see mma.cuh)

    // Causal: the last Q tiles see the most keys; launching them first shortens the tail of the grid.
    const int q_tile = kCausal ? gridDim.x - 1 - blockIdx.x : blockIdx.x;  // line 3: the grid walks the Q tiles
    const int q0 = q_tile * kBr;
    const size_t bh = blockIdx.y;
    const T* Q_i = Q + (bh * Nq + q0) * d;
    const T* K_bh = K + bh * Nk * d;
    const T* V_bh = V + bh * Nk * d;

    // Keys this Q tile visits: all of them, or (causal) up to the last key its last real row sees.
    const int q_end = min(q0 + kBr, Nq);
    const int kv_end = kCausal ? min(Nk, causal_key_end(q_end - 1, Nq, Nk)) : Nk;
    const int n_tiles = kv_end > 0 ? ceil_div(kv_end, kBc) : 0;

    load_tile<kBr, kD, kPitchBytes, kThreads, F::kCpAsync>(sQ, Q_i, 0, Nq - q0, d);  // line 4 (line 7: K_0, V_0)
    if constexpr (F::kCpAsync) {
        if (n_tiles > 0) {
            load_tile<kBc, kD, kPitchBytes, kThreads, true>(sK, K_bh, 0, Nk, d);
            load_tile<kBc, kD, kPitchBytes, kThreads, true>(sV, V_bh, 0, Nk, d);
        }
        cp_async_commit();
    }

    // Per-lane fragment addresses (Fragments above); the loops below add compile-time offsets.
    //   Q (A operand), K (B operand of S, stored [key][d]), V (B operand of O, stored [key][d], read transposed)
    const int warp_row0 = warp * kWarpRows;
    const uint32_t q_addr = sQ + warp_row0 * kPitchBytes + Frag::a_lane(lane);
    const uint32_t k_addr = sK + Frag::b_lane(lane);
    const uint32_t v_addr = sV + Frag::bt_lane(lane);

    float O_i[kMTiles][kDTiles][4] = {};  // line 5: unnormalised output rows g and g+8 of each m tile, fp32
    float m_i[kMTiles][2];                // running row max (times scale_exp: log2 domain from the exp2 step on)
    float l_i[kMTiles][2];                // running row sum of this thread's columns; the quad sums them at the end
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            m_i[mt][h] = -INFINITY;
            l_i[mt][h] = 0.0f;
        }
    }

    for (int j = 0; j < n_tiles; ++j) {  // line 6
        if constexpr (F::kCpAsync) {  // line 7, one tile ahead
            // Prefetch K_{j+1}, V_{j+1} into the other buffer (freed by the barrier at the end of iteration j-1).
            // The group is committed even when empty so that "wait until one group is pending" always means tile j.
            if (j + 1 < n_tiles) {
                const uint32_t next = (j + 1) % 2 * kKVTileBytes;
                load_tile<kBc, kD, kPitchBytes, kThreads, true>(sK + next, K_bh, (j + 1) * kBc, Nk, d);
                load_tile<kBc, kD, kPitchBytes, kThreads, true>(sV + next, V_bh, (j + 1) * kBc, Nk, d);
            }
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            // line 7. One buffer: the CTA waits for tile j's loads before any mma (the barrier at the end of iteration
            // j-1 made the buffer free).
            load_tile<kBc, kD, kPitchBytes, kThreads, false>(sK, K_bh, j * kBc, Nk, d);
            load_tile<kBc, kD, kPitchBytes, kThreads, false>(sV, V_bh, j * kBc, Nk, d);
        }
        __syncthreads();
        const uint32_t K_j = k_addr + (F::kCpAsync ? j % 2 * kKVTileBytes : 0);
        const uint32_t V_j = v_addr + (F::kCpAsync ? j % 2 * kKVTileBytes : 0);

        // line 8: S = Q_i K_j^T, kMTiles x kNTiles fragments of 16x8.
        float S[kMTiles][kNTiles][4] = {};
#pragma unroll
        for (int kk = 0; kk < kD / 16; ++kk) {
            uint32_t a[kMTiles][4];
#pragma unroll
            for (int mt = 0; mt < kMTiles; ++mt) Frag::a(a[mt], q_addr + mt * 16 * kPitchBytes + kk * 32);
#pragma unroll
            for (int np = 0; np < kNTiles / 2; ++np) {
                uint32_t b[4];
                Frag::b(b, K_j + np * 16 * kPitchBytes + kk * 32);
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

        // line 9: online softmax (and line 10's rescale of O_i). Each row lives in one quad of lanes (same g), so the
        // row max needs two shuffles.
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
                const float m_new = fmaxf(m_i[mt][h], row_max * scale_exp);
                // A row that has seen only masked keys keeps m = -inf; subtracting -inf from -inf would give NaN,
                // so such a row uses 0 as its base: every exponential below is then of -inf, i.e. 0.
                const float base = m_new == -INFINITY ? 0.0f : m_new;
                const float alpha = softmax_exp<F::kExp2>(m_i[mt][h] - base);
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
                        S[mt][nt][e] = softmax_exp<F::kExp2>(fmaf(S[mt][nt][e], scale_exp, -base));  // S holds P
                        l_i[mt][h] += S[mt][nt][e];
                    }
                }
            }
        }

        // Step 1: P goes to this warp's own rows of a shared [Br][Bc] tile and comes back as A fragments.
        if constexpr (!F::kPInRegisters) {
            const uint32_t sP = sV + kKVBuffers * kKVTileBytes;
#pragma unroll
            for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
                for (int nt = 0; nt < kNTiles; ++nt)
#pragma unroll
                    for (int h = 0; h < 2; ++h)
                        sts32(sP + (warp_row0 + mt * 16 + g + 8 * h) * kPPitchBytes + (nt * 8 + 2 * t) * 2,
                              pack2<T>(S[mt][nt][2 * h], S[mt][nt][2 * h + 1]));
            __syncwarp();
        }

        // line 10: O_i += P V_j. From step 2 on, the A fragment of P for keys 16kk..16kk+15 is the accumulators of S's
        // n8 tiles 2kk and 2kk+1, packed in pairs: (row g, keys 2t, 2t+1), (row g+8, ...), (row g, keys 2t+8, +9), ...
#pragma unroll
        for (int kk = 0; kk < kBc / 16; ++kk) {
            uint32_t p[kMTiles][4];
#pragma unroll
            for (int mt = 0; mt < kMTiles; ++mt) {
                if constexpr (F::kPInRegisters) {
                    p[mt][0] = pack2<T>(S[mt][2 * kk][0], S[mt][2 * kk][1]);
                    p[mt][1] = pack2<T>(S[mt][2 * kk][2], S[mt][2 * kk][3]);
                    p[mt][2] = pack2<T>(S[mt][2 * kk + 1][0], S[mt][2 * kk + 1][1]);
                    p[mt][3] = pack2<T>(S[mt][2 * kk + 1][2], S[mt][2 * kk + 1][3]);
                } else {
                    using PFrag = Fragments<false, kPPitchBytes>;
                    const uint32_t sP = sV + kKVBuffers * kKVTileBytes;
                    PFrag::a(p[mt], sP + (warp_row0 + mt * 16) * kPPitchBytes + PFrag::a_lane(lane) + kk * 32);
                }
            }
#pragma unroll
            for (int dp = 0; dp < kDTiles / 2; ++dp) {
                uint32_t b[4];
                Frag::bt(b, V_j + kk * 16 * kPitchBytes + dp * 32);
#pragma unroll
                for (int mt = 0; mt < kMTiles; ++mt) {
                    mma_m16n8k16<T>(O_i[mt][2 * dp], p[mt], b[0], b[1]);
                    mma_m16n8k16<T>(O_i[mt][2 * dp + 1], p[mt], b[2], b[3]);
                }
            }
        }
        __syncthreads();  // everyone is done with the K/V buffer of tile j before it is refilled
    }

    // Epilogue, lines 12-15: O_i / l_i and LSE_i. Before the staged epilogue, each thread stores its fragment's pairs
    // straight to global memory (4-byte stores, 8 rows apart). From step 5 on, O_i / l_i goes to this warp's own rows
    // of the Q tile in shared memory (only this warp ever read them), then leaves in 16-byte coalesced stores. The
    // barrier matters only when n_tiles == 0, where nothing has waited for the copy of Q_i yet.
    if constexpr (F::kStagedEpilogue) {
        cp_async_wait<0>();
        __syncthreads();
    }
    T* sO = reinterpret_cast<T*>(smem);
    T* O_out = O + (bh * Nq + q0) * d;
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            float l = l_i[mt][h];
            l += __shfl_xor_sync(0xffffffffu, l, 1);
            l += __shfl_xor_sync(0xffffffffu, l, 2);
            // l = 0 exactly when the row saw no key (otherwise its max element contributed exp(0) = 1).
            const float inv_l = l > 0.0f ? 1.0f / l : 0.0f;
            const int r = warp_row0 + mt * 16 + g + h * 8;
#pragma unroll
            for (int dt = 0; dt < kDTiles; ++dt) {
                const uint32_t pair = pack2<T>(O_i[mt][dt][2 * h] * inv_l, O_i[mt][dt][2 * h + 1] * inv_l);
                if constexpr (F::kStagedEpilogue)
                    *reinterpret_cast<uint32_t*>(&sO[r * kPitch<kD, kStep> + dt * 8 + 2 * t]) = pair;
                else if (q0 + r < Nq && dt * 8 < d)
                    *reinterpret_cast<uint32_t*>(&O_out[size_t(r) * d + dt * 8 + 2 * t]) = pair;
            }
            // LSE in natural log, as tests/problem.h wants (m_i is in log2 units from the exp2 step on).
            const float lse = F::kExp2 ? (m_i[mt][h] + log2f(l)) * 0.69314718055994531f : m_i[mt][h] + logf(l);
            if (t == 0 && q0 + r < Nq) LSE[bh * Nq + q0 + r] = l > 0.0f ? lse : -INFINITY;
        }
    }
    if constexpr (F::kStagedEpilogue) {
        __syncwarp();
        constexpr int kChunksPerRow = kD * 2 / 16;
#pragma unroll
        for (int i = 0; i < kWarpRows * kChunksPerRow / 32; ++i) {
            const int chunk = i * 32 + lane;
            const int r = warp_row0 + chunk / kChunksPerRow;
            const int c = chunk % kChunksPerRow * 8;
            if (q0 + r < Nq && c < d)
                *reinterpret_cast<uint4*>(&O_out[size_t(r) * d + c]) =
                    *reinterpret_cast<const uint4*>(&sO[r * kPitch<kD, kStep> + c]);
        }
    }
}

template <typename T, int kD, int kBr, int kBc, int kWarps, bool kCausal, int kStep, bool kExactD>
void launch(const Problem& p, const void* Q, const void* K, const void* V, void* O, float* LSE, cudaStream_t stream) {
    auto kernel = flash_forward_kernel<T, kD, kBr, kBc, kWarps, kCausal, kStep, kExactD>;
    constexpr int kSmem = smem_bytes<kBr, kBc, kD, kStep>();
    // Once per instantiation, at its first launch: later (timed) launches do no host work but the launch itself.
    static const cudaError_t attribute_set =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem);
    CUDA_CHECK(attribute_set);
    const dim3 grid(ceil_div(p.Nq, kBr), p.B * p.H);
    const float scale = p.resolved_scale();
    const float scale_exp = Features<kStep>::kExp2 ? scale * 1.4426950408889634f : scale;
    kernel<<<grid, kWarps * 32, kSmem, stream>>>(static_cast<const T*>(Q), static_cast<const T*>(K),
                                                 static_cast<const T*>(V), static_cast<T*>(O), LSE, p.Nq, p.Nk, p.d,
                                                 scale_exp);
    CUDA_CHECK_LAUNCH();
}

// Tile shapes (Br x Bc) per head-dim tile kD. Measured on an H200 (fp16, hidden 2048, B*N = 16384, TFLOP/s at
// N = 1k .. 16k; historical: scratch benchmark not in the repository, 2026-11-21), 4 warps a CTA in every case:
//   d = 64,  non-causal: 128x64 291..307   128x128 281..296   64x64 255..269   64x128 227..242
//   d = 64,  causal:     128x64 229..297   128x128 234..303   64x64 219..259   64x128 191..246
//   d = 128, non-causal: 128x64 322..348   128x32  299..313   64x64 245..258   64x128 198..215
//   d = 128, causal:     128x64 245..326   128x32  229..295   64x64 211..259   64x128 165..219
// Br = 128 (32 rows a warp) halves the shared-memory reads of K_j and V_j per mma against Br = 64, which is what
// separates the rows above; Bc = 64 keeps S (Br x Bc fp32) small enough next to O_i to stay in 255 registers with
// no spills (Br = 128, Bc = 128 at d = 64 sits at the register limit and is no faster: the causal gap is within the
// ~5% run-to-run spread of one kernel timed twice). Head dims 32 and 96 (not timed) take the same shape.
// Past 128 the accumulator O_i alone is kD / 2 registers a thread per m16 tile (128 at kD = 256), so a warp takes 16
// rows, and 8 warps make Br = 128, as FlashAttention-2 does at d = 256: K_j and V_j, read from device memory once
// per CTA, then serve 128 rows. Bc = 64 and the double buffer take (128 + 2 * 2 * 64) rows * 528 bytes = 198 KiB at
// kD = 256: one CTA of 8 warps an SM. (Measured on an H200, d = 256, N = 4096, fp16, against FlashAttention-2: 4
// warps with Br = 64, Bc = 32, two CTAs an SM, 0.76x non-causal, 0.78x causal.)
template <int kD>
struct Tile {
    static constexpr int kWarps = kD <= 128 ? 4 : 8;
    static constexpr int kBr = 128;
    static constexpr int kBc = 64;
};

template <typename T, int kD, int kStep, bool kExactD>
void launch_causal_or_not(const Problem& p, const void* Q, const void* K, const void* V, void* O, float* LSE,
                          cudaStream_t stream) {
    using Tl = Tile<kD>;
    if (p.causal)
        launch<T, kD, Tl::kBr, Tl::kBc, Tl::kWarps, true, kStep, kExactD>(p, Q, K, V, O, LSE, stream);
    else
        launch<T, kD, Tl::kBr, Tl::kBc, Tl::kWarps, false, kStep, kExactD>(p, Q, K, V, O, LSE, stream);
}

// The steps before the final one are compiled for these head dims and fp16 only, with d == kD at compile time.
bool step_head_dim(int d) { return d == 32 || d == 64 || d == 96 || d == 128; }

// Tiles whose final kernel also has a variant for d == kD with d a compile-time constant, beside the one for any
// d <= kD: the head dims of the benchmarks (64, 128) and 256. With d known, every global address in load_tile is a
// per-thread base plus a compile-time offset again, and the column bounds fold away. Why: on an H200 the runtime-d
// kernel alone ran 4% (d = 64) and 6% (d = 128) slower than the kernel before it, which had d = kD (fp16, N = 4096,
// B = 4, hidden 2048; docs/measured/v2_head_dims_run2.log), and ptxas gives it 8 and 20 bytes of spills at d = 128
// (none before). That this variant wins the time back is not yet measured. The other tiles keep one kernel: 12 more
// instantiations, not 24.
template <int kD>
constexpr bool kExactVariant = kD == 64 || kD == 128 || kD == 256;

template <typename T, int kD>
std::string launch_step(const Problem& p, const void* Q, const void* K, const void* V, void* O, float* LSE,
                        cudaStream_t stream) {
    const int step = p.kernel == 0 ? kFinalStep : p.kernel;
    if (step == kFinalStep) {
        if constexpr (kExactVariant<kD>) {
            if (p.d == kD) {
                launch_causal_or_not<T, kD, kFinalStep, true>(p, Q, K, V, O, LSE, stream);
                return "";
            }
        }
        launch_causal_or_not<T, kD, kFinalStep, false>(p, Q, K, V, O, LSE, stream);
        return "";
    }
    if constexpr (std::is_same_v<T, __half> && kD <= 128) {
        switch (step) {
            case 1: launch_causal_or_not<T, kD, 1, true>(p, Q, K, V, O, LSE, stream); return "";
            case 2: launch_causal_or_not<T, kD, 2, true>(p, Q, K, V, O, LSE, stream); return "";
            case 3: launch_causal_or_not<T, kD, 3, true>(p, Q, K, V, O, LSE, stream); return "";
            case 4: launch_causal_or_not<T, kD, 4, true>(p, Q, K, V, O, LSE, stream); return "";
            default: break;
        }
    }
    return "v2 mma forward has no step " + std::to_string(p.kernel) + " compiled for " + dtype_name(p.dtype) +
           " at head dim " + std::to_string(p.d);
}

// The dispatch table: head dim d runs the tile v2_mma_head_dim_tile(d).
template <typename T>
std::string launch_for_head_dim(const Problem& p, const void* Q, const void* K, const void* V, void* O, float* LSE,
                                cudaStream_t stream) {
    switch (v2_mma_head_dim_tile(p.d)) {
        case 32: return launch_step<T, 32>(p, Q, K, V, O, LSE, stream);
        case 64: return launch_step<T, 64>(p, Q, K, V, O, LSE, stream);
        case 96: return launch_step<T, 96>(p, Q, K, V, O, LSE, stream);
        case 128: return launch_step<T, 128>(p, Q, K, V, O, LSE, stream);
        case 192: return launch_step<T, 192>(p, Q, K, V, O, LSE, stream);
        case 256: return launch_step<T, 256>(p, Q, K, V, O, LSE, stream);
        default: return "v2 mma forward has no tile for head dim " + std::to_string(p.d);
    }
}

}  // namespace v2_mma

int v2_mma_head_dim_tile(int d) {
    if (d < 8 || d > 256 || d % 8 != 0) return 0;
    for (int tile : {32, 64, 96, 128, 192, 256})
        if (d <= tile) return tile;
    return 0;
}

bool v2_mma_supports(const Problem& p, std::string* why) {
    const int n_steps = int(v2_forward_steps().size());
    if (p.dtype != DType::fp16 && p.dtype != DType::bf16) {
        *why = std::string("v2 mma forward needs fp16 or bf16 inputs (tensor-core operands), got ") + dtype_name(p.dtype);
        return false;
    }
    if (v2_mma_head_dim_tile(p.d) == 0) {
        *why = "v2 mma forward supports head dims that are multiples of 8 from 8 to 256, got " + std::to_string(p.d);
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
    if (p.kernel < 0 || p.kernel > n_steps) {
        *why = "v2 mma forward has steps 1.." + std::to_string(n_steps) + " (0 = the final one), got " +
               std::to_string(p.kernel);
        return false;
    }
    if (p.kernel != 0 && p.kernel != n_steps && (p.dtype != DType::fp16 || !v2_mma::step_head_dim(p.d))) {
        *why = "v2 mma forward steps before the final one are compiled for fp16 and head dims 32, 64, 96, 128 only "
               "(got " + std::string(dtype_name(p.dtype)) + ", d = " + std::to_string(p.d) + ")";
        return false;
    }
    return true;
}

std::string v2_forward_mma(const Problem& p, const void* Q, const void* K, const void* V, void* O, float* LSE,
                           cudaStream_t stream) {
    std::string why;
    if (!v2_mma_supports(p, &why)) return why;
    if (p.dtype == DType::fp16) return v2_mma::launch_for_head_dim<__half>(p, Q, K, V, O, LSE, stream);
    return v2_mma::launch_for_head_dim<__nv_bfloat16>(p, Q, K, V, O, LSE, stream);
}
