"""The reference attention by chunks of query rows (a long call on the CPU holds (rows, Nk) blocks, not Nq x Nk
matrices) is the same function as in one piece: values, lse and every gradient, with every feature."""

from __future__ import annotations

import pytest
import torch

import embedattn
from embedattn.reference import _attention as R
from embedattn.reference import dropout_keep_mask

B, HQ, HKV, NQ, NK, D, DV = 2, 4, 2, 37, 45, 8, 6


@pytest.fixture
def chunked(monkeypatch):
    """Chunks of at most 5 query rows, and the row counts _softmax_v was called with."""
    seen: list[int] = []
    real = R._softmax_v

    def spy(q, *args, **kwargs):
        seen.append(q.shape[-2])
        return real(q, *args, **kwargs)

    monkeypatch.setattr(R, "_softmax_v", spy)

    def run(fn, rows):
        seen.clear()
        monkeypatch.setattr(R, "CHUNK_SCORES", 1 << 60 if rows is None else rows * B * HQ * NK)
        monkeypatch.setattr(R, "_MIN_CHUNK_ROWS", 1)
        return fn(), list(seen)

    return run


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).requires_grad_()  # noqa: E731
    return r(B, HQ, NQ, D), r(B, HKV, NK, D), r(B, HKV, NK, DV), r(HQ), g


CASES = {
    "causal": lambda g: dict(causal=True),
    "everything": lambda g: dict(causal=True, window=(5, 2), softcap=3.0,
                                 alibi_slopes=torch.rand(B, HQ, generator=g, dtype=torch.float64),
                                 attn_mask=torch.rand(B, 1, NQ, NK, generator=g) > 0.2,
                                 causal_offset=torch.tensor([3, -5]).view(B, 1, 1, 1)),
    "row_mask_broadcast": lambda g: dict(attn_mask=torch.rand(B, 1, 1, NK, generator=g) > 0.3, window=(-1, 3)),
    "float_mask_2d": lambda g: dict(attn_mask=torch.randn(NQ, NK, generator=g, dtype=torch.float64)),
    "seeded_dropout": lambda g: dict(causal=True, dropout_p=0.3, seed=7),
    "given_dropout_mask": lambda g: dict(dropout_p=0.25, dropout_mask=torch.rand(B, HQ, NQ, NK, generator=g) > 0.25),
    "empty_rows": lambda g: dict(causal=True, causal_offset=-NQ + 3),
}


@pytest.mark.parametrize("sinks", [False, True])
@pytest.mark.parametrize("case", sorted(CASES))
def test_chunks_equal_one_piece(chunked, case, sinks):
    q, k, v, s, g = _inputs()
    kw = CASES[case](g)
    if sinks:
        kw["sinks"] = s
    params = [q, k, v] + ([s] if sinks else [])
    w = torch.linspace(-1, 1, DV, dtype=torch.float64)
    results = []
    for rows in (None, 5):
        def call():
            out, lse = R.attention(q, k, v, return_lse=True, **kw)
            loss = (out * w).sum() + torch.where(torch.isfinite(lse), lse, 0).sum()
            return out, lse, torch.autograd.grad(loss, params)

        (out, lse, grads), seen = chunked(call, rows)
        # in chunks, each one again in the backward (checkpointed: autograd keeps the inputs, not the chunks)
        assert sorted(seen) == ([NQ] if rows is None else sorted([5] * (NQ // 5) * 2 + [NQ % 5] * 2))
        assert not torch.isnan(out).any()
        results.append((out, lse, grads))
    (o1, l1, g1), (o2, l2, g2) = results
    torch.testing.assert_close(o2, o1, rtol=0, atol=1e-13)
    torch.testing.assert_close(l2, l1, rtol=0, atol=1e-13)  # -inf where -inf
    for a, b in zip(g2, g1):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_chunks_without_grad_and_in_half(chunked):
    """No autograd (no checkpoint), fp16 upcast inside: the chunks still give the one-piece result."""
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(B, h, n, D, generator=g).half() for h, n in ((HQ, NQ), (HKV, NK), (HKV, NK)))
    with torch.no_grad():
        (one, _), (parts, seen) = (chunked(lambda: R.attention(q, k, v, causal=True, window=(7, 0)), r)
                                   for r in (None, 6))
    assert len(seen) == -(-NQ // 6)
    assert parts.dtype == torch.float16
    torch.testing.assert_close(parts, one, rtol=0, atol=1e-3)


def test_public_entry_on_the_reference_takes_the_chunks(chunked):
    """The CPU default road (the reference) of a call with features runs by chunks and keeps its answer."""
    q, k, v, s, _ = _inputs(2)
    kw = dict(causal=True, sinks=s, softcap=5.0, backend="reference")
    (one, _), (parts, seen) = (chunked(lambda: embedattn.attention(q, k, v, **kw), r) for r in (None, 4))
    assert max(seen) == 4
    torch.testing.assert_close(parts, one, rtol=0, atol=1e-13)


def test_unseeded_dropout_stays_one_piece(chunked):
    """torch's own dropout draw (no seed, no mask) is drawn for the whole matrix: no chunks, so a seeded torch
    generator reproduces it."""
    q, k, v, _, _ = _inputs()
    with torch.no_grad():
        _, seen = chunked(lambda: R.attention(q, k, v, dropout_p=0.5), 5)
    assert seen == [NQ]


def test_keep_mask_rows_are_the_full_draw_sliced():
    full = dropout_keep_mask((2, 3, 19, 23), 0.4, 11)
    for i0, i1 in ((0, 19), (0, 1), (5, 12), (18, 19), (7, 7)):
        assert torch.equal(dropout_keep_mask((2, 3, 19, 23), 0.4, 11, rows=(i0, i1)), full[:, :, i0:i1])
    for bad in ((-1, 3), (4, 3), (0, 20)):
        with pytest.raises(ValueError, match="rows"):
            dropout_keep_mask((2, 3, 19, 23), 0.4, 11, rows=bad)
