"""Factories returning (model, example_inputs): what `attn-tune capture MODULE:FACTORY` runs."""

from __future__ import annotations

from typing import Any

import torch

from attn_tune.models.causal_lm import CausalLM
from attn_tune.models.encoder import Encoder

__all__ = ["encoder_example", "causal_lm_example"]


def encoder_example(batch: int = 2, length: int = 512) -> tuple[Encoder, tuple[Any, ...]]:
    """A 4-layer, 256-wide, 4-head encoder and a batch of random token ids."""
    torch.manual_seed(0)
    model = Encoder(vocab_size=1000, dim=256, depth=4, heads=4)
    return model, (torch.randint(0, 1000, (batch, length)),)


def causal_lm_example(batch: int = 2, length: int = 512) -> tuple[CausalLM, tuple[Any, ...]]:
    """A 4-layer, 256-wide decoder with 8 query and 2 key/value heads, and a batch of random token ids."""
    torch.manual_seed(0)
    model = CausalLM(vocab_size=1000, dim=256, depth=4, heads=8, kv_heads=2)
    return model, (torch.randint(0, 1000, (batch, length)),)
