"""Reference token embedding + positional add: short, obviously right, differentiable, float64-capable."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def sinusoidal_positions(positions: torch.Tensor, dim: int,
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Vaswani et al. encoding for integer ``positions`` (any shape) -> ``positions.shape + (dim,)``.

    PE[p, 2i] = sin(p / 10000^(2i/dim)), PE[p, 2i+1] = cos(p / 10000^(2i/dim)); an odd ``dim`` ends with a
    sine column. Computed in float64 whatever ``dtype`` and returned in ``dtype``: a float32 angle
    p * 10000^(-2i/dim) is off by up to p * 2^-24 rad (4e-3 at p = 1e5, ~1 at p = 2^24), float64 keeps it
    near 1e-9 up to 2^24, like the kernel.
    """
    col = torch.arange(dim, device=positions.device)
    inv_freq = torch.exp((col - col % 2).to(torch.float64) * (-math.log(10000.0) / dim))  # 10000^(-2i/dim)
    angle = positions.to(torch.float64).unsqueeze(-1) * inv_freq
    pe = torch.where(col % 2 == 0, torch.sin(angle), torch.cos(angle))
    return pe.to(dtype)


def default_positions(ids: torch.Tensor, position_offset: int = 0) -> torch.Tensor:
    """``arange(N) + position_offset`` along the last dimension of ``ids``, broadcast to ``ids.shape``."""
    n = ids.shape[-1]
    return (torch.arange(n, device=ids.device) + position_offset).expand(ids.shape)


def _lookup(table: torch.Tensor, ids: torch.Tensor, padding_idx: int | None, drop_bad_ids: bool) -> torch.Tensor:
    """``table[ids]``; with ``drop_bad_ids`` an id outside [0, rows) reads row 0 and passes no gradient
    (what the kernels do when the bounds check is off)."""
    if not drop_bad_ids:
        return F.embedding(ids, table, padding_idx=padding_idx)
    good = (ids >= 0) & (ids < table.shape[0])
    rows = F.embedding(torch.where(good, ids, 0), table, padding_idx=padding_idx)
    return torch.where(good.unsqueeze(-1), rows, rows.detach())


def embedding(
    ids: torch.Tensor,
    weight: torch.Tensor,
    pos_weight: torch.Tensor | None = None,
    *,
    sinusoidal: bool = False,
    scale: float = 1.0,
    padding_idx: int | None = None,
    position_offset: int = 0,
    positions: torch.Tensor | None = None,
    upcast: bool = True,
    drop_bad_ids: bool = False,
) -> torch.Tensor:
    """``weight[ids] * scale + P`` with P = ``pos_weight[positions]``, the sinusoidal encoding, or 0.

    ``positions`` defaults to ``arange(N) + position_offset`` along the last dimension of ``ids``.
    ``padding_idx`` works as in ``nn.Embedding``: the row is returned by the lookup but gets no gradient.
    ``upcast=True`` computes half types in float32 and casts back (what the kernels promise);
    ``upcast=False`` stays in the table dtype (the "plain PyTorch" baseline of the tests).
    ``drop_bad_ids=True``: an id (or explicit position into ``pos_weight``) outside its table reads row 0
    and its gradient is dropped, as in the kernels without a bounds check; otherwise it is an IndexError.
    """
    dtype = weight.dtype
    cdtype = torch.float32 if upcast and dtype in (torch.float16, torch.bfloat16) else dtype
    if ids.dtype not in (torch.int32, torch.int64):  # F.embedding takes int32/int64 only
        ids = ids.long()
    if positions is None:
        positions = default_positions(ids, position_offset)
    elif positions.dtype not in (torch.int32, torch.int64):
        positions = positions.long()
    if padding_idx is not None and padding_idx < 0:
        padding_idx += weight.shape[0]
    out = _lookup(weight.to(cdtype), ids, padding_idx, drop_bad_ids)
    if scale != 1.0:
        out = out * scale
    if pos_weight is not None:
        out = out + _lookup(pos_weight.to(cdtype), positions, None, drop_bad_ids)
    elif sinusoidal:
        out = out + sinusoidal_positions(positions, weight.shape[1], cdtype)
    return out.to(dtype)
