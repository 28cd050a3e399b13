"""Timing, work formulas, device peaks and the long-format CSV shared by every suite.

One measurement = one provider running one (kernel, mode, dtype, shape). It becomes several rows of
the same CSV: the time in ms, the throughput (TFLOP/s, GB/s, pairs/s, words/s) and, on CUDA, the peak
memory. Throughput quantiles come from the time quantiles (p20 of throughput = work / p80 of time),
so a row's p20 <= p50 <= p80 always holds.

CUDA timing is ``triton.testing.do_bench`` (it flushes L2 before every call) with quantiles
[0.5, 0.2, 0.8]; the host timer on CPU reports the same quantiles of per-call wall time. Both call a
closure that rotates through several input sets, so no call reuses the previous call's inputs.
Every suite times its providers through ``run_speed_benchmark`` (fwd, bwd, fwd+bwd or a step): one
place builds the gradient-carrying inputs, runs the backward with a fixed upstream gradient and
clears the gradients.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as _dt
import itertools
import json
import math
import os
import platform
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

COLUMNS = [
    "suite", "kernel", "provider", "mode", "dtype", "shape", "x_name", "x_value", "metric", "unit",
    "p50", "p20", "p80", "config", "device", "torch", "triton", "timestamp",
]  # fmt: skip

# metrics where higher is better; the summary's ratios and the plots use these
THROUGHPUT_METRICS = {"tflops": "TFLOP/s", "gbps": "GB/s", "pairs_per_s": "pairs/s", "words_per_s": "words/s"}

QUANTILES = [0.5, 0.2, 0.8]


# ----------------------------------------------------------------------------- work formulas


def attention_flops(
    batch: int, heads: int, n_q: int, n_k: int, head_dim: int, causal: bool, mode: str
) -> float:
    """Matmul FLOPs of attention: forward 4*B*H*Nq*Nk*D (QK^T and PV, 2 FLOPs per MAC), halved when
    causal; backward 2.5x forward (five matmuls against two); ``fwd+bwd`` 3.5x. ``heads`` counts query
    heads (GQA shares K/V but not the work)."""
    f = 4.0 * batch * heads * n_q * n_k * head_dim
    if causal:
        f *= 0.5
    factor = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}[mode]
    return f * factor


def embedding_bytes(
    tokens: int,
    dim: int,
    vocab: int,
    elem_bytes: int,
    mode: str,
    pos_rows: int = 0,
    index_bytes: int = 8,
) -> float:
    """Minimal HBM traffic of token gather + positional add, in bytes.

    forward: read the ids, gather ``tokens`` rows of the table, read the ``pos_rows`` distinct
    positional rows once, write the output. backward: read the ids and the output gradient, write the
    dense (vocab, dim) weight gradient and the (pos_rows, dim) positional gradient once (accumulation
    is assumed to stay on chip). ``fwd+bwd`` is the sum. This is a lower bound, so GB/s derived from it
    is an "effective" bandwidth comparable to the device's copy bandwidth.
    """
    row = dim * elem_bytes
    fwd = tokens * index_bytes + tokens * row + pos_rows * row + tokens * row
    bwd = tokens * index_bytes + tokens * row + vocab * row + pos_rows * row
    return float({"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode])


# ----------------------------------------------------------------------------- context


def device_tag(device: torch.device | str) -> str:
    """Short directory name for a device: ``h100``, ``a100``, ``rtx4090``, ``cpu``."""
    device = torch.device(device)
    if device.type != "cuda":
        return device.type
    return tag_from_name(torch.cuda.get_device_name(device))


def tag_from_name(name: str) -> str:
    s = name.lower()
    for word in ("nvidia", "geforce", "tesla", "quadro", "amd", "instinct"):
        s = s.replace(word, " ")
    m = re.search(r"\b(rtx\s*[a-z]?\d+\w*|[a-z]+\d+[a-z]*)", s)
    tag = m.group(1) if m else s.strip()
    return re.sub(r"[^a-z0-9]+", "", tag) or "gpu"


@dataclass
class Context:
    """Everything a suite needs to know about this run."""

    device: torch.device
    profile: str = "quick"  # "tiny" (tests), "quick", "full"
    dtypes: list[str] | None = None  # None: the suite's default for the device
    warmup_ms: float = 25.0
    rep_ms: float = 100.0
    n_sets: int = 3  # rotating input sets
    device_name: str = ""
    copy_gbps: float = float("nan")
    matmul_tflops: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    log: Callable[[str], None] = print
    _seen_notes: set = field(default_factory=set)

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    def note(self, msg: str, key: Any = None) -> None:
        """Log ``msg`` once per ``key`` (default: the message) and keep it for env.json."""
        key = msg if key is None else key
        if key in self._seen_notes:
            return
        self._seen_notes.add(key)
        self.notes.append(msg)
        self.log(msg)

    def pick_dtypes(self, default: Sequence[str]) -> list[str]:
        return list(self.dtypes) if self.dtypes else list(default)


DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "fp64": torch.float64}


def versions() -> dict[str, str]:
    try:
        import triton

        tv = triton.__version__
    except Exception:
        tv = ""
    return {"torch": torch.__version__, "triton": tv}


def environment(ctx: Context) -> dict[str, Any]:
    """The env.json payload (everything about the machine a reader needs to trust the numbers)."""
    env: dict[str, Any] = {
        "device": str(ctx.device),
        "device_name": ctx.device_name,
        "device_tag": device_tag(ctx.device),
        **versions(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "profile": ctx.profile,
        "timing": {
            "method": "triton.testing.do_bench" if ctx.is_cuda else "host perf_counter",
            "warmup_ms": ctx.warmup_ms,
            "rep_ms": ctx.rep_ms,
            "quantiles": QUANTILES,
            "rotating_input_sets": ctx.n_sets,
        },
        "copy_bandwidth_gbps": ctx.copy_gbps,
        "matmul_peak_tflops": ctx.matmul_tflops,
        "triton_autotune_cache": os.environ.get("TRITON_CACHE_AUTOTUNING", ""),
        "embedattn_autotune": os.environ.get("EMBEDATTN_AUTOTUNE", "1"),
        "notes": ctx.notes,
    }
    if ctx.is_cuda:
        env["cuda"] = torch.version.cuda
        p = torch.cuda.get_device_properties(ctx.device)
        env["gpu"] = {
            "name": p.name,
            "sm_count": p.multi_processor_count,
            "memory_gib": round(p.total_memory / 2**30, 1),
            "capability": f"{p.major}.{p.minor}",
        }
    return env


# ----------------------------------------------------------------------------- timing


@dataclass
class Timing:
    """Milliseconds per call: median, 20th and 80th percentile."""

    p50: float
    p20: float
    p80: float


def rotating(fn: Callable[..., Any], sets: Sequence[Sequence[Any]]) -> Callable[[], Any]:
    """A no-argument closure that calls ``fn(*sets[i])`` with i cycling over the sets."""
    it = itertools.cycle(range(len(sets)))
    return lambda: fn(*sets[next(it)])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def host_timer(fn: Callable[[], Any], warmup_ms: float, rep_ms: float, min_reps: int = 3,
               max_reps: int = 1000, device: torch.device | None = None) -> Timing:  # fmt: skip
    """Wall-clock per call on the host: one untimed call, warm-up for ``warmup_ms``, then calls until
    ``rep_ms`` has passed (at least ``min_reps``). Returns median, p20, p80 in ms."""
    dev = device or torch.device("cpu")
    fn()
    _sync(dev)
    t_end = time.perf_counter() + warmup_ms / 1e3
    while time.perf_counter() < t_end:
        fn()
        _sync(dev)
    times: list[float] = []
    t_end = time.perf_counter() + rep_ms / 1e3
    while len(times) < min_reps or (time.perf_counter() < t_end and len(times) < max_reps):
        t0 = time.perf_counter()
        fn()
        _sync(dev)
        times.append((time.perf_counter() - t0) * 1e3)
    return summarize(times)


def summarize(times_ms: Sequence[float]) -> Timing:
    t = torch.tensor(list(times_ms), dtype=torch.float64)
    q = torch.quantile(t, torch.tensor(QUANTILES, dtype=torch.float64)).tolist()
    return Timing(*q)


def time_fn(ctx: Context, fn: Callable[[], Any], grad_to_none: Sequence[torch.Tensor] | None = None) -> Timing:
    """Time ``fn`` on the context's device (do_bench on CUDA, host timer otherwise)."""
    if ctx.is_cuda:
        try:
            import triton.testing
        except Exception:  # no Triton: CUDA events through the host timer are still honest
            return host_timer(fn, ctx.warmup_ms, ctx.rep_ms, device=ctx.device)
        q = triton.testing.do_bench(
            fn, warmup=ctx.warmup_ms, rep=ctx.rep_ms, grad_to_none=grad_to_none, quantiles=QUANTILES
        )
        return Timing(*q)

    if grad_to_none:
        inner = fn

        def fn():  # same contract as do_bench: gradients do not accumulate across calls
            for t in grad_to_none:
                t.grad = None
            return inner()

    return host_timer(fn, ctx.warmup_ms, ctx.rep_ms)


def peak_memory_mib(ctx: Context, fn: Callable[[], Any]) -> float:
    """Peak CUDA memory allocated by one call of ``fn`` above what was allocated before it (MiB).
    NaN on CPU (torch has no CPU allocator statistics)."""
    if not ctx.is_cuda:
        return float("nan")
    torch.cuda.synchronize(ctx.device)
    base = torch.cuda.memory_allocated(ctx.device)
    torch.cuda.reset_peak_memory_stats(ctx.device)
    fn()
    torch.cuda.synchronize(ctx.device)
    return (torch.cuda.max_memory_allocated(ctx.device) - base) / 2**20


def run_points(ctx: Context, name: str, todo: Sequence[Sequence[Any]], run: Callable[..., Any],
               max_seconds: float | None, t_start: float) -> int:
    """A point-by-point script's main loop: ``run(*point)`` for each point of ``todo`` in order, none started once
    ``max_seconds`` (None: no budget) have passed since ``t_start``; Ctrl-C ends the loop (the rows so far are
    in the CSV). Then the context's notes and a ``<name>: done of total points`` line. Returns how many ran."""
    done = 0
    try:
        for point in todo:
            if max_seconds is not None and time.time() - t_start > max_seconds:
                print(f"{name}: budget spent, {len(todo) - done} points left", flush=True)
                break
            run(*point)
            done += 1
    except KeyboardInterrupt:
        print(f"{name}: interrupted: the rows so far are in the CSV", flush=True)
    for note in ctx.notes:
        print(note, flush=True)
    print(f"{name}: {done} of {len(todo)} points in {time.time() - t_start:.0f} s", flush=True)
    return done


MODES = ("fwd", "bwd", "fwd+bwd")  # what run_speed_benchmark times; "step" is a no-autograd call like "fwd"


def run_speed_benchmark(
    ctx: Context,
    forward: Callable[..., Any],
    inputs: Sequence[Sequence[Any]],
    mode: str,
    *,
    grad_outputs: Sequence[torch.Tensor | None] | None = None,
    grad_inputs: Sequence[int] = (),
    params: Sequence[torch.Tensor] = (),
    op: str | None = None,
) -> tuple[Timing, float]:
    """Time one provider in one mode; the one fwd / bwd / fwd+bwd runner every suite calls.

    ``forward(*inputs[i], *params)`` is called with i rotating over the input sets.

    - ``fwd`` and ``step``: that call as it is, on the tensors as given (no autograd; a step that
      updates ``params`` in place updates the tensors the caller passed).
    - ``bwd``: the backward alone. One forward per set runs before timing and keeps its graph; each
      call is ``out.backward(grad, retain_graph=True)``.
    - ``fwd+bwd``: forward then backward in each call.

    The backward gets a fixed upstream gradient: ``grad_outputs[i]`` for set i (None, or no list:
    the output is a scalar loss). Gradients flow to the positions ``grad_inputs`` of every set (e.g.
    q, k, v) and to every tensor of ``params`` (shared by all sets, e.g. the tables); the runner
    makes detached copies that require grad and sets their ``.grad`` to None before every call (as
    do_bench's ``grad_to_none``), so gradients never accumulate, and again once measured.
    ``op``: the embedattn op (``"attention"``, ...) whose recorded autotune configs are forgotten
    before timing, so ``chosen_config(op)`` then names this measurement's.

    Returns the timing and the peak memory of one more call (MiB above the baseline; NaN on CPU).
    """
    fn, leaves = speed_closure(forward, inputs, mode, grad_outputs=grad_outputs, grad_inputs=grad_inputs,
                               params=params)  # fmt: skip
    if op:
        reset_configs(op)
    timing = time_fn(ctx, fn, grad_to_none=leaves or None)
    for t in leaves:
        t.grad = None
    peak = peak_memory_mib(ctx, fn)
    for t in leaves:
        t.grad = None
    return timing, peak


@dataclass
class Workload:
    """One provider's call at one point, as ``run_speed_benchmark`` takes it (what ``benchmarks.tune`` times)."""

    forward: Callable[..., Any]
    inputs: Sequence[Sequence[Any]]
    grad_outputs: Sequence[torch.Tensor | None] | None = None
    grad_inputs: Sequence[int] = ()
    params: Sequence[torch.Tensor] = ()

    def closure(self, mode: str) -> tuple[Callable[[], Any], list[torch.Tensor]]:
        """``speed_closure`` of this call in ``mode``."""
        return speed_closure(self.forward, self.inputs, mode, grad_outputs=self.grad_outputs,
                             grad_inputs=self.grad_inputs, params=self.params)  # fmt: skip


def speed_closure(forward: Callable[..., Any], inputs: Sequence[Sequence[Any]], mode: str, *,
                  grad_outputs: Sequence[torch.Tensor | None] | None = None, grad_inputs: Sequence[int] = (),
                  params: Sequence[torch.Tensor] = ()) -> tuple[Callable[[], Any], list[torch.Tensor]]:
    """``run_speed_benchmark``'s call of one ``mode`` (its arguments, same meaning) as a no-argument closure, and
    the leaves whose ``.grad`` the timer clears between calls. A ``bwd`` closure runs one forward per set now."""
    if mode in ("fwd", "step"):
        leaves: list[torch.Tensor] = []
        fn = rotating(forward, [(*s, *params) for s in inputs])
    elif mode in ("bwd", "fwd+bwd"):
        shared = [t.detach().requires_grad_() for t in params]
        sets = [tuple(t.detach().requires_grad_() if i in grad_inputs else t for i, t in enumerate(s)) + tuple(shared)
                for s in inputs]  # fmt: skip
        leaves = shared + [s[i] for s in sets for i in grad_inputs]
        grads = list(grad_outputs) if grad_outputs is not None else [None] * len(sets)
        if len(grads) != len(sets):
            raise ValueError(f"{len(grads)} grad_outputs for {len(sets)} input sets")
        if mode == "bwd":
            outs = [(forward(*s), g) for s, g in zip(sets, grads)]
            fn = rotating(lambda out, g: out.backward(g, retain_graph=True), outs)
        else:
            fn = rotating(lambda g, *s: forward(*s).backward(g), [(g, *s) for s, g in zip(sets, grads)])
    else:
        raise ValueError(f"unknown mode {mode!r}; choose from {MODES + ('step',)}")
    return fn, leaves


# ----------------------------------------------------------------------------- device peaks


def measure_copy_bandwidth(ctx: Context, nbytes: int | None = None) -> float:
    """Device-to-device copy bandwidth in GB/s (10^9 bytes/s, read + write counted)."""
    if nbytes is None:
        nbytes = {"tiny": 8 << 20, "quick": 128 << 20}.get(ctx.profile, 256 << 20)
        if ctx.is_cuda:
            nbytes = 1 << 30
    src = torch.empty(nbytes, dtype=torch.uint8, device=ctx.device).fill_(1)
    dst = torch.empty_like(src)
    t = time_fn(ctx, lambda: dst.copy_(src))
    return 2 * nbytes / (t.p50 * 1e-3) / 1e9


def measure_matmul_peak(ctx: Context, dtype: torch.dtype, n: int | None = None) -> float:
    """Dense square matmul throughput in TFLOP/s: the practical compute peak for the attention plots."""
    if n is None:
        n = 8192 if ctx.is_cuda else {"tiny": 128, "quick": 1024}.get(ctx.profile, 2048)
    a = torch.randn(n, n, device=ctx.device).to(dtype)
    b = torch.randn(n, n, device=ctx.device).to(dtype)
    t = time_fn(ctx, lambda: torch.mm(a, b))
    return 2.0 * n**3 / (t.p50 * 1e-3) / 1e12


# ----------------------------------------------------------------------------- which launch config ran
# A row's config cell: "fwd: tuned BLOCK_M=128 BLOCK_N=64 warps=8 stages=3; bwd_dq: heuristic ..." from
# embedattn.configs.last() (what each kernel's last launch ran, and how it was chosen); ops launching outside
# embedattn.configs (the sm90 variants) through their module's last_config(), else their autotuners.

SOURCES = ("tuned", "autotuned", "heuristic", "forced")  # how a config was chosen (tuned(nearest) is tuned)


def format_config(cfg: Any) -> str:
    """``triton.Config`` or a dict -> ``BLOCK_M=128 BLOCK_N=64 warps=4 stages=3``; anything else -> str()."""
    if cfg is None:
        return ""
    if isinstance(cfg, str):
        return cfg
    from embedattn.configs import format_config as spelled

    return spelled(cfg) if isinstance(cfg, dict) or hasattr(cfg, "kwargs") else str(cfg)


def _kernel_module(op: str):
    try:
        import importlib

        return importlib.import_module(f"embedattn.kernels.{op}")
    except Exception:
        return None


def _autotuners(module) -> dict[str, Any]:
    try:
        from triton.runtime.autotuner import Autotuner
    except Exception:
        return {}
    return {name: obj for name, obj in vars(module).items() if isinstance(obj, Autotuner)}


def reset_configs(op: str) -> None:
    """Forget the configs ``op``'s launches recorded, so the next read shows only this measurement's."""
    from embedattn import configs

    configs.forget(op)
    mod = _kernel_module(op)
    if mod is None:
        return
    for tuner in _autotuners(mod).values():
        if hasattr(tuner, "best_config"):
            tuner.best_config = None
    last = getattr(mod, "_LAST_CONFIG", None)  # a module-level record behind last_config(), if any
    if isinstance(last, dict):
        last.clear()


def chosen_config(op: str) -> str:
    """The config cell of ``op``'s last launches (``name: source config; ...``, "" if unknown): what
    ``embedattn.configs.last()`` holds for ``op``'s kernels, else the module's own ``last_config()``, else the
    ``best_config`` of every ``triton.autotune`` object in the module."""
    from embedattn import configs

    ran = [(k.partition(".")[2], v) for k, v in configs.last().items() if k.partition(".")[0] == op]
    if ran:
        return "; ".join(f"{name}: {source} {format_config(cfg)}".rstrip() for name, (source, cfg, _) in ran)
    mod = _kernel_module(op)
    if mod is None:
        return ""
    last = getattr(mod, "last_config", None)
    if callable(last):
        try:
            got = last()
            if isinstance(got, dict):
                return "; ".join(f"{k}: {format_config(v)}" for k, v in got.items() if v is not None)
            return format_config(got)
        except Exception:
            pass
    parts = []
    for name, tuner in sorted(_autotuners(mod).items()):
        cfg = getattr(tuner, "best_config", None)
        if cfg is not None:
            parts.append(f"{name.lstrip('_')}: {format_config(cfg)}")
    return "; ".join(parts)


def point_source(config_cell: str) -> str:
    """How a row's config cell was chosen: ``tuned``/``autotuned``/``heuristic``/``forced`` when every kernel of
    the point agrees, ``mixed`` otherwise, ``""`` when the cell names no source (a peer, a CPU row)."""
    found = set()
    for part in str(config_cell).split(";"):
        words = part.split(":", 1)[-1].split()
        if words and words[0].split("(")[0] in SOURCES:
            found.add(words[0].split("(")[0])
    if not found:
        return ""
    return found.pop() if len(found) == 1 else "mixed"


def enable_autotune_cache() -> str:
    """Make Triton persist autotune results on disk (``TRITON_CACHE_AUTOTUNING=1``, Triton >= 3.4;
    harmless before). Must run before ``embedattn.kernels`` builds its autotuners. Returns a note."""
    os.environ.setdefault("TRITON_CACHE_AUTOTUNING", "1")
    try:
        from triton import knobs  # Triton >= 3.4

        knobs.autotuning.cache = os.environ["TRITON_CACHE_AUTOTUNING"] not in ("0", "", "false")
        return f"triton autotune cache: {knobs.autotuning.cache} (dir {knobs.cache.dir})"
    except Exception:
        return "triton autotune cache: not supported by this Triton (configs are re-tuned per process)"


# ----------------------------------------------------------------------------- rows and CSV


class Recorder:
    """Builds rows with the run-wide columns filled in and appends them to ``results.csv``."""

    def __init__(self, ctx: Context, path: str | None):
        self.ctx = ctx
        self.path = path
        self.rows: list[dict[str, Any]] = []
        self._common = {
            "device": ctx.device_name or str(ctx.device),
            **versions(),
            "timestamp": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            with open(path, "w", newline="") as f:
                csv.DictWriter(f, COLUMNS).writeheader()

    def row(self, **kw: Any) -> dict[str, Any]:
        r = {c: "" for c in COLUMNS}
        r.update(self._common)
        r.update(kw)
        unknown = set(r) - set(COLUMNS)
        if unknown:
            raise KeyError(f"unknown CSV columns {sorted(unknown)}")
        return r

    def add(self, rows: Sequence[dict[str, Any]]) -> None:
        """Append rows (written at once, so an interrupted sweep keeps what it measured)."""
        self.rows.extend(rows)
        if self.path and rows:
            with open(self.path, "a", newline="") as f:
                csv.DictWriter(f, COLUMNS).writerows(_fmt(r) for r in rows)


def _fmt(r: dict[str, Any]) -> dict[str, Any]:
    out = dict(r)
    for k in ("p50", "p20", "p80"):
        v = out[k]
        if isinstance(v, float):
            out[k] = "" if math.isnan(v) else f"{v:.6g}"
    return out


def measurement_rows(
    rec: Recorder,
    base: dict[str, Any],
    timing: Timing,
    work: float | None,
    metric: str,
    scale: float = 1.0,
    peak_mib: float = float("nan"),
    extra: Callable[[float], tuple[str, str, float]] | None = None,
) -> list[dict[str, Any]]:
    """Rows for one measurement: ``ms``, the throughput ``metric`` (``work * scale / seconds``),
    ``peak_mem`` (MiB, CUDA only) and optionally ``extra(throughput) -> (metric, unit, value)``
    applied to each quantile (e.g. the fraction of copy bandwidth)."""
    rows = [rec.row(**base, metric="ms", unit="ms", p50=timing.p50, p20=timing.p20, p80=timing.p80)]
    if work is not None:
        def thr(ms: float) -> float:
            return work * scale / (ms * 1e-3)

        q = (thr(timing.p50), thr(timing.p80), thr(timing.p20))  # p20 of throughput = p80 of time
        rows.append(rec.row(**base, metric=metric, unit=THROUGHPUT_METRICS.get(metric, metric),
                            p50=q[0], p20=q[1], p80=q[2]))  # fmt: skip
        if extra is not None:
            vals = [extra(v) for v in q]
            name, unit = vals[0][0], vals[0][1]
            rows.append(rec.row(**base, metric=name, unit=unit, p50=vals[0][2], p20=vals[1][2], p80=vals[2][2]))
    if not math.isnan(peak_mib):
        rows.append(rec.row(**base, metric="peak_mem", unit="MiB", p50=peak_mib, p20=peak_mib, p80=peak_mib))
    return rows


class ResultsError(ValueError):
    """A results.csv that cannot be read: missing, empty, short of a column, or with a bad number."""


# the columns the plots and the summary read (shape and the run-wide columns are informational)
REQUIRED_COLUMNS = [c for c in COLUMNS if c not in ("shape", "device", "torch", "triton", "timestamp")]


def read_csv(path: str) -> list[dict[str, Any]]:
    """Rows of a results.csv with p50/p20/p80 as floats (NaN when empty) and x_value a float ("" when
    empty). Raises ``ResultsError``, saying where, for a file that is missing, unreadable or empty, lacks
    a needed column, has a row of the wrong length or a value that is not a number."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            rows = []
            for r in reader:
                r["_line"] = reader.line_num
                rows.append(r)
    except FileNotFoundError:
        raise ResultsError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise ResultsError(f"{path}: cannot read it as a CSV: {e}") from None
    if not header:
        raise ResultsError(f"{path}: empty file (no header row)")
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        raise ResultsError(f"{path}: missing column(s) {', '.join(missing)} (is it a results.csv?)")
    if not rows:
        raise ResultsError(f"{path}: no rows below the header")
    for r in rows:
        line = r.pop("_line")
        if None in r or None in r.values():  # DictReader's markers for too many / too few fields
            raise ResultsError(f"{path}, line {line}: the row's field count differs from the header's ({len(header)})")
        for k in ("p50", "p20", "p80", "x_value"):
            v = r[k].strip()
            if v == "":
                r[k] = "" if k == "x_value" else float("nan")
                continue
            try:
                r[k] = float(v)
            except ValueError:
                raise ResultsError(f"{path}, line {line}: {k} is not a number: {v!r}") from None
    return rows


def write_json(path: str, payload: dict[str, Any]) -> None:
    with open(path, "w") as f:
        json.dump(payload, f, indent=2, default=str)
        f.write("\n")


def coarse_first(items: list, size: Callable[[Any], float], group: Callable[[Any], Any] = lambda _: 0) -> list:
    """Reorder a sweep so every variant first runs at every other size (largest included), then the
    sizes in between: a time budget that cuts from the end still leaves each curve its full range.
    ``group`` keeps coarser priorities (e.g. the dtype) ahead of that."""
    xs = sorted({size(it) for it in items})
    coarse = set(xs[::-2])
    order = {id(it): i for i, it in enumerate(items)}
    return sorted(items, key=lambda it: (group(it), size(it) not in coarse, order[id(it)]))


# ----------------------------------------------------------------------------- providers


@dataclass
class Case:
    """One point of a sweep: ``run(ctx, rec)`` measures every provider at it and returns rows."""

    suite: str
    label: str
    run: Callable[[Context, Recorder], list[dict[str, Any]]]
    weight: float = 1.0  # rough relative cost, for the progress bar / budget
    dtype: str = ""  # the dtype the point runs in ("" when it has none of its own)


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def try_measure(ctx: Context, what: str, key: Any, fn: Callable[[], list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Run one provider's measurement; on failure note why (once per ``key``) and return no rows."""
    try:
        return fn()
    except Exception as e:  # unsupported backend/shape, OOM: the sweep goes on without this point
        msg = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        ctx.note(f"  skip {what}: {type(e).__name__}: {msg}", key=(key, type(e).__name__))
        if is_oom(e):
            torch.cuda.empty_cache()
    return []


@dataclass
class Provider:
    """One implementation a suite times at each of its points; ``fn`` takes the suite's inputs."""

    name: str
    fn: Callable[..., Any]
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext  # around each measurement
    config: Callable[[], str] = lambda: ""
    materializes: bool = False  # builds an N x N score matrix (capped on the GPU by the attention suite)


def measure_providers(ctx: Context, suite: str, point: str, provs: Sequence[Provider],
                      measure: Callable[[Provider, str], list[dict[str, Any]]], modes: Sequence[str] = MODES,
                      skip: Callable[[Provider], str | None] = lambda p: None) -> list[dict[str, Any]]:
    """Every provider in every mode at one point: ``measure(p, mode)``'s rows. A provider that fails goes
    on as a note (``try_measure``); one ``skip`` names a reason for is noted and not run."""
    rows: list[dict[str, Any]] = []
    for p in provs:
        why = skip(p)
        if why:
            ctx.note(f"  {p.name}: {why}", key=(p.name, why))
            continue
        for mode in modes:
            rows += try_measure(ctx, f"{suite} {p.name} {mode} {point}", (p.name, mode, point),
                                lambda p=p, mode=mode: measure(p, mode))  # fmt: skip
    return rows


def probe(what: str, call: Callable[[], Any]) -> str | None:
    """None when ``call()`` (the op on a tiny input) runs, else why its suite is skipped."""
    try:
        call()
    except Exception as e:
        return f"{what} failed on a tiny input: {type(e).__name__}: {e}"
    return None
