"""What the three commands (``python -m benchmarks``, ``benchmarks.plot``, ``benchmarks.summary``) share:
every failure is one line on stderr, ``<prog>: error: <what>``, and exit status 2.

No torch import here, so a bad command line fails at once.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from typing import NoReturn


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line (no usage block): ``prog: error: message``, exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def fail(prog: str, message: str) -> int:
    """Print ``prog: error: message`` (first line only) on stderr; returns the exit status, 2."""
    first = str(message).strip().splitlines()[0] if str(message).strip() else "failed"
    print(f"{prog}: error: {first}", file=sys.stderr)
    return 2


def _number(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if math.isnan(v):
        raise argparse.ArgumentTypeError("not a number: nan")
    return v


def positive_float(text: str) -> float:
    """argparse type: a number > 0 (inf allowed: no limit)."""
    v = _number(text)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return v


def non_negative_float(text: str) -> float:
    """argparse type: a finite number >= 0."""
    v = _number(text)
    if v < 0 or math.isinf(v):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return v


def check_out_dir(path: str) -> str | None:
    """None when ``path`` is a folder this process can write files in (created if missing), else why not."""
    if not path:
        return "the output folder is an empty path"
    if os.path.exists(path) and not os.path.isdir(path):
        return f"{path} exists and is not a folder"
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):  # the permission bits say nothing to root or on a read-only mount
            pass
    except OSError as e:
        return f"cannot write in {path}: {e.strerror or e}"
    return None


def suites_and_dtypes(ap: argparse.ArgumentParser, args: argparse.Namespace, known_suites, known_dtypes) -> None:
    """``--suite`` (a comma list of suites and/or "all") and ``--dtype`` (a comma list, or None for each suite's
    default) checked against the known names, with one-line errors. Sets ``args.suites`` (in the known order
    when "all" is among them, else as named, without repeats), ``args.named_suites`` (those named, not through
    "all") and ``args.dtypes``."""
    names = [s.strip() for s in args.suite.split(",")]
    bad = [s for s in names if s not in (*known_suites, "all")]
    if bad:
        ap.error(f"argument --suite: {', '.join(map(repr, bad))} not one of {', '.join(known_suites)}, all")
    args.named_suites = tuple(dict.fromkeys(s for s in names if s != "all"))
    args.suites = tuple(known_suites) if "all" in names else args.named_suites
    args.dtypes = None
    if args.dtype is not None:
        args.dtypes = [d.strip() for d in args.dtype.split(",")]
        bad = [d for d in args.dtypes if d not in known_dtypes]
        if bad:
            ap.error(f"argument --dtype: {', '.join(map(repr, bad))} not one of {', '.join(known_dtypes)}")
