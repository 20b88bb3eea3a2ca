"""The end-to-end guard in one place: the model built from a `Guard`, its budgets checked, and, over budget, the
approximate entry with the worst call chosen again (a safer knob, or exact) or dropped until the budgets hold; the
record the config keeps of it. `tune`, a re-tune and `attn-tune validate` all go through here."""

from __future__ import annotations

from typing import Any, Callable

from attn_tune.problem import Problem
from attn_tune.runtime.capture import load_factory, takes_batches
from attn_tune.tuned_config import Entry, TunedConfig
from attn_tune.tuner.intervals import upper_within
from attn_tune.tuner.job import INTERVAL_BATCHES, Guard
from attn_tune.tuner.fine_tune import FineTune
from attn_tune.tuner.validation import Validation, is_exact
from attn_tune.tuner.validator import Validator

__all__ = ["build_validator", "guard_batches", "batches_text", "broken_budgets", "guard_config", "guard_from_record"]

Rechoose = Callable[[Problem, float], "Entry | None"]


def build_validator(guard: Guard, progress: Callable[[str, int, int], None] | None = None) -> Validator | FineTune:
    """The guard's model run once with exact attention on its batches (`guard_batches`), or, with
    `fine_tune_steps`, fine-tuned with exact attention (`FineTune`); a budget the model has no figure for (no loss,
    no metric) is refused here, before anything is tuned. `progress` hears of each batch and step."""
    factory = _factory(guard)
    metric = load_factory(guard.metric) if isinstance(guard.metric, str) else guard.metric
    metric_from = guard.metric if isinstance(guard.metric, str) else None
    if guard.fine_tune_steps is not None:
        validator: Validator | FineTune = FineTune(
            factory, guard.label, steps=guard.fine_tune_steps, batches=guard_batches(guard),
            learning_rate=guard.learning_rate, metric=metric, metric_from=metric_from, progress=progress)
    else:
        validator = Validator(factory, label=guard.label, batches=guard_batches(guard), metric=metric,
                              metric_from=metric_from, progress=progress)
    _require(validator, guard)
    return validator


def guard_batches(guard: Guard) -> int:
    """The held-out batches the guard runs: as it says, else INTERVAL_BATCHES when its factory takes `batches`
    (so each figure gets an interval), else 1."""
    if guard.batches is not None:
        return guard.batches
    return INTERVAL_BATCHES if takes_batches(_factory(guard)) else 1


def batches_text(guard: Guard) -> str:
    """Why the guard runs the batches it does, in one line, for a guard that did not name its count."""
    count = guard_batches(guard)
    if count > 1:
        return (f"guard: {count} held-out batches of {guard.label} (it takes `batches`; {count} give each figure a "
                "95% interval; --batches N to change)")
    return (f"guard: one batch of {guard.label}, so no interval: the factory takes no `batches` parameter (give it "
            "one for an interval: docs/validation.md)")


def _factory(guard: Guard) -> Callable[..., Any]:
    return load_factory(guard.factory) if isinstance(guard.factory, str) else guard.factory


def guard_from_record(validation: dict[str, Any] | None) -> Guard | None:
    """The guard a config was validated with, read back from its `validation` record (None: not validated)."""
    if not validation or not validation.get("factory"):
        return None
    fine_tune = validation.get("fine_tune") or {}
    return Guard(factory=validation["factory"], batches=int(validation.get("batches", 1)),
                 metric=validation.get("metric_from"), max_loss_change=validation.get("max_loss_change"),
                 max_metric_drop=validation.get("max_metric_drop"), fine_tune_steps=fine_tune.get("steps"),
                 learning_rate=fine_tune.get("learning_rate", Guard.learning_rate))


def _require(validator: Any, guard: Guard) -> None:
    if guard.max_loss_change is not None:
        validator.require_loss()
    if guard.max_metric_drop is not None:
        validator.require_metric()


def broken_budgets(figures: dict[str, Any], guard: Guard, suffix: str = "") -> dict[str, str]:
    """Which budgets the figures break ("loss", "metric"), each said in words. `figures` is a validation's summary
    (suffix "") or a re-choice record (suffix "_before": the figures that made it)."""
    broken = {}
    change, drop = figures.get("loss_change" + suffix), figures.get("metric_drop" + suffix)
    change_upper = (figures.get("loss_change_interval" + suffix) or [None, change])[1]
    drop_upper = (figures.get("metric_drop_interval" + suffix) or [None, drop])[1]
    budget, metric_budget = guard.max_loss_change, guard.max_metric_drop
    # upper_within: a NaN figure is over any budget
    if budget is not None and change_upper is not None and not upper_within((change, change_upper), budget):
        upper = f" (interval up to {change_upper:+.2%})" if change_upper != change else ""
        broken["loss"] = f"loss change {change:+.2%}{upper} is over {budget:+.2%}"
    if metric_budget is not None and drop_upper is not None and not upper_within((drop, drop_upper), metric_budget):
        upper = f" (interval up to {drop_upper:+.4f})" if drop_upper != drop else ""
        broken["metric"] = f"{figures.get('metric') or 'metric'} drop {drop:+.4f}{upper} is over {metric_budget:.4f}"
    return broken


def _record(validation: Validation, guard: Guard) -> dict[str, Any]:
    """What the config keeps of its validation: the summary, and the budgets it was held to."""
    record = validation.summary()
    if guard.budgeted:
        record["max_loss_change"] = guard.max_loss_change
        if guard.max_metric_drop is not None:
            record["max_metric_drop"] = guard.max_metric_drop
    return record


def _worst_calls(validation: Validation) -> dict[Problem, float]:
    """Per approximate entry that served calls as itself, its worst call's error."""
    worst: dict[Problem, float] = {}
    for call in validation.calls:
        if call.entry is not None and call.rule == "own-entry" and not is_exact(call.variant):
            worst[call.entry] = max(worst.get(call.entry, 0.0), call.rel_error)
    return worst


def _rechoice_limit(problem: Problem, worst_call: float, measured: float | None) -> float:
    """The error a re-choice must stay below. Inference: the lower of the worst call's and the entry's measured
    error (both the output's). Training: the entry's measured error alone, which is the worst of the output's and
    dq's, dk's and dv's, the basis every training candidate was measured on; the guard's call error is the
    output's only (smaller), so with it a safer knob whose gradients err between the two would never be tried."""
    if measured is None:
        return worst_call
    return measured if problem.training else min(worst_call, measured)


def guard_config(config: TunedConfig, validator: Any, guard: Guard, *, rechoose: Rechoose | None = None,
                 on_rechoice: Callable[[dict[str, Any]], None] | None = None) -> tuple[TunedConfig, Validation]:
    """Validate `config` on the guard's model; within a budget, until the loss change's interval (and the metric
    drop's) lies within it, take the approximate entry whose calls had the worst error and choose again for its
    problem with errors below that (`rechoose`, from its study: a safer knob, or exact), or drop it when nothing
    is found. Returns the config with its `validation` record, and the last check."""
    _require(validator, guard)
    entries, dropped = list(config.entries), []
    while True:
        candidate = TunedConfig(entries=entries, device=config.device, created=config.created,
                                attn_tune=config.attn_tune, torch=config.torch)
        validation = validator.validate(candidate)
        worst = _worst_calls(validation)
        if not broken_budgets(validation.summary(), guard) or not worst:
            validation.dropped = dropped
            candidate.validation = _record(validation, guard)
            return candidate, validation
        target = max(worst, key=worst.get)
        old = next(e for e in entries if e.problem == target)
        limit = _rechoice_limit(target, worst[target], old.measured.get("rel_error")) * (1 - 1e-6)
        new = rechoose(target, limit) if rechoose is not None else None
        summary = validation.summary()
        record = {"problem": target.describe(), "variant": old.choice["variant"], "params": old.choice["params"],
                  "worst_call_error": worst[target], "metric": validation.metric,
                  **{f"{key}_before": summary.get(key) for key in
                     ("loss_change", "loss_change_interval", "metric_drop", "metric_drop_interval")},
                  "now": None if new is None else new.choice}
        dropped.append(record)
        if on_rechoice is not None:
            on_rechoice(record)
        entries = [e if e.problem != target else new for e in entries if e.problem != target or new is not None]
