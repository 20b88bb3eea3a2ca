"""`blocksparse` (approximate): a BigBird-style pattern of blocks, computed sparsely for real.

Query block i sees key blocks j with |i - j| <= window_blocks, the first `global_blocks` key blocks, and
`random_blocks` more drawn from a fixed seed (block-level causal when the problem is causal, and element-level
causal inside the blocks it keeps). Only the kept key blocks are gathered, and they go through SDPA's fused
kernel, so time and memory scale with the number of non-zero blocks, not with q_len x kv_len, and no kept score
is held whole. `BlockPattern.layout` / `.mask` define the function exactly; the FlexAttention and xformers
variants compute the same pattern.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from attn_tune.errors import UnsupportedProblem
from attn_tune.families.chunked import block_attention
from attn_tune.families.masks import pad_to_blocks, resolve_scale
from attn_tune.problem import Problem
from attn_tune.registry.hookspecs import hookimpl
from attn_tune.registry.variant import Variant

__all__ = [
    "PATTERN_SEED", "BlockPattern", "DEFAULT_PATTERN", "blocksparse_attention", "pattern_supports", "pattern_space",
    "check_pattern_call",
]

PATTERN_SEED = 0
_BLOCK_CHOICES = (32, 64, 128)
# A group of query blocks gathers at most kv_len / GATHER_FRACTION keys (per head): with the copies of its gathered
# keys and values (about four of that size live at once) it stays under half of K's size.
GATHER_FRACTION = 8


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
    """Per query block, the positions of the keys of its kept blocks (query blocks, kept blocks x block; rows padded
    to the widest, positions past kv_len clamped to a real key) and the element keep-mask of the same shape per
    query (query blocks, block, kept blocks x block): padding slots, keys past kv_len and causal cuts are False."""
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
    return key_pos.flatten(1).clamp(max=kv_len - 1).to(device), keep.to(device)


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
    """Attention restricted to the block pattern, computing only the kept blocks.

    Query blocks go in groups that each gather at most kv_len / GATHER_FRACTION keys, and each group runs through
    SDPA's fused kernel with its keep-mask: neither the kept scores nor the gathered keys of all groups are ever
    live at once.
    """
    check_pattern_call(window, attn_mask, "blocksparse")
    pattern = BlockPattern(block, window_blocks, global_blocks, random_blocks)
    q_len, kv_len = q.shape[-2], k.shape[-2]
    key_pos, keep = _gather_plan(pattern, q_len, kv_len, is_causal, q.device)
    # (b, kv_len, kv_heads, d) views: gathering positions gives (b, G, kept, kv_heads, d) in one copy, whose
    # transpose is the (b x G, kv_heads, kept, d) SDPA takes (its kernel makes it contiguous: a second copy).
    k_rows, v_rows = k.transpose(1, 2), v.transpose(1, 2)
    qb = pad_to_blocks(q, block)
    out = torch.empty(qb.shape[:-1] + (v.shape[-1],), dtype=q.dtype, device=q.device)
    batch, n_q, scale = q.shape[0], key_pos.shape[0], resolve_scale(q, scale)
    group = max(1, kv_len // (GATHER_FRACTION * key_pos.shape[1]))
    for g0 in range(0, n_q, group):
        g1 = min(g0 + group, n_q)
        rows = slice(g0 * block, g1 * block)
        # (b, h, G x block, d) -> (b x G, h, block, d): each query block is one SDPA batch entry.
        q_g = qb[:, :, rows].unflatten(2, (g1 - g0, block)).transpose(1, 2).flatten(0, 1)
        k_g, v_g = (t[:, key_pos[g0:g1]].transpose(2, 3).flatten(0, 1) for t in (k_rows, v_rows))
        mask = keep[g0:g1, None].repeat(batch, 1, 1, 1) if batch > 1 else keep[g0:g1, None]
        res = block_attention(q_g, k_g, v_g, mask, scale)
        out[:, :, rows] = res.unflatten(0, (batch, g1 - g0)).transpose(1, 2).flatten(2, 3)
    return out[:, :, :q_len] if out.shape[2] != q_len else out


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
