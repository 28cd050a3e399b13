"""PyTorch reference of every op: the CPU execution path and the tests' float64 oracle.

Each function is short, obviously right and differentiable by autograd.
"""

from ._attention import attention, attention_varlen, attention_with_kvcache
from ._embedding import embedding, sinusoidal_positions
from ._negative_sampling import negative_sampling_loss
from ._philox import dropout_keep_mask, varlen_keep_mask
from ._rotary import rotary

__all__ = ["attention", "attention_varlen", "attention_with_kvcache", "dropout_keep_mask", "embedding",
           "negative_sampling_loss", "rotary", "sinusoidal_positions", "varlen_keep_mask"]
