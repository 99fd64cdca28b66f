// test_online_softmax.cu: the (m, l) merge, the online row softmax (CPU model and kernel) against the 3-pass one
// and float64, and the online_softmax attention stage (CPU model and GPU) against the naive stage and float64.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <random>

#include "naive/naive.h"
#include "online_softmax/online_softmax.h"
#include "test_support.h"

namespace {

const int LENGTHS[] = {1, 31, 33, 1000, 4097};

// Rows of the kinds the softmax must survive, `rows` rows of C scores each.
enum class RowKind { normal, large, all_masked, partly_masked };
const char* kind_name(RowKind k) {
    return k == RowKind::normal ? "normal" : k == RowKind::large ? "large |x| ~ 1e4" : k == RowKind::all_masked ? "all -inf" : "partly -inf";
}
std::vector<float> make_rows(RowKind kind, int rows, int C, uint32_t seed) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    std::uniform_real_distribution<float> large(-1e4f, 1e4f);
    std::vector<float> x(size_t(rows) * C);
    for (size_t e = 0; e < x.size(); ++e) {
        if (kind == RowKind::normal) x[e] = normal(rng);
        if (kind == RowKind::large) x[e] = large(rng);
        if (kind == RowKind::all_masked) x[e] = -INFINITY;
        if (kind == RowKind::partly_masked) x[e] = e % 3 == 0 ? -INFINITY : 30.0f * normal(rng);
    }
    return x;
}
const RowKind ROW_KINDS[] = {RowKind::normal, RowKind::large, RowKind::all_masked, RowKind::partly_masked};

double max_abs_score(const std::vector<float>& x, float scale) {
    double m = 0;
    for (float v : x)
        if (std::isfinite(v)) m = std::max(m, std::fabs(double(scale) * v));
    return m;
}

// The (m, l) of scores x[begin, end), folded one score at a time.
SoftmaxState fold(const std::vector<float>& x, size_t begin, size_t end) {
    SoftmaxState s = {-INFINITY, 0.0f};
    for (size_t j = begin; j < end; ++j) s = merge(s, {x[j], 1.0f});
    return s;
}

// The safe 3-pass softmax of every row, in fp32 (the algorithm of naive/softmax.cu, on the CPU).
void softmax_3pass_cpu(const std::vector<float>& x, int R, int C, float scale, std::vector<float>* y,
                       std::vector<float>* lse) {
    y->assign(x.size(), 0.0f);
    lse->assign(R, 0.0f);
    for (int r = 0; r < R; ++r) {
        const float* row = &x[size_t(r) * C];
        float m = -INFINITY, l = 0;
        for (int j = 0; j < C; ++j) m = std::fmax(m, row[j]);
        for (int j = 0; j < C; ++j) l += m == -INFINITY ? 0.0f : std::exp(scale * (row[j] - m));
        for (int j = 0; j < C; ++j) (*y)[size_t(r) * C + j] = m == -INFINITY ? 0.0f : std::exp(scale * (row[j] - m)) / l;
        (*lse)[r] = m == -INFINITY ? -INFINITY : scale * m + std::log(l);
    }
}

void softmax_online_cpu(const std::vector<float>& x, int R, int C, float scale, std::vector<float>* y,
                        std::vector<float>* lse, ModelTraffic* t) {
    Hbm X(x, t), Y(x.size(), t), LSE(size_t(R), t);
    softmax_rows_online_model(X, &Y, &LSE, 0, R, C, scale);
    *y = std::move(Y.values());
    *lse = std::move(LSE.values());
}

// CHECKs Y and LSE of R rows against float64, and against `want` (another fp32 softmax of the same rows).
void check_rows(const std::string& label, const std::vector<float>& x, int R, int C, float scale,
                const std::vector<float>& y, const std::vector<float>& lse, const std::vector<float>& want_y,
                const std::vector<float>& want_lse) {
    std::vector<double> p(x.size()), ref_lse(R);
    for (int r = 0; r < R; ++r) softmax_row_reference(&x[size_t(r) * C], C, scale, &p[size_t(r) * C], &ref_lse[r]);
    const Tolerance tol = softmax_rows_tolerance(C, max_abs_score(x, scale)), lse_tol = {tol.rtol, tol.rtol};
    const Layout rows{1, size_t(R), size_t(C), 1, 1}, lses{1, size_t(R), 1, 1, 1};
    for (const Comparison& c : {compare("Y", y.data(), p.data(), rows, tol), compare("LSE", lse.data(), ref_lse.data(), lses, lse_tol),
                                compare("Y vs 3-pass", y.data(), want_y.data(), rows, tol),
                                compare("LSE vs 3-pass", lse.data(), want_lse.data(), lses, lse_tol)})
        CHECK_MESSAGE(c.ok, label << ": " << c.report);
}

}  // namespace

// ------------------------------------------------------------------------------------------------ the merge

TEST_CASE("online softmax merge: (m = -inf, l = 0) is the identity, and two empty parts stay empty") {
    const SoftmaxState empty = {-INFINITY, 0.0f};
    for (SoftmaxState s : {SoftmaxState{0.5f, 3.0f}, {-1e4f, 1.0f}, {1e4f, 7.5f}, {-INFINITY, 0.0f}}) {
        for (SoftmaxState r : {merge(empty, s), merge(s, empty)}) {
            CHECK(r.m == s.m);
            CHECK(r.l == s.l);  // exact: the empty part's factor is 0 and the other's is exp(0) = 1
        }
    }
    const SoftmaxState both = merge(empty, empty);
    CHECK(both.m == -INFINITY);
    CHECK(both.l == 0.0f);
    CHECK(log_sum_exp(both) == -INFINITY);
}

TEST_CASE("online softmax add_score equals merge with a one-score part, -inf included") {
    const float inf = INFINITY;
    const std::vector<SoftmaxState> states = {{-inf, 0.0f}, {0.5f, 1.0f}, {3.0f, 2.5f}, {-2.0f, 7.0f}, {1e4f, 1.0f}};
    for (const SoftmaxState& a : states)
        for (float s : {-inf, -1e4f, -3.0f, 0.5f, 2.9f, 3.0f, 3.1f, 1e4f}) {
            const SoftmaxState want = merge(a, {s, 1.0f}), got = add_score(a, s);
            CHECK(got.m == want.m);
            CHECK(got.l == doctest::Approx(want.l).epsilon(1e-6));
            CHECK_FALSE(std::isnan(got.l));
        }
}

TEST_CASE("online softmax merge is associative: any split of a row, merged in any order, gives its (m, l)") {
    std::mt19937 rng(5);
    for (RowKind kind : ROW_KINDS)
        for (int C : {1, 2, 31, 1000}) {
            const std::vector<float> x = make_rows(kind, 1, C, 17u * C);
            std::vector<double> p(C);
            double ref_lse = 0;
            softmax_row_reference(x.data(), C, 1.0f, p.data(), &ref_lse);
            const SoftmaxState whole = fold(x, 0, C);
            for (int trial = 0; trial < 20; ++trial) {
                // Random cut points (empty parts allowed), the parts' states, then three merge orders.
                std::vector<size_t> cuts = {0, size_t(C)};
                for (int k = std::uniform_int_distribution<int>(0, 6)(rng); k > 0; --k)
                    cuts.push_back(std::uniform_int_distribution<size_t>(0, C)(rng));
                std::sort(cuts.begin(), cuts.end());
                std::vector<SoftmaxState> parts;
                for (size_t k = 0; k + 1 < cuts.size(); ++k) parts.push_back(fold(x, cuts[k], cuts[k + 1]));
                SoftmaxState left = {-INFINITY, 0.0f}, right = {-INFINITY, 0.0f};
                for (const SoftmaxState& s : parts) left = merge(left, s);
                for (auto s = parts.rbegin(); s != parts.rend(); ++s) right = merge(*s, right);
                std::vector<SoftmaxState> tree = parts;  // pairwise, like the warp shuffles
                while (tree.size() > 1) {
                    std::vector<SoftmaxState> next;
                    for (size_t k = 0; k < tree.size(); k += 2) next.push_back(k + 1 < tree.size() ? merge(tree[k], tree[k + 1]) : tree[k]);
                    tree = next;
                }
                for (const SoftmaxState& s : {left, right, tree[0]}) {
                    INFO(kind_name(kind) << ", C = " << C << ", " << parts.size() << " parts");
                    CHECK(s.m == whole.m);  // the max does not depend on the order
                    CHECK(!std::isnan(s.l));
                    CHECK(std::fabs(s.l - whole.l) <= 1e-5 * whole.l);
                    if (ref_lse == -INFINITY) CHECK(log_sum_exp(s) == -INFINITY);
                    else CHECK(std::fabs(log_sum_exp(s) - ref_lse) <= 1e-5 * std::max(1.0, std::fabs(ref_lse)));
                }
            }
        }
}

// ------------------------------------------------------------------------------------------------ row softmax

TEST_CASE("online softmax rows CPU model matches the 3-pass softmax and float64") {
    for (RowKind kind : ROW_KINDS)
        for (int C : LENGTHS)
            for (float scale : {1.0f, 0.125f, 0.3f}) {
                const int R = 3;
                const std::vector<float> x = make_rows(kind, R, C, 100u + C);
                std::vector<float> y, lse, y3, lse3;
                ModelTraffic t;
                softmax_online_cpu(x, R, C, scale, &y, &lse, &t);
                softmax_3pass_cpu(x, R, C, scale, &y3, &lse3);
                check_rows(std::string("online model, ") + kind_name(kind) + ", C = " + std::to_string(C) +
                               ", scale = " + std::to_string(scale), x, R, C, scale, y, lse, y3, lse3);
            }
}

TEST_CASE("online softmax rows CPU model: rows of -inf give zeros and LSE = -inf, never NaN") {
    const std::vector<float> x = make_rows(RowKind::all_masked, 2, 33, 1);
    std::vector<float> y, lse;
    ModelTraffic t;
    softmax_online_cpu(x, 2, 33, 1.0f, &y, &lse, &t);
    for (float v : y) CHECK(v == 0.0f);
    for (float v : lse) CHECK(v == -INFINITY);
}

TEST_CASE("online softmax rows CPU model traffic: 2 reads and 1 write per element, 1 LSE write per row") {
    for (auto [R, C] : {std::pair{1, 1}, {3, 1000}, {7, 4097}}) {
        ModelTraffic t;
        std::vector<float> y, lse;
        softmax_online_cpu(make_rows(RowKind::normal, R, C, 3), R, C, 1.0f, &y, &lse, &t);
        CHECK(t.reads == 2.0 * R * C);
        CHECK(t.writes == double(R) * C + R);
    }
}

// ------------------------------------------------------------------------------------------------ attention

TEST_CASE("online softmax attention CPU model matches float64 and the naive CPU model over the shape matrix") {
    for (const Case& c : shape_matrix()) {
        const HostTensors in = make_inputs(c.p, c.dist, 11);
        Outputs got, naive;
        ModelTraffic t;
        online_softmax_model_forward(c.p, in, &got.o, &got.lse, &t);
        naive_model_forward(c.p, in, &naive.o, &naive.lse, &t);
        check_against_reference("online_softmax model " + c.name(), c.p, in, got);
        check_against("online_softmax model vs naive model " + c.name(), c.p, in, got, naive);
    }
}

TEST_CASE("online softmax attention CPU model traffic: 3 accesses per score in the softmax, naive's 4") {
    for (auto [Nq, Nk, d] : {std::tuple{64, 64, 16}, {100, 37, 40}, {256, 512, 64}}) {
        Problem p;
        p.B = 2, p.H = 3, p.Nq = Nq, p.Nk = Nk, p.d = d;
        const HostTensors in = make_inputs(p, Dist::normal, 1);
        ModelTraffic t, naive;
        std::vector<float> o, lse;
        online_softmax_model_forward(p, in, &o, &lse, &t);
        naive_model_forward(p, in, &o, &lse, &naive);
        const double BH = p.B * p.H, S = double(Nq) * Nk;
        // reads: Q, K once; S twice (the running (m, l), then normalise) and P once; V once
        CHECK(t.reads == BH * (double(Nq) * d + 2.0 * Nk * d + 3 * S));
        // writes: S, P (in place), O, LSE
        CHECK(t.writes == BH * (2 * S + double(Nq) * d + Nq));
        // the only difference from naive: one read of every score fewer
        CHECK(naive.reads - t.reads == BH * S);
        CHECK(naive.writes == t.writes);
    }
}

// ------------------------------------------------------------------------------------------------ GPU

TEST_CASE("GPU online softmax rows kernel matches float64 and the 3-pass kernel") {
    for (RowKind kind : ROW_KINDS)
        for (int C : LENGTHS)
            for (float scale : {1.0f, 0.3f})
                // offset 1 starts the rows 4 bytes past a 16-byte boundary: the scalar path even when C % 4 == 0
                for (int offset : {0, 1}) {
                    const int R = 5;
                    const std::vector<float> x = make_rows(kind, R, C, 200u + C);
                    std::vector<float> padded(offset, 0.0f);
                    padded.insert(padded.end(), x.begin(), x.end());
                    const DeviceBuffer X = upload(padded, DType::fp32, "X");
                    DeviceBuffer Y(padded.size() * 4, "Y"), Y3(padded.size() * 4, "Y3"), L(R * 4, "LSE"), L3(R * 4, "LSE3");
                    for (DeviceBuffer* b : {&Y, &Y3, &L, &L3}) b->poison();
                    softmax_rows_online(X.f32() + offset, Y.f32() + offset, L.f32(), R, C, scale);
                    softmax_rows_3pass(X.f32() + offset, Y3.f32() + offset, L3.f32(), R, C, scale);
                    auto rows_of = [&](const DeviceBuffer& b) {
                        std::vector<float> all = download(b, padded.size(), DType::fp32);
                        return std::vector<float>(all.begin() + offset, all.end());
                    };
                    check_rows(std::string("online kernel, ") + kind_name(kind) + ", C = " + std::to_string(C) +
                                   ", scale = " + std::to_string(scale) + ", offset = " + std::to_string(offset),
                               x, R, C, scale, rows_of(Y), download(L, R, DType::fp32), rows_of(Y3),
                               download(L3, R, DType::fp32));
                }
}

TEST_CASE("GPU online softmax rows kernel works in place, like the attention stage uses it") {
    for (int C : {1000, 4097}) {
        const int R = 4;
        const std::vector<float> x = make_rows(RowKind::normal, R, C, 9);
        DeviceBuffer S = upload(x, DType::fp32, "S"), L(R * 4, "LSE");
        softmax_rows_online(S.f32(), S.f32(), L.f32(), R, C, 1.0f);
        std::vector<float> y3, lse3;
        softmax_3pass_cpu(x, R, C, 1.0f, &y3, &lse3);
        check_rows("online kernel in place, C = " + std::to_string(C), x, R, C, 1.0f,
                   download(S, x.size(), DType::fp32), download(L, R, DType::fp32), y3, lse3);
    }
}

TEST_CASE("GPU online softmax attention matches float64 and the naive stage over the shape matrix") {
    for (const Case& c : shape_matrix()) {
        const HostTensors in = make_inputs(c.p, c.dist, 21);
        const Outputs got = gpu_forward(c.p, in, online_softmax_forward, online_softmax_workspace_bytes);
        check_against_reference("online_softmax " + c.name(), c.p, in, got);
        const Outputs naive = gpu_forward(c.p, in, naive_forward, naive_workspace_bytes);
        check_against("online_softmax vs naive " + c.name(), c.p, in, got, naive);
    }
}
