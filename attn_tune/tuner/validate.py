"""End to end: run a factory's model with exact attention and with a tuned config, and compare.

Per attention call: the variant used and its error against float64 exact attention on that call's own inputs.
For the model: the output's relative error and, where there is a loss, the loss with each and its relative change;
over several held-out batches, the change as a paired estimate: its mean over batches and a 95% confidence
interval (Student's t, as the head-to-head's). A loss budget holds when the interval's upper end is within it.
The loss is the model's own (an output with a `loss` tensor, as Hugging Face models return given labels), else
cross-entropy of the output logits against integer targets the factory returns third (positions holding -100
ignored), or mean squared error against float targets.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor

from attn_tune.errors import AttnTuneError
from attn_tune.measurement.inputs import exact_attention, relative_error
from attn_tune.problem import Problem
from attn_tune.registry.catalog import get_variant
from attn_tune.runtime import dispatch, use_config
from attn_tune.runtime.capture import ModelRun, call_factory, observe
from attn_tune.tuned_config import Entry, TunedConfig
from attn_tune.tuner.headtohead import CONFIDENCE, t_quantile

__all__ = ["CallReport", "Validation", "Validator", "NoLoss", "fit_loss_budget", "IGNORE_INDEX"]

IGNORE_INDEX = -100


class NoLoss(AttnTuneError):
    """A loss budget was asked for a model with no loss: its factory returns no targets and its output no loss."""


@dataclass(frozen=True)
class CallReport:
    """One attention call of the validated run."""

    number: int
    problem: Problem
    variant: str
    params: dict[str, Any]
    rule: str
    entry: Problem | None
    rel_error: float

    def to_dict(self) -> dict[str, Any]:
        return {"call": self.number, "problem": self.problem.to_dict(), "variant": self.variant, "params": self.params,
                "rule": self.rule, "rel_error": self.rel_error}


@dataclass
class Validation:
    """What a config does to one model, measured against the same model with exact attention, batch by batch."""

    factory: str
    calls: list[CallReport]
    output_error: float
    losses_exact: list[float] | None
    losses_tuned: list[float] | None
    loss_from: str | None  # "model" (its own loss) | "targets" | None
    dropped: list[dict[str, Any]] = field(default_factory=list)
    metric: str | None = None  # the task metric's name (higher is better), when the factory or --metric gives one
    metric_from: str | None = None  # the MODULE:FN it came from when not the factory's own (a re-tune loads it)
    metrics_exact: list[float] | None = None
    metrics_tuned: list[float] | None = None

    @property
    def metric_drops(self) -> list[float] | None:
        """Per batch, exact - tuned: +0.004 is an accuracy 0.4 points lower with the config."""
        if self.metrics_exact is None or self.metrics_tuned is None:
            return None
        return [e - t for e, t in zip(self.metrics_exact, self.metrics_tuned)]

    @property
    def metric_drop(self) -> float | None:
        return _mean(self.metric_drops)

    @property
    def metric_drop_interval(self) -> tuple[float, float] | None:
        """The 95% confidence interval of the mean metric drop (paired, Student's t); one batch: (mean, mean)."""
        return _interval(self.metric_drops)

    def metric_within(self, max_metric_drop: float) -> bool:
        """Whether the metric drop's interval lies within the budget (its upper end decides)."""
        return _upper_within(self.metric_drop_interval, max_metric_drop)

    @property
    def loss_exact(self) -> float | None:
        return _mean(self.losses_exact)

    @property
    def loss_tuned(self) -> float | None:
        return _mean(self.losses_tuned)

    @property
    def changes(self) -> list[float] | None:
        """Per batch, (tuned - exact) / exact: +0.01 is a loss 1% higher with the config."""
        if self.losses_exact is None or self.losses_tuned is None:
            return None
        return [(t - e) / abs(e) if e else float("inf") for e, t in zip(self.losses_exact, self.losses_tuned)]

    @property
    def loss_change(self) -> float | None:
        """The mean relative loss change over the batches."""
        return _mean(self.changes)

    @property
    def loss_change_interval(self) -> tuple[float, float] | None:
        """The 95% confidence interval of the mean change (paired, Student's t); one batch: (mean, mean)."""
        return _interval(self.changes)

    def within(self, max_loss_change: float) -> bool:
        """Whether the loss change's interval lies within the budget (its upper end, not its mean, decides)."""
        return _upper_within(self.loss_change_interval, max_loss_change)

    def _loss_fields(self) -> dict[str, Any]:
        interval = self.loss_change_interval
        fields = {"loss_exact": self.loss_exact, "loss_tuned": self.loss_tuned, "loss_change": self.loss_change,
                  "loss_change_interval": None if interval is None else list(interval),
                  "batches": 1 if self.losses_exact is None else len(self.losses_exact)}
        if self.metric is not None:
            drop = self.metric_drop_interval
            fields.update(metric=self.metric, metric_exact=statistics.fmean(self.metrics_exact),
                          metric_tuned=statistics.fmean(self.metrics_tuned), metric_drop=self.metric_drop,
                          metric_drop_interval=None if drop is None else list(drop))
            if self.metric_from is not None:
                fields["metric_from"] = self.metric_from
        return fields

    def to_dict(self) -> dict[str, Any]:
        data = {"factory": self.factory, "output_rel_error": self.output_error, "loss_from": self.loss_from,
                **self._loss_fields(), "loss_changes": self.changes, "calls": [c.to_dict() for c in self.calls]}
        if self.dropped:
            data["dropped"] = self.dropped
        return data

    def summary(self) -> dict[str, Any]:
        """What the config records of its validation."""
        approximate = [c for c in self.calls if not _exact(c.variant)]
        return {"factory": self.factory, "loss_from": self.loss_from, **self._loss_fields(),
                "output_rel_error": self.output_error, "calls": len(self.calls),
                "approximate_calls": len(approximate), "dropped": self.dropped}


def _mean(values: list[float] | None) -> float | None:
    return None if values is None else statistics.fmean(values)


def _upper_within(interval: tuple[float, float] | None, budget: float) -> bool:
    """A budget holds when the interval's upper end is within it (no figure: nothing to hold against)."""
    return interval is None or interval[1] <= budget


def _interval(values: list[float] | None) -> tuple[float, float] | None:
    """Mean +- Student's t half-width at CONFIDENCE (two-sided); one value, or a non-finite one: (mean, mean)."""
    if values is None:
        return None
    mean = statistics.fmean(values)
    if len(values) < 2 or not all(math.isfinite(v) for v in values):
        return (mean, mean)
    half = t_quantile(1 - (1 - CONFIDENCE) / 2, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return (mean - half, mean + half)


def _exact(variant: str) -> bool:
    try:
        return get_variant(variant).exact
    except AttnTuneError:
        return False


def _first_tensor(out: Any) -> Tensor:
    if isinstance(out, Tensor):
        return out
    values = out.values() if isinstance(out, dict) else out if isinstance(out, (tuple, list)) else vars(out).values()
    for value in values:
        if isinstance(value, Tensor) and value.dim() > 0:
            return value
    raise AttnTuneError("the model's output holds no tensor to compare")


def _own_loss(out: Any) -> Tensor | None:
    loss = out.get("loss") if isinstance(out, dict) else getattr(out, "loss", None)
    return loss if isinstance(loss, Tensor) and loss.numel() == 1 else None


def _logits(out: Any) -> Tensor:
    logits = out.get("logits") if isinstance(out, dict) else getattr(out, "logits", None)
    return logits if isinstance(logits, Tensor) else _first_tensor(out)


def _loss(out: Any, targets: Any) -> tuple[float | None, str | None]:
    own = _own_loss(out)
    if own is not None:
        return float(own), "model"
    if targets is None:
        return None, None
    logits = _logits(out)
    if targets.dtype.is_floating_point:
        return float(torch.nn.functional.mse_loss(logits.float(), targets.float())), "targets"
    return float(torch.nn.functional.cross_entropy(logits.flatten(0, -2).float(), targets.flatten(),
                                                   ignore_index=IGNORE_INDEX)), "targets"


def _call_error(call: dispatch.Call) -> float:
    inputs = call.inputs
    ref = exact_attention(inputs.q, inputs.k, inputs.v, **inputs.call_kwargs(call.problem))
    return relative_error(call.out, ref)


class Validator:
    """A factory's model run once with exact attention (on each of `batches` held-out batches);
    `validate(config)` runs it with a config and compares."""

    def __init__(self, factory: Callable[..., Any], label: str = "", batches: int = 1,
                 metric: Callable[[Any, Any], float] | None = None, metric_from: str | None = None) -> None:
        """`metric` replaces the factory's own (its fourth item); `metric_from` names where it came from
        (MODULE:FN), recorded in the config so that a re-tune validates with the same metric."""
        self.label = label or getattr(factory, "__name__", "factory")
        self.built: ModelRun = call_factory(factory, batches)
        self.built.model.eval()
        self.metric = metric or self.built.metric
        self.metric_from = metric_from if metric is not None else None
        self.exact_outputs, losses, metrics = [], [], []
        with use_config(None), torch.no_grad():
            for i, (_, _, targets) in enumerate(self.built.batches):
                out = self.built.run(i)
                self.exact_outputs.append(_first_tensor(out).detach())
                loss, self.loss_from = _loss(out, targets)
                losses.append(loss)
                metrics.append(self._score(out, targets))
        self.losses_exact = None if self.loss_from is None else losses
        self.metrics_exact = None if self.metric is None else metrics

    @property
    def metric_name(self) -> str | None:
        return None if self.metric is None else getattr(self.metric, "__name__", "metric")

    def _score(self, out: Any, targets: Any) -> float | None:
        if self.metric is None:
            return None
        value = self.metric(out, targets)
        try:
            return float(value)
        except (TypeError, ValueError):
            raise AttnTuneError(f"the metric {self.metric_name} returned {type(value).__name__}, not a number") from None

    def require_metric(self) -> None:
        """Raise NoLoss unless there is a metric to budget."""
        if self.metric is None:
            raise NoLoss(f"{self.label} gives no metric: return it fourth from the factory (a function of "
                         "(outputs, targets), higher is better), or pass --metric MODULE:FN")

    @property
    def batches(self) -> int:
        return len(self.built.batches)

    @property
    def loss_exact(self) -> float | None:
        """The exact model's loss, the mean over the batches."""
        return _mean(self.losses_exact)

    def require_loss(self) -> None:
        """Raise NoLoss unless the model has a loss to budget."""
        if self.loss_from is None:
            raise NoLoss(f"{self.label} gives no loss: return (model, example_inputs, targets) from the factory, or "
                         'a model output with a "loss" (README: "Judged on the model’s own activations, and end to end")')

    def validate(self, config: TunedConfig | str | Any) -> Validation:
        calls: list[CallReport] = []

        def seen(call: dispatch.Call) -> None:
            d = call.decision
            calls.append(CallReport(len(calls), call.problem, d.variant, dict(d.params), d.rule, d.entry,
                                    _call_error(call)))

        errors, losses, metrics = [], [], []
        with use_config(config), torch.no_grad(), observe(seen):
            for i, (_, _, targets) in enumerate(self.built.batches):
                out = self.built.run(i)
                errors.append(relative_error(_first_tensor(out), self.exact_outputs[i].double()))
                losses.append(_loss(out, targets)[0])
                metrics.append(self._score(out, targets))
        return Validation(self.label, calls, max(errors), self.losses_exact,
                          None if self.losses_exact is None else losses, self.loss_from,
                          metric=self.metric_name, metric_from=self.metric_from, metrics_exact=self.metrics_exact,
                          metrics_tuned=None if self.metric is None else metrics)


def broken_budgets(record: dict[str, Any], max_loss_change: float | None,
                   max_metric_drop: float | None) -> dict[str, str]:
    """What a re-choice record (`fit_loss_budget`'s `dropped`) broke, by guard ("loss", "metric"), said in words."""
    broken = {}
    change, drop = record.get("loss_change_before"), record.get("metric_drop_before")
    change_upper = (record.get("loss_change_interval_before") or [None, change])[1]
    drop_upper = (record.get("metric_drop_interval_before") or [None, drop])[1]
    if max_loss_change is not None and change_upper is not None and change_upper > max_loss_change:
        upper = f" (interval up to {change_upper:+.2%})" if change_upper != change else ""
        broken["loss"] = f"loss change {change:+.2%}{upper} is over {max_loss_change:+.2%}"
    if max_metric_drop is not None and drop_upper is not None and drop_upper > max_metric_drop:
        upper = f" (interval up to {drop_upper:+.4f})" if drop_upper != drop else ""
        broken["metric"] = f"{record.get('metric') or 'metric'} drop {drop:+.4f}{upper} is over {max_metric_drop:.4f}"
    return broken


def fit_loss_budget(config: TunedConfig, validator: Validator, max_loss_change: float | None,
                    on_drop: Callable[[dict[str, Any]], None] | None = None,
                    rechoose: Callable[[Problem, float], Entry | None] | None = None,
                    max_metric_drop: float | None = None) -> tuple[TunedConfig, Validation]:
    """Until the loss change's interval lies within `max_loss_change` (relative; the upper end decides, over the
    validator's batches), take the approximate entry whose calls had the worst error and choose again for its
    problem with errors below that (`rechoose`, from the problem's study: a safer knob, or an exact variant), or
    drop it when there is no `rechoose` or it finds nothing. With `max_metric_drop`, the task metric's drop must
    lie within it too (upper end of its interval). Returns the config, with its `validation` record, and the last
    check."""
    if max_loss_change is not None:
        validator.require_loss()
    if max_metric_drop is not None:
        validator.require_metric()
    entries = list(config.entries)
    dropped: list[dict[str, Any]] = []
    while True:
        candidate = TunedConfig(entries=entries, device=config.device, created=config.created,
                                attn_tune=config.attn_tune, torch=config.torch)
        validation = validator.validate(candidate)
        change = validation.loss_change
        worst: dict[Problem, float] = {}
        for call in validation.calls:
            if call.entry is not None and call.rule == "own-entry" and not _exact(call.variant):
                worst[call.entry] = max(worst.get(call.entry, 0.0), call.rel_error)
        within = (max_loss_change is None or change is None or validation.within(max_loss_change)) and (
            max_metric_drop is None or validation.metric_within(max_metric_drop))
        if within or not worst:
            validation.dropped = dropped
            candidate.validation = {**validation.summary(), "max_loss_change": max_loss_change}
            if max_metric_drop is not None:
                candidate.validation["max_metric_drop"] = max_metric_drop
            return candidate, validation
        target = max(worst, key=worst.get)
        old = next(e for e in entries if e.problem == target)
        limit = min(worst[target], old.measured.get("rel_error", worst[target])) * (1 - 1e-6)
        new = rechoose(target, limit) if rechoose is not None else None
        record = {"problem": target.describe(), "variant": old.choice["variant"], "params": old.choice["params"],
                  "worst_call_error": worst[target], "loss_change_before": change,
                  "loss_change_interval_before": None if change is None else list(validation.loss_change_interval),
                  "metric_drop_before": validation.metric_drop,
                  "metric_drop_interval_before": None if validation.metric_drop_interval is None
                  else list(validation.metric_drop_interval),
                  "metric": validation.metric,
                  "now": None if new is None else new.choice}
        dropped.append(record)
        if on_drop is not None:
            on_drop(record)
        entries = [e if e.problem != target else new for e in entries if e.problem != target or new is not None]
