"""python -m benchmarks.tune: tune each kernel's launch config at the benchmark sweep's shapes; write the table.

    python -m benchmarks.tune --device cuda --max-seconds 120 --dtype bf16   # -> embedattn/configs/<device>.json
    python -m benchmarks.tune --list --device-name "NVIDIA H200"              # the key grid; what the table lacks

The grid is the sweep's: each suite's ``specs`` (benchmarks/attention.py, embedding.py, negative_sampling.py, the
same profile, devices and ``--dtype``) in the sweep's order (most telling first, so a budget cutting from the end
leaves every curve its range; the launchers take the nearest bucket for what was cut). A point gives one target per
kernel its embedattn call launches (attention: fwd, and bwd_dkdv + bwd_dq where the sweep times a backward;
embedding: fwd, the scatter ``scatter_mode`` picks, bwd_pos; negative sampling: fwd, bwd) at the key that kernel's
``tuning_key`` builds; points sharing a key are tuned once. Split-KV decoding (the kvcache point) reads no table.

Per target: the kernel's candidates (its public list beside it, pruned as its autotuner prunes) and the launcher's
heuristic config are compiled in parallel on the machine's CPU cores (a pool of processes filling Triton's on-disk
cache, ``--compile-workers``), then each is timed with ``triton.testing.do_bench`` (median) on the suite's own
inputs and embedattn call (``workload``) in the mode that launches the kernel, the other kernels at their heuristic
configs: an entry's ``ms`` is that call's time. The fastest is the entry; the runner-up's and the heuristic's times
are kept beside it. A config that fails to compile or to launch is counted, never fatal. Keys already in the table
stay unless ``--retune``.

``--max-seconds`` bounds the whole command, compile time included: it is shared between the suites (time a suite
leaves unused passes to the next), each suite stops at its share (a SIGALRM ends a compile or a timing that would
run past it), and a few seconds are kept to close the pool and write the table. The table (``--out``/<device
key>.json, default the package's ``embedattn/configs/``) starts from the shipped one (plus
``EMBEDATTN_CONFIGS_DIR``) and the file already at ``--out``, and is rewritten after every key: a run stopped by the
budget or SIGINT keeps what it finished and lists what it skipped. docs/tuning.md has the rest.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import math
import os
import shlex
import signal
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from .cli import ArgumentParser, check_out_dir, fail, non_negative_float, positive_float, suites_and_dtypes

PROG = "python -m benchmarks.tune"
SUITES = ("attention", "embedding", "negative_sampling")
DTYPES = ("fp16", "bf16", "fp32")
# share of a --max-seconds budget per suite; what a suite leaves unused passes to the next ones
SHARE = {"attention": 0.6, "embedding": 0.25, "negative_sampling": 0.15}
# seconds of the budget kept for closing the compile pool and writing the table (at most this share of it)
RESERVE_S, RESERVE_SHARE = 5.0, 0.1


# ---------------------------------------------------------------------------------------------------- the grid


@dataclass(frozen=True, eq=False)
class Target:
    """One (kernel, key) to tune, at one point of a suite's sweep. Picklable (sent to compile workers)."""

    suite: str
    kernel: str
    key: Any  # embedattn.configs.Key
    spec: Any  # the suite's Spec of the point
    mode: str  # the mode of the suite's embedattn call that launches the kernel: "fwd" or "bwd"

    @property
    def ks(self) -> str:
        return self.key.text

    @property
    def label(self) -> str:
        return f"{self.kernel} {self.ks}"

    @property
    def group(self) -> tuple:
        """What a compile depends on: the kernel and the key without its bucket fields."""
        from embedattn.configs import BUCKET_FIELDS

        return (self.kernel,) + tuple((k, v) for k, v in self.key.items() if k not in BUCKET_FIELDS)

    def describe(self) -> str:
        return f"{self.spec.shape} dtype={self.spec.dtype}"


# the flags each attention feature of the sweep leaves on (benchmarks/attention.py FEATURES), causal included;
# the launcher's own key is checked against it at the first launch
ATTENTION_FLAGS = {
    "": None,  # plain: CAUSAL as the point says
    "window": {"WINDOW": True},  # causal is folded into the window (no right side)
    "softcap": {"CAUSAL": True, "SOFTCAP": True},
    "alibi": {"CAUSAL": True, "ALIBI": True},
    "dropout": {"CAUSAL": True, "DROPOUT": True},
    "varlen": {"CAUSAL": True, "VARLEN": True},
}


def attention_targets(ctx) -> list[Target]:
    from embedattn.kernels.attention import tuning_key

    from . import attention as A

    out = []
    for s in A.specs(ctx):
        if s.feature not in ATTENTION_FLAGS:  # kvcache: split-KV decoding reads no table
            continue
        flags = ATTENTION_FLAGS[s.feature] or {"CAUSAL": s.causal}
        key = tuning_key(s.dtype, s.head_dim, s.n, s.n, flags)
        out.append(Target("attention", "attention.fwd", key, s, "fwd"))
        if "bwd" in s.modes:
            out += [Target("attention", k, key, s, "bwd") for k in ("attention.bwd_dkdv", "attention.bwd_dq")]
    return out


def embedding_targets(ctx) -> list[Target]:
    from embedattn.kernels import embedding as KE

    from . import embedding as E
    from .harness import DTYPES as TORCH_DTYPES

    out = []
    for s in E.specs(ctx):
        t = s.batch * s.seq
        scatter = KE.scatter_mode(s.vocab, t, s.dim, TORCH_DTYPES[s.dtype], False)
        out.append(Target("embedding", "embedding.fwd", KE.tuning_key(s.dtype, s.dim, t, KE.POS_LEARNED), s, "fwd"))
        out += [Target("embedding", k, KE.tuning_key(s.dtype, s.dim, t), s, "bwd")
                for k in (f"embedding.bwd_{scatter}", "embedding.bwd_pos")]  # fmt: skip
    return out


def negative_sampling_targets(ctx) -> list[Target]:
    from embedattn.kernels import negative_sampling as KN

    from . import negative_sampling as N

    out = []
    for s in sorted(N.specs(ctx), key=lambda s: -s.pairs):  # the key has no batch size: the largest batch first
        out.append(Target("negative_sampling", "negative_sampling.fwd", KN.tuning_key(s.dtype, s.dim, s.negatives),
                          s, "fwd"))  # fmt: skip
        out.append(Target("negative_sampling", "negative_sampling.bwd",
                          KN.tuning_key(s.dtype, s.dim, s.negatives, sparse=False), s, "bwd"))  # fmt: skip
    return out


PLANS = {"attention": attention_targets, "embedding": embedding_targets,
         "negative_sampling": negative_sampling_targets}  # fmt: skip


def context(device: str, profile: str, dtypes: list[str] | None = None, *, warmup_ms: float = 5.0,
            rep_ms: float = 20.0):  # fmt: skip
    """The benchmark context the grid and the inputs are built in (one input set per point)."""
    import torch

    from .harness import Context

    return Context(device=torch.device(device), profile=profile, dtypes=dtypes, warmup_ms=warmup_ms, rep_ms=rep_ms,
                   n_sets=1, log=lambda msg: None)  # fmt: skip


def plan(suites: Iterable[str], ctx) -> list[Target]:
    """Every target of ``suites`` at ``ctx``'s sweep, suite by suite in the sweep's order; one per (kernel, key)."""
    out: list[Target] = []
    seen: set[tuple[str, str]] = set()
    for s in suites:
        for t in PLANS[s](ctx):
            if (t.kernel, t.ks) not in seen:
                seen.add((t.kernel, t.ks))
                out.append(t)
    return out


# ---------------------------------------------------------------------------------------------------- candidates


def _dedupe(configs: Iterable[Mapping]) -> list[dict]:
    from embedattn.configs import format_config

    seen, out = set(), []
    for c in configs:
        f = format_config(c)
        if f not in seen:
            seen.add(f)
            out.append(dict(c))
    return out


def candidates(t: Target) -> list[dict]:
    """The kernel's own candidate configs at ``t`` (its public list, pruned as its autotuner prunes)."""
    from types import SimpleNamespace

    from embedattn.configs import as_dict

    from .harness import DTYPES as TORCH_DTYPES

    k = t.key
    if t.suite == "attention":
        from embedattn.kernels import attention as KA

        elt = TORCH_DTYPES[k["dtype"]].itemsize
        named = {"Q": SimpleNamespace(element_size=lambda: elt)}
        block_d = max(16, 1 << (int(k["head_dim"]) - 1).bit_length())
        fwd = t.kernel == "attention.fwd"
        prune, space = (KA.prune_fwd, KA.FWD_CONFIGS) if fwd else (KA.prune_bwd, KA.BWD_CONFIGS)
        return _dedupe(as_dict(c) for c in prune(list(space), named, BLOCK_D=block_d))
    if t.suite == "embedding":
        from embedattn.kernels import embedding as KE

        space = KE.SORTED_CONFIGS if t.kernel == "embedding.bwd_sorted" else KE.CONFIGS
        return _dedupe(as_dict(c) for c in KE.prune(space, {"D": k["d"]}))
    if t.suite == "negative_sampling":
        from embedattn.kernels import negative_sampling as KN

        return _dedupe(as_dict(c) for c in KN.CONFIGS)
    raise ValueError(f"unknown suite {t.suite!r}")


# ---------------------------------------------------------------------------------------------------- inputs


@dataclass
class Bench:
    """A target with its inputs on the device: ``call()`` runs the suite's embedattn call in the target's mode
    (``leaves``: the tensors whose gradients the timer clears)."""

    target: Target
    call: Callable[[], Any]
    leaves: list = field(default_factory=list)


class Inputs:
    """The suites' workloads of the last few points (the targets of one point share them)."""

    def __init__(self, ctx, keep: int = 2):
        self.ctx, self.keep = ctx, keep
        self._cache: OrderedDict[tuple, dict] = OrderedDict()

    def bench(self, t: Target) -> Bench:
        import importlib

        from embedattn import configs

        ident = (t.suite, repr(t.spec))
        if ident not in self._cache:
            while len(self._cache) >= self.keep:
                self._cache.popitem(last=False)
            suite = importlib.import_module(f"benchmarks.{t.suite}")
            self._cache[ident] = {"workload": suite.workload(self.ctx, t.spec)}
        entry = self._cache[ident]
        self._cache.move_to_end(ident)
        if t.mode not in entry:
            with configs.tuning():  # a backward's forward runs now, at the heuristic configs (never autotuned)
                entry[t.mode] = entry["workload"].closure(t.mode)
        fn, leaves = entry[t.mode]
        return Bench(t, fn, leaves)


# ---------------------------------------------------------------------------------------------------- compiling


@contextlib.contextmanager
def compile_only() -> Iterator[None]:
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


def _worker_init(device: str, profile: str) -> None:
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["EMBEDATTN_BACKEND"] = "triton"
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    _WORKER["inputs"] = Inputs(context(device, profile), keep=2)


def _compile_job(target: Target, config: dict) -> str | None:
    """In a worker: compile ``target``'s launch with ``config`` (no launch). None, or the error's first line."""
    from embedattn import configs

    try:
        with compile_only():
            bench = _WORKER["inputs"].bench(target)
            with configs.tuning(target.kernel, config):
                bench.call()
        return None
    except Exception as e:
        return _first_line(e)


# ---------------------------------------------------------------------------------------------------- backends


class DeviceBackend:
    """Builds the suites' inputs on ``ctx.device``, compiles candidates in a pool of processes, times with do_bench
    (CUDA) or one host-timed call (CPU: Triton's interpreter, only to check the plumbing; its times mean nothing).
    Sets ``EMBEDATTN_BACKEND=triton``: the suites' embedattn calls then run the kernels being tuned."""

    def __init__(self, ctx, *, workers: int = 0, log: Callable[[str], None] = print):
        import torch

        self.ctx, self.log = ctx, log
        os.environ["EMBEDATTN_BACKEND"] = "triton"  # the suites' embedattn calls, here and in the compile workers
        self.is_cuda = ctx.device.type == "cuda"
        if self.is_cuda and ctx.device.index is None:  # the workers set this device: it needs its index
            ctx.device = torch.device("cuda", torch.cuda.current_device())
        self.name = torch.cuda.get_device_name(ctx.device) if self.is_cuda else "cpu"
        self.workers = workers if self.is_cuda else 0
        self.batch_jobs = max(1, 4 * self.workers)
        self._inputs = Inputs(ctx)
        self._pool = None

    def bench(self, t: Target) -> Bench:
        return self._inputs.bench(t)

    def time(self, bench: Bench, kernel: str, config: dict) -> float:
        from embedattn import configs

        from .harness import time_fn

        with configs.tuning(kernel, config):
            if not self.is_cuda:  # the interpreter: one call checks the plumbing (its time means nothing)
                t0 = time.perf_counter()
                bench.call()
                return (time.perf_counter() - t0) * 1e3
            bench.call()  # compile (or load from the disk cache) outside the timing; errors surface here
            return time_fn(self.ctx, bench.call, grad_to_none=bench.leaves or None).p50

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
                                                 initializer=_worker_init,
                                                 initargs=(str(self.ctx.device), self.ctx.profile))  # fmt: skip
            futures = {self._pool.submit(_compile_job, t, c): (t.group, format_config(c)) for t, c in jobs}
        except Exception as e:
            self.log(f"  compile pool unavailable ({_first_line(e)}): compiling at first launch instead")
            self.workers = 0
            return {}
        try:
            done, _ = wait(futures, timeout=max(0.0, timeout_s) if math.isfinite(timeout_s) else None)
        finally:  # the budget's stop included: nothing queued outlives the wait
            for f in futures:
                f.cancel()
        out: dict[tuple, str | None] = {}
        for f in done:
            try:
                out[futures[f]] = f.result()
            except Exception as e:  # a worker died (e.g. out of memory): the main process compiles instead
                out[futures[f]] = _first_line(e)
        return out

    def close(self, timeout_s: float = 3.0) -> None:
        """Stop the pool without waiting for compiles in flight: at most ``timeout_s``, then the workers are killed."""
        pool, self._pool = self._pool, None
        if pool is None:
            return
        procs = list(getattr(pool, "_processes", {}).values())
        with contextlib.suppress(Exception):
            pool.shutdown(wait=False, cancel_futures=True)
        for p in procs:
            with contextlib.suppress(Exception):
                p.terminate()
        end = time.monotonic() + timeout_s
        for p in procs:
            with contextlib.suppress(Exception):
                p.join(timeout=max(0.0, end - time.monotonic()))
                if p.is_alive():
                    p.kill()


# ---------------------------------------------------------------------------------------------------- the budget


class OutOfTime(BaseException):
    """The budget's hard stop. A BaseException, as KeyboardInterrupt: no ``except Exception`` takes it for a
    failing config."""


def _raise_out_of_time(signum, frame):
    raise OutOfTime


def signal_alarm(delay_s: float | None) -> None:
    """Raise ``OutOfTime`` in the main thread ``delay_s`` seconds from now (None: disarm). A no-op off the main
    thread or without SIGALRM (then the budget is checked between steps only)."""
    if not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        return
    if delay_s is None:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, signal.SIG_DFL)
        return
    signal.signal(signal.SIGALRM, _raise_out_of_time)
    signal.setitimer(signal.ITIMER_REAL, max(delay_s, 1e-3))


class Budget:
    """``--max-seconds`` from the command's start: ``end`` (``clock`` time, less the reserve for closing and
    writing), the deadline per suite, and the hard stop (``alarm(delay)``: ``signal_alarm``, or the tests' fake)."""

    def __init__(self, seconds: float | None, clock: Callable[[], float], *, start: float | None = None,
                 alarm: Callable[[float | None], None] = signal_alarm):  # fmt: skip
        self.seconds, self.clock, self.alarm = seconds, clock, alarm
        self.start = clock() if start is None else start
        reserve = 0.0 if seconds is None else min(RESERVE_S, RESERVE_SHARE * seconds)
        self.end = math.inf if seconds is None else self.start + seconds - reserve

    def left(self) -> float:
        return self.end - self.clock()

    def share(self, suite: str, suites: list[str]) -> float:
        """The deadline of ``suite``: its share of what is left among it and the suites after it."""
        if self.seconds is None:
            return math.inf
        rest = suites[suites.index(suite):]
        return self.clock() + max(0.0, self.left()) * SHARE.get(suite, 1.0) / sum(SHARE.get(s, 1.0) for s in rest)

    def arm(self, deadline: float) -> None:
        """The hard stop at ``deadline`` (clock time; never past ``end``)."""
        at = min(deadline, self.end)
        if math.isfinite(at):
            self.alarm(max(0.0, at - self.clock()))

    def disarm(self) -> None:
        if self.seconds is not None:
            self.alarm(None)


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
         budget: Budget | None = None, log: Callable[[str], None] = print,
         candidates_of: Callable[[Target], list[dict]] | None = None, max_candidates: int | None = None) -> Outcome:
    """Tune ``targets`` in order into ``table`` (its ``kernels`` updated in place, ``save(table)`` after each key).

    ``backend`` provides ``bench(target)`` (an object whose ``call()`` runs the target's embedattn call), ``time(bench,
    kernel, config) -> ms``, ``precompile(jobs, timeout_s) -> {(group, config string): error or None}``,
    ``batch_jobs`` and ``close()``; the tests drive this with fake ones. ``budget``: the time limit (None: none).
    ``candidates_of(target)``: the candidate configs (default ``candidates``, the kernels' own lists)."""
    from embedattn import configs

    budget = budget or Budget(None, time.monotonic)
    clock = budget.clock
    source = candidates_of or candidates
    cache: dict[Target, list[dict]] = {}

    def candidates_of(t: Target) -> list[dict]:
        if t not in cache:
            cache[t] = source(t)[:max_candidates]
        return cache[t]

    out = Outcome()
    suites = list(dict.fromkeys(t.suite for t in targets))
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

    def precompile(i: int, deadline: float) -> None:
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
            got = backend.precompile(jobs, max(0.0, deadline - clock()))
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

    pending = list(targets)  # not yet begun
    current: list[Target] = []  # the target in hand

    def step(t: Target, deadline: float) -> None:
        if t.kernel in out.unwired:
            out.skipped.append(f"{t.label} (launcher not wired)")
            return
        if clock() + est.get(t.kernel, 0.0) > deadline:
            out.skipped.append(t.label)
            return
        if any((t.group, configs.format_config(c)) not in compiled for c in candidates_of(t)):
            precompile(targets.index(t), deadline)
        started = clock()
        if _tune_one(t, backend, table, out, note, clock, deadline, candidates_of(t), log) == "tuned":
            est[t.kernel] = clock() - started
            current.clear()
            if save is not None:
                save(table)

    try:
        for suite in suites:
            try:  # the alarm still armed for the previous suite (or the start-up) may fire from here on
                deadline = budget.share(suite, suites)
                budget.arm(deadline)
                while pending and pending[0].suite == suite:
                    current[:] = [pending.pop(0)]
                    step(current[0], deadline)
                    current.clear()
                budget.disarm()
            except OutOfTime:
                rest = current + [t for t in pending if t.suite == suite]
                pending = [t for t in pending if t.suite != suite]
                out.skipped += [f"{t.label} (budget)" for t in rest]
                note(f"  {suite}: its share of the budget ran out" + (f" during {current[0].label}" if current else ""))
                current.clear()
    except KeyboardInterrupt:
        out.interrupted = True
        out.skipped += [f"{t.label} (interrupted)" for t in current + pending]
        note("  interrupted: keeping the keys tuned so far")
    finally:
        budget.disarm()
        with contextlib.suppress(Exception):
            backend.close()
    return out


def _tune_one(t: Target, backend, table: dict, out: Outcome, note, clock, deadline: float, cands: list[dict],
              log) -> str:  # fmt: skip
    """Tune one target; returns "tuned", "failed", "skipped" or "unwired"."""
    from embedattn import configs

    try:
        configs.forget(t.kernel.partition(".")[0])
        bench = backend.bench(t)
        with configs.tuning():
            bench.call()  # the heuristic run: which key and heuristic config the launcher uses
    except Exception as e:
        out.failed.append(f"{t.label} ({_first_line(e)})")
        note(f"  {t.label}: its launcher failed with the heuristic config: {_first_line(e)}")
        return "failed"
    rec = configs.last(t.kernel)
    if rec is None or rec[2] is None:
        out.unwired.append(t.kernel)
        out.skipped.append(f"{t.label} (launcher not wired)")
        note(f"  {t.kernel}: its launcher does not choose configs through embedattn.configs.run with a key at "
             f"{t.describe()}, so a table entry would never be read: not tuned", once=("unwired", t.kernel))
        return "unwired"
    _, heuristic, key = rec
    if key.text != t.ks:
        note(f"  {t.kernel}: the launcher looks up {key.text} where the grid planned {t.ks}; the launcher's key is "
             "kept", once=("key", t.kernel))  # fmt: skip
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
    entry = {"config": best, "ms": round(best_ms, 6), "runner_up": runner[1],
             "runner_up_ms": None if runner[0] is None else round(runner[0], 6), "heuristic": heuristic,
             "heuristic_ms": None if heur_ms is None else round(heur_ms, 6), "tried": len(timed) + len(failed),
             "failed": len(failed), "shape": t.describe(), "mode": t.mode, "date": now_utc(),
             "triton": _versions()["triton"]}  # fmt: skip
    table.setdefault("kernels", {}).setdefault(t.kernel, {})[key.text] = entry
    out.tuned.append(f"{t.kernel} {key.text}")
    gain = f", heuristic {heur_ms:.4g} ms" if heur_ms is not None else ""
    second = "-" if runner[0] is None else f"{runner[0]:.4g} ms"
    log(f"  {t.kernel} {key.text}: {configs.format_config(best)} {best_ms:.4g} ms (runner-up {second}{gain}; "
        f"{len(timed)} timed, {len(failed)} failed)")
    return "tuned"


def _versions() -> dict[str, str]:
    from .harness import versions

    return versions()


# ---------------------------------------------------------------------------------------------------- the table file


def now_utc() -> str:
    """The table's date format."""
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def entries(table: Mapping[str, Any]) -> Iterator[tuple[str, str, dict]]:
    """``(kernel, key string, entry)`` for every entry of a table."""
    for kernel, es in table.get("kernels", {}).items():
        for ks, e in es.items():
            yield kernel, ks, e


def write_table(path: str, table: Mapping[str, Any]) -> None:
    """Write a table in ``embedattn.configs``'s format (sorted keys, one entry per line block: diff-friendly),
    atomically."""
    from embedattn.configs import FORMAT

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    data = {"format": FORMAT, **{k: v for k, v in table.items() if k not in ("format", "sources")}}
    data["kernels"] = {k: dict(sorted(v.items())) for k, v in sorted(table.get("kernels", {}).items())}
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, default=str)
        f.write("\n")
    os.replace(tmp, path)


def existing_table(device_name: str, path: str) -> dict:
    """What the run starts from: the table the launchers read for ``device_name`` with the file at ``path`` over it."""
    from embedattn import configs

    table = {k: v for k, v in configs.load_table(device_name).items() if k != "sources"}
    table["kernels"] = {k: dict(v) for k, v in table.get("kernels", {}).items()}
    over = configs.read_table(path)
    for kernel, es in over.pop("kernels").items():
        table["kernels"].setdefault(kernel, {}).update(es)
    return {**table, **over, "kernels": table["kernels"]}


# ---------------------------------------------------------------------------------------------------- command line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = ArgumentParser(prog=PROG, description="tune the kernels' launch configs; write the device's config table")
    ap.add_argument("--suite", default="all", help=f"{', '.join(SUITES)}, a comma list of them, or all")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                    help="cuda; cpu runs the Triton interpreter (checks the plumbing; its times mean nothing)")
    ap.add_argument("--device-name", default=None, metavar="NAME",
                    help="the table to read and write (default: the device's own name), e.g. for --list")  # fmt: skip
    ap.add_argument("--dtype", default=None,
                    help=f"comma list of {','.join(DTYPES)} overriding every suite's dtypes (default: the sweep's)")
    ap.add_argument("--max-seconds", type=positive_float, default=None, metavar="SECONDS",
                    help="time budget of the whole command, compile time included (> 0); keys left are listed")
    ap.add_argument("--out", default=None, help="folder of the table written (default: the package's configs/)")
    ap.add_argument("--retune", action="store_true", help="tune keys the table already has too")
    ap.add_argument("--list", action="store_true", help="print the key grid and what the table lacks; tune nothing")
    ap.add_argument("--compile-workers", type=int, default=None, metavar="N",
                    help="processes compiling candidates in parallel (default: the CPU count; 0: none)")  # fmt: skip
    ap.add_argument("--max-candidates", type=int, default=None, metavar="N",
                    help="time only the first N candidates of each kernel's list (plus its heuristic)")  # fmt: skip
    ap.add_argument("--warmup-ms", type=non_negative_float, default=5.0, metavar="MS", help="do_bench warm-up")
    ap.add_argument("--rep-ms", type=non_negative_float, default=20.0, metavar="MS", help="do_bench repetitions")
    ap.add_argument("--quick", action="store_true", help="the quick sweep's shapes (python -m benchmarks --quick)")
    ap.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # the tests' seconds-long shapes
    args = ap.parse_args(argv)
    suites_and_dtypes(ap, args, SUITES, DTYPES)
    for name in ("compile_workers", "max_candidates"):
        v = getattr(args, name)
        if v is not None and v < (0 if name == "compile_workers" else 1):
            ap.error(f"argument --{name.replace('_', '-')}: must be >= {0 if name == 'compile_workers' else 1}")
    if args.device == "cpu" and args.out is None and not args.list:
        ap.error("--device cpu needs --out (a CPU table does not belong in the package)")
    return args


def main(argv: list[str] | None = None, *, backend=None, clock: Callable[[], float] = time.monotonic,
         alarm: Callable[[float | None], None] | None = None, log: Callable[[str], None] = print) -> int:
    """The command. ``backend`` (tests): a stand-in for ``DeviceBackend`` with a ``name``; with it, nothing is
    compiled or timed for real. ``clock`` and ``alarm``: the budget's clock and hard stop (default: the monotonic
    clock and SIGALRM; with another clock and no alarm, no hard stop)."""
    budget_start = clock()
    args = parse_args(argv)
    if alarm is None:
        alarm = signal_alarm if clock is time.monotonic else (lambda delay_s: None)
    budget = Budget(args.max_seconds, clock, start=budget_start, alarm=alarm)
    if backend is None and not args.list:  # before anything imports triton (which reads it once)
        if args.device == "cpu" and "triton" not in sys.modules:
            os.environ.setdefault("TRITON_INTERPRET", "1")
        elif args.device == "cuda":
            os.environ.pop("TRITON_INTERPRET", None)
        if os.environ.get("EMBEDATTN_BACKEND", "triton") != "triton":
            log(f"EMBEDATTN_BACKEND={os.environ['EMBEDATTN_BACKEND']} ignored: tuning times the Triton kernels")
    budget.arm(budget.end)  # imports, CUDA start-up and the input builders count too
    try:
        return _main(args, argv, backend, budget, log)
    except OutOfTime:  # before tuning began (tune() handles its own)
        log(f"the budget ({args.max_seconds:g} s) ran out before tuning began: nothing tuned")
        return 0
    finally:
        budget.disarm()


def _main(args, argv, backend, budget: Budget, log) -> int:
    from embedattn import configs

    profile = "tiny" if args.tiny else ("quick" if args.quick else "full")
    ctx = context(args.device, profile, args.dtypes, warmup_ms=args.warmup_ms, rep_ms=args.rep_ms)
    targets = plan(args.suites, ctx)
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
        backend = DeviceBackend(ctx, workers=workers, log=log)
        name = args.device_name or backend.name
    key = configs.device_key(name)
    path = os.path.join(out_dir, f"{key}.json")
    table = existing_table(name, path)
    have = {(k, ks) for k, ks, _ in entries(table)}
    todo = [t for t in targets if args.retune or (t.kernel, t.ks) not in have]
    if args.list:
        for t in targets:
            log(f"{'have' if (t.kernel, t.ks) in have else 'todo'}  {t.label}  [{t.describe()}]")
        log(f"{len(targets)} keys for {name} ({key}): {len(targets) - len(todo)} in the table, {len(todo)} to tune")
        return 0
    command = "python -m benchmarks.tune " + " ".join(shlex.quote(a) for a in (argv if argv is not None
                                                                               else sys.argv[1:]))  # fmt: skip
    vers = _versions()
    table.update(device=name, device_key=key, triton=vers["triton"], torch=vers["torch"], date=now_utc(),
                 command=command)  # fmt: skip
    log(f"tuning {len(todo)} of {len(targets)} keys on {name} -> {path}"
        + (f" ({len(targets) - len(todo)} already in the table)" if len(todo) < len(targets) else "")
        + (f", budget {args.max_seconds:g} s from the start" if args.max_seconds is not None else ""))  # fmt: skip
    result = tune(todo, backend, table, save=lambda tb: write_table(path, tb), budget=budget, log=log,
                  max_candidates=args.max_candidates)  # fmt: skip
    seconds = budget.clock() - budget.start
    table["last_run"] = {"date": now_utc(), "seconds": round(seconds, 1), "budget_s": args.max_seconds,
                         "tuned": len(result.tuned), "failed": result.failed, "skipped": result.skipped,
                         "not_wired": sorted(set(result.unwired)), "interrupted": result.interrupted}  # fmt: skip
    write_table(path, table)
    configs.clear_cache()
    log(f"tuned {len(result.tuned)} keys, {len(result.failed)} failed, {len(result.skipped)} skipped"
        + (" (interrupted)" if result.interrupted else "") + f" in {seconds:.0f} s -> {path}")  # fmt: skip
    if result.skipped:
        log(f"skipped: {', '.join(result.skipped[:20])}" + (" ..." if len(result.skipped) > 20 else ""))
    if result.failed:
        log(f"failed: {', '.join(result.failed[:10])}" + (" ..." if len(result.failed) > 10 else ""))
    return 1 if (todo and not result.tuned and result.unwired and not result.failed) else 0


if __name__ == "__main__":
    # run the imported module's main, so the classes and functions the compile workers unpickle are
    # benchmarks.tune's, not this __main__ copy's
    from benchmarks.tune import main as _main_fn

    raise SystemExit(_main_fn())
