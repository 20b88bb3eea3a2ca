"""Choosing from measured points: constraints, ranking, the Pareto front, the head-to-head, the config entry.

Nothing here knows Optuna: the study (tune.py) produces the points, this module decides.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from typing import Any, Callable

from attn_tune.problem import Problem
from attn_tune.registry.variant import DEFAULT_VARIANT, Variant
from attn_tune.tuned_config import Entry
from attn_tune.tuner.measure import Measurement

__all__ = ["Point", "TIE_MARGIN", "EXACT_TOLERANCE", "FAILURES", "constraint_violation", "choose", "failure_reason"]

# The default policy keeps the choice unless a candidate beats it by more than this in the head-to-head: two
# dispatch paths to one kernel differ by noise alone, and a config should not flip between them.
TIE_MARGIN = 0.03
# An exact variant whose measured error exceeds its dtype's rounding is computing something else: never chosen.
EXACT_TOLERANCE = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 5e-2}
FAILURES = (Exception,)  # anything a variant raises is a recorded failure, never the end of the study

MeasureFn = Callable[..., Measurement]


def failure_reason(exc: BaseException) -> str:
    """One line naming the exception."""
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"


@dataclass
class Point:
    """One measured (variant, params) point of a study."""

    variant: str
    params: dict[str, Any]
    status: str  # ok | excluded | failed
    reason: str | None = None
    measured: dict[str, Any] | None = None
    pareto: bool = False

    @property
    def key(self) -> str:
        return json.dumps([self.variant, self.params], sort_keys=True)

    def to_candidate(self) -> dict[str, Any]:
        data: dict[str, Any] = {"variant": self.variant, "params": self.params}
        data.update(self.measured or {})
        data["status"] = self.status
        if self.reason:
            data["reason"] = self.reason
        if self.pareto:
            data["pareto"] = True
        return data


def constraint_violation(variant: Variant, problem: Problem, m: Measurement, max_error: float | None, budget: int | None) -> str | None:
    if variant.exact and not m.rel_error <= EXACT_TOLERANCE[problem.dtype]:
        return f"error {m.rel_error:.2e} is beyond {problem.dtype} rounding for an exact variant"
    if not variant.exact and not m.rel_error <= (max_error or 0.0):
        return f"error {m.rel_error:.2e} above max_error {max_error:g}"
    if budget is not None and m.peak_bytes > budget:
        return f"peak memory {m.peak_bytes} B above the budget {budget} B"
    return None


def _rank_key(point: Point, objective: str) -> tuple[float, ...]:
    m = point.measured or {}
    if objective == "memory":
        return (m["peak_bytes"], m["latency_ms"])
    return (m["latency_ms"], m["peak_bytes"])


def _pareto(points: list[Point]) -> list[Point]:
    """Points no other point beats on both latency and peak memory."""
    def dominated(p: Point) -> bool:
        a = p.measured
        return any(
            b["latency_ms"] <= a["latency_ms"] and b["peak_bytes"] <= a["peak_bytes"]
            and (b["latency_ms"] < a["latency_ms"] or b["peak_bytes"] < a["peak_bytes"])
            for b in (q.measured for q in points)
        )

    return [p for p in points if not dominated(p)]


def _head_to_head(
    finalists: list[tuple[Variant, dict[str, Any]]], problem: Problem, measure_fn: MeasureFn, rounds: int,
    final_kwargs: dict[str, Any],
) -> dict[str, Measurement | str]:
    """Re-measure the finalists in interleaved rounds (A B C A B C ...), so drift hits them all alike."""
    runs: dict[str, list[Measurement]] = {}
    failed: dict[str, str] = {}
    for _ in range(rounds):
        for variant, params in finalists:
            key = json.dumps([variant.name, params], sort_keys=True)
            if key in failed:
                continue
            try:
                runs.setdefault(key, []).append(measure_fn(variant, problem, params, **final_kwargs))
            except FAILURES as exc:
                failed[key] = failure_reason(exc)
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
            )
    return result


def choose(
    points: list[Point], trials: int, problem: Problem, by_name: dict[str, Variant], excluded: dict[str, str], *, objective: str,
    max_error: float | None, memory_budget: int | None, measure_fn: MeasureFn, finalists: int, rounds: int,
    final_kwargs: dict[str, Any],
) -> tuple[Entry | None, str]:
    """Rank the feasible points, re-measure the best few (and sdpa) head to head, build the entry."""
    unique: dict[str, Point] = {}
    for p in points:  # a point measured twice (a sampler's repeat, a resumed run) keeps its first figures
        unique.setdefault(p.key, p)
    feasible = [p for p in unique.values() if p.status == "ok"]
    if objective == "balanced":
        for p in _pareto(feasible):
            p.pareto = True
        ranked = sorted((p for p in feasible if p.pareto), key=lambda p: _rank_key(p, objective))
    else:
        ranked = sorted(feasible, key=lambda p: _rank_key(p, objective))
    if not ranked:
        reasons = "; ".join(f"{p.variant}: {p.reason}" for p in unique.values())
        return None, f"no candidate met the constraints ({reasons or 'no trial finished'})"

    contenders = ranked[:finalists]
    baseline = next((p for p in feasible if p.variant == DEFAULT_VARIANT and not p.params), None)
    if baseline is not None and baseline not in contenders:
        contenders.append(baseline)
    final = _head_to_head([(by_name[p.variant], p.params) for p in contenders], problem, measure_fn, rounds, final_kwargs)
    for p in contenders:
        outcome = final.get(p.key)
        if outcome is None:  # no head-to-head (rounds=0, a study cut short): the trial's figures stand
            continue
        if isinstance(outcome, str):
            p.status, p.reason = "failed", f"head-to-head: {outcome}"
            continue
        p.measured = {k: v for k, v in outcome.to_dict().items() if k != "repeats"}
        violation = constraint_violation(by_name[p.variant], problem, outcome, max_error, memory_budget)
        if violation is not None:
            p.status, p.reason = "excluded", violation
    standing = [p for p in contenders if p.status == "ok" and (objective != "balanced" or p.pareto)]
    if not standing:
        return None, "every finalist failed or broke a constraint when measured again"
    winner = min(standing, key=lambda p: _rank_key(p, "latency" if objective == "balanced" else objective))
    default = next((p for p in standing if p.variant == DEFAULT_VARIANT and not p.params), None)
    if (
        objective != "memory" and default is not None and winner is not default
        and winner.measured["latency_ms"] > default.measured["latency_ms"] * (1 - TIE_MARGIN)
    ):
        winner = default

    candidates = sorted(unique.values(), key=lambda p: (p.status != "ok", (p.measured or {}).get("latency_ms", math.inf)))
    entry = Entry(
        problem=problem,
        choice={"variant": winner.variant, "params": winner.params},
        measured=dict(winner.measured),
        max_error=max_error or 0.0,
        candidates=[p.to_candidate() for p in candidates]
        + [{"variant": name, "status": "unsupported", "reason": reason} for name, reason in excluded.items()],
        trials=trials,
    )
    return entry, "ok"
