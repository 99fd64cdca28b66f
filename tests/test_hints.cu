// test_hints.cu: the hints of a failed forward check (tests/harness/compare.cu) name the classic bug behind the
// numbers. Each case builds the outputs a bug produces from the float64 reference; the same bugs planted in the v2
// CPU model's code are checked by scripts/exercises_proof.sh (exercises/bugs.json).
#include <doctest/doctest.h>

#include <cmath>

#include "test_support.h"

namespace {

Problem hint_problem(int Nq, int Nk, bool causal) {
    Problem p;
    p.B = 1, p.H = 2, p.Nq = Nq, p.Nk = Nk, p.d = 32, p.causal = causal;
    return p;
}

Outputs as_float(const Reference& r) { return {std::vector<float>(r.o.begin(), r.o.end()), std::vector<float>(r.lse.begin(), r.lse.end())}; }

// The report of the first failing comparison of compare_forward (O first, then LSE); "" when both pass.
std::string report(const Problem& p, const HostTensors& in, const Outputs& got) {
    for (const Comparison& c : compare_forward(p, in, got.o, got.lse))
        if (!c.ok) return c.report;
    return "";
}

void check_hint(const std::string& report, const std::string& want) {
    INFO(report);
    CHECK(report.find("hint: ") != std::string::npos);
    CHECK(report.substr(report.find("hint: ")).find(want) != std::string::npos);
}

}  // namespace

TEST_CASE("hint: rows scaled down by one factor each means O was divided by l more than once") {
    const Problem p = hint_problem(100, 70, false);
    const HostTensors in = make_inputs(p, Dist::normal, 1);
    Outputs got = as_float(reference_forward(p, in));
    for (size_t r = 0; r < p.lse_elems(); ++r)
        for (int c = 0; c < p.d; ++c) got.o[r * p.d + c] /= 1.5f + float(r % 7);
    check_hint(report(p, in, got), "divided by l more than once");
}

TEST_CASE("hint: rows scaled up by one factor each means O was not divided by l") {
    const Problem p = hint_problem(100, 70, false);
    const HostTensors in = make_inputs(p, Dist::normal, 1);
    Outputs got = as_float(reference_forward(p, in));
    for (size_t r = 0; r < p.lse_elems(); ++r)
        for (int c = 0; c < p.d; ++c) got.o[r * p.d + c] *= 3.0f + float(r % 5);
    check_hint(report(p, in, got), "not divided by l");
}

TEST_CASE("hint: LSE too large and O wrong means l and O were not rescaled, also with Nq below one tile") {
    for (int Nq : {40, 100}) {  // 40 < 64: every row is in the last (partial) tile, which must not be blamed
        const Problem p = hint_problem(Nq, 70, false);
        const HostTensors in = make_inputs(p, Dist::normal, 2);
        Outputs got = as_float(reference_forward(p, in));
        for (size_t r = 0; r < p.lse_elems(); ++r) {
            got.lse[r] += 0.3f;
            for (int c = 0; c < p.d; ++c) got.o[r * p.d + c] += 0.1f * float((r + c) % 3) - 0.1f;
        }
        const std::string rep = report(p, in, got);
        check_hint(rep, "l and O were not rescaled");
        CHECK(rep.find("last partial tile") == std::string::npos);
    }
}

TEST_CASE("hint: only the rows of the last partial tile, and only when there is a full tile too") {
    const Problem p = hint_problem(100, 70, false);  // rows 64..99 form the partial tile
    const HostTensors in = make_inputs(p, Dist::normal, 3);
    Outputs got = as_float(reference_forward(p, in));
    for (size_t r = 0; r < p.lse_elems(); ++r)
        if (r % p.Nq >= 64)
            for (int c = 0; c < p.d; ++c) got.o[r * p.d + c] = 0.0f;
    check_hint(report(p, in, got), "only rows of the last partial tile");
}

TEST_CASE("hint: NaN in exactly the rows that see no key, and NaN everywhere") {
    const Problem p = hint_problem(120, 50, true);  // rows 0..69 see no key
    const HostTensors in = make_inputs(p, Dist::normal, 4);
    Outputs got = as_float(reference_forward(p, in));
    for (size_t r = 0; r < p.lse_elems(); ++r)
        if (r % p.Nq < 70) got.o[r * p.d] = NAN;
    check_hint(report(p, in, got), "NaN only in rows that see no key");
    for (float& x : got.o) x = NAN;
    check_hint(report(p, in, got), "stray ^-1");
}

TEST_CASE("hint: a causal mask aligned top-left, and no mask at all") {
    const Problem p = hint_problem(50, 120, true);
    const HostTensors in = make_inputs(p, Dist::normal, 5);
    // Top-left: row i sees keys 0..i, which is the bottom-right mask over the first Nq keys.
    Problem square = p;
    square.Nk = p.Nq;
    HostTensors first = in;
    first.k.clear(), first.v.clear();
    for (int h = 0; h < p.H; ++h) {
        first.k.insert(first.k.end(), in.k.begin() + size_t(h) * p.Nk * p.d, in.k.begin() + (size_t(h) * p.Nk + p.Nq) * p.d);
        first.v.insert(first.v.end(), in.v.begin() + size_t(h) * p.Nk * p.d, in.v.begin() + (size_t(h) * p.Nk + p.Nq) * p.d);
    }
    check_hint(report(p, in, as_float(reference_forward(square, first))), "aligned top-left");
    Problem unmasked = p;
    unmasked.causal = false;
    check_hint(report(p, in, as_float(reference_forward(unmasked, in))), "the mask was not applied");
}

TEST_CASE("hint: O scaled down with LSE too large means keys counted that no row may see (unguarded last tile)") {
    const Problem p = hint_problem(30, 70, false);
    const HostTensors in = make_inputs(p, Dist::normal, 6);
    Outputs got = as_float(reference_forward(p, in));
    for (size_t r = 0; r < p.lse_elems(); ++r) {  // 10 extra keys of score 0: l grows by 10 exp(-m)
        const float shrink = 1.0f / (1.0f + 0.05f * float(1 + r % 4));
        got.lse[r] -= std::log(shrink);
        for (int c = 0; c < p.d; ++c) got.o[r * p.d + c] *= shrink;
    }
    check_hint(report(p, in, got), "unguarded last tile");
}
