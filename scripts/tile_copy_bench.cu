// tile_copy_bench.cu: the tensor-core backward's tile copy alone (v2/backward_mma.cu, load_tile_async), to see what
// a head dim between tiles costs in the copy itself (docs/backward.md, "A head dim below its tile"). Standalone:
//
//     nvcc -O3 -std=c++20 -arch=sm_90 -I. -Itests -o /tmp/tile_copy_bench scripts/tile_copy_bench.cu
//     /tmp/tile_copy_bench          # every d below; GB/s of real bytes (64 rows x d of fp16 a tile)
//     ncu --section SpeedOfLight --section MemoryWorkloadAnalysis_Tables /tmp/tile_copy_bench 184   # one d, once
//
// Each block of 256 threads copies tiles of 64 rows of a [N, d] fp16 matrix (rows d elements apart, as Q and dO are)
// into a two-stage ring of swizzled shared tiles of kCols columns, as dk_dv's Q-tile loop does, and reads a little
// of each tile. 132 x 8 blocks of 64 tiles each; the tiles repeat across blocks, so part of them come from L2, as
// Q and dO tiles do in dk_dv. Six orders of the 16-byte chunks (columns d .. kCols zero-filled in all of them):
//   0  chunk index linear over the padded tile (kCols / 8 chunks a row), zero-filled chunks pointed at (0, 0): the
//      kernel's order
//   1  as 0, a zero-filled chunk of a real row pointed at its row's last real chunk
//   2  a warp copies 4 rows x one swizzle group of 8 chunks, zero-fill as in 1
//   3  a warp copies one row (kCols / 8 of its lanes), zero-fill as in 1
//   4  as 2, zero-fill as in 0
//   5  only the real chunks, in global order (a warp's 32 chunks are 512 contiguous bytes); columns d .. kCols zeroed
//      once at the start, never written again
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include <cuda_fp16.h>

#include "cuda_check.h"
#include "v2/mma.cuh"
#include "v2/swizzle.h"

using namespace v2_ptx;

constexpr int kRows = 64, kThreads = 256;

template <int kCols, int kOrder>
__device__ __forceinline__ void copy_tile(uint32_t tile, const __half* g, int row0, int n_rows, int d) {
    constexpr int kChunksPerRow = kCols / 8, kChunks = kRows * kChunksPerRow;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    // one chunk: (r, c) of the tile (c in elements); a zero-filled chunk reads nothing from its (valid) address
    auto chunk = [&](int r, int c, bool point_at_row) {
        const bool real_row = row0 + r < n_rows, valid = real_row && c < d;
        const __half* src = valid ? g + size_t(row0 + r) * d + c
                            : point_at_row && real_row ? g + size_t(row0 + r) * d + (d - 8)
                                                       : g;
        cp_async_16(tile + swizzle<kCols>(r, c), src, valid ? 16 : 0);
    };
    if constexpr (kOrder == 0 || kOrder == 1) {
#pragma unroll
        for (int k = 0; k < kChunks / kThreads; ++k) {
            const int idx = threadIdx.x + k * kThreads;
            chunk(idx / kChunksPerRow, idx % kChunksPerRow * 8, kOrder == 1);
        }
    } else if constexpr (kOrder == 2 || kOrder == 4) {
        constexpr int kGroups = kChunksPerRow / 8, kJobs = kRows / 4 * kGroups;  // a job: 4 rows x 8 chunks
#pragma unroll
        for (int k = 0; k < kJobs / (kThreads / 32); ++k) {
            const int job = warp + k * (kThreads / 32);
            chunk(job / kGroups * 4 + lane / 8, (job % kGroups * 8 + lane % 8) * 8, kOrder == 2);
        }
    } else if constexpr (kOrder == 3) {
        if (lane >= kChunksPerRow) return;
#pragma unroll
        for (int k = 0; k < kRows / (kThreads / 32); ++k) chunk(warp + k * (kThreads / 32), lane * 8, true);
    } else {
        const int per_row = d / 8, real = kRows * per_row;
        int r = threadIdx.x / per_row, c = threadIdx.x % per_row;  // (r, c) of chunk threadIdx.x + k kThreads
#pragma unroll
        for (int k = 0; k < (kChunks + kThreads - 1) / kThreads; ++k) {
            if (threadIdx.x + k * kThreads < real) {
                const bool valid = row0 + r < n_rows;
                cp_async_16(tile + swizzle<kCols>(r, c * 8), valid ? g + size_t(row0 + r) * d + c * 8 : g,
                            valid ? 16 : 0);
            }
            r += kThreads / per_row, c += kThreads % per_row;
            if (c >= per_row) c -= per_row, ++r;
        }
    }
}

template <int kCols, int kOrder>
__global__ void __launch_bounds__(kThreads, 1) copy_kernel(const __half* g, int N, int d, int tiles, float* out) {
    extern __shared__ __align__(128) unsigned char smem[];
    const uint32_t s = shared_addr(smem);
    constexpr int kTileBytes = kRows * kCols * 2;
    if (kOrder == 5) {  // columns d .. kCols of both stages, zeroed once
        const int pad = (kCols - d) / 8;
        for (int i = threadIdx.x; i < 2 * kRows * pad; i += kThreads) {
            const int stage = i / (kRows * pad), r = i / pad % kRows, c = d + i % pad * 8;
            *reinterpret_cast<uint4*>(smem + stage * kTileBytes + swizzle<kCols>(r, c)) = make_uint4(0, 0, 0, 0);
        }
    }
    const int n_tiles = N / kRows, first = blockIdx.x * tiles;
    copy_tile<kCols, kOrder>(s, g, first % n_tiles * kRows, N, d);
    cp_async_commit();
    float acc = 0.0f;
    for (int i = 0; i < tiles; ++i) {
        if (i + 1 < tiles) copy_tile<kCols, kOrder>(s + (i + 1) % 2 * kTileBytes, g, (first + i + 1) % n_tiles * kRows, N, d);
        cp_async_commit();
        cp_async_wait<1>();
        __syncthreads();  // tile i landed
        const half2 v = *reinterpret_cast<const half2*>(smem + i % 2 * kTileBytes + threadIdx.x * 52 % kTileBytes);
        acc += __low2float(v) + __high2float(v);
        __syncthreads();  // every thread is done with tile i's stage before it is refilled
    }
    if (acc == 12345.0f) out[blockIdx.x] = acc;  // never true for these inputs; keeps the reads
}

struct Bench {
    const __half* g;
    int N, blocks, tiles, reps;
    float* out;
    char* flush;
    size_t flush_bytes;
};

// Median ms of b.reps launches (the first two dropped when there are more than two), L2 flushed before each.
template <int kCols, int kOrder>
float time_order(const Bench& b, int d) {
    const int smem = 2 * kRows * kCols * 2;
    CUDA_CHECK(cudaFuncSetAttribute(copy_kernel<kCols, kOrder>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    cudaEvent_t start, stop;
    CUDA_CHECK(cudaEventCreate(&start));
    CUDA_CHECK(cudaEventCreate(&stop));
    std::vector<float> ms;
    for (int rep = 0; rep < b.reps; ++rep) {
        CUDA_CHECK(cudaMemset(b.flush, rep, b.flush_bytes));
        CUDA_CHECK(cudaEventRecord(start));
        copy_kernel<kCols, kOrder><<<b.blocks, kThreads, smem>>>(b.g, b.N, d, b.tiles, b.out);
        CUDA_CHECK(cudaEventRecord(stop));
        CUDA_CHECK(cudaEventSynchronize(stop));
        float t = 0.0f;
        CUDA_CHECK(cudaEventElapsedTime(&t, start, stop));
        if (b.reps <= 2 || rep >= 2) ms.push_back(t);
    }
    CUDA_CHECK(cudaGetLastError());
    CUDA_CHECK(cudaEventDestroy(start));
    CUDA_CHECK(cudaEventDestroy(stop));
    std::sort(ms.begin(), ms.end());
    return ms[ms.size() / 2];
}

template <int kCols>
void row(const Bench& b, int d) {
    const float ms[6] = {time_order<kCols, 0>(b, d), time_order<kCols, 1>(b, d), time_order<kCols, 2>(b, d),
                         time_order<kCols, 3>(b, d), time_order<kCols, 4>(b, d), time_order<kCols, 5>(b, d)};
    const double bytes = double(b.blocks) * b.tiles * kRows * d * 2;
    std::printf("tile %d d %3d |", kCols, d);
    for (int k = 0; k < 6; ++k) std::printf(" v%d %.4f ms %5.0f GB/s |", k, ms[k], bytes / ms[k] / 1e6);
    std::printf("\n");
}

int main(int argc, char** argv) {
    const int only = argc > 1 ? std::atoi(argv[1]) : 0;  // one d, each order launched once (for ncu)
    Bench b;
    b.N = 64 * 4096, b.blocks = 132 * 8, b.tiles = 64, b.reps = only ? 1 : 12;
    b.flush_bytes = size_t(256) << 20;
    __half* g = nullptr;
    CUDA_CHECK(cudaMalloc(&g, size_t(b.N) * 256 * 2));  // room for d = 256; a smaller d uses the front
    CUDA_CHECK(cudaMalloc(&b.out, b.blocks * sizeof(float)));
    CUDA_CHECK(cudaMalloc(&b.flush, b.flush_bytes));
    std::vector<__half> h(size_t(b.N) * 256);
    for (size_t i = 0; i < h.size(); ++i) h[i] = __float2half(float(i * 2654435761u % 1000) / 1000.0f);
    CUDA_CHECK(cudaMemcpy(g, h.data(), h.size() * 2, cudaMemcpyHostToDevice));
    b.g = g;
    for (int d : {104, 112, 120, 128}) if (!only || only == d) row<128>(b, d);
    for (int d : {136, 144, 176, 184, 192}) if (!only || only == d) row<192>(b, d);
    for (int d : {200, 208, 248, 256}) if (!only || only == d) row<256>(b, d);
    for (int d : {40, 56, 64}) if (!only || only == d) row<64>(b, d);
    CUDA_CHECK(cudaDeviceSynchronize());
    CUDA_CHECK(cudaFree(g));
    CUDA_CHECK(cudaFree(b.out));
    CUDA_CHECK(cudaFree(b.flush));
    return 0;
}
