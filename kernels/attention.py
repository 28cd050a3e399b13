"""Fused attention: online-softmax forward and atomic-free backward (FlashAttention-2 style).

Scores are computed in base 2 (``exp2`` with ``scale * log2(e)`` folded into one multiply); the
forward saves the base-2 log-sum-exp ``lse2`` (-inf for a row with no visible key). The backward
recomputes probabilities from it: a preprocess kernel computes ``delta = rowsum(dO * O)``, one kernel
accumulates dK/dV per key block (looping over the query heads of its GQA group, so no atomics), and
one kernel accumulates dQ per query block. All accumulation is fp32.

Tails are masked: any Nq >= 1, Nk >= 1, head dims 1..512 (padded to a power-of-two tile of at least 16), the
value head dim Dv (HEAD_DIM_V / BLOCK_DV: V, O, dO, dV and the accumulators) apart from the query/key head dim D
(HEAD_DIM / BLOCK_D: Q, K, dQ, dK), as in DeepSeek's MLA. Past 256 the forward computes QK^T as a loop over
64-wide column chunks of Q and K (NUM_DK of them: D 576 in decoding is 9 chunks, not a 1024-wide padded tile),
reading each Q chunk again per key tile instead of holding a (BLOCK_M, D) tile in registers.
Tiles that need no causal/tail mask run an unmasked loop. Each kernel reads, as in Triton's tutorial: its
coordinates (``_program``), the range of tiles it visits (``_key_range``, ``_query_range``), then one inner-loop
helper per part of that range (masked head, unmasked interior, masked tail), all sharing ``_score``.

Softcap evaluates tanh to ~2e-7 relative error at any argument (``_tanh``), so a capped score is as accurate
as an uncapped one whatever the cap.

Learned attention sinks (gpt-oss; SINK): the forward starts each row's online softmax at the sink's logit (m =
sink * log2(e), l = 1) instead of (-inf, 0), so the sink joins the denominator once and contributes no value; a
row that sees no key ends with out = 0 and lse2 = the sink (finite, no NaN). The saved lse2 includes the sink, so
the backward kernels are unchanged; dsinks = -sum_rows exp2(sink2 - lse2) * delta is O(rows) torch work on the
lse and delta the backward holds. Split-KV runs its splits without the sink and adds it once when it merges them.

Causal masking takes an offset: query i sees key j iff ``j <= i + causal_offset``; the API passes
``Nk - Nq`` (bottom-right, FlashAttention's convention) or 0 (top-left, torch SDPA's ``is_causal``).

KV-cache decoding (``kvcache_forward``) reads each batch's length from ``k_lens`` (with KLENS == 2 also its first
key: a left-padded cache, whose loop starts at the block holding it), optionally splits the keys across programs
(flash-decoding), and with a block table reads a paged cache in place (``_kv_rows``; the constexpr PAGE is the page
size). Varlen with a block table (``varlen_forward``) reads its packed queries by cu_seqlens_q and each sequence's
keys through the pages. The dense forward writes its output in q's memory order (``empty_in_order``).
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from .. import configs
from ._utils import LOG2E, bh_grid, bh_id, empty, interpreting

# attn_mask kinds
MASK_NONE, MASK_BOOL, MASK_ADD = 0, 1, 2

# the same constants inside the kernels: a @triton.jit function reads a module global only when it is a tl.constexpr
_LOG2E = tl.constexpr(LOG2E)
_MASK_BOOL = tl.constexpr(MASK_BOOL)
_MASK_ADD = tl.constexpr(MASK_ADD)

# The three attention kernels take one spec's features as one run of parameters right after their tensors (built
# by _spec_args from the spec the launchers receive): M, SLOPES, SEED, SINKS (the mask, ALiBi slopes, dropout seed
# and sink logits; a never-read stand-in when off), their strides, then causal_off, qk_scale, sm_scale, win_left,
# win_right, sc_scale, sc_log2e, drop_p, drop_scale; the matching constexpr flags (CAUSAL, WINDOW, MASK_KIND,
# SOFTCAP, ALIBI, DROPOUT, SINK: the forward's only) come with them. A feature is added to that run, to _spec_args
# and to the helper that reads it.
#
# Inside the kernels a few runtime values travel together as tuples (Triton inlines every helper, so they cost
# nothing; the constexpr flags stay separate arguments: unpacking a tuple turns its constexprs into tensors):
#   score_args  what _score reads: (Nq, Nk, causal_off, qk_scale, sc_scale, sc_log2e, win_left, win_right, slope2,
#               mask_base, stride_mm, stride_mn)
#   drop        what _dropout reads: (seed, first dropout row of the head, drop_p, drop_scale, DROP_MK)
#   kv          one kv head's keys and values: (k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd)
#   q_src       where the forward reads a query block's column chunks (NUM_DK > 1): (q_base, start_m,
#               stride_qm, stride_qd)


# --------------------------------------------------------------------------------------------------
# a program's coordinates, and the rows of a (sequence, head dim) matrix it reads and writes
# --------------------------------------------------------------------------------------------------
@triton.jit
def _batch_head(bh, H):
    # int64: b * stride_b + h * stride_h may pass 2^31 elements
    return (bh // H).to(tl.int64), (bh % H).to(tl.int64)


@triton.jit
def _program(NBH, H, GROUP, CU_Q, CU_K, Nq, Nk, causal_off, VARLEN: tl.constexpr):
    """This program's (b, h, hk, q_start, k_start, Nq, Nk, causal_off): batch, head and kv head (GROUP query heads
    share one; the dK/dV kernel, one program per kv head, passes H = HKV and GROUP = 1), the first query and key
    rows of its sequence and their lengths. Dense: rows from 0, the lengths and offset given. Varlen: sequence b of
    the packed rows, cut by cu_seqlens, causal bottom-right. A program past the last (batch, head) (bh_grid rounds
    the grid up) gets empty sequences: the kernel's length check ends it."""
    bh = bh_id()
    b, h = _batch_head(tl.minimum(bh, NBH - 1), H)
    hk = h // GROUP
    q_start = 0
    k_start = 0
    if VARLEN:
        q_start = tl.load(CU_Q + b).to(tl.int64)
        k_start = tl.load(CU_K + b).to(tl.int64)
        Nq = (tl.load(CU_Q + b + 1) - q_start).to(tl.int32)
        Nk = (tl.load(CU_K + b + 1) - k_start).to(tl.int32)
        causal_off = Nk - Nq
    Nq = tl.where(bh < NBH, Nq, 0)
    Nk = tl.where(bh < NBH, Nk, 0)
    return b, h, hk, q_start, k_start, Nq, Nk, causal_off


@triton.jit
def _head_args(b, h, H, M, SLOPES, SEED, stride_mb, stride_mh, stride_mm, stride_mn, stride_sb, stride_sh,
               Nq, Nk, causal_off, qk_scale, sc_scale, sc_log2e, win_left, win_right, drop_p, drop_scale,
               DROP_MQ, DROP_MK, ALIBI: tl.constexpr, DROPOUT: tl.constexpr):
    """(score_args, drop) of batch b, query head h: its attn_mask plane, its ALiBi slope in base 2, its dropout
    draw, with the program's lengths and scalars (see the tuples above)."""
    slope2 = 0.0
    if ALIBI:
        slope2 = tl.load(SLOPES + b * stride_sb + h * stride_sh).to(tl.float32) * _LOG2E
    seed = 0
    if DROPOUT:  # the seed lives in device memory: the launch holds no per-call host value
        seed = tl.load(SEED)
    score_args = (Nq, Nk, causal_off, qk_scale, sc_scale, sc_log2e, win_left, win_right, slope2,
                  M + b * stride_mb + h * stride_mh, stride_mm, stride_mn)
    return score_args, (seed, (b * H + h) * DROP_MQ, drop_p, drop_scale, DROP_MK)


@triton.jit
def _masked_load(ptrs, r_ok, d_ok, MASKED: tl.constexpr, FULL_D: tl.constexpr):
    """A tile load: rows masked by r_ok only when MASKED, features by d_ok only when the head dim is padded."""
    if MASKED:
        if FULL_D:
            x = tl.load(ptrs, mask=r_ok, other=0.0)
        else:
            x = tl.load(ptrs, mask=r_ok & d_ok, other=0.0)
    else:
        if FULL_D:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=d_ok, other=0.0)
    return x


@triton.jit
def _row_ptrs(base, start, stride_r, stride_d, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, TRANS: tl.constexpr):
    # rows [start, start + BLOCK_R) of a (rows, head dim) matrix, as a (BLOCK_R, BLOCK_D) tile or with TRANS its
    # transpose: the row base in int64 (start * stride may pass 2^31 elements), the tile's own offsets in int32
    offs_r0 = tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    base = base + tl.cast(start, tl.int64) * stride_r
    if TRANS:
        ptrs = base + offs_r0[None, :] * stride_r + offs_d[:, None] * stride_d
    else:
        ptrs = base + offs_r0[:, None] * stride_r + offs_d[None, :] * stride_d
    return ptrs


@triton.jit
def _load_rows(base, start, stride_r, stride_d, n_rows, BLOCK_R: tl.constexpr, HEAD_DIM: tl.constexpr,
               BLOCK_D: tl.constexpr, MASKED: tl.constexpr, TRANS: tl.constexpr):
    """The (BLOCK_R, BLOCK_D) tile of rows [start, start + BLOCK_R) (with TRANS its transpose); columns past
    HEAD_DIM (the padding, or past the last of a column chunk's: HEAD_DIM is then what is left from the chunk's
    first column) read 0, and with MASKED rows past n_rows too (an unmasked tile is known to lie inside)."""
    ptrs = _row_ptrs(base, start, stride_r, stride_d, BLOCK_R, BLOCK_D, TRANS)
    offs_r = start + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    if TRANS:
        r_ok = offs_r[None, :] < n_rows
        d_ok = offs_d[:, None] < HEAD_DIM
    else:
        r_ok = offs_r[:, None] < n_rows
        d_ok = offs_d[None, :] < HEAD_DIM
    return _masked_load(ptrs, r_ok, d_ok, MASKED, BLOCK_D <= HEAD_DIM)


@triton.jit
def _store_rows(base, start, stride_r, stride_d, n_rows, x,
                BLOCK_R: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    ok = ((start + tl.arange(0, BLOCK_R))[:, None] < n_rows) & (tl.arange(0, BLOCK_D)[None, :] < HEAD_DIM)
    tl.store(_row_ptrs(base, start, stride_r, stride_d, BLOCK_R, BLOCK_D, False), x.to(base.dtype.element_ty),
             mask=ok)


@triton.jit
def _gather_rows(base, row_off, stride_d, row_ok, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr, MASKED: tl.constexpr,
                 TRANS: tl.constexpr):
    """A (len(row_off), BLOCK_D) tile (with TRANS its transpose) of rows at arbitrary element offsets row_off (int64)
    from base; padded head dims read 0, and with MASKED the rows where row_ok is False."""
    offs_d = tl.arange(0, BLOCK_D)
    if TRANS:
        ptrs = base + row_off[None, :] + offs_d[:, None] * stride_d
        r_ok = row_ok[None, :]
        d_ok = offs_d[:, None] < HEAD_DIM
    else:
        ptrs = base + row_off[:, None] + offs_d[None, :] * stride_d
        r_ok = row_ok[:, None]
        d_ok = offs_d[None, :] < HEAD_DIM
    return _masked_load(ptrs, r_ok, d_ok, MASKED, BLOCK_D <= HEAD_DIM)


@triton.jit
def _kv_tile(base, stride_n, stride_d, stride_page, start_n, Nk, pages, BLOCK_N: tl.constexpr,
             HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, MASKED: tl.constexpr, TRANS: tl.constexpr,
             PAGE: tl.constexpr):
    """The (BLOCK_N, BLOCK_D) tile (with TRANS its transpose) of rows [start_n, start_n + BLOCK_N) of one key-side
    matrix (K, V, or a column chunk of K: base shifted to its first column) whose pages lie stride_page apart.

    PAGE > 0: a paged cache, ``pages = (table row, stride_btn, n_pages)``: key position p is slot p % PAGE of page
    table[p // PAGE] (clamped into [0, n_pages): an unchecked bad entry reads some page of the pool, never outside
    it), and the base holds no batch offset. Tiles start at multiples of BLOCK_N, so with PAGE a multiple of
    BLOCK_N a tile lies in one page: one page id, then the contiguous loads of an unpaged cache. Any other PAGE
    gathers the tile row by row (one page id per row; each row's head dim stays contiguous)."""
    if PAGE == 0:
        x = _load_rows(base, start_n, stride_n, stride_d, Nk, BLOCK_N, HEAD_DIM, BLOCK_D, MASKED, TRANS)
    elif PAGE % BLOCK_N == 0:
        table, stride_btn, n_pages = pages
        first = (start_n // PAGE) * PAGE  # the page's first position
        page = tl.load(table + (start_n // PAGE) * stride_btn)
        page = tl.minimum(tl.maximum(page, 0), n_pages - 1).to(tl.int64)
        x = _load_rows(base + page * stride_page, start_n - first, stride_n, stride_d, Nk - first, BLOCK_N, HEAD_DIM,
                       BLOCK_D, MASKED, TRANS)
    else:
        table, stride_btn, n_pages = pages
        pos = start_n + tl.arange(0, BLOCK_N)
        row_ok = pos < Nk
        if MASKED:  # positions past Nk read page 0's slot: never loaded (row_ok masks them)
            page = tl.load(table + (pos // PAGE) * stride_btn, mask=row_ok, other=0)
        else:
            page = tl.load(table + (pos // PAGE) * stride_btn)
        page = tl.minimum(tl.maximum(page, 0), n_pages - 1).to(tl.int64)
        slot = (pos % PAGE).to(tl.int64)
        x = _gather_rows(base, page * stride_page + slot * stride_n, stride_d, row_ok, BLOCK_D, HEAD_DIM, MASKED,
                         TRANS)
    return x


@triton.jit
def _kv_rows(kv, start_n, Nk, pages, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
             HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr, MASKED: tl.constexpr, K_T: tl.constexpr,
             PAGE: tl.constexpr, LOAD_K: tl.constexpr):
    """The key tile (with K_T transposed; 0 unless LOAD_K) and the value tile of rows [start_n, start_n + BLOCK_N);
    ``pages`` (PAGE > 0) as in _kv_tile, with the pools' page strides: (table row, stride_btn, stride_kpage,
    stride_vpage, n_pages)."""
    k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd = kv
    kp = 0
    vp = 0
    pg = pages
    if PAGE > 0:
        table, stride_btn, kp, vp, n_pages = pages
        pg = (table, stride_btn, n_pages)
    k = 0
    if LOAD_K:
        k = _kv_tile(k_base, stride_kn, stride_kd, kp, start_n, Nk, pg, BLOCK_N, HEAD_DIM, BLOCK_D, MASKED, K_T, PAGE)
    v = _kv_tile(v_base, stride_vn, stride_vd, vp, start_n, Nk, pg, BLOCK_N, HEAD_DIM_V, BLOCK_DV, MASKED, False, PAGE)
    return k, v


@triton.jit
def _lse_delta(lse_base, delta_base, offs_m, Nq, MASKED: tl.constexpr):
    """The saved lse2 and delta of query rows offs_m (read past Nq with MASKED only)."""
    if MASKED:
        m_ok = offs_m < Nq
        lse = tl.load(lse_base + offs_m, mask=m_ok, other=float("inf"))
        delta = tl.load(delta_base + offs_m, mask=m_ok, other=0.0)
    else:
        lse = tl.load(lse_base + offs_m)
        delta = tl.load(delta_base + offs_m)
    # rows with no visible key have lse = -inf and P = 0: shift by +inf so exp2 gives 0, not NaN
    return tl.where(lse == float("-inf"), float("inf"), lse), delta


# --------------------------------------------------------------------------------------------------
# block ranges: which tiles a program visits, and which of them need no mask
# --------------------------------------------------------------------------------------------------
@triton.jit
def _key_range(start_m, Nk, causal_off, win_left, win_right,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr):
    """Key blocks the query block [start_m, start_m + BLOCK_M) sees (forward and dQ): (lo, mid, hi). Blocks
    outside [lo, hi) are skipped; [lo, mid) need no mask (every key inside Nk and at or left of the diagonal of
    every row); [mid, hi) do (the causal diagonal, the key tail). A window band is masked whole: mid = lo."""
    lo = 0
    hi = Nk
    if CAUSAL:
        hi = tl.minimum(Nk, tl.maximum(start_m + BLOCK_M + causal_off, 0))
    if WINDOW:
        lo = (tl.maximum(start_m + causal_off - win_left, 0) // BLOCK_N) * BLOCK_N
        hi = tl.minimum(Nk, tl.maximum(start_m + BLOCK_M + causal_off + win_right, 0))
        mid = lo
    else:
        mid = (Nk // BLOCK_N) * BLOCK_N
        if CAUSAL:
            mid = tl.minimum(mid, (tl.maximum(start_m + causal_off + 1, 0) // BLOCK_N) * BLOCK_N)
    return lo, mid, hi


@triton.jit
def _query_range(start_n, Nq, causal_off, win_left, win_right,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr):
    """Query blocks that see the key block [start_n, start_n + BLOCK_N) (dK/dV): (lo, head, tail, hi). [lo, head)
    is the masked head (the causal diagonal, or the whole window band), [head, tail) the unmasked interior,
    [tail, hi) the masked query tail; with WINDOW only the head is visited."""
    hi = tl.cdiv(Nq, BLOCK_M) * BLOCK_M
    lo = 0
    head = 0
    if CAUSAL:
        # first query that sees any key of this block, and first query block that sees all of them
        lo = (tl.maximum(start_n - causal_off, 0) // BLOCK_M) * BLOCK_M
        diag = tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - causal_off, 0), BLOCK_M) * BLOCK_M
        head = tl.minimum(tl.maximum(diag, lo), hi)
    if WINDOW:
        # queries i with j - off - right <= i <= j - off + left for some key j of this block
        lo = (tl.maximum(start_n - causal_off - win_right, 0) // BLOCK_M) * BLOCK_M
        head = tl.minimum(tl.maximum(start_n + BLOCK_N - causal_off + win_left, 0), Nq)
    return lo, head, tl.maximum(head, (Nq // BLOCK_M) * BLOCK_M), hi


# --------------------------------------------------------------------------------------------------
# score: everything that turns q·k into a base-2 logit, shared by the forward and both backward kernels
# --------------------------------------------------------------------------------------------------
@triton.jit
def _tanh(x):
    """(tanh x, 1 - tanh^2 x) in fp32: tanh to about 2e-7 relative at any x, 1 - tanh^2 to that plus its own
    conditioning (2|x| times x's rounding). Softcap multiplies tanh by the cap, so the error must be relative:
    1 - 2 / (e^{2x} + 1) is only 1e-7 absolute, i.e. 1e-7 * softcap in the capped score (1e-2 in the output at
    softcap 1e5). |x| < 0.5: an odd minimax polynomial (relative error 1.5e-8 before rounding). Otherwise, from
    e = e^{-2|x|} in (0, 1/e] (exp2, which the interpreter and every Triton have): tanh|x| = (1 - e) / (1 + e) and
    1 - tanh^2 = 4e / (1 + e)^2, which keeps its digits where tanh -> 1."""
    a = tl.abs(x)
    e = tl.math.exp2(a * (-2.0 * _LOG2E))
    r = 1.0 / (1.0 + e)
    u = x * x
    p = x + x * u * (-3.333314390e-01 + u * (1.332587906e-01 + u * (-5.304550171e-02 + u * 1.724150758e-02)))
    small = a < 0.5
    t = tl.where(small, p, tl.where(x < 0, (e - 1.0) * r, (1.0 - e) * r))
    g = tl.where(small, 1.0 - p * p, 4.0 * e * r * r)
    return t, g


@triton.jit
def _moff(qi, kj, stride_mm, stride_mn):
    # int64: one (b, h) plane of a mask may hold more than 2^31 elements (Nq * Nk, e.g. 48K x 48K)
    return qi.to(tl.int64) * stride_mm + kj.to(tl.int64) * stride_mn


@triton.jit
def _score(qk, qi, kj, score_args, MASKED: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
           MASK_KIND: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr):
    """qk: raw q·k tile; qi/kj: query/key indices broadcastable to it. Returns (s2, dcap): the base-2 logit
    and, with SOFTCAP, the derivative of the capped score by the uncapped one, 1 - tanh^2(q·k·scale/softcap), that
    the backward's chain rule needs."""
    Nq, Nk, causal_off, qk_scale, sc_scale, sc_log2e, win_left, win_right, slope2, mask_base, stride_mm, stride_mn = \
        score_args
    if SOFTCAP:
        t, dcap = _tanh(qk * sc_scale)
        s = t * sc_log2e
    else:
        dcap = qk
        s = qk * qk_scale
    if ALIBI:
        d = qi + causal_off - kj
        s = s - slope2 * tl.where(d < 0, -d, d).to(tl.float32)
    if MASK_KIND == _MASK_BOOL:
        mk = tl.load(mask_base + _moff(qi, kj, stride_mm, stride_mn), mask=(qi < Nq) & (kj < Nk), other=0)
        s = tl.where(mk != 0, s, float("-inf"))
    if MASK_KIND == _MASK_ADD:
        mk = tl.load(mask_base + _moff(qi, kj, stride_mm, stride_mn), mask=(qi < Nq) & (kj < Nk), other=0.0)
        s = s + mk.to(tl.float32) * _LOG2E
    if MASKED:
        valid = (qi < Nq) & (kj < Nk)
        if CAUSAL:
            valid = valid & (kj <= qi + causal_off)
        if WINDOW:
            valid = valid & (kj >= qi + causal_off - win_left) & (kj <= qi + causal_off + win_right)
        s = tl.where(valid, s, float("-inf"))
    return s, dcap


@triton.jit
def _softcap_grad(ds, dcap, SOFTCAP: tl.constexpr):
    # the chain rule through softcap: d(softcap * tanh(x / softcap)) / dx = 1 - tanh^2, from _score
    if SOFTCAP:
        ds = ds * dcap
    return ds


@triton.jit
def _keep(qi, kj, seed, drop_base, drop_p, DROP_MK):
    # one Philox draw per (batch, head, query, key): the backward regenerates exactly the same mask
    return tl.rand(seed, (drop_base + qi) * DROP_MK + kj) >= drop_p


@triton.jit
def _dropout(x, qi, kj, drop, DROPOUT: tl.constexpr):
    """x (a tile of P or dP) under dropout, when DROPOUT: kept entries scaled by 1 / (1 - p), the others 0."""
    if DROPOUT:
        seed, drop_base, drop_p, drop_scale, DROP_MK = drop
        x = tl.where(_keep(qi, kj, seed, drop_base, drop_p, DROP_MK), x * drop_scale, 0.0)
    return x


@triton.jit
def _key_tile(q, q_src, offs_m, kv, pages, start_n, score_args, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, NUM_DK: tl.constexpr, HEAD_DIM_V: tl.constexpr,
              BLOCK_DV: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
              MASK_KIND: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, PREC: tl.constexpr,
              K_T: tl.constexpr, PAGE: tl.constexpr):
    """The query block q (rows offs_m) against the key block [start_n, start_n + BLOCK_N), for the forward and dQ:
    (k, v, s, dcap, offs_n) with (s, dcap) from _score. K_T (the forward) loads the key tile transposed, (BLOCK_D,
    BLOCK_N): compiled for sm_90 with BLOCK_M = 16 (mma.sync, split-KV decoding), a (BLOCK_N, BLOCK_D) load and
    tl.trans spilled 4x more. PAGE > 0: the keys come from a paged cache (see _kv_rows).

    NUM_DK > 1 (the forward past D = 256): q is not held; QK^T sums NUM_DK products of BLOCK_D-wide column chunks,
    each Q chunk read again from q_src (an L1/L2 hit after the first key tile) and each K chunk loaded transposed.
    k is then not returned (0)."""
    if not MASKED:  # an unmasked tile starts at a multiple of BLOCK_N
        start_n = tl.multiple_of(start_n, BLOCK_N)
    Nk = score_args[1]
    k, v = _kv_rows(kv, start_n, Nk, pages, BLOCK_N, HEAD_DIM, BLOCK_D, HEAD_DIM_V, BLOCK_DV, MASKED, K_T, PAGE,
                    NUM_DK == 1)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    if NUM_DK > 1:
        q_base, start_m, stride_qm, stride_qd = q_src
        k_base, _v_base, stride_kn, stride_kd, _svn, _svd = kv
        kp = 0
        pg = pages
        if PAGE > 0:
            table, stride_btn, kp, _vp, n_pages = pages
            pg = (table, stride_btn, n_pages)
        qk = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for c in tl.static_range(NUM_DK):
            col = c * BLOCK_D
            qc = _load_rows(q_base + col * stride_qd, start_m, stride_qm, stride_qd, score_args[0], BLOCK_M,
                            HEAD_DIM - col, BLOCK_D, True, False)
            kc = _kv_tile(k_base + col * stride_kd, stride_kn, stride_kd, kp, start_n, Nk, pg, BLOCK_N,
                          HEAD_DIM - col, BLOCK_D, MASKED, True, PAGE)
            qk = tl.dot(qc, kc, qk, input_precision=PREC)
    elif K_T:
        qk = tl.dot(q, k, input_precision=PREC)
    else:
        qk = tl.dot(q, tl.trans(k), input_precision=PREC)
    s, dcap = _score(qk, offs_m[:, None], offs_n[None, :], score_args, MASKED, CAUSAL, WINDOW, MASK_KIND, SOFTCAP,
                     ALIBI)
    return k, v, s, dcap, offs_n


# --------------------------------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------------------------------
@triton.jit
def _fwd_inner(acc, l_i, m_i, q, q_src, offs_m, kv, pages, lo, hi, score_args, drop, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, NUM_DK: tl.constexpr,
               HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
               WINDOW: tl.constexpr, MASK_KIND: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
               DROPOUT: tl.constexpr, PREC: tl.constexpr, PAGE: tl.constexpr):
    """Online softmax of the query block q over the key blocks [lo, hi): returns the updated (acc, l_i, m_i)."""
    for start_n in range(lo, hi, BLOCK_N):
        _k, v, s, _dcap, offs_n = _key_tile(q, q_src, offs_m, kv, pages, start_n, score_args, BLOCK_M, BLOCK_N,
                                            HEAD_DIM, BLOCK_D, NUM_DK, HEAD_DIM_V, BLOCK_DV, MASKED, CAUSAL, WINDOW,
                                            MASK_KIND, SOFTCAP, ALIBI, PREC, True, PAGE)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # a row that has seen no visible key yet keeps m = -inf; shift by 0 so exp2 gives 0, not NaN
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_shift[:, None])
        alpha = tl.math.exp2(m_i - m_shift)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        p = _dropout(p, offs_m[:, None], offs_n[None, :], drop, DROPOUT)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PREC)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd(
    Q, K, V, O, LSE, CU_Q, CU_K, K_LENS, BLOCK_TABLE,
    M, SLOPES, SEED, SINKS, stride_mb, stride_mh, stride_mm, stride_mn, stride_sb, stride_sh, stride_sink,
    causal_off, qk_scale, sm_scale, win_left, win_right, sc_scale, sc_log2e, drop_p, drop_scale,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_lb, stride_lh, stride_os, stride_ls, stride_btb, stride_btn, N_PAGES,
    H, NBH, GROUP, Nq, Nk,
    DROP_MQ, DROP_MK, NUM_SPLITS, NQ_BUCKET, NK_BUCKET,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, NUM_DK: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, MASK_KIND: tl.constexpr, SOFTCAP: tl.constexpr,
    ALIBI: tl.constexpr, DROPOUT: tl.constexpr, SINK: tl.constexpr, VARLEN: tl.constexpr, KLENS: tl.constexpr,
    SPLIT: tl.constexpr, PREC: tl.constexpr, PAGE: tl.constexpr,
):
    if SPLIT:  # axis 0 holds (query block, split of the key range) pairs
        split = tl.program_id(0) % NUM_SPLITS
        start_m = (tl.program_id(0) // NUM_SPLITS) * BLOCK_M
    else:
        split = 0
        start_m = tl.program_id(0) * BLOCK_M
    b, h, hk, q_start, k_start, Nq, Nk, causal_off = _program(NBH, H, GROUP, CU_Q, CU_K, Nq, Nk, causal_off, VARLEN)
    if KLENS:  # a kv cache: batch b attends to its first K_LENS[b] keys, causal bottom-right (KLENS == 2: from key
        # K_LENS[B + b] on, a left-padded cache: K_LENS is (2, B), the ends then the starts)
        Nk = tl.load(K_LENS + b).to(tl.int32)
        causal_off = Nk - Nq
    if start_m >= Nq:
        return
    if PAGE > 0:  # a paged cache (with KLENS): K/V are pools of pages (num_pages, HKV, PAGE, D), batch b's in its row
        kv = (K + hk * stride_kh, V + hk * stride_vh, stride_kn, stride_kd, stride_vn, stride_vd)
        pages = (BLOCK_TABLE + b * stride_btb, stride_btn, stride_kb, stride_vb, N_PAGES)
    else:
        kv = (K + b * stride_kb + hk * stride_kh + k_start * stride_kn,
              V + b * stride_vb + hk * stride_vh + k_start * stride_vn, stride_kn, stride_kd, stride_vn, stride_vd)
        pages = None
    offs_m = start_m + tl.arange(0, BLOCK_M)
    if SINK:  # the sink joins every row's denominator once: the online softmax starts at (m, l) = (sink2, 1)
        m_i = tl.zeros([BLOCK_M], dtype=tl.float32) + tl.load(SINKS + h * stride_sink).to(tl.float32) * _LOG2E
        l_i = tl.full([BLOCK_M], 1.0, dtype=tl.float32)
    else:
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    q_base = Q + b * stride_qb + h * stride_qh + q_start * stride_qm
    q_src = (q_base, start_m, stride_qm, stride_qd)
    q = 0
    if NUM_DK == 1:  # else _key_tile reads q's column chunks
        q = _load_rows(q_base, start_m, stride_qm, stride_qd, Nq, BLOCK_M, HEAD_DIM, BLOCK_D, True, False)
    score_args, drop = _head_args(b, h, H, M, SLOPES, SEED, stride_mb, stride_mh, stride_mm, stride_mn, stride_sb,
                                  stride_sh, Nq, Nk, causal_off, qk_scale, sc_scale, sc_log2e, win_left, win_right,
                                  drop_p, drop_scale, DROP_MQ, DROP_MK, ALIBI, DROPOUT)

    lo, mid, hi = _key_range(start_m, Nk, causal_off, win_left, win_right, BLOCK_M, BLOCK_N, CAUSAL, WINDOW)
    k_lo = 0
    if KLENS == 2:  # a left-padded cache: batch b's keys start at k_lo (in [0, Nk]); from the block holding it
        k_lo = tl.load(K_LENS + NBH // H + b).to(tl.int32)
        lo = tl.maximum(lo, (k_lo // BLOCK_N) * BLOCK_N)
        mid = tl.maximum(mid, lo)
    if SPLIT:  # this program's chunk of the range, masked whole
        chunk = tl.cdiv(tl.cdiv(tl.maximum(hi - lo, 0), NUM_SPLITS), BLOCK_N) * BLOCK_N
        lo = lo + split * chunk
        hi = tl.minimum(hi, lo + chunk)
        mid = lo
    if KLENS == 2:
        # the block holding k_lo (when it starts before k_lo) as one tile from k_lo itself, its keys ending where
        # the block ends (the Nk its masks and loads see): no key left of k_lo is read, no per-key test in the
        # other tiles. Only the program whose range starts at that block runs it; the rest starts one block on
        head = k_lo > lo
        head_args, _ = _head_args(b, h, H, M, SLOPES, SEED, stride_mb, stride_mh, stride_mm, stride_mn, stride_sb,
                                  stride_sh, Nq, tl.minimum(Nk, lo + BLOCK_N), causal_off, qk_scale, sc_scale,
                                  sc_log2e, win_left, win_right, drop_p, drop_scale, DROP_MQ, DROP_MK, ALIBI, DROPOUT)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, q_src, offs_m, kv, pages, k_lo,
                                   tl.where(head, tl.minimum(hi, lo + BLOCK_N), k_lo), head_args, drop, BLOCK_M,
                                   BLOCK_N, HEAD_DIM, BLOCK_D, NUM_DK, HEAD_DIM_V, BLOCK_DV, True, CAUSAL, WINDOW,
                                   MASK_KIND, SOFTCAP, ALIBI, DROPOUT, PREC, PAGE)
        lo = tl.where(head, lo + BLOCK_N, lo)
        mid = tl.maximum(mid, lo)
    if not (SPLIT or WINDOW):  # interior: unmasked (a window band or a split has none: mid = lo)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, q_src, offs_m, kv, pages, lo, mid, score_args, drop, BLOCK_M,
                                   BLOCK_N, HEAD_DIM, BLOCK_D, NUM_DK, HEAD_DIM_V, BLOCK_DV, False, CAUSAL, WINDOW,
                                   MASK_KIND, SOFTCAP, ALIBI, DROPOUT, PREC, PAGE)
    # the causal diagonal and the key tail, a window band, a split's chunk: masked
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, q_src, offs_m, kv, pages, mid, hi, score_args, drop, BLOCK_M,
                               BLOCK_N, HEAD_DIM, BLOCK_D, NUM_DK, HEAD_DIM_V, BLOCK_DV, True, CAUSAL, WINDOW,
                               MASK_KIND, SOFTCAP, ALIBI, DROPOUT, PREC, PAGE)

    # a row with no visible key: l = 0 and lse2 = -inf, or with a sink l = 1, out = 0 and lse2 = the sink's logit
    empty_row = l_i == 0.0
    l_safe = tl.where(empty_row, 1.0, l_i)
    lse2 = tl.where(empty_row, float("-inf"), m_i + tl.math.log2(l_safe))
    _store_rows(O + b * stride_ob + h * stride_oh + q_start * stride_om + split * stride_os, start_m,
                stride_om, stride_od, Nq, acc / l_safe[:, None], BLOCK_M, HEAD_DIM_V, BLOCK_DV)
    tl.store(LSE + b * stride_lb + h * stride_lh + q_start + split * stride_ls + offs_m, lse2, mask=offs_m < Nq)


# --------------------------------------------------------------------------------------------------
# backward
# --------------------------------------------------------------------------------------------------
@triton.jit
def _bwd_preprocess(
    O, DO, DELTA,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_dob, stride_doh, stride_dom, stride_dod,
    H, NBH, Nq,
    HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr,
):
    start_m = tl.program_id(0) * BLOCK_M
    bh = bh_id()
    if bh >= NBH:
        return
    b, h = _batch_head(bh, H)
    # for packed varlen input Nq is the total token count: _load_rows's int64 row base covers numel(o)
    o = _load_rows(O + b * stride_ob + h * stride_oh, start_m, stride_om, stride_od, Nq,
                   BLOCK_M, HEAD_DIM_V, BLOCK_DV, True, False)
    do = _load_rows(DO + b * stride_dob + h * stride_doh, start_m, stride_dom, stride_dod, Nq,
                    BLOCK_M, HEAD_DIM_V, BLOCK_DV, True, False)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    tl.store(DELTA + bh.to(tl.int64) * Nq + offs_m, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1), mask=offs_m < Nq)


@triton.jit
def _dkdv_inner(dk, dv, k, v, offs_n, q_rows, lo, hi, score_args, drop, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr,
                BLOCK_D: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr, MASKED: tl.constexpr,
                CAUSAL: tl.constexpr, WINDOW: tl.constexpr, MASK_KIND: tl.constexpr, SOFTCAP: tl.constexpr,
                ALIBI: tl.constexpr, DROPOUT: tl.constexpr, PREC: tl.constexpr, GRAD_K: tl.constexpr,
                GRAD_V: tl.constexpr):
    """dK (with GRAD_K) and dV (with GRAD_V) of the key block (k, v) (rows offs_n) from the query blocks [lo, hi) of
    one query head, whose q_rows = (q_base, do_base, lse_base, delta_base, stride_qm, stride_qd, stride_dom,
    stride_dod)."""
    q_base, do_base, lse_base, delta_base, stride_qm, stride_qd, stride_dom, stride_dod = q_rows
    Nq = score_args[0]
    for start_m in range(lo, hi, BLOCK_M):
        if not MASKED:  # an unmasked tile starts at a multiple of BLOCK_M
            start_m = tl.multiple_of(start_m, BLOCK_M)
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q = _load_rows(q_base, start_m, stride_qm, stride_qd, Nq, BLOCK_M, HEAD_DIM, BLOCK_D, MASKED, False)
        do = _load_rows(do_base, start_m, stride_dom, stride_dod, Nq, BLOCK_M, HEAD_DIM_V, BLOCK_DV, MASKED, False)
        lse, delta = _lse_delta(lse_base, delta_base, offs_m, Nq, MASKED)
        qkT = tl.dot(k, tl.trans(q), input_precision=PREC)
        sT, dcapT = _score(qkT, offs_m[None, :], offs_n[:, None], score_args, MASKED, CAUSAL, WINDOW, MASK_KIND,
                           SOFTCAP, ALIBI)
        pT = tl.math.exp2(sT - lse[None, :])
        if GRAD_V:
            dv = tl.dot(_dropout(pT, offs_m[None, :], offs_n[:, None], drop, DROPOUT).to(do.dtype), do, dv,
                        input_precision=PREC)
        if GRAD_K:
            dpT = _dropout(tl.dot(v, tl.trans(do), input_precision=PREC), offs_m[None, :], offs_n[:, None], drop,
                           DROPOUT)
            dsT = _softcap_grad(pT * (dpT - delta[None, :]), dcapT, SOFTCAP)
            dk = tl.dot(dsT.to(q.dtype), q, dk, input_precision=PREC)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv(
    Q, K, V, DO, DK, DV, LSE, DELTA, CU_Q, CU_K,
    M, SLOPES, SEED, SINKS, stride_mb, stride_mh, stride_mm, stride_mn, stride_sb, stride_sh, stride_sink,
    causal_off, qk_scale, sm_scale, win_left, win_right, sc_scale, sc_log2e, drop_p, drop_scale,
    stride_qb, stride_qh, stride_qm, stride_qd, stride_dob, stride_doh, stride_dom, stride_dod,
    stride_kb, stride_kh, stride_kn, stride_kd, stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd, stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    stride_lb, stride_lh,
    H, HKV, NBH, GROUP, Nq, Nk,
    DROP_MQ, DROP_MK, NQ_BUCKET, NK_BUCKET,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, MASK_KIND: tl.constexpr, SOFTCAP: tl.constexpr,
    ALIBI: tl.constexpr, DROPOUT: tl.constexpr, VARLEN: tl.constexpr, PREC: tl.constexpr, GRAD_K: tl.constexpr,
    GRAD_V: tl.constexpr,
):
    # one program per (batch, kv head, key block): it loops over the GROUP query heads of the kv head, so no atomics.
    # GRAD_K, GRAD_V: dK and dV together, or (head dims past 256, where both fp32 accumulators and the K and V tiles
    # do not fit the registers) one of them per launch, each recomputing P (the dV launch needs no dP)
    start_n = tl.program_id(0) * BLOCK_N
    b, hk, _, q_start, k_start, Nq, Nk, causal_off = _program(NBH, HKV, 1, CU_Q, CU_K, Nq, Nk, causal_off, VARLEN)
    if start_n >= Nk:
        return
    kv = (K + b * stride_kb + hk * stride_kh + k_start * stride_kn,
          V + b * stride_vb + hk * stride_vh + k_start * stride_vn, stride_kn, stride_kd, stride_vn, stride_vd)
    k, v = _kv_rows(kv, start_n, Nk, None, BLOCK_N, HEAD_DIM, BLOCK_D, HEAD_DIM_V, BLOCK_DV, True, False, 0, True)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)

    lo, head, tail, hi = _query_range(start_n, Nq, causal_off, win_left, win_right, BLOCK_M, BLOCK_N, CAUSAL, WINDOW)
    for g in range(0, GROUP):
        h = hk * GROUP + g
        score_args, drop = _head_args(b, h, H, M, SLOPES, SEED, stride_mb, stride_mh, stride_mm, stride_mn,
                                      stride_sb, stride_sh, Nq, Nk, causal_off, qk_scale, sc_scale, sc_log2e,
                                      win_left, win_right, drop_p, drop_scale, DROP_MQ, DROP_MK, ALIBI, DROPOUT)
        q_rows = (Q + b * stride_qb + h * stride_qh + q_start * stride_qm,
                  DO + b * stride_dob + h * stride_doh + q_start * stride_dom,
                  LSE + b * stride_lb + h * stride_lh + q_start, DELTA + b * stride_lb + h * stride_lh + q_start,
                  stride_qm, stride_qd, stride_dom, stride_dod)
        # the masked head (the causal diagonal, or the whole window band), the unmasked interior, the query tail
        dk, dv = _dkdv_inner(dk, dv, k, v, offs_n, q_rows, lo, head, score_args, drop, BLOCK_M, HEAD_DIM, BLOCK_D,
                             HEAD_DIM_V, BLOCK_DV, True, CAUSAL, WINDOW, MASK_KIND, SOFTCAP, ALIBI, DROPOUT, PREC,
                             GRAD_K, GRAD_V)
        if not WINDOW:
            dk, dv = _dkdv_inner(dk, dv, k, v, offs_n, q_rows, head, tail, score_args, drop, BLOCK_M, HEAD_DIM,
                                 BLOCK_D, HEAD_DIM_V, BLOCK_DV, False, CAUSAL, WINDOW, MASK_KIND, SOFTCAP, ALIBI,
                                 DROPOUT, PREC, GRAD_K, GRAD_V)
            dk, dv = _dkdv_inner(dk, dv, k, v, offs_n, q_rows, tail, hi, score_args, drop, BLOCK_M, HEAD_DIM,
                                 BLOCK_D, HEAD_DIM_V, BLOCK_DV, True, CAUSAL, WINDOW, MASK_KIND, SOFTCAP, ALIBI,
                                 DROPOUT, PREC, GRAD_K, GRAD_V)

    if GRAD_K:
        _store_rows(DK + b * stride_dkb + hk * stride_dkh + k_start * stride_dkn, start_n, stride_dkn, stride_dkd, Nk,
                    dk * sm_scale, BLOCK_N, HEAD_DIM, BLOCK_D)
    if GRAD_V:
        _store_rows(DV + b * stride_dvb + hk * stride_dvh + k_start * stride_dvn, start_n, stride_dvn, stride_dvd, Nk,
                    dv, BLOCK_N, HEAD_DIM_V, BLOCK_DV)


@triton.jit
def _dq_inner(dq, q, do, lse, delta, offs_m, kv, lo, hi, score_args, drop, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM_V: tl.constexpr,
              BLOCK_DV: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
              MASK_KIND: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, DROPOUT: tl.constexpr,
              PREC: tl.constexpr):
    """dQ of the query block q from the key blocks [lo, hi): returns dq."""
    for start_n in range(lo, hi, BLOCK_N):
        k, v, s, dcap, offs_n = _key_tile(q, None, offs_m, kv, None, start_n, score_args, BLOCK_M, BLOCK_N, HEAD_DIM,
                                          BLOCK_D, 1, HEAD_DIM_V, BLOCK_DV, MASKED, CAUSAL, WINDOW, MASK_KIND,
                                          SOFTCAP, ALIBI, PREC, False, 0)
        p = tl.math.exp2(s - lse[:, None])
        dp = _dropout(tl.dot(do, tl.trans(v), input_precision=PREC), offs_m[:, None], offs_n[None, :], drop, DROPOUT)
        ds = _softcap_grad(p * (dp - delta[:, None]), dcap, SOFTCAP)
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PREC)
    return dq


@triton.jit
def _attn_bwd_dq(
    Q, K, V, DO, DQ, LSE, DELTA, CU_Q, CU_K,
    M, SLOPES, SEED, SINKS, stride_mb, stride_mh, stride_mm, stride_mn, stride_sb, stride_sh, stride_sink,
    causal_off, qk_scale, sm_scale, win_left, win_right, sc_scale, sc_log2e, drop_p, drop_scale,
    stride_qb, stride_qh, stride_qm, stride_qd, stride_dob, stride_doh, stride_dom, stride_dod,
    stride_kb, stride_kh, stride_kn, stride_kd, stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd, stride_lb, stride_lh,
    H, NBH, GROUP, Nq, Nk,
    DROP_MQ, DROP_MK, NQ_BUCKET, NK_BUCKET,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, MASK_KIND: tl.constexpr, SOFTCAP: tl.constexpr,
    ALIBI: tl.constexpr, DROPOUT: tl.constexpr, VARLEN: tl.constexpr, PREC: tl.constexpr,
):
    start_m = tl.program_id(0) * BLOCK_M
    b, h, hk, q_start, k_start, Nq, Nk, causal_off = _program(NBH, H, GROUP, CU_Q, CU_K, Nq, Nk, causal_off, VARLEN)
    if start_m >= Nq:
        return
    offs_m = start_m + tl.arange(0, BLOCK_M)
    q = _load_rows(Q + b * stride_qb + h * stride_qh + q_start * stride_qm, start_m, stride_qm, stride_qd, Nq,
                   BLOCK_M, HEAD_DIM, BLOCK_D, True, False)
    do = _load_rows(DO + b * stride_dob + h * stride_doh + q_start * stride_dom, start_m, stride_dom, stride_dod, Nq,
                    BLOCK_M, HEAD_DIM_V, BLOCK_DV, True, False)
    lse, delta = _lse_delta(LSE + b * stride_lb + h * stride_lh + q_start,
                            DELTA + b * stride_lb + h * stride_lh + q_start, offs_m, Nq, True)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    kv = (K + b * stride_kb + hk * stride_kh + k_start * stride_kn,
          V + b * stride_vb + hk * stride_vh + k_start * stride_vn, stride_kn, stride_kd, stride_vn, stride_vd)
    score_args, drop = _head_args(b, h, H, M, SLOPES, SEED, stride_mb, stride_mh, stride_mm, stride_mn, stride_sb,
                                  stride_sh, Nq, Nk, causal_off, qk_scale, sc_scale, sc_log2e, win_left, win_right,
                                  drop_p, drop_scale, DROP_MQ, DROP_MK, ALIBI, DROPOUT)

    lo, mid, hi = _key_range(start_m, Nk, causal_off, win_left, win_right, BLOCK_M, BLOCK_N, CAUSAL, WINDOW)
    if not WINDOW:  # interior: unmasked (a window band has none: mid = lo)
        dq = _dq_inner(dq, q, do, lse, delta, offs_m, kv, lo, mid, score_args, drop, BLOCK_M, BLOCK_N, HEAD_DIM,
                       BLOCK_D, HEAD_DIM_V, BLOCK_DV, False, CAUSAL, WINDOW, MASK_KIND, SOFTCAP, ALIBI, DROPOUT, PREC)
    # the causal diagonal and the key tail, or a window band: masked
    dq = _dq_inner(dq, q, do, lse, delta, offs_m, kv, mid, hi, score_args, drop, BLOCK_M, BLOCK_N, HEAD_DIM, BLOCK_D,
                   HEAD_DIM_V, BLOCK_DV, True, CAUSAL, WINDOW, MASK_KIND, SOFTCAP, ALIBI, DROPOUT, PREC)
    _store_rows(DQ + b * stride_dqb + h * stride_dqh + q_start * stride_dqm, start_m, stride_dqm, stride_dqd, Nq,
                dq * sm_scale, BLOCK_M, HEAD_DIM, BLOCK_D)


@triton.jit
def _dropout_keep_kernel(OUT, SEED, drop_p, H, NBH, Nq, Nk, DROP_MQ, DROP_MK, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr):
    """Debug path: the keep mask (B, H, Nq, Nk) that the attention kernels draw for a seed."""
    bh = bh_id()
    if bh >= NBH:
        return
    b, h = _batch_head(bh, H)
    # (query block, key block) on axis 0: axes 1 and 2 are capped at 65535 programs
    n_blocks = tl.cdiv(Nk, BLOCK_N)
    offs_m = (tl.program_id(0) // n_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = (tl.program_id(0) % n_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    keep = _keep(offs_m[:, None], offs_n[None, :], tl.load(SEED), (b * H + h) * DROP_MQ, drop_p, DROP_MK)
    ok = (offs_m[:, None] < Nq) & (offs_n[None, :] < Nk)
    tl.store(OUT + bh.to(tl.int64) * Nq * Nk + offs_m.to(tl.int64)[:, None] * Nk + offs_n[None, :], keep.to(tl.int8),
             mask=ok)


# --------------------------------------------------------------------------------------------------
# configs: one fixed config under the interpreter, heuristics or autotune on a GPU
# --------------------------------------------------------------------------------------------------

def _config_list(shapes) -> list:
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in shapes]


# the candidate configs (the autotuner's space and benchmarks.tune's), (BLOCK_M, BLOCK_N, num_warps, num_stages);
# the backward's dQ kernel runs each with BLOCK_M and BLOCK_N swapped (its inner tile is the key block)
FWD_CONFIGS = _config_list([(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3),
                            (128, 64, 4, 4), (128, 128, 4, 3), (64, 128, 4, 3), (128, 64, 8, 4), (64, 32, 4, 2)])
BWD_CONFIGS = _config_list([(32, 64, 4, 2), (64, 64, 4, 2), (64, 64, 8, 2), (32, 128, 4, 2), (64, 128, 8, 2),
                            (128, 64, 8, 2), (32, 64, 4, 3), (64, 64, 4, 3), (32, 32, 4, 1), (16, 32, 4, 1)])


def _smem_ok(conf, block_d: int, elt: int, n_tiles: int) -> bool:
    bm, bn = conf.kwargs["BLOCK_M"], conf.kwargs["BLOCK_N"]
    # tiles that live in shared memory across the pipeline: a rough bound under H100's 227 KB
    need = (bm * block_d + n_tiles * bn * block_d * max(conf.num_stages, 1)) * elt
    return need <= 200 * 1024


def prune_fwd(configs, named_args, **kwargs) -> list:
    """Triton's ``early_config_prune`` for the forward: the FWD_CONFIGS that fit shared memory and, at head blocks of
    256, registers (``named_args``: the launch's arguments, Q among them; ``kwargs``: its constexprs, BLOCK_D)."""
    block_d = _width({n: kwargs.get(n, named_args.get(n, d)) for n, d in (("BLOCK_D", 128), ("BLOCK_DV", 0),
                                                                           ("NUM_DK", 1))})
    elt = named_args["Q"].element_size()
    keep = [c for c in configs if _smem_ok(c, block_d, elt, 2)
            and not (block_d >= 256 and c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] > 64 * 64)]
    return keep or configs[-1:]


def prune_bwd(configs, named_args, **kwargs) -> list:
    """``prune_fwd`` for the backward's dK/dV and dQ kernels (BWD_CONFIGS; four tiles in shared memory)."""
    block_d = _width({n: kwargs.get(n, named_args.get(n, d)) for n, d in (("BLOCK_D", 128), ("BLOCK_DV", 0))})
    elt = named_args["Q"].element_size()
    keep = [c for c in configs if _smem_ok(c, block_d, elt, 4)
            and not (block_d >= 256 and c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] > 32 * 32)
            and not (block_d >= 128 and c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] > 64 * 128)]
    return keep or configs[-1:]


# the constexpr flags that change a launch's code path, as they enter the tuned-config key (MASK_KIND apart)
_KEY_FLAGS = ("CAUSAL", "WINDOW", "SOFTCAP", "ALIBI", "DROPOUT", "VARLEN", "KLENS", "SINK")


@functools.lru_cache(maxsize=4096)
def _tuning_key(dtype, head_dim: int, nq: int, nk: int, on: tuple, mask_kind: int, head_dim_v: int):
    flags = {n.lower(): bool(v) for n, v in zip(_KEY_FLAGS, on)}
    flags.update(mask_bool=mask_kind == MASK_BOOL, mask_add=mask_kind == MASK_ADD)
    fields = {"dtype": dtype, "head_dim": head_dim, "nq": configs.bucket(nq), "nk": configs.bucket(nk),
              "flags": flags}
    if head_dim_v != head_dim:  # keys of calls with one head dim keep their form
        fields["head_dim_v"] = head_dim_v
    return configs.normalize_key(fields)


def tuning_key(dtype, head_dim: int, nq: int, nk: int, flags, head_dim_v: int | None = None) -> dict:
    """The tuned-config key of an attention launch: dtype, head dim (and the value head dim where it differs),
    Nq/Nk buckets and the launch's constexpr ``flags`` (a mapping) that change its code path. Memoized: the
    launchers call it at every launch."""
    g = flags.get
    return _tuning_key(dtype, int(head_dim), configs.bucket(nq), configs.bucket(nk),
                       tuple(bool(g(n, False)) for n in _KEY_FLAGS), int(g("MASK_KIND", 0) or 0),
                       int(head_dim if head_dim_v is None else head_dim_v))


# the old private names, until benchmarks/tune.py reads the public ones
_prune_fwd, _prune_bwd = prune_fwd, prune_bwd
_fwd_configs, _bwd_configs = FWD_CONFIGS.copy, BWD_CONFIGS.copy

_KEY = ["NQ_BUCKET", "NK_BUCKET", "HEAD_DIM", "HEAD_DIM_V", "CAUSAL", "WINDOW", "MASK_KIND", "SOFTCAP", "ALIBI",
        "DROPOUT", "VARLEN", "PREC"]
_attn_fwd_tuned = triton.autotune(configs=FWD_CONFIGS, key=_KEY + ["SINK", "KLENS", "SPLIT", "PAGE"],
                                  prune_configs_by={"early_config_prune": prune_fwd})(_attn_fwd)
_attn_bwd_dkdv_tuned = triton.autotune(configs=BWD_CONFIGS, key=_KEY + ["GRAD_K", "GRAD_V"],
                                       prune_configs_by={"early_config_prune": prune_bwd})(_attn_bwd_dkdv)
_attn_bwd_dq_tuned = triton.autotune(configs=BWD_CONFIGS, key=_KEY,
                                     prune_configs_by={"early_config_prune": prune_bwd})(_attn_bwd_dq)

_LAST_CONFIG = configs.records("attention")  # what each kernel last ran with (cleared by the benchmark harness)


def last_config() -> dict[str, str]:
    """The config each attention kernel last ran with, and how it was chosen (tuned/autotuned/heuristic)."""
    return configs.recorded("attention")


# the config without autotuning, (BLOCK_M, BLOCK_N, num_warps, num_stages): under the interpreter, then by the wider
# head block of Q/K and V (<= 64, <= 128, <= 256, 512). At 512 the spill-free sm_90 tiles of the compile report
# (tests/attention/test_mla_sinks.py): the forward 64 x 16 on 8 warps (wgmma), the backward 16 x 16 on 8 warps
# (mma.sync; dK and dV in two launches)
_FIXED = {"fwd": ((32, 16, 4, 1), (128, 64, 4, 3), (128, 64, 8, 3), (64, 32, 4, 2), (64, 16, 8, 2)),
          "bwd": ((16, 32, 4, 1), (64, 64, 4, 2), (32, 64, 4, 2), (32, 32, 4, 1), (16, 16, 8, 1))}


def _fixed(kind: str, block_d: int) -> dict:
    row = 0 if interpreting() else 1 + (block_d > 64) + (block_d > 128) + (block_d > 256)
    return dict(zip(("BLOCK_M", "BLOCK_N", "num_warps", "num_stages"), _FIXED[kind][row]))


def _fixed_fwd(block_d: int) -> dict:
    return _fixed("fwd", block_d)


def decode_config(conf: dict, width: int, nq: int) -> dict:
    """The forward's config ``conf`` for decoding (split-KV or a paged cache: few query rows): BLOCK_M 16 on 4 warps
    (64 past 16 queries); at widths past 256 (MLA's 576/512) 16 x 32 on 8 warps (64 x 16 past 16 queries), the
    spill-free sm_90 tiles of the compile report."""
    conf = dict(conf, BLOCK_M=16 if nq <= 16 else 64, num_warps=4)
    if width > 256:
        conf.update(BLOCK_N=32 if nq <= 16 else 16, num_warps=8)
    return conf


def _fixed_bwd(block_d: int) -> dict:
    return _fixed("bwd", block_d)


def _head_block(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def _prec(dtype: torch.dtype) -> str:
    # fp32 inputs must not silently drop to tf32: keep plain fp32 accuracy
    return "ieee" if dtype == torch.float32 else "tf32"


# past a head dim of 256 the forward's QK^T runs over column chunks of this width (NUM_DK of them)
DK_CHUNK = 64


def _head_flags(d: int, dv: int, dtype: torch.dtype, *, forward: bool = False) -> dict:
    """The head-dim constexprs of a launch: Q/K's (HEAD_DIM, BLOCK_D) and V's (HEAD_DIM_V, BLOCK_DV); the forward's
    NUM_DK column chunks (BLOCK_D is then the chunk's width)."""
    flags = dict(HEAD_DIM=d, BLOCK_D=_head_block(d), HEAD_DIM_V=dv, BLOCK_DV=_head_block(dv), PREC=_prec(dtype))
    if forward:
        chunks = 1 if d <= 256 else triton.cdiv(d, DK_CHUNK)
        flags.update(NUM_DK=chunks, BLOCK_D=flags["BLOCK_D"] if chunks == 1 else DK_CHUNK)
    return flags


def _width(flags: dict) -> int:
    """The widest head tile a launch holds (Q/K's whole width or V's): what its config row is chosen by."""
    return max(flags["BLOCK_D"] * flags.get("NUM_DK", 1), flags["BLOCK_DV"])


def _spec_args(spec, B: int, H: int, Nq: int, Nk: int, dummy: torch.Tensor) -> tuple[tuple, dict]:
    """A spec (``embedattn.attention.AttnSpec``) as the kernels take it: the runtime arguments in the order of the
    kernels' feature parameters (``M`` .. ``drop_scale``), and the constexpr flags. ``dummy`` stands in for the
    pointers of features that are off (never read)."""
    window = spec.window is not None
    causal, right = spec.causal, spec.window_right
    if window and causal:
        right, causal = min(right, 0), False  # causal is a window with no right side
    if spec.mask is None:
        m, ms, kind = dummy, (0, 0, 0, 0), MASK_NONE
    else:
        m = spec.mask.expand(B, H, Nq, Nk)
        ms, kind = m.stride(), MASK_BOOL if m.dtype == torch.bool else MASK_ADD
        m = m.view(torch.uint8) if kind == MASK_BOOL else m
    a = spec.alibi
    slopes, ss = (dummy, (0, 0)) if a is None else (a, (0, a.stride(0)) if a.dim() == 1 else a.stride())
    sinks = spec.sinks
    sinks, s_sink = (dummy, 0) if sinks is None else (sinks, sinks.stride(0))
    sc, p = spec.softcap, spec.dropout_p
    args = (m, slopes, spec.seed if p > 0 else dummy, sinks, *ms, *ss, s_sink, spec.causal_offset,
            spec.scale * LOG2E, spec.scale, spec.window_left, right, spec.scale / sc if sc else 0.0, sc * LOG2E, p,
            1.0 / (1.0 - p))
    flags = dict(CAUSAL=causal, WINDOW=window, MASK_KIND=kind, SOFTCAP=sc > 0, ALIBI=a is not None, DROPOUT=p > 0,
                 SINK=spec.sinks is not None)
    return args, flags


def _dense(t):
    return tuple(t.stride())


def empty_in_order(like: torch.Tensor, head_dim: int | None = None) -> torch.Tensor:
    """An uninitialized tensor of ``like``'s shape (its last dim ``head_dim`` when given: the value head dim of an
    output) and dtype laid out in its memory order: the dims of size > 1 and nonzero stride sorted by stride
    (outermost first; ties by position) among their own places, the others (size 1, or broadcast) kept in place,
    the last dim (head dim) innermost. The dense forward writes its output so: for q = x.transpose(1, 2) with x a
    (B, N, H, D) tensor (FlashAttention's layout, or a slice of one projection), out.transpose(1, 2) is
    contiguous, with no copy. The fakes allocate the same way."""
    n = like.dim()
    shape = list(like.shape[:-1]) + [like.shape[-1] if head_dim is None else head_dim]
    real = [i for i in range(n - 1) if like.shape[i] > 1 and like.stride(i) != 0]
    ranked = iter(sorted(real, key=lambda i: (-like.stride(i), i)))
    order = [next(ranked) if i in real else i for i in range(n - 1)] + [n - 1]
    t = empty(*(shape[i] for i in order), dtype=like.dtype, device=like.device)
    return t.permute([order.index(i) for i in range(n)])


def _packed(t):
    # (total, H, D) seen as (B, H, N, D) with a zero batch stride: sequences start at cu_seqlens[b]
    return (0, t.stride(1), t.stride(0), t.stride(2))


# --------------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------------
def _forward(q, k, v, spec, *, varlen=None, k_lens=None, k_starts=None, num_splits=1, block_table=None):
    """Shared forward launcher. Dense: q (B,H,Nq,D), v (B,HKV,Nk,Dv) -> out (B,H,Nq,Dv) in q's memory order, lse2
    (B,H,Nq). Varlen: q (Tq,H,D) packed, varlen=(cu_q, cu_k, max_q, max_k) -> out (Tq,H,Dv), lse2 (H,Tq). Split-KV
    (num_splits > 1) returns the per-split partials (B,H,S,Nq,Dv) fp32 and (B,H,S,Nq), computed without the sink,
    for the caller to combine. ``block_table`` (with k_lens, or varlen): k/v are pools of pages (num_pages, HKV,
    page_size, D or Dv) read through the (B, max_pages) int32 table; varlen sequence b's keys are then its first
    cu_k[b+1] - cu_k[b] positions. ``k_starts`` (with k_lens) (B,) int32 in [0, k_lens[b]]: batch b's first key."""
    Dv = v.shape[-1]
    paged = block_table is not None
    if varlen is None:
        B, H, Nq, D = q.shape
        HKV, Nk = k.shape[1], k.shape[2]
        if paged:
            Nk *= block_table.shape[1]  # the capacity; each batch's length is read from k_lens
        sq, sk, sv = _dense(q), _dense(k), _dense(v)
        drop_mq, drop_mk = Nq, Nk
    else:
        cu_q, cu_k, max_q, max_k = varlen
        B, (Tq, H, D), HKV = cu_q.numel() - 1, q.shape, k.shape[1]
        Nq, Nk = max_q, max_k
        sq = _packed(q)
        sk, sv = (_dense(k), _dense(v)) if paged else (_packed(k), _packed(v))
        drop_mq, drop_mk = max_q, max_k
    split = num_splits > 1
    dev = q.device
    if split:
        o = empty(B, H, num_splits, Nq, Dv, dtype=torch.float32, device=dev)
        lse = empty(B, H, num_splits, Nq, dtype=torch.float32, device=dev)
        so = (o.stride(0), o.stride(1), o.stride(3), o.stride(4))
        sl = (lse.stride(0), lse.stride(1))
        s_os, s_ls = o.stride(2), lse.stride(2)
    elif varlen is None:
        o = empty_in_order(q, Dv)
        lse = empty(B, H, Nq, dtype=torch.float32, device=dev)
        so, sl, s_os, s_ls = _dense(o), (H * Nq, Nq), 0, 0
    else:
        o = empty(Tq, H, Dv, dtype=q.dtype, device=dev)
        lse = empty(H, Tq, dtype=torch.float32, device=dev)
        so, sl, s_os, s_ls = _packed(o), (0, Tq), 0, 0
    feats, flags = _spec_args(spec, B, H, Nq, Nk, q)
    cu_q_t, cu_k_t = (varlen[0], varlen[1]) if varlen is not None else (q, q)
    table, st_table = (block_table, (*block_table.stride(), k.shape[0])) if paged else (q, (0, 0, 0))
    klens = 0 if k_lens is None else 1 if k_starts is None else 2
    if klens == 2:  # the kernel reads each batch's key range [start, end) from one (2, B) table
        k_lens = torch.stack([k_lens, k_starts])
    args = (q, k, v, o, lse, cu_q_t, cu_k_t, k_lens if k_lens is not None else q, table, *feats,
            *sq, *sk, *sv, *so, *sl, s_os, s_ls, *st_table, H, B * H, H // HKV, Nq, Nk,
            drop_mq, drop_mk, num_splits, configs.bucket(Nq), configs.bucket(Nk))
    flags.update(_head_flags(D, Dv, q.dtype, forward=True), VARLEN=varlen is not None, KLENS=klens, SPLIT=split,
                 PAGE=k.shape[2] if paged else 0)
    if split:  # the splits run without the sink: kvcache_forward adds it once when it merges them
        flags["SINK"] = False
    heur = _fixed_fwd(_width(flags))
    if (split or paged) and not interpreting():  # decoding tiles: few query rows
        heur = decode_config(heur, _width(flags), Nq)

    def launch(c):
        wrap_triton(_attn_fwd)[(triton.cdiv(Nq, c["BLOCK_M"]) * num_splits, *bh_grid(B * H))](*args, **flags, **c)

    def autotune():
        wrap_triton(_attn_fwd_tuned)[lambda m: (triton.cdiv(Nq, m["BLOCK_M"]), *bh_grid(B * H))](*args, **flags)
        return getattr(_attn_fwd_tuned, "best_config", None)

    # split-KV and paged decoding have their own tile rule (the table and the autotuner describe unsplit contiguous
    # launches)
    key = None if split or paged else tuning_key(q.dtype, D, Nq, Nk, flags, Dv)
    configs.run("attention.fwd", key, heur, launch, autotune=autotune, device=q.device)
    return o, lse


def shift_delta(delta: torch.Tensor, lse2: torch.Tensor, dlse2: torch.Tensor | None) -> None:
    """Fold the gradient of the base-2 lse into the backward's row term, in place: d lse2 / d s_ij = p_ij / ln 2
    (s the natural-log logit) and ds = p * (dp - delta), so the lse's gradient is a shift of delta. Rows with no
    visible key (lse2 = -inf) have p = 0: they stay finite."""
    if dlse2 is not None:
        delta.sub_(torch.where(torch.isinf(lse2), 0.0, dlse2.float() / math.log(2.0)))


def _sink_grad(sinks: torch.Tensor, lse2: torch.Tensor, delta: torch.Tensor, head_dim: int) -> torch.Tensor:
    """dsinks (Hq,) float32 = -sum over rows of p_sink * delta, p_sink = exp2(sink2 - lse2) the sink's share of each
    row (the saved lse2 includes it), delta the backward's row term (rowsum(dO * O), shifted by the lse's gradient,
    which so reaches the sinks too). ``head_dim``: the heads' dim in lse2 and delta. O(rows) torch work."""
    view = [1] * lse2.dim()
    view[head_dim] = -1
    sink2 = sinks.float().view(view) * LOG2E
    p_sink = torch.exp2(sink2 - lse2)
    p_sink = torch.where(torch.isneginf(sink2) | torch.isneginf(lse2), 0.0, p_sink)  # no sink, or no key and no sink
    dims = [i for i in range(lse2.dim()) if i != head_dim]
    return -(p_sink * delta).sum(dims)


def _backward(do, q, k, v, o, lse, spec, *, varlen=None, dlse2=None):
    Dv = v.shape[-1]
    if varlen is None:
        B, H, Nq, D = q.shape
        HKV, Nk = k.shape[1], k.shape[2]
        sq, sk, sv, sdo, so = _dense(q), _dense(k), _dense(v), _dense(do), _dense(o)
        sl = (H * Nq, Nq)
        drop_mq, drop_mk = Nq, Nk
        pre_B, pre_N = B, Nq
    else:
        cu_q, cu_k, max_q, max_k = varlen
        B, (Tq, H, D), HKV = cu_q.numel() - 1, q.shape, k.shape[1]
        Nq, Nk = max_q, max_k
        sq, sk, sv, sdo, so = _packed(q), _packed(k), _packed(v), _packed(do), _packed(o)
        sl = (0, Tq)
        drop_mq, drop_mk = max_q, max_k
        pre_B, pre_N = 1, Tq
    delta = empty(*lse.shape, dtype=torch.float32, device=q.device)
    pre_bm = 32 if interpreting() else 64
    wrap_triton(_bwd_preprocess)[(triton.cdiv(pre_N, pre_bm), *bh_grid(pre_B * H))](
        o, do, delta, *so, *sdo, H, pre_B * H, pre_N, HEAD_DIM_V=Dv, BLOCK_DV=_head_block(Dv), BLOCK_M=pre_bm)
    shift_delta(delta, lse, dlse2)
    dq = empty(*q.shape, dtype=q.dtype, device=q.device)
    dk = empty(*k.shape, dtype=k.dtype, device=k.device)
    dv = empty(*v.shape, dtype=v.dtype, device=v.device)
    if varlen is None:
        sdq, sdk, sdv = _dense(dq), _dense(dk), _dense(dv)
    else:
        sdq, sdk, sdv = _packed(dq), _packed(dk), _packed(dv)
    feats, flags = _spec_args(spec, B, H, Nq, Nk, q)
    del flags["SINK"]  # the saved lse holds the sink: the backward kernels are the same with or without one
    flags.update(_head_flags(D, Dv, q.dtype), VARLEN=varlen is not None)
    cu_q_t, cu_k_t = (varlen[0], varlen[1]) if varlen is not None else (q, q)
    tail = (drop_mq, drop_mk, configs.bucket(Nq), configs.bucket(Nk))
    # strides: the query-side rows (q, dO), the key-side rows (k, v), the output, lse/delta
    kv_args = (q, k, v, do, dk, dv, lse, delta, cu_q_t, cu_k_t, *feats, *sq, *sdo, *sk, *sv, *sdk, *sdv, *sl,
               H, HKV, B * HKV, H // HKV, Nq, Nk, *tail)
    q_args = (q, k, v, do, dq, lse, delta, cu_q_t, cu_k_t, *feats, *sq, *sdo, *sk, *sv, *sdq, *sl,
              H, B * H, H // HKV, Nq, Nk, *tail)
    conf = _fixed_bwd(_width(flags))
    # dQ iterates over keys: swap the roles so its inner tile is the key block
    qconf = dict(conf, BLOCK_M=conf["BLOCK_N"], BLOCK_N=conf["BLOCK_M"])
    key = tuning_key(q.dtype, D, Nq, Nk, flags, Dv)

    # past a head dim of 256 dK and dV are two launches, each holding one fp32 accumulator
    parts = ((True, True),) if _width(flags) <= 256 else ((True, False), (False, True))

    def launch_dkdv(c):
        for gk, gv in parts:
            wrap_triton(_attn_bwd_dkdv)[(triton.cdiv(Nk, c["BLOCK_N"]), *bh_grid(B * HKV))](
                *kv_args, **flags, **c, GRAD_K=gk, GRAD_V=gv)

    def autotune_dkdv():
        grid = lambda m: (triton.cdiv(Nk, m["BLOCK_N"]), *bh_grid(B * HKV))
        for gk, gv in parts:
            wrap_triton(_attn_bwd_dkdv_tuned)[grid](*kv_args, **flags, GRAD_K=gk, GRAD_V=gv)
        return getattr(_attn_bwd_dkdv_tuned, "best_config", None)

    def launch_dq(c):
        wrap_triton(_attn_bwd_dq)[(triton.cdiv(Nq, c["BLOCK_M"]), *bh_grid(B * H))](*q_args, **flags, **c)

    def autotune_dq():
        wrap_triton(_attn_bwd_dq_tuned)[lambda m: (triton.cdiv(Nq, m["BLOCK_M"]), *bh_grid(B * H))](*q_args, **flags)
        return getattr(_attn_bwd_dq_tuned, "best_config", None)

    configs.run("attention.bwd_dkdv", key, conf, launch_dkdv, autotune=autotune_dkdv, device=q.device)
    configs.run("attention.bwd_dq", key, qconf, launch_dq, autotune=autotune_dq, device=q.device)
    if spec.sinks is None:
        return dq, dk, dv
    return dq, dk, dv, _sink_grad(spec.sinks, lse, delta, 1 if varlen is None else 0)


def attention_forward(q, k, v, spec):
    """Dense forward of the call ``spec`` describes (``embedattn.attention.AttnSpec``). Returns (out (B, Hq, Nq, Dv)
    in q's memory order, lse2 (B, Hq, Nq) float32 base-2 log-sum-exp, the sink included; -inf on empty rows
    without one)."""
    return _forward(q, k, v, spec)


def attention_backward(do, q, k, v, o, lse, spec, *, dlse2=None):
    """Dense backward: (dq, dk, dv) in the dtypes of q, k, v, and with the spec's sinks a fourth, dsinks (Hq,)
    float32; deterministic (no atomics). ``spec``: the forward's. ``dlse2``: the gradient of the base-2 lse
    (B, Hq, Nq), when the loss used it; None = zero."""
    return _backward(do, q, k, v, o, lse, spec, dlse2=dlse2)


def varlen_forward(q, k, v, cu_q, cu_k, max_q: int, max_k: int, spec, *, block_table=None):
    """Packed (total, H, D) sequences (v (total_k, HKV, Dv)) delimited by int32 cu_seqlens; causal is bottom-right
    per sequence (the spec's causal_offset is not read). Returns (out (Tq, H, Dv), lse2 (H, Tq)).

    ``block_table`` (B, max_pages): paged keys (prefill with a paged cache). k/v are then pools of pages (num_pages,
    HKV, page_size, D / Dv) and sequence b's keys are positions 0 .. cu_k[b+1] - cu_k[b] - 1 through its table row
    (as ``kvcache_forward``'s; the caller guarantees those lengths within the table's capacity)."""
    return _forward(q, k, v, spec, varlen=(cu_q, cu_k, int(max_q), int(max_k)), block_table=block_table)


def varlen_backward(do, q, k, v, o, lse, cu_q, cu_k, max_q: int, max_k: int, spec):
    """(dq, dk, dv) (and dsinks with sinks), as ``attention_backward``."""
    return _backward(do, q, k, v, o, lse, spec, varlen=(cu_q, cu_k, int(max_q), int(max_k)))


def kvcache_forward(q, k_cache, v_cache, k_lens, spec, num_splits: int = 0, *, block_table=None, k_starts=None):
    """Decoding forward over a cache: batch b attends to its first k_lens[b] keys (int32), causal
    bottom-right per batch (the spec's causal_offset is not read). Split-KV (flash-decoding): the keys are cut
    into ``num_splits`` chunks run by separate programs and merged by their log-sum-exp, so Nq = 1 with a long
    cache fills the GPU.
    ``num_splits=0`` picks a count from the shape. Returns (out like q, lse2 (B, H, Nq)).

    ``block_table`` (B, max_pages) int32: a paged cache. k_cache/v_cache are pools of pages (num_pages, HKV,
    page_size, D), any page size and strides; batch b's position p is slot p % page_size of page
    block_table[b, p // page_size], read in place. The caller guarantees k_lens[b] <= max_pages * page_size and
    table entries in [0, num_pages) (the kernel does not check them). A page size that is a multiple of the key
    tile (BLOCK_N: 64 for head dims up to 128 on a GPU, 32 above) reads each tile from one page like a contiguous
    cache; other sizes gather the tile row by row. v_cache may be a column view of k_cache's memory (MLA's
    ``k_cache[..., :512]``): read in place through its strides.

    ``k_starts`` (B,) int32 in [0, k_lens[b]]: a left-padded cache, batch b's keys are positions k_starts[b] ..
    k_lens[b] - 1 (the diagonal, window and ALiBi stay in cache positions). The key loop starts at the block
    holding k_starts[b], that block read from k_starts[b] on as one tile of its own: no key left of it is read,
    and the other tiles run as without it."""
    B, H, Nq, D = q.shape
    Nk = k_cache.shape[2] * (1 if block_table is None else block_table.shape[1])
    if num_splits <= 0:
        programs = B * H * triton.cdiv(Nq, 64)
        num_splits = 1 if interpreting() else max(1, min(64, triton.cdiv(264, programs), triton.cdiv(Nk, 256)))
    if num_splits == 1:
        return _forward(q, k_cache, v_cache, spec, k_lens=k_lens, k_starts=k_starts, block_table=block_table)
    o_part, lse_part = _forward(q, k_cache, v_cache, spec, k_lens=k_lens, k_starts=k_starts, num_splits=num_splits,
                                block_table=block_table)
    parts = lse_part * math.log(2.0)  # (B, H, S, Nq), natural log, each split's without the sink
    if spec.sinks is not None:  # the sink joins the merge once, as one more part with no value
        parts = torch.cat([parts, spec.sinks.float().view(1, H, 1, 1).expand(B, H, 1, Nq)], dim=2)
    lse = torch.logsumexp(parts, dim=2)  # (B, H, Nq)
    w = torch.exp(lse_part * math.log(2.0) - lse.unsqueeze(2))
    w = torch.nan_to_num(w, nan=0.0)  # rows with no key in any split (and no sink)
    out = empty_in_order(q, v_cache.shape[-1])
    out.copy_((w.unsqueeze(-1) * torch.nan_to_num(o_part, nan=0.0)).sum(2))
    return out, lse / math.log(2.0)


def dropout_keep_mask(B: int, H: int, Nq: int, Nk: int, dropout_p: float, seed: torch.Tensor) -> torch.Tensor:
    """Debug path: the (B, H, Nq, Nk) bool keep mask the kernels draw for (dropout_p, seed) on dense inputs;
    ``seed`` is the one-element int64 tensor the kernels read, on the device to draw on."""
    out = torch.empty(B, H, Nq, Nk, dtype=torch.int8, device=seed.device)
    bm = bn = 32
    wrap_triton(_dropout_keep_kernel)[(triton.cdiv(Nq, bm) * triton.cdiv(Nk, bn), *bh_grid(B * H))](
        out, seed, float(dropout_p), H, B * H, Nq, Nk, Nq, Nk, BLOCK_M=bm, BLOCK_N=bn)
    return out.bool()


__all__ = ["BWD_CONFIGS", "FWD_CONFIGS", "LOG2E", "attention_backward", "attention_forward", "dropout_keep_mask",
           "empty_in_order", "kvcache_forward", "last_config", "prune_bwd", "prune_fwd", "tuning_key",
           "varlen_backward", "varlen_forward"]
