"""Modules built on the runtime: `AutoAttention` and its rotary embeddings."""

from attn_tune.modules.auto_attention import AutoAttention
from attn_tune.modules.rotary import apply_rotary, rotary_tables

__all__ = ["AutoAttention", "apply_rotary", "rotary_tables"]
