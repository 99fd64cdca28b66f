// checks_cpu.cu: the checks of the exercises done in the CPU models (naive/model.cu, online_softmax/, v1/, v2/).
// Every check runs the marked code on small problems and compares with the float64 reference; the shortcuts a
// value check lets through are counted: reads of the scores (one pass for the normaliser), divisions by l (once
// per row in FlashAttention-2), K/V tiles visited (causal skipping), dQ bits over two block orders (determinism).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <initializer_list>
#include <queue>
#include <random>

#include "common/blocks.cuh"
#include "exercises/checks.h"
#include "harness.h"
#include "naive/naive.h"
#include "online_softmax/online_softmax.h"
#include "v1/v1.h"
#include "v2/backward_mma.h"  // dO_rows
#include "v2/grid_order.h"
#include "v2/swizzle.h"
#include "v2/v2.h"
#include "v3/schedule.h"

ForwardRun cpu_run(const CpuForward& model) {
    return [model](const Problem& p, const HostTensors& in) {
        Outputs out;
        ModelTraffic t;
        model(p, in, &out.o, &out.lse, &t);
        return out;
    };
}

Problem small_problem(int Nq, int Nk, int d, bool causal) {
    Problem p;
    p.B = 1, p.H = 2, p.Nq = Nq, p.Nk = Nk, p.d = d, p.causal = causal;
    return p;
}

std::string describe(const Problem& p, Dist dist) {
    char s[160];
    std::snprintf(s, sizeof s, "B=%d H=%d Nq=%d Nk=%d d=%d%s %s", p.B, p.H, p.Nq, p.Nk, p.d, p.causal ? " causal" : "",
                  dist_name(dist));
    return s;
}

CheckResult forward_values(const ForwardRun& run) {
    struct Case {
        Problem p;
        Dist dist;
    };
    // In the order they run. The first one that fails is reported, so each classic bug meets first the problem where
    // its hint is clearest (docs/exercises.md, "Classic bugs and their hints").
    const Case cases[] = {{small_problem(100, 200, 64, false), Dist::large},  // K/V tiles, a partial Q tile, a growing max
                          {small_problem(50, 120, 32, true), Dist::normal},   // causal, Nk > Nq: where the alignment shows
                          {small_problem(120, 50, 16, true), Dist::normal},   // causal, Nq > Nk: rows 0..69 see no key
                          {small_problem(17, 17, 40, true), Dist::outliers},
                          {small_problem(64, 64, 64, false), Dist::constant},
                          {small_problem(1, 1, 8, false), Dist::normal}};
    for (const Case& c : cases) {
        const HostTensors in = make_inputs(c.p, c.dist, 7);
        const Outputs out = run(c.p, in);
        for (const Comparison& cmp : compare_forward(c.p, in, out.o, out.lse))
            if (!cmp.ok) return {false, describe(c.p, c.dist) + ", vs float64:\n" + cmp.report};
    }
    return {true, "6 problems (causal, Nq != Nk, large logits) match float64"};
}

CheckResult masked_rows(const ForwardRun& run) {
    const Problem p = small_problem(120, 50, 16, true);
    const Outputs out = run(p, make_inputs(p, Dist::large, 3));
    for (size_t row = 0; row < p.lse_elems(); ++row) {
        if (int(row % p.Nq) >= p.Nq - p.Nk) continue;
        bool ok = out.lse[row] == -INFINITY;
        for (int c = 0; c < p.d; ++c) ok = ok && out.o[row * p.d + c] == 0.0f;
        if (!ok)
            return {false, describe(p, Dist::large) + ": row " + std::to_string(row % p.Nq) + " sees no key: LSE " +
                               std::to_string(out.lse[row]) + ", O[0] " + std::to_string(out.o[row * p.d])};
    }
    return {true, "rows that see no key give O = 0 and LSE = -inf exactly"};
}

CheckResult counted(bool ok, const std::string& what, double got, double want) {
    char s[300];
    std::snprintf(s, sizeof s, "%s: %.0f, closed form %.0f", what.c_str(), got, want);
    return {ok, s};
}

namespace {

Problem problem(int Nq, int Nk, int d, bool causal) { return small_problem(Nq, Nk, d, causal); }

// ------------------------------------------------------------------------------------------------------- naive

Exercise softmax_3pass_model() {
    return {"softmax-3pass-model",
            {{"values", "m = max_j S_ij first (so every exp(S_ij - m) <= 1), then l, then S_ij <- exp(S_ij - m) / l; LSE_i = m + log l",
              [] { return forward_values(cpu_run(naive_model_forward)); }},
             {"masked-rows", "a row of -inf has m = -inf, and S - m is then NaN: give it zeros and LSE = -inf without computing exp",
              [] { return masked_rows(cpu_run(naive_model_forward)); }},
             {"three-passes", "read each score of the row three times (max, sum, normalise), write it once, and LSE once per row",
              [] {
                  const Problem p = problem(100, 37, 40, false);
                  ModelTraffic t;
                  std::vector<float> o, lse;
                  naive_model_forward(p, make_inputs(p, Dist::normal, 1), &o, &lse, &t);
                  const double BH = p.B * p.H, S = double(p.Nq) * p.Nk;
                  // Q, K, V once (the products), S three times and P once (P V); writes: S, P, O, LSE
                  const double reads = BH * (double(p.Nq) * p.d + 2.0 * p.Nk * p.d + 4 * S);
                  const double writes = BH * (2 * S + double(p.Nq) * p.d + p.Nq);
                  return counted(t.reads == reads && t.writes == writes, "elements read + written",
                                 t.reads + t.writes, reads + writes);
              }}}};
}

// ---------------------------------------------------------------------------------------------- online softmax

// The (m, l) of scores x[begin, end) by add_score, which does not use merge.
SoftmaxState fold(const std::vector<float>& x, size_t begin, size_t end) {
    SoftmaxState s = {-INFINITY, 0.0f};
    for (size_t j = begin; j < end; ++j) s = add_score(s, x[j]);
    return s;
}

Exercise online_merge() {
    const SoftmaxState empty = {-INFINITY, 0.0f};
    return {"online-merge",
            {{"identity", "the empty part (m = -inf, l = 0) must change nothing: its exp factor is 0 (rescale_factor), the other side's exp(0) = 1",
              [empty] {
                  for (SoftmaxState s : {SoftmaxState{0.5f, 3.0f}, {-1e4f, 1.0f}, {1e4f, 7.5f}})
                      for (SoftmaxState r : {merge(empty, s), merge(s, empty)})
                          if (r.m != s.m || r.l != s.l)
                              return CheckResult{false, "merge((-inf, 0), (" + std::to_string(s.m) + ", " + std::to_string(s.l) +
                                                            ")) gave (" + std::to_string(r.m) + ", " + std::to_string(r.l) + ")"};
                  return CheckResult{true, "merge with (-inf, 0) returns the other part exactly"};
              }},
             {"empty-stays-empty", "two empty parts: exp(-inf - (-inf)) is NaN, so never compute an exp factor for a part whose m is -inf",
              [empty] {
                  const SoftmaxState r = merge(empty, empty);
                  const bool ok = r.m == -INFINITY && r.l == 0.0f;
                  return CheckResult{ok, "merge of two empty parts: (" + std::to_string(r.m) + ", " + std::to_string(r.l) + ")"};
              }},
             {"union", "m = max(m_a, m_b) and l = l_a exp(m_a - m) + l_b exp(m_b - m): each part's sum moves to the common max",
              [] {
                  std::mt19937 rng(11);
                  std::normal_distribution<float> normal(0.0f, 1.0f);
                  for (float spread : {1.0f, 100.0f, 1e4f})
                      for (int C : {2, 31, 1000}) {
                          std::vector<float> x(C);
                          for (float& v : x) v = spread * normal(rng);
                          std::vector<double> prob(C);
                          double lse = 0;
                          softmax_row_reference(x.data(), C, 1.0f, prob.data(), &lse);
                          for (int trial = 0; trial < 10; ++trial) {
                              std::vector<size_t> cuts = {0, size_t(C)};
                              for (int k = 0; k < 4; ++k) cuts.push_back(std::uniform_int_distribution<size_t>(0, C)(rng));
                              std::sort(cuts.begin(), cuts.end());
                              SoftmaxState all = {-INFINITY, 0.0f};
                              for (size_t k = 0; k + 1 < cuts.size(); ++k) all = merge(all, fold(x, cuts[k], cuts[k + 1]));
                              const double got = log_sum_exp(all);
                              if (!(std::fabs(got - lse) <= 1e-5 * std::max(1.0, std::fabs(lse))))
                                  return CheckResult{false, "a row of " + std::to_string(C) + " scores (spread " + std::to_string(spread) +
                                                                ") in 5 parts: log-sum-exp " + std::to_string(got) + ", want " + std::to_string(lse)};
                          }
                      }
                  return CheckResult{true, "merging the parts of 90 split rows gives their log-sum-exp within 1e-5"};
              }}}};
}

void online_rows(const std::vector<float>& x, int R, int C, float scale, std::vector<float>* y, std::vector<float>* lse,
                 ModelTraffic* t) {
    Hbm X(x, t), Y(x.size(), t), LSE(size_t(R), t);
    softmax_rows_online_model(X, &Y, &LSE, 0, R, C, scale);
    *y = std::move(Y.values());
    *lse = std::move(LSE.values());
}

Exercise online_rows_model() {
    return {"online-rows-model",
            {{"values", "fold s_j = scale * x_j into a running (m, l) with add_score, per thread, then merge the threads' states",
              [] {
                  std::mt19937 rng(5);
                  std::normal_distribution<float> normal(0.0f, 1.0f);
                  for (float spread : {1.0f, 1e3f})
                      for (int C : {1, 33, 1000})
                          for (float scale : {1.0f, 0.3f}) {
                              const int R = 3;
                              std::vector<float> x(size_t(R) * C);
                              for (size_t e = 0; e < x.size(); ++e) x[e] = e % 5 == 1 ? -INFINITY : spread * normal(rng);
                              std::vector<float> y, lse;
                              ModelTraffic t;
                              online_rows(x, R, C, scale, &y, &lse, &t);
                              std::vector<double> want(x.size()), want_lse(R);
                              double max_score = 0;
                              for (int r = 0; r < R; ++r)
                                  softmax_row_reference(&x[size_t(r) * C], C, scale, &want[size_t(r) * C], &want_lse[r]);
                              for (float v : x)
                                  if (std::isfinite(v)) max_score = std::max(max_score, std::fabs(double(scale) * v));
                              const Tolerance tol = softmax_rows_tolerance(C, max_score);
                              const Layout rows{1, size_t(R), size_t(C), 1, 1}, lses{1, size_t(R), 1, 1, 1};
                              for (const Comparison& c : {compare("Y", y.data(), want.data(), rows, tol),
                                                          compare("LSE", lse.data(), want_lse.data(), lses, {tol.rtol, tol.rtol})})
                                  if (!c.ok)
                                      return CheckResult{false, std::to_string(R) + " rows of " + std::to_string(C) + " scores, spread " +
                                                                    std::to_string(spread) + ", scale " + std::to_string(scale) + ":\n" + c.report};
                          }
                  return CheckResult{true, "rows of 1, 33 and 1000 scores, some -inf, spread up to 1e3, match float64"};
              }},
             {"masked-rows", "a row of -inf must stay (m, l) = (-inf, 0) through add_score and merge: zeros and LSE = -inf",
              [] {
                  const std::vector<float> x(2 * 300, -INFINITY);
                  std::vector<float> y, lse;
                  ModelTraffic t;
                  online_rows(x, 2, 300, 1.0f, &y, &lse, &t);
                  const bool ok = std::all_of(y.begin(), y.end(), [](float v) { return v == 0.0f; }) &&
                                  std::all_of(lse.begin(), lse.end(), [](float v) { return v == -INFINITY; });
                  return CheckResult{ok, "rows of -inf give zeros and LSE = -inf"};
              }},
             {"one-pass-normaliser", "(m, l) must come from ONE read of each score: a max pass and then a sum pass is the 3-pass softmax of naive/",
              [] {
                  const int R = 7, C = 4097;
                  std::vector<float> x(size_t(R) * C), y, lse;
                  for (size_t e = 0; e < x.size(); ++e) x[e] = float(e % 13) - 6.0f;
                  ModelTraffic t;
                  online_rows(x, R, C, 1.0f, &y, &lse, &t);
                  return counted(t.reads == 2.0 * R * C, "reads of a 7 x 4097 score matrix (pass 1 + pass 2)", t.reads, 2.0 * R * C);
              }},
             {"attention", "the online_softmax stage's model uses this softmax on the score matrix (scale applied inside)",
              [] { return forward_values(cpu_run(online_softmax_model_forward)); }}}};
}

// ----------------------------------------------------------------------------------------------------------- v1

Exercise fa1_block_sizes() {
    return {"fa1-block-sizes",
            {{"paper-formula", "Algorithm 1, line 1 (FlashAttention, Dao et al. 2022): Bc = ceil(M / 4d), Br = min(ceil(M / 4d), d); M counts floats",
              [] {
                  struct Want {
                      int M, d, Bc, Br;
                  };
                  // The H100's 227 KB is 58112 floats: d = 64 gives 227 and 64, d = 128 gives 114 and 114.
                  for (Want w : {Want{58112, 64, 227, 64}, {58112, 128, 114, 114}, {2048, 64, 8, 8}, {1000, 3, 84, 3},
                                 {100, 7, 4, 4}, {12288, 48, 64, 48}}) {
                      const V1Tiles t = v1_paper_tiles(w.M, w.d);
                      if (t.Bc != w.Bc || t.Br != w.Br)
                          return CheckResult{false, "M = " + std::to_string(w.M) + ", d = " + std::to_string(w.d) + ": Bc = " +
                                                        std::to_string(t.Bc) + ", Br = " + std::to_string(t.Br) + "; want " +
                                                        std::to_string(w.Bc) + ", " + std::to_string(w.Br)};
                  }
                  return CheckResult{true, "6 budgets: Bc = ceil(M / 4d), Br = min(Bc, d)"};
              }},
             {"fits", "v1_tiles lowers M by 4d until the kernel's whole shared layout fits; with the paper's formula it then fits for every d",
              [] {
                  for (size_t smem : {size_t(48 * 1024), size_t(163 * 1024), H100_SMEM_PER_BLOCK})
                      for (int d = 1; d <= 128; ++d) {
                          Problem p;
                          p.d = d;
                          const V1Tiles t = v1_tiles(p, smem);
                          if (t.smem_bytes > smem || t.Bc != ceil_div(t.M, 4 * d) || t.Br != std::min(t.Bc, d))
                              return CheckResult{false, "d = " + std::to_string(d) + ", " + std::to_string(smem) + " bytes: Bc " +
                                                            std::to_string(t.Bc) + ", Br " + std::to_string(t.Br) + ", " +
                                                            std::to_string(t.smem_bytes) + " bytes"};
                      }
                  return CheckResult{true, "every d from 1 to 128 fits in 48 KB, 163 KB and 227 KB"};
              }}}};
}

// v1's model with the block sizes of a budget of M floats (the paper's formula) or of the H100's shared memory.
CpuForward v1_model(int M) {
    return [M](const Problem& p, const HostTensors& in, std::vector<float>* o, std::vector<float>* lse, ModelTraffic* t) {
        const V1Tiles tiles = M > 0 ? v1_paper_tiles(M, p.d) : v1_tiles(p, H100_SMEM_PER_BLOCK);
        v1_model_forward(p, in, tiles.Br, tiles.Bc, o, lse, t);
    };
}

Exercise fa1_inner_loop_model() {
    return {"fa1-inner-loop-model",
            {{"values-small-blocks", "line 10: m~, P~ = exp(S - m~), l~; line 11: merge; line 12: O_i <- (l_i e^(m_i - m_new) O_i + e^(m~ - m_new) P~ V_j) / l_new",
              [] { return forward_values(cpu_run(v1_model(2048))); }},
             {"values-h100-blocks", "the same with the H100's block sizes (few, large blocks)",
              [] { return forward_values(cpu_run(v1_model(0))); }},
             {"masked-rows", "a block row that has seen no key keeps m = -inf, l = 0: its factors are 0 (rescale_factor), and 1/l_new is not taken",
              [] { return masked_rows(cpu_run(v1_model(2048))); }},
             {"normalised-every-tile", "Algorithm 1 keeps O normalised: line 12 divides by l_new on every (i, j), through inverse_l (which counts)",
              [] {
                  const Problem p = problem(100, 70, 16, false);
                  const V1Tiles tiles = v1_paper_tiles(2048, p.d);
                  std::vector<float> o, lse;
                  ModelTraffic t;
                  v1_model_forward(p, make_inputs(p, Dist::normal, 2), tiles.Br, tiles.Bc, &o, &lse, &t);
                  const double want = double(p.B) * p.H * p.Nq * ceil_div(p.Nk, tiles.Bc);
                  return counted(t.l_divisions == want, "divisions by l (rows x K/V blocks)", t.l_divisions, want);
              }}}};
}

// ----------------------------------------------------------------------------------------------------------- v2

Exercise fa2_deferred_norm_model() {
    return {"fa2-deferred-norm-model",
            {{"values", "per tile: m_new = max(m_i, rowmax), P = exp(S - m_new), O_i <- exp(m_i - m_new) O_i + P V_j, (m_i, l_i) merged; at the end O_i / l_i",
              [] { return forward_values(cpu_run(v2_model_forward)); }},
             {"masked-rows", "a row that saw no key ends with l_i = 0: inverse_l gives 0, so O = 0, and log_sum_exp gives -inf",
              [] { return masked_rows(cpu_run(v2_model_forward)); }},
             {"one-division-per-row", "FlashAttention-2 keeps O_i unnormalised inside the loop and divides once per row, after the last K/V tile, through inverse_l (which counts)",
              [] {
                  const Problem p = problem(100, 300, 64, false);
                  std::vector<float> o, lse;
                  ModelTraffic t;
                  v2_model_forward(p, make_inputs(p, Dist::normal, 2), &o, &lse, &t);
                  const double rows = double(p.B) * p.H * p.Nq;
                  return counted(t.l_divisions == rows, "divisions by l for 200 query rows and 5 K/V tiles", t.l_divisions, rows);
              }},
             {"traffic", "Q_i loaded once, K_j and V_j once per Q tile, O_i and LSE_i written once: nothing else goes to device memory",
              [] {
                  const Problem p = problem(100, 300, 64, false);
                  std::vector<float> o, lse;
                  ModelTraffic t;
                  v2_model_forward(p, make_inputs(p, Dist::normal, 2), &o, &lse, &t);
                  const double BH = p.B * p.H, Tr = ceil_div(p.Nq, v2_fp32_forward_tiles(p.d).Br);
                  const double reads = BH * (double(p.Nq) * p.d + Tr * 2.0 * p.Nk * p.d), writes = BH * (double(p.Nq) * p.d + p.Nq);
                  return counted(t.reads == reads && t.writes == writes, "elements read + written", t.reads + t.writes, reads + writes);
              }}}};
}

Exercise causal_skip_model() {
    return {"causal-skip-model",
            {{"values", "the mask itself is applied per score; skipping must never drop a tile a row can see (bottom-right: row i sees keys j <= i + Nk - Nq)",
              [] { return forward_values(cpu_run(v2_model_forward)); }},
             {"tiles-visited", "a Q tile needs the K/V tiles up to the last key its LAST row sees (causal_key_end), none after; for B | Nq, Nk and Nk >= Nq that is Tq(Tq+1)/2 + Tq(Nk-Nq)/B tiles",
              [] {
                  for (auto [Nq, Nk, d] : {std::tuple{256, 256, 64}, {128, 384, 64}, {512, 512, 32}}) {
                      Problem p = problem(Nq, Nk, d, true);
                      const V2Tiles tiles = v2_fp32_forward_tiles(d);
                      const int B = tiles.Bc, Tq = Nq / B;  // the cases have Br = Bc = B dividing Nq and Nk
                      ModelTraffic t;
                      std::vector<float> o, lse;
                      v2_model_forward(p, make_inputs(p, Dist::normal, 4), &o, &lse, &t);
                      const double BH = p.B * p.H, per_tile = 2.0 * B * d;  // K_j and V_j
                      const double visited = (t.reads / BH - double(Nq) * d) / per_tile;
                      const double want = Tq * (Tq + 1) / 2.0 + double(Tq) * (Nk - Nq) / B;
                      if (visited != want)
                          return counted(false, "K/V tiles visited per head, Nq=" + std::to_string(Nq) + " Nk=" + std::to_string(Nk) +
                                                    " d=" + std::to_string(d) + " (tiles of " + std::to_string(B) + ")", visited, want);
                  }
                  return CheckResult{true, "K/V tiles visited equal Tq(Tq+1)/2 + Tq(Nk-Nq)/B on 3 causal problems"};
              }}}};
}

Exercise window_skip_model() {
    return {"window-skip-model",
            {{"values", "the window's mask is applied per score; the walk must hold every key a row sees (row i sits at key i + Nk - Nq and sees L keys left of it, R right; -1: unbounded)",
              [] {
                  struct Case {
                      int Nq, Nk, d, left, right;
                      bool causal;
                  };
                  for (const Case& c : {Case{100, 200, 64, 20, 5, false}, Case{150, 150, 32, 0, 0, false},
                                        Case{90, 300, 64, -1, 30, false}, Case{200, 120, 16, 40, -1, true},
                                        Case{70, 70, 40, 3, 200, false}}) {
                      Problem p = small_problem(c.Nq, c.Nk, c.d, c.causal);
                      p.window_left = c.left, p.window_right = c.right;
                      const HostTensors in = make_inputs(p, Dist::normal, 6);
                      const Outputs out = cpu_run(v2_model_forward)(p, in);
                      for (const Comparison& cmp : compare_forward(p, in, out.o, out.lse))
                          if (!cmp.ok)
                              return CheckResult{false, describe(p, Dist::normal) + " window " + std::to_string(c.left) +
                                                            "," + std::to_string(c.right) + ", vs float64:\n" + cmp.report};
                  }
                  return CheckResult{true, "5 windows (one-sided, zero-width, wider than the keys, with causal) match float64"};
              }},
             {"tiles-visited", "a Q tile walks from the K/V tile of the first key its FIRST row sees to the tile of the last key its LAST row sees, none outside",
              [] {
                  for (auto [N, d, left, right] : {std::tuple{512, 64, 40, 10}, {512, 32, 0, 0}, {384, 64, 200, 100}}) {
                      Problem p = small_problem(N, N, d, false);
                      p.window_left = left, p.window_right = right;
                      const V2Tiles tiles = v2_fp32_forward_tiles(d);
                      ModelTraffic t;
                      std::vector<float> o, lse;
                      v2_model_forward(p, make_inputs(p, Dist::normal, 4), &o, &lse, &t);
                      // The tiles a Q tile needs, by brute force over its rows' bands (N is a multiple of Br and Bc).
                      double want = 0;
                      for (int q0 = 0; q0 < N; q0 += tiles.Br) {
                          int lo = N, hi = 0;
                          for (int i = q0; i < q0 + tiles.Br; ++i)
                              lo = std::min(lo, visible_keys(p, i).begin), hi = std::max(hi, visible_keys(p, i).end);
                          if (hi > lo) want += (hi - 1) / tiles.Bc - lo / tiles.Bc + 1;
                      }
                      const double BH = p.B * p.H, per_tile = 2.0 * tiles.Bc * d;  // K_j and V_j
                      const double visited = (t.reads / BH - double(N) * d) / per_tile;
                      if (visited != want)
                          return counted(false, "K/V tiles visited per head, N=" + std::to_string(N) + " d=" + std::to_string(d) +
                                                    " window " + std::to_string(left) + "," + std::to_string(right), visited, want);
                  }
                  return CheckResult{true, "K/V tiles visited equal the tiles the rows' bands touch, on 3 windows"};
              }}}};
}

struct Grads {
    std::vector<float> dq, dk, dv;
};
// The backward model, seed and dQ mode as in v2_model_backward_scheduled. O and LSE come from the float64 reference
// (rounded to fp32), so the backward's checks do not depend on the forward's exercises.
Grads backward(const Problem& p, const HostTensors& in, uint64_t seed, bool deterministic, ModelTraffic* t) {
    const Reference ref = reference_forward(p, in);
    const std::vector<float> o(ref.o.begin(), ref.o.end()), lse(ref.lse.begin(), ref.lse.end());
    Grads g;
    v2_model_backward_scheduled(p, in, o, lse, &g.dq, &g.dk, &g.dv, t, seed, deterministic);
    return g;
}

CheckResult backward_values(bool deterministic) {
    for (auto [Nq, Nk, d, causal, dist] : {std::tuple{33, 70, 40, false, Dist::normal}, {70, 33, 64, true, Dist::normal},
                                           {40, 50, 32, true, Dist::large}, {17, 17, 64, true, Dist::normal},
                                           {1, 65, 8, false, Dist::normal}}) {
        const Problem p = problem(Nq, Nk, d, causal);
        const HostTensors in = make_inputs(p, dist, 5);
        ModelTraffic t;
        const Grads g = backward(p, in, 3, deterministic, &t);
        for (const Comparison& c : compare_grads(p, in, {g.dq, g.dk, g.dv, {}}))
            if (!c.ok) return {false, describe(p, dist) + ", vs float64:\n" + c.report};
    }
    return {true, "dQ, dK, dV of 5 problems (causal, Nq != Nk, rows that see no key) match float64"};
}

Exercise backward_ds_model() {
    return {"backward-ds-model",
            {{"gradients", "D_i = sum_k dO_ik O_ik; P_ij = exp(scale s_ij - LSE_i) (0 where masked or LSE_i = -inf); dS_ij = P_ij (dP_ij - D_i)",
              [] { return backward_values(false); }}}};
}

Exercise deterministic_dq_model() {
    return {"deterministic-dq-model",
            {{"gradients", "per Q tile: dQ_i = scale * sum_j dS_ij K_j over the K/V tiles it sees (tile_gradients gives dS_ij), then write dQ_i",
              [] { return backward_values(true); }},
             {"bitwise-repeatable", "each dQ element must be summed in one fixed order by one block; with atomics the order follows the blocks' schedule",
              [] {
                  const Problem p = problem(70, 300, 32, false);
                  const HostTensors in = make_inputs(p, Dist::normal, 8);
                  ModelTraffic t;
                  const Grads a = backward(p, in, 1, true, &t), b = backward(p, in, 2, true, &t);
                  const bool same = std::memcmp(a.dq.data(), b.dq.data(), a.dq.size() * sizeof(float)) == 0;
                  return CheckResult{same, same ? "dQ bitwise equal for two block orders (10 K/V blocks)"
                                                : "dQ differs between two orders of the K/V blocks"};
              }},
             {"dq-written-once", "no read-modify-write of dQ (that is the atomic's traffic): each dQ_i is computed on chip and written once",
              [] {
                  const Problem p = problem(70, 300, 32, false);
                  ModelTraffic t;
                  backward(p, make_inputs(p, Dist::normal, 8), 0, true, &t);
                  const double BH = p.B * p.H, writes = BH * (p.Nq + double(p.Nq) * p.d + 2.0 * p.Nk * p.d);  // D, dQ, dK, dV
                  return counted(t.writes == writes, "elements written (D, dQ, dK, dV)", t.writes, writes);
              }}}};
}

// The K/V tiles each CTA walks in a grid of `sms` persistent CTAs (v3's step 7 on), causal, Nq = Nk = N, in the order
// the kernel takes its Q tiles (v3/schedule.h). *tiles_ok: every (head, Q tile) taken once.
std::vector<long> cta_shares(int N, int Br, int heads, int sms, bool* tiles_ok) {
    const V3TileOrder order = v3_tile_order(N, Br, heads, true, true);
    const V3Walk w = v3_walk(order, order.ctas(sms), Br, N, N, 128, true);
    *tiles_ok = w.in_range && std::count(w.seen.begin(), w.seen.end(), 1) == order.positions;
    return w.share;
}

struct PersistentGrid {
    int N, Br, heads, sms;
    std::string name() const {
        return "N=" + std::to_string(N) + " Br=" + std::to_string(Br) + " heads=" + std::to_string(heads) +
               " CTAs=" + std::to_string(sms);
    }
};
// 132 CTAs (an H100 SXM's SMs) with 8 Q tiles a head (N = 1024, Br = 128): a turn of two tiles lands on the same
// pair of a head's tiles every time for a CTA (2 x 132 is a multiple of 8), which an unbalanced order cannot hide.
const PersistentGrid kGrids[] = {{1024, 128, 256, 132}, {4096, 128, 64, 132}, {2048, 192, 100, 114},
                                 {1000, 128, 300, 132}, {16384, 128, 16, 132}, {77, 128, 500, 7}};

Exercise v3_causal_order() {
    return {"v3-causal-order",
            {{"every-tile-once", "k runs over 0 .. n_q - 1 for each head: *i must take every value 0 .. n_q - 1 exactly once",
              [] {
                  for (const PersistentGrid& g : kGrids) {
                      bool ok;
                      cta_shares(g.N, g.Br, g.heads, g.sms, &ok);
                      if (!ok) return CheckResult{false, g.name() + ": some Q tile is taken twice, never, or out of range"};
                  }
                  return CheckResult{true, "every (head, Q tile) taken exactly once, on 6 grids"};
              }},
             {"equal-shares", "causal Q tile i visits about i + 1 K/V tiles; a CTA takes two positions a turn (k even, k + 1): pair a heavy tile with a light one (last with first, second-last with second, ...)",
              [] {
                  for (const PersistentGrid& g : kGrids) {
                      bool ok;
                      const std::vector<long> share = cta_shares(g.N, g.Br, g.heads, g.sms, &ok);
                      if (!ok) return CheckResult{false, g.name() + ": not every tile once (see every-tile-once)"};
                      const long most = *std::max_element(share.begin(), share.end());
                      double mean = 0;
                      for (long x : share) mean += double(x) / double(share.size());
                      if (most > 1.1 * mean)
                          return CheckResult{false, g.name() + ": the busiest CTA walks " + std::to_string(most) +
                                                        " K/V tiles, the mean is " + std::to_string(long(mean)) +
                                                        " (at most 1.1x: the grid waits for its busiest CTA)"};
                  }
                  return CheckResult{true, "the busiest CTA within 1.1x of the mean share, on 6 grids"};
              }}}};
}

// A causal grid of tiles x heads run as the GPU runs it, in units of one K/V tile of work: `slots` blocks run at once
// and each next block, in launch order (x fastest), starts on the first slot to come free. The grid takes each
// head's tiles heaviest first, as v2's forward does: its tile y is Q tile tiles - 1 - y, which visits tiles - y K/V
// tiles (causal, Nq = Nk, Br = Bc), plus 0.3 for the block's start and end; unused blocks (head < 0) cost nothing.
// Returns the time the grid ends.
double grid_time(int tiles, int heads, int slots, int chunk) {
    std::priority_queue<double, std::vector<double>, std::greater<double>> free_at;
    for (int s = 0; s < slots; ++s) free_at.push(0.0);
    double end = 0;
    for (const GridBlock& b : blocks_in_start_order(ordered_grid(tiles, heads, chunk))) {
        if (b.head < 0) continue;
        const double cost = double(tiles) - b.tile + 0.3, done = free_at.top() + cost;
        free_at.pop();
        free_at.push(done);
        end = std::max(end, done);
    }
    return end;
}

struct CausalGrid {
    int tiles, heads, slots;
    std::string name() const {
        return std::to_string(tiles) + " tiles x " + std::to_string(heads) + " heads, " + std::to_string(slots) +
               " blocks at once";
    }
};
// The GPT demo's backward (B = 16, H = 8, N = 1024: 8 K/V tiles of 128 keys; one block an SM of an H100's 132), the
// FlashAttention-2 benchmark's shapes, the forward at d = 128, N = 16384 (two blocks an SM), and 600 heads of one tile.
const CausalGrid kCausalGrids[] = {{8, 128, 132},  {8, 512, 132},    {16, 256, 132}, {32, 128, 132},
                                   {128, 32, 132}, {128, 16, 264},   {1, 600, 264}};

Exercise v2_grid_order() {
    return {"v2-grid-order",
            {{"in-range", "a chunk holds at least one head and at most all of them, whatever slots is (0 included)",
              [] {
                  for (const CausalGrid& g : kCausalGrids)
                      for (int slots : {0, 1, g.slots, 100000}) {
                          const int chunk = heavy_first_chunk(g.tiles, g.heads, slots);
                          if (chunk < 1 || chunk > g.heads)
                              return CheckResult{false, g.name() + ", slots = " + std::to_string(slots) + ": chunk " +
                                                            std::to_string(chunk) + " (from 1 to the heads, please)"};
                      }
                  return CheckResult{true, "1 <= chunk <= heads on 7 grids, 4 slot counts each"};
              }},
             {"light-tail", "the grid ends within 3% of the time of all heads in one chunk (every heavy tile first, "
                            "the lightest tail an order can give): every head's heavy tiles must start before the "
                            "light ones of the last heads (chunk 1, head by head, leaves the longest tiles for last)",
              [] {
                  for (const CausalGrid& g : kCausalGrids) {
                      const int chunk = heavy_first_chunk(g.tiles, g.heads, g.slots);
                      const double r = grid_time(g.tiles, g.heads, g.slots, chunk) /
                                       grid_time(g.tiles, g.heads, g.slots, g.heads);
                      if (r > 1.03)
                          return CheckResult{false, g.name() + ": " + std::to_string(r) +
                                                        "x the time of all heads in one chunk (at most 1.03x)"};
                  }
                  return CheckResult{true, "every grid within 1.03x of the time of all heads in one chunk"};
              }},
             {"shares-l2", "a chunk's blocks fill at most four waves (chunk x tiles <= 4 slots, or one head a chunk): "
                           "a wave then holds the tiles of few heads, whose inputs meet in L2 (all heads at once was "
                           "13% slower than head by head on an H100, backward, d = 128, N = 1024)",
              [] {
                  for (const CausalGrid& g : kCausalGrids) {
                      const int chunk = heavy_first_chunk(g.tiles, g.heads, g.slots);
                      if (chunk > 1 && long(chunk) * g.tiles > 4L * g.slots)
                          return CheckResult{false, g.name() + ": chunks of " + std::to_string(chunk) +
                                                        " heads, " + std::to_string(long(chunk) * g.tiles) +
                                                        " blocks, more than four waves"};
                  }
                  return CheckResult{true, "every chunk within four waves of blocks"};
              }}}};
}

// The backward's shared tiles (v2/swizzle.h) at the widths its kernels use, 64 to 256 columns, 16 rows each.
// "" when the check holds, else what broke. The layout: every element two bytes of its own row's kCols * 2, each
// 16-byte chunk whole and in order.
template <int kCols>
std::string swizzle_layout_error() {
    const uint32_t row_bytes = kCols * 2;
    for (int r = 0; r < 16; ++r) {
        std::vector<int> used(kCols, 0);
        for (int c = 0; c < kCols; ++c) {
            const uint32_t a = swizzle<kCols>(r, c);
            auto at = [&] {  // the element and its byte, for a failure's message
                return "(r, c) = (" + std::to_string(r) + ", " + std::to_string(c) + "), kCols = " +
                       std::to_string(kCols) + ": byte " + std::to_string(a);
            };
            if (a % 2 != 0 || a / row_bytes != uint32_t(r))
                return at() + " is not an even byte of row r's (" + std::to_string(r * row_bytes) + " .. " +
                       std::to_string((r + 1) * row_bytes - 1) + ")";
            if (used[a % row_bytes / 2]++ != 0) return at() + " holds a second element";
            if (c % 8 != 0 && a != swizzle<kCols>(r, c - 1) + 2)
                return at() + " is not 2 bytes after element c - 1: a 16-byte chunk (elements 8k .. 8k + 7) must "
                              "stay whole and in order";
        }
    }
    return "";
}
// The conflicts: chunk k of rows 8q .. 8q + 7, what one 8 x 8 matrix of an ldmatrix reads, in 8 different 16-byte
// groups of the 32 four-byte banks (one wavefront); n of the rows in one group is an n-way conflict (n wavefronts).
template <int kCols>
std::string swizzle_conflict_error() {
    for (int r0 = 0; r0 < 16; r0 += 8)
        for (int c = 0; c < kCols; c += 8) {
            int rows_in[8] = {0, 0, 0, 0, 0, 0, 0, 0};  // rows per bank group
            for (int i = 0; i < 8; ++i) ++rows_in[swizzle<kCols>(r0 + i, c) / 16 % 8];
            const int n = *std::max_element(rows_in, rows_in + 8);
            if (n > 1)
                return "rows " + std::to_string(r0) + " .. " + std::to_string(r0 + 7) + ", chunk " +
                       std::to_string(c / 8) + ", kCols = " + std::to_string(kCols) + ": " + std::to_string(n) +
                       " of the 8 rows one ldmatrix reads share a bank group, a " + std::to_string(n) +
                       "-way conflict (" + std::to_string(n) + " wavefronts instead of 1)";
        }
    return "";
}

// The first non-empty error of a list (one per tile width), or a pass that says `passed`.
CheckResult first_error(std::initializer_list<std::string> errors, const std::string& passed) {
    for (const std::string& e : errors)
        if (!e.empty()) return CheckResult{false, e};
    return CheckResult{true, passed};
}

Exercise backward_swizzle() {
    return {"backward-swizzle",
            {{"layout", "row r keeps its own kCols * 2 bytes and each element two of them; elements 8k .. 8k + 7 (one "
                        "16-byte chunk, what cp.async and ldmatrix move) stay together and in order",
              [] {
                  return first_error({swizzle_layout_error<64>(), swizzle_layout_error<128>(),
                                      swizzle_layout_error<192>(), swizzle_layout_error<256>()},
                                     "each element two bytes of its own row, chunks whole and in order, at 64, 128, "
                                     "192 and 256 columns");
              }},
             {"ldmatrix-rows", "ldmatrix reads chunk k of 8 consecutive rows; rows 128 n bytes apart put all 8 in the "
                               "same 4 banks. Move chunk k of row r within its group of 8 chunks by r % 8 (an XOR "
                               "keeps it in the group, and in its row)",
              [] {
                  return first_error({swizzle_conflict_error<64>(), swizzle_conflict_error<128>(),
                                      swizzle_conflict_error<192>(), swizzle_conflict_error<256>()},
                                     "the chunk every ldmatrix reads from 8 rows in 8 bank groups (one wavefront) "
                                     "at 64, 128, 192 and 256 columns");
              }}}};
}

// dO_rows with token_major over every element of a [B, Nq, H, d] tensor: the first element whose place is not
// ((b Nq + i) H + h) d + c, or "".
std::string token_major_error(int B, int H, int Nq, int d) {
    for (int b = 0; b < B; ++b)
        for (int h = 0; h < H; ++h) {
            const DORows rows = dO_rows(b * H + h, H, Nq, d, true);
            for (int i = 0; i < Nq; ++i)
                for (int c = 0; c < d; c += d - 1) {  // the first and last element of each row
                    const size_t want = ((size_t(b) * Nq + i) * H + h) * d + c, got = rows.start + size_t(i) * rows.ld + c;
                    if (got != want)
                        return "B = " + std::to_string(B) + ", H = " + std::to_string(H) + ", Nq = " + std::to_string(Nq) +
                               ", d = " + std::to_string(d) + ": element (b " + std::to_string(b) + ", h " +
                               std::to_string(h) + ", i " + std::to_string(i) + ", c " + std::to_string(c) + ") is at " +
                               std::to_string(want) + " in [B, Nq, H, d], but start + i ld + c = " + std::to_string(got) +
                               " (start " + std::to_string(rows.start) + ", ld " + std::to_string(rows.ld) + ")";
                }
        }
    return "";
}

Exercise token_major_do() {
    return {"token-major-do",
            {{"every-element", "in [B, Nq, H, d] the H heads of one token sit side by side: row i of head h is at token "
                               "b Nq + i, head h within it; consecutive rows of a head are one token (H d elements) "
                               "apart",
              [] {
                  return first_error({token_major_error(2, 3, 5, 16), token_major_error(3, 1, 7, 8),
                                      token_major_error(1, 8, 4, 64)},
                                     "every element of [B, Nq, H, d] tensors (H = 1, 3, 8) at start + i ld + c");
              }}}};
}

}  // namespace

const std::vector<Exercise>& cpu_exercises() {
    static const std::vector<Exercise> all = {softmax_3pass_model(),     online_merge(),         online_rows_model(),
                                              fa1_block_sizes(),         fa1_inner_loop_model(), fa2_deferred_norm_model(),
                                              causal_skip_model(),       window_skip_model(),    backward_ds_model(),
                                              deterministic_dq_model(),  v3_causal_order(),        v2_grid_order(),
                                              backward_swizzle(),        token_major_do()};
    return all;
}
