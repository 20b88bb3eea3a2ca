"""The tuning job: typed sections whose values are checked where the job is made, each default written once and
shown by the command line's help as it is written, and read back by a re-tune."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
from click.testing import CliRunner

from attn_tune import Problem
from attn_tune.cli.main import cli
from attn_tune.errors import AttnTuneError
from attn_tune.tuner.guard import guard_from_record
from attn_tune.tuner.job import INTERVAL_BATCHES, RETUNE_EFFORT, Effort, Execution, Guard, Search, TuneJob, default_text
from attn_tune.tuner.presets import PRESETS
from attn_tune.tuner.tune import tune


def test_tune_takes_the_problems_and_one_job() -> None:
    parameters = inspect.signature(tune).parameters
    assert len(parameters) <= 8 and list(parameters)[:2] == ["problems", "job"]


@pytest.mark.parametrize("make, message", [
    (lambda: Search(objective="speed"), "unknown objective 'speed'"),
    (lambda: Effort(trials=0), "trials must be positive, got 0"),
    (lambda: Effort(problem_timeout=-1.0), "problem_timeout must be positive"),
    (lambda: Execution(workers=2), "several workers share a study through a storage"),
    (lambda: Execution(workers=2, storage="sqlite:///x.db"), "several workers need a server storage"),
    (lambda: Guard(factory=None, max_loss_change=0.01), "a guard runs a model"),
    (lambda: TuneJob().updated(batches=4), "a guard runs a model"),
    (lambda: Guard(factory="m:f", batches=0), "batches must be positive"),
    (lambda: TuneJob(effort=Effort(timeout=5.0), execution=Execution(workers=2, storage="postgresql://h/db")),
     "time limits apply to one process"),
    (lambda: TuneJob().updated(trails=5), "a tuning job has no field 'trails'"),
    (lambda: Effort(trials=2.5), "trials must be a whole number, got 2.5"),
    (lambda: Search(memory_budget="2GiB"), "memory_budget must be a whole number of bytes, got '2GiB'"),
    (lambda: Search(max_error="0.3"), "max_error must be a number, got '0.3'"),
    (lambda: Search(variants="sdpa"), "variants is a list of variants or their names"),
    (lambda: TuneJob(search={"max_error": 0.3}), "a TuneJob's search is a Search, got dict"),
    (lambda: tune(Problem(batch=1, heads=2, q_len=8, head_dim=4), TuneJob()), "tune takes a list of Problem"),
    (lambda: tune([Problem(batch=1, heads=2, q_len=8, head_dim=4)], TuneJob(search=Search(variants=("sdpa", "nope")))),
     "unknown variant 'nope'"),
])
def test_a_bad_job_is_refused_in_one_line_where_it_is_made(make, message) -> None:
    with pytest.raises(AttnTuneError) as raised:
        make()
    assert message in str(raised.value) and "\n" not in str(raised.value)


def test_a_pool_may_name_its_variants() -> None:
    """Names (as the command line and presets give them) and variants alike; the config records names."""
    from tests.test_tune import TABLE, FakeMeasure

    problem = Problem(batch=1, heads=2, q_len=64, head_dim=16)
    config = tune([problem], TuneJob(search=Search(variants=("sdpa", "chunked")), effort=Effort(trials=4, rounds=1)),
                  measure_fn=FakeMeasure(TABLE))
    (entry,) = config.entries
    assert entry.settings["variants"] == ["sdpa", "chunked"]
    assert {c["variant"] for c in entry.candidates} <= {"sdpa", "chunked"}


def test_updated_sets_fields_by_name_in_their_sections_and_makes_a_guard_when_asked() -> None:
    job = TuneJob().updated(trials=5, max_error=0.3, seed=1, factory="m:f", batches=4)
    assert (job.effort.trials, job.search.max_error, job.execution.seed) == (5, 0.3, 1)
    assert job.guard == Guard(factory="m:f", batches=4)
    assert job.effort.rounds == Effort().rounds and TuneJob().guard is None  # the rest keeps its defaults


def test_the_help_shows_the_defaults_the_job_holds() -> None:
    """Help texts are generated from the dataclasses and the preset, so they cannot drift from the code."""
    quick = PRESETS["quick"].job
    shown = " ".join(CliRunner().invoke(cli, ["tune", "--help"], terminal_width=1000).output.split())
    assert f"[default: {Effort().trials}, stale only: {RETUNE_EFFORT.trials}, quick: {quick.effort.trials}]" in shown
    assert Guard(factory="m:f").batches is None  # the guard's own count: guard_batches
    assert (f"[default: {INTERVAL_BATCHES} when the factory takes `batches` (an interval), else 1, quick: "
            f"{quick.guard.batches}]") in shown
    assert f"[quick: {quick.guard.max_metric_drop}]" in shown and f"[default: {Search().objective}]" in shown
    assert default_text("trials") == f"[default: {Effort().trials}]"


def test_a_validation_record_gives_its_guard_back() -> None:
    guard = Guard(factory="m:f", batches=6, metric="m:top1", max_loss_change=0.01, max_metric_drop=0.005)
    record = {"factory": "m:f", "batches": 6, "metric_from": "m:top1", "max_loss_change": 0.01,
              "max_metric_drop": 0.005, "loss_change": 0.001}
    assert guard_from_record(record) == guard
    assert guard_from_record(None) is None and guard_from_record({"loss_change": 0.0}) is None


def test_jobs_are_values() -> None:
    """Frozen, its measurement settings read-only: a preset's job cannot be changed by the run that uses it."""
    job = PRESETS["quick"].job
    with pytest.raises(dataclasses.FrozenInstanceError):
        job.effort.trials = 1  # type: ignore[misc]
    with pytest.raises(TypeError):
        job.effort.trial_measure["min_repeats"] = 1  # type: ignore[index]
    assert hash(Search(max_error=0.1)) == hash(Search(max_error=0.1))  # a re-tune groups problems by their search
