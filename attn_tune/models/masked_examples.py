"""Factories of plain PyTorch models that hand SDPA an explicit mask (random weights, seeded, no downloads).

    attn-tune tune attn_tune.models.masked_examples:band_attention_example --out tuned.json

`band_attention_example`: nanoGPT-style causal self-attention modules calling `F.scaled_dot_product_attention(q,
k, v, attn_mask=band)` with a boolean causal band they build themselves. `torch_decoder_example`: an
`nn.TransformerEncoder` used decoder-only, with `nn.Transformer.generate_square_subsequent_mask` and a right-padded
batch's `src_key_padding_mask`. Under `attn_tune.patch_sdpa` both masks are read back into structured problems.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["causal_band", "next_token_targets", "BandSelfAttention", "band_attention_example", "TorchDecoderLM",
           "right_padding", "torch_decoder_example"]

IGNORE_INDEX = -100  # not scored (attn_tune.outputs.IGNORE_INDEX, PyTorch's cross_entropy default)


def causal_band(length: int, window: int, device: torch.device | str = "cpu") -> Tensor:
    """(length, length) bool, True where query i may see key j: 0 <= i - j < window."""
    offset = torch.arange(length, device=device)[:, None] - torch.arange(length, device=device)[None, :]
    return (offset >= 0) & (offset < window)


def next_token_targets(ids: Tensor, real: Tensor | None = None) -> Tensor:
    """Targets for a language model's logits: each position's next token; the last position, padded positions
    (`real` False) and positions whose next token is padding are not scored."""
    targets = torch.full_like(ids, IGNORE_INDEX)
    targets[:, :-1] = ids[:, 1:]
    if real is not None:
        targets[:, :-1].masked_fill_(~(real[:, :-1] & real[:, 1:]), IGNORE_INDEX)
    return targets


class BandSelfAttention(nn.Module):
    """nanoGPT's causal self-attention with a sliding window: its boolean band is a buffer built once for
    `block_size` tokens (as nanoGPT's `bias`), sliced to the call's length and handed to SDPA as `attn_mask`."""

    def __init__(self, dim: int, heads: int, window: int, block_size: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.register_buffer("band", causal_band(block_size, window), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in self.qkv(x).split(c, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=self.band[:t, :t])
        return self.proj(y.transpose(1, 2).contiguous().view(b, t, c))


def band_attention_example(batch: int = 1, length: int = 4096, window: int = 512, depth: int = 2
                           ) -> tuple[nn.Sequential, tuple[Tensor]]:
    """`depth` `BandSelfAttention` modules (256 wide, 4 heads of 64) in a stack, on random activations: SDPA gets
    a (length, length) boolean causal band of width `window` (read back as causal with a window of `window`)."""
    torch.manual_seed(0)
    model = nn.Sequential(*[BandSelfAttention(256, 4, window, length) for _ in range(depth)]).eval()
    return model, (torch.randn(batch, length, 256, generator=torch.Generator().manual_seed(1)),)


class TorchDecoderLM(nn.Module):
    """An `nn.TransformerEncoder` language model: causal through `generate_square_subsequent_mask` (unless
    `causal` is False: an encoder), padding through `src_key_padding_mask` (True = a padded token)."""

    def __init__(self, vocab: int = 1000, dim: int = 256, depth: int = 2, heads: int = 4, causal: bool = True,
                 max_len: int = 16384) -> None:
        super().__init__()
        self.causal = causal
        self.embed, self.position = nn.Embedding(vocab, dim), nn.Embedding(max_len, dim)
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, ids: Tensor, padding: Tensor) -> Tensor:
        length = ids.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(length, device=ids.device) if self.causal else None
        if mask is not None:  # both masks additive, as PyTorch asks (a bool padding beside it is deprecated)
            padding = torch.zeros(padding.shape, device=ids.device).masked_fill(padding, float("-inf"))
        x = self.embed(ids) + self.position(torch.arange(length, device=ids.device))
        return self.head(self.encoder(x, mask=mask, src_key_padding_mask=padding))


def right_padding(batch: int, length: int) -> Tensor:
    """A (batch, length) bool `src_key_padding_mask`, True = padding: row b has b / (2 batch) of its tokens padded
    on the right (row 0 none), as a batch of texts of different lengths is padded."""
    padding = torch.zeros(batch, length, dtype=torch.bool)
    for row in range(batch):
        padding[row, length - row * length // (2 * batch):] = True
    return padding


def torch_decoder_example(batch: int = 4, length: int = 1024, causal: bool = True
                          ) -> tuple[TorchDecoderLM, tuple[Tensor, Tensor], Tensor]:
    """`TorchDecoderLM` (2 layers, 256 wide, 4 heads of 64) on a right-padded batch, and next-token targets (pads
    not scored). Under `patch_sdpa` (its fast path off) each layer hands SDPA the merged (batch, heads, length,
    length) additive float mask: causal plus key padding (read back as causal with key padding; without `causal`,
    a (batch, heads, 1, length) one, read back as key padding alone)."""
    torch.manual_seed(0)
    model = TorchDecoderLM(causal=causal, max_len=max(16384, length)).eval()
    ids = torch.randint(0, 1000, (batch, length), generator=torch.Generator().manual_seed(2))
    padding = right_padding(batch, length)
    return model, (ids, padding), next_token_targets(ids, ~padding)
