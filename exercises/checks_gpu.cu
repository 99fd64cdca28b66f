// checks_gpu.cu: the checks of the exercises done in a kernel (they need a GPU of sm_80 or newer). Each runs the
// marked kernel through its stage's entry point on small awkward problems and compares with float64; causal tile
// skipping is checked by what a skipped tile may not touch: V rows no query of a Q tile may see are NaN, so a visit,
// even a fully masked one, makes that tile's outputs NaN (0 * NaN).
#include <cmath>
#include <cstdio>
#include <random>

#include "exercises/checks.h"
#include "naive/naive.h"
#include "naive/rows.cuh"
#include "online_softmax/online_softmax.h"
#include "v1/v1.h"
#include "v2/v2.h"

namespace {

ForwardRun gpu_run(const ForwardFn& forward, const WorkspaceFn& workspace) {
    return [forward, workspace](const Problem& p, const HostTensors& in) { return gpu_forward(p, in, forward, workspace); };
}

// rows x C scores: normal ones, large ones (|x| up to 1e4), some -inf, and one row of -inf only.
std::vector<float> score_rows(int R, int C, uint32_t seed) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    std::vector<float> x(size_t(R) * C);
    for (size_t e = 0; e < x.size(); ++e) {
        const size_t r = e / C;
        x[e] = r == 1 ? -INFINITY : e % 7 == 3 ? -INFINITY : (r % 3 == 2 ? 1e3f : 1.0f) * normal(rng);
    }
    return x;
}

using RowSoftmax = void (*)(const float*, float*, float*, int, int, float, cudaStream_t);

// A row softmax kernel on R rows of C scores against float64 (R sets the block size: 256 threads when there are
// enough rows to fill the GPU, 1024 otherwise; C % 4 sets vector or scalar loads).
CheckResult row_softmax_values(RowSoftmax softmax, int R, int C, float scale) {
    const std::vector<float> x = score_rows(R, C, 17u + C);
    const DeviceBuffer X = upload(x, DType::fp32, "X");
    DeviceBuffer Y(x.size() * sizeof(float), "Y"), L(size_t(R) * sizeof(float), "LSE");
    Y.poison(), L.poison();
    softmax(X.f32(), Y.f32(), L.f32(), R, C, scale, 0);
    const std::vector<float> y = download(Y, x.size(), DType::fp32), lse = download(L, R, DType::fp32);
    std::vector<double> want(x.size()), want_lse(R);
    double max_score = 0;
    for (int r = 0; r < R; ++r) softmax_row_reference(&x[size_t(r) * C], C, scale, &want[size_t(r) * C], &want_lse[r]);
    for (float v : x)
        if (std::isfinite(v)) max_score = std::max(max_score, std::fabs(double(scale) * v));
    const Tolerance tol = softmax_rows_tolerance(C, max_score);
    const Layout rows{1, size_t(R), size_t(C), 1, 1}, lses{1, size_t(R), 1, 1, 1};
    for (const Comparison& c : {compare("Y", y.data(), want.data(), rows, tol),
                                compare("LSE", lse.data(), want_lse.data(), lses, {tol.rtol, tol.rtol})})
        if (!c.ok) return {false, std::to_string(R) + " rows of " + std::to_string(C) + " scores:\n" + c.report};
    return {true, std::to_string(R) + " rows of " + std::to_string(C) + " scores (large, -inf, a row of -inf) match float64"};
}

// Both row sizes and both load widths of a row softmax kernel.
CheckResult row_softmax_shapes(RowSoftmax softmax) {
    for (auto [R, C] : {std::pair{3000, 64}, {3000, 33}, {5, 4097}, {5, 1000}}) {
        const CheckResult r = row_softmax_values(softmax, R, C, 0.3f);
        if (!r.ok) return r;
    }
    return {true, "256-thread blocks (3000 rows) and 1024-thread blocks (5 rows), vector and scalar loads, match float64"};
}

// The block reduction alone (RowBlock::reduce, naive/rows.cuh), not through a softmax kernel: the row softmax
// kernels are exercises of their own. Every thread of a block contributes a (count, max) pair, two 32-bit words,
// so both must be shuffled; two reductions run back to back through the same scratch, as the kernels' passes do.
struct CountMax {
    int count;
    float max;
};

template <class Block>
__global__ void block_reduce_probe(const float* x, CountMax* first, CountMax* second) {
    __shared__ CountMax scratch[Block::THREADS / 32];
    const int t = blockIdx.x * Block::THREADS + threadIdx.x;
    const auto op = [](CountMax a, CountMax b) { return CountMax{a.count + b.count, fmaxf(a.max, b.max)}; };
    first[t] = Block::reduce(CountMax{1 + int(threadIdx.x % 3), x[t]}, op, scratch);
    second[t] = Block::reduce(CountMax{2 * int(threadIdx.x % 5), -x[t]}, op, scratch);
}

template <class Block>
CheckResult block_reduce_values(int blocks) {
    const int T = Block::THREADS, n = blocks * T;
    std::mt19937 rng(5u + T);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    std::vector<float> x(n);
    for (float& v : x) v = normal(rng);
    const DeviceBuffer X = upload(x, DType::fp32, "x");
    DeviceBuffer first(n * sizeof(CountMax), "first"), second(n * sizeof(CountMax), "second");
    first.poison(), second.poison();
    block_reduce_probe<Block><<<blocks, T>>>(X.f32(), static_cast<CountMax*>(first.get()), static_cast<CountMax*>(second.get()));
    CUDA_CHECK_LAUNCH();
    std::vector<CountMax> got1(n), got2(n);
    CUDA_CHECK(cudaMemcpy(got1.data(), first.get(), n * sizeof(CountMax), cudaMemcpyDeviceToHost));
    CUDA_CHECK(cudaMemcpy(got2.data(), second.get(), n * sizeof(CountMax), cudaMemcpyDeviceToHost));
    for (int b = 0; b < blocks; ++b) {
        CountMax want1{0, -INFINITY}, want2{0, -INFINITY};
        for (int i = 0; i < T; ++i) {
            want1 = {want1.count + 1 + i % 3, std::max(want1.max, x[b * T + i])};
            want2 = {want2.count + 2 * (i % 5), std::max(want2.max, -x[b * T + i])};
        }
        for (int i = 0; i < T; ++i) {
            const CountMax g1 = got1[b * T + i], g2 = got2[b * T + i];
            if (g1.count != want1.count || g1.max != want1.max || g2.count != want2.count || g2.max != want2.max) {
                char line[256];
                std::snprintf(line, sizeof line,
                              "%d-thread block %d, thread %d: got (%d, %g) then (%d, %g), want (%d, %g) then (%d, %g)",
                              T, b, i, g1.count, g1.max, g2.count, g2.max, want1.count, want1.max, want2.count, want2.max);
                return {false, line};
            }
        }
    }
    return {true, std::to_string(blocks) + " blocks of " + std::to_string(T) +
                      " threads: every thread holds the block's (count, max), twice through one scratch"};
}

Exercise block_reduction() {
    return {"block-reduction",
            {{"256-threads", "every lane must end with the whole block's value: shuffles over offsets 16..1, then one value per warp in scratch, with a barrier before scratch is read and another before it is reused",
              [] { return block_reduce_values<RowBlock<256, 4, 4>>(40); }},
             {"1024-threads", "op must be applied to whole values (shuffle_xor moves every 32-bit word) and to all THREADS / 32 warp values",
              [] { return block_reduce_values<RowBlock<1024, 2, 1>>(3); }}}};
}

Exercise softmax_3pass_kernel() {
    return {"softmax-3pass-kernel",
            {{"rows", "pass 1 max, pass 2 sum of exp(scale (x - m)), pass 3 exp(scale (x - m)) / l; each pass ends with Rows::reduce so every thread has the row's value",
              [] { return row_softmax_shapes(softmax_rows_3pass); }},
             {"attention", "the naive stage's softmax: a fully masked row (all -inf) must give zeros and LSE = -inf, not NaN",
              [] { return forward_values(gpu_run(naive_forward, naive_workspace_bytes)); }},
             {"masked-rows", "m = -inf for a fully masked row: skip pass 2 and write zeros",
              [] { return masked_rows(gpu_run(naive_forward, naive_workspace_bytes)); }}}};
}

// C = alpha A B for 2 batches of odd sizes against a float64 product. transposed_a: A is read through a transposed
// view (as P^T in dV = P^T dO), else B is (as K^T in S = Q K^T), and then the causal mask of the scores is applied
// (causal_Nq = M: entries a query may not see are -inf).
CheckResult matmul_values(bool transposed_a) {
    const int batches = 2, M = 65, N = 130, K = transposed_a ? 17 : 40;
    std::mt19937 rng(3);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    std::vector<float> a(size_t(batches) * M * K), b(size_t(batches) * K * N);
    for (float& v : a) v = normal(rng);
    for (float& v : b) v = normal(rng);
    // Element (r, c) of a matrix in a batch is base[r * row_stride + c * col_stride] (MatrixView, naive/naive.h).
    const int a_row = transposed_a ? 1 : K, a_col = transposed_a ? M : 1, b_row = transposed_a ? N : 1, b_col = transposed_a ? 1 : K;
    std::vector<double> want(size_t(batches) * M * N, 0.0);
    for (int t = 0; t < batches; ++t)
        for (int i = 0; i < M; ++i)
            for (int j = 0; j < N; ++j) {
                double acc = 0;
                for (int k = 0; k < K; ++k)
                    acc += double(a[size_t(t) * M * K + i * a_row + k * a_col]) * b[size_t(t) * K * N + k * b_row + j * b_col];
                const bool masked = !transposed_a && j >= causal_key_end(i, M, N);
                want[(size_t(t) * M + i) * N + j] = masked ? -INFINITY : 0.5 * acc;
            }
    const DeviceBuffer A = upload(a, DType::fp32, "A"), B = upload(b, DType::fp32, "B");
    DeviceBuffer C(want.size() * sizeof(float), "C");
    C.poison();
    batched_matmul(batches, M, N, K, 0.5f, MatrixView{A.f32(), (long long)M * K, a_row, a_col},
                   MatrixView{B.f32(), (long long)K * N, b_row, b_col}, C.f32(), transposed_a ? 0 : M);
    const std::vector<float> got = download(C, want.size(), DType::fp32);
    const Comparison c = compare("C", got.data(), want.data(), Layout{size_t(batches), size_t(M), size_t(N), 1, 64}, {1e-4, 1e-4});
    const std::string what = transposed_a ? "2 batches of (17 x 65)^T times 17 x 130" : "2 batches of 65 x 40 times (130 x 40)^T, causal";
    return {c.ok, c.ok ? what + " match float64" : what + ":\n" + c.report};
}

Exercise tiled_matmul() {
    return {"tiled-matmul",
            {{"products", "acc[i][j] += As[k][tm + i] * Bs[k][tn + j] for every k of the slab; the slab loads and the bounds are already done for you",
              [] { return matmul_values(true); }},
             {"scores", "the same kernel computes S = scale Q K^T with K read transposed and the causal mask applied where C is stored",
              [] { return matmul_values(false); }}}};
}

Exercise online_rows_kernel() {
    return {"online-rows-kernel",
            {{"rows", "state = add_score(state, scale * x_j) for this thread's scores (Rows::for_each), then Rows::reduce with merge as the op",
              [] { return row_softmax_shapes(softmax_rows_online); }},
             {"attention", "the online_softmax stage uses this kernel on the score matrix, in place",
              [] { return forward_values(gpu_run(online_softmax_forward, online_softmax_workspace_bytes)); }}}};
}

Exercise fa1_inner_loop_kernel() {
    return {"fa1-inner-loop-kernel",
            {{"values", "in emit: O_scale = l_i e^(m_i - m_new), PV_scale = e^(m~ - m_new) (rescale_factor), then o = (O_scale o + PV_scale PV) / l_new for rows < rows",
              [] { return forward_values(gpu_run(v1_forward, v1_workspace_bytes)); }},
             {"masked-rows", "a row that has seen no key has l_new = 0: keep O_i = 0 (no 1/0)",
              [] { return masked_rows(gpu_run(v1_forward, v1_workspace_bytes)); }}}};
}

ForwardRun v2_fp32() { return gpu_run(v2_forward, v2_workspace_bytes); }

Exercise warp_softmax_fp32() {
    return {"warp-softmax-fp32",
            {{"values", "a row lives in the 8 lanes of one row group: reduce m_tile and l_tile with warp_max<8> / warp_sum<8>, not over the whole warp",
              [] { return forward_values(v2_fp32()); }},
             {"masked-rows", "a row with every key masked so far has m_new = -inf: rescale_factor gives 0, never exp(-inf - (-inf))",
              [] { return masked_rows(v2_fp32()); }}}};
}

Exercise causal_skip_kernel() {
    return {"causal-skip-kernel",
            {{"values", "skipping must never drop a tile a row sees: the last key of the tile's LAST row (cut at Nq) bounds the walk",
              [] { return forward_values(v2_fp32()); }},
             {"skips-tiles", "stop at the K/V tile holding the last key the Q tile's last row sees; the tiles after it are fully masked and must not be loaded",
              [] {
                  // Q tile 0 (rows 0..63) sees keys 0..63 only. V rows 64.. are NaN: if Q tile 0 visits their tiles,
                  // its O turns NaN (0 * NaN), although every score there is masked.
                  for (int d : {64, 128}) {
                      const Problem p = small_problem(128, 128, d, true);
                      HostTensors in = make_inputs(p, Dist::normal, 12);
                      for (size_t bh = 0; bh < size_t(p.B) * p.H; ++bh)
                          for (int key = 64; key < p.Nk; ++key)
                              for (int c = 0; c < d; ++c) in.v[(bh * p.Nk + key) * d + c] = NAN;
                      const Outputs out = gpu_forward(p, in, v2_forward, v2_workspace_bytes);
                      std::vector<size_t> first_tile;
                      for (size_t bh = 0; bh < size_t(p.B) * p.H; ++bh)
                          for (int i = 0; i < 64; ++i) first_tile.push_back(bh * p.Nq + i);
                      for (const Comparison& c : compare_forward(p, in, out.o, out.lse, first_tile))
                          if (!c.ok)
                              return CheckResult{false, "d=" + std::to_string(d) + ", V rows 64..127 NaN, rows 0..63 of Q tile 0 " +
                                                            "(which may not visit them):\n" + c.report};
                  }
                  return CheckResult{true, "Q tile 0 never touched the K/V tiles above the diagonal (d = 64 and 128)"};
              }}}};
}

Exercise backward_ds_kernel() {
    return {"backward-ds-kernel",
            {{"gradients", "visible = key < Nk, causal mask, and L_i[r] != -inf; P = exp(scale s - L_i[r]) or 0; dS = P (dp - D_i[r])",
              [] {
                  for (auto [Nq, Nk, d, causal] : {std::tuple{33, 70, 40, false}, {70, 33, 64, true}, {17, 17, 128, true},
                                                   {1, 65, 8, false}}) {
                      const Problem p = small_problem(Nq, Nk, d, causal);
                      const HostTensors in = make_inputs(p, Dist::normal, 5);
                      const HostGrads g = gpu_backward(p, in, v2_forward, v2_workspace_bytes, v2_backward,
                                                       v2_backward_workspace_bytes);
                      for (const Comparison& c : compare_grads(p, in, g))
                          if (!c.ok) return CheckResult{false, describe(p, Dist::normal) + ":\n" + c.report};
                  }
                  return CheckResult{true, "dQ, dK, dV of 4 problems (causal, Nq != Nk, rows that see no key) match float64"};
              }}}};
}

}  // namespace

const std::vector<Exercise>& gpu_exercises() {
    static const std::vector<Exercise> all = {block_reduction(),       softmax_3pass_kernel(), tiled_matmul(),
                                              online_rows_kernel(),    fa1_inner_loop_kernel(), warp_softmax_fp32(),
                                              causal_skip_kernel(),    backward_ds_kernel()};
    return all;
}
