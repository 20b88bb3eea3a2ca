"""The search space of one problem: which variants take part (and why the others do not), their knobs, its size."""

from __future__ import annotations

import inspect
import itertools
import json
import math
from typing import Any, Sequence

from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution

from attn_tune.problem import Problem
from attn_tune.registry.catalog import availability
from attn_tune.registry.space import knob_name
from attn_tune.registry.variant import DEFAULT_VARIANT, Variant

__all__ = ["eligible_variants", "space_size", "grid_points", "default_point", "first_points"]


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


def _holds(dist: BaseDistribution, value: Any) -> bool:
    if isinstance(dist, CategoricalDistribution):
        return value in dist.choices
    if math.isinf(_size(dist)):
        return isinstance(value, (int, float)) and not isinstance(value, bool) and dist.low <= value <= dist.high
    return value in _values(dist)


def _default_value(variant: Variant, knob: str, dist: BaseDistribution) -> Any:
    """The knob's default in the variant's fn when the space holds it, else the space's first value."""
    try:
        default = inspect.signature(variant.fn).parameters[knob].default
    except (KeyError, TypeError, ValueError):
        default = inspect.Parameter.empty
    if default is not inspect.Parameter.empty and _holds(dist, default):
        return default
    if isinstance(dist, CategoricalDistribution):
        return dist.choices[0]
    return dist.low


def default_point(variant: Variant, problem: Problem) -> dict[str, Any]:
    """The variant at its default knobs, as Optuna params ({"variant": ..., "name:knob": ...})."""
    knobs = variant.space(problem)
    return {"variant": variant.name,
            **{knob_name(variant.name, k): _default_value(variant, k, d) for k, d in knobs.items()}}


def first_points(problem: Problem, variants: Sequence[Variant],
                 earlier: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """What a study measures before any knob is refined: an earlier choice (a re-tune's, when it is still a point of
    the space), the default variant, then every other variant at its default knobs; each point once."""
    by_name = {v.name: v for v in variants}
    points = []
    if earlier is not None and earlier.get("variant") in by_name:
        name, params = earlier["variant"], earlier.get("params") or {}
        knobs = by_name[name].space(problem)
        if knobs.keys() == params.keys() and all(_holds(knobs[k], v) for k, v in params.items()):
            points.append({"variant": name, **{knob_name(name, k): v for k, v in params.items()}})
    points += [default_point(v, problem) for v in sorted(variants, key=lambda v: v.name != DEFAULT_VARIANT)]
    return list({json.dumps(p, sort_keys=True): p for p in points}.values())
