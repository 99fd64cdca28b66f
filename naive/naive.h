// naive.h: the first rung. Attention as three separate steps that materialise the Nq x Nk score matrix S in
// device memory: S = scale * Q K^T, P = softmax(S) row by row (the safe 3-pass way), O = P V.
#pragma once
#include <string>
#include <vector>

#include "harness.h"

// A matrix inside a batch of matrices, addressed by strides, so that a transpose is only a swap of strides.
// Element (r, c) of batch b is ptr[b * batch_stride + r * row_stride + c * col_stride].
struct MatrixView {
    const float* ptr;
    long long batch_stride;
    int row_stride, col_stride;
};

// C[b] = alpha * A[b] B[b] for every batch b: A is M x K, B is K x N, C is M x N row-major (leading dim N).
// With causal_Nq > 0 the result is a score matrix and entries a query may not see are set to -inf
// (column j of row i is masked when j >= i + N - causal_Nq, the bottom-right alignment with Nq = causal_Nq).
void batched_matmul(int batches, int M, int N, int K, float alpha, MatrixView A, MatrixView B, float* C,
                    int causal_Nq = 0, cudaStream_t stream = 0);

// Row softmax the safe way, three passes over each row of the R x C matrix X: m = max_j x_j, then
// l = sum_j exp(scale * (x_j - m)), then Y = exp(scale * (x - m)) / l. Also writes LSE = scale * m + log l (when
// lse is not null). A row of -inf gives zeros and LSE = -inf. X and Y may be the same array. (scale > 0.)
void softmax_rows_3pass(const float* X, float* Y, float* lse, int R, int C, float scale, cudaStream_t stream = 0);

// Forward: Q, K, V, O fp32 [B,H,N,d]; workspace holds S (naive_workspace_bytes).
size_t naive_workspace_bytes(const Problem& p);
std::string naive_unsupported(const Problem& p);
void naive_forward(const Problem& p, const ForwardArgs& a);

// Backward (materialises P and dS; recomputes S from Q, K and LSE).
size_t naive_backward_workspace_bytes(const Problem& p);
void naive_backward(const Problem& p, const BackwardArgs& a);

// CPU models with the same steps, counting device-memory traffic (naive/model.cu).
// The two matrix products of one head, shared with the online_softmax model as the kernels share batched_matmul:
// S (Nq x Nk, device memory) = alpha * Q K^T with hidden entries -inf, and O = P V with P read from S.
void model_scores(const Problem& p, const Hbm& Q, const Hbm& K, size_t bh, float alpha, Hbm* S);
void model_pv(const Problem& p, const Hbm& S, const Hbm& V, size_t bh, Hbm* O);
void naive_model_forward(const Problem& p, const HostTensors& in, std::vector<float>* o, std::vector<float>* lse,
                         ModelTraffic* t);
void naive_model_backward(const Problem& p, const HostTensors& in, const std::vector<float>& o,
                          const std::vector<float>& lse, std::vector<float>* dq, std::vector<float>* dk,
                          std::vector<float>* dv, ModelTraffic* t);

// The stage as the harness runs it (stage.cu): the first rung, nothing below it.
const Stage& naive_stage();
