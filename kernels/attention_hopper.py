"""Dense attention for Hopper (sm90+): tensor descriptors (TMA), a warp-specialized forward loop, and a
5-matmul backward with dQ accumulated in fp32 by atomics.

Issue #13's levers 1, 2 and 5, written as kernels beside ``kernels/attention.py`` (the measured default):

- Forward: Q, K, V and O move through device-side tensor descriptors (``tl.make_tensor_descriptor``, one per
  (batch, head) plane, so TMA zero-fills the rows past Nq/Nk and clips the stores: any N, no host padding).
  Non-causal: one key loop, ``tl.range(..., warp_specialize=True)``, which Triton 3.6's Hopper
  warp-specialization pass splits into a TMA producer and two wgmma/softmax consumer warpgroups, as its
  tutorial 06 does; a key tail (Nk % BLOCK_N != 0) is a -inf bias inside that loop, because the pass rejects
  a second loop or an early return. Causal: an unmasked loop then the masked diagonal, no warp
  specialization (as the tutorial on Hopper), query blocks scheduled longest first.
- Backward: one program per key block (and KV head, looping over its GQA group) does the 5 matmuls per
  tile (QK^T, dV, dP, dK, dQ) and adds each tile's dQ into an fp32 buffer: a TMA reduce-add through a
  descriptor on a GPU (``desc.atomic_add``), plain ``tl.atomic_add`` where the interpreter runs (it has no
  descriptor reduce). Non-deterministic: the summation order of dQ varies run to run. The atomic-free
  backward of ``kernels/attention.py`` stays the deterministic mode.

Same math and outputs as ``kernels.attention.attention_forward`` / ``attention_backward`` (base-2 scores,
``lse2`` saved, -inf and zeros for rows with no visible key, bottom-right or top-left causal through
``causal_offset``) for the subset ``supports()`` accepts: dense (B, H, N, D) fp16/bf16 with D in 64/128/256,
GQA, unit stride in D and 16-byte aligned strides and base; no mask, window, softcap, ALiBi or dropout.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ._utils import LOG2E, bh_grid, bh_id, empty, interpreting
from .attention import _key_range, _lse_delta, _query_range, shift_delta

HEAD_DIMS = (64, 128, 256)
DTYPES = (torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------------------------------
# helpers (the block ranges and the saved lse/delta reads are kernels/attention.py's)
# --------------------------------------------------------------------------------------------------
@triton.jit
def flat_program(pid, Nq, H, NBH, GROUP, BLOCK_M: tl.constexpr, LONGEST_FIRST: tl.constexpr):
    """(start_m, bh, b, h, hk) of program ``pid`` on one flat grid axis of cdiv(Nq, BLOCK_M) * NBH programs (the sm90
    forwards: no early return, see _attn_fwd_hopper). Query blocks of one (batch, head) are neighbours (they share
    K/V in L2); LONGEST_FIRST (causal): the last query blocks of every head, which see the most keys, first. Plain
    integer arithmetic, so the Gluon forward calls it too."""
    num_m = (Nq + BLOCK_M - 1) // BLOCK_M
    if LONGEST_FIRST:
        start_m = (num_m - 1 - pid // NBH) * BLOCK_M
        bh = pid % NBH
    else:
        start_m = (pid % num_m) * BLOCK_M
        bh = pid // num_m
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    return start_m, bh, b, h, h // GROUP


@triton.jit
def _plane(base, stride, rows, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr):
    # one (batch, head) plane (rows, HEAD_DIM) with unit stride in D, read and written ROWS at a time; rows
    # past `rows` load as zeros and are not stored (TMA bounds)
    return tl.make_tensor_descriptor(base, shape=[rows, HEAD_DIM], strides=[stride, 1], block_shape=[ROWS, HEAD_DIM])


# --------------------------------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------------------------------
@triton.jit
def _fwd_tile(acc, l_i, m_i, q, k_desc, v_desc, start_n, offs_m, offs_n0, Nk, qk_scale, causal_off,
              MASKED: tl.constexpr, CAUSAL: tl.constexpr, KEY_TAIL: tl.constexpr):
    k = k_desc.load([start_n, 0])
    qk = tl.dot(q, k.T)
    if MASKED:  # the causal diagonal (and, in that loop, the key tail)
        offs_n = start_n + offs_n0
        valid = offs_n[None, :] < Nk
        if CAUSAL:
            valid = valid & (offs_n[None, :] <= offs_m[:, None] + causal_off)
        s = tl.where(valid, qk * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # a row that has seen no visible key keeps m = -inf; shift by 0 so exp2 gives 0, not NaN
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_shift[:, None])
        alpha = tl.math.exp2(m_i - m_shift)
    elif KEY_TAIL:
        # non-causal with Nk % BLOCK_N != 0, in the one (warp-specialized) loop: keys past Nk get a -inf
        # bias, one vector per block; every block has a key in range, so the max stays finite
        bias = tl.where(start_n + offs_n0 < Nk, 0.0, float("-inf"))
        s = qk * qk_scale + bias[None, :]
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
    else:
        # every row sees every key of the block: one FMA per score (qk_scale > 0)
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        p = tl.math.exp2(qk * qk_scale - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
    l_ij = tl.sum(p, 1)
    acc = acc * alpha[:, None]
    v = v_desc.load([start_n, 0])
    acc = tl.dot(p.to(v.dtype), v, acc)
    l_i = l_i * alpha + l_ij  # after the dot, as the tutorial: fewer live registers across it
    return acc, l_i, m_new


@triton.jit
def _attn_fwd_hopper(
    Q, K, V, O, LSE,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om,
    H, NBH, GROUP, Nq, Nk, qk_scale, causal_off,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
    EVEN_N: tl.constexpr, WARP_SPECIALIZE: tl.constexpr,
):
    # One flat grid axis, and no early return: Triton 3.6's Hopper warp-specialization pass rejects a
    # kernel that branches out before its loop. Non-causal: query blocks of one (batch, head) are
    # neighbours (they share K/V in L2). Causal: longest first, i.e. the last query blocks of every head
    # (bottom-right diagonal: they see the most keys) before any shorter one.
    start_m, bh, b, h, hk = flat_program(tl.program_id(0), Nq, H, NBH, GROUP, BLOCK_M, CAUSAL)
    q_desc = _plane(Q + b * stride_qb + h * stride_qh, stride_qm, Nq, BLOCK_M, HEAD_DIM)
    o_desc = _plane(O + b * stride_ob + h * stride_oh, stride_om, Nq, BLOCK_M, HEAD_DIM)
    k_desc = _plane(K + b * stride_kb + hk * stride_kh, stride_kn, Nk, BLOCK_N, HEAD_DIM)
    v_desc = _plane(V + b * stride_vb + hk * stride_vh, stride_vn, Nk, BLOCK_N, HEAD_DIM)

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    q = q_desc.load([start_m, 0])

    if CAUSAL:
        # blocks left of the diagonal unmasked, then the diagonal (and key tail) masked: two loops, which the
        # 3.6 Hopper warp-specialization pass does not take (WARP_SPECIALIZE is then ignored there)
        _lo, full, hi = _key_range(start_m, Nk, causal_off, 0, 0, BLOCK_M, BLOCK_N, CAUSAL, False)
        for start_n in range(0, full, BLOCK_N):
            start_n = tl.multiple_of(start_n, BLOCK_N)
            acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, k_desc, v_desc, start_n, offs_m, offs_n0, Nk, qk_scale,
                                      causal_off, False, CAUSAL, False)
        for start_n in range(full, hi, BLOCK_N):
            acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, k_desc, v_desc, start_n, offs_m, offs_n0, Nk, qk_scale,
                                      causal_off, True, CAUSAL, False)
    else:
        # one loop over every key block, the key tail (if any) masked by a bias inside it
        for start_n in tl.range(0, Nk, BLOCK_N, warp_specialize=WARP_SPECIALIZE):
            start_n = tl.multiple_of(start_n, BLOCK_N)
            acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, k_desc, v_desc, start_n, offs_m, offs_n0, Nk, qk_scale,
                                      causal_off, False, False, not EVEN_N)

    empty_row = l_i == 0.0
    l_safe = tl.where(empty_row, 1.0, l_i)
    lse2 = tl.where(empty_row, float("-inf"), m_i + tl.math.log2(l_safe))
    o_desc.store([start_m, 0], (acc / l_safe[:, None]).to(O.dtype.element_ty))
    tl.store(LSE + bh.to(tl.int64) * Nq + offs_m, lse2, mask=offs_m < Nq)


# --------------------------------------------------------------------------------------------------
# backward: delta = rowsum(dO * O); one program per key block, 5 matmuls per tile; dQ = scale * dQacc
# --------------------------------------------------------------------------------------------------
@triton.jit
def _row_tile(bh, H, Nq, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    """The rows of (batch, head) `bh` this program's query block covers: batch and head (int64), row
    and column offsets, the in-range row mask and the rows as int64 (for the `_bwd_delta`/`_dq_convert` tiles)."""
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    ok = offs_m[:, None] < Nq
    m64 = offs_m.to(tl.int64)[:, None]
    return b, h, offs_m, offs_d, ok, m64


@triton.jit
def _bwd_delta(O, DO, DELTA, stride_ob, stride_oh, stride_om, stride_dob, stride_doh, stride_dom,
               H, NBH, Nq, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    bh = bh_id()
    if bh >= NBH:
        return
    b, h, offs_m, offs_d, ok, m64 = _row_tile(bh, H, Nq, HEAD_DIM, BLOCK_M)
    o = tl.load(O + b * stride_ob + h * stride_oh + m64 * stride_om + offs_d[None, :], mask=ok, other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + m64 * stride_dom + offs_d[None, :], mask=ok, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + bh.to(tl.int64) * Nq + offs_m, delta, mask=offs_m < Nq)


@triton.jit
def _bwd_tile(dk, dv, k, v, q_desc, do_desc, dq_desc, dq_base, lse_base, delta_base, start_m,
              offs_n, offs_m0, offs_d, Nq, qk_scale, causal_off,
              HEAD_DIM: tl.constexpr, MASKED: tl.constexpr, TMA_REDUCE: tl.constexpr):
    offs_m = start_m + offs_m0
    m_ok = offs_m < Nq
    q = q_desc.load([start_m, 0])
    do = do_desc.load([start_m, 0])
    # rows past Nq (zero-filled q, do) and rows with no visible key (lse2 = -inf) get lse = +inf: P = 0
    lse, delta = _lse_delta(lse_base, delta_base, offs_m, Nq, True)
    qkT = tl.dot(k, tl.trans(q))
    pT = tl.math.exp2(qkT * qk_scale - lse[None, :])
    if MASKED:  # causal diagonal
        pT = tl.where(offs_n[:, None] <= offs_m[None, :] + causal_off, pT, 0.0)
    dv = tl.dot(pT.to(do.dtype), do, dv)
    dpT = tl.dot(v, tl.trans(do))
    dsT = (pT * (dpT - delta[None, :])).to(q.dtype)
    dk = tl.dot(dsT, q, dk)
    # keys past Nk were loaded as zero rows of k: their dsT rows add nothing to dQ
    dq = tl.dot(tl.trans(dsT), k)
    if TMA_REDUCE:
        dq_desc.atomic_add([start_m, 0], dq)
    else:
        ptrs = dq_base + offs_m.to(tl.int64)[:, None] * HEAD_DIM + offs_d[None, :]
        tl.atomic_add(ptrs, dq, mask=m_ok[:, None], sem="relaxed")
    return dk, dv


@triton.jit
def _attn_bwd_hopper(
    Q, K, V, DO, DQA, DK, DV, LSE, DELTA,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    H, HKV, NBH, GROUP, Nq, Nk, qk_scale, sm_scale, causal_off,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
    TMA_REDUCE: tl.constexpr,
):
    start_n = tl.program_id(0) * BLOCK_N
    bhk = bh_id()
    if bhk >= NBH:
        return
    b = (bhk // HKV).to(tl.int64)
    hk = (bhk % HKV).to(tl.int64)
    k_desc = _plane(K + b * stride_kb + hk * stride_kh, stride_kn, Nk, BLOCK_N, HEAD_DIM)
    v_desc = _plane(V + b * stride_vb + hk * stride_vh, stride_vn, Nk, BLOCK_N, HEAD_DIM)
    k = k_desc.load([start_n, 0])
    v = v_desc.load([start_n, 0])
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)

    # query blocks that see this key block: [lo, a_end) through the causal diagonal (masked), then the rest
    lo, a_end, _tail, _hi = _query_range(start_n, Nq, causal_off, 0, 0, BLOCK_M, BLOCK_N, CAUSAL, False)
    for g in range(0, GROUP):
        bh = b * H + hk * GROUP + g
        q_desc = _plane(Q + b * stride_qb + (hk * GROUP + g) * stride_qh, stride_qm, Nq, BLOCK_M, HEAD_DIM)
        do_desc = _plane(DO + b * stride_dob + (hk * GROUP + g) * stride_doh, stride_dom, Nq, BLOCK_M, HEAD_DIM)
        dq_base = DQA + bh * Nq * HEAD_DIM
        dq_desc = _plane(dq_base, HEAD_DIM, Nq, BLOCK_M, HEAD_DIM)
        lse_base = LSE + bh * Nq
        delta_base = DELTA + bh * Nq
        for start_m in range(lo, a_end, BLOCK_M):
            dk, dv = _bwd_tile(dk, dv, k, v, q_desc, do_desc, dq_desc, dq_base, lse_base, delta_base, start_m,
                               offs_n, offs_m0, offs_d, Nq, qk_scale, causal_off, HEAD_DIM, True, TMA_REDUCE)
        for start_m in range(a_end, Nq, BLOCK_M):
            start_m = tl.multiple_of(start_m, BLOCK_M)
            dk, dv = _bwd_tile(dk, dv, k, v, q_desc, do_desc, dq_desc, dq_base, lse_base, delta_base, start_m,
                               offs_n, offs_m0, offs_d, Nq, qk_scale, causal_off, HEAD_DIM, False, TMA_REDUCE)

    dk_desc = _plane(DK + b * stride_dkb + hk * stride_dkh, stride_dkn, Nk, BLOCK_N, HEAD_DIM)
    dv_desc = _plane(DV + b * stride_dvb + hk * stride_dvh, stride_dvn, Nk, BLOCK_N, HEAD_DIM)
    dk_desc.store([start_n, 0], (dk * sm_scale).to(DK.dtype.element_ty))
    dv_desc.store([start_n, 0], dv.to(DV.dtype.element_ty))


@triton.jit
def _dq_convert(DQA, DQ, stride_dqb, stride_dqh, stride_dqm, H, NBH, Nq, sm_scale,
                HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    bh = bh_id()
    if bh >= NBH:
        return
    b, h, offs_m, offs_d, ok, m64 = _row_tile(bh, H, Nq, HEAD_DIM, BLOCK_M)
    dq = tl.load(DQA + bh.to(tl.int64) * Nq * HEAD_DIM + m64 * HEAD_DIM + offs_d[None, :], mask=ok, other=0.0)
    tl.store(DQ + b * stride_dqb + h * stride_dqh + m64 * stride_dqm + offs_d[None, :],
             (dq * sm_scale).to(DQ.dtype.element_ty), mask=ok)


# --------------------------------------------------------------------------------------------------
# configs: fixed per head dim (unmeasured on a GPU yet: benchmarks/gpu/hopper_attention.py sweeps them)
# --------------------------------------------------------------------------------------------------
# (BLOCK_M, BLOCK_N, num_warps, num_stages) per head dim, from the sm_90 compile report (no spills, shared memory
# within 227 KB; tests/attention/test_hopper.py prints it) and tutorial 06; unmeasured on a GPU, so
# benchmarks/gpu/hopper_attention.py times alternatives beside them. Non-causal forward: 4 warps, the only
# count at which Triton 3.6's Hopper pass warp-specializes (a TMA producer warpgroup and two consumer
# warpgroups of BLOCK_M / 2 rows each, setmaxnreg 40 / 232).
FWD_CONFIGS = {64: (128, 128, 4, 2), 128: (128, 128, 4, 2), 256: (64, 64, 4, 2)}
# Without warp specialization (causal; non-causal with warp_specialize=False): 8 warps, as those 4-warp tiles
# spill without the pass's register split (2456 bytes at D128)
PLAIN_FWD_CONFIGS = {64: (128, 64, 8, 3), 128: (128, 64, 8, 2), 256: (128, 64, 8, 2)}
# Backward: spill-free for causal and non-causal, either dQ path. D256 has none here (the least: 184 bytes at
# 32x64, 8 warps): supports_backward leaves it to the pointer kernels (lever 6); the entry lets the benchmark
# time it anyway.
BWD_CONFIGS = {64: (32, 128, 8, 2), 128: (32, 64, 8, 2), 256: (32, 64, 8, 2)}
BWD_HEAD_DIMS = (64, 128)
_INTERP_FWD = (32, 16, 4, 1)
_INTERP_BWD = (16, 32, 4, 1)

_LAST_CONFIG: dict[str, str] = {}


def last_config() -> dict[str, str]:
    """The config each Hopper kernel last ran with."""
    return dict(_LAST_CONFIG)


def _conf(table: dict, d: int, override: tuple | None, interp: tuple) -> dict:
    bm, bn, w, s = override or (interp if interpreting() else table[d])
    return {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": w, "num_stages": s}


# --------------------------------------------------------------------------------------------------
# the "descriptor or pointer" decision
# --------------------------------------------------------------------------------------------------
def _strides_ok(t: torch.Tensor) -> bool:
    # unit stride in D, the other strides 16-byte aligned (stride 0, a broadcast, is aligned)
    return t.dim() == 4 and t.stride(-1) == 1 and all((s * t.element_size()) % 16 == 0 for s in t.stride()[:3])


def _base_aligned(t: torch.Tensor) -> bool:
    try:
        base = t.data_ptr()
    except (RuntimeError, NotImplementedError):  # a fake tensor (torch.compile tracing the op): storages are aligned
        base = t.storage_offset() * t.element_size()
    return base % 16 == 0


def tma_ok(t: torch.Tensor) -> bool:
    """A (B, H, N, D) tensor a tensor descriptor can address: unit stride in D, every other stride and the
    base 16-byte aligned (TMA's rule). Strided, broadcast (stride 0 is fine) or misaligned views fail."""
    return _strides_ok(t) and _base_aligned(t)


def device_ok(device: torch.device) -> bool:
    """sm90+ CUDA with tensor descriptors in this Triton, or the interpreter."""
    if not hasattr(tl, "make_tensor_descriptor"):
        return False
    if interpreting():
        return True
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec) -> bool:
    """True when the Hopper kernels compute this call: dense (B, H, N, D) fp16/bf16 inputs of one dtype with D in
    64/128/256, Hq % Hkv == 0, descriptor-addressable (``tma_ok``), on an sm90+ GPU (or the interpreter), and a spec
    (``embedattn.attention.AttnSpec``) with no feature beyond causal, causal_offset and a positive scale
    (``spec.plain()``). Anything else takes the pointer kernels. While torch.compile traces, the base addresses are
    not known: the op checks them at the launch (``aligned``)."""
    if not spec.plain() or not spec.scale > 0:  # the unmasked tile takes max(qk) * scale
        return False
    if q.dtype not in DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return False
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return False
    B, H, _, D = q.shape
    if D not in HEAD_DIMS or k.shape[-1] != D or v.shape[-1] != D or k.shape != v.shape:
        return False
    if k.shape[0] != B or k.shape[1] == 0 or H % k.shape[1] or q.shape[2] == 0 or k.shape[2] == 0:
        return False
    if not all(_strides_ok(t) for t in (q, k, v)) or not device_ok(q.device):
        return False
    return torch.compiler.is_compiling() or aligned(q, k, v)  # traced: fake tensors have no address, see aligned


def aligned(*tensors: torch.Tensor) -> bool:
    """Every base address 16-byte aligned (TMA's rule; eagerly the data pointers, while torch.compile traces the
    storage offsets): the part of ``supports`` only the launch sees."""
    return all(_base_aligned(t) for t in tensors)


def supports_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec) -> bool:
    """``supports`` and a head dim with a spill-free backward tile (``BWD_HEAD_DIMS``). The backward is not
    deterministic (dQ by atomics): the caller keeps the atomic-free kernels where determinism is asked for."""
    return q.dim() == 4 and q.shape[-1] in BWD_HEAD_DIMS and supports(q, k, v, spec)


# --------------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------------
_ALLOCATORS: dict = {}  # device -> the scratch allocator installed for it


def use_allocator(device: torch.device) -> None:
    """Install the global scratch the device-side tensor descriptors need (128 bytes each, per program), from
    torch's allocator on ``device``, with Triton's public ``triton.set_allocator``. At every launch: the setting
    is a ContextVar, and autograd's backward thread starts without one."""
    alloc = _ALLOCATORS.get(device)
    if alloc is None:
        alloc = _ALLOCATORS[device] = lambda size, alignment, stream: torch.empty(size, dtype=torch.int8,
                                                                                  device=device)
    triton.set_allocator(alloc)


def _s3(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def hopper_forward(q, k, v, spec, *, warp_specialize: bool | None = None, config: tuple | None = None):
    """Dense forward for the calls ``supports()`` accepts (``spec``: causal, causal_offset, scale). Returns (out like
    q, lse2 (B, Hq, Nq) float32 base-2 log-sum-exp, -inf on rows with no visible key). ``warp_specialize``
    defaults to non-causal only (what Triton 3.6's Hopper pass is known to take); ``config`` = (BLOCK_M, BLOCK_N,
    num_warps, num_stages)."""
    use_allocator(q.device)
    B, H, Nq, D = q.shape
    HKV, Nk = k.shape[1], k.shape[2]
    o = empty(B, H, Nq, D, dtype=q.dtype, device=q.device)
    lse = empty(B, H, Nq, dtype=torch.float32, device=q.device)
    causal = spec.causal
    ws = (not causal) if warp_specialize is None else bool(warp_specialize)
    conf = _conf(FWD_CONFIGS if ws and not causal else PLAIN_FWD_CONFIGS, D, config, _INTERP_FWD)
    grid = (triton.cdiv(Nq, conf["BLOCK_M"]) * B * H,)
    wrap_triton(_attn_fwd_hopper)[grid](
        q, k, v, o, lse, *_s3(q), *_s3(k), *_s3(v), *_s3(o),
        H, B * H, H // HKV, Nq, Nk, spec.scale * LOG2E, spec.causal_offset,
        HEAD_DIM=D, CAUSAL=causal, EVEN_N=Nk % conf["BLOCK_N"] == 0, WARP_SPECIALIZE=ws, **conf)
    _LAST_CONFIG["fwd"] = ",".join(f"{a}={b}" for a, b in {**conf, "WS": ws}.items())
    return o, lse


def hopper_backward(do, q, k, v, o, lse, spec, *, dlse2=None, tma_reduce: bool | None = None,
                    config: tuple | None = None):
    """Dense backward (5 matmuls per tile, dQ by fp32 atomics: NOT deterministic) for the calls ``supports()``
    accepts. Same contract as ``kernels.attention.attention_backward``: (dq, dk, dv) in the dtypes of q, k, v;
    ``dlse2`` the gradient of the base-2 lse, None = zero. ``do`` that a descriptor cannot address (and ``o``
    strided in D) is copied contiguous. ``tma_reduce``: dQ through a descriptor's reduce-add (default on a GPU) or
    ``tl.atomic_add`` (the interpreter's only choice)."""
    use_allocator(q.device)
    if not tma_ok(do):
        do = do.contiguous()
    if o.stride(-1) != 1:  # the delta kernel reads rows of O and dO with unit stride in D
        o = o.contiguous()
    B, H, Nq, D = q.shape
    HKV, Nk = k.shape[1], k.shape[2]
    dev = q.device
    bh_q = bh_grid(B * H)
    delta = empty(B, H, Nq, dtype=torch.float32, device=dev)
    pre_bm = 32 if interpreting() else 64
    wrap_triton(_bwd_delta)[(triton.cdiv(Nq, pre_bm), *bh_q)](
        o, do, delta, *_s3(o), *_s3(do), H, B * H, Nq, HEAD_DIM=D, BLOCK_M=pre_bm)
    shift_delta(delta, lse, dlse2)
    dqa = torch.zeros(B, H, Nq, D, dtype=torch.float32, device=dev)
    dk = empty(*k.shape, dtype=k.dtype, device=dev)
    dv = empty(*v.shape, dtype=v.dtype, device=dev)
    conf = _conf(BWD_CONFIGS, D, config, _INTERP_BWD)
    reduce = (not interpreting()) if tma_reduce is None else bool(tma_reduce)
    grid = (triton.cdiv(Nk, conf["BLOCK_N"]), *bh_grid(B * HKV))
    wrap_triton(_attn_bwd_hopper)[grid](
        q, k, v, do, dqa, dk, dv, lse, delta,
        *_s3(q), *_s3(k), *_s3(v), *_s3(do), *_s3(dk), *_s3(dv),
        H, HKV, B * HKV, H // HKV, Nq, Nk, spec.scale * LOG2E, spec.scale, spec.causal_offset,
        HEAD_DIM=D, CAUSAL=spec.causal, TMA_REDUCE=reduce, **conf)
    dq = empty(*q.shape, dtype=q.dtype, device=dev)
    wrap_triton(_dq_convert)[(triton.cdiv(Nq, pre_bm), *bh_q)](
        dqa, dq, *_s3(dq), H, B * H, Nq, spec.scale, HEAD_DIM=D, BLOCK_M=pre_bm)
    _LAST_CONFIG["bwd"] = ",".join(f"{a}={b}" for a, b in {**conf, "TMA_REDUCE": reduce}.items())
    return dq, dk, dv


__all__ = ["BWD_CONFIGS", "BWD_HEAD_DIMS", "FWD_CONFIGS", "HEAD_DIMS", "PLAIN_FWD_CONFIGS", "device_ok",
           "hopper_backward", "hopper_forward", "last_config", "supports", "supports_backward", "tma_ok",
           "use_allocator", "aligned"]
