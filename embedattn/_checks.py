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


def check_tensor(name: str, value, *, optional: bool = False) -> None:
    """A torch.Tensor (or None, where ``optional``)."""
    if not isinstance(value, torch.Tensor) and not (optional and value is None):
        raise TypeError(f"{name} must be a torch.Tensor{' or None' if optional else ''}, got {type(value).__name__}")


def check_device(name: str, t: torch.Tensor, other: str, like: torch.Tensor) -> None:
    """``t`` on the device of ``like`` (the argument named ``other``)."""
    if t.device != like.device:
        raise ValueError(f"{name} is on {t.device} but {other} is on {like.device}")


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


def check_ids_in_range(named_ids, size: int, what: str = "the table", unit: str = "rows") -> None:
    """IndexError unless every id of each (name, tensor) pair lies in [0, size).

    One min/max reduction per tensor and one device-to-host read for all of them (one sync)."""
    _check_ranges([(name, t, size, what) for name, t in named_ids], unit)


def _check_ranges(items, unit: str = "rows") -> None:
    """``check_ids_in_range`` over (name, ids, size, what) items, each against its own table size."""
    items = [it for it in items if it[1] is not None and it[1].numel()]
    if not items:
        return
    ext = torch.stack([x for _, t, _, _ in items for x in torch.aminmax(t.reshape(-1))]).tolist()
    for i, (name, _, size, what) in enumerate(items):
        lo, hi = ext[2 * i], ext[2 * i + 1]
        if lo < 0 or hi >= size:
            bad = lo if lo < 0 else hi
            raise IndexError(f"{name} contains id {bad}, out of range for {what} with {size} {unit} ([0, {size}))")


# --------------------------------------------------------------------------------------------------
# bounds checks of ids: the check_bounds modes shared by embedding and negative_sampling_loss
# --------------------------------------------------------------------------------------------------
BOUNDS_MODES = ("sync", "device", "off")


def bounds_mode(check_bounds, device: torch.device) -> str:
    """``check_bounds`` as one of BOUNDS_MODES.

    ``None`` (the default): "device" on CUDA and while torch.compile traces, "sync" in eager mode on the
    CPU (where the host read costs nothing). ``True`` is "sync", ``False`` is "off". "device" in eager
    mode off CUDA becomes "sync": the same check, with the IndexError naming the id."""
    compiling = torch.compiler.is_compiling()
    if check_bounds is None:
        mode = "device" if device.type == "cuda" or compiling else "sync"
    elif isinstance(check_bounds, bool):
        mode = "sync" if check_bounds else "off"
    elif isinstance(check_bounds, str):
        if check_bounds not in BOUNDS_MODES:
            raise ValueError(f"check_bounds must be None, a bool or one of {BOUNDS_MODES}, got {check_bounds!r}")
        mode = check_bounds
    else:
        raise TypeError(f"check_bounds must be None, a bool or one of {BOUNDS_MODES}, got {check_bounds!r}")
    if mode == "device" and device.type != "cuda" and not compiling:
        mode = "sync"
    return mode


def check_ids(items, mode: str) -> None:
    """The host part of a bounds check. ``items``: (name, ids, size, what) per id tensor (None ids skipped).

    Ids into a table with no rows are an IndexError in every mode (no row 0 to fall back on; the shapes
    say it, no device read). In "sync" mode every id must lie in [0, size): one min/max reduction per
    tensor and one device-to-host read for all of them (one sync), an IndexError naming the first bad
    tensor and its most negative or largest id."""
    for name, t, size, what in items:
        if size == 0 and t is not None and t.numel():
            raise IndexError(f"{name} index {what}, which has no rows")
    if mode == "sync":
        _check_ranges(items)


def ok_flag(device) -> torch.Tensor:
    """The int32 (1,) flag a checking kernel clears when it meets an out-of-range id; starts at 1."""
    return torch.ones(1, dtype=torch.int32, device=device)


def assert_ok(ok: torch.Tensor, msg: str) -> None:
    """Fail the call when a kernel cleared ``ok``, without a host sync: ``torch._assert_async`` raises at
    once on the CPU; on CUDA it is a device-side assertion, reported at the next synchronization."""
    torch._assert_async(ok, msg)


def safe_ids(t: torch.Tensor, size: int, mode: str, msg: str) -> torch.Tensor:
    """The torch-ops form of a kernel's check (for the reference road): ids outside [0, size) replaced by
    0; in "device" mode ``assert_ok`` on their absence."""
    good = (t >= 0) & (t < size)
    if mode == "device":
        assert_ok(good.all(), msg)
    return torch.where(good, t, torch.zeros_like(t))
