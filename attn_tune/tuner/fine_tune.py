"""`FineTune`: the guard for training choices. The factory's model is fine-tuned twice from the same weights (same
training batches in the same order, same seed, same optimizer): once with exact attention, once with a config. Both
are then evaluated on held-out batches, the config's run served with the config and with exact attention, as paired
changes against the exact run. An inference pass never runs a training entry; this guard trains with it.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import inspect
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from attn_tune.errors import AttnTuneError, users_code
from attn_tune.measurement.inputs import relative_error
from attn_tune.measurement.memory import peak_bytes
from attn_tune.outputs import loss_tensor
from attn_tune.runtime import use_config
from attn_tune.runtime.capture import ModelRun, call_factory, observe
from attn_tune.tuned_config import TunedConfig
from attn_tune.tuner.headtohead import Ratio, ratio_interval
from attn_tune.tuner.validation import CallReport, Validation
from attn_tune.measurement.measure import synchronize
from attn_tune.tuner.validator import ModelGuard, NoLoss, call_report, entries_not_run, loss_figure
from attn_tune.tuner.validator import model_output as _output

__all__ = ["FineTune", "TrainingRun", "FineTuneValidation", "training_factory"]

Progress = Callable[[str, int, int], None]


STEP_ROUNDS = 7  # interleaved timing rounds of a training step, exact then the config, for the speed ratio


@dataclass
class TrainingRun:
    """One fine-tune: the loss of each step and the peak memory of one step (forward, backward, the optimizer's
    update) above what was live before it; `step_ms`, the median of its steps timed interleaved with the other
    run's (the two fine-tunes run one after the other, so their own step times would compare two moments)."""

    losses: list[float]
    peak_bytes: int
    step_ms: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"losses": self.losses, "step_ms": self.step_ms, "peak_bytes": self.peak_bytes}


@dataclass
class FineTuneValidation(Validation):
    """A `Validation` whose figures compare the model fine-tuned with the config (served with it) against the model
    fine-tuned with exact attention; `served_exact` is the config's fine-tune served with exact attention."""

    exact_run: TrainingRun | None = None
    tuned_run: TrainingRun | None = None
    served_exact: Validation | None = None
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "fine_tune": self.summary()["fine_tune"]}

    def summary(self) -> dict[str, Any]:
        record = super().summary()
        served = self.served_exact
        record["fine_tune"] = {
            **self.settings, "exact": self.exact_run.to_dict(), "tuned": self.tuned_run.to_dict(),
            "served_exact": None if served is None else {
                key: value for key, value in served.summary().items()
                if key.startswith(("loss", "metric")) and key not in ("loss_from", "metric_from")}}
        return record


class FineTune(ModelGuard):
    """The guard that trains. `validate(config)` fine-tunes with the config and compares with the exact fine-tune
    (run once, here); the user's code failing is one line, as the inference `Validator`'s."""

    def __init__(self, factory: Callable[..., Any], label: str = "", *, steps: int, batches: int = 1,
                 learning_rate: float = 1e-4, seed: int = 0, metric: Callable[[Any, Any], float] | None = None,
                 metric_from: str | None = None, progress: Progress | None = None) -> None:
        self.label = label or getattr(factory, "__name__", "factory")
        self.progress = progress or (lambda what, done, total: None)
        self.settings = {"steps": steps, "optimizer": "AdamW", "learning_rate": learning_rate, "seed": seed}
        self.train = users_code(self.label, lambda: call_factory(training_factory(factory, self.label), steps))
        self.heldout: ModelRun = users_code(self.label, lambda: call_factory(factory, batches))
        self.metric = metric or self.heldout.metric
        self.metric_from = metric_from if metric is not None else None
        self.start = copy.deepcopy(self.train.model.state_dict())
        self.exact_run = self._fine_tune(None, "exact attention")
        self.exact = self._evaluate(None, "the exact fine-tune")
        self.loss_from = self.exact["loss_from"]

    @property
    def batches(self) -> int:
        return len(self.heldout.batches)

    def validate(self, config: TunedConfig | str | Any) -> FineTuneValidation:
        """Fine-tune with `config` from the same start; its held-out figures served with the config and with exact
        attention, each against the exact fine-tune's, batch by batch."""
        calls: list[CallReport] = []
        exact_ms, tuned_ms, speed = self._step_times(config)
        tuned_run = self._fine_tune(config, "the config", calls)
        tuned_run.step_ms = statistics.median(tuned_ms)
        trained_with = sum(c.entry is not None for c in calls)  # the training step's calls an entry served
        exact_run = dataclasses.replace(self.exact_run, step_ms=statistics.median(exact_ms))
        used = {c.entry for c in calls}
        with observe(lambda call: used.add(call.decision.entry)):
            served = self._evaluate(config, "the config's fine-tune", calls)
        plain = self._evaluate(None, "the config's fine-tune, served exact")
        exact = self.exact
        served_exact = Validation(self.label, [], plain["output_error"], exact["losses"], plain["losses"],
                                  self.loss_from, metric=self.metric_name, metrics_exact=exact["metrics"],
                                  metrics_tuned=plain["metrics"])
        return FineTuneValidation(
            self.label, calls, served["output_error"], exact["losses"], served["losses"], self.loss_from,
            metric=self.metric_name, metric_from=self.metric_from, metrics_exact=exact["metrics"],
            metrics_tuned=served["metrics"], exact_run=exact_run, tuned_run=tuned_run, served_exact=served_exact,
            settings={**self.settings, "step_speedup": speed.to_dict(), "calls_served_by_entries": trained_with},
            entries_not_run=entries_not_run(config, used))

    def _step_times(self, config: Any) -> tuple[list[float], list[float], Ratio]:
        """A training step (forward and backward of the first training batch, from the start weights, no update)
        timed with exact attention and with `config`, interleaved over STEP_ROUNDS rounds after one untimed step
        each: the medians, and exact's time over the config's with its 95% interval (> 1: the config is faster)."""
        model = self.train.model
        model.load_state_dict(self.start)
        model.train()
        times: dict[Any, list[float]] = {None: [], "config": []}

        def step() -> None:
            model.zero_grad(set_to_none=True)
            self._training_loss(0).backward()

        device = _device(model)
        for round_ in range(STEP_ROUNDS + 1):
            for key in times:
                with use_config(config if key else None):
                    synchronize(device)
                    started = time.perf_counter()
                    users_code(self.label, step)
                    synchronize(device)
                    if round_:  # the first round warms both up
                        times[key].append((time.perf_counter() - started) * 1e3)
            self.progress(f"{self.label}: training steps timed, exact and with the config", round_ + 1, STEP_ROUNDS + 1)
        model.zero_grad(set_to_none=True)
        return times[None], times["config"], ratio_interval([e / c for e, c in zip(times[None], times["config"])])

    def _training_loss(self, i: int) -> torch.Tensor:
        """The loss of training batch `i`, ready for backward; a model that gives none, or one no weight of which
        can learn, is one line (a usage error, as `tune --training`'s capture says it), not the model failing."""
        _, _, targets = self.train.batches[i]
        loss, _ = loss_tensor(self.train.run(i), targets)
        if loss is None:
            raise NoLoss(f"{self.label} gives no loss to train on: return targets third from the factory, or give the "
                         'model an output with a "loss" (docs/training.md)')
        if not loss.requires_grad:
            raise NoLoss(f"{self.label}: the model's loss does not require grad (no weight of it trains), so a "
                         "training step cannot run backward")
        return loss

    def _fine_tune(self, config: Any, what: str, calls: list[CallReport] | None = None) -> TrainingRun:
        """The model from the start weights, trained one step per training batch with `config` in use (None:
        exact). The first step's peak memory is measured and its attention calls reported (each one's error
        against exact attention on its own inputs)."""
        model = self.train.model
        model.load_state_dict(self.start)
        model.zero_grad(set_to_none=True)  # freed now, not inside the profiled first step
        model.train()
        torch.manual_seed(self.settings["seed"])
        optimizer = torch.optim.AdamW(model.parameters(), lr=self.settings["learning_rate"])
        losses, peak = [], 0
        steps = len(self.train.batches)

        def step(i: int) -> None:
            optimizer.zero_grad(set_to_none=True)
            loss = self._training_loss(i)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))

        with use_config(config):
            for i in range(steps):
                # the first step's peak (optimizer state included); the calls' errors are read in the next step (in
                # the first only when there is one), so their float64 references never count in the peak
                seen = contextlib.nullcontext() if calls is None or i != min(1, steps - 1) else \
                    observe(lambda call: calls.append(call_report(call, len(calls))))
                with seen:
                    if i == 0:
                        peak = users_code(self.label, lambda: peak_bytes(lambda: step(0), _device(model)))
                    else:
                        users_code(self.label, lambda i=i: step(i))
                self.progress(f"{self.label}: fine-tune steps with {what}", i + 1, steps)
        model.eval()
        self.heldout.model = model
        return TrainingRun(losses, peak)

    def _evaluate(self, config: Any, what: str, calls: list[CallReport] | None = None) -> dict[str, Any]:
        """Held-out loss, metric and output of the model last fine-tuned, each batch, with `config` in use (None:
        exact attention); the output's error is against the exact fine-tune's. The first batch's attention calls
        are reported to `calls` (the config's inference entries run here, its training entries in the steps)."""
        losses, metrics, errors, outputs = [], [], [], []
        loss_from, against = None, self.exact["outputs"] if hasattr(self, "exact") else None  # set after the first
        with use_config(config), torch.no_grad():
            for i, (_, _, targets) in enumerate(self.heldout.batches):
                seen = contextlib.nullcontext() if calls is None or i > 0 else \
                    observe(lambda call: calls.append(call_report(call, len(calls))))
                with seen:
                    out = users_code(self.label, lambda i=i: self.heldout.run(i))
                loss, loss_from = loss_figure(out, targets, self.label)
                losses.append(loss)
                metrics.append(self._score(out, targets))
                outputs.append(_output(out).detach())
                if against is not None:
                    errors.append(relative_error(outputs[-1], against[i].double()))
                self.progress(f"{self.label}: held-out batches of {what}", i + 1, self.batches)
        return {"losses": None if loss_from is None else losses, "loss_from": loss_from, "outputs": outputs,
                "metrics": None if self.metric is None else metrics, "output_error": max(errors, default=0.0)}


def training_factory(factory: Callable[..., Any], label: str) -> Callable[..., Any]:
    """The factory asked for training batches (`split="train"`); one that cannot give them is one line, said before
    anything is captured or tuned."""
    try:
        takes = "split" in inspect.signature(factory).parameters
    except (TypeError, ValueError):
        takes = False
    if not takes:
        raise AttnTuneError(f"{label} takes no `split` parameter, so it cannot give training batches for the "
                            "fine-tune: add split='train' (and `batches`) to it (docs/training.md)")
    return functools.partial(factory, split="train")


def _device(model: Any) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))
