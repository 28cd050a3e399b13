"""Reference attention: short, obviously right, differentiable, float64-capable."""

from __future__ import annotations

import math

import torch


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
    dropout_mask: torch.Tensor | None = None,
    upcast: bool = True,
    causal_offset: int | None = None,
):
    """softmax(q kᵀ · scale + mask) v for q (B, Hq, Nq, D), k/v (B, Hkv, Nk, D), Hq % Hkv == 0.

    ``causal`` aligns bottom-right: query i sees key j iff j <= i + Nk - Nq. ``window=(left, right)``
    (negative = unbounded) keeps keys with i + Nk - Nq - left <= j <= i + Nk - Nq + right.
    ``softcap`` > 0 replaces each score s by softcap·tanh(s / softcap). ``alibi_slopes`` (H,) or
    (B, H) adds -slope·|i + Nk - Nq - j| (FlashAttention's convention). ``attn_mask`` is bool
    (True = attend) or additive float, broadcastable to (B, Hq, Nq, Nk). A row with no visible key
    gives zeros (and zero gradients). Dropout multiplies the probabilities by ``dropout_mask``
    (bool keep mask, (B, Hq, Nq, Nk)) / (1 - dropout_p); the log-sum-exp is of the undropped scores.
    ``upcast=True`` computes in float32 (or float64 for float64 inputs) and casts back;
    ``upcast=False`` stays in the input dtype (the "plain PyTorch" yardstick of the tests).
    ``causal_offset`` moves the diagonal that causal, window and ALiBi are measured from (query i's
    diagonal key is i + causal_offset); default Nk - Nq, the bottom-right alignment; 0 is torch
    SDPA's top-left ``is_causal``.
    """
    dtype = q.dtype
    if upcast and dtype in (torch.float16, torch.bfloat16):
        q, k, v = q.float(), k.float(), v.float()
    nq, nk, d = q.shape[-2], k.shape[-2], q.shape[-1]
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    i = torch.arange(nq, device=s.device)[:, None]
    j = torch.arange(nk, device=s.device)[None, :]
    off = nk - nq if causal_offset is None else causal_offset
    rel = i + off - j  # >= 0 for keys at or left of the diagonal
    if alibi_slopes is not None:
        slopes = alibi_slopes.to(s.dtype)
        slopes = slopes[None, :, None, None] if slopes.dim() == 1 else slopes[:, :, None, None]
        s = s - slopes * rel.abs().to(s.dtype)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            s = s.masked_fill(~attn_mask, float("-inf"))
        else:
            s = s + attn_mask.to(s.dtype)
    if causal:
        s = s.masked_fill(rel < 0, float("-inf"))
    if window is not None:
        # a side past every distance is unbounded; clamped so a huge int (2**63, 2**64) compares exactly
        span = nq + nk + abs(off)
        left, right = window
        if left is not None and left >= 0:
            s = s.masked_fill(rel > min(int(left), span), float("-inf"))
        if right is not None and right >= 0:
            s = s.masked_fill(rel < -min(int(right), span), float("-inf"))
    # softmax written out so that rows with every key masked give 0 (not NaN) and zero gradients
    m = s.amax(dim=-1, keepdim=True).detach()
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(s - m)
    denom = e.sum(dim=-1, keepdim=True)
    p = e / torch.where(denom == 0, torch.ones_like(denom), denom)
    if dropout_p > 0:
        if dropout_mask is None:
            dropout_mask = torch.rand_like(p) >= dropout_p
        p = p * dropout_mask.to(p.dtype) / (1.0 - dropout_p)
    out = torch.matmul(p.to(v.dtype), v).to(dtype)
    if return_lse:
        # log of a guarded denominator: an empty row's lse is -inf with a zero (not NaN) gradient
        empty = denom == 0
        lse = torch.where(empty, float("-inf"), m + torch.log(torch.where(empty, torch.ones_like(denom), denom)))
        return out, lse.squeeze(-1)
    return out


def dropout_keep_mask(shape: tuple[int, ...], dropout_p: float, seed: torch.Tensor | int,
                      device: torch.device | str | None = None) -> torch.Tensor:
    """The reference's dropout keep mask (True = kept) for ``seed``: a counter-based hash of (seed,
    element index), so the same seed gives the same mask in eager and compiled runs, forward and
    backward. ``seed`` is an int or a one-element int64 tensor (read without a host sync). The
    Triton kernels draw their own (Philox) mask from the same seed: a different stream."""
    m32 = 0xFFFFFFFF
    if isinstance(seed, torch.Tensor):
        device = seed.device if device is None else device
        s = seed.reshape(()).to(device=device, dtype=torch.int64)
    else:
        s = torch.tensor(int(seed) & (2**63 - 1), dtype=torch.int64, device=device)
    s = (s ^ (s >> 32)) & m32  # both halves of a 64-bit seed matter
    n = math.prod(shape)
    h = (torch.arange(n, device=device, dtype=torch.int64) * 0x9E3779B1 + s * 0x632BE5AB) & m32
    for shift, mul in ((16, 0x85EBCA6B), (13, 0xC2B2AE35)):  # murmur3's 32-bit finalizer
        h = ((h ^ (h >> shift)) * mul) & m32
    h = h ^ (h >> 16)
    return (h.to(torch.float64) * 2.0**-32 >= dropout_p).view(shape)


def attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    *,
    return_lse: bool = False,
    **kwargs,
):
    """Packed (total, H, D) sequences: each sequence b is q[cu_q[b]:cu_q[b+1]] against
    k/v[cu_k[b]:cu_k[b+1]], run through ``attention`` one at a time. With ``return_lse`` also the
    (H, total_q) log-sum-exp (-inf for a sequence with no keys)."""
    outs, lses = [], []
    slopes = kwargs.pop("alibi_slopes", None)
    for b in range(cu_seqlens_q.numel() - 1):
        if slopes is not None:
            kwargs["alibi_slopes"] = slopes if slopes.dim() == 1 else slopes[b:b + 1]
        qs = q[int(cu_seqlens_q[b]):int(cu_seqlens_q[b + 1])].transpose(0, 1)[None]
        ks = k[int(cu_seqlens_k[b]):int(cu_seqlens_k[b + 1])].transpose(0, 1)[None]
        vs = v[int(cu_seqlens_k[b]):int(cu_seqlens_k[b + 1])].transpose(0, 1)[None]
        if qs.shape[2] == 0:
            continue
        if ks.shape[2] == 0:
            outs.append(torch.zeros_like(qs[0].transpose(0, 1)))
            lses.append(torch.full(qs.shape[1:3], float("-inf"), dtype=_lse_dtype(q), device=q.device))
            continue
        out, lse = attention(qs, ks, vs, return_lse=True, **kwargs)
        outs.append(out[0].transpose(0, 1))
        lses.append(lse[0])
    if not outs:
        out = q.new_zeros(q.shape[0], q.shape[1], v.shape[-1])
        lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=_lse_dtype(q), device=q.device)
    else:
        out, lse = torch.cat(outs, dim=0), torch.cat(lses, dim=1)
    return (out, lse) if return_lse else out


def _lse_dtype(q: torch.Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def attention_with_kvcache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    *,
    return_lse: bool = False,
    **kwargs,
):
    """Batch b attends to the first cache_seqlens[b] keys of the cache (B, Hkv, S, D). With ``return_lse``
    also the (B, Hq, Nq) log-sum-exp (-inf for an empty cache)."""
    outs, lses = [], []
    slopes = kwargs.pop("alibi_slopes", None)
    for b in range(q.shape[0]):
        if slopes is not None:
            kwargs["alibi_slopes"] = slopes if slopes.dim() == 1 else slopes[b:b + 1]
        n = int(cache_seqlens[b])
        if n == 0:
            outs.append(torch.zeros_like(q[b:b + 1]))
            lses.append(torch.full(q.shape[1:3], float("-inf"), dtype=_lse_dtype(q), device=q.device)[None])
            continue
        out, lse = attention(q[b:b + 1], k_cache[b:b + 1, :, :n], v_cache[b:b + 1, :, :n], return_lse=True, **kwargs)
        outs.append(out)
        lses.append(lse)
    if outs:
        out, lse = torch.cat(outs, dim=0), torch.cat(lses, dim=0)
    else:  # no batch
        out, lse = q.new_zeros(q.shape), q.new_zeros(q.shape[:3], dtype=_lse_dtype(q))
    return (out, lse) if return_lse else out
