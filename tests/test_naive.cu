// test_naive.cu: the naive stage (CPU model and GPU kernels) and the float64 reference it is measured by.
#include <doctest/doctest.h>

#include <cmath>

#include "naive/naive.h"
#include "test_support.h"

TEST_CASE("reference backward matches finite differences of the reference forward") {
    for (bool causal : {false, true}) {
        Problem p;
        p.B = 1, p.H = 1, p.Nq = 5, p.Nk = 7, p.d = 4, p.causal = causal;
        check_reference_backward_by_finite_differences(causal ? "causal" : "no mask", p, make_inputs(p, Dist::normal, 7));
    }
}

TEST_CASE("reference: a fully masked row has O = 0 and LSE = -inf") {
    Problem p;
    p.B = 1, p.H = 1, p.Nq = 6, p.Nk = 3, p.d = 8, p.causal = true;  // rows 0..2 see no key (i + Nk - Nq < 0)
    const Reference r = reference_forward(p, make_inputs(p, Dist::normal, 3));
    for (int i = 0; i < 3; ++i) {
        CHECK(r.lse[i] == -INFINITY);
        for (int c = 0; c < p.d; ++c) CHECK(r.o[i * p.d + c] == 0.0);
    }
    CHECK(std::isfinite(r.lse[3]));
}

TEST_CASE("fp32 tolerance stays able to fail when the inputs are huge") {
    Problem p;
    p.B = 1, p.H = 1, p.Nq = p.Nk = 17, p.d = 64;
    HostTensors in = make_inputs(p, Dist::normal, 5);
    for (auto* t : {&in.q, &in.k})
        for (float& x : *t) x *= 1e5f;  // scores near 1e10: fp32 rounding moves them by hundreds
    const Tolerance tol = fp32_tolerance(p, in);
    CHECK(tol.atol <= 0.1);  // |O| <= max |V| (about 4 here): an atol in the thousands could never fail
    // and an O that is plainly wrong still fails
    const Reference ref = reference_forward(p, in);
    std::vector<float> wrong(ref.o.size());
    for (size_t i = 0; i < wrong.size(); ++i) wrong[i] = float(ref.o[i]) + 1.0f;
    CHECK_FALSE(compare("O", wrong.data(), ref.o.data(), o_layout(p), tol).ok);
}

TEST_CASE("naive CPU model matches the float64 reference over the shape matrix") {
    for (const Case& c : shape_matrix()) {
        const HostTensors in = make_inputs(c.p, c.dist, 11);
        Outputs got;
        ModelTraffic t;
        naive_model_forward(c.p, in, &got.o, &got.lse, &t);
        check_against_reference("naive model " + c.name(), c.p, in, got);
    }
}

TEST_CASE("naive CPU model traffic is Theta(N*d + N^2), exactly as counted") {
    for (auto [Nq, Nk, d] : {std::tuple{64, 64, 16}, {100, 37, 40}, {256, 512, 64}}) {
        Problem p;
        p.B = 2, p.H = 3, p.Nq = Nq, p.Nk = Nk, p.d = d;
        ModelTraffic t;
        std::vector<float> o, lse;
        naive_model_forward(p, make_inputs(p, Dist::normal, 1), &o, &lse, &t);
        const double BH = p.B * p.H, S = double(Nq) * Nk;
        // reads: Q, K once; S three times (max, sum, normalise) and P once; V once
        CHECK(t.reads == BH * (double(Nq) * d + 2.0 * Nk * d + 4 * S));
        // writes: S, P (in place), O, LSE
        CHECK(t.writes == BH * (2 * S + double(Nq) * d + Nq));
    }
}

TEST_CASE("naive CPU backward model matches the float64 reference backward") {
    for (bool causal : {false, true})
        for (auto [Nq, Nk, d] : {std::tuple{17, 17, 16}, {33, 70, 40}, {70, 33, 64}, {1, 5, 8}}) {
            Problem p;
            p.B = 1, p.H = 2, p.Nq = Nq, p.Nk = Nk, p.d = d, p.causal = causal;
            const HostTensors in = make_inputs(p, Dist::normal, 5);
            std::vector<float> o, lse;
            ModelTraffic t;
            naive_model_forward(p, in, &o, &lse, &t);
            HostGrads g;
            naive_model_backward(p, in, o, lse, &g.dq, &g.dk, &g.dv, &t);
            check_grads_against_reference("naive backward model", p, in, g);
        }
}

TEST_CASE("GPU naive forward matches the float64 reference and its CPU model over the shape matrix") {
    for (const Case& c : shape_matrix()) {
        const HostTensors in = make_inputs(c.p, c.dist, 21);
        const Outputs got = gpu_forward(c.p, in, naive_forward, naive_workspace_bytes);
        check_against_reference("naive " + c.name(), c.p, in, got);
        Outputs model;
        ModelTraffic t;
        naive_model_forward(c.p, in, &model.o, &model.lse, &t);
        check_against("naive vs its CPU model " + c.name(), c.p, in, got, model);
    }
}

TEST_CASE("GPU naive backward matches the float64 reference") {
    for (bool causal : {false, true})
        for (auto [Nq, Nk, d] : {std::tuple{17, 17, 16}, {113, 200, 64}, {200, 113, 128}, {1, 65, 40}, {256, 256, 64}}) {
            Problem p;
            p.B = 2, p.H = 2, p.Nq = Nq, p.Nk = Nk, p.d = d, p.causal = causal;
            const HostTensors in = make_inputs(p, Dist::normal, 9);
            const HostGrads g = gpu_backward(p, in, naive_forward, naive_workspace_bytes, naive_backward,
                                         naive_backward_workspace_bytes);
            check_grads_against_reference("naive backward", p, in, g);
        }
}
