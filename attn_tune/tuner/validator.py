"""`Validator`: a factory's model run once with exact attention on each held-out batch, then with a config, and
compared (`Validation`).

The loss is the model's own (an output with a `loss` tensor, as Hugging Face models return given labels), else
cross-entropy of the output logits against integer targets the factory returns third (positions holding -100
ignored), or mean squared error against float targets. The task metric is the factory's fourth item or one given.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from attn_tune.errors import AttnTuneError, users_code
from attn_tune.measurement.inputs import exact_attention, relative_error
from attn_tune.outputs import IGNORE_INDEX, first_tensor, loss_tensor
from attn_tune.runtime import dispatch, use_config
from attn_tune.runtime.capture import ModelRun, call_factory, observe
from attn_tune.tuned_config import TunedConfig
from attn_tune.tuner.intervals import mean
from attn_tune.tuner.validation import CallReport, Validation

__all__ = ["ModelGuard", "Validator", "NoLoss", "loss_figure", "IGNORE_INDEX", "call_report", "model_output", "entries_not_run"]


class NoLoss(AttnTuneError):
    """A budget was asked of a model without the figure: no loss (no targets, no `loss` output), or no metric."""


def model_output(out: Any) -> torch.Tensor:
    """The tensor a model's output is compared by: its first."""
    found = first_tensor(out)
    if found is None:
        raise AttnTuneError("the model's output holds no tensor to compare")
    return found


def loss_figure(out: Any, targets: Any, label: str) -> tuple[float | None, str | None]:
    """The loss and where it came from; targets that do not fit the output are the user's, said in one line."""
    return users_code(f"the loss of {label}'s output against its targets",
                      lambda: _loss_of(out, targets))


def _loss_of(out: Any, targets: Any) -> tuple[float | None, str | None]:
    loss, source = loss_tensor(out, targets)
    return (None if loss is None else float(loss)), source


def entries_not_run(config: Any, used: set[Any]) -> list[str]:
    """The config's entries whose problems are not in `used` (the entries a run's calls used): a training entry in
    an inference pass, say. A validation says so rather than report on them."""
    if not isinstance(config, TunedConfig):
        return []
    return [e.problem.describe() for e in config.entries if e.problem not in used]


def call_report(call: dispatch.Call, number: int) -> CallReport:
    """What the validated run reports of one attention call: its variant, the rule that found it, its error
    against float64 exact attention on its own inputs."""
    d = call.decision
    return CallReport(number, call.problem, d.variant, dict(d.params), d.rule, d.entry, _call_error(call))


def _call_error(call: dispatch.Call) -> float:
    inputs = call.inputs
    ref = exact_attention(inputs.q, inputs.k, inputs.v, **inputs.call_kwargs(call.problem))
    return relative_error(call.out, ref)


class ModelGuard:
    """What the guards share: a model named `label` whose loss (`loss_from`) and `metric` are budgeted; a budget it
    has no figure for is refused in one line, and the metric is read as a number."""

    label: str
    loss_from: str | None
    metric: Callable[[Any, Any], float] | None

    @property
    def metric_name(self) -> str | None:
        return None if self.metric is None else getattr(self.metric, "__name__", "metric")

    def _score(self, out: Any, targets: Any) -> float | None:
        if self.metric is None:
            return None
        value = users_code(f"the metric {self.metric_name}", lambda: self.metric(out, targets))
        try:
            return float(value)
        except (TypeError, ValueError):
            raise AttnTuneError(f"the metric {self.metric_name} returned {type(value).__name__}, not a number") from None

    def require_loss(self) -> None:
        """Raise NoLoss unless the model has a loss to budget."""
        if self.loss_from is None:
            raise NoLoss(f"{self.label} gives no loss: return (model, example_inputs, targets) from the factory, or "
                         'a model output with a "loss" (docs/validation.md)')

    def require_metric(self) -> None:
        """Raise NoLoss unless there is a metric to budget."""
        if self.metric is None:
            raise NoLoss(f"{self.label} gives no metric: return it fourth from the factory (a function of "
                         "(outputs, targets), higher is better), or pass --metric MODULE:FN")


class Validator(ModelGuard):
    """A factory's model run once with exact attention (on each of `batches` held-out batches);
    `validate(config)` runs it with a config and compares. The user's code failing is one line."""

    def __init__(self, factory: Callable[..., Any], label: str = "", batches: int = 1,
                 metric: Callable[[Any, Any], float] | None = None, metric_from: str | None = None,
                 progress: Callable[[str, int, int], None] | None = None) -> None:
        """`metric` replaces the factory's own (its fourth item); `metric_from` names where it came from
        (MODULE:FN), recorded in the config so that a re-tune validates with the same metric. `progress(what,
        done, total)` hears of each batch run."""
        self.label = label or getattr(factory, "__name__", "factory")
        self.progress = progress or (lambda what, done, total: None)
        self.built: ModelRun = users_code(self.label, lambda: call_factory(factory, batches))
        self.built.model.eval()
        self.metric = metric or self.built.metric
        self.metric_from = metric_from if metric is not None else None
        self.exact_outputs: list[torch.Tensor] = []
        losses, metrics = [], []
        with use_config(None), torch.no_grad():
            for i, (_, _, targets) in enumerate(self.built.batches):
                out = users_code(self.label, lambda i=i: self.built.run(i))
                self.progress(f"{self.label}: batches with exact attention", i + 1, self.batches)
                self.exact_outputs.append(model_output(out).detach())
                loss, self.loss_from = loss_figure(out, targets, self.label)
                losses.append(loss)
                metrics.append(self._score(out, targets))
        self.losses_exact = None if self.loss_from is None else losses
        self.metrics_exact = None if self.metric is None else metrics

    @property
    def batches(self) -> int:
        return len(self.built.batches)

    @property
    def loss_exact(self) -> float | None:
        """The exact model's loss, the mean over the batches."""
        return mean(self.losses_exact)

    def validate(self, config: TunedConfig | str | Any) -> Validation:
        """Run the model with `config` on every batch: each call's variant and error, the output's, the loss's."""
        calls: list[CallReport] = []

        def seen(call: dispatch.Call) -> None:
            calls.append(call_report(call, len(calls)))

        errors, losses, metrics = [], [], []
        with use_config(config), torch.no_grad(), observe(seen):
            for i, (_, _, targets) in enumerate(self.built.batches):
                out = users_code(self.label, lambda i=i: self.built.run(i))
                self.progress(f"{self.label}: batches with the config", i + 1, self.batches)
                errors.append(relative_error(model_output(out), self.exact_outputs[i].double()))
                losses.append(loss_figure(out, targets, self.label)[0])
                metrics.append(self._score(out, targets))
        return Validation(self.label, calls, max(errors), self.losses_exact,
                          None if self.losses_exact is None else losses, self.loss_from,
                          metric=self.metric_name, metric_from=self.metric_from, metrics_exact=self.metrics_exact,
                          metrics_tuned=None if self.metric is None else metrics,
                          entries_not_run=entries_not_run(config, {c.entry for c in calls}))
