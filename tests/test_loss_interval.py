"""The loss guard over several held-out batches: a paired mean change with a 95% interval, and the interval's
upper end, not one batch's change, decides the budget (validate, tune's re-choosing, the bundled factories)."""

from __future__ import annotations

import json
import re
import statistics
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner

from attn_tune import Problem
from attn_tune.cli.main import cli
from attn_tune.tuner.intervals import t_quantile
from attn_tune.tuner.guard import guard_config
from attn_tune.tuner.job import Guard
from attn_tune.tuner.validation import CallReport, Validation
from tests.runtime_helpers import config, entry

pytestmark = pytest.mark.usefixtures("no_config")

LM = Problem(batch=1, heads=4, q_len=2048, head_dim=32, causal=True)


def _budget(max_loss_change: float, max_metric_drop: float | None = None) -> Guard:
    return Guard(factory="planted", max_loss_change=max_loss_change, max_metric_drop=max_metric_drop)


def _validation(changes: list[float], calls: list[CallReport] | None = None) -> Validation:
    exact = [2.0 + i / 10 for i in range(len(changes))]
    return Validation("planted", calls or [], 0.0, exact, [e * (1 + c) for e, c in zip(exact, changes)], "targets")


@pytest.mark.parametrize("changes, within", [
    ([0.020, 0.021, 0.019, 0.020], False),     # a planted +2%: over a 1% budget
    ([0.001, 0.0012, -0.0008, 0.001], True),   # a planted +0.1%: within
    ([0.000, 0.016, 0.002, 0.014], False),     # mean +0.8% but noisy: the interval reaches past 1%
    ([0.0079, 0.0081, 0.0080, 0.0080], True),  # mean +0.8% and tight: within
])
def test_the_intervals_upper_end_decides_the_budget(changes, within) -> None:
    v = _validation(changes)
    assert v.loss_change == pytest.approx(statistics.fmean(changes))
    half = t_quantile(0.975, 3) * statistics.stdev(changes) / 2
    assert v.loss_change_interval == pytest.approx((v.loss_change - half, v.loss_change + half))
    assert v.within(0.01) is within
    summary = v.summary()
    assert summary["batches"] == 4 and summary["loss_change_interval"] == pytest.approx(list(v.loss_change_interval))


def test_a_nan_loss_or_metric_is_over_every_budget() -> None:
    """An approximation that makes the model's loss NaN must not pass the guard (NaN compares False both ways)."""
    from attn_tune.tuner.guard import broken_budgets

    v = _validation([0.001, float("nan"), 0.001, 0.001])
    assert not v.within(0.5)
    assert set(broken_budgets(v.summary(), _budget(0.5))) == {"loss"}
    v.metric, v.metrics_exact, v.metrics_tuned = "accuracy", [0.6] * 4, [0.6, float("nan"), 0.6, 0.6]
    assert set(broken_budgets(v.summary(), _budget(0.5, 0.5))) == {"loss", "metric"}


def test_one_batch_has_no_interval_and_its_change_decides() -> None:
    v = _validation([0.009])
    assert v.loss_change_interval == pytest.approx((0.009, 0.009)) and v.within(0.01) and not v.within(0.008)


class _Planted:
    """A validator whose runs give planted per-batch changes: noisy with the approximate entry, none without."""

    loss_from = "targets"

    def __init__(self, noisy: list[float]) -> None:
        self.noisy, self.seen, self.problem = noisy, [], LM

    def require_loss(self) -> None:
        pass

    def validate(self, candidate):
        self.seen.append([e.choice["variant"] for e in candidate.entries])
        if any(e.choice["variant"] == "local" for e in candidate.entries):
            call = CallReport(0, self.problem, "local", {"local_window": 128}, "own-entry", self.problem, 0.2)
            return _validation(self.noisy, [call])
        return _validation([0.0, 0.0001, -0.0001, 0.0])


def test_tune_chooses_again_when_the_interval_is_over_though_the_mean_is_within() -> None:
    tuned = config([entry(LM, "local", {"local_window": 128}, max_error=0.5)])
    kept, validation = guard_config(tuned, _Planted([0.000, 0.016, 0.002, 0.014]), _budget(0.01))
    assert [e.choice["variant"] for e in kept.entries] == []  # no study to choose from: dropped, sdpa serves it
    assert kept.validation["dropped"][0]["loss_change_interval_before"][1] > 0.01
    assert kept.validation["batches"] == 4 and validation.within(0.01)
    tight = guard_config(tuned, _Planted([0.0079, 0.0081, 0.0080, 0.0080]), _budget(0.01))[0]
    assert [e.choice["variant"] for e in tight.entries] == ["local"]


def test_a_training_entry_is_chosen_again_below_its_own_measured_error() -> None:
    """A training entry's measured error is the worst of out, dq, dk, dv (0.9 here); the guard's call error is the
    output's (0.2). The re-choice looks below 0.9, so a narrower-erring knob (gradients at 0.7) is still tried; an
    inference entry keeps the lower of the two."""
    asked: list[float] = []

    def rechoose(problem: Problem, limit: float):
        asked.append(limit)
        return None

    for problem, expected in ((replace(LM, training=True), 0.9), (LM, 0.2)):
        chosen = entry(problem, "local", {"local_window": 32}, max_error=1.0)
        chosen.measured["rel_error"] = 0.9
        validator = _Planted([0.05] * 4)
        validator.problem = problem
        guard_config(config([chosen]), validator, _budget(0.01), rechoose=rechoose)
        assert asked.pop() == pytest.approx(expected, rel=1e-5)  # just below it


def _validate(tmp_path: Path, window: int, batches: int, *extra: str):
    path = tmp_path / f"local{window}.json"
    chosen = entry(LM, "local", {"local_window": window}, max_error=1.0)
    config([chosen]).save(path)
    return CliRunner().invoke(cli, ["validate", "attn_tune.models:pretrained_lm", "--config", str(path),
                                    "--batches", str(batches), *extra])


@pytest.mark.slow
def test_the_bundled_lm_on_six_held_out_batches(tmp_path: Path) -> None:
    """The issue's measurement: local 128 is about +1.1% and over a 1% budget on its interval; local 256 about
    +0.5% and within it."""
    narrow = _validate(tmp_path, 128, 6, "--max-loss-change", "0.01", "--json")
    data = json.loads(narrow.stdout)
    assert narrow.exit_code == 1 and data["batches"] == 6 and len(data["loss_changes"]) == 6
    assert 0.005 < data["loss_change"] < 0.02 and data["loss_change_interval"][1] > 0.01
    wide = _validate(tmp_path, 256, 6, "--max-loss-change", "0.01")
    assert wide.exit_code == 0, wide.output
    assert "95% CI" in wide.stdout and "6 batches" in wide.stdout and "within the loss budget of +1.00%" in wide.stdout


def test_a_factory_without_batches_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    config([entry(LM, "sdpa")]).save(path)
    result = CliRunner().invoke(cli, ["validate", "attn_tune.models:causal_lm_example", "--config", str(path),
                                      "--batches", "3"])
    assert result.exit_code == 2
    assert result.output.strip() == ("Error: causal_lm_example takes no `batches` parameter, so it gives one batch: "
                                     "add `batches` and return a list of 3 inputs (and targets)")


def test_the_metric_drop_gets_its_interval_and_its_own_budget() -> None:
    v = _validation([0.001, 0.001, 0.001, 0.001])
    v.metric, v.metrics_exact, v.metrics_tuned = "accuracy", [0.60, 0.58, 0.61, 0.59], [0.590, 0.577, 0.600, 0.581]
    drops = [0.010, 0.003, 0.010, 0.009]
    assert v.metric_drops == pytest.approx(drops) and v.metric_drop == pytest.approx(statistics.fmean(drops))
    half = t_quantile(0.975, 3) * statistics.stdev(drops) / 2
    assert v.metric_drop_interval == pytest.approx((v.metric_drop - half, v.metric_drop + half))
    assert v.within(0.01) and not v.metric_within(0.01) and v.metric_within(0.02)
    assert v.summary()["metric"] == "accuracy" and v.summary()["metric_drop"] == pytest.approx(v.metric_drop)


class _PlantedMetric(_Planted):
    """Loss within budget either way; the approximate entry costs 1 accuracy point."""

    def require_metric(self) -> None:
        pass

    def validate(self, candidate):
        v = super().validate(candidate)
        approximate = any(e.choice["variant"] == "local" for e in candidate.entries)
        v.metric, v.metrics_exact = "accuracy", [0.6, 0.6, 0.6, 0.6]
        v.metrics_tuned = [0.59, 0.591, 0.589, 0.59] if approximate else [0.6, 0.6, 0.6, 0.6]
        return v


def test_tune_chooses_again_for_the_metric_when_the_loss_is_within() -> None:
    tuned = config([entry(LM, "local", {"local_window": 128}, max_error=0.5)])
    kept = guard_config(tuned, _PlantedMetric([0.001, 0.001, 0.001, 0.001]), _budget(0.01, 0.005))[0]
    assert kept.entries == [] and kept.validation["max_metric_drop"] == 0.005
    assert kept.validation["dropped"][0]["metric_drop_before"] == pytest.approx(0.01, abs=1e-3)
    assert guard_config(tuned, _PlantedMetric([0.001] * 4), _budget(0.01, 0.02))[0].entries != []


@pytest.mark.slow
def test_the_bundled_lm_reports_next_character_accuracy_and_guards_it(tmp_path: Path) -> None:
    strict = _validate(tmp_path, 256, 6, "--max-loss-change", "0.01", "--max-metric-drop", "0.005")
    assert strict.exit_code == 1  # +0.37 points on average, but the interval reaches past 0.5
    loss = re.search(r"loss \(targets\) exact ([0-9.]+),", strict.stdout)
    metric = re.search(r"metric character_accuracy: exact ([0-9.]+), tuned [0-9.]+, drop ([-+0-9.]+) ", strict.stdout)
    assert loss and metric, strict.stdout
    # the held-out text ships with the package, so these are the same on every Python; the tolerance is for float32
    # summation order (CPU, BLAS, threads): the loss moves by about 1e-6, and a near tie between two characters can
    # flip an argmax (one flip is 1/12288 of accuracy over 6 x 2048 characters); printed to 4 places. A change of the
    # text is larger: Python 3.11.2's own pydoc_data gave exact loss 1.4947 and drop +0.0033.
    assert float(loss.group(1)) == pytest.approx(1.4980, abs=2e-4)
    assert float(metric.group(1)) == pytest.approx(0.5816, abs=2.5e-4)
    assert float(metric.group(2)) == pytest.approx(0.0037, abs=2.5e-4)
    assert "within the loss budget" in strict.stdout and "over the metric budget of a 0.005 drop" in strict.stdout
    assert _validate(tmp_path, 256, 6, "--max-metric-drop", "0.01").exit_code == 0


def test_a_metric_budget_without_a_metric_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    config([entry(LM, "sdpa")]).save(path)
    result = CliRunner().invoke(cli, ["validate", "attn_tune.models:causal_lm_example", "--config", str(path),
                                      "--max-metric-drop", "0.01"])
    assert result.exit_code == 2 and result.output.startswith("Error: attn_tune.models:causal_lm_example gives no "
                                                              "metric: return it fourth from the factory")
    assert len(result.output.strip().splitlines()) == 1


def test_a_re_choice_says_which_budget_the_model_broke(tmp_path: Path) -> None:
    """The metric broke, the loss did not: the tune line names the metric's drop and its interval, `show` says
    "over the metric budget", and neither speaks of the loss."""
    from attn_tune.cli.guard_text import rechoice_line

    lines: list[str] = []
    tuned = config([entry(LM, "local", {"local_window": 128}, max_error=0.5)])
    guard = _budget(0.01, 0.005)
    kept = guard_config(tuned, _PlantedMetric([0.001] * 4), guard,
                        on_rechoice=lambda record: lines.append(rechoice_line(record, guard)))[0]
    (line,) = lines
    assert line.startswith("validate: accuracy drop +0.0100 (interval up to +0.01") and "is over 0.0050;" in line
    assert "loss change" not in line and "local(local_window=128)" in line and "sdpa serves it" in line
    kept.save(tmp_path / "c.json")
    shown = CliRunner().invoke(cli, ["show", str(tmp_path / "c.json")])
    assert shown.exit_code == 0 and "over the metric budget, " in shown.output
    assert "loss budget" not in shown.output


def test_targets_that_do_not_fit_the_output_are_one_line() -> None:
    """The factory's targets one position short of the logits: the user's mistake, named, not a traceback."""
    import torch

    from attn_tune.errors import UsersCodeError
    from attn_tune.tuner.validator import Validator

    def short_targets():
        return torch.nn.Identity(), (torch.randn(1, 8, 5),), torch.zeros(1, 7, dtype=torch.long)

    with pytest.raises(UsersCodeError) as raised:
        Validator(short_targets, "mymodels:short_targets")
    message = str(raised.value)
    assert message.startswith("the loss of mymodels:short_targets's output against its targets raised ValueError")
    assert "\n" not in message
