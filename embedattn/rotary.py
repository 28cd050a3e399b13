"""Rotary position embedding (RoPE) as one fused op: FlashAttention's ``apply_rotary_emb`` semantics.

``rotary(x, cos, sin)`` rotates the first ``rotary_dim = 2 * cos.shape[1]`` features of every head of
every token by the angle of its position; the remaining ``D - rotary_dim`` features pass through.
Pairs are the two halves of the rotary features (GPT-NeoX, Llama) or, with ``interleaved=True``,
even/odd neighbours (GPT-J). Positions start at ``seqlen_offsets`` (an int, or one per batch for
KV-cache decoding). Layouts: (B, S, H, D) as FlashAttention, (B, H, S, D) with ``heads_first=True``
(what ``embedattn.attention`` takes), and the packed varlen form (total, H, D) with ``cu_seqlens``.
x is read through its strides, never copied.

Triton path: one kernel, forward and backward alike. The backward is the same rotation with sin
negated (the inverse rotation: it is orthogonal), written to a new tensor (never into the incoming
gradient, which autograd may share or expand). ``inplace=True`` writes into x (``ctx.mark_dirty``)
and allocates nothing; otherwise the output is a new contiguous tensor of x's shape. Gradients flow
to x only, as in FlashAttention; when cos or sin require grad the reference runs instead
(``backend="auto"``) or a ValueError says so (``backend="triton"``).
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from ._backend import check_backend, resolve
from ._checks import check_bool, check_int
from ._registry import kernel_op
from .reference import _rotary as _ref

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check(x, cos, sin, interleaved, inplace, seqlen_offsets, cu_seqlens, max_seqlen, heads_first):
    """Validate the arguments; return (batch, seqlen, total): seqlen bounds every sequence's length
    (``max_seqlen`` for varlen), total is the packed token count (varlen) or None."""
    check_bool("interleaved", interleaved)
    check_bool("inplace", inplace)
    check_bool("heads_first", heads_first)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOATS:
        raise TypeError(f"x must be float16, bfloat16, float32 or float64, got {x.dtype}")
    varlen = cu_seqlens is not None
    layout = ("(H, total, D)" if heads_first else "(total, H, D)") if varlen else \
        ("(B, H, S, D)" if heads_first else "(B, S, H, D)")
    if x.dim() != (3 if varlen else 4):
        raise ValueError(f"x must be {3 if varlen else 4}-D {layout}{' with cu_seqlens' if varlen else ''}, "
                         f"got shape {tuple(x.shape)}")
    for name, t in (("cos", cos), ("sin", sin)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D (seqlen_ro, rotary_dim / 2), got shape {tuple(t.shape)}")
        if t.dtype not in (torch.float32, x.dtype):
            raise TypeError(f"{name} must be float32 or x's dtype {x.dtype}, got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if sin.shape != cos.shape:
        raise ValueError(f"sin must have the shape of cos {tuple(cos.shape)}, got {tuple(sin.shape)}")
    if sin.dtype != cos.dtype:
        raise TypeError(f"sin dtype {sin.dtype} differs from cos dtype {cos.dtype}")
    d, rd = x.shape[-1], 2 * cos.shape[1]
    if rd == 0:
        raise ValueError("cos and sin have no columns: they must be (seqlen_ro, rotary_dim / 2) with rotary_dim >= 2")
    if rd > d:
        raise ValueError(f"rotary_dim = 2 * cos.shape[1] = {rd} exceeds the head dim {d} (cos/sin are "
                         f"(seqlen_ro, rotary_dim / 2), half the rotated width, not the full width)")
    if inplace:
        if x.requires_grad and x.is_leaf and torch.is_grad_enabled():
            raise RuntimeError("inplace=True on a leaf tensor that requires grad: autograd cannot record it")
        if any(st == 0 and n > 1 for st, n in zip(x.stride(), x.shape)):
            raise ValueError("inplace=True needs x without broadcast (stride-0) dimensions: "
                             "several elements share one memory location")
    if varlen:
        if not isinstance(cu_seqlens, torch.Tensor):
            raise TypeError(f"cu_seqlens must be a torch.Tensor or None, got {type(cu_seqlens).__name__}")
        if cu_seqlens.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
        if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 1:
            raise ValueError(f"cu_seqlens must be 1-D (batch + 1,), got shape {tuple(cu_seqlens.shape)}")
        if cu_seqlens.device != x.device:
            raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but x is on {x.device}")
        if max_seqlen is None:
            raise ValueError("cu_seqlens needs max_seqlen (the longest sequence; it sizes the launch grid)")
        seqlen = check_int("max_seqlen", max_seqlen, low=0)
        batch, total = cu_seqlens.shape[0] - 1, x.shape[1 if heads_first else 0]
    else:
        if max_seqlen is not None:
            raise ValueError("max_seqlen goes with cu_seqlens (the varlen form); pass neither or both")
        batch, seqlen, total = x.shape[0], x.shape[2 if heads_first else 1], None
    if isinstance(seqlen_offsets, torch.Tensor):
        if seqlen_offsets.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"seqlen_offsets must be an int or an int32/int64 tensor, got {seqlen_offsets.dtype}")
        if tuple(seqlen_offsets.shape) != (batch,):
            raise ValueError(f"seqlen_offsets must have shape ({batch},) (one offset per sequence), "
                             f"got {tuple(seqlen_offsets.shape)}")
        if seqlen_offsets.device != x.device:
            raise ValueError(f"seqlen_offsets is on {seqlen_offsets.device} but x is on {x.device}")
    else:
        check_int("seqlen_offsets", seqlen_offsets)
    return batch, seqlen, total


def _check_positions(cos, seqlen_offsets, cu_seqlens, batch, seqlen, total, check_bounds) -> None:
    """IndexError unless every position (``offset + s`` for token s of a sequence) lies in
    ``[0, seqlen_ro)``; for varlen also a ValueError unless cu_seqlens fits x and max_seqlen.

    Dense x with an int offset: host arithmetic, always checked. Tensor offsets and varlen (checked
    with the actual sequence lengths): a few reductions and one device sync, skipped with
    ``check_bounds=False`` and, by default, while torch.compile traces. Unchecked, a position outside
    cos/sin is never read (the kernel rotates it by the identity), but a cu_seqlens past x would be."""
    s_ro = cos.shape[0]
    tensor_off = isinstance(seqlen_offsets, torch.Tensor)

    def bad_positions(lo, hi):
        return IndexError(f"positions {lo}..{hi} (seqlen_offsets + token index) are out of range for cos/sin "
                          f"with {s_ro} rows ([0, {s_ro}))")

    if cu_seqlens is None and not tensor_off and seqlen and batch:
        if seqlen_offsets < 0 or seqlen_offsets + seqlen > s_ro:
            raise bad_positions(seqlen_offsets, seqlen_offsets + seqlen - 1)
    if check_bounds is None:
        check_bounds = not torch.compiler.is_compiling()
    if not check_bool("check_bounds", check_bounds) or not (tensor_off or cu_seqlens is not None):
        return
    # the span of positions used, and for varlen cu_seqlens' first/last entries and length range
    if cu_seqlens is None:
        lens = torch.full((batch,), seqlen, device=seqlen_offsets.device)
    else:
        cu = cu_seqlens.long()
        lens = cu[1:] - cu[:-1]
    off = seqlen_offsets.long() if tensor_off else torch.full_like(lens, seqlen_offsets)
    live = lens > 0
    stats = [torch.where(live, off, 0).min() if batch else lens.new_zeros(()),
             torch.where(live, off + lens - 1, -1).max() if batch else lens.new_full((), -1)]
    if cu_seqlens is not None:
        stats += [cu[0], cu[-1], *(torch.aminmax(lens) if batch else (cu[0], cu[0]))]
    vals = torch.stack(stats).tolist()  # the one sync
    if cu_seqlens is not None:
        first, last, lmin, lmax = vals[2:]
        if first != 0 or lmin < 0:
            raise ValueError(f"cu_seqlens must start at 0 and never decrease, got cu_seqlens[0] = {first} and a "
                             f"length {lmin}")
        if last != total:
            raise ValueError(f"cu_seqlens[-1] = {last} must equal the number of packed tokens in x ({total})")
        if lmax > seqlen:
            raise ValueError(f"cu_seqlens has a sequence of length {lmax} > max_seqlen {seqlen}")
    lo, hi = vals[:2]
    if lo < 0 or hi >= s_ro:
        raise bad_positions(lo, hi)


# --------------------------------------------------------------------------------------------------
# registered ops (bodies launch the kernel; see embedattn._registry)
# --------------------------------------------------------------------------------------------------
def _rotary_fwd_fake(x, cos, sin, offsets, cu_seqlens, offset, max_seqlen, interleaved, conjugate, heads_first):
    return x.new_empty(x.shape)


@kernel_op("rotary_fwd", fake=_rotary_fwd_fake)
def _rotary_fwd(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, offsets: torch.Tensor | None,
                cu_seqlens: torch.Tensor | None, offset: int, max_seqlen: int, interleaved: bool, conjugate: bool,
                heads_first: bool) -> torch.Tensor:
    """x rotated (sin negated with ``conjugate``: the backward) into a new contiguous tensor of x's shape."""
    from .kernels.rotary import rotary_forward

    return rotary_forward(x, cos, sin, offsets, cu_seqlens, offset=offset, max_seqlen=max_seqlen,
                          interleaved=interleaved, conjugate=conjugate, heads_first=heads_first)


def _rotary_fwd_inplace_fake(x, cos, sin, offsets, cu_seqlens, offset, max_seqlen, interleaved, conjugate,
                             heads_first):
    return None


@kernel_op("rotary_fwd_inplace", fake=_rotary_fwd_inplace_fake, mutates_args=("x",))
def _rotary_fwd_inplace(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, offsets: torch.Tensor | None,
                        cu_seqlens: torch.Tensor | None, offset: int, max_seqlen: int, interleaved: bool,
                        conjugate: bool, heads_first: bool) -> None:
    """x rotated in place (the features past rotary_dim are not touched)."""
    from .kernels.rotary import rotary_forward

    rotary_forward(x, cos, sin, offsets, cu_seqlens, offset=offset, max_seqlen=max_seqlen, interleaved=interleaved,
                   conjugate=conjugate, heads_first=heads_first, out=x)


class RotaryFunction(torch.autograd.Function):
    """``apply(x, cos, sin, offsets, cu_seqlens, offset, max_seqlen, interleaved, inplace, heads_first)``
    through the registered ops; the gradient (to x only) is the conjugate rotation of the incoming one."""

    @staticmethod
    def forward(ctx, x, cos, sin, offsets, cu_seqlens, offset, max_seqlen, interleaved, inplace, heads_first):
        if inplace:
            torch.ops.embedattn.rotary_fwd_inplace(x, cos, sin, offsets, cu_seqlens, offset, max_seqlen,
                                                   interleaved, False, heads_first)
            if ctx.needs_input_grad[0]:  # (dynamo traces mark_dirty only where autograd records the call)
                ctx.mark_dirty(x)
            out = x
        else:
            out = torch.ops.embedattn.rotary_fwd(x, cos, sin, offsets, cu_seqlens, offset, max_seqlen, interleaved,
                                                 False, heads_first)
        ctx.save_for_backward(cos, sin, offsets, cu_seqlens)
        ctx.meta = (offset, max_seqlen, interleaved, heads_first)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        cos, sin, offsets, cu_seqlens = ctx.saved_tensors
        offset, max_seqlen, interleaved, heads_first = ctx.meta
        dx = None
        if ctx.needs_input_grad[0]:
            dx = torch.ops.embedattn.rotary_fwd(grad, cos, sin, offsets, cu_seqlens, offset, max_seqlen, interleaved,
                                                True, heads_first)
        return dx, None, None, None, None, None, None, None, None, None


def rotary(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    interleaved: bool = False,
    inplace: bool = False,
    seqlen_offsets: int | torch.Tensor = 0,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
    *,
    heads_first: bool = False,
    check_bounds: bool | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Rotary position embedding, FlashAttention's ``apply_rotary_emb(x, cos, sin, interleaved, inplace,
    seqlen_offsets, cu_seqlens, max_seqlen)`` plus embedattn's (B, H, S, D) layout.

    Args:
        x: (B, S, H, D); (B, H, S, D) with ``heads_first=True``; with ``cu_seqlens`` the packed
            (total, H, D) (or (H, total, D) with ``heads_first``). Any strides. float16, bfloat16,
            float32 (kernels; computed in float32) or float64 (the reference).
        cos, sin: (seqlen_ro, rotary_dim / 2), float32 or x's dtype (both the same). ``rotary_dim``
            <= D features are rotated; the rest pass through unchanged.
        interleaved: rotate (x[2j], x[2j+1]) pairs (GPT-J) instead of (x[j], x[j + rotary_dim/2]) (GPT-NeoX).
        inplace: write the result into x and return x (x must not be a leaf that requires grad).
        seqlen_offsets: int, or (B,) int32/int64 tensor: the position of each sequence's first token
            (decoding with a KV cache). Every position ``offset + s`` (s < that sequence's length)
            must lie in [0, seqlen_ro): IndexError otherwise.
        cu_seqlens: (B + 1,) int32/int64 cumulative sequence lengths of the packed form, with
            ``max_seqlen`` (an int bounding every length; it sizes the launch grid).
        heads_first: x is (B, H, S, D) (or (H, total, D)).
        check_bounds: check the positions of tensor offsets and of the varlen form, and cu_seqlens
            against x and max_seqlen (a few reductions, one device sync). ``None`` checks eagerly and
            not while torch.compile traces; ``False`` skips it (a position past cos/sin is then
            rotated by the identity, never read). Dense x with an int offset is always checked.
        backend: None | "auto" | "triton" | "reference" (see ``embedattn._backend``).

    Returns x's shape and dtype (a new contiguous tensor, or x itself with ``inplace``). Differentiable
    with respect to x (cos/sin get gradients on the reference only: see the module docstring).
    """
    batch, seqlen, total = _check(x, cos, sin, interleaved, inplace, seqlen_offsets, cu_seqlens, max_seqlen,
                                  heads_first)
    _check_positions(cos, seqlen_offsets, cu_seqlens, batch, seqlen, total, check_bounds)
    be = resolve(backend, x, cos, sin, op="rotary", dtype=x.dtype)
    if be == "triton" and torch.is_grad_enabled() and (cos.requires_grad or sin.requires_grad):
        if check_backend(backend) == "triton":
            raise ValueError("backend='triton' computes no gradient for cos/sin, which require grad: detach them "
                             "or use backend='reference'")
        be = "reference"
    if be == "reference":
        return _ref.rotary(x, cos, sin, interleaved, inplace, seqlen_offsets, cu_seqlens, max_seqlen,
                           heads_first=heads_first)
    offsets = seqlen_offsets if isinstance(seqlen_offsets, torch.Tensor) else None
    offset = 0 if offsets is not None else int(seqlen_offsets)
    out = RotaryFunction.apply(x, cos, sin, offsets, cu_seqlens, offset, 0 if max_seqlen is None else int(max_seqlen),
                               interleaved, inplace, heads_first)
    # in place, x itself (the Function returns x when autograd records it, else an alias of it)
    return x if inplace else out
