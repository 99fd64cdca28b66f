// forward_mma.cu: the FlashAttention-2 forward pass (Dao, 2023, Algorithm 1) on tensor cores.
//
// One CTA of 4 warps (8 at the 176 and 192 tiles) owns one tile Q_i of Br query rows of one (batch, head) and walks the
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
// Work split: each warp owns Br / kWarps contiguous query rows of Q_i (32 rows = two m16 tiles; 16 past d = 128), so
// the warps never exchange softmax statistics; the Q loop is the grid (one CTA per Q tile), the K/V loop is in the CTA.
//
// Data movement:
//   global -> shared  cp.async (16 bytes a thread), K_j and V_j double-buffered: the copy of tile j+1 is issued
//                     before tile j is computed, so it lands while the tensor cores work (at d = 256 one buffer
//                     each, their copies staggered: kStaggeredKV).
//   shared -> regs    ldmatrix.x4 (x2 for the 56 tile's last 8 columns); Q_i and K_j non-transposed, V_j with
//                     .trans (fragment layouts: mma.cuh).
//   S -> P            the fp32 accumulator fragment of S is exactly the A-operand fragment of P for the second
//                     mma once packed to 16 bits, so P never touches shared memory.
//
// Shared-memory layout: every tile row holds d elements plus 8 elements (16 bytes) of padding. ldmatrix reads 8 rows of
// 16 bytes per 8x8 matrix; with a row pitch of 2d + 16 bytes = an odd number of 16-byte chunks, the 8 rows start in 8
// different 16-byte slots of a 128-byte bank line, so the read is conflict-free for every head-dim tile (32, 48, 64,
// 96, 128, 176, 192, 240, 256; the 56 tile's 112-byte rows are an odd number of chunks already and take no padding).
// We pad rather than XOR-swizzle because one rule then covers every tile (a 64-byte row of d = 32 does not fit the
// usual 128-byte swizzle) and every ldmatrix address is a per-thread base plus a compile-time offset. The cost is 16
// bytes a row (6% of shared memory at d = 128). Measured without the padding (row pitch 2d bytes, 8-way conflicts):
// 3.4-3.8x slower on an H200 (d = 128, N = 16k: 330 -> 91 TFLOP/s).
//
// Causal masking is bottom-right aligned (row i sees key j iff j < causal_key_end(i)). K/V tiles entirely above the
// diagonal are never loaded (the loop stops at the last key the tile's last row sees); only tiles that straddle the
// diagonal, and the last tile when Nk is not a multiple of Bc, pay for the mask.
//
// The extensions (--kv-heads, --window, --bias, --alibi, --dropout, --seqlens; docs/extensions.md) live in a second
// instantiation of the final kernel, kExt = true, so the plain kernel (kExt = false) keeps the code it had, but for
// the K/V head it reads (grouped-query heads are an index: kv_head_of, two integer divisions a CTA). In the extension
// kernel the causal mask is the right edge of a band of keys (band_keys, tests/problem.h) that the window narrows;
// the K/V loop runs from the tile of the first key the Q tile's first row sees to the tile of the last key its last
// row sees. Their parameters travel by value in one struct, Extensions. Dropout with no extension but grouped-query
// heads (Problem::gqa_and_dropout_only) at d = 64 and 128 runs the plain kernel with dropout's mask instead
// (kDropout), without the extension kernel's other work.
#include "forward_mma.h"
#include "backward_mma.h"  // v2_backward_mma_smem_bytes, for v2_smem_refusal
#include "cuda_check.h"
#include "mma.cuh"
#include "common/blocks.cuh"
#include "common/philox.cuh"
#include "dropout.cuh"
#include "grid_order.h"
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
    static constexpr bool kLazyRescale = kStep >= 6;     // 6: m_i moves only by more than 2^8 (d = 128: kLazy)
};
constexpr int kFinalStep = 6;
// Step 6: how far (log2 domain) a tile's row max may pass m_i before m_i moves. Below it the row keeps its old m_i,
// its exponentials stay under 2^8 = 256 (finite in fp32, and in fp16 and bf16 once packed), and O_i and l_i need no
// rescale: O_i / l_i and m_i + log2 l_i are the same whichever m_i they were computed with. Only the d = 128 tile
// takes it (kLazy in the kernel): on an H200 it made d = 128 2-4% faster and d = 64 up to 13% slower (docs/v2.md).
constexpr float kRescaleSlack = 8.0f;

}  // namespace v2_mma

const std::vector<KernelStep>& v2_forward_steps() {
    static const std::vector<KernelStep> steps = {
        {"mma-smem", "mma.sync m16n8k16; fragments by plain shared loads, P written to and re-read from shared memory"},
        {"p-registers", "P stays in registers: S's accumulator fragment, packed to 16 bits, is P's A fragment"},
        {"ldmatrix", "fragments by ldmatrix.x4; tile rows padded by 16 bytes so its 8-row reads are conflict-free"},
        {"cp-async", "K_j, V_j copied with cp.async into two buffers: tile j+1 lands while tile j is computed"},
        {"exp2-epilogue", "exp2 with scale * log2 e folded into one FFMA; O_i staged in shared memory, 16-byte stores"},
        {"lazy-rescale", "d = 128: m_i moves only when a row max passes it by 2^8: most tiles skip O_i's rescale"},
    };
    static_assert(v2_mma::kFinalStep == 6, "one entry per step");
    return steps;
}

namespace v2_mma {

// ---------------------------------------------------------------------------------------------------------------
// Tiles in shared memory: kRows rows of kD elements, row pitch kD elements, plus 8 (16 bytes, the padding above)
// from the ldmatrix step on. The 56 tile needs no padding: its 112-byte rows put the 8 rows an ldmatrix reads at 8
// different 16-byte offsets modulo 128 bytes already (0, 112, 96, ..., 16), so they meet no bank twice.

template <int kD, int kStep>
constexpr int kPitch = Features<kStep>::kLdmatrix && kD % 16 == 0 ? kD + 8 : kD;

// At the 240 and 256 tiles (final step only) K_j and V_j have one buffer each and their copies are staggered, as in
// FlashAttention-2: K_{j+1} is copied once every warp is done with S = Q_i K_j^T and lands during the softmax and
// P V_j; V_{j+1} is copied once every warp is done with P V_j and lands during the next S. Half the shared memory of
// two buffers each, so that two CTAs fit on an SM (Tile below says why that matters there).
template <int kD, int kStep>
constexpr bool kStaggeredKV = Features<kStep>::kCpAsync && kD >= 240;

// Buffers each of K_j and V_j: two from cp.async on (tile j+1 lands in one while tile j is read from the other), one
// before it and with the staggered copies.
template <int kD, int kStep>
constexpr int kKVBuffers = Features<kStep>::kCpAsync && !kStaggeredKV<kD, kStep> ? 2 : 1;

template <int kBr, int kBc, int kD, int kStep>
constexpr int smem_bytes() {
    constexpr int kPBytes = Features<kStep>::kPInRegisters ? 0 : kBr * kBc * 2;
    return (kBr + 2 * kKVBuffers<kD, kStep> * kBc) * kPitch<kD, kStep> * 2 + kPBytes;  // Q_i, K_j and V_j, P
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

// Copies rows [row0, row0 + kRows) of an [N, d] matrix whose rows lie ld elements apart (d, or H * d for the rows of
// one head of a packed batch [T, H, d]) into a shared tile of kD columns and row pitch kPitchBytes (d <= kD, a
// multiple of 8); rows >= N and columns >= d become zeros (nothing past row N or column d is read). A zero-filled
// chunk reads nothing, but its copy still takes an address: in a real row, the row's last real chunk, a sector that
// row's copy reads anyway, so the zero-fills bring no sector of their own (pointed at the tile's first row, they made
// d = 208 and 224 take 5% longer; docs/v2.md, "Where a zero-filled chunk points").
// Thread x copies the 16-byte chunk x % kSlots of rows x / kSlots + i * kRowsPerPass, so that every shared address
// below is a per-thread base plus a compile-time offset. kSlots is a row's kD / 8 chunks, rounded up to a power of
// two where that takes no more passes: then every pass covers whole rows and the guards fold away. That holds for
// K_j and V_j at kD = 48 (8 slots, 16 rows a pass of 128 threads: 4 passes for Bc = 64 rows, as with 6 slots and 21
// rows a pass), not for Q_i there (8 passes for 128 rows against 7), nor at kD = 96 and 192, where whole rows took
// 8 passes instead of 7 and measured 1-8% slower (docs/v2.md, "Head dims 8 to 256"). kAsync: cp.async, which the
// caller commits and waits for; otherwise a load and a store per chunk.
__host__ __device__ constexpr int power_of_two_at_least(int n) {
    return n <= 1 ? 1 : 2 * power_of_two_at_least((n + 1) / 2);
}
template <int kRows, int kD, int kPitchBytes, int kThreads, bool kAsync, typename T>
__device__ __forceinline__ void load_tile(uint32_t smem_tile, const T* gmem, int row0, int N, int d, int ld) {
    constexpr int kChunksPerRow = kD / 8, kPowerOfTwo = power_of_two_at_least(kChunksPerRow);
    constexpr bool kWholeRows = ceil_div(kRows, kThreads / kPowerOfTwo) <= ceil_div(kRows, kThreads / kChunksPerRow);
    constexpr int kSlots = kWholeRows ? kPowerOfTwo : kChunksPerRow;
    constexpr int kRowsPerPass = kThreads / kSlots;
    constexpr bool kEven = kThreads % kSlots == 0 && kRows % kRowsPerPass == 0;
    const int r0 = threadIdx.x / kSlots, c = threadIdx.x % kSlots * 8;
    if (kSlots * 8 > kD && c >= kD) return;  // a slot past the tile's columns
    const int c_read = min(c, d - 8);          // the column this chunk's copy addresses (d - 8 if zero-filled)
    const T* tile = gmem + size_t(row0) * ld;  // row0 < N always, so this is a valid address for zero-fills too
#pragma unroll
    for (int i = 0; i < ceil_div(kRows, kRowsPerPass); ++i) {
        const int r = r0 + i * kRowsPerPass;
        if (!kEven && (r0 >= kRowsPerPass || r >= kRows)) continue;
        const bool real_row = r < N - row0, in_range = real_row && c < d;
        const T* src = tile + (real_row ? r * ld + c_read : 0);
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
// The extensions (kExt). Semantics: docs/conventions.md, "Extensions"; the float64 reference and the CPU model
// (v2/model.cu) compute the same numbers.

struct Extensions {
    int H, kv_heads;                // grouped-query attention: query head h reads K/V head h / (H / kv_heads)
    bool causal;                    // the kExt kernel has no kCausal: the causal mask is an edge of the band
    int window_left, window_right;  // --window L,R (-1: unbounded on that side)
    const float* bias;              // --bias: [bias_batch, bias_heads, Nq, Nk] float32 (null without)
    int bias_batch, bias_heads;
    int alibi_heads;                // --alibi: the H of the slopes (0 without)
    int head_offset;                // flattened index of head 0: dropout's and ALiBi's heads are head_offset + bh
    float dropout, keep_scale;      // --dropout p (0 without) and dropout_scale(p), 1 / (1 - p) with p rounded to k/256
    uint32_t keep_threshold;        // dropout_threshold(p): a weight is kept when its byte is >= this (philox.cuh)
    DropoutKeys dropout_keys;       // the generator's round keys, from --seed (philox.cuh: read from constant memory)
    const int* cu_seqlens_q;        // --seqlens: sequence b is tokens cu_seqlens_q[b] .. cu_seqlens_q[b + 1] - 1
    const int* cu_seqlens_k;        //   of Q (of K); null without
    int tokens_q;                   //   Tq: the packed LSE is [H, Tq]
};

Extensions extensions(const Problem& p, const ForwardArgs& a) {
    return {p.H, p.kv_heads(), p.causal, p.window_left, p.window_right, a.bias, p.bias_batch, p.bias_heads,
            p.alibi ? p.alibi_heads() : 0, p.head_offset, p.dropout, float(dropout_scale(p.dropout)),
            dropout_threshold(p.dropout), dropout_keys(p.dropout_seed),
            a.cu_seqlens_q, a.cu_seqlens_k, int(p.tokens_q())};
}

// Where one head of one batch entry (or sequence) lives: the offsets of row 0 of its Q and O, of its K and V, and of
// its LSE; the elements from one row of Q (O) and of K (V) to the next; its lengths.
struct HeadSlice {
    size_t q, kv, lse;
    int q_stride, kv_stride;
    int Nq, Nk;
};
__device__ __forceinline__ HeadSlice head_slice(const Extensions& x, size_t bh, int Nq, int Nk, int d) {
    const size_t bkv = kv_head_of(bh, x.H, x.kv_heads);  // b * Hk + hk
    if (x.cu_seqlens_q == nullptr)                      // Q, O [B, H, Nq, d]; K, V [B, Hk, Nk, d]; LSE [B, H, Nq]
        return {bh * Nq * d, bkv * Nk * d, bh * Nq, d, d, Nq, Nk};
    // A packed batch: sequence b's tokens t of Q, O [Tq, H, d] and K, V [Tk, Hk, d]; LSE [H, Tq].
    const int b = int(bh / x.H), h = int(bh % x.H), hk = int(bkv % x.kv_heads);
    const int q_start = x.cu_seqlens_q[b], k_start = x.cu_seqlens_k[b];
    return {(size_t(q_start) * x.H + h) * d, (size_t(k_start) * x.kv_heads + hk) * d, size_t(h) * x.tokens_q + q_start,
            x.H * d, x.kv_heads * d, x.cu_seqlens_q[b + 1] - q_start, x.cu_seqlens_k[b + 1] - k_start};
}

// Fragment coordinates of accumulator element e of m tile mt, n tile nt (mma.cuh): row g (e < 2) or g + 8, key
// column 2t + e % 2 of the n8 tile.
__device__ __forceinline__ int frag_row(int mt, int e, int g) { return mt * 16 + g + e / 2 * 8; }
__device__ __forceinline__ int frag_col(int nt, int e, int t) { return nt * 8 + 2 * t + e % 2; }

// --bias and --alibi: S <- S * scale_exp + log2 e * (bias_ij + alibi_ij) for one tile of this warp's scores (rows
// from row0, keys from key0): the bias enters the scaled score, and the kernel's scores are in the log2 domain. Rows
// past Nq and keys past Nk read no bias (they are masked, or never stored). `bias` is this head's [Nq, Nk] slice.
template <int kMTiles, int kNTiles>
__device__ __forceinline__ void add_score_bias(float (&S)[kMTiles][kNTiles][4], const float* bias, float slope,
                                               bool alibi, float scale_exp, int row0, int key0, int Nq, int Nk, int g,
                                               int t) {
    constexpr float kLog2e = 1.4426950408889634f;
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
        for (int nt = 0; nt < kNTiles; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int i = row0 + frag_row(mt, e, g), j = key0 + frag_col(nt, e, t);
                float b = bias != nullptr && i < Nq && j < Nk ? bias[size_t(i) * Nk + j] : 0.0f;
                if (alibi) b += alibi_bias(slope, i, j, Nq, Nk);
                S[mt][nt][e] = fmaf(S[mt][nt][e], scale_exp, kLog2e * b);
            }
}

// The band of keys (band_keys: the window, the causal edge, Nk): scores of keys outside row i's band become -inf.
template <int kMTiles, int kNTiles>
__device__ __forceinline__ void mask_outside_band(float (&S)[kMTiles][kNTiles][4], const Extensions& x, int row0,
                                                  int key0, int Nq, int Nk, int g, int t) {
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
        for (int e = 0; e < 4; e += 2) {  // one row per pair of elements
            const int i = row0 + frag_row(mt, e, g);
            const KeyRange band = band_keys(i, Nq, Nk, x.causal, x.window_left, x.window_right);
#pragma unroll
            for (int nt = 0; nt < kNTiles; ++nt)
#pragma unroll
                for (int c = 0; c < 2; ++c) {
                    const int j = key0 + frag_col(nt, e + c, t);
                    if (j < band.begin || j >= band.end) S[mt][nt][e + c] = -INFINITY;
                }
        }
}

// ---------------------------------------------------------------------------------------------------------------
// The kernel. Grid: ceil(Nq / Br) Q tiles x B * H heads (causal: ordered by `order`, GridOrder). Block: kWarps warps
// (4, or 8 at the 176 and 192 tiles: see Tile below), 8 warps an SM either way (2 CTAs of 4 or 1 of 8), which lets each
// thread have up to 255 registers. scale_exp is scale * log2 e from the exp2 step on, the softmax scale before it. d is
// the head dim in device memory, kD the tile's (d <= kD): columns d..kD-1 of the shared tiles are zeros, so they add
// nothing to S and give O_i columns that are never stored. kExactD: d == kD, known at compile time (see kExactVariant
// below). kExt: the extensions, read from x (the plain kernel reads only H and kv_heads, for the K/V head); then the
// grid's Nq is the longest sequence's and kCausal is false. kDropout: dropout (with grouped-query heads or not:
// Problem::gqa_and_dropout_only), in the plain kernel: its mask and factor from x, nothing else.

template <typename T, int kD, int kBr, int kBc, int kWarps, bool kCausal, int kStep, bool kExactD, bool kExt,
          bool kDropout = false>
__global__ void __launch_bounds__(kWarps * 32, 8 / kWarps)
    flash_forward_kernel(const T* __restrict__ Q, const T* __restrict__ K, const T* __restrict__ V,
                         T* __restrict__ O, float* __restrict__ LSE, int problem_Nq, int problem_Nk, int head_dim,
                         float scale_exp, const Extensions x, GridOrder order) {
    using F = Features<kStep>;
    static_assert(!kExt || (kStep == kFinalStep && !kCausal), "the extensions are in the final kernel, causal in x");
    static_assert(!kDropout || (kStep == kFinalStep && !kExt), "kDropout: the final plain kernel");
    static_assert(!(kExt || kDropout) || (Features<kStep>::kPInRegisters && kBc % 32 == 0),
                  "dropout's mask is applied to P in registers, 32 keys at a time");
    const int d = kExactD ? kD : head_dim;
    constexpr int kThreads = kWarps * 32;
    constexpr int kWarpRows = kBr / kWarps;   // query rows per warp
    constexpr int kMTiles = kWarpRows / 16;   // m16 tiles per warp
    constexpr int kNTiles = kBc / 8;          // n8 tiles of S = Q_i K_j^T
    constexpr int kDTiles = kD / 8;           // n8 tiles of O_i
    constexpr bool kLazy = F::kLazyRescale && kD == 128;  // step 6's lazy rescale, at the d = 128 tile only
    constexpr int kPitchBytes = kPitch<kD, kStep> * 2;
    constexpr int kPPitchBytes = kBc * 2;     // step 1: P in shared memory, [Br][Bc] after the V buffer
    using Frag = Fragments<F::kLdmatrix, kPitchBytes>;
    static_assert(kWarpRows % 16 == 0 && kBc % 16 == 0 && kD % 8 == 0, "tiles are whole mma fragments");
    static_assert(kD % 16 == 0 || (F::kLdmatrix && kStep == kFinalStep && kBc % 32 == 0),
                  "a k8 step (the 56 tile): final step, keys in fours of n8 tiles");
    static_assert(sizeof(T) == 2, "16-bit operands");

    extern __shared__ __align__(16) unsigned char smem[];
    constexpr uint32_t kKVTileBytes = kBc * kPitchBytes;
    constexpr bool kStaggered = kStaggeredKV<kD, kStep>;
    constexpr int kBuffers = kKVBuffers<kD, kStep>;
    constexpr bool kDoubleBuffer = kBuffers == 2;
    const uint32_t sQ = shared_addr(smem);
    const uint32_t sK = sQ + kBr * kPitchBytes;         // kBuffers buffers of kBc rows
    const uint32_t sV = sK + kBuffers * kKVTileBytes;   // kBuffers buffers of kBc rows

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int g = lane / 4, t = lane % 4;  // fragment coordinates (see mma.cuh)

    // line 3: the grid walks the Q tiles, (tiles, heads). Causal (and a band of keys, kExt): the last Q tiles see the
    // most keys; launching them first shortens the tail of the grid. Causal, the grid is (chunk, tiles, chunks): the
    // heads in chunks, each chunk tile-major (GridOrder, v2/grid_order.h), so every head's heavy tiles start first.
    int tile = blockIdx.x, tiles = gridDim.x;
    size_t bh = blockIdx.y;
    if constexpr (kCausal) {
        const int head = order.head(blockIdx.x, blockIdx.z);
        if (head < 0) return;  // the first chunk's unused blocks
        tile = blockIdx.y, tiles = gridDim.y, bh = size_t(head);
    }
    if constexpr (kExt) {  // a bias broadcast over the batch: its sharers side by side (bias_sharing_order)
        if (x.bias != nullptr && x.bias_batch == 1) {
            const int heads = gridDim.y, sharing = x.bias_heads == 1 ? heads : heads / x.H;
            const TileOfHead o = bias_sharing_order(blockIdx.y * tiles + blockIdx.x, tiles, heads, sharing);
            tile = o.tile, bh = size_t(o.head);
        }
    }
    const int q_tile = kCausal || kExt ? tiles - 1 - tile : tile;
    const int q0 = q_tile * kBr;
    int Nq = problem_Nq, Nk = problem_Nk;
    const T *Q_i, *K_bh, *V_bh;  // this Q tile, and this head's K and V: rows ld_q and ld_kv elements apart
    T* O_out;
    float* LSE_i;
    int ld_q = d, ld_kv = d;
    // The K/V tiles j = tile_begin .. tile_end - 1 this Q tile visits: all of them, or (causal) up to the last key its
    // last real row sees; kExt: from the first key its first row sees to the last its last row sees (the band).
    int tile_begin = 0, tile_end;
    if constexpr (kExt) {
        const HeadSlice slice = head_slice(x, bh, problem_Nq, problem_Nk, d);
        Nq = slice.Nq, Nk = slice.Nk;
        if (q0 >= Nq) return;  // a packed batch: the grid covers the longest sequence
        Q_i = Q + slice.q + size_t(q0) * slice.q_stride;
        O_out = O + slice.q + size_t(q0) * slice.q_stride;
        K_bh = K + slice.kv;
        V_bh = V + slice.kv;
        LSE_i = LSE + slice.lse + q0;
        ld_q = slice.q_stride, ld_kv = slice.kv_stride;
        const int first = band_keys(q0, Nq, Nk, x.causal, x.window_left, x.window_right).begin;
        const int last_end = band_keys(min(q0 + kBr, Nq) - 1, Nq, Nk, x.causal, x.window_left, x.window_right).end;
        tile_begin = first / kBc;
        tile_end = last_end > first ? ceil_div(last_end, kBc) : tile_begin;
    } else {
        Q_i = Q + (bh * Nq + q0) * d;
        O_out = O + (bh * Nq + q0) * d;
        const size_t bkv = kv_head_of(bh, x.H, x.kv_heads);  // grouped-query heads: the K/V head of query head bh
        K_bh = K + bkv * Nk * d;
        V_bh = V + bkv * Nk * d;
        LSE_i = LSE + bh * Nq + q0;
        const int q_end = min(q0 + kBr, Nq);
        const int kv_end = kCausal ? min(Nk, causal_key_end(q_end - 1, Nq, Nk)) : Nk;
        tile_end = kv_end > 0 ? ceil_div(kv_end, kBc) : 0;
    }

    // line 4 (line 7: K_j, V_j of the first tile)
    load_tile<kBr, kD, kPitchBytes, kThreads, F::kCpAsync>(sQ, Q_i, 0, Nq - q0, d, ld_q);
    if constexpr (F::kCpAsync) {
        const bool any = tile_end > tile_begin;
        if (any) load_tile<kBc, kD, kPitchBytes, kThreads, true>(sK, K_bh, tile_begin * kBc, Nk, d, ld_kv);
        if constexpr (kStaggered) cp_async_commit();  // Q_i and K_j first, V_j in a group of its own
        if (any) load_tile<kBc, kD, kPitchBytes, kThreads, true>(sV, V_bh, tile_begin * kBc, Nk, d, ld_kv);
        cp_async_commit();
    }

    // Per-lane fragment addresses (Fragments above); the loops below add compile-time offsets.
    //   Q (A operand), K (B operand of S, stored [key][d]), V (B operand of O, stored [key][d], read transposed)
    const int warp_row0 = warp * kWarpRows;
    const uint32_t q_addr = sQ + warp_row0 * kPitchBytes + Frag::a_lane(lane);
    const uint32_t k_addr = sK + Frag::b_lane(lane);
    const uint32_t k_rows_addr = sK + lane * kPitchBytes;  // the 56 tile's k8 step: key row `lane`
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

    // kExt: what the extensions hold for the whole CTA. The keys every row of this warp sees (the band of its last
    // row starts latest, that of its first row ends earliest): a tile inside them needs no mask. Bias and ALiBi are
    // added to the scores before the softmax, so S then holds the log2-domain scores and is scaled by 1 below.
    const int warp_rows_begin = q0 + warp_row0;
    KeyRange warp_keys = {0, 0};
    const float* bias = nullptr;
    float slope = 0.0f;
    bool score_bias = false;
    if constexpr (kExt) {
        warp_keys = {band_keys(warp_rows_begin + kWarpRows - 1, Nq, Nk, x.causal, x.window_left, x.window_right).begin,
                     band_keys(warp_rows_begin, Nq, Nk, x.causal, x.window_left, x.window_right).end};
        if (x.bias) bias = x.bias + bias_head_offset(bh, x.H, x.bias_batch, x.bias_heads, Nq, Nk);
        if (x.alibi_heads > 0) slope = alibi_slope(int((x.head_offset + bh) % x.alibi_heads), x.alibi_heads);
        score_bias = x.bias != nullptr || x.alibi_heads > 0;
    }
    const float s_scale = score_bias ? 1.0f : scale_exp;  // what turns S into log2-domain scores

    for (int j = tile_begin; j < tile_end; ++j) {  // line 6
        if constexpr (kStaggered) {
            // line 7: the groups in flight are K_j's, then V_j's (the last two committed); wait for K_j's alone.
            cp_async_wait<1>();
        } else if constexpr (F::kCpAsync) {  // line 7, one tile ahead
            // Prefetch K_{j+1}, V_{j+1} into the other buffer (freed by the barrier at the end of iteration j-1).
            // The group is committed even when empty so that "wait until one group is pending" always means tile j.
            if (j + 1 < tile_end) {
                const uint32_t next = (j + 1 - tile_begin) % 2 * kKVTileBytes;
                load_tile<kBc, kD, kPitchBytes, kThreads, true>(sK + next, K_bh, (j + 1) * kBc, Nk, d, ld_kv);
                load_tile<kBc, kD, kPitchBytes, kThreads, true>(sV + next, V_bh, (j + 1) * kBc, Nk, d, ld_kv);
            }
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            // line 7. One buffer: the CTA waits for tile j's loads before any mma (the barrier at the end of iteration
            // j-1 made the buffer free).
            load_tile<kBc, kD, kPitchBytes, kThreads, false>(sK, K_bh, j * kBc, Nk, d, ld_kv);
            load_tile<kBc, kD, kPitchBytes, kThreads, false>(sV, V_bh, j * kBc, Nk, d, ld_kv);
        }
        __syncthreads();
        const uint32_t buffer = kDoubleBuffer ? (j - tile_begin) % 2 * kKVTileBytes : 0;  // the two buffers alternate
        const uint32_t K_j = k_addr + buffer, V_j = v_addr + buffer;

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
        // The 56 tile: its last 8 columns are one k8 step (m16n8k8), not a k16 step whose upper half is zeros. The A
        // fragment is ldmatrix x2 (lanes 0-15 of a_lane address rows 0-15 of column 0); one ldmatrix x4 gives b0 of
        // four n8 tiles, lane l addressing key row l of the four.
        if constexpr (kD % 16 != 0) {
            constexpr int kCol = kD / 16 * 32;  // bytes: the k8 step's first column
            uint32_t a[kMTiles][2];
#pragma unroll
            for (int mt = 0; mt < kMTiles; ++mt) ldmatrix_x2(a[mt], q_addr + mt * 16 * kPitchBytes + kCol);
#pragma unroll
            for (int nq = 0; nq < kNTiles / 4; ++nq) {
                uint32_t b[4];
                ldmatrix_x4(b, k_rows_addr + buffer + nq * 32 * kPitchBytes + kCol);
#pragma unroll
                for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
                    for (int i = 0; i < 4; ++i) mma_m16n8k8<T>(S[mt][4 * nq + i], a[mt], b[i]);
            }
        }
        if constexpr (kStaggered) {  // K_j's buffer is free once every warp has its S: K_{j+1} goes there
            __syncthreads();
            if (j + 1 < tile_end)
                load_tile<kBc, kD, kPitchBytes, kThreads, true>(sK, K_bh, (j + 1) * kBc, Nk, d, ld_kv);
            cp_async_commit();  // even when empty: the wait below and the next tile's count on two groups
        }

        // Mask keys past Nk (last tile) and, causal, keys right of the diagonal. Warp-uniform branch: only tiles
        // that reach past Nk or past the first key this warp's first row may not see take it. kExt: bias and ALiBi
        // first, then the band's mask, only in tiles that reach outside the keys every row of the warp sees.
        const int key0 = j * kBc;
        if constexpr (kExt) {
            if (score_bias)
                add_score_bias(S, bias, slope, x.alibi_heads > 0, scale_exp, warp_rows_begin, key0, Nq, Nk, g, t);
            if (key0 < warp_keys.begin || key0 + kBc > warp_keys.end)
                mask_outside_band(S, x, warp_rows_begin, key0, Nq, Nk, g, t);
        } else if (key0 + kBc > Nk || (kCausal && key0 + kBc > causal_key_end(q0 + warp_row0, Nq, Nk))) {
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
        float row_max[kMTiles][2];  // h = 0: row g, h = 1: row g + 8 (accumulator elements 2h, 2h+1)
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                float mx = -INFINITY;
#pragma unroll
                for (int nt = 0; nt < kNTiles; ++nt) mx = fmaxf(mx, fmaxf(S[mt][nt][2 * h], S[mt][nt][2 * h + 1]));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
                row_max[mt][h] = mx * s_scale;
            }
        // Step 6: m_i moves only when some row of the warp passes it by more than kRescaleSlack; then every row of
        // the warp takes its exact max (one warp-uniform choice). Otherwise O_i and l_i keep their scale: the
        // kDTiles * 2 multiplies a row below are skipped. (-inf > -inf + slack is false: a row that has seen only
        // masked keys stays at -inf until it sees one.)
        bool move = true;
        if constexpr (kLazy) {
            bool passes = false;
#pragma unroll
            for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
                for (int h = 0; h < 2; ++h) passes |= row_max[mt][h] > m_i[mt][h] + kRescaleSlack;
            move = __any_sync(0xffffffffu, passes);
        }
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                if (move) {
                    const float m_new = fmaxf(m_i[mt][h], row_max[mt][h]);
                    // A row that has seen only masked keys keeps m = -inf; -inf - -inf would give NaN, so such a
                    // row's alpha uses 0 as the base (and its exponentials below are of -inf, i.e. 0).
                    const float alpha = softmax_exp<F::kExp2>(m_i[mt][h] - (m_new == -INFINITY ? 0.0f : m_new));
                    m_i[mt][h] = m_new;
                    l_i[mt][h] *= alpha;
#pragma unroll
                    for (int dt = 0; dt < kDTiles; ++dt) {
                        O_i[mt][dt][2 * h] *= alpha;
                        O_i[mt][dt][2 * h + 1] *= alpha;
                    }
                }
                const float base = m_i[mt][h] == -INFINITY ? 0.0f : m_i[mt][h];
#pragma unroll
                for (int nt = 0; nt < kNTiles; ++nt) {
#pragma unroll
                    for (int e = 2 * h; e < 2 * h + 2; ++e) {
                        S[mt][nt][e] = softmax_exp<F::kExp2>(fmaf(S[mt][nt][e], s_scale, -base));  // S holds P
                        l_i[mt][h] += S[mt][nt][e];
                    }
                }
            }
        }

        // Step 1: P goes to this warp's own rows of a shared [Br][Bc] tile and comes back as A fragments.
        if constexpr (!F::kPInRegisters) {
            const uint32_t sP = sV + kBuffers * kKVTileBytes;
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

        if constexpr (kStaggered) {  // V_j: the older of the two groups in flight (V_j, K_{j+1})
            cp_async_wait<1>();
            __syncthreads();
        }
        // line 10: O_i += P V_j. From step 2 on, the A fragment of P for keys 16kk..16kk+15 is the accumulators of S's
        // n8 tiles 2kk and 2kk+1, packed in pairs: (row g, keys 2t, 2t+1), (row g+8, ...), (row g, keys 2t+8, +9), ...
        uint32_t keep[kMTiles][2][4];  // kExt or kDropout, --dropout: the mask of two k steps (dropout_keep_p32)
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
                    // --dropout: l_i has summed the undropped P (the softmax's normaliser); O_i sums only the kept
                    // weights. Their factor 1 / (1 - p) waits for the epilogue. kDropout has p > 0: no branch, so
                    // that ptxas can interleave the generator calls of the tile (each is a chain of 7 rounds).
                    if constexpr (kExt || kDropout) {
                        if (kDropout || x.dropout > 0.0f) {
                            if (kk % 2 == 0)
                                dropout_keep_p32(keep[mt], x.dropout_keys, x.keep_threshold,
                                                 uint32_t(x.head_offset + bh), warp_rows_begin + mt * 16 + g,
                                                 j * kBc + 16 * kk, t);
#pragma unroll
                            for (int r = 0; r < 4; ++r) p[mt][r] &= keep[mt][kk % 2][r];
                        }
                    }
                } else {
                    using PFrag = Fragments<false, kPPitchBytes>;
                    const uint32_t sP = sV + kBuffers * kKVTileBytes;
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
            if constexpr (kDTiles % 2 != 0) {  // the 56 tile's seventh n8 tile: ldmatrix x2 (lanes 0-15 of bt_lane)
                uint32_t b[2];
                ldmatrix_x2_trans(b, V_j + kk * 16 * kPitchBytes + (kDTiles - 1) * 16);
#pragma unroll
                for (int mt = 0; mt < kMTiles; ++mt) mma_m16n8k16<T>(O_i[mt][kDTiles - 1], p[mt], b[0], b[1]);
            }
        }
        __syncthreads();  // everyone is done with the K/V buffer of tile j before it is refilled
        if constexpr (kStaggered) {
            if (j + 1 < tile_end)
                load_tile<kBc, kD, kPitchBytes, kThreads, true>(sV, V_bh, (j + 1) * kBc, Nk, d, ld_kv);
            cp_async_commit();
        }
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
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            float l = l_i[mt][h];
            l += __shfl_xor_sync(0xffffffffu, l, 1);
            l += __shfl_xor_sync(0xffffffffu, l, 2);
            // l = 0 exactly when the row saw no key (otherwise its max element contributed exp(0) = 1). kExt,
            // kDropout: the weights dropout kept are scaled by 1 / (1 - p) here, once (keep_scale is 1 without it).
            const float inv_l = (l > 0.0f ? 1.0f / l : 0.0f) * (kExt || kDropout ? x.keep_scale : 1.0f);
            const int r = warp_row0 + mt * 16 + g + h * 8;
#pragma unroll
            for (int dt = 0; dt < kDTiles; ++dt) {
                const uint32_t pair = pack2<T>(O_i[mt][dt][2 * h] * inv_l, O_i[mt][dt][2 * h + 1] * inv_l);
                if constexpr (F::kStagedEpilogue)
                    *reinterpret_cast<uint32_t*>(&sO[r * kPitch<kD, kStep> + dt * 8 + 2 * t]) = pair;
                else if (q0 + r < Nq && dt * 8 < d)
                    *reinterpret_cast<uint32_t*>(&O_out[size_t(r) * ld_q + dt * 8 + 2 * t]) = pair;
            }
            // LSE in natural log, as tests/problem.h wants (m_i is in log2 units from the exp2 step on).
            const float lse = F::kExp2 ? (m_i[mt][h] + log2f(l)) * 0.69314718055994531f : m_i[mt][h] + logf(l);
            if (t == 0 && q0 + r < Nq) LSE_i[r] = l > 0.0f ? lse : -INFINITY;
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
                *reinterpret_cast<uint4*>(&O_out[size_t(r) * ld_q + c]) =
                    *reinterpret_cast<const uint4*>(&sO[r * kPitch<kD, kStep> + c]);
        }
    }
}

template <typename T, int kD, int kBr, int kBc, int kWarps, bool kCausal, int kStep, bool kExactD, bool kExt,
          bool kDropout = false>
void launch(const Problem& p, const ForwardArgs& a, cudaStream_t stream) {
    auto kernel = flash_forward_kernel<T, kD, kBr, kBc, kWarps, kCausal, kStep, kExactD, kExt, kDropout>;
    constexpr int kSmem = smem_bytes<kBr, kBc, kD, kStep>();
    // Once per instantiation, at its first launch: later (timed) launches do no host work but the launch itself.
    static const cudaError_t attribute_set =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem);
    CUDA_CHECK(attribute_set);
    // lines 1-2: Q, O, LSE cut into Q tiles (a packed batch: Nq is the longest sequence's), K, V into K/V tiles (the
    // kernel's loop). The grid: (tiles, heads); causal, the heads in chunks (GridOrder; per_sm * SMs blocks are
    // resident at once, asked once per instantiation).
    const int tiles = ceil_div(p.Nq, kBr), heads = p.B * p.H;
    OrderedGrid g{GridOrder{}, dim3(unsigned(tiles), unsigned(heads))};
    if constexpr (kCausal) {
        static const int per_sm = [&] {
            int n = 0;
            CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, kWarps * 32, kSmem));
            return n;
        }();
        g = ordered_grid(tiles, heads, heavy_first_chunk(tiles, heads, per_sm * device_sm_count()));
    }
    const float scale = p.resolved_scale();
    const float scale_exp = Features<kStep>::kExp2 ? scale * 1.4426950408889634f : scale;
    kernel<<<g.grid, kWarps * 32, kSmem, stream>>>(static_cast<const T*>(a.q), static_cast<const T*>(a.k),
                                                   static_cast<const T*>(a.v), static_cast<T*>(a.o), a.lse, p.Nq,
                                                   p.Nk, p.d, scale_exp, extensions(p, a), g.order);
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
// ~5% run-to-run spread of one kernel timed twice). Head dims 32, 48 and 96 (not timed) take the same shape. The 48
// tile is for d = 40 and 48 (d = 40: Stable Diffusion's first UNet level): in the 64 tile d = 40 did a quarter more
// mma than it needs and took 4.8% longer than d = 64; in the 48 tile it takes 12% less than it did there, and 9%
// less than d = 64 (H100, docs/v2.md, "The 48 tile").
// Past 128 the accumulator O_i alone is kD / 2 registers a thread per m16 tile (128 at kD = 256), so a warp takes 16
// rows. The 192 tile has 8 warps, Br = 128, Bc = 64 and double buffers, (128 + 2 * 2 * 64) rows * 400 bytes =
// 150 KiB, one CTA an SM, as FlashAttention-2 at d = 192. The 256 tile has 4 warps, Br = 64, Bc = 64 and one buffer
// each for K_j and V_j (kStaggeredKV): (64 + 2 * 64) rows * 528 bytes = 99 KiB, two CTAs an SM, as FlashAttention-2
// runs d = 256 on an H100. Two CTAs reach their barriers at different times, so one's tensor cores run while the
// other waits for a copy or does its softmax. d = 256 against FlashAttention-2 (fp16): 4 warps, Br = 64, Bc = 32,
// double buffers, two CTAs, 0.76x non-causal, 0.78x causal (H200, N = 4096); 8 warps as the 192 tile (198 KiB, one
// CTA), 0.85-0.86x non-causal, 0.81-0.96x causal (H100, N = 1k..16k); the layout here 0.93-1.12x (H200, N = 1k..16k;
// docs/v2.md, "Head dims 8 to 256"). The 192 tile with the 256 tile's layout ran 9-15% slower (d = 160; 192 causal).
// The 176 and 240 tiles have the shapes of the 192 and 256 tiles, for the head dims just below those (d = 136-176 and
// 200-240): 16 zero columns fewer in every product. The 56 tile has the 64 tile's shape, for d = 56: in the 64 tile
// it took 5% longer than d = 64 (docs/v2.md, "The 56 tile"); here S = Q_i K_j^T ends on one k8 step (m16n8k8) and
// O_i has 7 n8 tiles, an eighth fewer mma in both products than d = 64.
template <int kD>
struct Tile {
    static constexpr int kWarps = kD == 176 || kD == 192 ? 8 : 4;
    static constexpr int kBr = kD >= 240 ? 64 : 128;
    static constexpr int kBc = 64;
};

// The final step has a third kernel per tile, with the extensions (causal among them, as the band's edge), and at
// d = 64 and 128 (d known) two more for dropout with no other extension but grouped-query heads, causal or not: the
// plain kernel with dropout's mask, which saves the extension kernel's general cost (1.10x the plain kernel at d = 64,
// docs/extensions.md). Grouped-query heads alone run the plain kernel.
template <typename T, int kD, int kStep, bool kExactD>
void launch_causal_or_not(const Problem& p, const ForwardArgs& a, cudaStream_t stream) {
    using Tl = Tile<kD>;
    if constexpr (kStep == kFinalStep) {
        if constexpr (kExactD && (kD == 64 || kD == 128)) {
            if (p.dropout > 0.0f && p.gqa_and_dropout_only()) {
                if (p.causal)
                    launch<T, kD, Tl::kBr, Tl::kBc, Tl::kWarps, true, kStep, true, false, true>(p, a, stream);
                else
                    launch<T, kD, Tl::kBr, Tl::kBc, Tl::kWarps, false, kStep, true, false, true>(p, a, stream);
                return;
            }
        }
        if (p.dropout > 0.0f || !p.gqa_and_dropout_only()) {
            launch<T, kD, Tl::kBr, Tl::kBc, Tl::kWarps, false, kStep, kExactD, true>(p, a, stream);
            return;
        }
    }
    if (p.causal)
        launch<T, kD, Tl::kBr, Tl::kBc, Tl::kWarps, true, kStep, kExactD, false>(p, a, stream);
    else
        launch<T, kD, Tl::kBr, Tl::kBc, Tl::kWarps, false, kStep, kExactD, false>(p, a, stream);
}

// The steps before the final one are compiled for these head dims and fp16 only, with d == kD at compile time.
constexpr bool step_head_dim(int d) { return d == 32 || d == 64 || d == 96 || d == 128; }

// Tiles whose final kernel also has a variant for d == kD with d a compile-time constant, beside the one for any
// d <= kD: the head dims of the benchmarks (64, 128) and 256. With d known, every global address in load_tile is a
// per-thread base plus a compile-time offset again, and the column bounds fold away. Why: on an H200 the runtime-d
// kernel alone ran 4% (d = 64) and 6% (d = 128) slower than the kernel before it, which had d = kD (fp16, N = 4096,
// B = 4, hidden 2048; docs/measured/v2_head_dims_run2.log), and ptxas gives it 8 and 20 bytes of spills at d = 128
// (none before). The gap is still there for the d that run the runtime-d kernel of these tiles: d = 112 took 4% more
// than 128, and since load_tile's zero-fill address 0.6% (H100, docs/v2.md, "Every head dim against its tile",
// "Where a zero-filled chunk points"). The other tiles keep one kernel: 12 more instantiations, not 24. The 56 tile
// holds one head dim (48 has a tile of its own), so its kernels are the ones with d known (kExactOnly).
template <int kD>
constexpr bool kExactVariant = kD == 64 || kD == 128 || kD == 256;
template <int kD>
constexpr bool kExactOnly = kD == 56;

template <typename T, int kD>
std::string launch_step(const Problem& p, const ForwardArgs& a, cudaStream_t stream) {
    const int step = p.kernel == 0 ? kFinalStep : p.kernel;
    if (step == kFinalStep) {
        if constexpr (kExactOnly<kD>) {
            launch_causal_or_not<T, kD, kFinalStep, true>(p, a, stream);
        } else {
            if constexpr (kExactVariant<kD>) {
                if (p.d == kD) {
                    launch_causal_or_not<T, kD, kFinalStep, true>(p, a, stream);
                    return "";
                }
            }
            launch_causal_or_not<T, kD, kFinalStep, false>(p, a, stream);
        }
        return "";
    }
    if constexpr (std::is_same_v<T, __half> && step_head_dim(kD)) {
        switch (step) {
            case 1: launch_causal_or_not<T, kD, 1, true>(p, a, stream); return "";
            case 2: launch_causal_or_not<T, kD, 2, true>(p, a, stream); return "";
            case 3: launch_causal_or_not<T, kD, 3, true>(p, a, stream); return "";
            case 4: launch_causal_or_not<T, kD, 4, true>(p, a, stream); return "";
            case 5: launch_causal_or_not<T, kD, 5, true>(p, a, stream); return "";
            default: break;
        }
    }
    return "v2 mma forward has no step " + std::to_string(p.kernel) + " compiled for " + dtype_name(p.dtype) +
           " at head dim " + std::to_string(p.d);
}

// The dispatch table: head dim d runs the tile kD = v2_mma_head_dim_tile(d), as run.template operator()<kD>() (the
// launch and the shared-memory size below both go through it, so the tiles are listed here once); none() for any
// other d.
template <typename Run, typename None>
auto with_head_dim_tile(int d, Run&& run, None&& none) -> decltype(none()) {
    switch (v2_mma_head_dim_tile(d)) {
        case 32: return run.template operator()<32>();
        case 48: return run.template operator()<48>();
        case 56: return run.template operator()<56>();
        case 64: return run.template operator()<64>();
        case 96: return run.template operator()<96>();
        case 128: return run.template operator()<128>();
        case 176: return run.template operator()<176>();
        case 192: return run.template operator()<192>();
        case 240: return run.template operator()<240>();
        case 256: return run.template operator()<256>();
        default: return none();
    }
}

template <typename T>
std::string launch_for_head_dim(const Problem& p, const ForwardArgs& a, cudaStream_t stream) {
    return with_head_dim_tile(
        p.d, [&]<int kD>() { return launch_step<T, kD>(p, a, stream); },
        [&] { return "v2 mma forward has no tile for head dim " + std::to_string(p.d); });
}

}  // namespace v2_mma

int v2_mma_head_dim_tile(int d) {
    if (d < 8 || d > 256 || d % 8 != 0) return 0;
    for (int tile : {32, 48, 56, 64, 96, 128, 176, 192, 240, 256})
        if (d <= tile) return tile;
    return 0;
}

namespace {
template <int kD>
size_t forward_smem_bytes(int step) {
    using Tl = v2_mma::Tile<kD>;
    switch (step) {
        case 1: return v2_mma::smem_bytes<Tl::kBr, Tl::kBc, kD, 1>();
        case 2: return v2_mma::smem_bytes<Tl::kBr, Tl::kBc, kD, 2>();
        case 3: return v2_mma::smem_bytes<Tl::kBr, Tl::kBc, kD, 3>();
        case 4: return v2_mma::smem_bytes<Tl::kBr, Tl::kBc, kD, 4>();
        case 5: return v2_mma::smem_bytes<Tl::kBr, Tl::kBc, kD, 5>();
        default: return v2_mma::smem_bytes<Tl::kBr, Tl::kBc, kD, v2_mma::kFinalStep>();
    }
}
}  // namespace

size_t v2_mma_smem_bytes(const Problem& p) {
    const int step = p.kernel == 0 ? v2_mma::kFinalStep : p.kernel;
    return v2_mma::with_head_dim_tile(
        p.d, [&]<int kD>() { return forward_smem_bytes<kD>(step); }, [] { return size_t(0); });
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
        *why = "v2 mma forward needs B*H <= 65535 (a grid dimension), got " + std::to_string(long(p.B) * p.H);
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
    if (p.varlen() && p.has_bias()) {
        *why = "v2 mma forward: --seqlens cannot be combined with --bias (a [B, H, Nq, Nk] bias has no packed form)";
        return false;
    }
    if (p.kernel != 0 && p.kernel != n_steps && p.has_extensions()) {
        *why = "v2 mma forward: --kv-heads, --window, --dropout, --bias, --alibi and --seqlens are in the final kernel "
               "only (--kernel " + std::to_string(n_steps) + ")";
        return false;
    }
    return true;
}

std::string v2_smem_refusal(const Problem& p, bool backward, size_t smem_per_block) {
    const size_t need = backward ? v2_backward_mma_smem_bytes(p, smem_per_block) : v2_mma_smem_bytes(p);
    if (need <= smem_per_block) return "";
    return std::string("v2 ") + (backward ? "backward" : "forward") + " (" + dtype_name(p.dtype) + ") at head dim " +
           std::to_string(p.d) + " needs " + std::to_string(need) + " bytes of shared memory a block; this GPU allows " +
           std::to_string(smem_per_block) + " (Hopper 232448, an A100 166912, sm_86 / sm_89 101376)";
}

std::string v2_forward_mma(const Problem& p, const ForwardArgs& a, cudaStream_t stream) {
    std::string why;
    if (!v2_mma_supports(p, &why)) return why;
    if ((p.has_bias() && a.bias == nullptr) || (p.varlen() && (a.cu_seqlens_q == nullptr || a.cu_seqlens_k == nullptr)))
        return "v2 mma forward: --bias needs ForwardArgs::bias, --seqlens ForwardArgs::cu_seqlens_q and cu_seqlens_k";
    if (p.dtype == DType::fp16) return v2_mma::launch_for_head_dim<__half>(p, a, stream);
    return v2_mma::launch_for_head_dim<__nv_bfloat16>(p, a, stream);
}
