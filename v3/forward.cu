// forward.cu: the FlashAttention-3 forward pass on Hopper (Shah et al., 2024, Algorithm 1 for the warp-specialised
// kernel, Algorithm 2 for the softmax/product overlap), fp16 and bf16, head dims 64, 128 and 256.
//
// One CTA owns one Q tile Q_i of Br rows of one (batch, head). Each consumer warpgroup owns 64 of those rows (one
// wgmma m64 tile) and walks the K/V tiles K_j, V_j of Bc = 128 keys (64 at d = 256, 80 from step 11):
//
//     S    = Q_i K_j^T                          wgmma m64n{Bc}k16, Q and K from shared memory, fp32 accumulators
//     m'   = max(m_i, rowmax(S) * scale log2 e)  statistics in the log2 domain, fp32
//     P    = exp2(S * scale log2 e - m')         one FFMA + one EX2 per score; P rounded to 16 bits, in registers
//     l_i  = l_i exp2(m_i - m') + rowsum(P)
//     O_i  = O_i exp2(m_i - m') + P V_j          wgmma m64n64k16 per 64 columns, P from registers, V from shared
//
// and at the end writes O_i / l_i and LSE_i = (m_i + log2 l_i) ln 2. Symbols as in v2/forward_mma.cu; `// line N`
// comments are the lines of Algorithm 1 of the FlashAttention-3 paper (arXiv 2407.08608; producer warpgroup:
// lines 3-11, consumers: lines 12-26). Algorithm 2 (steps 3-5 here) moves line 22 of tile j-1 after line 18 of j.
//
// Data movement: the K/V tiles live in a ring of kStages stages in shared memory, each guarded by two mbarriers:
// full[s] (the producer announces the stage's bytes with expect_tx; TMA completes them) and empty[s] (every consumer
// warp arrives once it has finished reading the stage). Q_i has its own barrier. All tiles are stored the way TMA
// writes them with a 128-byte swizzle (hopper.cuh), and the wgmma descriptors use the same swizzle.
//
// The steps (bin/v3 --kernel K) are one template, Features<kStep>, each switching on one more idea:
//   1 tma-wgmma    one warpgroup: its thread 0 issues the copies (one K/V tile ahead), the warpgroup computes
//   2 warp-spec    a producer warpgroup (24 registers a thread) issues the copies, two consumers (240) compute
//   3 ping-pong    the consumers take turns at the tensor cores (named barriers): one's softmax runs while the
//                  other's products do; the product block of a turn is S_j = Q K_j^T and O += P_{j-1} V_{j-1}
//   4 overlap      Algorithm 2's waits: the softmax of S_j written between the wait for S_j and the wait for
//                  O += P_{j-1} V_{j-1}. ptxas moves the second wait up to the softmax's start, so the compiled
//                  kernel keeps step 3's schedule; forced, the overlap measured slower (docs/v3.md, "Step 4")
//   5 tma-store    O_i leaves through shared memory (Q_i's space) and a TMA store
//   6 deep-ring    the K/V ring holds 3 tiles (4 at d = 64) instead of 2: the producer runs further ahead
//   7 persistent   a CTA per SM walks many Q tiles; the producer loads the next Q_i and its first K/V tiles while
//                  the consumers finish the last one (O leaves from registers again: Q_i's space is being reused)
//   8 poly-exp     at d = 64, a sixteenth of the softmax's exponentials on the FMA pipe (a polynomial, exp2_poly.h),
//                  the rest on MUFU: there MUFU alone takes as long as the tile's products (d = 128: step 7)
//   9 three-wg     at d = 64, three consumer warpgroups (Q tiles of 192 rows, 160 registers a thread) take turns
//                  at the tensor cores: more warps to hide the softmax's latencies (d = 128: step 8, which needs 240)
//  10 lazy-rescale a row's running max m moves only when the tile's max passes it by more than 8 (log2 domain):
//                  most tiles then skip O's rescale (alpha = 1), and P stays below 2^8, safe in fp16 and bf16
//  11 wide-kv      at d = 256, K/V tiles of 80 keys instead of 64: S = Q K^T by m64n80k16, which reads 10% fewer
//                  shared-memory bytes a FLOP (by our count the n64 product needs the shared memory's whole bandwidth)
#include "v3.h"
#include "cuda_check.h"
#include "common/blocks.cuh"
#include "exp2_poly.h"
#include "hopper.cuh"
#include "schedule.h"
#include "v2/mma.cuh"  // pack2, exp2_approx, shared_addr

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cudaTypedefs.h>  // PFN_cuTensorMapEncodeTiled
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

namespace v3_fwd {

using namespace v3_ptx;
using v2_ptx::exp2_approx;
using v2_ptx::named_barrier_arrive;
using v2_ptx::named_barrier_sync;
using v2_ptx::pack2;
using v2_ptx::shared_addr;

template <int kStep>
struct Features {
    static constexpr bool kWarpSpecialised = kStep >= 2;
    static constexpr bool kPingPong = kStep >= 3;
    static constexpr bool kOverlap = kStep >= 4;
    static constexpr bool kDeepRing = kStep >= 6;
    static constexpr bool kPersistent = kStep >= 7;
    // Step 7 stores O from registers again: Q_i's space, where steps 5-6 stage O, is then already being refilled
    // with the next Q tile (steps 4 and 5 together had measured -0.6% to +1.4% over step 3, docs/v3.md).
    static constexpr bool kTmaStore = kStep >= 5 && !kPersistent;
    static constexpr bool kPolyExp = kStep >= 8;  // step 8: some exponentials by polynomial, d = 64 (Tiles)
    static constexpr bool kThreeConsumers = kStep >= 9;  // step 9: three consumer warpgroups at d = 64 (Tiles)
    static constexpr bool kLazyRescale = kStep >= 10;    // step 10: m moves only by more than kRescaleSlack
    static constexpr bool kWideKV = kStep >= 11;         // step 11: K/V tiles of 80 keys at d = 256 (Tiles)
};
constexpr int kFinalStep = 11;

// Named barriers 1, 2 (and 3): the turns of consumers 0, 1 (and 2) in the ping-pong; 4 and 5: each consumer's own
// warpgroup before its TMA store (steps 5-6, two consumers).
constexpr int kTurnBarrier = 1, kStoreBarrier = 4;

// Tile sizes and the shared-memory map of one instantiation. Every tile is d/64 blocks of rows x 128 bytes (one TMA
// box each), 1024-byte aligned so that the 128-byte swizzle pattern starts at each 8-row group.
template <int kD, int kStep>
struct Tiles {
    // Consumer warpgroups, 64 query rows each: one without warp specialisation, two, or three from step 9 at d = 64.
    static constexpr int kConsumers =
        !Features<kStep>::kWarpSpecialised ? 1 : Features<kStep>::kThreeConsumers && kD == 64 ? 3 : 2;
    static constexpr int kThreads = 128 * (kConsumers + (Features<kStep>::kWarpSpecialised ? 1 : 0));
    // Registers per thread after setmaxnreg (multiples of 8): 128 x 24 + 256 x 240 = 64,512 of the 65,536 with two
    // consumers; 128 x 24 + 384 x 160 = 64,512 with three (d = 64: O 32, S 64, P 32 registers and the rest).
    static constexpr int kProducerRegs = 24, kConsumerRegs = kConsumers == 3 ? 160 : 240;
    static constexpr int kBr = 64 * kConsumers;
    // K/V tiles of 128 keys; 64 at d = 256, where O alone takes 128 registers a thread: S (Bc/2), P (Bc/4) and O
    // are alive together, 224 of the 240 with Bc = 128 (no room for addresses and the softmax), 176 with 64.
    // Step 11 at d = 256: 80 keys, S 40 + P 20 + O 128 = 188 registers, and 2 x 2 x 40 KiB of K and V beside 64 KiB
    // of Q: 225 KiB of shared memory. Why wider, by our count: a wgmma m64nNk16 with both operands in shared memory
    // reads 2 KiB of Q and N x 32 bytes of K for 2 x 64 x N x 16 FLOPs; at N = 64, 128 bytes for every 4,096 FLOPs,
    // what an SM's shared memory delivers (128 bytes a cycle) while its tensor cores do them (4,096 dense fp16 FLOPs
    // a cycle); at N = 80, 115 bytes.
    static constexpr int kBc = kD == 256 ? (Features<kStep>::kWideKV ? 80 : 64) : 128;
    // The ring: 2 stages until step 6, then as many as shared memory holds beside Q_i (at d = 128: 32 KiB of Q
    // and 3 x 64 KiB of K and V, 225 KiB of the 227 a block may have). With 2 stages the producer may refill
    // stage s only once both consumers have finished P_j V_j on it, which the ping-pong delays by a turn: a third
    // stage lets the copy of tile j+2 start while tile j is still being read. At d = 256 a third stage does not fit
    // (64 KiB of Q + 3 x 64 KiB): step 6 is step 5 there.
    static constexpr int kStages = !Features<kStep>::kDeepRing || kD == 256 ? 2 : kD == 64 ? 4 : 3;
    // Step 8's polynomial at d = 64 only: at d = 128 a tile's products take twice as long as its exponentials on
    // MUFU, and moving some to the FMA pipe cost 0.3-1.4% there (H200, docs/v3.md "Step 8 against step 7").
    static constexpr bool kPolyExp = Features<kStep>::kPolyExp && kD == 64;
    static constexpr int kColBlocks = kD / 64;                  // 64-column (128-byte) blocks of a row
    static constexpr int kQBytes = kBr * kD * 2;
    static constexpr int kKVBytes = kBc * kD * 2;               // one K tile (or one V tile)
    static constexpr int kBarrierBytes = 8 * (2 * kStages + 2);  // full[], empty[], Q full, Q empty
    static constexpr int kSmem = 1024 + kQBytes + 2 * kStages * kKVBytes + kBarrierBytes;  // 1024: alignment slack
};

// ---------------------------------------------------------------------------------------------------------------
// The consumer's pieces. A warpgroup's thread (warp w, lane = 4g + t) holds rows 16w + g and 16w + g + 8 of its 64.

// Issues S = Q_i K_j^T (d/16 wgmma of k = 16). sQ_rows: this warpgroup's 64 rows of block 0 of Q_i; sK: stage's K.
// Each operand's descriptor is built once and advanced by the k step's byte offset (one 32-bit add; building every
// descriptor from its address took about 5 uniform-datapath instructions each, a quarter of the loop's issue).
template <typename T, int kD, int kStep>
__device__ __forceinline__ void issue_s(float (&S)[Tiles<kD, kStep>::kBc / 2], uint32_t sQ_rows, uint32_t sK) {
    using L = Tiles<kD, kStep>;
    const uint64_t a0 = smem_descriptor(sQ_rows, 16, 1024), b0 = smem_descriptor(sK, 16, 1024);
#pragma unroll
    for (int k = 0; k < kD / 16; ++k) {
        const uint32_t block = k / 4, in_row = k % 4 * 32;  // 64-column block, byte offset of the k step in a row
        const uint64_t a = advance_descriptor(a0, block * L::kBr * 128 + in_row);
        const uint64_t b = advance_descriptor(b0, block * L::kBc * 128 + in_row);
        if constexpr (L::kBc == 80)
            wgmma_m64n80k16_ss<T>(S, a, b, k > 0);
        else if constexpr (L::kBc == 128)
            wgmma_m64n128k16_ss<T>(S, a, b, k > 0);
        else
            wgmma_m64n64k16_ss<T>(S, a, b, k > 0);
    }
}

// Issues O += P V_j: for each 64-column block of O, Bc/16 wgmma of k = 16 keys, P's k block from registers.
template <typename T, int kD, int kStep>
__device__ __forceinline__ void issue_pv(float (&O)[kD / 64][32], const uint32_t (&P)[Tiles<kD, kStep>::kBc / 16][4],
                                         uint32_t sV) {
    using L = Tiles<kD, kStep>;
    const uint64_t b0 = smem_descriptor(sV, L::kBc * 128, 1024);
#pragma unroll
    for (int n = 0; n < kD / 64; ++n) {
#pragma unroll
        for (int k = 0; k < L::kBc / 16; ++k) {
            const uint64_t b = advance_descriptor(b0, n * L::kBc * 128 + k * 16 * 128);
            wgmma_m64n64k16_rs<T>(O[n], P[k], b, 1);
        }
    }
}

template <int kD>
__device__ __forceinline__ void fence_o(float (&O)[kD / 64][32]) {
#pragma unroll
    for (int n = 0; n < kD / 64; ++n) fence_registers(O[n]);
}

// Step 8: which of a thread's scores take their exponential from the polynomial on the FMA pipe (exp2_poly.h)
// instead of MUFU.EX2. A thread holds 2 scores of each of its two rows in each of S's 16 n8 blocks; block i goes to
// the polynomial when i % kPolyEvery == kPolyEvery - 1: with 16, block 15 only, 2 of the row's 32 scores a thread
// holds (1/16). Why so few (docs/v3.md, "Step 8"): a warp's tile at d = 64 is 467 instructions to issue (step 7's
// SASS, unmasked tile) against 66 MUFU.EX2 that keep MUFU busy 528 clocks (4 lanes a clock per SM sub-partition).
// Each exponential moved takes 8 clocks off MUFU and adds 8 instructions (exp2_poly's 9 for one MUFU.EX2), so the two
// meet at about 4 scores of the thread's 64; a quarter (kPolyEvery = 4) would make the warp issue-bound at ~596.
// The set is fixed at compile time (the loops are unrolled: no branch, every thread alike).
constexpr int kPolyEvery = 16;
__device__ constexpr bool poly_exp_block(int i) { return i % kPolyEvery == kPolyEvery - 1; }

// The online softmax of one tile of Bc keys (lines 19-20 of Algorithm 1): masks S, updates m and l, and turns S
// into P in place (fp32), with alpha = exp2(m_old - m_new), the factor O must be rescaled by. row[h] is the query
// row of this thread's rows, j the K/V tile; `masked`: some key of the tile is hidden from some row (v3_kv_tiles).
// A row with no key seen yet has m = -inf; it subtracts 0 instead (every p is 0 then), so -inf - -inf never
// happens. kPolyExp (step 8): the scores of poly_exp_block use exp2_poly; l adds the very value that becomes P,
// whichever unit made it.
//
// kLazy (step 10): the running max m of a row moves only when the tile's max passes it by more than kRescaleSlack
// (the exponentials then stay below 2^kRescaleSlack = 256: P and l stay finite in fp32, P in fp16 and bf16). When no
// row of the warp moves, alpha is 1 and the function returns false: the caller skips O's rescale, d / 2 multiplies
// a thread per tile (32, 64, 128). When one row moves, every row of the warp takes its exact max, so the
// choice is warp-uniform. O, l and m stay consistent whichever m is used: O / l and m + log2 l do not depend on it.
// Returns whether O must be rescaled by alpha (always, before step 10).
constexpr float kRescaleSlack = 8.0f;
template <int kBc, bool kCausal, bool kPolyExp, bool kLazy = false>
__device__ __forceinline__ bool online_softmax(float (&S)[kBc / 2], float (&m)[2], float (&l)[2], float (&alpha)[2],
                                               const int (&row)[2], int j, bool masked, int Nq, int Nk,
                                               float scale_log2) {
    if (masked) {
        const int col0 = j * kBc + 2 * (threadIdx.x % 4);  // key of S[4i + 2h + e] is col0 + 8i + e
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int sees = kCausal ? min(Nk, causal_key_end(row[h], Nq, Nk)) : Nk;  // keys [0, sees) visible
#pragma unroll
            for (int i = 0; i < kBc / 8; ++i)
#pragma unroll
                for (int e = 0; e < 2; ++e)
                    if (col0 + 8 * i + e >= sees) S[4 * i + 2 * h + e] = -INFINITY;
        }
    }
    float mx[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        mx[h] = -INFINITY;
#pragma unroll
        for (int i = 0; i < kBc / 8; ++i) mx[h] = fmaxf(mx[h], fmaxf(S[4 * i + 2 * h], S[4 * i + 2 * h + 1]));
        mx[h] = warp_max<4>(mx[h]) * scale_log2;  // the 4 lanes of a quad hold one row
    }
    bool move = true;  // -inf > -inf + slack is false: a row that has seen no key yet stays at -inf until it does
    if constexpr (kLazy) move = __any_sync(0xffffffffu, mx[0] > m[0] + kRescaleSlack || mx[1] > m[1] + kRescaleSlack);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const float m_new = move ? fmaxf(m[h], mx[h]) : m[h];
        const float m_use = m_new == -INFINITY ? 0.0f : m_new;
        alpha[h] = move ? exp2_approx(m[h] - m_use) : 1.0f;
        m[h] = m_new;
        float sum = 0.0f;
#pragma unroll
        for (int i = 0; i < kBc / 8; ++i)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                float& s = S[4 * i + 2 * h + e];
                const float x = fmaf(s, scale_log2, -m_use);
                s = kPolyExp && poly_exp_block(i) ? exp2_poly(x) : exp2_approx(x);
                sum += s;
            }
        l[h] = l[h] * alpha[h] + sum;  // this thread's columns only; the quad adds them up at the end
    }
    return move;
}

// P, 16-bit, as the A fragments of P V: accumulators of n8 blocks 2k, 2k+1 packed pairwise = k block k
// (hopper.cuh). In the overlap step this runs only once the previous P V is done: registers that a later wgmma
// reads, written while another wgmma is in flight, make ptxas serialise the pipeline (C7513).
template <typename T, int kBc>
__device__ __forceinline__ void pack_p(const float (&S)[kBc / 2], uint32_t (&P)[kBc / 16][4]) {
#pragma unroll
    for (int k = 0; k < kBc / 16; ++k) {
        P[k][0] = pack2<T>(S[8 * k + 0], S[8 * k + 1]);
        P[k][1] = pack2<T>(S[8 * k + 2], S[8 * k + 3]);
        P[k][2] = pack2<T>(S[8 * k + 4], S[8 * k + 5]);
        P[k][3] = pack2<T>(S[8 * k + 6], S[8 * k + 7]);
    }
}

template <int kD>
__device__ __forceinline__ void rescale_o(float (&O)[kD / 64][32], const float (&alpha)[2]) {
#pragma unroll
    for (int n = 0; n < kD / 64; ++n)
#pragma unroll
        for (int i = 0; i < 32; ++i) O[n][i] *= alpha[i % 4 / 2];
}

// ---------------------------------------------------------------------------------------------------------------
// The kernel. Grid: one CTA per Q tile (ceil(Nq / Br) * heads of them), or from step 7 at most one per SM. Block:
// Tiles<kD, kStep>::kThreads. scale_log2 = scale * log2 e.

template <typename T, int kD, bool kCausal, int kStep>
__global__ void __launch_bounds__(Tiles<kD, kStep>::kThreads, 1)
    forward_kernel(const __grid_constant__ CUtensorMap tm_q, const __grid_constant__ CUtensorMap tm_k,
                   const __grid_constant__ CUtensorMap tm_v, const __grid_constant__ CUtensorMap tm_o,
                   T* __restrict__ O_out, float* __restrict__ LSE, int Nq, int Nk, int heads, float scale_log2) {
    using F = Features<kStep>;
    using L = Tiles<kD, kStep>;
    static_assert(kD == 64 || kD == 128 || kD == 256, "head dims 64, 128 and 256");

    extern __shared__ unsigned char smem_raw[];
    const uint32_t sQ = (shared_addr(smem_raw) + 1023) & ~1023u;
    const uint32_t sK = sQ + L::kQBytes;                  // kStages K tiles
    const uint32_t sV = sK + L::kStages * L::kKVBytes;    // kStages V tiles
    const uint32_t bars = sV + L::kStages * L::kKVBytes;  // full[kStages], empty[kStages], Q full, Q empty
    auto full = [&](int s) { return bars + 8 * s; };
    auto empty = [&](int s) { return bars + 8 * (L::kStages + s); };
    const uint32_t q_full = bars + 16 * L::kStages, q_empty = q_full + 8;

    const V3TileOrder order = v3_tile_order(Nq, L::kBr, heads, F::kPersistent, kCausal);  // schedule.h
    struct QTile {
        int bh, q0;    // head, first query row
        V3KvTiles kv;  // the K/V tiles it visits
    };
    auto q_tile_at = [&](int pos) {  // the Q tile at position pos of the grid's sequence
        int bh, i;
        order.tile(pos, &bh, &i);
        return QTile{bh, i * L::kBr, v3_kv_tiles(i * L::kBr, L::kBr, Nq, Nk, L::kBc, kCausal)};
    };

    if (threadIdx.x == 0) {
        for (int s = 0; s < L::kStages; ++s) {
            mbarrier_init(full(s), 1);                     // the producer's arrive (with the bytes)
            mbarrier_init(empty(s), 4 * L::kConsumers);    // one arrive per consumer warp
        }
        mbarrier_init(q_full, 1);
        mbarrier_init(q_empty, 4 * L::kConsumers);  // step 7: every consumer warp is done with Q_i
        fence_barrier_init();
    }
    __syncthreads();

    // The producer's two jobs (lines 5-6 and 8-10). One thread issues every copy. The ring position `it` counts the
    // K/V tiles this CTA has loaded over all its Q tiles: stage it % kStages, lap it / kStages.
    auto load_q = [&](int q0, int bh) {
        mbarrier_arrive_expect_tx(q_full, L::kQBytes);
        for (int c = 0; c < L::kColBlocks; ++c) tma_load_3d(sQ + c * L::kBr * 128, &tm_q, q_full, 64 * c, q0, bh);
    };
    auto load_kv = [&](int it, int j, int bh) {
        const int s = it % L::kStages;
        mbarrier_wait(empty(s), (it / L::kStages + 1) % 2, "empty", s);  // the first lap passes at once
        mbarrier_arrive_expect_tx(full(s), 2 * L::kKVBytes);
        for (int c = 0; c < L::kColBlocks; ++c) {
            const uint32_t at = s * L::kKVBytes + c * L::kBc * 128;
            tma_load_3d(sK + at, &tm_k, full(s), 64 * c, j * L::kBc, bh);
            tma_load_3d(sV + at, &tm_v, full(s), 64 * c, j * L::kBc, bh);
        }
    };

    const int wg = threadIdx.x / 128;
    if constexpr (F::kWarpSpecialised) {
        if (wg == 0) {  // the producer warpgroup (line 3)
            setmaxnreg_dec<L::kProducerRegs>();  // line 4
            if (threadIdx.x == 0) {
                int it = 0, q_loads = 0;
                for (int pos = order.first(blockIdx.x); pos < order.positions; pos = order.next(pos, gridDim.x)) {
                    const auto [bh, q0, kv] = q_tile_at(pos);
                    if (kv.n_tiles == 0) continue;  // no key to see: the consumers write O = 0 without Q_i
                    // Step 7: Q_i's space is free once every consumer has finished its last S of the tile before.
                    mbarrier_wait(q_empty, (q_loads + 1) % 2, "Q empty", 0);  // the first Q passes at once
                    load_q(q0, bh);
                    ++q_loads;
                    for (int j = 0; j < kv.n_tiles; ++j) load_kv(it++, j, bh);  // line 7
                }
            }
            return;
        }
        setmaxnreg_inc<L::kConsumerRegs>();  // line 13
    }

    // ------------------------------------------------------------------------------------------- consumer (line 12)
    const int c = F::kWarpSpecialised ? wg - 1 : 0;  // this consumer warpgroup: rows 64c .. 64c + 63 of Q_i
    const int tid = threadIdx.x % 128, warp = tid / 32, lane = tid % 32;
    const uint32_t sQ_rows = sQ + 64 * c * 128;
    int it = 0, q_uses = 0;  // the ring position of this tile's K/V tile 0; Q tiles read so far

    for (int pos = order.first(blockIdx.x); pos < order.positions; pos = order.next(pos, gridDim.x)) {
        const auto [bh, q0, kv] = q_tile_at(pos);  // this CTA's next Q tile
        const int row[2] = {q0 + 64 * c + 16 * warp + lane / 4, q0 + 64 * c + 16 * warp + lane / 4 + 8};
        const int n = kv.n_tiles;
        if constexpr (!F::kWarpSpecialised) {
            if (threadIdx.x == 0 && n > 0) {
                load_q(q0, bh);
                for (int j = 0; j < min(L::kStages - 1, n); ++j) load_kv(it + j, j, bh);
            }
            __syncwarp();
        }

        // Line 14: O = 0, l = 0, m = -inf.
        float O[kD / 64][32];
#pragma unroll
        for (int n_blk = 0; n_blk < kD / 64; ++n_blk)
#pragma unroll
            for (int i = 0; i < 32; ++i) O[n_blk][i] = 0.0f;
        float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f}, alpha[2];
        float S[L::kBc / 2];         // this thread's scores of a tile: 2 of each of its rows in each n8 block
        uint32_t P[L::kBc / 16][4];  // P as 16-bit A fragments, one per 16 keys

        if (n > 0) mbarrier_wait(q_full, q_uses % 2, "Q", 0);  // line 15
        auto wait_full = [&](int j) {
            const int s = (it + j) % L::kStages;
            mbarrier_wait(full(s), (it + j) / L::kStages % 2, "full", s);
        };
        auto stage_k = [&](int j) { return sK + (it + j) % L::kStages * L::kKVBytes; };
        auto stage_v = [&](int j) { return sV + (it + j) % L::kStages * L::kKVBytes; };
        auto release = [&](int j) {  // line 23: this warp is done reading stage j
            if (lane == 0) mbarrier_arrive(empty((it + j) % L::kStages));
        };
        // Step 7: this warp has issued its last S = Q_i K_j^T of the tile, and it has completed: the producer may load
        // the next Q_i into the same space while this warpgroup finishes (the last P V, the output).
        auto release_q = [&] {
            if constexpr (F::kPersistent)
                if (lane == 0) mbarrier_arrive(q_empty);
        };
        // Ping-pong: consumer c may issue products only in its turn; it hands the turn over to consumer c + 1 (the
        // last one to consumer 0) after issuing them. The last consumer opens each tile with a hand-over so consumer
        // 0 goes first, and skips its own last one (nobody would wait for it): each consumer waits n + 1 times a tile
        // and is handed the turn n + 1 times.
        const int last_consumer = L::kConsumers - 1, next_consumer = c == last_consumer ? 0 : c + 1;
        auto take_turn = [&] {
            if constexpr (F::kPingPong) named_barrier_sync(kTurnBarrier + c, 256);
        };
        auto hand_over = [&](bool last) {
            if constexpr (F::kPingPong)
                if (!(last && c == last_consumer)) named_barrier_arrive(kTurnBarrier + next_consumer, 256);
        };

        if constexpr (!F::kPingPong) {
            for (int j = 0; j < n; ++j) {  // line 16
                if (!F::kWarpSpecialised && threadIdx.x == 0 && j + L::kStages - 1 < n)
                    load_kv(it + j + L::kStages - 1, j + L::kStages - 1, bh);
                __syncwarp();  // warp 0 whole again before the .aligned wgmma instructions
                wait_full(j);  // lines 17 and 21: K_j and V_j share a stage
                fence_registers(S);
                wgmma_fence();
                issue_s<T, kD, kStep>(S, sQ_rows, stage_k(j));  // line 18
                wgmma_commit();
                wgmma_wait<0>();
                fence_registers(S);
                online_softmax<L::kBc, kCausal, L::kPolyExp>(S, m, l, alpha, row, j, j >= kv.first_masked, Nq, Nk,
                                                             scale_log2);
                pack_p<T, L::kBc>(S, P);
                rescale_o<kD>(O, alpha);  // line 22, first half
                fence_o<kD>(O);
                fence_registers(P);
                wgmma_fence();
                issue_pv<T, kD, kStep>(O, P, stage_v(j));  // line 22: O += P V_j
                wgmma_commit();
                wgmma_wait<0>();
                fence_o<kD>(O);
                fence_registers(P);
                release(j);
            }
        } else if (n > 0) {
            // Products of a turn: S_j = Q K_j^T and O += P_{j-1} V_{j-1} (Algorithm 2's order), softmax of S_j after.
            if (c == last_consumer) named_barrier_arrive(kTurnBarrier, 256);
            wait_full(0);
            take_turn();
            fence_registers(S);
            wgmma_fence();
            issue_s<T, kD, kStep>(S, sQ_rows, stage_k(0));
            wgmma_commit();
            hand_over(false);
            wgmma_wait<0>();
            fence_registers(S);
            if (n == 1) release_q();
            online_softmax<L::kBc, kCausal, L::kPolyExp, F::kLazyRescale>(S, m, l, alpha, row, 0, 0 >= kv.first_masked,
                                                                          Nq, Nk, scale_log2);  // O is 0 still
            pack_p<T, L::kBc>(S, P);
            for (int j = 1; j < n; ++j) {
                wait_full(j);
                take_turn();
                fence_registers(S);
                fence_registers(P);
                fence_o<kD>(O);
                wgmma_fence();
                issue_s<T, kD, kStep>(S, sQ_rows, stage_k(j));
                wgmma_commit();
                issue_pv<T, kD, kStep>(O, P, stage_v(j - 1));
                wgmma_commit();
                hand_over(false);
                bool rescale;  // O needs alpha: always before step 10
                if constexpr (F::kOverlap) {
                    // The source order of Algorithm 2. In SASS the second wait (WARPGROUP.DEPBAR) sits at the start
                    // of the softmax: ptxas may always wait earlier, and does (scripts/v3_sass_overlap.py).
                    wgmma_wait<1>();  // S_j is ready; P_{j-1} V_{j-1} may still run
                    fence_registers(S);
                    if (j == n - 1) release_q();
                    rescale = online_softmax<L::kBc, kCausal, L::kPolyExp, F::kLazyRescale>(S, m, l, alpha, row, j,
                                                                                    j >= kv.first_masked, Nq, Nk,
                                                                                    scale_log2);
                    wgmma_wait<0>();
                    fence_o<kD>(O);
                    fence_registers(P);
                } else {
                    wgmma_wait<0>();
                    fence_registers(S);
                    fence_o<kD>(O);
                    fence_registers(P);
                    rescale = online_softmax<L::kBc, kCausal, L::kPolyExp, F::kLazyRescale>(S, m, l, alpha, row, j,
                                                                                    j >= kv.first_masked, Nq, Nk,
                                                                                    scale_log2);
                }
                release(j - 1);
                pack_p<T, L::kBc>(S, P);  // P_j replaces P_{j-1}, whose product is done
                if (rescale) rescale_o<kD>(O, alpha);  // warp-uniform
            }
            take_turn();
            fence_registers(P);
            fence_o<kD>(O);
            wgmma_fence();
            issue_pv<T, kD, kStep>(O, P, stage_v(n - 1));
            wgmma_commit();
            hand_over(true);
            wgmma_wait<0>();
            fence_o<kD>(O);
            fence_registers(P);
            release(n - 1);
        }
        if (n > 0) {
            it += n;
            ++q_uses;
        }

        // Lines 25-26: O_i / l_i and LSE_i. A row that saw no key has l = 0: O = 0 and LSE = -inf.
        float inv_l[2];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const float l_row = warp_sum<4>(l[h]);
            inv_l[h] = l_row > 0.0f ? 1.0f / l_row : 0.0f;
            const float lse = l_row > 0.0f ? (m[h] + __log2f(l_row)) * 0.6931471805599453f : -INFINITY;
            if (lane % 4 == 0 && row[h] < Nq) LSE[size_t(bh) * Nq + row[h]] = lse;
        }
        const int t = lane % 4;
        if constexpr (!F::kTmaStore) {
            T* O_bh = O_out + size_t(bh) * Nq * kD;
#pragma unroll
            for (int n_blk = 0; n_blk < kD / 64; ++n_blk)
#pragma unroll
                for (int i = 0; i < 8; ++i)
#pragma unroll
                    for (int h = 0; h < 2; ++h)
                        if (row[h] < Nq)
                            *reinterpret_cast<uint32_t*>(&O_bh[size_t(row[h]) * kD + 64 * n_blk + 8 * i + 2 * t]) =
                                pack2<T>(O[n_blk][4 * i + 2 * h] * inv_l[h], O[n_blk][4 * i + 2 * h + 1] * inv_l[h]);
        } else {
            // Into this warpgroup's rows of Q_i's space (its last S product is done), in the swizzled layout of the
            // O tensor map: 16-byte chunk q of row r at chunk q ^ (r % 8). Then one thread stores each 64-column block.
            const uint32_t sO = sQ_rows;
#pragma unroll
            for (int n_blk = 0; n_blk < kD / 64; ++n_blk)
#pragma unroll
                for (int i = 0; i < 8; ++i)
#pragma unroll
                    for (int h = 0; h < 2; ++h) {
                        const int r = 16 * warp + lane / 4 + 8 * h;  // row within the warpgroup's 64
                        const uint32_t at = sO + n_blk * L::kBr * 128 + r * 128 + ((i ^ (r % 8)) * 16) + 4 * t;
                        const uint32_t v = pack2<T>(O[n_blk][4 * i + 2 * h] * inv_l[h], O[n_blk][4 * i + 2 * h + 1] * inv_l[h]);
                        asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(at), "r"(v) : "memory");
                    }
            fence_async_shared();
            named_barrier_sync(kStoreBarrier + c, 128);
            if (tid == 0 && q0 + 64 * c < Nq) {
                for (int n_blk = 0; n_blk < kD / 64; ++n_blk)
                    tma_store_3d(&tm_o, sO + n_blk * L::kBr * 128, 64 * n_blk, q0 + 64 * c, bh);
                tma_store_commit_and_wait_read();
            }
        }
    }
}

// --------------------------------------------------------------------------------------------------- host side

// cuTensorMapEncodeTiled from the driver, found at run time (the program does not link libcuda).
PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder(std::string* why) {
    static PFN_cuTensorMapEncodeTiled_v12000 fn = nullptr;
    static std::string error;
    static bool looked = false;
    if (!looked) {
        looked = true;
        void* p = nullptr;
        cudaDriverEntryPointQueryResult found;
        const cudaError_t e = cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000, cudaEnableDefault, &found);
        if (e != cudaSuccess || found != cudaDriverEntryPointSuccess || p == nullptr)
            error = "v3: the driver has no cuTensorMapEncodeTiled (needs a CUDA 12 driver or newer)";
        else
            fn = reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(p);
    }
    *why = error;
    return fn;
}

// The tensor map of one [B*H, rows, d] tensor, copied in boxes of box_rows rows. tile_bytes: what the kernel counts
// for one tile of it (the expect_tx of Q, of K or V; the staged O rows): it must be the d/64 boxes' bytes, or the
// barrier's phase would never complete (a hang) or complete early (a race). Checked here, before any launch.
template <typename T>
std::string encode(CUtensorMap* map, const void* base, int heads, int rows, int d, int box_rows, int tile_bytes) {
    V3TensorMapShape s;
    if (std::string why = v3_tensor_map_shape(heads, rows, d, box_rows, &s); !why.empty()) return why;
    if (uint64_t(d / 64) * s.box_bytes != uint64_t(tile_bytes))
        return "v3: a tile of " + std::to_string(tile_bytes) + " bytes is not the " + std::to_string(d / 64) +
               " boxes of " + std::to_string(s.box_bytes) + " bytes TMA delivers";
    std::string why;
    const auto fn = tensor_map_encoder(&why);
    if (!fn) return why;
    const cuuint32_t element_strides[3] = {1, 1, 1};
    const CUresult r = fn(map, std::is_same_v<T, __half> ? CU_TENSOR_MAP_DATA_TYPE_FLOAT16 : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
                          3, const_cast<void*>(base), s.dims, s.strides, s.box, element_strides,
                          CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                          CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
    if (r != CUDA_SUCCESS) return "v3: cuTensorMapEncodeTiled failed with error " + std::to_string(int(r));
    return "";
}

template <typename T, int kD, bool kCausal, int kStep>
std::string launch(const Problem& p, const ForwardArgs& a, cudaStream_t stream) {
    using L = Tiles<kD, kStep>;
    const int heads = p.B * p.H;
    CUtensorMap tq, tk, tv, to;
    for (const std::string& why : {encode<T>(&tq, a.q, heads, p.Nq, kD, L::kBr, L::kQBytes),
                                   encode<T>(&tk, a.k, heads, p.Nk, kD, L::kBc, L::kKVBytes),
                                   encode<T>(&tv, a.v, heads, p.Nk, kD, L::kBc, L::kKVBytes),
                                   encode<T>(&to, a.o, heads, p.Nq, kD, 64, 64 * kD * 2)})
        if (!why.empty()) return why;
    auto kernel = forward_kernel<T, kD, kCausal, kStep>;
    // Once per instantiation, at its first launch: later (timed) launches do no host work but encoding and launching.
    static const cudaError_t attribute_set =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, L::kSmem);
    CUDA_CHECK(attribute_set);
    // One CTA per Q tile; from step 7 one per SM at most (the kernel takes all of an SM's shared memory).
    const int grid = v3_tile_order(p.Nq, L::kBr, heads, Features<kStep>::kPersistent, kCausal).ctas(device_sm_count());
    kernel<<<grid, L::kThreads, L::kSmem, stream>>>(tq, tk, tv, to, static_cast<T*>(a.o), a.lse, p.Nq, p.Nk, heads,
                                                    p.resolved_scale() * 1.4426950408889634f);
    CUDA_CHECK_LAUNCH();
    return "";
}

template <typename T, int kD, int kStep>
std::string launch_causal_or_not(const Problem& p, const ForwardArgs& a, cudaStream_t stream) {
    return p.causal ? launch<T, kD, true, kStep>(p, a, stream) : launch<T, kD, false, kStep>(p, a, stream);
}

template <typename T, int kD>
std::string launch_step(const Problem& p, const ForwardArgs& a, cudaStream_t stream) {
    const int step = v3_step_of(p);
    if (step == kFinalStep) return launch_causal_or_not<T, kD, kFinalStep>(p, a, stream);
    // v3_step_of's other choice for the final kernel (step 8 at d = 64, causal), compiled for both dtypes.
    if constexpr (kD == 64)
        if (p.kernel == 0 && step == 8 && p.causal) return launch<T, 64, true, 8>(p, a, stream);
    if constexpr (std::is_same_v<T, __half>) {
        switch (step) {
            case 1: return launch_causal_or_not<T, kD, 1>(p, a, stream);
            case 2: return launch_causal_or_not<T, kD, 2>(p, a, stream);
            case 3: return launch_causal_or_not<T, kD, 3>(p, a, stream);
            case 4: return launch_causal_or_not<T, kD, 4>(p, a, stream);
            case 5: return launch_causal_or_not<T, kD, 5>(p, a, stream);
            case 6: return launch_causal_or_not<T, kD, 6>(p, a, stream);
            case 7: return launch_causal_or_not<T, kD, 7>(p, a, stream);
            case 8: return launch_causal_or_not<T, kD, 8>(p, a, stream);
            case 9: return launch_causal_or_not<T, kD, 9>(p, a, stream);
            case 10: return launch_causal_or_not<T, kD, 10>(p, a, stream);
            default: break;
        }
    }
    return "v3 has no step " + std::to_string(p.kernel) + " compiled for " + dtype_name(p.dtype);
}

template <typename T>
std::string launch_for_head_dim(const Problem& p, const ForwardArgs& a, cudaStream_t stream) {
    switch (p.d) {
        case 64: return launch_step<T, 64>(p, a, stream);
        case 128: return launch_step<T, 128>(p, a, stream);
        case 256: return launch_step<T, 256>(p, a, stream);
        default: return "v3 has no instantiation for head dim " + std::to_string(p.d);
    }
}

template <int kStep>
V3Config config_of(int d) {
    using F = Features<kStep>;
    V3Config c;
    c.warp_specialised = F::kWarpSpecialised, c.ping_pong = F::kPingPong, c.overlap = F::kOverlap;
    c.tma_store = F::kTmaStore, c.persistent = F::kPersistent, c.lazy_rescale = F::kLazyRescale;
    auto tiles = [&](auto L) {
        c.consumers = L.kConsumers, c.threads = L.kThreads;
        c.producer_regs = L.kProducerRegs, c.consumer_regs = L.kConsumerRegs;
        c.Br = L.kBr, c.Bc = L.kBc, c.stages = L.kStages, c.smem_bytes = L.kSmem, c.poly_exp = L.kPolyExp;
    };
    if (d == 64)
        tiles(Tiles<64, kStep>{});
    else if (d == 128)
        tiles(Tiles<128, kStep>{});
    else
        tiles(Tiles<256, kStep>{});
    return c;
}

}  // namespace v3_fwd

const std::vector<KernelStep>& v3_forward_steps() {
    static const std::vector<KernelStep> steps = {
        {"tma-wgmma", "one warpgroup: TMA copies into a 2-stage mbarrier ring, wgmma for S = Q K^T and O += P V"},
        {"warp-spec", "a producer warpgroup issues the copies; two consumer warpgroups compute (setmaxnreg 24/240)"},
        {"ping-pong", "the two consumers take turns at the tensor cores: one's softmax runs under the other's products"},
        {"overlap", "Algorithm 2's waits: softmax of tile j written between the waits for S_j and P_{j-1} V_{j-1}"},
        {"tma-store", "O leaves through shared memory and a TMA store"},
        {"deep-ring", "the K/V ring holds 3 tiles (4 at d = 64): the producer copies further ahead of the consumers"},
        {"persistent", "a CTA per SM walks many Q tiles: the next tile's Q and K/V load while the last one finishes"},
        {"poly-exp", "d = 64: 1/16 of the softmax's exponentials by a polynomial on the FMA pipe, the rest on MUFU"},
        {"three-wg", "d = 64: three consumer warpgroups (Q tiles of 192 rows, 160 registers) take turns (d = 128: step 8)"},
        {"lazy-rescale", "a row's max moves only when a tile's max passes it by 2^8: most tiles skip O's rescale"},
        {"wide-kv", "d = 256: K/V tiles of 80 keys, S by m64n80k16: fewer shared-memory bytes a FLOP (d = 64, 128: step 10)"},
    };
    static_assert(v3_fwd::kFinalStep == 11, "one entry per step");
    return steps;
}

int v3_step_of(const Problem& p) {
    if (p.kernel != 0) return p.kernel;
    return p.d == 64 && p.causal && p.Nq < 4096 ? 8 : v3_fwd::kFinalStep;
}

std::string v3_config(int step, int d, V3Config* c) {
    if (d != 64 && d != 128 && d != 256) return "v3 supports head dims 64, 128 and 256, got " + std::to_string(d);
    switch (step) {
        case 1: *c = v3_fwd::config_of<1>(d); return "";
        case 2: *c = v3_fwd::config_of<2>(d); return "";
        case 3: *c = v3_fwd::config_of<3>(d); return "";
        case 4: *c = v3_fwd::config_of<4>(d); return "";
        case 5: *c = v3_fwd::config_of<5>(d); return "";
        case 6: *c = v3_fwd::config_of<6>(d); return "";
        case 7: *c = v3_fwd::config_of<7>(d); return "";
        case 8: *c = v3_fwd::config_of<8>(d); return "";
        case 9: *c = v3_fwd::config_of<9>(d); return "";
        case 10: *c = v3_fwd::config_of<10>(d); return "";
        case 11: *c = v3_fwd::config_of<11>(d); return "";
        default: return "v3 has steps 1.." + std::to_string(v3_fwd::kFinalStep) + ", got " + std::to_string(step);
    }
}

std::string v3_forward_launch(const Problem& p, const ForwardArgs& a, cudaStream_t stream) {
    if (std::string why = v3_unsupported(p); !why.empty()) return why;
    if (std::string why = v3_gpu_unusable(); !why.empty()) return why;
    return p.dtype == DType::fp16 ? v3_fwd::launch_for_head_dim<__half>(p, a, stream)
                                  : v3_fwd::launch_for_head_dim<__nv_bfloat16>(p, a, stream);
}

void v3_forward(const Problem& p, const ForwardArgs& a) {
    if (std::string why = v3_forward_launch(p, a); !why.empty()) throw std::invalid_argument(why);
}
