"""Integrations: transformers AttentionInterface, patch_sdpa, torch.library ops + torch.compile, embedattn.nn.

transformers models are built from tiny configs (no downloads) and compared with
``attn_implementation="sdpa"``: hidden states and gradients on padded batches. On CPU the
"triton" backend runs through the interpreter (set by conftest); CUDA-only checks (Inductor) are
marked and run under ``EMBEDATTN_TEST_DEVICE=cuda``.
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import BACKENDS, DEVICE, HAS_TRITON, ON_CUDA

import embedattn
from embedattn import ops
from embedattn.nn import KVCache, MultiheadSelfAttention, TinyGPT
from embedattn.patching import patch_sdpa, sdpa_patched

ea_attention = importlib.import_module("embedattn.attention")  # the module (embedattn.attention is the function)



def cuda_only(f):
    """Marked ``cuda`` and skipped without a GPU (Inductor compiles the Triton kernels for GPUs only)."""
    return pytest.mark.cuda(pytest.mark.skipif(not ON_CUDA, reason="needs CUDA")(f))


def _dtype(backend):
    # the reference runs float64 (tight comparisons); the kernels float32
    return torch.float64 if backend == "reference" else torch.float32


def _tol(dtype):
    return dict(rtol=1e-9, atol=1e-10) if dtype == torch.float64 else dict(rtol=2e-4, atol=2e-5)


# --------------------------------------------------------------------------------------------------
# transformers
# --------------------------------------------------------------------------------------------------
transformers = pytest.importorskip("transformers")
import embedattn.integrations.transformers as ea_hf  # noqa: E402


@pytest.fixture
def attend_calls(monkeypatch):
    """Records every call of the integration into embedattn's attention (the flags it passed)."""
    calls = []
    orig = ea_hf.attend

    def spy(q, k, v, **kw):
        calls.append(dict(kw, q_shape=tuple(q.shape), k_shape=tuple(k.shape)))
        return orig(q, k, v, **kw)

    monkeypatch.setattr(ea_hf, "attend", spy)
    return calls


def _llama(dtype, **kw):
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64, **kw)
    torch.manual_seed(0)
    return transformers.AutoModel.from_config(cfg, attn_implementation="sdpa").to(DEVICE, dtype)


def _bert(dtype):
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=48, max_position_embeddings=64, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    return transformers.AutoModel.from_config(cfg, attn_implementation="sdpa").to(DEVICE, dtype)


def _batch(padding, b=2, n=9):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 64, (b, n), generator=g)
    am = torch.ones(b, n, dtype=torch.long)
    if padding == "right":
        am[-1, 5:] = 0
    elif padding == "left":
        am[-1, :4] = 0
    return ids.to(DEVICE), am.to(DEVICE)


def _run(model, impl, ids, am):
    model.set_attn_implementation(impl)
    model.zero_grad(set_to_none=True)
    h = model(input_ids=ids, attention_mask=am).last_hidden_state
    valid = h[am.bool()]  # padded positions are don't-care (and may be NaN/zero per backend)
    (valid.square().sum() + valid.sum()).backward()
    return valid.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


# the interpreter is slow: the Triton backend runs the cases that reach distinct kernel paths
_HF_CASES = [(arch, padding, be) for arch, padding in [("llama", "none"), ("llama", "right"), ("llama", "left"),
                                                       ("bert", "right"), ("bert", "none"), ("bert", "left")]
             for be in BACKENDS if be == "reference" or ON_CUDA or (arch, padding) in
             {("llama", "none"), ("llama", "left"), ("bert", "right")}]


@pytest.mark.parametrize("arch,padding,backend", _HF_CASES)
def test_transformers_matches_sdpa(arch, padding, backend, attend_calls):
    """Hidden states and all parameter gradients equal sdpa's: causal GQA decoder (Llama) and
    bidirectional encoder (BERT), unpadded, right- and left-padded batches."""
    dtype = _dtype(backend)
    name = ea_hf.register(f"embedattn_{backend}", backend=backend)
    model = (_llama if arch == "llama" else _bert)(dtype)
    ids, am = _batch(padding)
    h_ref, g_ref = _run(model, "sdpa", ids, am)
    assert not attend_calls
    h, g = _run(model, name, ids, am)
    assert len(attend_calls) == 2  # one per layer: our kernel ran, not a fallback
    call = attend_calls[0]
    if arch == "llama":
        assert call["q_shape"][1] == 2 and call["k_shape"][1] == 1  # GQA served natively, no repeat
        # without padding transformers passes no mask and relies on is_causal (top-left alignment)
        assert call["causal"] == (padding == "none") and call["causal_offset"] == 0
    else:
        assert not call["causal"]
    torch.testing.assert_close(h, h_ref, **_tol(dtype))
    assert g.keys() == g_ref.keys()
    for n in g:
        torch.testing.assert_close(g[n], g_ref[n], **_tol(dtype), msg=lambda m, n=n: f"grad {n}: {m}")


def test_transformers_generate_with_cache(attend_calls):
    """Greedy generate() with a KV cache and left padding: same tokens as sdpa, single-query steps."""
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).to(DEVICE, torch.float64).eval()
    ids, am = _batch("left", n=6)
    out = {}
    for impl in ("sdpa", ea_hf.register("embedattn_gen", backend="reference")):
        model.set_attn_implementation(impl)
        out[impl] = model.generate(input_ids=ids, attention_mask=am, max_new_tokens=4, do_sample=False,
                                   pad_token_id=0)
    assert torch.equal(out["sdpa"], out["embedattn_gen"])
    assert any(c["q_shape"][2] == 1 for c in attend_calls)  # decoding steps went through our kernel


def test_transformers_dropout_runs_in_kernel(attend_calls):
    """Training with attention dropout runs our kernel's dropout: seeded by torch's RNG (reproducible),
    and off in eval."""
    model = _llama(torch.float64, attention_dropout=0.5)
    model.set_attn_implementation(ea_hf.register("embedattn_drop", backend="reference"))
    ids, am = _batch("right")
    outs = []
    for _ in range(2):
        torch.manual_seed(11)
        outs.append(model.train()(input_ids=ids, attention_mask=am).last_hidden_state[am.bool()])
    assert [c["dropout_p"] for c in attend_calls] == [0.5] * 4
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    attend_calls.clear()
    h_eval = model.eval()(input_ids=ids, attention_mask=am).last_hidden_state[am.bool()]
    assert [c["dropout_p"] for c in attend_calls] == [0.0, 0.0]
    assert torch.isfinite(outs[0]).all() and not torch.allclose(outs[0], h_eval)


def test_transformers_unsupported_call_falls_back_to_sdpa(monkeypatch, attend_calls):
    """A call the kernel does not cover (here: value head dim != key head dim) goes to transformers' sdpa."""
    sdpa_calls = []
    orig = ea_hf._sdpa_forward()
    monkeypatch.setattr(ea_hf, "_sdpa_forward", lambda: lambda *a, **k: sdpa_calls.append(1) or orig(*a, **k))
    f = ea_hf.make_attention_forward("reference")
    q, k, v = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 6)
    out, weights = f(torch.nn.Module(), q, k, v, None, scaling=0.5, is_causal=False)
    assert sdpa_calls and not attend_calls and weights is None and out.shape == (1, 3, 2, 6)
    torch.testing.assert_close(out, TORCH_SDPA(q, k, v, scale=0.5).transpose(1, 2))
    with pytest.raises(ValueError, match="softcap"):
        f(torch.nn.Module(), q, k, v, None, softcap=30.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_transformers_softcap_sliding_window_matches_eager(backend, attend_calls):
    """Gemma-2 (logit soft-capping, which sdpa lacks, and sliding-window layers): equal to "eager".
    float32 for both backends: "eager" itself gives NaN gradients in float64 on fully masked rows."""
    dtype = torch.float32
    cfg = transformers.Gemma2Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                    num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                    max_position_embeddings=64, sliding_window=4, attn_logit_softcapping=5.0)
    torch.manual_seed(0)
    model = transformers.AutoModel.from_config(cfg, attn_implementation="eager").to(DEVICE, dtype)
    ids, am = _batch("left")
    h_ref, g_ref = _run(model, "eager", ids, am)
    h, g = _run(model, ea_hf.register(f"embedattn_gemma_{backend}", backend=backend), ids, am)
    assert [c["softcap"] for c in attend_calls] == [5.0, 5.0]
    torch.testing.assert_close(h, h_ref, **_tol(dtype))
    for n in g_ref:
        torch.testing.assert_close(g[n], g_ref[n], **_tol(dtype), msg=lambda m, n=n: f"grad {n}: {m}")


def test_transformers_compiles_fullgraph(attend_calls):
    """torch.compile(fullgraph=True) of a transformers model with our attention: one graph, our op in it."""
    import torch._dynamo.testing

    torch._dynamo.reset()
    model = _llama(torch.float64)
    model.set_attn_implementation(ea_hf.register("embedattn_compile", backend="reference"))
    ids, am = _batch("left")
    cnt = torch._dynamo.testing.CompileCounterWithBackend("eager")
    h = torch.compile(model, fullgraph=True, backend=cnt)(input_ids=ids, attention_mask=am).last_hidden_state
    assert cnt.frame_count == 1
    targets = [str(n.target) for n in cnt.graphs[0].graph.nodes]
    assert targets.count("embedattn.attention_fwd") == 2
    h_eager = model(input_ids=ids, attention_mask=am).last_hidden_state
    torch.testing.assert_close(h[am.bool()], h_eager[am.bool()], rtol=1e-12, atol=1e-12)


def test_transformers_softcap_compiles_fullgraph():
    """A Gemma-2 model (logit soft-capping, sliding-window layers) compiles with fullgraph=True through
    our op (softcap is an op argument now, no eager fallback) and equals the eager model."""
    import torch._dynamo.testing

    torch._dynamo.reset()
    cfg = transformers.Gemma2Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                    num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                    max_position_embeddings=64, sliding_window=4, attn_logit_softcapping=5.0)
    torch.manual_seed(0)
    model = transformers.AutoModel.from_config(cfg, attn_implementation="eager").to(DEVICE, torch.float64)
    model.set_attn_implementation(ea_hf.register("embedattn_gemma_compile", backend="reference"))
    ids, am = _batch("left")
    cnt = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    h = torch.compile(model, fullgraph=True, backend=cnt)(input_ids=ids, attention_mask=am).last_hidden_state
    ops_in_graphs = [[n for n in g.graph.nodes if str(n.target) == "embedattn.attention_fwd"] for g in cnt.graphs]
    assert sum(map(len, ops_in_graphs)) == 2
    assert all(n.args[10] == 5.0 for g in ops_in_graphs for n in g)  # softcap reached the op
    h_eager = model(input_ids=ids, attention_mask=am).last_hidden_state
    torch.testing.assert_close(h[am.bool()], h_eager[am.bool()], rtol=1e-12, atol=1e-12)


def test_transformers_register_errors():
    with pytest.raises(ValueError, match="name"):
        ea_hf.register("")
    with pytest.raises(ValueError, match="name"):
        ea_hf.register("paged|x")
    with pytest.raises(ValueError, match="backend"):
        ea_hf.register("embedattn_bad", backend="cuda")
    assert ea_hf.register() == "embedattn"
    assert "embedattn" in transformers.AttentionInterface._global_mapping


# --------------------------------------------------------------------------------------------------
# patch_sdpa
# --------------------------------------------------------------------------------------------------
TORCH_SDPA = F.scaled_dot_product_attention


def test_patch_sdpa_context_manager_and_undo():
    assert F.scaled_dot_product_attention is TORCH_SDPA and not sdpa_patched()
    with patch_sdpa() as p:
        assert F.scaled_dot_product_attention is embedattn.scaled_dot_product_attention
        assert torch.nn.functional.scaled_dot_product_attention is embedattn.scaled_dot_product_attention
        assert p.active and sdpa_patched()
    assert F.scaled_dot_product_attention is TORCH_SDPA and not p.active
    undo = patch_sdpa()
    assert F.scaled_dot_product_attention is embedattn.scaled_dot_product_attention
    undo()
    undo()  # idempotent
    assert F.scaled_dot_product_attention is TORCH_SDPA and not sdpa_patched()


def test_patch_sdpa_nesting_and_exceptions():
    with patch_sdpa():
        with patch_sdpa():
            assert F.scaled_dot_product_attention is embedattn.scaled_dot_product_attention
        assert F.scaled_dot_product_attention is embedattn.scaled_dot_product_attention  # outer still active
    assert F.scaled_dot_product_attention is TORCH_SDPA
    with pytest.raises(RuntimeError, match="boom"):
        with patch_sdpa():
            with patch_sdpa():
                raise RuntimeError("boom")
    assert F.scaled_dot_product_attention is TORCH_SDPA and not sdpa_patched()
    a, b = patch_sdpa(), patch_sdpa()
    a.undo()  # out of order: b still holds the patch
    assert F.scaled_dot_product_attention is embedattn.scaled_dot_product_attention
    b.undo()
    assert F.scaled_dot_product_attention is TORCH_SDPA


@pytest.mark.skipif(not HAS_TRITON, reason="needs Triton")
def test_patch_sdpa_routes_models_to_kernel(monkeypatch):
    """Under the patch, nn.MultiheadAttention and a transformers "sdpa" model run embedattn's kernel and
    match torch."""
    if not ON_CUDA:
        monkeypatch.setenv("EMBEDATTN_BACKEND", "triton")  # the drop-in runs the interpreter on CPU
    calls = []
    orig = ea_attention._attention
    monkeypatch.setattr(ea_attention, "_attention", lambda *a, **k: calls.append(k["causal"]) or orig(*a, **k))
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(16, 2, batch_first=True, device=DEVICE)
    x = torch.randn(2, 7, 16, device=DEVICE)
    causal = torch.nn.Transformer.generate_square_subsequent_mask(7, device=DEVICE)
    ref = mha(x, x, x, attn_mask=causal, need_weights=False)[0]
    with patch_sdpa():
        out = mha(x, x, x, attn_mask=causal, need_weights=False)[0]
    assert calls
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=2e-5)

    calls.clear()
    model = _llama(torch.float32)
    ids, am = _batch("right")
    ref = model(input_ids=ids, attention_mask=am).last_hidden_state[am.bool()]
    with patch_sdpa():
        out = model(input_ids=ids, attention_mask=am).last_hidden_state[am.bool()]
    assert len(calls) == 2
    torch.testing.assert_close(out, ref, rtol=2e-4, atol=2e-5)


# --------------------------------------------------------------------------------------------------
# torch.library ops
# --------------------------------------------------------------------------------------------------
def _qkv(b=2, hq=4, hkv=2, nq=5, nk=7, d=8, dtype=torch.float64, device="cpu"):
    g = torch.Generator().manual_seed(3)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=dtype).to(device).requires_grad_()  # noqa: E731
    return mk(b, hq, nq, d), mk(b, hkv, nk, d), mk(b, hkv, nk, d)


@pytest.mark.parametrize("causal,offset", [(False, None), (True, None), (True, 0), (True, -2)])
@pytest.mark.parametrize("mask_kind", [None, "bool", "float"])
def test_attention_op_matches_reference(causal, offset, mask_kind):
    """The op's reference path (forward and its written-out backward) equals autograd through the
    reference, for GQA, Nq != Nk, causal diagonals and both mask kinds."""
    q, k, v = _qkv()
    g = torch.Generator().manual_seed(4)
    mask = None
    if mask_kind == "bool":
        mask = torch.rand(2, 1, 5, 7, generator=g) > 0.3
    elif mask_kind == "float":
        mask = torch.randn(2, 1, 1, 7, generator=g, dtype=torch.float64)
    out, lse = ops.attention(q, k, v, causal=causal, attn_mask=mask, causal_offset=offset, return_lse=True)
    off = 7 - 5 if offset is None else offset
    ref, ref_lse = ea_attention._attention(q, k, v, causal=causal, causal_offset=off, scale=None, attn_mask=mask,
                                           return_lse=True, backend="reference")
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    finite = torch.isfinite(ref_lse)
    assert torch.equal(finite, torch.isfinite(lse))
    assert lse.dtype == ref_lse.dtype  # float64 inputs keep a float64 lse, as on the reference
    torch.testing.assert_close(lse[finite], ref_lse[finite], rtol=1e-12, atol=1e-12)
    w = torch.randn(out.shape, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad((out * w).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * w).sum(), (q, k, v))
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_ops_opcheck():
    """torch.library.opcheck: schema, fake (meta) implementation, autograd registration, AOT dispatch."""
    q, k, v = _qkv(nq=4, nk=6, d=4)
    mask = torch.rand(2, 1, 4, 6, generator=torch.Generator().manual_seed(5)) > 0.2
    torch.library.opcheck(torch.ops.embedattn.attention_fwd.default, (q, k, v, mask, True, 2, 0.5, "reference"))
    dout = torch.randn(2, 4, 4, 4, dtype=torch.float64)
    out, lse2 = torch.ops.embedattn.attention_fwd(q, k, v, None, False, 0, 0.5, "reference")
    # (the fwd check above already traced attention_bwd through the registered autograd)
    torch.library.opcheck(torch.ops.embedattn.attention_bwd.default,
                          (dout, q.detach(), k.detach(), v.detach(), out.detach(), lse2, None, False, 0, 0.5,
                           "reference"), test_utils=("test_schema", "test_faketensor"))
    w = torch.randn(11, 6, dtype=torch.float64, requires_grad=True)
    p = torch.randn(9, 6, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, 11, (15,))
    torch.library.opcheck(torch.ops.embedattn.embedding_fwd.default, (ids, w, p, None, 5, 1, 1.5, 2, 3, "reference"))
    c, x, n = torch.randint(0, 11, (7,)), torch.randint(0, 11, (7,)), torch.randint(0, 11, (7, 3))
    torch.library.opcheck(torch.ops.embedattn.negative_sampling_fwd.default, (c, x, n, w, p[:0].new_zeros(11, 6)
                                                                               .requires_grad_(), "reference"))


@pytest.mark.parametrize("kw", [dict(pos=True), dict(pos=True, positions=True), dict(sinusoidal=True, scale=2.0),
                                dict(pos=True, padding_idx=3, position_offset=2), dict()])
def test_embedding_op_matches_api(kw):
    g = torch.Generator().manual_seed(6)
    w = torch.randn(11, 6, generator=g, dtype=torch.float64, requires_grad=True)
    p = torch.randn(9, 6, generator=g, dtype=torch.float64, requires_grad=True) if kw.pop("pos", False) else None
    ids = torch.randint(0, 11, (3, 5), generator=g)
    if kw.pop("positions", False):
        kw["positions"] = torch.randint(0, 9, (3, 5), generator=g)
    a = ops.embedding(ids, w, p, **kw)
    b = embedattn.embedding(ids, w, p, backend="reference", **kw)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    params = [w] + ([p] if p is not None else [])
    for x, y in zip(torch.autograd.grad(a.square().sum(), params), torch.autograd.grad(b.square().sum(), params)):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_negative_sampling_op_matches_api(reduction):
    g = torch.Generator().manual_seed(7)
    wi = torch.randn(13, 5, generator=g, dtype=torch.float64, requires_grad=True)
    wo = torch.randn(13, 5, generator=g, dtype=torch.float64, requires_grad=True)
    c, x, n = (torch.randint(0, 13, s, generator=g) for s in ((7,), (7,), (7, 3)))
    a = ops.negative_sampling_loss(c, x, n, wi, wo, reduction=reduction)
    b = embedattn.negative_sampling_loss(c, x, n, wi, wo, reduction=reduction, backend="reference")
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    for s, t in zip(torch.autograd.grad(a.square().sum(), (wi, wo)), torch.autograd.grad(b.square().sum(), (wi, wo))):
        torch.testing.assert_close(s, t, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ops_lse_is_differentiable(backend):
    """A loss that uses the returned lse gets its gradient (the op must not drop it silently)."""
    dtype = torch.float64 if backend == "reference" else torch.float32
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 4, 9, 16, generator=g, dtype=dtype).to(DEVICE).requires_grad_() for _ in range(3))
    k2, v2 = (t.detach()[:, :2].clone().requires_grad_() for t in (k, v))
    w = torch.randn(1, 4, 9, generator=g, dtype=dtype).to(DEVICE)
    out, lse = ops.attention(q, k2, v2, causal=True, return_lse=True, backend=backend)
    got = torch.autograd.grad(out.sum() + (lse * w).sum(), (q, k2, v2))
    r = [t.detach().double().requires_grad_() for t in (q, k2, v2)]
    out_r, lse_r = embedattn.reference.attention(*r, causal=True, return_lse=True)
    want = torch.autograd.grad(out_r.sum() + (lse_r * w.double()).sum(), r)
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, atol=tol, rtol=tol)


def test_ops_bad_input():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="multiple"):
        ops.attention(q, torch.randn(2, 3, 7, 8, dtype=q.dtype), torch.randn(2, 3, 7, 8, dtype=q.dtype))
    with pytest.raises(ValueError, match="scale"):
        ops.attention(q, k, v, scale=float("nan"))
    with pytest.raises(ValueError, match="window"):
        ops.attention(q, k, v, window=(1,))
    with pytest.raises(ValueError, match="softcap"):
        ops.attention(q, k, v, softcap=-1.0)
    with pytest.raises(ValueError, match="alibi_slopes"):
        ops.attention(q, k, v, alibi_slopes=torch.ones(3, dtype=q.dtype))
    with pytest.raises(ValueError, match="dropout_p"):
        ops.attention(q, k, v, dropout_p=1.0)
    with pytest.raises(IndexError):
        ops.embedding(torch.tensor([[0, 11]]), torch.randn(11, 4))
    with pytest.raises(ValueError, match="reduction"):
        ops.negative_sampling_loss(torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long),
                                   torch.zeros(2, 1, dtype=torch.long), torch.randn(3, 2), torch.randn(3, 2),
                                   reduction="avg")


# the op's feature arguments (window, softcap, ALiBi, dropout) against the float64 reference
_FEATURES = {
    "window": dict(window=(2, 1)),
    "window_left_causal": dict(window=(3, -1), causal=True),
    "softcap": dict(softcap=1.5),
    "alibi_h": dict(alibi="h"),
    "alibi_bh_causal": dict(alibi="bh", causal=True),
    "all_with_mask": dict(window=(1, 0), softcap=2.0, alibi="h", mask=True),
}


def _features(name, g):
    kw = dict(_FEATURES[name])
    alibi = kw.pop("alibi", None)
    if alibi:
        kw["alibi_slopes"] = torch.rand((4,) if alibi == "h" else (2, 4), generator=g, dtype=torch.float64)
    if kw.pop("mask", False):
        kw["attn_mask"] = torch.rand(2, 1, 5, 7, generator=g) > 0.3
    return kw


def _grads_close(out, lse, ref, ref_lse, inputs, g, tol=1e-10):
    """Gradients of a loss using out (and lse, where every row has a key) equal the reference's."""
    w = torch.randn(out.shape, generator=g, dtype=torch.float64)
    wl = torch.randn(lse.shape, generator=g, dtype=torch.float64)
    use_lse = bool(torch.isfinite(ref_lse).all())
    grads = torch.autograd.grad((out * w).sum() + use_lse * (lse * wl).sum(), inputs)
    ref_grads = torch.autograd.grad((ref * w).sum() + use_lse * (ref_lse * wl).sum(), inputs)
    for name, a, b in zip("qkv", grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=lambda m, name=name: f"d{name}: {m}")


@pytest.mark.parametrize("name", list(_FEATURES))
def test_attention_op_features_match_reference(name):
    """The op with each feature (window, softcap, ALiBi (H,) and (B, H), all with a mask) equals
    embedattn.reference.attention in float64: output, lse and gradients (the lse's too)."""
    g = torch.Generator().manual_seed(8)
    q, k, v = _qkv()
    kw = _features(name, g)
    out, lse = ops.attention(q, k, v, return_lse=True, **kw)
    ref, ref_lse = embedattn.reference.attention(q, k, v, return_lse=True, **kw)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    finite = torch.isfinite(ref_lse)
    assert torch.equal(finite, torch.isfinite(lse)) and lse.dtype == torch.float64
    torch.testing.assert_close(lse[finite], ref_lse[finite], rtol=1e-12, atol=1e-12)
    _grads_close(out, lse, ref, ref_lse, (q, k, v), g)


def test_attention_op_features_follow_causal_offset():
    """Window and ALiBi distances are measured from the causal diagonal i + causal_offset (as in the
    kernels): with top-left alignment (offset 0) the op equals the reference on a mask-free shift."""
    q, k, v = _qkv(nq=7, nk=7)
    slopes = torch.rand(4, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    kw = dict(window=(2, 1), softcap=3.0, alibi_slopes=slopes)
    out = ops.attention(q, k, v, causal_offset=0, **kw)  # Nq == Nk: offset 0 is the reference's diagonal
    torch.testing.assert_close(out, embedattn.reference.attention(q, k, v, **kw), rtol=1e-12, atol=1e-12)
    # Nq < Nk: offset 0 (top-left) equals the reference on the first Nq keys only when the band ends there
    q2 = q[:, :, :3].detach().requires_grad_()
    out2 = ops.attention(q2, k, v, causal=True, causal_offset=0, **kw)
    ref2 = embedattn.reference.attention(q2, k[:, :, :3], v[:, :, :3], causal=True, **kw)
    torch.testing.assert_close(out2, ref2, rtol=1e-12, atol=1e-12)
    # attend() (what the modules call) follows the same convention eagerly
    out3 = ops.attend(q2, k, v, causal=True, causal_offset=0, scale=None, attn_mask=None, backend="reference", **kw)
    torch.testing.assert_close(out3, ref2, rtol=1e-12, atol=1e-12)


def test_attention_op_dropout_reproducible_and_consistent():
    """Dropout in the op: the same seed gives the same output, another seed another; seed=None follows
    torch.manual_seed; forward and backward use one mask: output, lse and gradients equal autograd
    through the reference fed that mask."""
    g = torch.Generator().manual_seed(10)
    q, k, v = _qkv()
    kw = dict(causal=True, softcap=2.0, alibi_slopes=torch.rand(4, generator=g, dtype=torch.float64))
    out, lse = ops.attention(q, k, v, dropout_p=0.3, seed=5, return_lse=True, **kw)
    assert torch.equal(out, ops.attention(q, k, v, dropout_p=0.3, seed=5, **kw))
    assert not torch.allclose(out, ops.attention(q, k, v, dropout_p=0.3, seed=6, **kw))
    torch.manual_seed(0)
    a = ops.attention(q, k, v, dropout_p=0.3, **kw)
    torch.manual_seed(0)
    assert torch.equal(a, ops.attention(q, k, v, dropout_p=0.3, **kw))
    keep = ops._ref_keep((2, 4, 5, 7), 0.3, 5, q.device)
    assert torch.equal(keep, ops._ref_keep((2, 4, 5, 7), 0.3, 5, q.device))
    assert 0.55 < keep.float().mean() < 0.85  # about 1 - dropout_p kept
    ref, ref_lse = embedattn.reference.attention(q, k, v, dropout_p=0.3, dropout_mask=keep, return_lse=True, **kw)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-12, atol=1e-12)  # of the undropped scores
    _grads_close(out, lse, ref, ref_lse, (q, k, v), g)
    # the registered backward op directly: same mask drawn again from the seed
    dout = torch.randn(out.shape, generator=g, dtype=torch.float64)
    args = (None, True, 2, 0.5, "reference", -1, -1, 2.0, kw["alibi_slopes"], 0.3, 5)
    o, lse2 = torch.ops.embedattn.attention_fwd(q, k, v, *args)
    dq, dk, dv = torch.ops.embedattn.attention_bwd(dout, q, k, v, o, lse2, *args[:5], None, *args[5:])
    want = torch.autograd.grad(o, (q, k, v), dout)
    for a, b in zip((dq, dk, dv), want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_ops_opcheck_features():
    """torch.library.opcheck on the feature arguments (window, softcap, ALiBi, dropout)."""
    q, k, v = _qkv(nq=4, nk=6, d=4)
    alibi = torch.rand(2, 4, generator=torch.Generator().manual_seed(12), dtype=torch.float64)
    feats = (1, 0, 2.0, alibi, 0.25, 9)
    torch.library.opcheck(torch.ops.embedattn.attention_fwd.default, (q, k, v, None, True, 2, 0.5, "reference",
                                                                       *feats))
    torch.library.opcheck(torch.ops.embedattn.attention_fwd.default, (q, k, v, None, False, 2, 0.5, "reference",
                                                                       -1, 3, 0.0, None, 0.0, 0))
    out, lse2 = torch.ops.embedattn.attention_fwd(q, k, v, None, True, 2, 0.5, "reference", *feats)
    dout = torch.randn(out.shape, dtype=torch.float64)
    torch.library.opcheck(torch.ops.embedattn.attention_bwd.default,
                          (dout, q.detach(), k.detach(), v.detach(), out.detach(), lse2.detach(), None, True, 2, 0.5,
                           "reference", torch.randn(lse2.shape, dtype=torch.float64), *feats),
                          test_utils=("test_schema", "test_faketensor"))


def _compiled(f, *args):
    import torch._dynamo.testing

    torch._dynamo.reset()
    cnt = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    out = torch.compile(f, fullgraph=True, backend=cnt)(*args)
    assert cnt.frame_count == 1
    assert [str(n.target) for n in cnt.graphs[0].graph.nodes].count("embedattn.attention_fwd") == 1
    return out, cnt


def test_attend_compiles_fullgraph_with_features():
    """attend() under torch.compile(fullgraph=True, backend="aot_eager") with softcap + window + ALiBi:
    one graph through the registered op (autograd included); values and gradients equal the reference."""
    q, k, v = _qkv()
    slopes = torch.rand(4, generator=torch.Generator().manual_seed(13), dtype=torch.float64)
    kw = dict(softcap=2.0, window=(3, -1), alibi_slopes=slopes)

    def f(q, k, v):
        return ops.attend(q, k, v, causal=True, causal_offset=2, scale=None, attn_mask=None, backend="reference",
                          **kw)

    out, _ = _compiled(f, q, k, v)
    ref = embedattn.reference.attention(q, k, v, causal=True, **kw)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    w = torch.randn(out.shape, dtype=torch.float64)
    for a, b in zip(torch.autograd.grad((out * w).sum(), (q, k, v)), torch.autograd.grad((ref * w).sum(), (q, k, v))):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_attend_compiles_fullgraph_with_dropout():
    """Dropout under torch.compile(fullgraph=True): a given seed gives the eager op's output and
    gradients (one mask in the traced forward and backward); seed=None (with capture_scalar_outputs)
    draws a fresh seed per call from torch's RNG, in the graph."""
    q, k, v = _qkv()

    def f(q, k, v, seed=None):
        return ops.attend(q, k, v, causal=False, causal_offset=2, scale=None, attn_mask=None, backend="reference",
                          softcap=2.0, dropout_p=0.3, seed=seed)

    out, _ = _compiled(lambda q, k, v: f(q, k, v, 7), q, k, v)
    ref = ops.attention(q, k, v, softcap=2.0, dropout_p=0.3, seed=7)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    w = torch.randn(out.shape, dtype=torch.float64)
    for a, b in zip(torch.autograd.grad((out * w).sum(), (q, k, v)), torch.autograd.grad((ref * w).sum(), (q, k, v))):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    with torch._dynamo.config.patch(capture_scalar_outputs=True):
        torch._dynamo.reset()
        cf = torch.compile(f, fullgraph=True, backend="aot_eager")
        torch.manual_seed(1)
        a, b = cf(q, k, v), cf(q, k, v)
        torch.manual_seed(1)
        assert torch.equal(a, cf(q, k, v)) and not torch.allclose(a, b)


# --------------------------------------------------------------------------------------------------
# embedattn.nn
# --------------------------------------------------------------------------------------------------
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
    ref = m.proj(TORCH_SDPA(q, k, v, attn_mask=mask).transpose(1, 2).reshape(2, 9, 24))
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


def test_tiny_gpt_compiles_fullgraph():
    """torch.compile(fullgraph=True) traces TinyGPT in one graph through the registered ops (fake
    impls and autograd included: aot_eager), and matches eager values and gradients."""
    import torch._dynamo.testing

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = TinyGPT(40, 16, dim=16, num_layers=2, num_heads=2, num_kv_heads=1, backend="reference")
    data = torch.randint(0, 40, (2, 13))
    cnt = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    _, loss = torch.compile(model, fullgraph=True, backend=cnt)(data[:, :-1], data[:, 1:])
    loss.backward()
    g = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    _, loss_eager = model(data[:, :-1], data[:, 1:])
    loss_eager.backward()
    assert cnt.frame_count == 1
    targets = [str(n.target) for n in cnt.graphs[0].graph.nodes]
    assert targets.count("embedattn.attention_fwd") == 2 and targets.count("embedattn.embedding_fwd") == 1
    torch.testing.assert_close(loss, loss_eager, rtol=1e-6, atol=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(g[n], p.grad, rtol=1e-5, atol=1e-6)


_FAKE_CUDA_TRACE = r"""
import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
import embedattn.ops as ops

hits = []
launch = ops._Launch.__getitem__
ops._Launch.__getitem__ = lambda self, grid: hits.append(getattr(self._kernel, "fn", self._kernel).__name__) or \
    launch(self, grid)
mode = FakeTensorMode()
fc = lambda *s, dtype=torch.float16: FakeTensor(mode, torch.empty(*s, dtype=dtype, device="meta"), torch.device("cuda"))
E = torch.ops.embedattn
with mode:
    q, k, v = fc(2, 4, 37, 24), fc(2, 2, 45, 24), fc(2, 2, 45, 24)
    mask = fc(2, 1, 37, 45, dtype=torch.bool)
    o, lse2 = E.attention_fwd(q, k, v, mask, True, 8, 0.2, "auto")
    E.attention_bwd(o, q, k, v, o, lse2, mask, True, 8, 0.2, "auto")
    w, ids, y = fc(50, 24, dtype=torch.float32), fc(39, dtype=torch.int64), fc(39, 24, dtype=torch.float32)
    E.embedding_fwd(ids, w, fc(40, 24, dtype=torch.float32), None, 13, 1, 1.0, 0, -1, "auto")
    E.embedding_bwd(y, ids, ids, 50, 40, 13, 1.0, 0, 3, True, "auto")
    c, n = fc(9, dtype=torch.int64), fc(9, 4, dtype=torch.int64)
    loss, coef = E.negative_sampling_fwd(c, c, n, w, w, "auto")
    E.negative_sampling_bwd(c, c, n, w, w, coef, loss, "auto")
    feats = (3, -1, 2.5, fc(2, 4, dtype=torch.float32), 0.1, 1234)  # window, softcap, ALiBi, dropout
    o, lse2 = E.attention_fwd(q, k, v, None, True, 8, 0.2, "auto", *feats)
    E.attention_bwd(o, q, k, v, o, lse2, None, True, 8, 0.2, "auto", lse2, *feats)
print(",".join(hits))
"""


@pytest.mark.skipif(not HAS_TRITON or ON_CUDA, reason="CPU-side check of the CUDA path")
def test_cuda_launchers_trace_with_fake_tensors():
    """The ops' CUDA branch (the kernels' own launchers, autotuned, kernels routed through wrap_triton)
    runs on fake CUDA tensors, as torch.compile traces it: every kernel launch reaches wrap_triton and
    nothing reads device memory, also with every attention feature argument set. Runs in a fresh
    process without the interpreter. (The learned-position
    gradient is left out: CPU-only torch builds cannot slice fake CUDA tensors in place.)"""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["EMBEDATTN_AUTOTUNE"] = "1"
    res = subprocess.run([sys.executable, "-c", _FAKE_CUDA_TRACE], env=env, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    hits = res.stdout.strip().splitlines()[-1].split(",")
    attn = ["_attn_fwd", "_bwd_preprocess", "_attn_bwd_dkdv", "_attn_bwd_dq"]
    assert hits == attn + ["_fwd_kernel", "_bwd_sorted_kernel", "_bwd_sorted_kernel", "_fwd_kernel",
                           "_bwd_kernel"] + attn, hits


# --------------------------------------------------------------------------------------------------
# CUDA: the Triton kernels inside the ops, under Inductor
# --------------------------------------------------------------------------------------------------
@cuda_only
def test_cuda_ops_opcheck_triton():
    q, k, v = _qkv(nq=37, nk=45, d=24, dtype=torch.float16, device="cuda")
    torch.library.opcheck(torch.ops.embedattn.attention_fwd.default, (q, k, v, None, True, 8, 0.2, "auto"))
    feats = (3, -1, 2.5, torch.rand(4, device="cuda"), 0.1, 1234)  # window, softcap, ALiBi, dropout
    torch.library.opcheck(torch.ops.embedattn.attention_fwd.default, (q, k, v, None, True, 8, 0.2, "auto", *feats))
    w = torch.randn(50, 24, device="cuda", requires_grad=True)
    p = torch.randn(40, 24, device="cuda", requires_grad=True)
    ids = torch.randint(0, 50, (3 * 13,), device="cuda")
    torch.library.opcheck(torch.ops.embedattn.embedding_fwd.default, (ids, w, p, None, 13, 1, 1.0, 0, -1, "auto"))
    c, x, n = (torch.randint(0, 40, s, device="cuda") for s in ((9,), (9,), (9, 4)))
    wi = torch.randn(40, 24, device="cuda", requires_grad=True)
    torch.library.opcheck(torch.ops.embedattn.negative_sampling_fwd.default, (c, x, n, wi, p, "auto"))


@cuda_only
def test_cuda_inductor_compiles_kernels():
    """Inductor compiles TinyGPT (fullgraph) with our Triton kernels; values and gradients match eager."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = TinyGPT(100, 64, dim=64, num_layers=2, num_heads=4, num_kv_heads=2).cuda()
    data = torch.randint(0, 100, (4, 49), device="cuda")
    _, loss = torch.compile(model, fullgraph=True)(data[:, :-1], data[:, 1:])
    loss.backward()
    g = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    _, loss_eager = model(data[:, :-1], data[:, 1:])
    loss_eager.backward()
    torch.testing.assert_close(loss, loss_eager, rtol=1e-4, atol=1e-4)
    for n, p in model.named_parameters():
        torch.testing.assert_close(g[n], p.grad, rtol=1e-3, atol=1e-4)


@cuda_only
def test_cuda_transformers_training_step_and_generate():
    """A transformers Llama in bf16 on CUDA with our kernel: a training step and generate()."""
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).cuda().to(torch.bfloat16)
    model.set_attn_implementation(ea_hf.register())
    ids = torch.randint(1, 128, (2, 33), device="cuda")
    am = torch.ones_like(ids)
    am[1, :5] = 0
    loss = model(input_ids=ids, attention_mask=am, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    out = model.eval().generate(input_ids=ids, attention_mask=am, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 41)
