"""The head-to-head: the best few candidates and the default re-measured in interleaved rounds, and each one's
latency ratio to the default judged by its confidence interval, not by one median each.

A round measures every finalist once, in turn (A B C A B C ...), so the machine's drift hits all alike and each
round gives a paired ratio candidate / default. The interval is Student's t on the log ratios, its level split
(Bonferroni) over the candidates compared, so that several equal kernels do not make one lucky "win". Rounds go
on, up to `max_rounds`, until every interval is narrower than the margin or lies wholly on one side of it.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from typing import Any, Callable

from attn_tune.errors import one_line
from attn_tune.measurement.measure import Measurement
from attn_tune.problem import Problem
from attn_tune.registry.variant import Variant
from attn_tune.tuner.intervals import CONFIDENCE, t_quantile

__all__ = ["TIE_MARGIN", "FAILURES", "Ratio", "ratio_interval", "head_to_head"]

FAILURES = (Exception,)  # anything a variant raises is a recorded failure, never the end of the study


# The default stays unless a candidate's whole interval is faster than it by more than this: two dispatch paths
# to one kernel differ by noise alone, and a config should not flip between them.
TIE_MARGIN = 0.03


@dataclass(frozen=True)
class Ratio:
    """A candidate's latency over the default's: the geometric mean of the paired round ratios and its interval."""

    ratio: float
    low: float
    high: float
    rounds: int

    def clearly_faster(self, margin: float = TIE_MARGIN) -> bool:
        return self.high < 1 - margin

    def decided(self, margin: float = TIE_MARGIN) -> bool:
        """Narrow enough, or wholly on one side of 1 - margin: more rounds would not change the decision."""
        return self.high - self.low < margin or self.high < 1 - margin or self.low > 1 - margin

    def to_dict(self) -> dict[str, Any]:
        return {"ratio": round(self.ratio, 4), "low": round(self.low, 4), "high": round(self.high, 4),
                "rounds": self.rounds}


def ratio_interval(ratios: list[float], compared: int = 1, confidence: float = CONFIDENCE) -> Ratio:
    """The interval of the ratio from paired per-round ratios; `compared` candidates share the error rate."""
    logs = [math.log(r) for r in ratios]
    mean = statistics.fmean(logs)
    if len(logs) < 2:
        return Ratio(math.exp(mean), 0.0, math.inf, len(logs))
    half = t_quantile(1 - (1 - confidence) / (2 * compared), len(logs) - 1) * statistics.stdev(logs) / math.sqrt(len(logs))
    return Ratio(math.exp(mean), math.exp(mean - half), math.exp(mean + half), len(logs))


def _key(variant: Variant, params: dict[str, Any]) -> str:
    return json.dumps([variant.name, params], sort_keys=True)


def head_to_head(
    finalists: list[tuple[Variant, dict[str, Any]]], problem: Problem, measure_fn: Callable[..., Measurement], *,
    baseline: str | None, min_rounds: int, max_rounds: int, final_kwargs: dict[str, Any], margin: float = TIE_MARGIN,
    on_round: Callable[[int, int], None] | None = None,
) -> tuple[dict[str, Measurement | str], dict[str, Ratio]]:
    """Measure the finalists in interleaved rounds; their figures (medians over rounds) or why they failed, and
    each candidate's `Ratio` to `baseline` (the key of the default among the finalists; None: no ratios).
    `on_round(done, at_most)` hears of each round (progress: the rounds may stop early, once decided)."""
    runs: dict[str, list[Measurement]] = {}
    failed: dict[str, str] = {}
    ratios: dict[str, Ratio] = {}
    for done in range(1, max(min_rounds, max_rounds) + 1):
        for variant, params in finalists:
            key = _key(variant, params)
            if key in failed:
                continue
            try:
                runs.setdefault(key, []).append(measure_fn(variant, problem, params, **final_kwargs))
            except FAILURES as exc:
                failed[key] = one_line(exc)
        ratios = _ratios(runs, failed, baseline)
        if on_round is not None:
            on_round(done, max(min_rounds, max_rounds))
        if done >= min_rounds and all(r.decided(margin) for r in ratios.values()):
            break
    result: dict[str, Measurement | str] = dict(failed)
    for key, ms in runs.items():
        if key not in failed:
            result[key] = Measurement(
                latency_ms=statistics.median(m.latency_ms for m in ms),
                latency_iqr_ms=statistics.median(m.latency_iqr_ms for m in ms),
                peak_bytes=max(m.peak_bytes for m in ms),
                rel_error=max(m.rel_error for m in ms),
                repeats=sum(m.repeats for m in ms),
                first_call_ms=ms[0].first_call_ms,
                output_digest=ms[0].output_digest,
                error_of=max(ms, key=lambda m: m.rel_error).error_of,  # which part (out, dq, dk, dv) was worst
            )
    return result, ratios


def _ratios(runs: dict[str, list[Measurement]], failed: dict[str, str], baseline: str | None) -> dict[str, Ratio]:
    if baseline is None or baseline in failed or baseline not in runs:
        return {}
    others = [k for k in runs if k != baseline and k not in failed]
    base = runs[baseline]
    return {k: ratio_interval([m.latency_ms / b.latency_ms for m, b in zip(runs[k], base)], compared=len(others))
            for k in others}
