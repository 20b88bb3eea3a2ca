"""Re-tuning only what went stale (`attn-tune tune --config tuned.json --stale-only`), keeping the rest as it was.

The job is read back from the config: each stale entry is tuned again with the search it was tuned with (its
`settings`: objective, max_error, memory budget, variant pool, activations) and, when the config records a
validation, guarded again by the same model and budgets; what a re-tune cannot repeat (an activations file that is
gone or changed, variants not installed) is refused in one line.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Collection, Sequence

import torch

from attn_tune.errors import AttnTuneError
from attn_tune.measurement.measure import measure
from attn_tune.problem import Problem
from attn_tune.registry.catalog import catalog
from attn_tune.registry.plugins import own_version
from attn_tune.runtime.capture import load_factory
from attn_tune.staleness import changes, local_devices, stale_report
from attn_tune.tuned_config import Entry, TunedConfig
from attn_tune.tuner.guard import guard_from_record
from attn_tune.tuner.job import RETUNE_EFFORT, Search, TuneJob
from attn_tune.tuner.selection import MeasureFn
from attn_tune.tuner.study import file_digest
from attn_tune.tuner.listener import TuneListener
from attn_tune.tuner.tune import tune

__all__ = ["stale_problems", "retune"]

_SEARCH_FIELDS = tuple(f.name for f in dataclasses.fields(Search))


def _stale_indexes(config: TunedConfig) -> set[int]:
    """Entries measured under other versions or devices than here, other machines' entries in a merged config
    excepted where this machine has its own entry for the problem (staleness.stale_report's rule)."""
    return set(stale_report(config, "config", local_devices()).changed)


def stale_problems(config: TunedConfig, wanted: Sequence[Problem] = ()) -> list[Problem]:
    """Problems of `config`'s stale entries, then those of `wanted` that the config has no entry for."""
    stale = [config.entries[i].problem for i in sorted(_stale_indexes(config))]
    present = {e.problem for e in config.entries}
    return list(dict.fromkeys(stale)) + [p for p in dict.fromkeys(wanted) if p not in present]


def _recorded_search(entry: Entry, lacks: Callable[..., AttnTuneError]) -> Search:
    """The search `entry` was tuned with, made runnable again: variant names resolved, the activations file found
    unchanged. An entry from before settings were recorded gets its max_error, unless it was tuned on captured
    calls that no record names."""
    recorded = entry.settings
    if recorded is None:
        if (entry.error_inputs or "").startswith("captured"):
            raise lacks("its error was measured on captured activations, and this config (from an older attn-tune) "
                        "does not say which file")
        return Search(max_error=entry.max_error or None)
    values = {key: recorded.get(key) for key in _SEARCH_FIELDS if recorded.get(key) is not None}
    if "variants" in values:
        known = catalog().by_name
        missing = [name for name in values["variants"] if name not in known]
        if missing:
            raise lacks(f"it was tuned among variants not installed here ({', '.join(missing)})")
        values["variants"] = tuple(known[name] for name in values["variants"])
    record = values.get("activations")
    if isinstance(record, dict):
        path = record.get("path", "")
        if not os.path.isfile(path):
            raise lacks(f"its errors were measured on the activations in {path}, which is gone", path)
        if file_digest(path) != record.get("digest"):
            raise lacks(f"its errors were measured on the activations in {path}, which have changed since", path)
        values["activations"] = path
    return Search(**values)


def _plans(config: TunedConfig, problems: Sequence[Problem], stale: set[int], job: TuneJob,
           given: Collection[str]) -> list[tuple[Search, list[Problem]]]:
    """The problems grouped by the search each is tuned with: as recorded, the `given` fields from `job`."""
    by_problem = {config.entries[i].problem: config.entries[i] for i in sorted(stale)}
    factory = (config.validation or {}).get("factory")
    plans: dict[Search, list[Problem]] = {}
    for problem in problems:
        def lacks(what: str, path: str = "FILE", problem: Problem = problem) -> AttnTuneError:
            hint = f"capture them again (attn-tune capture {factory} --activations {path}) or tune afresh" \
                if factory else "tune afresh"
            return AttnTuneError(f"cannot re-tune {problem.describe()} as it was tuned: {what}; {hint}")

        entry = by_problem.get(problem)
        search = _recorded_search(entry, lacks) if entry is not None else Search()
        search = dataclasses.replace(search, **{name: getattr(job.search, name) for name in given})
        plans.setdefault(search, []).append(problem)
    return list(plans.items())


class _Heard(TuneListener):
    """Passes everything on to the caller's listener, keeping which problems got a choice."""

    def __init__(self, listener: TuneListener | None) -> None:
        self.listener, self.chosen = listener or TuneListener(), set()

    def trial(self, problem: Problem, done: int, total: int) -> None:
        self.listener.trial(problem, done, total)

    def step(self, what: str, done: int, total: int) -> None:
        self.listener.step(what, done, total)

    def result(self, problem: Problem, entry: Entry | None, note: str) -> None:
        if entry is not None:
            self.chosen.add(problem)
        self.listener.result(problem, entry, note)

    def rechosen(self, record: dict[str, Any]) -> None:
        self.listener.rechosen(record)


def retune(config: TunedConfig, problems: Sequence[Problem], job: TuneJob | None = None, *,
           given: Collection[str] = (), measure_fn: MeasureFn = measure,
           listener: TuneListener | None = None) -> TunedConfig:
    """Tune `problems` (stale entries' problems first, each with its earlier choice measured first) with the job
    read back from the config, and put the fresh entries where the stale ones were.

    `job` gives the effort and where it runs (default: `RETUNE_EFFORT`); its search fields named in `given` replace
    the recorded ones; its guard, if any, replaces the recorded one. Entries of other machines are kept byte for
    byte (in a merged config a fresh entry for this machine is added beside them); a problem that finds no entry now
    keeps its old one. With a guard, the model is run again with the result, and over its budgets approximate
    entries may be chosen again or dropped, as `tune` does.

    Raises:
        AttnTuneError: an entry that cannot be re-tuned as it was (its activations gone or changed, its variants
            not installed), or stale entries of different searches under one budget.
    """
    job = job or TuneJob(effort=RETUNE_EFFORT)
    unknown = sorted(set(given) - set(_SEARCH_FIELDS))
    if unknown:
        raise AttnTuneError(f"only search fields replace what a config records, not {', '.join(unknown)}")
    stale = _stale_indexes(config)
    here = local_devices()
    other_machine = {i for i, e in enumerate(config.entries)
                     if any(c.what == "device" for c in changes(e, config.device, here))}
    plans = _plans(config, problems, stale, job, given)
    guard = job.guard or guard_from_record(config.validation)
    if guard is not None and guard.budgeted and len(plans) > 1:
        raise AttnTuneError("the stale entries were tuned with different settings but share one loss or metric "
                            "budget: re-tune the config from scratch")
    for spec in (guard.factory, guard.metric) if guard is not None else ():
        if isinstance(spec, str):
            load_factory(spec)  # the model is run with the last plan: a factory gone is one line before the first
    kept = [e for i, e in enumerate(config.entries) if i not in stale and i not in other_machine]
    heard = _Heard(listener)
    fresh, validation = _run_plans(config, plans, job, guard, kept, measure_fn, heard)
    kept = [k for k in kept if any(k is e for e in validation[1])] if validation else kept
    entries = []
    merged = config.device.get("type") == "mixed"
    for i, entry in enumerate(config.entries):
        if i in stale and not (merged and i in other_machine):
            new = fresh.pop(entry.problem, None)
            if new is not None or entry.problem not in heard.chosen:
                entries.append(new or entry)  # no entry found now: the old one stays; dropped for the budget: gone
        elif i in stale or i in other_machine or any(entry is k for k in kept):
            entries.append(entry)  # another machine's, byte for byte; or kept here (and within the budget)
    entries += list(fresh.values())
    return TunedConfig(entries=entries, device=config.device, attn_tune=own_version(), torch=torch.__version__,
                       validation=validation[0] if validation else config.validation)


def _run_plans(config: TunedConfig, plans: list[tuple[Search, list[Problem]]], job: TuneJob, guard: Any,
               kept: list[Entry], measure_fn: MeasureFn, heard: _Heard) -> tuple[dict[Problem, Entry], Any]:
    """One `tune` per plan; the model is guarded once, with the last run, every entry used here by then (kept and
    fresh) beside it. Returns the fresh entries, and (the validation record, the entries it kept) or None."""
    earlier = {e.problem: e.choice for e in config.entries}
    fresh: dict[Problem, Entry] = {}
    validation = None
    for number, (search, problems) in enumerate(plans, 1):
        before = kept + list(fresh.values())
        last = guard is not None and number == len(plans)
        result = tune(problems, dataclasses.replace(job, search=search, guard=guard if last else None),
                      measure_fn=measure_fn, listener=heard, queue_first=earlier, alongside=before if last else ())
        if last:
            validation = (result.validation, [e for e in result.entries if any(e is b for b in before)])
            fresh = {p: e for p, e in fresh.items() if any(e is r for r in result.entries)}
        for entry in result.entries:
            if any(entry is b for b in before):
                continue
            device = entry.device or result.device
            entry.device = None if device == config.device else device
            fresh[entry.problem] = entry
    return fresh, validation
