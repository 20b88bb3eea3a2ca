"""A small decoder-only causal language model on AutoAttention (pre-norm, rotary positions, grouped-query heads)."""

from __future__ import annotations

from torch import Tensor, nn

from attn_tune.models.block import Block

__all__ = ["CausalLM"]


class CausalLM(nn.Module):
    """GPT/Llama-shaped decoder: embeddings, pre-norm causal blocks, a final norm and an LM head; returns logits."""

    def __init__(self, vocab_size: int = 32000, dim: int = 512, depth: int = 8, heads: int = 8,
                 kv_heads: int | None = None, window: int | None = None, mlp_ratio: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim)
        self.blocks = nn.ModuleList(
            Block(dim, heads, kv_heads, causal=True, window=window, pre_norm=True, mlp_ratio=mlp_ratio)
            for _ in range(depth)
        )
        self.final_norm = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab_size, bias=False)

    def forward(self, input_ids: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        """input_ids: (batch, length) -> logits (batch, length, vocab_size)."""
        x = self.embed(input_ids)
        for block in self.blocks:
            x = block(x, key_padding_mask)
        return self.lm_head(self.final_norm(x))
