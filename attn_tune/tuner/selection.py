"""Choosing from measured points: constraints, ranking, the Pareto front, the head-to-head, the config entry.

Nothing here knows Optuna: the study (tune.py) produces the points, this module decides.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Callable

from attn_tune.measurement.measure import Measurement
from attn_tune.problem import Problem
from attn_tune.registry.variant import DEFAULT_VARIANT, Variant
from attn_tune.tuned_config import Entry
from attn_tune.tuner.headtohead import FAILURES, TIE_MARGIN, Ratio, head_to_head

__all__ = ["Point", "TIE_MARGIN", "EXACT_TOLERANCE", "FAILURES", "constraint_violation", "choose"]

# An exact variant further than this from float64 attention has a bug, whatever its speed: it is never chosen.
EXACT_TOLERANCE = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 5e-2}

MeasureFn = Callable[..., Measurement]


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


def _size(n_bytes: int) -> str:
    """Bytes in the unit people read them in (KiB, MiB, GiB), as the rest of the output."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.1f} {unit}"
    return f"{n_bytes} B"


def constraint_violation(variant: Variant, problem: Problem, m: Measurement, max_error: float | None, budget: int | None) -> str | None:
    if variant.exact and not m.rel_error <= EXACT_TOLERANCE[problem.dtype]:
        return f"error {m.rel_error:.2e} is beyond {problem.dtype} rounding for an exact variant"
    if not variant.exact and not m.rel_error <= (max_error or 0.0):
        return f"error {m.rel_error:.2e} above max_error {max_error:g}"
    if budget is not None and m.peak_bytes > budget:
        return f"peak memory {_size(m.peak_bytes)} above the budget {_size(budget)}"
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


def choose(
    points: list[Point], trials: int, problem: Problem, by_name: dict[str, Variant], excluded: dict[str, str], *, objective: str,
    max_error: float | None, memory_budget: int | None, measure_fn: MeasureFn, finalists: int, rounds: int,
    final_kwargs: dict[str, Any], max_rounds: int | None = None, on_round: Callable[[int, int], None] | None = None,
) -> tuple[Entry | None, str]:
    """Rank the feasible points, re-measure the best few (and sdpa) head to head, build the entry.

    Points with sdpa's output and peak memory are the same kernel and never contend. The head-to-head runs
    `rounds` to `max_rounds` (default 3 x rounds) interleaved rounds; see `headtohead`."""
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

    default_point = next((p for p in feasible if p.variant == DEFAULT_VARIANT and not p.params), None)
    same_kernel = [p for p in ranked if default_point is not None and p is not default_point and _one_kernel(p, default_point)]
    for p in same_kernel:  # one kernel reached twice: no timing contest, the default stays
        p.reason = f"the same output and peak memory as {DEFAULT_VARIANT}: one kernel, no timing contest"
    contenders = [p for p in ranked if p not in same_kernel][:finalists]
    if default_point is not None and default_point not in contenders:
        contenders.append(default_point)
    baseline = default_point.key if default_point is not None and objective != "memory" else None
    final, ratios = head_to_head([(by_name[p.variant], p.params) for p in contenders], problem, measure_fn,
                                 baseline=baseline, min_rounds=rounds, max_rounds=max_rounds or 3 * rounds,
                                 final_kwargs=final_kwargs, on_round=on_round)
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
    winner, verdict = _winner(standing, default_point, ratios, objective)

    candidates = sorted(unique.values(), key=lambda p: (p.status != "ok", (p.measured or {}).get("latency_ms", math.inf)))
    entry = Entry(
        problem=problem,
        choice={"variant": winner.variant, "params": winner.params},
        measured=dict(winner.measured),
        max_error=max_error or 0.0,
        candidates=[p.to_candidate() for p in candidates]
        + [{"variant": name, "status": "unsupported", "reason": reason} for name, reason in excluded.items()],
        trials=trials,
        head_to_head=verdict,
    )
    return entry, "ok"


def _one_kernel(a: Point, b: Point) -> bool:
    """Bit-identical outputs on the same inputs and equal peak memory: one kernel reached by two names."""
    ma, mb = a.measured or {}, b.measured or {}
    return ma.get("output_digest") is not None and ma.get("output_digest") == mb.get("output_digest") \
        and ma.get("peak_bytes") == mb.get("peak_bytes")


def _winner(standing: list[Point], default: Point | None, ratios: dict[str, Ratio],
            objective: str) -> tuple[Point, dict[str, Any] | None]:
    """The choice, and (when the default took part) the verdict: every ratio with its interval and why.

    A candidate replaces the default only when its whole interval is faster by more than TIE_MARGIN; the memory
    objective ranks by peak memory and is not held to the latency rule."""
    best = min(standing, key=lambda p: _rank_key(p, "latency" if objective == "balanced" else objective))
    if objective == "memory" or default is None or default not in standing:
        return best, None
    if not ratios:  # no head-to-head (a study cut short): the trials' figures, with the same margin
        slower = best.measured["latency_ms"] > default.measured["latency_ms"] * (1 - TIE_MARGIN)
        return (default if slower else best), None
    rows = [{"variant": p.variant, "params": p.params, **ratios[p.key].to_dict()} for p in standing if p.key in ratios]
    clear = [p for p in standing if p.key in ratios and ratios[p.key].clearly_faster(TIE_MARGIN)]
    verdict: dict[str, Any] = {"baseline": DEFAULT_VARIANT, "margin": TIE_MARGIN, "ratios": rows}
    if clear:
        winner = min(clear, key=lambda p: ratios[p.key].ratio)
        verdict["decision"] = f"{winner.variant} is faster than {DEFAULT_VARIANT} over its whole interval"
        return winner, verdict
    verdict["decision"] = f"{DEFAULT_VARIANT} kept: no candidate's interval is wholly below {1 - TIE_MARGIN:g}x"
    return default, verdict
