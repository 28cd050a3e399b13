"""Triton kernels for token embedding + positional add (forward) and its two gradients.

Kernels:

* ``_fwd_kernel``: one pass. A program owns a tile of BLOCK_T tokens x BLOCK_D features: it loads the
  BLOCK_T ids (and positions), gathers the rows as one 2-D vectorised load, computes
  ``w * scale + P`` in float32 (P = a learned row, a sinusoid computed in registers, or 0) and stores
  in the table dtype.
* ``_bwd_atomic_kernel``: token-table gradient by scatter-add with ``tl.atomic_add`` into a float32
  buffer. Fast, but the order in which colliding tokens add up depends on scheduling: not bitwise
  deterministic.
* ``_bwd_sorted_kernel``: the deterministic scatter: ids are sorted (stably) on the host side, and the
  first program of each run of equal ids sums the run's gradient rows in float32, 16 rows a step by a
  fixed pairwise tree, steps in run order (the same bits whatever the launch config), and writes the
  row once, in the table dtype. No float32 V x D buffer is needed.
* ``_bwd_pos_kernel``: learned-position gradient for the default positions (``arange(N) + offset``):
  a plain reduction over the batch, one program per tile of positions, no atomics, deterministic.

Launchers check nothing; ``embedattn.embedding`` validates the arguments.
"""

from __future__ import annotations

import math
import struct

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ._utils import autotune_enabled, empty, interpreting, next_pow2

POS_NONE, POS_LEARNED, POS_SINUSOIDAL = 0, 1, 2

_LOG2_10000 = math.log2(10000.0)



def _tile(d: int) -> tuple[int, int]:
    """Fixed (BLOCK_T, BLOCK_D) heuristic: up to 256 features a row-chunk, ~4K elements a program.

    Under the interpreter the same rule keeps D > 256 split over several feature blocks, so the
    multi-block path is what the CPU tests exercise."""
    block_d = min(next_pow2(d), 256)
    block_t = max(1, min(32, 4096 // block_d))
    return block_t, block_d


def _configs():
    """Autotune space: tiles of 256 to 16K elements, 8 warps only for the larger ones."""
    out = []
    for bd in (32, 64, 128, 256, 512, 1024):
        for bt in (1, 2, 4, 8, 16, 32):
            if not 256 <= bt * bd <= 16384:
                continue
            for w in (4, 8):
                if w == 8 and bt * bd < 2048:
                    continue
                out.append(triton.Config({"BLOCK_T": bt, "BLOCK_D": bd}, num_warps=w))
    return out


def _prune(configs, named_args, **kwargs):
    """Drop feature blocks wider than the row rounded up to a power of two (only masked lanes)."""
    d = named_args["D"]
    keep = [c for c in configs if c.kwargs["BLOCK_D"] <= max(32, next_pow2(d))]
    return keep or configs[:1]


# ----------------------------------------------------------------------------------------------------
# forward


@triton.jit
def _fwd_kernel(
    ids_ptr, pos_ptr, w_ptr, p_ptr, out_ptr,
    T, N, D, stride_w, stride_p, offset, scale, freq_hi, freq_lo,
    POS_MODE: tl.constexpr, EXPLICIT_POS: tl.constexpr, HAS_SCALE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_d = tl.program_id(1)
    rt = pid_t.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    rd = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mt = rt < T
    md = rd < D
    m2 = mt[:, None] & md[None, :]
    ids = tl.load(ids_ptr + rt, mask=mt, other=0).to(tl.int64)
    x = tl.load(w_ptr + ids[:, None] * stride_w + rd[None, :], mask=m2, other=0.0).to(tl.float32)
    if HAS_SCALE:
        x = x * scale
    if POS_MODE != 0:
        if EXPLICIT_POS:
            pos = tl.load(pos_ptr + rt, mask=mt, other=0).to(tl.int64)
        else:
            pos = rt % N + offset
        if POS_MODE == 1:
            p = tl.load(p_ptr + pos[:, None] * stride_p + rd[None, :], mask=m2, other=0.0)
            x = x + p.to(tl.float32)
        else:
            # inv_freq = 10000^(-2i/D) = exp2((col - col % 2) * c), c = -log2(10000)/D passed as an fp32
            # hi + lo pair. inv_freq (one per column) and the angle are float64: a float32 angle
            # p * inv_freq is off by p * 2^-24 rad (0.004 at p = 65536), and exp2.approx adds more;
            # in float64 only the final float32 sine rounds (the per-element float64 work is ~6 ops)
            c = tl.cast(freq_hi, tl.float64) + tl.cast(freq_lo, tl.float64)
            inv_freq = tl.exp2((rd - rd % 2).to(tl.float64) * c)
            # odd columns: cos(a) = sin(a + pi/2), one sine per element. Constants are split into parts
            # exact in float32, so the result is the same whether a literal is materialised in float32
            # or float64
            odd = (rd % 2 == 1)[None, :]
            angle = pos.to(tl.float64)[:, None] * inv_freq[None, :]
            angle = tl.where(odd, (angle + 1.5703125) + 0.0004838267923332751, angle)  # + pi/2 - 2.6e-12
            # reduce to [-pi, pi] so that the float32 sine works on a small argument; 2*pi is split in
            # three float32-exact parts (k * 6.28125 is exact), good to ~1e-16 relative
            k = tl.floor(angle * 0.15915494309189535 + 0.5)
            r = (((angle - k * 6.28125) - k * 0.0019353071693331003) - k * 1.0253131677018246e-11).to(tl.float32)
            x = x + tl.sin(r)
    tl.store(out_ptr + rt[:, None] * D + rd[None, :], x.to(out_ptr.dtype.element_ty), mask=m2)


_fwd_tuned = triton.autotune(
    _configs(), key=["D", "POS_MODE"], prune_configs_by={"early_config_prune": _prune}
)(_fwd_kernel)


def embedding_forward(
    ids: torch.Tensor,
    weight: torch.Tensor,
    pos_weight: torch.Tensor | None,
    positions: torch.Tensor | None,
    *,
    n: int,
    pos_mode: int,
    scale: float,
    offset: int,
) -> torch.Tensor:
    """Return ``(T, D)`` rows ``weight[ids] * scale + P`` for flat ``ids`` (T,) in the table dtype.

    ``positions`` (flat, T) is used when given; otherwise token t sits at ``t % n + offset``.
    ``weight``/``pos_weight`` need unit stride along the feature dimension."""
    t, d = ids.numel(), weight.shape[1]
    out = empty(t, d, dtype=weight.dtype, device=weight.device)
    if t == 0 or d == 0:
        return out
    p = pos_weight if pos_weight is not None else weight
    pos = positions if positions is not None else ids
    coef = -_LOG2_10000 / d
    coef_hi = struct.unpack("f", struct.pack("f", coef))[0]  # rounded to float32 (host only, no tensor)
    args = (ids, pos, weight, p, out, t, n, d, weight.stride(0), p.stride(0), offset, float(scale), coef_hi,
            coef - coef_hi)
    flags = dict(POS_MODE=pos_mode, EXPLICIT_POS=positions is not None, HAS_SCALE=scale != 1.0)
    if autotune_enabled():
        grid = lambda meta: (triton.cdiv(t, meta["BLOCK_T"]), triton.cdiv(d, meta["BLOCK_D"]))
        wrap_triton(_fwd_tuned)[grid](*args, **flags)
    else:
        bt, bd = _tile(d)
        wrap_triton(_fwd_kernel)[(triton.cdiv(t, bt), triton.cdiv(d, bd))](*args, **flags, BLOCK_T=bt, BLOCK_D=bd,
                                                                  num_warps=4)
    return out


# ----------------------------------------------------------------------------------------------------
# backward: token table (scatter-add)


@triton.jit
def _bwd_atomic_kernel(
    grad_ptr, ids_ptr, gw_ptr, T, D, scale, padding_idx,
    HAS_PAD: tl.constexpr, HAS_SCALE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_d = tl.program_id(1)
    rt = pid_t.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    rd = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mt = rt < T
    md = rd < D
    ids = tl.load(ids_ptr + rt, mask=mt, other=0).to(tl.int64)
    if HAS_PAD:
        mt = mt & (ids != padding_idx)
    m2 = mt[:, None] & md[None, :]
    g = tl.load(grad_ptr + rt[:, None] * D + rd[None, :], mask=m2, other=0.0).to(tl.float32)
    if HAS_SCALE:
        g = g * scale
    # relaxed: the adds need atomicity only, no ordering with other memory operations
    tl.atomic_add(gw_ptr + ids[:, None] * D + rd[None, :], g, mask=m2, sem="relaxed")


# autotuning runs the kernel several times: the accumulation buffer is re-zeroed between trials
_bwd_atomic_tuned = triton.autotune(
    _configs(), key=["D"], reset_to_zero=["gw_ptr"], prune_configs_by={"early_config_prune": _prune}
)(_bwd_atomic_kernel)


# rows summed per step of the sorted scatter. A fixed constant, not a tuned parameter: the float32 bits
# of a run's sum depend on it (and on nothing else of the launch)
SORTED_ROWS = 16


@triton.jit
def _pair_rows(x, H: tl.constexpr, BLOCK_D: tl.constexpr):
    """(2H, BLOCK_D) -> (H, BLOCK_D) with row r = x[2r] + x[2r + 1]: elementwise adds in a fixed pairing,
    so the result does not depend on the register layout (the order of a tl.sum's adds does)."""
    a, b = tl.split(tl.permute(tl.reshape(x, [H, 2, BLOCK_D]), [0, 2, 1]))
    return a + b


@triton.jit
def _bwd_sorted_kernel(
    grad_ptr, sorted_ptr, perm_ptr, end_ptr, slots_ptr, gw_ptr, D, stride_gw, scale, padding_idx,
    HAS_PAD: tl.constexpr, HAS_SCALE: tl.constexpr, SLOTS: tl.constexpr, ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # program i looks at sorted slot i (or slots[i], a list of run heads); only the first slot of
    # each run of equal ids does work
    if SLOTS:
        i = tl.load(slots_ptr + tl.program_id(0)).to(tl.int64)
    else:
        i = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    rd = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    md = rd < D
    row = tl.load(sorted_ptr + i).to(tl.int64)
    prev = tl.load(sorted_ptr + i - 1, mask=i > 0, other=-1).to(tl.int64)
    head = (i == 0) | (prev != row)
    if HAS_PAD:
        head = head & (row != padding_idx)
    if head:
        end = tl.load(end_ptr + i)
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        # ROWS (16) rows a step, summed by a fixed pairwise tree, then added to acc in run order: every
        # add is elementwise in a fixed order, so the bits do not depend on BLOCK_D or num_warps. A
        # tl.sum over the tile would reduce in an order set by the layout, and an autotuned config
        # (picked by timing, per process) would change the result from one run to the next.
        # Masked rows are +0.0; acc starts at +0.0, so they never change it.
        tl.static_assert(ROWS == 16, "the tree below has four levels")
        for s in range(i, end, ROWS):
            rt = s + tl.arange(0, ROWS)
            mt = rt < end
            tok = tl.load(perm_ptr + rt, mask=mt, other=0).to(tl.int64)
            g = tl.load(grad_ptr + tok[:, None] * D + rd[None, :], mask=mt[:, None] & md[None, :], other=0.0)
            g = _pair_rows(g.to(tl.float32), ROWS // 2, BLOCK_D)
            g = _pair_rows(g, ROWS // 4, BLOCK_D)
            g = _pair_rows(g, ROWS // 8, BLOCK_D)
            g = _pair_rows(g, ROWS // 16, BLOCK_D)
            acc += tl.reshape(g, [BLOCK_D])
        if HAS_SCALE:
            acc = acc * scale
        tl.store(gw_ptr + row * stride_gw + rd, acc.to(gw_ptr.dtype.element_ty), mask=md)


def _sorted_configs():
    """The feature block and warps only: the row step is SORTED_ROWS (it sets the bits)."""
    return [triton.Config({"BLOCK_D": bd}, num_warps=w) for bd in (32, 64, 128, 256, 512, 1024) for w in (4, 8)
            if w == 4 or bd >= 256]


_bwd_sorted_tuned = triton.autotune(
    _sorted_configs(), key=["D"], prune_configs_by={"early_config_prune": _prune}
)(_bwd_sorted_kernel)


def scatter_grad(
    grad: torch.Tensor,
    ids: torch.Tensor,
    num_rows: int,
    *,
    scale: float = 1.0,
    padding_idx: int | None = None,
    deterministic: bool = False,
    heads_only: bool | None = None,
) -> torch.Tensor:
    """Gradient of a gathered table: ``G[v] = scale * sum_{t: ids[t] == v} grad[t]`` as (num_rows, D).

    ``grad`` is (T, D) contiguous, ``ids`` (T,) int. Rows never indexed (and ``padding_idx``) are 0.
    Accumulation is in float32; the result has ``grad``'s dtype.

    Buffers: ``deterministic=False`` adds with atomics into a zeroed (num_rows, D) float32 buffer, which is
    the result for float32 (one V x D allocation) and is cast for half types (peak 4 + 2 bytes x V x D).
    ``deterministic=True`` sorts the T ids (O(T) int64 buffers) and writes every touched row once, in
    the table dtype, into a zeroed (num_rows, D) result: bitwise reproducible, and no float32 copy.
    Its grid covers all T sorted slots (no host sync; non-head programs exit at once). ``heads_only``
    (default: under the interpreter) launches one program per run instead, which needs the run
    count on the host: free on CPU, where the interpreter's per-program cost dominates.
    """
    t, d = grad.shape
    dev = grad.device
    has_pad = padding_idx is not None
    pad = int(padding_idx) if has_pad else 0
    flags = dict(HAS_PAD=has_pad, HAS_SCALE=scale != 1.0)
    if not deterministic:
        gw = torch.zeros(num_rows, d, dtype=torch.float32, device=dev)
        if t == 0 or d == 0:
            return gw.to(grad.dtype)
        args = (grad, ids, gw, t, d, float(scale), pad)
        if autotune_enabled():
            grid = lambda meta: (triton.cdiv(t, meta["BLOCK_T"]), triton.cdiv(d, meta["BLOCK_D"]))
            wrap_triton(_bwd_atomic_tuned)[grid](*args, **flags)
        else:
            bt, bd = _tile(d)
            wrap_triton(_bwd_atomic_kernel)[(triton.cdiv(t, bt), triton.cdiv(d, bd))](*args, **flags, BLOCK_T=bt,
                                                                         BLOCK_D=bd, num_warps=4)
        return gw if grad.dtype == torch.float32 else gw.to(grad.dtype)

    gw = torch.zeros(num_rows, d, dtype=grad.dtype, device=dev)
    if t == 0 or d == 0:
        return gw
    sorted_ids, perm = torch.sort(ids, stable=True)
    # end of the run that each sorted slot belongs to (no host sync: the grid covers every slot)
    end = torch.searchsorted(sorted_ids, sorted_ids, right=True)
    if heads_only is None:
        heads_only = interpreting()
    slots, n_prog = end, t  # slots unused unless heads_only
    if heads_only:
        first = torch.ones_like(sorted_ids, dtype=torch.bool)
        first[1:] = sorted_ids[1:] != sorted_ids[:-1]
        slots = torch.nonzero(first).squeeze(1)
        n_prog = slots.numel()
    args = (grad, sorted_ids, perm, end, slots, gw, d, gw.stride(0), float(scale), pad)
    flags.update(SLOTS=heads_only, ROWS=SORTED_ROWS)
    if autotune_enabled():
        grid = lambda meta: (n_prog, triton.cdiv(d, meta["BLOCK_D"]))
        wrap_triton(_bwd_sorted_tuned)[grid](*args, **flags)
    else:
        _, bd = _tile(d)
        wrap_triton(_bwd_sorted_kernel)[(n_prog, triton.cdiv(d, bd))](*args, **flags, BLOCK_D=bd, num_warps=4)
    return gw


# ----------------------------------------------------------------------------------------------------
# backward: learned positions at the default positions (a reduction over the batch)


@triton.jit
def _bwd_pos_kernel(grad_ptr, gp_ptr, B, N, D, stride_b, offset, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_d = tl.program_id(1)
    rn = pid_n * BLOCK_T + tl.arange(0, BLOCK_T)
    rd = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    m2 = (rn < N)[:, None] & (rd < D)[None, :]
    ptrs = grad_ptr + rn[:, None].to(tl.int64) * D + rd[None, :]
    acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    for _b in range(B):
        acc += tl.load(ptrs, mask=m2, other=0.0).to(tl.float32)
        ptrs += stride_b  # N * D, computed on the host (int64 when it needs to be)
    tl.store(gp_ptr + (rn[:, None] + offset).to(tl.int64) * D + rd[None, :],
             acc.to(gp_ptr.dtype.element_ty), mask=m2)


_bwd_pos_tuned = triton.autotune(_configs(), key=["D"], prune_configs_by={"early_config_prune": _prune})(
    _bwd_pos_kernel
)


def positional_grad(grad: torch.Tensor, num_positions: int, *, n: int, offset: int) -> torch.Tensor:
    """Gradient of a learned position table read at ``arange(n) + offset``: grad (B*n, D) summed over B.

    Deterministic (fixed summation order), float32 accumulation, result (num_positions, D) in grad's dtype.
    Only rows outside ``[offset, offset + n)`` are zero-filled; the rest are written by the kernel."""
    t, d = grad.shape
    b = t // n if n else 0
    gp = empty(num_positions, d, dtype=grad.dtype, device=grad.device)
    gp[:offset].zero_()
    gp[offset + n:].zero_()
    if n == 0 or d == 0:
        return gp
    args = (grad, gp, b, n, d, n * d, offset)
    if autotune_enabled():
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_T"]), triton.cdiv(d, meta["BLOCK_D"]))
        wrap_triton(_bwd_pos_tuned)[grid](*args)
    else:
        bt, bd = _tile(d)
        grid = (triton.cdiv(n, bt), triton.cdiv(d, bd))
        wrap_triton(_bwd_pos_kernel)[grid](*args, BLOCK_T=bt, BLOCK_D=bd, num_warps=4)
    return gp
