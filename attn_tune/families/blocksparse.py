"""`blocksparse` (approximate): a BigBird-style pattern of blocks, computed sparsely for real.

Query block i sees key blocks j with |i - j| <= window_blocks, the first `global_blocks` key blocks, and
`random_blocks` more drawn from a fixed seed (block-level causal when the problem is causal, and element-level
causal inside the blocks it keeps). Only the kept key blocks are gathered, so time and memory scale with the
number of non-zero blocks, not with q_len x kv_len. `block_layout` and `pattern_mask` define the function
exactly; the FlexAttention and xformers variants compute the same pattern.
"""

from __future__ import annotations

import functools
import math
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
    "PATTERN_SEED", "PATTERN_DEFAULTS", "block_layout", "pattern_mask", "blocksparse_attention",
    "pattern_supports", "pattern_space", "check_pattern_call",
]

PATTERN_SEED = 0
PATTERN_DEFAULTS: dict[str, int] = {"block": 64, "window_blocks": 1, "global_blocks": 1, "random_blocks": 1}
_BLOCK_CHOICES = (32, 64, 128)


@functools.lru_cache(maxsize=128)
def block_layout(
    q_len: int, kv_len: int, *, causal: bool, block: int, window_blocks: int, global_blocks: int, random_blocks: int,
    seed: int = PATTERN_SEED,
) -> Tensor:
    """Boolean (query blocks, key blocks) on the CPU, True where a query block sees a key block. Do not modify.

    At least one global block is required: it keeps every query's first key, so no row is ever empty.
    """
    if block < 1 or window_blocks < 0 or random_blocks < 0:
        raise ValueError("block must be positive; window_blocks and random_blocks must not be negative")
    if global_blocks < 1:
        raise ValueError("global_blocks must be at least 1, so that every query sees a key")
    n_q, n_k = math.ceil(q_len / block), math.ceil(kv_len / block)
    rows = torch.arange(n_q)[:, None]
    cols = torch.arange(n_k)[None, :]
    layout = ((rows - cols).abs() <= window_blocks) | (cols < global_blocks)
    allowed = cols <= rows if causal else torch.ones(n_q, n_k, dtype=torch.bool)
    layout &= allowed
    generator = torch.Generator().manual_seed(seed)
    for i in range(n_q):
        candidates = torch.nonzero(allowed[i] & ~layout[i]).flatten()
        order = torch.randperm(len(candidates), generator=generator)
        layout[i, candidates[order[:random_blocks]]] = True
    return layout


def pattern_mask(
    q_len: int, kv_len: int, *, causal: bool, block: int, window_blocks: int, global_blocks: int, random_blocks: int,
    seed: int = PATTERN_SEED,
) -> Tensor:
    """The pattern as a boolean (q_len, kv_len) keep-mask: the function every block-sparse variant computes."""
    layout = block_layout(
        q_len, kv_len, causal=causal, block=block, window_blocks=window_blocks, global_blocks=global_blocks,
        random_blocks=random_blocks, seed=seed,
    )
    mask = layout.repeat_interleave(block, 0).repeat_interleave(block, 1)[:q_len, :kv_len]
    if causal:
        mask = mask & torch.ones(q_len, kv_len, dtype=torch.bool).tril()
    return mask


@functools.lru_cache(maxsize=128)
def _gather_plan(
    q_len: int, kv_len: int, causal: bool, block: int, window_blocks: int, global_blocks: int, random_blocks: int,
    device: torch.device,
) -> tuple[Tensor, Tensor]:
    """Per query block, the indices of its key blocks (padded to the widest row) and the element keep-mask
    (query blocks, block, kept blocks x block): padding slots, keys past kv_len and causal cuts are False."""
    layout = block_layout(
        q_len, kv_len, causal=causal, block=block, window_blocks=window_blocks, global_blocks=global_blocks,
        random_blocks=random_blocks,
    )
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
    block: int = PATTERN_DEFAULTS["block"],
    window_blocks: int = PATTERN_DEFAULTS["window_blocks"],
    global_blocks: int = PATTERN_DEFAULTS["global_blocks"],
    random_blocks: int = PATTERN_DEFAULTS["random_blocks"],
) -> Tensor:
    """Attention restricted to the block pattern, computing only the kept blocks (gathered per query block)."""
    check_pattern_call(window, attn_mask, "blocksparse")
    k, v = repeat_kv(k, v, q.shape[1])
    batch, heads, q_len, _ = q.shape
    kv_len = k.shape[-2]
    index, keep = _gather_plan(
        q_len, kv_len, is_causal, block, window_blocks, global_blocks, random_blocks, q.device
    )
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
