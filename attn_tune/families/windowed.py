"""Sliding windows in query blocks: `window-chunked` (exact) and `local` (approximate, a narrower window).

Each block of queries attends only to the keys inside its window, so time and peak memory grow as
O(q_len x window), not O(q_len x kv_len). The block machinery is `chunked_attention`'s, shared, not copied.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor

from attn_tune.errors import UnsupportedProblem
from attn_tune.families.chunked import chunked_attention
from attn_tune.families.masks import resolve_scale
from attn_tune.families.torch_sdpa import sdpa as torch_sdpa
from attn_tune.problem import Problem
from attn_tune.registry.hookspecs import hookimpl
from attn_tune.registry.variant import Variant

__all__ = ["window_chunked_attention", "local_attention", "unfolded_window_attention", "local_window_choices",
           "BLOCK_CHOICES"]

BLOCK_CHOICES: tuple[int, ...] = (32, 64, 128, 256, 512)
LOCAL_WINDOW_CHOICES: tuple[int, ...] = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


def window_chunked_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    is_causal: bool = False,
    window: int | None = None,
    attn_mask: Tensor | None = None,
    scale: float | None = None,
    block: int = 128,
    unfolded: bool = False,
) -> Tensor:
    """Exact sliding-window attention, `block` queries at a time against the keys of their window only: one SDPA
    call per block, or (`unfolded`) every block in one call (`unfolded_window_attention`) where it applies."""
    if window is None:
        raise UnsupportedProblem("window-chunked computes sliding-window problems; this call has no window")
    return _windowed(q, k, v, is_causal, window, attn_mask, scale, block, unfolded)


def _windowed(q: Tensor, k: Tensor, v: Tensor, causal: bool, window: int, attn_mask: Tensor | None,
              scale: float | None, block: int, unfolded: bool) -> Tensor:
    if unfolded and attn_mask is None and q.shape[-2] == k.shape[-2]:
        return unfolded_window_attention(q, k, v, is_causal=causal, window=window, scale=scale, block=block)
    return chunked_attention(q, k, v, is_causal=causal, window=window, attn_mask=attn_mask, scale=scale, chunk=block)


def unfolded_window_attention(q: Tensor, k: Tensor, v: Tensor, *, is_causal: bool, window: int,
                              scale: float | None = None, block: int = 128) -> Tensor:
    """Sliding-window self-attention (q_len = kv_len) with every query block in one SDPA call.

    The keys are padded by the window on each side it reaches and unfolded into one (block + reach) slice per
    block of queries; the blocks go to SDPA as a batch, with one mask for all interior blocks (visibility depends
    only on the query-key offset) and the edges' padding cut out. The same arithmetic as `chunked_attention`'s
    loop of small calls, without the loop: faster where the calls are small. Keys are copied: memory grows as
    q_len x (block + reach) per key head instead of q_len.
    """
    batch, heads, length, dim = q.shape
    kv_heads, value_dim = k.shape[1], v.shape[-1]
    before, after = window - 1, 0 if is_causal else window - 1
    width, blocks = block + before + after, -(-length // block)
    tail = blocks * block - length
    keys = torch.nn.functional.pad(k, (0, 0, before, tail + after)).unfold(-2, width, block).transpose(-1, -2)
    values = torch.nn.functional.pad(v, (0, 0, before, tail + after)).unfold(-2, width, block).transpose(-1, -2)
    queries = torch.nn.functional.pad(q, (0, 0, 0, tail)).view(batch, heads, blocks, block, dim)

    def batched(x: Tensor, n_heads: int, rows: int) -> Tensor:  # (b, h, blocks, rows, d) -> (b * blocks, h, rows, d)
        return x.transpose(1, 2).reshape(batch * blocks, n_heads, rows, x.shape[-1])

    mask = _unfolded_mask(length, block, window, is_causal, q.device)
    out = torch_sdpa(batched(queries, heads, block), batched(keys, kv_heads, width), batched(values, kv_heads, width),
                     attn_mask=mask.repeat(batch, 1, 1, 1), scale=resolve_scale(q, scale),
                     enable_gqa=kv_heads != heads)
    out = out.view(batch, blocks, heads, block, value_dim).transpose(1, 2).reshape(batch, heads, -1, value_dim)
    return out[:, :, :length]


def _unfolded_mask(length: int, block: int, window: int, causal: bool, device: torch.device) -> Tensor:
    """(blocks, 1, block, width) bool: query i of block n sees slot j where the key is in its window and exists.
    Padding queries past the end see every existing key of their slice (never a row with no key: no NaN, even
    in backward); their outputs are cut off. Built once per shape outside torch.compile."""
    if torch.compiler.is_compiling():
        return _build_unfolded_mask(length, block, window, causal, device)
    return _cached_unfolded_mask(length, block, window, causal, device)


def _build_unfolded_mask(length: int, block: int, window: int, causal: bool, device: torch.device) -> Tensor:
    before, after = window - 1, 0 if causal else window - 1
    width, blocks = block + before + after, -(-length // block)
    start = torch.arange(blocks, device=device)[:, None, None] * block  # each block's first query position
    query = start + torch.arange(block, device=device)[None, :, None]
    key = start - before + torch.arange(width, device=device)[None, None, :]
    offset = query - key
    visible = (offset >= 0) & (offset < window) if causal else offset.abs() < window
    exists = (key >= 0) & (key < length)
    visible = torch.where(query < length, visible, torch.ones_like(visible)) & exists
    return visible[:, None]


@functools.lru_cache(maxsize=16)
def _cached_unfolded_mask(length: int, block: int, window: int, causal: bool, device: torch.device) -> Tensor:
    with torch.inference_mode(False), torch.no_grad():
        return _build_unfolded_mask(length, block, window, causal, device)


def local_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    is_causal: bool = False,
    window: int | None = None,
    attn_mask: Tensor | None = None,
    scale: float | None = None,
    local_window: int = 256,
    block: int = 128,
    unfolded: bool = False,
) -> Tensor:
    """Exact attention under the narrower window `local_window`: an approximation of the wider problem.

    Its own function is well defined: sliding-window attention with window `local_window` (and the problem's
    causal cut), so its error against the problem is measured, never assumed. A `local_window` that narrows
    nothing is refused, as `supports()` refuses problems with no narrower window.
    """
    if attn_mask is not None:
        raise UnsupportedProblem("local does not take an explicit attn_mask: a narrower window could leave a query no key")
    q_len, kv_len = q.shape[-2], k.shape[-2]
    full = window if window is not None else max(q_len, kv_len)
    if local_window >= full:
        raise UnsupportedProblem(f"local_window {local_window} is not narrower than this call's attention ({full})")
    if q_len >= kv_len + local_window:
        raise UnsupportedProblem(f"local window {local_window} leaves queries past kv_len + window with no key")
    return _windowed(q, k, v, is_causal, local_window, None, scale, block, unfolded)


def _window_supports(problem: Problem) -> str | None:
    return None if problem.window is not None else "needs a sliding window (window=None is full attention)"


def _block_space(problem: Problem) -> dict[str, Any]:
    from optuna.distributions import CategoricalDistribution

    choices = [b for b in BLOCK_CHOICES if b < problem.q_len] or [BLOCK_CHOICES[0]]
    return {"block": CategoricalDistribution(choices), **_unfolded_space(problem)}


def _unfolded_space(problem: Problem) -> dict[str, Any]:
    """Whether to run every block in one call: a choice where it applies (self-attention, no explicit mask)."""
    from optuna.distributions import CategoricalDistribution

    applies = problem.q_len == problem.n_kv_len and not problem.mask
    return {"unfolded": CategoricalDistribution([False, True])} if applies else {}


def local_window_choices(problem: Problem) -> list[int]:
    """Windows narrower than the problem's (or than full attention) that still leave every query a key."""
    full = problem.window if problem.window is not None else max(problem.q_len, problem.n_kv_len)
    return [w for w in LOCAL_WINDOW_CHOICES if problem.q_len - problem.n_kv_len < w < full]


def _local_supports(problem: Problem) -> str | None:
    if problem.mask:
        return "an explicit attn_mask: a narrower window could leave a query with no visible key"
    if not local_window_choices(problem):
        return f"no window in {LOCAL_WINDOW_CHOICES[0]}..{LOCAL_WINDOW_CHOICES[-1]} is narrower than this problem's"
    return None


def _local_space(problem: Problem) -> dict[str, Any]:
    from optuna.distributions import CategoricalDistribution

    return {"local_window": CategoricalDistribution(local_window_choices(problem) or [LOCAL_WINDOW_CHOICES[0]])}


@hookimpl
def attn_tune_variants() -> list[Variant]:
    return [
        Variant(
            name="window-chunked",
            family="windowed",
            fn=window_chunked_attention,
            exact=True,
            space=_block_space,
            supports=_window_supports,
            description="sliding window in query blocks, each against its window's keys; O(q_len x window)",
        ),
        Variant(
            name="local",
            family="windowed",
            fn=local_attention,
            exact=False,
            space=_local_space,
            supports=_local_supports,
            description="approximate: a narrower sliding window (knob local_window) stands in for the asked attention",
        ),
    ]
