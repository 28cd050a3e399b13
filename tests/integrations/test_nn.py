"""embedattn.nn: MultiheadSelfAttention (GQA, masks, KV cache), TinyGPT training, generate, torch.compile."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import BACKENDS, DEVICE, HAS_TRITON, graph_targets

from embedattn.nn import KVCache, MultiheadSelfAttention, TinyGPT


def _dtype(backend):
    return torch.float64 if backend == "reference" else torch.float32


def _tol(dtype):
    return dict(rtol=1e-9, atol=1e-10) if dtype == torch.float64 else dict(rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
def test_multihead_self_attention(backend, causal):
    """Against a plain-PyTorch recomputation from the same projections (K/V repeated for GQA), with a
    key-padding mask."""
    dtype = _dtype(backend)
    torch.manual_seed(0)
    m = MultiheadSelfAttention(24, 4, 2, causal=causal, backend=backend).to(DEVICE, dtype)
    x = torch.randn(2, 9, 24, device=DEVICE, dtype=dtype, requires_grad=True)
    keep = torch.ones(2, 1, 1, 9, dtype=torch.bool, device=DEVICE)
    keep[1, ..., 6:] = False
    out = m(x, attn_mask=keep)
    qkv = m.qkv(x).view(2, 9, 8, 6)
    q, k, v = (t.transpose(1, 2) for t in (qkv[:, :, :4], qkv[:, :, 4:6], qkv[:, :, 6:]))
    k, v = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    mask = keep & torch.ones(9, 9, dtype=torch.bool, device=DEVICE).tril() if causal else keep
    ref = m.proj(F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(2, 9, 24))
    torch.testing.assert_close(out, ref, **_tol(dtype))
    gx, = torch.autograd.grad(out.square().sum(), x)
    gx_ref, = torch.autograd.grad(ref.square().sum(), x)
    torch.testing.assert_close(gx, gx_ref, **_tol(dtype))


def test_kv_cache_matches_full_forward():
    """Chunked prefill + single-token decoding through a KV cache equals one full causal forward."""
    torch.manual_seed(0)
    m = TinyGPT(32, 16, dim=16, num_layers=2, num_heads=4, num_kv_heads=2, backend="reference").double()
    ids = torch.randint(0, 32, (2, 9))
    full, _ = m(ids)
    caches = [KVCache() for _ in m.blocks]
    parts = [m(ids[:, :5], kv_caches=caches)[0]]
    parts += [m(ids[:, i:i + 1], kv_caches=caches)[0] for i in range(5, 9)]
    assert len(caches[0]) == 9
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-12, atol=1e-12)
    out = m.generate(ids[:, :4], 5)
    assert out.shape == (2, 9) and torch.equal(out[:, :4], ids[:, :4])
    with pytest.raises(ValueError, match="max_seq_len"):
        m.generate(ids, 8)


def test_nn_bad_args():
    with pytest.raises(ValueError, match="multiple"):
        MultiheadSelfAttention(24, 4, 3)
    with pytest.raises(ValueError, match="divisible"):
        MultiheadSelfAttention(30, 4)


def _train(backend, steps=3):
    torch.manual_seed(0)
    model = TinyGPT(40, 16, dim=16, num_layers=2, num_heads=2, num_kv_heads=1, backend=backend).to(DEVICE)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    data = torch.randint(0, 40, (2, 13), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    losses = []
    for _ in range(steps):
        _, loss = model(data[:, :-1], data[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_tiny_gpt_trains_identically_on_both_backends():
    """The same few SGD steps on the reference and on the Triton kernels (interpreter on CPU): the
    loss decreases, and identically up to float32 rounding."""
    ref = _train("reference")
    assert ref[-1] < ref[0]
    if HAS_TRITON:
        tri = _train("triton")
        assert tri[-1] < tri[0]
        for a, b in zip(tri, ref):
            assert math.isclose(a, b, rel_tol=1e-5), (tri, ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tiny_gpt_compiles_fullgraph(backend):
    """torch.compile(fullgraph=True) traces TinyGPT in one graph (aot_eager: fake impls and autograd
    included) and matches eager values and gradients; with the kernels, the registered ops are in it."""
    import torch._dynamo.testing

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = TinyGPT(40, 16, dim=16, num_layers=2, num_heads=2, num_kv_heads=1, backend=backend).to(DEVICE)
    data = torch.randint(0, 40, (2, 13)).to(DEVICE)
    cnt = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    _, loss = torch.compile(model, fullgraph=True, backend=cnt)(data[:, :-1], data[:, 1:])
    loss.backward()
    g = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    _, loss_eager = model(data[:, :-1], data[:, 1:])
    loss_eager.backward()
    assert cnt.frame_count == 1
    targets = graph_targets(cnt.graphs[0])
    n_kernel_ops = (2, 1) if backend == "triton" else (0, 0)
    assert (targets.count("embedattn.attention_fwd"), targets.count("embedattn.embedding_fwd")) == n_kernel_ops
    torch.testing.assert_close(loss, loss_eager, rtol=1e-6, atol=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(g[n], p.grad, rtol=1e-5, atol=1e-6)
