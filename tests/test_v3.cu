// test_v3.cu: FlashAttention-3 on Hopper (v3/). On the CPU: the host-side rules (tensor-map shapes, the K/V tile
// schedule against brute force, the steps' configurations and register budget, the refusals) and step 8's
// polynomial exp2 against exp2 in double. On a Hopper GPU: every
// step over the shape matrix against float64 (the same-precision rule) and against v2, the rung below, on the same
// rounded inputs, LSE included.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <stdexcept>

#include "test_support.h"
#include "v2/v2.h"
#include "v3/exp2_poly.h"
#include "v3/schedule.h"
#include "v3/v3.h"

namespace {

Case make_case(int Nq, int Nk, int d, bool causal, Dist dist, DType dtype) {
    Problem p;
    p.B = 1, p.H = 2, p.Nq = Nq, p.Nk = Nk, p.d = d, p.causal = causal, p.dtype = dtype;
    return {p, dist};
}

// The shape matrix's cases v3 takes (d = 64 and 128), plus d = 128 with Nq != Nk both ways, several K/V tiles and a
// partial last one, a fully masked block of rows (Nq > Nk, causal), and large logits.
std::vector<Case> v3_cases(DType t) {
    std::vector<Case> cases;
    for (Case c : shape_matrix()) {
        c.p.dtype = t;
        if (v3_unsupported(c.p).empty()) cases.push_back(c);
    }
    for (bool causal : {false, true}) {
        for (auto [Nq, Nk] : {std::pair{17, 300}, {300, 17}, {129, 257}, {257, 129}, {1, 1000}, {700, 300}})
            cases.push_back(make_case(Nq, Nk, 128, causal, Dist::normal, t));
        cases.push_back(make_case(300, 300, 128, causal, Dist::large, t));
        // d = 256: K/V tiles of 64 keys, so 300 keys are five tiles and the 2-stage ring turns over twice
        for (auto [Nq, Nk] : {std::pair{17, 300}, {300, 17}, {129, 257}, {1, 1000}, {1000, 1000}})
            cases.push_back(make_case(Nq, Nk, 256, causal, Dist::normal, t));
        cases.push_back(make_case(300, 300, 256, causal, Dist::large, t));
    }
    return cases;
}

// v2 (fp32) on the same, already rounded, inputs: the rung below, as bin/v3 --check compares.
Outputs v2_on(const Problem& p, const HostTensors& in) {
    Problem p32 = p;
    p32.dtype = DType::fp32, p32.kernel = 0;
    return gpu_forward(p32, in, v2_forward, v2_workspace_bytes);
}

// v3's step k (0: the final kernel) on the same inputs.
Outputs v3_at_step(const Problem& p, const HostTensors& in, int k) {
    Problem pk = p;
    pk.kernel = k;
    return gpu_forward(pk, in, v3_forward, v3_stage().workspace_bytes);
}

bool one_line(const std::string& why) { return !why.empty() && why.find('\n') == std::string::npos; }

}  // namespace

// ------------------------------------------------------------------------------------------------------- CPU

TEST_CASE("v3 tensor maps: 3-D (column, row, head), 64-column boxes, byte strides, and the bytes a box delivers") {
    for (int d : {64, 128})
        for (auto [heads, rows, box_rows] : {std::tuple{1, 1, 64}, {32, 1000, 128}, {7, 4096, 64}}) {
            V3TensorMapShape s;
            REQUIRE(v3_tensor_map_shape(heads, rows, d, box_rows, &s).empty());
            CHECK(s.dims[0] == uint64_t(d));
            CHECK(s.dims[1] == uint64_t(rows));
            CHECK(s.dims[2] == uint64_t(heads));
            CHECK(s.strides[0] == uint64_t(d) * 2);
            CHECK(s.strides[1] == uint64_t(d) * 2 * rows);
            CHECK(s.strides[0] % 16 == 0);  // TMA's rule for global strides
            CHECK(s.strides[1] % 16 == 0);
            CHECK(s.box[0] * 2 == 128);  // the 128-byte swizzle's width, which the wgmma descriptors assume
            CHECK(s.box[1] == uint32_t(box_rows));
            CHECK(s.box[2] == 1);
            // expect_tx announces the whole box, rows past the tensor included (TMA zero-fills and counts them)
            CHECK(s.box_bytes == s.box[0] * s.box[1] * 2);
        }
    V3TensorMapShape s;
    CHECK(one_line(v3_tensor_map_shape(2, 100, 40, 64, &s)));
    CHECK(v3_tensor_map_shape(2, 100, 40, 64, &s).find("40") != std::string::npos);
    CHECK(one_line(v3_tensor_map_shape(2, 100, 64, 257, &s)));
    CHECK(one_line(v3_tensor_map_shape(0, 100, 64, 64, &s)));
}

TEST_CASE("v3 tile schedule: visited K/V tiles hold every key a row sees, no tile is wasted, unmasked tiles need no mask") {
    const int Bc = 128;
    for (bool causal : {false, true})
        for (int Br : {64, 128})
            for (auto [Nq, Nk] : {std::pair{1, 1}, {17, 17}, {113, 113}, {1000, 1000}, {17, 300}, {300, 17}, {1, 1000},
                                  {1000, 1}, {129, 257}, {257, 129}, {256, 256}, {700, 300}}) {
                INFO("causal " << causal << " Br " << Br << " Nq " << Nq << " Nk " << Nk);
                for (int q0 = 0; q0 < Nq; q0 += Br) {
                    const V3KvTiles t = v3_kv_tiles(q0, Br, Nq, Nk, Bc, causal);
                    bool last_tile_used = false, any_seen = false;
                    for (int i = q0; i < std::min(q0 + Br, Nq); ++i) {
                        const int sees = causal ? std::min(Nk, causal_key_end(i, Nq, Nk)) : Nk;  // keys [0, sees)
                        if (sees > 0) any_seen = true;
                        CHECK(sees <= t.n_tiles * Bc);                              // every seen key is visited
                        CHECK(t.first_masked * Bc <= std::max(sees, 0));            // unmasked tiles: all seen
                        if (t.n_tiles > 0 && sees > (t.n_tiles - 1) * Bc) last_tile_used = true;
                    }
                    CHECK(any_seen == (t.n_tiles > 0));
                    if (t.n_tiles > 0) CHECK(last_tile_used);  // the last visited tile holds a key some row sees
                    CHECK(t.first_masked <= t.n_tiles);
                }
            }
    // Causal skips the tiles above the diagonal: about half the work of the non-causal loop at N = 4096.
    int causal_tiles = 0, all_tiles = 0;
    for (int q0 = 0; q0 < 4096; q0 += 128) {
        causal_tiles += v3_kv_tiles(q0, 128, 4096, 4096, Bc, true).n_tiles;
        all_tiles += v3_kv_tiles(q0, 128, 4096, 4096, Bc, false).n_tiles;
    }
    CHECK(all_tiles == 32 * 32);
    CHECK(causal_tiles == 32 * 33 / 2);
}

TEST_CASE("v3 steps: each adds one idea, the warpgroups fit the register file and the tiles fit shared memory") {
    REQUIRE(v3_forward_steps().size() == 11);
    for (int d : {64, 128, 256}) {
        V3Config prev{};
        for (int k = 1; k <= 11; ++k) {
            INFO("d " << d << " step " << k);
            V3Config c;
            REQUIRE(v3_config(k, d, &c).empty());
            CHECK(c.Br == 64 * c.consumers);
            CHECK(c.threads == 128 * (c.consumers + (c.warp_specialised ? 1 : 0)));
            CHECK(c.smem_bytes <= 227 * 1024);  // the most an sm_90 block may ask for
            CHECK(c.stages >= 2);
            if (c.warp_specialised) {  // setmaxnreg: the totals fit the register file, in multiples of 8
                CHECK(128 * c.producer_regs + 128 * c.consumers * c.consumer_regs <= 65536);
                CHECK((c.producer_regs % 8 == 0 && c.consumer_regs % 8 == 0));
            }
            // Step 7's one idea, the persistent grid, takes the TMA store back out (Q_i's space is refilled early).
            const int added = (c.warp_specialised != prev.warp_specialised) + (c.ping_pong != prev.ping_pong) +
                              (c.overlap != prev.overlap) + (c.tma_store != prev.tma_store && k != 7) +
                              (k > 1 && c.stages != prev.stages) + (k > 1 && c.Bc != prev.Bc) +
                              (c.persistent != prev.persistent) +
                              (c.poly_exp != prev.poly_exp) + (k > 2 && c.consumers != prev.consumers) +
                              (c.lazy_rescale != prev.lazy_rescale);
            // steps 8 and 9 are d = 64's alone, 11 d = 256's; at d = 256 a third K/V stage does not fit (6 = 5)
            CHECK(added == (k == 1 || ((k == 8 || k == 9) && d != 64) || (k == 6 && d == 256) ||
                                    (k == 11 && d != 256)
                                ? 0
                                : 1));
            CHECK(c.tma_store == (k == 5 || k == 6));
            CHECK(c.persistent == (k >= 7));
            CHECK(c.poly_exp == (k >= 8 && d == 64));
            CHECK(c.consumers == (k == 1 ? 1 : k >= 9 && d == 64 ? 3 : 2));
            CHECK(c.lazy_rescale == (k >= 10));
            CHECK(c.stages == (k < 6 || d == 256 ? 2 : d == 64 ? 4 : 3));
            // at d = 256 O takes 128 registers: S and P get fewer; step 11 widens d = 256's tile to 80 keys
            CHECK(c.Bc == (d == 256 ? (k == 11 ? 80 : 64) : 128));
            CHECK(c.smem_bytes >= c.Br * d * 2 + 2 * c.stages * c.Bc * d * 2 + 8 * (2 * c.stages + 2));
            prev = c;
        }
    }
    // The final kernel's choice (v3_step_of): step 11, but step 8 at d = 64, causal, Nq < 4096; a given step is itself.
    Problem p;
    p.d = 64, p.causal = true;
    for (int nq : {1, 1000, 4095, 4096, 16384}) {
        p.Nq = nq;
        p.kernel = 0;
        CHECK(v3_step_of(p) == (nq < 4096 ? 8 : 11));
        p.kernel = 3;
        CHECK(v3_step_of(p) == 3);
    }
    p.kernel = 0, p.Nq = 1000, p.causal = false;
    CHECK(v3_step_of(p) == 11);
    p.d = 128, p.causal = true;
    CHECK(v3_step_of(p) == 11);
    V3Config c;
    CHECK(one_line(v3_config(0, 64, &c)));
    CHECK(one_line(v3_config(12, 64, &c)));
    CHECK(one_line(v3_config(1, 96, &c)));
}

TEST_CASE("v3 tile order: every Q tile once, and a persistent causal grid gives every CTA an equal share") {
    // The work of a tile is the K/V tiles it visits; a CTA's share is the sum over its tiles (v3_kv_tiles).
    for (int Br : {128, 192})  // two consumer warpgroups, or three (step 9 at d = 64)
        for (int Bc : {64, 80, 128})  // K/V tiles at d = 256 (steps 1-10; step 11); at d = 64 and 128
            for (bool causal : {false, true})
                for (bool persistent : {false, true})
                    for (int N : {1, 77, 1000, 1024, 4096, 16384})
                        for (int heads : {1, 3, 16, 256})
                            for (int sms : {7, 132}) {
                                INFO("Br " << Br << " Bc " << Bc << " causal " << causal << " persistent " << persistent
                                           << " N " << N << " heads " << heads << " SMs " << sms);
                                const V3TileOrder order = v3_tile_order(N, Br, heads, persistent, causal);
                                const int ctas = order.ctas(sms);
                                const int turns = (order.positions + order.per_turn() - 1) / order.per_turn();
                                CHECK(ctas == (persistent ? std::min(sms, turns) : order.positions));
                                const V3Walk w = v3_walk(order, ctas, Br, N, N, Bc, causal);
                                REQUIRE(w.in_range);
                                const std::vector<long>& share = w.share;
                                // each tile exactly once
                                CHECK(std::count(w.seen.begin(), w.seen.end(), 1) == order.positions);
                                if (persistent && order.positions >= 16 * ctas) {  // many turns a CTA: shares even out
                                    const long most = *std::max_element(share.begin(), share.end());
                                    const double mean = double(std::accumulate(share.begin(), share.end(), 0L)) / ctas;
                                    CHECK(most <= 1.1 * mean);
                                }
                            }
    // Without the pairs, one causal tile a turn in last-first order: at N = 1024 (8 Q tiles) and 132 CTAs, CTA b
    // gets tiles b % 8 and (b + 4) % 8 of a head in turn, and the busiest CTA has about twice the least busy's work.
    const V3TileOrder single{8, 8 * 256, true, false};  // non-causal order: one tile a turn, taken last-first below
    std::vector<long> share(132, 0);
    for (int b = 0; b < 132; ++b)
        for (int pos = single.first(b); pos < single.positions; pos = single.next(pos, 132))
            share[size_t(b)] += v3_kv_tiles((8 - 1 - pos % 8) * 128, 128, 1024, 1024, 128, true).n_tiles;
    CHECK(*std::max_element(share.begin(), share.end()) >= 1.8 * *std::min_element(share.begin(), share.end()));
}

TEST_CASE("v3 refuses in one line what it has no kernel for, and its entry points never exit") {
    Problem p;
    p.d = 64, p.dtype = DType::fp16;
    for (int k = 0; k <= 11; ++k) {
        p.kernel = k;
        CHECK_MESSAGE(v3_unsupported(p).empty(), "step " << k);
    }
    std::vector<std::string> refusals;
    p.kernel = 12;
    refusals.push_back(v3_unsupported(p));
    p.kernel = -1;
    refusals.push_back(v3_unsupported(p));
    p.kernel = 1, p.dtype = DType::bf16;  // the steps before the final one are compiled for fp16 only
    refusals.push_back(v3_unsupported(p));
    p.kernel = 8;
    refusals.push_back(v3_unsupported(p));
    p.kernel = 0, p.dtype = DType::fp32;
    refusals.push_back(v3_unsupported(p));
    p.dtype = DType::fp16, p.d = 96;
    refusals.push_back(v3_unsupported(p));
    p.d = 64, p.B = 50000, p.H = 50000;  // 2.5e9 Q tiles
    refusals.push_back(v3_unsupported(p));
    for (const std::string& why : refusals) CHECK(one_line(why));
    p.B = 1000, p.H = 1000;  // over the 65535 heads a 2-D grid would allow: the grid is 1-D
    CHECK(v3_unsupported(p).empty());
    p.kernel = 11, p.dtype = DType::bf16, p.B = 1, p.H = 1;
    CHECK(v3_unsupported(p).empty());
    // Null pointers: a launch would fault, so the reason must come back before anything launches.
    p.d = 96;
    CHECK(v3_forward_launch(p, ForwardArgs{}).find("96") != std::string::npos);
    CHECK_THROWS_AS(v3_forward(p, ForwardArgs{}), std::invalid_argument);
    p.d = 64;
    if (!v3_gpu_unusable().empty()) {  // no Hopper GPU here: the reason, one line, nothing launched
        CHECK(one_line(v3_gpu_unusable()));
        CHECK(v3_forward_launch(p, ForwardArgs{}) == v3_gpu_unusable());
    }
}

// Step 8's exp2_poly (v3/exp2_poly.h) is __host__ __device__ and uses fmaf, so this runs the kernel's arithmetic.
TEST_CASE("v3 exp2_poly: within its stated relative error of exp2 everywhere the softmax calls it, 0 below -126") {
    const double bound = kExp2PolyMaxRelErr;
    CHECK(bound <= 0x1p-13);  // well below fp16's half-ulp 2^-11, the rounding of P that follows
    double worst = 0.0, worst_x = 0.0;
    long checked = 0;
    auto check = [&](float x) {
        const float got = exp2_poly(x);
        const double want = std::exp2(double(x));
        ++checked;
        if (x < -126.0f) {  // 2^x below the smallest normal float: 0 (this function's choice), never garbage
            REQUIRE_MESSAGE(got == 0.0f, "x = " << x << " gave " << got);
            REQUIRE_MESSAGE(!std::signbit(got), "x = " << x << " gave -0");
            return;
        }
        const double rel = std::fabs(double(got) / want - 1.0);
        if (rel > worst) worst = rel, worst_x = x;
        REQUIRE_MESSAGE(rel <= bound, "x = " << x << " gave " << got << ", 2^x = " << want << ", relative error " << rel);
    };
    for (int k = 0; k <= 131 * 8192; ++k) check(-130.0f + float(k) / 8192.0f);  // [-130, 1] in steps of 2^-13, exact
    for (int n = -130; n <= 1; ++n) {  // the integers and their float neighbours, where floor(x) changes
        check(std::nextafter(float(n), -INFINITY));
        check(std::nextafter(float(n), INFINITY));
        if (n >= -126) CHECK_MESSAGE(exp2_poly(float(n)) == std::ldexp(1.0f, n), "2^" << n << " is exact");
    }
    for (float tiny : {1e-30f, 1e-10f, 1e-7f, 0x1p-24f, std::numeric_limits<float>::denorm_min()}) {
        check(tiny);  // rounding of s * scale - m can leave x a little above 0
        check(-tiny);  // x - floor(x) = 1 - tiny rounds to 1: the fit covers f = 1
    }
    CHECK(exp2_poly(0.0f) == 1.0f);
    CHECK(exp2_poly(-0.0f) == 1.0f);
    for (float x : {-INFINITY, -1e30f, -1000.0f, -150.5f, -150.0f, -149.0f, -127.5f, -127.0f, -126.5f}) {
        CHECK_MESSAGE(exp2_poly(x) == 0.0f, "x = " << x);
        CHECK_MESSAGE(!std::signbit(exp2_poly(x)), "x = " << x);
    }
    CHECK(exp2_poly(-126.0f) == 0x1p-126f);  // the smallest normal float, exact
    MESSAGE("exp2_poly: max relative error " << worst << " (2^" << std::log2(worst) << ") at x = " << worst_x
                                             << " over " << checked << " inputs; stated bound " << bound);
    CHECK(worst > 0.5 * bound);  // the bound is the fit's, not a loose one
}

TEST_CASE("v3 stage: v2 below it, v2's CPU model as its model, which matches float64 in fp16 and bf16") {
    const Stage& s = v3_stage();
    CHECK(s.below == &v2_stage());
    CHECK(s.forward_steps.size() == v3_forward_steps().size());
    CHECK(!s.backward);
    for (DType t : {DType::fp16, DType::bf16})
        for (const Case& c : {make_case(113, 300, 128, true, Dist::normal, t), make_case(300, 113, 64, true, Dist::large, t)}) {
            const HostTensors in = make_inputs(c.p, c.dist, 41);
            Outputs got;
            ModelTraffic traffic;
            s.cpu_forward(c.p, in, &got.o, &got.lse, &traffic);
            check_against_reference("v3 CPU model " + c.name(), c.p, in, got);
        }
}

// ------------------------------------------------------------------------------------------------------- GPU

// Every step in fp16 (the final one in bf16 too) against float64 and against v2 on the same rounded inputs.
TEST_CASE("GPU v3 every step matches float64 and v2 over the shape matrix") {
    if (const std::string why = v3_gpu_unusable(); !why.empty()) {
        MESSAGE("v3 GPU tests not run: " << why);
        return;
    }
    const int steps = int(v3_forward_steps().size());
    for (DType t : {DType::fp16, DType::bf16})
        for (const Case& c : v3_cases(t)) {
            const HostTensors in = make_inputs(c.p, c.dist, 29);  // rounded to c.p.dtype
            const bool below = c.p.d <= 128;  // v2's fp32 kernel stops at d = 128: at 256 float64 is the yardstick
            const Outputs v2 = below ? v2_on(c.p, in) : Outputs{};
            for (int k = t == DType::fp16 ? 1 : steps; k <= steps; ++k) {
                Problem p = c.p;
                p.kernel = k;
                REQUIRE(v3_unsupported(p).empty());
                const Outputs got = v3_at_step(c.p, in, k);
                const std::string label = "v3 step " + std::to_string(k) + " " + v3_forward_steps()[k - 1].name + " ";
                check_against_reference(label + c.name(), p, in, got);
                if (below) check_against(label + "vs v2 " + c.name(), p, in, got, v2);
            }
        }
}

// The shape matrix has few Q tiles, so every CTA of step 7 gets one. Here 450 heads of 4 Q tiles give each CTA many,
// the first of every head's tiles sees no key at all (causal, Nq - Nk = 200 rows: O = 0 without a Q load), and step
// 7 must give step 6's bits: the same arithmetic per tile, whatever tiles a CTA walked before. Step 8 computes some
// exponentials differently, so its bits differ: it is checked against v2. Step 9 must give step 8's bits: at d = 64
// its Q tiles are 192 rows for three warpgroups, but each row's arithmetic, key tile by key tile, is the same (a key
// tile a row does not see adds exact zeros). Step 10 (the final step) keeps a stale max: checked against v2.
TEST_CASE("GPU v3 persistent step: many Q tiles a CTA, step 6's bits") {
    if (const std::string why = v3_gpu_unusable(); !why.empty()) {
        MESSAGE("v3 GPU tests not run: " << why);
        return;
    }
    for (DType t : {DType::fp16, DType::bf16})
        for (int d : {64, 128, 256})
            for (bool causal : {false, true}) {
                Case c = make_case(400, 200, d, causal, Dist::normal, t);
                c.p.B = 3, c.p.H = 150;
                const HostTensors in = make_inputs(c.p, c.dist, 7);
                std::vector<Outputs> outs;
                const Outputs f = v3_at_step(c.p, in, 0);
                if (d <= 128)  // v2's fp32 kernel stops at d = 128
                    check_against(c.name() + " final step vs v2", c.p, in, f, v2_on(c.p, in));
                else
                    check_against_reference(c.name() + " final step", c.p, in, f);
                outs.push_back(f);
                if (t == DType::fp16) {  // the steps before the final one are compiled for fp16 only
                    const Outputs a = v3_at_step(c.p, in, 7), b = v3_at_step(c.p, in, 6);
                    CHECK_MESSAGE(a.o == b.o, c.name());
                    CHECK_MESSAGE(a.lse == b.lse, c.name());
                    outs.push_back(a);
                    const Outputs e = v3_at_step(c.p, in, 8), g = v3_at_step(c.p, in, 9);
                    CHECK_MESSAGE(e.o == g.o, c.name() << ": step 8 vs 9");
                    CHECK_MESSAGE(e.lse == g.lse, c.name() << ": step 8 vs 9");
                }
                const size_t masked_rows = causal ? 200 : 0;  // rows 0..199 of every head see no key
                for (const Outputs& a : outs)
                    for (size_t bh = 0; bh < 450; ++bh)
                        for (size_t r = 0; r < masked_rows; ++r) REQUIRE(a.lse[bh * 400 + r] == -INFINITY);
            }
}

// Run twice, the same bits: a missing wgmma wait or barrier shows up as outputs that change from run to run.
TEST_CASE("GPU v3 every step gives the same bits on every run") {
    if (const std::string why = v3_gpu_unusable(); !why.empty()) {
        MESSAGE("v3 GPU tests not run: " << why);
        return;
    }
    const Case c = make_case(1000, 1000, 128, true, Dist::normal, DType::fp16);
    const HostTensors in = make_inputs(c.p, c.dist, 3);
    for (int k = 1; k <= int(v3_forward_steps().size()); ++k) {
        const Outputs a = v3_at_step(c.p, in, k), b = v3_at_step(c.p, in, k);
        CHECK_MESSAGE(a.o == b.o, "step " << k);
        CHECK_MESSAGE(a.lse == b.lse, "step " << k);
    }
}
