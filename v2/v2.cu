// v2.cu: FlashAttention-2 by data type: fp32 runs the CUDA-core kernels (forward_fp32.cu, backward_fp32.cu),
// fp16 and bf16 the tensor-core kernels (forward_mma.cu, backward_mma.cu). Same arguments, same conventions.
#include "backward_mma.h"
#include "forward_mma.h"
#include "v2.h"

std::string v2_unsupported(const Problem& p) {
    if (p.dtype == DType::fp32) return v2_fp32_unsupported(p);
    std::string why;
    return v2_mma_supports(p, &why) ? "" : why;
}

std::string v2_backward_unsupported(const Problem& p) {
    if (p.dtype == DType::fp32) return v2_fp32_unsupported(p);
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
