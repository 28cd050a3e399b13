"""Fused attention: argument checks, the registered ops, the autograd Functions and the public entries.

One road per call: the entry checks its arguments into one ``AttnSpec`` (every feature, its tensors included:
``make_spec``), resolves the backend once (``_resolve``; the SDPA drop-in and the transformers integration ask
``sdpa_call``, which does both), then runs either the reference (``embedattn.reference``), torch's own SDPA
(``auto`` off CUDA, where its semantics are exactly ours), or the Triton kernels through one
``torch.autograd.Function`` whose forward and backward call the registered ops
``torch.ops.embedattn.attention_fwd`` / ``attention_bwd`` (``varlen_fwd`` / ``varlen_bwd``, ``kvcache_fwd``). The
spec travels flat through the ops' schema (``AttnSpec.op_args``), is rebuilt once per op (``_spec_op``) and reaches
the launchers in ``kernels/`` as it left the checks. Eager and ``torch.compile`` take the same road, the same
kernels included (``_kernel_impls`` decides at the entry).
"""

from __future__ import annotations

import inspect
import math
import typing
from dataclasses import dataclass, fields, replace
from numbers import Integral, Real
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from . import configs, reference
from ._backend import attention_impl, check_backend, resolve
from ._checks import assert_ok, bounds_mode, check_bool, check_float, check_int, check_seed, seed_tensor
from ._registry import kernel_op
from .reference._attention import autograd_transforms_active

# captured at import so that the drop-in's fallback still reaches torch when patch_sdpa() is active
_TORCH_SDPA = F.scaled_dot_product_attention

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_REFERENCE_DTYPES = _TRITON_DTYPES + (torch.float64,)
MAX_HEAD_DIM = 512  # the kernels' head dims, Q/K and V each (forward and backward); KV-cache decoding: below
MAX_DECODE_HEAD_DIM = 576  # Q/K in attention_with_kvcache (DeepSeek's MLA latent head), V up to MAX_HEAD_DIM
WINDOW_MAX = 1 << 30  # window sides past any sequence mean "unbounded"; clamped so no index arithmetic wraps
_LN2 = math.log(2.0)


class AttentionInputError(ValueError, RuntimeError):
    """Bad attention input. A ValueError, and a RuntimeError like torch SDPA's own errors."""


class AttentionTypeError(TypeError, RuntimeError):
    """Bad attention input type. A TypeError, and a RuntimeError like torch SDPA's own errors."""


# --------------------------------------------------------------------------------------------------
# the spec: one checked carrier of everything a call asks for beyond q, k, v, from the checks to the launchers
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AttnSpec:
    """The checked arguments of one attention call beyond q, k, v and their layout, as the launchers take them.

    Query i sees key j iff ``j <= i + causal_offset`` under ``causal`` (``Nk - Nq`` is bottom-right,
    0 is torch's top-left ``is_causal``; varlen and KV-cache calls use each sequence's own
    bottom-right diagonal), and ``i + causal_offset - window_left <= j <= i + causal_offset +
    window_right`` under a window (``WINDOW_MAX``: that side unbounded). ALiBi distances are measured from the
    same diagonal. ``mask``: bool (True = attend) or additive, a (B, Hq, Nq, Nk) view (never copied); ``alibi``:
    float32 (float64 for float64 inputs) (Hq,) or (B, Hq) slopes; ``seed``: the (1,) int64 dropout seed on the
    inputs' device, with dropout only (None there: drawn from torch's generator when the call runs); ``sinks``:
    float32 (float64 for float64 inputs) (Hq,) learned sink logits (gpt-oss: one per query head in every row's
    softmax denominator, no value; natural log, not scaled, capped, biased or dropped), differentiable. Built by
    ``make_spec`` (checked) or directly (benchmarks, tests).

    The registered ops take the fields flat, in this order (``op_args``; the tensors first, then the scalars:
    their schema is the fields' annotations) and rebuild the spec in one place (``from_op_args``). A feature is
    one field here: ``plain`` (what the sm90 kernels and torch's own SDPA cover), the op schemas and the
    autograd Functions' gradient slots (``input_grads``) follow from the field list.
    """

    mask: torch.Tensor | None = None
    alibi: torch.Tensor | None = None
    seed: torch.Tensor | None = None
    sinks: torch.Tensor | None = None
    causal: bool = False
    causal_offset: int = 0
    scale: float = 1.0
    window_left: int = WINDOW_MAX
    window_right: int = WINDOW_MAX
    softcap: float = 0.0
    dropout_p: float = 0.0

    def op_args(self) -> tuple:
        """The fields, flat, in the order of the registered ops' schema (after their own arguments)."""
        return tuple(getattr(self, name) for name in _SPEC_FIELDS)

    @classmethod
    def from_op_args(cls, args) -> AttnSpec:
        """The spec ``op_args`` flattened (the one place a spec is rebuilt)."""
        return cls(*args)

    def input_grads(self, **grads) -> tuple:
        """The gradients of the ``op_args`` inputs of an autograd Function: None but for the fields named."""
        return tuple(grads.get(name) for name in _SPEC_FIELDS)

    def plain(self) -> bool:
        """No feature beyond causal, causal_offset and scale: every other field at its default."""
        return all(getattr(self, name) is None if off is None else getattr(self, name) == off
                   for name, off in _FEATURES_OFF)

    @property
    def window(self) -> tuple[int, int] | None:
        """(left, right) with -1 for an unbounded side, or None when neither side is bounded."""
        if self.window_left >= WINDOW_MAX and self.window_right >= WINDOW_MAX:
            return None
        return tuple(-1 if side >= WINDOW_MAX else side for side in (self.window_left, self.window_right))

    def reference_kwargs(self) -> dict:
        """The reference's keyword arguments for the scalar features, ALiBi and the sinks (the diagonal, mask and
        dropout are the caller's: the varlen and KV-cache references measure the diagonal per sequence)."""
        return dict(causal=self.causal, scale=self.scale, window=self.window, softcap=self.softcap,
                    alibi_slopes=self.alibi, sinks=self.sinks)


_SPEC_FIELDS = tuple(f.name for f in fields(AttnSpec))
_SPEC_TENSORS = sum(1 for f in fields(AttnSpec) if "Tensor" in str(f.type))  # the tensor fields come first
_FEATURES_OFF = tuple((f.name, f.default) for f in fields(AttnSpec) if f.name not in ("causal", "causal_offset",
                                                                                         "scale"))


# --------------------------------------------------------------------------------------------------
# argument checks
# --------------------------------------------------------------------------------------------------
def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, paged: bool = False) -> None:
    """q (B, Hq, N, D), k (B, Hkv, N, D), v (B, Hkv, N, Dv) (with ``paged``, pools of pages (num_pages, Hkv,
    page_size, D or Dv)); the value head dim Dv may differ from D (MLA)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise AttentionTypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise AttentionInputError(f"{name} must be 4-D (B, H, N, D), got shape {tuple(t.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise AttentionTypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dtype not in _REFERENCE_DTYPES:
        raise AttentionTypeError(f"q, k, v dtype must be float16, bfloat16, float32 or float64, got {q.dtype}")
    if not (q.device == k.device == v.device):
        raise AttentionInputError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if k.shape[:3] != v.shape[:3]:
        raise AttentionInputError(f"k and v must have the same shape but for the head dim, (B, Hkv, N), got "
                                  f"{tuple(k.shape)} and {tuple(v.shape)}")
    if not paged and q.shape[0] != k.shape[0]:
        raise AttentionInputError(f"batch size of q ({q.shape[0]}) and k/v ({k.shape[0]}) differ")
    if q.shape[3] != k.shape[3]:
        raise AttentionInputError(f"head dim of q ({q.shape[3]}) and k ({k.shape[3]}) differ")
    hq, hkv = q.shape[1], k.shape[1]
    if hkv == 0 and hq != 0 or hkv and hq % hkv != 0:
        raise AttentionInputError(f"query heads ({hq}) must be a multiple of key/value heads ({hkv})")


def _check_mask(mask: torch.Tensor | None, q: torch.Tensor, nk: int) -> torch.Tensor | None:
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise AttentionTypeError(f"attn_mask must be a torch.Tensor or None, got {type(mask).__name__}")
    if mask.requires_grad:
        raise AttentionInputError("attn_mask requires grad; gradients with respect to the mask are not supported")
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise AttentionTypeError(f"attn_mask must be bool (True = attend) or floating (additive), got {mask.dtype}")
    if mask.device != q.device:
        raise AttentionInputError(f"attn_mask is on {mask.device}, q on {q.device}")
    shape = (q.shape[0], q.shape[1], q.shape[2], nk)
    if mask.dim() > 4:
        raise AttentionInputError(f"attn_mask must have at most 4 dims, got shape {tuple(mask.shape)}")
    try:
        return mask.expand(shape)
    except RuntimeError:
        raise AttentionInputError(
            f"attn_mask of shape {tuple(mask.shape)} is not broadcastable to (B, Hq, Nq, Nk) = {shape}"
        ) from None


def _real(name: str, value, what: str) -> float:
    """A real number (int or float, not a bool): TypeError naming ``name`` otherwise; ValueError if not finite."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise AttentionTypeError(f"{name} must be {what}, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise AttentionInputError(f"{name} must be {what}, got {value!r}")
    return value


def _resolve_scale(scale, head_dim: int) -> float:
    """The score scale: 1/sqrt(D) by default, else a finite number (checked)."""
    if scale is None:
        return 1.0 / math.sqrt(head_dim) if head_dim else 1.0
    return _real("scale", scale, "a finite float or None")


def _window_side(name: str, side) -> int:
    if isinstance(side, bool) or not isinstance(side, Integral):
        raise AttentionTypeError(f"window must be a (left, right) pair of ints (-1 = unbounded), got {name}={side!r}")
    return WINDOW_MAX if side < 0 else min(int(side), WINDOW_MAX)


def _check_alibi(alibi_slopes, q: torch.Tensor, n_batch: int, n_heads: int) -> torch.Tensor | None:
    if alibi_slopes is None:
        return None
    if not isinstance(alibi_slopes, torch.Tensor) or not alibi_slopes.is_floating_point():
        raise AttentionTypeError("alibi_slopes must be a floating tensor of shape (H,) or (B, H)")
    if alibi_slopes.requires_grad:
        raise AttentionInputError("alibi_slopes requires grad; gradients with respect to the slopes are not supported")
    if tuple(alibi_slopes.shape) not in ((n_heads,), (n_batch, n_heads)):
        raise AttentionInputError(f"alibi_slopes must have shape ({n_heads},) or ({n_batch}, {n_heads}), got "
                                  f"{tuple(alibi_slopes.shape)}")
    if alibi_slopes.device != q.device:
        raise AttentionInputError(f"alibi_slopes is on {alibi_slopes.device}, q on {q.device}")
    # float32 for the kernels; the float64 reference keeps float64 slopes
    return alibi_slopes.to(torch.float64 if q.dtype == torch.float64 else torch.float32)


def _check_sinks(sinks, q: torch.Tensor, n_heads: int) -> torch.Tensor | None:
    if sinks is None:
        return None
    if not isinstance(sinks, torch.Tensor) or not sinks.is_floating_point():
        got = sinks.dtype if isinstance(sinks, torch.Tensor) else type(sinks).__name__
        raise AttentionTypeError(f"sinks must be a floating tensor of shape (Hq,) = ({n_heads},), got {got}")
    if tuple(sinks.shape) != (n_heads,):
        raise AttentionInputError(f"sinks must have shape (Hq,) = ({n_heads},) (one logit per query head), got "
                                  f"{tuple(sinks.shape)}")
    if sinks.device != q.device:
        raise AttentionInputError(f"sinks is on {sinks.device}, q on {q.device}")
    # float32 for the kernels (float64 for float64 inputs); the cast is differentiable, so the gradient reaches
    # sinks in its own dtype
    return sinks.to(torch.float64 if q.dtype == torch.float64 else torch.float32)


def make_spec(q: torch.Tensor, *, n_keys: int | None = None, n_batch: int | None = None, causal=False,
              causal_offset: int = 0, scale=None, attn_mask=None, window=None, softcap=0.0, alibi_slopes=None,
              dropout_p=0.0, seed=None, sinks=None) -> AttnSpec:
    """The checked ``AttnSpec`` of a call on ``q`` (dense (B, Hq, Nq, D), or packed (total, Hq, D) with ``n_batch``
    sequences). ``attn_mask`` (dense only) is checked against (B, Hq, Nq, ``n_keys``) and kept as a view of that
    shape; with ``dropout_p`` > 0 an int ``seed`` becomes the kernels' seed tensor (None: one is drawn from torch's
    generator when the call runs, ``_seeded``). Every argument is used or refused with a TypeError/ValueError
    naming it."""
    check_bool("causal", causal)
    mask = None if attn_mask is None else _check_mask(attn_mask, q, n_keys)
    wl = wr = WINDOW_MAX
    if window is not None:
        if not isinstance(window, (tuple, list)):
            raise AttentionTypeError(f"window must be a (left, right) pair of ints (-1 = unbounded), got {window!r}")
        if len(window) != 2:
            raise AttentionInputError(f"window must be a (left, right) pair of ints (-1 = unbounded), got {window!r}")
        wl, wr = _window_side("left", window[0]), _window_side("right", window[1])
    softcap = 0.0 if softcap is None else _real("softcap", softcap, "a finite float >= 0 (0 = off)")
    if softcap < 0:
        raise AttentionInputError(f"softcap must be a finite float >= 0 (0 = off), got {softcap!r}")
    dropout_p = _real("dropout_p", dropout_p, "a float in [0, 1)")
    if not 0.0 <= dropout_p < 1.0:
        raise AttentionInputError(f"dropout_p must be a float in [0, 1), got {dropout_p!r}")
    alibi = _check_alibi(alibi_slopes, q, q.shape[0] if n_batch is None else n_batch, q.shape[1])
    sinks = _check_sinks(sinks, q, q.shape[1])
    seed = check_seed(seed)
    seed_t = seed_tensor(seed, q.device) if dropout_p > 0 and seed is not None else None
    return AttnSpec(mask=mask, alibi=alibi, seed=seed_t, sinks=sinks,
                    causal=causal, causal_offset=int(causal_offset), scale=_resolve_scale(scale, q.shape[-1]),
                    window_left=wl, window_right=wr, softcap=float(softcap), dropout_p=float(dropout_p))


def _empty_result(q, k, v, return_lse, sinks=None):
    b, h, nq, d = q.shape
    # no keys: every row is empty, so zeros (and an lse of -inf, or the sink's logit), like a fully masked row.
    # The inputs' gradients are zeros; the graph stays connected through a product that cannot turn inf/NaN into NaN
    link = sum((t.reshape(-1)[:0].sum() for t in (q, k, v)), q.new_zeros(()))
    out = q.new_zeros(b, h, nq, v.shape[-1]) + link
    if return_lse:
        lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        if sinks is not None:
            return out, sinks.to(lse_dtype).view(1, h, 1).expand(b, h, nq)
        return out, torch.full((b, h, nq), float("-inf"), dtype=lse_dtype, device=q.device)
    return out


# --------------------------------------------------------------------------------------------------
# registered ops: bodies launch the kernels (see embedattn._registry); fakes for the interpreter
# --------------------------------------------------------------------------------------------------
def _spec_op(name: str, fake):
    """Register ``fn(*args, spec: AttnSpec, *, extra=None, ...)`` (and its ``fake``, of the same signature) as
    ``torch.ops.embedattn.<name>``: the schema is fn's own arguments, then the spec's fields (``AttnSpec.op_args``),
    then fn's keyword-only arguments after the spec (optional, default None: an op's layout grown later, so that
    calls written before it keep their positions); the body receives the spec rebuilt by
    ``AttnSpec.from_op_args``. A field added to the spec reaches every op."""
    spec_types = typing.get_type_hints(AttnSpec)
    spec_params = [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=spec_types[n])
                   for n in _SPEC_FIELDS]

    def register(fn):
        hints = typing.get_type_hints(fn)
        params = list(inspect.signature(fn).parameters.values())
        own = [p.replace(annotation=hints[p.name]) for p in params if p.kind != p.KEYWORD_ONLY and p.name != "spec"]
        extra = [p.replace(annotation=hints[p.name], kind=p.POSITIONAL_OR_KEYWORD) for p in params
                 if p.kind == p.KEYWORD_ONLY]
        n, m = len(own), len(own) + len(spec_params)

        def split(args, kwargs):
            extras = dict(zip((p.name for p in extra), args[m:]))
            extras.update(kwargs)
            return args[:n], AttnSpec.from_op_args(args[n:m]), extras

        def op(*args, **kwargs):
            own_args, spec, extras = split(args, kwargs)
            return fn(*own_args, spec, **extras)

        def op_fake(*args, **kwargs):
            own_args, spec, extras = split(args, kwargs)
            return fake(*own_args, spec, **extras)

        op.__name__, op.__doc__ = fn.__name__, fn.__doc__
        op.__signature__ = inspect.Signature(own + spec_params + extra, return_annotation=hints["return"])
        return kernel_op(name, fake=op_fake)(op)

    return register


def _aligned_impl(impl: str, q, k, v) -> str:
    """``impl``, or "default" where q, k, v's base addresses are not 16-byte aligned: the one part of the sm90
    kernels' scope (``_kernel_impls``) torch.compile cannot trace at the entry (fake tensors have no address; here,
    in the op, eager calls read the data pointers and traced ones the storage offsets)."""
    if impl == "default":
        return impl
    from .kernels.attention_hopper import aligned

    return impl if aligned(q, k, v) else "default"


def _lse_like(q: torch.Tensor) -> torch.Tensor:
    return q.new_empty(q.shape[:-1], dtype=torch.float32)


# the fakes mirror the launchers' allocations exactly (contiguous, except the dense and KV-cache outputs, laid out in
# q's memory order): a compiled graph plans its views on the fake's strides
def _out_like(q: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # the dense forward writes its output (B, Hq, Nq, Dv) in q's memory order (FlashAttention's (B, N, H, D) for
    # q.transpose(1, 2))
    from .kernels.attention import empty_in_order

    return empty_in_order(q, v.shape[-1])


def _grads_like(q, k, v, spec):
    # dq, dk, dv, and dsinks (Hq,) float32 (empty without sinks: an op returns tensors only)
    n_sinks = 0 if spec.sinks is None else spec.sinks.shape[0]
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape),
            q.new_empty(n_sinks, dtype=torch.float32))


def _with_dsinks(grads: tuple, q: torch.Tensor) -> tuple:
    """(dq, dk, dv, dsinks): a launcher's grads, with the empty dsinks of a call without sinks."""
    return grads if len(grads) == 4 else (*grads, q.new_empty(0, dtype=torch.float32))


def _attention_fwd_fake(q, k, v, impl, spec):
    return _out_like(q, v), _lse_like(q)


@_spec_op("attention_fwd", fake=_attention_fwd_fake)
def _attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, impl: str, spec: AttnSpec
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(out like q, lse2 (B, Hq, Nq) float32 base-2 log-sum-exp, -inf on rows with no visible key). ``impl``: the
    kernels the entry chose (``_kernel_impls``): "default", "hopper" or "gluon"."""
    impl = _aligned_impl(impl, q, k, v)
    if impl == "gluon":  # a Gluon kernel is no wrap_triton target: its own opaque op, on both roads
        return torch.ops.embedattn.gluon_attention_fwd(q, k, v, *spec.op_args())
    if impl == "hopper":
        from .kernels.attention_hopper import hopper_forward

        return hopper_forward(q, k, v, spec)
    from .kernels.attention import attention_forward

    return attention_forward(q, k, v, spec)


def _attention_bwd_fake(dout, q, k, v, out, lse2, dlse2, impl, spec):
    return _grads_like(q, k, v, spec)


@_spec_op("attention_bwd", fake=_attention_bwd_fake)
def _attention_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                   lse2: torch.Tensor, dlse2: torch.Tensor | None, impl: str, spec: AttnSpec
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, dsinks: (Hq,) float32, empty without sinks); ``dlse2`` is the gradient of the base-2 lse, or
    None. The spec must be the forward's (the dropout mask is drawn again from its seed). ``impl``: "default"
    (deterministic, no atomics) or "hopper" (dQ by atomics; calls without sinks)."""
    if _aligned_impl(impl, q, k, v) == "hopper":
        from .kernels.attention_hopper import hopper_backward

        return _with_dsinks(hopper_backward(dout, q, k, v, out, lse2, spec, dlse2=dlse2), q)
    from .kernels.attention import attention_backward

    return _with_dsinks(attention_backward(dout, q, k, v, out, lse2, spec, dlse2=dlse2), q)


@_spec_op("gluon_attention_fwd", fake=lambda q, k, v, spec: (_out_like(q, v), _lse_like(q)))
def _gluon_attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttnSpec
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """The Gluon forward (kernels/attention_gluon.py), registered as an opaque op so that a compiled graph calls
    it as the eager road does."""
    from .kernels.attention_gluon import gluon_forward

    return gluon_forward(q, k, v, spec)


def _varlen_fwd_fake(q, k, v, cu_q, cu_k, max_q, max_k, spec, *, block_table=None):
    return q.new_empty(*q.shape[:2], v.shape[-1]), q.new_empty(q.shape[1], q.shape[0], dtype=torch.float32)


@_spec_op("varlen_fwd", fake=_varlen_fwd_fake)
def _varlen_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
                max_q: int, max_k: int, spec: AttnSpec, *, block_table: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed (total, H, D) sequences (v: (total_k, Hkv, Dv)): (out (total_q, Hq, Dv), lse2 (H, total_q)). With
    ``block_table`` (B, max_pages) k/v are pools of pages (num_pages, Hkv, page_size, D / Dv), sequence b's keys
    its first cu_k[b+1] - cu_k[b] positions through its table row."""
    from .kernels.attention import varlen_forward

    return varlen_forward(q, k, v, cu_q, cu_k, max_q, max_k, spec, block_table=block_table)


def _varlen_bwd_fake(dout, q, k, v, out, lse2, cu_q, cu_k, max_q, max_k, spec):
    return _grads_like(q, k, v, spec)


@_spec_op("varlen_bwd", fake=_varlen_bwd_fake)
def _varlen_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                lse2: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor, max_q: int, max_k: int, spec: AttnSpec
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, dsinks), as ``attention_bwd``."""
    from .kernels.attention import varlen_backward

    return _with_dsinks(varlen_backward(dout, q, k, v, out, lse2, cu_q, cu_k, max_q, max_k, spec), q)


def _kvcache_fwd_fake(q, k_cache, v_cache, lens, block_table, num_splits, spec, *, starts=None):
    return _out_like(q, v_cache), _lse_like(q)


@_spec_op("kvcache_fwd", fake=_kvcache_fwd_fake)
def _kvcache_fwd(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lens: torch.Tensor,
                 block_table: torch.Tensor | None, num_splits: int, spec: AttnSpec, *,
                 starts: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoding: batch b attends to its cached keys ``starts[b]`` (int32, in [0, lens[b]]; None: 0) .. ``lens[b]``
    - 1 (int32), causal bottom-right; with ``block_table`` the caches are pools of pages read through it. (out
    (B, Hq, Nq, Dv) in q's memory order, lse2 (B, Hq, Nq) base 2, the sink included)."""
    from .kernels.attention import kvcache_forward

    return kvcache_forward(q, k_cache, v_cache, lens, spec, num_splits, block_table=block_table, k_starts=starts)


# --------------------------------------------------------------------------------------------------
# autograd: one Function per layout, forward and backward through the registered ops
# --------------------------------------------------------------------------------------------------
def _spec_grads(spec_args: tuple, dsinks: torch.Tensor) -> tuple:
    """The gradients of an autograd Function's spec inputs: the sinks' (from the backward op), None elsewhere."""
    spec = AttnSpec.from_op_args(spec_args)
    return spec.input_grads(sinks=dsinks.to(spec.sinks.dtype) if spec.sinks is not None else None)


class AttentionFunction(torch.autograd.Function):
    """Triton attention: ``apply(q, k, v, fwd_impl, bwd_impl, *spec.op_args()) -> (out, lse2)``.

    ``lse2`` is the base-2 log-sum-exp (float32, the sink included; -inf on rows with no visible key and no
    sink); it is differentiable (its gradient folds into the backward's row term, as in FlashAttention). The
    spec's sinks are an input like q, k, v: their gradient comes from the backward op. The backward regenerates
    the dropout mask, and is not itself differentiable.
    """

    @staticmethod
    def forward(ctx, q, k, v, fwd_impl, bwd_impl, *spec_args):
        out, lse2 = torch.ops.embedattn.attention_fwd(q, k, v, fwd_impl, *spec_args)
        ctx.save_for_backward(q, k, v, out, lse2, *spec_args[:_SPEC_TENSORS])
        ctx.impl, ctx.scalars = bwd_impl, spec_args[_SPEC_TENSORS:]
        ctx.set_materialize_grads(False)  # an unused lse costs nothing in the backward
        return out, lse2

    @staticmethod
    @once_differentiable
    def backward(ctx, dout, dlse2):
        q, k, v, out, lse2, *tensors = ctx.saved_tensors
        spec_args = (*tensors, *ctx.scalars)
        if dout is None and dlse2 is None:
            return (None,) * (5 + len(spec_args))
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dk, dv, dsinks = torch.ops.embedattn.attention_bwd(dout, q, k, v, out, lse2, dlse2, ctx.impl, *spec_args)
        return (dq, dk, dv, None, None, *_spec_grads(spec_args, dsinks))


class VarlenAttentionFunction(torch.autograd.Function):
    """Triton attention over packed sequences: ``apply(q, k, v, cu_q, cu_k, max_q, max_k, block_table,
    *spec.op_args()) -> (out, lse2)``; the lse is not differentiable here. With a ``block_table`` (paged keys) it
    is forward-only: its backward raises."""

    @staticmethod
    def forward(ctx, q, k, v, cu_q, cu_k, max_q, max_k, block_table, *spec_args):
        out, lse2 = torch.ops.embedattn.varlen_fwd(q, k, v, cu_q, cu_k, max_q, max_k, *spec_args,
                                                   block_table=block_table)
        ctx.paged = block_table is not None
        ctx.save_for_backward(q, k, v, out, lse2, cu_q, cu_k, *spec_args[:_SPEC_TENSORS])
        ctx.args = (max_q, max_k), spec_args[_SPEC_TENSORS:]
        ctx.mark_non_differentiable(lse2)
        return out, lse2

    @staticmethod
    @once_differentiable
    def backward(ctx, dout, _dlse):
        if ctx.paged:
            raise NotImplementedError("attention_varlen with block_table (paged keys) is forward-only on the Triton "
                                      "backend (as in FlashAttention 2): no gradient through a paged cache; run the "
                                      "forward under torch.no_grad(), or on backend='reference' for dq")
        q, k, v, out, lse2, cu_q, cu_k, *tensors = ctx.saved_tensors
        (max_q, max_k), scalars = ctx.args
        spec_args = (*tensors, *scalars)
        dq, dk, dv, dsinks = torch.ops.embedattn.varlen_bwd(dout, q, k, v, out, lse2, cu_q, cu_k, max_q, max_k,
                                                            *spec_args)
        return (dq, dk, dv, None, None, None, None, None, *_spec_grads(spec_args, dsinks))


# --------------------------------------------------------------------------------------------------
# the one decision per call (backend, then which kernels), and the road it takes
# --------------------------------------------------------------------------------------------------
def _distinct(q, k, v):
    """Self-attention passes one tensor as q, k and v; torch.compile cannot trace an autograd.Function
    given the same tensor twice, so the repeats become views (free)."""
    if k is q:
        k = k.view_as(k)
    if v is q or v is k:
        v = v.view_as(v)
    return q, k, v


def _resolve(backend, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttnSpec, return_lse: bool) -> str:
    """The backend of a dense call: "triton", "reference", or "native" (auto off CUDA where torch's SDPA computes
    exactly our function: no lse, softcap, dropout, sinks or ALiBi; a causal diagonal, window or mask is written
    into SDPA's mask where needed, which needs torch's SDPA to give zeros on rows that see no key)."""
    def native_ok() -> bool:
        return not return_lse and _sdpa_expressible(spec) and not autograd_transforms_active(q, k, v) and (
            _sdpa_unmasked(q, k, spec) or _sdpa_zeroes_empty_rows(q.device.type))

    return resolve(backend, q, k, v, op="attention", dtype=q.dtype, head_dim=q.shape[-1], head_dim_v=v.shape[-1],
                   native_ok=native_ok)


@torch.compiler.assume_constant_result
def _measured_impls(device: str, dtype: str, d: int, dv: int, causal: bool, gqa: bool, bq: int, bk: int
                    ) -> tuple[str, str]:
    """The device table's measured kernels for a plain call of this shape (``attention.impl_fwd`` / ``_bwd``
    entries, exact or nearest N bucket), ``"default"`` where it has none. A constant to torch.compile: the table
    is read outside the graph, so eager and compiled calls of one shape take the same kernels."""
    fields = dict(dtype=dtype, head_dim=d, nq=bq, nk=bk, flags="causal" if causal else "none", gqa=int(gqa))
    if dv != d:
        fields["head_dim_v"] = dv
    picks = []
    for mode in ("fwd", "bwd"):
        conf, _ = configs.lookup(f"attention.impl_{mode}", fields, device)
        impl = (conf or {}).get("impl", "default")
        picks.append(impl if impl in ("default", "hopper", "gluon") else "default")
    return picks[0], picks[1]


def _kernel_impls(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttnSpec) -> tuple[str, str]:
    """Which kernels run a dense call on the Triton backend, forward and backward. EMBEDATTN_ATTENTION_IMPL unset
    (``auto``): the variant the device's tuned table names for the shape, where a GPU run measured it faster
    (``_measured_impls``); ``hopper`` / ``gluon``: that variant wherever it covers the call; ``default``: never a
    variant. A variant runs only where it covers the call (``supports``). Decided here, at the entry, so that
    eager and compiled calls take the same kernels; the Hopper backward (dQ by atomics) only where deterministic
    algorithms are not asked for."""
    impl = attention_impl()
    if impl == "default":
        return "default", "default"
    from .kernels import attention_hopper as KH

    if not KH.supports(q, k, v, spec):
        return "default", "default"
    if impl == "auto":
        fwd, bwd = _measured_impls(str(q.device), str(q.dtype).replace("torch.", ""), q.shape[-1], v.shape[-1],
                                   spec.causal, k.shape[1] != q.shape[1], configs.bucket(q.shape[2]),
                                   configs.bucket(k.shape[2]))
    else:
        fwd, bwd = impl, "hopper"
    if fwd == "gluon":
        from .kernels import attention_gluon as KG

        fwd = "gluon" if KG.supports(q, k, v, spec) else "hopper"
    deterministic = torch.are_deterministic_algorithms_enabled()
    bwd = "hopper" if bwd == "hopper" and KH.supports_backward(q, k, v, spec) and not deterministic else "default"
    return fwd, bwd


def _seeded(spec: AttnSpec, device) -> AttnSpec:
    """The spec with its dropout seed: one drawn from torch's generator on ``device`` when none was given (drawn only
    for a call that runs dropout, so that other calls leave torch's generator as they found it)."""
    if spec.dropout_p > 0 and spec.seed is None:
        return replace(spec, seed=seed_tensor(None, device))
    return spec


def _sdpa_expressible(spec: AttnSpec) -> bool:
    """The features torch's SDPA computes as we do, gradients included: the causal diagonal, a window and a bool mask.
    Not a float mask: a row whose visible keys all carry a large finite negative bias (-1e30, finfo.min) gets wrong
    gradients from torch's CPU SDPA backward (it rebuilds the probabilities from a log-sum-exp that lost log(n))."""
    if spec.softcap or spec.dropout_p or spec.sinks is not None or spec.alibi is not None:
        return False
    return spec.mask is None or spec.mask.dtype == torch.bool


def _sdpa_unmasked(q: torch.Tensor, k: torch.Tensor, spec: AttnSpec) -> bool:
    """A call SDPA takes with no mask at all: no mask or window, and no causal diagonal or torch's top-left one
    (or one at or past the last key: every key visible)."""
    return (spec.mask is None and spec.window is None
            and (not spec.causal or spec.causal_offset == 0 or spec.causal_offset >= k.shape[2] - 1))


_EMPTY_ROWS_ZEROED: dict[str, bool] = {}


@torch.compiler.assume_constant_result
def _sdpa_zeroes_empty_rows(device_type: str) -> bool:
    """Whether torch's SDPA gives zeros (and finite gradients) on a row whose keys are all masked by a bool mask, on
    this device type, as our attention does (torch 2.5+ does on the CPU). Asked once per device type, on a tiny
    call, with autograd on whatever mode the first call came in; a constant to torch.compile."""
    if device_type not in _EMPTY_ROWS_ZEROED:
        with torch.inference_mode(False), torch.enable_grad():
            _EMPTY_ROWS_ZEROED[device_type] = _probe_empty_rows(device_type)
    return _EMPTY_ROWS_ZEROED[device_type]


def _probe_empty_rows(device_type: str) -> bool:
    try:
        q, k, v = (torch.ones(1, 1, 2, 4, device=device_type, requires_grad=True) for _ in range(3))
        out = _TORCH_SDPA(q, k, v, attn_mask=torch.tensor([[True, True], [False, False]], device=device_type))
        grads = torch.autograd.grad(out.sum(), (q, k, v))
        return bool((out[0, 0, 1] == 0).all()) and all(bool(torch.isfinite(g).all()) for g in grads)
    except Exception:
        return False


# mask entries per chunk of query rows (B x H x rows x keys) on the native road: long masked calls hold a few
# (rows, keys) blocks of mask, never an Nq x Nk one
NATIVE_CHUNK = 1 << 22


def _native(q, k, v, spec: AttnSpec):
    """torch's SDPA on a call ``_resolve`` gave it. No mask where none is needed (top-left is_causal, or every key
    visible); otherwise by chunks of query rows, each against the keys its rows can see (the causal diagonal and the
    window bound them) with the diagonal, window and the caller's mask written into one chunk-sized mask."""
    dtype = q.dtype
    if dtype in (torch.float16, torch.bfloat16):  # computed in float32, as the reference: torch's half GQA backward
        q, k, v = q.float(), k.float(), v.float()  # sums dK/dV over the query heads in half precision
    return _native_fp(q, k, v, spec).to(dtype)


def _native_fp(q, k, v, spec: AttnSpec):
    nq, nk = q.shape[2], k.shape[2]
    gqa = k.shape[1] != q.shape[1]
    if _sdpa_unmasked(q, k, spec):
        causal = spec.causal and spec.causal_offset < nk - 1
        return _TORCH_SDPA(q, k, v, is_causal=causal, scale=spec.scale, enable_gqa=gqa)
    mask = None if spec.mask is None else _unexpanded(spec.mask)
    per_row = q.shape[0] * (1 if mask is None else mask.shape[1]) * nk
    rows = nq if torch.compiler.is_compiling() else max(16, NATIVE_CHUNK // max(per_row, 1))
    off, (left, right) = spec.causal_offset, (spec.window_left, spec.window_right)
    outs = []
    for i0 in range(0, nq, rows):
        i1 = min(i0 + rows, nq)
        # keys j with i + off - left <= j <= i + off + right (right 0 when causal) for some row i of the chunk
        lo = max(0, i0 + off - left) if left < WINDOW_MAX else 0
        hi = nk
        if spec.causal:
            hi = min(hi, i1 + off)
        if right < WINDOW_MAX:
            hi = min(hi, i1 + off + right)
        empty = hi <= lo  # no row of the chunk sees a key: one key, masked (SDPA's zeros, autograd's zero gradients)
        lo, hi = (0, 1) if empty else (lo, hi)
        rel = (torch.arange(i0, i1, device=q.device)[:, None] + off
               - torch.arange(lo, hi, device=q.device)[None, :])  # >= 0 left of the diagonal
        seen = torch.full_like(rel, not empty, dtype=torch.bool)
        if spec.causal:
            seen &= rel >= 0
        if left < WINDOW_MAX:
            seen &= rel <= left
        if right < WINDOW_MAX:
            seen &= rel >= -right
        m = seen
        if mask is not None:
            part = mask[:, :, i0:i1] if mask.shape[2] > 1 else mask
            part = part[..., lo:hi] if mask.shape[3] > 1 else part
            m = part & seen  # a bool mask: float ones stay on the reference (_sdpa_expressible)
        outs.append(_TORCH_SDPA(q[:, :, i0:i1], k[:, :, lo:hi], v[:, :, lo:hi], attn_mask=m, scale=spec.scale,
                                enable_gqa=gqa))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


def _unexpanded(mask: torch.Tensor) -> torch.Tensor:
    """The spec's (B, Hq, Nq, Nk) mask view with its broadcast (stride 0) dims back to size 1, as SDPA broadcasts."""
    for d in range(4):
        if mask.shape[d] > 1 and mask.stride(d) == 0:
            mask = mask.narrow(d, 0, 1)
    return mask


def _run(be: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttnSpec, return_lse: bool):
    """A checked dense call on the backend ``be`` decided for it."""
    if q.numel() == 0 or k.shape[2] == 0 or k.shape[1] == 0:
        return _empty_result(q, k, v, return_lse, spec.sinks)
    if be == "native":
        return _native(q, k, v, spec)
    spec = _seeded(spec, q.device)
    if be == "reference":  # dropout: the kernels' own Philox draw from the same seed
        return reference.attention(q, k, v, attn_mask=spec.mask, causal_offset=spec.causal_offset,
                                   return_lse=return_lse, dropout_p=spec.dropout_p, seed=spec.seed,
                                   **spec.reference_kwargs())
    out, lse2 = AttentionFunction.apply(*_distinct(q, k, v), *_kernel_impls(q, k, v, spec), *spec.op_args())
    return (out, lse2 * _LN2) if return_lse else out


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    attn_mask: torch.Tensor | None = None,
    return_lse: bool = False,
    window: tuple[int, int] | None = None,
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    seed: int | None = None,
    causal_offset: int | None = None,
    sinks: torch.Tensor | None = None,
    backend: str | None = None,
):
    """Fused softmax(q kᵀ · scale + mask) v without materializing the Nq×Nk matrix.

    Args:
        q: (B, Hq, Nq, D). k: (B, Hkv, Nk, D), v: (B, Hkv, Nk, Dv) with Hq a multiple of Hkv (GQA/MQA; K/V
            are not copied) and a value head dim Dv of its own (DeepSeek's MLA: D 192, Dv 128). Head dims up
            to 512 on the Triton backend, forward and backward. Any strides. fp16, bf16, fp32 (and fp64 on
            the reference backend).
        causal: query i sees key j iff j <= i + causal_offset.
        causal_offset: the diagonal that causal, window and ALiBi are measured from; default
            Nk - Nq, bottom-right (FlashAttention's convention: the last query sees every key, as in
            KV-cache decoding); 0 is torch SDPA's top-left ``is_causal``. Rows that see no key give zeros.
        scale: score scale, default 1/sqrt(D).
        attn_mask: bool (True = attend) or additive float, broadcastable to (B, Hq, Nq, Nk); read
            tile by tile through its strides, never expanded in memory. A row with every key
            masked gives zeros and zero gradients.
        return_lse: also return the (B, Hq, Nq) log-sum-exp (natural log, float32; float64 for float64
            inputs; -inf on empty rows). It is differentiable. With ``sinks`` it includes the sink
            (FlashAttention 4's choice): log(sum_j exp(s_ij) + exp(sink_h)), so an empty row's lse is the sink.
        window: (left, right) sliding window, -1 = unbounded: query i sees keys
            i + causal_offset - left <= j <= i + causal_offset + right. Combines with ``causal``.
            Key tiles outside the band are skipped, not masked.
        softcap: > 0 replaces each score s by softcap·tanh(s / softcap) (Gemma-2), gradient included.
            Accurate at any cap on the Triton backend: the kernels evaluate tanh to ~2e-7 relative error,
            so a capped score is as accurate as an uncapped one (fp32 outputs within ~3e-6 of float64 with
            unit-variance inputs at caps 30 to 1e5; tests/attention/test_attention_features.py checks 1e3 and 1e5).
        alibi_slopes: (H,) or (B, H) float: adds -slope·|i + causal_offset - j| (FlashAttention's ALiBi).
        dropout_p: dropout on the attention probabilities, drawn in-kernel (Philox) from ``seed`` and
            regenerated identically in the backward. ``seed`` (an int in [0, 2**63)) fixes the draw;
            None takes one from torch's generator on the inputs' device (``torch.manual_seed``
            reproduces it). The reference backend draws the same mask from the seed (the kernels' Philox
            stream, bit for bit: ``embedattn.reference.dropout_keep_mask``).
        sinks: (Hq,) float tensor of any float dtype, differentiable: gpt-oss's learned attention sinks. Query
            head h's logit sinks[h] (natural log: not multiplied by the scale, not softcapped, no ALiBi, never
            dropped) joins every row's softmax denominator and contributes no value:
            out_i = sum_j exp(s_ij) v_j / (sum_j exp(s_ij) + exp(sinks[h])). A row with no visible key gives
            zeros (and no NaN anywhere, gradients included). Its gradient is
            -sum_i p_sink_i (dO_i . O_i) (plus the lse's share), accumulated in fp32.
        backend: None | "auto" | "triton" | "reference" (see ``embedattn._backend``).

    Returns:
        out (B, Hq, Nq, Dv) in q's dtype, or (out, lse) when ``return_lse``.
    """
    _check_qkv(q, k, v)
    nq, nk = q.shape[2], k.shape[2]
    check_bool("return_lse", return_lse)
    if causal_offset is None:
        causal_offset = nk - nq
    causal_offset = check_int("causal_offset", causal_offset, low=-(2**31) + 1, high=2**31 - 1)
    spec = make_spec(q, n_keys=nk, causal=causal, causal_offset=causal_offset, scale=scale, attn_mask=attn_mask,
                     window=window, softcap=softcap, alibi_slopes=alibi_slopes, dropout_p=dropout_p, seed=seed,
                     sinks=sinks)
    return _run(_resolve(backend, q, k, v, spec, return_lse), q, k, v, spec, return_lse)


def _sdpa_torch(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):
    return _TORCH_SDPA(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                       scale=scale, enable_gqa=enable_gqa)


def _sdpa_plan(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):
    """The 4-D (q, k, v, mask) of a torch SDPA call, or None where only torch's own SDPA gives its answer: what
    torch rejects (so the error is torch's), and what embedattn does not compute.

    Taken: 3-D or 4-D q/k/v of one floating dtype and device, k and v of one shape but for the head dim (a value
    head dim Ev of its own, as torch takes), q and k of one head dim >= 1, Ev >= 1; batch (and,
    without ``enable_gqa``, head) sizes that broadcast as in torch's matmul; grouped heads under
    ``enable_gqa``; a bool mask or a float one of float32 or q's dtype, of 2 to q.dim() dims, that
    broadcasts to the scores' shape; a finite scale; dropout in [0, 1)."""
    if not all(isinstance(t, torch.Tensor) for t in (query, key, value)):
        return None
    if not (isinstance(is_causal, bool) and isinstance(enable_gqa, bool)):
        return None
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, Real) or not math.isfinite(scale)):
        return None
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, Real) or not 0.0 <= dropout_p < 1.0:
        return None  # torch: dropout_p = 1 gives zeros, outside [0, 1] an error
    nd = query.dim()
    if nd not in (3, 4) or key.dim() != nd or value.dim() != nd or key.shape[:-1] != value.shape[:-1]:
        return None
    if not (query.dtype == key.dtype == value.dtype) or not (query.device == key.device == value.device):
        return None
    if query.dtype not in _REFERENCE_DTYPES:
        return None
    if query.numel() == 0 or key.numel() == 0 or value.numel() == 0 or query.shape[-1] != key.shape[-1]:
        return None
    if is_causal and attn_mask is not None:
        # torch applies both or raises depending on the backend it picks (2.13 on the CPU: both for 4-D
        # inputs, an error for 3-D ones): torch's own call is the only faithful answer
        return None
    bq, bk = query.shape[0], key.shape[0]
    if bq != bk and (1 not in (bq, bk) or nd == 3 and enable_gqa):  # 3-D + enable_gqa: torch groups dim 0
        return None
    nb = max(bq, bk)
    if nd == 4:
        hq, hk = query.shape[1], key.shape[1]
        if hq != hk and (hq % hk if enable_gqa else 1 not in (hq, hk)):
            return None
        scores = (nb, max(hq, hk), query.shape[2], key.shape[2])
        q, k, v = query.expand(nb, scores[1], -1, -1), key.expand(nb, -1, -1, -1), value.expand(nb, -1, -1, -1)
    else:
        scores = (nb, query.shape[1], key.shape[1])
        q, k, v = (t.expand(nb, -1, -1).unsqueeze(1) for t in (query, key, value))
    mask = attn_mask
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.requires_grad or mask.device != query.device:
            return None
        if mask.dtype not in (torch.bool, torch.float32, query.dtype) or not 2 <= mask.dim() <= nd:
            return None
        try:
            if tuple(torch.broadcast_shapes(mask.shape, scores)) != scores:
                return None
        except RuntimeError:
            return None
        if nd == 3 and mask.dim() == 3:
            mask = mask.unsqueeze(1)
    return q, k, v, mask


class SdpaCall(NamedTuple):
    """An SDPA-style call embedattn takes: its 4-D q, k, v, checked spec and the backend decided for it."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    spec: AttnSpec
    backend: str
    squeeze: bool  # 3-D inputs: the output loses the head dim the plan added

    def run(self) -> torch.Tensor:
        """The output, computed on ``backend`` (no decision left)."""
        out = _run(self.backend, self.q, self.k, self.v, self.spec, False)
        return out.squeeze(1) if self.squeeze else out


def sdpa_call(backend: str | None, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
              enable_gqa=False, softcap=0.0, sinks=None) -> SdpaCall | None:
    """The one decision whether embedattn takes a torch-SDPA-style call (``scaled_dot_product_attention``'s
    arguments, plus ``softcap`` and learned ``sinks`` (Hq,)): the call as it runs, with its backend resolved once,
    or None where it belongs to torch's own SDPA (a call ``_sdpa_plan`` leaves to torch, or one a pinned
    ``backend="triton"`` cannot run; torch has no sinks, so a caller with sinks computes such a call itself). The
    SDPA drop-in and the transformers integration ask it; ``is_causal`` is top-left, as torch's."""
    plan = _sdpa_plan(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    if plan is None:
        return None
    check_backend(backend)  # a bad EMBEDATTN_BACKEND raises, it does not silently mean torch
    q, k, v, mask = plan
    spec = make_spec(q, n_keys=k.shape[2], causal=is_causal, causal_offset=0, scale=scale, attn_mask=mask,
                     softcap=softcap, dropout_p=float(dropout_p), sinks=sinks)
    try:
        be = _resolve(backend, q, k, v, spec, False)
    except (RuntimeError, TypeError, ValueError):  # e.g. backend="triton" with a head dim past 512
        return None
    return SdpaCall(q, k, v, spec, be, query.dim() == 3)


def scaled_dot_product_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """Drop-in for ``torch.nn.functional.scaled_dot_product_attention`` with torch's semantics.

    Every call torch accepts gives torch's result, every call torch rejects raises torch's error
    (tests/attention/test_attention.py runs torch as the oracle over a grid of calls). The kernels take 3-D
    (N, L, E) and 4-D (N, H, L, E) inputs: ``is_causal`` aligned top-left (query i sees keys j <= i);
    bool or float masks broadcast to the scores; batch and head sizes that broadcast (K/V with batch 1
    against q with batch 2; one K/V head without ``enable_gqa``), grouped heads with ``enable_gqa``;
    ``dropout_p`` in-kernel (seeded from torch's generator, so ``torch.manual_seed`` makes it
    reproducible, though the mask differs from torch's own).

    A value head dim unlike the key's (Ev != E, DeepSeek's MLA) runs on the kernels too.

    Everything else goes to torch's own SDPA (captured before any ``patch_sdpa``): other ranks, head
    dims 0 or above 512, float64, masks that require grad,
    ``attn_mask`` together with ``is_causal`` (torch applies both or raises, depending on the backend
    it picks for the call), calls torch rejects, and calls the Triton kernels cannot run by the
    decision of ``embedattn.resolve(None, ...)`` (CPU tensors outside the interpreter, ...): see ``sdpa_call``.
    """
    call = sdpa_call(None, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    if call is None or call.backend != "triton":
        return _sdpa_torch(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    return call.run()


# --------------------------------------------------------------------------------------------------
# variable-length (packed) sequences and KV-cache decoding
# --------------------------------------------------------------------------------------------------
def _check_cu(name: str, cu: torch.Tensor, device) -> None:
    if not isinstance(cu, torch.Tensor) or cu.dtype not in (torch.int32, torch.int64) or cu.dim() != 1:
        raise AttentionTypeError(f"{name} must be a 1-D int32/int64 tensor of cumulative lengths")
    if cu.numel() < 2:
        raise AttentionInputError(f"{name} needs at least 2 entries (batch + 1), got {cu.numel()}")
    if cu.device != device:
        raise AttentionInputError(f"{name} is on {cu.device}, q on {device}")


def _checked_seqlens(cu_q: torch.Tensor, cu_k: torch.Tensor, tq: int, tk: int | None, max_q: int, max_k: int,
                     pages: torch.Tensor | None = None, n_pages: int = 0, page: int = 1
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """The int32 offsets the kernels read, checked: each cu_seqlens starts at 0, never decreases and ends at its
    total, and no sequence is longer than its max_seqlen. With a block table ``pages`` (paged keys: pools of
    ``n_pages`` pages of ``page`` positions, ``tk`` None) cu_seqlens_k's end is free, but no sequence has more keys
    than the table's capacity and every entry that holds a key lies in [0, n_pages). Eagerly one host read, and an
    AttentionInputError (IndexError for a table entry) naming what is wrong. While torch.compile traces (no host
    read there), a device assertion (``assert_ok``: a RuntimeError at once on the CPU, a device-side assert on
    CUDA), and the offsets clamped into [0, total] and made non-decreasing (paged: the key counts clamped to the
    capacity), so that no read or write leaves the tensors before the assertion reports (the kernel clamps table
    entries into the pool)."""
    def summary(cu):
        lens = cu[1:] - cu[:-1]
        return torch.stack([cu[0], cu[-1], lens.min(), lens.max()]).to(torch.int64)

    sq, sk = summary(cu_q), summary(cu_k)
    table_ok, cap = torch.ones((), dtype=torch.bool, device=cu_k.device), None
    if pages is not None:
        cap = page * pages.shape[1]
        len_k = (cu_k[1:] - cu_k[:-1]).to(torch.int64).clamp(0, cap)
        used = torch.arange(pages.shape[1], device=cu_k.device)[None, :] * page < len_k[:, None]
        table_ok = ~(used & ((pages < 0) | (pages >= n_pages))).any()
    if torch.compiler.is_compiling():
        k_end = sk[3] <= cap if tk is None else sk[1] == tk
        ok = (sq[0] == 0) & (sq[1] == tq) & (sq[2] >= 0) & (sq[3] <= max_q) & \
            (sk[0] == 0) & k_end & (sk[2] >= 0) & (sk[3] <= max_k) & table_ok
        assert_ok(ok, "attention_varlen: cu_seqlens_q/cu_seqlens_k must start at 0, be non-decreasing and end at the "
                      "total lengths, and no sequence may be longer than max_seqlen_q/max_seqlen_k (with block_table: "
                      "nor than the table's capacity, and every block_table entry used must lie in the pool)")
        q32 = torch.cummax(cu_q.clamp(0, tq), 0).values.to(torch.int32)
        if tk is not None:
            return q32, torch.cummax(cu_k.clamp(0, tk), 0).values.to(torch.int32)
        lens = torch.cummax(cu_k.clamp(min=0), 0).values.diff().clamp(max=cap)
        return q32, torch.cat([cu_k[:1].new_zeros(1), lens.cumsum(0)]).to(torch.int32)
    read = torch.cat([sq, sk, table_ok.view(1).to(torch.int64)]).tolist()  # the one host read
    (q0, qe, q_low, lq), (k0, ke, k_low, lk), t_ok = read[:4], read[4:8], read[8]
    for name, first, last, low, total in (("cu_seqlens_q", q0, qe, q_low, tq), ("cu_seqlens_k", k0, ke, k_low, tk)):
        if first != 0 or low < 0 or total is not None and last != total:
            end = f" and end at the total length {total}" if total is not None else ""
            raise AttentionInputError(f"{name} must start at 0 and be non-decreasing{end}")
    if max_q < lq or max_k < lk:
        raise AttentionInputError(f"max_seqlen_q/max_seqlen_k ({max_q}, {max_k}) are below the longest sequences "
                                  f"({lq}, {lk})")
    if pages is not None and lk > cap:
        raise AttentionInputError(f"cu_seqlens_k holds a sequence of {lk} keys, past the block_table's capacity "
                                  f"max_pages * page_size = {pages.shape[1]} * {page} = {cap}")
    if pages is not None and not t_ok:
        raise _table_error(pages, used, n_pages, "attention_varlen")
    return cu_q.to(torch.int32), cu_k.to(torch.int32)


def attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    causal: bool = False,
    scale: float | None = None,
    window: tuple[int, int] | None = None,
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    seed: int | None = None,
    return_lse: bool = False,
    sinks: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
    backend: str | None = None,
):
    """Attention over packed variable-length sequences, no padding work (FlashAttention's varlen API).

    q: (total_q, Hq, D), k: (total_k, Hkv, D), v: (total_k, Hkv, Dv); sequence b is rows
    cu_seqlens_q[b]:cu_seqlens_q[b+1] of q against rows cu_seqlens_k[b]:cu_seqlens_k[b+1] of k/v.
    ``max_seqlen_*`` (ints) bound the longest sequence (they size the launch grid and stride the dropout
    draw). ``causal`` is bottom-right per sequence. Other options (``sinks`` included) as ``attention``;
    dropout draws the same mask on both backends for the same seed and max_seqlen values. Returns
    (total_q, Hq, Dv), or with ``return_lse`` (out, lse (Hq, total_q) natural log, float32 (float64 for
    float64 inputs), the sink included, -inf where a sequence has no key and there is no sink); this lse is
    not differentiable on the Triton backend.

    ``block_table`` (B, max_pages) int32/int64: paged keys for packed queries (prefill or chunked prefill with a
    paged cache; FlashAttention's ``flash_attn_varlen_func(block_table=...)``). k/v are then pools of pages
    (num_pages, Hkv, page_size, D / Dv), as ``attention_with_kvcache``'s paged caches (any page size >= 1, any
    strides, read in place), and sequence b's keys are its positions 0 .. cu_seqlens_k[b+1] - cu_seqlens_k[b] - 1
    through its table row (cu_seqlens_k gives the key counts; its end is not a total). Checked: no sequence holds
    more keys than the table's capacity (max_pages * page_size), and every entry holding a key lies in
    [0, num_pages) (an IndexError naming it; padding past them, e.g. -1, is fine). Forward only, as in
    FlashAttention 2: pools that require grad are refused (ValueError) at the call; q may require grad (the
    forward runs, so FlashAttention code that prefills under autograd runs), but a backward through the pages
    raises on the Triton backend (NotImplementedError: no silent zero gradient); the reference backend
    differentiates it by autograd.
    """
    paged = block_table is not None
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise AttentionTypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if paged and name != "q" and t.dim() != 4:
            raise AttentionInputError(f"with block_table, {name} must be a 4-D pool of pages (num_pages, Hkv, "
                                      f"page_size, D), got shape {tuple(t.shape)}")
        if t.dim() != 3 and not (paged and name != "q"):
            raise AttentionInputError(f"{name} must be a 3-D (total, H, D) tensor, got shape {tuple(t.shape)}")
    # reuse the dense checks on (1, H, total, D) views (the pools as they are)
    kv4 = (k, v) if paged else (k.transpose(0, 1)[None], v.transpose(0, 1)[None])
    _check_qkv(q.transpose(0, 1)[None], *kv4, paged=paged)
    _check_cu("cu_seqlens_q", cu_seqlens_q, q.device)
    _check_cu("cu_seqlens_k", cu_seqlens_k, q.device)
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise AttentionInputError("cu_seqlens_q and cu_seqlens_k must describe the same number of sequences")
    max_seqlen_q = check_int("max_seqlen_q", max_seqlen_q, low=0)
    max_seqlen_k = check_int("max_seqlen_k", max_seqlen_k, low=0)
    if paged:
        _check_block_table(block_table, q, k, n_batch=cu_seqlens_q.numel() - 1)
        if torch.is_grad_enabled() and (k.requires_grad or v.requires_grad):
            raise AttentionInputError("attention_varlen with block_table is forward-only for the pools: k/v require "
                                      "grad, and gradients into a paged cache are not supported (as in "
                                      "FlashAttention 2); detach them or call under torch.no_grad()")
        cu_q, cu_k = _checked_seqlens(cu_seqlens_q, cu_seqlens_k, q.shape[0], None, max_seqlen_q, max_seqlen_k,
                                      block_table, k.shape[0], k.shape[2])
    else:
        cu_q, cu_k = _checked_seqlens(cu_seqlens_q, cu_seqlens_k, q.shape[0], k.shape[0], max_seqlen_q, max_seqlen_k)
    check_bool("return_lse", return_lse)
    spec = make_spec(q, n_batch=cu_q.numel() - 1, causal=causal, scale=scale, window=window, softcap=softcap,
                     alibi_slopes=alibi_slopes, dropout_p=dropout_p, seed=seed, sinks=sinks)
    # the CPU's packed calls that torch's SDPA computes exactly go to it sequence by sequence (eagerly: the offsets
    # are read on the host); torch.compile traces the reference, which reads none
    def native_ok() -> bool:
        return (not paged and not return_lse and _sdpa_expressible(spec) and not torch.compiler.is_compiling()
                and not autograd_transforms_active(q, k, v) and _sdpa_zeroes_empty_rows(q.device.type))

    be = resolve(backend, q, k, v, op="attention", dtype=q.dtype, head_dim=q.shape[-1], head_dim_v=v.shape[-1],
                 native_ok=native_ok)
    if q.shape[0] and k.shape[0]:
        spec = _seeded(spec, q.device)
    if be == "native" and q.shape[0] and k.shape[0]:
        return _native_varlen(q, k, v, cu_q, cu_k, spec)
    if be in ("reference", "native") or q.shape[0] == 0 or k.shape[0] == 0:
        # causal bottom-right per sequence; dropout: the kernels' Philox draw (strided by max_seqlen_q/k as theirs)
        return reference.attention_varlen(q, k, v, cu_q, cu_k, max_seqlen_q, max_seqlen_k, return_lse=return_lse,
                                          dropout_p=spec.dropout_p, seed=spec.seed, block_table=block_table,
                                          **spec.reference_kwargs())
    out, lse2 = VarlenAttentionFunction.apply(*_distinct(q, k, v), cu_q, cu_k, max_seqlen_q, max_seqlen_k,
                                              block_table, *spec.op_args())
    return (out, lse2 * _LN2) if return_lse else out


def _native_varlen(q, k, v, cu_q, cu_k, spec: AttnSpec) -> torch.Tensor:
    """torch's SDPA on each packed sequence, (1, H, len, D) views through ``_native`` with the sequence's own
    bottom-right diagonal; one host read of the offsets. A sequence with no key gives zeros (one key, masked)."""
    bq, bk = cu_q.tolist(), cu_k.tolist()
    outs = []
    for b in range(len(bq) - 1):
        (q0, q1), (k0, k1) = bq[b:b + 2], bk[b:b + 2]
        if q1 == q0:
            continue
        seq = replace(spec, causal_offset=(k1 - k0) - (q1 - q0))
        if k1 == k0:
            k0, k1 = 0, 1
            seq = replace(spec, causal=False, window_left=WINDOW_MAX, window_right=WINDOW_MAX,
                          mask=torch.zeros(1, 1, 1, 1, dtype=torch.bool, device=q.device))
        out = _native(q[q0:q1].transpose(0, 1)[None], k[k0:k1].transpose(0, 1)[None], v[k0:k1].transpose(0, 1)[None],
                      seq)
        outs.append(out[0].transpose(0, 1))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)


def _expanded(t: torch.Tensor) -> bool:
    """Several elements share one memory location (a stride 0 on a dim of size > 1, e.g. ``expand``)."""
    return any(st == 0 and n > 1 for st, n in zip(t.stride(), t.shape))


def _check_block_table(block_table, q: torch.Tensor, k_cache: torch.Tensor, n_batch: int | None = None) -> None:
    """A (B, max_pages) int table on q's device (B = n_batch, default q's batch) over a pool of >= 1 pages of size
    >= 1."""
    n_batch = q.shape[0] if n_batch is None else n_batch
    if not isinstance(block_table, torch.Tensor) or block_table.dtype not in (torch.int32, torch.int64):
        got = block_table.dtype if isinstance(block_table, torch.Tensor) else type(block_table).__name__
        raise AttentionTypeError(f"block_table must be an int32/int64 tensor (B, max_pages), got {got}")
    if block_table.dim() != 2 or block_table.shape[0] != n_batch:
        raise AttentionInputError(f"block_table must have shape (B, max_pages) = ({n_batch}, max_pages), got "
                                  f"{tuple(block_table.shape)}")
    if block_table.device != q.device:
        raise AttentionInputError(f"block_table is on {block_table.device}, q on {q.device}")
    if k_cache.shape[0] == 0:
        raise AttentionInputError("k_cache/v_cache hold no pages: a paged cache is (num_pages >= 1, Hkv, page_size, D)")
    if k_cache.shape[2] == 0:
        raise AttentionInputError("the page size (k_cache.shape[2]) must be >= 1")


def _table_error(block_table: torch.Tensor, used: torch.Tensor, n_pages: int,
                 entry: str = "attention_with_kvcache") -> IndexError:
    bad = used & ((block_table < 0) | (block_table >= n_pages))
    b, j = (int(i) for i in bad.nonzero()[0])
    return IndexError(f"{entry}: block_table[{b}, {j}] = {int(block_table[b, j])} is out of range for "
                      f"a pool of {n_pages} pages ([0, {n_pages})); the entry holds positions used by batch {b}")


@torch.no_grad()
def attention_with_kvcache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    k_new: torch.Tensor | None = None,
    v_new: torch.Tensor | None = None,
    *,
    causal: bool = False,
    scale: float | None = None,
    window: tuple[int, int] | None = None,
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    num_splits: int = 0,
    block_table: torch.Tensor | None = None,
    cache_leftpad: torch.Tensor | None = None,
    return_lse: bool = False,
    check_bounds: bool | str | None = None,
    sinks: torch.Tensor | None = None,
    backend: str | None = None,
):
    """Decoding attention over a KV cache (inference only: no gradient).

    q: (B, Hq, Nq, D); k_cache: (B, Hkv, S, D), v_cache: (B, Hkv, S, Dv) (D up to 576 and Dv up to 512 on
    the Triton backend); cache_seqlens: (B,) int, the valid prefix of each cache. ``k_new`` (B, Hkv, Nnew, D)
    and ``v_new`` (B, Hkv, Nnew, Dv), when given, are written into the cache in place at positions
    cache_seqlens[b] .. + Nnew (``cache_seqlens`` itself is not changed: add Nnew for the next step); an
    expanded cache (a stride 0 on a dim of size > 1) is refused before any write.
    Batch b then attends to its first cache_seqlens[b] + Nnew keys; ``causal`` is bottom-right, so the
    new queries see the cache and the new keys up to themselves. With Nq = 1 and a long cache the
    kernel splits the keys across programs (flash-decoding); ``num_splits=0`` picks the count, 1
    disables it. GQA, window, softcap, ALiBi and ``sinks`` as in ``attention`` (split-KV adds the sink once,
    when it merges the splits). The output (B, Hq, Nq, Dv) is laid out in q's memory order. ``return_lse``:
    also the (B, Hq, Nq) log-sum-exp (natural log, float32; the sink included; -inf for no key and no sink).

    MLA decoding (DeepSeek's latent cache): the values may be a column view of the keys' own memory,
    ``v_cache = k_cache[..., :512]`` of a 576-wide cache, read in place (no copy). Then the keys' append
    writes the values too: pass ``v_new=None`` with ``k_new`` (a ``v_new`` would write the same memory a
    second time and is refused, ValueError, before anything is written; so is ``v_new=None`` for a
    ``v_cache`` that is not such a view).

    ``block_table`` (B, max_pages) int32/int64: a paged cache (vLLM's, FlashInfer's, FlashAttention's
    block_table). k_cache/v_cache are then pools of pages (num_pages, Hkv, page_size, D), any page size >= 1
    and any strides, and batch b's position p is slot ``p % page_size`` of page ``block_table[b, p //
    page_size]``; S is the table's capacity, max_pages * page_size. The kernel reads the pages in place (no
    gather into a contiguous copy; split-KV as above) and k_new/v_new are appended through the pages in
    place. Only the entries holding a batch's first cache_seqlens[b] + Nnew positions are read and
    checked: padding past them (e.g. -1) is fine. Speed: a page size that is a multiple of the kernel's key
    tile (64 for head dims up to 128 on a GPU, 32 above: page sizes 64, 128, 256, ...) reads each key tile
    from one page, the same loads as a contiguous cache; other sizes (1, 7, 16, ...) gather each tile row by
    row, one page id per row (correct at any size; its cost is measured by
    benchmarks/scripts/decode_bench.py, not yet on a GPU).

    ``cache_leftpad`` (B,) int32/int64: a left-padded cache (FlashAttention's ``cache_leftpad``): batch b's keys are
    its cache positions ``cache_leftpad[b] .. cache_seqlens[b] + Nnew - 1``, positions left of it are never read
    (they may hold anything). Positions stay absolute: the causal diagonal, the window sides and the ALiBi distances
    are measured in cache positions as without it (query i's diagonal is ``cache_seqlens[b] + Nnew - Nq + i``), and
    ``k_new``/``v_new`` are appended at ``cache_seqlens[b]``; so ``cache_leftpad`` is exactly a per-batch lower
    bound on the keys seen. ``cache_leftpad[b] = cache_seqlens[b]``: only the new keys (none without k_new: zeros,
    lse -inf or the sink). With a block table the positions are read through the pages as usual; split-KV splits
    the keys from ``cache_leftpad[b]`` on. Checked with the lengths: ``0 <= cache_leftpad[b] <= cache_seqlens[b]``.

    ``check_bounds``: how ``0 <= cache_seqlens[b]`` and ``cache_seqlens[b] + Nnew <= S`` (and
    ``0 <= cache_leftpad[b] <= cache_seqlens[b]``) are checked, and with a block table that every entry used lies in
    [0, num_pages) (the modes of ``embedding``):

    * ``None`` (default): "device" on CUDA (and while torch.compile traces), "sync" on the CPU, where
      reading the lengths costs nothing. The default decoding step on CUDA reads nothing back to the host.
    * ``"sync"`` (or ``True``): read the lengths (and the table) on the host before anything runs: a
      ``ValueError`` (lengths) or ``IndexError`` (table) is raised by this call, and the cache is left untouched.
    * ``"device"``: no host read; one ``torch._assert_async`` checks on the device. On CUDA the device-side
      assertion fails the stream and surfaces as a ``RuntimeError`` ("device-side assert triggered") at
      the next synchronizing call (``.item()``, ``.cpu()``, ``torch.cuda.synchronize()``), after which
      the CUDA context is unusable. Eager calls on the CPU run the "sync" check instead (as for
      ``embedding``); a compiled CPU graph raises the assertion's ``RuntimeError`` before the append.
    * ``"off"`` (or ``False``): no check.

    In every mode no read or write leaves the cache: a batch whose lengths (or used table entries, or leftpad) are
    out of range gets no append and writes nothing (neither its own slots nor, through a bad table entry, another
    batch's: the other batches' appends are exact) and attends to its lengths clamped to [0, S] (its leftpad to
    [0, that length]), through table entries clamped into the pool.
    """
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(t, torch.Tensor):
            raise AttentionTypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise AttentionInputError(f"{name} must be a 4-D (B, H, N, D) tensor, got shape {tuple(t.shape)}")
    paged = block_table is not None
    _check_qkv(q, k_cache, v_cache, paged=paged)
    v_in_k = _column_view(v_cache, k_cache)
    if paged:
        _check_block_table(block_table, q, k_cache)
    B, page = q.shape[0], k_cache.shape[2]
    S = page * block_table.shape[1] if paged else page  # the capacity of each batch's cache
    if (not isinstance(cache_seqlens, torch.Tensor) or cache_seqlens.dtype not in (torch.int32, torch.int64)
            or tuple(cache_seqlens.shape) != (B,)):
        raise AttentionTypeError(f"cache_seqlens must be an int32/int64 tensor of shape ({B},)")
    if cache_seqlens.device != q.device:
        raise AttentionInputError(f"cache_seqlens is on {cache_seqlens.device}, q on {q.device}")
    if cache_leftpad is not None:
        if (not isinstance(cache_leftpad, torch.Tensor) or cache_leftpad.dtype not in (torch.int32, torch.int64)
                or tuple(cache_leftpad.shape) != (B,)):
            got = (f"{cache_leftpad.dtype} of shape {tuple(cache_leftpad.shape)}"
                   if isinstance(cache_leftpad, torch.Tensor) else type(cache_leftpad).__name__)
            raise AttentionTypeError(f"cache_leftpad must be an int32/int64 tensor of shape ({B},) (batch b's first "
                                     f"cache position), got {got}")
        if cache_leftpad.device != q.device:
            raise AttentionInputError(f"cache_leftpad is on {cache_leftpad.device}, q on {q.device}")
    n_new = 0
    if k_new is None and v_new is not None:
        raise AttentionInputError("k_new and v_new must be given together (v_new alone has no keys)")
    if k_new is not None and v_new is None and not v_in_k:
        raise AttentionInputError("k_new and v_new must be given together; v_new may be None only when v_cache is a "
                                  "column view of k_cache's memory (MLA: v_cache = k_cache[..., :Dv]), whose values "
                                  "the keys' append writes (while torch.compile traces: a view of a k_cache that "
                                  "owns its memory)")
    if v_new is not None and v_in_k:
        raise AttentionInputError("v_cache is a column view of k_cache's memory (e.g. k_cache[..., :Dv]): the append "
                                  "of k_new writes its values; pass v_new=None (a v_new would write that memory a "
                                  "second time)")
    if k_new is not None:
        news = ((k_new, k_cache), (v_new, v_cache))
        for name, t in (("k_new", k_new), ("v_new", v_new)):
            if t is not None and not isinstance(t, torch.Tensor):
                raise AttentionTypeError(f"k_new and v_new must be tensors, got {name} of type {type(t).__name__}")
        n_new = k_new.shape[2] if k_new.dim() == 4 else -1
        for t, cache in news:
            if t is not None and (t.dim() != 4 or t.shape[0] != B or t.shape[1] != cache.shape[1]
                                  or t.shape[2] != n_new or t.shape[3] != cache.shape[3]):
                raise AttentionInputError(
                    f"k_new/v_new must be (B, Hkv, Nnew, D) / (B, Hkv, Nnew, Dv) matching q and the caches, got "
                    f"{tuple(k_new.shape)} and {None if v_new is None else tuple(v_new.shape)}")
            if t is not None and (t.dtype != cache.dtype or t.device != cache.device):
                raise AttentionTypeError("k_new/v_new must match the cache's dtype and device")
        if n_new > S:
            raise AttentionInputError(f"Nnew ({n_new}) new keys do not fit a cache of length {S}")
        for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
            if n_new and _expanded(t):
                raise AttentionInputError(f"{name} is expanded (stride {tuple(t.stride())} for shape "
                                          f"{tuple(t.shape)}): appending in place would write one slot for many "
                                          "entries; pass a cache that owns its memory (e.g. .contiguous())")
    num_splits = check_int("num_splits", num_splits, low=0)
    check_bool("return_lse", return_lse)
    mode = bounds_mode(check_bounds, q.device)
    # every check before the in-place append: a bad argument must not leave the cache half-updated
    spec = make_spec(q, causal=causal, scale=scale, window=window, softcap=softcap, alibi_slopes=alibi_slopes,
                     sinks=sinks)
    be = resolve(backend, q, k_cache, v_cache, op="attention_decode", dtype=q.dtype, head_dim=q.shape[-1],
                 head_dim_v=v_cache.shape[-1])
    lens = cache_seqlens.to(torch.int64)
    ok = (lens >= 0) & (lens + n_new <= S)  # (B,)
    msg = f"attention_with_kvcache: cache_seqlens + Nnew must lie in [0, {S}] (the cache length)"
    checks = [ok]  # (B,) bool each, in the order their errors are raised
    if paged:
        n_pages = k_cache.shape[0]
        # entry j holds positions [j * page, (j + 1) * page): used by batch b iff j * page < its length
        used = torch.arange(block_table.shape[1], device=q.device)[None, :] * page < \
            (lens + n_new).clamp(0, S)[:, None]
        checks.append(~(used & ((block_table < 0) | (block_table >= n_pages))).any(dim=1))
        msg += f", every block_table entry used must lie in [0, {n_pages}) (the pool's pages)"
    if cache_leftpad is not None:
        pad = cache_leftpad.to(torch.int64)
        checks.append((pad >= 0) & (pad <= lens))
        msg += ", and 0 <= cache_leftpad <= cache_seqlens"
    if mode == "sync":
        passed = torch.stack([c.all() for c in checks]).tolist()  # the one host read
        if not passed[0]:
            raise _length_error(msg, lens, ok, n_new)
        if paged and not passed[1]:
            raise _table_error(block_table, used, n_pages)
        if cache_leftpad is not None and not passed[-1]:
            raise _leftpad_error(pad, lens, checks[-1])
    for c in checks[1:]:
        ok = ok & c
    if mode == "device":
        assert_ok(ok.all(), msg)
    if n_new:  # (v_new None: v_cache is a view of k_cache's columns, written with the keys)
        _append(k_cache, v_cache, k_new, v_new, lens, None if mode == "sync" else ok, block_table)
    total = (lens + n_new).clamp(0, S)
    # unchecked, a leftpad out of range is clamped into [0, the batch's length]: the kernel reads no key outside
    starts = None if cache_leftpad is None else torch.minimum(pad.clamp(min=0), total).to(torch.int32)
    total = total.to(torch.int32)
    if be == "reference" or q.numel() == 0:
        # causal bottom-right per batch; a paged cache read through a contiguous copy of the pages
        return reference.attention_with_kvcache(q, k_cache, v_cache, total, return_lse=return_lse,
                                                cache_leftpad=starts, block_table=block_table,
                                                **spec.reference_kwargs())
    out, lse2 = torch.ops.embedattn.kvcache_fwd(q, k_cache, v_cache, total, block_table, num_splits, *spec.op_args(),
                                                starts=starts)
    return (out, lse2 * _LN2) if return_lse else out


def _leftpad_error(pad: torch.Tensor, lens: torch.Tensor, ok: torch.Tensor) -> AttentionInputError:
    """The sync-mode leftpad error, naming the first bad batch (one more host read, on the error path only)."""
    b = int((~ok).nonzero()[0])
    return AttentionInputError(f"attention_with_kvcache: cache_leftpad must lie in [0, cache_seqlens] per batch: batch "
                               f"{b} has cache_leftpad[{b}] = {int(pad[b])} with cache_seqlens[{b}] = {int(lens[b])}")


def _length_error(msg: str, lens: torch.Tensor, ok: torch.Tensor, n_new: int) -> AttentionInputError:
    """The sync-mode length error, naming the first bad batch and its value (one more host read, on the error
    path only)."""
    b = int((~ok).nonzero()[0])
    return AttentionInputError(f"{msg}: batch {b} has cache_seqlens[{b}] = {int(lens[b])} with Nnew = {n_new}")


def _column_view(v: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether v is a view of k's own columns (same storage and row strides, its head dim inside k's: MLA's
    ``v_cache = k_cache[..., :Dv]``), so that writing k's rows writes v's. Eagerly by the storages' addresses and
    offsets. While torch.compile traces there is no storage or offset to read: then v must be a view of k itself,
    k owning its memory (v's base is k), which with the same strides and no wider a head dim puts v inside k's
    columns."""
    if v.shape[:3] != k.shape[:3] or v.stride()[:3] != k.stride()[:3] or v.stride(3) != k.stride(3):
        return False
    if torch.compiler.is_compiling():
        return v._base is k and k._base is None and v.shape[3] <= k.shape[3]
    if v.untyped_storage().data_ptr() != k.untyped_storage().data_ptr():
        return False
    col, step = v.storage_offset() - k.storage_offset(), max(k.stride(3), 1)
    return col >= 0 and col % step == 0 and col // step + v.shape[3] <= k.shape[3]


def _append(k_cache: torch.Tensor, v_cache: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor | None,
            lens: torch.Tensor, ok: torch.Tensor | None, block_table: torch.Tensor | None) -> None:
    """Write k_new (B, Hkv, Nnew, D) / v_new (B, Hkv, Nnew, Dv) into the caches at positions lens[b] .. + Nnew,
    through the block table when paged (v_new None: v_cache lies in k_cache's columns, written with them). ``ok``
    (B,) bool: which batches may append (None: all, checked before). A batch that may not writes nothing, wherever
    its positions or table entries point: its writes are redirected onto the slots of the first batch that may
    (the donor), carrying the donor's values, so every slot written receives one value whatever order
    ``index_put_`` applies duplicates in, and another batch's new key is never overwritten. With no batch
    allowed, the donor (batch 0) writes back what its own slots hold. No host read."""
    B, n_new = k_new.shape[0], k_new.shape[2]
    page = k_cache.shape[2]
    S = page * (block_table.shape[1] if block_table is not None else 1)
    pos = (lens[:, None] + torch.arange(n_new, device=lens.device)[None, :]).clamp(0, S - 1)  # (B, Nnew)
    if block_table is not None:  # (page, slot) of each new position; a bad entry is clamped into the pool
        rows = block_table.gather(1, pos // page).long().clamp(0, k_cache.shape[0] - 1)
        pos = pos % page
    else:
        rows = torch.arange(B, device=lens.device)[:, None].expand_as(pos)
    writes = [(k_cache, k_new.transpose(1, 2))]  # (B, Nnew, Hkv, D), as cache[rows, :, pos]
    if v_new is not None:
        writes.append((v_cache, v_new.transpose(1, 2)))
    if ok is not None:
        donor = ok.to(torch.int32).argmax().view(1)  # the first batch allowed (0 when none is); no host read
        d_rows, d_pos, d_ok = rows.index_select(0, donor), pos.index_select(0, donor), ok.index_select(0, donor)
        d_ok = d_ok.view(1, 1, 1, 1)
        keep = ok[:, None]
        # the donor's slots receive its own new values (or what they hold): (1, Nnew, Hkv, D)
        writes = [(c, torch.where(keep[..., None, None], x,
                                  torch.where(d_ok, x.index_select(0, donor), c[d_rows, :, d_pos])))
                  for c, x in writes]
        rows, pos = torch.where(keep, rows, d_rows), torch.where(keep, pos, d_pos)
    for cache, x in writes:
        cache[rows, :, pos] = x


def dropout_mask(shape: tuple[int, int, int, int], dropout_p: float, seed: int, device=None,
                 backend: str | None = None) -> torch.Tensor:
    """Debug path: the (B, H, Nq, Nk) bool keep mask (True = kept) that ``attention`` draws for
    ``dropout_p`` and ``seed`` on dense inputs of that shape on ``device`` (default: CUDA when there is
    one, else the CPU), on the backend the same ``backend`` argument selects there."""
    if not isinstance(shape, (tuple, list, torch.Size)) or len(shape) != 4:
        raise ValueError(f"shape must be (B, H, Nq, Nk), got {shape!r}")
    shape = tuple(check_int(f"shape[{i}]", s, low=0) for i, s in enumerate(shape))
    dropout_p = check_float("dropout_p", dropout_p, low=0.0, high=1.0, high_open=True)
    seed = check_int("seed", seed, low=0, high=2**63 - 1)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if not isinstance(device, (str, torch.device)):
        raise TypeError(f"device must be a str, a torch.device or None, got {device!r}")
    try:
        device = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"device={device!r} is not a device: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device={str(device)!r}, but CUDA is not available here (use device='cpu' or None)")
    probe = torch.empty(0, device=device)
    seed_t = seed_tensor(seed, device)
    if resolve(backend, probe, op="attention", dtype=torch.float32) == "triton":
        from .kernels.attention import dropout_keep_mask

        return dropout_keep_mask(*shape, dropout_p, seed_t)
    return reference.dropout_keep_mask(shape, dropout_p, seed_t)
