// philox.cuh: the random numbers of the dropout mask, from a counter-based generator: Philox4x32 (Salmon,
// Moraes, Dror and Shaw, "Parallel random numbers: as easy as 1, 2, 3", SC'11). A counter-based generator is a pure
// function of (counter, key): there is no state to carry from one number to the next, so any thread can compute
// the mask bit of any (row, key) on its own, and the backward pass, the CPU model and the float64 reference
// regenerate exactly the forward's mask instead of storing it (the same recompute-instead-of-store idea as the
// backward pass itself). One function, compiled for host and device.
#pragma once
#include <cmath>
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

// The keys of Philox4x32's rounds: round r uses (key0 + r W0, key1 + r W1), W0 and W1 two Weyl constants. They do
// not depend on the counter, so a kernel receives them computed once, in its parameters: the rounds read them from
// constant memory, and a round is two multiplications and two three-input xors, no additions.
template <int kRounds>
struct PhiloxKeys {
    uint32_t k0[kRounds], k1[kRounds];
};
template <int kRounds>
__host__ __device__ inline PhiloxKeys<kRounds> philox_keys(uint32_t key0, uint32_t key1) {
    PhiloxKeys<kRounds> keys;
    for (int r = 0; r < kRounds; ++r) {
        keys.k0[r] = key0 + uint32_t(r) * 0x9E3779B9u;
        keys.k1[r] = key1 + uint32_t(r) * 0xBB67AE85u;
    }
    return keys;
}

// The rounds of Philox4x32: each multiplies two words by fixed odd constants and mixes the halves of the products
// with the other two words and the round's key. The known-answer vectors of the paper's reference implementation,
// 7 and 10 rounds, are tested in tests/test_extensions.cu.
template <int kRounds>
__host__ __device__ inline Philox4 philox4x32(Philox4 counter, const PhiloxKeys<kRounds>& keys) {
    Philox4 c = counter;
    for (int r = 0; r < kRounds; ++r) {
        uint32_t hi0, hi1;
        const uint32_t lo0 = mul_hi_lo(0xD2511F53u, c.x[0], &hi0);
        const uint32_t lo1 = mul_hi_lo(0xCD9E8D57u, c.x[2], &hi1);
        c = Philox4{{hi1 ^ c.x[1] ^ keys.k0[r], lo1, hi0 ^ c.x[3] ^ keys.k1[r], lo0}};
    }
    return c;
}

// Dropout's generator: Philox4x32-7. The paper recommends 10 rounds, a safety margin over the fewest with which
// Philox4x32 passed its statistical test batteries; FlashAttention-2's dropout runs 7 (its philox.cuh), and so do
// we. In the d = 64 forward kernel, 7 rounds with the keys from constant memory took the loop that draws a tile's
// mask from 228 SASS instructions per two calls to 161 (cuobjdump -sass of v2/forward_mma.o).
constexpr int kDropoutRounds = 7;
using DropoutKeys = PhiloxKeys<kDropoutRounds>;
__host__ __device__ inline DropoutKeys dropout_keys(uint64_t seed) {
    return philox_keys<kDropoutRounds>(uint32_t(seed), uint32_t(seed >> 32));
}

// The dropout mask. One generator call decides 16 consecutive keys of one row: for row i of head `head` (flattened:
// b * H + h) and keys 16 c .. 16 c + 15 the counter is (c, i, head, 0), keyed by the seed, and byte k of the output
// (x[0]'s lowest byte first) decides key 16 c + k: kept when the byte, uniform in 0 .. 255, is >= the threshold
// t = round(256 p). So dropout runs with probability t / 256, p rounded to a multiple of 1/256 (p = 0.1 runs as
// 26/256 = 0.1016; FlashAttention-2 also compares 8-bit pieces of its generator's output), and the kept weights are scaled by
// 256 / (256 - t) = 1 / (1 - t / 256), which keeps the expected output the output without dropout. Why bytes and
// not one 32-bit word a weight: a call costs tens of integer instructions (28 for the rounds alone); at 4 weights a
// call (the first version) the forward kernel ran 2.5x slower with dropout than without.
__host__ __device__ inline uint32_t dropout_threshold(float p) { return uint32_t(floorf(p * 256.0f + 0.5f)); }
// The p dropout runs: 0 <= p and p rounds to t <= 255 (p < 0.998). t = 256 would drop every weight and divide by 0
// in dropout_scale; the command line and v2's entry points refuse the rest in one line.
__host__ __device__ inline bool dropout_runs(float p) { return p >= 0.0f && p < 1.0f && dropout_threshold(p) <= 255; }
// 1 / (1 - t / 256): the factor of a kept weight (p as dropout_runs takes it).
__host__ __device__ inline double dropout_scale(float p) { return 256.0 / double(256u - dropout_threshold(p)); }

// The four bytes of x compared with those of y at once (unsigned, "SIMD within a register"): bit 7 of byte k of the
// result is set when byte k of x >= byte k of y, every other bit is 0. (x | 0x80) - (y & 0x7F) in each byte never
// borrows from the next byte and has bit 7 set when the low 7 bits of x are >= those of y; that decides when the
// top bits agree, and the top bits decide when they differ.
__host__ __device__ inline uint32_t bytes_at_least(uint32_t x, uint32_t y) {
    const uint32_t low7 = (x | 0x80808080u) - (y & 0x7F7F7F7Fu);
    return ((x & ~y) | (~(x ^ y) & low7)) & 0x80808080u;
}

// The keep bits of keys 16 c .. 16 c + 15 of row i: bit k set when key 16 c + k is kept (threshold: dropout_threshold).
// Bits 7, 15, 23, 31 of bytes_at_least's result land in bits 28 .. 31 of its product with 2^0 + 2^7 + 2^14 + 2^21
// (no two of the partial products' bits meet, so nothing carries): four keep bits in two instructions.
__host__ __device__ inline uint32_t dropout_keep16(const DropoutKeys& keys, uint32_t head, int i, int c,
                                                   uint32_t threshold) {
    const Philox4 r = philox4x32(Philox4{{uint32_t(c), uint32_t(i), head, 0u}}, keys);
    const uint32_t t4 = threshold * 0x01010101u;  // the threshold in every byte
    uint32_t bits = 0;
    for (int w = 0; w < 4; ++w) bits |= (bytes_at_least(r.x[w], t4) * 0x00204081u) >> 28 << (4 * w);
    return bits;
}
// Is attention weight (row i, key j) of head `head` kept? The one definition of the mask, for every pass.
__host__ __device__ inline bool dropout_keep(uint64_t seed, uint32_t head, int i, int j, float p) {
    return dropout_keep16(dropout_keys(seed), head, i, j >> 4, dropout_threshold(p)) >> (j & 15) & 1;
}
