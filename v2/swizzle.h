// swizzle.h: where element (r, c) of a shared-memory tile lives in v2's tensor-core backward (v2/backward_mma.cu),
// shared with the checks of the course's exercise backward-swizzle (docs/exercises.md), which count its conflicts.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

// Byte offset of element (r, c) in a tile of kCols 16-bit elements a row (kCols = 64 to 256: a row is 1 to 4 times
// 128 bytes, the 32 four-byte banks of shared memory once). ldmatrix reads one 16-byte chunk from each of 8
// consecutive rows (an 8 x 8 matrix). Rows a multiple of 128 bytes apart put the same chunk of every row in the same
// 4 banks: the 8 reads are an 8-way bank conflict (8 wavefronts). So each row's chunks are permuted within their
// groups of 8 (128 bytes), differently in each of 8 consecutive rows, and the 8 reads fall in 8 different 16-byte
// bank groups (one wavefront). A chunk stays whole, as cp.async writes it and ldmatrix reads it.
template <int kCols>
__host__ __device__ constexpr uint32_t swizzle(int r, int c) {
    static_assert(kCols % 64 == 0, "the swizzle needs rows of at least 8 chunks of 16 bytes");
    // EXERCISE(backward-swizzle): the byte offset of (r, c), chunk k of 8 consecutive rows in 8 different bank groups
    return uint32_t(r * kCols * 2 + (((c / 8) ^ (r % 8)) * 16) + (c % 8) * 2);
    // END EXERCISE
}
