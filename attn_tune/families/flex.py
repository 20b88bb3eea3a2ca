"""FlexAttention variants: `window-flex` (exact sliding window) and `flex-blocksparse` (the `blocksparse` pattern).

`torch.nn.attention.flex_attention` skips the blocks a `BlockMask` marks empty, so work follows the pattern. The
compiled function (dynamic shapes, so one compile serves many lengths) and each block mask, keyed by
(lengths, pattern, device), are built once per process; `measure()` reports that one-time cost as
`first_call_ms`, apart from the per-call latency. Block masks are computed from the block geometry directly
(O(blocks^2), no compile), not by evaluating a mask_mod over every (query, key) pair.

Keys and values are padded to a whole number of blocks (the padding masked out) before the kernel sees them:
torch 2.13's CPU FlexAttention kernel gives wrong, sometimes non-finite, run-to-run different outputs when the key
length is shorter than the block and 8 past a multiple of 16 (8, 24, 40, ... with blocks of 128), as if it read
memory it never wrote; `bench/flex_cpu_key_tail.py` shows it without attn-tune.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch
from torch import Tensor

from attn_tune.errors import UnsupportedProblem
from attn_tune.families.blocksparse import (
    DEFAULT_PATTERN, BlockPattern, check_pattern_call, pattern_space, pattern_supports,
)
from attn_tune.families.masks import pad_to_blocks
from attn_tune.problem import Problem
from attn_tune.registry.hookspecs import hookimpl
from attn_tune.registry.variant import Variant

__all__ = ["window_flex_attention", "flex_blocksparse_attention", "window_block_mask", "pattern_block_mask"]

WINDOW_MASK_BLOCK = 128
# Blocks the CPU kernel computes correctly: whole multiples of 16 (a block of 24 gave wrong answers even when the
# keys were padded to whole blocks).
BLOCK_MULTIPLE = 16
# One compiled function serves every dtype / head_dim / GQA / causal combination a process meets (each one a
# recompile); past dynamo's default of 8 it would fall back, silently, to eager FlexAttention, which materialises
# the whole score matrix. So: a higher limit, and an error rather than that fallback.
_RECOMPILE_LIMIT = 512


def _compile_limits() -> Any:
    config = torch._dynamo.config
    return config.patch(
        recompile_limit=max(config.recompile_limit, _RECOMPILE_LIMIT),
        accumulated_recompile_limit=max(config.accumulated_recompile_limit, 2 * _RECOMPILE_LIMIT),
        fail_on_recompile_limit_hit=not config.suppress_errors,
    )


@functools.lru_cache(maxsize=None)
def _compiled_flex() -> Callable[..., Any]:
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=True)


def _band_mask_mod(width: int, causal: bool, kv_len: int, device: torch.device) -> Callable[..., Tensor]:
    """Keep |q - k| < width, k <= q where `causal`, and k < kv_len (the padding is never seen). Held as tensors,
    not Python values, so that every window, pattern and length shares one traced mask_mod and a new one costs no
    recompile. Applied only inside partial blocks."""
    width_t, causal_t, kv_len_t = (torch.tensor(x, device=device) for x in (width, causal, kv_len))

    def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        diff = q_idx - kv_idx
        return (diff < width_t) & (diff > -width_t) & ((diff >= 0) | ~causal_t) & (kv_idx < kv_len_t)

    return mask_mod


def _padded(length: int, block: int) -> int:
    return -(-length // block) * block


def _block_mask(full: Tensor, partial: Tensor, q_len: int, kv_len: int, block: int, mask_mod: Callable[..., Any]) -> Any:
    """A BlockMask from boolean (query blocks, key blocks) grids: `full` blocks skip the mask_mod, `partial` blocks
    apply it, all others are never visited. Built directly, without evaluating mask_mod over q_len x kv_len, for
    keys padded to whole blocks (the last key block, when cut, is partial, so its padding is masked)."""
    from torch.nn.attention.flex_attention import BlockMask

    def counts_and_indices(grid: Tensor) -> tuple[Tensor, Tensor]:
        order = torch.sort((~grid).to(torch.int8), dim=1, stable=True).indices  # kept blocks first, in order
        return grid.sum(dim=1).to(torch.int32)[None, None], order.to(torch.int32)[None, None]

    kv_num, kv_idx = counts_and_indices(partial)
    full_num, full_idx = counts_and_indices(full)
    return BlockMask.from_kv_blocks(
        kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block, mask_mod=mask_mod,
        seq_lengths=(q_len, _padded(kv_len, block)),
    )


def _block_bounds(length: int, block: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per block: first index, last index, and whether the block is complete (not cut by the sequence end)."""
    first = torch.arange(0, length, block)
    last = torch.clamp(first + block - 1, max=length - 1)
    return first, last, last - first == block - 1


@functools.lru_cache(maxsize=64)
def window_block_mask(q_len: int, kv_len: int, window: int, causal: bool, device: torch.device) -> Any:
    """The BlockMask of a sliding window (and causal cut), built once per (lengths, window, causal, device).

    Within a block pair, q - k takes every value between its extremes, so a pair is visited when that range meets
    the band [0 if causal else 1 - window, window - 1] and is full when it lies inside it.
    """
    block = WINDOW_MASK_BLOCK
    q_first, q_last, q_whole = _block_bounds(q_len, block)
    k_first, k_last, k_whole = _block_bounds(kv_len, block)
    low, high = q_first[:, None] - k_last[None, :], q_last[:, None] - k_first[None, :]
    band_low, band_high = (0 if causal else 1 - window), window - 1
    visited = (high >= band_low) & (low <= band_high)
    full = (low >= band_low) & (high <= band_high) & q_whole[:, None] & k_whole[None, :]
    mask_mod = _band_mask_mod(window, causal, kv_len, device)
    return _block_mask(full, visited & ~full, q_len, kv_len, block, mask_mod).to(device)


@functools.lru_cache(maxsize=64)
def pattern_block_mask(pattern: BlockPattern, q_len: int, kv_len: int, causal: bool, device: torch.device) -> Any:
    """The BlockMask of the `blocksparse` pattern, FlexAttention blocks equal to the pattern's blocks: kept blocks
    are visited, and only the causal diagonal and the sequence ends need the mask_mod."""
    layout, block = pattern.layout(q_len, kv_len, causal), pattern.block
    _, _, q_whole = _block_bounds(q_len, block)
    _, _, k_whole = _block_bounds(kv_len, block)
    rows, cols = torch.arange(layout.shape[0])[:, None], torch.arange(layout.shape[1])[None, :]
    full = layout & q_whole[:, None] & k_whole[None, :] & ((cols < rows) if causal else True)
    mask_mod = _band_mask_mod(max(q_len, kv_len) + 1, causal, kv_len, device)
    return _block_mask(full, layout & ~full, q_len, kv_len, block, mask_mod).to(device)


def _refuse_cpu_backward(q: Tensor, k: Tensor, v: Tensor) -> None:
    if q.device.type == "cpu" and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        raise UnsupportedProblem(f"FlexAttention has no backward on CPU (torch {torch.__version__})")


def _flex(q: Tensor, k: Tensor, v: Tensor, block_mask: Any, scale: float | None) -> Tensor:
    """Compiled FlexAttention over keys and values padded to the block mask's whole blocks."""
    k, v = pad_to_blocks(k, block_mask.BLOCK_SIZE[1]), pad_to_blocks(v, block_mask.BLOCK_SIZE[1])
    flex = _compiled_flex()
    with _compile_limits():
        return flex(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=k.shape[1] != q.shape[1])


def window_flex_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    is_causal: bool = False,
    window: int | None = None,
    attn_mask: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """Exact sliding-window attention through compiled FlexAttention and a cached block mask."""
    if window is None:
        raise UnsupportedProblem("window-flex computes sliding-window problems; this call has no window")
    if attn_mask is not None:
        raise UnsupportedProblem("window-flex builds its block mask once per shape, not per attn_mask tensor")
    _refuse_cpu_backward(q, k, v)
    block_mask = window_block_mask(q.shape[-2], k.shape[-2], window, is_causal, q.device)
    return _flex(q, k, v, block_mask, scale)


def flex_blocksparse_attention(
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
    """The `blocksparse` pattern through compiled FlexAttention."""
    check_pattern_call(window, attn_mask, "flex-blocksparse")
    if block % BLOCK_MULTIPLE:
        raise UnsupportedProblem(f"flex-blocksparse needs a block that is a multiple of {BLOCK_MULTIPLE}, not {block}")
    _refuse_cpu_backward(q, k, v)
    pattern = BlockPattern(block, window_blocks, global_blocks, random_blocks)
    block_mask = pattern_block_mask(pattern, q.shape[-2], k.shape[-2], is_causal, q.device)
    return _flex(q, k, v, block_mask, scale)


def _flex_supports(problem: Problem) -> str | None:
    if problem.training and problem.device_type == "cpu":
        return f"FlexAttention has no backward on CPU (torch {torch.__version__})"
    if problem.head_dim < 16 and problem.device_type != "cpu":
        return "FlexAttention's GPU kernel needs head_dim >= 16 (tl.dot)"
    return None


def _window_flex_supports(problem: Problem) -> str | None:
    if problem.window is None:
        return "needs a sliding window (window=None is full attention)"
    if problem.mask:
        return "an explicit attn_mask: the block mask is built once per shape, not per mask tensor"
    return _flex_supports(problem)


def _flex_blocksparse_supports(problem: Problem) -> str | None:
    return pattern_supports(problem) or _flex_supports(problem)


_REQUIRES = ("torch.nn.attention.flex_attention",)


@hookimpl
def attn_tune_variants() -> list[Variant]:
    return [
        Variant(
            name="window-flex",
            family="windowed",
            fn=window_flex_attention,
            exact=True,
            supports=_window_flex_supports,
            requires=_REQUIRES,
            description="sliding window through compiled FlexAttention; block mask and compile cached per shape",
        ),
        Variant(
            name="flex-blocksparse",
            family="sparse",
            fn=flex_blocksparse_attention,
            exact=False,
            space=pattern_space,
            supports=_flex_blocksparse_supports,
            requires=_REQUIRES,
            description="approximate: the blocksparse pattern through compiled FlexAttention block masks",
        ),
    ]
