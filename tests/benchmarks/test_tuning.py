"""Tuned configs as data (``embedattn.configs``) and ``python -m benchmarks.tune``, without a GPU.

Tables are read from temporary folders (the shipped folder is pointed at an empty one), launches are plain
functions, and the tune command runs on a fake backend whose clock, compile and timing costs and budget alarm the
tests set (no test times anything). One test runs the suites' real inputs and launchers on the tiny grid (the Triton
interpreter on CPU); the compile pool runs on CUDA.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import sys
import warnings
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the benchmarks package lives at the root

from helpers import DEVICE, ON_CUDA  # noqa: E402

from benchmarks import harness, tune  # noqa: E402
from embedattn import configs  # noqa: E402

A = {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3}
B = {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2}
HEUR = {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1}


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    """No shipped table and no environment leak in; nothing recorded survives a test."""
    monkeypatch.delenv(configs.ENV_DIRS, raising=False)
    monkeypatch.delenv(configs.ENV_ENABLED, raising=False)
    monkeypatch.setattr(configs, "PACKAGE_DIR", str(tmp_path / "shipped"))
    configs.clear_cache()
    configs.forget()
    yield
    configs.clear_cache()
    configs.forget()


def attention_key(*args):
    """kernels/attention.py's key builder."""
    from embedattn.kernels.attention import tuning_key

    return tuning_key(*args)


def akey(n: int, *, dtype=torch.bfloat16, d: int = 128, causal: bool = True, **flags) -> dict:
    return attention_key(dtype, d, n, n, {"CAUSAL": causal, **flags})


def ks(key) -> str:
    return configs.normalize_key(key).text


def table(entries: dict[str, dict[str, dict]], **meta) -> dict:
    """{kernel: {key string: config}} -> a table with plain entries."""
    return {**meta, "kernels": {k: {ks: {"config": c, "ms": 1.0} for ks, c in es.items()}
                                for k, es in entries.items()}}  # fmt: skip


def put(folder: Path, device: str, entries: dict, **meta) -> Path:
    path = folder / f"{configs.device_key(device)}.json"
    tune.write_table(str(path), table(entries, **meta))
    return path


# ------------------------------------------------------------------------------------------------------ keys


@pytest.mark.parametrize("name,key", [
    ("NVIDIA H200", "nvidia_h200"), ("NVIDIA H100 80GB HBM3", "nvidia_h100_80gb_hbm3"),
    ("NVIDIA A100-SXM4-80GB", "nvidia_a100_sxm4_80gb"), ("nvidia_h200", "nvidia_h200"), ("cpu", "cpu"),
    ("meta", "meta"), (" Tesla T4 ", "tesla_t4"),
])  # fmt: skip
def test_device_key(name, key):
    assert configs.device_key(name) == key
    assert configs.device_key(torch.device("cpu")) == "cpu"


def test_keys_are_canonical():
    pytest.importorskip("triton")
    from embedattn.kernels import embedding as KE
    from embedattn.kernels import negative_sampling as KN

    k = attention_key(torch.bfloat16, 128, 3000, 4097, {"CAUSAL": True, "MASK_KIND": 2, "HEAD_DIM": 128,
                                                        "PREC": "tf32", "SOFTCAP": False})  # fmt: skip
    assert k == {"dtype": "bf16", "flags": "causal+mask_add", "head_dim": 128, "nk": 8192, "nq": 4096}
    assert k.text == "dtype=bf16,flags=causal+mask_add,head_dim=128,nk=8192,nq=4096"
    assert configs.parse_key(k.text) == k
    assert attention_key("fp16", 64, 1, 16, {}) == {"dtype": "fp16", "flags": "none", "head_dim": 64, "nk": 16,
                                                    "nq": 16}  # fmt: skip
    assert KE.tuning_key(torch.float32, 768, 5000, 1) == {"d": 768, "dtype": "fp32", "pos_mode": 1, "tokens": 8192}
    assert KE.tuning_key(torch.float16, 768, 5000) == {"d": 768, "dtype": "fp16", "tokens": 8192}
    assert KN.tuning_key("float32", 300, 5, sparse=False) == {"d": 300, "dtype": "fp32", "k": 5, "sparse": 0}
    assert [configs.bucket(n) for n in (0, 1, 16, 17, 4096, 4097)] == [16, 16, 16, 32, 4096, 8192]
    # a key is read-only, hashable and picklable (it travels to the compile workers), and memoized
    assert KE.tuning_key(torch.float32, 768, 5000, 1) is KE.tuning_key(torch.float32, 768, 5000, 1)
    assert configs.key(flags={"causal": True, "window": 0, "split": 4}) == {"flags": "causal+split4"}
    assert hash(k) == hash(configs.parse_key(k.text)) and pickle.loads(pickle.dumps(k)) == k
    with pytest.raises(TypeError):
        k["nq"] = 1
    with pytest.raises(ValueError):
        configs.normalize_key({"flags": "a,b"})
    with pytest.raises(ValueError):
        configs.parse_key("dtype=bf16,head_dim")


# ------------------------------------------------------------------------------------------------------ tables


def test_table_json_round_trip(tmp_path):
    t = table({"attention.fwd": {ks(akey(4096)): A},
               "embedding.fwd": {ks({"dtype": "bf16", "d": 768, "tokens": 8192, "pos_mode": 1}): {
                   "BLOCK_T": 8, "BLOCK_D": 256, "num_warps": 4}}},
              device="NVIDIA H200", triton="3.6.0", torch="2.11.0", date="2026-12-01T00:00:00Z")  # fmt: skip
    path = tmp_path / "nvidia_h200.json"
    tune.write_table(str(path), t)
    raw = json.loads(path.read_text())
    assert raw["format"] == configs.FORMAT and raw["triton"] == "3.6.0" and raw["date"].startswith("2026")
    back = configs.read_table(str(path))
    assert back["kernels"] == t["kernels"]
    assert {k: back[k] for k in ("device", "triton", "torch", "date")} == {k: t[k] for k in ("device", "triton",
                                                                                             "torch", "date")}
    tune.write_table(str(path), back)  # a second round trip changes nothing
    assert json.loads(path.read_text()) == raw
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]
    assert sorted(k for k, _, _ in tune.entries(back)) == ["attention.fwd", "embedding.fwd"]


def test_env_folders_add_and_override(tmp_path, monkeypatch):
    k1, k2, k3 = (ks(akey(n)) for n in (1024, 4096, 16384))
    put(Path(configs.PACKAGE_DIR), "NVIDIA H200", {"attention.fwd": {k1: A, k2: A}})
    first, second = tmp_path / "first", tmp_path / "second"
    put(first, "NVIDIA H200", {"attention.fwd": {k2: B}})
    put(second, "NVIDIA H200", {"attention.fwd": {k2: HEUR, k3: HEUR}})
    assert configs.lookup("attention.fwd", akey(4096), "NVIDIA H200") == (A, "exact")
    monkeypatch.setenv(configs.ENV_DIRS, os.pathsep.join([str(first), str(second)]))
    assert configs.lookup("attention.fwd", akey(4096), "NVIDIA H200") == (A, "exact")  # read once per process
    configs.clear_cache()
    got = {n: configs.lookup("attention.fwd", akey(n), "NVIDIA H200") for n in (1024, 4096, 16384)}
    assert got == {1024: (A, "exact"), 4096: (B, "exact"), 16384: (HEUR, "exact")}  # the first folder wins
    assert len(configs.load_table("nvidia_h200")["sources"]) == 3
    monkeypatch.setenv(configs.ENV_ENABLED, "0")
    configs.clear_cache()
    assert configs.lookup("attention.fwd", akey(4096), "NVIDIA H200") == (None, "miss")


def test_lookup_exact_then_nearest_bucket(tmp_path, monkeypatch):
    monkeypatch.setenv(configs.ENV_DIRS, str(tmp_path))
    put(tmp_path, "NVIDIA H200", {"attention.fwd": {ks(akey(1024)): A,
                                                    ks(akey(16384)): B,
                                                    ks(akey(1024, causal=False)): HEUR}})  # fmt: skip
    look = lambda key: configs.lookup("attention.fwd", key, "NVIDIA H200")  # noqa: E731
    assert look(akey(1000)) == (A, "exact")  # 1000 is in the 1024 bucket
    assert look(akey(2048)) == (A, "nearest")  # log2 distance 2 against 6
    assert look(akey(8192)) == (B, "nearest")
    assert look(akey(4096)) == (A, "nearest")  # a tie (4 and 4) goes to the smaller key string, every time
    assert look(attention_key("bf16", 128, 64, 16384, {"CAUSAL": True})) == (A, "nearest")
    assert look(akey(4096, causal=False)) == (HEUR, "nearest")  # flags must match
    for key in (akey(4096, dtype=torch.float16), akey(4096, d=64), akey(4096, SOFTCAP=True)):
        assert look(key) == (None, "miss")
    assert configs.lookup("attention.bwd_dq", akey(1024), "NVIDIA H200") == (None, "miss")
    assert configs.lookup("attention.fwd", akey(1024), "NVIDIA H100") == (None, "miss")  # another device's table
    got, _ = look(akey(1024))
    got["BLOCK_M"] = 1  # callers get a copy
    assert look(akey(1024)) == (A, "exact")


def test_bad_tables_warn_and_are_ignored(tmp_path, monkeypatch):
    monkeypatch.setenv(configs.ENV_DIRS, str(tmp_path))
    (tmp_path / "nvidia_h200.json").write_text("{not json")
    with pytest.warns(configs.TunedConfigWarning, match="cannot be read"):
        assert configs.lookup("attention.fwd", akey(1024), "NVIDIA H200") == (None, "miss")
    good = ks(akey(1024))
    (tmp_path / "nvidia_h200.json").write_text(json.dumps({"format": 1, "kernels": {"attention.fwd": {
        good: {"config": A}, ks(akey(4096)): {"config": "BLOCK_M=64"}, "no-key": {"config": B}}}}))
    configs.clear_cache()
    with pytest.warns(configs.TunedConfigWarning, match="2 malformed entries"):
        assert configs.lookup("attention.fwd", akey(4096), "NVIDIA H200") == (A, "nearest")
    (tmp_path / "nvidia_h200.json").write_text(json.dumps({"format": 99, "kernels": {}}))
    configs.clear_cache()
    with pytest.warns(configs.TunedConfigWarning, match="format 99"):
        assert configs.lookup("attention.fwd", akey(1024), "NVIDIA H200") == (None, "miss")


# ------------------------------------------------------------------------------------------------------ launching


class Launches:
    """A stand-in launch: records the configs it was called with, raises for the configs in ``bad``."""

    def __init__(self, bad=()):
        self.calls: list[dict] = []
        self.bad = [configs.format_config(c) for c in bad]

    def __call__(self, config):
        self.calls.append(config)
        if configs.format_config(config) in self.bad:
            raise RuntimeError("out of resource: shared memory, Required: 262144, Hardware limit: 232448")
        return "ran"


@pytest.fixture
def cpu_table(tmp_path, monkeypatch):
    """A table for the "cpu" device (the tests' tensors' device) with attention.fwd at N = 1024 (A)."""
    monkeypatch.setenv(configs.ENV_DIRS, str(tmp_path))
    put(tmp_path, "cpu", {"attention.fwd": {ks(akey(1024)): A}})


def test_run_chooses_tuned_then_autotune_then_heuristic(cpu_table, monkeypatch):
    launch = Launches()
    assert configs.run("attention.fwd", akey(1024), HEUR, launch, device="cpu") == "ran"
    assert launch.calls == [A] and configs.last("attention.fwd") == ("tuned", A, akey(1024))
    configs.run("attention.fwd", akey(2048), HEUR, launch, device=torch.device("cpu"))
    assert launch.calls[-1] == A and configs.last("attention.fwd") == ("tuned(nearest)", A, akey(2048))

    tuned = []

    def autotune():
        tuned.append(1)
        return B

    monkeypatch.setattr(configs, "autotune_enabled", lambda: True)
    configs.run("attention.fwd", akey(1024, causal=False), HEUR, launch, autotune=autotune, device="cpu")
    assert tuned == [1] and launch.calls[-1] == A  # autotune launched, not launch()
    assert configs.last("attention.fwd")[:2] == ("autotuned", B)
    configs.run("attention.fwd", None, HEUR, launch, autotune=autotune, device="cpu")  # no key: no table, no tuning
    assert tuned == [1] and launch.calls[-1] == HEUR and configs.last("attention.fwd") == ("heuristic", HEUR, None)
    monkeypatch.setattr(configs, "autotune_enabled", lambda: False)
    configs.run("attention.fwd", akey(1024, causal=False), HEUR, launch, autotune=autotune, device="cpu")
    assert tuned == [1] and launch.calls[-1] == HEUR and configs.last("attention.fwd")[0] == "heuristic"
    assert list(configs.last()) == ["attention.fwd"]
    configs.forget("embedding")
    assert configs.last("attention.fwd") is not None
    configs.forget("attention")
    assert configs.last("attention.fwd") is None and configs.last() == {}


def test_a_failing_tuned_config_falls_back_with_one_warning(cpu_table):
    launch = Launches(bad=[A])
    with pytest.warns(configs.TunedConfigWarning, match=r"BLOCK_M=128 .* attention.fwd failed .*shared memory"):
        assert configs.run("attention.fwd", akey(1024), HEUR, launch, device="cpu") == "ran"
    assert launch.calls == [A, HEUR] and configs.last("attention.fwd")[:2] == ("heuristic(fallback)", HEUR)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per config and process: no second warning, no second try
        configs.run("attention.fwd", akey(1024), HEUR, launch, device="cpu")
        configs.run("attention.fwd", akey(2048), HEUR, launch, device="cpu")  # the same config, nearest
    assert launch.calls == [A, HEUR, HEUR, HEUR] and configs.last("attention.fwd")[0] == "heuristic(fallback)"
    with pytest.raises(RuntimeError, match="shared memory"):  # the heuristic's own errors are real errors
        configs.run("attention.fwd", akey(1024, causal=False), A, launch, device="cpu")
    assert not hasattr(configs, "guard")  # one fallback road: run's


def test_tuning_forces_one_kernel_and_keeps_the_others_heuristic(cpu_table, monkeypatch):
    monkeypatch.setattr(configs, "autotune_enabled", lambda: True)
    launch = Launches(bad=[B])
    with configs.tuning("attention.bwd_dq", B):
        configs.run("attention.fwd", akey(1024), HEUR, launch, autotune=lambda: A, device="cpu")
        assert launch.calls == [HEUR]  # not the table's A, not autotuned
        with pytest.raises(RuntimeError):  # the tuner sees a forced config's failure
            configs.run("attention.bwd_dq", akey(1024), HEUR, launch, device="cpu")
    with configs.tuning("attention.fwd", B | {"num_warps": 2}):
        configs.run("attention.fwd", akey(1024), HEUR, launch, device="cpu")
    assert launch.calls[-1] == B | {"num_warps": 2} and configs.last("attention.fwd")[0] == "forced"
    configs.run("attention.fwd", akey(1024), HEUR, launch, device="cpu")
    assert launch.calls[-1] == A  # outside: the table again


def test_the_harness_cell_says_what_ran(cpu_table):
    """The CSV's config column comes from configs.last() through the harness; its reset forgets it; the summary's
    count reads the cell back."""
    configs.run("attention.fwd", akey(1024), HEUR, Launches(), device="cpu")
    configs.run("attention.bwd_dq", akey(1024), HEUR, Launches(), device="cpu")
    configs.run("embedding.fwd", None, {"BLOCK_T": 4}, Launches(), device="cpu")
    cell = harness.chosen_config("attention")
    assert cell == ("fwd: tuned BLOCK_M=128 BLOCK_N=64 warps=8 stages=3; "
                    "bwd_dq: heuristic BLOCK_M=32 BLOCK_N=32 warps=4 stages=1")  # fmt: skip
    assert harness.point_source(cell) == "mixed"
    assert harness.point_source("fwd: tuned(nearest) BLOCK_M=1") == "tuned"
    assert harness.point_source("backend=reference") == "" and harness.point_source("") == ""
    harness.reset_configs("attention")
    assert harness.chosen_config("attention") == "" and harness.chosen_config("embedding") == "fwd: heuristic BLOCK_T=4"


# ------------------------------------------------------------------------------------------------------ tune


class Clock:
    """The fake clock of a tune run, and its budget alarm: ``advance`` past the armed time raises OutOfTime there,
    as SIGALRM does."""

    def __init__(self):
        self.t = 0.0
        self.alarm_at: float | None = None

    def __call__(self):
        return self.t

    def alarm(self, delay_s):
        self.alarm_at = None if delay_s is None else self.t + delay_s

    def advance(self, dt):
        if self.alarm_at is not None and self.t + dt >= self.alarm_at:
            self.t, self.alarm_at = self.alarm_at, None
            raise tune.OutOfTime
        self.t += dt


class FakeBench:
    def __init__(self, backend, t):
        self.backend, self.t = backend, t

    def call(self):
        if self.backend.wired:
            key = dict(self.t.key) if self.backend.launcher_key is None else self.backend.launcher_key
            configs.run(self.t.kernel, key, HEUR, lambda c: None)


class FakeBackend:
    """Times a config as ``ms[format_config(config)]`` (1.0 s of the fake clock per timing); raises for ``bad``.
    ``compile_s``: fake seconds a config's first launch in the main process compiles (the heuristic run's too);
    ``pool_s``: seconds a batch of parallel compiles takes (the wait stops at its timeout)."""

    name = "Fake GPU 9000"

    def __init__(self, clock, ms, bad=(), compile_bad=(), wired=True, interrupt_at=None, launcher_key=None,
                 compile_s=0.0, pool_s=0.0):  # fmt: skip
        self.clock, self.ms, self.bad, self.compile_bad = clock, ms, set(bad), set(compile_bad)
        self.wired, self.interrupt_at, self.launcher_key = wired, interrupt_at, launcher_key
        self.compile_s, self.pool_s, self.seen = compile_s, pool_s, set()
        self.workers, self.batch_jobs = 2, 8
        self.timed: list[tuple[str, str]] = []
        self.compiled: list[tuple[str, str]] = []
        self.closed = False

    def _compile(self, t, config):
        ident = (t.group, configs.format_config(config))
        if ident not in self.seen:
            self.clock.advance(self.compile_s)
            self.seen.add(ident)

    def bench(self, t):
        self._compile(t, HEUR)
        return FakeBench(self, t)

    def time(self, bench, kernel, config):
        self._compile(bench.t, config)
        self.clock.advance(1.0)
        if self.interrupt_at is not None and len(self.timed) + 1 >= self.interrupt_at:
            raise KeyboardInterrupt
        f = configs.format_config(config)
        self.timed.append((bench.t.label, f))
        if f in self.bad:
            raise RuntimeError("out of resource: shared memory")
        return self.ms[f]

    def precompile(self, jobs, timeout_s):
        if self.pool_s > timeout_s:
            self.clock.advance(timeout_s)
            return {}
        self.clock.advance(self.pool_s)
        self.seen |= {(t.group, configs.format_config(c)) for t, c in jobs}
        self.compiled += [(t.label, configs.format_config(c)) for t, c in jobs]
        return {(t.group, configs.format_config(c)): ("CompilationError: no" if configs.format_config(c)
                                                      in self.compile_bad else None) for t, c in jobs}  # fmt: skip

    def close(self):
        self.closed = True


MS = {configs.format_config(HEUR): 3.0, configs.format_config(A): 1.0, configs.format_config(B): 2.0}
GRID = ["--suite", "attention", "--tiny", "--dtype", "fp32"]  # 4 keys x (fwd, bwd_dkdv, bwd_dq): 12 targets


def run_tune(tmp_path, backend, *args, clock=None):
    lines: list[str] = []
    clock = clock or backend.clock
    code = tune.main([*GRID, "--out", str(tmp_path / "out"), *args], backend=backend, clock=clock,
                     alarm=clock.alarm, log=lines.append)  # fmt: skip
    path = tmp_path / "out" / "fake_gpu_9000.json"
    return code, (json.loads(path.read_text()) if path.exists() else None), "\n".join(lines)


@pytest.fixture
def two_candidates(monkeypatch):
    monkeypatch.setattr(tune, "candidates", lambda t: [dict(A), dict(B)])


def test_tune_writes_winner_runner_up_and_metadata(tmp_path, two_candidates):
    backend = FakeBackend(Clock(), MS)
    code, tb, log = run_tune(tmp_path, backend)
    assert code == 0 and backend.closed
    assert tb["device"] == "Fake GPU 9000" and tb["device_key"] == "fake_gpu_9000"
    assert tb["triton"] == harness.versions()["triton"] and tb["torch"] == torch.__version__
    assert tb["date"].endswith("Z") and tb["command"].startswith("python -m benchmarks.tune --suite attention")
    entries = list(tune.entries(tb))
    assert len(entries) == 12 and tb["last_run"]["tuned"] == 12 and tb["last_run"]["skipped"] == []
    for _, _, e in entries:
        assert (e["config"], e["ms"], e["runner_up"], e["runner_up_ms"]) == (A, 1.0, B, 2.0)
        assert (e["heuristic"], e["heuristic_ms"], e["tried"], e["failed"]) == (HEUR, 3.0, 3, 0)
        assert e["shape"] and e["mode"] in ("fwd", "bwd") and e["triton"] == tb["triton"]
    # every candidate was compiled in parallel before it was timed, once per compile group (not per length)
    assert {c for _, c in backend.compiled} == {configs.format_config(A), configs.format_config(B)}
    assert len(backend.compiled) == len({(t, c) for t, c in backend.compiled}) == 2 * 6  # 6 groups
    assert "tuned 12 keys, 0 failed, 0 skipped" in log
    # the written table is what the launchers read
    os.environ[configs.ENV_DIRS] = str(tmp_path / "out")
    try:
        configs.clear_cache()
        key = attention_key("fp32", 16, 64, 64, {"CAUSAL": True})
        assert configs.lookup("attention.bwd_dq", key, "Fake GPU 9000") == (A, "exact")
    finally:
        del os.environ[configs.ENV_DIRS]


def test_tune_budget_keeps_finished_keys_and_lists_the_rest(tmp_path, two_candidates):
    backend = FakeBackend(Clock(), MS)  # 3 timings = 3 s a key
    code, tb, log = run_tune(tmp_path, backend, "--max-seconds", "10")
    assert code == 0
    # 9 s of the 10 (1 s kept for writing): a 4th key would not fit (its kernel's last key took 3 s)
    assert len(list(tune.entries(tb))) == 2 and backend.clock.t <= 9
    assert len(tb["last_run"]["skipped"]) == 10 and tb["last_run"]["budget_s"] == 10
    assert "tuned 2 keys, 0 failed, 10 skipped" in log and "skipped: attention." in log
    # a second run tunes only what the table lacks
    backend2 = FakeBackend(Clock(), MS)
    code, tb2, log2 = run_tune(tmp_path, backend2)
    assert code == 0 and len(list(tune.entries(tb2))) == 12
    assert len({label for label, _ in backend2.timed}) == 10 and "(2 already in the table)" in log2
    backend3 = FakeBackend(Clock(), MS)
    run_tune(tmp_path, backend3, "--retune")
    assert len({label for label, _ in backend3.timed}) == 12


@pytest.mark.parametrize("costs", [dict(compile_s=40.0), dict(pool_s=30.0, compile_s=15.0),
                                   dict(pool_s=8.0, compile_s=2.0)])
def test_tune_budget_bounds_the_whole_run_compiles_included(tmp_path, two_candidates, costs):
    """--max-seconds 20 ran 167 s on a GPU: the first compiles in the main process ran past every deadline. The
    budget counts from the command's start and stops a compile that would run past it (SIGALRM; here the fake
    clock's alarm): the run ends within it, keeps what it finished and lists the rest."""
    clock = Clock()
    backend = FakeBackend(clock, MS, **costs)
    code, tb, log = run_tune(tmp_path, backend, "--max-seconds", "20")
    assert code == 0 and backend.closed
    assert clock.t <= 20 - 2.0  # the reserve (10 %) is left for closing and writing
    done = len(list(tune.entries(tb)))
    assert done + len(tb["last_run"]["skipped"]) == 12
    assert tb["last_run"]["seconds"] == pytest.approx(clock.t, abs=0.1)
    assert ("budget ran out" in log) or done == 12
    if costs == dict(pool_s=8.0, compile_s=2.0):  # a budget that fits some keys tunes them
        assert done > 0


def test_tune_budget_counts_the_start_up(tmp_path, two_candidates, monkeypatch):
    """Time spent before tuning begins (imports, CUDA start-up, the input builders) is the budget's too."""
    clock = Clock()
    real_plan = tune.plan

    def slow_plan(*args):
        clock.advance(25.0)
        return real_plan(*args)

    monkeypatch.setattr(tune, "plan", slow_plan)
    code, tb, log = run_tune(tmp_path, FakeBackend(clock, MS), "--max-seconds", "20")
    assert code == 0 and clock.t <= 20 and tb is None
    assert "ran out before tuning began" in log


def test_budget_alarm_is_real_sigalrm():
    """The real hard stop raises OutOfTime in the main thread and is disarmed after."""
    import time

    if not hasattr(__import__("signal"), "setitimer"):
        pytest.skip("no SIGALRM here")
    with pytest.raises(tune.OutOfTime):
        tune.signal_alarm(0.01)
        while True:
            time.sleep(0.001)
    tune.signal_alarm(None)


def test_tune_interrupted_keeps_what_it_finished(tmp_path, two_candidates):
    backend = FakeBackend(Clock(), MS, interrupt_at=5)  # in the middle of the second key
    code, tb, log = run_tune(tmp_path, backend)
    assert code == 0 and backend.closed
    assert len(list(tune.entries(tb))) == 1 and tb["last_run"]["interrupted"] is True
    assert len(tb["last_run"]["skipped"]) == 11 and all("(interrupted)" in s for s in tb["last_run"]["skipped"])
    assert "interrupted" in log


def test_tune_counts_failing_configs_and_never_stops(tmp_path, two_candidates):
    backend = FakeBackend(Clock(), MS, bad=[configs.format_config(A)], compile_bad=[configs.format_config(A)])
    code, tb, log = run_tune(tmp_path, backend)
    assert code == 0
    for _, _, e in tune.entries(tb):
        assert (e["config"], e["runner_up"], e["failed"], e["tried"]) == (B, HEUR, 1, 3)
    assert re.search(r"compiled \d+ of \d+ candidate configs in parallel .*; \d+ failed, e.g. CompilationError", log)
    assert "1 config(s) failed, e.g. BLOCK_M=128" in log
    everything = FakeBackend(Clock(), {}, bad=[configs.format_config(c) for c in (A, B, HEUR)])
    code, tb, log = run_tune(tmp_path / "all", everything)
    assert code == 0 and not list(tune.entries(tb)) and len(tb["last_run"]["failed"]) == 12


def test_tune_refuses_to_tune_unwired_launchers(tmp_path, two_candidates):
    backend = FakeBackend(Clock(), MS, wired=False)
    code, tb, log = run_tune(tmp_path, backend)
    assert code == 1 and not list(tune.entries(tb))
    assert tb["last_run"]["not_wired"] == ["attention.bwd_dkdv", "attention.bwd_dq", "attention.fwd"]
    assert log.count("does not choose configs through embedattn.configs.run") == 3 and not backend.timed


def test_tune_stores_the_key_the_launcher_looks_up(tmp_path, two_candidates):
    used = attention_key("fp32", 16, 64, 64, {"CAUSAL": True, "SOFTCAP": True})
    backend = FakeBackend(Clock(), MS, launcher_key=used)
    code, tb, log = run_tune(tmp_path, backend, "--max-seconds", "4")
    assert code == 0 and list(tb["kernels"]["attention.fwd"]) == [used.text]
    assert "the launcher looks up dtype=fp32,flags=causal+softcap" in log


def test_tune_list_and_bad_arguments(tmp_path, capsys):
    pytest.importorskip("triton")
    from embedattn.kernels import negative_sampling as KN

    path = put(Path(configs.PACKAGE_DIR), "NVIDIA H200", {"negative_sampling.fwd": {
        KN.tuning_key("fp32", 128, 5).text: {"BLOCK_B": 4}}})
    assert path.exists()
    lines: list[str] = []
    assert tune.main(["--list", "--device-name", "NVIDIA H200", "--suite", "negative_sampling"], log=lines.append) == 0
    assert sorted(ln.split()[0] + " " + ln.split()[1] for ln in lines[:-1]) == [
        "have negative_sampling.fwd", "todo negative_sampling.bwd", "todo negative_sampling.bwd",
        "todo negative_sampling.fwd"]
    assert lines[-1] == "4 keys for NVIDIA H200 (nvidia_h200): 1 in the table, 3 to tune"
    for args, message in [(["--dtype", "fp64"], "argument --dtype: 'fp64' not one of fp16, bf16, fp32"),
                          (["--suite", "attn"], "argument --suite: 'attn' not one of attention, embedding, "
                                                "negative_sampling, all"),
                          (["--suite", "all,ring"], "argument --suite: 'ring' not one of attention, embedding, "
                                                    "negative_sampling, all"),
                          (["--device", "cpu"], "--device cpu needs --out (a CPU table does not belong in the "
                                                "package)"),
                          (["--compile-workers", "-1"], "argument --compile-workers: must be >= 0"),
                          (["--max-seconds", "0"], "argument --max-seconds: must be > 0, got 0")]:  # fmt: skip
        with pytest.raises(SystemExit) as e:
            tune.main(args)
        assert e.value.code == 2
        assert capsys.readouterr().err == f"python -m benchmarks.tune: error: {message}\n"
    assert tune.parse_args(["--suite", "embedding,all", "--list"]).suites == tune.SUITES


def test_the_grid_is_the_sweep():
    """The targets are the suites' own points (benchmarks/<suite>.py specs) at their keys, once per key, in the
    sweep's order, on the CUDA sweep without a GPU."""
    pytest.importorskip("triton")
    from benchmarks import attention as SA
    from benchmarks import embedding as SE
    from benchmarks import negative_sampling as SN
    from embedattn.kernels import embedding as KE

    ctx = tune.context("cuda", "full", ["bf16"])
    targets = tune.plan(tune.SUITES, ctx)
    assert len({(t.kernel, t.ks) for t in targets}) == len(targets)
    att = [t for t in targets if t.kernel == "attention.fwd"]
    specs = [s for s in SA.specs(ctx) if s.feature != "kvcache"]
    assert {(t.spec.n, t.spec.head_dim, t.spec.causal, t.spec.feature) for t in att} == {
        (s.n, s.head_dim, s.causal, s.feature) for s in specs}
    assert att[0].spec is not None and att[0].key == akey(att[0].spec.n, d=att[0].spec.head_dim,
                                                          causal=att[0].spec.causal)
    assert [t.spec.n for t in att[:3]] == [s.n for s in specs[:3]]  # the sweep's order: most telling first
    assert {t.key["flags"] for t in att} == {"none", "causal", "window", "causal+softcap", "alibi+causal",
                                             "causal+dropout", "causal+varlen"}  # fmt: skip
    assert all(t.mode == "fwd" for t in att)
    assert {t.mode for t in targets if t.kernel.startswith("attention.bwd")} == {"bwd"}
    emb = {(t.spec.dim, t.spec.batch * t.spec.seq) for t in targets if t.kernel == "embedding.fwd"}
    assert emb == {(s.dim, s.batch * s.seq) for s in SE.specs(ctx)}
    for t in targets:
        if t.kernel in ("embedding.bwd_atomic", "embedding.bwd_sorted"):  # the scatter the backward picks there
            s = t.spec
            mode = KE.scatter_mode(s.vocab, s.batch * s.seq, s.dim, torch.bfloat16, False)
            assert t.kernel == f"embedding.bwd_{mode}"
    ns = [t for t in targets if t.suite == "negative_sampling"]
    assert {t.spec.dim for t in ns} == {s.dim for s in SN.specs(ctx)}
    assert all(t.spec.pairs == max(s.pairs for s in SN.specs(ctx)) for t in ns)  # no batch in the key: the largest
    assert {t.kernel for t in targets} >= {"attention.fwd", "attention.bwd_dkdv", "attention.bwd_dq", "embedding.fwd",
                                           "embedding.bwd_pos", "negative_sampling.fwd", "negative_sampling.bwd"}
    assert all(t.key["dtype"] == "bf16" for t in targets if t.suite != "negative_sampling") and \
        {t.key["dtype"] for t in ns} == {"bf16"}  # --dtype reaches every suite


def test_candidates_come_from_the_kernels():
    pytest.importorskip("triton")
    from embedattn.kernels import embedding as KE
    from embedattn.kernels import negative_sampling as KN

    ctx = tune.context("cuda", "full", ["fp16"])
    seen = {}
    for t in tune.plan(tune.SUITES, ctx) + tune.plan(["embedding"], tune.context("cuda", "full", ["fp32"])):
        seen.setdefault(t.kernel, tune.candidates(t))
    assert set(seen) >= {"attention.fwd", "attention.bwd_dq", "embedding.bwd_atomic", "negative_sampling.bwd"}
    for kernel, cands in seen.items():
        assert cands and all("num_warps" in c for c in cands), kernel
    assert seen["negative_sampling.fwd"] == [configs.as_dict(c) for c in KN.CONFIGS]  # BLOCK_K: the launcher's
    assert all(c in [configs.as_dict(k) for k in KE.SORTED_CONFIGS] for c in seen.get("embedding.bwd_sorted", []))
    assert all(c["BLOCK_D"] <= 1024 for c in seen["embedding.fwd"])  # pruned at D = 768 as the autotuner prunes
    source = Path(tune.__file__).read_text()
    for private in ("KA._", "KE._", "KN._", "_configs()", "_prune", "_fixed_"):
        assert private not in source, private


def test_the_real_launchers_run_on_the_tiny_grid(monkeypatch):
    """The suites' inputs and embedattn calls, on the device of the test run (the interpreter on CPU): one target
    per suite (the backward ones build their forward too), the first candidate of each list."""
    pytest.importorskip("triton")
    monkeypatch.setenv("EMBEDATTN_BACKEND", "triton")  # DeviceBackend sets it; restored after the test
    ctx = tune.context(DEVICE, "tiny", ["fp32"], warmup_ms=0, rep_ms=0)
    targets = tune.plan(tune.SUITES, ctx)
    picked = [next(t for t in targets if t.kernel == k) for k in ("attention.bwd_dkdv", "embedding.fwd",
                                                                  "negative_sampling.bwd")]
    backend = tune.DeviceBackend(ctx, workers=0, log=lambda s: None)
    tb: dict = {"kernels": {}}
    out = tune.tune(picked, backend, tb, log=lambda s: None, max_candidates=1)
    assert not out.failed and not out.unwired, (out.failed, out.unwired)
    assert len(out.tuned) == len(picked)
    for kernel, _, e in tune.entries(tb):
        assert e["ms"] > 0 and e["tried"] >= 1, kernel


@pytest.mark.cuda
@pytest.mark.skipif(not ON_CUDA, reason="the compile pool needs a CUDA device")
def test_compile_pool_fills_the_cache(monkeypatch):
    """Two worker processes compile (without launching) two candidates of a tiny key; the main process then
    launches them from Triton's cache."""
    monkeypatch.setenv("EMBEDATTN_BACKEND", "triton")
    ctx = tune.context("cuda", "tiny", ["fp32"], warmup_ms=1, rep_ms=2)
    t = next(t for t in tune.plan(["negative_sampling"], ctx) if t.kernel == "negative_sampling.fwd")
    cands = tune.candidates(t)[:2]
    backend = tune.DeviceBackend(ctx, workers=2, log=print)
    try:
        got = backend.precompile([(t, c) for c in cands], timeout_s=300)
        assert got == {(t.group, configs.format_config(c)): None for c in cands}
        bench = backend.bench(t)
        for c in cands:
            assert backend.time(bench, t.kernel, c) > 0
    finally:
        backend.close()
