"""The tuner with an injected measurement (as triton's autotuner injects do_bench), and once for real."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, IntDistribution

import attn_tune
from attn_tune import Problem, Variant
from attn_tune.families.dense import dense_attention
from attn_tune.measurement.measure import Measurement
from attn_tune.tuned_config import load_config
from attn_tune.tuner.space import eligible_variants, space_size
from attn_tune.tuner.storage import HEARTBEAT_ENV
from attn_tune.tuner.tune import tune
from tests.jobs import job

PROBLEM = Problem(batch=1, heads=2, q_len=64, head_dim=16)
MiB = 2**20


def _variant(name: str, exact: bool = True, space=None) -> Variant:
    return Variant(name=name, family="dense", fn=dense_attention, exact=exact,
                   space=space or (lambda p: {}))


class FakeMeasure:
    """Figures from a table keyed by (variant, params); every call is logged with its phase."""

    def __init__(self, table, *, final_table=None, fail=()):
        self.table, self.final_table, self.fail = table, final_table or {}, set(fail)
        self.calls: list[tuple[str, str, dict]] = []

    def __call__(self, variant, problem, params, **kwargs):
        phase = kwargs.get("phase", "trial")
        self.calls.append((phase, variant.name, dict(params)))
        if variant.name in self.fail:
            raise RuntimeError("CUDA out of memory. Tried to allocate 8.00 GiB")
        key = (variant.name, tuple(sorted(params.items())))
        latency, peak, error = (self.final_table if phase == "final" else {}).get(key) or self.table[key]
        return Measurement(latency_ms=latency, latency_iqr_ms=0.01, peak_bytes=peak, rel_error=error, repeats=5)

    def trial_points(self):
        return [(name, tuple(sorted(p.items()))) for phase, name, p in self.calls if phase == "trial"]


KNOB = lambda p: {"k": CategoricalDistribution([1, 2, 3, 4, 5, 6, 7, 8])}  # noqa: E731
POOL = [_variant("sdpa"), _variant("slow"), _variant("knobby", space=KNOB)]
TABLE = {("sdpa", ()): (5.0, 1 * MiB, 1e-7), ("slow", ()): (20.0, 1 * MiB, 1e-7)}
TABLE.update({("knobby", (("k", k),)): (2.0 + abs(k - 5), 4 * MiB, 1e-7) for k in range(1, 9)})
FINAL = {"final_measure": {"phase": "final"}, "rounds": 2}


def test_small_space_is_enumerated_and_the_known_best_found() -> None:
    fake = FakeMeasure(TABLE)
    config = tune([PROBLEM], job(trials=50, variants=POOL, seed=1, **FINAL), measure_fn=fake)
    (entry,) = config.entries
    assert entry.choice == {"variant": "knobby", "params": {"k": 5}}
    assert entry.measured["latency_ms"] == 2.0
    points = fake.trial_points()
    assert len(points) == len(set(points)) == 10  # every point once, none twice, no more than exist
    assert entry.trials == 10
    assert entry.baseline_latency_ms() == 5.0


def test_large_space_is_sampled_within_the_budget() -> None:
    wide = _variant("wide", space=lambda p: {"k": IntDistribution(1, 400)})
    table = {("sdpa", ()): (5.0, MiB, 1e-7)}
    table.update({("wide", (("k", k),)): (1.0 + abs(k - 300) / 50, MiB, 1e-7) for k in range(1, 401)})
    fake = FakeMeasure(table)
    config = tune([PROBLEM], job(trials=30, variants=[POOL[0], wide], seed=3, **FINAL), measure_fn=fake)
    assert config.entries[0].trials == 30
    measured = fake.trial_points()
    assert len(measured) == len(set(measured)) <= 30  # a point the sampler proposes again is not measured again
    assert config.entries[0].choice["variant"] == "wide"  # better than sdpa's 5 ms somewhere in 400 values
    assert config.entries[0].measured["latency_ms"] < 5.0


def test_approximate_variants_only_within_max_error() -> None:
    pool = POOL + [_variant("approx", exact=False)]
    table = {**TABLE, ("approx", ()): (0.5, MiB, 0.05)}
    exact_only = tune([PROBLEM], job(trials=50, variants=pool, **FINAL), measure_fn=FakeMeasure(table)).entries[0]
    assert exact_only.choice["variant"] == "knobby"
    assert {"variant": "approx", "status": "unsupported",
            "reason": "approximate: takes part only when a max_error is given"} in exact_only.candidates
    loose = tune([PROBLEM], job(trials=50, max_error=0.1, variants=pool, **FINAL), measure_fn=FakeMeasure(table)).entries[0]
    assert loose.choice["variant"] == "approx" and loose.max_error == 0.1
    strict = tune([PROBLEM], job(trials=50, max_error=0.01, variants=pool, **FINAL), measure_fn=FakeMeasure(table)).entries[0]
    assert strict.choice["variant"] == "knobby"
    (approx,) = [c for c in strict.candidates if c["variant"] == "approx"]
    assert approx["status"] == "excluded" and "above max_error" in approx["reason"]


def test_memory_budget_excludes_what_does_not_fit() -> None:
    entry = tune([PROBLEM], job(trials=50, memory_budget=2 * MiB, variants=POOL, **FINAL), measure_fn=FakeMeasure(TABLE)).entries[0]
    assert entry.choice["variant"] == "sdpa"  # knobby is faster but needs 4 MiB
    assert all(c["status"] == "excluded" for c in entry.candidates if c["variant"] == "knobby")
    assert {c["reason"] for c in entry.candidates if c["variant"] == "knobby"} == {
        "peak memory 4.0 MiB above the budget 2.0 MiB"}


def test_failures_are_recorded_and_the_study_goes_on(tmp_path) -> None:
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    fake = FakeMeasure(TABLE, fail={"slow"})
    entry = tune([PROBLEM], job(trials=50, storage=storage, variants=POOL, **FINAL), measure_fn=fake).entries[0]
    assert entry.choice["variant"] == "knobby"
    (slow,) = [c for c in entry.candidates if c["variant"] == "slow"]
    assert slow["status"] == "failed" and "CUDA out of memory" in slow["reason"]
    (study,) = optuna.get_all_study_summaries(storage)
    failures = [v for k, v in study.user_attrs.items() if k.startswith("failure:")]
    assert failures == [{"variant": "slow", "params": {}, "reason": "RuntimeError: CUDA out of memory. Tried to allocate 8.00 GiB"}]


def test_objectives_memory_and_balanced() -> None:
    table = {("fast-fat", ()): (1.0, 64 * MiB, 1e-7), ("lean", ()): (9.0, 1 * MiB, 1e-7),
             ("middle", ()): (3.0, 8 * MiB, 1e-7), ("dominated", ()): (4.0, 16 * MiB, 1e-7)}
    pool = [_variant(n) for n, _ in table]
    memory = tune([PROBLEM], job(trials=10, objective="memory", variants=pool, **FINAL), measure_fn=FakeMeasure(table))
    assert memory.entries[0].choice["variant"] == "lean"
    balanced = tune([PROBLEM], job(trials=10, objective="balanced", memory_budget=32 * MiB, variants=pool, **FINAL), measure_fn=FakeMeasure(table)).entries[0]
    assert balanced.choice["variant"] == "middle"  # the fastest point of the front within the budget
    front = {c["variant"] for c in balanced.candidates if c.get("pareto")}
    assert front == {"lean", "middle"}  # fast-fat broke the budget; dominated is dominated


def test_head_to_head_corrects_a_lucky_trial() -> None:
    table = {**TABLE, ("lucky", ()): (1.0, MiB, 1e-7)}
    final = {("lucky", ()): (8.0, MiB, 1e-7)}  # measured again, it is really slower
    fake = FakeMeasure(table, final_table=final)
    entry = tune([PROBLEM], job(trials=50, variants=POOL + [_variant("lucky")], finalists=2, **FINAL), measure_fn=fake).entries[0]
    assert entry.choice["variant"] == "knobby"
    finals = [(name, p) for phase, name, p in fake.calls if phase == "final"]
    assert finals == [("lucky", {}), ("knobby", {"k": 5}), ("sdpa", {})] * 2  # interleaved rounds, sdpa as baseline


@pytest.mark.parametrize("speedup,chosen", [(0.99, "sdpa"), (0.975, "sdpa"), (0.9705, "sdpa"), (0.9695, "rival"),
                                            (0.965, "rival"), (0.90, "rival")])
def test_default_is_kept_unless_clearly_beaten(speedup: float, chosen: str) -> None:
    """Within TIE_MARGIN (3%) of sdpa is noise, not a reason to leave the default: both sides of the boundary."""
    table = {("sdpa", ()): (10.0, MiB, 1e-7), ("rival", ()): (10.0 * speedup, MiB, 1e-7)}
    pool = [_variant("sdpa"), _variant("rival")]
    entry = tune([PROBLEM], job(trials=5, variants=pool, **FINAL), measure_fn=FakeMeasure(table)).entries[0]
    assert entry.choice["variant"] == chosen


@pytest.mark.parametrize("objective,chosen", [("memory", "lean"), ("latency", "sdpa")])
def test_the_memory_objective_is_not_held_to_the_latency_margin(objective: str, chosen: str) -> None:
    """Half sdpa's peak at 1% less latency: a memory tune takes it; a latency tune calls the 1% noise."""
    table = {("sdpa", ()): (10.0, 8 * MiB, 1e-7), ("lean", ()): (9.9, 4 * MiB, 1e-7)}
    pool = [_variant("sdpa"), _variant("lean")]
    entry = tune([PROBLEM], job(trials=5, variants=pool, objective=objective, **FINAL), measure_fn=FakeMeasure(table)).entries[0]
    assert entry.choice["variant"] == chosen


def test_resume_reuses_the_study(tmp_path) -> None:
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    tune([PROBLEM], job(trials=50, storage=storage, variants=POOL, **FINAL), measure_fn=FakeMeasure(TABLE))
    again = FakeMeasure(TABLE)
    entry = tune([PROBLEM], job(trials=50, storage=storage, variants=POOL, **FINAL), measure_fn=again).entries[0]
    assert again.trial_points() == [] and entry.choice["variant"] == "knobby"
    other = Problem(batch=1, heads=2, q_len=128, head_dim=16)  # another problem: its own study
    tune([other], job(trials=50, storage=storage, variants=POOL, **FINAL), measure_fn=(third := FakeMeasure(TABLE)))
    assert len(third.trial_points()) == 10



def test_a_resumed_study_counts_only_the_first_calls_this_run_made(tmp_path) -> None:
    """The second run measures nothing new: its record's first calls are none of the first run's, so the parts of
    its time are parts of it (first_calls_s once summed every trial the study ever ran: 170.9 s of a 65.6 s run)."""
    storage = f"sqlite:///{tmp_path / 'study.db'}"

    def cold(variant, problem, params, **kwargs):
        if kwargs.get("phase", "trial") == "trial":
            time.sleep(0.02)  # the first call takes what it says
        return Measurement(latency_ms=1.0, latency_iqr_ms=0.0, peak_bytes=1, rel_error=0.0, repeats=1,
                           first_call_ms=20.0)

    first = tune([PROBLEM], job(trials=6, storage=storage, variants=POOL, **FINAL), measure_fn=cold).entries[0]
    assert first.tuning["first_calls_s"] >= 0.1 and first.tuning["wall_s"] >= first.tuning["first_calls_s"]
    again = tune([PROBLEM], job(trials=6, storage=storage, variants=POOL, **FINAL), measure_fn=cold).entries[0]
    assert again.tuning["first_calls_s"] == 0.0 and again.tuning["other_s"] == again.tuning["wall_s"]


KILLABLE = textwrap.dedent(
    """
    import json, sys, time
    from optuna.distributions import CategoricalDistribution
    from attn_tune import Problem, Variant
    from attn_tune.families.dense import dense_attention
    from attn_tune.measurement.measure import Measurement
    from attn_tune.tuner.job import TuneJob
    from attn_tune.tuner.tune import tune

    storage, log = sys.argv[1], sys.argv[2]
    knob = lambda p: {"k": CategoricalDistribution(list(range(12)))}
    pool = [Variant(name="knobby", family="dense", fn=dense_attention, exact=True, space=knob)]

    def slow_measure(variant, problem, params, **kwargs):
        phase = kwargs.get("phase", "trial")
        with open(log, "a") as f:
            f.write(json.dumps(["start", phase, params]) + "\\n")
        time.sleep(0.3)
        with open(log, "a") as f:
            f.write(json.dumps(["end", phase, params]) + "\\n")
        return Measurement(latency_ms=1.0 + params["k"], latency_iqr_ms=0.0, peak_bytes=1, rel_error=0.0, repeats=1)

    problem = Problem(batch=1, heads=2, q_len=64, head_dim=16)
    job = TuneJob().updated(trials=12, storage=storage, variants=pool, final_measure={"phase": "final"}, rounds=1)
    config = tune([problem], job, measure_fn=slow_measure)
    print(json.dumps(config.entries[0].choice))
    """
)


def _log(path: Path) -> list[tuple[str, str, int]]:
    if not path.exists():
        return []
    return [(e, phase, p["k"]) for e, phase, p in map(json.loads, path.read_text().splitlines())]


def _complete_trials(storage: str) -> list[optuna.trial.FrozenTrial]:
    (summary,) = optuna.get_all_study_summaries(storage)
    study = optuna.load_study(study_name=summary.study_name, storage=storage)
    return [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]


@pytest.mark.slow
def test_killed_run_resumes_without_repeating_finished_trials(tmp_path) -> None:
    script, log = tmp_path / "run.py", tmp_path / "calls.log"
    script.write_text(KILLABLE)
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    cmd = [sys.executable, str(script), storage, str(log)]
    env = {**os.environ, HEARTBEAT_ENV: "1"}  # the trial the kill left running is retried 3 s later, not 30
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    deadline = time.time() + 60
    while sum(e == "end" for e, _, _ in _log(log)) < 4 and time.time() < deadline:
        assert first.poll() is None, f"the run ended before it could be killed: {first.stderr.read().decode()[-500:]}"
        time.sleep(0.05)
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    killed = _log(log)
    # Finished means recorded as such in the storage: a measurement that ended just before the kill, but whose
    # trial was never told, is rightly measured again.
    finished_before = {t.params["knobby:k"] for t in _complete_trials(storage)}
    assert 3 <= len(finished_before) < 12

    second = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert second.returncode == 0, second.stderr
    assert json.loads(second.stdout.strip().splitlines()[-1]) == {"variant": "knobby", "params": {"k": 0}}
    resumed = _log(log)[len(killed):]
    remeasured = {k for e, phase, k in resumed if e == "start" and phase == "trial"}
    assert not (remeasured & finished_before)  # no finished trial is measured again
    assert finished_before | remeasured == set(range(12))  # and the whole space was covered
    assert sorted(t.params["knobby:k"] for t in _complete_trials(storage)) == list(range(12))  # each point once


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used with Study.optimize")  # ask() on purpose
def test_a_trial_killed_before_its_first_heartbeat_is_retried(tmp_path, monkeypatch) -> None:
    """Optuna counts a trial stale only once it has a heartbeat row; a worker killed between creating a trial and its
    first beat leaves it RUNNING forever, and every other worker waits on it. Once older than the grace period it
    is failed and queued again; a trial whose objective began (its heartbeat running) is left to Optuna."""
    from attn_tune.tuner.storage import fail_dead_trials, mark_started, open_storage

    monkeypatch.setenv(HEARTBEAT_ENV, "1")  # grace 3 s
    study = optuna.create_study(storage=open_storage(f"sqlite:///{tmp_path / 'study.db'}"))
    study.enqueue_trial({"x": 1.0})
    study.enqueue_trial({"x": 2.0})
    orphan = study.ask()  # what a worker killed right after `ask` leaves: RUNNING, no heartbeat
    live = study.ask()
    mark_started(live)
    fail_dead_trials(study)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.RUNNING] * 2, "failed before the grace period"
    time.sleep(3.5)
    fail_dead_trials(study)
    states = {t.number: t.state for t in study.trials}
    assert states[orphan.number] == optuna.trial.TrialState.FAIL
    assert states[live.number] == optuna.trial.TrialState.RUNNING
    (retry,) = [t for t in study.trials if t.state == optuna.trial.TrialState.WAITING]
    assert retry.system_attrs["fixed_params"] == {"x": 1.0} and retry.system_attrs["failed_trial"] == orphan.number


@pytest.mark.slow
def test_real_tune_on_tiny_cpu_problems_writes_a_config_that_loads_back(tmp_path) -> None:
    problems = [Problem(batch=1, heads=2, q_len=n, head_dim=16, causal=True) for n in (32, 96)]
    config = tune(problems, job(trials=6, seed=0, trial_measure={"warmup": 1, "min_repeats": 3, "min_time_s": 0.0}, final_measure={"min_repeats": 3, "min_time_s": 0.0}, rounds=1))
    out = tmp_path / "tuned.json"
    config.save(out)
    loaded = load_config(out)
    assert loaded.to_dict() == json.loads(out.read_text()) == config.to_dict()
    assert [e.problem for e in loaded.entries] == problems
    for entry in loaded.entries:
        chosen = attn_tune.get_variant(entry.choice["variant"])
        assert chosen.exact and entry.measured["rel_error"] < 1e-5 and entry.measured["peak_bytes"] > 0
        pool, _ = eligible_variants(entry.problem, attn_tune.variants(), approximate=False)
        assert entry.trials == min(6, space_size(entry.problem, pool))  # enumerated when it fits, else the budget
    assert loaded.device["type"] == "cpu" and loaded.torch and loaded.attn_tune == attn_tune.__version__


def test_bad_arguments_are_one_line_errors() -> None:
    with pytest.raises(attn_tune.AttnTuneError, match="unknown objective 'speed'"):
        tune([PROBLEM], job(objective="speed"))
    with pytest.raises(attn_tune.AttnTuneError, match="cannot open storage nosuchdb://u:\\*\\*\\*@h/x"):
        tune([PROBLEM], job(storage="nosuchdb://u:secret@h/x"))


def test_a_point_queued_twice_is_measured_once_and_the_twin_says_so() -> None:
    """Two workers may queue one point at once; the later trial is never measured and records why."""
    from attn_tune.tuner.space import grid_points
    from attn_tune.tuner.study import finish_study, prepare_study, run_trials

    pool = [_variant("sdpa"), _variant("slow")]
    prepared = prepare_study(PROBLEM, pool=pool, trials=10, max_error=None, objective="latency", storage=None, seed=0,
                             device={"type": "cpu", "name": "test"})
    first = grid_points(PROBLEM, prepared.chosen)[0]
    prepared.study.enqueue_trial(first)  # the same point again, as a second worker would
    fake = FakeMeasure(TABLE)
    run_trials(prepared, measure_fn=fake, measure_kwargs={}, max_error=None, memory_budget=None, objective="latency")
    assert sorted(fake.trial_points()) == [("sdpa", ()), ("slow", ())]
    failures = [v for k, v in prepared.study.user_attrs.items() if k.startswith("failure:")]
    assert failures == [{"variant": first["variant"], "params": {}, "reason": "not measured: the same point as trial 0"}]
    entry, _ = finish_study(prepared, objective="latency", max_error=None, memory_budget=None, measure_fn=fake,
                            finalists=2, rounds=2, final_kwargs={"phase": "final"})
    assert entry.trials == 2 and entry.choice["variant"] == "sdpa"  # the twin is no trial of the entry's


def test_an_exact_variant_beyond_its_dtypes_rounding_is_never_chosen() -> None:
    """Fastest by far, but 1e-3 off in float32 (tolerance 1e-4): a bug, not an option; the reason is recorded."""
    table = {**TABLE, ("sloppy", ()): (0.5, MiB, 1e-3), ("tight", ()): (0.6, MiB, 9e-5)}
    pool = POOL + [_variant("sloppy"), _variant("tight")]
    entry = tune([PROBLEM], job(trials=50, variants=pool, **FINAL), measure_fn=FakeMeasure(table)).entries[0]
    assert entry.choice["variant"] == "tight"
    (sloppy,) = [c for c in entry.candidates if c["variant"] == "sloppy"]
    assert sloppy["status"] == "excluded" and "beyond float32 rounding for an exact variant" in sloppy["reason"]


def test_the_seed_makes_the_search_reproducible() -> None:
    """A sampled space (400 points, 12 trials): one seed, one sequence of points; another seed, another."""
    wide = _variant("wide", space=lambda p: {"k": IntDistribution(1, 400)})
    table = {("sdpa", ()): (5.0, MiB, 1e-7)}
    table.update({("wide", (("k", k),)): (1.0 + abs(k - 300) / 50, MiB, 1e-7) for k in range(1, 401)})

    def points(seed):
        fake = FakeMeasure(table)
        tune([PROBLEM], job(trials=12, variants=[POOL[0], wide], seed=seed, **FINAL), measure_fn=fake)
        return fake.trial_points()

    first = points(7)
    assert points(7) == first and len(set(first)) > 5  # (a point proposed twice is measured once)
    assert points(8) != first


@pytest.mark.parametrize("seed", range(4))
def test_a_budget_smaller_than_the_space_tries_every_variant_first_and_no_point_twice(seed: int) -> None:
    """10 points, 5 trials: sdpa, then every other variant at its default knobs, then refined knobs; no repeats."""
    fake = FakeMeasure(TABLE)
    entry = tune([PROBLEM], job(trials=5, variants=POOL, seed=seed, **FINAL), measure_fn=fake).entries[0]
    points = fake.trial_points()
    assert points[:3] == [("sdpa", ()), ("slow", ()), ("knobby", (("k", 1),))]
    assert len(points) == len(set(points)) == 5 and entry.trials == 5
