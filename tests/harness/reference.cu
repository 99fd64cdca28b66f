// reference.cu: attention in float64, written the obvious way, as the ground truth for every stage.
// Work is split over rows across the machine's cores; each row is computed by the same serial code.
#include <algorithm>
#include <cmath>
#include <limits>

#include "common/philox.cuh"
#include "harness.h"

namespace {

// One query row: s_j = scale * q.k_j (+ the bias) over the keys it sees, P = softmax(s), O = (P * Z) V with Z the
// dropout factors, LSE = max + log(sum exp(s - max)) (dropout does not change the softmax's normaliser).
void forward_row(const Problem& p, const HostTensors& in, size_t row, DType round_p, double* o, double* lse) {
    const size_t bh = row / p.Nq;
    const int i = int(row % p.Nq), d = p.d;
    const KeyRange keys = visible_keys(p, i);
    const float* q = &in.q[row * d];
    const float* K = &in.k[p.kv_head(bh) * p.Nk * d];
    const float* V = &in.v[p.kv_head(bh) * p.Nk * d];
    std::fill(o, o + d, 0.0);
    if (keys.begin >= keys.end) {
        *lse = -std::numeric_limits<double>::infinity();
        return;
    }
    std::vector<double> s(keys.end - keys.begin);
    double m = -std::numeric_limits<double>::infinity();
    for (int j = keys.begin; j < keys.end; ++j) {
        double dot = 0;
        for (int c = 0; c < d; ++c) dot += double(q[c]) * K[size_t(j) * d + c];
        s[j - keys.begin] = double(p.resolved_scale()) * dot + score_bias(p, in, bh, i, j);
        m = std::max(m, s[j - keys.begin]);
    }
    double l = 0;
    for (double sj : s) l += std::exp(sj - m);
    for (int j = keys.begin; j < keys.end; ++j) {
        double pj = std::exp(s[j - keys.begin] - m) / l;
        if (round_p != DType::fp32) pj = round_to(round_p, float(pj));
        pj *= dropout_factor(p, bh, i, j);
        for (int c = 0; c < d; ++c) o[c] += pj * V[size_t(j) * d + c];
    }
    if (round_p != DType::fp32)
        for (int c = 0; c < d; ++c) o[c] = round_to(round_p, float(o[c]));
    *lse = m + std::log(l);
}

}  // namespace

double dropout_factor(const Problem& p, size_t bh, int i, int j) {
    if (p.dropout == 0.0f) return 1.0;
    return dropout_keep(p.dropout_seed, uint32_t(p.head_offset + bh), i, j, p.dropout) ? dropout_scale(p.dropout) : 0.0;
}

double score_bias(const Problem& p, const HostTensors& in, size_t bh, int i, int j) {
    double b = 0;
    if (p.has_bias()) b += in.bias[p.bias_offset(bh) + size_t(i) * p.Nk + j];
    if (p.alibi) b += alibi_bias(alibi_slope(int((p.head_offset + bh) % p.alibi_heads()), p.alibi_heads()), i, j, p.Nq, p.Nk);
    return b;
}

Reference reference_forward(const Problem& p, const HostTensors& in, const std::vector<size_t>& rows, DType round_p) {
    if (p.varlen()) {  // a packed batch: each sequence on its own (every row; rows_to_check samples none)
        Reference r;
        r.o.resize(p.q_elems()), r.lse.resize(p.lse_elems());
        for (int s = 0; s < p.B; ++s) {
            const Reference one = reference_forward(sequence_problem(p, s), sequence_inputs(p, in, s), {}, round_p);
            put_sequence_rows(p, s, false, p.H, one.o, &r.o);
            put_sequence_lse(p, s, one.lse, &r.lse);
        }
        return r;
    }
    Reference r;
    r.o.assign(p.q_elems(), std::numeric_limits<double>::quiet_NaN());
    r.lse.assign(p.lse_elems(), std::numeric_limits<double>::quiet_NaN());
    const size_t n = rows.empty() ? p.lse_elems() : rows.size();
    parallel_for(n, [&](size_t t) {
        size_t row = rows.empty() ? t : rows[t];
        forward_row(p, in, row, round_p, &r.o[row * p.d], &r.lse[row]);
    });
    return r;
}

// Gradients of O = (P * Z) V, P = softmax(scale Q K^T + bias) (Z: the dropout factors, 1 without dropout), one K/V
// head at a time with the query heads that read it (grouped-query attention: their dK and dV add up); dbias = dS,
// summed over the bias's broadcast dimensions:
//   dV = (P * Z)^T dO,  dP = Z * (dO V^T),  D_i = sum_c dO_ic O_ic,  dS = P * (dP - D),  dQ = scale dS K,
//   dK = scale dS^T Q.
ReferenceGrads reference_backward(const Problem& p, const HostTensors& in, DType round_to_type) {
    if (p.varlen()) {  // a packed batch: each sequence on its own
        ReferenceGrads g;
        g.dq.resize(p.q_elems()), g.dk.resize(p.kv_elems()), g.dv.resize(p.kv_elems());
        for (int s = 0; s < p.B; ++s) {
            const ReferenceGrads one = reference_backward(sequence_problem(p, s), sequence_inputs(p, in, s), round_to_type);
            put_sequence_rows(p, s, false, p.H, one.dq, &g.dq);
            put_sequence_rows(p, s, true, p.kv_heads(), one.dk, &g.dk);
            put_sequence_rows(p, s, true, p.kv_heads(), one.dv, &g.dv);
        }
        return g;
    }
    // The same-precision reference starts from the same-precision forward: its O is rounded, as the O a
    // low-precision kernel reads back is, and D = rowsum(dO * O) inherits that rounding. With large logits P is
    // nearly one-hot, dP - D nearly cancels, and O's rounding is what dominates dS's error.
    const Reference fwd = reference_forward(p, in, {}, round_to_type);
    ReferenceGrads g;
    g.dq.assign(p.q_elems(), 0.0);
    g.dk.assign(p.kv_elems(), 0.0);
    g.dv.assign(p.kv_elems(), 0.0);
    // dbias: dS summed over broadcast dimensions; one partial sum per head, added up after the parallel loop
    std::vector<double> dbias_per_head(p.has_bias() ? size_t(p.B) * p.H * p.Nq * p.Nk : 0, 0.0);
    const int d = p.d, Nq = p.Nq, Nk = p.Nk;
    const double scale = p.resolved_scale();
    parallel_for(size_t(p.B) * p.kv_heads(), [&](size_t bkv) {
        const float* K = &in.k[bkv * Nk * d];
        const float* V = &in.v[bkv * Nk * d];
        double* dK = &g.dk[bkv * Nk * d];
        double* dV = &g.dv[bkv * Nk * d];
        const size_t first = p.first_query_head(bkv);
        for (size_t bh = first; bh < first + p.group(); ++bh)
            for (int i = 0; i < Nq; ++i) {
                const float* q = &in.q[(bh * Nq + i) * d];
                const float* dO = &in.dO[(bh * Nq + i) * d];
                double* dQ = &g.dq[(bh * Nq + i) * d];
                const KeyRange keys = visible_keys(p, i);  // a fully masked row has P = 0 and contributes nothing
                double D = 0;
                for (int c = 0; c < d; ++c) D += double(dO[c]) * fwd.o[(bh * Nq + i) * d + c];
                for (int j = keys.begin; j < keys.end; ++j) {
                    double s = 0, dOv = 0;
                    for (int c = 0; c < d; ++c) {
                        s += double(q[c]) * K[size_t(j) * d + c];
                        dOv += double(dO[c]) * V[size_t(j) * d + c];
                    }
                    const double Z = dropout_factor(p, bh, i, j);
                    const double P = std::exp(scale * s + score_bias(p, in, bh, i, j) - fwd.lse[bh * Nq + i]);
                    double PZ = P * Z, dS = P * (Z * dOv - D);
                    if (round_to_type != DType::fp32) {
                        PZ = round_to(round_to_type, float(PZ));
                        dS = round_to(round_to_type, float(dS));
                    }
                    if (p.has_bias()) dbias_per_head[(bh * Nq + i) * Nk + j] = dS;
                    for (int c = 0; c < d; ++c) {
                        dV[size_t(j) * d + c] += PZ * dO[c];
                        dQ[c] += scale * dS * K[size_t(j) * d + c];
                        dK[size_t(j) * d + c] += scale * dS * q[c];
                    }
                }
            }
    });
    if (p.has_bias()) {
        g.dbias.assign(p.bias_elems(), 0.0);
        for (size_t bh = 0; bh < size_t(p.B) * p.H; ++bh)
            for (size_t e = 0; e < size_t(Nq) * Nk; ++e) g.dbias[p.bias_offset(bh) + e] += dbias_per_head[bh * Nq * Nk + e];
    }
    if (round_to_type != DType::fp32)
        for (auto* t : {&g.dq, &g.dk, &g.dv, &g.dbias})
            for (double& x : *t) x = round_to(round_to_type, float(x));
    return g;
}

std::vector<size_t> rows_to_check(const Problem& p, double max_flops) {
    const double per_row = 4.0 * p.Nk * p.d;
    std::vector<size_t> rows;
    if (p.varlen() || per_row * p.lse_elems() <= max_flops) return rows;  // empty: every row
    // Heads: the first, the last, and a few in between. Rows: first, last, the last 64 (partial tiles live there)
    // and an even spread, up to the flop budget.
    const size_t heads = size_t(p.B) * p.H;
    std::vector<size_t> hs = {0, heads - 1, heads / 2, heads / 3};
    std::sort(hs.begin(), hs.end());
    hs.erase(std::unique(hs.begin(), hs.end()), hs.end());
    const size_t budget_rows = std::max<size_t>(64, size_t(max_flops / per_row / hs.size()));
    for (size_t bh : hs) {
        std::vector<size_t> rs;
        for (int i = std::max(0, p.Nq - 64); i < p.Nq; ++i) rs.push_back(i);
        const size_t stride = std::max<size_t>(1, p.Nq / std::max<size_t>(1, budget_rows - std::min<size_t>(64, p.Nq)));
        for (size_t i = 0; i < size_t(p.Nq); i += stride) rs.push_back(i);
        std::sort(rs.begin(), rs.end());
        rs.erase(std::unique(rs.begin(), rs.end()), rs.end());
        for (size_t i : rs) rows.push_back(bh * p.Nq + i);
    }
    return rows;
}
