"""summary.md from a results.csv alone: ``python -m benchmarks.summary results.csv [--plots DIR]``.

Per suite: the median ratio embedattn / peer over every point, then one table per (kernel, mode,
dtype) row group: embedattn's own throughput and its ratio to each peer at each size (> 1 means
embedattn is faster), the median ratio last. The plots are embedded below each suite.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from collections import Counter, defaultdict

from .cli import ArgumentParser, fail
from .harness import THROUGHPUT_METRICS, ResultsError, point_source, read_csv
from .plot import fmt_x, groups, plot_name

OURS = "embedattn"
SUITE_ORDER = ["attention", "embedding", "negative_sampling"]


def _num(v: float) -> str:
    if math.isnan(v):
        return "–"
    a = abs(v)
    if a >= 1e6:
        return f"{v / 1e6:.2f}M"
    if a >= 1e4:
        return f"{v / 1e3:.1f}k"
    if a >= 100:
        return f"{v:.0f}"
    return f"{v:.3g}" if a < 10 else f"{v:.1f}"


def ratios(rows: list[dict]) -> dict[tuple, dict[str, dict[float, float]]]:
    """{(suite, kernel, mode, dtype): {peer: {x: ours_p50 / peer_p50}}} over throughput rows."""
    out: dict[tuple, dict[str, dict[float, float]]] = {}
    for key, grp in groups(rows).items():
        ours = {r["x_value"]: r["p50"] for r in grp if r["provider"] == OURS}
        per: dict[str, dict[float, float]] = defaultdict(dict)
        for r in grp:
            if r["provider"] != OURS and r["x_value"] in ours and r["p50"] > 0:
                per[r["provider"]][r["x_value"]] = ours[r["x_value"]] / r["p50"]
        out[key] = dict(per)
    return out


def memory_ratios(rows: list[dict], suite: str) -> dict[str, list[float]]:
    """{peer: [embedattn peak_mem / peer peak_mem at each common point]} for one suite."""
    mem: dict[tuple, dict[str, float]] = defaultdict(dict)
    for r in rows:
        if r["suite"] == suite and r["metric"] == "peak_mem" and not math.isnan(r["p50"]):
            mem[(r["kernel"], r["mode"], r["dtype"], r["x_value"])][r["provider"]] = r["p50"]
    out: dict[str, list[float]] = defaultdict(list)
    for per in mem.values():
        if OURS in per:
            for peer, v in per.items():
                if peer != OURS and v > 0:
                    out[peer].append(per[OURS] / v)
    return dict(out)


def _median(vals) -> float:
    vals = [v for v in vals if not math.isnan(v)]
    return statistics.median(vals) if vals else float("nan")


def build_summary(csv_path: str, plots_dir: str | None = None, env: dict | None = None) -> str:
    """The markdown text (image links relative to the CSV's folder)."""
    rows = read_csv(csv_path)
    base = os.path.dirname(os.path.abspath(csv_path))
    plots_dir = plots_dir or os.path.join(base, "plots")
    if env is None and os.path.exists(os.path.join(base, "env.json")):
        with open(os.path.join(base, "env.json")) as f:
            env = json.load(f)
    env = env or {}
    first = rows[0] if rows else {}
    device = first.get("device", "?")
    lines = [f"# embedattn benchmarks: {device}", ""]
    cmd = env.get("command") or "python -m benchmarks"
    lines.append(f"Generated from `results.csv` ({len(rows)} rows) written by `{cmd}` at "
                 f"{first.get('timestamp', '?')}; torch {first.get('torch', '?')}, "
                 f"triton {first.get('triton') or 'n/a'}. Regenerate: `python -m benchmarks.plot results.csv` "
                 "and `python -m benchmarks.summary results.csv`.")  # fmt: skip
    lines.append("")
    if str(env.get("device", device)).startswith("cpu") or device == "cpu":
        lines += ["**CPU run: Triton kernels are not timed** (the interpreter measures nothing useful). "
                  "Here `embedattn` is the PyTorch reference path the package runs on CPU, measured against "
                  "torch's own CPU kernels and gensim.", ""]  # fmt: skip
    dev = [r for r in rows if r["suite"] == "device"]
    if dev:
        peaks = ", ".join(f"{r['kernel']} {r['dtype']}: {_num(r['p50'])} {r['unit']}" for r in dev)
        lines += [f"Device peaks measured in this run: {peaks}.", ""]
    timing = env.get("timing")
    if timing:
        lines += [f"Timing: {timing.get('method')}, median with p20/p80, warm-up {timing.get('warmup_ms')} ms, "
                  f"{timing.get('rep_ms')} ms of repetitions, {timing.get('rotating_input_sets')} rotating "
                  "input sets. Ratio = embedattn / peer throughput at the same point: > 1 means embedattn "
                  "is faster.", ""]  # fmt: skip
    rat = ratios(rows)
    grouped = groups(rows)
    suites = sorted({k[0] for k in grouped}, key=lambda s: (SUITE_ORDER.index(s) if s in SUITE_ORDER else 99, s))
    for suite in suites:
        lines += [f"## {suite}", ""]
        keys = sorted(k for k in grouped if k[0] == suite)
        # headline: median ratio per (metric, peer) over the whole suite
        overall: dict[tuple[str, str], list[float]] = defaultdict(list)
        for k in keys:
            metric = grouped[k][0]["metric"]
            for peer, per_x in rat[k].items():
                overall[(metric, peer)] += list(per_x.values())
        for peer, vals in memory_ratios(rows, suite).items():
            overall[("peak_mem", peer)] = vals
        if overall:
            lines += ["| metric | peer | median ratio embedattn/peer | points |", "|---|---|---|---|"]
            for (metric, peer), vals in sorted(overall.items()):
                name = THROUGHPUT_METRICS.get(metric, "peak memory (lower is better)")
                lines.append(f"| {name} | {peer} | {_num(_median(vals))} | {len(vals)} |")
            lines.append("")
        # one table per x_name (sizes differ between e.g. SGNS pairs and word2vec epochs)
        by_xname: dict[str, list] = defaultdict(list)
        for k in keys:
            by_xname[grouped[k][0]["x_name"]].append(k)
        for x_name, ks in by_xname.items():
            xs = sorted({r["x_value"] for k in ks for r in grouped[k]})
            head = ["kernel", "mode", "dtype", "provider"] + [f"{x_name}={fmt_x(x)}" for x in xs] + ["median"]
            lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            for k in ks:
                _, kernel, mode, dtype = k
                unit = THROUGHPUT_METRICS[grouped[k][0]["metric"]]
                ours = {r["x_value"]: r["p50"] for r in grouped[k] if r["provider"] == OURS}
                if ours:
                    cells = [_num(ours.get(x, float("nan"))) for x in xs]
                    lines.append(f"| {kernel} | {mode} | {dtype} | {OURS} ({unit}) | " + " | ".join(cells)
                                 + f" | {_num(_median(ours.values()))} |")  # fmt: skip
                    for peer in sorted(rat[k]):
                        per_x = rat[k][peer]
                        cells = [_num(per_x.get(x, float("nan"))) for x in xs]
                        lines.append(f"| | | | ÷ {peer} | " + " | ".join(cells)
                                     + f" | **{_num(_median(per_x.values()))}** |")  # fmt: skip
                else:  # embedattn missing here: show the peers' own numbers
                    provs = sorted({r["provider"] for r in grouped[k]})
                    for p in provs:
                        v = {r["x_value"]: r["p50"] for r in grouped[k] if r["provider"] == p}
                        cells = [_num(v.get(x, float("nan"))) for x in xs]
                        lines.append(f"| {kernel} | {mode} | {dtype} | {p} ({unit}) | " + " | ".join(cells)
                                     + f" | {_num(_median(v.values()))} |")  # fmt: skip
            lines.append("")
        # quality, and training-only speed (no vocabulary pass or compile), reported as values
        quality = [r for r in rows if r["suite"] == suite
                   and (r["unit"] == "rho" or r["metric"] == "train_words_per_s")]
        if quality:
            lines += ["| kernel | provider | metric | value |", "|---|---|---|---|"]
            lines += [f"| {r['kernel']} | {r['provider']} | {r['metric']} | "
                      f"{r['p50']:.3f} |" if r["unit"] == "rho" else
                      f"| {r['kernel']} | {r['provider']} | {r['metric']} | {_num(r['p50'])} |" for r in quality]
            lines.append("")
        kinds = Counter(point_source(r["config"]) for r in rows
                        if r["suite"] == suite and r["provider"] == OURS and r["metric"] == "ms")
        kinds.pop("", None)
        if kinds:
            lines += [f"Launch configs: {kinds['tuned']} of {sum(kinds.values())} embedattn points ran tuned configs"
                      + "".join(f", {n} {k}" for k, n in sorted(kinds.items()) if k != "tuned"), ""]
        configs = sorted({(r["kernel"], r["mode"], r["dtype"], r["x_value"], r["config"]) for r in rows
                          if r["suite"] == suite and r["provider"] == OURS and r["metric"] == "ms" and r["config"]})
        if configs and any("=" in c[4] and "backend=" not in c[4] for c in configs):
            how = "each says how it was chosen: tuned (the device's table), autotuned, or heuristic"
            lines += [f"<details><summary>embedattn: the config each point ran with ({how})</summary>",
                      "", "| kernel | mode | dtype | x | config |", "|---|---|---|---|---|"]
            lines += [f"| {k} | {m} | {d} | {fmt_x(x)} | `{c}` |" for k, m, d, x, c in configs]
            lines += ["", "</details>", ""]
        for k in keys:
            path = os.path.join(plots_dir, plot_name(*k))
            if os.path.exists(path):
                rel = os.path.relpath(path, base)
                lines.append(f"![{k[1]} {k[2]} {k[3]}]({rel})")
        lines.append("")
    lines += ring_section(rows)
    notes = env.get("notes") or []
    skipped = env.get("skipped_for_budget") or []
    if notes or skipped:
        lines += ["## Notes from the run", ""]
        lines += [f"- {n.strip()}" for n in notes]
        if skipped:
            lines.append(f"- {len(skipped)} sweep points skipped to stay within the time budget: "
                         + ", ".join(skipped[:20]) + (" ..." if len(skipped) > 20 else ""))  # fmt: skip
        lines.append("")
    return "\n".join(lines)


def ring_section(rows: list[dict]) -> list[str]:
    """Ring attention has no peer: its time per step, compute-only and comm-only, and the share of the
    communication the overlap hides (benchmarks/ring.py)."""
    ring = [r for r in rows if r["suite"] == "ring"]
    if not ring:
        return []
    cells: dict[tuple, dict[str, float]] = defaultdict(dict)
    for r in ring:
        cells[(r["kernel"], r["shape"], r["dtype"])][r["mode"] if r["metric"] == "ms" else r["metric"]] = r["p50"]
    lines = ["## ring", "", "| kernel | shape | dtype | step ms | compute ms | comm ms | block ms | comm hidden |",
             "|---|---|---|---|---|---|---|---|"]
    for (kernel, shape, dtype), c in sorted(cells.items()):
        vals = [_num(c[m]) if m in c else "" for m in ("step", "compute", "comm", "block")]
        hidden = f"{c['hidden']:.0%}" if "hidden" in c else ""
        lines.append(f"| {kernel} | {shape} | {dtype} | " + " | ".join(vals) + f" | {hidden} |")
    return lines + [""]


def write_summary(csv_path: str, plots_dir: str | None = None, env: dict | None = None,
                  out: str | None = None) -> str:  # fmt: skip
    """Write summary.md beside the CSV (or to ``out``); returns its path."""
    out = out or os.path.join(os.path.dirname(os.path.abspath(csv_path)), "summary.md")
    text = build_summary(csv_path, plots_dir, env)  # first: a CSV that cannot be read leaves no file
    with open(out, "w") as f:
        f.write(text)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = ArgumentParser(prog="python -m benchmarks.summary", description=__doc__.splitlines()[0])
    ap.add_argument("csv")
    ap.add_argument("--plots", default=None, help="plots folder (default: plots/ beside the CSV)")
    ap.add_argument("--out", default=None, help="output file (default: summary.md beside the CSV)")
    args = ap.parse_args(argv)
    try:
        print(write_summary(args.csv, args.plots, out=args.out))
    except ResultsError as e:  # nothing is written for a CSV that cannot be read
        return fail(ap.prog, str(e))
    except OSError as e:
        return fail(ap.prog, f"cannot write {e.filename or 'summary.md'}: {e.strerror or e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
