"""The CPU's default road for dense calls torch's SDPA computes exactly (``backend=None`` off CUDA): the causal
diagonal anywhere, windows and bool masks written into chunk-sized SDPA masks, each chunk of query rows against only
the keys it can see (float masks, softcap, ALiBi, sinks, dropout, lse, torch.func and forward-mode AD: the
reference). Checked against the float64 reference with FlashAttention's rule, values and gradients, on odd shapes,
with empty rows; the calls it must not take go to the reference."""

from __future__ import annotations

import sys

import pytest
import torch
from helpers import ON_CUDA, assert_fa_close, on_road

import embedattn

A = sys.modules["embedattn.attention"]

pytestmark = pytest.mark.skipif(ON_CUDA, reason="the native road is the default off CUDA")

B, HQ, HKV, NQ, NK, D, DV = 2, 4, 2, 37, 45, 8, 12


@pytest.fixture
def roads(monkeypatch):
    """Counts of torch SDPA calls and reference calls made by the default road."""
    seen = {"sdpa": 0, "reference": 0, "reference_varlen": 0}
    A._sdpa_zeroes_empty_rows("cpu")  # its own SDPA call, before counting

    def count(name, fn):
        def wrapped(*args, **kwargs):
            seen[name] += 1
            return fn(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(A, "_TORCH_SDPA", count("sdpa", A._TORCH_SDPA))
    monkeypatch.setattr(A.reference, "attention", count("reference", A.reference.attention))
    monkeypatch.setattr(A.reference, "attention_varlen", count("reference_varlen", A.reference.attention_varlen))
    return seen


def _mask(kind: str, g: torch.Generator, dtype: torch.dtype):
    if kind == "none":
        return None
    shape = {"keys": (NK,), "rows_keys": (NQ, NK), "padding": (B, 1, 1, NK), "full": (B, HQ, NQ, NK)}
    if kind.startswith("float_"):
        m = torch.randn(*shape[kind[6:]], generator=g).to(dtype)
        return m.masked_fill(torch.rand(m.shape, generator=g) < 0.2, float("-inf"))
    m = torch.rand(*shape[kind], generator=g) > 0.25
    if kind == "padding":
        m[1, ..., : NK // 3] = False  # a left-padded row
    return m


CASES = [
    dict(causal=True, causal_offset=0),
    dict(causal=True),  # bottom-right
    dict(causal=True, causal_offset=5),
    dict(causal=True, causal_offset=-12),  # the first rows see no key
    dict(window=(6, 3)),
    dict(causal=True, window=(9, 0)),
    dict(window=(-1, 2), causal_offset=-3),
    dict(window=(4, -1)),
    dict(causal=True, causal_offset=-NQ - 5),  # no row sees a key
]
MASKS = ["none", "keys", "rows_keys", "padding", "full", "float_padding", "float_full"]


@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_native_road_matches_the_float64_reference(roads, monkeypatch, case, mask, chunked):
    if chunked:
        monkeypatch.setattr(A, "NATIVE_CHUNK", 1)  # chunks of 16 rows: 3 chunks of 37
    g = torch.Generator().manual_seed(case * 31 + len(mask))
    kw = dict(CASES[case])
    dtype = torch.float32
    kw["attn_mask"] = _mask(mask, g, dtype)
    q = torch.randn(B, HQ, NQ, D, generator=g, requires_grad=True)
    k = torch.randn(B, HKV, NK, D, generator=g, requires_grad=True)
    v = torch.randn(B, HKV, NK, DV, generator=g, requires_grad=True)
    do = torch.randn(B, HQ, NQ, DV, generator=g)

    out = embedattn.attention(q, k, v, **kw)
    grads = torch.autograd.grad(out, (q, k, v), do)
    if mask.startswith("float_"):  # torch's CPU SDPA backward is wrong on rows of large finite negative biases
        assert (roads["reference"], roads["sdpa"]) == (1, 0)
    else:
        assert roads["reference"] == 0 and roads["sdpa"] >= 1

    def ref(upcast_to):
        leaves = [t.detach().to(upcast_to).requires_grad_() for t in (q, k, v)]
        m = kw["attn_mask"]
        kw64 = dict(kw, attn_mask=m if m is None or m.dtype == torch.bool else m.to(upcast_to))
        o = A.reference.attention(*leaves, upcast=False, causal_offset=kw64.pop("causal_offset", None), **kw64)
        return o, torch.autograd.grad(o, leaves, do.to(upcast_to))

    (o64, g64), (o32, g32) = ref(torch.float64), ref(dtype)
    assert_fa_close(out, o64, o32)
    for name, a, r, p in zip("qkv", grads, g64, g32):
        assert_fa_close(a, r, p, name=f"d{name}")
    empty = (o64 == 0).all(-1)  # rows that see no key: exact zeros, as the kernels give
    assert (out[empty] == 0).all()


def test_half_and_gqa_with_a_padding_mask(roads):
    g = torch.Generator().manual_seed(3)
    q = torch.randn(B, 8, 50, 16, generator=g).half()
    k, v = (torch.randn(B, 2, 61, 16, generator=g).half() for _ in range(2))
    m = torch.ones(B, 1, 1, 61, dtype=torch.bool)
    m[0, ..., :20] = False
    out = embedattn.attention(q, k, v, causal=True, attn_mask=m, window=(13, 0))
    assert roads["sdpa"] >= 1 and roads["reference"] == 0
    kw = dict(causal=True, attn_mask=m, window=(13, 0))
    o64 = A.reference.attention(q.double(), k.double(), v.double(), **kw)
    assert_fa_close(out, o64, A.reference.attention(q, k, v, upcast=False, **kw))


@pytest.mark.parametrize("kw", [
    dict(softcap=5.0), dict(alibi_slopes=torch.rand(HQ)), dict(sinks=torch.zeros(HQ)), dict(dropout_p=0.1, seed=1),
    dict(attn_mask=torch.zeros(NQ, NK)),  # a float mask
], ids=["softcap", "alibi", "sinks", "dropout", "float_mask"])
def test_calls_sdpa_does_not_compute_take_the_reference(roads, kw):
    q, k, v = (torch.randn(B, h, n, D) for h, n in ((HQ, NQ), (HKV, NK), (HKV, NK)))
    embedattn.attention(q, k, v, causal=True, **kw)
    assert (roads["sdpa"], roads["reference"]) == (0, 1)


def test_float_mask_rows_of_large_finite_biases_keep_their_gradients():
    """A row whose visible keys all carry -1e30 is a uniform softmax over them; torch's CPU SDPA backward loses
    log(n) there (gradients n times too large), so float masks stay on the reference."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, n, 8, generator=g, dtype=torch.float64, requires_grad=True) for n in (4, 6, 6))
    m = torch.zeros(4, 6, dtype=torch.float64)
    m[1] = -1e30
    do = torch.randn(1, 1, 4, 8, generator=g, dtype=torch.float64)
    got, want = (torch.autograd.grad(embedattn.attention(q, k, v, attn_mask=m, backend=be), (q, k, v), do)
                 for be in (None, "reference"))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_gqa_key_gradients_over_many_rows(dtype):
    """Many query rows of 8 heads on one KV head and 2 keys: torch's half GQA backward sums dK/dV in half precision
    (dv 4x the plain-PyTorch error); the native road computes half inputs in float32, as the reference."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 8, 256, 16, generator=g).to(dtype).requires_grad_()
    k, v = (torch.randn(1, 1, 2, 16, generator=g).to(dtype).requires_grad_() for _ in range(2))
    m = torch.arange(2) < 1
    do = torch.randn(1, 8, 256, 16, generator=g).to(dtype)
    out = embedattn.attention(q, k, v, attn_mask=m, causal=True, causal_offset=300)
    assert out.dtype == dtype
    grads = torch.autograd.grad(out, (q, k, v), do)

    def ref(t, upcast):
        leaves = [x.detach().to(t).requires_grad_() for x in (q, k, v)]
        o = A.reference.attention(*leaves, attn_mask=m, upcast=upcast)
        return o, torch.autograd.grad(o, leaves, do.to(t))

    (o64, g64), (oh, gh) = ref(torch.float64, True), ref(dtype, False)
    assert_fa_close(out, o64, oh)
    for name, a, r, p in zip("qkv", grads, g64, gh):
        assert_fa_close(a, r, p, name=f"d{name}")


def test_torch_func_and_forward_ad_take_the_reference(roads):
    """torch's fused CPU SDPA has no forward-mode derivative and checkpointed chunks no saved-tensor hooks under
    torch.func: both are served by the reference (unchunked by checkpoints), with the same answer."""
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(B, h, n, D, generator=g, dtype=torch.float64) for h, n in ((HQ, NQ), (HKV, NK), (HKV, NK)))
    kw = dict(causal=True, window=(5, 0))

    def loss(q):
        return embedattn.attention(q, k, v, **kw).pow(2).sum()

    dq = torch.func.grad(loss)(q)
    qq = q.clone().requires_grad_()
    torch.testing.assert_close(dq, torch.autograd.grad(loss(qq), qq)[0], rtol=0, atol=1e-12)
    tangent = torch.randn_like(q)
    _, jvp = torch.func.jvp(lambda q: embedattn.attention(q, k, v, **kw), (q,), (tangent,))
    eps = 1e-6  # a central difference of a float64 call
    fd = (embedattn.attention(q + eps * tangent, k, v, **kw) - embedattn.attention(q - eps * tangent, k, v, **kw)) / (
        2 * eps)
    torch.testing.assert_close(jvp, fd, rtol=1e-6, atol=1e-6)
    assert roads["reference"] >= 2


def test_chunked_reference_under_torch_func(monkeypatch):
    """Chunks without checkpoints under torch.func.grad: the same gradient as autograd's."""
    monkeypatch.setattr(A.reference._attention, "CHUNK_SCORES", 1)
    monkeypatch.setattr(A.reference._attention, "_MIN_CHUNK_ROWS", 1)
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(B, h, n, D, generator=g, dtype=torch.float64) for h, n in ((HQ, NQ), (HKV, NK), (HKV, NK)))
    s = torch.randn(HQ, generator=g, dtype=torch.float64)

    def loss(q):
        return embedattn.attention(q, k, v, causal=True, sinks=s).pow(2).sum()

    qq = q.clone().requires_grad_()
    torch.testing.assert_close(torch.func.grad(loss)(q), torch.autograd.grad(loss(qq), qq)[0], rtol=0, atol=1e-12)


def test_return_lse_takes_the_reference(roads):
    q, k, v = (torch.randn(B, h, n, D) for h, n in ((HQ, NQ), (HKV, NK), (HKV, NK)))
    embedattn.attention(q, k, v, window=(3, 3), return_lse=True)
    assert (roads["sdpa"], roads["reference"]) == (0, 1)


def test_without_zeroed_empty_rows_masks_take_the_reference(roads, monkeypatch):
    """A torch whose SDPA gives NaN on a fully masked row keeps only the unmasked calls."""
    monkeypatch.setattr(A, "_sdpa_zeroes_empty_rows", lambda device_type: False)
    q, k, v = (torch.randn(B, h, n, D) for h, n in ((HQ, NQ), (HKV, NK), (HKV, NK)))
    embedattn.attention(q, k, v, causal=True, causal_offset=0)
    assert (roads["sdpa"], roads["reference"]) == (1, 0)
    embedattn.attention(q, k, v, causal=True, window=(4, 0))
    assert (roads["sdpa"], roads["reference"]) == (1, 1)


def test_the_probe_answers_in_any_grad_mode():
    """Asked first under no_grad or inference_mode, the probe still runs its backward (torch 2.13 zeroes the rows)."""
    for mode in (torch.inference_mode, torch.no_grad):
        A._EMPTY_ROWS_ZEROED.clear()
        with mode():
            assert A._sdpa_zeroes_empty_rows("cpu") is True


def test_long_calls_hold_chunk_sized_masks(roads, monkeypatch):
    """Each SDPA call of a long masked call gets a mask of at most NATIVE_CHUNK entries (16 rows at the least) and
    only the keys its rows can see."""
    shapes = []
    sdpa = A._TORCH_SDPA

    def spy(q, k, v, attn_mask=None, **kw):
        shapes.append((q.shape[2], k.shape[2], None if attn_mask is None else attn_mask.numel()))
        return sdpa(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(A, "_TORCH_SDPA", spy)
    monkeypatch.setattr(A, "NATIVE_CHUNK", 4 * 64 * 16)  # B x 1 head x 16 rows x 64 keys
    q, k, v = (torch.randn(4, 2, 100, 8) for _ in range(3))
    out = embedattn.attention(q, k, v, causal=True, causal_offset=0, window=(20, 0))
    assert len(shapes) == 7 and all(rows <= 16 and keys <= 16 + 20 for rows, keys, _ in shapes)
    assert max(m for *_, m in shapes) <= 16 * 36
    ref = A.reference.attention(q, k, v, causal=True, causal_offset=0, window=(20, 0))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("road", ["compiled"])
def test_compiled_native_road(road):
    q, k, v = (torch.randn(B, h, n, D) for h, n in ((HQ, NQ), (HKV, NK), (HKV, NK)))
    m = torch.rand(B, 1, 1, NK) > 0.3
    fn = on_road(road, lambda q, k, v: embedattn.attention(q, k, v, causal=True, window=(7, 0), attn_mask=m))
    ref = A.reference.attention(q, k, v, causal=True, window=(7, 0), attn_mask=m)
    torch.testing.assert_close(fn(q, k, v), ref, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------ packed sequences
LENS = {  # (query lengths, key lengths) per sequence: empty queries, empty keys, Nq > Nk (empty causal rows)
    "mixed": ([5, 0, 17, 3, 9, 1], [7, 4, 17, 0, 12, 30]),
    "one": ([23], [23]),
    "more_queries": ([9, 4], [3, 4]),
}
REFERENCE_VARLEN = A.reference.attention_varlen  # not the counted one
VARLEN_CASES = [dict(), dict(causal=True), dict(causal=True, window=(3, 0)), dict(window=(2, 5)), dict(window=(-1, 0))]


def _cu(lens):
    return torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)


@pytest.mark.parametrize("lens", sorted(LENS))
@pytest.mark.parametrize("case", range(len(VARLEN_CASES)))
def test_native_varlen_matches_the_float64_reference(roads, lens, case):
    lq, lk = LENS[lens]
    cu_q, cu_k = _cu(lq), _cu(lk)
    g = torch.Generator().manual_seed(case)
    q = torch.randn(sum(lq), HQ, D, generator=g, requires_grad=True)
    k = torch.randn(sum(lk), HKV, D, generator=g, requires_grad=True)
    v = torch.randn(sum(lk), HKV, DV, generator=g, requires_grad=True)
    do = torch.randn(sum(lq), HQ, DV, generator=g)
    kw = VARLEN_CASES[case]
    out = embedattn.attention_varlen(q, k, v, cu_q, cu_k, max(lq), max(lk), **kw)
    grads = torch.autograd.grad(out, (q, k, v), do)
    assert roads["sdpa"] == sum(1 for a in lq if a) and roads["reference_varlen"] == 0

    def oracle(dtype, upcast):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        o = REFERENCE_VARLEN(*leaves, cu_q, cu_k, max(lq), max(lk), upcast=upcast, **kw)
        return o, torch.autograd.grad(o, leaves, do.to(dtype))

    (o64, g64), (o32, g32) = oracle(torch.float64, True), oracle(torch.float32, False)
    assert_fa_close(out, o64, o32)
    for name, a, r, p in zip("qkv", grads, g64, g32):
        assert_fa_close(a, r, p, name=f"d{name}")


@pytest.mark.parametrize("kw", [dict(softcap=5.0), dict(sinks=torch.zeros(HQ)), dict(return_lse=True),
                                dict(dropout_p=0.2, seed=3)], ids=["softcap", "sinks", "lse", "dropout"])
def test_varlen_calls_sdpa_does_not_compute_take_the_reference(roads, kw):
    lq, lk = LENS["mixed"]
    q, k, v = torch.randn(sum(lq), HQ, D), torch.randn(sum(lk), HKV, D), torch.randn(sum(lk), HKV, D)
    embedattn.attention_varlen(q, k, v, _cu(lq), _cu(lk), max(lq), max(lk), causal=True, **kw)
    assert (roads["sdpa"], roads["reference_varlen"]) == (0, 1)
