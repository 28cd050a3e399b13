"""Fused attention: argument checks, the autograd Function, ``attention`` and the SDPA drop-in."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

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
    """Triton attention. forward(q, k, v, mask, causal, causal_offset, scale, features) -> (out, lse2).

    ``features`` is a dict of optional score modifiers (window, softcap, alibi, dropout_p, seed).
    ``lse2`` is the base-2 log-sum-exp (float32, -inf on rows with no visible key); it is
    differentiable (its gradient folds into the backward's ``delta``, as in FlashAttention), so a
    loss that uses it (e.g. merging partial attentions by their log-sum-exp) gets exact gradients.
    The backward is deterministic (no atomics), regenerates the dropout mask, and is not itself
    differentiable (double backward raises).
    """

    @staticmethod
    def forward(ctx, q, k, v, mask, causal, causal_offset, scale, features=None):
        from .kernels.attention import attention_forward

        features = features or {}
        out, lse2 = attention_forward(q, k, v, mask, causal, causal_offset, scale, **features)
        ctx.save_for_backward(q, k, v, out, lse2, mask)
        ctx.causal, ctx.causal_offset, ctx.scale, ctx.features = causal, causal_offset, scale, features
        # unused outputs get None, not materialized zeros: no work for an lse nobody differentiates
        ctx.set_materialize_grads(False)
        return out, lse2

    @staticmethod
    @once_differentiable
    def backward(ctx, dout, dlse2):
        from .kernels.attention import attention_backward

        q, k, v, out, lse2, mask = ctx.saved_tensors
        if dout is None and dlse2 is None:
            return None, None, None, None, None, None, None, None
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dk, dv = attention_backward(dout, q, k, v, out, lse2, mask, ctx.causal, ctx.causal_offset, ctx.scale,
                                        dlse2=dlse2, **ctx.features)
        return dq, dk, dv, None, None, None, None, None


class VarlenAttentionFunction(torch.autograd.Function):
    """Triton attention over packed variable-length sequences (see ``attention_varlen``)."""

    @staticmethod
    def forward(ctx, q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, features):
        from .kernels.attention import varlen_forward

        out, lse2 = varlen_forward(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, **features)
        ctx.save_for_backward(q, k, v, out, lse2, cu_q, cu_k)
        ctx.args = (max_q, max_k, causal, scale, features)
        ctx.mark_non_differentiable(lse2)
        return out, lse2

    @staticmethod
    @once_differentiable
    def backward(ctx, dout, _dlse):
        from .kernels.attention import varlen_backward

        q, k, v, out, lse2, cu_q, cu_k = ctx.saved_tensors
        max_q, max_k, causal, scale, features = ctx.args
        dq, dk, dv = varlen_backward(dout, q, k, v, out, lse2, cu_q, cu_k, max_q, max_k, causal, scale, **features)
        return dq, dk, dv, None, None, None, None, None, None, None


def _resolve_scale(scale, head_dim: int) -> float:
    """The score scale: 1/sqrt(D) by default, else a finite number (checked)."""
    if scale is None:
        return 1.0 / math.sqrt(head_dim) if head_dim else 1.0
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise AttentionInputError(f"scale must be a finite float or None, got {scale!r}")
    return float(scale)


def _check_features(q, window, softcap, alibi_slopes, dropout_p, seed, n_batch=None):
    """Validate the optional score modifiers; returns the kernel's feature dict."""
    feats = {}
    if window is not None:
        if (not isinstance(window, (tuple, list)) or len(window) != 2
                or not all(isinstance(w, int) and not isinstance(w, bool) for w in window)):
            raise AttentionInputError(f"window must be a (left, right) pair of ints (-1 = unbounded), got {window!r}")
        feats["window"] = (int(window[0]), int(window[1]))
    if softcap is not None and softcap != 0:
        if not isinstance(softcap, (int, float)) or not math.isfinite(softcap) or softcap < 0:
            raise AttentionInputError(f"softcap must be a finite float >= 0 (0 = off), got {softcap!r}")
        feats["softcap"] = float(softcap)
    if alibi_slopes is not None:
        if not isinstance(alibi_slopes, torch.Tensor) or not alibi_slopes.is_floating_point():
            raise AttentionTypeError("alibi_slopes must be a floating tensor of shape (H,) or (B, H)")
        if alibi_slopes.requires_grad:
            raise AttentionInputError("alibi_slopes requires grad; gradients with respect to the slopes are not "
                                      "supported")
        b, h = (n_batch if n_batch is not None else q.shape[0]), q.shape[1] if q.dim() == 4 else q.shape[-2]
        if tuple(alibi_slopes.shape) not in ((h,), (b, h)):
            raise AttentionInputError(f"alibi_slopes must have shape ({h},) or ({b}, {h}), got "
                                      f"{tuple(alibi_slopes.shape)}")
        if alibi_slopes.device != q.device:
            raise AttentionInputError(f"alibi_slopes is on {alibi_slopes.device}, q on {q.device}")
        feats["alibi"] = alibi_slopes.float()
    if dropout_p:
        if not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
            raise AttentionInputError(f"dropout_p must be in [0, 1), got {dropout_p!r}")
        if seed is None:
            seed = int(torch.randint(0, 2**31 - 1, (1,)).item())  # follows torch.manual_seed
        feats["dropout_p"] = float(dropout_p)
        feats["seed"] = int(seed)
    return feats


def _reference_features(feats, q):
    kw = {}
    if "window" in feats:
        kw["window"] = feats["window"]
    if "softcap" in feats:
        kw["softcap"] = feats["softcap"]
    if "alibi" in feats:
        kw["alibi_slopes"] = feats["alibi"].to(q.dtype if q.dtype == torch.float64 else torch.float32)
    return kw


def _empty_result(q, k, v, return_lse):
    b, h, nq, d = q.shape
    # no keys: every row is empty, so zeros (and an lse of -inf), like a fully masked row
    out = q.new_zeros(b, h, nq, d) + 0.0 * (q.sum() + k.sum() + v.sum())  # keeps the graph connected
    if return_lse:
        return out, torch.full((b, h, nq), float("-inf"), dtype=torch.float32, device=q.device)
    return out


def _attention(q, k, v, *, causal, causal_offset, scale, attn_mask, return_lse, backend, window=None,
               softcap=0.0, alibi_slopes=None, dropout_p=0.0, seed=None):
    be = resolve(backend, q, k, v)
    _check_qkv(q, k, v, be)
    nq, nk = q.shape[2], k.shape[2]
    mask = _check_mask(attn_mask, q, nk)
    feats = _check_features(q, window, softcap, alibi_slopes, dropout_p, seed)
    scale = _resolve_scale(scale, q.shape[3])
    if q.numel() == 0 or nk == 0 or k.shape[1] == 0:
        return _empty_result(q, k, v, return_lse)
    if be == "reference":
        # the diagonal that causal, window and ALiBi are measured from, as in the kernels
        kw = _reference_features(feats, q)
        kw["causal_offset"] = causal_offset
        if "dropout_p" in feats:
            g = torch.Generator(device=q.device).manual_seed(feats["seed"])
            shape = (q.shape[0], q.shape[1], nq, nk)
            kw["dropout_p"] = feats["dropout_p"]
            kw["dropout_mask"] = torch.rand(shape, generator=g, device=q.device) >= feats["dropout_p"]
        return reference.attention(q, k, v, causal=causal, scale=scale, attn_mask=mask, return_lse=return_lse, **kw)
    out, lse2 = AttentionFunction.apply(q, k, v, mask, bool(causal), int(causal_offset), float(scale), feats)
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
    window: tuple[int, int] | None = None,
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    seed: int | None = None,
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
        window: (left, right) sliding window (Mistral-style local attention), -1 = unbounded: query i
            sees keys i + Nk - Nq - left <= j <= i + Nk - Nq + right. Combines with ``causal``
            (which caps right at 0). Key tiles outside the band are skipped, not masked.
        softcap: > 0 replaces each score s by softcap·tanh(s / softcap) (Gemma-2), gradient included.
        alibi_slopes: (H,) or (B, H) float: adds -slope·|i + Nk - Nq - j| (FlashAttention's ALiBi).
        dropout_p: dropout on the attention probabilities, drawn in-kernel (Philox) and regenerated
            identically in the backward. ``seed`` fixes the draw; None takes one from torch's RNG.
            The reference backend draws its own mask from ``seed`` (a different stream).
        backend: None | "auto" | "triton" | "reference" (see ``embedattn._backend``).

    Returns:
        out (B, Hq, Nq, D) in q's dtype, or (out, lse) when ``return_lse``.
    """
    nk = k.shape[2] if isinstance(k, torch.Tensor) and k.dim() == 4 else 0
    nq = q.shape[2] if isinstance(q, torch.Tensor) and q.dim() == 4 else 0
    return _attention(q, k, v, causal=causal, causal_offset=nk - nq, scale=scale, attn_mask=attn_mask,
                      return_lse=return_lse, backend=backend, window=window, softcap=softcap,
                      alibi_slopes=alibi_slopes, dropout_p=dropout_p, seed=seed)


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
    convention: query i sees keys j <= i); bool or float masks; ``enable_gqa``; ``dropout_p`` runs
    in-kernel (seeded from torch's RNG, so ``torch.manual_seed`` makes it reproducible, though the
    mask differs from torch's own). Cases the kernel does not cover defer to torch's own SDPA:
    inputs of other ranks, head dims above 256, float64, and devices/backends where Triton does
    not run (CPU tensors without the interpreter go to torch, which is faster there than the
    reference).
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
    if (isinstance(attn_mask, torch.Tensor) and attn_mask.dtype != torch.bool
            and attn_mask.dtype not in (torch.float32, query.dtype)):
        # torch's own rule: a float64 mask (or fp16 with bf16 queries) is an error there, so here too
        raise AttentionTypeError(
            f"Expected attn_mask dtype to be bool or float or to match query dtype, but got attn_mask.dtype: "
            f"{attn_mask.dtype} and  query.dtype: {query.dtype} instead.")
    be = resolve(None, query, key, value)
    if (be != "triton" or query.dtype not in _TRITON_DTYPES
            or query.shape[-1] > MAX_HEAD_DIM or query.shape[-1] != value.shape[-1]
            or (attn_mask is not None and attn_mask.requires_grad)
            or (isinstance(dropout_p, (int, float)) and dropout_p >= 1.0)):  # torch: all dropped, zeros
        return _TORCH_SDPA(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                           scale=scale, enable_gqa=enable_gqa)
    three_d = query.dim() == 3
    if three_d:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        if attn_mask is not None and attn_mask.dim() == 3:
            attn_mask = attn_mask.unsqueeze(1)
    out = _attention(query, key, value, causal=is_causal, causal_offset=0, scale=scale, attn_mask=attn_mask,
                     return_lse=False, backend="triton", dropout_p=dropout_p)
    return out.squeeze(1) if three_d else out


# --------------------------------------------------------------------------------------------------
# variable-length (packed) sequences and KV-cache decoding
# --------------------------------------------------------------------------------------------------
def _check_cu(name: str, cu: torch.Tensor, total: int, device) -> None:
    if not isinstance(cu, torch.Tensor) or cu.dtype not in (torch.int32, torch.int64) or cu.dim() != 1:
        raise AttentionTypeError(f"{name} must be a 1-D int32/int64 tensor of cumulative lengths")
    if cu.numel() < 2:
        raise AttentionInputError(f"{name} needs at least 2 entries (batch + 1), got {cu.numel()}")
    if cu.device != device:
        raise AttentionInputError(f"{name} is on {cu.device}, q on {device}")
    c = cu.detach().cpu()
    if int(c[0]) != 0 or bool((c[1:] < c[:-1]).any()) or int(c[-1]) != total:
        raise AttentionInputError(f"{name} must start at 0, be non-decreasing and end at the total length {total}")


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
    backend: str | None = None,
) -> torch.Tensor:
    """Attention over packed variable-length sequences, no padding work (FlashAttention's varlen API).

    q: (total_q, Hq, D), k/v: (total_k, Hkv, D); sequence b is rows cu_seqlens_q[b]:cu_seqlens_q[b+1]
    of q against rows cu_seqlens_k[b]:cu_seqlens_k[b+1] of k/v. ``max_seqlen_*`` bound the longest
    sequence (they size the launch grid). ``causal`` is bottom-right per sequence. Other options as
    ``attention``. Returns (total_q, Hq, D).
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            raise AttentionInputError(f"{name} must be a 3-D (total, H, D) tensor")
    be = resolve(backend, q, k, v)
    # reuse the dense checks on (1, H, total, D) views
    _check_qkv(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], be)
    _check_cu("cu_seqlens_q", cu_seqlens_q, q.shape[0], q.device)
    _check_cu("cu_seqlens_k", cu_seqlens_k, k.shape[0], q.device)
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise AttentionInputError("cu_seqlens_q and cu_seqlens_k must describe the same number of sequences")
    lq = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max().item()
    lk = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).max().item()
    if max_seqlen_q < lq or max_seqlen_k < lk:
        raise AttentionInputError(f"max_seqlen_q/max_seqlen_k ({max_seqlen_q}, {max_seqlen_k}) are below the "
                                  f"longest sequences ({lq}, {lk})")
    n_batch = cu_seqlens_q.numel() - 1
    feats = _check_features(q.transpose(0, 1)[None], window, softcap, alibi_slopes, dropout_p, seed, n_batch)
    scale = _resolve_scale(scale, q.shape[-1])
    if be == "reference" or q.shape[0] == 0 or k.shape[0] == 0:
        kw = _reference_features(feats, q)
        if "dropout_p" in feats:
            raise AttentionInputError("dropout in attention_varlen needs the triton backend")
        return reference.attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, causal=causal, scale=scale, **kw)
    out, _ = VarlenAttentionFunction.apply(q, k, v, cu_seqlens_q.to(torch.int32), cu_seqlens_k.to(torch.int32),
                                           int(max_seqlen_q), int(max_seqlen_k), bool(causal), float(scale), feats)
    return out


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
    backend: str | None = None,
) -> torch.Tensor:
    """Decoding attention over a KV cache (inference only: no gradient).

    q: (B, Hq, Nq, D); k_cache/v_cache: (B, Hkv, S, D); cache_seqlens: (B,) int, the valid prefix of
    each cache. ``k_new``/``v_new`` (B, Hkv, Nnew, D), when given, are written into the cache in place
    at positions cache_seqlens[b] .. + Nnew (``cache_seqlens`` itself is not changed: add Nnew for
    the next step). Batch b then attends to its first cache_seqlens[b] + Nnew keys; ``causal`` is
    bottom-right, so the new queries see the cache and the new keys up to themselves. With Nq = 1 and
    a long cache the kernel splits the keys across programs (flash-decoding); ``num_splits=0`` picks
    the count, 1 disables it. GQA as in ``attention``.
    """
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise AttentionInputError(f"{name} must be a 4-D (B, H, N, D) tensor")
    be = resolve(backend, q, k_cache, v_cache)
    _check_qkv(q, k_cache, v_cache, be)
    B, S = q.shape[0], k_cache.shape[2]
    if (not isinstance(cache_seqlens, torch.Tensor) or cache_seqlens.dtype not in (torch.int32, torch.int64)
            or tuple(cache_seqlens.shape) != (B,)):
        raise AttentionTypeError(f"cache_seqlens must be an int32/int64 tensor of shape ({B},)")
    if cache_seqlens.device != q.device:
        raise AttentionInputError(f"cache_seqlens is on {cache_seqlens.device}, q on {q.device}")
    n_new = 0
    if (k_new is None) != (v_new is None):
        raise AttentionInputError("k_new and v_new must be given together")
    if k_new is not None:
        if k_new.shape != v_new.shape or k_new.dim() != 4 or k_new.shape[:2] != k_cache.shape[:2] \
                or k_new.shape[3] != k_cache.shape[3]:
            raise AttentionInputError(f"k_new/v_new must be (B, Hkv, Nnew, D) matching the cache, got "
                                      f"{tuple(k_new.shape)} and {tuple(v_new.shape)}")
        if k_new.dtype != k_cache.dtype or k_new.device != k_cache.device:
            raise AttentionTypeError("k_new/v_new must match the cache's dtype and device")
        n_new = k_new.shape[2]
    lens = cache_seqlens.to(torch.int64)
    if bool((lens < 0).any()) or bool((lens + n_new > S).any()):
        raise AttentionInputError(f"cache_seqlens + Nnew must lie in [0, {S}] (the cache length)")
    # every check before the in-place append: a bad argument must not leave the cache half-updated
    feats = _check_features(q, window, softcap, alibi_slopes, 0.0, None)
    scale = _resolve_scale(scale, q.shape[-1])
    if n_new:
        pos = lens[:, None] + torch.arange(n_new, device=q.device)[None, :]  # (B, Nnew)
        bi = torch.arange(B, device=q.device)[:, None].expand_as(pos)
        k_cache[bi, :, pos] = k_new.transpose(1, 2)
        v_cache[bi, :, pos] = v_new.transpose(1, 2)
    total = (lens + n_new).to(torch.int32)
    if be == "reference" or q.numel() == 0:
        return reference.attention_with_kvcache(q, k_cache, v_cache, total, causal=causal, scale=scale,
                                                **_reference_features(feats, q))
    from .kernels.attention import kvcache_forward

    out, _ = kvcache_forward(q, k_cache, v_cache, total, bool(causal), float(scale), int(num_splits), **feats)
    return out


def dropout_mask(shape: tuple[int, int, int, int], dropout_p: float, seed: int, device="cuda") -> torch.Tensor:
    """Debug path: the (B, H, Nq, Nk) bool keep mask the Triton kernels draw for ``dropout_p`` and
    ``seed`` on dense inputs of that shape (True = kept)."""
    from .kernels.attention import dropout_keep_mask

    return dropout_keep_mask(*shape, dropout_p, seed, device)
