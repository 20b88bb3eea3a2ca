"""Hugging Face transformers: `attn_implementation="attn_tune"` routes every attention call through attn_tune.

Importing this module registers the name (``register()`` does it again, harmlessly)::

    import attn_tune.integrations.transformers
    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="attn_tune")

Masks come from `structured_mask`: causality and a sliding window reach `attn_tune.attention` as
``is_causal``/``window`` with only the padding as a mask, so a window variant can serve a Mistral, Qwen2 or
Gemma layer; masks it does not recognise arrive as ``"sdpa"`` builds them. Grouped-query heads are read in place.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from attn_tune.integrations.transformers_masks import StructuredMask, structured_mask
from attn_tune.runtime.dispatch import attention

__all__ = ["NAME", "register", "attn_tune_attention_forward"]

NAME = "attn_tune"


def attn_tune_attention_forward(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | StructuredMask | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """transformers' attention-function signature; returns (output as (batch, q_len, heads, head_dim), None)."""
    _refuse_unsupported(module, kwargs)
    common = dict(dropout_p=dropout, scale=scaling, enable_gqa=query.shape[1] != key.shape[1])
    if isinstance(attention_mask, StructuredMask):
        out = _structured_attention(query, key, value, attention_mask, **common)
        return out.transpose(1, 2).contiguous(), None
    if attention_mask is not None and attention_mask.dim() == 4:
        attention_mask = attention_mask[:, :, :, : key.shape[-2]]
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    q_len = query.shape[2]
    is_causal = bool(q_len > 1 and attention_mask is None and is_causal)
    if is_causal and key.shape[2] > q_len:  # prefill into an empty static cache: SDPA's causal is top-left aligned
        key, value = key[:, :, :q_len], value[:, :, :q_len]
    out = attention(query, key, value, attn_mask=attention_mask, is_causal=is_causal, **common)
    return out.transpose(1, 2).contiguous(), None


def _structured_attention(query: Tensor, key: Tensor, value: Tensor, m: StructuredMask, **common: Any) -> Tensor:
    """Attention under a `StructuredMask`: the window as `window=`, padding as the only mask, keys cut to those seen.

    Queries and keys end together. One query (decoding) sees only the last `window` keys, so only those are passed:
    a long cache costs nothing past the window. A longer query block against more keys (a prompt continued
    from a cache) has no top-left-aligned flag form and gets the dense mask.
    """
    q_len, kv_len = query.shape[2], key.shape[2]
    if (q_len, kv_len) != (m.q_len, m.kv_len):
        raise ValueError(f"attn_tune: the mask was built for {m.q_len} queries x {m.kv_len} keys, the layer has "
                         f"{q_len} x {kv_len}")
    padding = None if m.key_padding is None else m.key_padding[:, None, None, :]
    if q_len == 1 and not m.causal:
        first = kv_len - m.window if m.window is not None and m.window < kv_len else 0
        key, value = key[:, :, first:], value[:, :, first:]
        padding = None if padding is None else padding[..., first:]
        return attention(query, key, value, attn_mask=padding, is_causal=False, **common)
    if q_len == kv_len:
        return attention(query, key, value, attn_mask=padding, is_causal=m.causal, window=m.window, **common)
    return attention(query, key, value, attn_mask=m.dense(), is_causal=False, **common)


def _refuse_unsupported(module: torch.nn.Module, kwargs: dict[str, Any]) -> None:
    """One line naming the layer and the feature for what attention-with-a-mask cannot compute."""
    features = {"softcap": "logit softcapping", "position_bias": "a position bias", "s_aux": "attention sinks",
                "sinks": "attention sinks"}
    for name, what in features.items():
        if kwargs.get(name) is not None:
            layer = getattr(module, "layer_idx", None)
            where = f"{type(module).__name__}" + (f" (layer {layer})" if layer is not None else "")
            raise ValueError(f"attn_tune: {where} uses {what} ({name}=...), which attn_tune attention does not "
                             "compute; use attn_implementation='eager' or 'sdpa' for this model")


def register() -> None:
    """Register "attn_tune" with transformers' AttentionInterface and its mask function with AttentionMaskInterface."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, attn_tune_attention_forward)
    AttentionMaskInterface.register(NAME, structured_mask)


register()
