"""`xformers-mea`: xformers' memory_efficient_attention, with xformers' own attn_bias classes for causal and window."""

from __future__ import annotations

from torch import Tensor

from attn_tune.errors import UnsupportedProblem
from attn_tune.problem import Problem
from attn_tune.registry.hookspecs import hookimpl
from attn_tune.registry.variant import Variant

__all__ = ["xformers_attention"]


def _kernels_loaded() -> str | None:
    """xformers imports even when its C++/CUDA kernels fail to load; report the load error it kept."""
    from xformers import _cpp_lib  # private, but it is where xformers keeps the reason

    exc = getattr(_cpp_lib, "_cpp_library_load_exception", None)
    if exc is None:
        return None
    lines = [line.strip() for line in str(exc).splitlines()]
    kept = [line for line in lines if line and not line.startswith(("Please reinstall", "Memory-efficient"))]
    return "xformers kernels did not load: " + " ".join(" ".join(kept).split())


def _supports(problem: Problem) -> str | None:
    if problem.device_type != "cuda":
        return "xformers kernels run on CUDA only"
    if problem.mask:
        return "explicit attn_mask tensors are not passed to xformers here; use sdpa-efficient"
    if problem.window is not None and problem.q_len != problem.n_kv_len:
        return "xformers' local-attention biases are aligned bottom-right: equal to this window only when q_len == kv_len"
    return None


def _bias(is_causal: bool, window: int | None, q_len: int, kv_len: int):
    from xformers.ops.fmha import attn_bias

    if window is None:
        return attn_bias.LowerTriangularMask() if is_causal else None
    if q_len != kv_len:
        raise UnsupportedProblem("xformers' local-attention biases need q_len == kv_len")
    if is_causal:
        return attn_bias.LowerTriangularFromBottomRightLocalAttentionMask(window)
    return attn_bias.LocalAttentionFromBottomRightMask(window_left=window - 1, window_right=window - 1)


def xformers_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    is_causal: bool = False,
    window: int | None = None,
    attn_mask: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """memory_efficient_attention on SDPA-layout tensors; grouped heads use xformers' 5-D (B, M, G, H, K) form."""
    import xformers.ops as xops

    if attn_mask is not None:
        raise UnsupportedProblem("xformers-mea takes no explicit attn_mask here")
    batch, heads, q_len, dim = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    bias = _bias(is_causal, window, q_len, kv_len)
    group = heads // kv_heads
    xq = q.transpose(1, 2)
    xk, xv = k.transpose(1, 2), v.transpose(1, 2)
    if group > 1:
        xq = xq.reshape(batch, q_len, kv_heads, group, dim)
        xk = xk.unsqueeze(3).expand(batch, kv_len, kv_heads, group, dim)
        xv = xv.unsqueeze(3).expand(batch, kv_len, kv_heads, group, v.shape[-1])
    try:
        out = xops.memory_efficient_attention(xq, xk, xv, attn_bias=bias, scale=scale)
    except (NotImplementedError, ValueError) as exc:
        raise UnsupportedProblem(f"xformers cannot run this call: {' '.join(str(exc).split())[:300]}") from None
    return out.reshape(batch, q_len, heads, v.shape[-1]).transpose(1, 2)


@hookimpl
def attn_tune_variants() -> list[Variant]:
    return [
        Variant(
            name="xformers-mea",
            family="flash",
            fn=xformers_attention,
            exact=True,
            supports=_supports,
            requires=("xformers", "xformers.ops"),
            probe=_kernels_loaded,
            description="xformers.ops.memory_efficient_attention with its causal and local attn_bias classes",
        )
    ]
