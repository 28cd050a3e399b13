"""Left-padded KV caches (``attention_with_kvcache(cache_leftpad=...)``) and paged keys for packed queries
(``attention_varlen(block_table=...)``), issue #28 items 4 and 5.

Oracles: the dense float64 ``reference.attention`` on each batch's keys sliced out by hand (a left pad is exactly the
keys from cache_leftpad[b] on, with the diagonal, window and ALiBi in absolute positions: slicing the keys and
keeping the default bottom-right offset Nk - Nq is the same diagonal), and on each sequence's keys gathered from
the pages one by one. Errors follow FlashAttention's rule (tests/helpers.py: assert_fa_close). Positions a call
must not read hold NaN.
"""

from __future__ import annotations

import pytest
import torch
from helpers import BACKENDS, DEVICE, ROADS, assert_fa_close, on_road, pages_to_cache

import embedattn
from embedattn import reference


def _rand(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(DEVICE, dtype)


def _i32(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32, device=DEVICE)


def _sliced_oracle(q, keys, vals, first, total, *, upcast=True, dtype=None, sinks=None, **kw):
    """(out, lse) of batch by batch: q[b] against keys[b][:, first[b]:total[b]] by the dense reference (in float64
    with ``dtype=torch.float64``, else in q's dtype, ``upcast`` as given). keys/vals (B, Hkv, S, D) in position
    order. A batch with no key: zeros, and lse -inf (the sink with sinks)."""
    dtype = dtype or q.dtype
    outs, lses = [], []
    for b in range(q.shape[0]):
        qb = q[b:b + 1].to(dtype)
        kb, vb = (t[b:b + 1, :, first[b]:total[b]].to(dtype) for t in (keys, vals))
        slopes = kw.get("alibi_slopes")
        kwb = dict(kw, alibi_slopes=slopes[b] if slopes is not None and slopes.dim() == 2 else slopes)
        if kb.shape[2] == 0:
            o = qb.new_zeros(*qb.shape[:3], vb.shape[-1])
            lse = torch.full(qb.shape[:3], float("-inf"), dtype=torch.float64, device=DEVICE)
            if sinks is not None:
                lse = sinks.double().view(1, -1, 1).expand_as(lse)
        else:
            o, lse = reference.attention(qb, kb, vb, return_lse=True, upcast=upcast, sinks=sinks, **kwb)
        outs.append(o)
        lses.append(lse.double())
    return torch.cat(outs), torch.cat(lses)


def _appended(cache, new, lens):
    """The (B, Hkv, S, D) cache with new (B, Hkv, Nnew, D) written at lens[b] (a copy)."""
    out = cache.clone()
    if new is not None:
        for b, n in enumerate(lens):
            out[b, :, n:n + new.shape[2]] = new[b]
    return out


def _paged_copy(cache, page, seed):
    """A pool of pages (num_pages, Hkv, page, D) holding the contiguous cache (B, Hkv, S, D) (S a multiple of page) in
    a random page order with two spare pages (NaN: nobody's), and its table."""
    B, Hkv, S, D = cache.shape
    per = S // page
    n_pages = B * per + 2
    perm = torch.randperm(n_pages, generator=torch.Generator().manual_seed(seed))
    table = perm[:B * per].view(B, per).to(DEVICE, torch.int32)
    pool = torch.full((n_pages, Hkv, page, D), float("nan"), dtype=cache.dtype, device=DEVICE)
    pool[table.long()] = cache.view(B, Hkv, per, page, D).permute(0, 2, 1, 3, 4)
    return pool, table


# ------------------------------------------------------------------------------------------------ item 4: leftpad
FEATURES = {
    "plain": {},
    "causal": dict(causal=True),
    "window": dict(causal=True, window=(6, 0)),
    "bidir-window+alibi": dict(window=(5, 3), alibi=True),
    "softcap+sinks": dict(causal=True, softcap=3.0, sinks=True),
}
LAYOUTS = {"contiguous": (0, 1), "split3": (0, 3), "paged7": (7, 1), "paged16-split2": (16, 2)}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("road", ROADS)
def test_leftpad_kvcache(road, backend, feature, layout):
    """Batch b sees cache positions cache_leftpad[b] .. cache_seqlens[b] + Nnew - 1: pads 0, 17 (inside a key tile,
    past the first) and equal to cache_seqlens (only the new keys), odd lengths, GQA, two new tokens appended at
    cache_seqlens[b]; contiguous, split-KV and paged (page sizes 7 and 16) caches; positions left of each pad hold
    NaN. out and lse against float64 by FlashAttention's rule, the appends exact."""
    page, splits = LAYOUTS[layout]
    f = dict(FEATURES[feature])
    B, Hq, Hkv, S, D, N = 3, 4, 2, 112, 16, 2
    lens_l, pad_l = [11, 37, 26], [0, 17, 26]
    kc, vc = _rand(B, Hkv, S, D, seed=1), _rand(B, Hkv, S, D, seed=2)
    for b, p in enumerate(pad_l):
        kc[b, :, :p] = float("nan")
        vc[b, :, :p] = float("nan")
    q, kn, vn = _rand(B, Hq, N, D, seed=3), _rand(B, Hkv, N, D, seed=4), _rand(B, Hkv, N, D, seed=5)
    kw = {k: v for k, v in f.items() if k in ("causal", "window", "softcap")}
    if f.get("alibi"):
        kw["alibi_slopes"] = 0.05 + 0.4 * torch.rand(B, Hq, generator=torch.Generator().manual_seed(6)).to(DEVICE)
    if f.get("sinks"):
        kw["sinks"] = torch.linspace(-1.0, 1.5, Hq, device=DEVICE)
    want_k, want_v = _appended(kc, kn, lens_l), _appended(vc, vn, lens_l)
    kc_in, vc_in, table = kc.clone(), vc.clone(), None
    if page:
        kc_in, table = _paged_copy(kc, page, seed=7)
        vc_in, _ = _paged_copy(vc, page, seed=7)
    lens, pad = _i32(lens_l), _i32(pad_l)
    fn = on_road(road, lambda q, kc_, vc_, kn, vn: embedattn.attention_with_kvcache(
        q, kc_, vc_, lens, kn, vn, cache_leftpad=pad, block_table=table, num_splits=splits, return_lse=True,
        backend=backend, **kw))
    out, lse = fn(q, kc_in, vc_in, kn, vn)
    got_k, got_v = (kc_in, vc_in) if table is None else (pages_to_cache(kc_in, table), pages_to_cache(vc_in, table))
    assert torch.equal(got_k.nan_to_num(7.0), want_k.nan_to_num(7.0))
    assert torch.equal(got_v.nan_to_num(7.0), want_v.nan_to_num(7.0))
    total = [n + N for n in lens_l]
    sinks = kw.pop("sinks", None)
    ref, ref_lse = _sliced_oracle(q, want_k, want_v, pad_l, total, dtype=torch.float64, sinks=sinks, **kw)
    plain, _ = _sliced_oracle(q, want_k, want_v, pad_l, total, upcast=False, sinks=sinks, **kw)
    assert_fa_close(out, ref, plain)
    torch.testing.assert_close(lse.double(), ref_lse, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_leftpad_half_precision(backend):
    """fp16, leftpad with causal, ALiBi (H,) and a window, split-KV: FlashAttention's rule against float64."""
    B, Hq, Hkv, S, D, N = 2, 4, 1, 64, 16, 3
    lens_l, pad_l = [40, 21], [33, 5]
    kc, vc = _rand(B, Hkv, S, D, dtype=torch.float16, seed=8), _rand(B, Hkv, S, D, dtype=torch.float16, seed=9)
    q, kn, vn = (_rand(B, h, N, D, dtype=torch.float16, seed=10 + i) for i, h in enumerate((Hq, Hkv, Hkv)))
    kw = dict(causal=True, window=(20, 0), alibi_slopes=torch.rand(Hq, device=DEVICE))
    want_k, want_v = _appended(kc, kn, lens_l), _appended(vc, vn, lens_l)
    out = embedattn.attention_with_kvcache(q, kc, vc, _i32(lens_l), kn, vn, cache_leftpad=_i32(pad_l), num_splits=2,
                                           backend=backend, **kw)
    total = [n + N for n in lens_l]
    ref, _ = _sliced_oracle(q, want_k, want_v, pad_l, total, dtype=torch.float64, **kw)
    plain, _ = _sliced_oracle(q, want_k, want_v, pad_l, total, upcast=False, **kw)
    assert_fa_close(out, ref, plain)


@pytest.mark.parametrize("sinks", [False, True])
@pytest.mark.parametrize("splits", [1, 4])
@pytest.mark.parametrize("backend", BACKENDS)
def test_leftpad_no_key(backend, splits, sinks):
    """cache_leftpad = cache_seqlens with no new keys: that batch sees nothing (zeros, lse -inf, or the sink's logit
    with sinks; no NaN) while the other batch, its pad two keys short of its length, sees two keys; split-KV merges
    splits that see no key."""
    B, Hq, Hkv, S, D = 2, 2, 1, 50, 8
    kc, vc = _rand(B, Hkv, S, D, seed=20), _rand(B, Hkv, S, D, seed=21)
    kc[:, :, :30] = float("nan")
    q = _rand(B, Hq, 1, D, seed=22)
    sink = torch.tensor([0.5, -2.0], device=DEVICE) if sinks else None
    out, lse = embedattn.attention_with_kvcache(q, kc, vc, _i32([30, 45]), cache_leftpad=_i32([30, 43]),
                                                num_splits=splits, return_lse=True, sinks=sink, backend=backend)
    assert not out.isnan().any() and not lse.isnan().any()
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    want_lse0 = sink.view(Hq, 1) if sinks else torch.full((Hq, 1), float("-inf"), device=DEVICE)
    torch.testing.assert_close(lse[0], want_lse0)
    ref, _ = _sliced_oracle(q, kc, vc, [30, 43], [30, 45], dtype=torch.float64, sinks=sink)
    torch.testing.assert_close(out.double(), ref, atol=2e-6, rtol=2e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_leftpad_zero_equals_no_leftpad(backend):
    """cache_leftpad of zeros is the call without it, bit for bit (paged and split-KV)."""
    kc, vc = _rand(24, 2, 4, 16, seed=30), _rand(24, 2, 4, 16, seed=31)
    table = torch.randperm(24, generator=torch.Generator().manual_seed(32))[:18].view(3, 6).to(DEVICE, torch.int32)
    q, lens = _rand(3, 4, 2, 16, seed=33), _i32([5, 23, 14])
    kw = dict(block_table=table, causal=True, num_splits=2, backend=backend, return_lse=True)
    got = embedattn.attention_with_kvcache(q, kc, vc, lens, cache_leftpad=torch.zeros_like(lens), **kw)
    want = embedattn.attention_with_kvcache(q, kc, vc, lens, **kw)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


@pytest.mark.parametrize("check_bounds", [None, "sync", True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_leftpad_bad_input(backend, check_bounds):
    """A bad cache_leftpad raises naming it, before the cache is written: not a tensor, a float tensor, the wrong
    shape (TypeError); negative, or past cache_seqlens[b] (ValueError, naming the batch and both values)."""
    kc, vc = _rand(2, 2, 16, 8, seed=40), _rand(2, 2, 16, 8, seed=41)
    k0, v0 = kc.clone(), vc.clone()
    q, kn = _rand(2, 2, 1, 8, seed=42), _rand(2, 2, 1, 8, seed=43)
    lens = _i32([3, 9])
    cases = [
        (TypeError, "cache_leftpad must be an int32/int64 tensor of shape", [0, 1]),
        (TypeError, "cache_leftpad must be an int32/int64 tensor of shape", lens.float()),
        (TypeError, "cache_leftpad must be an int32/int64 tensor of shape", _i32([0, 1, 2])),
        (TypeError, "cache_leftpad must be an int32/int64 tensor of shape", _i32([[0, 1]])),
        (ValueError, r"cache_leftpad\[0\] = -1 with cache_seqlens\[0\] = 3", _i32([-1, 0])),
        (ValueError, r"cache_leftpad\[1\] = 10 with cache_seqlens\[1\] = 9", _i32([0, 10])),
    ]
    for err, match, pad in cases:
        with pytest.raises(err, match=match):
            embedattn.attention_with_kvcache(q, kc, vc, lens, kn, kn.clone(), cache_leftpad=pad,
                                             check_bounds=check_bounds, backend=backend)
        assert torch.equal(kc, k0) and torch.equal(vc, v0), pad


@pytest.mark.parametrize("backend", BACKENDS)
def test_leftpad_device_mode_and_unchecked(backend):
    """check_bounds="device" compiled on the CPU: the graph's assertion (a RuntimeError naming cache_leftpad) before
    any append. "off": a batch whose pad lies past its length appends nothing and attends to nothing (its pad
    clamped to its length: zeros), the other batch is exact."""
    kc, vc = _rand(2, 1, 16, 8, seed=50), _rand(2, 1, 16, 8, seed=51)
    k0, v0 = kc.clone(), vc.clone()
    q, kn, vn = _rand(2, 2, 1, 8, seed=52), _rand(2, 1, 1, 8, seed=53), _rand(2, 1, 1, 8, seed=54)
    lens, pad = _i32([3, 9]), _i32([1, 12])

    def step(q, kc, vc, kn, vn, mode):
        return embedattn.attention_with_kvcache(q, kc, vc, lens, kn, vn, cache_leftpad=pad, check_bounds=mode,
                                                backend=backend)

    with pytest.raises(RuntimeError, match="cache_leftpad"):
        on_road("compiled", lambda *a: step(*a, "device"))(q, kc, vc, kn, vn)
    assert torch.equal(kc, k0) and torch.equal(vc, v0)
    out = step(q, kc, vc, kn, vn, "off")
    assert torch.equal(kc[1], k0[1]) and torch.equal(vc[1], v0[1])  # the bad batch appended nothing
    assert torch.equal(kc[0, :, 3], kn[0, :, 0])
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    ref, _ = _sliced_oracle(q[:1], kc[:1], vc[:1], [1], [4], dtype=torch.float64)
    torch.testing.assert_close(out[:1].double(), ref, atol=2e-6, rtol=2e-6)


# ------------------------------------------------------------------------------------------------ item 5: varlen paged
def _varlen_paged(lq, lk, page, *, Hq=4, Hkv=2, D=16, Dv=None, dtype=torch.float32, seed=60):
    """Packed q (total_q, Hq, D), pools (num_pages, Hkv, page, D / Dv) whose pages are a random permutation (spare
    pages and every slot no sequence uses hold NaN), the table (entries past a sequence's pages are -1), the
    offsets, and each sequence's keys/values gathered in order (lists of (Hkv, lk[b], D))."""
    Dv = Dv or D
    g = torch.Generator().manual_seed(seed)
    max_pages = max(-(-n // page) for n in lk) + 1
    n_pages = len(lk) * max_pages + 2
    kp = torch.full((n_pages, Hkv, page, D), float("nan"), dtype=dtype, device=DEVICE)
    vp = torch.full((n_pages, Hkv, page, Dv), float("nan"), dtype=dtype, device=DEVICE)
    perm = torch.randperm(n_pages, generator=g)
    table = torch.full((len(lk), max_pages), -1, dtype=torch.int32)
    keys, vals = [], []
    for b, n in enumerate(lk):
        kb = torch.randn(Hkv, n, D, generator=g).to(DEVICE, dtype)
        vb = torch.randn(Hkv, n, Dv, generator=g).to(DEVICE, dtype)
        for j in range(-(-n // page)):
            pid = int(perm[b * max_pages + j])
            table[b, j] = pid
            rows = slice(j * page, min(n, (j + 1) * page))
            kp[pid, :, :rows.stop - rows.start] = kb[:, rows]
            vp[pid, :, :rows.stop - rows.start] = vb[:, rows]
        keys.append(kb)
        vals.append(vb)
    q = torch.randn(sum(lq), Hq, D, generator=g).to(DEVICE, dtype)
    cu = lambda x: torch.tensor([0, *torch.tensor(x).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)  # noqa: E731
    return q, kp, vp, table.to(DEVICE), cu(lq), cu(lk), keys, vals


def _varlen_oracle(q, cu_q, keys, vals, *, dtype=None, upcast=True, sinks=None, **kw):
    """Sequence by sequence: its queries against its keys by the dense reference (bottom-right), packed back."""
    dtype = dtype or q.dtype
    outs, lses = [], []
    for b, (kb, vb) in enumerate(zip(keys, vals)):
        qb = q[int(cu_q[b]):int(cu_q[b + 1])].transpose(0, 1)[None].to(dtype)
        slopes = kw.get("alibi_slopes")
        kwb = dict(kw, alibi_slopes=slopes[b] if slopes is not None and slopes.dim() == 2 else slopes)
        if kb.shape[1] == 0:
            o = qb.new_zeros(*qb.shape[:3], vb.shape[-1])
            lse = (sinks.double().view(1, -1, 1).expand(*qb.shape[:3]) if sinks is not None
                   else torch.full(qb.shape[:3], float("-inf"), dtype=torch.float64, device=DEVICE))
        else:
            o, lse = reference.attention(qb, kb[None].to(dtype), vb[None].to(dtype), return_lse=True, upcast=upcast,
                                         sinks=sinks, **kwb)
        outs.append(o[0].transpose(0, 1))
        lses.append(lse[0].double())
    return torch.cat(outs), torch.cat(lses, dim=1)


VARLEN_FEATURES = {
    "plain": {},
    "causal": dict(causal=True),
    "window+alibi": dict(causal=True, window=(4, 0), alibi=True),
    "softcap+sinks+mla": dict(softcap=5.0, sinks=True, Dv=8),
}


@pytest.mark.parametrize("page", [1, 7, 16])
@pytest.mark.parametrize("feature", list(VARLEN_FEATURES))
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("road", ROADS)
def test_varlen_paged(road, backend, feature, page):
    """attention_varlen(block_table=...): packed queries (odd lengths, a sequence with no query, one with more queries
    than keys, one with no key) against keys read through the pages (page sizes 1, 7 and 16: the row gather and the
    one-page-per-tile loads), GQA, features, a value head dim of its own; every slot no sequence uses holds NaN and
    unused table entries are -1. out and lse against float64 by FlashAttention's rule."""
    f = dict(VARLEN_FEATURES[feature])
    lq, lk = [5, 0, 9, 3, 2], [13, 6, 33, 0, 1]
    q, kp, vp, table, cu_q, cu_k, keys, vals = _varlen_paged(lq, lk, page, Dv=f.pop("Dv", None))
    kw = {k: v for k, v in f.items() if k in ("causal", "window", "softcap")}
    if f.get("alibi"):
        kw["alibi_slopes"] = 0.05 + 0.4 * torch.rand(len(lq), 4, generator=torch.Generator().manual_seed(61)).to(DEVICE)
    sinks = torch.linspace(-1.0, 1.5, 4, device=DEVICE) if f.get("sinks") else None
    fn = on_road(road, lambda q, kp, vp: embedattn.attention_varlen(
        q, kp, vp, cu_q, cu_k, max(lq), max(lk) + 2, block_table=table, return_lse=True, sinks=sinks,
        backend=backend, **kw))
    out, lse = fn(q, kp, vp)
    ref, ref_lse = _varlen_oracle(q, cu_q, keys, vals, dtype=torch.float64, sinks=sinks, **kw)
    plain, _ = _varlen_oracle(q, cu_q, keys, vals, upcast=False, sinks=sinks, **kw)
    assert_fa_close(out, ref, plain)
    torch.testing.assert_close(lse.double(), ref_lse, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_varlen_paged_half_precision(backend):
    """fp16, causal with ALiBi (H,): paged varlen against float64 by FlashAttention's rule."""
    lq, lk = [7, 4], [19, 4]
    q, kp, vp, table, cu_q, cu_k, keys, vals = _varlen_paged(lq, lk, 8, dtype=torch.float16, seed=62)
    kw = dict(causal=True, alibi_slopes=torch.rand(4, device=DEVICE))
    out = embedattn.attention_varlen(q, kp, vp, cu_q, cu_k, 7, 19, block_table=table, backend=backend, **kw)
    ref, _ = _varlen_oracle(q, cu_q, keys, vals, dtype=torch.float64, **kw)
    plain, _ = _varlen_oracle(q, cu_q, keys, vals, upcast=False, **kw)
    assert_fa_close(out, ref, plain)


@pytest.mark.parametrize("backend", BACKENDS)
def test_varlen_paged_equals_packed(backend):
    """The same keys paged (page 16) and packed give the same output."""
    lq, lk = [6, 3], [21, 9]
    q, kp, vp, table, cu_q, cu_k, keys, vals = _varlen_paged(lq, lk, 16, seed=63)
    k, v = (torch.cat([t.transpose(0, 1) for t in ts]) for ts in (keys, vals))
    kw = dict(causal=True, backend=backend)
    got = embedattn.attention_varlen(q, kp, vp, cu_q, cu_k, 6, 21, block_table=table, **kw)
    want = embedattn.attention_varlen(q, k, v, cu_q, cu_k, 6, 21, **kw)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_varlen_paged_gradients(backend):
    """Forward-only through the pages: pools that require grad are refused at the call (ValueError naming
    block_table); q may require grad: the forward runs, a backward raises NotImplementedError on the Triton backend
    (never a silent zero gradient) and the reference differentiates dq (against float64). Under torch.no_grad the
    pools' requires_grad is no obstacle."""
    lq, lk = [4, 3], [10, 5]
    q, kp, vp, table, cu_q, cu_k, keys, vals = _varlen_paged(lq, lk, 4, seed=64)
    args = (cu_q, cu_k, 4, 10)
    with pytest.raises(ValueError, match="block_table"):
        embedattn.attention_varlen(q, kp.requires_grad_(), vp, *args, block_table=table, backend=backend)
    with torch.no_grad():
        embedattn.attention_varlen(q, kp, vp, *args, block_table=table, backend=backend)
    kp.requires_grad_(False)
    leaf = q.clone().requires_grad_()
    out = embedattn.attention_varlen(leaf, kp, vp, *args, block_table=table, backend=backend)
    dout = _rand(*out.shape, seed=65)
    if backend == "triton":
        with pytest.raises(NotImplementedError, match="block_table"):
            out.backward(dout)
        return
    (dq,) = torch.autograd.grad(out, leaf, dout)
    r64 = q.double().requires_grad_()
    ref, _ = _varlen_oracle(r64, cu_q, keys, vals, dtype=torch.float64)
    (dq_ref,) = torch.autograd.grad(ref, r64, dout.double())
    torch.testing.assert_close(dq.double(), dq_ref, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_varlen_paged_bad_input(backend):
    """Each bad argument raises naming it: k/v not pools (3-D), pools that disagree, a table of the wrong dtype or
    shape, an empty pool, a sequence with more keys than the table's capacity, a used table entry outside the pool
    (an IndexError naming it; -1 past a sequence's pages is fine), cu_seqlens_k decreasing."""
    lq, lk = [2, 3], [5, 9]
    q, kp, vp, table, cu_q, cu_k, _, _ = _varlen_paged(lq, lk, 4, seed=66)
    args = (cu_q, cu_k, 3, 9)
    bad_entry = table.clone()
    bad_entry[1, 2] = kp.shape[0]
    cases = [
        (ValueError, "with block_table, k must be a 4-D pool", (q, kp[:, 0], vp), dict(block_table=table)),
        (ValueError, "same shape but for the head dim", (q, kp, vp[:-1]), dict(block_table=table)),
        (TypeError, "block_table must be an int32/int64 tensor", (q, kp, vp), dict(block_table=table.float())),
        (ValueError, r"block_table must have shape \(B, max_pages\) = \(2,", (q, kp, vp), dict(block_table=table[:1])),
        (ValueError, "hold no pages", (q, kp[:0], vp[:0]), dict(block_table=table)),
        (ValueError, "past the block_table's capacity", (q, kp, vp), dict(block_table=table[:, :2])),
        (IndexError, r"block_table\[1, 2\] = ", (q, kp, vp), dict(block_table=bad_entry)),
    ]
    for err, match, tensors, kw in cases:
        with pytest.raises(err, match=match):
            embedattn.attention_varlen(*tensors, *args, backend=backend, **kw)
    with pytest.raises(ValueError, match="cu_seqlens_k must start at 0 and be non-decreasing"):
        embedattn.attention_varlen(q, kp, vp, cu_q, cu_k.flip(0), 3, 9, block_table=table, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_varlen_paged_compiled_bad_entry_asserts(backend):
    """Compiled (fullgraph), the checks are a device assertion: a used table entry outside the pool raises its
    RuntimeError (on the CPU at once) naming block_table."""
    q, kp, vp, table, cu_q, cu_k, _, _ = _varlen_paged([2, 3], [5, 9], 4, seed=67)
    table[0, 1] = -3
    fn = on_road("compiled", lambda q, kp, vp: embedattn.attention_varlen(q, kp, vp, cu_q, cu_k, 3, 9,
                                                                          block_table=table, backend=backend))
    with pytest.raises(RuntimeError, match="block_table"):
        fn(q, kp, vp)
