"""The head-to-head decides with a confidence interval on each candidate's latency ratio to sdpa, through injected
noisy measurements (no timing here): a real win beyond the noise wins, equal kernels leave the default in place,
and one kernel reached under two names never contends."""

from __future__ import annotations

import json
import math
import random
import statistics

import pytest
from click.testing import CliRunner

from attn_tune import Problem
from attn_tune.cli.main import cli
from attn_tune.measurement.measure import Measurement
from attn_tune.tuner.headtohead import head_to_head, ratio_interval
from attn_tune.tuner.intervals import t_quantile
from attn_tune.tuner.tune import tune
from tests.test_tune import MiB, _variant
from tests.jobs import job

PROBLEM = Problem(batch=1, heads=2, q_len=64, head_dim=16)


class NoisyMeasure:
    """True latency per variant, each call multiplied by exp(N(0, noise)), seeded; digests say which kernel ran."""

    def __init__(self, latency: dict[str, float], noise: float, seed: int, digests: dict[str, str] | None = None):
        self.latency, self.noise, self.rng = latency, noise, random.Random(seed)
        self.digests = digests or {}
        self.final_calls: list[str] = []

    def __call__(self, variant, problem, params, **kwargs):
        if kwargs.get("phase") == "final":
            self.final_calls.append(variant.name)
        ms = self.latency[variant.name] * math.exp(self.rng.gauss(0.0, self.noise))
        return Measurement(latency_ms=ms, latency_iqr_ms=0.0, peak_bytes=MiB, rel_error=1e-7, repeats=5,
                           output_digest=self.digests.get(variant.name, variant.name))


def _tune(latency: dict[str, float], seed: int, **kwargs):
    pool = [_variant(name) for name in latency]
    measure = NoisyMeasure(latency, kwargs.pop("noise", 0.08), seed, kwargs.pop("digests", None))
    entry = tune([PROBLEM], job(trials=len(pool), variants=pool, seed=seed, final_measure={"phase": "final"}, **kwargs), measure_fn=measure).entries[0]
    return entry, measure


@pytest.mark.parametrize("seed", range(12))
def test_a_variant_truly_25_percent_faster_under_8_percent_noise_wins(seed: int) -> None:
    entry, _ = _tune({"sdpa": 10.0, "fast": 7.5}, seed)
    assert entry.choice["variant"] == "fast", entry.head_to_head
    (row,) = [r for r in entry.head_to_head["ratios"] if r["variant"] == "fast"]
    assert row["high"] < 0.97 and row["low"] <= 0.75 * 1.15


@pytest.mark.parametrize("seed", range(12))
def test_four_equal_variants_under_the_same_noise_leave_the_default(seed: int) -> None:
    entry, measure = _tune({"sdpa": 10.0, "a": 10.0, "b": 10.0, "c": 10.0, "d": 10.0}, seed)
    assert entry.choice["variant"] == "sdpa", entry.head_to_head
    assert entry.head_to_head["decision"].startswith("sdpa kept")
    assert all(r["low"] < 0.97 < r["high"] or r["low"] >= 0.97 for r in entry.head_to_head["ratios"])


def test_one_kernel_under_two_names_never_contends() -> None:
    """`twin` gives sdpa's output bits and peak memory: the same kernel. Even 20% 'faster' it is not timed."""
    entry, measure = _tune({"sdpa": 10.0, "twin": 8.0}, 0, noise=0.0, digests={"sdpa": "x", "twin": "x"})
    assert entry.choice["variant"] == "sdpa" and "twin" not in measure.final_calls
    (twin,) = [c for c in entry.candidates if c["variant"] == "twin"]
    assert "one kernel, no timing contest" in twin["reason"]
    control, _ = _tune({"sdpa": 10.0, "twin": 8.0}, 0, noise=0.0, digests={"sdpa": "x", "twin": "y"})
    assert control.choice["variant"] == "twin"


def test_rounds_go_on_until_the_interval_decides() -> None:
    """Noise-free: three rounds decide. Noisy and close: more rounds, up to max_rounds."""
    _, quiet = _tune({"sdpa": 10.0, "fast": 7.5}, 0, noise=0.0)
    assert quiet.final_calls.count("sdpa") == 3
    _, noisy = _tune({"sdpa": 10.0, "close": 9.6}, 1, noise=0.08, max_rounds=7)
    assert noisy.final_calls.count("sdpa") == 7


@pytest.mark.parametrize("df,exact", [(1, 12.706), (2, 4.303), (3, 3.182), (5, 2.571), (10, 2.228), (30, 2.042)])
def test_t_quantile_is_students(df: int, exact: float) -> None:
    assert t_quantile(0.975, df) == pytest.approx(exact, rel=0.02)


def test_ratio_interval_of_paired_rounds() -> None:
    r = ratio_interval([0.8, 0.82, 0.78, 0.8])
    assert r.low < 0.8 < r.high < 0.97 and r.rounds == 4 and r.clearly_faster()
    assert not ratio_interval([0.9, 1.1, 0.95, 1.05]).clearly_faster()


def test_show_prints_the_ratio_with_its_interval(tmp_path) -> None:
    entry, _ = _tune({"sdpa": 10.0, "fast": 7.5}, 0)
    from tests.runtime_helpers import config

    path = tmp_path / "t.json"
    config([entry]).save(path)
    line = next(line for line in CliRunner().invoke(cli, ["show", str(path)]).stdout.splitlines() if "fast" in line)
    row = entry.head_to_head["ratios"][0]
    assert f"{row['ratio']:.2f}x [{row['low']:.2f}-{row['high']:.2f}]" in line


def _student_t_quantile(p: float, df: int) -> float:
    """The exact Student's t quantile, by root-finding on its CDF (mpmath's regularized incomplete beta)."""
    import mpmath

    cdf = lambda t: 1 - mpmath.betainc(df / 2, 0.5, 0, df / (df + t * t), regularized=True) / 2  # noqa: E731
    return float(mpmath.findroot(lambda t: cdf(t) - p, 2.0))


def test_the_head_to_head_splits_its_level_over_the_candidates_with_students_t() -> None:
    """Three candidates over five scripted rounds: each interval's half-width (in log ratio) is Student's t at
    1 - 0.05 / (2 x 3), df 4, times the standard error; neither the unsplit level nor the normal quantile."""
    script = {"sdpa": [10.0] * 5, "a": [9.0, 9.6, 8.5, 9.3, 8.8], "b": [10.4, 9.1, 10.9, 9.8, 10.2],
              "c": [7.0, 7.9, 7.2, 6.6, 7.5]}
    calls = {name: iter(values) for name, values in script.items()}

    def scripted(variant, problem, params, **kwargs):
        return Measurement(latency_ms=next(calls[variant.name]), latency_iqr_ms=0.0, peak_bytes=MiB, rel_error=1e-7,
                           repeats=5)

    pool = [(_variant(name), {}) for name in script]
    keys = {name: json.dumps([name, {}], sort_keys=True) for name in script}
    _, ratios = head_to_head(pool, PROBLEM, scripted, baseline=keys["sdpa"], min_rounds=5, max_rounds=5,
                             final_kwargs={})
    t_split = _student_t_quantile(1 - 0.05 / 6, 4)
    assert t_split / _student_t_quantile(0.975, 4) > 1.3 and t_split / statistics.NormalDist().inv_cdf(1 - 0.05 / 6) > 1.5
    for name in "abc":
        logs = [math.log(x / 10.0) for x in script[name]]
        half = t_split * statistics.stdev(logs) / math.sqrt(5)
        got = ratios[keys[name]]
        assert got.rounds == 5 and got.ratio == pytest.approx(math.exp(statistics.fmean(logs)), rel=1e-9)
        assert math.log(got.high / got.low) / 2 == pytest.approx(half, rel=0.05)  # the quantile's approximation
