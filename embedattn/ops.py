"""The registered ops and the functional entries, re-exported.

Each op is registered once, in its own module (``embedattn.attention``, ``embedding``,
``negative_sampling``), as ``torch.ops.embedattn.*``::

    attention_fwd / attention_bwd, varlen_fwd / varlen_bwd, kvcache_fwd, gluon_attention_fwd,
    embedding_fwd / embedding_bwd, negative_sampling_fwd / negative_sampling_bwd

and reached through one ``torch.autograd.Function`` per op that the public entries call, eagerly and
under ``torch.compile`` alike. The attention ops take their own tensors then one ``AttnSpec``'s fields, flat
(``embedattn.attention.AttnSpec.op_args``). This module only re-exports those entries for code written against
earlier versions.
"""

from __future__ import annotations

from . import attention as _attention_module  # noqa: F401  (registers the attention ops)
from .attention import attention, attention_varlen, attention_with_kvcache
from .embedding import embedding
from .negative_sampling import negative_sampling_loss

__all__ = ["attention", "attention_varlen", "attention_with_kvcache", "embedding", "negative_sampling_loss"]
