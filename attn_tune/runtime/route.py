"""What a call runs and why: a `Decision` (variant, params, the rule that found them) and its `Route` (the function
to call, params bound, and the exact fallback should the variant refuse)."""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from typing import Any, Callable

from torch import Tensor

from attn_tune.errors import UnsupportedProblem
from attn_tune.families.masks import fold_for_sdpa
from attn_tune.families.torch_sdpa import sdpa as torch_sdpa
from attn_tune.problem import Problem
from attn_tune.registry.variant import Variant

__all__ = ["Decision", "Route", "AS_IS", "as_is", "bound", "sdpa_as_is"]

AS_IS = "sdpa (as is)"  # the "variant" of calls no Problem describes


@dataclass
class Decision:
    """What a call runs and why. `rule`: own-entry (the entry tuned for this very problem) | nearest-entry |
    default | fallback | sdpa-as-is; never "exact", which would read as exact attention whatever the entry chose."""

    problem: Problem | None
    variant: str
    params: dict[str, Any]
    rule: str
    reason: str
    entry: Problem | None = None
    config: str | None = None
    max_error: float = 0.0  # the error the entry was tuned within, when its variant is approximate (else 0)
    mask_read: str | None = None  # what the call's attn_mask was read as (`attn_tune.mask_structure`), if it was

    def __str__(self) -> str:
        lines = [f"problem:  {self.problem.describe() if self.problem else '(not an attn-tune problem)'}"]
        if self.mask_read is not None:
            lines.append(f"mask:     read from the mask: {self.mask_read}")
        lines.append(f"config:   {self.config or 'none'}")
        if self.entry is not None:
            lines.append(f"entry:    {self.entry.describe()}")
        params = f" {self.params}" if self.params else ""
        lines.append(f"variant:  {self.variant}{params}  [{self.rule}]")
        if self.max_error:  # set only for an approximate choice: an exact one is exact whatever the search allowed
            lines.append(f"error:    approximate, tuned within max_error {self.max_error:g}")
        lines.append(f"why:      {self.reason}")
        return "\n".join(lines)


@dataclass
class Route:
    """A resolved call: the function to run (a variant's fn signature, params bound), and the exact fallback
    should it refuse. `decision` names the problem it was resolved for; a route serves its whole span alike."""

    decision: Decision
    fn: Callable[..., Tensor]
    fallback: Variant | None = None
    heads_axis: bool = True  # False: 3-D calls, given a heads axis of 1 around the variant
    as_sdpa: bool = False  # the choice is PyTorch's SDPA on the call as it came: `attention` calls SDPA itself

    def refused(self, exc: UnsupportedProblem) -> None:
        """The variant refused a call (raised UnsupportedProblem): from now on the exact fallback runs this route,
        said once; re-raises when there is none."""
        if self.fallback is None:
            raise exc
        why = f"{self.decision.variant} refused the call: {exc}"
        warnings.warn(f"attn-tune: {why}; using {self.fallback.name} from now on for calls like this one",
                      RuntimeWarning, stacklevel=4)  # the line that called attention (via _run)
        self.decision.variant, self.decision.params, self.decision.rule = self.fallback.name, {}, "fallback"
        self.decision.reason = why
        self.fn, self.fallback, self.as_sdpa = bound(self.fallback.fn, {}, self.heads_axis), None, False


def bound(fn: Callable[..., Tensor], params: dict[str, Any], heads_axis: bool) -> Callable[..., Tensor]:
    """`fn` with its params bound and, for 3-D inputs (batch, len, dim), a heads axis of 1 around it."""
    if params:
        fn = functools.partial(fn, **params)
    return fn if heads_axis else functools.partial(_with_heads_axis, fn)


def _with_heads_axis(fn: Callable[..., Tensor], q: Tensor, k: Tensor, v: Tensor, *, attn_mask: Tensor | None,
                     **kwargs: Any) -> Tensor:
    if attn_mask is not None and attn_mask.dim() == 3:
        attn_mask = attn_mask.unsqueeze(1)
    return fn(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1), attn_mask=attn_mask, **kwargs).squeeze(1)


def sdpa_as_is(q: Tensor, k: Tensor, v: Tensor, *, is_causal: bool, window: int | None, attn_mask: Tensor | None,
               scale: float | None, dropout_p: float = 0.0, enable_gqa: bool = False) -> Tensor:
    """PyTorch's SDPA itself, a window folded into the mask: for calls no Problem describes, and for dropout."""
    attn_mask, is_causal = fold_for_sdpa(q.shape[-2], k.shape[-2], is_causal=is_causal, window=window,
                                         attn_mask=attn_mask, device=q.device)
    return torch_sdpa(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                      enable_gqa=enable_gqa)


def as_is(reason: str, enable_gqa: bool) -> Route:
    """The route of calls no Problem describes (`reason` says why): PyTorch's SDPA on the call as it came."""
    return Route(Decision(None, AS_IS, {}, "sdpa-as-is", reason), functools.partial(sdpa_as_is, enable_gqa=enable_gqa))
