"""Reference Transformer models built from `AutoAttention`, and example factories for `attn-tune capture`."""

from attn_tune.models.causal_lm import CausalLM
from attn_tune.models.encoder import Encoder
from attn_tune.models.examples import causal_lm_example, encoder_example
from attn_tune.models.pretrained import MaskedCharLM, pretrained_encoder, pretrained_lm

__all__ = ["CausalLM", "Encoder", "MaskedCharLM", "causal_lm_example", "encoder_example", "pretrained_encoder",
           "pretrained_lm"]
