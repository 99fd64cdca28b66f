// forward_mma.h: the FlashAttention-2 forward pass on tensor cores (mma.sync m16n8k16), fp16 and bf16.
//
// Inputs and outputs follow tests/problem.h: Q, O are [B, H, Nq, d] and K, V [B, Hk, Nk, d] contiguous, of __half
// or __nv_bfloat16 as p.dtype says; LSE is float [B, H, Nq] (a packed batch: [T, H, d], [Tk, Hk, d], [H, Tq]).
// Products accumulate in fp32 and the softmax statistics (running max m_i, running sum l_i) are fp32.
#pragma once
#include <cuda_runtime.h>  // before problem.h, which uses __host__ __device__
#include <string>

#include "harness.h"  // ForwardArgs (and problem.h)

// The head-dim tile the forward runs for head dim d: the smallest of 32, 48, 56, 64, 96, 128, 176, 192, 240, 256 that
// holds d, for d a multiple of 8 from 8 to 256 (columns d..tile-1 are zeros in shared memory and never stored); 0 for
// any other d.
int v2_mma_head_dim_tile(int d);

// Returns true when (p.d, p.dtype, p.kernel) is supported (fp16 or bf16; d a multiple of 8 from 8 to 256; also
// Nq, Nk >= 1, B*H <= 65535, and p.kernel a step of v2_forward_steps(), 0 = the final kernel, the earlier steps
// fp16 and d = 32, 64, 96, 128 only and without the extensions); otherwise writes a one-line reason to *why.
bool v2_mma_supports(const Problem& p, std::string* why);

// The dynamic shared memory (bytes) one block of the kernel p runs takes (its head-dim tile and step), for
// v2_smem_refusal: Q_i and two K/V buffers of padded rows, P as well in step 1.
size_t v2_mma_smem_bytes(const Problem& p);

// "" when a block of the tensor-core kernels p runs (the forward's, or with `backward` the backward's,
// v2_backward_mma_smem_bytes) fits in smem_per_block bytes of shared memory (the GPU's opt-in limit a block,
// cudaDevAttrMaxSharedMemoryPerBlockOptin), else one line with what it needs and what the GPU has. A100s and the
// 99 KiB GPUs of sm_86 / sm_89 have less than the Hopper GPUs the tiles were chosen on. Both passes' callers ask it
// before a launch: v2_unsupported and v2_backward_unsupported (v2.h) for the programs, the PyTorch bridge for its
// operators (a kernel asking for more than the GPU allows fails in cudaFuncSetAttribute, which ends the process).
std::string v2_smem_refusal(const Problem& p, bool backward, size_t smem_per_block);

// a.q, a.k, a.v, a.o are __half or __nv_bfloat16 per p.dtype; a.lse float. The extensions (p.has_extensions())
// read a.bias (--bias) and a.cu_seqlens_q/k (--seqlens) and run in the final kernel. Launches forward step p.kernel
// and returns ""; or launches nothing and returns why (v2_mma_supports's reason, or a missing extension input).
std::string v2_forward_mma(const Problem& p, const ForwardArgs& a, cudaStream_t stream = 0);
