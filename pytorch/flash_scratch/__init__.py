"""flash_scratch: this project's FlashAttention-2 kernels (v2/, tensor cores) as PyTorch custom operators.

    from flash_scratch import attention
    o = attention(q, k, v, causal=True)               # q [B, H, Nq, d], k and v [B, H, Nk, d], fp16 or bf16, CUDA
    o, lse = attention(q, k, v, return_lse=True)      # lse [B, H, Nq], float32, natural log

The same conventions as every stage program (docs/conventions.md): causal masks aligned bottom-right (query i
sees keys j <= i + Nk - Nq), a row that sees no key gives O = 0 and LSE = -inf, scale defaults to 1/sqrt(d).
Gradients flow to q, k and v through the v2 backward kernel; LSE is returned without a gradient.

Two operators are registered with torch.library, each with a fake (meta) implementation so torch.compile can
trace them: flash_scratch::attention_forward (q, k, v -> O, LSE) and flash_scratch::attention_backward
(dO, q, k, v, O, LSE -> dQ, dK, dV); autograd connects them. The kernels are compiled from the repository's own
sources on first use (pytorch/flash_scratch/_build.py).
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

from ._build import extension

__all__ = ["attention"]


@torch.library.custom_op("flash_scratch::attention_forward", mutates_args=(), device_types="cuda")
def attention_forward(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> Tuple[Tensor, Tensor]:
    o, lse = extension().forward(q, k, v, causal, scale)
    return o, lse


@attention_forward.register_fake
def _(q, k, v, causal, scale):
    return torch.empty_like(q), q.new_empty(q.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("flash_scratch::attention_backward", mutates_args=(), device_types="cuda")
def attention_backward(dO: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, causal: bool,
                       scale: float) -> Tuple[Tensor, Tensor, Tensor]:
    dq, dk, dv = extension().backward(dO, q, k, v, o, lse, causal, scale)
    return dq, dk, dv


@attention_backward.register_fake
def _(dO, q, k, v, o, lse, causal, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, causal, scale = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse)
    ctx.causal, ctx.scale = causal, scale
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dO, _dlse):
    q, k, v, o, lse = ctx.saved_tensors
    # Autograd may hand over a gradient with any strides (e.g. an expand); the kernel reads [B, H, Nq, d] rows.
    dq, dk, dv = attention_backward(dO.contiguous(), q, k, v, o, lse, ctx.causal, ctx.scale)
    return dq, dk, dv, None, None


attention_forward.register_autograd(_backward, setup_context=_setup_context)


def _check(q: Tensor, k: Tensor, v: Tensor, scale: Optional[float]) -> None:
    """Refuses what the kernels do not take, with one clear message (the C++ side checks again)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"flash_scratch.attention: {name} must be a torch.Tensor")
        if t.dtype not in (torch.float16, torch.bfloat16):
            raise TypeError(f"flash_scratch.attention: {name} must be float16 or bfloat16 (tensor cores), "
                            f"got {t.dtype}")
        if t.device.type != "cuda":
            raise ValueError(f"flash_scratch.attention: {name} must be on a CUDA device, got {t.device}")
        if t.dim() != 4:
            raise ValueError(f"flash_scratch.attention: {name} must be 4-D [B, H, N, d], got shape {tuple(t.shape)}")
        if not t.is_contiguous():
            raise ValueError(f"flash_scratch.attention: {name} must be contiguous in [B, H, N, d] order "
                             f"(call .contiguous() after a transpose)")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError("flash_scratch.attention: q, k and v must have one dtype")
    if scale is not None and not scale > 0:
        raise ValueError(f"flash_scratch.attention: scale must be positive, got {scale}")


def attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = False, scale: Optional[float] = None,
              return_lse: bool = False):
    """softmax(scale * q k^T [+ causal mask]) v with the v2 FlashAttention-2 kernels; differentiable in q, k, v.

    Head dims: those the v2 tensor-core kernels take, any multiple of 8 from 8 to 256 in both passes; others
    raise with the kernels' own message. Returns O, or (O, LSE) with return_lse=True.
    """
    _check(q, k, v, scale)
    o, lse = attention_forward(q, k, v, bool(causal), 0.0 if scale is None else float(scale))
    return (o, lse) if return_lse else o
