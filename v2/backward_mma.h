// backward_mma.h: the FlashAttention-2 backward pass on tensor cores (mma.sync m16n8k16), fp16 and bf16.
//
// Inputs and outputs follow tests/problem.h: Q, K, V, O, dO, dQ, dK, dV are [B, H, N, d] contiguous, of __half or
// __nv_bfloat16 as p.dtype says; LSE is float [B, H, Nq], as the forward pass wrote it. Products accumulate in fp32.
#pragma once
#include "problem.h"
#include <cuda_runtime.h>
#include <string>

// The head-dim tile the backward runs for head dim d: the smallest of 64, 128, 192, 256 that holds d, for d a
// multiple of 8 from 8 to 256 (columns d..tile-1 are zeros in shared memory and never stored); 0 for any other d.
int v2_backward_mma_head_dim_tile(int d);

// Returns true when (p.d, p.dtype, p.kernel) is supported (d a multiple of 8 from 8 to 256, fp16 or bf16,
// Nq, Nk >= 1, B*H <= 65535, p.kernel a step of v2_backward_steps(), 0 = the final kernel, the earlier steps fp16
// and d = 64, 128 only); otherwise writes a one-line reason to *why. p.deterministic picks the dQ without atomics.
bool v2_backward_mma_supports(const Problem& p, std::string* why);

// Bytes of device scratch the backward pass needs: D_i = rowsum(dO_i * O_i), LSE_i in log2 units, and (unless
// p.deterministic) the fp32 accumulator of dQ, all linear in Nq. The pointer passed as `workspace` must be 16-byte
// aligned (cudaMalloc's are).
size_t v2_backward_mma_workspace_bytes(const Problem& p);

// Q, K, V, O, dO, dQ, dK, dV are __half or __nv_bfloat16 per p.dtype; LSE float [B, H, Nq] from the forward.
// Launches backward step p.kernel and returns ""; or launches nothing and returns why.
std::string v2_backward_mma(const Problem& p, const void* Q, const void* K, const void* V, const void* O,
                            const float* LSE, const void* dO, void* dQ, void* dK, void* dV, void* workspace,
                            cudaStream_t stream = 0);
