// problem.h: the one description of an attention problem that every stage, kernel and test shares.
//
// Conventions (docs/conventions.md explains them):
//   Q, O are [B, H, Nq, d]; K, V are [B, H, Nk, d]; row-major, contiguous.
//   LSE is [B, H, Nq], float32: the natural log of sum_j exp(scale * q_i . k_j) over the keys row i sees.
//   Causal masks are aligned bottom-right: query row i sees key j when j <= i + Nk - Nq.
//   A row that sees no key (possible when Nq > Nk and causal) has O = 0 and LSE = -inf.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cmath>

enum class DType { fp32, fp16, bf16 };

inline const char* dtype_name(DType t) { return t == DType::fp32 ? "fp32" : t == DType::fp16 ? "fp16" : "bf16"; }
inline size_t dtype_bytes(DType t) { return t == DType::fp32 ? 4 : 2; }

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

    float resolved_scale() const { return scale > 0.0f ? scale : 1.0f / std::sqrt(float(d)); }
    size_t q_elems() const { return size_t(B) * H * Nq * d; }
    size_t kv_elems() const { return size_t(B) * H * Nk * d; }
    size_t lse_elems() const { return size_t(B) * H * Nq; }
    // Forward FLOPs as the FlashAttention papers count them: 2 matrix products of 2*Nq*Nk*d each,
    // halved when causal (the convention of the published benchmark tables).
    double forward_flops() const { return 4.0 * B * H * double(Nq) * Nk * d * (causal ? 0.5 : 1.0); }
    double backward_flops() const { return 2.5 * forward_flops(); }
};

// The last key index row i may see, plus one (bottom-right causal alignment). May be <= 0: row sees nothing.
__host__ __device__ inline int causal_key_end(int i, int Nq, int Nk) { return i + Nk - Nq + 1; }
