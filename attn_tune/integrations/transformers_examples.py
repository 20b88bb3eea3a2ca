"""Factories returning (Hugging Face model, example_inputs) for `attn-tune capture`, with random weights.

    attn-tune capture attn_tune.integrations.transformers_examples:mistral_example --out shapes.json

The `*_sdpa_*` factories run transformers' own "sdpa" path, which hands SDPA a dense boolean mask (the window,
the padding); under `attn_tune.patch_sdpa` that mask is read back into the structured problem.
"""

from __future__ import annotations

from typing import Any

import torch

from attn_tune.integrations.transformers import NAME  # importing it registers NAME, "attn_tune"
from attn_tune.models.masked_examples import next_token_targets

__all__ = ["mistral_model", "mistral_example", "mistral_sdpa_example", "qwen2_model", "left_padding",
           "qwen2_sdpa_padded_example", "qwen2_sdpa_window_padded_example"]


def mistral_model(window: int = 512, attn_implementation: str = NAME, layers: int = 2,
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


def mistral_sdpa_example(batch: int = 1, length: int = 4096, window: int = 512
                         ) -> tuple[Any, dict[str, torch.Tensor], torch.Tensor]:
    """`mistral_example` on transformers' "sdpa" path, and next-token targets: each layer hands SDPA a (batch, 1,
    length, length) boolean causal band of width `window` (read back as causal with a window of `window`)."""
    model = mistral_model(window=window, attn_implementation="sdpa", max_positions=max(16384, length))
    ids = torch.randint(0, 1000, (batch, length), generator=torch.Generator().manual_seed(1))
    return model, {"input_ids": ids}, next_token_targets(ids)


def qwen2_model(window: int | None = None, attn_implementation: str = "sdpa", layers: int = 2,
                max_positions: int = 16384) -> Any:
    """A Qwen2-style decoder: hidden 256, 4 query and 2 key/value heads of 64; every layer slides with `window`."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
                         use_sliding_window=window is not None, sliding_window=window, max_window_layers=0)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation).eval()


def left_padding(batch: int, length: int) -> torch.Tensor:
    """A (batch, length) attention_mask, 0 = padding: row b has b / (2 batch) of its tokens padded on the left
    (row 0 none), as a batch of prompts of different lengths is padded for generation."""
    mask = torch.ones(batch, length, dtype=torch.long)
    for row in range(batch):
        mask[row, : row * length // (2 * batch)] = 0
    return mask


def qwen2_sdpa_padded_example(batch: int = 4, length: int = 2048
                              ) -> tuple[Any, dict[str, torch.Tensor], torch.Tensor]:
    """`qwen2_model` on the "sdpa" path with a left-padded batch, and next-token targets (pads not scored): each
    layer hands SDPA a (batch, 1, length, length) boolean causal mask with the padded keys hidden (read back as
    causal with key padding); a padded query sees no key at all, and SDPA gives it zeros."""
    return _padded(qwen2_model(attn_implementation="sdpa", max_positions=max(16384, length)), batch, length, seed=2)


def qwen2_sdpa_window_padded_example(batch: int = 2, length: int = 2048, window: int = 512
                                     ) -> tuple[Any, dict[str, torch.Tensor], torch.Tensor]:
    """`qwen2_model` with a sliding window of `window` on the "sdpa" path, a left-padded batch and next-token
    targets: SDPA gets a (batch, 1, length, length) boolean causal band with the padded keys hidden (causal,
    window, key padding)."""
    model = qwen2_model(window=window, attn_implementation="sdpa", max_positions=max(16384, length))
    return _padded(model, batch, length, seed=3)


def _padded(model: Any, batch: int, length: int, seed: int) -> tuple[Any, dict[str, torch.Tensor], torch.Tensor]:
    """`model`, random ids with `left_padding`, and their next-token targets."""
    ids = torch.randint(0, 1000, (batch, length), generator=torch.Generator().manual_seed(seed))
    mask = left_padding(batch, length)
    return model, {"input_ids": ids, "attention_mask": mask}, next_token_targets(ids, mask.bool())
