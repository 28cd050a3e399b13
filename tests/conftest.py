"""Test setup: pick the device and, without CUDA, run every Triton kernel through the interpreter.

``EMBEDATTN_TEST_DEVICE=cuda|cpu`` overrides the choice (default: cuda when a GPU exists).
TRITON_INTERPRET must be set before anything imports triton, so this runs first.
"""

import os

import torch

_dev = os.environ.get("EMBEDATTN_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
os.environ["EMBEDATTN_TEST_DEVICE"] = _dev
if _dev == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:
    # autotuning every test shape would cost minutes: tests use the launchers' fixed heuristic configs
    os.environ.setdefault("EMBEDATTN_AUTOTUNE", "0")
os.environ.pop("EMBEDATTN_BACKEND", None)

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _poison_outputs():
    """Every launcher output is NaN-filled before its kernel runs, so unwritten elements fail."""
    try:
        from embedattn.kernels._utils import poisoned_outputs
    except Exception:  # Triton missing: only the reference path runs
        yield
        return
    with poisoned_outputs(True):
        yield
