"""Eager per-call overhead of the public entries on tiny shapes, in microseconds (best of 5 loops).

    python benchmarks/scripts/call_overhead.py            # CPU: reference and the Triton interpreter
    python benchmarks/scripts/call_overhead.py --cuda     # GPU: the kernels, incl. Nq = 1 decoding

At these shapes the work is negligible, so the time is the Python road from the public entry to the
kernels (argument checks, backend decision, autograd Function, registered op, launcher). To compare two
versions, run it with each checkout first on PYTHONPATH.
"""

from __future__ import annotations

import json
import os
import sys
import time

if "--cuda" not in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

import embedattn  # noqa: E402


def bench(fn, n: int) -> float:
    for _ in range(5):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t) / n)
    return best * 1e6


def main() -> None:
    cuda = "--cuda" in sys.argv
    dev = "cuda" if cuda else "cpu"
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, 1, 16, device=dev), torch.randn(1, 2, 8, 16, device=dev), \
        torch.randn(1, 2, 8, 16, device=dev)
    ids, w, pw = torch.randint(0, 10, (1, 4), device=dev), torch.randn(10, 16, device=dev), \
        torch.randn(8, 16, device=dev)
    c, neg = torch.randint(0, 10, (4,), device=dev), torch.randint(0, 10, (4, 2), device=dev)
    res = {}
    for be in (["triton"] if cuda else ["reference", "triton"]):
        n = 200 if be == "reference" or cuda else 20
        res[f"attention fwd {be}"] = bench(lambda be=be: embedattn.attention(q, k, v, causal=True, backend=be), n)
        res[f"embedding fwd {be}"] = bench(lambda be=be: embedattn.embedding(ids, w, pw, backend=be), n)
        res[f"negative_sampling fwd {be}"] = bench(
            lambda be=be: embedattn.negative_sampling_loss(c, c, neg, w, w, backend=be), n)
    res["attention fwd, default backend"] = bench(lambda: embedattn.attention(q, k, v, causal=True), 200)
    res["torch SDPA, for scale"] = bench(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v), 200)
    print(json.dumps({k: round(t, 1) for k, t in res.items()}, indent=1))


if __name__ == "__main__":
    main()
