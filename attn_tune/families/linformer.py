"""`linformer` (approximate, non-causal): keys and values projected along the sequence to rank k.

Uses `linformer_pytorch`'s parameter-free projection (`get_EF(method="no_params")`), drawn from a fixed seed so
that it works as a drop-in without training. The function computed is softmax(scale * q (E^T k)^T) (F^T v), with
E, F of shape (kv_len, k): the attention over the k projected keys goes through SDPA's fused kernel, so its
scores are never held whole (the package's `LinearAttentionHead` holds them: 6.5x the memory at q_len 8192,
`bench/approximate_families.py`'s `ref-linformer-head` row). Grouped kv heads are projected before they are shared.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor

from attn_tune.errors import UnsupportedProblem
from attn_tune.families.masks import resolve_scale
from attn_tune.families.torch_sdpa import sdpa as torch_sdpa
from attn_tune.problem import Problem
from attn_tune.registry.hookspecs import hookimpl
from attn_tune.registry.variant import Variant

__all__ = ["linformer_attention", "linformer_projections", "PROJECTION_SEED", "RANK_CHOICES"]

PROJECTION_SEED = 0
RANK_CHOICES: tuple[int, ...] = (32, 64, 128, 256, 512)


@functools.lru_cache(maxsize=64)
def linformer_projections(kv_len: int, rank: int, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
    """The fixed (kv_len, rank) projections E (keys) and F (values), seeded; the global RNG is left untouched."""
    from linformer_pytorch.linformer_pytorch import get_EF

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(PROJECTION_SEED)
        e = get_EF(kv_len, rank, method="no_params")
        f = get_EF(kv_len, rank, method="no_params")
    return e.to(device=device, dtype=dtype), f.to(device=device, dtype=dtype)


def linformer_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    is_causal: bool = False,
    window: int | None = None,
    attn_mask: Tensor | None = None,
    scale: float | None = None,
    rank: int = 128,
) -> Tensor:
    """Linformer attention: keys and values projected with linformer-pytorch's E and F, then fused SDPA."""
    if is_causal or window is not None or attn_mask is not None:
        raise UnsupportedProblem(
            "linformer mixes every key into each projected key: no causal cut, window or attn_mask can be honoured"
        )
    if not 1 <= rank < k.shape[-2]:
        raise UnsupportedProblem(f"rank {rank} does not project kv_len {k.shape[-2]} to fewer keys")
    e, f = linformer_projections(k.shape[-2], rank, q.dtype, q.device)
    return torch_sdpa(q, e.T @ k, f.T @ v, scale=resolve_scale(q, scale), enable_gqa=k.shape[1] != q.shape[1])


def _supports(problem: Problem) -> str | None:
    if problem.causal:
        return "linformer projects along the sequence, mixing future keys into every projected key: no causal"
    if problem.window is not None or problem.mask:
        return "linformer cannot honour a sliding window or an explicit attn_mask"
    if not _rank_choices(problem):
        return f"kv_len {problem.n_kv_len} is too short to project to rank {RANK_CHOICES[0]} or more"
    return None


def _rank_choices(problem: Problem) -> list[int]:
    return [r for r in RANK_CHOICES if r < problem.n_kv_len]


def _space(problem: Problem) -> dict[str, Any]:
    from optuna.distributions import CategoricalDistribution

    return {"rank": CategoricalDistribution(_rank_choices(problem) or [RANK_CHOICES[0]])}


@hookimpl
def attn_tune_variants() -> list[Variant]:
    return [
        Variant(
            name="linformer",
            family="low-rank",
            fn=linformer_attention,
            exact=False,
            space=_space,
            supports=_supports,
            requires=("linformer_pytorch",),
            description="approximate: keys/values projected to rank k along the sequence (seeded linformer-pytorch), then SDPA",
        )
    ]
