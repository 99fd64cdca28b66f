// v2.cu: FlashAttention-2 by data type: fp32 runs the CUDA-core kernels (forward_fp32.cu, backward_fp32.cu),
// fp16 and bf16 the tensor-core kernels (forward_mma.cu, backward_mma.cu). Same arguments, same conventions.
#include <stdexcept>

#include "backward_mma.h"
#include "common/philox.cuh"  // dropout_runs
#include "forward_mma.h"
#include "v2.h"

namespace {

// What both passes refuse before their own limits: --kernel on fp32, tensor cores older than sm_80, a dropout
// probability the mask cannot run (the command line refuses it first; a caller of the library may not).
std::string common_refusal(const Problem& p) {
    if (!dropout_runs(p.dropout))
        return "v2 --dropout P needs 0 <= P < 0.998 (it runs rounded to a multiple of 1/256), got " +
               std::to_string(p.dropout);
    if (p.dtype == DType::fp32 && p.kernel != 0)
        return "v2 --kernel picks a tensor-core step; fp32 has one kernel per pass (use --dtype fp16)";
    const int sm = gpu_available() ? gpu_compute_capability() : 0;  // 0: no GPU, the CPU model runs
    if (p.dtype != DType::fp32 && sm != 0 && sm < 80)
        return std::string("v2 ") + dtype_name(p.dtype) + " needs tensor cores of sm_80 or newer (mma.sync m16n8k16, "
               "cp.async; found sm_" + std::to_string(sm) + ": use --dtype fp32)";
    return "";
}

}  // namespace

std::string v2_unsupported(const Problem& p) {
    if (std::string why = common_refusal(p); !why.empty()) return why;
    if (p.dtype == DType::fp32) return v2_fp32_unsupported(p);
    std::string why;
    if (!v2_mma_supports(p, &why)) return why;
    return gpu_available() ? v2_smem_refusal(p, false, gpu_smem_per_block()) : "";
}

std::string v2_backward_unsupported(const Problem& p) {
    if (std::string why = common_refusal(p); !why.empty()) return why;
    if (p.dtype == DType::fp32)
        return p.deterministic    ? "v2 --deterministic is a tensor-core backward (use --dtype fp16 or bf16); the fp32 "
                                    "backward adds dQ with atomics"
               : p.dO_token_major ? "v2 fp32 backward reads dO as [B, H, Nq, d] only"
                                  : v2_fp32_unsupported(p);
    std::string why;
    if (!v2_backward_mma_supports(p, &why)) return why;
    return gpu_available() ? v2_smem_refusal(p, true, gpu_smem_per_block()) : "";
}

size_t v2_workspace_bytes(const Problem&) { return 0; }

// Both passes have them in the tensor-core kernels (forward_mma.cu, backward_mma.cu), not in the fp32 ones (their
// CPU model has them: the stage program refuses fp32 with extensions on a GPU only).
const char* const kNoFp32Extensions = "v2 fp32 (CUDA cores) does not have --kv-heads, --window, --dropout, --bias, "
                                      "--alibi or --seqlens (--dtype fp16 or bf16 runs them on tensor cores)";

void v2_forward(const Problem& p, const ForwardArgs& a) {
    if (p.has_extensions() && p.dtype == DType::fp32) throw std::invalid_argument(kNoFp32Extensions);
    if (std::string why = v2_unsupported(p); !why.empty()) throw std::invalid_argument(why);
    const std::string why = p.dtype == DType::fp32 ? v2_forward_fp32(p, a) : v2_forward_mma(p, a);
    if (!why.empty()) throw std::invalid_argument(why);
}

size_t v2_backward_workspace_bytes(const Problem& p) {
    return p.dtype == DType::fp32 ? v2_backward_fp32_workspace_bytes(p) : v2_backward_mma_workspace_bytes(p);
}

void v2_backward(const Problem& p, const BackwardArgs& a) {
    if (p.has_extensions() && p.dtype == DType::fp32) throw std::invalid_argument(kNoFp32Extensions);
    if (std::string why = v2_backward_unsupported(p); !why.empty()) throw std::invalid_argument(why);
    const std::string why = p.dtype == DType::fp32 ? v2_backward_fp32(p, a)
                                                   : v2_backward_mma(p, a.q, a.k, a.v, a.o, a.lse, a.dO, a.dq, a.dk,
                                                                     a.dv, a.workspace, a.bias, a.dbias,
                                                                     a.cu_seqlens_q, a.cu_seqlens_k);
    if (!why.empty()) throw std::invalid_argument(why);
}
