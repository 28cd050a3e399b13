"""embedattn.reference._philox: the PyTorch copy of the kernels' dropout draw is the kernels' draw, bit for bit.

Oracles: Random123's Philox4x32-10 known-answer vectors, Triton's own tl.randint / tl.rand, the kernels' debug
mask (kernels/attention.py dropout_keep_mask), and the masks read off the kernels' forward itself (with q = k = 0
every visible probability is equal and v = identity makes the output the dropped probabilities), dense and
varlen, GQA, odd shapes, seeds past 2**32 and counters past 2**32.
"""

from __future__ import annotations

import pytest
import torch
from helpers import DEVICE, HAS_TRITON

import embedattn
from embedattn.reference import _philox

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="needs Triton (the kernels are the oracle)")
SEEDS = [0, 1234, 2**31 + 5, 2**32 + 1, 2**40 + 7, 2**63 - 1]


def _seed(s: int) -> torch.Tensor:
    return torch.tensor([s], dtype=torch.int64, device=DEVICE)


# ------------------------------------------------------------------------------------------ the generator itself
def test_philox4x32_known_answers():
    """Random123's kat_vectors for philox4x32 with 10 rounds: counter (4 words), key (2 words) -> 4 words."""
    m = 0xFFFFFFFF
    cases = [((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
             ((m, m, m, m), (m, m), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
             ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
              (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1))]
    for ctr, key, want in cases:
        words = _philox._philox4x32(*(torch.tensor(x, dtype=torch.int64, device=DEVICE) for x in ctr + key))
        assert [int(w) for w in words] == list(want)


def _offsets() -> torch.Tensor:
    g = torch.Generator().manual_seed(11)
    parts = [torch.arange(0, 300), torch.randint(0, 2**31, (200,), generator=g),
             torch.randint(2**32 - 100, 2**32 + 100, (100,), generator=g), torch.randint(0, 2**62, (300,), generator=g),
             torch.tensor([2**63 - 1, 2**32, 2**32 - 1, 2**31, 2**31 - 1])]
    return torch.cat(parts).to(device=DEVICE, dtype=torch.int64)


if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _draw_kernel(SEED, OFF, RAW, UNI, n, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = i < n
        off = tl.load(OFF + i, mask=ok, other=0)  # int64, as the attention kernels' counters
        seed = tl.load(SEED)
        tl.store(RAW + i, tl.randint(seed, off).to(tl.int64), mask=ok)  # uint32 -> int64 zero-extends
        tl.store(UNI + i, tl.rand(seed, off), mask=ok)


@needs_triton
@pytest.mark.parametrize("seed", SEEDS)
def test_randint_and_rand_equal_triton(seed):
    off = _offsets()
    raw = torch.empty_like(off)
    uni = torch.empty(off.shape, dtype=torch.float32, device=DEVICE)
    _draw_kernel[(triton.cdiv(off.numel(), 128),)](_seed(seed), off, raw, uni, off.numel(), BLOCK=128)
    assert torch.equal(_philox.philox_randint(_seed(seed), off), raw)
    mine = _philox.philox_uniform(_seed(seed), off)
    assert mine.dtype == torch.float32
    assert torch.equal(mine, uni)
    assert torch.equal(_philox.philox_uniform(seed, off), uni)  # an int seed draws the same
    assert 0.0 <= float(mine.min()) and float(mine.max()) < 1.0


def test_seed_words_are_the_uint64_bits():
    # the kernels read the seed as uint64: a negative int64 tensor and its unsigned int draw the same stream
    off = torch.arange(64, device=DEVICE)
    neg = torch.tensor([-5], dtype=torch.int64, device=DEVICE)
    assert torch.equal(_philox.philox_randint(neg, off), _philox.philox_randint(2**64 - 5, off))
    assert not torch.equal(_philox.philox_randint(2**32 + 3, off), _philox.philox_randint(3, off))


# ------------------------------------------------------------------------------------ masks against the kernels
DENSE = [(1, 1, 1, 1, 0.3), (2, 3, 37, 41, 0.17), (1, 2, 5, 70, 0.5), (3, 1, 33, 9, 0.9), (2, 2, 16, 16, 0.0)]


@needs_triton
@pytest.mark.parametrize("shape_p", DENSE, ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("seed", [7, 2**32 + 1, 2**63 - 1])
def test_dense_mask_equals_kernel_debug_mask(shape_p, seed):
    from embedattn.kernels.attention import dropout_keep_mask as kernel_mask

    *shape, p = shape_p
    want = kernel_mask(*shape, p, _seed(seed))
    got = _philox.dropout_keep_mask(tuple(shape), p, _seed(seed))
    assert got.dtype == torch.bool and got.shape == want.shape and got.device == want.device
    assert torch.equal(got, want)
    assert torch.equal(_philox.dropout_keep_mask(tuple(shape), p, seed, device=DEVICE), want)


P = 0.3


def _zeros(*shape):
    return torch.zeros(*shape, device=DEVICE)


@needs_triton
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seed", [99, 2**40 + 7])
def test_dense_mask_equals_the_forward_draw(causal, seed):
    """GQA (4 query heads on 2 kv heads), odd lengths: the mask read off the kernels' forward (through the public
    entry with backend="triton": the launchers' signatures are the kernels' business)."""
    B, H, HKV, Nq, Nk = 2, 4, 2, 19, 23
    v = torch.eye(Nk, device=DEVICE).expand(B, HKV, Nk, Nk).contiguous()  # head dim = Nk
    out = embedattn.attention(_zeros(B, H, Nq, Nk), _zeros(B, HKV, Nk, Nk), v, causal=causal, dropout_p=P,
                              seed=seed, backend="triton")
    keep = _philox.dropout_keep_mask((B, H, Nq, Nk), P, _seed(seed))
    vis = torch.ones(Nq, Nk, dtype=torch.bool, device=DEVICE)
    if causal:
        vis = torch.arange(Nk, device=DEVICE) <= torch.arange(Nq, device=DEVICE)[:, None] + Nk - Nq
    # every visible probability is 1 / (visible keys of the row); a kept one is scaled by 1 / (1 - p)
    want = (keep & vis).float() / vis.sum(-1, keepdim=True) / (1 - P)
    torch.testing.assert_close(out, want, atol=1e-6, rtol=1e-5)
    assert torch.equal(out > 0, keep & vis)


def _varlen_read(lq, lk, H, HKV, max_q, max_k, seed, causal=False):
    """The varlen forward's output with q = k = 0 and v = identity rows per sequence: (Tq, H, D = max(lk))."""
    cu = lambda ls: torch.tensor([0, *torch.tensor(ls).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    D = max(lk)
    eye = torch.cat([torch.eye(D, device=DEVICE)[:n] for n in lk])[:, None, :].expand(sum(lk), HKV, D).contiguous()
    out = embedattn.attention_varlen(_zeros(sum(lq), H, D), _zeros(sum(lk), HKV, D), eye, cu(lq), cu(lk), max_q,
                                     max_k, causal=causal, dropout_p=P, seed=seed, backend="triton")
    return out, cu(lq), cu(lk)


@needs_triton
@pytest.mark.parametrize("case", ["tight", "loose_max", "counters_past_2_32"])
def test_varlen_masks_equal_the_forward_draw(case):
    """Per-sequence masks, and FlashAttention's padded (B, H, max_q, max_k) layout, against the varlen forward.
    The max lengths set the counter strides: larger ones than the lengths (loose) draw another mask, and
    max_seqlen_k = 2**28 pushes counters past 2**32 (the offset's high word)."""
    lq, lk, H, HKV, seed = [5, 9, 4, 1], [16, 11, 3, 7], 4, 2, 2**33 + 17
    max_q, max_k = {"tight": (9, 16), "loose_max": (12, 21), "counters_past_2_32": (9, 2**28)}[case]
    out, cu_q, cu_k = _varlen_read(lq, lk, H, HKV, max_q, max_k, seed)
    for b in range(len(lq)):
        seq = out[int(cu_q[b]):int(cu_q[b + 1]), :, :lk[b]].transpose(0, 1)  # (H, lq, lk)
        keep = _philox.sequence_keep_mask(b, H, lq[b], lk[b], max_q, max_k, P, _seed(seed))
        assert keep.shape == (1, H, lq[b], lk[b])
        torch.testing.assert_close(seq, keep[0].float() / lk[b] / (1 - P), atol=1e-6, rtol=1e-5)
        assert torch.equal(seq > 0, keep[0])
    if case != "counters_past_2_32":  # the padded mask is (B, H, max_q, max_k): not at 2**28 keys
        padded = _philox.varlen_keep_mask(cu_q, cu_k, max_q, max_k, H, P, _seed(seed))
        assert padded.shape == (len(lq), H, max_q, max_k)
        for b in range(len(lq)):
            seq = out[int(cu_q[b]):int(cu_q[b + 1]), :, :lk[b]].transpose(0, 1)
            assert torch.equal(padded[b, :, :lq[b], :lk[b]], seq > 0)
            assert not padded[b, :, lq[b]:].any() and not padded[b, :, :, lk[b]:].any()


@needs_triton
def test_varlen_causal_forward_draw():
    lq, lk, H, seed = [3, 7], [8, 5], 2, 5
    out, cu_q, _ = _varlen_read(lq, lk, H, 1, 7, 8, seed, causal=True)
    for b in range(2):
        keep = _philox.sequence_keep_mask(b, H, lq[b], lk[b], 7, 8, P, seed, device=DEVICE)[0]
        vis = torch.arange(lk[b], device=DEVICE) <= torch.arange(lq[b], device=DEVICE)[:, None] + lk[b] - lq[b]
        seq = out[int(cu_q[b]):int(cu_q[b + 1]), :, :lk[b]].transpose(0, 1)
        assert torch.equal(seq > 0, keep & vis)


# --------------------------------------------------------------------------------------- properties, bad input
def test_sequence_mask_is_the_padded_mask_cut():
    cu_q = torch.tensor([0, 2, 2, 9], dtype=torch.int32, device=DEVICE)  # an empty query sequence
    cu_k = torch.tensor([0, 5, 6, 6], dtype=torch.int32, device=DEVICE)  # an empty key sequence
    padded = _philox.varlen_keep_mask(cu_q, cu_k, 7, 5, 3, 0.4, 2**35)
    for b, (nq, nk) in enumerate([(2, 5), (0, 1), (7, 0)]):
        seq = _philox.sequence_keep_mask(b, 3, nq, nk, 7, 5, 0.4, 2**35, device=DEVICE)
        assert seq.shape == (1, 3, nq, nk)
        assert torch.equal(seq[0], padded[b, :, :nq, :nk])
    # a dense launch is a varlen launch whose lengths all equal the maxima
    full = torch.tensor([0, 7, 14], dtype=torch.int32, device=DEVICE)
    assert torch.equal(_philox.varlen_keep_mask(full, full, 7, 7, 3, 0.4, 9),
                       _philox.dropout_keep_mask((2, 3, 7, 7), 0.4, 9, device=DEVICE))


def test_keep_rate_and_independent_planes():
    keep = _philox.dropout_keep_mask((2, 3, 64, 96), 0.25, 2**50 + 1, device=DEVICE)
    n = keep.numel()
    assert abs(keep.double().mean().item() - 0.75) < 4 * (0.25 * 0.75 / n) ** 0.5
    planes = keep.flatten(0, 1).flatten(1)
    for a in range(planes.shape[0]):
        for b in range(a):
            assert (planes[a] == planes[b]).double().mean().item() < 0.7  # independent: 0.625 expected
    assert _philox.dropout_keep_mask((1, 1, 8, 8), 0.0, 3, device=DEVICE).all()
    assert not _philox.dropout_keep_mask((1, 1, 8, 8), 1.0, 3, device=DEVICE).any()


def test_chunked_draw_equals_one_piece(monkeypatch):
    whole = _philox.dropout_keep_mask((2, 3, 17, 29), 0.3, 77, device=DEVICE)
    monkeypatch.setattr(_philox, "_CHUNK", 100)  # chunks cut rows and planes mid-way
    assert torch.equal(_philox.dropout_keep_mask((2, 3, 17, 29), 0.3, 77, device=DEVICE), whole)
    seq = _philox.sequence_keep_mask(1, 3, 17, 29, 20, 31, 0.3, 77, device=DEVICE)
    monkeypatch.setattr(_philox, "_CHUNK", 1 << 16)
    assert torch.equal(_philox.sequence_keep_mask(1, 3, 17, 29, 20, 31, 0.3, 77, device=DEVICE), seq)


def test_compiled_equals_eager():
    seed = _seed(2**40 + 3)
    cu = torch.tensor([0, 3, 10], dtype=torch.int32, device=DEVICE)

    def masks(s):
        return _philox.dropout_keep_mask((2, 3, 17, 33), 0.3, s), _philox.varlen_keep_mask(cu, cu, 7, 7, 2, 0.3, s)

    compiled = torch.compile(masks, fullgraph=True)(seed)
    for got, want in zip(compiled, masks(seed)):
        assert torch.equal(got, want)


def test_bad_seed_and_lengths():
    off = torch.arange(4)
    with pytest.raises(TypeError, match="seed"):
        _philox.philox_uniform(torch.tensor([1.5]), off)
    with pytest.raises(TypeError, match="seed"):
        _philox.philox_uniform(torch.tensor([1, 2]), off)
    with pytest.raises(TypeError, match="seed"):
        _philox.philox_uniform(2.0, off)
    with pytest.raises(ValueError, match="seed"):
        _philox.philox_uniform(2**64, off)
    with pytest.raises(ValueError, match="max_seqlen"):
        _philox.sequence_keep_mask(0, 2, 5, 3, 4, 3, 0.5, 1)
