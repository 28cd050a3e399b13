"""PyTorch reference of every op: the CPU execution path and the tests' float64 oracle.

Each function is short, obviously right and differentiable by autograd.
"""

from ._attention import attention, attention_varlen, attention_with_kvcache

__all__ = ["attention", "attention_varlen", "attention_with_kvcache"]
