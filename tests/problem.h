// problem.h: the one description of an attention problem that every stage, kernel and test shares.
//
// Conventions (docs/conventions.md explains them):
//   Q, O are [B, H, Nq, d]; K, V are [B, Hk, Nk, d] (Hk = H unless --kv-heads); row-major, contiguous.
//   LSE is [B, H, Nq], float32: the natural log of sum_j exp(scale * q_i . k_j) over the keys row i sees.
//   Causal masks are aligned bottom-right: query row i sees key j when j <= i + Nk - Nq.
//   A row that sees no key (possible when Nq > Nk and causal) has O = 0 and LSE = -inf.
#pragma once
#include <cstddef>
#include <cstdint>
#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

enum class DType { fp32, fp16, bf16 };

inline const char* dtype_name(DType t) { return t == DType::fp32 ? "fp32" : t == DType::fp16 ? "fp16" : "bf16"; }
inline size_t dtype_bytes(DType t) { return t == DType::fp32 ? 4 : 2; }

// Index arithmetic of the extensions (docs/conventions.md, "Extensions"), one definition for the host (Problem's
// methods below) and the kernels, which cannot take a Problem.
// Grouped-query attention: the K/V head (flattened, b * Hk + hk) that flattened query head bh = b * H + h reads.
__host__ __device__ inline size_t kv_head_of(size_t bh, int H, int Hk) { return bh / H * Hk + bh % H / (H / Hk); }
// --bias: where head bh's [Nq, Nk] slice of a [bias_batch, bias_heads, Nq, Nk] bias starts (a dimension of size 1 is
// broadcast: every batch entry or head reads slice 0).
__host__ __device__ inline size_t bias_head_offset(size_t bh, int H, int bias_batch, int bias_heads, int Nq, int Nk) {
    const size_t b = bias_batch == 1 ? 0 : bh / H, h = bias_heads == 1 ? 0 : bh % H;
    return (b * bias_heads + h) * Nq * Nk;
}

struct Problem {
    int B = 4, H = 8, Nq = 1024, Nk = 1024, d = 64;
    bool causal = false;
    float scale = 0.0f;          // softmax scale; 0 means 1/sqrt(d) (resolved by resolved_scale())
    DType dtype = DType::fp32;
    // Which of the stage's runnable optimisation steps runs (--kernel K, listed by --kernel list): 1 is the first
    // step, 0 the stage's final kernel. A stage's *_unsupported(p) refuses a step it does not have.
    int kernel = 0;
    // Backward only (--deterministic): gradients with no atomic additions, the same bits on every run. A stage
    // without such a backward refuses it (Stage::has_deterministic; v2 fp32 in its backward_unsupported).
    bool deterministic = false;
    // The features users turn on (docs/conventions.md, "Extensions"). The float64 reference and v2's CPU model
    // have them; a stage or kernel without them refuses such a problem in one line (has_extensions()).
    int Hk = 0;                              // K/V heads (--kv-heads; 0: H): query head h reads K/V head h / (H / Hk)
    int window_left = -1, window_right = -1;  // --window L,R: row i sees keys i' - L .. i' + R, i' = i + Nk - Nq;
                                              // -1: unbounded on that side (causal is the window (-1, 0))
    int bias_batch = 0, bias_heads = 0;      // --bias: an additive bias [bias_batch, bias_heads, Nq, Nk] on the scaled
                                             // scores, broadcast over B and H where 1; 0: none
    bool alibi = false;                      // --alibi: the bias -slope_h |i' - j|, computed, never stored (alibi_slope)
    int alibi_H = 0;                         // the H the slopes are computed for (the whole problem's H): set by the
                                             // harness, kept when a CPU model runs a part of the heads
    // --seqlens: a packed batch of B sequences of these lengths (B is their number; Nq, Nk the longest), tokens laid
    // out [T, H, d] (T: the sum of the lengths; K, V: [Tk, Hk, d]), LSE [H, Tq], nothing padded. Empty: [B, H, N, d].
    std::vector<int> seqlens_q = {}, seqlens_k = {};
    float dropout = 0.0f;                    // --dropout p: each weight P_ij dropped with probability p, kept ones / (1 - p)
                                             // (p runs rounded to a multiple of 1/256: common/philox.cuh)
    uint64_t dropout_seed = 1;               // --seed: keys the dropout mask (common/philox.cuh)
    int head_offset = 0;                     // flattened index (b * H + h) of this problem's first head in the whole
                                             // batch: a CPU model run head by head keys each head's mask by it
    // The backward's dO laid out [B, Nq, H, d] instead of O's [B, H, Nq, d]: what autograd hands back when a model
    // reshapes O to [B, Nq, H * d] through O.transpose(1, 2) (pytorch/csrc/bridge.cpp reads it in place). Only v2's
    // tensor-core backward without extensions takes it (its default kernels); the command line never sets it.
    bool dO_token_major = false;

    float resolved_scale() const { return scale > 0.0f ? scale : 1.0f / std::sqrt(float(d)); }
    int kv_heads() const { return Hk > 0 ? Hk : H; }
    int group() const { return H / kv_heads(); }  // query heads per K/V head
    // The K/V head (flattened, b * Hk + hk) that flattened query head bh = b * H + h reads.
    size_t kv_head(size_t bh) const { return kv_head_of(bh, H, kv_heads()); }
    // The first of the group() query heads (flattened) that read K/V head bkv = b * Hk + hk.
    size_t first_query_head(size_t bkv) const { return bkv / kv_heads() * H + bkv % kv_heads() * group(); }
    bool has_bias() const { return bias_heads > 0; }
    // Where head bh's [Nq, Nk] slice of the bias starts (broadcast dimensions read slice 0).
    size_t bias_offset(size_t bh) const { return bias_head_offset(bh, H, bias_batch, bias_heads, Nq, Nk); }
    size_t bias_elems() const { return size_t(bias_batch) * bias_heads * Nq * Nk; }
    int alibi_heads() const { return alibi_H > 0 ? alibi_H : H; }
    bool has_extensions() const { return dropout > 0.0f || has_extensions_besides_dropout(); }
    // No extension but grouped-query heads and dropout: v2's default forward kernels take such a problem (a K/V head
    // is an index, forward_mma.cu), with dropout at d = 64 and 128. (The backward's choice is wider:
    // v2_backward_mma_kernel in v2/backward_mma.h.)
    bool gqa_and_dropout_only() const {
        return window_left < 0 && window_right < 0 && !has_bias() && !alibi && !varlen();
    }
    bool has_extensions_besides_dropout() const { return kv_heads() != H || !gqa_and_dropout_only(); }
    // Dropout is the only extension (causal or not): v2 then runs its default kernels with dropout's mask at d = 64
    // and 128 (forward_mma.cu, backward_mma.cu).
    bool dropout_alone() const { return dropout > 0.0f && !has_extensions_besides_dropout(); }
    bool varlen() const { return !seqlens_q.empty(); }
    size_t tokens_q() const { return varlen() ? std::accumulate(seqlens_q.begin(), seqlens_q.end(), size_t(0)) : size_t(B) * Nq; }
    size_t tokens_k() const { return varlen() ? std::accumulate(seqlens_k.begin(), seqlens_k.end(), size_t(0)) : size_t(B) * Nk; }
    size_t q_elems() const { return tokens_q() * H * d; }
    size_t kv_elems() const { return tokens_k() * kv_heads() * d; }
    size_t lse_elems() const { return tokens_q() * H; }
    // Forward FLOPs as the FlashAttention papers count them: 2 matrix products of 2*Nq*Nk*d each,
    // halved when causal (the convention of the published benchmark tables).
    double forward_flops() const {
        double pairs = double(B) * Nq * Nk;  // (query, key) pairs of a head; a packed batch's are its sequences'
        if (varlen()) {
            pairs = 0;
            for (size_t s = 0; s < seqlens_q.size(); ++s) pairs += double(seqlens_q[s]) * seqlens_k[s];
        }
        return 4.0 * H * pairs * d * (causal ? 0.5 : 1.0);
    }
    double backward_flops() const { return 2.5 * forward_flops(); }
};

// The last key index row i may see, plus one (bottom-right causal alignment). May be <= 0: row sees nothing.
__host__ __device__ inline int causal_key_end(int i, int Nq, int Nk) { return i + Nk - Nq + 1; }

// ALiBi's slope of head h of H (Press, Smith and Lewis, 2022): 2^(-8 (h + 1) / H), the geometric sequence of the
// paper for H a power of two, used as written for every H. The bias of (row i, key j) is -slope |i + Nk - Nq - j|:
// the distance from the diagonal, aligned bottom-right like the causal mask.
__host__ __device__ inline float alibi_slope(int h, int H) { return exp2f(-8.0f * float(h + 1) / float(H)); }
__host__ __device__ inline float alibi_bias(float slope, int i, int j, int Nq, int Nk) {
    const int distance = i + Nk - Nq - j;
    return -slope * float(distance < 0 ? -distance : distance);
}

// The keys row i sees, [begin, end) (empty when begin >= end): the causal mask and the window, both aligned
// bottom-right (row i sits at key position i + Nk - Nq). band_keys is the one definition, for the host
// (visible_keys) and the kernels; window_left/right -1: unbounded on that side.
struct KeyRange {
    int begin, end;
};
__host__ __device__ inline KeyRange band_keys(int i, int Nq, int Nk, bool causal, int window_left, int window_right) {
    const long diagonal = long(i) + Nk - Nq;
    long begin = 0, end = Nk;
    if (causal && diagonal + 1 < end) end = diagonal + 1;
    if (window_right >= 0 && diagonal + window_right + 1 < end) end = diagonal + window_right + 1;
    if (window_left >= 0 && diagonal - window_left > begin) begin = diagonal - window_left;
    auto clamp_to_keys = [Nk](long x) { return int(x < 0 ? 0 : x > Nk ? Nk : x); };
    return {clamp_to_keys(begin), clamp_to_keys(end)};
}
inline KeyRange visible_keys(const Problem& p, int i) {
    return band_keys(i, p.Nq, p.Nk, p.causal, p.window_left, p.window_right);
}
