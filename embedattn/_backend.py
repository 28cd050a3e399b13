"""Dispatch: the one place that decides whether an op runs its Triton kernels or the PyTorch reference.

``backend=None`` reads ``EMBEDATTN_BACKEND`` (default ``"auto"``).

* ``"reference"``: the PyTorch reference (``embedattn.reference``), always.
* ``"auto"``: the Triton kernels when they can run these inputs on CUDA (Triton installed, a dtype and
  head dim the op's kernels take), the reference otherwise; the fallback is silent. The Triton
  interpreter is never chosen automatically. Attention on the CPU may run torch's own SDPA instead of
  the reference where its semantics are exactly ours (``native_ok``), since it is faster there.
* ``"triton"``: the kernels, or a ``RuntimeError``/``TypeError``/``ValueError`` naming why they cannot
  run these inputs (CPU tensors without ``TRITON_INTERPRET=1``, float64, bfloat16 under the
  interpreter, a head dim past the kernels' limit, ...).

Environment variables, all parsed here with one rule (``env_flag``: 1/0, true/false, yes/no, on/off,
case-insensitive; anything else raises naming the variable): ``EMBEDATTN_BACKEND``,
``EMBEDATTN_AUTOTUNE`` (default on; never under the interpreter), ``TRITON_INTERPRET``,
``EMBEDATTN_ATTENTION_IMPL`` (default / hopper / gluon). The tuned-config tables read
``EMBEDATTN_CONFIGS_DIR`` and ``EMBEDATTN_TUNED_CONFIGS`` (see ``embedattn.configs``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

BACKENDS = ("auto", "triton", "reference")
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("", "0", "false", "no", "off")


def env_flag(name: str, default: bool) -> bool:
    """The boolean environment variable ``name`` (``default`` when unset)."""
    raw = os.environ.get(name)
    if raw is None:
        return default
    v = raw.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise ValueError(f"environment variable {name}={raw!r}: expected 1/0, true/false, yes/no or on/off")


def interpreting() -> bool:
    """True when Triton kernels run through the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return env_flag("TRITON_INTERPRET", False)


def autotune_enabled() -> bool:
    """Launchers autotune on a GPU unless ``EMBEDATTN_AUTOTUNE`` is off; never under the interpreter."""
    return env_flag("EMBEDATTN_AUTOTUNE", True) and not interpreting()


ATTENTION_IMPLS = ("auto", "default", "hopper", "gluon")


def attention_impl() -> str:
    """``EMBEDATTN_ATTENTION_IMPL``: which attention kernels run where they can. ``auto`` (unset): the kernels the
    device's tuned table names for the shape (entries ``attention.impl_fwd`` / ``attention.impl_bwd``, written by
    benchmarks/gpu/hopper_attention.py where a variant was measured faster), kernels/attention.py elsewhere;
    ``default``: kernels/attention.py everywhere; ``hopper``: the sm90 TMA / warp-specialized kernels of
    kernels/attention_hopper.py wherever they cover a call; ``gluon``: its Gluon forward. Read once per call by the
    attention entry (``embedattn.attention._kernel_impls``), never inside a registered op, so eager and compiled
    calls run the same kernels."""
    raw = os.environ.get("EMBEDATTN_ATTENTION_IMPL", "").strip().lower() or "auto"
    if raw not in ATTENTION_IMPLS:
        raise ValueError(f"environment variable EMBEDATTN_ATTENTION_IMPL={raw!r}: expected one of {ATTENTION_IMPLS}")
    return raw


def default_backend() -> str:
    """``EMBEDATTN_BACKEND`` (default ``"auto"``), checked."""
    raw = os.environ.get("EMBEDATTN_BACKEND", "").strip().lower() or "auto"
    if raw not in BACKENDS:
        raise ValueError(f"environment variable EMBEDATTN_BACKEND={raw!r}: expected one of {BACKENDS}")
    return raw


_PROBED: dict[str, bool] = {}  # computed once per process; a plain dict so torch.compile reads constants


def triton_available() -> bool:
    """True when ``import triton`` works (it is a Linux-only dependency)."""
    if "triton" not in _PROBED:
        try:
            import triton  # noqa: F401
            import triton.language  # noqa: F401

            _PROBED["triton"] = True
        except Exception:
            _PROBED["triton"] = False
    return _PROBED["triton"]


def _kernels_interpreted() -> bool:
    """Whether the kernels were built for the interpreter: Triton reads TRITON_INTERPRET when a kernel
    is decorated, so setting it later has no effect on kernels already imported."""
    if "interpreted" not in _PROBED:
        import triton.language as tl

        from .kernels import _utils

        # Triton's own jitted helpers (tl.cdiv, ...) were built when triton was imported
        _PROBED["interpreted"] = _utils.INTERPRETED and type(tl.cdiv).__name__ == "InterpretedFunction"
    return _PROBED["interpreted"]


@dataclass(frozen=True)
class Capability:
    """What an op's Triton kernels take."""

    dtypes: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16, torch.float32)
    max_head_dim: int | None = None
    max_head_dim_v: int | None = None  # the value head dim, where it may differ (attention: MLA)


CAPABILITIES: dict[str, Capability] = {
    # head dims up to 512 for training (forward and backward, Q/K and V each), up to 576 for Q/K in decoding
    # (DeepSeek's MLA latent head: V its first 512 columns)
    "attention": Capability(max_head_dim=512, max_head_dim_v=512),
    "attention_decode": Capability(max_head_dim=576, max_head_dim_v=512),
    "embedding": Capability(),
    "negative_sampling": Capability(),
    "rotary": Capability(),
    "word2vec": Capability(dtypes=(torch.float32, torch.float16, torch.bfloat16)),
}


def triton_problem(op: str, device: torch.device, dtype: torch.dtype | None = None,
                   head_dim: int | None = None, head_dim_v: int | None = None) -> tuple[type[Exception], str] | None:
    """Why ``op``'s Triton kernels cannot run inputs on ``device`` with ``dtype``, ``head_dim`` (and the value
    head dim ``head_dim_v``): the exception type and the reason, or None when they can."""
    cap = CAPABILITIES[op]
    if not triton_available():
        return RuntimeError, "Triton is not installed (pip install triton; it is Linux-only)"
    if device.type == "cuda":
        if interpreting():
            return RuntimeError, "TRITON_INTERPRET=1 is set, so Triton kernels run on CPU tensors only"
    elif device.type == "cpu":
        if not interpreting():
            return RuntimeError, ("CPU tensors need the Triton interpreter: set TRITON_INTERPRET=1 before importing "
                                  "triton (or pass CUDA tensors, or use backend='reference')")
        if not _kernels_interpreted():
            return RuntimeError, ("TRITON_INTERPRET=1 was set after embedattn's kernels were imported; Triton reads "
                                  "it when a kernel is defined: set it before importing embedattn (or triton)")
    else:
        return RuntimeError, f"the Triton kernels run on CUDA tensors (or CPU ones when interpreted), got {device}"
    if dtype is not None:
        if dtype not in cap.dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in cap.dtypes)
            return TypeError, (f"{op} kernels take dtype {names}, got {str(dtype).replace('torch.', '')} "
                               "(use backend='reference')")
        if dtype == torch.bfloat16 and device.type == "cpu":
            return TypeError, "the Triton interpreter cannot run dtype bfloat16 (test bf16 on a GPU, or use fp16/fp32)"
    if head_dim is not None and cap.max_head_dim is not None and not 1 <= head_dim <= cap.max_head_dim:
        return ValueError, f"{op} kernels take head dims 1..{cap.max_head_dim}, got head dim {head_dim}"
    if head_dim_v is not None and cap.max_head_dim_v is not None and not 1 <= head_dim_v <= cap.max_head_dim_v:
        return ValueError, (f"{op} kernels take value head dims 1..{cap.max_head_dim_v}, got value head dim "
                            f"{head_dim_v}")
    return None


def check_backend(backend) -> str:
    """``backend`` checked, with None read from ``EMBEDATTN_BACKEND``."""
    if backend is None:
        return default_backend()
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be None or one of {BACKENDS}, got {backend!r}")
    return backend


def _device(tensors) -> torch.device:
    devs = [t.device for t in tensors if isinstance(t, torch.Tensor)]
    cuda = [d for d in devs if d.type == "cuda"]
    return cuda[0] if cuda else (devs[0] if devs else torch.device("cpu"))


def resolve(backend: str | None, *tensors: torch.Tensor, op: str = "attention", dtype: torch.dtype | None = None,
            head_dim: int | None = None, head_dim_v: int | None = None,
            native_ok: Callable[[], bool] | None = None) -> str:
    """Decide how ``op`` runs on ``tensors``: ``"triton"``, ``"reference"``, or ``"native"`` (torch's own
    op, for ``auto`` where the kernels cannot run and ``native_ok()`` says torch's semantics are exactly ours; asked
    only there, so the kernels' calls never pay for the question).

    ``backend="triton"`` raises naming the reason when the kernels cannot run these inputs."""
    backend = check_backend(backend)
    if backend == "reference":
        return "reference"
    device = _device(tensors)
    if backend == "auto":
        if device.type == "cuda" and triton_problem(op, device, dtype, head_dim, head_dim_v) is None:
            return "triton"
        return "native" if native_ok is not None and native_ok() else "reference"
    problem = triton_problem(op, device, dtype, head_dim, head_dim_v)
    if problem is not None:
        err, why = problem
        raise err(f"backend='triton' cannot run this {op} call: {why}")
    return "triton"
