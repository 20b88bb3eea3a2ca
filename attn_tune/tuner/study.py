"""One problem's Optuna study: create or load it, run trials on it (from any number of workers; each trial is
`trial.measure_trial`), choose from it.

`tune` drives these for each problem in this process; `workers` runs `run_trials` in other processes on the same
studies. Neither imports the other's module: both import this one.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
import random
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import optuna

from attn_tune.problem import Problem
from attn_tune.registry.space import knob_name
from attn_tune.registry.variant import Variant
from attn_tune.tuned_config import Entry
from attn_tune.tuner.selection import MeasureFn, Point, choose
from attn_tune.tuner.space import eligible_variants, first_points, grid_points, space_size
from attn_tune.tuner.storage import fail_dead_trials
from attn_tune.tuner.trial import DONE, NotMeasured, finished_trials, measure_trial, point_key

__all__ = ["PreparedStudy", "study_name", "file_digest", "inputs_key", "prepare_study", "run_trials", "finish_study",
           "first_calls_s"]


def study_name(problem: Problem, device: dict[str, Any], variant_names: Sequence[str], objective: str,
               inputs_key: str = "") -> str:
    """Stable per (problem, device, set of taking-part variants, objective, error inputs), so a resumed run finds
    its study, and errors measured on random inputs are never reused for a run on captured ones."""
    digest = hashlib.sha1((",".join(sorted(variant_names)) + inputs_key).encode()).hexdigest()[:10]
    return f"attn-tune/{objective}/{device['type']}:{device.get('name', '')}/{problem.describe().replace(' ', '_')}/{digest}"


def file_digest(path: str | os.PathLike) -> str:
    """SHA-1 of a file's bytes (an activations file: what errors were measured on)."""
    digest = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def inputs_key(measure_kwargs: dict[str, Any]) -> str:
    """What errors are measured on, for the study's name: "" for random inputs, else the activations' digest."""
    path = measure_kwargs.get("activations")
    return "" if path is None else "|captured:" + file_digest(path)


def _points(study: optuna.Study) -> list[Point]:
    points = []
    for t in study.trials:
        if t.state not in DONE or "variant" not in t.params:
            continue
        name = t.params["variant"]
        params = {k.split(":", 1)[1]: v for k, v in t.params.items() if k.startswith(knob_name(name, ""))}
        points.append(Point(name, params, t.user_attrs.get("status", "failed"), t.user_attrs.get("reason"),
                             t.user_attrs.get("measured")))
    return points


def _queue_missing(study: optuna.Study, points: list[dict[str, Any]]) -> None:
    """Queue each point that has no finished, running or queued trial (a failed one's point is queued again).

    A trial left running by a killed worker is not queued here: once its heartbeat is stale it is failed and
    queued again by the storage's retry callback, so the point is never measured by two live workers.
    """
    pending = (optuna.trial.TrialState.WAITING, optuna.trial.TrialState.RUNNING)
    present = {point_key(t) for t in study.trials if t.state in DONE or t.state in pending}
    for point in points:
        if json.dumps(point, sort_keys=True) not in present:
            study.enqueue_trial(point)


def _queue_unmeasured(prepared: PreparedStudy, seed: int) -> None:
    """Queue one point of a finite space that no trial has measured yet (picked at random, seeded)."""
    if math.isinf(space_size(prepared.problem, prepared.chosen)):
        return  # a continuous knob: the sampler's next proposal is new
    taken = {point_key(t) for t in prepared.study.trials}
    fresh = [p for p in grid_points(prepared.problem, prepared.chosen) if json.dumps(p, sort_keys=True) not in taken]
    if fresh:
        prepared.study.enqueue_trial(random.Random(seed).choice(fresh))


@dataclass
class PreparedStudy:
    """One problem's study, ready for any number of workers to run trials on."""

    problem: Problem
    study: optuna.Study
    chosen: list[Variant]
    excluded: dict[str, str]
    budget: int
    enumerated: bool  # every point is queued: trials take points from the queue, never sample new ones
    cut_short: str | None = None  # why run_trials stopped before the budget (a time limit)


def prepare_study(
    problem: Problem, *, pool: Sequence[Variant], trials: int, max_error: float | None, objective: str, storage: Any,
    seed: int | None, device: dict[str, Any], inputs_key: str = "", earlier: dict[str, Any] | None = None,
) -> PreparedStudy | str:
    """Create (or load) the problem's study and queue what it measures first; else why it cannot be tuned.

    An enumerated space queues every point; a sampled one queues `earlier` (a re-tune's choice), the default and
    every other variant at its default knobs (as many as the budget holds) before the sampler refines knobs.
    """
    chosen, excluded = eligible_variants(problem, pool, approximate=max_error is not None)
    if not chosen:
        return "no variant can serve this problem here: " + "; ".join(f"{k}: {v}" for k, v in excluded.items())
    size = space_size(problem, chosen)
    budget = int(min(trials, size))
    enumerate_all = size <= trials
    # A space no larger than the budget is enumerated through the queue (enqueue_trial): each point is taken by
    # exactly one trial, whichever worker asks, and on resume exactly the missing points are queued again.
    if enumerate_all:
        sampler: optuna.samplers.BaseSampler = optuna.samplers.RandomSampler(seed=seed)  # queued points fix params
    else:
        sampler = optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True)
    directions = ["minimize", "minimize"] if objective == "balanced" else ["minimize"]
    study = optuna.create_study(
        study_name=study_name(problem, device, [v.name for v in chosen], objective, inputs_key), storage=storage,
        sampler=sampler,
        directions=directions, load_if_exists=True,
    )
    study.set_user_attr("problem", problem.to_dict())
    study.set_user_attr("device", device)
    study.set_user_attr("excluded_variants", excluded)
    study.set_user_attr("budget", budget)
    first = first_points(problem, chosen, earlier)
    if enumerate_all:
        grid = grid_points(problem, chosen)
        _queue_missing(study, [p for p in first if p in grid] + [p for p in grid if p not in first])
    elif not any(t.state in DONE for t in study.trials):  # a resumed study has queued them already
        _queue_missing(study, first[:budget])
    return PreparedStudy(problem, study, chosen, excluded, budget, enumerate_all)


def run_trials(
    prepared: PreparedStudy, *, measure_fn: MeasureFn, measure_kwargs: dict[str, Any], max_error: float | None,
    memory_budget: int | None, objective: str, on_trial: Callable[[Problem, int, int], None] | None = None,
    poll_s: float = 1.0, deadline: float | None = None,
) -> None:
    """Run trials until the study has its budget of finished ones; any number of workers may do this at once.

    A worker with nothing left to take waits while others measure: if one of them dies, its trial is failed once
    its heartbeat is stale and queued again, and a waiting worker takes it. Past `deadline` (time.monotonic())
    no new trial starts: the study stops cleanly and `prepared.cut_short` says so.
    """
    problem, study, budget = prepared.problem, prepared.study, prepared.budget

    def objective_fn(trial: optuna.Trial) -> tuple[float, ...] | float:
        return measure_trial(prepared, trial, measure_fn=measure_fn, measure_kwargs=measure_kwargs,
                             max_error=max_error, memory_budget=memory_budget, objective=objective)

    asked = 0
    while True:
        trials = study.get_trials(deepcopy=False)
        finished = len({point_key(t) for t in trials if t.state in DONE})  # a repeat is not a new point
        if on_trial is not None:
            on_trial(problem, finished, budget)
        waiting = any(t.state == optuna.trial.TrialState.WAITING for t in trials)
        running = sum(t.state == optuna.trial.TrialState.RUNNING for t in trials)
        if finished >= budget and not waiting:
            return
        if deadline is not None and time.monotonic() >= deadline:
            prepared.cut_short = f"stopped by the time limit after {finished} of {budget} trials"
            return
        if finished >= budget:  # a twin queued by another process: taken, found a twin, failed with that reason
            _optimize_one(study, objective_fn)
            continue
        if prepared.enumerated and not waiting and not running:
            return  # every queued point is done, or failed past its retries
        if (prepared.enumerated and not waiting) or finished + running >= budget:
            time.sleep(poll_s)  # the rest is being measured by other workers; a dead one's trial is retried
            fail_dead_trials(study)
            continue
        if asked >= 3 * budget:
            return  # a sampler that keeps proposing points already measured
        asked += 1
        _optimize_one(study, objective_fn)
        if "copy_of" in study.get_trials(deepcopy=False)[-1].user_attrs:
            _queue_unmeasured(prepared, seed=asked)  # the sampler repeated itself: give the next trial a new point


def _optimize_one(study: optuna.Study, objective_fn: Callable[[optuna.Trial], Any]) -> None:
    """Run one trial. A trial that another worker settled first (on a loaded machine its heartbeat can look stale,
    so it was failed and queued again) cannot be told: that is not this worker's failure, and the study goes on."""
    try:
        study.optimize(objective_fn, n_trials=1, catch=(NotMeasured,))
    except ValueError as exc:
        if not str(exc).startswith("Cannot tell a "):
            raise


def first_calls_s(study: optuna.Study, since: datetime.datetime | None = None) -> float:
    """Seconds the study's trials (those started at or after `since`, when given) spent in first (cold) calls:
    compiling, building masks."""
    return sum((t.user_attrs.get("measured") or {}).get("first_call_ms", 0.0) for t in study.trials
               if since is None or (t.datetime_start is not None and t.datetime_start >= since)) / 1e3


def finish_study(
    prepared: PreparedStudy, *, objective: str, max_error: float | None, memory_budget: int | None,
    measure_fn: MeasureFn, finalists: int, rounds: int, final_kwargs: dict[str, Any], max_rounds: int | None = None,
    on_round: Callable[[int, int], None] | None = None,
) -> tuple[Entry | None, str]:
    """Choose from the study's points (re-measuring the best head to head, on this device) and keep the entry in
    the study, where `attn-tune export` finds it. A study cut short skips the head-to-head: its trials decide.
    A `max_error` tighter than the trials ran with excludes the approximate points beyond it (no re-measuring)."""
    study = prepared.study
    if prepared.cut_short:
        rounds = 0
    points = _points(study)
    exact = {v.name: v.exact for v in prepared.chosen}
    for p in points:  # a tighter max_error than the trials ran with (a loss budget re-choosing): apply it here
        error = (p.measured or {}).get("rel_error")
        if p.status == "ok" and not exact.get(p.variant, True) and error is not None and not error <= (max_error or 0.0):
            p.status, p.reason = "excluded", f"error {error:.2e} above max_error {max_error:g}"
    entry, note = choose(points, finished_trials(study), prepared.problem, {v.name: v for v in prepared.chosen},
                         prepared.excluded, objective=objective, max_error=max_error, memory_budget=memory_budget,
                         measure_fn=measure_fn, finalists=finalists, rounds=rounds, final_kwargs=final_kwargs,
                         max_rounds=0 if prepared.cut_short else max_rounds, on_round=on_round)
    if entry is not None:
        study.set_user_attr("entry", entry.to_dict())
    return entry, note
