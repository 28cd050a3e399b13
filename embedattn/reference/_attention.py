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
    upcast: bool = True,
):
    """softmax(q k^T * scale + mask) v for q (B, Hq, Nq, D), k/v (B, Hkv, Nk, D), Hq % Hkv == 0.

    ``causal`` aligns bottom-right: query i sees key j iff j <= i + Nk - Nq. ``attn_mask`` is bool
    (True = attend) or additive float, broadcastable to (B, Hq, Nq, Nk). A row with no visible key
    gives zeros (and zero gradients). ``upcast=True`` computes in float32 (or float64 for float64
    inputs) and casts back; ``upcast=False`` stays in the input dtype (the "plain PyTorch" baseline
    of the tests' tolerance rule). The log-sum-exp (natural log, -inf on empty rows) is in the
    compute dtype.
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
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            s = s.masked_fill(~attn_mask, float("-inf"))
        else:
            s = s + attn_mask.to(s.dtype)
    if causal:
        i = torch.arange(nq, device=s.device)[:, None]
        j = torch.arange(nk, device=s.device)[None, :]
        s = s.masked_fill(j > i + (nk - nq), float("-inf"))
    # softmax written out so that rows with every key masked give 0 (not NaN) and zero gradients
    m = s.amax(dim=-1, keepdim=True).detach()
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(s - m)
    denom = e.sum(dim=-1, keepdim=True)
    p = e / torch.where(denom == 0, torch.ones_like(denom), denom)
    out = torch.matmul(p.to(v.dtype), v).to(dtype)
    if return_lse:
        lse = (m + torch.log(denom)).squeeze(-1)
        return out, lse
    return out
