// dropout.cuh: dropout's mask on the tensor-core fragments, shared by the forward (forward_mma.cu) and backward
// (backward_mma.cu) kernels. The mask itself is defined once, in common/philox.cuh: one generator call decides a strip
// of 16 consecutive keys of one row (dropout_keep16: 16 keep bits). In both fragment layouts below the weights of a
// strip sit in several lanes of a warp, and each lane holds weights of several strips, so the lanes share the calls:
// each lane draws one strip, then the lanes that need each other's strips swap their 16-bit masks with shuffles
// (an all-gather), and each picks out its own bits. (g = lane / 4, t = lane % 4, as in mma.cuh.)
#pragma once
#include <cstdint>

#include "common/philox.cuh"

// S = Q K^T (forward, and the backward's dq kernel): an m16n8 accumulator holds rows g and g + 8 and keys 2t, 2t + 1
// in lane (g, t). Four n8 tiles (32 keys from key0, a multiple of 16) are 4 strips of the quad's rows: strip s is
// row g + 8 (s % 2) with keys key0 + 16 (s / 2) .. + 15, and the quad's lane t draws strip t. Returns this lane's
// 16 bits: bit 4 n + e for accumulator entry e (row g for e < 2, else g + 8; key 2t + e % 2) of n8 tile n.
__device__ __forceinline__ uint32_t dropout_mask_m16n32(uint64_t seed, uint32_t threshold, uint32_t head, int row_g,
                                                        int key0, int t) {
    const uint32_t mine = dropout_keep16(seed, head, row_g + (t & 1) * 8, key0 / 16 + t / 2, threshold);
    // All-gather in the quad: strip s's 16 bits end at bit 16 s of `all` (xor 1: pairs, xor 2: the two pairs).
    const uint32_t other = __shfl_xor_sync(0xffffffffu, mine, 1);
    const uint32_t pair = t & 1 ? other | mine << 16 : mine | other << 16;
    const uint32_t far = __shfl_xor_sync(0xffffffffu, pair, 2);
    const uint32_t lo = t & 2 ? far : pair, hi = t & 2 ? pair : far;  // strips 0, 1 and 2, 3
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
__device__ __forceinline__ uint64_t dropout_bits_transposed(uint64_t seed, uint32_t threshold, uint32_t head, int q0,
                                                             int key0, int g, int t) {
    static_assert(kQTiles % 4 == 0 && kQTiles <= 16, "query tiles in fours, one bit per element");
    uint64_t bits = 0;
#pragma unroll 1  // the generator's registers are free again when the tile's products need them
    for (int c = 0; c < kQTiles / 4; ++c) {
        const uint32_t mine = dropout_keep16(seed, head, q0 + 8 * (4 * c + g / 2) + 2 * t + g % 2, key0 / 16, threshold);
        // All-gather over g: word w of `strips` holds the masks of lanes 2w (bits 0-15) and 2w + 1 (bits 16-31).
        const uint32_t other = __shfl_xor_sync(0xffffffffu, mine, 4);
        const uint32_t pair = g & 1 ? other | mine << 16 : mine | other << 16;
        const uint32_t far = __shfl_xor_sync(0xffffffffu, pair, 8);
        const uint32_t a = g & 2 ? far : pair, b = g & 2 ? pair : far;  // lanes 4 (g / 4) + 0, 1 and + 2, 3
        const uint32_t a_far = __shfl_xor_sync(0xffffffffu, a, 16), b_far = __shfl_xor_sync(0xffffffffu, b, 16);
        const uint32_t strips[4] = {g & 4 ? a_far : a, g & 4 ? b_far : b, g & 4 ? a : a_far, g & 4 ? b : b_far};
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
