"""The training guard: a paired fine-tune (exact attention vs a config, same weights, batches, order, seed and
optimizer), its held-out figures served with the config and exact, its record, and the commands that run it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from attn_tune import Problem
from attn_tune.cli.main import cli
from attn_tune.errors import AttnTuneError
from attn_tune.runtime.capture import load_factory
from attn_tune.tuned_config import load_config
from attn_tune.tuner.fine_tune import FineTune
from attn_tune.tuner.guard import build_validator, guard_config, guard_from_record
from attn_tune.tuner.job import Guard
from attn_tune.tuner.validator import Validator
from tests.runtime_helpers import config, entry

FACTORIES = '''
from attn_tune.models import pretrained_lm

def lm(batches=None, split="heldout"):
    """The bundled LM at 128 characters: `batches` batches of the split (train or held-out), or one batch."""
    return pretrained_lm(length=128, batches=batches, split=split)[:3]

def top1(logits, targets):
    return float((logits.argmax(-1) == targets).float().mean())

def no_split(batches=None):
    return lm(batches)

def frozen(batches=None, split="heldout"):
    model, inputs, targets = lm(batches, split)
    model.requires_grad_(False)
    return model, inputs, targets
'''
TRAINING = Problem(batch=1, heads=4, q_len=128, head_dim=32, causal=True, training=True)
SERVING = Problem(batch=1, heads=4, q_len=128, head_dim=32, causal=True)
HARMFUL = {"local_window": 2}  # two keys per query: far from exact attention

pytestmark = pytest.mark.usefixtures("no_config")


@pytest.fixture
def models(tmp_path, monkeypatch):
    (tmp_path / "ft_models.py").write_text(FACTORIES)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], prog_name="attn-tune")


def _fine_tune(**kwargs) -> FineTune:
    return FineTune(load_factory("ft_models:lm"), "ft_models:lm", steps=3, batches=2, learning_rate=3e-3,
                    metric=load_factory("ft_models:top1"), **kwargs)


def test_an_exact_config_fine_tunes_to_the_very_same_model(models: Path) -> None:
    """Same start, batches, order, seed and optimizer: a config that keeps exact attention reproduces the exact
    fine-tune step for step, so any difference a config makes is the config's."""
    guard = _fine_tune()
    same = guard.validate(config([entry(TRAINING, "sdpa"), entry(SERVING, "sdpa")]))
    record = same.summary()["fine_tune"]
    assert record["exact"]["losses"] == record["tuned"]["losses"] and len(record["tuned"]["losses"]) == 3
    assert record["exact"]["losses"][0] != record["exact"]["losses"][-1]  # it trained
    assert same.loss_change == 0.0 and same.metric_drop == 0.0 and same.batches == 2
    assert record["served_exact"]["loss_change"] == 0.0
    assert record["exact"]["peak_bytes"] > 0 and record["steps"] == 3 and record["optimizer"] == "AdamW"


@pytest.mark.slow
def test_a_harmful_training_entry_changes_the_fine_tune_and_the_guard_rechooses_it(models: Path) -> None:
    """A two-key window used in training: the curves part, the held-out loss rises, and the budget drops it."""
    guard = _fine_tune()
    bad = config([entry(TRAINING, "local", HARMFUL, max_error=10.0), entry(SERVING, "local", HARMFUL, max_error=10.0)])
    checked = guard.validate(bad)
    record = checked.summary()["fine_tune"]
    assert record["exact"]["losses"][0] != record["tuned"]["losses"][0]  # the first step's forward already differs
    assert checked.loss_change > 0.01 and [c.variant for c in checked.calls] == ["local"] * 8  # 4 layers: a step, a batch
    assert record["served_exact"]["loss_change"] != checked.loss_change  # served exact: another figure, both kept
    fitted, after = guard_config(bad, guard, Guard(factory="ft_models:lm", fine_tune_steps=3, max_loss_change=0.001))
    assert {d["variant"] for d in after.dropped} == {"local"} and after.loss_change == 0.0
    assert fitted.validation["fine_tune"]["steps"] == 3


def test_an_inference_validation_says_which_entries_it_never_ran(models: Path) -> None:
    """A training entry is never run by an inference pass: the record says so instead of reporting 0 of N calls."""
    from attn_tune.cli.guard_text import summary_line

    validation = Validator(load_factory("ft_models:lm"), "ft_models:lm").validate(
        config([entry(TRAINING, "local", HARMFUL, max_error=10.0)]))
    summary = validation.summary()
    assert summary["entries_not_run"] == [TRAINING.describe()] and summary["approximate_calls"] == 0
    assert "never ran in it" in summary_line(summary) and "validate --training" in summary_line(summary)
    assert validation.to_dict()["entries_not_run"] == [TRAINING.describe()]  # validate --json says so too


def test_a_factory_without_a_training_split_is_one_line(models: Path) -> None:
    with pytest.raises(AttnTuneError, match="takes no `split` parameter"):
        build_validator(Guard(factory="ft_models:no_split", fine_tune_steps=2))
    result = run("validate", "ft_models:no_split", "--config", _saved(config([])), "--training")
    assert result.exit_code == 2 and "takes no `split` parameter" in result.output and "Traceback" not in result.output
    alone = run("validate", "ft_models:lm", "--config", "c.json", "--fine-tune-steps", "3")
    assert alone.exit_code == 2 and "go with --training" in alone.output
    rate = run("tune", "ft_models:lm", "--learning-rate", "0.01", "--out", "t.json")  # an inference guard has none
    assert rate.exit_code == 2 and "--learning-rate is the fine-tune's" in rate.output and not Path("t.json").exists()


def test_a_factory_that_cannot_train_is_refused_before_its_capture(models: Path) -> None:
    """No `split`: refused before the model runs (nothing captured, nothing written); a model none of whose
    weights trains: a usage error naming the loss, from `tune` and from `validate --training` alike."""
    refused = run("tune", "ft_models:no_split", "--training", "--out", "t.json")
    assert refused.exit_code == 2 and "takes no `split` parameter" in refused.output
    assert "captured" not in refused.output and "docs/training.md" in refused.output
    assert not any(models.glob("t.*"))
    frozen = run("validate", "ft_models:frozen", "--config", _saved(config([])), "--training", "--fine-tune-steps", "2",
                 "--batches", "2")
    assert frozen.exit_code == 2 and "does not require grad" in frozen.output and "raised" not in frozen.output
    assert "Traceback" not in frozen.output


def test_a_training_validation_of_a_config_without_training_entries_says_both_trained_alike(models: Path) -> None:
    """An inference-only config changes nothing in the fine-tune: the record and the lines say so, and the step
    times of two identical runs are read as no difference unless their interval excludes 1."""
    from attn_tune.cli.guard_text import fine_tune_lines

    record = _fine_tune().validate(config([entry(SERVING, "sdpa")])).summary()
    assert record["fine_tune"]["calls_served_by_entries"] == 0
    lines = fine_tune_lines(record)
    assert any("both fine-tunes trained with exact attention" in line for line in lines)
    speed = record["fine_tune"]["step_speedup"]
    same = speed["low"] <= 1.0 <= speed["high"]
    assert ("no difference measured" in lines[0]) == same and ("x as fast [" in lines[0]) != same
    trained = _fine_tune().validate(config([entry(TRAINING, "sdpa")])).summary()
    assert trained["fine_tune"]["calls_served_by_entries"] == 4  # the 4 layers' calls of the observed step
    assert not any("trained with exact attention" in line for line in fine_tune_lines(trained))


def test_a_fine_tune_guard_round_trips_through_its_record() -> None:
    guard = guard_from_record({"factory": "m:f", "batches": 3, "fine_tune": {"steps": 7, "learning_rate": 0.002}})
    assert (guard.fine_tune_steps, guard.learning_rate, guard.batches) == (7, 0.002, 3)
    assert guard_from_record({"factory": "m:f"}).fine_tune_steps is None


@pytest.mark.slow
def test_validate_training_reports_both_fine_tunes(models: Path) -> None:
    path = _saved(config([entry(TRAINING, "local", HARMFUL, max_error=10.0)]))
    result = run("validate", "ft_models:lm", "--config", path, "--training", "--fine-tune-steps", "3",
                 "--batches", "2", "--metric", "ft_models:top1", "--max-loss-change", "0.001")
    assert result.exit_code == 1, result.output  # over the budget
    assert "fine-tune 3 steps (AdamW, lr 0.0001, seed 0) from the factory's weights: step" in result.stdout
    assert "the config's fine-tune served with exact attention: loss change" in result.stdout
    data = json.loads(run("validate", "ft_models:lm", "--config", path, "--training", "--fine-tune-steps", "2",
                          "--batches", "2", "--json").stdout)
    assert len(data["fine_tune"]["tuned"]["losses"]) == 2 and data["fine_tune"]["served_exact"]["loss_change"] != 0


@pytest.mark.slow
def test_tune_a_factory_for_training_in_one_command(models: Path) -> None:
    """Capture a training step, tune forward + backward with errors on its calls and their gradients, guard by
    the paired fine-tune, write the config, its report and the fine-tune's curves."""
    result = run("tune", "ft_models:lm", "--training", "--max-error", "10", "--variant", "sdpa", "--variant", "local",
                 "--trials", "3", "--fine-tune-steps", "3", "--batches", "2", "--max-loss-change", "0.5",
                 "--out", "tuned.json")
    assert result.exit_code == 0, result.output
    assert "captured 1 problem of a training step of ft_models:lm" in result.stdout
    assert "causal training: " in result.stdout and "fine-tune 3 steps" in result.stdout
    tuned = load_config("tuned.json")
    assert [e.problem.training for e in tuned.entries] == [True]
    assert tuned.validation["fine_tune"]["steps"] == 3 and len(tuned.validation["fine_tune"]["exact"]["losses"]) == 3
    assert Path("tuned.fine-tune.png").read_bytes()[:4] == b"\x89PNG" and Path("tuned.report.png").is_file()
    shown = run("show", "tuned.json")
    assert "fine-tune 3 steps" in shown.stdout and "after the paired fine-tune" in shown.stdout


def _saved(made) -> str:
    made.save("c.json")
    return "c.json"


@pytest.mark.slow
def test_tuning_training_problems_guards_by_training_whatever_the_job_says(models: Path) -> None:
    """A guard given without fine-tune steps, tuning training problems: it fine-tunes (an inference pass would never
    run the training entries); tuning inference problems, the same guard runs inference."""
    from attn_tune.tuner.tune import tune
    from tests.jobs import job

    light = {"warmup": 0, "min_repeats": 1, "min_time_s": 0}
    tuned = tune([TRAINING], job(variants=("sdpa",), trials=1, rounds=0, trial_measure=light, final_measure=light,
                                 factory="ft_models:lm", batches=2))
    assert tuned.validation["fine_tune"]["steps"] == 20 and tuned.validation["calls"] > 0
    served = tune([SERVING], job(variants=("sdpa",), trials=1, rounds=0, trial_measure=light, final_measure=light,
                                 factory="ft_models:lm", batches=2))
    assert "fine_tune" not in served.validation
