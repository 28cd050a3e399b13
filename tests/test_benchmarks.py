"""The benchmark harness: work formulas, CSV schema, plots and summary from a synthetic CSV, the CLI.

Nothing here asserts a speed: timings only have to be well-formed (p20 <= p50 <= p80).
"""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the benchmarks package lives at the root

from helpers import DEVICE  # noqa: E402

from benchmarks import harness  # noqa: E402
from benchmarks.harness import COLUMNS, Context, Recorder, Timing  # noqa: E402

CPU = torch.device("cpu")


def test_attention_flops():
    # one head, Nq = Nk = 2, D = 1: QK^T and PV are 2*2*1 MACs each = 16 FLOPs
    assert harness.attention_flops(1, 1, 2, 2, 1, False, "fwd") == 16
    assert harness.attention_flops(1, 1, 2, 2, 1, True, "fwd") == 8
    f = harness.attention_flops(2, 16, 4096, 4096, 128, False, "fwd")
    assert f == 4 * 2 * 16 * 4096 * 4096 * 128
    assert harness.attention_flops(2, 16, 4096, 4096, 128, False, "bwd") == 2.5 * f
    assert harness.attention_flops(2, 16, 4096, 4096, 128, False, "fwd+bwd") == 3.5 * f
    assert harness.attention_flops(2, 16, 4096, 4096, 128, True, "fwd+bwd") == 1.75 * f
    with pytest.raises(KeyError):
        harness.attention_flops(1, 1, 1, 1, 1, False, "step")


def test_embedding_bytes():
    T, D, V, P, e = 1000, 64, 5000, 100, 2
    fwd = T * 8 + T * D * e + P * D * e + T * D * e
    bwd = T * 8 + T * D * e + V * D * e + P * D * e
    assert harness.embedding_bytes(T, D, V, e, "fwd", pos_rows=P) == fwd
    assert harness.embedding_bytes(T, D, V, e, "bwd", pos_rows=P) == bwd
    assert harness.embedding_bytes(T, D, V, e, "fwd+bwd", pos_rows=P) == fwd + bwd
    assert harness.embedding_bytes(T, D, V, 4, "fwd", index_bytes=4) == T * 4 + 2 * T * D * 4


@pytest.mark.parametrize("name,tag", [
    ("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA H200", "h200"), ("NVIDIA A100-SXM4-80GB", "a100"),
    ("NVIDIA GeForce RTX 4090", "rtx4090"), ("Tesla T4", "t4"), ("NVIDIA L4", "l4"),
])  # fmt: skip
def test_device_tag(name, tag):
    assert harness.tag_from_name(name) == tag
    assert harness.device_tag("cpu") == "cpu"


def test_throughput_quantiles_follow_time_quantiles():
    rec = Recorder(Context(device=CPU), None)
    rows = harness.measurement_rows(rec, dict(suite="s", kernel="k", provider="p", mode="fwd", dtype="fp32"),
                                    Timing(2.0, 1.0, 4.0), work=1e9, metric="gbps", scale=1e-9,
                                    extra=lambda g: ("frac_copy_bw", "fraction", g / 1000))  # fmt: skip
    by = {r["metric"]: r for r in rows}
    assert set(by) == {"ms", "gbps", "frac_copy_bw"}  # no peak_mem row on CPU
    g = by["gbps"]
    assert (g["p20"], g["p50"], g["p80"]) == (250.0, 500.0, 1000.0)  # 1 GB in 4, 2, 1 ms
    assert by["frac_copy_bw"]["p50"] == 0.5
    assert g["unit"] == "GB/s" and by["ms"]["p50"] == 2.0


def test_host_timer_quantiles_and_rotation():
    seen = []
    fn = harness.rotating(lambda x: seen.append(x), [(1,), (2,), (3,)])
    t = harness.host_timer(fn, warmup_ms=0, rep_ms=1, min_reps=5)
    assert 0 <= t.p20 <= t.p50 <= t.p80
    assert seen[:4] == [1, 2, 3, 1]


def test_coarse_first_keeps_full_range_early():
    items = [(g, n) for g in ("bf16", "fp16") for n in (1, 2, 4, 8, 16, 32)]
    got = harness.coarse_first(items, lambda it: it[1], group=lambda it: it[0])
    assert got[:3] == [("bf16", 2), ("bf16", 8), ("bf16", 32)]
    assert got[3:6] == [("bf16", 1), ("bf16", 4), ("bf16", 16)] and got[6][0] == "fp16"


def test_csv_schema(tmp_path):
    path = tmp_path / "r" / "results.csv"
    rec = Recorder(Context(device=CPU), str(path))
    rec.add([rec.row(suite="s", kernel="k", provider="p", mode="fwd", dtype="fp32", x_name="N", x_value=8,
                     metric="ms", unit="ms", p50=1.5, p20=1.0, p80=float("nan"))])  # fmt: skip
    with pytest.raises(KeyError):
        rec.row(not_a_column=1)
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == COLUMNS
        (row,) = list(reader)
    assert row["torch"] == torch.__version__ and row["device"] == "cpu" and row["timestamp"].endswith("Z")
    assert row["p80"] == ""  # NaN is written empty
    (back,) = harness.read_csv(str(path))
    assert back["p50"] == 1.5 and math.isnan(back["p80"]) and back["x_value"] == 8.0


def _synthetic_csv(path: Path) -> None:
    rec = Recorder(Context(device=CPU, device_name="Test GPU"), str(path))
    rows = [rec.row(suite="device", kernel="matmul", provider="torch", mode="mm", dtype="bf16", metric="tflops",
                    unit="TFLOP/s", p50=100.0, p20=100.0, p80=100.0),
            rec.row(suite="device", kernel="copy", provider="torch", mode="copy", dtype="uint8", metric="gbps",
                    unit="GB/s", p50=1000.0, p20=1000.0, p80=1000.0)]  # fmt: skip
    for n in (512, 1024, 2048):
        for prov, tf in (("embedattn", 60.0), ("sdpa-flash", 30.0), ("sdpa-math", 120.0)):
            base = dict(suite="attention", kernel="attention_d64", provider=prov, mode="fwd+bwd", dtype="bf16",
                        shape=f"N={n}", x_name="N", x_value=n,
                        config="BLOCK_M=128 warps=4" if prov == "embedattn" else "")  # fmt: skip
            rows += harness.measurement_rows(rec, base, Timing(1.0, 0.9, 1.2), tf * 1e9, "tflops", scale=1e-12,
                                             peak_mib=100.0 if prov == "embedattn" else 200.0)  # fmt: skip
    for prov, wps in (("embedattn", 2e6), ("gensim", 1e6)):
        base = dict(suite="negative_sampling", kernel="word2vec", provider=prov, mode="train", dtype="fp32",
                    x_name="epochs", x_value=1)  # fmt: skip
        rows += harness.measurement_rows(rec, base, Timing(1000.0, 1000.0, 1000.0), wps, "words_per_s")
        rows.append(rec.row(**base, metric="ws353_spearman", unit="rho", p50=0.6, p20=0.6, p80=0.6))
    rec.add(rows)


def test_plots_from_csv(tmp_path):
    from benchmarks.plot import main as plot_main
    from benchmarks.plot import plot_name

    path = tmp_path / "results.csv"
    _synthetic_csv(path)
    assert plot_main([str(path)]) == 0
    pngs = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert pngs == sorted([plot_name("attention", "attention_d64", "fwd+bwd", "bf16"),
                           plot_name("negative_sampling", "word2vec", "train", "fp32")])  # fmt: skip
    for p in (tmp_path / "plots").iterdir():
        assert p.read_bytes()[:4] == b"\x89PNG" and p.stat().st_size > 5000


def test_summary_from_csv(tmp_path):
    from benchmarks.plot import plot_csv
    from benchmarks.summary import write_summary

    path = tmp_path / "results.csv"
    _synthetic_csv(path)
    plot_csv(str(path))
    text = Path(write_summary(str(path))).read_text()
    assert "# embedattn benchmarks: Test GPU" in text
    assert "## attention" in text and "## negative_sampling" in text
    assert "| TFLOP/s | sdpa-flash | 2 | 3 |" in text  # 60 / 30 at three sizes
    assert "| TFLOP/s | sdpa-math | 0.5 | 3 |" in text
    assert "| peak memory (lower is better) | sdpa-flash | 0.5 | 3 |" in text
    assert "| attention_d64 | fwd+bwd | bf16 | 1k | `BLOCK_M=128 warps=4` |" in text
    assert "| words/s | gensim | 2 | 1 |" in text
    assert "| attention_d64 | fwd+bwd | bf16 | embedattn (TFLOP/s) | 60.0 | 60.0 | 60.0 | 60.0 |" in text
    assert "| word2vec | embedattn | ws353_spearman | 0.600 |" in text
    assert "](plots/attention__attention_d64__fwd-bwd__bf16.png)" in text
    assert "N=1k" in text


def test_fused_step_binding_by_name():
    from benchmarks.negative_sampling import bind_step

    got = {}

    def step(inputs, targets, negatives, w_in, w_out, lr, chunk=64):
        got.update(inputs=inputs, targets=targets, negatives=negatives, w_in=w_in, w_out=w_out, lr=lr)

    bind_step(step)(1, 2, 3, 4, 5, 0.5)
    assert got == dict(inputs=1, targets=2, negatives=3, w_in=4, w_out=5, lr=0.5)
    with pytest.raises(TypeError, match="lr"):
        bind_step(lambda center, context, negatives, in_weight, out_weight: None)


def test_sgns_peers_agree():
    from benchmarks.negative_sampling import torch_sgns_loss, torch_sgns_step

    g = torch.Generator().manual_seed(0)
    V, D, B, K = 11, 5, 7, 3
    c, x = torch.randint(0, V, (B,), generator=g), torch.randint(0, V, (B,), generator=g)
    n = torch.randint(0, V, (B, K), generator=g)
    w_in = torch.randn(V, D, generator=g, dtype=torch.float64)
    w_out = torch.randn(V, D, generator=g, dtype=torch.float64)
    a, b = w_in.clone().requires_grad_(), w_out.clone().requires_grad_()
    (torch_sgns_loss(c, x, n, a, b) * B).backward()  # sum over pairs: one SGD step = -lr * grad
    torch_sgns_step(c, x, n, w_in, w_out, lr=0.1)
    torch.testing.assert_close(w_in, (a - 0.1 * a.grad).detach())
    torch.testing.assert_close(w_out, (b - 0.1 * b.grad).detach())


def test_ws353_spearman(tmp_path):
    from benchmarks.negative_sampling import ws353_spearman

    f = tmp_path / "ws.tsv"
    f.write_text("# comment\nA\tb\t1.0\na\tc\t5.0\na\td\t9.0\na\tzzz\t3.0\n")
    angle = {"a": 0.0, "b": 1.5, "c": 1.0, "d": 0.2}  # closer angle to "a" = higher gold score
    vec = {w: torch.tensor([math.cos(t), math.sin(t)]) for w, t in angle.items()}
    rho, used = ws353_spearman(lambda w: vec[w], str(f))
    assert used == 3 and rho == pytest.approx(1.0)


def test_suite_skips_unavailable_op(monkeypatch):
    import embedattn
    from benchmarks import attention

    def nope(*a, **k):
        raise NotImplementedError

    monkeypatch.setattr(embedattn, "attention", nope)
    assert "not implemented" in attention.available(Context(device=CPU))


def test_cli_tiny_sweep(tmp_path, monkeypatch):
    """The whole pipeline on seconds-long sizes: CSV, env.json, plots, summary; then a zero budget.
    Under EMBEDATTN_TEST_DEVICE=cuda it runs on the GPU: do_bench, peak memory, SDPA backends, configs."""
    from benchmarks.__main__ import main

    monkeypatch.setenv("TRITON_CACHE_AUTOTUNING", "0")  # main() would switch Triton's cache on process-wide
    out = tmp_path / DEVICE
    assert main(["--tiny", "--device", DEVICE, "--out", str(out), "--no-compile", "--no-plots"]) == 0
    rows = harness.read_csv(str(out / "results.csv"))
    env = json.loads((out / "env.json").read_text())
    assert env["device"].startswith(DEVICE) and env["copy_bandwidth_gbps"] > 0
    assert any("Triton kernels are NOT timed" in n for n in env["notes"]) == (DEVICE == "cpu")
    if DEVICE == "cuda":  # peak memory is measured, and the embedattn rows say which kernel config ran
        assert any(r["metric"] == "peak_mem" for r in rows)
        ours = [r for r in rows if r["provider"] == "embedattn" and r["suite"] == "attention"]
        assert ours and all(r["config"] for r in ours), "attention rows without a recorded config"
    suites = {r["suite"] for r in rows}
    assert "device" in suites
    for name in env["suites_run"]:  # every suite whose op exists measured something well-formed
        got = [r for r in rows if r["suite"] == name and r["metric"] != "ms"]
        assert got, name
        assert any(r["provider"] == "embedattn" for r in got)
        assert all(r["p20"] <= r["p50"] <= r["p80"] for r in got if not math.isnan(r["p50"]))
    assert "## Notes from the run" in (out / "summary.md").read_text()

    out2 = tmp_path / "budget"
    assert main(["--tiny", "--device", DEVICE, "--out", str(out2), "--max-seconds", "0", "--no-plots",
                 "--suite", "attention"]) == 0  # fmt: skip
    env2 = json.loads((out2 / "env.json").read_text())
    if env2["suites_run"]:
        assert env2["skipped_for_budget"] and all(r["suite"] == "device"
                                                  for r in harness.read_csv(str(out2 / "results.csv")))
