"""Ring attention (embedattn.distributed) on CPU processes over gloo: forward, gradients and bad input.

One spawn of four processes runs every case on the subgroups of 1, 2, 3 and 4 ranks; rank 0 of each
gathers the outputs and gradients of the whole sequence, which the tests compare with single-process
``embedattn.attention`` under FlashAttention's rule (float64 reference, plain PyTorch as yardstick).
"""

from __future__ import annotations

import datetime
import os
import tempfile
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import HAS_TRITON, INTERPRET, assert_fa_close

import embedattn
from embedattn import distributed, reference

WORLD_SIZES = [1, 2, 3, 4]
JOIN_TIMEOUT_S = 150

# tiny shapes: N_local = 6 tokens per rank (3 per zigzag chunk), head dim 8
BASE = dict(B=1, Hq=2, Hkv=2, n=6, D=8, Dv=8, causal=False, lb=False, window=None, softcap=0.0, alibi=None, lse=True,
            sinks=False, dtype=torch.float32, backend="reference")
CASES = {
    "plain": {},
    "causal": dict(causal=True),
    "causal_lb": dict(causal=True, lb=True),
    "gqa_lb": dict(Hq=4, Hkv=2, lb=True),
    "mqa_causal_lb": dict(Hq=4, Hkv=1, causal=True, lb=True),
    "window_causal": dict(B=2, causal=True, window=(4, 0)),
    "window_lb": dict(window=(3, 2), lb=True),
    "alibi_softcap_window_causal_lb": dict(causal=True, lb=True, alibi=(2,), softcap=3.0, window=(7, -1)),
    "alibi_batch_heads": dict(B=2, alibi=(2, 2)),
    "out_only_causal_lb": dict(causal=True, lb=True, lse=False),
    "fp16_causal_lb": dict(causal=True, lb=True, dtype=torch.float16),
    # issue 23: learned sinks (once per row, in the merge) and a value head dim of its own (MLA)
    "sinks_causal_lb": dict(causal=True, lb=True, sinks=True),
    "mla_sinks_gqa_window": dict(Hq=4, Hkv=2, Dv=12, window=(5, 1), sinks=True, B=2),
    "mla_out_only_causal": dict(Dv=4, causal=True, lse=False, sinks=True),
}
TRITON_CASES = {"triton_gqa_causal_lb": dict(Hq=4, Hkv=2, causal=True, lb=True, backend="triton"),
                "triton_mla_sinks_causal": dict(Hq=4, Hkv=2, Dv=12, causal=True, sinks=True, backend="triton")}
TRITON_WORLD = 2  # the interpreter is slow: one world size; the processes are CPU ones, so interpreter only
RUN_TRITON = HAS_TRITON and INTERPRET
ERROR_CASES = ["uneven_shards", "odd_lb", "device", "bad_arg_one_rank", "unshard_shapes", "shard_indivisible",
               "attention_type_one_rank", "head_dim_one_rank", "dtype_one_rank", "scale_differs", "softcap_differs",
               "alibi_differs", "window_differs", "bad_timeout_one_rank", "sinks_differs", "value_head_dim_one_rank"]
# (exception type on every rank, words its message must hold) for each error case
ERROR_WANT = dict(
    uneven_shards=("ValueError", ["N_local", "(1, 2, 4, 8) on rank", "(1, 2, 6, 8) on rank"]),
    odd_lb=("ValueError", ["even"]),
    device=("ValueError", ["meta"]),
    bad_arg_one_rank=("TypeError", ["causal", "rank 0 got bad input"]),
    unshard_shapes=("ValueError", ["x.shape", "(1, 2, 4, 8) on rank 0"]),
    shard_indivisible=("ValueError", ["equal chunks"]),
    attention_type_one_rank=("AttentionTypeError", ["scale", "rank 0 got bad input"]),
    head_dim_one_rank=("AttentionInputError", ["head dim of q (8) and k (4) differ"]),
    dtype_one_rank=("ValueError", ["dtype", "torch.float64 on rank", "torch.float32 on rank"]),
    scale_differs=("ValueError", ["scale", "0.5 on rank", "0.25 on rank"]),
    softcap_differs=("ValueError", ["softcap", "3.0 on rank", "0.0 on rank"]),
    alibi_differs=("ValueError", ["alibi_slopes", "0.5", "0.25"]),
    window_differs=("ValueError", ["window"]),
    bad_timeout_one_rank=("ValueError", ["timeout"]),
    sinks_differs=("ValueError", ["sinks", "0.5", "0.25"]),
    value_head_dim_one_rank=("ValueError", ["v shape", "(1, 2, 6, 4) on rank", "(1, 2, 6, 8) on rank"]),
)
SKIP_TIMEOUT_S = 3.0
SKIP_WORLD = 3


def _case(name: str) -> dict:
    return {**BASE, **CASES.get(name, TRITON_CASES.get(name, {}))}


def _inputs(name: str, world: int) -> dict:
    """The whole-sequence tensors of a case (the same in every process): q, k, v, dO, dLSE, slopes."""
    c = _case(name)
    g = torch.Generator().manual_seed(sorted(CASES | TRITON_CASES).index(name))
    n = world * c["n"]
    mk = lambda *s: torch.randn(*s, generator=g)
    t = dict(q=mk(c["B"], c["Hq"], n, c["D"]), k=mk(c["B"], c["Hkv"], n, c["D"]), v=mk(c["B"], c["Hkv"], n, c["Dv"]),
             do=mk(c["B"], c["Hq"], n, c["Dv"]), dl=mk(c["B"], c["Hq"], n))
    t = {key: x.to(c["dtype"]) if key in ("q", "k", "v") else x for key, x in t.items()}
    t["alibi"] = None if c["alibi"] is None else torch.rand(*c["alibi"], generator=g)
    t["sinks"] = mk(c["Hq"]) if c["sinks"] else None
    return t


def _kwargs(c: dict, alibi, sinks=None) -> dict:
    return dict(causal=c["causal"], window=c["window"], softcap=c["softcap"], alibi_slopes=alibi, sinks=sinks)


def _loss(out, lse, do, dl):
    loss = (out.float() * do).sum()
    if lse is not None:
        loss = loss + (torch.where(torch.isfinite(lse), lse, 0.0) * dl).sum()
    return loss


# --------------------------------------------------------------------------------------------------
# the worker: every case on every rank, whole-sequence results gathered to rank 0
# --------------------------------------------------------------------------------------------------
def _ring_case(name: str, world: int, group) -> dict:
    c = _case(name)
    t = _inputs(name, world)
    sh = lambda x: distributed.shard(x, group=group, load_balance=c["lb"])
    q, k, v = (sh(t[key]).clone().requires_grad_() for key in "qkv")
    sinks = None if t["sinks"] is None else t["sinks"].clone().requires_grad_()
    res = distributed.ring_attention(q, k, v, group=group, load_balance=c["lb"], return_lse=c["lse"],
                                     backend=c["backend"], **_kwargs(c, t["alibi"], sinks))
    out, lse = res if c["lse"] else (res, None)
    _loss(out, lse, sh(t["do"]), sh(t["dl"])).backward()
    whole = lambda x: distributed.unshard(x, group=group, load_balance=c["lb"])
    got = dict(out=whole(out), dq=whole(q.grad), dk=whole(k.grad), dv=whole(v.grad))
    if lse is not None:
        got["lse"] = whole(lse)
    if sinks is not None:  # each rank's gradient covers its own rows: the whole sequence's is their sum
        dist.all_reduce(sinks.grad, group=group)
        got["dsinks"] = sinks.grad
    return got


def _error_case(name: str, rank: int, world: int, group):
    """Run a bad call; return (exception type, message) on this rank, or None if nothing was raised."""
    q = torch.randn(1, 2, 6, 8)
    ring = lambda x, **kw: distributed.ring_attention(x, x, x, group=group, **kw)
    try:
        if name == "uneven_shards":
            ring(q[:, :, : 4 if rank == world - 1 else 6])
        elif name == "odd_lb":
            ring(q[:, :, :5], causal=True, load_balance=True)
        elif name == "device":
            ring(q.to("meta") if rank == world - 1 else q)
        elif name == "bad_arg_one_rank":
            ring(q, causal="yes" if rank == 0 else True)
        elif name == "unshard_shapes":
            distributed.unshard(q[:, :, : 4 if rank == 0 else 6], group=group)
        elif name == "shard_indivisible":
            distributed.shard(torch.zeros(1, 1, 7, 1), group=group, load_balance=True)
        elif name == "attention_type_one_rank":
            ring(q, scale="big" if rank == 0 else None)
        elif name == "head_dim_one_rank":
            kv = q[..., :4] if rank == world - 1 else q
            distributed.ring_attention(q, kv, kv, group=group)
        elif name == "dtype_one_rank":
            ring(q.double() if rank == world - 1 else q)
        elif name == "scale_differs":
            ring(q, scale=0.25 if rank == world - 1 else 0.5)
        elif name == "softcap_differs":
            ring(q, softcap=0.0 if rank == world - 1 else 3.0)
        elif name == "alibi_differs":
            ring(q, alibi_slopes=torch.tensor([0.5, 0.25 if rank == world - 1 else 0.5]))
        elif name == "window_differs":
            ring(q, window=(2, 0) if rank == world - 1 else (3, 0))
        elif name == "bad_timeout_one_rank":
            ring(q, timeout=-1.0 if rank == world - 1 else 30.0)
        elif name == "sinks_differs":
            ring(q, sinks=torch.tensor([0.5, 0.25 if rank == world - 1 else 0.5]))
        elif name == "value_head_dim_one_rank":
            distributed.ring_attention(q, q, q[..., :4] if rank == world - 1 else q, group=group)
    except Exception as e:
        return type(e).__name__, str(e)
    return None


def _skip_backward(rank: int, group) -> tuple[str, str, float] | None:
    """Rank 1 runs the forward and skips the backward; every other rank runs its backward with a short timeout.
    Returns (exception type, message, seconds the backward took) on those ranks, None on rank 1."""
    q = torch.randn(1, 2, 6, 8, generator=torch.Generator().manual_seed(rank)).requires_grad_()
    out = distributed.ring_attention(q, q, q, group=group, causal=True, timeout=SKIP_TIMEOUT_S)
    if rank == 1:
        return None
    start = time.monotonic()
    try:
        out.sum().backward()
    except Exception as e:
        return type(e).__name__, str(e), time.monotonic() - start
    return "nothing raised", "", time.monotonic() - start


def _layout(world: int, group) -> dict:
    """Which tokens of arange(4W) this rank holds in each layout, and whether unshard inverts shard."""
    x = torch.arange(4 * world).view(1, 1, -1, 1)
    got = {}
    for lb in (False, True):
        part = distributed.shard(x, group=group, load_balance=lb)
        got[lb] = part.flatten().tolist()
        got[lb, "roundtrip"] = torch.equal(distributed.unshard(part, group=group, load_balance=lb), x)
    return got


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """Rank ``rank`` of ``world`` processes; each world size W runs on the subgroup of ranks 0..W-1."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        saved = {}
        for w in WORLD_SIZES:
            group = dist.new_group(list(range(w)))  # every process takes part in creating it
            if rank < w:
                names = list(CASES) + (list(TRITON_CASES) if RUN_TRITON and w == TRITON_WORLD else [])
                results = {name: _ring_case(name, w, group) for name in names}
                errors = {name: _error_case(name, rank, w, group) for name in ERROR_CASES} if w > 1 else {}
                saved[w] = dict(results=results if rank == 0 else {}, errors=errors, layout=_layout(w, group))
            dist.barrier()  # the group still works after every error
        # last, on a group of its own (a timed-out transfer may leave it unusable): a skipped backward
        group = dist.new_group(list(range(SKIP_WORLD)))
        if rank < SKIP_WORLD:
            saved["skip_backward"] = _skip_backward(rank, group)
        dist.barrier()
        torch.save(saved, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


_RUNS: list[dict] = []


def _run(world: int) -> list[dict]:
    """Every case on ``world`` ranks: a list with each rank's saved dict. One spawn of max(WORLD_SIZES)
    processes serves every world size (processes start slowly on two cores)."""
    if not _RUNS:
        n = max(WORLD_SIZES)
        with tempfile.TemporaryDirectory() as tmp:
            # spawned children inherit the environment (TRITON_INTERPRET=1 from conftest)
            ctx = mp.start_processes(_worker, args=(n, os.path.join(tmp, "init"), tmp), nprocs=n, join=False,
                                     start_method="spawn")
            deadline = time.monotonic() + JOIN_TIMEOUT_S
            while not ctx.join(timeout=1):
                if time.monotonic() > deadline:
                    for p in ctx.processes:
                        p.kill()
                    pytest.fail(f"ring attention on {n} processes did not finish in {JOIN_TIMEOUT_S} s (a hang?)")
            _RUNS.extend(torch.load(os.path.join(tmp, f"{r}.pt")) for r in range(n))
    return [r[world] for r in _RUNS[:world]]


# --------------------------------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------------------------------
def _expected(name: str, world: int, dtype: torch.dtype, plain: bool) -> dict:
    """Single-process attention on the whole sequence: float64 reference, or plain PyTorch in ``dtype``."""
    c, t = _case(name), _inputs(name, world)
    q, k, v = (t[key].to(dtype).requires_grad_() for key in "qkv")
    alibi = None if t["alibi"] is None else t["alibi"].to(dtype)
    sinks = None if t["sinks"] is None else t["sinks"].to(dtype).requires_grad_()
    kw = _kwargs(c, alibi, sinks)
    if plain:
        out, lse = reference.attention(q, k, v, return_lse=True, upcast=False, **kw)
    else:
        out, lse = embedattn.attention(q, k, v, return_lse=True, backend="reference", **kw)
    _loss(out, lse if c["lse"] else None, t["do"].to(dtype), t["dl"].to(dtype)).backward()
    got = dict(out=out.detach(), lse=lse.detach(), dq=q.grad, dk=k.grad, dv=v.grad)
    if sinks is not None:
        got["dsinks"] = sinks.grad
    return got


@pytest.mark.parametrize("world, name", [(w, name) for w in WORLD_SIZES for name in CASES]
                         + [(TRITON_WORLD, name) for name in TRITON_CASES if RUN_TRITON])
def test_ring_matches_single_process(world, name):
    got = _run(world)[0]["results"][name]
    c = _case(name)
    ref = _expected(name, world, torch.float64, plain=False)
    plain = _expected(name, world, c["dtype"], plain=True)
    assert ("dsinks" in got) == c["sinks"]
    for key, val in got.items():
        assert val.dtype == (torch.float32 if key in ("lse", "dsinks") else c["dtype"]), key
        eps = 1e-3 if key == "lse" and c["dtype"] == torch.float16 else None
        assert_fa_close(val, ref[key], plain[key].to(val.dtype), f"{name} W={world} {key}", eps=eps)


@pytest.mark.parametrize("world", [w for w in WORLD_SIZES if w > 1])
def test_bad_input_raises_on_every_rank(world):
    """The same bad input raises the same exception type, with the same message, on every rank; messages
    name the shapes, dtypes and values each rank passed (never a CRC code or an empty slice's shape);
    scale, softcap, window and ALiBi slopes are compared across ranks like the shapes."""
    errors = [r["errors"] for r in _run(world)]
    for name, (kind, words) in ERROR_WANT.items():
        got = [per_rank[name] for per_rank in errors]
        for rank, g in enumerate(got):
            assert g is not None, f"{name}: rank {rank} raised nothing"
            assert g[0] == kind and all(w in g[1] for w in words), f"{name}: rank {rank} raised {g}"
            assert ", 0, " not in g[1], f"{name}: a zero-length shape in {g[1]!r}"
        if name not in ("odd_lb", "shard_indivisible"):  # raised by each rank on its own (the same input)
            assert len({g for g in got}) == 1, f"{name}: the ranks raised different errors {got}"


def test_skipped_backward_fails_its_peers_within_the_timeout():
    """Rank 1 skips the backward of a ring_attention call: each peer fails within the timeout (not a hang until
    the group's timeout, not a bare 'Connection closed by peer'), with a RuntimeError that says what happened."""
    _run(SKIP_WORLD)  # the one spawn
    for rank in range(SKIP_WORLD):
        got = _RUNS[rank]["skip_backward"]
        if rank == 1:
            assert got is None
            continue
        kind, msg, seconds = got
        assert kind == "RuntimeError", got
        assert "ring_attention backward" in msg and "did not complete within 3 s" in msg and "skipped" in msg, msg
        assert seconds < 5 * SKIP_TIMEOUT_S, f"rank {rank} failed after {seconds:.1f} s"


@pytest.mark.parametrize("world", WORLD_SIZES)
def test_shard_layouts(world):
    """Contiguous: rank r holds tokens [4r, 4r+4) of 4W; zigzag: chunks r and 2W-1-r of 2W (2 tokens each)."""
    for rank, saved in enumerate(_run(world)):
        got = saved["layout"]
        assert got[False] == list(range(4 * rank, 4 * rank + 4))
        assert got[True] == [2 * rank, 2 * rank + 1, 2 * (2 * world - 1 - rank), 2 * (2 * world - 1 - rank) + 1]
        assert got[False, "roundtrip"] and got[True, "roundtrip"]


def test_needs_an_initialized_process_group():
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(RuntimeError, match="init_process_group"):
        distributed.ring_attention(q, q, q)
    with pytest.raises(RuntimeError, match="init_process_group"):
        distributed.shard(q)


def test_zigzag_balances_causal_work_and_skips_blocks_above_the_diagonal():
    """The plans alone (no processes): visible (query, key) pairs per rank under causal masking."""
    world, n = 4, 8

    def work(rank, lb):
        mine = distributed._segments(rank, world, n, lb)
        calls = [c for s in range(world) for c in distributed._plan(mine, distributed._segments(s, world, n, lb),
                                                                        True, None, False)]
        return sum((c.q1 - c.q0) * (c.k1 - c.k0) for c in calls), len(calls)

    contiguous = [work(r, False) for r in range(world)]
    zigzag = [work(r, True) for r in range(world)]
    assert [calls for _, calls in contiguous] == [1, 2, 3, 4]  # blocks above the diagonal are skipped
    assert len({pairs for pairs, _ in zigzag}) == 1  # every rank computes the same number of scores
    assert all(calls == world for _, calls in zigzag)  # one call per step: the off-diagonal blocks merge


def test_merge_keeps_empty_rows_finite():
    out = torch.zeros(1, 1, 3, 2)
    lse = torch.full((1, 1, 3), float("-inf"))
    o_b = torch.tensor([[[[1.0, 2.0], [0.0, 0.0], [3.0, 4.0]]]])
    l_b = torch.tensor([[[0.5, float("-inf"), 0.0]]])
    distributed._merge(out, lse, o_b, l_b)
    assert torch.equal(out, o_b) and torch.equal(lse, l_b)
    distributed._merge(out, lse, torch.zeros_like(o_b), torch.full_like(l_b, float("-inf")))
    assert torch.equal(out, o_b) and torch.equal(lse, l_b)
    distributed._merge(out, lse, torch.ones_like(o_b), torch.zeros_like(l_b))  # equal weights on row 2
    assert torch.allclose(out[0, 0, 2], torch.tensor([2.0, 2.5])) and not torch.isnan(out).any()
