// cuda_check.h: every CUDA runtime call and every kernel launch in this project goes through these two checks.
#pragma once
#include <cstdio>
#include <cstdlib>
#include <cuda_runtime.h>

inline void cuda_check(cudaError_t err, const char* what, const char* file, int line) {
    if (err != cudaSuccess) {
        std::fprintf(stderr, "error: CUDA: %s failed at %s:%d: %s\n", what, file, line, cudaGetErrorString(err));
        std::exit(1);
    }
}
// CUDA_CHECK(cudaMalloc(...)) checks a runtime call; CUDA_CHECK_LAUNCH() checks the launch just made
// (bad configuration, too much shared memory). Errors inside a running kernel surface at the next synchronisation.
#define CUDA_CHECK(call) cuda_check((call), #call, __FILE__, __LINE__)
#define CUDA_CHECK_LAUNCH() cuda_check(cudaGetLastError(), "kernel launch", __FILE__, __LINE__)
