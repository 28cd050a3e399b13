"""embedattn.patch_sdpa(): torch's SDPA routed to embedattn's drop-in, nesting, undo, real models."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F
from helpers import DEVICE, HAS_TRITON, ON_CUDA

import embedattn
from embedattn.patching import patch_sdpa, sdpa_patched

ea_attention = importlib.import_module("embedattn.attention")  # the module (embedattn.attention is the function)

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
    calls = []  # the drop-in's calls that ran the kernels
    orig = ea_attention._run
    monkeypatch.setattr(ea_attention, "_run", lambda be, *a: calls.append(be) or orig(be, *a))
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(16, 2, batch_first=True, device=DEVICE)
    x = torch.randn(2, 7, 16, device=DEVICE)
    causal = torch.nn.Transformer.generate_square_subsequent_mask(7, device=DEVICE)
    ref = mha(x, x, x, attn_mask=causal, need_weights=False)[0]
    with patch_sdpa():
        out = mha(x, x, x, attn_mask=causal, need_weights=False)[0]
    assert calls and set(calls) == {"triton"}
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=2e-5)

    calls.clear()
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.AutoModel.from_config(cfg, attn_implementation="sdpa").to(DEVICE, torch.float32)
    ids = torch.randint(1, 64, (2, 9), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    am = torch.ones(2, 9, dtype=torch.long, device=DEVICE)
    am[-1, 5:] = 0
    ref = model(input_ids=ids, attention_mask=am).last_hidden_state[am.bool()]
    with patch_sdpa():
        out = model(input_ids=ids, attention_mask=am).last_hidden_state[am.bool()]
    assert calls == ["triton"] * 2
    torch.testing.assert_close(out, ref, rtol=2e-4, atol=2e-5)


@pytest.mark.skipif(not HAS_TRITON, reason="needs Triton")
def test_patch_sdpa_keeps_working_code_working(monkeypatch):
    """Calls torch accepts keep working under the patch, with torch's result, and calls it rejects keep
    failing with torch's exception type: K/V shared across the batch (batch 1), one K/V head without
    enable_gqa, attn_mask together with is_causal, head dim 0, and a 1-D mask (rejected)."""
    if not ON_CUDA:
        monkeypatch.setenv("EMBEDATTN_BACKEND", "triton")
    g = torch.Generator().manual_seed(3)
    r = lambda *s: torch.randn(*s, generator=g).to(DEVICE)
    q = r(2, 4, 6, 16)
    calls = [
        ((q, r(1, 4, 9, 16), r(1, 4, 9, 16)), {}),
        ((q, r(2, 1, 9, 16), r(2, 1, 9, 16)), {"is_causal": True}),
        ((q, r(2, 4, 9, 16), r(2, 4, 9, 16)), {"attn_mask": r(6, 9) > 0, "is_causal": True}),
        ((r(2, 4, 6, 0), r(2, 4, 9, 0), r(2, 4, 9, 8)), {}),
        ((q, r(2, 4, 9, 16), r(2, 4, 9, 16)), {"attn_mask": r(9) > 0}),
    ]
    for args, kw in calls:
        try:
            want = TORCH_SDPA(*args, **kw)
        except Exception as e:  # the exception is the answer
            want = e
        with patch_sdpa():
            try:
                got = F.scaled_dot_product_attention(*args, **kw)
            except Exception as e:
                got = e
        if isinstance(want, Exception):
            assert isinstance(got, type(want)), (kw, want, got)
        else:
            assert not isinstance(got, Exception), (kw, got)
            torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


@pytest.mark.skipif(not HAS_TRITON, reason="needs Triton")
@pytest.mark.parametrize("arch", ["deepseek_v3", "gemma4"])
def test_patch_sdpa_runs_mla_and_head_dim_512_on_the_kernels(arch, monkeypatch):
    """transformers "sdpa" models whose calls torch's SDPA used to keep: DeepSeek-V3's MLA (value head dim 12 beside
    a query/key head dim 24) and Gemma 4's global layer (head dim 512). Under the patch every attention call runs
    embedattn's kernels, and the hidden states equal torch's."""
    transformers = pytest.importorskip("transformers")
    if not ON_CUDA:
        monkeypatch.setenv("EMBEDATTN_BACKEND", "triton")
    calls = []
    orig = ea_attention._run
    monkeypatch.setattr(ea_attention, "_run", lambda be, q, k, v, *a: calls.append((be, q.shape[-1], v.shape[-1]))
                        or orig(be, q, k, v, *a))
    small = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                 max_position_embeddings=64)
    if arch == "deepseek_v3":
        cfg = transformers.DeepseekV3Config(**small, num_key_value_heads=2, kv_lora_rank=16, q_lora_rank=None,
                                            qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=12,
                                            n_routed_experts=2, n_shared_experts=1, first_k_dense_replace=1,
                                            num_experts_per_tok=1, n_group=1, topk_group=1, moe_intermediate_size=16)
        dims = {(24, 12)}
    else:
        cfg = transformers.Gemma4TextConfig(**small, num_key_value_heads=1, head_dim=16, sliding_window=4,
                                            layer_types=["sliding_attention", "full_attention"], global_head_dim=512,
                                            vocab_size_per_layer_input=64, hidden_size_per_layer_input=8)
        dims = {(16, 16), (512, 512)}
    torch.manual_seed(0)
    model = transformers.AutoModel.from_config(cfg, attn_implementation="sdpa").to(DEVICE, torch.float32)
    ids = torch.randint(1, 64, (2, 9), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    am = torch.ones(2, 9, dtype=torch.long, device=DEVICE)
    am[-1, :3] = 0
    ref = model(input_ids=ids, attention_mask=am).last_hidden_state[am.bool()]
    assert not calls
    with patch_sdpa():
        out = model(input_ids=ids, attention_mask=am).last_hidden_state[am.bool()]
    assert [c[0] for c in calls] == ["triton"] * 2 and {c[1:] for c in calls} == dims
    torch.testing.assert_close(out, ref, rtol=2e-4, atol=2e-5)
