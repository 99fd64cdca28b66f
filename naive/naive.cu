// naive.cu: the naive attention pipeline, forward and backward, built from matmul.cu and softmax.cu.
//
// Forward, for each (batch, head):     S = scale * Q K^T      (Nq x Nk, written to device memory)
//                                      P = softmax(S)         (in place, 3 passes over each row; LSE on the side)
//                                      O = P V
// Backward (P and dS materialised):    S = scale * Q K^T,  P = exp(S - LSE)   (recomputed from the forward's LSE)
//                                      D  = rowsum(dO * O)
//                                      dV = P^T dO,  dP = dO V^T,  dS = P * (dP - D)
//                                      dQ = scale * dS K,  dK = scale * dS^T Q
#include <cmath>

#include "common/blocks.cuh"
#include "cuda_check.h"
#include "naive.h"

namespace {

// Views of the per-head matrices of a [B*H, rows, d] tensor and of a [B*H, Nq, Nk] score-shaped buffer.
MatrixView rows_of(const float* t, int rows, int d) { return {t, (long long)rows * d, d, 1}; }
MatrixView transpose_of(const float* t, int rows, int d) { return {t, (long long)rows * d, 1, d}; }
MatrixView scores(const float* s, int Nq, int Nk) { return {s, (long long)Nq * Nk, Nk, 1}; }
MatrixView scores_transposed(const float* s, int Nq, int Nk) { return {s, (long long)Nq * Nk, 1, Nk}; }

// P = exp(S - LSE_row), 0 where S = -inf (masked) or the row is fully masked (LSE = -inf).
__global__ void probabilities_kernel(float* S, const float* lse, int Nk, long long total) {
    for (long long e = blockIdx.x * (long long)blockDim.x + threadIdx.x; e < total; e += (long long)gridDim.x * blockDim.x) {
        const float L = lse[e / Nk];
        S[e] = (L == -INFINITY || S[e] == -INFINITY) ? 0.0f : expf(S[e] - L);
    }
}

// dS = P * (dP - D_row), written over dP.
__global__ void softmax_grad_kernel(const float* P, float* dP, const float* D, int Nk, long long total) {
    for (long long e = blockIdx.x * (long long)blockDim.x + threadIdx.x; e < total; e += (long long)gridDim.x * blockDim.x)
        dP[e] = P[e] * (dP[e] - D[e / Nk]);
}

constexpr int ELEMENTWISE_THREADS = 256;  // and 8 blocks per SM (device_sm_count, common/blocks.cuh)

}  // namespace

std::string naive_unsupported(const Problem& p) {
    if (p.dtype != DType::fp32) return "the naive stage is fp32 only";
    if (p.dO_token_major) return "the naive stage reads dO as [B, H, Nq, d] only";
    if (p.d > 256) return "head dim " + std::to_string(p.d) + " is not supported (d <= 256)";
    if (size_t(p.B) * p.H > 65535) return "B*H must be at most 65535 (one grid z-slice per head)";
    return "";
}

size_t naive_workspace_bytes(const Problem& p) { return size_t(p.B) * p.H * p.Nq * p.Nk * sizeof(float); }

void naive_forward(const Problem& p, const ForwardArgs& a) {
    const int BH = p.B * p.H;
    const float *Q = static_cast<const float*>(a.q), *K = static_cast<const float*>(a.k), *V = static_cast<const float*>(a.v);
    float* S = static_cast<float*>(a.workspace);
    // S = scale * Q K^T, masked entries -inf
    batched_matmul(BH, p.Nq, p.Nk, p.d, p.resolved_scale(), rows_of(Q, p.Nq, p.d), transpose_of(K, p.Nk, p.d), S,
                   p.causal ? p.Nq : 0);
    // P = softmax(S), in place
    softmax_rows_3pass(S, S, a.lse, BH * p.Nq, p.Nk, 1.0f);
    // O = P V
    batched_matmul(BH, p.Nq, p.d, p.Nk, 1.0f, scores(S, p.Nq, p.Nk), rows_of(V, p.Nk, p.d), static_cast<float*>(a.o));
}

size_t naive_backward_workspace_bytes(const Problem& p) {
    return 2 * naive_workspace_bytes(p) + p.lse_elems() * sizeof(float);  // P, dP/dS, D
}

void naive_backward(const Problem& p, const BackwardArgs& a) {
    const int BH = p.B * p.H, Nq = p.Nq, Nk = p.Nk, d = p.d;
    const float scale = p.resolved_scale();
    const float *Q = static_cast<const float*>(a.q), *K = static_cast<const float*>(a.k), *V = static_cast<const float*>(a.v);
    const float *O = static_cast<const float*>(a.o), *dO = static_cast<const float*>(a.dO);
    float* P = static_cast<float*>(a.workspace);
    float* dS = P + size_t(BH) * Nq * Nk;
    float* D = dS + size_t(BH) * Nq * Nk;
    const long long scores_total = (long long)BH * Nq * Nk;

    batched_matmul(BH, Nq, Nk, d, scale, rows_of(Q, Nq, d), transpose_of(K, Nk, d), P, p.causal ? Nq : 0);
    probabilities_kernel<<<device_sm_count() * 8, ELEMENTWISE_THREADS>>>(P, a.lse, Nk, scores_total);
    CUDA_CHECK_LAUNCH();
    rowsum_dO_O(dO, O, D, (long long)BH * Nq, d);  // D_i = rowsum(dO_i * O_i) (common/blocks.cuh)
    // dV = P^T dO      (Nk x d)
    batched_matmul(BH, Nk, d, Nq, 1.0f, scores_transposed(P, Nq, Nk), rows_of(dO, Nq, d), static_cast<float*>(a.dv));
    // dP = dO V^T      (Nq x Nk), then dS = P * (dP - D) in place
    batched_matmul(BH, Nq, Nk, d, 1.0f, rows_of(dO, Nq, d), transpose_of(V, Nk, d), dS);
    softmax_grad_kernel<<<device_sm_count() * 8, ELEMENTWISE_THREADS>>>(P, dS, D, Nk, scores_total);
    CUDA_CHECK_LAUNCH();
    // dQ = scale * dS K   (Nq x d),   dK = scale * dS^T Q   (Nk x d)
    batched_matmul(BH, Nq, d, Nk, scale, scores(dS, Nq, Nk), rows_of(K, Nk, d), static_cast<float*>(a.dq));
    batched_matmul(BH, Nk, d, Nq, scale, scores_transposed(dS, Nq, Nk), rows_of(Q, Nq, d), static_cast<float*>(a.dk));
}
