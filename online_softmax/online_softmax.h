// online_softmax.h: the second rung. The naive pipeline with its 3-pass softmax replaced by the online softmax of
// Milakov & Gimelshein (2018): one pass keeps a running (m, l) per row, merged with merge() from merge.cuh, and a
// second pass normalises. Each score is touched 3 times (2 reads, 1 write) instead of 4 (3 reads, 1 write).
#pragma once
#include <string>
#include <vector>

#include "harness.h"
#include "online_softmax/merge.cuh"

// ------------------------------------------------------------------------------------------------ row softmax
// Row softmax of the R x C matrix X, online, in two passes over each row: (m, l) of the scaled scores
// s_j = scale * x_j, then Y = exp(s - m) / l. Same contract as naive's softmax_rows_3pass: LSE = m + log l (when
// lse is not null), a row of -inf gives zeros and LSE = -inf, X and Y may be the same array, scale > 0, C >= 1.
void softmax_rows_online(const float* X, float* Y, float* lse, int R, int C, float scale, cudaStream_t stream = 0);

// The float64 softmax of one row of C scores (p has C entries), for checking the kernels.
void softmax_row_reference(const float* x, int C, float scale, double* p, double* lse);
// The tolerance for a softmax row whose largest |scale * x| is max_abs_score. A probability is accurate relative
// to itself: exp and the sum l in fp32 give ~1e-5, and the score s = scale * x is rounded to fp32, an error of an
// ulp of |s| that exp turns into a relative error of the same size (the same reasoning as fp32_tolerance).
// atol only matters for probabilities near underflow, so it is scaled down with the row length.
Tolerance softmax_rows_tolerance(int C, double max_abs_score);

// CPU model of softmax_rows_online on "device memory" arrays, rows 0..R-1 of X (C wide) into Y (Y may be X);
// row r's LSE goes to LSE[lse_first + r].
void softmax_rows_online_model(const Hbm& X, Hbm* Y, Hbm* LSE, size_t lse_first, int R, int C, float scale);

// ----------------------------------------------------------------------------------------------------- attention
// Forward: S = Q K^T (unscaled, masked entries -inf), P = online softmax of scale * S (in place, LSE written),
// O = P V. Q, K, V, O fp32 [B,H,N,d]; the workspace holds S, as in the naive stage.
size_t online_softmax_workspace_bytes(const Problem& p);
std::string online_softmax_unsupported(const Problem& p);
void online_softmax_forward(const Problem& p, const ForwardArgs& a);

// CPU model with the same steps, counting device-memory traffic (online_softmax/model.cu).
void online_softmax_model_forward(const Problem& p, const HostTensors& in, std::vector<float>* o,
                                  std::vector<float>* lse, ModelTraffic* t);

// The stage as the harness runs it (stage.cu): naive below it.
const Stage& online_softmax_stage();
