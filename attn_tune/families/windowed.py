"""Sliding windows in query blocks: `window-chunked` (exact) and `local` (approximate, a narrower window).

Each block of queries attends only to the keys inside its window, so time and peak memory grow as
O(q_len x window), not O(q_len x kv_len). The block machinery is `chunked_attention`'s, shared, not copied.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from attn_tune.errors import UnsupportedProblem
from attn_tune.families.chunked import chunked_attention
from attn_tune.problem import Problem
from attn_tune.registry.hookspecs import hookimpl
from attn_tune.registry.variant import Variant

__all__ = ["window_chunked_attention", "local_attention", "local_window_choices", "BLOCK_CHOICES"]

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
) -> Tensor:
    """Exact sliding-window attention, `block` queries at a time against the keys of their window only."""
    if window is None:
        raise UnsupportedProblem("window-chunked computes sliding-window problems; this call has no window")
    return chunked_attention(q, k, v, is_causal=is_causal, window=window, attn_mask=attn_mask, scale=scale, chunk=block)


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
    return chunked_attention(q, k, v, is_causal=is_causal, window=local_window, scale=scale, chunk=block)


def _window_supports(problem: Problem) -> str | None:
    return None if problem.window is not None else "needs a sliding window (window=None is full attention)"


def _block_space(problem: Problem) -> dict[str, Any]:
    from optuna.distributions import CategoricalDistribution

    choices = [b for b in BLOCK_CHOICES if b < problem.q_len] or [BLOCK_CHOICES[0]]
    return {"block": CategoricalDistribution(choices)}


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
