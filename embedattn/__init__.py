"""embedattn: fused Triton kernels for the input side of transformers and word2vec.

Public API::

    embedattn.attention(q, k, v, causal=..., attn_mask=..., ...)
    embedattn.scaled_dot_product_attention(...)          # drop-in for torch's SDPA
    embedattn.embedding(ids, weight, pos_weight, ...)    # gather + positional add
    embedattn.FusedEmbedding(...)
    embedattn.negative_sampling_loss(...)                 # skip-gram negative sampling
    embedattn.NegativeSamplingLoss, embedattn.UnigramSampler
    embedattn.rotary(x, cos, sin, ...)                    # rotary position embedding
    embedattn.distributed.ring_attention(...)             # context parallelism over torch.distributed
    embedattn.flash_attn_interface.flash_attn_func(...)   # FlashAttention 2's functions, by name
    embedattn.reference                                   # the PyTorch reference of every op

Every op takes ``backend=None | "auto" | "triton" | "reference"`` (see ``embedattn._backend``).
"""

from . import distributed, flash_attn_interface, reference
from ._backend import interpreting, resolve, triton_available
from .attention import (
    AttentionFunction,
    attention,
    attention_varlen,
    attention_with_kvcache,
    scaled_dot_product_attention,
)
from .attention import dropout_mask as attention_dropout_mask
from .embedding import FusedEmbedding, embedding
from .negative_sampling import NegativeSamplingLoss, UnigramSampler, negative_sampling_loss
from .patching import patch_sdpa
from .rotary import rotary

__version__ = "0.1.0"

__all__ = [
    "AttentionFunction",
    "FusedEmbedding",
    "NegativeSamplingLoss",
    "UnigramSampler",
    "attention",
    "attention_dropout_mask",
    "attention_varlen",
    "attention_with_kvcache",
    "distributed",
    "embedding",
    "flash_attn_interface",
    "interpreting",
    "negative_sampling_loss",
    "patch_sdpa",
    "reference",
    "resolve",
    "rotary",
    "scaled_dot_product_attention",
    "triton_available",
]
