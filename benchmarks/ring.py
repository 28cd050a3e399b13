"""Ring attention on CPU processes over gloo: time per ring step, and how much of the transfer is hidden.

    python -m benchmarks.ring --world-size 2 --n 1024

Every point runs ``embedattn.distributed``'s forward ring three ways on every rank of ``world_size``
spawned processes: ``step`` (transfers overlapped with the attention, as ``ring_attention`` runs),
``compute`` (the same attention calls, no transfers) and ``comm`` (the transfers, no attention).
``hidden = (compute + comm - step) / comm``, clipped to [0, 1], is the share of the communication time
the overlap hides (1: fully hidden, 0: serialized). Times are per ring step (a forward over W steps
divided by W), the slowest rank's, median over ``reps``. ``ring_attention`` adds one small metadata
all-gather per call on top (the cross-rank input check), left out here. Forward only.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .harness import DTYPES, Case, Context, Recorder

MODES = ("step", "compute", "comm")


def _time(fn, reps: int, warmup: int) -> float:
    """Median over ``reps`` of the slowest rank's wall time of ``fn()``, in ms."""
    times = []
    for i in range(warmup + reps):
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        t = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        if i >= warmup:
            times.append(t.item() * 1e3)
    return statistics.median(times)


def _worker(rank: int, world: int, init_file: str, out_file: str, points: list[dict], reps: int, warmup: int) -> None:
    from embedattn import distributed as D

    torch.set_num_threads(1)  # one core per rank: compute and the gloo transfers then compete as on a node
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        rows = []
        ring = D._ring(None)
        for p in points:
            g = torch.Generator().manual_seed(rank)
            dtype, n_local = DTYPES[p["dtype"]], p["n"] // world
            q = torch.randn(p["batch"], p["heads"], n_local, p["head_dim"], generator=g).to(dtype)
            k, v = (torch.randn(p["batch"], p["kv_heads"], n_local, p["head_dim"], generator=g).to(dtype)
                    for _ in range(2))
            plans = D._plans(ring, n_local, p["load_balance"], p["causal"], None, False)
            kw = dict(scale=None, softcap=0.0, backend=p["backend"])
            ms = {}
            for mode in MODES:
                flags = dict(communicate=mode != "compute", compute=mode != "comm")
                fn = functools.partial(D._ring_forward, q, k, v, None, ring, plans, kw, **flags)
                ms[mode] = _time(fn, reps, warmup)
            ms = {m: t / world for m, t in ms.items()}  # per ring step
            overlap = ms["compute"] + ms["comm"] - ms["step"]
            hidden = min(max(overlap / ms["comm"], 0.0), 1.0) if world > 1 and ms["comm"] > 0 else float("nan")
            kv_mib = 2 * k.numel() * k.element_size() / 2**20
            rows.append(dict(p, world_size=world, n_local=n_local, step_ms=ms["step"], compute_ms=ms["compute"],
                             comm_ms=ms["comm"], hidden=hidden, kv_mib=kv_mib))
        if rank == 0:
            with open(out_file, "w") as f:
                json.dump(rows, f)
    finally:
        dist.barrier()
        dist.destroy_process_group()


def run_ring(world_size: int = 2, n: int = 1024, *, batch: int = 1, heads: int = 4, kv_heads: int | None = None,
             head_dim: int = 64, causal=(False, True), load_balance=(False, True), dtype: str = "fp32",
             backend: str = "reference", reps: int = 3, warmup: int = 1, timeout_s: float = 300.0,
             log=print) -> list[dict]:
    """Run the ring on ``world_size`` CPU processes (gloo) for every (causal, load_balance) pair and return
    one dict per point: the shape, ``step_ms``, ``compute_ms``, ``comm_ms`` (per ring step), ``hidden``
    (share of comm time hidden by the overlap) and ``kv_mib`` (one K/V message). ``n`` is the whole
    sequence; it must split into ``2 * world_size`` chunks when a point uses ``load_balance``."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    causal = (causal,) if isinstance(causal, bool) else tuple(causal)
    load_balance = (load_balance,) if isinstance(load_balance, bool) else tuple(load_balance)
    if n % (2 * world_size if any(load_balance) else world_size):
        raise ValueError(f"n = {n} does not split into equal shards over {world_size} ranks (2 chunks each with "
                         "load_balance)")
    points = [dict(n=n, batch=batch, heads=heads, kv_heads=kv_heads or heads, head_dim=head_dim, dtype=dtype,
                   backend=backend, causal=c, load_balance=lb) for c in causal for lb in load_balance]
    with tempfile.TemporaryDirectory() as tmp:
        out_file = os.path.join(tmp, "rows.json")
        ctx = mp.start_processes(_worker, args=(world_size, os.path.join(tmp, "init"), out_file, points, reps, warmup),
                                 nprocs=world_size, join=False, start_method="spawn")
        deadline = time.monotonic() + timeout_s
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    p.kill()
                raise TimeoutError(f"ring benchmark on {world_size} processes ran past {timeout_s} s")
        with open(out_file) as f:
            rows = json.load(f)
    if log is not None:
        log(format_table(rows))
    return rows


# --------------------------------------------------------------------------------------------------
# the `--suite ring` entry of `python -m benchmarks`
# --------------------------------------------------------------------------------------------------
def available(ctx: Context) -> str | None:
    if not dist.is_available():
        return "torch.distributed is not available in this torch build"
    if ctx.profile == "tiny":
        return "the tests' seconds-long sweep leaves the ring out (starting a process group costs seconds)"
    return None


def _rows_of(rec: Recorder, r: dict) -> list[dict]:
    shape = (f"B{r['batch']} H{r['heads']}x{r['kv_heads']} N{r['n']} D{r['head_dim']} W{r['world_size']}"
             f"{' causal' if r['causal'] else ''}{' zigzag' if r['load_balance'] else ''}")
    base = dict(suite="ring", kernel=f"ring_w{r['world_size']}{'_causal' if r['causal'] else ''}"
                f"{'_zigzag' if r['load_balance'] else ''}", provider="embedattn", dtype=r["dtype"], shape=shape,
                x_name="seq_len", x_value=r["n"], config=f"gloo,{r['backend']}")
    out = [rec.row(**base, mode=m, metric="ms", unit="ms", p50=r[f"{m}_ms"], p20=r[f"{m}_ms"], p80=r[f"{m}_ms"])
           for m in MODES]
    out.append(rec.row(**base, mode="step", metric="hidden", unit="fraction", p50=r["hidden"], p20=r["hidden"],
                       p80=r["hidden"]))
    return out


def _ring_points(world_size: int, n: int, dtype: str, ctx: Context, rec: Recorder):
    # one spawn of the process group for every (causal, zigzag) point: starting processes costs seconds
    rows = run_ring(world_size, n, causal=(False, True), load_balance=(False, True), dtype=dtype,
                    reps=2 if ctx.profile != "full" else 5, log=None)
    return [row for r in rows for row in _rows_of(rec, r)]


def _block_point(n: int, world_size: int, dtype: str, ctx: Context, rec: Recorder):
    """One GPU: the attention on one ring block (N/W queries against N/W keys, with the LSE), what each ring
    step computes, timed with the harness."""
    import embedattn

    from .harness import time_fn

    m = n // world_size
    q, k, v = (torch.randn(1, 16, m, 128, device=ctx.device, dtype=DTYPES[dtype]) for _ in range(3))
    t = time_fn(ctx, lambda: embedattn.attention(q, k, v, return_lse=True, causal_offset=m))
    base = dict(suite="ring", kernel=f"ring_block_w{world_size}", provider="embedattn", dtype=dtype,
                shape=f"B1 H16 N{n}/W{world_size} D128", x_name="seq_len", x_value=n, config="one block")
    return [rec.row(**base, mode="block", metric="ms", unit="ms", p50=t.p50, p20=t.p20, p80=t.p80)]


def plan(ctx: Context) -> list[Case]:
    """CPU: the ring on gloo processes (2 ranks; 4 in a full run), fp32 unless ``--dtype`` says otherwise. One
    GPU: the per-block compute at the ring's block sizes, bf16 unless ``--dtype`` says otherwise (the multi-GPU
    NCCL ring is run with ``torchrun``, see the README)."""
    if ctx.device.type == "cuda":
        return [Case("ring", f"block N{n} W{w} {dt}", functools.partial(_block_point, n, w, dt), dtype=dt)
                for dt in ctx.pick_dtypes(["bf16"]) for n in (16384, 65536) for w in (2, 4, 8)]
    sizes = [(2, 256)] if ctx.profile == "quick" else [(2, 1024), (4, 1024)]
    return [Case("ring", f"W{w} N{n} {dt}", functools.partial(_ring_points, w, n, dt), dtype=dt)
            for dt in ctx.pick_dtypes(["fp32"]) for w, n in sizes]


def format_table(rows: list[dict]) -> str:
    lines = [f"{'W':>2} {'N':>6} {'causal':>6} {'zigzag':>6} {'step ms':>9} {'compute ms':>10} {'comm ms':>8} "
             f"{'hidden':>7}"]
    for r in rows:
        lines.append(f"{r['world_size']:>2} {r['n']:>6} {str(r['causal']):>6} {str(r['load_balance']):>6} "
                     f"{r['step_ms']:>9.2f} {r['compute_ms']:>10.2f} {r['comm_ms']:>8.2f} {r['hidden']:>7.0%}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.ring", description=__doc__.splitlines()[0])
    ap.add_argument("--world-size", type=int, default=2)
    ap.add_argument("--n", type=int, default=1024, help="whole sequence length")
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=None)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args(argv)
    run_ring(args.world_size, args.n, heads=args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim,
             dtype=args.dtype, reps=args.reps)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
