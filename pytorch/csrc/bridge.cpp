// bridge.cpp: the project's kernels as PyTorch operators, defined and given their CUDA kernels in C++ (TORCH_LIBRARY),
// so that a call goes from Python into the dispatcher without a Python-level operator wrapper or Python kernel:
//
//   flash_scratch::attention_forward(q, k, v, causal, scale, deterministic=False) -> (O, LSE)
//       CUDA: v3 (v3/forward.cu, the FlashAttention-3 kernel) on a Hopper GPU for fp16/bf16 and d = 64 or 128,
//       v2 (v2/forward_mma.cu) otherwise. `deterministic` is not used by the forward (it is deterministic); it is
//       in the schema so that the autograd formula can hand it to the backward.
//   flash_scratch::attention_backward(dO, q, k, v, O, LSE, causal, scale, deterministic) -> (dQ, dK, dV)
//       CUDA: v2 (v2/backward_mma.cu); deterministic picks its dQ kernel without atomics (same bits every call).
//   Autograd: attention_forward's autograd kernel (class Attention, a torch::autograd::Function) calls
//   attention_backward, so a training call never enters Python (docs/pytorch.md measures the host time).
//   Fake (shapes only, for torch.compile): in Python, flash_scratch/__init__.py (set_python_module says where).
//
// The kernels are compiled from the same sources as bin/v2 and bin/v3 (pytorch/flash_scratch/_build.py). Host C++
// only here: it checks the tensors, describes them as a Problem (tests/problem.h), allocates outputs and workspace
// through PyTorch's allocator and launches on PyTorch's current stream. Every refusal is a TORCH_CHECK, which
// PyTorch turns into a Python exception carrying our message.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <atomic>
#include <cstdint>
#include <string>
#include <tuple>

#include "v2/backward_mma.h"
#include "v2/forward_mma.h"
#ifdef FLASH_SCRATCH_V3  // defined by _build.py when it compiles v3 (the GPU is a Hopper: sm_90a code)
#include "v3/v3.h"
#endif

namespace {

using at::Tensor;

// The kernels copy rows in 16-byte pieces (v2: cp.async, v3: TMA), from addresses that must be multiples of 16.
// PyTorch's allocator gives such addresses; a view that starts inside a tensor may not.
bool aligned16(const Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

// q [B, H, Nq, d], k and v [B, H, Nk, d]: same dtype (fp16 or bf16), same CUDA device, contiguous.
Problem problem_of(const Tensor& q, const Tensor& k, const Tensor& v, bool causal, double scale) {
    for (const Tensor* t : {&q, &k, &v}) {
        TORCH_CHECK_VALUE(t->is_cuda(), "flash_scratch.attention: q, k and v must be on a CUDA device, got ",
                          t->device());
        // The rank goes into the message as a string: an integer streamed here (c10::str) ended the process with a
        // segmentation fault on the H200 (docs/pytorch.md, "The 3-D crash").
        TORCH_CHECK_VALUE(t->dim() == 4, "flash_scratch.attention: q, k and v must be 4-D [B, H, N, d], got ",
                          std::to_string(t->dim()), "-D");
        TORCH_CHECK_VALUE(t->is_contiguous(), "flash_scratch.attention: q, k and v must be contiguous in "
                                              "[B, H, N, d] order (call .contiguous() after a transpose)");
        TORCH_CHECK_TYPE(t->scalar_type() == q.scalar_type(), "flash_scratch.attention: q, k and v must have one dtype");
        TORCH_CHECK_VALUE(t->device() == q.device(), "flash_scratch.attention: q, k and v must be on one device");
        TORCH_CHECK_VALUE(aligned16(*t), "flash_scratch.attention: q, k and v must start at 16-byte aligned addresses "
                                         "(a view at an odd offset: call .clone())");
    }
    TORCH_CHECK_TYPE(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16,
                     "flash_scratch.attention: dtype must be float16 or bfloat16 (tensor cores), got ", q.scalar_type());
    TORCH_CHECK_VALUE(k.sizes() == v.sizes(), "flash_scratch.attention: k and v must have the same shape");
    TORCH_CHECK_VALUE(q.size(0) == k.size(0) && q.size(1) == k.size(1) && q.size(3) == k.size(3),
                      "flash_scratch.attention: q and k must agree in B, H and d");
    TORCH_CHECK_VALUE(scale >= 0.0, "flash_scratch.attention: scale must be positive (or None for 1/sqrt(d))");
    for (int64_t s : {q.size(0), q.size(1), q.size(2), k.size(2), q.size(3)})
        TORCH_CHECK_VALUE(s >= 1 && s <= INT32_MAX, "flash_scratch.attention: every dimension must be in [1, 2^31-1]");
    TORCH_CHECK_VALUE(q.numel() <= INT32_MAX && k.numel() <= INT32_MAX,
                      "flash_scratch.attention: a tensor of more than 2^31-1 elements is not supported");
    Problem p;
    p.B = int(q.size(0)), p.H = int(q.size(1)), p.Nq = int(q.size(2)), p.Nk = int(k.size(2)), p.d = int(q.size(3));
    p.causal = causal;
    p.scale = float(scale);  // 0: 1/sqrt(d)
    p.dtype = q.scalar_type() == at::kHalf ? DType::fp16 : DType::bf16;
    return p;
}

// flash_scratch.set_hopper_forward(False) sends every forward to v2 (to compare the two; the tests and
// bench_attention.py do). On by default.
std::atomic<bool> g_hopper_forward{true};

// "" when a block of the v2 kernels of p (the forward's, or the backward's) fits in the shared memory a block may
// have on q's GPU, else why not (v2_smem_refusal): asked before the launch, whose cudaFuncSetAttribute would
// otherwise fail and end the process (an A100 at head dims above 192, any backward on sm_86 / sm_89).
std::string v2_smem_why_not(const Problem& p, const Tensor& q, bool backward) {
    const cudaDeviceProp* prop = at::cuda::getDeviceProperties(q.get_device());  // cached by PyTorch
    return v2_smem_refusal(p, backward, prop->sharedMemPerBlockOptin);
}

// "" when the forward of p on these tensors runs v3, else why it runs v2.
std::string why_not_v3(const Problem& p, const Tensor& q) {
#ifdef FLASH_SCRATCH_V3
    if (!g_hopper_forward.load(std::memory_order_relaxed)) return "v3 turned off (set_hopper_forward(False))";
    const cudaDeviceProp* prop = at::cuda::getDeviceProperties(q.get_device());  // cached by PyTorch
    if (prop->major != 9 || prop->minor != 0)
        return "v3 runs on sm_90 (Hopper), this tensor's GPU is sm_" + std::to_string(prop->major * 10 + prop->minor);
    if (std::string why = v3_unsupported(p); !why.empty()) return why;
    return v3_gpu_unusable();
#else
    (void)p, (void)q;
    return "v3 not built (it is built when the GPU is a Hopper, sm_90)";
#endif
}

// Returns O [B, H, Nq, d] (q's dtype) and LSE [B, H, Nq] (float32, natural log; -inf for a row that sees no key).
// Both kernels write LSE in that layout and unit, so either forward feeds the v2 backward.
std::tuple<Tensor, Tensor> forward(const Tensor& q, const Tensor& k, const Tensor& v, bool causal, double scale,
                                   bool /*deterministic: the backward's*/) {
    const Problem p = problem_of(q, k, v, causal, scale);
    const bool hopper = why_not_v3(p, q).empty();
    std::string why;
    TORCH_CHECK_VALUE(hopper || v2_mma_supports(p, &why), "flash_scratch.attention: ", why);
    if (!hopper) why = v2_smem_why_not(p, q, false);
    TORCH_CHECK_VALUE(why.empty(), "flash_scratch.attention: ", why);
    const c10::cuda::CUDAGuard guard(q.device());
    Tensor o = at::empty_like(q);
    Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
#ifdef FLASH_SCRATCH_V3
    if (hopper) {
        why = v3_forward_launch(p, {q.data_ptr(), k.data_ptr(), v.data_ptr(), o.data_ptr(), lse.data_ptr<float>(),
                                    /*workspace=*/nullptr},
                                stream);
        TORCH_CHECK(why.empty(), "flash_scratch.attention (v3 forward): ", why);
        return {o, lse};
    }
#endif
    why = v2_forward_mma(p, {q.data_ptr(), k.data_ptr(), v.data_ptr(), o.data_ptr(), lse.data_ptr<float>(),
                             /*workspace=*/nullptr},
                         stream);
    TORCH_CHECK(why.empty(), "flash_scratch.attention: ", why);
    return {o, lse};
}

// dO, O and LSE as the forward returned them; returns dQ, dK, dV. dO may have any strides: a [B, H, Nq, d] view of
// a contiguous [B, Nq, H, d] tensor (what autograd hands back when a model reshapes O through O.transpose(1, 2)) is
// read in place (Problem::dO_token_major), any other layout is copied to a contiguous one first.
std::tuple<Tensor, Tensor, Tensor> backward(const Tensor& dO_in, const Tensor& q, const Tensor& k, const Tensor& v,
                                            const Tensor& o, const Tensor& lse, bool causal, double scale,
                                            bool deterministic) {
    Problem p = problem_of(q, k, v, causal, scale);
    p.deterministic = deterministic;
    Tensor dO = dO_in;
    if (!dO.is_contiguous()) {
        p.dO_token_major = dO.dim() == 4 && dO.transpose(1, 2).is_contiguous();
        if (!p.dO_token_major || !v2_backward_mma_supports(p, nullptr)) {
            p.dO_token_major = false;
            dO = dO.contiguous();
        }
    }
    for (const Tensor* t : std::initializer_list<const Tensor*>{&dO, &o})
        TORCH_CHECK_VALUE(t->sizes() == q.sizes() && t->scalar_type() == q.scalar_type() && t->device() == q.device() &&
                              aligned16(*t),
                          "flash_scratch.attention backward: dO and O must match q (shape, dtype, device, 16-byte "
                          "aligned)");
    TORCH_CHECK_VALUE(o.is_contiguous(), "flash_scratch.attention backward: O must be contiguous, as the forward "
                                         "returned it");
    TORCH_CHECK_VALUE(lse.scalar_type() == at::kFloat && lse.is_contiguous() && lse.device() == q.device() &&
                          lse.numel() == int64_t(p.lse_elems()),
                      "flash_scratch.attention backward: LSE must be the float32 [B, H, Nq] tensor the forward returned");
    std::string why;
    TORCH_CHECK_VALUE(v2_backward_mma_supports(p, &why), "flash_scratch.attention backward: ", why);
    why = v2_smem_why_not(p, q, true);
    TORCH_CHECK_VALUE(why.empty(), "flash_scratch.attention backward: ", why);
    const c10::cuda::CUDAGuard guard(q.device());
    Tensor dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
    Tensor ws = at::empty({int64_t(v2_backward_mma_workspace_bytes(p))}, q.options().dtype(at::kByte));
    why = v2_backward_mma(p, q.data_ptr(), k.data_ptr(), v.data_ptr(), o.data_ptr(), lse.data_ptr<float>(),
                          dO.data_ptr(), dq.data_ptr(), dk.data_ptr(), dv.data_ptr(), ws.data_ptr(), nullptr, nullptr,
                          nullptr, nullptr, at::cuda::getCurrentCUDAStream());
    TORCH_CHECK(why.empty(), "flash_scratch.attention backward: ", why);
    return {dq, dk, dv};
}

// The operators as the dispatcher sees them: calling through these (not the functions above) lets a tracer
// (torch.compile's AOTAutograd) record them in its graphs.
const auto& forward_op() {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("flash_scratch::attention_forward", "")
                               .typed<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, bool,
                                                                 double, bool)>();
    return op;
}
const auto& backward_op() {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("flash_scratch::attention_backward", "")
                               .typed<std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                                         const Tensor&, const Tensor&, const Tensor&,
                                                                         bool, double, bool)>();
    return op;
}

// Autograd for attention_forward: saves q, k, v, O and LSE; the backward runs attention_backward. LSE is an output
// without a gradient.
class Attention : public torch::autograd::Function<Attention> {
public:
    static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const Tensor& q,
                                                  const Tensor& k, const Tensor& v, bool causal, double scale,
                                                  bool deterministic) {
        const at::AutoDispatchBelowADInplaceOrView below_autograd;  // the call below goes to the CUDA kernel
        auto [o, lse] = forward_op().call(q, k, v, causal, scale, deterministic);
        ctx->save_for_backward({q, k, v, o, lse});
        ctx->saved_data["causal"] = causal;
        ctx->saved_data["scale"] = scale;
        ctx->saved_data["deterministic"] = deterministic;
        ctx->mark_non_differentiable({lse});
        return {o, lse};
    }

    static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                   torch::autograd::variable_list grads) {
        const torch::autograd::variable_list s = ctx->get_saved_variables();
        // Autograd may hand over a gradient with any strides (a transpose, an expand): backward() takes any.
        auto [dq, dk, dv] = backward_op().call(grads[0], s[0], s[1], s[2], s[3], s[4],
                                               ctx->saved_data["causal"].toBool(), ctx->saved_data["scale"].toDouble(),
                                               ctx->saved_data["deterministic"].toBool());
        return {dq, dk, dv, Tensor(), Tensor(), Tensor()};  // nothing for causal, scale, deterministic
    }
};

std::tuple<Tensor, Tensor> forward_autograd(const Tensor& q, const Tensor& k, const Tensor& v, bool causal,
                                            double scale, bool deterministic) {
    const torch::autograd::variable_list out = Attention::apply(q, k, v, causal, scale, deterministic);
    return {out[0], out[1]};
}

}  // namespace

TORCH_LIBRARY(flash_scratch, m) {
    m.set_python_module("flash_scratch");  // where the fake (shape-only) implementations are registered
    m.def("attention_forward(Tensor q, Tensor k, Tensor v, bool causal, float scale, bool deterministic=False) "
          "-> (Tensor, Tensor)");
    m.def("attention_backward(Tensor dO, Tensor q, Tensor k, Tensor v, Tensor o, Tensor lse, bool causal, "
          "float scale, bool deterministic) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(flash_scratch, CUDA, m) {
    m.impl("attention_forward", &forward);
    m.impl("attention_backward", &backward);
}

// The same functions for CPU tensors, where their first check refuses them with our message ("must be on a CUDA
// device") instead of the dispatcher's "could not run ... with arguments from the 'CPU' backend".
TORCH_LIBRARY_IMPL(flash_scratch, CPU, m) {
    m.impl("attention_forward", &forward);
    m.impl("attention_backward", &backward);
}

TORCH_LIBRARY_IMPL(flash_scratch, Autograd, m) {
    m.impl("attention_forward", &forward_autograd);
}

// Python helpers beside the operators (flash_scratch re-exports them).
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def(
        "forward_kernel",
        [](const Tensor& q, const Tensor& k, const Tensor& v) {
            const std::string why = why_not_v3(problem_of(q, k, v, false, 0.0), q);
            return why.empty() ? std::string("v3") : "v2 (" + why + ")";
        },
        "Which kernel the forward runs for these tensors: 'v3', or 'v2 (why not v3)'");
    m.def(
        "set_hopper_forward", [](bool enabled) { return g_hopper_forward.exchange(enabled); },
        "Whether the forward may run v3 on a Hopper GPU (default True); returns the previous setting");
}
