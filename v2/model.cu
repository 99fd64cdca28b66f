// model.cu: the fp32 FlashAttention-2 kernels in plain C++, loop for loop, with their tile sizes. For fp16/bf16 the
// forward model also rounds where the tensor-core kernel rounds (P before P V, O at the end), so rounding can be
// studied without a GPU. Device memory is
// Hbm (every element read or written is counted); a tile loaded "on chip" is a local vector, not counted.
//
// Forward traffic, in closed form (tests/test_v2.cu holds the model to it): Q read once, O and LSE written once,
// K and V read once per Q tile, i.e. Tr * 2 * Nk * d reads per head without a causal mask (fewer with one: tiles
// above the diagonal are never loaded).
#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>

#include "common/blocks.cuh"
#include "online_softmax/merge.cuh"
#include "v2.h"

namespace {

// Rows [row0, row0 + rows) of a [rows, d] matrix of head bh, from device memory to "on chip".
std::vector<float> load_tile(const Hbm& a, size_t bh, int N, int row0, int rows, int d) {
    return a.read_block((bh * N + row0) * d, size_t(rows) * d);
}

// Is key outside the window's band around row's diagonal (--window; never without one)?
bool outside_window(const Problem& p, int row, int key) {
    const long diagonal = long(row) + p.Nk - p.Nq;
    return (p.window_right >= 0 && key > diagonal + p.window_right) || (p.window_left >= 0 && key < diagonal - p.window_left);
}

// Is (row, key) masked: outside the window, or past the causal diagonal? (Keys past Nk are not this function's
// business: a kernel that pads the last K/V tile must mask its padding itself.)
bool masked(const Problem& p, int row, int key) {
    if (outside_window(p, row, key)) return true;
    return p.causal && key >= causal_key_end(row, p.Nq, p.Nk);
}


// Does a window leave every (row, key) of this Q tile and K/V tile outside the band? The band moves right with the
// row, so the tile is skipped when it ends before the first row's band begins or starts after the last row's ends.
bool window_skips(const Problem& p, int q0, int rows, int key0, int cols) {
    if (p.window_left < 0 && p.window_right < 0) return false;
    return key0 + cols <= visible_keys(p, q0).begin || key0 >= visible_keys(p, q0 + rows - 1).end;
}
// The K/V tiles a Q tile of rows [q0, q0 + rows) walks, with a window: from the tile holding the first key its
// first row sees (the tiles left of the band are skipped) to kv_end (the causal walk), narrowed to the window's
// right edge for its last row. Without a window: 0 and kv_end.
// EXERCISE(window-skip-model): the first K/V tile and the end of the keys a Q tile walks under a sliding window
int first_tile_key(const Problem& p, int q0, int Bc) { return visible_keys(p, q0).begin / Bc * Bc; }
int last_key_end(const Problem& p, int q0, int rows, int kv_end) {
    if (p.window_right < 0) return kv_end;
    const long edge = long(q0 + rows - 1) + p.Nk - p.Nq + p.window_right + 1;
    return int(std::clamp(edge, 0L, long(kv_end)));
}
// END EXERCISE

}  // namespace

void v2_model_forward(const Problem& p, const HostTensors& in, std::vector<float>* o, std::vector<float>* lse,
                      ModelTraffic* t) {
    const int Nq = p.Nq, Nk = p.Nk, d = p.d;
    const auto [Br, Bc] = v2_fp32_forward_tiles(d);
    const float scale = p.resolved_scale();
    Hbm Q(in.q, t), K(in.k, t), V(in.v, t), O(p.q_elems(), t), LSE(p.lse_elems(), t);
    for (size_t bh = 0; bh < size_t(p.B) * p.H; ++bh)
        for (int q0 = 0; q0 < Nq; q0 += Br) {  // one thread block per Q tile
            const int rows = std::min(Br, Nq - q0);
            const std::vector<float> Q_i = load_tile(Q, bh, Nq, q0, rows, d);
            std::vector<float> O_i(size_t(rows) * d, 0.0f);
            std::vector<SoftmaxState> ml(rows, {-INFINITY, 0.0f});
            // EXERCISE(causal-skip-model): the end of the keys this Q tile walks (causal: skip tiles above the diagonal)
            const int kv_end = p.causal ? std::min(Nk, causal_key_end(q0 + rows - 1, Nq, Nk)) : Nk;
            // END EXERCISE
            for (int key0 = first_tile_key(p, q0, Bc); key0 < last_key_end(p, q0, rows, kv_end); key0 += Bc) {
                const int cols = std::min(Bc, Nk - key0);
                const std::vector<float> K_j = load_tile(K, p.kv_head(bh), Nk, key0, cols, d);
                const std::vector<float> V_j = load_tile(V, p.kv_head(bh), Nk, key0, cols, d);
                for (int r = 0; r < rows; ++r) {
                    std::vector<float> S(cols);  // row r of S_ij, then of P_ij
                    float m_tile = -INFINITY;
                    for (int c = 0; c < cols; ++c) {
                        float s = 0.0f;
                        for (int k = 0; k < d; ++k) s += Q_i[size_t(r) * d + k] * K_j[size_t(c) * d + k];
                        S[c] = masked(p, q0 + r, key0 + c) ? -INFINITY : scale * s + float(score_bias(p, in, bh, q0 + r, key0 + c));
                        m_tile = std::fmax(m_tile, S[c]);
                    }
                    // EXERCISE(fa2-deferred-norm-model): fold row r of this tile into (m_i, l_i) and the unnormalised O_i
                    const float m_new = std::fmax(ml[r].m, m_tile);
                    float l_tile = 0.0f;
                    for (float& s : S) {
                        s = rescale_factor(s, m_new);  // P_ij = exp(S_ij - m_new), 0 where masked
                        l_tile += s;
                    }
                    const float alpha = rescale_factor(ml[r].m, m_new);
                    // fp16/bf16: the tensor-core kernel rounds P to 16 bits for P V (l sums the unrounded P);
                    // dropout scales P V's weights, not l
                    for (int c = 0; c < cols; ++c) S[c] = round_to(p.dtype, S[c]) * float(dropout_factor(p, bh, q0 + r, key0 + c));
                    for (int k = 0; k < d; ++k) {
                        float pv = 0.0f;
                        for (int c = 0; c < cols; ++c) pv += S[c] * V_j[size_t(c) * d + k];
                        O_i[size_t(r) * d + k] = alpha * O_i[size_t(r) * d + k] + pv;
                    }
                    ml[r] = merge(ml[r], {m_new, l_tile});
                    // END EXERCISE
                }
            }
            // EXERCISE(fa2-deferred-norm-model): after the last tile, O_i / l_i and LSE_i, written once
            for (int r = 0; r < rows; ++r) {  // normalise once, write once
                const float inv_l = inverse_l(ml[r].l, t);
                for (int k = 0; k < d; ++k)  // O in the inputs' type, as the kernel stores it
                    O.write((bh * Nq + q0 + r) * d + k, round_to(p.dtype, O_i[size_t(r) * d + k] * inv_l));
                LSE.write(bh * Nq + q0 + r, log_sum_exp(ml[r]));
            }
            // END EXERCISE
        }
    *o = std::move(O.values());
    *lse = std::move(LSE.values());
}

namespace {

// A Q tile of the backward pass, on chip: rows q0 .. q0 + rows - 1 of Q, dO, LSE and D.
struct QTile {
    int q0, rows;
    std::vector<float> Q, dO, L, D;
};
QTile load_q_tile(const Hbm& Q, const Hbm& dO, const Hbm& LSE, const Hbm& D, size_t bh, int Nq, int q0, int rows, int d) {
    return {q0, rows, load_tile(Q, bh, Nq, q0, rows, d), load_tile(dO, bh, Nq, q0, rows, d),
            load_tile(LSE, bh, Nq, q0, rows, 1), load_tile(D, bh, Nq, q0, rows, 1)};
}

// Algorithm 2, lines 10-11 and 13-14, for one (Q tile, K/V tile) pair: P_ij = exp(scale * Q_i K_j^T - LSE_i), 0 where
// masked or for a row that sees no key (LSE = -inf), and dS_ij = P_ij * (dP_ij - D_i) with dP_ij = dO_i V_j^T.
void tile_gradients(const Problem& p, const HostTensors& in, size_t bh, const QTile& q, int key0, int cols, const std::vector<float>& K_j,
                    const std::vector<float>& V_j, std::vector<float>* P_ij, std::vector<float>* dS_ij) {
    const int d = p.d;
    const float scale = p.resolved_scale();
    P_ij->assign(size_t(q.rows) * cols, 0.0f);
    dS_ij->assign(size_t(q.rows) * cols, 0.0f);
    for (int r = 0; r < q.rows; ++r)
        for (int c = 0; c < cols; ++c) {
            float s = 0.0f, dp = 0.0f;
            for (int k = 0; k < d; ++k) {
                s += q.Q[size_t(r) * d + k] * K_j[size_t(c) * d + k];
                dp += q.dO[size_t(r) * d + k] * V_j[size_t(c) * d + k];
            }
            const float z = float(dropout_factor(p, bh, q.q0 + r, key0 + c));  // --dropout (harness.h)
            const float bias_ij = float(score_bias(p, in, bh, q.q0 + r, key0 + c));  // --bias, --alibi: 0 without
            dp *= z;  // dropout: dP_ij = Z_ij dO_i V_j^T
            // EXERCISE(backward-ds-model): P_ij recomputed from the forward's LSE, and dS_ij = P_ij * (dP_ij - D_i)
            const bool visible = !masked(p, q.q0 + r, key0 + c) && q.L[r] != -INFINITY;
            const float pij = visible ? std::exp(scale * s + bias_ij - q.L[r]) : 0.0f;
            (*P_ij)[size_t(r) * cols + c] = pij;
            (*dS_ij)[size_t(r) * cols + c] = pij * (dp - q.D[r]);
            // END EXERCISE
            (*P_ij)[size_t(r) * cols + c] *= z;  // dV_j = (P_ij Z_ij)^T dO_i: dropout's weights
        }
}

}  // namespace

void v2_model_backward(const Problem& p, const HostTensors& in, const std::vector<float>& o,
                       const std::vector<float>& lse, std::vector<float>* dq, std::vector<float>* dk,
                       std::vector<float>* dv, ModelTraffic* t) {
    v2_model_backward_scheduled(p, in, o, lse, dq, dk, dv, t, 0, false);
}

void v2_model_backward_scheduled(const Problem& p, const HostTensors& in, const std::vector<float>& o,
                                 const std::vector<float>& lse, std::vector<float>* dq, std::vector<float>* dk,
                                 std::vector<float>* dv, ModelTraffic* t, uint64_t block_order_seed,
                                 bool deterministic_dq, std::vector<float>* dbias) {
    const int Nq = p.Nq, Nk = p.Nk, d = p.d;
    const auto [Br, Bc] = v2_fp32_backward_tiles();
    const float scale = p.resolved_scale();
    Hbm Q(in.q, t), K(in.k, t), V(in.v, t), dO(in.dO, t), O(o, t), LSE(lse, t);
    Hbm D(p.lse_elems(), t), dQ(p.q_elems(), t), dK(p.kv_elems(), t), dV(p.kv_elems(), t);
    Hbm dBias(p.bias_elems(), t);  // --bias: dS_ij added into it (a broadcast bias sums over batches and heads)
    // Pre-pass (Algorithm 2, line 4): D_i = rowsum(dO_i * O_i).
    for (size_t row = 0; row < p.lse_elems(); ++row) {
        // EXERCISE(backward-ds-model): D_i = rowsum(dO_i * O_i), from device memory into D
        float acc = 0.0f;
        for (int k = 0; k < d; ++k) acc += dO.read(row * d + k) * O.read(row * d + k);
        D.write(row, acc);
        // END EXERCISE
    }
    // dQ = 0 (the kernel's memset), for the atomic additions of the K/V blocks.
    if (!deterministic_dq)
        for (size_t e = 0; e < dQ.size(); ++e) dQ.write(e, 0.0f);

    // The order in which the GPU happens to run the K/V blocks (one block per K/V tile): in order for seed 0.
    std::vector<int> block_order(ceil_div(Nk, Bc));
    std::iota(block_order.begin(), block_order.end(), 0);
    if (block_order_seed != 0) std::shuffle(block_order.begin(), block_order.end(), std::mt19937_64(block_order_seed));

    std::vector<float> P_ij, dS_ij;
    for (size_t bkv = 0; bkv < size_t(p.B) * p.kv_heads(); ++bkv)
        for (int j : block_order) {  // one thread block per K/V tile (of a K/V head)
            const int key0 = j * Bc, cols = std::min(Bc, Nk - key0);
            const std::vector<float> K_j = load_tile(K, bkv, Nk, key0, cols, d);
            const std::vector<float> V_j = load_tile(V, bkv, Nk, key0, cols, d);
            std::vector<float> dK_j(size_t(cols) * d, 0.0f), dV_j(size_t(cols) * d, 0.0f);
            const int first_row = p.causal ? std::max(0, key0 + Nq - Nk) : 0;
            // Grouped-query attention: the block walks the Q tiles of every query head that reads this K/V head, so
            // dK_j and dV_j sum over the group on chip and are written once.
            const size_t first_head = p.first_query_head(bkv);
            for (size_t bh = first_head; bh < first_head + p.group(); ++bh) {
                for (int q0 = first_row / Br * Br; q0 < Nq; q0 += Br) {
                    if (window_skips(p, q0, std::min(Br, Nq - q0), key0, cols)) continue;
                    const QTile q = load_q_tile(Q, dO, LSE, D, bh, Nq, q0, std::min(Br, Nq - q0), d);
                    tile_gradients(p, in, bh, q, key0, cols, K_j, V_j, &P_ij, &dS_ij);
                    if (p.has_bias())  // dbias += dS_ij (the score's gradient: the bias enters it with factor 1)
                        for (int r = 0; r < q.rows; ++r)
                            for (int c = 0; c < cols; ++c) {
                                const size_t e = p.bias_offset(bh) + size_t(q0 + r) * Nk + key0 + c;
                                dBias.write(e, dBias.read(e) + dS_ij[size_t(r) * cols + c]);
                            }
                    for (int c = 0; c < cols; ++c)  // dV_j += P_ij^T dO_i, dK_j += dS_ij^T Q_i
                        for (int k = 0; k < d; ++k)
                            for (int r = 0; r < q.rows; ++r) {
                                dV_j[size_t(c) * d + k] += P_ij[size_t(r) * cols + c] * q.dO[size_t(r) * d + k];
                                dK_j[size_t(c) * d + k] += dS_ij[size_t(r) * cols + c] * q.Q[size_t(r) * d + k];
                            }
                    if (deterministic_dq) continue;
                    for (int r = 0; r < q.rows; ++r)  // dQ_i += scale * dS_ij K_j: the kernel's atomicAdd, a read and a write
                        for (int k = 0; k < d; ++k) {
                            float acc = 0.0f;
                            for (int c = 0; c < cols; ++c) acc += dS_ij[size_t(r) * cols + c] * K_j[size_t(c) * d + k];
                            const size_t e = (bh * Nq + q0 + r) * d + k;
                            dQ.write(e, dQ.read(e) + scale * acc);
                        }
                }
            }
            for (size_t e = 0; e < dK_j.size(); ++e) {
                dK.write((bkv * Nk + key0) * d + e, scale * dK_j[e]);
                dV.write((bkv * Nk + key0) * d + e, dV_j[e]);
            }
        }

    if (deterministic_dq)
        for (size_t bh = 0; bh < size_t(p.B) * p.H; ++bh)
            for (int q0 = 0; q0 < Nq; q0 += Br) {  // one thread block per Q tile, none of them sharing a dQ row
                // EXERCISE(deterministic-dq-model): dQ_i = scale * sum_j dS_ij K_j over the K/V tiles in order, written once
                const QTile q = load_q_tile(Q, dO, LSE, D, bh, Nq, q0, std::min(Br, Nq - q0), d);
                std::vector<float> dQ_i(size_t(q.rows) * d, 0.0f);
                const int kv_end = p.causal ? std::min(Nk, causal_key_end(q0 + q.rows - 1, Nq, Nk)) : Nk;
                for (int key0 = first_tile_key(p, q0, Bc); key0 < last_key_end(p, q0, q.rows, kv_end); key0 += Bc) {
                    const int cols = std::min(Bc, Nk - key0);
                    const std::vector<float> K_j = load_tile(K, p.kv_head(bh), Nk, key0, cols, d);
                    const std::vector<float> V_j = load_tile(V, p.kv_head(bh), Nk, key0, cols, d);
                    tile_gradients(p, in, bh, q, key0, cols, K_j, V_j, &P_ij, &dS_ij);
                    for (int r = 0; r < q.rows; ++r)
                        for (int k = 0; k < d; ++k)
                            for (int c = 0; c < cols; ++c)
                                dQ_i[size_t(r) * d + k] += dS_ij[size_t(r) * cols + c] * K_j[size_t(c) * d + k];
                }
                for (size_t e = 0; e < dQ_i.size(); ++e) dQ.write((bh * Nq + q0) * d + e, scale * dQ_i[e]);
                // END EXERCISE
            }
    *dq = std::move(dQ.values());
    *dk = std::move(dK.values());
    *dv = std::move(dV.values());
    if (dbias) *dbias = p.has_bias() ? std::move(dBias.values()) : std::vector<float>{};
}
