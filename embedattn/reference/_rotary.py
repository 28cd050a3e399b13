"""Reference rotary position embedding: short, obviously right, differentiable, float64-capable."""

from __future__ import annotations

import torch


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    """The rotation itself: the first ``rotary_dim = 2 * cos.shape[-1]`` features of x turned by the angles
    whose cos/sin broadcast against them (``(..., rotary_dim / 2)``), the rest passed through; pairs
    (j, j + rotary_dim/2), or (2j, 2j + 1) with ``interleaved``."""
    rd = 2 * cos.shape[-1]
    if interleaved:
        x0, x1 = x[..., 0:rd:2], x[..., 1:rd:2]
        rot = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)
    else:
        x0, x1 = x[..., : rd // 2], x[..., rd // 2 : rd]
        rot = torch.cat((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return torch.cat((rot, x[..., rd:]), dim=-1)


def _rows(table: torch.Tensor, pos: torch.Tensor, fill: float) -> torch.Tensor:
    """``table[pos]``, with ``fill`` in the rows of positions outside the table."""
    inside = (pos >= 0) & (pos < table.shape[0])
    if table.shape[0] == 0:
        return table.new_full((*pos.shape, table.shape[1]), fill)
    rows = table[torch.where(inside, pos, 0)]
    return torch.where(inside.unsqueeze(-1), rows, torch.full_like(rows, fill))


def rotary(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    interleaved: bool = False,
    inplace: bool = False,
    seqlen_offsets: int | torch.Tensor = 0,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
    *,
    heads_first: bool = False,
    upcast: bool = True,
) -> torch.Tensor:
    """Rotate the first ``rotary_dim = 2 * cos.shape[1]`` features of ``x``; the rest pass through.

    x: (B, S, H, D), or (B, H, S, D) with ``heads_first``; with ``cu_seqlens`` (B + 1,) the packed
    (total, H, D) (or (H, total, D)) form, sequence b being rows ``cu_seqlens[b]:cu_seqlens[b+1]``
    (``max_seqlen`` is not needed here). Token s of sequence b sits at position ``s + offset[b]``
    (``seqlen_offsets`` an int or a (B,) tensor) and is rotated by ``cos/sin[position]`` (S_ro, rotary_dim/2):
    pairs (j, j + rotary_dim/2) (GPT-NeoX), or (2j, 2j + 1) with ``interleaved`` (GPT-J).
    A position outside ``[0, S_ro)`` is rotated by the identity (cos 1, sin 0), as in the kernel
    (``embedattn.rotary`` checks positions unless ``check_bounds`` is off). ``cu_seqlens`` must be a
    partition of x's rows (0 = cu[0] <= ... <= cu[-1] = total); ``embedattn.rotary`` makes an unchecked
    one so first. ``inplace`` copies the result into x and returns x.
    ``upcast=True`` computes half types in float32 and casts back (what the kernels promise);
    ``upcast=False`` computes in x's dtype with cos/sin cast to it (the "plain PyTorch" baseline).
    """
    dtype = x.dtype
    cdtype = torch.float32 if upcast and dtype in (torch.float16, torch.bfloat16) else dtype
    seq_dim = (1 if cu_seqlens is None else 0) if not heads_first else (2 if cu_seqlens is None else 1)
    xs = x.movedim(seq_dim, -3).to(cdtype)  # (..., S, H, D): sequence then heads
    if cu_seqlens is None:
        b, s = xs.shape[0], xs.shape[1]
        offsets = torch.as_tensor(seqlen_offsets, device=x.device).expand(b)
        pos = torch.arange(s, device=x.device) + offsets[:, None]  # (B, S)
    else:
        lens = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
        offsets = torch.as_tensor(seqlen_offsets, device=x.device).expand(lens.shape[0])
        seq = torch.repeat_interleave(torch.arange(lens.shape[0], device=x.device), lens, output_size=xs.shape[0])
        pos = torch.arange(xs.shape[0], device=x.device) - cu_seqlens[seq].long() + offsets[seq]  # (total,)
    c = _rows(cos.to(cdtype), pos, 1.0).unsqueeze(-2)  # (..., S, 1, rotary_dim/2)
    s_ = _rows(sin.to(cdtype), pos, 0.0).unsqueeze(-2)
    out = rotate(xs, c, s_, interleaved).movedim(-3, seq_dim).to(dtype)
    return x.copy_(out) if inplace else out
