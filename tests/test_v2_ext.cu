// test_v2_ext.cu: the extensions in v2's tensor-core forward (v2/forward_mma.cu, kExt): grouped-query attention,
// the sliding window, dropout, the bias, ALiBi and packed batches, alone and combined, with and without the causal
// mask, in fp16 and bf16, against the float64 reference with the same-precision rule (compare_forward). Plus the
// checks that catch shortcuts: K/V tiles left of every band are never read (NaN there changes nothing), the GPU's
// dropout mask is the reference's weight for weight, and the kernel with extensions gives the plain kernel's bits
// where they compute the same thing. The host side (refusals, cu_seqlens) is tested without a GPU.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <stdexcept>

#include "common/philox.cuh"
#include "test_support.h"
#include "v2/forward_mma.h"
#include "v2/v2.h"

namespace {

Problem problem(DType t, int Nq, int Nk, int d) {
    Problem p;
    p.B = 2, p.H = 6, p.Nq = Nq, p.Nk = Nk, p.d = d, p.dtype = t;
    return p;
}

// A packed batch of three sequences, one of length 1 on each side and one longer than a Q tile (Br = 128).
void pack(Problem* p) {
    p->seqlens_q = {1, 150, 77}, p->seqlens_k = {40, 1, 200};
    p->B = 3, p->Nq = 150, p->Nk = 200;
}

struct Setting {
    const char* name;
    std::function<void(Problem*)> set;
};

// Each feature alone, then the combinations; the causal mask enters through the combinations.
const std::vector<Setting>& settings() {
    static const std::vector<Setting> all = {
        {"gqa", [](Problem* p) { p->Hk = 2; }},
        {"mqa causal", [](Problem* p) { p->Hk = 1, p->causal = true; }},
        {"window 20,5", [](Problem* p) { p->window_left = 20, p->window_right = 5; }},
        {"window 0,0", [](Problem* p) { p->window_left = 0, p->window_right = 0; }},
        {"window -1,30", [](Problem* p) { p->window_left = -1, p->window_right = 30; }},
        {"dropout 0.2", [](Problem* p) { p->dropout = 0.2f, p->dropout_seed = 77; }},
        {"bias [1, H]", [](Problem* p) { p->bias_batch = 1, p->bias_heads = p->H; }},
        {"bias [B, 1]", [](Problem* p) { p->bias_batch = p->B, p->bias_heads = 1; }},
        {"alibi", [](Problem* p) { p->alibi = true; }},
        {"varlen", pack},
        {"gqa window causal", [](Problem* p) {
             p->Hk = 3, p->window_left = 40, p->window_right = 3, p->causal = true;
         }},
        {"dropout bias [B, H]", [](Problem* p) { p->dropout = 0.5f, p->bias_batch = p->B, p->bias_heads = p->H; }},
        {"alibi causal", [](Problem* p) { p->alibi = true, p->causal = true; }},
        {"varlen causal gqa", [](Problem* p) { pack(p), p->causal = true, p->Hk = 2; }},
        {"varlen window dropout", [](Problem* p) {
             pack(p), p->window_left = 9, p->window_right = 30, p->dropout = 0.3f;
         }},
        {"varlen alibi causal mqa", [](Problem* p) { pack(p), p->alibi = true, p->causal = true, p->Hk = 1; }},
        {"everything but varlen", [](Problem* p) {
             p->Hk = 2, p->window_left = 70, p->window_right = 10, p->causal = true, p->dropout = 0.1f;
             p->bias_batch = 1, p->bias_heads = 1, p->alibi = true;
         }},
    };
    return all;
}

std::string describe(const char* setting, const Problem& p) {
    return std::string(setting) + " " + dtype_name(p.dtype) + " Nq=" + std::to_string(p.Nq) + " Nk=" +
           std::to_string(p.Nk) + " d=" + std::to_string(p.d);
}

Outputs run_gpu(const Problem& p, const HostTensors& in) {
    REQUIRE_MESSAGE(v2_unsupported(p).empty(), v2_unsupported(p));
    return gpu_forward(p, in, v2_forward, v2_workspace_bytes);
}

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
    return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

}  // namespace

// --------------------------------------------------------------------------------------------------- host side

TEST_CASE("cu_seqlens: a packed batch's first tokens, as FlashAttention's interface takes them") {
    CHECK(cu_seqlens({3, 1, 5}) == std::vector<int>{0, 3, 4, 9});
    CHECK(cu_seqlens({}) == std::vector<int>{0});
}

TEST_CASE("dropout_keep: one generator call decides sixteen consecutive keys, byte k of it key 16 c + k") {
    for (float p : {0.1f, 0.5f, 0.9f})
        for (int j = 0; j < 64; ++j) {
            // the counter of the strip (j / 16, row 17, head 4), keyed by the seed
            const uint64_t seed = 0x123456789ull;
            const Philox4 r = philox4x32(Philox4{{uint32_t(j / 16), 17u, 4u, 0u}}, dropout_keys(seed));
            const uint32_t byte = r.x[j % 16 / 4] >> (8 * (j % 4)) & 0xFFu;
            CHECK(dropout_keep(seed, 4, 17, j, p) == (byte >= dropout_threshold(p)));
        }
}

TEST_CASE("bytes_at_least compares the four bytes at once as four separate comparisons do") {
    uint32_t x = 12345u;
    auto next = [&x] { return x = x * 1664525u + 1013904223u; };  // a cheap generator of test words
    for (int n = 0; n < 20000; ++n) {
        const uint32_t a = next(), b = n % 2 ? next() : (n / 2 % 256) * 0x01010101u;  // random, or a threshold
        uint32_t want = 0;
        for (int k = 0; k < 4; ++k) want |= uint32_t((a >> (8 * k) & 0xFFu) >= (b >> (8 * k) & 0xFFu)) << (8 * k + 7);
        REQUIRE_MESSAGE(bytes_at_least(a, b) == want, "a " << a << ", b " << b);
    }
    for (uint32_t v = 0; v < 256; ++v)  // every byte value against every threshold, in each of the four bytes
        for (uint32_t t = 0; t < 256; ++t)
            for (int k = 0; k < 4; ++k)
                REQUIRE(bool(bytes_at_least(v << (8 * k), t * 0x01010101u) >> (8 * k + 7) & 1) == (v >= t));
}

TEST_CASE("dropout runs p rounded to a multiple of 1/256 and scales the kept weights by 1 / (1 - that)") {
    CHECK(dropout_threshold(0.0f) == 0);
    CHECK(dropout_threshold(0x1p-30f) == 0);  // keeps everything: the scale is then exactly 1
    CHECK(dropout_scale(0x1p-30f) == 1.0);
    CHECK(dropout_threshold(0.1f) == 26);     // 25.6
    CHECK(dropout_scale(0.1f) == 256.0 / 230.0);
    CHECK(dropout_threshold(0.5f) == 128);
    CHECK(dropout_threshold(0.998f) == 255);  // 255.49: the largest p that runs
    CHECK(dropout_runs(0.998f));
    CHECK(dropout_threshold(0.9981f) == 256);  // refused by the command line (tests/cli_test.sh) and v2's entry points
    CHECK(!dropout_runs(0.9981f));
    CHECK(!dropout_runs(-0.1f));
}

TEST_CASE("v2 tensor-core forward takes the extensions in its final kernel only; missing device inputs are refused") {
    Problem p = problem(DType::fp16, 64, 64, 64);
    p.window_left = 8, p.window_right = 0;
    CHECK(v2_unsupported(p).empty());
    p.kernel = 2;  // an earlier step
    CHECK(v2_unsupported(p).find("final kernel") != std::string::npos);
    p.kernel = 0;
    p.bias_batch = 1, p.bias_heads = 1;  // no bias pointer: refused before any launch
    CHECK(v2_forward_mma(p, ForwardArgs{}).find("ForwardArgs::bias") != std::string::npos);
    p.bias_heads = p.bias_batch = 0;
    pack(&p);
    CHECK(v2_forward_mma(p, ForwardArgs{}).find("cu_seqlens") != std::string::npos);
    p.bias_batch = 1, p.bias_heads = 1;  // a packed batch with a bias: refused, as on the command line
    CHECK(v2_unsupported(p).find("--bias") != std::string::npos);
    Problem f = problem(DType::fp32, 64, 64, 64);  // fp32: CUDA cores, no extensions
    f.alibi = true;
    CHECK_THROWS_WITH_AS(v2_forward(f, ForwardArgs{}), doctest::Contains("fp32"), std::invalid_argument);
}

// ---------------------------------------------------------------------------------------------------------- GPU

TEST_CASE("GPU v2 ext: each extension alone and combined, fp16 and bf16, d = 64, 128, 40, 56, odd shapes, vs float64") {
    for (DType t : {DType::fp16, DType::bf16})
        for (int d : {64, 128, 40, 56})
            for (const Setting& s : settings())
                for (auto [Nq, Nk] : {std::pair{1, 1}, {77, 130}, {150, 70}, {200, 200}}) {
                    Problem p = problem(t, Nq, Nk, d);
                    s.set(&p);  // a packed batch sets its own lengths: once is enough
                    if (p.varlen() && Nq != 1) continue;
                    const HostTensors in = make_inputs(p, Dist::normal, 41);
                    check_against_reference(describe(s.name, p), p, in, run_gpu(p, in));
                }
}

TEST_CASE("GPU v2 ext: fully masked rows give O = 0 and LSE = -inf; large logits with a bias and ALiBi") {
    for (DType t : {DType::fp16, DType::bf16}) {
        Problem p = problem(t, 300, 70, 64);  // rows 0..229 sit left of key 0: causal, they see nothing
        p.causal = true, p.Hk = 3, p.dropout = 0.1f;
        HostTensors in = make_inputs(p, Dist::normal, 5);
        Outputs got = run_gpu(p, in);
        check_against_reference(describe("causal gqa dropout, Nq > Nk", p), p, in, got);
        CHECK(got.lse[0] == -INFINITY);
        CHECK(got.o[0] == 0.0f);
        p = problem(t, 300, 60, 128);  // window (0, 0): rows 0..239 sit left of key 0 and see nothing, the rest one key
        p.window_left = 0, p.window_right = 0;
        in = make_inputs(p, Dist::normal, 5);
        got = run_gpu(p, in);
        check_against_reference(describe("window 0,0, Nq > Nk", p), p, in, got);
        CHECK(got.lse[239] == -INFINITY);
        CHECK(got.lse[240] != -INFINITY);
        p = problem(t, 113, 300, 64);
        p.bias_batch = 1, p.bias_heads = p.H, p.alibi = true, p.causal = true;
        in = make_inputs(p, Dist::large, 5);
        check_against_reference(describe("large logits, bias, alibi, causal", p), p, in, run_gpu(p, in));
    }
}

TEST_CASE("GPU v2 ext: K/V tiles left of every Q tile's band are never read (NaN there changes nothing)") {
    for (int d : {64, 128}) {
        Problem p = problem(DType::fp16, 300, 3000, d);  // row i sits at key i + 2700: keys 2680 .. 3019 are seen
        p.window_left = 20, p.window_right = 20, p.Hk = 3;
        HostTensors in = make_inputs(p, Dist::normal, 8);
        // Keys below the band of row 0, rounded down to a multiple of 256 (so to a whole K/V tile for any Bc that
        // divides 256), become NaN in K and V. A kernel that loads such a tile, even masked, turns P V into NaN.
        const int poisoned = visible_keys(p, 0).begin / 256 * 256;
        REQUIRE(poisoned > 2000);
        for (size_t bkv = 0; bkv < size_t(p.B) * p.kv_heads(); ++bkv)
            for (int j = 0; j < poisoned; ++j)
                for (int c = 0; c < d; ++c)
                    in.k[(bkv * p.Nk + j) * d + c] = in.v[(bkv * p.Nk + j) * d + c] = NAN;
        check_against_reference(describe("window 20,20 over poisoned keys", p), p, in, run_gpu(p, in));
    }
}

TEST_CASE("GPU v2 ext: the dropout mask is the reference's, weight for weight, in every head and tile") {
    // Q = 0 makes every score 0, so P is uniform, 1 / Nk; with V the identity (Nk = d), O_ij = Z_ij / Nk shows the
    // mask.
    for (DType t : {DType::fp16, DType::bf16}) {
        Problem p = problem(t, 200, 128, 128);
        p.B = 2, p.H = 3, p.dropout = 0.3f, p.dropout_seed = 12345;
        HostTensors in = make_inputs(p, Dist::normal, 3);
        std::fill(in.q.begin(), in.q.end(), 0.0f);
        for (size_t bh = 0; bh < size_t(p.B) * p.H; ++bh)
            for (int j = 0; j < p.Nk; ++j)
                for (int c = 0; c < p.d; ++c) in.v[(bh * p.Nk + j) * p.d + c] = j == c ? 1.0f : 0.0f;
        const Outputs got = run_gpu(p, in);
        const float kept_value = float(dropout_scale(p.dropout)) / p.Nk;  // O's values are checked below
        size_t wrong = 0, kept = 0;
        for (size_t bh = 0; bh < size_t(p.B) * p.H; ++bh)
            for (int i = 0; i < p.Nq; ++i)
                for (int j = 0; j < p.Nk; ++j) {
                    const bool want = dropout_keep(p.dropout_seed, uint32_t(bh), i, j, p.dropout);
                    wrong += (got.o[(bh * p.Nq + i) * p.d + j] > 0.5f * kept_value) != want;
                    kept += want;
                }
        CHECK_MESSAGE(wrong == 0, dtype_name(t) << ": " << wrong << " weights differ from the reference's mask");
        const double n = double(p.B) * p.H * p.Nq * p.Nk;
        const double keep = 1.0 - dropout_threshold(p.dropout) / 256.0;  // p = 0.3 runs as 77/256
        CHECK(std::fabs(kept / n - keep) < 6 * std::sqrt(keep * (1.0 - keep) / n));  // the mask keeps about that
        check_against_reference(describe("dropout mask", p), p, in, got);
    }
}

TEST_CASE("GPU v2 ext: where the extensions change nothing, the kernel with them gives the plain kernel's bits") {
    for (DType t : {DType::fp16, DType::bf16})
        for (int d : {64, 40})
            for (bool causal : {false, true}) {
                Problem plain = problem(t, 333, 290, d);
                plain.causal = causal;
                const HostTensors in = make_inputs(plain, Dist::normal, 17);
                const Outputs want = run_gpu(plain, in);
                // A window wider than the keys, or (causal) the window (-1, 0), which is the causal mask.
                Problem band = plain;
                band.causal = false, band.window_left = causal ? -1 : 1000, band.window_right = causal ? 0 : 1000;
                REQUIRE(band.has_extensions());
                Outputs got = run_gpu(band, in);
                CHECK_MESSAGE(same_bits(got.o, want.o), describe(causal ? "window -1,0" : "window 1000,1000", band));
                CHECK(same_bits(got.lse, want.lse));
                // Dropout with p = 2^-30 runs as 0/256: every weight kept, scaled by 256 / 256: the dropout path,
                // mask drawn and applied, changes no bit.
                Problem tiny = band;
                tiny.dropout = 0x1p-30f;
                for (size_t bh = 0; bh < size_t(tiny.B) * tiny.H; ++bh)
                    for (int i = 0; i < tiny.Nq; ++i)
                        for (int j = 0; j < tiny.Nk; ++j)
                            REQUIRE(dropout_keep(tiny.dropout_seed, uint32_t(bh), i, j, tiny.dropout));
                got = run_gpu(tiny, in);
                CHECK_MESSAGE(same_bits(got.o, want.o), describe("dropout 2^-30", tiny));
                // Dropout alone: at d = 64 the plain kernel with dropout's mask (Problem::dropout_alone), at d = 40
                // the extension kernel; either way no bit changes.
                Problem alone = plain;
                alone.dropout = 0x1p-30f;
                REQUIRE(alone.dropout_alone());
                got = run_gpu(alone, in);
                CHECK_MESSAGE(same_bits(got.o, want.o), describe("dropout 2^-30 alone", alone));
                CHECK(same_bits(got.lse, want.lse));
            }
}
