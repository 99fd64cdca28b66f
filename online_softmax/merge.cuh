// merge.cuh: the one idea the online softmax rests on, written once and used by the online_softmax kernels,
// FlashAttention-1 (v1/) and FlashAttention-2 (v2/), on the GPU and in the CPU models.
//
// The softmax of part of a row is summarised by two numbers: m, the largest score seen, and l, the sum of
// exp(s - m) over the scores seen. Two parts merge into the summary of their union:
//     m = max(m_a, m_b),   l = l_a * exp(m_a - m) + l_b * exp(m_b - m).
// The empty part, m = -inf and l = 0, is the identity. Two empty parts stay empty: the exp factors of a part
// whose m is -inf are taken as 0 rather than computed as exp(-inf - (-inf)) = NaN.
#pragma once
#include <cmath>

struct SoftmaxState {
    float m;  // running max of the (scaled) scores
    float l;  // running sum of exp(score - m)
};

// exp(m_part - m_merged): how much a part's sums shrink when the max grows. 0 for an empty part.
__host__ __device__ inline float rescale_factor(float m_part, float m_merged) {
    return m_part == -INFINITY ? 0.0f : expf(m_part - m_merged);
}

__host__ __device__ inline SoftmaxState merge(SoftmaxState a, SoftmaxState b) {
    // EXERCISE(online-merge): the (m, l) of the union of two parts; the empty part (-inf, 0) is the identity
    const float m = fmaxf(a.m, b.m);
    return {m, a.l * rescale_factor(a.m, m) + b.l * rescale_factor(b.m, m)};
    // END EXERCISE
}

// merge(a, {s, 1}): one more score s folded into a running state. The same result, but of merge's two exp
// factors one is always exp(0) = 1 (for whichever side holds the larger max), so it is left out: one exp per
// score instead of two. This is the form a streaming pass uses.
__host__ __device__ inline SoftmaxState add_score(SoftmaxState a, float s) {
    if (s > a.m) return {s, a.l * rescale_factor(a.m, s) + 1.0f};
    return {a.m, a.l + rescale_factor(s, a.m)};
}

// Log-sum-exp of the whole row once every part is merged: m + log(l), or -inf for a row that saw no score.
__host__ __device__ inline float log_sum_exp(SoftmaxState s) { return s.m == -INFINITY ? -INFINITY : s.m + logf(s.l); }
