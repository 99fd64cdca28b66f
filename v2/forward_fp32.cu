// forward_fp32.cu: the FlashAttention-2 forward pass (Dao, 2023, Algorithm 1) in fp32 on CUDA cores.
// The `// line N` comments are the lines of that Algorithm 1 (FlashAttention-2's, not FlashAttention-1's, which
// v1/v1.cu follows). Symbols as in v1.cu, with three renames: v1's tau is `scale`; its m~_ij, l~_ij (the tile's row
// max and row sum) are m_tile, l_tile; m_i, l_i live together in ml[r] (online_softmax/merge.cuh). O_i stays
// unnormalised (the paper's O~_i) until line 12.
//
// The smallest change from FlashAttention-1 that is FlashAttention-2: one thread block owns one query tile Q_i
// (Br rows of one (batch, head)), loads it once, and walks every K/V tile K_j, V_j (Bc rows each):
//
//     S_ij  = scale * Q_i K_j^T                           (masked entries -inf)
//     m_new = max(m_i, rowmax(S_ij))
//     P_ij  = exp(S_ij - m_new)
//     O_i   = exp(m_i - m_new) * O_i + P_ij V_j           O_i is not divided by l_i inside the loop
//     (m_i, l_i) = merge((m_i, l_i), (m_new, rowsum(P_ij)))
//
// and at the end writes O_i / l_i and LSE_i = m_i + log l_i, once each. O_i, m_i and l_i live in registers for the
// whole walk. The grid is (Tr query tiles, B*H).
//
// Work split. 4 warps; warp w owns query rows 16w..16w+15 of Q_i, so no warp ever needs another warp's m_i or l_i.
// Inside a warp, lane = 8 * rg + cg: the lane owns the 4 rows 16w + 4rg + {0..3} and the columns
// 32g + 4cg + {0..3} (g = 0, 1, ...) of both S_ij (Bc columns) and O_i (D columns): a 4 x Bc/8 micro-tile of S_ij
// and a 4 x D/8 micro-tile of O_i. Each row belongs to the 8 lanes of one rg, so row max and row sum are 3 shuffles.
// With this layout each step of a product reads one float4 of Q (or P) and Bc/32 (or D/32) float4 of K (or V) from
// shared memory and does 4 x Bc/8 (or 4 x D/8) multiply-adds with them.
//
// Shared memory. Q_i and K_j are stored transposed (Qt[k][r], Kt[k][c]) so that the 4 rows or 4 columns a lane needs
// at one k are one aligned float4. V_j is stored as it is (V[c][k]). P_ij goes through shared memory once, each warp
// its own slice stored transposed (Pt[c][r]), because P V needs P_ij by rows of V_j, i.e. by S's columns, which are
// spread over the 8 lanes of a row. Every row of every tile is padded by 4 floats: rows stay 16-byte aligned for
// float4 reads, and the 8 float4 of one read instruction fall in 8 different bank groups.
//
// Causal (bottom-right aligned): K/V tiles entirely above the diagonal are never loaded (the walk stops at the last
// key the tile's last row sees); only tiles that cross the diagonal, and a last tile cut by Nk, apply the mask.
//
// Head dims: compiled for D = 32, 64, 96, 128; a problem with d < D zero-fills columns d..D-1 of Q, K, V in
// shared memory (they add nothing to S_ij, and give O_i columns that are never stored).
#include <cmath>

#include "common/blocks.cuh"
#include "cuda_check.h"
#include "online_softmax/merge.cuh"
#include "v2.h"

namespace {

constexpr int Br = 64;                    // query rows of Q_i per block
constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kWarpRows = Br / kWarps;    // 16 query rows per warp: 4 row groups of 4
constexpr int kPad = 4;                   // floats of padding at the end of every shared row

// Bc: 64 keys per tile up to D = 64, 32 above, so that two or three blocks (8 or 12 warps) fit on an SM.
constexpr int bc_for(int D) { return D <= 64 ? 64 : 32; }
constexpr int bucket_for(int d) { return d <= 32 ? 32 : d <= 64 ? 64 : d <= 96 ? 96 : 128; }

template <int D>
struct alignas(16) Smem {
    static constexpr int Bc = bc_for(D);
    float Qt[D][Br + kPad];                      // Q_i transposed: Qt[k][r]
    float Kt[D][Bc + kPad];                      // K_j transposed: Kt[k][c]
    float V[Bc][D + kPad];                       // V_j:            V[c][k]
    float Pt[kWarps][Bc][kWarpRows + kPad];      // P_ij, per warp, transposed: Pt[w][c][r]
};

__device__ inline void unpack(float4 v, float (&x)[4]) { x[0] = v.x, x[1] = v.y, x[2] = v.z, x[3] = v.w; }

template <int D, bool kCausal>
__global__ void __launch_bounds__(kThreads) flash2_forward_fp32(const float* Q, const float* K, const float* V,
                                                                float* O, float* LSE, int Nq, int Nk, int d,
                                                                float scale) {
    constexpr int Bc = Smem<D>::Bc;
    constexpr int kSCols = Bc / 8, kOCols = D / 8;  // columns of S_ij and of O_i per lane
    extern __shared__ float4 smem_raw[];
    Smem<D>& sm = *reinterpret_cast<Smem<D>*>(smem_raw);

    // The last Q tiles of a causal problem see the most keys: run them first so the short ones fill the tail.
    const int i = gridDim.x - 1 - blockIdx.x;  // line 3: the loop over Q tiles is the grid (lines 1-2: the tiling)
    const int q0 = i * Br;
    const long long bh = blockIdx.y;
    const float* K_bh = K + bh * Nk * d;
    const float* V_bh = V + bh * Nk * d;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, rg = lane / 8, cg = lane % 8;
    const int r0 = warp * kWarpRows + rg * 4;  // this lane's first row within Q_i

    // line 4: Q_i -> shared memory, once. Rows past Nq and columns past d are zeros.
    for (int e = threadIdx.x; e < Br * D; e += kThreads) {
        const int r = e / D, k = e % D;
        sm.Qt[k][r] = (q0 + r < Nq && k < d) ? Q[(bh * Nq + q0 + r) * d + k] : 0.0f;
    }

    // K/V tiles this Q tile walks: all of them, or (causal) up to the last key its last row sees.
    // EXERCISE(causal-skip-kernel): one past the last key this Q tile visits; causal: none above the diagonal
    const int kv_end = kCausal ? min(Nk, causal_key_end(min(q0 + Br, Nq) - 1, Nq, Nk)) : Nk;
    // END EXERCISE
    const int Tc = kv_end > 0 ? ceil_div(kv_end, Bc) : 0;

    float O_i[4][kOCols] = {};  // line 5
    SoftmaxState ml[4];  // (m_i, l_i) of this lane's 4 rows, the same in all 8 lanes of a row
#pragma unroll
    for (int r = 0; r < 4; ++r) ml[r] = {-INFINITY, 0.0f};

    for (int j = 0; j < Tc; ++j) {  // line 6
        const int key0 = j * Bc;
        __syncthreads();  // every warp is done with K_{j-1}, V_{j-1} and its own P slice
        // line 7: K_j, V_j -> shared memory
        for (int e = threadIdx.x; e < Bc * D; e += kThreads) {
            const int c = e / D, k = e % D;
            const bool inside = key0 + c < Nk && k < d;  // zeros past Nk: 0 * V, never 0 * garbage (NaN)
            sm.Kt[k][c] = inside ? K_bh[(long long)(key0 + c) * d + k] : 0.0f;
            sm.V[c][k] = inside ? V_bh[(long long)(key0 + c) * d + k] : 0.0f;
        }
        __syncthreads();  // K_j, V_j (and, the first time, Q_i) are in shared memory

        // line 8: S_ij = scale * Q_i K_j^T, this lane's 4 x kSCols micro-tile
        float S[4][kSCols] = {};
#pragma unroll 8
        for (int k = 0; k < D; ++k) {
            float q[4];
            unpack(*reinterpret_cast<const float4*>(&sm.Qt[k][r0]), q);
#pragma unroll
            for (int g = 0; g < Bc / 32; ++g) {
                float kk[4];
                unpack(*reinterpret_cast<const float4*>(&sm.Kt[k][32 * g + 4 * cg]), kk);
#pragma unroll
                for (int r = 0; r < 4; ++r)
#pragma unroll
                    for (int u = 0; u < 4; ++u) S[r][4 * g + u] += q[r] * kk[u];
            }
        }
        // The mask is needed only by a tile cut by Nk or crossing the diagonal (the test is the same for the block).
        const bool needs_mask = key0 + Bc > Nk || (kCausal && key0 + Bc > causal_key_end(q0, Nq, Nk));
#pragma unroll
        for (int r = 0; r < 4; ++r)
#pragma unroll
            for (int c = 0; c < kSCols; ++c) {
                const int key = key0 + 32 * (c / 4) + 4 * cg + c % 4;
                const bool masked = needs_mask && (key >= Nk || (kCausal && key >= causal_key_end(q0 + r0 + r, Nq, Nk)));
                S[r][c] = masked ? -INFINITY : scale * S[r][c];
            }

        // line 9, online softmax row by row: P_ij = exp(S_ij - m_new), l_i updated; line 10's rescale of O_i by
        // exp(m_i - m_new).
#pragma unroll
        for (int r = 0; r < 4; ++r) {
            // EXERCISE(warp-softmax-fp32): row r's online softmax over its 8 lanes (m_tile, P, l_tile, O_i rescaled, ml[r])
            float m_tile = -INFINITY;
#pragma unroll
            for (int c = 0; c < kSCols; ++c) m_tile = fmaxf(m_tile, S[r][c]);
            m_tile = warp_max<8>(m_tile);  // the 8 lanes of this row group
            const float m_new = fmaxf(ml[r].m, m_tile);
            float l_tile = 0.0f;
#pragma unroll
            for (int c = 0; c < kSCols; ++c) {
                S[r][c] = rescale_factor(S[r][c], m_new);  // exp(S - m_new); 0 where masked, even if m_new = -inf
                l_tile += S[r][c];
            }
            l_tile = warp_sum<8>(l_tile);
            const float alpha = rescale_factor(ml[r].m, m_new);
#pragma unroll
            for (int c = 0; c < kOCols; ++c) O_i[r][c] *= alpha;
            ml[r] = merge(ml[r], {m_new, l_tile});
            // END EXERCISE
        }

        // line 10: P_ij -> this warp's slice of shared memory, transposed; then O_i += P_ij V_j.
        float (*Pt)[kWarpRows + kPad] = sm.Pt[warp];
#pragma unroll
        for (int c = 0; c < kSCols; ++c)
            *reinterpret_cast<float4*>(&Pt[32 * (c / 4) + 4 * cg + c % 4][4 * rg]) =
                make_float4(S[0][c], S[1][c], S[2][c], S[3][c]);
        __syncwarp();  // P_ij of the whole warp is written (the lanes read each other's columns)
#pragma unroll 4
        for (int c = 0; c < Bc; ++c) {
            float pr[4];
            unpack(*reinterpret_cast<const float4*>(&Pt[c][4 * rg]), pr);
#pragma unroll
            for (int g = 0; g < D / 32; ++g) {
                float v[4];
                unpack(*reinterpret_cast<const float4*>(&sm.V[c][32 * g + 4 * cg]), v);
#pragma unroll
                for (int r = 0; r < 4; ++r)
#pragma unroll
                    for (int u = 0; u < 4; ++u) O_i[r][4 * g + u] += pr[r] * v[u];
            }
        }
    }

    // lines 12-15: O_i / l_i and LSE_i = m_i + log l_i, written once. A row that saw no key has l_i = 0: O = 0 and
    // LSE = -inf.
#pragma unroll
    for (int r = 0; r < 4; ++r) {
        const int row = q0 + r0 + r;
        if (row >= Nq) continue;
        const float inv_l = ml[r].l > 0.0f ? 1.0f / ml[r].l : 0.0f;
#pragma unroll
        for (int c = 0; c < kOCols; ++c) {
            const int col = 32 * (c / 4) + 4 * cg + c % 4;
            if (col < d) O[(bh * Nq + row) * d + col] = O_i[r][c] * inv_l;
        }
        if (cg == 0) LSE[bh * Nq + row] = log_sum_exp(ml[r]);
    }
}

template <int D>
void launch(const Problem& p, const ForwardArgs& a) {
    auto kernel = p.causal ? flash2_forward_fp32<D, true> : flash2_forward_fp32<D, false>;
    constexpr int smem = sizeof(Smem<D>);  // above the default 48 KB for D >= 64: must be opted in
    // Once per instantiation, at its first launch: later (timed) launches do no host work but the launch itself.
    static const bool attributes_set = [] {
        CUDA_CHECK(cudaFuncSetAttribute(flash2_forward_fp32<D, true>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
        CUDA_CHECK(cudaFuncSetAttribute(flash2_forward_fp32<D, false>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
        return true;
    }();
    (void)attributes_set;
    const dim3 grid(ceil_div(p.Nq, Br), p.B * p.H);
    kernel<<<grid, kThreads, smem>>>(static_cast<const float*>(a.q), static_cast<const float*>(a.k),
                                     static_cast<const float*>(a.v), static_cast<float*>(a.o), a.lse, p.Nq, p.Nk,
                                     p.d, p.resolved_scale());
    CUDA_CHECK_LAUNCH();
}

}  // namespace

V2Tiles v2_fp32_forward_tiles(int d) { return {Br, bc_for(bucket_for(d))}; }

std::string v2_fp32_unsupported(const Problem& p) {
    if (p.d < 1 || p.d > kV2MaxHeadDim)
        return "v2 fp32 supports head dims 1 to " + std::to_string(kV2MaxHeadDim) + ", got " + std::to_string(p.d);
    if (long(p.B) * p.H > 65535) return "v2 fp32 needs B*H <= 65535 (one grid row per head)";
    return "";
}

std::string v2_forward_fp32(const Problem& p, const ForwardArgs& a) {
    if (std::string why = v2_fp32_unsupported(p); !why.empty()) return why;
    switch (bucket_for(p.d)) {
        case 32: launch<32>(p, a); return "";
        case 64: launch<64>(p, a); return "";
        case 96: launch<96>(p, a); return "";
        case 128: launch<128>(p, a); return "";
        default: return "v2 fp32 forward has no instantiation for head dim " + std::to_string(p.d);
    }
}
