"""Draw every plot from a results.csv alone: ``python -m benchmarks.plot results.csv [--out DIR]``.

One PNG per (suite, kernel, mode, dtype): throughput against size, one line per provider with its
p20-p80 band, and the device's measured peak (matmul TFLOP/s or copy GB/s, rows with suite "device"
in the same CSV) as a dashed line where it bounds the metric.
"""

from __future__ import annotations

import math
import os
import re
from collections import defaultdict

from .cli import ArgumentParser, fail
from .harness import THROUGHPUT_METRICS, ResultsError, read_csv

# fixed colours so a provider looks the same in every plot
_COLORS = {
    "embedattn": "#d62728", "sdpa-flash": "#1f77b4", "sdpa-efficient": "#2ca02c", "sdpa-cudnn": "#9467bd",
    "sdpa-math": "#8c564b", "reference": "#7f7f7f", "torch-eager": "#1f77b4", "torch-compile": "#2ca02c",
    "gensim": "#ff7f0e", "embedattn-reference": "#e377c2",
}  # fmt: skip


def fmt_x(v: float) -> str:
    """512 -> '512', 16384 -> '16k', 1048576 -> '1M'."""
    v = float(v)
    if v >= 2**20 and v % 2**20 == 0:
        return f"{int(v) >> 20}M"
    if v >= 1024 and v % 1024 == 0:
        return f"{int(v) >> 10}k"
    return f"{v:g}"


def plot_name(suite: str, kernel: str, mode: str, dtype: str) -> str:
    raw = f"{suite}__{kernel}__{mode.replace('+', '-')}__{dtype}"
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", raw) + ".png"


def device_peaks(rows: list[dict]) -> dict[tuple[str, str], float]:
    """{(metric, dtype): value} from the CSV's device rows (dtype "" = any)."""
    peaks = {}
    for r in rows:
        if r["suite"] == "device" and not math.isnan(r["p50"]):
            key = (r["metric"], r["dtype"] if r["kernel"] == "matmul" else "")
            peaks[key] = r["p50"]
    return peaks


def groups(rows: list[dict]) -> dict[tuple[str, str, str, str], list[dict]]:
    """Throughput rows grouped by (suite, kernel, mode, dtype)."""
    out: dict[tuple[str, str, str, str], list[dict]] = defaultdict(list)
    for r in rows:
        if r["suite"] != "device" and r["metric"] in THROUGHPUT_METRICS:
            out[(r["suite"], r["kernel"], r["mode"], r["dtype"])].append(r)
    return dict(out)


def plot_csv(csv_path: str, out_dir: str | None = None) -> list[str]:
    """Write the PNGs for ``csv_path`` into ``out_dir`` (default: ``plots/`` beside it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_csv(csv_path)
    out_dir = out_dir or os.path.join(os.path.dirname(os.path.abspath(csv_path)), "plots")
    os.makedirs(out_dir, exist_ok=True)
    peaks = device_peaks(rows)
    device = next((r["device"] for r in rows if r.get("device")), "")
    paths = []
    for (suite, kernel, mode, dtype), grp in sorted(groups(rows).items()):
        metric = grp[0]["metric"]
        unit = grp[0]["unit"] or THROUGHPUT_METRICS[metric]
        by_prov: dict[str, list[dict]] = defaultdict(list)
        for r in grp:
            by_prov[r["provider"]].append(r)
        provs = sorted(by_prov, key=lambda p: (p != "embedattn", p))
        xs = sorted({r["x_value"] for r in grp})
        fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
        if len(xs) == 1:  # one point per provider (word2vec): bars with p20-p80 whiskers
            vals = [by_prov[p][0] for p in provs]
            # providers without a fixed color (variants such as "embedattn-cpu") take the cycle's next one
            cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
            colors = [_COLORS.get(p) or cycle[i % len(cycle)] for i, p in enumerate(provs)]
            ax.bar(provs, [v["p50"] for v in vals], color=colors,
                   yerr=[[v["p50"] - v["p20"] for v in vals], [v["p80"] - v["p50"] for v in vals]],
                   capsize=4)  # fmt: skip
            ax.set_xlabel(f"provider ({grp[0]['x_name']} = {fmt_x(xs[0])})")
        else:
            for p in provs:
                pts = sorted(by_prov[p], key=lambda r: r["x_value"])
                x = [r["x_value"] for r in pts]
                color = _COLORS.get(p)
                lw = 2.4 if p == "embedattn" else 1.5
                ax.plot(x, [r["p50"] for r in pts], marker="o", ms=4, lw=lw, label=p, color=color)
                ax.fill_between(x, [r["p20"] for r in pts], [r["p80"] for r in pts], alpha=0.2, color=color)
            if xs[0] > 0 and xs[-1] / xs[0] >= 4:
                ax.set_xscale("log", base=2)
            ax.set_xticks(xs)
            ax.set_xticklabels([fmt_x(x) for x in xs])
            ax.minorticks_off()
            ax.set_xlabel(grp[0]["x_name"])
        peak = peaks.get((metric, dtype)) if metric == "tflops" else peaks.get((metric, ""))
        title_extra = ""
        if peak is not None and metric in ("tflops", "gbps"):
            what = f"{dtype} matmul" if metric == "tflops" else "copy"
            top = max(r["p80"] for r in grp if not math.isnan(r["p80"])) if grp else 0.0
            if peak <= 4 * top:
                ax.axhline(peak, ls="--", color="black", lw=1, label=f"measured {what} peak {peak:.3g}")
            else:  # a line 10x above the data would flatten every curve: name the peak instead
                title_extra = f" (measured {what} peak {peak:.3g} {unit}, off scale)"
                peak = None
        ax.set_ylabel(unit)
        ax.set_ylim(bottom=0)
        ax.set_title(f"{kernel} · {mode} · {dtype}\n{device}{title_extra}", fontsize=10)
        ax.grid(alpha=0.3)
        if len(xs) > 1 or peak is not None:
            ax.legend(fontsize=8)
        fig.tight_layout()
        path = os.path.join(out_dir, plot_name(suite, kernel, mode, dtype))
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    ap = ArgumentParser(prog="python -m benchmarks.plot", description=__doc__.splitlines()[0])
    ap.add_argument("csv", help="results.csv written by python -m benchmarks")
    ap.add_argument("--out", default=None, help="output folder (default: plots/ beside the CSV)")
    args = ap.parse_args(argv)
    try:
        paths = plot_csv(args.csv, args.out)
    except ResultsError as e:  # nothing is drawn from a CSV that cannot be read
        return fail(ap.prog, str(e))
    except OSError as e:
        return fail(ap.prog, f"cannot write {e.filename or 'the plots'}: {e.strerror or e}")
    print(f"{len(paths)} plots -> {os.path.dirname(paths[0]) if paths else args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
