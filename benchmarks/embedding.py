"""Embedding sweep: embedattn.embedding (gather + learned positional add) vs nn.Embedding + add.

The peer is what GPT-2-style models do: ``tok(ids) + pos(arange(S))``, run eagerly and through
``torch.compile`` (dynamic shapes, so one compile serves every size; skipped with a note when
compilation fails). Throughput is effective GB/s over the minimal traffic of
``harness.embedding_bytes`` and its fraction of the copy bandwidth measured in the same run.

On CUDA the sweep is 2k, 8k, 32k and 128k tokens at D 768 and 4096 (bf16; fp16 and fp32 too in the full
profile), fwd / bwd / fwd+bwd. Besides the default call (bounds checked on the device, no host sync) it
times the strict host check (``embedattn-sync``), no check (``embedattn-nocheck``), and the backward forced
onto each scatter (``embedattn-atomic``: float32 atomics, ``embedattn-sorted``: the deterministic sorted
segments), which is what sets ``kernels.embedding.scatter_mode``'s crossover for half tables.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .harness import (
    DTYPES,
    Case,
    Context,
    Provider,
    Recorder,
    Workload,
    chosen_config,
    coarse_first,
    embedding_bytes,
    measure_providers,
    measurement_rows,
    probe,
    run_speed_benchmark,
)

SUITE = "embedding"


def available(ctx: Context) -> str | None:
    """None when embedattn.embedding runs on this device, else why the suite is skipped."""
    import embedattn

    w = torch.randn(10, 8, device=ctx.device)
    ids = torch.tensor([[1, 2, 3]], device=ctx.device)
    return probe("embedattn.embedding", lambda: embedattn.embedding(ids, w, w))


@dataclass
class Spec:
    dtype: str
    vocab: int
    dim: int
    tokens: int
    seq: int
    kernel: str = field(init=False)

    def __post_init__(self):
        v = f"{self.vocab // 1024}k" if self.vocab >= 1024 else str(self.vocab)
        self.kernel = f"embedding_v{v}_d{self.dim}"

    @property
    def batch(self) -> int:
        return max(1, self.tokens // self.seq)

    @property
    def shape(self) -> str:
        return f"V={self.vocab} D={self.dim} B={self.batch} S={self.seq} tokens={self.batch * self.seq}"


def eager(ids, weight, pos_weight, pos):
    """nn.Embedding + positional add, as GPT-2 writes it."""
    return F.embedding(ids, weight) + F.embedding(pos, pos_weight)


@contextlib.contextmanager
def forced_scatter(mode: str):
    """Every embedding backward scatters with ``mode`` ("atomic" or "sorted") while the block runs."""
    from embedattn.kernels import embedding as K

    real = K.scatter_mode
    K.scatter_mode = lambda *args: mode
    try:
        yield
    finally:
        K.scatter_mode = real


def providers(ctx: Context, compile_peer: bool = True) -> list[Provider]:
    import embedattn

    def ours(check=None, scatter=None):
        extra = [f"check={'device' if check is None else check}"] + ([f"scatter={scatter}"] if scatter else [])
        cfg = lambda: "; ".join([c for c in [chosen_config("embedding")] if c] + extra)
        kw = {} if check is None else {"check_bounds": check}
        return dict(fn=lambda ids, w, pw, pos: embedattn.embedding(ids, w, pw, **kw), config=cfg,
                    context=(lambda: forced_scatter(scatter)) if scatter else contextlib.nullcontext)

    if not ctx.is_cuda:
        return [Provider("embedattn", lambda ids, w, pw, pos: embedattn.embedding(ids, w, pw),
                         config=lambda: "backend=reference"), Provider("torch-eager", eager)]
    out = [Provider("embedattn", **ours()), Provider("torch-eager", eager)]
    out += [Provider("embedattn-sync", **ours("sync")),  # the strict host check: one device sync a call
            Provider("embedattn-nocheck", **ours(False)),
            Provider("embedattn-atomic", **ours(scatter="atomic")),
            Provider("embedattn-sorted", **ours(scatter="sorted"))]
    if compile_peer and ctx.profile != "tiny":
        try:
            compiled = torch.compile(eager, dynamic=True)
            out.append(Provider("torch-compile", compiled, config=lambda: "inductor dynamic=True"))
        except Exception as e:  # e.g. torch.compile unsupported on this Python
            ctx.note(f"  torch.compile unavailable: {type(e).__name__}: {e}")
    return out


def specs(ctx: Context) -> list[Spec]:
    if ctx.profile == "tiny":
        vocabs, dims, tokens, seq = [100], [16], [32, 64], 16
    elif ctx.is_cuda:
        vocabs = [32768] if ctx.profile == "quick" else [32768, 131072]
        dims = [768, 4096]
        tokens = [2048, 131072] if ctx.profile == "quick" else [2048, 8192, 32768, 131072]
        seq = 2048
    else:
        vocabs = [32768] if ctx.profile == "quick" else [32768, 131072]
        dims = [768]
        tokens = [2048, 8192] if ctx.profile == "quick" else [2048, 8192, 32768]
        seq = 1024
    full = ctx.is_cuda and ctx.profile == "full"
    dtypes = ctx.pick_dtypes(["bf16", "fp16", "fp32"] if full else ["bf16"] if ctx.is_cuda else ["fp32"])
    # (vocab, dim) pairs in order of interest, so a time budget drops the least telling last
    pairs = [(v, d) for d in dims for v in vocabs]
    out = [Spec(dt, v, d, t, min(seq, t)) for dt in dtypes for v, d in pairs for t in tokens]
    return coarse_first(out, lambda s: s.tokens, group=lambda s: dtypes.index(s.dtype))


def _inputs(ctx: Context, s: Spec):
    """The rotating id sets, each one's upstream gradient, the two tables and the positions."""
    dtype = DTYPES[s.dtype]
    g = torch.Generator(device=ctx.device).manual_seed(s.vocab + s.dim + s.tokens)
    pos = torch.arange(s.seq, device=ctx.device)
    ids, grads = [], []
    for _ in range(ctx.n_sets):
        ids.append((torch.randint(0, s.vocab, (s.batch, s.seq), device=ctx.device, generator=g),))
        grads.append(torch.randn(s.batch, s.seq, s.dim, device=ctx.device, dtype=dtype, generator=g))
    # the tables are shared by the sets: they are the model's parameters (and the big allocation)
    w = torch.randn(s.vocab, s.dim, device=ctx.device, dtype=dtype, generator=g)
    pw = torch.randn(s.seq, s.dim, device=ctx.device, dtype=dtype, generator=g)
    return ids, grads, w, pw, pos


def workload(ctx: Context, s: Spec) -> Workload:
    """embedattn's default call at ``s`` on the suite's inputs (what ``benchmarks.tune`` times)."""
    ids, grads, w, pw, pos = _inputs(ctx, s)
    p = providers(ctx, compile_peer=False)[0]
    return Workload(lambda i, w, pw: p.fn(i, w, pw, pos), ids, grads, params=(w, pw))


def measure(ctx: Context, rec: Recorder, p: Provider, s: Spec, inputs, mode: str) -> list[dict]:
    ids, grads, w, pw, pos = inputs
    if p.name.endswith(("-atomic", "-sorted")) and mode == "fwd":
        return []  # the forced scatter only changes the backward
    with p.context():
        t, peak = run_speed_benchmark(ctx, lambda i, w, pw: p.fn(i, w, pw, pos), ids, mode, grad_outputs=grads,
                                      params=(w, pw), op="embedding" if p.name.startswith("embedattn") else None)
    base = dict(suite=SUITE, kernel=s.kernel, provider=p.name, mode=mode, dtype=s.dtype, shape=s.shape,
                x_name="tokens", x_value=s.batch * s.seq, config=p.config())  # fmt: skip
    work = embedding_bytes(s.batch * s.seq, s.dim, s.vocab, w.element_size(), mode, pos_rows=s.seq)
    copy = ctx.copy_gbps
    return measurement_rows(rec, base, t, work, "gbps", scale=1e-9, peak_mib=peak,
                            extra=lambda gbps: ("frac_copy_bw", "fraction", gbps / copy))  # fmt: skip


def run_spec(ctx: Context, rec: Recorder, s: Spec, provs: list[Provider]) -> list[dict]:
    inputs = _inputs(ctx, s)
    return measure_providers(ctx, SUITE, f"{s.kernel} {s.dtype}", provs,
                             lambda p, mode: measure(ctx, rec, p, s, inputs, mode))


def plan(ctx: Context, compile_peer: bool = True) -> list[Case]:
    provs = providers(ctx, compile_peer)
    return [
        Case(SUITE, f"{s.kernel} {s.dtype} tokens={s.tokens}", lambda c, r, s=s: run_spec(c, r, s, provs),
             dtype=s.dtype)
        for s in specs(ctx)
    ]
