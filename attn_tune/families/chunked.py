"""`chunked`: exact attention over query chunks; peak memory O(chunk x kv_len) instead of O(q_len x kv_len).

Each chunk goes through SDPA's fused kernel (its scores are never held whole) with a small boolean mask for the
chunk's edge, or none where the chunk sees all its keys. Its backward is SDPA's own per chunk, added into one
gradient per input (`blockwise_grad`), not autograd through the chunks' slices. The windowed variants share this.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from attn_tune.problem import Problem
from attn_tune.registry.hookspecs import hookimpl
from attn_tune.registry.variant import Variant
from attn_tune.families.blockwise_grad import Piece, RunPiece, block_attention, piecewise_attention
from attn_tune.families.masks import (
    block_fully_visible, key_range, merge_masks, resolve_scale, shared_visible_keys,
)

__all__ = ["chunked_attention", "block_attention", "CHUNK_CHOICES"]

CHUNK_CHOICES: tuple[int, ...] = (32, 64, 128, 256, 512, 1024, 2048)


def _mask_block(attn_mask: Tensor | None, r0: int, r1: int, lo: int, hi: int) -> Tensor | None:
    """The rows [r0, r1) and keys [lo, hi) of a broadcastable SDPA mask."""
    if attn_mask is None:
        return None
    rows = slice(r0, r1) if attn_mask.shape[-2] != 1 else slice(None)
    cols = slice(lo, hi) if attn_mask.shape[-1] != 1 else slice(None)
    return attn_mask[..., rows, cols]


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
    layout = _Rows(chunk, is_causal, window, attn_mask, resolve_scale(q, scale))
    return piecewise_attention(layout, q, k, v)


class _Rows:
    """`chunked_attention`'s pieces: rows [r0, r1) of q against keys [lo, hi) (`blockwise_grad.Layout`)."""

    def __init__(self, chunk: int, causal: bool, window: int | None, attn_mask: Tensor | None, scale: float) -> None:
        self.chunk, self.causal, self.window, self.attn_mask, self.scale = chunk, causal, window, attn_mask, scale

    def forward(self, q: Tensor, k: Tensor, v: Tensor, run: RunPiece, recorded: bool) -> Tensor:
        q_len, kv_len = q.shape[-2], k.shape[-2]
        out = torch.empty(q.shape[:-1] + (v.shape[-1],), dtype=q.dtype, device=q.device)
        for r0 in range(0, q_len, self.chunk):
            r1 = min(r0 + self.chunk, q_len)
            lo, hi = key_range(r0, r1, kv_len, causal=self.causal, window=self.window)
            geometry = dict(causal=self.causal, window=self.window, shift=r0 - lo)
            visible = None if block_fully_visible(r1 - r0, hi - lo, **geometry) else shared_visible_keys(
                r1 - r0, hi - lo, device=q.device, **geometry
            )
            mask = merge_masks(visible, _mask_block(self.attn_mask, r0, r1, lo, hi))
            out[..., r0:r1, :] = run(q[..., r0:r1, :], k[..., lo:hi, :], v[..., lo:hi, :], mask, (r0, r1, lo, hi))
        return out

    def backward(self, grad_out: Tensor, pieces: list[Piece], q: Tensor, k: Tensor, v: Tensor,
                 needs: tuple[bool, bool, bool]) -> tuple[Tensor | None, ...]:
        dq = torch.empty_like(q) if needs[0] else None  # the chunks' rows cover q once
        dk, dv = (torch.zeros_like(x) if need else None for x, need in zip((k, v), needs[1:]))  # unseen keys: 0
        for piece in pieces:
            r0, r1, lo, hi = piece.where
            gq, gk, gv = piece.grads(grad_out[..., r0:r1, :])
            if dq is not None:
                dq[..., r0:r1, :].copy_(gq)
            for total, part in ((dk, gk), (dv, gv)):
                if total is not None:
                    total[..., lo:hi, :].add_(part)
        return dq, dk, dv


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
