"""transformers integration: AttentionInterface registration, parity with sdpa/eager, generate, dropout,
fallbacks, torch.compile(fullgraph=True).

Models are built from tiny configs (no downloads). On CPU the "triton" backend runs through the
interpreter (set by conftest); CUDA-only checks are marked and run under ``EMBEDATTN_TEST_DEVICE=cuda``.
"""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F
from helpers import BACKENDS, DEVICE, ON_CUDA, graph_targets


def cuda_only(f):
    return pytest.mark.cuda(pytest.mark.skipif(not ON_CUDA, reason="needs CUDA")(f))


def _dtype(backend):
    # the reference runs float64 (tight comparisons); the kernels float32
    return torch.float64 if backend == "reference" else torch.float32


def _tol(dtype):
    return dict(rtol=1e-9, atol=1e-10) if dtype == torch.float64 else dict(rtol=2e-4, atol=2e-5)


transformers = pytest.importorskip("transformers")
import embedattn.integrations.transformers as ea_hf  # noqa: E402

TORCH_SDPA = F.scaled_dot_product_attention


@pytest.fixture
def attend_calls(monkeypatch):
    """Records every call embedattn.attention runs (the integration's included: not a fallback to sdpa), with the
    checked spec it runs and the backend decided for it."""
    calls = []
    ea = importlib.import_module("embedattn.attention")
    orig = ea._run

    def spy(be, q, k, v, spec, return_lse):
        calls.append(dict(backend=be, causal=spec.causal, causal_offset=spec.causal_offset, softcap=spec.softcap,
                          dropout_p=spec.dropout_p, q_shape=tuple(q.shape), k_shape=tuple(k.shape)))
        return orig(be, q, k, v, spec, return_lse)

    monkeypatch.setattr(ea, "_run", spy)
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


def _gemma2(dtype, **kw):
    cfg = transformers.Gemma2Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                    num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                    max_position_embeddings=64, sliding_window=4, attn_logit_softcapping=5.0, **kw)
    torch.manual_seed(0)
    return transformers.AutoModel.from_config(cfg, attn_implementation="eager").to(DEVICE, dtype)


def _compile_counted(model, ids, am):
    import torch._dynamo.testing

    torch._dynamo.reset()
    cnt = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    h = torch.compile(model, fullgraph=True, backend=cnt)(input_ids=ids, attention_mask=am).last_hidden_state
    # fullgraph=True raises on any graph break; in training mode transformers adds an empty wrapper frame
    assert sum(len(g.graph.nodes) > 0 for g in cnt.graphs) == 1
    ops_in_graph = [t for g in cnt.graphs for t in graph_targets(g)].count("embedattn.attention_fwd")
    return h, ops_in_graph


def test_transformers_compiles_fullgraph(attend_calls):
    """torch.compile(fullgraph=True) of a transformers model with our attention: one graph, through
    embedattn (the reference on the CPU by default; the kernels' op with backend="triton")."""
    model = _llama(torch.float64)
    model.set_attn_implementation(ea_hf.register("embedattn_compile", backend="reference"))
    ids, am = _batch("left")
    h, n_ops = _compile_counted(model, ids, am)
    assert len(attend_calls) == 2 and n_ops == 0  # traced through embedattn.attention's reference road
    h_eager = model(input_ids=ids, attention_mask=am).last_hidden_state
    torch.testing.assert_close(h[am.bool()], h_eager[am.bool()], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_transformers_gemma2_dropout_softcap_compiles_fullgraph(backend, attend_calls):
    """A Gemma-2 model in training mode (attention dropout, logit soft-capping, sliding-window layers)
    compiles with fullgraph=True and runs embedattn there, with softcap and dropout reaching it. With a
    given torch seed the compiled model repeats itself; in eval it equals the eager model."""
    dtype = torch.float64 if backend == "reference" else torch.float32
    model = _gemma2(dtype, attention_dropout=0.25)
    model.set_attn_implementation(ea_hf.register(f"embedattn_gemma_compile_{backend}", backend=backend))
    ids, am = _batch("left")
    torch.manual_seed(3)
    h, n_ops = _compile_counted(model.train(), ids, am)
    assert [(c["softcap"], c["dropout_p"]) for c in attend_calls] == [(5.0, 0.25)] * 2
    assert n_ops == (2 if backend == "triton" else 0)  # the kernels' registered op is in the graph
    assert torch.isfinite(h[am.bool()]).all()
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.manual_seed(3)
    a = compiled(input_ids=ids, attention_mask=am).last_hidden_state[am.bool()]
    torch.manual_seed(3)
    b = compiled(input_ids=ids, attention_mask=am).last_hidden_state[am.bool()]
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    model.eval()
    torch._dynamo.reset()
    h_eval = torch.compile(model, fullgraph=True, backend="aot_eager")(input_ids=ids, attention_mask=am)
    h_eager = model(input_ids=ids, attention_mask=am).last_hidden_state
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(h_eval.last_hidden_state[am.bool()], h_eager[am.bool()], rtol=tol, atol=tol)
    assert not torch.allclose(a, h_eager[am.bool()])  # dropout was on in training


def test_transformers_output_attentions_behaves_like_sdpa(attend_calls):
    """output_attentions=True: no weights, as with sdpa: one transformers warning (warning_once, like sdpa's),
    the model's attentions equal sdpa's (an empty tuple in transformers 5), and the kernel still runs."""
    import logging

    from transformers.utils import logging as hf_logging

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = hf_logging.get_logger(ea_hf.__name__)
    logger.addHandler(handler)
    logging.Logger.warning_once.cache_clear()
    try:
        model = _llama(torch.float64)
        ids, am = _batch("right")
        out = {}
        for impl in ("sdpa", ea_hf.register("embedattn_weights", backend="reference")):
            model.set_attn_implementation(impl)
            out[impl] = model(input_ids=ids, attention_mask=am, output_attentions=True)
    finally:
        logger.removeHandler(handler)
    ours, sdpa = out["embedattn_weights"], out["sdpa"]
    assert type(ours.attentions) is type(sdpa.attentions) and len(ours.attentions) == len(sdpa.attentions)
    assert all(a is None for a in ours.attentions)
    assert [r.getMessage() for r in records] == [ea_hf._NO_WEIGHTS]
    assert len(attend_calls) == 2
    torch.testing.assert_close(ours.last_hidden_state[am.bool()], sdpa.last_hidden_state[am.bool()],
                               rtol=1e-9, atol=1e-10)

def test_transformers_register_errors():
    with pytest.raises(ValueError, match="name"):
        ea_hf.register("")
    with pytest.raises(ValueError, match="name"):
        ea_hf.register("paged|x")
    with pytest.raises(ValueError, match="backend"):
        ea_hf.register("embedattn_bad", backend="cuda")
    assert ea_hf.register() == "embedattn"
    assert "embedattn" in transformers.AttentionInterface._global_mapping


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
