"""The benchmark harness: work formulas, CSV schema, plots and summary from a synthetic CSV, the CLI.

Nothing here asserts a speed: timings only have to be well-formed (p20 <= p50 <= p80).
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the benchmarks package lives at the root

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


def test_run_points_budget_interrupt_and_summary(capsys):
    """The scripts' loop (decode_bench, hf_memory): every point without a budget, none once the budget is spent,
    Ctrl-C ends the loop; the context's notes and the count come last."""
    ctx = Context(device=CPU, log=lambda msg: None)
    ctx.note("a note")
    ran = []
    assert harness.run_points(ctx, "demo", [(1, "a"), (2, "b")], lambda i, s: ran.append((i, s)), None, 0.0) == 2
    assert ran == [(1, "a"), (2, "b")]
    assert capsys.readouterr().out.splitlines()[0] == "a note"
    t_start = harness.time.time() - 10  # ten seconds already spent of a budget of five
    assert harness.run_points(ctx, "demo", [(1,), (2,)], ran.append, 5, t_start) == 0
    assert "demo: budget spent, 2 points left" in capsys.readouterr().out

    def stop(i):
        if i == 2:
            raise KeyboardInterrupt
        ran.append(i)

    assert harness.run_points(ctx, "demo", [(1,), (2,), (3,)], stop, None, 0.0) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "demo: interrupted: the rows so far are in the CSV" and out[-1].startswith("demo: 1 of 3 points")


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


def test_cpu_fused_step_matches_the_peer():
    """On CPU the 'embedattn' step is the word2vec trainer's, called (center, context, negatives, in, out,
    lr) like the fused kernel: with no negative equal to its target it makes the peer's update."""
    from benchmarks.negative_sampling import fused_step, torch_sgns_step

    step = fused_step(Context(device=CPU, log=lambda _: None))
    g = torch.Generator().manual_seed(0)
    V, D, B, K = 11, 5, 7, 3
    c, x = torch.randint(0, V, (B,), generator=g), torch.randint(0, 5, (B,), generator=g)
    n = torch.randint(5, V, (B, K), generator=g)  # disjoint from the targets
    w_in, w_out = torch.randn(V, D, generator=g), torch.randn(V, D, generator=g)
    a, b = w_in.clone(), w_out.clone()
    step(c, x, n, w_in, w_out, 0.1)
    torch_sgns_step(c, x, n, a, b, lr=0.1)
    torch.testing.assert_close(w_in, a)
    torch.testing.assert_close(w_out, b)


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


def test_suite_skips_failing_op(monkeypatch):
    import embedattn
    from benchmarks import attention

    assert attention.available(Context(device=CPU)) is None

    def broken(*a, **k):
        raise RuntimeError("no kernel for this device")

    monkeypatch.setattr(embedattn, "attention", broken)
    assert attention.available(Context(device=CPU)) == (
        "embedattn.attention failed on a tiny input: RuntimeError: no kernel for this device")


@pytest.mark.parametrize("mode", ["fwd", "bwd", "fwd+bwd", "step"])
def test_run_speed_benchmark_modes(mode):
    """The one runner: forward on the inputs as given in fwd/step; in bwd the forwards run once per set
    before timing; the backward gets each set's own upstream gradient and reaches the inputs named by
    grad_inputs and the shared params, on copies whose gradients are cleared; the caller's tensors stay
    as they were (but for a step, which updates its params in place)."""
    g = torch.Generator().manual_seed(0)
    sets = [(torch.randn(4, generator=g), torch.randn(4, generator=g)) for _ in range(2)]
    grads = [torch.full((4,), float(i + 1)) for i in range(2)]
    # integers: a step's repeated w += 1 stays exact, so the weight counts the calls (a random float drifts by
    # rounding after a timing-dependent number of adds)
    weight = torch.randint(-8, 8, (4,), generator=g).float()
    calls, seen_grads, leaves = [], [], []

    def forward(x, y, w):
        calls.append(1)
        if mode == "step":
            w.add_(1.0)
        out = x * y * w
        if out.requires_grad:
            leaves.extend([x, y, w])
            out.register_hook(lambda grad: seen_grads.append(grad.clone()))
        return out

    ctx = Context(device=CPU, warmup_ms=0, rep_ms=1)
    w0 = weight.clone()
    timing, peak = harness.run_speed_benchmark(ctx, forward, sets, mode, grad_outputs=grads, grad_inputs=(0,),
                                               params=(weight,))  # fmt: skip
    assert 0 <= timing.p20 <= timing.p50 <= timing.p80 and math.isnan(peak)  # no peak memory on CPU
    assert all(not x.requires_grad and x.grad is None for st in sets for x in st)
    if mode == "step":
        assert torch.equal(weight, w0 + len(calls))
        return
    assert torch.equal(weight, w0) and not weight.requires_grad
    if mode == "fwd":
        assert not seen_grads and not leaves
        return
    if mode == "bwd":
        assert len(calls) == len(sets)  # the forwards are outside the timed region
    assert len(seen_grads) >= 3 and all(any(torch.equal(s, gr) for gr in grads) for s in seen_grads)
    x, y, w = leaves[:3]
    assert x.requires_grad and not y.requires_grad and w.requires_grad and w is not weight
    assert all(t.grad is None for t in leaves)  # cleared once measured
    with pytest.raises(ValueError, match="unknown mode"):
        harness.run_speed_benchmark(ctx, forward, sets, "full")


def _cli(main, argv, capsys) -> tuple[int, str]:
    """Exit status and stderr of one command run in this process (argparse errors exit via SystemExit)."""
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def _unwritable_dir(tmp_path: Path) -> Path:
    ro = tmp_path / "read_only"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        (ro / "probe").touch()
    except OSError:
        return ro / "out"
    pytest.skip("this user writes in read-only folders (root)")


@pytest.mark.parametrize("args,message", [
    (["--dtype", "fp64"], "argument --dtype: 'fp64' not one of fp16, bf16, fp32"),
    (["--dtype", "fp16,float16"], "argument --dtype: 'float16' not one of fp16, bf16, fp32"),
    (["--max-seconds", "-5"], "argument --max-seconds: must be > 0, got -5"),
    (["--max-seconds", "0"], "argument --max-seconds: must be > 0, got 0"),
    (["--warmup-ms", "-1"], "argument --warmup-ms: must be a finite number >= 0, got -1"),
    (["--rep-ms", "-2.5"], "argument --rep-ms: must be a finite number >= 0, got -2.5"),
    (["--rep-ms", "many"], "argument --rep-ms: not a number: 'many'"),
    (["--suite", "attn"], "argument --suite: 'attn' not one of attention, embedding, negative_sampling, ring, all"),
    (["--out", "{file}"], "--out: {file} exists and is not a folder"),
    (["--out", "{file}/sub"], "--out: cannot write in {file}/sub: Not a directory"),
    (["--out", "{read_only}"], "--out: cannot write in {read_only}: Permission denied"),
])  # fmt: skip
def test_cli_rejects_bad_arguments(args, message, tmp_path, monkeypatch, capsys):
    """One line on stderr and exit status 2, before anything is measured."""
    from benchmarks.__main__ import main

    def measured(*a, **k):
        raise AssertionError("a benchmark ran")

    monkeypatch.setattr(harness, "measure_copy_bandwidth", measured)
    file = tmp_path / "results.csv"
    file.write_text("not a folder\n")
    paths = {"file": str(file)}
    if "{read_only}" in args[-1]:
        paths["read_only"] = str(_unwritable_dir(tmp_path))
    args = [a.format(**paths) for a in args]
    if "--out" not in args:
        args += ["--out", str(tmp_path / "out")]
    code, err = _cli(main, ["--tiny", "--device", "cpu", *args], capsys)
    assert code == 2
    assert err == f"python -m benchmarks: error: {message.format(**paths)}\n"
    assert not (tmp_path / "out").exists()


def test_cli_suite_lists_may_name_all():
    """'--suite all,ring' answered "'all' not one of ..., all": "all" is a name among the others."""
    from benchmarks.__main__ import SUITES, parse_args

    assert parse_args(["--suite", "all,ring"]).suites == SUITES
    assert parse_args(["--suite", "ring, attention,ring"]).suites == ("ring", "attention")
    assert parse_args(["--suite", "ring,all"]).named_suites == ("ring",)


def _fake_ring(calls):
    def run_ring(world_size, n, *, causal, load_balance, dtype, reps, log):
        calls.append(dtype)
        return [dict(n=n, batch=1, heads=4, kv_heads=4, head_dim=64, dtype=dtype, backend="reference", causal=c,
                     load_balance=lb, world_size=world_size, n_local=n // world_size, step_ms=2.0, compute_ms=1.5,
                     comm_ms=1.0, hidden=0.5, kv_mib=0.1) for c in causal for lb in load_balance]

    return run_ring


def test_cli_ring_runs_the_dtype_asked(tmp_path, monkeypatch):
    """'--suite ring --dtype bf16' silently ran fp32: the ring runs (and its rows say) the --dtype asked."""
    from benchmarks import ring
    from benchmarks.__main__ import main

    calls: list[str] = []
    monkeypatch.setattr(ring, "run_ring", _fake_ring(calls))  # the gloo processes are the ring's own tests' job
    out = tmp_path / "ring"
    assert main(["--quick", "--device", "cpu", "--suite", "ring", "--dtype", "bf16", "--out", str(out),
                 "--no-plots"]) == 0  # fmt: skip
    rows = [r for r in harness.read_csv(str(out / "results.csv")) if r["suite"] == "ring"]
    assert calls == ["bf16"] and rows and {r["dtype"] for r in rows} == {"bf16"}
    env = json.loads((out / "env.json").read_text())
    assert any("dtypes per suite: ring bf16" in n for n in env["notes"])
    cases = ring.plan(Context(CPU, profile="quick"))
    assert [c.dtype for c in cases] == ["fp32"]  # its default without --dtype


def test_cli_states_or_refuses_what_a_suite_cannot_run():
    """A suite named in --suite that runs none of the --dtype asked is refused before anything runs; one that also
    runs another dtype (word2vec trains fp32 tables) says so."""
    from benchmarks.__main__ import dtype_plan
    from benchmarks.harness import Case

    def case(label, dtype):
        return Case("s", label, lambda c, r: [], dtype=dtype)

    plans = {"negative_sampling": [case("word2vec head500", "fp32"), case("sgns d100 bf16 B=8", "bf16")],
             "odd": [case("only fp32", "fp32")]}
    notes: list[str] = []
    assert dtype_plan(plans, ["bf16"], ("odd",), notes.append) == (
        "--suite odd --dtype bf16: the odd suite runs fp32 only")
    assert dtype_plan(plans, ["bf16"], (), notes.append) is None  # through --suite all: stated, not refused
    assert "  dtypes per suite: negative_sampling fp32,bf16; odd fp32" in notes
    assert "  [negative_sampling] --dtype bf16: word2vec runs in fp32 (no other dtype)" in notes
    assert "  [odd] --dtype bf16: only runs in fp32 (no other dtype)" in notes


def test_cli_error_is_one_line_from_the_shell(tmp_path):
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root)}
    p = subprocess.run([sys.executable, "-m", "benchmarks", "--dtype", "fp64", "--out", str(tmp_path / "o")],
                       cwd=root, env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr == "python -m benchmarks: error: argument --dtype: 'fp64' not one of fp16, bf16, fp32\n"


@pytest.mark.parametrize("content,message", [
    (None, "{csv}: no such file"),
    ("", "{csv}: empty file (no header row)"),
    (",".join(COLUMNS) + "\n", "{csv}: no rows below the header"),
    ("kernel,p50\nk,1.0\n", "{csv}: missing column(s) suite, provider, mode, dtype, x_name, x_value, metric, unit, "
                             "p20, p80, config (is it a results.csv?)"),
    ("{header}\n{good}\n{bad_p50}\n", "{csv}, line 3: p50 is not a number: 'fast'"),
    ("{header}\n{bad_x}\n", "{csv}, line 2: x_value is not a number: 'N=8'"),
    ("{header}\n{good},extra\n", "{csv}, line 2: the row's field count differs from the header's (18)"),
    ("{header}\nattention,k,p\n", "{csv}, line 2: the row's field count differs from the header's (18)"),
])  # fmt: skip
@pytest.mark.parametrize("command", ["summary", "plot"])
def test_summary_and_plot_reject_bad_csv(command, content, message, tmp_path, capsys):
    """A missing or malformed CSV: one line on stderr, exit status 2, and no summary.md or plots."""
    import importlib

    main = importlib.import_module(f"benchmarks.{command}").main
    path = tmp_path / "results.csv"
    row = dict(suite="attention", kernel="k", provider="embedattn", mode="fwd", dtype="fp32", shape="", x_name="N",
               x_value="8", metric="tflops", unit="TFLOP/s", p50="1", p20="0.5", p80="2", config="")  # fmt: skip

    def line(**kw):
        return ",".join(str({**row, **kw}.get(c, "")) for c in COLUMNS)

    if content is not None:
        path.write_text(content.format(header=",".join(COLUMNS), good=line(), bad_p50=line(p50="fast"),
                                       bad_x=line(x_value="N=8")))  # fmt: skip
    code, err = _cli(main, [str(path)], capsys)
    assert code == 2
    assert err == f"python -m benchmarks.{command}: error: {message.format(csv=path)}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == (["results.csv"] if content is not None else [])


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
    assert main(["--tiny", "--device", DEVICE, "--out", str(out2), "--max-seconds", "1e-9", "--no-plots",
                 "--suite", "attention"]) == 0  # fmt: skip
    env2 = json.loads((out2 / "env.json").read_text())
    if env2["suites_run"]:
        assert env2["skipped_for_budget"] and all(r["suite"] == "device"
                                                  for r in harness.read_csv(str(out2 / "results.csv")))


def test_plot_bars_for_providers_without_a_fixed_color(tmp_path):
    """One-point kernels (word2vec) draw bars; provider variants such as "embedattn-cpu" have no fixed color
    and must take one from the cycle instead of failing the whole plot step."""
    pytest.importorskip("matplotlib")
    from benchmarks.harness import COLUMNS
    from benchmarks.plot import plot_csv

    path = tmp_path / "results.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, COLUMNS)
        w.writeheader()
        for prov, v in (("embedattn", 3.0), ("embedattn-cpu", 2.0), ("gensim", 1.0)):
            w.writerow({c: "" for c in COLUMNS} | dict(
                suite="negative_sampling", kernel="word2vec", provider=prov, mode="train", dtype="fp32",
                shape="head500", x_name="epochs", x_value=1, metric="words_per_s", unit="words/s", p50=v, p20=v,
                p80=v, config="", device="cpu", torch="x", triton="x", timestamp="t"))
    assert plot_csv(str(path)) and any((tmp_path / "plots").iterdir())
