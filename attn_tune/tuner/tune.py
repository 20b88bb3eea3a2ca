"""`tune()`: one Optuna study per problem over variants and their knobs, then a head-to-head of the best few."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from attn_tune.activations import check_against, describe_inputs
from attn_tune.errors import AttnTuneError
from attn_tune.measurement.inputs import load_captured
from attn_tune.measurement.measure import measure
from attn_tune.problem import Inputs, Problem, check_device
from attn_tune.registry.catalog import variants as registered_variants
from attn_tune.registry.plugins import own_version
from attn_tune.registry.space import quiet_optuna
from attn_tune.registry.variant import Variant
from attn_tune.staleness import measured_with
from attn_tune.tuned_config import Entry, TunedConfig, device_info
from attn_tune.tuner.selection import MeasureFn
from attn_tune.tuner.storage import open_storage
from attn_tune.tuner.study import (
    PreparedStudy,
    finish_study,
    first_calls_s,
    inputs_key,
    prepare_study,
    run_trials,
)
from attn_tune.tuner.validate import Validator, fit_loss_budget
from attn_tune.tuner.workers import run_workers

__all__ = ["OBJECTIVES", "tune"]

OBJECTIVES = ("latency", "memory", "balanced")


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
    max_rounds: int | None = None,
    final_kwargs: dict[str, Any] | None = None,
    on_trial: Callable[[Problem, int, int], None] | None = None,
    on_result: Callable[[Problem, Entry | None, str], None] | None = None,
    workers: int = 1,
    timeout: float | None = None,
    problem_timeout: float | None = None,
    queue_first: Mapping[Problem, dict[str, Any]] | None = None,
    activations: str | os.PathLike | None = None,
    validator: Validator | None = None,
    max_loss_change: float | None = None,
    on_drop: Callable[[dict[str, Any]], None] | None = None,
    problems_label: str = "the problems tuned",
    max_metric_drop: float | None = None,
    alongside: Sequence[Entry] = (),
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
        finalists / rounds / max_rounds: how many of the best are re-measured against sdpa, interleaved, in at
            least `rounds` and at most `max_rounds` (default 3 x rounds) rounds: until each one's latency ratio
            interval is narrow or decided. A candidate replaces sdpa only when its whole interval is faster.
        on_trial / on_result: progress callbacks.
        workers: processes measuring trials at once on one shared study per problem (needs `storage`); this
            process then measures what a dead worker left and makes the choice.
        timeout / problem_timeout: seconds for the whole run / for one problem; past them no new trial starts, the
            best so far is chosen (no head-to-head) and the entry's `tuning.cut_short` says so. A first call longer
            than the time a problem has left is recorded as that trial's failure.
        queue_first: per problem, an earlier choice ({"variant", "params"}) measured as its first trial, so that a
            re-tune which finds nothing better costs little (`attn-tune tune --stale-only`).
        activations: a file from `attn-tune capture --activations`: each candidate's error is the worst over the
            real calls it holds for the problem (random inputs for problems it has none of); each entry's
            `error_inputs` says which. Every problem in it must be one of `problems`.
        validator / max_loss_change / on_drop: at the end, run the validator's model with the config (the
            outcome goes to the config's `validation`); within a loss budget, the approximate entry with the worst
            call is chosen again from its study with errors below that call's (a safer knob, or exact), or
            dropped, until the loss change's interval lies within `max_loss_change` (and the task metric's drop
            within `max_metric_drop`, when given); `on_drop` hears of each.
        problems_label: how messages name the problems ("the problems of shapes.json").
        alongside: entries kept from a config being re-tuned: in the returned config before the fresh ones and
            validated with them; never chosen again (a loss budget may drop them).

    Returns:
        A `TunedConfig` with one entry per problem that some candidate could serve within the constraints.

    Raises:
        AttnTuneError: a bad objective or trial count, a loss budget for a model with no loss, an unreachable
            storage, a device this machine lacks, an activations file that is missing, malformed or not of these
            problems. Every check is made here, before anything is measured.
    """
    captured = _checked_arguments(problems, objective=objective, trials=trials, workers=workers, storage=storage,
                                  timeout=timeout, problem_timeout=problem_timeout, validator=validator,
                                  max_loss_change=max_loss_change, activations=activations,
                                  problems_label=problems_label, max_metric_drop=max_metric_drop)
    started = time.monotonic()
    run_deadline = None if timeout is None else started + timeout
    pool = list(variants) if variants is not None else registered_variants()
    devices = {p.device: device_info(p.device) for p in problems}
    top = devices[problems[0].device] if problems else device_info("cpu")
    measure_kwargs = dict(measure_kwargs or {})
    final_kwargs = dict(final_kwargs or {"min_repeats": 10, "min_time_s": 0.3})
    if activations is not None:
        measure_kwargs["activations"] = final_kwargs["activations"] = str(Path(activations).resolve())
    key = inputs_key(measure_kwargs)
    limits = dict(objective=objective, max_error=max_error, memory_budget=memory_budget)
    settings = {**limits, "variants": None if variants is None else [v.name for v in pool],
                "activations": None if activations is None else {"path": measure_kwargs["activations"],
                                                                  "digest": key.removeprefix("|captured:")}}
    entries = []

    def complete(entry: Entry) -> Entry:
        """What every entry records beyond the choice: versions, error inputs, the settings it was tuned with (a
        re-tune runs them again), its device if not the top one."""
        entry.measured_with = measured_with(entry.choice["variant"])
        entry.error_inputs = describe_inputs(captured.get(entry.problem))
        entry.settings = dict(settings)
        entry.device = devices[entry.problem.device] if devices[entry.problem.device] != top else None
        return entry

    with quiet_optuna():
        opened = open_storage(storage)
        prepared = [
            prepare_study(problem, pool=pool, trials=trials, max_error=max_error, objective=objective, storage=opened,
                          seed=seed, device=devices[problem.device], inputs_key=key,
                          earlier=(queue_first or {}).get(problem))
            for problem in problems
        ]
        if workers > 1:
            run_workers(workers, storage, problems, pool=pool, trials=trials, seed=seed, measure_fn=measure_fn,
                        measure_kwargs=measure_kwargs, studies=[p for p in prepared if not isinstance(p, str)],
                        on_trial=on_trial, **limits)
        choosing = _Choosing(measure_fn, finalists, rounds, max_rounds, final_kwargs, limits)
        for problem, study in zip(problems, prepared):
            problem_started = time.monotonic()
            if isinstance(study, str):
                entry, note = None, study
            else:  # alone, every trial; after workers, only what a dead worker left
                deadline = _deadline(run_deadline, problem_started, problem_timeout)
                entry, note = _search(study, choosing, measure_kwargs, deadline, on_trial)
                if entry is not None:
                    entry.tuning = _tuning_record(study, time.monotonic() - problem_started)
            if entry is not None:
                entries.append(complete(entry))
            if on_result is not None:
                on_result(problem, entry, note)

        def rechoose(problem: Problem, below: float) -> Entry | None:
            study = dict(zip(problems, prepared)).get(problem)
            if study is None or isinstance(study, str):
                return None
            entry, _ = choosing.choose(study, max_error=min(max_error or 0.0, below))
            if entry is None:
                return None
            entry.tuning = next((e.tuning for e in entries if e.problem == problem), None)
            return complete(entry)

        config = TunedConfig(entries=list(alongside) + entries, device=top, attn_tune=own_version(),
                             torch=torch.__version__)
        if validator is not None and config.entries:
            if max_loss_change is None and max_metric_drop is None:
                config.validation = validator.validate(config).summary()
            else:
                config, _ = fit_loss_budget(config, validator, max_loss_change, on_drop=on_drop, rechoose=rechoose,
                                            max_metric_drop=max_metric_drop)
    return config


def _checked_arguments(problems: Sequence[Problem], *, objective: str, trials: int, workers: int, storage: str | None,
                       timeout: float | None, problem_timeout: float | None, validator: Validator | None,
                       max_loss_change: float | None, activations: str | os.PathLike | None,
                       problems_label: str, max_metric_drop: float | None = None) -> dict[Problem, list[Inputs]]:
    """Every check of `tune`'s arguments, before anything is measured (the CLI only translates options); returns
    the captured calls of the activations file, read once."""
    if objective not in OBJECTIVES:
        raise AttnTuneError(f"unknown objective {objective!r}; choose one of {', '.join(OBJECTIVES)}")
    if trials < 1:
        raise AttnTuneError(f"trials must be positive, got {trials}")
    for device in sorted({p.device for p in problems}):
        check_device(device)
    if workers < 1:
        raise AttnTuneError(f"workers must be positive, got {workers}")
    if workers > 1 and storage is None:
        raise AttnTuneError("several workers share a study through a storage: give a server's URL (PostgreSQL)")
    if workers > 1 and storage.startswith("sqlite"):
        raise AttnTuneError("several workers need a server storage (--storage postgresql://...): SQLite has no row "
                            "locks, so one queued trial could go to two workers, and a killed worker stalls the rest")
    for name, limit in (("timeout", timeout), ("problem_timeout", problem_timeout)):
        if limit is not None and not limit > 0:
            raise AttnTuneError(f"{name} must be a positive number of seconds, got {limit}")
    if workers > 1 and (timeout or problem_timeout):
        raise AttnTuneError("time limits apply to one process; with --workers, bound the run by --trials")
    if max_loss_change is not None:
        if validator is None:
            raise AttnTuneError("a loss budget is checked by running a model: give a validator")
        validator.require_loss()
    if max_metric_drop is not None:
        if validator is None:
            raise AttnTuneError("a metric budget is checked by running a model: give a validator")
        validator.require_metric()
    if activations is None:
        return {}
    captured = load_captured(activations)
    check_against(captured, problems, activations, problems_label)
    return captured


@dataclass(frozen=True)
class _Choosing:
    """How a study's choice is made (the head-to-head's measurement and rounds, the limits), shared by the first
    choice and a loss budget's choosing again."""

    measure_fn: MeasureFn
    finalists: int
    rounds: int
    max_rounds: int | None
    final_kwargs: dict[str, Any]
    limits: dict[str, Any]

    def choose(self, study: PreparedStudy, **limits: Any) -> tuple[Entry | None, str]:
        return finish_study(study, measure_fn=self.measure_fn, finalists=self.finalists, rounds=self.rounds,
                            max_rounds=self.max_rounds, final_kwargs=self.final_kwargs, **{**self.limits, **limits})


def _search(study: PreparedStudy, choosing: _Choosing, measure_kwargs: dict[str, Any], deadline: float | None,
            on_trial: Callable[[Problem, int, int], None] | None) -> tuple[Entry | None, str]:
    """One problem's trials until its budget or deadline, then its choice; a note says how it went."""
    if deadline is not None:  # a first call past the time left ends the problem (measure raises TimeoutError)
        measure_kwargs = {**measure_kwargs, "first_call_limit_s": max(deadline - time.monotonic(), 0.0)}
    run_trials(study, measure_fn=choosing.measure_fn, measure_kwargs=measure_kwargs, on_trial=on_trial,
               deadline=deadline, **choosing.limits)
    if deadline is not None and not study.cut_short and time.monotonic() >= deadline:
        study.cut_short = "the time limit came before the head-to-head"
    entry, note = choosing.choose(study)
    return entry, f"cut short ({study.cut_short}): {note}" if study.cut_short else note


def _deadline(run_deadline: float | None, started: float, problem_timeout: float | None) -> float | None:
    limits = [d for d in (run_deadline, None if problem_timeout is None else started + problem_timeout) if d is not None]
    return min(limits) if limits else None


def _tuning_record(study: PreparedStudy, wall_s: float) -> dict[str, Any]:
    """Where one problem's tuning time went: first calls (compiling, masks) apart from everything else."""
    first = first_calls_s(study.study)
    record: dict[str, Any] = {"wall_s": round(wall_s, 3), "first_calls_s": round(first, 3),
                              "other_s": round(max(wall_s - first, 0.0), 3)}
    if study.cut_short:
        record["cut_short"] = study.cut_short
    return record
