"""Small helpers shared by the launchers and the kernels."""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from .._backend import autotune_enabled, interpreting

__all__ = ["INTERPRETED", "LOG2E", "MAX_GRID_Y", "autotune_enabled", "bh_grid", "bh_id", "empty", "interpreting",
           "next_pow2", "poisoned_outputs", "tl_dtype"]

LOG2E = 1.4426950408889634  # scores in base 2: exp(x) = exp2(x * LOG2E)
MAX_GRID_Y = 65535  # CUDA's limit on grid axes 1 and 2

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


# (batch, head) programs folded over grid axes 1 and 2: CUDA caps those axes at 65535 programs, and B * H passes that
# in large-batch decoding (e.g. 4096 x 32). The host picks the two axes (bh_grid), a kernel reads its index (bh_id);
# programs past n (the grid rounds up) must end themselves.
def bh_grid(n: int) -> tuple[int, int]:
    """Grid axes 1 and 2 for n (batch, head) programs, each within MAX_GRID_Y."""
    y = max(1, min(n, MAX_GRID_Y))
    return y, triton.cdiv(max(n, 1), y)


@triton.jit
def bh_id():
    """This program's (batch, head) index over the grid axes 1 and 2 that ``bh_grid`` chose."""
    return tl.program_id(2) * tl.num_programs(1) + tl.program_id(1)


def tl_dtype(dtype: torch.dtype):
    return {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}[dtype]
