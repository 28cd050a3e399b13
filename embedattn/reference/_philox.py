"""The Triton attention kernels' dropout draw, in plain PyTorch: the same keep mask, bit for bit.

The kernels keep entry (b, h, i, j) iff ``tl.rand(seed, ((b * H + h) * MQ + i) * MK + j) >= dropout_p``
(kernels/attention.py, ``_keep``), where H counts query heads (GQA draws per query head), MQ, MK are
Nq, Nk for dense launches and max_seqlen_q, max_seqlen_k for varlen ones (i, j then count from the
start of sequence b). ``tl.rand`` (triton/language/random.py, the same in 3.6 through 3.9) is
Philox4x32-10 with key (seed low 32 bits, seed high 32 bits) and counter (offset low 32 bits, offset
high 32 bits, 0, 0); its first output word x, read as int32 and folded (x < 0 -> ~x), times
4.6566127342e-10 in float32, is the uniform draw, compared with dropout_p in float32.

Everything here is int64 arithmetic on values below 2**49 (no overflow, so no reliance on wrapping),
vectorized over the elements, on any device, traceable by torch.compile; the seed may be a one-element
int64 tensor (read on its device, no host sync) or an int.
"""

from __future__ import annotations

import torch

_M32 = 0xFFFFFFFF
_M16 = 0xFFFF
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85  # Philox's Weyl key increments
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57  # Philox4x32 multipliers
_ROUNDS = 10  # tl.rand's default n_rounds
_UNIFORM_SCALE = 4.6566127342e-10  # triton's uint_to_uniform_float for 32-bit words
# elements per eager chunk: the int64 temporaries (~10 live) stay within a CPU's L2 (2**16 measured fastest)
_CHUNK = 1 << 16


def _mulhilo(a: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit words of a * x for a 32-bit constant a and x in [0, 2**32): x split in 16-bit
    halves so every product stays below 2**49 (int64 multiplication never wraps)."""
    p_lo = a * (x & _M16)
    mid = a * (x >> 16) + (p_lo >> 16)  # a * x == mid * 2**16 + (p_lo & 0xFFFF)
    return mid >> 16, ((mid & _M16) << 16) | (p_lo & _M16)


def _seed_words(seed: torch.Tensor | int, device) -> tuple[torch.Tensor, torch.Tensor, torch.device]:
    """The Philox key (seed low word, seed high word) as 0-d int64 tensors, and the device to draw on."""
    if isinstance(seed, torch.Tensor):
        if seed.numel() != 1 or seed.dtype.is_floating_point or seed.dtype.is_complex or seed.dtype == torch.bool:
            raise TypeError(f"seed must be an int or a one-element integer tensor, got {seed.dtype} "
                            f"of shape {tuple(seed.shape)}")
        device = seed.device if device is None else torch.device(device)
        s = seed.reshape(()).to(device=device, dtype=torch.int64)
    else:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int or a one-element integer tensor, got {type(seed).__name__}")
        if not -2**63 <= seed < 2**64:
            raise ValueError(f"seed must fit in 64 bits, got {seed}")
        device = torch.device("cpu") if device is None else torch.device(device)
        s = torch.tensor(seed - 2**64 if seed >= 2**63 else seed, dtype=torch.int64, device=device)
    # the kernels read the int64 seed as uint64: its two's-complement words
    return s & _M32, (s >> 32) & _M32, device


def _philox4x32(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 on 32-bit words held in int64 tensors (or 0-d tensors): the four output words."""
    for _ in range(_ROUNDS):
        hi_b, lo_b = _mulhilo(_ROUND_B, c2)
        hi_a, lo_a = _mulhilo(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _KEY_A) & _M32, (k1 + _KEY_B) & _M32
    return c0, c1, c2, c3


def philox_randint(seed: torch.Tensor | int, offset: torch.Tensor) -> torch.Tensor:
    """``tl.randint(seed, offset)`` for an int64 ``offset`` tensor (entries in [0, 2**63)), its uint32 word as
    int64 in [0, 2**32). ``seed`` is an int or a one-element integer tensor; drawn on ``offset``'s device."""
    k0, k1, _ = _seed_words(seed, offset.device)
    offset = offset.to(torch.int64)
    lo = offset & _M32
    zero = torch.zeros_like(lo)
    return _philox4x32(lo, (offset >> 32) & _M32, zero, zero, k0, k1)[0]


def philox_uniform(seed: torch.Tensor | int, offset: torch.Tensor) -> torch.Tensor:
    """``tl.rand(seed, offset)`` for an int64 ``offset`` tensor (entries in [0, 2**63)): float32 in [0, 1)."""
    x = philox_randint(seed, offset)
    # the word read as int32, negatives folded by ~x: an integer in [0, 2**31), exact in float32's conversion
    x = torch.where(x >= 2**31, x ^ _M32, x).to(torch.int32).to(torch.float32)
    return x * torch.tensor(_UNIFORM_SCALE, dtype=torch.float32, device=x.device)


def _keep_block(b_first: int, nb: int, num_heads: int, nq: int, nk: int, mq: int, mk: int, dropout_p: float,
                seed: torch.Tensor | int, device: torch.device, i_first: int = 0) -> torch.Tensor:
    """(nb, num_heads, nq, nk) keep mask of batches b_first .. b_first + nb - 1 and query rows i_first ..
    i_first + nq - 1 whose counter strides are (mq, mk): entry (b, h, i, j) draws counter ((b * H + h) * mq + i) * mk
    + j. Eager runs draw in chunks
    of flat indices (cache-sized temporaries, ~3x faster on a CPU than one pass); a compiled run draws in one
    piece, which inductor fuses into one loop."""
    p = torch.tensor(dropout_p, dtype=torch.float32, device=device)  # the kernels compare in float32
    total = nb * num_heads * nq * nk
    chunk = max(total, 1) if torch.compiler.is_compiling() else _CHUNK
    parts = []
    for start in range(0, total, chunk):
        f = torch.arange(start, min(start + chunk, total), dtype=torch.int64, device=device)
        j, i, bh = f % nk, (f // nk) % nq, f // (nk * nq)  # bh counts (batch, head) planes from b_first's
        counter = ((bh + b_first * num_heads) * mq + i + i_first) * mk + j
        parts.append(philox_uniform(seed, counter) >= p)
    if not parts:  # an empty shape
        return torch.zeros(nb, num_heads, nq, nk, dtype=torch.bool, device=device)
    return (torch.cat(parts) if len(parts) > 1 else parts[0]).view(nb, num_heads, nq, nk)


def dropout_keep_mask(shape: tuple[int, int, int, int], dropout_p: float, seed: torch.Tensor | int,
                      device: torch.device | str | None = None, rows: tuple[int, int] | None = None) -> torch.Tensor:
    """The (B, H, Nq, Nk) bool keep mask (True = kept) the Triton kernels draw on a dense launch with
    ``dropout_p`` and ``seed`` (an int, or the one-element int64 tensor the kernels read; its device is
    the default ``device``). H is the number of query heads. Equals
    ``embedattn.kernels.attention.dropout_keep_mask(B, H, Nq, Nk, dropout_p, seed)``. ``rows=(i0, i1)``: only
    query rows i0 .. i1 - 1 of that mask, (B, H, i1 - i0, Nk), drawn without the rest."""
    B, H, Nq, Nk = (int(n) for n in shape)
    i0, i1 = (0, Nq) if rows is None else (int(rows[0]), int(rows[1]))
    if not 0 <= i0 <= i1 <= Nq:
        raise ValueError(f"rows must satisfy 0 <= i0 <= i1 <= Nq = {Nq}, got {rows}")
    _, _, dev = _seed_words(seed, device)
    return _keep_block(0, B, H, i1 - i0, Nk, Nq, Nk, float(dropout_p), seed, dev, i_first=i0)


def sequence_keep_mask(b: int, num_heads: int, seqlen_q: int, seqlen_k: int, max_seqlen_q: int,
                       max_seqlen_k: int, dropout_p: float, seed: torch.Tensor | int,
                       device: torch.device | str | None = None) -> torch.Tensor:
    """The (1, H, seqlen_q, seqlen_k) keep mask the kernels draw for sequence ``b`` of a varlen launch
    with ``max_seqlen_q``/``max_seqlen_k`` (the values given to the launch; they set the counter strides).
    For a loop over sequences (as the reference's attention_varlen): pass it as that sequence's mask."""
    if seqlen_q > max_seqlen_q or seqlen_k > max_seqlen_k:
        raise ValueError(f"sequence {b} has lengths ({seqlen_q}, {seqlen_k}) past max_seqlen "
                         f"({max_seqlen_q}, {max_seqlen_k})")
    _, _, dev = _seed_words(seed, device)
    return _keep_block(int(b), 1, int(num_heads), int(seqlen_q), int(seqlen_k), int(max_seqlen_q), int(max_seqlen_k),
                       float(dropout_p), seed, dev)


def varlen_keep_mask(cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int,
                     num_heads: int, dropout_p: float, seed: torch.Tensor | int) -> torch.Tensor:
    """The (B, H, max_seqlen_q, max_seqlen_k) keep mask of a varlen launch, sequence b's draw in
    ``[b, :, :len_q(b), :len_k(b)]`` and False past each sequence's lengths (FlashAttention's padded
    S_dmask layout). Drawn on ``cu_seqlens_q``'s device without a host sync; the lengths are not
    checked against the maxima here (the launch's checks do that)."""
    dev = cu_seqlens_q.device
    B, mq, mk = cu_seqlens_q.numel() - 1, int(max_seqlen_q), int(max_seqlen_k)
    keep = _keep_block(0, B, int(num_heads), mq, mk, mq, mk, float(dropout_p), seed, dev)
    len_q = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).to(device=dev, dtype=torch.int64)
    len_k = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).to(device=dev, dtype=torch.int64)
    inside = ((torch.arange(mq, device=dev) < len_q[:, None])[:, :, None]
              & (torch.arange(mk, device=dev) < len_k[:, None])[:, None, :])  # (B, mq, mk)
    return keep & inside[:, None]


__all__ = ["dropout_keep_mask", "philox_randint", "philox_uniform", "sequence_keep_mask", "varlen_keep_mask"]
