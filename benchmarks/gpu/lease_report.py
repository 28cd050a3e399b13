"""What the GPU lease leaves, made readable and committable: the CUDA test log with failures first, issue #27's
targets table from the numbers, and the placing of the returned files in the repository.

    python benchmarks/gpu/lease_report.py collect /work/.device/<...>/<gpu> [more folders or lease-*.tgz]   # CPU
    python benchmarks/gpu/lease_report.py targets reports/<gpu>            # the targets block of NOTES.md again
    python benchmarks/gpu/lease_report.py tests WORKDIR OUT.log           # (the lease's pack phase)
    python benchmarks/gpu/lease_report.py merge-csv OUT.csv IN.csv ...    # (the lease's pack phase)

``collect`` (run on the CPU machine after the lease, from the files the device tool returned): unpacks every
``lease-call*.tgz`` in call order into build/lease/collected/, copies the report files into reports/<gpu>/ and the
config table (tuned configs + the attention defaults decided) into embedattn/configs/, draws the plots and
summary.md again from the CSVs, writes the targets block into reports/<gpu>/NOTES.md (between markers: the rest
of an existing NOTES.md is kept) and prints the ``git add`` line of what to commit.

Targets (issue #27), each a ratio inside one run (one CSV, its own measured ceilings):
attention fwd >= 1.0x the fastest SDPA backend at D64/128, >= 85% of the measured matmul peak at D128, bwd >= 0.9x
(D64/128), D256 bwd >= 0.8x; embedding fwd >= 1.0x eager at every size and >= 85% of copy bandwidth at >= 64k
tokens, bwd >= 1.5x; word2vec >= 30M words/s (and WordSim-353 rho within 0.02 of gensim's: our reading of "at
gensim's quality"); paged decoding with 64-token pages within 5% of contiguous.
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

BEGIN, END = "<!-- lease-targets:begin (benchmarks/gpu/lease_report.py) -->", "<!-- lease-targets:end -->"
PLAIN = re.compile(r"^attention(?:_gqa(\d+)x(\d+))?_d(\d+)(?:_dv(\d+))?(_causal)?$")
QUALITY_TOLERANCE = 0.02  # rho below gensim's by at most this much counts as gensim's quality


# ---------------------------------------------------------------------------------------------------- reading
def read_rows(path: str | Path) -> list[dict]:
    """A long-format CSV's rows (p50/p20/p80 and x_value as floats where they parse); [] when absent."""
    if not os.path.exists(path):
        return []
    out = []
    with open(path, newline="", encoding="utf-8") as f:
        for r in csv.DictReader(f):
            for k in ("p50", "p20", "p80", "x_value"):
                try:
                    r[k] = float(r[k])
                except (TypeError, ValueError, KeyError):
                    r[k] = float("nan")
            out.append(r)
    return out


def merge_csv(out: str, inputs: list[str]) -> int:
    """Concatenate long-format CSVs (one header; the device rows of the first file that has them). Returns rows."""
    rows, header, seen_device = [], None, False
    for path in inputs:
        if not os.path.exists(path) or os.path.getsize(path) == 0:
            continue
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            header = header or reader.fieldnames
            mine = list(reader)
        has_device = any(r.get("suite") == "device" for r in mine)
        rows += [r for r in mine if r.get("suite") != "device" or not seen_device]
        seen_device = seen_device or has_device
    if header is None:
        return 0
    tmp = f"{out}.tmp"
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, header)
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, out)
    return len(rows)


# ---------------------------------------------------------------------------------------------------- tests
def tests_log(work: str, out: str) -> dict:
    """The CUDA test phase's log, failures first: counts, the failing tests, their reports, then pytest's output.
    Reads WORK/tests_results.tsv, tests_failures.txt, tests_pytest.log (any may be missing). Returns the counts."""
    w = Path(work)
    results: list[tuple[str, float, str]] = []
    collected = 0
    if (w / "tests_results.tsv").exists():
        for line in (w / "tests_results.tsv").read_text(errors="replace").splitlines():
            parts = line.split("\t")
            if len(parts) == 3 and parts[0] == "collected":
                collected = max(collected, int(parts[1]))
            elif len(parts) == 3:
                results.append((parts[0], float(parts[1] or 0), parts[2]))
    pytest_log = (w / "tests_pytest.log").read_text(errors="replace") if (w / "tests_pytest.log").exists() else ""
    failures = (w / "tests_failures.txt").read_text(errors="replace") if (w / "tests_failures.txt").exists() else ""
    counts: dict[str, int] = defaultdict(int)
    for outcome, _, _ in results:
        counts[outcome] += 1
    m = re.findall(r"\[(\d+) items?\]|collected (\d+) items?", pytest_log)
    collected = max([collected] + [int(a or b) for a, b in m])
    counts["collected"] = collected
    counts["not_run"] = max(0, collected - len(results) - counts.get("deselected", 0)) if collected else 0
    bad = [r for r in results if r[0] in ("failed", "error")]
    slow = sorted(results, key=lambda r: -r[1])[:15]
    by_file: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for outcome, _, nodeid in results:
        f = nodeid.split("::", 1)[0]
        by_file[f][0] += 1
        by_file[f][1] += outcome in ("failed", "error")
    stopped = "stopped by its time limit" if re.search(r"KeyboardInterrupt|Interrupted|stopped by", pytest_log) \
        else "finished"
    lines = ["# CUDA test suite on the lease (benchmarks/gpu/gpu_session.sh tests): failures first", "",
             "counts: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) + f"; the run {stopped}", "",
             f"## {len(bad)} failing", ""]
    lines += [f"{o.upper():6s} {nodeid}" for o, _, nodeid in bad] or ["none"]
    lines += ["", "## per file: tests run, failing", ""]
    lines += [f"{f}: {n} run, {b} failing" for f, (n, b) in sorted(by_file.items())]
    lines += ["", "## slowest", ""] + [f"{s:7.2f} s {o:7s} {nodeid}" for o, s, nodeid in slow]
    lines += ["", "## failure reports", "", failures.strip() or "none", "", "## pytest output", "", pytest_log]
    Path(out).write_text("\n".join(lines) + "\n")
    return dict(counts)


# ---------------------------------------------------------------------------------------------------- targets
def _fmt(v: float, pct: bool = False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{v:.0%}" if pct else f"{v:.3f}"


def _stats(vals: list[float]) -> dict:
    vals = [v for v in vals if not math.isnan(v)]
    if not vals:
        return {}
    return {"min": min(vals), "median": statistics.median(vals), "max": max(vals), "n": len(vals)}


class Target:
    """One line of the table: the criterion, the ratios measured, and whether the bound holds."""

    def __init__(self, name: str, criterion: str, source: str):
        self.name, self.criterion, self.source = name, criterion, source
        self.values: list[float] = []
        self.detail: list[str] = []
        self.met: bool | None = None
        self.gap = ""

    def row(self) -> str:
        s = _stats(self.values)
        if not s:
            measured, met = "not measured", "open"
        else:
            measured = (f"min {_fmt(s['min'])}, median {_fmt(s['median'])}, max {_fmt(s['max'])} ({s['n']} points)"
                        if s["n"] > 1 else _fmt(s["min"]))
            met = "**met**" if self.met else f"missed{': ' + self.gap if self.gap else ''}"
        return f"| {self.name} | {self.criterion} | {measured} | {met} | {self.source} |"


def _attention_points(rows: list[dict], chosen: dict | None = None) -> list[dict]:
    """Per plain attention point (kernel, dtype, N, mode): our TFLOP/s (embedattn, or the provider ``chosen`` maps the
    point's impl key to), the fastest SDPA backend's, and the matmul peak of the run."""
    peaks = {r["dtype"]: r["p50"] for r in rows if r["suite"] == "device" and r["kernel"] == "matmul"}
    cells: dict[tuple, dict[str, float]] = defaultdict(dict)
    for r in rows:
        if r["suite"] == "attention" and r["metric"] == "tflops" and PLAIN.match(r["kernel"]):
            cells[(r["kernel"], r["dtype"], r["x_value"], r["mode"])][r["provider"]] = r["p50"]
    out = []
    for (kernel, dtype, n, mode), provs in cells.items():
        m = PLAIN.match(kernel)
        gqa = int(bool(m.group(1)) and m.group(1) != m.group(2))
        d, dv, causal = int(m.group(3)), int(m.group(4) or m.group(3)), bool(m.group(5))
        sdpa = [v for p, v in provs.items() if p.startswith("sdpa-") and not math.isnan(v)]
        impl = "default"
        if chosen is not None:
            impl = chosen.get((dtype, d, dv, causal, gqa, int(n), mode), "default")
        ours = provs.get("embedattn" if impl == "default" else impl, provs.get("embedattn", float("nan")))
        out.append(dict(kernel=kernel, dtype=dtype, N=int(n), mode=mode, D=d, Dv=dv, causal=causal, gqa=gqa,
                        ours=ours, impl=impl, sdpa=max(sdpa) if sdpa else float("nan"),
                        sdpa_name=max(((v, p) for p, v in provs.items() if p.startswith("sdpa-")),
                                      default=(0, "-"))[1], peak=peaks.get(dtype, peaks.get("bf16", float("nan")))))
    return out


def _impl_choices(impl_path: Path) -> dict | None:
    """{(dtype, D, Dv, causal, gqa, N, mode): impl} from impl_defaults.json (None when absent)."""
    if not impl_path.exists():
        return None
    from embedattn.configs import parse_key

    table = json.loads(impl_path.read_text())
    out = {}
    for kernel, entries in table.get("kernels", {}).items():
        mode = kernel.rsplit("_", 1)[-1]
        for ks, e in entries.items():
            k = parse_key(ks)
            d = int(k["head_dim"])
            out[(k["dtype"], d, int(k.get("head_dim_v", d)), k["flags"] == "causal", int(k["gqa"]), int(k["nq"]),
                 mode)] = e["config"]["impl"]
    return out


def attention_targets(rows: list[dict], label: str, chosen: dict | None = None) -> list[Target]:
    pts = _attention_points(rows, chosen)
    if not pts:
        return []
    who = "with the measured defaults" if chosen is not None else "embedattn"
    t1 = Target(f"attention fwd vs fastest SDPA, D64/128 ({label}, {who})", ">= 1.0x at every point", label)
    t2 = Target(f"attention fwd vs matmul peak, D128 ({label}, {who})", ">= 0.85 at the best point", label)
    t3 = Target(f"attention bwd vs fastest SDPA, D64/128 ({label}, {who})", ">= 0.9x at every point", label)
    t4 = Target(f"attention bwd vs fastest SDPA, D256 ({label}, {who})", ">= 0.8x at every point", label)
    for p in pts:
        r = p["ours"] / p["sdpa"] if p["sdpa"] and not math.isnan(p["sdpa"]) else float("nan")
        where = f"{p['dtype']} {p['kernel']} N{p['N']} {p['mode']}"
        if p["Dv"] != p["D"]:
            continue
        if p["D"] in (64, 128):
            (t1 if p["mode"] == "fwd" else t3).values.append(r)
            (t1 if p["mode"] == "fwd" else t3).detail.append(f"{where}: {r:.3f}x {p['sdpa_name']}")
        if p["D"] == 256 and p["mode"] == "bwd":
            t4.values.append(r)
            t4.detail.append(f"{where}: {r:.3f}x {p['sdpa_name']}")
        if p["D"] == 128 and p["mode"] == "fwd":
            t2.values.append(p["ours"] / p["peak"])
            t2.detail.append(f"{where}: {p['ours'] / p['peak']:.3f} of {p['peak']:.0f} TFLOP/s")
    for t, bound, agg in ((t1, 1.0, min), (t3, 0.9, min), (t4, 0.8, min), (t2, 0.85, max)):
        vals = [v for v in t.values if not math.isnan(v)]
        if vals:
            t.met = agg(vals) >= bound
            if not t.met:
                worst = t.detail[t.values.index(agg(vals))] if agg(vals) in t.values else ""
                t.gap = f"{agg(vals) / bound - 1:+.1%} at {worst}"
    return [t1, t2, t3, t4]


def embedding_targets(rows: list[dict]) -> list[Target]:
    cells: dict[tuple, dict[str, dict[str, float]]] = defaultdict(lambda: defaultdict(dict))
    for r in rows:
        if r["suite"] == "embedding" and r["metric"] in ("gbps", "frac_copy_bw"):
            cells[(r["kernel"], r["dtype"], int(r["x_value"]), r["mode"])][r["provider"]][r["metric"]] = r["p50"]
    if not cells:
        return []
    t5 = Target("embedding fwd vs nn.Embedding + add (eager)", ">= 1.0x at every size", "results.csv")
    t6 = Target("embedding fwd, fraction of copy bandwidth", ">= 0.85 at >= 64k tokens", "results.csv")
    t7 = Target("embedding bwd vs eager", ">= 1.5x at every size", "results.csv")
    for (kernel, dtype, tokens, mode), provs in sorted(cells.items()):
        ours, eager = provs.get("embedattn", {}), provs.get("torch-eager", {})
        where = f"{dtype} {kernel} {tokens} tokens"
        if "gbps" in ours and "gbps" in eager and eager["gbps"] > 0:
            r = ours["gbps"] / eager["gbps"]
            t = t5 if mode == "fwd" else t7 if mode == "bwd" else None
            if t is not None:
                t.values.append(r)
                t.detail.append(f"{where}: {r:.3f}x")
        if mode == "fwd" and tokens >= 65536 and "frac_copy_bw" in ours:
            t6.values.append(ours["frac_copy_bw"])
            t6.detail.append(f"{where}: {ours['frac_copy_bw']:.3f}")
    for t, bound in ((t5, 1.0), (t6, 0.85), (t7, 1.5)):
        if t.values:
            worst = min(t.values)
            t.met = worst >= bound
            if not t.met:
                t.gap = f"{worst / bound - 1:+.1%} at {t.detail[t.values.index(worst)]}"
    return [t5, t6, t7]


def word2vec_targets(rows: list[dict]) -> list[Target]:
    w = [r for r in rows if r["suite"] == "negative_sampling" and r["kernel"].startswith("word2vec")]
    if not w:
        return []
    t8 = Target("word2vec words/s, ~100M-word corpus (skip-gram, default trainer)", ">= 30M words/s", "w2v.csv")
    big = [r for r in w if r["kernel"] == "word2vec_large" and r["metric"] == "words_per_s"
           and r["provider"] == "embedattn"]
    if big:
        best = max(big, key=lambda r: r["x_value"])  # the largest corpus run (the calibration is smaller)
        t8.values.append(best["p50"] / 1e6)
        t8.detail.append(f"{best['x_value']:,.0f} words: {best['p50']:,.0f} words/s")
        t8.met = best["p50"] >= 30e6 and best["x_value"] >= 0.9e8
        t8.criterion = ">= 30 (M words/s) on >= 90M words"
        if not t8.met:
            t8.gap = (f"{best['p50'] / 30e6 - 1:+.1%}" if best["p50"] < 30e6 else "") + (
                f" (only {best['x_value'] / 1e6:.0f}M words trained)" if best["x_value"] < 0.9e8 else "")
    t9 = Target("word2vec WordSim-353 rho vs gensim (head500, 20 epochs, skip-gram)",
                f">= gensim's - {QUALITY_TOLERANCE}", "w2v.csv + gensim_reference.json")
    rho = {r["provider"]: r["p50"] for r in w if r["kernel"] == "word2vec" and r["metric"] == "ws353_spearman"}
    if "embedattn" in rho and "gensim" in rho:
        t9.values.append(rho["embedattn"] - rho["gensim"])
        t9.detail.append(f"embedattn {rho['embedattn']:.3f}, gensim {rho['gensim']:.3f}")
        t9.met = rho["embedattn"] >= rho["gensim"] - QUALITY_TOLERANCE
        t9.criterion = (f"difference >= -{QUALITY_TOLERANCE} (embedattn {rho['embedattn']:.3f}, "
                        f"gensim {rho['gensim']:.3f})")
        if not t9.met:
            t9.gap = f"{rho['embedattn'] - rho['gensim']:+.3f}"
    return [t8, t9]


def decode_targets(rows: list[dict]) -> list[Target]:
    ms: dict[tuple, dict[str, float]] = defaultdict(dict)
    for r in rows:
        if r["suite"] == "decode" and r["kernel"] == "kvcache_fwd" and r["metric"] == "ms":
            ms[(r["shape"], r["x_value"])][r["provider"]] = r["p50"]
    t = Target("paged decoding, 64-token pages vs contiguous (time ratio)", "<= 1.05 at every point", "decode.csv")
    for (shape, _), provs in sorted(ms.items()):
        if "embedattn-paged64" in provs and "embedattn-contiguous" in provs:
            r = provs["embedattn-paged64"] / provs["embedattn-contiguous"]
            t.values.append(r)
            t.detail.append(f"{shape}: {r:.3f}")
    if t.values:
        worst = max(t.values)
        t.met = worst <= 1.05
        if not t.met:
            t.gap = f"{worst - 1:+.1%} slower at {t.detail[t.values.index(worst)]}"
    return [t] if ms else []


def targets_block(report: Path) -> str:
    rows = read_rows(report / "results.csv")
    hopper = read_rows(report / "hopper_attention.csv")
    decode = read_rows(report / "decode.csv")
    chosen = _impl_choices(report / "impl_defaults.json")
    ts = attention_targets(rows, "results.csv (sweep, tuned table)")
    ts += attention_targets(hopper, "hopper_attention.csv") + (
        attention_targets(hopper, "hopper_attention.csv", chosen) if chosen is not None else [])
    ts += embedding_targets(rows) + word2vec_targets(rows) + decode_targets(decode)
    env = {}
    if (report / "env.json").exists():
        env = json.loads((report / "env.json").read_text())
    session = {}
    if (report / "session.json").exists():
        session = json.loads((report / "session.json").read_text())
    device = env.get("device_name") or next((r["device"] for r in rows + hopper + decode), "?")
    lines = [BEGIN, "", f"## Issue #27 targets, {device} (generated from this folder's CSVs)", "",
             "Each ratio is taken inside one run (one CSV, with that run's own SDPA, eager, copy and matmul numbers). "
             f"Regenerate: `python benchmarks/gpu/lease_report.py targets {_shown(report)}`.", "",
             "| target | criterion | measured | status | source |", "|---|---|---|---|---|"]
    lines += [t.row() for t in ts]
    if not ts:
        lines.append("| (nothing measured yet) | | | | |")
    missed = [t for t in ts if t.values and not t.met]
    lines += ["", "### Missed: by how much, and the lever for the next lease", ""]
    for t in missed:
        lines.append(f"- **{t.name}**: {t.gap}. Profile / lever: _(fill in: what the numbers and the profile show)_")
    if not missed:
        lines.append("- none missed among the targets measured")
    open_ = [t for t in ts if not t.values]
    if open_:
        lines += ["", "Not measured in this lease: " + "; ".join(t.name for t in open_)]
    if session.get("tests"):
        lines += ["", f"CUDA tests: {session['tests']} (tests_cuda.log, failures first)."]
    lines += ["", "<details><summary>every point behind the table</summary>", ""]
    for t in ts:
        if t.detail:
            lines += [f"- {t.name}:"] + [f"  - {d}" for d in t.detail]
    lines += ["", "</details>", "", END]
    return "\n".join(lines)


def _shown(path: Path) -> str:
    """``path`` relative to the repository when inside it (what a reader can paste), else as given."""
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def _machine(report: Path) -> str:
    """One line on the run: the device, versions and date, from the folder's env.json / hopper_env.json / session."""
    env = {}
    for name in ("env.json", "hopper_env.json"):
        if (report / name).exists():
            env = {**json.loads((report / name).read_text()), **env}
    session = json.loads((report / "session.json").read_text()) if (report / "session.json").exists() else {}
    rows = read_rows(report / "results.csv") or read_rows(report / "hopper_attention.csv")
    gpu = env.get("gpu", {})
    return (f"Machine: {env.get('device_name') or session.get('gpu', '?')} ({gpu.get('sm_count', '?')} SMs, "
            f"{gpu.get('memory_gib', '?')} GiB), torch {env.get('torch', '?')}, triton {env.get('triton', '?')}, "
            f"CUDA {env.get('cuda', '?')}; run {rows[0]['timestamp'] if rows else '?'}.")


def write_notes(report: Path, notes: Path | None = None) -> Path:
    """Put the targets block into NOTES.md (replacing the last block; a new file gets a skeleton around it)."""
    notes = notes or report / "NOTES.md"
    block = targets_block(report)
    if notes.exists():
        text = notes.read_text()
        if BEGIN in text and END in text:
            text = text[:text.index(BEGIN)] + block + text[text.index(END) + len(END):]
        else:
            head, sep, rest = text.partition("\n\n")
            text = head + sep + block + "\n\n" + rest
    else:
        text = "\n".join([
            f"# {report.name} notes: what the lease measured, against which target, and the next lever", "",
            _machine(report) + " Commands: `bash benchmarks/gpu/gpu_session.sh call1` and `call2` "
            "(docs/gpu_lease.md); every number below comes from the CSVs in this folder.", "",
            block, "", "## What each result says, and the next lever", "", "_(fill in)_", ""])
    notes.write_text(text)
    return notes


# ---------------------------------------------------------------------------------------------------- collect
# what reports/<gpu>/ keeps (w2v.csv's rows are in results.csv; the logs stay in the archives)
REPORT_FILES = ("results.csv", "env.json", "summary.md", "hopper_attention.csv", "hopper_attention.md",
                "hopper_correctness.csv", "hopper_env.json", "impl_defaults.json", "decode.csv", "tests_cuda.log",
                "session.json")


def _merge_tables(paths: list[Path], dest: Path) -> None:
    """The config tables of the calls merged key by key, the later call's entries over the earlier's (a second call on
    a fresh machine holds only the defaults it decided: the first call's tuned entries must stay)."""
    from benchmarks.tune import write_table
    from embedattn import configs

    table: dict = {"format": 1, "kernels": {}}
    for path in paths:
        t = configs.read_table(str(path))
        for kernel, entries in t.pop("kernels", {}).items():
            table["kernels"].setdefault(kernel, {}).update(entries)
        last_run = t.get("last_run") if "last_run" in t else table.get("last_run")
        table.update({k: v for k, v in t.items() if k != "last_run"})
        if last_run is not None:
            table["last_run"] = last_run
    write_table(str(dest), table)


def collect(sources: list[str], repo: Path, stage: Path) -> int:
    """Unpack the lease's returns (folders holding lease-call*.tgz, or the archives) and place them in ``repo``."""
    archives = []
    for s in sources:
        p = Path(s)
        archives += sorted(p.glob("**/lease-call*.tgz")) if p.is_dir() else [p]
    if not archives:
        print("collect: no lease-call*.tgz found in " + ", ".join(sources), file=sys.stderr)
        return 2
    if stage.exists():
        shutil.rmtree(stage)
    stage.mkdir(parents=True)
    calls = []
    for i, a in enumerate(sorted(archives, key=lambda p: p.name)):  # call1 before call2: the later one's files win
        dest = stage / f"{i}-{a.stem}"
        with tarfile.open(a) as t:
            if sys.version_info >= (3, 12):
                t.extractall(dest, filter="data")
            else:
                t.extractall(dest)  # noqa: S202 (our own archive)
        calls.append(dest)
        print(f"unpacked {a}")
    placed = []
    tags = sorted({p.name for c in calls for p in (c / "reports").glob("*") if p.is_dir()})
    for tag in tags:
        dest = repo / "reports" / tag
        dest.mkdir(parents=True, exist_ok=True)
        for name in REPORT_FILES:
            newest = [c / "reports" / tag / name for c in calls if (c / "reports" / tag / name).exists()]
            if newest:
                shutil.copy2(newest[-1], dest / name)
                placed.append(dest / name)
        if (dest / "results.csv").exists():
            for cmd in (["-m", "benchmarks.plot", str(dest / "results.csv")],
                        ["-m", "benchmarks.summary", str(dest / "results.csv")]):
                subprocess.run([sys.executable, *cmd], cwd=repo, check=False)
            placed += [dest / "plots", dest / "summary.md"]
        for csv_name, plots in (("hopper_attention.csv", "plots_hopper"), ("decode.csv", "plots_decode")):
            if (dest / csv_name).exists():
                subprocess.run([sys.executable, "-m", "benchmarks.plot", str(dest / csv_name), "--out",
                                str(dest / plots)], cwd=repo, check=False)
                placed.append(dest / plots)
        placed.append(write_notes(dest))
    for name in sorted({p.name for c in calls for p in (c / "configs").glob("*.json")}):
        dest = repo / "embedattn" / "configs" / name
        _merge_tables([c / "configs" / name for c in calls if (c / "configs" / name).exists()], dest)
        placed.append(dest)
    rel = sorted({str(p.relative_to(repo)) for p in placed if p.exists()})
    print("\nto commit (after reading NOTES.md and tests_cuda.log):\n  git add " + " ".join(rel))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("collect", help="place the lease's returned files in the repository (CPU machine)")
    c.add_argument("sources", nargs="+")
    c.add_argument("--repo", default=str(ROOT))
    c.add_argument("--stage", default=None, help="where to unpack (default: <repo>/build/lease/collected)")
    t = sub.add_parser("targets", help="write the targets block into a report folder's NOTES.md")
    t.add_argument("report")
    t.add_argument("--notes", default=None, help="the NOTES.md to write (default: REPORT/NOTES.md)")
    t.add_argument("--print", action="store_true", help="print the block, write nothing")
    s = sub.add_parser("tests", help="the test phase's log, failures first")
    s.add_argument("work")
    s.add_argument("out")
    m = sub.add_parser("merge-csv", help="concatenate long-format CSVs")
    m.add_argument("out")
    m.add_argument("inputs", nargs="+")
    args = ap.parse_args(argv)
    if args.cmd == "collect":
        repo = Path(args.repo).resolve()
        return collect(args.sources, repo, Path(args.stage) if args.stage else repo / "build" / "lease" / "collected")
    if args.cmd == "targets":
        if args.print:
            print(targets_block(Path(args.report)))
        else:
            print(write_notes(Path(args.report), Path(args.notes) if args.notes else None))
        return 0
    if args.cmd == "tests":
        counts = tests_log(args.work, args.out)
        print("tests: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
        return 0
    n = merge_csv(args.out, [p for pat in args.inputs for p in (sorted(glob.glob(pat)) or [pat])])
    print(f"{n} rows -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
