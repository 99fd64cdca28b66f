// v2.cu: FlashAttention-2 by data type: fp32 runs the CUDA-core kernels (forward_fp32.cu, backward_fp32.cu),
// fp16 and bf16 the tensor-core kernels (forward_mma.cu, backward_mma.cu). Same arguments, same conventions.
#include "backward_mma.h"
#include "forward_mma.h"
#include "v2.h"

// fp16/bf16 run mma.sync m16n8k16 and cp.async, which need sm_80 or newer ("" when there is no GPU: the CPU model
// runs then).
static std::string tensor_cores_missing() {
    if (!gpu_available() || gpu_compute_capability() >= 80) return "";
    return "fp16 and bf16 need tensor cores of sm_80 or newer (A100, RTX 30xx, H100, ...); this GPU, " + gpu_name() +
           ", is sm_" + std::to_string(gpu_compute_capability()) + ": use --dtype fp32";
}

std::string v2_unsupported(const Problem& p) {
    if (p.dtype == DType::fp32) return v2_fp32_unsupported(p);
    if (const std::string why = tensor_cores_missing(); !why.empty()) return why;
    std::string why;
    return v2_mma_supports(p, &why) ? "" : why;
}

std::string v2_backward_unsupported(const Problem& p) {
    if (p.dtype == DType::fp32) return v2_fp32_unsupported(p);
    if (const std::string why = tensor_cores_missing(); !why.empty()) return why;
    std::string why;
    return v2_backward_mma_supports(p, &why) ? "" : why;
}

size_t v2_workspace_bytes(const Problem&) { return 0; }

void v2_forward(const Problem& p, const ForwardArgs& a) {
    if (p.dtype == DType::fp32)
        v2_forward_fp32(p, a);
    else
        v2_forward_mma(p, a.q, a.k, a.v, a.o, a.lse);
}

size_t v2_backward_workspace_bytes(const Problem& p) {
    return p.dtype == DType::fp32 ? v2_backward_fp32_workspace_bytes(p) : v2_backward_mma_workspace_bytes(p);
}

void v2_backward(const Problem& p, const BackwardArgs& a) {
    if (p.dtype == DType::fp32)
        v2_backward_fp32(p, a);
    else
        v2_backward_mma(p, a.q, a.k, a.v, a.o, a.lse, a.dO, a.dq, a.dk, a.dv, a.workspace);
}
