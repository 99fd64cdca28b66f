"""flash_scratch: this project's FlashAttention kernels as PyTorch operators.

    from flash_scratch import attention
    o = attention(q, k, v, causal=True)               # q [B, H, Nq, d], k and v [B, H, Nk, d], fp16 or bf16, CUDA
    o, lse = attention(q, k, v, return_lse=True)      # lse [B, H, Nq], float32, natural log

The same conventions as every stage program (docs/conventions.md): causal masks aligned bottom-right (query i
sees keys j <= i + Nk - Nq), a row that sees no key gives O = 0 and LSE = -inf, scale defaults to 1/sqrt(d).
The forward runs v3 (FlashAttention-3) on a Hopper GPU for d = 64, 128 and 256, v2 otherwise; gradients flow to q, k
and v through the v2 backward kernel; LSE is returned without a gradient.

Importing compiles the extension from the repository's own sources on first use (pytorch/flash_scratch/_build.py)
and loads it, which defines two operators in C++ with their CUDA kernels (pytorch/csrc/bridge.cpp):
flash_scratch::attention_forward (q, k, v -> O, LSE) and flash_scratch::attention_backward
(dO, q, k, v, O, LSE -> dQ, dK, dV), and the forward's autograd kernel, which calls the backward operator.
Registered here: their fake (shape-only) implementations, which torch.compile traces with.
"""
import torch

from ._build import extension

__all__ = ["attention", "forward_kernel", "set_hopper_forward"]

_ext = extension()
attention_forward = torch.ops.flash_scratch.attention_forward.default
attention_backward = torch.ops.flash_scratch.attention_backward.default
forward_kernel = _ext.forward_kernel  # forward_kernel(q, k, v) -> "v3" or "v2 (why not v3)"
set_hopper_forward = _ext.set_hopper_forward  # set_hopper_forward(False): v2 forward everywhere; returns the old


@torch.library.register_fake("flash_scratch::attention_forward")
def _(q, k, v, causal, scale, deterministic=False):
    return torch.empty_like(q), q.new_empty(q.shape[:-1], dtype=torch.float32)


@torch.library.register_fake("flash_scratch::attention_backward")
def _(dO, q, k, v, o, lse, causal, scale, deterministic):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def attention(q, k, v, causal=False, scale=None, return_lse=False, deterministic=False):
    """softmax(scale * q k^T [+ causal mask]) v; differentiable in q, k and v.

    Head dims: any multiple of 8 from 8 to 256 (v2; v3 takes 64, 128 and 256 on Hopper); others raise with the kernels'
    own message, as do a wrong dtype, device, rank or layout (checked in C++). deterministic=True runs the backward
    whose dQ needs no atomic additions: the same gradient bits on every call, somewhat slower. Returns O, or
    (O, LSE) with return_lse=True.
    """
    if scale is None:
        scale = 0.0  # the kernels' "1/sqrt(d)"
    elif not scale > 0:
        raise ValueError(f"flash_scratch.attention: scale must be positive, got {scale}")
    o, lse = attention_forward(q, k, v, bool(causal), float(scale), bool(deterministic))
    return (o, lse) if return_lse else o
