// test_v2_ext_bwd.cu: the extensions in v2's tensor-core backward (v2/backward_mma.cu): grouped-query attention,
// the sliding window, dropout, the bias and its gradient, ALiBi and packed batches, alone, combined and with
// --causal, fp16 and bf16, atomic and --deterministic dQ. The GPU forward is not used: O and LSE come from the
// float64 reference (O rounded to the dtype, as the tensor-core forward writes it), and v2_backward runs on device
// buffers of this file's own. The gradients are held to the same-precision rule of the other backward tests
// (check_grads_against_reference). On the CPU: the key band the kernels test (KeyBand) against visible_keys, and
// the refusals and workspace sizes.
#include <doctest/doctest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <stdexcept>

#include "cuda_check.h"
#include "test_support.h"
#include "v2/backward_mma.h"
#include "v2/v2.h"

namespace {

Problem small(int Nq, int Nk, int d) {
    Problem p;
    p.B = 2, p.H = 4, p.Nq = Nq, p.Nk = Nk, p.d = d;
    return p;
}

// A packed batch of these lengths (B: their number; Nq, Nk: the longest).
Problem packed(Problem p, std::vector<int> q_lengths, std::vector<int> k_lengths) {
    p.B = int(q_lengths.size());
    p.Nq = *std::max_element(q_lengths.begin(), q_lengths.end());
    p.Nk = *std::max_element(k_lengths.begin(), k_lengths.end());
    p.seqlens_q = std::move(q_lengths), p.seqlens_k = std::move(k_lengths);
    return p;
}

// {0, n_0, n_0 + n_1, ...} on the device: a packed batch's cu_seqlens.
DeviceBuffer cu_seqlens(const std::vector<int>& lengths) {
    std::vector<int> cu(lengths.size() + 1, 0);
    std::partial_sum(lengths.begin(), lengths.end(), cu.begin() + 1);
    DeviceBuffer dev(cu.size() * sizeof(int), "cu_seqlens");
    CUDA_CHECK(cudaMemcpy(dev.get(), cu.data(), dev.bytes(), cudaMemcpyHostToDevice));
    return dev;
}

// v2_backward on Q, K, V, dO (and the bias, the sequence lengths) of `in`, with O and LSE from the float64
// reference; dQ, dK, dV and dbias are poisoned with NaN first, so whatever the kernels leave unwritten shows.
HostGrads gpu_backward_from_reference(const Problem& p, const HostTensors& in) {
    const Reference fwd = reference_forward(p, in, {}, p.dtype);
    DeviceBuffer q = upload(in.q, p.dtype, "Q"), k = upload(in.k, p.dtype, "K"), v = upload(in.v, p.dtype, "V");
    DeviceBuffer dO = upload(in.dO, p.dtype, "dO");
    DeviceBuffer o = upload(std::vector<float>(fwd.o.begin(), fwd.o.end()), p.dtype, "O");
    DeviceBuffer lse = upload(std::vector<float>(fwd.lse.begin(), fwd.lse.end()), DType::fp32, "LSE");
    DeviceBuffer bias, dbias, cu_q, cu_k;
    if (p.has_bias()) {
        bias = upload(in.bias, DType::fp32, "bias");
        dbias = DeviceBuffer(p.bias_elems() * sizeof(float), "dbias");
        dbias.poison();
    }
    if (p.varlen()) cu_q = cu_seqlens(p.seqlens_q), cu_k = cu_seqlens(p.seqlens_k);
    const size_t bytes = dtype_bytes(p.dtype);
    DeviceBuffer dq(p.q_elems() * bytes, "dQ"), dk(p.kv_elems() * bytes, "dK"), dv(p.kv_elems() * bytes, "dV");
    DeviceBuffer ws(v2_backward_workspace_bytes(p), "workspace");
    dq.poison();
    dk.poison();
    dv.poison();
    BackwardArgs a{q.get(), k.get(), v.get(), o.get(), dO.get(), lse.f32(), dq.get(), dk.get(), dv.get(), ws.get()};
    a.bias = bias.f32(), a.dbias = dbias.f32();
    a.cu_seqlens_q = static_cast<const int*>(cu_q.get()), a.cu_seqlens_k = static_cast<const int*>(cu_k.get());
    v2_backward(p, a);
    CUDA_CHECK_LAUNCH();
    return {download(dq, p.q_elems(), p.dtype), download(dk, p.kv_elems(), p.dtype), download(dv, p.kv_elems(), p.dtype),
            download(dbias, p.bias_elems(), DType::fp32)};
}

std::string label_of(const std::string& name, const Problem& p) {
    return "v2 backward " + name + " " + dtype_name(p.dtype) + " d=" + std::to_string(p.d) + " Nq=" +
           std::to_string(p.Nq) + " Nk=" + std::to_string(p.Nk) + (p.causal ? " causal" : "") +
           (p.deterministic ? " deterministic" : " atomic dQ");
}

// Each problem in fp16 and bf16, at each head dim, with atomic and deterministic dQ, against float64.
void check_all(const std::string& name, const Problem& base, const std::vector<int>& head_dims, uint64_t seed) {
    for (DType t : {DType::fp16, DType::bf16})
        for (int d : head_dims)
            for (bool deterministic : {false, true}) {
                Problem p = base;
                p.dtype = t, p.d = d, p.deterministic = deterministic;
                const std::string label = label_of(name, p);
                INFO(label);
                REQUIRE(v2_backward_unsupported(p).empty());
                const HostTensors in = make_inputs(p, Dist::normal, seed);
                check_grads_against_reference(label, p, in, gpu_backward_from_reference(p, in));
            }
}

struct Named {
    std::string name;
    Problem p;
};

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
    return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

}  // namespace

// ---------------------------------------------------------------------------------------------------------- CPU

TEST_CASE("v2 backward key band: the keys it lets a row see are visible_keys', and its row and key ranges are exact") {
    for (int Nq : {1, 7, 40}) {
        for (int Nk : {1, 9, 40}) {
            for (bool causal : {false, true})
                for (int L : {-1, 0, 3, 100})
                    for (int R : {-1, 0, 2, 100}) {
                        Problem p = small(Nq, Nk, 64);
                        p.causal = causal, p.window_left = L, p.window_right = R;
                        const KeyBand band = key_band(p);
                        const int shift = Nk - Nq;
                        for (int i = 0; i < Nq; ++i) {
                            const KeyRange keys = visible_keys(p, i);
                            for (int j = 0; j < Nk; ++j)
                                CHECK_MESSAGE(band.sees(i, j, shift) == (j >= keys.begin && j < keys.end),
                                              "Nq=" << Nq << " Nk=" << Nk << " causal=" << causal << " window " << L
                                                    << "," << R << " row " << i << " key " << j);
                        }
                        // The rows that see some key of [key0, key_end), and the keys rows [row0, row_last] see:
                        // exactly those the brute force finds, once clamped.
                        for (int key0 = 0; key0 < Nk; key0 += 4) {
                            const int key_end = std::min(Nk, key0 + 4);
                            int first = Nq, last = -1;
                            for (int i = 0; i < Nq; ++i)
                                for (int j = key0; j < key_end; ++j)
                                    if (band.sees(i, j, shift)) first = std::min(first, i), last = std::max(last, i);
                            const int lo = std::max(0, band.first_row(key0, shift));
                            const int hi = std::min(Nq - 1, band.last_row(key_end, shift));
                            if (last < 0) CHECK(hi < lo);
                            else CHECK((lo == first && hi == last));
                        }
                        for (int row0 = 0; row0 < Nq; row0 += 4) {
                            const int row_last = std::min(Nq, row0 + 4) - 1;
                            int first = Nk, last = -1;
                            for (int i = row0; i <= row_last; ++i)
                                for (int j = 0; j < Nk; ++j)
                                    if (band.sees(i, j, shift)) first = std::min(first, j), last = std::max(last, j);
                            const int lo = std::max(0, band.first_key(row0, shift));
                            const int hi = std::min(Nk - 1, band.last_key(row_last, shift));
                            if (last < 0) CHECK(hi < lo);
                            else CHECK((lo == first && hi == last));
                        }
                    }
        }
    }
    Problem p = small(8, 8, 64);
    p.window_left = std::numeric_limits<int>::max();  // a window wider than any sequence: unbounded, no overflow
    CHECK(key_band(p).left == KeyBand::kUnbounded);
}

TEST_CASE("v2 backward with the extensions: fp16/bf16 final kernel only, pointers checked before any launch") {
    Problem p = small(64, 64, 64);
    p.dtype = DType::fp16, p.window_left = 8, p.dropout = 0.1f, p.Hk = 2, p.alibi = true;
    CHECK(v2_backward_unsupported(p).empty());
    p.kernel = 1;
    CHECK(v2_backward_unsupported(p).find("final kernel") != std::string::npos);
    p.kernel = int(v2_backward_steps().size());  // the final step by number
    CHECK(v2_backward_unsupported(p).empty());
    p.kernel = 0, p.dtype = DType::fp32;
    // fp32: its CPU model has the extensions (so the stage accepts the problem), its GPU kernel refuses them
    CHECK_THROWS_WITH_AS(v2_backward(p, BackwardArgs{}), doctest::Contains("v2 fp32 (CUDA cores) does not have"),
                         std::invalid_argument);
    p.dtype = DType::bf16, p.bias_batch = 1, p.bias_heads = p.H;
    // every pointer null: the reason comes back before anything launches (no GPU needed)
    CHECK(v2_backward_mma(p, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr,
                          nullptr, nullptr, nullptr, nullptr).find("bias and dbias") != std::string::npos);
    CHECK_THROWS_WITH_AS(v2_backward(p, BackwardArgs{}), doctest::Contains("bias and dbias"), std::invalid_argument);
    Problem q = packed(small(1, 1, 64), {3, 5}, {4, 4});
    q.dtype = DType::fp16;
    CHECK(v2_backward_mma(q, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr,
                          nullptr, nullptr, nullptr, nullptr).find("cu_seqlens_q") != std::string::npos);
    q.bias_batch = 1, q.bias_heads = 1;
    CHECK(v2_backward_unsupported(q).find("--seqlens with --bias") != std::string::npos);
}

// Which dk_dv kernel runs is part of the contract (docs/extensions.md, "Backward"): a problem that the default
// kernel's code serves must not fall back to the general per-element kernel (about 2x slower), and one it cannot
// serve must not run it.
TEST_CASE("v2 backward runs the least general dk_dv kernel: default (GQA alone: + group sum), layout (packed, window) or all") {
    Problem p = small(100, 90, 64);
    p.dtype = DType::fp16;
    auto kernel = [](Problem q, auto&& change) {
        change(q);
        return v2_backward_mma_kernel(q);
    };
    CHECK(kernel(p, [](Problem&) {}) == "default");
    CHECK(kernel(p, [](Problem& q) { q.causal = true, q.deterministic = true; }) == "default");
    CHECK(kernel(p, [](Problem& q) { q.dropout = 0.1f; }) == "default + dropout");
    CHECK(kernel(p, [](Problem& q) { q.dropout = 0.1f, q.deterministic = true; }) == "all");
    // grouped-query heads alone: the copies and the group sum where they pay (causal, or Nq >= 2048 / 8192 at
    // d = 64 / 128), else the group walk
    CHECK(kernel(p, [](Problem& q) { q.Hk = 2; }) == "layout");
    CHECK(kernel(p, [](Problem& q) { q.Hk = 2, q.causal = true; }) == "default + group sum");
    CHECK(kernel(p, [](Problem& q) { q.Hk = 2, q.Nq = 2048; }) == "default + group sum");
    CHECK(kernel(p, [](Problem& q) { q.Hk = 1, q.Nq = 4096, q.d = 128; }) == "layout");
    CHECK(kernel(p, [](Problem& q) { q.Hk = 1, q.Nq = 8192, q.d = 128; }) == "default + group sum");
    CHECK(kernel(p, [](Problem& q) { q.Hk = 1, q.causal = true, q.d = 128; }) == "default + group sum");
    CHECK(kernel(p, [](Problem& q) { q.Hk = 1, q.causal = true, q.deterministic = true; }) == "layout");
    CHECK(kernel(p, [](Problem& q) { q.Hk = 2, q.dropout = 0.2f; }) == "layout + dropout");
    CHECK(kernel(p, [](Problem& q) { q.Hk = 2, q.dropout = 0.2f, q.causal = true; }) == "default + dropout + group sum");
    CHECK(kernel(p, [](Problem& q) { q.Hk = 2, q.causal = true, q.deterministic = true; }) == "layout");
    CHECK(kernel(p, [](Problem& q) { q.Hk = 2, q.window_left = 16; }) == "layout");
    CHECK(kernel(p, [](Problem& q) { q.window_left = 16, q.window_right = 0; }) == "layout");
    CHECK(kernel(packed(p, {10, 1, 70}, {5, 90, 1}), [](Problem& q) { q.d = 128, q.dtype = DType::bf16; }) == "layout");
    CHECK(kernel(p, [](Problem& q) { q.Hk = 2, q.d = 40; }) == "all");
    CHECK(kernel(p, [](Problem& q) { q.Hk = 2, q.d = 256; }) == "all");
    CHECK(kernel(p, [](Problem& q) { q.dropout = 0.1f, q.d = 96; }) == "all");
    CHECK(kernel(p, [](Problem& q) { q.Hk = 2, q.alibi = true; }) == "all");
    CHECK(kernel(p, [](Problem& q) { q.bias_batch = 1, q.bias_heads = 1; }) == "all");
    CHECK(kernel(p, [](Problem& q) { q.kernel = 2; }) == "step 2");
}

TEST_CASE("v2 backward workspace with the extensions: packed rows per sequence, per-head dS for a shared bias under --deterministic, per-head K, V, dK, dV for GQA") {
    Problem p = small(100, 100, 64);
    p.dtype = DType::fp16, p.deterministic = true;
    const size_t plain = v2_backward_workspace_bytes(p);
    CHECK(plain == size_t(p.B) * p.H * 128 * 2 * sizeof(float));  // Br = 128 at d = 64
    p.bias_batch = p.B, p.bias_heads = p.H;  // nothing shared: dS goes straight to dbias
    CHECK(v2_backward_workspace_bytes(p) == plain);
    p.bias_batch = 1;  // shared by the batch: each head's dS kept for the fixed-order sum
    CHECK(v2_backward_workspace_bytes(p) == plain + size_t(p.B) * p.H * p.Nq * p.Nk * sizeof(float));
    p.deterministic = false;  // atomics add into dbias directly
    CHECK(v2_backward_workspace_bytes(p) == size_t(p.B) * p.H * 128 * (2 + 64) * sizeof(float));
    p.bias_batch = p.bias_heads = 0, p.Hk = 2;  // grouped-query heads alone, non-causal and short: the group walk
    CHECK(v2_backward_workspace_bytes(p) == size_t(p.B) * p.H * 128 * (2 + 64) * sizeof(float));
    p.causal = true;  // the copies and the group sum: each query head's K, V, dK, dV, of fp16
    CHECK(v2_backward_workspace_bytes(p) == size_t(p.B) * p.H * 128 * (2 + 64) * sizeof(float) + 4 * size_t(p.B) * p.H * p.Nk * p.d * 2);
    Problem q = packed(small(1, 1, 64), {1, 200, 7}, {5, 5, 5});  // 208 tokens: per head (2 + 3) blocks of 128 rows
    q.dtype = DType::bf16, q.deterministic = true;
    CHECK(v2_backward_workspace_bytes(q) == size_t(q.H) * (2 + 3) * 128 * 2 * sizeof(float));
}

// ---------------------------------------------------------------------------------------------------------- GPU

TEST_CASE("GPU v2 extensions backward: each feature alone matches float64 (fp16, bf16; d = 64, 128, 40; both dQ modes)") {
    std::vector<Named> features;
    auto add = [&](const std::string& name, Problem p) { features.push_back({name, p}); };
    Problem p = small(77, 130, 64);  // N not a tile multiple, Nq != Nk
    p.Hk = 2, add("grouped-query (H=4, Hk=2)", p);
    p.Hk = 1, add("multi-query (Hk=1)", p);
    p = small(77, 130, 64);
    p.window_left = 20, p.window_right = 5, add("window 20,5", p);
    p.window_left = -1, p.window_right = 3, add("window -1,3", p);
    p.window_left = 7, p.window_right = -1, add("window 7,-1", p);
    p = small(200, 60, 64);  // rows 0..139 see no key: window 0,0 in the bottom-right frame, and causal
    p.window_left = 0, p.window_right = 0, add("window 0,0 with rows that see nothing", p);
    p = small(77, 130, 64);
    p.dropout = 0.2f, p.dropout_seed = 9, add("dropout 0.2", p);
    p = small(77, 130, 64);
    p.bias_batch = p.B, p.bias_heads = p.H, add("bias [B, H]", p);
    p.bias_batch = 1, add("bias [1, H]", p);
    p.bias_batch = p.B, p.bias_heads = 1, add("bias [B, 1]", p);
    p.bias_batch = 1, add("bias [1, 1]", p);
    p = small(77, 130, 64);
    p.alibi = true, add("alibi", p);
    add("packed (1, 100, 37) x (50, 1, 130)", packed(small(1, 1, 64), {1, 100, 37}, {50, 1, 130}));
    add("packed equal lengths", packed(small(1, 1, 64), {70, 70}, {70, 70}));
    for (const Named& f : features) check_all(f.name, f.p, {64, 128, 40}, 3);
}

TEST_CASE("GPU v2 extensions backward: combinations, with --causal, lengths of 1 and fully masked rows, match float64") {
    std::vector<Named> combos;
    auto add = [&](const std::string& name, Problem p) { combos.push_back({name, p}); };
    Problem p = small(150, 300, 64);
    p.Hk = 2, p.window_left = 40, p.window_right = 10, p.causal = true, add("GQA + window + causal", p);
    p = small(130, 77, 64);
    p.dropout = 0.3f, p.dropout_seed = 5, p.bias_batch = 1, p.bias_heads = p.H, add("dropout + bias [1, H]", p);
    p = small(130, 77, 64);  // causal with Nq > Nk: rows 0..52 see no key
    p.alibi = true, p.causal = true, add("alibi + causal, rows that see nothing", p);
    // Grouped-query heads with dropout and causal: at d = 64 and 128 with atomic dQ the default kernel with kDropout, a
    // block row per query head (each keys its own mask), and the group sum (as "multi-query + causal" without dropout).
    p = small(200, 90, 64);
    p.Hk = 2, p.dropout = 0.2f, p.dropout_seed = 13, p.causal = true, add("GQA + dropout + causal, rows that see nothing", p);
    p = small(77, 300, 64);
    p.Hk = 1, p.causal = true, add("multi-query + causal", p);
    p = small(1, 1, 64);
    p.causal = true;
    add("GQA + causal + packed (1, 130, 64) x (1, 200, 20)", [&] {
        Problem q = packed(p, {1, 130, 64}, {1, 200, 20});
        q.Hk = 1;
        return q;
    }());
    add("packed + window + dropout", [&] {
        Problem q = packed(small(1, 1, 64), {90, 1, 140}, {150, 33, 140});
        q.window_left = 16, q.window_right = 8, q.dropout = 0.25f, q.dropout_seed = 11;
        return q;
    }());
    p = small(1, 1, 64);
    p.Hk = 2, p.dropout = 0.5f, p.bias_batch = p.B, p.bias_heads = 1, p.alibi = true;
    add("every feature at Nq = Nk = 1", p);
    p.Nk = 300, p.window_left = 50, p.window_right = 50, add("every feature at Nq = 1, Nk = 300", p);
    for (const Named& c : combos) check_all(c.name, c.p, {64, 128, 40}, 7);
}

TEST_CASE("GPU v2 extensions backward: --deterministic gives the same bits on every run (dbias included)") {
    Problem p = small(190, 260, 64);
    p.dtype = DType::bf16, p.deterministic = true, p.Hk = 2, p.causal = true, p.window_left = 100, p.window_right = 4;
    p.dropout = 0.1f, p.bias_batch = 1, p.bias_heads = 1, p.alibi = true;
    for (const Problem& run : {p, packed(p, {190, 3, 77}, {250, 260, 1})}) {
        Problem q = run;
        if (q.varlen()) q.bias_batch = q.bias_heads = 0;  // a packed batch has no bias
        const HostTensors in = make_inputs(q, Dist::normal, 5);
        const HostGrads first = gpu_backward_from_reference(q, in);
        check_grads_against_reference(label_of("deterministic combination", q), q, in, first);
        for (int again = 0; again < 3; ++again) {
            const HostGrads g = gpu_backward_from_reference(q, in);
            CHECK(same_bits(g.dq, first.dq));
            CHECK(same_bits(g.dk, first.dk));
            CHECK(same_bits(g.dv, first.dv));
            CHECK(same_bits(g.dbias, first.dbias));
        }
    }
}

// A window's backward must skip the tiles outside the band, not visit them and mask every element: a visited tile
// of NaN rows makes dK_j, dV_j NaN (0 * NaN in the products), so poisoned rows far from the checked ones catch it.
// (a) Q and dO rows 512..639 poisoned (so O and LSE too): catches dk_dv walking every Q tile. (b) K and V rows
// 512..639 poisoned (the rows that see them get NaN O and LSE): catches the dq kernel walking every K/V tile. NaN
// also spreads legitimately, through whole tiles the band does reach (a masked element's dS is 0 * NaN), so only
// the rows and keys two tiles of 128 and a band away (< 256, >= 896) are checked against float64.
TEST_CASE("GPU v2 extensions backward: a window skips the tiles outside the band (NaN rows out of reach change nothing)") {
    Problem p = small(1024, 1024, 64);
    p.B = 1, p.H = 2, p.dtype = DType::fp16, p.window_left = 32, p.window_right = 32;
    std::vector<size_t> far_rows, far_keys;
    for (size_t bh = 0; bh < size_t(p.B) * p.H; ++bh)
        for (size_t i = 0; i < size_t(p.Nq); ++i)
            if (i < 256 || i >= 896) far_rows.push_back(bh * p.Nq + i), far_keys.push_back(bh * p.Nk + i);
    for (bool poison_keys : {false, true})
        for (bool deterministic : {false, true}) {
            p.deterministic = deterministic;
            HostTensors in = make_inputs(p, Dist::normal, 8);
            for (size_t bh = 0; bh < size_t(p.B) * p.H; ++bh)
                for (size_t i = 512; i < 640; ++i)
                    for (int c = 0; c < p.d; ++c)
                        for (std::vector<float>* t : poison_keys ? std::vector{&in.k, &in.v} : std::vector{&in.q, &in.dO})
                            (*t)[(bh * p.Nq + i) * p.d + c] = std::numeric_limits<float>::quiet_NaN();
            const HostGrads g = gpu_backward_from_reference(p, in);
            const ReferenceGrads ref = reference_backward(p, in), same = reference_backward(p, in, p.dtype);
            const std::string label = std::string(poison_keys ? "K, V" : "Q, dO") + " rows 512..639 NaN, " +
                                      (deterministic ? "deterministic" : "atomic dQ");
            const Comparison dq = compare("dQ", g.dq.data(), ref.dq.data(), o_layout(p),
                                          low_precision_tolerance(p.dtype, max_abs_error(same.dq, ref.dq, far_rows, p.d)),
                                          far_rows);
            CHECK_MESSAGE(dq.ok, label << ": " << dq.report);
            for (auto [what, got, want, lp] : {std::tuple{"dK", &g.dk, &ref.dk, &same.dk}, std::tuple{"dV", &g.dv, &ref.dv, &same.dv}}) {
                const Comparison c = compare(what, got->data(), want->data(), kv_layout(p),
                                             low_precision_tolerance(p.dtype, max_abs_error(*lp, *want, far_keys, p.d)),
                                             far_keys);
                CHECK_MESSAGE(c.ok, label << ": " << c.report);
            }
        }
}
