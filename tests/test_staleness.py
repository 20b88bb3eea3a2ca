"""Configs over time: what an entry was measured with, the one warning when that changed, re-tuning only what went
stale, and time limits on tuning."""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import attn_tune
from attn_tune import Problem
from attn_tune.cli.main import cli
from attn_tune.measurement.measure import measure
from attn_tune.staleness import local_devices, measured_with
from attn_tune.tuned_config import load_config
from attn_tune.tuner.retune import retune, stale_problems
from attn_tune.tuner.tune import tune
from tests.runtime_helpers import config, entry, registered
from tests.test_tune import POOL, TABLE, FakeMeasure, MiB
from tests.jobs import Heard, job

EXACT = Problem(batch=1, heads=2, q_len=64, head_dim=16, causal=True)       # chunked, measured under torch 2.0.0
APPROX = Problem(batch=1, heads=2, q_len=512, head_dim=16)                  # local, under attn-tune 0.0.1
CURRENT = Problem(batch=1, heads=2, q_len=128, head_dim=16, causal=True)    # dense, measured here and now
MOVED = Problem(batch=1, heads=2, q_len=256, head_dim=16, causal=True)      # chunked, on another CPU


def _with(variant: str, **changed: str) -> dict[str, str]:
    return {**measured_with(variant), **changed}


def _stale_config():
    here = local_devices()["cpu"]
    entries = [
        entry(EXACT, "chunked", {"chunk": 16}),
        entry(APPROX, "local", {"local_window": 64, "block": 64}, max_error=2.0),
        entry(CURRENT, "dense"),
        entry(MOVED, "chunked", {"chunk": 32}, device={**here, "name": "Other CPU @ 1GHz"}),
    ]
    for e, record in zip(entries, [_with("chunked", torch="2.0.0"), _with("local", attn_tune="0.0.1"),
                                   _with("dense"), _with("chunked")]):
        e.measured_with = record
    return config(entries, device=here)


pytestmark = pytest.mark.usefixtures("no_config")


def _decision(problem: Problem):
    q = torch.randn(problem.batch, problem.heads, problem.q_len, problem.head_dim)
    return attn_tune.explain(q, q, q, is_causal=problem.causal)


def test_one_warning_names_each_change_and_the_policy_applies(tmp_path: Path) -> None:
    path = tmp_path / "tuned.json"
    _stale_config().save(path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        attn_tune.use_config(path)
    ours = [w for w in caught if "attn-tune" in str(w.message)]
    assert len(ours) == 1, [str(w.message) for w in caught]
    message = str(ours[0].message)
    assert "3 of 4 entries" in message and "\n" not in message
    assert "torch 2.0.0 -> " + torch.__version__ + " (1 entry)" in message
    assert "attn-tune 0.0.1 -> " in message and "device Other CPU @ 1GHz" in message
    assert f"--config {path} --stale-only --out {path}" in message
    stale_exact = _decision(EXACT)
    assert stale_exact.variant == "chunked" and "stale: torch 2.0.0" in stale_exact.reason
    retired = _decision(APPROX)
    assert (retired.variant, retired.rule) == ("sdpa", "fallback") and "no longer known" in retired.reason
    assert _decision(CURRENT).variant == "dense" and "stale" not in _decision(CURRENT).reason
    assert _decision(MOVED).variant == "chunked" and "stale: device" in _decision(MOVED).reason


def test_a_merged_config_with_this_machines_entry_beside_anothers_is_not_stale() -> None:
    here = local_devices()["cpu"]
    ours = entry(EXACT, "chunked", {"chunk": 16}, device=here)
    theirs = entry(EXACT, "dense", device={**here, "name": "Other CPU"})
    ours.measured_with, theirs.measured_with = _with("chunked"), _with("dense")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        attn_tune.use_config(config([theirs, ours], device={"type": "mixed", "name": "2 devices"}))
    assert _decision(EXACT).variant == "chunked" and "stale" not in _decision(EXACT).reason


def test_a_plugin_version_change_retires_its_approximate_entry_only() -> None:
    """A third-party plugin's version moved: its approximate choice is not used; exact ones elsewhere stay."""
    def rough(q, k, v, **kwargs):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    with registered(attn_tune.Variant(name="rough", family="dense", fn=rough, exact=False)):
        e = entry(APPROX, "rough", max_error=2.0)
        e.measured_with = _with("rough", package_version="1.0")
        now = measured_with("rough")["package_version"]
        with pytest.warns(RuntimeWarning, match=f" 1.0 -> {now} \\(1 entry\\)"):
            attn_tune.use_config(config([e]))
        assert _decision(APPROX).variant == "sdpa"


def test_show_marks_stale_and_unused_entries(tmp_path: Path) -> None:
    path = tmp_path / "tuned.json"
    _stale_config().save(path)
    result = CliRunner().invoke(cli, ["show", str(path)])
    assert result.exit_code == 0, result.output
    rows = {line.split()[2]: line for line in result.stdout.splitlines() if line.startswith("b1 ")}
    assert "stale: torch 2.0.0" in rows["q64"] and "not used: attn-tune 0.0.1" in rows["q512"]
    assert rows["q128"].rstrip().endswith("current")
    assert "3 of 4 entries" in result.stderr
    statuses = [e["status"] for e in json.loads(CliRunner().invoke(cli, ["show", str(path), "--json"]).stdout)["entries"]]
    assert statuses[1].startswith("not used: ") and statuses[2] == "current"


def test_stale_only_retunes_only_the_stale_entries_earlier_choice_first() -> None:
    """Through an injected measurement: stale and missing problems get studies (5 trials, the old choice
    measured first); the current entry is kept byte for byte."""
    p_stale, p_current, p_missing = (Problem(batch=1, heads=2, q_len=n, head_dim=16) for n in (64, 128, 32))
    old_stale, current = entry(p_stale, "knobby", {"k": 2}), entry(p_current, "slow")
    old_stale.measured_with, current.measured_with = _with("knobby", torch="1.0"), _with("slow")
    old = config([old_stale, current], device=local_devices()["cpu"])
    problems = stale_problems(old, [p_missing, p_current])
    assert problems == [p_stale, p_missing]
    calls: list[tuple[Problem, str, dict, str]] = []

    def fake(variant, problem, params, **kwargs):
        calls.append((problem, variant.name, dict(params), kwargs.get("phase", "trial")))
        return FakeMeasure(TABLE)(variant, problem, params, **kwargs)

    new = retune(old, problems, job(trials=5, variants=POOL, seed=0, rounds=1, final_measure={"phase": "final"}),
                 given={"variants"}, measure_fn=fake)
    assert {c[0] for c in calls} == {p_stale, p_missing}  # the current problem is not measured at all
    stale_trials = [c[1:3] for c in calls if c[0] == p_stale and c[3] == "trial"]
    assert stale_trials[0] == ("knobby", {"k": 2}) and len(stale_trials) <= 5  # the old choice first; a repeat is copied
    assert [e.problem for e in new.entries] == [p_stale, p_current, p_missing]
    assert json.dumps(new.entries[1].to_dict()) == json.dumps(current.to_dict())
    assert new.entries[0].trials == new.entries[2].trials == 5
    assert new.entries[0].measured_with["torch"] == torch.__version__


@pytest.mark.slow
def test_stale_only_from_the_command_line(tmp_path: Path) -> None:
    path = tmp_path / "tuned.json"
    stale = Problem(batch=1, heads=2, q_len=16, head_dim=8, causal=True)
    kept = Problem(batch=1, heads=2, q_len=32, head_dim=8, causal=True)
    e_stale, e_kept = entry(stale, "dense"), entry(kept, "dense")
    e_stale.measured_with, e_kept.measured_with = _with("dense", torch="2.0.0"), _with("dense")
    config([e_stale, e_kept], device=local_devices()["cpu"]).save(path)
    before = json.loads(path.read_text())["entries"][1]
    args = ["tune", "--config", str(path), "--stale-only", "--variant", "sdpa", "--variant", "dense", "--out", str(path)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    after = json.loads(path.read_text())["entries"]
    assert after[1] == before and after[0]["measured_with"]["torch"] == torch.__version__
    assert after[0]["trials"] == 2 and "time: " in result.stdout  # both points of the space, no more
    again = CliRunner().invoke(cli, args)
    assert again.exit_code == 0 and "nothing in" in again.stdout


class SlowMeasure(FakeMeasure):
    """FakeMeasure that takes `seconds` per call, as a real measurement of a big problem would."""

    def __init__(self, table, seconds: float) -> None:
        super().__init__(table)
        self.seconds = seconds

    def __call__(self, variant, problem, params, **kwargs):
        time.sleep(self.seconds)
        return super().__call__(variant, problem, params, **kwargs)


def test_a_run_timeout_stops_within_the_limit_plus_one_trial_with_a_valid_config(tmp_path: Path) -> None:
    wide = {("sdpa", ()): (5.0, MiB, 1e-7), **{("knobby", (("k", k),)): (2.0 + abs(k - 5), MiB, 1e-7) for k in range(1, 9)}}
    problems = [Problem(batch=1, heads=2, q_len=n, head_dim=16) for n in (64, 128)]
    started = time.monotonic()
    tuned = tune(problems, job(trials=50, variants=[POOL[0], POOL[2]], timeout=1.0, seed=0), measure_fn=SlowMeasure(wide, 0.3))
    took = time.monotonic() - started
    assert took < 1.0 + 0.3 + 0.5  # the limit, one trial, and bookkeeping
    (first,) = tuned.entries  # the second problem had no time left: no entry
    assert first.tuning["cut_short"].startswith("stopped by the time limit after") and first.trials < 9
    tuned.save(tmp_path / "t.json")
    assert load_config(tmp_path / "t.json").entries[0].tuning["cut_short"]


def test_a_first_call_longer_than_the_time_left_is_reported_not_waited_out() -> None:
    def slow(q, k, v, **kwargs):
        time.sleep(0.5)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    variant = attn_tune.Variant(name="slow-start", family="dense", fn=slow, exact=True)
    problem = Problem(batch=1, heads=2, q_len=16, head_dim=8)
    with pytest.raises(TimeoutError, match=r"the first call alone took 0\.[5-9] s, past the 0\.2 s"):
        measure(variant, problem, first_call_limit_s=0.2)
    notes = []
    started = time.monotonic()
    tuned = tune([problem], job(variants=[variant], problem_timeout=0.2), listener=Heard(result=lambda p, e, n: notes.append(n)))
    assert time.monotonic() - started < 2.0 and tuned.entries == []
    assert "TimeoutError: the first call alone took" in notes[0]


@pytest.mark.slow
def test_tuning_records_where_the_time_went() -> None:
    calls = []

    def cold_start(q, k, v, **kwargs):  # the first call pays 0.2 s, as a compile would
        calls.append(1)
        time.sleep(0.2 if len(calls) == 1 else 0.0)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    variant = attn_tune.Variant(name="cold-start", family="dense", fn=cold_start, exact=True)
    tuned = tune([Problem(batch=1, heads=2, q_len=32, head_dim=8)], job(variants=[variant], trials=1))
    record = tuned.entries[0].tuning
    assert record["wall_s"] >= record["first_calls_s"] >= 0.2 and "cut_short" not in record
    assert record["other_s"] == pytest.approx(record["wall_s"] - record["first_calls_s"], abs=2e-3)


@pytest.mark.parametrize("args,fragment", [
    (["--stale-only"], "--stale-only re-tunes a tuned config: give it with --config"),
    (["--config", "x.json"], "--config goes with --stale-only"),
    (["--timeout", "0"], "0 is not in the range x>0"),
    (["--timeout", "soon"], "'soon' is not a valid float"),
    (["--problem-timeout", "-3"], "not in the range x>0"),
])
def test_bad_time_and_stale_options_are_one_line(tmp_path: Path, args, fragment) -> None:
    result = CliRunner().invoke(cli, ["tune", "--seq-len", "16", "--out", str(tmp_path / "t.json"), *args])
    assert result.exit_code == 2 and fragment in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "t.json").exists()


@pytest.mark.slow
def test_timeout_from_the_command_line_bounds_a_run_that_would_take_minutes(tmp_path: Path) -> None:
    """Three problems x 50 trials of real measurements (minutes); --timeout 4 ends it within the limit plus one
    trial (a few seconds here), writes a valid config and says what was cut short."""
    out = tmp_path / "t.json"
    started = time.monotonic()
    result = CliRunner().invoke(cli, ["tune", "--seq-len", "256,512,1024", "--heads", "2", "--head-dim", "32",
                                      "--trials", "50", "--timeout", "4", "--out", str(out)])
    took = time.monotonic() - started
    assert result.exit_code == 0, result.output
    assert took < 4 + 6, took
    assert load_config(out).entries  # valid, with what was done in time
    lines = result.stdout.splitlines()
    assert sum("cut short" in line for line in lines[:3]) >= 2  # the problems the limit reached say so
    assert lines[-2].startswith("time: ") and "cut short by the time limit" in lines[-2]


@pytest.mark.slow
def test_the_problem_timeout_counts_for_each_problem_from_the_api() -> None:
    """Two problems of 9 trials x 0.3 s each, 1 s per problem: each gets its own second (the second problem is not
    starved by the first's time), each is cut short, and the run takes about two limits."""
    wide = {("sdpa", ()): (5.0, MiB, 1e-7), **{("knobby", (("k", k),)): (2.0 + abs(k - 5), MiB, 1e-7) for k in range(1, 9)}}
    problems = [Problem(batch=1, heads=2, q_len=n, head_dim=16) for n in (64, 128)]
    notes = []
    started = time.monotonic()
    tuned = tune(problems, job(trials=50, variants=[POOL[0], POOL[2]], problem_timeout=1.0, seed=0), measure_fn=SlowMeasure(wide, 0.3), listener=Heard(result=lambda p, e, n: notes.append(n)))
    took = time.monotonic() - started
    assert [e.problem for e in tuned.entries] == problems, notes
    for tuned_entry in tuned.entries:
        assert tuned_entry.tuning["cut_short"].startswith("stopped by the time limit after"), tuned_entry.tuning
        assert 2 <= tuned_entry.trials < 9
    assert took < 2 * (1.0 + 0.3) + 1.0, took


@pytest.mark.slow
def test_the_problem_timeout_counts_for_each_problem_from_the_command_line(tmp_path: Path) -> None:
    out = tmp_path / "t.json"
    result = CliRunner().invoke(cli, ["tune", "--seq-len", "256,512", "--heads", "2", "--head-dim", "32",
                                      "--trials", "50", "--problem-timeout", "1.5", "--out", str(out)])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert len(load_config(out).entries) == 2, result.stdout  # the second problem had its own time
    assert all("cut short" in line for line in lines[:2]), lines[:2]


def test_stale_only_on_a_merged_config_keeps_the_other_machines_entry_byte_for_byte(tmp_path: Path) -> None:
    """Another CPU's entry first, this machine's (stale) second, same problem: the fresh entry takes this machine's
    place; the other's comes through untouched; nothing is doubled."""
    here = local_devices()["cpu"]
    theirs = entry(EXACT, "dense", device={**here, "name": "Other CPU @ 1GHz"})
    ours = entry(EXACT, "chunked", {"chunk": 16}, device=here)
    theirs.measured_with, ours.measured_with = _with("dense"), _with("chunked", torch="2.0.0")
    merged = config([theirs, ours], device={"type": "mixed", "name": "2 devices"})
    assert stale_problems(merged) == [EXACT]
    new = retune(merged, [EXACT], job(trials=2, variants=POOL[:2], seed=0, rounds=1), given={"variants"},
                 measure_fn=FakeMeasure(TABLE))
    assert len(new.entries) == 2 and json.dumps(new.entries[0].to_dict()) == json.dumps(theirs.to_dict())
    assert new.entries[1].device["name"] == here["name"] and new.entries[1].measured_with["torch"] == torch.__version__
    ours.measured_with = _with("chunked")
    assert stale_problems(config([theirs, ours], device={"type": "mixed", "name": "2 devices"})) == []
