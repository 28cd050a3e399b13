"""Small helpers shared by the launchers."""

from __future__ import annotations

import contextlib

import torch
import triton

from .._backend import autotune_enabled, interpreting

__all__ = ["INTERPRETED", "autotune_enabled", "empty", "interpreting", "next_pow2", "poisoned_outputs", "tl_dtype"]

_POISON = False

# Triton reads TRITON_INTERPRET when a kernel is defined: what the kernels of this process were built for
INTERPRETED = interpreting()


def empty(*shape: int, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """``torch.empty`` that fills floats with NaN (ints with -1) while poisoning is on (tests),
    so an element a kernel forgets to write cannot pass."""
    t = torch.empty(*shape, dtype=dtype, device=device)
    if _POISON:
        t.fill_(float("nan") if t.is_floating_point() else -1)
    return t


@contextlib.contextmanager
def poisoned_outputs(enabled: bool = True):
    """Context manager: outputs allocated by launchers are NaN-filled before the kernels run."""
    global _POISON
    old, _POISON = _POISON, enabled
    try:
        yield
    finally:
        _POISON = old


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(int(n))




def tl_dtype(dtype: torch.dtype):
    import triton.language as tl

    return {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}[dtype]
