"""Paged KV-cache decoding: ``attention_with_kvcache(..., block_table=...)``.

The cache is a pool of pages (num_pages, Hkv, page_size, D) and a (B, max_pages) int32 table maps batch b's position
p to slot p % page_size of page block_table[b, p // page_size]. Decoding from the pages must equal decoding from
the same keys laid out contiguously, for random page permutations and every page size (1, 7, 16, 64: the row gather
and the one-page-per-tile paths of the kernel); the append must write exactly its slots through the pages; every
bad table is refused before anything is written.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from helpers import (
    BACKENDS,
    DEVICE,
    ON_CUDA,
    ROADS,
    HostReads,
    assert_fa_close,
    compile_sm90_in_subprocess,
    needs_triton,
    on_road,
    pages_to_cache,
)

import embedattn
from embedattn import reference
from embedattn.attention import AttnSpec


def _rand(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(DEVICE, dtype)


def _paged(page, lens, n_new, *, B=3, Hkv=2, D=16, spare=3, seed=0, dtype=torch.float32):
    """A pool whose pages are a random permutation of every batch's pages (plus spare pages nobody owns), its table,
    and the same cache laid out contiguously (B, Hkv, max_pages * page, D)."""
    g = torch.Generator().manual_seed(seed)
    max_pages = -(-(max(lens) + n_new) // page) + 1  # one page past the longest: the table has unused entries
    n_pages = B * max_pages + spare
    k_pool, v_pool = _rand(n_pages, Hkv, page, D, dtype=dtype, seed=seed + 1), \
        _rand(n_pages, Hkv, page, D, dtype=dtype, seed=seed + 2)
    table = torch.randperm(n_pages, generator=g)[:B * max_pages].view(B, max_pages).to(DEVICE, torch.int32)
    return k_pool, v_pool, table


PAGES = [1, 7, 16, 64]


@pytest.mark.parametrize("page", PAGES)
@pytest.mark.parametrize("causal,n_new,num_splits", [(True, 3, 1), (False, 1, 0), (True, 1, 3), (False, 0, 2)],
                         ids=lambda x: str(x))
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("road", ROADS)
def test_paged_equalspages_to_cache(road, backend, page, causal, n_new, num_splits):
    """GQA (4 query heads on 2 kv heads), an empty cache, lengths that end inside a page and on a page boundary, new
    tokens appended through the pages, split-KV: the output equals the contiguous cache's (the same keys in the same
    order), both within FlashAttention's tolerance of float64; the pool after the append equals the contiguous cache
    after its own append."""
    lens_l = [0, 37, 64 - n_new]
    k_pool, v_pool, table = _paged(page, lens_l, n_new, seed=page)
    lens = torch.tensor(lens_l, dtype=torch.int32, device=DEVICE)
    kc, vc = pages_to_cache(k_pool, table), pages_to_cache(v_pool, table)
    nq = max(n_new, 1)
    q = _rand(3, 4, nq, 16, seed=5)
    kn, vn = (_rand(3, 2, n_new, 16, seed=6), _rand(3, 2, n_new, 16, seed=7)) if n_new else (None, None)
    kw = dict(causal=causal, num_splits=num_splits, backend=backend)
    out = on_road(road, lambda q, k_pool, v_pool: embedattn.attention_with_kvcache(
        q, k_pool, v_pool, lens, kn, vn, block_table=table, **kw))(q, k_pool, v_pool)
    want = embedattn.attention_with_kvcache(q, kc, vc, lens, kn, vn, **kw)
    torch.testing.assert_close(out, want, atol=2e-6, rtol=2e-6)
    assert torch.equal(pages_to_cache(k_pool, table), kc) and torch.equal(pages_to_cache(v_pool, table), vc)
    total = lens + n_new
    ref = reference.attention_with_kvcache(q.double(), kc.double(), vc.double(), total, causal=causal)
    plain = reference.attention_with_kvcache(q, kc, vc, total, causal=causal, upcast=False)
    assert_fa_close(out, ref, plain)


@pytest.mark.parametrize("dtype", [torch.float16] + ([torch.bfloat16] if ON_CUDA else []), ids=str)
@pytest.mark.parametrize("page", [7, 16])
def test_paged_half_precision_and_features(dtype, page):
    """fp16 (bf16 on CUDA) with window, softcap and ALiBi: paged against the contiguous cache and float64."""
    lens_l = [5, 40, 23]
    k_pool, v_pool, table = _paged(page, lens_l, 2, seed=30 + page, dtype=dtype)
    lens = torch.tensor(lens_l, device=DEVICE)
    kc, vc = pages_to_cache(k_pool, table), pages_to_cache(v_pool, table)
    q, kn, vn = _rand(3, 4, 2, 16, dtype=dtype, seed=8), _rand(3, 2, 2, 16, dtype=dtype, seed=9), \
        _rand(3, 2, 2, 16, dtype=dtype, seed=10)
    slopes = torch.rand(4, device=DEVICE)
    kw = dict(causal=True, window=(9, 0), softcap=4.0, alibi_slopes=slopes)
    be = "triton" if "triton" in BACKENDS else "reference"
    out = embedattn.attention_with_kvcache(q, k_pool, v_pool, lens, kn, vn, block_table=table, backend=be, **kw)
    want = embedattn.attention_with_kvcache(q, kc, vc, lens, kn, vn, backend=be, **kw)
    torch.testing.assert_close(out, want, atol=1e-3, rtol=1e-3)
    ref = reference.attention_with_kvcache(q.double(), kc.double(), vc.double(), lens + 2, **kw)
    plain = reference.attention_with_kvcache(q, kc, vc, lens + 2, upcast=False, **{**kw, "alibi_slopes": slopes})
    assert_fa_close(out, ref, plain)


@pytest.mark.parametrize("backend", BACKENDS)
def test_append_writes_exactly_its_slots(backend):
    """Appending 5 tokens across page boundaries (page 4) writes those 5 slots of each batch's pages and nothing
    else: every other element of both pools keeps its value (spare pages and unused table entries included)."""
    page, lens_l = 4, [0, 6, 11]
    k_pool, v_pool, table = _paged(page, lens_l, 5, seed=40)
    k0, v0 = k_pool.clone(), v_pool.clone()
    q, kn, vn = _rand(3, 2, 1, 16, seed=11), _rand(3, 2, 5, 16, seed=12), _rand(3, 2, 5, 16, seed=13)
    lens = torch.tensor(lens_l, dtype=torch.int32, device=DEVICE)
    embedattn.attention_with_kvcache(q, k_pool, v_pool, lens, kn, vn, block_table=table, backend=backend)
    k_want, v_want = k0.clone(), v0.clone()
    for b, n in enumerate(lens_l):
        for i in range(5):
            p = n + i
            k_want[int(table[b, p // page]), :, p % page] = kn[b, :, i]
            v_want[int(table[b, p // page]), :, p % page] = vn[b, :, i]
    assert torch.equal(k_pool, k_want) and torch.equal(v_pool, v_want)


@needs_triton
def test_paged_split_matches_unsplit_long_cache():
    page, lens_l = 16, [300, 123]
    k_pool, v_pool, table = _paged(page, lens_l, 0, B=2, seed=50)
    q = _rand(2, 4, 1, 16, seed=14)
    lens = torch.tensor(lens_l, dtype=torch.int32, device=DEVICE)
    a = embedattn.attention_with_kvcache(q, k_pool, v_pool, lens, block_table=table, num_splits=1, backend="triton")
    b = embedattn.attention_with_kvcache(q, k_pool, v_pool, lens, block_table=table, num_splits=5, backend="triton")
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_return_lse(backend):
    page, lens_l = 7, [0, 20, 9]
    k_pool, v_pool, table = _paged(page, lens_l, 1, seed=60)
    kc, vc = pages_to_cache(k_pool, table), pages_to_cache(v_pool, table)
    q, kn = _rand(3, 4, 1, 16, seed=15), _rand(3, 2, 1, 16, seed=16)
    lens = torch.tensor(lens_l, dtype=torch.int32, device=DEVICE)
    out, lse = embedattn.attention_with_kvcache(q, k_pool, v_pool, lens, kn, kn.clone(), block_table=table,
                                                return_lse=True, backend=backend)
    kc[torch.arange(3), :, lens.long()] = kn[:, :, 0]
    vc[torch.arange(3), :, lens.long()] = kn[:, :, 0]
    want, want_lse = reference.attention_with_kvcache(q.double(), kc.double(), vc.double(), lens + 1, return_lse=True)
    assert lse.shape == (3, 4, 1) and lse.dtype == torch.float32
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), want_lse, atol=1e-5, rtol=1e-5)


def test_unused_table_entries_are_not_read():
    """Entries past a sequence's pages (padding such as -1) are never read nor checked."""
    page, lens_l = 8, [3, 17]
    k_pool, v_pool, table = _paged(page, lens_l, 1, B=2, seed=70)
    kc, vc = pages_to_cache(k_pool, table), pages_to_cache(v_pool, table)
    table[0, 1:] = -1  # batch 0 uses page 0 only (3 + 1 positions)
    table[1, 3:] = 10**6
    q, kn = _rand(2, 2, 1, 16, seed=17), _rand(2, 2, 1, 16, seed=18)
    lens = torch.tensor(lens_l, dtype=torch.int32, device=DEVICE)
    for be in BACKENDS:
        kp, vp = k_pool.clone(), v_pool.clone()
        out = embedattn.attention_with_kvcache(q, kp, vp, lens, kn, kn.clone(), block_table=table, backend=be)
        want = embedattn.attention_with_kvcache(q, kc.clone(), vc.clone(), lens, kn, kn.clone(), backend=be)
        torch.testing.assert_close(out, want, atol=1e-6, rtol=1e-6)


@needs_triton
def test_kvcache_op_registration():
    """torch.library.opcheck of the registered op with and without a block table, q in FlashAttention's layout (the
    fake allocates the output in q's memory order, as the kernel does), and the paged call compiled without a graph
    break."""
    page, lens_l = 8, [5, 13]
    k_pool, v_pool, table = _paged(page, lens_l, 0, B=2, seed=90)
    q = _rand(2, 1, 4, 16, seed=21).transpose(1, 2)  # (B, Hq, 1, D) view of (B, 1, Hq, D)
    lens = torch.tensor(lens_l, dtype=torch.int32, device=DEVICE)
    spec = AttnSpec(causal=True, scale=0.25).op_args()
    E = torch.ops.embedattn
    torch.library.opcheck(E.kvcache_fwd.default, (q, k_pool, v_pool, lens, table, 2, *spec))
    kc = pages_to_cache(k_pool, table)
    torch.library.opcheck(E.kvcache_fwd.default, (q, kc, pages_to_cache(v_pool, table), lens, None, 1, *spec))

    def step(q, k_pool, v_pool, lens, table):
        return embedattn.attention_with_kvcache(q, k_pool, v_pool, lens, block_table=table, causal=True,
                                                check_bounds="off", backend="triton")

    torch._dynamo.reset()
    got = torch.compile(step, fullgraph=True, backend="aot_eager")(q, k_pool, v_pool, lens, table)
    torch.testing.assert_close(got, step(q, k_pool, v_pool, lens, table), atol=0, rtol=0)


# ------------------------------------------------------------------------------------------------ bad input
def _small(page=4, lens_l=(3, 6)):
    k_pool, v_pool, table = _paged(page, list(lens_l), 2, B=2, seed=80)
    q, kn = _rand(2, 2, 1, 16, seed=19), _rand(2, 2, 2, 16, seed=20)
    return k_pool, v_pool, table, q, kn, torch.tensor(list(lens_l), dtype=torch.int32, device=DEVICE)


@pytest.mark.parametrize("check_bounds", [None, "sync", True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_table_entries_and_capacity_raise_before_writing(backend, check_bounds):
    if check_bounds is None and ON_CUDA:
        pytest.skip("the default on CUDA is the device-side assertion, which would end the CUDA context")
    k_pool, v_pool, table, q, kn, lens = _small()
    k0, v0 = k_pool.clone(), v_pool.clone()
    cap = table.shape[1] * 4
    bad_tables = []
    for value in (-1, k_pool.shape[0]):  # the page that batch 1's append writes: entry 6 // 4 = 1
        t = table.clone()
        t[1, 1] = value
        bad_tables.append(t)
    for t in bad_tables:
        with pytest.raises(IndexError, match="block_table"):
            embedattn.attention_with_kvcache(q, k_pool, v_pool, lens, kn, kn.clone(), block_table=t,
                                             check_bounds=check_bounds, backend=backend)
        assert torch.equal(k_pool, k0) and torch.equal(v_pool, v0)
    for bad_lens in ([cap - 1, 0], [0, -1]):  # cap - 1 + 2 new tokens pass the table's capacity
        with pytest.raises(ValueError, match="cache_seqlens"):
            embedattn.attention_with_kvcache(q, k_pool, v_pool, torch.tensor(bad_lens, device=DEVICE), kn, kn.clone(),
                                             block_table=table, check_bounds=check_bounds, backend=backend)
        assert torch.equal(k_pool, k0) and torch.equal(v_pool, v0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_table_arguments(backend):
    k_pool, v_pool, table, q, kn, lens = _small()
    k0 = k_pool.clone()
    cases = [
        (TypeError, "block_table", dict(block_table=table.float())),
        (TypeError, "block_table", dict(block_table=table.tolist())),
        (ValueError, "block_table", dict(block_table=table[0])),
        (ValueError, "block_table", dict(block_table=table[:1])),
        (ValueError, "k_new", dict(block_table=table, k_new=kn[:, :1], v_new=kn[:, :1, :1])),
    ]
    for err, match, kw in cases:
        kw.setdefault("k_new", kn)
        kw.setdefault("v_new", kn.clone())
        with pytest.raises(err, match=match):
            embedattn.attention_with_kvcache(q, k_pool, v_pool, lens, backend=backend, **kw)
        assert torch.equal(k_pool, k0), kw
    with pytest.raises(ValueError, match="k_cache is expanded"):  # pages that share memory take no append
        embedattn.attention_with_kvcache(q, k_pool[:1].expand_as(k_pool), v_pool, lens, kn, kn.clone(),
                                         block_table=table, backend=backend)
    assert torch.equal(k_pool, k0)


@needs_triton
def test_device_mode_reads_nothing_back(monkeypatch):
    """The default on CUDA ("device" mode, forced here): no host read, one torch._assert_async for the lengths and
    the table together; a bad entry fails it before the append (on the CPU at once)."""
    ea = importlib.import_module("embedattn.attention")
    monkeypatch.setattr(ea, "bounds_mode", lambda check_bounds, device: "device")
    k_pool, v_pool, table, q, kn, lens = _small()
    with HostReads() as mode:
        embedattn.attention_with_kvcache(q, k_pool, v_pool, lens, kn, kn.clone(), block_table=table, backend="triton")
    assert not [op for op in mode.ops if "_local_scalar_dense" in op or "item" in op], mode.ops
    assert sum("_assert_async" in op for op in mode.ops) == 1, mode.ops
    if ON_CUDA:
        return
    k0 = k_pool.clone()
    t = table.clone()
    t[0, 1] = 10**6  # batch 0 appends positions 3, 4: entries 0 and 1
    with pytest.raises(RuntimeError, match="block_table"):
        embedattn.attention_with_kvcache(q, k_pool, v_pool, lens, kn, kn.clone(), block_table=t, backend="triton")
    assert torch.equal(k_pool, k0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unchecked_bad_entries_stay_inside_the_pool(backend):
    """check_bounds="off" (as after a device-side assertion that has not surfaced yet): a batch with a bad used entry
    gets no append, reads stay inside the pool (clamped), the other batch runs as usual."""
    k_pool, v_pool, table, q, kn, lens = _small()
    k0 = k_pool.clone()
    t = table.clone()
    t[0, 0] = -7
    out = embedattn.attention_with_kvcache(q, k_pool, v_pool, lens, kn, kn.clone(), block_table=t, check_bounds="off",
                                           backend=backend)
    assert torch.isfinite(out).all()
    expect = k0.clone()
    for i in range(2):
        p = 6 + i
        expect[int(t[1, p // 4]), :, p % 4] = kn[1, :, i]
    assert torch.equal(k_pool, expect)


def _colliding():
    """Two batches on 4-slot pages, one new token each: batch 0 (length 1) appends at page 0, slot 1; batch 1 (length
    5) holds a used -1 entry for its position 5, which an unchecked append clamps to page 0, slot 1: batch 0's."""
    g = torch.Generator().manual_seed(41)
    k_pool, v_pool = (torch.randn(6, 2, 4, 16, generator=g).to(DEVICE) for _ in range(2))
    table = torch.tensor([[0, 1, 2], [3, -1, 4]], dtype=torch.int32, device=DEVICE)
    lens = torch.tensor([1, 5], dtype=torch.int32, device=DEVICE)
    q, kn, vn = (torch.randn(2, 2, 1, 16, generator=g).to(DEVICE) for _ in range(3))
    return k_pool, v_pool, table, lens, q, kn, vn


def _assert_only_batch0_appended(k_pool, v_pool, k0, v0, kn, vn):
    ek, ev = k0.clone(), v0.clone()
    ek[0, :, 1], ev[0, :, 1] = kn[0, :, 0], vn[0, :, 0]
    assert torch.equal(k_pool, ek) and torch.equal(v_pool, ev)  # batch 1 wrote nothing, batch 0 exactly its key


@pytest.mark.parametrize("mode", ["off", False, "device-deferred", "device", "sync", True, "compiled"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_bad_entry_never_overwrites_another_batchs_append(backend, mode, monkeypatch):
    """Issue 25.1: a batch whose used table entry is bad writes nothing, in every check_bounds mode and on both
    backends; the other batches' appends (and outputs) are exact. Unchecked ("off"), and "device" mode's writes
    before its assertion reports (CUDA reports it later: "device-deferred" records the assertion instead of raising):
    batch 0's new key survives batch 1's clamped entry, which points at the same slot. Checked on the host ("sync",
    and "device" eagerly on the CPU): an IndexError before any write. Compiled (check_bounds=None, "device" while
    tracing): the assertion fails before the append."""
    k_pool, v_pool, table, lens, q, kn, vn = _colliding()
    k0, v0 = k_pool.clone(), v_pool.clone()
    kw = dict(causal=True, backend=backend)
    call = lambda cb: embedattn.attention_with_kvcache(q, k_pool, v_pool, lens, kn, vn, block_table=table,  # noqa: E731
                                                       check_bounds=cb, **kw)
    if mode in ("sync", True, "device"):
        if mode == "device" and ON_CUDA:
            pytest.skip("a device-side assertion ends the CUDA context")
        with pytest.raises(IndexError, match=r"block_table\[1, 1\] = -1"):
            call(mode)
        assert torch.equal(k_pool, k0) and torch.equal(v_pool, v0)
        return
    if mode == "compiled":
        with pytest.raises(RuntimeError, match="block_table"):
            on_road("compiled", lambda q: call(None))(q)
        assert torch.equal(k_pool, k0) and torch.equal(v_pool, v0)
        return
    asked = []
    if mode == "device-deferred":
        ea = importlib.import_module("embedattn.attention")
        monkeypatch.setattr(ea, "bounds_mode", lambda check_bounds, device: "device")
        monkeypatch.setattr(ea, "assert_ok", lambda ok, msg: asked.append(bool(ok)))
    out = call("device" if mode == "device-deferred" else mode)
    assert asked == ([False] if mode == "device-deferred" else [])
    _assert_only_batch0_appended(k_pool, v_pool, k0, v0, kn, vn)
    # batch 0 attends to its old key and its new one, as a contiguous cache says
    kc = torch.cat([k0[0, :, :1], kn[0]], dim=1)[None].double()
    vc = torch.cat([v0[0, :, :1], vn[0]], dim=1)[None].double()
    want = reference.attention(q[:1].double(), kc, vc, causal=True)
    torch.testing.assert_close(out[:1].double(), want, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(out).all()


# ------------------------------------------------------------------------------------------------ CUDA only
@pytest.mark.skipif(not ON_CUDA, reason="large shapes and host syncs exist on CUDA only")
@pytest.mark.parametrize("page", [16, 64, 256, 100])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_paged_large_cuda(dtype, page):
    """Long caches (automatic split-KV), head dim 128, GQA 32/8: paged equals contiguous, within FlashAttention's
    tolerance of float64."""
    lens_l = [4000, 1, 2500, 777]
    k_pool, v_pool, table = _paged(page, lens_l, 1, B=4, Hkv=8, D=128, seed=page, dtype=dtype)
    kc, vc = pages_to_cache(k_pool, table), pages_to_cache(v_pool, table)
    q, kn = _rand(4, 32, 1, 128, dtype=dtype, seed=1), _rand(4, 8, 1, 128, dtype=dtype, seed=2)
    lens = torch.tensor(lens_l, dtype=torch.int32, device=DEVICE)
    out = embedattn.attention_with_kvcache(q, k_pool, v_pool, lens, kn, kn.clone(), block_table=table, causal=True)
    want = embedattn.attention_with_kvcache(q, kc, vc, lens, kn, kn.clone(), causal=True)
    torch.testing.assert_close(out, want, atol=2e-3, rtol=2e-3)
    ref = reference.attention_with_kvcache(q.double(), kc.double(), vc.double(), lens + 1, causal=True)
    plain = reference.attention_with_kvcache(q, kc, vc, lens + 1, causal=True, upcast=False)
    assert_fa_close(out, ref, plain)


@pytest.mark.skipif(not ON_CUDA, reason="host syncs exist on CUDA only")
def test_paged_decoding_step_does_not_sync_cuda():
    """The default paged decoding step (checks on the device), and FlashAttention's entry with rotary and a block
    table, read nothing back to the host."""
    from embedattn.flash_attn_interface import flash_attn_with_kvcache

    k_pool, v_pool, table = _paged(16, [100, 300], 1, B=2, Hkv=4, D=64, seed=3, dtype=torch.float16)
    q, kn = _rand(2, 8, 1, 64, dtype=torch.float16), _rand(2, 4, 1, 64, dtype=torch.float16)
    lens = torch.tensor([100, 300], dtype=torch.int32, device=DEVICE)
    cos = torch.rand(table.shape[1] * 16, 32, device=DEVICE)
    fa = (q.transpose(1, 2), k_pool.transpose(1, 2), v_pool.transpose(1, 2), kn.transpose(1, 2), kn.transpose(1, 2))

    def step():
        embedattn.attention_with_kvcache(q, k_pool, v_pool, lens, kn, kn.clone(), block_table=table, causal=True)
        flash_attn_with_kvcache(*fa, rotary_cos=cos, rotary_sin=cos, cache_seqlens=lens, block_table=table,
                                causal=True)

    step()  # warm-up: compile (and autotune) outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode(0)


# ------------------------------------------------------------------------------------------------ sm_90
_AOT = """
import re
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import embedattn.kernels.attention as K

PTR = {"LSE": "*fp32", "SLOPES": "*fp32", "CU_Q": "*i32", "CU_K": "*i32", "K_LENS": "*i32", "BLOCK_TABLE": "*i32",
       "M": "*u8", "SEED": "*i64", "SINKS": "*fp32"}
FLOAT = {"qk_scale", "sm_scale", "sc_scale", "sc_log2e", "drop_p", "drop_scale"}

def typ(a, consts, split):
    if a in consts:
        return "constexpr"
    if a in PTR:
        return PTR[a]
    if a in ("Q", "K", "V", "O"):
        return "*fp32" if a == "O" and split else "*bf16"
    return "fp32" if a in FLOAT else "i32"

# as the launcher's calls specialize: unit head-dim strides, 16-divisible pointers and row strides
base = dict(stride_qd=1, stride_kd=1, stride_vd=1, stride_od=1, stride_btn=1, HEAD_DIM=128, BLOCK_D=128, NUM_DK=1,
            HEAD_DIM_V=128, BLOCK_DV=128, PREC="tf32", CAUSAL=True, WINDOW=False, MASK_KIND=0, SOFTCAP=False,
            ALIBI=False, DROPOUT=False, SINK=False, VARLEN=False, KLENS=True, BLOCK_M=16, BLOCK_N=64)
out = []
for page, split in ((64, True), (256, False), (16, True), (7, False)):
    consts = dict(base, PAGE=page, SPLIT=split)
    sig = {a: typ(a, consts, split) for a in K._attn_fwd.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(K._attn_fwd.arg_names)
             if sig[a].startswith("*") or a.startswith("stride") and sig[a] == "i32"}
    k = triton.compile(ASTSource(fn=K._attn_fwd, signature=sig, constexprs=consts, attrs=attrs),
                       target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": 3})
    ptx = k.asm["ptx"]
    out += [len(re.findall(r"\\bw?gmma|\\bmma[.]sync", ptx)), len(re.findall(r"cp[.]async[.]cg[.]shared", ptx))]
print(" ".join(map(str, out)))
"""


@pytest.mark.skipif("triton" not in BACKENDS or ON_CUDA, reason="needs Triton; on CUDA the kernels run for real")
def test_paged_kernels_compile_for_sm90():
    """The paged decoding kernel (one page per tile, and the row gather; split and unsplit) lowers and assembles for
    an H100 (ptxas runs here, no GPU needed), with tensor-core instructions, and its key/value rows arrive as
    pipelined 16-byte cp.async copies (the row gather too: each row's head dim stays contiguous)."""
    counts = [int(c) for c in compile_sm90_in_subprocess(_AOT).split()]
    assert len(counts) == 8 and all(c > 0 for c in counts), counts
