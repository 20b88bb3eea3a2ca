"""Hugging Face transformers: `attn_implementation="attn_tune"` routes every attention call through attn_tune.

Importing this module registers the name (``register()`` does it again, harmlessly)::

    import attn_tune.integrations.transformers
    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="attn_tune")

Masks are built as for ``"sdpa"`` (boolean, None where causality alone suffices), so padding and grouped-query
heads reach `attn_tune.attention` with SDPA's meaning.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from attn_tune.runtime.dispatch import attention

__all__ = ["NAME", "register", "attn_tune_attention_forward"]

NAME = "attn_tune"


def attn_tune_attention_forward(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """transformers' attention-function signature; returns (output as (batch, q_len, heads, head_dim), None)."""
    if kwargs.get("softcap") is not None or kwargs.get("position_bias") is not None:
        raise ValueError("attn_tune attention supports neither softcap nor position_bias; use 'eager' for this model")
    if attention_mask is not None and attention_mask.dim() == 4:
        attention_mask = attention_mask[:, :, :, : key.shape[-2]]
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    q_len = query.shape[2]
    is_causal = bool(q_len > 1 and attention_mask is None and is_causal)
    if is_causal and key.shape[2] > q_len:  # prefill into an empty static cache: SDPA's causal is top-left aligned
        key, value = key[:, :, :q_len], value[:, :, :q_len]
    out = attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout, is_causal=is_causal, scale=scaling,
                    enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Register "attn_tune" with transformers' AttentionInterface, its masks made as for "sdpa"."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, attn_tune_attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)


register()
