"""`xformers-blocksparse` (approximate): the `blocksparse` pattern through xformers' own `BlockSparseTensor`.

xformers' block-sparse tensor keeps only the kept blocks' scores (`masked_matmul` with a block-sparse mask, its
softmax, its product with v); it is plain PyTorch inside, so it runs wherever xformers imports, CPU included.
Passing the same pattern as a dense boolean mask would save nothing: that is the trap this variant avoids.
Inside-block cuts (causal diagonal, keys past kv_len) are added to the kept blocks' scores before the softmax.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from attn_tune.families.blocksparse import (
    DEFAULT_PATTERN, BlockPattern, check_pattern_call, pattern_space, pattern_supports,
)
from attn_tune.families.masks import repeat_kv, resolve_scale
from attn_tune.problem import Problem
from attn_tune.registry.hookspecs import hookimpl
from attn_tune.registry.variant import Variant

__all__ = ["xformers_blocksparse_attention"]

_MIN_BLOCK = 16  # BlockSparseTensor refuses smaller blocks


@functools.lru_cache(maxsize=64)
def _sparse_plan(
    pattern: BlockPattern, q_len: int, kv_len: int, causal: bool, heads: int, device: torch.device, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """The per-head layout xformers wants (heads, q blocks, k blocks), on a square block grid, and the additive
    in-block bias (nnz, block, block) for the kept blocks in xformers' order (head, row, column)."""
    layout, block = pattern.layout(q_len, kv_len, causal), pattern.block
    n = max(layout.shape)  # xformers' grid is square: pad the shorter side with empty blocks
    square = torch.zeros(n, n, dtype=torch.bool)
    square[: layout.shape[0], : layout.shape[1]] = layout
    per_head = square.expand(heads, n, n).contiguous()
    _, rows, cols = per_head.nonzero(as_tuple=True)
    q_pos = rows[:, None, None] * block + torch.arange(block)[None, :, None]
    k_pos = cols[:, None, None] * block + torch.arange(block)[None, None, :]
    keep = (k_pos < kv_len).expand(len(rows), block, block)
    if causal:
        keep = keep & (k_pos <= q_pos)
    bias = torch.zeros(keep.shape, dtype=dtype).masked_fill(~keep, float("-inf"))
    return per_head.to(device), bias.to(device)


def xformers_blocksparse_attention(
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
    """The `blocksparse` pattern as xformers block-sparse scores: only kept blocks are stored and computed."""
    from xformers.ops import masked_matmul
    from xformers.sparse import BlockSparseTensor

    check_pattern_call(window, attn_mask, "xformers-blocksparse")
    if block < _MIN_BLOCK:
        raise ValueError(f"xformers' BlockSparseTensor needs blocks of at least {_MIN_BLOCK}, got {block}")
    k, v = repeat_kv(k, v, q.shape[1])
    batch, heads, q_len, _ = q.shape
    kv_len = k.shape[-2]
    pattern = BlockPattern(block, window_blocks, global_blocks, random_blocks)
    layout, bias = _sparse_plan(pattern, q_len, kv_len, is_causal, heads, q.device, q.dtype)
    length = layout.shape[-1] * block
    qp = F.pad(q * resolve_scale(q, scale), (0, 0, 0, length - q_len))
    kp = F.pad(k, (0, 0, 0, length - kv_len)).contiguous()
    vp = F.pad(v, (0, 0, 0, length - kv_len))
    shape_only = BlockSparseTensor(bias.new_zeros(()).expand(batch, *bias.shape), layout)
    scores = masked_matmul(qp, kp.transpose(-2, -1), shape_only)
    scores = BlockSparseTensor(scores.values() + bias, layout)
    out = scores.softmax(dim=-1) @ vp
    return out[:, :, :q_len]


def _supports(problem: Problem) -> str | None:
    if problem.q_len < _MIN_BLOCK and problem.n_kv_len < _MIN_BLOCK:
        return f"xformers' BlockSparseTensor needs blocks of at least {_MIN_BLOCK}"
    return pattern_supports(problem)


@hookimpl
def attn_tune_variants() -> list[Variant]:
    return [
        Variant(
            name="xformers-blocksparse",
            family="sparse",
            fn=xformers_blocksparse_attention,
            exact=False,
            space=pattern_space,
            supports=_supports,
            requires=("xformers.sparse", "xformers.ops"),
            description="approximate: the blocksparse pattern as xformers BlockSparseTensor scores",
        )
    ]
