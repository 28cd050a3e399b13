"""Reference skip-gram negative-sampling loss: short, obviously right, differentiable, float64-capable."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def negative_sampling_loss(
    center: torch.Tensor,
    context: torch.Tensor,
    negatives: torch.Tensor,
    in_weight: torch.Tensor,
    out_weight: torch.Tensor,
    *,
    reduction: str = "mean",
    sparse: bool = False,
    upcast: bool = True,
    drop_bad_ids: bool = False,
) -> torch.Tensor:
    """loss_b = -log σ(u[context_b]·v[center_b]) - Σ_k log σ(-u[negatives_bk]·v[center_b]).

    ``v = in_weight``, ``u = out_weight``, both (V, D); center/context (B,), negatives (B, K).
    ``upcast=True`` computes in float32 for 16-bit tables (float64 stays float64) and returns the
    loss in that compute dtype; ``upcast=False`` stays in the table dtype (the "plain PyTorch"
    baseline of the tests). ``sparse=True`` makes autograd produce sparse COO table gradients.
    It gathers a (B, K, D) tensor: fine for a reference, which is what the Triton kernels avoid.
    ``drop_bad_ids=True``: an id outside [0, V) reads row 0 and its score passes no gradient (a bad center
    drops its whole pair, a bad context or negative its column), as in the kernels without a bounds check;
    otherwise it is an IndexError.
    """
    keep = None
    if drop_bad_ids:
        n = in_weight.shape[0]
        ids = torch.cat([context.unsqueeze(1), negatives], dim=1)
        good_c = (center >= 0) & (center < n)
        keep = (ids >= 0) & (ids < n) & good_c.unsqueeze(1)  # (B, K + 1): which scores pass a gradient
        center, context, negatives = (torch.where((t >= 0) & (t < n), t, 0) for t in (center, context, negatives))
    v = F.embedding(center, in_weight, sparse=sparse)  # (B, D)
    u_pos = F.embedding(context, out_weight, sparse=sparse)  # (B, D)
    u_neg = F.embedding(negatives, out_weight, sparse=sparse)  # (B, K, D)
    if upcast and v.dtype in (torch.float16, torch.bfloat16):
        v, u_pos, u_neg = v.float(), u_pos.float(), u_neg.float()
    pos = (u_pos * v).sum(-1)
    neg = (u_neg * v.unsqueeze(1)).sum(-1)
    if keep is not None:
        pos = torch.where(keep[:, 0], pos, pos.detach())
        neg = torch.where(keep[:, 1:], neg, neg.detach())
    # logsigmoid is the stable form: min(x, 0) - log1p(exp(-|x|)), exact for logits of any size
    loss = -F.logsigmoid(pos) - F.logsigmoid(-neg).sum(-1)
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss
