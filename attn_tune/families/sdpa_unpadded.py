"""`sdpa-unpadded`: a padded batch through PyTorch's SDPA on each row's real keys, not with a dense mask.

A left-padded causal batch (generation) runs SDPA's causal path (`is_causal`, which skips the hidden half) on each
row's real tokens; a right-padded encoder batch runs each row's queries against its real keys alone. The padding
reaches it as a (batch or 1, 1, 1, kv_len) bool mask of the real keys (`Problem.key_padding`); see `padding`.
"""

from __future__ import annotations

from torch import Tensor

from attn_tune.errors import UnsupportedProblem
from attn_tune.families.masks import is_key_mask
from attn_tune.families.padding import trimmed_rows
from attn_tune.families.sdpa import PYTORCH_DISPATCH_FN
from attn_tune.problem import Problem
from attn_tune.registry.hookspecs import hookimpl
from attn_tune.registry.variant import Variant

__all__ = ["unpadded_sdpa_attention"]


def _sdpa(q: Tensor, k: Tensor, v: Tensor, causal: bool, window: int | None, scale: float) -> Tensor:
    return PYTORCH_DISPATCH_FN(q, k, v, is_causal=causal, window=window, attn_mask=None, scale=scale)


def unpadded_sdpa_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    is_causal: bool = False,
    window: int | None = None,
    attn_mask: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """Exact attention under a key-padding mask, each row's real keys through SDPA (the window folded as usual)."""
    if not is_key_mask(attn_mask):
        raise UnsupportedProblem("sdpa-unpadded serves padded batches only: attn_mask must be a bool "
                                 "(batch or 1, 1, 1, kv_len) mask of the real keys")
    return trimmed_rows(_sdpa, q, k, v, attn_mask, causal=is_causal, window=window, scale=scale)


def _supports(problem: Problem) -> str | None:
    return None if problem.key_padding else "only for padded batches (key_padding)"


@hookimpl
def attn_tune_variants() -> list[Variant]:
    return [
        Variant(
            name="sdpa-unpadded",
            family="flash",
            fn=unpadded_sdpa_attention,
            exact=True,
            supports=_supports,
            description="padded batches: SDPA on each row's real keys (is_causal kept), not a dense padding mask",
        )
    ]
