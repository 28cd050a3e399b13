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

In place on a leaf that requires grad (or a view of one), as FlashAttention allows: x's memory is
rotated in place and the gradient is still right (the rotation's gradient does not depend on x), but
autograd cannot give a leaf a history, so the returned tensor is a new one holding the same values
and carrying the gradient (the in-place write bumps x's version, so an op that saved x for its
backward fails loudly instead of using the rotated values). embedattn refuses ``inplace=True`` only
where the result would be ill-defined: x with broadcast (stride-0) dimensions, whose elements share
memory (FlashAttention's kernel would race on them).

Bounds (``check_bounds``, the modes of ``embedattn.embedding``): positions (``seqlen_offsets`` + token
index) must lie in ``[0, seqlen_ro)`` and, for varlen, cu_seqlens must partition x's rows
(``0 = cu[0] <= ... <= cu[B] = total``) with every length ``<= max_seqlen``. Dense x with an int offset
is host arithmetic, checked in every mode. Otherwise:

* ``"sync"`` (``True``; the default eagerly on the CPU): a few reductions and one host read before
  anything runs; an IndexError (positions) or ValueError (cu_seqlens, max_seqlen) says what is wrong.
* ``"device"`` (the default on CUDA and while torch.compile traces): no host sync; the kernel checks
  each sequence and clears a flag that ``torch._assert_async`` checks after the launch (a RuntimeError
  at once on the CPU, a device-side assertion on CUDA), the reference road the same in torch ops.
* ``False``/``"off"``: nothing is checked and nothing goes out of bounds: a position outside cos/sin is
  rotated by the identity, and cu_seqlens is read as a partition of x's rows (its running maximum,
  clamped into ``[0, total]``, from 0 to ``total``: a few device ops on B + 1 entries, no sync), so
  every row is written once, the same on every backend. A sequence longer than ``max_seqlen`` is
  rotated in full (``max_seqlen`` only sizes the kernel's grid).

``apply_rotary_emb``, ``apply_rotary_emb_qkv_`` and ``apply_rotary_emb_kv_`` are FlashAttention's
``flash_attn.layers.rotary`` functions with their signatures (``apply_rotary_emb_torch`` its plain
PyTorch formula).
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from ._backend import check_backend, resolve
from ._checks import assert_ok, bounds_mode, check_bool, check_device, check_int, check_tensor, ok_flag
from ._registry import kernel_op
from .reference import _rotary as _ref

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check(x, cos, sin, interleaved, inplace, seqlen_offsets, cu_seqlens, max_seqlen, heads_first):
    """Validate the arguments; return (batch, seqlen, total): seqlen bounds every sequence's length
    (``max_seqlen`` for varlen), total is the packed token count (varlen) or None."""
    check_bool("interleaved", interleaved)
    check_bool("inplace", inplace)
    check_bool("heads_first", heads_first)
    check_tensor("x", x)
    if x.dtype not in _FLOATS:
        raise TypeError(f"x must be float16, bfloat16, float32 or float64, got {x.dtype}")
    varlen = cu_seqlens is not None
    layout = ("(H, total, D)" if heads_first else "(total, H, D)") if varlen else \
        ("(B, H, S, D)" if heads_first else "(B, S, H, D)")
    if x.dim() != (3 if varlen else 4):
        raise ValueError(f"x must be {3 if varlen else 4}-D {layout}{' with cu_seqlens' if varlen else ''}, "
                         f"got shape {tuple(x.shape)}")
    for name, t in (("cos", cos), ("sin", sin)):
        check_tensor(name, t)
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D (seqlen_ro, rotary_dim / 2), got shape {tuple(t.shape)}")
        if t.dtype not in (torch.float32, x.dtype):
            raise TypeError(f"{name} must be float32 or x's dtype {x.dtype}, got {t.dtype}")
        check_device(name, t, "x", x)
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
    if inplace and any(st == 0 and n > 1 for st, n in zip(x.stride(), x.shape)):
        raise ValueError("inplace=True needs x without broadcast (stride-0) dimensions: "
                         "several elements share one memory location")
    if varlen:
        check_tensor("cu_seqlens", cu_seqlens, optional=True)
        if cu_seqlens.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
        if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 1:
            raise ValueError(f"cu_seqlens must be 1-D (batch + 1,), got shape {tuple(cu_seqlens.shape)}")
        check_device("cu_seqlens", cu_seqlens, "x", x)
        if max_seqlen is None:
            raise ValueError("cu_seqlens needs max_seqlen (the longest sequence; it sizes the launch grid)")
        seqlen = check_int("max_seqlen", max_seqlen, low=0)
        batch, total = cu_seqlens.shape[0] - 1, x.shape[1 if heads_first else 0]
        if batch == 0 and total:
            raise ValueError(f"cu_seqlens {tuple(cu_seqlens.shape)} holds no sequence but x has {total} packed "
                             f"tokens: cu_seqlens must be (batch + 1,) with cu_seqlens[-1] = {total}")
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
        check_device("seqlen_offsets", seqlen_offsets, "x", x)
    else:
        check_int("seqlen_offsets", seqlen_offsets)
    return batch, seqlen, total


_BAD_BOUNDS = ("rotary: a position (seqlen_offsets + token index) lies outside cos/sin, or cu_seqlens is not a "
               "partition of x's rows (0 = cu_seqlens[0] <= ... <= cu_seqlens[-1] = total, lengths <= max_seqlen); "
               "check_bounds='sync' raises naming it")


def _bound_stats(cos, seqlen_offsets, cu_seqlens, batch, seqlen) -> torch.Tensor:
    """The device values the bounds depend on, stacked: the first and last position used, and for varlen
    cu_seqlens' first and last entries and its shortest and longest length."""
    tensor_off = isinstance(seqlen_offsets, torch.Tensor)
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
    return torch.stack(stats)


def _in_bounds(cos, seqlen_offsets, cu_seqlens, batch, seqlen, total) -> torch.Tensor:
    """The "device" check in torch ops (the reference road): a bool tensor, no host read."""
    st = _bound_stats(cos, seqlen_offsets, cu_seqlens, batch, seqlen)
    ok = (st[0] >= 0) & (st[1] < cos.shape[0])
    if cu_seqlens is not None:
        ok = ok & (st[2] == 0) & (st[3] == total) & (st[4] >= 0) & (st[5] <= seqlen)
    return ok


def _check_positions(cos, seqlen_offsets, cu_seqlens, batch, seqlen, total, mode: str) -> None:
    """The host part of the bounds checks (see the module docstring): dense x with an int offset in every
    mode; tensor offsets and varlen in "sync" mode only (a few reductions and one device sync), an
    IndexError for positions past cos/sin, a ValueError for cu_seqlens or max_seqlen."""
    s_ro = cos.shape[0]
    tensor_off = isinstance(seqlen_offsets, torch.Tensor)

    def bad_positions(lo, hi):
        return IndexError(f"positions {lo}..{hi} (seqlen_offsets + token index) are out of range for cos/sin "
                          f"with {s_ro} rows ([0, {s_ro}))")

    if cu_seqlens is None and not tensor_off and seqlen and batch:
        if seqlen_offsets < 0 or seqlen_offsets + seqlen > s_ro:
            raise bad_positions(seqlen_offsets, seqlen_offsets + seqlen - 1)
    if mode != "sync" or not (tensor_off or cu_seqlens is not None):
        return
    vals = _bound_stats(cos, seqlen_offsets, cu_seqlens, batch, seqlen).tolist()  # the one sync
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


def _partition(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """cu_seqlens made a partition of ``total`` rows on the device (no sync): clamped into [0, total], its
    first entry 0 and its last ``total``, then its running maximum. A valid one comes back unchanged."""
    if cu_seqlens.shape[0] < 2:
        return cu_seqlens
    c = cu_seqlens.clamp(0, total)
    c = torch.cat([c.new_zeros(1), c[1:-1], c.new_full((1,), total)])
    return torch.cummax(c, 0).values


def _flag(ok: torch.Tensor) -> torch.Tensor | None:
    """The launcher's ``ok``: None for the empty tensor that stands for "no check" (a mutated argument of a
    registered op must be a tensor: Inductor cannot functionalize a None one)."""
    return ok if ok.numel() else None


def _no_check(device) -> torch.Tensor:
    return torch.empty(0, dtype=torch.int32, device=device)


# --------------------------------------------------------------------------------------------------
# registered ops (bodies launch the kernel; see embedattn._registry)
# --------------------------------------------------------------------------------------------------
def _rotary_fwd_fake(x, cos, sin, offsets, cu_seqlens, offset, max_seqlen, interleaved, conjugate, heads_first,
                     ok):
    return x.new_empty(x.shape)


@kernel_op("rotary_fwd", fake=_rotary_fwd_fake, mutates_args=("ok",))
def _rotary_fwd(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, offsets: torch.Tensor | None,
                cu_seqlens: torch.Tensor | None, offset: int, max_seqlen: int, interleaved: bool, conjugate: bool,
                heads_first: bool, ok: torch.Tensor) -> torch.Tensor:
    """x rotated (sin negated with ``conjugate``: the backward) into a new contiguous tensor of x's shape.
    ``ok`` (int32 (1,), set to 1 by the caller) is cleared when a bound is violated; empty: no check."""
    from .kernels.rotary import rotary_forward

    return rotary_forward(x, cos, sin, offsets, cu_seqlens, offset=offset, max_seqlen=max_seqlen,
                          interleaved=interleaved, conjugate=conjugate, heads_first=heads_first, ok=_flag(ok))


def _rotary_fwd_inplace_fake(x, cos, sin, offsets, cu_seqlens, offset, max_seqlen, interleaved, conjugate,
                             heads_first, ok):
    return None


@kernel_op("rotary_fwd_inplace", fake=_rotary_fwd_inplace_fake, mutates_args=("x", "ok"))
def _rotary_fwd_inplace(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, offsets: torch.Tensor | None,
                        cu_seqlens: torch.Tensor | None, offset: int, max_seqlen: int, interleaved: bool,
                        conjugate: bool, heads_first: bool, ok: torch.Tensor) -> None:
    """x rotated in place (the features past rotary_dim are not touched); ``ok`` as in ``rotary_fwd``."""
    from .kernels.rotary import rotary_forward

    rotary_forward(x, cos, sin, offsets, cu_seqlens, offset=offset, max_seqlen=max_seqlen, interleaved=interleaved,
                   conjugate=conjugate, heads_first=heads_first, out=x, ok=_flag(ok))


class RotaryFunction(torch.autograd.Function):
    """``apply(x, cos, sin, offsets, cu_seqlens, offset, max_seqlen, interleaved, inplace, heads_first, ok)``
    through the registered ops; the gradient (to x only) is the conjugate rotation of the incoming one.
    ``ok``: the "device" bounds flag (or None)."""

    @staticmethod
    def forward(ctx, x, cos, sin, offsets, cu_seqlens, offset, max_seqlen, interleaved, inplace, heads_first, ok):
        if ok is None:
            ok = _no_check(x.device)
        if inplace:
            torch.ops.embedattn.rotary_fwd_inplace(x, cos, sin, offsets, cu_seqlens, offset, max_seqlen,
                                                   interleaved, False, heads_first, ok)
            if ctx.needs_input_grad[0]:  # (dynamo traces mark_dirty only where autograd records the call)
                ctx.mark_dirty(x)
            out = x
        else:
            out = torch.ops.embedattn.rotary_fwd(x, cos, sin, offsets, cu_seqlens, offset, max_seqlen, interleaved,
                                                 False, heads_first, ok)
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
                                                True, heads_first, _no_check(grad.device))
        return dx, *(None,) * 10


def _leaf_in_place(x: torch.Tensor) -> bool:
    """An in-place write to x that autograd cannot record: x is a leaf that requires grad, or a view of one."""
    if not (torch.is_grad_enabled() and x.requires_grad):
        return False
    return x.is_leaf or (x._base is not None and x._base.is_leaf)


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
    check_bounds: bool | str | None = None,
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
        inplace: write the result into x and return x. On a leaf that requires grad (FlashAttention
            allows it) x is still rotated in place, and a new tensor with the same values carries the
            gradient (see the module docstring). Refused for x with broadcast (stride-0) dimensions.
        seqlen_offsets: int, or (B,) int32/int64 tensor: the position of each sequence's first token
            (decoding with a KV cache). Every position ``offset + s`` (s < that sequence's length)
            must lie in [0, seqlen_ro): IndexError otherwise.
        cu_seqlens: (B + 1,) int32/int64 cumulative sequence lengths of the packed form, with
            ``max_seqlen`` (an int bounding every length; it sizes the launch grid).
        heads_first: x is (B, H, S, D) (or (H, total, D)).
        check_bounds: how the positions of tensor offsets and of the varlen form, and cu_seqlens
            against x and max_seqlen, are checked: None | "sync" (``True``) | "device" | False/"off", as
            for ``embedattn.embedding`` (the module docstring says what each does; unchecked, nothing is
            read or written out of bounds and every row of the output is written). Dense x with an int
            offset is always checked.
        backend: None | "auto" | "triton" | "reference" (see ``embedattn._backend``).

    Returns x's shape and dtype (a new contiguous tensor, or x itself with ``inplace``). Differentiable
    with respect to x (cos/sin get gradients on the reference only: see the module docstring).
    """
    batch, seqlen, total = _check(x, cos, sin, interleaved, inplace, seqlen_offsets, cu_seqlens, max_seqlen,
                                  heads_first)
    mode = bounds_mode(check_bounds, x.device)
    _check_positions(cos, seqlen_offsets, cu_seqlens, batch, seqlen, total, mode)
    be = resolve(backend, x, cos, sin, op="rotary", dtype=x.dtype)
    if be == "triton" and torch.is_grad_enabled() and (cos.requires_grad or sin.requires_grad):
        if check_backend(backend) == "triton":
            raise ValueError("backend='triton' computes no gradient for cos/sin, which require grad: detach them "
                             "or use backend='reference'")
        be = "reference"
    # FlashAttention's in place on a leaf: computed out of place, then written into x (module docstring)
    leaf = inplace and _leaf_in_place(x)
    out = _dispatch(x, cos, sin, interleaved, inplace and not leaf, seqlen_offsets, cu_seqlens, max_seqlen,
                    heads_first, mode, be, batch, seqlen, total)
    if leaf:
        with torch.no_grad():
            x.copy_(out)
    return out


def _dispatch(x, cos, sin, interleaved, inplace, seqlen_offsets, cu_seqlens, max_seqlen, heads_first, mode, be,
              batch, seqlen, total):
    """``rotary`` after its checks: the reference, or the kernels through RotaryFunction, with the bounds
    handling of ``mode`` (see the module docstring)."""
    tensor_off = isinstance(seqlen_offsets, torch.Tensor)
    device_check = mode == "device" and (tensor_off or cu_seqlens is not None)
    raw_cu = cu_seqlens
    if cu_seqlens is not None and (mode == "off" or (be == "reference" and mode == "device")):
        cu_seqlens = _partition(cu_seqlens, total)
    if be == "reference":
        if device_check:  # the kernel's check, in torch ops
            assert_ok(_in_bounds(cos, seqlen_offsets, raw_cu, batch, seqlen, total), _BAD_BOUNDS)
        return _ref.rotary(x, cos, sin, interleaved, inplace, seqlen_offsets, cu_seqlens, max_seqlen,
                           heads_first=heads_first)
    offsets = seqlen_offsets if tensor_off else None
    offset = 0 if tensor_off else int(seqlen_offsets)
    ok = ok_flag(x.device) if device_check else None
    out = RotaryFunction.apply(x, cos, sin, offsets, cu_seqlens, offset, 0 if max_seqlen is None else int(max_seqlen),
                               interleaved, inplace, heads_first, ok)
    if ok is not None:
        assert_ok(ok, _BAD_BOUNDS)
    # in place, x itself (the Function returns x when autograd records it, else an alias of it)
    return x if inplace else out


# --------------------------------------------------------------------------------------------------
# FlashAttention's flash_attn.layers.rotary, by name and signature
# --------------------------------------------------------------------------------------------------
apply_rotary_emb = rotary  # (x, cos, sin, interleaved, inplace, seqlen_offsets, cu_seqlens, max_seqlen)
apply_rotary_emb_func = rotary  # FlashAttention's older name


def _in_place_parts(base, parts, assemble, interleaved, seqlen_offsets, check_bounds, backend):
    """Rotate each (view of ``base``, cos, sin) of ``parts`` in place and return ``base``. When ``base`` is a
    leaf that requires grad (or a view of one): ``assemble(the parts rotated out of place)``, a new tensor
    carrying the gradient, whose values are then written into ``base`` (``rotary``'s in place on a leaf)."""
    if not _leaf_in_place(base):
        for v, c, s in parts:
            rotary(v, c, s, interleaved, True, seqlen_offsets, check_bounds=check_bounds, backend=backend)
        return base
    out = assemble([rotary(v, c, s, interleaved, False, seqlen_offsets, check_bounds=check_bounds, backend=backend)
                    for v, c, s in parts])
    with torch.no_grad():
        base.copy_(out)
    return out


def apply_rotary_emb_qkv_(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    cos_k: torch.Tensor | None = None,
    sin_k: torch.Tensor | None = None,
    interleaved: bool = False,
    seqlen_offsets: int | torch.Tensor = 0,
    num_heads_q: int | None = None,
    *,
    check_bounds: bool | str | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """FlashAttention's ``apply_rotary_emb_qkv_``: rotate Q and K of a packed qkv in place and return it.

    qkv: (B, S, 3, H, D), or (B, S, num_heads_q + 2 * num_heads_k, D) (GQA/MQA) with ``num_heads_q``.
    cos/sin (seqlen_ro, rotary_dim / 2) rotate Q, and K unless ``cos_k``/``sin_k`` are given (one of
    them alone replaces only its own table, as in FlashAttention). V is untouched. ``seqlen_offsets``,
    ``interleaved``, ``check_bounds`` and ``backend`` as in ``rotary``. Gradients flow to qkv (its V part
    unchanged). On a leaf that requires grad, qkv is rotated in place and the returned tensor is a new
    one with its values that carries the gradient (``rotary``'s rule, see the module docstring).
    """
    check_tensor("qkv", qkv)
    layouts = "(batch, seqlen, 3, nheads, headdim) or (batch, seqlen, num_heads_q + 2 * num_heads_k, headdim)"
    if qkv.dim() == 5 and qkv.shape[2] == 3:
        h = qkv.shape[3]
        if num_heads_q is not None and check_int("num_heads_q", num_heads_q) != h:
            raise ValueError(f"num_heads_q = {num_heads_q} contradicts qkv {tuple(qkv.shape)} (3, {h} heads)")
        q, k, rest = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2:]
        qk = qkv[:, :, :2].flatten(2, 3) if qkv.stride(2) == h * qkv.stride(3) else None  # a view, or None

        def join(parts):
            return torch.cat([parts[0].unflatten(2, (2, h)) if len(parts) == 1 else torch.stack(parts, 2), rest], 2)
    elif qkv.dim() == 4:
        if num_heads_q is None:
            raise ValueError(f"qkv {tuple(qkv.shape)} is 4-D: it needs num_heads_q (qkv must be {layouts})")
        nq = check_int("num_heads_q", num_heads_q, low=1)
        nk = (qkv.shape[2] - nq) // 2
        if nk < 1 or nq + 2 * nk != qkv.shape[2]:
            raise ValueError(f"qkv has {qkv.shape[2]} heads, not num_heads_q + 2 * num_heads_k with num_heads_q = "
                             f"{nq} and num_heads_k >= 1")
        q, k, rest, qk = qkv[:, :, :nq], qkv[:, :, nq:nq + nk], qkv[:, :, nq + nk:], qkv[:, :, :nq + nk]

        def join(parts):
            return torch.cat([*parts, rest], 2)
    else:
        raise ValueError(f"qkv must be {layouts}, got shape {tuple(qkv.shape)}")
    same = cos_k is None and sin_k is None
    cos_k, sin_k = cos if cos_k is None else cos_k, sin if sin_k is None else sin_k
    # Q and K in one launch where they share the tables and one strided view holds both
    parts = [(qk, cos, sin)] if same and qk is not None else [(q, cos, sin), (k, cos_k, sin_k)]
    return _in_place_parts(qkv, parts, join, interleaved, seqlen_offsets, check_bounds, backend)


def apply_rotary_emb_kv_(
    kv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    interleaved: bool = False,
    seqlen_offsets: int | torch.Tensor = 0,
    *,
    check_bounds: bool | str | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """FlashAttention's ``apply_rotary_emb_kv_``: rotate K of a packed kv (B, S, 2, H, D) in place and return
    kv (V untouched); arguments and gradients as in ``apply_rotary_emb_qkv_``."""
    check_tensor("kv", kv)
    if kv.dim() != 5 or kv.shape[2] != 2:
        raise ValueError(f"kv must be (batch, seqlen, 2, nheads, headdim), got shape {tuple(kv.shape)}")
    return _in_place_parts(kv, [(kv[:, :, 0], cos, sin)], lambda parts: torch.stack([parts[0], kv[:, :, 1]], 2),
                           interleaved, seqlen_offsets, check_bounds, backend)


def apply_rotary_emb_torch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                           interleaved: bool = False) -> torch.Tensor:
    """FlashAttention's plain PyTorch rotary (its tests' oracle): x (B, S, H, D) and cos/sin already taken
    at the tokens' positions, (S, rotary_dim / 2) or (B, S, rotary_dim / 2); computed in the inputs' dtype."""
    if 2 * cos.shape[-1] > x.shape[-1]:
        raise ValueError(f"rotary_dim = 2 * cos.shape[-1] = {2 * cos.shape[-1]} exceeds the head dim {x.shape[-1]}")
    return _ref.rotate(x, cos.unsqueeze(-2), sin.unsqueeze(-2), interleaved)
