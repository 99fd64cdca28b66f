// dropout.cuh: dropout's mask on the tensor-core fragments, shared by the forward (forward_mma.cu) and backward
// (backward_mma.cu) kernels. The mask itself is defined once, in common/philox.cuh: weight (row i, key j) of a head is
// kept when dropout_kept(dropout_words(seed, head, i, j).x[j % 4], threshold). One generator call gives the words of
// four consecutive keys 4a .. 4a + 3 of a row, and in both fragment layouts below those four keys sit in different
// lanes of one warp: the lanes share the call (each draws a part of the words and passes the others theirs with
// shuffles) instead of each drawing all four words for the one it needs. (g = lane / 4, t = lane % 4, as in mma.cuh.)
#pragma once
#include <cstdint>

#include "common/philox.cuh"

// S = Q K^T (forward, and the backward's dq kernel): an m16n8 accumulator holds rows g and g + 8 and keys 2t, 2t + 1
// in lane (g, t), so lanes t and t ^ 1 hold the four keys of each of the two rows. Lane t even draws row g's words,
// lane t odd row g + 8's, and each passes its partner the two words the partner needs: one call for four weights.
// row_g: the query row of this lane's g; key_2t: the key of this lane's first column (the tile's first key + 2t).
// Sets bit shift + e of keep for accumulator element e (row g for e < 2, else g + 8; key key_2t + e % 2) when kept.
template <typename Mask>  // uint32_t or uint64_t
__device__ __forceinline__ void dropout_mask_m16n8(Mask& keep, int shift, uint64_t seed, uint32_t threshold,
                                                   uint32_t head, int row_g, int key_2t, int t) {
    const bool odd = t & 1;  // this lane draws row g + 8 (odd) or row g (even)
    const Philox4 w = dropout_words(seed, head, row_g + (odd ? 8 : 0), key_2t);
    // Words 0, 1 are the even lane's keys, 2, 3 the odd lane's.
    const uint32_t own0 = odd ? w.x[2] : w.x[0], own1 = odd ? w.x[3] : w.x[1];
    const uint32_t give0 = odd ? w.x[0] : w.x[2], give1 = odd ? w.x[1] : w.x[3];
    const uint32_t got0 = __shfl_xor_sync(0xffffffffu, give0, 1), got1 = __shfl_xor_sync(0xffffffffu, give1, 1);
    const uint32_t word[4] = {odd ? got0 : own0, odd ? got1 : own1, odd ? own0 : got0, odd ? own1 : got1};
#pragma unroll
    for (int e = 0; e < 4; ++e) keep |= Mask(dropout_kept(word[e], threshold)) << (shift + e);
}

// S^T = K Q^T (the backward's dk_dv kernel): keys are the rows of the fragment. Lane (g, t) holds keys g and g + 8,
// so the four keys of a group sit in the lanes g ^ 0 .. g ^ 3 of the same t (lane ids xor 4, 8, 12), and those four
// lanes hold the same (query, key group) pairs, one key each: lane b = g % 4 needs word b of every pair. The pairs
// are the lane's elements k = 0 .. kElems - 1 (element(k) gives its query and key). Lane b draws the words of pairs
// k = 4c + b; in round r it sends word b ^ r of its pair to lane b ^ r and receives its own word b of pair 4c + (b ^ r).
// Returns bit k for element k, 1 = kept. The loop is not unrolled: the generator's registers are free again when the
// tile's products need them, and its code is there once.
template <int kElems, typename Element>
__device__ __forceinline__ uint64_t dropout_bits_transposed(uint64_t seed, uint32_t threshold, uint32_t head, int g,
                                                             Element element) {
    static_assert(kElems % 4 == 0 && kElems <= 64, "pairs in fours, one bit per element");
    const int b = g % 4;
    uint64_t bits = 0;
#pragma unroll 1
    for (int c = 0; c < kElems; c += 4) {
        const int2 ij = element(c + b);
        const Philox4 w = dropout_words(seed, head, ij.x, ij.y);
#pragma unroll
        for (int r = 0; r < 4; ++r) {
            const int want = b ^ r;  // the word lane b ^ r needs
            const uint32_t send = want == 0 ? w.x[0] : want == 1 ? w.x[1] : want == 2 ? w.x[2] : w.x[3];
            const uint32_t got = r == 0 ? send : __shfl_xor_sync(0xffffffffu, send, 4 * r);
            bits |= uint64_t(dropout_kept(got, threshold)) << (c + (b ^ r));
        }
    }
    return bits;
}
