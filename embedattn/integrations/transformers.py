"""Hugging Face transformers integration: ``attn_implementation="embedattn"`` runs embedattn's attention.

    import embedattn.integrations.transformers as ea_hf
    ea_hf.register()                                   # once per process
    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="embedattn")
    # or, on a loaded model: model.set_attn_implementation("embedattn")

``register`` adds an attention function to transformers' ``AttentionInterface`` and transformers'
own SDPA mask builder to ``AttentionMaskInterface`` under the same name, so models build the same
masks as for ``"sdpa"`` (``None`` + ``is_causal`` when no token is padded, a boolean
(B, 1, Q, KV) mask otherwise) and hand them to us.

The attention function keeps the callee contract of transformers' ``sdpa_attention_forward``:
inputs (B, H, S, D), grouped-query attention through ``module.num_key_value_groups`` (served
natively: K/V are not repeated), ``scaling``, ``is_causal`` (top-left, like SDPA, and only when no
mask is given and more than one query), output transposed to (B, S, H, D), and ``(output, None)``
returned (no attention weights). Beyond sdpa: ``softcap`` (Gemma-2 logit soft-capping) runs in the
kernel, where sdpa raises. ``dropout > 0`` (training with attention dropout) runs in the kernel too
(Philox, seeded from torch's generator: reproducible under ``torch.manual_seed``, but not the same
draw as torch's), eagerly and under ``torch.compile(fullgraph=True)`` alike. What embedattn does not
cover goes to transformers' own SDPA function for that call: ``position_bias`` (T5-style learned
biases need mask gradients), and the calls ``embedattn.attention.sdpa_call`` (the SDPA drop-in's decision)
leaves to torch: key and value head dims that differ, masks that require grad, dtypes or head dims a pinned
``backend="triton"`` cannot run (the default backend runs every other call, on the reference off
CUDA). Sliding windows arrive inside the mask.

Attention weights (``output_attentions=True``) are not computed, as with transformers' ``sdpa``: the
function logs transformers' warning once (``logger.warning_once``, like sdpa's) and returns ``None``
for the weights, so the model's ``outputs.attentions`` is exactly what transformers gives for sdpa
(an empty tuple in transformers 5.x; tests/integrations/test_transformers.py compares the two). Use
``attn_implementation="eager"`` to get the weights.

transformers is an optional dependency (``pip install embedattn[hf]``); it is imported only here.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .._backend import check_backend
from ..attention import sdpa_call

__all__ = ["register", "make_attention_forward"]


def _sdpa_forward() -> Callable:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward


_NO_WEIGHTS = ("`embedattn` attention does not compute attention weights (`output_attentions=True`): like `sdpa`, "
               "it returns None for them. Set your attention to `eager` if you need them.")


def _warn_no_weights() -> None:
    from transformers.utils import logging

    logging.get_logger(__name__).warning_once(_NO_WEIGHTS)


def make_attention_forward(backend: str | None = None) -> Callable:
    """The attention function ``register`` installs, running on ``backend`` (None: ``EMBEDATTN_BACKEND``
    or auto, i.e. Triton on CUDA and the reference on CPU)."""

    def embedattn_attention_forward(
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        dropout: float = 0.0,
        scaling: float | None = None,
        is_causal: bool | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, None]:
        if kwargs.get("output_attentions", False):
            _warn_no_weights()
        softcap = kwargs.get("softcap")
        call = None
        if kwargs.get("position_bias") is None:
            mask, kv_len = attention_mask, key.shape[2]
            if mask is not None and mask.shape[-1] != kv_len:
                mask = mask[..., :kv_len]  # older transformers versions hand over masks as wide as a static cache
            causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
            # sdpa's rule: causal only without a mask (a mask already holds the pattern) and for > 1 query
            # (a single decoding query sees the whole cache); the order keeps dynamic shapes compiling. Top-left, as
            # SDPA's is_causal (the mask builder relies on it when it returns None for an empty-cache prefill with
            # kv_len > q_len)
            causal = bool(query.shape[2] > 1 and mask is None and causal)
            # the one decision (embedattn.attention.sdpa_call): GQA served natively (K/V are not repeated)
            call = sdpa_call(backend, query, key, value, mask, float(dropout or 0.0), causal, scaling,
                             enable_gqa=True, softcap=softcap or 0.0)
        if call is None:
            if softcap is not None:
                raise ValueError("embedattn attention cannot run this call (see embedattn.integrations."
                                 "transformers) and its sdpa fallback does not support `softcap`")
            return _sdpa_forward()(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                   is_causal=is_causal, **kwargs)
        return call.run().transpose(1, 2).contiguous(), None

    return embedattn_attention_forward


def register(name: str = "embedattn", *, backend: str | None = None) -> str:
    """Register embedattn attention with transformers under ``name`` and return ``name``.

    Afterwards ``from_pretrained(..., attn_implementation=name)``, ``from_config(config,
    attn_implementation=name)`` and ``model.set_attn_implementation(name)`` run embedattn's kernel.
    ``backend`` pins the embedattn backend ("triton", "reference"; default None: ``EMBEDATTN_BACKEND``
    or auto). Registering a name again replaces the earlier function.
    """
    if not isinstance(name, str) or not name or "|" in name or "/" in name:
        raise ValueError(f"name must be a plain non-empty string (no '|' or '/'), got {name!r}")
    check_backend(backend)  # validates the value early
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("embedattn.integrations.transformers needs transformers>=4.53 "
                          "(pip install 'embedattn[hf]')") from e
    AttentionInterface.register(name, make_attention_forward(backend))
    # the exact mask builder "sdpa" uses in this transformers version (bool masks, or None + is_causal)
    AttentionMaskInterface.register(name, AttentionMaskInterface._global_mapping["sdpa"])
    return name
