"""Context parallelism: ring attention over ``torch.distributed`` (issue #18).

Every rank of a process group holds a shard of the sequence (the same ``N_local`` tokens of q, k and
v on every rank). The K/V shards travel around the ring, rank r sending to r + 1 and receiving from
r - 1 with asynchronous P2P ops, each transfer overlapped with the attention on the block in hand;
partial outputs are merged with their log-sum-exp in fp32 (ring-flash-attention's merge). The
backward runs the ring again: dQ accumulates locally, dK/dV accumulators (fp32) travel with their
K/V block and are back with their owner after ``W`` steps. Every block is one ``embedattn.attention``
call whose ``causal_offset`` puts its queries and keys at their global positions, so causal masking,
sliding windows and ALiBi see the whole sequence, on whichever backend that call resolves to. K and V
travel as one message, concatenated along the head dim (so V may have a head dim of its own, MLA).
Learned sinks join once per row, in the merge after the last block (never per block); the backward's
blocks see the final lse (the sink included) and dsinks comes from it once.

Layouts: without ``load_balance`` rank r holds the contiguous tokens ``[r·N_local, (r+1)·N_local)``;
with it the sequence is cut into 2W chunks and rank r holds chunks r and 2W-1-r, concatenated (the
"zigzag" layout: under causal masking every rank then does the same work). ``shard`` / ``unshard``
convert between the whole sequence and a rank's shard.

Every ``ring_attention`` call first all-gathers a few integers describing each rank's input, so bad
input (shards of different lengths, a bad argument on one rank, tensors on a device the group's
backend does not serve, ranks that disagree on a scale, softcap or ALiBi slope) raises on every rank,
with the same exception type and message, instead of leaving the others waiting in the ring.

Every wait on a transfer is bounded: by ``ring_attention``'s ``timeout`` (seconds) when given, else by
the process group's own timeout. A rank that skips its backward (or stops) makes its peers fail with a
RuntimeError that says so, not a bare "Connection closed by peer" after a hang. After such an error
the group may hold unfinished transfers: destroy it rather than reuse it.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib
import zlib

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from ._checks import check_bool, check_float, check_int
from .attention import _check_qkv, attention, make_spec

__all__ = ["ring_attention", "shard", "unshard"]

_TAG_KV, _TAG_DKV = 0, 1  # P2P tags (gloo matches on them; NCCL orders by issue)


# --------------------------------------------------------------------------------------------------
# the ring: ranks, neighbours, and the metadata all-gather that makes bad input fail on every rank
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Ring:
    group: dist.ProcessGroup
    rank: int  # in the group
    world: int
    next: int  # global ranks of the neighbours
    prev: int
    device_types: tuple[str, ...]  # what the group's backend serves
    meta_device: torch.device  # where the metadata all-gather runs (the same on every rank)
    timeout: datetime.timedelta | None = None  # bound on every wait (None: the group's own timeout)


def _timeout(timeout) -> datetime.timedelta | None:
    if timeout is None:
        return None
    if check_float("timeout", timeout, low=0.0) == 0:
        raise ValueError("timeout must be a number of seconds > 0, or None (the process group's timeout)")
    return datetime.timedelta(seconds=float(timeout))


def _ring(group) -> _Ring:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("ring attention needs torch.distributed: call torch.distributed.init_process_group first")
    if group is None:
        group = dist.group.WORLD
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group must be a torch.distributed ProcessGroup or None, got {type(group).__name__}")
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    if rank < 0:
        raise ValueError("group: this process is not a member of the group")
    config = str(dist.get_backend_config(group))  # e.g. "cpu:gloo,cuda:gloo" or "cuda:nccl"
    types = tuple(part.split(":")[0] for part in config.split(",") if ":" in part) or ("cpu",)
    meta = "cpu" if "cpu" in types else types[0]
    meta_device = torch.device(meta) if meta == "cpu" else torch.device(meta, getattr(torch, meta).current_device())
    return _Ring(group, rank, world, dist.get_global_rank(group, (rank + 1) % world),
                 dist.get_global_rank(group, (rank - 1) % world), types, meta_device)


def _wait(works, ring: _Ring, what: str) -> None:
    """Wait for ``works`` (within ``ring.timeout``); a failure (a timeout, a peer gone) becomes a RuntimeError
    that says what every rank must do."""
    try:
        for w in works:
            if ring.timeout is None:
                w.wait()
            else:
                w.wait(ring.timeout)
    except Exception as e:
        within = "" if ring.timeout is None else f" within {ring.timeout.total_seconds():g} s"
        raise RuntimeError(
            f"{what}: an exchange with rank {ring.prev} (receiving) or rank {ring.next} (sending) did not complete"
            f"{within}: every rank of the group must run it together; a rank that skipped it (for the backward: "
            f"did not backpropagate through its ring_attention output), stopped or failed leaves its peers waiting. "
            f"The group may hold unfinished transfers now. Cause: {type(e).__name__}: {e}") from e


def _code(value) -> int:
    """A field's value as an integer that every process computes alike: the CRC of its repr (exact for ints,
    floats, strings and tuples of them)."""
    return zlib.crc32(repr(value).encode())


def _describe(value) -> str:
    text = str(value)
    return text if len(text) <= 200 else text[:197] + "..."


def _exception(where: tuple[str, str], msg: str) -> Exception:
    """An exception of the class named by ``where`` (module, qualname) carrying ``msg``: the same on every rank
    (a class that cannot be rebuilt here becomes a RuntimeError)."""
    try:
        cls = importlib.import_module(where[0])
        for part in where[1].split("."):
            cls = getattr(cls, part)
        err = cls(msg)
        if isinstance(err, Exception):
            return err
    except Exception:
        pass
    return RuntimeError(msg)


def _agree(ring: _Ring, error: Exception | None, fields: dict, names: tuple[str, ...], what: str) -> None:
    """All-gather every rank's local error and a code of each field in ``names`` (``fields`` maps a name to
    its value on this rank; empty when the rank failed its own checks); raise on every rank, with the same
    exception type and message, if a rank failed (its error's type and message) or the ranks disagree on a
    field (a ValueError naming it and each rank's value). One small collective while all is well."""
    row = torch.tensor([int(error is not None)] + [_code(fields.get(n)) for n in names], dtype=torch.int64,
                       device=ring.meta_device)
    rows = [torch.empty_like(row) for _ in range(ring.world)]
    _wait([dist.all_gather(rows, row, group=ring.group, async_op=True)], ring,
          f"{what} (the all-gather of the ranks' arguments: every rank must call it)")
    table = torch.stack(rows).cpu().tolist()
    if any(r[0] for r in table):
        mine = None if error is None else ((type(error).__module__, type(error).__qualname__), str(error))
        msgs = [None] * ring.world
        dist.all_gather_object(msgs, mine, group=ring.group)
        bad = next(i for i, m in enumerate(msgs) if m is not None)
        where, msg = msgs[bad]
        raise _exception(where, f"{what}: rank {bad} got bad input: {msg}") from error
    differ = [n for col, n in enumerate(names, start=1) if len({r[col] for r in table}) > 1]
    if differ:
        values = [None] * ring.world
        dist.all_gather_object(values, {n: _describe(fields[n]) for n in differ}, group=ring.group)
        name = differ[0]
        by_value: dict[str, list[int]] = {}
        for rank, v in enumerate(values):
            by_value.setdefault(v[name], []).append(rank)
        got = "; ".join(f"{v} on rank{'s' if len(r) > 1 else ''} {', '.join(map(str, r))}" for v, r in by_value.items())
        raise ValueError(f"{what}: every rank must pass the same {name}; got {got}")


# --------------------------------------------------------------------------------------------------
# layouts: which global tokens a rank holds, and the attention calls one ring step makes
# --------------------------------------------------------------------------------------------------
def _segments(rank: int, world: int, n_local: int, load_balance: bool) -> tuple[tuple[int, int, int], ...]:
    """(local start, global start, length) of each contiguous run of global tokens rank ``rank`` holds."""
    if not load_balance:
        return ((0, rank * n_local, n_local),)
    c = n_local // 2
    return ((0, rank * c, c), (c, (2 * world - 1 - rank) * c, c))


@dataclasses.dataclass(frozen=True)
class _Call:
    """One attention call of a ring step: local query rows [q0, q1) against block keys [k0, k1)."""

    q0: int
    q1: int
    k0: int
    k1: int
    causal: bool
    offset: int  # causal_offset: global query start - global key start
    window: tuple[int, int] | None
    alibi: bool


def _plan(q_segs, k_segs, causal: bool, window: tuple[int, int] | None, alibi: bool) -> list[_Call]:
    """The attention calls that give query segments ``q_segs`` the keys of ``k_segs`` at global positions.

    Each (query segment, key segment) pair is empty (skipped), full (every key visible) or partial (cut
    by the causal diagonal or the window: one call with ``causal_offset`` = the global start difference).
    Without ALiBi (which needs distances) the calls merge where positions do not matter: full pairs that
    tile a rectangle become one unmasked call (the zigzag's off-diagonal steps), and a rank's own block
    under plain causal masking is one causal call (local order is global order there)."""
    wl, wr = window if window is not None else (-1, -1)
    lo = max(0 if causal else -(1 << 62), -wr if wr >= 0 else -(1 << 62))  # bounds on i - j (global)
    hi = wl if wl >= 0 else 1 << 62
    kinds = {}
    for a, (_, qs, nq) in enumerate(q_segs):
        for b, (_, ks, nk) in enumerate(k_segs):
            rmin, rmax = qs - (ks + nk - 1), qs + nq - 1 - ks
            if nq and nk and rmax >= lo and rmin <= hi:
                kinds[a, b] = "full" if rmin >= lo and rmax <= hi else "partial"
    if not kinds:
        return []
    end = lambda seg: seg[0] + seg[2]
    if not alibi and window is None and causal and q_segs == k_segs:
        return [_Call(0, end(q_segs[-1]), 0, end(k_segs[-1]), True, 0, None, False)]
    rows, cols = sorted({a for a, _ in kinds}), sorted({b for _, b in kinds})
    if (not alibi and all(x == "full" for x in kinds.values()) and len(kinds) == len(rows) * len(cols)
            and rows == list(range(rows[0], rows[-1] + 1)) and cols == list(range(cols[0], cols[-1] + 1))):
        return [_Call(q_segs[rows[0]][0], end(q_segs[rows[-1]]), k_segs[cols[0]][0], end(k_segs[cols[-1]]),
                      False, 0, None, False)]
    calls = []
    for (a, b), kind in sorted(kinds.items()):
        (ql, qs, nq), (kl, ks, nk) = q_segs[a], k_segs[b]
        if kind == "full" and not alibi:
            calls.append(_Call(ql, ql + nq, kl, kl + nk, False, 0, None, False))
        else:
            calls.append(_Call(ql, ql + nq, kl, kl + nk, causal, qs - ks, window, alibi))
    return calls


def _plans(ring: _Ring, n_local: int, load_balance: bool, causal: bool, window, alibi: bool) -> list[list[_Call]]:
    """This rank's calls for the block of each source rank (index = source rank)."""
    window = None if window is None or (window[0] < 0 and window[1] < 0) else (int(window[0]), int(window[1]))
    mine = _segments(ring.rank, ring.world, n_local, load_balance)
    return [_plan(mine, _segments(s, ring.world, n_local, load_balance), causal, window, alibi)
            for s in range(ring.world)]


# --------------------------------------------------------------------------------------------------
# the ring loop: forward and backward in one autograd Function
# --------------------------------------------------------------------------------------------------
def _start(send: torch.Tensor, ring: _Ring, tag: int):
    """Send ``send`` to the next rank and receive the previous rank's into a new buffer (asynchronous)."""
    recv = torch.empty_like(send)
    works = dist.batch_isend_irecv([dist.P2POp(dist.isend, send, ring.next, ring.group, tag),
                                    dist.P2POp(dist.irecv, recv, ring.prev, ring.group, tag)])
    return recv, works, send  # ``send`` is kept alive until the transfer is waited on


def _finish(pending, ring: _Ring, what: str) -> torch.Tensor:
    recv, works, _ = pending
    _wait(works, ring, what)
    return recv


def _kv_block(kv: torch.Tensor, d: int, c: _Call) -> tuple[torch.Tensor, torch.Tensor]:
    """The keys and values of call ``c``: views of the (B, Hkv, N_local, D + Dv) block in hand (K's d columns, then
    V's)."""
    return kv[:, :, c.k0:c.k1, :d], kv[:, :, c.k0:c.k1, d:]


def _attend(q: torch.Tensor, kv: torch.Tensor, c: _Call, alibi, kw: dict):
    """(out, lse) of one planned call; q is this rank's shard, kv the (B, Hkv, N_local, D + Dv) block in hand."""
    return attention(q[:, :, c.q0:c.q1], *_kv_block(kv, q.shape[-1], c), causal=c.causal, causal_offset=c.offset,
                     window=c.window, alibi_slopes=alibi if c.alibi else None, return_lse=True, **kw)


def _merge(out: torch.Tensor, lse: torch.Tensor, o_b: torch.Tensor, l_b: torch.Tensor) -> None:
    """Fold a block's (o_b, l_b) into the running (out, lse) in place (ring-flash-attention's merge,
    ``out -= sigmoid(l_b - lse)·(out - o_b)``). Rows where neither side has seen a key yet (both lse
    -inf) give NaN in the sigmoid's argument; they keep out = 0 and lse = -inf."""
    w = torch.sigmoid(l_b.to(lse.dtype) - lse).nan_to_num_(0.0).unsqueeze(-1)
    out.sub_(w * (out - o_b.to(out.dtype)))
    lse.copy_(torch.logaddexp(lse, l_b.to(lse.dtype)))


def _add_sinks(out: torch.Tensor, lse: torch.Tensor, sinks: torch.Tensor) -> None:
    """Fold the sinks (Hq,) into the merged (out, lse) in place, once per row: lse_f = logaddexp(lse, sink) and
    out_f = out * exp(lse - lse_f) (the sink's share is missing mass; rows with no key keep out = 0, lse = sink)."""
    sink = sinks.detach().to(lse.dtype).view(1, -1, 1)
    final = torch.logaddexp(lse, sink)
    out.mul_(torch.exp(lse - final).nan_to_num_(0.0).unsqueeze(-1))  # NaN: no key and a sink of -inf
    lse.copy_(final)


def _ring_forward(q, k, v, alibi, ring: _Ring, plans, kw: dict, *, sinks: torch.Tensor | None = None,
                  communicate: bool = True, compute: bool = True):
    """The forward ring: (out in q's dtype, lse fp32 (fp64 for fp64 inputs), the sinks included). ``communicate=False``
    / ``compute=False`` leave out the transfers / the attention (the benchmark's overlap measurement)."""
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = torch.zeros(q.shape[:-1] + v.shape[-1:], dtype=acc, device=q.device)
    lse = torch.full(q.shape[:-1], float("-inf"), dtype=acc, device=q.device)
    kv = torch.cat((k, v), dim=-1)  # one message per step
    for step in range(ring.world):
        pending = _start(kv, ring, _TAG_KV) if communicate and step + 1 < ring.world else None
        for c in plans[(ring.rank - step) % ring.world] if compute else ():
            o_b, l_b = _attend(q, kv, c, alibi, kw)
            _merge(out[:, :, c.q0:c.q1], lse[:, :, c.q0:c.q1], o_b, l_b)
        if pending is not None:
            kv = _finish(pending, ring, "ring_attention forward")
    if sinks is not None:
        _add_sinks(out, lse, sinks)
    return out.to(q.dtype), lse


def _block_grads(q, kv, out, lse, dout, dlse, c: _Call, alibi, kw: dict):
    """(dq, dk, dv) of one call for the merged output: the block's share of the final (out, lse) is
    w = exp(l_b - lse), so its output gets w·dO and its lse w·(rowsum(dO·(o_b - out)) + dlse)."""
    leaves = [t.detach().requires_grad_() for t in (q[:, :, c.q0:c.q1], *_kv_block(kv, q.shape[-1], c))]
    with torch.enable_grad():
        o_b, l_b = attention(*leaves, causal=c.causal, causal_offset=c.offset, window=c.window,
                             alibi_slopes=alibi if c.alibi else None, return_lse=True, **kw)
    rows = slice(c.q0, c.q1)
    big = lse[:, :, rows]
    lb = l_b.detach().to(big.dtype)
    w = torch.where(torch.isneginf(lb), 0.0, torch.exp(lb - big))
    do = dout[:, :, rows].to(big.dtype)
    g_l = (do * (o_b.detach().to(big.dtype) - out[:, :, rows].to(big.dtype))).sum(-1)
    if dlse is not None:
        g_l = g_l + dlse[:, :, rows].to(big.dtype)
    g_o = (w.unsqueeze(-1) * do).to(o_b.dtype)
    return torch.autograd.grad((o_b, l_b), leaves, (g_o, (w * g_l).to(l_b.dtype)))


_BACKWARD = "ring_attention backward"


def _sink_grad(sinks: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, dout: torch.Tensor,
               dlse: torch.Tensor | None) -> torch.Tensor:
    """dsinks (Hq,) in sinks' dtype, from the final (out, lse): -sum over rows of p_sink (dO . O - dlse), p_sink =
    exp(sink - lse) the sink's share of each row (accumulated in lse's dtype, fp32 or fp64)."""
    sink = sinks.detach().to(lse.dtype).view(1, -1, 1)
    p_sink = torch.exp(sink - lse).nan_to_num_(0.0)  # NaN: no key and a sink of -inf
    row = (dout.to(lse.dtype) * out.to(lse.dtype)).sum(-1)
    if dlse is not None:
        row = row - dlse.to(lse.dtype)
    return -(p_sink * row).sum((0, 2)).to(sinks.dtype)


class RingAttentionFunction(torch.autograd.Function):
    """``apply(q, k, v, alibi, sinks, ring, plans, kw) -> (out, lse)``: the ring forward, and a backward that
    runs the ring again with dK/dV travelling (fp32) beside their K/V block. ``plans[s]`` are the calls
    for the block of source rank s; ``kw`` the attention keywords every call shares. The backward
    recomputes each block (``embedattn.attention`` under autograd), so it is exact on every backend; the
    sinks' gradient comes from the final (out, lse), once."""

    @staticmethod
    def forward(ctx, q, k, v, alibi, sinks, ring, plans, kw):
        out, lse = _ring_forward(q, k, v, alibi, ring, plans, kw, sinks=sinks)
        ctx.save_for_backward(q, k, v, out, lse, alibi, sinks)
        ctx.ring, ctx.plans, ctx.kw = ring, plans, kw
        ctx.set_materialize_grads(False)  # an unused lse (or out) costs nothing in the backward
        return out, lse

    @staticmethod
    @once_differentiable
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, alibi, sinks = ctx.saved_tensors
        if dout is None:  # still a ring step for every block: the peers wait on this rank's transfers
            dout = torch.zeros_like(out)
        dsinks = None if sinks is None else _sink_grad(sinks, out, lse, dout, dlse)
        ring, acc = ctx.ring, lse.dtype
        dq = torch.zeros(q.shape, dtype=acc, device=q.device)
        d = q.shape[-1]
        kv = torch.cat((k, v), dim=-1)
        pending_dkv = None  # the accumulator of the block we hold next, arriving from the previous rank
        for step in range(ring.world):
            pending_kv = _start(kv, ring, _TAG_KV) if step + 1 < ring.world else None
            dkv = torch.zeros(kv.shape, dtype=acc, device=kv.device)
            for c in ctx.plans[(ring.rank - step) % ring.world]:
                gq, gk, gv = _block_grads(q, kv, out, lse, dout, dlse, c, alibi, ctx.kw)
                dq[:, :, c.q0:c.q1] += gq
                dk_b, dv_b = _kv_block(dkv, d, c)
                dk_b += gk
                dv_b += gv
            if pending_dkv is not None:
                dkv += _finish(pending_dkv, ring, _BACKWARD)
            if ring.world > 1:  # after the last step this sends each block's gradient home
                pending_dkv = _start(dkv, ring, _TAG_DKV)
            if pending_kv is not None:
                kv = _finish(pending_kv, ring, _BACKWARD)
        if pending_dkv is not None:
            dkv = _finish(pending_dkv, ring, _BACKWARD)
        return (dq.to(q.dtype), dkv[..., :d].to(k.dtype), dkv[..., d:].to(v.dtype), None, dsinks, None, None, None)


# --------------------------------------------------------------------------------------------------
# public entries
# --------------------------------------------------------------------------------------------------
def _check_shard(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 4:
        raise ValueError(f"{name} must be 4-D (B, H, N_local, D), got shape {tuple(t.shape)}")


# what every rank must pass alike (compared across ranks by ``_agree``): name -> this rank's value
_RING_FIELDS = ("q shape (B, Hq, N_local, D)", "k shape (B, Hkv, N_local, D)", "v shape (B, Hkv, N_local, Dv)", "dtype",
                "device type", "causal", "load_balance", "window", "scale", "softcap", "alibi_slopes", "sinks")


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    group: dist.ProcessGroup | None = None,
    causal: bool = False,
    scale: float | None = None,
    window: tuple[int, int] | None = None,
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    load_balance: bool = False,
    return_lse: bool = False,
    timeout: float | None = None,
    sinks: torch.Tensor | None = None,
    backend: str | None = None,
):
    """Attention over a sequence sharded across the ranks of ``group`` (context parallelism).

    Every rank calls this with its shard; the result is this rank's shard of what
    ``embedattn.attention`` gives on the whole sequence (``causal`` aligned on the diagonal of the
    whole sequence), autograd included. The backward is collective too: every rank must run it
    (backpropagate through its output); a rank that skips it makes its peers fail (see ``timeout``).

    Args:
        q: (B, Hq, N_local, D), this rank's queries. k: (B, Hkv, N_local, D), v: (B, Hkv, N_local, Dv)
            (a value head dim of its own, MLA), Hq a multiple of Hkv (GQA: K/V travel and are read with Hkv
            heads, never copied per query head). Every
            rank holds the same N_local; without ``load_balance`` rank r holds the contiguous tokens
            [r·N_local, (r+1)·N_local) (see ``shard``).
        group: the process group (default: the world). Its backend must serve the tensors' device
            (gloo: CPU; NCCL: CUDA).
        causal, scale, window, softcap, alibi_slopes: as in ``embedattn.attention``, measured at global
            positions (ALiBi distances and the window cross shard boundaries). Every rank must pass the
            same values (compared across ranks, slopes included).
        load_balance: the zigzag layout: the sequence is cut into 2W chunks and rank r holds chunks
            r and 2W-1-r, concatenated, which evens out causal work. N_local must be even.
        return_lse: also return this rank's (B, Hq, N_local) natural-log log-sum-exp (float32,
            float64 for float64 inputs, the sink included, -inf on rows with no visible key and no sink); it
            is differentiable.
        timeout: seconds any rank waits on a peer (the argument exchange, each ring transfer of the
            forward and of the backward) before a RuntimeError saying which exchange stalled; None: the
            process group's own timeout.
        sinks: (Hq,) learned sink logits, as in ``embedattn.attention`` (differentiable): added once per row,
            when the blocks are merged. Every rank must pass the same values (compared across ranks).
        backend: as in ``embedattn.attention``, for every block.

    Returns:
        out (B, Hq, N_local, Dv) in q's dtype, or (out, lse) when ``return_lse``.

    Bad input on any rank (a bad argument, shards of different shapes or dtypes, tensors on a device the
    group's backend does not serve, different scales, softcaps, windows or slopes) raises on every rank,
    the same exception type with the same message (naming the rank, the shapes and dtypes): each call
    first all-gathers a few integers describing every rank's input.
    """
    ring = _ring(group)
    error, fields = None, {}
    try:
        ring = dataclasses.replace(ring, timeout=_timeout(timeout))
        for name, t in (("q", q), ("k", k), ("v", v)):
            _check_shard(name, t)
        _check_qkv(q, k, v)  # on the shards themselves: errors name their real shapes
        check_bool("load_balance", load_balance)
        check_bool("return_lse", return_lse)
        if not q.shape[2] == k.shape[2]:
            raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must hold the same tokens (N_local)")
        if q.device.type not in ring.device_types:
            raise ValueError(f"q, k, v are on {q.device}, but the group's backend "
                             f"({dist.get_backend(ring.group)}) serves {', '.join(ring.device_types)} tensors")
        spec = make_spec(q, n_keys=k.shape[2], causal=causal, scale=scale, window=window, softcap=softcap,
                         alibi_slopes=alibi_slopes, sinks=sinks)
        # the backend's own checks (what it runs), on zero tokens: no work
        attention(q[:, :, :0], k[:, :, :0], v[:, :, :0], causal=causal, scale=scale, window=window,
                  softcap=softcap, alibi_slopes=alibi_slopes, return_lse=True, sinks=sinks, backend=backend)
        slopes, sink_values = ((None if t is None else (tuple(t.shape), tuple(t.detach().double().flatten().tolist())))
                               for t in (alibi_slopes, sinks))
        values = (tuple(q.shape), tuple(k.shape), tuple(v.shape), str(q.dtype), q.device.type, causal, load_balance,
                  (spec.window_left, spec.window_right), spec.scale, spec.softcap, slopes, sink_values)
        fields = dict(zip(_RING_FIELDS, values))
    except Exception as e:  # raised below, on every rank together
        error = e
    _agree(ring, error, fields, _RING_FIELDS, "ring_attention")
    n_local = q.shape[2]
    if load_balance and n_local % 2:
        raise ValueError(f"load_balance=True cuts the sequence ({ring.world}·{n_local} tokens) into "
                         f"{2 * ring.world} equal chunks, so N_local must be even; got {n_local}")
    kw = dict(scale=scale, softcap=softcap, backend=backend)
    if q.numel() == 0 or k.numel() == 0:  # the same on every rank (checked above): no ring needed
        res = attention(q, k, v, causal=causal, window=window, alibi_slopes=alibi_slopes, return_lse=True,
                        sinks=sinks, **kw)
        return res if return_lse else res[0]
    plans = _plans(ring, n_local, load_balance, causal, window, alibi_slopes is not None)
    out, lse = RingAttentionFunction.apply(q, k, v, alibi_slopes, sinks, ring, plans, kw)
    return (out, lse) if return_lse else out


def _check_dim(x, dim) -> int:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() == 0:
        raise ValueError("x must have a sequence dimension, got a 0-d tensor")
    return check_int("dim", dim, low=-x.dim(), high=x.dim() - 1) % x.dim()


def shard(x: torch.Tensor, group: dist.ProcessGroup | None = None, load_balance: bool = False,
          dim: int = 2) -> torch.Tensor:
    """This rank's shard of the whole sequence ``x`` along ``dim``: the contiguous W-th of it, or with
    ``load_balance`` chunks r and 2W-1-r of 2W (the layout ``ring_attention`` expects). Differentiable;
    no communication (every rank passes the whole ``x``)."""
    ring = _ring(group)
    check_bool("load_balance", load_balance)
    dim = _check_dim(x, dim)
    parts = 2 * ring.world if load_balance else ring.world
    n = x.shape[dim]
    if n % parts:
        raise ValueError(f"x.shape[{dim}] = {n} does not split into {parts} equal chunks "
                         f"({'2 × ' if load_balance else ''}world size {ring.world})")
    c, r = n // parts, ring.rank
    if not load_balance:
        return x.narrow(dim, r * c, c)
    return torch.cat((x.narrow(dim, r * c, c), x.narrow(dim, (parts - 1 - r) * c, c)), dim)


_UNSHARD_FIELDS = ("dim", "dtype", "device type", "x.shape")


def unshard(x: torch.Tensor, group: dist.ProcessGroup | None = None, load_balance: bool = False,
            dim: int = 2) -> torch.Tensor:
    """The whole sequence from every rank's shard ``x`` (the inverse of ``shard``), on every rank.

    An all-gather: every rank must call it, with shards of one shape, dtype and device type (checked
    on every rank together). The result is not differentiable (it carries no autograd history)."""
    ring = _ring(group)
    error, fields = None, {}
    try:
        check_bool("load_balance", load_balance)
        dim = _check_dim(x, dim)
        if x.device.type not in ring.device_types:
            raise ValueError(f"x is on {x.device}, but the group's backend ({dist.get_backend(ring.group)}) "
                             f"serves {', '.join(ring.device_types)} tensors")
        if load_balance and x.shape[dim] % 2:
            raise ValueError(f"load_balance=True: each shard holds two equal chunks, so x.shape[{dim}] must be "
                             f"even, got {x.shape[dim]}")
        fields = dict(zip(_UNSHARD_FIELDS, (dim, str(x.dtype), x.device.type, tuple(x.shape))))
    except Exception as e:
        error = e
    _agree(ring, error, fields, _UNSHARD_FIELDS, "unshard")
    x = x.detach().contiguous()
    parts = [torch.empty_like(x) for _ in range(ring.world)]
    dist.all_gather(parts, x, group=ring.group)
    if not load_balance:
        return torch.cat(parts, dim)
    halves = [p.chunk(2, dim) for p in parts]
    return torch.cat([h[0] for h in halves] + [h[1] for h in reversed(halves)], dim)
