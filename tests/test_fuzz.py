"""Standing fuzz test: random shapes and features of every op's Triton road against the float64 reference.

Attention: odd sizes, Nq != Nk, Nq = 1, GQA ratios, causal, windows, softcap, ALiBi (H,) and (B, H),
bool/float masks with broadcast dims and fully masked rows (a float mask also in another dtype than q),
non-contiguous and expanded (stride-0) inputs, the returned lse in the loss, fp32/fp16 (bf16 on CUDA);
forward and gradients under FlashAttention's rule (``helpers.assert_fa_close``). Embedding: learned,
sinusoidal or no positions, default/offset/explicit positions, padding_idx, repeated ids, scale, id
dtypes. Negative sampling: every reduction, repeated ids, large logits, sparse gradients. Rotary, varlen:
empty sequences, int or per-sequence offsets, in place or not, both layouts, and unchecked calls with a
short ``max_seqlen`` or a bad ``cu_seqlens`` (past x, negative, decreasing: nothing may be written outside x
or left unwritten). Paged KV appends with one bad batch (a used table entry negative or past the pool, or a
length past the table's capacity) under every ``check_bounds`` mode: the raising modes leave the pools
untouched; unchecked, the bad batch writes nothing while the other batches' appends and outputs are exact. KV-cache
cases draw left-padded caches (``cache_leftpad``: 0, the whole cache, or between) in both of those tests. Paged keys
for packed queries (``attention_varlen(block_table=...)``: random page order, spare pages, -1 padding).
Compiled calls (``torch.compile(fullgraph=True)``; Inductor on CUDA, aot_eager on the CPU) of
``attention_varlen`` (with gradients) and ``attention_with_kvcache`` (contiguous and paged caches, appends
through the graph), on the Triton and the default backend. Only the public APIs (``embedattn.attention``,
``embedattn.attention_varlen``, ``embedattn.attention_with_kvcache``, ``embedattn.embedding``,
``embedattn.negative_sampling_loss``, ``embedattn.rotary``) against ``embedattn.reference``.

Budget: cases come from one seed (``EMBEDATTN_FUZZ_SEED``, default 0) with a small count in CI (this file
runs in well under a minute on 2 CPU cores under the interpreter), a larger one with ``EMBEDATTN_SLOW=1``,
and larger shapes and counts on CUDA (head dims up to 256, bf16). A failing case's message starts with a
one-line reproduction: the environment and pytest node that rerun it, and the case's parameters.
"""

from __future__ import annotations

import os
import random
from contextlib import contextmanager

import pytest
import torch
from helpers import DEVICE, HAS_TRITON, ON_CUDA, assert_fa_close, on_road

import embedattn
from embedattn import reference
from embedattn._backend import env_flag

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="the fuzz test runs the Triton kernels")

SLOW = env_flag("EMBEDATTN_SLOW", False)
SEED = int(os.environ.get("EMBEDATTN_FUZZ_SEED", "0"))
N_CASES = {  # (interpreter: CI, EMBEDATTN_SLOW=1; CUDA: CI, EMBEDATTN_SLOW=1)
    "attention": (14, 120, 100, 500),
    "embedding": (10, 80, 100, 400),
    "negative_sampling": (10, 80, 100, 400),
    "rotary_varlen": (8, 60, 100, 400),
    "paged_append": (6, 48, 60, 300),
    "compiled": (3, 24, 30, 120),
    "varlen_paged": (3, 24, 30, 120),
}


def _count(op: str) -> int:
    cpu, cpu_slow, cuda, cuda_slow = N_CASES[op]
    return (cuda_slow if SLOW else cuda) if ON_CUDA else (cpu_slow if SLOW else cpu)


@contextmanager
def _repro(op: str, i: int, case: dict):
    """Re-raise any failure with a one-line reproduction first."""
    try:
        yield
    except Exception as e:
        slow = " EMBEDATTN_SLOW=1" if SLOW else ""
        line = (f"repro: EMBEDATTN_FUZZ_SEED={SEED}{slow} pytest 'tests/test_fuzz.py::test_fuzz_{op}[{i}]' "
                f"| {op} case {case}")
        raise AssertionError(f"{line}\n{type(e).__name__}: {e}") from e


def _table_dtypes_and_seed(r: random.Random) -> dict:
    """The last fields of an embedding or negative-sampling case: table dtype (bf16 on CUDA only), id dtype, seed."""
    return dict(dtype=r.choice(["float32", "float16"] + (["bfloat16"] if ON_CUDA else [])),
                id_dtype=r.choice(["int32", "int64"]), seed=r.randint(0, 2**31 - 1))


@contextmanager
def _table_case(op: str, i: int, make):
    """Case i of op (from make), under _repro: yields the case, its generator, table dtype and id dtype."""
    c = make(i)
    with _repro(op, i, c):
        yield c, torch.Generator().manual_seed(c["seed"]), getattr(torch, c["dtype"]), getattr(torch, c["id_dtype"])


def _randn(shape, g, dtype, scale=1.0):
    return (torch.randn(shape, generator=g) * scale).to(DEVICE, dtype)


def _grads_close(got, want, base, names, eps=None):
    for name, a, b, c in zip(names, got, want, base):
        if a is None and b is None:
            continue
        a, b, c = (t.to_dense() if t is not None and t.is_sparse else t for t in (a, b, c))
        assert_fa_close(a, b, c, name, eps=eps)


# ------------------------------------------------------------------------------------------- attention
def _attention_case(i: int) -> dict:
    r = random.Random(f"attention/{SEED}/{i}")
    if ON_CUDA:
        nq, nk = r.choice([1, r.randint(1, 700)]), r.choice([1, r.randint(1, 900)])
        d = r.choice([r.randint(1, 256), 8, 40, 64, 96, 128, 256])  # mostly common dims: each new one compiles
        dtypes = ["float32", "float16", "bfloat16"]
    else:
        nq, nk = r.choice([1, r.randint(1, 40)]), r.choice([1, r.randint(1, 56)])
        d = r.choice([1, 2, 3, 5, 8, 13, 16, 24, 40])
        dtypes = ["float32", "float16"]
    while True:  # on the interpreter at most 8 (batch, head) programs, which bounds its time
        b, hkv, group = r.choice([1, 1, 2, 3]), r.choice([1, 1, 2, 3]), r.choice([1, 1, 2, 3, 4])
        if ON_CUDA or b * hkv * group <= 8:
            break
    side = lambda: r.choice([-1, r.randint(0, 8), r.randint(0, max(nq, nk))])
    mask = None
    if r.random() < 0.45:
        mask = dict(kind=r.choice(["bool", "float"]), bcast=[r.random() < 0.5 for _ in range(3)],
                    empty_rows=r.random() < 0.5, other_dtype=r.random() < 0.3)
    return dict(
        B=b, Hq=hkv * group, Hkv=hkv, Nq=nq, Nk=nk, D=d, dtype=r.choice(dtypes),
        causal=r.random() < 0.4, window=(side(), side()) if r.random() < 0.35 else None,
        softcap=round(r.uniform(1.0, 30.0), 2) if r.random() < 0.35 else 0.0,
        alibi=r.choice([None, None, "h", "bh"]), mask=mask, layout=r.choice(["contiguous", "strided", "expanded"]),
        lse=r.random() < 0.25, scale=r.choice([None, None, round(r.uniform(0.05, 1.0), 3)]),
        input_scale=round(r.uniform(0.5, 3.0), 2), seed=r.randint(0, 2**31 - 1),
    )


def _attention_inputs(c: dict):
    """Float32 CPU leaves (what gradients are taken of), and how to turn them into the call's q, k, v and kwargs
    in a dtype."""
    g = torch.Generator().manual_seed(c["seed"])
    B, Hq, Hkv, Nq, Nk, D = c["B"], c["Hq"], c["Hkv"], c["Nq"], c["Nk"], c["D"]
    kv_b = 1 if c["layout"] == "expanded" else B
    s = c["input_scale"]
    leaves = [torch.randn(B, Nq, Hq, D, generator=g) * s, torch.randn(kv_b, Nk, Hkv, D, generator=g) * s,
              torch.randn(kv_b, Nk, Hkv, D, generator=g)]
    kw = dict(causal=c["causal"], window=c["window"], softcap=c["softcap"], scale=c["scale"])
    if c["alibi"]:
        shape = (Hq,) if c["alibi"] == "h" else (B, Hq)
        kw["alibi_slopes"] = (0.02 + 0.5 * torch.rand(shape, generator=g)).to(DEVICE)
    if c["mask"]:
        m = c["mask"]
        shape = tuple(1 if bc else n for bc, n in zip(m["bcast"], (B, Hq, Nq))) + (Nk,)
        keep = torch.rand(shape, generator=g) > 0.3
        if m["empty_rows"]:
            rows = shape[2]  # 1 when the query dim broadcasts: then every row is empty
            keep[..., torch.randint(0, rows, (max(1, rows // 4),), generator=g), :] = False
        if m["kind"] == "bool":
            kw["attn_mask"] = keep.to(DEVICE)
        else:
            kw["attn_mask"] = torch.where(keep, torch.randn(shape, generator=g), float("-inf")).to(DEVICE)

    def build(leaves, dtype):
        q, k, v = (t.to(DEVICE, dtype).transpose(1, 2) for t in leaves)  # (B, N, H, D) viewed as (B, H, N, D)
        if c["layout"] == "contiguous":
            q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        elif c["layout"] == "expanded":
            k, v = k.expand(B, -1, -1, -1), v.expand(B, -1, -1, -1)
        call = dict(kw)
        if "attn_mask" in call and call["attn_mask"].is_floating_point():
            other = torch.float32 if dtype != torch.float32 else torch.float16
            call["attn_mask"] = call["attn_mask"].to(other if c["mask"]["other_dtype"] else dtype)
        if "alibi_slopes" in call:
            call["alibi_slopes"] = call["alibi_slopes"].to(torch.float64 if dtype == torch.float64 else torch.float32)
        return q, k, v, call

    return leaves, build


def _with_lse(res):
    out, lse = res
    return out + 0.5 * torch.where(torch.isfinite(lse), lse, 0.0).unsqueeze(-1).to(out.dtype)


@pytest.mark.parametrize("i", range(_count("attention")))
def test_fuzz_attention(i):
    c = _attention_case(i)
    with _repro("attention", i, c):
        dtype = getattr(torch, c["dtype"])
        base, build = _attention_inputs(c)

        def run(leaves, dt, fn):
            q, k, v, kw = build(leaves, dt)
            res = fn(q, k, v, **kw)
            return _with_lse(res) if c["lse"] else res

        kern = lambda q, k, v, **kw: embedattn.attention(q, k, v, return_lse=c["lse"], backend="triton", **kw)
        ref = lambda up: lambda q, k, v, **kw: reference.attention(q, k, v, return_lse=c["lse"], upcast=up, **kw)
        leaves = [t.clone().requires_grad_() for t in base]
        r64 = [t.double().requires_grad_() for t in base]
        rp = [t.clone().requires_grad_() for t in base]
        out, want, plain = run(leaves, dtype, kern), run(r64, torch.float64, ref(True)), run(rp, dtype, ref(False))
        assert out.dtype == dtype and out.shape == want.shape
        assert_fa_close(out, want, plain, "out")
        dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(c["seed"] + 1))
        got = torch.autograd.grad(out, leaves, dout.to(DEVICE, dtype))
        exp = torch.autograd.grad(want, r64, dout.to(DEVICE, torch.float64))
        yard = torch.autograd.grad(plain, rp, dout.to(DEVICE, dtype))
        # a gradient that is exactly 0 (e.g. dk with Nk = 1) still carries the fp32 rounding of its terms
        # (rowsum(dO * O) against dO . v): eps scales with the gradients' size
        eps = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
        eps *= max(1.0, max(t.abs().max().item() if t.numel() else 0.0 for t in exp))
        _grads_close([t.to(dtype) for t in got], exp, [t.to(dtype) for t in yard], ("dq", "dk", "dv"), eps)


# ------------------------------------------------------------------------------------------- embedding
def _embedding_case(i: int) -> dict:
    r = random.Random(f"embedding/{SEED}/{i}")
    big = 8 if ON_CUDA else 1
    V = r.choice([1, 2, 3, r.randint(1, 60 * big)])
    n = r.randint(1, 20 * big)
    shape = r.choice([(n,), (r.randint(1, 4), n), (2, r.randint(1, 3), n)])
    mode = r.choice(["learned", "sinusoidal", "none"])
    explicit = mode != "none" and r.random() < 0.35
    return dict(V=V, D=r.choice([1, 2, 3, 8, r.randint(1, 48 * big)]), shape=shape, mode=mode, explicit=explicit,
                offset=0 if explicit else r.choice([0, 0, r.randint(1, 10)]),
                padding_idx=r.choice([None, None, r.randint(-V, V - 1)]),
                scale=r.choice([1.0, round(r.uniform(0.1, 4.0), 3)]),
                **_table_dtypes_and_seed(r))


@pytest.mark.parametrize("i", range(_count("embedding")))
def test_fuzz_embedding(i):
    with _table_case("embedding", i, _embedding_case) as (c, g, dtype, id_dtype):
        ids = torch.randint(0, c["V"], c["shape"], generator=g).to(DEVICE, id_dtype)
        n = c["shape"][-1]
        positions = None
        P = n + c["offset"] + 3
        if c["explicit"]:
            positions = torch.randint(0, P, c["shape"], generator=g).to(DEVICE, id_dtype)
        base = [torch.randn(c["V"], c["D"], generator=g)]
        if c["mode"] == "learned":
            base.append(torch.randn(P, c["D"], generator=g))
        kw = dict(sinusoidal=c["mode"] == "sinusoidal", scale=c["scale"], padding_idx=c["padding_idx"],
                  position_offset=c["offset"], positions=positions)

        def run(leaves, dt, fn):
            tables = [t.to(DEVICE, dt) for t in leaves]
            return fn(ids, tables[0], tables[1] if len(tables) > 1 else None, **kw)

        leaves = [t.clone().requires_grad_() for t in base]
        r64 = [t.double().requires_grad_() for t in base]
        rp = [t.clone().requires_grad_() for t in base]
        out = run(leaves, dtype, lambda *a, **k: embedattn.embedding(*a, backend="triton", **k))
        want = run(r64, torch.float64, reference.embedding)
        plain = run(rp, dtype, lambda *a, **k: reference.embedding(*a, upcast=False, **k))
        assert out.dtype == dtype and out.shape == c["shape"] + (c["D"],)
        assert_fa_close(out, want, plain, "out")
        dout = torch.randn(out.shape, generator=g)
        got = torch.autograd.grad(out, leaves, dout.to(DEVICE, dtype))
        exp = torch.autograd.grad(want, r64, dout.to(DEVICE, torch.float64))
        yard = torch.autograd.grad(plain, rp, dout.to(DEVICE, dtype))
        # accumulated over repeated ids: the error scales with the gradient's size
        eps = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype] * max(1.0, exp[0].abs().max())
        _grads_close([t.to(dtype) for t in got], exp, [t.to(dtype) for t in yard], ("dweight", "dpos_weight"), eps)
        if c["padding_idx"] is not None:
            assert torch.equal(got[0][c["padding_idx"]], torch.zeros_like(got[0][c["padding_idx"]]))


# ----------------------------------------------------------------------------------- negative sampling
def _ns_case(i: int) -> dict:
    r = random.Random(f"negative_sampling/{SEED}/{i}")
    big = 8 if ON_CUDA else 1
    return dict(B=r.randint(1, 40 * big), K=r.randint(1, 8), V=r.choice([1, 2, r.randint(1, 50 * big)]),
                D=r.choice([1, 3, 4, r.randint(1, 64 * big)]), reduction=r.choice(["mean", "sum", "none"]),
                sparse=r.random() < 0.2, weight_scale=round(r.uniform(0.05, 2.0), 3),
                **_table_dtypes_and_seed(r))


@pytest.mark.parametrize("i", range(_count("negative_sampling")))
def test_fuzz_negative_sampling(i):
    with _table_case("negative_sampling", i, _ns_case) as (c, g, dtype, id_dtype):
        ids = [torch.randint(0, c["V"], s, generator=g).to(DEVICE, id_dtype) for s in ((c["B"],), (c["B"],),
                                                                                       (c["B"], c["K"]))]
        base = [torch.randn(c["V"], c["D"], generator=g) * c["weight_scale"] for _ in range(2)]
        kw = dict(reduction=c["reduction"], sparse=c["sparse"])

        # the tables are the leaves, in each dtype: a sparse gradient cannot flow back through a dtype cast
        leaves, r64, rp = ([t.to(DEVICE, dt).requires_grad_() for t in base] for dt in (dtype, torch.float64, dtype))
        loss = embedattn.negative_sampling_loss(*ids, *leaves, backend="triton", **kw)
        want = reference.negative_sampling_loss(*ids, *r64, **kw)
        # the yardstick's gradients dense: torch cannot add sparse float16 gradients on the CPU
        plain = reference.negative_sampling_loss(*ids, *rp, upcast=False, **dict(kw, sparse=False))
        # a sum of many terms: the error scales with the loss
        eps = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
        assert_fa_close(loss.double(), want, plain, "loss", eps=eps * max(1.0, want.abs().max().item()))
        dl = torch.randn(loss.shape, generator=g)
        got = torch.autograd.grad(loss, leaves, dl.to(DEVICE, loss.dtype))
        exp = torch.autograd.grad(want, r64, dl.to(DEVICE, torch.float64))
        yard = torch.autograd.grad(plain, rp, dl.to(DEVICE, plain.dtype))
        scale = max(1.0, max(t.to_dense().abs().max().item() for t in exp))
        _grads_close([t.to(dtype) for t in got], exp, [t.to(dtype) for t in yard], ("din", "dout"), eps * scale)


# ------------------------------------------------------------------------------------------ rotary varlen
def _rotary_case(i: int) -> dict:
    r = random.Random(f"rotary_varlen/{SEED}/{i}")
    big = 8 if ON_CUDA else 1
    lens = [r.choice([0, 1, r.randint(1, 12 * big)]) for _ in range(r.randint(1, 4))]
    total = sum(lens)
    cu = [0]
    for n in lens:
        cu.append(cu[-1] + n)
    # every kind of bad varlen input within the first cases (the CI count), in a seeded order
    kinds = ["none", "short max_seqlen", "past the end", "negative", "decreasing", "none"]
    bad = kinds[(i + SEED) % len(kinds)]
    max_len = max(lens + [0])
    if bad == "short max_seqlen":
        max_len = r.randint(0, max(max_len - 1, 0))
    elif bad == "past the end":
        cu[-1] += r.randint(1, 40)
    elif bad == "negative" and len(cu) > 2:
        cu[1] = -r.randint(1, 20)
    elif bad == "decreasing" and len(cu) > 2:
        cu[1], cu[2] = cu[2] + r.randint(1, 5), max(cu[1] - r.randint(0, 3), 0)
    half = r.randint(1, 8)
    return dict(cu=cu, total=total, max_seqlen=max_len, bad=bad, H=r.randint(1, 3),
                D=2 * half + r.choice([0, 0, 1, 5]), half=half, interleaved=r.random() < 0.5,
                inplace=r.random() < 0.3, heads_first=r.random() < 0.3, offsets=r.choice(["int", "tensor"]),
                dtype=r.choice(["float32", "float16"]), seed=r.randint(0, 2**31 - 1))


def _partition(cu: list[int], total: int) -> list[int]:
    """What an unchecked cu_seqlens means (embedattn.rotary): clamped into [0, total], first 0, last total,
    then its running maximum."""
    c = [min(max(v, 0), total) for v in cu]
    c[0], c[-1] = 0, total
    for j in range(1, len(c)):
        c[j] = max(c[j], c[j - 1])
    return c


@pytest.mark.parametrize("i", range(_count("rotary_varlen")))
def test_fuzz_rotary_varlen(i):
    c = _rotary_case(i)
    with _repro("rotary_varlen", i, c):
        g = torch.Generator().manual_seed(c["seed"])
        dtype = getattr(torch, c["dtype"])
        total, h, d, pad = c["total"], c["H"], c["D"], 2
        angle = torch.rand(max(total, 1) + 8, c["half"], generator=g, dtype=torch.float64) * 6.3
        cos, sin = angle.cos().to(DEVICE, torch.float32), angle.sin().to(DEVICE, torch.float32)
        nb = len(c["cu"]) - 1
        off = r_off = 3
        if c["offsets"] == "tensor":
            off = torch.randint(0, 8, (nb,), generator=g).to(DEVICE)
            r_off = off
        shape = (h, total + 2 * pad, d) if c["heads_first"] else (total + 2 * pad, h, d)
        buf = torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)
        x = buf.narrow(1 if c["heads_first"] else 0, pad, total)
        x.copy_(torch.randn(x.shape, generator=g).to(DEVICE, dtype))
        x0 = x.clone()
        cu = torch.tensor(c["cu"], dtype=torch.int32, device=DEVICE)
        part = torch.tensor(_partition(c["cu"], total), dtype=torch.int32, device=DEVICE)
        kw = dict(cu_seqlens=cu, max_seqlen=c["max_seqlen"], heads_first=c["heads_first"])
        call = lambda t, inplace: embedattn.rotary(t, cos, sin, c["interleaved"], inplace, off, check_bounds=False,
                                                    backend="triton", **kw)
        rkw = dict(cu_seqlens=part, heads_first=c["heads_first"], seqlen_offsets=r_off)
        want = reference.rotary(x0.double(), cos.double(), sin.double(), c["interleaved"], **rkw)
        plain = reference.rotary(x0, cos, sin, c["interleaved"], upcast=False, **rkw)
        if c["inplace"]:
            got = call(x, True)
            assert got is x
        else:
            xl = x0.clone().requires_grad_()
            got = call(xl, False)
            dout = torch.randn(got.shape, generator=g).to(DEVICE, dtype)
            got.backward(dout)
            x64 = x0.double().requires_grad_()
            reference.rotary(x64, cos.double(), sin.double(), c["interleaved"], **rkw).backward(dout.double())
            xp = x0.clone().requires_grad_()
            reference.rotary(xp, cos, sin, c["interleaved"], upcast=False, **rkw).backward(dout)
            assert_fa_close(xl.grad, x64.grad, xp.grad, "grad x")
        outside = torch.cat([buf.narrow(1 if c["heads_first"] else 0, 0, pad),
                             buf.narrow(1 if c["heads_first"] else 0, pad + total, pad)])
        assert torch.isnan(outside).all(), "a write outside x"
        assert_fa_close(got.detach(), want, plain, "out")


# ------------------------------------------------------------------------------------------ KV cache
_DTYPES = ["float32", "float16"] + (["bfloat16"] if ON_CUDA else [])


def _kv_case(r: random.Random, paged: bool) -> dict:
    """A KV-cache decoding step: shapes, features, lengths, new keys; with ``paged`` a block table whose pages
    are a random permutation of the pool (distinct across batches) with -1 padding past each batch's pages."""
    big = 4 if ON_CUDA else 1
    B, hkv, group = r.randint(2, 4), r.choice([1, 2]), r.choice([1, 2])
    page = r.choice([1, 3, 4, 7, 16, 16 * big]) if paged else 0
    max_pages = r.randint(1, 4 if paged else 1)
    S = page * max_pages if paged else r.randint(1, 40 * big)
    n_new = r.choice([0, 1, r.randint(1, min(3, S))])
    lens = [r.randint(0, S - n_new) for _ in range(B)]
    table, n_pages = None, 0
    if paged:
        n_pages = B * max_pages + r.randint(0, 3)
        perm = list(range(n_pages))
        r.shuffle(perm)
        table = [perm[b * max_pages:(b + 1) * max_pages] for b in range(B)]
        for b in range(B):  # padding past the pages a batch uses is fine (-1, FlashAttention's convention)
            used = -(-(lens[b] + n_new) // page)
            table[b][used:] = [-1 if r.random() < 0.5 else x for x in table[b][used:]]
    c = dict(B=B, Hq=hkv * group, Hkv=hkv, Nq=r.choice([1, max(n_new, 1)]), D=r.choice([1, 3, 8, 16, 24 * big]),
             S=S, page=page, n_pages=n_pages, table=table, lens=lens, n_new=n_new, causal=r.random() < 0.5,
             dtype=r.choice(_DTYPES), seed=r.randint(0, 2**31 - 1))
    # a left-padded cache (cache_leftpad, drawn last so the draws above stay those of the cases before it): 0, the
    # whole cache (only the new keys) or anything between
    c["leftpad"] = [r.choice([0, n, r.randint(0, n)]) for n in lens] if r.random() < 0.4 else None
    return c


def _kv_inputs(c: dict):
    """q, the caches (pools when paged) and the new keys/values (None without), float32 on the CPU."""
    g = torch.Generator().manual_seed(c["seed"])
    B, Hq, Hkv, D = c["B"], c["Hq"], c["Hkv"], c["D"]
    cache = (c["n_pages"], Hkv, c["page"], D) if c["table"] else (B, Hkv, c["S"], D)
    q = torch.randn(B, Hq, c["Nq"], D, generator=g)
    kc, vc = torch.randn(cache, generator=g), torch.randn(cache, generator=g)
    new = (torch.randn(B, Hkv, c["n_new"], D, generator=g), torch.randn(B, Hkv, c["n_new"], D, generator=g)) \
        if c["n_new"] else (None, None)
    return q, kc, vc, new


def _slot(c: dict, b: int, pos: int) -> tuple[int, int]:
    """(cache row or page, position in it) of batch b's position pos."""
    if c["table"]:
        return c["table"][b][pos // c["page"]], pos % c["page"]
    return b, pos


def _kv_oracle(c: dict, q, kc, vc, new, good: list[int], dtype: torch.dtype, upcast: bool = True):
    """The caches after the appends of the ``good`` batches alone (in dtype), and each good batch's output by the
    reference on its gathered contiguous cache."""
    kc, vc = kc.to(DEVICE, dtype).clone(), vc.to(DEVICE, dtype).clone()
    k_new, v_new = (None, None) if new[0] is None else (t.to(DEVICE, dtype) for t in new)
    q = q.to(DEVICE, dtype)
    outs = {}
    for b in good:
        for i in range(c["n_new"]):
            row, pos = _slot(c, b, c["lens"][b] + i)
            kc[row, :, pos], vc[row, :, pos] = k_new[b, :, i], v_new[b, :, i]
    for b in good:
        total = c["lens"][b] + c["n_new"]
        first = c["leftpad"][b] if c.get("leftpad") else 0  # the keys seen: positions first .. total - 1
        rows = [_slot(c, b, p) for p in range(first, total)]
        keys, vals = ((torch.stack([t[r_, :, p_] for r_, p_ in rows], dim=1)[None] if rows
                       else t.new_zeros(1, c["Hkv"], 0, c["D"])) for t in (kc, vc))
        # bottom-right on the keys seen: the absolute diagonal of the left-padded cache
        outs[b] = reference.attention_with_kvcache(q[b:b + 1], keys, vals, torch.tensor([total - first],
                                                                                         device=DEVICE),
                                                   causal=c["causal"], upcast=upcast)
    return kc, vc, outs


def _kv_call(c: dict, q, kc, vc, new, dtype, **kw):
    """The arguments of embedattn.attention_with_kvcache for the case, in dtype on DEVICE (the caches are written)."""
    table = None if c["table"] is None else torch.tensor(c["table"], dtype=torch.int32, device=DEVICE)
    k_new, v_new = (None, None) if new[0] is None else (t.to(DEVICE, dtype) for t in new)
    lens = torch.tensor(c["lens"], dtype=torch.int32, device=DEVICE)
    if c.get("leftpad"):
        kw["cache_leftpad"] = torch.tensor(c["leftpad"], dtype=torch.int32, device=DEVICE)
    return (q.to(DEVICE, dtype), kc, vc, lens, k_new, v_new), dict(causal=c["causal"], block_table=table, **kw)


def _check_kv(c, got, kc_got, vc_got, q, kc0, vc0, new, good, dtype):
    """The good batches' outputs (FlashAttention's rule against float64) and the caches after the call (exact)."""
    k_want, v_want, _ = _kv_oracle(c, q, kc0, vc0, new, good, dtype)  # the appends in dtype: exact copies
    assert torch.equal(kc_got, k_want) and torch.equal(vc_got, v_want), "a cache slot written that should not be"
    _, _, want = _kv_oracle(c, q, kc0, vc0, new, good, torch.float64)
    _, _, plain = _kv_oracle(c, q, kc0, vc0, new, good, dtype, upcast=False)
    for b in good:
        assert_fa_close(got[b:b + 1], want[b], plain[b], f"out[{b}]")


PAGED_MODES = [None, "sync", "device", "off", False, True]


def _paged_append_case(i: int) -> dict:
    r = random.Random(f"paged_append/{SEED}/{i}")
    c = _kv_case(r, paged=True)
    if not c["n_new"]:
        c["n_new"] = 1
        c["lens"] = [min(n, c["S"] - 1) for n in c["lens"]]
        if c["leftpad"]:
            c["leftpad"] = [min(p, n) for p, n in zip(c["leftpad"], c["lens"])]
    # every mode and kind within the first cases (the CI count), in a seeded order
    c["mode"] = PAGED_MODES[(i + SEED) % len(PAGED_MODES)]
    kinds = ["negative entry", "entry past the pool", "length past the capacity"]
    c["bad"] = kind = kinds[(i + SEED) % len(kinds)]
    b = c["bad_batch"] = r.randrange(c["B"])
    if kind == "length past the capacity":
        c["lens"][b] = c["S"] - c["n_new"] + r.randint(1, 3)
    else:
        used = -(-(c["lens"][b] + c["n_new"]) // c["page"])
        j = r.randrange(used)
        c["table"][b][j] = -r.randint(1, 5) if kind == "negative entry" else c["n_pages"] + r.randint(0, 5)
    # a device-side assertion on CUDA ends the CUDA context: that mode is exercised on the CPU, compiled (where the
    # assertion is the graph's), and on CUDA by the "sync" check of the same condition
    c["compiled"] = c["mode"] == "device" and not ON_CUDA
    if c["mode"] == "device" and ON_CUDA:
        c["mode"] = "sync"
    return c


@pytest.mark.parametrize("i", range(_count("paged_append")))
def test_fuzz_paged_append(i):
    """One batch's bad table entry or length: the raising modes raise with the pools untouched; unchecked ("off",
    False) the bad batch writes nothing, the others' appends are exact and their outputs right."""
    c = _paged_append_case(i)
    with _repro("paged_append", i, c):
        dtype = getattr(torch, c["dtype"])
        q, kc0, vc0, new = _kv_inputs(c)
        kc, vc = kc0.to(DEVICE, dtype), vc0.to(DEVICE, dtype)
        args, kw = _kv_call(c, q, kc, vc, new, dtype, check_bounds=c["mode"], backend="triton")
        fn = lambda *a: embedattn.attention_with_kvcache(*a, **kw)  # noqa: E731
        if c["compiled"]:
            fn = on_road("compiled", fn)
        if c["mode"] in ("off", False):
            out = fn(*args)
            good = [b for b in range(c["B"]) if b != c["bad_batch"]]
            _check_kv(c, out, kc, vc, q, kc0, vc0, new, good, dtype)
            assert not torch.isnan(out).any()
        else:
            with pytest.raises((IndexError, ValueError, RuntimeError)):
                fn(*args)
            assert torch.equal(kc, kc0.to(DEVICE, dtype)) and torch.equal(vc, vc0.to(DEVICE, dtype)), \
                "a raising mode wrote the cache"


# ------------------------------------------------------------------------------------------ compiled
def _compiled_case(i: int) -> dict:
    r = random.Random(f"compiled/{SEED}/{i}")
    op = ["varlen", "kvcache", "paged"][(i + SEED) % 3]
    backend = r.choice(["triton", None])  # None: the default road (the reference on the CPU)
    if op != "varlen":
        return dict(op=op, backend=backend, **_kv_case(r, paged=op == "paged"))
    big = 8 if ON_CUDA else 1
    n = r.randint(1, 3)
    lq = [r.choice([0, 1, r.randint(1, 12 * big)]) for _ in range(n)]
    lk = [r.choice([0, 1, r.randint(1, 12 * big)]) for _ in range(n)]
    hkv, group = r.choice([1, 2]), r.choice([1, 2])
    side = lambda: r.choice([-1, r.randint(0, 6)])  # noqa: E731
    return dict(op=op, backend=backend, lq=lq, lk=lk, extra=r.choice([0, 0, 3]), Hq=hkv * group, Hkv=hkv,
                D=r.choice([1, 5, 16, 24 * big]), causal=r.random() < 0.5,
                window=(side(), side()) if r.random() < 0.3 else None,
                softcap=round(r.uniform(1.0, 20.0), 2) if r.random() < 0.3 else 0.0, alibi=r.random() < 0.3,
                dtype=r.choice(_DTYPES), seed=r.randint(0, 2**31 - 1))


def _compiled_varlen(c: dict):
    g = torch.Generator().manual_seed(c["seed"])
    dtype = getattr(torch, c["dtype"])
    cu = lambda lens: torch.tensor([0] + [sum(lens[:j + 1]) for j in range(len(lens))], dtype=torch.int32,  # noqa: E731
                                   device=DEVICE)
    cu_q, cu_k = cu(c["lq"]), cu(c["lk"])
    mq, mk = max(c["lq"]) + c["extra"], max(c["lk"]) + c["extra"]
    base = [torch.randn(sum(lens), h, c["D"], generator=g)
            for lens, h in ((c["lq"], c["Hq"]), (c["lk"], c["Hkv"]), (c["lk"], c["Hkv"]))]
    kw = dict(causal=c["causal"], window=c["window"], softcap=c["softcap"])
    if c["alibi"]:
        kw["alibi_slopes"] = (0.02 + 0.5 * torch.rand(len(c["lq"]), c["Hq"], generator=g)).to(DEVICE)
    fn = on_road("compiled", lambda q, k, v: embedattn.attention_varlen(q, k, v, cu_q, cu_k, mq, mk,
                                                                        backend=c["backend"], **kw))
    leaves = [t.to(DEVICE, dtype).requires_grad_() for t in base]
    r64 = [t.to(DEVICE, torch.float64).requires_grad_() for t in base]
    rp = [t.to(DEVICE, dtype).requires_grad_() for t in base]
    out = fn(*leaves)
    want = reference.attention_varlen(*r64, cu_q, cu_k, mq, mk, **kw)
    plain = reference.attention_varlen(*rp, cu_q, cu_k, mq, mk, upcast=False, **kw)
    assert out.dtype == dtype and out.shape == want.shape
    assert_fa_close(out, want, plain, "out")
    dout = torch.randn(out.shape, generator=g)
    if not out.requires_grad:
        # no key or no query anywhere: embedattn returns constant zeros (no graph to differentiate)
        assert not sum(c["lq"]) or not sum(c["lk"]), "the output lost its graph"
    elif out.numel():
        got = torch.autograd.grad(out, leaves, dout.to(DEVICE, dtype))
        exp = torch.autograd.grad(want, r64, dout.to(DEVICE, torch.float64))
        yard = torch.autograd.grad(plain, rp, dout.to(DEVICE, dtype), allow_unused=True)
        eps = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
        eps *= max(1.0, max(t.abs().max().item() if t.numel() else 0.0 for t in exp))
        yard = [torch.zeros_like(a) if y is None else y for a, y in zip(got, yard)]
        _grads_close(got, exp, yard, ("dq", "dk", "dv"), eps)


@pytest.mark.parametrize("i", range(_count("compiled")))
def test_fuzz_compiled(i):
    """torch.compile(fullgraph=True) of attention_varlen (forward and gradients) and attention_with_kvcache
    (contiguous and paged, the append a mutation of the graph's inputs), Triton and default backends."""
    c = _compiled_case(i)
    with _repro("compiled", i, c):
        if c["op"] == "varlen":
            _compiled_varlen(c)
            return
        dtype = getattr(torch, c["dtype"])
        q, kc0, vc0, new = _kv_inputs(c)
        kc, vc = kc0.to(DEVICE, dtype), vc0.to(DEVICE, dtype)
        args, kw = _kv_call(c, q, kc, vc, new, dtype, backend=c["backend"])
        out = on_road("compiled", lambda *a: embedattn.attention_with_kvcache(*a, **kw))(*args)
        _check_kv(c, out, kc, vc, q, kc0, vc0, new, list(range(c["B"])), dtype)


# ------------------------------------------------------------------------------------------ varlen, paged keys
def _varlen_paged_case(i: int) -> dict:
    r = random.Random(f"varlen_paged/{SEED}/{i}")
    big = 8 if ON_CUDA else 1
    n = r.randint(1, 3)
    page = r.choice([1, 3, 7, 16, 16 * big])
    lq = [r.choice([0, 1, r.randint(1, 9 * big)]) for _ in range(n)]
    lk = [r.choice([0, 1, r.randint(1, 20 * big)]) for _ in range(n)]
    hkv, group = r.choice([1, 2]), r.choice([1, 2])
    side = lambda: r.choice([-1, r.randint(0, 6)])  # noqa: E731
    return dict(lq=lq, lk=lk, page=page, extra_pages=r.randint(0, 2), Hq=hkv * group, Hkv=hkv,
                D=r.choice([1, 5, 16, 24 * big]), causal=r.random() < 0.5,
                window=(side(), side()) if r.random() < 0.3 else None,
                softcap=round(r.uniform(1.0, 20.0), 2) if r.random() < 0.3 else 0.0, alibi=r.random() < 0.3,
                dtype=r.choice(_DTYPES), seed=r.randint(0, 2**31 - 1))


@pytest.mark.parametrize("i", range(_count("varlen_paged")))
def test_fuzz_varlen_paged(i):
    """attention_varlen(block_table=...) on the Triton kernels (paged keys for packed queries: pages in a random
    order, spare ones, -1 past each sequence's pages) against the float64 reference on the same keys packed."""
    c = _varlen_paged_case(i)
    with _repro("varlen_paged", i, c):
        g = torch.Generator().manual_seed(c["seed"])
        dtype, page = getattr(torch, c["dtype"]), c["page"]
        used = [-(-n // page) for n in c["lk"]]
        max_pages = max(used) + c["extra_pages"] or 1
        n_pages = sum(used) + c["extra_pages"] + 1
        perm = torch.randperm(n_pages, generator=g).tolist()
        table = torch.full((len(c["lk"]), max_pages), -1, dtype=torch.int32)
        for b, u in enumerate(used):
            table[b, :u] = torch.tensor(perm[sum(used[:b]):sum(used[:b]) + u], dtype=torch.int32)
        kp, vp = (_randn((n_pages, c["Hkv"], page, c["D"]), g, dtype) for _ in range(2))
        q = _randn((sum(c["lq"]), c["Hq"], c["D"]), g, dtype)
        cu = lambda lens: torch.tensor([0] + [sum(lens[:j + 1]) for j in range(len(lens))], dtype=torch.int32,  # noqa: E731
                                       device=DEVICE)
        cu_q, cu_k = cu(c["lq"]), cu(c["lk"])
        mq, mk = max(c["lq"]), max(c["lk"])
        kw = dict(causal=c["causal"], window=c["window"], softcap=c["softcap"])
        if c["alibi"]:
            kw["alibi_slopes"] = (0.02 + 0.5 * torch.rand(len(c["lq"]), c["Hq"], generator=g)).to(DEVICE)
        out = embedattn.attention_varlen(q, kp, vp, cu_q, cu_k, mq, mk, block_table=table.to(DEVICE),
                                         backend="triton", **kw)
        k, v = ((torch.stack([t[int(table[b, p // page]), :, p % page] for b, n in enumerate(c["lk"])
                              for p in range(n)]) if sum(c["lk"]) else t.new_zeros(0, c["Hkv"], c["D"]))
                for t in (kp, vp))
        want = reference.attention_varlen(q.double(), k.double(), v.double(), cu_q, cu_k, mq, mk, **kw)
        plain = reference.attention_varlen(q, k, v, cu_q, cu_k, mq, mk, upcast=False, **kw)
        assert out.dtype == dtype and out.shape == want.shape
        assert_fa_close(out, want, plain, "out")
