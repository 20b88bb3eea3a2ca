"""Measure several variants on several problems, recording why any could not run, with latency relative to `sdpa`."""

from __future__ import annotations

import gc
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

from attn_tune.errors import UnsupportedProblem
from attn_tune.measurement.measure import Measurement, measure
from attn_tune.problem import Problem
from attn_tune.registry.catalog import availability
from attn_tune.registry.variant import DEFAULT_VARIANT, Variant

__all__ = ["BenchResult", "bench"]



@dataclass
class BenchResult:
    """One (problem, variant) cell: `status` is ok, unavailable, unsupported or failed; `reason` says why not ok."""

    problem: Problem
    variant: Variant
    status: str
    reason: str | None = None
    measured: Measurement | None = None
    vs_baseline: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "problem": self.problem.to_dict(),
            "variant": self.variant.name,
            "exact": self.variant.exact,
            "status": self.status,
            "reason": self.reason,
            "measured": None if self.measured is None else self.measured.to_dict(),
            f"latency_vs_{DEFAULT_VARIANT}": self.vs_baseline,
        }


def _one(variant: Variant, problem: Problem, **measure_kwargs: Any) -> BenchResult:
    reason = availability(variant)
    if reason is not None:
        return BenchResult(problem, variant, "unavailable", reason)
    reason = variant.supports(problem)
    if reason is not None:
        return BenchResult(problem, variant, "unsupported", reason)
    try:
        return BenchResult(problem, variant, "ok", measured=measure(variant, problem, **measure_kwargs))
    except UnsupportedProblem as exc:
        return BenchResult(problem, variant, "unsupported", str(exc))
    except (RuntimeError, ValueError, MemoryError) as exc:  # out of memory, kernel errors: a result, not a crash
        gc.collect()
        return BenchResult(problem, variant, "failed", f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}")


def bench(
    problems: Sequence[Problem],
    variants: Iterable[Variant],
    *,
    on_result: Callable[[BenchResult], None] | None = None,
    **measure_kwargs: Any,
) -> list[BenchResult]:
    """Measure every variant on every problem (nothing is tuned; an approximate variant's error is against the
    problem's exact attention).

    `measure_kwargs` go to `measure` (seed, warmup, min_time_s, ...). `on_result` is called after each cell,
    for progress bars.
    """
    variants = list(variants)
    results: list[BenchResult] = []
    for problem in problems:
        row = []
        for variant in variants:
            result = _one(variant, problem, **measure_kwargs)
            row.append(result)
            if on_result is not None:
                on_result(result)
        base = next((r for r in row if r.variant.name == DEFAULT_VARIANT and r.measured is not None), None)
        for result in row:
            if base is not None and result.measured is not None:
                result.vs_baseline = result.measured.latency_ms / base.measured.latency_ms
        results.extend(row)
    return results
