"""FlashAttention 2's Python API (``flash_attn.flash_attn_interface``) on embedattn's kernels.

Code written for FlashAttention runs unchanged after swapping the import::

    from embedattn.flash_attn_interface import flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache

Every function takes FlashAttention 2's argument names, order and defaults, its (batch, seqlen, nheads,
headdim) layout (packed (total, nheads, headdim) for varlen) and its return conventions. The tensors
reach the kernels as strided views (``transpose(1, 2)`` to embedattn's (B, H, N, D), ``unbind`` of the
packed forms): no input is copied, and the Triton kernels write the dense and KV-cache outputs in q's
memory order, so ``out`` comes back contiguous (B, N, H, D) for a q in that layout with no extra pass (the
reference backend's output takes one copy). KV-cache appends write into the caches in place. Each
function also takes a keyword-only ``backend`` (None | "auto" | "triton" | "reference", see
``embedattn._backend``) and ``sinks``, which FlashAttention does not have (below).

Semantics are FlashAttention's: causal is aligned bottom-right (query i sees key j iff
``j <= i + seqlen_k - seqlen_q``); ``window_size=(left, right)`` keeps keys in
``[i + seqlen_k - seqlen_q - left, i + seqlen_k - seqlen_q + right]``, -1 (any negative) being unbounded; its
sides are integers: Python ints, 0-d integer tensors, or one 2-element integer tensor (read on the host once,
as FlashAttention reads ``window_size[0]``); anything else is a TypeError naming ``window_size``;
ALiBi adds ``-slope * |i + seqlen_k - seqlen_q - j|``; ``softcap > 0`` caps the scaled scores with
``softcap * tanh(s / softcap)`` (``<= 0`` is off); GQA/MQA by K/V with fewer heads; a row that sees no
key gives zeros. ``dropout_p`` is applied as given (FlashAttention applies it whenever it is > 0, train
or eval: pass 0.0 for evaluation), drawn in-kernel (Philox) from a seed taken from torch's generator on
the inputs' device, so ``torch.manual_seed`` reproduces it; the reference backend draws the same mask from
the same seed (the random stream is embedattn's, not FlashAttention's). Gradients flow to q, k, v (and the
packed tensors) and are deterministic whatever ``deterministic`` says.

``return_attn_probs=True`` returns ``(out, softmax_lse, S_dmask)`` as FlashAttention: the log-sum-exp is
float32 (B, H, Nq) ((H, total_q) for varlen), the natural log of the scaled, capped, biased scores; a row
that sees no key has lse ``-inf`` here (the log of an empty sum; FlashAttention's unsplit kernels write
``+inf``). ``S_dmask`` is None without dropout (as in FlashAttention); with ``dropout_p > 0`` it is
FlashAttention's testing-only matrix, in q's dtype: (B, H, Nq, Nk) (varlen: (B, H, max_seqlen_q,
max_seqlen_k), sequence b's queries and keys from row and column 0, zeros past its lengths) holding
``exp(s - rowmax(s))`` of the scores s the call used (scaled, capped, biased; 0 where masked and on rows that
see no key), each entry the dropout dropped negated (its sign bit set, so a dropped 0 reads -0.0): the
probabilities are ``|S_dmask| / rowsum(|S_dmask|)``. The mask is the draw the call itself used, on either
backend: the call draws its seed (as embedattn's entry would, so ``out`` is the same as without
``return_attn_probs`` after the same ``torch.manual_seed``), runs with it, and redraws that Philox mask with
``embedattn.reference._philox``'s ``dropout_keep_mask`` / ``varlen_keep_mask`` (bit for bit the kernels'); the
probabilities come from ``embedattn.reference``. It is a debug path: N x N memory, a host read of the seed
(no torch.compile graph through it). ``S_dmask`` is one block in FlashAttention's terms (FlashAttention's
test helper ``normalize_flash_attn_S`` then rescales it with ``_get_block_size_n`` >= Nk).

Differences, all documented here and raised clearly where an argument asks for something missing:

Ours, not FlashAttention 2's (keyword-only, so FlashAttention's positional calls are unchanged):

* ``sinks`` (Hq,) float tensor on every function: gpt-oss's learned attention sinks (see
  ``embedattn.attention``): head h's logit ``sinks[h]`` joins each row's softmax denominator with no value
  (not scaled, capped, biased or dropped); differentiable in the training functions; ``softmax_lse``
  includes it. ``S_dmask`` keeps ``exp(s - rowmax(s))`` over the keys, so with sinks the probabilities are
  ``|S_dmask| * exp(rowmax(s) - lse)`` rather than its row-normalized form. FlashAttention 2 has no sinks.
* A value head dim of its own: v (..., Dv) may differ from q/k's D in ``flash_attn_func``, the varlen
  function and ``flash_attn_with_kvcache`` (``v_cache``/``v``; ``v=None`` with ``k`` when ``v_cache`` is a
  column view of ``k_cache``, MLA's latent cache, as ``embedattn.attention_with_kvcache``); out is
  (..., Dv). The packed functions share one head dim by construction.
* ``check_bounds`` on ``flash_attn_with_kvcache`` (below) and ``backend`` on every function.

Differences, all documented here and raised clearly where an argument asks for something missing:

* Dtypes: float16 and bfloat16 as FlashAttention, plus float32 (and float64 on the reference backend).
  Any head dim the backend runs (the Triton kernels: 1 to 512, q/k up to 576 in ``flash_attn_with_kvcache``;
  no multiple-of-8 padding is needed), any strides.
* The packed functions' backward assembles the packed gradient with one ``stack`` (FlashAttention writes
  dq, dk, dv into one buffer).
* ``flash_attn_with_kvcache``: ``cache_leftpad`` as FlashAttention's (batch b's keys are cache positions
  ``cache_leftpad[b] .. cache_seqlens[b] + seqlen_new - 1``; the diagonal, windows, ALiBi and rotary stay in
  absolute positions), on both backends and split-KV; it also combines with ``block_table`` and with
  ``cache_batch_idx`` (FlashAttention 2 refuses it with a paged cache). A leftpad outside
  ``[0, cache_seqlens[b]]`` is checked like the lengths (``check_bounds``). Paged caches take
  any page size >= 1 (FlashAttention 2 needs a multiple of 256); multiples of the kernel's key tile (64
  for head dims up to 128, 32 above) read each tile from one page like a contiguous cache, other sizes
  gather rows (see ``embedattn.attention_with_kvcache``). ``cache_batch_idx`` is supported for a contiguous
  cache (as in FlashAttention, not with ``block_table``). A paged length past the table's capacity
  (``max(cache_seqlens) + seqlen_knew > max_num_blocks_per_seq * page_block_size``) raises FlashAttention's
  "Paged KV cache: ... exceeds the capacity addressable by block_table" (a ValueError and a RuntimeError).
  A keyword-only ``check_bounds`` (embedattn's modes) picks how lengths and table entries are checked:
  with the default on CUDA (a device-side assertion, no host read) that error is the assertion's, not
  FlashAttention's host-side message. ``rotary_cos``/``rotary_sin`` need
  ``seqlen_ro >=`` the cache's capacity (FlashAttention's rule; it lets the positions go unchecked without a
  device sync); any rotary_dim <= headdim (FlashAttention needs a multiple of 16). Table entries, cache rows
  and lengths out of range raise before anything is written (on CUDA by default as a device-side
  assertion, without a host sync: see ``embedattn.attention_with_kvcache``'s ``check_bounds``).
* ``flash_attn_varlen_func(block_table=...)``: paged K/V for packed queries on both backends, any page size
  >= 1 (FlashAttention 2: a multiple of 256); a sequence longer than the table's capacity or a used table entry
  outside the pool raises (the kvpacked/qkvpacked varlen functions take no block_table, as in FlashAttention 2).
  Forward only, as FlashAttention 2: pools that require grad are refused at the call, and a backward from q
  through the pages raises NotImplementedError on the Triton backend (the reference backend differentiates dq).
"""

from __future__ import annotations

from numbers import Integral, Real

import torch

from . import reference
from ._checks import bounds_mode, check_bool, seed_tensor
from .attention import (
    AttentionInputError,
    AttentionTypeError,
    attention,
    attention_varlen,
    attention_with_kvcache,
)
from .reference._attention import pages_as_cache
from .reference._philox import dropout_keep_mask, varlen_keep_mask
from .rotary import rotary

__all__ = [
    "flash_attn_func",
    "flash_attn_kvpacked_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_varlen_kvpacked_func",
    "flash_attn_varlen_qkvpacked_func",
    "flash_attn_with_kvcache",
]


# --------------------------------------------------------------------------------------------------
# FlashAttention's arguments as embedattn's
# --------------------------------------------------------------------------------------------------
def _tensor(name: str, t, dims: int, layout: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise AttentionTypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != dims:
        raise AttentionInputError(f"{name} must be {dims}-D {layout}, got shape {tuple(t.shape)}")
    return t


def _packed(name: str, t, dims: int, layout: str, dim: int, n: int) -> tuple[torch.Tensor, ...]:
    """The n tensors packed along ``dim`` of t, as views (``unbind``: its backward is one stack)."""
    _tensor(name, t, dims, layout)
    if t.shape[dim] != n:
        raise AttentionInputError(f"{name} must be {layout} (size {n} at dim {dim}), got shape {tuple(t.shape)}")
    return t.unbind(dim)


_WINDOW_HELP = ("window_size must be a (left, right) pair of integers (ints, 0-d integer tensors or a 2-element "
                "integer tensor; -1 = unbounded)")


def _is_int_tensor(t: torch.Tensor) -> bool:
    return not (t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool)


def _window_side(side) -> int:
    if isinstance(side, torch.Tensor):
        if side.dim() != 0 or not _is_int_tensor(side):
            raise AttentionTypeError(f"{_WINDOW_HELP}, got a side of dtype {side.dtype} and shape {tuple(side.shape)}")
        return int(side)  # a host read, as FlashAttention's int(window_size[0])
    if isinstance(side, bool) or not isinstance(side, Integral):
        raise AttentionTypeError(f"{_WINDOW_HELP}, got a side {side!r}")
    return int(side)


def _window(window_size) -> tuple[int, int] | None:
    """FlashAttention's ``window_size`` (left, right), -1 (any negative) = unbounded, as embedattn's window (None =
    off). A pair of ints or 0-d integer tensors, or a 2-element integer tensor (FlashAttention's tests draw it with
    ``torch.randint(..., (2,))``): read on the host once, as FlashAttention reads ``window_size[0]``/``[1]``."""
    if isinstance(window_size, torch.Tensor):
        if not _is_int_tensor(window_size):
            raise AttentionTypeError(f"{_WINDOW_HELP}, got a {window_size.dtype} tensor")
        if tuple(window_size.shape) != (2,):
            raise AttentionInputError(f"{_WINDOW_HELP}, got a tensor of shape {tuple(window_size.shape)}")
        left, right = window_size.tolist()  # one host read for both sides
    elif isinstance(window_size, (tuple, list)) and len(window_size) == 2:
        left, right = (_window_side(s) for s in window_size)
    else:
        raise AttentionTypeError(f"{_WINDOW_HELP}, got {window_size!r}")
    if left < 0 and right < 0:
        return None
    return (left, right)


def _softcap(softcap):
    # FlashAttention: anything > 0 caps the scores, <= 0 is off (embedattn refuses a negative cap)
    if isinstance(softcap, Real) and not isinstance(softcap, bool) and softcap <= 0:
        return 0.0
    return softcap


def _heads_first(t: torch.Tensor) -> torch.Tensor:
    return t.transpose(1, 2)  # (B, N, H, D) -> (B, H, N, D), a view


def _seq_first(out: torch.Tensor) -> torch.Tensor:
    """embedattn's (B, H, N, D) output as FlashAttention's (B, N, H, D): free when the kernel wrote it in that
    memory order (q's, for a q in FlashAttention's layout), one copy otherwise (the reference backend)."""
    return out.transpose(1, 2).contiguous()


def _debug_seed(dropout_p, return_attn_probs: bool, q) -> int | None:
    """The dropout seed a call with ``return_attn_probs`` draws itself, so that its S_dmask redraws the kernel's
    mask: taken from torch's generator on ``device`` exactly as embedattn's entry takes one for ``seed=None``
    (``seed_tensor``), so the output is the same as without ``return_attn_probs`` after the same
    ``torch.manual_seed``. One host read (this testing-only path is not meant to run under torch.compile)."""
    if (not return_attn_probs or not isinstance(q, torch.Tensor) or not isinstance(dropout_p, Real)
            or isinstance(dropout_p, bool) or not 0 < dropout_p < 1):
        return None  # no dropout, or a bad argument the entry will name
    return int(seed_tensor(None, q.device))


def _signed_probs(p: torch.Tensor, keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """FlashAttention's S_dmask from the probabilities p (..., Nk): ``exp(s - rowmax(s))`` = p / rowmax(p) (0 on
    masked entries and on rows that see no key), each dropped entry negated (its sign bit set: a dropped 0 is -0.0)."""
    top = p.amax(dim=-1, keepdim=True)
    s = p / torch.where(top > 0, top, torch.ones_like(top))
    return torch.where(keep, s, -s).to(dtype)


@torch.no_grad()
def _probs_dense(q, k, dropout_p: float, seed: int, **score_kw) -> torch.Tensor:
    """S_dmask (B, H, Nq, Nk) of a dense call, q (B, H, Nq, D), k (B, Hkv, Nk, D): the reference's probabilities
    (read off with v = identity, so every score feature is the reference's) and the kernels' Philox keep mask
    (``_philox.dropout_keep_mask``, bit for bit the Triton kernels' draw) from the call's seed."""
    B, H, Nq = q.shape[:3]
    Hkv, Nk = k.shape[1], k.shape[2]
    keep = dropout_keep_mask((B, H, Nq, Nk), dropout_p, seed, q.device)
    if q.numel() == 0 or Nk == 0:
        return torch.zeros(B, H, Nq, Nk, dtype=q.dtype, device=q.device)
    up = torch.float64 if q.dtype == torch.float64 else torch.float32
    eye = torch.eye(Nk, dtype=up, device=q.device).expand(B, Hkv, Nk, Nk)
    p = reference.attention(q.to(up), k.to(up), eye, **score_kw)
    return _signed_probs(p, keep, q.dtype)


@torch.no_grad()
def _probs_varlen(q, k, cu_q, cu_k, max_q: int, max_k: int, dropout_p: float, seed: int,
                  **score_kw) -> torch.Tensor:
    """S_dmask (B, H, max_seqlen_q, max_seqlen_k) of a varlen call, FlashAttention's padded layout: sequence b's
    queries and keys from row and column 0, zeros past its lengths; the keep mask ``_philox.varlen_keep_mask``
    (the kernels' varlen draw, strided by the max_seqlen values)."""
    B, H = cu_q.numel() - 1, q.shape[1]
    keep = varlen_keep_mask(cu_q, cu_k, max_q, max_k, H, dropout_p, seed)
    up = torch.float64 if q.dtype == torch.float64 else torch.float32
    probs = torch.zeros(B, H, max_q, max_k, dtype=up, device=q.device)
    if B and q.shape[0] and k.shape[0] and max_q and max_k:  # the offsets end at the totals (the entry checked)
        cu_q64, cu_k64 = cu_q.to(torch.int64), cu_k.to(torch.int64)
        rows_k = torch.arange(k.shape[0], device=q.device)
        pos_k = rows_k - cu_k64[torch.searchsorted(cu_k64[1:], rows_k, right=True)]
        # v = one-hot of each key's position in its sequence: a query's output row is its probabilities
        eye = (pos_k[:, None] == torch.arange(max_k, device=q.device)).to(up)[:, None].expand(-1, k.shape[1], -1)
        p = reference.attention_varlen(q.to(up), k.to(up), eye, cu_q, cu_k, max_q, max_k, **score_kw)
        rows_q = torch.arange(q.shape[0], device=q.device)
        b_q = torch.searchsorted(cu_q64[1:], rows_q, right=True)
        probs[b_q, :, rows_q - cu_q64[b_q]] = p
    return _signed_probs(probs, keep, q.dtype)


def _score_kw(causal, softmax_scale, window, softcap, alibi_slopes, sinks) -> dict:
    return dict(causal=causal, scale=softmax_scale, window=window, softcap=softcap, alibi_slopes=alibi_slopes,
                sinks=sinks)


def _dense(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
           return_attn_probs, sinks, backend):
    check_bool("deterministic", deterministic)  # the backward is deterministic either way
    check_bool("return_attn_probs", return_attn_probs)
    q, k, v = _heads_first(q), _heads_first(k), _heads_first(v)
    seed = _debug_seed(dropout_p, return_attn_probs, q)
    score_kw = _score_kw(causal, softmax_scale, _window(window_size), _softcap(softcap), alibi_slopes, sinks)
    res = attention(q, k, v, dropout_p=dropout_p, seed=seed, return_lse=return_attn_probs, backend=backend,
                    **score_kw)
    if return_attn_probs:
        out, lse = res
        s_dmask = None if seed is None else _probs_dense(q, k, dropout_p, seed, **score_kw)
        return _seq_first(out), lse, s_dmask
    return _seq_first(res)


def _varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal,
            window_size, softcap, alibi_slopes, deterministic, return_attn_probs, sinks, backend, block_table=None):
    check_bool("deterministic", deterministic)
    check_bool("return_attn_probs", return_attn_probs)
    seed = _debug_seed(dropout_p, return_attn_probs, q)
    score_kw = _score_kw(causal, softmax_scale, _window(window_size), _softcap(softcap), alibi_slopes, sinks)
    res = attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=dropout_p,
                           seed=seed, return_lse=return_attn_probs, block_table=block_table, backend=backend,
                           **score_kw)
    if return_attn_probs:
        out, lse = res
        if seed is not None and block_table is not None:  # the debug path reads the keys packed
            k = _keys_from_pages(k, block_table, cu_seqlens_k)
        s_dmask = None if seed is None else _probs_varlen(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                                          dropout_p, seed, **score_kw)
        return out, lse, s_dmask
    return res


@torch.no_grad()
def _keys_from_pages(pool: torch.Tensor, block_table: torch.Tensor, cu_seqlens_k: torch.Tensor) -> torch.Tensor:
    """The packed (total_k, Hkv, D) keys of a paged varlen call (pool (num_pages, Hkv, page_size, D), checked by the
    call): sequence b's positions 0 .. its length - 1 through its table row. For S_dmask only (host reads)."""
    cache = pages_as_cache(pool, block_table)  # (B, Hkv, capacity, D)
    lens = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).tolist()
    return torch.cat([cache[b, :, :n].transpose(0, 1) for b, n in enumerate(lens)]) if lens else \
        pool.new_zeros(0, pool.shape[1], pool.shape[3])


# --------------------------------------------------------------------------------------------------
# dense
# --------------------------------------------------------------------------------------------------
def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False, *, sinks=None, backend=None):
    """FlashAttention's ``flash_attn_func``: q (B, Nq, H, D), k (B, Nk, Hkv, D), v (B, Nk, Hkv, Dv) with
    H % Hkv == 0; ``sinks`` (H,) (ours).

    Returns out (B, Nq, H, Dv), or ``(out, softmax_lse (B, H, Nq) float32, S_dmask)`` with ``return_attn_probs``
    (S_dmask: None without dropout, else (B, H, Nq, Nk), testing only).
    See the module docstring for the semantics and the differences from FlashAttention.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        _tensor(name, t, 4, "(batch, seqlen, nheads, headdim)")
    return _dense(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                  return_attn_probs, sinks, backend)


def flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                              softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False, *,
                              sinks=None, backend=None):
    """FlashAttention's ``flash_attn_qkvpacked_func``: qkv (B, N, 3, H, D); q, k, v are views of it (its
    gradient is assembled by one stack). Returns as ``flash_attn_func``."""
    q, k, v = _packed("qkv", qkv, 5, "(batch, seqlen, 3, nheads, headdim)", 2, 3)
    return _dense(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                  return_attn_probs, sinks, backend)


def flash_attn_kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                             softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False, *,
                             sinks=None, backend=None):
    """FlashAttention's ``flash_attn_kvpacked_func``: q (B, Nq, H, D), kv (B, Nk, 2, Hkv, D). Returns as
    ``flash_attn_func``."""
    _tensor("q", q, 4, "(batch, seqlen, nheads, headdim)")
    k, v = _packed("kv", kv, 5, "(batch, seqlen_k, 2, nheads_k, headdim)", 2, 2)
    return _dense(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                  return_attn_probs, sinks, backend)


# --------------------------------------------------------------------------------------------------
# varlen (packed sequences)
# --------------------------------------------------------------------------------------------------
def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None, *, sinks=None, backend=None):
    """FlashAttention's ``flash_attn_varlen_func``: q (total_q, H, D), k (total_k, Hkv, D), v (total_k, Hkv, Dv);
    sequence b is rows ``cu_seqlens_q[b]:cu_seqlens_q[b+1]`` of q against ``cu_seqlens_k[b]:cu_seqlens_k[b+1]`` of
    k/v (int32 or int64); ``sinks`` (H,) (ours). Returns out (total_q, H, Dv), or ``(out, softmax_lse (H, total_q)
    float32, S_dmask)`` (S_dmask: None without dropout, else (B, H, max_seqlen_q, max_seqlen_k), testing only).
    ``block_table`` (B, max_num_blocks_per_seq) int32: paged K/V (FlashAttention's prefill from a paged cache):
    k/v are then pools (num_blocks, page_block_size, Hkv, D / Dv), sequence b's keys its first
    ``cu_seqlens_k[b+1] - cu_seqlens_k[b]`` positions through its table row (any page size >= 1). Forward only
    (as FlashAttention 2): see ``embedattn.attention_varlen``'s ``block_table``."""
    if block_table is not None:
        layout = "(num_blocks, page_block_size, nheads_k, headdim)"
        k, v = (_heads_first(_tensor(name, t, 4, layout)) for name, t in (("k", k), ("v", v)))
    return _varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal,
                   window_size, softcap, alibi_slopes, deterministic, return_attn_probs, sinks, backend, block_table)


def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None, causal=False,
                                     window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
                                     return_attn_probs=False, *, sinks=None, backend=None):
    """FlashAttention's ``flash_attn_varlen_qkvpacked_func``: qkv (total, 3, H, D). Returns as
    ``flash_attn_varlen_func``."""
    q, k, v = _packed("qkv", qkv, 4, "(total, 3, nheads, headdim)", 1, 3)
    return _varlen(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p, softmax_scale, causal,
                   window_size, softcap, alibi_slopes, deterministic, return_attn_probs, sinks, backend)


def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                                    softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                                    alibi_slopes=None, deterministic=False, return_attn_probs=False, *, sinks=None,
                                    backend=None):
    """FlashAttention's ``flash_attn_varlen_kvpacked_func``: q (total_q, H, D), kv (total_k, 2, Hkv, D). Returns as
    ``flash_attn_varlen_func``."""
    _tensor("q", q, 3, "(total_q, nheads, headdim)")
    k, v = _packed("kv", kv, 4, "(total_k, 2, nheads_k, headdim)", 1, 2)
    return _varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal,
                   window_size, softcap, alibi_slopes, deterministic, return_attn_probs, sinks, backend)


# --------------------------------------------------------------------------------------------------
# KV-cache decoding
# --------------------------------------------------------------------------------------------------
def _int32_table(name: str, t, batch: int) -> torch.Tensor:
    if not isinstance(t, torch.Tensor) or t.dtype not in (torch.int32, torch.int64):
        raise AttentionTypeError(f"{name} must be an int32/int64 tensor, got "
                                 f"{t.dtype if isinstance(t, torch.Tensor) else type(t).__name__}")
    if tuple(t.shape) != (batch,):
        raise AttentionInputError(f"{name} must have shape ({batch},), got {tuple(t.shape)}")
    return t


def _check_paged_capacity(cache_seqlens: torch.Tensor, n_new: int, max_blocks: int, page: int) -> None:
    """FlashAttention's paged-cache guard, in its words: every cache_seqlens[b] + Nnew within the positions the
    block table addresses (embedattn.attention_with_kvcache checks the same bound; this names block_table as
    FlashAttention's test expects). One host read, as FlashAttention's; "sync" mode only."""
    if not cache_seqlens.numel():
        return
    total = cache_seqlens.to(torch.int64) + n_new
    top, capacity = int(total.max()), max_blocks * page
    if top > capacity:
        b = int(total.argmax())
        raise AttentionInputError(
            f"Paged KV cache: max(seqlens_k){' + seqlen_knew' if n_new else ''} (= {top}) exceeds the capacity "
            f"addressable by block_table (max_num_blocks_per_seq * page_block_size = {max_blocks} * {page} = "
            f"{capacity}): batch {b} has cache_seqlens[{b}] = {top - n_new} with seqlen_knew = {n_new}. Allocate "
            f"more columns in block_table.")


@torch.no_grad()
def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None, cache_seqlens=None,
                            cache_batch_idx=None, cache_leftpad=None, block_table=None, softmax_scale=None,
                            causal=False, window_size=(-1, -1), softcap=0.0, rotary_interleaved=True,
                            alibi_slopes=None, num_splits=0, return_softmax_lse=False, *, sinks=None,
                            check_bounds=None, backend=None):
    """FlashAttention's ``flash_attn_with_kvcache`` (inference: no gradient).

    q: (B, Nq, H, D). k_cache/v_cache: (B_cache, S, Hkv, D / Dv), or with ``block_table`` (B, max_blocks) int32
    a pool of pages (num_blocks, page_size, Hkv, D / Dv), any page size: batch b's position p is slot
    ``p % page_size`` of page ``block_table[b, p // page_size]``. ``k``/``v`` (B, Nnew, Hkv, D / Dv), when given,
    are written into the cache in place at positions ``cache_seqlens[b] ...`` (through the pages), after
    rotation when ``rotary_cos``/``rotary_sin`` (seqlen_ro, rotary_dim / 2) are given: k at positions
    ``cache_seqlens[b] + i``, q at those positions when causal or local (``window_size != (-1, -1)``), else
    every query at ``cache_seqlens[b]``; ``rotary_interleaved`` pairs (0, 1), (2, 3), ... (GPT-J), else
    (0, rotary_dim / 2), ... (GPT-NeoX). ``cache_seqlens``: an int or (B,) int tensor, the cached length of
    each sequence (None: the whole cache; required with k/v). ``cache_batch_idx`` (B,) int: the cache row of
    each sequence (contiguous caches only). Batch b attends to its first cache_seqlens[b] + Nnew positions, from
    ``cache_leftpad[b]`` on when given ((B,) int32: a left-padded cache; positions, the causal diagonal, windows,
    ALiBi and rotary stay absolute, the append goes at cache_seqlens[b]; ``0 <= cache_leftpad[b] <=
    cache_seqlens[b]``, checked with the lengths).
    Ours: ``sinks`` (H,); ``check_bounds`` (None | "sync" | "device" | "off", embedattn's modes).

    Returns out (B, Nq, H, Dv), or ``(out, softmax_lse (B, H, Nq) float32)`` with ``return_softmax_lse``. Every
    argument is checked before anything is written; a length, a block-table entry or a cache_batch_idx
    out of range raises (see ``embedattn.attention_with_kvcache`` for the check modes: on CUDA a device-side
    assertion, no host sync).
    """
    _tensor("q", q, 4, "(batch, seqlen, nheads, headdim)")
    paged = block_table is not None
    cache_layout = "(num_blocks, page_block_size, nheads_k, headdim)" if paged else \
        "(batch_size_cache, seqlen_cache, nheads_k, headdim)"
    _tensor("k_cache", k_cache, 4, cache_layout)
    _tensor("v_cache", v_cache, 4, cache_layout)
    check_bool("return_softmax_lse", return_softmax_lse)
    check_bool("rotary_interleaved", rotary_interleaved)
    if k is None and v is not None:
        raise AttentionInputError("k and v must be given together (v without k has no keys)")
    if k is not None:  # v None too: embedattn accepts it only for a v_cache inside k_cache's columns (MLA)
        _tensor("k", k, 4, "(batch, seqlen_new, nheads_k, headdim)")
        if v is not None:
            _tensor("v", v, 4, "(batch, seqlen_new, nheads_k, headdim_v)")
    B = q.shape[0]
    if paged and cache_batch_idx is not None:
        raise AttentionInputError("cache_batch_idx cannot be combined with block_table (as in FlashAttention): "
                                  "map each sequence to its pages in the block table instead")
    kc, vc = _heads_first(k_cache), _heads_first(v_cache)  # (B or pool, Hkv, S or page, D) views
    capacity = kc.shape[2]
    if paged:
        if not isinstance(block_table, torch.Tensor) or block_table.dim() != 2:
            raise AttentionTypeError("block_table must be a 2-D (batch, max_num_blocks_per_seq) int32 tensor")
        capacity *= block_table.shape[1]
    elif cache_batch_idx is not None:
        # sequence b reads and appends to cache row cache_batch_idx[b]: the cache as a pool of one page per row
        block_table = _int32_table("cache_batch_idx", cache_batch_idx, B).view(B, 1)
    if cache_seqlens is None:
        if k is not None:
            raise AttentionInputError("cache_seqlens is required when k and v are given (where to append them)")
        cache_seqlens = capacity
    if isinstance(cache_seqlens, Integral) and not isinstance(cache_seqlens, bool):
        cache_seqlens = torch.full((B,), int(cache_seqlens), dtype=torch.int32, device=q.device)
    _int32_table("cache_seqlens", cache_seqlens, B)
    if paged and bounds_mode(check_bounds, q.device) == "sync":
        _check_paged_capacity(cache_seqlens, 0 if k is None else k.shape[1], block_table.shape[1], k_cache.shape[1])
    window = _window(window_size)
    if (rotary_cos is None) != (rotary_sin is None):
        raise AttentionInputError("rotary_cos and rotary_sin must be given together")
    if rotary_cos is not None:
        if k is None:
            raise AttentionInputError("rotary_cos/rotary_sin rotate the new keys: they need k")
        if not isinstance(rotary_cos, torch.Tensor) or rotary_cos.dim() != 2:
            raise AttentionTypeError("rotary_cos must be a 2-D (seqlen_ro, rotary_dim / 2) tensor")
        if rotary_cos.shape[0] < capacity:
            raise AttentionInputError(f"rotary_cos/rotary_sin have {rotary_cos.shape[0]} positions, fewer than the "
                                      f"cache's capacity {capacity} (FlashAttention's rule: seqlen_ro >= seqlen_k)")
        # FlashAttention rotates q position by position when causal or local, else all at cache_seqlens
        local = window is not None and any(0 <= s < capacity for s in window)
        offsets = cache_seqlens
        # the positions were bounded above (seqlen_ro >= capacity) and the lengths are checked by the attention call
        # before anything is written: no device sync here (a position out of range is rotated by the identity)
        if causal is True or local:
            q = rotary(q, rotary_cos, rotary_sin, rotary_interleaved, seqlen_offsets=offsets, check_bounds=False,
                       backend=backend)
        else:
            nq, h = q.shape[1], q.shape[2]
            q = rotary(q.reshape(B, 1, nq * h, q.shape[3]), rotary_cos, rotary_sin, rotary_interleaved,
                       seqlen_offsets=offsets, check_bounds=False, backend=backend).view(q.shape)
        k = rotary(k, rotary_cos, rotary_sin, rotary_interleaved, seqlen_offsets=offsets, check_bounds=False,
                   backend=backend)
    try:
        res = attention_with_kvcache(
            _heads_first(q), kc, vc, cache_seqlens, None if k is None else _heads_first(k),
            None if v is None else _heads_first(v), causal=causal, scale=softmax_scale, window=window,
            softcap=_softcap(softcap), alibi_slopes=alibi_slopes, num_splits=num_splits, block_table=block_table,
            cache_leftpad=cache_leftpad, return_lse=return_softmax_lse, sinks=sinks, check_bounds=check_bounds,
            backend=backend)
    except IndexError as e:
        if cache_batch_idx is None:
            raise
        raise IndexError(f"cache_batch_idx holds a row outside the cache's {k_cache.shape[0]} rows "
                         f"([0, {k_cache.shape[0]}))") from e
    if return_softmax_lse:
        out, lse = res
        return _seq_first(out), lse
    return _seq_first(res)
