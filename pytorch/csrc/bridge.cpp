// bridge.cpp: the v2 tensor-core kernels (v2/forward_mma.cu, v2/backward_mma.cu, compiled from the same sources as
// bin/v2) called from PyTorch. Host C++ only: it checks the tensors, describes them as a Problem (tests/problem.h),
// allocates outputs and workspace through PyTorch's allocator and launches on PyTorch's current stream.
// Every refusal is a TORCH_CHECK, which PyTorch turns into a Python exception carrying our message.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include <string>

#include "v2/backward_mma.h"
#include "v2/forward_mma.h"

namespace {

// q [B, H, Nq, d], k and v [B, H, Nk, d]: same dtype (fp16 or bf16), same CUDA device, contiguous.
Problem problem_of(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool causal, double scale) {
    for (const at::Tensor* t : {&q, &k, &v}) {
        TORCH_CHECK(t->is_cuda(), "flash_scratch.attention: q, k and v must be CUDA tensors");
        TORCH_CHECK(t->dim() == 4, "flash_scratch.attention: q, k and v must be 4-D [B, H, N, d], got ", t->dim(), "-D");
        TORCH_CHECK(t->is_contiguous(), "flash_scratch.attention: q, k and v must be contiguous in [B, H, N, d] "
                                        "order (call .contiguous())");
        TORCH_CHECK(t->scalar_type() == q.scalar_type(), "flash_scratch.attention: q, k and v must have one dtype");
        TORCH_CHECK(t->device() == q.device(), "flash_scratch.attention: q, k and v must be on one device");
    }
    TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16,
                "flash_scratch.attention: dtype must be float16 or bfloat16 (tensor cores), got ", q.scalar_type());
    TORCH_CHECK(k.sizes() == v.sizes(), "flash_scratch.attention: k and v must have the same shape");
    TORCH_CHECK(q.size(0) == k.size(0) && q.size(1) == k.size(1) && q.size(3) == k.size(3),
                "flash_scratch.attention: q and k must agree in B, H and d");
    TORCH_CHECK(scale >= 0.0, "flash_scratch.attention: scale must be positive (or None for 1/sqrt(d))");
    for (int64_t s : {q.size(0), q.size(1), q.size(2), k.size(2), q.size(3)})
        TORCH_CHECK(s >= 1 && s <= INT32_MAX, "flash_scratch.attention: every dimension must be in [1, 2^31-1]");
    TORCH_CHECK(q.numel() <= INT32_MAX && k.numel() <= INT32_MAX,
                "flash_scratch.attention: a tensor of more than 2^31-1 elements is not supported");
    Problem p;
    p.B = int(q.size(0)), p.H = int(q.size(1)), p.Nq = int(q.size(2)), p.Nk = int(k.size(2)), p.d = int(q.size(3));
    p.causal = causal;
    p.scale = float(scale);  // 0: 1/sqrt(d)
    p.dtype = q.scalar_type() == at::kHalf ? DType::fp16 : DType::bf16;
    return p;
}

// Returns O [B, H, Nq, d] (q's dtype) and LSE [B, H, Nq] (float32, natural log; -inf for a row that sees no key).
std::vector<at::Tensor> forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool causal,
                                double scale) {
    const Problem p = problem_of(q, k, v, causal, scale);
    std::string why;
    TORCH_CHECK(v2_mma_supports(p, &why), "flash_scratch.attention: ", why);
    const c10::cuda::CUDAGuard guard(q.device());
    at::Tensor o = at::empty_like(q);
    at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
    why = v2_forward_mma(p, q.data_ptr(), k.data_ptr(), v.data_ptr(), o.data_ptr(), lse.data_ptr<float>(),
                         at::cuda::getCurrentCUDAStream());
    TORCH_CHECK(why.empty(), "flash_scratch.attention: ", why);
    return {o, lse};
}

// dO, O as the forward returned them; returns dQ, dK, dV.
std::vector<at::Tensor> backward(const at::Tensor& dO, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const at::Tensor& o, const at::Tensor& lse, bool causal, double scale) {
    const Problem p = problem_of(q, k, v, causal, scale);
    for (const at::Tensor* t : {&dO, &o})
        TORCH_CHECK(t->sizes() == q.sizes() && t->scalar_type() == q.scalar_type() && t->is_contiguous() &&
                        t->device() == q.device(),
                    "flash_scratch.attention backward: dO and O must match q (shape, dtype, device, contiguous)");
    TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.is_contiguous() && lse.numel() == int64_t(p.lse_elems()),
                "flash_scratch.attention backward: LSE must be the float32 [B, H, Nq] tensor the forward returned");
    std::string why;
    TORCH_CHECK(v2_backward_mma_supports(p, &why), "flash_scratch.attention backward: ", why);
    const c10::cuda::CUDAGuard guard(q.device());
    at::Tensor dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
    at::Tensor ws = at::empty({int64_t(v2_backward_mma_workspace_bytes(p))}, q.options().dtype(at::kByte));
    why = v2_backward_mma(p, q.data_ptr(), k.data_ptr(), v.data_ptr(), o.data_ptr(), lse.data_ptr<float>(),
                          dO.data_ptr(), dq.data_ptr(), dk.data_ptr(), dv.data_ptr(), ws.data_ptr(), nullptr, nullptr,
                          nullptr, nullptr, at::cuda::getCurrentCUDAStream());
    TORCH_CHECK(why.empty(), "flash_scratch.attention backward: ", why);
    return {dq, dk, dv};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("forward", &forward, "FlashAttention-2 forward (v2 tensor-core kernel): returns [O, LSE]");
    m.def("backward", &backward, "FlashAttention-2 backward (v2 tensor-core kernel): returns [dQ, dK, dV]");
}
