"""Nystrom attention as an attn-tune plugin; the variant is registered through the `attn_tune` entry point."""

from attn_tune_nystrom.plugin import nystrom_attention

__all__ = ["nystrom_attention"]
