"""transformers integration: today's models on embedattn, exactly, with no N x N masks.

transformers' own model classes on tiny random configs (1-2 layers, a handful of tokens) against
``attn_implementation="eager"``: logits and every parameter's gradient on unpadded, left-padded and packed batches,
generate() with a dynamic and a static cache, torch.compile(fullgraph=True), and the keywords every installed model
passes to its attention function. The ``roads`` fixture records each attention call the integration makes (the
function, the mask it hands the kernel), so a test also says which road every call took: a fallback or a dense
mask where a kernel feature serves fails it.

The FlashAttention rule at model level: each output and gradient of an fp32 embedattn model is within 2x the error
of the fp32 eager model, both measured against the eager model in float64. On the CPU the "triton" backend runs the
kernels through the interpreter (set by conftest).
"""

from __future__ import annotations

import ast
import importlib
import pathlib
import re

import pytest
import torch
from helpers import BACKENDS, DEVICE, ON_CUDA, assert_fa_close, graph_targets

transformers = pytest.importorskip("transformers")
import embedattn.integrations.transformers as ea_hf  # noqa: E402


def cuda_only(f):
    return pytest.mark.cuda(pytest.mark.skipif(not ON_CUDA, reason="needs CUDA")(f))


# --------------------------------------------------------------------------------------------------
# the models: tiny random configs of transformers' own classes
# --------------------------------------------------------------------------------------------------
_SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
              num_key_value_heads=1, max_position_embeddings=64)
_TWO = ["sliding_attention", "full_attention"]
ARCHS = {
    "llama": ("LlamaConfig", {}),
    "qwen3": ("Qwen3Config", dict(head_dim=16, use_sliding_window=True, sliding_window=4, layer_types=_TWO)),
    "mistral": ("MistralConfig", dict(sliding_window=4)),
    "gemma2": ("Gemma2Config", dict(head_dim=16, sliding_window=4, attn_logit_softcapping=5.0, layer_types=_TWO)),
    "gemma3": ("Gemma3TextConfig", dict(head_dim=16, sliding_window=4, layer_types=_TWO)),
    # the global layer has Gemma 4's head dim 512
    "gemma4": ("Gemma4TextConfig", dict(head_dim=16, sliding_window=4, layer_types=_TWO, global_head_dim=512,
                                        vocab_size_per_layer_input=64, hidden_size_per_layer_input=8)),
    # learned sinks (s_aux), randomized below
    "gpt_oss": ("GptOssConfig", dict(head_dim=16, sliding_window=4, layer_types=_TWO, num_local_experts=2,
                                     num_experts_per_tok=1)),
    # MLA: q/k head dim 24, v head dim 12
    "deepseek_v3": ("DeepseekV3Config", dict(num_key_value_heads=2, kv_lora_rank=16, q_lora_rank=None,
                                             qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=12,
                                             n_routed_experts=2, n_shared_experts=1, norm_topk_prob=False,
                                             first_k_dense_replace=1, num_experts_per_tok=1, n_group=1, topk_group=1,
                                             moe_intermediate_size=16)),
    # a chunked layer (dense: no kernel equivalent) and a full one
    "llama4": ("Llama4TextConfig", dict(head_dim=16, attention_chunk_size=4, num_local_experts=2,
                                        num_experts_per_tok=1, intermediate_size_mlp=48,
                                        layer_types=["chunked_attention", "full_attention"], no_rope_layers=[1, 0])),
}
DENSE_LAYERS = {"llama4": {"chunked_attention"}}  # layers whose mask has no kernel equivalent (the list)


def _config(arch: str, **kw):
    cls, extra = ARCHS[arch]
    return getattr(transformers, cls)(**{**_SMALL, **extra, **kw})


def _model(arch: str, dtype=torch.float32, **kw):
    cfg = _config(arch, **kw)
    torch.manual_seed(0)
    # eager experts: transformers' grouped_mm experts have no float64 (the oracle)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager",
                                                          experts_implementation="eager")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "sinks" in name:
                p.normal_()  # gpt-oss initializes its sinks to zero, which would hide a dropped sink
    return model.to(DEVICE, dtype)


def _layer_types(model) -> list[str]:
    cfg = model.config
    return list(getattr(cfg, "layer_types", None) or ["full_attention"] * cfg.num_hidden_layers)


_PACKED_POSITIONS = [0, 1, 2, 3, 0, 1, 2, 0, 1]  # three sequences of 4, 3, 2 tokens in one row


def _batch(kind: str, b: int = 2, n: int = 9):
    """(model kwargs, which logits rows count): unpadded, left-padded, or packed (one row, restarting positions,
    as DataCollatorWithFlattening makes it; no attention mask and no cache, so transformers finds the sequences)."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 64, (b, n), generator=g).to(DEVICE)
    if kind == "packed":
        pos = torch.tensor([_PACKED_POSITIONS], device=DEVICE)
        return dict(input_ids=ids[:1], position_ids=pos, use_cache=False), torch.ones(1, n, dtype=torch.bool)
    if kind == "none":
        return dict(input_ids=ids, use_cache=False), torch.ones(b, n, dtype=torch.bool)
    am = torch.ones(b, n, dtype=torch.long, device=DEVICE)
    am[-1, :4] = 0
    return dict(input_ids=ids, attention_mask=am, use_cache=False), am.bool().cpu()


def _forward_backward(model, impl: str, kw: dict, valid, split: bool = False):
    """Logits of the valid positions and every parameter's gradient of one forward + backward of the batch ``kw``.
    ``split``: the batch as what it means, each sequence run alone at its own positions (a padded row without its
    padding, each packed sequence on its own). The eager oracle runs split: transformers' eager attention gives NaN
    on left-padded rows in float64 (masked rows reach -inf), and it attends across the packed sequences of Mistral
    and gpt-oss (their masks are built without position_ids)."""
    model.set_attn_implementation(impl)
    model.zero_grad(set_to_none=True)
    if split:
        ids, pos = kw["input_ids"], kw.get("position_ids")
        pieces = []
        for b in range(ids.shape[0]):
            if pos is not None:  # packed: a sequence starts where the positions restart
                starts = [i for i, p in enumerate(pos[b].tolist()) if p == 0] + [ids.shape[1]]
                pieces += [(b, torch.arange(a, e)) for a, e in zip(starts, starts[1:])]
            else:
                pieces.append((b, valid[b].nonzero().flatten()))
        logits = torch.cat([model(input_ids=ids[b, cols.to(DEVICE)][None],
                                  position_ids=(pos[b, cols] if pos is not None else cols)[None].to(DEVICE),
                                  use_cache=False).logits[0] for b, cols in pieces])
    else:
        logits = model(**kw).logits[valid.to(DEVICE)]  # padded positions are don't-care
    (logits.square().sum() + logits.sum()).backward()
    return {"logits": logits.detach(), **{n: p.grad.detach().clone() for n, p in model.named_parameters()
                                          if p.grad is not None}}


def _assert_model_close(ours: dict, eager32: dict, eager64: dict, what: str) -> None:
    """FlashAttention's rule per tensor (the logits and each gradient), with eps relative to its size."""
    assert ours.keys() == eager64.keys(), f"{what}: gradients for {set(ours) ^ set(eager64)} differ in presence"
    for name, ref in eager64.items():
        assert torch.isfinite(ref).all() and torch.isfinite(eager32[name]).all(), f"{what} {name}: eager not finite"
        eps = 1e-5 * max(1.0, ref.abs().max().item())
        assert_fa_close(ours[name], ref, eager32[name], name=f"{what} {name}", eps=eps)


# --------------------------------------------------------------------------------------------------
# the roads: every call the integration makes, with the mask it hands over
# --------------------------------------------------------------------------------------------------
@pytest.fixture
def roads(monkeypatch):
    """Records each embedattn call of the integration: ``road`` ("dense" or "varlen"), the ``mask`` shape handed
    to the kernel (None: no mask), causal/window/offset, q/k/v shapes, sinks, dropout, softcap. Calls that go
    to transformers' sdpa instead are recorded as road "sdpa"."""
    calls = []
    dense, varlen, sdpa = ea_hf.attention, ea_hf.attention_varlen, ea_hf._sdpa_forward()

    def record(road, q, k, v, kw):
        m = kw.get("attn_mask")
        calls.append(dict(road=road, mask=None if m is None else tuple(m.shape), causal=kw.get("causal"),
                          window=kw.get("window"), causal_offset=kw.get("causal_offset"), q=tuple(q.shape),
                          k=tuple(k.shape), v=tuple(v.shape), sinks=kw.get("sinks") is not None,
                          dropout_p=kw.get("dropout_p", 0.0), softcap=kw.get("softcap", 0.0),
                          backend=kw.get("backend")))

    def spy_dense(q, k, v, **kw):
        record("dense", q, k, v, kw)
        return dense(q, k, v, **kw)

    def spy_varlen(q, k, v, *args, **kw):
        record("varlen", q, k, v, kw)
        return varlen(q, k, v, *args, **kw)

    def spy_sdpa(*args, **kw):
        calls.append(dict(road="sdpa"))
        return sdpa(*args, **kw)

    monkeypatch.setattr(ea_hf, "attention", spy_dense)
    monkeypatch.setattr(ea_hf, "attention_varlen", spy_varlen)
    monkeypatch.setattr(ea_hf, "_sdpa_forward", lambda: spy_sdpa)
    return calls


def _n_by_n(call) -> bool:
    """A mask with a query dim and a key dim (Nq x Nk) was handed over; (B, 1, 1, Nk) key masks are O(N)."""
    return call["mask"] is not None and call["mask"][-2] > 1 and call["mask"][-1] > 1


def _check_roads(calls, model, kind: str, passes: int) -> None:
    """``passes`` forwards of ``model`` all ran on embedattn, one call per layer, on the road ``kind`` asks for."""
    types = _layer_types(model) * passes
    assert [c["road"] for c in calls] != [] and len(calls) == len(types), (len(calls), len(types))
    dense_ok = DENSE_LAYERS.get(model.config.model_type.replace("_text", ""), set())
    for call, layer in zip(calls, types):
        if layer in dense_ok:
            assert call["road"] == "dense" and _n_by_n(call), call  # transformers' own mask, read tile by tile
            continue
        assert call["road"] != "sdpa" and not _n_by_n(call), (layer, call)
        if kind == "packed":
            assert call["road"] == "varlen", call
        else:
            assert call["road"] == "dense" and call["causal"], call
            assert call["mask"] == (None if kind == "none" else (call["q"][0], 1, 1, call["k"][2])), call
        if layer == "sliding_attention":
            assert call["window"] == (model.config.sliding_window - 1, -1), call


# --------------------------------------------------------------------------------------------------
# every model, both backends: logits and gradients, and which roads they took
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", list(ARCHS))
def test_model_matches_eager(arch, backend, roads):
    """Logits and every parameter's gradient of an unpadded, a left-padded and a packed batch equal eager's (the
    FlashAttention rule against eager in float64, each sequence run alone by eager), every call on embedattn, no
    N x N mask but for Llama 4's chunked layer: causal with no mask, a (B, 1, 1, N) key mask, the varlen kernel."""
    name = ea_hf.register(f"embedattn_{backend}", backend=backend)
    model32, model64 = _model(arch), _model(arch, torch.float64)
    for kind in ("none", "left", "packed"):
        kw, valid = _batch(kind)
        eager64 = _forward_backward(model64, "eager", kw, valid, split=True)
        eager32 = _forward_backward(model32, "eager", kw, valid, split=True)
        roads.clear()
        ours = _forward_backward(model32, name, kw, valid)
        _check_roads(roads, model32, kind, passes=1)
        assert {c["backend"] for c in roads} == {backend}
        _assert_model_close(ours, eager32, eager64, f"{arch} {kind}")
    if arch == "gpt_oss":
        assert all(c["sinks"] for c in roads)  # s_aux reached the kernel (and its gradient came back above)
    if arch == "deepseek_v3":
        assert all(c["v"][-1] == 12 and c["q"][-1] == 24 for c in roads)  # MLA's own value head dim, no padding
    if arch == "gemma4":
        assert {c["q"][-1] for c in roads} == {16, 512}
    if arch == "gemma2":
        assert all(c["softcap"] == 5.0 for c in roads)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", list(ARCHS))
def test_generate_matches_eager(arch, backend, cache, roads):
    """Greedy generate() from a left-padded batch, with transformers' default dynamic cache and with a static cache
    (the sliding layers' rolling one included): eager's tokens, every call on embedattn, decoding steps with a key
    mask (the static cache's position stays on the device) and no N x N mask."""
    model = _model(arch).eval()
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(1, 64, (2, 7), generator=g).to(DEVICE)
    am = torch.ones(2, 7, dtype=torch.long, device=DEVICE)
    am[1, :3] = 0
    out = {}
    for impl in ("eager", ea_hf.register(f"embedattn_{backend}", backend=backend)):
        model.set_attn_implementation(impl)
        out[impl] = model.generate(input_ids=ids, attention_mask=am, max_new_tokens=3, do_sample=False,
                                   pad_token_id=0, cache_implementation=cache)
    assert torch.equal(out["eager"], out[f"embedattn_{backend}"])
    n_layers = model.config.num_hidden_layers
    assert len(roads) == 3 * n_layers and all(c["road"] == "dense" for c in roads)
    dense_ok = DENSE_LAYERS.get(arch, set())
    for step in range(3):
        for call, layer in zip(roads[step * n_layers:(step + 1) * n_layers], _layer_types(model)):
            if layer in dense_ok:
                continue
            assert not _n_by_n(call), call
            if step:  # a decoding step: one query; the padded row's keys masked (unless a window left them)
                assert call["q"][2] == 1 and call["mask"] in (None, (2, 1, 1, call["k"][2])), call
                assert call["mask"] is not None or call["window"] is not None, call


def test_gemma4_kv_shared_layers_slice_the_mask(roads, monkeypatch):
    """Gemma 4's KV-shared layers run only the last prompt token and slice the mask's queries
    (``mask[:, :, -1:, :]``) in generate(): the KernelMask slices to that query and its diagonal."""
    sliced = []
    orig = ea_hf.KernelMask.__getitem__
    monkeypatch.setattr(ea_hf.KernelMask, "__getitem__", lambda self, i: sliced.append(i) or orig(self, i))
    model = _model("gemma4", num_hidden_layers=4, layer_types=_TWO * 2, global_head_dim=32,
                   num_kv_shared_layers=2).eval()
    kw = _batch("left", n=7)[0]
    ids, am = kw["input_ids"], kw["attention_mask"]
    out = {}
    for impl in ("eager", ea_hf.register("embedattn_reference", backend="reference")):
        model.set_attn_implementation(impl)
        out[impl] = model.generate(input_ids=ids, attention_mask=am, max_new_tokens=3, do_sample=False,
                                   pad_token_id=0)
    assert torch.equal(out["eager"], out["embedattn_reference"])
    assert sliced and all(i[2] == slice(-1, None) for i in sliced)
    assert not any(_n_by_n(c) for c in roads)


def test_bert_encoder_matches_sdpa(roads):
    """A bidirectional encoder with right padding: a key mask, not causal, equal to sdpa (pad rows included)."""
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=48, max_position_embeddings=64, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    model = transformers.AutoModel.from_config(cfg, attn_implementation="sdpa").to(DEVICE, torch.float64)
    ids = _batch("none")[0]["input_ids"]
    am = torch.ones_like(ids)
    am[-1, 5:] = 0
    h = {}
    for impl in ("sdpa", ea_hf.register("embedattn_reference", backend="reference")):
        model.set_attn_implementation(impl)
        h[impl] = model(input_ids=ids, attention_mask=am).last_hidden_state
    torch.testing.assert_close(h["embedattn_reference"], h["sdpa"], rtol=1e-9, atol=1e-10)
    assert [(c["road"], c["causal"], c["mask"]) for c in roads] == [("dense", False, (2, 1, 1, 9))] * 2


# --------------------------------------------------------------------------------------------------
# packed sequences: transformers' flash keywords, and under torch.compile
# --------------------------------------------------------------------------------------------------
def _flattened(n_seqs=(4, 3, 2)):
    collator = transformers.DataCollatorWithFlattening(return_flash_attn_kwargs=True)
    g = torch.Generator().manual_seed(3)
    feats = [{"input_ids": torch.randint(1, 64, (n,), generator=g).tolist()} for n in n_seqs]
    batch = collator(feats)
    batch.pop("labels")
    return {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


@pytest.mark.parametrize("arch", ["llama", "gpt_oss"])
def test_flash_kwargs_packed_batch(arch, roads):
    """DataCollatorWithFlattening(return_flash_attn_kwargs=True): cu_seq_lens_q/k and max_length_q/k go to the
    varlen kernel as they are (int32 cu, python ints), and the model equals eager run on each sequence alone."""
    batch = _flattened()
    assert batch["cu_seq_lens_q"].tolist() == [0, 4, 7, 9] and batch["max_length_q"] == 4
    assert batch["position_ids"].tolist() == [_PACKED_POSITIONS]
    model = _model(arch, torch.float64)
    ours = _forward_backward(model, ea_hf.register("embedattn_reference", backend="reference"),
                             {**batch, "use_cache": False}, torch.ones(1, 9, dtype=torch.bool))
    assert [c["road"] for c in roads] == ["varlen"] * 2
    want = _forward_backward(model, "eager", batch, None, split=True)
    for name, ref in want.items():  # eager's softmax runs in float32 even for float64 models
        torch.testing.assert_close(ours[name], ref, rtol=1e-6, atol=1e-7 * max(1.0, ref.abs().max().item()))


def _compiled(model, **kw):
    import torch._dynamo.testing

    torch._dynamo.reset()
    cnt = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    out = torch.compile(model, fullgraph=True, backend=cnt)(**kw)
    # fullgraph=True raises on any graph break; in training mode transformers adds an empty wrapper frame
    assert sum(len(g.graph.nodes) > 0 for g in cnt.graphs) == 1
    return out, [t for g in cnt.graphs for t in graph_targets(g)]


def test_compiles_fullgraph_without_dense_masks(roads):
    """torch.compile(fullgraph=True): left-padded (key mask), unpadded (causal, no mask; a device assertion that
    the positions do not restart), packed through the flash keywords (varlen): one graph each, eager's values,
    no N x N mask. A packed batch without the keywords, which transformers cannot detect while tracing, fails
    with an error saying what to pass."""
    model = _model("llama", torch.float64)
    model.set_attn_implementation(ea_hf.register("embedattn_reference", backend="reference"))
    flat = _flattened()
    cases = [("left", _batch("left")[0]), ("none", _batch("none")[0]),
             ("packed", {**flat, "use_cache": False})]
    for kind, kw in cases:
        roads.clear()
        out, _ = _compiled(model, **kw)
        assert roads and not any(_n_by_n(c) for c in roads), (kind, roads)
        assert {c["road"] for c in roads} == {"varlen" if kind == "packed" else "dense"}
        n_calls = len(roads)
        ref = model(**kw).logits  # the same model, not compiled (equal to eager: test_model_matches_eager)
        assert [c["road"] for c in roads[n_calls:]] == [c["road"] for c in roads[:n_calls]]
        torch.testing.assert_close(out.logits, ref, rtol=1e-12, atol=1e-12)
    packed = {k: flat[k] for k in ("input_ids", "position_ids")}
    with pytest.raises(RuntimeError, match="cu_seq_lens_q"):
        _compiled(model, **packed, use_cache=False)


@pytest.mark.parametrize("backend", [BACKENDS[-1]])  # the kernels where there are (the reference compiles above)
def test_gemma2_dropout_softcap_compiles_fullgraph(backend, roads):
    """A Gemma-2 model in training mode (attention dropout, logit soft-capping, sliding-window layers) compiles with
    fullgraph=True and runs embedattn there, with softcap, the window and dropout reaching it. With a given torch
    seed the compiled model repeats itself; in eval (a recompile) it equals the eager model."""
    import torch._dynamo.testing

    dtype = torch.float64 if backend == "reference" else torch.float32
    model = _model("gemma2", dtype, attention_dropout=0.25).train()
    model.set_attn_implementation(ea_hf.register(f"embedattn_{backend}", backend=backend))
    kw, valid = _batch("left")
    valid = valid.to(DEVICE)
    torch._dynamo.reset()
    cnt = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, fullgraph=True, backend=cnt)
    torch.manual_seed(3)
    a = compiled(**kw).logits[valid]
    assert sum(len(g.graph.nodes) > 0 for g in cnt.graphs) == 1  # fullgraph; training adds an empty wrapper frame
    targets = [t for g in cnt.graphs for t in graph_targets(g)]
    torch.manual_seed(3)
    b = compiled(**kw).logits[valid]  # (the roads spy's list, now not empty, costs this call a recompile)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert targets.count("embedattn.attention_fwd") == (2 if backend == "triton" else 0)  # the kernels' op
    assert [(c["softcap"], c["dropout_p"], c["window"]) for c in roads[:2]] == [(5.0, 0.25, (3, -1)),
                                                                                (5.0, 0.25, None)]
    assert torch.isfinite(a).all()
    model.eval()
    h_eval = compiled(**kw).logits[valid]
    h_eager = model(**kw).logits[valid]
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(h_eval, h_eager, rtol=tol, atol=tol)
    assert not torch.allclose(a, h_eager)  # dropout was on in training


def test_compiled_static_cache_decoding():
    """Decoding steps with a static cache compiled with fullgraph=True (the masks built ahead by transformers'
    create_masks_for_generate, as generate() does for a compileable cache, then handed to the compiled model):
    eager's tokens, no more compiled frames than eager attention needs (no roads spy here: its list would add
    guards), one-query key masks with the position folded in (nothing per-step for dynamo to guard on)."""
    import torch._dynamo.testing

    model = _model("gemma2").eval()
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(1, 64, (2, 7), generator=g).to(DEVICE)
    am0 = torch.ones(2, 7, dtype=torch.long, device=DEVICE)
    am0[1, :3] = 0
    tokens, frames = {}, {}
    for impl in ("eager", ea_hf.register("embedattn_reference", backend="reference")):
        model.set_attn_implementation(impl)
        torch._dynamo.reset()
        cnt = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
        step = torch.compile(model, fullgraph=True, backend=cnt)
        cache = transformers.StaticCache(config=model.config, max_cache_len=16)
        am, pos = am0, (am0.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            out = [model(input_ids=ids, attention_mask=am, position_ids=pos, cache=cache).logits[:, -1].argmax(-1)]
            for i in range(4):
                am = torch.cat([am, am.new_ones(2, 1)], 1)
                p = pos[:, -1:] + 1 + i
                masks = transformers.masking_utils.create_masks_for_generate(
                    config=model.config, inputs_embeds=torch.empty(2, 1, 0, device=DEVICE), attention_mask=am,
                    cache=cache, position_ids=p)
                if impl != "eager":  # the full layer's position is a device tensor, folded into its key mask
                    km = masks["full_attention"]
                    assert isinstance(km, ea_hf.KernelMask) and km.key_mask.shape == (2, 1, 1, 16), km
                    assert not km.causal and km.causal_offset == 0
                out.append(step(input_ids=out[-1][:, None], attention_mask=masks, position_ids=p,
                                cache=cache).logits[:, -1].argmax(-1))
        tokens[impl], frames[impl] = torch.stack(out, 1), cnt.frame_count
    assert torch.equal(tokens["eager"], tokens["embedattn_reference"])
    assert frames["embedattn_reference"] <= frames["eager"]


def test_packed_training_with_dropout(roads):
    """Dropout over packed sequences runs on the varlen road, reproducible under torch.manual_seed, and a sequence's
    tokens do not see the sequences before it."""
    model = _model("llama", torch.float64, attention_dropout=0.5).train()
    model.set_attn_implementation(ea_hf.register("embedattn_reference", backend="reference"))
    kw, _ = _batch("packed")
    outs = []
    for _ in range(2):
        torch.manual_seed(5)
        outs.append(model(**kw).logits)
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    assert [(c["road"], c["dropout_p"]) for c in roads] == [("varlen", 0.5)] * 4 and torch.isfinite(outs[0]).all()
    # the first token of each sequence sees only itself: its logits do not depend on the other sequences
    ids = kw["input_ids"].clone()
    ids[0, 0] = (ids[0, 0] + 1) % 64
    torch.manual_seed(5)
    changed = model(**{**kw, "input_ids": ids}).logits
    torch.testing.assert_close(changed[0, 4:], outs[0][0, 4:], rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------
# the mask function: transformers' descriptions read exactly, the rest dense
# --------------------------------------------------------------------------------------------------
def _mu():
    from transformers import masking_utils

    return masking_utils


def _dense_reference(mask_function, b, nq, nk, q_offset=0, kv_offset=0, padding=None, **kw):
    return _mu().sdpa_mask(batch_size=b, q_length=nq, kv_length=nk, q_offset=q_offset, kv_offset=kv_offset,
                           mask_function=mask_function, attention_mask=padding, allow_is_causal_skip=False, **kw)


def _as_dense(km: ea_hf.KernelMask, packed=None) -> torch.Tensor:
    """The (B, 1, Nq, Nk) bool mask a KernelMask means (the test's reading of its documented semantics)."""
    i = torch.arange(km.q_length)[:, None]
    j = torch.arange(km.kv_length)[None, :]
    rel = i + km.causal_offset - j
    ok = torch.ones(km.q_length, km.kv_length, dtype=torch.bool)
    if km.causal:
        ok &= rel >= 0
    if km.window is not None:
        left, right = km.window
        if left >= 0:
            ok &= rel <= left
        if right >= 0:
            ok &= rel >= -right
    ok = ok[None, None].expand(km.batch_size, 1, -1, -1)
    if km.key_mask is not None:
        ok = ok & km.key_mask
    if km.varlen is not None:
        cu = km.varlen[0].long()
        seq = torch.searchsorted(cu[1:], torch.arange(km.batch_size * km.q_length), right=True)
        seq = seq.view(km.batch_size, km.q_length)
        ok = ok & (seq[:, None, :, None] == seq[:, None, None, :])
    return ok


def _cases():
    mu = _mu()
    pad = torch.ones(2, 12, dtype=torch.bool)
    pad[1, :5] = False
    sw = mu.sliding_window_causal_mask_function(4)
    return {
        "causal": (mu.causal_mask_function, 0, 0, 9, 9, None),
        "causal_padded": (mu.causal_mask_function, 0, 0, 9, 9, pad[:, :9]),
        "decode": (mu.causal_mask_function, 11, 0, 1, 12, pad),
        "chunked_prefill": (mu.causal_mask_function, 5, 0, 4, 9, pad[:, :9]),
        "sliding": (sw, 0, 0, 9, 9, pad[:, :9]),
        "sliding_decode_window_cache": (sw, 11, 8, 1, 4, pad),  # DynamicSlidingWindowLayer: kv_offset > 0
        "bidirectional": (mu.bidirectional_mask_function, 0, 0, 9, 9, pad[:, :9]),
        "bidirectional_sliding": (mu.sliding_window_bidirectional_mask_function(2), 0, 0, 9, 9, pad[:, :9]),
    }


@pytest.mark.parametrize("case", list(_cases()))
def test_mask_function_reads_transformers_masks(case):
    """Each mask transformers describes for its built-in patterns becomes a KernelMask with no (Nq, Nk) tensor,
    meaning exactly transformers' own dense mask."""
    fn, q_off, kv_off, nq, nk, padding = _cases()[case]
    km = ea_hf.make_mask_function()(batch_size=2, q_length=nq, kv_length=nk, q_offset=q_off, kv_offset=kv_off,
                                    mask_function=fn, attention_mask=padding, allow_is_causal_skip=True)
    assert isinstance(km, ea_hf.KernelMask) and km.varlen is None
    assert km.key_mask is None or km.key_mask.shape == (2, 1, 1, nk)
    want = _dense_reference(fn, 2, nq, nk, q_off, kv_off, padding)
    assert torch.equal(_as_dense(km), want.expand(2, 1, nq, nk)), case


def test_mask_function_packed_and_dense_cases():
    """Packed sequences become cu_seqlens (one host read per mask, not per layer); a static cache's device-side
    position folds into the key mask for one query; chunks and custom or-functions stay transformers' dense mask."""
    mu = _mu()
    f = ea_hf.make_mask_function()
    pos = torch.tensor([_PACKED_POSITIONS, [0, 1, 2, 3, 4, 5, 0, 1, 2]])
    ids = mu.find_packed_sequence_indices(pos)
    for base in (mu.causal_mask_function, mu.sliding_window_causal_mask_function(3)):
        fn = mu.and_masks(mu.remap_positions_for_packed_sequence(base, pos), mu.packed_sequence_mask_function(ids))
        km = f(batch_size=2, q_length=9, kv_length=9, mask_function=fn)
        assert km.varlen[0].tolist() == [0, 4, 7, 9, 15, 18] and km.varlen[1] == 6 and km.key_mask is None
        assert torch.equal(_as_dense(km), _dense_reference(fn, 2, 9, 9))
    # a static cache's position is a device tensor: one query reads it without a host sync
    pad = torch.ones(2, 6, dtype=torch.bool)
    pad[0, :2] = False
    km = f(batch_size=2, q_length=1, kv_length=10, q_offset=torch.tensor(5), kv_offset=0,
           mask_function=mu.causal_mask_function, attention_mask=pad)
    assert not km.causal and km.key_mask.shape == (2, 1, 1, 10)
    want = _dense_reference(mu.causal_mask_function, 2, 1, 10, 5, 0, pad)
    assert torch.equal(km.key_mask, want)
    # no kernel feature: transformers' own dense mask
    chunked = mu.chunked_causal_mask_function(3, torch.zeros(2, dtype=torch.long))
    image = mu.or_masks(mu.causal_mask_function, lambda b, h, q, kv: kv < 2)
    for fn, kw in ((chunked, {}), (image, {"use_vmap": True})):
        dense = f(batch_size=2, q_length=9, kv_length=9, mask_function=fn, allow_is_causal_skip=False, **kw)
        assert isinstance(dense, torch.Tensor) and dense.shape == (2, 1, 9, 9)
        assert torch.equal(dense, _dense_reference(fn, 2, 9, 9, **kw))


def test_kernel_mask_slicing_and_shape():
    km = ea_hf.KernelMask(batch_size=2, q_length=6, kv_length=8, causal=True, causal_offset=2, window=(3, -1))
    assert km.shape == (2, 1, 6, 8) and km.ndim == 4
    last = km[:, :, -2:, :]
    assert (last.q_length, last.causal_offset, last.window) == (2, 6, (3, -1))
    assert torch.equal(_as_dense(last), _as_dense(km)[:, :, -2:, :])
    for bad in ((0, slice(None)), (slice(None), slice(None), slice(0, 4, 2), slice(None)),
                (slice(None), slice(None), 1, slice(None))):
        with pytest.raises(IndexError):
            km[bad]
    assert "causal=True" in repr(km) and "window=(3, -1)" in repr(km)


# --------------------------------------------------------------------------------------------------
# every keyword transformers passes: used, or harmless, or refused with its name
# --------------------------------------------------------------------------------------------------
def _closing_paren(src: str, i: int) -> int:
    """The index of the parenthesis closing the one at ``src[i]`` (strings and comments in calls are rare; a
    parenthesis inside one would show as a parse error here, not as a silently missed keyword)."""
    depth = 0
    for j in range(i, len(src)):
        depth += {"(": 1, ")": -1}.get(src[j], 0)
        if depth == 0:
            return j
    raise ValueError("unbalanced call")


def _keywords_models_pass() -> dict[str, set[str]]:
    """keyword -> models, for every keyword a modeling file of the installed transformers passes to
    ``attention_interface(...)`` (by name, or in a literal ``**{...}``), and every key of the TypedDicts models
    forward through ``**kwargs`` (TransformersKwargs, FlashAttentionKwargs)."""
    from transformers.modeling_flash_attention_utils import FlashAttentionKwargs
    from transformers.utils.generic import TransformersKwargs

    root = pathlib.Path(transformers.__file__).parent / "models"
    found: dict[str, set[str]] = {}
    for path in root.rglob("modeling_*.py"):
        src = path.read_text()
        # each call's text, parsed alone (parsing 360 whole files costs seconds)
        for start in (m.start() for m in re.finditer(r"\battention_interface\(", src)):
            end = _closing_paren(src, start + len("attention_interface"))
            call = ast.parse(src[start:end + 1], mode="eval").body
            for kw in call.keywords:
                names = [kw.arg] if kw.arg else [k.value for k in getattr(kw.value, "keys", []) or []
                                                 if isinstance(k, ast.Constant)]
                for n in names:
                    found.setdefault(n, set()).add(path.parent.name)
    for td in (TransformersKwargs, FlashAttentionKwargs):
        for n in td.__annotations__:
            found.setdefault(n, set()).add(td.__name__)
    return found


# keywords some installed model passes that change the result and that embedattn does not implement: refused with
# a TypeError naming them (test_unknown_keywords_are_refused)
REFUSED = {
    "sinks": "inkling2's sinks beside a learned position_bias (not gpt-oss's s_aux)",
    "indices": "DeepSeek-V3.2-style sparse attention: only the indexer's top-k keys",
    "block_indices": "block-sparse attention (MiniMax-M3)",
}
# the attention function's own parameters, passed by name by a few models
PARAMETERS = {"query", "key", "value", "attention_mask", "module"}


def test_every_keyword_models_pass_is_handled():
    """A standing check on the installed transformers: every keyword any model hands its attention function is
    used by the integration, listed as harmless (with why), or known to be refused. A new keyword fails here
    until someone decides which it is, so the next new model cannot be silently wrong."""
    found = _keywords_models_pass()
    known = set(ea_hf.USED_KWARGS) | set(ea_hf.HARMLESS_KWARGS) | set(REFUSED) | PARAMETERS
    unknown = {k: sorted(v)[:5] for k, v in found.items() if k not in known}
    assert not unknown, f"keywords models pass that embedattn neither uses nor lists as harmless: {unknown}"
    for k in ("s_aux", "sliding_window", "softcap", "scaling", "dropout", "cu_seq_lens_q", "position_bias"):
        assert k in found  # the scan sees what it should
    assert not set(REFUSED) & (set(ea_hf.USED_KWARGS) | set(ea_hf.HARMLESS_KWARGS))


def _qkv(d=8, dv=8, n=5):
    g = torch.Generator().manual_seed(4)
    return (torch.randn(1, 2, n, d, generator=g, dtype=torch.float64),
            torch.randn(1, 1, n, d, generator=g, dtype=torch.float64),
            torch.randn(1, 1, n, dv, generator=g, dtype=torch.float64))


def test_unknown_keywords_are_refused(roads):
    f = ea_hf.make_attention_forward("reference")
    q, k, v = _qkv()
    for name in list(REFUSED) + ["some_future_keyword"]:
        with pytest.raises(TypeError, match=f"`{name}`"):
            f(torch.nn.Module(), q, k, v, None, **{name: torch.zeros(2)})
    assert not roads
    # a keyword set to None is that feature off; harmless keywords are accepted as they come
    out, w = f(torch.nn.Module(), q, k, v, None, sinks=None, indices=None, position_ids=torch.arange(5),
               use_cache=True, deterministic=True, num_items_in_batch=torch.tensor(3))
    assert w is None and out.shape == (1, 5, 2, 8) and len(roads) == 1 and roads[0]["causal"]
    with pytest.raises(ValueError, match="cu_seq_lens"):
        f(torch.nn.Module(), q, k, v, None, cu_seq_lens_q=torch.tensor([0, 5], dtype=torch.int32))


def test_attention_function_calls_without_our_mask(roads):
    """Calls with no embedattn mask: sdpa's rule (causal top-left only for > 1 query, the module's is_causal),
    sinks and a value head dim of its own on the kernel, a dense user mask as given, position_bias on sdpa."""
    import torch.nn.functional as F

    f = ea_hf.make_attention_forward("reference")
    q, k, v = _qkv(d=8, dv=6, n=5)
    mod = torch.nn.Module()
    mod.is_causal = False
    out, _ = f(mod, q, k, v, None, scaling=0.5)
    want = F.scaled_dot_product_attention(q, k.expand(1, 2, 5, 8), v.expand(1, 2, 5, 6), scale=0.5)
    torch.testing.assert_close(out, want.transpose(1, 2))
    out, _ = f(torch.nn.Module(), q, k, v, None, sliding_window=2)  # causal by default, window from the keyword
    mask = torch.ones(5, 5, dtype=torch.bool).tril().triu(-1)
    want = F.scaled_dot_product_attention(q, k.expand(1, 2, 5, 8), v.expand(1, 2, 5, 6), attn_mask=mask)
    torch.testing.assert_close(out, want.transpose(1, 2))
    user = torch.randn(1, 1, 5, 5, dtype=torch.float64)  # an additive 4-D mask a user passes
    out, _ = f(torch.nn.Module(), q, k, v, user)
    want = F.scaled_dot_product_attention(q, k.expand(1, 2, 5, 8), v.expand(1, 2, 5, 6), attn_mask=user)
    torch.testing.assert_close(out, want.transpose(1, 2))
    assert [c["road"] for c in roads] == ["dense"] * 3 and roads[2]["mask"] == (1, 1, 5, 5)
    sinks = torch.randn(2, dtype=torch.float64)
    out, _ = f(torch.nn.Module(), q, k, v, None, s_aux=sinks, is_causal=False)
    s = (q @ k.transpose(-1, -2)) / 8**0.5
    p = torch.softmax(torch.cat([s, sinks.view(1, 2, 1, 1).expand(1, 2, 5, 1)], -1), -1)[..., :-1]
    torch.testing.assert_close(out, (p @ v).transpose(1, 2))
    roads.clear()
    bias = torch.randn(1, 2, 5, 5, dtype=torch.float64)
    q2, k2, v2 = _qkv(d=8, dv=8, n=5)
    out, _ = f(torch.nn.Module(), q2, k2.expand(1, 2, 5, 8), v2.expand(1, 2, 5, 8), None, position_bias=bias,
               is_causal=False)
    want = F.scaled_dot_product_attention(q2, k2.expand(1, 2, 5, 8), v2.expand(1, 2, 5, 8), attn_mask=bias)
    torch.testing.assert_close(out, want.transpose(1, 2))
    assert [c["road"] for c in roads] == ["sdpa"]
    with pytest.raises(ValueError, match="position_bias"):
        f(torch.nn.Module(), q2, k2, v2, None, position_bias=bias, softcap=5.0)


def test_sliding_window_keyword_must_agree_with_the_mask():
    mu = _mu()
    km = ea_hf.make_mask_function()(batch_size=1, q_length=5, kv_length=5,
                                    mask_function=mu.sliding_window_causal_mask_function(3))
    f = ea_hf.make_attention_forward("reference")
    q, k, v = _qkv()
    f(torch.nn.Module(), q, k, v, km, sliding_window=3)
    with pytest.raises(ValueError, match="sliding_window"):
        f(torch.nn.Module(), q, k, v, km, sliding_window=4)
    with pytest.raises(ValueError, match="built for"):
        f(torch.nn.Module(), q[:, :, :4], k, v, km)


# --------------------------------------------------------------------------------------------------
# dropout, attention weights, registration
# --------------------------------------------------------------------------------------------------
def test_dropout_runs_in_kernel(roads):
    """Training with attention dropout runs embedattn's dropout: seeded by torch's RNG (reproducible), off in
    eval."""
    model = _model("llama", torch.float64, attention_dropout=0.5)
    model.set_attn_implementation(ea_hf.register("embedattn_reference", backend="reference"))
    kw, valid = _batch("left")
    outs = []
    for _ in range(2):
        torch.manual_seed(11)
        outs.append(model.train()(**kw).logits[valid])
    assert [c["dropout_p"] for c in roads] == [0.5] * 4
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    roads.clear()
    h_eval = model.eval()(**kw).logits[valid]
    assert [c["dropout_p"] for c in roads] == [0.0, 0.0]
    assert torch.isfinite(outs[0]).all() and not torch.allclose(outs[0], h_eval)


def test_output_attentions_behaves_like_sdpa(roads):
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
        model = _model("llama", torch.float64)
        kw, valid = _batch("left")
        out = {}
        for impl in ("sdpa", ea_hf.register("embedattn_weights", backend="reference")):
            model.set_attn_implementation(impl)
            out[impl] = model(**kw, output_attentions=True)
    finally:
        logger.removeHandler(handler)
    ours, sdpa = out["embedattn_weights"], out["sdpa"]
    assert type(ours.attentions) is type(sdpa.attentions) and len(ours.attentions) == len(sdpa.attentions)
    assert [r.getMessage() for r in records] == [ea_hf._NO_WEIGHTS]
    assert len(roads) == 2
    torch.testing.assert_close(ours.logits[valid], sdpa.logits[valid], rtol=1e-9, atol=1e-10)


def test_register_errors():
    with pytest.raises(ValueError, match="name"):
        ea_hf.register("")
    with pytest.raises(ValueError, match="name"):
        ea_hf.register("paged|x")
    with pytest.raises(ValueError, match="backend"):
        ea_hf.register("embedattn_bad", backend="cuda")
    assert ea_hf.register() == "embedattn"
    assert "embedattn" in transformers.AttentionInterface._global_mapping
    from transformers.masking_utils import AttentionMaskInterface

    assert AttentionMaskInterface._global_mapping["embedattn"].__name__ == "embedattn_mask"
    assert importlib.import_module("embedattn.integrations.transformers") is ea_hf


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
