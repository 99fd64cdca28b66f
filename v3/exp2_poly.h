// exp2_poly.h: 2^x computed on the FP32 (FMA) pipe instead of MUFU, for step 8 of forward.cu and for the CPU test
// that checks it (tests/test_v3.cu). One function, __host__ __device__: the test runs the same arithmetic.
//
// Why (docs/v3.md, "Step 8"): at d = 64 a tile's softmax needs 8,192 exponentials per consumer warpgroup, and
// MUFU.EX2 does 16 a clock per SM, as long as the tile's two products take on the tensor cores. The FP32 pipe does
// 128 FMAs a clock per SM, so a part of the exponentials is computed there and both pipes share the load.
//
// The math (range reduction in the manner of Cody and Waite):
//
//   2^x = 2^j * 2^f,   j = floor(x), f = x - j in [0, 1]
//   2^f ~ p(f) = 1 + f (c1 + f (c2 + f c3))          three FFMA (Horner)
//   2^j = the float with exponent field j + 127     integer arithmetic on the bits, no conversion instruction
//
// c1, c2, c3 are a minimax fit of the relative error p(f) / 2^f - 1 on [0, 1], with p(0) = 1 held exact so that
// every integer x (x = 0 among them) gives its power of two exactly. scripts/fit_exp2_poly.py computes it with numpy
// (Lawson's iteratively reweighted least squares on 20,001 points, which converges to the minimax fit) and prints
// the float32 coefficients below. Taylor's coefficients would be ln 2 = 0.6931, (ln 2)^2 / 2 = 0.2402 and
// (ln 2)^3 / 6 = 0.0555; the fit gives up accuracy near f = 0 for a smaller worst case. Measured max relative error
// of this function against exp2 in double (float32 arithmetic, as here): 8.57e-5 = 2^-13.5, about a sixth of fp16's
// half-ulp (2^-11) and a 45th of bf16's (2^-8), the roundings P goes through next (tests/test_v3.cu checks the
// bound, kExp2PolyMaxRelErr, over a dense sweep of [-130, 1]). A fourth-degree fit would give 2.96e-6 = 2^-18.4
// for one more FFMA per exponential.
//
// The pieces, each on the FP32 pipe or the integer ALU, none on MUFU:
// - j without floorf: floorf is an FRND instruction and a float-to-integer conversion an F2I, both of the conversion
//   class that the CUDA programming guide's throughput table gives 16 a clock per SM on sm_90, MUFU's rate. Instead
//   one FADD rounding toward minus infinity adds 1.5 * 2^23: floats in [2^23, 2^24) are the integers, so
//   t = 1.5 * 2^23 + floor(x) exactly, and t's mantissa field holds 2^22 + j (j two's complement); shifting t's bits
//   left by 23 keeps (j << 23) mod 2^32, the 2^22 and the exponent falling off the top.
// - f = x - (t - 1.5 * 2^23): exact for |x| >= 1; for x in (-1, 0) it may round, to at most 1 (an error of 2^-25 in
//   f, a relative 2^-25.5 in 2^f), which is why the fit covers [0, 1] closed.
// - x = max(x, -127) first: -inf (a masked score) and everything below -127 give j = -127, whose 2^j has exponent
//   field 0: the float +0, and the result is exactly 0. x in [-127, -126) gives 0 too (2^x is a denormal there; a P
//   that small rounds to 0 in fp16 and is nothing against l >= 1 in bf16). Without the clamp, j + 127 below 0 would
//   wrap into the sign and exponent bits.
// - 2^j times p(f): one FMUL, exact (a power of two) for j >= -126. Adding j << 23 to p's bits instead would save it
//   but turn j = -127 into the denormal (p(f) - 1) 2^-126 instead of 0.
// Domain: any x below 128 (the softmax gives x <= 0, or a rounding above it), -inf included. NaN gives 0.
#pragma once
#include <cuda_runtime.h>  // __host__ __device__, __fadd_rd

#include <cmath>
#include <cstdint>
#include <cstring>

// The fit's coefficients (scripts/fit_exp2_poly.py), as float32: 0x3f31f325, 0x3e691c4c, 0x3d9dd45c.
constexpr float kExp2PolyC1 = 0.6951163411140442f, kExp2PolyC2 = 0.22764700651168823f, kExp2PolyC3 = 0.07706519961357117f;
// The bound tests/test_v3.cu checks: the measured 8.57e-5 rounded up (2^-13.49; fp16's half-ulp is 2^-11 = 4.9e-4).
constexpr double kExp2PolyMaxRelErr = 8.6e-5;

__host__ __device__ inline float exp2_poly(float x) {
    constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer, in the mantissa's low bits
    x = fmaxf(x, -127.0f);                 // -inf -> -127 -> 2^j = +0
#ifdef __CUDA_ARCH__
    const float t = __fadd_rd(x, kRound);  // FADD.RM: 1.5 * 2^23 + floor(x)
#else
    const float t = floorf(x) + kRound;  // the same bits: the sum is exact
#endif
    const float j = t - kRound;  // floor(x), exact
    const float f = x - j;       // in [0, 1]
    const float p = fmaf(f, fmaf(f, fmaf(f, kExp2PolyC3, kExp2PolyC2), kExp2PolyC1), 1.0f);
    uint32_t t_bits;
    std::memcpy(&t_bits, &t, 4);  // the float's bits (on the device a register move, no copy)
    const uint32_t scale_bits = (t_bits << 23) + (127u << 23);  // exponent field j + 127, mantissa 0: 2^j (0 at j = -127)
    float scale;
    std::memcpy(&scale, &scale_bits, 4);
    return p * scale;
}
