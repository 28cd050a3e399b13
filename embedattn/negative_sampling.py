"""Skip-gram negative-sampling loss (word2vec): checks, autograd Function, functional API, module, sampler.

loss_b = -log σ(u[context_b]·v[center_b]) - Σ_k log σ(-u[negatives_bk]·v[center_b]),
v = ``in_weight``, u = ``out_weight``. The Triton path never materializes the (B, K, D) gather.

Bounds checks (``check_bounds``) of center, context and negatives work as in ``embedattn.embedding`` (its
module docstring says when each error surfaces): "sync" raises an IndexError naming the first bad tensor
and id before any kernel runs (one host sync; the default eagerly on the CPU); "device" (the default on
CUDA and under torch.compile) checks inside the forward kernel, reads row 0 for a bad id and fails the call
by ``torch._assert_async`` (on CUDA a device-side assertion, surfacing at the next synchronization);
False/"off" checks nothing but still reads row 0. The backward adds nothing for a bad id (a bad center
drops its pair, a bad context or negative its column), so no mode reads or writes outside the tables.
Both roads (kernels and reference) do exactly this.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from torch.autograd.function import once_differentiable

from ._backend import resolve
from ._checks import assert_ok, bounds_mode, check_bool, check_ids, check_ids_in_range, check_tensor, ok_flag, safe_ids
from ._registry import kernel_op
from .reference._negative_sampling import negative_sampling_loss as _reference_loss

REDUCTIONS = ("mean", "sum", "none")
_ID_DTYPES = (torch.int32, torch.int64)
_TABLE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_ids(name: str, t) -> None:
    check_tensor(name, t)
    if t.dtype not in _ID_DTYPES:
        raise TypeError(f"{name} must be int64 or int32 ids, got {t.dtype}")


_BAD_ID = ("negative_sampling_loss: a center, context or negative id is out of range for the tables; row 0 was "
           "read in its place. check_bounds='sync' raises an IndexError naming it")


def _check_inputs(center, context, negatives, in_weight, out_weight, reduction, check_bounds) -> str:
    """Validate the arguments; return the bounds mode (and in "sync" mode check the ids)."""
    for name, w in (("in_weight", in_weight), ("out_weight", out_weight)):
        check_tensor(name, w)
        if w.dim() != 2:
            raise ValueError(f"{name} must be (num_embeddings, embedding_dim), got shape {tuple(w.shape)}")
        if w.dtype not in _TABLE_DTYPES:
            raise TypeError(f"{name} must be float16/bfloat16/float32/float64, got {w.dtype}")
    if in_weight.shape != out_weight.shape:
        raise ValueError(f"in_weight {tuple(in_weight.shape)} and out_weight {tuple(out_weight.shape)} "
                         "must have the same shape")
    if in_weight.dtype != out_weight.dtype:
        raise TypeError(f"in_weight ({in_weight.dtype}) and out_weight ({out_weight.dtype}) "
                        "must share a dtype")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    for name, t in (("center", center), ("context", context), ("negatives", negatives)):
        _check_ids(name, t)
    if center.dim() != 1:
        raise ValueError(f"center must be 1-D (B,), got shape {tuple(center.shape)}")
    if context.shape != center.shape:
        raise ValueError(f"context {tuple(context.shape)} must have center's shape {tuple(center.shape)}")
    if negatives.dim() != 2 or negatives.shape[0] != center.shape[0]:
        raise ValueError(f"negatives must be (B, K) with B = {center.shape[0]}, got {tuple(negatives.shape)}")
    if negatives.shape[1] == 0:
        raise ValueError("negatives has K = 0 columns: negative sampling needs at least one negative "
                         "per pair")
    devices = {t.device for t in (center, context, negatives, in_weight, out_weight)}
    if len(devices) > 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(str(d) for d in devices)}")
    mode = bounds_mode(check_bounds, center.device)
    v = in_weight.shape[0]
    check_ids([("center", center, v, "the tables"), ("context", context, v, "the tables"),
               ("negatives", negatives, v, "the tables")], mode)
    return mode


# --------------------------------------------------------------------------------------------------
# registered ops (bodies launch the kernels; see embedattn._registry)
# --------------------------------------------------------------------------------------------------
def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _ns_fwd_fake(center, context, negatives, in_weight, out_weight, ok=None):
    acc = _acc_dtype(in_weight.dtype)
    b, k = negatives.shape
    return in_weight.new_empty(b, dtype=acc), in_weight.new_empty(b, k + 1, dtype=acc)


@kernel_op("negative_sampling_fwd", fake=_ns_fwd_fake, mutates_args=("ok",))
def _negative_sampling_fwd(center: torch.Tensor, context: torch.Tensor, negatives: torch.Tensor,
                           in_weight: torch.Tensor, out_weight: torch.Tensor, ok: torch.Tensor | None = None
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss (B,), coef (B, K+1) = d loss / d score, column 0 the positive), float32. A bad id reads row 0;
    ``ok`` (int32 (1,), set to 1 by the caller) is cleared when there is one (None or empty: no check; see
    ``embedattn.embedding``'s op for why the Function passes an empty one)."""
    from .kernels.negative_sampling import negative_sampling_forward

    return negative_sampling_forward(center, context, negatives, in_weight, out_weight,
                                     ok if ok is not None and ok.numel() else None)


def _ns_bwd_fake(center, context, negatives, in_weight, out_weight, coef, grad_loss, dst_in, dst_out, rows_in,
                 rows_out, need_in, need_out):
    d = in_weight.shape[1]
    return coef.new_empty(rows_in if need_in else 0, d), coef.new_empty(rows_out if need_out else 0, d)


@kernel_op("negative_sampling_bwd", fake=_ns_bwd_fake)
def _negative_sampling_bwd(center: torch.Tensor, context: torch.Tensor, negatives: torch.Tensor,
                           in_weight: torch.Tensor, out_weight: torch.Tensor, coef: torch.Tensor,
                           grad_loss: torch.Tensor, dst_in: torch.Tensor | None, dst_out: torch.Tensor | None,
                           rows_in: int, rows_out: int, need_in: bool, need_out: bool
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Table gradients as (rows, D) accumulators in coef's dtype (0 rows when not needed). Dense
    (``dst_in`` None): rows = V, gradients land on the ids. Sparse: ``dst_in`` (B,) / ``dst_out`` (B, K+1)
    map each lookup to a row of compact (rows_in, D) / (rows_out, D) buffers."""
    from .kernels.negative_sampling import negative_sampling_backward

    gin, gout = negative_sampling_backward(center, context, negatives, in_weight, out_weight, coef, grad_loss,
                                           need_in=need_in, need_out=need_out, dst_in=dst_in, dst_out=dst_out,
                                           rows_in=rows_in, rows_out=rows_out)
    d = in_weight.shape[1]
    return (gin if need_in else coef.new_empty(0, d)), (gout if need_out else coef.new_empty(0, d))


class NegativeSamplingFunction(torch.autograd.Function):
    """Per-pair loss (B,) on the Triton kernels, through the registered ops; gradients for both tables,
    dense or sparse COO. ``check``: the "device" bounds check (the kernel's flag, one ``_assert_async``)."""

    @staticmethod
    def forward(ctx, center, context, negatives, in_weight, out_weight, sparse: bool, check: bool):
        ok = ok_flag(center.device) if check else center.new_empty(0, dtype=torch.int32)
        loss, coef = torch.ops.embedattn.negative_sampling_fwd(center, context, negatives, in_weight, out_weight,
                                                               ok)
        if check:
            assert_ok(ok, _BAD_ID)
        ctx.save_for_backward(center, context, negatives, in_weight, out_weight, coef)
        ctx.sparse = sparse
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        center, context, negatives, in_weight, out_weight, coef = ctx.saved_tensors
        need_in, need_out = ctx.needs_input_grad[3], ctx.needs_input_grad[4]
        if not (need_in or need_out):
            return (None,) * 7
        grad_loss = grad_loss.to(coef.dtype)
        V, D = in_weight.shape
        if not ctx.sparse:
            gin, gout = torch.ops.embedattn.negative_sampling_bwd(
                center, context, negatives, in_weight, out_weight, coef, grad_loss, None, None, V, V, need_in,
                need_out)
            gin = gin.to(in_weight.dtype) if need_in else None
            gout = gout.to(out_weight.dtype) if need_out else None
            return None, None, None, gin, gout, None, None
        # sparse: accumulate into one row per distinct id (never one row per lookup, which for the
        # negatives would be the B x K x D tensor the kernel avoids), then wrap as coalesced COO. Bad ids
        # (the kernel adds nothing for them) count as 0 here, so every COO index is a row of the table
        uin, inv_in = torch.unique(safe_ids(center, V, "off", ""), return_inverse=True)
        ids_out = safe_ids(torch.cat([context.unsqueeze(1), negatives], dim=1), V, "off", "")
        uout, inv_out = torch.unique(ids_out, return_inverse=True)
        gin, gout = torch.ops.embedattn.negative_sampling_bwd(
            center, context, negatives, in_weight, out_weight, coef, grad_loss, inv_in, inv_out.contiguous(),
            uin.numel(), uout.numel(), need_in, need_out)

        def coo(idx, vals, dtype):
            return torch.sparse_coo_tensor(idx.unsqueeze(0).long(), vals.to(dtype), (V, D), is_coalesced=True,
                                           check_invariants=False)

        gin = coo(uin, gin, in_weight.dtype) if need_in else None
        gout = coo(uout, gout, out_weight.dtype) if need_out else None
        return None, None, None, gin, gout, None, None


def negative_sampling_loss(
    center: torch.Tensor,
    context: torch.Tensor,
    negatives: torch.Tensor,
    in_weight: torch.Tensor,
    out_weight: torch.Tensor,
    *,
    reduction: str = "mean",
    sparse: bool = False,
    check_bounds: bool | str | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Skip-gram negative-sampling loss.

    ``center``/``context``: (B,) int ids; ``negatives``: (B, K) ids, K >= 1; ``in_weight`` (v) and
    ``out_weight`` (u): (V, D) tables of one dtype on one device. Per pair
    ``-log σ(u[context]·v[center]) - Σ_k log σ(-u[negatives_k]·v[center])``, stable for any logit.
    ``reduction``: "mean" | "sum" | "none" (per-pair (B,)). The loss is float32 for 16-bit and float32
    tables, float64 for float64 tables (which run the reference). ``sparse=True`` gives sparse COO
    table gradients (for ``torch.optim.SparseAdam``/``SGD``), like ``nn.Embedding(sparse=True)``.
    ``check_bounds``: None | "sync" (or True) | "device" | False/"off", as in ``embedattn.embedding``
    (see the module docstring): None checks without a host sync on CUDA and under torch.compile, with an
    IndexError naming the id eagerly on the CPU; no mode reads outside the tables.
    """
    mode = _check_inputs(center, context, negatives, in_weight, out_weight, reduction, check_bounds)
    check_bool("sparse", sparse)
    be = resolve(backend, center, context, negatives, in_weight, out_weight, op="negative_sampling",
                 dtype=in_weight.dtype)
    if be == "reference" or center.numel() == 0:
        if mode == "device":  # the kernels' flag, in torch ops
            v = in_weight.shape[0]
            assert_ok(torch.stack([((t >= 0) & (t < v)).all() for t in (center, context, negatives)]).all(), _BAD_ID)
        # unchecked, a bad id reads row 0 and its gradient is dropped, as in the kernels
        return _reference_loss(center, context, negatives, in_weight, out_weight, reduction=reduction,
                               sparse=sparse, drop_bad_ids=mode != "sync")
    if in_weight.stride(1) != 1:
        in_weight = in_weight.contiguous()
    if out_weight.stride(1) != 1:
        out_weight = out_weight.contiguous()
    loss = NegativeSamplingFunction.apply(center, context, negatives, in_weight, out_weight, sparse, mode == "device")
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


def _word2vec_init(weight_in: torch.Tensor, weight_out: torch.Tensor, generator=None) -> None:
    """word2vec.c's initialisation: input rows uniform in ±0.5/D, output rows zero."""
    d = weight_in.shape[1]
    with torch.no_grad():
        weight_in.uniform_(-0.5 / d, 0.5 / d, generator=generator)
        weight_out.zero_()


class NegativeSamplingLoss(nn.Module):
    """Owns the input (``in_weight``, the word vectors) and output (``out_weight``) tables of a
    skip-gram model and returns the negative-sampling loss of a batch.

    ``forward(center, context, negatives=None)``: when ``negatives`` is None, ``num_negatives``
    ids per pair are drawn from ``sampler`` (a :class:`UnigramSampler`), avoiding the positive.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, *, reduction: str = "mean",
                 sparse: bool = False, sampler: UnigramSampler | None = None, num_negatives: int = 5,
                 backend: str | None = None, device=None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if num_embeddings < 1 or embedding_dim < 1:
            raise ValueError(f"num_embeddings and embedding_dim must be >= 1, got {num_embeddings}, "
                             f"{embedding_dim}")
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        if num_negatives < 1:
            raise ValueError(f"num_negatives must be >= 1, got {num_negatives}")
        kw = {"device": device, "dtype": dtype}
        self.in_weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim, **kw))
        self.out_weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim, **kw))
        self.reduction, self.sparse, self.backend = reduction, sparse, backend
        self.sampler, self.num_negatives = sampler, num_negatives
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _word2vec_init(self.in_weight, self.out_weight)

    def forward(self, center: torch.Tensor, context: torch.Tensor,
                negatives: torch.Tensor | None = None) -> torch.Tensor:
        if negatives is None:
            if self.sampler is None:
                raise ValueError("negatives is None and the module has no sampler")
            negatives = self.sampler.sample(center.shape[0], self.num_negatives, exclude=context,
                                            device=center.device)
        return negative_sampling_loss(center, context, negatives, self.in_weight, self.out_weight,
                                      reduction=self.reduction, sparse=self.sparse, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"{self.in_weight.shape[0]}, {self.in_weight.shape[1]}, reduction={self.reduction!r}, "
                f"sparse={self.sparse}, num_negatives={self.num_negatives}")


class UnigramSampler:
    """Draws negatives with probability ∝ counts**power (word2vec's unigram^0.75 table).

    Plain draws use Walker's alias method (two gathers per sample, O(1)); ``exclude`` (ids shaped
    like the leading dims of the draw) samples from the distribution with that id removed, exactly
    and without rejection loops, through a cumulative table (float64) and ``torch.searchsorted``.
    Both run on the sampler's device with no Python loop per draw.
    """

    def __init__(self, counts: torch.Tensor | Sequence[float], power: float = 0.75, *, device=None) -> None:
        c = torch.as_tensor(counts, dtype=torch.float64, device=device)
        if c.dim() != 1 or c.numel() == 0:
            raise ValueError(f"counts must be a non-empty 1-D sequence, got shape {tuple(c.shape)}")
        if not torch.isfinite(c).all() or (c < 0).any():
            raise ValueError("counts must be finite and non-negative")
        p = c.pow(power) * (c > 0)  # 0**0 would be 1: a zero count must never be drawn
        if p.sum() <= 0:
            raise ValueError("counts has no positive entry: nothing to sample")
        self.power = power
        self.probs = p / p.sum()
        self._cum = torch.cumsum(self.probs, 0)
        self._single = int((p > 0).sum()) == 1  # one word holds all the mass: exclusion impossible
        self._last = int(torch.nonzero(p).max())  # float rounding at the top end must not pick a zero count
        self._alias_prob, self._alias = self._alias_tables(self.probs)

    @staticmethod
    def _alias_tables(probs: torch.Tensor):
        """Vose's alias method: bucket i keeps i with probability prob[i], else gives alias[i]."""
        n = probs.numel()
        scaled = (probs.cpu().double() * n).numpy().copy()
        prob = np.ones(n)
        alias = np.arange(n)
        small = [i for i in range(n) if scaled[i] < 1.0]
        large = [i for i in range(n) if scaled[i] >= 1.0]
        while small and large:  # one O(V) pass when the sampler is built, never per draw
            s, g = small.pop(), large.pop()
            prob[s], alias[s] = scaled[s], g
            scaled[g] -= 1.0 - scaled[s]
            (small if scaled[g] < 1.0 else large).append(g)
        dev = probs.device
        return torch.tensor(prob, dtype=torch.float32, device=dev), torch.tensor(alias, device=dev)

    @property
    def device(self) -> torch.device:
        return self.probs.device

    def __len__(self) -> int:
        return self.probs.numel()

    def to(self, device) -> UnigramSampler:
        self.probs, self._cum = self.probs.to(device), self._cum.to(device)
        self._alias_prob, self._alias = self._alias_prob.to(device), self._alias.to(device)
        return self

    def sample(self, *shape: int, exclude: torch.Tensor | None = None,
               generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        """int64 ids of the given shape. With ``exclude`` (shape = the draw's leading dims, e.g. (B,)
        for a (B, K) draw) no entry equals its row's excluded id; an excluded id outside [0, len(self))
        is an IndexError naming it (on CUDA a device-side assertion, as the loss's "device" check)."""
        if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)):
            shape = tuple(shape[0])
        dev = self.device if device is None else torch.device(device)
        if dev != self.device:
            self.to(dev)
        if exclude is None:
            n = self.probs.numel()
            i = torch.randint(0, n, shape, device=dev, generator=generator)
            keep = torch.rand(shape, device=dev, generator=generator) < self._alias_prob[i]
            return torch.where(keep, i, self._alias[i])
        if self._single:
            raise ValueError("cannot exclude ids: only one id has a non-zero probability")
        if not isinstance(exclude, torch.Tensor) or tuple(exclude.shape) != tuple(shape[:exclude.dim()]):
            got = tuple(exclude.shape) if isinstance(exclude, torch.Tensor) else type(exclude).__name__
            raise ValueError(f"exclude must be a tensor shaped like the leading dims of the draw {tuple(shape)}, "
                             f"got {got}")
        if exclude.dtype.is_floating_point or exclude.dtype.is_complex or exclude.dtype == torch.bool:
            raise TypeError(f"exclude must hold integer ids, got {exclude.dtype}")
        ex = exclude.to(dev).long()
        n = self.probs.numel()
        # an id outside [0, n) would index the tables from the end (-1) or past them: as the loss checks ids
        if bounds_mode(None, dev) == "sync":
            check_ids_in_range([("exclude", ex)], n, "the sampler's vocabulary", unit="ids")
        else:
            ex = safe_ids(ex, n, "device", f"UnigramSampler.sample: exclude holds an id outside [0, {n})")
        ex = ex.reshape(ex.shape + (1,) * (len(shape) - ex.dim()))
        p_x = self.probs[ex]
        start = self._cum[ex] - p_x
        # draw on the total mass minus the excluded id's, then skip over its interval
        u = torch.rand(shape, dtype=torch.float64, device=dev, generator=generator) * (self._cum[-1] - p_x)
        u = u + (u >= start) * p_x
        idx = torch.searchsorted(self._cum, u, right=True)
        return idx.clamp_(max=self._last)

    __call__ = sample
