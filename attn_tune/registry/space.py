"""A variant's knobs as Optuna parameters: their names, one define-by-run draw, and Optuna kept quiet.

Here, below the tuner, so that the conformance kit draws knobs exactly as the tuner does without importing it.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, Iterator, Sequence

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution

from attn_tune.problem import Problem
from attn_tune.registry.variant import Variant

__all__ = ["knob_name", "suggest", "quiet_optuna"]


def knob_name(variant: str, knob: str) -> str:
    """Optuna parameter name of a variant's knob: namespaced, so each knob keeps one distribution."""
    return f"{variant}:{knob}"


def _suggest(trial: optuna.Trial, name: str, dist: BaseDistribution) -> Any:
    if isinstance(dist, CategoricalDistribution):
        return trial.suggest_categorical(name, dist.choices)
    if isinstance(dist, IntDistribution):
        return trial.suggest_int(name, dist.low, dist.high, step=dist.step, log=dist.log)
    if isinstance(dist, FloatDistribution):
        return trial.suggest_float(name, dist.low, dist.high, step=dist.step, log=dist.log)
    raise TypeError(f"unsupported distribution {type(dist).__name__} for {name}")


def suggest(trial: optuna.Trial, problem: Problem, variants: Sequence[Variant]) -> tuple[Variant, dict[str, Any]]:
    """Define-by-run: the variant first, then that variant's own knobs."""
    by_name = {v.name: v for v in variants}
    variant = by_name[trial.suggest_categorical("variant", list(by_name))]
    params = {knob: _suggest(trial, knob_name(variant.name, knob), dist) for knob, dist in variant.space(problem).items()}
    return variant, params


@contextlib.contextmanager
def quiet_optuna() -> Iterator[None]:
    """Optuna logs every trial (and an interrupted one as a warning); the progress bar and summary say what matters."""
    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            yield
    finally:
        optuna.logging.set_verbosity(level)
