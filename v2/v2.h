// v2.h: FlashAttention-2 (Dao, 2023). The fp32 kernels on CUDA cores (forward_fp32.cu, backward_fp32.cu), their CPU
// models (model.cu), and v2_forward / v2_backward, which pick the fp32 kernels or the tensor-core ones
// (forward_mma.h, backward_mma.h) by p.dtype (v2.cu).
//
// What changes from FlashAttention-1 (v1/): the loops swap. FA-1 walks K/V tiles outside and Q tiles inside, so O,
// m and l go back to device memory after every K/V tile. FA-2 gives each thread block one Q tile Q_i and walks all
// K/V tiles inside, so O_i, m_i and l_i stay on chip and O_i is normalised and written once; the Q tiles are the
// grid, which is also what fills the GPU when B*H is small.
#pragma once
#include <string>
#include <vector>

#include "harness.h"

// Tile sizes: Br query rows of a Q tile Q_i, Bc key rows of a K/V tile K_j, V_j.
struct V2Tiles {
    int Br, Bc;
};

// ------------------------------------------------------------------------------------------- fp32 (CUDA cores)
// Head dims 1..128 run in four compiled buckets (32, 64, 96, 128); columns past d are zero-filled and never stored.
constexpr int kV2MaxHeadDim = 128;
V2Tiles v2_fp32_forward_tiles(int d);
V2Tiles v2_fp32_backward_tiles();
std::string v2_fp32_unsupported(const Problem& p);  // "" when the fp32 kernels accept p
// Q, K, V, O fp32; no workspace. Both passes launch and return "", or launch nothing and return why not.
std::string v2_forward_fp32(const Problem& p, const ForwardArgs& a);
// Workspace: D_i = rowsum(dO_i * O_i), one float per query row. dQ is accumulated in place (see backward_fp32.cu).
size_t v2_backward_fp32_workspace_bytes(const Problem& p);
std::string v2_backward_fp32(const Problem& p, const BackwardArgs& a);

// ---------------------------------------------------------------------------------------- CPU models (model.cu)
// The same loops as the fp32 kernels, with the same tiles, in plain C++; device memory is Hbm (counted).
void v2_model_forward(const Problem& p, const HostTensors& in, std::vector<float>* o, std::vector<float>* lse,
                      ModelTraffic* t);
void v2_model_backward(const Problem& p, const HostTensors& in, const std::vector<float>& o,
                       const std::vector<float>& lse, std::vector<float>* dq, std::vector<float>* dk,
                       std::vector<float>* dv, ModelTraffic* t);
// The backward model with two things the GPU decides: the order in which the K/V-tile blocks run (a permutation
// drawn from block_order_seed; 0 = in order), which orders the atomic additions into dQ and so changes its last
// bits; and deterministic_dq: dQ from a second pass over the Q tiles instead (each dQ_i summed over the K/V tiles
// in order and written once, no atomics: the same bits in every block order, for 2 more products per tile pair).
// v2_model_backward is (seed 0, atomics).
void v2_model_backward_scheduled(const Problem& p, const HostTensors& in, const std::vector<float>& o,
                                 const std::vector<float>& lse, std::vector<float>* dq, std::vector<float>* dk,
                                 std::vector<float>* dv, ModelTraffic* t, uint64_t block_order_seed,
                                 bool deterministic_dq, std::vector<float>* dbias = nullptr);

// ---------------------------------------------------------------------- tensor-core optimisation steps (--kernel)
// Each step adds one idea to the one before; the last is the final kernel (p.kernel = 0 runs it too). The steps
// before the last are compiled for fp16 only. Forward: forward_mma.cu; backward: backward_mma.cu.
const std::vector<KernelStep>& v2_forward_steps();
const std::vector<KernelStep>& v2_backward_steps();

// ------------------------------------------------------------------------------------- dispatch by p.dtype (v2.cu)
// fp32 -> the CUDA-core kernels above; fp16/bf16 -> v2_forward_mma / v2_backward_mma. The *_unsupported functions
// also refuse --kernel with fp32 (only the tensor-core path has steps), a step out of range, and fp16/bf16 on a GPU
// older than sm_80. v2_forward / v2_backward never exit: called with a problem *_unsupported refuses, they throw
// std::invalid_argument with that reason and launch nothing.
std::string v2_unsupported(const Problem& p);           // forward: "" or one line saying why not
std::string v2_backward_unsupported(const Problem& p);  // backward: likewise
// Part of both: v2_smem_refusal (forward_mma.h), with the GPU's gpu_smem_per_block().
size_t v2_workspace_bytes(const Problem& p);
void v2_forward(const Problem& p, const ForwardArgs& a);
size_t v2_backward_workspace_bytes(const Problem& p);
// Call only when v2_backward_unsupported(p) is empty (the stage program checks it before --backward runs).
void v2_backward(const Problem& p, const BackwardArgs& a);

// The stage as the harness runs it (stage.cu): v1 below it (the naive backward for --backward --check).
const Stage& v2_stage();
