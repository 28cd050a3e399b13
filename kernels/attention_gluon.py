"""A Gluon forward for sm90 (issue #13, lever 3): the next key block's QK^T overlapped with this block's softmax.

What Triton's own pipeliner does not do for attention, written out in Gluon (``triton.experimental.gluon``):
per key block j, the loop body issues the asynchronous wgmma S_{j+1} = Q K_{j+1}^T first, runs the softmax of
S_j on the CUDA cores while it and the previous block's P V run on the tensor cores, drains, rescales the
output and leaves P_j V_j in flight under the next iteration (FlashAttention-3's intra-warpgroup overlap, its
ablation credits 582 -> 661 TFLOP/s at D128; the drain before the rescale is what keeps ptxas from
serializing the wgmmas, its warning C7514). Q, K, V, O move by TMA through per-(batch, head)
device-side descriptors (zero fill past Nq/Nk, clipped stores), K and V through two-stage rings completed on
mbarriers. Eight warps: two warpgroups of 64 query rows each, sharing each K/V tile. Not yet: a producer warp
(warp specialization), the two-warpgroup ping-pong, causal masking.

Scope (``supports``): what ``kernels.attention_hopper.supports`` takes, non-causal, D 64 or 128. Importing
this module needs no Gluon: without it (an older Triton) ``AVAILABLE`` is False and ``supports`` says no.
Compile-checked for sm_90 only (tests/attention/test_hopper.py): unmeasured and not yet run on a GPU, so nothing
selects it by default; benchmarks/gpu/hopper_attention.py checks it against float64 and times it.
"""

from __future__ import annotations

import torch
import triton

from . import attention_hopper as KH
from ._utils import LOG2E, empty, interpreting
from .attention_hopper import flat_program

try:  # Gluon is experimental: absent before Triton 3.4, its API still moving
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_init,
        warpgroup_mma_wait,
    )

    # Triton 3.6 names the TMA copies async_copy_global_to_shared / async_copy_shared_to_global; later versions
    # async_load / async_store (the old names raise)
    _tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
    _tma_store = getattr(tma, "async_store", None) or tma.async_copy_shared_to_global
    AVAILABLE = hasattr(tma, "make_tensor_descriptor")
except Exception:  # ImportError, or an API this file does not know
    AVAILABLE = False

HEAD_DIMS = (64, 128)
# (BLOCK_M, BLOCK_N, num_warps): two 64-row warpgroups; BLOCK_N from the compile report (no spills)
CONFIGS = {64: (128, 128, 8), 128: (128, 64, 8)}


if AVAILABLE:

    @gluon.jit
    def _softmax_step(s, m_i, l_i, start_n, Nk, qk_scale, BLOCK_N: gl.constexpr, KEY_TAIL: gl.constexpr,
                      s_layout: gl.constexpr):
        # base-2 online softmax of one score tile; KEY_TAIL: keys past Nk get a -inf bias (the last block only)
        if KEY_TAIL:
            cols = start_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
            bias = gl.where(cols < Nk, 0.0, float("-inf"))
            s = s * qk_scale + gl.expand_dims(bias, 0)
            m_new = gl.maximum(m_i, gl.max(s, axis=1))
            p = gl.exp2(s - gl.expand_dims(m_new, 1))
        else:
            m_new = gl.maximum(m_i, gl.max(s, axis=1) * qk_scale)
            p = gl.exp2(s * qk_scale - gl.expand_dims(m_new, 1))
        alpha = gl.exp2(m_i - m_new)
        l_i = l_i * alpha + gl.sum(p, axis=1)
        return p, alpha, m_new, l_i

    @gluon.jit
    def _load(desc, row, bar, dst, pred):
        mbarrier.expect(bar, desc.block_type.nbytes, pred=pred)
        _tma_load(desc, [row, 0], bar, dst, pred=pred)

    @gluon.jit
    def _gluon_attn_fwd(
        Q, K, V, O, LSE,
        stride_qb, stride_qh, stride_qm,
        stride_kb, stride_kh, stride_kn,
        stride_vb, stride_vh, stride_vn,
        stride_ob, stride_oh, stride_om,
        H, GROUP, Nq, Nk, qk_scale,
        HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, EVEN_N: gl.constexpr,
        num_warps: gl.constexpr,
    ):
        dtype: gl.constexpr = Q.dtype.element_ty
        start_m, bh, b, h, hk = flat_program(gl.program_id(0), Nq, H, 0, GROUP, BLOCK_M, False)

        smem: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
        q_desc = tma.make_tensor_descriptor(Q + b * stride_qb + h * stride_qh, [Nq, HEAD_DIM], [stride_qm, 1],
                                            [BLOCK_M, HEAD_DIM], smem)
        o_desc = tma.make_tensor_descriptor(O + b * stride_ob + h * stride_oh, [Nq, HEAD_DIM], [stride_om, 1],
                                            [BLOCK_M, HEAD_DIM], smem)
        k_desc = tma.make_tensor_descriptor(K + b * stride_kb + hk * stride_kh, [Nk, HEAD_DIM], [stride_kn, 1],
                                            [BLOCK_N, HEAD_DIM], smem)
        v_desc = tma.make_tensor_descriptor(V + b * stride_vb + hk * stride_vh, [Nk, HEAD_DIM], [stride_vn, 1],
                                            [BLOCK_N, HEAD_DIM], smem)
        q_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, HEAD_DIM], smem)
        k_smem = gl.allocate_shared_memory(dtype, [2, BLOCK_N, HEAD_DIM], smem)
        v_smem = gl.allocate_shared_memory(dtype, [2, BLOCK_N, HEAD_DIM], smem)
        q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        k_bar = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        v_bar = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        mbarrier.init(q_bar, count=1)
        for i in gl.static_range(2):
            mbarrier.init(k_bar.index(i), count=1)
            mbarrier.init(v_bar.index(i), count=1)

        # warps stacked along M: each warpgroup owns 64 query rows of S and of the output
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                           instr_shape=[16, BLOCK_N, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                           instr_shape=[16, HEAD_DIM, 16])
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
        row_o: gl.constexpr = gl.SliceLayout(1, o_layout)

        # prologue: Q, and K/V blocks 0 and 1 into the two stages
        n_blocks = gl.cdiv(Nk, BLOCK_N)
        _load(q_desc, start_m, q_bar, q_smem, True)
        for i in gl.static_range(2):
            _load(k_desc, i * BLOCK_N, k_bar.index(i), k_smem.index(i), i < n_blocks)
            _load(v_desc, i * BLOCK_N, v_bar.index(i), v_smem.index(i), i < n_blocks)
        m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, layout=row_s)
        l_i = gl.zeros([BLOCK_M], gl.float32, layout=row_s)
        # an in-flight wgmma accumulator from the start: the loop carries one (P V issued, waited next iteration)
        acc = warpgroup_mma_init(gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, layout=o_layout))
        s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=s_layout)

        mbarrier.wait(q_bar, 0)
        mbarrier.wait(k_bar.index(0), 0)
        s = warpgroup_mma(q_smem, k_smem.index(0).permute((1, 0)), s_zero, use_acc=False, is_async=True)
        s = warpgroup_mma_wait(num_outstanding=0, deps=(s,))
        _load(k_desc, 2 * BLOCK_N, k_bar.index(0), k_smem.index(0), 2 < n_blocks)  # stage 0 is free again

        # every block but the last: unmasked (the last holds the key tail, if any)
        for j in range(0, n_blocks - 1):
            stage = j % 2
            nstage = 1 - stage
            # 1. S_{j+1} = Q K_{j+1}^T on the tensor cores (P_{j-1} V_{j-1} may still run) ...
            mbarrier.wait(k_bar.index(nstage), ((j + 1) // 2) & 1)
            s_next = warpgroup_mma(q_smem, k_smem.index(nstage).permute((1, 0)), s_zero, use_acc=False,
                                   is_async=True)
            # 2. ... while the softmax of S_j runs on the CUDA cores
            p, alpha, m_i, l_i = _softmax_step(s, m_i, l_i, j * BLOCK_N, Nk, qk_scale, BLOCK_N, False, s_layout)
            p = gl.convert_layout(p.to(dtype), p_layout)
            # 3. drain: the rescale below reads the output accumulator, and ptxas serializes every wgmma
            #    (C7514) if a non-wgmma instruction reads accumulator registers while any wgmma is in flight.
            #    K stage nstage (S_{j+1}) and V stage nstage (P_{j-1} V_{j-1}) are then free for K_{j+3}, V_{j+1}
            acc, s = warpgroup_mma_wait(num_outstanding=0, deps=(acc, s_next))
            _load(k_desc, (j + 3) * BLOCK_N, k_bar.index(nstage), k_smem.index(nstage), j + 3 < n_blocks)
            _load(v_desc, (j + 1) * BLOCK_N, v_bar.index(nstage), v_smem.index(nstage), j >= 1)
            # 4. acc = alpha * acc + P_j V_j, left in flight under the next iteration's S and softmax
            acc = acc * gl.expand_dims(gl.convert_layout(alpha, row_o), 1)
            mbarrier.wait(v_bar.index(stage), (j // 2) & 1)
            acc = warpgroup_mma(p, v_smem.index(stage), acc, is_async=True)

        last = n_blocks - 1
        p, alpha, m_i, l_i = _softmax_step(s, m_i, l_i, last * BLOCK_N, Nk, qk_scale, BLOCK_N, not EVEN_N, s_layout)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
        acc = acc * gl.expand_dims(gl.convert_layout(alpha, row_o), 1)
        mbarrier.wait(v_bar.index(last % 2), (last // 2) & 1)
        acc = warpgroup_mma(gl.convert_layout(p.to(dtype), p_layout), v_smem.index(last % 2), acc, is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))

        # epilogue: O through Q's shared memory and a clipped TMA store, lse2 by rows
        lse2 = m_i + gl.log2(l_i)
        out = acc / gl.expand_dims(gl.convert_layout(l_i, row_o), 1)
        q_smem.store(out.to(dtype))
        fence_async_shared()
        _tma_store(o_desc, [start_m, 0], q_smem)
        offs_m = start_m + gl.arange(0, BLOCK_M, layout=row_s)
        gl.store(LSE + bh.to(gl.int64) * Nq + offs_m, lse2, mask=offs_m < Nq)
        tma.store_wait(pendings=0)
        mbarrier.invalidate(q_bar)
        for i in gl.static_range(2):
            mbarrier.invalidate(k_bar.index(i))
            mbarrier.invalidate(v_bar.index(i))


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec) -> bool:
    """The Gluon forward computes this call: Gluon present, not the interpreter (Gluon has none), non-causal,
    D 64/128, and everything ``attention_hopper.supports`` asks."""
    if not AVAILABLE or interpreting() or spec.causal or q.dim() != 4 or q.shape[-1] not in HEAD_DIMS:
        return False
    return KH.supports(q, k, v, spec)


def gluon_forward(q, k, v, spec, *, config: tuple | None = None):
    """Non-causal dense forward for the calls ``supports`` accepts (the signature matches ``hopper_forward``).
    Returns (out like q, lse2 (B, Hq, Nq) float32 base-2). Launched directly: a Gluon kernel is no ``wrap_triton``
    target, so embedattn.attention registers this launcher as an opaque op of its own (``gluon_attention_fwd``),
    which a compiled graph calls as it is."""
    if spec.causal:
        raise NotImplementedError("the Gluon forward is non-causal only")
    KH.use_allocator(q.device)
    B, H, Nq, D = q.shape
    HKV, Nk = k.shape[1], k.shape[2]
    bm, bn, w = config or CONFIGS[D]
    o = empty(B, H, Nq, D, dtype=q.dtype, device=q.device)
    lse = empty(B, H, Nq, dtype=torch.float32, device=q.device)
    s3 = KH._s3
    _gluon_attn_fwd[(triton.cdiv(Nq, bm) * B * H,)](
        q, k, v, o, lse, *s3(q), *s3(k), *s3(v), *s3(o), H, H // HKV, Nq, Nk, spec.scale * LOG2E,
        HEAD_DIM=D, BLOCK_M=bm, BLOCK_N=bn, EVEN_N=Nk % bn == 0, num_warps=w)
    return o, lse


__all__ = ["AVAILABLE", "CONFIGS", "HEAD_DIMS", "gluon_forward", "supports"]
