"""Backend dispatch: one place decides whether an op runs in Triton or in the PyTorch reference.

``backend=None`` reads ``EMBEDATTN_BACKEND`` (default ``"auto"``). ``"auto"`` runs Triton on CUDA
tensors when Triton imports, the reference otherwise. ``"triton"`` on CPU tensors runs the kernels
through Triton's interpreter, which must have been enabled with ``TRITON_INTERPRET=1`` before Triton
was imported; otherwise it raises.
"""

from __future__ import annotations

import functools
import os

import torch

BACKENDS = ("auto", "triton", "reference")


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    """True when ``import triton`` works (it is a Linux-only dependency)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:
        return False
    return True


def interpreting() -> bool:
    """True when Triton kernels run through the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0", "false", "False")


def resolve(backend: str | None, *tensors: torch.Tensor) -> str:
    """Return ``"triton"`` or ``"reference"`` for an op whose inputs are ``tensors``."""
    if backend is None:
        backend = os.environ.get("EMBEDATTN_BACKEND", "auto") or "auto"
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be None or one of {BACKENDS}, got {backend!r}")
    on_cuda = any(isinstance(t, torch.Tensor) and t.is_cuda for t in tensors)
    if backend == "reference":
        return "reference"
    if backend == "auto":
        return "triton" if on_cuda and triton_available() else "reference"
    # backend == "triton"
    if not triton_available():
        raise RuntimeError("backend='triton' was requested but Triton is not installed (pip install triton)")
    if not on_cuda and not interpreting():
        raise RuntimeError(
            "backend='triton' on CPU tensors needs the Triton interpreter: set TRITON_INTERPRET=1 "
            "before importing triton (or pass CUDA tensors, or use backend='reference')"
        )
    if on_cuda and interpreting():
        raise RuntimeError("TRITON_INTERPRET=1 is set, so Triton kernels cannot run on CUDA tensors")
    return "triton"
