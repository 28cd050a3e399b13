"""Skip-gram negative-sampling kernels: loss forward, table-gradient backward, fused SGD step.

One program handles a tile of BLOCK_B pairs. For each pair, column 0 of a (BLOCK_B, BLOCK_K) id tile is
the positive (context) row of ``out_weight`` and columns 1..K are the negatives; the gathered rows live
in registers as a (BLOCK_B, BLOCK_K, BLOCK_D) tile, D is walked in BLOCK_D chunks, and nothing of size
B x K x D is ever written to memory. The forward saves one coefficient per (pair, column),
d loss_b / d score_bk, so the backward needs no re-derivation of the scores. Gradients (and the fused
step's updates) are scattered with atomic adds: ids collide constantly in word2vec (frequent words),
so plain stores would drop updates. The backward adds into fp32 (fp64 for fp64 tables) accumulators;
the fused step adds straight into the tables, in their dtype (16-bit tables round every update; bf16
atomics are native from sm_90 only). The adds are relaxed: nothing is ordered by them, only their sum
matters, and the default acq_rel semantics order every one of them on a GPU.

Bounds: the loss kernels pass every id through ``embedattn.kernels.embedding.checked_ids``: an id outside
[0, V) reads row 0 (never an out-of-bounds address), the forward can clear an "ok" flag for the caller's
``torch._assert_async``, and the backward drops the gradient of a pair whose center is bad and of every
bad context or negative. Row offsets (pair index x stride) are int64: they pass 2^31 elements.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from .. import configs
from ._utils import empty, interpreting, next_pow2
from .embedding import checked_ids


@triton.jit
def _ids_tile(context_ptr, neg_ptr, rows, cols, rmask, m2, K, s_x, s_nb, s_nk):
    """(BLOCK_B, BLOCK_K) int64 ids: column 0 the positive, columns 1..K the negatives."""
    x = tl.load(context_ptr + rows * s_x, mask=rmask, other=0).to(tl.int64)
    n = tl.load(neg_ptr + rows[:, None] * s_nb + (cols[None, :] - 1) * s_nk,
                mask=m2 & (cols[None, :] >= 1), other=0).to(tl.int64)
    return tl.where(cols[None, :] == 0, x[:, None], n)


@triton.jit
def _scores(center, ids, w_in_ptr, w_out_ptr, rmask, m2, D, s_in, s_out,
            BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr):
    """score[b, k] = u[ids[b, k]] . v[center[b]], accumulated over D chunks in the ACC dtype."""
    score = tl.zeros((BLOCK_B, BLOCK_K), dtype=ACC)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        dmask = dd < D
        v = tl.load(w_in_ptr + center[:, None] * s_in + dd[None, :],
                    mask=rmask[:, None] & dmask[None, :], other=0.0).to(ACC)
        u = tl.load(w_out_ptr + ids[:, :, None] * s_out + dd[None, None, :],
                    mask=m2[:, :, None] & dmask[None, None, :], other=0.0).to(ACC)
        score += tl.sum(u * v[:, None, :], axis=2)
    return score


@triton.jit
def _nll_and_coef(score, cols, m2):
    """Per-column -log σ(±score) (stable for any magnitude) and its derivative wrt the score."""
    z = tl.where(cols[None, :] == 0, score, -score)  # the positive wants score > 0, negatives < 0
    e = tl.exp(-tl.abs(z))  # in (0, 1]: never overflows
    # -log σ(z) = max(-z, 0) + log(1 + exp(-|z|))
    nll = tl.where(m2, tl.maximum(-z, 0.0) + tl.log(1.0 + e), 0.0)
    sig_negz = tl.where(z >= 0, e / (1.0 + e), 1.0 / (1.0 + e))  # σ(-z)
    # d nll / d score = -σ(-z) * sign
    coef = tl.where(m2, tl.where(cols[None, :] == 0, -sig_negz, sig_negz), 0.0)
    return nll, coef


@triton.jit
def _pair_tile(center_ptr, context_ptr, neg_ptr, ok_ptr, B, K, V, s_c, s_x, s_nb, s_nk,
               CHECK: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
    """This program's BLOCK_B pairs: rows (int64), columns, their masks, the checked center ids (BLOCK_B,)
    and (BLOCK_B, BLOCK_K) output-table ids with their in-range masks (see ``checked_ids``)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.arange(0, BLOCK_K)
    rmask = rows < B
    m2 = rmask[:, None] & (cols[None, :] <= K)
    center = tl.load(center_ptr + rows * s_c, mask=rmask, other=0).to(tl.int64)
    center, good_c = checked_ids(center, rmask, V, ok_ptr, CHECK)
    ids = _ids_tile(context_ptr, neg_ptr, rows, cols, rmask, m2, K, s_x, s_nb, s_nk)
    ids, good = checked_ids(ids, m2, V, ok_ptr, CHECK)
    return rows, cols, rmask, m2, center, good_c, ids, good


@triton.jit
def _fwd_kernel(center_ptr, context_ptr, neg_ptr, w_in_ptr, w_out_ptr, loss_ptr, coef_ptr, ok_ptr,
                B, K, D, V, s_c, s_x, s_nb, s_nk, s_in, s_out,
                CHECK: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    ACC: tl.constexpr = loss_ptr.dtype.element_ty
    rows, cols, rmask, m2, center, _, ids, _ = _pair_tile(center_ptr, context_ptr, neg_ptr, ok_ptr, B, K, V, s_c,
                                                          s_x, s_nb, s_nk, CHECK, BLOCK_B, BLOCK_K)
    # a bad id reads row 0: its loss is finite and meaningless (the check reports it)
    score = _scores(center, ids, w_in_ptr, w_out_ptr, rmask, m2, D, s_in, s_out,
                    BLOCK_B, BLOCK_K, BLOCK_D, ACC)
    nll, coef = _nll_and_coef(score, cols, m2)
    tl.store(loss_ptr + rows, tl.sum(nll, axis=1), mask=rmask)
    tl.store(coef_ptr + rows[:, None] * (K + 1) + cols[None, :], coef, mask=m2)


@triton.jit
def _bwd_kernel(center_ptr, context_ptr, neg_ptr, dst_in_ptr, dst_out_ptr, w_in_ptr, w_out_ptr,
                coef_ptr, grad_ptr, gin_ptr, gout_ptr,
                B, K, D, V, s_c, s_x, s_nb, s_nk, s_in, s_out, s_g,
                SPARSE: tl.constexpr, NEED_IN: tl.constexpr, NEED_OUT: tl.constexpr,
                BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    ACC: tl.constexpr = coef_ptr.dtype.element_ty
    rows, cols, rmask, m2, center, good_c, ids, good = _pair_tile(center_ptr, context_ptr, neg_ptr, gin_ptr, B, K,
                                                                  V, s_c, s_x, s_nb, s_nk, False, BLOCK_B, BLOCK_K)
    # bad ids add nothing: a bad center drops its pair, a bad context or negative its column
    rmask = rmask & good_c
    m2 = m2 & good & good_c[:, None]
    if SPARSE:  # gradients go to compact rows (positions among the unique ids), not to the ids
        dst_in = tl.load(dst_in_ptr + rows, mask=rmask, other=0).to(tl.int64)
        dst_out = tl.load(dst_out_ptr + rows[:, None] * (K + 1) + cols[None, :], mask=m2,
                          other=0).to(tl.int64)
    else:
        dst_in = center
        dst_out = ids
    g = tl.load(grad_ptr + rows * s_g, mask=rmask, other=0.0).to(ACC)
    coef = tl.load(coef_ptr + rows[:, None] * (K + 1) + cols[None, :], mask=m2, other=0.0) * g[:, None]
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        dmask = dd < D
        vmask = rmask[:, None] & dmask[None, :]
        umask = m2[:, :, None] & dmask[None, None, :]
        if NEED_IN:
            u = tl.load(w_out_ptr + ids[:, :, None] * s_out + dd[None, None, :], mask=umask,
                        other=0.0).to(ACC)
            gv = tl.sum(coef[:, :, None] * u, axis=1)
            tl.atomic_add(gin_ptr + dst_in[:, None] * D + dd[None, :], gv, mask=vmask, sem="relaxed")
        if NEED_OUT:
            v = tl.load(w_in_ptr + center[:, None] * s_in + dd[None, :], mask=vmask, other=0.0).to(ACC)
            gu = coef[:, :, None] * v[:, None, :]
            tl.atomic_add(gout_ptr + dst_out[:, :, None] * D + dd[None, None, :], gu, mask=umask,
                          sem="relaxed")


@triton.jit
def _sgns_tile(rows, rmask, inp_ptr, tgt_ptr, neg_ptr, w_in_ptr, w_out_ptr, loss_ptr, lr,
               K, D, s_c, s_x, s_nb, s_nk, s_in, s_out,
               BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, CACHE: tl.constexpr):
    """The fused SGD update of the pairs ``rows`` (one BLOCK_B tile). CACHE: the cache modifier of
    the table loads ("" default; ".cg" reads L2, never a stale L1 line of a row moved since)."""
    ACC: tl.constexpr = loss_ptr.dtype.element_ty
    cols = tl.arange(0, BLOCK_K)
    m2 = rmask[:, None] & (cols[None, :] <= K)
    center = tl.load(inp_ptr + rows * s_c, mask=rmask, other=0).to(tl.int64)
    ids = _ids_tile(tgt_ptr, neg_ptr, rows, cols, rmask, m2, K, s_x, s_nb, s_nk)
    # like word2vec.c, a negative drawn equal to the pair's target is skipped
    tgt = tl.load(tgt_ptr + rows * s_x, mask=rmask, other=0).to(tl.int64)
    m2 = m2 & ((cols[None, :] == 0) | (ids != tgt[:, None]))
    score = tl.zeros((BLOCK_B, BLOCK_K), dtype=ACC)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        dmask = dd < D
        v = tl.load(w_in_ptr + center[:, None] * s_in + dd[None, :], mask=rmask[:, None] & dmask[None, :],
                    other=0.0, cache_modifier=CACHE).to(ACC)
        u = tl.load(w_out_ptr + ids[:, :, None] * s_out + dd[None, None, :],
                    mask=m2[:, :, None] & dmask[None, None, :], other=0.0, cache_modifier=CACHE).to(ACC)
        score += tl.sum(u * v[:, None, :], axis=2)
    nll, coef = _nll_and_coef(score, cols, m2)
    tl.store(loss_ptr + rows, tl.sum(nll, axis=1), mask=rmask)
    # word2vec.c's g = (label - σ(score)) * alpha is exactly -lr * d nll / d score
    step = -coef * lr
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        dmask = dd < D
        vmask = rmask[:, None] & dmask[None, :]
        umask = m2[:, :, None] & dmask[None, None, :]
        # Hogwild like word2vec.c: rows are re-read here, possibly already moved by other programs
        v = tl.load(w_in_ptr + center[:, None] * s_in + dd[None, :], mask=vmask, other=0.0,
                    cache_modifier=CACHE).to(ACC)
        u = tl.load(w_out_ptr + ids[:, :, None] * s_out + dd[None, None, :], mask=umask, other=0.0,
                    cache_modifier=CACHE).to(ACC)
        dv = tl.sum(step[:, :, None] * u, axis=1)
        du = step[:, :, None] * v[:, None, :]
        tl.atomic_add(w_out_ptr + ids[:, :, None] * s_out + dd[None, None, :],
                      du.to(w_out_ptr.dtype.element_ty), mask=umask, sem="relaxed")
        tl.atomic_add(w_in_ptr + center[:, None] * s_in + dd[None, :],
                      dv.to(w_in_ptr.dtype.element_ty), mask=vmask, sem="relaxed")


@triton.jit
def _sgns_step_kernel(inp_ptr, tgt_ptr, neg_ptr, w_in_ptr, w_out_ptr, loss_ptr, lr,
                      start, end, K, D, s_c, s_x, s_nb, s_nk, s_in, s_out,
                      BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    # one launch updates pairs [start, end) of the batch: the launcher walks a batch chunk by chunk
    # without slicing (or any other host-side op) between launches
    rows = tl.program_id(0).to(tl.int64) * BLOCK_B + start + tl.arange(0, BLOCK_B)
    _sgns_tile(rows, rows < end, inp_ptr, tgt_ptr, neg_ptr, w_in_ptr, w_out_ptr, loss_ptr, lr,
               K, D, s_c, s_x, s_nb, s_nk, s_in, s_out, BLOCK_B, BLOCK_K, BLOCK_D, "")


@triton.jit
def _sgns_loop_kernel(inp_ptr, tgt_ptr, neg_ptr, w_in_ptr, w_out_ptr, loss_ptr, lr,
                      B, per_prog, K, D, s_c, s_x, s_nb, s_nk, s_in, s_out,
                      BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    # word2vec.c's threads on a GPU: each program owns pairs [pid * per_prog, (pid + 1) * per_prog)
    # and walks them BLOCK_B at a time, in order; programs run Hogwild, so grid * BLOCK_B pairs are
    # in flight. Table rows are read from L2 (".cg"): atomics land there, and a row cached in this
    # SM's L1 would stay stale for the whole (long) launch.
    lo = tl.program_id(0).to(tl.int64) * per_prog
    hi = tl.minimum(lo + per_prog, B)
    for s in range(lo, hi, BLOCK_B):
        rows = s + tl.arange(0, BLOCK_B)
        _sgns_tile(rows, rows < hi, inp_ptr, tgt_ptr, neg_ptr, w_in_ptr, w_out_ptr, loss_ptr, lr,
                   K, D, s_c, s_x, s_nb, s_nk, s_in, s_out, BLOCK_B, BLOCK_K, BLOCK_D, ".cg")
        # the program's next tile reads rows its own threads just moved: order them
        tl.debug_barrier()


# ----------------------------------------------------------------------------------------------------
# configs: the candidates the autotuners and ``python -m benchmarks.tune`` try (BLOCK_K is not among them:
# the launchers set it from K), the heuristic one, and the table key

CONFIGS = [triton.Config({"BLOCK_B": bb, "BLOCK_D": bd}, num_warps=nw)
           for bb in (2, 4, 8, 16) for bd in (64, 128) for nw in (2, 4)]  # fmt: skip

_fwd_tuned = triton.autotune(CONFIGS, key=["K", "D"])(_fwd_kernel)
# the backward accumulates with atomics, so every autotuning trial must start from zeroed buffers
_bwd_tuned = triton.autotune(CONFIGS, key=["K", "D", "SPARSE"], reset_to_zero=["gin_ptr", "gout_ptr"])(_bwd_kernel)
# _sgns_step_kernel is never autotuned: each trial would apply the SGD update to the tables again


def _fixed_config(K: int, D: int) -> dict:
    block_k = next_pow2(K + 1)
    if interpreting():  # big tiles: the interpreter runs programs one after another, vectorized by numpy
        block_d = min(next_pow2(D), 64)
        return {"BLOCK_B": 32, "BLOCK_K": block_k, "BLOCK_D": block_d}
    block_d = min(next_pow2(D), 128)
    # ~4096 gathered elements per program keeps the (B, K, D) tile in registers at 4 warps
    block_b = max(1, min(64, 4096 // (block_k * block_d)))
    return {"BLOCK_B": block_b, "BLOCK_K": block_k, "BLOCK_D": block_d, "num_warps": 4}


def tuning_key(dtype: torch.dtype | str, d: int, k: int, sparse: bool | None = None) -> configs.Key:
    """The table key of a negative-sampling launch: table dtype, row width, negatives per pair (and, for the
    backward, whether it scatters into compact buffers)."""
    return configs.key(dtype=dtype, d=int(d), k=int(k), sparse=sparse)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def negative_sampling_forward(center, context, negatives, in_weight, out_weight, ok=None):
    """Per-pair loss (B,) and coef (B, K+1) = d loss_b / d score_bk, both in the accumulation dtype
    (fp32, fp64 for fp64 tables). Column 0 of coef is the positive. An id outside [0, V) reads row 0; with
    ``ok`` (an int32 (1,) tensor set to 1) the kernel also sets ``ok`` to 0."""
    B, K = negatives.shape
    D = in_weight.shape[1]
    acc = _acc_dtype(in_weight.dtype)
    loss = empty(B, dtype=acc, device=in_weight.device)
    coef = empty(B, K + 1, dtype=acc, device=in_weight.device)
    args = (center, context, negatives, in_weight, out_weight, loss, coef, center if ok is None else ok, B, K, D,
            in_weight.shape[0], center.stride(0), context.stride(0), negatives.stride(0), negatives.stride(1),
            in_weight.stride(0), out_weight.stride(0))
    block_k = next_pow2(K + 1)

    def launch(c):
        grid = (triton.cdiv(B, c["BLOCK_B"]),)
        wrap_triton(_fwd_kernel)[grid](*args, CHECK=ok is not None, **{**c, "BLOCK_K": block_k})

    def autotune():
        wrap_triton(_fwd_tuned)[lambda m: (triton.cdiv(B, m["BLOCK_B"]),)](*args, CHECK=ok is not None,
                                                                          BLOCK_K=block_k)
        return getattr(_fwd_tuned, "best_config", None)

    configs.run("negative_sampling.fwd", tuning_key(in_weight.dtype, D, K), _fixed_config(K, D),
                launch, autotune=autotune, device=in_weight.device)
    return loss, coef


def negative_sampling_backward(center, context, negatives, in_weight, out_weight, coef, grad_loss, *,
                               need_in=True, need_out=True, dst_in=None, dst_out=None,
                               rows_in=None, rows_out=None):
    """Table gradients as (rows, D) accumulators in coef's dtype.

    Dense (``dst_in is None``): rows = V and gradients land on the ids. Sparse: ``dst_in`` (B,) and
    ``dst_out`` (B, K+1) map each lookup to a row of compact (rows_in, D) / (rows_out, D) buffers.
    Returns (grad_in or None, grad_out or None)."""
    B, K = negatives.shape
    V, D = in_weight.shape
    sparse = dst_in is not None
    rows_in = V if rows_in is None else rows_in
    rows_out = V if rows_out is None else rows_out
    dev = in_weight.device
    # accumulators: zero-initialized on purpose (atomic adds), so not poisoned
    gin = torch.zeros(rows_in if need_in else 1, D, dtype=coef.dtype, device=dev)
    gout = torch.zeros(rows_out if need_out else 1, D, dtype=coef.dtype, device=dev)
    if not sparse:
        dst_in, dst_out = center, coef  # unused by the kernel when SPARSE is off
    args = (center, context, negatives, dst_in, dst_out, in_weight, out_weight, coef, grad_loss, gin, gout,
            B, K, D, V, center.stride(0), context.stride(0), negatives.stride(0), negatives.stride(1),
            in_weight.stride(0), out_weight.stride(0), grad_loss.stride(0))
    flags = {"SPARSE": sparse, "NEED_IN": need_in, "NEED_OUT": need_out}
    if B > 0:
        block_k = next_pow2(K + 1)

        def launch(c):
            wrap_triton(_bwd_kernel)[(triton.cdiv(B, c["BLOCK_B"]),)](*args, **flags, **{**c, "BLOCK_K": block_k})

        def autotune():
            grid = lambda m: (triton.cdiv(B, m["BLOCK_B"]),)
            wrap_triton(_bwd_tuned)[grid](*args, **flags, BLOCK_K=block_k)
            return getattr(_bwd_tuned, "best_config", None)

        configs.run("negative_sampling.bwd", tuning_key(in_weight.dtype, D, K, sparse),
                    _fixed_config(K, D), launch, autotune=autotune, device=dev)
    return (gin if need_in else None), (gout if need_out else None)


def sgns_step(inputs, targets, negatives, in_weight, out_weight, lr: float, chunk: int | None = None
              ) -> torch.Tensor:
    """Fused skip-gram SGD step, in place on both tables (Hogwild across pairs, like word2vec.c).

    For each pair b: scores of ``in_weight[inputs[b]]`` against ``out_weight[targets[b]]`` (label 1)
    and ``out_weight[negatives[b, k]]`` (label 0; skipped when equal to the target, as in
    word2vec.c); g = (label - σ(score)) * lr; the output rows move by g * v and the input row by
    Σ g * u. ``chunk``: one launch per ``chunk`` consecutive pairs, in order (the stream serializes
    them: a minibatch of ``chunk`` pairs in flight at once), instead of one launch for all B; the
    loop does nothing but launch. Returns the per-pair loss (B,) before the update (fp32)."""
    B, K = negatives.shape
    D = in_weight.shape[1]
    loss = empty(B, dtype=_acc_dtype(in_weight.dtype), device=in_weight.device)
    if B == 0:
        return loss
    chunk = B if chunk is None else int(chunk)
    cfg = _fixed_config(K, D)
    kernel = _sgns_step_kernel[(triton.cdiv(min(chunk, B), cfg["BLOCK_B"]),)]
    lr = float(lr)
    strides = (inputs.stride(0), targets.stride(0), negatives.stride(0), negatives.stride(1),
               in_weight.stride(0), out_weight.stride(0))
    for s in range(0, B, chunk):
        # a grid sized for a full chunk: the last (shorter) one masks its idle programs
        kernel(inputs, targets, negatives, in_weight, out_weight, loss, lr, s, min(s + chunk, B), K, D,
               *strides, **cfg)
    return loss


def sgns_hogwild(inputs, targets, negatives, in_weight, out_weight, lr: float, in_flight: int = 256
                 ) -> torch.Tensor:
    """``sgns_step`` in one launch for any B: about ``in_flight`` pairs are updated at a time,
    Hogwild (like word2vec.c's threads, each program walks its own contiguous share of the pairs in
    order), instead of one launch per minibatch. Same update and return value as ``sgns_step``;
    where rows collide, the result depends on the schedule (exactly the sequential minibatches of
    BLOCK_B pairs under the interpreter, which runs programs one after another)."""
    B, K = negatives.shape
    D = in_weight.shape[1]
    loss = empty(B, dtype=_acc_dtype(in_weight.dtype), device=in_weight.device)
    if B == 0:
        return loss
    cfg = _fixed_config(K, D)
    bb = cfg["BLOCK_B"]
    grid = max(1, min(int(in_flight) // bb, triton.cdiv(B, bb)))
    per_prog = triton.cdiv(triton.cdiv(B, grid), bb) * bb  # whole tiles, so only a share's end masks
    _sgns_loop_kernel[(triton.cdiv(B, per_prog),)](
        inputs, targets, negatives, in_weight, out_weight, loss, float(lr), B, per_prog, K, D,
        inputs.stride(0), targets.stride(0), negatives.stride(0), negatives.stride(1),
        in_weight.stride(0), out_weight.stride(0), **cfg)
    return loss
