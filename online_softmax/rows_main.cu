// online_softmax/rows_main.cu: the program bin/softmax_rows. Softmax over the rows of an R x C fp32 matrix, the safe
// 3-pass way (naive/softmax.cu) and the online 2-pass way (online_softmax/softmax.cu), each timed against a plain
// device-to-device copy of the same matrix. Build and run it alone:
//   nvcc -O3 -std=c++20 -arch=native -I. -Itests -o softmax_rows online_softmax/{rows_main,softmax,model}.cu naive/{softmax,model}.cu tests/harness/*.cu && ./softmax_rows --check
//
// Bandwidth counts the accesses each algorithm needs: 4 per element for 3-pass (3 reads, 1 write), 3 for online
// (2 reads, 1 write), 2 for the copy (1 read, 1 write). Both kernels read and write the row the same way (the loops
// and block sizes of naive/rows.cuh), so once both run at the copy's bandwidth, online is 4/3 faster. The default
// run has two shapes of 2^28 elements, to show when that holds:
//   256 x 2^20 (rows of 4 MiB): every row has its own block and all 256 blocks run at once, so between two passes
//     over a row the blocks together stream the whole 1 GiB matrix, far more than L2 (50-60 MiB on H100/H200).
//     Every pass comes from device memory, and the access count decides: 4 against 3.
//   2^16 x 4096 (rows of 16 KiB): the resident blocks' rows, a few MiB, stay in L2 between passes, so only the
//     first read of each row comes from device memory: both kernels move as many bytes through it as a copy does
//     (the 3-pass kernel shows well over 100% "of copy"). The pass online saves is an L2 pass, nearly free, while
//     its pass 1 does more per score (a compare on the running max, and a sum that waits on the previous score's
//     update): here the 3-pass kernel wins.
// Measured on an H200 (docs/measured/softmax_rows.log, 2026-11-22): rows of 4 MiB, 3-pass 1.013 ms (100% of
// copy), online 0.806 ms (95%), 1.26x; rows of 16 KiB, 3-pass 0.539 ms, online 0.809 ms, 0.67x.
#include <algorithm>
#include <cerrno>
#include <climits>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <string>
#include <vector>

#include "common/blocks.cuh"
#include "cuda_check.h"
#include "naive/naive.h"
#include "online_softmax/online_softmax.h"

namespace {

struct RowsOptions {
    long rows = 0, cols = 0;  // 0: the two default shapes
    int reps = 20;
    bool check = false, help = false;
};

const char* const USAGE =
    "usage: softmax_rows [options]\n"
    "  --rows R    rows of the matrix (give --rows and --cols together; default: two shapes of 2^28 elements,\n"
    "              256 x 1048576 and 65536 x 4096)\n"
    "  --cols C    columns, the softmax length (up to 2^30)\n"
    "  --reps N    timed repetitions (default 20)\n"
    "  --check     compare both kernels with a float64 softmax on sampled rows; exit 1 on a mismatch\n"
    "  --help      this text\n";

bool parse(int argc, char** argv, RowsOptions* o, std::string* err) {
    auto takes_value = [](const std::string& f) { return f == "--rows" || f == "--cols" || f == "--reps"; };
    for (int a = 1; a < argc; ++a) {
        std::string flag, value;
        if (!next_flag(argc, argv, &a, takes_value, &flag, &value, err)) return false;
        long v = 0;
        if (flag == "--rows") { if (!parse_int(flag, value, 1, INT_MAX, &o->rows, err)) return false; }
        else if (flag == "--cols") { if (!parse_int(flag, value, 1, 1L << 30, &o->cols, err)) return false; }
        else if (flag == "--reps") { if (!parse_int(flag, value, 1, 100000, &v, err)) return false; o->reps = int(v); }
        else if (flag == "--check") o->check = true;
        else if (flag == "--help" || flag == "-h") o->help = true;
        else return *err = "unknown option '" + flag + "' (see --help)", false;
    }
    if ((o->rows == 0) != (o->cols == 0)) return *err = "give --rows and --cols together, or neither", false;
    return true;
}

// Scores for the benchmark: row r is uniform in [o_r - 10, o_r + 10) around an offset o_r in [-100, 100), so that
// exp without the max subtracted would overflow. A hash of the index fills any size in one pass.
__device__ float uniform01(unsigned long long i) {  // splitmix64, top 24 bits
    i += 0x9e3779b97f4a7c15ull;
    i = (i ^ (i >> 30)) * 0xbf58476d1ce4e5b9ull;
    i = (i ^ (i >> 27)) * 0x94d049bb133111ebull;
    return float((i ^ (i >> 31)) >> 40) * 0x1p-24f;
}

__global__ void fill_scores(float* X, int C, long long n) {
    for (long long e = blockIdx.x * (long long)blockDim.x + threadIdx.x; e < n; e += (long long)gridDim.x * blockDim.x) {
        const unsigned long long row = e / C;
        X[e] = 200.0f * (uniform01(~row) - 0.5f) + 20.0f * (uniform01(e) - 0.5f);
    }
}

// Up to 16 rows spread over the matrix, always the first and the last.
std::vector<size_t> sample_rows(int R) {
    std::vector<size_t> rows;
    const int n = R < 16 ? R : 16;
    for (int k = 0; k < n; ++k) rows.push_back(n == 1 ? 0 : size_t(k) * (R - 1) / (n - 1));
    return rows;
}

std::vector<float> download_rows(const float* dev, const std::vector<size_t>& rows, size_t width) {
    std::vector<float> host(rows.size() * width);
    for (size_t k = 0; k < rows.size(); ++k)
        CUDA_CHECK(cudaMemcpy(&host[k * width], dev + rows[k] * width, width * 4, cudaMemcpyDeviceToHost));
    return host;
}

// Y and LSE of the sampled rows against float64. Prints one line per output; returns whether both pass.
bool check_rows(const char* name, const DeviceBuffer& X, const DeviceBuffer& Y, const DeviceBuffer& lse, int R, int C) {
    const std::vector<size_t> rows = sample_rows(R);
    CUDA_CHECK(cudaDeviceSynchronize());
    const std::vector<float> x = download_rows(X.f32(), rows, C), y = download_rows(Y.f32(), rows, C);
    const std::vector<float> l = download_rows(lse.f32(), rows, 1);
    std::vector<double> p(x.size()), ref_lse(rows.size());
    double max_abs = 0;
    for (size_t k = 0; k < rows.size(); ++k) softmax_row_reference(&x[k * C], C, 1.0f, &p[k * C], &ref_lse[k]);
    for (float v : x) max_abs = std::max(max_abs, double(std::fabs(v)));
    const Tolerance tol = softmax_rows_tolerance(C, max_abs);
    const Layout layout{1, rows.size(), size_t(C), 1, 1};
    const Comparison cy = compare("Y", y.data(), p.data(), layout, tol);
    const Comparison cl = compare("LSE", l.data(), ref_lse.data(), {1, rows.size(), 1, 1, 1}, {tol.rtol, tol.rtol});
    std::printf("  %-7s vs float64 on %zu rows: %s\n  %-7s vs float64 on %zu rows: %s\n", name, rows.size(),
                cy.report.c_str(), name, rows.size(), cl.report.c_str());
    return cy.ok && cl.ok;
}

// One shape: the copy, then each kernel (checked first with --check). Returns false on a mismatch.
bool run_shape(int R, int C, const RowsOptions& o) {
    const size_t n = size_t(R) * C, bytes = n * sizeof(float);
    std::printf("R x C = %d x %d (%.0f MiB), scale 1\n", R, C, bytes / 1048576.0);
    DeviceBuffer X(bytes, "X"), Y(bytes, "Y"), lse(size_t(R) * sizeof(float), "LSE");
    fill_scores<<<device_sm_count() * 8, 256>>>(X.f32(), C, (long long)n);
    CUDA_CHECK_LAUNCH();

    const Timing copy = time_gpu([&] { CUDA_CHECK(cudaMemcpyAsync(Y.get(), X.get(), bytes, cudaMemcpyDeviceToDevice)); }, o.reps);
    const double copy_gbs = 2.0 * bytes / (copy.median_ms * 1e-3) / 1e9;
    std::printf("  %-7s %9.4f ms  %7.1f GB/s (1 read + 1 write per element)\n", "copy", copy.median_ms, copy_gbs);

    struct Kernel {
        const char* name;
        int accesses;  // per element
        std::function<void()> run;
    };
    const Kernel kernels[] = {
        {"3-pass", 4, [&] { softmax_rows_3pass(X.f32(), Y.f32(), lse.f32(), R, C, 1.0f); }},
        {"online", 3, [&] { softmax_rows_online(X.f32(), Y.f32(), lse.f32(), R, C, 1.0f); }},
    };
    bool ok = true;
    double ms[2];
    for (int k = 0; k < 2; ++k) {
        const Kernel& kernel = kernels[k];
        if (o.check) {
            Y.poison();
            lse.poison();
            kernel.run();
            ok = check_rows(kernel.name, X, Y, lse, R, C) && ok;
        }
        const Timing t = time_gpu(kernel.run, o.reps);
        ms[k] = t.median_ms;
        const double gbs = double(kernel.accesses) * bytes / (t.median_ms * 1e-3) / 1e9;
        std::printf("  %-7s %9.4f ms  %7.1f GB/s (%d accesses per element) = %3.0f%% of copy\n", kernel.name,
                    t.median_ms, gbs, kernel.accesses, 100.0 * gbs / copy_gbs);
    }
    std::printf("  online speed-up over 3-pass: %.2fx (4/3 = 1.33x when both run at the same fraction of copy)\n",
                ms[0] / ms[1]);
    return ok;
}

}  // namespace

int main(int argc, char** argv) {
    RowsOptions o;
    std::string err;
    if (!parse(argc, argv, &o, &err)) {
        std::fprintf(stderr, "error: %s\n", err.c_str());
        return 2;
    }
    if (o.help) {
        std::printf("%s", USAGE);
        return 0;
    }
    if (!gpu_available()) {
        std::fprintf(stderr, "error: softmax_rows times GPU kernels and needs a CUDA device\n");
        return 2;
    }
    std::printf("softmax_rows [%s]\n", gpu_name().c_str());
    std::vector<std::pair<int, int>> shapes = {{256, 1 << 20}, {1 << 16, 4096}};
    if (o.rows > 0) shapes = {{int(o.rows), int(o.cols)}};
    bool ok = true;
    for (auto [R, C] : shapes) ok = run_shape(R, C, o) && ok;
    return ok ? 0 : 1;
}
