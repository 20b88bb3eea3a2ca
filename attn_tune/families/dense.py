"""`dense`: readable matmul-softmax-matmul. Supports every problem, explicit masks included; O(q_len x kv_len) memory."""

from __future__ import annotations

import torch
from torch import Tensor

from attn_tune.registry.hookspecs import hookimpl
from attn_tune.registry.variant import Variant
from attn_tune.families.masks import apply_mask, merge_masks, repeat_kv, resolve_scale, shared_visible_keys

__all__ = ["dense_attention", "attend"]


def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float) -> Tensor:
    """softmax(q k^T * scale + mask) v for equal head counts, softmax in at least float32.

    A query whose mask leaves it no key gets zeros, as SDPA gives (not NaN, which would spread through the
    next layer's values and through backward).
    """
    scores = torch.matmul(q, k.transpose(-2, -1))
    scores = apply_mask(scores.to(torch.promote_types(scores.dtype, torch.float32)) * scale, mask)
    if mask is None:
        probs = torch.softmax(scores, dim=-1)
    else:
        dead = scores.amax(dim=-1, keepdim=True) == float("-inf")
        probs = torch.softmax(scores.masked_fill(dead, 0.0), dim=-1).masked_fill(dead, 0.0)
    return torch.matmul(probs.to(v.dtype), v)


def dense_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    is_causal: bool = False,
    window: int | None = None,
    attn_mask: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """Attention with the whole score matrix materialised: the simplest correct thing."""
    k, v = repeat_kv(k, v, q.shape[1])
    visible = shared_visible_keys(q.shape[-2], k.shape[-2], causal=is_causal, window=window, device=q.device)
    return attend(q, k, v, merge_masks(visible, attn_mask), resolve_scale(q, scale))


@hookimpl
def attn_tune_variants() -> list[Variant]:
    return [
        Variant(
            name="dense",
            family="dense",
            fn=dense_attention,
            exact=True,
            description="matmul-softmax-matmul in plain PyTorch; every problem, explicit masks included",
        )
    ]
