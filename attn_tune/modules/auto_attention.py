"""`AutoAttention`: multi-head self-attention whose attention is `attn_tune.attention` (the tuned variant)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from attn_tune.errors import InvalidProblem
from attn_tune.modules.rotary import apply_rotary, rotary_tables
from attn_tune.runtime.dispatch import attention

__all__ = ["AutoAttention"]


class AutoAttention(nn.Module):
    """Self-attention with fused QKV and output projections, grouped-query heads, windows and rotary embeddings.

    Args:
        embed_dim: model width; split into `num_heads` heads of embed_dim // num_heads.
        num_heads: query heads.
        num_kv_heads: key/value heads (fewer = grouped-query attention); default num_heads.
        causal: each position sees itself and earlier positions only.
        window: sliding window w: position i sees j with |i - j| < w (causal: 0 <= i - j < w).
        bias: biases in the two projections.
        rope: rotary position embeddings over each head's dimension, applied to q and k.
    """

    def __init__(self, embed_dim: int, num_heads: int, num_kv_heads: int | None = None, causal: bool = False,
                 window: int | None = None, bias: bool = True, rope: bool = False, rope_base: float = 10000.0,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if embed_dim % num_heads:
            raise InvalidProblem(f"embed_dim ({embed_dim}) must be a multiple of num_heads ({num_heads})")
        if num_heads % num_kv_heads:
            raise InvalidProblem(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        self.embed_dim, self.num_heads, self.num_kv_heads = embed_dim, num_heads, num_kv_heads
        self.head_dim = embed_dim // num_heads
        if rope and self.head_dim % 2:
            raise InvalidProblem(f"rotary embeddings need an even head dimension, got {self.head_dim}")
        self.causal, self.window, self.rope, self.rope_base = causal, window, rope, rope_base
        factory = {"device": device, "dtype": dtype}
        self.qkv = nn.Linear(embed_dim, (num_heads + 2 * num_kv_heads) * self.head_dim, bias=bias, **factory)
        self.out = nn.Linear(num_heads * self.head_dim, embed_dim, bias=bias, **factory)

    def forward(self, x: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        """x: (batch, length, embed_dim). key_padding_mask: (batch, length) bool, True at padding (as nn.MultiheadAttention).

        A position with no key left to see (all padding) gets zeros from attention, as SDPA gives.
        """
        batch, length, _ = x.shape
        heads = self.qkv(x).view(batch, length, self.num_heads + 2 * self.num_kv_heads, self.head_dim)
        q_and_k, v = heads.split([self.num_heads + self.num_kv_heads, self.num_kv_heads], dim=2)
        if self.rope:  # q and k rotated in one go, in the projection's (batch, length, heads, head_dim) layout
            cos, sin = rotary_tables(length, self.head_dim, device=x.device, dtype=heads.dtype, base=self.rope_base)
            q_and_k = apply_rotary(q_and_k, cos[:, None], sin[:, None])
        q, k = (t.transpose(1, 2) for t in q_and_k.split([self.num_heads, self.num_kv_heads], dim=2))
        v = v.transpose(1, 2)
        mask = None
        if key_padding_mask is not None:
            if key_padding_mask.shape != (batch, length) or key_padding_mask.dtype != torch.bool:
                raise InvalidProblem(f"key_padding_mask must be a bool tensor of shape ({batch}, {length}), got "
                                     f"{key_padding_mask.dtype} {tuple(key_padding_mask.shape)}")
            mask = ~key_padding_mask[:, None, None, :]  # (batch, 1, 1, length): keep real keys, for every head and query
        out = attention(q, k, v, attn_mask=mask, is_causal=self.causal, window=self.window,
                        enable_gqa=self.num_kv_heads != self.num_heads)
        return self.out(out.transpose(1, 2).reshape(batch, length, self.num_heads * self.head_dim))

    def extra_repr(self) -> str:
        extras = [f"embed_dim={self.embed_dim}", f"num_heads={self.num_heads}"]
        if self.num_kv_heads != self.num_heads:
            extras.append(f"num_kv_heads={self.num_kv_heads}")
        extras += [f"{name}={getattr(self, name)}" for name in ("causal", "window", "rope") if getattr(self, name)]
        return ", ".join(extras)
