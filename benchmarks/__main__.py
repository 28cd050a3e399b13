"""python -m benchmarks: run the sweeps, write results.csv, env.json, plots/ and summary.md.

    python -m benchmarks --quick                       # the README's main job (minutes on a 2-core CPU)
    python -m benchmarks --suite attention --device cuda --max-seconds 240 --out reports/h100
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from collections.abc import Callable

from .cli import ArgumentParser, check_out_dir, fail, non_negative_float, positive_float, suites_and_dtypes

PROG = "python -m benchmarks"
SUITES = ("attention", "embedding", "negative_sampling", "ring")
DTYPES = ("fp16", "bf16", "fp32")  # what --dtype accepts (the kernels' dtypes)
# share of a --max-seconds budget per suite; time a suite leaves unused passes to the next ones
BUDGET_SHARE = {"attention": 0.5, "embedding": 0.25, "negative_sampling": 0.2, "ring": 0.05}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = ArgumentParser(prog=PROG, description="embedattn benchmark sweeps")
    ap.add_argument("--suite", default="all",
                    help="attention, embedding, negative_sampling, ring, a comma list of them, or all")  # fmt: skip
    ap.add_argument("--quick", action="store_true", help="small sweep (minutes on a 2-core CPU)")
    ap.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    ap.add_argument("--out", default=None, help="output folder (default: reports/<device-tag>/)")
    ap.add_argument("--dtype", default=None,
                    help=f"comma list of {','.join(DTYPES)} overriding every suite's default dtypes")  # fmt: skip
    ap.add_argument("--max-seconds", type=positive_float, default=None, metavar="SECONDS",
                    help="time budget (> 0); points left when it runs out are skipped and listed")  # fmt: skip
    ap.add_argument("--warmup-ms", type=non_negative_float, default=None, metavar="MS", help="warm-up (>= 0)")
    ap.add_argument("--rep-ms", type=non_negative_float, default=None, metavar="MS", help="timed repetitions (>= 0)")
    ap.add_argument("--no-compile", action="store_true", help="leave torch.compile peers out (compilation is slow)")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # the tests' seconds-long sweep
    args = ap.parse_args(argv)
    suites_and_dtypes(ap, args, SUITES, DTYPES)
    return args


def dtype_plan(plans: dict[str, list], dtypes: list[str] | None, named: tuple[str, ...],
               note: Callable[[str], None]) -> str | None:
    """Say per suite which dtypes its points run (``Case.dtype``); with ``--dtype``, note each suite that also runs
    another dtype. Returns the error when a suite named in ``--suite`` runs none of the ``--dtype`` asked."""
    runs = {name: list(dict.fromkeys(c.dtype for c in cases if c.dtype)) for name, cases in plans.items()}
    for name, got in runs.items():
        if dtypes and name in named and got and not set(got) & set(dtypes):
            return f"--suite {name} --dtype {','.join(dtypes)}: the {name} suite runs {', '.join(got)} only"
    note("  dtypes per suite: " + "; ".join(f"{name} {','.join(got) or '-'}" for name, got in runs.items()))
    for name, cases in plans.items():
        other = sorted({c.dtype for c in cases if c.dtype and dtypes and c.dtype not in dtypes})
        if other:
            which = sorted({c.label.split()[0] for c in cases if c.dtype in other})
            note(f"  [{name}] --dtype {','.join(dtypes)}: {', '.join(which)} run{'s' * (len(which) == 1)} in "
                 f"{', '.join(other)} (no other dtype)")
    return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        return fail(PROG, "--device cuda: no CUDA device visible")
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")  # fmt: skip
    if device.type == "cuda" and os.environ.pop("TRITON_INTERPRET", None) not in (None, "", "0"):
        print("TRITON_INTERPRET was set: unset for a CUDA sweep", file=sys.stderr)

    from . import harness
    from .harness import Case, Context, Recorder, device_tag

    out = args.out or os.path.join("reports", device_tag(device))
    problem = check_out_dir(out)  # before anything runs
    if problem:
        return fail(PROG, f"--out: {problem}")
    cache_note = harness.enable_autotune_cache()  # before embedattn.kernels builds its autotuners
    profile = "tiny" if args.tiny else ("quick" if args.quick else "full")
    if device.type == "cuda":
        warm, rep = {"tiny": (1, 5), "quick": (10, 40)}.get(profile, (10, 50))
    else:
        warm, rep = {"tiny": (0, 2), "quick": (20, 150)}.get(profile, (50, 400))
    try:
        from tqdm.auto import tqdm

        log = tqdm.write
    except ImportError:  # tqdm is a bench dependency; run without a bar rather than fail
        tqdm, log = None, print
    ctx = Context(
        device=device,
        profile=profile,
        dtypes=args.dtypes,
        warmup_ms=args.warmup_ms if args.warmup_ms is not None else warm,
        rep_ms=args.rep_ms if args.rep_ms is not None else rep,
        n_sets=2 if profile == "tiny" else 3,
        device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        log=log,
    )
    t_start = time.time()

    log(f"embedattn benchmarks on {ctx.device_name} ({profile} sweep) -> {out}/")
    log(f"  {cache_note}")
    if device.type == "cpu":
        ctx.note("CPU run: Triton kernels are NOT timed (the interpreter measures nothing useful); the "
                 "'embedattn' provider is the PyTorch reference path, timed against torch's own CPU kernels "
                 "and gensim.")  # fmt: skip

    import importlib

    plans: dict[str, list[Case]] = {}
    for name in args.suites:
        mod = importlib.import_module(f"benchmarks.{name}")
        reason = mod.available(ctx)
        if reason:
            ctx.note(f"[{name}] skipped: {reason}")
            continue
        kw = {"compile_peer": not args.no_compile} if name == "embedding" else {}
        plans[name] = mod.plan(ctx, **kw)
    problem = dtype_plan(plans, args.dtypes, args.named_suites, ctx.note)
    if problem:
        return fail(PROG, problem)
    csv_path = os.path.join(out, "results.csv")
    rec = Recorder(ctx, csv_path)

    # device peaks, measured in this run so the fractions and dashed lines are about this machine
    ctx.copy_gbps = harness.measure_copy_bandwidth(ctx)
    common = dict(suite="device", provider="torch", shape="", x_name="", x_value="", config="")
    rows = [rec.row(**common, kernel="copy", mode="copy", dtype="uint8", metric="gbps", unit="GB/s",
                    p50=ctx.copy_gbps, p20=ctx.copy_gbps, p80=ctx.copy_gbps)]  # fmt: skip
    peak_dtypes = ["bf16", "fp16"] if device.type == "cuda" else ["fp32"]
    for d in ctx.pick_dtypes(peak_dtypes):
        tf = harness.measure_matmul_peak(ctx, harness.DTYPES[d])
        ctx.matmul_tflops[d] = tf
        rows.append(rec.row(**common, kernel="matmul", mode="mm", dtype=d, metric="tflops", unit="TFLOP/s",
                            p50=tf, p20=tf, p80=tf))  # fmt: skip
    rec.add(rows)
    log(f"  copy bandwidth {ctx.copy_gbps:,.1f} GB/s; matmul "
        + ", ".join(f"{d} {v:,.2f} TFLOP/s" for d, v in ctx.matmul_tflops.items()))  # fmt: skip

    total = sum(len(v) for v in plans.values())
    bar = tqdm(total=total, unit="pt", dynamic_ncols=True) if tqdm else None
    skipped: list[str] = []
    t0 = time.time()
    for i, (name, cases) in enumerate(plans.items()):
        deadline = float("inf")
        if args.max_seconds is not None:
            left = args.max_seconds - (time.time() - t0)
            share = sum(BUDGET_SHARE[n] for n in list(plans)[i:])
            deadline = time.time() + left * BUDGET_SHARE[name] / share
        for case in cases:
            if bar:
                bar.set_description(f"{name}: {case.label}")
            if time.time() >= deadline:
                skipped.append(case.label)
            else:
                try:
                    rec.add(case.run(ctx, rec))
                except Exception as e:  # one broken point must not lose the sweep
                    if harness.is_oom(e):
                        torch.cuda.empty_cache()
                    ctx.note(f"  {case.label}: failed: {type(e).__name__}: {str(e)[:200]}")
            if bar:
                bar.update(1)
    if bar:
        bar.close()
    if skipped:
        ctx.note(f"time budget ({args.max_seconds:.0f} s) ran out: {len(skipped)} sweep points skipped")

    env = harness.environment(ctx)
    env["command"] = "python -m benchmarks " + " ".join(shlex.quote(a) for a in (argv if argv is not None
                                                                                 else sys.argv[1:]))  # fmt: skip
    env["suites"] = list(args.suites)
    env["suites_run"] = list(plans)
    env["skipped_for_budget"] = skipped
    env["seconds"] = round(time.time() - t_start, 1)
    harness.write_json(os.path.join(out, "env.json"), env)

    from .summary import write_summary

    if not args.no_plots:
        from .plot import plot_csv

        n = len(plot_csv(csv_path))
        log(f"  {n} plots -> {os.path.join(out, 'plots')}/")
    summary = write_summary(csv_path, env=env)
    log(f"done in {env['seconds']:.0f} s: {csv_path} ({len(rec.rows)} rows), {summary}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
