"""Skip-gram training pieces, all batched on the device: subsampling, pair generation, SGD steps."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def keep_probability(counts: torch.Tensor, sample: float) -> torch.Tensor:
    """gensim/word2vec.c frequent-word downsampling: P(keep w) = (sqrt(f/t) + 1) * t/f, capped at 1,
    with f the word's count and t = sample * (total retained words)."""
    counts = counts.double()
    if not sample:
        return torch.ones_like(counts)
    t = sample * counts.sum()
    return ((counts / t).sqrt() + 1) * t / counts


def skipgram_pairs(ids: torch.Tensor, sent: torch.Tensor, start: int, end: int, window: int,
                   generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Skip-gram pairs whose centre lies in positions [start, end) of ``ids``.

    Each centre draws its reduced window b in 1..window (word2vec.c's dynamic window); context
    positions within b of it and in the same sentence pair up. Returns (inputs, targets) like
    word2vec.c: the input row is the context word, the predicted (output) row the centre word.
    """
    n = ids.numel()
    dev = ids.device
    pos = torch.arange(start, end, device=dev)
    b = torch.randint(1, window + 1, (end - start,), device=dev, generator=generator)
    offs = torch.cat([torch.arange(-window, 0, device=dev), torch.arange(1, window + 1, device=dev)])
    q = pos[:, None] + offs[None, :]
    qc = q.clamp(0, n - 1)
    valid = (offs.abs()[None, :] <= b[:, None]) & (q >= 0) & (q < n) & (sent[qc] == sent[pos][:, None])
    pi, oi = valid.nonzero(as_tuple=True)
    return ids[qc[pi, oi]], ids[pos[pi]]


def torch_sgns_step(inputs, targets, negatives, w_in, w_out, lr: float, chunk: int = 2048) -> torch.Tensor:
    """The CPU fast path of ``sgns_step``: word2vec.c's update in batched PyTorch, in chunks of pairs
    small enough to stay in cache. Within a chunk every update is computed from the same snapshot
    and summed with index_add_ (minibatch SGD with sum reduction); chunks apply in order. Returns the
    summed loss of the pairs (before their update) as a 0-d float64 tensor."""
    total = torch.zeros((), dtype=torch.float64, device=w_in.device)
    D = w_in.shape[1]
    K1 = negatives.shape[1] + 1
    for s in range(0, inputs.numel(), chunk):
        inp = inputs[s:s + chunk]
        ids = torch.cat([targets[s:s + chunk, None], negatives[s:s + chunk]], 1).reshape(-1)
        P = inp.numel()
        # index_select, not advanced indexing: several times faster on the CPU
        v = w_in.index_select(0, inp)  # (P, D)
        u = w_out.index_select(0, ids).view(P, K1, D)
        score = (u * v[:, None, :]).sum(-1)  # (P, K+1)
        score[:, 1:].neg_()  # the positive wants a large score, the negatives a small one
        total += F.logsigmoid(score).sum().neg()
        # g = (label - σ(raw score)) * lr = ±σ(-score) * lr
        g = torch.sigmoid(score.neg_()).mul_(lr)
        g[:, 1:].neg_()
        dv = torch.bmm(g[:, None, :], u).squeeze(1)
        w_out.index_add_(0, ids, (g[:, :, None] * v[:, None, :]).view(-1, D))
        w_in.index_add_(0, inp, dv)
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
