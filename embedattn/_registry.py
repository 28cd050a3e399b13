"""``kernel_op``: how each op's kernels become a registered ``torch.ops.embedattn.*`` op.

On a GPU an op is a ``torch.library.triton_op``: its body calls the launchers in ``kernels/``, which
launch through ``torch.library.wrap_triton``, so ``torch.compile`` (Inductor) sees the Triton kernels
themselves and the fake implementation is traced from the body. Under the Triton interpreter the same
body is registered as a ``torch.library.custom_op`` with an explicit fake implementation: the
interpreter runs kernels on real memory, so its launches cannot be traced with fake tensors, while a
custom op runs eagerly inside a compiled graph. Either way eager and compiled calls reach the same
kernels through the same op.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ._backend import interpreting


def kernel_op(name: str, fake: Callable, mutates_args: tuple[str, ...] = ()) -> Callable:
    """Decorator: register ``fn`` as ``torch.ops.embedattn.<name>``; ``mutates_args`` names the inputs it
    writes in place (as in ``torch.library.custom_op``)."""

    def register(fn: Callable):
        qualname = f"embedattn::{name}"
        if interpreting():
            op = torch.library.custom_op(qualname, mutates_args=mutates_args)(fn)
            op.register_fake(fake)
            return op
        return torch.library.triton_op(qualname, mutates_args=mutates_args)(fn)

    return register
