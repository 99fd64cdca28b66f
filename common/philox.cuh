// philox.cuh: the random numbers of the dropout mask, from a counter-based generator: Philox4x32-10 (Salmon,
// Moraes, Dror and Shaw, "Parallel random numbers: as easy as 1, 2, 3", SC'11). A counter-based generator is a pure
// function of (counter, key): there is no state to carry from one number to the next, so any thread can compute
// the mask bit of any (row, key) on its own, and the backward pass, the CPU model and the float64 reference
// regenerate exactly the forward's mask instead of storing it (the same recompute-instead-of-store idea as the
// backward pass itself). One function, compiled for host and device.
#pragma once
#include <cstdint>

struct Philox4 {
    uint32_t x[4];
};

// The 32 x 32 -> 64-bit product, split: returns the low word, *hi the high word.
__host__ __device__ inline uint32_t mul_hi_lo(uint32_t a, uint32_t b, uint32_t* hi) {
    const uint64_t product = uint64_t(a) * b;
    *hi = uint32_t(product >> 32);
    return uint32_t(product);
}

// Ten rounds of Philox4x32: each round multiplies two words by fixed odd constants and mixes the halves of the
// products with the other two words and the key; the key is bumped by two Weyl constants between rounds. The
// known-answer vectors of the paper's reference implementation are tested in tests/test_v2.cu.
__host__ __device__ inline Philox4 philox4x32_10(Philox4 counter, uint32_t key0, uint32_t key1) {
    Philox4 c = counter;
    for (int round = 0; round < 10; ++round) {
        uint32_t hi0, hi1;
        const uint32_t lo0 = mul_hi_lo(0xD2511F53u, c.x[0], &hi0);
        const uint32_t lo1 = mul_hi_lo(0xCD9E8D57u, c.x[2], &hi1);
        c = Philox4{{hi1 ^ c.x[1] ^ key0, lo1, hi0 ^ c.x[3] ^ key1, lo0}};
        key0 += 0x9E3779B9u;
        key1 += 0xBB67AE85u;
    }
    return c;
}

// The generator's four words for row i of head `head` (flattened: b * H + h): word w decides key 4 (j / 4) + w.
// Keyed by the seed; the counter is (j / 4, i, head, 0), so a thread that handles four consecutive keys calls the
// generator once (the tensor-core forward shares one call between two lanes: v2/forward_mma.cu).
__host__ __device__ inline Philox4 dropout_words(uint64_t seed, uint32_t head, int i, int j) {
    return philox4x32_10(Philox4{{uint32_t(j) >> 2, uint32_t(i), head, 0u}}, uint32_t(seed), uint32_t(seed >> 32));
}
// Is the weight whose word is `word` kept by dropout with probability p? Kept when the word's top 24 bits, as a
// fraction u of 2^24 (uniform in [0, 1)), are >= p: a fraction 1 - p of all words when p is a multiple of 2^-24.
// In integers, with no conversion to float: u >= p exactly when word >> 8 >= p 2^24 (p 2^24 is exact: only the
// exponent moves), i.e. when word >> 8 >= ceil(p 2^24), the threshold (at most 2^24 for p < 1).
__host__ __device__ inline uint32_t dropout_threshold(float p) { return uint32_t(ceilf(p * 16777216.0f)); }
__host__ __device__ inline bool dropout_kept(uint32_t word, uint32_t threshold) { return word >> 8 >= threshold; }
// Is attention weight (row i, key j) of head `head` kept? The one definition of the mask, for every pass.
__host__ __device__ inline bool dropout_keep(uint64_t seed, uint32_t head, int i, int j, float p) {
    return dropout_kept(dropout_words(seed, head, i, j).x[j & 3], dropout_threshold(p));
}
