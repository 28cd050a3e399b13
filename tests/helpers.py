"""Shared test utilities: device selection, backends, and the FlashAttention tolerance rule."""

from __future__ import annotations

import os

import pytest
import torch
import torch.utils._python_dispatch

DEVICE = os.environ.get("EMBEDATTN_TEST_DEVICE", "cpu")
ON_CUDA = DEVICE == "cuda"
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except Exception:
    HAS_TRITON = False

BACKENDS = ["reference"] + (["triton"] if HAS_TRITON else [])

# The interpreter cannot do bf16 arithmetic or bf16 tl.dot: bf16 is validated on CUDA only.
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if ON_CUDA else [])


def skip_if_unsupported(backend: str, dtype: torch.dtype) -> None:
    if backend == "triton" and dtype == torch.bfloat16 and not ON_CUDA:
        pytest.skip("bf16 Triton kernels are validated on CUDA (the interpreter cannot run bf16)")


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max abs difference in float64; NaN anywhere (or a shape mismatch) is infinite error."""
    assert a.shape == b.shape, (a.shape, b.shape)
    d = (a.double() - b.double()).abs()
    if torch.isnan(d).any() or torch.isnan(a).any():
        return float("inf")
    return d.max().item() if d.numel() else 0.0


def assert_fa_close(out: torch.Tensor, ref64: torch.Tensor, plain: torch.Tensor, name: str = "out",
                    eps: float | None = None, factor: float = 2.0) -> None:
    """FlashAttention's rule: err(out) <= factor * err(plain PyTorch, same dtype) + eps,
    both measured against the float64 reference. NaN never passes."""
    assert not torch.isnan(out).any(), f"{name}: NaN in kernel output"
    if eps is None:
        eps = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}.get(out.dtype, 1e-7)
    e_out = max_err(out, ref64)
    e_plain = max_err(plain, ref64)
    assert e_out <= factor * e_plain + eps, (
        f"{name}: kernel error {e_out:.3e} > {factor} x plain-torch error {e_plain:.3e} + {eps:.1e}"
    )


# The roads every op's main test grid runs on: eager, and under torch.compile(fullgraph=True). On the CPU
# the compiled road uses aot_eager (Dynamo and AOTAutograd trace the public entry, the autograd Function and
# the registered ops' fake implementations; the kernels run inside the graph); on CUDA, Inductor.
ROADS = ["eager", "compiled"]


def on_road(road: str, fn):
    """``fn`` itself, or ``fn`` compiled with fullgraph=True (no graph break allowed)."""
    if road == "eager":
        return fn
    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True, backend="inductor" if ON_CUDA else "aot_eager")


def graph_targets(gm) -> list[str]:
    """Every call target in a Dynamo graph, its nested subgraphs included (an autograd.Function's
    forward and backward bodies are subgraphs)."""
    return [str(n.target) for m in gm.modules() if isinstance(getattr(m, "graph", None), torch.fx.Graph)
            for n in m.graph.nodes]


def compile_sm90_in_subprocess(code: str, timeout: float = 600) -> str:
    """Run `code` (which compiles kernels for sm_90 and prints what it finds) in a fresh Python without
    TRITON_INTERPRET (this process interprets) and return its stdout. Skips the test where ptxas or the
    CUDA backend is unavailable; any other failure raises with the subprocess's stderr."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout)
    if r.returncode:
        tail = r.stderr.strip().splitlines()[-1:] or [""]
        if any(x in tail[0] for x in ("ImportError", "ptxas", "FileNotFoundError", "backend")):
            pytest.skip(f"cannot compile for sm_90 here: {tail[0]}")
        raise AssertionError(r.stderr[-3000:])
    return r.stdout


class HostReads(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the aten ops a call dispatches (``_local_scalar_dense`` is what .item()/bool()/int() run:
    a host read of a device tensor)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def sgns_step_reference(inp, tgt, neg, wi, wo, lr, skip_target=True):
    """One minibatch of word2vec.c skip-gram negative-sampling updates in float64: every pair's update computed
    from the tables before the step, then all added (what Hogwild converges to when rows do not collide).
    ``skip_target``: a negative equal to the target is skipped (word2vec.c, the fused steps). Returns the loss per
    pair and the updated (float64) input and output tables."""
    wi64, wo64 = wi.double(), wo.double()
    v = wi64[inp]
    ids = torch.cat([tgt[:, None], neg], 1)
    live = (ids != tgt[:, None]).double() if skip_target else torch.ones(ids.shape, dtype=torch.float64)
    live[:, 0] = 1
    u = wo64[ids]
    s = (u * v[:, None]).sum(-1)
    label = torch.zeros_like(s)
    label[:, 0] = 1
    g = (label - torch.sigmoid(s)) * lr * live
    loss = -(torch.nn.functional.logsigmoid(torch.where(label > 0, s, -s)) * live).sum(-1)
    wi64 = wi64.index_add(0, inp, (g[:, :, None] * u).sum(1))
    wo64 = wo64.index_add(0, ids.reshape(-1), (g[:, :, None] * v[:, None]).reshape(-1, v.shape[1]))
    return loss, wi64, wo64


def pages_to_cache(pool, table):
    """A paged cache (num_pages, Hkv, page, D) read through its (B, max_pages) table as the contiguous
    (B, Hkv, max_pages * page, D) cache: batch b's positions in order (the tests' own copy, not the reference's)."""
    B, max_pages = table.shape
    g = pool[table.long()]  # (B, max_pages, Hkv, page, D)
    return g.permute(0, 2, 1, 3, 4).reshape(B, pool.shape[1], max_pages * pool.shape[2], pool.shape[3])


needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")


def rand(*shape, dtype=torch.float32, seed=0, scale=1.0):
    """A seeded standard-normal tensor (times ``scale``) on the tests' device in ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(DEVICE, dtype)
