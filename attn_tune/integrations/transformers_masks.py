"""The "attn_tune" mask function for transformers: causality and a sliding window stay flags, not a baked mask.

transformers builds each layer type's mask once per forward from a mask function (causal, sliding-window causal,
chunked, ...) and the 2-D padding mask. `sdpa_mask` bakes it all into a (batch, 1, q_len, kv_len) boolean tensor,
which hides the window from attn-tune. `structured_mask` recognises transformers' own causal, bidirectional and
sliding-window functions and returns a `StructuredMask`: the flags plus only the key padding, so the window
reaches `attn_tune.attention` as `window=`. Any other mask function (chunked, packed sequences, image-token
overlays) or geometry (static caches, whose keys do not end at the last query) gets `sdpa_mask`'s tensor as is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from attn_tune.families.masks import visible_keys

__all__ = ["StructuredMask", "structured_mask", "recognise"]


@dataclass(frozen=True)
class StructuredMask:
    """A mask as flags: query i (of q_len) sees key j (of kv_len) per `causal`/`window`, and where `key_padding` says.

    Queries and keys are aligned at their ends (the last query is the last key, as with a dynamic cache);
    `window` follows attn-tune's convention (causal: 0 <= i - j < window; otherwise |i - j| < window).
    """

    causal: bool
    window: int | None
    q_len: int
    kv_len: int
    key_padding: Tensor | None = None  # (batch, kv_len) bool, True = a real token; None = no padding
    ndim = 4  # as the (batch, 1, q_len, kv_len) mask it stands for: generate hands a precomputed mask back in

    def dense(self) -> Tensor:
        """The same mask as a (batch or 1, 1, q_len, kv_len) boolean tensor, as `sdpa_mask` would give it."""
        device = self.key_padding.device if self.key_padding is not None else "cpu"
        visible = visible_keys(self.q_len, self.kv_len, causal=self.causal, window=self.window, device=device,
                               q_offset=self.kv_len - self.q_len)
        if visible is None:
            visible = torch.ones(self.q_len, self.kv_len, dtype=torch.bool, device=device)
        visible = visible[None, None]
        return visible if self.key_padding is None else visible & self.key_padding[:, None, None, :]


def _closure(fn: Callable) -> dict[str, Any]:
    cells = fn.__closure__ or ()
    return {name: cell.cell_contents for name, cell in zip(fn.__code__.co_freevars, cells)}


def _is(fn: Callable, qualname: str) -> bool:
    return getattr(fn, "__module__", None) == "transformers.masking_utils" and fn.__qualname__ == qualname


def recognise(mask_function: Callable) -> tuple[bool, int | None] | None:
    """(causal, window in attn-tune's convention) for transformers' plain mask functions; None for any other.

    Recognised: `causal_mask_function`, `bidirectional_mask_function`, `sliding_window_causal_mask_function(w)`
    (keys with q - w < kv <= q: window w) and `sliding_window_bidirectional_mask_function(w)` (|q - kv| <= w:
    window w + 1). Identified by transformers' own function objects, never guessed from the mask's values.
    """
    from transformers import masking_utils as mu

    if mask_function is mu.causal_mask_function:
        return True, None
    if mask_function is mu.bidirectional_mask_function:
        return False, None
    if not _is(mask_function, "and_masks.<locals>.and_mask"):
        return None
    parts = _closure(mask_function).get("mask_functions", ())
    if len(parts) != 2:
        return None
    overlay, base = parts
    if base is mu.causal_mask_function and _is(overlay, "sliding_window_overlay.<locals>.inner_mask"):
        return True, int(_closure(overlay)["sliding_window"])
    if base is mu.bidirectional_mask_function and _is(overlay, "sliding_window_bidirectional_overlay.<locals>.inner_mask"):
        return False, int(_closure(overlay)["sliding_window"]) + 1
    return None


def structured_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int | Tensor = 0,
    kv_offset: int = 0,
    mask_function: Callable | None = None,
    attention_mask: Tensor | None = None,
    use_vmap: bool = False,
    **kwargs: Any,
) -> StructuredMask | Tensor | None:
    """transformers' mask-interface signature: a `StructuredMask`, None (plain causal or full, no padding) or,
    for what it does not recognise, `sdpa_mask`'s boolean tensor."""
    from transformers.masking_utils import causal_mask_function, prepare_padding_mask, sdpa_mask

    if isinstance(attention_mask, StructuredMask):  # generate built it ahead (static caches): it stands as it is
        return attention_mask
    mask_function = causal_mask_function if mask_function is None else mask_function
    flags = None if use_vmap else recognise(mask_function)
    aligned = isinstance(q_offset, int) and isinstance(kv_offset, int) and q_offset + q_length == kv_offset + kv_length
    if flags is None or not aligned:
        return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                         kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
                         use_vmap=use_vmap, **kwargs)
    causal, window = flags
    padding = prepare_padding_mask(attention_mask, kv_length, kv_offset)
    if padding is not None:
        padding = padding[:, kv_offset: kv_offset + kv_length]
        padding = None if bool(padding.all()) else padding
    if window is not None and window >= kv_length:
        window = None  # no query is kv_length or more from a key: the window cuts nothing
    if causal and q_length == 1:
        causal = False  # the one query is the last key: it sees every key (within the window)
    if causal and padding is None and window is None and q_length == kv_length:
        return None  # plain causal: transformers' "no mask" with is_causal, as sdpa_mask gives it
    return StructuredMask(causal=causal, window=window, q_len=q_length, kv_len=kv_length, key_padding=padding)
