"""`blocksparse` (approximate): a BigBird-style pattern of blocks, computed sparsely for real.

Query block i sees key blocks j with |i - j| <= window_blocks, the first `global_blocks` key blocks, and
`random_blocks` more drawn from a fixed seed (block-level causal when the problem is causal, and element-level
causal inside the blocks it keeps). Only the kept key blocks are gathered, so time and memory scale with the
number of non-zero blocks, not with q_len x kv_len. `BlockPattern.layout` / `.mask` define the function
exactly; the FlexAttention and xformers variants compute the same pattern.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from attn_tune.errors import UnsupportedProblem
from attn_tune.families.masks import repeat_kv, resolve_scale
from attn_tune.problem import Problem
from attn_tune.registry.hookspecs import hookimpl
from attn_tune.registry.variant import Variant

__all__ = [
    "PATTERN_SEED", "BlockPattern", "DEFAULT_PATTERN", "blocksparse_attention", "pattern_supports", "pattern_space",
    "check_pattern_call",
]

PATTERN_SEED = 0
_BLOCK_CHOICES = (32, 64, 128)


@dataclass(frozen=True)
class BlockPattern:
    """The knobs of the block pattern; `layout` and `mask` define exactly what every block-sparse variant computes.

    At least one global block is required: it keeps every query's first key, so no row is ever empty.
    """

    block: int = 64
    window_blocks: int = 1
    global_blocks: int = 1
    random_blocks: int = 1
    seed: int = PATTERN_SEED

    def __post_init__(self) -> None:
        if self.block < 1 or self.window_blocks < 0 or self.random_blocks < 0:
            raise ValueError("block must be positive; window_blocks and random_blocks must not be negative")
        if self.global_blocks < 1:
            raise ValueError("global_blocks must be at least 1, so that every query sees a key")

    def layout(self, q_len: int, kv_len: int, causal: bool) -> Tensor:
        """Boolean (query blocks, key blocks) on the CPU, True where a query block sees a key block. Do not modify."""
        return _layout(self, q_len, kv_len, causal)

    def mask(self, q_len: int, kv_len: int, causal: bool) -> Tensor:
        """The pattern as a boolean (q_len, kv_len) keep-mask: the function every block-sparse variant computes."""
        keep = self.layout(q_len, kv_len, causal).repeat_interleave(self.block, 0).repeat_interleave(self.block, 1)
        keep = keep[:q_len, :kv_len]
        return keep & torch.ones(q_len, kv_len, dtype=torch.bool).tril() if causal else keep


DEFAULT_PATTERN = BlockPattern()


@functools.lru_cache(maxsize=128)
def _layout(pattern: BlockPattern, q_len: int, kv_len: int, causal: bool) -> Tensor:
    n_q, n_k = math.ceil(q_len / pattern.block), math.ceil(kv_len / pattern.block)
    rows = torch.arange(n_q)[:, None]
    cols = torch.arange(n_k)[None, :]
    layout = ((rows - cols).abs() <= pattern.window_blocks) | (cols < pattern.global_blocks)
    allowed = cols <= rows if causal else torch.ones(n_q, n_k, dtype=torch.bool)
    layout &= allowed
    generator = torch.Generator().manual_seed(pattern.seed)
    for i in range(n_q):
        candidates = torch.nonzero(allowed[i] & ~layout[i]).flatten()
        order = torch.randperm(len(candidates), generator=generator)
        layout[i, candidates[order[: pattern.random_blocks]]] = True
    return layout


@functools.lru_cache(maxsize=128)
def _gather_plan(
    pattern: BlockPattern, q_len: int, kv_len: int, causal: bool, device: torch.device
) -> tuple[Tensor, Tensor]:
    """Per query block, the indices of its key blocks (padded to the widest row) and the element keep-mask
    (query blocks, block, kept blocks x block): padding slots, keys past kv_len and causal cuts are False."""
    layout, block = pattern.layout(q_len, kv_len, causal), pattern.block
    counts = layout.sum(dim=1)
    width = int(counts.max())
    # Stable sort puts each row's kept blocks first, in order; the rest of the row is padding.
    order = torch.sort((~layout).to(torch.int8), dim=1, stable=True).indices[:, :width]
    slot_used = torch.arange(width)[None, :] < counts[:, None]
    key_pos = order[:, :, None] * block + torch.arange(block)  # (n_q, width, block)
    query_pos = torch.arange(layout.shape[0])[:, None] * block + torch.arange(block)  # (n_q, block)
    keep = (slot_used[:, :, None] & (key_pos < kv_len))[:, None, :, :]  # (n_q, 1, width, block)
    if causal:
        keep = keep & (key_pos[:, None, :, :] <= query_pos[:, :, None, None])
    keep = keep.expand(-1, block, -1, -1).reshape(layout.shape[0], block, width * block)
    return order.to(device), keep.to(device)


def check_pattern_call(window: int | None, attn_mask: Tensor | None, name: str) -> None:
    """Refuse what a block pattern does not stand in for: sliding windows and explicit masks."""
    if window is not None:
        raise UnsupportedProblem(f"{name} stands in for full attention; for a sliding window use local or window-chunked")
    if attn_mask is not None:
        raise UnsupportedProblem(f"{name} does not take an explicit attn_mask")


def blocksparse_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    is_causal: bool = False,
    window: int | None = None,
    attn_mask: Tensor | None = None,
    scale: float | None = None,
    block: int = DEFAULT_PATTERN.block,
    window_blocks: int = DEFAULT_PATTERN.window_blocks,
    global_blocks: int = DEFAULT_PATTERN.global_blocks,
    random_blocks: int = DEFAULT_PATTERN.random_blocks,
) -> Tensor:
    """Attention restricted to the block pattern, computing only the kept blocks (gathered per query block)."""
    check_pattern_call(window, attn_mask, "blocksparse")
    pattern = BlockPattern(block, window_blocks, global_blocks, random_blocks)
    k, v = repeat_kv(k, v, q.shape[1])
    q_len, kv_len = q.shape[-2], k.shape[-2]
    index, keep = _gather_plan(pattern, q_len, kv_len, is_causal, q.device)
    n_q, width = index.shape
    n_k = math.ceil(kv_len / block)
    pad_k = (0, 0, 0, n_k * block - kv_len)
    qb = F.pad(q * resolve_scale(q, scale), (0, 0, 0, n_q * block - q_len)).unflatten(2, (n_q, block))
    kb = F.pad(k, pad_k).unflatten(2, (n_k, block))[:, :, index]  # (b, h, n_q, width, block, d): kept blocks only
    scores = torch.einsum("bhqid,bhqwjd->bhqiwj", qb, kb).flatten(-2)  # (b, h, n_q, block, width x block)
    del kb
    scores = scores.to(torch.promote_types(scores.dtype, torch.float32))  # softmax in at least float32
    probs = torch.softmax(scores.masked_fill_(~keep, float("-inf")), dim=-1).to(v.dtype)
    del scores
    vb = F.pad(v, pad_k).unflatten(2, (n_k, block))[:, :, index]
    out = torch.einsum("bhqiwj,bhqwjd->bhqid", probs.unflatten(-1, (width, block)), vb)
    return out.flatten(2, 3)[:, :, :q_len]


def pattern_supports(problem: Problem) -> str | None:
    """What every block-pattern variant refuses."""
    if problem.window is not None:
        return "stands in for full attention; for a sliding window use local or window-chunked"
    if problem.mask:
        return "does not take an explicit attn_mask"
    return None


def pattern_space(problem: Problem) -> dict[str, Any]:
    """The pattern's knobs; block sizes below q_len (or the smallest)."""
    from optuna.distributions import CategoricalDistribution, IntDistribution

    blocks = [b for b in _BLOCK_CHOICES if b < problem.q_len] or [_BLOCK_CHOICES[0]]
    return {
        "block": CategoricalDistribution(blocks),
        "window_blocks": IntDistribution(0, 3),
        "global_blocks": IntDistribution(1, 2),
        "random_blocks": IntDistribution(0, 3),
    }


@hookimpl
def attn_tune_variants() -> list[Variant]:
    return [
        Variant(
            name="blocksparse",
            family="sparse",
            fn=blocksparse_attention,
            exact=False,
            space=pattern_space,
            supports=pattern_supports,
            description="approximate: BigBird-style blocks (window, global, seeded random), only kept blocks computed",
        )
    ]
