// backward_mma.h: the FlashAttention-2 backward pass on tensor cores (mma.sync m16n8k16), fp16 and bf16.
//
// Inputs and outputs follow tests/problem.h: Q, K, V, O, dO, dQ, dK, dV are [B, H, N, d] contiguous, of __half or
// __nv_bfloat16 as p.dtype says; LSE is float [B, H, Nq], as the forward pass wrote it. Products accumulate in fp32.
#pragma once
#include "problem.h"
#include <cuda_runtime.h>
#include <string>

// Returns true when (p.d, p.dtype, p.kernel) is supported (d in {64, 128}, fp16 or bf16, Nq, Nk >= 1,
// B*H <= 65535, p.kernel a step of v2_backward_steps(), 0 = the final kernel, the earlier steps fp16 only);
// otherwise writes a one-line reason to *why.
bool v2_backward_mma_supports(const Problem& p, std::string* why);

// Bytes of device scratch the backward pass needs: D_i = rowsum(dO_i * O_i), LSE_i in log2 units, and the fp32
// accumulator of dQ. The pointer passed as `workspace` must be 16-byte aligned (cudaMalloc's are).
size_t v2_backward_mma_workspace_bytes(const Problem& p);

// Q, K, V, O, dO, dQ, dK, dV are __half or __nv_bfloat16 per p.dtype; LSE float [B, H, Nq] from the forward.
// Launches backward step p.kernel and returns ""; or launches nothing and returns why.
std::string v2_backward_mma(const Problem& p, const void* Q, const void* K, const void* V, const void* O,
                            const float* LSE, const void* dO, void* dQ, void* dK, void* dV, void* workspace,
                            cudaStream_t stream = 0);
