// v1.cu: FlashAttention-1 forward, one kernel, following Algorithm 1 of the paper line by line (the line numbers
// are in the comments). The symbols are the paper's: Q_i, K_j, V_j, O_i are blocks, S_ij the block of scores,
// m_tilde / P_tilde / l_tilde its row max, exponentials and row sums (m~_ij, P~_ij, l~_ij), m_i, l_i the running
// statistics, m_new, l_new their update. tau is the softmax scale and the causal mask comes from the paper's
// Algorithm 2; LSE = m + log(l) at the end is the extra output every stage of this project returns.
//
// Work split: one thread block of 256 threads per (batch, head). The two matrix products (S_ij = tau Q_i K_j^T
// and P~_ij V_j) are spread over all threads in 4 x 4 register tiles; the row statistics take one warp per row.
#include <algorithm>
#include <cmath>

#include "common/blocks.cuh"  // ceil_div, warp_max, warp_sum
#include "cuda_check.h"
#include "online_softmax/merge.cuh"
#include "v1.h"

namespace {

constexpr int THREADS = 256, WARPS = THREADS / 32;

__host__ __device__ inline int round_up(int a, int b) { return ceil_div(a, b) * b; }

// Leading dimension of an on-chip array with n columns: a multiple of 4, so every row starts 16-byte aligned for
// float4 access, but not a multiple of 8, so rows r and r + 4 (which the threads of one warp read at the same time
// in block_matmul) start in different banks and the read is one broadcast instead of two.
__host__ __device__ inline int padded(int n) { return round_up(n, 8) + 4; }

// Where each on-chip array lives in the block's shared memory, as offsets in floats. R is Br rounded up to 4, the
// row count of the 4 x 4 register tiles. The paper's budget counts Q_i, O_i, K_j, V_j; the kernel also keeps S_ij
// (which becomes P~_ij in place) and six statistics per row.
struct SharedLayout {
    int ld_d, ld_c;  // leading dimensions of the d-wide arrays (Q_i, O_i, V_j) and the Bc-wide ones (K_j^T, S_ij)
    int Q_i, O_i, K_jT, V_j, S_ij, m_i, l_i, m_tilde, l_tilde, m_new, l_new;
    int total;
};

__host__ __device__ inline SharedLayout shared_layout(int Br, int Bc, int d) {
    const int R = round_up(Br, 4);
    SharedLayout s;
    s.ld_d = padded(d);
    s.ld_c = padded(Bc);
    s.Q_i = 0;                         // [R][ld_d]
    s.O_i = s.Q_i + R * s.ld_d;        // [R][ld_d]
    s.K_jT = s.O_i + R * s.ld_d;       // [d][ld_c], K_j transposed so that Q_i K_j^T reads it by rows
    s.V_j = s.K_jT + d * s.ld_c;       // [Bc][ld_d]
    s.S_ij = s.V_j + Bc * s.ld_d;      // [R][ld_c]
    s.m_i = s.S_ij + R * s.ld_c;       // [R] each
    s.l_i = s.m_i + R;
    s.m_tilde = s.l_i + R;
    s.l_tilde = s.m_tilde + R;
    s.m_new = s.l_tilde + R;
    s.l_new = s.m_new + R;
    s.total = s.l_new + R;
    return s;  // every array starts at a multiple of 4 floats: R, ld_d and ld_c are multiples of 4
}

struct KernelArgs {
    const float *Q, *K, *V;
    float *O, *l, *m, *LSE;
    int Nq, Nk, d, Br, Bc;
    float tau;
    bool causal;
};

// C = A B computed by the whole thread block in 4 x 4 register tiles. A is rows4 x K, row-major with leading
// dimension lda, read one element at a time (the threads of a warp mostly share their 4 rows, so the reads are
// broadcasts). B is K x cols4, row-major with leading dimension ldb, read 4 columns at a time as one float4.
// rows4 and cols4 are multiples of 4. Thread t takes the register tiles t, t + THREADS, ... and hands each finished
// one to emit(r, c, acc): acc[x][y] is C[r + x][c + y].
template <class Emit>
__device__ void block_matmul(const float* A, int lda, const float* B, int ldb, int rows4, int cols4, int K, Emit emit) {
    const int tiles_per_row = cols4 / 4;
    for (int t = threadIdx.x; t < rows4 / 4 * tiles_per_row; t += THREADS) {
        const int r = t / tiles_per_row * 4, c = t % tiles_per_row * 4;
        float acc[4][4] = {};
#pragma unroll 4
        for (int k = 0; k < K; ++k) {
            const float4 b4 = *reinterpret_cast<const float4*>(&B[k * ldb + c]);
            const float b[4] = {b4.x, b4.y, b4.z, b4.w};
#pragma unroll
            for (int x = 0; x < 4; ++x) {
                const float a = A[(r + x) * lda + k];
#pragma unroll
                for (int y = 0; y < 4; ++y) acc[x][y] += a * b[y];
            }
        }
        emit(r, c, acc);
    }
}


__global__ void __launch_bounds__(THREADS, 1) flash_attention_1_kernel(KernelArgs a) {
    extern __shared__ __align__(16) float smem[];
    const int Nq = a.Nq, Nk = a.Nk, d = a.d, Br = a.Br, Bc = a.Bc;
    const SharedLayout L = shared_layout(Br, Bc, d);
    float *Q_i = smem + L.Q_i, *O_i = smem + L.O_i, *K_jT = smem + L.K_jT, *V_j = smem + L.V_j, *S_ij = smem + L.S_ij;
    float *m_i = smem + L.m_i, *l_i = smem + L.l_i, *m_tilde = smem + L.m_tilde, *l_tilde = smem + L.l_tilde;
    float *m_new = smem + L.m_new, *l_new = smem + L.l_new;

    // This block's head: Q, O are Nq x d, K, V are Nk x d, l, m and LSE have Nq entries.
    const size_t head = blockIdx.x;
    const float* Q = a.Q + head * Nq * d;
    const float* K = a.K + head * Nk * d;
    const float* V = a.V + head * Nk * d;
    float* O = a.O + head * Nq * d;
    float *l = a.l + head * Nq, *m = a.m + head * Nq, *LSE = a.LSE + head * Nq;
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int d4 = round_up(d, 4);  // the d-wide arrays are filled up to d4 columns, zeros past d

    // Line 2: O = 0, l = 0, m = -inf in device memory.
    for (int e = tid; e < Nq * d; e += THREADS) O[e] = 0.0f;
    for (int r = tid; r < Nq; r += THREADS) {
        l[r] = 0.0f;
        m[r] = -INFINITY;
    }
    __syncthreads();

    const int Tr = ceil_div(Nq, Br), Tc = ceil_div(Nk, Bc);  // line 3
    for (int j = 0; j < Tc; ++j) {                           // line 5
        const int col0 = j * Bc, cols = min(Bc, Nk - col0);  // K_j, V_j are key rows col0 .. col0 + cols - 1
        const int cols4 = round_up(cols, 4);

        // Line 6: load K_j, V_j from device memory to shared memory. K_j goes in transposed (K_jT[k][c] = K_j[c][k])
        // and zero-padded to cols4 keys, the width the register tiles of S_ij read.
        for (int e = tid; e < cols4 * d; e += THREADS) {
            const int c = e / d, k = e % d;
            K_jT[k * L.ld_c + c] = c < cols ? K[(col0 + c) * d + k] : 0.0f;
        }
        for (int e = tid; e < cols * d4; e += THREADS) {
            const int c = e / d4, k = e % d4;
            V_j[c * L.ld_d + k] = k < d ? V[(col0 + c) * d + k] : 0.0f;
        }
        __syncthreads();

        for (int i = 0; i < Tr; ++i) {                           // line 7
            const int row0 = i * Br, rows = min(Br, Nq - row0);  // Q_i, O_i are query rows row0 .. row0 + rows - 1
            const int rows4 = round_up(rows, 4);
            // Causal: a block none of whose rows sees any key of K_j is skipped, with no loads and no products.
            // i and j are the same in every thread, so the whole block skips together, barriers included.
            if (a.causal && causal_block_skipped(row0 + rows, col0, Nq, Nk)) continue;
            const bool mask = a.causal && causal_block_needs_mask(row0, col0 + cols, Nq, Nk);

            // Line 8: load Q_i, O_i, l_i, m_i. Q_i is zero-padded to rows4 rows, O_i to d4 columns.
            for (int e = tid; e < rows4 * d; e += THREADS) {
                const int r = e / d, k = e % d;
                Q_i[r * L.ld_d + k] = r < rows ? Q[(row0 + r) * d + k] : 0.0f;
            }
            for (int e = tid; e < rows * d4; e += THREADS) {
                const int r = e / d4, k = e % d4;
                O_i[r * L.ld_d + k] = k < d ? O[(row0 + r) * d + k] : 0.0f;
            }
            for (int r = tid; r < rows; r += THREADS) {
                l_i[r] = l[row0 + r];
                m_i[r] = m[row0 + r];
            }
            __syncthreads();

            // Line 9: S_ij = tau Q_i K_j^T, with -inf where the causal mask hides a key (diagonal blocks only).
            block_matmul(Q_i, L.ld_d, K_jT, L.ld_c, rows4, cols4, d, [&](int r, int c, const float (&acc)[4][4]) {
                for (int x = 0; x < 4; ++x) {
                    float s[4];
                    for (int y = 0; y < 4; ++y) {
                        const bool hidden = mask && col0 + c + y >= causal_key_end(row0 + r + x, Nq, Nk);
                        s[y] = hidden ? -INFINITY : a.tau * acc[x][y];
                    }
                    *reinterpret_cast<float4*>(&S_ij[(r + x) * L.ld_c + c]) = make_float4(s[0], s[1], s[2], s[3]);
                }
            });
            __syncthreads();

            // Lines 10-11, one warp per row: m~_ij = rowmax(S_ij), P~_ij = exp(S_ij - m~_ij) (in place of S_ij),
            // l~_ij = rowsum(P~_ij), then (m_new, l_new) = merge((m_i, l_i), (m~_ij, l~_ij)).
            for (int r = warp; r < rows; r += WARPS) {
                float* S_r = &S_ij[r * L.ld_c];
                float row_max = -INFINITY;
                for (int c = lane; c < cols; c += 32) row_max = fmaxf(row_max, S_r[c]);
                row_max = warp_max(row_max);
                // A hidden score gives 0, also in a row whose keys are all hidden here (row_max = -inf), where
                // exp(-inf - (-inf)) would be NaN.
                float row_sum = 0.0f;
                for (int c = lane; c < cols; c += 32) {
                    const float P_tilde = S_r[c] == -INFINITY ? 0.0f : expf(S_r[c] - row_max);
                    S_r[c] = P_tilde;
                    row_sum += P_tilde;
                }
                row_sum = warp_sum(row_sum);
                if (lane == 0) {
                    m_tilde[r] = row_max;
                    l_tilde[r] = row_sum;
                    const SoftmaxState next = merge({m_i[r], l_i[r]}, {row_max, row_sum});
                    m_new[r] = next.m;
                    l_new[r] = next.l;
                }
            }
            __syncthreads();

            // Line 12, on chip: O_i <- diag(l_new)^-1 (diag(l_i) e^(m_i - m_new) O_i + e^(m~_ij - m_new) P~_ij V_j).
            // rescale_factor is e^(m_part - m_new), 0 for a part that has seen no key yet (m_part = -inf).
            // EXERCISE(fa1-inner-loop-kernel): line 12 on chip: P~_ij V_j by block_matmul, and O_i rescaled and normalised
            block_matmul(S_ij, L.ld_c, V_j, L.ld_d, rows4, d4, cols, [&](int r, int c, const float (&PV)[4][4]) {
                for (int x = 0; x < 4; ++x) {
                    const int row = r + x;
                    if (row >= rows) break;
                    const float O_scale = l_i[row] * rescale_factor(m_i[row], m_new[row]);
                    const float PV_scale = rescale_factor(m_tilde[row], m_new[row]);
                    // A row that has seen no key at all so far has l_new = 0 and keeps O_i = 0.
                    const float inv_l_new = l_new[row] > 0.0f ? 1.0f / l_new[row] : 0.0f;
                    float4& o = *reinterpret_cast<float4*>(&O_i[row * L.ld_d + c]);
                    o.x = (O_scale * o.x + PV_scale * PV[x][0]) * inv_l_new;
                    o.y = (O_scale * o.y + PV_scale * PV[x][1]) * inv_l_new;
                    o.z = (O_scale * o.z + PV_scale * PV[x][2]) * inv_l_new;
                    o.w = (O_scale * o.w + PV_scale * PV[x][3]) * inv_l_new;
                }
            });
            // END EXERCISE
            __syncthreads();

            // Lines 12-13: write O_i, and l_i <- l_new, m_i <- m_new, to device memory.
            for (int e = tid; e < rows * d; e += THREADS) {
                const int r = e / d, k = e % d;
                O[(row0 + r) * d + k] = O_i[r * L.ld_d + k];
            }
            for (int r = tid; r < rows; r += THREADS) {
                l[row0 + r] = l_new[r];
                m[row0 + r] = m_new[r];
            }
            __syncthreads();  // the next Q_i, O_i, l_i, m_i (or K_j, V_j) overwrite what was just read
        }
    }

    // LSE = m + log(l), -inf for a row that saw no key. l and m were last written by other threads.
    __syncthreads();
    for (int r = tid; r < Nq; r += THREADS) LSE[r] = log_sum_exp({m[r], l[r]});
}

// The GPU's, or an H100's where there is none (the CPU model's tiles then are an H100's).
size_t device_smem_per_block() { return gpu_available() ? gpu_smem_per_block() : H100_SMEM_PER_BLOCK; }

}  // namespace

V1Tiles v1_paper_tiles(int M, int d) {
    // EXERCISE(fa1-block-sizes): Algorithm 1, line 1: the block sizes Bc and Br from the on-chip budget M and d
    const int Bc = ceil_div(M, 4 * d), Br = std::min(Bc, d);
    // END EXERCISE
    return {M, M, Br, Bc, size_t(shared_layout(Br, Bc, d).total) * sizeof(float)};
}

// The paper's M counts the four d-wide blocks K_j, V_j, Q_i, O_i (Bc x d floats at most each, so about M / 4d).
// The kernel also keeps S_ij (Br x Bc floats), six statistics per row and the padding of shared_layout on chip, so
// the paper's sizes for M = all of shared memory do not fit (for d = 128 on an H100 they need over 300 KB). Lower M
// one K/V row (4d floats, so Bc drops by exactly one) at a time until everything fits.
V1Tiles v1_tiles(const Problem& p, size_t smem_per_block) {
    const int available = int(smem_per_block / sizeof(float));
    int M = available;
    while (v1_paper_tiles(M, p.d).smem_bytes > smem_per_block && M > 4 * p.d) M -= 4 * p.d;
    V1Tiles t = v1_paper_tiles(M, p.d);
    t.M_available = available;
    return t;
}

V1Tiles v1_tiles(const Problem& p) { return v1_tiles(p, device_smem_per_block()); }

size_t v1_workspace_bytes(const Problem& p) { return 2 * p.lse_elems() * sizeof(float); }

std::string v1_unsupported(const Problem& p) {
    if (p.dtype != DType::fp32) return "the v1 stage is fp32 only";
    if (p.d > 128) return "head dim " + std::to_string(p.d) + " is not supported (v1 takes d from 1 to 128)";
    return "";
}

void v1_forward(const Problem& p, const ForwardArgs& a) {
    const V1Tiles t = v1_tiles(p);
    // Above 48 KB a kernel must opt in to its dynamic shared memory: once, at the first launch, for all of it.
    static const cudaError_t opted_in = cudaFuncSetAttribute(
        flash_attention_1_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(device_smem_per_block()));
    CUDA_CHECK(opted_in);
    float* l = static_cast<float*>(a.workspace);
    float* m = l + p.lse_elems();
    const KernelArgs k{static_cast<const float*>(a.q), static_cast<const float*>(a.k), static_cast<const float*>(a.v),
                       static_cast<float*>(a.o), l, m, a.lse, p.Nq, p.Nk, p.d, t.Br, t.Bc, p.resolved_scale(), p.causal};
    flash_attention_1_kernel<<<p.B * p.H, THREADS, t.smem_bytes>>>(k);
    CUDA_CHECK_LAUNCH();
}
