"""Training pieces. The minibatch trainer (skip-gram), batched on the device: subsampling, pair
generation, SGD steps. The kernel trainer's algorithm, as the NumPy reference its kernels are tested
against (below: ``train_chunks_reference``), with its Philox draws and the corpus cut into chunks."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def keep_probability(counts: torch.Tensor, sample: float) -> torch.Tensor:
    """gensim/word2vec.c frequent-word downsampling: P(keep w) = (sqrt(f/t) + 1) * t/f, capped at 1,
    with f the word's count and t = sample * (total retained words); gensim's shorthand ``sample >= 1``
    sets t = int(sample * (3 + sqrt 5) / 2), downsampling the words counted more than ``sample`` times."""
    counts = counts.double()
    if not sample:
        return torch.ones_like(counts)
    t = sample * counts.sum() if sample < 1 else float(int(sample * (3 + 5 ** 0.5) / 2))
    return (((counts / t).sqrt() + 1) * t / counts).clamp(max=1.0)


def skipgram_pairs(ids: torch.Tensor, sent: torch.Tensor, start: int, end: int, window: int,
                   generator: torch.Generator | None, splits: list[int] | None = None,
                   shrink_windows: bool = True):
    """Skip-gram pairs whose centre lies in positions [start, end) of ``ids``.

    Each centre draws its reduced window b in 1..window (word2vec.c's dynamic window); context
    positions within b of it and in the same sentence pair up. Returns (inputs, targets) like
    word2vec.c: the input row is the context word, the predicted (output) row the centre word.
    Pairs come in centre order. ``splits`` (increasing positions from ``start`` to ``end``): also
    return the pair offsets where each split position begins, a list (one host sync in all).
    ``shrink_windows=False`` (gensim's option): every centre uses the full ``window``.
    """
    n = ids.numel()
    dev = ids.device
    pos = torch.arange(start, end, device=dev)
    if shrink_windows:
        b = torch.randint(1, window + 1, (end - start,), device=dev, generator=generator)
    else:
        b = torch.full((end - start,), window, device=dev)
    offs = torch.cat([torch.arange(-window, 0, device=dev), torch.arange(1, window + 1, device=dev)])
    q = pos[:, None] + offs[None, :]
    qc = q.clamp(0, n - 1)
    valid = (offs.abs()[None, :] <= b[:, None]) & (q >= 0) & (q < n) & (sent[qc] == sent[pos][:, None])
    pi, oi = valid.nonzero(as_tuple=True)
    if splits is None:
        return ids[qc[pi, oi]], ids[pos[pi]]
    offsets = torch.searchsorted(pi, torch.tensor(splits, device=dev) - start).tolist()
    return ids[qc[pi, oi]], ids[pos[pi]], offsets


def _step_math(inp, ids, keep, w_in, w_out, lr):
    """One minibatch of word2vec.c updates from one snapshot of the tables; ``ids`` (P, K+1) has the
    target in column 0, ``keep`` (P, K+1) zeroes skipped columns. Returns the summed loss."""
    P, K1 = ids.shape
    D = w_in.shape[1]
    v = w_in.index_select(0, inp)  # index_select, not advanced indexing: much faster on the CPU
    u = w_out.index_select(0, ids.reshape(-1)).view(P, K1, D)
    sign = torch.where(torch.arange(K1, device=ids.device) == 0, 1.0, -1.0)
    z = (u * v[:, None, :]).sum(-1) * sign  # the target wants a large score, negatives a small one
    loss = -(F.logsigmoid(z) * keep).sum()
    g = torch.sigmoid(-z) * sign * keep * lr  # = (label - σ(score)) * lr
    dv = (g[:, :, None] * u).sum(1)
    w_out.index_add_(0, ids.reshape(-1), (g[:, :, None] * v[:, None, :]).reshape(-1, D))
    w_in.index_add_(0, inp, dv)
    return loss


def _ids_keep(targets, negatives):
    ids = torch.cat([targets[:, None], negatives], 1)
    keep = ids != targets[:, None]  # like word2vec.c, a negative equal to the target is skipped
    keep[:, 0] = True
    return ids, keep.to(torch.float32)


def torch_sgns_step(inputs, targets, negatives, w_in, w_out, lr: float, chunk: int = 256) -> torch.Tensor:
    """The CPU path of ``sgns_step`` in eager PyTorch, ``chunk`` pairs at a time. Within a chunk
    every update is computed from the same snapshot and summed (minibatch SGD, sum reduction);
    chunks apply in order. Returns the summed loss of the pairs (before their update), 0-d."""
    total = torch.zeros((), dtype=torch.float64, device=w_in.device)
    for s in range(0, inputs.numel(), chunk):
        ids, keep = _ids_keep(targets[s:s + chunk], negatives[s:s + chunk])
        total += _step_math(inputs[s:s + chunk], ids, keep, w_in, w_out, lr)
    return total


def _group_step(inp, tgt, neg, w_in, w_out, lr, chunk: int):
    """``_step_math`` over consecutive ``chunk``-pair slices, in order (unrolled when compiled)."""
    total = torch.zeros((), dtype=torch.float32, device=w_in.device)
    for s in range(0, inp.shape[0], chunk):
        ids, keep = _ids_keep(tgt[s:s + chunk], neg[s:s + chunk])
        total = total + _step_math(inp[s:s + chunk], ids, keep, w_in, w_out, lr)
    return total


class CompiledStep:
    """The CPU fast path: ``_step_math`` compiled by torch.compile (Inductor's C++ codegen fuses the
    gathers, dots, sigmoids and scatter-adds). One call runs ``group`` chunks in order, on fixed
    shapes so it compiles once; a remainder shorter than one group runs eagerly.
    ``ok`` is False (use ``torch_sgns_step``) when compiling fails, e.g. without a C++ compiler."""

    def __init__(self, w_in, w_out, negative: int, chunk: int = 256, group: int = 4,
                 cpp_wrapper: bool = True) -> None:
        self.chunk, self.group, self.ok = chunk, group, False
        self.size = chunk * group
        try:
            # cpp_wrapper: the compiled graph runs in C++ without the GIL, so worker threads overlap
            self.fn = torch.compile(_group_step, dynamic=False, fullgraph=True,
                                    options={"cpp_wrapper": cpp_wrapper})
            n = self.size
            z = torch.zeros(n, dtype=torch.long)
            # compile now; with lr = 0 (and every negative equal to its target, so masked) the
            # warm-up call changes nothing. Inputs and targets are distinct tensors, as in training: one
            # tensor for both made Dynamo guard on `inp is tgt`, so the first training calls recompiled,
            # from both worker threads at once, which torch 2.13 answers with "fullgraph=True found no
            # compiled frames"
            self.fn(z, z.clone(), torch.zeros(n, negative, dtype=torch.long), w_in, w_out, torch.tensor(0.0), chunk)
            self.ok = True
        except Exception as e:  # noqa: BLE001 (any compiler failure means: run eager)
            import warnings

            warnings.warn(f"torch.compile of the word2vec step failed, using eager PyTorch: {e}", stacklevel=2)

    def __call__(self, inputs, targets, negatives, w_in, w_out, lr: float) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float64)
        lr_t = torch.tensor(float(lr))  # a tensor, so a new learning rate does not recompile
        n, c = inputs.numel(), self.size
        full = n - n % c
        for s in range(0, full, c):
            total += self.fn(inputs[s:s + c], targets[s:s + c], negatives[s:s + c], w_in, w_out, lr_t,
                             self.chunk)
        if full < n:  # the remainder (fewer than one group) runs eagerly, same chunking
            total += torch_sgns_step(inputs[full:], targets[full:], negatives[full:], w_in, w_out, lr,
                                     self.chunk)
        return total


def autograd_sgns_step(inputs, targets, negatives, w_in, w_out, lr: float, backend=None) -> torch.Tensor:
    """The flexible path: ``negative_sampling_loss`` (sum reduction, sparse gradients) + plain SGD.
    Any loss variant written with autograd can replace it; the update equals one minibatch step."""
    from ..negative_sampling import negative_sampling_loss

    a = w_in.detach().requires_grad_()
    b = w_out.detach().requires_grad_()
    loss = negative_sampling_loss(inputs, targets, negatives, a, b, reduction="sum", sparse=True,
                                  check_bounds=False, backend=backend)
    loss.backward()
    with torch.no_grad():
        for w, g in ((w_in, a.grad), (w_out, b.grad)):
            g = g.coalesce()
            w.index_add_(0, g.indices()[0], g.values(), alpha=-lr)
    return loss.detach().double()


# ----------------------------------------------------------------------------- the sentence-walking trainer
# One algorithm, three implementations that draw the same random numbers: this NumPy reference (the
# oracle, slow), the C kernel of the CPU path (``_cpu.py``) and the Triton kernel (``kernels/word2vec.py``).
#
# The corpus of one epoch is a token array cut into chunks (sentences, or pieces of a long sentence);
# a chunk is walked word by word in order, so updates within it are sequential SGD as in word2vec.c,
# and chunks run concurrently (Hogwild) in the kernels. Per chunk: frequent words are dropped with
# gensim's keep probability, then each kept word in turn is the centre of a window of b kept words on
# either side (b uniform in 1..window). The input rows of the window stay held (the kernels keep them
# in registers) from when they come within ``window`` words ahead of the centre until they leave the
# window behind it; then their change is added back to the table. Skip-gram trains the centre's output
# row, held across its window, against each context row in order, with ``negative`` fresh negatives
# per pair written back at once (word2vec.c), or with one set of negatives per centre held across the
# window like the centre's row (``shared_negatives``, Wombat / word2vec-acc's reuse). CBOW trains the
# centre's output row and its negatives against the window's mean (or sum) once per centre.
#
# Random numbers come from Philox4x32-10 (Triton's ``tl.randint4x``) keyed by the seed, with one
# counter block of ``2 + 2 * window * negative`` per corpus position and epoch: the keep test of the
# word at position p uses counter (base + p) * stride; the centre at kept index m of a chunk starting
# at lo uses (base + lo + m) * stride + 1 for its window and + 2 + t * negative + k for the k-th
# negative of its t-th pair. So the draws do not depend on how the corpus is sliced or scheduled. The
# learning rate decays linearly with the corpus position over all epochs (gensim's schedule).

PHILOX_ROUND_A, PHILOX_ROUND_B = 0xD2511F53, 0xCD9E8D57
PHILOX_KEY_A, PHILOX_KEY_B = 0x9E3779B9, 0xBB67AE85


def philox(seed: int, counters) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Philox4x32-10 of int64 ``counters`` under a 64-bit ``seed``: the four uint32 words Triton's
    ``tl.randint4x(seed, counters)`` returns (counter = (lo, hi, 0, 0), key = (seed lo, seed hi))."""
    m32 = np.uint64(0xFFFFFFFF)
    ctr = np.asarray(counters, dtype=np.int64).view(np.uint64)
    c0, c1 = ctr & m32, ctr >> np.uint64(32)
    c2, c3 = np.zeros_like(c0), np.zeros_like(c0)
    k0, k1 = np.uint64(seed & 0xFFFFFFFF), np.uint64((seed >> 32) & 0xFFFFFFFF)
    a, b = np.uint64(PHILOX_ROUND_A), np.uint64(PHILOX_ROUND_B)
    for _ in range(10):
        pb, pa = b * c2, a * c0  # < 2**64: exact in uint64
        c0, c2 = (pb >> np.uint64(32)) ^ c1 ^ k0, (pa >> np.uint64(32)) ^ c3 ^ k1
        c1, c3 = pb & m32, pa & m32
        k0, k1 = (k0 + np.uint64(PHILOX_KEY_A)) & m32, (k1 + np.uint64(PHILOX_KEY_B)) & m32
    return tuple(x.astype(np.uint32) for x in (c0, c1, c2, c3))


def unit_float(r: np.ndarray) -> np.ndarray:
    """uint32 -> float32 uniform in [0, 1) from the top 24 bits (exact in float32)."""
    return (r >> np.uint32(8)).astype(np.float32) * np.float32(2.0 ** -24)


def below(r: np.ndarray, n: int) -> np.ndarray:
    """uint32 -> int in [0, n): (r * n) >> 32."""
    return ((r.astype(np.uint64) * np.uint64(n)) >> np.uint64(32)).astype(np.int64)


def counter_stride(window: int, negative: int) -> int:
    """Philox counters reserved per corpus position: the keep test, the window, 2 * window * negative."""
    return 2 + 2 * window * negative


def chunk_bounds(sent: np.ndarray, max_words: int) -> np.ndarray:
    """Chunk starts (and the end) of a corpus whose token i is in sentence ``sent[i]`` (non-decreasing):
    each sentence, cut into pieces of at most ``max_words`` words. Windows never cross a chunk."""
    sent = np.asarray(sent)
    n = len(sent)
    if n == 0:
        return np.zeros(1, dtype=np.int64)
    starts = np.flatnonzero(np.r_[True, sent[1:] != sent[:-1]])
    pieces = -(-np.diff(np.r_[starts, n]) // max_words)
    first = np.repeat(np.cumsum(pieces) - pieces, pieces)
    return np.r_[np.repeat(starts, pieces) + (np.arange(pieces.sum()) - first) * max_words, n].astype(np.int64)


def _neg_ids(seed, ctr, negative, alias_prob, alias):
    """``negative`` ids drawn with the alias table from counters ctr, ctr + 1, ..."""
    r0, r1, _, _ = philox(seed, ctr + np.arange(negative))
    i = below(r0, len(alias_prob))
    return np.where(unit_float(r1) < alias_prob[i], i, alias[i])


def _nll(z):
    """-log sigmoid(z), stable."""
    return np.maximum(-z, 0) + np.log1p(np.exp(-np.abs(z)))


def _objective_step(u, h, label, lr, live, stats):
    """word2vec.c's update of one input ``h`` against output rows ``u`` with targets ``label``
    (negative sampling: the positive row then the negatives; hierarchical softmax: the nodes of a Huffman
    path, label 1 - code): the scaled gradient g per row (0 where ``live`` is off), the loss added to
    ``stats``, and h's own gradient g @ u."""
    s = u @ h
    g = (label - 1 / (1 + np.exp(-s))) * lr * live
    stats[0] += (_nll(np.where(label > 0, s, -s)) * live).sum()
    return g, g @ u


HS_MAX_EXP = 6.0  # hierarchical softmax skips a node whose score is saturated (word2vec.c's MAX_EXP)


def huffman_arrays(codes, points) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-word Huffman codes and node ids (gensim's ``code``/``point`` attributes) flattened for the
    kernels: (offsets int64 [V + 1], node ids int32, codes uint8); word w's path is offsets[w]:offsets[w + 1]."""
    lens = np.fromiter((len(c) for c in codes), dtype=np.int64, count=len(codes))
    off = np.zeros(len(codes) + 1, dtype=np.int64)
    np.cumsum(lens, out=off[1:])
    pts = np.concatenate([np.asarray(p, dtype=np.int32) for p in points]) if len(points) else np.zeros(0, np.int32)
    cds = np.concatenate([np.asarray(c, dtype=np.uint8) for c in codes]) if len(codes) else np.zeros(0, np.uint8)
    return off, pts, cds


def train_chunks_reference(tokens, bounds, chunks, keep_prob, alias_prob, alias, w_in, w_out, *, seed: int,
                           pos_base: int, lr_start: float, lr_end: float, total_words: float, window: int,
                           negative: int, sg: bool = True, cbow_mean: bool = True, shared_negatives: bool = False,
                           shrink_windows: bool = True, w_hs=None, hs_off=None, hs_points=None, hs_codes=None,
                           lockf=None) -> np.ndarray:
    """The trainer's algorithm (see above) in NumPy, one word at a time: the chunks ``chunks`` (indices
    into ``bounds``) in order, updating the numpy tables ``w_in``/``w_out`` (and ``w_hs``) in place (float64
    tables make it the oracle of the fp32 kernels). ``negative=0``: no negative sampling (``w_out``
    unused). ``w_hs`` with ``hs_off``/``hs_points``/``hs_codes`` (``huffman_arrays``): hierarchical softmax,
    the centre word's Huffman path walked per pair (skip-gram) or per centre (CBOW), its node rows held over
    the window like the centre's output row; with negatives too, the two gradients of the input add up.
    ``lockf`` (per word): the factor on each update of an input row (gensim's ``vectors_lockf``; 0 locks
    a row). Returns [summed loss, pairs trained, kept words]."""
    W, K = window, negative
    hs = w_hs is not None
    stride = counter_stride(W, K)
    stats = np.zeros(3)
    label = np.r_[1.0, np.zeros(K)]
    for c in chunks:
        lo, hi = int(bounds[c]), int(bounds[c + 1])
        toks = tokens[lo:hi]
        r0 = philox(seed, (pos_base + np.arange(lo, hi)) * stride)[0]
        words = toks[unit_float(r0) < keep_prob[toks]]
        n = len(words)
        stats[2] += n
        held, loaded = {}, {}  # kept index -> its input row, as held and as loaded
        for j in range(min(W, n)):
            held[j], loaded[j] = w_in[words[j]].copy(), w_in[words[j]].copy()
        for m in range(n):
            if m - W - 1 >= 0:  # the row leaving the window goes back: its change is added
                jo = m - W - 1
                w_in[words[jo]] += held.pop(jo) - loaded.pop(jo)
            if m + W < n:  # the row entering it is loaded
                held[m + W], loaded[m + W] = w_in[words[m + W]].copy(), w_in[words[m + W]].copy()
            ctr = (pos_base + lo + m) * stride
            b = int(below(philox(seed, ctr + 1)[0], W)) + 1 if shrink_windows else W
            lr = max(lr_end, lr_start - (lr_start - lr_end) * (pos_base + lo + m) / total_words)
            cw = int(words[m])
            context = [j for j in range(max(0, m - b), min(n, m + b + 1)) if j != m]
            if not context:
                continue
            if hs:  # the centre's Huffman path: node rows (held over the window) and their labels 1 - code
                pts = hs_points[hs_off[cw]:hs_off[cw + 1]]
                hl = 1.0 - hs_codes[hs_off[cw]:hs_off[cw + 1]].astype(np.float64)
                uh = w_hs[pts].copy()
                uh0 = uh.copy()
            if sg:
                ids = np.r_[cw, _neg_ids(seed, ctr + 2, K, alias_prob, alias)]
                u = w_out[ids].copy() if K else None  # the centre's output row (and the shared negatives), held
                u0 = u.copy() if K else None
                for j in context:
                    t = j - m + W - (j > m)  # the pair's counter block, 0 .. 2 * window - 1
                    v = held[j]
                    neu1e = np.zeros_like(v)
                    if K:
                        if not shared_negatives:
                            ids[1:] = _neg_ids(seed, ctr + 2 + t * K, K, alias_prob, alias)
                            u[1:] = w_out[ids[1:]]
                        live = np.r_[True, ids[1:] != cw]  # word2vec.c skips a negative equal to the centre
                        g, neu1e = _objective_step(u, v, label, lr, live, stats)
                        du = np.outer(g, v)
                        u += du
                        if not shared_negatives:
                            np.add.at(w_out, ids[1:], du[1:])
                    if hs:  # nodes with a saturated score (|f| >= 6) are skipped, as word2vec.c and gensim
                        gh, eh = _objective_step(uh, v, hl, lr, np.abs(uh @ v) < HS_MAX_EXP, stats)
                        uh += np.outer(gh, v)
                        neu1e = neu1e + eh
                    stats[1] += 1
                    held[j] += (1.0 if lockf is None else lockf[words[j]]) * neu1e
                if K:
                    back = slice(None) if shared_negatives else slice(0, 1)  # the rows held over the window
                    np.add.at(w_out, ids[back], (u - u0)[back])
            else:
                h = np.sum([held[j] for j in context], axis=0)
                if cbow_mean:
                    h = h / len(context)
                neu1e = np.zeros_like(h)
                if K:
                    ids = np.r_[cw, _neg_ids(seed, ctr + 2, K, alias_prob, alias)]
                    live = np.r_[True, ids[1:] != cw]
                    g, neu1e = _objective_step(w_out[ids], h, label, lr, live, stats)
                    np.add.at(w_out, ids, np.outer(g, h))
                if hs:
                    gh, eh = _objective_step(uh, h, hl, lr, np.abs(uh @ h) < HS_MAX_EXP, stats)
                    uh += np.outer(gh, h)
                    neu1e = neu1e + eh
                stats[1] += 1
                if not cbow_mean:
                    neu1e = neu1e / len(context)
                for j in context:
                    held[j] += (1.0 if lockf is None else lockf[words[j]]) * neu1e
            if hs:
                w_hs[pts] += uh - uh0  # a path's nodes are distinct
        for j in sorted(held):
            w_in[words[j]] += held.pop(j) - loaded.pop(j)
    return stats
