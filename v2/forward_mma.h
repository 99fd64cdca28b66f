// forward_mma.h: the FlashAttention-2 forward pass on tensor cores (mma.sync m16n8k16), fp16 and bf16.
//
// Inputs and outputs follow tests/problem.h: Q, K, V, O are [B, H, N, d] contiguous, of __half or
// __nv_bfloat16 as p.dtype says; LSE is float [B, H, Nq]. Products accumulate in fp32 and the softmax
// statistics (running max m_i, running sum l_i) are fp32.
#pragma once
#include <cuda_runtime.h>  // before problem.h, which uses __host__ __device__
#include <string>

#include "problem.h"

// The head-dim tile the forward runs for head dim d: the smallest of 32, 64, 96, 128, 192, 256 that holds d, for d
// a multiple of 8 from 8 to 256 (columns d..tile-1 are zeros in shared memory and never stored); 0 for any other d.
int v2_mma_head_dim_tile(int d);

// Returns true when (p.d, p.dtype, p.kernel) is supported (fp16 or bf16; d a multiple of 8 from 8 to 256; also
// Nq, Nk >= 1, B*H <= 65535, and p.kernel a step of v2_forward_steps(), 0 = the final kernel, the earlier steps
// fp16 and d = 32, 64, 96, 128 only); otherwise writes a one-line reason to *why.
bool v2_mma_supports(const Problem& p, std::string* why);

// Q, K, V, O are __half or __nv_bfloat16 per p.dtype, layout [B, H, N, d] contiguous; LSE float [B, H, Nq].
// Launches forward step p.kernel and returns ""; or launches nothing and returns why (v2_mma_supports's reason).
std::string v2_forward_mma(const Problem& p, const void* Q, const void* K, const void* V, void* O, float* LSE,
                           cudaStream_t stream = 0);
