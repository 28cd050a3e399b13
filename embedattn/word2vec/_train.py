"""Skip-gram training pieces, all batched on the device: subsampling, pair generation, SGD steps."""

from __future__ import annotations

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
            # warm-up call changes nothing
            self.fn(z, z, torch.zeros(n, negative, dtype=torch.long), w_in, w_out, torch.tensor(0.0), chunk)
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
