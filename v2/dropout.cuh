// dropout.cuh: dropout's mask on the tensor-core fragments, shared by the forward (forward_mma.cu) and backward
// (backward_mma.cu) kernels. The mask itself is defined once, in common/philox.cuh: one generator call decides a strip
// of 16 consecutive keys of one row (dropout_keep16: 16 keep bits). In every fragment layout below the weights of a
// strip sit in several lanes of a warp, and each lane holds weights of several strips, so the lanes share the calls:
// each lane draws one strip, then the lanes that need each other's strips swap with shuffles, either their 16-bit
// masks (the backward: an all-gather, and each picks out its own bits) or the generator's bytes (the forward,
// dropout_keep_p32: each lane receives its own bytes and compares them where it applies them). (g = lane / 4, t =
// lane % 4, as in mma.cuh.)
#pragma once
#include <cstdint>

#include "common/philox.cuh"

// The all-gather both layouts use: kLanes lanes (lane ids base + stride * idx, idx = 0 .. kLanes - 1) each hold one
// strip's 16-bit mask, `mine`; afterwards every one of them holds all of them, words[w] = the mask of idx 2w (bits
// 0-15) and of idx 2w + 1 (bits 16-31). First the pairs swap (xor stride), then the blocks double (xor 2 stride,
// 4 stride, ...): log2(kLanes) rounds, kLanes / 2 shuffles in all.
template <int kLanes>
__device__ __forceinline__ void gather_masks(uint32_t mine, int idx, int stride, uint32_t (&words)[kLanes / 2]) {
    const uint32_t other = __shfl_xor_sync(0xffffffffu, mine, stride);
    words[0] = idx & 1 ? other | mine << 16 : mine | other << 16;
#pragma unroll
    for (int half = 1; half < kLanes / 2; half *= 2) {  // words[0 .. half) held; the partner holds the other half
        const bool upper = idx & (2 * half);            // this lane's block is the second of the two
#pragma unroll
        for (int i = 0; i < half; ++i) {
            const uint32_t own = words[i], got = __shfl_xor_sync(0xffffffffu, own, 2 * half * stride);
            words[i] = upper ? got : own;
            words[i + half] = upper ? own : got;
        }
    }
}

// S = Q K^T (the backward's dq kernel): an m16n8 accumulator holds rows g and g + 8 and keys 2t, 2t + 1
// in lane (g, t). Four n8 tiles (32 keys from key0, a multiple of 16) are 4 strips of the quad's rows: strip s is
// row g + 8 (s % 2) with keys key0 + 16 (s / 2) .. + 15, and the quad's lane t draws strip t. Returns this lane's
// 16 bits: bit 4 n + e for accumulator entry e (row g for e < 2, else g + 8; key 2t + e % 2) of n8 tile n.
__device__ __forceinline__ uint32_t dropout_mask_m16n32(const DropoutKeys& keys, uint32_t threshold, uint32_t head,
                                                        int row_g, int key0, int t) {
    uint32_t strips[2];  // strips 0, 1 and 2, 3, from the quad's four lanes
    gather_masks<4>(dropout_keep16(keys, head, row_g + (t & 1) * 8, key0 / 16 + t / 2, threshold), t, 1, strips);
    const uint32_t lo = strips[0], hi = strips[1];
    // This lane's keys of strip s are 2t, 2t + 1 (in n8 tile 2 (s / 2)) and 8 + 2t, 9 + 2t (tile 2 (s / 2) + 1): after
    // the shift by 2t they are the low two bits of byte 2 (s % 2) and byte 2 (s % 2) + 1 of lo (s < 2) or hi. Bytes 0,
    // 1, 2, 3 go to bits 0, 4, 2, 6 (tile 0 rows g, tile 1 rows g, tile 0 rows g + 8, tile 1 rows g + 8) by one
    // multiplication: byte b times 2^(24 + bit - 8 b) lands at bit 24 + its bit, and no two partial products meet.
    const uint32_t lo_bits = ((lo >> (2 * t)) & 0x03030303u) * 0x01100440u >> 24;
    const uint32_t hi_bits = ((hi >> (2 * t)) & 0x03030303u) * 0x01100440u >> 24;
    return lo_bits | hi_bits << 8;
}

// S^T = K Q^T (the backward's dk_dv kernel): keys are the rows of the fragment. Lane (g, t) holds keys g and g + 8 of
// the warp's 16 (key0, a multiple of 16: one strip a query) and queries 2t, 2t + 1 of each n8 tile of queries, so the
// 8 lanes g = 0 .. 7 of one t hold the same queries. Per 4 n8 tiles (32 queries from q0) those lanes need 8 strips:
// lane g draws query q0 + 8 (4c + g / 2) + 2t + g % 2, the 8 swap their masks (xor 4, 8, 16 in lane ids), and each
// keeps bits g and g + 8 of every strip. Returns bit 4 n + e for entry e of n8 tile n (key g + 8 (e / 2), query
// 2t + e % 2): the same layout as dropout_mask_m16n32, over kQTiles n8 tiles.
template <int kQTiles>
__device__ __forceinline__ uint64_t dropout_bits_transposed(const DropoutKeys& keys, uint32_t threshold, uint32_t head,
                                                             int q0, int key0, int g, int t) {
    static_assert(kQTiles % 4 == 0 && kQTiles <= 16, "query tiles in fours, one bit per element");
    uint64_t bits = 0;
    // Unrolled, the calls (each a chain of 7 rounds) overlap: the d = 64 backward 2.3-3.3% faster with dropout
    // (H200, docs/measured/dropout_backward_unroll_2026-12-04.log), level at d = 128, 32 bytes spilled at d = 64
    // against 16 with one call at a time.
#pragma unroll
    for (int c = 0; c < kQTiles / 4; ++c) {
        // word w of `strips`: the masks of lanes g = 2w (bits 0-15) and 2w + 1 (bits 16-31) of this t
        uint32_t strips[4];
        gather_masks<8>(dropout_keep16(keys, head, q0 + 8 * (4 * c + g / 2) + 2 * t + g % 2, key0 / 16, threshold), g,
                        4, strips);
#pragma unroll
        for (int w = 0; w < 4; ++w) {
            // n8 tile 4c + w: bit g and bit 8 + g of lanes 2w (query 2t) and 2w + 1 (query 2t + 1), at bits 0, 8, 16,
            // 24 after the shift; entries 0, 2, 1, 3, gathered to bits 24 .. 27 by one multiplication as above.
            const uint32_t entries = ((strips[w] >> g) & 0x01010101u) * 0x01040208u >> 24;
            bits |= uint64_t(entries & 0xFu) << (16 * c + 4 * w);
        }
    }
    return bits;
}

// Both 16-bit halves of x compared with those of y as fp16 numbers (x >= y): 0xFFFF in a half where it holds, else 0.
__device__ __forceinline__ uint32_t halves_at_least(uint32_t x, uint32_t y) {
    uint32_t mask;
    asm("set.ge.u32.f16x2 %0, %1, %2;" : "=r"(mask) : "r"(x), "r"(y));
    return mask;
}

// The forward's mask, applied to P after it is packed to 16 bits (v2/forward_mma.cu, line 10): for 32 keys from key0
// (a multiple of 32: two k16 steps of P V) of one m16 tile, keep[k][r] is a mask (0xFFFF in a 16-bit half: kept) to
// AND with register r of P's A fragment of k step k (r = 0, 1: rows g, g + 8 of keys 2t, 2t + 1; r = 2, 3: the same
// of keys 8 + 2t, 9 + 2t). The strips are dropout_mask_m16n32's (lane t draws strip t: row g + 8 (t % 2), keys key0
// + 16 (t / 2) ..), but the lanes swap the generator's bytes instead of comparison bits and compare them where they
// are used, two at a time: a byte b widened to 16 bits (0x00bb) is a non-negative fp16 subnormal, ordered as b is,
// so one half2 comparison with the threshold in both halves decides two weights (FlashAttention-2 compares its bytes
// the same way).
__device__ __forceinline__ void dropout_keep_p32(uint32_t (&keep)[2][4], const DropoutKeys& keys, uint32_t threshold,
                                                 uint32_t head, int row_g, int key0, int t) {
    const Philox4 r = philox4x32(Philox4{{uint32_t(key0 / 16 + t / 2), uint32_t(row_g + 8 * (t & 1)), head, 0u}}, keys);
    // Lane u needs bytes 2u, 2u + 1 (keys 2u, 2u + 1: halfword u % 2 of word u / 2) and bytes 8 + 2u, 9 + 2u (halfword
    // u % 2 of word 2 + u / 2) of every strip: one word for each lane of the quad, built by a byte permute. Lanes t
    // and t ^ 1 need words t / 2 and 2 + t / 2, lanes t ^ 2 and t ^ 3 the other two.
    const bool upper = t & 2;
    const uint32_t near_lo = upper ? r.x[1] : r.x[0], near_hi = upper ? r.x[3] : r.x[2];
    const uint32_t far_lo = upper ? r.x[0] : r.x[1], far_hi = upper ? r.x[2] : r.x[3];
    const uint32_t own_half = t & 1 ? 0x7632u : 0x5410u, other_half = t & 1 ? 0x5410u : 0x7632u;  // halfword t % 2, or not
    uint32_t got[4];  // got[k]: strip t ^ k's four bytes for this lane, from lane t ^ k
    got[0] = __byte_perm(near_lo, near_hi, own_half);
    got[1] = __shfl_xor_sync(0xffffffffu, __byte_perm(near_lo, near_hi, other_half), 1);
    got[2] = __shfl_xor_sync(0xffffffffu, __byte_perm(far_lo, far_hi, own_half), 2);
    got[3] = __shfl_xor_sync(0xffffffffu, __byte_perm(far_lo, far_hi, other_half), 3);
    // Strip s is got[s ^ t]: undo the xor with t's two bits, a select each.
    uint32_t swapped[4], strip[4];
#pragma unroll
    for (int s = 0; s < 4; ++s) swapped[s] = t & 1 ? got[s ^ 1] : got[s];
#pragma unroll
    for (int s = 0; s < 4; ++s) strip[s] = t & 2 ? swapped[s ^ 2] : swapped[s];
    const uint32_t threshold2 = threshold * 0x00010001u;  // the threshold, a fp16 subnormal, in both halves
#pragma unroll
    for (int s = 0; s < 4; ++s) {  // strip s: row g + 8 (s % 2), k step s / 2; its bytes 0, 1: keys 2t, 2t + 1
        keep[s / 2][s % 2] = halves_at_least(__byte_perm(strip[s], 0, 0x4140), threshold2);      // 0x00bb in each half
        keep[s / 2][2 + s % 2] = halves_at_least(__byte_perm(strip[s], 0, 0x4342), threshold2);  // bytes 2, 3: 8 + 2t ..
    }
}
