"""Sliding windows in query blocks: `window-chunked` (exact) and `local` (approximate, a narrower window).

Each block of queries attends only to the keys inside its window, so time and peak memory grow as
O(q_len x window), not O(q_len x kv_len). The block machinery is `chunked_attention`'s, shared, not copied; the
backward, both ways, is SDPA's own per call (`blockwise_grad`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import torch
from torch import Tensor

from attn_tune.errors import UnsupportedProblem
from attn_tune.families.blockwise_grad import Piece, RunPiece, fold_slices, piecewise_attention
from attn_tune.families.chunked import chunked_attention
from attn_tune.families.masks import is_key_mask, resolve_scale
from attn_tune.families.padding import trimmed_rows
from attn_tune.problem import Problem
from attn_tune.registry.hookspecs import hookimpl
from attn_tune.registry.variant import Variant

__all__ = ["window_chunked_attention", "local_attention", "unfolded_window_attention", "local_window_choices",
           "BLOCK_CHOICES"]

BLOCK_CHOICES: tuple[int, ...] = (32, 64, 128, 256, 512)
# Defaults (the tuner's first point): unfolded blocks of 32 measured fastest on 10 of 11 self-attention shapes
# (`bench/windowed_unfolded.py --grid`; the loop won at d128 window 1024); where unfolding does not apply the loop
# runs, and the tuner tries wider blocks.
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
    block: int = 32,
    unfolded: bool = True,
) -> Tensor:
    """Exact sliding-window attention, `block` queries at a time against the keys of their window only: one SDPA
    call per block, or (`unfolded`, the default) the blocks batched (`unfolded_window_attention`) where that applies:
    self-attention (q_len = kv_len) with no explicit mask. A key-padding mask (a padded batch) is served by running
    each row's real keys through that unmasked path (`padding.trimmed_rows`); any other mask goes into the loop."""
    if window is None:
        raise UnsupportedProblem("window-chunked computes sliding-window problems; this call has no window")
    return _windowed(q, k, v, is_causal, window, attn_mask, scale, block, unfolded)


def _windowed(q: Tensor, k: Tensor, v: Tensor, causal: bool, window: int, attn_mask: Tensor | None,
              scale: float | None, block: int, unfolded: bool) -> Tensor:
    if is_key_mask(attn_mask):
        def inner(qs: Tensor, ks: Tensor, vs: Tensor, causal: bool, window: int | None, scale: float) -> Tensor:
            return _windowed(qs, ks, vs, causal, window, None, scale, block, unfolded)  # type: ignore[arg-type]

        return trimmed_rows(inner, q, k, v, attn_mask, causal=causal, window=window, scale=scale)  # type: ignore[arg-type]
    if unfolded and attn_mask is None and q.shape[-2] == k.shape[-2]:
        return unfolded_window_attention(q, k, v, is_causal=causal, window=window, scale=scale, block=block)
    return chunked_attention(q, k, v, is_causal=causal, window=window, attn_mask=attn_mask, scale=scale, chunk=block)


def unfolded_window_attention(q: Tensor, k: Tensor, v: Tensor, *, is_causal: bool, window: int,
                              scale: float | None = None, block: int = 32) -> Tensor:
    """Sliding-window self-attention (q_len = kv_len) with the query blocks batched into SDPA calls, no loop.

    Each sequence's keys are padded by the window on each side it reaches and viewed (no copy) as one slice per
    query block, `block + reach` long rounded up to a multiple of 16 (SDPA's CPU kernel runs ~20% slower on odd
    widths). The blocks go to SDPA as its batch axis, heads as heads (GQA included), so a (batch, length, heads)
    layout, as a projection leaves it, comes back in that layout. An additive mask, kept per shape, cuts each
    slice to the window (see `_unfolded_masks` for how its memory stays bounded on long sequences). A batch of
    sequences is a loop over its sequences. The same arithmetic as `chunked_attention`'s loop of small calls.
    The backward is SDPA's own per call, its slices' key gradients added back with one `add_` per block-wide
    column of the slices (`blockwise_grad.fold_slices`), not autograd's scatter through the views.
    """
    shape = _Unfolded.of(q.shape[-2], block, window, is_causal)
    return piecewise_attention(_Blocks(shape, resolve_scale(q, scale)), q, k, v)


class _Blocks:
    """`unfolded_window_attention`'s pieces: per sequence, runs of query blocks against their key slices."""

    def __init__(self, shape: _Unfolded, scale: float) -> None:
        self.shape, self.scale = shape, scale
        self.padded = (shape.blocks - 1) * shape.block + shape.width  # key slots, the first `before` early

    def _blocks(self, x: Tensor) -> Tensor:  # one sequence's (heads, length, d) -> (blocks, heads, block, d)
        x, tail = x.transpose(0, 1), self.shape.blocks * self.shape.block - self.shape.length
        x = torch.nn.functional.pad(x, (0, 0, 0, 0, 0, tail)) if tail else x
        return x.reshape(self.shape.blocks, self.shape.block, *x.shape[1:]).transpose(1, 2)

    def _slices(self, x: Tensor) -> Tensor:  # (kv_heads, length, d) -> (blocks, kv_heads, width, d), a view
        shape = self.shape
        x = torch.nn.functional.pad(x.transpose(0, 1), (0, 0, 0, 0, shape.before,
                                                         self.padded - shape.before - shape.length))
        return x.unfold(0, shape.width, shape.block).transpose(-1, -2)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, run: RunPiece, recorded: bool) -> Tensor:
        masks = _unfolded_masks(self.shape, q.dtype, q.device)
        if recorded:  # SDPA's backward zeroes each call's key slices' gradient whole: calls of ~4 MiB of it
            slice_bytes = k.shape[1] * self.shape.width * k.shape[-1] * k.element_size()
            masks = _runs_of(masks, max(1, _BACKWARD_CALL_BYTES // slice_bytes))
        outs = []
        for i in range(q.shape[0]):
            queries, keys, values = self._blocks(q[i]), self._slices(k[i]), self._slices(v[i])
            parts = [run(queries[first:end], keys[first:end], values[first:end], mask, (i, first, end))
                     for first, end, mask in masks]
            out = parts[0] if len(parts) == 1 else torch.cat(parts)  # (blocks, heads, block, value_dim)
            outs.append(out.transpose(1, 2).reshape(1, -1, out.shape[1], out.shape[3]).transpose(1, 2))
        out = outs[0] if len(outs) == 1 else torch.cat(outs)
        return out[:, :, :self.shape.length] if out.shape[2] > self.shape.length else out

    def backward(self, grad_out: Tensor, pieces: list[Piece], q: Tensor, k: Tensor, v: Tensor,
                 needs: tuple[bool, bool, bool]) -> tuple[Tensor | None, ...]:
        shape, block, rows = self.shape, self.shape.block, self.shape.blocks * self.shape.block
        # Query rows and key slots [0, rows) get their first gradient as a copy (key slots: from the first column
        # of one block's slice; pieces in reverse, so later columns add onto it); only slots past them start at 0.
        dq, dk, dv = (x.new_empty(x.shape[0], rows + extra, x.shape[1], x.shape[-1]) if need else None
                      for x, need, extra in zip((q, k, v), needs, (0, shape.width, shape.width)))
        for total in (dk, dv):
            if total is not None:
                total[:, rows:].zero_()
        grads: dict[int, Tensor] = {}  # per sequence, grad_out in blocks (a copy only where the last block is padded)
        for piece in reversed(pieces):
            i, first, end = piece.where
            grads = grads if i in grads else {i: self._blocks(grad_out[i])}
            gq, gk, gv = piece.grads(grads[i][first:end])
            if dq is not None:
                dq[i, first * block:end * block].view(end - first, block, *dq.shape[2:]).copy_(gq.transpose(1, 2))
            for total, part in ((dk, gk), (dv, gv)):
                if total is not None:
                    fold_slices(total[i], part.transpose(1, 2), block, first * block, fresh=True)
        keys = slice(shape.before, shape.before + shape.length)
        return (None if dq is None else dq[:, :shape.length].transpose(1, 2),
                *(None if d is None else d[:, keys].transpose(1, 2) for d in (dk, dv)))


WIDTH_MULTIPLE = 16
_CACHED_MASK_BYTES = 16 * 2**20  # one mask for every block up to this size; masks past it are not kept
# With a backward, blocks per SDPA call so that the key (and value) slices' gradient SDPA's backward allocates zeroed
# and the fold reads back is about this size: memory the allocator reuses (`bench/training_attention.py --pieces`).
_BACKWARD_CALL_BYTES = 4 * 2**20


def _runs_of(masks: list[tuple[int, int, Tensor]], most: int) -> list[tuple[int, int, Tensor]]:
    """`_unfolded_masks`' runs cut into runs of at most `most` blocks (a per-block mask cut with them)."""
    return [(first, min(first + most, end), mask if mask.shape[0] == 1 else mask[first - start:first - start + most])
            for start, end, mask in masks for first in range(start, end, most)]


@dataclasses.dataclass(frozen=True)
class _Unfolded:
    """The geometry of `unfolded_window_attention`: blocks [interior, interior_end) see one shared pattern."""

    length: int
    block: int
    window: int
    causal: bool
    before: int  # keys in a block's slice before its first query
    width: int  # key slots per block
    blocks: int
    interior: int
    interior_end: int

    @classmethod
    def of(cls, length: int, block: int, window: int, causal: bool) -> _Unfolded:
        before, after = window - 1, 0 if causal else window - 1
        width = -(-(block + before + after) // WIDTH_MULTIPLE) * WIDTH_MULTIPLE
        blocks = -(-length // block)
        interior = min(blocks, -(-before // block))  # the first block whose slice starts at a real key
        end = blocks  # causal: slots past a block's queries are hidden anyway, padding queries' rows are cut off
        if not causal:  # slices must end at a real key and hold real queries only
            end = min(length // block, (length - width + before) // block + 1) if length >= width - before else 0
        return cls(length, block, window, causal, before, width, blocks, interior, max(end, interior))


def _unfolded_masks(shape: _Unfolded, dtype: torch.dtype, device: torch.device) -> list[tuple[int, int, Tensor]]:
    """(first block, end block, additive mask) per SDPA call. While every block's own mask is small it is one call
    with one (blocks, 1, block, width) mask; past that the interior shares one (1, 1, block, width) mask and only
    the ends get their own (a `torch.cat` of the parts costs a copy of the output, the price of bounded memory).
    Kept per shape while small; always built anew while torch.compile traces."""
    itemsize = dtype.itemsize
    split = shape.blocks * shape.block * shape.width * itemsize > _CACHED_MASK_BYTES
    if torch.compiler.is_compiling():
        return _build_unfolded_masks(shape, split, dtype, device)
    edge_blocks = shape.blocks - (shape.interior_end - shape.interior) + 1 if split else shape.blocks
    if edge_blocks * shape.block * shape.width * itemsize > _CACHED_MASK_BYTES:
        return _build_unfolded_masks(shape, split, dtype, device)
    return _kept_unfolded_masks(shape, split, dtype, device)


def _build_unfolded_masks(shape: _Unfolded, split: bool, dtype: torch.dtype,
                          device: torch.device) -> list[tuple[int, int, Tensor]]:
    if not split:
        return [(0, shape.blocks, _block_masks(shape, range(shape.blocks), dtype, device))]
    runs = [(0, shape.interior, False), (shape.interior, shape.interior_end, True),
            (shape.interior_end, shape.blocks, False)]
    return [(first, end, _block_masks(shape, range(first, first + 1 if shared else end), dtype, device))
            for first, end, shared in runs if end > first]


def _block_masks(shape: _Unfolded, blocks: range, dtype: torch.dtype, device: torch.device) -> Tensor:
    """(len(blocks), 1, block, width) additive mask: query i of block n sees slot j where the key is in its
    window and exists. Padding queries past the end see every existing key of their slice (never a row with no
    key: no NaN, even in backward); their outputs are cut off."""
    start = torch.arange(blocks.start, blocks.stop, device=device)[:, None, None] * shape.block
    query = start + torch.arange(shape.block, device=device)[None, :, None]
    key = start - shape.before + torch.arange(shape.width, device=device)[None, None, :]
    offset = query - key
    visible = (offset >= 0) & (offset < shape.window) if shape.causal else offset.abs() < shape.window
    exists = (key >= 0) & (key < shape.length)
    visible = torch.where(query < shape.length, visible, torch.ones_like(visible)) & exists
    hidden = torch.full(visible.shape, float("-inf"), dtype=dtype, device=device)
    return torch.where(visible, torch.zeros((), dtype=dtype, device=device), hidden)[:, None]


@functools.lru_cache(maxsize=16)
def _kept_unfolded_masks(shape: _Unfolded, split: bool, dtype: torch.dtype,
                         device: torch.device) -> list[tuple[int, int, Tensor]]:
    with torch.inference_mode(False), torch.no_grad():
        return _build_unfolded_masks(shape, split, dtype, device)


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
    block: int = 32,
    unfolded: bool = True,
) -> Tensor:
    """Exact attention under the narrower window `local_window`: an approximation of the wider problem.

    Its own function is well defined: sliding-window attention with window `local_window` (and the problem's
    causal cut), and the padding of a padded batch (a key-padding mask: a query that sees no real key gets zeros),
    so its error against the problem is measured, never assumed. A `local_window` that narrows nothing is refused,
    as `supports()` refuses problems with no narrower window; so is any mask other than key padding.
    """
    if attn_mask is not None and not is_key_mask(attn_mask):
        raise UnsupportedProblem("local takes no explicit attn_mask but key padding: a narrower window could leave a "
                                 "query no key")
    q_len, kv_len = q.shape[-2], k.shape[-2]
    full = window if window is not None else max(q_len, kv_len)
    if local_window >= full:
        raise UnsupportedProblem(f"local_window {local_window} is not narrower than this call's attention ({full})")
    if q_len >= kv_len + local_window:
        raise UnsupportedProblem(f"local window {local_window} leaves queries past kv_len + window with no key")
    return _windowed(q, k, v, is_causal, local_window, attn_mask, scale, block, unfolded)


def _window_supports(problem: Problem) -> str | None:
    return None if problem.window is not None else "needs a sliding window (window=None is full attention)"


def _block_space(problem: Problem) -> dict[str, Any]:
    from optuna.distributions import CategoricalDistribution

    choices = [b for b in BLOCK_CHOICES if b < problem.q_len] or [BLOCK_CHOICES[0]]
    return {"block": CategoricalDistribution(choices), **_unfolded_space(problem)}


def _unfolded_space(problem: Problem) -> dict[str, Any]:
    """Whether to run every block in one call: a choice where it applies (self-attention with no explicit mask
    but key padding, whose rows run unmasked)."""
    from optuna.distributions import CategoricalDistribution

    applies = problem.q_len == problem.n_kv_len and (problem.key_padding or not problem.mask)
    return {"unfolded": CategoricalDistribution([False, True])} if applies else {}


def local_window_choices(problem: Problem) -> list[int]:
    """Windows narrower than the problem's (or than full attention) that still leave every query a key."""
    full = problem.window if problem.window is not None else max(problem.q_len, problem.n_kv_len)
    return [w for w in LOCAL_WINDOW_CHOICES if problem.q_len - problem.n_kv_len < w < full]


def _local_supports(problem: Problem) -> str | None:
    if problem.mask and not problem.key_padding:
        return "an explicit attn_mask: a narrower window could leave a query with no visible key"
    if not local_window_choices(problem):
        return f"no window in {LOCAL_WINDOW_CHOICES[0]}..{LOCAL_WINDOW_CHOICES[-1]} is narrower than this problem's"
    return None


def _local_space(problem: Problem) -> dict[str, Any]:
    from optuna.distributions import CategoricalDistribution

    return {"local_window": CategoricalDistribution(local_window_choices(problem) or [LOCAL_WINDOW_CHOICES[0]]),
            **_block_space(problem)}


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
