"""`Variant`: *how* attention is computed, with what it supports and what it needs."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    import optuna
    from torch import Tensor

    from attn_tune.problem import Problem

__all__ = ["Variant", "DEFAULT_VARIANT", "no_params", "supports_all", "malformed_reason"]

# What runs where no tuned entry says otherwise, and what every tuned choice is measured against: PyTorch's SDPA.
DEFAULT_VARIANT = "sdpa"

_NAME_RE = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")


def no_params(problem: Problem) -> dict[str, optuna.distributions.BaseDistribution]:
    """The search space of a variant without knobs."""
    return {}


def supports_all(problem: Problem) -> str | None:
    """`supports` for a variant that computes every problem."""
    return None


@dataclass(frozen=True)
class Variant:
    """One way to compute attention.

    `fn(q, k, v, *, is_causal, window, attn_mask, scale, **params)` takes SDPA's layout and returns a tensor
    shaped, typed and placed like q. `supports(problem)` is None or a short reason; `space(problem)` gives the
    tunable params as optuna distributions. `probe()`, when given, runs after `requires` import and returns a
    reason the variant cannot run on this install (kernels that did not load), or None.
    """

    name: str
    family: str
    fn: Callable[..., Tensor]
    exact: bool
    space: Callable[[Problem], dict[str, Any]] = no_params
    supports: Callable[[Problem], str | None] = supports_all
    requires: tuple[str, ...] = ()
    description: str = ""
    probe: Callable[[], str | None] | None = None


def malformed_reason(obj: object) -> str | None:
    """Why `obj` is not a usable Variant, or None if it is."""
    if not isinstance(obj, Variant):
        return f"expected attn_tune.Variant, got {type(obj).__name__}"
    if not isinstance(obj.name, str) or not _NAME_RE.match(obj.name):
        return f"variant name {obj.name!r} is not kebab-case"
    if not isinstance(obj.family, str) or not obj.family:
        return f"variant {obj.name!r}: family must be a non-empty string"
    if not isinstance(obj.exact, bool):
        return f"variant {obj.name!r}: exact must be a bool"
    for field in ("fn", "space", "supports"):
        if not callable(getattr(obj, field)):
            return f"variant {obj.name!r}: {field} is not callable"
    if obj.probe is not None and not callable(obj.probe):
        return f"variant {obj.name!r}: probe is not callable"
    if not isinstance(obj.requires, tuple) or not all(isinstance(r, str) for r in obj.requires):
        return f"variant {obj.name!r}: requires must be a tuple of module names"
    return None
