"""Fused attention: online-softmax forward and atomic-free backward (FlashAttention-2 style).

Scores are computed in base 2 (``exp2`` with ``scale * log2(e)`` folded into one multiply); the
forward saves the base-2 log-sum-exp ``lse2`` (-inf for a row with no visible key). The backward
recomputes probabilities from it: a preprocess kernel computes ``delta = rowsum(dO * O)``, one kernel
accumulates dK/dV per key block (looping over the query heads of its GQA group, so no atomics), and
one kernel accumulates dQ per query block. All accumulation is fp32.

Tails are masked: any Nq >= 1, Nk >= 1, head dim 1..256 (padded to a power-of-two tile of at least
16). Tiles that need no causal/tail mask run an unmasked loop.

Causal masking takes an offset: query i sees key j iff ``j <= i + causal_offset``; the API passes
``Nk - Nq`` (bottom-right, FlashAttention's convention) or 0 (top-left, torch SDPA's ``is_causal``).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._utils import empty, interpreting

LOG2E = 1.4426950408889634

# attn_mask kinds
MASK_NONE, MASK_BOOL, MASK_ADD = 0, 1, 2


# --------------------------------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------------------------------
@triton.jit
def _fwd_tile(
    acc, l_i, m_i, q, k_base, v_base, mask_base, start_n,
    offs_m, offs_n0, offs_d,
    stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn,
    Nq, Nk, qk_scale, causal_off,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, PREC: tl.constexpr,
):
    offs_n = start_n + offs_n0
    k_ptrs = k_base + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd
    v_ptrs = v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd
    if MASKED:
        n_ok = offs_n < Nk
        if BLOCK_D == HEAD_DIM:
            k = tl.load(k_ptrs, mask=n_ok[None, :], other=0.0)
            v = tl.load(v_ptrs, mask=n_ok[:, None], other=0.0)
        else:
            d_ok = offs_d < HEAD_DIM
            k = tl.load(k_ptrs, mask=n_ok[None, :] & d_ok[:, None], other=0.0)
            v = tl.load(v_ptrs, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
    else:
        if BLOCK_D == HEAD_DIM:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        else:
            d_ok = offs_d < HEAD_DIM
            k = tl.load(k_ptrs, mask=d_ok[:, None], other=0.0)
            v = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)
    qk = tl.dot(q, k, input_precision=PREC) * qk_scale
    if MASK_KIND != 0:
        mk_ptrs = mask_base + offs_m[:, None] * stride_mm + offs_n[None, :] * stride_mn
        mk_ok = (offs_m[:, None] < Nq) & (offs_n[None, :] < Nk)
        if MASK_KIND == 1:
            mk = tl.load(mk_ptrs, mask=mk_ok, other=0)
            qk = tl.where(mk != 0, qk, float("-inf"))
        else:
            mk = tl.load(mk_ptrs, mask=mk_ok, other=0.0).to(tl.float32)
            qk = qk + mk * 1.4426950408889634
    if MASKED:
        valid = offs_n[None, :] < Nk
        if CAUSAL:
            valid = valid & (offs_n[None, :] <= offs_m[:, None] + causal_off)
        qk = tl.where(valid, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    # a row that has seen no visible key yet keeps m = -inf; shift by 0 so exp2 gives 0, not NaN
    m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(qk - m_shift[:, None])
    alpha = tl.math.exp2(m_i - m_shift)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PREC)
    return acc, l_i, m_new


@triton.jit
def _attn_fwd(
    Q, K, V, O, LSE, M,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_mb, stride_mh, stride_mm, stride_mn,
    H, GROUP, Nq, Nk, qk_scale, causal_off, NQ_BUCKET, NK_BUCKET,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, PREC: tl.constexpr,
):
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    hk = h // GROUP
    q_base = Q + b * stride_qb + h * stride_qh
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    o_base = O + b * stride_ob + h * stride_oh
    mask_base = M + b * stride_mb + h * stride_mh

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < Nq
    d_ok = offs_d < HEAD_DIM
    q = tl.load(q_base + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    n_full = (Nk // BLOCK_N) * BLOCK_N
    if CAUSAL:
        hi = tl.minimum(Nk, tl.maximum(start_m + BLOCK_M + causal_off, 0))
        # key blocks entirely at or left of the diagonal for every row of this block need no mask
        full = (tl.maximum(start_m + causal_off + 1, 0) // BLOCK_N) * BLOCK_N
        full = tl.minimum(full, n_full)
    else:
        hi = Nk
        full = n_full
    for start_n in range(0, full, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        acc, l_i, m_i = _fwd_tile(
            acc, l_i, m_i, q, k_base, v_base, mask_base, start_n, offs_m, offs_n0, offs_d,
            stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn,
            Nq, Nk, qk_scale, causal_off,
            HEAD_DIM, BLOCK_D, False, CAUSAL, MASK_KIND, PREC)
    for start_n in range(full, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        acc, l_i, m_i = _fwd_tile(
            acc, l_i, m_i, q, k_base, v_base, mask_base, start_n, offs_m, offs_n0, offs_d,
            stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn,
            Nq, Nk, qk_scale, causal_off,
            HEAD_DIM, BLOCK_D, True, CAUSAL, MASK_KIND, PREC)

    empty_row = l_i == 0.0
    l_safe = tl.where(empty_row, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse2 = tl.where(empty_row, float("-inf"), m_i + tl.math.log2(l_safe))
    tl.store(o_base + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
             out.to(O.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
    tl.store(LSE + bh.to(tl.int64) * Nq + offs_m, lse2, mask=m_ok)


# --------------------------------------------------------------------------------------------------
# backward
# --------------------------------------------------------------------------------------------------
@triton.jit
def _bwd_preprocess(
    O, DO, DELTA,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_dob, stride_doh, stride_dom, stride_dod,
    H, Nq,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    ok = (offs_m[:, None] < Nq) & (offs_d[None, :] < HEAD_DIM)
    o = tl.load(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
                mask=ok, other=0.0).to(tl.float32)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom
                 + offs_d[None, :] * stride_dod, mask=ok, other=0.0).to(tl.float32)
    tl.store(DELTA + bh.to(tl.int64) * Nq + offs_m, tl.sum(o * do, 1), mask=offs_m < Nq)


@triton.jit
def _dkdv_tile(
    dk, dv, k, v, q_base, do_base, lse_base, delta_base, mask_base, start_m,
    offs_n, offs_m0, offs_d,
    stride_qm, stride_qd, stride_dom, stride_dod, stride_mm, stride_mn,
    Nq, Nk, qk_scale, causal_off,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, PREC: tl.constexpr,
):
    offs_m = start_m + offs_m0
    q_ptrs = q_base + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd
    do_ptrs = do_base + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod
    if MASKED:
        m_ok = offs_m < Nq
        ld_ok = m_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
        q = tl.load(q_ptrs, mask=ld_ok, other=0.0)
        do = tl.load(do_ptrs, mask=ld_ok, other=0.0)
        lse = tl.load(lse_base + offs_m, mask=m_ok, other=float("inf"))
        delta = tl.load(delta_base + offs_m, mask=m_ok, other=0.0)
    else:
        if BLOCK_D == HEAD_DIM:
            q = tl.load(q_ptrs)
            do = tl.load(do_ptrs)
        else:
            d_ok = offs_d[None, :] < HEAD_DIM
            q = tl.load(q_ptrs, mask=d_ok, other=0.0)
            do = tl.load(do_ptrs, mask=d_ok, other=0.0)
        lse = tl.load(lse_base + offs_m)
        delta = tl.load(delta_base + offs_m)
    # rows with no visible key have lse = -inf and P = 0: shift by +inf so exp2 gives 0, not NaN
    lse = tl.where(lse == float("-inf"), float("inf"), lse)
    qkT = tl.dot(k, tl.trans(q), input_precision=PREC) * qk_scale
    if MASK_KIND != 0:
        mk_ptrs = mask_base + offs_m[None, :] * stride_mm + offs_n[:, None] * stride_mn
        mk_ok = (offs_m[None, :] < Nq) & (offs_n[:, None] < Nk)
        if MASK_KIND == 1:
            mk = tl.load(mk_ptrs, mask=mk_ok, other=0)
            qkT = tl.where(mk != 0, qkT, float("-inf"))
        else:
            mk = tl.load(mk_ptrs, mask=mk_ok, other=0.0).to(tl.float32)
            qkT = qkT + mk * 1.4426950408889634
    if MASKED:
        valid = offs_m[None, :] < Nq
        if CAUSAL:
            valid = valid & (offs_n[:, None] <= offs_m[None, :] + causal_off)
        qkT = tl.where(valid, qkT, float("-inf"))
    pT = tl.math.exp2(qkT - lse[None, :])
    dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=PREC)
    dpT = tl.dot(v, tl.trans(do), input_precision=PREC)
    dsT = pT * (dpT - delta[None, :])
    dk = tl.dot(dsT.to(q.dtype), q, dk, input_precision=PREC)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv(
    Q, K, V, DO, DK, DV, LSE, DELTA, M,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_mb, stride_mh, stride_mm, stride_mn,
    H, HKV, GROUP, Nq, Nk, qk_scale, sm_scale, causal_off, NQ_BUCKET, NK_BUCKET,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, PREC: tl.constexpr,
):
    start_n = tl.program_id(0) * BLOCK_N
    bhk = tl.program_id(1)
    b = (bhk // HKV).to(tl.int64)
    hk = (bhk % HKV).to(tl.int64)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    ld_ok = (offs_n[:, None] < Nk) & (offs_d[None, :] < HEAD_DIM)
    k = tl.load(K + b * stride_kb + hk * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                mask=ld_ok, other=0.0)
    v = tl.load(V + b * stride_vb + hk * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                mask=ld_ok, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    m_end = tl.cdiv(Nq, BLOCK_M) * BLOCK_M
    m_full = (Nq // BLOCK_M) * BLOCK_M
    if CAUSAL:
        # first query that sees any key of this block, and first query block that sees all of them
        lo = (tl.maximum(start_n - causal_off, 0) // BLOCK_M) * BLOCK_M
        diag = tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - causal_off, 0), BLOCK_M) * BLOCK_M
        a_end = tl.minimum(tl.maximum(diag, lo), m_end)
    else:
        lo = 0
        a_end = 0
    c_start = tl.maximum(a_end, m_full)

    for g in range(0, GROUP):
        h = hk * GROUP + g
        bh = b * H + h
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = DO + b * stride_dob + h * stride_doh
        lse_base = LSE + bh * Nq
        delta_base = DELTA + bh * Nq
        mask_base = M + b * stride_mb + h * stride_mh
        for start_m in range(lo, a_end, BLOCK_M):  # causal diagonal: masked
            dk, dv = _dkdv_tile(
                dk, dv, k, v, q_base, do_base, lse_base, delta_base, mask_base, start_m,
                offs_n, offs_m0, offs_d, stride_qm, stride_qd, stride_dom, stride_dod, stride_mm, stride_mn,
                Nq, Nk, qk_scale, causal_off, HEAD_DIM, BLOCK_D, True, CAUSAL, MASK_KIND, PREC)
        for start_m in range(a_end, m_full, BLOCK_M):  # interior: unmasked
            start_m = tl.multiple_of(start_m, BLOCK_M)
            dk, dv = _dkdv_tile(
                dk, dv, k, v, q_base, do_base, lse_base, delta_base, mask_base, start_m,
                offs_n, offs_m0, offs_d, stride_qm, stride_qd, stride_dom, stride_dod, stride_mm, stride_mn,
                Nq, Nk, qk_scale, causal_off, HEAD_DIM, BLOCK_D, False, CAUSAL, MASK_KIND, PREC)
        for start_m in range(c_start, m_end, BLOCK_M):  # query tail: masked
            dk, dv = _dkdv_tile(
                dk, dv, k, v, q_base, do_base, lse_base, delta_base, mask_base, start_m,
                offs_n, offs_m0, offs_d, stride_qm, stride_qd, stride_dom, stride_dod, stride_mm, stride_mn,
                Nq, Nk, qk_scale, causal_off, HEAD_DIM, BLOCK_D, True, CAUSAL, MASK_KIND, PREC)

    dk = dk * sm_scale
    out_off = b * stride_dkb + hk * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :] * stride_dkd
    tl.store(DK + out_off, dk.to(DK.dtype.element_ty), mask=ld_ok)
    tl.store(DV + out_off, dv.to(DV.dtype.element_ty), mask=ld_ok)


@triton.jit
def _dq_tile(
    dq, q, do, lse, delta, k_base, v_base, mask_base, start_n,
    offs_m, offs_n0, offs_d,
    stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn,
    Nq, Nk, qk_scale, causal_off,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, PREC: tl.constexpr,
):
    offs_n = start_n + offs_n0
    k_ptrs = k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd
    v_ptrs = v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd
    if MASKED:
        ld_ok = (offs_n[:, None] < Nk) & (offs_d[None, :] < HEAD_DIM)
        k = tl.load(k_ptrs, mask=ld_ok, other=0.0)
        v = tl.load(v_ptrs, mask=ld_ok, other=0.0)
    else:
        if BLOCK_D == HEAD_DIM:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        else:
            d_ok = offs_d[None, :] < HEAD_DIM
            k = tl.load(k_ptrs, mask=d_ok, other=0.0)
            v = tl.load(v_ptrs, mask=d_ok, other=0.0)
    qk = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
    if MASK_KIND != 0:
        mk_ptrs = mask_base + offs_m[:, None] * stride_mm + offs_n[None, :] * stride_mn
        mk_ok = (offs_m[:, None] < Nq) & (offs_n[None, :] < Nk)
        if MASK_KIND == 1:
            mk = tl.load(mk_ptrs, mask=mk_ok, other=0)
            qk = tl.where(mk != 0, qk, float("-inf"))
        else:
            mk = tl.load(mk_ptrs, mask=mk_ok, other=0.0).to(tl.float32)
            qk = qk + mk * 1.4426950408889634
    if MASKED:
        valid = offs_n[None, :] < Nk
        if CAUSAL:
            valid = valid & (offs_n[None, :] <= offs_m[:, None] + causal_off)
        qk = tl.where(valid, qk, float("-inf"))
    p = tl.math.exp2(qk - lse[:, None])
    dp = tl.dot(do, tl.trans(v), input_precision=PREC)
    ds = p * (dp - delta[:, None])
    dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PREC)
    return dq


@triton.jit
def _attn_bwd_dq(
    Q, K, V, DO, DQ, LSE, DELTA, M,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    stride_mb, stride_mh, stride_mm, stride_mn,
    H, GROUP, Nq, Nk, qk_scale, sm_scale, causal_off, NQ_BUCKET, NK_BUCKET,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, PREC: tl.constexpr,
):
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    hk = h // GROUP
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    mask_base = M + b * stride_mb + h * stride_mh
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < Nq
    ld_ok = m_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=ld_ok, other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom
                 + offs_d[None, :] * stride_dod, mask=ld_ok, other=0.0)
    lse = tl.load(LSE + bh.to(tl.int64) * Nq + offs_m, mask=m_ok, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse)
    delta = tl.load(DELTA + bh.to(tl.int64) * Nq + offs_m, mask=m_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    n_full = (Nk // BLOCK_N) * BLOCK_N
    if CAUSAL:
        hi = tl.minimum(Nk, tl.maximum(start_m + BLOCK_M + causal_off, 0))
        full = (tl.maximum(start_m + causal_off + 1, 0) // BLOCK_N) * BLOCK_N
        full = tl.minimum(full, n_full)
    else:
        hi = Nk
        full = n_full
    for start_n in range(0, full, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        dq = _dq_tile(dq, q, do, lse, delta, k_base, v_base, mask_base, start_n, offs_m, offs_n0, offs_d,
                      stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn,
                      Nq, Nk, qk_scale, causal_off, HEAD_DIM, BLOCK_D, False, CAUSAL, MASK_KIND, PREC)
    for start_n in range(full, hi, BLOCK_N):
        dq = _dq_tile(dq, q, do, lse, delta, k_base, v_base, mask_base, start_n, offs_m, offs_n0, offs_d,
                      stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn,
                      Nq, Nk, qk_scale, causal_off, HEAD_DIM, BLOCK_D, True, CAUSAL, MASK_KIND, PREC)
    dq = dq * sm_scale
    tl.store(DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqm + offs_d[None, :] * stride_dqd,
             dq.to(DQ.dtype.element_ty), mask=ld_ok)


# --------------------------------------------------------------------------------------------------
# configs: one fixed config under the interpreter, heuristics or autotune on a GPU
# --------------------------------------------------------------------------------------------------
def _autotune_enabled() -> bool:
    return os.environ.get("EMBEDATTN_AUTOTUNE", "1") not in ("0", "false", "False", "")


def _bucket(n: int) -> int:
    # autotune key: powers of two, so a sweep over many lengths does not retune at each one
    return triton.next_power_of_2(max(int(n), 16))


def _fwd_configs():
    out = []
    for bm in (64, 128):
        for bn in (32, 64, 128):
            for w in (4, 8):
                for s in (2, 3, 4):
                    out.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s))
    return out


def _bwd_configs():
    out = []
    for bm, bn in ((32, 64), (64, 64), (64, 128), (128, 64), (32, 128)):
        for w in (4, 8):
            for s in (2, 3):
                out.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s))
    return out


def _smem_ok(conf, block_d: int, elt: int, n_tiles: int) -> bool:
    bm, bn = conf.kwargs["BLOCK_M"], conf.kwargs["BLOCK_N"]
    # tiles that live in shared memory across the pipeline: a rough bound that keeps H100's 227 KB
    need = (bm * block_d + n_tiles * bn * block_d * conf.num_stages) * elt
    return need <= 200 * 1024


def _prune_fwd(configs, named_args, **kwargs):
    block_d = named_args["BLOCK_D"] if "BLOCK_D" in named_args else kwargs.get("BLOCK_D", 128)
    elt = named_args["Q"].element_size()
    nq = named_args["Nq"]
    keep = [c for c in configs if _smem_ok(c, block_d, elt, 2)
            and not (block_d >= 256 and c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] > 64 * 64)
            and not (nq <= 64 and c.kwargs["BLOCK_M"] > 64)]
    return keep or configs[:1]


def _prune_bwd(configs, named_args, **kwargs):
    block_d = named_args["BLOCK_D"] if "BLOCK_D" in named_args else kwargs.get("BLOCK_D", 128)
    elt = named_args["Q"].element_size()
    keep = [c for c in configs if _smem_ok(c, block_d, elt, 4)
            and not (block_d >= 256 and c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] > 32 * 64)
            and not (block_d >= 128 and c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] > 64 * 128)]
    return keep or configs[:1]


_attn_fwd_tuned = triton.autotune(
    configs=_fwd_configs(), key=["NQ_BUCKET", "NK_BUCKET", "HEAD_DIM", "CAUSAL", "MASK_KIND", "PREC"],
    prune_configs_by={"early_config_prune": _prune_fwd},
)(_attn_fwd)
_attn_bwd_dkdv_tuned = triton.autotune(
    configs=_bwd_configs(), key=["NQ_BUCKET", "NK_BUCKET", "HEAD_DIM", "CAUSAL", "MASK_KIND", "PREC"],
    prune_configs_by={"early_config_prune": _prune_bwd},
)(_attn_bwd_dkdv)
_attn_bwd_dq_tuned = triton.autotune(
    configs=_bwd_configs(), key=["NQ_BUCKET", "NK_BUCKET", "HEAD_DIM", "CAUSAL", "MASK_KIND", "PREC"],
    prune_configs_by={"early_config_prune": _prune_bwd},
)(_attn_bwd_dq)

_LAST_CONFIG: dict[str, str] = {}


def last_config() -> dict[str, str]:
    """The config each attention kernel last ran with (autotuned choice or fixed heuristic)."""
    return dict(_LAST_CONFIG)


def _fixed_fwd(block_d: int) -> dict:
    if interpreting():
        return {"BLOCK_M": 32, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1}
    if block_d <= 64:
        return {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3}
    if block_d <= 128:
        return {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3}
    return {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2}


def _fixed_bwd(block_d: int) -> dict:
    if interpreting():
        return {"BLOCK_M": 16, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1}
    if block_d <= 64:
        return {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2}
    if block_d <= 128:
        return {"BLOCK_M": 32, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2}
    return {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1}


def _fmt(conf: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in conf.items())


def _fmt_best(tuner) -> str:
    c = getattr(tuner, "best_config", None)
    if c is None:
        return ""
    return _fmt({**c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages})


def _mask_args(mask: torch.Tensor | None, B: int, H: int, Nq: int, Nk: int, q: torch.Tensor):
    if mask is None:
        return q, (0, 0, 0, 0), MASK_NONE  # q stands in as a never-read pointer
    mask = mask.expand(B, H, Nq, Nk)
    if mask.dtype == torch.bool:
        mask = mask.view(torch.uint8)
        kind = MASK_BOOL
    else:
        kind = MASK_ADD
    return mask, tuple(mask.stride()), kind


def _head_block(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def _prec(dtype: torch.dtype) -> str:
    # fp32 inputs must not silently drop to tf32: keep plain fp32 accuracy
    return "ieee" if dtype == torch.float32 else "tf32"


# --------------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------------
def attention_forward(q, k, v, mask, causal: bool, causal_offset: int, scale: float):
    """Returns (out, lse2): out like q, lse2 (B, Hq, Nq) float32 base-2 log-sum-exp (-inf: empty row)."""
    B, H, Nq, D = q.shape
    HKV, Nk = k.shape[1], k.shape[2]
    o = empty(B, H, Nq, D, dtype=q.dtype, device=q.device)
    lse = empty(B, H, Nq, dtype=torch.float32, device=q.device)
    m, ms, kind = _mask_args(mask, B, H, Nq, Nk, q)
    block_d = _head_block(D)
    args = (q, k, v, o, lse, m, *q.stride(), *k.stride(), *v.stride(), *o.stride(), *ms,
            H, H // HKV, Nq, Nk, scale * LOG2E, causal_offset, _bucket(Nq), _bucket(Nk))
    common = dict(HEAD_DIM=D, BLOCK_D=block_d, CAUSAL=bool(causal), MASK_KIND=kind, PREC=_prec(q.dtype))
    if not interpreting() and _autotune_enabled():
        grid = lambda meta: (triton.cdiv(Nq, meta["BLOCK_M"]), B * H)
        _attn_fwd_tuned[grid](*args, **common)
        _LAST_CONFIG["fwd"] = _fmt_best(_attn_fwd_tuned)
    else:
        conf = _fixed_fwd(block_d)
        grid = (triton.cdiv(Nq, conf["BLOCK_M"]), B * H)
        _attn_fwd[grid](*args, **common, **conf)
        _LAST_CONFIG["fwd"] = _fmt(conf)
    return o, lse


def attention_backward(do, q, k, v, o, lse, mask, causal: bool, causal_offset: int, scale: float):
    """Returns (dq, dk, dv) in the dtypes of q, k, v; deterministic (no atomics)."""
    B, H, Nq, D = q.shape
    HKV, Nk = k.shape[1], k.shape[2]
    block_d = _head_block(D)
    delta = empty(B, H, Nq, dtype=torch.float32, device=q.device)
    pre_bm = 32 if interpreting() else 64
    _bwd_preprocess[(triton.cdiv(Nq, pre_bm), B * H)](
        o, do, delta, *o.stride(), *do.stride(), H, Nq, HEAD_DIM=D, BLOCK_D=block_d, BLOCK_M=pre_bm)
    dq = empty(B, H, Nq, D, dtype=q.dtype, device=q.device)
    dk = empty(B, HKV, Nk, D, dtype=k.dtype, device=k.device)
    dv = empty(B, HKV, Nk, D, dtype=v.dtype, device=v.device)
    m, ms, kind = _mask_args(mask, B, H, Nq, Nk, q)
    common = dict(HEAD_DIM=D, BLOCK_D=block_d, CAUSAL=bool(causal), MASK_KIND=kind, PREC=_prec(q.dtype))
    qk_scale = scale * LOG2E
    kv_args = (q, k, v, do, dk, dv, lse, delta, m, *q.stride(), *k.stride(), *v.stride(), *do.stride(),
               *dk.stride(), *ms, H, HKV, H // HKV, Nq, Nk, qk_scale, scale, causal_offset,
               _bucket(Nq), _bucket(Nk))
    q_args = (q, k, v, do, dq, lse, delta, m, *q.stride(), *k.stride(), *v.stride(), *do.stride(),
              *dq.stride(), *ms, H, H // HKV, Nq, Nk, qk_scale, scale, causal_offset,
              _bucket(Nq), _bucket(Nk))
    if not interpreting() and _autotune_enabled():
        _attn_bwd_dkdv_tuned[lambda meta: (triton.cdiv(Nk, meta["BLOCK_N"]), B * HKV)](*kv_args, **common)
        _attn_bwd_dq_tuned[lambda meta: (triton.cdiv(Nq, meta["BLOCK_M"]), B * H)](*q_args, **common)
        _LAST_CONFIG["bwd_dkdv"] = _fmt_best(_attn_bwd_dkdv_tuned)
        _LAST_CONFIG["bwd_dq"] = _fmt_best(_attn_bwd_dq_tuned)
    else:
        conf = _fixed_bwd(block_d)
        _attn_bwd_dkdv[(triton.cdiv(Nk, conf["BLOCK_N"]), B * HKV)](*kv_args, **common, **conf)
        # dQ iterates over keys: swap the roles so its inner tile is the key block
        qconf = dict(conf, BLOCK_M=conf["BLOCK_N"], BLOCK_N=conf["BLOCK_M"])
        _attn_bwd_dq[(triton.cdiv(Nq, qconf["BLOCK_M"]), B * H)](*q_args, **common, **qconf)
        _LAST_CONFIG["bwd_dkdv"] = _fmt(conf)
        _LAST_CONFIG["bwd_dq"] = _fmt(qconf)
    return dq, dk, dv


__all__ = ["attention_forward", "attention_backward", "last_config", "LOG2E"]
