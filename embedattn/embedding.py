"""Fused token embedding + positional add: ``weight[ids] * scale + P`` in one kernel, both gradients.

``P`` is a learned position table read at the token positions, the sinusoidal encoding of Vaswani et
al. computed in registers (no table), or nothing. Positions default to ``arange(N) + position_offset``
along the last dimension of ``ids``; an explicit ``positions`` tensor (as transformers passes
``position_ids``, e.g. with left padding) is honoured.

Bounds checks (``check_bounds``), for the ids and the explicit positions into a learned table:

* ``"sync"``: before any kernel runs, one min/max reduction per tensor and one device-to-host read
  (one sync); an IndexError names the first bad tensor and id (its minimum or maximum). The default in
  eager mode on the CPU, where the read is free. ``True`` means ``"sync"``.
* ``"device"``: the default on CUDA and while torch.compile traces. No host sync: the forward kernel
  checks the ids it gathers, reads row 0 in place of a bad one (never an out-of-bounds address) and
  clears a flag that ``torch._assert_async`` checks right after the launch. On CUDA that is a device-side
  assertion, like torch's own embedding kernel: the call returns, the error surfaces as a RuntimeError
  ("device-side assert triggered") at the next synchronization of the stream (``.item()``, ``.cpu()``,
  ``torch.cuda.synchronize()``; for a captured CUDA graph, the first one after the replay that met the
  bad id), and it poisons the CUDA context, as every device assertion does. Under Inductor the
  assertion is a Triton ``device_assert``, compiled in while ``torch._inductor.config.
  assert_indirect_indexing`` is on (its default). Off CUDA (torch.compile on the CPU) the same assertion
  raises at once, a RuntimeError. In eager mode on the CPU "device" is "sync". A step using it can be
  captured in a CUDA graph and compiled with ``fullgraph=True``. (The reference road, e.g. float64
  tables on CUDA, does the same in torch ops.)
* ``False`` / ``"off"``: no check; a bad id still reads row 0 (no out-of-bounds access); its output
  row is meaningless and its gradient is dropped. Both roads (kernels and reference) do exactly this.

Default positions past a learned table (``position_offset + N > P``) are host arithmetic: an IndexError
in every mode. So is an id into a table with no rows.

Backward (Triton path), which mode is which (``embedattn.kernels.embedding.scatter_mode``):

* token table, float32 tables outside deterministic mode: scatter-add with float32 atomics into the
  zero-initialised (V, D) gradient. Fast, not bitwise reproducible (colliding ids add up in scheduling
  order).
* float16/bfloat16 tables outside deterministic mode: the same float32 atomics into a float32 (V, D)
  buffer, cast once, where that buffer is small against the tokens (V <= T, or at most 16 MiB); the
  sorted segments otherwise (the buffer's zero-fill and cast would cost more than the atomics save).
* every dtype when ``torch.are_deterministic_algorithms_enabled()``: sorted segments. The T ids are sorted
  stably, each run of equal ids is summed by one program in a fixed order in float32 and written once,
  cast to the table dtype, into a zeroed (V, D) gradient in the table dtype. Bitwise reproducible, across
  processes too (the summation order does not depend on the autotuned launch config), and it needs no
  float32 (V, D) buffer.
* learned positions at the default positions: a reduction over the batch, one program per tile of
  positions; no atomics, always deterministic. Only table rows outside ``[offset, offset + N)`` are
  zero-filled. With explicit ``positions`` the position table is scattered like the token table.

Memory: the forward allocates its (B, N, D) output (and the 4-byte flag in "device" mode) and nothing
else of that size. The backward allocates the (V, D) token gradient (zero-filled, in the table dtype) and
the (P, D) position gradient (only rows outside [offset, offset + N) zero-filled), plus, in the sorted
mode, three int64 vectors of length T, and in the atomic mode for half tables the float32 (V, D) buffer.
Measured with the torch profiler (V=4096, D=64, B*N=128, P=128, Triton interpreter): backward allocates
exactly (V + P) * D * 4 bytes for float32 and (V + P) * D * 2 + 3 * T * 8 (+ the interpreter's head list)
for float16 in the sorted mode; forward exactly B*N*D*elem (tests/embedding/test_embedding.py::test_buffer_sizes
checks this, with CUDA peak memory on a GPU).
"""

from __future__ import annotations

import math
from numbers import Real

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from ._backend import resolve
from ._checks import assert_ok, bounds_mode, check_bool, check_device, check_ids, check_tensor, ok_flag
from ._registry import kernel_op
from .reference import _embedding as _ref

POSITIONAL = ("learned", "sinusoidal", "none")
_POS_NONE, _POS_LEARNED, _POS_SINUSOIDAL = 0, 1, 2


def _is_int_dtype(dtype: torch.dtype) -> bool:
    return not dtype.is_floating_point and not dtype.is_complex and dtype != torch.bool


def _check(ids, weight, pos_weight, sinusoidal, scale, padding_idx, position_offset, positions):
    """Validate the arguments; return the normalised ``padding_idx`` (non-negative or None)."""
    check_tensor("ids", ids)
    if not _is_int_dtype(ids.dtype):
        raise TypeError(f"ids must have an integer dtype (int32 or int64), got {ids.dtype}")
    if ids.dim() < 1:
        raise ValueError("ids must have at least one dimension (..., N); positions run along the last one")
    check_tensor("weight", weight)
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (num_embeddings, embedding_dim), got {tuple(weight.shape)}")
    if not weight.dtype.is_floating_point:
        raise TypeError(f"weight must be floating point, got {weight.dtype}")
    check_device("ids", ids, "weight", weight)
    if pos_weight is not None:
        if sinusoidal:
            raise ValueError("pass either pos_weight (learned positions) or sinusoidal=True, not both")
        check_tensor("pos_weight", pos_weight, optional=True)
        if pos_weight.dim() != 2 or pos_weight.shape[1] != weight.shape[1]:
            raise ValueError(f"pos_weight must be 2-D (max_positions, {weight.shape[1]}), "
                             f"got shape {tuple(pos_weight.shape)}")
        if pos_weight.dtype != weight.dtype:
            raise TypeError(f"pos_weight dtype {pos_weight.dtype} differs from weight dtype {weight.dtype}")
        check_device("pos_weight", pos_weight, "weight", weight)
    check_bool("sinusoidal", sinusoidal)
    if isinstance(scale, bool) or not isinstance(scale, Real) or not math.isfinite(float(scale)):
        raise TypeError(f"scale must be a finite real number, got {scale!r}")
    if isinstance(position_offset, bool) or not isinstance(position_offset, int):
        raise TypeError(f"position_offset must be an int, got {position_offset!r}")
    if position_offset < 0:
        raise ValueError(f"position_offset must be >= 0, got {position_offset}")
    if positions is not None:
        check_tensor("positions", positions, optional=True)
        if not _is_int_dtype(positions.dtype):
            raise TypeError(f"positions must have an integer dtype, got {positions.dtype}")
        if positions.shape != ids.shape:
            raise ValueError(f"positions must have the shape of ids {tuple(ids.shape)}, "
                             f"got {tuple(positions.shape)}")
        check_device("positions", positions, "ids", ids)
        if position_offset != 0:
            raise ValueError("position_offset applies to the default positions only; "
                             "add it to positions instead")
        if pos_weight is None and not sinusoidal:
            raise ValueError("positions were given but there is nothing to read at them: pass pos_weight "
                             "(learned positions) or sinusoidal=True")
    if padding_idx is not None:
        v = weight.shape[0]
        if isinstance(padding_idx, bool) or not isinstance(padding_idx, int):
            raise TypeError(f"padding_idx must be an int or None, got {padding_idx!r}")
        if not -v <= padding_idx < v:
            raise ValueError(f"padding_idx must be in [-{v}, {v}), got {padding_idx}")
        if padding_idx < 0:
            padding_idx += v
    return padding_idx


_BAD_ID = ("embedding: an id is out of range for its table (ids for the token table, or explicit positions for "
           "the position table); row 0 was read in its place. check_bounds='sync' raises an IndexError naming it")


def _check_bounds(ids, weight, pos_weight, position_offset, positions, mode: str) -> None:
    """The host part of the bounds checks (see the module docstring): default positions past the position
    table and ids into an empty table always raise; in "sync" mode the ids and explicit positions are
    checked with one min/max reduction each and one device sync for both, an IndexError naming the first
    bad one."""
    p = None if pos_weight is None else pos_weight.shape[0]
    if p is not None and positions is None:
        n = ids.shape[-1]
        if n and position_offset + n > p:
            raise IndexError(f"positions {position_offset}..{position_offset + n - 1} exceed the position "
                             f"table ({p} rows)")
    items = [("ids", ids, weight.shape[0], "the token table")]
    if p is not None:
        items.append(("positions", positions, p, "the position table"))
    check_ids(items, mode)


def _flat_ids(x: torch.Tensor) -> torch.Tensor:
    if x.dtype not in (torch.int32, torch.int64):
        x = x.long()
    return x.reshape(-1).contiguous()


def _row_major(w: torch.Tensor) -> torch.Tensor:
    # the kernels take a row stride but need unit stride along the features
    return w if w.stride(1) == 1 else w.contiguous()


# --------------------------------------------------------------------------------------------------
# registered ops (bodies launch the kernels; see embedattn._registry)
# --------------------------------------------------------------------------------------------------
def _embedding_fwd_fake(ids, weight, pos_weight, positions, n, pos_mode, scale, offset, ok=None):
    return weight.new_empty(ids.shape[0], weight.shape[1])


@kernel_op("embedding_fwd", fake=_embedding_fwd_fake, mutates_args=("ok",))
def _embedding_fwd(ids: torch.Tensor, weight: torch.Tensor, pos_weight: torch.Tensor | None,
                   positions: torch.Tensor | None, n: int, pos_mode: int, scale: float, offset: int,
                   ok: torch.Tensor | None = None) -> torch.Tensor:
    """(T, D) rows ``weight[ids] * scale + P`` for flat ids (T,); pos_mode 0 none, 1 learned, 2 sinusoidal.
    A bad id reads row 0; ``ok`` (int32 (1,), set to 1 by the caller) is cleared when there is one (None or an
    empty tensor: no check; the autograd Function passes the empty one, since Inductor cannot functionalize a
    None mutated argument)."""
    from .kernels.embedding import embedding_forward

    pw = None if pos_weight is None else _row_major(pos_weight)
    return embedding_forward(ids, _row_major(weight), pw, positions, n=n, pos_mode=pos_mode, scale=scale,
                             offset=offset, ok=ok if ok is not None and ok.numel() else None)


def _embedding_bwd_fake(grad, ids, positions, num_rows, num_positions, n, scale, offset, padding_idx,
                        deterministic, need_weight, need_pos):
    return grad.new_empty(num_rows if need_weight else 0, grad.shape[1]), \
        grad.new_empty(num_positions if need_pos else 0, grad.shape[1])


@kernel_op("embedding_bwd", fake=_embedding_bwd_fake)
def _embedding_bwd(grad: torch.Tensor, ids: torch.Tensor, positions: torch.Tensor | None, num_rows: int,
                   num_positions: int, n: int, scale: float, offset: int, padding_idx: int, deterministic: bool,
                   need_weight: bool, need_pos: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_weight (num_rows, D), grad_pos_weight (num_positions, D)) in grad's dtype; a gradient not
    needed comes back with 0 rows. ``padding_idx`` < 0: none."""
    from .kernels import embedding as K

    grad = grad.contiguous()
    d = grad.shape[1]
    pad = None if padding_idx < 0 else padding_idx
    gw, gp = grad.new_empty(0, d), grad.new_empty(0, d)  # distinct: an op's outputs may not alias
    if need_weight:
        gw = K.scatter_grad(grad, ids, num_rows, scale=scale, padding_idx=pad, deterministic=deterministic)
    if need_pos:
        if positions is None:
            gp = K.positional_grad(grad, num_positions, n=n, offset=offset)
        else:
            gp = K.scatter_grad(grad, positions, num_positions, deterministic=deterministic)
    return gw, gp


class EmbeddingFunction(torch.autograd.Function):
    """``apply(ids, weight, pos_weight, positions, n, pos_mode, scale, offset, padding_idx, check)`` over flat
    ids (T,) -> (T, D), through the registered ops; ``check``: the "device" bounds check (the kernel's flag
    and one ``torch._assert_async``). See the module docstring for the bounds and backward modes."""

    @staticmethod
    def forward(ctx, ids, weight, pos_weight, positions, n, pos_mode, scale, offset, padding_idx, check):
        ok = ok_flag(ids.device) if check else ids.new_empty(0, dtype=torch.int32)
        out = torch.ops.embedattn.embedding_fwd(ids, weight, pos_weight, positions, n, pos_mode, scale, offset,
                                                ok)
        if check:
            assert_ok(ok, _BAD_ID)
        ctx.save_for_backward(ids, positions)
        ctx.meta = (weight.shape[0], 0 if pos_weight is None else pos_weight.shape[0], n, scale, offset,
                    -1 if padding_idx is None else padding_idx)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        ids, positions = ctx.saved_tensors
        v, p, n, scale, offset, padding_idx = ctx.meta
        need_w, need_p = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        if not (need_w or need_p):
            return (None,) * 10
        gw, gp = torch.ops.embedattn.embedding_bwd(grad, ids, positions, v, p, n, scale, offset, padding_idx,
                                                   torch.are_deterministic_algorithms_enabled(), need_w, need_p)
        return None, (gw if need_w else None), (gp if need_p else None), *(None,) * 7


def embedding(
    ids: torch.Tensor,
    weight: torch.Tensor,
    pos_weight: torch.Tensor | None = None,
    *,
    sinusoidal: bool = False,
    scale: float = 1.0,
    padding_idx: int | None = None,
    position_offset: int = 0,
    positions: torch.Tensor | None = None,
    check_bounds: bool | str | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Token embedding plus positions: ``weight[ids] * scale + P`` with shape ``ids.shape + (D,)``.

    Args:
        ids: integer tensor (..., N) of token ids in [0, V).
        weight: (V, D) token table; the output has its dtype (half types are computed in float32;
            float64 tables run the reference).
        pos_weight: optional (P, D) learned position table, same dtype and device as ``weight``.
        sinusoidal: add the sinusoidal encoding (computed in the kernel; odd D allowed) instead.
        scale: multiplies the token rows only (e.g. ``sqrt(D)``).
        padding_idx: as in ``nn.Embedding``: the row is looked up normally but receives no gradient.
        position_offset: default positions are ``arange(N) + position_offset`` (e.g. decoding with a cache).
        positions: explicit integer positions with the shape of ``ids`` (e.g. left-padded batches);
            needs a position table or ``sinusoidal=True``.
        check_bounds: how ids (and explicit positions into ``pos_weight``) are checked against the tables:
            ``"sync"`` (or ``True``): an IndexError naming the first bad id before any kernel runs (one
            device sync: not capturable, a graph break under torch.compile); ``"device"``: inside the
            kernel, no host sync, a bad id reads row 0 and fails the call by a device-side assertion (on
            CUDA it surfaces at the next synchronization); ``False``/``"off"``: no check, a bad id reads
            row 0 and its gradient is dropped (on every backend). ``None`` (the default): "device" on CUDA
            and under torch.compile, "sync" eagerly on the CPU. The module docstring says exactly when
            each error surfaces.
        backend: None | "auto" | "triton" | "reference" (see ``embedattn._backend``).

    Gradients flow to ``weight`` and ``pos_weight``; the backward modes (atomic or sorted-segment,
    which one is deterministic) are described in the module docstring.
    """
    padding_idx = _check(ids, weight, pos_weight, sinusoidal, scale, padding_idx, position_offset, positions)
    mode = bounds_mode(check_bounds, ids.device)
    _check_bounds(ids, weight, pos_weight, position_offset, positions, mode)
    scale = float(scale)
    be = resolve(backend, ids, weight, op="embedding", dtype=weight.dtype)
    if be == "reference":
        if mode == "device":  # the kernels' flag, in torch ops
            bad = [(ids, weight.shape[0])]
            if positions is not None and pos_weight is not None:
                bad.append((positions, pos_weight.shape[0]))
            assert_ok(torch.stack([((t >= 0) & (t < n)).all() for t, n in bad]).all(), _BAD_ID)
        # unchecked, a bad id reads row 0 and its gradient is dropped, as in the kernels
        return _ref.embedding(ids, weight, pos_weight, sinusoidal=sinusoidal, scale=scale,
                              padding_idx=padding_idx, position_offset=position_offset, positions=positions,
                              drop_bad_ids=mode != "sync")
    pos_mode = _POS_LEARNED if pos_weight is not None else _POS_SINUSOIDAL if sinusoidal else _POS_NONE
    flat_pos = _flat_ids(positions) if positions is not None else None
    out = EmbeddingFunction.apply(_flat_ids(ids), weight, pos_weight, flat_pos, ids.shape[-1], pos_mode,
                                  scale, position_offset, padding_idx, mode == "device")
    return out.view(*ids.shape, weight.shape[1])


class FusedEmbedding(nn.Module):
    """Token embedding + positions as one module: ``weight[ids] * scale + P``.

    Parameters are named so an ``nn.Embedding`` pair loads directly: ``weight`` (num_embeddings,
    embedding_dim) is the token table (``wte.weight``) and ``pos_weight`` (max_positions,
    embedding_dim) the learned position table (``wpe.weight``); ``pos_weight`` is None for
    ``positional="sinusoidal"`` or ``"none"``. E.g. ``m.load_state_dict({"weight": wte.weight,
    "pos_weight": wpe.weight})`` or ``FusedEmbedding.from_pretrained(wte.weight, wpe.weight)``.
    Both tables start from N(0, 1) like ``nn.Embedding`` (the ``padding_idx`` row zeroed).
    ``max_positions`` is required for learned positions and unused by the other modes.
    ``check_bounds`` on the module is passed to every call (``embedding``'s modes: None, "sync",
    "device", False/"off"); the default ``None`` checks without a host sync on CUDA.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        max_positions: int | None = None,
        *,
        positional: str = "learned",
        padding_idx: int | None = None,
        scale: float = 1.0,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if positional not in POSITIONAL:
            raise ValueError(f"positional must be one of {POSITIONAL}, got {positional!r}")
        if positional == "learned" and (max_positions is None or max_positions <= 0):
            raise ValueError("positional='learned' needs max_positions > 0 (the size of the position table)")
        if padding_idx is not None:
            if not -num_embeddings <= padding_idx < num_embeddings:
                raise ValueError(f"padding_idx must be in [-{num_embeddings}, {num_embeddings}), "
                                 f"got {padding_idx}")
            if padding_idx < 0:
                padding_idx += num_embeddings
        factory = {"device": device, "dtype": dtype}
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.max_positions = max_positions
        self.positional = positional
        self.padding_idx = padding_idx
        self.scale = float(scale)
        self.check_bounds: bool | str | None = None
        self.backend: str | None = None
        self.weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim, **factory))
        if positional == "learned":
            self.pos_weight = nn.Parameter(torch.empty(max_positions, embedding_dim, **factory))
        else:
            self.register_parameter("pos_weight", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight)
        if self.pos_weight is not None:
            nn.init.normal_(self.pos_weight)
        if self.padding_idx is not None:
            with torch.no_grad():
                self.weight[self.padding_idx].fill_(0)

    def forward(self, ids: torch.Tensor, positions: torch.Tensor | None = None,
                position_offset: int = 0) -> torch.Tensor:
        return embedding(ids, self.weight, self.pos_weight, sinusoidal=self.positional == "sinusoidal",
                         scale=self.scale, padding_idx=self.padding_idx, position_offset=position_offset,
                         positions=positions, check_bounds=self.check_bounds, backend=self.backend)

    @classmethod
    def from_pretrained(
        cls,
        token_weight: torch.Tensor,
        pos_weight: torch.Tensor | None = None,
        *,
        positional: str | None = None,
        padding_idx: int | None = None,
        scale: float = 1.0,
        freeze: bool = False,
    ) -> FusedEmbedding:
        """Build from existing tables (copied). ``positional`` defaults to "learned" when ``pos_weight`` is
        given and "none" otherwise; ``freeze=True`` turns off their gradients (as ``nn.Embedding``)."""
        if positional is None:
            positional = "learned" if pos_weight is not None else "none"
        if (positional == "learned") != (pos_weight is not None):
            raise ValueError("pos_weight must be given exactly when positional='learned'")
        if token_weight.dim() != 2:
            raise ValueError(f"token_weight must be 2-D, got shape {tuple(token_weight.shape)}")
        if pos_weight is not None and (pos_weight.dim() != 2 or pos_weight.shape[1] != token_weight.shape[1]):
            raise ValueError(f"pos_weight must be 2-D (max_positions, {token_weight.shape[1]}), "
                             f"got shape {tuple(pos_weight.shape)}")
        m = cls(token_weight.shape[0], token_weight.shape[1],
                None if pos_weight is None else pos_weight.shape[0], positional=positional,
                padding_idx=padding_idx, scale=scale, device=token_weight.device, dtype=token_weight.dtype)
        with torch.no_grad():
            m.weight.copy_(token_weight)
            if pos_weight is not None:
                m.pos_weight.copy_(pos_weight)
        m.requires_grad_(not freeze)
        return m

    def extra_repr(self) -> str:
        s = f"{self.num_embeddings}, {self.embedding_dim}, positional={self.positional!r}"
        if self.max_positions is not None:
            s += f", max_positions={self.max_positions}"
        if self.padding_idx is not None:
            s += f", padding_idx={self.padding_idx}"
        if self.scale != 1.0:
            s += f", scale={self.scale}"
        return s
