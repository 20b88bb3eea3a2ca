"""A BERT-style encoder on AutoAttention: token embeddings, rotary positions, no dropout, post- or pre-norm."""

from __future__ import annotations

from torch import Tensor, nn

from attn_tune.models.block import Block

__all__ = ["Encoder"]


class Encoder(nn.Module):
    """Bidirectional encoder; returns hidden states (batch, length, dim). Defaults are BERT-base's sizes.

    Args:
        norm: "post" (BERT: normalise after each residual) or "pre" (normalise before, plus a final norm).
        window: optional sliding window for every layer (Longformer-style local attention, exact).
    """

    def __init__(self, vocab_size: int = 30522, dim: int = 768, depth: int = 12, heads: int = 12,
                 kv_heads: int | None = None, norm: str = "post", window: int | None = None, mlp_ratio: int = 4) -> None:
        super().__init__()
        if norm not in ("post", "pre"):
            raise ValueError(f"norm must be 'post' or 'pre', got {norm!r}")
        self.embed = nn.Embedding(vocab_size, dim)
        self.embed_norm = nn.LayerNorm(dim) if norm == "post" else nn.Identity()
        self.blocks = nn.ModuleList(
            Block(dim, heads, kv_heads, causal=False, window=window, pre_norm=norm == "pre", mlp_ratio=mlp_ratio)
            for _ in range(depth)
        )
        self.final_norm = nn.LayerNorm(dim) if norm == "pre" else nn.Identity()

    def forward(self, input_ids: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        """input_ids: (batch, length); key_padding_mask: (batch, length) bool, True at padding."""
        x = self.embed_norm(self.embed(input_ids))
        for block in self.blocks:
            x = block(x, key_padding_mask)
        return self.final_norm(x)
