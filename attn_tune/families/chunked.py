"""`chunked`: exact attention over query chunks; peak memory O(chunk x kv_len) instead of O(q_len x kv_len)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from attn_tune.problem import Problem
from attn_tune.registry.hookspecs import hookimpl
from attn_tune.registry.variant import Variant
from attn_tune.families.dense import attend
from attn_tune.families.masks import key_range, merge_masks, repeat_kv, resolve_scale, visible_keys

__all__ = ["chunked_attention", "CHUNK_CHOICES"]

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
    """Exact attention, `chunk` query rows at a time, each against only the keys it can see.

    Under autograd each chunk is checkpointed, so the backward pass also holds one chunk's scores at a time.
    """
    if chunk < 1:
        raise ValueError(f"chunk must be positive, got {chunk}")
    k, v = repeat_kv(k, v, q.shape[1])
    q_len, kv_len = q.shape[-2], k.shape[-2]
    scale = resolve_scale(q, scale)
    recompute = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    out = torch.empty(q.shape[:-1] + (v.shape[-1],), dtype=q.dtype, device=q.device)
    for r0 in range(0, q_len, chunk):
        r1 = min(r0 + chunk, q_len)
        lo, hi = key_range(r0, r1, kv_len, causal=is_causal, window=window)
        visible = visible_keys(
            r1 - r0, hi - lo, causal=is_causal, window=window, device=q.device, q_offset=r0, k_offset=lo
        )
        mask = merge_masks(visible, _mask_block(attn_mask, r0, r1, lo, hi))
        args = (q[..., r0:r1, :], k[..., lo:hi, :], v[..., lo:hi, :], mask, scale)
        out[..., r0:r1, :] = checkpoint(attend, *args, use_reentrant=False) if recompute else attend(*args)
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
