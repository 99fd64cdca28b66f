// inputs.cu: seeded random inputs. A tiny counter-based generator (splitmix64) and Box-Muller, so the same seed
// gives the same numbers on every platform and compiler (std::normal_distribution does not promise that).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <thread>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "harness.h"

const char* dist_name(Dist d) {
    switch (d) {
        case Dist::normal: return "normal";
        case Dist::large: return "large";
        case Dist::outliers: return "outliers";
        case Dist::constant: return "constant";
    }
    return "?";
}

bool parse_dist(const std::string& s, Dist* d) {
    for (Dist c : {Dist::normal, Dist::large, Dist::outliers, Dist::constant})
        if (s == dist_name(c)) {
            *d = c;
            return true;
        }
    return false;
}

float round_to(DType t, float x) {
    if (t == DType::fp16) return __half2float(__float2half_rn(x));
    if (t == DType::bf16) return __bfloat162float(__float2bfloat16_rn(x));
    return x;
}

void parallel_for(size_t n, const std::function<void(size_t)>& body) {
    const size_t workers = std::min<size_t>(std::max(1u, std::thread::hardware_concurrency()), n);
    std::vector<std::thread> pool;
    for (size_t w = 0; w < workers; ++w)
        pool.emplace_back([&, w] {
            for (size_t i = w; i < n; i += workers) body(i);
        });
    for (auto& t : pool) t.join();
}

namespace {

uint64_t splitmix64(uint64_t x) {
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

// Standard normal number `index` of stream `stream`: independent of how many numbers other streams drew.
float normal(uint64_t seed, uint64_t stream, uint64_t index) {
    uint64_t a = splitmix64(seed ^ splitmix64(stream * 0x100000001B3ull + 2 * index));
    uint64_t b = splitmix64(a + 1);
    double u1 = (double(a >> 11) + 1.0) * 0x1.0p-53;  // (0, 1]: log is finite
    double u2 = double(b >> 11) * 0x1.0p-53;
    return float(std::sqrt(-2.0 * std::log(u1)) * std::cos(2.0 * M_PI * u2));
}

// Fills a [B*heads, N, d] tensor from one stream of normals, then applies the distribution's row scaling.
std::vector<float> tensor(const Problem& p, int heads, int N, Dist dist, uint64_t seed, uint64_t stream, bool is_qk) {
    std::vector<float> t(size_t(p.B) * heads * N * p.d);
    parallel_for(t.size() / p.d, [&](size_t row) {
        float factor = 1.0f;
        if (dist == Dist::large && is_qk) factor = 10.0f;
        if (dist == Dist::outliers && (row % N) % 16 == 5) factor = 30.0f;
        for (int c = 0; c < p.d; ++c) {
            const size_t i = row * p.d + c;
            t[i] = round_to(p.dtype, normal(seed, stream, i) * factor);
        }
    });
    return t;
}

}  // namespace

HostTensors make_inputs(const Problem& p, Dist dist, uint64_t seed) {
    if (p.varlen()) {  // packed [T, H, d]: the values of one long sequence of T tokens, laid out the same way
        Problem flat = p;
        flat.seqlens_q.clear(), flat.seqlens_k.clear();
        flat.B = 1, flat.Nq = int(p.tokens_q()), flat.Nk = int(p.tokens_k());
        return make_inputs(flat, dist, seed);
    }
    HostTensors in;
    in.q = tensor(p, p.H, p.Nq, dist, seed, 1, true);
    in.k = tensor(p, p.kv_heads(), p.Nk, dist, seed, 2, true);
    in.v = tensor(p, p.kv_heads(), p.Nk, dist, seed, 3, false);
    in.dO = tensor(p, p.H, p.Nq, dist, seed, 4, false);
    if (dist == Dist::constant) {  // every key row of a head equal to that head's first key row
        for (size_t bh = 0; bh < size_t(p.B) * p.kv_heads(); ++bh)
            for (int j = 1; j < p.Nk; ++j)
                std::memcpy(&in.k[(bh * p.Nk + j) * p.d], &in.k[bh * p.Nk * p.d], p.d * sizeof(float));
    }
    if (p.has_bias()) {  // --bias: N(0, 1), in the inputs' type like them
        in.bias.resize(p.bias_elems());
        parallel_for(in.bias.size(), [&](size_t e) { in.bias[e] = round_to(p.dtype, normal(seed, 5, e)); });
    }
    return in;
}
