"""Argument checks shared by the ops: one rule each, clear errors naming the argument."""

from __future__ import annotations

import math
from numbers import Integral, Real

import torch

SEED_MAX = 2**63 - 1  # the kernels' Philox takes 64-bit seeds; int64 holds them


def check_bool(name: str, value) -> bool:
    """A flag must be a bool (``causal="no"`` is not a truth value)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}")
    return value


def check_int(name: str, value, *, low: int | None = None, high: int | None = None) -> int:
    """An int (not a bool or a float) in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be an int, got {value!r}")
    value = int(value)
    if low is not None and value < low or high is not None and value > high:
        lo = "-inf" if low is None else low
        hi = "inf" if high is None else high
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {value}")
    return value


def check_float(name: str, value, *, low: float | None = None, high: float | None = None,
                high_open: bool = False) -> float:
    """A finite real number (not a bool) in [low, high] (or [low, high) with ``high_open``)."""
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(float(value)):
        raise TypeError(f"{name} must be a finite real number, got {value!r}")
    value = float(value)
    bad_high = high is not None and (value >= high if high_open else value > high)
    if low is not None and value < low or bad_high:
        raise ValueError(f"{name} must be in [{low}, {high}{')' if high_open else ']'}, got {value}")
    return value


def check_seed(seed) -> int | None:
    """None, or an int the kernels take ([0, 2**63))."""
    return None if seed is None else check_int("seed", seed, low=0, high=SEED_MAX)


def seed_tensor(seed: int | None, device) -> torch.Tensor:
    """The one-element int64 seed the dropout kernels (and the reference's mask) read, on ``device``.

    ``None`` draws 62 random bits from torch's generator for that device, on the device (no host
    sync; ``torch.manual_seed`` reproduces a run, and two calls repeat a mask with odds ~2^-62)."""
    if seed is None:
        return torch.randint(0, 2**62, (1,), dtype=torch.int64, device=device)
    return torch.full((1,), seed, dtype=torch.int64, device=device)


def check_ids_in_range(named_ids, size: int, what: str = "the table") -> None:
    """IndexError unless every id of each (name, tensor) pair lies in [0, size).

    One min/max reduction per tensor and one device-to-host read for all of them (one sync)."""
    named_ids = [(name, t) for name, t in named_ids if t is not None and t.numel()]
    if not named_ids:
        return
    ext = torch.stack([x for _, t in named_ids for x in torch.aminmax(t.reshape(-1))]).tolist()
    for i, (name, _) in enumerate(named_ids):
        lo, hi = ext[2 * i], ext[2 * i + 1]
        if lo < 0 or hi >= size:
            bad = lo if lo < 0 else hi
            raise IndexError(f"{name} contains id {bad}, out of range for {what} with {size} rows ([0, {size}))")
