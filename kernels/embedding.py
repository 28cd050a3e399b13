"""Triton kernels for token embedding + positional add (forward) and its two gradients.

Kernels:

* ``_fwd_kernel``: one pass. A program owns a tile of BLOCK_T tokens x BLOCK_D features: it loads the
  BLOCK_T ids (and positions), checks them (``checked_ids``), gathers the rows as one 2-D vectorised
  load, computes ``w * scale + P`` in float32 (P = a learned row, a sinusoid computed in registers, or 0)
  and stores in the table dtype.
* ``_bwd_atomic_kernel``: table gradient by scatter-add with ``tl.atomic_add`` into a float32 buffer
  (the result for float32 tables, cast once for half ones). Fast, but the order in which colliding
  tokens add up depends on scheduling: not bitwise deterministic.
* ``_bwd_sorted_kernel``: the deterministic scatter: ids are sorted (stably) on the host side, and the
  first program of each run of equal ids sums the run's gradient rows in float32, 16 rows a step by a
  fixed pairwise tree, steps in run order (the same bits whatever the launch config), and writes the
  row once, in the table dtype. No float32 V x D buffer is needed.
* ``_bwd_pos_kernel``: learned-position gradient for the default positions (``arange(N) + offset``):
  a plain reduction over the batch, one program per tile of positions, no atomics, deterministic.

Bounds: every kernel that reads or writes a table row at an id passes the ids through ``checked_ids``
first. An id outside [0, rows) reads row 0 instead (never an out-of-bounds address) and its gradient is
dropped; with CHECK on, the program that holds it also clears an int32 "ok" flag that the caller set to
1 and checks with ``torch._assert_async`` after the launch (no host sync; see ``embedattn.embedding``).
``embedattn.kernels.negative_sampling`` uses the same helper.

Launchers check nothing; ``embedattn.embedding`` validates the arguments.
"""

from __future__ import annotations

import functools
import math
import struct

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from .. import configs
from ._utils import INTERPRETED, empty, interpreting, next_pow2

POS_NONE, POS_LEARNED, POS_SINUSOIDAL = 0, 1, 2

_LOG2_10000 = math.log2(10000.0)

# bytes of table rows one forward program gathers: at 4 warps, eight 16-byte loads in flight per thread
TILE_BYTES = 16384
# widest row chunk a program covers, in bytes: 128 threads x 16 bytes
CHUNK_BYTES = 2048
# the output is stored with an evict-first hint above this size (it cannot stay in L2 for its reader)
STREAM_BYTES = 32 << 20


# ----------------------------------------------------------------------------------------------------
# configs: the launchers' heuristic tiles, the candidates the autotuners and ``python -m benchmarks.tune``
# try, and the table key


@functools.cache
def _num_sms(device_index: int) -> int:
    try:
        return torch.cuda.get_device_properties(device_index).multi_processor_count
    except Exception:  # no device (fake tensors, tests): an H100's count
        return 132


def _tile(d: int, elem: int = 4, t: int | None = None, sms: int = 132) -> tuple[int, int]:
    """The fixed (BLOCK_T, BLOCK_D) when not autotuning: the forward's for ``elem``-byte table rows and
    ``t`` tokens; the backward kernels take it with ``elem=4`` (their float32 accumulators).

    GPU: BLOCK_D is the widest power-of-two chunk of at most CHUNK_BYTES that divides D when that chunk
    still gives every thread of a warp one 16-byte access (768 -> 256: no masked lanes), else D rounded
    up to a power of two, capped at CHUNK_BYTES; BLOCK_T fills TILE_BYTES (several rows in flight per
    program), halved while the grid would give fewer than 4 programs per SM (short batches, decoding).
    Interpreter: up to 256 features a chunk and ~4K elements a program, so D > 256 is split over several
    feature blocks and the multi-block path is what the CPU tests exercise."""
    if INTERPRETED:
        block_d = min(next_pow2(d), 256)
        return max(1, min(32, 4096 // block_d)), block_d
    vec = max(1, 16 // elem)
    cap = max(1, CHUNK_BYTES // elem)
    block_d = min(d & -d, cap) if d else 1
    if block_d < 32 * vec:
        block_d = min(next_pow2(d), cap)
    block_t = max(1, min(64, TILE_BYTES // (block_d * elem)))
    if t is not None:
        d_blocks = triton.cdiv(d, block_d)
        while block_t > 1 and triton.cdiv(t, block_t) * d_blocks < 4 * sms:
            block_t //= 2
    return block_t, block_d


def _t_class(t: int) -> int:
    """Coarse token-count class in the autotune key: a config tuned on a decoding step (a few tokens)
    is not reused for a 128k-token batch."""
    return 0 if t < 4096 else 1 if t < 32768 else 2


# tiles of 256 to 16K elements, 8 warps only for the larger ones (the forward, the atomic scatter, the positions)
CONFIGS = [triton.Config({"BLOCK_T": bt, "BLOCK_D": bd}, num_warps=w)
           for bd in (32, 64, 128, 256, 512, 1024, 2048) for bt in (1, 2, 4, 8, 16, 32) for w in (4, 8)
           if 256 <= bt * bd <= 16384 and (w == 4 or bt * bd >= 2048)]  # fmt: skip
# the sorted scatter: the feature block and warps only (its row step, SORTED_ROWS, sets the bits)
SORTED_CONFIGS = [triton.Config({"BLOCK_D": bd}, num_warps=w) for bd in (32, 64, 128, 256, 512, 1024) for w in (4, 8)
                  if w == 4 or bd >= 256]  # fmt: skip


def prune(configs, named_args, **kwargs):
    """Drop feature blocks wider than the row rounded up to a power of two (only masked lanes)."""
    d = named_args["D"]
    keep = [c for c in configs if c.kwargs["BLOCK_D"] <= max(32, next_pow2(d))]
    return keep or configs[:1]


def tuning_key(dtype: torch.dtype | str, d: int, tokens: int, pos_mode: int | None = None) -> configs.Key:
    """The table key of an embedding launch: table dtype, row width, token bucket (and the forward's position
    mode). The backward kernels' keys have no ``pos_mode``."""
    return configs.key(dtype=dtype, d=int(d), tokens=configs.bucket(tokens), pos_mode=pos_mode)


# ----------------------------------------------------------------------------------------------------
# helpers


@triton.jit
def checked_ids(ids, mask, size, ok_ptr, CHECK: tl.constexpr):
    """(safe ids, in-range mask): entries outside [0, size) become 0, a row always safe to read. With
    CHECK, each lane holding such an entry under ``mask`` clears the int32 flag at ``ok_ptr`` (a masked
    store: nothing is written, and nothing synchronises, while every id is good)."""
    bad = (ids < 0) | (ids >= size)
    if CHECK:
        tl.store(ok_ptr + tl.zeros_like(ids), tl.zeros_like(ids).to(tl.int32), mask=mask & bad)
    return tl.where(bad, 0, ids), bad == 0


@triton.jit
def _tile_coords(T, D, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's BLOCK_T token rows (int64: row offsets pass 2^31 elements) and BLOCK_D feature
    columns, with their masks."""
    rt = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    rd = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    rd = tl.max_contiguous(tl.multiple_of(rd, BLOCK_D), BLOCK_D)
    return rt, rd, rt < T, rd < D


# ----------------------------------------------------------------------------------------------------
# forward


@triton.jit
def _sinusoid(pos, rd, freq_hi, freq_lo):
    """(BLOCK_T, BLOCK_D) float32 sin/cos of the Vaswani encoding at int64 positions ``pos``."""
    # inv_freq = 10000^(-2i/D) = exp2((col - col % 2) * c), c = -log2(10000)/D passed as an fp32 hi + lo
    # pair. inv_freq (one per column) and the angle are float64: a float32 angle p * inv_freq is off by
    # p * 2^-24 rad (0.004 at p = 65536), and exp2.approx adds more; in float64 only the final float32
    # sine rounds (the per-element float64 work is ~6 ops)
    c = tl.cast(freq_hi, tl.float64) + tl.cast(freq_lo, tl.float64)
    inv_freq = tl.exp2((rd - rd % 2).to(tl.float64) * c)
    # odd columns: cos(a) = sin(a + pi/2), one sine per element. Constants are split into parts exact in
    # float32, so the result is the same whether a literal is materialised in float32 or float64
    odd = (rd % 2 == 1)[None, :]
    angle = pos.to(tl.float64)[:, None] * inv_freq[None, :]
    angle = tl.where(odd, (angle + 1.5703125) + 0.0004838267923332751, angle)  # + pi/2 - 2.6e-12
    # reduce to [-pi, pi] so that the float32 sine works on a small argument; 2*pi is split in three
    # float32-exact parts (k * 6.28125 is exact), good to ~1e-16 relative
    k = tl.floor(angle * 0.15915494309189535 + 0.5)
    r = (((angle - k * 6.28125) - k * 0.0019353071693331003) - k * 1.0253131677018246e-11).to(tl.float32)
    return tl.sin(r)


@triton.jit
def _fwd_kernel(
    ids_ptr, pos_ptr, w_ptr, p_ptr, out_ptr, ok_ptr,
    T, N, D, V, P, stride_w, stride_p, offset, scale, freq_hi, freq_lo, t_class,
    POS_MODE: tl.constexpr, EXPLICIT_POS: tl.constexpr, HAS_SCALE: tl.constexpr, CHECK: tl.constexpr,
    STREAM_OUT: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # t_class: unused here, a key of the autotuner
    rt, rd, mt, md = _tile_coords(T, D, BLOCK_T, BLOCK_D)
    m2 = mt[:, None] & md[None, :]
    ids, _ = checked_ids(tl.load(ids_ptr + rt, mask=mt, other=0).to(tl.int64), mt, V, ok_ptr, CHECK)
    x = tl.load(w_ptr + ids[:, None] * stride_w + rd[None, :], mask=m2, other=0.0).to(tl.float32)
    if HAS_SCALE:
        x = x * scale
    if POS_MODE != 0:
        if EXPLICIT_POS:
            pos = tl.load(pos_ptr + rt, mask=mt, other=0).to(tl.int64)
            if POS_MODE == 1:
                pos, _ = checked_ids(pos, mt, P, ok_ptr, CHECK)
        else:
            pos = rt % N + offset
        if POS_MODE == 1:
            # position rows are shared by every sequence of the batch: keep them in L2
            p = tl.load(p_ptr + pos[:, None] * stride_p + rd[None, :], mask=m2, other=0.0,
                        eviction_policy="evict_last")
            x = x + p.to(tl.float32)
        else:
            x = x + _sinusoid(pos, rd, freq_hi, freq_lo)
    out = out_ptr + rt[:, None] * D + rd[None, :]
    if STREAM_OUT:
        tl.store(out, x.to(out_ptr.dtype.element_ty), mask=m2, eviction_policy="evict_first")
    else:
        tl.store(out, x.to(out_ptr.dtype.element_ty), mask=m2)


_fwd_tuned = triton.autotune(
    CONFIGS, key=["D", "POS_MODE", "t_class"], prune_configs_by={"early_config_prune": prune}
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
    ok: torch.Tensor | None = None,
) -> torch.Tensor:
    """Return ``(T, D)`` rows ``weight[ids] * scale + P`` for flat ``ids`` (T,) in the table dtype.

    ``positions`` (flat, T) is used when given; otherwise token t sits at ``t % n + offset``.
    ``weight``/``pos_weight`` need unit stride along the feature dimension. An id (or explicit position
    into ``pos_weight``) out of range reads row 0; with ``ok`` (an int32 (1,) tensor set to 1) the kernel
    also sets ``ok`` to 0."""
    t, d = ids.numel(), weight.shape[1]
    out = empty(t, d, dtype=weight.dtype, device=weight.device)
    if t == 0 or d == 0:
        return out
    p = pos_weight if pos_weight is not None else weight
    pos = positions if positions is not None else ids
    coef = -_LOG2_10000 / d
    coef_hi = struct.unpack("f", struct.pack("f", coef))[0]  # rounded to float32 (host only, no tensor)
    args = (ids, pos, weight, p, out, ids if ok is None else ok, t, n, d, weight.shape[0], p.shape[0],
            weight.stride(0), p.stride(0), offset, float(scale), coef_hi, coef - coef_hi, _t_class(t))
    flags = dict(POS_MODE=pos_mode, EXPLICIT_POS=positions is not None, HAS_SCALE=scale != 1.0,
                 CHECK=ok is not None, STREAM_OUT=t * d * weight.element_size() > STREAM_BYTES)
    sms = _num_sms(weight.device.index or 0) if weight.is_cuda else 132
    bt, bd = _tile(d, weight.element_size(), t, sms)

    def launch(c):
        wrap_triton(_fwd_kernel)[(triton.cdiv(t, c["BLOCK_T"]), triton.cdiv(d, c["BLOCK_D"]))](*args, **flags, **c)

    def autotune():
        wrap_triton(_fwd_tuned)[lambda m: (triton.cdiv(t, m["BLOCK_T"]), triton.cdiv(d, m["BLOCK_D"]))](*args, **flags)
        return getattr(_fwd_tuned, "best_config", None)

    configs.run("embedding.fwd", tuning_key(weight.dtype, d, t, pos_mode),
                dict(BLOCK_T=bt, BLOCK_D=bd, num_warps=4), launch, autotune=autotune, device=weight.device)
    return out


# ----------------------------------------------------------------------------------------------------
# backward: token table (scatter-add)


@triton.jit
def _bwd_atomic_kernel(
    grad_ptr, ids_ptr, gw_ptr, T, D, V, scale, padding_idx,
    HAS_PAD: tl.constexpr, HAS_SCALE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rt, rd, mt, md = _tile_coords(T, D, BLOCK_T, BLOCK_D)
    ids, good = checked_ids(tl.load(ids_ptr + rt, mask=mt, other=0).to(tl.int64), mt, V, gw_ptr, False)
    mt = mt & good
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
    CONFIGS, key=["D"], reset_to_zero=["gw_ptr"], prune_configs_by={"early_config_prune": prune}
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
    grad_ptr, sorted_ptr, perm_ptr, end_ptr, slots_ptr, gw_ptr, D, V, stride_gw, scale, padding_idx,
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
    # a run of out-of-range ids (negative ones sort first, too large ones last) writes nothing
    head = ((i == 0) | (prev != row)) & (row >= 0) & (row < V)
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


_bwd_sorted_tuned = triton.autotune(
    SORTED_CONFIGS, key=["D"], prune_configs_by={"early_config_prune": prune}
)(_bwd_sorted_kernel)


# Half tables outside deterministic mode scatter with float32 atomics into a (rows, D) float32 buffer that
# is then cast (the sorted path writes the table dtype directly). The buffer costs ~10 bytes per table
# element (zero-fill 4, cast 4 + 2) against the sorted path's 2, so atomics are taken only where it is
# small: when it fits L2 with room (ATOMIC_HALF_MAX_BYTES) or the table has no more rows than there are
# tokens (then the sorted path's long runs, one program each, are what costs). Both constants await the
# GPU benchmark (benchmarks/embedding.py measures the two modes side by side).
ATOMIC_HALF_MAX_BYTES = 16 << 20
ATOMIC_HALF_ROWS_PER_TOKEN = 1


def scatter_mode(num_rows: int, t: int, d: int, dtype: torch.dtype, deterministic: bool) -> str:
    """"sorted" (bitwise reproducible) when ``deterministic``; otherwise "atomic" for float32 and, for
    half types, where the float32 buffer is small (see ATOMIC_HALF_MAX_BYTES), else "sorted"."""
    if deterministic:
        return "sorted"
    small = num_rows * d * 4 <= ATOMIC_HALF_MAX_BYTES or num_rows <= ATOMIC_HALF_ROWS_PER_TOKEN * t
    return "atomic" if dtype == torch.float32 or small else "sorted"


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

    ``grad`` is (T, D) contiguous, ``ids`` (T,) int. Rows never indexed (and ``padding_idx``) are 0; ids
    outside [0, num_rows) add nothing. Accumulation is in float32; the result has ``grad``'s dtype.

    ``scatter_mode`` picks the kernel. "atomic" adds into a zeroed (num_rows, D) float32 buffer, which is
    the result for float32 (one V x D allocation) and is cast for half types (peak 4 + 2 bytes x V x D).
    "sorted" (always when ``deterministic``) sorts the T ids (O(T) int64 buffers) and writes every touched
    row once, in the table dtype, into a zeroed (num_rows, D) result: bitwise reproducible, and no float32
    copy. Its grid covers all T sorted slots (no host sync; non-head programs exit at once). ``heads_only``
    (default: under the interpreter) launches one program per run instead, which needs the run count on
    the host: free on CPU, where the interpreter's per-program cost dominates.
    """
    t, d = grad.shape
    dev = grad.device
    has_pad = padding_idx is not None
    pad = int(padding_idx) if has_pad else 0
    flags = dict(HAS_PAD=has_pad, HAS_SCALE=scale != 1.0)
    if scatter_mode(num_rows, t, d, grad.dtype, deterministic) == "atomic":
        gw = torch.zeros(num_rows, d, dtype=torch.float32, device=dev)
        if t == 0 or d == 0:
            return gw.to(grad.dtype)
        args = (grad, ids, gw, t, d, num_rows, float(scale), pad)
        bt, bd = _tile(d, 4)  # sized as the float32 buffer it adds into

        def launch_atomic(c):
            grid = (triton.cdiv(t, c["BLOCK_T"]), triton.cdiv(d, c["BLOCK_D"]))
            wrap_triton(_bwd_atomic_kernel)[grid](*args, **flags, **c)

        def autotune_atomic():
            grid = lambda m: (triton.cdiv(t, m["BLOCK_T"]), triton.cdiv(d, m["BLOCK_D"]))
            wrap_triton(_bwd_atomic_tuned)[grid](*args, **flags)
            return getattr(_bwd_atomic_tuned, "best_config", None)

        configs.run("embedding.bwd_atomic", tuning_key(grad.dtype, d, t),
                    dict(BLOCK_T=bt, BLOCK_D=bd, num_warps=4), launch_atomic, autotune=autotune_atomic, device=dev)
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
    args = (grad, sorted_ids, perm, end, slots, gw, d, num_rows, gw.stride(0), float(scale), pad)
    flags.update(SLOTS=heads_only, ROWS=SORTED_ROWS)
    bd = min(_tile(d, 4)[1], 256)  # the (ROWS, BLOCK_D) float32 step: 32 registers a thread at 4 warps

    def launch_sorted(c):
        wrap_triton(_bwd_sorted_kernel)[(n_prog, triton.cdiv(d, c["BLOCK_D"]))](*args, **flags, **c)

    def autotune_sorted():
        wrap_triton(_bwd_sorted_tuned)[lambda m: (n_prog, triton.cdiv(d, m["BLOCK_D"]))](*args, **flags)
        return getattr(_bwd_sorted_tuned, "best_config", None)

    configs.run("embedding.bwd_sorted", tuning_key(grad.dtype, d, t), dict(BLOCK_D=bd, num_warps=4),
                launch_sorted, autotune=autotune_sorted, device=dev)
    return gw


# ----------------------------------------------------------------------------------------------------
# backward: learned positions at the default positions (a reduction over the batch)


@triton.jit
def _bwd_pos_kernel(grad_ptr, gp_ptr, B, N, D, stride_b, offset, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    rn, rd, mn, md = _tile_coords(N, D, BLOCK_T, BLOCK_D)
    m2 = mn[:, None] & md[None, :]
    ptrs = grad_ptr + rn[:, None] * D + rd[None, :]
    acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    for _b in range(B):
        acc += tl.load(ptrs, mask=m2, other=0.0).to(tl.float32)
        ptrs += stride_b  # N * D, computed on the host (int64 when it needs to be)
    tl.store(gp_ptr + (rn[:, None] + offset) * D + rd[None, :], acc.to(gp_ptr.dtype.element_ty), mask=m2)


_bwd_pos_tuned = triton.autotune(CONFIGS, key=["D"], prune_configs_by={"early_config_prune": prune})(
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
    bt, bd = _tile(d, 4)  # sized as the float32 accumulator

    def launch(c):
        wrap_triton(_bwd_pos_kernel)[(triton.cdiv(n, c["BLOCK_T"]), triton.cdiv(d, c["BLOCK_D"]))](*args, **c)

    def autotune():
        wrap_triton(_bwd_pos_tuned)[lambda m: (triton.cdiv(n, m["BLOCK_T"]), triton.cdiv(d, m["BLOCK_D"]))](*args)
        return getattr(_bwd_pos_tuned, "best_config", None)

    configs.run("embedding.bwd_pos", tuning_key(grad.dtype, d, t), dict(BLOCK_T=bt, BLOCK_D=bd,
                num_warps=4), launch, autotune=autotune, device=grad.device)
    return gp
