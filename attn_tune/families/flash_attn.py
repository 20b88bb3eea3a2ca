"""`flash-attn`: the flash_attn package's kernel (Dao-AILab), when it is installed."""

from __future__ import annotations

from torch import Tensor

from attn_tune.errors import UnsupportedProblem
from attn_tune.problem import Problem
from attn_tune.registry.hookspecs import hookimpl
from attn_tune.registry.variant import Variant

__all__ = ["flash_attn_attention"]

_ALIGNMENT = "flash_attn aligns causal and window masks bottom-right: equal to this problem's only when q_len == kv_len"


def _supports(problem: Problem) -> str | None:
    if problem.device_type != "cuda":
        return "flash_attn runs on CUDA only"
    if problem.dtype not in ("float16", "bfloat16"):
        return "flash_attn needs float16 or bfloat16"
    if problem.mask:
        return "flash_attn takes no explicit attn_mask"
    if (problem.causal or problem.window is not None) and problem.q_len != problem.n_kv_len:
        return _ALIGNMENT
    if problem.head_dim > 256:
        return "flash_attn needs head_dim <= 256"
    return None


def flash_attn_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    is_causal: bool = False,
    window: int | None = None,
    attn_mask: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """flash_attn_func on SDPA-layout tensors; it takes grouped heads natively."""
    from flash_attn import flash_attn_func

    if attn_mask is not None:
        raise UnsupportedProblem("flash_attn takes no explicit attn_mask")
    if (is_causal or window is not None) and q.shape[-2] != k.shape[-2]:
        raise UnsupportedProblem(_ALIGNMENT)
    window_size = (-1, -1) if window is None else (window - 1, 0 if is_causal else window - 1)
    out = flash_attn_func(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
        softmax_scale=scale, causal=is_causal, window_size=window_size,
    )
    return out.transpose(1, 2)


@hookimpl
def attn_tune_variants() -> list[Variant]:
    return [
        Variant(
            name="flash-attn",
            family="flash",
            fn=flash_attn_attention,
            exact=True,
            supports=_supports,
            requires=("flash_attn",),
            description="flash_attn.flash_attn_func (FlashAttention 2/3), grouped heads native",
        )
    ]
