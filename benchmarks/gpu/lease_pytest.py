"""pytest plugin for the GPU lease's test phase: every outcome written the moment it is known, so a run stopped by its
time limit (SIGINT, then SIGKILL) still says what passed, what failed and why.

    PYTHONPATH=benchmarks/gpu python -m pytest -p lease_pytest --lease-log results.tsv --lease-failures fail.txt ...

``--lease-log``: one line per test, ``outcome<TAB>seconds<TAB>nodeid`` (outcome: passed, failed, error, skipped,
xfailed, xpassed), appended and flushed per line by the controlling process (the xdist controller when ``-n``
is on). ``--lease-failures``: the failure reports' text, each under a ``=== nodeid`` line. ``--lease-per-file N``:
keep only the first N tests of each file (the CPU rehearsal of the phase: every file imported and run a little).
benchmarks/gpu/lease_report.py turns these files into the log with failures first.
"""

from __future__ import annotations

import os

import pytest


def pytest_addoption(parser):
    g = parser.getgroup("lease", "GPU lease (benchmarks/gpu/gpu_session.sh)")
    g.addoption("--lease-log", default=None, help="append one outcome line per test to this file")
    g.addoption("--lease-failures", default=None, help="append each failure's report text to this file")
    g.addoption("--lease-per-file", type=int, default=0, help="run only the first N tests of each file")


def pytest_collection_modifyitems(session, config, items):
    n = config.getoption("--lease-per-file")
    if n <= 0:
        return
    seen: dict[str, int] = {}
    keep, drop = [], []
    for item in items:
        f = item.nodeid.split("::", 1)[0]
        seen[f] = seen.get(f, 0) + 1
        (keep if seen[f] <= n else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def _is_worker(config) -> bool:
    return hasattr(config, "workerinput")  # an xdist worker: its controller writes the lines


def _outcome(report) -> str | None:
    """The test's outcome from one phase's report, or None when this phase says nothing final."""
    if hasattr(report, "wasxfail"):
        if report.skipped:
            return "xfailed"
        if report.passed and report.when == "call":
            return "xpassed"
    if report.when == "call":
        return report.outcome  # passed / failed / skipped
    if report.failed:
        return "error"  # setup or teardown
    if report.skipped and report.when == "setup":
        return "skipped"
    return None


@pytest.hookimpl(trylast=True)
def pytest_runtest_logreport(report):
    config = _CONFIG.get("config")
    if config is None or _is_worker(config):
        return
    outcome = _outcome(report)
    if outcome is None:
        return
    path = config.getoption("--lease-log")
    if path:
        with open(path, "a") as f:
            f.write(f"{outcome}\t{getattr(report, 'duration', 0.0):.2f}\t{report.nodeid}\n")
            f.flush()
            os.fsync(f.fileno())
    fpath = config.getoption("--lease-failures")
    if fpath and outcome in ("failed", "error"):
        text = getattr(report, "longreprtext", "") or str(report.longrepr)
        with open(fpath, "a") as f:
            f.write(f"=== {outcome.upper()} {report.nodeid} ({report.when})\n{text[-6000:]}\n\n")


def _collected(config, n: int) -> None:
    """The number of tests collected (a ``collected`` line of the log), so the report can say how many never ran."""
    path = config.getoption("--lease-log")
    if path and n > 0 and not _is_worker(config):
        with open(path, "a") as f:
            f.write(f"collected\t{n}\t-\n")


def pytest_collection_finish(session):
    _collected(session.config, len(session.items))


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_node_collection_finished(node, ids):
    # the xdist controller collects nothing itself: each worker reports its (identical) collection
    config = _CONFIG.get("config")
    if config is not None and not _CONFIG.get("counted"):
        _CONFIG["counted"] = True
        _collected(config, len(ids))


_CONFIG: dict = {}


def pytest_configure(config):
    _CONFIG["config"] = config
