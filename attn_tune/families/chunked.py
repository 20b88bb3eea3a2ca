"""`chunked`: exact attention over query chunks; peak memory O(chunk x kv_len) instead of O(q_len x kv_len).

Each chunk goes through SDPA's fused kernel (its scores are never held whole) with a small boolean mask for the
chunk's edge, or none where the chunk sees all its keys. The windowed variants share this machinery.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from attn_tune.problem import Problem
from attn_tune.registry.hookspecs import hookimpl
from attn_tune.registry.variant import Variant
from attn_tune.families.masks import (
    block_fully_visible, key_range, merge_masks, resolve_scale, shared_visible_keys,
)
from attn_tune.families.torch_sdpa import sdpa as torch_sdpa

__all__ = ["chunked_attention", "block_attention", "CHUNK_CHOICES"]

CHUNK_CHOICES: tuple[int, ...] = (32, 64, 128, 256, 512, 1024, 2048)


def _mask_block(attn_mask: Tensor | None, r0: int, r1: int, lo: int, hi: int) -> Tensor | None:
    """The rows [r0, r1) and keys [lo, hi) of a broadcastable SDPA mask."""
    if attn_mask is None:
        return None
    rows = slice(r0, r1) if attn_mask.shape[-2] != 1 else slice(None)
    cols = slice(lo, hi) if attn_mask.shape[-1] != 1 else slice(None)
    return attn_mask[..., rows, cols]


def block_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float) -> Tensor:
    """One block of queries against its keys through SDPA's fused kernel: the scores are computed in tiles, never
    held whole, also in backward; grouped kv heads are read in place (no copies)."""
    return torch_sdpa(q, k, v, attn_mask=mask, scale=scale, enable_gqa=k.shape[1] != q.shape[1])


def chunked_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    is_causal: bool = False,
    window: int | None = None,
    attn_mask: Tensor | None = None,
    scale: float | None = None,
    chunk: int = 256,
) -> Tensor:
    """Exact attention, `chunk` query rows at a time, each against only the keys it can see (`block_attention`).

    The visibility mask of a chunk depends only on its query-key offset, so interior chunks of a window share one.
    """
    if chunk < 1:
        raise ValueError(f"chunk must be positive, got {chunk}")
    q_len, kv_len = q.shape[-2], k.shape[-2]
    scale = resolve_scale(q, scale)
    out = torch.empty(q.shape[:-1] + (v.shape[-1],), dtype=q.dtype, device=q.device)
    for r0 in range(0, q_len, chunk):
        r1 = min(r0 + chunk, q_len)
        lo, hi = key_range(r0, r1, kv_len, causal=is_causal, window=window)
        geometry = dict(causal=is_causal, window=window, shift=r0 - lo)
        visible = None if block_fully_visible(r1 - r0, hi - lo, **geometry) else shared_visible_keys(
            r1 - r0, hi - lo, device=q.device, **geometry
        )
        mask = merge_masks(visible, _mask_block(attn_mask, r0, r1, lo, hi))
        out[..., r0:r1, :] = block_attention(q[..., r0:r1, :], k[..., lo:hi, :], v[..., lo:hi, :], mask, scale)
    return out


def _space(problem: Problem) -> dict[str, Any]:
    from optuna.distributions import CategoricalDistribution

    choices = [c for c in CHUNK_CHOICES if c < problem.q_len] or [problem.q_len]
    return {"chunk": CategoricalDistribution(choices)}


@hookimpl
def attn_tune_variants() -> list[Variant]:
    return [
        Variant(
            name="chunked",
            family="dense",
            fn=chunked_attention,
            exact=True,
            space=_space,
            description="query chunks, each against only the keys it can see; memory O(chunk x kv_len)",
        )
    ]
