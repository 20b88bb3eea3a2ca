"""`patch_sdpa`: an unchanged model's `torch.nn.functional.scaled_dot_product_attention` calls go through
`attn_tune.attention`.

timm, diffusers, transformers' "sdpa" path, `F.multi_head_attention_forward` (so `nn.MultiheadAttention` and
`nn.Transformer*` layers) and most research code look the function up through `torch.nn.functional` at call time;
the patch rebinds that name. A module that imported the function by name before the patch (`from
torch.nn.functional import scaled_dot_product_attention`) keeps PyTorch's: `patch_calls()` shows whether any call
arrived. Every built-in variant and fallback calls PyTorch's own function (`families.torch_sdpa`), so the patch is
never recursive. It also switches nn.MultiheadAttention's fused eval fast path off (that path never calls SDPA) and
wraps `F.multi_head_attention_forward` to say so where that changes the answer: is_causal=True without a mask.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import torch
import torch.nn.functional as F

from attn_tune.errors import CausalHintWithoutMask
from attn_tune.families.torch_sdpa import sdpa as torch_sdpa
from attn_tune.mask_structure import MaskStructure, known_structure, read_mask
from attn_tune.runtime.active import use_config
from attn_tune.runtime.dispatch import attention, reads_masks

__all__ = ["patch_sdpa", "unpatch_sdpa", "is_patched", "patch_calls"]

_counts = {"routed": 0, "passed": 0, "slow_path": 0}
_saved: dict[str, Any] = {}  # what the patch replaced: both functions, and nn.MultiheadAttention's fast-path setting
_torch_mha = F.multi_head_attention_forward  # what the wrapper calls if a call outlives the patch

CAUSAL_HINT_WITHOUT_MASK = (
    "nn.MultiheadAttention got is_causal=True without attn_mask: PyTorch's slow path needs the mask, and "
    "attn_tune.patch_sdpa makes eval mode take it (the fused fast path never calls SDPA; it ignores the hint and "
    "computes attention that is not causal). Pass the causal mask too (attn_mask, src_mask or tgt_mask: "
    "nn.Transformer.generate_square_subsequent_mask(L)), or drop is_causal.")


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


def _mha_forward(*args: Any, **kwargs: Any) -> Any:
    """`F.multi_head_attention_forward` inside the patch: counts the eval calls the patch sent down PyTorch's slow
    path, and turns that path's "Need attn_mask" error into one line naming the patch and the fix."""
    if not kwargs.get("training", True) and _saved.get("fastpath") and len(args) > 2 and args[0] is args[1] is args[2]:
        _counts["slow_path"] += 1  # eval self-attention, as nn.MultiheadAttention calls it (training by name)
    merged = _merged_structure(args, kwargs) if reads_masks() else None
    try:
        with known_structure(*merged) if merged else contextlib.nullcontext():
            return _saved.get("mha", _torch_mha)(*args, **kwargs)
    except RuntimeError as exc:
        if kwargs.get("is_causal") and str(exc).startswith("Need attn_mask if specifying the is_causal hint"):
            raise CausalHintWithoutMask(CAUSAL_HINT_WITHOUT_MASK) from None
        raise


_mha_forward.__wrapped__ = _torch_mha  # type: ignore[attr-defined]
_MHA_CODE = _torch_mha.__code__  # its parameters by name (importing inspect for it costs 5 ms of import time)
_MHA_PARAMETERS = _MHA_CODE.co_varnames[:_MHA_CODE.co_argcount + _MHA_CODE.co_kwonlyargcount]
_KPM_POSITION = _MHA_PARAMETERS.index("key_padding_mask")


def _merged_structure(args: tuple, kwargs: dict) -> tuple[tuple[int, ...], MaskStructure] | None:
    """The shape and structure of the mask nn.MultiheadAttention will hand SDPA when it adds a key padding mask to
    its attention mask (a new (batch, heads, q, k) tensor per call, too costly to read each layer): the attention
    mask's structure (read once per tensor) with the padding's real keys. None where it does not follow that simply
    (attention weights wanted, bias_k / zero attention / static keys, a 3-D or generic attention mask, a float
    padding mask other than 0 / -inf, unbatched inputs): then SDPA's call is read as any other."""
    if kwargs.get("key_padding_mask") is None and len(args) <= _KPM_POSITION:
        return None  # nothing is merged: SDPA gets the attention mask itself (a view of it), read once per tensor
    call = {**dict(zip(_MHA_PARAMETERS, args)), **kwargs}
    kpm, mask, query, key = call.get("key_padding_mask"), call.get("attn_mask"), call.get("query"), call.get("key")
    if not isinstance(query, torch.Tensor) or not isinstance(key, torch.Tensor) or "num_heads" not in call:
        return None
    if (kpm is None or call.get("need_weights", True) or call.get("bias_k") is not None or call.get("add_zero_attn")
            or call.get("static_k") is not None or query.dim() != 3 or kpm.dim() != 2 or query.shape[0] < 2):
        return None  # one query (decoding) is never read, so nothing to tell
    q_len, batch, kv_len, heads = query.shape[0], query.shape[1], key.shape[0], call["num_heads"]
    if kpm.dtype == torch.bool:
        real = ~kpm
    elif kpm.is_floating_point() and torch.equal(kpm != 0, torch.isneginf(kpm)):
        real = kpm == 0
    else:
        return None
    if mask is None:
        base = MaskStructure(False, None, None)
    elif mask.dim() == 2:
        base = read_mask(~mask if mask.dtype == torch.bool else mask, batch, heads, q_len, kv_len)  # bool: True hides
    else:
        base = None
    if base is None or tuple(real.shape) != (batch, kv_len):
        return None
    real = real if base.key_padding is None else real & base.key_padding
    shape = (batch, heads, 1 if mask is None else q_len, kv_len)  # with no attention mask SDPA gets the padding only
    return shape, MaskStructure(base.causal, base.window, None if bool(real.all()) else real)



def is_patched() -> bool:
    """Whether `torch.nn.functional.scaled_dot_product_attention` goes through attn-tune now."""
    return F.scaled_dot_product_attention is _routed


def patch_calls() -> dict[str, int]:
    """Calls through the patched name since the process started: "routed" to `attention`, "passed" to PyTorch's
    SDPA unchanged. None routed while a model ran means its attention never looked the name up (see module doc).
    "slow_path": eval-mode nn.MultiheadAttention self-attention calls that ran PyTorch's slow path while the patch
    held the fast path off (it was on before): at most the calls whose path the patch changed, since some (e.g.
    batch_first=False) take the slow path unpatched too; docs/runtime.md lists what differs between the paths."""
    return dict(_counts)


def _apply() -> None:
    if is_patched():
        return
    _saved["function"] = F.scaled_dot_product_attention
    _saved["mha"] = F.multi_head_attention_forward
    _saved["fastpath"] = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # nn.MultiheadAttention's eval fast path never calls SDPA
    F.multi_head_attention_forward = _mha_forward
    F.scaled_dot_product_attention = _routed


def unpatch_sdpa() -> None:
    """Put back the functions the patch replaced (PyTorch's own, unless something else had patched them first) and
    nn.MultiheadAttention's fast path as it was; nothing if not patched."""
    if not is_patched():
        return
    F.scaled_dot_product_attention = _saved.pop("function", torch_sdpa)
    F.multi_head_attention_forward = _saved.pop("mha", _torch_mha)
    torch.backends.mha.set_fastpath_enabled(_saved.pop("fastpath", True))


class patch_sdpa:  # noqa: N801 - used like a function, as use_config and torch.no_grad
    """Route every `torch.nn.functional.scaled_dot_product_attention` call through `attn_tune.attention`.

    `patch_sdpa()` applies from now on (with `config` in use when given, as `use_config(config)`);
    `with patch_sdpa("tuned.json"): model(x)` only inside the block: on leaving, errors included, the functions,
    nn.MultiheadAttention's fast path and the config in use are what they were. Patching twice is patching once;
    `unpatch_sdpa()` undoes it. Inside the patch nn.MultiheadAttention's fused eval fast path is off so its calls
    reach SDPA (it computes attention weights itself, without SDPA, when called with need_weights=True); what else
    that changes (is_causal=True without a mask is an error, padded rows, speed) is listed in docs/runtime.md.

    Raises:
        ConfigError: `config` cannot be read (one line); nothing is patched then.
        CausalHintWithoutMask: (from a model call inside the patch, a RuntimeError) nn.MultiheadAttention got
            is_causal=True without attn_mask, which its slow path cannot serve; the message names the fix.
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
