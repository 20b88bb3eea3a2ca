"""What a config did to one model (`Validation`): each attention call's variant and error, the output's error, and
per held-out batch the loss and the task metric with exact attention and with the config, as paired changes with
their 95% intervals; and what a config records of it (`summary`)."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any

from attn_tune.errors import AttnTuneError
from attn_tune.problem import Problem
from attn_tune.registry.catalog import get_variant
from attn_tune.tuner.intervals import interval, mean, upper_within

__all__ = ["CallReport", "Validation", "is_exact"]


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
    entries_not_run: list[str] = field(default_factory=list)  # config entries no call of this run used (described)

    @property
    def metric_drops(self) -> list[float] | None:
        """Per batch, exact - tuned: +0.004 is an accuracy 0.4 points lower with the config."""
        if self.metrics_exact is None or self.metrics_tuned is None:
            return None
        return [e - t for e, t in zip(self.metrics_exact, self.metrics_tuned)]

    @property
    def metric_drop(self) -> float | None:
        return mean(self.metric_drops)

    @property
    def metric_drop_interval(self) -> tuple[float, float] | None:
        """The 95% confidence interval of the mean metric drop (paired, Student's t); one batch: (mean, mean)."""
        return interval(self.metric_drops)

    def metric_within(self, max_metric_drop: float) -> bool:
        """Whether the metric drop's interval lies within the budget (its upper end decides)."""
        return upper_within(self.metric_drop_interval, max_metric_drop)

    @property
    def loss_exact(self) -> float | None:
        return mean(self.losses_exact)

    @property
    def loss_tuned(self) -> float | None:
        return mean(self.losses_tuned)

    @property
    def changes(self) -> list[float] | None:
        """Per batch, (tuned - exact) / exact: +0.01 is a loss 1% higher with the config."""
        if self.losses_exact is None or self.losses_tuned is None:
            return None
        return [(t - e) / abs(e) if e else float("inf") for e, t in zip(self.losses_exact, self.losses_tuned)]

    @property
    def loss_change(self) -> float | None:
        """The mean relative loss change over the batches."""
        return mean(self.changes)

    @property
    def loss_change_interval(self) -> tuple[float, float] | None:
        """The 95% confidence interval of the mean change (paired, Student's t); one batch: (mean, mean)."""
        return interval(self.changes)

    def within(self, max_loss_change: float) -> bool:
        """Whether the loss change's interval lies within the budget (its upper end, not its mean, decides)."""
        return upper_within(self.loss_change_interval, max_loss_change)

    @property
    def batches(self) -> int:
        return len(self.losses_exact or self.metrics_exact or [None])

    def _loss_fields(self) -> dict[str, Any]:
        bounds = self.loss_change_interval
        fields = {"loss_exact": self.loss_exact, "loss_tuned": self.loss_tuned, "loss_change": self.loss_change,
                  "loss_change_interval": None if bounds is None else list(bounds), "batches": self.batches}
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
                **self._loss_fields(), "loss_changes": self.changes, "calls": [c.to_dict() for c in self.calls],
                "entries_not_run": list(self.entries_not_run)}
        if self.dropped:
            data["dropped"] = self.dropped
        return data

    def summary(self) -> dict[str, Any]:
        """What the config records of its validation."""
        approximate = [c for c in self.calls if not is_exact(c.variant)]
        record = {"factory": self.factory, "loss_from": self.loss_from, **self._loss_fields(),
                  "output_rel_error": self.output_error, "calls": len(self.calls),
                  "approximate_calls": len(approximate), "dropped": self.dropped}
        if self.entries_not_run:
            record["entries_not_run"] = list(self.entries_not_run)
        return record


def is_exact(variant: str) -> bool:
    """Whether the named variant is exact (a name not registered here counts as approximate)."""
    try:
        return get_variant(variant).exact
    except AttnTuneError:
        return False
