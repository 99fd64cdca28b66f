// backward_fp32.cu: the FlashAttention-2 backward pass (Dao, 2023, Algorithm 2) in fp32 on CUDA cores, written
// to be read: one thread per output element of each small product, operands from shared memory.
//
//   pre-pass   D_i = rowsum(dO_i * O_i)                       (rowsum_dO_O, common/blocks.cuh)
//   main       one block per K/V tile K_j, V_j (Bc keys) of one (batch, head), kept in shared memory, with dK_j
//              and dV_j accumulated in registers; the block walks the Q tiles Q_i (Br rows) that see any key of K_j:
//                 S_ij  = scale * Q_i K_j^T          P_ij = exp(S_ij - LSE_i)   (recomputed, never stored)
//                 dV_j += P_ij^T dO_i                dP_ij = dO_i V_j^T
//                 dS_ij = P_ij * (dP_ij - D_i)
//                 dK_j += scale * dS_ij^T Q_i        dQ_i += scale * dS_ij K_j  (atomicAdd into dQ)
//              and writes dK_j, dV_j once at the end.
//
// Why atomics for dQ, rather than a second kernel over Q tiles: the other way needs S_ij (hence P_ij) and dP_ij
// again, two of the five products computed twice (7 instead of 5, as in backward_mma.cu); here every block adds its Br x d share of dQ_i with fp32 atomicAdd,
// which lands in L2. dQ is fp32 already, so it is its own accumulator: zeroed first, no workspace, no copy. The price:
// the order of the additions varies from run to run, so dQ may differ between runs in the last bits.
//
// The `// line N` comments are the lines of Algorithm 2 (the backward pass) of the FlashAttention-2 paper.
//
// Causal (bottom-right aligned): Q tiles whose rows all end before key j*Bc are skipped; the mask is applied per
// element. Fully masked rows (LSE = -inf) give P = 0 and so contribute nothing.
#include <cmath>

#include "common/blocks.cuh"
#include "cuda_check.h"
#include "v2.h"

namespace {

constexpr int Br = 32, Bc = 32;  // query rows of Q_i, key rows of K_j
constexpr int kThreads = 256;
constexpr int kAccPerThread = Bc * kV2MaxHeadDim / kThreads;  // elements of dK_j (and of dV_j) a thread owns

// Shared memory: K_j, V_j, Q_i, dO_i with rows of d + 1 floats (the 32 threads of a warp read 32 different rows at
// one column: with an odd pitch they hit 32 different banks), P_ij and dS_ij with rows of Bc + 1, then LSE_i, D_i.
size_t smem_bytes(int d) { return (2 * Bc * (d + 1) + 2 * Br * (d + 1) + 2 * Br * (Bc + 1) + 2 * Br) * sizeof(float); }

__global__ void __launch_bounds__(kThreads) flash2_backward_fp32(const float* Q, const float* K, const float* V,
                                                                 const float* dO, const float* LSE, const float* D,
                                                                 float* dQ, float* dK, float* dV, int Nq, int Nk, int d,
                                                                 float scale, bool causal) {
    extern __shared__ float smem[];
    const int pitch = d + 1, s_pitch = Bc + 1;
    float* K_j = smem;
    float* V_j = K_j + Bc * pitch;
    float* Q_i = V_j + Bc * pitch;
    float* dO_i = Q_i + Br * pitch;
    float* P_ij = dO_i + Br * pitch;
    float* dS_ij = P_ij + Br * s_pitch;
    float* L_i = dS_ij + Br * s_pitch;
    float* D_i = L_i + Br;

    const int j = blockIdx.x, key0 = j * Bc;  // line 5: the grid walks the K/V tiles
    const long long bh = blockIdx.y;
    for (int e = threadIdx.x; e < Bc * d; e += kThreads) {  // line 6
        const int c = e / d, k = e % d;
        const bool inside = key0 + c < Nk;
        K_j[c * pitch + k] = inside ? K[(bh * Nk + key0 + c) * d + k] : 0.0f;
        V_j[c * pitch + k] = inside ? V[(bh * Nk + key0 + c) * d + k] : 0.0f;
    }
    // dK_j and dV_j: element e = threadIdx.x + t * kThreads of the Bc x d tile, for e < Bc * d.
    float dK_j[kAccPerThread] = {}, dV_j[kAccPerThread] = {};  // line 7

    // The first query row that sees key0 (causal: row i sees key0 when key0 < causal_key_end(i)).
    const int first_row = causal ? max(0, key0 + Nq - Nk) : 0;
    for (int q0 = first_row / Br * Br; q0 < Nq; q0 += Br) {  // line 8 (line 9: the loads below; O_i is in D_i)
        __syncthreads();  // the previous Q tile is fully used (and, the first time, K_j, V_j are loaded)
        for (int e = threadIdx.x; e < Br * d; e += kThreads) {
            const int r = e / d, k = e % d;
            const bool inside = q0 + r < Nq;
            Q_i[r * pitch + k] = inside ? Q[(bh * Nq + q0 + r) * d + k] : 0.0f;
            dO_i[r * pitch + k] = inside ? dO[(bh * Nq + q0 + r) * d + k] : 0.0f;
        }
        for (int r = threadIdx.x; r < Br; r += kThreads) {
            L_i[r] = q0 + r < Nq ? LSE[bh * Nq + q0 + r] : -INFINITY;  // a row past Nq is treated as fully masked
            D_i[r] = q0 + r < Nq ? D[bh * Nq + q0 + r] : 0.0f;
        }
        __syncthreads();

        // lines 10, 11, 13, 14: P_ij = exp(scale * Q_i K_j^T - LSE_i) and dS_ij = P_ij * (dO_i V_j^T - D_i), one
        // (r, c) per thread
        for (int e = threadIdx.x; e < Br * Bc; e += kThreads) {
            const int r = e / Bc, c = e % Bc;
            float s = 0.0f, dp = 0.0f;
            for (int k = 0; k < d; ++k) {
                s += Q_i[r * pitch + k] * K_j[c * pitch + k];
                dp += dO_i[r * pitch + k] * V_j[c * pitch + k];
            }
            // EXERCISE(backward-ds-kernel): P_ij from LSE_i (0 where masked or the row saw no key), dS_ij = P_ij (dP_ij - D_i)
            const int key = key0 + c;
            const bool visible = key < Nk && (!causal || key < causal_key_end(q0 + r, Nq, Nk)) && L_i[r] != -INFINITY;
            const float p = visible ? expf(scale * s - L_i[r]) : 0.0f;
            P_ij[r * s_pitch + c] = p;
            dS_ij[r * s_pitch + c] = p * (dp - D_i[r]);
            // END EXERCISE
        }
        __syncthreads();

        // lines 12 and 16: dV_j += P_ij^T dO_i and dK_j += dS_ij^T Q_i (scale applied at the end), one (c, k) per
        // accumulator
#pragma unroll
        for (int t = 0; t < kAccPerThread; ++t) {
            const int e = threadIdx.x + t * kThreads;
            if (e >= Bc * d) break;  // no barrier in this loop
            const int c = e / d, k = e % d;
            for (int r = 0; r < Br; ++r) {
                dV_j[t] += P_ij[r * s_pitch + c] * dO_i[r * pitch + k];
                dK_j[t] += dS_ij[r * s_pitch + c] * Q_i[r * pitch + k];
            }
        }
        // line 15: dQ_i += scale * dS_ij K_j: every K/V block adds to the same rows, hence atomicAdd
        for (int e = threadIdx.x; e < Br * d; e += kThreads) {
            const int r = e / d, k = e % d;
            if (q0 + r >= Nq) continue;
            float acc = 0.0f;
            for (int c = 0; c < Bc; ++c) acc += dS_ij[r * s_pitch + c] * K_j[c * pitch + k];
            atomicAdd(&dQ[(bh * Nq + q0 + r) * d + k], scale * acc);
        }
    }

    // line 18: dK_j, dV_j written once. Keys no query sees (causal) get zeros.
#pragma unroll
    for (int t = 0; t < kAccPerThread; ++t) {
        const int e = threadIdx.x + t * kThreads;
        if (e >= Bc * d) break;
        const int c = e / d, k = e % d;
        if (key0 + c >= Nk) continue;
        dK[(bh * Nk + key0 + c) * d + k] = scale * dK_j[t];
        dV[(bh * Nk + key0 + c) * d + k] = dV_j[t];
    }
}

}  // namespace

V2Tiles v2_fp32_backward_tiles() { return {Br, Bc}; }

size_t v2_backward_fp32_workspace_bytes(const Problem& p) { return p.lse_elems() * sizeof(float); }

std::string v2_backward_fp32(const Problem& p, const BackwardArgs& a) {
    if (std::string why = v2_fp32_unsupported(p); !why.empty()) return why;
    const long long rows = (long long)p.B * p.H * p.Nq;
    float* D = static_cast<float*>(a.workspace);
    rowsum_dO_O(static_cast<const float*>(a.dO), static_cast<const float*>(a.o), D, rows, p.d);  // line 4
    CUDA_CHECK(cudaMemsetAsync(a.dq, 0, p.q_elems() * sizeof(float)));  // line 3; all-zero bytes are 0.0f
    // 75 KB at d = 128: above the default 48 KB, must be opted in. Once, at the first launch, for the largest d.
    static const cudaError_t attribute_set = cudaFuncSetAttribute(
        flash2_backward_fp32, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem_bytes(kV2MaxHeadDim)));
    CUDA_CHECK(attribute_set);
    const int smem = int(smem_bytes(p.d));
    const dim3 grid(ceil_div(p.Nk, Bc), p.B * p.H);
    flash2_backward_fp32<<<grid, kThreads, smem>>>(
        static_cast<const float*>(a.q), static_cast<const float*>(a.k), static_cast<const float*>(a.v),
        static_cast<const float*>(a.dO), a.lse, D, static_cast<float*>(a.dq), static_cast<float*>(a.dk),
        static_cast<float*>(a.dv), p.Nq, p.Nk, p.d, p.resolved_scale(), p.causal);
    CUDA_CHECK_LAUNCH();
    return "";
}
