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
from helpers import BACKENDS, DEVICE, ROADS, assert_fa_close, on_road

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


def _contiguous(pool, table):
    """(B, Hkv, max_pages * page, D): each batch's positions in order, gathered through the table."""
    B, max_pages = table.shape
    g = pool[table.long()]
    return g.permute(0, 2, 1, 3, 4).reshape(B, pool.shape[1], max_pages * pool.shape[2], pool.shape[3])


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
    got_k, got_v = (kc_in, vc_in) if table is None else (_contiguous(kc_in, table), _contiguous(vc_in, table))
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
