"""``patch_sdpa()``: route ``torch.nn.functional.scaled_dot_product_attention`` to embedattn's drop-in.

For models that call SDPA themselves (``F.scaled_dot_product_attention(...)`` looked up at call
time, as torch.nn.MultiheadAttention, transformers' "sdpa" implementation and most hand-written
models do)::

    with embedattn.patch_sdpa():      # as a context manager
        model(x)

    undo = embedattn.patch_sdpa()     # or as a plain call
    model(x)
    undo()                            # (or undo.undo())

Code that bound the function earlier (``from torch.nn.functional import scaled_dot_product_attention``
at import time) keeps torch's. The drop-in keeps torch's semantics, so working code keeps working
under the patch: every call torch accepts gives torch's result (broadcast batch and heads, 3-D
inputs, masks, ``enable_gqa``, ``scale``), every call torch rejects raises torch's exception type
(tests/attention/test_attention.py checks a grid of both against torch itself); dropout runs in the kernel,
seeded from torch's RNG. What the kernel does not cover (float64, head dims 0 or > 256, ``attn_mask``
with ``is_causal``, CPU tensors outside the interpreter, ...) goes to torch's own SDPA, captured
before any patch.

Patches nest: the original is restored when the last active patch is undone, in any order, and a
context manager undoes its patch when the block raises. Undoing one patch twice is a no-op. The
patch is process-wide (not thread-local), like any monkeypatch.
"""

from __future__ import annotations

import threading

import torch.nn.functional as F

from .attention import scaled_dot_product_attention

__all__ = ["SdpaPatch", "patch_sdpa", "sdpa_patched"]

_LOCK = threading.Lock()
_ACTIVE = 0
_SAVED = None  # what F.scaled_dot_product_attention was before the outermost patch


class SdpaPatch:
    """One active patch: callable (``undo()``) and a context manager. Created by ``patch_sdpa()``."""

    def __init__(self) -> None:
        global _ACTIVE, _SAVED
        with _LOCK:
            if _ACTIVE == 0:
                _SAVED = F.scaled_dot_product_attention
                F.scaled_dot_product_attention = scaled_dot_product_attention
            _ACTIVE += 1
        self._active = True

    @property
    def active(self) -> bool:
        """True until this patch is undone."""
        return self._active

    def undo(self) -> None:
        """Undo this patch; the original comes back when no other patch is active. Idempotent."""
        global _ACTIVE, _SAVED
        with _LOCK:
            if not self._active:
                return
            self._active = False
            _ACTIVE -= 1
            if _ACTIVE == 0:
                F.scaled_dot_product_attention = _SAVED
                _SAVED = None

    __call__ = undo

    def __enter__(self) -> SdpaPatch:
        return self

    def __exit__(self, *exc) -> None:
        self.undo()

    def __repr__(self) -> str:
        return f"SdpaPatch(active={self._active})"


def patch_sdpa() -> SdpaPatch:
    """Route ``torch.nn.functional.scaled_dot_product_attention`` to
    ``embedattn.scaled_dot_product_attention`` until the returned patch is undone (call it, or use
    it as a context manager)."""
    return SdpaPatch()


def sdpa_patched() -> bool:
    """True while at least one ``patch_sdpa()`` is active."""
    return _ACTIVE > 0
