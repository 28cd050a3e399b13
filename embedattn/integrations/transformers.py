"""Hugging Face transformers integration: ``attn_implementation="embedattn"`` runs embedattn's attention.

    import embedattn.integrations.transformers as ea_hf
    ea_hf.register()                                   # once per process
    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="embedattn")
    # or, on a loaded model: model.set_attn_implementation("embedattn")

``register`` installs two functions under one name, as transformers' own flash-attention path does:

* a **mask function** (``AttentionMaskInterface``). transformers describes every mask it wants as a mask
  function (causal, sliding window, bidirectional, packed sequences, chunks) plus a 2-D padding mask, and each
  attention implementation turns that into what its kernel reads. Ours reads the description and returns a
  :class:`KernelMask`, the same mask in the kernel's terms: ``causal`` with its diagonal, a sliding ``window``,
  the keys each row may see (padding: a (B, 1, 1, Nk) bool view, O(N) bytes), or packed sequences as
  ``cu_seqlens`` for the varlen kernel. No (B, 1, Nq, Nk) mask is built for any of these. What has no kernel
  equivalent (Llama 4's chunked attention, masks with custom ``or``/``and`` functions, e.g. bidirectional image
  tokens) is built dense by transformers' own sdpa builder, exactly as ``"sdpa"`` would, and read tile by tile.
* an **attention function** (``AttentionInterface``) that runs the call on ``embedattn.attention`` (dense and
  padded batches, decoding with a dynamic or static cache) or ``embedattn.attention_varlen`` (packed
  sequences: restarting ``position_ids`` as ``DataCollatorWithFlattening`` makes them, or its
  ``cu_seq_lens_q/k``, ``max_length_q/k`` keywords). Inputs are transformers' (B, H, N, D); grouped-query
  attention runs natively (K/V are not repeated); the output is (B, N, H, Dv).

Every keyword transformers hands an attention function is used or refused: ``scaling``, ``dropout``
(in-kernel Philox dropout, seeded from torch's generator), ``is_causal``, ``sliding_window`` (checked against
the mask), ``softcap`` (Gemma 2), ``s_aux`` (gpt-oss's learned sinks), the varlen keywords, and
``position_bias`` (T5-style learned biases, which need gradients through the mask: those calls run
transformers' own sdpa function, as before). Keywords that do not change the result (``HARMLESS_KWARGS``) are
accepted; any other keyword with a value raises a ``TypeError`` naming it, so a new model cannot be silently
wrong (tests/integrations/test_transformers.py scans the installed transformers' modeling files for every keyword
a model passes). A value head dim of its own (DeepSeek's MLA) runs as is.

Attention weights (``output_attentions=True``) are not computed, as with ``"sdpa"``: transformers' warning is
logged once and the weights are ``None``.

Under ``torch.compile`` the mask description cannot be read from transformers' mask closures (dynamo does not
trace ``__closure__``), so it is read from what the mask builder is told (``local_size``, the config, which
builder asks) and checked on the device against the mask function itself along the diagonals it depends on.
transformers cannot tell packed from unpacked sequences while tracing, so a compiled forward without an
``attention_mask`` and without a cache asserts on the device that its ``position_ids`` do not restart; packed
batches compile through the ``cu_seq_lens_q/k`` keywords (``DataCollatorWithFlattening(
return_flash_attn_kwargs=True)``). docs/transformers.md has the whole story, with memory numbers.

transformers is an optional dependency (``pip install embedattn[hf]``); it is imported only here.
"""

from __future__ import annotations

import types
from collections.abc import Callable

import torch

from .._backend import check_backend
from .._checks import assert_ok
from ..attention import attention, attention_varlen

__all__ = ["HARMLESS_KWARGS", "USED_KWARGS", "KernelMask", "make_attention_forward", "make_mask_function",
           "register"]

# the keywords the attention function reads (besides module, query, key, value, attention_mask)
USED_KWARGS = ("dropout", "scaling", "is_causal", "sliding_window", "softcap", "s_aux", "position_bias",
               "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "output_attentions")

# keywords models pass (through **kwargs) that do not change an attention call's result, and why
HARMLESS_KWARGS = {
    "position_ids": "positions are already rotated into q and k; packed sequences arrive with the mask",
    "output_hidden_states": "a model output flag",
    "output_router_logits": "a model output flag (MoE)",
    "num_items_in_batch": "a loss normalizer",
    "use_cache": "the cache is updated before the attention call",
    "cache_position": "the cache is updated before the attention call",
    "return_dict": "a model output flag",
    "seq_idx": "packing for state-space layers; attention reads packing from the mask or cu_seq_lens",
    "deterministic": "embedattn's attention backward is deterministic already (no atomics)",
}

WINDOW_OFF = -1  # the kernels' "unbounded" side of a window


# --------------------------------------------------------------------------------------------------
# the mask: transformers' description in the kernels' terms
# --------------------------------------------------------------------------------------------------
class KernelMask:
    """A transformers attention mask as embedattn's kernels take it (what ``register``'s mask function returns).

    Query i (of ``q_length``) sees key j (of ``kv_length``) iff ``key_mask[b, 0, 0, j]`` (when given), under
    ``causal`` ``j <= i + causal_offset``, and within ``window`` = (left, right) of that diagonal (-1: that side
    unbounded). ``varlen`` = (cu_seqlens, max_seqlen): packed sequences over the B * N flattened tokens (queries
    and keys alike; no key mask then). ``packed_check``: under torch.compile, a device bool that is True when the
    batch is packed after all (the attention function asserts it is not, unless it got ``cu_seq_lens``).

    It stands where transformers passes a 4-D mask: ``shape`` (B, 1, Nq, Nk) and ``ndim`` 4, and slicing the
    queries (``mask[:, :, a:b, :]``, as Gemma 4 does before its KV-shared layers) gives the mask of those queries.
    """

    ndim = 4

    def __init__(self, *, batch_size: int, q_length: int, kv_length: int, causal: bool, causal_offset: int = 0,
                 window: tuple[int, int] | None = None, key_mask: torch.Tensor | None = None,
                 varlen: tuple[torch.Tensor, int] | None = None, packed_check: torch.Tensor | None = None,
                 sliding: tuple[int, int] | None = None):
        self.batch_size, self.q_length, self.kv_length = batch_size, q_length, kv_length
        self.causal, self.causal_offset, self.window = causal, causal_offset, window
        self.key_mask, self.varlen, self.packed_check = key_mask, varlen, packed_check
        # the window transformers' mask function describes (``window`` may have been folded into ``key_mask``)
        self.sliding = window if sliding is None else sliding

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.batch_size, 1, self.q_length, self.kv_length)

    def __getitem__(self, index) -> KernelMask:
        """Query rows ``mask[:, :, a:b, :]`` (step 1): the same keys, the diagonal moved with the first query."""
        whole = slice(None)
        if not (isinstance(index, tuple) and len(index) == 4 and index[0] == whole and index[1] == whole
                and index[3] == whole and isinstance(index[2], slice)):
            raise IndexError(f"a KernelMask can only be sliced along its queries (mask[:, :, a:b, :]), got {index!r}")
        start, stop, step = index[2].indices(self.q_length)
        if step != 1:
            raise IndexError("a KernelMask's queries can only be sliced with step 1")
        if self.varlen is not None or self.packed_check is not None:
            raise IndexError("the queries of packed sequences cannot be sliced")
        return KernelMask(batch_size=self.batch_size, q_length=max(stop - start, 0), kv_length=self.kv_length,
                          causal=self.causal, causal_offset=self.causal_offset + start, window=self.window,
                          key_mask=self.key_mask, sliding=self.sliding)

    def __repr__(self) -> str:
        what = [f"shape={self.shape}", f"causal={self.causal}"]
        if self.causal or self.window:
            what.append(f"causal_offset={self.causal_offset}")
        if self.window:
            what.append(f"window={self.window}")
        if self.key_mask is not None:
            what.append("key_mask")
        if self.varlen is not None:
            what.append(f"sequences={self.varlen[0].numel() - 1}, max_seqlen={self.varlen[1]}")
        return f"KernelMask({', '.join(what)})"


def _mu():
    from transformers import masking_utils

    return masking_utils


_CODES: dict[str, object] = {}


def _codes() -> dict[str, object]:
    """The code objects of transformers' mask-function factories (what a mask closure is made of)."""
    if not _CODES:
        mu = _mu()
        f = mu.causal_mask_function
        _CODES.update({
            "and": mu.and_masks(f).__code__,
            "sliding": mu.sliding_window_overlay(1).__code__,
            "bisliding": mu.sliding_window_bidirectional_overlay(1).__code__,
            "remap": mu.remap_positions_for_packed_sequence(f, None).__code__,
            "packed": mu.packed_sequence_mask_function(None).__code__,
        })
    return _CODES


class _Pattern:
    """What a mask function allows, in kernel terms: query i sees key j iff (not causal or j <= i), i - j <= left,
    j - i <= right (None: unbounded), and, when packed, i and j lie in the same sequence."""

    def __init__(self):
        self.base = None  # "causal" | "bidirectional"
        self.left = self.right = None
        self.packed = None  # eagerly: the (B, N) sequence ids; under tracing: True (maybe packed)

    def bound(self, side: str, n: int) -> None:
        cur = getattr(self, side)
        setattr(self, side, n if cur is None else min(cur, n))

    @property
    def causal(self) -> bool:
        return self.base == "causal"

    def window(self) -> tuple[int, int] | None:
        right = None if self.causal else self.right
        if self.left is None and right is None:
            return None
        return (WINDOW_OFF if self.left is None else self.left, WINDOW_OFF if right is None else right)


def _cells(fn) -> dict:
    return dict(zip(fn.__code__.co_freevars, (c.cell_contents for c in fn.__closure__ or ())))


def _read_closure(fn, pat: _Pattern) -> bool:
    """Fill ``pat`` from transformers' mask closure ``fn`` (eagerly, exactly); False where some part of it is not
    one the kernels express (chunks, ``or`` masks, custom functions)."""
    mu = _mu()
    if fn is mu.causal_mask_function:
        pat.base = "causal"
        return True
    if fn is mu.bidirectional_mask_function:
        pat.base = pat.base or "bidirectional"  # and-ed with a causal part, it stays causal
        return True
    code, codes = getattr(fn, "__code__", None), _codes()
    if code is codes["and"]:
        return all(_read_closure(f, pat) for f in _cells(fn)["mask_functions"])
    if code is codes["sliding"]:
        pat.bound("left", _cells(fn)["sliding_window"] - 1)  # kv_idx > q_idx - sliding_window
        return True
    if code is codes["bisliding"]:
        sw = _cells(fn)["sliding_window"]  # abs(q_idx - kv_idx) <= sliding_window
        pat.bound("left", sw)
        pat.bound("right", sw)
        return True
    if code is codes["remap"]:
        # positions within one packed sequence are consecutive: the patterns here depend on i - j only, which
        # remapping leaves alone, so the inner function reads as is (the sequence ids come with "packed")
        return _read_closure(_cells(fn)["mask_function"], pat)
    if code is codes["packed"]:
        pat.packed = _cells(fn)["packed_sequence_mask"]
        return True
    return False


def _read_traced(mask_function, attention_mask, q_length, kv_length, q_offset, kv_offset, kwargs) -> _Pattern | None:
    """The pattern while torch.compile traces (closures cannot be read there): from the mask function when it is
    transformers' plain causal or bidirectional one, else from what the builder was told (``local_size``, the
    config, ``allow_is_bidirectional_skip`` that only the bidirectional builders pass); None where that does not
    settle it. ``_traced_checks`` then tests the guess against the mask function itself."""
    mu = _mu()
    pat = _Pattern()
    bidirectional = "allow_is_bidirectional_skip" in kwargs
    pat.base = "bidirectional" if bidirectional else "causal"
    if mask_function is mu.causal_mask_function or mask_function is mu.bidirectional_mask_function:
        pat.base = "causal" if mask_function is mu.causal_mask_function else "bidirectional"
        return pat
    if kwargs.get("use_vmap") or _qualname(mask_function) != "and_masks.<locals>.and_mask":
        return None  # custom or/and functions (use_vmap), or masks, block overlays: dense
    config, local_size = kwargs.get("config"), kwargs.get("local_size")
    if local_size is not None:
        sw = getattr(config, "sliding_window", None)
        if local_size != sw or local_size == getattr(config, "attention_chunk_size", None):
            return None  # chunked attention (or a window we cannot attribute): dense
        if bidirectional:
            pat.bound("left", sw)
            pat.bound("right", sw)
        else:
            pat.bound("left", sw - 1)
    # transformers wraps the mask for packed sequences whenever it cannot look (no mask, no cache, tracing)
    if attention_mask is None and _static_int(q_offset) == 0 and kv_offset == 0 and q_length == kv_length:
        pat.packed = True
    elif local_size is None:
        return None  # an and-mask that is neither a window nor the packed wrapper
    return pat


def _qualname(fn) -> str:
    # not getattr(fn, "__qualname__", ""): dynamo answers the default for functions it built while tracing
    return fn.__qualname__ if isinstance(fn, types.FunctionType) else ""


def _static_int(x):
    return x if isinstance(x, int) else None


def _traced_checks(pat: _Pattern, mask_function, batch_size: int, n: int, device) -> torch.Tensor | None:
    """Under tracing: assert on the device that the mask function agrees with ``pat`` on the diagonals the guess
    rests on, and return the "packed after all" flag (a sequence starts where a query cannot see the key before
    it). O(B * N) evaluations of the mask function, no N x N."""
    if n < 2:
        return None
    b = torch.arange(batch_size, device=device)[:, None]
    h = torch.zeros((), dtype=torch.long, device=device)
    i = torch.arange(1, n, device=device)[None, :]
    ok = torch.ones((), dtype=torch.bool, device=device)
    if pat.causal:
        ok = ok & ~mask_function(b, h, i - 1, i).any()  # nothing above the diagonal
    for side, sign in (("left", 1), ("right", -1)):
        w = getattr(pat, side)
        if w is not None and (side == "left" or not pat.causal) and w + 1 < n:
            q = torch.arange(w + 1, n, device=device)[None, :] if sign > 0 else torch.arange(0, n - w - 1,
                                                                                             device=device)[None, :]
            ok = ok & ~mask_function(b, h, q, q - sign * (w + 1)).any()  # nothing past the window's edge
    assert_ok(ok, "embedattn: under torch.compile the attention mask was read as "
                  f"{pat.base} with window ({pat.left}, {pat.right}), and transformers' mask function disagrees; "
                  "run this model eagerly with attn_implementation='embedattn', or use 'sdpa'")
    if pat.packed is None or pat.left == 0:
        return None  # a window of one key sees no neighbour: packing changes nothing
    return ~mask_function(b, h, i, i - 1).all()


def _packed_cu(packed_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """cu_seqlens (int32) and max_seqlen of the sequences transformers found (``packed_ids`` (B, N): a sequence
    index per token, restarting each row), over the B * N flattened tokens. Two host reads, once per mask."""
    starts = torch.ones_like(packed_ids, dtype=torch.bool)
    starts[:, 1:] = packed_ids[:, 1:] != packed_ids[:, :-1]
    idx = starts.flatten().nonzero().flatten()
    cu = torch.cat([idx, idx.new_tensor([packed_ids.numel()])]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())


def _tracing() -> bool:
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


def make_mask_function() -> Callable:
    """The mask function ``register`` installs in transformers' ``AttentionMaskInterface`` (see the module doc)."""

    def embedattn_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset: int = 0,
                       mask_function: Callable | None = None, attention_mask: torch.Tensor | None = None, **kwargs):
        if isinstance(attention_mask, KernelMask):
            return attention_mask  # built ahead (generate with a static cache), handed back to the model
        mu = _mu()
        if mask_function is None:
            mask_function = mu.causal_mask_function
        tracing = _tracing()

        def dense():
            return mu.sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                                kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
                                **kwargs)

        if tracing:
            pat = _read_traced(mask_function, attention_mask, q_length, kv_length, q_offset, kv_offset, kwargs)
        else:
            pat = _Pattern()
            if not _read_closure(mask_function, pat) or pat.base is None:
                pat = None
        if pat is None:
            return dense()
        device = kwargs.get("device", "cpu")
        padding = mu.prepare_padding_mask(attention_mask, kv_length, kv_offset)
        key_ok = None
        if padding is not None:
            key_ok = padding[:, kv_offset:kv_offset + kv_length].to(torch.bool)
            if not tracing and bool(key_ok.all()):
                key_ok = None  # no padding among these keys: one host read, once per mask
        causal, window = pat.causal, pat.window()
        if isinstance(q_offset, torch.Tensor):  # a static cache's position, kept on the device
            if q_length == 1 and pat.causal:
                # one query: the diagonal and the window are a set of keys; no host read
                pos = torch.arange(kv_length, device=device) + kv_offset
                seen = pos <= q_offset
                if pat.left is not None:
                    seen = seen & (pos >= q_offset - pat.left)
                key_ok = seen[None, :] if key_ok is None else key_ok & seen[None, :]
                causal, window, q_offset = False, None, kv_offset
            elif tracing:
                return dense()  # several queries at a traced static-cache position (compiled prefill)
            else:
                q_offset = int(q_offset)
        packed_check = varlen = None
        if pat.packed is not None:
            if key_ok is not None or q_offset != 0 or kv_offset != 0 or q_length != kv_length:
                return dense()  # transformers packs only without padding and cache; anything else is not ours
            if tracing:
                packed_check = _traced_checks(pat, mask_function, batch_size, q_length, device)
            else:
                varlen = _packed_cu(pat.packed.expand(batch_size, -1))
        elif tracing:
            _traced_checks(pat, mask_function, batch_size, q_length, device)
        key_mask = None if key_ok is None else key_ok[:, None, None, :]
        return KernelMask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, causal=causal,
                          causal_offset=q_offset - kv_offset, window=window, key_mask=key_mask, varlen=varlen,
                          packed_check=packed_check, sliding=pat.window())

    return embedattn_mask


# --------------------------------------------------------------------------------------------------
# the attention function
# --------------------------------------------------------------------------------------------------
def _sdpa_forward() -> Callable:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward


_NO_WEIGHTS = ("`embedattn` attention does not compute attention weights (`output_attentions=True`): like `sdpa`, "
               "it returns None for them. Set your attention to `eager` if you need them.")


def _warn_no_weights() -> None:
    from transformers.utils import logging

    logging.get_logger(__name__).warning_once(_NO_WEIGHTS)


def _check_kwargs(kwargs: dict) -> None:
    for name, value in kwargs.items():
        if name not in USED_KWARGS and name not in HARMLESS_KWARGS and value is not None:
            raise TypeError(f"embedattn attention got the keyword `{name}`, which it does not implement and which may "
                            "change the result; use attn_implementation='eager' for this model (or report it)")


def _causal_window(sliding_window, causal: bool) -> tuple[int, int] | None:
    """transformers' ``sliding_window`` keyword in kernel terms: ``kv_idx > q_idx - sliding_window`` when causal."""
    if sliding_window is None:
        return None
    if not causal:
        raise ValueError("embedattn attention got `sliding_window` for a non-causal call without an embedattn mask "
                         "saying how the window is aligned; build the mask with attn_implementation='embedattn'")
    return (int(sliding_window) - 1, WINDOW_OFF)


def _as_int(x) -> int:
    return x if isinstance(x, int) else int(x)


def make_attention_forward(backend: str | None = None) -> Callable:
    """The attention function ``register`` installs, running on ``backend`` (None: ``EMBEDATTN_BACKEND`` or auto,
    i.e. Triton on CUDA and the reference or torch's own SDPA, where it computes the same, on the CPU)."""

    def embedattn_attention_forward(
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask,
        dropout: float = 0.0,
        scaling: float | None = None,
        is_causal: bool | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, None]:
        _check_kwargs(kwargs)
        if kwargs.get("output_attentions", False):
            _warn_no_weights()
        softcap, sinks, sliding_window = kwargs.get("softcap"), kwargs.get("s_aux"), kwargs.get("sliding_window")
        if kwargs.get("position_bias") is not None:
            for name in ("softcap", "s_aux", "cu_seq_lens_q"):
                if kwargs.get(name) is not None:
                    raise ValueError(f"embedattn attention cannot combine `position_bias` with `{name}`")
            if isinstance(attention_mask, KernelMask):
                raise ValueError("`position_bias` runs on transformers' sdpa, which cannot read an embedattn mask")
            passed = {k: v for k, v in kwargs.items() if k in HARMLESS_KWARGS or k in ("position_bias",
                                                                                       "output_attentions")}
            return _sdpa_forward()(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                   is_causal=is_causal, **passed)
        common = dict(scale=scaling, softcap=float(softcap or 0.0), dropout_p=float(dropout or 0.0), backend=backend)
        if sinks is not None:
            common["sinks"] = sinks
        module_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
        plan = attention_mask if isinstance(attention_mask, KernelMask) else None
        if plan is not None:
            if query.shape[2] != plan.q_length or key.shape[2] != plan.kv_length:
                raise ValueError(f"embedattn attention: the mask was built for {plan.q_length} queries and "
                                 f"{plan.kv_length} keys, the call has {query.shape[2]} and {key.shape[2]}")
            if sliding_window is not None and plan.sliding != _causal_window(sliding_window, True) and \
                    plan.sliding != (int(sliding_window),) * 2:
                raise ValueError(f"embedattn attention: `sliding_window={sliding_window}` disagrees with the mask "
                                 f"transformers built for this layer ({plan})")
        if isinstance(attention_mask, torch.Tensor):
            # a dense mask: built by transformers for what the kernels have no feature for (it holds the whole
            # pattern: window, chunks, packed sequences), or given by the user; as for sdpa and eager
            mask = attention_mask
            if mask.shape[-1] != key.shape[2]:
                mask = mask[..., :key.shape[2]]  # older transformers versions hand over masks as wide as a static cache
            out = attention(query, key, value, attn_mask=mask, causal=False, **common)
        elif cu_q is not None or cu_k is not None:
            # packed sequences handed over by the data collator (transformers' flash-attention keywords)
            if cu_q is None or cu_k is None or kwargs.get("max_length_q") is None or kwargs.get("max_length_k") is None:
                raise ValueError("embedattn attention needs all of cu_seq_lens_q, cu_seq_lens_k, max_length_q and "
                                 "max_length_k, or none of them")
            if plan is not None and plan.key_mask is not None:
                raise ValueError("embedattn attention got cu_seq_lens_q/k and a padding mask; pass one of them")
            causal = plan.causal if plan is not None else bool(module_causal)
            window = plan.window if plan is not None else _causal_window(sliding_window, causal)
            return _varlen(query, key, value, cu_q, cu_k, _as_int(kwargs["max_length_q"]),
                           _as_int(kwargs["max_length_k"]), causal, window, common), None
        elif plan is not None:
            varlen = plan.varlen if plan.varlen is not None else _packed_positions(plan, kwargs.get("position_ids"))
            if varlen is not None:
                cu, longest = varlen
                return _varlen(query, key, value, cu, cu, longest, longest, plan.causal, plan.window, common), None
            if plan.packed_check is not None:
                assert_ok(~plan.packed_check, _PACKED_UNDER_COMPILE)
            out = attention(query, key, value, causal=plan.causal, causal_offset=plan.causal_offset,
                            window=plan.window, attn_mask=plan.key_mask, **common)
        else:
            # no mask (a model that does not build one through transformers' masking utilities): sdpa's rule,
            # causal only for > 1 query, aligned top-left like SDPA's is_causal
            causal = bool(query.shape[2] > 1 and module_causal)
            out = attention(query, key, value, causal=causal, causal_offset=0,
                            window=_causal_window(sliding_window, causal) if causal else None, **common)
        return out.transpose(1, 2).contiguous(), None

    return embedattn_attention_forward


_PACKED_UNDER_COMPILE = (
    "embedattn attention: this batch packs several sequences per row (position_ids restart), which cannot be "
    "detected under torch.compile (no host read); pass cu_seq_lens_q/k and max_length_q/k "
    "(DataCollatorWithFlattening(return_flash_attn_kwargs=True)), or run eagerly")


def _packed_positions(plan: KernelMask, position_ids) -> tuple[torch.Tensor, int] | None:
    """Packed sequences read from ``position_ids`` (they restart where a sequence starts), as transformers' flash
    path reads them, for models whose mask does not carry them (Mistral and gpt-oss build their masks without
    position_ids, so eager and sdpa attend across the sequences there). Only for a call with no padding and
    no cache history; eagerly one host read per mask (the answer is kept on the mask for the other layers), under
    torch.compile a device assertion that nothing restarts (packed batches compile through cu_seq_lens)."""
    if (not isinstance(position_ids, torch.Tensor) or position_ids.dim() != 2 or plan.key_mask is not None
            or plan.q_length < 2 or plan.q_length != plan.kv_length or plan.causal_offset != 0
            or position_ids.shape[-1] != plan.q_length):
        return None
    cached = getattr(plan, "_positions", None)
    if cached is not None and cached[0] is position_ids:
        return cached[1]
    pos = position_ids.expand(plan.batch_size, -1)
    restart = pos[:, 1:] - pos[:, :-1] != 1
    if _tracing():
        assert_ok(~restart.any(), _PACKED_UNDER_COMPILE)
        return None
    varlen = _packed_cu(torch.cat([torch.zeros_like(pos[:, :1]), restart.cumsum(-1)], -1)) if restart.any() else None
    plan._positions = (position_ids, varlen)
    return varlen


def _varlen(query, key, value, cu_q, cu_k, max_q: int, max_k: int, causal: bool, window, common: dict):
    """Packed sequences over the B * N flattened tokens of (B, H, N, D) inputs; the output (B, N, H, Dv)."""
    b, h, n, _ = query.shape
    q, k, v = (t.transpose(1, 2).reshape(-1, t.shape[1], t.shape[3]) for t in (query, key, value))
    out = attention_varlen(q, k, v, cu_q.to(torch.int32), cu_k.to(torch.int32), max_q, max_k, causal=causal,
                           window=window, **common)
    return out.reshape(b, n, h, out.shape[-1])


def register(name: str = "embedattn", *, backend: str | None = None) -> str:
    """Register embedattn attention with transformers under ``name`` and return ``name``.

    Afterwards ``from_pretrained(..., attn_implementation=name)``, ``from_config(config,
    attn_implementation=name)`` and ``model.set_attn_implementation(name)`` run embedattn's kernels, with the
    mask function of this module under the same name. ``backend`` pins the embedattn backend ("triton",
    "reference"; default None: ``EMBEDATTN_BACKEND`` or auto). Registering a name again replaces the earlier one.
    """
    if not isinstance(name, str) or not name or "|" in name or "/" in name:
        raise ValueError(f"name must be a plain non-empty string (no '|' or '/'), got {name!r}")
    check_backend(backend)  # validates the value early
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("embedattn.integrations.transformers needs transformers>=5 "
                          "(pip install 'embedattn[hf]')") from e
    AttentionInterface.register(name, make_attention_forward(backend))
    AttentionMaskInterface.register(name, make_mask_function())
    return name
