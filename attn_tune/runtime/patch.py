"""`patch_sdpa`: an unchanged model's `torch.nn.functional.scaled_dot_product_attention` calls go through
`attn_tune.attention`.

timm, diffusers, transformers' "sdpa" path, `F.multi_head_attention_forward` (so `nn.MultiheadAttention` and
`nn.Transformer*` layers) and most research code look the function up through `torch.nn.functional` at call time;
the patch rebinds that name. A module that imported the function by name before the patch (`from
torch.nn.functional import scaled_dot_product_attention`) keeps PyTorch's: `patch_calls()` shows whether any call
arrived. Every built-in variant and fallback calls PyTorch's own function (`families.torch_sdpa`), so the patch is
never recursive.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F

from attn_tune.families.torch_sdpa import sdpa as torch_sdpa
from attn_tune.runtime.active import use_config
from attn_tune.runtime.dispatch import attention

__all__ = ["patch_sdpa", "unpatch_sdpa", "is_patched", "patch_calls"]

_counts = {"routed": 0, "passed": 0}
_saved: dict[str, Any] = {}  # what the patch replaced: the function, and nn.MultiheadAttention's fast-path setting


def _routed(query: Any, key: Any, value: Any, attn_mask: Any = None, dropout_p: float = 0.0, is_causal: bool = False,
            scale: float | None = None, enable_gqa: bool = False, **unknown: Any) -> Any:
    """SDPA's signature; a call attn-tune can serve goes to `attention`, any other (an argument SDPA gained after
    this attn-tune, nested or non-tensor inputs) to PyTorch's SDPA unchanged."""
    if unknown or not all(isinstance(t, torch.Tensor) and not t.is_nested for t in (query, key, value)):
        _counts["passed"] += 1
        return torch_sdpa(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                          scale=scale, enable_gqa=enable_gqa, **unknown)
    _counts["routed"] += 1  # dropout_p > 0 included: attention() hands it to PyTorch's SDPA itself
    return attention(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)


_routed.__wrapped__ = torch_sdpa  # type: ignore[attr-defined]


def is_patched() -> bool:
    """Whether `torch.nn.functional.scaled_dot_product_attention` goes through attn-tune now."""
    return F.scaled_dot_product_attention is _routed


def patch_calls() -> dict[str, int]:
    """Calls through the patched name since the process started: "routed" to `attention`, "passed" to PyTorch's
    SDPA unchanged. None routed while a model ran means its attention never looked the name up (see module doc)."""
    return dict(_counts)


def _apply() -> None:
    if is_patched():
        return
    _saved["function"] = F.scaled_dot_product_attention
    _saved["fastpath"] = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # nn.MultiheadAttention's eval fast path never calls SDPA
    F.scaled_dot_product_attention = _routed


def unpatch_sdpa() -> None:
    """Put back the function the patch replaced (PyTorch's own, unless something else had patched it first) and
    nn.MultiheadAttention's fast path as it was; nothing if not patched."""
    if not is_patched():
        return
    F.scaled_dot_product_attention = _saved.pop("function", torch_sdpa)
    torch.backends.mha.set_fastpath_enabled(_saved.pop("fastpath", True))


class patch_sdpa:  # noqa: N801 - used like a function, as use_config and torch.no_grad
    """Route every `torch.nn.functional.scaled_dot_product_attention` call through `attn_tune.attention`.

    `patch_sdpa()` applies from now on (with `config` in use when given, as `use_config(config)`);
    `with patch_sdpa("tuned.json"): model(x)` only inside the block: on leaving, errors included, the function,
    nn.MultiheadAttention's fast path and the config in use are what they were. Patching twice is patching once;
    `unpatch_sdpa()` undoes it. Inside the patch nn.MultiheadAttention's fused eval fast path is off so its calls
    reach SDPA (it computes attention weights itself, without SDPA, when called with need_weights=True).

    Raises:
        ConfigError: `config` cannot be read (one line); nothing is patched then.
    """

    def __init__(self, config: str | os.PathLike | Any | None = None) -> None:
        self._config = use_config(config) if config is not None else None
        self._was_patched = is_patched()
        _apply()

    def __enter__(self) -> patch_sdpa:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._was_patched:
            unpatch_sdpa()
        if self._config is not None:
            self._config.__exit__(*exc)
