"""Triton kernel for rotary position embedding (RoPE), forward and backward alike.

``_rotary_kernel``: one program owns BLOCK_M (token, head) rows of one sequence and BLOCK_K rotation
pairs (grid axis 1), or BLOCK_K columns of the pass-through tail ``[rotary_dim, D)`` when the output
is a new tensor. For pair ``j`` at position ``p``:

    out[k0] = x[k0] * cos[p, j] - x[k1] * sin[p, j]
    out[k1] = x[k0] * sin[p, j] + x[k1] * cos[p, j]

with ``(k0, k1) = (j, j + rotary_dim/2)`` (GPT-NeoX halves) or ``(2j, 2j + 1)`` (GPT-J interleaved
pairs). ``CONJUGATE`` negates sin: the inverse rotation, which is the backward (the rotation is
orthogonal, so its gradient is its transpose). Arithmetic in float32, stores in the output dtype.

x and the output are read and written through their strides in (batch, seq, head, dim) order; the
launcher permutes the strides for (batch, head, seq, dim) tensors and passes batch stride 0 for the
packed varlen form (rows ``cu_seqlens[b]:cu_seqlens[b+1]`` of a (total, head, dim) tensor). Both
halves of a pair are loaded before either is stored, and programs own disjoint elements, so the
output may be x itself (in place).

Positions are ``s + offset`` (or ``s + offsets[b]``). One outside ``[0, S_ro)`` is never read: its
rotation is the identity (cos 1, sin 0).

Bounds, varlen: sequence b covers packed rows ``[cu_seqlens[b], cu_seqlens[b+1])`` clamped into x: its
start into ``[0, total]`` (the first sequence starts at 0), its end into ``[start, total]`` (the last
ends at ``total``), so no program touches a row outside x and every row of x belongs to some sequence.
``max_seqlen`` only sizes the grid: the programs of a sequence step over its rows in a grid-stride loop,
so a sequence longer than ``max_seqlen`` is still covered. With CHECK the kernel also clears the int32
flag at ``ok_ptr`` (no host sync; the caller checks it with ``torch._assert_async``) when cu_seqlens is
not a partition of x's rows (``cu[0] = 0 <= ... <= cu[B] = total``), a length exceeds ``max_seqlen`` or
a position falls outside cos/sin: the "device" mode of ``embedattn.rotary``'s ``check_bounds``.

Launchers check nothing; ``embedattn.rotary`` validates the arguments. No autotuning: the op is
memory-bound and a fixed tile per head dim is what FlashAttention uses; an autotuner would also run
the in-place kernel several times on the same tensor.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ._utils import empty, next_pow2

TILE_ELEMENTS = 2048  # BLOCK_M x BLOCK_K, per program
NUM_WARPS = 4


@triton.jit
def _sequence(cu_ptr, b, S, B, TOTAL, VARLEN: tl.constexpr):
    """(first row, length, raw start, raw end) of sequence b: rows clamped into [0, TOTAL) as the module
    docstring says; the raw cu_seqlens entries for the check (dense: S rows from 0)."""
    if VARLEN:
        raw0 = tl.load(cu_ptr + b).to(tl.int64)
        raw1 = tl.load(cu_ptr + b + 1).to(tl.int64)
        start = tl.where(b == 0, 0, tl.minimum(tl.maximum(raw0, 0), TOTAL))
        end = tl.where(b == B - 1, TOTAL, tl.minimum(tl.maximum(raw1, start), TOTAL))
        return start, end - start, raw0, raw1
    else:
        n = tl.zeros_like(b) + S
        return tl.zeros_like(b), n, tl.zeros_like(b), n


@triton.jit
def _rotary_kernel(
    x_ptr, cos_ptr, sin_ptr, out_ptr, offsets_ptr, cu_ptr, ok_ptr,
    S, B, TOTAL, H, HALF, D, S_RO, offset, n_m, n_pair_tiles,
    sxb, sxs, sxh, sxd, sob, sos, soh, sod, scs, scd, sss, ssd,
    INTERLEAVED: tl.constexpr, CONJUGATE: tl.constexpr, OFFSETS_TENSOR: tl.constexpr, VARLEN: tl.constexpr,
    CHECK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # coordinates: axis 0 is (batch, row block), a row being one (token, head) of the sequence, so a
    # decoding step (S = 1) still fills a tile with its heads; axis 1 the feature tile (rotation pairs
    # first, then the pass-through tail)
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    m = pid % n_m
    b = (pid // n_m).to(tl.int64)
    start, seqlen, raw0, raw1 = _sequence(cu_ptr, b, S, B, TOTAL, VARLEN)
    if OFFSETS_TENSOR:
        off = tl.load(offsets_ptr + b).to(tl.int64)
    else:
        off = tl.zeros_like(b) + offset
    if CHECK:
        bad = (seqlen > 0) & ((off < 0) | (off + seqlen > S_RO))
        if VARLEN:
            bad = bad | ((b == 0) & (raw0 != 0)) | (raw1 < raw0) | ((b == B - 1) & (raw1 != TOTAL))
            bad = bad | (raw1 - raw0 > S)
        # one program per sequence reports it (a masked store: nothing is written while all is well)
        tl.store(ok_ptr, tl.zeros_like(bad).to(tl.int32), mask=bad & (m == 0) & (pid_k == 0))
    # sequence b's (token, head) rows, BLOCK_M a step: one step unless max_seqlen was too small
    x_base = x_ptr + b * sxb + start * sxs
    o_base = out_ptr + b * sob + start * sos
    n_rows = seqlen * H
    for m0 in range(m * BLOCK_M, n_rows, n_m * BLOCK_M):
        r = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
        rs = r // H  # token
        rh = r % H  # head
        mm = r < n_rows
        x_row = x_base + rs * sxs + rh * sxh
        o_row = o_base + rs * sos + rh * soh
        rk = tl.arange(0, BLOCK_K)
        if pid_k < n_pair_tiles:
            j = pid_k * BLOCK_K + rk
            mj = j < HALF
            pos = rs + off
            m2 = mm[:, None] & mj[None, :]
            mc = (mm & (pos >= 0) & (pos < S_RO))[:, None] & mj[None, :]
            c = tl.load(cos_ptr + pos[:, None] * scs + j[None, :] * scd, mask=mc, other=1.0).to(tl.float32)
            s = tl.load(sin_ptr + pos[:, None] * sss + j[None, :] * ssd, mask=mc, other=0.0).to(tl.float32)
            if CONJUGATE:
                s = -s
            if INTERLEAVED:
                k0 = 2 * j
                k1 = k0 + 1
            else:
                k0 = j
                k1 = j + HALF
            x0 = tl.load(x_row[:, None] + k0[None, :] * sxd, mask=m2, other=0.0).to(tl.float32)
            x1 = tl.load(x_row[:, None] + k1[None, :] * sxd, mask=m2, other=0.0).to(tl.float32)
            o0 = x0 * c - x1 * s
            o1 = x0 * s + x1 * c
            tl.store(o_row[:, None] + k0[None, :] * sod, o0.to(out_ptr.dtype.element_ty), mask=m2)
            tl.store(o_row[:, None] + k1[None, :] * sod, o1.to(out_ptr.dtype.element_ty), mask=m2)
        else:
            # pass-through columns [2 * HALF, D): copied (launched only when the output is a new tensor)
            k = 2 * HALF + (pid_k - n_pair_tiles) * BLOCK_K + rk
            m2 = mm[:, None] & (k < D)[None, :]
            v = tl.load(x_row[:, None] + k[None, :] * sxd, mask=m2, other=0.0)
            tl.store(o_row[:, None] + k[None, :] * sod, v.to(out_ptr.dtype.element_ty), mask=m2)


def _tile(width: int, rows: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_K): up to 128 pairs (or tail columns) a tile, ~2K elements a program, no more
    rows than a sequence's (token, head) rows rounded up to a power of two."""
    block_k = min(max(next_pow2(width), 16), 128)
    block_m = max(1, min(TILE_ELEMENTS // block_k, next_pow2(max(rows, 1))))
    return block_m, block_k


def _bshd_strides(t: torch.Tensor, varlen: bool, heads_first: bool) -> tuple[int, int, int, int]:
    """Strides of ``t`` in (batch, seq, head, dim) order; batch stride 0 for the packed varlen form."""
    if varlen:
        st, sh, sd = t.stride()
        b, s, h = 0, st, sh
        if heads_first:  # (H, total, D)
            s, h = sh, st
        return b, s, h, sd
    sb, s1, s2, sd = t.stride()
    return (sb, s2, s1, sd) if heads_first else (sb, s1, s2, sd)


def rotary_forward(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    offsets: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    *,
    offset: int,
    max_seqlen: int,
    interleaved: bool,
    conjugate: bool,
    heads_first: bool,
    out: torch.Tensor | None = None,
    ok: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rotate the first ``2 * cos.shape[1]`` features of ``x`` and return the result.

    x: (B, S, H, D), (B, H, S, D) with ``heads_first``, or packed (total, H, D) / (H, total, D) with
    ``cu_seqlens`` (B + 1,) and ``max_seqlen`` (it sizes the grid; longer sequences are still covered).
    cos/sin: (S_ro, rotary_dim / 2), any strides. ``offsets`` (B,) per-sequence position offsets, or
    None to use the int ``offset``. ``out``: where to write; None allocates a contiguous tensor of x's
    shape and dtype (the tail ``[rotary_dim, D)`` is copied into it). ``out=x`` rotates in place (the
    tail is left alone). ``ok``: an int32 (1,) flag set to 1, cleared when a bound is violated (see the
    module docstring). Varlen x with rows needs ``cu_seqlens`` with at least one sequence.
    """
    varlen = cu_seqlens is not None
    if varlen:
        h, total = (x.shape[0], x.shape[1]) if heads_first else (x.shape[1], x.shape[0])
        batch, seqlen = cu_seqlens.shape[0] - 1, max(max_seqlen, 1)
    else:
        batch, h = x.shape[0], (x.shape[1] if heads_first else x.shape[2])
        seqlen = total = x.shape[2] if heads_first else x.shape[1]
    d, half = x.shape[-1], cos.shape[1]
    inplace = out is x
    if out is None:
        out = empty(*x.shape, dtype=x.dtype, device=x.device)
    if x.numel() == 0 or batch == 0 or seqlen == 0:
        return out
    block_m, block_k = _tile(half if inplace else max(half, d - 2 * half), seqlen * h)
    n_m = triton.cdiv(seqlen * h, block_m)
    n_pair = triton.cdiv(half, block_k)
    n_tail = 0 if inplace else triton.cdiv(d - 2 * half, block_k)
    grid = (batch * n_m, n_pair + n_tail)
    dummy = cos  # stands for an absent pointer argument; never read
    wrap_triton(_rotary_kernel)[grid](
        x, cos, sin, out, dummy if offsets is None else offsets, dummy if cu_seqlens is None else cu_seqlens,
        dummy if ok is None else ok,
        max_seqlen if varlen else seqlen, batch, total, h, half, d, cos.shape[0], offset, n_m, n_pair,
        *_bshd_strides(x, varlen, heads_first), *_bshd_strides(out, varlen, heads_first),
        cos.stride(0), cos.stride(1), sin.stride(0), sin.stride(1),
        INTERLEAVED=interleaved, CONJUGATE=conjugate, OFFSETS_TENSOR=offsets is not None, VARLEN=varlen,
        CHECK=ok is not None, BLOCK_M=block_m, BLOCK_K=block_k, num_warps=NUM_WARPS,
    )
    return out
