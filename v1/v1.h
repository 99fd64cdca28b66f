// v1.h: the third rung. FlashAttention-1, the forward pass exactly as Algorithm 1 of Dao et al. (2022), fp32.
//
// The Nq x Nk score matrix never reaches device memory. K and V are cut into Tc blocks of Bc rows, Q and O into
// Tr blocks of Br rows. The outer loop walks the K/V blocks j (K_j, V_j loaded on chip once); the inner loop walks
// the Q blocks i, reading Q_i, O_i and the row statistics l_i, m_i from device memory, folding in the softmax of
// S_ij = tau Q_i K_j^T with merge() (online_softmax/merge.cuh), and writing O_i, l_i, m_i back. One thread block
// per (batch, head), as in the paper. Device-memory traffic is Theta(N^2 d^2 / M) for an on-chip budget of M floats.
#pragma once
#include <string>
#include <vector>

#include "harness.h"

// The block sizes of Algorithm 1, line 1: Bc = ceil(M / 4d), Br = min(Bc, d), for an on-chip budget of M floats.
struct V1Tiles {
    int M_available;    // the device's shared memory per block, in floats
    int M;              // the budget the block sizes come from (M <= M_available, see v1_tiles)
    int Br, Bc;         // rows of a Q_i / O_i block, rows of a K_j / V_j block
    size_t smem_bytes;  // shared memory the kernel takes with these block sizes (every on-chip array, padded)
};
// The paper's block sizes for a budget of M floats, with M_available = M.
V1Tiles v1_paper_tiles(int M, int d);
// The block sizes the kernel uses on a device with smem_per_block bytes of (opt-in) shared memory per block.
V1Tiles v1_tiles(const Problem& p, size_t smem_per_block);
// The same for the device in use (cudaDevAttrMaxSharedMemoryPerBlockOptin), or for an H100 when there is no GPU,
// so that the CPU model and the tests count with the numbers of the machine the project is measured on.
V1Tiles v1_tiles(const Problem& p);
constexpr size_t H100_SMEM_PER_BLOCK = 227 * 1024;  // cudaDevAttrMaxSharedMemoryPerBlockOptin on an H100

// Causal masking by blocks (bottom-right aligned, see problem.h). The block of query rows [row0, row_end) and keys
// [col0, col_end) is skipped when even its last row sees none of its keys, and needs a mask (it straddles the
// diagonal) when its first row does not see all of them. Every other block is computed without a mask.
__host__ __device__ inline bool causal_block_skipped(int row_end, int col0, int Nq, int Nk) {
    return col0 >= causal_key_end(row_end - 1, Nq, Nk);
}
__host__ __device__ inline bool causal_block_needs_mask(int row0, int col_end, int Nq, int Nk) {
    return col_end > causal_key_end(row0, Nq, Nk);
}

// Forward: Q, K, V, O fp32 [B,H,N,d]; the workspace holds the running statistics l and m ([B,H,Nq] each).
size_t v1_workspace_bytes(const Problem& p);
std::string v1_unsupported(const Problem& p);  // fp32 only, d from 1 to 128
void v1_forward(const Problem& p, const ForwardArgs& a);

// CPU model with the same loops (v1/model.cu), for block sizes Br, Bc, counting device-memory traffic.
void v1_model_forward(const Problem& p, const HostTensors& in, int Br, int Bc, std::vector<float>* o,
                      std::vector<float>* lse, ModelTraffic* t);

// The stage as the harness runs it (stage.cu): online_softmax below it.
const Stage& v1_stage();
