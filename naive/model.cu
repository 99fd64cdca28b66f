// model.cu: the naive stage in plain C++, step for step like its kernels, in fp32. The arrays in "device
// memory" are Hbm arrays that count every access. A matrix product is counted as an ideal one: each input
// element read once, each output written once (the Theta(N*d + N^2) of the FlashAttention paper's analysis).
#include <cmath>

#include "naive.h"

namespace {

bool masked(const Problem& p, int i, int j) { return p.causal && j >= causal_key_end(i, p.Nq, p.Nk); }

}  // namespace

void model_scores(const Problem& p, const Hbm& Q, const Hbm& K, size_t bh, float alpha, Hbm* S) {
    const int Nq = p.Nq, Nk = p.Nk, d = p.d;
    const std::vector<float> q = Q.read_block(bh * Nq * d, size_t(Nq) * d), k = K.read_block(bh * Nk * d, size_t(Nk) * d);
    for (int i = 0; i < Nq; ++i)
        for (int j = 0; j < Nk; ++j) {
            float s = 0;
            for (int c = 0; c < d; ++c) s += q[size_t(i) * d + c] * k[size_t(j) * d + c];
            S->write(size_t(i) * Nk + j, masked(p, i, j) ? -INFINITY : alpha * s);
        }
}

void model_pv(const Problem& p, const Hbm& S, const Hbm& V, size_t bh, Hbm* O) {
    const int Nq = p.Nq, Nk = p.Nk, d = p.d;
    const std::vector<float> P = S.read_block(0, size_t(Nq) * Nk), v = V.read_block(bh * Nk * d, size_t(Nk) * d);
    for (int i = 0; i < Nq; ++i)
        for (int c = 0; c < d; ++c) {
            float acc = 0;
            for (int j = 0; j < Nk; ++j) acc += P[size_t(i) * Nk + j] * v[size_t(j) * d + c];
            O->write((bh * Nq + i) * d + c, acc);
        }
}

void naive_model_forward(const Problem& p, const HostTensors& in, std::vector<float>* o, std::vector<float>* lse,
                         ModelTraffic* t) {
    const int Nq = p.Nq, Nk = p.Nk;
    Hbm Q(in.q, t), K(in.k, t), V(in.v, t);
    Hbm S(size_t(Nq) * Nk, t), O(p.q_elems(), t), LSE(p.lse_elems(), t);  // S is reused head by head
    for (size_t bh = 0; bh < size_t(p.B) * p.H; ++bh) {
        // S = scale * Q K^T
        model_scores(p, Q, K, bh, p.resolved_scale(), &S);
        // P = softmax(S), three passes over each row
        for (int i = 0; i < Nq; ++i) {
            // EXERCISE(softmax-3pass-model): the safe softmax of row i of S in three passes (max, sum, normalise), and LSE
            const size_t row = size_t(i) * Nk;
            float m = -INFINITY, l = 0;
            for (int j = 0; j < Nk; ++j) m = std::fmax(m, S.read(row + j));
            for (int j = 0; j < Nk; ++j) l += m == -INFINITY ? 0.0f : std::exp(S.read(row + j) - m);
            for (int j = 0; j < Nk; ++j) S.write(row + j, m == -INFINITY ? 0.0f : std::exp(S.read(row + j) - m) / l);
            LSE.write(bh * Nq + i, m == -INFINITY ? -INFINITY : m + std::log(l));
            // END EXERCISE
        }
        // O = P V
        model_pv(p, S, V, bh, &O);
    }
    *o = std::move(O.values());
    *lse = std::move(LSE.values());
}

void naive_model_backward(const Problem& p, const HostTensors& in, const std::vector<float>& o,
                          const std::vector<float>& lse, std::vector<float>* dq, std::vector<float>* dk,
                          std::vector<float>* dv, ModelTraffic* t) {
    const int Nq = p.Nq, Nk = p.Nk, d = p.d;
    const float scale = p.resolved_scale();
    Hbm Q(in.q, t), K(in.k, t), V(in.v, t), dO(in.dO, t), O(o, t), LSE(lse, t);
    Hbm P(size_t(Nq) * Nk, t), dS(size_t(Nq) * Nk, t), D(size_t(Nq), t);
    Hbm dQ(p.q_elems(), t), dK(p.kv_elems(), t), dV(p.kv_elems(), t);
    for (size_t bh = 0; bh < size_t(p.B) * p.H; ++bh) {
        const std::vector<float> q = Q.read_block(bh * Nq * d, size_t(Nq) * d), k = K.read_block(bh * Nk * d, size_t(Nk) * d);
        const std::vector<float> v = V.read_block(bh * Nk * d, size_t(Nk) * d), g = dO.read_block(bh * Nq * d, size_t(Nq) * d);
        const std::vector<float> L = LSE.read_block(bh * Nq, Nq), out = O.read_block(bh * Nq * d, size_t(Nq) * d);
        // P = exp(scale * Q K^T - LSE) and dP = dO V^T, then dS = P * (dP - D) with D = rowsum(dO * O)
        for (int i = 0; i < Nq; ++i) {
            float Di = 0;
            for (int c = 0; c < d; ++c) Di += g[size_t(i) * d + c] * out[size_t(i) * d + c];
            D.write(i, Di);
            for (int j = 0; j < Nk; ++j) {
                float s = 0, dp = 0;
                for (int c = 0; c < d; ++c) {
                    s += q[size_t(i) * d + c] * k[size_t(j) * d + c];
                    dp += g[size_t(i) * d + c] * v[size_t(j) * d + c];
                }
                const float pij = (masked(p, i, j) || L[i] == -INFINITY) ? 0.0f : std::exp(scale * s - L[i]);
                P.write(size_t(i) * Nk + j, pij);
                dS.write(size_t(i) * Nk + j, pij * (dp - D.read(i)));
            }
        }
        // dV = P^T dO, dQ = scale * dS K, dK = scale * dS^T Q
        const std::vector<float> pm = P.read_block(0, size_t(Nq) * Nk), ds = dS.read_block(0, size_t(Nq) * Nk);
        for (int c = 0; c < d; ++c) {
            for (int j = 0; j < Nk; ++j) {
                float acc_v = 0, acc_k = 0;
                for (int i = 0; i < Nq; ++i) {
                    acc_v += pm[size_t(i) * Nk + j] * g[size_t(i) * d + c];
                    acc_k += ds[size_t(i) * Nk + j] * q[size_t(i) * d + c];
                }
                dV.write((bh * Nk + j) * d + c, acc_v);
                dK.write((bh * Nk + j) * d + c, scale * acc_k);
            }
            for (int i = 0; i < Nq; ++i) {
                float acc = 0;
                for (int j = 0; j < Nk; ++j) acc += ds[size_t(i) * Nk + j] * k[size_t(j) * d + c];
                dQ.write((bh * Nq + i) * d + c, scale * acc);
            }
        }
    }
    *dq = std::move(dQ.values());
    *dk = std::move(dK.values());
    *dv = std::move(dV.values());
}
