"""Attention: Triton kernels and reference against a float64 oracle, drop-in parity, bad input."""

from __future__ import annotations

import importlib
import math
import os

import pytest
import torch
import torch.nn.functional as F
from helpers import BACKENDS, DEVICE, DTYPES, ON_CUDA, ROADS, assert_fa_close, on_road, skip_if_unsupported

import embedattn
from embedattn import reference

ea_attention = importlib.import_module("embedattn.attention")  # the module (embedattn.attention is the function)

# (B, Hq, Hkv, Nq, Nk, D, causal[, extra]): odd tails, Nq != Nk both ways, GQA/MQA, odd head dims; extra: a value
# head dim of its own (dv, MLA) and learned sinks (issue 23)
CASES = [
    (1, 2, 2, 1, 7, 16, False),
    (2, 2, 1, 7, 33, 40, True),
    (1, 4, 2, 33, 33, 64, True),
    (1, 2, 2, 33, 129, 80, False),
    (1, 3, 1, 129, 33, 24, True),
    (2, 2, 2, 65, 65, 32, False),
    (1, 2, 1, 17, 1, 48, True),
    (1, 1, 1, 40, 23, 128, True),
    (1, 4, 2, 19, 29, 48, True, dict(dv=32, sinks=True)),
    (1, 2, 2, 7, 11, 192, False, dict(dv=128)),  # DeepSeek's MLA training head dims
    (1, 2, 1, 9, 13, 512, True, dict(sinks=True)),  # Gemma's global layers
]
if ON_CUDA:
    CASES += [
        (2, 8, 2, 1000, 1000, 128, True),
        (1, 4, 4, 513, 2049, 64, False),
        (1, 4, 1, 257, 257, 256, True),
        (1, 2, 2, 300, 300, 160, False),
        (1, 2, 2, 129, 300, 96, True),
        (1, 16, 16, 777, 777, 192, True, dict(dv=128)),
        (1, 8, 2, 513, 600, 512, True, dict(sinks=True)),
        (1, 4, 2, 333, 1000, 512, False, dict(dv=128)),
        (2, 64, 8, 300, 300, 64, True, dict(sinks=True)),  # gpt-oss
    ]


def _inputs(B, Hq, Hkv, Nq, Nk, D, dtype, seed, device=DEVICE, dv=None):
    g = torch.Generator(device="cpu").manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float32).to(device=device, dtype=dtype)
    return mk(B, Hq, Nq, D), mk(B, Hkv, Nk, D), mk(B, Hkv, Nk, D if dv is None else dv)


def _check(q, k, v, backend, *, causal=False, mask=None, grads=True, seed=0, road="eager", sinks=None):
    """Kernel vs float64 reference, with plain PyTorch in the same dtype as the error yardstick (``sinks``: their
    gradient too)."""
    dtype = q.dtype
    ins = (q, k, v) if sinks is None else (q, k, v, sinks)
    leaves = [t.detach().clone().requires_grad_() for t in ins]
    fn = on_road(road, lambda q, k, v, s=None: embedattn.attention(q, k, v, causal=causal, attn_mask=mask, sinks=s,
                                                                   backend=backend))
    out = fn(*leaves)
    assert out.shape == q.shape[:3] + v.shape[3:] and out.dtype == dtype
    ref_in = [t.detach().double().requires_grad_() for t in ins]
    mask64 = mask.double() if mask is not None and mask.is_floating_point() else mask
    ref = reference.attention(*ref_in[:3], causal=causal, attn_mask=mask64, sinks=ref_in[3] if sinks is not None
                              else None)
    plain_in = [t.detach().clone().requires_grad_() for t in ins]
    plain = reference.attention(*plain_in[:3], causal=causal, attn_mask=mask, upcast=False,
                                sinks=plain_in[3] if sinks is not None else None)
    assert_fa_close(out, ref, plain, "out")
    if not grads:
        return
    g = torch.Generator(device="cpu").manual_seed(seed + 1)
    dout = torch.randn(out.shape, generator=g).to(device=q.device, dtype=dtype)
    got = torch.autograd.grad(out, leaves, dout)
    want = torch.autograd.grad(ref, ref_in, dout.double())
    base = torch.autograd.grad(plain, plain_in, dout)
    for name, a, b, c in zip(("dq", "dk", "dv", "dsinks"), got, want, base):
        assert a.shape == b.shape
        assert_fa_close(a, b, c, name)


def _case_id(c) -> str:
    extra = c[7] if len(c) > 7 else {}
    return "B{}H{}x{}N{}x{}D{}".format(*c[:6]) + (f"v{extra['dv']}" if "dv" in extra else "") + \
        ("c" if c[6] else "") + ("_sinks" if extra.get("sinks") else "")


@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("road", ROADS)
def test_forward_backward(road, backend, dtype, case):
    skip_if_unsupported(backend, dtype)
    B, Hq, Hkv, Nq, Nk, D, causal = case[:7]
    extra = case[7] if len(case) > 7 else {}
    q, k, v = _inputs(B, Hq, Hkv, Nq, Nk, D, dtype, seed=hash(case[:7]) % 1000, dv=extra.get("dv"))
    sinks = None
    if extra.get("sinks"):
        sinks = torch.linspace(-1.0, 1.5, Hq, device=DEVICE)
    _check(q, k, v, backend, causal=causal, road=road, sinks=sinks)


MASKS = {
    "bool_2d": lambda B, H, Nq, Nk, g: torch.rand(Nq, Nk, generator=g) > 0.3,
    "bool_pad": lambda B, H, Nq, Nk, g: (
        torch.arange(Nk)[None, None, None, :] < torch.tensor([Nk, Nk // 2])[:B, None, None, None]
    ),
    "float_bh": lambda B, H, Nq, Nk, g: torch.randn(B, H, 1, Nk, generator=g),
    "float_full": lambda B, H, Nq, Nk, g: torch.randn(B, H, Nq, Nk, generator=g),
    "float_neginf": lambda B, H, Nq, Nk, g: torch.where(torch.rand(B, 1, Nq, Nk, generator=g) > 0.5, 0.0, -math.inf),
}


@pytest.mark.parametrize("kind", list(MASKS))
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("road", ROADS)
def test_masks(road, backend, dtype, causal, kind):
    skip_if_unsupported(backend, dtype)
    B, Hq, Hkv, Nq, Nk, D = 2, 4, 2, 19, 37, 32
    q, k, v = _inputs(B, Hq, Hkv, Nq, Nk, D, dtype, seed=7)
    g = torch.Generator().manual_seed(11)
    mask = MASKS[kind](B, Hq, Nq, Nk, g).to(DEVICE)
    if mask.is_floating_point():
        mask = mask.to(dtype)
    _check(q, k, v, backend, causal=causal, mask=mask, road=road)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fully_masked_rows_give_zeros_and_zero_grads(backend):
    B, H, Nq, Nk, D = 1, 2, 9, 21, 16
    q, k, v = (t.requires_grad_() for t in _inputs(B, H, H, Nq, Nk, D, torch.float32, seed=3))
    mask = torch.rand(B, H, Nq, Nk, device=DEVICE) > 0.5
    mask[:, :, 2] = False
    mask[:, 1, 5] = False
    out, lse = embedattn.attention(q, k, v, attn_mask=mask, return_lse=True, backend=backend)
    assert torch.equal(out[:, :, 2], torch.zeros_like(out[:, :, 2]))
    assert torch.equal(out[:, 1, 5], torch.zeros_like(out[:, 1, 5]))
    assert torch.isneginf(lse[:, :, 2]).all() and torch.isfinite(lse[:, 0, 5]).all()
    out.backward(torch.randn_like(out))
    assert torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all() and torch.isfinite(v.grad).all()
    assert torch.equal(q.grad[:, :, 2], torch.zeros_like(q.grad[:, :, 2]))
    # and it matches torch's own SDPA, which also returns zeros on fully masked rows
    ref = F.scaled_dot_product_attention(q.detach(), k.detach(), v.detach(), attn_mask=mask)
    torch.testing.assert_close(out.detach(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_causal_more_queries_than_keys_bottom_right(backend):
    """Nq > Nk with bottom-right causal: the first Nq - Nk rows see no key and are zero."""
    q, k, v = _inputs(1, 2, 2, 20, 6, 16, torch.float32, seed=5)
    out = embedattn.attention(q, k, v, causal=True, backend=backend)
    assert torch.equal(out[:, :, :14], torch.zeros_like(out[:, :, :14]))
    i, j = torch.arange(20)[:, None], torch.arange(6)[None, :]
    explicit = (j <= i + 6 - 20).to(DEVICE)
    torch.testing.assert_close(out, embedattn.attention(q, k, v, attn_mask=explicit, backend=backend),
                               atol=1e-6, rtol=1e-5)
    _check(q, k, v, backend, causal=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_views(backend, dtype):
    """(B, N, H, D) tensors transposed to (B, H, N, D), and a sliced head dim: no copies needed."""
    skip_if_unsupported(backend, dtype)
    B, N, H, D = 2, 29, 4, 32
    g = torch.Generator().manual_seed(1)
    qkv = torch.randn(B, N, 3, H, D + 8, generator=g).to(DEVICE, dtype)
    q, k, v = (qkv[:, :, i, :, :D].transpose(1, 2) for i in range(3))
    assert not q.is_contiguous()
    _check(q, k, v, backend, causal=True)
    kv = torch.randn(B, 2, N + 3, 2, D, generator=g).to(DEVICE, dtype)
    k2, v2 = kv[:, 0].transpose(1, 2), kv[:, 1].transpose(1, 2)  # GQA: 2 kv heads for 4 q heads
    _check(q, k2, v2, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_return_lse_natural_log(backend):
    q, k, v = _inputs(2, 2, 1, 13, 31, 24, torch.float32, seed=9)
    scale = 0.3
    out, lse = embedattn.attention(q, k, v, scale=scale, return_lse=True, backend=backend)
    kk = k.repeat_interleave(2, dim=1)
    want = torch.logsumexp((q.double() @ kk.double().transpose(-1, -2)) * scale, dim=-1)
    assert lse.shape == (2, 2, 13) and lse.dtype == torch.float32
    torch.testing.assert_close(lse.double(), want, atol=1e-5, rtol=1e-5)


def test_backward_is_deterministic():
    if "triton" not in BACKENDS:
        pytest.skip("triton not installed")
    q, k, v = _inputs(1, 4, 1, 45, 70, 32, torch.float16, seed=13)
    dout = torch.randn(q.shape, device=DEVICE).to(torch.float16)
    grads = []
    for _ in range(2):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = embedattn.attention(*leaves, causal=True, backend="triton")
        grads.append(torch.autograd.grad(out, leaves, dout))
    for a, b in zip(*grads):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_inputs(backend):
    q, k, v = _inputs(2, 2, 2, 0, 5, 16, torch.float32, seed=1)
    assert embedattn.attention(q, k, v, backend=backend).shape == (2, 2, 0, 16)
    q, k, v = _inputs(2, 2, 2, 4, 0, 16, torch.float32, seed=1)
    out, lse = embedattn.attention(q, k, v, return_lse=True, backend=backend)
    assert torch.equal(out, torch.zeros(2, 2, 4, 16, device=DEVICE)) and torch.isneginf(lse).all()
    q, k, v = _inputs(0, 2, 2, 4, 5, 16, torch.float32, seed=1)
    assert embedattn.attention(q, k, v, backend=backend).shape == (0, 2, 4, 16)


# ---------------------------------------------------------------- drop-in: torch's own SDPA is the oracle
def _sdpa_case(name, q, k, v=None, *, mask=None, kernel=True, **kw):
    """One drop-in call: shapes of q/k/v, a mask spec, SDPA keyword arguments, and whether the Triton road
    must run it (False: torch takes it, e.g. because torch rejects it)."""
    return pytest.param(dict(q=q, k=k, v=v if v is not None else k, mask=mask, kw=kw, kernel=kernel), id=name)


_B, _T = torch.bool, torch.float32
SDPA_GRID = [
    # shapes: Nq != Nk both ways, 3-D, broadcast batch and heads, grouped heads, degenerate sizes
    _sdpa_case("plain", (2, 3, 17, 16), (2, 3, 17, 16)),
    _sdpa_case("nq<nk_causal", (2, 3, 9, 16), (2, 3, 21, 16), is_causal=True),
    _sdpa_case("nq>nk_causal", (1, 2, 21, 16), (1, 2, 9, 16), is_causal=True),
    _sdpa_case("nq1", (2, 2, 1, 8), (2, 2, 13, 8), is_causal=True),
    _sdpa_case("3d", (2, 17, 24), (2, 9, 24)),
    _sdpa_case("3d_causal_mask3d", (2, 7, 8), (2, 11, 8), mask=((2, 7, 11), _B), is_causal=True, kernel=False),
    _sdpa_case("3d_mask4d", (2, 7, 8), (2, 11, 8), mask=((1, 1, 7, 11), _B), kernel=False),
    _sdpa_case("3d_mask3d_float", (2, 7, 8), (2, 11, 8), mask=((2, 7, 11), _T)),
    _sdpa_case("3d_kv_batch1_mask2d", (2, 7, 8), (1, 11, 8), mask=((7, 11), _B)),
    _sdpa_case("kv_batch1", (2, 2, 7, 16), (1, 2, 11, 16)),
    _sdpa_case("q_batch1", (1, 2, 7, 16), (2, 2, 11, 16), mask=((2, 1, 7, 11), _T)),
    _sdpa_case("kv_head1_no_gqa", (2, 4, 7, 16), (2, 1, 11, 16), is_causal=True),
    _sdpa_case("q_head1_no_gqa", (1, 1, 7, 16), (1, 3, 11, 16)),
    _sdpa_case("gqa", (1, 4, 9, 16), (1, 2, 21, 16), enable_gqa=True, is_causal=True),
    _sdpa_case("gqa_kv_batch1_mask", (2, 4, 9, 16), (1, 2, 13, 16), mask=((2, 1, 9, 13), _B), enable_gqa=True),
    _sdpa_case("gqa_needs_flag", (1, 4, 9, 16), (1, 2, 9, 16), kernel=False),
    _sdpa_case("gqa_not_divisible", (1, 3, 9, 16), (1, 2, 9, 16), enable_gqa=True, kernel=False),
    _sdpa_case("gqa_q_head1", (1, 1, 9, 16), (1, 4, 9, 16), enable_gqa=True, kernel=False),
    _sdpa_case("batch_mismatch", (2, 2, 5, 8), (3, 2, 5, 8), kernel=False),
    _sdpa_case("head_dim_0", (1, 2, 5, 0), (1, 2, 7, 0), kernel=False),
    _sdpa_case("head_dim_mismatch", (1, 2, 5, 8), (1, 2, 7, 4), kernel=False),
    _sdpa_case("value_head_dim_differs", (1, 2, 5, 8), (1, 2, 7, 8), (1, 2, 7, 12)),
    _sdpa_case("value_head_dim_3d_causal", (2, 7, 24), (2, 11, 24), (2, 11, 16), is_causal=True),
    _sdpa_case("value_head_dim_gqa_mask", (1, 4, 9, 16), (1, 2, 13, 16), (1, 2, 13, 40), mask=((9, 13), _B),
               enable_gqa=True),
    _sdpa_case("value_head_dim_0", (1, 2, 5, 8), (1, 2, 7, 8), (1, 2, 7, 0), kernel=False),
    _sdpa_case("value_shape_differs", (1, 2, 5, 8), (1, 2, 7, 8), (1, 2, 6, 8), kernel=False),
    _sdpa_case("nk_0", (1, 2, 5, 8), (1, 2, 0, 8), kernel=False),
    _sdpa_case("nq_0", (1, 2, 0, 8), (1, 2, 3, 8), kernel=False),
    _sdpa_case("2d", (5, 8), (7, 8), kernel=False),
    _sdpa_case("5d", (1, 2, 2, 5, 8), (1, 2, 2, 7, 8), kernel=False),
    _sdpa_case("rank_mix", (2, 5, 8), (1, 2, 7, 8), kernel=False),
    # masks; with is_causal too torch applies both or raises (by the backend it picks): torch's call answers
    _sdpa_case("bool2d", (2, 2, 9, 16), (2, 2, 21, 16), mask=((9, 21), _B)),
    _sdpa_case("bool2d_causal", (2, 2, 9, 16), (2, 2, 21, 16), mask=((9, 21), _B), is_causal=True, kernel=False),
    _sdpa_case("float_b1_scale", (2, 2, 9, 16), (2, 2, 21, 16), mask=((2, 1, 9, 21), _T), scale=0.2),
    _sdpa_case("float3d_heads", (2, 3, 9, 16), (2, 3, 12, 16), mask=((3, 9, 12), _T)),
    _sdpa_case("fully_masked_rows", (1, 2, 9, 16), (1, 2, 12, 16), mask=("rows", _B)),
    _sdpa_case("neg_inf_rows", (1, 2, 9, 16), (1, 2, 12, 16), mask=("rows", _T)),
    _sdpa_case("mask_1d", (1, 2, 5, 8), (1, 2, 7, 8), mask=((7,), _B), kernel=False),
    _sdpa_case("mask_0d", (1, 2, 5, 8), (1, 2, 7, 8), mask=((), _B), kernel=False),
    _sdpa_case("mask_5d", (1, 2, 5, 8), (1, 2, 7, 8), mask=((1, 1, 2, 5, 7), _B), kernel=False),
    _sdpa_case("mask_not_broadcastable", (1, 2, 5, 8), (1, 2, 7, 8), mask=((3, 7), _B), kernel=False),
    _sdpa_case("mask_wider_batch", (1, 2, 5, 8), (1, 2, 7, 8), mask=((2, 1, 5, 7), _B), kernel=False),
    _sdpa_case("mask_int", (1, 2, 5, 8), (1, 2, 7, 8), mask=((5, 7), torch.int32), kernel=False),
    _sdpa_case("mask_float64", (1, 2, 5, 8), (1, 2, 7, 8), mask=((5, 7), torch.float64), kernel=False),
    _sdpa_case("mask_float16_fp32_q", (1, 2, 5, 8), (1, 2, 7, 8), mask=((5, 7), torch.float16), kernel=False),
    _sdpa_case("mask_requires_grad", (1, 2, 5, 8), (1, 2, 7, 8), mask=((5, 7), "grad"), kernel=False),
    # arguments
    _sdpa_case("dropout_0_int", (1, 2, 5, 8), (1, 2, 7, 8), dropout_p=0),
    _sdpa_case("dropout_1", (1, 2, 5, 8), (1, 2, 7, 8), dropout_p=1.0, kernel=False),
    _sdpa_case("dropout_negative", (1, 2, 5, 8), (1, 2, 7, 8), dropout_p=-0.5, kernel=False),
    _sdpa_case("dropout_1.5", (1, 2, 5, 8), (1, 2, 7, 8), dropout_p=1.5, kernel=False),
    _sdpa_case("scale_int", (1, 2, 5, 8), (1, 2, 7, 8), scale=2),
    _sdpa_case("scale_nan", (1, 2, 5, 8), (1, 2, 7, 8), scale=float("nan"), kernel=False),
    _sdpa_case("scale_str", (1, 2, 5, 8), (1, 2, 7, 8), scale="a", kernel=False),
    _sdpa_case("causal_str", (1, 2, 5, 8), (1, 2, 7, 8), is_causal="no", kernel=False),
    _sdpa_case("causal_int", (1, 2, 5, 8), (1, 2, 7, 8), is_causal=1, kernel=False),
    _sdpa_case("gqa_none", (1, 2, 5, 8), (1, 2, 7, 8), enable_gqa=None, kernel=False),
    _sdpa_case("mask_list", (1, 2, 5, 8), (1, 2, 7, 8), mask="list", kernel=False),
    _sdpa_case("dtype_mix", (1, 2, 5, 8), (1, 2, 7, 8), mask="half_k", kernel=False),
    _sdpa_case("fp16_mask", (1, 2, 9, 16), (1, 2, 13, 16), mask=((9, 13), _T), dtype=torch.float16),
    _sdpa_case("fp16_causal", (1, 2, 9, 16), (1, 2, 13, 16), is_causal=True, dtype=torch.float16),
]


def _sdpa_inputs(case):
    g = torch.Generator().manual_seed(21)
    dtype = case["kw"].pop("dtype", torch.float32)
    q, k, v = (torch.randn(s, generator=g).to(DEVICE, dtype) for s in (case["q"], case["k"], case["v"]))
    spec, mask = case["mask"], None
    if spec == "list":
        mask = [[True]]
    elif spec == "half_k":
        k = k.half()
    elif spec is not None:
        shape, mdtype = spec
        if shape == "rows":  # rows 2 and 5 of every head see no key
            keep = torch.rand(q.shape[-2], k.shape[-2], generator=g) > 0.3
            keep[[2, 5]] = False
            mask = keep if mdtype == torch.bool else torch.where(keep, 0.0, float("-inf"))
        elif mdtype == torch.bool:
            mask = torch.rand(shape, generator=g) > 0.3
        elif mdtype == torch.int32:
            mask = torch.ones(shape, dtype=mdtype)
        elif mdtype == "grad":
            mask = torch.randn(shape, generator=g)
        else:
            mask = torch.randn(shape, generator=g).to(mdtype)
        mask = mask.to(DEVICE).requires_grad_(mdtype == "grad")
    return q, k, v, mask


def _sdpa_call(fn, q, k, v, mask, kw):
    """(out, grads of q, k, v) of one call, or the exception it raised."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    try:
        out = fn(*leaves, attn_mask=mask, **kw)
    except Exception as e:  # the exception is the result
        return e
    if not out.requires_grad:
        return out, None
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(5)).to(out.device, out.dtype)
    return out, torch.autograd.grad(out, leaves, dout)


@pytest.mark.parametrize("case", SDPA_GRID)
@pytest.mark.parametrize("backend", BACKENDS)
def test_sdpa_drop_in_is_torch(backend, case, monkeypatch):
    """Every call torch accepts gives torch's result (and gradients); every call torch rejects raises an
    exception of torch's type. On the Triton road the kernel runs exactly the calls marked ``kernel``."""
    monkeypatch.setenv("EMBEDATTN_BACKEND", backend)
    calls = []
    orig = ea_attention._run
    monkeypatch.setattr(ea_attention, "_run", lambda be, *a: calls.append(be) or orig(be, *a))
    case = dict(case, kw=dict(case["kw"]))
    q, k, v, mask = _sdpa_inputs(case)
    kw = case["kw"]
    want = _sdpa_call(F.scaled_dot_product_attention, q, k, v, mask, kw)
    got = _sdpa_call(embedattn.scaled_dot_product_attention, q, k, v, mask, kw)
    assert calls == (["triton"] if case["kernel"] and backend == "triton" else []), calls or "torch ran"
    if isinstance(want, Exception):
        assert isinstance(got, type(want)), f"torch raised {want!r}, the drop-in {got!r}"
        return
    assert not isinstance(got, Exception), f"torch accepted the call, the drop-in raised {got!r}"
    tol = dict(atol=2e-3, rtol=2e-3) if q.dtype == torch.float16 else dict(atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(got[0], want[0], **tol, equal_nan=True)
    for name, a, b in zip(("dq", "dk", "dv"), got[1] or (), want[1] or ()):
        torch.testing.assert_close(a, b, **tol, equal_nan=True, msg=lambda m, n=name: f"{n}: {m}")


def test_sdpa_dropout_on_reference_backend_is_torchs():
    q = torch.randn(1, 2, 8, 16)
    torch.manual_seed(0)
    a = embedattn.scaled_dot_product_attention(q, q, q, dropout_p=0.5)
    torch.manual_seed(0)
    b = F.scaled_dot_product_attention(q, q, q, dropout_p=0.5)
    assert torch.equal(a, b)


# ---------------------------------------------------------------- dispatch and bad input
def test_dispatch(monkeypatch):
    q = torch.randn(1, 1, 4, 16)
    assert embedattn.resolve(None, q) == "reference"  # auto on CPU
    monkeypatch.setenv("EMBEDATTN_BACKEND", "reference")
    assert embedattn.resolve(None, q) == "reference"
    with pytest.raises(ValueError, match="backend"):
        embedattn.resolve("cuda", q)
    with pytest.raises(ValueError, match="backend"):
        embedattn.attention(q, q, q, backend="fast")
    if "triton" in BACKENDS and not ON_CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            embedattn.attention(q, q, q, backend="triton")


S = ((1, 2, 4, 16), (1, 2, 5, 16), (1, 2, 5, 16))
BAD = [
    ("rank", lambda: ((1, 4, 16), (1, 1, 4, 16), (1, 1, 4, 16)), {}, ValueError, "4-D"),
    ("batch", lambda: ((2, 1, 4, 16), (1, 1, 4, 16), (1, 1, 4, 16)), {}, ValueError, "batch"),
    ("head_dim", lambda: ((1, 1, 4, 16), (1, 1, 4, 32), (1, 1, 4, 32)), {}, ValueError, "head dim"),
    ("kv_shape", lambda: ((1, 1, 4, 16), (1, 1, 4, 16), (1, 1, 5, 16)), {}, ValueError, "same shape"),
    ("gqa", lambda: ((1, 3, 4, 16), (1, 2, 4, 16), (1, 2, 4, 16)), {}, ValueError, "multiple"),
    ("mask_shape", lambda: S, {"attn_mask": torch.ones(3, 5, dtype=torch.bool)},
     ValueError, "broadcastable"),
    ("mask_grad", lambda: S, {"attn_mask": torch.zeros(4, 5, requires_grad=True)},
     ValueError, "requires grad"),
    ("mask_dtype", lambda: S, {"attn_mask": torch.ones(4, 5, dtype=torch.int32)},
     TypeError, "attn_mask"),
    ("scale", lambda: S, {"scale": float("nan")}, ValueError, "scale"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,shapes,kw,exc,match", BAD, ids=[b[0] for b in BAD])
def test_bad_input(backend, name, shapes, kw, exc, match):
    q, k, v = (torch.randn(s, device=DEVICE) for s in shapes())
    kw = {key: (val.to(DEVICE) if isinstance(val, torch.Tensor) and not val.requires_grad else val)
          for key, val in kw.items()}
    with pytest.raises(exc, match=match):
        embedattn.attention(q, k, v, backend=backend, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_dtypes_and_devices(backend):
    q = torch.randn(1, 1, 4, 16, device=DEVICE)
    with pytest.raises(TypeError, match="dtype"):
        embedattn.attention(q, q.half(), q, backend=backend)
    with pytest.raises(TypeError, match="dtype"):
        embedattn.attention(q.int(), q.int(), q.int(), backend=backend)
    with pytest.raises(TypeError, match="Tensor"):
        embedattn.attention(q, [1, 2], q, backend=backend)
    with pytest.raises(ValueError, match="device"):
        embedattn.attention(q, q.to("meta"), q, backend=backend)
    if backend == "triton":
        with pytest.raises(TypeError, match="dtype"):
            embedattn.attention(q.double(), q.double(), q.double(), backend=backend)
        big = torch.randn(1, 1, 2, 520, device=DEVICE)
        with pytest.raises(ValueError, match="head dim"):
            embedattn.attention(big, big, big, backend=backend)
        with pytest.raises(ValueError, match="value head dim"):
            embedattn.attention(q, q, big[:, :, :1].expand(1, 1, 4, 520), backend=backend)


# one line per argument: wrong types raise TypeError, values out of range ValueError, each naming the argument
_QP = lambda: torch.randn(5, 2, 16, device=DEVICE)  # a packed (total, H, D) tensor
_CU = lambda: torch.tensor([0, 5], device=DEVICE)
_KV = lambda: torch.randn(1, 2, 8, 16, device=DEVICE)
ARGS = [
    ("causal_str", "attention", dict(causal="no"), TypeError, "causal"),
    ("causal_int", "attention", dict(causal=1), TypeError, "causal"),
    ("return_lse_int", "attention", dict(return_lse=1), TypeError, "return_lse"),
    ("seed_float", "attention", dict(seed=1.5, dropout_p=0.1), TypeError, "seed"),
    ("seed_2**70", "attention", dict(seed=2**70, dropout_p=0.1), ValueError, "seed"),
    ("seed_negative", "attention", dict(seed=-1, dropout_p=0.1), ValueError, "seed"),
    ("scale_str", "attention", dict(scale="a"), TypeError, "scale"),
    ("scale_inf", "attention", dict(scale=float("inf")), ValueError, "scale"),
    ("softcap_str", "attention", dict(softcap="1"), TypeError, "softcap"),
    ("softcap_bool", "attention", dict(softcap=True), TypeError, "softcap"),
    ("softcap_negative", "attention", dict(softcap=-1.0), ValueError, "softcap"),
    ("dropout_str", "attention", dict(dropout_p="0.1"), TypeError, "dropout_p"),
    ("dropout_bool", "attention", dict(dropout_p=True), TypeError, "dropout_p"),
    ("dropout_1", "attention", dict(dropout_p=1.0), ValueError, "dropout_p"),
    ("window_str", "attention", dict(window="ab"), TypeError, "window"),
    ("window_float", "attention", dict(window=(1.5, 0)), TypeError, "window"),
    ("window_bool", "attention", dict(window=(True, 0)), TypeError, "window"),
    ("window_len", "attention", dict(window=(1,)), ValueError, "window"),
    ("causal_offset_float", "attention", dict(causal_offset=1.5), TypeError, "causal_offset"),
    ("causal_offset_2**40", "attention", dict(causal_offset=2**40), ValueError, "causal_offset"),
    ("max_seqlen_float", "varlen", dict(max_seqlen_q=7.5), TypeError, "max_seqlen_q"),
    ("max_seqlen_none", "varlen", dict(max_seqlen_k=None), TypeError, "max_seqlen_k"),
    ("max_seqlen_negative", "varlen", dict(max_seqlen_k=-1), ValueError, "max_seqlen_k"),
    ("varlen_causal_str", "varlen", dict(causal="yes"), TypeError, "causal"),
    ("num_splits_negative", "kvcache", dict(num_splits=-1), ValueError, "num_splits"),
    ("num_splits_float", "kvcache", dict(num_splits=2.5), TypeError, "num_splits"),
    ("kvcache_causal_str", "kvcache", dict(causal="no"), TypeError, "causal"),
    ("check_bounds_str", "kvcache", dict(check_bounds="always"), ValueError, "check_bounds"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,entry,kw,exc,match", ARGS, ids=[a[0] for a in ARGS])
def test_bad_argument_types_and_ranges(backend, name, entry, kw, exc, match):
    q = torch.randn(1, 2, 4, 16, device=DEVICE)
    with pytest.raises(exc, match=match):
        if entry == "attention":
            embedattn.attention(q, q, q, backend=backend, **kw)
        elif entry == "varlen":
            kw = dict(dict(max_seqlen_q=5, max_seqlen_k=5), **kw)
            embedattn.attention_varlen(_QP(), _QP(), _QP(), _CU(), _CU(), backend=backend, **kw)
        else:
            embedattn.attention_with_kvcache(q[:, :, :1], _KV(), _KV(), torch.tensor([3], device=DEVICE),
                                             backend=backend, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_entries_reject_non_tensors_with_type_errors(backend):
    q, kv = torch.randn(1, 2, 1, 16, device=DEVICE), torch.randn(1, 2, 8, 16, device=DEVICE)
    lens = torch.tensor([3], device=DEVICE)
    with pytest.raises(TypeError, match="k must be a torch.Tensor"):
        embedattn.attention(q, [1.0], q, backend=backend)
    with pytest.raises(TypeError, match="q must be a torch.Tensor"):
        embedattn.attention_varlen([1.0], _QP(), _QP(), _CU(), _CU(), 5, 5, backend=backend)
    with pytest.raises(TypeError, match="k_cache must be a torch.Tensor"):
        embedattn.attention_with_kvcache(q, None, kv, lens, backend=backend)
    with pytest.raises(TypeError, match="k_new and v_new"):
        embedattn.attention_with_kvcache(q, kv, kv.clone(), lens, [0.0], [0.0], backend=backend)
    with pytest.raises(ValueError, match="3-D"):
        embedattn.attention_varlen(q, _QP(), _QP(), _CU(), _CU(), 5, 5, backend=backend)

def test_dropout_mask_debug_path_errors(monkeypatch):
    """attention_dropout_mask: a CUDA device where there is none, or the Triton backend on CPU tensors without
    the interpreter, is one clear error, not one from deep inside torch or Triton."""
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            embedattn.attention_dropout_mask((1, 1, 4, 4), 0.5, 1, device="cuda")
    with pytest.raises(ValueError, match="device"):
        embedattn.attention_dropout_mask((1, 1, 4, 4), 0.5, 1, device="tpu9")
    with pytest.raises(TypeError, match="device"):
        embedattn.attention_dropout_mask((1, 1, 4, 4), 0.5, 1, device=3.5)
    with pytest.raises(ValueError, match="seed"):
        embedattn.attention_dropout_mask((1, 1, 4, 4), 0.5, 2**70)
    assert embedattn.attention_dropout_mask((1, 1, 4, 4), 0.5, 1, device="cpu").shape == (1, 1, 4, 4)
    if "triton" in BACKENDS and not ON_CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            embedattn.attention_dropout_mask((1, 1, 4, 4), 0.5, 1, device="cpu", backend="triton")


_LATE_INTERPRET = """
import os, torch
{preamble}
os.environ["TRITON_INTERPRET"] = "1"
import embedattn
q = torch.randn(1, 1, 4, 16)
try:
    embedattn.attention(q, q, q, backend="triton")
    print("RAN")
except RuntimeError as e:
    print(type(e).__name__, e)
"""


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs Triton")
@pytest.mark.parametrize("preamble", [
    "import embedattn.kernels.attention",
    "import triton",
])
def test_triton_interpret_set_after_import_is_one_clear_error(preamble):
    """TRITON_INTERPRET=1 set after Triton (or embedattn's kernels) was imported: backend='triton' raises the
    README's explanation, not Triton's "0 active drivers" or an interpreter error."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", _LATE_INTERPRET.format(preamble=preamble)], env=env,
                       capture_output=True, text=True, timeout=300)
    out = (r.stdout + r.stderr).strip()
    assert r.returncode == 0 and "set after" in out and "RuntimeError" in out, out[-2000:]


def test_reference_float64_matches_math():
    """The oracle itself, against an independent one-liner (softmax of explicit scores)."""
    q, k, v = (torch.randn(2, 3, 5, 8, dtype=torch.float64) for _ in range(3))
    want = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), dim=-1) @ v
    torch.testing.assert_close(reference.attention(q, k, v), want)


# ---------------------------------------------------------------- log-sum-exp gradient, double backward
@pytest.mark.parametrize("only_lse", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_lse_is_differentiable(backend, only_lse):
    """A loss that uses the returned lse (e.g. merging partial attentions) gets its gradient, on both
    backends; rows with no visible key (causal, Nq > Nk) and fully masked rows stay finite."""
    q, k, v = _inputs(1, 4, 2, 21, 15, 24, torch.float32, seed=31)
    mask = torch.rand(1, 1, 21, 15, generator=torch.Generator().manual_seed(2)).to(DEVICE) > 0.2
    mask[..., 9, :] = False
    g = torch.Generator().manual_seed(3)
    w_out = torch.randn(q.shape, generator=g).to(DEVICE)
    w_lse = torch.randn(1, 4, 21, generator=g).to(DEVICE)

    def grads(leaves, be):
        out, lse = embedattn.attention(*leaves, causal=True, attn_mask=mask, return_lse=True, backend=be)
        lse = torch.where(torch.isfinite(lse), lse, 0.0)
        loss = (lse * w_lse.to(lse.dtype)).sum()
        if not only_lse:
            loss = loss + (out * w_out.to(out.dtype)).sum()
        gr = torch.autograd.grad(loss, leaves, allow_unused=True)  # lse alone does not depend on v
        return [torch.zeros_like(t) if d is None else d for t, d in zip(leaves, gr)]

    got = grads([t.clone().requires_grad_() for t in (q, k, v)], backend)
    want = grads([t.double().requires_grad_() for t in (q, k, v)], "reference")
    for name, a, b in zip(("dq", "dk", "dv"), got, want):
        assert torch.isfinite(a).all(), name
        torch.testing.assert_close(a.double(), b, atol=2e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_lse_gradient_with_additive_neg_inf_rows_is_finite(backend):
    """A row fully masked by an additive -inf mask, with the returned lse in the loss: finite gradients,
    zero on that row, and the rest equal to the float64 reference (which gave NaN here)."""
    q, k, v = _inputs(1, 2, 1, 7, 9, 16, torch.float32, seed=33)
    mask = torch.zeros(7, 9, device=DEVICE)
    mask[3] = float("-inf")
    mask[5, ::2] = float("-inf")

    def grads(leaves, be):
        out, lse = embedattn.attention(*leaves, attn_mask=mask.to(leaves[0].dtype), return_lse=True, backend=be)
        assert torch.isneginf(lse[:, :, 3]).all() and torch.isfinite(lse[:, :, 5]).all()
        loss = out.sum() + torch.where(torch.isfinite(lse), lse, 0.0).sum()
        return torch.autograd.grad(loss, leaves)

    got = grads([t.clone().requires_grad_() for t in (q, k, v)], backend)
    want = grads([t.double().requires_grad_() for t in (q, k, v)], "reference")
    for name, a, b in zip(("dq", "dk", "dv"), got, want):
        assert torch.isfinite(a).all() and torch.isfinite(b).all(), name
        torch.testing.assert_close(a.double(), b, atol=2e-5, rtol=1e-4, msg=name)
    assert torch.equal(got[0][:, :, 3], torch.zeros_like(got[0][:, :, 3]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_keys_gives_zeros_whatever_the_inputs_hold(backend):
    """Nk = 0: zeros (lse -inf) and zero gradients, also when q holds inf and NaN."""
    q = torch.randn(1, 2, 3, 16, device=DEVICE)
    q[0, 0, 0, 0], q[0, 1, 2, 5] = float("inf"), float("nan")
    k = torch.randn(1, 2, 0, 16, device=DEVICE)
    leaves = [t.clone().requires_grad_() for t in (q, k, k)]
    out, lse = embedattn.attention(*leaves, return_lse=True, backend=backend)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()
    grads = torch.autograd.grad(out.sum(), leaves)
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_seed_none_follows_torch_generator(backend):
    """seed=None: torch.manual_seed reproduces a call; consecutive calls draw different masks."""
    q = torch.randn(1, 2, 8, 16, device=DEVICE)
    run = lambda: embedattn.attention(q, q, q, dropout_p=0.5, backend=backend)
    torch.manual_seed(123)
    a, b = run(), run()
    torch.manual_seed(123)
    assert torch.equal(run(), a)
    assert not torch.equal(a, b)


def test_double_backward_raises():
    if "triton" not in BACKENDS:
        pytest.skip("triton not installed")
    q, k, v = (t.requires_grad_() for t in _inputs(1, 2, 2, 5, 7, 16, torch.float32, seed=4))
    out = embedattn.attention(q, k, v, backend="triton")
    dout = torch.randn_like(out).requires_grad_()  # double backward through the grad output (HVPs)
    (dq,) = torch.autograd.grad(out, q, dout, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice|once_differentiable"):
        dq.sum().backward()


# ---------------------------------------------------------------- offsets past 2^31 elements
def _huge_rows(n_rows, row_stride, dtype, seed):
    """A (1, 1, n_rows, 16) view whose rows lie row_stride elements apart, so row offsets pass 2^31:
    the storage is reserved, but only the pages of the rows are touched. Skips where it cannot be had."""
    try:
        buf = torch.empty(n_rows * row_stride + 16, dtype=dtype, device=DEVICE)
    except (RuntimeError, MemoryError):
        pytest.skip("cannot reserve the storage")
    x = buf.as_strided((1, 1, n_rows, 16), (0, 0, row_stride, 1))
    x.copy_(torch.randn(1, 1, n_rows, 16, generator=torch.Generator().manual_seed(seed)).to(DEVICE, dtype))
    return x


def test_mask_offsets_past_int32():
    """A mask plane of more than 2^31 elements (Nq * Nk at long context): its offsets are int64."""
    if "triton" not in BACKENDS:
        pytest.skip("triton not installed")
    big = 1 << 30
    try:
        buf = torch.empty(2 * big + 64, dtype=torch.bool, device=DEVICE)
    except (RuntimeError, MemoryError):
        pytest.skip("cannot reserve the storage")
    mask = buf.as_strided((3, 5), (big, 1))
    mask.copy_(torch.rand(3, 5, generator=torch.Generator().manual_seed(1)) > 0.3)
    mask[:, 0] = True
    q, k, v = _inputs(1, 1, 1, 3, 5, 16, torch.float32, seed=6)
    _check(q, k, v, "triton", mask=mask)
    _check(q, k, v, "triton", mask=mask.contiguous())


def test_row_offsets_past_int32():
    """q/k/v/dout rows 2^24 elements apart, 130 rows: row offsets pass 2^31 in every kernel."""
    if "triton" not in BACKENDS:
        pytest.skip("triton not installed")
    x = _huge_rows(130, 1 << 24, torch.float16, seed=8)
    dout = _huge_rows(130, 1 << 24, torch.float16, seed=9)
    x.requires_grad_()  # one leaf as q, k and v: its gradient is dq + dk + dv
    out = embedattn.attention(x, x, x, causal=True, backend="triton")
    (got,) = torch.autograd.grad(out, x, dout)
    x64 = x.detach().double().requires_grad_()
    ref = reference.attention(x64, x64, x64, causal=True)
    (want,) = torch.autograd.grad(ref, x64, dout.double())
    torch.testing.assert_close(out.double(), ref, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(got.double(), want, atol=5e-3, rtol=5e-3)


# ---------------------------------------------------------------- more (batch, head) programs than a grid axis
def test_batch_heads_fold_over_grid_axes(monkeypatch):
    """B * H goes on grid axes 1 and 2 (CUDA caps each at 65535): with the cap lowered to 3, every kernel
    (forward, split-KV, preprocess, dK/dV, dQ, varlen, the dropout debug mask) still covers each
    (batch, head) exactly once."""
    if "triton" not in BACKENDS:
        pytest.skip("triton not installed")
    from embedattn.kernels import _utils as kernels_utils

    keep = embedattn.attention_dropout_mask((2, 4, 3, 40), 0.3, 5, device=DEVICE, backend="triton")
    monkeypatch.setattr(kernels_utils, "MAX_GRID_Y", 3)
    assert torch.equal(keep, embedattn.attention_dropout_mask((2, 4, 3, 40), 0.3, 5, device=DEVICE, backend="triton"))
    q, k, v = _inputs(2, 4, 2, 9, 13, 16, torch.float32, seed=12)  # B*H = 8, B*Hkv = 4: grids (3, 3), (3, 2)
    _check(q, k, v, "triton", causal=True)
    lens = torch.tensor([5, 13], dtype=torch.int32, device=DEVICE)
    out = embedattn.attention_with_kvcache(q[:, :, :1], k, v, lens, num_splits=2, backend="triton")
    ref = reference.attention_with_kvcache(q[:, :, :1].double(), k.double(), v.double(), lens)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    cu = torch.tensor([0, 4, 9], dtype=torch.int32, device=DEVICE)
    qp, kp = q[0].transpose(0, 1).contiguous(), k[0].transpose(0, 1)[:9].contiguous()
    leaves = [t.clone().requires_grad_() for t in (qp, kp, kp)]
    out = embedattn.attention_varlen(*leaves, cu, cu, 5, 5, causal=True, backend="triton")
    r64 = [t.double().requires_grad_() for t in (qp, kp, kp)]
    ref = reference.attention_varlen(*r64, cu, cu, causal=True)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, leaves, g), torch.autograd.grad(ref, r64, g.double())):
        torch.testing.assert_close(a.double(), b, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not ON_CUDA, reason="the grid limit exists on CUDA only")
def test_more_than_65535_batch_heads_cuda():
    q, k, v = _inputs(2100, 32, 8, 1, 40, 64, torch.float16, seed=14)  # B*H = 67200 decoding programs
    _check(q, k, v, "triton", grads=True)
