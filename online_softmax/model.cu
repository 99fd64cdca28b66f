// model.cu: the online_softmax stage in plain C++, step for step like its kernels, in fp32, plus the float64 row
// softmax the row kernels are checked against. "Device memory" arrays are Hbm arrays that count every access;
// matrix products are counted as ideal ones, as in naive/model.cu.
#include <algorithm>
#include <cmath>

#include "naive/naive.h"
#include "online_softmax/online_softmax.h"

void softmax_row_reference(const float* x, int C, float scale, double* p, double* lse) {
    double m = -INFINITY;
    for (int j = 0; j < C; ++j) m = std::max(m, double(scale) * x[j]);
    if (m == -INFINITY) {
        std::fill(p, p + C, 0.0);
        *lse = -INFINITY;
        return;
    }
    double l = 0;
    for (int j = 0; j < C; ++j) l += std::exp(double(scale) * x[j] - m);
    for (int j = 0; j < C; ++j) p[j] = std::exp(double(scale) * x[j] - m) / l;
    *lse = m + std::log(l);
}

Tolerance softmax_rows_tolerance(int C, double max_abs_score) {
    const double rtol = 1e-4 + 0x1p-22 * max_abs_score;
    return {rtol / C, rtol};
}

namespace {

// The threads of one block of the row kernel (its 256-thread blocks, used when there are many rows): thread t
// folds scores t, t + THREADS, ... into its own state.
constexpr int THREADS = 256;

}  // namespace

void softmax_rows_online_model(const Hbm& X, Hbm* Y, Hbm* LSE, size_t lse_first, int R, int C, float scale) {
    for (int r = 0; r < R; ++r) {
        const size_t row = size_t(r) * C;
        // Pass 1: each thread's running (m, l), then the merge of all of them into the row's.
        // EXERCISE(online-rows-model): pass 1, the row's (m, l) from one read of each score (add_score, then merge)
        std::vector<SoftmaxState> thread_state(THREADS, SoftmaxState{-INFINITY, 0.0f});
        for (int j = 0; j < C; ++j) {
            SoftmaxState& s = thread_state[j % THREADS];
            s = add_score(s, scale * X.read(row + j));
        }
        SoftmaxState state = {-INFINITY, 0.0f};
        for (const SoftmaxState& s : thread_state) state = merge(state, s);
        // END EXERCISE
        // Pass 2: y_j = exp(s_j - m) / l (0 for a row of -inf).
        const float inv_l = state.l > 0.0f ? 1.0f / state.l : 0.0f;
        for (int j = 0; j < C; ++j) Y->write(row + j, rescale_factor(scale * X.read(row + j), state.m) * inv_l);
        LSE->write(lse_first + r, log_sum_exp(state));
    }
}

void online_softmax_model_forward(const Problem& p, const HostTensors& in, std::vector<float>* o,
                                  std::vector<float>* lse, ModelTraffic* t) {
    const int Nq = p.Nq, Nk = p.Nk;
    Hbm Q(in.q, t), K(in.k, t), V(in.v, t);
    Hbm S(size_t(Nq) * Nk, t), O(p.q_elems(), t), LSE(p.lse_elems(), t);  // S is reused head by head
    for (size_t bh = 0; bh < size_t(p.B) * p.H; ++bh) {
        // S = Q K^T, unscaled: the softmax applies the scale
        model_scores(p, Q, K, bh, 1.0f, &S);
        // P = softmax(scale * S), two passes over each row, in place
        softmax_rows_online_model(S, &S, &LSE, bh * Nq, Nq, Nk, p.resolved_scale());
        // O = P V
        model_pv(p, S, V, bh, &O);
    }
    *o = std::move(O.values());
    *lse = std::move(LSE.values());
}
