"""Attention features: sliding window, softcap, ALiBi, dropout, varlen, KV-cache decoding."""

from __future__ import annotations

import importlib
import math
import re

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    BACKENDS,
    DEVICE,
    DTYPES,
    ON_CUDA,
    ROADS,
    HostReads,
    assert_fa_close,
    needs_triton,
    on_road,
    rand,
    skip_if_unsupported,
)
from sm90 import ATTENTION, run_rows

import embedattn
from embedattn import reference


def _compare(kernel_fn, ref_fn, inputs, grads=True, seed=0):
    """kernel_fn(*leaves) vs ref_fn(*leaves, upcast) in float64 and in the same dtype (FA rule)."""
    dtype = inputs[0].dtype
    leaves = [t.detach().clone().requires_grad_(grads) for t in inputs]
    out = kernel_fn(*leaves)
    r64 = [t.detach().double().requires_grad_(grads) for t in inputs]
    ref = ref_fn(*r64, True)
    rp = [t.detach().clone().requires_grad_(grads) for t in inputs]
    plain = ref_fn(*rp, False)
    assert_fa_close(out, ref, plain, "out")
    if not grads:
        return
    dout = rand(*out.shape, dtype=dtype, seed=seed + 100)
    got = torch.autograd.grad(out, leaves, dout)
    want = torch.autograd.grad(ref, r64, dout.double())
    base = torch.autograd.grad(plain, rp, dout)
    for name, a, b, c in zip(("dq", "dk", "dv"), got, want, base):
        assert_fa_close(a, b, c, name)


WINDOWS = [((3, 0), False), ((5, 2), False), ((0, 0), False), ((-1, 4), False), ((4, -1), True), ((6, 3), True)]


@pytest.mark.parametrize("window,causal", WINDOWS, ids=lambda x: str(x))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_sliding_window(backend, dtype, window, causal):
    skip_if_unsupported(backend, dtype)
    q, k, v = rand(1, 4, 37, 32, dtype=dtype, seed=1), rand(1, 2, 45, 32, dtype=dtype, seed=2), \
        rand(1, 2, 45, 32, dtype=dtype, seed=3)
    _compare(lambda q, k, v: embedattn.attention(q, k, v, causal=causal, window=window, backend=backend),
             lambda q, k, v, up: reference.attention(q, k, v, causal=causal, window=window, upcast=up), (q, k, v))


@pytest.mark.parametrize("window", [(2**31 - 1, 2**31 - 1), (2**31 - 1, 0), (2**63 - 1, 3), (2**63, 0), (2**64, 0),
                                    (0, 2**64), (2**200, 2**63)], ids=str)
def test_window_sides_past_int32(window):
    """Huge window sides (INT_MAX, sys.maxsize, 2**64: "unbounded" idioms) act as unbounded on every path, the
    reference called directly included: equal to the same call with that side unbounded (-1)."""
    q, k, v = rand(1, 2, 9, 16, seed=44), rand(1, 1, 21, 16, seed=45), rand(1, 1, 21, 16, seed=46)
    left, right = window
    unbounded = (-1 if left > 2**30 else left, -1 if right > 2**30 else right)
    want = reference.attention(q.double(), k.double(), v.double(), window=unbounded)
    torch.testing.assert_close(reference.attention(q.double(), k.double(), v.double(), window=window), want)
    for be in BACKENDS:
        _compare(lambda q, k, v, be=be: embedattn.attention(q, k, v, window=window, backend=be),
                 lambda q, k, v, up: reference.attention(q, k, v, window=unbounded, upcast=up), (q, k, v))


def test_window_matches_explicit_mask():
    q, k, v = rand(1, 2, 20, 16, seed=4), rand(1, 2, 26, 16, seed=5), rand(1, 2, 26, 16, seed=6)
    i, j = torch.arange(20)[:, None], torch.arange(26)[None, :]
    rel = i + 6 - j
    mask = ((rel <= 3) & (rel >= -2)).to(DEVICE)
    for be in BACKENDS:
        a = embedattn.attention(q, k, v, window=(3, 2), backend=be)
        b = embedattn.attention(q, k, v, attn_mask=mask, backend=be)
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_softcap(backend, dtype, causal):
    skip_if_unsupported(backend, dtype)
    # scores large enough that tanh saturates for some entries
    q, k, v = rand(2, 2, 23, 24, dtype=dtype, seed=7, scale=3), rand(2, 1, 31, 24, dtype=dtype, seed=8, scale=3), \
        rand(2, 1, 31, 24, dtype=dtype, seed=9)
    _compare(lambda q, k, v: embedattn.attention(q, k, v, causal=causal, softcap=5.0, backend=backend),
             lambda q, k, v, up: reference.attention(q, k, v, causal=causal, softcap=5.0, upcast=up), (q, k, v))


@pytest.mark.parametrize("slopes_shape", ["h", "bh"])
@pytest.mark.parametrize("with_mask", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_alibi(backend, dtype, with_mask, slopes_shape):
    skip_if_unsupported(backend, dtype)
    B, H = 2, 4
    q, k, v = rand(B, H, 19, 32, dtype=dtype, seed=10), rand(B, 2, 29, 32, dtype=dtype, seed=11), \
        rand(B, 2, 29, 32, dtype=dtype, seed=12)
    slopes = torch.tensor([2 ** (-8 * (h + 1) / H) for h in range(H)], device=DEVICE)
    if slopes_shape == "bh":
        slopes = torch.stack([slopes, slopes * 0.5])
    mask = (torch.rand(B, 1, 19, 29, generator=torch.Generator().manual_seed(1)) > 0.3).to(DEVICE) \
        if with_mask else None
    _compare(lambda q, k, v: embedattn.attention(q, k, v, causal=True, alibi_slopes=slopes, attn_mask=mask,
                                                 backend=backend),
             lambda q, k, v, up: reference.attention(q, k, v, causal=True, alibi_slopes=slopes.to(q.dtype),
                                                     attn_mask=mask, upcast=up), (q, k, v))


# ------------------------------------------------------------------------------------------- dropout
@needs_triton
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dropout_matches_reference_fed_the_kernel_mask(dtype, causal):
    skip_if_unsupported("triton", dtype)
    B, H, Nq, Nk, D, p, seed = 1, 2, 21, 35, 16, 0.3, 1234
    q, k, v = rand(B, H, Nq, D, dtype=dtype, seed=13), rand(B, 1, Nk, D, dtype=dtype, seed=14), \
        rand(B, 1, Nk, D, dtype=dtype, seed=15)
    keep = embedattn.attention_dropout_mask((B, H, Nq, Nk), p, seed, device=DEVICE, backend="triton")
    assert keep.shape == (B, H, Nq, Nk) and keep.dtype == torch.bool
    _compare(lambda q, k, v: embedattn.attention(q, k, v, causal=causal, dropout_p=p, seed=seed, backend="triton"),
             lambda q, k, v, up: reference.attention(q, k, v, causal=causal, dropout_p=p, dropout_mask=keep,
                                                     upcast=up), (q, k, v))


@needs_triton
def test_dropout_keep_rate_and_seeding():
    p = 0.25
    keep = embedattn.attention_dropout_mask((2, 3, 64, 96), p, seed=7, device=DEVICE, backend="triton")
    rate = keep.float().mean().item()
    n = keep.numel()
    assert abs(rate - (1 - p)) < 4 * (p * (1 - p) / n) ** 0.5  # 4 sigma
    mask = lambda seed: embedattn.attention_dropout_mask((2, 3, 64, 96), p, seed, device=DEVICE, backend="triton")
    assert torch.equal(keep, mask(7))
    assert not torch.equal(keep, mask(8))
    # rows and columns are not correlated: per-row keep rates spread like a binomial
    per_row = keep.float().mean(-1).flatten()
    assert per_row.std().item() < 3 * (p * (1 - p) / 96) ** 0.5
    q = rand(1, 2, 16, 16, seed=3)
    a = embedattn.attention(q, q, q, dropout_p=0.5, seed=3, backend="triton")
    b = embedattn.attention(q, q, q, dropout_p=0.5, seed=3, backend="triton")
    assert torch.equal(a, b)


@needs_triton
def test_sdpa_drop_in_runs_dropout_in_kernel(monkeypatch):
    monkeypatch.setenv("EMBEDATTN_BACKEND", "triton")
    q = rand(1, 2, 16, 16, seed=4)
    torch.manual_seed(0)
    a = embedattn.scaled_dot_product_attention(q, q, q, dropout_p=0.5)
    torch.manual_seed(0)
    b = embedattn.scaled_dot_product_attention(q, q, q, dropout_p=0.5)
    assert torch.equal(a, b)
    assert not torch.allclose(a, embedattn.scaled_dot_product_attention(q, q, q))


# ------------------------------------------------------------- dropout: the mask read off the forward itself
P_DROP = 0.3


def _check_dropped_probs(p_drop, p_ref, where="", planes=True):
    """p_drop: what a dropout call returned with v = identity, i.e. the dropped probabilities; p_ref: the
    undropped float64 probabilities. Checks the scale (keep / (1 - p)), the keep rate against p, and (planes)
    that every (batch, head) plane draws its own mask. Returns the keep mask."""
    keep = p_drop.double() > 0
    torch.testing.assert_close(p_drop.double(), keep * p_ref / (1 - P_DROP), atol=1e-6, rtol=1e-5,
                               msg=lambda m: f"{where}: dropped probabilities are not keep * p / (1 - p): {m}")
    seen = p_ref > 1e-9
    n = int(seen.sum())
    rate = keep[seen].double().mean().item()
    sigma = (P_DROP * (1 - P_DROP) / n) ** 0.5
    assert abs(rate - (1 - P_DROP)) < 4 * sigma, f"{where}: keep rate {rate:.3f} for p={P_DROP}"
    if planes:  # independent draws agree on p^2 + (1-p)^2 = 0.58 of the entries; one draw reused on all of them
        flat, vis = keep.flatten(0, -3).flatten(1), seen.flatten(0, -3).flatten(1)
        for a in range(flat.shape[0]):
            for b in range(a):
                both = vis[a] & vis[b]
                agree = (flat[a][both] == flat[b][both]).double().mean().item()
                assert agree < 0.8, f"{where}: (batch, head) planes {a} and {b} share their dropout mask ({agree:.2f})"
    return keep


def _eye_values(b, h, n, dtype=torch.float32):
    return torch.eye(n, device=DEVICE, dtype=dtype).expand(b, h, n, n)


DROPOUT_CASES = {
    "causal_gqa_window_softcap": (1, 4, 2, 11, lambda: dict(causal=True, window=(9, 2), softcap=2.0)),
    "alibi_mask_lse": (2, 2, 2, 13, lambda: dict(alibi_slopes=_slopes(2, 2, seed=5),
                                                  attn_mask=_rows_masked(2, 1, 13, 16, seed=6))),
    "float_mask_other_dtype_strided": (2, 2, 1, 9, lambda: dict(
        attn_mask=_rows_masked(1, 2, 9, 16, kind="add", dtype=torch.float16, seed=7), causal=True)),
}


@needs_triton
@pytest.mark.parametrize("case", list(DROPOUT_CASES))
def test_dropout_forward_and_backward_draw_one_mask(case):
    """Dropout with window, softcap, GQA, ALiBi, masks and the lse gradient, checked without the debug mask:
    with v = identity the output *is* the dropped probabilities, so the keep mask is read off the forward
    (scale, keep rate, one draw per (batch, head)). A call with random v and the same seed then matches the
    reference fed that mask, output and gradients: a backward that regenerates another mask moves dv."""
    B, Hq, Hkv, Nq, kwf = DROPOUT_CASES[case]
    Nk = D = 16
    kw, seed = kwf(), 4321
    q, k = rand(B, Hq, Nq, D, seed=74, scale=2), rand(B, Hkv, Nk, D, seed=75, scale=2)
    if case.endswith("strided"):
        q, k = rand(B, Nq, Hq, D, seed=74, scale=2).transpose(1, 2), rand(B, Nk, Hkv, D, seed=75).transpose(1, 2)
    p_drop = embedattn.attention(q, k, _eye_values(B, Hkv, Nk), dropout_p=P_DROP, seed=seed, backend="triton", **kw)
    r64 = {key: (val.double() if key == "alibi_slopes" else val) for key, val in kw.items()}
    p_ref = reference.attention(q.double(), k.double(), _eye_values(B, Hkv, Nk, torch.float64), **r64)
    keep = _check_dropped_probs(p_drop, p_ref, case, planes=not kw.get("causal"))
    v = rand(B, Hkv, Nk, D, seed=76)
    lse_term = case.endswith("lse")

    def combine(res):  # out, plus the finite lse broadcast over the head dim: gradients reach both
        if not lse_term:
            return res
        out, lse = res
        return out + 0.5 * torch.where(torch.isfinite(lse), lse, 0.0).unsqueeze(-1).to(out.dtype)

    _compare(lambda q, k, v: combine(embedattn.attention(q, k, v, dropout_p=P_DROP, seed=seed, return_lse=lse_term,
                                                         backend="triton", **kw)),
             lambda q, k, v, up: combine(reference.attention(q, k, v, dropout_p=P_DROP, dropout_mask=keep,
                                                             return_lse=lse_term, upcast=up, **(r64 if up else kw))),
             (q, k, v))


@needs_triton
def test_varlen_dropout_forward_and_backward_draw_one_mask():
    """Varlen dropout with causal, window, softcap, ALiBi and GQA: the mask read off the forward (v = identity
    rows per sequence) is the one its backward uses, per sequence."""
    lq, lk, H, HK, seed = [5, 9, 4], [16, 11, 3], 4, 2, 99
    cu_q = torch.tensor([0, 5, 14, 18], dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor([0, 16, 27, 30], dtype=torch.int32, device=DEVICE)
    D = max(lk)
    q, k, v = rand(18, H, D, seed=77, scale=2), rand(30, HK, D, seed=78, scale=2), rand(30, HK, D, seed=79)
    eye = torch.cat([torch.eye(D, device=DEVICE)[:n] for n in lk])[:, None, :].expand(30, HK, D)
    kw = dict(causal=True, window=(7, 1), softcap=2.0, alibi_slopes=_slopes(H, seed=8))
    run = lambda q, k, v: embedattn.attention_varlen(q, k, v, cu_q, cu_k, max(lq), max(lk), dropout_p=P_DROP,
                                                     seed=seed, backend="triton", **kw)
    p_drop = run(q, k, eye)
    p_ref = reference.attention_varlen(q.double(), k.double(), eye.double(), cu_q, cu_k,
                                       **dict(kw, alibi_slopes=kw["alibi_slopes"].double()))
    keep = _check_dropped_probs(p_drop, p_ref, "varlen", planes=False)

    def oracle(q, k, v, up):
        outs = []
        for b in range(3):
            qs, ks, vs = (t[int(c[b]):int(c[b + 1])].transpose(0, 1)[None]
                          for t, c in ((q, cu_q), (k, cu_k), (v, cu_k)))
            kb = keep[int(cu_q[b]):int(cu_q[b + 1]), :, :lk[b]].transpose(0, 1)[None]
            slopes = kw["alibi_slopes"].to(q.dtype if up else torch.float32)
            outs.append(reference.attention(qs, ks, vs, dropout_p=P_DROP, dropout_mask=kb, upcast=up,
                                            **dict(kw, alibi_slopes=slopes))[0].transpose(0, 1))
        return torch.cat(outs)

    _compare(run, oracle, (q, k, v))


@needs_triton
def test_sdpa_drop_in_dropout_rate_scale_and_backward(monkeypatch):
    """The drop-in's dropout: scale 1/(1-p), keep rate 1-p, a different draw per (batch, head), the forward's
    mask in the backward (dv = P_dropᵀ dout), torch.manual_seed reproduces a call, and calls differ."""
    monkeypatch.setenv("EMBEDATTN_BACKEND", "triton")
    B, H, Nq, Nk = 2, 3, 12, 16
    q, k = rand(B, H, Nq, Nk, seed=80), rand(B, H, Nk, Nk, seed=81)
    torch.manual_seed(0)
    p_drop = embedattn.scaled_dot_product_attention(q, k, _eye_values(B, H, Nk), dropout_p=P_DROP)
    p_ref = reference.attention(q.double(), k.double(), _eye_values(B, H, Nk, torch.float64))
    _check_dropped_probs(p_drop, p_ref, "drop-in")
    v = rand(B, H, Nk, Nk, seed=82).requires_grad_()
    torch.manual_seed(0)
    out = embedattn.scaled_dot_product_attention(q, k, v, dropout_p=P_DROP)
    torch.testing.assert_close(out, p_drop @ v, atol=1e-5, rtol=1e-5)
    w = rand(*out.shape, seed=83)
    (dv,) = torch.autograd.grad(out, v, w)
    torch.testing.assert_close(dv, p_drop.transpose(-1, -2) @ w, atol=1e-5, rtol=1e-5)
    assert not torch.equal(p_drop, embedattn.scaled_dot_product_attention(q, k, _eye_values(B, H, Nk),
                                                                          dropout_p=P_DROP))

# -------------------------------------------------------------------------------------------- varlen
VARLEN_CASES = [([5, 1, 17, 33], [9, 1, 17, 20]), ([1], [1]), ([12, 0, 7], [12, 3, 7])]


@pytest.mark.parametrize("road", ROADS)
@pytest.mark.parametrize("lens", VARLEN_CASES, ids=str)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_varlen(road, backend, dtype, causal, lens):
    skip_if_unsupported(backend, dtype)
    lq, lk = lens
    cu_q = torch.tensor([0] + list(torch.tensor(lq).cumsum(0)), dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor([0] + list(torch.tensor(lk).cumsum(0)), dtype=torch.int32, device=DEVICE)
    H, HK, D = 4, 2, 24
    q, k, v = rand(sum(lq), H, D, dtype=dtype, seed=16), rand(sum(lk), HK, D, dtype=dtype, seed=17), \
        rand(sum(lk), HK, D, dtype=dtype, seed=18)
    mq, mk = max(lq), max(lk)
    _compare(on_road(road, lambda q, k, v: embedattn.attention_varlen(q, k, v, cu_q, cu_k, mq, mk, causal=causal,
                                                                      backend=backend)),
             lambda q, k, v, up: reference.attention_varlen(q, k, v, cu_q, cu_k, causal=causal, upcast=up),
             (q, k, v))


def test_varlen_and_kvcache_references_are_attention_per_sequence():
    """The varlen and KV-cache references (padded / masked, one attention call, so that torch.compile traces them)
    equal reference.attention run on each sequence's own slice, outputs, lse and gradients, with every feature on
    but dropout: the per-sequence formulation they replaced. Cache slots past a length hold NaN (an uninitialized
    cache): they must not leak."""
    kw = dict(causal=True, window=(5, 2), softcap=3.0, scale=0.3)
    lq, lk = [4, 0, 9, 1], [6, 3, 9, 0]
    cu_q, cu_k = (torch.tensor([0] + list(torch.tensor(n).cumsum(0)), device=DEVICE) for n in (lq, lk))
    slopes = rand(4, 2, seed=60).abs()
    q, k, v = (rand(sum(n), 2, 8, dtype=torch.float64, seed=61 + i).requires_grad_()
               for i, n in enumerate((lq, lk, lk)))
    out, lse = reference.attention_varlen(q, k, v, cu_q, cu_k, max(lq), max(lk), alibi_slopes=slopes, return_lse=True,
                                          **kw)
    outs, lses = [], []
    for b in range(4):
        qs, ks, vs = (t[int(cu[b]):int(cu[b + 1])].transpose(0, 1)[None] for t, cu in ((q, cu_q), (k, cu_k), (v, cu_k)))
        o, ls = reference.attention(qs, ks, vs, alibi_slopes=slopes[b:b + 1], return_lse=True, **kw) if lk[b] else \
            (qs.new_zeros(qs.shape), torch.full(qs.shape[:3], float("-inf"), dtype=q.dtype))
        outs.append(o[0].transpose(0, 1))
        lses.append(ls[0])
    want, want_lse = torch.cat(outs), torch.cat(lses, dim=1)
    torch.testing.assert_close(out, want, atol=1e-12, rtol=0)
    torch.testing.assert_close(lse, want_lse, atol=1e-12, rtol=0)
    w = rand(*out.shape, dtype=torch.float64, seed=65)
    for a, b in zip(torch.autograd.grad((out * w).sum(), (q, k, v)), torch.autograd.grad((want * w).sum(), (q, k, v))):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)

    B, S = 3, 11
    kc, vc = rand(B, 2, S, 8, dtype=torch.float64, seed=66), rand(B, 2, S, 8, dtype=torch.float64, seed=67)
    lens = torch.tensor([0, 4, 11], dtype=torch.int32, device=DEVICE)
    for b in range(B):
        kc[b, :, int(lens[b]):] = float("nan")
        vc[b, :, int(lens[b]):] = float("nan")
    qd = rand(B, 4, 2, 8, dtype=torch.float64, seed=68)
    out, lse = reference.attention_with_kvcache(qd, kc, vc, lens, alibi_slopes=slopes[:B, :1].repeat(1, 4).abs(),
                                                return_lse=True, **kw)
    for b in range(B):
        n = int(lens[b])
        if n == 0:
            assert torch.equal(out[b], torch.zeros_like(out[b])) and torch.isinf(lse[b]).all()
            continue
        o, ls = reference.attention(qd[b:b + 1], kc[b:b + 1, :, :n], vc[b:b + 1, :, :n], return_lse=True,
                                    alibi_slopes=slopes[b:b + 1, :1].repeat(1, 4).abs(), **kw)
        torch.testing.assert_close(out[b:b + 1], o, atol=1e-12, rtol=0)
        torch.testing.assert_close(lse[b:b + 1], ls, atol=1e-12, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_varlen_checks_offsets_on_the_device(backend):
    """Compiled (fullgraph, no host read), attention_varlen checks cu_seqlens and max_seqlen with a device assertion
    (a RuntimeError at once on the CPU) where the eager call raises its ValueError."""
    cu = torch.tensor([0, 3, 7], dtype=torch.int32, device=DEVICE)
    q = rand(7, 2, 8, seed=70)
    def compiled(m):
        return on_road("compiled", lambda q, cu: embedattn.attention_varlen(q, q, q, cu, cu, m, m, backend=backend))

    torch.testing.assert_close(compiled(4)(q, cu), embedattn.attention_varlen(q, q, q, cu, cu, 4, 4, backend=backend))
    bad = [([0, 5, 3], 5), ([0, 3, 9], 6), ([0, 3, 7], 3)]  # decreasing, past the total, longer than max_seqlen
    for bad_cu, m in bad:
        bad_cu = torch.tensor(bad_cu, dtype=torch.int32, device=DEVICE)
        with pytest.raises(ValueError, match="cu_seqlens|max_seqlen"):
            embedattn.attention_varlen(q, q, q, bad_cu, bad_cu, m, m, backend=backend)
        with pytest.raises(RuntimeError, match="cu_seqlens_q/cu_seqlens_k"):
            compiled(m)(q, bad_cu)


@needs_triton
def test_varlen_with_window_and_alibi():
    lq = [7, 19]
    cu = torch.tensor([0, 7, 26], dtype=torch.int32, device=DEVICE)
    q, k, v = rand(26, 2, 16, seed=19), rand(26, 2, 16, seed=20), rand(26, 2, 16, seed=21)
    slopes = torch.tensor([[0.5, 0.25], [0.1, 0.2]], device=DEVICE)
    kw = dict(causal=True, window=(4, 0), alibi_slopes=slopes)
    _compare(lambda q, k, v: embedattn.attention_varlen(q, k, v, cu, cu, max(lq), max(lq), backend="triton", **kw),
             lambda q, k, v, up: reference.attention_varlen(q, k, v, cu, cu, upcast=up, **kw), (q, k, v))


# ----------------------------------------------------------------------------------------- KV cache
@pytest.mark.parametrize("nq,num_splits", [(1, 1), (1, 3), (3, 2), (4, 0)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("road", ROADS)
def test_kvcache_decoding(road, backend, dtype, nq, num_splits):
    skip_if_unsupported(backend, dtype)
    B, H, HK, S, D = 3, 4, 2, 80, 32
    k_cache, v_cache = rand(B, HK, S, D, dtype=dtype, seed=22), rand(B, HK, S, D, dtype=dtype, seed=23)
    lens = torch.tensor([0, 17, 70], dtype=torch.int32, device=DEVICE)  # an empty cache included
    q = rand(B, H, nq, D, dtype=dtype, seed=24)
    k_new, v_new = rand(B, HK, nq, D, dtype=dtype, seed=25), rand(B, HK, nq, D, dtype=dtype, seed=26)
    kc, vc = k_cache.clone(), v_cache.clone()
    out = on_road(road, lambda q, kc, vc: embedattn.attention_with_kvcache(
        q, kc, vc, lens, k_new, v_new, causal=True, num_splits=num_splits, backend=backend))(q, kc, vc)
    for b in range(B):  # appended in place, the rest untouched
        n = int(lens[b])
        assert torch.equal(kc[b, :, n:n + nq], k_new[b]) and torch.equal(vc[b, :, n:n + nq], v_new[b])
        assert torch.equal(kc[b, :, :n], k_cache[b, :, :n]) and torch.equal(kc[b, :, n + nq:], k_cache[b, :, n + nq:])
    total = lens + nq
    ref = reference.attention_with_kvcache(q.double(), kc.double(), vc.double(), total, causal=True)
    plain = reference.attention_with_kvcache(q, kc, vc, total, causal=True, upcast=False)
    assert_fa_close(out, ref, plain)


@needs_triton
def test_kvcache_split_matches_unsplit_long_cache():
    B, H, S, D = 2, 2, 300, 16
    kc, vc = rand(B, H, S, D, seed=27), rand(B, H, S, D, seed=28)
    q = rand(B, H, 1, D, seed=29)
    lens = torch.tensor([300, 123], dtype=torch.int32, device=DEVICE)
    a = embedattn.attention_with_kvcache(q, kc, vc, lens, num_splits=1, backend="triton")
    b = embedattn.attention_with_kvcache(q, kc, vc, lens, num_splits=5, backend="triton")
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------- the oracle, checked once
def _naive(q, k, v, *, causal=False, causal_offset=None, scale=None, window=None, softcap=0.0, alibi=None,
           mask=None, keep=None, dropout_p=0.0):
    """Scalar float64 loops over (b, h, i, j) with math.exp/math.tanh: an oracle that shares no code with
    embedattn.reference. Returns (out, lse)."""
    B, H, Nq, D = q.shape
    Hk, Nk = k.shape[1], k.shape[2]
    off = Nk - Nq if causal_offset is None else causal_offset
    scale = 1 / math.sqrt(D) if scale is None else scale
    out = torch.zeros(B, H, Nq, v.shape[-1], dtype=torch.float64)
    lse = torch.full((B, H, Nq), -math.inf, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            hk = h // (H // Hk)
            for i in range(Nq):
                s = {}
                for j in range(Nk):
                    d = i + off - j
                    if causal and d < 0 or window and (window[0] >= 0 and d > window[0] or
                                                       window[1] >= 0 and -d > window[1]):
                        continue
                    x = sum(float(q[b, h, i, t]) * float(k[b, hk, j, t]) for t in range(D)) * scale
                    if softcap:
                        x = softcap * math.tanh(x / softcap)
                    if alibi is not None:
                        x -= float(alibi[h] if alibi.dim() == 1 else alibi[b, h]) * abs(d)
                    if mask is not None:
                        mv = mask[b if mask.shape[0] > 1 else 0, h if mask.shape[1] > 1 else 0, i, j]
                        if mask.dtype == torch.bool:
                            if not mv:
                                continue
                        else:
                            x += float(mv)
                    if x != -math.inf:
                        s[j] = x
                if not s:
                    continue
                m = max(s.values())
                z = sum(math.exp(x - m) for x in s.values())
                lse[b, h, i] = m + math.log(z)
                for j, x in s.items():
                    p = math.exp(x - m) / z
                    if keep is not None:
                        p = p * float(keep[b, h, i, j]) / (1 - dropout_p)
                    out[b, h, i] += p * v[b, hk, j].double()
    return out, lse


def test_reference_features_match_an_independent_formula():
    """The feature tests' oracle (embedattn.reference in float64) against scalar loops: every feature at once,
    top-left and bottom-right diagonals, dropout with a given mask, and the lse; and its top-left causal +
    mask against torch's own SDPA."""
    g = torch.Generator().manual_seed(50)
    q, k, v = (torch.randn(s, generator=g, dtype=torch.float64) * 2 for s in ((2, 4, 5, 3), (2, 2, 7, 3), (2, 2, 7, 3)))
    alibi = torch.rand(2, 4, generator=g, dtype=torch.float64)
    mask = torch.randn(2, 1, 5, 7, generator=g, dtype=torch.float64)
    mask[0, 0, 1] = -math.inf  # a fully masked row
    bmask = torch.rand(1, 4, 5, 7, generator=g) > 0.3
    keep = torch.rand(2, 4, 5, 7, generator=g) > 0.4
    cases = [dict(causal=True, window=(3, -1), softcap=2.0, alibi=alibi, mask=mask),
             dict(causal=True, causal_offset=0, window=(2, 1), softcap=1.5, alibi=alibi[0], mask=bmask, scale=0.7),
             dict(window=(-1, 1), mask=bmask, keep=keep, dropout_p=0.4),
             dict(causal=True, causal_offset=-2, softcap=3.0)]
    for kw in cases:
        want, want_lse = _naive(q, k, v, **kw)
        rk = dict(kw)
        rk["alibi_slopes"], rk["attn_mask"], rk["dropout_mask"] = rk.pop("alibi", None), rk.pop("mask", None), \
            rk.pop("keep", None)
        got, lse = reference.attention(q, k, v, return_lse=True, **rk)
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10, msg=lambda m, kw=kw: f"{kw}: {m}")
        torch.testing.assert_close(lse, want_lse, atol=1e-12, rtol=1e-10, msg=lambda m, kw=kw: f"lse {kw}: {m}")
    # torch SDPA: top-left is_causal combined with a mask (expressed as one bool mask for torch)
    tl_causal = torch.ones(5, 7, dtype=torch.bool).tril()
    want = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                          attn_mask=bmask & tl_causal)
    got = reference.attention(q, k, v, causal=True, causal_offset=0, attn_mask=bmask)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)


# --------------------------------------------------------------------- every feature x path on the kernels
def _slopes(h, b=None, seed=0):
    s = 0.05 + 0.4 * torch.rand(h if b is None else (b, h), generator=torch.Generator().manual_seed(seed))
    return s.to(DEVICE)


def _rows_masked(b, h, nq, nk, *, kind=torch.bool, dtype=torch.float32, seed=0):
    """A mask with some fully masked rows: bool (True = attend) or additive (-inf / random), in ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(b, h, nq, nk, generator=g) > 0.3
    keep[..., 1, :] = False
    if kind == torch.bool:
        return keep.to(DEVICE)
    add = torch.where(keep, torch.randn(b, h, nq, nk, generator=g), -math.inf)
    return add.to(DEVICE, dtype)


COMBOS = {
    # name: (B, Hq, Hkv, Nq, Nk, D, attention kwargs as a function of dtype)
    "softcap_mask": (2, 2, 1, 13, 21, 16, lambda dt: dict(softcap=2.0, attn_mask=_rows_masked(2, 1, 13, 21))),
    "softcap_alibi_window_causal": (1, 4, 2, 19, 27, 24, lambda dt: dict(
        softcap=3.0, alibi_slopes=_slopes(4), window=(6, 2), causal=True)),
    "head_dim_4_everything": (2, 2, 2, 9, 14, 4, lambda dt: dict(
        softcap=1.5, alibi_slopes=_slopes(2, 2), window=(5, 3), attn_mask=_rows_masked(2, 2, 9, 14, kind="add"))),
    "head_dim_1_causal_mask": (1, 3, 1, 7, 11, 1, lambda dt: dict(
        causal=True, attn_mask=_rows_masked(1, 1, 7, 11, seed=3), scale=0.9)),
    "float_mask_other_dtype": (1, 2, 2, 10, 17, 8, lambda dt: dict(
        softcap=4.0, attn_mask=_rows_masked(1, 2, 10, 17, kind="add",
                                            dtype=torch.float16 if dt == torch.float32 else torch.float32))),
}


@pytest.mark.parametrize("layout", ["contiguous", "strided"])
@pytest.mark.parametrize("combo", list(COMBOS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@needs_triton
def test_feature_combinations_on_kernels(dtype, combo, layout):
    """Feature pairs the single-feature tests miss, on the Triton road, forward and gradients against the
    float64 reference: softcap with masks, ALiBi and windows, head dims below 16, a float mask of another
    dtype than q, and (strided) every feature on (B, N, H, D) tensors seen as (B, H, N, D)."""
    skip_if_unsupported("triton", dtype)
    if layout == "strided" and combo not in ("softcap_alibi_window_causal", "head_dim_4_everything"):
        pytest.skip("the strided layout runs the combos with every feature")
    B, Hq, Hkv, Nq, Nk, D, kwf = COMBOS[combo]
    kw = kwf(dtype)

    def make(b, h, n, seed):
        t = rand(b, n, h, D + 3, dtype=dtype, seed=seed, scale=2.0)[..., :D]  # (B, N, H, D) with padded rows
        return t.transpose(1, 2) if layout == "strided" else t.transpose(1, 2).contiguous()

    q, k, v = make(B, Hq, Nq, 1), make(B, Hkv, Nk, 2), make(B, Hkv, Nk, 3)
    if layout == "strided":
        assert not q.is_contiguous() and q.stride(-1) == 1
    ref_kw = dict(kw)
    if "alibi_slopes" in ref_kw:
        ref_kw["alibi_slopes"] = ref_kw["alibi_slopes"].double()
    _compare(lambda q, k, v: embedattn.attention(q, k, v, backend="triton", **kw),
             lambda q, k, v, up: reference.attention(q, k, v, upcast=up, **(ref_kw if up else kw)), (q, k, v))


@needs_triton
@pytest.mark.parametrize("causal", [False, True])
def test_varlen_every_feature(causal):
    """Varlen with window, softcap, ALiBi (B, H) and GQA at once, forward and gradients."""
    lq, lk = [7, 1, 12], [9, 4, 12]
    cu_q = torch.tensor([0, 7, 8, 20], dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor([0, 9, 13, 25], dtype=torch.int32, device=DEVICE)
    q, k, v = rand(20, 4, 8, seed=60, scale=2), rand(25, 2, 8, seed=61, scale=2), rand(25, 2, 8, seed=62)
    kw = dict(causal=causal, window=(4, 1), softcap=2.5, alibi_slopes=_slopes(4, 3, seed=2))
    _compare(lambda q, k, v: embedattn.attention_varlen(q, k, v, cu_q, cu_k, max(lq), max(lk), backend="triton",
                                                        **kw),
             lambda q, k, v, up: reference.attention_varlen(q, k, v, cu_q, cu_k, upcast=up, **kw), (q, k, v))


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("backend", BACKENDS)
def test_kvcache_every_feature(backend, num_splits):
    """KV-cache decoding with window, softcap, ALiBi, GQA and an append, split or not: each feature reaches
    the kernel (the reference is called directly, not through the entry)."""
    B, H, HK, S, D, nq = 2, 4, 2, 40, 16, 2
    kc, vc = rand(B, HK, S, D, seed=63, scale=2), rand(B, HK, S, D, seed=64)
    q, kn = rand(B, H, nq, D, seed=65, scale=2), rand(B, HK, nq, D, seed=66, scale=2)
    vn = rand(B, HK, nq, D, seed=67)
    lens = torch.tensor([5, 31], dtype=torch.int32, device=DEVICE)
    slopes = _slopes(H, B, seed=4)
    kw = dict(causal=True, window=(9, 0), softcap=1.5, alibi_slopes=slopes)
    out = embedattn.attention_with_kvcache(q, kc, vc, lens, kn, vn, num_splits=num_splits, backend=backend, **kw)
    total = lens + nq
    ref = reference.attention_with_kvcache(q.double(), kc.double(), vc.double(), total,
                                           **dict(kw, alibi_slopes=slopes.double()))
    plain = reference.attention_with_kvcache(q, kc, vc, total, upcast=False, **kw)
    assert_fa_close(out, ref, plain)
    for drop in ("softcap", "window", "alibi_slopes"):  # each feature changes the answer here
        other = reference.attention_with_kvcache(q.double(), kc.double(), vc.double(), total,
                                                 **{key: val for key, val in kw.items() if key != drop})
        assert (other - ref).abs().max() > 1e-2, drop


@needs_triton
def test_kvcache_automatic_split_choice(monkeypatch):
    """num_splits=0 picks the split count from the shape on a GPU (the interpreter always picks 1): here the
    GPU heuristic runs under the interpreter, chooses several splits for a long cache, and is exact."""
    from embedattn.kernels import attention as K

    chosen = []
    orig = K._forward
    monkeypatch.setattr(K, "_forward", lambda *a, **kw: chosen.append(kw.get("num_splits", 1)) or orig(*a, **kw))
    monkeypatch.setattr(K, "interpreting", lambda: False)  # the GPU heuristic (and GPU tile sizes)
    B, H, S, D = 1, 2, 600, 16
    kc, vc = rand(B, H, S, D, seed=68), rand(B, H, S, D, seed=69)
    q = rand(B, H, 1, D, seed=70)
    lens = torch.tensor([577], dtype=torch.int32, device=DEVICE)
    kw = dict(softcap=3.0, window=(400, 0), causal=True)
    out = embedattn.attention_with_kvcache(q, kc, vc, lens, num_splits=0, backend="triton", **kw)
    assert chosen and chosen[-1] > 1, chosen
    ref = reference.attention_with_kvcache(q.double(), kc.double(), vc.double(), lens, **kw)
    plain = reference.attention_with_kvcache(q, kc, vc, lens, upcast=False, **kw)
    assert_fa_close(out, ref, plain)


@needs_triton
def test_gpu_tile_configs_under_the_interpreter(monkeypatch):
    """The autotune space (kernels FWD_CONFIGS/BWD_CONFIGS), not only the interpreter's one fixed config:
    each distinct (BLOCK_M, BLOCK_N) of the forward runs a shape with tails past a tile, each of the
    backward's runs forward and backward, with features on."""
    from embedattn.kernels import attention as K

    def distinct(configs, fixed):
        seen = {(fixed["BLOCK_M"], fixed["BLOCK_N"])}  # the interpreter's own config runs in every other test
        return [c.kwargs for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) not in seen
                and not seen.add((c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]))]

    fwd, bwd = distinct(K.FWD_CONFIGS, K._fixed_fwd(16)), distinct(K.BWD_CONFIGS, K._fixed_bwd(16))
    shapes = [(1, 2, 1, 37, 135, 8, dict(causal=True, softcap=2.0, alibi_slopes=_slopes(2))),
              (1, 1, 1, 131, 45, 8, dict(window=(40, 9), attn_mask=_rows_masked(1, 1, 131, 45)))]
    runs = [(fc, None, shapes[i % 2]) for i, fc in enumerate(fwd)]
    runs += [(fwd[0], bc, (1, 1, 1, 67, 70, 8, dict(causal=True, window=(50, 3), softcap=2.0,
                                                    attn_mask=_rows_masked(1, 1, 67, 70)))) for bc in bwd]
    for i, (fc, bc, (B, Hq, Hkv, Nq, Nk, D, kw)) in enumerate(runs):
        monkeypatch.setattr(K, "_fixed_fwd", lambda *a, c=fc, **k: dict(c, num_warps=4, num_stages=1))
        monkeypatch.setattr(K, "_fixed_bwd", lambda *a, c=bc, **k: dict(c or {}, num_warps=4, num_stages=1))
        q, k, v = rand(B, Hq, Nq, D, seed=i), rand(B, Hkv, Nk, D, seed=i + 1), rand(B, Hkv, Nk, D, seed=i + 2)
        try:
            _compare(lambda q, k, v, kw=kw: embedattn.attention(q, k, v, backend="triton", **kw),
                     lambda q, k, v, up, kw=kw: reference.attention(q, k, v, upcast=up, **kw), (q, k, v),
                     grads=bc is not None)
        except AssertionError as e:
            raise AssertionError(f"fwd {fc}, bwd {bc}, shape {(B, Hq, Hkv, Nq, Nk, D)}: {e}") from None
        ran = K.last_config()
        for kind, c in (("fwd", fc), ("bwd_dkdv", bc)):  # the launch used the config (whatever the record's format)
            if c is not None:
                assert re.search(rf"BLOCK_M={c['BLOCK_M']}\b", ran[kind]) and \
                    re.search(rf"BLOCK_N={c['BLOCK_N']}\b", ran[kind]), (kind, c, ran[kind])


@needs_triton
@pytest.mark.parametrize("softcap", [1e3, 1e5])
def test_softcap_accurate_at_large_caps(softcap):
    """softcap * tanh(s / softcap) with a large cap: the kernels' tanh must be accurate relative to its value (an
    absolute 1e-7 error becomes 1e-7 * softcap in the score: 1.3e-2 in the output at 1e5)."""
    q, k, v = rand(1, 2, 16, 32, seed=71, scale=3), rand(1, 2, 24, 32, seed=72, scale=3), rand(1, 2, 24, 32, seed=73)
    _compare(lambda q, k, v: embedattn.attention(q, k, v, softcap=softcap, backend="triton"),
             lambda q, k, v, up: reference.attention(q, k, v, softcap=softcap, upcast=up), (q, k, v), grads=False)

# ------------------------------------------------------------------------------- KV cache: bounds, no syncs
def _cache(S=8, B=2, seed=84):
    return rand(B, 2, S, 16, seed=seed), rand(B, 2, S, 16, seed=seed + 1)


@pytest.mark.parametrize("check_bounds", [None, "sync", True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_kvcache_bounds_sync_mode(backend, check_bounds):
    """On the CPU by default, and with check_bounds="sync": lengths out of [0, S - Nnew] raise ValueError from
    the call, before anything is written."""
    if check_bounds is None and ON_CUDA:
        pytest.skip("the default on CUDA is the device-side assertion, which would end the CUDA context")
    kc, vc = _cache()
    k0, v0 = kc.clone(), vc.clone()
    q, kn = rand(2, 2, 2, 16, seed=86), rand(2, 2, 2, 16, seed=87)
    for lens in ([3, 7], [-1, 2]):
        with pytest.raises(ValueError, match="cache_seqlens"):
            embedattn.attention_with_kvcache(q, kc, vc, torch.tensor(lens, device=DEVICE), kn, kn.clone(),
                                             check_bounds=check_bounds, backend=backend)
        assert torch.equal(kc, k0) and torch.equal(vc, v0)


@needs_triton
def test_kvcache_device_mode_reads_nothing_back(monkeypatch):
    """The default decoding step on CUDA ("device" mode, forced here on the CPU): no host read of any device
    tensor, one torch._assert_async, the same answer; bad lengths fail that assertion (on the CPU at once,
    before the append)."""
    ea = importlib.import_module("embedattn.attention")
    monkeypatch.setattr(ea, "bounds_mode", lambda check_bounds, device: "device")
    kc, vc = _cache()
    q, kn, vn = rand(2, 2, 2, 16, seed=86), rand(2, 2, 2, 16, seed=87), rand(2, 2, 2, 16, seed=88)
    lens = torch.tensor([3, 6], device=DEVICE)
    with HostReads() as mode:
        out = embedattn.attention_with_kvcache(q, kc, vc, lens, kn, vn, causal=True, backend="triton")
    assert not [op for op in mode.ops if "_local_scalar_dense" in op or "item" in op], mode.ops
    assert sum("_assert_async" in op for op in mode.ops) == 1, mode.ops
    assert torch.equal(kc[1, :, 6:8], kn[1]) and torch.equal(vc[0, :, 3:5], vn[0])
    want = reference.attention_with_kvcache(q.double(), kc.double(), vc.double(), lens + 2, causal=True)
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)
    if ON_CUDA:  # a failing device-side assertion would end the CUDA context of the whole session
        return
    k0, v0 = kc.clone(), vc.clone()
    with pytest.raises(RuntimeError, match="cache_seqlens"):
        embedattn.attention_with_kvcache(q, kc, vc, torch.tensor([3, 7], device=DEVICE), kn, vn, backend="triton")
    assert torch.equal(kc, k0) and torch.equal(vc, v0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kvcache_out_of_range_lengths_never_write_outside(backend):
    """With the check off (as after a device-side assertion that has not surfaced yet) no read or write leaves
    the cache: a batch out of range gets no append and attends to its lengths clamped to [0, S]; the others
    run as usual."""
    S = 8
    kc, vc = _cache(S, B=3)
    k0, v0 = kc.clone(), vc.clone()
    q, kn, vn = rand(3, 2, 3, 16, seed=89), rand(3, 2, 3, 16, seed=90), rand(3, 2, 3, 16, seed=91)
    lens = torch.tensor([6, 2, -4], device=DEVICE)  # 6 + 3 > 8 and -4 < 0 are out of range
    out = embedattn.attention_with_kvcache(q, kc, vc, lens, kn, vn, check_bounds="off", backend=backend)
    assert torch.equal(kc[0], k0[0]) and torch.equal(vc[2], v0[2])  # no append for the bad batches
    assert torch.equal(kc[1, :, 2:5], kn[1]) and torch.equal(vc[1, :, 5:], v0[1, :, 5:])
    want = reference.attention_with_kvcache(q.double(), kc.double(), vc.double(), torch.tensor([S, 5, 0]))
    torch.testing.assert_close(out.double(), want.to(DEVICE), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kvcache_refuses_an_expanded_cache_before_writing(backend):
    """A cache with a stride 0 on a dim of size > 1 (expand) cannot take an in-place append: ValueError
    before either cache is written."""
    kc = rand(1, 2, 8, 16, seed=92).expand(3, 2, 8, 16)
    vc = rand(3, 2, 8, 16, seed=93)
    v0 = vc.clone()
    q, kn = rand(3, 2, 1, 16, seed=94), rand(3, 2, 1, 16, seed=95)
    lens = torch.tensor([1, 2, 3], device=DEVICE)
    for k_cache, v_cache, name in ((kc, vc, "k_cache"), (vc, kc, "v_cache")):
        with pytest.raises(ValueError, match=f"{name} is expanded"):
            embedattn.attention_with_kvcache(q, k_cache, v_cache, lens, kn, kn.clone(), backend=backend)
        assert torch.equal(vc, v0)
    out = embedattn.attention_with_kvcache(q, kc, vc, lens, backend=backend)  # reading an expanded cache is fine
    assert out.shape == q.shape


@pytest.mark.skipif(not ON_CUDA, reason="host syncs exist on CUDA only")
def test_kvcache_default_decoding_step_does_not_sync_cuda():
    B, H, S, D = 4, 4, 512, 64
    kc, vc = rand(B, H, S, D, dtype=torch.float16), rand(B, H, S, D, dtype=torch.float16)
    q, kn = rand(B, H, 1, D, dtype=torch.float16), rand(B, H, 1, D, dtype=torch.float16)
    lens = torch.tensor([0, 17, 300, 511], dtype=torch.int32, device=DEVICE)
    embedattn.attention_with_kvcache(q, kc, vc, lens, kn, kn.clone(), causal=True)  # warm-up (autotune, compile)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        embedattn.attention_with_kvcache(q, kc, vc, lens + 1, kn, kn.clone(), causal=True, softcap=30.0)
    finally:
        torch.cuda.set_sync_debug_mode(0)

# ----------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("backend", BACKENDS)
def test_feature_bad_input(backend):
    q = rand(1, 2, 4, 16)
    with pytest.raises(ValueError, match="window"):
        embedattn.attention(q, q, q, window=(1,), backend=backend)
    with pytest.raises(ValueError, match="softcap"):
        embedattn.attention(q, q, q, softcap=-1.0, backend=backend)
    with pytest.raises(ValueError, match="alibi_slopes"):
        embedattn.attention(q, q, q, alibi_slopes=torch.ones(3, device=DEVICE), backend=backend)
    with pytest.raises(ValueError, match="dropout_p"):
        embedattn.attention(q, q, q, dropout_p=1.0, backend=backend)
    qp = rand(5, 2, 16)
    with pytest.raises(ValueError, match="cu_seqlens_q"):
        embedattn.attention_varlen(qp, qp, qp, torch.tensor([0, 3], device=DEVICE),
                                   torch.tensor([0, 5], device=DEVICE), 5, 5, backend=backend)
    with pytest.raises(ValueError, match="max_seqlen"):
        embedattn.attention_varlen(qp, qp, qp, torch.tensor([0, 5], device=DEVICE),
                                   torch.tensor([0, 5], device=DEVICE), 2, 5, backend=backend)
    with pytest.raises(ValueError, match="scale"):
        embedattn.attention_varlen(qp, qp, qp, torch.tensor([0, 5], device=DEVICE),
                                   torch.tensor([0, 5], device=DEVICE), 5, 5, scale=float("nan"), backend=backend)
    kc = rand(1, 2, 8, 16)
    with pytest.raises(ValueError, match="scale"):
        embedattn.attention_with_kvcache(q[:, :, :1], kc, kc.clone(), torch.tensor([1], device=DEVICE),
                                         scale=float("inf"), backend=backend)
    with pytest.raises(ValueError, match="cache"):
        embedattn.attention_with_kvcache(q[:, :, :1], kc, kc.clone(), torch.tensor([8], device=DEVICE),
                                         kc[:, :, :1], kc[:, :, :1], check_bounds="sync", backend=backend)
    with pytest.raises(TypeError, match="cache_seqlens"):
        embedattn.attention_with_kvcache(q[:, :, :1], kc, kc.clone(), torch.tensor([1.0], device=DEVICE),
                                         backend=backend)


@pytest.mark.skipif(not ON_CUDA, reason="large shapes run on CUDA only")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_features_large_cuda(dtype):
    q, k, v = rand(2, 8, 1024, 128, dtype=dtype, seed=30), rand(2, 2, 1024, 128, dtype=dtype, seed=31), \
        rand(2, 2, 1024, 128, dtype=dtype, seed=32)
    slopes = torch.rand(8, device=DEVICE) * 0.1
    kw = dict(causal=True, window=(256, 0), softcap=30.0, alibi_slopes=slopes)
    _compare(lambda q, k, v: embedattn.attention(q, k, v, backend="triton", **kw),
             lambda q, k, v, up: reference.attention(q, k, v, upcast=up, **{**kw, "alibi_slopes": slopes.to(q.dtype)}),
             (q, k, v))


@pytest.mark.parametrize("backend", BACKENDS)
def test_kvcache_bad_input_leaves_cache_untouched(backend):
    """Every argument is checked before k_new/v_new are written into the cache in place."""
    kc, vc = rand(1, 2, 8, 16, seed=40), rand(1, 2, 8, 16, seed=41)
    k0, v0 = kc.clone(), vc.clone()
    q, kn = rand(1, 2, 1, 16, seed=42), rand(1, 2, 1, 16, seed=43)
    lens = torch.tensor([3], device=DEVICE)
    for kw in (dict(window=(1,)), dict(alibi_slopes=torch.ones(5, device=DEVICE)), dict(softcap=-1.0)):
        with pytest.raises(ValueError):
            embedattn.attention_with_kvcache(q, kc, vc, lens, kn, kn.clone(), backend=backend, **kw)
        assert torch.equal(kc, k0) and torch.equal(vc, v0), kw


def _feature_specs() -> list[dict]:
    """Every kernel with all feature flags on, and the varlen and split-KV decoding forwards."""
    every = dict(HEAD_DIM=96, BLOCK_D=128, HEAD_DIM_V=96, BLOCK_DV=128, PREC="tf32", CAUSAL=False, WINDOW=True,
                 MASK_KIND=1, SOFTCAP=True, ALIBI=True, DROPOUT=True, VARLEN=False)
    fwd = dict(every, NUM_DK=1, SINK=True, KLENS=False, SPLIT=False)
    return [dict(kernel="fwd", config=[64, 64, 4, 3], consts=fwd),
            dict(kernel="dkdv", config=[32, 64, 4, 3], consts=dict(every, GRAD_K=True, GRAD_V=True)),
            dict(kernel="dq", config=[64, 32, 4, 3], consts=every),
            dict(kernel="fwd", config=[64, 64, 4, 3], consts=dict(fwd, MASK_KIND=0, DROPOUT=False, VARLEN=True)),
            dict(kernel="fwd", config=[16, 64, 4, 3], consts=dict(fwd, MASK_KIND=0, DROPOUT=False, WINDOW=False,
                                                                  CAUSAL=True, KLENS=True, SPLIT=True, SINK=False))]


@pytest.mark.skipif("triton" not in BACKENDS or ON_CUDA, reason="needs Triton; on CUDA the kernels run for real")
def test_feature_kernels_compile_for_sm90():
    """What the interpreter cannot show: every kernel with all feature flags on (and the varlen and
    split-KV decoding variants) lowers and assembles for an H100 (ptxas runs here, no GPU needed;
    in a subprocess, since this one interprets), with tensor-core instructions in each."""
    rows = run_rows(ATTENTION, _feature_specs())
    for r in rows:
        assert "error" not in r and r["wgmma"] + r["mma_sync"] > 0, r


@needs_triton
@pytest.mark.parametrize("causal", [False, True])
def test_window_and_alibi_follow_a_top_left_diagonal_on_both_backends(causal):
    """With causal_offset=0 (torch's top-left alignment, used by the SDPA drop-in and integrations)
    the reference measures window and ALiBi from the same diagonal as the kernels."""
    q, k, v = rand(1, 2, 5, 16, seed=40), rand(1, 2, 11, 16, seed=41), rand(1, 2, 11, 16, seed=42)
    slopes = torch.tensor([0.5, 0.25], device=DEVICE)
    kw = dict(causal=causal, causal_offset=0, window=(2, 1), alibi_slopes=slopes)
    a = embedattn.attention(q, k, v, backend="reference", **kw)
    b = embedattn.attention(q, k, v, backend="triton", **kw)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # and the diagonal really is top-left: query 0 sees keys 0..1 only (window right side 1)
    i, j = torch.arange(5)[:, None], torch.arange(11)[None, :]
    rel = i - j
    allowed = (rel <= 2) & (rel >= -1) & ((rel >= 0) if causal else True)
    bias = -(slopes[None, :, None, None].cpu() * rel.abs())
    additive = bias + torch.where(allowed, 0.0, float("-inf"))
    want = reference.attention(q, k, v, attn_mask=additive.to(DEVICE))
    torch.testing.assert_close(a, want, atol=1e-5, rtol=1e-5)
