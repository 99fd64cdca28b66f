// model.cu: FlashAttention-1 (Algorithm 1) in plain C++, loop for loop like the kernel in v1.cu, in fp32: K/V blocks
// j outside, Q blocks i inside. Q, K, V, O, l, m and LSE are "device memory" (Hbm arrays that count every element
// read and written); the blocks K_j, V_j, Q_i, O_i, S_ij and the row statistics are on chip (local vectors).
#include <algorithm>
#include <cmath>

#include "online_softmax/merge.cuh"
#include "v1.h"

void v1_model_forward(const Problem& p, const HostTensors& in, int Br, int Bc, std::vector<float>* o,
                      std::vector<float>* lse, ModelTraffic* t) {
    const int Nq = p.Nq, Nk = p.Nk, d = p.d;
    const int Tr = (Nq + Br - 1) / Br, Tc = (Nk + Bc - 1) / Bc;
    const float tau = p.resolved_scale();
    Hbm Q(in.q, t), K(in.k, t), V(in.v, t);
    Hbm O(p.q_elems(), t), l(p.lse_elems(), t), m(p.lse_elems(), t), LSE(p.lse_elems(), t);
    for (size_t bh = 0; bh < size_t(p.B) * p.H; ++bh) {
        const size_t q0 = bh * Nq, k0 = bh * Nk;  // this head's first row in Q, O, l, m, LSE and in K, V

        // Line 2: O = 0, l = 0, m = -inf.
        for (int r = 0; r < Nq; ++r) {
            for (int c = 0; c < d; ++c) O.write((q0 + r) * d + c, 0.0f);
            l.write(q0 + r, 0.0f);
            m.write(q0 + r, -INFINITY);
        }
        for (int j = 0; j < Tc; ++j) {  // line 5
            const int col0 = j * Bc, cols = std::min(Bc, Nk - col0);
            // Line 6: load K_j, V_j.
            const std::vector<float> K_j = K.read_block((k0 + col0) * d, size_t(cols) * d);
            const std::vector<float> V_j = V.read_block((k0 + col0) * d, size_t(cols) * d);
            for (int i = 0; i < Tr; ++i) {  // line 7
                const int row0 = i * Br, rows = std::min(Br, Nq - row0);
                if (p.causal && causal_block_skipped(row0 + rows, col0, Nq, Nk)) continue;
                const bool mask = p.causal && causal_block_needs_mask(row0, col0 + cols, Nq, Nk);

                // Line 8: load Q_i, O_i, l_i, m_i.
                const std::vector<float> Q_i = Q.read_block((q0 + row0) * d, size_t(rows) * d);
                std::vector<float> O_i = O.read_block((q0 + row0) * d, size_t(rows) * d);
                const std::vector<float> l_i = l.read_block(q0 + row0, rows), m_i = m.read_block(q0 + row0, rows);

                // Line 9: S_ij = tau Q_i K_j^T (the scale and the mask as in the paper's Algorithm 2), -inf where hidden.
                std::vector<float> S_ij(size_t(rows) * cols);
                for (int r = 0; r < rows; ++r)
                    for (int c = 0; c < cols; ++c) {
                        float s = 0.0f;
                        for (int k = 0; k < d; ++k) s += Q_i[size_t(r) * d + k] * K_j[size_t(c) * d + k];
                        const bool hidden = mask && col0 + c >= causal_key_end(row0 + r, Nq, Nk);
                        S_ij[size_t(r) * cols + c] = hidden ? -INFINITY : tau * s;
                    }

                // Lines 10-11: m~_ij, P~_ij (in place of S_ij), l~_ij, then (m_new, l_new) by merge().
                std::vector<float> m_tilde(rows), l_tilde(rows), m_new(rows), l_new(rows);
                // EXERCISE(fa1-inner-loop-model): Algorithm 1, lines 10-12: m~, P~, l~, (m_new, l_new), the new O_i
                for (int r = 0; r < rows; ++r) {
                    float* S_r = &S_ij[size_t(r) * cols];
                    float row_max = -INFINITY, row_sum = 0.0f;
                    for (int c = 0; c < cols; ++c) row_max = std::fmax(row_max, S_r[c]);
                    for (int c = 0; c < cols; ++c) {
                        S_r[c] = S_r[c] == -INFINITY ? 0.0f : std::exp(S_r[c] - row_max);
                        row_sum += S_r[c];
                    }
                    m_tilde[r] = row_max;
                    l_tilde[r] = row_sum;
                    const SoftmaxState next = merge({m_i[r], l_i[r]}, {row_max, row_sum});
                    m_new[r] = next.m;
                    l_new[r] = next.l;
                }

                // Line 12: O_i <- diag(l_new)^-1 (diag(l_i) e^(m_i - m_new) O_i + e^(m~_ij - m_new) P~_ij V_j), written back.
                for (int r = 0; r < rows; ++r) {
                    const float O_scale = l_i[r] * rescale_factor(m_i[r], m_new[r]);
                    const float PV_scale = rescale_factor(m_tilde[r], m_new[r]);
                    const float inv_l_new = inverse_l(l_new[r], t);
                    for (int k = 0; k < d; ++k) {
                        float PV = 0.0f;
                        for (int c = 0; c < cols; ++c) PV += S_ij[size_t(r) * cols + c] * V_j[size_t(c) * d + k];
                        O_i[size_t(r) * d + k] = (O_scale * O_i[size_t(r) * d + k] + PV_scale * PV) * inv_l_new;
                        O.write((q0 + row0 + r) * d + k, O_i[size_t(r) * d + k]);
                    }
                }
                // END EXERCISE
                // Line 13: l_i <- l_new, m_i <- m_new.
                for (int r = 0; r < rows; ++r) {
                    l.write(q0 + row0 + r, l_new[r]);
                    m.write(q0 + row0 + r, m_new[r]);
                }
            }
        }
        // LSE = m + log(l).
        for (int r = 0; r < Nq; ++r) LSE.write(q0 + r, log_sum_exp({m.read(q0 + r), l.read(q0 + r)}));
    }
    *o = std::move(O.values());
    *lse = std::move(LSE.values());
}
