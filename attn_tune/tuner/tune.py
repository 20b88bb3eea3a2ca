"""`tune()`: one Optuna study per problem over variants and their knobs, then a head-to-head of the best few."""

from __future__ import annotations

import hashlib
import json
from typing import Any, Callable, Sequence

import optuna
import torch

from attn_tune.errors import AttnTuneError
from attn_tune.problem import Problem, check_device
from attn_tune.registry.catalog import variants as registered_variants
from attn_tune.registry.variant import Variant
from attn_tune.tuner.config import Entry, TunedConfig, device_info
from attn_tune.tuner.measure import Measurement, measure
from attn_tune.tuner.selection import FAILURES, MeasureFn, Point, choose, constraint_violation, failure_reason
from attn_tune.tuner.space import eligible_variants, grid_points, knob_name, quiet_optuna, space_size, suggest
from attn_tune.tuner.storage import open_storage

__all__ = ["OBJECTIVES", "tune", "study_name"]

OBJECTIVES = ("latency", "memory", "balanced")


def study_name(problem: Problem, device: dict[str, Any], variant_names: Sequence[str], objective: str) -> str:
    """Stable per (problem, device, set of taking-part variants, objective), so a resumed run finds its study."""
    digest = hashlib.sha1(",".join(sorted(variant_names)).encode()).hexdigest()[:10]
    return f"attn-tune/{objective}/{device['type']}:{device.get('name', '')}/{problem.describe().replace(' ', '_')}/{digest}"


def _values(m: Measurement, objective: str) -> tuple[float, ...]:
    if objective == "latency":
        return (m.latency_ms,)
    if objective == "memory":
        return (float(m.peak_bytes),)
    return (m.latency_ms, float(m.peak_bytes))


def _points(study: optuna.Study) -> list[Point]:
    points = []
    for t in study.trials:
        if t.state not in _DONE or "variant" not in t.params:
            continue
        name = t.params["variant"]
        params = {k.split(":", 1)[1]: v for k, v in t.params.items() if k.startswith(knob_name(name, ""))}
        points.append(Point(name, params, t.user_attrs.get("status", "failed"), t.user_attrs.get("reason"),
                             t.user_attrs.get("measured")))
    return points


_DONE = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)  # measured, or failed with a reason


def _finished(study: optuna.Study) -> int:
    return sum(t.state in _DONE for t in study.trials)


def _queue_missing(study: optuna.Study, points: list[dict[str, Any]]) -> None:
    """Queue each point that has neither a finished trial nor a queued one (a killed run's point is queued again)."""
    waiting = optuna.trial.TrialState.WAITING
    done = {
        json.dumps(t.system_attrs.get("fixed_params", {}) if t.state == waiting else t.params, sort_keys=True)
        for t in study.trials
        if t.state in _DONE or t.state == waiting
    }
    for point in points:
        if json.dumps(point, sort_keys=True) not in done:
            study.enqueue_trial(point)


def _tune_one(
    problem: Problem, *, pool: Sequence[Variant], trials: int, max_error: float | None, memory_budget: int | None,
    objective: str, storage: Any, seed: int | None, measure_fn: MeasureFn, measure_kwargs: dict[str, Any],
    finalists: int, rounds: int, final_kwargs: dict[str, Any], device: dict[str, Any],
    on_trial: Callable[[Problem, int, int], None] | None,
) -> tuple[Entry | None, str]:
    chosen, excluded = eligible_variants(problem, pool, approximate=max_error is not None)
    if not chosen:
        return None, "no variant can serve this problem here: " + "; ".join(f"{k}: {v}" for k, v in excluded.items())
    by_name = {v.name: v for v in chosen}
    size = space_size(problem, chosen)
    enumerate_all = size <= trials
    # A space no larger than the budget is enumerated through the queue (enqueue_trial): each point is taken by
    # one trial, and on resume exactly the points without a finished trial are queued again.
    if enumerate_all:
        sampler: optuna.samplers.BaseSampler = optuna.samplers.RandomSampler(seed=seed)  # queued points fix params
    else:
        sampler = optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True)
    directions = ["minimize", "minimize"] if objective == "balanced" else ["minimize"]
    study = optuna.create_study(
        study_name=study_name(problem, device, list(by_name), objective), storage=storage, sampler=sampler,
        directions=directions, load_if_exists=True,
    )
    study.set_user_attr("problem", problem.to_dict())
    study.set_user_attr("excluded_variants", excluded)
    budget = int(min(trials, size))
    if enumerate_all:
        _queue_missing(study, grid_points(problem, chosen))
        to_run = sum(t.state == optuna.trial.TrialState.WAITING for t in study.trials)
    else:
        to_run = max(0, budget - _finished(study))

    def objective_fn(trial: optuna.Trial) -> tuple[float, ...] | float:
        variant, params = suggest(trial, problem, chosen)
        try:
            m = measure_fn(variant, problem, params, **measure_kwargs)
        except FAILURES as exc:
            reason = failure_reason(exc)
            if isinstance(exc, torch.OutOfMemoryError):
                torch.cuda.empty_cache()
            trial.set_user_attr("status", "failed")
            trial.set_user_attr("reason", reason)
            study.set_user_attr(f"failure:{trial.number}", {"variant": variant.name, "params": params, "reason": reason})
            raise optuna.TrialPruned(reason) from None
        violation = constraint_violation(variant, problem, m, max_error, memory_budget)
        trial.set_user_attr("measured", {k: v for k, v in m.to_dict().items() if k != "repeats"})
        trial.set_user_attr("status", "ok" if violation is None else "excluded")
        trial.set_constraint("within-limits", 0.0 if violation is None else 1.0)  # TPE learns what is infeasible
        if violation is not None:
            trial.set_user_attr("reason", violation)
            study.set_user_attr(f"failure:{trial.number}", {"variant": variant.name, "params": params, "reason": violation})
        values = _values(m, objective)
        return values if objective == "balanced" else values[0]

    def progress(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if on_trial is not None:
            on_trial(problem, _finished(study), budget)

    if to_run:
        study.optimize(objective_fn, n_trials=to_run, callbacks=[progress])
    return choose(_points(study), _finished(study), problem, by_name, excluded, objective=objective, max_error=max_error,
                   memory_budget=memory_budget, measure_fn=measure_fn, finalists=finalists, rounds=rounds,
                   final_kwargs=final_kwargs)


def tune(
    problems: Sequence[Problem],
    *,
    trials: int = 20,
    max_error: float | None = None,
    memory_budget: int | None = None,
    objective: str = "latency",
    storage: str | None = None,
    seed: int | None = None,
    variants: Sequence[Variant] | None = None,
    measure_fn: MeasureFn = measure,
    measure_kwargs: dict[str, Any] | None = None,
    finalists: int = 3,
    rounds: int = 3,
    final_kwargs: dict[str, Any] | None = None,
    on_trial: Callable[[Problem, int, int], None] | None = None,
    on_result: Callable[[Problem, Entry | None, str], None] | None = None,
) -> TunedConfig:
    """Find, by measuring, the best variant and knobs for each problem on this machine.

    Args:
        problems: what to tune; each gets its own Optuna study.
        trials: trials per problem; a space smaller than this is enumerated instead of sampled.
        max_error: let approximate variants take part, chosen only if their measured error is within it.
        memory_budget: bytes; candidates whose measured peak exceeds it are never chosen.
        objective: "latency", "memory", or "balanced" (both; the fastest point of the Pareto front wins).
        storage: an Optuna storage URL (SQLite, PostgreSQL, ...) so an interrupted run resumes; None keeps it in memory.
        seed: makes the sampler reproducible.
        variants: the pool to search (default: every registered variant).
        measure_fn: `measure`, or a stand-in with its signature (tests inject one, as triton's autotuner does).
        measure_kwargs / final_kwargs: passed to `measure_fn` in the trials and in the head-to-head.
        finalists / rounds: how many of the best are re-measured, interleaved, and how many rounds.
        on_trial / on_result: progress callbacks.

    Returns:
        A `TunedConfig` with one entry per problem that some candidate could serve within the constraints.

    Raises:
        AttnTuneError: a bad objective or trial count, an unreachable storage, a device this machine lacks.
    """
    if objective not in OBJECTIVES:
        raise AttnTuneError(f"unknown objective {objective!r}; choose one of {', '.join(OBJECTIVES)}")
    if trials < 1:
        raise AttnTuneError(f"trials must be positive, got {trials}")
    for device in sorted({p.device for p in problems}):
        check_device(device)
    from attn_tune import __version__

    pool = list(variants) if variants is not None else registered_variants()
    devices = {p.device: device_info(p.device) for p in problems}
    top = devices[problems[0].device] if problems else device_info("cpu")
    entries = []
    with quiet_optuna():
        opened = open_storage(storage)
        for problem in problems:
            entry, note = _tune_one(
                problem, pool=pool, trials=trials, max_error=max_error, memory_budget=memory_budget,
                objective=objective, storage=opened, seed=seed, measure_fn=measure_fn,
                measure_kwargs=dict(measure_kwargs or {}), finalists=finalists, rounds=rounds,
                final_kwargs=dict(final_kwargs or {"min_repeats": 10, "min_time_s": 0.3}),
                device=devices[problem.device], on_trial=on_trial,
            )
            if entry is not None:
                entry.device = devices[problem.device] if devices[problem.device] != top else None
                entries.append(entry)
            if on_result is not None:
                on_result(problem, entry, note)
    return TunedConfig(entries=entries, device=top, attn_tune=__version__, torch=torch.__version__)

