"""Reference Transformer models built from `AutoAttention`, and example factories for `attn-tune capture`."""

from attn_tune.models.causal_lm import CausalLM
from attn_tune.models.encoder import Encoder
from attn_tune.models.examples import causal_lm_example, encoder_example

__all__ = ["CausalLM", "Encoder", "causal_lm_example", "encoder_example"]
