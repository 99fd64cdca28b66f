// attention.cu: the naive pipeline with the online softmax. The only changes from naive/naive.cu's forward: the
// softmax is softmax_rows_online (3 accesses per score instead of 4), and the scale moves from the product
// S = Q K^T into the softmax, which has to read every score anyway.
//
// For each (batch, head):     S = Q K^T                  (Nq x Nk, unscaled, written to device memory)
//                             P = softmax(scale * S)     (in place, 2 passes over each row; LSE on the side)
//                             O = P V
#include "cuda_check.h"
#include "naive/naive.h"
#include "online_softmax/online_softmax.h"

std::string online_softmax_unsupported(const Problem& p) { return naive_unsupported(p); }

size_t online_softmax_workspace_bytes(const Problem& p) { return naive_workspace_bytes(p); }

void online_softmax_forward(const Problem& p, const ForwardArgs& a) {
    const int BH = p.B * p.H, Nq = p.Nq, Nk = p.Nk, d = p.d;
    const float *Q = static_cast<const float*>(a.q), *K = static_cast<const float*>(a.k), *V = static_cast<const float*>(a.v);
    float* S = static_cast<float*>(a.workspace);
    // Per-head matrices as strided views: Q and V by rows, K transposed, S by rows.
    const MatrixView q_rows{Q, (long long)Nq * d, d, 1}, k_transposed{K, (long long)Nk * d, 1, d};
    const MatrixView v_rows{V, (long long)Nk * d, d, 1}, s_rows{S, (long long)Nq * Nk, Nk, 1};
    // S = Q K^T, masked entries -inf
    batched_matmul(BH, Nq, Nk, d, 1.0f, q_rows, k_transposed, S, p.causal ? Nq : 0);
    // P = softmax(scale * S), in place
    softmax_rows_online(S, S, a.lse, BH * Nq, Nk, p.resolved_scale());
    // O = P V
    batched_matmul(BH, Nq, d, Nk, 1.0f, s_rows, v_rows, static_cast<float*>(a.o));
}
