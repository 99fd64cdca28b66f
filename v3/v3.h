// v3.h: FlashAttention-3 (Shah et al., 2024) forward on Hopper (sm_90a), fp16 and bf16, head dims 64, 128 and 256.
//
// What changes from FlashAttention-2 (v2/): the loops and the math are the same (one CTA per Q tile, the K/V tiles
// walked inside, online softmax in the log2 domain); what changes is who moves the data and how the products run.
// TMA copies whole tiles with one instruction and signals an mbarrier; wgmma runs 64-row products from shared memory
// asynchronously for a whole warpgroup; warp specialisation gives the copies to a producer warpgroup and the
// registers to the consumers; and the softmax of one tile hides behind products (ping-pong between two consumer
// warpgroups, and the next tile's product inside one). docs/v3.md walks through it, forward.cu is the kernel.
#pragma once
#include <cuda_runtime.h>  // cudaStream_t

#include <cstdint>
#include <string>
#include <vector>

#include "harness.h"

// ---------------------------------------------------------------------------------------------- steps (--kernel)
// p.kernel = k runs step k (1-based; 0 = the final step). The steps before the final one are compiled for fp16 only.
const std::vector<KernelStep>& v3_forward_steps();
// The step a launch runs: p.kernel, or for p.kernel = 0 the final kernel's choice: the last step, except at d = 64,
// causal, Nq < 4096, where step 8's Q tiles of 128 rows beat step 9's 192 (on the H200 step 9 measured 15-16% slower
// there and 4-16% faster everywhere else at d = 64; docs/v3.md "Step 9"). Step 8 is then compiled in bf16 too.
int v3_step_of(const Problem& p);

// What a step is made of, as the kernel template sees it at compile time (forward.cu, Features<kStep>), for the
// host and the tests: warpgroups, tile sizes and the pipeline depth.
struct V3Config {
    bool warp_specialised;  // a producer warpgroup issues the copies (step 2 on)
    bool ping_pong;         // the consumer warpgroups take turns at the tensor cores (step 3 on)
    bool overlap;           // Algorithm 2's waits: softmax of tile j between the waits for S_j and P V (step 4 on)
    bool tma_store;         // O leaves through shared memory and a TMA store (steps 5 and 6)
    bool persistent;        // a CTA per SM walks many Q tiles, the next one's loads under the last one (step 7 on)
    bool poly_exp;          // some of the softmax's exponentials by a polynomial on the FMA pipe (step 8 on)
    bool lazy_rescale;      // a row's max moves only by more than 2^8: most tiles skip O's rescale (step 10 on)
    int consumers;          // consumer warpgroups (64 query rows each): 1, 2, or 3 from step 9 at d = 64
    int producer_regs, consumer_regs;  // registers per thread after setmaxnreg (warp-specialised steps)
    int threads;            // 128 per warpgroup, producer included
    int Br, Bc, stages;     // Q tile rows, K/V tile rows, K/V ring depth (2; 3 or 4 from step 6 on)
    int smem_bytes;         // dynamic shared memory the launch asks for
};
// "" and *c filled when (step, d) is compiled (step 1..steps, d = 64, 128 or 256), else one line saying why not.
std::string v3_config(int step, int d, V3Config* c);

// -------------------------------------------------------------------------------------------- tensor maps (host)
// One tensor [B*H, N, d] of 16-bit elements seen by TMA as a 3-D tensor (column, row, head), so a box that runs past
// row N of a head is zero-filled on load (and dropped on store) instead of reading the next head's rows.
struct V3TensorMapShape {
    uint64_t dims[3];     // d, N, B*H (innermost first, as cuTensorMapEncodeTiled wants)
    uint64_t strides[2];  // bytes from one row to the next, from one head to the next (multiples of 16)
    uint32_t box[3];      // 64 columns (128 bytes: the widest box a 128-byte swizzle allows), box_rows, 1
    uint32_t box_bytes;   // bytes one copy delivers, out-of-bounds zeros included: what expect_tx must announce
};
// "" and *s filled, or one line saying why TMA cannot describe the tensor (d not a multiple of 64, box too tall).
std::string v3_tensor_map_shape(int heads, int rows, int d, int box_rows, V3TensorMapShape* s);

// --------------------------------------------------------------------------------------------- the stage entry
std::string v3_unsupported(const Problem& p);  // "" when bin/v3 accepts p (fp16/bf16, d = 64, 128 or 256, ...)
// "" on a Hopper GPU (sm_90), else one line saying why the kernels cannot run here (the stage runs its CPU model).
std::string v3_gpu_unusable();
// Launches step p.kernel on the current device, on `stream` (the PyTorch bridge passes its current stream; the
// programs the default one), and returns "", or launches nothing and returns why not (the reason v3_unsupported
// gives, no Hopper GPU, or the driver's tensor-map encoder unavailable). Refusals never exit; a CUDA error in the
// launch itself does (CUDA_CHECK), as in every stage. The pointers of ForwardArgs must be 16-byte aligned (TMA).
std::string v3_forward_launch(const Problem& p, const ForwardArgs& a, cudaStream_t stream = 0);
// The harness-facing form: throws std::invalid_argument with v3_forward_launch's reason when it launched nothing.
void v3_forward(const Problem& p, const ForwardArgs& a);

// The stage as the harness runs it (stage.cu): v2 below it, v2's CPU model as its CPU model.
const Stage& v3_stage();
