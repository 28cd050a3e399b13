"""Small helpers shared by the launchers."""

from __future__ import annotations

import contextlib
import os

import torch
import triton

_POISON = False


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0", "false", "False")


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
