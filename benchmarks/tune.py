"""python -m benchmarks.tune: tune every kernel's launch config per shape bucket; write this device's config table.

    python -m benchmarks.tune --device cuda --max-seconds 120 --dtype bf16   # -> embedattn/configs/<device>.json
    python -m benchmarks.tune --list --device-name "NVIDIA H200"              # the key grid; what the table lacks

The grid is the launchers' lookup keys at the benchmark sweep's shapes (``embedattn.configs`` documents the keys):
attention length buckets x head dims x causal x dtypes (and the sweep's feature flags), embedding row widths x
token buckets, negative-sampling row widths x K. Keys run most telling first (every other size, largest first,
then the sizes between: a budget that cuts from the end leaves each curve its range, and the launchers take the
nearest bucket for what was cut).

Per key: the kernel's own candidates (its autotune list, pruned as its autotuner prunes) and the launcher's
heuristic config are compiled in parallel on the machine's CPU cores (a pool of processes filling Triton's
on-disk cache, ``--compile-workers``), then each is timed with ``triton.testing.do_bench`` (median) through the
real launcher, the other kernels of that launch at their heuristic configs. The fastest is the entry; its time,
the runner-up's and the heuristic's are kept beside it. A config that fails to compile or to launch is counted,
never fatal. Keys already in the table stay unless ``--retune``.

The table (``--out``/<device key>.json, default the package's ``embedattn/configs/``) starts from the shipped
table (plus ``EMBEDATTN_CONFIGS_DIR``) and the file already at ``--out``, and is rewritten after every key: a run
stopped by ``--max-seconds`` (or SIGINT) keeps what it finished and lists what it skipped. The budget is shared
between the suites like ``python -m benchmarks`` does (time a suite leaves unused passes to the next).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import shlex
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from .cli import ArgumentParser, check_out_dir, fail, non_negative_float, positive_float, suites_and_dtypes

PROG = "python -m benchmarks.tune"
SUITES = ("attention", "embedding", "negative_sampling")
DTYPES = ("fp16", "bf16", "fp32")
DEFAULT_DTYPES = {"attention": ["bf16", "fp16"], "embedding": ["bf16"], "negative_sampling": ["fp32"]}
# share of a --max-seconds budget per suite; what a suite leaves unused passes to the next ones
SHARE = {"attention": 0.6, "embedding": 0.25, "negative_sampling": 0.15}


# ---------------------------------------------------------------------------------------------------- the key grid


@dataclass(frozen=True)
class Target:
    """One (kernel, key) to tune, and the shape its inputs are built at. Picklable (sent to compile workers)."""

    suite: str
    kernel: str
    key: tuple  # normalized key items
    shape: tuple  # (name, value) items the suite's input builder reads

    @staticmethod
    def make(suite: str, kernel: str, key: dict, **shape: Any) -> Target:
        from embedattn.configs import normalize_key

        return Target(suite, kernel, tuple(normalize_key(key).items()), tuple(sorted(shape.items())))

    @property
    def ks(self) -> str:
        from embedattn.configs import key_string

        return key_string(dict(self.key))

    @property
    def label(self) -> str:
        return f"{self.kernel} {self.ks}"

    @property
    def shape_dict(self) -> dict:
        return dict(self.shape)

    @property
    def group(self) -> tuple:
        """What a compile depends on: the kernel and the key without its bucket fields."""
        from embedattn.configs import BUCKET_FIELDS

        return (self.kernel,) + tuple((k, v) for k, v in self.key if k not in BUCKET_FIELDS)

    def describe(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.shape if v != "")


def _passes(shapes: list[dict], size: str, order: list[int]) -> list[dict]:
    """``shapes`` pass by pass, one size per pass in ``order`` (every group of the others gets that size before
    any group gets the next): a budget that cuts from the end leaves every group a tuned bucket to be nearest to."""
    rank = {n: i for i, n in enumerate(order)}
    pos = {id(s): i for i, s in enumerate(shapes)}
    return sorted(shapes, key=lambda s: (rank.get(s[size], len(order)), pos[id(s)]))


# the sweep's attention feature cases (benchmarks/attention.py FEATURES): the flags each leaves on, causal included
ATTN_FEATURES = {
    "window": {"WINDOW": True},  # causal is folded into the window (no right side)
    "softcap": {"CAUSAL": True, "SOFTCAP": True},
    "alibi": {"CAUSAL": True, "ALIBI": True},
    "dropout": {"CAUSAL": True, "DROPOUT": True},
    "varlen": {"CAUSAL": True, "VARLEN": True},
}


def attention_targets(dtypes: list[str], tiny: bool = False) -> list[Target]:
    """The sweep's attention shapes (B*N tokens and H*D fixed) at every dtype, head dim and causal, then the
    feature cases at the first dtype; fwd, bwd_dkdv and bwd_dq per shape (varlen: fwd only)."""
    from embedattn.configs import attention_key

    if tiny:
        ns, dims, tokens, width = [64, 32], [16], 64, 32
    else:  # the middle first, then the ends, then the sizes between
        ns, dims, tokens, width = [4096, 16384, 1024, 8192, 2048, 512], [128, 64, 256], 16384, 2048
    shapes = [dict(dtype=dt, b=max(1, tokens // n), h=max(1, width // d), n=n, d=d, causal=int(c), feature="")
              for dt in dtypes for d in dims for c in (False, True) for n in ns]  # fmt: skip
    ordered = _passes(shapes, "n", ns)
    feats = []
    if not tiny:
        for feat in ATTN_FEATURES:
            for n in (8192, 2048):
                feats.append(dict(dtype=dtypes[0], b=max(1, tokens // n), h=width // 128, n=n, d=128, causal=1,
                                  feature=feat))  # fmt: skip
    cut = sum(1 for s in ordered if s["n"] in ns[:2])  # the feature cases after the first two passes
    ordered = ordered[:cut] + feats + ordered[cut:]
    out = []
    for s in ordered:
        flags = dict(ATTN_FEATURES[s["feature"]]) if s["feature"] else {"CAUSAL": bool(s["causal"])}
        key = attention_key(s["dtype"], s["d"], s["n"], s["n"], flags)
        kernels = ["attention.fwd"] + ([] if s["feature"] == "varlen" else ["attention.bwd_dkdv", "attention.bwd_dq"])
        out += [Target.make("attention", k, key, **s) for k in kernels]
    return out


def embedding_targets(dtypes: list[str], tiny: bool = False) -> list[Target]:
    """The sweep's embedding shapes: forward (learned positions), the table gradient the public op uses for the
    dtype (sorted for 16-bit tables, atomic for fp32) and the positional gradient."""
    from embedattn.configs import embedding_key

    if tiny:
        vocab, dims, tokens, seq = 100, [16], [64, 32], 16
    else:  # the largest (the bandwidth target), the smallest (launch-bound), then between
        vocab, dims, tokens, seq = 32768, [768, 4096], [65536, 8192, 32768, 16384], 2048
    shapes = [dict(dtype=dt, vocab=vocab, d=d, tokens=t, seq=min(seq, t)) for dt in dtypes for d in dims
              for t in tokens]  # fmt: skip
    ordered = _passes(shapes, "tokens", tokens)
    out = []
    for s in ordered:
        scatter = "embedding.bwd_atomic" if s["dtype"] == "fp32" else "embedding.bwd_sorted"
        out.append(Target.make("embedding", "embedding.fwd", embedding_key(s["dtype"], s["d"], s["tokens"], 1), **s))
        out += [Target.make("embedding", k, embedding_key(s["dtype"], s["d"], s["tokens"]), **s)
                for k in (scatter, "embedding.bwd_pos")]  # fmt: skip
    return out


def negative_sampling_targets(dtypes: list[str], tiny: bool = False) -> list[Target]:
    """The sweep's row widths at K = 5, timed at one large batch (the key has no batch size)."""
    from embedattn.configs import negative_sampling_key

    vocab, dims, pairs = (100, [16], 64) if tiny else (100_000, [128, 300], 262_144)
    out = []
    for dt in dtypes:
        for d in dims:
            s = dict(dtype=dt, vocab=vocab, d=d, k=5, pairs=pairs)
            out.append(Target.make("negative_sampling", "negative_sampling.fwd",
                                   negative_sampling_key(dt, d, 5), **s))  # fmt: skip
            out.append(Target.make("negative_sampling", "negative_sampling.bwd",
                                   negative_sampling_key(dt, d, 5, sparse=False), **s))  # fmt: skip
    return out


PLANS = {"attention": attention_targets, "embedding": embedding_targets,
         "negative_sampling": negative_sampling_targets}  # fmt: skip


def plan(suites: Iterable[str], dtypes: list[str] | None = None, tiny: bool = False) -> list[Target]:
    """Every target of ``suites``, suite by suite, most telling first."""
    out: list[Target] = []
    for s in suites:
        out += PLANS[s](list(dtypes) if dtypes else DEFAULT_DTYPES[s], tiny)
    return out


# ---------------------------------------------------------------------------------------------------- candidates


def _dedupe(configs: Iterable[dict]) -> list[dict]:
    from embedattn.configs import format_config

    seen, out = set(), []
    for c in configs:
        f = format_config(c)
        if f not in seen:
            seen.add(f)
            out.append(dict(c))
    return out


def candidates(t: Target) -> list[dict]:
    """The kernel's own candidate configs for ``t`` (its autotune list, pruned as its autotuner prunes)."""
    from types import SimpleNamespace

    import torch
    import triton

    from embedattn.configs import as_dict

    from .harness import DTYPES as TORCH_DTYPES

    s = t.shape_dict
    if t.suite == "attention":
        from embedattn.kernels import attention as KA

        elt = torch.empty((), dtype=TORCH_DTYPES[s["dtype"]]).element_size()
        named = {"Q": SimpleNamespace(element_size=lambda: elt)}
        block_d = max(16, triton.next_power_of_2(s["d"]))
        if t.kernel == "attention.fwd":
            cs = KA._prune_fwd(KA._fwd_configs(), named, BLOCK_D=block_d)
        else:
            cs = KA._prune_bwd(KA._bwd_configs(), named, BLOCK_D=block_d)
        return _dedupe(as_dict(c) for c in cs)
    if t.suite == "embedding":
        from embedattn.kernels import embedding as KE

        space = KE._sorted_configs() if t.kernel == "embedding.bwd_sorted" else KE._configs()
        return _dedupe(as_dict(c) for c in KE._prune(space, {"D": s["d"]}))
    if t.suite == "negative_sampling":
        from embedattn.kernels import negative_sampling as KN

        block_k = triton.next_power_of_2(s["k"] + 1)
        return _dedupe(dict(as_dict(c), BLOCK_K=block_k) for c in KN._configs())
    raise ValueError(f"unknown suite {t.suite!r}")


# ---------------------------------------------------------------------------------------------------- inputs


def _attention_calls(s: dict, device, real: bool) -> dict[str, Callable[[], Any]]:
    import torch

    from embedattn import configs
    from embedattn.kernels import attention as KA

    from .harness import DTYPES as TORCH_DTYPES

    dtype = TORCH_DTYPES[s["dtype"]]
    B, H, N, D = s["b"], s["h"], s["n"], s["d"]
    g = torch.Generator(device=device).manual_seed(N * 131 + D)

    def r():
        return torch.randn(B, H, N, D, device=device, dtype=dtype, generator=g)

    q, k, v, do = r(), r(), r(), r()
    causal, feature, scale = bool(s["causal"]), s.get("feature", ""), D**-0.5
    kw: dict[str, Any] = {}
    if feature == "window":
        kw["window"] = (1024, 0)
    elif feature == "softcap":
        kw["softcap"] = 30.0
    elif feature == "alibi":
        kw["alibi"] = torch.tensor([2.0 ** (-8 * (i + 1) / H) for i in range(H)], device=device)
    elif feature == "dropout":
        kw.update(dropout_p=0.1, seed=torch.zeros(1, dtype=torch.int64, device=device))
    if feature == "varlen":
        def pack(t):
            return t.transpose(1, 2).reshape(B * N, H, D).contiguous()

        qp, kp, vp = pack(q), pack(k), pack(v)
        cu = torch.arange(0, (B + 1) * N, N, device=device, dtype=torch.int32)
        return {"attention.fwd": lambda: KA.varlen_forward(qp, kp, vp, cu, cu, N, N, causal, scale, **kw)}

    def fwd():
        return KA.attention_forward(q, k, v, None, causal, 0, scale, **kw)

    if real:  # the backward's timing depends on a real log-sum-exp
        with configs.tuning():
            o, lse = fwd()
    else:  # compile workers: only shapes, dtypes and strides matter
        o, lse = torch.empty_like(q), torch.zeros(B, H, N, device=device, dtype=torch.float32)

    def bwd():
        return KA.attention_backward(do, q, k, v, o, lse, None, causal, 0, scale, **kw)

    return {"attention.fwd": fwd, "attention.bwd_dkdv": bwd, "attention.bwd_dq": bwd}


def _embedding_calls(s: dict, device, real: bool) -> dict[str, Callable[[], Any]]:
    import torch

    from embedattn.kernels import embedding as KE

    from .harness import DTYPES as TORCH_DTYPES

    dtype = TORCH_DTYPES[s["dtype"]]
    V, D, T, S = s["vocab"], s["d"], s["tokens"], s["seq"]
    g = torch.Generator(device=device).manual_seed(V + D + T)
    ids = torch.randint(0, V, (T,), device=device, generator=g)
    w = torch.randn(V, D, device=device, dtype=dtype, generator=g)
    pw = torch.randn(S, D, device=device, dtype=dtype, generator=g)
    grad = torch.randn(T, D, device=device, dtype=dtype, generator=g)

    def scatter():
        return KE.scatter_grad(grad, ids, V, deterministic=dtype != torch.float32)

    return {
        "embedding.fwd": lambda: KE.embedding_forward(ids, w, pw, None, n=S, pos_mode=KE.POS_LEARNED, scale=1.0,
                                                      offset=0),  # fmt: skip
        "embedding.bwd_atomic": scatter,
        "embedding.bwd_sorted": scatter,
        "embedding.bwd_pos": lambda: KE.positional_grad(grad, S, n=S, offset=0),
    }


def _negative_sampling_calls(s: dict, device, real: bool) -> dict[str, Callable[[], Any]]:
    import torch

    from embedattn import configs
    from embedattn.kernels import negative_sampling as KN

    from .harness import DTYPES as TORCH_DTYPES

    dtype = TORCH_DTYPES[s["dtype"]]
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    V, D, K, B = s["vocab"], s["d"], s["k"], s["pairs"]
    g = torch.Generator(device=device).manual_seed(B + D)
    center = torch.randint(0, V, (B,), device=device, generator=g)
    context = torch.randint(0, V, (B,), device=device, generator=g)
    negatives = torch.randint(0, V, (B, K), device=device, generator=g)
    w_in = ((torch.rand(V, D, device=device, generator=g) - 0.5) / D).to(dtype)
    w_out = (torch.randn(V, D, device=device, generator=g) * 0.1).to(dtype)

    def fwd():
        return KN.negative_sampling_forward(center, context, negatives, w_in, w_out)

    if real:
        with configs.tuning():
            _, coef = fwd()
    else:
        coef = torch.zeros(B, K + 1, device=device, dtype=acc)
    grad = torch.full((B,), 1.0 / B, device=device, dtype=acc)
    return {"negative_sampling.fwd": fwd,
            "negative_sampling.bwd": lambda: KN.negative_sampling_backward(center, context, negatives, w_in, w_out,
                                                                           coef, grad)}  # fmt: skip


CALLS = {"attention": _attention_calls, "embedding": _embedding_calls, "negative_sampling": _negative_sampling_calls}


@dataclass
class Bench:
    """A target with its inputs on the device: ``call()`` runs the launcher that launches ``target.kernel``."""

    target: Target
    call: Callable[[], Any]


class Inputs:
    """The inputs of the last few shapes (fwd and bwd targets of one shape share them)."""

    def __init__(self, device, real: bool, keep: int = 2):
        self.device, self.real, self.keep = device, real, keep
        self._cache: OrderedDict[tuple, dict] = OrderedDict()

    def bench(self, t: Target) -> Bench:
        ident = (t.suite, t.shape)
        if ident not in self._cache:
            while len(self._cache) >= self.keep:
                self._cache.popitem(last=False)
            self._cache[ident] = CALLS[t.suite](t.shape_dict, self.device, self.real)
        self._cache.move_to_end(ident)
        return Bench(t, self._cache[ident][t.kernel])


# ---------------------------------------------------------------------------------------------------- compiling


@contextlib.contextmanager
def compile_only():
    """Triton kernels called inside compile (into the in-memory and on-disk caches) but do not launch: every
    ``JITFunction.run`` becomes its ``warmup=True`` form. For the compile workers, which are single-threaded."""
    from triton.runtime.jit import JITFunction

    original = JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        return original(self, *args, grid=grid, warmup=True, **kwargs)

    JITFunction.run = run
    try:
        yield
    finally:
        JITFunction.run = original


_WORKER: dict[str, Any] = {}


def _worker_init(device: str) -> None:
    os.environ.pop("TRITON_INTERPRET", None)
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    _WORKER["inputs"] = Inputs(dev, real=False, keep=2)


def _compile_job(target: Target, config: dict) -> str | None:
    """In a worker: compile ``target``'s launch with ``config`` (no launch). None, or the error's first line."""
    from embedattn import configs

    try:
        bench = _WORKER["inputs"].bench(target)
        with compile_only(), configs.tuning(target.kernel, config):
            bench.call()
        return None
    except Exception as e:
        text = str(e).strip()
        return f"{type(e).__name__}: {text.splitlines()[0][:200]}" if text else type(e).__name__


# ---------------------------------------------------------------------------------------------------- backends


class DeviceBackend:
    """Builds the inputs on ``device``, compiles candidates in a pool of processes, times with do_bench (CUDA) or
    the host timer (CPU: Triton's interpreter, only to check the plumbing; its times mean nothing)."""

    def __init__(self, device, *, warmup_ms: float = 5.0, rep_ms: float = 20.0, workers: int = 0,
                 log: Callable[[str], None] = print):  # fmt: skip
        import torch

        self.device = torch.device(device)
        self.is_cuda = self.device.type == "cuda"
        if self.is_cuda and self.device.index is None:  # the workers set this device: it needs its index
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.name = torch.cuda.get_device_name(self.device) if self.is_cuda else "cpu"
        self.warmup_ms, self.rep_ms, self.log = warmup_ms, rep_ms, log
        self.workers = workers if self.is_cuda else 0
        self.batch_jobs = max(1, 4 * self.workers)
        self._inputs = Inputs(self.device, real=True)
        self._pool = None

    def bench(self, t: Target) -> Bench:
        return self._inputs.bench(t)

    def time(self, bench: Bench, kernel: str, config: dict) -> float:
        import torch

        from embedattn import configs

        with configs.tuning(kernel, config):
            if not self.is_cuda:  # the interpreter: one call checks the plumbing (its time means nothing)
                t0 = time.perf_counter()
                bench.call()
                return (time.perf_counter() - t0) * 1e3
            bench.call()  # compile (or load from the disk cache) outside the timing; errors surface here
            torch.cuda.synchronize(self.device)
            import triton.testing

            return float(triton.testing.do_bench(bench.call, warmup=self.warmup_ms, rep=self.rep_ms,
                                                 return_mode="median"))  # fmt: skip

    def precompile(self, jobs: list[tuple[Target, dict]], timeout_s: float) -> dict[tuple, str | None]:
        """Compile ``jobs`` in the pool, waiting at most ``timeout_s``: {(group, config): None or error}."""
        if not jobs or self.workers <= 0:
            return {}
        from concurrent.futures import wait

        from embedattn.configs import format_config

        try:
            if self._pool is None:
                import multiprocessing
                from concurrent.futures import ProcessPoolExecutor

                self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                                 initializer=_worker_init, initargs=(str(self.device),))  # fmt: skip
            futures = {self._pool.submit(_compile_job, t, c): (t.group, format_config(c)) for t, c in jobs}
        except Exception as e:
            self.log(f"  compile pool unavailable ({type(e).__name__}: {e}): compiling at first launch instead")
            self.workers = 0
            return {}
        done, pending = wait(futures, timeout=max(0.0, timeout_s) if math.isfinite(timeout_s) else None)
        for f in pending:
            f.cancel()
        out: dict[tuple, str | None] = {}
        for f in done:
            try:
                out[futures[f]] = f.result()
            except Exception as e:  # a worker died (e.g. out of memory): the main process compiles instead
                out[futures[f]] = f"{type(e).__name__}: {e}"
        return out

    def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is None:
            return
        procs = list(getattr(pool, "_processes", {}).values())
        with contextlib.suppress(Exception):
            pool.shutdown(wait=False, cancel_futures=True)
        for p in procs:  # a compile in flight when the budget ran out is not waited for
            with contextlib.suppress(Exception):
                p.terminate()
        for p in procs:
            with contextlib.suppress(Exception):
                p.join(timeout=5)


# ---------------------------------------------------------------------------------------------------- tuning


@dataclass
class Outcome:
    tuned: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    unwired: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    interrupted: bool = False


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:160]}" if text else type(e).__name__


def tune(targets: list[Target], backend, table: dict, *, save: Callable[[dict], None] | None = None,
         budget_s: float | None = None, clock: Callable[[], float] = time.monotonic,
         log: Callable[[str], None] = print, candidates_of: Callable[[Target], list[dict]] | None = None,
         max_candidates: int | None = None) -> Outcome:  # fmt: skip
    """Tune ``targets`` in order into ``table`` (its ``kernels`` updated in place, ``save(table)`` after each key).

    ``backend`` provides ``bench(target)`` (an object whose ``call()`` runs the target's launcher), ``time(bench,
    kernel, config) -> ms``, ``precompile(jobs, timeout_s) -> {(group, config string): error or None}``,
    ``batch_jobs`` and ``close()``; the tests drive this with fake ones. ``candidates_of(target)``: the candidate
    configs (default ``candidates``, the kernels' own lists)."""
    from embedattn import configs

    source = candidates_of or candidates
    cache: dict[Target, list[dict]] = {}

    def candidates_of(t: Target) -> list[dict]:
        if t not in cache:
            cache[t] = _limit(source(t), max_candidates)
        return cache[t]

    out = Outcome()
    t0 = clock()
    suites = list(dict.fromkeys(t.suite for t in targets))
    deadline = {s: math.inf for s in suites}
    compiled: set[tuple] = set()  # (group, config) submitted to the compile pool
    est: dict[str, float] = {}  # seconds the last key of each kernel took
    noted: set = set()

    def note(msg: str, once: Any = None) -> None:
        if once is not None:
            if once in noted:
                return
            noted.add(once)
        out.notes.append(msg)
        log(msg)

    def precompile(i: int) -> None:
        """Compile the candidates of targets[i:] (same suite) until a batch's worth of new jobs is submitted."""
        jobs: list[tuple[Target, dict]] = []
        for t in targets[i:]:
            if t.suite != targets[i].suite or len(jobs) >= getattr(backend, "batch_jobs", 1):
                break
            if t.kernel in out.unwired:
                continue
            for c in candidates_of(t):
                ident = (t.group, configs.format_config(c))
                if ident not in compiled:
                    compiled.add(ident)
                    jobs.append((t, c))
        if not jobs:
            return
        started = clock()
        try:
            got = backend.precompile(jobs, max(0.0, deadline[targets[i].suite] - clock()))
        except Exception as e:  # the pool is an optimization: without it each config compiles at its first launch
            note(f"  parallel compiling failed ({_first_line(e)}): the rest compile at their first launch",
                 once="precompile")  # fmt: skip
            backend.workers = 0
            return
        if got:  # failures are only reported: a config's own launch decides (and the pool may be what failed)
            bad = [e for e in got.values() if e]
            log(f"  compiled {len(got) - len(bad)} of {len(jobs)} candidate configs in parallel "
                f"({clock() - started:.1f} s)" + (f"; {len(bad)} failed, e.g. {bad[0]}" if bad else ""))  # fmt: skip
            if bad and len(bad) == len(got) and len(got) >= 4:
                note(f"  every parallel compile failed ({bad[0]}): the rest compile at their first launch",
                     once="precompile")  # fmt: skip
                backend.workers = 0

    current = None
    try:
        for i, t in enumerate(targets):
            current = t
            if deadline[t.suite] == math.inf and budget_s is not None:
                left = budget_s - (clock() - t0)
                share = sum(SHARE.get(s, 1.0) for s in suites[suites.index(t.suite):])
                deadline[t.suite] = clock() + max(0.0, left) * SHARE.get(t.suite, 1.0) / share
            if t.kernel in out.unwired:
                out.skipped.append(f"{t.label} (launcher not wired)")
                continue
            now = clock()
            if now + est.get(t.kernel, 0.0) > deadline[t.suite]:
                out.skipped.append(t.label)
                continue
            if any((t.group, configs.format_config(c)) not in compiled for c in candidates_of(t)):
                precompile(i)
            started = clock()
            result = _tune_one(t, backend, table, out, note, clock, deadline[t.suite], candidates_of(t), log)
            if result == "tuned":
                est[t.kernel] = clock() - started
                if save is not None:
                    save(table)
            current = None
    except KeyboardInterrupt:
        out.interrupted = True
        rest = targets[targets.index(current):] if current is not None else []
        out.skipped += [f"{t.label} (interrupted)" for t in rest]
        note("  interrupted: keeping the keys tuned so far")
    finally:
        with contextlib.suppress(Exception):
            backend.close()
    return out


def _limit(cands: list[dict], n: int | None) -> list[dict]:
    return cands if n is None else cands[:n]


def _tune_one(t: Target, backend, table: dict, out: Outcome, note, clock, deadline: float, cands: list[dict],
              log) -> str:  # fmt: skip
    """Tune one target; returns "tuned", "failed", "skipped" or "unwired"."""
    from embedattn import configs

    op = t.kernel.partition(".")[0]
    try:
        bench = backend.bench(t)
        configs.reset(op)
        with configs.tuning():
            bench.call()  # the heuristic run: which key and heuristic config the launcher uses
    except Exception as e:
        out.failed.append(f"{t.label} ({_first_line(e)})")
        note(f"  {t.label}: its launcher failed with the heuristic config: {_first_line(e)}")
        return "failed"
    rec = configs.last(t.kernel)
    if rec is None:
        out.unwired.append(t.kernel)
        out.skipped.append(f"{t.label} (launcher not wired)")
        note(f"  {t.kernel}: its launcher does not choose configs through embedattn.configs.run, so a table entry "
             "would never be read: not tuned")  # fmt: skip
        return "unwired"
    _, heuristic, used_key = rec
    key = used_key if used_key is not None else dict(t.key)
    ks = configs.key_string(key)
    if ks != t.ks:
        note(f"  {t.kernel}: the launcher looks up {ks} where the grid planned {t.ks}; the launcher's key is kept",
             once=("key", t.kernel))  # fmt: skip
    timed: list[tuple[float, dict]] = []
    failed: list[str] = []
    for c in _dedupe([heuristic, *cands]):
        if clock() >= deadline:
            out.skipped.append(f"{t.label} (budget ran out after {len(timed)} of its configs)")
            return "skipped"
        try:
            ms = float(backend.time(bench, t.kernel, c))
            if not math.isfinite(ms) or ms <= 0:
                raise ValueError(f"timing {ms}")
            timed.append((ms, c))
        except Exception as e:
            failed.append(f"{configs.format_config(c)}: {_first_line(e)}")
    if failed:
        note(f"  {t.label}: {len(failed)} config(s) failed, e.g. {failed[0]}", once=("fail", t.kernel, failed[0]))
    if not timed:
        out.failed.append(f"{t.label} (every config failed)")
        return "failed"
    timed.sort(key=lambda mc: mc[0])
    (best_ms, best), runner = timed[0], (timed[1] if len(timed) > 1 else (None, None))
    heur_ms = next((ms for ms, c in timed if configs.format_config(c) == configs.format_config(heuristic)), None)
    versions = _versions()
    entry = {"config": best, "ms": round(best_ms, 6), "runner_up": runner[1],
             "runner_up_ms": None if runner[0] is None else round(runner[0], 6), "heuristic": heuristic,
             "heuristic_ms": None if heur_ms is None else round(heur_ms, 6), "tried": len(timed) + len(failed),
             "failed": len(failed), "shape": t.describe(), "date": configs.now_utc(),
             "triton": versions["triton"]}  # fmt: skip
    table.setdefault("kernels", {}).setdefault(t.kernel, {})[ks] = entry
    out.tuned.append(f"{t.kernel} {ks}")
    gain = f", heuristic {heur_ms:.4g} ms" if heur_ms is not None else ""
    second = "-" if runner[0] is None else f"{runner[0]:.4g} ms"
    log(f"  {t.kernel} {ks}: {configs.format_config(best)} {best_ms:.4g} ms (runner-up {second}{gain}; "
        f"{len(timed)} timed, {len(failed)} failed)")
    return "tuned"


def _versions() -> dict[str, str]:
    from .harness import versions

    return versions()


# ---------------------------------------------------------------------------------------------------- command line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = ArgumentParser(prog=PROG, description="tune the kernels' launch configs; write the device's config table")
    ap.add_argument("--suite", default="all", help=f"{', '.join(SUITES)}, a comma list of them, or all")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                    help="cuda; cpu runs the Triton interpreter (checks the plumbing; its times mean nothing)")
    ap.add_argument("--device-name", default=None, metavar="NAME",
                    help="the table to read and write (default: the device's own name), e.g. for --list")  # fmt: skip
    ap.add_argument("--dtype", default=None, help=f"comma list of {','.join(DTYPES)} (default: each sweep's)")
    ap.add_argument("--max-seconds", type=positive_float, default=None, metavar="SECONDS",
                    help="time budget (> 0); keys left when it runs out are skipped and listed")  # fmt: skip
    ap.add_argument("--out", default=None, help="folder of the table written (default: the package's configs/)")
    ap.add_argument("--retune", action="store_true", help="tune keys the table already has too")
    ap.add_argument("--list", action="store_true", help="print the key grid and what the table lacks; tune nothing")
    ap.add_argument("--compile-workers", type=int, default=None, metavar="N",
                    help="processes compiling candidates in parallel (default: the CPU count; 0: none)")  # fmt: skip
    ap.add_argument("--max-candidates", type=int, default=None, metavar="N",
                    help="time only the first N candidates of each kernel's list (plus its heuristic)")  # fmt: skip
    ap.add_argument("--warmup-ms", type=non_negative_float, default=5.0, metavar="MS", help="do_bench warm-up")
    ap.add_argument("--rep-ms", type=non_negative_float, default=20.0, metavar="MS", help="do_bench repetitions")
    ap.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # seconds-long shapes (tests, interpreter)
    args = ap.parse_args(argv)
    suites_and_dtypes(ap, args, SUITES, DTYPES)
    for name in ("compile_workers", "max_candidates"):
        v = getattr(args, name)
        if v is not None and v < (0 if name == "compile_workers" else 1):
            ap.error(f"argument --{name.replace('_', '-')}: must be >= {0 if name == 'compile_workers' else 1}")
    if args.device == "cpu" and args.out is None and not args.list:
        ap.error("--device cpu needs --out (a CPU table does not belong in the package)")
    return args


def _existing_table(device_name: str, path: str) -> dict:
    from embedattn import configs

    base = configs.load_table(device_name)
    return configs.merge_tables({k: v for k, v in base.items() if k != "sources"}, configs.read_table(path))


def main(argv: list[str] | None = None, *, backend=None, clock: Callable[[], float] = time.monotonic,
         log: Callable[[str], None] = print) -> int:  # fmt: skip
    """The command. ``backend`` (tests): a stand-in for ``DeviceBackend`` with a ``name``; with it, nothing is
    compiled or timed for real."""
    args = parse_args(argv)
    if backend is None and not args.list:  # before anything imports triton (which reads it once)
        if args.device == "cpu" and "triton" not in sys.modules:
            os.environ.setdefault("TRITON_INTERPRET", "1")
        elif args.device == "cuda":
            os.environ.pop("TRITON_INTERPRET", None)
    from embedattn import configs

    targets = plan(args.suites, args.dtypes, args.tiny)
    name = args.device_name or (backend.name if backend is not None else None)
    if name is None and args.list:
        import torch

        if args.device == "cuda" and not torch.cuda.is_available():
            return fail(PROG, "--list without a CUDA device needs --device-name NAME (e.g. 'NVIDIA H200')")
        name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    out_dir = args.out or configs.PACKAGE_DIR
    if not args.list:
        problem = check_out_dir(out_dir)
        if problem:
            return fail(PROG, f"--out: {problem}")
    if backend is None and not args.list:
        import torch

        if args.device == "cuda" and not torch.cuda.is_available():
            return fail(PROG, "--device cuda: no CUDA device visible")
        workers = args.compile_workers if args.compile_workers is not None else (os.cpu_count() or 1)
        backend = DeviceBackend(args.device, warmup_ms=args.warmup_ms, rep_ms=args.rep_ms, workers=workers, log=log)
        name = args.device_name or backend.name
    key = configs.device_key(name)
    path = os.path.join(out_dir, f"{key}.json")
    table = _existing_table(name, path)
    have = {(k, ks) for k, ks, _ in configs.entries(table)}
    todo = [t for t in targets if args.retune or (t.kernel, t.ks) not in have]
    if args.list:
        for t in targets:
            log(f"{'have' if (t.kernel, t.ks) in have else 'todo'}  {t.label}  [{t.describe()}]")
        log(f"{len(targets)} keys for {name} ({key}): {len(targets) - len(todo)} in the table, {len(todo)} to tune")
        return 0
    command = "python -m benchmarks.tune " + " ".join(shlex.quote(a) for a in (argv if argv is not None
                                                                               else sys.argv[1:]))  # fmt: skip
    vers = _versions()
    table.update(device=name, device_key=key, triton=vers["triton"], torch=vers["torch"], date=configs.now_utc(),
                 command=command)  # fmt: skip
    log(f"tuning {len(todo)} of {len(targets)} keys on {name} -> {path}"
        + (f" ({len(targets) - len(todo)} already in the table)" if len(todo) < len(targets) else "")
        + (f", budget {args.max_seconds:g} s" if args.max_seconds is not None else ""))  # fmt: skip
    started = clock()
    result = tune(todo, backend, table, save=lambda tb: configs.write_table(path, tb), budget_s=args.max_seconds,
                  clock=clock, log=log, max_candidates=args.max_candidates)  # fmt: skip
    table["last_run"] = {"date": configs.now_utc(), "seconds": round(clock() - started, 1),
                         "budget_s": args.max_seconds, "tuned": len(result.tuned), "failed": result.failed,
                         "skipped": result.skipped, "not_wired": sorted(set(result.unwired)),
                         "interrupted": result.interrupted}  # fmt: skip
    configs.write_table(path, table)
    configs.clear_cache()
    log(f"tuned {len(result.tuned)} keys, {len(result.failed)} failed, {len(result.skipped)} skipped"
        + (" (interrupted)" if result.interrupted else "") + f" in {clock() - started:.0f} s -> {path}")  # fmt: skip
    if result.skipped:
        log(f"skipped: {', '.join(result.skipped[:20])}" + (" ..." if len(result.skipped) > 20 else ""))
    if result.failed:
        log(f"failed: {', '.join(result.failed[:10])}" + (" ..." if len(result.failed) > 10 else ""))
    return 1 if (todo and not result.tuned and result.unwired and not result.failed) else 0


if __name__ == "__main__":
    # run the imported module's main, so the classes and functions the compile workers unpickle are
    # benchmarks.tune's, not this __main__ copy's
    from benchmarks.tune import main as _main

    raise SystemExit(_main())
