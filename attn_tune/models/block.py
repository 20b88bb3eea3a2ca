"""One Transformer block (AutoAttention + MLP) in post-norm (BERT) or pre-norm (GPT/Llama) order."""

from __future__ import annotations

from torch import Tensor, nn

from attn_tune.modules.auto_attention import AutoAttention

__all__ = ["Block"]


class Block(nn.Module):
    """Attention then a GELU MLP, each with a residual; `pre_norm` normalises before each, else after (BERT)."""

    def __init__(self, dim: int, heads: int, kv_heads: int | None, *, causal: bool, window: int | None,
                 pre_norm: bool, mlp_ratio: int = 4) -> None:
        super().__init__()
        self.pre_norm = pre_norm
        self.attn = AutoAttention(dim, heads, kv_heads, causal=causal, window=window, rope=True)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        if self.pre_norm:
            x = x + self.attn(self.norm1(x), key_padding_mask)
            return x + self.mlp(self.norm2(x))
        x = self.norm1(x + self.attn(x, key_padding_mask))
        return self.norm2(x + self.mlp(x))
