// test_extensions.cu: the features users turn on, in the float64 reference and v2's CPU model (on the GPU, v2's
// tensor-core passes have them: tests/test_v2_ext.cu for the forward, tests/test_v2_ext_bwd.cu for the backward;
// the other kernels refuse them): grouped-query attention (--kv-heads), the sliding window (--window L,R), dropout
// (--dropout p) with its counter-based mask (common/philox.cuh), an additive bias (--bias) with its gradient, and
// ALiBi (--alibi). The reference is checked on its own (hand-computed key ranges, the
// window's limits equal causal and no mask bitwise, finite differences through a fixed mask), then the model
// against it, in both passes, and the window's tile skipping by the model's counted traffic.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <stdexcept>

#include "common/philox.cuh"
#include "test_support.h"
#include "v1/v1.h"
#include "v2/v2.h"

namespace {

Problem small(int Nq, int Nk, int d) {
    Problem p;
    p.B = 2, p.H = 3, p.Nq = Nq, p.Nk = Nk, p.d = d;
    return p;
}

}  // namespace

TEST_CASE("Philox4x32-7 (dropout's) and -10 reproduce the known-answer vectors of the reference implementation") {
    auto check = [](auto keys, Philox4 c, Philox4 want) {
        const Philox4 got = philox4x32(c, keys);
        for (int w = 0; w < 4; ++w) CHECK(got.x[w] == want.x[w]);
    };
    const Philox4 zeros{{0, 0, 0, 0}}, ones{{~0u, ~0u, ~0u, ~0u}};
    const Philox4 pi{{0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u}};
    check(philox_keys<10>(0, 0), zeros, {{0x6627e8d5u, 0xe169c58du, 0xbc57ac4cu, 0x9b00dbd8u}});
    check(philox_keys<10>(~0u, ~0u), ones, {{0x408f276du, 0x41c83b0eu, 0xa20bc7c6u, 0x6d5451fdu}});
    check(philox_keys<10>(0xa4093822u, 0x299f31d0u), pi, {{0xd16cfe09u, 0x94fdccebu, 0x5001e420u, 0x24126ea1u}});
    static_assert(kDropoutRounds == 7, "the vectors below are Philox4x32-7's");
    check(dropout_keys(0), zeros, {{0x5f6fb709u, 0x0d893f64u, 0x4f121f81u, 0x4f730a48u}});
    check(dropout_keys(~0ull), ones, {{0x5207ddc2u, 0x45165e59u, 0x4d8ee751u, 0x8c52f662u}});
    check(dropout_keys(0x299f31d0a4093822ull), pi, {{0x4dfccabau, 0x190a87f0u, 0xc47362bau, 0xb6b5242au}});
}

TEST_CASE("dropout keeps a fraction 1 - p of the weights, for every byte of a call, and each seed and head has its own mask") {
    const int N = 512;  // 16,384 draws per byte position: the kept fraction's standard deviation is at most 0.004
    for (float p : {0.1f, 0.5f, 0.9f}) {
        const double run_p = dropout_threshold(p) / 256.0;  // the p that runs, a multiple of 1/256
        double kept[16] = {};
        for (int i = 0; i < N; ++i)
            for (int j = 0; j < N; ++j) kept[j % 16] += dropout_keep(7, 5, i, j, p);
        const double per_byte = N * N / 16.0, sigma = std::sqrt(run_p * (1.0 - run_p) / per_byte);
        for (int k = 0; k < 16; ++k)
            CHECK_MESSAGE(std::fabs(kept[k] / per_byte - (1.0 - run_p)) < 6 * sigma,
                          "p=" << p << " byte " << k << ": kept " << kept[k] / per_byte << ", want " << 1 - run_p);
    }
    int same_seed = 0, same_head = 0;
    for (int i = 0; i < 64; ++i)
        for (int j = 0; j < 64; ++j) {
            same_seed += dropout_keep(7, 5, i, j, 0.5f) == dropout_keep(8, 5, i, j, 0.5f);
            same_head += dropout_keep(7, 5, i, j, 0.5f) == dropout_keep(7, 6, i, j, 0.5f);
        }
    CHECK(std::abs(same_seed - 2048) < 6 * 32);  // independent masks agree on half the weights (sigma 32)
    CHECK(std::abs(same_head - 2048) < 6 * 32);
    CHECK(dropout_keep(7, 5, 3, 4, 0.0f));  // p = 0 keeps everything
}

TEST_CASE("visible_keys: the window and the causal mask, aligned bottom-right, by hand") {
    Problem p = small(4, 6, 8);  // row i sits at key position i + 2
    auto keys = [&](int i) { const KeyRange r = visible_keys(p, i); return std::pair{r.begin, r.end}; };
    CHECK(keys(0) == std::pair{0, 6});
    p.window_left = 1, p.window_right = 1;
    CHECK(keys(0) == std::pair{1, 4});
    CHECK(keys(3) == std::pair{4, 6});  // cut at Nk
    p.causal = true;                    // the window's right edge and the diagonal: the nearer one wins
    CHECK(keys(0) == std::pair{1, 3});
    p.window_left = -1, p.window_right = 0, p.causal = false;  // the window (-1, 0) is the causal mask
    for (int i = 0; i < 4; ++i) CHECK(keys(i) == std::pair{0, causal_key_end(i, 4, 6)});
    p = small(6, 2, 8);  // rows 0..3 sit left of key 0
    p.window_left = 0, p.window_right = 0;
    CHECK(keys(3).first >= keys(3).second);  // sees nothing
    CHECK(keys(4) == std::pair{0, 1});
}

TEST_CASE("reference: the window (-1, 0) is the causal mask and a window wider than the keys is no mask, bitwise") {
    Problem p = small(37, 70, 16);
    const HostTensors in = make_inputs(p, Dist::normal, 3);
    Problem causal = p, band = p, wide = p;
    causal.causal = true;
    band.window_left = -1, band.window_right = 0;
    wide.window_left = wide.window_right = 1000;
    CHECK(reference_forward(causal, in).o == reference_forward(band, in).o);
    CHECK(reference_forward(causal, in).lse == reference_forward(band, in).lse);
    CHECK(reference_forward(p, in).o == reference_forward(wide, in).o);
}

TEST_CASE("reference backward with a window and dropout matches finite differences of the reference forward") {
    Problem p = small(5, 7, 4);
    p.B = p.H = 1;
    p.window_left = 2, p.window_right = 1, p.dropout = 0.3f, p.dropout_seed = 11;
    const HostTensors in = make_inputs(p, Dist::normal, 7);
    int dropped = 0;
    for (int i = 0; i < p.Nq; ++i)
        for (int j = 0; j < p.Nk; ++j) dropped += !dropout_keep(p.dropout_seed, 0, i, j, p.dropout);
    REQUIRE(dropped > 0);  // the mask does something on this problem
    check_reference_backward_by_finite_differences("window 2,1 dropout 0.3", p, in);
}

TEST_CASE("reference: grouped-query attention is attention with each K/V head repeated over its group") {
    Problem p = small(37, 50, 16);
    p.H = 6, p.Hk = 2, p.causal = true;
    const HostTensors in = make_inputs(p, Dist::normal, 3);
    CHECK(in.k.size() == size_t(p.B) * 2 * p.Nk * p.d);
    Problem full = p;  // every query head with its own copy of its K/V head
    full.Hk = 0;
    HostTensors rep{in.q, {}, {}, in.dO, {}};
    for (size_t bh = 0; bh < size_t(p.B) * p.H; ++bh)
        for (auto [src, dst] : {std::pair{&in.k, &rep.k}, {&in.v, &rep.v}})
            dst->insert(dst->end(), src->begin() + p.kv_head(bh) * p.Nk * p.d, src->begin() + (p.kv_head(bh) + 1) * p.Nk * p.d);
    CHECK(reference_forward(p, in).o == reference_forward(full, rep).o);
    // dK, dV of a K/V head: the sum of its group's dK, dV with the heads repeated
    const ReferenceGrads g = reference_backward(p, in), f = reference_backward(full, rep);
    CHECK(g.dq == f.dq);
    double worst = 0;
    for (size_t bkv = 0; bkv < size_t(p.B) * p.Hk; ++bkv)
        for (size_t e = 0; e < size_t(p.Nk) * p.d; ++e) {
            double sk = 0, sv = 0;
            for (int m = 0; m < p.group(); ++m) {
                const size_t bh = bkv / p.Hk * p.H + bkv % p.Hk * p.group() + m;
                sk += f.dk[bh * p.Nk * p.d + e], sv += f.dv[bh * p.Nk * p.d + e];
            }
            worst = std::max({worst, std::fabs(sk - g.dk[bkv * p.Nk * p.d + e]), std::fabs(sv - g.dv[bkv * p.Nk * p.d + e])});
        }
    CHECK(worst < 1e-12);
}

TEST_CASE("v2 CPU model with grouped-query attention, a window and dropout matches the float64 reference in both passes") {
    struct Setting {
        int L, R;
        bool causal;
        float dropout;
        int Hk;
    };
    for (const Setting s : {Setting{20, 5, false, 0.0f, 0}, {-1, 0, false, 0.2f, 0}, {0, -1, false, 0.0f, 3},
                            {3, 3, true, 0.1f, 1}, {-1, -1, true, 0.9f, 0}, {64, 64, false, 0.5f, 1}, {-1, -1, false, 0.0f, 1},
                            {-1, -1, true, 0.0f, 3}})
        for (auto [Nq, Nk, d] : {std::tuple{1, 1, 16}, {77, 130, 32}, {140, 45, 32}, {200, 200, 64}}) {
            Problem p = small(Nq, Nk, d);
            p.window_left = s.L, p.window_right = s.R, p.causal = s.causal, p.dropout = s.dropout, p.dropout_seed = 5;
            p.Hk = s.Hk;  // H = 3: 3 is one K/V head per query head, 1 is multi-query attention
            const HostTensors in = make_inputs(p, Dist::normal, 9);
            Outputs got;
            ModelTraffic t;
            v2_model_forward(p, in, &got.o, &got.lse, &t);
            const std::string label = "kv_heads " + std::to_string(p.kv_heads()) + " window " + std::to_string(s.L) + "," + std::to_string(s.R) + " causal=" +
                                      std::to_string(s.causal) + " dropout=" + std::to_string(s.dropout) + " Nq=" +
                                      std::to_string(Nq) + " Nk=" + std::to_string(Nk);
            check_against_reference(label, p, in, got);
            HostGrads g;
            v2_model_backward(p, in, got.o, got.lse, &g.dq, &g.dk, &g.dv, &t);
            check_grads_against_reference(label, p, in, g);
        }
    for (DType t : {DType::fp16, DType::bf16}) {  // the same-precision rule, as for the kernels
        Problem p = small(77, 130, 64);
        p.dtype = t, p.window_left = 30, p.window_right = 2, p.dropout = 0.25f, p.Hk = 1;
        const HostTensors in = make_inputs(p, Dist::normal, 4);
        Outputs got;
        ModelTraffic tr;
        v2_model_forward(p, in, &got.o, &got.lse, &tr);
        check_against_reference(std::string("multi-query, window and dropout in ") + dtype_name(t), p, in, got);
    }
}

TEST_CASE("v2 CPU model: a window skips the K/V tiles outside the band, so K/V traffic grows like N, not N^2") {
    double band_reads[2] = {0, 0};
    for (int N : {1024, 2048}) {
        Problem p = small(N, N, 16);
        p.B = p.H = 1;
        p.window_left = 100, p.window_right = 20;
        const HostTensors in = make_inputs(p, Dist::normal, 1);
        const V2Tiles tiles = v2_fp32_forward_tiles(p.d);
        ModelTraffic t;
        std::vector<float> o, lse;
        v2_model_forward(p, in, &o, &lse, &t);
        // Each Q tile of Br rows sees keys i - 100 .. i + 20 for its rows: a band of Br + 120 keys, which tiles of
        // Bc keys cover with at most Br + 120 + 2 Bc keys read (one partial tile at each end).
        const double Tr = N / tiles.Br, kv_reads_bound = Tr * 2.0 * (tiles.Br + 120 + 2 * tiles.Bc) * p.d;
        const double q_o_lse = 2.0 * N * p.d + N;
        CHECK(t.reads + t.writes - q_o_lse <= kv_reads_bound);
        ModelTraffic full;
        p.window_left = p.window_right = -1;
        v2_model_forward(p, in, &o, &lse, &full);
        CHECK(full.reads > 3 * t.reads);  // the whole K/V walked per Q tile
        band_reads[N / 2048] = t.reads;
    }
    CHECK(band_reads[1] / band_reads[0] == doctest::Approx(2.0).epsilon(0.05));  // twice the rows, twice the reads
    Problem p = small(300, 300, 32);  // the backward skips the same tiles: its counted reads shrink too
    p.window_left = 10, p.window_right = 10;
    const HostTensors in = make_inputs(p, Dist::normal, 2);
    std::vector<float> o, lse, dq, dk, dv;
    ModelTraffic f, band, full;
    v2_model_forward(p, in, &o, &lse, &f);
    v2_model_backward(p, in, o, lse, &dq, &dk, &dv, &band);
    Problem unmasked = p;
    unmasked.window_left = unmasked.window_right = -1;
    v2_model_backward(unmasked, in, o, lse, &dq, &dk, &dv, &full);
    CHECK(band.reads < full.reads / 2);
}

TEST_CASE("the stages without the extensions refuse them: v2 fp32 in both passes before any launch, one reason") {
    Problem p = small(64, 64, 64);
    p.dtype = DType::fp16;
    p.window_left = 8, p.window_right = 0;
    CHECK(p.has_extensions());
    CHECK(v2_unsupported(p).empty());           // the tensor-core forward has them (tests/test_v2_ext.cu)
    CHECK(v2_backward_unsupported(p).empty());  // and the backward (tests/test_v2_ext_bwd.cu); fp32 has neither
    Problem p32 = p;
    p32.dtype = DType::fp32;
    CHECK_THROWS_WITH_AS(v2_forward(p32, ForwardArgs{}), doctest::Contains("--window, --dropout"), std::invalid_argument);
    CHECK_THROWS_WITH_AS(v2_backward(p32, BackwardArgs{}), doctest::Contains("--window, --dropout"), std::invalid_argument);
    p.dtype = DType::fp32;
    p.window_left = p.window_right = -1, p.dropout = 0.1f;
    CHECK(p.has_extensions());
    CHECK_THROWS_WITH_AS(v2_forward(p, ForwardArgs{}), doctest::Contains("--window, --dropout"), std::invalid_argument);
    p.dtype = DType::fp16;
    p.dropout = 0.0f, p.Hk = 2;
    p.H = 4;
    CHECK(p.has_extensions());
    p32 = p;
    p32.dtype = DType::fp32;
    CHECK_THROWS_WITH_AS(v2_backward(p32, BackwardArgs{}), doctest::Contains("--kv-heads"), std::invalid_argument);
    p.Hk = 4;  // as many K/V heads as query heads: plain attention
    CHECK_FALSE(p.has_extensions());
    CHECK(v2_stage().cpu_model_extensions);
    CHECK_FALSE(v1_stage().cpu_model_extensions);
}

TEST_CASE("ALiBi: the paper's slopes, and the computed bias equals the same bias given as a tensor, bitwise") {
    for (int h = 0; h < 8; ++h) CHECK(alibi_slope(h, 8) == std::ldexp(1.0f, -(h + 1)));  // 1/2, 1/4, ..., 1/256
    CHECK(alibi_bias(0.5f, 3, 1, 4, 6) == -0.5f * 4);  // row 3 sits at key 5: distance 4
    Problem p = small(37, 50, 16);
    p.alibi = true, p.causal = true;
    const HostTensors in = make_inputs(p, Dist::normal, 3);
    Problem given = p;  // the same numbers as a [1, H, Nq, Nk] tensor
    given.alibi = false, given.bias_batch = 1, given.bias_heads = p.H;
    HostTensors with_tensor = in;
    for (int h = 0; h < p.H; ++h)
        for (int i = 0; i < p.Nq; ++i)
            for (int j = 0; j < p.Nk; ++j)
                with_tensor.bias.push_back(alibi_bias(alibi_slope(h, p.H), i, j, p.Nq, p.Nk));
    CHECK(reference_forward(p, in).o == reference_forward(given, with_tensor).o);
    CHECK(reference_forward(p, in).lse == reference_forward(given, with_tensor).lse);
}

TEST_CASE("reference backward with a bias and ALiBi matches finite differences, dbias included") {
    Problem p = small(5, 7, 4);
    p.B = 1, p.H = 2, p.bias_batch = 1, p.bias_heads = 1, p.alibi = true, p.causal = true;  // one bias for both heads
    check_reference_backward_by_finite_differences("bias [1, 1] and ALiBi", p, make_inputs(p, Dist::normal, 7));
}

TEST_CASE("v2 CPU model with a bias (every broadcast shape) and ALiBi matches the float64 reference, dbias included") {
    for (auto [bB, bH] : {std::pair{1, 3}, {2, 1}, {2, 3}, {1, 1}})
        for (bool alibi : {false, true})
            for (auto [Nq, Nk, causal] : {std::tuple{77, 130, false}, {140, 45, true}, {1, 1, false}}) {
                Problem p = small(Nq, Nk, 32);
                p.bias_batch = bB, p.bias_heads = bH, p.alibi = alibi, p.causal = causal;
                const HostTensors in = make_inputs(p, Dist::normal, 13);
                REQUIRE(in.bias.size() == p.bias_elems());
                Outputs got;
                ModelTraffic t;
                v2_model_forward(p, in, &got.o, &got.lse, &t);
                const std::string label = "bias [" + std::to_string(bB) + ", " + std::to_string(bH) + "] alibi=" +
                                          std::to_string(alibi) + " Nq=" + std::to_string(Nq) + " Nk=" + std::to_string(Nk);
                check_against_reference(label, p, in, got);
                HostGrads g;
                v2_model_backward_scheduled(p, in, got.o, got.lse, &g.dq, &g.dk, &g.dv, &t, 0, false, &g.dbias);
                REQUIRE(g.dbias.size() == p.bias_elems());
                check_grads_against_reference(label, p, in, g);
            }
    Problem p = small(40, 60, 16);  // a bias shared by the batch: its gradient is the sum of the per-batch ones
    p.bias_batch = 1, p.bias_heads = p.H;
    const HostTensors in = make_inputs(p, Dist::normal, 2);
    Problem per_batch = p;
    per_batch.bias_batch = p.B;
    HostTensors twice = in;
    twice.bias.insert(twice.bias.end(), in.bias.begin(), in.bias.end());  // the same bias for both batches
    const ReferenceGrads shared = reference_backward(p, in), split = reference_backward(per_batch, twice);
    double worst = 0;
    for (size_t e = 0; e < shared.dbias.size(); ++e)
        worst = std::max(worst, std::fabs(shared.dbias[e] - split.dbias[e] - split.dbias[e + shared.dbias.size()]));
    CHECK(worst < 1e-12);
}

TEST_CASE("packed batch (--seqlens): equal lengths give the padded problem's numbers, laid out [T, H, d]") {
    Problem padded = small(23, 23, 16);  // B = 2, H = 3
    padded.causal = true;
    Problem packed = padded;
    packed.seqlens_q = packed.seqlens_k = {23, 23};
    REQUIRE(packed.q_elems() == padded.q_elems());
    const HostTensors pad_in = make_inputs(padded, Dist::normal, 4);
    // [B, H, N, d] -> [B * N, H, d]
    auto pack = [&](const std::vector<float>& t, int N) {
        std::vector<float> out(t.size());
        for (int b = 0; b < 2; ++b)
            for (int h = 0; h < 3; ++h)
                for (int i = 0; i < N; ++i)
                    for (int c = 0; c < 16; ++c) out[((size_t(b) * N + i) * 3 + h) * 16 + c] = t[((size_t(b) * 3 + h) * N + i) * 16 + c];
        return out;
    };
    const HostTensors packed_in{pack(pad_in.q, 23), pack(pad_in.k, 23), pack(pad_in.v, 23), pack(pad_in.dO, 23), {}};
    const Reference a = reference_forward(padded, pad_in), b = reference_forward(packed, packed_in);
    std::vector<float> ao(a.o.begin(), a.o.end()), bo(b.o.begin(), b.o.end());
    CHECK(pack(ao, 23) == bo);
    for (int bh = 0; bh < 6; ++bh)  // LSE: [B, H, N] -> [H, B * N]
        for (int i = 0; i < 23; ++i) CHECK(a.lse[size_t(bh) * 23 + i] == b.lse[size_t(bh % 3) * 46 + (bh / 3) * 23 + i]);
    const ReferenceGrads ga = reference_backward(padded, pad_in), gb = reference_backward(packed, packed_in);
    std::vector<float> adk(ga.dk.begin(), ga.dk.end()), bdk(gb.dk.begin(), gb.dk.end());
    CHECK(pack(adk, 23) == bdk);
}

TEST_CASE("packed batch: a sequence's part round-trips, and a short sequence costs no padded work") {
    Problem p = small(1, 1, 8);
    p.seqlens_q = {1, 17, 5}, p.seqlens_k = {9, 2, 30};
    p.B = 3, p.Nq = 17, p.Nk = 30;
    const HostTensors in = make_inputs(p, Dist::normal, 6);
    CHECK(in.q.size() == 23u * p.H * p.d);
    CHECK(in.k.size() == 41u * p.H * p.d);
    std::vector<float> q(in.q.size(), NAN);
    for (int s = 0; s < 3; ++s) {
        const Problem one = sequence_problem(p, s);
        CHECK(one.Nq == p.seqlens_q[s]);
        CHECK(one.Nk == p.seqlens_k[s]);
        CHECK(one.head_offset == s * p.H);  // dropout keys sequence s's heads like batch entry s
        put_sequence_rows(p, s, false, p.H, sequence_inputs(p, in, s).q, &q);
    }
    CHECK(q == in.q);
    // The model's traffic for lengths (1, 100) against the padded (100, 100): the short sequence adds almost nothing.
    Problem two = small(100, 100, 16);
    two.B = 2, two.H = 1;
    ModelTraffic padded_t;
    std::vector<float> o, lse;
    v2_model_forward(two, make_inputs(two, Dist::normal, 1), &o, &lse, &padded_t);
    ModelTraffic long_t, short_t;
    Problem one = two;
    one.B = 1;
    v2_model_forward(one, make_inputs(one, Dist::normal, 1), &o, &lse, &long_t);
    one.Nq = one.Nk = 1;
    v2_model_forward(one, make_inputs(one, Dist::normal, 1), &o, &lse, &short_t);
    CHECK(long_t.reads + short_t.reads < 0.6 * padded_t.reads);
}
