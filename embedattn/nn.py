"""Small building blocks on embedattn's ops: multi-head self-attention with GQA and a KV cache, and a
tiny GPT-style model (an example and a benchmark subject, not a model zoo).

Every module takes ``backend`` (None | "auto" | "triton" | "reference", see ``embedattn._backend``) and
calls the public entries, which take the same road eagerly and under ``torch.compile``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .attention import attention
from .embedding import FusedEmbedding

__all__ = ["KVCache", "MultiheadSelfAttention", "TinyGPT", "TransformerBlock"]


class KVCache:
    """Keys and values seen so far by one attention layer, each (B, Hkv, N, Dh), grown by concatenation.

    Simple on purpose: a decoding step costs a copy of the cache (fine for examples and tests; a
    serving stack would preallocate).
    """

    def __init__(self) -> None:
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def __len__(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the new keys/values and return the whole cache."""
        if self.k is None:
            self.k, self.v = k, v
        else:
            self.k = torch.cat([self.k, k], dim=2)
            self.v = torch.cat([self.v, v], dim=2)
        return self.k, self.v

    def reset(self) -> None:
        self.k = self.v = None


class MultiheadSelfAttention(nn.Module):
    """Self-attention with one fused qkv projection, ``num_heads`` query heads and ``num_kv_heads``
    key/value heads (GQA/MQA; K/V are never repeated: the kernel reads each K/V head for its group).

    ``forward(x, attn_mask=None, kv_cache=None)``: x (B, N, E). ``attn_mask``: bool (True = attend)
    or additive float, broadcastable to (B, H, N, Nk), e.g. a key-padding mask (B, 1, 1, Nk).
    With ``causal=True`` query i sees keys up to its own position, aligned bottom-right, so with a
    ``kv_cache`` holding L earlier tokens the new N queries see the L cached keys plus the causal
    part of their own (decoding and chunked prefill alike). ``sinks=True``: gpt-oss's learned attention
    sinks, one logit per query head (``self.sinks``, initialized to zero) in every row's softmax denominator.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        *,
        head_dim: int | None = None,
        causal: bool = True,
        bias: bool = True,
        sinks: bool = False,
        backend: str | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if num_heads <= 0 or num_kv_heads <= 0 or num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a positive multiple of num_kv_heads ({num_kv_heads})")
        if head_dim is None:
            if embed_dim % num_heads:
                raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads}) "
                                 "unless head_dim is given")
            head_dim = embed_dim // num_heads
        self.embed_dim, self.num_heads, self.num_kv_heads, self.head_dim = embed_dim, num_heads, num_kv_heads, head_dim
        self.causal = causal
        self.backend = backend
        factory = {"device": device, "dtype": dtype}
        self.qkv = nn.Linear(embed_dim, (num_heads + 2 * num_kv_heads) * head_dim, bias=bias, **factory)
        self.proj = nn.Linear(num_heads * head_dim, embed_dim, bias=bias, **factory)
        self.sinks = nn.Parameter(torch.zeros(num_heads, **factory)) if sinks else None

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                kv_cache: KVCache | None = None) -> torch.Tensor:
        b, n, _ = x.shape
        h, hkv, d = self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self.qkv(x).view(b, n, h + 2 * hkv, d)
        # strided views, no copies: the kernel reads any strides
        q = qkv[:, :, :h].transpose(1, 2)
        k = qkv[:, :, h:h + hkv].transpose(1, 2)
        v = qkv[:, :, h + hkv:].transpose(1, 2)
        if kv_cache is not None:
            k, v = kv_cache.update(k, v)
        out = attention(q, k, v, causal=self.causal, attn_mask=attn_mask, sinks=self.sinks, backend=self.backend)
        return self.proj(out.transpose(1, 2).reshape(b, n, h * d))

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
                f"head_dim={self.head_dim}, causal={self.causal}, sinks={self.sinks is not None}")


class TransformerBlock(nn.Module):
    """Pre-norm block: x + attn(ln(x)), then x + mlp(ln(x)) with a GELU MLP."""

    def __init__(self, dim: int, num_heads: int, num_kv_heads: int | None = None, *, mlp_ratio: int = 4,
                 causal: bool = True, backend: str | None = None, device=None, dtype=None) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.ln1 = nn.LayerNorm(dim, **factory)
        self.attn = MultiheadSelfAttention(dim, num_heads, num_kv_heads, causal=causal, backend=backend, **factory)
        self.ln2 = nn.LayerNorm(dim, **factory)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim, **factory), nn.GELU(),
                                 nn.Linear(mlp_ratio * dim, dim, **factory))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                kv_cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), attn_mask=attn_mask, kv_cache=kv_cache)
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    """A GPT-style decoder from embedattn parts: FusedEmbedding (token + learned positions in one
    kernel), pre-norm blocks of MultiheadSelfAttention (causal, optional GQA) and a GELU MLP, a final
    LayerNorm and an output head tied to the token table.

    ``forward(ids, targets=None, kv_caches=None)`` returns ``(logits, loss)``; ``loss`` is the mean
    next-token cross-entropy against ``targets`` (ignore_index -100) or None. ``generate`` decodes
    greedily (or samples with ``temperature``) with one KV cache per layer.
    """

    def __init__(
        self,
        vocab_size: int,
        max_seq_len: int = 256,
        dim: int = 128,
        num_layers: int = 2,
        num_heads: int = 4,
        num_kv_heads: int | None = None,
        *,
        mlp_ratio: int = 4,
        backend: str | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.max_seq_len = max_seq_len
        self.embed = FusedEmbedding(vocab_size, dim, max_seq_len, positional="learned", **factory)
        self.embed.backend = backend
        self.blocks = nn.ModuleList(
            TransformerBlock(dim, num_heads, num_kv_heads, mlp_ratio=mlp_ratio, backend=backend, **factory)
            for _ in range(num_layers))
        self.norm = nn.LayerNorm(dim, **factory)
        self.head = nn.Linear(dim, vocab_size, bias=False, **factory)
        self.head.weight = self.embed.weight  # tied
        self.reset_parameters(num_layers)

    def reset_parameters(self, num_layers: int) -> None:
        """GPT-2 initialisation: N(0, 0.02), residual projections scaled by 1/sqrt(2 * layers)."""
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                std = 0.02 / math.sqrt(2 * num_layers) if name.endswith(("proj.weight", "mlp.2.weight")) else 0.02
                nn.init.normal_(p, std=std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, ids: torch.Tensor, targets: torch.Tensor | None = None,
                kv_caches: list[KVCache] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        offset = len(kv_caches[0]) if kv_caches else 0
        x = self.embed(ids, position_offset=offset)
        for i, block in enumerate(self.blocks):
            x = block(x, kv_cache=kv_caches[i] if kv_caches else None)
        logits = self.head(self.norm(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)
        return logits, loss

    @torch.no_grad()
    def generate(self, ids: torch.Tensor, max_new_tokens: int, *, temperature: float = 0.0,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Append ``max_new_tokens`` tokens to ``ids`` (B, N): greedy for ``temperature=0``, else sampled."""
        if ids.shape[1] + max_new_tokens > self.max_seq_len:
            raise ValueError(f"{ids.shape[1]} + {max_new_tokens} tokens exceed max_seq_len={self.max_seq_len}")
        caches = [KVCache() for _ in self.blocks]
        out, step = ids, ids
        for _ in range(max_new_tokens):
            logits, _ = self(step, kv_caches=caches)
            last = logits[:, -1].float()
            if temperature > 0:
                nxt = torch.multinomial(torch.softmax(last / temperature, -1), 1, generator=generator)
            else:
                nxt = last.argmax(-1, keepdim=True)
            out = torch.cat([out, nxt], dim=1)
            step = nxt
        return out
