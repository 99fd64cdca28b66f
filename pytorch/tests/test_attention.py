"""pytest suite for flash_scratch (the v2 kernels, and v3's forward on Hopper, as PyTorch operators). Needs PyTorch
with a CUDA GPU of sm_80 or newer; without them every test is skipped with the reason. Run:
python3 -m pytest pytorch/tests -v

Accuracy rule (docs/conventions.md, "same-precision reference"): against float64 on the same rounded inputs, our
max error must be at most 2x the max error of PyTorch's own fp16/bf16 attention plus a small atol.
"""
import math
import os
import sys

import pytest

torch = pytest.importorskip("torch", reason="PyTorch is not installed (optional part of the project)")
if not torch.cuda.is_available():
    pytest.skip("no CUDA GPU: the flash_scratch tests need one", allow_module_level=True)
if torch.cuda.get_device_capability() < (8, 0):
    pytest.skip("the v2 tensor-core kernels need sm_80 or newer", allow_module_level=True)

import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from flash_scratch import (attention, attention_backward, attention_forward, forward_kernel,  # noqa: E402
                           set_hopper_forward)

DTYPES = [torch.float16, torch.bfloat16]
HOPPER = torch.cuda.get_device_capability() == (9, 0)


def visible_keys(Nq, Nk, causal, device):
    """[Nq, Nk] bool: which keys each query sees (bottom-right aligned causal: key j <= i + Nk - Nq)."""
    i = torch.arange(Nq, device=device)[:, None]
    j = torch.arange(Nk, device=device)[None, :]
    return (j <= i + (Nk - Nq)) if causal else torch.ones(Nq, Nk, dtype=torch.bool, device=device)


def sdpa(q, k, v, causal, scale):
    """PyTorch's attention in q's precision, with our conventions: bottom-right causal alignment, and a row that sees
    no key gives O = 0 (and zero gradients) instead of NaN."""
    Nq, Nk, d = q.shape[-2], k.shape[-2], q.shape[-1]
    if not causal:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    visible = visible_keys(Nq, Nk, causal, q.device)
    sees_a_key = visible.any(dim=-1, keepdim=True)
    s = (q @ k.transpose(-1, -2)) * (scale if scale is not None else 1 / math.sqrt(d))
    s = s.masked_fill(~visible, float("-inf")).masked_fill(~sees_a_key, 0.0)  # no -inf-only rows: no NaN
    p = torch.where(sees_a_key, torch.softmax(s, dim=-1), 0.0)
    return p @ v


def inputs(B, H, Nq, Nk, d, dtype, seed=0, scale_qk=1.0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = (torch.randn(B, H, Nq, d, device="cuda", generator=g) * scale_qk).to(dtype)
    k = (torch.randn(B, H, Nk, d, device="cuda", generator=g) * scale_qk).to(dtype)
    v = torch.randn(B, H, Nk, d, device="cuda", generator=g).to(dtype)
    do = torch.randn(B, H, Nq, d, device="cuda", generator=g).to(dtype)
    return q, k, v, do


def max_err(a, ref):
    assert torch.isfinite(a).all(), "NaN or Inf in the result"
    return (a.double() - ref).abs().max().item()


SHAPES = [  # (B, H, Nq, Nk, d, causal): odd sizes, Nq != Nk both ways, fully masked rows (causal, Nq > Nk)
    (2, 3, 128, 128, 64, False),
    (1, 2, 77, 45, 64, True),
    (1, 2, 45, 300, 128, True),
    (2, 1, 257, 129, 128, False),
    (1, 1, 1, 1, 64, False),
    (1, 2, 200, 200, 128, True),
    (1, 2, 77, 45, 40, True),  # head dims between tiles run the next larger one, zero-filled
    (1, 2, 130, 99, 200, False),
    (1, 1, 64, 129, 256, True),
]


def shape_id(s):
    return f"{s[0]}x{s[1]}x{s[2]}x{s[3]}xd{s[4]}{'c' if s[5] else ''}"


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=[shape_id(s) for s in SHAPES])
def test_values_and_gradients(dtype, shape):
    """On Hopper the forward of d = 64, 128 and 256 is v3's (test_hopper_forward_is_v3), and the v2 backward runs on the
    LSE v3 wrote; elsewhere both passes are v2's."""
    check_values_and_gradients(dtype, shape, deterministic=False)


def check_values_and_gradients(dtype, shape, deterministic):
    B, H, Nq, Nk, d, causal = shape
    q, k, v, do = inputs(B, H, Nq, Nk, d, dtype)
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    ref = sdpa(q64, k64, v64, causal, None)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), do.double())
    # PyTorch in the same precision, on the same rounded inputs: the yardstick for the rounding error
    qt, kt, vt = (t.clone().requires_grad_() for t in (q, k, v))
    theirs = sdpa(qt, kt, vt, causal, None)
    their_grads = torch.autograd.grad(theirs, (qt, kt, vt), do)

    qo, ko, vo = (t.clone().requires_grad_() for t in (q, k, v))
    o, lse = attention(qo, ko, vo, causal=causal, return_lse=True, deterministic=deterministic)
    ours_grads = torch.autograd.grad(o, (qo, ko, vo), do)

    atol = 1e-3
    assert max_err(o, ref) <= 2 * max_err(theirs, ref) + atol
    for name, g, gt, gr in zip("qkv", ours_grads, their_grads, ref_grads):
        assert max_err(g, gr) <= 2 * max_err(gt, gr) + atol, f"d{name}"
    # LSE against float64; -inf exactly where a row sees no key, and there O = 0 and dQ = 0
    s = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(d)
    lse_ref = torch.logsumexp(s.masked_fill(~visible_keys(Nq, Nk, causal, "cuda"), float("-inf")), dim=-1)
    masked = torch.isinf(lse_ref)
    assert torch.equal(lse == float("-inf"), masked)
    if (~masked).any():
        assert (lse[~masked].double() - lse_ref[~masked]).abs().max().item() < 1e-3
    if masked.any():
        assert (o[masked] == 0).all() and (ours_grads[0][masked] == 0).all()


DETERMINISTIC_SHAPES = [(2, 4, 300, 300, 64, False), (1, 2, 77, 45, 40, True), (1, 2, 45, 300, 128, True)]


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("shape", DETERMINISTIC_SHAPES, ids=[shape_id(s) for s in DETERMINISTIC_SHAPES])
def test_deterministic(dtype, shape):
    """deterministic=True: the backward's dQ without atomics is as accurate, and repeated calls give the same bits."""
    check_values_and_gradients(dtype, shape, deterministic=True)
    B, H, Nq, Nk, d, causal = shape
    q, k, v, do = inputs(B, H, Nq, Nk, d, dtype, seed=13)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    runs = [torch.autograd.grad(attention(q, k, v, causal=causal, deterministic=True), (q, k, v), do)
            for _ in range(5)]
    for grads in runs[1:]:
        for name, g, first in zip("qkv", grads, runs[0]):
            assert torch.equal(g, first), f"d{name} changed between calls"


@pytest.mark.skipif(not HOPPER, reason="v3, the Hopper forward, runs on sm_90 only")
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
def test_hopper_forward_is_v3(dtype):
    """On Hopper the forward of d = 64, 128 and 256 runs v3, other head dims v2; v3 and v2 agree to rounding."""
    for d in (64, 128, 256):
        q, k, v, _ = inputs(2, 3, 300, 200, d, dtype, seed=17)
        assert forward_kernel(q, k, v) == "v3"
        for causal in (False, True):
            o3, lse3 = attention(q, k, v, causal=causal, return_lse=True)
            previous = set_hopper_forward(False)
            try:
                assert forward_kernel(q, k, v).startswith("v2")
                o2, lse2 = attention(q, k, v, causal=causal, return_lse=True)
            finally:
                set_hopper_forward(previous)
            # the same algorithm in the same precision: O within a few units of the last place, LSE to fp32 rounding
            assert torch.allclose(o3.float(), o2.float(), rtol=0, atol=2e-2)
            assert torch.equal(torch.isinf(lse3), torch.isinf(lse2))
            assert torch.allclose(lse3, lse2, rtol=0, atol=1e-4)
    q, k, v, _ = inputs(1, 2, 64, 64, 40, dtype)
    assert forward_kernel(q, k, v).startswith("v2 (v3 supports head dims 64, 128 and 256")


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
def test_large_logits_and_custom_scale(dtype):
    q, k, v, do = inputs(1, 2, 130, 130, 64, dtype, seed=3, scale_qk=10.0)  # scores of several hundred
    ref = sdpa(q.double(), k.double(), v.double(), False, 0.3)
    theirs = sdpa(q, k, v, False, 0.3)
    o = attention(q, k, v, scale=0.3)
    assert max_err(o, ref) <= 2 * max_err(theirs, ref) + 1e-3


def test_non_default_stream():
    q, k, v, _ = inputs(2, 4, 512, 512, 64, torch.float16, seed=5)
    expect = attention(q, k, v)
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        got = attention(q, k, v)
    s.synchronize()
    assert torch.equal(got, expect)


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_transposed_gradient(deterministic):
    """A model that reshapes O to [B, N, H d] through O.transpose(1, 2) hands the backward a dO that is a [B, H, N, d]
    view of a [B, N, H, d] tensor: read in place, it gives the gradients of the same dO made contiguous (dK and dV bit
    for bit; dQ too when deterministic, else up to the order of its atomic additions); an expanded dO is copied."""
    q, k, v, do = inputs(2, 3, 200, 333, 64, torch.bfloat16, seed=17)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    do_t = do.transpose(1, 2).contiguous().transpose(1, 2)  # the same values, laid out [B, N, H, d]
    assert not do_t.is_contiguous() and torch.equal(do_t, do)
    o = attention(q, k, v, causal=True, deterministic=deterministic)
    want = torch.autograd.grad(o, (q, k, v), do, retain_graph=True)
    got = torch.autograd.grad(o, (q, k, v), do_t, retain_graph=True)
    assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])
    if deterministic:
        assert torch.equal(got[0], want[0])
    else:
        assert (got[0] - want[0]).abs().max().item() <= want[0].abs().max().item() / 128
    do_x = do[:, :1].expand(-1, 3, -1, -1)  # stride 0 over the heads: copied, then the same as contiguous
    want_x = torch.autograd.grad(o, (q, k, v), do_x.contiguous(), retain_graph=True)
    got_x = torch.autograd.grad(o, (q, k, v), do_x)
    assert torch.equal(got_x[1], want_x[1]) and torch.equal(got_x[2], want_x[2])


def test_opcheck():
    q, k, v, do = inputs(1, 2, 64, 96, 64, torch.float16, seed=7)
    for t in (q, k, v):
        t.requires_grad_()
    for deterministic in (False, True):
        torch.library.opcheck(attention_forward, (q, k, v, True, 0.0, deterministic))
        o, lse = attention_forward(q.detach(), k.detach(), v.detach(), True, 0.0, deterministic)
        torch.library.opcheck(attention_backward,
                              (do, q.detach(), k.detach(), v.detach(), o, lse, True, 0.0, deterministic))


def test_torch_compile():
    q, k, v, do = inputs(2, 2, 256, 256, 128, torch.bfloat16, seed=11)

    def f(q, k, v):
        return attention(q, k, v, causal=True).float().square().sum()

    eager_q = q.clone().requires_grad_()
    compiled_q = q.clone().requires_grad_()
    eager = f(eager_q, k, v)
    compiled = torch.compile(f, fullgraph=True)(compiled_q, k, v)
    assert torch.allclose(eager, compiled, rtol=1e-5)
    (ge,) = torch.autograd.grad(eager, eager_q)
    (gc,) = torch.autograd.grad(compiled, compiled_q)
    # the compiled graph may round the upstream gradient of .float().square() differently; the kernel is the same
    assert torch.allclose(ge, gc, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("make, match", [
    (lambda q: (q.float(), q.float(), q.float()), "float16 or bfloat16"),
    (lambda q: (q.cpu(), q.cpu(), q.cpu()), "CUDA device"),
    (lambda q: (q.transpose(1, 2), q.transpose(1, 2), q.transpose(1, 2)), "contiguous"),
    (lambda q: (q[..., :12].contiguous(),) * 3, "head dims"),
    (lambda q: (q[0], q[0], q[0]), "4-D"),
    (lambda q: (q, q.bfloat16(), q), "one dtype"),
    (lambda q: (torch.cat([q.new_zeros(1), q.flatten()])[1:].view(q.shape),) * 3, "16-byte aligned"),
], ids=["fp32", "cpu", "non-contiguous", "d=12", "3-D", "mixed-dtype", "misaligned"])
def test_bad_inputs_raise(make, match):
    q = torch.randn(1, 2, 64, 64, device="cuda", dtype=torch.float16)
    with pytest.raises((TypeError, ValueError, RuntimeError), match=match):
        attention(*make(q))
