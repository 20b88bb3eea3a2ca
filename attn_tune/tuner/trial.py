"""One trial of a study: the point it takes, measured once (a point another trial owns is copied or refused, one
past the study's budget refused), and recorded with its status and reason, never silently dropped."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import optuna
import torch

from attn_tune.errors import one_line
from attn_tune.measurement.measure import Measurement
from attn_tune.registry.space import suggest
from attn_tune.tuner.selection import FAILURES, MeasureFn, constraint_violation
from attn_tune.tuner.storage import mark_started

if TYPE_CHECKING:
    from attn_tune.tuner.study import PreparedStudy

__all__ = ["DONE", "NotMeasured", "point_key", "finished_trials", "measure_trial"]

DONE = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)  # measured, or failed with a reason


class NotMeasured(Exception):
    """A trial that must not be measured: a twin of an earlier one, or one past the study's budget."""


def point_key(trial: optuna.trial.FrozenTrial) -> str:
    """The point a trial measures: the params it was queued with (a running trial may have suggested only some of
    them yet), else its params."""
    fixed = trial.system_attrs.get("fixed_params")
    return json.dumps(trial.params if fixed is None else fixed, sort_keys=True)


def finished_trials(study: optuna.Study) -> int:
    """Distinct points measured, or failed with a reason (a twin, a repeat or a crash is not counted)."""
    return len({point_key(t) for t in study.trials if t.state in DONE})


def _values(m: Measurement, objective: str) -> tuple[float, ...] | float:
    if objective == "latency":
        return m.latency_ms
    if objective == "memory":
        return float(m.peak_bytes)
    return (m.latency_ms, float(m.peak_bytes))


def _record_failure(study: optuna.Study, trial: optuna.Trial, variant: str | None, params: dict[str, Any],
                    reason: str) -> None:
    study.set_user_attr(f"failure:{trial.number}", {"variant": variant, "params": params, "reason": reason})


def _not_measured(study: optuna.Study, trial: optuna.Trial, variant: str | None, params: dict[str, Any],
                  reason: str) -> None:
    _record_failure(study, trial, variant, params, reason)
    raise NotMeasured(reason)


def _copy_of(trial: optuna.Trial, twin: optuna.trial.FrozenTrial, objective: str) -> tuple[float, ...] | float:
    """Finish `trial` with `twin`'s figures, not measuring the same point twice."""
    for key in ("status", "reason", "measured"):
        if key in twin.user_attrs:
            trial.set_user_attr(key, twin.user_attrs[key])
    trial.set_user_attr("copy_of", twin.number)
    if twin.state == optuna.trial.TrialState.PRUNED:
        raise optuna.TrialPruned(twin.user_attrs.get("reason", "failed"))
    trial.set_constraint("within-limits", 0.0 if twin.user_attrs.get("status") == "ok" else 1.0)
    return tuple(twin.values) if objective == "balanced" else twin.values[0]


def measure_trial(prepared: PreparedStudy, trial: optuna.Trial, *, measure_fn: MeasureFn,
                  measure_kwargs: dict[str, Any], max_error: float | None, memory_budget: int | None,
                  objective: str) -> tuple[float, ...] | float:
    """Optuna's objective for one trial of `prepared`'s study: its point measured, copied from a twin, or refused."""
    study, problem = prepared.study, prepared.problem
    mark_started(trial)
    trials = study.get_trials(deepcopy=False)
    queued = "fixed_params" in next(t for t in trials if t.number == trial.number).system_attrs
    live = DONE + (optuna.trial.TrialState.RUNNING,)
    earlier = [t for t in trials if t.number < trial.number and t.state in live]
    # A point belongs to its lowest-numbered trial not failed; a later twin (two processes queued the point at
    # once) is never measured, whatever order the twins are taken in.
    owners = [t for t in trials if t.number < trial.number and t.state != optuna.trial.TrialState.FAIL]
    if prepared.enumerated and not queued:
        _not_measured(study, trial, None, {}, "not measured: the queue was empty when this trial asked (another "
                                              "worker took the last point)")
    if not prepared.enumerated and len({point_key(t) for t in earlier}) >= prepared.budget:
        _not_measured(study, trial, None, {}, "not measured: the study already had its trials (another worker took "
                                              "the last)")
    variant, params = suggest(trial, problem, prepared.chosen)
    twin = next((t for t in owners if point_key(t) == json.dumps(trial.params, sort_keys=True)), None)
    if twin is not None and not prepared.enumerated and twin.state in DONE:
        return _copy_of(trial, twin, objective)  # the sampler proposed a measured point again: tell it the figures
    if twin is not None:
        _not_measured(study, trial, variant.name, params, f"not measured: the same point as trial {twin.number}")
    try:
        m = measure_fn(variant, problem, params, **measure_kwargs)
    except FAILURES as exc:
        reason = one_line(exc)
        if isinstance(exc, torch.OutOfMemoryError):
            torch.cuda.empty_cache()
        trial.set_user_attr("status", "failed")
        trial.set_user_attr("reason", reason)
        _record_failure(study, trial, variant.name, params, reason)
        raise optuna.TrialPruned(reason) from None
    violation = constraint_violation(variant, problem, m, max_error, memory_budget)
    trial.set_user_attr("measured", {k: v for k, v in m.to_dict().items() if k != "repeats"})
    trial.set_user_attr("status", "ok" if violation is None else "excluded")
    trial.set_constraint("within-limits", 0.0 if violation is None else 1.0)  # TPE learns what is infeasible
    if violation is not None:
        trial.set_user_attr("reason", violation)
        _record_failure(study, trial, variant.name, params, violation)
    return _values(m, objective)
