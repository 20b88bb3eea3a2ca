"""PyTorch's `scaled_dot_product_attention`: its own dispatch (`sdpa`) and each backend pinned with `sdpa_kernel`."""

from __future__ import annotations

import contextlib
import warnings
from typing import Callable

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from attn_tune.errors import UnsupportedProblem
from attn_tune.families.masks import fold_for_sdpa, repeat_kv
from attn_tune.families.torch_sdpa import sdpa as torch_sdpa
from attn_tune.problem import Problem
from attn_tune.registry.hookspecs import hookimpl
from attn_tune.registry.variant import Variant

__all__ = ["make_sdpa_fn", "PYTORCH_DISPATCH_FN"]

_HALF = ("float16", "bfloat16")


def _cuda_capability(problem: Problem) -> tuple[int, int]:
    """The device's compute capability; (99, 0) when CUDA is absent here, so only the other checks speak."""
    if not torch.cuda.is_available():
        return (99, 0)
    return torch.cuda.get_device_capability(torch.device(problem.device))


def _supports_flash(problem: Problem) -> str | None:
    if problem.device_type == "cpu":
        return None  # the CPU flash kernel takes every dtype, mask, GQA and length (checked in tests)
    if problem.dtype not in _HALF:
        return "CUDA flash needs float16 or bfloat16"
    if problem.mask or problem.window is not None:
        return "CUDA flash takes no attn_mask, and a window needs one"
    if problem.causal and problem.q_len != problem.n_kv_len:
        return "CUDA flash refuses is_causal when q_len != kv_len"
    if problem.head_dim > 256:
        return "CUDA flash needs head_dim <= 256"
    if _cuda_capability(problem) < (8, 0):
        return "CUDA flash needs compute capability 8.0 or newer"
    return None


def _supports_efficient(problem: Problem) -> str | None:
    if problem.device_type != "cuda":
        return "the memory-efficient SDPA kernel runs on CUDA only"
    return None


def _supports_cudnn(problem: Problem) -> str | None:
    if problem.device_type != "cuda":
        return "the cuDNN SDPA kernel runs on CUDA only"
    if problem.dtype not in _HALF:
        return "cuDNN attention needs float16 or bfloat16"
    if problem.head_dim > 128 or problem.head_dim % 8:
        return "cuDNN attention needs head_dim a multiple of 8, at most 128"
    if problem.n_kv_len == 1:
        return "cuDNN attention does not support key/value length 1"
    if _cuda_capability(problem) < (8, 0):
        return "cuDNN attention needs compute capability 8.0 or newer"
    return None


def _supports_any(problem: Problem) -> str | None:
    return None


def _explanations(caught: list[warnings.WarningMessage]) -> list[str]:
    """PyTorch's reasons for refusing a kernel, without its source locations or headers with nothing after them."""
    reasons = []
    for w in caught:
        text = " ".join(str(w.message).split(" (Triggered internally at")[0].split())
        if text and not text.endswith("because:") and text not in reasons:
            reasons.append(text)
    return reasons


def make_sdpa_fn(backend: SDPBackend | None, native_gqa: bool) -> Callable[..., Tensor]:
    """An attention fn calling SDPA, pinned to `backend` (None: PyTorch's own choice).

    SDPA cannot take a window, nor a mask together with `is_causal`: those become one boolean mask.
    Backends without grouped-query support (`native_gqa=False`) get key/value heads repeated first.
    """

    def pinned() -> contextlib.AbstractContextManager:
        return contextlib.nullcontext() if backend is None else sdpa_kernel([backend])

    def sdpa_fn(
        q: Tensor,
        k: Tensor,
        v: Tensor,
        *,
        is_causal: bool = False,
        window: int | None = None,
        attn_mask: Tensor | None = None,
        scale: float | None = None,
    ) -> Tensor:
        if backend is None and window is None and (attn_mask is None or not is_causal):
            # PyTorch's own dispatch takes this call as it is (GQA included) and never refuses it: no folding,
            # no backend block. A decode step pays only this test over calling SDPA itself.
            return torch_sdpa(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale,
                              enable_gqa=q.size(-3) != k.size(-3))
        mask, causal = fold_for_sdpa(q.shape[-2], k.shape[-2], is_causal=is_causal, window=window, attn_mask=attn_mask,
                                     device=q.device)
        gqa = q.shape[1] != k.shape[1]
        if gqa and not native_gqa:
            k, v = repeat_kv(k, v, q.shape[1])
            gqa = False
        kwargs = dict(attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=gqa)
        try:
            with pinned():
                return torch_sdpa(q, k, v, **kwargs)
        except RuntimeError as exc:
            if "No available kernel" not in str(exc) and "No viable backend" not in str(exc):
                raise
            # Call again to collect PyTorch's own explanation (its warnings) for the reason.
            with warnings.catch_warnings(record=True) as caught, pinned():
                warnings.simplefilter("always")
                with contextlib.suppress(RuntimeError):
                    torch_sdpa(q, k, v, **kwargs)
            why = "; ".join(_explanations(caught)) or str(exc).splitlines()[0]
            name = "SDPA" if backend is None else backend.name
            raise UnsupportedProblem(f"{name} cannot run this call: {why}") from None

    return sdpa_fn


_BACKENDS: tuple[tuple[str, SDPBackend | None, bool, Callable[[Problem], str | None], str], ...] = (
    ("sdpa", None, True, _supports_any, "PyTorch's own SDPA dispatch"),
    ("sdpa-math", SDPBackend.MATH, True, _supports_any, "SDPA pinned to its math backend"),
    ("sdpa-flash", SDPBackend.FLASH_ATTENTION, True, _supports_flash, "SDPA pinned to flash attention"),
    (
        "sdpa-efficient",
        SDPBackend.EFFICIENT_ATTENTION,
        False,
        _supports_efficient,
        "SDPA pinned to the memory-efficient kernel (grouped heads are repeated: it has no GQA)",
    ),
    ("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION, True, _supports_cudnn, "SDPA pinned to cuDNN attention"),
)


_VARIANTS = [
    Variant(
        name=name,
        family="dense" if backend == SDPBackend.MATH else "flash",
        fn=make_sdpa_fn(backend, native_gqa),
        exact=True,
        supports=supports,
        description=description,
    )
    for name, backend, native_gqa, supports, description in _BACKENDS
]

# `sdpa`'s fn: PyTorch's own dispatch. The runtime, seeing this fn chosen for a call with no window to fold, calls
# PyTorch's SDPA with the call's own arguments instead (the same computation, without this wrapper's cost).
PYTORCH_DISPATCH_FN = _VARIANTS[0].fn


@hookimpl
def attn_tune_variants() -> list[Variant]:
    return list(_VARIANTS)
