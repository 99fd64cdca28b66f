// backward_mma.cu: the FlashAttention-2 backward pass (Dao 2023, Algorithm 2) on tensor cores.
//
// Three kernels, one stream (after a memset that zeroes the fp32 dQ accumulator):
//   1. preprocess: D_i = rowsum(dO_i * O_i), and LSE_i rescaled to log2 units (so P = exp2(...)), both fp32.
//   2. dk_dv:      one thread block per (K/V tile j, batch*head). It keeps dK_j and dV_j in fp32 registers and
//                  walks the Q tiles i, recomputing S_ij and P_ij from Q_i, K_j and LSE_i:
//                      P_ij  = exp(scale * Q_i K_j^T - LSE_i)      dV_j += P_ij^T dO_i
//                      dP_ij = dO_i V_j^T                          dS_ij = P_ij * (dP_ij - D_i)
//                      dK_j += scale * dS_ij^T Q_i                 dQ_i += dS_ij K_j   (fp32 atomics)
//   3. convert:    dQ = scale times the fp32 accumulator, rounded to fp16/bf16.
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
// kD registers a thread, so the K/V tile shrinks to 64 keys and several warps share a key group (KVTile): each
// computes S_ij^T, dP_ij^T for its share of the Q tile's queries and owns that share of the columns of dK_j, dV_j.
//
// The `// line N` comments are the lines of Algorithm 2 of the FlashAttention-2 paper (as in backward_fp32.cu).
//
// Why atomics for dQ: the alternative, a second kernel parallel over Q tiles, must recompute S_ij and dP_ij
// (two of the five Br x Bc x d products) to form dS_ij, i.e. 7 products instead of 5, 40% more tensor-core work.
// The atomics cost one fp32 red per dQ element per K/V tile; they go to L2 and overlap the next tile's products.
//
// The transposed formulation. A warp owns rows of K_j (16 keys; 32 from step 4) and computes S_ij^T = K_j Q_i^T for
// them, so that the accumulator fragment of P_ij^T is already the A operand of dV_j += P_ij^T dO_i (and dS_ij^T that
// of dK_j += dS_ij^T Q_i): with one warp to a key group P never goes through shared memory, and dS only once, for
// dQ_i = dS_ij K_j; where warps split the queries (step 4, and past kD = 128) each stores its P^T once for the
// others.
//
// Shared memory is swizzled, not padded: a tile row is 64 to 256 halves (8 to 32 chunks of 16 bytes) and chunk c of
// row r is stored at chunk c ^ (r % 8). ldmatrix reads 8 rows at one chunk index: without the swizzle all 8 land
// in the same 4 banks (rows are a multiple of 128 bytes apart); with it they are 8 distinct chunks, conflict free.
//
// The optimisation steps (bin/v2 --dtype fp16 --backward --kernel K; v2_backward_steps() below names them) are
// this one kernel template with fewer features switched on: step 1 loads each Q_i, dO_i only once the previous
// tile is done, step 2 adds the cp.async double buffer (Q_{i+1}, dO_{i+1} land while tile i is computed), step 3
// takes Br = 128 query rows per Q tile at d = 64, step 4 gives each pair of warps 32 keys, split between them by
// queries, so that each B fragment of Q_i and dO_i feeds two m16 tiles (KVTile), step 5 starts each block's walk over
// the Q tiles at a different tile, at the 128 tile and in the group walk, step 6 keeps the dQ accumulator in the
// order of the mma fragments (dq_accum_offset), so that a warp's atomic add goes to 512 contiguous bytes instead of
// 8 rows, and step 7 (the final kernel) moves line 15 of each Q tile past the next tile's barrier at the 64 tile.
#include "backward_mma.h"
#include "cuda_check.h"
#include "mma.cuh"
#include "common/blocks.cuh"
#include "common/philox.cuh"
#include "dropout.cuh"
#include "grid_order.h"
#include "swizzle.h"  // swizzle<kCols>(r, c): the shared tiles' layout
#include "v2.h"  // v2_backward_steps

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <algorithm>
#include <cstdint>
#include <string>
#include <type_traits>

const std::vector<KernelStep>& v2_backward_steps() {
    static const std::vector<KernelStep> steps = {
        {"bwd-1-stage", "mma.sync, ldmatrix on swizzled tiles, P^T and dS^T kept as A fragments; Br = 64; "
                           "Q_i, dO_i loaded after tile i-1 is done"},
        {"bwd-2-stage", "cp.async double buffer: Q_{i+1}, dO_{i+1}, LSE, D land while tile i is computed"},
        {"bwd-br128", "d = 64 takes Br = 128 query rows a Q tile: half the barriers and K_j, V_j fragment reloads"},
        {"bwd-key-pairs", "two warps share 32 keys: each computes S^T, dP^T for half the queries and owns half the "
                          "columns of dK_j, dV_j; P^T and dS^T cross through shared memory; a quarter fewer ldmatrix"},
        {"bwd-stagger", "block x starts its walk over the Q tiles at step x, so the blocks that run together add to "
                        "different dQ rows: at the d = 128 tile and in the group walk (d = 64 plain: step 4)"},
        {"bwd-dq-fragments", "the dQ accumulator stored in mma-fragment order: a lane's four sums are 16 contiguous "
                             "bytes, one red.v4 (sm_90), and a warp's instruction covers 512 contiguous bytes"},
        {"bwd-defer-dq", "at the 64 tile, dQ_i += dS_ij K_j runs after the next Q tile's barrier: one barrier a Q tile "
                         "instead of two, dS^T in two stages (194 KiB of shared memory; an A100 runs step 6)"},
    };
    return steps;
}

namespace {

using namespace v2_ptx;  // mma_m16n8k16, pack2, ldmatrix_x4(_trans), ldm_*, cp_async_*, exp2_approx, shared_addr,
                         // prefetch_l2_tile

constexpr int kFinalStep = 7;
constexpr int kBr128Step = 3;  // the host's padded_rows needs it too
template <int kStep>
struct Features {
    static constexpr bool kDoubleBuffer = kStep >= 2;            // 2: Q_i, dO_i (and LSE_i, D_i) in two cp.async stages
    static constexpr bool kBr128AtD64 = kStep >= kBr128Step;     // 3: Br = 128 at d = 64
    static constexpr bool kKeyPairs = kStep >= 4;                // 4: 32 keys a warp, split by queries (KVTile)
    static constexpr bool kStagger = kStep >= 5;                 // 5: block x starts its walk at step x (dk_dv_kernel)
    static constexpr bool kDqFragments = kStep >= 6;             // 6: the dQ accumulator in fragment order
    static constexpr bool kDeferDq = kStep >= 7;                 // 7: at the 64 tile, dQ_i after the next barrier
};

// Query rows per Q tile (the inner loop). From step 3 on, d = 64 takes 128: each Q tile then costs half the
// barriers and K_j/V_j fragment reloads per FLOP, and the registers allow it (S^T, dP^T 64 each, dK_j, dV_j 32
// each, per thread). d = 128 takes 64, since dK_j and dV_j already need 128 registers per thread.
// (kD is the head-dim tile.) Past 128, Br = 64 and the column split below keep the same register budget as kD = 128.
__host__ __device__ constexpr int q_tile_rows(int kD, bool br128_at_d64) { return kD == 64 && br128_at_d64 ? 128 : 64; }
// The K/V tile of one dk_dv thread block, Bc keys, and how its 8 warps share it. A warp owns a key group of kKeyTiles
// x 16 keys; kParts warps share each group, and part p of a group computes S_ij^T and dP_ij^T of its keys for the
// queries p Br / kParts .. of the Q tile and owns the columns p kD / kParts .. of their dK_j, dV_j rows. With several
// parts, dV_j += P_ij^T dO_i needs P^T of every part's queries: each warp stores its P^T and dS^T in shared memory
// and reads the other parts' there (its own stay in registers).
// - Steps 1-3, d <= 128: 16 keys a warp, one part: every warp reads all of Q_i and dO_i (the B operands) for one m16
//   tile of keys, 0.55 ldmatrix.x4 per mma at d = 128; the kernel is bound by shared-memory bandwidth (issue 12:
//   at N = 8192, d = 128, 1.59e9 shared wavefronts against FlashAttention-2's 1.31e9, and 1.23x its time).
// - Step 4, d <= 128 (kKeyPairs): 32 keys a warp (two m16 tiles that share every B fragment), two parts: a quarter
//   fewer ldmatrix (136 instead of 176 a warp per Q tile at d = 128, 128 instead of 168 at d = 64), the same
//   registers (half the queries, twice the keys).
// - Past kD = 128 (the final step only): 64 keys; K_j, V_j, two stages of Q_i, dO_i, P^T and dS^T take 209 KiB of
//   shared memory at kD = 256 (one block of 8 warps an SM). With kKeyPairs 32 keys a warp and four parts (16 queries,
//   kD / 4 columns each; 164 ldmatrix a warp per Q tile at kD = 256 instead of 188 with 16 keys and two parts);
//   without (the extension kernels) 16 keys a warp and two parts. Either way a thread holds 128 registers of dK_j,
//   dV_j, as at kD = 128.
template <int kD, bool kKeyPairs>
struct KVTile {
    static constexpr int Bc = kD <= 128 ? 128 : 64;
    static constexpr int kKeyTiles = kKeyPairs ? 2 : 1;
    static constexpr int kParts = kD <= 128 ? (kKeyPairs ? 2 : 1) : (kKeyPairs ? 4 : 2);
    static constexpr int kKeyRows = 16 * kKeyTiles;
    static constexpr int kWarps = Bc / kKeyRows * kParts;
    static constexpr int kThreads = kWarps * 32;
    static constexpr int kPartCols = kD / kParts;
    static_assert(kWarps == 8, "8 warps a block");
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

// Step 6: the four sums of one lane's m16n8 fragment, 16 contiguous bytes in the fragment-ordered accumulator
// (dq_accum_offset): one four-float red on sm_90, four one-float ones before.
__device__ inline void atomic_add4(float* addr, float x, float y, float z, float w) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    atomicAdd(reinterpret_cast<float4*>(addr), make_float4(x, y, z, w));
#else
    atomicAdd(addr, x);
    atomicAdd(addr + 1, y);
    atomicAdd(addr + 2, z);
    atomicAdd(addr + 3, w);
#endif
}

// ------------------------------------------------------------------- shared tile copies (the layout: swizzle.h)

// The 16-byte chunks of a kRows x kCols tile (kCols / 8 a row) that thread threadIdx.x of kThreads copies: f(r, c)
// for row r, first column c of each, in an unrolled loop of known length. The loop
// `for (idx = threadIdx.x; idx < kChunks; idx += kThreads)` has a trip count nvcc cannot know (it does not know
// threadIdx.x < kThreads): it compiled a generic loop whose per-chunk addresses it kept live across the dk_dv loop,
// spilling at d = 64 (issue 12; SASS of the fp16 d = 64 dk_dv kernel: its Q-tile loop 2171 -> 1813 instructions,
// 27 -> 9 local loads).
template <int kRows, int kCols, int kThreads, typename F>
__device__ __forceinline__ void for_each_chunk(F&& f) {
    constexpr int kChunksPerRow = kCols / 8, kChunks = kRows * kChunksPerRow;
    static_assert(kChunks % kThreads == 0, "every thread copies the same number of chunks");
#pragma unroll
    for (int k = 0; k < kChunks / kThreads; ++k) {
        const int idx = threadIdx.x + k * kThreads;
        f(idx / kChunksPerRow, (idx % kChunksPerRow) * 8);
    }
}

// Starts the copy of rows [row0, row0 + kRows) of a [n_rows, d] global matrix whose rows are ld elements apart
// (d <= kCols, both multiples of 8) into a swizzled shared tile of kCols columns, by kThreads threads; rows past
// n_rows and columns past d are zero-filled. ld is d, or H * d in a packed batch's [T, H, d].
template <int kRows, int kCols, int kThreads, typename T>
__device__ inline void load_tile_async(uint32_t tile, const T* gmem, int row0, int n_rows, int d, int ld) {
    for_each_chunk<kRows, kCols, kThreads>([&](int r, int c) {
        const bool valid = row0 + r < n_rows && c < d;
        const int row = valid ? row0 + r : 0, col = valid ? c : 0;  // a zero-filled chunk reads nothing: (0, 0)
        cp_async_16(tile + swizzle<kCols>(r, c), gmem + size_t(row) * ld + col, valid ? 16 : 0);
    });
}

// The way back: rows [row0, row0 + kRows) of a swizzled shared tile of kCols columns to a [n_rows, d] global matrix
// (rows ld apart), 16-byte chunks, rows past n_rows and columns past d left out. A warp's 32 chunks are 512
// contiguous bytes of a row or consecutive rows where d = kCols.
template <int kRows, int kCols, int kThreads, typename T>
__device__ inline void store_tile(T* gmem, const unsigned char* tile, int row0, int n_rows, int d, int ld) {
    for_each_chunk<kRows, kCols, kThreads>([&](int r, int c) {
        if (row0 + r < n_rows && c < d)
            *reinterpret_cast<uint4*>(gmem + size_t(row0 + r) * ld + c) =
                *reinterpret_cast<const uint4*>(tile + swizzle<kCols>(r, c));
    });
}

// ------------------------------------------------------------------------------------------------- extensions

// The extensions (docs/conventions.md, "Extensions") as the kernels take them: one struct, by value, built by
// extensions_of(p, ...) below. Only the extension instantiations of dk_dv and dq read it (the default ones compile to
// the code they had without it); the preprocess and convert kernels read cu_seqlens_q (null: the padded layout).
//
// How much of them a dk_dv instantiation compiles in (its template parameter kExt):
//   none    the default kernel: one query head a block, the causal flag, the padded [B, H, N, d] layout; also
//           grouped-query heads with no other extension but dropout, through copies of K and V per query head
//           (group_sum, FinalKernel below)
//   layout  the extensions that change only which heads, rows and tiles a block visits: grouped-query heads (the
//           group walk) with packed sequences or a window, packed sequences, the band of causal and --window (tile
//           skipping, and the mask on the tiles that straddle its edge), with the default kernel's tiles and
//           per-element code; dropout on top is kDropout, as in the default kernel
//   all     every extension: the bias and ALiBi, whose per-element work (extension_element) needs registers that
//           the default tiles do not leave (Br = 64 at d = 64, 16 keys a warp), dropout read at run time
enum class Ext { none, layout, all };
struct Extensions {
    int B, H, Hk;  // batch entries (packed: sequences), query heads, K/V heads: query head h reads K/V head h / (H / Hk)
    KeyBand band;  // causal and --window: which keys a row sees (backward_mma.h)
    // --bias: element (b, h, i, j) at b * bias_batch_stride + h * bias_head_stride + i * Nk + j (a stride is 0 over a
    // broadcast dimension). dS_ij goes to dS at the same place with its own strides: dbias itself (added with fp32
    // atomics where heads share an element: dS_atomic), or under --deterministic with a shared bias a [B, H, Nq, Nk]
    // workspace that reduce_dbias_kernel sums in a fixed order.
    const float* bias;
    float* dS;
    size_t bias_batch_stride, bias_head_stride, dS_batch_stride, dS_head_stride;
    bool dS_atomic;
    int alibi_heads;     // --alibi: head h's slope is alibi_slope(h, alibi_heads); 0 without
    float dropout;       // --dropout p: Z_ij = keep_scale = dropout_scale(p) where dropout_keep(seed, head_offset + b * H
    float keep_scale;    // + h, i, j, p), else 0; without dropout p = 0 and keep_scale = 1
    uint32_t keep_threshold;  // dropout_threshold(p): a weight is kept when its byte is >= this (philox.cuh)
    DropoutKeys dropout_keys;  // the generator's round keys, from --seed (philox.cuh: read from constant memory)
    int head_offset;
    // --seqlens: sequence b is tokens cu_seqlens_q[b] .. cu_seqlens_q[b + 1] (keys: cu_seqlens_k) of tensors laid out
    // [T, H, d]; null for the padded [B, H, N, d] layout. tokens_q: Tq, LSE being [H, Tq].
    const int *cu_seqlens_q, *cu_seqlens_k;
    int tokens_q;
    bool dO_token_major;  // dO [B, Nq, H, d] (Problem::dO_token_major; the default kernels only): dO_rows below
};

// dO_rows (backward_mma.h) of head bh in these extensions' layout. x.H is read only for a token-major dO: read
// ahead of the test, it changed ptxas's register allocation (sm_90: 24-32 bytes of stack in the runtime-d dk_dv
// kernels of the 128 and 256 tiles, which have none this way).
__device__ inline DORows dO_rows(const Extensions& x, int bh, int Nq, int d) {
    if (!x.dO_token_major) return ::dO_rows(bh, 1, Nq, d, false);
    return ::dO_rows(bh, x.H, Nq, d, true);
}

// The rows of workspace (lse_log2, D, the dQ accumulator) of a packed batch: per head, sequence b's rows start at
// round_up(first token, kSeqPad) + b * kSeqPad, which leaves each sequence ceil(n / Br) * Br rows for any Br <=
// kSeqPad (round_up(a, P) + round_up(n, P) <= round_up(a + n, P) + P), 16-byte aligned for cp.async.
constexpr int kSeqPad = 128;

// Batch entry b, or sequence b of a packed batch: its lengths and its first query and key token (packed only).
struct Sequence {
    int Nq, Nk, q0, k0;
};
__device__ inline Sequence sequence_of(const Extensions& x, int b, int Nq, int Nk) {
    if (!x.cu_seqlens_q) return {Nq, Nk, 0, 0};
    const int q0 = x.cu_seqlens_q[b], k0 = x.cu_seqlens_k[b];
    return {x.cu_seqlens_q[b + 1] - q0, x.cu_seqlens_k[b + 1] - k0, q0, k0};
}
// Where head h of sequence b starts in a [B, heads, N, d] tensor, or in a packed [T, heads, d] one; row_stride: the
// elements from one of its rows to the next.
__device__ inline size_t head_start(const Extensions& x, int b, int h, int heads, int N, int token0, int d) {
    return x.cu_seqlens_q ? (size_t(token0) * heads + h) * d : (size_t(b) * heads + h) * N * d;
}
__device__ inline int row_stride(const Extensions& x, int heads, int d) { return x.cu_seqlens_q ? heads * d : d; }
// Row 0 of head h of sequence b in the workspace rows (rows_per_head: padded_rows below) and in the LSE.
__device__ inline size_t workspace_start(const Extensions& x, int b, int h, int rows_per_head, int q0) {
    if (!x.cu_seqlens_q) return (size_t(b) * x.H + h) * rows_per_head;
    return size_t(h) * rows_per_head + size_t(ceil_div(q0, kSeqPad)) * kSeqPad + size_t(b) * kSeqPad;
}
__device__ inline size_t lse_start(const Extensions& x, int b, int h, int Nq, int q0) {
    return x.cu_seqlens_q ? size_t(h) * x.tokens_q + q0 : (size_t(b) * x.H + h) * Nq;
}
// The last b in [0, B) with start(b) <= value, for start non-decreasing in b: the sequence a packed row is in.
template <typename Start>
__device__ inline int last_at_most(int B, long value, Start start) {
    int lo = 0, hi = B - 1;
    while (lo < hi) {
        const int mid = (lo + hi + 1) / 2;
        if (start(mid) <= value) lo = mid;
        else hi = mid - 1;
    }
    return lo;
}

// What --bias and --alibi add to S_ij * scale, in log2 units (P = exp2(S * scale * log2 e + bias * log2 e - LSE *
// log2 e)): score_bias of tests/harness/reference.cu. Rows and keys past the sequence read nothing (their P is 0).
__device__ inline float score_bias_log2(const Extensions& x, const float* bias, float slope, int i, int j, int Nq,
                                        int Nk) {
    if (i >= Nq || j >= Nk) return 0.0f;
    float b = 0.0f;
    if (bias) b += bias[size_t(i) * Nk + j];
    if (x.alibi_heads) b += alibi_bias(slope, i, j, Nq, Nk);
    return b * kLog2e;
}
// What the extensions need to know of query head h of batch entry b: its flattened index (b * H + h, from
// head_offset: dropout's key and ALiBi's head, as in the reference), its ALiBi slope, its bias slice, and where
// its dS_ij go.
struct HeadExtensions {
    int head;
    float slope;
    const float* bias;
    float* dS;
};
// The bias slice [Nq, Nk] of query head h of batch entry b (x.bias non-null).
__device__ inline const float* bias_slice(const Extensions& x, int b, int h) {
    return x.bias + b * x.bias_batch_stride + h * x.bias_head_stride;
}
__device__ inline HeadExtensions head_extensions(const Extensions& x, int b, int h) {
    const int head = x.head_offset + b * x.H + h;
    return {head, x.alibi_heads ? alibi_slope(head % x.alibi_heads, x.alibi_heads) : 0.0f,
            x.bias ? bias_slice(x, b, h) : nullptr,
            x.dS ? x.dS + b * x.dS_batch_stride + h * x.dS_head_stride : nullptr};
}
// Lines 11 and 14 of one element with dropout's factor Z_ij (keep: its bit of the mask from dropout.cuh), in place:
// s becomes P_ij Z_ij (what dV_j += (P Z)^T dO_i takes), dp = dP_ij = dO_i . V_j becomes dS_ij = P_ij (Z_ij dP_ij - D_i),
// unscaled (the caller rounds it and scale multiplies the fp32 sums).
__device__ inline void dropout_element(const Extensions& x, float p, float D, bool keep, float* s, float* dp) {
    const float z = keep ? x.keep_scale : 0.0f;
    *dp = p * (z * *dp - D);
    *s = p * z;
}
// dropout_element for one element (row i, key j) with the extensions, where P_ij = exp2(S_ij * scale * log2 e +
// bias_ij * log2 e - LSE_i * log2 e). The band and Nk mask only where in_band is false (a tile that straddles the
// band's edge or the last key).
__device__ inline void extension_element(const Extensions& x, const HeadExtensions& he, float* s, float* dp,
                                         float scale_log2, float lse_log2, float D, int i, int j, int Nq, int Nk,
                                         bool in_band, bool keep) {
    float p = exp2_approx(*s * scale_log2 + score_bias_log2(x, he.bias, he.slope, i, j, Nq, Nk) - lse_log2);
    if (!in_band && (j >= Nk || !x.band.sees(i, j, Nk - Nq))) p = 0.0f;
    dropout_element(x, p, D, keep, s, dp);
}
// dbias += dS_ij, or dS_ij stored in its own place (a bias with nothing broadcast, or the --deterministic workspace;
// both zeroed first: masked and skipped elements are never written).
__device__ inline void put_dS(const Extensions& x, float* dS_head, int i, int j, int Nk, float ds) {
    float* at = dS_head + size_t(i) * Nk + j;
    if (x.dS_atomic) atomicAdd(at, ds);
    else *at = ds;
}

// ------------------------------------------------------------------------------------------------------ kernels

// D_i's terms from one 16-byte chunk: sum over k < 8 of a[k] b[k], in fp32.
template <typename T>
__device__ __forceinline__ float dot8(const T* a, const T* b) {
    const uint4 va = *reinterpret_cast<const uint4*>(a), vb = *reinterpret_cast<const uint4*>(b);
    const T* x = reinterpret_cast<const T*>(&va);
    const T* y = reinterpret_cast<const T*>(&vb);
    float s = 0.0f;
#pragma unroll
    for (int k = 0; k < 8; ++k) s += float(x[k]) * float(y[k]);
    return s;
}

// kLanes lanes per row of [B*H, Nq_pad] (a warp takes 32 / kLanes rows): D_i = rowsum(dO_i * O_i) (as
// common/blocks.cuh's rowsum_dO_O, here on 16-bit inputs and in the same pass as the rest), each lane reading whole
// 16-byte chunks of the row (8 elements of O and 8 of dO a load), and LSE_i * log2(e). kLanes: the tile's chunks a
// row, kD / 8, up to 32 (a power of two: 8, 16, 32). Rows that see no key (LSE = -inf) and the padding rows past Nq
// get LSE = +inf, so that P = exp2(s - inf) = 0 and they add nothing.
// A packed batch (--seqlens): rows [H, Nq_pad], sequence b's at workspace_start; O, dO [T, H, d], LSE [H, Tq].
// staged_d > 0: the lanes also copy Q_i and dO_i to Q_staged, dO_staged [B*H, Nq, staged_d], rows of the tile width
// (zeros past d): a row of an odd multiple of 8 elements starts every other row half-way into a 32-byte sector, and
// such rows cost the L2 about 1.6 times the lookups a byte to copy (docs/backward.md, "The copy alone"), which the
// dk_dv kernel would pay once per K/V block; rows of the tile width also leave it no column to zero-fill.
template <typename T, int kLanes>
__global__ void preprocess_kernel(const T* O, const T* dO, const T* Q, const float* LSE, float* lse_log2, float* D,
                                  T* Q_staged, T* dO_staged, int staged_d, int Nq, int Nq_pad, int rows, int d,
                                  Extensions x) {
    static_assert(kLanes == 8 || kLanes == 16 || kLanes == 32, "a power of two that divides a warp");
    const int row = int((size_t(blockIdx.x) * blockDim.x + threadIdx.x) / kLanes), lane = threadIdx.x % kLanes;
    const bool real_row = row < rows;  // a group past the last row still joins its warp's shuffles below
    int bh = row / Nq_pad, i = row % Nq_pad;
    const DORows dO_head = dO_rows(x, bh, Nq, d);
    size_t base = (size_t(bh) * Nq + i) * d, dO_base = dO_head.start + size_t(i) * dO_head.ld, lse_at = size_t(bh) * Nq + i;
    if (real_row && x.cu_seqlens_q) {  // row i of head bh's rows: which sequence, which of its rows
        const int h = bh, b = last_at_most(x.B, i, [&](int s) { return long(workspace_start(x, s, 0, Nq_pad, x.cu_seqlens_q[s])); });
        const Sequence seq = sequence_of(x, b, Nq, 0);
        i -= int(workspace_start(x, b, 0, Nq_pad, seq.q0));
        Nq = seq.Nq;
        base = dO_base = (size_t(seq.q0 + i) * x.H + h) * d;
        lse_at = lse_start(x, b, h, 0, seq.q0) + i;
    }
    float sum = 0.0f, lse = INFINITY;
    if (real_row && i < Nq) {
        const float l = LSE[lse_at];  // loaded first, so that its latency overlaps the row's loads
        for (int c = 8 * lane; c < d; c += 8 * kLanes) sum += dot8(O + base + c, dO + dO_base + c);
        lse = l == -INFINITY ? INFINITY : l * kLog2e;
        if (staged_d > 0) {  // the default layout only: row i of head bh
            const size_t to = (size_t(bh) * Nq + i) * staged_d;
            for (int c = 8 * lane; c < staged_d; c += 8 * kLanes) {
                const bool real = c < d;
                const uint4 q = real ? *reinterpret_cast<const uint4*>(Q + base + c) : make_uint4(0, 0, 0, 0);
                const uint4 g = real ? *reinterpret_cast<const uint4*>(dO + dO_base + c) : make_uint4(0, 0, 0, 0);
                *reinterpret_cast<uint4*>(Q_staged + to + c) = q;
                *reinterpret_cast<uint4*>(dO_staged + to + c) = g;
            }
        }
    }
    sum = warp_sum<kLanes>(sum);
    if (real_row && lane == 0) {
        D[row] = sum;
        lse_log2[row] = lse;
    }
}

// Lines 12 and 16 of one warp: acc += A B summed over the Br queries of Q tile i, for the warp's kKeyTiles x 16 keys
// and kPartCols columns from col0. A = P_ij^T or dS_ij^T (keys x queries): the kQ queries from q_row0 are this
// warp's own, packed in registers (own); with several parts (Br = kParts kQ) the others' are read from their copy in
// shared memory (sA, [Bc][Br], swizzled), plain ldmatrix. B = dO_i or Q_i (sB, [query][kD], swizzled), read with
// .trans; each B fragment feeds all kKeyTiles m16 tiles.
template <typename T, int kD, int Br, int kKeyTiles, int kColTiles, int kQTiles>
__device__ __forceinline__ void accumulate_over_queries(float (&acc)[kKeyTiles][kColTiles][4],
                                                        const uint32_t (&own)[kKeyTiles][kQTiles][2], uint32_t sA,
                                                        uint32_t sB, int key_row, int q_row0, int col0, int lane) {
    constexpr int kQ = kQTiles * 8, kParts = Br / kQ;  // this warp's queries, and its group's parts
    auto products = [&](const uint32_t (&a)[kKeyTiles][4], int q) {  // the 16 queries from q
#pragma unroll
        for (int c = 0; c < kColTiles; c += 2) {
            uint32_t b[4];
            ldmatrix_x4_trans(b, sB + swizzle<kD>(q + ldm_bt_row(lane), col0 + c * 8 + ldm_bt_col(lane)));
#pragma unroll
            for (int m = 0; m < kKeyTiles; ++m) {
                mma_m16n8k16<T>(acc[m][c], a[m], b[0], b[1]);
                mma_m16n8k16<T>(acc[m][c + 1], a[m], b[2], b[3]);
            }
        }
    };
#pragma unroll
    for (int n = 0; n < kQTiles; n += 2) {
        uint32_t a[kKeyTiles][4];
#pragma unroll
        for (int m = 0; m < kKeyTiles; ++m) {
            a[m][0] = own[m][n][0], a[m][1] = own[m][n][1], a[m][2] = own[m][n + 1][0], a[m][3] = own[m][n + 1][1];
        }
        products(a, q_row0 + n * 8);
    }
#pragma unroll
    for (int o = 1; o < kParts; ++o) {  // the other parts' queries, from (q_row0 + o kQ) mod Br
        const int other_q0 = (q_row0 + o * kQ) % Br;
#pragma unroll
        for (int k = 0; k < kQ; k += 16) {
            uint32_t a[kKeyTiles][4];
#pragma unroll
            for (int m = 0; m < kKeyTiles; ++m)
                ldmatrix_x4(a[m], sA + swizzle<Br>(key_row + 16 * m + ldm_a_row(lane), other_q0 + k + ldm_a_col(lane)));
            products(a, other_q0 + k);
        }
    }
}

template <int kD, int Br, int kStages, bool kKeyPairs, int kDsStages>
struct SharedLayout {  // byte offsets into dynamic shared memory
    static constexpr int Bc = KVTile<kD, kKeyPairs>::Bc;
    static constexpr int kTile = Bc * kD * 2, qTile = Br * kD * 2;
    static constexpr int K = 0, V = kTile;
    static constexpr int Q = 2 * kTile;                // kStages stages
    static constexpr int dO = Q + kStages * qTile;     // kStages stages
    static constexpr int dS = dO + kStages * qTile;    // dS_ij^T, [Bc][Br], kDsStages stages
    static constexpr int dsTile = Bc * Br * 2;
    static constexpr int P = dS + kDsStages * dsTile;  // P_ij^T, [Bc][Br], with several parts (KVTile)
    static constexpr int lse = P + (KVTile<kD, kKeyPairs>::kParts > 1 ? Bc * Br * 2 : 0);  // float [kStages][Br]
    static constexpr int D = lse + kStages * Br * 4;   // float [kStages][Br]
    static constexpr int bytes = D + kStages * Br * 4;
};

// The tiles of one dk_dv instantiation, which the kernel and its launch both read: the Q tile's rows Br, the K/V
// tile's warps (KV) and the shared layout (L).
template <int kD, int kStep, Ext kExt>
struct DkDvTiles {
    using F = Features<kStep>;
    // Step 4's key pairs, but not with every extension: the bias's per-element work needs the registers (at d = 128
    // the kernel's stack frame, its spills, was 176 bytes a thread with pairs, 48 without), so it keeps 16 keys a warp.
    static constexpr bool kKeyPairs = F::kKeyPairs && kExt != Ext::all;
    // With every extension 64 rows at every d: S and dP take half the registers, room for the per-element work.
    static constexpr int Br = q_tile_rows(kD, F::kBr128AtD64 && kExt != Ext::all);
    using KV = KVTile<kD, kKeyPairs>;
    // Step 7, at the 64 tile without the bias: line 15 of Q tile i runs after the barrier of tile i + 1, so dS^T takes
    // two stages (194 KiB of shared memory a block at kD = 64; at 128 and 256 it measured 2-3% slower, and the bias
    // kernel gained nothing: docs/backward.md, "Step 7").
    static constexpr bool kDeferDq = F::kDeferDq && kD == 64 && kExt != Ext::all;
    using L = SharedLayout<kD, Br, F::kDoubleBuffer ? 2 : 1, kKeyPairs, kDeferDq ? 2 : 1>;
};

// Grid: ceil(Nk / Bc) K/V tiles x B * H heads (causal: ordered by `order`, GridOrder). d is the head dim in device
// memory, kD its tile; kExactD: d == kD, known at compile time (see kExactVariant below). kAtomicDq: dQ_i += dS_ij K_j
// goes to dQ_accum, [Nq_pad, kD] per head, with fp32 atomics (convert_dq_kernel multiplies by scale); without it
// (--deterministic) nothing goes there and the dq kernel computes dQ. It is a template parameter, not a runtime flag,
// so that each instantiation has one loop body: with a runtime flag, nvcc compiled line 14 twice (one copy storing dS
// to shared memory, one not) and branched between them every Q tile, a block boundary between the dS arithmetic and
// the dK_j products (issue 12, where the backward had lost about 4% on an H200 against 884334f; SASS of the fp16
// d = 64 kernel: FMUL 249, FADD 124 with the flag, 129 and 64 without).
// kExt (Ext above): the extensions (x; the causal flag is then in x.band). With any, the grid's heads are the B * Hk
// K/V heads, and the block walks the Q tiles of every query head of its group, the tiles of each that reach the band
// of K_j.
// kDropout: dropout alone (no other extension; causal or not), with atomic dQ, in the default kernel: its tiles
// (Br = 128 at d = 64), its per-element code, and dropout's mask and factor Z_ij (x.dropout_keys, x.keep_scale) on
// top: the extension kernel's general per-element work cost 2.1x (d = 64) and 1.6x (d = 128) before dropout's own. At d = 64
// step 3's layout spilled 168 bytes with Br = 128 (24 with Br = 64), and was still 7% faster than Br = 64 (H200,
// N = 1k-16k, docs/measured/dropout_backward_kdropout_2026-12-04.log); step 4's key pairs spill 32.
// kDropout also runs in the Ext::layout kernel. (Ext::layout is a template value, not a runtime flag of the default
// kernel, so that the plain instantiations compile to the code they had: a runtime group walk in them added 176 SASS
// instructions and measured 2-6% slower, docs/extensions.md.)
template <typename T, int kD, int kStep, bool kExactD, Ext kExt, bool kAtomicDq, bool kDropout = false,
          bool kStaged = false>
__global__ void __launch_bounds__(DkDvTiles<kD, kStep, kExt>::KV::kThreads, 1)
    dk_dv_kernel(const T* __restrict__ Q, const T* __restrict__ K, const T* __restrict__ V, const T* __restrict__ dO,
                 const float* __restrict__ lse_log2, const float* __restrict__ D, float* dQ_accum,
                 T* __restrict__ dK, T* __restrict__ dV, int Nq, int Nk, int Nq_pad, int head_dim, bool causal,
                 float scale, Extensions x, GridOrder order) {
    using F = Features<kStep>;
    static_assert(!(kDropout && (kExt == Ext::all || !kAtomicDq)), "kDropout: the default tiles, atomic dQ");
    constexpr bool kLayout = kExt != Ext::none, kAll = kExt == Ext::all;  // group walk, packed rows, band; bias too
    const int d = kExactD ? kD : head_dim;
    using Tiles = DkDvTiles<kD, kStep, kExt>;
    constexpr bool kDeferDq = Tiles::kDeferDq && kAtomicDq;  // step 7 (without atomics there is no line 15 here)
    // kStaged: Q and dO are the preprocess's copies with rows of kD elements (staged_d_of), for a d below its tile
    // in the final default kernel; its own instantiation, so that the kernel of every other d keeps its code
    static_assert(!kStaged || (!kLayout && !kExactD && !kDropout && kStep == kFinalStep),
                  "kStaged: the final default runtime-d kernel");
    using KV = typename Tiles::KV;
    using L = typename Tiles::L;
    constexpr int Br = Tiles::Br;
    constexpr int Bc = KV::Bc, kWarps = KV::kWarps, kThreads = KV::kThreads, kPartCols = KV::kPartCols;
    constexpr int kKeyTiles = KV::kKeyTiles, kParts = KV::kParts, kQ = Br / kParts;  // kQ: queries of a part
    extern __shared__ __align__(128) unsigned char smem[];
    const uint32_t s = shared_addr(smem);
    const float* s_lse = reinterpret_cast<const float*>(smem + L::lse);
    const float* s_D = reinterpret_cast<const float*>(smem + L::D);

    // line 5: the grid walks the K/V tiles, (tiles, heads). Causal, in the default kernels, it is (chunk, tiles,
    // chunks): the heads in chunks, each chunk tile-major (GridOrder, v2/grid_order.h), so that every head's first
    // tiles, whose walks from the diagonal are the longest, start first.
    int bh = blockIdx.y, kv_tile = blockIdx.x;
    if (!kLayout && causal) {
        bh = order.head(blockIdx.x, blockIdx.z), kv_tile = blockIdx.y;
        if (bh < 0) return;  // the first chunk's unused blocks
    }
    if constexpr (kAll) {  // a bias broadcast over the batch: its sharers side by side (bias_sharing_order)
        if (x.bias != nullptr && x.bias_batch_stride == 0) {
            const int heads = gridDim.y, tiles = gridDim.x, sharing = x.bias_head_stride == 0 ? heads : heads / x.Hk;
            const TileOfHead o = bias_sharing_order(blockIdx.y * tiles + blockIdx.x, tiles, heads, sharing);
            kv_tile = o.tile, bh = o.head;
        }
    }
    const int j0 = kv_tile * Bc;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    // The query heads whose Q tiles the block walks: n_heads of them from h0 (one: bh itself, by default). With
    // the extensions, bh is K/V head hk of batch entry (packed: sequence) `batch`, and the heads are its group
    // (grouped-query attention: dK_j and dV_j sum over the group on chip and are written once, no atomics).
    int batch = 0, h0 = bh, n_heads = 1, q0 = 0, q_ld = d, kv_ld = d;
    if constexpr (kLayout) {
        const int hk = bh % x.Hk;
        batch = bh / x.Hk, n_heads = x.H / x.Hk, h0 = hk * n_heads;
        const Sequence seq = sequence_of(x, batch, Nq, Nk);
        if (j0 >= seq.Nk) return;  // a packed batch: this sequence has fewer K/V tiles than the longest
        const size_t kv_start = head_start(x, batch, hk, x.Hk, Nk, seq.k0, d);
        K += kv_start, V += kv_start, dK += kv_start, dV += kv_start;
        q0 = seq.q0, Nq = seq.Nq, Nk = seq.Nk;
        q_ld = row_stride(x, x.H, d), kv_ld = row_stride(x, x.Hk, d);
    } else {
        if constexpr (kStaged) {  // Q and dO: the preprocess's copies, rows of kD elements
            Q += size_t(bh) * Nq * kD, dO += size_t(bh) * Nq * kD;
            q_ld = kD;
        } else {
            Q += size_t(bh) * Nq * d;
            dO += dO_rows(x, bh, Nq, d).start;
        }
        K += size_t(bh) * Nk * d;
        V += size_t(bh) * Nk * d;
        dK += size_t(bh) * Nk * d;
        dV += size_t(bh) * Nk * d;
        lse_log2 += size_t(bh) * Nq_pad;
        D += size_t(bh) * Nq_pad;
        dQ_accum += size_t(bh) * Nq_pad * kD;
    }
    // Where query head h's rows are (the default kernel's pointers are already at head bh's).
    struct HeadRows {
        const T *Q, *dO;
        const float *lse_log2, *D;
        float* dQ_accum;
    };
    auto rows_of = [&](int h) -> HeadRows {
        if constexpr (!kLayout) return {Q, dO, lse_log2, D, dQ_accum};
        const size_t at = head_start(x, batch, h, x.H, Nq, q0, d), row0 = workspace_start(x, batch, h, Nq_pad, q0);
        return {Q + at, dO + at, lse_log2 + row0, D + row0, dQ_accum + row0 * kD};
    };

    // Query row i sees key j iff j <= i + shift. Q tiles whose last row sees none of K_j are skipped. With the
    // extensions, the rows that see any of K_j are those the band reaches (a window's rows below it are skipped too).
    const int shift = Nk - Nq;
    int first_tile = causal ? max(0, j0 - shift) / Br : 0, end_tile = Nq_pad / Br;
    // Nq_pad is a multiple of this step's Br (padded_rows below).
    if constexpr (kLayout) {
        const int first_row = max(0, x.band.first_row(j0, shift)), last_row = min(Nq - 1, x.band.last_row(min(j0 + Bc, Nk), shift));
        first_tile = first_row / Br;
        end_tile = last_row >= first_row ? last_row / Br + 1 : first_tile;
    }
    // Step k of the walk: tile first_tile + k % tiles_per_head of query head h0 + k / tiles_per_head.
    const int tiles_per_head = end_tile - first_tile, n_steps = n_heads * tiles_per_head;
    // Step 5: block x (K/V tile j0 = x Bc) walks from step x % n_steps round to x % n_steps - 1. Without it every
    // block of a head visits Q tile i at about the same time, and all of them send their dQ_i atomics to the same
    // rows; staggered, neighbouring blocks add to different rows. The sum is the same (in another order). Measured
    // (H100, docs/backward.md "Step 5"): 1.8-2.9% faster at d = 128 and in the group walk (GQA, d = 64), 0.7-1.5%
    // slower for the plain kernel at d = 64, which keeps step 4's order.
    constexpr bool kStagger = F::kStagger && (kD == 128 || kExt == Ext::layout) && kExt != Ext::all;
    const int rot = kStagger && n_steps > 0 ? kv_tile % n_steps : 0;
    auto walk = [&](int step) { const int k = step + rot; return k < n_steps ? k : k - n_steps; };
    auto tile_of = [&](int step) { return first_tile + (kLayout ? walk(step) % tiles_per_head : walk(step)); };
    auto head_of = [&](int step) { return kLayout ? h0 + walk(step) / tiles_per_head : h0; };

    auto load_q_tile = [&](int step, int stage) {  // line 9: Q_i, dO_i, LSE_i, D_i of walk step `step`
        const HeadRows r = rows_of(head_of(step));
        const int tile = tile_of(step);
        if constexpr (kStaged) {  // the preprocess's copies: rows of kD elements, no column to zero-fill
            load_tile_async<Br, kD, kThreads>(s + L::Q + stage * L::qTile, r.Q, tile * Br, Nq, kD, q_ld);
            load_tile_async<Br, kD, kThreads>(s + L::dO + stage * L::qTile, r.dO, tile * Br, Nq, kD, q_ld);
        } else {
            load_tile_async<Br, kD, kThreads>(s + L::Q + stage * L::qTile, r.Q, tile * Br, Nq, d, q_ld);
            // dO's row stride, recomputed from the parameters here: held in a register through the whole walk, it
            // made ptxas spill more (sm_90, the 256 tile's atomic kernels: 48 bytes of stack, against 24 and 0 this way)
            const int dO_ld = kLayout ? q_ld : dO_rows(x, bh, Nq, d).ld;
            load_tile_async<Br, kD, kThreads>(s + L::dO + stage * L::qTile, r.dO, tile * Br, Nq, d, dO_ld);
        }
        if constexpr (kAll)  // --bias: this step's Br x Bc bias on its way to L2 with its Q_i, dO_i (prefetch_l2_tile)
            if (x.bias != nullptr)
                prefetch_l2_tile<Br, Bc, kThreads>(bias_slice(x, batch, head_of(step)), Nk, tile * Br, j0, Nq, Nk);
        if (threadIdx.x < Br / 4)  // lse_log2 and D are padded to Nq_pad: whole 16-byte chunks
            cp_async_16(s + L::lse + stage * Br * 4 + threadIdx.x * 16, r.lse_log2 + tile * Br + threadIdx.x * 4, 16);
        else if (threadIdx.x < Br / 2)
            cp_async_16(s + L::D + stage * Br * 4 + (threadIdx.x - Br / 4) * 16,
                        r.D + tile * Br + (threadIdx.x - Br / 4) * 4, 16);
    };
    load_tile_async<Bc, kD, kThreads>(s + L::K, K, j0, Nk, d, kv_ld);  // line 6
    load_tile_async<Bc, kD, kThreads>(s + L::V, V, j0, Nk, d, kv_ld);
    if (!kLayout || n_steps > 0) load_q_tile(0, 0);
    cp_async_commit();

    // line 7: this warp's kKeyTiles x 16 keys x its part's kPartCols columns, as m16n8 fragments
    float dK_j[kKeyTiles][kPartCols / 8][4] = {}, dV_j[kKeyTiles][kPartCols / 8][4] = {};
    const float scale_log2 = scale * kLog2e;
    // This warp's key group (its first row within K_j) and part (KVTile): its first query within Q_i and the first
    // column of its part of dK_j, dV_j. With one part they are constant 0, so that the swizzled
    // addresses below stay a per-lane base plus compile-time offsets.
    const int key_row = warp / kParts * KV::kKeyRows, part = warp % kParts;
    const int q_row0 = part * kQ, col0 = part * kPartCols;

    // line 15 for walk step st: dQ_i += dS_ij K_j, Br x kD, once every warp has stored its part of dS_ij^T in shared
    // memory. Warps tile it (Br / 32) x kWarpsN: warp (wm, wn) owns rows 32 wm.., columns kCols wn... A = dS_ij,
    // stored transposed, read with .trans; B = K_j stored [key][d], with .trans.
    auto dq_tile = [&](int st) {
        const int i0 = tile_of(st) * Br;
        const uint32_t sdS = s + L::dS + (Tiles::kDeferDq ? st & 1 : 0) * L::dsTile;
        constexpr int kWarpsN = kWarps / (Br / 32), kCols = kD / kWarpsN;
        static_assert(kCols % 16 == 0, "whole x4 B fragments");
        const int wm = warp / kWarpsN, wn = warp % kWarpsN;
        float dQ_i[2][kCols / 8][4] = {};
#pragma unroll
        for (int k = 0; k < Bc; k += 16) {
            uint32_t a[2][4];
#pragma unroll
            for (int m = 0; m < 2; ++m)
                ldmatrix_x4_trans(a[m], sdS + swizzle<Br>(k + ldm_at_row(lane), wm * 32 + m * 16 + ldm_at_col(lane)));
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
        // The accumulator is padded to Nq_pad rows and kD columns, so neither the padding rows (whose dS is 0) nor the
        // columns past d (zeros, as K_j's are; convert_dq_kernel does not read them) need a bounds check. Adding those
        // zeros costs less than testing for them: with a `col >= d` skip here the backward ran 3.3% (d = 40) and 3.7%
        // (d = 200) slower (H100, docs/backward.md, "A head dim below its tile"). Row-major (steps 1-5) a fragment's
        // two rows are 8 rows apart, and each red.v2 of the warp touches 8 rows (8 cache lines); in fragment order
        // (step 6) this lane's four sums are consecutive and the warp's 32 lanes cover 512 contiguous bytes (4 lines).
#pragma unroll
        for (int m = 0; m < 2; ++m)
#pragma unroll
            for (int c = 0; c < kCols / 8; ++c) {
                const int col = wn * kCols + c * 8, row = i0 + wm * 32 + m * 16 + g;
                float* at = rows_of(head_of(st)).dQ_accum + dq_accum_offset<F::kDqFragments>(row, col + 2 * t, kD);
                if constexpr (F::kDqFragments) {
                    atomic_add4(at, dQ_i[m][c][0], dQ_i[m][c][1], dQ_i[m][c][2], dQ_i[m][c][3]);
                } else {
                    atomic_add2(at, dQ_i[m][c][0], dQ_i[m][c][1]);
                    atomic_add2(at + 8 * kD, dQ_i[m][c][2], dQ_i[m][c][3]);
                }
            }
    };

    for (int step = 0; step < n_steps; ++step) {  // line 8 (line 9: load_q_tile; O_i is in D_i)
        const int stage = F::kDoubleBuffer ? step & 1 : 0, i0 = tile_of(step) * Br, h = head_of(step);
        const uint32_t sQ = s + L::Q + stage * L::qTile, sdO = s + L::dO + stage * L::qTile;
        if (!F::kDoubleBuffer && step > 0) {
            // One stage: every warp passed the barrier before dQ of step - 1, the last reads of Q, dO, LSE, D.
            load_q_tile(step, 0);
            cp_async_commit();
        }
        cp_async_wait<0>();
        __syncthreads();  // Q_i, dO_i landed; every warp is done with the other stage, and stored dS of step - 1
        if (F::kDoubleBuffer && step + 1 < n_steps) {
            load_q_tile(step + 1, stage ^ 1);
            cp_async_commit();
        }
        // Step 7: the previous Q tile's line 15, whose dS^T the barrier above completed. One barrier a Q tile instead
        // of two (the one before dQ_i waited for the slowest warp's dK_j, dV_j products); dS^T then takes two stages.
        if constexpr (kDeferDq)
            if (step > 0) dq_tile(step - 1);

        // Dropout's mask of this lane's elements of key tile m, bit k for element k (fragment k / 4, entry k % 4),
        // before the tile's products (Ext::all and kDropout only; all ones without dropout).
        uint64_t keep[kKeyTiles];
#pragma unroll
        for (int m = 0; m < kKeyTiles; ++m) keep[m] = ~uint64_t(0);
        if constexpr (kAll || kDropout) {
            if (x.dropout != 0.0f) {
                const uint32_t head = kLayout ? head_extensions(x, batch, h).head : uint32_t(x.head_offset + bh);
#pragma unroll
                for (int m = 0; m < kKeyTiles; ++m)
                    keep[m] = dropout_bits_transposed<kQ / 8>(x.dropout_keys, x.keep_threshold, head, i0 + q_row0,
                                                              j0 + key_row + 16 * m, g, t);
            }
        }

        // lines 10 and 13: S_ij^T = K_j Q_i^T and dP_ij^T = V_j dO_i^T, kKeyTiles x 16 keys x kQ queries per warp.
        // Each B fragment (Q_i, dO_i) feeds all kKeyTiles m16 tiles. Without dropout and bias, dP^T starts at -D_i
        // (query q of the fragment: q_row0 + 8n + 2t + e % 2), so the products leave line 14's dP_ij - D_i: D_i is
        // read here, ahead of the products, instead of one shared load a fragment just before its subtraction.
        constexpr bool kFoldD = !kAll && !kDropout;
        float S[kKeyTiles][kQ / 8][4] = {}, dP[kKeyTiles][kQ / 8][4];
#pragma unroll
        for (int n = 0; n < kQ / 8; ++n) {
            const int q = q_row0 + n * 8 + 2 * t;
            const float D0 = kFoldD ? -s_D[stage * Br + q] : 0.0f, D1 = kFoldD ? -s_D[stage * Br + q + 1] : 0.0f;
#pragma unroll
            for (int m = 0; m < kKeyTiles; ++m) dP[m][n][0] = D0, dP[m][n][1] = D1, dP[m][n][2] = D0, dP[m][n][3] = D1;
        }
#pragma unroll
        for (int k = 0; k < kD; k += 16) {
            uint32_t a_K[kKeyTiles][4], a_V[kKeyTiles][4];
#pragma unroll
            for (int m = 0; m < kKeyTiles; ++m) {
                ldmatrix_x4(a_K[m], s + L::K + swizzle<kD>(key_row + 16 * m + ldm_a_row(lane), k + ldm_a_col(lane)));
                ldmatrix_x4(a_V[m], s + L::V + swizzle<kD>(key_row + 16 * m + ldm_a_row(lane), k + ldm_a_col(lane)));
            }
#pragma unroll
            for (int n = 0; n < kQ / 8; n += 2) {
                uint32_t b[4];
                ldmatrix_x4(b, sQ + swizzle<kD>(q_row0 + n * 8 + ldm_b_row(lane), k + ldm_b_col(lane)));
#pragma unroll
                for (int m = 0; m < kKeyTiles; ++m) {
                    mma_m16n8k16<T>(S[m][n], a_K[m], b[0], b[1]);
                    mma_m16n8k16<T>(S[m][n + 1], a_K[m], b[2], b[3]);
                }
                ldmatrix_x4(b, sdO + swizzle<kD>(q_row0 + n * 8 + ldm_b_row(lane), k + ldm_b_col(lane)));
#pragma unroll
                for (int m = 0; m < kKeyTiles; ++m) {
                    mma_m16n8k16<T>(dP[m][n], a_V[m], b[0], b[1]);
                    mma_m16n8k16<T>(dP[m][n + 1], a_V[m], b[2], b[3]);
                }
            }
        }

        // line 11: P_ij^T = exp2(S * scale * log2(e) - LSE_i * log2(e)). This lane holds, in key tile m, keys
        // (16m + g, 16m + g + 8) of its group and, in fragment n, queries q_row0 + 8n + 2t, +1 (the D layout in
        // mma.cuh). Masking is needed only on the last K/V tile (keys past Nk) and on Q tiles that cross the causal
        // diagonal. With the extensions (extension_element): the bias, the band (tested per element only in tiles that
        // straddle its edge) and dropout; dP takes dS_ij, which also goes to dbias. Ext::layout: the default code, the
        // band (causal included) tested per element only where the tile straddles its edge or the last key.
        if constexpr (kAll) {
            const HeadExtensions he = head_extensions(x, batch, h);
            const bool in_band = j0 + Bc <= Nk && x.band.sees(i0, j0 + Bc - 1, shift) && x.band.sees(i0 + Br - 1, j0, shift);
#pragma unroll
            for (int m = 0; m < kKeyTiles; ++m)
#pragma unroll
                for (int n = 0; n < kQ / 8; ++n)
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        const int q = q_row0 + n * 8 + 2 * t + (e & 1), key = j0 + key_row + 16 * m + g + (e / 2) * 8;
                        extension_element(x, he, &S[m][n][e], &dP[m][n][e], scale_log2, s_lse[stage * Br + q],
                                          s_D[stage * Br + q], i0 + q, key, Nq, Nk, in_band, (keep[m] >> (4 * n + e)) & 1);
                        if (he.dS && dP[m][n][e] != 0.0f) put_dS(x, he.dS, i0 + q, key, Nk, dP[m][n][e]);
                    }
        } else {
            const bool needs_mask =
                kLayout ? !(j0 + Bc <= Nk && x.band.sees(i0, j0 + Bc - 1, shift) && x.band.sees(i0 + Br - 1, j0, shift))
                        : j0 + Bc > Nk || (causal && i0 + shift < j0 + Bc - 1);
#pragma unroll
            for (int m = 0; m < kKeyTiles; ++m)
#pragma unroll
                for (int n = 0; n < kQ / 8; ++n) {
                    const int q = q_row0 + n * 8 + 2 * t;
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        float p = exp2_approx(S[m][n][e] * scale_log2 - s_lse[stage * Br + q + (e & 1)]);
                        if (needs_mask) {
                            const int key = j0 + key_row + 16 * m + g + (e / 2) * 8, query = i0 + q + (e & 1);
                            if (key >= Nk || (kLayout ? !x.band.sees(query, key, shift) : causal && key > query + shift))
                                p = 0.0f;
                        }
                        S[m][n][e] = p;
                        if constexpr (kDropout)  // P Z and dS, unscaled, as the extension kernel forms them
                            dropout_element(x, p, s_D[stage * Br + q + (e & 1)], keep[m] >> (4 * n + e) & 1,
                                            &S[m][n][e], &dP[m][n][e]);
                    }
                }
        }

        // line 14: dS_ij^T = P_ij^T * (dP_ij^T - D_i). With Ext::all (and kDropout) dP already holds dS_ij^T. It is
        // rounded unscaled, as the same-precision reference and the dq kernel round it, and scale multiplies the fp32
        // sums (dK_j in the epilogue below, dQ in convert_dq_kernel). Folded into dS before the rounding (one multiply
        // fewer an element), a scale that is not a power of two made dS's rounding errors independent of the
        // reference's, and dK's max error could pass twice the reference's (bf16, d = 200, 130 keys: 2.27x;
        // docs/backward.md, "dS rounded unscaled").
        // P^T (Ext::all, kDropout: (P Z)^T) and dS^T, packed, are the A operands of lines 12 and 16 (fragments n, n + 1
        // form one 16 x 16 block). dS^T goes to shared memory ([key][query]) for dQ (unless --deterministic) and,
        // with several parts, P^T and dS^T both go there for the group's other warps.
        const int ds_at = L::dS + (Tiles::kDeferDq ? step & 1 : 0) * L::dsTile;  // this tile's dS^T in shared memory
        uint32_t P_packed[kKeyTiles][kQ / 8][2], dS[kKeyTiles][kQ / 8][2];
#pragma unroll
        for (int m = 0; m < kKeyTiles; ++m)
#pragma unroll
            for (int n = 0; n < kQ / 8; ++n) {
                const int q = q_row0 + n * 8 + 2 * t, key = key_row + 16 * m + g;
                P_packed[m][n][0] = pack2<T>(S[m][n][0], S[m][n][1]);
                P_packed[m][n][1] = pack2<T>(S[m][n][2], S[m][n][3]);
                if constexpr (kAll || kDropout) {
                    dS[m][n][0] = pack2<T>(dP[m][n][0], dP[m][n][1]);
                    dS[m][n][1] = pack2<T>(dP[m][n][2], dP[m][n][3]);
                } else {  // dP already holds dP_ij^T - D_i (kFoldD)
                    dS[m][n][0] = pack2<T>(S[m][n][0] * dP[m][n][0], S[m][n][1] * dP[m][n][1]);
                    dS[m][n][1] = pack2<T>(S[m][n][2] * dP[m][n][2], S[m][n][3] * dP[m][n][3]);
                }
                if (kAtomicDq || kParts > 1) {
                    *reinterpret_cast<uint32_t*>(smem + ds_at + swizzle<Br>(key, q)) = dS[m][n][0];
                    *reinterpret_cast<uint32_t*>(smem + ds_at + swizzle<Br>(key + 8, q)) = dS[m][n][1];
                }
                if (kParts > 1) {
                    *reinterpret_cast<uint32_t*>(smem + L::P + swizzle<Br>(key, q)) = P_packed[m][n][0];
                    *reinterpret_cast<uint32_t*>(smem + L::P + swizzle<Br>(key + 8, q)) = P_packed[m][n][1];
                }
            }
        if (kParts > 1) named_barrier_sync(1 + warp / kParts, kParts * 32);  // the group's P^T, dS^T are stored

        // line 12: dV_j += P_ij^T dO_i and line 16: dK_j += dS_ij^T Q_i, over all Br queries of Q_i (this warp's
        // from registers, the other parts' from shared memory), B = dO_i or Q_i stored [query][d], read with .trans.
        accumulate_over_queries<T, kD, Br>(dV_j, P_packed, s + L::P, sdO, key_row, q_row0, col0, lane);
        accumulate_over_queries<T, kD, Br>(dK_j, dS, s + ds_at, sQ, key_row, q_row0, col0, lane);
        if constexpr (!kDeferDq) {
            __syncthreads();  // all of dS_ij^T is in shared memory (one stage: every warp is done with Q_i, dO_i)
            if constexpr (kAtomicDq) dq_tile(step);  // (--deterministic: the dq kernel computes dQ)
        }
    }
    if constexpr (kDeferDq) {
        if (n_steps > 0) {
            __syncthreads();  // the last Q tile's dS_ij^T is in shared memory
            dq_tile(n_steps - 1);
        }
    }

    // line 18: dK_j, dV_j, through shared memory. Fragment [m][c] holds keys (16m + g, 16m + g + 8) of this warp's
    // group x columns col0 + 8c + 2t, +1: stored straight to global memory, a warp instruction writes 8 pieces of 16
    // bytes. So each warp puts its fragments into the K_j and V_j tiles, which nothing reads any more (8 rows of one
    // swizzle group a store: conflict-free), and then every thread copies whole 16-byte chunks out (store_tile).
    cp_async_wait<0>();  // with no Q tile to walk, the copies of K_j and V_j were never waited for: they land first
    __syncthreads();     // every warp is done with K_j and V_j (line 15 of the last Q tile reads K_j)
#pragma unroll
    for (int m = 0; m < kKeyTiles; ++m)
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const int key = key_row + 16 * m + g + half * 8;
#pragma unroll
            for (int c = 0; c < kPartCols / 8; ++c) {
                const uint32_t at = swizzle<kD>(key, col0 + c * 8 + 2 * t);
                *reinterpret_cast<uint32_t*>(smem + L::K + at) =
                    pack2<T>(scale * dK_j[m][c][2 * half], scale * dK_j[m][c][2 * half + 1]);
                *reinterpret_cast<uint32_t*>(smem + L::V + at) = pack2<T>(dV_j[m][c][2 * half], dV_j[m][c][2 * half + 1]);
            }
        }
    __syncthreads();
    // The runtime-d kernels store from rows_from, j0 passed through an empty asm: nvcc then cannot reuse the row bounds
    // and offsets that load_tile_async computed from j0 at line 6 for the same rows. Reused, they stayed alive across
    // the walk over the Q tiles and spilled (sm_90 SASS, the 256 tile's: 59-72 local loads and stores, 0-3 with it;
    // docs/backward.md). With d known the asm left the spills as they were (64, 128) or added some (256): not there.
    int rows_from = j0;
    if constexpr (!kExactD) asm volatile("" : "+r"(rows_from));
    store_tile<Bc, kD, kThreads>(dK, smem + L::K, rows_from, Nk, d, kv_ld);
    store_tile<Bc, kD, kThreads>(dV, smem + L::V, rows_from, Nk, d, kv_ld);
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

// kExt: the extensions (as in dk_dv_kernel); head bh then reads K/V head kv_head, and only the K/V tiles that reach
// the band of the tile's rows are walked (still in order).
template <typename T, int kD, bool kExt>
__global__ void __launch_bounds__(kDqThreads, 1)
    dq_kernel(const T* __restrict__ Q, const T* __restrict__ K, const T* __restrict__ V, const T* __restrict__ dO,
              const float* __restrict__ lse_log2, const float* __restrict__ D, T* __restrict__ dQ, int Nq, int Nk,
              int Nq_pad, int d, bool causal, float scale, Extensions x) {
    constexpr int Bc = dq_key_rows<kD>(), kTile = Bc * kD * 2;
    extern __shared__ __align__(128) unsigned char smem[];
    const uint32_t sQ = shared_addr(smem), sdO = sQ + kDqRows * kD * 2, sK = sdO + kDqRows * kD * 2;
    const uint32_t sV = sK + 2 * kTile;  // K_j and V_j: two buffers each

    // Causal: the last Q tiles see the most keys; launching them first shortens the tail of the grid.
    const int q_tile = causal ? gridDim.x - 1 - blockIdx.x : blockIdx.x;
    const int bh = blockIdx.y, i0 = q_tile * kDqRows;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    int batch = 0, h = bh, q_ld = d, kv_ld = d, dO_ld = d;
    if constexpr (kExt) {  // head h of batch entry (packed: sequence) `batch` reads K/V head h / (H / Hk)
        batch = bh / x.H, h = bh % x.H;
        const Sequence seq = sequence_of(x, batch, Nq, Nk);
        if (i0 >= seq.Nq) return;  // a packed batch: this sequence has fewer Q tiles than the longest
        const size_t q_start = head_start(x, batch, h, x.H, Nq, seq.q0, d);
        const size_t kv_start = head_start(x, batch, h / (x.H / x.Hk), x.Hk, Nk, seq.k0, d);
        const size_t row_start = workspace_start(x, batch, h, Nq_pad, seq.q0);
        Q += q_start, dO += q_start, dQ += q_start, K += kv_start, V += kv_start;
        lse_log2 += row_start, D += row_start;
        Nq = seq.Nq, Nk = seq.Nk;
        q_ld = dO_ld = row_stride(x, x.H, d), kv_ld = row_stride(x, x.Hk, d);
    } else {
        const DORows dO_head = dO_rows(x, bh, Nq, d);
        Q += size_t(bh) * Nq * d;
        dO += dO_head.start, dO_ld = dO_head.ld;
        dQ += size_t(bh) * Nq * d;
        K += size_t(bh) * Nk * d;
        V += size_t(bh) * Nk * d;
        lse_log2 += size_t(bh) * Nq_pad;
        D += size_t(bh) * Nq_pad;
    }

    // Keys this Q tile visits: all, or (causal) up to the last key its last real row sees. With the extensions: the
    // keys the band of its rows reaches, from K/V tile first_kv_tile on.
    const int shift = Nk - Nq, row_end = min(i0 + kDqRows, Nq);
    const int kv_end = causal ? min(Nk, row_end - 1 + shift + 1) : Nk;
    int first_kv_tile = 0, n_tiles = kv_end > 0 ? ceil_div(kv_end, Bc) : 0;
    if constexpr (kExt) {
        const int first_key = max(0, x.band.first_key(i0, shift)), last_key = min(Nk - 1, x.band.last_key(row_end - 1, shift));
        first_kv_tile = first_key / Bc;
        n_tiles = last_key >= first_key ? last_key / Bc + 1 - first_kv_tile : 0;
    }
    load_tile_async<kDqRows, kD, kDqThreads>(sQ, Q, i0, Nq, d, q_ld);
    load_tile_async<kDqRows, kD, kDqThreads>(sdO, dO, i0, Nq, d, dO_ld);
    if (n_tiles > 0) {
        load_tile_async<Bc, kD, kDqThreads>(sK, K, first_kv_tile * Bc, Nk, d, kv_ld);
        load_tile_async<Bc, kD, kDqThreads>(sV, V, first_kv_tile * Bc, Nk, d, kv_ld);
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
            const int next_key0 = (first_kv_tile + j + 1) * Bc;
            load_tile_async<Bc, kD, kDqThreads>(sK + (j + 1) % 2 * kTile, K, next_key0, Nk, d, kv_ld);
            load_tile_async<Bc, kD, kDqThreads>(sV + (j + 1) % 2 * kTile, V, next_key0, Nk, d, kv_ld);
        }
        cp_async_commit();  // committed even when empty, so that "one group pending" always means tile j landed
        cp_async_wait<1>();
        __syncthreads();
        const uint32_t K_j = sK + j % 2 * kTile, V_j = sV + j % 2 * kTile;

        const int key0 = (first_kv_tile + j) * Bc;
        // Dropout's mask of this lane's elements, bit 4 n + e for entry e of n8 tile n, as dk_dv's (kExt only).
        uint64_t keep = ~uint64_t(0);
        if (kExt && x.dropout != 0.0f) {
            const uint32_t head = head_extensions(x, batch, h).head;
            keep = 0;
#pragma unroll 1
            for (int q = 0; q < Bc / 32; ++q)
                keep |= uint64_t(dropout_mask_m16n32(x.dropout_keys, x.keep_threshold, head, row0, key0 + 32 * q, t))
                        << (16 * q);
        }

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
        // branch). With the extensions, extension_element does it (dP then holds dS_ij, S the unused P_ij Z_ij).
        if constexpr (kExt) {
            const HeadExtensions he = head_extensions(x, batch, h);
            const int warp_row0 = i0 + warp * 16;
            const bool in_band = key0 + Bc <= Nk && x.band.sees(warp_row0, key0 + Bc - 1, shift) &&
                                 x.band.sees(warp_row0 + 15, key0, shift);
#pragma unroll
            for (int n = 0; n < Bc / 8; ++n)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    extension_element(x, he, &S[n][e], &dP[n][e], scale_log2, lse[e / 2], Di[e / 2], row0 + e / 2 * 8,
                                      key0 + n * 8 + 2 * t + e % 2, Nq, Nk, in_band, (keep >> (4 * n + e)) & 1);
                    S[n][e] = dP[n][e];
                }
        } else {
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
            *reinterpret_cast<uint32_t*>(dQ + size_t(row) * q_ld + c * 8 + 2 * t) =
                pack2<T>(scale * dQ_i[c][2 * half], scale * dQ_i[c][2 * half + 1]);
        }
    }
}

// dQ = scale times the fp32 accumulator [B*H, Nq_pad, kD] without its padding rows and columns, rounded to T; 4
// elements per thread (d is a multiple of 8, so the 4 never straddle a row). A packed batch: dQ [Tq, H, d] from the
// accumulator [H, Nq_pad, kD], each token's sequence found by a binary search of cu_seqlens_q. kFragments: the
// accumulator is in fragment order (step 6), element (row, col) at dq_accum_offset<true>; else row-major.
// Indices fit in 32 bits (one tensor has at most 2^31 - 1 elements: problem_size_unsupported), so the divisions are
// 32-bit ones.
template <typename T, bool kFragments>
__global__ void convert_dq_kernel(const float* dQ_accum, T* dQ, int Nq, int Nq_pad, int d, int kD, size_t n_elems,
                                  float scale, Extensions x) {
    const size_t e = (size_t(blockIdx.x) * blockDim.x + threadIdx.x) * 4;
    if (e >= n_elems) return;
    const unsigned row = unsigned(e) / unsigned(d), col = unsigned(e) % unsigned(d);
    size_t accum_row;
    if (x.cu_seqlens_q) {
        const int token = int(row / unsigned(x.H)), h = int(row % unsigned(x.H));
        const int b = last_at_most(x.B, token, [&](int s) { return long(x.cu_seqlens_q[s]); });
        accum_row = workspace_start(x, b, h, Nq_pad, x.cu_seqlens_q[b]) + (token - x.cu_seqlens_q[b]);
    } else {
        const size_t bh = row / unsigned(Nq), i = row % unsigned(Nq);
        accum_row = bh * Nq_pad + i;
    }
    // columns col, col + 1 and col + 2, col + 3: adjacent in either order (col is a multiple of 4)
    const float2 lo = *reinterpret_cast<const float2*>(dQ_accum + dq_accum_offset<kFragments>(accum_row, col, kD));
    const float2 hi = *reinterpret_cast<const float2*>(dQ_accum + dq_accum_offset<kFragments>(accum_row, col + 2, kD));
    *reinterpret_cast<uint2*>(dQ + e) =
        make_uint2(pack2<T>(scale * lo.x, scale * lo.y), pack2<T>(scale * hi.x, scale * hi.y));
}

// Grouped-query heads in the default kernel (FinalKernel::group_sum), which reads and writes one K/V head per query
// head, [B, H, Nk, d]. Query heads bkv G .. bkv G + G - 1 (G = H / Hk) form the group of K/V head bkv = b Hk + hk
// (b H + hk G = bkv G). expand_heads_kernel copies K (or V) of head bkv to each of its group's slices; group_sum_kernel
// makes dK (or dV) of head bkv the sum of its group's slices, added in fp32 in that order and rounded once. Eight
// elements a thread: d is a multiple of 8.
template <typename T>
__global__ void expand_heads_kernel(const T* kv, T* heads, int group, size_t slice, size_t n_elems) {
    const size_t e = (size_t(blockIdx.x) * blockDim.x + threadIdx.x) * 8;
    if (e >= n_elems) return;
    const size_t bkv = e / slice, at = e % slice;
    const uint4 v = *reinterpret_cast<const uint4*>(kv + e);
    for (int r = 0; r < group; ++r) *reinterpret_cast<uint4*>(heads + (bkv * group + r) * slice + at) = v;
}

template <typename T>
__global__ void group_sum_kernel(const T* heads, T* out, int group, size_t slice, size_t n_elems) {
    const size_t e = (size_t(blockIdx.x) * blockDim.x + threadIdx.x) * 8;
    if (e >= n_elems) return;
    const size_t bkv = e / slice, at = e % slice;
    float sum[8] = {};
    for (int r = 0; r < group; ++r) {
        const uint4 v = *reinterpret_cast<const uint4*>(heads + (bkv * group + r) * slice + at);
        const T* h = reinterpret_cast<const T*>(&v);
#pragma unroll
        for (int k = 0; k < 8; ++k) sum[k] += float(h[k]);
    }
    *reinterpret_cast<uint4*>(out + e) = make_uint4(pack2<T>(sum[0], sum[1]), pack2<T>(sum[2], sum[3]),
                                                    pack2<T>(sum[4], sum[5]), pack2<T>(sum[6], sum[7]));
}

// --deterministic with a shared (broadcast) bias: dbias = the per-head dS of the workspace [B, H, Nq, Nk], summed
// over the broadcast dimensions in a fixed order (batch entries, then heads): the same bits on every run, where
// fp32 atomics would add in the order the blocks happen to run.
__global__ void reduce_dbias_kernel(const float* dS_heads, float* dbias, int B, int H, int bias_batch, int bias_heads,
                                    size_t slice) {
    const size_t e = size_t(blockIdx.x) * blockDim.x + threadIdx.x;
    if (e >= size_t(bias_batch) * bias_heads * slice) return;
    const int b = int(e / slice / bias_heads), h = int(e / slice % bias_heads);
    const int b_end = bias_batch == 1 ? B : b + 1, h_end = bias_heads == 1 ? H : h + 1;
    float sum = 0.0f;
    for (int bb = bias_batch == 1 ? 0 : b; bb < b_end; ++bb)
        for (int hh = bias_heads == 1 ? 0 : h; hh < h_end; ++hh) sum += dS_heads[(size_t(bb) * H + hh) * slice + e % slice];
    dbias[e] = sum;
}

int step_of(const Problem& p) { return p.kernel == 0 ? kFinalStep : p.kernel; }

// Query rows per head of the dQ accumulator, LSE and D: Nq rounded up to this step's Br (a multiple of the dq
// kernel's 64). A packed batch: every sequence's rows (workspace_start), ceil(T / kSeqPad) + B blocks of kSeqPad.
int padded_rows(const Problem& p) {
    if (p.varlen()) return (ceil_div(int(p.tokens_q()), kSeqPad) + p.B) * kSeqPad;
    const int Br = q_tile_rows(v2_backward_mma_head_dim_tile(p.d), step_of(p) >= kBr128Step);
    return ceil_div(p.Nq, Br) * Br;
}
size_t workspace_rows(const Problem& p) { return size_t(p.varlen() ? 1 : p.B) * p.H * padded_rows(p); }

// The final step's dk_dv kernel for p (launch_step follows it; v2_backward_mma_kernel names it). The extensions at
// d = 64 and 128 (the benchmark head dims; d known at compile time), with no bias and no ALiBi:
// - dropout alone: the default kernel with dropout's mask (kDropout);
// - grouped-query heads alone or with dropout, atomic dQ, causal or with enough query rows: the default kernel too
//   (group_sum), one block row per query head, on copies of K and V made for each query head, its dK and dV summed
//   over each group afterwards;
// - other grouped-query heads, packed sequences and windows, with or without dropout: the Ext::layout kernel, the
//   default tiles and per-element code, the group walk and the band's tile skipping (dropout only with atomic dQ).
// Five more dk_dv instantiations per type and tile. Why: in the Ext::all kernel dropout cost 2.25x (d = 64) and 1.74x
// (d = 128) the default kernel, its general per-element work alone about 2.1x and 1.6x, and grouped-query heads took
// 1.7-2.1x what the default kernel walking the group took (docs/extensions.md). Why group_sum: the Ext::layout kernel,
// which sums each group's dK_j, dV_j on chip, took 1.10x the default kernel's time at d = 64 (H100, N = 16384)
// whether it walked a group or one head, with 6.6% more instructions; the copies and the sums take 4 B H Nk d
// elements of T of workspace and move them through memory, which short problems do not win back (non-causal N =
// 1024: +3% at d = 64, +12% at d = 128), while the causal grid gains most (-8% to -30%: G times longer blocks of
// unequal lengths leave SMs idle at the end of the group walk; docs/extensions.md, "Grouped-query attention").
// (The default kernel reading K/V head h / G itself, one integer division a block, ran 0.9-1.5% slower at d = 64
// without grouped heads.) Every other problem with extensions (the bias, ALiBi, other head dims, dropout with
// --deterministic) runs the Ext::all kernels, for any d <= the tile: one dk_dv instantiation per tile, type, dQ mode.
struct FinalKernel {
    Ext ext;
    bool dropout;    // kDropout
    bool group_sum;  // grouped-query heads in the default kernel (Ext::none)
};
FinalKernel final_kernel(const Problem& p) {
    const int tile = v2_backward_mma_head_dim_tile(p.d);
    const bool dropout = p.dropout > 0.0f;
    if (!p.has_extensions()) return {Ext::none, false, false};
    if (p.d == tile && tile <= 128 && !p.has_bias() && !p.alibi && !(dropout && p.deterministic)) {
        // group_sum where it measured faster than the group walk (H100, docs/extensions.md): causal, or a walk long
        // enough for the copies (4 B H Nk d elements) to pay, Nq >= 2048 at d = 64 and 8192 at d = 128
        const bool group_sum = p.kv_heads() != p.H && p.gqa_and_dropout_only() && !p.deterministic &&
                               (p.causal || p.Nq >= (p.d == 64 ? 2048 : 8192));
        return {p.dropout_alone() || group_sum ? Ext::none : Ext::layout, dropout, group_sum};
    }
    return {Ext::all, false, false};
}

// Does --bias broadcast over a dimension of more than one entry (so that several heads add into one dbias element)?
bool bias_shared(const Problem& p) {
    return p.has_bias() && ((p.bias_batch == 1 && p.B > 1) || (p.bias_heads == 1 && p.H > 1));
}
// --deterministic with a shared bias keeps each head's dS in the workspace for reduce_dbias_kernel.
bool dS_per_head(const Problem& p) { return p.deterministic && bias_shared(p); }
// group_sum: each query head's copy of K, of V, and its dK, dV, [B, H, Nk, d] each (elements of T), in the workspace.
size_t group_sum_head_elems(const Problem& p) { return size_t(p.B) * p.H * p.Nk * p.d; }
// staged_d_of: Q and dO copied by the preprocess to rows of the tile width, for every d below its tile, in the
// default kernels (the extension kernels read packed rows).
int staged_d_of(const Problem& p) {
    const int tile = v2_backward_mma_head_dim_tile(p.d);
    return p.d < tile && final_kernel(p).ext == Ext::none ? tile : 0;
}
size_t staged_elems(const Problem& p) { return size_t(p.B) * p.H * p.Nq * staged_d_of(p); }
// The workspace before the staged copies (v2_backward_mma_workspace_bytes), rounded up to 16 bytes.
size_t unstaged_workspace_bytes(const Problem& p);

// The instantiations that have a kStaged twin: the final step's default runtime-d kernel. (Not step 6, which the 64
// tile runs instead of step 7 on a GPU with less shared memory: there Q and dO are read where they lie.)
template <int kStep, bool kExactD, Ext kExt, bool kDropout>
constexpr bool kCanStage = kExt == Ext::none && !kExactD && !kDropout && kStep == kFinalStep;

// The extensions' device inputs, as v2_backward_mma takes them.
struct ExtensionPointers {
    const float* bias;
    float* dbias;
    const int *cu_seqlens_q, *cu_seqlens_k;
};

Extensions extensions_of(const Problem& p, const ExtensionPointers& in, float* dS_heads) {
    Extensions x{};
    x.B = p.B, x.H = p.H, x.Hk = p.kv_heads();
    x.band = key_band(p);
    if (p.has_bias()) {
        x.bias = in.bias;
        // Problem::bias_offset's strides (0 over a broadcast dimension)
        x.bias_batch_stride = p.B > 1 ? p.bias_offset(p.H) : 0;
        x.bias_head_stride = p.H > 1 ? p.bias_offset(1) : 0;
        if (dS_heads) {
            x.dS = dS_heads, x.dS_batch_stride = size_t(p.H) * p.Nq * p.Nk, x.dS_head_stride = size_t(p.Nq) * p.Nk;
        } else {
            x.dS = in.dbias, x.dS_batch_stride = x.bias_batch_stride, x.dS_head_stride = x.bias_head_stride;
            x.dS_atomic = bias_shared(p);
        }
    }
    x.alibi_heads = p.alibi ? p.alibi_heads() : 0;
    x.dropout = p.dropout, x.keep_scale = float(dropout_scale(p.dropout)), x.head_offset = p.head_offset;
    x.dropout_keys = dropout_keys(p.dropout_seed);
    x.keep_threshold = dropout_threshold(p.dropout);
    if (p.varlen()) x.cu_seqlens_q = in.cu_seqlens_q, x.cu_seqlens_k = in.cu_seqlens_k;
    x.tokens_q = int(p.tokens_q());
    x.dO_token_major = p.dO_token_major;
    return x;
}

// The dk_dv kernel of one instantiation: its shared memory set once, at its first launch (later, timed launches do no
// host work but the launch). `staged_rows`: Q and dO are the preprocess's copies with rows of kD elements, read by an
// instantiation of their own (kStaged), so that the kernel every other d runs keeps its code.
template <typename T, int kD, int kStep, bool kExactD, Ext kExt, bool kAtomicDq, bool kDropout = false>
void launch_dk_dv(const Problem& p, const T* Q, const T* K, const T* V, const T* dO, const float* lse_log2,
                  const float* D, float* dQ_accum, T* dK, T* dV, int Nq_pad, const Extensions& x, bool staged_rows,
                  cudaStream_t stream) {
    using Tiles = DkDvTiles<kD, kStep, kExt>;
    using KV = typename Tiles::KV;
    constexpr int smem = Tiles::L::bytes;
    constexpr bool kStageable = kCanStage<kStep, kExactD, kExt, kDropout>;
    const auto plain = dk_dv_kernel<T, kD, kStep, kExactD, kExt, kAtomicDq, kDropout>;
    const auto staged = dk_dv_kernel<T, kD, kStep, kExactD, kExt, kAtomicDq, kDropout, kStageable>;
    static const cudaError_t attribute_set =
        cudaFuncSetAttribute(plain, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    CUDA_CHECK(attribute_set);
    if constexpr (kStageable) {
        static const cudaError_t staged_attribute_set =
            cudaFuncSetAttribute(staged, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
        CUDA_CHECK(staged_attribute_set);
    }
    // The grid: (tiles, heads), with the extensions K/V heads. Causal (the default kernels), the heads in chunks
    // (GridOrder; one block an SM: __launch_bounds__ and the shared memory).
    const int tiles = ceil_div(p.Nk, KV::Bc), heads = p.B * (kExt != Ext::none ? p.kv_heads() : p.H);
    OrderedGrid g{GridOrder{}, dim3(unsigned(tiles), unsigned(heads))};
    if (p.causal && kExt == Ext::none)
        g = ordered_grid(tiles, heads, heavy_first_chunk(tiles, heads, device_sm_count()));
    (kStageable && staged_rows ? staged : plain)<<<g.grid, KV::kThreads, smem, stream>>>(
        Q, K, V, dO, lse_log2, D, dQ_accum, dK, dV, p.Nq, p.Nk, Nq_pad, p.d, p.causal, p.resolved_scale(), x, g.order);
    CUDA_CHECK_LAUNCH();
}

// kExt, kDropout: as dk_dv_kernel's. The deterministic dq kernel has every extension compiled in once there is any.
template <typename T, int kD, int kStep, bool kExactD, Ext kExt, bool kDropout = false>
void launch(const Problem& p, const T* Q, const T* K, const T* V, const T* O, const float* LSE, const T* dO, T* dQ,
            T* dK, T* dV, void* workspace, const ExtensionPointers& in, cudaStream_t stream) {
    const int BH = p.B * p.H, Nq_pad = padded_rows(p);
    const size_t rows = workspace_rows(p);
    // Workspace: lse_log2 [rows], D [rows], then the dQ accumulator [rows, kD] (atomics) or, with a shared bias under
    // --deterministic, each head's dS [B, H, Nq, Nk].
    float* lse_log2 = static_cast<float*>(workspace);
    float* D = lse_log2 + rows;
    float* dQ_accum = p.deterministic ? nullptr : D + rows;
    float* dS_heads = dS_per_head(p) ? D + rows : nullptr;
    const Extensions x = extensions_of(p, in, dS_heads);
    // Q and dO as dk_dv reads them: the preprocess's copies with rows of the tile width (staged_d_of), or in place.
    // The kernel this launch runs decides, not the step asked for (step 7 falls back to 6 where shared memory is short).
    const int staged_d = kCanStage<kStep, kExactD, kExt, kDropout> ? staged_d_of(p) : 0;
    T* const Q_staged =
        staged_d > 0 ? reinterpret_cast<T*>(static_cast<char*>(workspace) + unstaged_workspace_bytes(p)) : nullptr;
    T* const dO_staged = staged_d > 0 ? Q_staged + staged_elems(p) : nullptr;
    const T* Q_read = staged_d > 0 ? Q_staged : Q;
    const T* dO_read = staged_d > 0 ? dO_staged : dO;
    // group_sum: the default kernel reads K, V and writes dK, dV one head per query head, [B, H, Nk, d] each, after
    // the dQ accumulator
    const bool group_sum = kExt == Ext::none && final_kernel(p).group_sum;
    const size_t head_elems = group_sum_head_elems(p), slice = size_t(p.Nk) * p.d, kv_elems = p.kv_elems();
    T *dK_heads = dK, *dV_heads = dV;
    const unsigned group_blocks = unsigned(ceil_div(kv_elems / 8, size_t(256)));
    if (group_sum) {
        T* K_heads = reinterpret_cast<T*>(D + rows + rows * kD);
        T* V_heads = K_heads + head_elems;
        dK_heads = V_heads + head_elems, dV_heads = dK_heads + head_elems;
        expand_heads_kernel<T><<<group_blocks, 256, 0, stream>>>(K, K_heads, p.group(), slice, kv_elems);
        CUDA_CHECK_LAUNCH();
        expand_heads_kernel<T><<<group_blocks, 256, 0, stream>>>(V, V_heads, p.group(), slice, kv_elems);
        CUDA_CHECK_LAUNCH();
        K = K_heads, V = V_heads;
    }

    if (!p.deterministic)  // line 3
        CUDA_CHECK(cudaMemsetAsync(dQ_accum, 0, rows * kD * sizeof(float), stream));
    if (p.has_bias())  // dS_ij is added (or stored) only where a block visits: the rest of dbias is 0
        CUDA_CHECK(cudaMemsetAsync(dS_heads ? dS_heads : in.dbias, 0,
                                   (dS_heads ? size_t(BH) * p.Nq * p.Nk : p.bias_elems()) * sizeof(float), stream));
    constexpr int kLanes = kD <= 128 ? kD / 8 : 32, kThreads = 256;  // lanes a row, threads a block
    preprocess_kernel<T, kLanes><<<unsigned(ceil_div(rows * kLanes, size_t(kThreads))), kThreads, 0, stream>>>(  // line 4
        O, dO, Q, LSE, lse_log2, D, Q_staged, dO_staged, staged_d, p.Nq, Nq_pad, int(rows), p.d, x);
    CUDA_CHECK_LAUNCH();

    if (p.deterministic && !kDropout) {  // dk_dv without dQ, then the dq kernel (kDropout: the dispatch never asks)
        launch_dk_dv<T, kD, kStep, kExactD, kExt, false>(p, Q_read, K, V, dO_read, lse_log2, D, nullptr, dK, dV, Nq_pad,
                                                         x, staged_d > 0, stream);
        constexpr int dq_smem = dq_smem_bytes<kD>();
        static const cudaError_t dq_attribute_set =
            cudaFuncSetAttribute(dq_kernel<T, kD, kExt != Ext::none>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                 dq_smem);
        CUDA_CHECK(dq_attribute_set);
        dq_kernel<T, kD, kExt != Ext::none><<<dim3(ceil_div(p.Nq, kDqRows), BH), kDqThreads, dq_smem, stream>>>(
            Q, K, V, dO, lse_log2, D, dQ, p.Nq, p.Nk, Nq_pad, p.d, p.causal, p.resolved_scale(), x);
        CUDA_CHECK_LAUNCH();
        if (dS_heads) {
            const int threads = 256;
            reduce_dbias_kernel<<<unsigned(ceil_div(p.bias_elems(), size_t(threads))), threads, 0, stream>>>(
                dS_heads, in.dbias, p.B, p.H, p.bias_batch, p.bias_heads, size_t(p.Nq) * p.Nk);
            CUDA_CHECK_LAUNCH();
        }
        return;
    }
    launch_dk_dv<T, kD, kStep, kExactD, kExt, true, kDropout>(p, Q_read, K, V, dO_read, lse_log2, D, dQ_accum, dK_heads,
                                                              dV_heads, Nq_pad, x, staged_d > 0, stream);
    if (group_sum) {
        group_sum_kernel<T><<<group_blocks, 256, 0, stream>>>(dK_heads, dK, p.group(), slice, kv_elems);
        CUDA_CHECK_LAUNCH();
        group_sum_kernel<T><<<group_blocks, 256, 0, stream>>>(dV_heads, dV, p.group(), slice, kv_elems);
        CUDA_CHECK_LAUNCH();
    }
    const size_t n_elems = p.q_elems();
    const int threads = 256;
    const size_t blocks = ceil_div(n_elems / 4, size_t(threads));
    convert_dq_kernel<T, Features<kStep>::kDqFragments><<<unsigned(blocks), threads, 0, stream>>>(
        dQ_accum, dQ, p.Nq, Nq_pad, p.d, kD, n_elems, p.resolved_scale(), x);
    CUDA_CHECK_LAUNCH();
}

// Tiles whose final dk_dv kernel also has a variant for d == kD with d a compile-time constant, beside the one for
// any d <= kD (as in forward_mma.cu): the head dims of the benchmarks (64, 128) and 256. Why: on an H200 the
// runtime-d backward alone ran 10% (d = 64) and 7% (d = 128) slower than the one before it, which had d = kD (fp16,
// N = 4096, B = 4, hidden 2048; docs/measured/v2_head_dims_run2.log). Part of that may be col0 above, which was a
// runtime value then. That this variant wins the time back is not yet measured.
template <int kD>
constexpr bool kExactVariant = kD == 64 || kD == 128 || kD == 256;

template <int kD, int kStep>
size_t dk_dv_smem_bytes(bool ext) {  // ext: Ext::all (Ext::layout's tiles are the default ones)
    return ext ? DkDvTiles<kD, kStep, Ext::all>::L::bytes : DkDvTiles<kD, kStep, Ext::none>::L::bytes;
}
// The step whose kernels are the final ones on a GPU that allows smem_per_block bytes of shared memory a block:
// step 7's second dS^T stage at the 64 tile (194 KiB) is more than an A100 has (163 KiB), which runs step 6 there.
template <int kD>
int final_step(size_t smem_per_block) {
    return dk_dv_smem_bytes<kD, kFinalStep>(false) <= smem_per_block ? kFinalStep : kFinalStep - 1;
}
size_t gpu_smem_per_block_now() {  // of the current device
    int device = 0, bytes = 0;
    CUDA_CHECK(cudaGetDevice(&device));
    CUDA_CHECK(cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    return size_t(bytes);
}

// The final kernels: kStep is kFinalStep, or step 6 at the 64 tile on a GPU that cannot hold step 7's (final_step).
// The bias kernel (Ext::all) is the same at both, and compiled once.
template <typename T, int kD, int kStep>
std::string launch_final(const Problem& p, const void* Q, const void* K, const void* V, const void* O,
                         const float* LSE, const void* dO, void* dQ, void* dK, void* dV, void* workspace,
                         const ExtensionPointers& ext, cudaStream_t stream) {
    auto in = [](const void* x) { return static_cast<const T*>(x); };
    auto out = [](void* x) { return static_cast<T*>(x); };
    const FinalKernel k = final_kernel(p);
    if constexpr (kD <= 128) {  // final_kernel chooses these for d = 64 and 128 only (p.d == kD)
        if (k.ext == Ext::none && k.dropout) {
            launch<T, kD, kStep, true, Ext::none, true>(p, in(Q), in(K), in(V), in(O), LSE, in(dO), out(dQ),
                                                             out(dK), out(dV), workspace, ext, stream);
            return "";
        }
        if (k.ext == Ext::layout) {
            if (k.dropout)
                launch<T, kD, kStep, true, Ext::layout, true>(p, in(Q), in(K), in(V), in(O), LSE, in(dO),
                                                                   out(dQ), out(dK), out(dV), workspace, ext, stream);
            else
                launch<T, kD, kStep, true, Ext::layout>(p, in(Q), in(K), in(V), in(O), LSE, in(dO), out(dQ),
                                                             out(dK), out(dV), workspace, ext, stream);
            return "";
        }
    }
    if (k.ext == Ext::all) {
        launch<T, kD, kFinalStep, false, Ext::all>(p, in(Q), in(K), in(V), in(O), LSE, in(dO), out(dQ), out(dK),
                                                   out(dV), workspace, ext, stream);
        return "";
    }
    if constexpr (kExactVariant<kD>) {
        if (p.d == kD) {
            launch<T, kD, kStep, true, Ext::none>(p, in(Q), in(K), in(V), in(O), LSE, in(dO), out(dQ), out(dK),
                                                   out(dV), workspace, ext, stream);
            return "";
        }
    }
    launch<T, kD, kStep, false, Ext::none>(p, in(Q), in(K), in(V), in(O), LSE, in(dO), out(dQ), out(dK), out(dV),
                                            workspace, ext, stream);
    return "";
}

template <typename T, int kD>
std::string launch_step(const Problem& p, const void* Q, const void* K, const void* V, const void* O,
                        const float* LSE, const void* dO, void* dQ, void* dK, void* dV, void* workspace,
                        const ExtensionPointers& ext, cudaStream_t stream) {
    auto in = [](const void* x) { return static_cast<const T*>(x); };
    auto out = [](void* x) { return static_cast<T*>(x); };
    const int step = step_of(p);
    if (step == kFinalStep) {
        if constexpr (kD == 64)
            if (final_step<kD>(gpu_smem_per_block_now()) != kFinalStep)
                return launch_final<T, kD, kFinalStep - 1>(p, Q, K, V, O, LSE, dO, dQ, dK, dV, workspace, ext, stream);
        return launch_final<T, kD, kFinalStep>(p, Q, K, V, O, LSE, dO, dQ, dK, dV, workspace, ext, stream);
    }
    if constexpr (std::is_same_v<T, __half> && kD <= 128) {
        switch (step) {
            case 1:
                launch<T, kD, 1, true, Ext::none>(p, in(Q), in(K), in(V), in(O), LSE, in(dO), out(dQ), out(dK), out(dV),
                                              workspace, ext, stream);
                return "";
            case 2:
                launch<T, kD, 2, true, Ext::none>(p, in(Q), in(K), in(V), in(O), LSE, in(dO), out(dQ), out(dK), out(dV),
                                              workspace, ext, stream);
                return "";
            case 3:
                launch<T, kD, 3, true, Ext::none>(p, in(Q), in(K), in(V), in(O), LSE, in(dO), out(dQ), out(dK), out(dV),
                                              workspace, ext, stream);
                return "";
            case 4:
                launch<T, kD, 4, true, Ext::none>(p, in(Q), in(K), in(V), in(O), LSE, in(dO), out(dQ), out(dK), out(dV),
                                              workspace, ext, stream);
                return "";
            case 5:
                launch<T, kD, 5, true, Ext::none>(p, in(Q), in(K), in(V), in(O), LSE, in(dO), out(dQ), out(dK), out(dV),
                                              workspace, ext, stream);
                return "";
            case 6:
                launch<T, kD, 6, true, Ext::none>(p, in(Q), in(K), in(V), in(O), LSE, in(dO), out(dQ), out(dK), out(dV),
                                              workspace, ext, stream);
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
                         const ExtensionPointers& ext, cudaStream_t stream) {
    switch (v2_backward_mma_head_dim_tile(p.d)) {
        case 64: return launch_step<T, 64>(p, Q, K, V, O, LSE, dO, dQ, dK, dV, workspace, ext, stream);
        case 128: return launch_step<T, 128>(p, Q, K, V, O, LSE, dO, dQ, dK, dV, workspace, ext, stream);
        case 192: return launch_step<T, 192>(p, Q, K, V, O, LSE, dO, dQ, dK, dV, workspace, ext, stream);
        case 256: return launch_step<T, 256>(p, Q, K, V, O, LSE, dO, dQ, dK, dV, workspace, ext, stream);
        default: return "v2 backward (mma) has no tile for head dim " + std::to_string(p.d);
    }
}

}  // namespace

KeyBand key_band(const Problem& p) {
    KeyBand band;
    if (p.window_left >= 0) band.left = std::min(p.window_left, KeyBand::kUnbounded);
    if (p.window_right >= 0) band.right = std::min(p.window_right, KeyBand::kUnbounded);
    if (p.causal) band.right = std::min(band.right, 0);
    return band;
}

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
        reason = "v2 backward (mma) needs B*H <= 65535 (a grid dimension), got " + std::to_string(long(p.B) * p.H);
    else if (p.kernel < 0 || p.kernel > n_steps)
        reason = "v2 backward (mma) has steps 1.." + std::to_string(n_steps) + " (0 = the final one), got " +
                 std::to_string(p.kernel);
    else if (p.kernel != 0 && p.kernel != n_steps && (p.dtype != DType::fp16 || (p.d != 64 && p.d != 128)))
        reason = "v2 backward (mma) steps before the final one are compiled for fp16 and d = 64, 128 only (got " +
                 std::string(dtype_name(p.dtype)) + ", d = " + std::to_string(p.d) + ")";
    else if (p.has_extensions() && p.kernel != 0 && p.kernel != n_steps)
        reason = "v2 backward (mma): --kv-heads, --window, --dropout, --bias, --alibi and --seqlens are in the final "
                 "kernel only (--kernel " + std::to_string(n_steps) + " or 0)";
    else if (p.varlen() && p.has_bias())
        reason = "v2 backward (mma): --seqlens with --bias is not supported (such a bias has no packed form)";
    else if (p.dO_token_major && (p.kernel != 0 || final_kernel(p).ext != Ext::none))
        reason = "v2 backward (mma): a [B, Nq, H, d] dO is read by the final kernel without --window, --bias, --alibi "
                 "or --seqlens only";
    if (why) *why = reason;
    return reason.empty();
}

std::string v2_backward_mma_kernel(const Problem& p) {
    if (step_of(p) != kFinalStep) return "step " + std::to_string(step_of(p));
    const FinalKernel k = final_kernel(p);
    const char* names[] = {"default", "layout", "all"};
    return std::string(names[int(k.ext)]) + (k.dropout ? " + dropout" : "") + (k.group_sum ? " + group sum" : "");
}

namespace {
template <int kD>
size_t backward_smem_bytes(const Problem& p, size_t smem_per_block) {
    size_t bytes = final_step<kD>(smem_per_block) == kFinalStep
                       ? std::max(dk_dv_smem_bytes<kD, kFinalStep>(false), dk_dv_smem_bytes<kD, kFinalStep>(true))
                       : std::max(dk_dv_smem_bytes<kD, kFinalStep - 1>(false), dk_dv_smem_bytes<kD, kFinalStep - 1>(true));
    if constexpr (kD <= 128) {  // the earlier steps' tiles (compiled for d = 64 and 128 only)
        switch (step_of(p)) {
            case 1: bytes = dk_dv_smem_bytes<kD, 1>(false); break;
            case 2: bytes = dk_dv_smem_bytes<kD, 2>(false); break;
            case 3: bytes = dk_dv_smem_bytes<kD, 3>(false); break;
            case 4: bytes = dk_dv_smem_bytes<kD, 4>(false); break;
            case 5: bytes = dk_dv_smem_bytes<kD, 5>(false); break;
            case 6: bytes = dk_dv_smem_bytes<kD, 6>(false); break;
            default: break;
        }
    }
    return p.deterministic ? std::max(bytes, size_t(dq_smem_bytes<kD>())) : bytes;
}
}  // namespace

size_t v2_backward_mma_smem_bytes(const Problem& p, size_t smem_per_block) {
    switch (v2_backward_mma_head_dim_tile(p.d)) {
        case 64: return backward_smem_bytes<64>(p, smem_per_block);
        case 128: return backward_smem_bytes<128>(p, smem_per_block);
        case 192: return backward_smem_bytes<192>(p, smem_per_block);
        case 256: return backward_smem_bytes<256>(p, smem_per_block);
        default: return 0;
    }
}

size_t v2_backward_mma_workspace_bytes(const Problem& p) {
    // LSE in log2 units [rows], D [rows], and with atomics the fp32 dQ accumulator [rows, tile]; under
    // --deterministic with a shared bias, each head's dS [B, H, Nq, Nk]; with group_sum, each query head's K, V, dK,
    // dV; from a 16-byte boundary on, with staged_d_of(p) > 0, the staged copies of Q and dO (of T, 2 bytes; also
    // where the 64 tile falls back to step 6, which does not read them: the size does not depend on the GPU)
    return unstaged_workspace_bytes(p) + (step_of(p) == kFinalStep ? 2 * staged_elems(p) * 2 : 0);
}

namespace {
size_t unstaged_workspace_bytes(const Problem& p) {
    const size_t rows = workspace_rows(p);
    size_t floats = rows * (2 + (p.deterministic ? 0 : v2_backward_mma_head_dim_tile(p.d)));
    if (dS_per_head(p)) floats += size_t(p.B) * p.H * p.Nq * p.Nk;
    size_t bytes = floats * sizeof(float);
    if (step_of(p) == kFinalStep && final_kernel(p).group_sum)  // each query head's K, V, dK and dV, of T (2 bytes)
        bytes += 4 * group_sum_head_elems(p) * 2;
    return ceil_div(bytes, size_t(16)) * 16;
}
}  // namespace

std::string v2_backward_mma(const Problem& p, const void* Q, const void* K, const void* V, const void* O,
                            const float* LSE, const void* dO, void* dQ, void* dK, void* dV, void* workspace,
                            const float* bias, float* dbias, const int* cu_seqlens_q, const int* cu_seqlens_k,
                            cudaStream_t stream) {
    std::string why;
    if (!v2_backward_mma_supports(p, &why)) return why;
    if (p.has_bias() && (!bias || !dbias)) return "v2 backward (mma): --bias needs the bias and dbias device pointers";
    if (p.varlen() && (!cu_seqlens_q || !cu_seqlens_k))
        return "v2 backward (mma): --seqlens needs the cu_seqlens_q and cu_seqlens_k device pointers";
    const ExtensionPointers ext{bias, dbias, cu_seqlens_q, cu_seqlens_k};
    if (p.dtype == DType::fp16)
        return launch_for_d<__half>(p, Q, K, V, O, LSE, dO, dQ, dK, dV, workspace, ext, stream);
    return launch_for_d<__nv_bfloat16>(p, Q, K, V, O, LSE, dO, dQ, dK, dV, workspace, ext, stream);
}
