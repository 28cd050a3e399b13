"""Attention: Triton kernels and reference against a float64 oracle, drop-in parity, bad input."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import BACKENDS, DEVICE, DTYPES, ON_CUDA, ROADS, assert_fa_close, on_road, skip_if_unsupported

import embedattn
from embedattn import reference

# (B, Hq, Hkv, Nq, Nk, D, causal): odd tails, Nq != Nk both ways, GQA/MQA, odd head dims
CASES = [
    (1, 2, 2, 1, 7, 16, False),
    (2, 2, 1, 7, 33, 40, True),
    (1, 4, 2, 33, 33, 64, True),
    (1, 2, 2, 33, 129, 80, False),
    (1, 3, 1, 129, 33, 24, True),
    (2, 2, 2, 65, 65, 32, False),
    (1, 2, 1, 17, 1, 48, True),
    (1, 1, 1, 40, 23, 128, True),
]
if ON_CUDA:
    CASES += [
        (2, 8, 2, 1000, 1000, 128, True),
        (1, 4, 4, 513, 2049, 64, False),
        (1, 4, 1, 257, 257, 256, True),
        (1, 2, 2, 300, 300, 160, False),
        (1, 2, 2, 129, 300, 96, True),
    ]


def _inputs(B, Hq, Hkv, Nq, Nk, D, dtype, seed, device=DEVICE):
    g = torch.Generator(device="cpu").manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float32).to(device=device, dtype=dtype)
    return mk(B, Hq, Nq, D), mk(B, Hkv, Nk, D), mk(B, Hkv, Nk, D)


def _check(q, k, v, backend, *, causal=False, mask=None, grads=True, seed=0, road="eager"):
    """Kernel vs float64 reference, with plain PyTorch in the same dtype as the error yardstick."""
    dtype = q.dtype
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    fn = on_road(road, lambda q, k, v: embedattn.attention(q, k, v, causal=causal, attn_mask=mask, backend=backend))
    out = fn(*leaves)
    assert out.shape == q.shape and out.dtype == dtype
    ref_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
    mask64 = mask.double() if mask is not None and mask.is_floating_point() else mask
    ref = reference.attention(*ref_in, causal=causal, attn_mask=mask64)
    plain_in = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    plain = reference.attention(*plain_in, causal=causal, attn_mask=mask, upcast=False)
    assert_fa_close(out, ref, plain, "out")
    if not grads:
        return
    g = torch.Generator(device="cpu").manual_seed(seed + 1)
    dout = torch.randn(out.shape, generator=g).to(device=q.device, dtype=dtype)
    got = torch.autograd.grad(out, leaves, dout)
    want = torch.autograd.grad(ref, ref_in, dout.double())
    base = torch.autograd.grad(plain, plain_in, dout)
    for name, a, b, c in zip(("dq", "dk", "dv"), got, want, base):
        assert a.shape == b.shape
        assert_fa_close(a, b, c, name)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}H{}x{}N{}x{}D{}{}".format(*c[:6], "c" if c[6] else ""))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("road", ROADS)
def test_forward_backward(road, backend, dtype, case):
    skip_if_unsupported(backend, dtype)
    B, Hq, Hkv, Nq, Nk, D, causal = case
    q, k, v = _inputs(B, Hq, Hkv, Nq, Nk, D, dtype, seed=hash(case) % 1000)
    _check(q, k, v, backend, causal=causal, road=road)


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


# ---------------------------------------------------------------- drop-in parity with torch SDPA
SDPA_CASES = [
    dict(shape_q=(2, 3, 17, 32), shape_k=(2, 3, 17, 32)),
    dict(shape_q=(2, 3, 17, 32), shape_k=(2, 3, 29, 32), is_causal=True),  # top-left alignment
    dict(shape_q=(2, 3, 29, 32), shape_k=(2, 3, 11, 32), is_causal=True),
    dict(shape_q=(2, 17, 24), shape_k=(2, 9, 24)),  # 3-D
    dict(shape_q=(1, 4, 9, 16), shape_k=(1, 2, 21, 16), enable_gqa=True, is_causal=True),
    dict(shape_q=(2, 2, 9, 16), shape_k=(2, 2, 21, 16), mask="bool"),
    dict(shape_q=(2, 2, 9, 16), shape_k=(2, 2, 21, 16), mask="float", scale=0.2),
]


@pytest.mark.parametrize("case", SDPA_CASES)
def test_sdpa_drop_in_parity(case, monkeypatch):
    if "triton" not in BACKENDS:
        pytest.skip("triton not installed")
    monkeypatch.setenv("EMBEDATTN_BACKEND", "triton")
    g = torch.Generator().manual_seed(21)
    q = torch.randn(case["shape_q"], generator=g).to(DEVICE).requires_grad_()
    k = torch.randn(case["shape_k"], generator=g).to(DEVICE).requires_grad_()
    v = torch.randn(case["shape_k"], generator=g).to(DEVICE).requires_grad_()
    mask = None
    if case.get("mask") == "bool":
        mask = (torch.rand(q.shape[-2], k.shape[-2], generator=g) > 0.4).to(DEVICE)
    elif case.get("mask") == "float":
        mask = torch.randn(q.shape[0], 1, q.shape[-2], k.shape[-2], generator=g).to(DEVICE)
    kw = dict(attn_mask=mask, is_causal=case.get("is_causal", False), scale=case.get("scale"),
              enable_gqa=case.get("enable_gqa", False))
    out = embedattn.scaled_dot_product_attention(q, k, v, **kw)
    want = F.scaled_dot_product_attention(q, k, v, **kw)
    torch.testing.assert_close(out, want, atol=2e-5, rtol=1e-4)
    dout = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), dout), torch.autograd.grad(want, (q, k, v), dout)):
        torch.testing.assert_close(a, b, atol=5e-5, rtol=1e-4)


def test_sdpa_drop_in_errors_like_torch():
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(RuntimeError):
        embedattn.scaled_dot_product_attention(q, q, q, attn_mask=torch.ones(4, 4, dtype=torch.bool), is_causal=True)
    with pytest.raises(RuntimeError):
        embedattn.scaled_dot_product_attention(q, q.half(), q)
    with pytest.raises(RuntimeError):
        embedattn.scaled_dot_product_attention(q, torch.randn(1, 1, 4, 8), torch.randn(1, 1, 4, 8))


@pytest.mark.parametrize("backend", BACKENDS)
def test_sdpa_drop_in_mask_dtype_and_full_dropout_like_torch(backend, monkeypatch):
    """torch rejects a float mask that is neither float32 nor the query's dtype, and dropout_p=1 gives zeros."""
    monkeypatch.setenv("EMBEDATTN_BACKEND", backend)
    q = torch.randn(1, 2, 4, 16, device=DEVICE)
    with pytest.raises(RuntimeError, match="attn_mask dtype"):
        F.scaled_dot_product_attention(q, q, q, attn_mask=torch.zeros(4, 4, dtype=torch.float64, device=DEVICE))
    with pytest.raises(TypeError, match="attn_mask dtype"):
        embedattn.scaled_dot_product_attention(q, q, q, attn_mask=torch.zeros(4, 4, dtype=torch.float64,
                                                                                device=DEVICE))
    out = embedattn.scaled_dot_product_attention(q, q, q, dropout_p=1.0)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, q, q, dropout_p=1.0))


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
        big = torch.randn(1, 1, 2, 320, device=DEVICE)
        with pytest.raises(ValueError, match="head dim"):
            embedattn.attention(big, big, big, backend=backend)


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
    from embedattn.kernels import attention as kernels

    keep = embedattn.attention_dropout_mask((2, 4, 3, 40), 0.3, 5, device=DEVICE, backend="triton")
    monkeypatch.setattr(kernels, "MAX_GRID_Y", 3)
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
