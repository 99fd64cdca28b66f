// dropout.cuh: dropout's mask on the tensor-core fragments, shared by the forward (forward_mma.cu) and backward
// (backward_mma.cu) kernels. The mask itself is defined once, in common/philox.cuh: one generator call decides a strip
// of 16 consecutive keys of one row (dropout_keep16: 16 keep bits). In both fragment layouts below the weights of a
// strip sit in several lanes of a warp, and each lane holds weights of several strips, so the lanes share the calls:
// each lane draws one strip, then the lanes that need each other's strips swap their 16-bit masks with shuffles
// (an all-gather), and each picks out its own bits. (g = lane / 4, t = lane % 4, as in mma.cuh.)
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

// S = Q K^T (forward, and the backward's dq kernel): an m16n8 accumulator holds rows g and g + 8 and keys 2t, 2t + 1
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
#pragma unroll 1  // the generator's registers are free again when the tile's products need them
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
