"""Run FlashAttention 2's own test files against embedattn (issue #28): ``python tests/integrations/flash_attn_suite.py
FA_PATH [options]``; see docs/flash_attn_suite.md. Not collected by pytest (not named test_*.py).

FA_PATH is a flash-attention checkout, its git dir (bare or not: the files are read from ``--rev``, default HEAD),
or one test file inside a checkout. In a temporary directory the runner builds a stand-in ``flash_attn`` package:

* ``flash_attn`` / ``flash_attn.flash_attn_interface``: embedattn.flash_attn_interface's functions (plus
  ``USE_TRITON_ROCM = False`` and ``_get_block_size_n``, see _FA_INTERFACE);
* ``flash_attn.layers.rotary``: ``apply_rotary_emb`` is ``embedattn.rotary.rotary`` (FlashAttention's argument
  order), ``apply_rotary_emb_qkv_`` / ``apply_rotary_emb_kv_`` are embedattn's when it has them (else they raise
  NotImplementedError, so those cases fail with that cause); the oracle ``apply_rotary_emb_torch`` and
  ``rotate_half`` are FlashAttention's own, copied from the checkout;
* ``flash_attn.bert_padding``: FlashAttention's file, copied (pure PyTorch test plumbing: pad/unpad).

It copies tests/test_flash_attn.py and tests/test_rotary.py with mechanical edits only (each printed): CUDA
capability queries read as an sm80 GPU, total_memory as 80 GiB, "cuda" -> "cpu", and integer ``seqlen = N``
assignments in test bodies shrunk. A conftest (written next to them) shrinks the size parameters (seqlen*,
paged_kv_block_size) with the same rule, optionally samples each test's parametrization (a seeded uniform sample
of the cartesian product, never materialized: FlashAttention's full grid is ~4e5 cases), skips the tests that
import FlashAttention internals (flash_attn_gpu, flash_attn.ops, private _flash_attn_* functions), and records
every outcome. Test bodies, oracles and tolerances are untouched. The runner then prints pass / fail / skip
counts per test and the failures grouped by the first line of their exception (numbers folded to N).

Nothing of FlashAttention's is written into this repository: the copies live in the temporary directory.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from collections import Counter, defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TEST_FILES = ("tests/test_flash_attn.py", "tests/test_rotary.py")
# the interpreter runs every program of every launch in Python: the tests that loop over whole forward/backward
# passes (50 to 250 times) cost minutes to hours per case there
INTERPRET_SAMPLE_FOR = ("test_flash_attn_race_condition=-1,test_flash_attn_deterministic=1,"
                        "test_flash_attn_varlen_deterministic=1")
HELPERS = ("flash_attn/bert_padding.py", "flash_attn/layers/rotary.py")

# ------------------------------------------------------------------------------------------- the stand-in package
_FA_INIT = '''"""Stand-in flash_attn built by embedattn's tests/integrations/flash_attn_suite.py."""
from .flash_attn_interface import *  # noqa: F401,F403
from .flash_attn_interface import __all__  # noqa: F401
'''

# _get_block_size_n is only read by FlashAttention's test helper normalize_flash_attn_S, which rescales S_dmask
# block by block with the running max of each key block. Unless embedattn exports its own, one block spans every
# key: the test then reads S_dmask as exp(scores - row max), dropped entries negated.
_FA_INTERFACE = '''"""Stand-in flash_attn.flash_attn_interface: embedattn.flash_attn_interface's functions."""
import embedattn.flash_attn_interface as _ea
from embedattn.flash_attn_interface import *  # noqa: F401,F403

__all__ = list(_ea.__all__)
USE_TRITON_ROCM = False


def _get_block_size_n(device, head_dim, is_dropout, is_causal):
    own = getattr(_ea, "_get_block_size_n", None)
    return own(device, head_dim, is_dropout, is_causal) if own is not None else 1 << 30
'''

_FA_ROTARY = '''"""Stand-in flash_attn.layers.rotary: embedattn's rotary, FlashAttention's own pure-PyTorch oracle."""
import importlib

import torch  # noqa: F401
from einops import rearrange, repeat  # noqa: F401

_PLACES = ("embedattn.rotary", "embedattn.flash_attn_interface", "embedattn")


def _embedattn(name, fallback=None):
    for place in _PLACES:
        fn = getattr(importlib.import_module(place), name, None)
        if fn is not None:
            return fn
    if fallback is not None:
        return fallback

    def missing(*args, **kwargs):
        raise NotImplementedError(f"embedattn has no counterpart of flash_attn.layers.rotary.{name}")

    missing.__name__ = name
    return missing


apply_rotary_emb = _embedattn("apply_rotary_emb", importlib.import_module("embedattn.rotary").rotary)
apply_rotary_emb_qkv_ = _embedattn("apply_rotary_emb_qkv_")
apply_rotary_emb_kv_ = _embedattn("apply_rotary_emb_kv_")

# ---- FlashAttention's oracle, copied from its flash_attn/layers/rotary.py:
'''

_CONFTEST = r'''"""Written by embedattn's tests/integrations/flash_attn_suite.py: sizes, sampling, skips, outcomes."""
import inspect
import itertools
import json
import os
import random
import re
import signal
import zlib

import pytest
import torch

SHRINK = int(os.environ["FA_SUITE_SHRINK"])
SAMPLE = int(os.environ["FA_SUITE_SAMPLE"])
SAMPLE_FOR = {k.strip(): int(v) for k, v in (kv.split("=") for kv in os.environ["FA_SUITE_SAMPLE_FOR"].split(",")
                                             if kv)}
SEED = int(os.environ["FA_SUITE_SEED"])
CASE_TIMEOUT = float(os.environ["FA_SUITE_CASE_TIMEOUT"])
DROP_DTYPES = {d for d in os.environ.get("FA_SUITE_DROP_DTYPES", "").split(",") if d}
RESULTS = os.environ["FA_SUITE_RESULTS"]
SIZE_NAMES = {"seqlen", "seqlen_q", "seqlen_k", "paged_kv_block_size"}
INTERNAL = re.compile(r"flash_attn_gpu|flash_attn\.ops|import\s+_flash_attn_|_flash_attn_\w+\s*(,|$)", re.M)


def shrink(n):
    """Sizes above 64 divided by SHRINK, keeping their offset from the nearest multiple (1023, 1024, 1025 stay
    three different lengths, 113 vs 128 keep their order)."""
    if SHRINK <= 1 or isinstance(n, bool) or not isinstance(n, int) or n <= 64:
        return n
    r = round(n / SHRINK)
    return r + (n - SHRINK * r)


def _id(name, value, index):
    if value is None or isinstance(value, (bool, int, float, str)):
        return str(value)
    if isinstance(value, torch.dtype):
        return str(value).replace("torch.", "")
    if isinstance(value, type):
        return value.__name__
    return f"{name}{index}"


@pytest.hookimpl(tryfirst=True)
def pytest_generate_tests(metafunc):
    """FlashAttention's stacked parametrize marks as one: sizes shrunk, bf16 dropped where asked, and with
    SAMPLE > 0 a seeded sample of SAMPLE combinations (indices into the product, decoded on demand)."""
    marks = [m for m in metafunc.definition.own_markers if m.name == "parametrize"]
    if not marks or any(m.kwargs for m in marks):
        return  # nothing to do, or a form this runner does not rewrite: pytest expands it as written
    axes = []
    for m in marks:
        names = m.args[0]
        names = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)
        values = []
        for v in m.args[1]:
            if isinstance(v, type(pytest.param(0))):
                return
            v = tuple(v) if len(names) > 1 else (v,)
            values.append(tuple(shrink(x) if n in SIZE_NAMES else x for n, x in zip(names, v)))
        values = list(dict.fromkeys(values))  # a shrink may merge two sizes
        axes.append((names, values))
    names = [n for ns, _ in axes for n in ns]
    if len(set(names)) != len(names):
        return
    metafunc.definition.own_markers[:] = [m for m in metafunc.definition.own_markers if m.name != "parametrize"]
    sizes = [len(vals) for _, vals in axes]
    total = 1
    for s in sizes:
        total *= s

    def decode(i):
        picks = []
        for s in reversed(sizes):
            i, r = divmod(i, s)
            picks.append(r)
        return list(reversed(picks))

    def keep(picks):
        return not any(str(x).replace("torch.", "") in DROP_DTYPES
                       for (_, vals), p in zip(axes, picks) for x in vals[p] if isinstance(x, torch.dtype))

    sample = SAMPLE_FOR.get(metafunc.function.__name__, SAMPLE)
    if sample < 0:  # left out of this run
        chosen = []
    elif sample == 0 or sample >= total:
        chosen = [list(p) for p in itertools.product(*(range(s) for s in sizes))]
        chosen = [p for p in chosen if keep(p)]
    else:
        rng = random.Random(SEED * 1000003 + zlib.crc32(metafunc.function.__name__.encode()))
        seen, picked = set(), []
        while len(picked) < sample and len(seen) < total:
            i = rng.randrange(total)
            if i in seen:
                continue
            seen.add(i)
            if keep(decode(i)):
                picked.append(i)
        chosen = [decode(i) for i in sorted(picked)]
    params = []
    for picks in chosen:
        vals = [x for (_, v), p in zip(axes, picks) for x in v[p]]
        ids = [_id(n, x, p) for (ns, v), p in zip(axes, picks) for n, x in zip(ns, v[p])]
        params.append(pytest.param(*vals, id="-".join(ids)))
    if not params:
        why = "left out by --sample-for" if sample < 0 else "no combination left after the dtype filter"
        metafunc.parametrize(names, [pytest.param(*([None] * len(names)), marks=pytest.mark.skip(reason=why))])
        return
    metafunc.parametrize(names, params)


def pytest_collection_modifyitems(config, items):
    for item in items:
        fn = getattr(item, "function", None)
        try:
            src = inspect.getsource(fn) if fn is not None else ""
        except (OSError, TypeError):
            src = ""
        if INTERNAL.search(src):
            item.add_marker(pytest.mark.skip(reason="imports FlashAttention internals (not embedattn's to pass)"))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    """--case-timeout: a case past it fails with a TimeoutError (checked between Python bytecodes)."""
    if CASE_TIMEOUT <= 0 or not hasattr(signal, "SIGALRM"):
        yield
        return

    def expired(signum, frame):
        raise TimeoutError(f"case ran past the runner's --case-timeout ({CASE_TIMEOUT:g} s)")

    old = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, CASE_TIMEOUT)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


_config = None


def pytest_configure(config):
    global _config
    _config = config


def _message(report):
    crash = getattr(report.longrepr, "reprcrash", None)
    if crash is not None:
        return crash.message
    if isinstance(report.longrepr, tuple):  # a skip: (path, line, reason)
        return str(report.longrepr[2])
    return str(report.longrepr)


def pytest_runtest_logreport(report):
    if _config is None or hasattr(_config, "workerinput"):  # under xdist the controller records
        return
    if report.when != "call" and report.outcome == "passed":
        return
    with open(RESULTS, "a") as f:
        f.write(json.dumps({"nodeid": report.nodeid, "when": report.when, "outcome": report.outcome,
                            "message": _message(report) if report.outcome != "passed" else "",
                            "duration": report.duration}) + "\n")
'''


# --------------------------------------------------------------------------------------------------- the sources
class Source:
    """Reads FlashAttention's files from a checkout, a git dir (at ``rev``) or around one test file."""

    def __init__(self, path: Path, rev: str):
        self.path, self.rev, self.git, self.root, self.only = path, rev, None, None, None
        if path.is_file():
            self.only = path.name
            self.root = path.resolve().parent.parent  # tests/<file> inside a checkout
        elif (path / "HEAD").is_file() and (path / "objects").is_dir():
            self.git = path
        elif (path / ".git").exists() and not (path / TEST_FILES[0]).is_file():
            self.git = path / ".git"
        elif path.is_dir():
            self.root = path
        else:
            raise SystemExit(f"{path}: not a flash-attention checkout, git dir or test file")

    def read(self, rel: str) -> str:
        if self.only is not None and rel.startswith("tests/") and Path(rel).name == self.only:
            return self.path.read_text()
        if self.git is not None:
            res = subprocess.run(["git", "--git-dir", str(self.git), "show", f"{self.rev}:{rel}"],
                                 capture_output=True, text=True)
            if res.returncode:
                raise SystemExit(f"{self.git}: cannot read {self.rev}:{rel}: {res.stderr.strip()}")
            return res.stdout
        f = self.root / rel
        if not f.is_file():
            raise SystemExit(f"{f}: missing (FA_PATH must be a flash-attention checkout or a file in its tests/)")
        return f.read_text()

    def tests(self, wanted: list[str]) -> list[str]:
        if self.only is not None:
            return [f"tests/{self.only}"]
        return [t for t in TEST_FILES if Path(t).name in wanted]

    def describe(self) -> str:
        if self.git is not None:
            res = subprocess.run(["git", "--git-dir", str(self.git), "rev-parse", self.rev], capture_output=True,
                                 text=True)
            return f"{self.git} at {res.stdout.strip() or self.rev}"
        return str(self.path)


def _functions(src: str, names: set[str]) -> str:
    """The source of the named top-level functions of ``src``."""
    tree = ast.parse(src)
    found = [ast.get_source_segment(src, n) for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in names]
    missing = names - {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
    if missing:
        raise SystemExit(f"flash_attn/layers/rotary.py has no {sorted(missing)}")
    return "\n\n\n".join(found) + "\n"


def shrink(n: int, factor: int) -> int:
    # the conftest's rule (kept in one place there; repeated here for the body literals)
    if factor <= 1 or n <= 64:
        return n
    r = round(n / factor)
    return r + (n - factor * r)


def adapt(src: str, factor: int) -> tuple[str, Counter]:
    """The mechanical CPU edits of a FlashAttention test file, counted per kind."""
    edits = Counter()

    def sub(pattern, repl, text, kind, flags=0):
        new, n = re.subn(pattern, repl, text, flags=flags)
        edits[kind] += n
        return new

    src = sub(r'torch\.cuda\.get_device_capability\((["\'])cuda\1\)', "(8, 0)", src,
              "CUDA capability read as sm80 (8, 0)")
    src = sub(r'torch\.cuda\.get_device_properties\((["\'])cuda\1\)\.total_memory', "(80 * 2**30)", src,
              "total_memory read as 80 GiB")
    src = sub(r'(["\'])cuda\1', '"cpu"', src, 'device "cuda" -> "cpu"')
    src = sub(r"^(\s+seqlen = )(\d+)(\s*)$", lambda m: f"{m[1]}{shrink(int(m[2]), factor)}{m[3]}", src,
              f"body seqlen literal shrunk (/{factor})", flags=re.M)
    left = re.findall(r"torch\.cuda\.\w+", src)
    if left:
        edits[f"left as is: {sorted(set(left))}"] += len(left)
    return src, edits


def build(source: Source, tmp: Path, tests: list[str], factor: int) -> Counter:
    pkg = tmp / "flash_attn"
    (pkg / "layers").mkdir(parents=True)
    (pkg / "__init__.py").write_text(_FA_INIT)
    (pkg / "flash_attn_interface.py").write_text(_FA_INTERFACE)
    (pkg / "bert_padding.py").write_text(source.read(HELPERS[0]))
    (pkg / "layers" / "__init__.py").write_text("")
    oracle = _functions(source.read(HELPERS[1]), {"rotate_half", "apply_rotary_emb_torch"})
    (pkg / "layers" / "rotary.py").write_text(_FA_ROTARY + "\n\n" + oracle)
    (tmp / "conftest.py").write_text(_CONFTEST)
    (tmp / "pytest.ini").write_text("[pytest]\naddopts = -p no:cacheprovider\n")
    edits = Counter()
    for t in tests:
        src, e = adapt(source.read(t), factor)
        (tmp / Path(t).name).write_text(src)
        edits.update({f"{Path(t).name}: {k}": n for k, n in e.items()})
    return edits


# ---------------------------------------------------------------------------------------------------- the report
def _cause(message: str) -> str:
    line = next((ln for ln in message.splitlines() if ln.strip()), "(no message)").strip()
    line = re.sub(r"0x[0-9a-fA-F]+", "0xN", line)
    line = re.sub(r"(?<![\w.])[-+]?\d+(\.\d+)?([eE][-+]?\d+)?", "N", line)  # numbers fold to N
    line = re.sub(r"\s+", " ", line)  # and the padding of tensor reprs
    return re.sub(r"([\[(]) | ([\])])", r"\1\2", line)[:200]


def summarize(results: Path, out=sys.stdout) -> tuple[Counter, dict]:
    per_node = {}
    for line in results.read_text().splitlines() if results.exists() else []:
        r = json.loads(line)
        prev = per_node.get(r["nodeid"])
        rank = {"passed": 0, "skipped": 1, "failed": 2}[r["outcome"]]
        if prev is None or rank > prev[0]:
            per_node[r["nodeid"]] = (rank, r["outcome"], r["message"], r["when"])
    totals, per_test, causes, example = Counter(), defaultdict(Counter), Counter(), {}
    skips = Counter()
    for nodeid, (_, outcome, message, when) in per_node.items():
        test = nodeid.split("[")[0]
        totals[outcome] += 1
        per_test[test][outcome] += 1
        if outcome == "failed":
            c = _cause(message) if when == "call" else f"({when} error) {_cause(message)}"
            causes[c] += 1
            example.setdefault(c, nodeid)
        elif outcome == "skipped":
            skips[_cause(message)] += 1
    print(f"\n{'test':<72} {'passed':>7} {'failed':>7} {'skipped':>7}", file=out)
    for test in sorted(per_test):
        c = per_test[test]
        print(f"{test:<72} {c['passed']:>7} {c['failed']:>7} {c['skipped']:>7}", file=out)
    print(f"{'TOTAL':<72} {totals['passed']:>7} {totals['failed']:>7} {totals['skipped']:>7}", file=out)
    if causes:
        print("\nfailures by cause (first line of the exception, numbers as N):", file=out)
        for c, n in causes.most_common():
            print(f"{n:>6}  {c}\n        e.g. {example[c]}", file=out)
    if skips:
        print("\nskips by reason:", file=out)
        for c, n in skips.most_common():
            print(f"{n:>6}  {c}", file=out)
    return totals, causes


# --------------------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("fa_path", type=Path, help="flash-attention checkout, its git dir, or one of its test files\n"
                                              "(with --summarize: a results.jsonl kept by --keep)")
    ap.add_argument("--summarize", action="store_true", help="only print the tables of a kept results.jsonl")
    ap.add_argument("--rev", default="HEAD", help="revision to read from a git dir (default HEAD)")
    ap.add_argument("--interpret", action="store_true",
                    help="run embedattn's Triton kernels through the interpreter (EMBEDATTN_BACKEND=triton, "
                         "TRITON_INTERPRET=1) on the smaller parametrization; default: the reference backend")
    ap.add_argument("--backend", choices=("reference", "auto"), default="reference",
                    help="without --interpret: EMBEDATTN_BACKEND for the run (default reference; auto: the CPU's\n"
                         "default road, torch's SDPA where it computes the call exactly and the reference elsewhere)")
    ap.add_argument("--sample", type=int, default=None,
                    help="combinations per test function, a seeded uniform sample (0 = all); default 60, "
                         "3 with --interpret")
    ap.add_argument("--shrink", type=int, default=None,
                    help="divide sequence lengths and page sizes above 64 by this (default 8, 16 with --interpret)")
    ap.add_argument("--sample-for", default=None,
                    help="per-test sample sizes NAME=N,... (N < 0: none). Default test_flash_attn_race_condition=2\n"
                         "(each of its cases repeats forward and backward 250 times at batch 60: ~1.5 CPU-min on the\n"
                         "reference); with --interpret: " + INTERPRET_SAMPLE_FOR)
    ap.add_argument("--case-timeout", type=float, default=None,
                    help="seconds one case may run before it fails with a TimeoutError (0 = none; default none,\n"
                         "600 with --interpret)")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    ap.add_argument("--embedattn-rev", default=None,
                    help="run embedattn as committed at this revision of this repository (exported with git archive)\n"
                         "instead of the working tree, e.g. HEAD to leave uncommitted edits out")
    ap.add_argument("-n", "--workers", default="2", help="pytest-xdist workers (default 2; 0 = no xdist)")
    ap.add_argument("--files", default="test_flash_attn.py,test_rotary.py", help="which test files to run")
    ap.add_argument("-k", dest="keyword", default=None, help="pytest -k expression")
    ap.add_argument("--keep", type=Path, default=None,
                    help="build (and leave) the adapted files, pytest log and results here instead of a temp dir")
    ap.add_argument("--dry-run", action="store_true", help="build and collect only (prints the case counts)")
    ap.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    args = ap.parse_args(argv)
    if args.summarize:
        totals, _ = summarize(args.fa_path)
        return 1 if totals["failed"] else 0

    try:
        import einops  # noqa: F401
    except ImportError:
        print("FlashAttention's tests need einops: pip install einops (or put it on PYTHONPATH)", file=sys.stderr)
        return 2
    sample = args.sample if args.sample is not None else (3 if args.interpret else 60)
    sample_for = args.sample_for if args.sample_for is not None else (
        INTERPRET_SAMPLE_FOR if args.interpret else "test_flash_attn_race_condition=2")
    case_timeout = args.case_timeout if args.case_timeout is not None else (600 if args.interpret else 0)
    factor = args.shrink if args.shrink is not None else (16 if args.interpret else 8)
    source = Source(args.fa_path, args.rev)
    tests = source.tests([f.strip() for f in args.files.split(",") if f.strip()])
    if not tests:
        print(f"no test file selected by --files {args.files}", file=sys.stderr)
        return 2

    tmp = args.keep or Path(tempfile.mkdtemp(prefix="fa_suite_"))
    if args.keep is not None:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    try:
        edits = build(source, tmp, tests, factor)
        tree = REPO
        if args.embedattn_rev:
            tree = tmp / "embedattn_tree"
            tree.mkdir()
            archive = subprocess.run(["git", "-C", str(REPO), "archive", args.embedattn_rev], capture_output=True)
            if archive.returncode:
                raise SystemExit(f"git archive {args.embedattn_rev}: {archive.stderr.decode().strip()}")
            subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True)
            rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", args.embedattn_rev],
                                 capture_output=True, text=True).stdout.strip()
            print(f"embedattn: {REPO} at {rev} (exported; uncommitted edits left out)")
        else:
            dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True).stdout.strip()
            print(f"embedattn: the working tree {REPO}{' (with uncommitted edits)' if dirty else ''}")
        print(f"flash-attention: {source.describe()}\nadapted copies in {tmp}:")
        for kind, n in sorted(edits.items()):
            if n:
                print(f"  {n:>4} x {kind}")
        results = tmp / "results.jsonl"
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(tmp), str(tree)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH")
                                                                     else []))
        env.update(FA_SUITE_SHRINK=str(factor), FA_SUITE_SAMPLE=str(sample), FA_SUITE_SAMPLE_FOR=sample_for,
                   FA_SUITE_CASE_TIMEOUT=str(case_timeout),
                   FA_SUITE_SEED=str(args.seed),
                   FA_SUITE_RESULTS=str(results), FA_SUITE_DROP_DTYPES="bfloat16" if args.interpret else "")
        if args.interpret:  # the interpreter has no bf16 arithmetic: those cases are left out, not failed
            env.update(EMBEDATTN_BACKEND="triton", TRITON_INTERPRET="1")
        else:
            env["EMBEDATTN_BACKEND"] = args.backend
            env.pop("TRITON_INTERPRET", None)
        cmd = [sys.executable, "-m", "pytest", *[Path(t).name for t in tests], "-c", str(tmp / "pytest.ini"),
               "--rootdir", str(tmp), "-q", "--tb=short", "-W", "ignore"]
        if args.workers not in ("0", "") and not args.dry_run:
            cmd += ["-n", str(args.workers)]
        if args.keyword:
            cmd += ["-k", args.keyword]
        if args.dry_run:
            cmd += ["--collect-only"]
        cmd += args.pytest_args
        backend = "triton (interpreter)" if args.interpret else args.backend
        print(f"backend {backend}; sizes / {factor}; "
              f"{'all combinations' if sample <= 0 else f'{sample} sampled combinations per test (seed {args.seed})'}"
              f"{f' ({sample_for})' if sample_for else ''}"
              f"{f'; {case_timeout:g} s per case at most' if case_timeout > 0 else ''}"
              f"{'; bf16 left out' if args.interpret else ''}\n$ {' '.join(cmd)}  (in {tmp})", flush=True)
        log = tmp / "pytest.log"
        t0 = time.time()
        with open(log, "w") as f:
            proc = subprocess.run(cmd, cwd=tmp, env=env, stdout=f, stderr=subprocess.STDOUT)
        wall = time.time() - t0
        tail = log.read_text().splitlines()
        print("\n".join(tail[-3:] if not args.dry_run else [ln for ln in tail if "collected" in ln or " tests" in ln]))
        print(f"pytest exit {proc.returncode}, {wall:.0f} s wall; "
              f"{f'full log: {log}' if args.keep else 'log removed with the temp dir (--keep DIR keeps it)'}")
        if args.dry_run:
            return proc.returncode
        totals, _ = summarize(results)
        if sum(totals.values()) == 0:
            print(textwrap.indent("\n".join(tail[-40:]), "  | "))
            return proc.returncode or 1
        return 1 if totals["failed"] else 0
    finally:
        if args.keep is None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
