"""Reference attention: short, obviously right, differentiable, float64-capable."""

from __future__ import annotations

import math

import torch
import torch.utils.checkpoint

from ._philox import dropout_keep_mask

_FAR = 2**62  # past any |query - key + offset| distance, and within int64


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
    seed: torch.Tensor | int | None = None,
    upcast: bool = True,
    causal_offset: int | torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
):
    """softmax(q kᵀ · scale + mask) v for q (B, Hq, Nq, D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv), Hq % Hkv == 0.

    ``causal`` aligns bottom-right: query i sees key j iff j <= i + Nk - Nq. ``window=(left, right)``
    (negative = unbounded) keeps keys with i + Nk - Nq - left <= j <= i + Nk - Nq + right.
    ``softcap`` > 0 replaces each score s by softcap·tanh(s / softcap). ``alibi_slopes`` (H,) or
    (B, H) adds -slope·|i + Nk - Nq - j| (FlashAttention's convention). ``attn_mask`` is bool
    (True = attend) or additive float, broadcastable to (B, Hq, Nq, Nk). A row with no visible key
    gives zeros (and zero gradients). Dropout multiplies the probabilities by ``dropout_mask``
    (bool keep mask, (B, Hq, Nq, Nk)) / (1 - dropout_p); the log-sum-exp is of the undropped scores.
    Without a mask, ``seed`` (an int or the one-element int64 tensor) draws the Triton kernels' own
    mask, bit for bit (``dropout_keep_mask``, their Philox stream); with neither, torch's generator draws one.
    ``upcast=True`` computes in float32 (or float64 for float64 inputs) and casts back;
    ``upcast=False`` stays in the input dtype (the "plain PyTorch" yardstick of the tests).
    ``causal_offset`` moves the diagonal that causal, window and ALiBi are measured from (query i's
    diagonal key is i + causal_offset); default Nk - Nq, the bottom-right alignment; 0 is torch
    SDPA's top-left ``is_causal``; an int tensor broadcastable to (B, 1, 1, 1) gives each batch its own.
    ``sinks`` (Hq,): gpt-oss's learned attention sinks, one logit per query head joining every row's softmax
    denominator (natural log, not scaled, capped, biased or dropped) with no value, as transformers' eager
    attention writes it: a sink column concatenated to the scores, dropped after the softmax. The lse then
    includes the sink, and a row with no visible key gives zeros and lse = sink.
    A call with more than ``CHUNK_SCORES`` scores runs by chunks of query rows (each row's softmax is its own, so
    the result is the same), checkpointed under autograd: it holds a few (rows, Nk) blocks, never several Nq x Nk
    matrices (not under torch.compile, nor for an unseeded dropout drawn by torch's generator; not checkpointed under
    torch.func transforms or forward-mode AD, which saved-tensor hooks do not serve).
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
    off = nk - nq if causal_offset is None else causal_offset
    feats = dict(scale=scale, causal=causal, window=window, softcap=softcap, alibi_slopes=alibi_slopes, sinks=sinks,
                 dropout_p=dropout_p)
    rows = _rows_per_chunk(q, nk, dropout_p, dropout_mask, seed)
    if rows >= nq:
        if dropout_p > 0 and dropout_mask is None and seed is not None:
            dropout_mask = dropout_keep_mask((q.shape[0], q.shape[1], nq, nk), dropout_p, seed, q.device)
        out, lse = _softmax_v(q, k, v, off, attn_mask, dropout_mask, **feats)
    else:  # by query rows: each row's softmax is its own, so the chunks are the same function in pieces
        checkpointed = torch.is_grad_enabled() and not autograd_transforms_active(q, k, v) and any(
            t is not None and t.requires_grad for t in (q, k, v, attn_mask, alibi_slopes, sinks))
        outs, lses = [], []
        for i0 in range(0, nq, rows):
            i1 = min(i0 + rows, nq)
            mask = _query_rows(attn_mask, nq, i0, i1)
            if dropout_p > 0 and dropout_mask is None and seed is not None:
                keep = dropout_keep_mask((q.shape[0], q.shape[1], nq, nk), dropout_p, seed, q.device, rows=(i0, i1))
            else:
                keep = _query_rows(dropout_mask, nq, i0, i1)

            def chunk(qc, mask=mask, keep=keep, i0=i0):
                return _softmax_v(qc, k, v, off + i0, mask, keep, **feats)

            qc = q[:, :, i0:i1]
            # recomputed in the backward, so autograd keeps only the inputs, not every chunk's probabilities
            o, lse_c = (torch.utils.checkpoint.checkpoint(chunk, qc, use_reentrant=False) if checkpointed
                        else chunk(qc))  # fmt: skip
            outs.append(o)
            lses.append(lse_c)
        out, lse = torch.cat(outs, dim=-2), torch.cat(lses, dim=-2)
    out = out.to(dtype)
    return (out, lse.squeeze(-1)) if return_lse else out


def autograd_transforms_active(*tensors: torch.Tensor) -> bool:
    """A torch.func transform (grad, vjp, jacrev, vmap, ...) is running, or a tensor carries a forward-mode tangent:
    what checkpointing (saved-tensor hooks) and torch's fused SDPA kernels (no forward-mode derivative) cannot
    serve. False while torch.compile traces."""
    if torch.compiler.is_compiling():
        return False
    try:
        if torch._C._functorch.peek_interpreter_stack() is not None:
            return True
    except AttributeError:  # a torch without the functorch interpreter stack
        pass
    import torch.autograd.forward_ad as fwad

    return any(t is not None and fwad.unpack_dual(t).tangent is not None for t in tensors)


# scores per query chunk (B * Hq * rows * Nk) above which the reference runs by chunks of query rows, so that a long
# call on the CPU holds a few (rows, Nk) blocks instead of several Nq x Nk score matrices
CHUNK_SCORES = 1 << 22
_MIN_CHUNK_ROWS = 16  # fewer rows per chunk: Python overhead per chunk outweighs the memory saved


def _rows_per_chunk(q: torch.Tensor, nk: int, dropout_p: float, dropout_mask, seed) -> int:
    """Query rows per chunk; Nq (one piece) for a small call, under torch.compile (which fuses the one piece), and
    for torch's own random dropout draw (its generator's stream is drawn for the whole matrix at once)."""
    nq = q.shape[-2]
    per_row = q.shape[0] * q.shape[1] * nk
    if torch.compiler.is_compiling() or per_row * nq <= CHUNK_SCORES:
        return nq
    if dropout_p > 0 and dropout_mask is None and seed is None:
        return nq
    return max(_MIN_CHUNK_ROWS, CHUNK_SCORES // max(per_row, 1))


def _query_rows(t: torch.Tensor | None, nq: int, i0: int, i1: int) -> torch.Tensor | None:
    """Rows i0 .. i1 - 1 of a tensor broadcastable to (..., Nq, Nk) (a mask); one that broadcasts over the
    queries as it is."""
    if t is None or t.dim() < 2 or t.shape[-2] != nq or nq == 1:
        return t
    return t[..., i0:i1, :]


def _softmax_v(q, k, v, off, attn_mask, dropout_mask, *, scale, causal, window, softcap, alibi_slopes, sinks,
               dropout_p):
    """(softmax(scores) v, lse (..., Nq, 1)) for q's rows, whose diagonal key is i + off, in q's dtype (already
    upcast and with K/V repeated per query head)."""
    nq, nk = q.shape[-2], k.shape[-2]
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    i = torch.arange(nq, device=s.device)[:, None]
    j = torch.arange(nk, device=s.device)[None, :]
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
        # a side past every distance is unbounded; clamped so a huge int (2**63, 2**64) compares exactly in int64
        left, right = window
        if left is not None and left >= 0:
            s = s.masked_fill(rel > min(int(left), _FAR), float("-inf"))
        if right is not None and right >= 0:
            s = s.masked_fill(rel < -min(int(right), _FAR), float("-inf"))
    # softmax written out so that rows with every key masked give 0 (not NaN) and zero gradients
    m = s.amax(dim=-1, keepdim=True).detach()
    if sinks is not None:  # the sink column: (1, Hq, 1, 1) against the (B, Hq, Nq, Nk) scores
        sink = sinks.to(s.dtype).view(1, -1, 1, 1)
        m = torch.maximum(m, sink.detach())
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(s - m)
    denom = e.sum(dim=-1, keepdim=True)
    if sinks is not None:
        denom = denom + torch.exp(sink - m)
    p = e / torch.where(denom == 0, torch.ones_like(denom), denom)
    if dropout_p > 0:
        if dropout_mask is None:
            dropout_mask = torch.rand_like(p) >= dropout_p
        p = p * dropout_mask.to(p.dtype) / (1.0 - dropout_p)
    out = torch.matmul(p.to(v.dtype), v)
    # log of a guarded denominator: an empty row's lse is -inf with a zero (not NaN) gradient
    empty = denom == 0
    lse = torch.where(empty, float("-inf"), m + torch.log(torch.where(empty, torch.ones_like(denom), denom)))
    return out, lse


def attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    *,
    return_lse: bool = False,
    block_table: torch.Tensor | None = None,
    **kwargs,
):
    """Packed (total, H, D) sequences (v: (total_k, Hkv, Dv)): each sequence b is q[cu_q[b]:cu_q[b+1]] against
    k/v[cu_k[b]:cu_k[b+1]], causal bottom-right per sequence. With ``return_lse`` also the (H, total_q) log-sum-exp
    (-inf for a sequence with no keys). ``max_seqlen_*`` bound the sequences (read from the offsets when None: a
    host read). Other keywords as ``attention``; dropout with ``seed`` draws the kernels' varlen mask (their
    counters are strided by the max_seqlen values, which the padded draw below shares). ``block_table`` (B,
    max_pages): k/v are pools of pages (num_pages, Hkv, page_size, D / Dv) and sequence b's keys are its first
    cu_k[b+1] - cu_k[b] positions through its row of the table (as ``attention_with_kvcache``'s paged cache).

    The sequences are padded to (B, H, max_seqlen, D) by a gather and run through ``attention`` at once, each with
    its own diagonal and its keys past its length masked; the packed rows are gathered back. Shapes do not depend
    on the offsets' values, so torch.compile traces it whole."""
    kwargs.pop("causal_offset", None)
    B = cu_seqlens_q.numel() - 1
    if q.shape[0] == 0 or k.shape[0] == 0 or B == 0:  # no query row, or no key for any
        return _empty_varlen(q, v, return_lse, kwargs.get("sinks"))
    len_q, len_k = (cu[1:] - cu[:-1] for cu in (cu_seqlens_q, cu_seqlens_k))
    if max_seqlen_q is None or max_seqlen_k is None:
        max_seqlen_q, max_seqlen_k = int(len_q.max()), int(len_k.max())
    nq, nk = max(int(max_seqlen_q), 1), max(int(max_seqlen_k), 1)
    qp, _ = _padded(q, cu_seqlens_q, nq)
    if block_table is None:
        kp, k_ok = _padded(k, cu_seqlens_k, nk)
        vp, _ = _padded(v, cu_seqlens_k, nk)
    else:  # positions 0 .. nk - 1 of each sequence's pages (past the table's capacity: zeros, masked)
        kp, vp = (_first_positions(pages_as_cache(t, block_table), nk) for t in (k, v))
        k_ok = torch.arange(nk, device=q.device)[None, :] < len_k[:, None]
    out, lse = _attention_by_length(qp, kp, vp, k_ok, (len_k - len_q).view(B, 1, 1, 1), **kwargs)
    # packed query row i is row t = i - cu_q[b] of sequence b, the last b with cu_q[b] <= i
    rows = torch.arange(q.shape[0], device=q.device)
    b = torch.searchsorted(cu_seqlens_q[1:].to(torch.int64), rows, right=True).clamp(max=B - 1)
    t = (rows - cu_seqlens_q.to(torch.int64)[b]).clamp(0, nq - 1)
    out, lse = out[b, :, t], lse[b, :, t].transpose(0, 1)  # (total_q, H, Dv), (H, total_q)
    return (out, lse) if return_lse else out


def _padded(x: torch.Tensor, cu: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed rows x (total, H, D) cut by cu as (B, H, n, D), and which rows hold a token (B, n); rows past a
    sequence repeat a row of x (finite, masked by the caller)."""
    t = torch.arange(n, device=x.device)
    idx = cu[:-1, None].to(torch.int64) + t[None, :]
    ok = t[None, :] < (cu[1:] - cu[:-1])[:, None]
    return x[idx.clamp(0, max(x.shape[0] - 1, 0))].transpose(1, 2), ok


def pages_as_cache(pool: torch.Tensor, block_table: torch.Tensor) -> torch.Tensor:
    """The (B, Hkv, max_pages * page_size, D) contiguous copy of a paged cache, pool (num_pages, Hkv, page_size, D):
    batch b's position p is slot p % page_size of page block_table[b, p // page_size]. Entries are clamped into the
    pool, so padding past a batch's pages (e.g. -1) reads some page, never outside (the callers mask those keys)."""
    b, max_pages = block_table.shape
    g = pool[block_table.long().clamp(0, pool.shape[0] - 1)]  # (B, max_pages, Hkv, page_size, D)
    return g.permute(0, 2, 1, 3, 4).reshape(b, pool.shape[1], max_pages * pool.shape[2], pool.shape[3])


def _first_positions(x: torch.Tensor, n: int) -> torch.Tensor:
    """The first n positions (dim 2) of x, zero-padded past its length."""
    return x[:, :, :n] if x.shape[2] >= n else torch.nn.functional.pad(x, (0, 0, 0, n - x.shape[2]))


def _attention_by_length(q, k, v, k_ok, offset, **kwargs):
    """``attention`` with (out, lse) where batch b sees only its keys ``k_ok[b]`` (B, Nk) and its diagonal is
    ``offset[b]``: keys outside hold any values (an uninitialized cache), so they are zeroed as well as masked."""
    k = torch.where(k_ok[:, None, :, None], k, 0)
    v = torch.where(k_ok[:, None, :, None], v, 0)
    return attention(q, k, v, attn_mask=k_ok[:, None, None, :], causal_offset=offset, return_lse=True, **kwargs)


def _empty_varlen(q, v, return_lse, sinks):
    out = q.new_zeros(q.shape[0], q.shape[1], v.shape[-1])
    lse = _empty_lse(q, (q.shape[1], q.shape[0]), sinks, 0)
    return (out, lse) if return_lse else out


def _empty_lse(q: torch.Tensor, shape: tuple, sinks: torch.Tensor | None, head_dim: int) -> torch.Tensor:
    """The lse of rows that see no key: -inf, or with sinks the sink of each row's head (dim ``head_dim``)."""
    if sinks is None:
        return torch.full(shape, float("-inf"), dtype=_lse_dtype(q), device=q.device)
    view = [1] * len(shape)
    view[head_dim] = -1
    return sinks.to(_lse_dtype(q)).view(view).expand(shape)


def _lse_dtype(q: torch.Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def attention_with_kvcache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    *,
    return_lse: bool = False,
    cache_leftpad: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
    **kwargs,
):
    """Batch b attends to the first cache_seqlens[b] keys of the cache (B, Hkv, S, D) (values (B, Hkv, S, Dv)),
    causal bottom-right per batch (query i sees key j iff j <= i + cache_seqlens[b] - Nq). With ``return_lse`` also
    the (B, Hq, Nq) log-sum-exp (-inf for an empty cache; with ``sinks``, the sink). ``cache_leftpad`` (B,): batch b
    sees only positions cache_leftpad[b] .. cache_seqlens[b] - 1 (a left-padded cache); the diagonal, window and
    ALiBi distances stay in cache positions. ``block_table`` (B, max_pages): the caches are pools of pages
    (num_pages, Hkv, page_size, D), read through it (``pages_as_cache``). One ``attention`` call over the whole
    cache with the keys outside each batch's range masked (and zeroed: they may hold anything); no host read, so
    torch.compile traces it whole."""
    kwargs.pop("causal_offset", None)
    if block_table is not None:
        k_cache, v_cache = pages_as_cache(k_cache, block_table), pages_as_cache(v_cache, block_table)
    B, S = q.shape[0], k_cache.shape[2]
    if q.numel() == 0 or S == 0:
        out = q.new_zeros(*q.shape[:3], v_cache.shape[-1])
        lse = _empty_lse(q, tuple(q.shape[:3]), kwargs.get("sinks"), 1)
        return (out, lse) if return_lse else out
    lens = cache_seqlens.to(torch.int64)
    pos = torch.arange(S, device=q.device)[None, :]
    k_ok = pos < lens[:, None]
    if cache_leftpad is not None:
        k_ok = k_ok & (pos >= cache_leftpad.to(torch.int64)[:, None])
    out, lse = _attention_by_length(q, k_cache, v_cache, k_ok, (lens - q.shape[2]).view(B, 1, 1, 1), **kwargs)
    return (out, lse) if return_lse else out
