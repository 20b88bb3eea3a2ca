"""The search space of one problem: which variants take part (and why the others do not), their knobs, its size."""

from __future__ import annotations

import itertools
import math
from typing import Any, Sequence

from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution

from attn_tune.problem import Problem
from attn_tune.registry.catalog import availability
from attn_tune.registry.space import knob_name
from attn_tune.registry.variant import Variant

__all__ = ["eligible_variants", "space_size", "grid_points"]


def eligible_variants(
    problem: Problem, variants: Sequence[Variant], *, approximate: bool
) -> tuple[list[Variant], dict[str, str]]:
    """The variants that may serve `problem`, and for each that may not, the reason (pruned before any trial)."""
    chosen, excluded = [], {}
    for variant in variants:
        reason = availability(variant) or variant.supports(problem)
        if reason is None and not variant.exact and not approximate:
            reason = "approximate: takes part only when a max_error is given"
        if reason is None:
            chosen.append(variant)
        else:
            excluded[variant.name] = reason
    return chosen, excluded


def _size(dist: BaseDistribution) -> float:
    if isinstance(dist, CategoricalDistribution):
        return len(dist.choices)
    if isinstance(dist, IntDistribution) and not dist.log:
        return (dist.high - dist.low) // dist.step + 1
    if isinstance(dist, FloatDistribution) and dist.step is not None:
        return int(round((dist.high - dist.low) / dist.step)) + 1
    return math.inf


def space_size(problem: Problem, variants: Sequence[Variant]) -> float:
    """How many distinct (variant, knobs) points exist; inf when a knob is continuous or log-scaled."""
    return sum(math.prod(_size(d) for d in v.space(problem).values()) for v in variants)


def _values(dist: BaseDistribution) -> list[Any]:
    if isinstance(dist, CategoricalDistribution):
        return list(dist.choices)
    if isinstance(dist, IntDistribution) and not dist.log:
        return list(range(dist.low, dist.high + 1, dist.step))
    if isinstance(dist, FloatDistribution) and dist.step is not None:
        return [dist.low + i * dist.step for i in range(int(round((dist.high - dist.low) / dist.step)) + 1)]
    raise ValueError(f"cannot enumerate {dist!r}")


def grid_points(problem: Problem, variants: Sequence[Variant]) -> list[dict[str, Any]]:
    """Every point of a finite space, as Optuna params ({"variant": ..., "name:knob": ...}) for enqueue_trial."""
    points = []
    for variant in variants:
        knobs = variant.space(problem)
        names = [knob_name(variant.name, k) for k in knobs]
        for combo in itertools.product(*(_values(d) for d in knobs.values())):
            points.append({"variant": variant.name, **dict(zip(names, combo))})
    return points
