"""Re-tuning only what went stale (`attn-tune tune --config tuned.json --stale-only`), keeping the rest as it was.

Each stale entry is tuned again with what it was tuned with (its `settings`: objective, max_error, memory budget,
variant pool, activations) and, when the config records a validation, checked end to end again under the same loss
budget; what a re-tune cannot repeat (an activations file that is gone or changed) is refused in one line.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from attn_tune.errors import AttnTuneError
from attn_tune.problem import Problem
from attn_tune.registry.catalog import catalog
from attn_tune.registry.plugins import own_version
from attn_tune.runtime.capture import load_factory
from attn_tune.staleness import changes, local_devices, stale_report
from attn_tune.tuned_config import Entry, TunedConfig
from attn_tune.tuner.study import file_digest
from attn_tune.tuner.tune import tune
from attn_tune.tuner.validate import Validator

__all__ = ["stale_problems", "retune", "SETTING_KEYS"]

SETTING_KEYS = ("objective", "max_error", "memory_budget", "variants", "activations")


def _stale_indexes(config: TunedConfig) -> set[int]:
    """Entries measured under other versions or devices than here, other machines' entries in a merged config
    excepted where this machine has its own entry for the problem (staleness.stale_report's rule)."""
    return set(stale_report(config, "config", local_devices()).changed)


def stale_problems(config: TunedConfig, wanted: Sequence[Problem] = ()) -> list[Problem]:
    """Problems of `config`'s stale entries, then those of `wanted` that the config has no entry for."""
    stale = [config.entries[i].problem for i in sorted(_stale_indexes(config))]
    present = {e.problem for e in config.entries}
    return list(dict.fromkeys(stale)) + [p for p in dict.fromkeys(wanted) if p not in present]


def _recorded_settings(entry: Entry, lacks: Callable[..., AttnTuneError]) -> dict[str, Any]:
    """The settings `entry` was tuned with, as `tune` keywords; an entry from before settings were recorded gets
    its max_error, unless it was tuned on captured calls that no record names."""
    recorded = entry.settings
    if recorded is None:
        if (entry.error_inputs or "").startswith("captured"):
            raise lacks("its error was measured on captured activations, and this config (from an older attn-tune) "
                        "does not say which file")
        return {"max_error": entry.max_error or None}
    return {key: recorded.get(key) for key in SETTING_KEYS if recorded.get(key) is not None}


def _as_tune_kwargs(settings: dict[str, Any], lacks: Callable[..., AttnTuneError]) -> dict[str, Any]:
    """Recorded settings made runnable: variant names resolved, the activations file found and unchanged."""
    kwargs = dict(settings)
    if "variants" in kwargs:
        known = catalog().by_name
        missing = [name for name in kwargs["variants"] if name not in known]
        if missing:
            raise lacks(f"it was tuned among variants not installed here ({', '.join(missing)})")
        kwargs["variants"] = [known[name] for name in kwargs["variants"]]
    record = kwargs.get("activations")
    if isinstance(record, dict):
        path = record.get("path", "")
        if not os.path.isfile(path):
            raise lacks(f"its errors were measured on the activations in {path}, which is gone", path)
        if file_digest(path) != record.get("digest"):
            raise lacks(f"its errors were measured on the activations in {path}, which have changed since", path)
        kwargs["activations"] = path
    return kwargs


@dataclass
class _Plan:
    """One tune() run of a re-tune: problems sharing their settings."""

    settings: dict[str, Any]
    problems: list[Problem]


def _plans(config: TunedConfig, problems: Sequence[Problem], stale: set[int], overrides: dict[str, Any],
           capture_hint: str) -> list[_Plan]:
    by_problem = {config.entries[i].problem: config.entries[i] for i in sorted(stale)}
    plans: dict[str, _Plan] = {}
    for problem in problems:
        def lacks(what: str, path: str = "FILE", problem: Problem = problem) -> AttnTuneError:
            hint = f"capture them again ({capture_hint} --activations {path}) or tune afresh" if capture_hint else \
                "tune afresh"
            return AttnTuneError(f"cannot re-tune {problem.describe()} as it was tuned: {what}; {hint}")

        entry = by_problem.get(problem)
        recorded = _recorded_settings(entry, lacks) if entry is not None else {}
        settings = {k: v for k, v in recorded.items() if k not in overrides}
        settings = {**_as_tune_kwargs(settings, lacks), **{k: v for k, v in overrides.items() if k in SETTING_KEYS}}
        key = json.dumps({k: [v.name for v in val] if k == "variants" and val else val for k, val in settings.items()},
                         sort_keys=True, default=str)
        plans.setdefault(key, _Plan(settings, [])).problems.append(problem)
    return list(plans.values())


def _validator_of(config: TunedConfig) -> tuple[Any, float | None]:
    """The model the config was validated with (its batches, its metric), built again, and its loss budget
    (None, None: not validated)."""
    factory = (config.validation or {}).get("factory")
    if not factory:
        return None, None
    batches, metric_from = int(config.validation.get("batches", 1)), config.validation.get("metric_from")
    metric = load_factory(metric_from) if metric_from else None  # the --metric it was validated with, if any
    return (Validator(load_factory(factory), label=factory, batches=batches, metric=metric, metric_from=metric_from),
            config.validation.get("max_loss_change"))


def retune(config: TunedConfig, problems: Sequence[Problem], **tune_kwargs: Any) -> TunedConfig:
    """Tune `problems` (stale entries' problems first, each with its earlier choice measured first and the settings
    it was tuned with; `tune_kwargs` given here override those) and put the fresh entries where the stale ones
    were. Entries of other machines are kept byte for byte (in a merged config a fresh entry for this machine is
    added beside them); a problem that finds no entry now keeps its old one. When the config records a validation,
    its model is run again with the result, and under its loss budget approximate entries may be chosen again or
    dropped, as `tune --validate --max-loss-change` does.

    Raises:
        AttnTuneError: an entry that cannot be re-tuned as it was (its activations gone or changed, its variants
            not installed), or stale entries of different settings under one loss budget.
    """
    stale = _stale_indexes(config)
    here = local_devices()
    merged = config.device.get("type") == "mixed"
    other_machine = {i for i, e in enumerate(config.entries)
                     if any(c.what == "device" for c in changes(e, config.device, here))}
    factory = (config.validation or {}).get("factory")
    hint = f"attn-tune capture {factory}" if factory else ""
    plans = _plans(config, problems, stale, tune_kwargs, hint)
    validator, budget = (None, None) if "validator" in tune_kwargs else _validator_of(config)
    if validator is not None and budget is not None and len(plans) > 1:
        raise AttnTuneError("the stale entries were tuned with different settings but share one loss budget: re-tune "
                            "the config from scratch")
    alongside = [e for i, e in enumerate(config.entries) if i not in stale and i not in other_machine]
    earlier = {e.problem: e.choice for e in config.entries}
    fresh: dict[Problem, Entry] = {}
    chosen_before: set[Problem] = set()
    validation = config.validation
    on_result = tune_kwargs.get("on_result")

    def heard(problem: Problem, entry: Entry | None, note: str) -> None:
        if entry is not None:
            chosen_before.add(problem)
        if on_result is not None:
            on_result(problem, entry, note)

    run_kwargs = {k: v for k, v in tune_kwargs.items() if k not in SETTING_KEYS and k != "on_result"}
    kept = list(alongside)
    for number, plan in enumerate(plans, 1):
        # the model is validated once, with the last run: every entry used here by then (kept and fresh) beside it
        before = kept + list(fresh.values())
        checked = {} if validator is None or number < len(plans) else \
            {"validator": validator, "max_loss_change": budget, "alongside": before,
             "max_metric_drop": (config.validation or {}).get("max_metric_drop")}
        result = tune(plan.problems, queue_first=earlier, on_result=heard, **plan.settings, **run_kwargs, **checked)
        if checked:
            validation = result.validation
            kept = [k for k in kept if any(k is e for e in result.entries)]
            fresh = {p: e for p, e in fresh.items() if any(e is r for r in result.entries)}
        for entry in result.entries:
            if any(entry is b for b in before):
                continue
            device = entry.device or result.device
            entry.device = None if device == config.device else device
            fresh[entry.problem] = entry
    entries = []
    for i, entry in enumerate(config.entries):
        if i in stale and not (merged and i in other_machine):
            new = fresh.pop(entry.problem, None)
            if new is not None or entry.problem not in chosen_before:
                entries.append(new or entry)  # no entry found now: the old one stays; dropped for the budget: gone
        elif i in stale or i in other_machine or any(entry is k for k in kept):
            entries.append(entry)  # another machine's, byte for byte; or kept here (and within the budget)
    entries += list(fresh.values())
    return TunedConfig(entries=entries, device=config.device, attn_tune=own_version(), torch=torch.__version__,
                       validation=validation)
