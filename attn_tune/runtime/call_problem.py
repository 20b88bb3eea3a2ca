"""A call's Problem: what `attention`'s arguments ask, in the terms configs are tuned in, or why none fits."""

from __future__ import annotations

import torch
from torch import Tensor

from attn_tune.errors import InvalidProblem
from attn_tune.problem import DTYPES, Problem

__all__ = ["call_problem", "signature_problem"]


def call_problem(q: Tensor, k: Tensor, v: Tensor, has_mask: bool, causal: bool, window: int | None,
                 enable_gqa: bool, training: bool, key_padding: bool = False) -> Problem | str:
    """The call's Problem, or why no Problem describes it (then SDPA runs it as is). `key_padding`: the mask is
    the key padding read from the caller's mask (`attn_tune.mask_structure`)."""
    if q.dim() not in (3, 4) or k.dim() != q.dim() or v.dim() != q.dim():
        return "inputs are not 3-D or 4-D"
    if not q.dtype == k.dtype == v.dtype:
        raise InvalidProblem(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not q.device == k.device == v.device:
        raise InvalidProblem(f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")
    if v.shape[-1] != q.shape[-1] or k.shape[-1] != q.shape[-1]:
        return "key/value head_dim differs from the query's"
    if q.shape[0] != k.shape[0] or k.shape[:-1] != v.shape[:-1]:
        return "batch or key/value shapes differ (SDPA broadcasts them)"
    heads, kv_heads = (q.shape[1], k.shape[1]) if q.dim() == 4 else (1, 1)
    return signature_problem(q.shape[0], heads, kv_heads, q.shape[-2], k.shape[-2], q.shape[-1], q.dtype, q.device,
                             has_mask, causal, window, enable_gqa, training, key_padding)


def signature_problem(batch: int, heads: int, kv_heads: int, q_len: int, kv_len: int, head_dim: int,
                      dtype: torch.dtype, device: torch.device, has_mask: bool, causal: bool, window: int | None,
                      enable_gqa: bool, training: bool, key_padding: bool = False) -> Problem | str:
    """The Problem of a call with these sizes and settings, or why none describes it."""
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        return f"dtype {name} is not tuned by attn-tune"
    if device.type not in ("cpu", "cuda"):
        return f"device {device} is not tuned by attn-tune"
    if heads != kv_heads and not enable_gqa:
        raise InvalidProblem(f"q has {heads} heads and k/v {kv_heads}: pass enable_gqa=True for grouped-query "
                             "attention")
    return Problem(
        batch=batch, heads=heads, q_len=q_len, head_dim=head_dim, kv_len=None if kv_len == q_len else kv_len,
        kv_heads=None if kv_heads == heads else kv_heads, dtype=name, device=str(device), causal=causal,
        window=window, mask=has_mask, training=training, key_padding=key_padding,
    )
