"""embedattn.flash_attn_interface against a float64 oracle written from FlashAttention 2's documented semantics.

The oracle (``_fa``) works in FlashAttention's (B, N, H, D) layout and shares no code with embedattn: scores
``scale * q k^T``, softcap ``c * tanh(s / c)``, ALiBi ``-slope * |i + Nk - Nq - j|``, causal bottom-right
``j <= i + Nk - Nq``, window ``[i + Nk - Nq - left, i + Nk - Nq + right]`` (-1 unbounded), query head h reading
kv head ``h // (H / Hkv)``, rows with no key giving 0, lse the log-sum-exp of the scores. Errors follow
FlashAttention's rule (at most 2x plain PyTorch's error in the same dtype, both against float64).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import BACKENDS, DEVICE, DTYPES, ROADS, assert_fa_close, needs_triton, on_road, rand, skip_if_unsupported

import embedattn
from embedattn import reference
from embedattn._checks import seed_tensor
from embedattn.attention import AttnSpec
from embedattn.flash_attn_interface import (
    flash_attn_func,
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_varlen_qkvpacked_func,
    flash_attn_with_kvcache,
)
from embedattn.reference import _philox


# ------------------------------------------------------------------------------------------------ the oracle
def _fa(q, k, v, *, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
        dropout_p=0.0, dropout_keep=None, scores=False, sinks=None):
    """FlashAttention's documented forward in q's dtype: q (B, Nq, H, D), k/v (B, Nk, Hkv, D) -> (out, lse).
    With ``dropout_p``, ``dropout_keep`` (B, H, Nq, Nk) bool is the dropout mask (probabilities * keep / (1 - p)); with
    ``scores`` also the masked scores (B, H, Nq, Nk) (-inf where masked). ``sinks`` (H,): one more logit per head
    in each row's denominator, with no value (gpt-oss), included in the lse."""
    B, Nq, H, D = q.shape
    Nk, Hkv = k.shape[1], k.shape[2]
    kv_head = torch.arange(H, device=q.device) // (H // Hkv)
    k, v = k[:, :, kv_head], v[:, :, kv_head]
    scale = D ** -0.5 if softmax_scale is None else softmax_scale
    s = torch.einsum("bihd,bjhd->bhij", q, k) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    i = torch.arange(Nq, device=q.device)[:, None]
    j = torch.arange(Nk, device=q.device)[None, :]
    diag = i + Nk - Nq
    if alibi_slopes is not None:
        slopes = alibi_slopes.to(s.dtype)
        slopes = slopes.view(1, H, 1, 1) if slopes.dim() == 1 else slopes.view(B, H, 1, 1)
        s = s - slopes * (diag - j).abs().to(s.dtype)
    keep = torch.ones(Nq, Nk, dtype=torch.bool, device=q.device)
    if causal:
        keep &= j <= diag
    left, right = window_size
    if left >= 0:
        keep &= j >= diag - left
    if right >= 0:
        keep &= j <= diag + right
    s = s.masked_fill(~keep, float("-inf"))
    if sinks is None:
        lse = torch.logsumexp(s, dim=-1)
    else:
        lse = torch.logsumexp(torch.cat([s, sinks.to(s.dtype).view(1, H, 1, 1).expand(B, H, Nq, 1)], dim=-1), dim=-1)
    p = torch.nan_to_num(torch.exp(s - lse[..., None]), nan=0.0)  # a row with no key: exp(-inf - -inf)
    if dropout_p > 0:
        p = p * dropout_keep.to(p.dtype) / (1 - dropout_p)
    out = torch.einsum("bhij,bjhd->bihd", p, v)
    return (out, lse, s) if scores else (out, lse)


def _fa_varlen(q, k, v, cu_q, cu_k, **kw):
    """Packed (total, H, D): each sequence through _fa. Returns (out (total_q, H, D), lse (H, total_q)). A
    ``dropout_keep`` is FlashAttention's padded (B, H, max_seqlen_q, max_seqlen_k) layout."""
    outs, lses = [], []
    for b in range(cu_q.numel() - 1):
        qs, ks = q[int(cu_q[b]):int(cu_q[b + 1])][None], k[int(cu_k[b]):int(cu_k[b + 1])][None]
        vs = v[int(cu_k[b]):int(cu_k[b + 1])][None]
        kw_b = dict(kw)
        if kw.get("alibi_slopes") is not None and kw["alibi_slopes"].dim() == 2:
            kw_b["alibi_slopes"] = kw["alibi_slopes"][b]
        if kw.get("dropout_keep") is not None:
            kw_b["dropout_keep"] = kw["dropout_keep"][b:b + 1, :, :qs.shape[1], :ks.shape[1]]
        o, lse = _fa(qs, ks, vs, **kw_b)
        outs.append(o[0])
        lses.append(lse[0])
    return torch.cat(outs), torch.cat(lses, dim=1)


def test_oracle_matches_the_softmax_formula_and_the_reference():
    """The oracle itself: one row by the textbook formula (math.exp sums), and the whole against
    embedattn.reference (a different implementation) after the layout change."""
    q, k, v = rand(1, 3, 2, 8, seed=1).double(), rand(1, 6, 1, 8, seed=2).double(), rand(1, 6, 1, 8, seed=3).double()
    slopes = torch.tensor([0.3, 0.7], dtype=torch.float64, device=DEVICE)
    kw = dict(causal=True, window_size=(2, -1), softcap=2.0, alibi_slopes=slopes, softmax_scale=0.4)
    out, lse = _fa(q, k, v, **kw)
    b, i, h = 0, 1, 1  # query 1 of 3 against 6 keys: diagonal key 4, window keeps keys 2..4
    scores = {}
    for j in range(6):
        if 2 <= j <= 4:
            s = 0.4 * sum(float(q[b, i, h, d]) * float(k[b, j, 0, d]) for d in range(8))
            scores[j] = 2.0 * math.tanh(s / 2.0) - 0.7 * abs(i + 3 - j)
    z = sum(math.exp(s) for s in scores.values())
    want = [sum(math.exp(s) / z * float(v[b, j, 0, d]) for j, s in scores.items()) for d in range(8)]
    torch.testing.assert_close(out[b, i, h].cpu(), torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    assert abs(float(lse[b, h, i]) - math.log(z)) < 1e-12
    ref, ref_lse = reference.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True,
                                       window=(2, -1), softcap=2.0, alibi_slopes=slopes, scale=0.4, return_lse=True)
    torch.testing.assert_close(out, ref.transpose(1, 2))
    torch.testing.assert_close(lse, ref_lse)


# ------------------------------------------------------------------------------------------------ dense
def _check(got, fn_args, oracle_kw, dtype, *, lse=None, grads=None, dout_seed=99):
    """got (out) vs the oracle in float64 and in dtype; lse and gradients (of the leaves in fn_args) likewise."""
    r64 = [t.detach().double().requires_grad_(grads is not None) for t in fn_args]
    rp = [t.detach().clone().requires_grad_(grads is not None) for t in fn_args]
    ref, ref_lse = _fa(*r64, **oracle_kw)
    plain, plain_lse = _fa(*rp, **oracle_kw)
    assert_fa_close(got, ref, plain, "out")
    if lse is not None:
        assert lse.dtype == torch.float32 and lse.shape == ref_lse.shape
        fin = torch.isfinite(ref_lse)
        assert torch.equal(torch.isfinite(lse), fin)
        assert_fa_close(lse[fin], ref_lse[fin], plain_lse[fin].float(), "lse", eps=1e-5)
    if grads is None:
        return
    dout = rand(*got.shape, dtype=dtype, seed=dout_seed)
    leaves, got_out = grads
    g = torch.autograd.grad(got_out, leaves, dout)
    w = torch.autograd.grad(ref, r64, dout.double())
    base = torch.autograd.grad(plain, rp, dout)
    for name, a, b, c in zip(("dq", "dk", "dv"), g, w, base):
        assert_fa_close(a, b, c, name)


FEATURES = {
    "plain": {},
    "causal": dict(causal=True),
    "window": dict(window_size=(3, 1)),
    "causal_window": dict(causal=True, window_size=(2, -1)),
    "softcap_scale": dict(softcap=1.5, softmax_scale=0.3),
    "alibi": dict(causal=True, alibi_slopes="bh"),
}


def _features(name, B, H):
    return _features_from(FEATURES, name, B, H)


def _features_from(table, name, B, H):
    kw = dict(table[name])
    if kw.get("alibi_slopes") == "bh":
        kw["alibi_slopes"] = torch.rand(B, H, device=DEVICE)
    return kw


@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_flash_attn_func(backend, dtype, feature):
    """Nq != Nk (bottom-right alignment matters), GQA, every score feature; out, lse and gradients."""
    skip_if_unsupported(backend, dtype)
    B, Nq, Nk, H, Hkv, D = 2, 5, 9, 4, 2, 16
    q, k, v = rand(B, Nq, H, D, dtype=dtype, seed=1), rand(B, Nk, Hkv, D, dtype=dtype, seed=2), \
        rand(B, Nk, Hkv, D, dtype=dtype, seed=3)
    kw = _features(feature, B, H)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse, s_dmask = flash_attn_func(*leaves, return_attn_probs=True, backend=backend, **kw)
    assert s_dmask is None and out.shape == q.shape and out.dtype == dtype
    _check(out, (q, k, v), kw, dtype, lse=lse, grads=(leaves, out))
    assert out.is_contiguous()


class _Ops(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the aten ops a call dispatches that produce floating tensors (data, not lengths or indices)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor) and out.is_floating_point():
            self.ops.append(str(func))
        return out


_COPIES = ("clone", "copy", "contiguous", "_to_copy", "cat", "stack")


@needs_triton
@pytest.mark.parametrize("packed", [False, True])
def test_no_copies_in_or_out(packed):
    """The FlashAttention layout costs no copy: inputs reach the kernel as views and the kernel writes out in
    (B, N, H, D) memory order (contiguous), for plain tensors and for q, k, v sliced from one projection."""
    x = rand(2, 7, 3 * 4 * 16, seed=5).view(2, 7, 12, 16)
    q, k, v = (x[:, :, :4], x[:, :, 4:8], x[:, :, 8:]) if packed else (t.contiguous() for t in x.split(4, dim=2))
    with _Ops() as rec:
        out = flash_attn_func(q, k, v, causal=True, backend="triton")
    copies = [op for op in rec.ops if any(w in op for w in _COPIES)]
    assert not copies, copies
    assert out.is_contiguous() and out.shape == (2, 7, 4, 16)
    want, _ = _fa(q.double(), k.double(), v.double(), causal=True)
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)


@needs_triton
def test_registration_with_fa_layout():
    """The dense forward op's fake allocates its output in q's memory order, as the kernel does (opcheck compares
    them), and flash_attn_func compiles without a graph break, forward and backward."""
    x = rand(2, 5, 3, 2, 16, seed=23)
    q, k, v = (t.transpose(1, 2) for t in x.unbind(2))
    torch.library.opcheck(torch.ops.embedattn.attention_fwd.default,
                          (q, k, v, "default", *AttnSpec(causal=True, scale=0.25).op_args()))
    leaf = x.clone().requires_grad_()
    torch._dynamo.reset()
    fn = torch.compile(lambda t: flash_attn_qkvpacked_func(t, causal=True, backend="triton"), fullgraph=True,
                       backend="aot_eager")
    out = fn(leaf)
    want = flash_attn_qkvpacked_func(x, causal=True, backend="triton")
    torch.testing.assert_close(out, want, atol=0, rtol=0)
    (g,) = torch.autograd.grad(out.sum(), leaf)
    assert g.shape == x.shape and torch.isfinite(g).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_functions(backend):
    """qkvpacked (B, N, 3, H, D) and kvpacked (B, Nk, 2, Hkv, D): equal to flash_attn_func on the slices, gradients
    reaching the packed tensor."""
    qkv = rand(2, 6, 3, 2, 16, seed=6)
    kw = dict(causal=True, window_size=(3, -1), softcap=5.0)
    leaf = qkv.clone().requires_grad_()
    out = flash_attn_qkvpacked_func(leaf, backend=backend, **kw)
    q, k, v = qkv.unbind(2)
    _check(out, (q, k, v), kw, torch.float32)
    dout = rand(*out.shape, seed=7)
    (g,) = torch.autograd.grad(out, leaf, dout)
    r = [t.double().requires_grad_() for t in (q, k, v)]
    want = torch.stack(torch.autograd.grad(_fa(*r, **kw)[0], r, dout.double()), dim=2)
    torch.testing.assert_close(g.double(), want, atol=1e-4, rtol=1e-4)

    q, kv = rand(2, 3, 4, 16, seed=8), rand(2, 8, 2, 2, 16, seed=9)  # GQA, Nq < Nk
    out, lse, none = flash_attn_kvpacked_func(q, kv, causal=True, return_attn_probs=True, backend=backend)
    assert none is None
    _check(out, (q, kv[:, :, 0], kv[:, :, 1]), dict(causal=True), torch.float32, lse=lse)


@needs_triton
def test_empty_rows_and_lse_convention():
    """Nq > Nk with causal: the first Nq - Nk rows see no key (FlashAttention's example): zeros, lse -inf."""
    q, k, v = rand(1, 5, 2, 16, seed=10), rand(1, 2, 2, 16, seed=11), rand(1, 2, 2, 16, seed=12)
    out, lse, _ = flash_attn_func(q, k, v, causal=True, return_attn_probs=True, backend="triton")
    assert torch.equal(out[:, :3], torch.zeros_like(out[:, :3]))
    assert bool((lse[:, :, :3] == float("-inf")).all()) and bool(torch.isfinite(lse[:, :, 3:]).all())
    _check(out, (q, k, v), dict(causal=True), torch.float32, lse=lse)


@needs_triton
def test_dropout_is_embedattn_dropout_from_torch_generator():
    """dropout_p as given, drawn from torch's generator: the same draw as embedattn.attention after the same
    torch.manual_seed, and reproducible."""
    q, k, v = rand(1, 6, 2, 16, seed=13), rand(1, 6, 2, 16, seed=14), rand(1, 6, 2, 16, seed=15)
    torch.manual_seed(3)
    a = flash_attn_func(q, k, v, dropout_p=0.3, causal=True, backend="triton")
    torch.manual_seed(3)
    b = embedattn.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=0.3, causal=True,
                            backend="triton").transpose(1, 2)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert not torch.allclose(a, flash_attn_func(q, k, v, causal=True, backend="triton"))


# ------------------------------------------------------------------------------------------------ window_size
WINDOW_FORMS = {
    "ints": lambda: (3, 1),
    "list": lambda: [3, 1],
    "0-d tensors": lambda: (torch.tensor(3), torch.tensor(1, dtype=torch.int32, device=DEVICE)),
    "int64 pair tensor": lambda: torch.tensor([3, 1]),  # FlashAttention's tests: torch.randint(0, n, (2,))
    "int32 pair tensor": lambda: torch.tensor([3, 1], dtype=torch.int32, device=DEVICE),
    "uint8 pair tensor": lambda: torch.tensor([3, 1], dtype=torch.uint8),
    "numpy ints": lambda: (np.int64(3), np.int32(1)),
}


@pytest.mark.parametrize("backend", BACKENDS)
def test_window_size_any_pair_of_integers(backend):
    """window_size as FlashAttention's tests pass it (a 2-element tensor) and in every other integer form: the
    same answer as the int pair, which is the oracle's; negative sides unbounded; every function takes them."""
    B, Nq, Nk, H, D = 2, 5, 9, 2, 16
    q, k, v = rand(B, Nq, H, D, seed=80), rand(B, Nk, H, D, seed=81), rand(B, Nk, H, D, seed=82)
    base = flash_attn_func(q, k, v, window_size=(3, 1), backend=backend)
    _check(base, (q, k, v), dict(window_size=(3, 1)), torch.float32)
    for name, form in WINDOW_FORMS.items():
        torch.testing.assert_close(flash_attn_func(q, k, v, window_size=form(), backend=backend), base, atol=0, rtol=0,
                                   msg=name)
    full = flash_attn_func(q, k, v, backend=backend)
    torch.testing.assert_close(flash_attn_func(q, k, v, window_size=torch.tensor([-1, -1]), backend=backend), full,
                               atol=0, rtol=0)
    one_side = flash_attn_func(q, k, v, window_size=torch.tensor([-7, 2]), backend=backend)
    _check(one_side, (q, k, v), dict(window_size=(-1, 2)), torch.float32)
    # the packed, varlen and KV-cache functions read it the same way
    qkv = torch.stack([q, k[:, :Nq], v[:, :Nq]], dim=2)
    torch.testing.assert_close(flash_attn_qkvpacked_func(qkv, window_size=torch.tensor([3, 1]), backend=backend),
                               flash_attn_qkvpacked_func(qkv, window_size=(3, 1), backend=backend), atol=0, rtol=0)
    cu_q = torch.tensor([0, Nq, 2 * Nq], dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor([0, Nk, 2 * Nk], dtype=torch.int32, device=DEVICE)
    packed = [t.reshape(-1, H, D) for t in (q, k, v)]
    torch.testing.assert_close(
        flash_attn_varlen_func(*packed, cu_q, cu_k, Nq, Nk, window_size=torch.tensor([3, 1]), backend=backend),
        base.reshape(-1, H, D), atol=1e-6, rtol=1e-6)
    lens = torch.full((B,), Nk, dtype=torch.int32, device=DEVICE)
    torch.testing.assert_close(
        flash_attn_with_kvcache(q, k, v, cache_seqlens=lens, window_size=(torch.tensor(3), 1), backend=backend),
        base, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_window_size_non_integers_name_window_size(backend):
    """Anything but a pair of integers is refused naming FlashAttention's ``window_size`` (not embedattn's
    ``window``), by every function."""
    q = rand(1, 4, 2, 16)
    type_errors = [(1.5, 2), (2, 1.0), (True, 2), (torch.tensor(1.5), 2), (torch.tensor([1, 2]), 3),
                   torch.tensor([1.5, 2.0]), torch.tensor([True, False]), [1], (1, 2, 3), 3, None, "ab"]
    for w in type_errors:
        with pytest.raises(TypeError, match="window_size must be a .left, right. pair of integers") as e:
            flash_attn_func(q, q, q, window_size=w, backend=backend)
        assert "window must" not in str(e.value)
    for w in (torch.tensor([1, 2, 3]), torch.tensor([[1, 2]])):
        with pytest.raises(ValueError, match="window_size .* got a tensor of shape"):
            flash_attn_func(q, q, q, window_size=w, backend=backend)
    qp, cu = q[0], torch.tensor([0, 4], dtype=torch.int32, device=DEVICE)
    lens = torch.tensor([4], dtype=torch.int32, device=DEVICE)
    calls = [lambda w: flash_attn_qkvpacked_func(torch.stack([q] * 3, dim=2), window_size=w, backend=backend),
             lambda w: flash_attn_kvpacked_func(q, torch.stack([q] * 2, dim=2), window_size=w, backend=backend),
             lambda w: flash_attn_varlen_func(qp, qp, qp, cu, cu, 4, 4, window_size=w, backend=backend),
             lambda w: flash_attn_with_kvcache(q, q, q, cache_seqlens=lens, window_size=w, backend=backend)]
    for call in calls:
        with pytest.raises(TypeError, match="window_size"):
            call((1.5, 2))


# ------------------------------------------------------------------------------------------------ S_dmask
S_FEATURES = {
    "plain": {},
    "causal_window": dict(causal=True, window_size=(3, 1)),
    "alibi_softcap_scale": dict(alibi_slopes="bh", softcap=2.0, softmax_scale=0.3),
}


def _unnormalized(s64: torch.Tensor) -> torch.Tensor:
    """FlashAttention's S_dmask magnitude from the oracle's masked scores: exp(s - rowmax(s)), 0 where masked."""
    m = s64.amax(dim=-1, keepdim=True)
    return torch.exp(s64 - torch.where(torch.isfinite(m), m, torch.zeros_like(m)))


@pytest.mark.parametrize("feature", list(S_FEATURES))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_s_dmask_is_the_dropout_the_call_used(backend, dtype, feature):
    """return_attn_probs with dropout: S_dmask (B, H, Nq, Nk) in q's dtype is exp(s - rowmax s) of the oracle's
    scores with the dropped entries negated, and that mask is the one the call used: the output and gradients are
    the oracle's with exactly it (GQA, Nq != Nk, every score feature), the output is the call's without
    return_attn_probs after the same torch.manual_seed, and it is the Philox draw of the seed embedattn's entry
    takes for seed=None."""
    skip_if_unsupported(backend, dtype)
    B, Nq, Nk, H, Hkv, D, p = 2, 6, 11, 4, 2, 16, 0.3
    q, k, v = rand(B, Nq, H, D, dtype=dtype, seed=83), rand(B, Nk, Hkv, D, dtype=dtype, seed=84), \
        rand(B, Nk, Hkv, D, dtype=dtype, seed=85)
    kw = _features_from(S_FEATURES, feature, B, H)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    torch.manual_seed(5)
    out, lse, s_dmask = flash_attn_func(*leaves, dropout_p=p, return_attn_probs=True, backend=backend, **kw)
    torch.manual_seed(5)
    torch.testing.assert_close(out.detach(), flash_attn_func(q, k, v, dropout_p=p, backend=backend, **kw),
                               atol=0, rtol=0)
    assert s_dmask.shape == (B, H, Nq, Nk) and s_dmask.dtype == dtype and not s_dmask.requires_grad
    keep = ~torch.signbit(s_dmask)  # a dropped 0 (a masked entry) is -0.0
    _, _, s64 = _fa(q.double(), k.double(), v.double(), scores=True, **kw)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(s_dmask.abs().double(), _unnormalized(s64), atol=tol, rtol=tol)
    visible = torch.isfinite(s64)
    assert (~keep & visible).any() and (keep & visible).any()
    _check(out, (q, k, v), dict(kw, dropout_p=p, dropout_keep=keep), dtype, lse=lse, grads=(leaves, out))
    torch.manual_seed(5)
    seed = int(seed_tensor(None, DEVICE))
    assert torch.equal(keep, _philox.dropout_keep_mask((B, H, Nq, Nk), p, seed, DEVICE))


@pytest.mark.parametrize("backend", BACKENDS)
def test_s_dmask_rows_without_keys_and_packed_functions(backend):
    """Rows that see no key (causal, Nq > Nk) are zeros in S_dmask as in the output; the packed functions return it
    too; without dropout it is None (as FlashAttention's)."""
    q, k, v = rand(1, 5, 2, 16, seed=86), rand(1, 2, 2, 16, seed=87), rand(1, 2, 2, 16, seed=88)
    out, _, s_dmask = flash_attn_func(q, k, v, 0.4, causal=True, return_attn_probs=True, backend=backend)
    assert torch.equal(out[:, :3], torch.zeros_like(out[:, :3])) and bool((s_dmask[:, :, :3] == 0).all())
    assert bool((s_dmask[:, :, 3:].abs().amax(-1) == 1).all())  # exp(rowmax - rowmax) on each row that sees a key
    qkv = rand(2, 6, 3, 2, 16, seed=89)
    assert flash_attn_qkvpacked_func(qkv, 0.2, return_attn_probs=True, backend=backend)[2].shape == (2, 2, 6, 6)
    assert flash_attn_qkvpacked_func(qkv, 0.0, return_attn_probs=True, backend=backend)[2] is None
    assert flash_attn_kvpacked_func(qkv[:, :4, 0], qkv[:, :, 1:], 0.2, return_attn_probs=True,
                                    backend=backend)[2].shape == (2, 2, 4, 6)
    cu = torch.tensor([0, 4, 9], dtype=torch.int32, device=DEVICE)
    packed = rand(9, 3, 2, 16, seed=90)
    assert flash_attn_varlen_qkvpacked_func(packed, cu, 5, 0.2, return_attn_probs=True,
                                            backend=backend)[2].shape == (2, 2, 5, 5)
    assert flash_attn_varlen_kvpacked_func(packed[:, 0], packed[:, 1:], cu, cu, 5, 5, 0.0, return_attn_probs=True,
                                           backend=backend)[2] is None


# ------------------------------------------------------------------------------------------------ varlen
@pytest.mark.parametrize("feature", ["plain", "causal_window", "alibi"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("road", ROADS)
def test_flash_attn_varlen_func(road, backend, dtype, feature):
    skip_if_unsupported(backend, dtype)
    lq, lk = [3, 1, 6], [5, 4, 6]
    cu_q = torch.tensor([0, 3, 4, 10], dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor([0, 5, 9, 15], dtype=torch.int32, device=DEVICE)
    H, Hkv, D = 4, 2, 16
    q, k, v = rand(10, H, D, dtype=dtype, seed=16), rand(15, Hkv, D, dtype=dtype, seed=17), \
        rand(15, Hkv, D, dtype=dtype, seed=18)
    kw = _features(feature, 3, H)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse, none = on_road(road, lambda q, k, v: flash_attn_varlen_func(
        q, k, v, cu_q, cu_k, max(lq), max(lk), return_attn_probs=True, backend=backend, **kw))(*leaves)
    assert none is None and out.shape == q.shape and lse.shape == (H, 10) and lse.dtype == torch.float32
    r64 = [t.double().requires_grad_() for t in (q, k, v)]
    rp = [t.clone().requires_grad_() for t in (q, k, v)]
    ref, ref_lse = _fa_varlen(*r64, cu_q, cu_k, **kw)
    plain, plain_lse = _fa_varlen(*rp, cu_q, cu_k, **kw)
    assert_fa_close(out, ref, plain)
    assert_fa_close(lse, ref_lse, plain_lse.float(), "lse", eps=1e-5)
    dout = rand(*out.shape, dtype=dtype, seed=19)
    for name, a, b, c in zip(("dq", "dk", "dv"), torch.autograd.grad(out, leaves, dout),
                             torch.autograd.grad(ref, r64, dout.double()), torch.autograd.grad(plain, rp, dout)):
        assert_fa_close(a, b, c, name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_varlen_packed_functions(backend):
    cu = torch.tensor([0, 4, 9], dtype=torch.int32, device=DEVICE)
    qkv = rand(9, 3, 2, 16, seed=20)
    out = flash_attn_varlen_qkvpacked_func(qkv, cu, 5, causal=True, backend=backend)
    want, _ = _fa_varlen(*(t.double() for t in qkv.unbind(1)), cu, cu, causal=True)
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)
    q, kv = rand(9, 4, 16, seed=21), rand(9, 2, 2, 16, seed=22)
    out = flash_attn_varlen_kvpacked_func(q, kv, cu, cu, 5, 5, window_size=(1, 1), backend=backend)
    want, _ = _fa_varlen(q.double(), kv[:, 0].double(), kv[:, 1].double(), cu, cu, window_size=(1, 1))
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)


MASKS_VARLEN = {"causal": dict(causal=True), "local": dict(causal=True, window_size=torch.tensor([3, 0])),
                "alibi": dict(alibi_slopes=True)}


@pytest.mark.parametrize("page", [5, 16])
@pytest.mark.parametrize("mask", list(MASKS_VARLEN))
@pytest.mark.parametrize("backend", BACKENDS)
def test_flash_attn_varlen_func_paged(backend, mask, page):
    """flash_attn_varlen_func(block_table=...): packed queries against keys in FlashAttention's paged layout
    (num_blocks, page_block_size, Hkv, D), pages in a random order, q requiring grad (the forward runs, as
    FlashAttention's test calls it); against the oracle on each sequence's keys gathered from the pages. A backward
    through the pages raises on the Triton backend; the reference differentiates dq."""
    lq, lk = [3, 0, 7], [9, 4, 12]
    cu_q, cu_k = (torch.tensor([0, *np.cumsum(x)], dtype=torch.int32, device=DEVICE) for x in (lq, lk))
    H, Hkv, D, max_blocks = 4, 2, 16, 3
    n_blocks = 3 * max_blocks + 1
    kp, vp = rand(n_blocks, page, Hkv, D, seed=23), rand(n_blocks, page, Hkv, D, seed=24)
    table = torch.randperm(n_blocks, generator=torch.Generator().manual_seed(25))[:3 * max_blocks]
    table = table.view(3, max_blocks).to(DEVICE, torch.int32)
    q = rand(sum(lq), H, D, seed=26).requires_grad_()
    kw = dict(MASKS_VARLEN[mask])
    if kw.pop("alibi_slopes", None):
        kw["alibi_slopes"] = torch.rand(3, H, device=DEVICE)
    out = flash_attn_varlen_func(q, kp, vp, cu_q, cu_k, max(lq), max(lk), block_table=table, backend=backend, **kw)
    k, v = (torch.stack([t[int(table[b, p // page]), p % page] for b, n in enumerate(lk) for p in range(n)])
            for t in (kp, vp))
    if "window_size" in kw:
        kw["window_size"] = tuple(kw["window_size"].tolist())
    want, _ = _fa_varlen(q.detach().double(), k.double(), v.double(), cu_q, cu_k, **kw)
    plain, _ = _fa_varlen(q.detach(), k, v, cu_q, cu_k, **kw)
    assert_fa_close(out, want, plain)
    dout = rand(*out.shape, seed=27)
    if backend == "triton":
        with pytest.raises(NotImplementedError, match="block_table"):
            out.backward(dout)
    else:
        r64 = q.detach().double().requires_grad_()
        ref, _ = _fa_varlen(r64, k.double(), v.double(), cu_q, cu_k, **kw)
        (dq,) = torch.autograd.grad(out, q, dout)
        (dq_ref,) = torch.autograd.grad(ref, r64, dout.double())
        torch.testing.assert_close(dq.double(), dq_ref, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_s_dmask_varlen(backend):
    """Varlen S_dmask in FlashAttention's padded (B, H, max_seqlen_q, max_seqlen_k) layout: sequence b from row and
    column 0, zeros past its lengths (a sequence without queries, one with more queries than keys, max_seqlen
    above every length); the mask is the one the call used (output and gradients against the per-sequence oracle
    with it) and the kernels' varlen Philox draw."""
    lq, lk, mq, mk, H, Hkv, D, p = [3, 0, 6], [5, 4, 2], 7, 6, 4, 2, 16, 0.25
    cu_q = torch.tensor([0, 3, 3, 9], dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor([0, 5, 9, 11], dtype=torch.int32, device=DEVICE)
    q, k, v = rand(9, H, D, seed=91), rand(11, Hkv, D, seed=92), rand(11, Hkv, D, seed=93)
    kw = dict(causal=True, alibi_slopes=torch.rand(3, H, device=DEVICE))
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    torch.manual_seed(8)
    out, lse, s_dmask = flash_attn_varlen_func(*leaves, cu_q, cu_k, mq, mk, p, return_attn_probs=True,
                                               backend=backend, **kw)
    torch.manual_seed(8)
    torch.testing.assert_close(out.detach(), flash_attn_varlen_func(q, k, v, cu_q, cu_k, mq, mk, p, backend=backend,
                                                                    **kw), atol=0, rtol=0)
    assert s_dmask.shape == (3, H, mq, mk) and s_dmask.dtype == q.dtype
    keep = ~torch.signbit(s_dmask)
    for b in range(3):
        assert bool((s_dmask[b, :, lq[b]:] == 0).all()) and bool((s_dmask[b, :, :, lk[b]:] == 0).all())
        qs, ks = q[int(cu_q[b]):int(cu_q[b + 1])], k[int(cu_k[b]):int(cu_k[b + 1])]
        _, _, s64 = _fa(qs[None].double(), ks[None].double(), ks[None].double(), scores=True, causal=True,
                        alibi_slopes=kw["alibi_slopes"][b])
        torch.testing.assert_close(s_dmask[b, :, :lq[b], :lk[b]].abs().double(), _unnormalized(s64)[0], atol=1e-5,
                                   rtol=1e-5)
    kw_ref = dict(kw, dropout_p=p, dropout_keep=keep)
    r64 = [t.double().requires_grad_() for t in (q, k, v)]
    rp = [t.clone().requires_grad_() for t in (q, k, v)]
    ref, _ = _fa_varlen(*r64, cu_q, cu_k, **kw_ref)
    plain, _ = _fa_varlen(*rp, cu_q, cu_k, **kw_ref)
    assert_fa_close(out, ref, plain)
    dout = rand(*out.shape, seed=94)
    for name, a, b, c in zip(("dq", "dk", "dv"), torch.autograd.grad(out, leaves, dout),
                             torch.autograd.grad(ref, r64, dout.double()), torch.autograd.grad(plain, rp, dout)):
        assert_fa_close(a, b, c, name)
    torch.manual_seed(8)
    seed = int(seed_tensor(None, DEVICE))
    assert torch.equal(keep, _philox.varlen_keep_mask(cu_q, cu_k, mq, mk, H, p, seed))


# ------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input(backend):
    q = rand(1, 4, 2, 16)
    with pytest.raises(ValueError, match="4-D"):
        flash_attn_func(q[0], q, q, backend=backend)
    with pytest.raises(TypeError, match="window_size"):
        flash_attn_func(q, q, q, window_size=3, backend=backend)
    with pytest.raises(TypeError, match="window_size"):
        flash_attn_func(q, q, q, window_size=(1.5, 2), backend=backend)
    with pytest.raises(TypeError, match="deterministic"):
        flash_attn_func(q, q, q, deterministic=None, backend=backend)
    with pytest.raises(TypeError, match="return_attn_probs"):
        flash_attn_func(q, q, q, return_attn_probs=1, backend=backend)
    with pytest.raises(ValueError, match="dropout_p"):
        flash_attn_func(q, q, q, dropout_p=1.0, backend=backend)
    with pytest.raises(ValueError, match="alibi_slopes"):
        flash_attn_func(q, q, q, alibi_slopes=torch.ones(3, device=DEVICE), backend=backend)
    with pytest.raises(ValueError, match="multiple"):
        flash_attn_func(rand(1, 4, 3, 16), q, q, backend=backend)
    with pytest.raises(ValueError, match="qkv"):
        flash_attn_qkvpacked_func(rand(1, 4, 2, 2, 16), backend=backend)
    with pytest.raises(ValueError, match="kv"):
        flash_attn_kvpacked_func(q, rand(1, 4, 3, 2, 16), backend=backend)
    qp = q[0]
    cu = torch.tensor([0, 4], dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="num_blocks, page_block_size"):  # with block_table k/v are pools of pages
        flash_attn_varlen_func(qp, qp, qp, cu, cu, 4, 4, block_table=cu[None], backend=backend)
    with pytest.raises(ValueError, match="cu_seqlens"):
        flash_attn_varlen_func(qp, qp, qp, cu + 1, cu, 4, 4, backend=backend)
    # softcap <= 0 is off in FlashAttention (embedattn.attention refuses a negative cap)
    torch.testing.assert_close(flash_attn_func(q, q, q, softcap=-1.0, backend=backend),
                               flash_attn_func(q, q, q, backend=backend))


# ------------------------------------------------------------------------------------------------ KV cache
def _rotate(x, cos, sin, pos, interleaved):
    """FlashAttention's rotary, from its docs: x (N, H, D) at positions pos (N,); the first rotary_dim = 2 *
    cos.shape[1] features turn in pairs (2j, 2j + 1) when interleaved, else (j, j + rotary_dim / 2)."""
    rd = 2 * cos.shape[1]
    c, s = cos[pos][:, None, :], sin[pos][:, None, :]
    x = x.clone()
    i0, i1 = (slice(0, rd, 2), slice(1, rd, 2)) if interleaved else (slice(0, rd // 2), slice(rd // 2, rd))
    x0, x1 = x[..., i0].clone(), x[..., i1].clone()
    x[..., i0], x[..., i1] = x0 * c - x1 * s, x0 * s + x1 * c
    return x


def _fa_kvcache(q, k_cache, v_cache, k=None, v=None, *, cache_seqlens, rotary_cos=None, rotary_sin=None,
                cache_batch_idx=None, block_table=None, rotary_interleaved=True, causal=False, window_size=(-1, -1),
                alibi_slopes=None, cache_leftpad=None, **kw):
    """flash_attn_with_kvcache from its docs, in float64: returns (out, lse, k_cache, v_cache) with the caches after
    the append (copies: the inputs are not touched). ``cache_leftpad``: batch b's keys are its positions from
    cache_leftpad[b] on, handed to ``_fa`` as they are (its diagonal i + Nk - Nq then counts from the first key
    seen, which is the absolute diagonal: FlashAttention's own test shifts its column index the same way)."""
    q = q.double()
    kc, vc = k_cache.double().clone(), v_cache.double().clone()
    B, Nq = q.shape[:2]
    n_new = 0 if k is None else k.shape[1]
    local = tuple(window_size) != (-1, -1)
    outs, lses = [], []
    for b in range(B):
        n = int(cache_seqlens[b])

        def slot(p, b=b):
            if block_table is not None:
                return int(block_table[b, p // kc.shape[1]]), p % kc.shape[1]
            return (b if cache_batch_idx is None else int(cache_batch_idx[b])), p

        qb = q[b]
        if k is not None:
            kb, vb = k[b].double(), v[b].double()
            if rotary_cos is not None:
                cos, sin = rotary_cos.double(), rotary_sin.double()
                kb = _rotate(kb, cos, sin, torch.arange(n, n + n_new), rotary_interleaved)
                qpos = torch.arange(n, n + Nq) if causal or local else torch.full((Nq,), n)
                qb = _rotate(qb, cos, sin, qpos, rotary_interleaved)
            for i in range(n_new):
                kc[slot(n + i)], vc[slot(n + i)] = kb[i], vb[i]
        first = 0 if cache_leftpad is None else int(cache_leftpad[b])
        keys, vals = (torch.stack([c[slot(p)] for p in range(first, n + n_new)]) if n + n_new > first
                      else c.new_zeros(0, *c.shape[-2:]) for c in (kc, vc))
        slopes = alibi_slopes if alibi_slopes is None or alibi_slopes.dim() == 1 else alibi_slopes[b]
        o, lse = _fa(qb[None], keys[None], vals[None], causal=causal, window_size=window_size, alibi_slopes=slopes,
                     **kw)
        outs.append(o)
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses), kc, vc


def _rope(seqlen, rotary_dim, seed=0):
    angle = torch.rand(seqlen, rotary_dim // 2, generator=torch.Generator().manual_seed(seed)) * 6.3
    return angle.cos().to(DEVICE), angle.sin().to(DEVICE)


ROTARY = {"none": None, "interleaved": True, "neox": False}
MASKS = {"full": {}, "causal": dict(causal=True), "local": dict(window_size=(4, 0))}


@pytest.mark.parametrize("rotary", list(ROTARY))
@pytest.mark.parametrize("mask", list(MASKS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_flash_attn_with_kvcache(backend, mask, rotary):
    """A contiguous (B, S, Hkv, D) cache, two new tokens appended (rotated first when rotary_cos/sin are given), q
    rotated per FlashAttention's rule (position by position when causal or local, else all at cache_seqlens); out,
    lse and the cache after the append against the oracle."""
    B, S, H, Hkv, D, N = 2, 24, 4, 2, 16, 2
    kc, vc = rand(B, S, Hkv, D, seed=30), rand(B, S, Hkv, D, seed=31)
    q, k, v = rand(B, N, H, D, seed=32), rand(B, N, Hkv, D, seed=33), rand(B, N, Hkv, D, seed=34)
    lens = torch.tensor([5, 17], dtype=torch.int32, device=DEVICE)
    kw = dict(MASKS[mask], cache_seqlens=lens)
    if ROTARY[rotary] is not None:
        cos, sin = _rope(S, 8, seed=35)
        kw.update(rotary_cos=cos, rotary_sin=sin, rotary_interleaved=ROTARY[rotary])
    want, want_lse, want_k, want_v = _fa_kvcache(q, kc, vc, k, v, **kw)
    out, lse = flash_attn_with_kvcache(q, kc, vc, k, v, return_softmax_lse=True, backend=backend, **kw)
    assert out.shape == q.shape and out.is_contiguous() and lse.shape == (B, H, N)
    torch.testing.assert_close(out.double(), want, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse.double(), want_lse, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(kc.double(), want_k, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(vc.double(), want_v, atol=0, rtol=0)


@pytest.mark.parametrize("page", [7, 16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_flash_attn_with_kvcache_paged(backend, page):
    """FlashAttention's paged layout, pages (num_blocks, page_block_size, Hkv, D) in a random order; GQA, ALiBi per
    batch, rotary, three new tokens appended through the pages."""
    B, H, Hkv, D, N, max_blocks = 2, 4, 2, 16, 3, 4
    n_blocks = B * max_blocks + 2
    kp, vp = rand(n_blocks, page, Hkv, D, seed=40), rand(n_blocks, page, Hkv, D, seed=41)
    table = torch.randperm(n_blocks, generator=torch.Generator().manual_seed(42))[:B * max_blocks]
    table = table.view(B, max_blocks).to(DEVICE, torch.int32)
    lens = torch.tensor([page + 2, 3], dtype=torch.int32, device=DEVICE)
    q, k, v = rand(B, N, H, D, seed=43), rand(B, N, Hkv, D, seed=44), rand(B, N, Hkv, D, seed=45)
    cos, sin = _rope(page * max_blocks, 16, seed=46)
    kw = dict(cache_seqlens=lens, block_table=table, rotary_cos=cos, rotary_sin=sin, rotary_interleaved=False,
              causal=True, alibi_slopes=torch.rand(B, H, device=DEVICE))
    want, _, want_k, want_v = _fa_kvcache(q, kp, vp, k, v, **kw)
    out = flash_attn_with_kvcache(q, kp, vp, k, v, backend=backend, **kw)
    torch.testing.assert_close(out.double(), want, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(kp.double(), want_k, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(vp.double(), want_v, atol=0, rtol=0)


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("mask", list(MASKS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_flash_attn_with_kvcache_leftpad(backend, mask, num_splits):
    """cache_leftpad (FlashAttention's left-padded cache): batch b's keys are its positions cache_leftpad[b] ..
    cache_seqlens[b] + Nnew - 1, the diagonal, window, ALiBi and rotary positions absolute, the append at
    cache_seqlens[b]; leftpad 0, inside the cache, and equal to cache_seqlens (only the new keys); split-KV. The
    positions left of the pad hold NaN: never read."""
    B, S, H, Hkv, D, N = 3, 29, 4, 2, 16, 2
    kc, vc = rand(B, S, Hkv, D, seed=36), rand(B, S, Hkv, D, seed=37)
    q, k, v = rand(B, N, H, D, seed=38), rand(B, N, Hkv, D, seed=39), rand(B, N, Hkv, D, seed=40)
    lens = torch.tensor([11, 20, 9], dtype=torch.int32, device=DEVICE)
    pad = torch.tensor([0, 17, 9], dtype=torch.int32, device=DEVICE)
    for b in range(B):
        kc[b, :int(pad[b])] = float("nan")
        vc[b, :int(pad[b])] = float("nan")
    cos, sin = _rope(S, 8, seed=41)
    kw = dict(MASKS[mask], cache_seqlens=lens, cache_leftpad=pad, rotary_cos=cos, rotary_sin=sin,
              alibi_slopes=torch.rand(B, H, device=DEVICE))
    want, want_lse, want_k, want_v = _fa_kvcache(q, kc, vc, k, v, **kw)
    out, lse = flash_attn_with_kvcache(q, kc, vc, k, v, return_softmax_lse=True, num_splits=num_splits,
                                       backend=backend, **kw)
    assert not out.isnan().any()
    torch.testing.assert_close(out.double(), want, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse.double(), want_lse, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(kc.double(), want_k, atol=1e-6, rtol=1e-6, equal_nan=True)
    torch.testing.assert_close(vc.double(), want_v, atol=0, rtol=0, equal_nan=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_flash_attn_with_kvcache_batch_idx_and_int_lengths(backend):
    """cache_batch_idx picks each sequence's cache row (row 1 is nobody's and stays untouched); an int cache_seqlens
    is every sequence's length; without k/v and cache_seqlens the whole cache is attended."""
    kc, vc = rand(3, 12, 2, 16, seed=50), rand(3, 12, 2, 16, seed=51)
    k0 = kc.clone()
    q, k = rand(2, 1, 2, 16, seed=52), rand(2, 1, 2, 16, seed=53)
    idx = torch.tensor([2, 0], dtype=torch.int32, device=DEVICE)
    want, _, want_k, _ = _fa_kvcache(q, kc, vc, k, k, cache_seqlens=[6, 6], cache_batch_idx=idx, causal=True)
    out = flash_attn_with_kvcache(q, kc, vc, k, k, cache_seqlens=6, cache_batch_idx=idx, causal=True, backend=backend)
    torch.testing.assert_close(out.double(), want, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(kc.double(), want_k, atol=0, rtol=0)
    assert torch.equal(kc[1], k0[1])
    full = flash_attn_with_kvcache(q, kc[:2], vc[:2], backend=backend)
    want, _, _, _ = _fa_kvcache(q, kc[:2], vc[:2], cache_seqlens=[12, 12])
    torch.testing.assert_close(full.double(), want, atol=2e-5, rtol=2e-5)


@needs_triton
def test_flash_attn_with_kvcache_no_copies():
    """Decoding in FlashAttention's layout: q, the cache and the new keys reach the kernel as views, the append
    writes into the cache in place, the output comes out contiguous: no clone, copy or concatenation."""
    kc, vc = rand(2, 32, 2, 16, seed=60), rand(2, 32, 2, 16, seed=61)
    q, k = rand(2, 1, 4, 16, seed=62), rand(2, 1, 2, 16, seed=63)
    lens = torch.tensor([3, 30], dtype=torch.int32, device=DEVICE)
    with _Ops() as rec:
        out = flash_attn_with_kvcache(q, kc, vc, k, k, cache_seqlens=lens, causal=True, backend="triton")
    copies = [op for op in rec.ops if any(w in op for w in _COPIES)]
    assert not copies, copies
    assert out.is_contiguous() and torch.equal(kc[1, 30], k[1, 0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_flash_attn_with_kvcache_bad_input(backend):
    """Every bad argument raises before the cache is written."""
    kc, vc = rand(2, 8, 2, 16, seed=70), rand(2, 8, 2, 16, seed=71)
    k0, v0 = kc.clone(), vc.clone()
    q, k = rand(2, 1, 2, 16, seed=72), rand(2, 1, 2, 16, seed=73)
    lens = torch.tensor([3, 4], dtype=torch.int32, device=DEVICE)
    cos, sin = _rope(8, 8)
    table = torch.tensor([[0], [1]], dtype=torch.int32, device=DEVICE)
    cases = [
        (ValueError, "cache_leftpad", dict(cache_seqlens=lens, cache_leftpad=lens + 1)),
        (ValueError, "cache_leftpad", dict(cache_seqlens=lens, cache_leftpad=lens - 4)),
        (TypeError, "cache_leftpad", dict(cache_seqlens=lens, cache_leftpad=lens.float())),
        (TypeError, "cache_leftpad", dict(cache_seqlens=lens, cache_leftpad=lens[:1])),
        (ValueError, "cache_seqlens is required", dict()),
        (ValueError, "rotary", dict(cache_seqlens=lens, rotary_cos=cos)),
        (ValueError, "seqlen_ro", dict(cache_seqlens=lens, rotary_cos=cos[:7], rotary_sin=sin[:7])),
        (ValueError, "cache_batch_idx", dict(cache_seqlens=lens, cache_batch_idx=lens, block_table=table)),
        (IndexError, "cache_batch_idx", dict(cache_seqlens=lens, cache_batch_idx=torch.tensor([0, 2], device=DEVICE,
                                                                                             dtype=torch.int32))),
        (IndexError, "block_table", dict(cache_seqlens=lens, block_table=table + 1)),
        (ValueError, "cache_seqlens", dict(cache_seqlens=8)),
        (TypeError, "cache_seqlens", dict(cache_seqlens=lens.float())),
        (TypeError, "window", dict(cache_seqlens=lens, window_size=None)),
        (TypeError, "return_softmax_lse", dict(cache_seqlens=lens, return_softmax_lse="yes")),
    ]
    for err, match, kw in cases:
        with pytest.raises(err, match=match):
            flash_attn_with_kvcache(q, kc, vc, k, k.clone(), backend=backend, **kw)
        assert torch.equal(kc, k0) and torch.equal(vc, v0), kw
    with pytest.raises(ValueError, match="rotary"):  # rotary rotates the new keys: it needs them
        flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens, rotary_cos=cos, rotary_sin=sin, backend=backend)
    with pytest.raises(ValueError, match="together"):
        flash_attn_with_kvcache(q, kc, vc, k, cache_seqlens=lens, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_paged_capacity_error_is_flash_attentions(backend):
    """A paged length past the table's capacity (max(cache_seqlens) + Nnew > max_blocks * page_size) raises
    FlashAttention's error (a RuntimeError naming block_table, as FlashAttention's test expects; also a
    ValueError), naming the batch and its value, with the pool untouched; exactly at capacity runs. The
    keyword-only check_bounds reaches embedattn: "off" raises nothing, and the over-long batch appends nothing
    while the other's append is exact."""
    page, H, D = 8, 2, 16
    kp, vp = rand(5, page, 1, D, seed=100), rand(5, page, 1, D, seed=101)
    k0, v0 = kp.clone(), vp.clone()
    table = torch.tensor([[3, 1], [0, 4]], dtype=torch.int32, device=DEVICE)
    q, k, v = rand(2, 1, H, D, seed=102), rand(2, 1, 1, D, seed=103), rand(2, 1, 1, D, seed=104)
    lens = lambda *n: torch.tensor(n, dtype=torch.int32, device=DEVICE)  # noqa: E731
    cases = [(dict(cache_seqlens=lens(16, 17)), r"max\(seqlens_k\) \(= 17\) exceeds the capacity addressable by "
              r"block_table \(max_num_blocks_per_seq \* page_block_size = 2 \* 8 = 16\): batch 1 has "
              r"cache_seqlens\[1\] = 17"),
             (dict(k=k, v=v, cache_seqlens=lens(16, 5)), r"max\(seqlens_k\) \+ seqlen_knew \(= 17\) exceeds the "
              r"capacity addressable by block_table .*: batch 0 has cache_seqlens\[0\] = 16 with seqlen_knew = 1")]
    for kw, match in cases:
        for err in (RuntimeError, ValueError):
            with pytest.raises(err, match=match):
                flash_attn_with_kvcache(q, kp, vp, block_table=table, backend=backend, **kw)
        assert torch.equal(kp, k0) and torch.equal(vp, v0)
    full = flash_attn_with_kvcache(q, kp, vp, cache_seqlens=lens(16, 16), block_table=table, backend=backend)
    want, _, _, _ = _fa_kvcache(q, kp, vp, cache_seqlens=lens(16, 16), block_table=table)
    torch.testing.assert_close(full.double(), want, atol=2e-5, rtol=2e-5)
    with pytest.raises(ValueError, match="check_bounds"):
        flash_attn_with_kvcache(q, kp, vp, cache_seqlens=lens(1, 1), block_table=table, check_bounds="bogus",
                                backend=backend)
    out = flash_attn_with_kvcache(q, kp, vp, k, v, cache_seqlens=lens(16, 5), block_table=table, check_bounds="off",
                                  backend=backend)
    assert torch.isfinite(out).all()
    want, _, want_k, want_v = _fa_kvcache(q[1:], k0, v0, k[1:], v[1:], cache_seqlens=lens(5), block_table=table[1:])
    torch.testing.assert_close(out[1:].double(), want, atol=2e-5, rtol=2e-5)
    assert torch.equal(kp.double(), want_k) and torch.equal(vp.double(), want_v)



# ------------------------------------------------------------------------------------------------ sinks, Dv
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_sinks_and_value_head_dim(backend, dtype):
    """The keyword-only ``sinks`` (ours) and a value head dim of its own reach embedattn from the dense and varlen
    functions: out (..., Dv), lse with the sink, gradients of q, k, v and the sinks against the oracle (GQA, causal
    with rows that see no key); the packed functions take sinks too; S_dmask stays exp(s - rowmax) over the keys."""
    skip_if_unsupported(backend, dtype)
    B, Nq, Nk, H, Hkv, D, Dv = 2, 7, 5, 4, 2, 16, 24
    q, k, v = rand(B, Nq, H, D, dtype=dtype, seed=110), rand(B, Nk, Hkv, D, dtype=dtype, seed=111), \
        rand(B, Nk, Hkv, Dv, dtype=dtype, seed=112)
    sinks = rand(H, seed=113)
    kw = dict(causal=True, window_size=(3, -1))
    leaves = [t.clone().requires_grad_() for t in (q, k, v, sinks)]
    out, lse, _ = flash_attn_func(*leaves[:3], sinks=leaves[3], return_attn_probs=True, backend=backend, **kw)
    assert out.shape == (B, Nq, H, Dv) and out.dtype == dtype
    r64 = [t.detach().double().requires_grad_() for t in (q, k, v, sinks)]
    rp = [t.detach().clone().requires_grad_() for t in (q, k, v)] + [sinks.clone().requires_grad_()]
    ref, ref_lse = _fa(*r64[:3], sinks=r64[3], **kw)
    plain, plain_lse = _fa(*rp[:3], sinks=rp[3], **kw)
    assert_fa_close(out, ref, plain, "out")
    assert_fa_close(lse, ref_lse, plain_lse.float(), "lse", eps=1e-5)
    assert torch.equal(out[:, :2], torch.zeros_like(out[:, :2]))  # rows 0, 1 see no key: zeros, lse = the sink
    dout = rand(*out.shape, dtype=dtype, seed=114)
    for name, a, b, c in zip(("dq", "dk", "dv", "dsinks"), torch.autograd.grad(out, leaves, dout),
                             torch.autograd.grad(ref, r64, dout.double()), torch.autograd.grad(plain, rp, dout)):
        assert_fa_close(a, b, c, name)
    # varlen: the same two sequences packed
    cu_q = torch.tensor([0, Nq, 2 * Nq], dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor([0, Nk, 2 * Nk], dtype=torch.int32, device=DEVICE)
    got = flash_attn_varlen_func(q.reshape(-1, H, D), k.reshape(-1, Hkv, D), v.reshape(-1, Hkv, Dv), cu_q, cu_k, Nq,
                                 Nk, sinks=sinks, backend=backend, **kw)
    assert_fa_close(got, ref.reshape(-1, H, Dv), plain.reshape(-1, H, Dv), "varlen out")
    # packed: sinks reach embedattn
    qkv = rand(B, Nk, 3, H, D, dtype=dtype, seed=115)
    q3, k3, v3 = qkv.unbind(2)
    torch.testing.assert_close(flash_attn_qkvpacked_func(qkv, sinks=sinks, backend=backend),
                               flash_attn_func(q3, k3, v3, sinks=sinks, backend=backend), atol=0, rtol=0)
    assert not torch.equal(flash_attn_qkvpacked_func(qkv, sinks=sinks, backend=backend),
                           flash_attn_qkvpacked_func(qkv, backend=backend))
    kvp = torch.stack([k3, v3], dim=2)
    torch.testing.assert_close(flash_attn_kvpacked_func(q3, kvp, sinks=sinks, backend=backend),
                               flash_attn_func(q3, k3, v3, sinks=sinks, backend=backend), atol=0, rtol=0)
    # S_dmask with sinks: exp(s - rowmax s) over the keys, the sink excluded
    _, _, s_dmask = flash_attn_func(q, k, v, 0.2, sinks=sinks, return_attn_probs=True, backend=backend, **kw)
    _, _, s64 = _fa(q.double(), k.double(), v.double(), scores=True, **kw)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(s_dmask.abs().double(), _unnormalized(s64), atol=tol, rtol=tol)


@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_kvcache_sinks_and_value_head_dim(backend, paged):
    """flash_attn_with_kvcache with v_cache/v of their own head dim and sinks, contiguous and paged (out, lse,
    the caches after the append); and MLA's latent cache: v_cache a column view of k_cache, k appended alone."""
    B, H, Hkv, D, Dv, N, page = 2, 4, 2, 16, 8, 2, 5
    lens = torch.tensor([4, 11], dtype=torch.int32, device=DEVICE)
    sinks = rand(H, seed=120)
    q, k, v = rand(B, N, H, D, seed=121), rand(B, N, Hkv, D, seed=122), rand(B, N, Hkv, Dv, seed=123)
    if paged:
        kc, vc = rand(7, page, Hkv, D, seed=124), rand(7, page, Hkv, Dv, seed=125)
        kw = dict(block_table=torch.tensor([[6, 0, 2], [1, 4, 3]], dtype=torch.int32, device=DEVICE))
    else:
        kc, vc = rand(B, 15, Hkv, D, seed=124), rand(B, 15, Hkv, Dv, seed=125)
        kw = {}
    kw.update(cache_seqlens=lens, causal=True)
    want, want_lse, want_k, want_v = _fa_kvcache(q, kc, vc, k, v, sinks=sinks.double(), **kw)
    out, lse = flash_attn_with_kvcache(q, kc, vc, k, v, sinks=sinks, return_softmax_lse=True, backend=backend, **kw)
    assert out.shape == (B, N, H, Dv)
    torch.testing.assert_close(out.double(), want, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse.double(), want_lse, atol=2e-5, rtol=2e-5)
    assert torch.equal(kc.double(), want_k) and torch.equal(vc.double(), want_v)
    # MLA: the values are the first Dv columns of the keys' own memory; k alone appends both
    latent = kc.clone()
    want, _, want_k, _ = _fa_kvcache(q, latent, latent[..., :Dv], k, k[..., :Dv], **kw)
    out = flash_attn_with_kvcache(q, latent, latent[..., :Dv], k, backend=backend, **kw)
    assert out.shape == (B, N, H, Dv)
    torch.testing.assert_close(out.double(), want, atol=2e-5, rtol=2e-5)
    assert torch.equal(latent.double(), want_k)
    with pytest.raises(ValueError, match="together"):  # k alone for a v_cache of its own memory
        flash_attn_with_kvcache(q, kc, vc, k, backend=backend, **kw)
