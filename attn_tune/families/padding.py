"""Key-padding masks served by trimming: each batch row's attention runs on its real keys only.

A padded batch's mask is (batch or 1, 1, 1, kv_len) bool, True = a real key. When a row's real keys form one run
[s, e), its queries [s, min(e, q_len)) against keys [s, e) keep every query-key offset, so they are an unpadded
problem of their own (causal, window and all) for any structured kernel (`inner`); the queries before s and past e
see few keys or none, and get a small exact-masked SDPA call or zeros. A row whose real keys have holes goes through
SDPA with its exact dense mask, so the answer is always right. Reading the runs costs one device sync per call.
"""

from __future__ import annotations

import itertools
from typing import Callable

import torch
from torch import Tensor

from attn_tune.errors import UnsupportedProblem
from attn_tune.families.blockwise_grad import block_attention
from attn_tune.families.masks import (block_fully_visible, fold_for_sdpa, is_key_mask, key_range, resolve_scale,
                                     visible_keys)

__all__ = ["Inner", "key_rows", "trimmed_rows", "masked_attention"]

# inner(q, k, v, causal, window, scale): unpadded attention, causal aligned top-left (as SDPA's is_causal).
Inner = Callable[[Tensor, Tensor, Tensor, bool, "int | None", float], Tensor]


def key_rows(attn_mask: Tensor, batch: int, kv_len: int) -> Tensor:
    """A key mask as (B', kv_len) bool, B' being 1 (one mask for every row) or `batch`."""
    rows = attn_mask.reshape(attn_mask.shape[0] if attn_mask.dim() == 4 else 1, attn_mask.shape[-1])
    return rows.expand(rows.shape[0] if rows.shape[0] == 1 else batch, kv_len)


def masked_attention(q: Tensor, k: Tensor, v: Tensor, padding: Tensor, *, causal: bool, window: int | None,
                     scale: float | None) -> Tensor:
    """The padded problem as one SDPA call with the exact dense mask (causal/window folded into it): the path for
    rows with holes, and for whole calls while torch.compile traces (the runs' lengths are data)."""
    mask, _ = fold_for_sdpa(q.shape[-2], k.shape[-2], is_causal=causal, window=window, attn_mask=padding,
                            device=q.device)  # a mask is given, so causal is folded into it
    return block_attention(q, k, v, mask, resolve_scale(q, scale))


def _runs(rows: Tensor) -> list[tuple[int, int, int]]:
    """(real keys, first real key, one past the last) per row: one (B', K) pass and one sync."""
    kv_len = rows.shape[-1]
    index = torch.arange(kv_len, device=rows.device)
    count = rows.sum(-1)
    first = torch.where(rows, index, kv_len).amin(-1)
    end = torch.where(rows, index + 1, 0).amax(-1)
    return [tuple(r) for r in torch.stack([count, first, end], -1).tolist()]  # type: ignore[misc]


def trimmed_rows(inner: Inner, q: Tensor, k: Tensor, v: Tensor, padding: Tensor, *, causal: bool,
                 window: int | None, scale: float | None) -> Tensor:
    """Attention of q, k, v where query i of row b sees key j iff causal/window allow it and padding[b, j]; a query
    that sees no key gets zeros. Consecutive rows with the same padding share one call of `inner`."""
    if not is_key_mask(padding):
        raise UnsupportedProblem("expected a bool key-padding mask of shape (batch or 1, 1, 1, kv_len)")
    batch, q_len, kv_len = q.shape[0], q.shape[-2], k.shape[-2]
    rows = key_rows(padding, batch, kv_len)
    scale = resolve_scale(q, scale)
    if torch.compiler.is_compiling():
        return masked_attention(q, k, v, rows[:, None, None, :], causal=causal, window=window, scale=scale)
    runs = _runs(rows)
    groups: list[tuple[int, int, tuple[int, int, int]]] = []  # [b0, b1): consecutive rows with one run
    if len(runs) == 1:  # one mask for every row
        groups.append((0, batch, runs[0]))
    else:
        for run, same in itertools.groupby(runs):
            b0 = groups[-1][1] if groups else 0
            groups.append((b0, b0 + sum(1 for _ in same), run))
    outs = []
    for b0, b1, (count, start, end) in groups:
        qs, ks, vs = q[b0:b1], k[b0:b1], v[b0:b1]
        if count == 0:
            outs.append(_unseen(qs, ks, vs, 0, q_len, scale))
        elif count != end - start:  # holes: the exact dense mask
            pad = rows[b0:b1] if rows.shape[0] != 1 else rows
            outs.append(masked_attention(qs, ks, vs, pad[:, None, None, :], causal=causal, window=window, scale=scale))
        else:
            outs.append(_one_run(inner, qs, ks, vs, start, end, causal, window, scale))
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def _one_run(inner: Inner, q: Tensor, k: Tensor, v: Tensor, start: int, end: int, causal: bool,
             window: int | None, scale: float) -> Tensor:
    """Rows whose real keys are [start, end): the queries in that range through `inner`, the others at the edges."""
    ks, vs = k[..., start:end, :], v[..., start:end, :]
    if not causal and window is None:
        return inner(q, ks, vs, False, None, scale)
    q_len = q.shape[-2]
    head_end = min(start, q_len)
    core_end = max(head_end, min(end, q_len))
    parts = _edge(q, k, v, 0, head_end, start, end, causal, window, scale)
    if core_end > head_end:
        parts.append(inner(q[..., head_end:core_end, :], ks, vs, causal, window, scale))
    parts += _edge(q, k, v, core_end, q_len, start, end, causal, window, scale)
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-2)


def _edge(q: Tensor, k: Tensor, v: Tensor, r0: int, r1: int, start: int, end: int, causal: bool,
          window: int | None, scale: float) -> list[Tensor]:
    """Output parts for queries [r0, r1) outside the run: those that see a real key through one SDPA call with
    the exact mask (or none where they see all it gives them), zeros for the rest."""
    if r1 <= r0:
        return []
    # Query i sees some key of [start, end) iff i >= start (causal) or i > start - window, and i < end + window - 1.
    lo_row = start if causal else start - window + 1 if window is not None else r0
    hi_row = end + window - 1 if window is not None else r1
    first, last = max(r0, lo_row), min(r1, hi_row)
    if last <= first:
        return [_unseen(q, k, v, r0, r1, scale)]
    lo, hi = key_range(first, last, k.shape[-2], causal=causal, window=window)
    lo, hi = max(lo, start), min(hi, end)
    geometry = dict(causal=causal, window=window)
    mask = None
    if not block_fully_visible(last - first, hi - lo, shift=first - lo, **geometry):
        mask = visible_keys(last - first, hi - lo, device=q.device, q_offset=first, k_offset=lo, **geometry)
    seen = block_attention(q[..., first:last, :], k[..., lo:hi, :], v[..., lo:hi, :], mask, scale)
    parts = [_unseen(q, k, v, r0, first, scale)] if first > r0 else []
    parts.append(seen)
    return parts + ([_unseen(q, k, v, last, r1, scale)] if r1 > last else [])


def _unseen(q: Tensor, k: Tensor, v: Tensor, r0: int, r1: int, scale: float) -> Tensor:
    """Zeros for queries [r0, r1), which see no key: SDPA against one key they may not see, so that the zeros
    stay in the graph (q, k and v get zero gradients, not none) at the cost of one score per query."""
    hidden = torch.zeros(1, 1, 1, 1, dtype=torch.bool, device=q.device)
    return block_attention(q[..., r0:r1, :], k[..., :1, :], v[..., :1, :], hidden, scale)
