"""Fused attention: argument checks, the autograd Function, ``attention`` and the SDPA drop-in."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import reference
from ._backend import resolve

# captured at import so that the drop-in's fallback still reaches torch when patch_sdpa() is active
_TORCH_SDPA = F.scaled_dot_product_attention

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_REFERENCE_DTYPES = _TRITON_DTYPES + (torch.float64,)
MAX_HEAD_DIM = 256


class AttentionInputError(ValueError, RuntimeError):
    """Bad attention input. A ValueError, and a RuntimeError like torch SDPA's own errors."""


class AttentionTypeError(TypeError, RuntimeError):
    """Bad attention input type. A TypeError, and a RuntimeError like torch SDPA's own errors."""


# --------------------------------------------------------------------------------------------------
# argument checks
# --------------------------------------------------------------------------------------------------
def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise AttentionTypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise AttentionInputError(f"{name} must be 4-D (B, H, N, D), got shape {tuple(t.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise AttentionTypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    allowed = _TRITON_DTYPES if backend == "triton" else _REFERENCE_DTYPES
    if q.dtype not in allowed:
        raise AttentionTypeError(f"q dtype must be one of {allowed} for backend {backend!r}, got {q.dtype}")
    if not (q.device == k.device == v.device):
        raise AttentionInputError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if k.shape != v.shape:
        raise AttentionInputError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[0] != k.shape[0]:
        raise AttentionInputError(f"batch size of q ({q.shape[0]}) and k/v ({k.shape[0]}) differ")
    if q.shape[3] != k.shape[3]:
        raise AttentionInputError(f"head dim of q ({q.shape[3]}) and k/v ({k.shape[3]}) differ")
    hq, hkv = q.shape[1], k.shape[1]
    if hkv == 0 and hq != 0 or hkv and hq % hkv != 0:
        raise AttentionInputError(f"query heads ({hq}) must be a multiple of key/value heads ({hkv})")
    d = q.shape[3]
    if backend == "triton" and not 1 <= d <= MAX_HEAD_DIM:
        raise AttentionInputError(f"head dim must be in [1, {MAX_HEAD_DIM}] for backend 'triton', got {d}")


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


# --------------------------------------------------------------------------------------------------
# autograd
# --------------------------------------------------------------------------------------------------
class AttentionFunction(torch.autograd.Function):
    """Triton attention. forward(q, k, v, mask, causal, causal_offset, scale) -> (out, lse2).

    ``lse2`` is the base-2 log-sum-exp (float32, -inf on rows with no visible key); it is not
    differentiable. The backward is deterministic (no atomics).
    """

    @staticmethod
    def forward(ctx, q, k, v, mask, causal, causal_offset, scale):
        from .kernels.attention import attention_forward

        out, lse2 = attention_forward(q, k, v, mask, causal, causal_offset, scale)
        ctx.save_for_backward(q, k, v, out, lse2, mask)
        ctx.causal, ctx.causal_offset, ctx.scale = causal, causal_offset, scale
        ctx.mark_non_differentiable(lse2)
        return out, lse2

    @staticmethod
    def backward(ctx, dout, _dlse):
        from .kernels.attention import attention_backward

        q, k, v, out, lse2, mask = ctx.saved_tensors
        dq, dk, dv = attention_backward(dout, q, k, v, out, lse2, mask, ctx.causal, ctx.causal_offset, ctx.scale)
        return dq, dk, dv, None, None, None, None


def _empty_result(q, k, v, return_lse):
    b, h, nq, d = q.shape
    # no keys: every row is empty, so zeros (and an lse of -inf), like a fully masked row
    out = q.new_zeros(b, h, nq, d) + 0.0 * (q.sum() + k.sum() + v.sum())  # keeps the graph connected
    if return_lse:
        return out, torch.full((b, h, nq), float("-inf"), dtype=torch.float32, device=q.device)
    return out


def _attention(q, k, v, *, causal, causal_offset, scale, attn_mask, return_lse, backend):
    be = resolve(backend, q, k, v)
    _check_qkv(q, k, v, be)
    nq, nk = q.shape[2], k.shape[2]
    mask = _check_mask(attn_mask, q, nk)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[3]) if q.shape[3] else 1.0
    elif not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise AttentionInputError(f"scale must be a finite float or None, got {scale!r}")
    if q.numel() == 0 or nk == 0 or k.shape[1] == 0:
        return _empty_result(q, k, v, return_lse)
    if be == "reference":
        if causal and causal_offset != nk - nq:
            # top-left alignment expressed as a mask: the reference itself is bottom-right
            i = torch.arange(nq, device=q.device)[:, None]
            j = torch.arange(nk, device=q.device)[None, :]
            cm = j <= i + causal_offset
            if mask is None:
                mask = cm
            elif mask.dtype == torch.bool:
                mask = mask & cm
            else:
                mask = mask.masked_fill(~cm, float("-inf"))
            causal = False
        return reference.attention(q, k, v, causal=causal, scale=scale, attn_mask=mask, return_lse=return_lse)
    out, lse2 = AttentionFunction.apply(q, k, v, mask, bool(causal), int(causal_offset), float(scale))
    if return_lse:
        return out, lse2 * math.log(2.0)
    return out


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    attn_mask: torch.Tensor | None = None,
    return_lse: bool = False,
    backend: str | None = None,
):
    """Fused softmax(q kᵀ · scale + mask) v without materializing the Nq×Nk matrix.

    Args:
        q: (B, Hq, Nq, D). k, v: (B, Hkv, Nk, D) with Hq a multiple of Hkv (GQA/MQA; K/V are not
            copied). Any strides. fp16, bf16, fp32 (and fp64 on the reference backend).
        causal: query i sees key j iff j <= i + Nk - Nq: aligned bottom-right, FlashAttention's
            convention (the last query sees every key, as in KV-cache decoding). Rows that see no key
            (Nq > Nk) give zeros.
        scale: score scale, default 1/sqrt(D).
        attn_mask: bool (True = attend) or additive float, broadcastable to (B, Hq, Nq, Nk); read
            tile by tile through its strides, never expanded in memory. A row with every key
            masked gives zeros and zero gradients.
        return_lse: also return the (B, Hq, Nq) float32 log-sum-exp (natural log; -inf on empty rows).
        backend: None | "auto" | "triton" | "reference" (see ``embedattn._backend``).

    Returns:
        out (B, Hq, Nq, D) in q's dtype, or (out, lse) when ``return_lse``.
    """
    nk = k.shape[2] if isinstance(k, torch.Tensor) and k.dim() == 4 else 0
    nq = q.shape[2] if isinstance(q, torch.Tensor) and q.dim() == 4 else 0
    return _attention(q, k, v, causal=causal, causal_offset=nk - nq, scale=scale, attn_mask=attn_mask,
                      return_lse=return_lse, backend=backend)


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

    3-D (N, L, E) and 4-D (N, H, L, E) inputs; ``is_causal`` is aligned top-left (torch's
    convention: query i sees keys j <= i); bool or float masks; ``enable_gqa``. Cases the kernel
    does not cover defer to torch's own SDPA: ``dropout_p > 0`` (in-kernel dropout is a later
    feature), inputs of other ranks, head dims above 256, float64, and devices/backends where
    Triton does not run (CPU tensors without the interpreter go to torch, which is faster there
    than the reference).
    """
    if not all(isinstance(t, torch.Tensor) for t in (query, key, value)):
        raise AttentionTypeError("query, key and value must be tensors")
    if is_causal and attn_mask is not None:
        raise AttentionInputError("_scaled_dot_product_attention: Explicit attn_mask should not be set when "
                                  "is_causal=True")
    if query.dtype != key.dtype or query.dtype != value.dtype:
        raise AttentionTypeError(
            f"Expected query, key, and value to have the same dtype, but got query.dtype: {query.dtype}, "
            f"key.dtype: {key.dtype}, and value.dtype: {value.dtype} instead.")
    if not (query.dim() == key.dim() == value.dim()) or query.dim() not in (3, 4):
        return _TORCH_SDPA(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                           scale=scale, enable_gqa=enable_gqa)
    if query.dim() == 4 and query.shape[1] != key.shape[1] and not enable_gqa:
        raise AttentionInputError(
            f"query heads ({query.shape[1]}) differ from key heads ({key.shape[1]}); pass enable_gqa=True")
    be = resolve(None, query, key, value)
    if (dropout_p > 0.0 or be != "triton" or query.dtype not in _TRITON_DTYPES
            or query.shape[-1] > MAX_HEAD_DIM or query.shape[-1] != value.shape[-1]
            or (attn_mask is not None and attn_mask.requires_grad)):
        return _TORCH_SDPA(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                           scale=scale, enable_gqa=enable_gqa)
    three_d = query.dim() == 3
    if three_d:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        if attn_mask is not None and attn_mask.dim() == 3:
            attn_mask = attn_mask.unsqueeze(1)
    out = _attention(query, key, value, causal=is_causal, causal_offset=0, scale=scale, attn_mask=attn_mask,
                     return_lse=False, backend="triton")
    return out.squeeze(1) if three_d else out
