"""Factories returning (Hugging Face model, example_inputs) for `attn-tune capture`, with random weights.

    attn-tune capture attn_tune.integrations.transformers_examples:mistral_example --out shapes.json
"""

from __future__ import annotations

from typing import Any

import torch

import attn_tune.integrations.transformers  # noqa: F401  (registers "attn_tune")

__all__ = ["mistral_model", "mistral_example"]


def mistral_model(window: int = 512, attn_implementation: str = "attn_tune", layers: int = 2,
                  max_positions: int = 16384) -> Any:
    """A Mistral-style decoder: hidden 256, 4 query heads and 2 key/value heads of 64, a sliding window."""
    from transformers import AutoModelForCausalLM, MistralConfig

    config = MistralConfig(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=layers,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
                           sliding_window=window)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation).eval()


def mistral_example(batch: int = 1, length: int = 4096, window: int = 512) -> tuple[Any, dict[str, torch.Tensor]]:
    """`mistral_model` and `length` random token ids: its problems are causal with a window of `window`."""
    model = mistral_model(window=window, max_positions=max(16384, length))
    generator = torch.Generator().manual_seed(1)
    return model, {"input_ids": torch.randint(0, 1000, (batch, length), generator=generator)}
