// backward_mma.h: the FlashAttention-2 backward pass on tensor cores (mma.sync m16n8k16), fp16 and bf16.
//
// Inputs and outputs follow tests/problem.h: Q, K, V, O, dO, dQ, dK, dV are [B, H, N, d] contiguous (K, V, dK, dV
// [B, Hk, Nk, d]; a packed batch [T, H, d] and [Tk, Hk, d]), of __half or __nv_bfloat16 as p.dtype says; LSE is
// float [B, H, Nq] ([H, Tq] packed), as the forward pass wrote it. Products accumulate in fp32. The extensions
// (docs/conventions.md, "Extensions") run in the final kernel.
#pragma once
#include "problem.h"
#include <cuda_runtime.h>
#include <cstddef>
#include <string>

// The head-dim tile the backward runs for head dim d: the smallest of 64, 128, 192, 256 that holds d, for d a
// multiple of 8 from 8 to 256 (columns d..tile-1 are zeros in shared memory and never stored); 0 for any other d.
int v2_backward_mma_head_dim_tile(int d);

// Returns true when (p.d, p.dtype, p.kernel) is supported (d a multiple of 8 from 8 to 256, fp16 or bf16,
// Nq, Nk >= 1, B*H <= 65535, p.kernel a step of v2_backward_steps(), 0 = the final kernel, the earlier steps fp16
// and d = 64, 128 only); otherwise writes a one-line reason to *why. p.deterministic picks the dQ without atomics.
bool v2_backward_mma_supports(const Problem& p, std::string* why);

// The dk_dv kernel that v2_backward_mma runs for p (docs/extensions.md, "Backward"): "step K" before the final
// step; else "default" (no extension), "default + dropout" (dropout alone, atomic dQ, d = 64 or 128), "layout" or
// "layout + dropout" (grouped-query heads, packed sequences, windows: the default kernel's code with the group walk
// and the band; d = 64 or 128, dropout with atomic dQ only), "all" (the bias, ALiBi, any other d).
std::string v2_backward_mma_kernel(const Problem& p);

// Where the backward keeps the fp32 sums of dQ (the accumulator: `tile` columns a row, tile = the head-dim tile; its
// rows start at multiples of 16). Steps 1-5: row-major, row r column c at r tile + c. From step 6, in the order of
// mma.sync's m16n8 accumulator fragments, which the dk_dv kernel adds into it: a 16 x 8 block (r / 16, c / 8) is 128
// consecutive floats at 128 ((r / 16) (tile / 8) + c / 8), in which lane 4 (r % 8) + (c % 8) / 2 of the warp that
// holds the fragment keeps its four sums (rows r % 8 and r % 8 + 8, columns c and c + 1, c even) at 4 lane ..
// 4 lane + 3. Either way a run of 16 rows fills the same 16 tile floats, and columns c, c + 1 (c even) are adjacent.
template <bool kFragments>
__host__ __device__ constexpr size_t dq_accum_offset(size_t r, int c, int tile) {
    if (!kFragments) return r * tile + c;
    const size_t block = (r / 16) * (tile / 8) + c / 8, lane = (r % 8) * 4 + (c % 8) / 2;
    return block * 128 + lane * 4 + (r % 16) / 8 * 2 + c % 2;
}

// Where dO's rows of head bh = b H + h start, and how many elements apart they lie: element (b, h, i, c) of dO is at
// start + i ld + c. dO is laid out [B, H, Nq, d] as O, or with token_major [B, Nq, H, d] (Problem::dO_token_major:
// what autograd hands back when a model reshapes O to [B, Nq, H d] through O.transpose(1, 2), read in place instead
// of copied; docs/pytorch.md). The padded layout only (a packed batch has its own, [T, H, d]).
struct DORows {
    size_t start;
    int ld;
};
__host__ __device__ __forceinline__ DORows dO_rows(int bh, int H, int Nq, int d, bool token_major) {
    if (!token_major) return {size_t(bh) * Nq * d, d};
    // EXERCISE(token-major-do): head bh's rows in a [B, Nq, H, d] dO: where the first starts, how far apart they are
    return {(size_t(bh / H) * Nq * H + bh % H) * d, H * d};
    // END EXERCISE
}

// Bytes of device scratch the backward pass needs: D_i = rowsum(dO_i * O_i), LSE_i in log2 units, and (unless
// p.deterministic) the fp32 accumulator of dQ, all linear in Nq; with grouped-query heads and no other extension
// but dropout (d = 64, 128), each query head's K, V, dK and dV, [B, H, Nk, d] of T each, linear in Nk. The pointer
// passed as `workspace` must be 16-byte aligned (cudaMalloc's are).
size_t v2_backward_mma_workspace_bytes(const Problem& p);

// The dynamic shared memory (bytes) the largest of the kernels p may run takes (dk_dv with or without the extensions,
// and with --deterministic the dq kernel) on a GPU that allows smem_per_block bytes a block (the final kernel at the
// 64 tile is step 6's where step 7's does not fit), for v2_smem_refusal (forward_mma.h).
size_t v2_backward_mma_smem_bytes(const Problem& p, size_t smem_per_block);

// Q, K, V, O, dO, dQ, dK, dV are __half or __nv_bfloat16 per p.dtype; LSE float [B, H, Nq] from the forward.
// The extensions' device inputs, null where p does not use them (as BackwardArgs in tests/harness.h carries them):
// bias [bias_batch, bias_heads, Nq, Nk] float32 and dbias, its gradient in the same shape (p.has_bias()), and for a
// packed batch cu_seqlens_q, cu_seqlens_k = {0, N_0, N_0 + N_1, ..., T} (B + 1 ints each).
// Launches backward step p.kernel and returns ""; or launches nothing and returns why.
std::string v2_backward_mma(const Problem& p, const void* Q, const void* K, const void* V, const void* O,
                            const float* LSE, const void* dO, void* dQ, void* dK, void* dV, void* workspace,
                            const float* bias, float* dbias, const int* cu_seqlens_q, const int* cu_seqlens_k,
                            cudaStream_t stream = 0);

// The keys a query row sees, as a band around its diagonal, in the form the kernels test it in: row i sits at key
// position i + shift (shift = Nk - Nq, the bottom-right alignment) and sees key j < Nk iff
// -left <= j - (i + shift) <= right. The causal mask is right = 0; --window L,R is left = L, right = R (causal
// keeps the smaller right); kUnbounded where a side has no limit. The same keys as visible_keys (tests/problem.h).
struct KeyBand {
    static constexpr int kUnbounded = 1 << 30;  // past any distance (N < 2^28), and no int overflow below
    int left = kUnbounded, right = kUnbounded;

    __host__ __device__ bool sees(int i, int j, int shift) const {
        const int offset = j - (i + shift);
        return offset >= -left && offset <= right;
    }
    // The rows that see some key of [key0, key_end): first_row(key0) .. last_row(key_end), before clamping to
    // [0, Nq). The band moves right with the row, so the first row is the one whose right edge reaches key0.
    __host__ __device__ int first_row(int key0, int shift) const { return key0 - shift - right; }
    __host__ __device__ int last_row(int key_end, int shift) const { return key_end - 1 - shift + left; }
    // The keys rows [row0, row_last] see: first_key(row0) .. last_key(row_last), before clamping to [0, Nk).
    __host__ __device__ int first_key(int row0, int shift) const { return row0 + shift - left; }
    __host__ __device__ int last_key(int row_last, int shift) const { return row_last + shift + right; }
};
KeyBand key_band(const Problem& p);
