"""Masking helpers shared by the variants: causal/window visibility, combining with SDPA masks, GQA expansion."""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
from torch import Tensor

__all__ = [
    "visible_keys", "shared_visible_keys", "block_fully_visible", "fold_for_sdpa", "merge_masks", "apply_mask",
    "repeat_kv", "resolve_scale", "key_range", "pad_to_blocks", "is_key_mask",
]


def visible_keys(
    q_len: int,
    kv_len: int,
    *,
    causal: bool,
    window: int | None,
    device: torch.device | str,
    q_offset: int = 0,
    k_offset: int = 0,
) -> Tensor | None:
    """Boolean (q_len, kv_len), True where query `q_offset + i` may see key `k_offset + j`; None if all may.

    Causal is aligned top-left (as SDPA's `is_causal`); window w keeps |i - j| < w (causal: 0 <= i - j < w).
    """
    if not causal and window is None:
        return None
    rows = torch.arange(q_offset, q_offset + q_len, device=device)[:, None]
    cols = torch.arange(k_offset, k_offset + kv_len, device=device)[None, :]
    diff = rows - cols
    visible = diff >= 0 if causal else torch.ones_like(diff, dtype=torch.bool)
    if window is not None:
        visible = visible & (diff < window) & (diff > -window)
    return visible


_KEPT_PATTERNS = 64
_KEPT_PATTERN_BYTES = 256 * 2**20  # a server seeing many long lengths keeps the latest patterns, not one per length
_patterns: OrderedDict[tuple, Tensor | None] = OrderedDict()


def _cached_visible_keys(
    q_len: int, kv_len: int, causal: bool, window: int | None, device: torch.device, shift: int
) -> Tensor | None:
    """`visible_keys`, kept for the latest `_KEPT_PATTERNS` shapes and at most `_KEPT_PATTERN_BYTES` in all."""
    key = (q_len, kv_len, causal, window, device, shift)
    if key in _patterns:
        _patterns.move_to_end(key)
        return _patterns[key]
    with torch.inference_mode(False), torch.no_grad():  # a plain tensor, usable later under autograd
        pattern = visible_keys(q_len, kv_len, causal=causal, window=window, device=device, q_offset=shift)
    _patterns[key] = pattern
    while len(_patterns) > 1 and (len(_patterns) > _KEPT_PATTERNS or _pattern_bytes() > _KEPT_PATTERN_BYTES):
        _patterns.popitem(last=False)
    return pattern


def _pattern_bytes() -> int:
    return sum(p.numel() for p in _patterns.values() if p is not None)  # bool: a byte each


def shared_visible_keys(
    q_len: int, kv_len: int, *, causal: bool, window: int | None, device: torch.device | str, shift: int = 0
) -> Tensor | None:
    """`visible_keys` for queries `shift + i` and keys `j`, built once per (lengths, causal, window, device, shift).

    Every layer of a model asks for the same mask, and every interior block of a windowed variant for the same
    block mask (visibility depends only on the query-key offset); rebuilding it costs O(q_len x kv_len) per call.
    The tensor is shared, so callers must not modify it in place. Under torch.compile it is traced, not cached.
    """
    if torch.compiler.is_compiling():
        return visible_keys(q_len, kv_len, causal=causal, window=window, device=device, q_offset=shift)
    return _cached_visible_keys(q_len, kv_len, causal, window, torch.device(device), shift)


def block_fully_visible(q_len: int, kv_len: int, *, causal: bool, window: int | None, shift: int = 0) -> bool:
    """True when queries `shift + i` see every key `j` of the block: it needs no mask. From the geometry alone
    (q - k ranges over [shift - kv_len + 1, shift + q_len - 1]), no tensor built."""
    low, high = shift - kv_len + 1, shift + q_len - 1
    if causal and low < 0:
        return False
    return window is None or (high < window and low > -window)


def fold_for_sdpa(
    q_len: int, kv_len: int, *, is_causal: bool, window: int | None, attn_mask: Tensor | None, device: torch.device
) -> tuple[Tensor | None, bool]:
    """(attn_mask, is_causal) as SDPA takes them: it has no window, nor a mask together with is_causal, so those
    become one boolean mask (the visibility part built once per shape)."""
    if window is None and not (is_causal and attn_mask is not None):
        return attn_mask, is_causal
    visible = shared_visible_keys(q_len, kv_len, causal=is_causal, window=window, device=device)
    return merge_masks(visible, attn_mask), False


def key_range(row_start: int, row_end: int, kv_len: int, *, causal: bool, window: int | None) -> tuple[int, int]:
    """The half-open range of keys that queries [row_start, row_end) can see under causal/window."""
    lo, hi = 0, kv_len
    if causal:
        hi = min(hi, row_end)
    if window is not None:
        lo = max(lo, row_start - window + 1)
        if not causal:
            hi = min(hi, row_end + window - 1)
    return lo, max(lo, hi)


def merge_masks(visible: Tensor | None, attn_mask: Tensor | None) -> Tensor | None:
    """One SDPA-style mask (bool keep-mask or additive float) honouring both a visibility mask and `attn_mask`."""
    if attn_mask is None:
        return visible
    if visible is None:
        return attn_mask
    if attn_mask.dtype == torch.bool:
        return attn_mask & visible
    return attn_mask.masked_fill(~visible, float("-inf"))


def apply_mask(scores: Tensor, mask: Tensor | None) -> Tensor:
    """Scores with `mask` applied: a bool mask keeps True positions, a float mask is added."""
    if mask is None:
        return scores
    if mask.dtype == torch.bool:
        return scores.masked_fill(~mask, float("-inf"))
    return scores + mask


def repeat_kv(k: Tensor, v: Tensor, heads: int) -> tuple[Tensor, Tensor]:
    """Expand grouped key/value heads to `heads` query heads (query head h uses kv head h // group)."""
    group = heads // k.shape[1]
    if group == 1:
        return k, v
    return k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)


def pad_to_blocks(t: Tensor, block: int) -> Tensor:
    """`t` with its sequence axis (-2) zero-padded to whole blocks; `t` itself (no copy) when it already is."""
    pad = -t.shape[-2] % block
    return torch.nn.functional.pad(t, (0, 0, 0, pad)) if pad else t


def resolve_scale(q: Tensor, scale: float | None) -> float:
    """SDPA's default scale 1/sqrt(head_dim) unless one is given."""
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale


def is_key_mask(attn_mask: Tensor | None) -> bool:
    """True for a bool mask of keys alone: shape (B or 1, 1, 1, K), or 2-D / 3-D with size-1 head and query axes."""
    if attn_mask is None or attn_mask.dtype != torch.bool or not 2 <= attn_mask.dim() <= 4:
        return False
    return all(size == 1 for size in attn_mask.shape[-3:-1])
