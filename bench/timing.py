"""The bench scripts' one timing loop: every callable once per round, interleaved, so that a machine's drift
(another process, the clock, the allocator) hits all of them alike; ratios are then taken round by round."""

from __future__ import annotations

import random
import statistics
import time
from typing import Any, Callable

__all__ = ["interleaved", "median_ms"]


def interleaved(fns: dict[str, Callable[[], Any]], rounds: int, repeats: int = 1,
                shuffle: bool = True) -> dict[str, list[float]]:
    """Per callable, one time per round in milliseconds: the median of `repeats` calls back to back. Each is called
    once first (warm: masks, buffers, first-call set-up); each round calls them in a new seeded shuffled order, or
    in the order given (`shuffle=False`)."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    order, mix = list(fns.items()), random.Random(0).shuffle
    for _ in range(rounds):
        if shuffle:
            mix(order)
        for name, fn in order:
            calls = []
            for _ in range(repeats):
                started = time.perf_counter()
                fn()
                calls.append((time.perf_counter() - started) * 1e3)
            times[name].append(statistics.median(calls))
    return times


def median_ms(times: dict[str, list[float]]) -> dict[str, float]:
    """Each callable's median over its rounds."""
    return {name: statistics.median(ts) for name, ts in times.items()}
