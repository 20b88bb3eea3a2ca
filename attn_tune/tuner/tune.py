"""`tune(problems, job)`: one Optuna study per problem over variants and their knobs, a head-to-head of the best few,
then, when the job has a guard, the model run with the result and held to its budgets."""

from __future__ import annotations

import dataclasses
import datetime
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from attn_tune.activations import check_against, describe_inputs
from attn_tune.errors import AttnTuneError
from attn_tune.measurement.inputs import load_captured
from attn_tune.measurement.measure import measure
from attn_tune.problem import Inputs, Problem, check_device
from attn_tune.registry.catalog import get_variant
from attn_tune.registry.catalog import variants as registered_variants
from attn_tune.registry.plugins import own_version
from attn_tune.registry.space import quiet_optuna
from attn_tune.staleness import measured_with
from attn_tune.tuned_config import Entry, TunedConfig, device_info
from attn_tune.tuner.guard import build_validator, guard_config
from attn_tune.tuner.job import FINE_TUNE_STEPS, Guard, TuneJob
from attn_tune.tuner.listener import TuneListener
from attn_tune.tuner.selection import MeasureFn
from attn_tune.tuner.storage import open_storage
from attn_tune.tuner.study import PreparedStudy, finish_study, first_calls_s, inputs_key, prepare_study, run_trials
from attn_tune.tuner.workers import run_workers

__all__ = ["TuneListener", "tune"]


def tune(
    problems: Sequence[Problem],
    job: TuneJob = TuneJob(),
    *,
    measure_fn: MeasureFn = measure,
    listener: TuneListener | None = None,
    queue_first: Mapping[Problem, dict[str, Any]] | None = None,
    alongside: Sequence[Entry] = (),
) -> TunedConfig:
    """Find, by measuring, the best variant and knobs for each problem on this machine.

    Args:
        problems: what to tune; each gets its own Optuna study.
        job: what is searched, how hard, where it runs and what guards it (`attn_tune.tuner.job`).
        measure_fn: `measure`, or a stand-in with its signature (tests inject one, as triton's autotuner does).
        listener: hears of each trial, each problem's choice and each re-choice under the guard's budgets.
        queue_first: per problem, an earlier choice ({"variant", "params"}) measured as its first trial, so that a
            re-tune which finds nothing better costs little.
        alongside: entries kept from a config being re-tuned: in the returned config before the fresh ones and
            guarded with them; never chosen again (a budget may drop them).

    Returns:
        A `TunedConfig` with one entry per problem that some candidate could serve within the limits; with a
        guard, its `validation` record.

    Raises:
        AttnTuneError: a device this machine lacks, an activations file that is missing, malformed or not of these
            problems, a budget the guard's model has no figure for, an unreachable storage. Every check is made
            before anything is measured (the job's own values are checked when it is made).
    """
    if isinstance(problems, Problem) or not all(isinstance(p, Problem) for p in problems):
        raise AttnTuneError("tune takes a list of Problem")
    listener = listener or TuneListener()
    captured = _checked(problems, job)
    run = _Run(problems, job, measure_fn, captured, listener)  # the pool resolved: an unknown name is one line, early
    guard = _serving_mode(job.guard, problems)
    validator = build_validator(guard, progress=listener.step) if guard is not None else None
    with quiet_optuna():
        studies = run.prepare(queue_first or {})
        entries = run.search(studies)
        config = TunedConfig(entries=list(alongside) + entries, device=run.top, attn_tune=own_version(),
                             torch=torch.__version__)
        if validator is not None and config.entries:
            config, _ = guard_config(config, validator, guard, on_rechoice=listener.rechosen,
                                     rechoose=lambda problem, below: run.rechoose(studies, entries, problem, below))
    return config


def _serving_mode(guard: Guard | None, problems: Sequence[Problem]) -> Guard | None:
    """The guard in the mode the choices serve: tuning training problems, it trains with them (a paired fine-tune
    of FINE_TUNE_STEPS unless the job names its steps); an inference pass would never run a training entry."""
    if guard is None or guard.fine_tune_steps is not None or not any(p.training for p in problems):
        return guard
    return dataclasses.replace(guard, fine_tune_steps=FINE_TUNE_STEPS)


def _checked(problems: Sequence[Problem], job: TuneJob) -> dict[Problem, list[Inputs]]:
    """The checks only the problems can answer (devices here, activations of these problems); returns the captured
    calls of the activations file, read once."""
    for device in sorted({p.device for p in problems}):
        check_device(device)
    if job.search.activations is None:
        return {}
    captured = load_captured(job.search.activations)
    check_against(captured, problems, job.search.activations)
    return captured


class _Run:
    """One run's studies and how each problem's choice is made (the first time, and again under a guard)."""

    def __init__(self, problems: Sequence[Problem], job: TuneJob, measure_fn: MeasureFn,
                 captured: dict[Problem, list[Inputs]], listener: TuneListener) -> None:
        self.problems, self.job, self.measure_fn, self.captured = list(problems), job, measure_fn, captured
        self.listener = listener
        self.started = time.monotonic()
        self.pool = [get_variant(v) if isinstance(v, str) else v for v in job.search.variants] \
            if job.search.variants is not None else registered_variants()
        self.devices = {p.device: device_info(p.device) for p in problems}
        self.top = self.devices[problems[0].device] if problems else device_info("cpu")
        effort = job.effort
        self.trial_kwargs, self.final_kwargs = dict(effort.trial_measure), dict(effort.final_measure)
        if job.search.activations is not None:
            path = str(Path(job.search.activations).resolve())
            self.trial_kwargs["activations"] = self.final_kwargs["activations"] = path
        self.inputs_key = inputs_key(self.trial_kwargs)  # what errors are measured on: part of each study's name
        self.settings = _settings(job, self.pool, self.inputs_key)
        self.limits = dict(objective=job.search.objective, max_error=job.search.max_error,
                           memory_budget=job.search.memory_budget)

    def prepare(self, queue_first: Mapping[Problem, dict[str, Any]]) -> list[PreparedStudy | str]:
        """Each problem's study (or why it has none); with workers, their trials are run here."""
        search, execution = self.job.search, self.job.execution
        storage, key = open_storage(execution.storage), self.inputs_key
        prepared = [prepare_study(problem, pool=self.pool, trials=self.job.effort.trials, max_error=search.max_error,
                                  objective=search.objective, storage=storage, seed=execution.seed,
                                  device=self.devices[problem.device], inputs_key=key,
                                  earlier=queue_first.get(problem))
                    for problem in self.problems]
        if execution.workers > 1:
            run_workers(execution.workers, execution.storage, self.problems, pool=self.pool,
                        trials=self.job.effort.trials, seed=execution.seed, measure_fn=self.measure_fn,
                        measure_kwargs=self.trial_kwargs, studies=[p for p in prepared if not isinstance(p, str)],
                        on_trial=self.listener.trial, **self.limits)
        return prepared

    def search(self, studies: list[PreparedStudy | str]) -> list[Entry]:
        """Every problem's trials (alone, all of them; after workers, what a dead one left) and its choice."""
        entries = []
        run_deadline = None if self.job.effort.timeout is None else self.started + self.job.effort.timeout
        for problem, study in zip(self.problems, studies):
            started, since = time.monotonic(), datetime.datetime.now()
            if isinstance(study, str):
                entry, note = None, study
            else:
                limit = self.job.effort.problem_timeout
                deadlines = [d for d in (run_deadline, None if limit is None else started + limit) if d is not None]
                entry, note = self._search_one(study, min(deadlines) if deadlines else None)
                if entry is not None:
                    entry.tuning = _tuning_record(study, time.monotonic() - started, since)
                    entries.append(self._complete(entry))
            self.listener.result(problem, entry, note)
        return entries

    def _search_one(self, study: PreparedStudy, deadline: float | None) -> tuple[Entry | None, str]:
        """One problem's trials until its budget or deadline, then its choice; a note says how it went."""
        kwargs = self.trial_kwargs
        if deadline is not None:  # a first call past the time left ends the problem (measure raises TimeoutError)
            kwargs = {**kwargs, "first_call_limit_s": max(deadline - time.monotonic(), 0.0)}
        run_trials(study, measure_fn=self.measure_fn, measure_kwargs=kwargs, on_trial=self.listener.trial,
                   deadline=deadline, **self.limits)
        if deadline is not None and not study.cut_short and time.monotonic() >= deadline:
            study.cut_short = "the time limit came before the head-to-head"
        entry, note = self._choose(study)
        return entry, f"cut short ({study.cut_short}): {note}" if study.cut_short else note

    def _choose(self, study: PreparedStudy, **limits: Any) -> tuple[Entry | None, str]:
        effort, label = self.job.effort, f"{study.problem.describe()}: head-to-head rounds"
        return finish_study(study, measure_fn=self.measure_fn, finalists=effort.finalists, rounds=effort.rounds,
                            max_rounds=effort.max_rounds, final_kwargs=self.final_kwargs,
                            on_round=lambda done, most: self.listener.step(label, done, most),
                            **{**self.limits, **limits})

    def rechoose(self, studies: list[PreparedStudy | str], entries: list[Entry], problem: Problem,
                 below: float) -> Entry | None:
        """The problem's study chosen from again, errors below `below` (a guard's budget was broken)."""
        study = dict(zip(self.problems, studies)).get(problem)
        if study is None or isinstance(study, str):
            return None
        entry, _ = self._choose(study, max_error=min(self.job.search.max_error or 0.0, below))
        if entry is None:
            return None
        entry.tuning = next((e.tuning for e in entries if e.problem == problem), None)
        return self._complete(entry)

    def _complete(self, entry: Entry) -> Entry:
        """What every entry records beyond the choice: versions, error inputs, the search it was tuned with (a
        re-tune runs it again), its device if not the top one."""
        entry.measured_with = measured_with(entry.choice["variant"])
        entry.error_inputs = describe_inputs(self.captured.get(entry.problem))
        entry.settings = dict(self.settings)
        device = self.devices[entry.problem.device]
        entry.device = device if device != self.top else None
        return entry


def _settings(job: TuneJob, pool: list[Any], key: str) -> dict[str, Any]:
    """The search as each entry records it (`settings`): variant names, the activations' path and digest."""
    search = job.search
    activations = None
    if search.activations is not None:
        activations = {"path": str(Path(search.activations).resolve()), "digest": key.removeprefix("|captured:")}
    return {"objective": search.objective, "max_error": search.max_error, "memory_budget": search.memory_budget,
            "variants": None if search.variants is None else [v.name for v in pool], "activations": activations}


def _tuning_record(study: PreparedStudy, wall_s: float, since: datetime.datetime) -> dict[str, Any]:
    """Where one problem's tuning time went: first calls (compiling, masks) apart from everything else. Only the
    trials this search ran count: a resumed study's earlier trials, or other workers', took none of `wall_s`."""
    first = first_calls_s(study.study, since)
    record: dict[str, Any] = {"wall_s": round(wall_s, 3), "first_calls_s": round(first, 3),
                              "other_s": round(max(wall_s - first, 0.0), 3)}
    if study.cut_short:
        record["cut_short"] = study.cut_short
    return record
